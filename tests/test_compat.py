"""compat.py's private names of Lightning, torchdata and torch.distributed.checkpoint still do what the project relies
on: each test fails on the release that moves one, before a run fails (or silently stops saving) in the middle."""

import torch
import torch.distributed.checkpoint as dcp
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.strategies import ModelParallelStrategy
from torchdata.stateful_dataloader import StatefulDataLoader

import compat
from tests.helpers import quiet_trainer


def test_a_ddp_run_started_from_one_process_uses_the_launcher_train_py_kills():
    trainer = quiet_trainer(strategy="ddp", devices=2)  # builds the launcher; starts no process before fit
    assert isinstance(trainer.strategy.launcher, compat.SubprocessScriptLauncher)
    assert callable(trainer.strategy.launcher.kill)


def test_save_last_checkpoint_writes_last_ckpt_once_per_step(tmp_path):
    callback = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0, every_n_train_steps=1000)
    last, seen = tmp_path / "last.ckpt", []

    class SaveAtStepTwo(Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 2:  # ModelCheckpoint itself saves nothing before step 1000
                wrote = compat.save_last_checkpoint(callback, trainer)
                step = torch.load(last, weights_only=True)["global_step"]
                seen.append((wrote, step, compat.save_last_checkpoint(callback, trainer)))

    quiet_trainer(max_steps=3, limit_val_batches=0, callbacks=[callback, SaveAtStepTwo()]).fit(BoringModel())
    assert seen == [(True, 2, False)]  # written at step 2, then not again at the same step


def test_set_data_parallel_size_sets_what_the_constructor_sets():
    assert ModelParallelStrategy(data_parallel_size=3)._data_parallel_size == 3  # where setup_environment reads it
    strategy = ModelParallelStrategy()
    compat.set_data_parallel_size(strategy, 5)
    assert strategy._data_parallel_size == 5


def test_loader_state_workers_reads_the_saved_worker_count():
    for workers in (0, 2):
        loader = StatefulDataLoader(list(range(8)), batch_size=2, num_workers=workers)
        batches = iter(loader)
        next(batches)
        assert compat.loader_state_workers(loader.state_dict()) == workers
        del batches  # stops the workers


def test_load_dcp_keys_reads_a_sharded_checkpoint_in_one_process(tmp_path):
    state = {"state_dict": {"w": torch.arange(4.0)}, "optimizer_0": {"step": torch.tensor(7)}}
    dcp.save(state, checkpoint_id=str(tmp_path))
    loaded = compat.load_dcp_keys({"state_dict"}, str(tmp_path))
    assert set(loaded) == {"state_dict"}
    assert torch.equal(loaded["state_dict"]["w"], torch.arange(4.0))
