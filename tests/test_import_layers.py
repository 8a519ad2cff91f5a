"""An import only goes down the layers of docs/architecture.md: no folder imports one above it or beside it, so no
circle. Read from the source (ast), so a lazy import inside a function counts too."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# top-level project name -> the project names it may import
ALLOWED = {
    "compat": set(),
    "model": {"model", "checkpoints", "compat"},  # model/parallel.py: trainer=fsdp writes sharded checkpoints
    "data": {"data", "compat"},
    "checkpoints": {"checkpoints", "compat"},
    "plots": {"model"},
    "callbacks": {"callbacks", "plots", "checkpoints", "model", "data", "compat"},
    "evaluation": {"evaluation", "plots", "checkpoints", "model", "data", "compat"},
}


def project_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & set(ALLOWED) | names & {"train", "eval", "bench", "scripts"}


def test_every_import_goes_down():
    wrong = []
    for layer, allowed in ALLOWED.items():
        files = [ROOT / f"{layer}.py"] if (ROOT / f"{layer}.py").is_file() else sorted((ROOT / layer).glob("*.py"))
        for path in files:
            for name in sorted(project_imports(path) - allowed - {layer}):
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not wrong, "imports that go up or sideways:\n" + "\n".join(wrong)
