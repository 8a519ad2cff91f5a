"""Every private name of Lightning, torchdata and torch.distributed.checkpoint the project uses, in one place.

They carry no promise between releases: pyproject.toml caps lightning and torchdata at the next minor not tested, and
tests/test_compat.py fails, naming the name, when a release moves one. Everything else imports them from here, so
an upgrade is one file to check. This module sits below every folder (it imports no project code).
"""

import threading

from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy

# The launcher of a multi-process run started from one process (trainer=ddp without srun or torchrun): train.py
# kills the ranks it started when rank 0 fails.
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher as SubprocessScriptLauncher

__all__ = [
    "SubprocessScriptLauncher",
    "accumulating",
    "load_dcp_keys",
    "loader_state_workers",
    "save_last_checkpoint",
    "set_data_parallel_size",
    "set_received_sigterm",
    "skip_sigterm_broadcast",
    "stop_child_process_observer",
    "uncount_logging_step",
]


def save_last_checkpoint(callback: ModelCheckpoint, trainer) -> bool:
    """Write the callback's last.ckpt now, as its own save_last does (same file, same symlink or copy rules), unless
    this step is already saved; Lightning has no public call for "save last now" (on SIGTERM, at the end of a run).
    Returns whether it wrote."""
    if callback._last_global_step_saved == trainer.global_step:
        return False
    callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))
    return True


def accumulating(trainer) -> bool:
    """Whether the micro-batch that just ended is followed by more of the same optimizer step (gradient accumulation):
    the test Lightning's own scheduler update makes after this hook."""
    return trainer.fit_loop.epoch_loop._should_accumulate()


def uncount_logging_step(trainer) -> None:
    """Take back the step Lightning counted for the loggers at the end of a training step (its epoch loop's
    _batches_that_stepped): a checkpoint saved after a validation and before that count is what its restart expects."""
    trainer.fit_loop.epoch_loop._batches_that_stepped -= 1


def set_received_sigterm(trainer) -> None:
    """Lightning's SIGTERM flag (trainer.received_sigterm), set as its SIGTERM handler sets it: the loops then stop
    the validation in progress at its next batch, or the training at the end of the step, raising SIGTERMException."""
    trainer._signal_connector.received_sigterm = True


def skip_sigterm_broadcast(trainer) -> None:
    """Lightning 2.6's training loop (`_broadcast_sigterm_tensor`, not in 2.5) broadcasts rank 0's SIGTERM flag as a
    tensor on the device at the start of every step of a multi-rank run and reads it back with .item(): on GPUs,
    every rank waits for its queued work once per step. The loop still raises SIGTERMException at the end of a step
    whose flag is set, which is where LastCheckpoint sets it, on every rank at once."""
    loop = trainer.fit_loop.epoch_loop
    if hasattr(loop, "_broadcast_sigterm_tensor"):
        loop._broadcast_sigterm_tensor = lambda: None


def stop_child_process_observer() -> None:
    """Ends the thread of Lightning's launcher that SIGKILLs every process of the run, its own included, once a rank it
    started exits non-zero (it looks every 5 s). After SIGTERM every rank saves its step and exits 143 on its own:
    seeing a rank that finished first, the thread killed rank 0 before rank 0 had ended. With no child left to watch,
    it ends at its next look."""
    for thread in threading.enumerate():
        if isinstance(thread, _ChildProcessObserver):
            thread._child_processes = []


def set_data_parallel_size(strategy: ModelParallelStrategy, size: int) -> None:
    """The data-parallel size ModelParallelStrategy.setup_environment builds its device mesh from (its constructor
    takes one, but only before the world size is known)."""
    strategy._data_parallel_size = size


def loader_state_workers(state: dict) -> int:
    """The num_workers a StatefulDataLoader's state_dict() was saved with: its state with workers nests the count
    under _snapshot/_main_snapshot; one without workers has no _snapshot."""
    if "_snapshot" not in state:
        return 0
    return state["_snapshot"]["_main_snapshot"]["_num_workers"]


def load_dcp_keys(keys: set[str], path: str) -> dict:
    """The entries `keys` of a torch.distributed.checkpoint folder, read in one process (no process group)."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    return _load_state_dict_from_keys(keys, checkpoint_id=path)
