"""Dev credentials: generated once, private, stable; the environment wins for production."""

import json
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from servers.auth import credential_store


def test_dev_credentials_are_private_and_stable(config, monkeypatch):
    monkeypatch.delenv(credential_store.CREDENTIALS_DIR_ENV, raising=False)
    folder = credential_store.ensure_dev_credentials(config)
    assert folder == config.mesh.run_dir / "credentials"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for name in ("clients.json", "signing_key.pem", "public_key.pem"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600
    secrets = json.loads((folder / "clients.json").read_text())
    assert set(secrets) == set(config.oauth.clients) and len(set(secrets.values())) == len(secrets)
    key_before = (folder / "signing_key.pem").read_bytes()
    credential_store.ensure_dev_credentials(config)
    assert json.loads((folder / "clients.json").read_text()) == secrets
    assert (folder / "signing_key.pem").read_bytes() == key_before
    assert credential_store.client_secret(config, "mole") == secrets["mole"]
    assert credential_store.signing_key(config).public_key() == credential_store.public_key(config)


def test_environment_wins_over_generated_files(config, tmp_path, monkeypatch):
    credential_store.ensure_dev_credentials(config)
    monkeypatch.setenv("HEIST_OAUTH_CLIENT_SECRET_SAFECRACKER", "from-vault")
    assert credential_store.client_secret_env_var("my-client.v2") == "HEIST_OAUTH_CLIENT_SECRET_MY_CLIENT_V2"
    assert credential_store.client_secret(config, "safecracker") == "from-vault"
    key = Ed25519PrivateKey.generate()
    private_file = tmp_path / "prod_signing.pem"
    private_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    public_file = tmp_path / "prod_public.pem"
    public_file.write_text(credential_store.public_pem(key.public_key()))
    monkeypatch.setenv("HEIST_OAUTH_SIGNING_KEY_FILE", str(private_file))
    monkeypatch.setenv("HEIST_OAUTH_PUBLIC_KEY_FILE", str(public_file))
    assert credential_store.signing_key(config).public_key() == key.public_key()
    assert credential_store.public_key(config) == key.public_key()


def test_credentials_dir_can_be_moved(config, tmp_path, monkeypatch):
    monkeypatch.setenv("HEIST_CREDENTIALS_DIR", str(tmp_path / "elsewhere"))
    assert credential_store.ensure_dev_credentials(config) == tmp_path / "elsewhere"
    assert (tmp_path / "elsewhere" / "clients.json").exists()
    assert not (config.mesh.run_dir / "credentials").exists()


def test_missing_secret_says_how_to_provide_it(config):
    with pytest.raises(credential_store.CredentialsError, match="HEIST_OAUTH_CLIENT_SECRET_PLANNER"):
        credential_store.client_secret(config, "planner")


def test_a_mounted_secrets_folder_sits_between_the_environment_and_clients_json(config, tmp_path, monkeypatch):
    """Kubernetes mounts a Secret as one file per key: the client id names the file, its content is the secret."""
    credential_store.ensure_dev_credentials(config)
    generated = json.loads((credential_store.credentials_dir(config) / "clients.json").read_text())
    folder = tmp_path / "oauth-clients"
    folder.mkdir()
    (folder / "planner").write_text("from-the-secret\n")  # `kubectl create secret --from-file` keeps the newline
    monkeypatch.setenv(credential_store.CLIENT_SECRETS_DIR_ENV, str(folder))
    assert credential_store.client_secret(config, "planner") == "from-the-secret"
    assert credential_store.client_secret(config, "mole") == generated["mole"], "no file: clients.json"
    monkeypatch.setenv("HEIST_OAUTH_CLIENT_SECRET_PLANNER", "from-env")
    assert credential_store.client_secret(config, "planner") == "from-env"
    (folder / "mole").write_text("")
    with pytest.raises(credential_store.CredentialsError, match="empty"):
        credential_store.client_secret(config, "mole")
    (folder / "mole").write_bytes(b"x" * 5000)
    with pytest.raises(credential_store.CredentialsError, match="not a client secret"):
        credential_store.client_secret(config, "mole")
    (tmp_path / "outside").write_text("not yours")
    with pytest.raises(credential_store.CredentialsError):
        credential_store.client_secret(config, "../outside")  # never a path out of the folder
