"""Exact resume: after a save at batch k, batches k+1.. equal the uninterrupted run's, bit for bit, at the
loader level and through Lightning's Trainer.fit with a checkpoint (which fetches one batch ahead)."""

import lightning as L
import pytest
import torch
from helpers import quiet_trainer
from test_data import write_mirror

from data.corpus import Corpus
from data.datamodule import TextDataModule
from data.tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
    # 16 documents, ~26 batches of 4 x 65 tokens per epoch: the runs below cross epoch boundaries.
    return Corpus(str(write_mirror(tmp_path_factory.mktemp("fineweb-edu"), docs_per_file=4)), name="sample-10BT")


def datamodule(corpus, num_workers: int) -> TextDataModule:
    return TextDataModule(corpus, ByteTokenizer(), seq_len=64, batch_size=4, num_workers=num_workers, seed=3)


def first(loader, n: int) -> list[torch.Tensor]:
    out = []
    for batch in loader:
        if len(out) == n:
            break
        out.append(batch["input_ids"])
    return out


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_resumes_exactly_where_training_stopped(corpus, num_workers):
    k, n = 23, 40
    data = datamodule(corpus, num_workers)
    reference = first(data.loader("train"), k + n)
    assert len({tuple(b.flatten().tolist()) for b in reference}) == k + n  # no repeats inside the reference

    loader = data.loader("train")
    batches = iter(loader)
    for _ in range(k):
        next(batches)
        loader.batch_consumed()
    next(batches)  # fetched ahead (as Lightning does) but never consumed: must not count
    state = loader.state_dict()
    del batches, loader

    resumed = data.loader("train")
    resumed.load_state_dict(state)
    iter(resumed)
    state = resumed.state_dict()  # saved again before a single step (e.g. preempted while starting up)
    resumed = data.loader("train")
    resumed.load_state_dict(state)
    again = first(resumed, n)
    assert all(torch.equal(a, b) for a, b in zip(again, reference[k:], strict=True))
    with pytest.raises(ValueError, match=f"data.num_workers={num_workers}"):  # another worker count: refused
        datamodule(corpus, 1 - num_workers // 2).loader("train").load_state_dict(state)


class Recorder(L.LightningModule):
    """A module that only records the batches its training step sees."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["input_ids"].clone())
        return (self.weight * batch["input_ids"].float().mean()).sum()

    def validation_step(self, batch, batch_idx):
        pass  # validation batches come from another loader and must not move the training position

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def fit(corpus, num_workers: int, max_steps: int, root, ckpt_path=None) -> list[torch.Tensor]:
    module = Recorder()
    trainer = quiet_trainer(
        max_steps=max_steps,
        default_root_dir=root,
        val_check_interval=4,
        check_val_every_n_epoch=None,
        limit_val_batches=2,
        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=root, every_n_train_steps=max_steps, save_last=True)],
    )
    trainer.fit(module, datamodule=datamodule(corpus, num_workers), ckpt_path=ckpt_path)
    return module.seen


@pytest.mark.parametrize("num_workers", [0, 2])
def test_trainer_fit_resumed_from_a_checkpoint_sees_the_uninterrupted_batches(corpus, tmp_path, num_workers):
    k, n = 9, 30
    uninterrupted = fit(corpus, num_workers, k + n, tmp_path / "full")
    assert len(uninterrupted) == k + n
    before = fit(corpus, num_workers, k, tmp_path / "cut")
    after = fit(corpus, num_workers, k + n, tmp_path / "cut", ckpt_path=str(tmp_path / "cut" / "last.ckpt"))
    assert len(before) == k and len(after) == n
    assert all(torch.equal(a, b) for a, b in zip(before + after, uninterrupted, strict=True))


def resume_on_two_ranks(rank: int, corpus: Corpus, tmp, k: int, n: int):
    """One DDP rank (gloo, CPU): record k + n batches; then consume k, save, restore, compare the next n."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=2)
    data = datamodule(corpus, num_workers=0)
    reference = first(data.loader("train", rank, 2), k + n)
    loader = data.loader("train", rank, 2)
    batches = iter(loader)
    for _ in range(k + 1):  # k consumed, one fetched ahead
        next(batches)
    for _ in range(k):
        loader.batch_consumed()
    state = loader.state_dict()  # every rank calls it, as when Lightning saves; only rank 0 writes the file
    if rank == 0:
        torch.save(state, tmp / "ckpt.pt")
    torch.distributed.barrier()
    resumed = data.loader("train", rank, 2)
    resumed.load_state_dict(torch.load(tmp / "ckpt.pt", weights_only=False))
    torch.save({"reference": reference, "resumed": first(resumed, n)}, tmp / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_every_rank_resumes_its_own_position(corpus, tmp_path):
    k, n = 5, 12
    torch.multiprocessing.start_processes(
        resume_on_two_ranks, args=(corpus, tmp_path, k, n), nprocs=2, start_method="spawn"
    )  # not fork: a fork of this many-threaded pytest process can deadlock in torch's thread pools
    runs = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert not torch.equal(runs[0]["reference"][0], runs[1]["reference"][0])  # the ranks read different data
    for run in runs:
        assert all(torch.equal(a, b) for a, b in zip(run["resumed"], run["reference"][k:], strict=True))
