"""Training throughput per configuration: tokens/s, MFU and peak memory, Lightning vs a plain PyTorch loop.

    python bench/throughput.py                                   # 0.6b, all variants, aux off/on, both loops
    python bench/throughput.py --model 2b --attention gated --aux 1e-4 --loops plain --activation-checkpointing

Both loops run the same LightningModule math (SinkAwareLM.step: LM loss + aux loss) on the same fixed
batches (random tokens: this measures the model, not the data loader), in bf16 autocast with a compiled
model and fused AdamW; the timed window starts after the warm-up steps (compilation) and is bracketed by
CUDA syncs. MFU = tokens/s · (6·N + 12·L·C·T) / peak, peak = the GPU's dense bf16 FLOP/s.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.pytorch.strategies import DDPStrategy

sys.path.insert(0, str(Path(__file__).parents[1]))
from model.lit import SinkAwareLM  # noqa: E402

CONF = Path(__file__).parents[1] / "conf"
H100_BF16_DENSE = 989.4e12  # also the H200's (same compute die); Lightning knows the H100 only


def model_fields(name: str) -> dict:
    cfg = yaml.safe_load((CONF / "model" / f"{name}.yaml").read_text())
    return {k: v for k, v in cfg.items() if not str(v).startswith("${")}  # drop interpolations


def make_module(args, attention: str, aux_lambda: float) -> SinkAwareLM:
    model = {**model_fields(args.model), "attention": attention, "vocab_size": args.vocab, "backend": args.backend}
    model["activation_checkpointing"] = args.activation_checkpointing
    optim = yaml.safe_load((CONF / "optim" / "adamw.yaml").read_text())
    return SinkAwareLM(model=model, optim=optim, aux={"lambda": aux_lambda, "scope": args.aux_scope}, compile=True)


def fixed_batches(args, seq_len: int, n: int = 4) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, args.vocab, (args.batch_size, seq_len + 1), generator=g) for _ in range(n)]
    return [{"input_ids": r[:, :-1], "targets": r[:, 1:], "target_bytes": torch.ones_like(r[:, 1:])} for r in rows]


class Stopwatch(L.Callback):
    """Times optimizer steps warmup+1 .. end, with CUDA syncs at both ends."""

    def __init__(self, warmup: int):
        self.warmup, self.start = warmup, None

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.warmup:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = time.perf_counter()

    def on_train_end(self, trainer, *args):
        torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start


def use_ddp(args) -> bool:
    return args.devices > 1 or args.strategy == "ddp"


def ddp_options(args) -> dict:
    """DDPStrategy's options from conf/trainer/ddp.yaml, with --bucket-cap-mb applied."""
    options = yaml.safe_load((CONF / "trainer" / "ddp.yaml").read_text())["strategy"]
    del options["_target_"]
    if args.bucket_cap_mb:
        options["bucket_cap_mb"] = args.bucket_cap_mb
    return options


def ddp_strategy(args) -> DDPStrategy:
    """The strategy of conf/trainer/ddp.yaml, with the gradient all-reduce options under test."""
    hook = None
    if args.ddp_comm_hook == "bf16":
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook as hook
    return DDPStrategy(**ddp_options(args), ddp_comm_hook=hook)


def run_lightning(args, module, batches) -> float:
    stopwatch = Stopwatch(args.warmup)
    trainer = L.Trainer(
        accelerator="gpu",
        devices=args.devices,
        strategy=ddp_strategy(args) if use_ddp(args) else "auto",
        accumulate_grad_batches=args.accumulate,
        precision="bf16-mixed",
        max_steps=args.warmup + args.steps,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[stopwatch],
    )
    n_batches = (args.warmup + args.steps) * args.accumulate
    loader = torch.utils.data.DataLoader(batches * n_batches, batch_size=None, pin_memory=True)
    trainer.fit(module, train_dataloaders=loader)
    return stopwatch.seconds


def run_plain(args, module, batches) -> float:
    """The same math without Lightning: what a hand-written nanoGPT-style loop does."""
    module.cuda()
    module.configure_model()  # compile, as Lightning would
    optimizer = torch.optim.AdamW(module.param_groups(weight_decay=0.1), lr=3e-4, fused=True)

    def train_step(step: int):
        batch = {k: v.cuda(non_blocking=True) for k, v in batches[step % len(batches)].items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            nll, _, aux = module.step(batch)
            loss = nll.mean() + aux if module.aux_weight > 0 else nll.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for step in range(args.warmup):
        train_step(step)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for step in range(args.steps):
        train_step(step)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if args.profile:
        print_profile(train_step)
    return seconds


def print_profile(train_step, steps: int = 3):
    """Where the time goes: the GPU kernels of a few steps, by total CUDA time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for step in range(steps):
            train_step(step)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="0.6b")
    parser.add_argument("--attention", nargs="+", default=["vanilla", "sink", "gated"])
    parser.add_argument("--aux", nargs="+", type=float, default=[0.0, 1e-4])
    parser.add_argument("--loops", nargs="+", default=["plain", "lightning"], choices=["plain", "lightning"])
    parser.add_argument("--batch-size", type=int, default=8, help="rows per GPU")
    parser.add_argument("--aux-scope", default="global", choices=["global", "local"])
    parser.add_argument("--devices", type=int, default=1, help="GPUs (DDP; lightning loop only)")
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--backend", default="auto", help="attention.backend: auto | flex | sdpa (gated only)")
    parser.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step (lightning)")
    parser.add_argument("--bucket-cap-mb", type=int, help="DDP gradient bucket size (default: conf/trainer/ddp.yaml)")
    parser.add_argument("--ddp-comm-hook", default="none", choices=["none", "bf16"], help="bf16: half the bytes")
    parser.add_argument(
        "--strategy", default="auto", choices=["auto", "ddp"], help="ddp with --devices 1: DDP's cost without a peer"
    )
    parser.add_argument(
        "--optimize-ddp",
        default="ddp_optimizer",
        choices=["ddp_optimizer", "no_optimization"],
        help="torch._dynamo.config.optimize_ddp: split the compiled graph at DDP buckets (overlap) or not",
    )
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--profile", action="store_true", help="print the top GPU kernels (plain loop)")
    parser.add_argument("--peak-flops", type=float, default=H100_BF16_DENSE)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/throughput.py needs a CUDA GPU")
    if (use_ddp(args) or args.accumulate > 1) and args.loops != ["lightning"]:
        sys.exit("--devices > 1, --accumulate > 1 and --strategy ddp need --loops lightning (the plain loop is 1 GPU)")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch._dynamo.config.optimize_ddp = args.optimize_ddp
    if os.environ.get("LOCAL_RANK", "0") == "0":  # DDP re-runs this script once per extra GPU
        ddp_note = ""
        if use_ddp(args):
            buckets = ddp_options(args)["bucket_cap_mb"]
            ddp_note = f", DDP {buckets} MB buckets, hook {args.ddp_comm_hook}, {args.optimize_ddp}"
        print(
            f"# {torch.cuda.get_device_name()} x{args.devices}, torch {torch.__version__}, lightning {L.__version__}, "
            f"batch {args.batch_size}/GPU x{args.accumulate} accumulated, vocab {args.vocab}, backend {args.backend}, "
            f"{args.steps} timed steps after {args.warmup}{ddp_note}"
        )
        print("| model | attention | aux λ | loop | tokens/s | MFU | peak mem GiB |")
        print("|---|---|---|---|---|---|---|")
    for attention in args.attention:
        for aux_lambda in args.aux:
            for loop in args.loops:
                torch.manual_seed(0)
                module = make_module(args, attention, aux_lambda)
                seq_len = module.model.cfg.seq_len
                batches = fixed_batches(args, seq_len)
                seconds = (run_plain if loop == "plain" else run_lightning)(args, module, batches)
                if torch.distributed.is_initialized() and torch.distributed.get_rank() > 0:
                    continue  # DDP: rank 0 reports for all
                tokens_per_s = args.steps * args.accumulate * args.batch_size * seq_len * args.devices / seconds
                mfu = tokens_per_s * module.model.flops_per_token() / (args.peak_flops * args.devices)
                memory = torch.cuda.max_memory_allocated() / 2**30
                print(
                    f"| {args.model} | {attention} | {aux_lambda:g} | {loop} | {tokens_per_s:,.0f} | "
                    f"{mfu:.1%} | {memory:.1f} |",
                    flush=True,
                )
                del module
                torch._dynamo.reset()
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
