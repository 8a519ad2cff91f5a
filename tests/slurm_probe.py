"""A callback the SLURM tests add to train.py (`+callbacks.probe=...`): it records every optimizer step's loss, and
slows a SLURM job's first run down so that its time-limit signal lands in the middle of training."""

import os
import time
from pathlib import Path

import lightning as L


class StepProbe(L.Callback):
    """Appends to `<run dir>/steps.<rank>` a line `start <step> <job id> <restart count>` when training starts and
    `<step> <loss as a hex float>` after every optimizer step (the text compares bit for bit). In a SLURM job that
    has not been restarted yet, sleeps `first_run_sleep` seconds per step: this changes no number."""

    def __init__(self, first_run_sleep: float = 0.0):
        self.first_run_sleep = first_run_sleep

    def write(self, trainer, line: str) -> None:
        with open(Path(trainer.default_root_dir) / f"steps.{trainer.global_rank}", "a") as f:
            f.write(line + "\n")

    def on_train_start(self, trainer, pl_module):
        job, restarts = os.environ.get("SLURM_JOB_ID", "-"), os.environ.get("SLURM_RESTART_COUNT", "-")
        self.write(trainer, f"start {trainer.global_step} {job} {restarts}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.write(trainer, f"{trainer.global_step} {outputs['loss'].item().hex()}")
        if "SLURM_JOB_ID" in os.environ and "SLURM_RESTART_COUNT" not in os.environ:
            time.sleep(self.first_run_sleep)
