"""Text from a checkpoint's GPT: the prompt after BOS, continued over the KV cache (model/generate.py)."""

import torch
from omegaconf import DictConfig

from evaluation.loading import Runtime, build_data, checkpoint_path, load_checkpoint, require_gpt
from model.generate import generate


def sample(cfg: DictConfig, runtime: Runtime) -> list[str]:
    """cfg.num_samples continuations of cfg.prompt, printed as they finish and returned."""
    model, info = load_checkpoint(checkpoint_path(cfg), cfg.backend)
    model = require_gpt(model, "eval_mode=sample").to(runtime.device)
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
