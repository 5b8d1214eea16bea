"""Print and check the environment gpu_check/run.sh runs in.

Every requirement of ``spngd_ds`` (pyproject.toml's ``dependencies``) must be installed at a version
inside its range -- so the GPU machine's own CUDA torch is used, not replaced -- and
``spngd_ds.deepspeed.patch.check_deepspeed_version`` must accept the installed DeepSpeed. Without
``--cpu-ok`` a CUDA device must be visible. Exit status 1 with one line per problem otherwise.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """The ``[project] dependencies`` strings (parsed without tomllib, which python 3.10 lacks)."""
    text = pyproject.read_text(encoding="utf-8")
    match = re.search(r"^dependencies\s*=\s*\[(.*?)^\]", text, flags=re.S | re.M)
    if match is None:
        raise SystemExit(f"no [project] dependencies list in {pyproject}")
    return re.findall(r'"([^"]+)"', match.group(1))


def problems(cpu_ok: bool) -> list[str]:
    """What keeps this machine from running the checks, one line each (empty: nothing)."""
    from packaging.requirements import Requirement

    found = []
    for text in requirements():
        req = Requirement(text)
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            found.append(f"{req.name} is not installed (need {text})")
            continue
        ok = req.specifier.contains(version.split("+")[0], prereleases=True)
        print(f"{req.name:10s} {version:16s} {'ok' if ok else 'OUTSIDE'} {req.specifier}")
        if not ok:
            found.append(f"{req.name} {version} is outside {text!r}")
    import torch

    print(
        f"python     {sys.version.split()[0]}; torch CUDA {torch.version.cuda}; "
        f"GPU {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}"
    )
    if not cpu_ok and not torch.cuda.is_available():
        found.append("no CUDA device visible (torch.cuda.is_available() is false)")
    import spngd_ds
    from spngd_ds.deepspeed.patch import check_deepspeed_version

    try:
        check_deepspeed_version()
    except RuntimeError as exc:
        found.append(str(exc))
    print(f"spngd_ds   {spngd_ds.__version__} from {Path(spngd_ds.__file__).parent}")
    return found


def main(argv: list[str] | None = None) -> int:
    """Print the problems found; exit status 1 when there are any."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--cpu-ok", action="store_true", help="do not require a GPU (dry run)")
    found = problems(p.parse_args(argv).cpu_ok)
    for line in found:
        print(f"problem: {line}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
