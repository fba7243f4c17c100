"""The one config file: declared once (pydantic), read once, and every mistake named by key and file."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from heist_common.config import DEFAULT_CONFIG_PATH, ConfigError, load_config, located, resolve_database_url
from heist_common.layout import IN_CHECKOUT, REPO_ROOT, shipped_config_path
from servers.runtime.lifecycle import service_limits
from tests.support.config import CREW, shipped, write_heist_config


def write(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_repository_config_loads() -> None:
    config = load_config(REPO_ROOT / "config" / "heist.yaml")
    crew = config.agents_by_name
    assert list(crew) == ["planner", "hacker", "safecracker", "mole"]
    assert crew["planner"].tools == ()
    assert crew["hacker"].tools == ("file_reader",)
    assert crew["mole"].is_saboteur and not crew["planner"].is_saboteur
    assert crew["hacker"].oauth_client == "hacker"
    assert config.llm.tool_calling == "inline" and config.llm.prompt_style == "transcript"
    assert config.database.url.endswith("var/audit/heist.db")
    assert config.mesh.run_dir == REPO_ROOT / "var"
    assert config.service("calculator").host == "127.0.0.1" and config.service("calculator").port == 18053
    assert config.service("database_query").deadline_s == 3.0
    assert config.oauth.clients["grpcurl"][:3] == ("calculator:use", "file_reader:use", "database_query:use")
    assert config.tool_names == ("calculator", "file_reader", "database_query")
    assert config.turn_order == ("planner", "hacker", "safecracker", "mole")


def test_defaults_when_sections_are_absent(tmp_path: Path) -> None:
    data = {
        "services": shipped()["services"],
        "oauth": {"clients": shipped()["oauth"]["clients"]},
        "agents": CREW,
        "mesh": {"run_dir": str(tmp_path / "run")},
    }
    config = load_config(write(tmp_path, data))
    assert config.llm.base_url == "http://127.0.0.1:1234/v1"
    assert config.llm.model == "gemma-3-270m" and config.llm.embedded is True
    assert config.session.strategy == "round_robin"
    assert config.database.url == f"sqlite:///{tmp_path / 'run' / 'audit' / 'heist.db'}"
    assert config.resilience.circuit_breaker.failure_threshold == 3
    assert config.resilience.llm_max_consecutive_failures == 3


def test_each_service_validates_its_own_limits(tmp_path: Path) -> None:
    config = load_config(write_heist_config(tmp_path, limits={"calculator": {"max_exponent": 64}}))
    calculator = service_limits("calculator", config)
    assert calculator.max_exponent == 64 and calculator.max_expression_chars == 500  # type: ignore[attr-defined]
    assert service_limits("memory", config).max_message_bytes == 64 * 1024  # type: ignore[attr-defined]
    bad = load_config(write_heist_config(tmp_path, "bad.yaml", limits={"calculator": {"max_exp": 3}}))
    with pytest.raises(ConfigError) as caught:
        service_limits("calculator", bad)
    assert str(caught.value) == f"{bad.config_path}: services.calculator.limits.max_exp: unknown key"
    negative = load_config(write_heist_config(tmp_path, "neg.yaml", limits={"memory": {"max_message_bytes": -1}}))
    with pytest.raises(ConfigError, match=r"services\.memory\.limits\.max_message_bytes: .*greater than or equal to 1"):
        service_limits("memory", negative)


def test_missing_api_key_env_uses_placeholder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_config(write_heist_config(tmp_path, llm={"api_key_env": "HEIST_TEST_NO_SUCH_KEY"}))
    monkeypatch.delenv("HEIST_TEST_NO_SUCH_KEY", raising=False)
    assert config.llm.api_key == "not-needed"
    monkeypatch.setenv("HEIST_TEST_NO_SUCH_KEY", "sk-123")
    assert config.llm.api_key == "sk-123"


def test_sampling_extras_go_to_extra_body(tmp_path: Path) -> None:
    config = load_config(write_heist_config(tmp_path, llm={"repeat_penalty": 1.2, "stop": ["\n"], "top_k": 40}))
    assert config.llm.extra_body == {"repeat_penalty": 1.2, "stop": ["\n"], "top_k": 40}


def _agent(name: str, tools: list[str] | None = None) -> dict[str, object]:
    return {"name": name, "role": name.title(), "system_prompt": f"You are {name}.", "tools": tools or []}


@pytest.mark.parametrize(
    ("sections", "fragment"),
    [
        ({"llm": {"temprature": 0.5}}, "llm.temprature: unknown key"),
        ({"llm": {"temperature": "hot"}}, "llm.temperature: Input should be a valid number"),
        ({"llm": {"tool_calling": "magic"}}, "llm.tool_calling: Input should be 'native', 'inline' or 'auto'"),
        ({"llm": {"base_url": "ftp://x"}}, "llm.base_url: must be an http:// or https:// URL"),
        ({"llm": {"prompt_style": "transcript", "tool_calling": "native"}}, "native function calling needs"),
        ({"session": {"max_turns": 0}}, "session.max_turns: Input should be greater than or equal to 1"),
        ({"session": {"strategy": "chaos"}}, "session.strategy"),
        ({"session": {"memory": {"recent": 3}}}, "session.memory.recent: unknown key"),
        ({"database": {"path": "x.db"}}, "database.path: unknown key"),
        ({"resilience": {"circuit_breaker": {"failure_threshold": "3"}}}, "failure_threshold: Input should be a valid"),
        ({"resilience": {"grpc_retry": {"max_attempts": 9}}}, "resilience.grpc_retry.max_attempts"),
        ({"agentz": []}, "agentz: unknown key"),
        ({"agents": []}, "agents: Tuple should have at least 1 item"),
        ({"agents": [_agent("planner"), _agent("hacker", ["lockpick"])]}, "agents[1].tools: unknown tool 'lockpick'"),
        ({"agents": [_agent("planner"), _agent("planner")]}, "duplicate agent names: planner"),
        ({"oauth": {"token_ttl_s": "900"}}, "oauth.token_ttl_s: Input should be a valid integer"),
        ({"oauth": {"token_ttl_s": True}}, "oauth.token_ttl_s: Input should be a valid integer"),
        ({"oauth": {"clients": {"mole": "database_query:use"}}}, "oauth.clients.mole: Input should be a valid tuple"),
        ({"oauth": {"isuer": "x"}}, "oauth.isuer: unknown key"),
        ({"mesh": {"rundir": "x"}}, "mesh.rundir: unknown key"),
        ({"services": [1, 2]}, "services: Input should be a valid dictionary"),
    ],
)
def test_wrong_key_or_type_names_key_and_file(tmp_path: Path, sections: dict[str, Any], fragment: str) -> None:
    path = write_heist_config(tmp_path, **sections)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert fragment in str(caught.value)
    assert str(caught.value).startswith(f"{path}: ")


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda c: c["services"]["calculator"].update(adress="x"), "services.calculator.adress: unknown key"),
        (lambda c: c["services"].update(calculater={"address": "127.0.0.1:1"}), "services.calculater: service"),
        (lambda c: c["services"]["memory"].update(deadline_s="fast"), "services.memory.deadline_s: Input should"),
        (
            lambda c: c["services"]["memory"].update(address="localhost"),
            "services.memory.address: address 'localhost' is not host:port",
        ),
        (lambda c: c["services"]["memory"].update(address="h:99999"), "out of range"),
        (lambda c: c["services"].pop("oauth"), "missing required service(s): oauth"),
    ],
)
def test_service_mistakes_name_the_service(tmp_path: Path, mutate: Any, fragment: str) -> None:
    data = copy.deepcopy(shipped())
    mutate(data)
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert fragment in str(caught.value), str(caught.value)


def test_a_service_without_a_contract_names_the_proto_it_expects(tmp_path: Path) -> None:
    data = copy.deepcopy(shipped())
    data["services"]["lockpick"] = {"address": "127.0.0.1:1"}
    with pytest.raises(ConfigError, match=r"services\.lockpick: .*protos/heist/lockpick/v1/lockpick\.proto"):
        load_config(write(tmp_path, data))


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


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"services: [unclosed", "invalid YAML"),
        (b"\xff\xfe not utf-8", "not UTF-8 text"),
        (b"[" * 5000 + b"]" * 5000, "nested too deeply"),
        (b"- just\n- a list\n", "expected a mapping of sections"),
        (b"llm: {}\nllm: {}\n", "duplicate key 'llm'"),
    ],
)
def test_unreadable_files_are_config_errors_not_tracebacks(tmp_path: Path, content: bytes, fragment: str) -> None:
    path = tmp_path / "broken.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=fragment):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")


def test_a_checkout_uses_its_own_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The packaged copy is for installed wheels only (tests/packaging): a checkout never falls back to it."""
    assert IN_CHECKOUT and shipped_config_path() == REPO_ROOT / "config" / "heist.yaml"
    monkeypatch.chdir(tmp_path)  # no config/ here
    assert located(DEFAULT_CONFIG_PATH) == DEFAULT_CONFIG_PATH
    with pytest.raises(ConfigError, match=r"^config/heist\.yaml: cannot read config"):
        load_config(DEFAULT_CONFIG_PATH)


def test_relative_sqlite_url_is_anchored_at_repository_root() -> None:
    url = resolve_database_url("sqlite:///var/audit/x.db", Path("/unused"))
    assert url.startswith("sqlite:////") and url.endswith("/var/audit/x.db")
    assert resolve_database_url("sqlite:////abs/x.db", Path("/unused")) == "sqlite:////abs/x.db"
    assert resolve_database_url("postgresql://u@h/db", Path("/unused")) == "postgresql://u@h/db"


def test_copies_keep_their_source_file(tmp_path: Path) -> None:
    config = load_config(write_heist_config(tmp_path))
    moved = config.with_service_address("memory", "127.0.0.1:7")
    assert moved.service("memory").address == "127.0.0.1:7" and config.service("memory").address != "127.0.0.1:7"
    assert moved.config_path == config.config_path == (tmp_path / "heist.yaml").resolve()


def test_redact_urls_hides_only_passwords_in_a_message() -> None:
    from heist_common.config import redact_urls

    message = (
        "audit database postgresql://bob@db:5432/heist: cannot write a turn: gone; "
        "audit database postgresql://bob:hunter2@db:5432/heist: cannot finish: refused; redis://:pw@cache:6379/0"
    )
    assert redact_urls(message) == (
        "audit database postgresql://bob@db:5432/heist: cannot write a turn: gone; "
        "audit database postgresql://bob:***@db:5432/heist: cannot finish: refused; redis://:***@cache:6379/0"
    )
    assert redact_urls("http://127.0.0.1:9/v1 and sqlite:////tmp/a.db") == "http://127.0.0.1:9/v1 and sqlite:////tmp/a.db"


@pytest.mark.parametrize(
    ("llm", "keys"),
    [
        ({"tool_calling": "inline", "constrained_tools": "json_schema"}, ("json_schema", "tool_calling: inline")),
        (
            {"prompt_style": "transcript", "tool_calling": "auto", "constrained_tools": "json_schema"},
            ("json_schema", "prompt_style: transcript"),
        ),
        ({"tool_calling": "native", "constrained_tools": "grammar"}, ("grammar", "tool_calling: native")),
        ({"tool_calling": "auto", "constrained_tools": "grammar"}, ("grammar", "tool_calling: auto")),
        ({"tool_calling": "inline", "prefill_tool_every": 2}, ("prefill_tool_every: 2", "tool_calling: inline")),
    ],
)
def test_combinations_that_would_be_ignored_are_refused_naming_the_keys(
    tmp_path: Path, llm: dict[str, Any], keys: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    from orchestrator.cli import main

    path = write_heist_config(tmp_path, llm={"base_url": "http://127.0.0.1:9/v1", **llm})
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: llm: "), message
    assert keys[0] in message, message
    assert keys[1] in message, message
    assert main(["--config", str(path), "health"]) == 3
    assert keys[1] in capsys.readouterr().err


@pytest.mark.parametrize(
    "llm",
    [
        {"prompt_style": "chat", "tool_calling": "native", "constrained_tools": "json_schema", "prefill_tool_every": 2},
        {"prompt_style": "chat", "tool_calling": "auto", "constrained_tools": "auto", "prefill_tool_every": 1},
        {"prompt_style": "chat", "tool_calling": "inline", "constrained_tools": "grammar"},
        {"prompt_style": "transcript", "constrained_tools": "grammar", "prefill_tool_every": 2},
        {"prompt_style": "transcript", "tool_calling": "inline", "constrained_tools": "off"},
    ],
)
def test_combinations_that_take_effect_load(tmp_path: Path, llm: dict[str, Any]) -> None:
    config = load_config(write_heist_config(tmp_path, llm={"base_url": "http://127.0.0.1:9/v1", **llm}))
    assert config.llm.constrained_tools == llm["constrained_tools"]
