"""What observing costs: training tokens/s with the configured logger and callbacks on vs all of them off.

    python bench/logging_overhead.py                                  # CPU tiny model, default logging interval
    python bench/logging_overhead.py --steps 1000 model=0.6b trainer=gpu compile=true   # any train.py overrides

Both variants build the run from the same composed train.py config on the same data, seed and steps;
"off" drops every callback and the logger (and the progress bar). Validation and checkpointing are off in
both: they are not logging. The timed window runs from the end of step --warmup to the end of the last step,
bracketed by CUDA syncs on a GPU: what observing costs per step, not the one-off work at the end (the last
heatmap and CV curve, closing the W&B run). The variants alternate --repeats times; the best and the median
run of each are compared (other processes on a shared machine only ever slow a run down, but a lone fast run
skews the best). On a crowded machine even the best wall time is noise, so the CPU time spent by this
process and its children (the W&B service) over the same window is compared too: the work the observers
add, which contention does not inflate as much. With trainer=gpu the first heatmap falls at step 1,000
(one per validation interval): time at least that many steps to include its cost.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import psutil
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))
from train import build  # noqa: E402


def cpu_seconds() -> float:
    """User + system CPU time of this process and everything it started (the W&B service, loader workers)."""
    me = psutil.Process()
    return sum(sum(p.cpu_times()[:2]) for p in [me, *me.children(recursive=True)])


class Stopwatch(L.Callback):
    """Wall and CPU time from the end of step `warmup` to the end of step `last`."""

    def __init__(self, warmup: int, last: int):
        self.warmup, self.last, self.start, self.seconds, self.cpu = warmup, last, None, None, None

    def sync(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.warmup and self.start is None:
            self.sync()
            self.start, self.cpu = time.perf_counter(), cpu_seconds()
        if trainer.global_step == self.last and self.seconds is None:
            self.sync()
            self.seconds, self.cpu = time.perf_counter() - self.start, cpu_seconds() - self.cpu


def measure(args, observed: bool, output_dir: str) -> tuple[float, float]:
    """(tokens per wall second, tokens per CPU second) of one run."""
    overrides = [
        *args.overrides,
        f"trainer.max_steps={args.warmup + args.steps}",
        "trainer.limit_val_batches=0",
        "+trainer.enable_checkpointing=false",
        f"paths.output_dir={output_dir}",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # the config interpolates ${hydra:...}
    with open_dict(cfg):
        cfg.callbacks = {k: v for k, v in cfg.callbacks.items() if observed and "checkpoint" not in k}
        if not observed:
            cfg.logger = None
            cfg.trainer.enable_progress_bar = False
    if observed:  # what the "on" window holds: a heatmap costs ~0.3 s of CPU, once per heatmap interval
        heatmap_every = cfg.callbacks.head_balance.heatmap_every_n_steps if "head_balance" in cfg.callbacks else 0
        heatmap = f"every {heatmap_every} steps"
        if heatmap_every is None:  # with each validation interval, though validation itself is off here
            heatmap = f"every validation interval ({cfg.trainer.val_check_interval} micro-batches)"
        print(f"# on: logging every {cfg.trainer.log_every_n_steps} steps, heatmap {heatmap}")
    L.seed_everything(cfg.seed)
    datamodule, module, trainer = build(cfg)
    stopwatch = Stopwatch(args.warmup, args.warmup + args.steps)
    trainer.callbacks.append(stopwatch)
    trainer.fit(module, datamodule=datamodule)
    tokens = args.steps * cfg.data.batch_size * cfg.model.seq_len * trainer.world_size
    return tokens / stopwatch.seconds, tokens / stopwatch.cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=10, help="steps before the timed window")
    parser.add_argument("--repeats", type=int, default=4, help="runs of each variant, alternating")
    parser.add_argument("overrides", nargs="*", help="train.py overrides, e.g. model=small trainer=gpu")
    args = parser.parse_args()
    results = {"off": [], "on": []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for variant in ("off", "on"):
                wall, cpu = measure(args, variant == "on", f"{tmp}/{variant}{repeat}")
                results[variant].append((wall, cpu))
                print(f"# run {repeat} {variant:>3}: {wall:,.0f} tokens/s, {cpu:,.0f} per CPU second", flush=True)
    print(f"overrides: {' '.join(args.overrides) or '(defaults)'}; {args.steps} steps after {args.warmup}")
    for column, unit in enumerate(("tokens/s (wall)", "tokens per CPU second")):
        for name, pick in (("best", max), ("median", statistics.median)):
            off = pick(r[column] for r in results["off"])
            on = pick(r[column] for r in results["on"])
            ratio = f"on/off = {on / off:.4f} ({100 * (on / off - 1):+.2f}%)"
            print(f"{unit:>22}, {name:>6}: off {off:,.0f}, on {on:,.0f}, {ratio}")


if __name__ == "__main__":
    main()
