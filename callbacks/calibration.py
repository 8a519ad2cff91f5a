"""Fine-tuning with shared and routed heads (Eq. 8): start from trained weights, pick the shared heads once.

    setup           load the weights of `init_from` (weights only: the optimizer and the schedule start fresh)
    on_train_start  measure each head's importance on `batches` calibration batches (no grad), mark the
                    top-m heads of each layer as shared (m = aux.shared_heads) in pl_module.shared_heads

shared_heads is a buffer of the module, so it is saved in every checkpoint; this callback's own state says
the calibration happened, so a run resumed from one of its checkpoints keeps the saved set instead of
measuring again. The aux loss then balances only the routed heads: lambda * sum_l (N_h - m) * CV(routed)^2.
"""

import logging
from pathlib import Path

import lightning as L
import torch

from checkpoints import reader
from model.balance import coefficient_of_variation, importance, top_heads

log = logging.getLogger(__name__)


def load_weights(pl_module: L.LightningModule, path: str) -> None:
    """The model weights of a train.py checkpoint (one file or shards) into pl_module; nothing else of it is used."""
    if not Path(path).exists():
        raise FileNotFoundError(f"init_from={path}: no such checkpoint; give the path of a .ckpt of a trained run")
    try:
        checkpoint = reader.load(Path(path))
    except ValueError as err:  # a truncated or foreign file: say which one, not a traceback of the unpickler
        raise ValueError(f"init_from={path}: not a readable checkpoint ({err})") from None
    weights = {k: v for k, v in checkpoint["state_dict"].items() if k != "shared_heads"}  # chosen afresh here
    missing, unexpected = pl_module.load_state_dict(weights, strict=False)
    missing = [k for k in missing if k != "shared_heads"]
    if missing or unexpected:
        raise ValueError(
            f"init_from={path} does not fit this model ({len(missing)} missing, {len(unexpected)} unexpected weights, "
            f"e.g. {(missing + unexpected)[0]}): use the model= and attention= of the run that wrote it"
        )


class Calibration(L.Callback):
    def __init__(self, init_from: str | None, batches: int = 16):
        """init_from: a checkpoint whose weights start the run (None: the module's own, e.g. a Hugging Face
        model loaded by the module). batches: calibration batches from the training stream."""
        if batches < 1:
            raise ValueError(f"calibration.batches={batches}: must be >= 1")
        self.init_from, self.batches = init_from, batches
        self.calibrated = False  # True once the shared set is chosen; checkpointed, so a resume keeps the set

    def state_dict(self) -> dict:
        return {"calibrated": self.calibrated}

    def load_state_dict(self, state_dict: dict) -> None:
        self.calibrated = bool(state_dict["calibrated"])

    def setup(self, trainer, pl_module, stage: str):
        """Runs before the optimizers exist, so they are built over the loaded weights. A resumed run loads
        its checkpoint after this, over these weights."""
        if stage == "fit" and self.init_from is not None:
            load_weights(pl_module, self.init_from)
            log.info("fine-tuning from the weights of %s (fresh optimizer and schedule)", self.init_from)

    def on_train_start(self, trainer, pl_module):
        if self.calibrated:
            log.info("shared heads restored from the checkpoint, not measured again")
            return
        imp = self.measure_importance(trainer, pl_module)
        m = pl_module.aux_config.shared_heads
        pl_module.shared_heads.copy_(top_heads(imp, m))
        self.calibrated = True
        self.report(trainer, imp, pl_module.shared_heads.cpu(), m)

    @torch.no_grad()
    def measure_importance(self, trainer, pl_module) -> torch.Tensor:
        """Mean importance (L, H) over the first `batches` training batches, averaged over the DDP ranks.

        The batches come from a fresh loader of the datamodule, so the training loader's position is untouched.
        """
        loader = trainer.datamodule.loader("train", trainer.global_rank, trainer.world_size)
        was_training = pl_module.training
        pl_module.eval()  # no dropout while measuring (HF models have some)
        total, seen = None, 0
        for batch in loader:
            if seen == self.batches:
                break
            _, gates = pl_module(batch["input_ids"].to(pl_module.device))
            imp = importance(gates.float())
            total = imp if total is None else total + imp
            seen += 1
        pl_module.train(was_training)
        if seen < self.batches:
            raise ValueError(f"calibration.batches={self.batches}: the training data gave only {seen} batches")
        return trainer.strategy.reduce(total / seen, reduce_op="mean")

    def report(self, trainer, imp: torch.Tensor, shared: torch.Tensor, m: int) -> None:
        imp = imp.double().cpu()
        heads = {f"L{layer:02d}": row.nonzero().flatten().tolist() for layer, row in enumerate(shared)}
        log.info("shared heads (top %d per layer by calibration importance): %s", m, heads)
        routed_cv = coefficient_of_variation(imp, ~shared) if m else coefficient_of_variation(imp)
        metrics = {
            "calibration/cv_mean": coefficient_of_variation(imp).mean().item(),
            "calibration/cv_routed_mean": routed_cv.mean().item(),
        }
        for logger in trainer.loggers:
            logger.log_hyperparams({"calibration/shared_heads": heads, "calibration/batches": self.batches})
            logger.log_metrics(metrics, step=trainer.global_step)
