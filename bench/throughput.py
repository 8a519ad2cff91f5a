"""Training throughput per configuration: tokens/s, MFU and peak memory, Lightning vs a plain PyTorch loop.

    python bench/throughput.py                                   # 0.6b, all variants, aux off/on, both loops
    python bench/throughput.py --model 2b --attention gated --aux 1e-4 --loops plain --activation-checkpointing
    python bench/throughput.py --loops lightning --strategy fsdp --devices 2 --attention gated --aux 1e-4
    python bench/throughput.py --model 2b --attention gated --aux 1e-4 --loops plain --fp8 tensorwise,rowwise \
        --timeout 400 --out outputs/bench-fp8       # bf16 vs float8; each configuration in its own process

Both loops run the same LightningModule math (SinkAwareLM.step: LM loss + aux loss) on the same fixed
batches (random tokens: this measures the model, not the data loader), in bf16 autocast with a compiled
model and fused AdamW; the timed window starts after the warm-up steps (compilation) and is bracketed by
CUDA syncs. MFU = tokens/s · (6·N + 12·L·C·T) / peak, peak = the GPU's dense bf16 FLOP/s.
The Lightning loop also runs on the CPU (fp32, --no-compile for speed): bench/e2e.py's smoke test uses that.

--fp8 RECIPES (model.fp8, docs/fp8.md) adds float8 rows after the bf16 one of each configuration; their MFU counts the
same FLOPs against the same bf16 peak, so rows compare. "compile s" is the wall time of the first optimizer step
(compilation, float8 conversion's extra graph included). --timeout runs each configuration in its own process and
ends it after that many seconds, so a slow compile or an OOM costs one row, not the run; --out DIR appends each row to
DIR/throughput.csv and DIR/throughput.jsonl as soon as it is measured (with --timeout, DIR/logs/ has each process's
output).
"""

import argparse
import csv
import importlib.metadata
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.strategies import DDPStrategy
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).parents[1]))
from model.attention import VARIANTS  # noqa: E402
from model.fp8 import RECIPES  # noqa: E402
from model.lit import SinkAwareLM  # noqa: E402

CONF = Path(__file__).parents[1] / "conf"
H100_BF16_DENSE = 989.4e12  # also the H200's (same compute die); Lightning knows the H100 only


def composed(overrides: list[str]) -> DictConfig:
    """conf/train.yaml composed through Hydra with these overrides, as train.py and bench/e2e.py see it: defaults,
    interpolations and override syntax are Hydra's, not a copy of them here."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides)


def make_module(args, attention: str, aux_lambda: float, fp8: str = "bf16") -> SinkAwareLM:
    overrides = [f"model={args.model}", f"attention={attention}", f"model.backend={args.backend}"]
    overrides += [f"aux.lambda={aux_lambda}", f"aux.scope={args.aux_scope}", "aux.shared_heads=0"]
    overrides += [f"model.activation_checkpointing={args.activation_checkpointing}"]
    overrides += [f"model.fp8={'null' if fp8 == 'bf16' else fp8}", *(f"model.{item}" for item in args.set)]
    cfg = composed(overrides)
    model = {**OmegaConf.to_container(cfg.model, resolve=True), "vocab_size": args.vocab}
    optim, aux = (OmegaConf.to_container(cfg[group], resolve=True) for group in ("optim", "aux"))
    return SinkAwareLM(model=model, optim=optim, aux=aux, compile=args.compile)


def fixed_batches(args, seq_len: int, n: int = 4) -> list[dict]:
    """Contiguous, as the loader's collated batches are: torch.compile specialises its graph on the inputs' strides,
    and views of the rows made another graph than train.py's (in bench/e2e.py the benchmark's first step then took as
    long as train.py's, 48 s on an H100 for 0.6b, though train.py had just compiled the same model)."""
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, args.vocab, (args.batch_size, seq_len + 1), generator=g) for _ in range(n)]
    return [
        {
            "input_ids": r[:, :-1].contiguous(),
            "targets": r[:, 1:].contiguous(),
            "target_bytes": torch.ones_like(r[:, 1:]),
        }
        for r in rows
    ]


def cuda_sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


FIRST_STEP = "first step (compilation included):"


def first_step_done(seconds: float) -> None:
    """Said in the log as soon as it is known: a configuration ended by --timeout then tells whether it was still
    compiling."""
    print(f"{FIRST_STEP} {seconds:.1f} s", flush=True)


class Stopwatch(L.Callback):
    """Times optimizer steps warmup+1 .. end, with CUDA syncs at both ends, and the first optimizer step
    (compilation) from its first batch."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.first_start, self.first_step_seconds = warmup, None, None, None

    def on_train_batch_start(self, trainer, *args):
        if self.first_start is None:
            cuda_sync()
            self.first_start = time.perf_counter()

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 1 and self.first_step_seconds is None:
            cuda_sync()
            self.first_step_seconds = time.perf_counter() - self.first_start
            first_step_done(self.first_step_seconds)
        if trainer.global_step == self.warmup and self.start is None:  # once: with accumulation, not per micro-batch
            cuda_sync()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            self.start = time.perf_counter()

    def on_train_end(self, trainer, *args):
        cuda_sync()
        self.seconds = time.perf_counter() - self.start


def use_ddp(args) -> bool:
    return args.strategy == "ddp" or (args.devices > 1 and args.strategy == "auto")


def ddp_options(args) -> dict:
    """DDPStrategy's options from conf/trainer/ddp.yaml, with --bucket-cap-mb applied."""
    options = OmegaConf.to_container(composed(["trainer=ddp"]).trainer.strategy, resolve=True)
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
    """The strategy of conf/trainer/fsdp.yaml (FSDP2 over every device)."""
    return instantiate(composed(["trainer=fsdp"]).trainer.strategy)


def run_lightning(args, module, batches) -> tuple[float, float, None]:
    """(seconds of the timed steps, seconds of the first optimizer step, None: no kernel table)"""
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
    return stopwatch.seconds, stopwatch.first_step_seconds, None


def run_plain(args, module, batches) -> tuple[float, float, str | None]:
    """The same math without Lightning: what a hand-written nanoGPT-style loop does. (seconds of the timed steps,
    seconds of the first step, the top GPU kernels with --profile)"""
    module.cuda()
    module.configure_model()  # float8 conversion (model.fp8) and compile, as Lightning would
    optimizer = torch.optim.AdamW(module.param_groups(weight_decay=0.1), lr=3e-4, fused=True)

    def train_step(step: int):
        batch = {k: v.cuda(non_blocking=True) for k, v in batches[step % len(batches)].items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            nll, _, aux = module.step(batch)
            loss = nll.mean() + aux if module.aux_config.weight > 0 else nll.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    torch.cuda.synchronize()
    first = time.perf_counter()
    train_step(0)
    torch.cuda.synchronize()
    first_step_seconds = time.perf_counter() - first
    first_step_done(first_step_seconds)
    for step in range(1, args.warmup):
        train_step(step)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for step in range(args.steps):
        train_step(step)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return seconds, first_step_seconds, kernel_table(train_step) if args.profile else None


def kernel_table(train_step, steps: int = 3) -> str:
    """Where the time goes: the GPU kernels of a few steps, by total CUDA time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for step in range(steps):
            train_step(step)
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70)


COLUMNS = ["model", "attention", "aux", "loop", "fp8", "tokens_per_s", "mfu", "peak_mem_gib", "compile_s", "status"]


def fp8_recipes(text: str) -> list[str]:
    """--fp8 tensorwise,rowwise: float8 recipes (model.fp8) measured after bf16, which is always measured."""
    recipes = [r for r in text.split(",") if r]
    bad = [r for r in recipes if r not in ("bf16", *RECIPES)]
    if bad:
        raise argparse.ArgumentTypeError(f"{','.join(bad)}: not one of bf16, {', '.join(RECIPES)}")
    return recipes


def configurations(args) -> list[tuple[str, float, str, str]]:
    """(attention, aux λ, loop, fp8) in the order measured: bf16 first, then each float8 recipe."""
    recipes = ["bf16", *(r for r in args.fp8 if r != "bf16")]
    return list(itertools.product(args.attention, args.aux, args.loops, recipes))


def measure(args, attention: str, aux_lambda: float, loop: str, fp8: str) -> dict | None:
    """One configuration's row, in this process (None on DDP / FSDP ranks > 0: rank 0 reports for all)."""
    torch.manual_seed(0)
    module = make_module(args, attention, aux_lambda, fp8)
    seq_len = module.model.cfg.seq_len
    batches = fixed_batches(args, seq_len)
    seconds, first_step_seconds, kernels = (run_plain if loop == "plain" else run_lightning)(args, module, batches)
    row = None
    if not (torch.distributed.is_initialized() and torch.distributed.get_rank() > 0):
        tokens_per_s = args.steps * args.accumulate * args.batch_size * seq_len * args.devices / seconds
        row = {"model": args.model, "attention": attention, "aux": aux_lambda, "loop": loop, "fp8": fp8}
        row["tokens_per_s"] = tokens_per_s
        if args.accelerator == "gpu":
            # the same FLOPs against the same bf16 peak for every recipe: float8 rows compare with bf16 ones
            row["mfu"] = tokens_per_s * module.model.flops_per_token() / (args.peak_flops * args.devices)
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            row["device"] = torch.cuda.get_device_name()
        row["compile_s"] = first_step_seconds
        row["status"] = "ok"
        if kernels:
            row["kernels"] = kernels  # printed after the table, also from a process of --timeout's
    del module
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return row


class Measurement:
    """One configuration (number `index` of configurations()) measured by this script in a process of its own, its
    output in logs/, on GPU `gpu` when given, ended after --timeout seconds."""

    def __init__(self, args, index: int, logs: Path, gpu: str | None = None):
        self.args, self.config, self.gpu = args, configurations(args)[index], gpu
        attention, aux_lambda, loop, fp8 = self.config
        name = f"{args.model}_{attention}_aux{aux_lambda:g}_{loop}_{fp8}"
        self.result, self.log = logs / f"{name}.json", logs / f"{name}.log"
        self.result.unlink(missing_ok=True)
        command = [sys.executable, __file__, *sys.argv[1:], "--child", str(self.result), "--index", str(index)]
        env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {})}
        with open(self.log, "w") as out:
            # a session of its own: a timeout ends its compile workers and DDP ranks too
            self.process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self.deadline = time.monotonic() + args.timeout

    def row(self) -> dict | None:
        """None while it runs; then its row, or one saying what stopped it."""
        code = self.process.poll()
        if code is None:
            if time.monotonic() < self.deadline:
                return None
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        if self.result.exists():
            row = json.loads(self.result.read_text())
        else:
            log = self.log.read_text(errors="replace")
            if code is None:
                phase = "after its first step" if FIRST_STEP in log else "before its first step ended (compiling)"
                status = f"timeout after {self.args.timeout:g} s, {phase}"
            else:
                lines = [line.strip() for line in log.splitlines() if line.strip()]
                status = f"failed ({lines[-1][:300] if lines else f'exit {code}'})"
            attention, aux_lambda, loop, fp8 = self.config
            row = {"model": self.args.model, "attention": attention, "aux": aux_lambda, "loop": loop, "fp8": fp8}
            row["status"] = status
        if self.gpu is not None:
            row["gpu"] = self.gpu
        return row


def measure_in_processes(args, logs: Path):
    """Every configuration in a process of its own, --parallel at a time (one GPU each): yields the rows as they
    finish."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = visible.split(",") if visible else [str(i) for i in range(args.parallel)]
    if args.parallel > len(gpus):
        sys.exit(f"--parallel {args.parallel}: only {len(gpus)} GPUs are visible")
    pending, running = list(range(len(configurations(args)))), {}  # GPU slot -> Measurement
    while pending or running:
        for slot in range(args.parallel):
            if slot not in running and pending:
                gpu = gpus[slot] if args.parallel > 1 else None
                running[slot] = Measurement(args, pending.pop(0), logs, gpu)
        for slot, measurement in list(running.items()):
            row = measurement.row()
            if row is not None:
                del running[slot]
                yield row
        time.sleep(0.2)


def print_row(row: dict):
    measured = row["status"] == "ok"
    cells = [row["model"], row["attention"], f"{row['aux']:g}", row["loop"], row["fp8"]]
    cells.append(f"{row['tokens_per_s']:,.0f}" if measured else row["status"])
    cells += [
        f"{row['mfu']:.1%}" if "mfu" in row else "-",
        f"{row['peak_mem_gib']:.1f}" if "peak_mem_gib" in row else "-",
    ]
    cells.append(f"{row['compile_s']:.1f}" if row.get("compile_s") is not None else "-")
    print(f"| {' | '.join(cells)} |", flush=True)


def record(out: Path, row: dict):
    """Append the row to out/throughput.csv (a header first when new) and out/throughput.jsonl."""
    out.mkdir(parents=True, exist_ok=True)
    table = out / "throughput.csv"
    new = not table.exists()
    with open(table, "a", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=[*COLUMNS, "device", "gpu"], extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)
    with open(out / "throughput.jsonl", "a") as file:
        file.write(json.dumps(row) + "\n")


def device_name(args) -> str:
    """The GPU's name without creating a CUDA context in this process (--timeout: the children use the GPU)."""
    if args.accelerator != "gpu":
        return "CPU"
    if args.timeout is None:
        return torch.cuda.get_device_name()
    try:
        query = ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "--id=0"]
        return subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip() or "GPU"
    except (OSError, subprocess.SubprocessError):
        return "GPU"


def torchao_note() -> str:
    """ ", torchao X" when it is installed (model.fp8)."""
    try:
        return f", torchao {importlib.metadata.version('torchao')}"
    except importlib.metadata.PackageNotFoundError:
        return ""


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="0.6b")
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        help="model fields over conf/model/MODEL.yaml, as Hydra overrides: n_layer=2 ...",
    )
    parser.add_argument("--attention", nargs="+", default=list(VARIANTS))
    parser.add_argument("--aux", nargs="+", type=float, default=[0.0, 1e-4])
    parser.add_argument("--loops", nargs="+", default=["plain", "lightning"], choices=["plain", "lightning"])
    parser.add_argument("--batch-size", type=int, default=8, help="rows per GPU")
    parser.add_argument("--aux-scope", default="global", choices=["global", "local"])
    parser.add_argument("--devices", type=int, default=1, help="GPUs (DDP or FSDP; lightning loop only)")
    parser.add_argument("--accelerator", default="gpu", choices=["gpu", "cpu"], help="cpu: lightning loop only")
    parser.add_argument("--precision", help="Trainer precision (default: bf16-mixed on GPU, 32-true on CPU)")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="leave the model uncompiled")
    parser.add_argument(
        "--compile-blocks", dest="compile", action="store_const", const="blocks", help="compile=blocks: each block"
    )
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
    parser.add_argument(
        "--fp8",
        type=fp8_recipes,
        default=[],
        help="float8 recipes (model.fp8) after bf16, comma-separated: tensorwise,rowwise",
    )
    parser.add_argument("--timeout", type=float, help="seconds: each configuration in its own process, ended after")
    parser.add_argument("--out", type=Path, help="append each row to OUT/throughput.csv and .jsonl when measured")
    parser.add_argument(
        "--parallel", type=int, default=1, help="with --timeout: this many configurations at once, one GPU each"
    )
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # --timeout's process: write the row here
    parser.add_argument("--index", type=int, help=argparse.SUPPRESS)  # ... of configuration number INDEX
    args = parser.parse_args()
    if args.warmup < 1:
        parser.error("--warmup must be >= 1: the first step (compilation) is timed on its own")
    if args.parallel > 1 and (args.timeout is None or args.devices > 1):
        parser.error("--parallel needs --timeout (one process per configuration) and --devices 1")
    args.precision = args.precision or ("bf16-mixed" if args.accelerator == "gpu" else "32-true")
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        sys.exit("bench/throughput.py needs a CUDA GPU (or --accelerator cpu --loops lightning)")
    needs_lightning = args.devices > 1 or args.accumulate > 1 or args.strategy != "auto" or args.accelerator == "cpu"
    if needs_lightning and args.loops != ["lightning"]:
        sys.exit("--devices > 1, --accumulate > 1, --strategy and the CPU need --loops lightning (plain: one GPU)")
    torch._dynamo.config.optimize_ddp = args.optimize_ddp
    configs = configurations(args)
    if args.child:  # one configuration, for the process that started this one (--timeout)
        row = measure(args, *configs[args.index])
        if row is not None:
            args.child.write_text(json.dumps(row))
        return
    if os.environ.get("LOCAL_RANK", "0") == "0":  # DDP re-runs this script once per extra GPU
        ddp_note = ""
        if use_ddp(args):
            buckets = ddp_options(args)["bucket_cap_mb"]
            ddp_note = f", DDP {buckets} MB buckets, hook {args.ddp_comm_hook}, {args.optimize_ddp}"
        isolated = f", one process per row ended after {args.timeout:g} s" if args.timeout else ""
        isolated += f", {args.parallel} at a time on GPUs of their own" if args.parallel > 1 else ""
        print(
            f"# {device_name(args)} x{args.devices}, {args.strategy} strategy, {args.precision}, "
            f"compile {args.compile}, torch {torch.__version__}, lightning {L.__version__}{torchao_note()}, "
            f"batch {args.batch_size}/GPU x{args.accumulate} accumulated, vocab {args.vocab}, backend {args.backend}, "
            f"{args.steps} timed steps after {args.warmup}{ddp_note}{isolated}; MFU against the bf16 peak "
            f"{args.peak_flops / 1e12:.1f} TFLOP/s; compile s: the first step",
            flush=True,
        )
        print("| model | attention | aux λ | loop | fp8 | tokens/s | MFU | peak mem GiB | compile s |")
        print("|---|---|---|---|---|---|---|---|---|", flush=True)
    if args.timeout:
        logs = (args.out or Path(tempfile.mkdtemp(prefix="throughput-"))) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        measured = measure_in_processes(args, logs)
    else:
        measured = (measure(args, *config) for config in configs)
    rows = []
    for row in measured:
        if row is None:
            continue  # DDP / FSDP: rank 0 reports for all
        rows.append(row)
        print_row(row)
        if args.out:
            record(args.out, row)
    for row in (r for r in rows if "kernels" in r):
        print(f"\nTop GPU kernels of 3 steps: {row['model']} {row['attention']} {row['fp8']}\n{row['kernels']}")
    if args.json and rows:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
