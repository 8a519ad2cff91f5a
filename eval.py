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
from lm_eval.api.model import TemplateLM
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
# lm-evaluation-harness adapter.


class HarnessLM(TemplateLM):
    """A checkpoint as an lm-eval model. Every input starts with BOS, as every training row did (position 0
    is the sink); inputs longer than the context keep BOS and their last tokens."""

    def __init__(self, model: GPT, tokenizer, runtime: Runtime, batch_size: int = 8):
        super().__init__()
        self.model, self.tokenizer, self.runtime, self.batch_size = model, tokenizer, runtime, batch_size
        self._device = runtime.device

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.bos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        ids = self.tokenizer.encode(string)
        return ids if add_special_tokens is False else [self.tokenizer.bos_id, *ids]

    def with_sink(self, tokens: list[int]) -> list[int]:
        """BOS first, and at most seq_len + 1 tokens (seq_len inputs, each predicting the next)."""
        bos, seq_len = self.tokenizer.bos_id, self.model.cfg.seq_len
        if tokens[0] != bos:
            tokens = [bos, *tokens]
        return tokens if len(tokens) <= seq_len + 1 else [bos, *tokens[-seq_len:]]

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start : start + self.batch_size]
            rows = [self.with_sink(context + continuation) for _, context, continuation in chunk]
            width = max(len(row) for row in rows) - 1
            # right padding: causal attention never lets a position see the padding after it
            idx = torch.zeros(len(rows), width, dtype=torch.long)
            for i, row in enumerate(rows):
                idx[i, : len(row) - 1] = torch.tensor(row[:-1])
            with self.runtime.autocast():
                logits, _ = self.model(idx.to(self.runtime.device))
            logprobs = logits.float().log_softmax(dim=-1).cpu()
            for i, ((request, _, continuation), row) in enumerate(zip(chunk, rows, strict=True)):
                n = len(continuation)
                scored = logprobs[i, len(row) - 1 - n : len(row) - 1]
                target = torch.tensor(row[-n:])
                logprob = scored.gather(1, target.unsqueeze(1)).sum().item()
                greedy = bool((scored.argmax(dim=-1) == target).all())
                results.append((logprob, greedy))
                if request is not None:
                    self.cache_hook.add_partial("loglikelihood", request, (logprob, greedy))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        results = []
        for (string,) in (request.args for request in requests):
            windows = get_rolling_token_windows(
                token_list=self.tokenizer.encode(string),
                prefix_token=self.tokenizer.bos_id,
                max_seq_len=self.model.cfg.seq_len - 1,  # room for the BOS that with_sink puts first
                context_len=1,
            )
            pieces = [(None, *make_disjoint_window(window)) for window in windows]
            total = sum(logprob for logprob, _ in self._loglikelihood_tokens(pieces))
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            results.append(total)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results = []
        for context, gen_kwargs in (request.args for request in requests):
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else until
            max_new = int(gen_kwargs.get("max_gen_toks", 256))
            temperature = float(gen_kwargs.get("temperature", 0.0)) if gen_kwargs.get("do_sample") else 0.0
            # the prompt keeps its last tokens, leaving room for max_gen_toks (but keeping at least half the context)
            room = max(self.model.cfg.seq_len // 2, self.model.cfg.seq_len - max_new)
            prompt = self.with_sink(self.tok_encode(context))
            prompt = prompt if len(prompt) <= room else [prompt[0], *prompt[-(room - 1) :]]
            text = self.complete(prompt, max_new, temperature, until)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            results.append(text)
        return results

    def complete(self, prompt: list[int], max_new: int, temperature: float, until: list[str]) -> str:
        """Decode until a stop string appears (cut there), BOS comes out, or max_new tokens."""
        new, text = [], ""
        idx = torch.tensor([prompt], device=self.runtime.device)
        with self.runtime.autocast():
            for column in generate(self.model, idx, max_new, temperature, stop_id=self.tokenizer.bos_id):
                new.append(column.item())
                text = self.tokenizer.decode(new)
                hits = [text.index(stop) for stop in until if stop in text]
                if hits:
                    return text[: min(hits)]
        return text


def run_tasks(lm: HarnessLM, cfg: DictConfig) -> dict:
    """Harness tasks by name; include_path adds a folder of task YAMLs (e.g. local copies, offline)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    task_manager = TaskManager(include_path=cfg.harness.include_path, include_defaults=cfg.harness.include_defaults)
    results = simple_evaluate(
        model=lm,
        tasks=list(cfg.tasks),
        num_fewshot=cfg.harness.num_fewshot,
        limit=cfg.harness.limit,
        task_manager=task_manager,
        log_samples=False,
        bootstrap_iters=cfg.harness.bootstrap_iters,
    )
    log.info("harness results:\n%s", make_table(results))
    return json.loads(json.dumps(results["results"], default=str))  # plain JSON (numpy floats, NaN as is)


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
    lines = ["| checkpoint | attention | step | BPB | loss | mean CV |", "|---|---|---|---|---|---|"]
    for r in reports:
        attention = r["model"]["attention"]
        lines.append(
            f"| {r['checkpoint']} | {attention} | {r['step']} | {r['bpb']:.4f} | {r['loss']:.4f} | {r['cv_mean']:.3f} |"
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
