"""The import graph runs one way (DESIGN "Layout and the direction of imports"): commands sit on top
of the library, the data chain contexts → probe → table/scores/runfolder → analysis is never
walked backwards, and one module loads a teacher/student pair. Read from the source with ast, so
imports made inside functions count too."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "teachdiag"
FRONT = {"teachdiag.cli", "teachdiag.api", "teachdiag", "teachdiag.__main__"}  # the front doors may import commands
# the data chain; a module may import its own rank or lower, never a higher one
CHAIN = {"teachdiag.contexts": 0, "teachdiag.probe": 1, "teachdiag.table": 2, "teachdiag.scores": 2,
         "teachdiag.runfolder": 2, "teachdiag.runtable": 2, "teachdiag.analysis": 3}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """{module: the teachdiag modules it imports, at top level or inside a function}."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        name, found = module_name(path), set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("teachdiag")}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("teachdiag"):
                found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        out[name] = found
    return out


def rank(module: str) -> int | None:
    hits = [r for prefix, r in CHAIN.items() if module == prefix or module.startswith(prefix + ".")]
    return hits[0] if hits else None


def test_no_library_module_imports_a_command_or_a_front_door():
    upward = {m: sorted(i for i in got if i.startswith(("teachdiag.commands", "teachdiag.cli", "teachdiag.api")))
              for m, got in imports().items() if not m.startswith("teachdiag.commands") and m not in FRONT}
    assert not {m: i for m, i in upward.items() if i}


def test_the_data_chain_is_never_walked_backwards():
    back = []
    for m, got in imports().items():
        r = rank(m)
        back += [f"{m} -> {i}" for i in got if r is not None and rank(i) is not None and rank(i) > r]
    assert not back, back


def test_one_module_loads_the_pair():
    """models.load_models / load_inputs are called from pair.py alone: every command opens its pair
    there, so the checks and the run header (weight hashes) cannot drift between commands."""
    callers = set()
    for path in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                f = node.func
                called = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
                if called in ("load_models", "load_inputs"):
                    callers.add(module_name(path))
    assert callers == {"teachdiag.pair"}, callers


PRIMITIVES = {"_atomic_write", "_fsync_write", "_fsync_dir"}  # durable.py's
FOLDER_OPS = {"claim_folder", "lock_folder", "publish_folder", "discard_tree", "fsync_tree", "disk_faults"}


def names_used(path: Path) -> set[str]:
    """Every name a module refers to: called, passed around, imported or read as an attribute."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Name):
            found.add(node.id)
        elif isinstance(node, ast.Attribute):
            found.add(node.attr)
        elif isinstance(node, ast.alias):
            found.add(node.name.rsplit(".", 1)[-1])
    return found


def test_commands_write_only_through_the_run_output():
    """One writer owns what a command leaves on disk (runfolder.RunOutput: lock, run record, fsynced
    appends, atomic files, folder swaps, one-line disk errors). durable.py's primitives are used by
    the writer's module alone, and by probe/stepfile.py (the shared step's own resume file); no
    command, front door or other library module writes around the writer, nor claims, locks or
    swaps a folder itself."""
    users = {module_name(p) for p in sorted(ROOT.rglob("*.py")) if names_used(p) & PRIMITIVES}
    assert users == {"teachdiag.durable", "teachdiag.runfolder", "teachdiag.probe.stepfile"}, users
    front = [p for p in sorted(ROOT.rglob("*.py")) if module_name(p).startswith("teachdiag.commands")
             or module_name(p) in FRONT]
    around = {module_name(p): sorted(names_used(p) & (PRIMITIVES | FOLDER_OPS)) for p in front}
    assert not {m: n for m, n in around.items() if n}, around
