"""bench/throughput.py builds its model, optimizer, aux loss and strategies from conf/ composed through Hydra (as
train.py does): interpolations resolved, --set applied as Hydra overrides, a typo a Hydra error."""

import argparse
import importlib.util
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("throughput", ROOT / "bench" / "throughput.py")
throughput = importlib.util.module_from_spec(spec)
spec.loader.exec_module(throughput)


def bench_args(**changes) -> argparse.Namespace:
    args = dict(model="tiny", set=["n_layer=2", "seq_len=32"], backend="reference", activation_checkpointing=False)
    args.update(vocab=128, aux_scope="local", compile=False, bucket_cap_mb=None)
    return argparse.Namespace(**{**args, **changes})


def test_the_module_is_the_composed_config_with_the_bench_choices():
    module = throughput.make_module(bench_args(), "sink", 1e-4)
    cfg = module.model.cfg
    assert (cfg.n_layer, cfg.seq_len, cfg.n_embd, cfg.vocab_size) == (2, 32, 128, 128)  # n_embd from conf/model/tiny
    assert (cfg.attention, cfg.backend, cfg.fp8) == ("sink", "reference", None)  # ${attention.name}, --backend
    assert module.aux_config.weight == 1e-4 and module.aux_config.scope == "local"
    assert module.hparams.optim == throughput.OmegaConf.to_container(throughput.composed([]).optim)


def test_a_bad_set_is_a_hydra_error_naming_the_key():
    with pytest.raises(ConfigCompositionException, match="n_layr"):
        throughput.make_module(bench_args(set=["n_layr=2"]), "gated", 0.0)


def test_ddp_options_come_from_conf_trainer_ddp():
    options = throughput.ddp_options(bench_args())
    assert options["bucket_cap_mb"] == 200 and options["static_graph"] is True
    assert throughput.ddp_options(bench_args(bucket_cap_mb=50))["bucket_cap_mb"] == 50


def test_the_fixed_batches_are_contiguous_as_the_loaders_are():
    (batch,) = throughput.fixed_batches(bench_args(batch_size=2), seq_len=8, n=1)
    assert all(t.is_contiguous() and t.shape == (2, 8) for t in batch.values())
