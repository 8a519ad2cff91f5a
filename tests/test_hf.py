"""Hugging Face models with recorded gates: outputs unchanged, gates equal an explicit softmax, LoRA, data.

No network: tiny random Llama / Qwen3 / GPT-OSS models and a tiny byte-level BPE tokenizer are written to a
temporary directory and loaded from there, as a user's local model directory would be.
"""

import json
from pathlib import Path

import pytest
import torch
from helpers import quiet_trainer
from transformers import AutoModelForCausalLM, GptOssConfig, LlamaConfig, PreTrainedTokenizerFast, Qwen3Config

from model.balance import importance
from model.hf import hf_head_diagnosis, load_hf_model

CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, head_dim=16)


def tiny_tokenizer(texts) -> PreTrainedTokenizerFast:
    """A byte-level BPE of ~300 tokens with Qwen-style specials (EOS, no BOS) and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, initial_alphabet=alphabet)
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tiny_model(path, family: str = "qwen3", texts=None, **shape) -> str:
    """A random model of `family` (llama | qwen3 | gpt_oss) and its tokenizer in `path`, for tests and smoke runs."""
    texts = texts or ["the quick brown fox jumps over the lazy dog " * 20, "hello world, attention sinks " * 20]
    tokenizer = tiny_tokenizer(texts)
    dims = {**SHAPE, **shape, "vocab_size": 320, "max_position_embeddings": 512, "eos_token_id": tokenizer.eos_token_id}
    if family == "llama":
        config = LlamaConfig(num_key_value_heads=2, **dims)
    elif family == "qwen3":
        config = Qwen3Config(num_key_value_heads=2, **dims)
    else:  # GPT-OSS: learned sink logits, sliding-window layers, a small MoE
        config = GptOssConfig(
            num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1, sliding_window=4, **dims
        )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    if family == "gpt_oss":
        with torch.no_grad():  # random sinks of both signs, so the sink gate is not trivially near 1
            for layer in model.model.layers:
                layer.self_attn.sinks.normal_(0.0, 2.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module", params=["llama", "qwen3", "gpt_oss"])
def model_dir(request, tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp(request.param), request.param)


def stock_eager(path):
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", local_files_only=True).eval()


def test_logits_unchanged_and_gates_match_explicit_softmax(model_dir):
    """Recording gates leaves the logits as the stock model's; the gates equal 1 - A[t, 0] of the eager
    attention probabilities (vanilla), or the attention not taken by the sink logit (GPT-OSS)."""
    ours = load_hf_model(model_dir, lora_rank=None).eval()
    stock = stock_eager(model_dir)
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(1))
    logits, gates = ours(ids)
    with torch.no_grad():
        out = stock(ids, output_attentions=True)
    assert gates.shape == (2, 2, 4, 10)
    torch.testing.assert_close(logits, out.logits, atol=1e-5, rtol=1e-5)
    if ours.cfg.family == "gpt_oss":  # the eager probabilities sum to the gate: the sink takes the rest
        reference = torch.stack([a.sum(-1) for a in out.attentions])
    else:
        reference = torch.stack([1 - a[..., 0] for a in out.attentions])
    torch.testing.assert_close(gates, reference, atol=1e-5, rtol=1e-5)
    assert gates[..., 1:].std() > 1e-3  # gates that vary: the comparison is not between constants


def test_sdpa_model_gives_the_same_logits(tmp_path):
    """Versus the default (sdpa) implementation a user would load, to fp32 tolerance."""
    path = save_tiny_model(tmp_path, "qwen3")
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(2))
    logits, _ = load_hf_model(path, lora_rank=None).eval()(ids)
    with torch.no_grad():
        stock = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()(ids).logits
    torch.testing.assert_close(logits, stock, atol=1e-5, rtol=1e-5)


def test_lora_trains_adapters_only_and_gates_carry_gradient(tmp_path):
    path = save_tiny_model(tmp_path, "llama")
    model = load_hf_model(path, lora_rank=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any(".q_proj.lora_A" in n for n in trainable) and any(".o_proj.lora_B" in n for n in trainable)
    ids = torch.randint(0, 300, (2, 8))
    _, gates = model(ids)
    importance(gates).std(-1).sum().backward()  # the gates move the query/key adapters
    grads = [p.grad for n, p in model.named_parameters() if ".q_proj.lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_head_mask_ablates_a_head(tmp_path):
    path = save_tiny_model(tmp_path, "qwen3")
    model = load_hf_model(path, lora_rank=None).eval()
    ids = torch.randint(0, 300, (1, 8))
    with torch.no_grad():
        full, _ = model(ids)
        mask = torch.ones(2, 4)
        same, _ = model(ids, head_mask=mask)
        mask[1, 2] = 0
        ablated, _ = model(ids, head_mask=mask)
    torch.testing.assert_close(same, full)
    assert (ablated - full).abs().max() > 1e-6


def test_head_diagnosis_is_the_mean_importance_over_texts(tmp_path):
    path = save_tiny_model(tmp_path, "llama")
    texts = ["the quick brown fox", "hello world, attention sinks are everywhere"]
    imp = hf_head_diagnosis(path, texts)
    model = load_hf_model(path, lora_rank=None).eval()
    tok = PreTrainedTokenizerFast.from_pretrained(path)
    expected = []
    for text in texts:
        ids = torch.tensor([[tok.eos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]])
        with torch.no_grad():
            expected.append(importance(model(ids)[1]))
    assert imp.shape == (2, 4)
    torch.testing.assert_close(imp, torch.stack(expected).mean(0))


def test_bad_paths_and_families_are_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.hf_path="):
        load_hf_model(str(tmp_path / "missing"))
    path = save_tiny_model(tmp_path / "m", "qwen3")
    with pytest.raises(ValueError, match="model.seq_len=4096"):
        load_hf_model(path, seq_len=4096)


def test_chat_jsonl_is_rendered_with_the_chat_template(tmp_path):
    from data.jsonl_sft import ChatCorpus, HFTokenizer

    path = save_tiny_model(tmp_path / "m", "qwen3")
    rows = [{"id": str(i), "messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "ok"}]}
            for i in range(20)]  # fmt: skip
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    corpus = ChatCorpus(str(data), tokenizer_path=path, messages_column="messages", val_permille=0)
    first = next(iter(corpus.documents("train", seed=0)))
    assert "<|im_start|>user\nhi" in first["text"] and "<|im_end|>" in first["text"]
    tok = HFTokenizer(path)
    assert tok.bos_id == tok.tok.eos_token_id  # no BOS in Qwen-style tokenizers: EOS starts the rows
    ids = tok.encode(first["text"])
    assert tok.tok.convert_tokens_to_ids("<|im_start|>") in ids  # the template's markers are special tokens
    assert tok.token_bytes[tok.bos_id] == 0 and tok.token_bytes[ids].sum() > 0


def test_lora_finetune_with_shared_heads_through_lightning(tmp_path):
    """model=hf + data=jsonl_sft + the calibration callback: m shared heads per layer, only adapters move."""

    from callbacks.calibration import Calibration
    from data.datamodule import TextDataModule
    from data.jsonl_sft import ChatCorpus, HFTokenizer
    from model.lit import SinkAwareLM

    path = save_tiny_model(tmp_path / "m", "qwen3")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"document {i}: the quick brown fox " * 4}) + "\n" for i in range(40)))
    tokenizer = HFTokenizer(path)
    corpus = ChatCorpus(str(data), tokenizer_path=path, val_permille=0)
    datamodule = TextDataModule(corpus, tokenizer, seq_len=32, batch_size=2)
    optim = dict(lr=1e-2, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.0, warmup_steps=1, decay="none", min_lr_ratio=1.0)
    module = SinkAwareLM(
        model={"hf_path": path, "lora_rank": 4, "seq_len": 32, "vocab_size": tokenizer.vocab_size},
        optim=optim,
        aux={"lambda": 1e-2, "shared_heads": 1, "scope": "local"},
    )
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer = quiet_trainer(
        max_steps=2,
        enable_checkpointing=False,
        limit_val_batches=0,
        callbacks=[Calibration(None, batches=2)],
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=datamodule)
    assert (module.shared_heads.sum(-1) == 1).all()
    moved = {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all("lora_" in n for n in moved)
    assert any("lora_A" in n for n in moved)  # lora_B starts at 0; after two steps both have moved

    # export_hf: the fine-tuned model as a plain Hugging Face directory (LoRA merged) gives the same logits.
    from evaluation.export import export_hf

    trainer.save_checkpoint(tmp_path / "ft.ckpt")
    export_hf(str(tmp_path / "ft.ckpt"), str(tmp_path / "exported"))
    ids = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        ours, _ = module.eval()(ids)
        exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()(ids).logits
    torch.testing.assert_close(exported, ours, atol=1e-5, rtol=1e-5)

    # eval.py's report of the fine-tuned checkpoint: the loader and measures of our GPT's report, on its jsonl data.
    from hydra import compose, initialize_config_dir

    from evaluation.loading import Runtime, load_checkpoint
    from evaluation.report import report

    loaded, _ = load_checkpoint(tmp_path / "ft.ckpt", "auto")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids)[0], ours)
    with initialize_config_dir(config_dir=str(Path(__file__).parents[1] / "conf"), version_base="1.3"):
        overrides = ["data=jsonl_sft", f"data.corpus.path={data}", "data.batch_size=2", "samples=4"]
        cfg = compose("eval", overrides=overrides)
    result = report(cfg, tmp_path / "ft.ckpt", tmp_path / "report", Runtime("cpu", "fp32"), "ft")
    assert result["rows"] == 4 and result["bpb"] > 0 and len(result["importance"]) == module.model.cfg.n_layer
    assert result["cv_routed_mean"] >= 0 and len(result["ablation"]["k"]) == module.model.cfg.n_head + 1
