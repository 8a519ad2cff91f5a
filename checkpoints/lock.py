"""One live train.py per run directory: a second one on the same directory stops at once, naming the first.

The lock is a POSIX record lock (fcntl.lockf) on `<run dir>/train.lock`: the kernel releases it when its process
ends, however it ends (a SIGKILL, a node's reboot for a local disk), so a killed run never leaves it stuck and a
requeued job gets in. It belongs to the process that took it, not to its children: forked dataloader workers do not
hold it after the process dies. Only the process of global rank 0 takes it (the other ranks of a run share the
directory), as read from the environment before any rank is started. A requeued SLURM job waits a bounded time for
it (its previous run may still be ending, on another node), saying so; any other start stops at once.
"""

import contextlib
import fcntl
import logging
import os
import socket
import time
from pathlib import Path

log = logging.getLogger(__name__)
LOCK_FILE = "train.lock"
RANK_VARIABLES = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")  # torchrun, srun, Lightning


def launched_as_rank_zero() -> bool:
    """True for the process of global rank 0, or the launcher that will become it (Lightning starts the other ranks
    with LOCAL_RANK and NODE_RANK set; srun and torchrun set them for every task)."""
    return all(int(os.environ.get(name, 0)) == 0 for name in RANK_VARIABLES)


REQUEUE_WAIT_S = 120  # a requeued job's wait for its previous run: SLURM's KillWait (30 s), the write in flight


def lock_wait_s() -> float:
    """How long this process waits for the run directory: a requeued SLURM job (SLURM_RESTART_COUNT set, also under
    submitit) waits a bounded time for its previous run, which may still be ending on another node; else not at all."""
    return REQUEUE_WAIT_S if "SLURM_RESTART_COUNT" in os.environ else 0


@contextlib.contextmanager
def hold_run_dir(run_dir: Path, wait_s: float = 0):
    """Holds the run directory's lock until the block ends, waiting up to `wait_s` seconds for it; ValueError naming
    the holder if another process still has it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline, waiting = time.monotonic() + wait_s, False
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "a process that has not said which"
            if time.monotonic() >= deadline:
                waited = f" after waiting {wait_s:.0f} s" if wait_s else ""
                raise ValueError(
                    f"run directory {run_dir} is in use by another live train.py ({holder}){waited}: wait for it to "
                    "end or stop it, or start this one with another run=NAME"
                ) from None
            if not waiting:
                log.warning("run directory %s is held by %s: waiting up to %.0f s", run_dir, holder, wait_s)
                waiting = True
            time.sleep(0.5)
        with contextlib.suppress(OSError):  # who holds it is for the message above only: a full disk must not stop us
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}, since {time.ctime()}".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
