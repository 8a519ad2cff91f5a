"""The data layer against a tiny corpus in FineWeb-Edu's schema: sources, splits, sharding, tokenizers,
BPB byte counts and bad input. The corpus is written by the tests (pyarrow); nothing touches the network."""

import collections
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from data.corpus import Corpus
from data.datamodule import TextDataModule
from data.offline import FINEWEB_SCHEMA
from data.tokenizer import BPETokenizer, ByteTokenizer, TiktokenTokenizer
from model.metrics import BitsPerByte

ROOT = Path(__file__).parents[1]
WORDS = "the sink token attention head gate balance loss layer query key value über naïve 東京 🙂".split()
MIRROR_README = """---
configs:
- config_name: sample-10BT
  data_files:
  - split: train
    path: sample/10BT/*
---
A tiny mock of HuggingFaceFW/fineweb-edu for tests.
"""


def document(i: int) -> str:
    """A deterministic document of varying length (20..150 words), with multi-byte characters."""
    n = 20 + (i * 37) % 131
    return " ".join(WORDS[(i * 7 + j * j) % len(WORDS)] for j in range(n)) + f" (document {i})"


def fineweb_rows(ids) -> list[dict]:
    return [
        {"text": document(i), "id": f"<urn:uuid:{i:08d}>", "dump": "CC-MAIN-2024-10", "url": f"https://x/{i}",
         "file_path": "s3://x", "language": "en", "language_score": 0.9, "token_count": 0, "score": 3.1,
         "int_score": 3}
        for i in ids
    ]  # fmt: skip


def write_mirror(root: Path, n_files: int = 4, docs_per_file: int = 30) -> Path:
    """A local copy with the hub's layout: README.md (configs) + sample/10BT/*.parquet, 2 row groups each."""
    files = root / "sample" / "10BT"
    files.mkdir(parents=True)
    (root / "README.md").write_text(MIRROR_README)
    for f in range(n_files):
        rows = fineweb_rows(range(f * docs_per_file, (f + 1) * docs_per_file))
        table = pa.Table.from_pylist(rows, schema=FINEWEB_SCHEMA)
        pq.write_table(table, files / f"{f:03d}_00000.parquet", row_group_size=docs_per_file // 2)
    return root


@pytest.fixture(scope="module")
def mirror(tmp_path_factory) -> Path:
    return write_mirror(tmp_path_factory.mktemp("fineweb-edu"))


def all_ids(corpus: Corpus) -> list[str]:
    return [doc["id"] for doc in corpus.stream]


# --- sources: the fineweb_edu and local configs are one code path ---------------------------------------


def compose_data(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, "model.seq_len=64", "paths.cache_dir=/nonexistent"])
    return instantiate(cfg.data)


def batches(loader, n: int) -> list[dict]:
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            return out
    return out


def test_fineweb_edu_and_local_configs_give_identical_batches(mirror):
    hub_layout = compose_data("data=fineweb_edu", f"data.corpus.path={mirror}", "data.num_workers=0")
    local = compose_data("data=local", f"data.corpus.path={mirror}/sample/10BT", "data.num_workers=0")
    local.corpus.val_permille = hub_layout.corpus.val_permille = 100  # a validation set this small corpus can fill
    assert hub_layout.corpus.stream.num_shards == local.corpus.stream.num_shards == 8  # 4 files x 2 row groups
    for split, n in [("train", 12), ("validation", 2)]:
        a, b = batches(hub_layout.loader(split), n), batches(local.loader(split), n)
        assert len(a) == n
        for x, y in zip(a, b, strict=True):
            assert x.keys() == y.keys() == {"input_ids", "targets", "target_bytes"}
            assert all(torch.equal(x[k], y[k]) for k in x)


def test_batches_are_packed_rows_starting_with_bos(mirror):
    data = TextDataModule(Corpus(str(mirror), name="sample-10BT"), ByteTokenizer(), seq_len=48, batch_size=4)
    batch = next(iter(data.loader("train")))
    assert batch["input_ids"].shape == batch["targets"].shape == batch["target_bytes"].shape == (4, 48)
    assert (batch["input_ids"][:, 0] == ByteTokenizer.bos_id).all()  # position 0 is the sink
    assert torch.equal(batch["input_ids"][:, 1:], batch["targets"][:, :-1])
    assert torch.equal(batch["target_bytes"], (batch["targets"] < 256).int())


# --- sharding and the train / validation split -----------------------------------------------------------


def read_ids(corpus: Corpus, split: str, rank: int, world_size: int, epoch: int = 0) -> list[str]:
    """The ids one rank reads in one epoch, through 2 dataloader workers (as PackedRows sees them)."""
    docs = corpus.documents(split, seed=7, epoch=epoch, rank=rank, world_size=world_size)
    loader = torch.utils.data.DataLoader(docs, batch_size=None, num_workers=2)
    return [doc["id"] for doc in loader]


@pytest.mark.parametrize("layout", ["8 shards", "1 file"])
def test_two_ranks_two_workers_read_every_document_once_per_epoch(mirror, tmp_path, layout):
    if layout == "1 file":  # fewer shards than ranks x workers: ranks split by documents, a worker idles
        path = tmp_path / "one.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in fineweb_rows(range(50))))
        corpus = Corpus(str(path), val_permille=100)
    else:
        corpus = Corpus(str(mirror), name="sample-10BT", val_permille=100)
    everything = collections.Counter(all_ids(corpus))
    for epoch in (0, 1):
        read = collections.Counter()
        for split in ("train", "validation"):
            for rank in (0, 1):
                read.update(read_ids(corpus, split, rank, world_size=2, epoch=epoch))
        assert read == everything  # each document once: none lost, none read by two ranks or workers
    if layout == "8 shards":  # the next epoch reads the shards in another order (one file has none)
        assert read_ids(corpus, "train", 0, 2, epoch=1) != read_ids(corpus, "train", 0, 2, epoch=0)


def test_train_and_validation_share_no_document(mirror):
    corpus = Corpus(str(mirror), name="sample-10BT", val_permille=200)
    train = set(read_ids(corpus, "train", 0, 1))
    validation = set(read_ids(corpus, "validation", 0, 1))
    assert train and validation and not train & validation
    assert train | validation == set(all_ids(corpus))
    # The split is a property of the document, not of the order: another seed, the same split.
    other = corpus.documents("validation", seed=123)
    assert {doc["id"] for doc in other} == validation


def test_txt_files_are_documents_split_by_a_hash_of_their_text(tmp_path):
    for i in range(40):
        (tmp_path / f"{i:02d}.txt").write_text(document(i) + "\nsecond line\n")
    (tmp_path / "README.md").write_text("# My notes\nNot a dataset card: the folder stays plain files.\n")
    corpus = Corpus(str(tmp_path), val_permille=250)
    corpus.check()
    train = [d["text"] for d in corpus.documents("train", seed=0)]
    validation = [d["text"] for d in corpus.documents("validation", seed=0)]
    assert len(train) + len(validation) == 40  # one document per file, not per line
    assert validation and not set(train) & set(validation)
    again = Corpus(str(tmp_path / "*.txt"), val_permille=250)  # a glob of the same files: the same split
    assert sorted(d["text"] for d in again.documents("validation", seed=5)) == sorted(validation)


# --- tokenizers -------------------------------------------------------------------------------------------

SAMPLE = "Attention sinks: the über-naïve head 東京 🙂 <|endoftext|> \n\n  indented\tand done."


def tiny_tiktoken():
    """A byte-level tiktoken Encoding built in memory (no files): 256 bytes, 3 merges, <|endoftext|>."""
    import tiktoken

    ranks = {bytes([i]): i for i in range(256)}
    for merged in (b"th", b"the", "ü".encode()):
        ranks[merged] = len(ranks)
    return tiktoken.Encoding(
        name="tiny", pat_str=r"""\s?\S+|\s+""", mergeable_ranks=ranks, special_tokens={"<|endoftext|>": len(ranks)}
    )


@pytest.fixture(scope="module")
def bpe(mirror, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return BPETokenizer.trained_on(Corpus(str(mirror), name="sample-10BT"), 1024, 10**6, str(cache)), cache


def test_token_bytes_are_exact_utf8_lengths(bpe):
    for tok in (ByteTokenizer(), TiktokenTokenizer(tiny_tiktoken()), bpe[0]):
        ids = tok.encode(SAMPLE)
        assert tok.bos_id not in ids  # a literal "<|endoftext|>" in a document stays text
        assert int(tok.token_bytes[ids].sum()) == len(SAMPLE.encode("utf-8"))
        assert tok.decode(ids) == SAMPLE
        assert tok.token_bytes[tok.bos_id] == 0 and tok.vocab_size % 64 == 0
        assert tok.token_bytes.shape == (tok.vocab_size,)


def test_bpe_is_trained_once_cached_and_reloadable(bpe, mirror, monkeypatch):
    tok, cache = bpe
    assert tok.vocab_size == 1024 and tok.bos_id == 1023
    assert tok.token_bytes.max() > 3  # merges were learned: some tokens span several bytes
    assert len(tok.encode(document(3))) < len(document(3).encode()) / 2  # and they compress this corpus
    (saved,) = (cache / "tokenizers").glob("bpe-1024-*.json")
    monkeypatch.setattr("data.tokenizer.train_bpe", lambda *args: pytest.fail("retrained, not loaded from the cache"))
    again = BPETokenizer.trained_on(Corpus(str(mirror), name="sample-10BT"), 1024, 10**6, str(cache))
    from_file = BPETokenizer.trained_on(None, 1024, 0, "/nonexistent", file=str(saved))
    for other in (again, from_file):
        assert other.encode(SAMPLE) == tok.encode(SAMPLE)


def test_bpe_config_trains_on_the_data_configs_corpus(mirror, tmp_path):
    data = compose_data(
        "data=local", f"data.corpus.path={mirror}", "data.corpus.name=sample-10BT", "data/tokenizer=bpe",
        "data.tokenizer.vocab_size=512", f"data.tokenizer.cache_dir={tmp_path}", "data.num_workers=0",
        f"data.tokenizer.copy_to={tmp_path}/run",
    )  # fmt: skip
    assert isinstance(data.tokenizer, BPETokenizer) and data.tokenizer.vocab_size == 512
    run_copy = BPETokenizer.trained_on(None, 512, 0, "/nonexistent", file=str(tmp_path / "run" / "tokenizer.json"))
    assert run_copy.encode(SAMPLE) == data.tokenizer.encode(SAMPLE)
    batch = next(iter(data.loader("train")))
    assert batch["input_ids"].max() < 512 and (batch["input_ids"][:, 0] == 511).all()


# --- BPB --------------------------------------------------------------------------------------------------


def test_bpb_on_a_hand_made_example():
    """Text "the über" with the tiny encoding: tokens [BOS] "the" " " "ü" "ber"... by hand: pieces "the" and
    " über"; "the" -> 1 token (3 bytes), " über" -> " ", "ü" (2 bytes), "b", "e", "r": 6 tokens, 9 bytes."""
    tok = TiktokenTokenizer(tiny_tiktoken())
    ids = [tok.bos_id] + tok.encode("the über")
    assert len(ids) == 7 and tok.token_bytes[ids].tolist() == [0, 3, 1, 2, 1, 1, 1]
    targets = torch.tensor([ids[1:] + [tok.bos_id]])  # the next document's BOS is a target too: 0 bytes
    nll = torch.tensor([[1.0, 2.0, 0.5, 1.5, 1.0, 3.0, 7.0]])  # nats; the BOS target's 7.0 must not count
    metric = BitsPerByte()
    metric.update(nll, tok.token_bytes[targets])
    assert metric.compute().item() == pytest.approx((1.0 + 2.0 + 0.5 + 1.5 + 1.0 + 3.0) / (math.log(2) * 9))


def test_byte_bpb_is_loss_over_ln2(mirror):
    data = TextDataModule(Corpus(str(mirror), name="sample-10BT"), ByteTokenizer(), seq_len=32, batch_size=4)
    batch = next(iter(data.loader("train")))
    keep = (batch["targets"] != ByteTokenizer.bos_id).all(dim=1)  # rows inside one document: no special tokens
    assert keep.sum() >= 2
    targets = batch["targets"][keep]
    logits = torch.randn(*targets.shape, 320, generator=torch.Generator().manual_seed(0))
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
    metric = BitsPerByte()
    metric.update(nll, batch["target_bytes"][keep])
    assert metric.compute().item() == pytest.approx(nll.mean().item() / math.log(2), rel=1e-6)


# --- bad input: one line that says what to do ------------------------------------------------------------


def one_line_error(exc_type, fn, *match):
    with pytest.raises(exc_type) as err:
        fn()
    message = str(err.value)
    assert "\n" not in message and all(m in message for m in match), message


def test_bad_input_fails_with_one_clear_line(tmp_path, monkeypatch):
    one_line_error(FileNotFoundError, lambda: Corpus(str(tmp_path / "missing")).stream, "data.corpus.path", "missing")
    (tmp_path / "empty").mkdir()
    one_line_error(FileNotFoundError, lambda: Corpus(str(tmp_path / "empty")).stream, "holds no")
    pq.write_table(pa.Table.from_pylist([], schema=FINEWEB_SCHEMA), tmp_path / "empty" / "zero.parquet")
    one_line_error(ValueError, Corpus(str(tmp_path / "empty")).check, "holds no documents")
    pq.write_table(pa.table({"content": ["a doc"], "id": ["1"]}), tmp_path / "other.parquet")
    one_line_error(ValueError, Corpus(str(tmp_path / "other.parquet")).check, "text_column", "'content'")
    one_line_error(ValueError, lambda: TiktokenTokenizer.from_name("gpt5", str(tmp_path)), "gpt5", "cl100k_base")
    monkeypatch.setattr("data.tokenizer.reachable", lambda url, timeout_s=5.0: False)
    one_line_error(FileNotFoundError, lambda: TiktokenTokenizer.from_name("gpt2", str(tmp_path)), "files_dir")
    one_line_error(
        FileNotFoundError, lambda: TiktokenTokenizer.from_name("gpt2", str(tmp_path), str(tmp_path)), "vocab.bpe"
    )
    monkeypatch.setattr("data.corpus.reachable", lambda url, timeout_s=5.0: False)
    started = time.perf_counter()
    one_line_error(FileNotFoundError, lambda: Corpus("HuggingFaceFW/fineweb-edu").stream, "hf download")
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", True)
    one_line_error(FileNotFoundError, lambda: Corpus("HuggingFaceFW/fineweb-edu").stream, "HF_HUB_OFFLINE")
    assert time.perf_counter() - started < 15  # no minutes of retries


@pytest.mark.slow
def test_train_py_prints_a_bad_corpus_path_without_a_traceback(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "SINKAWARE_CACHE_DIR": str(tmp_path)}
    cmd = [sys.executable, "train.py", "data=local", f"data.corpus.path={tmp_path}/nowhere", "logger=csv"]
    result = subprocess.run(cmd + [f"hydra.run.dir={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert "data.corpus.path" in output and "Traceback" not in output, output[-2000:]
