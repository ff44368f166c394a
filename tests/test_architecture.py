"""The layout's rules, checked on the source: the package root holds the commands only, and
no import runs back up the layers (docs/architecture.md)."""

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "lmlab"
COMMANDS = {"run", "evaluate", "predict", "generate", "compare", "check_parallel", "export"}
# What each room may import from lmlab, itself included; the commands may import anything.
ALLOWED = {
    "errors": set(),
    "models": {"models"},
    "data": {"data"},
    "parallel": {"parallel"},
    "tasks": {"tasks", "models", "data", "parallel"},
    "config": {"config", "data", "parallel"},
    "tracking": {"tracking", "config"},
    "checkpointing": {"checkpointing", "config", "parallel", "models"},
    "interop": {"interop", "models"},
    "training": {"training", "checkpointing", "tracking", "config", "tasks", "data",
                 "parallel", "models", "interop"},
}


def lmlab_imports(path: Path) -> set[str]:
    """The rooms of lmlab a module imports (`lmlab.data.lm` -> `data`), at any depth."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 \
            else [a.name for a in node.names] if isinstance(node, ast.Import) else []
        for name in names:
            parts = name.split(".")
            if parts[0] == "lmlab" and len(parts) > 1:
                found.add(parts[1])
    return found - {"errors"}


def test_the_package_root_holds_the_commands_and_errors_only():
    root = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert root == COMMANDS | {"errors"}
    rooms = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert rooms == set(ALLOWED) - {"errors"}


def test_no_import_runs_back_up_the_layers():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        room = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if room in COMMANDS or room == "__init__":
            continue
        for used in sorted(lmlab_imports(path) - ALLOWED[room]):
            wrong.append(f"{path.relative_to(ROOT)} imports lmlab.{used}")
    assert not wrong, "\n".join(wrong)
