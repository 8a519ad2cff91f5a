"""A failure on any rank ends the whole DDP job quickly, with the error in the output and a non-zero exit status:
2 gloo ranks on the CPU through train.py, one of them raising mid-training while the other blocks."""

import time

import psutil
import pytest

DDP = ["trainer.devices=2", "+trainer.strategy=ddp", "trainer.limit_val_batches=0", "logger=csv"]


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("failing_rank", [0, 1])  # 0: the process that launched the others
def test_a_failing_rank_ends_every_rank_within_60_s(start_train, tmp_path, failing_rank):
    started = time.monotonic()
    job = start_train(
        *DDP,
        f"hydra.run.dir={tmp_path}",
        "trainer.max_steps=50",
        "+callbacks.fail._target_=tests.ddp_probes.FailOnRank",
        f"+callbacks.fail.rank={failing_rank}",
        "+callbacks.fail.step=5",
        f"+callbacks.fail.out_dir={tmp_path}",
    )
    (blocked,) = [f"rank{r}.pid" for r in (0, 1) if r != failing_rank]
    try:
        code = job.wait(timeout=60)
        while (tmp_path / blocked).exists() and running(int((tmp_path / blocked).read_text())):
            assert time.monotonic() - started < 60, "the job's launcher ended, but the other rank still runs"
            time.sleep(0.5)
    finally:  # a hung rank of a failed test must not outlive it
        for pid in [job.pid] + [int(p.read_text()) for p in tmp_path.glob("rank*.pid")]:
            if running(pid):
                psutil.Process(pid).kill()
    output = job.read_output()
    assert (tmp_path / blocked).exists(), output[-3000:]  # the other rank did reach the step, and block there
    assert code != 0
    assert f"injected failure on rank {failing_rank} at step 5" in output


@pytest.mark.slow
def test_no_rank_waits_on_a_broadcast_at_every_step(start_train, tmp_path):
    """On GPUs a broadcast over the training process group (NCCL) read back on the host makes every rank wait for its
    queued work; Lightning's loop made one per step for its SIGTERM flag. LastCheckpoint carries the flag itself."""
    job = start_train(
        *DDP,
        f"hydra.run.dir={tmp_path}",
        "trainer.max_steps=12",
        "+callbacks.count._target_=tests.ddp_probes.CountBroadcasts",
        f"+callbacks.count.out_dir={tmp_path}",
    )
    assert job.wait(timeout=300) == 0, job.read_output()[-3000:]
    counts = [int((tmp_path / f"broadcasts_rank{rank}.txt").read_text()) for rank in (0, 1)]
    assert max(counts) < 3, f"{counts} broadcasts in 12 steps"
