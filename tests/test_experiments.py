"""conf/experiment/: every named run composes, and its numbers are the ones its comments and docs/study.md state."""

from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from callbacks.head_balance import HeadBalanceMonitor

ROOT = Path(__file__).parents[1]
EXPERIMENTS = sorted(
    str(p.relative_to(ROOT / "conf" / "experiment").with_suffix(""))
    for p in (ROOT / "conf" / "experiment").rglob("*.yaml")
    if p.name != "base.yaml"
)
STUDY = [e for e in EXPERIMENTS if e.startswith("study/")]
PAPER = [e for e in EXPERIMENTS if e.startswith("paper/")]


def composed(experiment: str, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[f"experiment={experiment}", *overrides])


def test_the_experiments_are_there():
    assert len(STUDY) == 12 and len(PAPER) == 3, EXPERIMENTS


@pytest.mark.parametrize("experiment", STUDY)
def test_study_runs_share_everything_but_variant_lambda_and_seed(experiment):
    cfg = composed(experiment)
    base = composed("study/vanilla")
    tokens = cfg.trainer.max_steps * cfg.data.batch_size * cfg.model.seq_len
    if "finetune" in experiment:
        init_from = OmegaConf.to_container(cfg, resolve=False)["init_from"]  # ${hydra:runtime.cwd}/outputs/...
        assert init_from.endswith(f"/outputs/{base.run}/checkpoints/last.ckpt")
        assert cfg.aux["lambda"] == 1e-2 and cfg.optim.lr == 3e-4
    else:
        assert tokens >= 60_000_000  # the floor for the curves to flatten
        assert cfg.run == f"study/{cfg.attention.name}_lambda{cfg.aux['lambda']}_seed{cfg.seed}"
    assert cfg.seed == (2 if "seed2" in experiment else 1337)  # same seed, same data order, unless stated
    for key in ("model", "optim.betas", "data.corpus", "data.tokenizer.vocab_size", "data.batch_size"):
        node, base_node = cfg, base
        for part in key.split("."):
            node, base_node = node[part], base_node[part]
        if key == "model":
            node, base_node = {**node, "attention": None}, {**base_node, "attention": None}
        assert node == base_node, key


@pytest.mark.parametrize("experiment", PAPER)
def test_paper_runs_state_batch_and_budget(experiment):
    cfg = composed(experiment, "attention=gated", "aux.lambda=1e-4")
    gpus_per_node = 8  # the sweep command in each file's header
    step_tokens = (
        gpus_per_node * cfg.trainer.num_nodes * cfg.data.batch_size * cfg.trainer.accumulate_grad_batches
        * cfg.model.seq_len
    )  # fmt: skip
    assert step_tokens == 2**20
    params = {"paper/0.6b": 0.56e9, "paper/1b": 1.08e9, "paper/2b": 1.88e9}[experiment]  # docs/architecture.md
    assert 19 <= cfg.trainer.max_steps * step_tokens / params <= 23  # ~20 tokens per parameter
    assert cfg.data.tokenizer.vocab_size == 65536 and cfg.data.corpus.path == "HuggingFaceFW/fineweb-edu"
    assert cfg.run == "paper/" + experiment.split("/")[1] + "_gated_lambda0.0001"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_a_heatmap_is_drawn_with_each_validation(experiment):
    """The heatmap's cadence counts optimizer steps, Lightning's val_check_interval counts micro-batches (the
    trainer's val_check_batch: tests/test_observability.py runs one)."""
    cfg = composed(experiment)
    accumulate = cfg.trainer.get("accumulate_grad_batches", 1)
    trainer = SimpleNamespace(val_check_batch=cfg.trainer.val_check_interval, accumulate_grad_batches=accumulate)
    every = HeadBalanceMonitor(cfg.callbacks.head_balance.heatmap_every_n_steps).heatmap_every(trainer)
    assert every * accumulate == cfg.trainer.val_check_interval
