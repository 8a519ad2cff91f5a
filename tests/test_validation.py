"""Small splits with any number of workers and ranks: a worker with less than a row yields nothing, every rank runs
the same number of validation batches, a split too small for some rank fails before the first training step, and
validation makes no collective of its own. Also: dataloader workers by default on a GPU."""

import datetime
import types
from pathlib import Path

import lightning as L
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import csv_rows, quiet_trainer
from hydra import compose, initialize_config_dir
from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator
from test_data import batches, fineweb_rows
from test_ddp import make_module

from data.corpus import Corpus
from data.datamodule import GPU_WORKERS, TextDataModule
from data.offline import FINEWEB_SCHEMA
from data.tokenizer import ByteTokenizer

ROOT = Path(__file__).parents[1]
WORDS = "the sink token attention head gate balance loss".split()


def write_short_corpus(root: Path, docs_per_file: list[int]) -> Path:
    """Parquet files of short documents (3..12 words, 15..80 bytes), docs_per_file[f] in file f."""
    root.mkdir(parents=True, exist_ok=True)
    first = 0
    for f, n in enumerate(docs_per_file):
        rows = fineweb_rows(range(first, first + n))
        for i, row in enumerate(rows, start=first):
            row["text"] = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(3 + i % 10))
        pq.write_table(pa.Table.from_pylist(rows, schema=FINEWEB_SCHEMA), root / f"{f:02d}.parquet")
        first += n
    return root


@pytest.fixture(scope="module")
def short_corpus(tmp_path_factory) -> Path:
    """The issue's case: 200 short documents in 8 parquet files; 5% of them (the local default) for validation."""
    return write_short_corpus(tmp_path_factory.mktemp("short"), [25] * 8)


def datamodule(path: Path, seq_len: int = 64, num_workers: int = 4, val_permille: int = 50) -> TextDataModule:
    corpus = Corpus(str(path), val_permille=val_permille)
    return TextDataModule(corpus, ByteTokenizer(), seq_len=seq_len, batch_size=2, num_workers=num_workers, seed=1337)


# --- workers with less than a row ---------------------------------------------------------------------------


def test_workers_with_less_than_a_row_yield_nothing(short_corpus):
    data = datamodule(short_corpus)
    for rank in (0, 1):  # 2 ranks x 4 workers, a shard each: most hold one or two validation documents, < 65 tokens
        rows = torch.cat([batch["input_ids"] for batch in data.loader("validation", rank, 2)])
        assert 0 < len(rows) < 4  # the rows of the workers that have one; the others yield nothing
        assert (rows[:, 0] == ByteTokenizer.bos_id).all()


def test_training_streams_on_when_a_workers_shard_holds_less_than_a_row(tmp_path):
    data = datamodule(write_short_corpus(tmp_path, [40, 40, 40, 1]))  # the 1-document shard falls to some worker
    reference = batches(data.loader("train"), 60)  # several epochs of the other shards
    assert len(reference) == 60
    loader = data.loader("train")  # resumed after 30 batches: the worker that ended stays ended
    consumed = iter(loader)
    for _ in range(30):
        next(consumed)
        loader.batch_consumed()
    state = loader.state_dict()
    resumed = data.loader("train")
    resumed.load_state_dict(state)
    for a, b in zip(batches(resumed, 30), reference[30:], strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"])


# --- the check before the first step ------------------------------------------------------------------------


class Steps(L.LightningModule):
    """Counts its training steps."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.steps = 0

    def training_step(self, batch, batch_idx):
        self.steps += 1
        return (self.weight * batch["input_ids"].float().mean()).sum()

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.parametrize(
    "split, docs_per_file, seq_len",
    [("validation", [25] * 8, 512), ("training", [1], 512)],  # 200 short documents (~425 tokens of validation); one
)
def test_a_split_with_no_row_for_a_rank_fails_before_the_first_step(tmp_path, split, docs_per_file, seq_len):
    data = datamodule(write_short_corpus(tmp_path / "corpus", docs_per_file), seq_len=seq_len, num_workers=2)
    module = Steps()
    trainer = quiet_trainer(
        max_steps=5, limit_val_batches=2, val_check_interval=2, check_val_every_n_epoch=None, default_root_dir=tmp_path,
        enable_checkpointing=False,
    )  # fmt: skip
    with pytest.raises(ValueError, match=f"the {split} split is too small") as err:
        trainer.fit(module, datamodule=data)
    assert module.steps == 0
    message = str(err.value)
    spread = "1 ranks x 2 dataloader workers" if split == "training" else "over 1 ranks"  # validation: 1 worker
    assert "\n" not in message and all(s in message for s in ("seq_len + 1 = 513", spread))
    if split == "validation":
        assert "data.corpus.val_permille (now 50)" in message and " validation documents (" in message


def test_workers_auto_is_four_on_a_gpu_trainer_and_none_on_the_cpu(short_corpus):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        offline = compose("train", overrides=["trainer=gpu"]).data
    assert offline.num_workers == "auto"  # the default corpus too
    data = datamodule(short_corpus, num_workers="auto")
    assert data.loader("train").num_workers == 0  # no trainer (eval.py, tests): in this process
    data.trainer = types.SimpleNamespace(accelerator=CUDAAccelerator())
    assert data.loader("train").num_workers == GPU_WORKERS == 4
    assert data.loader("validation").num_workers == 1  # a rank's few validation documents stay in one worker
    data.trainer = types.SimpleNamespace(accelerator=CPUAccelerator())
    assert data.loader("train").num_workers == 0
    assert datamodule(short_corpus, num_workers=3).loader("train").num_workers == 3  # a number is kept
    assert datamodule(short_corpus, num_workers=3).loader("validation").num_workers == 1
    with pytest.raises(ValueError, match="num_workers >= 0 or auto"):
        datamodule(short_corpus, num_workers="many")


# --- two ranks through train.py -----------------------------------------------------------------------------


@pytest.mark.slow
def test_two_ranks_four_workers_validate_the_same_batches_on_a_small_split(start_train, short_corpus, tmp_path):
    """The issue's run: 2 gloo ranks x 4 workers on 200 short documents in 8 files, a validation every 10 steps."""
    data = datamodule(short_corpus)
    available = [len(list(data.loader("validation", rank, 2))) for rank in (0, 1)]
    assert available[0] != available[1]  # the ranks' splits differ: uncapped, one rank would wait for the other
    job = start_train(
        "data=local", f"data.corpus.path={short_corpus}", "data.num_workers=4", "trainer.devices=2",
        "+trainer.strategy=ddp", "trainer.max_steps=30", "trainer.val_check_interval=10", "trainer.limit_val_batches=8",
        "logger=csv", f"hydra.run.dir={tmp_path}", "+callbacks.count._target_=tests.ddp_probes.CountValidationBatches",
        f"+callbacks.count.out_dir={tmp_path}",
    )  # fmt: skip
    code = job.wait(timeout=120)
    assert code == 0, job.read_output()[-3000:]
    per_rank = [(tmp_path / f"val_batches_rank{r}.txt").read_text().split() for r in (0, 1)]
    assert per_rank[0] == per_rank[1] == [str(min(available))] * 3
    rows = csv_rows(tmp_path)
    assert [int(row["step"]) for row in rows if row.get("val/bpb")] == [9, 19, 29]


@pytest.mark.slow
def test_two_ranks_with_no_validation_row_stop_before_training(start_train, short_corpus, tmp_path):
    job = start_train(
        "data=local", f"data.corpus.path={short_corpus}", "data.num_workers=4", "trainer.devices=2",
        "+trainer.strategy=ddp", "model.seq_len=256", "logger=csv", f"hydra.run.dir={tmp_path}",
    )  # fmt: skip
    code = job.wait(timeout=120)
    output = job.read_output()
    assert code == 1, output[-3000:]
    assert "the validation split is too small" in output and "over 2 ranks" in output
    assert "Traceback" not in output and not list(tmp_path.rglob("metrics.csv"))


# --- validation makes no collective of its own --------------------------------------------------------------


def validate_on_two_ranks(rank: int, init_file: str, out: dict):
    """Rank 0 validates 3 batches, rank 1 one, with aux.scope=global; then both compute the metrics (one reduction
    each). A collective in validation_step would pair with another rank's different one: an error or a hang."""
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=20)
    )
    module = make_module("global")
    for i in range(3 if rank == 0 else 1):
        module.validation_step(validation_batch(3 * rank + i), i)
    metrics = {"loss": module.val_loss.compute(), "bpb": module.val_bpb.compute()}
    if rank == 0:
        out.update(metrics)
    torch.distributed.destroy_process_group()


def validation_batch(i: int) -> dict:
    rows = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(i))
    return {"input_ids": rows[:, :-1], "targets": rows[:, 1:], "target_bytes": torch.ones(2, 16, dtype=torch.int32)}


def test_validation_makes_no_collective_of_its_own(tmp_path):
    out = torch.multiprocessing.Manager().dict()
    torch.multiprocessing.start_processes(
        validate_on_two_ranks, args=(str(tmp_path / "init"), out), nprocs=2, start_method="spawn"
    )  # not fork: a fork of this many-threaded pytest process can deadlock in torch's thread pools (hung CI)
    single = make_module("global")
    for i in (0, 1, 2, 3):  # the same 4 batches in one process
        single.validation_step(validation_batch(i), i)
    torch.testing.assert_close(out["loss"], single.val_loss.compute())
    torch.testing.assert_close(out["bpb"], single.val_bpb.compute())
