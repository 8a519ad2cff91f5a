"""A progress bar with a few short keys: the logged names (train/loss, perf/tokens_per_s) are long."""

from lightning.pytorch.callbacks import TQDMProgressBar

SHOWN = {"train/loss": "loss", "train/bpb": "bpb", "val/bpb": "val_bpb", "perf/tokens_per_s": "tok/s"}


class ProgressBar(TQDMProgressBar):
    def __init__(self, refresh_rate: int = 1, shown: dict[str, str] | None = None):
        """shown: logged metric name -> label on the bar, in display order; only metrics logged with
        prog_bar=True are available."""
        super().__init__(refresh_rate=refresh_rate)
        self.shown = dict(SHOWN if shown is None else shown)

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        return {label: short_number(metrics[name]) for name, label in self.shown.items() if name in metrics}


def short_number(value) -> str:
    """3 decimals for losses and BPB, whole numbers for throughput (tqdm would write 1.23e+04)."""
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.3f}"
