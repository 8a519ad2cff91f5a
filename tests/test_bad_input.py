"""Damaged corpus files end in one line naming the file, the row where known, and what to do: invalid UTF-8 in .jsonl
and .txt, a .jsonl line that is not JSON, a parquet file with a corrupt data page, a truncated parquet file. Read by
dataloader worker processes (where the error is raised) and by train.py (which prints it)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.corpus import Corpus, CorpusError
from data.datamodule import TextDataModule
from data.tokenizer import ByteTokenizer

ROOT = Path(__file__).parents[1]
WORDS = "the sink token attention head gate balance loss layer query key value".split()


def text(i: int) -> str:
    return " ".join(WORDS[(i * 7 + j * j) % len(WORDS)] for j in range(40 + i % 50))


def jsonl_corpus(root: Path) -> tuple[Path, str]:
    """Two files of 100 documents; b.jsonl's line 37 holds a byte that is not UTF-8."""
    root.mkdir()
    for name, first in (("a", 0), ("b", 100)):
        lines = [json.dumps({"text": text(i), "id": str(i)}).encode() for i in range(first, first + 100)]
        if name == "b":
            lines[36] = lines[36].replace(b'"text": "', b'"text": "\xff', 1)
        (root / f"{name}.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return root, f"{root / 'b.jsonl'}: line 37 is not UTF-8 (byte 0xff"


def txt_corpus(root: Path) -> tuple[Path, str]:
    """30 documents, one a file; 17.txt's line 2 holds a broken two-byte character."""
    root.mkdir()
    for i in range(30):
        data = f"{text(i)}\n{text(i + 1)}".encode()
        if i == 17:
            cut = data.index(b"\n") + 6
            data = data[:cut] + b"\xc3\x28" + data[cut:]
        (root / f"{i:02d}.txt").write_bytes(data)
    return root, f"{root / '17.txt'}: line 2 is not UTF-8 (byte 0xc3 at column 6)"


def parquet_corpus(root: Path) -> None:
    root.mkdir()
    for f in range(4):
        table = pa.table({"text": [text(i) for i in range(f * 50, f * 50 + 50)], "id": [str(i) for i in range(50)]})
        pq.write_table(table, root / f"{f}.parquet", row_group_size=25, compression="snappy")


def corrupt_page_corpus(root: Path) -> tuple[Path, str]:
    """2.parquet's second row group (rows 25-49) has its compressed text column overwritten."""
    parquet_corpus(root)
    file = root / "2.parquet"
    data = bytearray(file.read_bytes())
    start = pq.ParquetFile(file).metadata.row_group(1).column(0).dictionary_page_offset + 30  # past the page header
    data[start : start + 100] = b"\xab" * 100
    file.write_bytes(bytes(data))
    return root, f"{file}: rows 25-49 (row group 1) cannot be decoded (Corrupt snappy compressed data.)"


def truncated_corpus(root: Path) -> tuple[Path, str]:
    parquet_corpus(root)
    file = root / "3.parquet"
    file.write_bytes(file.read_bytes()[:-300])
    return root, f"{file} is not a readable parquet file (Parquet magic bytes not found in footer."


def malformed_json_corpus(root: Path) -> tuple[Path, str]:
    root.mkdir()
    lines = [json.dumps({"text": text(i), "id": str(i)}) for i in range(100)]
    lines[40] = '{"text": "cut off'
    (root / "a.jsonl").write_text("\n".join(lines) + "\n")
    return root, f"{root / 'a.jsonl'}: line 41 is not JSON (Unterminated string starting at, column 10)"


DAMAGED = {
    "jsonl": jsonl_corpus,
    "malformed_json": malformed_json_corpus,
    "txt": txt_corpus,
    "corrupt_page": corrupt_page_corpus,
    "truncated": truncated_corpus,
}
WHAT_TO_DO = "fix or replace the file, or move it out of data.corpus.path"


@pytest.mark.parametrize("damage", DAMAGED)
def test_a_damaged_file_read_by_dataloader_workers_fails_with_one_line_naming_it(tmp_path, damage):
    path, where = DAMAGED[damage](tmp_path / damage)
    data = TextDataModule(Corpus(str(path), val_permille=0), ByteTokenizer(), seq_len=32, batch_size=2, num_workers=2)
    with pytest.raises(CorpusError) as err:
        data.corpus.check()  # opens the corpus (footers) and reads its first document
        for _ in data.loader("train"):  # every document, in 2 worker processes
            pass
    message = str(err.value)
    assert "\n" not in message and where in message and WHAT_TO_DO in message, message


def test_a_file_that_reads_is_not_blamed(tmp_path):
    path, _ = jsonl_corpus(tmp_path / "jsonl")
    (path / "b.jsonl").unlink()  # the damaged one
    corpus = Corpus(str(path))
    corpus.check()
    assert sum(1 for _ in corpus.read(corpus.stream)) == 100
    assert corpus.unreadable(OSError("disk gone")).args == (
        f"data.corpus.path={path}: reading a document failed: disk gone",
    )


@pytest.mark.slow
@pytest.mark.parametrize("damage", DAMAGED)
def test_train_py_prints_a_damaged_file_in_one_line(tmp_path, damage):
    path, where = DAMAGED[damage](tmp_path / damage)
    env = {**os.environ, "WANDB_MODE": "disabled", "SINKAWARE_CACHE_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    small = ["model.n_layer=1", "model.n_embd=32", "model.seq_len=32", "trainer.max_steps=30"]
    cmd = [sys.executable, "train.py", "data=local", f"data.corpus.path={path}", "logger=csv", *small]
    result = subprocess.run(cmd + [f"hydra.run.dir={tmp_path}/run"], cwd=ROOT, env=env, capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    errors = [line for line in output.splitlines() if "[train][ERROR]" in line]  # (`datasets` may log its own)
    assert len(errors) == 1 and where in errors[0] and "Traceback" not in output, output[-3000:]
