"""The compact GPT (nanochat style) with attention variants that all expose a per-head gate.

Every attention layer computes the plain softmax attention of a head, softmax(s)·V, together with the
natural-log LSE of its scores; its variant (model/attention.py: vanilla, sink, gated) turns that into the
head's gate G (B, H, T) and, unless the gate is only read off (vanilla), multiplies the head's output by it.
The kernel ("backend") is the explicit reference, FlexAttention or PyTorch's fused sdpa (model/attention.py);
"auto" is, on CUDA, flex for variants whose gate needs the LSE and sdpa for the others (the faster of the two
for gated in the measurements of docs/benchmarks.md); the reference elsewhere.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from model.attention import VARIANTS, flex_causal_attention, reference_attention, sdpa_causal_attention
from model.fp8 import RECIPES

BACKENDS = ("auto", "reference", "flex", "sdpa")
QK_NORMS = ("rms", "rms_gain", "none")  # parameter-free RMSNorm (nanochat) | RMSNorm with a learned gain (Qwen3) | none
FP8_RECIPES = (None, *RECIPES)  # torchao float8 training recipes (model/fp8.py); None = bf16


@dataclass
class GPTConfig:
    vocab_size: int = 65536
    n_layer: int = 20
    n_embd: int = 1280
    n_head: int = 10
    seq_len: int = 2048
    attention: str = "vanilla"  # a variant of model/attention.py: vanilla | sink | gated
    backend: str = "auto"  # auto (CUDA: flex, sdpa for gated; else reference) | reference | flex | sdpa (gated only)
    rope_base: float = 10000.0
    flex_kernel_options: dict | None = None  # FlexAttention tile sizes etc. (e.g. {"USE_TMA": true}); None = torch's
    activation_checkpointing: bool = False  # recompute each block in backward: less memory (2b on 80 GB)
    qk_norm: str = "rms"  # rms | rms_gain | none: the normalisation of q and k before the rotary embedding
    fp8: str | None = None  # None (bf16) | tensorwise | rowwise: float8 matmuls through torchao (model/fp8.py)

    def __post_init__(self):
        for key in ("n_layer", "n_embd", "n_head", "seq_len", "vocab_size"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) <= 0:
                raise ValueError(f"model.{key}={getattr(self, key)!r} must be a positive integer")
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"model.qk_norm={self.qk_norm!r} is not one of {QK_NORMS}")
        if self.fp8 not in FP8_RECIPES:
            raise ValueError(f"model.fp8={self.fp8!r} is not one of {FP8_RECIPES} (null: bf16)")
        if self.attention not in VARIANTS:
            raise ValueError(f"attention={self.attention!r} is not one of {tuple(VARIANTS)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"attention.backend={self.backend!r} is not one of {BACKENDS}")
        if self.backend == "sdpa" and VARIANTS[self.attention].needs_lse:
            raise ValueError(
                f"attention.backend=sdpa returns no LSE, which the {self.attention} gate needs: use flex or auto"
            )
        if self.n_embd % self.n_head:
            raise ValueError(f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}")
        if self.head_dim % 2:
            raise ValueError(
                f"model.n_embd / model.n_head = {self.n_embd} / {self.n_head} = {self.head_dim}: the rotary embedding "
                "needs an even head dimension; pick n_embd and n_head so that n_embd / n_head is even"
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension: parameter-free as in nanochat, or with a learned per-dimension gain (dim given),
    as Qwen3 normalises q and k. The gain starts at 1; being 1-D, it gets no weight decay (model/lit.py)."""

    def __init__(self, dim: int | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim)) if dim else None

    def forward(self, x):
        return F.rms_norm(x, (x.size(-1),), self.weight)


def make_qk_norm(kind: str, head_dim: int) -> nn.Module:
    """model.qk_norm: rms | rms_gain | none (LLaMA: raw q and k, so scores are unbounded)."""
    if kind == "none":
        return nn.Identity()
    return RMSNorm(head_dim if kind == "rms_gain" else None)


def rotary_tables(seq_len: int, head_dim: int, base: float):
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()  # (T, D/2) each


def apply_rotary(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        C, H = cfg.n_embd, cfg.n_head
        self.c_q = nn.Linear(C, C, bias=False)
        self.c_k = nn.Linear(C, C, bias=False)
        self.c_v = nn.Linear(C, C, bias=False)
        self.c_proj = nn.Linear(C, C, bias=False)
        self.q_norm = make_qk_norm(cfg.qk_norm, cfg.head_dim)  # two modules: with rms_gain each has its own gain
        self.k_norm = make_qk_norm(cfg.qk_norm, cfg.head_dim)
        self.variant = VARIANTS[cfg.attention]
        for name, make in self.variant.parameters.items():  # the gate's own: sink_logit (H,), gate_proj (C -> H)
            setattr(self, name, make(C, H))

    def forward(self, x, cos, sin, head_mask=None, cache=None):
        """x: the normed block input (B, T, C). Returns (output (B, T, C), gate (B, H, T)).

        head_mask (H,) multiplies each head's output (1 keeps, 0 ablates); None keeps all heads.
        cache: this layer's LayerCache (generation): the keys and values of earlier positions, extended here.
        """
        B, T, C = x.shape
        H, D = self.cfg.n_head, self.cfg.head_dim
        q, k = self.rotated_qk(x, cos, sin)
        v = self.c_v(x).view(B, T, H, D).transpose(1, 2)
        if cache is not None:
            k, v = cache.extend(k, v)  # all positions so far: k[:, :, :1] is still the BOS sink of vanilla
        y, gate = self.attend_and_gate(x, q, k, v)
        if head_mask is not None:
            y = y * head_mask.view(1, H, 1, 1).to(y.dtype)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.c_proj(y), gate

    def rotated_qk(self, x, cos, sin):
        """The queries and keys (B, H, T, D) of the normed block input x (B, T, C), normed (model.qk_norm) and
        rotated: the scores are q·kᵀ/√D. Separate from forward so that evaluation can rebuild the attention matrix."""
        B, T, C = x.shape
        H, D = self.cfg.n_head, self.cfg.head_dim
        q, k = (proj(x).view(B, T, H, D).transpose(1, 2) for proj in (self.c_q, self.c_k))
        q = apply_rotary(self.q_norm(q), cos[:T], sin[:T])
        k = apply_rotary(self.k_norm(k), cos[:T], sin[:T])
        return q, k

    def attend_and_gate(self, x, q, k, v):
        """The heads' outputs (B, H, T, D), multiplied by their gate unless the variant only reads it off, and
        the gate (B, H, T) in fp32 (fp64 for fp64 inputs)."""
        y, lse = self.attend(q, k, v)
        gate = self.variant.gate(self, x, q, k, lse)
        if self.variant.applied:
            y = y * gate.unsqueeze(-1).to(y.dtype)
        return y, gate

    def attend(self, q, k, v):
        """softmax(s)·V (B, H, T, D) and its LSE (B, H, T), None from sdpa."""
        backend = self.cfg.backend
        if backend == "auto":
            backend = ("flex" if self.variant.needs_lse else "sdpa") if q.is_cuda else "reference"
        if q.size(-2) != k.size(-2):  # cached generation: a few queries over the cache, no T×T matrix to avoid
            backend = "reference"
        if backend == "flex":
            return flex_causal_attention(q, k, v, self.cfg.flex_kernel_options)
        if backend == "sdpa":
            return sdpa_causal_attention(q, k, v)
        return reference_attention(q, k, v)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())  # ReLU²


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.norm = RMSNorm()
        self.attn = CausalSelfAttention(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, head_mask=None, cache=None):
        attn_out, gate = self.attn(self.norm(x), cos, sin, head_mask, cache)
        x = x + attn_out
        x = x + self.mlp(self.norm(x))
        return x, gate


class LayerCache:
    """The rotated keys and values of one layer for the positions seen so far, (B, H, S, D) each."""

    def __init__(self):
        self.k = self.v = None

    def extend(self, k, v):
        if self.k is not None:
            k, v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        self.k, self.v = k, v
        return k, v


class KVCache:
    """Per-layer key/value caches for incremental decoding: each forward pass appends its positions."""

    def __init__(self, n_layer: int):
        self.layers = [LayerCache() for _ in range(n_layer)]

    @property
    def length(self) -> int:
        first = self.layers[0].k
        return 0 if first is None else first.size(2)


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = RMSNorm()
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)  # untied
        cos, sin = rotary_tables(cfg.seq_len, cfg.head_dim, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """nanochat-style init: uniform matrices of std 1/sqrt(fan_in), zero output projections. (A variant's own
        gate parameters are made at zero by model/attention.py: every head starts with the same gate.) The q/k norm
        gains (model.qk_norm=rms_gain) start at 1: the plain RMSNorm."""
        nn.init.normal_(self.wte.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        bound = math.sqrt(3.0 / self.cfg.n_embd)
        for block in self.blocks:
            attn = block.attn
            for lin in (attn.c_q, attn.c_k, attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(lin.weight, -bound, bound)
            nn.init.zeros_(attn.c_proj.weight)
            for norm in (attn.q_norm, attn.k_norm):
                if getattr(norm, "weight", None) is not None:
                    nn.init.ones_(norm.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)

    def forward(self, idx, head_mask=None, cache=None):
        """idx (B, T) token ids. Returns logits (B, T, V) and gates (L, B, H, T) in fp32.

        head_mask (L, H): per-head output multiplier (ablation); None keeps every head.
        cache: a KVCache (generation): idx continues the positions it holds, and is added to it.
        """
        start = 0 if cache is None else cache.length
        T = idx.size(1)
        if start + T > self.cfg.seq_len:
            raise ValueError(f"sequence of {start + T} tokens is longer than model.seq_len={self.cfg.seq_len}")
        x = F.rms_norm(self.wte(idx), (self.cfg.n_embd,))
        cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]
        gates = []
        for i, block in enumerate(self.blocks):
            args = (x, cos, sin, None if head_mask is None else head_mask[i])
            if cache is not None:
                args += (cache.layers[i],)
            if self.cfg.activation_checkpointing and self.training:
                x, gate = torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
            else:
                x, gate = block(*args)
            gates.append(gate)
        logits = self.lm_head(self.norm_f(x))
        return logits, torch.stack(gates)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6·N (matmuls, fwd+bwd) + 12·L·C·T (attention scores and values,
        counted over the full T×T square as is customary, although causal attention does half)."""
        T = seq_len or self.cfg.seq_len
        n_matmul = self.num_params() - self.wte.weight.numel()
        return 6 * n_matmul + 12 * self.cfg.n_layer * self.cfg.n_embd * T
