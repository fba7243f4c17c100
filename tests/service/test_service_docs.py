"""docs/service.md's grpcurl blocks run as written (the real grpcurl, reflection only) against a real service."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from heist_common.layout import REPO_ROOT
from tests.bench.http_llm import HttpLLM
from tests.e2e.harness import GRPCURL
from tests.support.config import CLIENTS
from tests.support.processes import ProcessMesh

PAGE = REPO_ROOT / "docs" / "service.md"
MARK = "tests/service/test_service_docs.py runs this block"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessMesh]:
    with HttpLLM(delay_ms=250) as llm:
        running = ProcessMesh(
            tmp_path_factory.mktemp("docs"),
            llm_base_url=llm.base_url,
            oauth={"issuer": "heist-oauth", "audience": "heist-mesh",
                   "clients": {**CLIENTS, "grpcurl": ["heist:run", "heist:read"]}},
        )  # fmt: skip
        try:
            running.start()
            running.start("orchestrator")
            yield running
        finally:
            running.stop()


def documented_script(mesh: ProcessMesh) -> str:
    blocks = re.findall(r"^```bash\n(.*?)^```", PAGE.read_text(), re.MULTILINE | re.DOTALL)
    chosen = [block for block in blocks if MARK in block]
    assert len(chosen) == 2, "the page's two grpcurl blocks"
    script = "\n".join(chosen).replace("var/", f"{mesh.config.mesh.run_dir}/")
    shipped = yaml.safe_load((REPO_ROOT / "config" / "heist.yaml").read_text())["services"]
    for name in mesh.ports:
        script = script.replace(shipped[name]["address"], mesh.address(name))
    return script


def test_the_documented_grpcurl_session_runs_as_written(mesh: ProcessMesh, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "grpcurl").symlink_to(GRPCURL)
    (bin_dir / "python").symlink_to(sys.executable)
    (bin_dir / "orchestrator").symlink_to(Path(sys.executable).parent / "orchestrator")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HEIST_CONFIG": str(mesh.config_path)}
    ran = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", documented_script(mesh)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    out = ran.stdout + ran.stderr
    assert ran.returncode == 0, out
    assert "lf.a2a.v1.A2AService" in ran.stdout and "grpc.health.v1.Health" in ran.stdout
    assert ran.stdout.count('"turn"') >= 8, "a status update per turn"
    assert "TASK_STATE_COMPLETED" in ran.stdout and "TASK_STATE_CANCELED" in ran.stdout
    assert '"skills"' in ran.stdout and "Code: Unauthenticated" in ran.stderr
    assert mesh.rows("SELECT DISTINCT client_id FROM sessions WHERE status = 'cancelled'") == [("grpcurl",)]
