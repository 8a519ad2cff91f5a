"""Two gloo processes on the CPU equal one process on the same global batch (aux.scope=global)."""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch.nn.parallel import DistributedDataParallel

from model.lit import SinkAwareLM

CONF = Path(__file__).parents[1] / "conf"

MODEL = dict(vocab_size=64, n_layer=2, n_embd=64, n_head=4, seq_len=16, attention="gated")
OPTIM = dict(lr=1e-3, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.0, warmup_steps=0, decay="none", min_lr_ratio=1.0)


def make_module(scope: str) -> SinkAwareLM:
    torch.manual_seed(0)
    module = SinkAwareLM(model=MODEL, optim=OPTIM, aux={"lambda": 0.1, "scope": scope})
    with torch.no_grad():  # unbalanced gates, so the aux loss and its gradient are not zero
        for block in module.model.blocks:
            block.attn.gate_proj.weight.normal_(std=1.0)
            block.attn.c_proj.weight.normal_(std=0.1)
    return module


def global_batch() -> dict:
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(0, 64, (4, 17), generator=g)
    return {"input_ids": rows[:, :-1], "targets": rows[:, 1:]}


def loss_gates_aux_grads(module, batch) -> dict:
    nll, imp, aux = module.step(batch)
    _, gates = module.model(batch["input_ids"])
    (nll.mean() + aux).backward()
    grads = torch.cat([p.grad.flatten() for p in module.model.parameters()])
    return {"lm": nll.mean().detach(), "gates": gates.detach(), "aux": aux.detach(), "grads": grads}


def shipped_ddp_options() -> dict:
    """DistributedDataParallel's options as conf/trainer/ddp.yaml sets them: the test runs the DDP training does."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        strategy = compose("train", overrides=["trainer=ddp"]).trainer.strategy
    return instantiate(strategy)._ddp_kwargs


def worker(rank: int, init_file: str, ddp_options: dict, out: dict):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    for scope in ("global", "local"):
        result = ddp_step(rank, scope, ddp_options)
        if rank == 0:
            out[scope] = result
    dist.destroy_process_group()


def ddp_step(rank: int, scope: str, ddp_options: dict) -> dict:
    module = make_module(scope)
    module.model = DistributedDataParallel(module.model, **ddp_options)  # averages gradients over the two ranks
    half = {k: v[2 * rank : 2 * rank + 2] for k, v in global_batch().items()}
    result = loss_gates_aux_grads(module, half)
    dist.all_reduce(result["lm"])
    result["lm"] /= 2
    gathered = [torch.empty_like(result["gates"]) for _ in range(2)]
    dist.all_gather(gathered, result["gates"])
    result["gates"] = torch.cat(gathered, dim=1)  # (L, B, H, T): batch halves back together
    return result


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    """Rank 0's results of one step on 2 gloo processes, for each aux scope (one spawn: imports are slow)."""
    out = mp.Manager().dict()
    options = shipped_ddp_options()
    assert "bucket_cap_mb" in options and options["static_graph"]  # the yaml reached DDP
    mp.spawn(worker, args=(str(tmp_path_factory.mktemp("ddp") / "init"), options, out), nprocs=2, join=True)
    return dict(out)


def test_two_ranks_equal_one_process_with_global_scope(two_ranks):
    single = loss_gates_aux_grads(make_module("global"), global_batch())
    ddp = two_ranks["global"]
    torch.testing.assert_close(ddp["lm"], single["lm"])
    torch.testing.assert_close(ddp["gates"], single["gates"])
    torch.testing.assert_close(ddp["aux"], single["aux"])
    assert single["aux"] > 0
    torch.testing.assert_close(ddp["grads"], single["grads"], atol=1e-6, rtol=1e-5)


def test_local_scope_balances_each_rank_on_its_own(two_ranks):
    single = loss_gates_aux_grads(make_module("local"), global_batch())
    ddp = two_ranks["local"]
    torch.testing.assert_close(ddp["lm"], single["lm"])  # the LM loss does not depend on the scope
    assert not torch.allclose(ddp["aux"], single["aux"])  # rank 0's aux: CV of its own half's importance
