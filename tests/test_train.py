"""train.py end to end on the CPU: the documented commands work, bad overrides fail clearly."""

import math

import pytest
from helpers import csv_metrics

from model.attention import VARIANTS


def run_train(start_train, tmp_path, *overrides) -> tuple[int, str]:
    """`python train.py` (tiny shapes, see conftest) into tmp_path: exit code and console output."""
    process = start_train("logger=csv", f"hydra.run.dir={tmp_path}", *overrides)
    return process.wait(timeout=600), process.read_output()


@pytest.mark.slow
@pytest.mark.parametrize("attention", list(VARIANTS))
def test_paper_setting_trains_and_learns(start_train, tmp_path, attention):
    """`python train.py attention=gated aux.lambda=1e-4` as typed (plus a tiny shape), loss falls."""
    code, output = run_train(
        start_train,
        tmp_path,
        f"attention={attention}",
        "aux.lambda=1e-4",
        "trainer.max_steps=40",
        "trainer.val_check_interval=40",
        "trainer.log_every_n_steps=5",
    )
    assert code == 0, output[-3000:]
    m = csv_metrics(tmp_path)
    assert m["val/loss"][-1] < 0.75 * math.log(320), m["val/loss"]  # well below the uniform-prediction loss
    assert m["train/aux_loss"][-1] > 0  # the aux loss is on and measured


@pytest.mark.slow
def test_typo_in_a_key_is_a_clear_hydra_error(start_train, tmp_path):
    code, output = run_train(start_train, tmp_path, "aux.lamda=1e-4")
    assert code != 0
    assert "Could not override 'aux.lamda'" in output
    assert "Traceback" not in output


@pytest.mark.slow
def test_unknown_choice_lists_the_available_ones(start_train, tmp_path):
    code, output = run_train(start_train, tmp_path, "attention=softmax")
    assert code != 0
    assert "Could not find 'attention/softmax'" in output and "gated" in output


@pytest.mark.slow
def test_bad_value_names_the_key_without_a_traceback(start_train, tmp_path):
    code, output = run_train(start_train, tmp_path, "aux.scope=everywhere")
    assert code == 1
    assert "aux.scope='everywhere'" in output and "global" in output
    assert "Traceback" not in output


@pytest.mark.slow
def test_runs_with_our_checkpoint_callbacks_switched_off(start_train, tmp_path):
    """Lightning then adds its own ModelCheckpoint, whose directory is unknown until fit: not a resume source."""
    code, output = run_train(
        start_train,
        tmp_path,
        "callbacks.checkpoint_last=null",
        "callbacks.checkpoint_best=null",
        "trainer.max_steps=4",
        "trainer.limit_val_batches=0",
    )
    assert code == 0, output[-3000:]
    assert "a new run" in output
