from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config import ConfigError, load_config, resolve_database_url
from tests.orchestrator.conftest import write_heist_config


def test_repository_config_loads_with_default_crew() -> None:
    config = load_config(Path(__file__).resolve().parents[2] / "config" / "heist.yaml")
    crew = config.agents_by_name
    assert list(crew) == ["planner", "hacker", "safecracker", "mole"]
    assert crew["planner"].tools == ()
    assert crew["hacker"].tools == ("file_reader",)
    assert crew["safecracker"].tools == ("calculator",)
    assert crew["mole"].tools == ("database_query",)
    assert crew["mole"].is_saboteur and not crew["planner"].is_saboteur
    assert config.llm.tool_calling == "inline"
    assert config.database.url.endswith("var/audit/heist.db")
    assert config.mesh.services["memory"].deadline_s == 1.0


def test_defaults_when_sections_are_absent(tmp_path: Path) -> None:
    path = write_heist_config(tmp_path)
    text = path.read_text()
    path.write_text(text.split("llm:")[0])  # drop llm, session, database, resilience
    config = load_config(path)
    assert config.llm.base_url == "http://127.0.0.1:1234/v1"
    assert config.llm.model == "gemma-3-270m"
    assert config.llm.embedded is True
    assert config.session.strategy == "round_robin"
    assert config.database.url == f"sqlite:///{tmp_path / 'run' / 'audit' / 'heist.db'}"
    assert config.resilience.circuit_breaker.failure_threshold == 3


def test_missing_api_key_env_uses_placeholder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_config(write_heist_config(tmp_path, llm={"api_key_env": "HEIST_TEST_NO_SUCH_KEY"}))
    monkeypatch.delenv("HEIST_TEST_NO_SUCH_KEY", raising=False)
    assert config.llm.api_key == "not-needed"
    monkeypatch.setenv("HEIST_TEST_NO_SUCH_KEY", "sk-123")
    assert config.llm.api_key == "sk-123"


def test_sampling_extras_go_to_extra_body(tmp_path: Path) -> None:
    config = load_config(write_heist_config(tmp_path, llm={"repeat_penalty": 1.2, "stop": ["\n"], "top_k": 40}))
    assert config.llm.extra_body == {"repeat_penalty": 1.2, "stop": ["\n"], "top_k": 40}


@pytest.mark.parametrize(
    ("sections", "fragment"),
    [
        ({"llm": {"temprature": 0.5}}, "llm.temprature: unknown key"),
        ({"llm": {"temperature": "hot"}}, "llm.temperature: expected a number"),
        ({"llm": {"tool_calling": "magic"}}, "llm.tool_calling: expected one of native, inline, auto"),
        ({"session": {"max_turns": 0}}, "session.max_turns: must be at least 1"),
        ({"session": {"strategy": "chaos"}}, "session.strategy"),
        ({"session": {"memory": {"recent": 3}}}, "session.memory.recent: unknown key"),
        ({"database": {"path": "x.db"}}, "database.path: unknown key"),
        (
            {"resilience": {"circuit_breaker": {"failure_threshold": "3"}}},
            "resilience.circuit_breaker.failure_threshold: expected an integer",
        ),
        ({"resilience": {"grpc_retry": {"max_attempts": 9}}}, "resilience.grpc_retry.max_attempts"),
        ({"agentz": []}, "agentz: unknown key"),
        ({"services": {"memory": {"adress": "x:1"}}}, "adress"),
    ],
)
def test_wrong_key_or_type_names_key_and_file(tmp_path: Path, sections: dict[str, object], fragment: str) -> None:
    path = write_heist_config(tmp_path, **sections)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert fragment in str(caught.value)
    assert str(path) in str(caught.value)


def _agent(name: str, tools: list[str] | None = None) -> dict[str, object]:
    return {"name": name, "role": name.title(), "system_prompt": f"You are {name}.", "tools": tools or []}


def test_unknown_tool_fails(tmp_path: Path) -> None:
    path = write_heist_config(tmp_path, agents=[_agent("planner"), _agent("hacker", ["lockpick"])])
    with pytest.raises(ConfigError, match=r"agents\[1\]\.tools: unknown tool 'lockpick'"):
        load_config(path)


def test_agent_missing_from_turn_order_fails(tmp_path: Path) -> None:
    agents = [_agent("planner"), _agent("hacker", ["file_reader"])]
    path = write_heist_config(tmp_path, agents=agents, session={"turn_order": ["planner"]})
    with pytest.raises(ConfigError, match=r"session\.turn_order: is missing agents: hacker"):
        load_config(path)


def test_turn_order_naming_unknown_agent_fails(tmp_path: Path) -> None:
    path = write_heist_config(tmp_path, agents=[_agent("planner")], session={"turn_order": ["planner", "driver"]})
    with pytest.raises(ConfigError, match=r"session\.turn_order: names unknown agents: driver"):
        load_config(path)


def test_tool_agent_needs_registered_oauth_client(tmp_path: Path) -> None:
    agents = [_agent("planner"), {**_agent("driver", ["calculator"]), "oauth_client": "nobody"}]
    with pytest.raises(ConfigError, match=r"agents\[1\]\.oauth_client: 'nobody' is not in oauth.clients"):
        load_config(write_heist_config(tmp_path, agents=agents))


def test_unreadable_config_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")


def test_relative_sqlite_url_is_anchored_at_repository_root() -> None:
    url = resolve_database_url("sqlite:///var/audit/x.db", Path("/unused"))
    assert url.startswith("sqlite:////") and url.endswith("/var/audit/x.db")
    assert resolve_database_url("sqlite:////abs/x.db", Path("/unused")) == "sqlite:////abs/x.db"
    assert resolve_database_url("postgresql://u@h/db", Path("/unused")) == "postgresql://u@h/db"
