"""Writing checkpoints safely: atomically, and without holding training for the write.

- AtomicCheckpointIO writes `<file>.tmp.<pid>` (private to its writer) next to the checkpoint, fsyncs it and renames it
  over the old one, so a crash or a full disk mid-write never leaves a truncated checkpoint. Lightning's own local
  save goes through an fsspec "transaction" that writes to the system temp dir and then moves the file: on a cluster
  that is another filesystem (node-local /tmp), where the move is a plain copy that a kill can cut short.
- BackgroundCheckpointIO does the same write in the background: training waits only for a copy of the state in host
  memory (from a GPU, only while the copy is queued).
"""

import atexit
import ctypes
import logging
import os
import queue
import shutil
import signal
import threading
import time
from pathlib import Path
from traceback import format_exc
from typing import NamedTuple

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning_utilities.core.apply_func import apply_to_collection
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.tensor import DTensor
from torch.optim.optimizer import register_optimizer_step_pre_hook

log = logging.getLogger(__name__)
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2}  # ignored by the writer process
PARTIAL = ".tmp."  # <checkpoint name>.tmp.<pid of its writer>: never a *.ckpt, so never resumed from
STAGING_HEADROOM = 0.1  # share of a GPU's memory left free after the checkpoint's staging copy (see stage())


class Buffer(NamedTuple):
    """Stands in a snapshot for one of BackgroundCheckpointIO's host buffers, which the writer process has mapped once
    (the "map" message): a save sends only the checkpoint's structure, not ~800 shared-memory handles each time."""

    key: tuple


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
            cause = disk_failure(err)
            if cause is not None:
                raise write_error(path, cause) from None
            raise
        publish(partial, path)


def disk_failure(err: BaseException) -> BaseException | None:
    """The error of the filesystem behind a failed write (an OSError, or torch.save's RuntimeError for a write cut
    short: a full disk, a quota, a file size limit), or None for any other failure. A sharded write fails with DCP's
    CheckpointException, which holds every rank's error."""
    causes = [cause for cause, _ in err.failures.values()] if isinstance(err, CheckpointException) else [err]
    for cause in causes:
        if isinstance(cause, OSError) or (isinstance(cause, RuntimeError) and "unexpected pos" in str(cause)):
            return cause
    return None


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
    """Deletes what writers killed mid-write left: `*.tmp.<pid>` files and folders, and folders of shards that no
    checkpoint links to (model/parallel.py). Only for the holder of the run directory's lock: no other live process
    writes there."""
    for directory in (Path(d) for d in dirpaths if Path(d).is_dir()):
        linked = {p.resolve() for p in directory.glob("*.ckpt") if p.is_symlink()}
        leftovers = [
            *directory.glob(f"*{PARTIAL}*"),
            *(p for p in directory.glob("*.shards-*") if p.resolve() not in linked),
        ]
        for leftover in leftovers:
            log.info("removing %s, left by a write that did not finish", leftover)
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover)
            else:
                leftover.unlink()


class BackgroundCheckpointIO(AtomicCheckpointIO):
    """AtomicCheckpointIO's write in another process: training waits only while the checkpoint is copied to shared host
    memory (`host_copy`; from a GPU the copy is only queued), then goes on while a writer process (started at the
    first save, ended with the run) serialises, writes, fsyncs and renames it: no serialising in the training process
    and no GIL shared with it (a writer thread slowed the training loop by 5-20% on an H200). The host buffers are
    kept for the run and handed to the writer once (`share_buffers`); a save then sends only the checkpoint's structure
    with a `Buffer` in place of each tensor. Sending every tensor's shared-memory handle at each save (~800 at 0.6b)
    made the training process pickle them and serve the writer's ~800 requests for their file descriptors, under the
    GIL, during the step after each checkpoint. One write in flight at most: a save first waits for the previous one.
    Removals of old checkpoints (ModelCheckpoint's top-k) go to the writer in the same queue, after the write that
    replaces them, and are skipped if a write failed: a failed write never leaves the run without its last good
    checkpoint. A failed write is raised as CheckpointWriteError at the next save, or at teardown (the end of fit,
    whatever ended it), so the run exits non-zero. The writer dies with the training process (a SIGKILL included),
    leaving only its `.tmp.<pid>` file.

    The copies from a GPU run on a side stream, after the step that just ended: waiting for them (a
    torch.cuda.synchronize) held training ~0.12 s per 6.7 GB checkpoint on an H200. That queue to the writer goes
    through a handoff thread (`Handoff`), which forwards a write once its copies are complete, and what follows it
    after it. Training goes on meanwhile, so the copied tensors must not change before the copies have read them.
    Where the GPU has room (`stage`), each tensor is first copied into spare GPU memory, in the training stream
    (milliseconds), and goes to the host from there: training never waits for the host copy. Otherwise the next
    optimizer step (of any optimizer: a global pre-hook) waits for the host copies on the GPU, after its forward and
    backward: a 6.7 GB copy takes about as long as that forward and backward (0.6b, H100). This assumes that only
    optimizer steps change the CUDA tensors of a checkpoint in place: the parameters and the optimizer state. The
    model's buffers are constant in this project (shared_heads is set before the first checkpoint), and its metrics
    are not saved.

    Not Lightning's AsyncCheckpointIO (a thread; it clones the tensors on the GPU, lets writes pile up and removes old
    files before the new one is written), nor DCP's async_save: it writes a folder of shards, which is what
    trainer=fsdp writes (model/parallel.py), while this writes the one file every other reader expects."""

    def __init__(self):
        super().__init__()
        self.writer = self.jobs = self.results = None  # the writer process and its queues, from the first save
        self.writer_died = None  # why the writer process ended before its writes were done
        self.in_flight = []  # (path, held, waited) of the writes sent whose result has not come back, in order
        # {tensor key: its host buffer (shared with the writer; pinned for a CUDA tensor)}, kept for the whole run:
        # pinning 6.7 GB (0.6b with its AdamW state) takes ~5 s on an H200, copying into pinned memory ~0.2 s. See
        # reserve().
        self.buffers: dict[tuple, torch.Tensor] = {}
        self.mapped: set[tuple] = set()  # the keys of the buffers the writer process has been sent
        self.buffered_step, self.filled = None, set()  # the step the buffers hold, and which of them hold it
        self.staged: dict[tuple, torch.Tensor] = {}  # {CUDA tensor key: its copy in spare GPU memory}, see stage()
        self.handoff: Handoff | None = None  # forwards the messages for the writer, from the first save
        self.streams: dict[torch.device, torch.cuda.Stream] = {}  # the side stream of the copies, per GPU
        self.copying: dict[torch.device, torch.cuda.Event] = {}  # the copies the next optimizer step waits for
        self.hook = None  # the handle of that optimizer-step pre-hook, from the first copy from a GPU

    def reserve(self, tensors) -> None:
        """Allocates the host buffers of these tensors now, pinned for the CUDA ones (LastCheckpoint calls it after
        the first step, when the optimizer state exists), so that no checkpoint holds training for it, stages the CUDA
        ones on the GPU if it has room, starts the writer and hands it the buffers."""
        start, pinned = time.perf_counter(), 0
        cuda = {}  # key -> tensor, each once
        for tensor in tensors:
            key = tensor_key(tensor)
            if isinstance(tensor, DTensor) or key in self.buffers:
                continue
            self.buffers[key] = shared_like(tensor)
            if tensor.is_cuda:
                cuda[key] = tensor
                pinned += tensor.nbytes
        if pinned:
            seconds = time.perf_counter() - start
            log.info("pinned %.1f GB of shared host memory for the checkpoints in %.2f s", pinned / 1e9, seconds)
        self.stage(cuda)
        self.start_writer()
        self.share_buffers()  # now, not in the step of the first checkpoint

    def stage(self, tensors: dict[tuple, torch.Tensor]) -> None:
        """Allocates a copy of these CUDA tensors in GPU memory, per GPU where it leaves STAGING_HEADROOM of the GPU's
        memory free (measured after the first step: the allocator holds a training step's peak by then). 0.6b with
        its AdamW state needs 6.7 GB; 2b on an 80 GB GPU has no room and copies straight to the host."""
        by_device = {}
        for key, tensor in tensors.items():
            by_device.setdefault(tensor.device, {})[key] = tensor
        for device, group in by_device.items():
            need = sum(tensor.nbytes for tensor in group.values())
            free, total = torch.cuda.mem_get_info(device)
            if free - need < STAGING_HEADROOM * total:
                log.info(
                    "checkpoints copied straight to host memory: staging them needs %.1f GB of %s, %.1f GB are free",
                    need / 1e9,
                    device,
                    free / 1e9,
                )
                continue
            self.staged.update({key: torch.empty_like(tensor) for key, tensor in group.items()})
            log.info("checkpoints staged in %.1f GB of spare memory on %s", need / 1e9, device)

    def start_writer(self) -> None:
        if self.writer is not None:
            return
        if self.handoff is not None:  # the handoff thread of a writer that died
            self.handoff.close()
        context = torch.multiprocessing.get_context("spawn")  # CUDA cannot be forked; the writer needs none
        self.jobs, self.results = context.Queue(), context.Queue()
        self.writer = context.Process(target=serve, args=(self.jobs, self.results, os.getpid()), daemon=True)
        self.mapped = set()
        # Started with the stop signals blocked (the mask is inherited), so that none kills it before serve()
        # ignores them; here they wait until the writer has started.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            self.writer.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        self.handoff = Handoff(self.jobs)
        # A script that saves and returns without teardown (Lightning's fit always calls it): at exit, Python would
        # end the writer before the writes in flight land, losing them. This runs before multiprocessing's exit hook.
        atexit.register(self.teardown)

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        start = time.perf_counter()
        step = checkpoint.get("global_step")
        # A second checkpoint of the same step (best-k right after last.ckpt at a validation step) holds the same
        # weights and optimizer state: the buffers being written already hold them, so it need not wait.
        if not (self.in_flight and self.buffered_step == step):
            self.wait()
            self.buffered_step, self.filled = step, set()
        waited = time.perf_counter() - start
        snapshot, copies, direct = host_copy(checkpoint, self.buffers, self.filled, self.streams, self.staged)
        for key in self.buffers.keys() - self.filled:  # tensors gone since (or reserved and never saved)
            release(key, self.buffers.pop(key))
            self.staged.pop(key, None)
        if direct:  # a copy reads a tensor that training changes: the next optimizer step waits for it
            self.copying.update(copies)  # a later event of a stream implies the earlier ones
            if self.hook is None:
                self.hook = register_optimizer_step_pre_hook(self.step_after_the_copy)
        self.start_writer()
        self.share_buffers()
        # A second save of the same step copies nothing: it reads the buffers of the first, so it follows it.
        self.handoff.put(("write", str(path), snapshot), copies.values())
        self.in_flight.append((path, time.perf_counter() - start, waited))

    def share_buffers(self) -> None:
        """Sends the writer process the buffers it has not mapped yet, and the keys of those released since, ahead of
        the write that reads them (the handoff keeps the order). The state's tensors keep their buffers for the run, so
        after the first save this sends only the few tensors that are new at each save (RNG states)."""
        released = self.mapped - self.buffers.keys()
        if released:  # the writer drops them after the writes sent before, which may read them
            self.handoff.put(("forget", None, list(released)))
        new = {key: self.buffers[key] for key in self.buffers.keys() - self.mapped}
        if new:
            self.handoff.put(("map", None, new))
        self.mapped = set(self.buffers)

    def remove_checkpoint(self, path) -> None:
        self.start_writer()
        self.handoff.put(("remove", str(path), None))

    def step_after_the_copy(self, optimizer, args, kwargs):
        """The optimizer-step pre-hook: the optimizer's update waits on the GPU (not the CPU) for the copies of the
        last save, which read the tensors it changes. Lightning runs the forward and the backward inside step(), in
        its closure: the wait goes after that closure, so they overlap with the copies."""
        if not self.copying:
            return None
        copies, self.copying = list(self.copying.items()), {}

        def wait() -> None:
            for device, event in copies:
                torch.cuda.current_stream(device).wait_event(event)

        closure = kwargs.get("closure")
        if closure is None:  # no closure (GradScaler.step runs it before), or one passed positionally: wait now
            wait()
            return None

        def closure_then_wait():
            try:
                return closure()
            finally:
                wait()

        return args, {**kwargs, "closure": closure_then_wait}

    def wait(self) -> None:
        """Until every write sent is done; raises CheckpointWriteError if one failed."""
        error = None
        while self.in_flight:
            path, held, waited = self.in_flight.pop(0)
            written, failure = self.result()
            if failure is None:
                message = (
                    "checkpoint %s: training held %.2f s (%.2f s waiting for the previous write), written in %.2f s"
                )
                log.info(message, path, held, waited, written)
            else:
                log.error("%s", failure)
                error = error or CheckpointWriteError(failure.splitlines()[0])
        if error is not None:
            raise error

    def result(self) -> tuple[float | None, str | None]:
        """The next result of the writer: (seconds, None) or (None, why it failed)."""
        while self.writer is not None:
            try:
                return self.results.get(timeout=1)
            except queue.Empty:
                if not self.writer.is_alive():  # killed (out of memory?): the writes in flight did not happen
                    self.writer_died = (
                        f"could not write a checkpoint: the writer process died (exit code {self.writer.exitcode})"
                    )
                    self.writer = None
        return None, self.writer_died  # each write in flight when it died (a same-step best-k copy too)

    def teardown(self) -> None:
        atexit.unregister(self.teardown)
        try:
            self.wait()
        finally:
            if self.hook is not None:
                self.hook.remove()
                self.hook, self.copying = None, {}
            if self.handoff is not None:  # removals may still be queued: forwarded to the writer, then the end
                self.handoff.close()
                self.handoff = None
            if self.writer is not None:  # the writer does them, then ends
                self.writer.join()
                self.writer = None
            for key, host in self.buffers.items():  # nothing reads or fills them any more (a next fit has its own)
                release(key, host)
            self.buffers, self.buffered_step, self.filled, self.staged, self.mapped = {}, None, set(), {}, set()


class Handoff:
    """A thread that forwards the messages for the writer process in the order they are put, each once the CUDA
    events given with it have completed (the copies its snapshot reads): the training thread queues them without
    waiting. If an event fails (a CUDA error), every later write is forwarded as "failed": the writer reports it to
    wait() and skips the removals behind it, as for a write that failed, and nothing reads a half-filled buffer."""

    def __init__(self, jobs):
        self.items = queue.Queue()
        self.thread = threading.Thread(target=self.forward, args=(jobs,), name="checkpoint-handoff", daemon=True)
        self.thread.start()

    def put(self, job, events=()) -> None:
        self.items.put((list(events), job))

    def close(self) -> None:
        """Ends the writer (None) after everything put before, then this thread."""
        self.put(None)
        self.thread.join()

    def forward(self, jobs) -> None:
        failure = None  # why a copy failed: from then on, no write may read the buffers
        while True:
            events, job = self.items.get()
            try:
                for event in events:
                    event.synchronize()  # releases the GIL while the copy runs
            except Exception as err:
                failure = failure or f"a copy to host memory failed ({err!r})"
            if failure is not None and job is not None and job[0] == "write":
                job = ("failed", job[1], f"could not write checkpoint {job[1]}: {failure}")
            jobs.put(job)
            if job is None:
                return


def serve(jobs, results, parent: int) -> None:
    """The writer process: writes and removes checkpoints in the order they come, until it gets None. It ignores the
    signals that stop a run: SLURM sends SIGTERM (scancel, preemption) and the requeue signal to every process of the
    job, and the training process, which handles them, still needs its writer for the checkpoint that follows. The
    writer ends when the training process tells it to, or dies with it."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    die_with(parent)
    io, failed = AtomicCheckpointIO(), False
    buffers = {}  # {key: host buffer}, mapped once for the run (BackgroundCheckpointIO.share_buffers)
    while (job := jobs.get()) is not None:
        kind, path, snapshot = job  # for "failed" (by Handoff), snapshot says why; for "map", the buffers by key;
        # for "forget", the keys of the buffers to drop
        if kind == "map":
            buffers.update(snapshot)
            continue
        if kind == "forget":
            for key in snapshot:
                del buffers[key]
            continue
        if kind == "failed":
            failed = True
            results.put((None, snapshot))
            continue
        if kind == "remove":
            if not failed:  # else the file may be the last good checkpoint
                io.remove_checkpoint(path)
            continue
        start = time.perf_counter()
        snapshot = apply_to_collection(snapshot, Buffer, lambda buffer: buffers[buffer.key])
        try:
            io.save_checkpoint(snapshot, path)
            results.put((time.perf_counter() - start, None))
        except Exception as err:  # AtomicCheckpointIO has removed the partial file
            failed = True
            expected = isinstance(err, CheckpointWriteError)  # a full disk, a quota: no traceback needed
            results.put(
                (None, str(err) if expected else f"could not write checkpoint {path} ({err!r})\n{format_exc()}")
            )
        del snapshot  # unmaps the shared memory


def die_with(parent: int) -> None:
    """The kernel kills this process when its parent dies (Linux): a write of a killed run never lands later, over
    the checkpoint of the run that resumed it."""
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


def host_copy(checkpoint: dict, buffers: dict, filled: set, streams: dict, staged: dict) -> tuple[dict, dict, bool]:
    """The checkpoint with every tensor copied to its buffer in shared host memory (which the writer process maps) and
    replaced by a `Buffer`, every container rebuilt: training goes on changing the weights, the optimizer state and
    Lightning's own dicts (ModelCheckpoint's best_k_models) while the copy is written. A tensor goes to its buffer in
    `buffers` (created if missing; pinned for a CUDA tensor, which the copy engine fills at tens of GB/s), unless its
    key is in `filled`: that buffer already holds this step's values. `filled` is updated.

    The copies from a GPU are only queued, on that GPU's side stream in `streams` (created if missing), behind the work
    queued so far (the step that just ended). A tensor with a copy in `staged` (spare GPU memory) is first copied there
    in the current stream, which orders it before any later change, and goes to the host from that copy; on a GPU that
    stages, a tensor without one (Lightning's logged values, which the next step accumulates into in place: small) is
    cloned in the current stream for the same reason. Returns the snapshot, {GPU: an event recorded after its copies}:
    the buffers hold the values once those events have completed, and whether a copy to the host reads a tensor of
    the checkpoint itself (a GPU that does not stage): training must not change it before that event."""
    copies = {}  # GPU -> [(CUDA tensor or its copy on the GPU, its buffer)]
    staging = {key[0] for key in staged}  # the GPUs that stage (a key's first item is its device)
    direct = False

    def copy(tensor: torch.Tensor) -> Buffer:
        key = tensor_key(tensor)
        if key not in buffers:
            buffers[key] = shared_like(tensor)
        if key in filled:
            return Buffer(key)
        filled.add(key)
        if not tensor.is_cuda:
            buffers[key].copy_(tensor.detach())
        else:
            nonlocal direct
            source = tensor.detach()
            if key in staged:
                source = staged[key].copy_(source)
            elif tensor.device in staging:
                source = source.clone()
            else:
                direct = True
            copies.setdefault(tensor.device, []).append((source, buffers[key]))
        return Buffer(key)

    snapshot = apply_to_collection(checkpoint, torch.Tensor, copy)
    events = {}
    for gpu, pairs in copies.items():
        if gpu not in streams:
            streams[gpu] = torch.cuda.Stream(gpu)
        side = streams[gpu]
        side.wait_stream(torch.cuda.current_stream(gpu))  # the values of the step that just ended
        with torch.cuda.stream(side):
            for tensor, buffer in pairs:
                buffer.copy_(tensor, non_blocking=True)
                tensor.record_stream(side)  # the allocator keeps a temporary's memory until the copy has read it
        events[gpu] = torch.cuda.Event(blocking=True)  # its synchronize() sleeps instead of spinning a core
        events[gpu].record(side)
    return snapshot, events, direct


def shared_like(tensor: torch.Tensor) -> torch.Tensor:
    """An empty host tensor of this shape in shared memory (/dev/shm, so the writer process can map it), pinned for
    fast copies when the tensor is on a GPU."""
    host = torch.empty(tensor.shape, dtype=tensor.dtype).share_memory_()
    if tensor.is_cuda and host.nbytes:
        code = int(torch.cuda.cudart().cudaHostRegister(host.data_ptr(), host.nbytes, 0))
        if code != 0:
            raise RuntimeError(f"pinning {host.nbytes} bytes of shared host memory failed (cudaError {code})")
    return host


def release(key: tuple, host: torch.Tensor) -> None:
    """Unregisters the pinned buffer of a CUDA tensor (shared_like) before it is freed: else CUDA refuses to pin
    (cudaError 712) memory mapped later at its address (the new scalars of ModelCheckpoint's state at each save, the
    next run of a sweep)."""
    if key[0].type == "cuda" and host.nbytes:
        torch.cuda.cudart().cudaHostUnregister(host.data_ptr())


def tensors_in(collection) -> list[torch.Tensor]:
    found = []
    apply_to_collection(collection, torch.Tensor, found.append)
    return found


def tensor_key(tensor: torch.Tensor) -> tuple:
    """Which tensor this is, across saves: the parameters and the optimizer state keep their memory for the run."""
    return tensor.device, tensor.data_ptr(), tuple(tensor.shape), tensor.stride(), tensor.dtype
