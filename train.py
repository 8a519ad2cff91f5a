"""Train a compact GPT with vanilla / sink / gated attention and the head-balancing aux loss.

python train.py                                    # tiny model, offline corpus, CPU
python train.py attention=gated aux.lambda=1e-4    # the paper's from-scratch setting
python train.py -m attention=vanilla,sink,gated aux.lambda=0,1e-4
python train.py run=NAME                           # again: resumes that run from its newest good checkpoint

How resume, SLURM requeue and sweeps work: docs/checkpointing.md.
"""

import contextlib
import logging
import os
import secrets
import signal
import sys
from collections.abc import Mapping
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_class, instantiate
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

import compat
from checkpoints import reader
from checkpoints.lock import hold_run_dir, launched_as_rank_zero, lock_wait_s
from checkpoints.writer import BackgroundCheckpointIO, CheckpointWriteError, remove_partial_writes
from model.lit import SinkAwareLM

log = logging.getLogger("train")


def check_combination(cfg: DictConfig, choices: Mapping[str, str | None]) -> None:
    """Options that only mean something together, checked as soon as the config is composed. choices: the chosen
    option of each config group (HydraConfig's runtime.choices)."""
    if cfg.aux.shared_heads and choices["mode"] != "finetune":
        raise ValueError(
            f"aux.shared_heads={cfg.aux.shared_heads} splits heads for Eq. 8 fine-tuning only: add mode=finetune "
            "init_from=CKPT, or leave aux.shared_heads at 0"
        )
    if choices["model"] == "hf" and choices.get("attention") is not None:
        raise ValueError(
            f"attention={choices['attention']} does not apply to model=hf (a Hugging Face model keeps its own "
            "attention; its gates follow from it): drop attention="
        )


def build(cfg: DictConfig):
    """Data, module, trainer from a composed config."""
    check_combination(cfg, HydraConfig.get().runtime.choices)
    datamodule = instantiate(cfg.data)
    plain = lambda node: OmegaConf.to_container(node, resolve=True)  # noqa: E731 (no DictConfig in ckpts)
    module = SinkAwareLM(
        model={**plain(cfg.model), "vocab_size": datamodule.tokenizer.vocab_size},
        optim=plain(cfg.optim),
        aux=plain(cfg.aux),
        compile=cfg.compile,
    )
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    logger = instantiate(cfg.logger, **wandb_identity(cfg)) if cfg.logger else False
    # Our checkpoint callback requeues SLURM jobs at the end of a step; Lightning's handler would save mid-step.
    plugins = [BackgroundCheckpointIO()] + ([SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else [])
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger, plugins=plugins)
    return datamodule, module, trainer


def wandb_identity(cfg: DictConfig) -> dict:
    """For a W&B logger: the run id kept in the run directory (a resumed or requeued run continues the same W&B
    run), the directory's name as the run name, and a multirun's sweep as the group."""
    if not issubclass(get_class(cfg.logger._target_), WandbLogger):
        return {}
    run_dir = Path(cfg.paths.output_dir)
    identity = {"id": cfg.logger.id or run_id(run_dir / "wandb_id"), "name": cfg.logger.name or run_dir.name}
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        identity["group"] = Path(hydra_cfg.sweep.dir).name
    return identity


def run_id(path: Path) -> str:
    """The id stored in `path`, or a new one stored there. Every DDP rank may get here at once: the first to link
    its file into place wins and all read that one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mine = path.with_name(f"{path.name}.{os.getpid()}")
    mine.write_text(secrets.token_hex(4))  # W&B ids: letters and digits
    try:
        os.link(mine, path)
    except FileExistsError:
        pass
    finally:
        mine.unlink()
    return path.read_text()


def end_job(trainer, code: int):
    """Exit with `code`; in a multi-process run, end every rank now. Lightning's launcher kills all ranks when one it
    started fails, but when the launching process (rank 0) fails it only raises, and the ranks it started wait in
    their next collective until the process group's timeout (an NCCL collective never notices a dead peer). Under
    srun or torchrun this rank's non-zero exit ends the others. os._exit skips the exit handlers: one of them,
    destroy_process_group, can wait for collectives the other ranks will never finish."""
    if trainer is None or trainer.world_size == 1:
        sys.exit(code)
    if isinstance(trainer.strategy.launcher, compat.SubprocessScriptLauncher):
        trainer.strategy.launcher.kill(signal.SIGKILL)  # the ranks this process started, if any
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    L.seed_everything(cfg.seed, workers=True)
    trainer = None
    try:
        # Rank 0 holds the run directory for the whole run: a second train.py on it stops here, before any work.
        owner = launched_as_rank_zero()
        with hold_run_dir(Path(cfg.paths.output_dir), lock_wait_s()) if owner else contextlib.nullcontext():
            datamodule, module, trainer = build(cfg)
            log.info("model: %s, %.2fM parameters", module.model.cfg, module.model.num_params() / 1e6)
            # Lightning's own ModelCheckpoint (when ours are switched off) has no directory before fit: none to resume
            checkpoint_dirs = [c.dirpath for c in trainer.checkpoint_callbacks if c.dirpath]
            if owner:
                remove_partial_writes(checkpoint_dirs)
            ckpt_path = reader.find_resumable(checkpoint_dirs)
            if ckpt_path:
                reader.check_same_model(ckpt_path, module.hparams["model"])
            start = f"resuming {ckpt_path}" if ckpt_path else "a new run"
            log.info("run directory %s: %s", cfg.paths.output_dir, start)
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except (ValueError, FileNotFoundError, CheckpointWriteError) as err:
        # Errors we raise for bad input already say what is wrong and how to fix it: no traceback wall.
        log.error("%s (set HYDRA_FULL_ERROR=1 for the traceback)", err)
        end_job(trainer, 1)
    except SIGTERMException:  # raised by LastCheckpoint once the step it stopped at is saved (or by Lightning)
        log.warning("stopped by SIGTERM at step %d, saved: the same command resumes the run", trainer.global_step)
        sys.exit(128 + signal.SIGTERM)
    except Exception:
        if trainer is None or trainer.world_size == 1:
            raise  # Hydra prints it
        log.exception("rank %d failed", trainer.global_rank)
        end_job(trainer, 1)


if __name__ == "__main__":
    main()
