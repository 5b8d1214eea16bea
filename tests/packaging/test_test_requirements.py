"""The README's install command and CI install everything the tests need, so no test fails or skips for a package.

Every third-party module that a test imports (at the top, inside a function, or through
``pytest.importorskip``), and every one that a bench script run by a test imports, must come from the
requirements of the extras that ``.ci/run`` and the README's first command install, or from theirs in
turn. A module from anywhere else (a package that only happens to be installed on one machine) fails
here, on every machine, instead of in CI on a clean clone.
"""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
#: Top-level names of this repository's own code (gpu_check's scripts import each other as siblings).
LOCAL = {"spngd_ds", "tests", "bench", "launch", "gpu_check", "conftest"} | {
    p.stem for p in (ROOT / "gpu_check").glob("*.py")
}
#: A bench script that a test runs or imports, named in the test as ``"bench" / "name.py"`` or ``bench.name``.
BENCH_USE = re.compile(r'"bench"\s*/\s*"(\w+)\.py"|\bbench\.(\w+)\b')


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _extras(text: str, where: str) -> list[str]:
    found = re.findall(r'-e "\.\[([\w,]+)\]"', text)
    assert found, f"{where}: no editable install with extras"
    return sorted(found[0].split(","))


def _pyproject() -> dict[str, object]:
    tomllib = pytest.importorskip("tomllib")  # python >= 3.11
    return dict(tomllib.loads((ROOT / "pyproject.toml").read_text()))


def _installed_closure(extras: list[str]) -> set[str]:
    """Canonical names of the project's requirements with these extras, and of theirs, transitively."""
    project = _pyproject()["project"]
    assert isinstance(project, dict)
    stack = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        stack += [Requirement(r) for r in project["optional-dependencies"][extra]]
    seen: set[str] = set()
    while stack:
        req = stack.pop()
        key = _canon(req.name)
        seen.add(key)
        try:
            requires = metadata.distribution(req.name).requires or []
        except metadata.PackageNotFoundError:
            continue  # not installed here; a module it provides is reported as missing below
        for text in requires:
            sub = Requirement(text)
            if sub.marker is not None and not any(sub.marker.evaluate({"extra": e}) for e in [""] + sorted(req.extras)):
                continue
            if _canon(sub.name) not in seen:
                stack.append(sub)
    return seen


def _imported(path: Path) -> set[str]:
    """Top-level names a file imports anywhere, ``pytest.importorskip("name")`` included."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "importorskip"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names.add(node.args[0].value.split(".")[0])
    return names


def _files_the_tests_use() -> list[Path]:
    """Every test file, and every bench script a test names, with the bench modules those import."""
    files = sorted((ROOT / "tests").rglob("*.py"))
    todo = {m for f in files for pair in BENCH_USE.findall(f.read_text()) for m in pair if m}
    done: set[str] = set()
    while todo:
        name = todo.pop()
        done.add(name)
        path = ROOT / "bench" / f"{name}.py"
        if not path.exists():
            continue
        files.append(path)
        todo |= {m for pair in BENCH_USE.findall(path.read_text()) for m in pair if m} - done
        todo |= {n for n in _bench_siblings(path) if n not in done}
    return files


def _bench_siblings(path: Path) -> set[str]:
    """Bench modules a bench script imports as siblings (``from common import ...``, run as a script)."""
    return {n for n in _imported(path) if (ROOT / "bench" / f"{n}.py").exists()}


def test_readme_and_ci_install_the_same_extras() -> None:
    readme = _extras((ROOT / "README.md").read_text(), "README.md")
    ci = _extras((ROOT / ".ci" / "run").read_text(), ".ci/run")
    assert readme == ci, f"README installs {readme}, .ci/run installs {ci}: the two would run different tests"


def test_every_module_the_tests_import_is_installed_by_the_test_extras() -> None:
    extras = _extras((ROOT / ".ci" / "run").read_text(), ".ci/run")
    closure = _installed_closure(extras)
    provided = metadata.packages_distributions()
    stdlib = set(sys.stdlib_module_names)
    problems = []
    for path in _files_the_tests_use():
        for name in sorted(_imported(path) - stdlib - LOCAL):
            if (ROOT / "bench" / f"{name}.py").exists() and path.parent.name == "bench":
                continue  # a sibling bench module, scanned itself
            dists = {_canon(d) for d in provided.get(name, [])}
            if not dists:
                problems.append(f"{path.relative_to(ROOT)}: imports {name}, which no installed package provides")
            elif not dists & closure:
                problems.append(
                    f"{path.relative_to(ROOT)}: imports {name} (from {sorted(dists)}), "
                    f"which the extras {extras} do not install"
                )
    assert not problems, "\n".join(problems)


def test_the_check_sees_a_module_outside_the_extras(tmp_path: Path) -> None:
    # the scan above must be able to fail: a lazy import and an importorskip of packages outside the extras
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    import matplotlib\n\nimport pytest\nasdl = pytest.importorskip('asdl')\n")
    assert {"matplotlib", "asdl", "pytest"} <= _imported(probe)
    assert "asdfghjkl" not in _installed_closure(["dev"])
    assert "matplotlib" not in _installed_closure(["hf"])
