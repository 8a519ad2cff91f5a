"""Fine-tuning data for Hugging Face models: local jsonl of plain text or chat turns, the model's tokenizer.

Both plug into the usual TextDataModule (packing, splits, exact resume):
- HFTokenizer: a model directory's tokenizer behind our tokenizer interface. Its BOS (EOS when it has no BOS,
  as in Qwen) starts every packed row, so key 0 is a sink as in pretraining.
- ChatCorpus: a Corpus whose chat rows ({"messages": [{"role": ..., "content": ...}, ...]}) are rendered to
  text with the tokenizer's chat template; plain-text rows are read as they are.

The loss covers every token of a row (prompt turns too); there is no prompt masking.
"""

from functools import partial

import torch

from data.corpus import Corpus


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"model.hf_path={path}: no tokenizer files there ({err})") from None


class HFTokenizer:
    """vocab_size, bos_id, token_bytes, encode, decode of a Hugging Face tokenizer.

    token_bytes[i] is the UTF-8 length of token i decoded alone (0 for special tokens). A byte-level token
    holding part of a character decodes to U+FFFD, so BPB with such tokenizers is close, not exact.
    """

    def __init__(self, path: str):
        self.tok = load_tokenizer(path)
        self.bos_id = self.tok.bos_token_id if self.tok.bos_token_id is not None else self.tok.eos_token_id
        if self.bos_id is None:
            raise ValueError(f"model.hf_path={path}: the tokenizer has neither a BOS nor an EOS token to start rows")
        self.vocab_size = len(self.tok)
        pieces = self.tok.batch_decode([[i] for i in range(self.vocab_size)])
        self.token_bytes = torch.tensor([len(piece.encode()) for piece in pieces], dtype=torch.int32)
        self.token_bytes[self.tok.all_special_ids] = 0

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids) -> str:
        return self.tok.decode(ids)


class ChatCorpus(Corpus):
    """A local jsonl corpus; with messages_column set, each row's chat turns become its text_column through
    the chat template of the tokenizer at tokenizer_path."""

    def __init__(self, path: str, tokenizer_path: str, messages_column: str | None = None, **corpus_options):
        super().__init__(path, **corpus_options)
        self.tokenizer_path, self.messages_column = tokenizer_path, messages_column

    def _open(self):
        stream = super()._open()
        if self.messages_column is None:
            return stream
        tokenizer = load_tokenizer(self.tokenizer_path)
        if tokenizer.chat_template is None:
            raise ValueError(
                f"model.hf_path={self.tokenizer_path}: its tokenizer has no chat template; "
                "give plain text (data.corpus.messages_column=null)"
            )
        return stream.map(partial(render_chat, tokenizer, self.messages_column, self.text_column))


def render_chat(tokenizer, messages_column: str, text_column: str, row: dict) -> dict:
    return {text_column: tokenizer.apply_chat_template(row[messages_column], tokenize=False)}
