"""A callback for FSDP runs of train.py in tests: the full weights and optimizer state as restored, saved to a file."""

import lightning as L
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict


class DumpRestoredState(L.Callback):
    """At the start of training (after a resume restored the state), the full state on every rank to `path` (rank 0)."""

    def __init__(self, path: str):
        self.path = path

    def on_train_start(self, trainer, pl_module):
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model = trainer.strategy.model
        state = {
            "state_dict": get_model_state_dict(model, options=options),
            "optimizer_0": get_optimizer_state_dict(model, trainer.optimizers[0], options=options),
        }
        if trainer.is_global_zero:
            torch.save(state, self.path)
