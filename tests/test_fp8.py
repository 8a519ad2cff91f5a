"""model.fp8 (model/fp8.py): the option composes, torchao's conversion swaps exactly the block Linears (not lm_head,
not the gate projection), the converted model trains (torchao's emulated float8 on the CPU), and where float8 cannot
run (the CPU, an older GPU, no torchao) the error is one line that names the fix."""

import copy
import csv
import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from model import fp8
from model.gpt import GPT, GPTConfig
from model.lit import SinkAwareLM

ROOT = Path(__file__).parents[1]
torchao = pytest.importorskip("torchao", reason="model.fp8 needs torchao: pip install -e '.[fp8]'")
from torchao.float8 import convert_to_float8_training  # noqa: E402
from torchao.float8.float8_linear import Float8Linear  # noqa: E402

# Every dimension a multiple of 16, the gate projection (C -> H = 16) and lm_head (V = 256) included: only their names
# keep them out.
TINY16 = {"vocab_size": 256, "n_layer": 2, "n_embd": 64, "n_head": 16, "seq_len": 32, "attention": "gated"}
BLOCK_LINEARS = ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def expected_layers(n_layer: int) -> list[str]:
    return sorted(f"blocks.{i}.{name}" for i in range(n_layer) for name in BLOCK_LINEARS)


def composed_model(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    return OmegaConf.to_container(cfg.model, resolve=True)


@pytest.mark.parametrize(
    "overrides, recipe",
    [
        ([], None),
        (["model.fp8=tensorwise"], "tensorwise"),
        (["model=0.6b", "trainer=gpu", "compile=true", "model.fp8=rowwise"], "rowwise"),
        (["experiment=study/gated", "model.fp8=tensorwise"], "tensorwise"),
        (["experiment=study/vanilla", "model.fp8=rowwise"], "rowwise"),
    ],
)
def test_the_option_composes_and_reaches_the_model_config(overrides, recipe):
    model = composed_model(*overrides)
    assert model["fp8"] == recipe
    assert GPTConfig(**{**model, "vocab_size": 32768}).fp8 == recipe


def test_the_study_model_converts_every_block_linear():
    """experiment=study/*: 512 wide, MLP 2048, 8 heads, vocab 32768 (the corpus' BPE): every block Linear has both
    dimensions multiples of 16, so all of them are converted."""
    model = composed_model("experiment=study/gated", "model.fp8=tensorwise")
    gpt = GPT(GPTConfig(**{**model, "vocab_size": 32768}))
    assert fp8.convert(gpt, "tensorwise") == expected_layers(model["n_layer"])


@pytest.mark.parametrize("recipe", fp8.RECIPES)
def test_conversion_swaps_the_block_linears_only(recipe):
    gpt = GPT(GPTConfig(**TINY16, fp8=recipe))
    before = {k: v.clone() for k, v in gpt.state_dict().items()}
    converted = fp8.convert(gpt, recipe)

    assert converted == expected_layers(TINY16["n_layer"])
    assert sorted(name for name, m in gpt.named_modules() if isinstance(m, Float8Linear)) == converted
    assert type(gpt.lm_head) is nn.Linear
    assert all(type(block.attn.gate_proj) is nn.Linear for block in gpt.blocks)
    # The same state_dict keys and tensors: checkpoints move between fp8 and bf16 runs, eval.py needs no torchao.
    after = gpt.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert fp8.convert(gpt, recipe) == []  # converting again changes nothing


def test_the_filter_keeps_out_dimensions_that_are_not_multiples_of_16():
    assert fp8.converts(nn.Linear(64, 128), "blocks.0.mlp.c_fc")
    assert not fp8.converts(nn.Linear(64, 10), "blocks.0.mlp.c_fc")  # e.g. the 0.6b gate projection, C -> 10 heads
    assert not fp8.converts(nn.Linear(24, 64), "blocks.0.attn.c_q")
    assert not fp8.converts(nn.Linear(64, 64), "lm_head")
    assert not fp8.converts(nn.Linear(64, 16), "blocks.3.attn.gate_proj")
    assert not fp8.converts(nn.Embedding(64, 64), "wte")


def test_fsdp_all_gathers_tensorwise_weights_in_float8_only():
    assert fp8.fp8_config("tensorwise", fsdp=True).enable_fsdp_float8_all_gather
    assert not fp8.fp8_config("tensorwise").enable_fsdp_float8_all_gather
    assert not fp8.fp8_config("rowwise", fsdp=True).enable_fsdp_float8_all_gather  # torchao: tensorwise only
    gpt = GPT(GPTConfig(**TINY16))
    fp8.convert(gpt, "tensorwise", fsdp=True)
    assert fp8.fsdp_float8_all_gather(gpt)


@pytest.mark.parametrize("recipe", fp8.RECIPES)
def test_the_converted_model_trains_in_emulated_float8(recipe):
    """The same conversion with torchao's emulation (float8 casts and scales, matmuls in fp32) on the CPU: the loss
    is the bf16-free model's within float8 rounding, and every parameter, the gate's included, gets a gradient."""
    torch.manual_seed(0)
    reference = GPT(GPTConfig(**TINY16))
    for block in reference.blocks:  # away from the zero init, so every gradient is non-zero
        for lin in (block.attn.c_proj, block.mlp.c_proj, block.attn.gate_proj):
            nn.init.normal_(lin.weight, std=0.05)
    model = copy.deepcopy(reference)
    config = dataclasses.replace(fp8.fp8_config(recipe), emulate=True)
    convert_to_float8_training(model, config=config, module_filter_fn=fp8.converts)
    idx = torch.randint(0, TINY16["vocab_size"], (2, TINY16["seq_len"]))
    losses = []
    for gpt in (reference, model):
        logits, gates = gpt(idx)
        loss = F.cross_entropy(logits.flatten(0, 1), idx.flatten()) + gates.var()
        loss.backward()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-2)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def lit_module(**model) -> SinkAwareLM:
    optim = {
        "lr": 1e-3,
        "betas": [0.9, 0.95],
        "eps": 1e-8,
        "weight_decay": 0.0,
        "decay": "none",
        "warmup_steps": 0,
        "min_lr_ratio": 1.0,
    }
    return SinkAwareLM(model={**TINY16, **model}, optim=optim, aux={"lambda": 1e-4, "scope": "local"})


def test_configure_model_refuses_the_cpu_in_one_line():
    module = lit_module(fp8="tensorwise")
    with pytest.raises(ValueError, match=r"model\.fp8=tensorwise needs a CUDA GPU .* set model\.fp8=null") as err:
        module.configure_model()
    assert "\n" not in str(err.value)
    assert not any(isinstance(m, Float8Linear) for m in module.modules())


def test_configure_model_leaves_bf16_models_alone():
    module = lit_module()
    module.configure_model()
    assert module.fp8_layers == [] and not any(isinstance(m, Float8Linear) for m in module.modules())


def test_a_gpu_without_float8_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ValueError, match=r"A100-SXM4-80GB has 8\.0: set model\.fp8=null") as err:
        fp8.check_device("rowwise", torch.device("cuda", 0))
    assert "\n" not in str(err.value)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    fp8.check_device("rowwise", torch.device("cuda", 0))  # Hopper: fine


def test_missing_torchao_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao.float8", None)  # `import torchao.float8` now raises ImportError
    with pytest.raises(ValueError, match=r"model\.fp8 needs torchao.*: pip install -e '\.\[fp8\]'$") as err:
        fp8.convert(GPT(GPTConfig(**TINY16)), "tensorwise")
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_train_py_with_fp8_on_the_cpu_fails_with_one_line(start_train, tmp_path):
    """A real `python train.py model.fp8=tensorwise` on the CPU: exit status 1, one error line (Hydra's log, on stdout)
    naming the fix, no traceback. (stderr carries Lightning's own start-up lines, not the error.)"""
    process = start_train("logger=csv", f"hydra.run.dir={tmp_path}", "model.fp8=tensorwise")
    assert process.wait(timeout=300) == 1, process.read_output()[-3000:]
    output = process.read_output()
    errors = [line for line in output.splitlines() if "ERROR" in line]
    assert len(errors) == 1, output[-3000:]
    assert "model.fp8=tensorwise needs a CUDA GPU" in errors[0] and "set model.fp8=null" in errors[0]
    assert "Traceback" not in output and "torchao" not in output  # refused before torchao is imported


@pytest.mark.slow
def test_the_benchmark_gives_a_row_per_recipe_even_when_one_cannot_run(tmp_path):
    """bench/throughput.py --fp8 --timeout --out on the CPU: bf16 is measured, the float8 row fails in its own process
    with the one-line reason, and both rows are in the CSV."""
    tiny = ["--model", "tiny", "--set", "n_layer=2", "n_embd=64", "seq_len=64", "--vocab", "256", "--batch-size", "2"]
    command = [sys.executable, str(ROOT / "bench" / "throughput.py"), "--accelerator", "cpu", "--loops", "lightning"]
    command += ["--no-compile", *tiny, "--warmup", "1", "--steps", "2", "--attention", "gated", "--aux", "1e-4"]
    command += ["--fp8", "tensorwise", "--timeout", "240", "--out", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    with open(tmp_path / "throughput.csv") as file:
        rows = list(csv.DictReader(file))
    assert [(r["fp8"], r["status"][:6]) for r in rows] == [("bf16", "ok"), ("tensorwise", "failed")]
    assert float(rows[0]["tokens_per_s"]) > 0 and float(rows[0]["compile_s"]) > 0
    assert "set model.fp8=null" in rows[1]["status"]
    assert "| tiny | gated | 0.0001 | lightning | tensorwise | failed (ValueError: model.fp8=tensorwise" in done.stdout
    bf16_log = tmp_path / "logs" / "tiny_gated_aux0.0001_lightning_bf16.log"
    assert "first step (compilation included):" in bf16_log.read_text()


@pytest.mark.slow
def test_a_configuration_ended_by_the_timeout_says_whether_it_was_still_compiling(tmp_path):
    """--timeout 1 ends the process before its first step (importing alone takes longer): the row says so."""
    command = [sys.executable, str(ROOT / "bench" / "throughput.py"), "--accelerator", "cpu", "--loops", "lightning"]
    command += ["--no-compile", "--model", "tiny", "--attention", "vanilla", "--aux", "0", "--timeout", "1"]
    command += ["--out", str(tmp_path)]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    with open(tmp_path / "throughput.csv") as file:
        (row,) = csv.DictReader(file)
    assert row["status"] == "timeout after 1 s, before its first step ended (compiling)"


FP8_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= fp8.MIN_CAPABILITY


@pytest.mark.gpu
@pytest.mark.skipif(not FP8_GPU, reason="needs a CUDA GPU with float8 (compute capability >= 8.9)")
@pytest.mark.parametrize("recipe", fp8.RECIPES)
def test_float8_trains_compiled_on_the_gpu(recipe):
    """As bench/throughput.py's plain loop: configure_model converts, then compiles; a few AdamW steps in bf16 autocast
    on one repeated batch. The first loss is bf16's within float8 rounding, and the loss falls."""
    shape = {"vocab_size": 512, "n_layer": 2, "n_embd": 256, "n_head": 2, "seq_len": 256, "attention": "gated"}
    idx = torch.randint(0, 512, (4, 257), generator=torch.Generator().manual_seed(0)).cuda()
    batch = {"input_ids": idx[:, :-1], "targets": idx[:, 1:]}
    losses = {}
    for mode in ("bf16", recipe):
        torch.manual_seed(0)
        module = lit_module(**shape, fp8=None if mode == "bf16" else recipe).cuda()
        module.hparams.compile = True
        module.configure_model()
        assert module.fp8_layers == ([] if mode == "bf16" else expected_layers(2))
        optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
        losses[mode] = []
        for _ in range(5):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                nll, _, aux = module.step(batch)
                loss = nll.mean() + aux
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses[mode].append(loss.item())
        torch._dynamo.reset()
    assert losses[recipe][0] == pytest.approx(losses["bf16"][0], rel=2e-2)
    assert all(math.isfinite(x) for x in losses[recipe]) and losses[recipe][-1] < losses[recipe][0]
