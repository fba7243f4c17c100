"""Fixtures for the failure drills: every service a real process, killed and starved for real.

Every service runs as its own ``python -m servers.<name>`` process on a free
127.0.0.1 port (``tests.support.processes.ProcessMesh``), which a drill can
``kill -9``, freeze (SIGSTOP), thaw (SIGCONT) and restart on the same port; the
``drill_mesh`` fixture stops every process it started, even when a test fails
half-way. Turns are driven by ``tests.drills.script.DrillScript``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.drills.script import START_TIMEOUT_S
from tests.support.processes import ProcessMesh
from tests.support.scripted_llm import ScriptedLLM


@pytest.fixture
def scripted_llm() -> Iterator[ScriptedLLM]:
    with ScriptedLLM() as llm:
        yield llm


@pytest.fixture
def drill_mesh(tmp_path: Path, scripted_llm: ScriptedLLM) -> Iterator[Callable[..., ProcessMesh]]:
    """Factory: ``drill_mesh(**config_sections)``; every process started is stopped at teardown."""
    made: list[ProcessMesh] = []

    def make(**sections: Any) -> ProcessMesh:
        # Generous LLM timeout: drill actions (restart, cool-down waits) run while a turn awaits its reply.
        sections.setdefault("llm", {"base_url": scripted_llm.base_url, "timeout_s": 10, "max_retries": 0})
        mesh = ProcessMesh(tmp_path, llm_base_url=scripted_llm.base_url, start_timeout_s=START_TIMEOUT_S, **sections)
        made.append(mesh)
        return mesh

    try:
        yield make
    finally:
        for mesh in made:
            mesh.stop()
