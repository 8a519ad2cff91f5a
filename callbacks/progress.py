"""Progress: a bar with a few short keys in a terminal (the logged names, train/loss or perf/tokens_per_s, are
long), one plain line per logging interval when the output goes to a file (a SLURM log, CI), where a bar redrawn
with carriage returns at every step would fill the log with unreadable text."""

import sys
import time
from datetime import timedelta

from lightning.pytorch.callbacks import TQDMProgressBar

SHOWN = {"train/loss": "loss", "train/bpb": "bpb", "val/bpb": "val_bpb", "perf/tokens_per_s": "tok/s"}


class ProgressBar(TQDMProgressBar):
    def __init__(self, refresh_rate: int = 1, shown: dict[str, str] | None = None, plain: bool | None = None):
        """shown: logged metric name -> label, in display order (any metric logged with self.log).
        plain: one line per logging interval instead of the bar; None: when stdout is not a terminal.

        The bar moves every refresh_rate steps, but while training its numbers are read from the device only
        at logging steps (trainer.log_every_n_steps): each read waits for the GPU to finish its queued work,
        which at every step would leave it idle while the next step is launched. So the numbers come from
        trainer.callback_metrics, which hold the logged tensors as they are, and nothing is logged with
        prog_bar=True: Lightning reads those back at every step."""
        super().__init__(refresh_rate=refresh_rate)
        self.shown = dict(SHOWN if shown is None else shown)
        self.plain = not sys.stdout.isatty() if plain is None else plain
        self.values = None  # the last numbers read, shown until the next logging step
        self.start = None  # (time, step) at the end of the first step of this process: the ETA's rate from there
        self.printing = True  # the plain lines; Lightning silences them as it does the bar, through disable()

    def disable(self) -> None:  # Lightning calls it on ranks other than 0 (and while tuning)
        super().disable()
        self.printing = False

    def enable(self) -> None:
        super().enable()
        self.printing = True

    @property
    def is_enabled(self) -> bool:  # the tqdm bars: off in plain mode
        return super().is_enabled and not self.plain

    def get_metrics(self, trainer, pl_module):
        if trainer.training and self.values is not None and trainer.global_step % trainer.log_every_n_steps:
            return self.values
        self.values = self.shown_values(trainer)
        return self.values

    def shown_values(self, trainer, prefix: str = "") -> dict[str, str]:
        """label -> the formatted value of each shown metric whose name starts with prefix, read now."""
        metrics = trainer.callback_metrics
        return {
            label: short_number(float(metrics[name]))
            for name, label in self.shown.items()
            if name.startswith(prefix) and name in metrics
        }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not (self.plain and self.printing):
            return
        step, now = trainer.global_step, time.monotonic()
        if self.start is None:
            self.start = (now, step)
        if step % trainer.log_every_n_steps == 0 or step == trainer.max_steps:
            self.values = None  # read now, also at a last step between two logging steps
            shown = [f"{label} {value}" for label, value in self.get_metrics(trainer, pl_module).items()]
            print(" | ".join([self.step_text(trainer), *shown, *self.eta(step, now, trainer.max_steps)]), flush=True)

    def on_validation_end(self, trainer, pl_module):
        super().on_validation_end(trainer, pl_module)
        if self.plain and self.printing and not trainer.sanity_checking and trainer.state.fn == "fit":
            shown = [f"{label} {value}" for label, value in self.shown_values(trainer, "val/").items()]
            print(" | ".join([self.step_text(trainer), "validation", *shown]), flush=True)

    @staticmethod
    def step_text(trainer) -> str:
        step, total = trainer.global_step, trainer.max_steps
        return f"step {step}/{total}" if total > 0 else f"step {step}"

    def eta(self, step: int, now: float, max_steps: int) -> list[str]:
        """The time left at the rate measured since the first step (validations and checkpoints included)."""
        start_time, start_step = self.start
        if max_steps <= 0 or step <= start_step:
            return []
        seconds = (max_steps - step) * (now - start_time) / (step - start_step)
        return [f"ETA {timedelta(seconds=round(seconds))}"]

    def print(self, *args, sep: str = " ", **kwargs) -> None:
        if self.plain:  # no bar to write above
            print(*args, sep=sep, **kwargs)
        else:
            super().print(*args, sep=sep, **kwargs)


def short_number(value) -> str:
    """3 decimals for losses and BPB, whole numbers for throughput (tqdm would write 1.23e+04)."""
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.3f}"
