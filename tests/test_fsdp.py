"""trainer=fsdp: the data-parallel mesh spans every device (devices=auto included), and a 2-rank FSDP2 run on the
CPU (gloo) trains, validates, writes sharded checkpoints (every rank its own part) and resumes from one with the
uninterrupted run's losses, bit for bit; on 1 rank it resumes with the same weights and optimizer state."""

import os
import shutil
import signal
import time
from pathlib import Path

import lightning.pytorch.strategies.model_parallel as model_parallel
import pytest
import torch
from helpers import csv_rows, process_tree
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.plugins.environments import LightningEnvironment
from torch.distributed.checkpoint import FileSystemReader

from checkpoints import reader

CONF = Path(__file__).parents[1] / "conf"


@pytest.mark.parametrize("num_nodes", [1, 2])
def test_devices_auto_gives_one_data_parallel_group_of_every_device(monkeypatch, num_nodes):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        trainer_cfg = compose("train", overrides=["trainer=fsdp"]).trainer
    assert trainer_cfg.devices == "auto"  # as documented: all GPUs of the node
    strategy = instantiate(trainer_cfg.strategy)
    strategy.parallel_devices = [torch.device("cpu")] * 4  # what Lightning resolves `auto` to on a 4-GPU node
    strategy.num_nodes = num_nodes
    strategy.accelerator = CPUAccelerator()
    strategy.cluster_environment = LightningEnvironment()
    strategy.cluster_environment.set_world_size(4 * num_nodes)
    strategy._lightning_module = torch.nn.Module()
    monkeypatch.setattr(strategy, "_setup_distributed", lambda: None)
    sizes = []
    monkeypatch.setattr(model_parallel, "_setup_device_mesh", lambda *args: sizes.append(args[:3]))
    strategy.setup_environment()
    assert sizes == [(4 * num_nodes, 1, 4 * num_nodes)]  # data parallel = world size, no tensor parallelism


FSDP_RUN = [
    "trainer=fsdp",
    "trainer.accelerator=cpu",
    "trainer.devices=2",
    "trainer.precision=32-true",
    "logger=csv",
    "trainer.max_steps=8",
    "trainer.log_every_n_steps=1",
    "trainer.val_check_interval=3",  # validations before (3) and after (6) the resume point
    "optim.warmup_steps=2",
    "callbacks.checkpoint_last.every_n_train_steps=4",
]
RUN = [
    *FSDP_RUN,
    # keep the step-4 checkpoint too (last.ckpt is overwritten at step 8): the uninterrupted run's resume point
    "callbacks.checkpoint_best.monitor=null",
    "callbacks.checkpoint_best.save_top_k=-1",
    "+callbacks.checkpoint_best.every_n_train_steps=4",
    "callbacks.checkpoint_best.filename='step-{step}'",
]


def metrics(run_dir: Path, key: str) -> dict[int, str]:
    """step -> value as written to the CSV (the text: compared exactly)."""
    return {int(row["step"]): row[key] for row in csv_rows(run_dir / "csv") if row.get(key)}


@pytest.mark.slow
@pytest.mark.parametrize("async_save", [False, True])
def test_two_rank_fsdp_run_resumes_with_the_uninterrupted_losses(start_train, tmp_path, async_save):
    """Both ways of writing the shards: at the save, or by a background process on each rank (async_save)."""
    start = lambda *args: start_train(*args, f"trainer.strategy.async_save={async_save}")  # noqa: E731
    whole = tmp_path / "whole"
    first = start(*RUN, f"hydra.run.dir={whole}")
    assert first.wait(timeout=300) == 0, first.read_output()[-3000:]
    assert sorted(metrics(whole, "train/loss")) == list(range(8))
    assert sorted(metrics(whole, "val/bpb")) == [2, 5]  # Lightning's row step: the last batch index

    saved = whole / "checkpoints" / "step-4.ckpt"
    assert saved.is_symlink() and saved.is_dir()  # a folder of shards, published by replacing the link
    shards = FileSystemReader(str(saved)).read_metadata().storage_data.items()
    holding_wte = {item.relative_path for index, item in shards if index.fqn == "state_dict.model.wte.weight"}
    assert len(holding_wte) == 2  # each rank wrote its own half of the embedding: no file holds the whole state
    checkpoint = reader.load(saved, with_optimizer=True)  # the one reader joins the shards
    vocab, width = checkpoint["hyper_parameters"]["model"]["vocab_size"], 64
    assert checkpoint["state_dict"]["model.wte.weight"].shape == (vocab, width)
    assert checkpoint["optimizer_0"]["state"]["model.wte.weight"]["exp_avg"].shape == (vocab, width)
    assert checkpoint["global_step"] == 4 and checkpoint["world_size"] == 2

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    copy_checkpoint(saved, resumed / "checkpoints")  # as if the run had stopped after step 4
    second = start(*RUN, f"hydra.run.dir={resumed}")
    assert second.wait(timeout=300) == 0, second.read_output()[-3000:]
    assert "resuming" in second.read_output()
    after = metrics(resumed, "train/loss")
    assert sorted(after) == list(range(4, 8)), "a step was skipped or repeated"
    assert after == {step: loss for step, loss in metrics(whole, "train/loss").items() if step >= 4}
    assert metrics(resumed, "val/bpb") == {5: metrics(whole, "val/bpb")[5]}  # the same data position on both ranks

    one_rank = tmp_path / "one-rank"  # the same checkpoint on 1 rank: DCP reshards weights and optimizer state
    (one_rank / "checkpoints").mkdir(parents=True)
    copy_checkpoint(saved, one_rank / "checkpoints")
    dump = tmp_path / "restored.pt"
    probe = ["+callbacks.dump._target_=tests.fsdp_probes.DumpRestoredState", f"+callbacks.dump.path={dump}"]
    third = start(*RUN, "trainer.devices=1", "trainer.max_steps=5", *probe, f"hydra.run.dir={one_rank}")
    assert third.wait(timeout=300) == 0, third.read_output()[-3000:]
    assert "resuming a checkpoint of 2 ranks on 1" in third.read_output()
    restored = torch.load(dump, weights_only=True)
    assert_equal(restored["state_dict"], checkpoint["state_dict"])
    assert_equal(restored["optimizer_0"], checkpoint["optimizer_0"])


def copy_checkpoint(saved: Path, directory: Path) -> None:
    """A sharded checkpoint as last.ckpt of another run: its folder, and the link to it."""
    shutil.copytree(saved.resolve(), directory / "last.ckpt.shards-0")
    (directory / "last.ckpt").symlink_to("last.ckpt.shards-0")


def assert_equal(a, b, where="") -> None:
    """Nested dicts / lists of tensors and numbers, equal bit for bit."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_equal(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, torch.as_tensor(b)), where
    else:
        assert a == b, where


SLOW_SHARDED_WRITES = """
import time
import torch.distributed.checkpoint as dcp
real_save, calls = dcp.save, []
def save(*args, **kwargs):
    real_save(*args, **kwargs)
    calls.append(1)
    if len(calls) >= 2:
        time.sleep(600)  # the shards of step 8 written, not yet published: the test kills every rank here
dcp.save = save
"""


@pytest.mark.slow
def test_a_kill_during_a_sharded_write_resumes_from_the_previous_published_checkpoint(start_train, tmp_path):
    """Issue 23 under trainer=fsdp: every rank SIGKILLed while the shards of step 8 are written (the job killed, a
    node lost): last.ckpt still links the complete folder of step 4, and the same command resumes from it."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SLOW_SHARDED_WRITES)
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    run = [*FSDP_RUN, "callbacks.checkpoint_best=null", f"hydra.run.dir={run_dir}"]
    first = start_train(*run, env={"PYTHONPATH": str(site)})
    partial = lambda: list(last.parent.glob("last.ckpt.tmp.*"))  # noqa: E731
    deadline = time.monotonic() + 300
    while not (last.is_symlink() and partial() and (partial()[0] / ".metadata").exists()):
        assert first.poll() is None and time.monotonic() < deadline, first.read_output()[-3000:]
        time.sleep(0.05)
    published = last.resolve()
    for pid in process_tree(first.pid):
        os.kill(pid, signal.SIGKILL)
    first.wait(timeout=60)
    assert last.resolve() == published and reader.saved_step(last) == 4
    assert reader.find_resumable([str(last.parent)]) == str(last)

    second = start_train(*run)
    assert second.wait(timeout=300) == 0, second.read_output()[-3000:]
    assert f"resuming {last}" in second.read_output()
    assert sorted(metrics(run_dir, "train/loss")) == list(range(8)), "a step was skipped or repeated"
    assert reader.saved_step(last) == 8 and not partial() and not published.exists()


FILE_SIZE_LIMIT = """
import resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing the process
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
"""


@pytest.mark.slow
@pytest.mark.parametrize("async_save", [False, True])
def test_a_full_disk_during_a_sharded_write_stops_the_run_in_one_line_and_keeps_the_last_good_checkpoint(
    start_train, tmp_path, async_save
):
    """A file size limit makes every rank's shard write fail as a full disk does (in the background writer processes
    too: they read the same sitecustomize)."""
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    run = [
        *FSDP_RUN,
        "callbacks.checkpoint_best=null",
        "callbacks.checkpoint_last.every_n_train_steps=2",
        f"trainer.strategy.async_save={async_save}",
    ]
    first = start_train(*run, "trainer.max_steps=2", f"hydra.run.dir={run_dir}")
    assert first.wait(timeout=300) == 0, first.read_output()[-3000:]
    published = last.resolve()
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FILE_SIZE_LIMIT)
    full = start_train(*run, "trainer.max_steps=4", f"hydra.run.dir={run_dir}", env={"PYTHONPATH": str(site)})
    # Both ranks fail at once: when rank 1 exits first, Lightning's launcher in rank 0 kills rank 0 (after its line;
    # under async_save its writer process's pipe then breaks with a traceback).
    assert full.wait(timeout=300) in (1, -signal.SIGKILL), full.read_output()[-3000:]
    output = full.read_output()
    error = f"could not write checkpoint {last} (the disk is full or over quota); the previous one is untouched"
    assert error in output  # on each rank: DCP raises every rank's failure on every rank
    assert "GB free on its filesystem" in output and (async_save or "Traceback" not in output)
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt", published.name]  # no partial folder
    assert last.resolve() == published and reader.saved_step(last) == 2
    assert reader.find_resumable([str(last.parent)]) == str(last)


@pytest.mark.slow
def test_sigterm_to_every_process_of_a_background_writing_run_saves_its_step_and_resumes(start_train, tmp_path):
    """scancel under async_save: SIGTERM reaches both ranks and their writer processes once step 4's checkpoint is
    published. The ranks finish their step and write last.ckpt themselves (a write in flight whose writers the signal
    ended is left unpublished), exit 143, and the same command resumes with the uninterrupted run's losses, every step
    once."""
    # 16 steps: step 4's write is published before step 8's save at the latest, so the signal lands mid-run
    run = [*FSDP_RUN, "callbacks.checkpoint_best=null", "trainer.strategy.async_save=true", "trainer.max_steps=16"]
    whole = tmp_path / "whole"
    uninterrupted = start_train(*run, f"hydra.run.dir={whole}")
    assert uninterrupted.wait(timeout=300) == 0, uninterrupted.read_output()[-3000:]
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    first = start_train(*run, f"hydra.run.dir={run_dir}")
    deadline = time.monotonic() + 300
    while not last.is_symlink():  # step 4's shards written in the background and published
        assert first.poll() is None and time.monotonic() < deadline, first.read_output()[-3000:]
        time.sleep(0.05)
    writers = process_tree(first.pid)
    assert len(writers) >= 4, "two ranks and a writer process each"
    for pid in writers:
        os.kill(pid, signal.SIGTERM)
    assert first.wait(timeout=300) == 128 + signal.SIGTERM, first.read_output()[-3000:]
    stopped_at = reader.saved_step(last)
    assert 4 <= stopped_at < 16, first.read_output()[-3000:]
    # rows to the stop; a write of that step in flight when the signal killed the writers is not published
    assert set(range(stopped_at)) <= set(metrics(run_dir, "train/loss"))

    second = start_train(*run, f"hydra.run.dir={run_dir}")
    assert second.wait(timeout=300) == 0, second.read_output()[-3000:]
    assert f"resuming {last}" in second.read_output()
    assert sorted(metrics(run_dir, "train/loss")) == list(range(16)), "a step was skipped or repeated"
    assert metrics(run_dir, "train/loss") == metrics(whole, "train/loss")
    assert reader.saved_step(last) == 16 and not list(last.parent.glob("*.tmp.*"))
