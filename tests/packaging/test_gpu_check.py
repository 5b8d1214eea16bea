"""gpu_check/ as far as a CPU can check it.

Both scripts parse, every carried wheel is pinned in constraints.txt and brings its own
requirements, ``run.sh --dry-run`` (nothing installed; the cuda tests collected and skipped; the
sync count and the step timing on ResNet-18 at 32x32) writes its files and a summary and ends with
"GPU CHECK OK", and a failing step does not stop the later ones. The real run needs a GPU machine
(see gpu_check/README.md).
"""

from __future__ import annotations

import importlib.metadata as metadata
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
FETCH = ROOT / "gpu_check" / "fetch_wheels.sh"
RUN = ROOT / "gpu_check" / "run.sh"
# What the nvidia-h200 machine's image already holds, of what the carried packages need
# (the device docs' package list, KINDS.md); torch is the user's own and must not be carried.
MACHINE_HAS = {"torch", "numpy", "tqdm", "packaging", "psutil", "py-cpuinfo", "msgpack", "ninja", "einops"}
RESULT_FILES = {"env.log", "cuda_tests.log", "syncs.log", "timing.log", "syncs.json", "timing.json", "summary.txt"}


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


def _dry_run(out: Path, **env_extra: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OUT=str(out), OMP_NUM_THREADS="1", PYTHON=sys.executable, **env_extra)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "STEPS", "PYTEST_ADDOPTS"):
        if key not in env_extra:
            env.pop(key, None)
    return subprocess.run(
        ["bash", str(RUN), "--dry-run"], cwd=str(out), env=env, capture_output=True, text=True, timeout=1500
    )


@pytest.mark.dist
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash, timeout")
def test_dry_run(tmp_path: Path) -> None:
    proc = _dry_run(tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and out.rstrip().endswith("GPU CHECK OK"), out[-6000:]
    files = {p.name for p in tmp_path.iterdir()}
    assert files == RESULT_FILES, files  # what comes back from a machine that returns at most 8 files

    cuda_log = (tmp_path / "cuda_tests.log").read_text()
    skipped = re.search(r"(\d+) skipped", cuda_log)
    assert skipped and int(skipped.group(1)) >= 9 and "failed" not in cuda_log, cuda_log[-2000:]
    assert "tests/deepspeed/test_cuda.py" in cuda_log  # the cuda tests were collected (and skipped here)

    syncs: dict[str, Any] = json.loads((tmp_path / "syncs.json").read_text())
    assert syncs["model"] == "resnet18" and syncs["device"] == "cpu"
    for kind in ("spngd_refresh", "spngd_quiet", "sgd_foreach_false", "sgd_foreach_true"):
        for part in ("forward_backward", "step"):
            counts = syncs[kind][part]
            assert counts["aten_ops"] > 0 and counts["cuda_syncs"] == 0, (kind, part, counts)
            assert counts["host_reads"] == sum(counts["host_reads_by_op"].values())
    # the dispatcher count sees what it should: SGD's per-parameter loop against its multi-tensor one,
    # and a refresh step doing more than a quiet one
    assert syncs["sgd_foreach_true"]["step"]["aten_ops"] * 10 < syncs["sgd_foreach_false"]["step"]["aten_ops"]
    assert syncs["spngd_refresh"]["step"]["aten_ops"] > syncs["spngd_quiet"]["step"]["aten_ops"]
    assert syncs["spngd_metrics"]["spngd/skipped_steps"] == 0

    timing: dict[str, Any] = json.loads((tmp_path / "timing.json").read_text())
    setup = timing["setup"]
    assert (setup["model"], setup["image_size"], setup["micro_batch"], setup["gas"]) == ("resnet18", 32, 2, 2)
    med = timing["median_step_s"]
    assert set(med) == {"sgd", "spngd_quiet", "spngd_refresh", "fwd_bwd"}
    assert all(math.isfinite(v) and v > 0 for v in med.values()), med
    assert timing["spngd_metrics"]["spngd/skipped_steps"] == 0
    source = json.loads((ROOT / "bench" / "results" / "step_time_accum_cpu.json").read_text())
    by_kind = source["engines"]["spngd"]["refresh_fraction_by_kind"]
    f = sum(by_kind.values()) / len(by_kind)
    assert timing["refresh_fraction"] == pytest.approx(f)
    expected = (f * med["spngd_refresh"] + (1 - f) * med["spngd_quiet"]) / med["sgd"]
    assert timing["amortized_ratio"] == pytest.approx(expected)

    summary = (tmp_path / "summary.txt").read_text()
    assert "passed: env cuda-tests syncs timing" in summary and "failed: none" in summary, summary
    assert re.search(r"^\d+ skipped", summary, flags=re.M), summary  # pytest's result line
    assert "spngd_refresh step" in summary and "amortized at refresh fraction" in summary, summary


@pytest.mark.dist
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash, timeout")
def test_a_failed_step_does_not_stop_the_later_ones(tmp_path: Path) -> None:
    proc = _dry_run(tmp_path, STEPS="cuda-tests syncs", PYTEST_ADDOPTS="--no-such-option")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and out.rstrip().endswith("GPU CHECK FAILED: cuda-tests"), out[-6000:]
    assert (tmp_path / "syncs.json").is_file()  # the step after the failed one ran
    summary = (tmp_path / "summary.txt").read_text()
    assert "passed: syncs" in summary and "failed: cuda-tests" in summary, summary


def test_timing_still_times_sgd_when_spngd_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A step of SP-NGD that raises is reported as the part's failure.

    A device mismatch, say; SGD's and the forward + backward's figures are still measured.
    """
    sys.path.insert(0, str(ROOT / "gpu_check"))
    try:
        import measure
    finally:
        sys.path.remove(str(ROOT / "gpu_check"))
    from spngd_ds.optimizer import SPNGD

    def broken(self: Any, closure: Any = None) -> None:
        raise RuntimeError("Expected all tensors to be on the same device")

    monkeypatch.setattr(SPNGD, "step", broken)
    assert measure.main(["timing", "--dry-run", "--out", str(tmp_path)]) == 1
    result = json.loads((tmp_path / "timing.json").read_text())
    assert "same device" in result["error"]
    assert set(result["median_step_s"]) == {"sgd", "fwd_bwd"}
    assert all(v > 0 for v in result["median_step_s"].values())
