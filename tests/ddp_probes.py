"""Callbacks tests add to a DDP run of train.py by Hydra override: +callbacks.NAME._target_=tests.ddp_probes.X."""

import os
import time
from pathlib import Path

import lightning as L
import torch


class FailOnRank(L.Callback):
    """At global step `step` the other ranks write their pid to `out_dir` and block, as in an NCCL collective, which
    waits for a dead peer until the process group's timeout (a gloo collective would notice the closed connection and
    fail on its own, hiding the hang this stands for); once they all do, rank `rank` raises."""

    def __init__(self, rank: int, step: int, out_dir: str):
        self.rank, self.step, self.out_dir = rank, step, Path(out_dir)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step != self.step:
            return
        if trainer.global_rank != self.rank:
            (self.out_dir / f"rank{trainer.global_rank}.pid").write_text(str(os.getpid()))
            time.sleep(3600)
        deadline = time.monotonic() + 30
        while len(list(self.out_dir.glob("rank*.pid"))) < trainer.world_size - 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        raise RuntimeError(f"injected failure on rank {self.rank} at step {self.step}")


class CountValidationBatches(L.Callback):
    """Appends the number of batches of each validation this rank runs to `out_dir`/val_batches_rank<r>.txt."""

    def __init__(self, out_dir: str):
        self.out_dir, self.batches = Path(out_dir), 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.batches += 1

    def on_validation_end(self, trainer, pl_module):
        with open(self.out_dir / f"val_batches_rank{trainer.global_rank}.txt", "a") as f:
            f.write(f"{self.batches}\n")
        self.batches = 0


class CountBroadcasts(L.Callback):
    """Counts the broadcasts over the training process group (the default one) from the first training step to the end
    of training, and writes the count to `out_dir`/broadcasts_rank<r>.txt."""

    def __init__(self, out_dir: str):
        self.out_dir, self.count, self.original = Path(out_dir), 0, None

    def on_train_start(self, trainer, pl_module):
        self.original = torch.distributed.broadcast

        def counted(*args, **kwargs):
            group = kwargs.get("group", args[2] if len(args) > 2 else None)
            if group is None or group == torch.distributed.group.WORLD:
                self.count += 1
            return self.original(*args, **kwargs)

        torch.distributed.broadcast = counted

    def on_train_end(self, trainer, pl_module):
        torch.distributed.broadcast = self.original
        (self.out_dir / f"broadcasts_rank{trainer.global_rank}.txt").write_text(str(self.count))
