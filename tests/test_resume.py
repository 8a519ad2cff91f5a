"""Exact resume: a training process killed by a real signal and started again logs the uninterrupted run's losses,
bit for bit, with no step skipped or repeated; unreadable checkpoints are skipped or refused, never ignored."""

import errno
import os
import random
import signal
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from helpers import csv_rows, process_tree, quiet_trainer

from callbacks.checkpoint import LastCheckpoint, RandomState
from checkpoints.reader import find_resumable
from checkpoints.writer import AtomicCheckpointIO, CheckpointWriteError

STEPS = 16
RUN = [
    "logger=csv",
    f"trainer.max_steps={STEPS}",
    "trainer.log_every_n_steps=1",
    "trainer.val_check_interval=6",  # validation passes before and after the interruption
    "callbacks.checkpoint_last.every_n_train_steps=4",
]


def losses(run_dir: Path) -> dict[int, str]:
    """step -> train/loss as written to the CSV (the text: compared exactly)."""
    return {int(row["step"]): row["train/loss"] for row in csv_rows(run_dir / "csv") if row["train/loss"]}


def head_rows(run_dir: Path) -> list[int]:
    """The row step of every heads/cv_mean row: the heads of each step, logged beside its train/loss."""
    return sorted(int(row["step"]) for row in csv_rows(run_dir / "csv") if row.get("heads/cv_mean"))


def saved_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"]


def wait_for(path: Path, process, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"training ended before {path} was written:\n{process.read_output()[-3000:]}"
        assert time.monotonic() < deadline, f"no {path} after {timeout}s"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def uninterrupted_dir(start_train, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    process = start_train(*RUN, f"hydra.run.dir={run_dir}")
    assert process.wait(timeout=600) == 0, process.read_output()[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_dir) -> dict[int, str]:
    return losses(uninterrupted_dir)


def kill_at_a_random_moment_and_resume(start_train, tmp_path, uninterrupted, kill) -> None:
    """Start `run=killed`, send `kill` once its first last.ckpt exists (a moment the test does not choose), resume
    with the same command: every step logged once, the uninterrupted run's losses."""
    assert sorted(uninterrupted) == list(range(STEPS))
    run_dir = tmp_path / "outputs" / "killed"  # `run=killed` started in tmp_path; the same command resumes it
    last = run_dir / "checkpoints" / "last.ckpt"
    first = start_train(*RUN, "run=killed", cwd=tmp_path)
    wait_for(last, first)  # written after step 4
    first.send_signal(kill)
    assert first.wait(timeout=300) in (128 + signal.SIGTERM, -signal.SIGKILL), first.read_output()[-3000:]
    newest = Path(find_resumable([str(last.parent)]))  # the complete checkpoint of the highest step
    stopped_at = saved_step(newest)
    assert 4 <= stopped_at < STEPS, "the signal came after the end: nothing was interrupted"
    if kill == signal.SIGTERM:  # checkpointed at the end of the step in progress, losses logged up to it
        before = losses(run_dir)
        assert newest == last and sorted(before) == list(range(stopped_at))
    else:  # SIGKILL: back to the last scheduled checkpoint (last.ckpt every 4 steps, best-k at a validation every 6)
        before = losses(run_dir)  # rows go to disk as logged: the killed process's, up to the checkpoint and past it
        assert (stopped_at % 4 == 0 or stopped_at % 6 == 0) and set(range(stopped_at)) <= set(before)

    second = start_train(*RUN, "run=killed", cwd=tmp_path)
    assert second.wait(timeout=600) == 0, second.read_output()[-3000:]
    assert f"resuming {newest}" in second.read_output()
    logged = [int(row["step"]) for row in csv_rows(run_dir / "csv") if row["train/loss"]]  # both processes' rows
    assert sorted(logged) == list(range(STEPS)), "a step was skipped or repeated"
    assert head_rows(run_dir) == list(range(STEPS)), "a step's heads were dropped or repeated"
    assert losses(run_dir) == uninterrupted and before.items() <= uninterrupted.items()
    assert saved_step(last) == STEPS
    assert f"checkpoint {last}: training held" in second.read_output()  # written in the background


@pytest.mark.slow
def test_a_sigkilled_run_resumes_with_the_uninterrupted_losses(start_train, tmp_path, uninterrupted):
    kill_at_a_random_moment_and_resume(start_train, tmp_path, uninterrupted, signal.SIGKILL)


@pytest.mark.slow
def test_a_sigterm_at_a_random_moment_resumes_with_every_step_logged_once(start_train, tmp_path, uninterrupted):
    kill_at_a_random_moment_and_resume(start_train, tmp_path, uninterrupted, signal.SIGTERM)


@pytest.mark.slow
def test_sigterm_to_both_ranks_of_a_ddp_run_stops_them_at_one_step_and_resumes(start_train, tmp_path):
    """scancel on a 2-rank DDP run: SIGTERM to every process, at a moment the test does not choose. Lightning's own
    handler broadcast inside the signal handler and crashed the process group (exit 1, the stop's checkpoint lost);
    both ranks now save the same step and exit 143, and the same command resumes with the uninterrupted losses."""
    run = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true", *RUN,
           "trainer.max_steps=24", "callbacks.checkpoint_best=null"]  # fmt: skip
    whole = tmp_path / "whole"
    assert start_train(*run, f"hydra.run.dir={whole}").wait(timeout=600) == 0
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    first = start_train(*run, f"hydra.run.dir={run_dir}")
    wait_for(last, first)  # step 4
    for pid in process_tree(first.pid):
        os.kill(pid, signal.SIGTERM)
    assert first.wait(timeout=300) == 128 + signal.SIGTERM, first.read_output()[-3000:]
    assert "Traceback" not in first.read_output()
    stopped_at = saved_step(last)
    assert 4 <= stopped_at < 24 and sorted(losses(run_dir)) == list(range(stopped_at))
    second = start_train(*run, f"hydra.run.dir={run_dir}")
    assert second.wait(timeout=600) == 0, second.read_output()[-3000:]
    logged = [int(row["step"]) for row in csv_rows(run_dir / "csv") if row["train/loss"]]
    assert sorted(logged) == list(range(24)), "a step was skipped or repeated"
    assert losses(run_dir) == losses(whole)


@pytest.mark.slow
def test_sigterm_in_the_first_micro_batch_of_a_step_is_saved_after_its_last_and_resumes_exactly(start_train, tmp_path):
    """Gradient accumulation (2 micro-batches per step, as the paper experiments accumulate): SIGTERM while the first
    micro-batch of step 6 trains. The checkpoint waits for the second and the optimizer step; the resumed run logs
    every step once with the uninterrupted run's losses (a save after the first micro-batch lost its gradient)."""
    run = [*RUN, "+trainer.accumulate_grad_batches=2", "trainer.val_check_interval=8"]  # validations: whole steps
    whole = tmp_path / "whole"
    assert start_train(*run, f"hydra.run.dir={whole}").wait(timeout=600) == 0
    signal_at = "+callbacks.signal={_target_:tests.signal_probe.SignalAt,step:6,where:train}"
    run_dir = tmp_path / "run"
    first = start_train(*run, signal_at, f"hydra.run.dir={run_dir}")
    assert first.wait(timeout=300) == 128 + signal.SIGTERM, first.read_output()[-3000:]
    assert saved_step(run_dir / "checkpoints" / "last.ckpt") == 6
    second = start_train(*run, signal_at, f"hydra.run.dir={run_dir}")
    assert second.wait(timeout=600) == 0, second.read_output()[-3000:]
    logged = [int(row["step"]) for row in csv_rows(run_dir / "csv") if row["train/loss"]]
    assert sorted(logged) == list(range(STEPS)), "a step was skipped or repeated"
    assert losses(run_dir) == losses(whole)


def validations(run_dir: Path) -> dict[int, str]:
    """Lightning's row step of each validation (the last training batch before it) -> val/bpb, as written."""
    return {int(row["step"]): row["val/bpb"] for row in csv_rows(run_dir / "csv") if row.get("val/bpb")}


@pytest.mark.slow
@pytest.mark.parametrize("where", ["train", "validation-first", "validation-last", "after-validation"])
def test_sigterm_before_or_during_a_validation_resumes_with_every_step_logged_once(
    start_train, tmp_path, uninterrupted_dir, uninterrupted, where
):
    """SIGTERM while the step before a validation trains (step 6): saved at the end of the step, the validation is
    lost. While that validation runs: it completes, saved at its end. Once it has ended: saved at the end of the next
    step (7). The resumed run logs every step once with the uninterrupted run's losses, and each kept validation
    once with its BPB."""
    signal_at = f"+callbacks.signal={{_target_:tests.signal_probe.SignalAt,step:6,where:{where}}}"
    run_dir = tmp_path / "run"
    first = start_train(*RUN, signal_at, f"hydra.run.dir={run_dir}")
    assert first.wait(timeout=300) == 128 + signal.SIGTERM, first.read_output()[-3000:]
    last = run_dir / "checkpoints" / "last.ckpt"
    assert saved_step(last) == (7 if where == "after-validation" else 6)
    second = start_train(*RUN, signal_at, f"hydra.run.dir={run_dir}")
    assert second.wait(timeout=600) == 0, second.read_output()[-3000:]
    logged = [int(row["step"]) for row in csv_rows(run_dir / "csv") if row["train/loss"]]
    assert sorted(logged) == list(range(STEPS)), "a step was skipped or repeated"
    assert head_rows(run_dir) == list(range(STEPS)), "a step's heads were dropped or repeated"
    assert losses(run_dir) == uninterrupted
    expected = validations(uninterrupted_dir)
    if where == "train":
        del expected[5]  # the validation after step 6 (Lightning's row step 5): stopped at its first batch, lost
    assert validations(run_dir) == expected


SLOW_WRITES_FROM_STEP_8 = """
import time, torch
real_save = torch.save
def save(obj, f, *args, **kwargs):
    real_save(obj, f, *args, **kwargs)
    if isinstance(obj, dict) and obj.get("global_step", 0) >= 8:
        time.sleep(600)  # written to its .tmp.<pid>, not renamed over last.ckpt yet: the test kills it here
torch.save = save
"""


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_a_sigkill_during_a_checkpoint_write_resumes_from_the_previous_complete_one(
    start_train, tmp_path, uninterrupted
):
    """Issue 23: train.py killed while its writer process writes last.ckpt of step 8 (slowed down there by a
    sitecustomize): last.ckpt stays the complete one of step 4, the writer dies with the run, and the same command
    resumes from step 4 with the uninterrupted run's losses."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SLOW_WRITES_FROM_STEP_8)
    run_dir = tmp_path / "outputs" / "killed"
    last = run_dir / "checkpoints" / "last.ckpt"
    run = [*RUN, "callbacks.checkpoint_best=null", "run=killed"]  # last.ckpt only: no best-k of step 6 to resume
    first = start_train(*run, cwd=tmp_path, env={"PYTHONPATH": str(site)})
    wait_for(last, first)  # step 4, complete
    partial = lambda: list(last.parent.glob("last.ckpt.tmp.*"))  # noqa: E731
    deadline = time.monotonic() + 300
    while not partial():  # the write of step 8 has begun
        assert first.poll() is None and time.monotonic() < deadline, first.read_output()[-3000:]
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    assert first.wait(timeout=60) == -signal.SIGKILL
    (leftover,) = partial()
    writer = int(leftover.name.rsplit(".", 1)[1])
    deadline = time.monotonic() + 10
    while alive(writer):
        assert time.monotonic() < deadline, "the writer process outlived the killed run"
        time.sleep(0.05)
    assert saved_step(last) == 4 and find_resumable([str(last.parent)]) == str(last)

    second = start_train(*run, cwd=tmp_path)  # the same command, writing at full speed again
    assert second.wait(timeout=600) == 0, second.read_output()[-3000:]
    output = second.read_output()
    assert f"resuming {last}" in output and f"removing {leftover}, left by a write that did not finish" in output
    logged = [int(row["step"]) for row in csv_rows(run_dir / "csv") if row["train/loss"]]
    assert sorted(logged) == list(range(STEPS)), "a step was skipped or repeated"
    assert losses(run_dir) == uninterrupted
    assert saved_step(last) == STEPS and not partial()


FULL_DISK_FROM_STEP_8 = """
import errno, torch
real_save = torch.save
def save(obj, f, *args, **kwargs):
    if isinstance(obj, dict) and obj.get("global_step", 0) >= 8:
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    return real_save(obj, f, *args, **kwargs)
torch.save = save
"""


@pytest.mark.slow
def test_a_failed_background_write_stops_train_py_with_an_error_and_keeps_the_last_good_checkpoint(
    start_train, tmp_path
):
    site = tmp_path / "site"  # a sitecustomize that fills the disk at step 8, in the training process only
    site.mkdir()
    (site / "sitecustomize.py").write_text(FULL_DISK_FROM_STEP_8)
    run_dir = tmp_path / "run"
    process = start_train(
        *RUN,
        "trainer.max_steps=12",
        "callbacks.checkpoint_best=null",
        f"hydra.run.dir={run_dir}",
        env={"PYTHONPATH": str(site)},
    )
    assert process.wait(timeout=300) == 1, process.read_output()[-3000:]
    last = run_dir / "checkpoints" / "last.ckpt"
    error = f"could not write checkpoint {last} ([Errno 28] No space left on device)"
    output = process.read_output()
    assert output.count(error) == 2, output[-3000:]  # when it failed, and as the reason the run stopped
    assert "Traceback" not in output
    assert [path.name for path in last.parent.iterdir()] == ["last.ckpt"]  # no .tmp
    assert saved_step(last) == 4 and find_resumable([str(last.parent)]) == str(last)


def fake_checkpoint(path: Path, step: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"w": torch.ones(64)}, "optimizer_states": [], "loops": {}, "global_step": step}, path)
    return path


def test_a_truncated_last_checkpoint_falls_back_to_the_previous_good_one_saying_so(tmp_path):
    good = fake_checkpoint(tmp_path / "best-step=4.ckpt", 4)
    last = fake_checkpoint(tmp_path / "last.ckpt", 8)
    last.write_bytes(last.read_bytes()[:-100])
    with pytest.warns(UserWarning, match=r"previous good checkpoint .*best-step=4.ckpt: .*last.ckpt is unreadable"):
        assert find_resumable([str(tmp_path)]) == str(good)


def test_the_highest_step_wins_and_last_on_a_tie(tmp_path):
    fake_checkpoint(tmp_path / "best-step=8.ckpt", 8)
    last = fake_checkpoint(tmp_path / "last.ckpt", 8)
    fake_checkpoint(tmp_path / "best-step=4.ckpt", 4)  # written last, but older in steps
    assert find_resumable([str(tmp_path)]) == str(last)
    newer = fake_checkpoint(tmp_path / "best-step=12.ckpt", 12)
    assert find_resumable([str(tmp_path)]) == str(newer)


def test_a_flipped_byte_inside_a_tensor_is_caught(tmp_path):
    good = fake_checkpoint(tmp_path / "best-step=4.ckpt", 4)
    last = fake_checkpoint(tmp_path / "last.ckpt", 8)
    data = bytearray(last.read_bytes())
    data[data.index(torch.ones(64).numpy().tobytes()) + 5] ^= 0xFF
    last.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=r"last.ckpt is corrupt \(record .* fails its CRC check\)"):
        assert find_resumable([str(tmp_path)]) == str(good)


def test_no_readable_checkpoint_is_an_error_and_none_at_all_is_a_new_run(tmp_path):
    assert find_resumable([str(tmp_path), str(tmp_path / "missing")]) is None
    (tmp_path / "last.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"no readable checkpoint to resume from: .*last.ckpt is unreadable"):
        find_resumable([str(tmp_path)])


@pytest.mark.slow
def test_train_py_refuses_a_corrupt_checkpoint_in_one_line(start_train, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"\0" * 1000)
    process = start_train(f"hydra.run.dir={run_dir}")
    assert process.wait(timeout=300) == 1
    output = process.read_output()
    assert "no readable checkpoint to resume from" in output and "Traceback" not in output
    assert not (run_dir / "csv").exists() and "a new run" not in output  # nothing trained


def test_a_failed_write_leaves_the_previous_checkpoint_untouched(tmp_path, monkeypatch):
    path = fake_checkpoint(tmp_path / "last.ckpt", 4)
    before = path.read_bytes()

    def disk_full(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointWriteError, match="No space left on device.*the previous one is untouched"):
        AtomicCheckpointIO().save_checkpoint({"global_step": 8}, path)
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]


class Noisy(L.LightningModule):
    """Its loss is fresh random numbers from every generator: a resumed run matches only if they are restored."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))
        self.losses = []

    def training_step(self, batch, batch_idx):
        loss = self.weight * (torch.rand(1) + np.random.rand() + random.random())
        self.losses.append(loss.item())
        return loss.sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit_noisy(root: Path, steps: int, keep_random_state: bool, ckpt_path=None) -> list[float]:
    L.seed_everything(0)
    module = Noisy()
    callbacks = [LastCheckpoint(str(root), every_n_train_steps=3, requeue_signals=[])]
    trainer = quiet_trainer(
        max_steps=steps,
        callbacks=callbacks + ([RandomState()] if keep_random_state else []),
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(range(100)), ckpt_path=ckpt_path)
    return module.losses


@pytest.mark.parametrize("keep_random_state", [True, False])
def test_random_generators_continue_where_they_stopped(tmp_path, keep_random_state):
    uninterrupted = fit_noisy(tmp_path / "full", 8, keep_random_state)
    before = fit_noisy(tmp_path / "cut", 5, keep_random_state)  # last.ckpt at the end: step 5
    after = fit_noisy(tmp_path / "cut", 8, keep_random_state, ckpt_path=str(tmp_path / "cut" / "last.ckpt"))
    assert before == uninterrupted[:5]
    assert (after == uninterrupted[5:]) == keep_random_state  # without RandomState they differ: the test can fail
