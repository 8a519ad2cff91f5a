"""The repository stands alone: no file points at a document outside it, and every relative link of the docs
resolves to a file of the repository."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# A path that leaves the repository (../something), or a team document that the repository does not hold.
OUTSIDE = re.compile(r"\.\./shared|\.\./notes|\bDESIGN\.md\b|\bpaper_digest\b|\bshared/(?:data|notes|seeds)\b")
MARKDOWN_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    files = [ROOT / name for name in names if Path(name).suffix not in {".png", ".parquet", ".ckpt"}]
    return [f for f in files if f.is_file()]


def test_no_file_refers_to_a_document_outside_the_repository():
    hits = []
    for path in tracked_text_files():
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
            if OUTSIDE.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert not hits, "references to files outside the repository:\n" + "\n".join(hits)


@pytest.mark.parametrize(
    "doc", sorted(p.relative_to(ROOT).as_posix() for p in [ROOT / "README.md", *ROOT.glob("docs/*.md")])
)
def test_relative_links_of_the_docs_resolve(doc):
    path = ROOT / doc
    broken = [
        target
        for target in MARKDOWN_LINK.findall(path.read_text())
        if "://" not in target and not target.startswith("mailto:") and not (path.parent / target).exists()
    ]
    assert not broken, f"{doc} links to files that do not exist: {broken}"


def test_the_pattern_catches_what_it_is_for():
    # Built from parts, so that this file holds no such reference itself (the scan above reads it too).
    assert OUTSIDE.search("see " + "/".join(["..", "shared", "notes", "x.md"]))
    assert OUTSIDE.search("(" + "DESIGN" + ".md, the math)")
    assert not OUTSIDE.search("aux.shared_heads=3 marks shared heads (docs/math.md)")
