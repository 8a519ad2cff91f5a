"""conf/experiment/study2/ and scripts/study.py --part 2: every run composes, differs from its first-study twin in
exactly what its comment says, has its own run directory, and fine-tunings wait for (or bring along) their start."""

import glob
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import study  # noqa: E402  (scripts/study.py)

STUDY2 = sorted(p.stem for p in (ROOT / "conf" / "experiment" / "study2").glob("*.yaml") if p.stem != "base")
# run -> (its twin, the keys in which they differ besides run)
TWINS = {
    "vanilla_wd0.5": ("study/vanilla", {"optim.weight_decay"}),
    "vanilla_noqknorm_wd0.5": ("study/vanilla", {"optim.weight_decay", "model.qk_norm"}),
    "sink_wd0.5": ("study/sink", {"optim.weight_decay"}),
    "sink_noqknorm_wd0.5": ("study/sink", {"optim.weight_decay", "model.qk_norm"}),
    "vanilla_aux_wd0.5": ("study/vanilla_aux", {"optim.weight_decay"}),
    "vanilla_aux_noqknorm_wd0.5": ("study/vanilla_aux", {"optim.weight_decay", "model.qk_norm"}),
    "sink_aux_wd0.5": ("study/sink_aux", {"optim.weight_decay"}),
    "sink_aux_noqknorm_wd0.5": ("study/sink_aux", {"optim.weight_decay", "model.qk_norm"}),
    "vanilla_corpus_ab_4000steps": (
        "study/vanilla",
        {"data.corpus.path", "data.tokenizer.corpus", "trainer.max_steps"},
    ),
    "gated_seed2": ("study/gated", {"seed"}),
    "gated_seed3": ("study/gated", {"seed"}),
    "gated_aux1e-2_seed2": ("study/gated_aux1e-2", {"seed"}),
    "gated_aux1e-2_seed3": ("study/gated_aux1e-2", {"seed"}),
    "gated_fp8_tensorwise": ("study/gated", {"model.fp8"}),
    "vanilla_fp8_tensorwise": ("study/vanilla", {"model.fp8"}),
    "finetune_gated_m0": ("study/finetune_plain", {"attention.name", "init_from", "trainer.max_steps"}),
    "finetune_gated_m2": ("study/finetune_shared", {"attention.name", "init_from", "trainer.max_steps"}),
    "finetune_gated_m4": (
        "study/finetune_shared",
        {"attention.name", "init_from", "aux.shared_heads", "trainer.max_steps"},
    ),
}


def composed(experiment: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[f"experiment={experiment}"])


def leaves(cfg) -> dict:
    """Every leaf of the config, unresolved: an interpolation compares as written (${seed}, ${attention.name})."""
    out = {}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = value

    walk(OmegaConf.to_container(cfg, resolve=False), "")
    return out


def test_every_run_has_a_twin_and_a_comment():
    assert sorted(TWINS) == STUDY2
    for name in STUDY2:
        text = (ROOT / "conf" / "experiment" / "study2" / f"{name}.yaml").read_text()
        assert text.startswith("# @package _global_\n# (")  # what it tests, labelled as in the issue
        assert all(len(line) <= 120 for line in text.splitlines()), name


@pytest.mark.parametrize("name", STUDY2)
def test_run_differs_from_its_twin_in_what_it_tests(name):
    twin, changed = TWINS[name]
    ours, theirs = leaves(composed(f"study2/{name}")), leaves(composed(twin))
    differing = {k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k)}
    differing = {"data.tokenizer.corpus" if k.startswith("data.tokenizer.corpus") else k for k in differing}
    assert differing - {"run"} == changed


@pytest.mark.parametrize("name", STUDY2)
def test_budget_and_run_directory(name):
    cfg = composed(f"study2/{name}")
    tokens = cfg.trainer.max_steps * cfg.data.batch_size * cfg.model.seq_len
    if name.startswith("finetune"):
        assert tokens == 400 * 32 * 1024  # 13.1M tokens
    else:
        assert tokens >= 65_000_000 * (2 if "4000steps" in name else 1)
    assert cfg.run.startswith("study2/")


def test_no_two_experiments_share_a_run_directory():
    experiments = sorted(
        str(p.relative_to(ROOT / "conf" / "experiment").with_suffix(""))
        for folder in ("study", "study2")
        for p in (ROOT / "conf" / "experiment" / folder).glob("*.yaml")
        if p.stem != "base"
    )
    runs = [composed(e).run for e in experiments]
    assert len(set(runs)) == len(runs), sorted(runs)


@pytest.mark.parametrize(("finetune", "start"), sorted(study.STARTS_FROM.items()))
def test_fine_tunings_start_from_the_run_the_script_waits_for(finetune, start):
    init_from = OmegaConf.to_container(composed(finetune), resolve=False)["init_from"]
    assert init_from == "${hydra:runtime.cwd}/outputs/" + composed(start).run + "/checkpoints/last.ckpt"


def test_the_corpus_ab_run_reads_both_folders_with_the_first_studys_tokenizer(tmp_path):
    from hydra.utils import instantiate

    for corpus in ("corpus_a", "corpus_b", "corpus_c"):
        (tmp_path / corpus).mkdir()
        (tmp_path / corpus / "part-0.parquet").touch()
    more, first = (composed(e) for e in ("study2/vanilla_corpus_ab_4000steps", "study/vanilla"))
    more.data_dir = first.data_dir = str(tmp_path)
    files = sorted(glob.glob(more.data.corpus.path))  # data.corpus.Corpus reads a glob as these files
    assert [Path(f).parent.name for f in files] == ["corpus_a", "corpus_b"]
    # The BPE cache key is the fingerprint of the corpus it is trained on: the same as the first study's.
    assert instantiate(more.data.tokenizer.corpus).fingerprint() == instantiate(first.data.corpus).fingerprint()


def test_requested_brings_the_start_run_along_and_part_1_is_unchanged():
    assert study.requested(2, "finetune_gated_m0,finetune_gated_m2") == [
        "study/gated", "study2/finetune_gated_m0", "study2/finetune_gated_m2",
    ]  # fmt: skip
    assert study.requested(2, "study/gated,vanilla_wd0.5,finetune_gated_m4") == [
        "study/gated", "study2/vanilla_wd0.5", "study2/finetune_gated_m4",
    ]  # fmt: skip
    assert study.requested(1, None) == [f"study/{n}" for n in study.RUNS + study.FINETUNES]
    assert study.requested(2, None) == study.experiments(2, study.RUNS_2)
    assert {"study/gated", "study/gated_aux1e-2", "study2/gated_seed2"} < set(study.requested(2, None))
    with pytest.raises(SystemExit, match="no conf/experiment/study2/vanila_wd0.5.yaml"):
        study.requested(2, "vanila_wd0.5")


class FakeRun:
    """A training process that ends at its second poll, failing for the experiments in `failing`."""

    launched: list[str] = []
    failing: set[str] = set()

    def __init__(self, command, **_):
        self.name = command[2].removeprefix("experiment=")
        self.polls, self.returncode = 0, None
        FakeRun.launched.append(self.name)

    def poll(self):
        self.polls += 1
        if self.polls >= 2:
            self.returncode = 1 if self.name in FakeRun.failing else 0
        return self.returncode


def fake_train(monkeypatch, tmp_path, only: str, failing=()):
    monkeypatch.setattr(study, "ROOT", tmp_path)
    monkeypatch.setattr(study, "run_dir", lambda experiment: tmp_path / "outputs" / experiment)
    monkeypatch.setattr(study.subprocess, "Popen", FakeRun)
    monkeypatch.setattr(study.time, "sleep", lambda s: None)
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=types.SimpleNamespace(device_count=lambda: 1)))
    for experiment in study.requested(2, only):
        (tmp_path / "outputs" / experiment / "checkpoints").mkdir(parents=True)
    FakeRun.launched, FakeRun.failing = [], set(failing)
    args = types.SimpleNamespace(part=2, only=only, per_gpu=3, stop_launching_after=0, stop_after=0)
    study.train(args, [])
    return FakeRun.launched


def test_fine_tunings_start_after_their_start_run(monkeypatch, tmp_path, capsys):
    launched = fake_train(monkeypatch, tmp_path, "finetune_gated_m0,finetune_gated_m2,vanilla_wd0.5")
    # Three slots, but the fine-tunings wait: study/gated and vanilla_wd0.5 first, then both fine-tunings.
    assert launched == ["study/gated", "study2/vanilla_wd0.5", "study2/finetune_gated_m0", "study2/finetune_gated_m2"]
    assert (tmp_path / "outputs" / "study2" / "logs" / "finetune_gated_m2.log").is_file()
    assert "study2/finetune_gated_m2 finished" in capsys.readouterr().out


def test_fine_tunings_of_a_failed_run_are_dropped_not_awaited(monkeypatch, tmp_path, capsys):
    launched = fake_train(monkeypatch, tmp_path, "finetune_gated_m0,vanilla_wd0.5", failing={"study/gated"})
    assert launched == ["study/gated", "study2/vanilla_wd0.5"]  # and train() returned: no endless wait
    assert "study2/finetune_gated_m0 not started: study/gated, which it starts from, failed" in capsys.readouterr().out


def test_evaluation_scores_corpus_b_only_where_it_is_unseen_and_on_fixed_rows(monkeypatch, tmp_path):
    """Part 2 scores the part-1 run it re-trains too, and the fine-tunings on corpus_b as well."""
    commands = []

    def run(command, **_):
        commands.append(command)
        return types.SimpleNamespace(returncode=0)

    monkeypatch.setattr(study, "run_dir", lambda experiment: tmp_path / "outputs" / experiment)
    monkeypatch.setattr(study.subprocess, "run", run)
    monkeypatch.setenv("SINKAWARE_DATA", str(tmp_path / "data"))
    runs = ("study/gated", "study2/vanilla_wd0.5", "study2/vanilla_corpus_ab_4000steps", "study2/finetune_gated_m0")
    for experiment in runs:
        (tmp_path / "outputs" / experiment / "checkpoints").mkdir(parents=True)
        (tmp_path / "outputs" / experiment / "checkpoints" / "done").touch()
    study.evaluate(2, [])

    def argument(command, key):
        return next(a.removeprefix(key) for a in command if a.startswith(key))

    gated, wd, ab, tuned = (f"{tmp_path}/outputs/{e}/checkpoints/last.ckpt" for e in runs)
    paths = {argument(c, "hydra.run.dir=").split("/")[-1].rsplit("_", 1)[0]: argument(c, "ckpts=") for c in commands}
    assert paths == {
        "corpus_a": f"[{gated},{wd},{ab}]",
        # one shard's rows, the same every time; not the a+b run, which trained on corpus_b; the fine-tuning too
        "corpus_b": f"[{gated},{wd},{tuned}]",
        "finetune": f"[{gated},{tuned}]",
    }
    corpus_b = next(c for c in commands if f"ckpts=[{gated},{wd},{tuned}]" in c)
    assert f"data.corpus.path={tmp_path}/data/corpus_b/part-00000-of-00008.parquet" in corpus_b


def test_part_2_command_line_is_parsed():
    result = subprocess.run(
        [sys.executable, "scripts/study.py", "train", "--part", "3"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 2 and "--part: invalid choice: 3" in result.stderr


def write_compare(out: Path, folder: str, reports: list[tuple[str, float, str | None]]) -> None:
    """An eval/<folder>/compare.json with one report per (run, bpb, hash of the scored rows or None)."""
    rows = [
        {
            "checkpoint": str(out / run / "checkpoints" / "last.ckpt"),
            "bpb": bpb,
            **({"scored_rows": {"tokens_sha256": rows}} if rows else {}),
        }
        for run, bpb, rows in reports
    ]
    (out / "eval" / folder).mkdir(parents=True)
    (out / "eval" / folder / "compare.json").write_text(json.dumps(rows))


def test_the_report_takes_each_runs_newest_compare_over_the_same_rows(tmp_path):
    import study_report  # scripts/study_report.py

    # an early call without recorded rows, then two calls over the same rows, the last re-scoring run b
    write_compare(tmp_path, "corpus_a_20261201-0100", [("a", 1.50, None), ("b", 1.60, None)])
    write_compare(tmp_path, "corpus_a_20261205-0100", [("b", 1.55, "rows1"), ("c", 1.40, "rows1")])
    write_compare(tmp_path, "corpus_a_20261205-0200", [("b", 1.52, "rows1")])
    merged = study_report.newest_compare(tmp_path, "corpus_a")
    assert {run: r["bpb"] for run, r in merged.items()} == {"a": 1.50, "b": 1.52, "c": 1.40}
    assert study_report.newest_compare(tmp_path, "corpus_b") == {}

    write_compare(tmp_path, "corpus_a_20261206-0100", [("d", 1.45, "rows2")])  # other rows: not one table
    with pytest.raises(SystemExit, match="scored other rows"):
        study_report.newest_compare(tmp_path, "corpus_a")


def test_each_float8_run_is_paired_with_its_bf16_twin_when_that_was_trained(tmp_path):
    import study_report  # scripts/study_report.py

    out = tmp_path / "study2"
    runs = ["gated_fp8tensorwise_lambda0.0_seed1", "gated_lambda0.0_seed1", "vanilla_fp8rowwise_lambda0.0_seed1"]
    for run_dir in [out / run for run in runs]:
        (run_dir / "csv").mkdir(parents=True)
        (run_dir / "csv" / "metrics.csv").write_text("step,val/bpb\n")
    assert study_report.float8_pairs(out, runs) == [(out / runs[0], out / runs[1])]  # vanilla's twin: not trained
    (tmp_path / "study" / "vanilla_lambda0.0_seed1" / "csv").mkdir(parents=True)
    (tmp_path / "study" / "vanilla_lambda0.0_seed1" / "csv" / "metrics.csv").write_text("step,val/bpb\n")
    assert study_report.float8_pairs(out, runs)[1] == (out / runs[2], tmp_path / "study" / "vanilla_lambda0.0_seed1")


def test_the_report_finds_each_evaluated_run_in_the_folder_of_its_checkpoint(tmp_path):
    """Part 2 re-trains part 1's gated runs (outputs/study/): their rows come from there, or from part 2's folder
    where the log was copied. A run whose log is in neither has no row; nor has a run that was not evaluated."""
    import study_report  # scripts/study_report.py

    out = tmp_path / "study2"
    logs = [("study", "gated_lambda0.0_seed1337"), ("study2", "vanilla_qkrms_wd0.5"), ("study2", "unevaluated")]
    logs.append(("study2", "gated_lambda0.0_seed2"))  # scored in outputs/study/ on another machine, copied here
    for folder, run in logs:
        (tmp_path / folder / run / "csv").mkdir(parents=True)
        (tmp_path / folder / run / "csv" / "metrics.csv").touch()
    scored = {
        run: {"checkpoint": f"/device/repo/outputs/{folder}/{run}/checkpoints/last.ckpt"}
        for folder, run in [
            ("study", "gated_lambda0.0_seed1337"), ("study2", "vanilla_qkrms_wd0.5"), ("study", "lost"),
            ("study", "gated_lambda0.0_seed2"),
        ]
    }  # fmt: skip
    dirs = study_report.run_dirs(out, {"corpus_a": scored, "corpus_b": {}, "finetune": {}})
    assert list(dirs.items()) == [
        ("vanilla_qkrms_wd0.5", out / "vanilla_qkrms_wd0.5"),
        ("gated_lambda0.0_seed1337", tmp_path / "study" / "gated_lambda0.0_seed1337"),
        ("gated_lambda0.0_seed2", out / "gated_lambda0.0_seed2"),
    ]
