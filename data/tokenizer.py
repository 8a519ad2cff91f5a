"""Tokenizers behind one interface: encode(text) -> ids, bos_id, vocab_size, token_bytes.

token_bytes[i] is the number of UTF-8 bytes token i stands for (0 for special tokens): BPB needs it.
"""

import torch


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, BOS = 256. Vocabulary padded to a multiple of 64 for the matmuls."""

    bos_id = 256

    def __init__(self, pad_to: int = 64):
        self.vocab_size = -(-257 // pad_to) * pad_to

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    @property
    def token_bytes(self) -> torch.Tensor:
        counts = torch.zeros(self.vocab_size, dtype=torch.int32)
        counts[:256] = 1
        return counts
