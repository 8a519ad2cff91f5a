"""BPB, loss and head importance over validation rows exactly as training validation computes them, and the
head-ablation curve (BPB with the k least / most important heads of every layer switched off)."""

import hashlib
import logging
from itertools import islice

import torch
from torch.utils.data import default_collate

from evaluation.loading import Runtime
from model.balance import importance
from model.lit import GatedLM
from model.metrics import BitsPerByte, token_nll

log = logging.getLogger("eval")


class RecordedDocuments:
    """A split's document stream that notes the id of each document as it is read (the sha1 of its text when the
    corpus has no id column, as the split itself does)."""

    def __init__(self, documents, corpus, ids: list[str]):
        self.documents, self.corpus, self.ids = documents, corpus, ids

    def state_dict(self):
        return self.documents.state_dict()

    def load_state_dict(self, state):
        self.documents.load_state_dict(state)

    def __iter__(self):
        for doc in self.documents:
            doc_id = doc.get(self.corpus.id_column)
            text = doc[self.corpus.text_column]
            self.ids.append(str(doc_id) if doc_id is not None else hashlib.sha1(text.encode()).hexdigest())
            yield doc


def validation_batches(datamodule, rows: int) -> tuple[list[dict], list[str]]:
    """The first `rows` packed rows of the validation split, as the training validation loop sees them (one pass
    over the split's documents in the shard order of data.seed, so the same rows every time), in batches of
    data.batch_size; and the ids of the documents those rows hold, in order (the last one may be cut)."""
    packed, ids = datamodule.rows("validation"), []
    read = packed.documents
    packed.documents = lambda epoch: RecordedDocuments(read(epoch), datamodule.corpus, ids)
    examples = list(islice(packed, rows))  # read lazily: no document after the last row's is drawn
    if len(examples) < rows:
        log.warning("the validation split has only %d rows of the %d asked for: using them all", len(examples), rows)
    if not examples:
        raise ValueError("the validation split is empty: check data.corpus.val_permille and the corpus")
    size = datamodule.batch_size
    return [default_collate(examples[i : i + size]) for i in range(0, len(examples), size)], ids


def rows_fingerprint(batches: list[dict], ids: list[str]) -> dict:
    """What identifies the scored rows: their number, their documents' ids (count and sha256 of the ids joined by
    newlines) and the sha256 of their tokens (each row's inputs and its last target, int64)."""
    tokens = hashlib.sha256()
    for batch in batches:
        rows = torch.cat([batch["input_ids"], batch["targets"][:, -1:]], dim=1)
        tokens.update(rows.to(torch.int64).numpy().tobytes())
    return {
        "count": sum(batch["input_ids"].size(0) for batch in batches),
        "documents": len(ids),
        "documents_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
        "tokens_sha256": tokens.hexdigest(),
    }


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
