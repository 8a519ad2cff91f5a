"""A callback the resume tests add to train.py (`+callbacks.signal=...`): a real signal to its own process at an exact
point of a new run, so that each place where a signal can land is tested, not only where a timer happens to hit."""

import os
import signal

import lightning as L


class SignalAt(L.Callback):
    """Sends the signal `name` to this process once, in a new run (not a resumed one): while the training step that
    ends at global step `step` runs (`where: train`), or while the first or last batch of the validation after that
    step runs (`where: validation-first`, `validation-last`), or once that validation has ended, after every callback's
    on_validation_end (`where: after-validation`: the checkpoint callbacks have seen no signal yet)."""

    def __init__(self, step: int, where: str = "train", name: str = "SIGTERM"):
        self.step, self.where, self.signum = step, where, signal.Signals[name]

    def send(self, trainer) -> None:
        if trainer.ckpt_path is None:
            os.kill(os.getpid(), self.signum)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.where == "train" and trainer.global_step + 1 == self.step:
            self.send(trainer)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if trainer.sanity_checking or trainer.global_step != self.step:
            return
        last = trainer.num_val_batches[dataloader_idx] - 1
        if (self.where, batch_idx) in (("validation-first", 0), ("validation-last", last)):
            self.send(trainer)

    def on_validation_end(self, trainer, pl_module):
        if self.where != "after-validation" or trainer.sanity_checking or trainer.global_step != self.step:
            return
        # The module's hook runs after every callback's on_validation_end (Lightning orders checkpoint callbacks last)
        model_train = pl_module.on_validation_model_train

        def send_then_model_train():
            self.send(trainer)
            model_train()

        pl_module.on_validation_model_train = send_then_model_train
