"""Tokens per second the training loader delivers (read, tokenize, pack, collate, resumable state), on the
offline corpus, for the byte tokenizer and a BPE trained on that corpus, with 1 and 4 dataloader workers.

python bench/data_throughput.py                      # byte + BPE 65,536; 1 and 4 workers; 20 s each
python bench/data_throughput.py --workers 1 2 4 8 --seconds 30

The loader is the one training uses (TextDataModule.loader("train")), consumed like Lightning does. One
H100 training the 0.6b model needs about 150k tokens/s; workers only scale up to the number of cores.
"""

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

from data.corpus import Corpus  # noqa: E402
from data.datamodule import TextDataModule  # noqa: E402
from data.offline import build_offline_corpus  # noqa: E402
from data.tokenizer import BPETokenizer, ByteTokenizer  # noqa: E402


def tokens_per_second(data: TextDataModule, seconds: float, warmup_batches: int = 5) -> float:
    loader = data.loader("train")
    batches = iter(loader)
    for _ in range(warmup_batches):  # worker start-up, first shard opened
        next(batches)
        loader.batch_consumed()
    tokens, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        tokens += next(batches)["input_ids"].numel()
        loader.batch_consumed()
    return tokens / (time.perf_counter() - started)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizers", nargs="+", default=["byte", "bpe"], choices=["byte", "bpe"])
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--seconds", type=float, default=20.0, help="measured time per setting")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=65536, help="of the BPE")
    parser.add_argument("--cache-dir", default=os.environ.get("SINKAWARE_CACHE_DIR", ".cache"))
    args = parser.parse_args()

    corpus = Corpus(str(build_offline_corpus(args.cache_dir)))
    for name in args.tokenizers:
        if name == "bpe":
            started = time.perf_counter()
            tokenizer = BPETokenizer.trained_on(corpus, args.vocab_size, 2_000_000_000, args.cache_dir)
            print(f"BPE {args.vocab_size}: ready in {time.perf_counter() - started:.1f} s (trained or loaded)")
        else:
            tokenizer = ByteTokenizer()
        for workers in args.workers:
            data = TextDataModule(corpus, tokenizer, args.seq_len, args.batch_size, num_workers=workers)
            rate = tokens_per_second(data, args.seconds)
            print(f"{name:>4}  workers={workers}  {rate:12,.0f} tokens/s", flush=True)
    print(f"(this machine: {os.cpu_count()} CPU cores)")


if __name__ == "__main__":
    main()
