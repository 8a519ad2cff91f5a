"""Shared fixtures: train.py as a real subprocess, on the CPU, offline, with a model smaller than `tiny`."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
TINY = ["model.n_layer=2", "model.n_embd=64", "model.seq_len=64", "data.batch_size=2", "trainer.limit_val_batches=2"]


@pytest.fixture(scope="module")
def start_train(tmp_path_factory):
    """start_train(*overrides, cwd=ROOT, env={}) -> a running `python train.py` (tiny shapes, offline W&B unless
    WANDB_MODE is given) whose stdout and stderr go to `.output` (a file); read it with `.read_output()`."""
    logs, count = tmp_path_factory.mktemp("train-logs"), 0

    def start(*overrides: str, cwd: Path = ROOT, env: dict | None = None) -> subprocess.Popen:
        nonlocal count
        count += 1
        flags = [arg for arg in overrides if arg.startswith("-")]  # e.g. -m: before the overrides, as argparse wants
        overrides = [arg for arg in overrides if not arg.startswith("-")]
        output = logs / f"train-{count}.log"
        full_env = {
            **os.environ,
            "SINKAWARE_CACHE_DIR": str(ROOT / ".cache"),  # the offline corpus, built once and shared
            "WANDB_MODE": "disabled",
            "OMP_NUM_THREADS": "1",  # the same arithmetic in every process, and no oversubscribed cores
            **(env or {}),
        }
        with open(output, "w") as out:
            process = subprocess.Popen(
                [sys.executable, str(ROOT / "train.py"), *flags, *TINY, *overrides],
                cwd=cwd,
                env=full_env,
                stdout=out,
                stderr=out,
            )
        process.output = output
        process.read_output = output.read_text
        return process

    return start
