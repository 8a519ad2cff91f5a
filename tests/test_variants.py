"""The variant registry: every variant has its config file, and a fourth one registered from outside the library
(one Variant and one conf/attention file, as docs/variants.md shows) builds, trains through train.py and is
evaluated by eval.py.

`python tests/test_variants.py SCRIPT ARGS...` runs SCRIPT (train.py, eval.py) with the toy variant registered:
the way a test's variant reaches a subprocess.
"""

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml
from helpers import csv_metrics

from model.attention import VARIANTS, Variant
from model.balance import aux_loss, importance
from model.gpt import GPT, GPTConfig

ROOT = Path(__file__).parents[1]

# The toy: every head's output scaled by sigmoid(c_h), one learned logit per layer and head, the same for all tokens.
STATIC = Variant(
    gate=lambda layer, x, q, k, lse: torch.sigmoid(layer.head_logit).view(1, -1, 1).expand(x.size(0), -1, x.size(1)),
    needs_lse=False,
    parameters={"head_logit": lambda C, H: nn.Parameter(torch.zeros(H))},
)
STATIC_CONFIG = "# sigmoid(c_h): one learned logit per layer and head\nname: static\nbackend: auto\n"


def test_every_variant_has_its_config_file():
    files = {path.stem: yaml.safe_load(path.read_text()) for path in (ROOT / "conf" / "attention").glob("*.yaml")}
    assert sorted(files) == sorted(VARIANTS)
    assert all(cfg["name"] == name for name, cfg in files.items())


def static_model(monkeypatch, backend: str = "reference") -> GPT:
    monkeypatch.setitem(VARIANTS, "static", STATIC)
    torch.manual_seed(0)
    shape = dict(vocab_size=64, n_layer=2, n_embd=32, n_head=4, seq_len=16)
    return GPT(GPTConfig(**shape, attention="static", backend=backend))


def test_a_registered_variant_has_its_parameters_gates_and_gradients(monkeypatch):
    model = static_model(monkeypatch)
    assert [key for key in model.state_dict() if "head_logit" in key] == [f"blocks.{i}.attn.head_logit" for i in (0, 1)]
    with torch.no_grad():
        for block in model.blocks:
            block.attn.head_logit.normal_()
            block.attn.c_proj.weight.normal_()  # the heads' outputs reach the logits, so the gate's use is tested
    idx = torch.randint(0, 64, (2, 16))
    logits, gates = model(idx)
    expected = torch.stack([torch.sigmoid(block.attn.head_logit) for block in model.blocks])  # (L, H)
    torch.testing.assert_close(importance(gates), expected)
    aux_loss(importance(gates), 1.0).backward()
    assert all(block.attn.head_logit.grad.abs().sum() > 0 for block in model.blocks)
    with torch.no_grad():  # the gate is applied: every head at 0 leaves the attention blocks without output
        for block in model.blocks:
            block.attn.head_logit.fill_(-1e4)
        assert not torch.allclose(model(idx)[0], logits)


def test_a_variant_that_needs_no_lse_may_use_sdpa(monkeypatch):
    reference, sdpa = static_model(monkeypatch), static_model(monkeypatch, backend="sdpa")
    idx = torch.randint(0, 64, (2, 16))
    for ours, theirs in zip(reference(idx), sdpa(idx), strict=True):
        torch.testing.assert_close(ours, theirs)


def run_with_static(*args: str) -> str:
    """`python SCRIPT ARGS` (train.py or eval.py) in the repository, with the toy variant registered."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "SINKAWARE_CACHE_DIR": str(ROOT / ".cache"),
        "WANDB_MODE": "disabled",
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run([sys.executable, __file__, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    return output


@pytest.mark.slow
def test_a_fourth_variant_trains_through_train_py_and_is_evaluated_by_eval_py(tmp_path):
    (tmp_path / "conf" / "attention").mkdir(parents=True)
    (tmp_path / "conf" / "attention" / "static.yaml").write_text(STATIC_CONFIG)
    run = tmp_path / "run"
    run_with_static(
        "train.py",
        f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
        "attention=static",
        "aux.lambda=1e-2",
        "model.n_layer=2",
        "model.n_embd=64",
        "model.seq_len=64",
        "data.batch_size=2",
        "trainer.max_steps=6",
        "trainer.log_every_n_steps=2",
        "trainer.limit_val_batches=2",
        "logger=csv",
        f"hydra.run.dir={run}",
    )
    logged = csv_metrics(run)["heads/importance/L01/H03"]
    assert logged and all(0 < value < 1 for value in logged)

    checkpoint = run / "checkpoints" / "last.ckpt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    head_logits = torch.stack([state[f"model.blocks.{i}.attn.head_logit"] for i in (0, 1)])
    assert head_logits.abs().min() > 0  # trained: every logit moved from its start at 0

    evaluated = tmp_path / "eval"
    run_with_static("eval.py", f"ckpt={checkpoint}", "samples=4", "ablation.samples=0", f"hydra.run.dir={evaluated}")
    report = json.loads((evaluated / "report.json").read_text())
    torch.testing.assert_close(torch.tensor(report["importance"]), torch.sigmoid(head_logits))


if __name__ == "__main__":
    VARIANTS["static"] = STATIC
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
