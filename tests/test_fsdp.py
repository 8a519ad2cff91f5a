"""trainer=fsdp: the data-parallel mesh spans every device (devices=auto included), and a 2-rank FSDP2 run on the
CPU (gloo) trains, validates, writes one full-state checkpoint file and resumes from it with the uninterrupted
run's losses, bit for bit."""

import shutil
from pathlib import Path

import lightning.pytorch.strategies.model_parallel as model_parallel
import pytest
import torch
from helpers import csv_rows
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.plugins.environments import LightningEnvironment

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


RUN = [
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
def test_two_rank_fsdp_run_resumes_with_the_uninterrupted_losses(start_train, tmp_path):
    whole = tmp_path / "whole"
    first = start_train(*RUN, f"hydra.run.dir={whole}")
    assert first.wait(timeout=300) == 0, first.read_output()[-3000:]
    assert sorted(metrics(whole, "train/loss")) == list(range(8))
    assert sorted(metrics(whole, "val/bpb")) == [2, 5]  # Lightning's row step: the last batch index

    saved = whole / "checkpoints" / "step-4.ckpt"
    assert saved.is_file()  # one file, not a folder of shards
    checkpoint = torch.load(saved, map_location="cpu", weights_only=True)
    vocab, width = checkpoint["hyper_parameters"]["model"]["vocab_size"], 64
    assert checkpoint["state_dict"]["model.wte.weight"].shape == (vocab, width)  # gathered, not rank 0's half
    moments = [state["exp_avg"].shape for state in checkpoint["optimizer_states"][0]["state"].values()]
    assert (vocab, width) in moments  # the full AdamW state too
    assert checkpoint["global_step"] == 4

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(saved, resumed / "checkpoints" / "last.ckpt")  # as if the run had stopped after step 4
    second = start_train(*RUN, f"hydra.run.dir={resumed}")
    assert second.wait(timeout=300) == 0, second.read_output()[-3000:]
    assert "resuming" in second.read_output()
    after = metrics(resumed, "train/loss")
    assert sorted(after) == list(range(4, 8)), "a step was skipped or repeated"
    assert after == {step: loss for step, loss in metrics(whole, "train/loss").items() if step >= 4}
    assert metrics(resumed, "val/bpb") == {5: metrics(whole, "val/bpb")[5]}  # the same data position on both ranks
