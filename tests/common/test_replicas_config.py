"""services.<name>.replicas and security.transport in the config schema."""

from __future__ import annotations

from pathlib import Path

import pytest

from heist_common.config import ConfigError, load_config, replica_address
from orchestrator.mesh.clients import channel_target, retry_service_config
from tests.support.config import write_heist_config


def test_replica_i_listens_on_port_plus_100_i(tmp_path: Path) -> None:
    config = load_config(write_heist_config(tmp_path, addresses={"calculator": "127.0.0.1:18053"},
                                            replicas={"calculator": 3}))  # fmt: skip
    assert config.service("calculator").replica_addresses == ("127.0.0.1:18053", "127.0.0.1:18153", "127.0.0.1:18253")
    assert config.service("oauth").replicas == 1 and len(config.service("oauth").replica_addresses) == 1
    assert config.security.transport == "mtls"
    assert replica_address("[::1]:18053", 1) == "[::1]:18153"


def test_defaults_are_one_replica_and_mtls(tmp_path: Path) -> None:
    config = load_config(Path(__file__).resolve().parents[2] / "config" / "heist.yaml")
    assert config.security.transport == "mtls"
    assert all(service.replicas == 1 for service in config.services.values())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"replicas": {"memory": 2}}, "services.memory.replicas: 2 replicas need the state outside the process"),
        ({"replicas": {"calculator": 0}}, "greater than or equal to 1"),
        ({"replicas": {"calculator": 2}, "addresses": {"calculator": "127.0.0.1:65500"}}, "would need port 65600"),
        ({"transport": "tls"}, "security.transport"),
    ],
)
def test_bad_replica_or_transport_settings_are_refused(tmp_path: Path, options: dict, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write_heist_config(tmp_path, **options))
    assert message in str(caught.value)


def test_memory_may_have_replicas_when_its_state_is_in_redis(tmp_path: Path) -> None:
    config = load_config(write_heist_config(tmp_path, replicas={"memory": 2}, memory_store="redis://127.0.0.1:1/0"))
    assert len(config.service("memory").replica_addresses) == 2


def test_replicas_are_one_static_target_balanced_by_health() -> None:
    assert channel_target(["127.0.0.1:18053"]) == "127.0.0.1:18053"
    assert channel_target(["127.0.0.1:18053", "127.0.0.1:18153"]) == "ipv4:127.0.0.1:18053,127.0.0.1:18153"
    assert channel_target(["[::1]:18053", "[::1]:18153"]) == "ipv6:[::1]:18053,[::1]:18153"
    with pytest.raises(ValueError, match="IP addresses"):
        channel_target(["calculator:50053", "calculator:50153"])
    import json

    from heist_common.config import GrpcRetryConfig

    balanced = json.loads(retry_service_config(["heist.x.v1.X"], GrpcRetryConfig(), health_service="heist.x.v1.X"))
    assert balanced["loadBalancingConfig"] == [{"round_robin": {}}]
    assert balanced["healthCheckConfig"] == {"serviceName": "heist.x.v1.X"}
    assert "loadBalancingConfig" not in json.loads(retry_service_config(["heist.x.v1.X"], GrpcRetryConfig()))
