"""Eq. 8 fine-tuning: weights from init_from, the shared set = the top-m of the calibration pass (kept on
resume), an aux loss blind to shared heads, m = 0 = the pretraining loss, `mode=finetune` from the CLI."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import quiet_trainer

from callbacks.calibration import Calibration, load_weights
from data.corpus import Corpus
from data.datamodule import TextDataModule
from data.offline import build_offline_corpus
from data.tokenizer import ByteTokenizer
from model.attention import VARIANTS
from model.balance import aux_loss, importance, top_heads
from model.lit import SinkAwareLM

ROOT = Path(__file__).parents[1]
CACHE = ROOT / ".cache"
OPTIM = dict(lr=1e-3, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.0, warmup_steps=1, decay="none", min_lr_ratio=1.0)


def tiny_module(seed: int, attention: str = "vanilla", shared_heads: int = 2, weight: float = 1e-2) -> SinkAwareLM:
    torch.manual_seed(seed)
    model = dict(vocab_size=320, n_layer=2, n_embd=64, n_head=4, seq_len=32, attention=attention, backend="reference")
    aux = {"lambda": weight, "shared_heads": shared_heads, "scope": "local"}
    module = SinkAwareLM(model=model, optim=OPTIM, aux=aux)
    with torch.no_grad():  # the zero-init output projections make every head alike: give them a real spread
        for p in module.model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return module


@pytest.fixture(scope="module")
def datamodule():
    corpus = Corpus(build_offline_corpus(str(CACHE)), val_permille=50)
    return TextDataModule(corpus, ByteTokenizer(), seq_len=32, batch_size=2)


def fit(module, datamodule, callback, steps: int, ckpt_path=None, root=None):
    trainer = quiet_trainer(
        max_steps=steps,
        enable_checkpointing=False,
        limit_val_batches=0,
        callbacks=[callback],
        default_root_dir=root,
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return trainer


@torch.no_grad()
def calibration_importance(module, datamodule, batches: int) -> torch.Tensor:
    loader = iter(datamodule.loader("train"))
    return torch.stack([importance(module(next(loader)["input_ids"])[1]) for _ in range(batches)]).mean(0)


def save_trained(module: SinkAwareLM, path) -> None:
    """A checkpoint with the keys of one train.py writes (weights, optimizer, loops, step), from a module's weights."""
    torch.save({"state_dict": module.state_dict(), "optimizer_states": [], "loops": {}, "global_step": 0}, path)


def test_shared_set_is_top_m_of_calibration_and_kept_on_resume(tmp_path, datamodule):
    trained = tiny_module(seed=1)
    init = tmp_path / "init.ckpt"
    save_trained(trained, init)
    expected = top_heads(calibration_importance(trained, datamodule, batches=3), 2)
    fresh = tiny_module(seed=2)  # other weights: its own top heads differ, so loading init_from matters
    assert not torch.equal(top_heads(calibration_importance(fresh, datamodule, batches=3), 2), expected)

    trainer = fit(fresh, datamodule, Calibration(str(init), batches=3), steps=1)
    assert torch.equal(fresh.shared_heads, expected)
    assert (fresh.shared_heads.sum(-1) == 2).all()

    # Resume: the checkpoint's set stays (here made different from what a new calibration would pick).
    ckpt = tmp_path / "step1.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)
    saved["state_dict"]["shared_heads"] = ~expected
    torch.save(saved, ckpt)
    resumed = tiny_module(seed=3)
    fit(resumed, datamodule, Calibration(str(init), batches=3), steps=2, ckpt_path=ckpt)
    assert torch.equal(resumed.shared_heads, ~expected)


@pytest.mark.parametrize("attention", [name for name, variant in VARIANTS.items() if variant.parameters])
def test_aux_loss_gives_shared_heads_no_gradient(attention):
    """From the aux loss alone, a shared head's gate gets exactly 0 gradient in every layer, and so do its gate
    parameters (gate_proj row / sink logit) in the last layer. (In earlier layers they still reach the routed
    gates of later layers through the residual stream, as they should.)"""
    module = tiny_module(seed=4, attention=attention)
    idx = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    _, gates = module(idx)
    gates.retain_grad()
    imp = importance(gates)
    shared = top_heads(imp.detach(), 2)
    aux_loss(imp, 1.0, shared).backward()
    per_head = gates.grad.abs().sum(dim=(1, 3))  # (L, H)
    assert (per_head[shared] == 0).all() and (per_head[~shared] > 0).all()
    attn = module.model.blocks[-1].attn
    own = [p for name, p in attn.named_parameters() if name.split(".")[0] in VARIANTS[attention].parameters]
    grad = sum(p.grad.abs().reshape(attn.cfg.n_head, -1).sum(-1) for p in own)  # per head (its row / its logit)
    assert (grad[shared[-1]] == 0).all() and (grad[~shared[-1]] > 0).all()


def test_zero_shared_heads_is_the_pretraining_loss(datamodule):
    batch = next(iter(datamodule.loader("train")))
    pretrain = tiny_module(seed=5, shared_heads=0)
    finetune = tiny_module(seed=5, shared_heads=0)
    nll, imp, aux = pretrain.step(batch)
    finetune.shared_heads.copy_(top_heads(imp, 0))  # what calibration sets for m = 0
    nll_ft, _, aux_ft = finetune.step(batch)
    assert aux > 0
    assert torch.equal(nll_ft, nll) and torch.equal(aux_ft, aux)
    assert torch.equal(aux_loss(imp, 1e-2, top_heads(imp, 0)), aux_loss(imp, 1e-2))
    assert not torch.allclose(aux_loss(imp, 1e-2, top_heads(imp, 1)), aux)  # m > 0 is a different loss


def test_init_from_errors_name_the_key_and_the_fix(tmp_path):
    module = tiny_module(seed=6)
    with pytest.raises(FileNotFoundError, match="init_from=.*no such checkpoint"):
        load_weights(module, str(tmp_path / "missing.ckpt"))
    other = tmp_path / "other.ckpt"
    save_trained(tiny_module(seed=6, attention="gated"), other)
    with pytest.raises(ValueError, match="use the model= and attention= of the run"):
        load_weights(module, str(other))
    with pytest.raises(ValueError, match=r"aux.shared_heads=3: must be between 0 and 2"):
        tiny_module(seed=6, shared_heads=3)


@pytest.mark.slow
def test_finetune_command_as_typed(tmp_path):
    """`python train.py mode=finetune init_from=CKPT aux.lambda=1e-2 aux.shared_heads=2` (+ a tiny shape)."""
    torch.manual_seed(7)
    model = dict(vocab_size=320, n_layer=2, n_embd=64, n_head=8, seq_len=32, attention="vanilla", backend="auto")
    init = tmp_path / "pretrained.ckpt"
    aux = {"lambda": 0.0, "shared_heads": 0, "scope": "global"}
    save_trained(SinkAwareLM(model=model, optim=OPTIM, aux=aux), init)
    shape = ["model.n_layer=2", "model.n_embd=64", "model.n_head=8", "model.seq_len=32", "data.batch_size=2"]
    run = ["trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "logger=csv"]
    cmd = [sys.executable, "train.py", "mode=finetune", f"init_from={init}", "aux.lambda=1e-2", "aux.shared_heads=2"]
    cmd += [*shape, *run, "callbacks.calibration.batches=2", f"hydra.run.dir={tmp_path / 'run'}"]
    env = {**os.environ, "SINKAWARE_CACHE_DIR": str(CACHE), "WANDB_MODE": "disabled"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fine-tuning from the weights of" in result.stdout + result.stderr
    hparams = yaml.safe_load(next((tmp_path / "run").rglob("hparams.yaml")).read_text())
    shared = hparams["calibration/shared_heads"]
    assert sorted(shared) == ["L00", "L01"] and all(len(heads) == 2 for heads in shared.values())
    assert "heads/cv_routed_mean" in next((tmp_path / "run").rglob("metrics.csv")).read_text()
