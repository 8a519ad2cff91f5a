"""Re-run the study of docs/study.md on this machine's GPUs: train its runs, evaluate them, rebuild the report.

    python scripts/study.py train [--per-gpu K] [--only a,b] [--stop-launching-after S] [--stop-after S] [OVERRIDE ..]
    python scripts/study.py eval [OVERRIDE ...]   # eval.py eval_mode=compare: corpus_a val., corpus_b, fine-tuning
    python scripts/study.py report                # docs/study_results.md, docs/study/*.csv|json, docs/img/study_*.png
    make study                                    # all three

The runs are conf/experiment/study/*.yaml (base.yaml is their shared part), each `python train.py
experiment=study/NAME` in outputs/study/...: a run that exists already resumes from its last checkpoint (a finished
one ends at once). Runs are spread over the GPUs, K at a time on each; the fine-tuning runs start once the vanilla
run they start from has finished. The data (corpus_a/ and corpus_b/ of shared/data) is read from $SINKAWARE_DATA,
by default .data/ in the repository. Every figure and number of the report comes from eval.py's compare.json and the
runs' metrics.csv: this script only gathers and draws them.
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Claims 1-3 first, then the seed pair, the larger lambda, and the fine-tuning pair (claim 4).
RUNS = [
    "vanilla", "vanilla_aux", "sink", "sink_aux", "gated", "gated_aux",
    "vanilla_seed2", "vanilla_aux_seed2", "vanilla_aux1e-2", "gated_aux1e-2",
]  # fmt: skip
FINETUNES = ["finetune_plain", "finetune_shared"]  # from the `vanilla` run
OUT = ROOT / "outputs" / "study"
DOCS, IMG = ROOT / "docs" / "study", ROOT / "docs" / "img"


def run_dir(name: str) -> Path:
    """outputs/study/<attention>_lambda<lambda>_seed<seed> (or finetune_...): the `run` of the experiment file."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return ROOT / "outputs" / compose("train", overrides=[f"experiment=study/{name}"]).run


def finished(name: str) -> bool:
    return (run_dir(name) / "checkpoints" / "done").exists()


def train(args, overrides: list[str]) -> None:
    import torch

    gpus = torch.cuda.device_count()
    if gpus == 0:
        raise SystemExit("no CUDA GPU: the study trains on GPUs (docs/study.md gives its size)")
    queue = [n for n in (args.only.split(",") if args.only else RUNS + FINETUNES) if not finished(n)]
    slots = {(gpu, k): None for gpu in range(gpus) for k in range(args.per_gpu)}
    (OUT / "logs").mkdir(parents=True, exist_ok=True)
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
        for slot in [s for s, job in slots.items() if job is None]:
            ready = [n for n in queue if n not in FINETUNES or finished("vanilla")]
            if not ready or late:
                break
            name = ready[0]
            queue.remove(name)
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(slot[0])}
            log = open(OUT / "logs" / f"{name}.log", "w")
            command = [sys.executable, "train.py", f"experiment=study/{name}", *overrides]
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


def checkpoints(names: list[str]) -> list[str]:
    return [str(run_dir(n) / "checkpoints" / "last.ckpt") for n in names if finished(n)]


def evaluate(overrides: list[str]) -> None:
    """eval.py eval_mode=compare: corpus_a's validation split (with head ablation), all of corpus_b (unseen text),
    and the fine-tuning runs beside the run they started from."""
    data_dir = Path(os.environ.get("SINKAWARE_DATA", ROOT / ".data"))
    pretrained = checkpoints(RUNS)
    tokenizer = next((str(Path(c).parents[1] / "tokenizer.json") for c in pretrained), None)
    if tokenizer is None:
        raise SystemExit("no finished study run to evaluate: run `python scripts/study.py train` first")
    common = ["data=local", "data/tokenizer=bpe", "data.tokenizer.vocab_size=32768", f"data.tokenizer.file={tokenizer}",
              "data.tokenizer.copy_to=null", "data.num_workers=6", "samples=400"]  # fmt: skip
    jobs = {
        "corpus_a": (pretrained, [f"data.corpus.path={data_dir}/corpus_a", "ablation.samples=200"]),
        # corpus_b shares no document with corpus_a: all of it is unseen; 999 per mille puts (nearly) all in the split
        "corpus_b": (
            pretrained,
            [f"data.corpus.path={data_dir}/corpus_b", "data.corpus.val_permille=999", "ablation.samples=0"],
        ),
        "finetune": (
            checkpoints(["vanilla", *FINETUNES]),
            [f"data.corpus.path={data_dir}/corpus_a", "ablation.samples=0"],
        ),
    }
    for name, (paths, extra) in jobs.items():
        if not paths:
            print(f"[study] eval {name}: no finished run, skipped", flush=True)
            continue
        target = OUT / "eval" / f"{name}_{time.strftime('%Y%m%d-%H%M%S')}"
        command = [sys.executable, "eval.py", "eval_mode=compare", f"ckpts=[{','.join(paths)}]", *common, *extra,
                   f"hydra.run.dir={target}", *overrides]  # fmt: skip
        if subprocess.run(command, cwd=ROOT).returncode:
            print(f"[study] eval {name} FAILED: see {target}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["train", "eval", "report"])
    parser.add_argument("--per-gpu", type=int, default=2, help="runs at a time on each GPU (2 fill an H200)")
    parser.add_argument("--only", default=None, help="comma-separated experiment names (default: all)")
    parser.add_argument("--stop-launching-after", type=float, default=0, help="seconds; 0 = no limit")
    parser.add_argument("--stop-after", type=float, default=0, help="seconds; then runs in flight save and stop")
    args, overrides = parser.parse_known_args()
    if args.step == "train":
        train(args, overrides)
    elif args.step == "eval":
        evaluate(overrides)
    else:
        from scripts.study_report import build_report

        build_report(OUT, DOCS, IMG)


if __name__ == "__main__":
    main()
