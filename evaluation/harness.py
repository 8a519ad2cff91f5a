"""lm-evaluation-harness adapter: a checkpoint's GPT as an lm-eval model, and running harness tasks by name.

Imported by evaluation.report only when tasks are asked for, before anything is measured (load_tasks): lm-eval takes
seconds to import and is not installed everywhere, and a task's data may be neither cached nor reachable.
"""

import json
import logging

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.tasks import TaskManager
from omegaconf import DictConfig

from model.generate import generate
from model.gpt import GPT

log = logging.getLogger("eval")


class HarnessLM(TemplateLM):
    """A checkpoint as an lm-eval model. Every input starts with BOS, as every training row did (position 0
    is the sink); inputs longer than the context keep BOS and their last tokens."""

    def __init__(self, model: GPT, tokenizer, runtime, batch_size: int = 8):
        """runtime: evaluation.loading.Runtime (device and autocast)."""
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


def load_tasks(cfg: DictConfig) -> TaskManager:
    """The TaskManager of cfg.harness with every task of cfg.tasks loaded once, in seconds: an unknown name, or data
    that is neither in the Hugging Face cache nor reachable, fails here with one line, before the long part of an
    evaluation; run_tasks then reads the data from the cache. include_path adds a folder of task YAMLs."""
    manager = TaskManager(include_path=cfg.harness.include_path, include_defaults=cfg.harness.include_defaults)
    try:
        manager.load(list(cfg.tasks))
    except KeyError as err:
        raise ValueError(f"tasks={list(cfg.tasks)}: {err.args[0]}: check the name or harness.include_path") from None
    except Exception as err:  # no network, not cached, a broken task file: one line, not lm-eval's traceback
        reason = str(err).splitlines()[0] if str(err) else ""
        raise ValueError(
            f"tasks={list(cfg.tasks)}: loading the task data failed ({type(err).__name__}: {reason}): fill the Hugging "
            "Face cache once online and run with HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1, or give local task files "
            "with harness.include_path (docs/eval.md)"
        ) from None
    return manager


def run_tasks(lm: HarnessLM, cfg: DictConfig, task_manager: TaskManager) -> dict:
    """Harness tasks by name, from the TaskManager of load_tasks."""
    from lm_eval import simple_evaluate
    from lm_eval.utils import make_table

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
