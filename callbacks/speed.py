"""Tokens per second and MFU, shown on the progress bar and logged.

Timing is wall clock between batch ends over each logging window, so the step itself has no host sync;
the first warmup_steps (compilation, allocator warm-up) are left out.
"""

import time

import lightning as L
from lightning.fabric.utilities.throughput import get_available_flops


class SpeedMonitor(L.Callback):
    def __init__(self, warmup_steps: int = 3, peak_flops: float | None = None):
        self.warmup_steps, self.peak_flops = warmup_steps, peak_flops
        self.window_start, self.window_tokens = None, 0

    def on_fit_start(self, trainer, pl_module):
        if self.peak_flops is None and trainer.strategy.root_device.type == "cuda":
            self.peak_flops = get_available_flops(trainer.strategy.root_device, "bf16-true")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step < self.warmup_steps:
            return
        now = time.perf_counter()
        if self.window_start is None:
            self.window_start, self.window_tokens = now, 0
            return
        self.window_tokens += batch["input_ids"].numel()
        if step % trainer.log_every_n_steps:
            return
        tokens_per_s = self.window_tokens * trainer.world_size / (now - self.window_start)
        metrics = {"perf/tokens_per_s": tokens_per_s}
        if self.peak_flops:
            flops_per_token = pl_module.model.flops_per_token(batch["input_ids"].size(1))
            metrics["perf/mfu"] = tokens_per_s * flops_per_token / (self.peak_flops * trainer.world_size)
        pl_module.log_dict(metrics, prog_bar=True, on_step=True, on_epoch=False, rank_zero_only=True)
        self.window_start, self.window_tokens = now, 0
