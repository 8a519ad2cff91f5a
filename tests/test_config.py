"""conf/: options that only mean something together are refused when composed, each entry point has its own modes,
and every `python train.py ...` / `python eval.py ...` command of README.md and docs/*.md composes."""

import itertools
import re
import shlex
import string
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException

from eval import refuse_single_checkpoint
from train import check_combination

ROOT = Path(__file__).parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND = re.compile(r"python (train|eval)\.py([^`#\n]*)")  # up to the end of a code span, a comment or the line


def composed(entry: str, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(entry, overrides=list(overrides), return_hydra_config=True)


def checked(entry: str, *overrides: str):
    """Composed as the entry point composes it, then checked as the entry point checks it before it starts."""
    cfg = composed(entry, *overrides)
    choices = cfg.hydra.runtime.choices
    if entry == "train":
        check_combination(cfg, choices)
    else:
        refuse_single_checkpoint(cfg, choices.eval_mode)
    return cfg


def documented_commands() -> list[tuple[str, list[str], str]]:
    """(entry, overrides, where) of every command line in the docs: continued lines joined, shell variables the
    doc sets expanded, placeholders (`...`) and flags (`-m`) left out."""
    commands = []
    for doc in DOCS:
        text = re.sub(r"\\\n\s*", " ", doc.read_text())
        shell_vars = dict(re.findall(r'^(\w+)="([^"]*)"$', text, flags=re.M))
        for entry, args in COMMAND.findall(text):
            words = shlex.split(string.Template(args).safe_substitute(shell_vars))
            overrides = [w for w in words if w != "..." and not w.startswith("-")]
            commands.append((entry, overrides, f"{doc.name}: {entry}.py {' '.join(words)}"[:150]))
    return commands


def single_runs(overrides: list[str]) -> list[list[str]]:
    """A sweep's overrides (`a=1,2 b=3,4`) as the single runs it launches; other overrides as they are."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    values = [list(o.sweep_string_iterator()) if o.is_sweep_override() else [None] for o in parsed]
    runs = []
    for run in itertools.product(*values):
        pairs = zip(parsed, run, strict=True)
        runs.append([o.input_line if value is None else f"{o.get_key_element()}={value}" for o, value in pairs])
    return runs


COMMANDS = documented_commands()


def test_the_docs_commands_are_found():
    assert len(COMMANDS) >= 40 and {entry for entry, _, _ in COMMANDS} == {"train", "eval"}


@pytest.mark.parametrize("entry, overrides", [c[:2] for c in COMMANDS], ids=[c[2] for c in COMMANDS])
def test_every_documented_command_composes(entry, overrides):
    for run in single_runs(overrides):
        checked(entry, *run)


@pytest.mark.parametrize(
    "experiment",
    [f"{p.parent.name}/{p.stem}" for p in sorted((ROOT / "conf/experiment").glob("*/*.yaml")) if p.stem != "base"],
)
def test_every_experiment_passes_the_check(experiment):
    checked("train", f"experiment={experiment}")


def test_shared_heads_without_finetuning_is_refused():
    with pytest.raises(ValueError, match=r"^aux.shared_heads=2 .* add mode=finetune init_from=CKPT"):
        checked("train", "aux.shared_heads=2")
    checked("train", "mode=finetune", "init_from=x.ckpt", "aux.shared_heads=2")


def test_an_attention_choice_with_model_hf_is_refused():
    with pytest.raises(ValueError, match="attention=gated does not apply to model=hf.*drop attention="):
        checked("train", "model=hf", "attention=gated")
    assert "attention" not in checked("train", "model=hf", "model.hf_path=DIR")


def test_each_entry_point_composes_its_own_modes_only():
    for entry, overrides in [
        ("train", ["mode=sample"]),  # an eval.py mode
        ("eval", ["mode=sample"]),  # eval.py's group is eval_mode
        ("eval", ["eval_mode=finetune"]),  # a train.py mode
        ("eval", ["prompt=The"]),  # a knob of eval_mode=sample given to the report
    ]:
        with pytest.raises(HydraException):
            composed(entry, *overrides)
    assert checked("eval", "eval_mode=sample", "prompt=The").prompt == "The"


def test_compare_and_diagnose_refuse_a_single_checkpoint():
    with pytest.raises(ValueError, match=r"eval_mode=compare reads ckpts=\[A.ckpt,B.ckpt\], not ckpt= or run="):
        checked("eval", "eval_mode=compare", "ckpts=[a.ckpt,b.ckpt]", "ckpt=a.ckpt")
    with pytest.raises(ValueError, match="eval_mode=diagnose reads hf_model=DIR"):
        checked("eval", "eval_mode=diagnose", "hf_model=DIR", "run=NAME")


def test_activation_checkpointing_is_a_knob_of_every_model_size():
    """docs/benchmarks.md's `model.activation_checkpointing=true` (the 2b on one 80 GB GPU) composes as typed."""
    for size in ("tiny", "small", "0.6b", "1b", "2b"):
        assert composed("train", f"model={size}", "model.activation_checkpointing=true").model.activation_checkpointing
