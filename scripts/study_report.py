"""The study's report from what eval.py (compare mode) and the runs wrote: no metric is computed here.

Reads outputs/study/eval/{corpus_a,corpus_b,finetune}_*/compare.json (the newest of each) and every run's
csv/metrics.csv; writes docs/study_results.md (tables), docs/study/*.csv|json (the numbers) and docs/img/study_*.png.
Called by `python scripts/study.py report`.
"""

import csv
import json
import re
import statistics
from pathlib import Path

import numpy as np
from PIL import Image

from callbacks.plots import figure_to_array, importance_heatmap, save_figure
from evaluation.report import ablation_figure, side_by_side

PRETRAINED_ORDER = ["vanilla", "sink", "gated"]


def run_name(checkpoint: str) -> str:
    """outputs/study/<run>/checkpoints/last.ckpt -> <run>."""
    return Path(checkpoint).parents[1].name


def newest_compare(out: Path, kind: str) -> dict[str, dict]:
    folders = sorted((out / "eval").glob(f"{kind}_*"))
    if not folders:
        return {}
    return {run_name(r["checkpoint"]): r for r in json.loads((folders[-1] / "compare.json").read_text())}


def logged(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """metric -> [(step, value)] from the run's CSV log."""
    series: dict[str, list[tuple[int, float]]] = {}
    for row in csv.DictReader(open(run_dir / "csv" / "metrics.csv")):
        for key, value in row.items():
            if value and key not in ("step", "epoch") and not key.startswith("heads/importance"):
                series.setdefault(key, []).append((int(row["step"]), float(value)))
    return series


def sort_key(run: str):
    """Variant, then seed, then lambda; the fine-tuning runs last."""
    fields = dict(re.findall(r"([a-z]+?)(\d[\d.e-]*)", run.split("_", 1)[1])) if "_" in run else {}
    attention = run.split("_")[0]
    rank = PRETRAINED_ORDER.index(attention) if attention in PRETRAINED_ORDER else len(PRETRAINED_ORDER)
    return (rank, fields.get("seed", ""), float(fields.get("lambda", 0)), fields.get("m", ""))


def run_rows(out: Path, evals: dict[str, dict[str, dict]], tokens_per_step: int) -> list[dict]:
    rows = []
    for run_dir in sorted((p.parent.parent for p in out.glob("*/csv/metrics.csv")), key=lambda p: sort_key(p.name)):
        log = logged(run_dir)
        a = evals["corpus_a"].get(run_dir.name) or evals["finetune"].get(run_dir.name)
        if a is None:
            continue  # not evaluated: an unfinished run
        b = evals["corpus_b"].get(run_dir.name)
        imp = np.array(a["importance"])
        speed = [v for _, v in log.get("perf/tokens_per_s", [])]
        rows.append({
            "run": run_dir.name,
            "attention": a["model"]["attention"],
            "lambda": a["aux"]["lambda"],
            "shared_heads": a["aux"].get("shared_heads", 0),
            "steps": a["step"],
            "tokens": a["step"] * tokens_per_step,
            "val_bpb_corpus_a": round(a["bpb"], 4),
            "bpb_corpus_b": round(b["bpb"], 4) if b else None,
            "mean_cv": round(a["cv_mean"], 4),
            "routed_cv": round(a["cv_routed_mean"], 4) if "cv_routed_mean" in a else None,
            "gate_min": round(float(imp.min()), 3),
            "gate_max": round(float(imp.max()), 3),
            "logged_val_bpb": round(log["val/bpb"][-1][1], 4),
            "tokens_per_s_median": round(statistics.median(speed)) if speed else None,
        })  # fmt: skip
    return rows


def tokens_per_step() -> int:
    """data.batch_size x model.seq_len of the study's runs (conf/experiment/study/base.yaml; one GPU each)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(Path(__file__).parents[1] / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=study/vanilla"])
    return cfg.data.batch_size * cfg.model.seq_len


def finetune_rows(reports: dict[str, dict]) -> list[dict]:
    rows = []
    for run in sorted(reports, key=sort_key):
        r = reports[run]
        imp = np.array(r["importance"])
        rows.append({
            "run": run,
            "shared_heads": r["aux"].get("shared_heads", 0) if "finetune" in run else "-",
            "bpb": round(r["bpb"], 4),
            "weakest_head_gate": round(float(imp.min(axis=1).mean()), 4),
            "strongest_head_gate": round(float(imp.max(axis=1).mean()), 4),
            "mean_cv": round(r["cv_mean"], 4),
            "routed_cv": round(r["cv_routed_mean"], 4) if "cv_routed_mean" in r else None,
        })  # fmt: skip
    return rows


def markdown_table(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join("-" if r[k] is None else str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def cv_curves_figure(out: Path, runs: list[str]):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100, constrained_layout=True)
    styles = {"vanilla": "C0", "sink": "C1", "gated": "C2"}
    for run in runs:
        points = logged(out / run).get("heads/cv_mean", [])
        steps, values = zip(*points, strict=True)
        attention = run.split("_")[0]
        dashed = "lambda0.0_" not in run
        ax.plot(steps, values, color=styles.get(attention, "C3"), linestyle="--" if dashed else "-",
                linewidth=0.8 if "seed2" in run else 1.5, label=run)  # fmt: skip
    ax.set_yscale("log")
    ax.set_xlabel("step (32,768 tokens each)")
    ax.set_ylabel("mean CV of head importance (log)")
    ax.set_title("head imbalance over training (solid: lambda=0, dashed: aux loss on)", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    return fig


def heatmaps(reports: list[dict], labels: list[str]) -> np.ndarray:
    images = []
    for report, label in zip(reports, labels, strict=True):
        shared = np.array(report["shared_heads"]) if report.get("shared_heads") else None
        title = f"{label}\nBPB {report['bpb']:.4f}"
        images.append(figure_to_array(importance_heatmap(np.array(report["importance"]), title, shared)))
    rows = [side_by_side(images[i : i + 5]) for i in range(0, len(images), 5)]
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    return np.concatenate(rows, axis=0)


def build_report(out: Path, docs: Path, img: Path) -> None:
    evals = {kind: newest_compare(out, kind) for kind in ("corpus_a", "corpus_b", "finetune")}
    if not evals["corpus_a"]:
        raise SystemExit(f"no eval under {out / 'eval'}: run `python scripts/study.py eval` first")
    docs.mkdir(parents=True, exist_ok=True)
    img.mkdir(parents=True, exist_ok=True)
    rows = run_rows(out, evals, tokens_per_step())
    with open(docs / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    pretrained = [r["run"] for r in rows if not r["run"].startswith("finetune")]
    with open(docs / "cv_curves.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "step", "cv_mean", "val_bpb"])
        for run in pretrained:
            log = logged(out / run)
            val = dict(log.get("val/bpb", []))
            writer.writerows([run, step, round(cv, 5), val.get(step, "")] for step, cv in log["heads/cv_mean"])
    for kind, reports in evals.items():
        (docs / f"eval_{kind}.json").write_text(json.dumps(list(reports.values()), indent=1))
    save_figure(cv_curves_figure(out, pretrained), img / "study_cv_curves.png")
    a = evals["corpus_a"]
    Image.fromarray(heatmaps([a[r] for r in pretrained], pretrained)).save(img / "study_heatmaps.png")
    # the three variants without the aux loss, and gated with it (the one variant whose heads are imbalanced)
    shown = [r for r in pretrained if ("lambda0.0_seed1337" in r or r.startswith("gated_")) and "ablation" in a[r]]
    save_figure(ablation_figure({r: a[r]["ablation"] for r in shown}), img / "study_ablation.png")
    if evals["finetune"]:
        tuned = sorted(evals["finetune"], key=sort_key)
        finetune = heatmaps([evals["finetune"][r] for r in tuned], tuned)
        Image.fromarray(finetune).save(img / "study_finetune.png")
    tuned = finetune_rows(evals["finetune"]) if evals["finetune"] else []
    (docs.parent / "study_results.md").write_text(
        "# Study results (generated by `python scripts/study.py report`; do not edit)\n\n"
        "Every number comes from eval.py compare mode (`docs/study/eval_*.json`) or the runs' CSV logs "
        "(`docs/study/cv_curves.csv`). Data: corpus_a (Wikipedia, blogs, IMDb reviews; not FineWeb-Edu).\n\n"
        + markdown_table(rows)
        + (
            "\n\nFine-tuning from the vanilla lambda=0 run (gates of each layer's weakest and strongest head, "
            "as eval.py measured them, averaged over the layers):\n\n" + markdown_table(tuned)
            if tuned
            else ""
        )
        + "\n\n![CV over training](img/study_cv_curves.png)\n\n![importance heatmaps](img/study_heatmaps.png)\n\n"
        "![head ablation](img/study_ablation.png)\n\n![fine-tuning](img/study_finetune.png)\n"
    )
    print(markdown_table(rows))
