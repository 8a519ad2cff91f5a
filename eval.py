"""Evaluate trained checkpoints: BPB, head importance and CV, the head-ablation curve, harness tasks, samples.

python eval.py ckpt=PATH                              # report: BPB, heatmap, CV, ablation curve, report.json
python eval.py run=NAME                               # the same for the last.ckpt of a run
python eval.py ckpt=PATH tasks=[hellaswag,arc_easy]   # lm-evaluation-harness tasks as well
python eval.py eval_mode=compare ckpts=[A.ckpt,B.ckpt]   # side-by-side heatmaps, ablation curves, CV/BPB table
python eval.py eval_mode=sample ckpt=PATH prompt="..."   # text from the model (KV cache)
python eval.py eval_mode=diagnose hf_model=DIR        # importance heatmap and CV of a Hugging Face model

The work is done by the evaluation/ package; this file picks the action of the chosen eval_mode.
"""

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from evaluation.loading import Runtime, checkpoint_path, label_of
from evaluation.report import compare, diagnose, failures, report
from evaluation.sample import sample

log = logging.getLogger("eval")


def run_report(cfg: DictConfig, out_dir: Path, runtime: Runtime) -> None:
    path = checkpoint_path(cfg)
    exit_on_failures([report(cfg, path, out_dir, runtime, label_of(path))])


def run_compare(cfg: DictConfig, out_dir: Path, runtime: Runtime) -> None:
    exit_on_failures(compare(cfg, [Path(path).expanduser() for path in cfg.ckpts], out_dir, runtime))


def exit_on_failures(reports: list[dict]) -> None:
    """A part that failed (harness tasks) was recorded in report.json and the rest measured: now exit 1 with it."""
    if error := failures(reports):
        raise ValueError(error)


ACTIONS = {
    "report": run_report,
    "compare": run_compare,
    "sample": lambda cfg, out_dir, runtime: sample(cfg, runtime),
    "diagnose": diagnose,
}


def refuse_single_checkpoint(cfg: DictConfig, mode: str) -> None:
    """ckpt= and run= name the one checkpoint of report and sample: given to another mode they would be ignored."""
    if mode in ("compare", "diagnose") and (cfg.ckpt is not None or cfg.run is not None):
        source = "ckpts=[A.ckpt,B.ckpt]" if mode == "compare" else "hf_model=DIR"
        raise ValueError(f"eval_mode={mode} reads {source}, not ckpt= or run= (those are for report and sample)")


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    mode = HydraConfig.get().runtime.choices["eval_mode"]
    try:
        refuse_single_checkpoint(cfg, mode)
        ACTIONS[mode](cfg, Path(cfg.paths.output_dir), Runtime(cfg.device, cfg.dtype))
    except (ValueError, FileNotFoundError) as err:
        log.error("%s (set HYDRA_FULL_ERROR=1 for the traceback)", err)
        sys.exit(1)


if __name__ == "__main__":
    main()
