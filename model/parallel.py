"""trainer=fsdp: FSDP2 over every device of every node, through Lightning's ModelParallelStrategy, with sharded
checkpoints that every rank writes itself and that are published atomically.

ModelParallelStrategy's own "auto" sizes make the data-parallel group the number of nodes and the tensor-parallel
group the devices of a node, so `devices: auto` on one node asked for tensor parallelism over all GPUs, which this
model does not apply (and `data_parallel_size: ${trainer.devices}` passed the string "auto"). Here the data-parallel
size is the world size, resolved once the devices are known; SinkAwareLM.configure_model shards over that mesh.

Checkpoints (docs/checkpointing.md): `<name>.ckpt` is a symlink to a folder `<name>.ckpt.shards-<id>` holding every
rank's shards (torch.distributed.checkpoint: each rank writes its own part of the weights and optimizer state, with
no gather) and Lightning's `meta.pt`. The folder is written as `<name>.ckpt.tmp.<pid>`, renamed when complete, then
the symlink is replaced in one rename: a resume sees the previous checkpoint or the new one, never a partial one.
"""

import os
import shutil
import time
from pathlib import Path

from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

import compat
from checkpoints.writer import PARTIAL, disk_failure, publish, write_error


class FSDPStrategy(ModelParallelStrategy):
    def __init__(self, save_distributed_checkpoint: bool = True, **kwargs):
        """save_distributed_checkpoint=True: sharded checkpoints as above; False: rank 0 gathers the full weights and
        optimizer state into one file (the format of the other strategies), holding training for the gather."""
        super().__init__(tensor_parallel_size=1, save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)
        self.sharded = save_distributed_checkpoint

    def setup_environment(self) -> None:
        compat.set_data_parallel_size(self, self.num_nodes * self.num_processes)  # every rank shards the same model
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        if not self.sharded:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(filepath)
        partial = Path(self.broadcast(str(path.with_name(f"{path.name}{PARTIAL}{os.getpid()}"))))  # rank 0's name
        checkpoint["world_size"] = self.world_size  # a resume on another number of ranks is told apart by it
        try:  # every rank writes its shards; rank 0 .metadata and meta.pt
            super().save_checkpoint(checkpoint, partial)
        except BaseException as err:  # DCP's CheckpointException is a BaseException, raised on every rank
            cause = disk_failure(err)
            if cause is None:
                raise
            if self.is_global_zero:
                shutil.rmtree(partial, ignore_errors=True)
            raise write_error(path, cause) from None
        self.barrier("sharded checkpoint written")
        if self.is_global_zero:
            complete = path.with_name(f"{path.name}.shards-{time.time_ns()}")
            os.replace(partial, complete)
            link = path.with_name(f"{path.name}{PARTIAL}{os.getpid()}.link")
            link.symlink_to(complete.name)
            previous = path.resolve() if path.is_symlink() else None
            publish(link, path)  # the checkpoint is now the new folder
            if previous is not None and previous != complete:
                shutil.rmtree(previous)
        self.barrier("sharded checkpoint published")

    def remove_checkpoint(self, filepath) -> None:
        path = Path(filepath)
        if self.is_global_zero and path.is_symlink():
            target = path.resolve()
            path.unlink()
            shutil.rmtree(target)
        elif self.is_global_zero:
            super().remove_checkpoint(filepath)

    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict:
        """DCP reshards the weights and optimizer state onto this run's ranks, whatever their number. The data
        position and the random generators are per rank: on another number of ranks they start afresh (each rank's
        data stream from its beginning), saying so."""
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only)
        saved = checkpoint.get("world_size", self.world_size)
        if saved != self.world_size:
            rank_zero_warn(
                f"resuming a checkpoint of {saved} ranks on {self.world_size}: weights, optimizer state, step and "
                "schedule are restored; the data stream of every rank starts from its beginning and the random "
                "generators from the seed (the data position and generators are per rank)"
            )
            checkpoint["callbacks"].pop("RandomState", None)
            checkpoint["loops"]["fit_loop"]["state_dict"].pop("combined_loader", None)
        return checkpoint
