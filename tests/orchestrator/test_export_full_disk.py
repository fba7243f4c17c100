"""A full disk under ``--out``: every session file is whole or absent, and the summary says which were not written.

The disk is a real one: a small tmpfs mounted on a folder of the test, filled
up but for a few pages, so the kernel answers ENOSPC in the middle of a write.
Mounting needs root: as root (``make test`` in CI) a failed mount fails the
test; a developer without root gets a skip saying so, like the PostgreSQL tests.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.cli import main
from tests.support.inprocess import InProcessMesh
from tests.support.scripted_llm import ScriptedLLM, text

FILLER = "filler"
FREE_BYTES = 8192
"""What the disk has left: room for a short file, not for all three."""
SESSION = "heist_full_disk_1"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KB tmpfs with ``FREE_BYTES`` left; unmounted afterwards."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(folder)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        if os.geteuid() == 0:
            pytest.fail(f"cannot mount a tmpfs as root: {mounted.stderr.strip()}")
        pytest.skip("mounting a small tmpfs needs root (make test runs as root in CI)")
    try:
        fd = os.open(folder / FILLER, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        finally:
            os.ftruncate(fd, max(os.lseek(fd, 0, os.SEEK_END) - FREE_BYTES, 0))
            os.close(fd)
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


async def cli(*argv: str) -> int:
    return await asyncio.to_thread(main, list(argv))


async def test_a_full_disk_leaves_no_partial_file_and_the_summary_names_what_failed(
    mesh: InProcessMesh,
    config_path: Path,
    scripted_llm: ScriptedLLM,
    small_disk: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    live = mesh.write_config(config_path, tmp_path / "live.yaml")
    scripted_llm.script(text("We go Friday, through the service tunnel. " * 20), text("Agreed."))
    code = await cli("run", "--config", str(live), "--turns", "2", "--session-id", SESSION, "--out", str(small_disk))
    printed = capsys.readouterr()
    assert code == 1, printed.out + printed.err

    summary = printed.out.split(f"Session:    {SESSION}")[1]
    listed = [line for line in summary.splitlines() if line.startswith(("Logs:", "Report:"))]
    not_written = [line for line in summary.splitlines() if line.startswith("Not written:")]
    complete = {
        ".json": lambda body: json.loads(body)["session"]["session_id"] == SESSION,
        ".md": lambda body: body.startswith(f"# Heist session {SESSION}") and "## Events" in body,
        ".html": lambda body: body.rstrip().endswith("</html>"),
    }
    for suffix, is_complete in complete.items():
        path = small_disk / f"{SESSION}{suffix}"
        if path.exists():  # whole, and listed as written
            assert is_complete(path.read_text(encoding="utf-8")), f"{path.name} is cut short"
            assert any(str(path) in line for line in listed), summary
            assert not any(str(path) in line for line in not_written)
        else:  # absent, and named with the reason
            assert any(str(path) in line and "No space left on device" in line for line in not_written), summary
            assert not any(str(path) in line for line in listed), summary
    assert not (small_disk / f"{SESSION}.html").exists()  # the largest file cannot fit
    leftovers = {p.name for p in small_disk.iterdir()} - {FILLER} - {f"{SESSION}{suffix}" for suffix in complete}
    assert leftovers == set(), "temporary files left behind"
    assert "export failed" in printed.err
