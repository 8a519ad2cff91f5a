"""Loaders of packed rows. ConsumedStateLoader (training): a StatefulDataLoader whose saved state is the position
after the last batch training CONSUMED. FirstBatchesLoader (validation): at most a given number of batches.

Lightning saves the train loader's state_dict() in its checkpoints and restores it on resume, but its
data fetcher pulls one batch ahead, so a plain loader's state is one batch too far and a resumed run
skips a batch. ConsumedStateLoader keeps the state after each yielded batch until that batch is consumed (the
DataModule reports each one), and saves the state of every DDP rank, since only rank 0 writes the file.
"""

import copy
import itertools

import torch.distributed as dist
from torchdata.stateful_dataloader import StatefulDataLoader

import compat


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ConsumedStateLoader(StatefulDataLoader):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.states = None  # batches yielded in this iteration -> loader state after them
        self.consumed = 0

    def __iter__(self):
        batches = super().__iter__()
        self.states, self.consumed = {0: copy.deepcopy(super().state_dict())}, 0
        for yielded, batch in enumerate(batches, start=1):
            self.states[yielded] = copy.deepcopy(super().state_dict())
            yield batch

    def batch_consumed(self):
        """Called once per batch the training step takes; forgets states no checkpoint can ask for."""
        self.states.pop(self.consumed, None)
        self.consumed += 1

    def state_dict(self) -> dict:
        """{"ranks": [state of rank 0, rank 1, ...]}, each as of its last consumed batch. Every rank calls
        this when Lightning saves a checkpoint, so the gather is safe."""
        mine = super().state_dict() if self.states is None else self.states[self.consumed]
        rank, world = rank_and_world()
        ranks = [None] * world
        if world > 1:
            dist.all_gather_object(ranks, mine)
        else:
            ranks[0] = mine
        return {"ranks": ranks}

    def load_state_dict(self, state: dict):
        rank, world = rank_and_world()
        if len(state["ranks"]) != world:
            raise ValueError(
                f"the checkpoint's data position was saved by {len(state['ranks'])} ranks, this run has {world}: "
                "resume with the same number of devices and nodes to continue the data stream exactly"
            )
        mine = state["ranks"][rank]
        saved_workers = compat.loader_state_workers(mine)
        if saved_workers != self.num_workers:
            raise ValueError(
                f"the checkpoint's data position was saved with data.num_workers={saved_workers}, this run has "
                f"{self.num_workers}: resume with data.num_workers={saved_workers} to continue the stream exactly"
            )
        super().load_state_dict(mine)


class FirstBatchesLoader(StatefulDataLoader):
    """The first `max_batches` batches (None: all). Validation takes the same number on every DDP rank: each batch
    is a collective (DDP broadcasts buffers, FSDP gathers weights), and a rank with fewer would leave the others
    waiting."""

    def __init__(self, *args, max_batches: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_batches = max_batches

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.max_batches)
