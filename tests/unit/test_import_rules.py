"""DESIGN.md's dependency rules, read from the source: every ``import`` of every module,
also those inside functions (a lazy import is still a dependency).

platform <- config <- {positions, checkpointing} <- {models, data} <- {inference, training,
conversion, planning} <- rl <- tools. ``data`` and ``models`` never import each other;
``inference`` never imports ``training``; nothing in ``megavlm/`` imports ``tools``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).parents[2] / "megavlm"

# What each top-level part of megavlm may import from the others (itself is always allowed).
ALLOWED = {
    "platform": set(),
    "config": {"platform"},
    "positions": {"platform", "config"},
    "checkpointing": {"platform", "config"},
    "models": {"platform", "config", "positions", "parallel"},
    "data": {"platform", "config", "positions"},
    "inference": {"platform", "config", "positions", "parallel", "checkpointing", "models", "data", "conversion"},
    "conversion": {"platform", "config", "positions", "parallel", "checkpointing", "models", "data"},
    "planning": {"platform", "config", "positions", "parallel", "checkpointing", "models", "data"},
    "training": {"platform", "config", "positions", "parallel", "checkpointing", "models", "data", "inference",
                 "conversion", "planning"},
    "parallel": {"platform", "config", "positions"},
}
# parts not listed (rl, and any new one) may import everything below tools
TOP = {"platform", "config", "positions", "checkpointing", "models", "data", "inference", "conversion",
       "planning", "training", "parallel", "rl"}


def _part(module_path: Path, root: Path) -> str:
    rel = module_path.relative_to(root)
    return rel.parts[0].removesuffix(".py")


def imported_modules(source: str, module_name: str) -> list[tuple[int, str]]:
    """``(line, dotted module)`` of every import in a module (relative ones resolved)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module_name.split(".")[: -node.level]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name))
            # "from megavlm import models" imports a package too
            if name == "megavlm":
                found += [(node.lineno, f"megavlm.{alias.name}") for alias in node.names]
    return found


def violations(root: Path) -> list[str]:
    errors = []
    for path in sorted(root.rglob("*.py")):
        part = _part(path, root)
        if part == "__init__":
            continue
        module = ".".join(("megavlm",) + path.relative_to(root).with_suffix("").parts)
        allowed = ALLOWED.get(part, TOP) | {part}
        for line, name in imported_modules(path.read_text(), module):
            pieces = name.split(".")
            if pieces[0] == "tools":
                errors.append(f"{path.relative_to(root.parent)}:{line} imports {name} (nothing in megavlm imports tools)")
            if pieces[0] != "megavlm" or len(pieces) < 2:
                continue
            if pieces[1] not in allowed:
                errors.append(f"{path.relative_to(root.parent)}:{line}: {part} imports {name}")
    return errors


def test_megavlm_follows_the_dependency_rules():
    errors = violations(PACKAGE_ROOT)
    assert not errors, "dependency rules broken (move the piece, not the rule):\n" + "\n".join(errors)


def test_every_part_is_ruled():
    """A new top-level package gets a rule when it is added, not by default."""
    parts = {_part(p, PACKAGE_ROOT) for p in PACKAGE_ROOT.iterdir() if p.suffix == ".py" or p.is_dir()}
    parts -= {"__init__", "__pycache__"}
    assert parts <= TOP, f"add {sorted(parts - TOP)} to ALLOWED / TOP in this test"


@pytest.mark.parametrize(
    ("part", "line", "broken"),
    [
        ("data", "from megavlm.models.rope import x", True),
        ("data", "import megavlm.training.loop", True),
        ("models", "from megavlm import data", True),
        ("inference", "from megavlm.training.checkpoint import x", True),
        ("config", "from megavlm.training.lr_schedule import LRPhase", True),
        ("platform", "from megavlm.config import Config", True),
        ("data", "def f():\n    from ..models import vlm", True),
        ("training", "from tools.generate import main", True),
        ("data", "from megavlm.positions import sample_position_ids", False),
        ("inference", "from megavlm.checkpointing import latest_complete", False),
    ],
)
def test_the_checker_catches_violations(tmp_path, part, line, broken):
    """The rule check itself can fail: each broken import is reported, allowed ones are not."""
    package = tmp_path / "megavlm" / part
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "mod.py").write_text(line + "\n")
    assert bool(violations(tmp_path / "megavlm")) == broken
