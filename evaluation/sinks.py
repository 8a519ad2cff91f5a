"""Where the heads' attention sinks: on position 0, or on the start of each query's own document.

Rows pack several documents, each after its own BOS, and the vanilla gate counts only position 0. Here the explicit
attention of every head, softmax(q·k / sqrt(D)) over the causal window from each layer's rotated q and k, is read on
a few rows: per head, the mean attention a query t >= 1 puts on position 0 and on its own document's start (the
nearest BOS at or before t). Sink attention's extra logit takes 1 - G, so the keys get G·softmax; gated attention's
gate scales the output, not the softmax over the keys. Sink ratio (Gu et al.): the share of heads whose mean
attention on the sink exceeds a threshold, here by each definition of the sink.
"""

import math

import torch

from model.attention import attention_beside_the_sink_logit
from model.balance import sink_ratio
from model.gpt import GPT


def document_starts(idx: torch.Tensor, bos_id: int) -> torch.Tensor:
    """(B, T) token ids -> (B, T): the position of the nearest BOS at or before each position (0 if none)."""
    positions = torch.arange(idx.size(1), device=idx.device).expand_as(idx)
    return torch.where(idx == bos_id, positions, 0).cummax(dim=1).values


def key_attention(attn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """(B, H, T, T) in fp32: the attention each query puts on each key of a CausalSelfAttention (attn) with normed
    input x; G·softmax for sink attention."""
    q, k = attn.rotated_qk(x.float(), cos.float(), sin.float())
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    T = q.size(-2)
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    probs = scores.softmax(dim=-1)
    if attn.cfg.attention == "sink":
        probs = probs * attention_beside_the_sink_logit(scores.logsumexp(dim=-1), attn.sink_logit).unsqueeze(-1)
    return probs


def attention_on_starts(probs: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """probs (B, H, T, T), starts (B, T) -> per head (H,), summed over rows and queries t >= 1: the attention on
    position 0, and on the query's own document start."""
    probs, starts = probs[:, :, 1:], starts[:, 1:]
    own = probs.gather(-1, starts[:, None, :, None].expand(*probs.shape[:3], 1)).squeeze(-1)
    return probs[..., 0].sum(dim=(0, 2)), own.sum(dim=(0, 2))


@torch.no_grad()
def sink_attention(model: GPT, batches: list[dict], rows: int, bos_id: int, threshold: float, runtime) -> dict:
    """Mean attention on position 0 and on the own document's start per head (L, H) over the first `rows` rows of
    `batches` (one row at a time: a T×T matrix per head), the sink ratio by each, and the share of queries that
    are not in their row's first document (where the two differ)."""
    inputs = {}  # layer -> (normed x, cos, sin) of the last forward pass
    hooks = [
        block.attn.register_forward_pre_hook(lambda module, args, i=i: inputs.__setitem__(i, args[:3]))
        for i, block in enumerate(model.blocks)
    ]
    first = own = 0.0
    queries = later = 0
    try:
        for idx in torch.cat([batch["input_ids"] for batch in batches])[:rows]:
            idx = idx[None].to(runtime.device)
            with runtime.autocast():
                model(idx)
            starts = document_starts(idx, bos_id)
            sums = [attention_on_starts(key_attention(b.attn, *inputs[i]), starts) for i, b in enumerate(model.blocks)]
            first = first + torch.stack([s[0] for s in sums]).double().cpu()
            own = own + torch.stack([s[1] for s in sums]).double().cpu()
            queries, later = queries + idx.size(1) - 1, later + int((starts[:, 1:] > 0).sum())
    finally:
        for hook in hooks:
            hook.remove()
    first, own = first / queries, own / queries
    result = {"rows": min(rows, sum(b["input_ids"].size(0) for b in batches)), "queries": queries}
    result["later_document_share"] = later / queries
    for name, attention in (("position0", first), ("document_start", own)):
        ratio = sink_ratio(1 - attention, threshold)  # sink_ratio takes the gate: 1 - attention on the sink
        result[name] = {
            "attention": attention.tolist(),
            "sink_ratio": ratio.tolist(),
            "sink_ratio_mean": ratio.mean().item(),
        }
    return result


def sinks_figure(results: dict[str, dict]):
    """Per layer, the mean over heads of the attention on position 0 (solid) and on the own document start
    (dashed), one colour per checkpoint."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=100, constrained_layout=True)
    for i, (label, sinks) in enumerate(results.items()):
        for name, style, what in (("position0", "o-", "position 0"), ("document_start", "s--", "own document start")):
            per_layer = torch.tensor(sinks[name]["attention"]).mean(dim=1)
            ax.plot(range(len(per_layer)), per_layer, style, color=f"C{i}", label=f"{label}: {what}")
    ax.set_xlabel("layer")
    ax.set_ylabel("mean attention (over heads, queries t ≥ 1)")
    ax.set_ylim(bottom=0)
    ax.set_title("where the attention sinks: position 0 vs each query's own document start", fontsize=9)
    ax.legend(fontsize=7)
    return fig
