"""The named model sizes have the parameter counts of docs/architecture.md's table (built on the meta device)."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from model.attention import VARIANTS
from model.gpt import GPT, GPTConfig

CONF = Path(__file__).parents[1] / "conf" / "model"


@pytest.mark.parametrize(("size", "expected"), [("0.6b", 0.56e9), ("1b", 1.08e9), ("2b", 1.88e9)])
@pytest.mark.parametrize("attention", list(VARIANTS))
def test_parameter_count_at_vocab_65536(size, expected, attention):
    cfg = OmegaConf.load(CONF / f"{size}.yaml")
    fields = {k: cfg[k] for k in ("n_layer", "n_embd", "n_head", "seq_len")}
    with torch.device("meta"):
        model = GPT(GPTConfig(**fields, vocab_size=65536, attention=attention))
    assert model.cfg.head_dim == 128
    assert abs(model.num_params() - expected) / expected < 0.02, model.num_params()
