"""The LightningModule: LM loss + head-balancing aux loss, AdamW with warmup and decay, BPB metric; and the interface
the callbacks read it through (HeadBalancedModule)."""

import math
from typing import Any, Protocol

import lightning as L
import torch
from torchmetrics import MeanMetric

from model.balance import aux_loss, importance
from model.config import AuxConfig, OptimConfig
from model.fp8 import check_device as check_fp8_device
from model.fp8 import convert as convert_to_fp8
from model.fp8 import fsdp_float8_all_gather, precompute_fsdp_scales
from model.gpt import GPT, GPTConfig
from model.metrics import BitsPerByte, token_nll


class GatedLM(Protocol):
    """The model contract: model.gpt.GPT and model.hf.HFGatedLM both fit it."""

    cfg: Any  # n_layer, n_head (and seq_len for our GPT)

    def __call__(self, idx: torch.Tensor, head_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """idx (B, T) -> logits (B, T, V) and gates (L, B, H, T); head_mask (L, H) scales each head's output."""

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token at this context length (MFU)."""


class HeadBalancedModule(Protocol):
    """What the callbacks read from the LightningModule; SinkAwareLM fits it. A callback annotates its pl_module
    with it, so a module that trains another way only has to give these."""

    model: GatedLM
    aux_config: AuxConfig
    shared_heads: torch.Tensor  # (L, H) bool, a buffer: the heads exempt from balancing (Eq. 8)
    last_importance: torch.Tensor | None  # (L, H) importance of the latest training batch, detached, on the device

    def __call__(self, idx: torch.Tensor, head_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's forward: logits and gates."""


def lr_lambda(warmup_steps: int, total_steps: int, decay: str, min_lr_ratio: float):
    """Linear warmup, then cosine / linear decay to min_lr_ratio of the peak at total_steps."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        shape = {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress, "none": 1.0}[decay]
        return min_lr_ratio + (1 - min_lr_ratio) * shape

    return factor


def build_model(model: dict) -> torch.nn.Module:
    """Our GPT, or a Hugging Face model from a local directory when the config names one (model=hf)."""
    if "hf_path" in model:
        from model.hf import load_hf_model  # transformers takes seconds to import: only when used

        return load_hf_model(**model)
    return GPT(GPTConfig(**model))


class SinkAwareLM(L.LightningModule):
    """model / optim / aux are plain dicts (not DictConfig) so checkpoints load with weights_only=True; optim and aux
    are checked here, once, into aux_config and optim_config (model/config.py), which the code reads."""

    def __init__(self, model: dict, optim: dict, aux: dict, compile: bool | str = False):
        super().__init__()
        self.save_hyperparameters()
        self.aux_config, self.optim_config = AuxConfig.from_dict(aux), OptimConfig.from_dict(optim)
        self.model = build_model(model)
        if compile not in (False, True, "blocks") or (compile == "blocks" and not hasattr(self.model, "blocks")):
            raise ValueError(
                f"compile={compile!r}: use true (the whole model as one graph), blocks (each block of model/gpt.py "
                "as its own graph, compiled once for all layers) or false"
            )
        cfg = self.model.cfg
        m = self.aux_config.shared_heads
        if m and m > cfg.n_head - 2:  # m = 0 (pretraining) fits any model
            raise ValueError(
                f"aux.shared_heads={m}: must be between 0 and {cfg.n_head - 2} (the model has {cfg.n_head} heads per "
                "layer, and at least two routed heads are needed for a CV)"
            )
        # Heads exempt from balancing (Eq. 8); all False in pretraining. A buffer, so it is checkpointed.
        self.register_buffer("shared_heads", torch.zeros(cfg.n_layer, cfg.n_head, dtype=torch.bool))
        self.train_bpb, self.val_bpb = BitsPerByte(), BitsPerByte()
        self.val_loss = MeanMetric()  # over all validation tokens
        self.last_importance = None  # (L, H) of the latest training batch, detached; read by callbacks
        self.token_nll = token_nll
        self.fp8_layers: list[str] = []  # model.fp8: the names of the layers configure_model converted
        self.fp8_fsdp_scales = False  # set by configure_model

    def configure_model(self):
        fp8 = getattr(self.model.cfg, "fp8", None)  # model.fp8 (our GPT; a Hugging Face model has none)
        if fp8 and not self.fp8_layers:  # once: Lightning calls this hook again in each stage
            check_fp8_device(fp8, self.target_device())  # before torchao is imported: a CPU run needs none
            # before fully_shard and compile, as torchao and Lightning's float8 example do
            self.fp8_layers = convert_to_fp8(self.model, fp8, fsdp=self.device_mesh is not None)
        # FSDP2 all-gathering float8 weights (tensorwise): their scales in one all-reduce after each optimizer step
        self.fp8_fsdp_scales = self.device_mesh is not None and fsdp_float8_all_gather(self.model)
        if self.device_mesh is not None:  # trainer=fsdp (ModelParallelStrategy): FSDP2, one unit per block
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for block in self.model.blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(self.model, mesh=mesh)
        # in place: state_dict keys stay free of "_orig_mod."
        if self.hparams.compile == "blocks":  # one graph that every layer reuses: compile time independent of depth
            for block in self.model.blocks:
                block.compile()
        elif self.hparams.compile:  # one graph of the whole model: its compile time grows with the layers
            self.model.compile()
        if self.hparams.compile:
            self.token_nll = torch.compile(token_nll)

    def target_device(self) -> torch.device:
        """The device training runs on; in configure_model the module may still be on the CPU under Lightning."""
        return self.device if self._trainer is None else self.trainer.strategy.root_device

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        if self.fp8_fsdp_scales:
            precompute_fsdp_scales(self.model)

    def forward(self, idx, head_mask=None):
        return self.model(idx, head_mask)

    def step(self, batch):
        """LM loss, aux loss, per-token NLL and importance for one batch of packed rows."""
        logits, gates = self.model(batch["input_ids"])
        nll = self.token_nll(logits, batch["targets"])
        imp = importance(gates)
        if self.aux_config.scope == "global":
            imp = self.all_ranks_mean(imp)
        shared = self.shared_heads if self.aux_config.shared_heads else None
        aux = aux_loss(imp, self.aux_config.weight, shared)
        return nll, imp, aux

    def all_ranks_mean(self, x):
        """Mean over DDP ranks that keeps the gradient (a few hundred floats per step)."""
        if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
            return x
        from torch.distributed.nn.functional import all_reduce

        return all_reduce(x) / torch.distributed.get_world_size()

    def training_step(self, batch, batch_idx):
        nll, imp, aux = self.step(batch)
        lm_loss = nll.mean()
        self.last_importance = imp.detach()
        self.train_bpb(nll.detach(), batch["target_bytes"])
        # Not prog_bar=True: Lightning reads every progress-bar value back from the device at every step, a host sync
        # that leaves the GPU idle while the next step is launched. callbacks/progress.py reads them at logging steps.
        self.log_dict({"train/loss": lm_loss, "train/aux_loss": aux})
        self.log("train/bpb", self.train_bpb, on_step=True, on_epoch=False)
        return lm_loss + aux if self.aux_config.weight > 0 else lm_loss

    def validation_step(self, batch, batch_idx):
        """The LM loss only, with no collective of its own: the metrics are reduced over the ranks once, at the
        end of validation. (The aux loss, with aux.scope=global, would all-reduce importance on every batch.)"""
        logits, _ = self.model(batch["input_ids"])
        nll = self.token_nll(logits, batch["targets"])
        self.val_loss.update(nll)
        self.val_bpb.update(nll, batch["target_bytes"])
        self.log("val/loss", self.val_loss)
        self.log("val/bpb", self.val_bpb)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Clip by global norm ourselves: Lightning's AMP plugin refuses to clip for fused AdamW (a rule
        made for fp16 loss scaling). bf16 and fp32 have no scaler, so the gradients are the true ones."""
        if not gradient_clip_val:
            return
        if str(self.trainer.precision).startswith("16"):
            raise ValueError(f"trainer.precision={self.trainer.precision} is not supported: use bf16-mixed or 32-true")
        torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Weight decay on the hidden matrices only; not on embeddings, sink logits or norms."""
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:  # frozen, e.g. the base weights under LoRA
                continue
            (decay if p.dim() >= 2 and name != "wte.weight" else no_decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def configure_optimizers(self):
        opt = self.optim_config
        optimizer = torch.optim.AdamW(
            self.param_groups(opt.weight_decay),
            lr=opt.lr,
            betas=opt.betas,
            eps=opt.eps,
            fused=self.device.type == "cuda",
        )
        total = self.trainer.max_steps
        if total is None or total <= 0:
            raise ValueError("trainer.max_steps must be set (> 0): the learning-rate schedule is defined over it")
        schedule = lr_lambda(opt.warmup_steps, total, opt.decay, opt.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
