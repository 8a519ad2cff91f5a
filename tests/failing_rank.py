"""A callback that makes one rank of a DDP run fail mid-training; tests/test_failure.py adds it to train.py with a
Hydra override (+callbacks.fail._target_=tests.failing_rank.FailOnRank)."""

import os
import time
from pathlib import Path

import lightning as L


class FailOnRank(L.Callback):
    """At global step `step`, rank `rank` raises. The other ranks write their pid to `pid_dir` and block, as in an
    NCCL collective, which waits for a dead peer until the process group's timeout (a gloo collective would notice
    the closed connection and fail on its own, hiding the hang this stands for)."""

    def __init__(self, rank: int, step: int, pid_dir: str):
        self.rank, self.step, self.pid_dir = rank, step, Path(pid_dir)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step != self.step:
            return
        if trainer.global_rank == self.rank:
            raise RuntimeError(f"injected failure on rank {self.rank} at step {self.step}")
        (self.pid_dir / f"rank{trainer.global_rank}.pid").write_text(str(os.getpid()))
        time.sleep(3600)
