"""Training throughput per configuration: tokens/s, MFU and peak memory, Lightning vs a plain PyTorch loop.

    python bench/throughput.py                                   # 0.6b, all variants, aux off/on, both loops
    python bench/throughput.py --model 2b --attention gated --aux 1e-4 --loops plain --activation-checkpointing
    python bench/throughput.py --loops lightning --strategy fsdp --devices 2 --attention gated --aux 1e-4

Both loops run the same LightningModule math (SinkAwareLM.step: LM loss + aux loss) on the same fixed
batches (random tokens: this measures the model, not the data loader), in bf16 autocast with a compiled
model and fused AdamW; the timed window starts after the warm-up steps (compilation) and is bracketed by
CUDA syncs. MFU = tokens/s · (6·N + 12·L·C·T) / peak, peak = the GPU's dense bf16 FLOP/s.
The Lightning loop also runs on the CPU (fp32, --no-compile for speed): bench/e2e.py's smoke test uses that.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import lightning as L
import torch
import yaml
from hydra.utils import instantiate
from lightning.pytorch.strategies import DDPStrategy

sys.path.insert(0, str(Path(__file__).parents[1]))
from model.attention import VARIANTS  # noqa: E402
from model.lit import SinkAwareLM  # noqa: E402

CONF = Path(__file__).parents[1] / "conf"
H100_BF16_DENSE = 989.4e12  # also the H200's (same compute die); Lightning knows the H100 only


def model_fields(name: str) -> dict:
    cfg = yaml.safe_load((CONF / "model" / f"{name}.yaml").read_text())
    return {k: v for k, v in cfg.items() if not str(v).startswith("${")}  # drop interpolations


def make_module(args, attention: str, aux_lambda: float) -> SinkAwareLM:
    model = {**model_fields(args.model), "attention": attention, "vocab_size": args.vocab, "backend": args.backend}
    model["activation_checkpointing"] = args.activation_checkpointing
    model.update((key, yaml.safe_load(value)) for key, value in (item.split("=", 1) for item in args.set))
    optim = yaml.safe_load((CONF / "optim" / "adamw.yaml").read_text())
    aux = {"lambda": aux_lambda, "scope": args.aux_scope}
    return SinkAwareLM(model=model, optim=optim, aux=aux, compile=args.compile)


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
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            self.start = time.perf_counter()

    def on_train_end(self, trainer, *args):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start


def use_ddp(args) -> bool:
    return args.strategy == "ddp" or (args.devices > 1 and args.strategy == "auto")


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


def fsdp_strategy():
    """The strategy of conf/trainer/fsdp.yaml (FSDP2 over every device, one checkpoint file)."""
    return instantiate(yaml.safe_load((CONF / "trainer" / "fsdp.yaml").read_text())["strategy"])


def run_lightning(args, module, batches) -> float:
    stopwatch = Stopwatch(args.warmup)
    strategy = ddp_strategy(args) if use_ddp(args) else fsdp_strategy() if args.strategy == "fsdp" else "auto"
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=strategy,
        accumulate_grad_batches=args.accumulate,
        precision=args.precision,
        max_steps=args.warmup + args.steps,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[stopwatch],
    )
    n_batches = (args.warmup + args.steps) * args.accumulate
    loader = torch.utils.data.DataLoader(batches * n_batches, batch_size=None, pin_memory=args.accelerator == "gpu")
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
    parser.add_argument("--set", nargs="*", default=[], help="model fields over conf/model/MODEL.yaml: n_layer=2 ...")
    parser.add_argument("--attention", nargs="+", default=list(VARIANTS))
    parser.add_argument("--aux", nargs="+", type=float, default=[0.0, 1e-4])
    parser.add_argument("--loops", nargs="+", default=["plain", "lightning"], choices=["plain", "lightning"])
    parser.add_argument("--batch-size", type=int, default=8, help="rows per GPU")
    parser.add_argument("--aux-scope", default="global", choices=["global", "local"])
    parser.add_argument("--devices", type=int, default=1, help="GPUs (DDP or FSDP; lightning loop only)")
    parser.add_argument("--accelerator", default="gpu", choices=["gpu", "cpu"], help="cpu: lightning loop only")
    parser.add_argument("--precision", help="Trainer precision (default: bf16-mixed on GPU, 32-true on CPU)")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="leave the model uncompiled")
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--backend", default="auto", help="attention.backend: auto | flex | sdpa (gated only)")
    parser.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step (lightning)")
    parser.add_argument("--bucket-cap-mb", type=int, help="DDP gradient bucket size (default: conf/trainer/ddp.yaml)")
    parser.add_argument("--ddp-comm-hook", default="none", choices=["none", "bf16"], help="bf16: half the bytes")
    parser.add_argument(
        "--strategy",
        default="auto",
        choices=["auto", "ddp", "fsdp"],
        help="auto: DDP if --devices > 1; ddp with --devices 1: DDP's cost without a peer; fsdp: trainer=fsdp's",
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
    parser.add_argument("--json", help="also write the rows to this file (a JSON list)")
    args = parser.parse_args()
    args.precision = args.precision or ("bf16-mixed" if args.accelerator == "gpu" else "32-true")
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        sys.exit("bench/throughput.py needs a CUDA GPU (or --accelerator cpu --loops lightning)")
    needs_lightning = args.devices > 1 or args.accumulate > 1 or args.strategy != "auto" or args.accelerator == "cpu"
    if needs_lightning and args.loops != ["lightning"]:
        sys.exit("--devices > 1, --accumulate > 1, --strategy and the CPU need --loops lightning (plain: one GPU)")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch._dynamo.config.optimize_ddp = args.optimize_ddp
    if os.environ.get("LOCAL_RANK", "0") == "0":  # DDP re-runs this script once per extra GPU
        ddp_note = ""
        if use_ddp(args):
            buckets = ddp_options(args)["bucket_cap_mb"]
            ddp_note = f", DDP {buckets} MB buckets, hook {args.ddp_comm_hook}, {args.optimize_ddp}"
        device = torch.cuda.get_device_name() if args.accelerator == "gpu" else "CPU"
        print(
            f"# {device} x{args.devices}, {args.strategy} strategy, {args.precision}, compile {args.compile}, "
            f"torch {torch.__version__}, lightning {L.__version__}, "
            f"batch {args.batch_size}/GPU x{args.accumulate} accumulated, vocab {args.vocab}, backend {args.backend}, "
            f"{args.steps} timed steps after {args.warmup}{ddp_note}"
        )
        print("| model | attention | aux λ | loop | tokens/s | MFU | peak mem GiB |")
        print("|---|---|---|---|---|---|---|")
    rows = []
    for attention in args.attention:
        for aux_lambda in args.aux:
            for loop in args.loops:
                torch.manual_seed(0)
                module = make_module(args, attention, aux_lambda)
                seq_len = module.model.cfg.seq_len
                batches = fixed_batches(args, seq_len)
                seconds = (run_plain if loop == "plain" else run_lightning)(args, module, batches)
                if torch.distributed.is_initialized() and torch.distributed.get_rank() > 0:
                    continue  # DDP / FSDP: rank 0 reports for all
                tokens_per_s = args.steps * args.accumulate * args.batch_size * seq_len * args.devices / seconds
                row = {"model": args.model, "attention": attention, "aux": aux_lambda, "loop": loop}
                row["tokens_per_s"] = tokens_per_s
                if args.accelerator == "gpu":
                    row["mfu"] = tokens_per_s * module.model.flops_per_token() / (args.peak_flops * args.devices)
                    row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
                rows.append(row)
                mfu, memory = (f"{row['mfu']:.1%}", f"{row['peak_mem_gib']:.1f}") if "mfu" in row else ("-", "-")
                cells = [args.model, attention, f"{aux_lambda:g}", loop, f"{tokens_per_s:,.0f}", mfu, memory]
                print(f"| {' | '.join(cells)} |", flush=True)
                del module
                torch._dynamo.reset()
                torch.cuda.empty_cache()
    if args.json and rows:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
