"""The head-balance callback logs Gu et al.'s sink ratio per layer and overall, with the threshold of its config."""

from pathlib import Path

import pytest
from helpers import csv_metrics
from lightning.pytorch.loggers import CSVLogger
from test_observability import N_HEAD, collapsed_module, fit

from callbacks.head_balance import HeadBalanceMonitor

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize(("collapse", "threshold", "expected"), [(True, 0.3, 0.75), (False, 0.3, 1.0), (False, 0.6, 0)])
def test_sink_ratio_is_logged_per_layer_and_overall(tmp_path, collapse, threshold, expected):
    """Collapsed: one head of every layer has gate σ(16) ≈ 1, the other three σ(-16) ≈ 0, so 3 of 4 heads sink.
    Balanced: every gate is σ(0) = 0.5, attention on the sink 0.5: above a threshold of 0.3, below one of 0.6."""
    module = collapsed_module(collapse)
    fit(module, tmp_path, CSVLogger(tmp_path, name="csv", version=""), [HeadBalanceMonitor(sink_threshold=threshold)])
    m = csv_metrics(tmp_path / "csv")
    assert N_HEAD == 4 and m["heads/sink_ratio"] == [expected, expected]  # steps 2 and 4, as the CV
    assert m["heads/sink_ratio/L00"] == m["heads/sink_ratio/L01"] == [expected, expected]
    assert len(m["heads/sink_ratio"]) == len(m["heads/cv_mean"])


def test_threshold_comes_from_the_config_and_is_checked(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.output_dir={tmp_path}", "trainer.val_check_interval=10"])
        assert cfg.callbacks.head_balance.sink_threshold == 0.3  # Gu et al.'s epsilon by default
        cfg.callbacks.head_balance.sink_threshold = 0.5
    assert instantiate(cfg.callbacks.head_balance).sink_threshold == 0.5
    with pytest.raises(ValueError, match=r"callbacks.head_balance.sink_threshold=30: must be in \(0, 1\)"):
        HeadBalanceMonitor(sink_threshold=30)
