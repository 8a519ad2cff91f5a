"""Re-run the study of docs/study.md on this machine's GPUs: train its runs, evaluate them, rebuild the report.

    python scripts/study.py train [--part 2] [--per-gpu K] [--only a,b] [--stop-launching-after S] [--stop-after S]
                                  [OVERRIDE ...]
    python scripts/study.py eval [--part 2] [OVERRIDE ...]  # eval.py eval_mode=compare: corpus_a, corpus_b, fine-tunes
    python scripts/study.py report [--part 2]   # docs/study{,2}_results.md, docs/study{,2}/, docs/img/study{,2}_*.png
    make study                                  # all three, part 1 (make study2: part 2)

The runs of part 1 are conf/experiment/study/*.yaml, those of part 2 (when do sinks form) conf/experiment/study2/*.yaml
(base.yaml is each folder's shared part), each `python train.py experiment=study/NAME` in outputs/study/... (study2:
outputs/study2/...): a run that exists already resumes from its last checkpoint (a finished one ends at once). --only
names runs of the part's folder (or, with a slash, any experiment: study/gated). Runs are spread over the GPUs, K at a
time on each; a fine-tuning run starts once the run it starts from has finished, and that run is trained first when
it is neither finished nor asked for. The data (corpus_a/ and corpus_b/) is read from $SINKAWARE_DATA, by default
.data/ in the repository. Every figure and number of the report comes from eval.py's compare.json and the runs'
metrics.csv: this script only gathers and draws them.
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
sys.path.insert(0, str(ROOT))
# Part 1: claims 1-3 first, then the seed pair, the larger lambda, and the fine-tuning pair (claim 4).
RUNS = [
    "vanilla", "vanilla_aux", "sink", "sink_aux", "gated", "gated_aux",
    "vanilla_seed2", "vanilla_aux_seed2", "vanilla_aux1e-2", "gated_aux1e-2",
]  # fmt: skip
FINETUNES = ["finetune_plain", "finetune_shared"]  # from the `vanilla` run
# Part 2 by priority (conf/experiment/study2/base.yaml): claim 4 from collapsed heads, weight decay and QK-norm,
# seeds (with part 1's two gated runs again: seed 1337 of each pair), more distinct data, the sink twins, float8. Not
# by default: the lambda=1e-4 twins (only once their base run forms sinks); --only names them.
RUNS_2 = [
    "study/gated", "finetune_gated_m0", "finetune_gated_m2", "finetune_gated_m4", "vanilla_wd0.5",
    "vanilla_noqknorm_wd0.5", "gated_seed2", "study/gated_aux1e-2", "gated_aux1e-2_seed2", "gated_seed3",
    "gated_aux1e-2_seed3", "vanilla_corpus_ab_4000steps", "sink_wd0.5", "sink_noqknorm_wd0.5", "gated_fp8_tensorwise",
    "vanilla_fp8_tensorwise",
]  # fmt: skip
TRAINED_ON_CORPUS_B = {"study2/vanilla_corpus_ab_4000steps"}  # corpus_b is no unseen text for these: not scored on it
# The corpus_b rows scored: its first shard's, the same every time (a folder's shards are read in a seeded order).
CORPUS_B_SCORED = "corpus_b/part-00000-of-00008.parquet"
# fine-tuning run -> the run whose last.ckpt it starts from (its init_from), both as experiment names
STARTS_FROM = {
    **{f"study/{name}": "study/vanilla" for name in FINETUNES},
    **{f"study2/finetune_gated_m{m}": "study/gated" for m in (0, 2, 4)},
}
IMG = ROOT / "docs" / "img"


def run_dir(experiment: str) -> Path:
    """outputs/<the `run` of the experiment file>, e.g. outputs/study/gated_lambda0.0_seed1337."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return ROOT / "outputs" / compose("train", overrides=[f"experiment={experiment}"]).run


def finished(experiment: str) -> bool:
    return (run_dir(experiment) / "checkpoints" / "done").exists()


def experiments(part: int, names: list[str]) -> list[str]:
    """Experiment names with their folder: relative to the part's folder unless they hold a slash."""
    folder = "study" if part == 1 else "study2"
    return [n if "/" in n else f"{folder}/{n}" for n in names]


def requested(part: int, only: str | None) -> list[str]:
    """The experiments to train, in order: --only's names or the part's default list, each preceded by the run it
    starts from when that is not among them."""
    names = experiments(part, only.split(",") if only else (RUNS + FINETUNES if part == 1 else RUNS_2))
    missing = [n for n in names if not (CONF / "experiment" / f"{n}.yaml").is_file()]
    if missing:
        raise SystemExit(f"--only: no conf/experiment/{missing[0]}.yaml (names of its files, without .yaml)")
    queue = []
    for name in names:
        start = STARTS_FROM.get(name)
        if start and start not in queue and start not in names:
            queue.append(start)
        queue.append(name)
    return queue


def ready(name: str, queue: list[str], slots: dict) -> bool | None:
    """Whether `name` can start now; None if never: it starts from a run that is neither finished, queued nor
    running (it failed)."""
    start = STARTS_FROM.get(name)
    if start is None or finished(start):
        return True
    running = {job[0] for job in slots.values() if job is not None}
    return False if start in queue or start in running else None


def train(args, overrides: list[str]) -> None:
    import torch

    gpus = torch.cuda.device_count()
    if gpus == 0:
        raise SystemExit("no CUDA GPU: the study trains on GPUs (docs/study.md gives its size)")
    queue = [n for n in requested(args.part, args.only) if not finished(n)]
    slots = {(gpu, k): None for gpu in range(gpus) for k in range(args.per_gpu)}
    start = time.time()
    while queue or any(slots.values()):
        for slot, job in slots.items():
            if job is not None and job[1].poll() is not None:
                name, process = job
                ok = process.returncode == 0
                if ok:
                    (run_dir(name) / "checkpoints" / "done").touch()
                print(f"[study] {name} {'finished' if ok else f'FAILED ({process.returncode})'} "
                      f"at {time.time() - start:.0f} s", flush=True)  # fmt: skip
                slots[slot] = None
        late = args.stop_launching_after and time.time() - start > args.stop_launching_after
        if args.stop_after and time.time() - start > args.stop_after:
            stop(slots, queue)
            return
        for name in [n for n in queue if ready(n, queue, slots) is None]:
            print(f"[study] {name} not started: {STARTS_FROM[name]}, which it starts from, failed", flush=True)
            queue.remove(name)
        for slot in [s for s, job in slots.items() if job is None]:
            startable = [n for n in queue if ready(n, queue, slots)]
            if not startable or late:
                break
            name = startable[0]
            queue.remove(name)
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(slot[0])}
            log_file = ROOT / "outputs" / name.split("/")[0] / "logs" / f"{name.split('/')[1]}.log"
            log_file.parent.mkdir(parents=True, exist_ok=True)
            log = open(log_file, "w")
            command = [sys.executable, "train.py", f"experiment={name}", *overrides]
            slots[slot] = (name, subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
            print(f"[study] {name} started on GPU {slot[0]} at {time.time() - start:.0f} s", flush=True)
        if late and not any(slots.values()):
            print(f"[study] not started (time limit): {queue}", flush=True)
            return
        time.sleep(2)


def stop(slots: dict, queue: list[str]) -> None:
    """SIGTERM to the runs in flight: each saves its last.ckpt at the end of its step, and resumes from it when the
    study is started again."""
    running = [job for job in slots.values() if job is not None]
    for _, process in running:
        process.terminate()
    for name, process in running:
        process.wait()
        print(f"[study] {name} stopped at the time limit (exit {process.returncode}); it resumes next time", flush=True)
    print(f"[study] not started (time limit): {queue}", flush=True)


def checkpoints(experiments: list[str]) -> list[str]:
    """last.ckpt of each finished run among the experiments (names with their folder: study2/vanilla_wd0.5)."""
    return [str(run_dir(e) / "checkpoints" / "last.ckpt") for e in experiments if finished(e)]


def eval_sets(part: int) -> tuple[list[str], list[str]]:
    """The pretraining runs of a part, and the fine-tuning runs together with the run they start from."""
    if part == 1:
        return experiments(1, RUNS), experiments(1, ["vanilla", *FINETUNES])
    names = experiments(2, RUNS_2)
    tuned = [n for n in names if n in STARTS_FROM]
    return [n for n in names if n not in STARTS_FROM], [STARTS_FROM[tuned[0]], *tuned]


def evaluate(part: int, overrides: list[str]) -> None:
    """eval.py eval_mode=compare: corpus_a's validation split (with head ablation), corpus_b (unseen text, also for
    the fine-tunings), and the fine-tuning runs beside the run they started from. Each compare.json records the rows
    it scored."""
    data_dir = Path(os.environ.get("SINKAWARE_DATA", ROOT / ".data"))
    runs, tuned = eval_sets(part)
    pretrained = {run: checkpoint for run in runs for checkpoint in checkpoints([run])}  # the finished ones
    tuned = checkpoints(tuned)
    tokenizer = next((str(Path(c).parents[1] / "tokenizer.json") for c in [*pretrained.values(), *tuned]), None)
    if tokenizer is None:
        raise SystemExit(f"no finished run to evaluate: run `python scripts/study.py train --part {part}` first")
    common = ["data=local", "data/tokenizer=bpe", "data.tokenizer.vocab_size=32768", f"data.tokenizer.file={tokenizer}",
              "data.tokenizer.copy_to=null", "data.num_workers=6", "samples=400"]  # fmt: skip
    jobs = {
        "corpus_a": (list(pretrained.values()), [f"data.corpus.path={data_dir}/corpus_a", "ablation.samples=200"]),
        # corpus_b shares no document with corpus_a: all of it is unseen; 999 per mille puts (nearly) all in the split
        "corpus_b": (
            [checkpoint for run, checkpoint in pretrained.items() if run not in TRAINED_ON_CORPUS_B]
            + [checkpoint for checkpoint in tuned if checkpoint not in pretrained.values()],
            [f"data.corpus.path={data_dir}/{CORPUS_B_SCORED}", "data.corpus.val_permille=999", "ablation.samples=0"],
        ),
        "finetune": (tuned, [f"data.corpus.path={data_dir}/corpus_a", "ablation.samples=0"]),
    }
    out = ROOT / "outputs" / ("study" if part == 1 else "study2")
    for name, (paths, extra) in jobs.items():
        if not paths:
            print(f"[study] eval {name}: no finished run, skipped", flush=True)
            continue
        target = out / "eval" / f"{name}_{time.strftime('%Y%m%d-%H%M%S')}"
        command = [sys.executable, "eval.py", "eval_mode=compare", f"ckpts=[{','.join(paths)}]", *common, *extra,
                   f"hydra.run.dir={target}", *overrides]  # fmt: skip
        if subprocess.run(command, cwd=ROOT).returncode:  # eval.py writes what it measured before it exits 1
            print(f"[study] eval {name}: a part FAILED, see {target}/compare.json", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["train", "eval", "report"])
    parser.add_argument("--part", type=int, choices=[1, 2], default=1, help="conf/experiment/study (1), study2 (2)")
    parser.add_argument("--per-gpu", type=int, default=2, help="runs at a time on each GPU (2 fill an H200)")
    parser.add_argument("--only", default=None, help="comma-separated experiment names (default: all)")
    parser.add_argument("--stop-launching-after", type=float, default=0, help="seconds; 0 = no limit")
    parser.add_argument("--stop-after", type=float, default=0, help="seconds; then runs in flight save and stop")
    args, overrides = parser.parse_known_args()
    if args.step == "train":
        train(args, overrides)
    elif args.step == "eval":
        evaluate(args.part, overrides)
    else:
        from scripts.study_report import build_report

        name = "study" if args.part == 1 else "study2"
        build_report(ROOT / "outputs" / name, ROOT / "docs" / name, IMG, part=args.part)


if __name__ == "__main__":
    main()
