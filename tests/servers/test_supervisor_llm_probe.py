"""The supervisor's LLM health means "can complete", not "lists a model"."""

from __future__ import annotations

from servers.supervisor import llm_completes
from tests.support.ports import free_port
from tests.support.scripted_llm import ScriptedLLM


def test_serving_only_when_a_one_token_completion_succeeds() -> None:
    with ScriptedLLM() as llm:
        assert llm_completes(llm.base_url, "gemma-3-270m", 2.0) == "SERVING"
        assert llm.probe_requests == [{"model": "gemma-3-270m", "prompt": "OK", "max_tokens": 1, "temperature": 0}]
        llm.probe_status = 500  # listed, listening, but the completion fails: the AMX crash's shape
        assert llm_completes(llm.base_url, "gemma-3-270m", 2.0) == "DOWN"
        assert llm.text_requests == [], "the probe never consumes a scripted turn"


def test_down_when_nothing_listens() -> None:
    assert llm_completes(f"http://127.0.0.1:{free_port()}/v1", "m", 1.0) == "DOWN"
