"""The data-plane benchmark at toy size: every configuration row present, no failed call, replicas both used."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.bench
@pytest.mark.timeout(600)
def test_mesh_transport_smoke_compares_transports_and_replicas(tmp_path: Path) -> None:
    out = tmp_path / "mesh.json"
    completed = subprocess.run(
        [sys.executable, "-m", "tests.bench.mesh_transport", "--smoke", "--rounds", "1", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=540,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    rows = {row["configuration"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"plaintext, 1 replica", "mtls, 1 replica", "mtls, 2 calculator replicas"}
    assert [rows[name]["transport"] for name in sorted(rows)] == ["mtls", "mtls", "plaintext"]
    for row in rows.values():
        assert row["evaluate"]["rps"] > 0 and not row["evaluate"]["errors"] and row["turn_p50_ms"] > 0
    spread = rows["mtls, 2 calculator replicas"]["evaluate_calls_per_replica"]
    # Both replicas serve; how evenly is reported, not asserted (a CPU-starved replica joins the rotation late).
    assert len(spread) == 2 and min(spread) > 0, f"round_robin uses both replicas: {spread}"
