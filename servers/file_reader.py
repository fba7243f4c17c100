"""File reader service: the crew's intelligence documents, and nothing outside their folder.

Why so many checks: the file name comes from a language model, so traversal
(``../``), absolute paths and NUL bytes are refused before anything is opened.

Why descriptors and no path checks: checking a path and then opening it is a
race (a symlink swapped in between can leak a file from outside the folder).
So a document is opened once, one name at a time from a descriptor of the
documents folder, with ``O_NOFOLLOW`` (a symbolic link anywhere on the way is
refused, never followed), and everything else is decided on what was actually
opened: ``fstat`` says whether it is a regular file with a single link on the
folder's file system, and the read is bounded by ``max_file_bytes``.
``ListFiles`` walks the folder the same way, so both methods agree on what a
document is: a regular, non-hidden file reached without links.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import grpc
from heist.file_reader.v1 import file_reader_pb2, file_reader_pb2_grpc
from pydantic import Field, field_validator

from heist_common.config import HeistConfig
from heist_common.layout import anchored
from servers.runtime import lifecycle
from servers.runtime.lifecycle import ServiceDefinition

DEFAULT_DOCUMENTS_DIR = Path(__file__).resolve().parent / "data" / "documents"


class Limits(lifecycle.Limits):
    """``services.file_reader.limits``: which folder is served, the biggest file, how much may be listed."""

    documents_dir: Path = DEFAULT_DOCUMENTS_DIR
    """Relative paths are under the repository root."""
    max_file_bytes: int = Field(
        256 * 1024, ge=1, strict=True,
        description="Largest document ReadFile returns; a larger one is RESOURCE_EXHAUSTED.",
    )
    max_listed_entries: int = Field(2000, ge=1, strict=True)
    """Entries (files and folders) ListFiles examines before it gives up with RESOURCE_EXHAUSTED."""
    max_folder_depth: int = Field(8, ge=0, strict=True)
    """Nested folders below the documents folder that are listed and read."""

    @field_validator("documents_dir")
    @classmethod
    def _anchor(cls, value: Path) -> Path:
        return anchored(value)

MAX_FILENAME_CHARS = 255
MAX_ECHO_CHARS = 100
"""A file name quoted in a status message is cut to this many characters."""
MAX_AVAILABLE_CHARS = 600
"""The list of available documents in a NOT_FOUND message is cut to about this many characters."""
DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
DOCUMENT_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
"""O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused by fstat right after)."""
READ_CHUNK_BYTES = 64 * 1024


class DocumentError(Exception):
    """A request for a document that cannot be served; carries the status code to return."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def quoted(filename: str) -> str:
    """``repr`` of a caller's file name, cut short for status messages."""
    if len(filename) <= MAX_ECHO_CHARS:
        return repr(filename)
    return f"{filename[:MAX_ECHO_CHARS]!r}... ({len(filename) - MAX_ECHO_CHARS} more characters)"


def is_hidden(name: str) -> bool:
    """Dot files and dot folders are never listed nor read (.git, .env, editor swap files...)."""
    return name.startswith(".")


class DocumentFolder:
    """The one folder of readable documents."""

    def __init__(self, limits: Limits) -> None:
        self.root = limits.documents_dir.resolve()
        self.max_bytes = limits.max_file_bytes
        self.max_entries = limits.max_listed_entries
        self.max_depth = limits.max_folder_depth

    @contextlib.contextmanager
    def _root_fd(self) -> Iterator[int]:
        """Open the documents folder itself (set by the operator, so its own path may go through links)."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            yield fd
        finally:
            os.close(fd)

    def list(self) -> list[tuple[str, int]]:
        """Return (name, size) of every readable document, sorted by name.

        Entries that vanish while the folder is walked are skipped; more than
        ``max_listed_entries`` entries is RESOURCE_EXHAUSTED rather than a
        silently partial list.
        """
        try:
            with self._root_fd() as root_fd:
                walk = _Walk(self.max_entries, self.max_depth)
                walk.folder(root_fd, "", 0)
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            raise DocumentError(
                grpc.StatusCode.UNAVAILABLE, f"the documents folder cannot be opened: {exc.strerror}"
            ) from None
        return sorted(walk.found)

    def parts(self, filename: str) -> tuple[str, ...]:
        """Split ``filename`` into the names to open one by one, or raise DocumentError saying why not."""
        if not filename.strip():
            raise DocumentError(grpc.StatusCode.INVALID_ARGUMENT, "filename is required")
        if "\x00" in filename:
            raise DocumentError(grpc.StatusCode.INVALID_ARGUMENT, "filename contains a NUL byte")
        if "\\" in filename:
            raise DocumentError(grpc.StatusCode.INVALID_ARGUMENT, "filename must use '/' separators")
        if len(filename) > MAX_FILENAME_CHARS:
            raise DocumentError(grpc.StatusCode.INVALID_ARGUMENT, f"filename is longer than {MAX_FILENAME_CHARS}")
        relative = PurePosixPath(filename)
        if relative.is_absolute():
            raise DocumentError(grpc.StatusCode.INVALID_ARGUMENT, "filename must be relative to the documents folder")
        if ".." in relative.parts:
            raise DocumentError(grpc.StatusCode.INVALID_ARGUMENT, "filename must not contain '..'")
        if not relative.parts:
            raise DocumentError(grpc.StatusCode.INVALID_ARGUMENT, "filename names the documents folder itself")
        if len(relative.parts) > self.max_depth + 1:
            raise DocumentError(
                grpc.StatusCode.INVALID_ARGUMENT, f"filename is nested deeper than {self.max_depth} folders"
            )
        if any(is_hidden(part) for part in relative.parts):
            raise self._not_found(filename, "hidden files (names starting with '.') are not served")
        return relative.parts

    def read(self, filename: str) -> tuple[str, str, int]:
        """Return (name, text, size) of one document, or raise DocumentError."""
        parts = self.parts(filename)
        try:
            with self._root_fd() as root_fd, self._open(root_fd, filename, parts) as fd:
                data = self._read(fd, filename)
        except DocumentError:
            raise
        except OSError as exc:  # the documents folder itself is missing or unreadable
            raise DocumentError(
                grpc.StatusCode.UNAVAILABLE, f"the documents folder cannot be opened: {exc.strerror}"
            ) from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise DocumentError(
                grpc.StatusCode.FAILED_PRECONDITION, f"{quoted(filename)} is not UTF-8 text"
            ) from None
        return "/".join(parts), text, len(data)

    @contextlib.contextmanager
    def _open(self, root_fd: int, filename: str, parts: tuple[str, ...]) -> Iterator[int]:
        """Open ``parts`` below ``root_fd`` one name at a time, never following a link; yields the file's fd."""
        opened: list[int] = []
        try:
            dir_fd = root_fd
            for index, part in enumerate(parts):
                last = index == len(parts) - 1
                try:
                    fd = os.open(part, DOCUMENT_FLAGS if last else DIRECTORY_FLAGS, dir_fd=dir_fd)
                except OSError as exc:
                    raise self._open_error(exc, dir_fd, part, filename) from None
                opened.append(fd)
                dir_fd = fd
            yield dir_fd
        finally:
            for fd in opened:
                os.close(fd)

    def _open_error(self, exc: OSError, dir_fd: int, part: str, filename: str) -> DocumentError:
        """Say why ``part`` could not be opened; the lstat here only words the message, it decides nothing."""
        if exc.errno == errno.ENOENT:
            return self._not_found(filename)
        if exc.errno == errno.ENAMETOOLONG:
            return DocumentError(grpc.StatusCode.INVALID_ARGUMENT, "a name in filename is too long")
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            try:
                is_link = stat.S_ISLNK(os.stat(part, dir_fd=dir_fd, follow_symlinks=False).st_mode)
            except OSError:
                return self._not_found(filename)
            if is_link:
                return DocumentError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{quoted(filename)} goes through a symbolic link; links are never followed, "
                    "so nothing outside the documents folder can be reached",
                )
            return DocumentError(
                grpc.StatusCode.INVALID_ARGUMENT, f"{quoted(filename)}: {quoted(part)} is not a folder"
            )
        if exc.errno in (errno.ENXIO, errno.ENODEV):  # a socket, or a device without a driver
            return DocumentError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{quoted(filename)} is not a regular file (a FIFO, socket or device is never read)",
            )
        if exc.errno in (errno.EACCES, errno.EPERM):
            return DocumentError(
                grpc.StatusCode.FAILED_PRECONDITION, f"{quoted(filename)} is not readable by the file reader"
            )
        return DocumentError(grpc.StatusCode.UNAVAILABLE, f"cannot open {quoted(filename)}: {exc.strerror}")

    def _read(self, fd: int, filename: str) -> bytes:
        """Check what was opened, then read at most ``max_file_bytes`` of it (one byte more says it grew)."""
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise DocumentError(grpc.StatusCode.INVALID_ARGUMENT, f"{quoted(filename)} is a folder, not a document")
        if not stat.S_ISREG(info.st_mode):
            raise DocumentError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{quoted(filename)} is not a regular file (a FIFO, socket or device is never read)",
            )
        if info.st_nlink == 0:  # removed between open() and fstat(): gone, as if open() had come a moment later
            raise DocumentError(grpc.StatusCode.NOT_FOUND, f"{quoted(filename)} was removed while being opened")
        if info.st_nlink != 1:
            raise DocumentError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{quoted(filename)} has {info.st_nlink} hard links; only singly linked files are served "
                "(a hard link can put a file from outside the folder inside it)",
            )
        if info.st_size > self.max_bytes:
            raise self._too_big(filename, info.st_size)
        chunks: list[bytes] = []
        size = 0
        while size <= self.max_bytes:
            chunk = os.read(fd, min(READ_CHUNK_BYTES, self.max_bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > self.max_bytes:
            raise self._too_big(filename, size)
        return b"".join(chunks)

    def _too_big(self, filename: str, size: int) -> DocumentError:
        return DocumentError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"{quoted(filename)} is {size} bytes or more; the limit is {self.max_bytes} (max_file_bytes)",
        )

    def _not_found(self, filename: str, why: str = "") -> DocumentError:
        try:
            available = ", ".join(name for name, _ in self.list()) or "none"
        except DocumentError as exc:
            available = f"unknown ({exc.message})"
        if len(available) > MAX_AVAILABLE_CHARS:
            available = available[:MAX_AVAILABLE_CHARS].rsplit(", ", 1)[0] + ", ..."
        reason = f" ({why})" if why else ""
        return DocumentError(
            grpc.StatusCode.NOT_FOUND, f"no document {quoted(filename)}{reason}; available: {available}"
        )


class _Walk:
    """One ListFiles walk: descriptors all the way down, no links followed, entries and depth bounded."""

    def __init__(self, max_entries: int, max_depth: int) -> None:
        self.max_entries = max_entries
        self.max_depth = max_depth
        self.seen = 0
        self.found: list[tuple[str, int]] = []

    def folder(self, dir_fd: int, prefix: str, depth: int) -> None:
        """Collect the documents below ``dir_fd``; entries that vanish or change kind meanwhile are skipped."""
        try:
            with os.scandir(dir_fd) as entries:  # scandir works on its own duplicate of dir_fd
                names = [entry.name for entry in self._counted(entries) if not is_hidden(entry.name)]
        except OSError:  # the folder went away or became unreadable while being listed
            return
        for name in names:
            try:
                info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(info.st_mode) and info.st_nlink == 1:
                self.found.append((prefix + name, info.st_size))
            elif stat.S_ISDIR(info.st_mode) and depth < self.max_depth:
                try:
                    child_fd = os.open(name, DIRECTORY_FLAGS, dir_fd=dir_fd)
                except OSError:  # vanished, or swapped for a link or a file
                    continue
                try:
                    self.folder(child_fd, f"{prefix}{name}/", depth + 1)
                finally:
                    os.close(child_fd)

    def _counted(self, entries: Iterator[os.DirEntry[str]]) -> Iterator[os.DirEntry[str]]:
        for entry in entries:
            self.seen += 1
            if self.seen > self.max_entries:
                raise DocumentError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the documents folder has more than {self.max_entries} entries (max_listed_entries)",
                )
            yield entry


class FileReaderServicer(file_reader_pb2_grpc.FileReaderServiceServicer):
    """Serves heist.file_reader.v1.FileReaderService."""

    def __init__(self, limits: Limits) -> None:
        self._folder = DocumentFolder(limits)

    async def ReadFile(
        self, request: file_reader_pb2.ReadFileRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> file_reader_pb2.ReadFileResponse:
        """Return one document's text."""
        try:
            name, text, size = await asyncio.to_thread(self._folder.read, request.filename)
        except DocumentError as exc:
            await context.abort(exc.code, exc.message)
        return file_reader_pb2.ReadFileResponse(filename=name, content=text, size_bytes=size)

    async def ListFiles(
        self, request: file_reader_pb2.ListFilesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> file_reader_pb2.ListFilesResponse:
        """List the readable documents."""
        try:
            files = await asyncio.to_thread(self._folder.list)
        except DocumentError as exc:
            await context.abort(exc.code, exc.message)
        return file_reader_pb2.ListFilesResponse(
            files=[file_reader_pb2.FileInfo(name=name, size_bytes=size) for name, size in files]
        )


def service_definition(config: HeistConfig, limits: Limits) -> ServiceDefinition:
    """Build the file reader's servicer."""
    return ServiceDefinition("file_reader", FileReaderServicer(limits))


if __name__ == "__main__":
    raise SystemExit(lifecycle.main(__spec__))
