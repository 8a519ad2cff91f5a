"""Checkpoints a run can always resume from, exactly (docs/checkpointing.md).

- AtomicCheckpointIO writes `<file>.tmp` next to the checkpoint, fsyncs it and renames it over the old one, so a
  crash or a full disk mid-write never leaves a truncated checkpoint. Lightning's own local save goes through an
  fsspec "transaction" that writes to the system temp dir and then moves the file: on a cluster that is another
  filesystem (node-local /tmp), where the move is a plain copy that a kill can cut short.
- BackgroundCheckpointIO does the same write in a background thread: training waits only for a copy of the state in
  host memory.
- LastCheckpoint writes last.ckpt every N minutes (or N optimizer steps), when training ends, on SIGTERM and on the
  requeue signal, then requeues the SLURM job. Lightning's own SLURM handler saves from inside the signal handler, in
  the middle of a step (weights, optimizer and data position out of step with each other); this one waits for the
  end of the step, so the checkpoint is as exact as a scheduled one.
- RandomState saves every rank's random generators and restores them where the uninterrupted run had them.
- resume_checkpoint picks the newest readable checkpoint of the run; an unreadable one is skipped, saying so.
"""

import logging
import os
import random
import signal
import subprocess
import time
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import lightning as L
import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection
from torch.distributed.tensor import DTensor

log = logging.getLogger(__name__)

CHECKPOINT_KEYS = ("state_dict", "optimizer_states", "loops", "global_step")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a quota); the previous one is untouched."""


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)  # object stores write whole objects
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".tmp")
        try:
            with open(partial, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
        except BaseException as err:
            partial.unlink(missing_ok=True)
            if isinstance(err, OSError):
                raise CheckpointWriteError(
                    f"could not write checkpoint {path} ({err}); the previous one is untouched"
                ) from None
            raise
        os.replace(partial, path)
        directory = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


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


class LastCheckpoint(ModelCheckpoint):
    """last.ckpt every `every_n_train_steps` optimizer steps if set, else every `every_n_minutes` of training, at the
    end of training, on SIGTERM (Lightning stops at the end of the step) and on a requeue signal. After a requeue
    signal it waits for the write, requeues the job, then stops: through the launcher's own handler when there is one
    (submitit's, which requeues the same Hydra job), else with `scontrol requeue` when in a SLURM job. Other
    exceptions save nothing: the state may be mid-step or NaN, and the last good checkpoint must not be overwritten
    by it."""

    def __init__(
        self,
        dirpath: str,
        every_n_train_steps: int | None = None,
        requeue_signals: list[str] = (),
        every_n_minutes: float | None = None,
    ):
        # Lightning takes one cadence: the step count, when given, replaces the default time interval
        minutes = None if every_n_train_steps or every_n_minutes is None else timedelta(minutes=every_n_minutes)
        super().__init__(
            dirpath=dirpath,
            every_n_train_steps=every_n_train_steps,
            train_time_interval=minutes,
            save_top_k=0,
            save_last=True,
            enable_version_counter=False,  # always last.ckpt: a resumed run overwrites the one it came from
        )
        try:
            self.requeue_signals = [signal.Signals[name] for name in requeue_signals]
        except KeyError as err:
            raise ValueError(f"requeue_signals: {err} is not a signal name (e.g. SIGUSR1, SIGUSR2)") from None
        self.received = 0  # the requeue signal received, 0 for none
        self.reserved = False  # host buffers of the background checkpoints pinned (after the first step)
        self.previous_handlers = {}

    def on_train_start(self, trainer, pl_module):
        super().on_train_start(trainer, pl_module)  # starts the clock of every_n_minutes
        # Here, after Lightning has set its own handlers; the previous handler is the launcher's, if any.
        self.previous_handlers = {s: signal.signal(s, self.on_requeue_signal) for s in self.requeue_signals}

    def on_requeue_signal(self, signum, frame):
        self.received = signum  # only a flag: the step in progress finishes first

    def teardown(self, trainer, pl_module, stage):
        for signum, handler in self.previous_handlers.items():
            signal.signal(signum, handler)
        self.previous_handlers = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self.reserved:  # the first step has created the optimizer state: pin the checkpoint buffers now
            self.reserved = True
            checkpoint_io = trainer.strategy.checkpoint_io
            if trainer.is_global_zero and isinstance(checkpoint_io, BackgroundCheckpointIO):  # rank 0 saves
                optimizer_states = [optimizer.state_dict() for optimizer in trainer.optimizers]
                checkpoint_io.reserve(tensors_in([pl_module.state_dict(), optimizer_states]))
        signum = trainer.strategy.broadcast(self.received)  # rank 0 decides, so every rank saves at the same step
        if not signum:
            return
        self.write_last(trainer)
        if isinstance(trainer.strategy.checkpoint_io, BackgroundCheckpointIO):
            trainer.strategy.checkpoint_io.wait()  # on disk before the job is requeued (submitit's handler exits)
        rank_zero_info(f"{signal.Signals(signum).name}: saved {self.last_model_path} at step {trainer.global_step}")
        trainer.should_stop = True
        self.requeue(trainer, signum)

    def on_train_end(self, trainer, pl_module):
        self.write_last(trainer)

    def on_exception(self, trainer, pl_module, exception):
        if isinstance(exception, SIGTERMException):  # raised by Lightning between two steps
            self.write_last(trainer)

    def write_last(self, trainer) -> None:
        if self._last_global_step_saved != trainer.global_step and not trainer.sanity_checking:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def requeue(self, trainer, signum) -> None:
        launcher_handler = self.previous_handlers.get(signum)
        if callable(launcher_handler):
            launcher_handler(signum, None)  # submitit: resubmits the same job; exits on rank 0
            return
        if "SLURM_JOB_ID" not in os.environ:
            rank_zero_info("not in a SLURM job: stopping without a requeue; run the same command again to resume")
            return
        if trainer.is_global_zero:
            array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
            job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            if result.returncode == 0:
                log.info("requeued SLURM job %s; it resumes from %s", job, self.last_model_path)
            else:
                log.error("`scontrol requeue %s` failed (%s): resubmit the job to resume", job, result.stderr.strip())


class RandomState(L.Callback):
    """Every rank's random generators (Python, NumPy, torch CPU and CUDA) in the checkpoint, restored when training
    starts: after the data loaders have been created (which draws from torch's generator in both runs), so the
    next step sees the generators of the uninterrupted run."""

    def __init__(self):
        self.restored = None

    def state_dict(self) -> dict:
        return {"ranks": all_ranks(generator_states())}  # every rank calls this when a checkpoint is saved

    def load_state_dict(self, state: dict) -> None:
        self.restored = state["ranks"]

    def on_train_start(self, trainer, pl_module):
        if self.restored is None:
            return
        if len(self.restored) != trainer.world_size:
            raise ValueError(
                f"the checkpoint's random state was saved by {len(self.restored)} ranks, this run has "
                f"{trainer.world_size}: resume with the same number of devices and nodes"
            )
        set_generator_states(self.restored[trainer.global_rank])
        self.restored = None


def all_ranks(obj) -> list:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def generator_states() -> dict:
    """As plain containers and tensors (NumPy's key array as a tensor), so the checkpoint loads with weights_only."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_generator_states(states: dict) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])


def saved_step(path: Path) -> int:
    """The global step of a training checkpoint; reads only its pickle (the tensors stay memory-mapped).
    Raises ValueError saying why the file is not a loadable training checkpoint."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch, zip and pickle errors all mean the same here
        raise ValueError(f"truncated, corrupt or not loadable with weights_only: {str(err).splitlines()[0]}") from None
    missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint]
    if missing:
        raise ValueError(f"not a training checkpoint (no {', '.join(missing)})")
    return checkpoint["global_step"]


def corrupt_record(path: Path) -> str | None:
    """The first record whose CRC does not match (a flipped byte anywhere in the file), or None."""
    with zipfile.ZipFile(path) as archive:
        return archive.testzip()


def resume_checkpoint(dirpaths: list[str]) -> str | None:
    """The checkpoint of the highest global step in these directories (last.ckpt on a tie), or None if there is
    none: a new run. Unreadable files are skipped with a warning that names them; if no file is readable, a
    ValueError says what to do."""
    found = {path for d in dirpaths if Path(d).is_dir() for path in Path(d).glob("*.ckpt")}
    steps, problems = {}, []
    for path in found:
        try:
            steps[path] = saved_step(path)
        except ValueError as err:
            problems.append(f"{path} is unreadable ({err})")
    for path in sorted(steps, key=lambda p: (steps[p], p.name == "last.ckpt"), reverse=True):
        record = corrupt_record(path)  # read in full only for the file chosen
        if record is None:
            if problems:
                rank_zero_warn(f"resuming from the previous good checkpoint {path}: {'; '.join(problems)}")
            return str(path)
        problems.append(f"{path} is corrupt (record {record} fails its CRC check)")
    if problems:
        raise ValueError(
            f"no readable checkpoint to resume from: {'; '.join(problems)}. Move these files away to start the run "
            "over, or pick another run name (run=NAME)"
        )
    return None
