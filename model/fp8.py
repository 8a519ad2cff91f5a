"""model.fp8: float8 matmuls for the GPT's Linear layers through torchao's float8 training (docs/fp8.md).

`model.fp8: tensorwise | rowwise` swaps the attention projections (c_q, c_k, c_v, c_proj) and the MLP (c_fc, c_proj)
of every block for torchao's Float8Linear: inputs, weights and output gradients are cast to float8 with dynamic
scales (one per tensor, or one per row), the matmuls run on float8 tensor cores and accumulate in higher precision;
the weights, the optimizer state and every other op stay as they are (fp32 master weights, bf16 autocast). Kept out:
lm_head (the logits and the loss are the most precision-sensitive matmul) and the gated variant's gate projection
(C -> H; the gates, importance and the aux loss are computed as with fp8 off), by name, and any Linear with a
dimension that is not a multiple of 16 (the float8 kernels need it). A converted layer keeps the state_dict key and
tensor of nn.Linear, so checkpoints move freely between fp8 and bf16 runs and eval.py needs no torchao.

SinkAwareLM.configure_model converts before FSDP2's fully_shard and torch.compile. Under FSDP2 the tensorwise recipe
all-gathers the weights in float8 (half the bytes of bf16) and their scales are computed once per step, after the
optimizer step, in one all-reduce (precompute_fsdp_scales); rowwise all-gathers in the weights' own dtype.
"""

import dataclasses

import torch
import torch.nn as nn

RECIPES = ("tensorwise", "rowwise")  # torchao's Float8LinearConfig.from_recipe_name names
KEPT_OUT = ("lm_head", "gate_proj")  # module names (last part of the qualified name) that stay in high precision
MIN_CAPABILITY = (8, 9)  # float8 tensor cores: Ada (8.9), Hopper (9.0), Blackwell
INSTALL = "pip install -e '.[fp8]'"


def converts(module: nn.Module, fqn: str) -> bool:
    """torchao's module_filter_fn: a plain nn.Linear (not one converted already), not kept out by name, with both
    dimensions multiples of 16."""
    if type(module) is not nn.Linear or fqn.rsplit(".", 1)[-1] in KEPT_OUT:
        return False
    out_features, in_features = module.weight.shape
    return out_features % 16 == 0 and in_features % 16 == 0


def check_device(recipe: str, device: torch.device) -> None:
    """A one-line ValueError where float8 matmuls cannot run: off CUDA, or on a GPU without float8 tensor cores."""
    if device.type != "cuda":
        raise ValueError(
            f"model.fp8={recipe} needs a CUDA GPU with float8 matmuls (compute capability >= 8.9: Ada, Hopper or "
            f"newer) and this run is on the {device.type.upper()}: set model.fp8=null (bf16) or train on such a GPU"
        )
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        raise ValueError(
            f"model.fp8={recipe} needs float8 matmuls (compute capability >= 8.9: Ada, Hopper or newer) and "
            f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}: set model.fp8=null (bf16)"
        )


def torchao_float8():
    """torchao.float8, or a one-line ValueError naming the fix when torchao is not installed."""
    try:
        import torchao.float8
    except ImportError as err:
        raise ValueError(f"model.fp8 needs torchao, which is not installed ({err}): {INSTALL}") from None
    return torchao.float8


def fp8_config(recipe: str, fsdp: bool = False):
    """torchao's Float8LinearConfig of the recipe (one of RECIPES: GPTConfig checks model.fp8); under FSDP2 tensorwise
    all-gathers the weights in float8."""
    float8 = torchao_float8()
    config = float8.Float8LinearConfig.from_recipe_name(recipe)
    if fsdp and recipe == "tensorwise":
        config = dataclasses.replace(config, enable_fsdp_float8_all_gather=True)
    return config


def convert(model: nn.Module, recipe: str, fsdp: bool = False) -> list[str]:
    """Swap the Linear layers `converts` accepts for torchao's Float8Linear, in place (before fully_shard and
    compile). Returns the qualified names of the converted layers."""
    config = fp8_config(recipe, fsdp)
    before = {name for name, module in model.named_modules() if type(module) is nn.Linear}
    torchao_float8().convert_to_float8_training(model, config=config, module_filter_fn=converts)
    return sorted(name for name, module in model.named_modules() if name in before and type(module) is not nn.Linear)


def converted_names(model: nn.Module) -> list[str]:
    """The qualified names of the model's Float8Linear layers (none when torchao is not installed)."""
    try:
        from torchao.float8.float8_linear import Float8Linear
    except ImportError:
        return []
    return [name for name, module in model.named_modules() if isinstance(module, Float8Linear)]


def fsdp_float8_all_gather(model: nn.Module) -> bool:
    """Whether any converted layer all-gathers its weight in float8 under FSDP2 (tensorwise)."""
    return any(getattr(getattr(m, "config", None), "enable_fsdp_float8_all_gather", False) for m in model.modules())


def precompute_fsdp_scales(model: nn.Module) -> None:
    """After each optimizer step under FSDP2 with float8 all-gather: the float8 scales of all sharded weights in one
    all-reduce (otherwise each weight's all-gather computes its own, one all-reduce per weight). Once set, a scale is
    used by the next all-gather, so this must follow every optimizer step."""
    torchao_float8().precompute_float8_dynamic_scale_for_fsdp(model)
