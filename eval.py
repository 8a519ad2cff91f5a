"""Evaluate trained checkpoints: BPB, head importance and CV, the head-ablation curve, harness tasks, samples.

python eval.py ckpt=PATH                             # report: BPB, heatmap, CV, ablation curve, report.json
python eval.py run=NAME                              # the same for the last.ckpt of a run
python eval.py compare=[A.ckpt,B.ckpt]               # side-by-side heatmaps, ablation curves, CV/BPB table
python eval.py ckpt=PATH tasks=[hellaswag,arc_easy]  # lm-evaluation-harness tasks as well
python eval.py mode=sample ckpt=PATH prompt="..."    # text from the model (KV cache)
"""

import contextlib
import json
import logging
import sys
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict
from PIL import Image

from callbacks.plots import figure_to_array, importance_heatmap, save_figure
from model.balance import coefficient_of_variation, importance
from model.generate import generate
from model.gpt import GPT, GPTConfig
from model.lit import BitsPerByte, token_nll

log = logging.getLogger("eval")
MODES = ("report", "sample")

# ----------------------------------------------------------------------------------------------------
# Checkpoints and the runtime (device, precision).


def checkpoint_path(cfg: DictConfig) -> Path:
    """ckpt=PATH, or run=NAME: the newest last.ckpt under runs_dir/NAME."""
    if (cfg.ckpt is None) == (cfg.run is None):
        raise ValueError("give exactly one of ckpt=PATH (a .ckpt file) or run=NAME (a run under runs_dir)")
    if cfg.ckpt is not None:
        return Path(cfg.ckpt).expanduser()
    run_dir = Path(cfg.runs_dir).expanduser() / cfg.run
    found = sorted(run_dir.rglob("last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"run={cfg.run}: no last.ckpt under {run_dir}; check runs_dir= or pass ckpt=PATH")
    return found[-1]


def load_checkpoint(path: Path, backend: str) -> tuple[GPT, dict]:
    """The GPT of a train.py checkpoint (eval mode, on the CPU) and facts about it for the report."""
    if not path.is_file():
        raise FileNotFoundError(f"ckpt={path}: no such file; give a .ckpt written by train.py (or run=NAME)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or foreign file: one line, not a traceback of the unpickler
        raise ValueError(f"ckpt={path}: not a readable checkpoint ({type(err).__name__}: {err})") from None
    hparams = checkpoint.get("hyper_parameters", {}) if isinstance(checkpoint, dict) else {}
    if "model" not in hparams or "state_dict" not in checkpoint:
        raise ValueError(f"ckpt={path}: no model hyper-parameters or state_dict; give a .ckpt written by train.py")
    if "hf_path" in hparams["model"]:
        raise ValueError(f"ckpt={path} is a fine-tuned Hugging Face model: eval.py evaluates this project's GPT only")
    # The backend is chosen for this machine (every backend computes the same math); no recompute in eval.
    model_cfg = {**hparams["model"], "backend": backend, "activation_checkpointing": False}
    model = GPT(GPTConfig(**model_cfg))
    state = checkpoint["state_dict"]
    weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise ValueError(f"ckpt={path}: its weights do not fit its own model config ({err})") from None
    shared = state.get("shared_heads")
    info = {
        "checkpoint": str(path),
        "step": checkpoint.get("global_step"),
        "model": hparams["model"],
        "aux": hparams.get("aux"),
        "shared_heads": shared.tolist() if shared is not None and shared.any() else None,
    }
    return model.eval(), info


class Runtime:
    """Where and in which precision the model runs: device=auto picks CUDA when present, dtype=auto bf16
    autocast there (as trainer=gpu trains) and fp32 on the CPU."""

    def __init__(self, device: str, dtype: str):
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if dtype == "auto":
            dtype = "bf16" if self.device.type == "cuda" else "fp32"
        if dtype not in ("fp32", "bf16"):
            raise ValueError(f"dtype={dtype!r} is not one of auto, fp32, bf16")
        self.dtype = dtype

    def autocast(self):
        if self.dtype == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)


# ----------------------------------------------------------------------------------------------------
# BPB, importance, ablation.


def validation_batches(datamodule, rows: int) -> list[dict]:
    """The first `rows` packed rows of the validation split, as the training validation loop sees them."""
    batches, seen = [], 0
    for batch in datamodule.loader("validation"):
        if seen >= rows:
            break
        take = min(rows - seen, batch["input_ids"].size(0))
        batches.append({key: value[:take] for key, value in batch.items()})
        seen += take
    if seen < rows:
        log.warning("the validation split has only %d rows of the %d asked for: using them all", seen, rows)
    if seen == 0:
        raise ValueError("the validation split is empty: check data.corpus.val_permille and the corpus")
    return batches


@torch.no_grad()
def measure(model: GPT, batches: list[dict], runtime: Runtime, head_mask=None) -> dict:
    """BPB and loss exactly as SinkAwareLM's validation computes them, and importance (L, H) over all rows."""
    bpb = BitsPerByte().to(runtime.device)
    nats = torch.zeros((), dtype=torch.float64, device=runtime.device)
    imp_sum, tokens, rows = 0.0, 0, 0
    for batch in batches:
        idx, targets = batch["input_ids"].to(runtime.device), batch["targets"].to(runtime.device)
        with runtime.autocast():
            logits, gates = model(idx, head_mask)
        nll = token_nll(logits, targets)
        bpb.update(nll, batch["target_bytes"].to(runtime.device))
        nats += nll.double().sum()
        # every row has the same length, so the mean over rows of per-batch means weighted by rows is exact
        imp_sum = imp_sum + importance(gates.float()).double() * idx.size(0)
        tokens, rows = tokens + nll.numel(), rows + idx.size(0)
    return {
        "bpb": bpb.compute().item(),
        "loss": (nats / tokens).item(),
        "importance": (imp_sum / rows).cpu(),
        "rows": rows,
        "tokens": tokens,
    }


def ablation_masks(imp: torch.Tensor, k: int, least: bool) -> torch.Tensor:
    """(L, H) head_mask with the k least (or most) important heads of every layer switched off."""
    order = imp.argsort(dim=1, descending=not least)
    mask = torch.ones_like(imp)
    return mask.scatter_(1, order[:, :k], 0.0)


def ablation_curve(model: GPT, batches: list[dict], runtime: Runtime, imp: torch.Tensor) -> dict:
    """BPB with k = 0..H heads per layer switched off, least important first, and most important first."""
    n_head = imp.size(1)
    memo = {}  # k = 0 and k = H are the same mask in both orders: measured once

    def bpb_at(mask):
        key = tuple(mask.flatten().tolist())
        if key not in memo:
            memo[key] = measure(model, batches, runtime, mask.to(runtime.device))["bpb"]
        return memo[key]

    curve = {"k": list(range(n_head + 1)), "least_important": [], "most_important": []}
    for k in curve["k"]:
        curve["least_important"].append(bpb_at(ablation_masks(imp, k, least=True)))
        curve["most_important"].append(bpb_at(ablation_masks(imp, k, least=False)))
    curve["rows"] = sum(b["input_ids"].size(0) for b in batches)
    return curve


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


# ----------------------------------------------------------------------------------------------------
# The report of one checkpoint, and the comparison of several.


def report(cfg: DictConfig, path: Path, out_dir: Path, runtime: Runtime, label: str) -> dict:
    """BPB, importance, CV, ablation curve (and harness tasks) of one checkpoint; PNGs and report.json in out_dir."""
    model, info = load_checkpoint(path, cfg.backend)
    model.to(runtime.device)
    datamodule = build_data(cfg, info["model"])
    batches = validation_batches(datamodule, cfg.samples)
    plain = measure(model, batches, runtime)
    imp = plain["importance"]
    cv = coefficient_of_variation(imp)
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
    out_dir.mkdir(parents=True, exist_ok=True)
    shared = np.array(info["shared_heads"]) if info["shared_heads"] else None
    title = f"{label}: BPB {plain['bpb']:.3f}"
    save_figure(importance_heatmap(imp.numpy(), title, shared), out_dir / "importance.png")
    if cfg.ablation.samples > 0:
        ablation_batches = (
            batches if cfg.ablation.samples == cfg.samples else validation_batches(datamodule, cfg.ablation.samples)
        )
        result["ablation"] = ablation_curve(model, ablation_batches, runtime, imp)
        save_figure(ablation_figure({label: result["ablation"]}), out_dir / "ablation.png")
    if cfg.tasks:
        from evaluation.harness import HarnessLM, run_tasks  # lm-eval: imported only when tasks are asked for

        lm = HarnessLM(model, datamodule.tokenizer, runtime, cfg.harness.batch_size)
        result["tasks"] = run_tasks(lm, cfg)
    (out_dir / "report.json").write_text(json.dumps(result, indent=2))
    log.info("report written to %s", out_dir)
    return result


def hf_report(cfg: DictConfig, out_dir: Path, runtime: Runtime) -> dict:
    """The head-collapse diagnosis of a Hugging Face model (`hf_model=PATH`): importance over `samples` validation
    documents of the data config (raw text, the model's own tokenizer), CV per layer, heatmap and report.json."""
    from itertools import islice

    from model.hf import hf_head_diagnosis

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


def label_of(path: Path) -> str:
    """RUN/last.ckpt for outputs/RUN/checkpoints/last.ckpt; DIR/NAME.ckpt otherwise."""
    folder = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return f"{folder.name}/{path.name}"


def side_by_side(images: list[np.ndarray]) -> np.ndarray:
    """Images of different heights in one row, on white."""
    height = max(image.shape[0] for image in images)
    padded = [np.pad(im, ((0, height - im.shape[0]), (0, 0), (0, 0)), constant_values=255) for im in images]
    return np.concatenate(padded, axis=1)


def compare(cfg: DictConfig, out_dir: Path, runtime: Runtime) -> list[dict]:
    """One report per checkpoint (in out_dir/<i>), then heatmaps side by side, the curves together, a table."""
    reports = []
    for i, path in enumerate(cfg.compare):
        path = Path(path).expanduser()
        reports.append(report(cfg, path, out_dir / str(i), runtime, f"[{i}] {label_of(path)}"))
    heatmaps = []
    for r in reports:
        shared = np.array(r["shared_heads"]) if r["shared_heads"] else None
        title = f"{r['label']}\nBPB {r['bpb']:.3f}"
        heatmaps.append(figure_to_array(importance_heatmap(np.array(r["importance"]), title, shared)))
    Image.fromarray(side_by_side(heatmaps)).save(out_dir / "importance_compare.png")
    if cfg.ablation.samples > 0:
        save_figure(ablation_figure({r["label"]: r["ablation"] for r in reports}), out_dir / "ablation_compare.png")
    lines = ["| checkpoint | attention | step | BPB | loss | mean CV | routed CV |", "|---|---|---|---|---|---|---|"]
    for r in reports:
        attention, routed = r["model"]["attention"], r.get("cv_routed_mean")
        lines.append(
            f"| {r['checkpoint']} | {attention} | {r['step']} | {r['bpb']:.4f} | {r['loss']:.4f} | {r['cv_mean']:.3f} "
            f"| {'-' if routed is None else f'{routed:.3f}'} |"
        )
    table = "\n".join(lines)
    (out_dir / "compare.md").write_text(table + "\n")
    (out_dir / "compare.json").write_text(json.dumps(reports, indent=2))
    log.info("comparison written to %s:\n%s", out_dir, table)
    return reports


# ----------------------------------------------------------------------------------------------------
# Sampling and the entry point.


def build_data(cfg: DictConfig, model_cfg: dict):
    """The data config's datamodule, at the checkpoint's context length; its tokenizer must fit the model."""
    with open_dict(cfg):
        cfg.model = model_cfg  # data.seq_len is ${model.seq_len}: the checkpoint's
    datamodule = instantiate(cfg.data)
    vocab = datamodule.tokenizer.vocab_size
    if vocab != model_cfg["vocab_size"]:
        raise ValueError(
            f"the checkpoint's vocabulary has {model_cfg['vocab_size']} tokens, data.tokenizer gives {vocab}: pass the "
            "data/tokenizer of its training run (e.g. data/tokenizer=bpe data.tokenizer.file=RUN_DIR/tokenizer.json)"
        )
    datamodule.setup("validate")
    return datamodule


def sample(cfg: DictConfig, runtime: Runtime) -> list[str]:
    model, info = load_checkpoint(checkpoint_path(cfg), cfg.backend)
    model.to(runtime.device)
    tokenizer = build_data(cfg, info["model"]).tokenizer
    prompt = [tokenizer.bos_id, *tokenizer.encode(cfg.prompt)]
    if len(prompt) >= model.cfg.seq_len:
        raise ValueError(f"prompt is {len(prompt)} tokens; the model's context is {model.cfg.seq_len}: shorten it")
    generator = torch.Generator(runtime.device).manual_seed(cfg.seed)
    texts = []
    for i in range(cfg.num_samples):
        idx = torch.tensor([prompt], device=runtime.device)
        with runtime.autocast():
            columns = generate(model, idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k, tokenizer.bos_id, generator)
            new = [column.item() for column in columns]
        texts.append(cfg.prompt + tokenizer.decode(new))
        print(f"--- sample {i}\n{texts[-1]}", flush=True)
    return texts


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    mode = HydraConfig.get().runtime.choices["mode"]
    try:
        if mode not in MODES:
            raise ValueError(f"mode={mode} is a train.py mode; eval.py has {' | '.join(MODES)}")
        runtime = Runtime(cfg.device, cfg.dtype)
        out_dir = Path(cfg.paths.output_dir)
        if mode == "sample":
            sample(cfg, runtime)
        elif cfg.hf_model:
            hf_report(cfg, out_dir, runtime)
        elif cfg.compare:
            compare(cfg, out_dir, runtime)
        else:
            path = checkpoint_path(cfg)
            report(cfg, path, out_dir, runtime, label_of(path))
    except (ValueError, FileNotFoundError) as err:
        log.error("%s (set HYDRA_FULL_ERROR=1 for the traceback)", err)
        sys.exit(1)


if __name__ == "__main__":
    main()
