"""Where documents come from, opened as one Hugging Face `datasets` stream whatever the source:

- a hub dataset by id, e.g. HuggingFaceFW/fineweb-edu with name=sample-10BT;
- a local copy with the hub's folder layout (a folder with the dataset card README.md), same `name`;
- local .parquet / .jsonl / .json / .txt files: a folder (searched recursively), a file or a glob.
  A .txt file is one document.

Documents are held out for validation by a hash of their id (of their text when there is no id column),
so the split is fixed, independent of order, sharding and seeds, and train and validation never overlap.
"""

import glob
import hashlib
import json
import logging
import re
import urllib.error
import urllib.request
from functools import cached_property, partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

SUFFIX_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text"}
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
SPLITS = ("train", "validation")
# What reading a damaged file raises: bad UTF-8 in json/text, a corrupt or truncated parquet page (OSError "Corrupt
# snappy compressed data", ArrowInvalid), a file gone or unreadable.
READ_ERRORS = (UnicodeDecodeError, OSError, pa.ArrowException)


class CorpusError(ValueError):
    """A corpus file that cannot be read, in one line naming it. Raised in a dataloader worker, it reaches the main
    process re-created by torch from the worker's formatted traceback, whose last line is this message: only that
    line is kept, so train.py prints one line there too."""

    def __init__(self, message: str):
        super().__init__(message.rstrip().splitlines()[-1].removeprefix(f"{__name__}.CorpusError: "))


def first_line(err: Exception) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def parquet_rows(file: Path) -> int:
    """The rows of a parquet file from its footer (cheap): a truncated or foreign file fails here, named."""
    try:
        return pq.ParquetFile(file).metadata.num_rows
    except READ_ERRORS as err:
        raise CorpusError(
            f"{file} is not a readable parquet file ({first_line(err)}): fix or replace the file, or move it out of "
            "data.corpus.path"
        ) from err


def damage(file: Path) -> str | None:
    """Where `file` cannot be read and what to do ("line 37 is not UTF-8 ..."), or None when all of it reads."""
    try:
        where = parquet_damage(file) if file.suffix == ".parquet" else line_damage(file)
    except READ_ERRORS as err:
        where = f"cannot be read ({first_line(err)})"
    return where and f"{where}: fix or replace the file, or move it out of data.corpus.path"


def parquet_damage(file: Path) -> str | None:
    parquet, start = pq.ParquetFile(file), 0
    for group in range(parquet.num_row_groups):
        rows = parquet.metadata.row_group(group).num_rows
        try:
            parquet.read_row_group(group)
        except READ_ERRORS as err:
            return f"rows {start}-{start + rows - 1} (row group {group}) cannot be decoded ({first_line(err)})"
        start += rows
    return None


def line_damage(file: Path) -> str | None:
    """The first line that is not UTF-8 or, in a .jsonl file, not JSON."""
    with open(file, "rb") as lines:
        for number, line in enumerate(lines, start=1):
            try:
                decoded = line.decode("utf-8")
            except UnicodeDecodeError as err:
                return f"line {number} is not UTF-8 (byte {line[err.start]:#04x} at column {err.start + 1})"
            if file.suffix == ".jsonl" and decoded.strip():
                try:
                    json.loads(decoded.strip())  # without the newline, which JSON does not allow inside a string
                except json.JSONDecodeError as err:
                    return f"line {number} is not JSON ({err.msg}, column {err.colno})"
    return None


def is_validation(doc_id: str, val_permille: int) -> bool:
    """A fixed, content-independent split: a document is in validation iff its id hashes below the cut."""
    return int(hashlib.sha1(doc_id.encode()).hexdigest()[:8], 16) % 1000 < val_permille


def in_split(doc: dict, text_column: str, id_column: str, val_permille: int, validation: bool) -> bool:
    doc_id = doc.get(id_column)
    key = str(doc_id) if doc_id is not None else hashlib.sha1(doc[text_column].encode()).hexdigest()
    return is_validation(key, val_permille) == validation


def is_dataset_card(readme: Path) -> bool:
    """A hub dataset's README.md starts with its YAML metadata (configs, data files), a plain README does not."""
    return readme.is_file() and readme.read_text(encoding="utf-8", errors="replace").startswith("---")


def reachable(url: str, timeout_s: float = 5.0) -> bool:
    """One quick request instead of a library's minutes of retries when there is no network."""
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout_s)
    except urllib.error.HTTPError:
        return True  # the server answered
    except (urllib.error.URLError, OSError):
        return False
    return True


def node_split_strategy(num_shards: int, world_size: int) -> str:
    """How `split_dataset_by_node` divides the stream. "shards": each rank reads only its own files or row
    groups; when they do not divide evenly some ranks get one shard more, which is negligible once every
    rank has many. "examples": every rank reads every shard and keeps 1 document in world_size: exact
    balance for world_size times the reading (FineWeb-Edu sample-10BT has 14 files: 8 ranks would each read
    all 28 GB), so it is only the fallback for corpora with few shards."""
    return "shards" if num_shards % world_size == 0 or num_shards >= 8 * world_size else "examples"


# The shuffle buffer of 1 holds one document and is empty between documents, so the warning `datasets` logs
# on every resume ("the shuffle buffer will be refilled") does not apply: the stream resumes exactly.
logging.getLogger("datasets.iterable_dataset").addFilter(lambda record: "shuffle buffer" not in record.getMessage())


class Corpus:
    """A document source plus its train / validation split.

    path: hub dataset id, folder, file or glob. name: the hub config (subset), for the hub or a local copy
    with its layout. text_column / id_column: the columns holding the text and a stable document id.
    val_permille: documents per thousand held out for validation.
    """

    def __init__(
        self,
        path: str,
        name: str | None = None,
        text_column: str = "text",
        id_column: str = "id",
        val_permille: int = 50,
    ):
        if not 0 <= val_permille < 1000:
            raise ValueError(f"data.corpus.val_permille={val_permille} must be in [0, 1000)")
        self.path, self.name = str(path), name
        self.text_column, self.id_column = text_column, id_column
        self.val_permille = val_permille
        self.files: list[Path] = []  # the local files, known once the stream is opened (none for the hub)

    def fingerprint(self) -> dict:
        """What identifies this corpus and its training split (a key for caches built from it)."""
        local = Path(self.path).expanduser()
        path = str(local.resolve()) if local.exists() else self.path
        return {"path": path, "name": self.name, "text": self.text_column, "id": self.id_column,
                "val_permille": self.val_permille}  # fmt: skip

    @cached_property
    def stream(self):
        """The whole corpus in file order; parquet is split into one shard per row group, so that ranks and
        workers can divide even a corpus of a few large files."""
        return self._open().reshard()

    def _open(self):
        from datasets import load_dataset

        local = Path(self.path).expanduser()
        if local.is_dir() and is_dataset_card(local / "README.md"):  # a local copy of a hub dataset
            self.files = sorted(f for f in local.rglob("*") if f.suffix in SUFFIX_BUILDERS and f.is_file())
            for file in self.files:
                if file.suffix == ".parquet":
                    parquet_rows(file)  # a truncated file fails now, named, not later inside `datasets`
            return load_dataset(str(local), name=self.name, split="train", streaming=True)
        if HUB_ID.match(self.path) and not local.exists():
            self._check_hub_reachable()
            return load_dataset(self.path, name=self.name, split="train", streaming=True)
        if local.is_dir():
            files = sorted(f for f in local.rglob("*") if f.suffix in SUFFIX_BUILDERS and f.is_file())
        elif glob.has_magic(self.path):
            files = sorted(Path(f) for f in glob.glob(str(local), recursive=True) if Path(f).suffix in SUFFIX_BUILDERS)
        elif local.is_file():
            files = [local]
        else:
            raise FileNotFoundError(
                f"data.corpus.path={self.path} does not exist: give a folder, file or glob of "
                f"{'/'.join(SUFFIX_BUILDERS)} files, a local copy of a hub dataset, or a hub id like owner/name"
            )
        if not files:
            raise FileNotFoundError(f"data.corpus.path={self.path} holds no {'/'.join(SUFFIX_BUILDERS)} files")
        self.files = files = [f for f in files if f.suffix != ".parquet" or parquet_rows(f)]  # `datasets` fails on
        if not files:  # a parquet file of 0 rows
            raise ValueError(f"data.corpus.path={self.path} holds no documents: its parquet files are empty")
        builders = {SUFFIX_BUILDERS.get(f.suffix) for f in files}
        if len(builders) != 1 or None in builders:
            raise ValueError(f"data.corpus.path={self.path} mixes file types {sorted(map(str, builders))}: use one")
        builder = builders.pop()
        options = {"sample_by": "document"} if builder == "text" else {}  # a .txt file is one document
        return load_dataset(builder, data_files=[str(f) for f in files], split="train", streaming=True, **options)

    def _check_hub_reachable(self):
        """Fail in seconds, not after minutes of retries, when the hub cannot be reached."""
        from datasets import config
        from huggingface_hub import constants

        why = "HF_HUB_OFFLINE=1 is set" if config.HF_HUB_OFFLINE else None
        if why is None and not reachable(constants.ENDPOINT):
            why = f"{constants.ENDPOINT} is unreachable"
        if why:
            raise FileNotFoundError(
                f"data.corpus.path={self.path} is not a local folder and {why}: download it once with `hf download "
                f"{self.path} --repo-type dataset --local-dir DIR` (--include 'sample/10BT/*' for one FineWeb-Edu "
                "subset) and set data.corpus.path=DIR"
            )

    def check(self):
        """Fail early, in the main process, on an empty corpus or a missing text column."""
        first = next(self.read(self.stream), None)
        if first is None:
            raise ValueError(f"data.corpus.path={self.path} holds no documents: point it at a non-empty corpus")
        if self.text_column not in first:
            raise ValueError(
                f"data.corpus.path={self.path} has no column {self.text_column!r} (its columns: {sorted(first)}): "
                "set data.corpus.text_column to the column that holds the text"
            )
        if self.id_column not in first:
            log.info("no %r column in %s: documents are split by a hash of their text", self.id_column, self.path)

    def read(self, docs):
        """Iterate `docs` (a stream of this corpus); a file that cannot be read ends in a CorpusError naming it and
        the row, found by reading the files again: only after a failure, so reading is not slowed down."""
        try:
            yield from docs
        except READ_ERRORS as err:
            raise self.unreadable(err) from err

    def unreadable(self, err: Exception) -> CorpusError:
        for file in self.files:
            if (where := damage(file)) is not None:
                return CorpusError(f"data.corpus.path={self.path}: {file}: {where}")
        return CorpusError(f"data.corpus.path={self.path}: reading a document failed: {first_line(err)}")

    def documents(self, split: str, seed: int, epoch: int = 0, rank: int = 0, world_size: int = 1):
        """This rank's documents of `split` in epoch `epoch`: shard order shuffled by (seed, epoch), the same on
        every rank, so the ranks divide the corpus between them. Inside dataloader workers, `datasets` divides
        the rank's shards between the workers. Resumable exactly with state_dict / load_state_dict."""
        from datasets.distributed import split_dataset_by_node

        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not one of {SPLITS}")
        # Only the order of the shards (files, row groups) is shuffled: a shuffle buffer's content is not
        # saved, so a resumed stream would skip documents, and reading several shards round-robin costs
        # `datasets` a 5 s pause at the end of every pass. Documents within a shard keep their order.
        docs = self.stream.shuffle(
            generator=np.random.default_rng([seed, epoch]), buffer_size=1, max_buffer_input_shards=1
        )
        if world_size > 1:
            strategy = node_split_strategy(docs.num_shards, world_size)
            docs = split_dataset_by_node(docs, rank=rank, world_size=world_size, strategy=strategy)
        keep = partial(
            in_split,
            text_column=self.text_column,
            id_column=self.id_column,
            val_permille=self.val_permille,
            validation=split == "validation",
        )
        return docs.filter(keep)

    def training_texts(self, max_chars: int):
        """Texts of the training split, in stream order, up to about max_chars characters (to train a BPE)."""
        total = 0
        for doc in self.read(self.documents("train", seed=0)):
            yield doc[self.text_column]
            total += len(doc[self.text_column])
            if total >= max_chars:
                return
