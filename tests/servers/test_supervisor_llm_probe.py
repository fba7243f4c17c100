"""The supervisor's LLM health means "can complete", not "lists a model"."""

from __future__ import annotations

from pathlib import Path

import pytest

from heist_common.config import load_config
from servers import llama_server
from servers.supervisor import Supervisor, llm_completes
from tests.support.config import write_heist_config
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


def test_the_embedded_model_runs_on_llama_server_with_parallel_slots_metrics_and_a_chat_template(
    tmp_path: Path,
) -> None:
    config = load_config(write_heist_config(tmp_path))
    config = config.with_overrides(llm=config.llm.model_copy(update={"parallel": 3}))
    process = Supervisor(config).llm_process()
    command = process.command
    assert Path(command[0]).name == "llama-server"
    flag = {name: value for name, value in zip(command, [*command[1:], ""], strict=True) if name.startswith("--")}
    assert flag["--parallel"] == "3" and flag["--ctx-size"] == str(3 * llama_server.CONTEXT_PER_SLOT)
    assert "--cont-batching" in command and "--metrics" in command and "--jinja" in command
    assert flag["--alias"] == config.llm.model
    assert flag["--chat-template-file"] == str(config.mesh.models_dir / llama_server.CHAT_TEMPLATE_FILE)
    # `make status` lists its Prometheus endpoint: llama-server serves /metrics on its own port.
    assert process.metrics_address == process.address
    # `make stop` recognises it by its command line, and nothing else named like a service.
    assert llama_server.is_llama_server([command[0].encode(), b"--model", b"m"])
    assert not llama_server.is_llama_server([b"/usr/bin/python3", b"-m", b"llama_cpp.server"])


def test_serve_refuses_to_start_the_model_without_llama_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(llama_server, "BINARY", tmp_path / "bin" / "llama-server")
    monkeypatch.setenv("PATH", str(tmp_path))
    config = load_config(write_heist_config(tmp_path))
    error = Supervisor(config).prepare_llm()
    assert error is not None and "make install" in error and "llama-server" in error
