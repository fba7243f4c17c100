"""Headless Chromium (Debian's ``chromium``) driven over the DevTools protocol, for tests of pages a person opens.

Why the DevTools protocol and not ``--dump-dom``/``--screenshot``: only it tells
what a person's console would show (script exceptions, errors logged by the page,
resources the browser refused or failed to load), and it can ask the laid-out
page questions (is the chart there, does it have a size). Why over a pipe
(``--remote-debugging-pipe``, NUL-separated JSON on the browser's fds 3 and 4)
and not a port: no socket to find or to race for, no websocket client to add,
and the browser ends with the pipe.

The browser runs with no network of its own to speak of: no first-run, sync,
component updates or background traffic, QUIC off, a throwaway profile.
"""

from __future__ import annotations

import base64
import contextlib
import json
import queue
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.processes import stop_process

INSTALL_HINT = "chromium is missing: `make test` installs it as root; otherwise `sudo apt-get install chromium`"
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--mute-audio", "--hide-scrollbars",
    "--remote-debugging-pipe",
)  # fmt: skip
# The shell moves our pipes to the fds Chromium's --remote-debugging-pipe reads (3) and writes (4).
LAUNCH = 'exec 3<&0 4>&1 </dev/null >&2; exec "$0" "$@"'


@dataclass
class PageCheck:
    """What loading one page produced."""

    errors: list[str] = field(default_factory=list)
    """Console errors, uncaught exceptions, refused or failed loads: all a person would see as red."""
    evaluated: Any = None
    screenshot: bytes = b""


class Chromium:
    """One headless browser: ``with Chromium(profile_dir) as browser: browser.check(url, expression)``."""

    def __init__(self, profile_dir: Path, timeout_s: float = 30.0) -> None:
        binary = shutil.which("chromium")
        if binary is None:
            raise RuntimeError(INSTALL_HINT)
        self.binary = binary
        self.profile_dir = profile_dir
        self.timeout_s = timeout_s
        self.process: subprocess.Popen[bytes] | None = None
        self._ids = iter(range(1, 1_000_000))
        self._replies: dict[int, dict[str, Any]] = {}
        self._events: queue.Queue[dict[str, Any]] = queue.Queue()
        self._condition = threading.Condition()
        self._reader: threading.Thread | None = None

    def __enter__(self) -> Chromium:
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        log = (self.profile_dir / "chromium.log").open("ab")
        self.process = subprocess.Popen(
            ["/bin/sh", "-c", LAUNCH, self.binary, *FLAGS, f"--user-data-dir={self.profile_dir}", "about:blank"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, start_new_session=True,
        )  # fmt: skip
        log.close()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(RuntimeError, OSError):
                self.send("Browser.close", timeout_s=5)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                stop_process(self.process, grace_s=3)
        if self.process is not None and self.process.stdin is not None:
            self.process.stdin.close()

    # -- protocol ------------------------------------------------------------------------------

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        buffer = b""
        while chunk := self.process.stdout.read1(65536):
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for raw in messages:
                message = json.loads(raw)
                if "id" in message:
                    with self._condition:
                        self._replies[message["id"]] = message
                        self._condition.notify_all()
                else:
                    self._events.put(message)
        with self._condition:
            self._condition.notify_all()

    def send(
        self, method: str, params: dict[str, Any] | None = None, session: str | None = None, timeout_s: float = 0
    ) -> dict[str, Any]:
        """Send one command and wait for its result; RuntimeError on a protocol error or a timeout."""
        assert self.process is not None and self.process.stdin is not None
        call_id = next(self._ids)
        message: dict[str, Any] = {"id": call_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        self.process.stdin.write(json.dumps(message).encode() + b"\0")
        self.process.stdin.flush()
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        with self._condition:
            while call_id not in self._replies:
                left = deadline - time.monotonic()
                if left <= 0 or self.process.poll() is not None:
                    raise RuntimeError(f"no reply to {method} (browser exit code {self.process.poll()})")
                self._condition.wait(min(left, 0.2))
            reply = self._replies.pop(call_id)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        result: dict[str, Any] = reply.get("result", {})
        return result

    def _wait_event(self, name: str, session: str, errors: list[str]) -> None:
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            try:
                event = self._events.get(timeout=0.2)
            except queue.Empty:
                continue
            self._note(event, session, errors)
            if event.get("method") == name and event.get("sessionId") == session:
                return
        raise RuntimeError(f"no {name} within {self.timeout_s} s")

    @staticmethod
    def _note(event: dict[str, Any], session: str, errors: list[str]) -> None:
        """Keep what a person would see as an error in the console."""
        if event.get("sessionId") != session:
            return
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            errors.append(f"exception: {details.get('exception', {}).get('description') or details.get('text')}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            errors.append(f"console.{params['type']}: {[arg.get('value') for arg in params.get('args', [])]}")
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            errors.append(f"log ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}".strip())
        elif method == "Network.loadingFailed":
            errors.append(f"load failed: {params.get('errorText')} {params.get('blockedReason', '')}".strip())

    # -- what tests use --------------------------------------------------------------------------

    def check(self, url: str, expression: str, width: int = 1200, settle_s: float = 0.3) -> PageCheck:
        """Load ``url``, collect every error, evaluate ``expression`` (JSON-able), screenshot the whole page."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable", session=session)
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False},
            session=session,
        )
        result = PageCheck()
        self.send("Page.navigate", {"url": url}, session=session)
        self._wait_event("Page.loadEventFired", session, result.errors)
        end = time.monotonic() + settle_s  # late console messages (e.g. a deferred error) still count
        while time.monotonic() < end:
            with contextlib.suppress(queue.Empty):
                self._note(self._events.get(timeout=0.05), session, result.errors)
        evaluated = self.send(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=session
        )
        if "exceptionDetails" in evaluated:
            raise RuntimeError(f"expression failed: {evaluated['exceptionDetails']}")
        result.evaluated = evaluated["result"].get("value")
        height = int(self.send("Page.getLayoutMetrics", session=session)["cssContentSize"]["height"])
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": min(max(height, 200), 16_000), "deviceScaleFactor": 1, "mobile": False},
            session=session,
        )
        shot = self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session=session)
        result.screenshot = base64.b64decode(shot["data"])
        while not self._events.empty():
            self._note(self._events.get_nowait(), session, result.errors)
        self.send("Target.closeTarget", {"targetId": target})
        return result
