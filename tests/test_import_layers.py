"""The layers keep their promises (README "Layout"): the library in knowfree_core/ never
imports ray, the jobs or the benchmarks; jobs/ imports its own modules relatively, because the
wheel installs it as knowfree_jobs; the benchmark scripts edit no sys.path and import no
private name of the project."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Neither at module level nor inside a function: the README says the library never imports ray.
NOT_IN_CORE = ("ray", "jobs", "knowfree_jobs", "bench")
#: A registry entry ("module:Class", imported later with importlib) naming one of NOT_IN_CORE.
REGISTRY_TARGET = re.compile(rf"^(?:{'|'.join(NOT_IN_CORE)})(?:\.\w+)*:\w+$")
PROJECT = ("knowfree_core", "knowfree_jobs", "jobs")


def _sources(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def _imports(tree: ast.AST) -> list[tuple[int, str, list[str]]]:
    """(line, absolute module, imported names) of every import statement, at any depth, and
    of every ``import_module("literal")``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            found += [(node.lineno, arg.value, []) for arg in node.args[:1]
                      if isinstance(arg, ast.Constant) and isinstance(arg.value, str)]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module, [alias.name for alias in node.names]))
    return found


def _top(module: str) -> str:
    return module.split(".")[0]


@pytest.mark.parametrize("path", _sources("knowfree_core"), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_library_imports_no_ray_no_jobs_no_bench(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    bad = [f"line {line}: {module}" for line, module, _ in _imports(tree) if _top(module) in NOT_IN_CORE]
    # A registry entry "jobs.x:Class" would reach them through importlib.
    bad += [f"line {node.lineno}: {node.value!r}" for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and REGISTRY_TARGET.match(node.value)]
    assert not bad, f"{path.relative_to(ROOT)} reaches outside the library: {bad}"


@pytest.mark.parametrize("path", _sources("jobs"), ids=lambda p: str(p.relative_to(ROOT)))
def test_jobs_import_each_other_relatively(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    absolute = [f"line {line}: {module}" for line, module, _ in _imports(tree) if _top(module) in ("jobs", "knowfree_jobs")]
    assert not absolute, f"{path.relative_to(ROOT)}: installed as knowfree_jobs, these would not resolve: {absolute}"


@pytest.mark.parametrize("path", _sources("bench"), ids=lambda p: str(p.relative_to(ROOT)))
def test_bench_scripts_edit_no_sys_path_and_import_public_names(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    edits = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr == "path"
             and isinstance(node.value, ast.Name) and node.value.id == "sys"]
    assert not edits, f"{path.relative_to(ROOT)} uses sys.path (lines {edits}): the installed package suffices"
    private = [f"line {line}: {module}.{name}" for line, module, names in _imports(tree) if _top(module) in PROJECT
               for name in names if name.startswith("_")]
    private += [f"line {line}: {module}" for line, module, _ in _imports(tree)
                if _top(module) in PROJECT and any(part.startswith("_") for part in module.split("."))]
    assert not private, f"{path.relative_to(ROOT)} imports private names: {private}"
    old_name = [f"line {line}: {module}" for line, module, _ in _imports(tree) if _top(module) == "jobs"]
    assert not old_name, f"{path.relative_to(ROOT)}: the jobs are installed as knowfree_jobs: {old_name}"
