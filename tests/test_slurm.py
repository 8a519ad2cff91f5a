"""SLURM requeue, simulated: SLURM_* variables as srun sets them and a stub `scontrol` on PATH that records its
arguments. SIGUSR1 (sbatch --signal=SIGUSR1@120) -> checkpoint at the end of the step + `scontrol requeue <job>`;
the requeued job (same job id, hence the same run directory) resumes from that checkpoint."""

import os
import signal
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from callbacks.checkpoint import LastCheckpoint

ROOT = Path(__file__).parents[1]

STEPS = 12
RUN = ["logger=csv", f"trainer.max_steps={STEPS}", "callbacks.checkpoint_last.every_n_train_steps=3"]


def slurm_env(tmp_path, job_id: str) -> dict:
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    scontrol = stubs / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.calls"}\n')
    scontrol.chmod(0o755)
    return {
        "PATH": f"{stubs}:{os.environ['PATH']}",
        "SLURM_JOB_ID": job_id,
        "SLURM_JOB_NAME": "train",  # Lightning ignores jobs named bash / interactive
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "localhost",
    }


@pytest.mark.slow
def test_sigusr1_checkpoints_requeues_and_the_next_start_resumes(start_train, tmp_path):
    env = slurm_env(tmp_path, job_id="4242")
    run_dir = tmp_path / "outputs" / "4242"  # named after the job id: a requeued job finds it again
    last = run_dir / "checkpoints" / "last.ckpt"
    job = start_train(*RUN, cwd=tmp_path, env=env)
    deadline = time.monotonic() + 300
    while not last.exists():
        assert job.poll() is None and time.monotonic() < deadline, job.read_output()[-3000:]
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)
    assert job.wait(timeout=300) == 0, job.read_output()[-3000:]
    assert (tmp_path / "scontrol.calls").read_text() == "requeue 4242\n"
    stopped_at = torch.load(last, weights_only=True, mmap=True)["global_step"]
    assert 3 <= stopped_at < STEPS
    assert f"SIGUSR1: saved {last} at step {stopped_at}" in job.read_output()

    requeued = start_train(*RUN, cwd=tmp_path, env=env)
    assert requeued.wait(timeout=600) == 0, requeued.read_output()[-3000:]
    assert f"resuming {last}" in requeued.read_output()
    assert torch.load(last, weights_only=True, mmap=True)["global_step"] == STEPS
    assert (tmp_path / "scontrol.calls").read_text() == "requeue 4242\n"  # no second requeue


class FakeTrainer:
    is_global_zero = True


def test_an_array_task_is_requeued_by_its_array_id(tmp_path, monkeypatch):
    for key, value in slurm_env(tmp_path, job_id="777").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "700")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    LastCheckpoint(str(tmp_path), 10, ["SIGUSR1"]).requeue(FakeTrainer(), signal.SIGUSR1)
    assert (tmp_path / "scontrol.calls").read_text() == "requeue 700_3\n"


def test_the_launchers_own_handler_takes_over_the_requeue(tmp_path, monkeypatch):
    """Under hydra-submitit-launcher, submitit's SIGUSR2 handler resubmits the same Hydra job: it is called after
    the checkpoint instead of scontrol."""
    for key, value in slurm_env(tmp_path, job_id="777").items():
        monkeypatch.setenv(key, value)
    callback, called = LastCheckpoint(str(tmp_path), 10, ["SIGUSR2"]), []
    callback.previous_handlers = {signal.SIGUSR2: lambda signum, frame: called.append(signum)}
    callback.requeue(FakeTrainer(), signal.SIGUSR2)
    assert called == [signal.SIGUSR2] and not (tmp_path / "scontrol.calls").exists()


def test_a_bad_signal_name_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="'SIGFOO' is not a signal name"):
        LastCheckpoint(str(tmp_path), 10, ["SIGFOO"])


def test_the_slurm_launcher_config_follows_the_trainer():
    overrides = ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "trainer=gpu", "trainer.devices=4"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        launcher = compose("train", overrides=overrides, return_hydra_config=True).hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node) == ("gpu", 4, 4)
    assert launcher.max_num_timeout > 0 and launcher.signal_delay_s >= 60  # requeues on by default
