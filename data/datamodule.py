"""The LightningDataModule: a Corpus, a tokenizer, packed rows, one loader per split.

Every source (FineWeb-Edu on the hub, a local copy, local files, the offline default) goes through the
same path: Corpus.documents (a `datasets` stream split across DDP ranks, then dataloader workers) ->
PackedRows (tokenized in the workers) -> ConsumedStateLoader (exact resume). Batches are dicts of
input_ids, targets and target_bytes (UTF-8 bytes per target token, for BPB), each (batch_size, seq_len).

Before the first step, every rank reads as many batches as the run needs from each of its loaders, so that a
split too small for some rank fails at once with a message, and every rank runs the same number of validation
batches (a rank with fewer would leave the others waiting in a collective).
"""

import itertools
import logging
from functools import partial

import lightning as L
import torch
from lightning.pytorch.accelerators import CPUAccelerator

from data.corpus import Corpus, node_split_strategy
from data.loader import ConsumedStateLoader, FirstBatchesLoader
from data.packing import PackedRows

log = logging.getLogger(__name__)

# Dataloader workers per rank for num_workers=auto on a GPU: tokenizing in the training process costs ~30% of
# the GPU's throughput. On the CPU, auto is 0: workers would compete with training for the same cores.
GPU_WORKERS = 4


class TextDataModule(L.LightningDataModule):
    def __init__(
        self, corpus: Corpus, tokenizer, seq_len: int, batch_size: int, num_workers: int | str = "auto", seed: int = 0
    ):
        super().__init__()
        workers_ok = num_workers == "auto" or isinstance(num_workers, int) and num_workers >= 0
        if batch_size < 1 or seq_len < 1 or not workers_ok:
            given = f"data.batch_size={batch_size}, data.seq_len={seq_len}, data.num_workers={num_workers}"
            raise ValueError(f"{given}: the first two must be >= 1, num_workers >= 0 or auto")
        self.corpus, self.tokenizer = corpus, tokenizer
        self.seq_len, self.batch_size, self.num_workers, self.seed = seq_len, batch_size, num_workers, seed
        self.train_loader = None
        self.val_batches = None  # validation batches per rank, the same on every rank (set by setup)

    @property
    def workers(self) -> int:
        """data.num_workers; auto: GPU_WORKERS when the trainer is on a GPU, else 0 (also without a trainer)."""
        if self.num_workers != "auto":
            return self.num_workers
        on_cpu = self.trainer is None or isinstance(self.trainer.accelerator, CPUAccelerator)
        return 0 if on_cpu else GPU_WORKERS

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
        if self.trainer is not None and stage in ("fit", "validate"):
            self.check_splits(train=stage == "fit")

    def check_splits(self, train: bool):
        """On every rank before the first step: fail now, naming the fix, when a split holds less than a row for
        some rank (a training rank would wait forever; validation would fail steps later), and cap validation at
        the fewest batches any rank has, up to trainer.limit_val_batches. Reads only the batches the run needs, never
        a whole split to count it (unless limit_val_batches is a fraction: all of it)."""
        limit = batch_limit(self.trainer.limit_val_batches)
        validate = limit != 0
        if validate and self.corpus.val_permille == 0:
            raise ValueError("data.corpus.val_permille=0 holds out no documents: set trainer.limit_val_batches=0")
        train_batches = self.count_batches("train", 1) if train else 1
        val_batches = self.count_batches("validation", limit) if validate else 0
        # A rank with no validation row measures its split (small: it holds no row), so the error can say how small.
        val_size = self.split_size("validation") if validate and val_batches == 0 else [0, 0]
        ranks = self.all_ranks([train_batches, val_batches, *val_size])
        row = f"no row of seq_len + 1 = {self.seq_len + 1} tokens"
        spread = f"over {len(ranks)} ranks x {self.split_workers('train')} dataloader workers"
        if empty := [r for r, counts in enumerate(ranks) if counts[0] == 0]:
            raise ValueError(
                f"the training split is too small: rank {empty[0]} finds {row} {spread}: use a larger corpus, "
                "fewer data.num_workers or devices, or a shorter model.seq_len"
            )
        if not validate:
            return
        self.val_batches = min(counts[1] for counts in ranks)
        if self.val_batches == 0:
            r, (_, _, docs, tokens) = next((r, counts) for r, counts in enumerate(ranks) if counts[1] == 0)
            raise ValueError(
                f"the validation split is too small: rank {r} has {docs} validation documents ({tokens} tokens), "
                f"{row} over {len(ranks)} ranks: raise data.corpus.val_permille (now {self.corpus.val_permille}), "
                "or use fewer devices, or a shorter model.seq_len (trainer.limit_val_batches=0: no validation)"
            )
        if self.trainer.global_rank == 0 and (limit is None or self.val_batches < limit):
            log.info("validation: %d batches on every rank, all that some rank's split holds", self.val_batches)

    def all_ranks(self, values: list[int]) -> list[list[int]]:
        """`values` of every rank, by rank (one all-gather)."""
        strategy = self.trainer.strategy
        return strategy.all_gather(torch.tensor(values, device=strategy.root_device)).view(-1, len(values)).tolist()

    def count_batches(self, split: str, limit: int | None) -> int:
        """The batches (at most `limit`) this rank's loader of `split` yields: read, since how many rows the
        documents give depends on how they fall to the workers (each drops its last partial row)."""
        return sum(1 for _ in itertools.islice(self.loader(split, *self.trainer_rank_and_world()), limit))

    def split_size(self, split: str) -> list[int]:
        """[documents, tokens] of this rank's `split`, BOS included: reads all of it."""
        rank, world = self.trainer_rank_and_world()
        docs = self.corpus.documents(split, self.seed, rank=rank, world_size=world)
        lengths = [1 + len(self.tokenizer.encode(doc[self.corpus.text_column])) for doc in self.corpus.read(docs)]
        return [len(lengths), sum(lengths)]

    def rows(self, split: str, rank: int = 0, world_size: int = 1) -> PackedRows:
        documents = partial(self.corpus.documents, split, self.seed, rank=rank, world_size=world_size)
        epochs = None if split == "train" else 1  # training streams on (epoch after epoch); validation is one pass
        text = self.corpus.text_column
        return PackedRows(documents, self.tokenizer, self.seq_len, text, epochs=epochs, read=self.corpus.read)

    def split_workers(self, split: str) -> int:
        """Validation reads one small pass with at most one worker: spread over several, a rank's few documents
        could leave every worker short of a row (each drops its partial last row) although together they hold
        some; one worker still keeps the tokenization out of the training process."""
        return self.workers if split == "train" else min(self.workers, 1)

    def loader(self, split: str, rank: int = 0, world_size: int = 1, max_batches: int | None = None):
        """The loader of one split for one rank; train_dataloader / val_dataloader use the trainer's rank.
        Validation yields at most max_batches batches (None: all)."""
        rows = self.rows(split, rank, world_size)
        workers = self.split_workers(split)
        options = dict(batch_size=self.batch_size, num_workers=workers, pin_memory=torch.cuda.is_available())
        if split == "train":
            return ConsumedStateLoader(rows, **options)
        return FirstBatchesLoader(rows, max_batches=max_batches, **options)

    def train_dataloader(self):
        self.train_loader = self.loader("train", *self.trainer_rank_and_world())
        return self.train_loader

    def val_dataloader(self):
        return self.loader("validation", *self.trainer_rank_and_world(), max_batches=self.val_batches)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        if self.trainer is not None and self.trainer.training:
            self.train_loader.batch_consumed()  # so a checkpoint saves the position after this batch
        return batch


def batch_limit(limit_val_batches: int | float) -> int | None:
    """trainer.limit_val_batches as a number of batches: None for a fraction (a streamed split has no length, so
    Lightning takes 1.0 as all of it)."""
    return None if isinstance(limit_val_batches, float) and limit_val_batches > 0 else int(limit_val_batches)
