"""Helpers of the abuse suite: one hostile target process at a time, and /proc readings of what it costs.

Every server here is its own ``python -m servers.<name>`` process on a free
127.0.0.1 port (``tests.support.processes.ServerProcess``), started from a
throwaway config with dev credentials, and stopped in a ``finally`` whatever the
test did. Tokens are minted with the dev signing key, as the OAuth server would.
Resource checks read ``/proc``: the server and its children (the query workers)
are measured together, so memory moved into a child is still counted.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from heist_common.config import HeistConfig, load_config
from servers.auth import credential_store
from servers.auth.tokens import issue_token
from tests.support.channels import channel
from tests.support.config import write_heist_config
from tests.support.ports import free_port
from tests.support.processes import ServerProcess

START_TIMEOUT_S = 20.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def write_config(folder: Path, limits: dict[str, Any], metrics_addresses: dict[str, str] | None = None) -> Path:
    """A complete config in ``folder`` whose services get ``limits`` (``{service: {key: value}}``)."""
    return write_heist_config(folder, limits=limits, metrics_addresses=metrics_addresses)


def bearer(settings: HeistConfig, scope: str, client_id: str = "crew") -> tuple[tuple[str, str], ...]:
    """Call metadata with a 10-minute token of ``client_id`` carrying ``scope``."""
    token = issue_token(
        credential_store.signing_key(settings),
        issuer=settings.oauth.issuer,
        audience=settings.oauth.audience,
        client_id=client_id,
        scopes=[scope],
        ttl_s=600,
        now=time.time(),
    )
    return (("authorization", f"Bearer {token}"), ("x-session-id", "abuse-suite"))


@dataclass
class RunningService:
    """One service process under attack, a channel to it and a token for its scope."""

    process: ServerProcess
    channel: grpc.Channel
    metadata: tuple[tuple[str, str], ...]
    settings: HeistConfig

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def metrics_url(self) -> str:
        """``http://127.0.0.1:port/metrics`` (only for a service started with ``metrics=True``)."""
        url = self.settings.service(self.process.name).metrics_url
        assert url is not None, f"{self.process.name} was started without a metrics address"
        return url


def start_service(
    folder: Path, name: str, scope: str, limits: dict[str, Any], *, metrics: bool = False
) -> RunningService:
    """Start ``name`` as a real process with ``limits`` (and a metrics port); the caller must ``stop_service`` it."""
    folder.mkdir(parents=True, exist_ok=True)
    config_path = write_config(folder, limits, {name: f"127.0.0.1:{free_port()}"} if metrics else None)
    settings = load_config(config_path)
    credential_store.ensure_dev_credentials(settings)
    process = ServerProcess(name, load_config(config_path), free_port(), folder, START_TIMEOUT_S)
    try:
        process.start()
    except BaseException:
        process.stop()
        raise
    return RunningService(process, channel(settings, name, process.address), bearer(settings, scope), settings)


def stop_service(service: RunningService) -> None:
    service.channel.close()
    service.process.stop()


# --- /proc readings -------------------------------------------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (the query workers of the database server)."""
    tree = [pid]
    index = 0
    while index < len(tree):
        current = tree[index]
        index += 1
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                tree.extend(int(child) for child in (task / "children").read_text().split())
            except OSError:
                continue
    return tree


def rss_bytes(pid: int) -> int:
    """VmRSS of ``pid`` and all its descendants."""
    total = 0
    for member in process_tree(pid):
        try:
            status = Path(f"/proc/{member}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    """User + system CPU time of each live pid."""
    times = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        times[pid] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return times


def cpu_used_over(pid: int, window_s: float) -> float:
    """CPU seconds the tree of ``pid`` burns during the next ``window_s`` (processes alive at both ends)."""
    before = cpu_seconds(process_tree(pid))
    time.sleep(window_s)
    after = cpu_seconds(process_tree(pid))
    return sum(after[member] - before[member] for member in after.keys() & before.keys())


class PeakRss:
    """Samples ``rss_bytes(pid)`` every few milliseconds on a thread while the ``with`` block runs."""

    def __init__(self, pid: int, every_s: float = 0.005) -> None:
        self.pid = pid
        self.every_s = every_s
        self.baseline = rss_bytes(pid)
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid))
            time.sleep(self.every_s)


def mib(value: int) -> float:
    return value / (1024 * 1024)
