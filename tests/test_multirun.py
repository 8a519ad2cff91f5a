"""`python train.py -m attention=...`: one directory, one checkpoint and one W&B run per job; the same sweep name
again resumes every job."""

import pytest
import torch


@pytest.mark.slow
def test_two_job_sweep_has_two_run_dirs_with_checkpoints_and_wandb_runs(start_train, tmp_path):
    sweep = ["-m", "attention=vanilla,gated", "sweep=ab", "trainer.max_steps=3"]
    process = start_train(*sweep, cwd=tmp_path, env={"WANDB_MODE": "offline"})
    assert process.wait(timeout=600) == 0, process.read_output()[-3000:]
    sweep_dir = tmp_path / "multirun" / "ab"
    job_dirs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name.split(",")[0] for p in job_dirs] == ["0_attention=vanilla", "1_attention=gated"]
    ids = []
    for job_dir in job_dirs:
        last = job_dir / "checkpoints" / "last.ckpt"
        assert torch.load(last, weights_only=True, mmap=True)["global_step"] == 3
        ids.append((job_dir / "wandb_id").read_text())
        assert len(list((job_dir / "wandb").glob(f"offline-run-*-{ids[-1]}"))) == 1  # its own W&B run, its own id
    assert ids[0] != ids[1]

    again = start_train(*sweep[:-1], "trainer.max_steps=4", cwd=tmp_path, env={"WANDB_MODE": "offline"})  # longer
    assert again.wait(timeout=600) == 0, again.read_output()[-3000:]
    for job_dir, run_id in zip(job_dirs, ids, strict=True):
        assert f"resuming {job_dir / 'checkpoints' / 'last.ckpt'}" in again.read_output()
        assert torch.load(job_dir / "checkpoints" / "last.ckpt", weights_only=True, mmap=True)["global_step"] == 4
        assert (job_dir / "wandb_id").read_text() == run_id  # the W&B run continues
