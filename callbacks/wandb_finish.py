"""Ends the W&B run with the fit and, for an offline run, prints the command that uploads it.

One process can run several fits: Hydra multirun's basic launcher runs its jobs one after another, and
WandbLogger reuses a live wandb.run, so without wandb.finish() every job would log into the first job's run.
"""

import logging

import lightning as L
from lightning.pytorch.loggers import WandbLogger

log = logging.getLogger(__name__)


class WandbFinish(L.Callback):
    def teardown(self, trainer, pl_module, stage):
        if stage == "fit":
            self.finish(trainer, exit_code=0)

    def on_exception(self, trainer, pl_module, exception):
        self.finish(trainer, exit_code=1)

    def finish(self, trainer, exit_code: int) -> None:
        if not any(isinstance(logger, WandbLogger) for logger in trainer.loggers):
            return  # wandb itself may not be installed (logger=csv on a GPU machine)
        import wandb

        run = wandb.run
        if run is None:
            return
        try:
            run.finish(exit_code=exit_code)
        except Exception as err:  # ConnectionResetError, HandleAbandonedError: W&B's service process is gone
            # SLURM stops every process of a job at once (scancel, preemption, the kill after a requeue), W&B's
            # service too: its files stay as written, and what comes after this callback must still run
            # (LastCheckpoint's save on SIGTERM, submitit's clean exit after a requeue).
            log.warning("W&B's service process stopped before the run was finished (%s)", err)
            return
        if run.offline:
            log.info("W&B run saved offline; upload it with:  wandb sync %s", run.settings.sync_dir)
