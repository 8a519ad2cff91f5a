"""AuxConfig and OptimConfig: checked once when SinkAwareLM is built, each bad value a one-line error naming its key;
and SinkAwareLM gives every attribute the callbacks read through HeadBalancedModule."""

import typing

import pytest

from model.config import AuxConfig, OptimConfig
from model.lit import GatedLM, HeadBalancedModule, SinkAwareLM

MODEL = dict(vocab_size=64, n_layer=2, n_embd=64, n_head=4, seq_len=16, attention="gated", backend="reference")
OPTIM = dict(lr=1e-3, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.1, warmup_steps=2, decay="cosine", min_lr_ratio=0.1)
AUX = {"lambda": 1e-4, "scope": "global", "shared_heads": 0}


def test_good_dicts_become_typed_configs_and_stay_plain_dicts_in_the_hyper_parameters():
    module = SinkAwareLM(model=MODEL, optim=OPTIM, aux={**AUX, "lambda": "1e-4"})  # YAML 1.1 reads 1e-4 as text
    assert module.aux_config == AuxConfig(weight=1e-4, scope="global", shared_heads=0)
    assert module.optim_config.betas == (0.9, 0.95) and module.optim_config.decay == "cosine"
    assert module.hparams.aux == {**AUX, "lambda": "1e-4"}  # what the checkpoint keeps: the dict as given
    assert AuxConfig.from_dict({"lambda": 0, "scope": "local"}).shared_heads == 0  # pretraining dicts may omit it


@pytest.mark.parametrize(
    "aux, message",
    [
        ({"lambda": -1.0}, r"^aux.lambda=-1.0: must be a number >= 0"),
        ({"lambda": "big"}, r"^aux.lambda='big': must be a number >= 0"),
        ({"lambda": float("nan")}, r"^aux.lambda=nan: must be a number >= 0"),
        ({"lambda": True}, r"^aux.lambda=True: must be a number >= 0"),
        ({"scope": "world"}, r"^aux.scope='world' is not one of global, local$"),
        ({"shared_heads": 1.5}, r"^aux.shared_heads=1.5: must be a whole number >= 0$"),
        ({"shared_heads": -1}, r"^aux.shared_heads=-1: must be a whole number >= 0$"),
        ({"shared_heads": 3}, r"^aux.shared_heads=3: must be between 0 and 2 \(the model has 4 heads per layer"),
        ({"lamda": 1.0}, r"^aux.lamda is not a key of aux \(known: lambda, scope, shared_heads\)"),
    ],
)
def test_a_bad_aux_value_is_one_line_naming_its_key(aux, message):
    with pytest.raises(ValueError, match=message) as err:
        SinkAwareLM(model=MODEL, optim=OPTIM, aux={**AUX, **aux})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "optim, message",
    [
        ({"lr": -1e-3}, r"^optim.lr=-0.001: must be a number >= 0"),
        ({"lr": None}, r"^optim.lr=None: must be a number >= 0"),
        ({"betas": [0.9]}, r"^optim.betas=\[0.9\]: must be two numbers"),
        ({"betas": [0.9, 1.0]}, r"^optim.betas\[1\]=1.0: must be in \[0, 1\)$"),
        ({"eps": 0}, r"^optim.eps=0: must be a number > 0"),
        ({"weight_decay": -0.1}, r"^optim.weight_decay=-0.1: must be a number >= 0$"),
        ({"warmup_steps": 2.5}, r"^optim.warmup_steps=2.5: must be a whole number >= 0$"),
        ({"decay": "exp"}, r"^optim.decay='exp' is not one of cosine, linear, none$"),
        ({"min_lr_ratio": 1.5}, r"^optim.min_lr_ratio=1.5: must be in \[0, 1\]$"),
        ({"momentum": 0.9}, r"^optim.momentum is not a key of optim"),
    ],
)
def test_a_bad_optim_value_is_one_line_naming_its_key(optim, message):
    with pytest.raises(ValueError, match=message) as err:
        SinkAwareLM(model=MODEL, optim={**OPTIM, **optim}, aux=AUX)
    assert "\n" not in str(err.value)


def test_a_missing_optim_key_is_named():
    with pytest.raises(ValueError, match=r"^optim.eps is missing"):
        OptimConfig.from_dict({k: v for k, v in OPTIM.items() if k != "eps"})


def test_sink_aware_lm_gives_what_the_callbacks_read():
    module = SinkAwareLM(model=MODEL, optim=OPTIM, aux=AUX)
    for protocol, obj in ((HeadBalancedModule, module), (GatedLM, module.model)):
        members = set(typing.get_type_hints(protocol)) | {
            name for name in vars(protocol) if callable(getattr(protocol, name)) and not name.startswith("_")
        }
        missing = [name for name in sorted(members) if not hasattr(obj, name)]
        assert not missing, f"{type(obj).__name__} lacks {missing} of {protocol.__name__}"
    assert module.last_importance is None and module.shared_heads.shape == (2, 4)
