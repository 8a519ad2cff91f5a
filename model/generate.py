"""Sampling with a KV cache: the prompt in one forward pass, then one token per pass over the cache."""

import torch

from model.gpt import GPT, KVCache


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, generator=None) -> torch.Tensor:
    """logits (B, V) -> next ids (B, 1). temperature 0 is greedy; top_k keeps the k most likely tokens."""
    if temperature < 0 or (top_k is not None and top_k < 1):
        raise ValueError(f"temperature={temperature} must be >= 0 and top_k={top_k} >= 1 (or null for all tokens)")
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)


@torch.no_grad()
def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    stop_id: int | None = None,
    generator=None,
):
    """Continue idx (B, T), which should start with BOS (the sink of vanilla attention), by up to
    max_new_tokens tokens, never past model.seq_len. Yields each new (B, 1) column as it is sampled;
    with stop_id, stops after every row has produced it."""
    cache = KVCache(model.cfg.n_layer)
    budget = min(max_new_tokens, model.cfg.seq_len - idx.size(1))
    logits, _ = model(idx, cache=cache)
    finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    for step in range(budget):
        next_id = sample_next(logits[:, -1], temperature, top_k, generator)
        yield next_id
        if stop_id is not None:
            finished |= next_id.squeeze(1) == stop_id
            if finished.all():
                return
        if step + 1 < budget:
            logits, _ = model(next_id, cache=cache)
