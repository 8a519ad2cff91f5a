"""The checkpoint callbacks of a run (docs/checkpointing.md); writing is in checkpoints/writer.py, reading in
checkpoints/reader.py.

- LastCheckpoint writes last.ckpt every N minutes (or N optimizer steps), when training ends, on SIGTERM and on the
  requeue signal, then requeues the SLURM job. Lightning's own SLURM handler saves from inside the signal handler, in
  the middle of a step (weights, optimizer and data position out of step with each other); this one waits for the
  end of the step, so the checkpoint is as exact as a scheduled one.
- BestCheckpoints keeps the save_top_k best by a metric, counting the ones already on disk from before a resume.
- RandomState saves every rank's random generators and restores them where the uninterrupted run had them.
"""

import logging
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

import compat
from checkpoints import reader
from checkpoints.writer import BackgroundCheckpointIO, tensors_in

log = logging.getLogger(__name__)


class LastCheckpoint(ModelCheckpoint):
    """last.ckpt every `every_n_train_steps` optimizer steps if set, else every `every_n_minutes` of training, at the
    end of training, on SIGTERM and on a requeue signal. A signal only sets a flag; at the end of the step in progress
    (or of the validation in progress) every rank takes rank 0's flag, saves that step and stops. After SIGTERM the
    run then ends with SIGTERMException (train.py exits 143); after a requeue signal it waits for the write, requeues
    the job, then stops: through the launcher's own handler when there is one (submitit's, which requeues the same
    Hydra job), else with `scontrol requeue` when in a SLURM job. Other exceptions save nothing: the state may be
    mid-step or NaN, and the last good checkpoint must not be overwritten by it. A requeue signal is handled from the
    start of the fit (one during the sanity check stops the run at the end of its first step) until its end, and is
    logged and ignored after it (docs/slurm.md).

    Lightning's own SIGTERM handler is replaced while training runs: it broadcasts from inside the handler, on every
    rank, wherever each rank's main thread happens to be, so with several ranks its broadcast met another collective
    (a crash of the process group, or a hang), and a rank that had the flag stopped while another went on. Its
    training loop's broadcast of the flag at every step (a wait for the GPU on every rank) is skipped too.

    The time cadence is kept here too, not by Lightning's ModelCheckpoint: that one broadcasts rank 0's decision every
    step through the training process group, as a pickled object, and on NCCL each such broadcast waits for the GPU
    on every other rank. Rank 0's signal flag and clock go to the other ranks in one broadcast of two integers per
    step over a gloo group of their own, which runs on the CPU."""

    def __init__(
        self,
        dirpath: str,
        every_n_train_steps: int | None = None,
        requeue_signals: list[str] = (),
        every_n_minutes: float | None = None,
    ):
        # One cadence: the step count (Lightning's, the same on every rank), when given, replaces the time interval
        self.every_n_seconds = None if every_n_train_steps or every_n_minutes is None else every_n_minutes * 60
        super().__init__(
            dirpath=dirpath,
            every_n_train_steps=every_n_train_steps,
            every_n_epochs=None if self.every_n_seconds is None else 0,  # with neither cadence: Lightning's, each epoch
            save_top_k=0,
            save_last=True,
            enable_version_counter=False,  # always last.ckpt: a resumed run overwrites the one it came from
        )
        try:
            self.requeue_signals = [signal.Signals[name] for name in requeue_signals]
        except KeyError as err:
            raise ValueError(f"requeue_signals: {err} is not a signal name (e.g. SIGUSR1, SIGUSR2)") from None
        self.received = 0  # the stop signal received (SIGTERM or a requeue signal), 0 for none
        self.launcher = None  # the strategy's launcher: it forwards SIGTERM to the ranks it started
        self.reserved = False  # host buffers of the background checkpoints pinned (after the first step)
        self.validated_at = None  # the global step of the last validation that ran to its end
        self.previous_handlers = {}
        self.clock = None  # time.monotonic() of the last save on the time cadence (rank 0's counts)
        self.ranks = None  # the gloo group of all ranks that carries rank 0's decisions (None in one process)

    def setup(self, trainer, pl_module, stage):
        super().setup(trainer, pl_module, stage)
        if stage == "fit":  # a requeue signal during start-up or the sanity check is taken at the end of the first step
            self.handle(self.requeue_signals)  # their previous handlers: the launcher's, if any (Lightning sets none)

    def on_train_start(self, trainer, pl_module):
        super().on_train_start(trainer, pl_module)
        self.clock = time.monotonic()
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1 and self.ranks is None:
            self.ranks = torch.distributed.new_group(backend="gloo")  # every rank creates it, here, in the same order
            compat.skip_sigterm_broadcast(trainer)  # its flag goes over self.ranks, with the time cadence's decision
        self.launcher = trainer.strategy.launcher
        self.handle([signal.SIGTERM])  # here, after Lightning has set its own SIGTERM handler

    def handle(self, signals: list) -> None:
        for signum in signals:
            previous = signal.signal(signum, self.on_stop_signal)
            # a previous fit's in this process (after_training) is no launcher's
            self.previous_handlers[signum] = signal.SIG_DFL if previous is self.after_training else previous

    def rank_zero_decision(self) -> tuple[int, bool]:
        """(the stop signal rank 0 received or 0, whether rank 0's clock says a save is due), on every rank."""
        timed = self.every_n_seconds is not None and self.clock is not None  # the clock starts with training
        due = timed and time.monotonic() - self.clock >= self.every_n_seconds
        decision = torch.tensor([self.received, due], dtype=torch.int64)
        if self.ranks is not None:
            torch.distributed.broadcast(decision, src=0, group=self.ranks)  # CPU tensors over gloo: no GPU wait
        return int(decision[0]), bool(decision[1])

    def on_stop_signal(self, signum, frame):
        if signum == signal.SIGTERM and self.received != signum and self.launcher is not None:
            compat.stop_child_process_observer()  # each rank exits 143 once saved: not a crash to kill the others for
            self.launcher.kill(signum)  # the ranks this process started, if any, as Lightning's handler did
        self.received = self.received or signum  # only a flag: the step in progress finishes first

    def teardown(self, trainer, pl_module, stage):
        # Training is over. A requeue signal from now on (SLURM's time-limit signal while the process writes its last
        # files and exits) has nothing to save or requeue, and its default action would end a finished job as FAILED.
        # A Python handler, not SIG_IGN: processes started after this (exec) get the signal's default action again.
        for signum, handler in self.previous_handlers.items():
            finished = signum in self.requeue_signals and handler == signal.SIG_DFL
            signal.signal(signum, self.after_training if finished else handler)
        self.previous_handlers = {}

    @staticmethod
    def after_training(signum, frame):
        rank_zero_info(f"{signal.Signals(signum).name} after training ended: nothing to save or requeue")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if compat.accumulating(trainer):  # saved mid-way, a resumed run would step without these micro-batches
            return
        if not self.reserved:  # the first step has created the optimizer state: pin the checkpoint buffers now
            self.reserved = True
            checkpoint_io = trainer.strategy.checkpoint_io
            if trainer.is_global_zero and isinstance(checkpoint_io, BackgroundCheckpointIO):  # rank 0 saves
                optimizer_states = [optimizer.state_dict() for optimizer in trainer.optimizers]
                checkpoint_io.reserve(tensors_in([pl_module.state_dict(), optimizer_states]))
        signum, due = self.rank_zero_decision()
        if signum:
            self.stop_and_save(trainer, signum)
        elif due:
            self.write_last(trainer)
            self.clock = time.monotonic()

    def on_validation_end(self, trainer, pl_module):
        super().on_validation_end(trainer, pl_module)
        if trainer.sanity_checking:
            return
        self.validated_at = trainer.global_step
        # A signal during a validation: saved here, where Lightning's own validation-end checkpoints are (later in the
        # step, Lightning has counted the step for the loggers, and a checkpoint then resumes a logging step ahead).
        signum, _ = self.rank_zero_decision()
        if signum:
            self.stop_and_save(trainer, signum)

    def stop_and_save(self, trainer, signum: int) -> None:
        """Rank 0 received a stop signal: every rank saves this step and stops (once)."""
        if trainer.should_stop or trainer.received_sigterm:
            return
        self.stop(trainer, signum)
        self.write_last(trainer)
        if isinstance(trainer.strategy.checkpoint_io, BackgroundCheckpointIO):
            trainer.strategy.checkpoint_io.wait()  # on disk before the job is requeued (submitit's handler exits)
        rank_zero_info(f"{signal.Signals(signum).name}: saved {self.last_model_path} at step {trainer.global_step}")
        if signum != signal.SIGTERM:
            self.requeue(trainer, signum)

    @staticmethod
    def stop(trainer, signum: int) -> None:
        """Before the save (a stopping run's checkpoint is written at once: FSDPStrategy). SIGTERM: Lightning's own
        stop, now on every rank at once; it ends the step without a validation-on-stop (after SIGTERM the job's other
        processes, loader workers and W&B's service, are gone too), and train.py exits 143. A requeue signal:
        should_stop (the job goes on after the requeue)."""
        if signum == signal.SIGTERM:
            compat.set_received_sigterm(trainer)
        else:
            trainer.should_stop = True

    def on_train_end(self, trainer, pl_module):
        signum, _ = self.rank_zero_decision()
        if signum and not (trainer.should_stop or trainer.received_sigterm):  # a signal after the last step's end
            self.stop(trainer, signum)
        self.write_last(trainer)

    def on_exception(self, trainer, pl_module, exception):
        if not isinstance(exception, SIGTERMException):  # raised by Lightning between two steps
            return
        if self.validated_at == trainer.global_step:
            # SIGTERM after this step's validation ended (on_validation_end above saw none): Lightning raised once it
            # had counted the step for the loggers, and its restart after a completed validation counts it again (the
            # resumed run's logs skipped a step). Saved as at the validation's end instead.
            compat.uncount_logging_step(trainer)
        self.write_last(trainer)

    def write_last(self, trainer) -> None:
        if not trainer.sanity_checking:
            compat.save_last_checkpoint(self, trainer)

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


class BestCheckpoints(ModelCheckpoint):
    """ModelCheckpoint whose kept set is what is on disk: when training starts (new or resumed), its best-k are
    recomputed from its files in dirpath (the score each holds in its own callback state), and the worst beyond
    save_top_k are removed. Lightning restores the set saved in the resumed checkpoint instead, which misses a best
    checkpoint written after it (a validation right after last.ckpt, a kill): such files stayed forever."""

    def on_train_start(self, trainer, pl_module):
        super().on_train_start(trainer, pl_module)
        if self.monitor is None or self.save_top_k <= 0:
            return  # no ranking: nothing is removed
        scores = self.scores_on_disk()
        ranked = sorted(scores, key=lambda path: scores[path], reverse=self.mode == "max")
        for path in ranked[self.save_top_k :]:
            log.info("removing %s: not among the %d best checkpoints on disk", path, self.save_top_k)
            trainer.strategy.remove_checkpoint(path)  # global rank 0 only
        self.best_k_models = {path: scores[path] for path in ranked[: self.save_top_k]}
        if self.best_k_models:
            self.best_model_path, self.kth_best_model_path = ranked[0], ranked[: self.save_top_k][-1]
            self.best_model_score, self.kth_value = scores[self.best_model_path], scores[self.kth_best_model_path]

    def scores_on_disk(self) -> dict[str, torch.Tensor]:
        """{path: its score} for this callback's checkpoints in dirpath: those whose name starts as its filename."""
        prefix = (self.filename or "").split("{")[0]
        last = self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION
        scores = {}
        for path in Path(self.dirpath).glob(f"{prefix}*{self.FILE_EXTENSION}"):
            if path.name == last:
                continue
            try:
                state = reader.metadata(path).get("callbacks", {}).get(self.state_key, {})
            except (ValueError, FileNotFoundError):  # unreadable (resume skips it too) or removed meanwhile
                continue
            if state.get("current_score") is not None:
                scores[str(path)] = torch.as_tensor(state["current_score"])
        return scores


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
