"""End to end: train.py as users run it, against bench/throughput.py's figure for the same model, in one invocation.

    python bench/e2e.py model=0.6b trainer=gpu compile=true attention=gated aux.lambda=1e-4
    python bench/e2e.py model=0.6b trainer=fsdp compile=true attention=vanilla aux.lambda=1e-4   # all GPUs of the node
    python bench/e2e.py --steps 40 --warmup 5 model.n_layer=2 model.n_embd=64                    # CPU smoke

The arguments after the options are train.py's own overrides. train.py runs as a subprocess with every default
callback, the real data path (data/tokenizer=bpe and logger=csv unless given), a validation every --val-every steps
and last.ckpt every --steps / --checkpoints steps; its figure is SpeedMonitor's whole-run line: every token trained
after the --warmup steps (compilation) over the training time, checkpoint writes and logging included, validation
excluded. Then bench/throughput.py runs the Lightning loop on fixed batches with the same model (the vocabulary of
train.py's tokenizer), batch, precision, compile, devices and strategy. Both figures and their ratio are printed as
one table, and written as JSON to --out. With --attention gated,vanilla the variants run one after the other in one
invocation, each in <run dir>/<variant>, and their figures go to --out-dir as <variant>.json and summary.md.
"""

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).parents[1]))
from checkpoints import reader  # noqa: E402

ROOT = Path(__file__).parents[1]
WHOLE_RUN = re.compile(r"whole run: (\d+) tokens in ([\d.]+) s of training, steps (\d+)-(\d+)")
VALIDATION = re.compile(r"^step \d+/\d+ \| validation", re.M)  # the progress line of each validation (no terminal)
STEP_TIME = re.compile(r"step time: median ([\d.]+) ms over (\d+) steps; slowest: (.*)")


def with_defaults(overrides: list[str], defaults: list[str]) -> list[str]:
    """The defaults whose key the user did not give, then the user's overrides."""
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    return [d for d in defaults if d.split("=", 1)[0] not in given] + overrides


def composed(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def train_overrides(args, user: list[str]) -> list[str]:
    every = args.steps // args.checkpoints
    return with_defaults(user, ["data/tokenizer=bpe", "logger=csv"]) + [
        f"trainer.max_steps={args.steps}",
        f"trainer.val_check_interval={args.val_every}",
        f"callbacks.checkpoint_last.every_n_train_steps={every}",
        f"callbacks.speed.warmup_steps={args.warmup}",
        f"hydra.run.dir={args.run_dir}",
    ]


def run_train(overrides: list[str], log_path: Path) -> str:
    """train.py's output, echoed and saved; raises if it fails."""
    command = [sys.executable, str(ROOT / "train.py"), *overrides]
    print("$", " ".join(command), flush=True)
    lines = []
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process:
        for line in process.stdout:
            sys.stdout.write(line)
            lines.append(line)
    log_path.write_text("".join(lines))
    if process.returncode:
        sys.exit(f"train.py failed ({process.returncode}); its output is in {log_path}")
    return "".join(lines)


def run_vocab(run_dir: Path) -> int:
    """The vocabulary train.py's tokenizer gave the model, from the hyperparameters in its last checkpoint."""
    return reader.metadata(run_dir / "checkpoints" / "last.ckpt")["hyper_parameters"]["model"]["vocab_size"]


def throughput_command(cfg, args, vocab: int, json_path: Path) -> list[str]:
    """bench/throughput.py with the composed run's model, batch, precision, devices and strategy."""
    trainer, choices = cfg.trainer, cfg.hydra.runtime.choices
    devices = trainer.devices
    if devices == "auto":
        devices = torch.cuda.device_count() if trainer.accelerator == "gpu" else 1
    model = OmegaConf.to_container(cfg.model, resolve=True)
    attention, backend = model.pop("attention"), model.pop("backend")
    command = [sys.executable, str(ROOT / "bench" / "throughput.py"), "--loops", "lightning", "--model", choices.model]
    command += ["--set", *(f"{key}={json.dumps(value)}" for key, value in model.items())]
    command += ["--attention", attention, "--backend", backend, "--aux", str(cfg.aux["lambda"])]
    command += ["--aux-scope", cfg.aux.scope, "--vocab", str(vocab), "--batch-size", str(cfg.data.batch_size)]
    command += ["--accelerator", trainer.accelerator, "--devices", str(devices), "--precision", str(trainer.precision)]
    command += ["--accumulate", str(trainer.get("accumulate_grad_batches", 1))]
    command += ["--strategy", choices.trainer if choices.trainer in ("ddp", "fsdp") else "auto"]
    command += ["--warmup", str(args.warmup), "--steps", str(args.throughput_steps), "--json", str(json_path)]
    return command + {True: [], "blocks": ["--compile-blocks"], False: ["--no-compile"]}[cfg.compile]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=400, help="train.py's trainer.max_steps")
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of both figures (compilation)")
    parser.add_argument("--checkpoints", type=int, default=4, help="last.ckpt every steps/N steps")
    parser.add_argument("--val-every", type=int, help="steps between validations (default: steps/2)")
    parser.add_argument("--throughput-steps", type=int, default=20, help="bench/throughput.py's timed steps")
    parser.add_argument("--run-dir", type=Path, help="train.py's run directory (default: outputs/e2e-<time>)")
    parser.add_argument("--keep-checkpoints", action="store_true", help="else the run's checkpoints are deleted")
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    parser.add_argument("--attention", help="variants to run one after the other, e.g. gated,vanilla (adds attention=)")
    parser.add_argument("--out-dir", type=Path, help="with --attention: <variant>.json and summary.md go here")
    args, user = parser.parse_known_args()
    args.val_every = args.val_every or args.steps // 2
    base = (args.run_dir or ROOT / "outputs" / time.strftime("e2e-%Y-%m-%d_%H-%M-%S")).resolve()
    if not args.attention:
        args.run_dir = base
        result = run_one(args, user)
        if args.out:
            args.out.write_text(json.dumps(result, indent=1))
        return
    out_dir = args.out_dir or base
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for variant in args.attention.split(","):
        args.run_dir = base / variant
        result = run_one(args, [*user, f"attention={variant}"])
        (out_dir / f"{variant}.json").write_text(json.dumps(result, indent=1))
        speeds = result["e2e"]["tokens_per_s"], result["throughput"]["tokens_per_s"]
        rows.append(f"| {variant} | {speeds[0]:,.0f} | {speeds[1]:,.0f} | {result['ratio']:.1%} |")
    summary = "| attention | train.py tokens/s | benchmark tokens/s | end to end / benchmark |\n|---|---|---|---|\n"
    (out_dir / "summary.md").write_text(summary + "\n".join(rows) + "\n")
    print("\n" + summary + "\n".join(rows))


def run_one(args, user: list[str]) -> dict:
    """train.py then bench/throughput.py for one configuration; prints the table and returns the figures."""
    args.run_dir.mkdir(parents=True, exist_ok=True)
    overrides = train_overrides(args, user)
    cfg = composed(overrides)

    output = run_train(overrides, args.run_dir / "e2e_train.log")
    found = WHOLE_RUN.search(output)
    if found is None:
        sys.exit("train.py printed no whole-run speed line (is callbacks.speed switched off?)")
    tokens, seconds, first, last = int(found[1]), float(found[2]), int(found[3]), int(found[4])
    vocab = run_vocab(args.run_dir)
    if not args.keep_checkpoints:
        shutil.rmtree(args.run_dir / "checkpoints")

    json_path = args.run_dir / "throughput.json"
    command = throughput_command(cfg, args, vocab, json_path)
    print("$", " ".join(command), flush=True)
    subprocess.run(command, cwd=ROOT, check=True)
    (bench,) = json.loads(json_path.read_text())

    e2e = {"tokens_per_s": tokens / seconds, "tokens": tokens, "seconds": seconds, "steps": [first, last]}
    e2e.update(validations=len(VALIDATION.findall(output)), checkpoint_every=args.steps // args.checkpoints)
    ratio = e2e["tokens_per_s"] / bench["tokens_per_s"]
    held = [float(h) for h in re.findall(r"training held ([\d.]+) s", output)]
    e2e["checkpoint_held_s"] = held  # per checkpoint: how long training waited for its copy to host memory
    step_time = STEP_TIME.search(output)
    if step_time:  # where the time went: the slowest steps (checkpoint steps are multiples of checkpoint_every)
        e2e["median_step_ms"] = float(step_time[1])
        e2e["slowest_steps_ms"] = {
            int(step): float(ms) for step, ms in re.findall(r"(\d+) \(([\d.]+) ms\)", step_time[3])
        }
    print(f"\n# {' '.join(user)}")
    print("| measure | tokens/s | timed |\n|---|---|---|")
    print(
        f"| bench/throughput.py (Lightning, fixed batches) | {bench['tokens_per_s']:,.0f} | "
        f"{args.throughput_steps} steps after {args.warmup} |"
    )
    print(
        f"| train.py end to end | {e2e['tokens_per_s']:,.0f} | steps {first}-{last}: last.ckpt every "
        f"{e2e['checkpoint_every']} steps, {e2e['validations']} validations (excluded) |"
    )
    print(f"| end to end / benchmark | {ratio:.1%} | |")
    if step_time:
        print(f"train.py step time: median {step_time[1]} ms; slowest steps: {step_time[3]}")
    return {"overrides": overrides, "throughput": bench, "e2e": e2e, "ratio": ratio}


if __name__ == "__main__":
    main()
