"""gpu_check/ as far as a CPU can check it: both scripts parse, every carried wheel is pinned in
constraints.txt and brings its own requirements, and ``run.sh --dry-run`` (nothing installed; the
cuda tests skip; step_time.py's flags checked; the default job on the CPU) ends with "GPU CHECK OK".
The real run needs a GPU machine (see gpu_check/README.md)."""

from __future__ import annotations

import importlib.metadata as metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
FETCH = ROOT / "gpu_check" / "fetch_wheels.sh"
RUN = ROOT / "gpu_check" / "run.sh"
# What the nvidia-h200 machine's image already holds, of what the carried packages need
# (the device docs' package list, KINDS.md); torch is the user's own and must not be carried.
MACHINE_HAS = {"torch", "numpy", "tqdm", "packaging", "psutil", "py-cpuinfo", "msgpack", "ninja", "einops"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _carried() -> set[str]:
    text = FETCH.read_text()
    names: set[str] = set()
    for array in ("WHEELS", "BUILT"):
        match = re.search(rf"^{array}=\(([^)]*)\)", text, flags=re.M)
        assert match, f"fetch_wheels.sh has no {array}=(...) list"
        names |= {_norm(n) for n in match.group(1).split()}
    return names


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[_norm(name)] = version
    return pins


@pytest.mark.parametrize("script", [FETCH, RUN], ids=lambda p: p.name)
def test_scripts_parse(script: Path) -> None:
    assert os.access(script, os.X_OK), f"{script} is not executable"
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_every_carried_wheel_is_pinned() -> None:
    pins = _pins()
    missing = sorted(_carried() - set(pins))
    assert not missing, f"fetch_wheels.sh carries packages constraints.txt does not pin: {missing}"


def test_carried_wheels_bring_their_requirements() -> None:
    carried = _carried()
    assert {"deepspeed", "pydantic"} <= carried and "torch" not in carried
    for name in sorted(carried):
        for text in metadata.requires(name) or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": "", "python_version": "3.12"}):
                continue
            dep = _norm(req.name)
            assert dep in carried | MACHINE_HAS, f"{name} needs {dep}, which is neither carried nor on the machine"


def test_downloaded_wheels_match_the_pins() -> None:
    wheels = sorted((ROOT / ".whl").glob("*.whl"))
    if not wheels:
        pytest.skip("no .whl/ here (gpu_check/fetch_wheels.sh not run)")
    pins = _pins()
    for whl in wheels:
        name, version = whl.name.split("-")[:2]
        assert pins.get(_norm(name)) == version, f"{whl.name}: constraints.txt pins {pins.get(_norm(name))}"
    assert {_norm(w.name.split("-")[0]) for w in wheels} == _carried()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_dry_run(tmp_path: Path) -> None:
    env = dict(os.environ, OUT=str(tmp_path), CPU_ONLY="1", OMP_NUM_THREADS="1", JOB_STEPS="3", PYTHON=sys.executable)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(
        ["bash", str(RUN), "--dry-run"], cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=400
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and out.rstrip().endswith("GPU CHECK OK"), out[-6000:]
    cuda_log = (tmp_path / "pytest_cuda.txt").read_text()
    skipped = re.search(r"(\d+) skipped", cuda_log)
    assert skipped and int(skipped.group(1)) >= 9 and "failed" not in cuda_log, cuda_log[-2000:]
    assert "tests/test_cuda.py" in cuda_log  # the cuda tests were collected (and skipped here)
    assert "summary: steps=3 " in (tmp_path / "job.txt").read_text()
    assert "step_time.py takes: --model resnet50 --image_size 224" in out
