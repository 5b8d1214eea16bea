"""The library's import layering and the paths' interface to the optimizer.

What docs/design.md §6 asks of them:

- no import circle among the modules of ``spngd_ds``, counting every import (module level, under
  ``if TYPE_CHECKING:``, inside functions);
- no module of ``spngd_ds/paths/`` touches a private member (``obj._name``) of another object;
- the two paths, named, give the same parameters on a model they can both step.
"""

from __future__ import annotations

import ast
from pathlib import Path

import torch
from torch import nn

PACKAGE = Path(__file__).resolve().parents[2] / "spngd_ds"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """Map each module to the modules of the package it imports.

    Module -> the modules of the package it imports (every ``import`` / ``from ... import``
    anywhere in its source). ``from pkg import name`` counts as importing ``pkg.name`` when that is
    a module, else ``pkg``; relative imports are resolved.
    """
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    top = root.name
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    src = ".".join(base + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                targets = [f"{src}.{a.name}" if f"{src}.{a.name}" in files else src for a in node.names]
            for t in targets:
                if t != top and not t.startswith(top + "."):
                    continue
                while t not in files and "." in t:  # `import a.b.obj`: the module that holds it
                    t = t.rsplit(".", 1)[0]
                if t in files and t != mod:
                    edges.add(t)
        graph[mod] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` as a list of modules (first == last), or ``None``."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def private_accesses(path: Path) -> list[str]:
    """Find private attribute accesses on other objects in ``path``.

    ``obj._name`` in ``path`` where ``obj`` is not ``self``/``cls`` nor a module the file
    imports (``torch._foreach_mul_`` is that library's API); dunders aside.
    """
    tree = ast.parse(path.read_text(), str(path))
    modules = {"self", "cls"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {(a.asname or a.name).split(".")[0] for a in node.names}
    out = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and not (isinstance(node.value, ast.Name) and node.value.id in modules)
        ):
            out.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return out


def test_import_graph_has_no_cycle() -> None:
    graph = import_graph(PACKAGE)
    assert "spngd_ds.paths.fast" in graph["spngd_ds.paths"] and "spngd_ds.optimizer" in graph["spngd_ds"]
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_cycle_finder_sees_a_type_checking_import(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import x\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nx = 1\nif TYPE_CHECKING:\n    from pkg import a\n")
    assert find_cycle(import_graph(pkg)) == ["pkg.a", "pkg.b", "pkg.a"]
    (pkg / "b.py").write_text("x = 1\ndef f():\n    from . import a\n")  # inside a function, relative
    assert find_cycle(import_graph(pkg)) == ["pkg.a", "pkg.b", "pkg.a"]


def test_paths_touch_no_private_member() -> None:
    found = [hit for p in sorted((PACKAGE / "paths").glob("*.py")) for hit in private_accesses(p)]
    assert not found, "private members used by paths: " + "; ".join(found)


def test_private_access_finder(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text(
        "import torch\ndef g(opt, self):\n    torch._foreach_mul_([], 1.0)\n"
        "    self._x = opt.__class__\n    return opt._aligned()\n"
    )
    assert private_accesses(f) == ["m.py:5: opt._aligned"]


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


class _Address:
    def __init__(self, start: int, numel: int) -> None:
        self.start, self.numel = start, numel


class _Mapping:
    """ZeRO 1/2's ``param._hp_mapping`` at one rank: the whole parameter at ``start`` of the flat partition."""

    def __init__(self, start: int, numel: int) -> None:
        self.param_group_index = 0
        self.hp_fragment_address = _Address(start, numel)
        self.lp_fragment_address = _Address(0, numel)


class _ZeroOne:
    """DeepSpeed's ZeRO-1 optimizer at one rank.

    As SP-NGD's compatible path sees it: one fp32 flat partition of every parameter in
    ``param_groups``; a step writes the flat gradient, calls the client optimizer's step and copies
    the partition back into the model.
    """

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        sizes = [p.numel() for p in self.params]
        self.flat = torch.cat([p.detach().flatten() for p in self.params]).clone()
        for p, start in zip(self.params, [sum(sizes[:i]) for i in range(len(sizes))], strict=True):
            p._hp_mapping = _Mapping(start, p.numel())  # type: ignore[attr-defined]
        opt.param_groups[0]["params"] = [self.flat]
        self.optimizer = self  # the engine's optimizer, whose ``overflow`` a skipped step sets
        self.overflow = False

    def zero_optimization_stage(self) -> int:
        return 1

    def step(self, opt: torch.optim.Optimizer) -> None:
        self.flat.grad = torch.cat([p.grad.flatten() for p in self.params])  # type: ignore[union-attr]
        opt.step()
        offset = 0
        with torch.no_grad():
            for p in self.params:
                p.copy_(self.flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()


def test_fast_and_compatible_paths_agree_at_one_rank() -> None:
    """The fast and compatible paths agree on a BatchNorm model.

    Three steps of a BatchNorm model with a changing learning rate at world size 1: the fast
    path (the model's tensors) and the compatible path (a ZeRO-1 flat partition) end at the same
    parameters, and each applied its three steps.
    """
    from spngd_ds.deepspeed.partitions import local_fragment
    from spngd_ds.optimizer import SPNGD
    from spngd_ds.paths import CompatiblePath, FastPath

    torch.manual_seed(1)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    lrs = [0.1, 0.05, 0.02]
    kw = dict(lr=lrs[0], momentum=0.9, damping=1e-2, weight_decay=1e-3, step_bound=None, staleness=None)
    ends = {}
    for kind in ("fast", "compatible"):
        model = _bn_model()
        path = FastPath() if kind == "fast" else None
        opt = SPNGD(model, path=path, **kw)  # type: ignore[arg-type]
        engine = None
        if kind == "compatible":
            engine = _ZeroOne(model, opt)
            opt.path = CompatiblePath(engine, opt, local_fragment)
        for lr in lrs:
            opt.param_groups[0]["lr"] = lr
            nn.functional.cross_entropy(model(x), y).backward()
            if engine is None:
                opt.step()
            else:
                opt.path.before_engine_step(opt)
                engine.step(opt)
                assert opt.path.after_engine_step(opt)
            model.zero_grad()
        assert opt.step_count == len(lrs) and opt.stats_log.skipped_steps == 0
        ends[kind] = [p.detach().clone() for p in model.parameters()]
    start = [p.detach() for p in _bn_model().parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(ends["fast"], start, strict=True))
    for a, b in zip(ends["fast"], ends["compatible"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
