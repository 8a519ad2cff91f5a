"""The typed aux and optim configs of SinkAwareLM, checked once when it is built.

The module keeps its hyper-parameters as plain dicts (checkpoints load with weights_only=True, and a checkpoint's
hyper-parameters stay readable without this code) and builds these from them. Each bad value is a one-line error
naming the key, the value and what is allowed.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

AUX_SCOPES = ("global", "local")
DECAYS = ("cosine", "linear", "none")


def positive(x: float) -> bool:
    return 0 < x < math.inf


def finite_non_negative(x: float) -> bool:
    return 0 <= x < math.inf


def number(key: str, value, ok, allowed: str) -> float:
    """value as a float for which ok(x) holds, or an error naming key and what is allowed."""
    try:  # YAML 1.1 reads 1e-4 (no dot) as a string: numeric strings count
        x = float(value)
    except (TypeError, ValueError):
        x = math.nan  # fails every comparison below
    if isinstance(value, bool) or not ok(x):
        raise ValueError(f"{key}={value!r}: must be {allowed}")
    return x


def whole(key: str, value) -> int:
    """value as an int >= 0, or an error naming key."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key}={value!r}: must be a whole number >= 0")
    return value


def choice(key: str, value, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is not one of {', '.join(allowed)}")
    return value


def keys_of(group: str, given: Mapping, known: tuple[str, ...]) -> None:
    """A key the dataclass does not know would be silently ignored: an error naming it."""
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(f"{group}.{unknown[0]} is not a key of {group} (known: {', '.join(known)}); remove it")


@dataclass(frozen=True)
class AuxConfig:
    """conf/aux/: weight is aux.lambda (a Python keyword), the λ of L = L_LM + λ · Σ_l N_h · CV_l²."""

    weight: float
    scope: str
    shared_heads: int = 0  # m of Eq. 8; its upper bound (n_head - 2) is checked by SinkAwareLM, which knows n_head

    def __post_init__(self):
        object.__setattr__(
            self,
            "weight",
            number("aux.lambda", self.weight, finite_non_negative, "a number >= 0, e.g. aux.lambda=1e-4"),
        )
        choice("aux.scope", self.scope, AUX_SCOPES)
        whole("aux.shared_heads", self.shared_heads)

    @classmethod
    def from_dict(cls, aux: Mapping) -> "AuxConfig":
        keys_of("aux", aux, ("lambda", "scope", "shared_heads"))
        if "lambda" not in aux or "scope" not in aux:
            raise ValueError(f"aux={dict(aux)}: needs aux.lambda and aux.scope (conf/aux/default.yaml has both)")
        return cls(weight=aux["lambda"], scope=aux["scope"], shared_heads=aux.get("shared_heads", 0))


@dataclass(frozen=True)
class OptimConfig:
    """conf/optim/: AdamW with linear warmup, then decay to min_lr_ratio of the peak over trainer.max_steps."""

    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    warmup_steps: int
    decay: str
    min_lr_ratio: float

    def __post_init__(self):
        # lr 0 is allowed: the weights stay as they are (a measurement run, tests of logging over a fixed state)
        object.__setattr__(
            self, "lr", number("optim.lr", self.lr, finite_non_negative, "a number >= 0, e.g. optim.lr=3e-3")
        )
        if len(self.betas) != 2:
            raise ValueError(f"optim.betas={list(self.betas)}: must be two numbers, e.g. optim.betas=[0.9,0.95]")
        betas = tuple(
            number(f"optim.betas[{i}]", b, lambda x: 0 <= x < 1, "in [0, 1)") for i, b in enumerate(self.betas)
        )
        object.__setattr__(self, "betas", betas)
        object.__setattr__(self, "eps", number("optim.eps", self.eps, positive, "a number > 0, e.g. optim.eps=1e-8"))
        object.__setattr__(
            self,
            "weight_decay",
            number("optim.weight_decay", self.weight_decay, finite_non_negative, "a number >= 0"),
        )
        whole("optim.warmup_steps", self.warmup_steps)
        choice("optim.decay", self.decay, DECAYS)
        object.__setattr__(
            self, "min_lr_ratio", number("optim.min_lr_ratio", self.min_lr_ratio, lambda x: 0 <= x <= 1, "in [0, 1]")
        )

    @classmethod
    def from_dict(cls, optim: Mapping) -> "OptimConfig":
        names = tuple(f.name for f in fields(cls))
        keys_of("optim", optim, names)
        missing = [name for name in names if name not in optim]
        if missing:
            raise ValueError(f"optim.{missing[0]} is missing: conf/optim/adamw.yaml lists every key of optim")
        return cls(**{name: optim[name] for name in names})
