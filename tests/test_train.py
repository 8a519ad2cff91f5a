"""train.py end to end on the CPU: the documented commands work, bad overrides fail clearly."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
TINY = ["model.n_layer=2", "model.n_embd=64", "model.seq_len=64", "data.batch_size=4", "logger=csv"]


def run_train(tmp_path, *overrides, check=True):
    env = {**os.environ, "SINKAWARE_CACHE_DIR": str(ROOT / ".cache"), "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "train.py", *TINY, f"hydra.run.dir={tmp_path}", *overrides]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def metrics(run_dir: Path) -> dict[str, list[float]]:
    import csv

    rows = list(csv.DictReader(open(next(run_dir.rglob("metrics.csv")))))
    out: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            if value:
                out.setdefault(key, []).append(float(value))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["vanilla", "sink", "gated"])
def test_paper_setting_trains_and_learns(tmp_path, attention):
    """`python train.py attention=gated aux.lambda=1e-4` as typed (plus a tiny shape), loss falls."""
    run_train(
        tmp_path,
        f"attention={attention}",
        "aux.lambda=1e-4",
        "trainer.max_steps=40",
        "trainer.val_check_interval=40",
        "trainer.log_every_n_steps=5",
    )
    m = metrics(tmp_path)
    assert m["val/loss"][-1] < 0.75 * math.log(320), m["val/loss"]  # well below the uniform-prediction loss
    assert m["train/aux_loss"][-1] > 0  # the aux loss is on and measured


def test_typo_in_a_key_is_a_clear_hydra_error(tmp_path):
    result = run_train(tmp_path, "aux.lamda=1e-4", check=False)
    assert result.returncode != 0
    assert "Could not override 'aux.lamda'" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_choice_lists_the_available_ones(tmp_path):
    result = run_train(tmp_path, "attention=softmax", check=False)
    assert result.returncode != 0
    assert "Could not find 'attention/softmax'" in result.stderr and "gated" in result.stderr


def test_bad_value_names_the_key_without_a_traceback(tmp_path):
    result = run_train(tmp_path, "aux.scope=everywhere", check=False)
    output = result.stdout + result.stderr  # Hydra's job logging goes to stdout
    assert result.returncode == 1
    assert "aux.scope='everywhere'" in output and "global" in output
    assert "Traceback" not in output
