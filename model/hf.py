"""Hugging Face decoder models (Llama, Qwen2, Qwen3, GPT-OSS) with per-head gates, for Eq. 8 fine-tuning.

The gates come from an attention function registered with transformers' AttentionInterface under the name
"sink_aware". It computes the model's attention as the stock eager function does, so the logits do not
change, and also each head's natural-log LSE over the keys it sees, from which it takes the gate with the
formulas of our GPT's variants (model/attention.py; docs/math.md):

    vanilla (Llama, Qwen)   G = 1 - A[t, 0] = 1 - exp(s[t, 0] - LSE[t])    key 0 (the first token) is the sink
    sink (GPT-OSS)          G = sigmoid(LSE[t] - b_h)                       b_h: the model's own sink logit

The gates go back through a list passed down the model's forward keyword arguments (`gate_store`), which
transformers hands to every attention call. Rows must start with their first token at key 0 (no left padding).
The explicit T×T softmax is the eager one: fine for fine-tuning at moderate lengths, not for long contexts.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.attention import attention_beside_the_sink_logit, attention_off_the_sink

SINK_AWARE = "sink_aware"
FAMILIES = ("llama", "qwen2", "qwen3", "gpt_oss")  # decoders whose attention calls the AttentionInterface
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, H_kv, S, D) -> (B, H_kv * groups, S, D): grouped-query keys and values, one per query head."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def sink_aware_attention(
    module, query, key, value, attention_mask, scaling, dropout=0.0, s_aux=None, gate_store=None, head_mask=None, **_
):
    """Eager attention that also records the gate (B, H, T) of each head in gate_store (a list), if given.

    head_mask (L, H) multiplies each head's output (1 keeps, 0 ablates), as in our GPT.
    """
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # in the model's dtype, as eager does
    scores = scores.float()  # the softmax, LSE and gate in fp32
    if attention_mask is not None:
        scores = scores + attention_mask.float()
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, T) over the real keys
    if s_aux is None:
        probs = torch.exp(scores - lse.unsqueeze(-1))
        gate = attention_off_the_sink(scores[..., 0], lse)
    else:
        sink = s_aux.float().view(1, -1, 1)
        probs = torch.exp(scores - torch.logaddexp(lse, sink).unsqueeze(-1))  # the sink takes the rest, no value
        gate = attention_beside_the_sink_logit(lse, s_aux)
    if gate_store is not None:
        gate_store.append(gate)
    weights = F.dropout(probs, p=dropout, training=module.training).to(value.dtype)
    out = torch.matmul(weights, value)  # (B, H, T, D)
    if head_mask is not None:
        out = out * head_mask[module.layer_idx].view(1, -1, 1, 1).to(out.dtype)
    return out.transpose(1, 2).contiguous(), weights


def register() -> None:
    """Make attn_implementation="sink_aware" known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(SINK_AWARE, sink_aware_attention)
    AttentionMaskInterface.register(SINK_AWARE, eager_mask)  # the additive float mask eager attention takes


@dataclass
class HFShape:
    """What the module, the callbacks and the logs read off a model: our GPTConfig's field names."""

    name: str
    family: str
    n_layer: int
    n_head: int
    head_dim: int
    n_embd: int


class HFGatedLM(nn.Module):
    """A Hugging Face causal LM whose forward returns (logits (B, T, V), gates (L, B, H, T) fp32) like GPT."""

    def __init__(self, hf_model: nn.Module, name: str):
        super().__init__()
        self.hf = hf_model.train()  # from_pretrained returns eval mode; a fresh nn.Module (and our GPT) trains
        c = hf_model.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.cfg = HFShape(name, c.model_type, c.num_hidden_layers, c.num_attention_heads, head_dim, c.hidden_size)

    def forward(self, idx, head_mask=None):
        gates = []
        out = self.hf(input_ids=idx, use_cache=False, gate_store=gates, head_mask=head_mask)
        return out.logits, torch.stack(gates)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """6·N (matmuls, fwd+bwd, frozen weights included: their input gradients cost the same) + attention."""
        n_matmul = self.num_params() - self.hf.get_input_embeddings().weight.numel()
        return 6 * n_matmul + 12 * self.cfg.n_layer * self.cfg.n_head * self.cfg.head_dim * seq_len


def load_hf_model(
    hf_path: str,
    dtype: str = "float32",
    lora_rank: int | None = 16,
    lora_alpha: float | None = None,
    lora_targets: tuple[str, ...] = LORA_TARGETS,
    vocab_size: int | None = None,
    seq_len: int | None = None,
) -> HFGatedLM:
    """A local Hugging Face model directory -> HFGatedLM, with LoRA adapters of rank lora_rank (None: all
    weights train). vocab_size and seq_len: the data's vocabulary and row length, checked against the model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    register()
    try:
        config = AutoConfig.from_pretrained(hf_path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"model.hf_path={hf_path}: not a local Hugging Face model directory ({err})") from None
    if config.model_type not in FAMILIES:
        raise ValueError(f"model.hf_path={hf_path} is a {config.model_type!r} model; supported: {FAMILIES}")
    if vocab_size is not None and vocab_size > config.vocab_size:
        raise ValueError(
            f"the data's tokenizer has {vocab_size} tokens, the model at model.hf_path={hf_path} only "
            f"{config.vocab_size}: use that model's own tokenizer (data=jsonl_sft)"
        )
    if seq_len is not None and seq_len > config.max_position_embeddings:
        raise ValueError(
            f"model.seq_len={seq_len} is longer than the {config.max_position_embeddings} positions of the model at "
            f"model.hf_path={hf_path}"
        )
    hf = AutoModelForCausalLM.from_pretrained(
        hf_path, attn_implementation=SINK_AWARE, dtype=getattr(torch, dtype), local_files_only=True
    )
    if lora_rank:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=lora_rank,
            lora_alpha=lora_alpha or 2 * lora_rank,
            target_modules=list(lora_targets),
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
        )
        hf = get_peft_model(hf, lora)
    return HFGatedLM(hf, name=hf_path)


@torch.no_grad()
def hf_head_diagnosis(path: str, texts: list[str], max_tokens: int = 512, dtype: str = "float32", device="cpu"):
    """Importance (L, H) of every head of the model at `path` over `texts` (the paper's heatmaps of
    LLaMA/Qwen/GPT-OSS): the mean gate over each text's positions t >= 1, then over the texts.

    Each text is run alone, prefixed with the tokenizer's BOS (or EOS when it has none) so key 0 is a sink.
    """
    from transformers import AutoTokenizer

    from model.balance import importance

    model = load_hf_model(path, dtype=dtype, lora_rank=None).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    first = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    total = None
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][: max_tokens - 1]
        _, gates = model(torch.tensor([[first, *ids]], device=device))
        imp = importance(gates)
        total = imp if total is None else total + imp
    if total is None:
        raise ValueError("hf_head_diagnosis: no texts given")
    return (total / len(texts)).cpu()
