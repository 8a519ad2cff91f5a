"""Attention kernels and the attention variants: one entry of VARIANTS per variant, nothing elsewhere.

Every attention layer computes the plain softmax attention of a head, softmax(s)·V, together with the
natural-log LSE of its scores, and its variant gives that head's gate G (B, H, T) (docs/math.md):

    vanilla  G = 1 - A[t, 0] = 1 - exp(s[t, 0] - LSE[t])           (position 0, the BOS token, is the sink)
    sink     G = sigmoid(LSE[t] - b_h),  O = G · softmax(s)·V       (b_h: a learnable logit with no value)
    gated    G = sigmoid(x_t · W_theta),  O = G · softmax(s)·V      (x_t: the normed block input)

Vanilla attention's output is the plain softmax output: its gate is read off, not applied. Three kernels give
softmax(s)·V: "reference", an explicit T×T softmax with its LSE (CPU, tests); "flex", FlexAttention with the
LSE returned by the kernel (CUDA; no T×T matrix, gradients flow through LSE); and "sdpa", PyTorch's fused
attention (cuDNN first), which returns no LSE, so only a variant whose gate needs none (gated) can use it.

Adding a variant: one Variant in VARIANTS (its gate, whether it is applied, whether it needs the LSE, its own
parameters) and one conf/attention/<name>.yaml; docs/variants.md shows a worked example.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# ----------------------------------------------------------------------------------------------------
# Kernels: (softmax(s)·V, LSE) for causal attention, shapes (B,H,T,D) and (B,H,T); sdpa gives no LSE.


def reference_attention(q, k, v):
    """Explicit causal softmax attention; materialises the T×T scores. The ground truth.

    k and v may be longer than q (generation with a KV cache): the queries are then the last positions.
    """
    T, S = q.size(-2), k.size(-2)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    causal = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))  # softmax in >= fp32 under autocast
    scores = scores.masked_fill(~causal, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1))
    return (probs.to(v.dtype) @ v), lse


@lru_cache(maxsize=8)
def _causal_block_mask(T: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(lambda b, h, q, kv: q >= kv, B=None, H=None, Q_LEN=T, KV_LEN=T, device=device)


@lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_causal_attention(q, k, v, kernel_options=None):
    """FlexAttention; LSE comes from the kernel (natural log, differentiable), no T×T matrix."""
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

    block_mask = _causal_block_mask(q.size(-2), str(q.device))
    # Inside a compiled model dynamo fuses flex_attention itself; called eagerly it needs its own compile.
    flex = flex_attention if torch.compiler.is_compiling() else _compiled_flex()
    out, aux = flex(q, k, v, block_mask=block_mask, return_aux=AuxRequest(lse=True), kernel_options=kernel_options)
    return out, aux.lse


# cuDNN first (on an H100 its fwd+bwd is ~1.45x PyTorch's flash kernel), then the others as fallbacks.
SDPA_PRIORITY = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


def sdpa_causal_attention(q, k, v):
    """PyTorch's fused attention, cuDNN first; (output, None): no LSE."""
    with sdpa_kernel(SDPA_PRIORITY, set_priority=True):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True), None


# ----------------------------------------------------------------------------------------------------
# The gate formulas, (B, H, T) in the LSE's precision; the Hugging Face models of model/hf.py use them too.


def attention_off_the_sink(sink_score, lse):
    """Vanilla: 1 - A[t, 0] = 1 - exp(s[t, 0] - LSE[t]), exact near 0 and 1; the clamp only removes rounding
    above 0 (s[t, 0] <= LSE[t])."""
    return -torch.expm1((sink_score - lse).clamp(max=0.0))


def attention_beside_the_sink_logit(lse, sink_logit):
    """Sink: sigmoid(LSE[t] - b_h), the attention a softmax over [s[t, ·], b_h] does not give to b_h."""
    return torch.sigmoid(lse - sink_logit.to(lse.dtype).view(1, -1, 1))


# ----------------------------------------------------------------------------------------------------
# The variants of model/gpt.py. A gate function takes the attention layer (for its parameters), x (B, T, C),
# the rotated q (B, H, T, D) and k (B, H, S, D), and the LSE (B, H, T) or None, and returns G (B, H, T) in fp32
# (fp64 for fp64 inputs).


def vanilla_gate(layer, x, q, k, lse):
    acc = lse.dtype  # the LSE's precision (>= fp32)
    sink_score = (q.to(acc) * k[:, :, :1].to(acc)).sum(-1) / math.sqrt(q.size(-1))  # s[t, 0]
    return attention_off_the_sink(sink_score, lse)


def sink_gate(layer, x, q, k, lse):
    return attention_beside_the_sink_logit(lse, layer.sink_logit)


def gated_gate(layer, x, q, k, lse):
    acc = torch.promote_types(x.dtype, torch.float32)
    return torch.sigmoid(layer.gate_proj(x).to(acc)).transpose(1, 2)


def zero_logits(C: int, H: int) -> nn.Parameter:
    """b_h, one per head of the layer; 0 at the start."""
    return nn.Parameter(torch.zeros(H))


def zero_projection(C: int, H: int) -> nn.Linear:
    """W_theta: one scalar gate per head and token; zero at the start, so every gate starts at sigmoid(0) = 0.5."""
    projection = nn.Linear(C, H, bias=False)
    nn.init.zeros_(projection.weight)
    return projection


@dataclass(frozen=True)
class Variant:
    """One attention variant: how its gate is computed and what the layer does with it."""

    gate: Callable[..., torch.Tensor]  # (layer, x, q, k, lse) -> G (B, H, T), see above
    applied: bool = True  # O = G · softmax(s)·V before the output projection; False: G is only read off
    needs_lse: bool = True  # G is a function of the LSE, which the sdpa kernel does not return
    # The gate's own parameters: attribute name on the layer (so its state_dict key) -> factory (C, H) -> a
    # parameter or module, initialised. Their gradients come from the LM loss and the aux loss through G.
    parameters: dict[str, Callable[[int, int], nn.Module]] = field(default_factory=dict)


VARIANTS: dict[str, Variant] = {
    "vanilla": Variant(vanilla_gate, applied=False),
    "sink": Variant(sink_gate, parameters={"sink_logit": zero_logits}),
    "gated": Variant(gated_gate, needs_lse=False, parameters={"gate_proj": zero_projection}),
}
