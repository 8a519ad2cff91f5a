"""Print pip constraints that pin every dependency of pyproject.toml (and its dev extra) to its declared floor, for
`make test-min`: the floors are claims, and this is how CI checks them.

torch is the exception: pinned to TORCH (the CPU wheel CI installs anyway), since every other torch release is a
multi-GB CUDA build; its floor stands on the API named beside it in pyproject.toml.

    python scripts/lower_bounds.py > constraints-min.txt
"""

import re
import sys
from pathlib import Path

import tomllib

TORCH = "2.13.0"
ROOT = Path(__file__).resolve().parent.parent


def floors(requirements: list[str]) -> list[str]:
    """'lightning>=2.5,<2.7' -> 'lightning==2.5'; a requirement without a floor is an error naming it."""
    pins = []
    for requirement in requirements:
        name = re.match(r"[A-Za-z0-9_.\-]+", requirement).group()
        if name == "torch":
            pins.append(f"torch=={TORCH}")
            continue
        floor = re.search(r">=\s*([^,;\s]+)", requirement)
        if floor is None:
            sys.exit(f"pyproject.toml: {requirement!r} has no floor: give it one (>=X) that make test-min can check")
        pins.append(f"{name}=={floor.group(1)}")
    return pins


if __name__ == "__main__":
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    print("\n".join(floors(project["dependencies"] + project["optional-dependencies"]["dev"])))
