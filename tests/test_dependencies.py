"""Every third-party import is declared in pyproject.toml: a new user's machine has nothing else.

The package's imports (module level and inside functions) must map, through the installed
distributions' top-level names, to `[project].dependencies` or an extra; the tests' imports
may also use the `dev` extra.
"""
from __future__ import annotations

import ast
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

REPO = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0]).lower()


def declared() -> tuple[set[str], set[str]]:
    """(names of the core dependencies and every extra's, names in the dev extra)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project.get("optional-dependencies", {})
    everything = {_name(r) for r in project["dependencies"]} | {_name(r) for rs in extras.values() for r in rs}
    return everything, {_name(r) for r in extras.get("dev", [])}


def imported_modules(root: Path) -> dict[str, str]:
    """Top-level names of the absolute imports under `root` → one place each is imported."""
    found: dict[str, str] = {}
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def undeclared(root: Path, allowed: set[str], local: set[str]) -> list[str]:
    dists = metadata.packages_distributions()
    problems = []
    for module, where in imported_modules(root).items():
        if module in sys.stdlib_module_names or module in local:
            continue
        names = {_name(d) for d in dists.get(module, [])}
        if not names & allowed:
            problems.append(f"{module} ({where}) comes from {sorted(names) or 'no installed distribution'}")
    return problems


def test_every_package_import_is_a_declared_dependency():
    everything, _ = declared()
    assert undeclared(REPO / "mtlsparse", everything, {"mtlsparse"}) == []


def test_every_test_import_is_declared_for_dev():
    everything, dev = declared()
    local = {"mtlsparse", "tests"} | {p.stem for p in (REPO / "tests").glob("*.py")}
    assert undeclared(REPO / "tests", everything | dev, local) == []


def test_the_checker_finds_an_undeclared_import(tmp_path):
    (tmp_path / "m.py").write_text("import numpy\nimport json\n")
    global REPO
    saved, REPO = REPO, tmp_path
    try:
        assert [p.split()[0] for p in undeclared(tmp_path, {"torch"}, set())] == ["numpy"]
        assert undeclared(tmp_path, {"numpy"}, set()) == []
    finally:
        REPO = saved
