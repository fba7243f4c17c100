import json
import stat
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from servers import credentials
from servers.settings import REPO_ROOT, ConfigError, load_mesh_settings


def test_repository_config_loads():
    settings = load_mesh_settings(REPO_ROOT / "config" / "heist.yaml")
    assert settings.run_dir == REPO_ROOT / "var"
    assert settings.host_port("calculator") == ("127.0.0.1", 50053)
    assert settings.service("database_query").deadline_s == 3.0
    assert settings.oauth.clients["grpcurl"] == ("calculator:use", "file_reader:use", "database_query:use")
    assert settings.limits.database_query.max_rows == 200
    assert settings.limits.memory.max_message_bytes == 64 * 1024


def write(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def base_config() -> dict:
    return yaml.safe_load((REPO_ROOT / "config" / "heist.yaml").read_text())


def test_orchestrator_sections_are_ignored_and_limits_override_defaults(tmp_path):
    config = base_config()
    config["agents"] = {"anything": {"goes": True}}
    config["llm"] = {"embedded": True, "whatever": 1}
    config["limits"] = {"calculator": {"max_exponent": 64}, "memory": {"default_recent_count": 3}}
    config["mesh"]["run_dir"] = "var/other"
    settings = load_mesh_settings(write(tmp_path, config))
    assert settings.limits.calculator.max_exponent == 64
    assert settings.limits.calculator.max_expression_chars == 500
    assert settings.limits.memory.default_recent_count == 3
    assert settings.run_dir == REPO_ROOT / "var" / "other"
    moved = settings.with_address("memory", "127.0.0.1:0")
    assert moved.address("memory") == "127.0.0.1:0" and settings.address("memory") == "127.0.0.1:50052"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: c["services"]["calculator"].update(adress="x"), "services.calculator.adress: unknown key"),
        (lambda c: c["services"].update(calculater={"address": "127.0.0.1:1"}), "services.calculater: unknown key"),
        (lambda c: c["services"]["memory"].update(deadline_s="fast"), "services.memory.deadline_s: expected"),
        (lambda c: c["services"]["memory"].update(address="localhost"), "services.memory.address: address"),
        (lambda c: c["services"]["memory"].update(address="h:99999"), "out of range"),
        (lambda c: c["services"].pop("oauth"), "services.oauth: missing required service"),
        (lambda c: c["oauth"].update(token_ttl_s="900"), "oauth.token_ttl_s: expected an integer"),
        (lambda c: c["oauth"].update(token_ttl_s=True), "oauth.token_ttl_s: expected an integer"),
        (lambda c: c["oauth"]["clients"].update(mole="database_query:use"), "oauth.clients.mole: expected a list"),
        (lambda c: c["oauth"].update(isuer="x"), "oauth.isuer: unknown key"),
        (lambda c: c["mesh"].update(rundir="x"), "mesh.rundir: unknown key"),
        (lambda c: c.update(limits={"calculator": {"max_exp": 3}}), "limits.calculator.max_exp: unknown key"),
        (lambda c: c.update(limits={"memory": {"max_message_bytes": -1}}), "limits.memory.max_message_bytes"),
        (lambda c: c.update(services=[1, 2]), "services: expected a mapping"),
    ],
)
def test_config_errors_name_the_file_and_key_path(tmp_path, mutate, message):
    config = base_config()
    mutate(config)
    path = write(tmp_path, config)
    with pytest.raises(ConfigError) as caught:
        load_mesh_settings(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert message in str(caught.value)


def test_unreadable_and_invalid_yaml_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_mesh_settings(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("services: [unclosed")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_mesh_settings(tmp_path / "broken.yaml")


def test_dev_credentials_are_private_and_stable(settings, monkeypatch):
    monkeypatch.delenv(credentials.CREDENTIALS_DIR_ENV, raising=False)
    folder = credentials.ensure_dev_credentials(settings)
    assert folder == settings.run_dir / "credentials"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for name in ("clients.json", "signing_key.pem", "public_key.pem"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600
    secrets = json.loads((folder / "clients.json").read_text())
    assert set(secrets) == set(settings.oauth.clients) and len(set(secrets.values())) == len(secrets)
    key_before = (folder / "signing_key.pem").read_bytes()
    credentials.ensure_dev_credentials(settings)
    assert json.loads((folder / "clients.json").read_text()) == secrets
    assert (folder / "signing_key.pem").read_bytes() == key_before
    assert credentials.client_secret(settings, "mole") == secrets["mole"]
    assert credentials.signing_key(settings).public_key() == credentials.public_key(settings)


def test_environment_wins_over_generated_files(settings, tmp_path, monkeypatch):
    credentials.ensure_dev_credentials(settings)
    monkeypatch.setenv("HEIST_OAUTH_CLIENT_SECRET_SAFECRACKER", "from-vault")
    assert credentials.client_secret_env_var("my-client.v2") == "HEIST_OAUTH_CLIENT_SECRET_MY_CLIENT_V2"
    assert credentials.client_secret(settings, "safecracker") == "from-vault"
    key = Ed25519PrivateKey.generate()
    private_file = tmp_path / "prod_signing.pem"
    private_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    public_file = tmp_path / "prod_public.pem"
    public_file.write_text(credentials.public_pem(key.public_key()))
    monkeypatch.setenv("HEIST_OAUTH_SIGNING_KEY_FILE", str(private_file))
    monkeypatch.setenv("HEIST_OAUTH_PUBLIC_KEY_FILE", str(public_file))
    assert credentials.signing_key(settings).public_key() == key.public_key()
    assert credentials.public_key(settings) == key.public_key()


def test_credentials_dir_can_be_moved(settings, tmp_path, monkeypatch):
    monkeypatch.setenv("HEIST_CREDENTIALS_DIR", str(tmp_path / "elsewhere"))
    assert credentials.ensure_dev_credentials(settings) == tmp_path / "elsewhere"
    assert (tmp_path / "elsewhere" / "clients.json").exists()
    assert not (settings.run_dir / "credentials").exists()


def test_missing_secret_says_how_to_provide_it(settings):
    with pytest.raises(credentials.CredentialsError, match="HEIST_OAUTH_CLIENT_SECRET_PLANNER"):
        credentials.client_secret(settings, "planner")
