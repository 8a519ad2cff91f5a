"""A resumed run continues its logs: metrics.csv keeps the steps logged before the interruption, each step once,
also when a killed process had logged steps after its last checkpoint; TensorBoard keeps one directory."""

import collections
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import csv_rows, quiet_trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

from callbacks.loggers import AppendingCSVLogger, ResumingTensorBoardLogger


class Line(L.LightningModule):
    """y = w x fitted by SGD, the loss logged every step: the smallest model whose log a resume must continue."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, x, batch_idx):
        loss = ((self.w * x - 2 * x) ** 2).mean()
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit(run_dir: Path, steps: int, callbacks=(), ckpt_path=None, logger=None):
    trainer = quiet_trainer(
        max_steps=steps,
        log_every_n_steps=1,
        logger=logger or AppendingCSVLogger(run_dir, name="csv", version=""),
        callbacks=[ModelCheckpoint(run_dir / "ckpt", every_n_train_steps=4, save_top_k=-1), *callbacks],
        default_root_dir=run_dir,
    )
    data = torch.utils.data.DataLoader(torch.arange(1.0, 65.0).view(-1, 1), batch_size=None)
    trainer.fit(Line(), train_dataloaders=data, ckpt_path=ckpt_path)


def logged_steps(run_dir: Path) -> dict[str, list[int]]:
    """metric -> the steps of its rows in metrics.csv, in file order."""
    steps = collections.defaultdict(list)
    for row in csv_rows(run_dir / "csv"):
        for key, value in row.items():
            if value and key not in ("step", "epoch"):
                steps[key].append(int(row["step"]))
    return dict(steps)


def test_a_resume_drops_the_rows_logged_after_the_checkpoint_and_continues_the_file(tmp_path):
    fit(tmp_path, steps=6)  # as if killed after step 6: steps 4 and 5 are logged, the last checkpoint is at step 4
    assert logged_steps(tmp_path) == {"train/loss": list(range(6))}
    # A new logger (a new process) in the same directory, resumed from step 4, logging a metric the first did not.
    fit(tmp_path, steps=10, callbacks=[LearningRateMonitor()], ckpt_path=tmp_path / "ckpt" / "epoch=0-step=4.ckpt")
    steps = logged_steps(tmp_path)
    assert steps["train/loss"] == list(range(10))
    assert steps["lr-SGD"] == list(range(4, 10))
    assert not (tmp_path / "csv" / "metrics.csv.partial").exists()


def test_a_fresh_run_in_a_used_directory_starts_the_file_again(tmp_path):
    fit(tmp_path, steps=6)
    fit(tmp_path, steps=3)
    assert logged_steps(tmp_path) == {"train/loss": [0, 1, 2]}


def test_tensorboard_continues_the_same_directory(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tensorboard = lambda: ResumingTensorBoardLogger(tmp_path, name="tensorboard", version="", default_hp_metric=False)  # noqa: E731
    fit(tmp_path, steps=6, logger=tensorboard())
    fit(tmp_path, steps=10, ckpt_path=tmp_path / "ckpt" / "epoch=0-step=4.ckpt", logger=tensorboard())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(("tensorboard", "version"))] == ["tensorboard"]
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one per process, one folder
    # TensorBoard drops the first process's steps 4, 5 when the second starts again at 4 (an out-of-order step)
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(10))


@pytest.mark.slow
def test_train_py_stopped_by_sigterm_and_resumed_logs_every_step_once(start_train, tmp_path):
    """A real SIGTERM while step 7 trains (tests/signal_probe.py: at an exact point, so the test is deterministic;
    tests/test_resume.py sends it at the other points), then the same command: metrics.csv holds every step once."""
    signal_at = "+callbacks.signal={_target_:tests.signal_probe.SignalAt,step:7,where:train}"
    run = ["logger=csv", "trainer.max_steps=12", "trainer.log_every_n_steps=1", "trainer.val_check_interval=5",
           "callbacks.checkpoint_last.every_n_train_steps=4", "run=sigterm", signal_at]  # fmt: skip
    run_dir = tmp_path / "outputs" / "sigterm"
    first = start_train(*run, cwd=tmp_path)
    assert first.wait(timeout=300) == 128 + signal.SIGTERM, first.read_output()[-3000:]
    assert max(logged_steps(run_dir)["train/loss"]) == 6  # Lightning's row step of the 7th step

    second = start_train(*run, cwd=tmp_path)
    assert second.wait(timeout=600) == 0, second.read_output()[-3000:]
    steps = logged_steps(run_dir)
    assert steps["train/loss"] == list(range(12))
    assert steps["val/bpb"] == [4, 9]  # after the 5th and the 10th step, each once
    assert all(len(s) == len(set(s)) for s in steps.values()), steps
