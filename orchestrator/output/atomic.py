"""Files written whole or not at all: the session logs and the report under a full disk or a crash."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

__all__ = ["write_atomically"]


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all: a full disk never leaves half a file at ``path``.

    The text goes to a temporary file in the same folder (mode 0600: session
    logs hold conversations), is flushed to the disk, and only then renamed over
    ``path``; on any failure the temporary file is removed and ``path`` is as it
    was. A path that is not a regular file (``/dev/stdout``, a pipe) is written
    directly: there is nothing to rename over.
    """
    if path.exists() and not path.is_file():
        with path.open("w", encoding="utf-8") as stream:
            stream.write(text)
        return
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    # The rename survives a crash once the folder is on the disk too (some file systems cannot sync one).
    with contextlib.suppress(OSError):
        folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
