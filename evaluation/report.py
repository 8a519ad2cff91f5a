"""The reports eval.py writes: one checkpoint (BPB, importance, CV, ablation curve, harness tasks), several side by
side, and the head-collapse diagnosis of a Hugging Face model directory. Numbers go to JSON, pictures to PNG."""

import json
import logging
import shlex
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig
from PIL import Image

from evaluation.loading import Runtime, build_data, label_of, load_checkpoint, require_gpt
from evaluation.metrics import ablation_curve, measure, rows_fingerprint, validation_batches
from evaluation.sinks import sink_attention, sinks_figure
from model.balance import coefficient_of_variation, sink_ratio
from model.gpt import GPT
from plots import figure_to_array, importance_heatmap, save_figure

log = logging.getLogger("eval")


def ablation_figure(curves: dict[str, dict]):
    """BPB against heads switched off per layer; solid: least important first, dashed: most important first."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=100, constrained_layout=True)
    for i, (label, curve) in enumerate(curves.items()):
        color = f"C{i}"
        ax.plot(curve["k"], curve["least_important"], "o-", color=color, label=f"{label}: least important off")
        ax.plot(curve["k"], curve["most_important"], "s--", color=color, label=f"{label}: most important off")
    ax.set_xlabel("heads switched off per layer (k)")
    ax.set_xticks(curve["k"])
    ax.set_ylabel("validation BPB")
    ax.set_title("head ablation: BPB with the k least / most important heads of every layer off", fontsize=9)
    ax.legend(fontsize=7)
    return fig


def prepare_tasks(cfg: DictConfig):
    """Before the long part: lm-eval imports and every task of cfg.tasks loads (data cached or reachable). Returns
    (evaluation.harness, its loaded TaskManager); raises ValueError with one line naming the fix."""
    try:
        from evaluation import harness  # lm-eval: imported only when tasks are asked for
    except ModuleNotFoundError as err:
        if not (err.name or "").startswith("lm_eval"):
            raise
        raise ValueError(
            f"tasks={list(cfg.tasks)} needs lm-evaluation-harness, which does not import here ({err}): "
            "`pip install lm-eval`, or leave tasks= out"
        ) from None
    return harness, harness.load_tasks(cfg)


def write_report(out_dir: Path, result: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(result, indent=2))


def report(cfg: DictConfig, path: Path, out_dir: Path, runtime: Runtime, label: str) -> dict:
    """BPB, importance, CV, ablation curve (and harness tasks) of one checkpoint; PNGs and report.json in out_dir.

    report.json is rewritten after each part, so a part that fails keeps what came before. The harness tasks are
    checked before anything is measured; when they cannot run, the rest is still measured and their one-line error
    goes to result["errors"]["tasks"] (eval.py exits with it at the end)."""
    errors, tasks = {}, None
    if cfg.tasks:
        try:
            tasks = prepare_tasks(cfg)
        except ValueError as err:
            errors["tasks"] = str(err)
            log.error("%s. The tasks are skipped; everything else is measured.", err)
    model, info = load_checkpoint(path, cfg.backend)
    model.to(runtime.device)
    datamodule = build_data(cfg, info["model"])
    batches, documents = validation_batches(datamodule, cfg.samples)
    plain = measure(model, batches, runtime)
    imp = plain["importance"]
    cv = coefficient_of_variation(imp)
    ratio = sink_ratio(imp, cfg.sinks.threshold)
    result = {
        **info,
        "label": label,
        "device": str(runtime.device),
        "dtype": runtime.dtype,
        "rows": plain["rows"],
        "tokens": plain["tokens"],
        "bpb": plain["bpb"],
        "loss": plain["loss"],
        "importance": imp.tolist(),
        "cv": cv.tolist(),
        "cv_mean": cv.mean().item(),
        "sink_threshold": cfg.sinks.threshold,
        "sink_ratio": ratio.tolist(),
        "sink_ratio_mean": ratio.mean().item(),
        "scored_rows": scored_rows(datamodule, batches, documents),
        "errors": errors,
    }
    if info["shared_heads"]:  # fine-tuned with Eq. 8: the CV its aux loss balances, over the routed heads only
        routed_cv = coefficient_of_variation(imp, ~torch.tensor(info["shared_heads"]))
        result.update(cv_routed=routed_cv.tolist(), cv_routed_mean=routed_cv.mean().item())
    log.info(
        "%s: BPB %.4f, loss %.4f, mean CV %.3f over %d rows",
        label,
        plain["bpb"],
        plain["loss"],
        cv.mean(),
        plain["rows"],
    )
    write_report(out_dir, result)
    (out_dir / "documents.txt").write_text("".join(f"{doc_id}\n" for doc_id in documents))
    shared = np.array(info["shared_heads"]) if info["shared_heads"] else None
    save_figure(importance_heatmap(imp.numpy(), f"{label}: BPB {plain['bpb']:.3f}", shared), out_dir / "importance.png")
    if cfg.ablation.samples > 0:
        same_rows = cfg.ablation.samples == cfg.samples
        ablation_batches = batches if same_rows else validation_batches(datamodule, cfg.ablation.samples)[0]
        result["ablation"] = ablation_curve(model, ablation_batches, runtime, imp)
        save_figure(ablation_figure({label: result["ablation"]}), out_dir / "ablation.png")
        write_report(out_dir, result)
    if cfg.sinks.rows > 0 and isinstance(model, GPT):  # the explicit attention needs our GPT's q and k
        bos = datamodule.tokenizer.bos_id
        result["sinks"] = sink_attention(model, batches, cfg.sinks.rows, bos, cfg.sinks.threshold, runtime)
        save_figure(sinks_figure({label: result["sinks"]}), out_dir / "sinks.png")
        write_report(out_dir, result)
    if tasks is not None:
        run_harness(tasks, result, cfg, model, datamodule, runtime)
        write_report(out_dir, result)
    log.info("report written to %s", out_dir)
    return result


def eval_command() -> str | None:
    """The command of this eval.py run, from the folder it ran in (None outside eval.py, e.g. in a test)."""
    if not HydraConfig.initialized():
        return None
    hydra = HydraConfig.get()
    return f"cd {shlex.quote(hydra.runtime.cwd)} && " + shlex.join(["python", "eval.py", *hydra.overrides.task])


def scored_rows(datamodule, batches: list[dict], documents: list[str]) -> dict:
    """Which rows were scored and how they were chosen, and the command that scores exactly them again."""
    return {
        **rows_fingerprint(batches, documents),
        "chosen": "the first rows of the split, documents packed in stream order (shards ordered by seed)",
        "split": "validation",
        "corpus": datamodule.corpus.fingerprint(),
        "seed": datamodule.seed,
        "seq_len": datamodule.seq_len,
        "tokenizer": type(datamodule.tokenizer).__name__,
        "command": eval_command(),
    }


def run_harness(tasks, result: dict, cfg: DictConfig, model, datamodule, runtime: Runtime) -> None:
    """result["tasks"]: the harness results, or result["errors"]["tasks"]: why they failed, in one line."""
    harness, task_manager = tasks
    try:
        lm = harness.HarnessLM(require_gpt(model, "tasks=[...]"), datamodule.tokenizer, runtime, cfg.harness.batch_size)
        result["tasks"] = harness.run_tasks(lm, cfg, task_manager)
    except Exception as err:  # lm-eval's own failures (a task's data, its metrics): recorded, the report kept
        reason = str(err).splitlines()[0] if str(err) else ""
        result["errors"]["tasks"] = f"tasks={list(cfg.tasks)} failed: {type(err).__name__}: {reason}"
        log.error("%s", result["errors"]["tasks"])


def failures(reports: list[dict]) -> str | None:
    """One line for the parts that failed in any of the reports (None: all ran)."""
    errors = [f"{r['label']}: {error}" for r in reports for error in r["errors"].values()]
    if not errors:
        return None
    more = f" (and {len(errors) - 1} more failures, see report.json)" if len(errors) > 1 else ""
    return f"{errors[0]}{more}; everything else was measured and written"


def side_by_side(images: list[np.ndarray]) -> np.ndarray:
    """Images of different heights in one row, on white."""
    height = max(image.shape[0] for image in images)
    padded = [np.pad(im, ((0, height - im.shape[0]), (0, 0), (0, 0)), constant_values=255) for im in images]
    return np.concatenate(padded, axis=1)


def compare_table(reports: list[dict]) -> str:
    """The table of compare.md, one row per checkpoint; sink ratios by the gate, and by the explicit attention on
    position 0 and on the own document start (sinks.rows > 0)."""
    columns = "checkpoint | attention | step | BPB | loss | mean CV | routed CV | sink ratio: gate | pos. 0 | doc start"
    lines = [f"| {columns} |", "|---" * 10 + "|"]
    for r in reports:
        attention, routed, sinks = r["model"].get("attention", "hf"), r.get("cv_routed_mean"), r.get("sinks")
        explicit = [f"{sinks[key]['sink_ratio_mean']:.3f}" for key in ("position0", "document_start")] if sinks else []
        lines.append(
            f"| {r['checkpoint']} | {attention} | {r['step']} | {r['bpb']:.4f} | {r['loss']:.4f} | {r['cv_mean']:.3f} "
            f"| {'-' if routed is None else f'{routed:.3f}'} | {r['sink_ratio_mean']:.3f} | "
            + " | ".join(explicit or ["-", "-"])
            + " |"
        )
    return "\n".join(lines)


def compare(cfg: DictConfig, paths: list[Path], out_dir: Path, runtime: Runtime) -> list[dict]:
    """One report per checkpoint (in out_dir/<i>), then heatmaps side by side, the curves together, a table."""
    reports = [report(cfg, path, out_dir / str(i), runtime, f"[{i}] {label_of(path)}") for i, path in enumerate(paths)]
    heatmaps = []
    for r in reports:
        shared = np.array(r["shared_heads"]) if r["shared_heads"] else None
        title = f"{r['label']}\nBPB {r['bpb']:.3f}"
        heatmaps.append(figure_to_array(importance_heatmap(np.array(r["importance"]), title, shared)))
    Image.fromarray(side_by_side(heatmaps)).save(out_dir / "importance_compare.png")
    if cfg.ablation.samples > 0:
        save_figure(ablation_figure({r["label"]: r["ablation"] for r in reports}), out_dir / "ablation_compare.png")
    sinks = {r["label"]: r["sinks"] for r in reports if "sinks" in r}
    if sinks:
        save_figure(sinks_figure(sinks), out_dir / "sinks_compare.png")
    table = compare_table(reports)
    (out_dir / "compare.md").write_text(table + "\n")
    (out_dir / "compare.json").write_text(json.dumps(reports, indent=2))
    log.info("comparison written to %s:\n%s", out_dir, table)
    return reports


def diagnose(cfg: DictConfig, out_dir: Path, runtime: Runtime) -> dict:
    """The head-collapse diagnosis of a Hugging Face model (`hf_model=PATH`): importance over `samples` validation
    documents of the data config (raw text, the model's own tokenizer), CV per layer, heatmap and report.json."""
    from model.hf import hf_head_diagnosis  # transformers: imported only for a Hugging Face model

    corpus = instantiate(cfg.data.corpus)
    docs = islice(corpus.documents("validation", seed=cfg.seed), cfg.samples)
    texts = [doc[corpus.text_column] for doc in docs]
    dtype = "float32" if runtime.dtype == "fp32" else "bfloat16"
    imp = hf_head_diagnosis(cfg.hf_model, texts, dtype=dtype, device=runtime.device).float()
    cv = coefficient_of_variation(imp)
    label = Path(cfg.hf_model).name
    result = {"hf_model": cfg.hf_model, "documents": len(texts), "importance": imp.tolist(), "cv": cv.tolist()}
    result["cv_mean"] = cv.mean().item()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_figure(importance_heatmap(imp.numpy(), label), out_dir / "importance.png")
    (out_dir / "report.json").write_text(json.dumps(result, indent=2))
    log.info("%s: mean CV %.3f over %d documents; report written to %s", label, cv.mean(), len(texts), out_dir)
    return result
