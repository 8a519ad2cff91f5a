"""Train a compact GPT with vanilla / sink / gated attention and the head-balancing aux loss.

python train.py                                    # tiny model, offline corpus, CPU
python train.py attention=gated aux.lambda=1e-4    # the paper's from-scratch setting
python train.py -m attention=vanilla,sink,gated aux.lambda=0,1e-4
"""

import logging
import sys

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from model.lit import SinkAwareLM

log = logging.getLogger("train")


def build(cfg: DictConfig):
    """Data, module, trainer from a composed config."""
    datamodule = instantiate(cfg.data)
    plain = lambda node: OmegaConf.to_container(node, resolve=True)  # noqa: E731 (no DictConfig in ckpts)
    module = SinkAwareLM(
        model={**plain(cfg.model), "vocab_size": datamodule.tokenizer.vocab_size},
        optim=plain(cfg.optim),
        aux=plain(cfg.aux),
        compile=cfg.compile,
    )
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    logger = instantiate(cfg.logger) if cfg.logger else False
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger)
    return datamodule, module, trainer


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    L.seed_everything(cfg.seed, workers=True)
    try:
        datamodule, module, trainer = build(cfg)
        log.info("model: %s, %.2fM parameters", module.model.cfg, module.model.num_params() / 1e6)
        trainer.fit(module, datamodule=datamodule)
    except (ValueError, FileNotFoundError) as err:
        # Errors we raise for bad input already say what is wrong and how to fix it: no traceback wall.
        log.error("%s (set HYDRA_FULL_ERROR=1 for the traceback)", err)
        sys.exit(1)


if __name__ == "__main__":
    main()
