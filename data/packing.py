"""Documents -> rows of seq_len + 1 tokens, each starting with BOS (position 0 is the sink).

Documents are joined as [BOS] doc [BOS] doc ...; the stream is cut into rows, and a row that would start
inside a document gets a BOS of its own. Tokenization happens here, so inside the dataloader workers.
"""

from collections import deque

import torch
from torch.utils.data import IterableDataset

FRESH = {"epoch": 0, "docs": None, "skip": 0}
ENDED = {"epoch": None, "docs": None, "skip": 0}  # a worker with less than a row: it yields nothing


class PackedRows(IterableDataset):
    """Rows of packed documents; `documents(epoch)` gives the (resumable) document stream of an epoch.

    The position saved by state_dict is small: the epoch, the document stream's state just before the
    first document the next row draws from, and how many of that document's tokens earlier rows used.
    Restoring re-reads and re-tokenizes that document, so no token lists travel with the state.
    epochs=None streams forever (training); 1 gives one pass (validation). read(stream) iterates a document stream.
    """

    def __init__(
        self, documents, tokenizer, seq_len: int, text_column: str = "text", epochs: int | None = None, read=iter
    ):
        self.documents, self.tokenizer, self.text_column = documents, tokenizer, text_column
        self.read = read  # iterates a document stream (Corpus.read: a damaged file fails naming it)
        self.width, self.epochs = seq_len + 1, epochs
        self.token_bytes = tokenizer.token_bytes
        self.position = dict(FRESH)  # where the next row starts
        self.resume_from = None  # set by load_state_dict, used by the next __iter__

    def state_dict(self) -> dict:
        return dict(self.position)

    def load_state_dict(self, state: dict):
        self.resume_from, self.position = dict(state), dict(state)

    def __iter__(self):
        start, self.resume_from = self.resume_from or dict(FRESH), None
        self.position = dict(start)
        epoch = start["epoch"]
        while epoch is not None and (self.epochs is None or epoch < self.epochs):
            resumed = epoch == start["epoch"] and (start["docs"], start["skip"]) != (None, 0)
            rows = yield from self.epoch_rows(epoch, start if resumed else FRESH)
            if rows == 0 and not resumed:
                # No shard fell to this worker, or its documents hold less than a row: it yields nothing (the
                # other workers and ranks go on) instead of reading the same documents forever, and stays
                # ended in a resumed run too.
                self.position = dict(ENDED)
                return
            epoch += 1

    def epoch_rows(self, epoch: int, start: dict):
        """Yield the rows of one epoch from `start`; return how many. The tokens left at the end of the epoch
        (less than a row) are dropped."""
        bos = self.tokenizer.bos_id
        docs = self.documents(epoch)
        docs.load_state_dict(start["docs"])  # None: from the first document
        pending = deque()  # (stream state before the document, [BOS] + its tokens), not fully used yet
        offset = start["skip"]  # tokens of pending[0] already in rows
        available = -offset  # tokens in pending not in rows yet
        state_before, rows = start["docs"], 0
        for doc in self.read(docs):
            tokens = [bos] + self.tokenizer.encode(doc[self.text_column])
            pending.append((state_before, tokens))
            available += len(tokens)
            state_before = docs.state_dict()
            # A row starting on a document's BOS takes width tokens; one starting inside a document
            # takes width - 1 and gets a BOS in front.
            while available >= self.width - (offset > 0):
                row = [] if offset == 0 else [bos]
                while len(row) < self.width:
                    tokens = pending[0][1]
                    take = min(self.width - len(row), len(tokens) - offset)
                    row += tokens[offset : offset + take]
                    offset += take
                    available -= take
                    if offset == len(tokens):
                        pending.popleft()
                        offset = 0
                self.position = {"epoch": epoch, "docs": pending[0][0] if pending else state_before, "skip": offset}
                rows += 1
                yield self.as_example(torch.tensor(row))
        self.position = {"epoch": epoch + 1, "docs": None, "skip": 0}
        return rows

    def as_example(self, row: torch.Tensor) -> dict:
        targets = row[1:]
        return {"input_ids": row[:-1], "targets": targets, "target_bytes": self.token_bytes[targets]}
