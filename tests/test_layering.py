"""Dependencies point one way (docs/design.md §6).

The core never imports the DeepSpeed coupling (spngd_ds/deepspeed/), the curvature blocks never
import the optimizer, torch.distributed or DeepSpeed, and the library never imports the training job
(spngd_ds/recipes/).

Every library module is parsed with ``ast``; every import counts, wherever it sits: module level,
inside a function, under ``if TYPE_CHECKING:``; relative imports are resolved against the
module's package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "spngd_ds"


def module_name(path: Path, root: Path) -> str:
    """``spngd_ds/comm/layout.py`` -> ``spngd_ds.comm.layout``; a package's ``__init__.py`` -> the package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path) -> list[tuple[int, str, bool]]:
    """``(line, imported module, at module level)`` for every import in ``path``.

    ``from a import b`` yields ``a`` and ``a.b`` (``b`` may be a submodule). Module level means not inside a
    function or class body (imports under ``if`` / ``try`` at module level count as module level).
    """
    name = module_name(path, root)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    tree = ast.parse(path.read_text(), filename=str(path))
    lazy: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            lazy.update(id(n) for n in ast.walk(node) if n is not node)
    found: list[tuple[int, str, bool]] = []
    for node in ast.walk(tree):
        top = id(node) not in lazy
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module, top))
            found += [(node.lineno, f"{module}.{alias.name}", top) for alias in node.names]
    return found


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def violations(root: Path) -> dict[str, list[str]]:
    """Each rule's offenders (``path:line: module``) among the modules under ``root/spngd_ds``."""
    out: dict[str, list[str]] = {"core imports deepspeed/": [], "blocks import": [], "library imports recipes": []}
    for path in sorted((root / "spngd_ds").rglob("*.py")):
        here = module_name(path, root)
        if within(here, "spngd_ds.recipes"):
            continue
        for line, module, top in imports_of(path, root):
            where = f"{path.relative_to(root)}:{line}: {module}"
            if within(module, "spngd_ds.recipes"):
                out["library imports recipes"].append(where)
            if within(module, "spngd_ds.deepspeed") and not within(here, "spngd_ds.deepspeed"):
                # the package's facade reaches initialize / patch_deepspeed lazily, inside a function,
                # so that `import spngd_ds` imports neither DeepSpeed nor its coupling
                if not (here == "spngd_ds" and not top):
                    out["core imports deepspeed/"].append(where)
            if within(here, "spngd_ds.blocks") and any(
                within(module, bad)
                for bad in ("spngd_ds.optimizer", "torch.distributed", "deepspeed", "spngd_ds.deepspeed")
            ):
                out["blocks import"].append(where)
    return out


def test_library_modules_are_found() -> None:
    names = {module_name(p, ROOT) for p in LIBRARY.rglob("*.py")}
    assert {
        "spngd_ds",
        "spngd_ds.optimizer",
        "spngd_ds.comm.layout",
        "spngd_ds.deepspeed.integration",
        "spngd_ds.deepspeed.engine",
    } <= names
    assert any(within(n, "spngd_ds.blocks") for n in names - {"spngd_ds.blocks"})


@pytest.mark.parametrize("rule", ["core imports deepspeed/", "blocks import", "library imports recipes"])
def test_dependencies_point_one_way(rule: str) -> None:
    offenders = violations(ROOT)[rule]
    assert not offenders, f"{rule}:\n" + "\n".join(offenders)


def test_the_facade_imports_the_deepspeed_coupling_only_lazily() -> None:
    lazy = [m for _, m, top in imports_of(LIBRARY / "__init__.py", ROOT) if within(m, "spngd_ds.deepspeed")]
    assert lazy, "spngd_ds/__init__.py no longer reaches initialize / patch_deepspeed"


def test_the_scan_catches_every_kind_of_import(tmp_path: Path) -> None:
    """Seeded violations in a throwaway tree: relative, absolute, function-level, TYPE_CHECKING."""
    lib = tmp_path / "spngd_ds"
    for d in ("blocks", "paths", "deepspeed", "recipes"):
        (lib / d).mkdir(parents=True)
        (lib / d / "__init__.py").write_text("")
    (lib / "__init__.py").write_text("from spngd_ds.deepspeed import integration\n")  # eager: refused
    (lib / "deepspeed" / "engine.py").write_text("import deepspeed\nfrom spngd_ds.optimizer import SPNGD\n")
    (lib / "paths" / "p.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..deepspeed.partitions import Fragment\n"
    )
    (lib / "blocks" / "b.py").write_text(
        "def f():\n    from torch import distributed\n    import deepspeed.comm\nfrom .. import optimizer\n"
    )
    (lib / "q.py").write_text("def g():\n    from .recipes import job\n")
    (lib / "recipes" / "job.py").write_text("import spngd_ds.deepspeed.integration\n")  # allowed
    found = violations(tmp_path)
    assert found["core imports deepspeed/"] == [
        "spngd_ds/__init__.py:1: spngd_ds.deepspeed",
        "spngd_ds/__init__.py:1: spngd_ds.deepspeed.integration",
        "spngd_ds/paths/p.py:3: spngd_ds.deepspeed.partitions",
        "spngd_ds/paths/p.py:3: spngd_ds.deepspeed.partitions.Fragment",
    ]
    assert sorted(found["blocks import"]) == [
        "spngd_ds/blocks/b.py:2: torch.distributed",
        "spngd_ds/blocks/b.py:3: deepspeed.comm",
        "spngd_ds/blocks/b.py:4: spngd_ds.optimizer",
    ]
    assert found["library imports recipes"] == [
        "spngd_ds/q.py:2: spngd_ds.recipes",
        "spngd_ds/q.py:2: spngd_ds.recipes.job",
    ]
