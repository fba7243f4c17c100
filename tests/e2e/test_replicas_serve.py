"""End to end: `make serve` with two calculator replicas; status shows each, grpcurl reaches each, stop ends all."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

from heist_common.layout import REPO_ROOT
from tests.e2e.harness import PROCESSES, SERVICES, Mesh, make, server_pids


def test_serve_status_and_stop_handle_every_replica(tmp_path) -> None:
    mesh = Mesh(tmp_path)
    data = yaml.safe_load(mesh.config.read_text())
    data["services"]["calculator"]["replicas"] = 2
    mesh.config.write_text(yaml.safe_dump(data))
    second = f"127.0.0.1:{mesh.ports['calculator'] + 100}"
    try:
        served = make("serve", f"CONFIG={mesh.config}", "LLM=off")
        assert served.returncode == 0, served.stdout + served.stderr
        assert f"calculator.1: SERVING on {second}" in served.stdout
        assert len(server_pids(mesh.config)) == PROCESSES + 1
        status = subprocess.run(
            [sys.executable, "-m", "servers.supervisor", "status", "--config", str(mesh.config)],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert status.returncode == 0, status.stdout
        rows = {line.split()[0]: line.split() for line in status.stdout.splitlines()[1:] if line.strip()}
        assert rows["calculator"][1] == mesh.address("calculator") and rows["calculator.1"][1] == second
        assert rows["calculator"][2] != rows["calculator.1"][2] and rows["calculator.1"][3] == "SERVING"
        for address in (mesh.address("calculator"), second):
            health = mesh.grpcurl("calculator", "-d", json.dumps({"service": SERVICES["calculator"]}), address,
                                  "grpc.health.v1.Health/Check")  # fmt: skip
            assert json.loads(health.stdout) == {"status": "SERVING"}, health.stderr
    finally:
        stopped = make("stop", f"CONFIG={mesh.config}")
    assert "calculator.1: stopped" in stopped.stdout, stopped.stdout
    assert server_pids(mesh.config) == []
