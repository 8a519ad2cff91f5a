"""The offline default corpus: real English text that every Python installation ships.

Documents are the language-reference topics of `pydoc_data` and the docstrings of the standard
library's modules (read with `ast`, nothing is imported or executed). They are written once as parquet
shards in FineWeb-Edu's column schema, so the default run reads them through the same streaming code
path as FineWeb-Edu itself.
"""

import ast
import hashlib
import logging
import os
import random
import sysconfig
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

FINEWEB_SCHEMA = pa.schema(
    [
        ("text", pa.string()),
        ("id", pa.string()),
        ("dump", pa.string()),
        ("url", pa.string()),
        ("file_path", pa.string()),
        ("language", pa.string()),
        ("language_score", pa.float64()),
        ("token_count", pa.int64()),
        ("score", pa.float64()),
        ("int_score", pa.int64()),
    ]
)
MIN_DOC_CHARS = 200


def _stdlib_documents():
    """(source name, text) pairs: pydoc topics, then one document per stdlib module's docstrings."""
    from pydoc_data.topics import topics

    for name, text in sorted(topics.items()):
        yield f"pydoc_data/topics/{name}", text
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib).as_posix()
        if rel.startswith(("site-packages", "test", "idlelib")) or "/test" in rel:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        docs = [ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, kinds)]
        text = "\n\n".join(d for d in docs if d)
        yield f"stdlib/{rel}", text


def _row(source: str, text: str) -> dict:
    return {
        "text": text,
        "id": f"<urn:sha1:{hashlib.sha1(source.encode()).hexdigest()}>",
        "dump": "python-stdlib",
        "url": f"python://{source}",
        "file_path": source,
        "language": "en",
        "language_score": 1.0,
        "token_count": len(text.encode()),
        "score": 3.0,
        "int_score": 3,
    }


def build_offline_corpus(cache_dir: str | Path, num_shards: int = 8) -> Path:
    """Write the corpus under cache_dir (once; a second call reuses it) and return its folder."""
    out = Path(cache_dir).expanduser() / "python-docs-v1"
    done = out / "_COMPLETE"
    if done.exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    rows = [_row(src, text) for src, text in _stdlib_documents() if len(text) >= MIN_DOC_CHARS]
    random.Random(0).shuffle(rows)  # mix topics and modules across shards and along the stream
    if not rows:
        raise RuntimeError("the offline corpus came out empty: this Python ships no docs or docstrings")
    for shard in range(num_shards):
        part = rows[shard::num_shards]
        # Two processes may build it at once (test workers, runs started together on a fresh cache): each writes
        # its own temporary file, and the renames put the same bytes in place.
        tmp = out / f".train-{shard:05d}.parquet.{os.getpid()}.tmp"
        pq.write_table(pa.Table.from_pylist(part, schema=FINEWEB_SCHEMA), tmp)
        tmp.replace(out / f"train-{shard:05d}-of-{num_shards:05d}.parquet")
    done.write_text(f"{len(rows)} documents\n")
    log.info("wrote the offline corpus: %d documents in %d shards under %s", len(rows), num_shards, out)
    return out
