"""bench/e2e.py on the CPU: train.py with checkpoints and validations, then bench/throughput.py, in one invocation;
the end-to-end figure counts every token trained after the warm-up, and the benchmark compiles nothing that train.py
compiled (the same graphs under the same global settings: torch's compile cache serves it)."""

import ast
import json
import os
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
STEPS, WARMUP, BATCH, SEQ = 16, 4, 2, 64


# At exit, each process prints its compile-cache counters: which compiled graphs it found in torch's cache.
CACHE_COUNTERS = """
import atexit, os, sys


def report():
    if "torch._dynamo" in sys.modules:
        from torch._dynamo.utils import counters

        found = {k: v for k, v in counters["inductor"].items() if k.startswith("fxgraph_cache")}
        print("compile cache of", os.path.basename(sys.argv[0]), found, flush=True)


atexit.register(report)
"""


@pytest.mark.slow
def test_e2e_reports_train_py_and_the_benchmark_side_by_side(tmp_path):
    out, run_dir, site = tmp_path / "e2e.json", tmp_path / "run", tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(CACHE_COUNTERS)
    bench = [sys.executable, str(ROOT / "bench" / "e2e.py"), f"--steps={STEPS}", f"--warmup={WARMUP}"]
    bench += ["--throughput-steps=4", f"--run-dir={run_dir}", f"--out={out}"]
    tiny = ["model.n_layer=2", "model.n_embd=64", f"model.seq_len={SEQ}", f"data.batch_size={BATCH}", "compile=true"]
    tiny += ["trainer.limit_val_batches=2", "trainer.log_every_n_steps=4"]
    env = {**os.environ, "SINKAWARE_CACHE_DIR": str(ROOT / ".cache"), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    env.update(TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"), PYTHONPATH=str(site))  # an empty cache to start
    done = subprocess.run([*bench, *tiny], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    caches = defaultdict(Counter)  # script -> its processes' counters, summed
    for script, found in re.findall(r"compile cache of (\S+) (\{.*\})", done.stdout):
        caches[script].update(ast.literal_eval(found))
    assert caches["train.py"]["fxgraph_cache_miss"] > 0  # compiled, and cached, by train.py
    assert caches["throughput.py"]["fxgraph_cache_hit"] > 0 and caches["throughput.py"]["fxgraph_cache_miss"] == 0

    result = json.loads(out.read_text())
    e2e, throughput = result["e2e"], result["throughput"]
    assert e2e["steps"] == [WARMUP, STEPS]
    assert e2e["tokens"] == (STEPS - WARMUP) * BATCH * SEQ  # every step after the warm-up, none twice
    assert e2e["tokens_per_s"] == pytest.approx(e2e["tokens"] / e2e["seconds"])
    assert e2e["validations"] == 2 and e2e["checkpoint_every"] == STEPS // 4
    # the five slowest timed steps: after the warm-up, and not the step after the mid-run validation (not timed)
    timed = {str(step) for step in range(WARMUP + 1, STEPS + 1)} - {str(STEPS // 2 + 1)}
    assert len(e2e["slowest_steps_ms"]) == 5 and set(e2e["slowest_steps_ms"]) <= timed and e2e["median_step_ms"] > 0
    assert throughput["loop"] == "lightning" and throughput["tokens_per_s"] > 0
    assert result["ratio"] == pytest.approx(e2e["tokens_per_s"] / throughput["tokens_per_s"])
    assert "data/tokenizer=bpe" in result["overrides"]  # the real data path by default
    assert f"| end to end / benchmark | {result['ratio']:.1%} |" in done.stdout
    assert not (run_dir / "checkpoints").exists()  # written during the run, deleted after it
    assert (run_dir / "csv" / "metrics.csv").is_file()
