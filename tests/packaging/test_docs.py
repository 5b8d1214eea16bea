"""The configuration reference documents every key that the validators accept."""

from __future__ import annotations

import re
from pathlib import Path

from spngd_ds.config import SPNGDConfig, StalenessConfig
from spngd_ds.schedules import _OPTIONAL, _REQUIRED

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def _documented_keys() -> set[str]:
    """The first cell of every table row, as a backticked key."""
    keys = set()
    for line in DOC.read_text().splitlines():
        match = re.match(r"\|\s*`([a-z_.0-9]+)`\s*\|", line)
        if match:
            keys.add(match.group(1))
    return keys


def test_every_spngd_key_is_documented() -> None:
    want = set(SPNGDConfig.model_fields) | {f"staleness.{k}" for k in StalenessConfig.model_fields}
    missing = sorted(want - _documented_keys())
    assert not missing, f"docs/configuration.md lacks SPNGD keys: {missing}"


def test_every_schedule_key_is_documented() -> None:
    missing = sorted((set(_REQUIRED) | set(_OPTIONAL)) - _documented_keys())
    assert not missing, f"docs/configuration.md lacks SPNGDPolyDecay keys: {missing}"
