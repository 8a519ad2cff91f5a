"""compile=true | blocks | false: torch.compile of the whole GPT, or of each block as its own graph (compiled once and
reused by every layer, so its compile time does not grow with the depth), against the eager model (CPU, inductor)."""

import pytest
import torch
from torch._dynamo.utils import counters

from model.lit import SinkAwareLM

MODEL = dict(vocab_size=256, n_layer=3, n_embd=64, n_head=4, seq_len=32, attention="gated")
OPTIM = dict(lr=1e-3, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.0, warmup_steps=0, decay="none", min_lr_ratio=1.0)
AUX = {"lambda": 1e-2, "scope": "local"}


def module(compile) -> SinkAwareLM:
    torch.manual_seed(0)
    lm = SinkAwareLM(model=MODEL, optim=OPTIM, aux=AUX, compile=compile)
    with torch.no_grad():  # unbalanced gates, so the aux loss has a gradient
        for block in lm.model.blocks:
            block.attn.gate_proj.weight.normal_(0, 0.5)
    lm.configure_model()
    return lm


def loss_and_grads(lm: SinkAwareLM, batch: dict):
    nll, imp, aux = lm.step(batch)
    (nll.mean() + aux).backward()
    return nll.mean().detach(), imp.detach(), {n: p.grad for n, p in lm.named_parameters()}


@pytest.mark.slow
def test_blocks_compile_one_graph_for_every_layer_and_match_the_eager_model():
    idx = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": idx[:, :-1], "targets": idx[:, 1:]}
    eager = loss_and_grads(module(False), batch)
    torch._dynamo.reset()
    counters.clear()
    lm = module("blocks")
    compiled = loss_and_grads(lm, batch)
    assert all(block._compiled_call_impl is not None for block in lm.model.blocks)
    assert lm.model._compiled_call_impl is None  # the model around the blocks stays eager
    # one block's frame was compiled, then reused by the other layers (and the compiled loss: a second frame)
    assert counters["frames"]["ok"] == 2, dict(counters["frames"])
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-5, atol=1e-5)  # importance (the gates)
    for name, grad in eager[2].items():
        torch.testing.assert_close(compiled[2][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert list(lm.state_dict()) == list(module(False).state_dict())  # checkpoints keep their keys


def test_an_unknown_compile_choice_names_the_choices():
    with pytest.raises(ValueError, match=r"compile='graph': use true .* blocks .* or false"):
        SinkAwareLM(model=MODEL, optim=OPTIM, aux=AUX, compile="graph")
