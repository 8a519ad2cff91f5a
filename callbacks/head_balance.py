"""Head balance over training: per-layer CV and per-head importance as scalars, the layers × heads
importance heatmap as an image (and PNG in the run directory), and the CV-over-training curve at the end.

Keys: heads/cv/L07, heads/cv_mean, heads/importance/L07/H03, heads/sink_ratio/L07 and heads/sink_ratio (Gu et
al.'s share of heads whose mean attention on the sink exceeds sink_threshold, per layer and over all layers;
model/balance.py), and, when some heads are shared (fine-tuning, Eq. 8), heads/cv_routed/L07 and
heads/cv_routed_mean: the CV the aux loss balances. Images: heads/heatmap, heads/cv_curve.

The module (model.lit.HeadBalancedModule) leaves each training batch's importance (L, H) on the device
(pl_module.last_importance). It is summed there, and once per logging interval the interval's mean moves to the
host in one transfer (not one .item() per scalar); the CV is computed from that mean, so it is the CV of the
importance measured over all tokens of the interval, the same numbers the heatmap shows; the sink ratio too.
"""

from pathlib import Path

import lightning as L
import numpy as np
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from PIL import Image

from model.balance import coefficient_of_variation, sink_ratio
from model.lit import HeadBalancedModule
from plots import cv_curve, figure_to_array, importance_heatmap


def log_image(trainer, key: str, image: np.ndarray, step: int) -> None:
    """An (H, W, 3) uint8 image to every logger that takes images (CSV does not: the PNG is the record)."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key, [image], step=step)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, image, step, dataformats="HWC")


def logged_row(step: int) -> int:
    """Lightning logs optimizer step k's metrics (trainer.global_step == k once the step is done) in row k - 1, its
    count of the steps before: the heads of step k go in that row, beside the step's train/loss. (In row k, they were
    one step off the loss, and a resume from step k dropped them with the rows of the killed run after it.)"""
    return step - 1


def balance_metrics(imp, shared, sink_threshold: float = 0.3) -> dict[str, float]:
    """imp (L, H) float tensor on the host, shared (L, H) bool -> the scalars this callback logs."""
    cv = coefficient_of_variation(imp)
    metrics = {"heads/cv_mean": cv.mean().item()}
    metrics.update({f"heads/cv/L{layer:02d}": value for layer, value in enumerate(cv.tolist())})
    sinking = sink_ratio(imp, sink_threshold)
    metrics["heads/sink_ratio"] = sinking.mean().item()  # every layer has as many heads: the share of all heads
    metrics.update({f"heads/sink_ratio/L{layer:02d}": value for layer, value in enumerate(sinking.tolist())})
    if shared.any():
        routed_cv = coefficient_of_variation(imp, ~shared)
        metrics["heads/cv_routed_mean"] = routed_cv.mean().item()
        metrics.update({f"heads/cv_routed/L{layer:02d}": value for layer, value in enumerate(routed_cv.tolist())})
    for layer, row in enumerate(imp.tolist()):
        metrics.update({f"heads/importance/L{layer:02d}/H{head:02d}": value for head, value in enumerate(row)})
    return metrics


def heatmap_figure(imp: np.ndarray, step: int, shared: np.ndarray | None):
    """The heatmap this callback logs: imp (L, H), shared (L, H) bool or None."""
    return importance_heatmap(imp, f"head importance at step {step}", shared)


class HeadBalanceMonitor(L.Callback):
    def __init__(
        self, heatmap_every_n_steps: int | None = 100, dirpath: str | None = None, sink_threshold: float = 0.3
    ):
        """heatmap_every_n_steps: draw the heatmap at the first logging step at or after each multiple of it
        (0: only at the end; None: with each validation). dirpath: where the PNGs go; None =
        <trainer.default_root_dir>/heads.
        sink_threshold: a head counts as sinking in heads/sink_ratio when its mean attention on the sink, 1 - its
        importance, exceeds this (Gu et al.'s epsilon)."""
        if heatmap_every_n_steps is not None and heatmap_every_n_steps < 0:
            raise ValueError(
                f"callbacks.head_balance.heatmap_every_n_steps={heatmap_every_n_steps}: must be >= 0 (0 = at the end), "
                "or null (with each validation)"
            )
        if not 0 < sink_threshold < 1:
            raise ValueError(
                f"callbacks.head_balance.sink_threshold={sink_threshold}: must be in (0, 1), a share of attention"
            )
        self.heatmap_every_n_steps, self.dirpath, self.sink_threshold = heatmap_every_n_steps, dirpath, sink_threshold
        self.total, self.batches = None, 0  # sum of the interval's (L, H) importance, on the device
        self.shared = None  # (L, H) bool on the host, read once: the shared heads are fixed for a run
        self.latest = None  # (step, (L, H) importance on the host) of the last logged interval
        self.last_heatmap_step = 0
        self.history_steps, self.history_cv = [], []  # for the CV curve

    def state_dict(self) -> dict:
        """Checkpointed, so the CV curve of a resumed run covers the whole training."""
        return {"history_steps": self.history_steps, "history_cv": self.history_cv}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history_steps, self.history_cv = list(state_dict["history_steps"]), list(state_dict["history_cv"])

    def on_train_start(self, trainer, pl_module):
        if self.dirpath is None:
            self.dirpath = str(Path(trainer.default_root_dir) / "heads")
        self.last_heatmap_step = trainer.global_step  # a resumed run draws its next heatmap at the next multiple

    def on_train_batch_end(self, trainer, pl_module: HeadBalancedModule, outputs, batch, batch_idx):
        if not trainer.is_global_zero:
            return
        imp = pl_module.last_importance
        self.total = imp.clone() if self.total is None else self.total.add_(imp)
        self.batches += 1
        step = trainer.global_step
        logged = self.latest is not None and self.latest[0] == step  # gradient accumulation: one log per step
        if step % trainer.log_every_n_steps == 0 and not logged:
            self.log_interval(trainer, pl_module, step)

    def on_train_end(self, trainer, pl_module: HeadBalancedModule):
        if not trainer.is_global_zero:
            return
        if self.batches:
            self.log_interval(trainer, pl_module, trainer.global_step)
        if self.latest is None:
            return
        step, imp = self.latest
        if self.last_heatmap_step != step:
            self.draw_heatmap(trainer, step, imp)
        if len(self.history_steps) > 1:
            image = figure_to_array(cv_curve(self.history_steps, self.history_cv))
            self.publish(trainer, "heads/cv_curve", image, step, "cv_curve.png")

    def log_interval(self, trainer, pl_module: HeadBalancedModule, step: int) -> None:
        imp = (self.total / self.batches).double().cpu()  # the interval's one device-to-host transfer
        self.total, self.batches = None, 0
        if self.shared is None:
            self.shared = pl_module.shared_heads.cpu()
        metrics = balance_metrics(imp, self.shared, self.sink_threshold)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=logged_row(step))
        self.history_steps.append(step)
        self.history_cv.append(coefficient_of_variation(imp).tolist())
        self.latest = (step, imp.numpy())
        every = self.heatmap_every(trainer)
        if every and step // every > self.last_heatmap_step // every:
            self.draw_heatmap(trainer, step, imp.numpy())

    def heatmap_every(self, trainer) -> float:
        """Optimizer steps between heatmaps. Lightning counts the validation interval in micro-batches (None when
        validation is timed by the clock: then a heatmap only at the end)."""
        if self.heatmap_every_n_steps is not None:
            return self.heatmap_every_n_steps
        batches = trainer.val_check_batch
        return batches / trainer.accumulate_grad_batches if batches else 0

    def draw_heatmap(self, trainer, step: int, imp: np.ndarray) -> None:
        shared = self.shared.numpy() if self.shared.any() else None
        image = figure_to_array(heatmap_figure(imp, step, shared))
        self.publish(trainer, "heads/heatmap", image, step, f"importance_step_{step:06d}.png")
        self.last_heatmap_step = step

    def publish(self, trainer, key: str, image: np.ndarray, step: int, filename: str) -> None:
        """Log the image and save the same pixels as a PNG under dirpath."""
        log_image(trainer, key, image, logged_row(step))
        Path(self.dirpath).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(Path(self.dirpath) / filename)
