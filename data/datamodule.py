"""The LightningDataModule: a Corpus, a tokenizer, packed rows, one loader per split.

Every source (FineWeb-Edu on the hub, a local copy, local files, the offline default) goes through the
same path: Corpus.documents (a `datasets` stream split across DDP ranks, then dataloader workers) ->
PackedRows (tokenized in the workers) -> ConsumedStateLoader (exact resume). Batches are dicts of
input_ids, targets and target_bytes (UTF-8 bytes per target token, for BPB), each (batch_size, seq_len).
"""

import logging
from functools import partial

import lightning as L
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from data.corpus import Corpus, node_split_strategy
from data.loader import ConsumedStateLoader
from data.packing import PackedRows

log = logging.getLogger(__name__)


class TextDataModule(L.LightningDataModule):
    def __init__(self, corpus: Corpus, tokenizer, seq_len: int, batch_size: int, num_workers: int = 0, seed: int = 0):
        super().__init__()
        if batch_size < 1 or seq_len < 1 or num_workers < 0:
            given = f"data.batch_size={batch_size}, data.seq_len={seq_len}, data.num_workers={num_workers}"
            raise ValueError(f"{given}: the first two must be >= 1, num_workers >= 0")
        self.corpus, self.tokenizer = corpus, tokenizer
        self.seq_len, self.batch_size, self.num_workers, self.seed = seq_len, batch_size, num_workers, seed
        self.train_loader = None

    def trainer_rank_and_world(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)

    def setup(self, stage: str):
        self.corpus.check()
        rank, world = self.trainer_rank_and_world()
        if world > 1 and rank == 0 and node_split_strategy(self.corpus.stream.num_shards, world) == "examples":
            log.warning(
                "the corpus has %d shards, which do not divide over %d ranks: every rank reads all of them; "
                "store it in a multiple of %d parquet files or row groups to read each once",
                self.corpus.stream.num_shards,
                world,
                world,
            )

    def rows(self, split: str, rank: int = 0, world_size: int = 1) -> PackedRows:
        documents = partial(self.corpus.documents, split, self.seed, rank=rank, world_size=world_size)
        epochs = None if split == "train" else 1  # training streams on (epoch after epoch); validation is one pass
        return PackedRows(documents, self.tokenizer, self.seq_len, self.corpus.text_column, epochs=epochs)

    def loader(self, split: str, rank: int = 0, world_size: int = 1) -> StatefulDataLoader:
        """The loader of one split for one rank; train_dataloader / val_dataloader use the trainer's rank."""
        cls = ConsumedStateLoader if split == "train" else StatefulDataLoader
        return cls(
            self.rows(split, rank, world_size),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self):
        self.train_loader = self.loader("train", *self.trainer_rank_and_world())
        return self.train_loader

    def val_dataloader(self):
        return self.loader("validation", *self.trainer_rank_and_world())

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        if self.trainer is not None and self.trainer.training:
            self.train_loader.batch_consumed()  # so a checkpoint saves the position after this batch
        return batch
