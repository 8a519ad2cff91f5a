"""compat.py's private names of Lightning, torchdata and torch.distributed.checkpoint still do what the project relies
on: each test fails on the release that moves one, before a run fails (or silently stops saving) in the middle."""

import os
import subprocess
import sys

import torch
import torch.distributed.checkpoint as dcp
from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver
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


def test_set_received_sigterm_stops_a_run_at_the_end_of_its_step_as_lightnings_handler_does():
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    class StopAtStepTwo(Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 2:
                compat.set_received_sigterm(trainer)

    trainer = quiet_trainer(max_steps=5, limit_val_batches=0, callbacks=[StopAtStepTwo()], enable_checkpointing=False)
    try:
        trainer.fit(BoringModel())
    except SIGTERMException:
        pass
    assert trainer.received_sigterm and trainer.global_step == 2


def test_accumulating_is_true_at_every_micro_batch_but_the_last_of_an_optimizer_step():
    seen = []

    class Record(Callback):
        def on_train_batch_end(self, trainer, *args):
            seen.append((trainer.global_step, compat.accumulating(trainer)))

    options = dict(max_steps=2, accumulate_grad_batches=3, limit_val_batches=0, enable_checkpointing=False)
    quiet_trainer(**options, callbacks=[Record()]).fit(BoringModel())  # no checkpoint in the working directory
    assert seen == [(0, True), (0, True), (1, False), (1, True), (1, True), (2, False)]


def test_uncount_logging_step_takes_back_lightnings_count_of_the_step():
    counts = []

    class Uncount(Callback):
        def on_train_end(self, trainer, *args):
            counts.append(trainer.fit_loop.epoch_loop._batches_that_stepped)
            compat.uncount_logging_step(trainer)
            counts.append(trainer.fit_loop.epoch_loop._batches_that_stepped)

    trainer = quiet_trainer(max_steps=3, limit_val_batches=0, callbacks=[Uncount()], enable_checkpointing=False)
    trainer.fit(BoringModel())
    assert counts == [3, 2]  # the logging step of the 3 steps trained, then one less


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


def test_stop_child_process_observer_ends_lightnings_observer_without_killing_anything():
    child = subprocess.Popen([sys.executable, "-c", "raise SystemExit(143)"])
    child.wait()  # a rank that exited non-zero: the observer's next look would SIGKILL this process
    observer = _ChildProcessObserver(main_pid=os.getpid(), child_processes=[child], sleep_period=0.2)
    killed = []
    observer._terminate_all = lambda: killed.append(True)  # what it would do: SIGKILL everything, this process too
    observer.start()
    compat.stop_child_process_observer()
    observer.join(timeout=5)
    assert not observer.is_alive() and not killed  # ended at its next look, without killing
