"""The library stands alone and installs into an existing environment.

- ``import spngd_ds``, ``spngd_ds.initialize`` (a real one-process engine) and
  ``spngd_ds.patch_deepspeed`` work with the training job's packages made unimportable.
- No library module imports the training job (``spngd_ds.recipes``) or its packages.
- pyproject.toml: python 3.10-3.13, the library's own requirements are torch, deepspeed and pydantic
  as ranges; constraints.txt pins every requirement of every extra, inside those ranges.
- No syntax or standard-library name newer than python 3.10.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
LIBRARY = ROOT / "spngd_ds"
#: The training job's packages (the ``train`` extra) and other optional ones the library must not need.
JOB_PACKAGES = ("torchvision", "wandb", "tqdm", "sklearn", "pytorch_optimizer", "transformers", "accelerate")
LIBRARY_REQUIREMENTS = {"torch", "deepspeed", "pydantic"}

STANDALONE = textwrap.dedent(
    """
    import importlib.abc, importlib.machinery, sys

    BLOCKED = {blocked!r}
    DEEPSPEEDS_OWN = {{"tqdm"}}  # a requirement of DeepSpeed itself: only DeepSpeed (and tqdm) may import it

    def importer():
        frame = sys._getframe(2)
        while frame is not None and (
            frame.f_code.co_filename.startswith("<frozen") or "importlib" in frame.f_code.co_filename
        ):
            frame = frame.f_back
        return "" if frame is None else str(frame.f_globals.get("__name__", ""))

    class Missing(importlib.abc.Loader):
        # importing fails as for a package that is not installed; a find_spec probe sees no origin
        def __init__(self, by):
            self.by = by

        def create_module(self, spec):
            raise ModuleNotFoundError(f"blocked by the test: {{spec.name}} (imported by {{self.by}})", name=spec.name)

        def exec_module(self, module):
            pass

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            top, by = name.split(".")[0], importer()
            if top in DEEPSPEEDS_OWN and by.split(".")[0] in ("deepspeed", top):
                return None
            if top in BLOCKED or name == "spngd_ds.recipes" or name.startswith("spngd_ds.recipes."):
                return importlib.machinery.ModuleSpec(name, Missing(by or "?"), origin=None)
            return None

    sys.meta_path.insert(0, Block())
    for probe in ("wandb", "tqdm", "sklearn.datasets", "spngd_ds.recipes.trainer"):  # the blocker itself works
        try:
            __import__(probe)
        except ModuleNotFoundError:
            pass
        else:
            raise AssertionError(f"the import blocker let {{probe}} through")
    import torch
    from torch import nn

    import spngd_ds
    spngd_ds.SPNGD, spngd_ds.SPNGDPolyDecay, spngd_ds.initialize, spngd_ds.patch_deepspeed

    def tiny():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))

    cfg = {{
        "train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 1,
        "optimizer": {{"type": "SPNGD", "params": {{"lr": 0.1, "damping": 0.01}}}},
        "zero_optimization": {{"stage": 0}}, "steps_per_print": 1000,
    }}
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))

    def one_step(init):
        engine, opt, _, _ = init(model=tiny(), config=cfg)
        before = [p.detach().clone() for p in engine.module.parameters()]
        loss = nn.functional.cross_entropy(engine(x), y)
        engine.backward(loss)
        engine.step()
        assert isinstance(opt, spngd_ds.SPNGD) and opt.step_count == 1, (type(opt), opt.step_count)
        assert any(not torch.equal(a, b) for a, b in zip(before, engine.module.parameters()))

    one_step(spngd_ds.initialize)
    spngd_ds.patch_deepspeed()
    import deepspeed
    one_step(deepspeed.initialize)  # the patched entry point, as HF/Accelerate call it
    loaded = sorted(
        m for m in sys.modules
        if (m.split(".")[0] in BLOCKED - DEEPSPEEDS_OWN) or m.startswith("spngd_ds.recipes")
    )
    assert not loaded, loaded
    print("STANDALONE OK")
    from spngd_ds.process_exit import exit_process

    exit_process(0)  # as a job ends: gloo's threads can abort the interpreter's teardown
    """
)


@pytest.mark.dist
def test_library_works_without_the_training_job_packages(tmp_path: Path) -> None:
    script = tmp_path / "standalone.py"
    script.write_text(STANDALONE.format(blocked=set(JOB_PACKAGES)))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0 and "STANDALONE OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-6000:]


def _imports(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file under ``root``, relative ones resolved.

    ``from a import b`` yields both ``a`` and ``a.b``.
    """
    package = path.relative_to(root).with_suffix("").parts[:-1]  # a module's package, or an __init__'s own
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def _library_files() -> list[Path]:
    return [p for p in sorted(LIBRARY.rglob("*.py")) if "recipes" not in p.relative_to(LIBRARY).parts]


def test_library_never_imports_the_training_job() -> None:
    offenders = []
    for path in _library_files():
        for line, module in _imports(path):
            top = module.split(".")[0]
            if module == "spngd_ds.recipes" or module.startswith("spngd_ds.recipes.") or top in JOB_PACKAGES:
                offenders.append(f"{path.relative_to(ROOT)}:{line}: {module}")
    assert not offenders, "library modules import the training job or its packages:\n" + "\n".join(offenders)


def test_import_scan_sees_relative_and_absolute_imports(tmp_path: Path) -> None:
    # the scan above must be able to fail: relative imports of the job are resolved and caught too
    (tmp_path / "spngd_ds" / "blocks").mkdir(parents=True)
    bad = tmp_path / "spngd_ds" / "blocks" / "bad.py"
    bad.write_text("from ..recipes import trainer\nfrom .. import recipes\nimport tqdm\n")
    mods = [m for _, m in _imports(bad, root=tmp_path)]
    assert {"spngd_ds.recipes", "spngd_ds.recipes.trainer", "tqdm"} <= set(mods), mods


# ------------------------------------------------------------------------------ pyproject / pins
def _pyproject() -> dict[str, Any]:
    tomllib = pytest.importorskip("tomllib")  # python >= 3.11
    return dict(tomllib.loads((ROOT / "pyproject.toml").read_text()))


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[;\s]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_python_range_and_library_requirements_are_ranges() -> None:
    project = _pyproject()["project"]
    assert project["requires-python"] == ">=3.10,<3.14"
    deps = project["dependencies"]
    assert {_name(d) for d in deps} == LIBRARY_REQUIREMENTS, deps
    assert not any("==" in d for d in deps), f"the library pins a version: {deps}"
    assert all(re.search(r">=", d) for d in deps), f"every requirement has a lower bound: {deps}"
    extras = project["optional-dependencies"]
    assert {"torchvision", "wandb", "tqdm", "scikit-learn", "numpy", "pytorch-optimizer"} <= {
        _name(d) for d in extras["train"]
    }
    assert "asdfghjkl" in {_name(d) for d in extras["bench"]}
    assert {"transformers", "accelerate"} <= {_name(d) for d in extras["hf"]}


def test_constraints_pin_every_requirement_inside_its_range() -> None:
    from packaging.requirements import Requirement

    project = _pyproject()["project"]
    pins = _constraints()
    assert "spngd-ds" not in pins, "constraints.txt must not pin the project itself"
    requirements = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        requirements += extra
    for text in requirements:
        req = Requirement(text)
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"constraints.txt has no pin for {name}"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} is outside {text!r}"


def test_lint_and_typecheck_target_python_310() -> None:
    tool = _pyproject()["tool"]
    assert tool["ruff"]["target-version"] == "py310"
    assert tool["mypy"]["python_version"] == "3.10"


# ------------------------------------------------------------------------------ python 3.10 syntax
NEWER_THAN_310 = {  # standard-library names added in 3.11+
    "tomllib": "module tomllib (3.11)",
    "typing.Self": "typing.Self (3.11)",
    "typing.Never": "typing.Never (3.11)",
    "typing.LiteralString": "typing.LiteralString (3.11)",
    "typing.assert_never": "typing.assert_never (3.11)",
    "typing.reveal_type": "typing.reveal_type (3.11)",
    "enum.StrEnum": "enum.StrEnum (3.11)",
    "datetime.UTC": "datetime.UTC (3.11)",
    "asyncio.TaskGroup": "asyncio.TaskGroup (3.11)",
}


def _py310_problems(source: str, filename: str) -> list[str]:
    tree = ast.parse(source, filename=filename, feature_version=(3, 10))
    problems = []
    for node in ast.walk(tree):
        if type(node).__name__ in ("TryStar", "TypeAlias", "TypeVar", "ParamSpec", "TypeVarTuple"):
            problems.append(f"{filename}:{node.lineno}: {type(node).__name__} syntax (3.11+)")  # type: ignore[attr-defined]
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            names = [f"{node.value.id}.{node.attr}"]
        problems += [f"{filename}:{node.lineno}: {NEWER_THAN_310[n]}" for n in names if n in NEWER_THAN_310]  # type: ignore[attr-defined]
    return problems


def test_no_syntax_or_stdlib_newer_than_python_310() -> None:
    files = [p for d in ("spngd_ds", "launch", "tests", "bench", "gpu_check") for p in sorted((ROOT / d).rglob("*.py"))]
    problems = [p for f in files for p in _py310_problems(f.read_text(), str(f.relative_to(ROOT)))]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "snippet",
    [
        "import tomllib\n",
        "from typing import Self\n",
        "import datetime\nx = datetime.UTC\n",
        "try:\n    pass\nexcept* ValueError:\n    pass\n",
    ],
)
def test_py310_check_catches(snippet: str) -> None:
    try:
        problems = _py310_problems(snippet, "snippet.py")
    except SyntaxError:
        problems = ["syntax error under feature_version 3.10"]
    assert problems, snippet
