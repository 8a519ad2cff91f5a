"""What a run records: W&B offline (read back from its .wandb file), CSV and TensorBoard carry the head-balance
scalars, BPB, losses, lr and throughput with the values of a known model state; heatmaps land where the
collapsed head is; the configs instantiate."""

import json
import logging
import math
import re
import struct
import sys
import time
import types
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import csv_metrics, csv_rows, quiet_trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from PIL import Image

from callbacks.head_balance import HeadBalanceMonitor, heatmap_figure
from callbacks.progress import ProgressBar
from callbacks.speed import SpeedMonitor
from callbacks.wandb_finish import WandbFinish
from model.balance import coefficient_of_variation, importance
from model.lit import SinkAwareLM

ROOT = Path(__file__).parents[1]
N_HEAD, STEPS = 4, 4
FROZEN = {"lr": 0.0, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1, "warmup_steps": 1}  # lr 0: fixed state


def tiny_module(attention: str) -> SinkAwareLM:
    torch.manual_seed(0)
    model = dict(vocab_size=64, n_layer=2, n_embd=64, n_head=N_HEAD, seq_len=16, attention=attention)
    optim = {**FROZEN, "decay": "none", "min_lr_ratio": 1.0}
    return SinkAwareLM(model={**model, "backend": "reference"}, optim=optim, aux={"lambda": 0.0, "scope": "local"})


def fixed_batches(n: int = STEPS) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(1, 64, (n, 2, 17), generator=g)
    rows[:, :, 0] = 0  # BOS: position 0 is the sink
    target_bytes = torch.randint(0, 3, (n, 2, 16), generator=g)  # some tokens carry no bytes
    return [
        {"input_ids": r[:, :-1], "targets": r[:, 1:], "target_bytes": b}
        for r, b in zip(rows, target_bytes, strict=True)
    ]


def fit(module, tmp_path, logger, callbacks, log_every=2, steps=STEPS, validate=True, ckpt_path=None):
    batches = fixed_batches(steps)
    trainer = quiet_trainer(
        max_steps=steps,
        log_every_n_steps=log_every,
        logger=logger,
        callbacks=callbacks,
        limit_val_batches=2 if validate else 0,
        num_sanity_val_steps=0,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=any(isinstance(c, ProgressBar) for c in callbacks),
        default_root_dir=tmp_path,
    )
    loader = torch.utils.data.DataLoader(batches, batch_size=None)  # the batches as they are, in order
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader, ckpt_path=ckpt_path)
    return trainer, batches


@torch.no_grad()
def expected_importance(module, batches) -> torch.Tensor:
    return torch.stack([importance(module.model(b["input_ids"])[1]) for b in batches]).mean(0).double()


@torch.no_grad()
def expected_bpb(module, batch) -> float:
    logits, _ = module.model(batch["input_ids"])
    nll = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), reduction="none")
    counted = batch["target_bytes"].flatten() > 0
    return (nll[counted].sum() / (math.log(2) * batch["target_bytes"].sum())).item()


def head_keys(imp: torch.Tensor) -> dict[str, float]:
    cv = coefficient_of_variation(imp)
    keys = {f"heads/cv/L{layer:02d}": cv[layer].item() for layer in range(imp.size(0))}
    keys["heads/cv_mean"] = cv.mean().item()
    for layer, head in np.ndindex(*imp.shape):
        keys[f"heads/importance/L{layer:02d}/H{head:02d}"] = imp[layer, head].item()
    return keys


# ---------------------------------------------------------------------------------------------------------
# Reading an offline W&B run: the .wandb file is a LevelDB-style log (32 KiB blocks, each record a 7-byte
# header: crc32 (4), length (2), type (1)) of wandb_internal_pb2.Record protobufs. wandb 0.31 ships no
# Python reader for it (the Go core writes it), so this is the format spelled out.


def wandb_records(path: Path):
    from wandb.proto import wandb_internal_pb2

    data, block, header = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, pending = header, b""
    while pos + header <= len(data):
        if block - pos % block < header:  # block trailer too small for a header: zero padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack_from("<IHB", data, pos)
        if kind == 0 or pos + header + length > len(data):  # the end, or a record still being written
            break
        pending = (b"" if kind in (1, 2) else pending) + data[pos + header : pos + header + length]  # FULL/FIRST
        pos += header + length
        if kind in (1, 4):  # FULL / LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def wandb_history(run_dir: Path, timeout: float = 60) -> list[dict]:
    """The run's history rows, once its log ends with the exit record: W&B's service process may still be flushing
    the file when run.finish() has returned (a read at that moment found no row of step 2, now and then)."""
    (log,) = run_dir.glob("run-*.wandb")
    deadline = time.monotonic() + timeout
    while not ((records := list(wandb_records(log))) and records[-1].WhichOneof("record_type") == "exit"):
        assert time.monotonic() < deadline, f"{log} has no exit record after {timeout} s"
        time.sleep(0.5)
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = record.history.item
            rows.append({("/".join(i.nested_key) or i.key): json.loads(i.value_json) for i in items})
    return rows


def row_at(rows: list[dict], step: int, key: str) -> dict:
    matches = [r for r in rows if r.get("trainer/global_step") == step and key in r]
    assert len(matches) == 1, f"{key} at step {step}: {len(matches)} rows"
    return matches[0]


def test_wandb_offline_run_reads_back_with_the_values_of_the_model(tmp_path, monkeypatch, caplog):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")  # WandbLogger(offline=True) sets it; restored after the test
    monkeypatch.setenv("WANDB_SILENT", "true")
    module = tiny_module("sink")
    with torch.no_grad():
        for block in module.model.blocks:
            block.attn.sink_logit.normal_(0.0, 2.0)  # heads of unequal importance
    logger = WandbLogger(project="test", save_dir=str(tmp_path), offline=True)
    callbacks = [HeadBalanceMonitor(heatmap_every_n_steps=2), SpeedMonitor(warmup_steps=1), LearningRateMonitor()]
    with caplog.at_level("INFO", logger="callbacks.wandb_finish"):
        trainer, batches = fit(module, tmp_path, logger, [*callbacks, WandbFinish()])
    assert wandb.run is None  # finished: the next Hydra multirun job gets a run of its own
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    assert f"wandb sync {run_dir}" in caplog.text
    rows = wandb_history(run_dir)

    # each interval's mean, on the model's batches, in Lightning's row of its last step (global_step - 1)
    for step, interval in ((2, batches[:2]), (4, batches[2:])):
        row = row_at(rows, step - 1, "heads/cv_mean")
        for key, value in head_keys(expected_importance(module, interval)).items():
            assert row[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
        heatmap = row_at(rows, step - 1, "heads/heatmap/_type")
        assert heatmap["heads/heatmap/_type"] == "images/separated"
        assert (run_dir / "files" / heatmap["heads/heatmap/filenames"][0]).is_file()
        assert (tmp_path / "heads" / f"importance_step_{step:06d}.png").is_file()
    assert row_at(rows, 3, "heads/cv_curve/_type")["heads/cv_curve/count"] == 1
    assert row_at(rows, 1, "heads/cv_mean")["heads/cv_mean"] > 0.05  # the check above compared real spread

    # Lightning's own rows: step = index of the batch (global_step - 1).
    train_row = row_at(rows, 1, "train/bpb")
    assert train_row["train/bpb"] == pytest.approx(expected_bpb(module, batches[1]), rel=1e-5)
    assert {"train/loss", "train/aux_loss", "perf/tokens_per_s"} <= train_row.keys()
    assert any("lr-AdamW/pg1" in r for r in rows)
    assert any("val/bpb" in r and "val/loss" in r for r in rows)


def test_csv_carries_every_metric_and_mfu_uses_the_given_peak(tmp_path):
    module = tiny_module("vanilla")
    bar = ProgressBar()
    callbacks = [HeadBalanceMonitor(), SpeedMonitor(warmup_steps=1, peak_flops=1e12), LearningRateMonitor(), bar]
    trainer, batches = fit(module, tmp_path, CSVLogger(tmp_path, name="csv", version=""), callbacks)
    m = csv_metrics(tmp_path / "csv")
    for key in ("train/loss", "train/aux_loss", "train/bpb", "val/loss", "val/bpb", "lr-AdamW/pg1", "heads/cv/L01"):
        assert key in m, key
    heads_rows = [row["step"] for row in csv_rows(tmp_path / "csv") if row["heads/cv_mean"]]
    loss_rows = [row["step"] for row in csv_rows(tmp_path / "csv") if row["train/loss"]]
    assert heads_rows == ["1", "3"] and set(heads_rows) <= set(loss_rows)  # steps 2 and 4, beside their losses
    assert m["heads/importance/L01/H03"][-1] == pytest.approx(expected_importance(module, batches[2:])[1, 3].item())
    flops = module.model.flops_per_token(16)
    assert np.allclose(np.array(m["perf/mfu"]) / np.array(m["perf/tokens_per_s"]), flops / 1e12)
    assert list(bar.get_metrics(trainer, module)) == ["loss", "bpb", "val_bpb", "tok/s"]  # short, in order
    assert (tmp_path / "heads" / "importance_step_000004.png").is_file()  # at the end
    assert (tmp_path / "heads" / "cv_curve.png").is_file()


def test_by_default_a_heatmap_is_drawn_with_each_validation_also_under_gradient_accumulation(tmp_path):
    """Validation every 4 micro-batches = every 2 optimizer steps with 2 micro-batches per step: heatmaps of steps
    2, 4 and 6 (a cadence taken as 4 optimizer steps would draw those of steps 4 and 6 only)."""
    batches = fixed_batches(12)
    trainer = quiet_trainer(
        max_steps=6, accumulate_grad_batches=2, val_check_interval=4, limit_val_batches=1, log_every_n_steps=1,
        num_sanity_val_steps=0, default_root_dir=tmp_path, callbacks=[HeadBalanceMonitor(heatmap_every_n_steps=None)],
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    trainer.fit(tiny_module("gated"), train_dataloaders=loader, val_dataloaders=loader)
    drawn = sorted(path.name for path in (tmp_path / "heads").glob("importance_step_*.png"))
    assert drawn == [f"importance_step_{step:06d}.png" for step in (2, 4, 6)]


def test_the_slowest_steps_are_named_and_the_step_after_a_validation_is_not_timed(tmp_path, caplog, monkeypatch):
    """A stall of 100 s before step 6's end makes step 6 the slowest; the validation after step 4 (1000 s) is left
    out: step 5 is not timed at all. Step 1 (the warm-up's end) starts the timing. The stalls move the monitor's clock
    instead of sleeping: a loaded machine's slow step (0.7 s seen on a 2-core CI runner) is far below them."""
    stalled = {"seconds": 0.0}
    clock = types.SimpleNamespace(perf_counter=lambda: time.perf_counter() + stalled["seconds"])
    monkeypatch.setattr("callbacks.speed.time", clock)

    class Stalls(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 6:
                stalled["seconds"] += 100

        def on_validation_end(self, trainer, *args):
            stalled["seconds"] += 1000

    caplog.set_level(logging.INFO, logger="callbacks.speed")
    batches = fixed_batches(8)
    trainer = quiet_trainer(
        max_steps=8, val_check_interval=4, limit_val_batches=1, num_sanity_val_steps=0, default_root_dir=tmp_path,
        callbacks=[Stalls(), SpeedMonitor(warmup_steps=1, slowest_steps=10)],
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    trainer.fit(tiny_module("gated"), train_dataloaders=loader, val_dataloaders=loader)
    line = re.search(r"step time: median ([\d.]+) ms over (\d+) steps; slowest: (.*)", caplog.text)
    timed = [(int(step), float(ms)) for step, ms in re.findall(r"(\d+) \(([\d.]+) ms\)", line[3])]
    assert int(line[2]) == 6 and sorted(step for step, _ in timed) == [2, 3, 4, 6, 7, 8]
    assert timed[0][0] == 6 and 100e3 <= timed[0][1] < 200e3  # slowest first; the validation is not in it
    assert float(line[1]) < 100e3
    whole_run = re.search(r"whole run: \d+ tokens in ([\d.]+) s of training", caplog.text)
    assert 100 <= float(whole_run[1]) < 200  # the stall is training time, the validation is not


def test_training_reads_values_back_at_logging_steps_only(tmp_path, monkeypatch):
    """On a GPU every read of a tensor's value waits for the steps queued before it, and the GPU then idles while the
    next step is launched. With the run's callbacks, steps between logging steps read nothing back. (Lightning reads
    every metric logged with prog_bar=True at every step: nothing is logged so.)"""
    now = {"step": 0}

    class StepOfBatch(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            now["step"] = trainer.global_step + 1  # the optimizer step this batch ends with

    reads = []

    def reading(read):
        def counted(tensor, *args):
            # AdamW on the CPU reads its step count, a host tensor (fused AdamW on a GPU keeps it on the device)
            if not sys._getframe(1).f_globals["__name__"].startswith("torch.optim"):
                reads.append(now["step"])
            return read(tensor, *args)

        return counted

    for name in ("item", "tolist", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, reading(getattr(torch.Tensor, name)))
    callbacks = [
        StepOfBatch(),
        HeadBalanceMonitor(),
        SpeedMonitor(warmup_steps=1),
        LearningRateMonitor(),
        ProgressBar(),
    ]
    logger = CSVLogger(tmp_path, name="csv", version="")
    fit(tiny_module("gated"), tmp_path, logger, callbacks, log_every=3, steps=9)
    assert set(reads) == {0, 3, 6, 9}, sorted(set(reads))  # 0: before the first step (setting up)


def test_tensorboard_gets_scalars_and_images(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tensorboard", version="", default_hp_metric=False)
    fit(tiny_module("vanilla"), tmp_path, logger, [HeadBalanceMonitor(heatmap_every_n_steps=2), SpeedMonitor(1)])
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0}).Reload()
    scalars, images = set(events.Tags()["scalars"]), set(events.Tags()["images"])
    assert {"train/loss", "train/bpb", "val/bpb", "heads/cv_mean", "heads/importance/L00/H00"} <= scalars
    assert {"heads/heatmap", "heads/cv_curve"} <= images
    assert [e.step for e in events.Images("heads/heatmap")] == [1, 3]  # Lightning's rows of steps 2 and 4


# ---------------------------------------------------------------------------------------------------------
# A collapsed-by-construction model: every token's normed input is sqrt(C)·e_0 (embeddings on one axis; the
# zero-initialised output projections keep the residual stream there in every layer), and gate_proj reads
# that axis with +2 for the collapsed head and -2 for the others: gates σ(±16), one head carries the mass.

COLLAPSED_HEAD = 2


def collapsed_module(collapse: bool) -> SinkAwareLM:
    module = tiny_module("gated")
    with torch.no_grad():
        module.model.wte.weight.zero_()
        module.model.wte.weight[:, 0] = 1.0
        for block in module.model.blocks:
            block.attn.gate_proj.weight.zero_()  # balanced: every gate σ(0) = 0.5
            if collapse:
                block.attn.gate_proj.weight[:, 0] = -2.0
                block.attn.gate_proj.weight[COLLAPSED_HEAD, 0] = 2.0
    return module


def cell_pixel(image: np.ndarray, imp: np.ndarray, step: int, shared, layer: float, head: float) -> np.ndarray:
    """The RGB of the rendered heatmap at data point (head, layer), located in the same figure the callback drew."""
    fig = heatmap_figure(imp, step, shared)
    fig.canvas.draw()
    x, y = fig.axes[0].transData.transform((head, layer))
    assert image.shape[:2] == (fig.canvas.get_width_height()[1], fig.canvas.get_width_height()[0])
    return image[int(round(image.shape[0] - y)), int(round(x))].astype(int)


def test_collapsed_model_has_cv_sqrt_h_minus_1_and_bright_cells_at_its_head(tmp_path):
    import matplotlib

    module = collapsed_module(collapse=True)
    module.shared_heads[1, COLLAPSED_HEAD] = True  # as fine-tuning would mark it: outlined, routed CV apart
    fit(module, tmp_path, CSVLogger(tmp_path, name="csv", version=""), [HeadBalanceMonitor()], validate=False)
    m = csv_metrics(tmp_path / "csv")
    for layer in range(2):
        assert m[f"heads/cv/L{layer:02d}"][-1] == pytest.approx(math.sqrt(N_HEAD - 1), rel=1e-5)
    assert m["heads/cv_routed/L00"][-1] == pytest.approx(math.sqrt(N_HEAD - 1), rel=1e-5)  # no shared head in L00
    assert m["heads/cv_routed/L01"][-1] == pytest.approx(0.0, abs=1e-6)  # the routed heads of L01 are all equal

    imp = np.array([[m[f"heads/importance/L{l:02d}/H{h:02d}"][-1] for h in range(N_HEAD)] for l in range(2)])
    shared = module.shared_heads.numpy()
    image = np.asarray(Image.open(tmp_path / "heads" / f"importance_step_{STEPS:06d}.png").convert("RGB"))
    bright, dark = (np.array(matplotlib.colormaps["viridis"](v)[:3]) * 255 for v in (1.0, 0.0))
    for layer, head in np.ndindex(2, N_HEAD):
        expected = bright if head == COLLAPSED_HEAD else dark
        assert np.abs(cell_pixel(image, imp, STEPS, shared, layer, head) - expected).max() <= 2, (layer, head)
    # The shared head is outlined in red: some pixel near its cell's left edge.
    edge = [cell_pixel(image, imp, STEPS, shared, 1, COLLAPSED_HEAD - 0.5 + dx) for dx in np.linspace(-0.1, 0.1, 9)]
    assert any(r > 200 and g < 80 and b < 80 for r, g, b in edge)


def test_balanced_model_has_cv_zero(tmp_path):
    fit(collapsed_module(collapse=False), tmp_path, CSVLogger(tmp_path, name="csv", version=""), [HeadBalanceMonitor()])
    m = csv_metrics(tmp_path / "csv")
    assert m["heads/cv_mean"] == pytest.approx([0.0, 0.0], abs=1e-7)
    assert m["heads/importance/L01/H03"][-1] == pytest.approx(0.5)


@pytest.mark.parametrize("logger", ["wandb", "csv", "tensorboard"])
def test_configs_instantiate_into_the_run_directory(tmp_path, logger):
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate

    overrides = [f"paths.output_dir={tmp_path}"] + ([] if logger == "wandb" else [f"logger={logger}"])
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    built = instantiate(cfg.logger)
    assert Path(built.save_dir) == tmp_path
    if logger == "wandb":  # the default: offline, nothing uploaded
        assert built._offline and not built._log_model
    callbacks = {name: instantiate(c) for name, c in cfg.callbacks.items() if c is not None}
    assert {"speed", "progress", "head_balance", "wandb_finish"} <= callbacks.keys()
    assert callbacks["head_balance"].dirpath == f"{tmp_path}/heads"


def test_cv_curve_history_survives_a_resume(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(tiny_module("vanilla"), tmp_path, False, [HeadBalanceMonitor(), checkpoint], validate=False)
    resumed = HeadBalanceMonitor()
    last = str(tmp_path / "ckpt" / "last.ckpt")
    fit(tiny_module("vanilla"), tmp_path, False, [resumed], steps=6, validate=False, ckpt_path=last)
    assert resumed.history_steps == [2, 4, 6]


@pytest.mark.slow
def test_without_a_terminal_progress_is_one_plain_line_per_logging_interval(start_train, tmp_path):
    run = start_train(
        "logger=csv",
        "trainer.max_steps=20",
        "trainer.log_every_n_steps=5",
        "trainer.val_check_interval=10",
        f"hydra.run.dir={tmp_path}",
    )
    assert run.wait(timeout=300) == 0, run.read_output()[-3000:]
    output = run.read_output()  # train.py wrote to a file, as under SLURM
    assert "\r" not in output
    number = r"\d+\.\d{3}"
    line = rf"step (\d+)/20 \| loss {number} \| bpb {number}( \| val_bpb {number})? \| tok/s \d+ \| ETA \d+:\d\d:\d\d"
    lines = re.findall(rf"^{line}$", output, flags=re.M)
    assert [(int(step), bool(val)) for step, val in lines] == [(5, False), (10, False), (15, True), (20, True)]
    validations = re.findall(rf"^step (\d+)/20 \| validation \| val_bpb {number}$", output, flags=re.M)
    assert validations == ["10", "20"]


@pytest.mark.parametrize("terminal", [True, False])
def test_the_bar_is_drawn_in_a_terminal_only(monkeypatch, terminal):
    monkeypatch.setattr("sys.stdout.isatty", lambda: terminal)
    assert ProgressBar().is_enabled == terminal
    assert ProgressBar(plain=False).is_enabled and not ProgressBar(plain=True).is_enabled
