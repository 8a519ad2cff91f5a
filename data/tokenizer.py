"""Tokenizers behind one interface: vocab_size, bos_id, token_bytes, encode(text) -> ids, decode(ids) -> text.

token_bytes[i] is the number of UTF-8 bytes token i stands for (0 for BOS, special and unused ids): BPB
needs it. All three kinds are byte-level, so these counts are exact: the token_bytes of encode(text) sum
to len(text.encode()). BOS never comes out of encode(), so it only ever appears where packing puts it.
"""

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from data.corpus import reachable

log = logging.getLogger(__name__)

VOCAB_MULTIPLE = 64  # the embedding and the output layer are padded to a multiple of this, for the matmuls


def padded(n: int) -> int:
    return -(-n // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, BOS = 256."""

    bos_id = 256

    def __init__(self):
        self.vocab_size = padded(257)
        self.token_bytes = torch.zeros(self.vocab_size, dtype=torch.int32)
        self.token_bytes[:256] = 1

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


# The files each tiktoken encoding downloads on first use, as in tiktoken_ext/openai_public.py; tiktoken
# caches each one under sha1(url) in TIKTOKEN_CACHE_DIR.
_BLOB = "https://openaipublic.blob.core.windows.net"
TIKTOKEN_FILES = {
    "gpt2": [f"{_BLOB}/gpt-2/encodings/main/vocab.bpe", f"{_BLOB}/gpt-2/encodings/main/encoder.json"],
    "r50k_base": [f"{_BLOB}/encodings/r50k_base.tiktoken"],
    "p50k_base": [f"{_BLOB}/encodings/p50k_base.tiktoken"],
    "cl100k_base": [f"{_BLOB}/encodings/cl100k_base.tiktoken"],
    "o200k_base": [f"{_BLOB}/encodings/o200k_base.tiktoken"],
}


class TiktokenTokenizer:
    """A tiktoken encoding; its <|endoftext|> token is BOS. Web text is encoded with encode_ordinary, so a
    literal "<|endoftext|>" in a document stays text."""

    def __init__(self, encoding):
        self.encoding = encoding
        self.bos_id = encoding.eot_token
        self.vocab_size = padded(encoding.n_vocab)
        self.token_bytes = torch.zeros(self.vocab_size, dtype=torch.int32)
        for i in range(encoding.n_vocab):
            if encoding.is_special_token(i):
                continue
            try:
                self.token_bytes[i] = len(encoding.decode_single_token_bytes(i))
            except KeyError:  # a hole in the vocabulary (cl100k_base has some)
                pass

    @classmethod
    def from_name(cls, name: str, cache_dir: str, files_dir: str | None = None) -> "TiktokenTokenizer":
        """Load encoding `name` with no network when its files are in cache_dir (or in files_dir, under the
        names they have on openaipublic, e.g. cl100k_base.tiktoken, which are copied into cache_dir)."""
        import tiktoken

        if name not in TIKTOKEN_FILES:
            raise ValueError(f"data.tokenizer.name={name!r} is unknown: use one of {list(TIKTOKEN_FILES)}")
        cache = Path(cache_dir).expanduser()
        cache.mkdir(parents=True, exist_ok=True)
        os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)  # tiktoken reads its cache dir only from the environment
        cached = {url: cache / hashlib.sha1(url.encode()).hexdigest() for url in TIKTOKEN_FILES[name]}
        for url, target in cached.items():
            source = Path(files_dir).expanduser() / url.rsplit("/", 1)[1] if files_dir else None
            if source is not None and not target.exists():
                if not source.exists():
                    raise FileNotFoundError(f"data.tokenizer.files_dir={files_dir} has no {source.name} (from {url})")
                shutil.copyfile(source, target)
        missing = [url for url, target in cached.items() if not target.exists()]
        if missing and not reachable(_BLOB):
            names = " and ".join(url.rsplit("/", 1)[1] for url in missing)
            raise FileNotFoundError(
                f"tiktoken encoding {name!r} is not cached in {cache} and {_BLOB} is unreachable: download {names} "
                f"from {missing[0].rsplit('/', 1)[0]}/ and set data.tokenizer.files_dir to their folder "
                f"(or run tiktoken.get_encoding({name!r}) once with TIKTOKEN_CACHE_DIR={cache} on a machine online)"
            )
        return cls(tiktoken.get_encoding(name))

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def decode(self, ids) -> str:
        ids = [i for i in ids if i < self.encoding.n_vocab and not self.encoding.is_special_token(i)]
        return self.encoding.decode(ids)


# GPT-4's pre-tokenizer split (cl100k_base): words with their leading space, numbers of up to 3 digits,
# punctuation runs, newlines, other whitespace. Byte-level BPE merges happen within these pieces.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)


class BPETokenizer:
    """Byte-level BPE trained with Hugging Face `tokenizers`. Ids 0..V-2 are the trained vocabulary (fewer
    when the corpus runs out of merges), BOS = V-1 is outside it, so no text can ever encode to BOS."""

    def __init__(self, tokenizer, vocab_size: int):
        if tokenizer.get_vocab_size() >= vocab_size:
            raise ValueError(
                f"this BPE has {tokenizer.get_vocab_size()} tokens, data.tokenizer.vocab_size={vocab_size} leaves no "
                f"id for BOS: set it to at least {padded(tokenizer.get_vocab_size() + 1)}"
            )
        self.tokenizer, self.vocab_size, self.bos_id = tokenizer, vocab_size, vocab_size - 1
        self.token_bytes = torch.zeros(vocab_size, dtype=torch.int32)
        for token, i in tokenizer.get_vocab().items():
            self.token_bytes[i] = len(token)  # byte-level alphabet: one character per byte

    @classmethod
    def trained_on(
        cls, corpus, vocab_size: int, train_chars: int, cache_dir: str, file: str | None = None, copy_to=None
    ) -> "BPETokenizer":
        """Load `file` if given, else the cached BPE for (corpus, vocab_size, train_chars), training it on
        the corpus's training split (never on validation documents) the first time. With copy_to (the run
        directory), also save it there as tokenizer.json, so the run's checkpoints come with their tokenizer."""
        from tokenizers import Tokenizer

        if vocab_size < 512 or vocab_size % VOCAB_MULTIPLE:
            raise ValueError(f"data.tokenizer.vocab_size={vocab_size}: use a multiple of {VOCAB_MULTIPLE}, >= 512")
        if file is not None:
            if not Path(file).expanduser().is_file():
                raise FileNotFoundError(f"data.tokenizer.file={file} does not exist: point it at a tokenizer .json")
            path = Path(file).expanduser()
        else:
            path = cls.cached(corpus, vocab_size, train_chars, cache_dir)
        if copy_to is not None:
            Path(copy_to).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, Path(copy_to) / "tokenizer.json")
        return cls(Tokenizer.from_file(str(path)), vocab_size)

    @staticmethod
    def cached(corpus, vocab_size: int, train_chars: int, cache_dir: str) -> Path:
        """The cache file of this BPE, trained first if it is not there yet."""
        from filelock import FileLock

        recipe = {"corpus": corpus.fingerprint(), "vocab_size": vocab_size, "train_chars": train_chars}
        recipe["split"] = SPLIT_PATTERN
        key = hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
        path = Path(cache_dir).expanduser() / "tokenizers" / f"bpe-{vocab_size}-{key}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{path}.lock"):  # DDP ranks start together: one trains, the others wait and load
            if not path.exists():
                tokenizer = train_bpe(corpus.training_texts(train_chars), vocab_size - 1)
                tokenizer.save(f"{path}.tmp")
                os.replace(f"{path}.tmp", path)
                log.info("trained a BPE of %d tokens, saved to %s", tokenizer.get_vocab_size(), path)
        return path

    def encode(self, text: str) -> list[int]:
        # encode_batch_fast skips the character offsets encode() computes: 1.6x the tokens/s here
        return self.tokenizer.encode_batch_fast([text], add_special_tokens=False)[0].ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode([i for i in ids if i < self.tokenizer.get_vocab_size()])


def train_bpe(texts, vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer
