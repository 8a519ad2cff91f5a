"""Helpers shared by the tests: a quiet CPU Trainer, the environment outside SLURM, and the metrics a CSV logger
wrote."""

import csv
import os
from pathlib import Path

import lightning as L

QUIET_CPU = {"accelerator": "cpu", "logger": False, "enable_progress_bar": False, "enable_model_summary": False}


def quiet_trainer(**options) -> L.Trainer:
    """A Lightning Trainer on the CPU with no logger, progress bar or model summary (a test's output stays its own);
    `options` add to or replace these."""
    return L.Trainer(**{**QUIET_CPU, **options})


def environ_outside_slurm() -> dict[str, str]:
    """os.environ without SLURM_*: a process that a test starts must not take the SLURM job the tests may run in
    for its own (and requeue or cancel it)."""
    return {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}


def csv_rows(run_dir: Path) -> list[dict[str, str]]:
    """The rows of the one metrics.csv under run_dir, values as written (text: compared exactly)."""
    with open(next(run_dir.rglob("metrics.csv"))) as file:
        return list(csv.DictReader(file))


def csv_metrics(run_dir: Path) -> dict[str, list[float]]:
    """metric -> its logged values in order (empty cells: rows of other metrics, left out)."""
    out: dict[str, list[float]] = {}
    for row in csv_rows(run_dir):
        for key, value in row.items():
            if value:
                out.setdefault(key, []).append(float(value))
    return out


def process_tree(pid: int) -> list[int]:
    """pid and its descendants (Lightning starts the other ranks from rank 0; writer processes hang below them)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid, *(p for child in children for p in process_tree(int(child)))]
