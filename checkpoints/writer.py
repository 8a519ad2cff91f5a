"""Writing checkpoints safely: atomically, and without holding training for the write.

- AtomicCheckpointIO writes `<file>.tmp.<pid>` (private to its writer) next to the checkpoint, fsyncs it and renames it
  over the old one, so a crash or a full disk mid-write never leaves a truncated checkpoint. Lightning's own local
  save goes through an fsspec "transaction" that writes to the system temp dir and then moves the file: on a cluster
  that is another filesystem (node-local /tmp), where the move is a plain copy that a kill can cut short.
- BackgroundCheckpointIO does the same write in the background: training waits only for a copy of the state in host
  memory.
"""

import logging
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning_utilities.core.apply_func import apply_to_collection
from torch.distributed.tensor import DTensor

log = logging.getLogger(__name__)
PARTIAL = ".tmp."  # <checkpoint name>.tmp.<pid of its writer>: never a *.ckpt, so never resumed from


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a quota); the previous one is untouched."""


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)  # object stores write whole objects
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}{PARTIAL}{os.getpid()}")
        try:
            with open(partial, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
        except BaseException as err:
            partial.unlink(missing_ok=True)
            if isinstance(err, OSError) or full_disk(err):
                raise write_error(path, err) from None
            raise
        publish(partial, path)


def full_disk(err: BaseException) -> bool:
    """torch.save reports a write cut short (a full disk, a quota, a file size limit) as this RuntimeError."""
    return isinstance(err, RuntimeError) and "unexpected pos" in str(err)


def write_error(path: Path, err: BaseException) -> CheckpointWriteError:
    """One line: which file, why, how much space is left, and that the previous checkpoint is untouched."""
    cause = str(err).splitlines()[0] if isinstance(err, OSError) else "the disk is full or over quota"
    free = shutil.disk_usage(path.parent).free
    return CheckpointWriteError(
        f"could not write checkpoint {path} ({cause}); the previous one is untouched. {free / 1e9:.1f} GB free on "
        "its filesystem: free some space, or give the run another directory (hydra.run.dir=...)"
    )


def publish(partial: Path, path: Path) -> None:
    """Renames a complete write over the checkpoint, durably: a resume sees the old file or the new one."""
    os.replace(partial, path)
    directory = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def remove_partial_writes(dirpaths: list[str]) -> None:
    """Deletes what writers killed mid-write left (`*.tmp.<pid>`). Only for the holder of the run directory's lock:
    no other live process writes there."""
    for partial in (p for d in dirpaths if Path(d).is_dir() for p in Path(d).glob(f"*{PARTIAL}*")):
        log.info("removing %s, left by a write that did not finish", partial)
        shutil.rmtree(partial) if partial.is_dir() else partial.unlink()


class BackgroundCheckpointIO(AtomicCheckpointIO):
    """AtomicCheckpointIO's write in a background thread: training waits only for a copy of the checkpoint in host
    memory (`host_copy`), then goes on while the copy is written, fsynced and renamed. One write in flight at most:
    a save first waits for the previous one. Removals of old checkpoints (ModelCheckpoint's top-k) run in the same
    queue, after the write that replaces them, and are skipped if a write failed: a failed write never leaves the run
    without its last good checkpoint. A failed write is logged when it fails and raised as CheckpointWriteError at the
    next save, or at teardown (the end of fit, whatever ended it), so the run exits non-zero.

    Lightning's AsyncCheckpointIO is not used: it clones the tensors on the GPU (a second copy of the weights and
    optimizer state in GPU memory), lets writes pile up, and removes old files before the new one is written."""

    def __init__(self):
        super().__init__()
        self.executor = None  # created at the first save: teardown shuts it down, and fit can be called again
        self.pending: list[Future] = []  # the write in flight and the removals queued behind it
        self.error = None  # a failed write, raised in the training thread by wait()
        # {CUDA tensor key: its pinned host buffer}, kept for the whole run: pinning 6.7 GB (0.6b with its AdamW
        # state) takes 4.5-5 s on an H200, copying into pinned memory ~0.2 s. See reserve().
        self.buffers: dict[tuple, torch.Tensor] = {}
        self.buffered_step, self.filled = None, set()  # the step the buffers hold, and which of them hold it

    def reserve(self, tensors) -> None:
        """Pins the host buffers of these CUDA tensors now (LastCheckpoint calls it after the first step, when the
        optimizer state exists), so that no checkpoint holds training for it. DTensors (FSDP) are skipped: rank 0
        gathers them into host memory itself."""
        start, pinned = time.perf_counter(), 0
        for tensor in tensors:
            key = tensor_key(tensor)
            if tensor.is_cuda and not isinstance(tensor, DTensor) and key not in self.buffers:
                self.buffers[key] = pinned_like(tensor)
                pinned += tensor.nbytes
        if pinned:
            seconds = time.perf_counter() - start
            log.info("pinned %.1f GB of host memory for the checkpoints in %.2f s", pinned / 1e9, seconds)

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        start = time.perf_counter()
        step = checkpoint.get("global_step")
        # A second checkpoint of the same step (best-k right after last.ckpt at a validation step) holds the same
        # weights and optimizer state: the buffers being written already hold them, so it need not wait.
        if not (self.pending and self.buffered_step == step):
            self.wait()
            self.buffered_step, self.filled = step, set()
        waited = time.perf_counter() - start
        snapshot = host_copy(checkpoint, self.buffers, self.filled)
        for key in self.buffers.keys() - self.filled:  # tensors gone since (or reserved and never saved)
            del self.buffers[key]
        held = time.perf_counter() - start
        self.submit(self.write, snapshot, path, storage_options, held, waited)

    def write(self, snapshot: dict, path, storage_options, held: float, waited: float) -> None:
        start = time.perf_counter()
        try:
            super().save_checkpoint(snapshot, path, storage_options)
        except Exception as err:  # AtomicCheckpointIO has removed the partial file
            expected = isinstance(err, CheckpointWriteError)  # a full disk, a quota: no traceback needed
            self.error = err if expected else CheckpointWriteError(f"could not write checkpoint {path} ({err!r})")
            log.error("%s", self.error, exc_info=None if expected else err)
            return
        written = time.perf_counter() - start
        message = "checkpoint %s: training held %.2f s (%.2f s waiting for the previous write), written in %.2f s"
        log.info(message, path, held, waited, written)

    def remove_checkpoint(self, path) -> None:
        self.submit(self.remove_unless_a_write_failed, path)

    def remove_unless_a_write_failed(self, path) -> None:
        if self.error is None:  # else the file may be the last good checkpoint
            super().remove_checkpoint(path)

    def submit(self, fn, *args) -> None:
        if self.executor is None:
            self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self.pending.append(self.executor.submit(fn, *args))

    def wait(self) -> None:
        """Until every queued write and removal is done; raises CheckpointWriteError if a write failed."""
        for future in self.pending:
            future.result()
        self.pending = []
        error, self.error = self.error, None  # raised once: teardown after this error must not raise it again
        if error is not None:
            raise error

    def teardown(self) -> None:
        try:
            self.wait()
        finally:
            if self.executor is not None:
                self.executor.shutdown()
                self.executor = None


def host_copy(checkpoint: dict, buffers: dict, filled: set) -> dict:
    """The checkpoint with every tensor copied to host memory and every container rebuilt: training goes on changing
    the weights, the optimizer state and Lightning's own dicts (ModelCheckpoint's best_k_models) while the copy is
    written. A CUDA tensor goes to its pinned buffer in `buffers` (created if missing), which the copy engine fills at
    tens of GB/s, unless its key is in `filled`: that buffer already holds this step's values. `filled` is updated."""
    gpus = set()

    def copy(tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.is_cuda:
            return tensor.detach().to("cpu", copy=True)
        key = tensor_key(tensor)
        if key not in buffers:
            buffers[key] = pinned_like(tensor)
        if key not in filled:
            buffers[key].copy_(tensor.detach(), non_blocking=True)
            filled.add(key)
            gpus.add(tensor.device)
        return buffers[key]

    snapshot = apply_to_collection(checkpoint, torch.Tensor, copy)
    for gpu in gpus:
        torch.cuda.synchronize(gpu)  # the copies are complete before the writer reads them
    return snapshot


def pinned_like(tensor: torch.Tensor) -> torch.Tensor:
    return torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)


def tensors_in(collection) -> list[torch.Tensor]:
    found = []
    apply_to_collection(collection, torch.Tensor, found.append)
    return found


def tensor_key(tensor: torch.Tensor) -> tuple:
    """Which tensor this is, across saves: the parameters and the optimizer state keep their memory for the run."""
    return tensor.device, tensor.data_ptr(), tuple(tensor.shape), tensor.stride(), tensor.dtype
