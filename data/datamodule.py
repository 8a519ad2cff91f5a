"""Streaming text -> packed rows of seq_len + 1 tokens, each starting with BOS (position 0 is the sink).

One code path for FineWeb-Edu on the hub, a local copy, and the offline default corpus: a Hugging Face
`datasets` stream, split across DDP ranks (and, by `datasets`, across dataloader workers), documents
held out for validation by a hash of their id, tokenized inside the dataloader workers.
"""

import hashlib

import lightning as L
import torch
from torch.utils.data import IterableDataset
from torchdata.stateful_dataloader import StatefulDataLoader


def is_validation(doc_id: str, val_permille: int) -> bool:
    """A fixed, content-independent split: a document is in validation iff its id hashes below the cut."""
    return int(hashlib.sha1(doc_id.encode()).hexdigest()[:8], 16) % 1000 < val_permille


class PackedRows(IterableDataset):
    """Documents joined with BOS, cut into rows of seq_len + 1 tokens; a row never starts mid-air:
    when the stream is inside a document at a row boundary, the row gets a BOS of its own.

    Its state (the document stream's position and the tokens left over) is what StatefulDataLoader saves
    per worker, so a restored loader continues with the next row.
    """

    def __init__(self, docs, tokenizer, seq_len: int, text_column: str = "text"):
        self.docs, self.tokenizer, self.seq_len, self.text_column = docs, tokenizer, seq_len, text_column
        self.token_bytes = tokenizer.token_bytes
        self.leftover: list[int] = []

    def __iter__(self):
        bos, width = self.tokenizer.bos_id, self.seq_len + 1
        for doc in self.docs:
            self.leftover += [bos] + self.tokenizer.encode(doc[self.text_column])
            while len(self.leftover) >= width:
                if self.leftover[0] != bos:  # continuing a document: give the row its own sink
                    self.leftover.insert(0, bos)
                row, self.leftover = self.leftover[:width], self.leftover[width:]
                yield self.as_example(torch.tensor(row))
        self.leftover = []

    def as_example(self, row: torch.Tensor) -> dict:
        targets = row[1:]
        return {"input_ids": row[:-1], "targets": targets, "target_bytes": self.token_bytes[targets]}

    def state_dict(self) -> dict:
        return {"docs": self.docs.state_dict(), "leftover": list(self.leftover)}

    def load_state_dict(self, state: dict):
        self.docs.load_state_dict(state["docs"])
        self.leftover = list(state["leftover"])


class TextDataModule(L.LightningDataModule):
    def __init__(
        self,
        path: str,
        tokenizer,
        seq_len: int,
        batch_size: int,
        name: str | None = None,
        data_files: str | list[str] | None = None,
        text_column: str = "text",
        id_column: str = "id",
        val_permille: int = 50,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        self.path, self.name, self.data_files = str(path), name, data_files
        self.tokenizer, self.seq_len, self.batch_size = tokenizer, seq_len, batch_size
        self.text_column, self.id_column = text_column, id_column
        self.val_permille, self.num_workers, self.seed = val_permille, num_workers, seed

    def documents(self, validation: bool):
        from datasets import load_dataset
        from datasets.distributed import split_dataset_by_node

        docs = load_dataset(self.path, name=self.name, data_files=self.data_files, split="train", streaming=True)
        keep = self.val_permille
        docs = docs.filter(lambda d: is_validation(d[self.id_column], keep) == validation)
        if self.trainer is not None and self.trainer.world_size > 1:
            docs = split_dataset_by_node(docs, rank=self.trainer.global_rank, world_size=self.trainer.world_size)
        return docs

    def loader(self, validation: bool) -> StatefulDataLoader:
        rows = PackedRows(self.documents(validation), self.tokenizer, self.seq_len, self.text_column)
        return StatefulDataLoader(
            rows, batch_size=self.batch_size, num_workers=self.num_workers, pin_memory=torch.cuda.is_available()
        )

    def train_dataloader(self):
        return self.loader(validation=False)

    def val_dataloader(self):
        return self.loader(validation=True)
