"""A run directory belongs to one live train.py; a killed run's directory resumes; the best-k set holds across
resumes; a resume with another model, or onto a full disk, stops in one line. Real train.py processes."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from checkpoints import reader
from checkpoints.lock import REQUEUE_WAIT_S, hold_run_dir, lock_wait_s

RUN = ["logger=csv", "trainer.log_every_n_steps=1", "callbacks.checkpoint_last.every_n_train_steps=2"]


def wait_for(condition, process, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"train.py ended before {what}:\n{process.read_output()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} after {timeout}s"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_second_train_py_on_a_live_run_stops_at_once_naming_the_first(start_train, tmp_path):
    run_dir = tmp_path / "run"
    first = start_train(*RUN, "trainer.max_steps=100000", f"hydra.run.dir={run_dir}")
    lock = run_dir / "train.lock"
    wait_for(lambda: lock.exists() and f"pid {first.pid}" in lock.read_text(), first, "lock")
    started = time.monotonic()
    second = start_train(*RUN, "trainer.max_steps=100000", f"hydra.run.dir={run_dir}")
    assert second.wait(timeout=120) == 1, second.read_output()[-3000:]
    assert time.monotonic() - started < 60
    output = second.read_output()
    assert f"is in use by another live train.py (pid {first.pid} on host " in output
    assert "Traceback" not in output and "a new run" not in output
    assert first.poll() is None, "the first run stopped"
    first.send_signal(signal.SIGTERM)  # it checkpoints the step in progress and ends
    assert first.wait(timeout=300) == 128 + signal.SIGTERM, first.read_output()[-3000:]
    last = run_dir / "checkpoints" / "last.ckpt"
    assert reader.find_resumable([str(last.parent)]) == str(last) and reader.saved_step(last) > 0


@pytest.mark.slow
def test_a_killed_runs_directory_resumes_and_its_partial_writes_are_removed(start_train, tmp_path):
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    first = start_train(*RUN, "trainer.max_steps=200", f"hydra.run.dir={run_dir}")
    wait_for(last.exists, first, "last.ckpt")
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    leftover = last.with_name(f"last.ckpt.tmp.{first.pid}")  # as a writer killed mid-write leaves it
    leftover.write_bytes(b"partial")
    second = start_train(*RUN, "trainer.max_steps=12", f"hydra.run.dir={run_dir}")
    assert second.wait(timeout=600) == 0, second.read_output()[-3000:]
    assert f"resuming {last}" in second.read_output()
    assert not leftover.exists()
    assert reader.saved_step(last) == 12


def scores(paths) -> dict[str, float]:
    """{file name: the validation BPB it was saved with}"""
    out = {}
    for path in paths:
        states = reader.metadata(path)["callbacks"].values()
        (state,) = [s for s in states if s.get("dirpath") == str(path.parent) and s["current_score"] is not None]
        out[path.name] = float(state["current_score"])
    return out


@pytest.mark.slow
def test_save_top_k_holds_across_three_resumes(start_train, tmp_path):
    run_dir = tmp_path / "run"
    every_validation = [  # a second checkpoint callback keeping every validation's checkpoint: the full ranking
        "+callbacks.all._target_=lightning.pytorch.callbacks.ModelCheckpoint",
        f"+callbacks.all.dirpath={run_dir}/all",
        "+callbacks.all.monitor=val/bpb",
        "+callbacks.all.save_top_k=-1",
        "+callbacks.all.filename='step-{step}'",
    ]
    for steps in (4, 8, 12, 16):  # a new run, then three resumes; a validation every 2 steps
        process = start_train(*RUN, *every_validation, "trainer.val_check_interval=2", f"trainer.max_steps={steps}",
                              "callbacks.checkpoint_best.save_top_k=2", f"hydra.run.dir={run_dir}")  # fmt: skip
        assert process.wait(timeout=600) == 0, process.read_output()[-3000:]
    everything = scores((run_dir / "all").glob("*.ckpt"))
    assert len(everything) == 8  # steps 2, 4, ..., 16
    kept = scores((run_dir / "checkpoints").glob("best-*.ckpt"))
    assert len(kept) == 2
    assert sorted(kept.values()) == sorted(everything.values())[:2]


def test_the_kept_best_k_are_recomputed_from_the_files_on_disk(tmp_path):
    from callbacks.checkpoint import BestCheckpoints

    callback = BestCheckpoints(dirpath=tmp_path, filename="best-{step}", monitor="val/bpb", save_top_k=2)
    for step, score in [(2, 1.5), (4, 1.2), (6, 1.4)]:
        state = {callback.state_key: {"current_score": torch.tensor(score)}}
        checkpoint = {"state_dict": {}, "optimizer_states": [], "loops": {}, "global_step": step, "callbacks": state}
        torch.save(checkpoint, tmp_path / f"best-{step}.ckpt")
    torch.save({**checkpoint, "global_step": 6}, tmp_path / "last.ckpt")  # not one of the best-k
    removed = []
    trainer = type("Trainer", (), {"strategy": type("S", (), {"remove_checkpoint": staticmethod(removed.append)})})
    callback.on_train_start(trainer, None)
    assert removed == [str(tmp_path / "best-2.ckpt")]
    assert set(callback.best_k_models) == {str(tmp_path / "best-4.ckpt"), str(tmp_path / "best-6.ckpt")}
    assert callback.best_model_path == str(tmp_path / "best-4.ckpt") and callback.kth_value == pytest.approx(1.4)


@pytest.mark.slow
def test_resuming_with_another_model_names_the_settings_that_differ(start_train, tmp_path):
    run_dir = tmp_path / "run"
    first = start_train(*RUN, "trainer.max_steps=2", f"hydra.run.dir={run_dir}")
    assert first.wait(timeout=600) == 0, first.read_output()[-3000:]
    second = start_train(*RUN, "trainer.max_steps=4", "attention=gated", "model.n_head=2", f"hydra.run.dir={run_dir}")
    assert second.wait(timeout=600) == 1, second.read_output()[-3000:]
    output = second.read_output()
    assert "model.attention: checkpoint vanilla, this run gated; model.n_head: checkpoint 4, this run 2" in output
    assert "start a new run with another run=NAME" in output
    assert "Traceback" not in output and "Error(s) in loading state_dict" not in output


FILE_SIZE_LIMIT = """
import resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing the process
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("resumed", [False, True], ids=["new-run", "resumed-run"])
def test_a_full_disk_at_a_save_stops_the_run_in_one_line_and_keeps_the_last_good_checkpoint(
    start_train, tmp_path, resumed
):
    """A file size limit makes every checkpoint write fail as a full disk does (torch's "unexpected pos")."""
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    if resumed:
        first = start_train(*RUN, "trainer.max_steps=2", f"hydra.run.dir={run_dir}")
        assert first.wait(timeout=600) == 0, first.read_output()[-3000:]
        assert last.stat().st_size > 300_000  # well over the limit below
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FILE_SIZE_LIMIT.format(limit=200_000))
    full = start_train(*RUN, "trainer.max_steps=4", f"hydra.run.dir={run_dir}", env={"PYTHONPATH": str(site)})
    assert full.wait(timeout=600) == 1, full.read_output()[-3000:]
    output = full.read_output()
    error = f"could not write checkpoint {last} (the disk is full or over quota); the previous one is untouched"
    assert error in output
    assert "GB free on its filesystem" in output and "Traceback" not in output and "unexpected pos" not in output
    assert [path.name for path in last.parent.iterdir()] == (["last.ckpt"] if resumed else [])
    if resumed:
        assert reader.find_resumable([str(last.parent)]) == str(last) and reader.saved_step(last) == 2


HOLD_FOR_2_S = """
import sys, time
from pathlib import Path
from checkpoints.lock import hold_run_dir
with hold_run_dir(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(2)
"""


def test_a_requeued_job_waits_for_its_previous_run_to_release_the_directory(tmp_path, monkeypatch, caplog):
    """The previous run of a requeued job may still be ending (SLURM's KillWait, on another node): the requeued run
    waits for the lock a bounded time, saying so, where any other start stops at once."""
    root = str(Path(__file__).parents[1])
    previous = subprocess.Popen([sys.executable, "-c", HOLD_FOR_2_S, str(tmp_path)], cwd=root, stdout=subprocess.PIPE)
    assert previous.stdout.readline() == b"held\n"
    with pytest.raises(ValueError, match=rf"in use by another live train.py \(pid {previous.pid} on host"):
        with hold_run_dir(tmp_path, lock_wait_s()):
            pass
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert lock_wait_s() == REQUEUE_WAIT_S
    started = time.monotonic()
    with hold_run_dir(tmp_path, lock_wait_s()):
        waited = time.monotonic() - started
    assert 1 < waited < 10, "it did not wait for the previous run, or not only until that one ended"
    assert previous.wait(timeout=10) == 0
    assert f"is held by pid {previous.pid} on host" in caplog.text and "waiting up to 120 s" in caplog.text
