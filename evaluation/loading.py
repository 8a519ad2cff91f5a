"""What an evaluation runs on: a model from a checkpoint, the validation data that fits it, a device and precision.

One loader for every checkpoint train.py writes: our GPT, or a Hugging Face model fine-tuned with model=hf (its
base directory must still be there; transformers is imported only then). Both give the same contract, GatedLM.
"""

import contextlib
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from checkpoints import reader
from model.gpt import GPT
from model.lit import GatedLM, build_model


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


def label_of(path: Path) -> str:
    """RUN/last.ckpt for outputs/RUN/checkpoints/last.ckpt; DIR/NAME.ckpt otherwise."""
    folder = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return f"{folder.name}/{path.name}"


def read_checkpoint(path: Path) -> dict:
    """The checkpoint dict of a train.py run (one file or a folder of shards, through checkpoints.reader), or a
    one-line error for a missing, truncated or foreign one."""
    if not path.exists():
        raise FileNotFoundError(f"ckpt={path}: no such file; give a .ckpt written by train.py (or run=NAME)")
    try:
        checkpoint = reader.load(path)
    except ValueError as err:  # truncated or foreign: one line, not a traceback of the unpickler
        raise ValueError(f"ckpt={path}: not a readable checkpoint ({err})") from None
    if "model" not in checkpoint.get("hyper_parameters", {}):
        raise ValueError(f"ckpt={path}: no model hyper-parameters; give a .ckpt written by train.py")
    return checkpoint


def load_checkpoint(path: Path, backend: str) -> tuple[GatedLM, dict]:
    """The model of a train.py checkpoint (eval mode, on the CPU) and facts about it for the report."""
    checkpoint = read_checkpoint(path)
    hparams = checkpoint["hyper_parameters"]
    model_cfg = hparams["model"]
    if "hf_path" not in model_cfg:  # our GPT: the backend chosen for this machine (all compute the same math)
        model_cfg = {**model_cfg, "backend": backend, "activation_checkpointing": False}
    model = build_model(model_cfg)  # a model=hf checkpoint needs its base directory (model.hf_path) still there
    state = checkpoint["state_dict"]
    try:
        model.load_state_dict(reader.model_weights(checkpoint))
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


def require_gpt(model: GatedLM, what: str) -> GPT:
    """Sampling and harness tasks decode over our GPT's KV cache: a one-line error for a Hugging Face model."""
    if not isinstance(model, GPT):
        raise ValueError(
            f"{what} runs this project's GPT only: export a model=hf checkpoint with evaluation.export.export_hf and "
            "use transformers (or lm-eval's hf model) for it"
        )
    return model


def build_data(cfg: DictConfig, model_cfg: dict):
    """The data config's datamodule, at the checkpoint's context length; its tokenizer must fit the model."""
    with open_dict(cfg):
        cfg.model = model_cfg  # data.seq_len is ${model.seq_len}: the checkpoint's (and model.hf_path for jsonl_sft)
    datamodule = instantiate(cfg.data)
    vocab = datamodule.tokenizer.vocab_size
    if vocab != model_cfg["vocab_size"]:
        raise ValueError(
            f"the checkpoint's vocabulary has {model_cfg['vocab_size']} tokens, data.tokenizer gives {vocab}: pass the "
            "data/tokenizer of its training run (e.g. data/tokenizer=bpe data.tokenizer.file=RUN_DIR/tokenizer.json)"
        )
    datamodule.setup("validate")
    return datamodule


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
