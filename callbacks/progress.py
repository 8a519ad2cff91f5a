"""A progress bar with a few short keys: the logged names (train/loss, perf/tokens_per_s) are long."""

from lightning.pytorch.callbacks import TQDMProgressBar

SHOWN = {"train/loss": "loss", "train/bpb": "bpb", "val/bpb": "val_bpb", "perf/tokens_per_s": "tok/s"}


class ProgressBar(TQDMProgressBar):
    def __init__(self, refresh_rate: int = 1, shown: dict[str, str] | None = None):
        """shown: logged metric name -> label on the bar, in display order; only metrics logged with
        prog_bar=True are available.

        The bar moves every refresh_rate steps, but while training its numbers are read from the device only
        at logging steps (trainer.log_every_n_steps): each read waits for the GPU to finish its queued work,
        which at every step would leave it idle while the next step is launched."""
        super().__init__(refresh_rate=refresh_rate)
        self.shown = dict(SHOWN if shown is None else shown)
        self.values = None  # the last numbers read, shown until the next logging step

    def get_metrics(self, trainer, pl_module):
        if trainer.training and self.values is not None and trainer.global_step % trainer.log_every_n_steps:
            return self.values
        metrics = super().get_metrics(trainer, pl_module)
        self.values = {label: short_number(metrics[name]) for name, label in self.shown.items() if name in metrics}
        return self.values


def short_number(value) -> str:
    """3 decimals for losses and BPB, whole numbers for throughput (tqdm would write 1.23e+04)."""
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.3f}"
