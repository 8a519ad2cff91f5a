"""Tokens per second and MFU, logged as perf/tokens_per_s (shown on the progress bar) and perf/mfu.

Timing is wall clock between optimizer-step ends over each logging interval, so the step itself has no
host sync; the first warmup_steps (compilation, allocator warm-up) and the time spent in validation are
left out. When training ends, the whole run's figure (every token trained after the warm-up over the training time,
checkpoint writes included, validation excluded) is logged as one line: what bench/e2e.py reads. A second line gives
the median step time and the slowest steps, which puts a stall (a checkpoint, the loader, a collection) on its step:
each step is timed from the previous step's end, with a CUDA event on a GPU (read once it has completed: no wait) or
the clock on the CPU; a step after a validation is not timed.
MFU = tokens/s · FLOPs per token / peak, FLOPs per token = 6·N + 12·L·C·T (GPT.flops_per_token).
"""

import heapq
import logging
import statistics
import time
from array import array

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.utilities import rank_zero_warn

from model.lit import HeadBalancedModule

log = logging.getLogger(__name__)


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype the matmuls run in under a Trainer precision string ("bf16-mixed", "32-true", ...)."""
    if precision.startswith("bf16"):
        return torch.bfloat16
    return torch.float16 if precision.startswith("16") else torch.float32


class SpeedMonitor(L.Callback):
    def __init__(self, warmup_steps: int = 3, peak_flops: float | None = None, slowest_steps: int = 5):
        if warmup_steps < 0:
            raise ValueError(f"callbacks.speed.warmup_steps={warmup_steps} must be >= 0")
        self.warmup_steps, self.peak_flops, self.slowest_steps = warmup_steps, peak_flops, slowest_steps
        self.window_start, self.window_tokens, self.last_step = None, 0, -1
        self.validation_start = None
        self.first_step, self.train_tokens, self.train_seconds = None, 0, 0.0  # the closed windows, summed
        self.flops_per_token = {}  # seq_len -> FLOPs per token (counting parameters once per length)
        self.step_ends = []  # (step, CUDA event or clock time) of the step ends not timed yet; None: a validation
        self.step_seconds = array("d")  # every timed step's duration
        self.slowest = []  # a min-heap of (seconds, step): the slowest_steps longest steps

    def on_fit_start(self, trainer, pl_module):
        device = trainer.strategy.root_device
        if self.peak_flops is None and device.type == "cuda":
            self.peak_flops = get_available_flops(device, compute_dtype(str(trainer.precision)))
            if self.peak_flops is None:  # a GPU Lightning does not know (H200)
                rank_zero_warn(
                    f"no MFU: the peak FLOP/s of {torch.cuda.get_device_name(device)} is unknown; set "
                    "callbacks.speed.peak_flops (dense bf16: 989.4e12 on H100 SXM and H200)"
                )

    def on_train_batch_end(self, trainer, pl_module: HeadBalancedModule, outputs, batch, batch_idx):
        step = trainer.global_step
        if step < self.warmup_steps:
            return
        now = time.perf_counter()
        if not self.step_ends or self.step_ends[-1][0] != step:  # the last micro-batch of gradient accumulation
            self.step_ends.append((step, self.step_end(trainer, now)))
        if self.window_start is None:  # the interval starts at the end of the last warm-up step
            self.window_start, self.last_step, self.first_step = now, step, step
            return
        self.window_tokens += batch["input_ids"].numel()  # every micro-batch of gradient accumulation counts
        if step == self.last_step or step % trainer.log_every_n_steps:
            return
        self.last_step = step
        self.time_steps()
        tokens_per_s = self.close_window(now, trainer.world_size)
        metrics = {"perf/tokens_per_s": tokens_per_s}
        if self.peak_flops:
            seq_len = batch["input_ids"].size(1)
            if seq_len not in self.flops_per_token:
                self.flops_per_token[seq_len] = pl_module.model.flops_per_token(seq_len)
            metrics["perf/mfu"] = tokens_per_s * self.flops_per_token[seq_len] / (self.peak_flops * trainer.world_size)
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, rank_zero_only=True)  # not prog_bar: see model/lit.py

    @staticmethod
    def step_end(trainer, now: float):
        """A CUDA event recorded after the work queued so far, on a GPU; on the CPU, where nothing is queued, now."""
        if trainer.strategy.root_device.type != "cuda":
            return now
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def time_steps(self) -> None:
        """Times each step whose end has been reached (an event that has completed: no wait) from the previous end."""
        while len(self.step_ends) > 1:
            (_, start), (step, end) = self.step_ends[:2]
            if isinstance(end, torch.cuda.Event) and not end.query():
                return
            self.step_ends.pop(0)
            if start is None or end is None:  # a validation in between
                continue
            seconds = start.elapsed_time(end) / 1e3 if isinstance(end, torch.cuda.Event) else end - start
            self.step_seconds.append(seconds)
            (heapq.heappush if len(self.slowest) < self.slowest_steps else heapq.heappushpop)(
                self.slowest, (seconds, step)
            )

    def close_window(self, now: float, world_size: int) -> float:
        """Adds the window to the run's totals, starts the next one; returns the window's tokens/s (all ranks)."""
        tokens, seconds = self.window_tokens * world_size, now - self.window_start
        self.train_tokens += tokens
        self.train_seconds += seconds
        self.window_start, self.window_tokens = now, 0
        return tokens / seconds

    def on_train_end(self, trainer, pl_module):
        if self.window_start is None:  # stopped within the warm-up
            return
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()  # the last steps' queued work is training time too
        self.close_window(time.perf_counter(), trainer.world_size)
        self.time_steps()
        if trainer.is_global_zero:
            log.info(
                "whole run: %d tokens in %.3f s of training, steps %d-%d (validation excluded): %.1f tokens/s",
                self.train_tokens,
                self.train_seconds,
                self.first_step,
                trainer.global_step,
                self.train_tokens / self.train_seconds,
            )
            if self.step_seconds:
                slowest = ", ".join(f"{step} ({seconds * 1e3:.1f} ms)" for seconds, step in sorted(self.slowest)[::-1])
                median = statistics.median(self.step_seconds) * 1e3
                log.info(
                    "step time: median %.1f ms over %d steps; slowest: %s", median, len(self.step_seconds), slowest
                )

    def on_validation_start(self, trainer, pl_module):
        self.validation_start = time.perf_counter()
        if self.step_ends:
            self.step_ends.append((trainer.global_step, None))  # the next step's time would hold the validation

    def on_validation_end(self, trainer, pl_module):
        if self.window_start is not None and self.validation_start is not None:
            self.window_start += time.perf_counter() - self.validation_start  # validation is not training time
        self.validation_start = None
