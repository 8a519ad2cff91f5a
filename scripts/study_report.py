"""The study's report from what eval.py (compare mode) and the runs wrote: no metric is computed here.

Part 1 reads outputs/study/eval/{corpus_a,corpus_b,finetune}_*/compare.json (each run's newest report) and every run's
csv/metrics.csv; writes docs/study_results.md (tables), docs/study/*.csv|json (the numbers) and docs/img/study_*.png.
Part 2 reads the same from outputs/study2/ and writes docs/study2_results.md, docs/study2/, docs/img/study2_*.png,
with a per-head gate trajectory of each fine-tuning (its logged heads/importance/LXX/HYY, shared heads marked).
Called by `python scripts/study.py report` (build_report(..., part=2) for part 2).
"""

import csv
import json
import re
import statistics
from pathlib import Path

import numpy as np
from PIL import Image

from evaluation.report import ablation_figure, side_by_side
from plots import figure_to_array, importance_heatmap, save_figure

PRETRAINED_ORDER = ["vanilla", "sink", "gated"]


def run_name(checkpoint: str) -> str:
    """outputs/study/<run>/checkpoints/last.ckpt -> <run>."""
    return Path(checkpoint).parents[1].name


def newest_compare(out: Path, kind: str) -> dict[str, dict]:
    """Each run's newest report among the compare.json of this kind (runs evaluated in different calls), all of
    them over the same rows: a compare that recorded other rows than an earlier one is an error, not a table."""
    reports: dict[str, dict] = {}
    rows = None
    for folder in sorted((out / "eval").glob(f"{kind}_*")):  # names end in the time: oldest first
        for report in json.loads((folder / "compare.json").read_text()):
            scored = report.get("scored_rows")  # absent in compares written before eval.py recorded it
            if scored is not None:
                rows = rows or scored["tokens_sha256"]
                if scored["tokens_sha256"] != rows:
                    raise SystemExit(
                        f"{folder}/compare.json scored other rows than an earlier {kind} compare: "
                        "re-run `python scripts/study.py eval` so every run is scored on the same rows"
                    )
            reports[run_name(report["checkpoint"])] = report
    return reports


def head_gates(run_dir: Path) -> dict[tuple[int, int], list[tuple[int, float]]]:
    """(layer, head) -> [(step, importance)] from the run's logged heads/importance/LXX/HYY."""
    series: dict[tuple[int, int], list[tuple[int, float]]] = {}
    for row in csv.DictReader(open(run_dir / "csv" / "metrics.csv")):
        for key, value in row.items():
            if value and (match := re.fullmatch(r"heads/importance/L(\d+)/H(\d+)", key)):
                series.setdefault((int(match[1]), int(match[2])), []).append((int(row["step"]), float(value)))
    return series


def gate_trajectories_figure(run: str, gates: dict[tuple[int, int], list], shared: list[list[bool]] | None):
    """One panel per layer, one line per head over the fine-tuning's steps; shared heads (Eq. 8) thick and solid,
    routed heads thin and dashed."""
    import matplotlib.pyplot as plt

    layers = max(layer for layer, _ in gates) + 1
    cols = min(layers, 4)
    fig, axes = plt.subplots(-(-layers // cols), cols, figsize=(3 * cols, 2.4 * -(-layers // cols)), dpi=100,
                             sharex=True, sharey=True, constrained_layout=True, squeeze=False)  # fmt: skip
    for (layer, head), points in sorted(gates.items()):
        is_shared = bool(shared and shared[layer][head])
        steps, values = zip(*points, strict=True)
        ax = axes.flat[layer]
        style = {"linewidth": 2.2, "linestyle": "-"} if is_shared else {"linewidth": 0.9, "linestyle": "--"}
        ax.plot(steps, values, color=f"C{head}", label=f"H{head}{' (shared)' if is_shared else ''}", **style)
        ax.set_title(f"layer {layer}", fontsize=8)
    for ax in axes.flat[layers:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6, ncol=2)
    fig.supxlabel("fine-tuning step", fontsize=9)
    fig.supylabel("importance (mean gate)", fontsize=9)
    fig.suptitle(f"{run}\nper-head gates (thick solid: shared heads)", fontsize=9)
    return fig


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


def run_dirs(out: Path, evals: dict[str, dict[str, dict]]) -> dict[str, Path]:
    """{run: its directory} of every evaluated run whose CSV log is here: in outputs/<folder>/<run>, the folder of the
    checkpoint its report scored (part 2 also scores the part-1 runs it re-trains, in outputs/study/), else in this
    part's folder (a log copied there from another machine)."""
    dirs = {}
    for reports in evals.values():
        for run, report in reports.items():
            for run_dir in (out.parent / Path(report["checkpoint"]).parents[2].name / run, out / run):
                if (run_dir / "csv" / "metrics.csv").is_file():
                    dirs[run] = run_dir
                    break
    return dict(sorted(dirs.items(), key=lambda item: (sort_key(item[0]), item[0])))


def run_rows(dirs: dict[str, Path], evals: dict[str, dict[str, dict]], tokens_per_step: int) -> list[dict]:
    rows = []
    for run, run_dir in dirs.items():
        log = logged(run_dir)
        a = evals["corpus_a"].get(run) or evals["finetune"].get(run)
        if a is None:
            continue  # scored on corpus_b only
        b = evals["corpus_b"].get(run)
        imp = np.array(a["importance"])
        speed = [v for _, v in log.get("perf/tokens_per_s", [])]
        rows.append({
            "run": run,
            "attention": a["model"]["attention"],
            "lambda": a["aux"]["lambda"],
            "shared_heads": a["aux"].get("shared_heads", 0),
            "steps": a["step"],
            "tokens": a["step"] * tokens_per_step,
            "val_bpb_corpus_a": round(a["bpb"], 4),
            "bpb_corpus_b": round(b["bpb"], 4) if b else None,
            "mean_cv": round(a["cv_mean"], 4),
            "routed_cv": round(a["cv_routed_mean"], 4) if "cv_routed_mean" in a else None,
            "sink_ratio": round(a["sink_ratio_mean"], 3) if "sink_ratio_mean" in a else None,
            **explicit_sink_ratios(a),
            "gate_min": round(float(imp.min()), 3),
            "gate_max": round(float(imp.max()), 3),
            "logged_val_bpb": round(log["val/bpb"][-1][1], 4),
            "tokens_per_s_median": round(statistics.median(speed)) if speed else None,
        })  # fmt: skip
    return rows


def explicit_sink_ratios(report: dict) -> dict:
    """Sink ratios from eval.py's explicit attention: on position 0 and on each query's own document start."""
    sinks = report.get("sinks")
    return {
        f"sink_ratio_{name}": round(sinks[name]["sink_ratio_mean"], 3) if sinks else None
        for name in ("position0", "document_start")
    }


def tokens_per_step(experiment: str) -> int:
    """data.batch_size x model.seq_len of the part's runs (one GPU each), from one of its experiment files."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(Path(__file__).parents[1] / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}"])
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
            "sink_ratio": round(r["sink_ratio_mean"], 3) if "sink_ratio_mean" in r else None,
        })  # fmt: skip
    return rows


def markdown_table(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join("-" if r[k] is None else str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def cv_curves_figure(dirs: dict[str, Path], runs: list[str]):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100, constrained_layout=True)
    colormaps = {"vanilla": "Blues", "sink": "Oranges", "gated": "Greens"}  # a hue per variant, a shade per run
    for run in runs:
        points = logged(dirs[run]).get("heads/cv_mean", [])
        steps, values = zip(*points, strict=True)
        attention = run.split("_")[0]
        same = [r for r in runs if r.split("_")[0] == attention]
        color = plt.get_cmap(colormaps.get(attention, "Greys"))(0.45 + 0.5 * same.index(run) / max(1, len(same) - 1))
        dashed = "lambda0.0_" not in run
        ax.plot(steps, values, color=color, linestyle="--" if dashed else "-", linewidth=1.2, label=run)
    ax.set_yscale("log")
    ax.set_xlabel("step (32,768 tokens each)")
    ax.set_ylabel("mean CV of head importance (log)")
    ax.set_title("head imbalance over training (solid: lambda=0, dashed: aux loss on)", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    return fig


def float8_pairs(out: Path, runs: list[str]) -> list[tuple[Path, Path]]:
    """(float8 run, its bf16 twin) directories for each run named ..._fp8<recipe>_... whose twin (the name without
    it) was trained, in this part or in part 1 (outputs/study/: vanilla's twin is study/vanilla)."""
    pairs = []
    for run in (r for r in runs if "_fp8" in r):
        twin = re.sub(r"_fp8[a-z]+", "", run)
        found = [d / twin for d in (out, out.parent / "study") if (d / twin / "csv" / "metrics.csv").is_file()]
        if found:
            pairs.append((out / run, found[0]))
    return pairs


def float8_figure(pairs: list[tuple[Path, Path]]):
    """Per pair: validation BPB and mean CV over training, float8 beside its bf16 twin (same seed, same data)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(pairs), 2, figsize=(8, 3 * len(pairs)), dpi=100, constrained_layout=True,
                             squeeze=False)  # fmt: skip
    for (run, twin), (bpb, cv) in zip(pairs, axes, strict=True):
        for run_dir, label, style in ((twin, "bf16", "-"), (run, "float8", "--")):
            log = logged(run_dir)
            for ax, key in ((bpb, "val/bpb"), (cv, "heads/cv_mean")):
                steps, values = zip(*log[key], strict=True)
                ax.plot(steps, values, linestyle=style, label=label)
        bpb.set_title(f"{twin.name}: validation BPB", fontsize=8)
        cv.set_title("mean CV of head importance (log)", fontsize=8)
        cv.set_yscale("log")
        bpb.legend(fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("step")
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


# What differs between the parts: file names, the experiment that gives the batch size, what the fine-tunings start
# from, and which runs the ablation figure shows (part 1: the variants without the aux loss, and gated with it).
PARTS = {
    1: {"name": "study", "experiment": "study/vanilla", "start": "the vanilla lambda=0 run",
        "ablation": lambda run: "lambda0.0_seed1337" in run or run.startswith("gated_")},
    2: {"name": "study2", "experiment": "study2/gated_seed2", "start": "the collapsed gated lambda=0 run of part 1",
        "ablation": lambda run: True},
}  # fmt: skip


def build_report(out: Path, docs: Path, img: Path, part: int = 1) -> None:
    spec = PARTS[part]
    name = spec["name"]
    evals = {kind: newest_compare(out, kind) for kind in ("corpus_a", "corpus_b", "finetune")}
    if not evals["corpus_a"]:
        raise SystemExit(f"no eval under {out / 'eval'}: run `python scripts/study.py eval` first")
    docs.mkdir(parents=True, exist_ok=True)
    img.mkdir(parents=True, exist_ok=True)
    dirs = run_dirs(out, evals)
    rows = run_rows(dirs, evals, tokens_per_step(spec["experiment"]))
    with open(docs / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    pretrained = [r["run"] for r in rows if not r["run"].startswith("finetune")]
    with open(docs / "cv_curves.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "step", "cv_mean", "val_bpb"])
        for run in pretrained:
            log = logged(dirs[run])
            val = dict(log.get("val/bpb", []))
            writer.writerows([run, step, round(cv, 5), val.get(step, "")] for step, cv in log["heads/cv_mean"])
    for kind, reports in evals.items():
        (docs / f"eval_{kind}.json").write_text(json.dumps(list(reports.values()), indent=1))
    save_figure(cv_curves_figure(dirs, pretrained), img / f"{name}_cv_curves.png")
    if pairs := float8_pairs(out, pretrained):
        save_figure(float8_figure(pairs), img / f"{name}_float8.png")
    a = evals["corpus_a"]
    Image.fromarray(heatmaps([a[r] for r in pretrained], pretrained)).save(img / f"{name}_heatmaps.png")
    figures = ["cv_curves", "heatmaps", *(["float8"] if pairs else [])]
    shown = [r for r in pretrained if spec["ablation"](r) and "ablation" in a[r]]
    if shown:  # an evaluation run with ablation.samples=0 has no curve to draw
        save_figure(ablation_figure({r: a[r]["ablation"] for r in shown}), img / f"{name}_ablation.png")
        figures.append("ablation")
    tuned = sorted(evals["finetune"], key=sort_key)
    if tuned:
        finetune = heatmaps([evals["finetune"][r] for r in tuned], tuned)
        Image.fromarray(finetune).save(img / f"{name}_finetune.png")
        figures.append("finetune")
    for run in (r for r in tuned if r.startswith("finetune") and r in dirs):
        shared = evals["finetune"][run].get("shared_heads")
        save_figure(gate_trajectories_figure(run, head_gates(dirs[run]), shared), img / f"{name}_gates_{run}.png")
        figures.append(f"gates_{run}")
    tuned_rows = finetune_rows(evals["finetune"]) if tuned else []
    (docs.parent / f"{name}_results.md").write_text(
        f"# Study results, part {part} (generated by `python scripts/study.py report --part {part}`; do not edit)\n\n"
        f"Every number comes from eval.py compare mode (`docs/{name}/eval_*.json`) or the runs' CSV logs "
        f"(`docs/{name}/cv_curves.csv`). BPB on corpus_b is over the rows eval.py recorded in `scored_rows` of "
        "`eval_corpus_b.json` (their documents' ids hashed, and the command that scores them again). Sink ratio: the "
        "share of heads whose mean attention on the sink exceeds 0.3 (from the gates; `sink_ratio_position0` / "
        "`_document_start` from the explicit attention on position 0 / on each query's own document start).\n\n"
        + markdown_table(rows)
        + (
            f"\n\nFine-tuning from {spec['start']} (gates of each layer's weakest and strongest head, "
            "as eval.py measured them, averaged over the layers):\n\n" + markdown_table(tuned_rows)
            if tuned_rows
            else ""
        )
        + "".join(f"\n\n![{figure}](img/{name}_{figure}.png)" for figure in figures)
        + "\n"
    )
    print(markdown_table(rows))
