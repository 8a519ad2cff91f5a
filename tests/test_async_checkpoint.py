"""Checkpoints written in the background (BackgroundCheckpointIO): training goes on while a checkpoint is written, each
file holds the state of its own step, one write is in flight at most, a failed write is reported and leaves the last
good checkpoint, the requeue waits for the write, and LastCheckpoint's time cadence triggers.

The writes happen in a writer process: a slow or failing torch.save is put there with a sitecustomize on its
PYTHONPATH (`in_the_writer`); a monkeypatch of the test process would not reach it."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import environ_outside_slurm, quiet_trainer
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from callbacks.checkpoint import LastCheckpoint
from checkpoints.reader import find_resumable
from checkpoints.writer import BackgroundCheckpointIO, CheckpointWriteError, host_copy, tensors_in

ROOT = Path(__file__).parents[1]
SAVE_IN_THE_WRITER = """
import errno, json, time, torch
real_save = torch.save


def save(checkpoint, f, *args, **kwargs):
    step, weight = checkpoint["global_step"], checkpoint.get("state_dict", {{}}).get("weight")
    time.sleep({seconds})
    if step >= {failing_from}:
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    real_save(checkpoint, f, *args, **kwargs)
    with open({log!r}, "a") as out:  # what was written, and when the write ended (CLOCK_MONOTONIC: system-wide)
        out.write(json.dumps([step, None if weight is None else weight.item(), time.monotonic()]) + "\\n")
torch.save = save
"""


def in_the_writer(monkeypatch, tmp_path, seconds: float = 0.0, failing_from: int = 10**9) -> Path:
    """Every writer process started from now on sleeps `seconds` before each torch.save, fails as a full disk from
    step `failing_from` on, and logs each write it completes to the file returned: [step, weight, end time]."""
    site, log = tmp_path / "site", tmp_path / "writes.jsonl"
    site.mkdir()
    code = SAVE_IN_THE_WRITER.format(seconds=seconds, failing_from=failing_from, log=str(log))
    (site / "sitecustomize.py").write_text(code)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    return log


def writes(log: Path) -> list[tuple[int, float, float]]:
    return [tuple(json.loads(line)) for line in log.read_text().splitlines()] if log.exists() else []


class Counting(L.LightningModule):
    """One weight that SGD raises by exactly 1 per optimizer step: a checkpoint's weight is the step it was taken at."""

    def __init__(self, step_s: float = 0.0, signal_at: int | None = None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.step_s, self.signal_at = step_s, signal_at
        self.started = {}  # global step -> time.monotonic() when the step from it began

    def training_step(self, batch, batch_idx):
        self.started[self.trainer.global_step] = time.monotonic()
        if self.trainer.global_step == self.signal_at:
            os.kill(os.getpid(), signal.SIGUSR2)  # as submitit before the time limit
        time.sleep(self.step_s)
        return -self.weight.sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


def fit(root: Path, steps: int, module=None, requeue_signals=(), accumulate: int = 1, **cadence) -> Counting:
    module = module or Counting()
    trainer = quiet_trainer(
        max_steps=steps,
        accumulate_grad_batches=accumulate,
        callbacks=[LastCheckpoint(str(root), requeue_signals=list(requeue_signals), **cadence)],
        plugins=[BackgroundCheckpointIO()],
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(range(1000)))
    return module


def saved(path: Path) -> tuple[int, float]:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    return checkpoint["global_step"], checkpoint["state_dict"]["weight"].item()


def test_training_goes_on_during_a_write_and_the_next_save_waits_for_it(tmp_path, monkeypatch):
    log = in_the_writer(monkeypatch, tmp_path, seconds=0.5)  # meanwhile training changes the weights
    started = fit(tmp_path / "run", 6, every_n_train_steps=2).started
    written = {step: (weight, end) for step, weight, end in writes(log)}
    assert {step: weight for step, (weight, _) in written.items()} == {2: 2.0, 4: 4.0, 6: 6.0}  # each its own step
    assert started[2] < written[2][1], "training waited for the write of step 2"
    assert started[4] > written[2][1], "the save at step 4 did not wait for the write of step 2"
    assert saved(tmp_path / "run" / "last.ckpt") == (6, 6.0)  # the last write is complete when fit returns


@pytest.mark.parametrize("failing_from", [4, 8], ids=["raised-at-the-next-save", "raised-at-the-end-of-fit"])
def test_a_failed_background_write_is_reported_and_the_previous_checkpoint_stays(
    tmp_path, monkeypatch, caplog, failing_from
):
    in_the_writer(monkeypatch, tmp_path, failing_from=failing_from)
    run = tmp_path / "run"
    with pytest.raises(CheckpointWriteError, match=r"last.ckpt \(\[Errno 28\] No space left on device\)"):
        fit(run, 8, every_n_train_steps=2)
    assert f"could not write checkpoint {run / 'last.ckpt'}" in caplog.text  # logged when it failed
    assert [path.name for path in run.iterdir()] == ["last.ckpt"]  # no .tmp left behind
    assert saved(run / "last.ckpt") == (failing_from - 2, failing_from - 2)
    assert find_resumable([str(run)]) == str(run / "last.ckpt")


def test_an_old_checkpoint_is_removed_after_its_replacement_is_written_and_kept_if_that_fails(tmp_path, monkeypatch):
    """What ModelCheckpoint's top-k does: save the new best, then remove the one it displaces."""
    in_the_writer(monkeypatch, tmp_path, failing_from=6)
    run = tmp_path / "run"
    io, first, second, third = BackgroundCheckpointIO(), *(run / f"best-step={s}.ckpt" for s in (2, 4, 6))
    io.save_checkpoint({"global_step": 2}, first)
    io.save_checkpoint({"global_step": 4}, second)
    io.remove_checkpoint(first)
    io.save_checkpoint({"global_step": 6}, third)  # fails
    io.remove_checkpoint(second)  # queued behind the write, skipped as it failed
    with pytest.raises(CheckpointWriteError, match="best-step=6.ckpt"):
        io.teardown()
    assert sorted(run.iterdir()) == [second]  # the first removed after the second was written, the second kept
    io.teardown()  # raised once: Lightning's teardown after the error does not raise it again


class HeldCopy:
    """A stand-in for the CUDA event of a copy to host memory: the handoff thread waits in synchronize() until the test
    releases it."""

    def __init__(self):
        self.waited, self.released = threading.Event(), threading.Event()

    def synchronize(self):
        self.waited.set()
        if not self.released.wait(timeout=30):  # a bound, so that a wait in the training thread fails, not hangs
            raise TimeoutError("the copy was never released")


class FailedCopy:
    def synchronize(self):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


def copies_from_a_gpu(monkeypatch, *events) -> None:
    """The next saves return these as the events of their copies from a GPU, one each, then none (CPU tensors)."""
    events = list(events)
    gpu = torch.device("cuda", 0)

    def copy(*args):  # as from a GPU without room to stage: the next optimizer step waits for the copy
        return (host_copy(*args)[0], {gpu: events.pop(0)}, True) if events else host_copy(*args)

    monkeypatch.setattr("checkpoints.writer.host_copy", copy)


def test_a_removal_stays_behind_a_write_whose_copy_is_not_complete(tmp_path, monkeypatch):
    """From a GPU a write goes to the writer only once its copy to host memory is complete (the handoff thread waits
    for it), while training goes on: the removal of the checkpoint it replaces must not overtake it."""
    run = tmp_path / "run"
    old, new, probe = run / "best-step=2.ckpt", run / "best-step=4.ckpt", run / "probe.ckpt"
    io, copy = BackgroundCheckpointIO(), HeldCopy()
    try:
        io.save_checkpoint({"global_step": 2}, old)
        copies_from_a_gpu(monkeypatch, copy)
        io.save_checkpoint({"global_step": 4}, new)  # returns with its copy held
        io.remove_checkpoint(old)
        assert copy.waited.wait(timeout=30)  # the handoff thread holds the write
        io.jobs.put(("write", str(probe), {"global_step": 0}))  # straight to the writer, which goes in order:
        assert io.result()[1] is None  # written once all it got before is done
        assert old.exists() and not new.exists()
    finally:
        copy.released.set()
        io.teardown()
    assert sorted(run.iterdir()) == [new, probe]


def test_a_failed_copy_is_reported_and_the_previous_checkpoint_stays(tmp_path, monkeypatch):
    run = tmp_path / "run"
    old = run / "best-step=2.ckpt"
    io = BackgroundCheckpointIO()
    io.save_checkpoint({"global_step": 2}, old)
    copies_from_a_gpu(monkeypatch, FailedCopy())
    io.save_checkpoint({"global_step": 4}, run / "best-step=4.ckpt")
    io.save_checkpoint({"global_step": 4}, run / "last.ckpt")  # the same step: no copy of its own, the same buffers
    io.remove_checkpoint(old)
    with pytest.raises(CheckpointWriteError, match=r"best-step=4.ckpt: a copy to host memory failed \(RuntimeError"):
        io.teardown()
    assert sorted(run.iterdir()) == [old]  # neither written from the buffers, the old one kept


def test_the_next_optimizer_step_waits_for_the_copy_on_the_gpu_after_its_forward_and_backward(tmp_path, monkeypatch):
    """What it queues on the GPU's current stream (a stand-in): the wait for the copy, after the closure (Lightning runs
    the forward and the backward in it, inside step()) and before the update, in the next optimizer step only."""
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    queued = []

    class Stream:
        def wait_event(self, event):
            queued.append(("wait", weight.item()))

    def closure():
        queued.append(("closure", weight.item()))
        optimizer.zero_grad()
        loss = -weight.sum()
        loss.backward()
        return loss

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    copy = HeldCopy()
    copy.released.set()
    copies_from_a_gpu(monkeypatch, copy, copy)
    io = BackgroundCheckpointIO()
    try:
        io.save_checkpoint({"global_step": 1}, tmp_path / "a.ckpt")
        optimizer.step(closure=closure)
        optimizer.step(closure=closure)
        io.save_checkpoint({"global_step": 2}, tmp_path / "b.ckpt")
        closure()
        optimizer.step()  # no closure (as GradScaler's step): it waits first
    finally:
        io.teardown()
    io.copying = {torch.device("cuda", 0): copy}
    optimizer.step(closure=closure)  # the hook has gone with the teardown
    assert queued == [
        ("closure", 0.0),
        ("wait", 0.0),
        ("closure", 1.0),
        ("closure", 2.0),
        ("wait", 2.0),
        ("closure", 3.0),
    ]


def test_teardown_ends_the_handoff_thread_and_the_writer_after_the_removals_queued(tmp_path):
    run = tmp_path / "run"
    old, new = run / "best-step=2.ckpt", run / "best-step=4.ckpt"
    io = BackgroundCheckpointIO()
    io.save_checkpoint({"global_step": 2}, old)
    io.save_checkpoint({"global_step": 4}, new)
    io.remove_checkpoint(old)
    handoff, writer = io.handoff.thread, io.writer
    io.teardown()
    assert not handoff.is_alive()
    assert writer.exitcode == 0  # joined, ended by the end message
    assert sorted(run.iterdir()) == [new]


def test_the_requeue_waits_for_the_checkpoint_to_be_written(tmp_path, monkeypatch):
    in_the_writer(monkeypatch, tmp_path, seconds=0.5)
    found = []

    def launcher_handler(signum, frame):  # submitit's: resubmits the job and exits
        found.append(saved(tmp_path / "run" / "last.ckpt"))

    previous = signal.signal(signal.SIGUSR2, launcher_handler)
    try:
        fit(tmp_path / "run", 20, Counting(signal_at=2), requeue_signals=["SIGUSR2"], every_n_train_steps=100)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert found == [(3, 3.0)]  # the step in progress finished, was written, then the handler ran


OUTSIDE_TRAINING = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, "tests")
from test_async_checkpoint import Counting, fit


class SignalledAtStartUp(Counting):
    def on_fit_start(self):  # after the callbacks' setup, before Lightning's signal handlers and the sanity check
        os.kill(os.getpid(), signal.SIGUSR2)


root = Path(sys.argv[1])
module = fit(root / "first", 20, SignalledAtStartUp(), requeue_signals=["SIGUSR2"], every_n_train_steps=100)
print("the first fit stopped at step", module.trainer.global_step)
os.kill(os.getpid(), signal.SIGUSR2)
module = fit(root / "second", 20, Counting(signal_at=2), requeue_signals=["SIGUSR2"], every_n_train_steps=100)
print("the second fit stopped at step", module.trainer.global_step)
os.kill(os.getpid(), signal.SIGUSR2)
"""


def test_a_requeue_signal_before_or_after_training_neither_kills_the_run_nor_is_lost(tmp_path):
    """SLURM's time-limit signal can land before training starts (start-up, the sanity check) or after the last step
    (while the process writes its last files and exits); the signal's default action would end the job as FAILED.
    Before: the first step ends, is saved and the job requeued, as for a signal during training. After: nothing is
    left to save or requeue. A second fit in the same process (a sweep) still stops, saves and requeues on it."""
    run = [sys.executable, "-c", OUTSIDE_TRAINING, str(tmp_path)]
    done = subprocess.run(run, cwd=ROOT, env=environ_outside_slurm(), timeout=300, capture_output=True, text=True)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "the first fit stopped at step 1" in output and "the second fit stopped at step 3" in output
    assert saved(tmp_path / "first" / "last.ckpt") == (1, 1.0) and saved(tmp_path / "second" / "last.ckpt") == (3, 3.0)
    assert output.count("SIGUSR2 after training ended: nothing to save or requeue") == 2, output[-3000:]
    # the requeue (outside SLURM: only this line), not the first fit's after_training taken for a launcher's handler
    assert output.count("not in a SLURM job: stopping without a requeue") == 2, output[-3000:]


@pytest.mark.parametrize("cadence", [{"every_n_train_steps": 100}, {"every_n_minutes": 0}])
def test_a_stop_or_a_timed_save_waits_for_the_end_of_gradient_accumulation(tmp_path, monkeypatch, cadence):
    """With accumulate_grad_batches=2 the signal comes in the first micro-batch of step 2: the save waits for the
    second one and the optimizer step (saved mid-way, the resumed run would step without the first micro-batch's
    gradient). The time cadence (0 minutes: due after every micro-batch) saves only at optimizer steps too."""
    log = in_the_writer(monkeypatch, tmp_path)
    found = []

    def launcher_handler(signum, frame):
        found.append(saved(tmp_path / "run" / "last.ckpt"))

    previous = signal.signal(signal.SIGUSR2, launcher_handler)
    try:
        fit(tmp_path / "run", 20, Counting(signal_at=2), requeue_signals=["SIGUSR2"], accumulate=2, **cadence)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert found == [(3, 3.0)]  # step 3 complete: both micro-batches of the step the signal came in
    assert all(weight == step for step, weight, _ in writes(log))  # every save at an optimizer step's end


def steps_saved(tmp_path, monkeypatch, steps: int, module=None, **cadence) -> list[int]:
    log = in_the_writer(monkeypatch, tmp_path)
    fit(tmp_path / "run", steps, module, **cadence)
    return [step for step, _, _ in writes(log)]


def test_the_time_cadence_triggers(tmp_path, monkeypatch):
    saves = steps_saved(tmp_path, monkeypatch, 10, Counting(step_s=0.1), every_n_minutes=0.25 / 60)
    assert len(saves) >= 2 and saves[-1] == 10, saves  # every ~2.5 steps of 0.1 s, and at the end
    assert saves == sorted(set(saves))


@pytest.mark.parametrize(
    "cadence, expected",
    [
        ({"every_n_minutes": 10}, [6]),  # only at the end of this short run
        ({"every_n_minutes": 10, "every_n_train_steps": 2}, [2, 4, 6]),  # the step count, when set, replaces the time
    ],
)
def test_the_step_count_replaces_the_time_cadence(tmp_path, monkeypatch, cadence, expected):
    assert steps_saved(tmp_path, monkeypatch, 6, **cadence) == expected


def test_the_shipped_config_checkpoints_by_time_and_takes_a_step_override(tmp_path):
    def last_checkpoint(*overrides: str) -> LastCheckpoint:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("train", overrides=[f"paths.output_dir={tmp_path}", *overrides])
        return instantiate(cfg.callbacks.checkpoint_last)

    default = last_checkpoint()
    assert default.every_n_seconds == 600 and default._every_n_train_steps == 0
    assert default._train_time_interval is None and default._every_n_epochs == 0  # the time cadence is ours alone
    overridden = last_checkpoint("callbacks.checkpoint_last.every_n_train_steps=500")
    assert overridden.every_n_seconds is None and overridden._every_n_train_steps == 500


def test_the_time_cadence_and_the_signal_flag_need_no_broadcast_through_the_strategy(tmp_path, monkeypatch):
    """The strategy's broadcast pickles through the training process group, whose NCCL collectives wait for the GPU:
    neither the time cadence nor the signal flag may use it at every step (they go over a gloo group of their own)."""
    in_the_writer(monkeypatch, tmp_path)
    calls = []
    original = L.pytorch.strategies.SingleDeviceStrategy.broadcast

    def counted(strategy, obj, src=0):
        calls.append(obj)
        return original(strategy, obj, src)

    monkeypatch.setattr(L.pytorch.strategies.SingleDeviceStrategy, "broadcast", counted)
    fit(tmp_path / "run", 30, every_n_minutes=10)
    assert len(calls) < 5, f"{len(calls)} broadcasts in 30 steps"


def test_a_second_checkpoint_of_the_same_step_does_not_wait_for_the_first(tmp_path, monkeypatch):
    """best-k right after last.ckpt at a validation step: the same state, so no wait for the write in flight."""

    in_the_writer(monkeypatch, tmp_path, seconds=1.5)
    run = tmp_path / "run"
    io = BackgroundCheckpointIO()
    state = {"global_step": 7, "state_dict": {"weight": torch.full((1,), 7.0)}}
    start = time.perf_counter()
    io.save_checkpoint(state, run / "last.ckpt")
    io.save_checkpoint(state, run / "best.ckpt")
    assert time.perf_counter() - start < 1.2  # neither waited for a write
    io.save_checkpoint({**state, "global_step": 8}, run / "last.ckpt")  # another step: waits for both writes
    assert time.perf_counter() - start >= 3.0
    io.teardown()
    assert saved(run / "best.ckpt") == (7, 7.0) and saved(run / "last.ckpt") == (8, 7.0)


def test_writes_in_flight_when_the_writer_dies_are_each_reported_as_failed(tmp_path):
    """last.ckpt and the same step's best-k copy both in flight (neither waits) when the writer is killed."""
    io = BackgroundCheckpointIO()
    io.start_writer()
    os.kill(io.writer.pid, signal.SIGKILL)
    io.writer.join()
    state = {"global_step": 7, "state_dict": {"weight": torch.full((1,), 7.0)}}
    io.save_checkpoint(state, tmp_path / "last.ckpt")
    io.save_checkpoint(state, tmp_path / "best.ckpt")
    with pytest.raises(CheckpointWriteError, match=r"the writer process died \(exit code -9\)"):
        io.wait()
    assert io.in_flight == [] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("free", "staged"), [(2_000, True), (1_999, False)])
def test_a_checkpoint_is_staged_on_the_gpu_only_where_a_tenth_of_its_memory_stays_free(monkeypatch, free, staged):
    """1,000 bytes to stage on a GPU of 10,000: staged if 1,000 (10%) stay free after it. (CPU tensors stand in for
    the CUDA ones: the rule reads only their device and size.)"""
    tensors = {("weight",): torch.zeros(125), ("exp_avg",): torch.zeros(125)}  # float32: 500 bytes each
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free, 10_000))
    io = BackgroundCheckpointIO()
    io.stage(tensors)
    assert sorted(io.staged) == (sorted(tensors) if staged else [])
    assert all(io.staged[key].shape == tensors[key].shape for key in io.staged)


def test_the_writer_gets_the_state_s_buffers_once_and_each_save_only_the_structure(tmp_path):
    """Each tensor sent to the writer process is a shared-memory handle that the training process pickles and then
    serves to the writer (its file descriptor), under the GIL: at 0.6b ~800 at each save, in the step after it. The
    buffers are kept for the run and sent once; a later save sends the tensors that are new at that save only."""
    weights = {f"weight{i}": torch.full((4,), float(i)) for i in range(3)}
    io, sent = BackgroundCheckpointIO(), []
    try:
        io.save_checkpoint({"global_step": 1, "state_dict": weights, "new": torch.tensor([1])}, tmp_path / "1.ckpt")
        io.wait()  # its write is done: the handoff thread has sent everything of the first save
        send = io.jobs.put
        io.jobs.put = lambda job: (sent.append(job), send(job))  # what the handoff thread sends the writer from now
        for weight in weights.values():
            weight.add_(10)  # as an optimizer step, in place
        io.save_checkpoint({"global_step": 2, "state_dict": weights, "new": torch.tensor([2])}, tmp_path / "2.ckpt")
    finally:
        io.teardown()
    assert "write" in [job[0] for job in sent if job is not None]
    assert [tensor.numel() for tensor in tensors_in(sent)] in ([], [1])  # at most the new scalar, never a weight
    for step in (1, 2):
        checkpoint = torch.load(tmp_path / f"{step}.ckpt", weights_only=True)
        assert checkpoint["new"].tolist() == [step]
        expected = {name: torch.full((4,), i + 10.0 * (step - 1)) for i, name in enumerate(weights)}
        torch.testing.assert_close(checkpoint["state_dict"], expected, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pinned host copies)")
def test_cuda_tensors_go_to_pinned_buffers_reserved_once_and_kept(tmp_path):
    weight = torch.nn.Parameter(torch.zeros(1, device="cuda"))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    io = BackgroundCheckpointIO()
    io.reserve([weight])
    (buffer,) = io.buffers.values()
    assert buffer.is_pinned()
    io.save_checkpoint({"global_step": 1, "state_dict": {"weight": weight}}, tmp_path / "last.ckpt")
    io.save_checkpoint({"global_step": 1, "state_dict": {"weight": weight}}, tmp_path / "best.ckpt")  # same step
    weight.grad = torch.full_like(weight, -10.0)
    optimizer.step()  # the only in-place change a copy in flight allows: it waits for the copy (on the GPU)
    io.save_checkpoint({"global_step": 2, "state_dict": {"weight": weight}}, tmp_path / "next.ckpt")
    assert list(io.buffers.values()) == [buffer]  # the same pinned memory at every save
    io.teardown()
    assert not io.buffers  # unpinned and freed with the end of the run
    assert saved(tmp_path / "best.ckpt") == saved(tmp_path / "last.ckpt") == (1, 0.0)
    assert saved(tmp_path / "next.ckpt") == (2, 10.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (copies on a side stream)")
@pytest.mark.parametrize("staged", [False, True], ids=["straight-to-host", "staged-on-the-gpu"])
def test_each_checkpoint_holds_its_step_while_the_next_steps_run_during_its_copy(tmp_path, staged):
    """256 MiB take milliseconds to copy to the host, an update of them a fraction of that: the next optimizer step
    must wait for the copy, unless the weight was staged in GPU memory first (then it must not wait), and a temporary
    (`doubled`) must keep its memory until the copy has read it."""
    weight = torch.nn.Parameter(torch.zeros(64, 1024, 1024, device="cuda"))
    optimizer = torch.optim.SGD([weight], lr=1.0)

    def closure():  # the forward and the backward of a step: the gradient is -1
        optimizer.zero_grad()
        (-weight.sum()).backward()

    io = BackgroundCheckpointIO()
    if staged:
        io.reserve([weight])  # as LastCheckpoint after the first step; the GPU has room for 256 MiB
        assert len(io.staged) == 1
    try:
        for step in range(1, 5):
            optimizer.step(closure=closure)  # as Lightning calls it
            doubled = weight[0, 0, :4] * 2
            io.save_checkpoint({"global_step": step, "weight": weight, "doubled": doubled}, tmp_path / f"{step}.ckpt")
            del doubled
            assert bool(io.copying) is not staged  # what the next optimizer step waits for
    finally:
        io.teardown()
    for step in range(1, 5):
        checkpoint = torch.load(tmp_path / f"{step}.ckpt", weights_only=True)
        assert checkpoint["weight"].unique().tolist() == [step] and checkpoint["doubled"].tolist() == [2 * step] * 4


def test_the_writer_survives_the_signals_that_slurm_sends_to_every_process_of_a_job(tmp_path, monkeypatch):
    """scancel, a preemption or the requeue signal reach the writer too: the checkpoint that the training process
    writes in answer to them must still be written."""
    in_the_writer(monkeypatch, tmp_path, seconds=0.5)
    io = BackgroundCheckpointIO()
    io.save_checkpoint({"global_step": 3, "state_dict": {"weight": torch.full((1,), 3.0)}}, tmp_path / "last.ckpt")
    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT):
        os.kill(io.writer.pid, signum)
    io.teardown()
    assert saved(tmp_path / "last.ckpt") == (3, 3.0)


def test_a_script_that_never_tears_down_exits_after_its_write_lands(tmp_path):
    """Lightning's fit always tears the writer down; a script that saves and returns does not. At exit Python ends
    its daemonic children: the write was lost (the writer, still starting, found the parent's queue gone), exit 0."""
    checkpoint = "{'global_step': 5, 'state_dict': {'weight': torch.full((1,), 5.0)}}"
    script = (
        "import torch\nfrom checkpoints.writer import BackgroundCheckpointIO\n"
        f"BackgroundCheckpointIO().save_checkpoint({checkpoint}, {str(tmp_path / 'last.ckpt')!r})\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, timeout=120, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert saved(tmp_path / "last.ckpt") == (5, 5.0)
