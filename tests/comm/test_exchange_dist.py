"""The exchange layer (spngd_ds.comm) on 2, 3 and 4 gloo ranks without DeepSpeed.

to_owners / from_owners / fragments, async, buckets: one group of ranks per world size, forked from
this process (torch is imported once), runs every case of tests/support/exchange_worker.py (unequal owners,
a rank that owns nothing, empty and zero-sized items, several buckets, fp32 / bf16 / float64 wire
dtypes, fragments cut anywhere, bytes by wrapping torch.distributed, the device check). The ranks
assert; this test checks their exit codes and rank 0's summary.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.distributed import start_ranks
from tests.support.exchange_worker import forked_rank

TIMEOUT_S = 60.0


pytestmark = pytest.mark.dist


def launch(world: int, out: Path) -> dict[str, object]:
    codes = start_ranks(lambda rank, port: forked_rank(rank, world, port, str(out)), world, TIMEOUT_S)
    assert codes == [0] * world, f"rank exit codes {codes} (tracebacks above, in the captured stderr)"
    return dict(json.loads(out.read_text()))


@pytest.mark.parametrize("world", [2, 3, 4])
def test_exchange_on_gloo_ranks(world: int, tmp_path: Path) -> None:
    summary = launch(world, tmp_path / "summary.json")
    assert summary["world"] == world and summary["ranks_done"] == world
    assert summary["exchange_runs"] == 5 * 3 * 2  # layouts x wire dtypes x bucket sizes
    assert int(str(summary["buckets_small"])) > 1  # the small bucket really cut the exchange
    assert summary["fragment_trials"] == 3
    assert summary["device_checks"] == 6
