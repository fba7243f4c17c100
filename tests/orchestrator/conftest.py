"""Fixtures for orchestrator tests: a config file, in-process servers, a scripted LLM (helpers: tests.support)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from heist_common.config import load_config
from tests.support.config import write_heist_config
from tests.support.inprocess import InProcessMesh
from tests.support.scripted_llm import ScriptedLLM


@pytest.fixture
def scripted_llm() -> Iterator[ScriptedLLM]:
    with ScriptedLLM() as llm:
        yield llm


@pytest.fixture
def config_path(tmp_path: Path, scripted_llm: ScriptedLLM) -> Path:
    return write_heist_config(tmp_path, llm_base_url=scripted_llm.base_url)


@pytest.fixture
async def mesh(config_path: Path) -> AsyncIterator[InProcessMesh]:
    harness = InProcessMesh(load_config(config_path))
    await harness.start_all()
    try:
        yield harness
    finally:
        await harness.stop_all()
