"""BPB, loss and head importance over validation rows exactly as training validation computes them, and the
head-ablation curve (BPB with the k least / most important heads of every layer switched off)."""

import logging

import torch

from evaluation.loading import GatedLM, Runtime
from model.balance import importance
from model.lit import BitsPerByte, token_nll

log = logging.getLogger("eval")


def validation_batches(datamodule, rows: int) -> list[dict]:
    """The first `rows` packed rows of the validation split, as the training validation loop sees them."""
    batches, seen = [], 0
    for batch in datamodule.loader("validation"):
        if seen >= rows:
            break
        take = min(rows - seen, batch["input_ids"].size(0))
        batches.append({key: value[:take] for key, value in batch.items()})
        seen += take
    if seen < rows:
        log.warning("the validation split has only %d rows of the %d asked for: using them all", seen, rows)
    if seen == 0:
        raise ValueError("the validation split is empty: check data.corpus.val_permille and the corpus")
    return batches


@torch.no_grad()
def measure(model: GatedLM, batches: list[dict], runtime: Runtime, head_mask=None) -> dict:
    """BPB and loss exactly as SinkAwareLM's validation computes them, and importance (L, H) over all rows."""
    bpb = BitsPerByte().to(runtime.device)
    nats = torch.zeros((), dtype=torch.float64, device=runtime.device)
    imp_sum, tokens, rows = 0.0, 0, 0
    for batch in batches:
        idx, targets = batch["input_ids"].to(runtime.device), batch["targets"].to(runtime.device)
        with runtime.autocast():
            logits, gates = model(idx, head_mask)
        nll = token_nll(logits, targets)
        bpb.update(nll, batch["target_bytes"].to(runtime.device))
        nats += nll.double().sum()
        # every row has the same length, so the mean over rows of per-batch means weighted by rows is exact
        imp_sum = imp_sum + importance(gates.float()).double() * idx.size(0)
        tokens, rows = tokens + nll.numel(), rows + idx.size(0)
    return {
        "bpb": bpb.compute().item(),
        "loss": (nats / tokens).item(),
        "importance": (imp_sum / rows).cpu(),
        "rows": rows,
        "tokens": tokens,
    }


def ablation_masks(imp: torch.Tensor, k: int, least: bool) -> torch.Tensor:
    """(L, H) head_mask with the k least (or most) important heads of every layer switched off."""
    order = imp.argsort(dim=1, descending=not least)
    mask = torch.ones_like(imp)
    return mask.scatter_(1, order[:, :k], 0.0)


def ablation_curve(model: GatedLM, batches: list[dict], runtime: Runtime, imp: torch.Tensor) -> dict:
    """BPB with k = 0..H heads per layer switched off, least important first, and most important first."""
    n_head = imp.size(1)
    memo = {}  # k = 0 and k = H are the same mask in both orders: measured once

    def bpb_at(mask):
        key = tuple(mask.flatten().tolist())
        if key not in memo:
            memo[key] = measure(model, batches, runtime, mask.to(runtime.device))["bpb"]
        return memo[key]

    curve = {"k": list(range(n_head + 1)), "least_important": [], "most_important": []}
    for k in curve["k"]:
        curve["least_important"].append(bpb_at(ablation_masks(imp, k, least=True)))
        curve["most_important"].append(bpb_at(ablation_masks(imp, k, least=False)))
    curve["rows"] = sum(b["input_ids"].size(0) for b in batches)
    return curve
