"""Cross-references that drift: every DESIGN heading cited exists, no section numbers are cited,
and every module a docstring or the README names exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [*sorted((ROOT / "teachdiag").rglob("*.py")), *sorted((ROOT / "tests").rglob("*.py")),
           *sorted((ROOT / "scripts").glob("*")), *sorted((ROOT / "benchmarks").glob("*.py")),
           *sorted((ROOT / "notebooks").glob("*.ipynb")), ROOT / "README.md", ROOT / "data" / "README.md"]
SOURCES = [p for p in SOURCES if p.is_file() and p.suffix in (".py", ".md", ".ipynb", ".sh")]
HEADINGS = [re.sub(r"^#+\s*(\d+[a-z]?\.\s*)?", "", h).strip()
            for h in (ROOT / "DESIGN.md").read_text().splitlines() if h.startswith("#")]


def test_cited_design_headings_exist():
    cited = {}
    for p in SOURCES:
        for m in re.finditer(r'DESIGN(?:\.md)?(?:\'s|,)? \\?"([^"\\]+)\\?"', p.read_text(errors="replace")):
            cited.setdefault(" ".join(m.group(1).split()), p.relative_to(ROOT))
    assert cited, "the pattern found no citation at all"
    missing = {c: str(p) for c, p in cited.items() if not any(h.startswith(c) for h in HEADINGS)}
    assert not missing, f"DESIGN.md has no heading starting with these: {missing}"


def test_no_design_section_numbers_are_cited():
    numbered = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in SOURCES if p.name != "test_docs.py"
                for m in re.finditer(r"DESIGN(?:\.md)? ?§\s*\d+", p.read_text(errors="replace"))]
    assert not numbered, f"cite DESIGN by heading: {numbered}"


EXTERNAL = {"tip_compat.py"}  # the released TA-OPD code's module (a fork of slime), named as the source of a rule


def test_named_modules_exist():
    """`(name.py)` and `teachdiag/…/name.py` in the package's docstrings and the README."""
    have = {p.name for p in ROOT.rglob("*.py") if ".git" not in p.parts}
    named = {}
    for p in [*sorted((ROOT / "teachdiag").rglob("*.py")), ROOT / "README.md", ROOT / "DESIGN.md"]:
        for m in re.finditer(r"\b([a-z_]+\.py)\b", p.read_text()):
            named.setdefault(m.group(1), str(p.relative_to(ROOT)))
    missing = {n: where for n, where in named.items() if n not in have and n not in EXTERNAL}
    assert not missing, f"named but not in the tree: {missing}"
