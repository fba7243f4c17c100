"""The benchmark smoke run end to end: every section present with sane numbers (targets are NOT asserted)."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.bench
@pytest.mark.timeout(600)
def test_smoke_run_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "smoke.json"
    completed = subprocess.run(
        [sys.executable, "-m", "tests.bench.run", "--smoke", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=540,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "targets:" in completed.stdout
    results = json.loads(out.read_text())

    machine = results["machine"]
    assert machine["cores"] >= 1 and machine["cpu_model"] and machine["python"] and machine["grpcio"]

    real = results["real_path"]
    assert set(real) == {"transcript", "transcript_grammar", "chat"}
    for style, requests_per_turn in (("transcript", 1), ("transcript_grammar", 2), ("chat", 2)):
        row = real[style]
        assert row["turns"] >= 40 and row["llm_requests_per_turn"] == requests_per_turn
        for key in ("total_ms", "llm_ms", "floor_ms"):
            assert 0 < row[key]["p50_ms"] <= row[key]["p90_ms"] <= row[key]["p99_ms"]
        # the turn contains its LLM requests; the floor replays the very requests the session made
        assert row["llm_ms"]["mean_ms"] < row["total_ms"]["mean_ms"]
        assert row["floor_ms"]["n"] == row["turns"]
        assert row["endpoint_us_per_request"] > 0
        assert row["whole_process"]["repeats"] >= 1 and "ms_per_turn" in row["whole_process"]

    layers = results["llm_requests"]
    assert set(layers) == {
        "sdk create()",
        "LLMClient.complete",
        "httpx2, default transport",
        "raw HTTP/1.1",
    }
    assert all(row["median_us"] > 0 for row in layers.values())

    startup = results["startup"]
    assert set(startup["commands"]) == {"--help", "sessions", "show", "export", "health", "health (mTLS)"}
    assert all(row["median_s"] > 0 for row in startup["commands"].values())
    assert 0 < startup["run_first_turn"]["median_s"] < 60
    for row in [*startup["commands"].values(), startup["run_first_turn"]]:
        # every command has its floor from the same rounds, and the difference is reported against it
        assert row["floor_imports"] and 0 < row["floor_median_s"] < 60
        assert abs(row["over_floor_s"] - (row["median_s"] - row["floor_median_s"])) <= 0.0015
    assert startup["commands"]["sessions"]["floor"] != startup["commands"]["health"]["floor"]

    turn = results["turn_overhead"]
    assert turn["turns"] >= 100
    for key in ("total_ms", "service_ms", "tool_rpc_ms"):
        assert 0 < turn[key]["p50_ms"] <= turn[key]["p90_ms"] <= turn[key]["p99_ms"]
    assert set(turn["by_tool_total_ms"]) == {"calculator", "file_reader", "database_query"}

    throughput = results["throughput"]
    assert {"store_memory", "evaluate", "get_compressed_memory", "read_file", "query", "issue_token"} <= set(throughput)
    for row in throughput.values():
        assert row["rps"] > 0 and row["requests"] > 0 and row["p99_ms"] > 0
        assert row["concurrency"] == 64
        assert not row["errors"], row
    assert throughput["evaluate"]["auth"] is True

    sessions = results["parallel_sessions"]
    assert {row["sessions"] for row in sessions} == {1, 4, 16}
    for row in sessions:
        assert row["turns_per_s"] > 0 and row["turn_p99_ms"] > 0
    http_rows = {row["style"]: row for row in results["parallel_http"]}
    assert set(http_rows) == {"transcript", "transcript_grammar", "chat"}
    for style, row in http_rows.items():
        assert row["sessions"] == 64 and row["llm_delay_ms"] == 200
        assert row["turns"] == 64 * results["sizes"]["http_parallel_turns"]
        assert row["ideal_turns_per_s"] == (320.0 if style == "transcript" else 160.0)  # sessions / (0.2 s x requests)
        # nothing can beat every session waiting on the model all the time
        assert 0 < row["turns_per_s"] <= row["ideal_turns_per_s"] * 1.05

    service = results["service"]
    [through] = service["service"]
    assert through["sessions"] == 2 and through["failures"] == 0
    assert through["wall_s"] > 0 and through["peak_rss_mb"] > 0
    assert service["processes"]["processes"] == 1 and service["processes"]["failures"] == 0

    llm = results["embedded_llm"]
    assert llm["turns"] >= 1 and llm["requests"] >= 1
    assert llm["endpoint_tokens"] > 0 and llm["end_to_end_tokens"] > 0
    assert llm["endpoint_tokens_per_s"] > 0 and llm["end_to_end_tokens_per_s"] > 0
    assert llm["mesh_cost_pct"] is not None and llm["mesh_time_share_pct"] is not None

    server = results["embedded_server"]["llama-server"]
    assert server["generation"]["one_stream_tokens_per_s"] > 0 and server["generation"]["four_streams_tokens_per_s"] > 0
    assert server["one_vs_four"]["four_completed"] == 4 and server["one_vs_four"]["four_over_one"] > 0
    assert server["constrained"]["free_tool_turn_ms"] > 0 and server["constrained"]["constrained_tool_turn_ms"] > 0
    gateway = results["mcp_gateway"]
    assert [row["concurrency"] for row in gateway["rows"]] == [1, 8]
    for row in gateway["rows"]:
        for path in ("grpc", "mcp"):
            assert row[path]["calls"] == results["sizes"]["mcp_calls"] and row[path]["failures"] == 0
            assert row[path]["calls_per_s"] > 0

    assert set(results["verdict"]) == {
        "transcript_turn_p50_ms",
        "chat_native_turn_p50_ms",
        "transcript_overhead_over_floor_ms",
        "transcript_grammar_overhead_over_floor_ms",
        "chat_overhead_over_floor_ms",
        "cli_command_median_s",
        "run_first_turn_s",
        "services_only_turn_p50_ms",
        "store_memory_rps",
        "evaluate_rps",
        "llm_mesh_cost_pct",
        "llm_mesh_time_share_pct",
        "service_failures",  # the smoke's sizes are not 64 or 256, so only this service target applies
        "four_heists_over_one",
        "constrained_tool_turn_extra_pct",
    }


@pytest.mark.bench
@pytest.mark.timeout(120)
@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load (nghttp2-client) is not installed")
def test_h2load_throughput_checks_grpc_status(tmp_path: Path) -> None:
    from tests.bench.procs import BenchMesh
    from tests.bench.run import tokens_for_load
    from tests.bench.throughput import load

    with BenchMesh(tmp_path) as mesh:
        token = asyncio.run(tokens_for_load(mesh))["calculator:use"]
        log = mesh.log_dir / "calculator.log"
        row = load(mesh.address("calculator"), "evaluate", concurrency=64, duration_s=1.0,
                   env={"HEIST_BENCH_TOKEN": token}, use="h2load", log=log)  # fmt: skip
        assert row["generator"] == "h2load" and row["concurrency"] == 64
        assert row["rps"] > 0 and row["requests"] > 0 and not row["errors"], row
        assert row["grpc_status_checked_by"] == "client check + access log"
        # a call that fails in gRPC (HTTP 200 for h2load) must not be counted as a success
        with pytest.raises(grpc.RpcError):
            load(mesh.address("calculator"), "evaluate", concurrency=64, duration_s=1.0,
                 env={"HEIST_BENCH_TOKEN": "not-a-token"}, use="h2load", log=log)  # fmt: skip


def test_access_log_count_separates_grpc_codes(tmp_path: Path) -> None:
    from tests.bench.h2load import _count_log_lines

    def entry(code: str, session: str) -> str:
        record = {"time": "t", "service": "calculator", "method": "/a/B", "code": code, "session": session}
        return json.dumps(record) + "\n"

    log = tmp_path / "calculator.log"
    log.write_text(entry("INTERNAL", "h2load_evaluate"))
    offset = log.stat().st_size
    with log.open("a") as stream:
        stream.write(entry("OK", "h2load_evaluate") * 3)
        stream.write(entry("UNAUTHENTICATED", "h2load_evaluate"))
        stream.write(entry("OK", "other"))
        stream.write("2026-11-21 12:00:00 INFO heist.server: not an access record\n")
    assert _count_log_lines(log, offset, "h2load_evaluate") == (3, {"UNAUTHENTICATED": 1})
