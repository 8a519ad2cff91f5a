"""One live train.py per run directory: a second one on the same directory stops at once, naming the first.

The lock is a POSIX record lock (fcntl.lockf) on `<run dir>/train.lock`: the kernel releases it when its process
ends, however it ends (a SIGKILL, a node's reboot for a local disk), so a killed run never leaves it stuck and a
requeued job gets in. It belongs to the process that took it, not to its children: forked dataloader workers do not
hold it after the process dies. Only the process of global rank 0 takes it (the other ranks of a run share the
directory), as read from the environment before any rank is started.
"""

import contextlib
import fcntl
import os
import socket
import time
from pathlib import Path

LOCK_FILE = "train.lock"
RANK_VARIABLES = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")  # torchrun, srun, Lightning


def launched_as_rank_zero() -> bool:
    """True for the process of global rank 0, or the launcher that will become it (Lightning starts the other ranks
    with LOCAL_RANK and NODE_RANK set; srun and torchrun set them for every task)."""
    return all(int(os.environ.get(name, 0)) == 0 for name in RANK_VARIABLES)


@contextlib.contextmanager
def hold_run_dir(run_dir: Path):
    """Holds the run directory's lock until the block ends; ValueError naming the holder if another process has it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "a process that has not said which yet"
            raise ValueError(
                f"run directory {run_dir} is in use by another live train.py ({holder}): wait for it to end or stop "
                "it, or start this one with another run=NAME"
            ) from None
        with contextlib.suppress(OSError):  # who holds it is for the message above only: a full disk must not stop us
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}, since {time.ctime()}".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
