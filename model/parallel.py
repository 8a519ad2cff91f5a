"""trainer=fsdp: FSDP2 over every device of every node, through Lightning's ModelParallelStrategy, with sharded
checkpoints that every rank writes itself and that are published atomically.

ModelParallelStrategy's own "auto" sizes make the data-parallel group the number of nodes and the tensor-parallel
group the devices of a node, so `devices: auto` on one node asked for tensor parallelism over all GPUs, which this
model does not apply (and `data_parallel_size: ${trainer.devices}` passed the string "auto"). Here the data-parallel
size is the world size, resolved once the devices are known; SinkAwareLM.configure_model shards over that mesh.

Checkpoints (docs/checkpointing.md): `<name>.ckpt` is a symlink to a folder `<name>.ckpt.shards-<id>` holding every
rank's shards (torch.distributed.checkpoint: each rank writes its own part of the weights and optimizer state, with
no gather) and Lightning's `meta.pt`. The folder is written as `<name>.ckpt.tmp.<pid>-<time>`, renamed when complete,
then the symlink is replaced in one rename: a resume sees the previous checkpoint or the new one, never a partial one.

With `async_save: true` each rank copies its shards to shared host memory and a writer process of its own writes them
(DCP's process-based async_save); training goes on, and the checkpoint is published once every rank's shards are
written. One write is in flight at a time. The checkpoint of a run that stops (SIGTERM, a requeue signal) is written
the synchronous way: the job's signal reaches the writer processes too, and there is nothing left to overlap it with.
"""

import os
import shutil
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

import compat
from checkpoints.reader import SHARDED_META
from checkpoints.writer import PARTIAL, disk_failure, publish, write_error

STOPPING_WAIT_S = 120  # how long a stopping run waits for its write in flight (a writer killed by the job's signal)


@dataclass
class ShardedWrite:
    """A sharded checkpoint being written in the background: `partial` becomes `path` once `done` has succeeded."""

    done: Future
    path: Path
    partial: Path
    published: bool = False


class FSDPStrategy(ModelParallelStrategy):
    def __init__(self, save_distributed_checkpoint: bool = True, async_save: bool = False, **kwargs):
        """save_distributed_checkpoint=True: sharded checkpoints as above; False: rank 0 gathers the full weights and
        optimizer state into one file (the format of the other strategies), holding training for the gather.
        async_save=True: sharded checkpoints written by a background process on every rank (above)."""
        if async_save and not save_distributed_checkpoint:
            raise ValueError(
                "trainer.strategy.async_save=true writes sharded checkpoints in the background: it needs "
                "trainer.strategy.save_distributed_checkpoint=true"
            )
        super().__init__(tensor_parallel_size=1, save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)
        self.sharded, self.async_save = save_distributed_checkpoint, async_save
        self.in_flight: ShardedWrite | None = None
        self.stager = self.writers_group = None  # created at the first background write

    def setup_environment(self) -> None:
        compat.set_data_parallel_size(self, self.num_nodes * self.num_processes)  # every rank shards the same model
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        if not self.sharded:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(filepath)
        # Rank 0's view, so that every rank takes the same way (a signal reaches the ranks at different moments), and
        # rank 0's name, new for each write: an abandoned background write may still be writing its own.
        stopping, partial = self.broadcast((self.run_stops(), f"{path}{PARTIAL}{os.getpid()}-{time.time_ns()}"))
        partial = Path(partial)
        self.finish_write(stopping)
        checkpoint["world_size"] = self.world_size  # a resume on another number of ranks is told apart by it
        if self.async_save and not stopping:
            return self.start_write(checkpoint, path, partial)
        try:  # every rank writes its shards; rank 0 .metadata and meta.pt
            super().save_checkpoint(checkpoint, partial)
        except BaseException as err:  # DCP's CheckpointException is a BaseException, raised on every rank
            self.write_failed(path, partial, err)
        self.barrier("sharded checkpoint written")
        if self.is_global_zero:
            publish_shards(partial, path)
        self.barrier("sharded checkpoint published")

    def run_stops(self) -> bool:
        """Whether the run is stopping (SIGTERM, a requeue signal: LastCheckpoint sets these before its save)."""
        trainer = self.lightning_module.trainer if self.lightning_module else None
        return bool(trainer and (trainer.received_sigterm or trainer.should_stop))

    def start_write(self, checkpoint: dict, path: Path, partial: Path) -> None:
        """The layout ModelParallelStrategy.save_checkpoint writes (and its load_checkpoint reads), written by DCP's
        process-based async_save: this call returns once the shards are in shared host memory."""
        if self.stager is None:
            # pinned on a GPU; kept for the run, so later checkpoints reuse its host buffers
            options = StagingOptions(
                use_pinned_memory=torch.cuda.is_available(),
                use_shared_memory=True,  # the writer process maps it
                use_async_staging=False,  # staged before async_save returns: training may change the weights after
                use_non_blocking_copy=False,
            )
            self.stager = DefaultStager(options)
            self.writers_group = torch.distributed.new_group(backend="gloo")  # async_save needs a CPU group
        partial.mkdir(parents=True, exist_ok=True)
        shards = {"state_dict": checkpoint.pop("state_dict")}
        shards.update({f"optimizer_{i}": state for i, state in enumerate(checkpoint.pop("optimizer_states", []))})
        done = dcp.async_save(
            shards,
            checkpoint_id=partial,
            process_group=self.writers_group,
            async_checkpointer_type=AsyncCheckpointerType.PROCESS,
            async_stager=self.stager,
        )
        if self.is_global_zero:
            torch.save(checkpoint, partial / SHARDED_META)
        self.in_flight = ShardedWrite(done, path, partial)

    def on_train_batch_start(self, batch, batch_idx) -> None:
        """Publishes the background write as soon as it has succeeded (rank 0, no collective): a kill after this
        resumes from it. Failures are raised by finish_write, where every rank waits."""
        super().on_train_batch_start(batch, batch_idx)
        write = self.in_flight
        if self.is_global_zero and write and not write.published and write.done.done() and not write.done.exception():
            publish_shards(write.partial, write.path)
            write.published = True

    def finish_write(self, stopping: bool = False) -> None:
        """Waits for the write in flight and publishes it; a failed write stops the run with write_error's line. When
        the run stops, a write that fails or takes longer than STOPPING_WAIT_S is left unpublished with a warning
        instead: the job's signal reaches the writer processes too (a dead one fails the write on every rank)."""
        write, self.in_flight = self.in_flight, None
        if write is None or write.published:
            return
        try:
            write.done.result(timeout=STOPPING_WAIT_S if stopping else None)
        except BaseException as err:
            if not stopping:
                self.write_failed(write.path, write.partial, err)
            rank_zero_warn(f"stopping: the background write of {write.path} did not finish ({err!r}); not published")
            return
        if self.is_global_zero:
            publish_shards(write.partial, write.path)

    def write_failed(self, path: Path, partial: Path, err: BaseException):
        """Raises the one-line error of a full disk (write_error), or err itself; the partial folder is removed."""
        cause = disk_failure(err)
        if cause is None:
            raise err
        if self.is_global_zero:
            shutil.rmtree(partial, ignore_errors=True)
        raise write_error(path, cause) from None

    def teardown(self) -> None:
        """Also ends the checkpoint_io plugin (train.py's BackgroundCheckpointIO), which ModelParallelStrategy's
        teardown leaves running: its writer process (rank 0's one file under save_distributed_checkpoint=false) must
        finish its write and end, or the process hangs at exit waiting for it."""
        try:
            self.finish_write(self.run_stops())
        finally:
            if self.stager is not None:
                self.stager.close()
                self.stager = None
            self.checkpoint_io.teardown()
            super().teardown()

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


def publish_shards(partial: Path, path: Path) -> None:
    """Rank 0: the complete folder `partial` becomes what the symlink `path` links to; the folder it linked is
    deleted."""
    complete = path.with_name(f"{path.name}.shards-{time.time_ns()}")
    os.replace(partial, complete)
    link = path.with_name(f"{path.name}{PARTIAL}{os.getpid()}.link")
    link.symlink_to(complete.name)
    previous = path.resolve() if path.is_symlink() else None
    publish(link, path)  # the checkpoint is now the new folder
    if previous is not None and previous != complete:
        shutil.rmtree(previous)
