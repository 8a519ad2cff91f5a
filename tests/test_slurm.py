"""SLURM on a real one-node cluster (scripts/slurm_local.sh; started here when it is not running, and stopped again):
sbatch with a time limit and a signal, the job's own requeue and its exact resume, Hydra's submitit launcher and its
SIGUSR2 requeue, scancel, and two DDP tasks requeued together. docs/slurm.md says which mechanism requeues where.

The jobs train a tiny model on the CPU. tests/slurm_probe.py records every step's loss and, in a job's first run,
sleeps 2 s per step (no number changes) so that the time-limit signal lands in the middle of training. SLURM sends
it up to ~30 s before the time asked for (limits are checked every 30 s) and starts a requeued job ~12 s after the
requeue. The `jobs` fixture submits everything at once, so the jobs run side by side (the node offers 8 CPUs), and
each test waits for its own: the module takes about 3 minutes."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY
from helpers import environ_outside_slurm
from hydra import compose, initialize_config_dir

from callbacks.checkpoint import LastCheckpoint
from checkpoints.reader import find_resumable

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "scripts" / "slurm_local.sh"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

STEPS = 60  # 2 s each in a first run: 120 s, longer than the wait for the signal
RUN = [*TINY, f"trainer.max_steps={STEPS}", "+callbacks.probe={_target_:tests.slurm_probe.StepProbe,first_run_sleep:2}"]
TIME_LIMIT = ["--time=3", "--signal=USR1@90"]  # the signal 60-90 s after the start: training has begun by then
LAUNCHER = [
    "hydra/launcher=slurm",
    "hydra.launcher.partition=debug",
    "hydra.launcher.gpus_per_node=null",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.timeout_min=3",
    "hydra.launcher.signal_delay_s=90",
    "hydra.job.config.override_dirname.exclude_keys=[run,sweep,trainer.max_steps,callbacks.probe]",
]
DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.devices=2"]
ENV = {
    **environ_outside_slurm(),
    "SINKAWARE_REPO": str(ROOT),  # scripts/train.sbatch: the code and .venv
    "PYTHONPATH": str(ROOT),  # submitit unpickles the job in the directory it was launched from
    "SINKAWARE_CACHE_DIR": str(ROOT / ".cache"),
    "WANDB_MODE": "offline",
    "OMP_NUM_THREADS": "1",
}


def sh(*args: str, **kwargs) -> str:
    return subprocess.run(args, capture_output=True, text=True, check=True, **kwargs).stdout.strip()


def cluster_running() -> bool:
    status = subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True, text=True).stdout
    return "slurmctld: running" in status and "slurmd: running" in status


@pytest.fixture(scope="module")
def cluster():
    """The local cluster: the one slurm_local.sh started before, or one started (and stopped) here."""
    started = False
    if not cluster_running():
        if os.geteuid() != 0:
            problem = "starting the local SLURM cluster needs root (bash scripts/slurm_local.sh start)"
        elif shutil.which("slurmctld") is None:
            problem = "SLURM is not installed: as root, `bash scripts/slurm_local.sh install`"
        else:
            started = True
            result = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=300)
            problem = f"`slurm_local.sh start` failed:\n{result.stderr[-6000:]}" if result.returncode else None
        if problem:
            if started:
                subprocess.run(["bash", str(SCRIPT), "stop"], timeout=300)
            (pytest.fail if IN_CI else pytest.skip)(problem)
    cpus = int(sh("sinfo", "-h", "-p", "debug", "-o", "%c"))
    assert cpus >= 6, f"the cluster offers {cpus} CPUs, the jobs need 6 at once: restart it with SLURM_LOCAL_CPUS=8"
    yield
    if started:
        subprocess.run(["bash", str(SCRIPT), "stop"], timeout=300)


def spawn(args: list, cwd: Path, log: str) -> subprocess.Popen:
    with open(cwd / log, "w") as out:
        process = subprocess.Popen(args, cwd=cwd, env=ENV, stdout=out, stderr=subprocess.STDOUT)
    process.read_output = (cwd / log).read_text
    return process


def train(*overrides: str, cwd: Path, log: str) -> subprocess.Popen:
    return spawn([sys.executable, str(ROOT / "train.py"), *overrides], cwd, log)


def sbatch(*options: str, overrides: list, cwd: Path) -> str:
    return sh("sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=1", *options,
              str(ROOT / "scripts" / "train.sbatch"), *overrides, cwd=cwd, env=ENV)  # fmt: skip


def wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(1)
    return True


def job_state(job: str) -> dict:
    """`scontrol show job` as a dict (JobState, Restarts, ...)."""
    fields = sh("scontrol", "-o", "show", "job", job).split()
    return dict(field.split("=", 1) for field in fields if "=" in field)


def wait_for_job(job: str, timeout: float = 480) -> dict:
    ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")
    assert wait_until(lambda: job_state(job)["JobState"] in ended, timeout), f"job {job} still {job_state(job)}"
    return job_state(job)


def accounting(job: str) -> list[str]:
    """The state of every run of the job from sacct (slurmdbd), e.g. REQUEUED, COMPLETED; it lags a second or two."""
    states = lambda: sh("sacct", "-n", "-X", "-D", "-P", "-j", job, "-o", "State").split()  # noqa: E731
    wait_until(lambda: states()[-1:] not in (["RUNNING"], []), 20)
    return states()


def probe(run_dir: Path, rank: int = 0) -> tuple[list, list]:
    """tests/slurm_probe.py's record: the starts as (step, job id, restart count), the steps as (step, loss)."""
    starts, steps = [], []
    for line in (run_dir / f"steps.{rank}").read_text().splitlines():
        kind, *rest = line.split()
        if kind == "start":
            starts.append((int(rest[0]), rest[1], rest[2]))
        else:
            steps.append((int(kind), rest[0]))
    return starts, steps


def saved_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"]


def one_dir(pattern: str, parent: Path) -> Path | None:
    found = [p for p in parent.glob(pattern) if p.is_dir()]
    return found[0] if len(found) == 1 else None


def requeued_once(run_dir: Path, rank: int = 0) -> int:
    """Checks the probe of a job that ran twice (the same job id, SLURM_RESTART_COUNT unset then 1), every step
    once; returns the step of the requeue."""
    starts, steps = probe(run_dir, rank)
    assert len(starts) == 2, f"expected a first run and one requeued run: {starts}"
    stopped, job = starts[1][0], starts[0][1]
    assert starts == [(0, job, "-"), (stopped, job, "1")]
    assert 0 < stopped < STEPS, "the signal did not interrupt training"
    assert [step for step, _ in steps] == list(range(1, STEPS + 1)), "a step was skipped or repeated"
    return stopped


@pytest.fixture(scope="module")
def jobs(cluster, tmp_path_factory):
    """Everything at once: the jobs with a time limit first; once they train (their signal handlers are in place),
    the job to scancel and the uninterrupted reference runs outside SLURM. Cancelled or killed at the end."""
    home = tmp_path_factory.mktemp("slurm")
    jobs = {
        "sbatch": sbatch("--ntasks-per-node=1", *TIME_LIMIT, overrides=["trainer=cpu", *RUN], cwd=home),
        "ddp": sbatch("--ntasks-per-node=2", *TIME_LIMIT, overrides=[*DDP, *RUN], cwd=home),
        "sweep": train("-m", *LAUNCHER, "attention=vanilla,gated", "sweep=ab", *RUN, cwd=home, log="sweep.log"),
        "home": home,
    }
    training = lambda: [*home.glob("outputs/*/steps.0"), *home.glob("multirun/ab/*/steps.0")]  # noqa: E731
    wait_until(lambda: len(training()) == 4, 150)
    until_cancelled = ["hydra.launcher.timeout_min=60", "trainer.max_steps=1000"]
    overrides = [*LAUNCHER, "sweep=cancel", *RUN, *until_cancelled, "callbacks.checkpoint_last.every_n_train_steps=2"]
    jobs["cancel"] = train("-m", *overrides, cwd=home, log="cancel.log")
    jobs["reference"] = train(*RUN, "run=reference", cwd=home, log="reference.log")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    jobs["reference-ddp"] = spawn([*torchrun, str(ROOT / "train.py"), *DDP, *RUN, "run=reference-ddp"], home, "ddp.log")
    yield jobs
    ids = {jobs["sbatch"], jobs["ddp"]} | {probe(p.parent)[0][0][1] for p in home.glob("multirun/*/*/steps.0")}
    subprocess.run(["scancel", *ids])
    for process in jobs.values():
        if isinstance(process, subprocess.Popen) and process.poll() is None:
            process.kill()


@pytest.fixture(scope="module")
def reference(jobs) -> dict:
    """[(step, loss)] of the uninterrupted runs outside SLURM: one process, and two DDP ranks under torchrun."""
    for name in ("reference", "reference-ddp"):
        assert jobs[name].wait(timeout=480) == 0, jobs[name].read_output()[-3000:]
    home = jobs["home"]
    return {
        "single": probe(home / "outputs" / "reference")[1],
        "ddp": [probe(home / "outputs" / "reference-ddp", rank)[1] for rank in (0, 1)],
    }


@pytest.mark.slow
def test_scancel_keeps_the_last_checkpoint_and_the_launcher_reports_the_cancelled_job(jobs):
    launcher, sweep_dir = jobs["cancel"], jobs["home"] / "multirun" / "cancel"
    job_dir = lambda: one_dir("0_*", sweep_dir)  # noqa: E731
    last = lambda: job_dir() and job_dir() / "checkpoints" / "last.ckpt"  # noqa: E731
    assert wait_until(lambda: last() and last().exists(), 240), launcher.read_output()[-3000:]
    job = probe(job_dir())[0][0][1]
    sh("scancel", job)
    try:
        returncode = launcher.wait(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the launcher still waits for cancelled job {job}")
    assert returncode != 0 and "CANCELLED" in launcher.read_output(), launcher.read_output()[-3000:]
    assert wait_for_job(job)["JobState"] == "CANCELLED"
    assert find_resumable([str(last().parent)]) == str(last())  # read in full, CRCs checked
    assert not list(last().parent.glob("*.tmp"))
    steps = probe(job_dir())[1]
    assert saved_step(last()) == steps[-1][0], "SIGTERM: not saved at the end of the step in progress"


@pytest.mark.slow
def test_sbatch_job_checkpoints_at_its_signal_requeues_itself_and_resumes_exactly(jobs, reference):
    job, home = jobs["sbatch"], jobs["home"]
    state = wait_for_job(job)
    log = (home / f"slurm-{job}.out").read_text()  # --open-mode=append: both runs
    assert (state["JobState"], state["Restarts"]) == ("COMPLETED", "1"), log[-3000:]
    run_dir = home / "outputs" / job  # named after the job id, which the requeue keeps
    stopped = requeued_once(run_dir)  # the same SLURM_JOB_ID, SLURM_RESTART_COUNT=1, resumed at the saved step
    last = run_dir / "checkpoints" / "last.ckpt"
    assert f"SIGUSR1: saved {last} at step {stopped}" in log and f"requeued SLURM job {job};" in log
    assert f"resuming {last}" in log
    assert probe(run_dir)[1] == reference["single"], "the resumed losses differ from the uninterrupted run's"
    assert saved_step(last) == STEPS
    assert accounting(job) == ["REQUEUED", "COMPLETED"]
    runs = [p.name for p in (run_dir / "wandb").glob("offline-run-*")]  # offline, W&B keeps a folder per start
    assert len(runs) == 2 and {name.rsplit("-", 1)[1] for name in runs} == {(run_dir / "wandb_id").read_text()}


@pytest.mark.slow
def test_two_ddp_tasks_are_requeued_together_and_resume_at_the_same_step(jobs, reference):
    job, home = jobs["ddp"], jobs["home"]
    state = wait_for_job(job)
    assert (state["JobState"], state["Restarts"]) == ("COMPLETED", "1"), (home / f"slurm-{job}.out").read_text()[-3000:]
    run_dir = home / "outputs" / job
    assert requeued_once(run_dir, rank=0) == requeued_once(run_dir, rank=1)
    for rank in (0, 1):
        assert probe(run_dir, rank)[1] == reference["ddp"][rank], f"rank {rank}'s losses differ from torchrun's"
    assert saved_step(run_dir / "checkpoints" / "last.ckpt") == STEPS


@pytest.mark.slow
def test_hydra_submitit_sweep_runs_both_jobs_and_requeues_them_through_submitit(jobs, reference):
    launcher, sweep_dir = jobs["sweep"], jobs["home"] / "multirun" / "ab"
    assert launcher.wait(timeout=480) == 0, launcher.read_output()[-3000:]
    job_dirs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name.split(",")[0] for p in job_dirs] == ["0_attention=vanilla", "1_attention=gated"]
    wandb_ids = set()
    for job_dir in job_dirs:
        requeued_once(job_dir)  # timed out, requeued, resumed in the same directory
        assert saved_step(job_dir / "checkpoints" / "last.ckpt") == STEPS
        wandb_ids.add((job_dir / "wandb_id").read_text())
        runs = [p.name for p in (job_dir / "wandb").glob("offline-run-*")]
        assert len(runs) == 2 and {name.rsplit("-", 1)[1] for name in runs} == {(job_dir / "wandb_id").read_text()}
    assert len(wandb_ids) == 2, "each job has its own W&B run"
    assert probe(job_dirs[0])[1] == reference["single"]  # the vanilla job is the reference's config
    logs = [p.read_text() for p in sweep_dir.glob(".submitit/*/*_0_log.out")]
    assert len(logs) == 2 and all("Caught signal SIGUSR2" in log and "Requeued job" in log for log in logs)
    (script,) = {p.read_text() for p in sweep_dir.glob(".submitit/*/*_submission.sh")}  # one script per array
    assert "export SLURM_KILL_BAD_EXIT=1" in script.split("srun")[0]  # srun ends every task when one fails


class FakeTrainer:
    is_global_zero = True


def test_an_array_task_is_requeued_by_its_array_id(tmp_path, monkeypatch):
    """`sbatch --array` (not run on the cluster above): the task is requeued as <array job>_<task>."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "calls"}\n')
    (stubs / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{stubs}:{os.environ['PATH']}")
    for key, value in {"SLURM_JOB_ID": "777", "SLURM_ARRAY_JOB_ID": "700", "SLURM_ARRAY_TASK_ID": "3"}.items():
        monkeypatch.setenv(key, value)
    LastCheckpoint(str(tmp_path), 10, ["SIGUSR1"]).requeue(FakeTrainer(), signal.SIGUSR1)
    assert (tmp_path / "calls").read_text() == "requeue 700_3\n"


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
