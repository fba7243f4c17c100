"""File reader service: the crew's intelligence documents, and nothing outside their folder.

Why so many checks: the file name comes from a language model, so traversal
(``../``), absolute paths, NUL bytes and symlinks that lead out of the folder
are refused before any file is opened.
"""

from __future__ import annotations

import asyncio
from pathlib import Path, PurePosixPath
from typing import Any

import grpc
from heist.file_reader.v1 import file_reader_pb2, file_reader_pb2_grpc
from pydantic import Field, field_validator

from heist_common.config import HeistConfig
from heist_common.layout import anchored
from servers import lifecycle
from servers.lifecycle import ServiceDefinition

MAX_FILENAME_CHARS = 255
DEFAULT_DOCUMENTS_DIR = Path(__file__).resolve().parent / "data" / "documents"


class Limits(lifecycle.Limits):
    """``services.file_reader.limits``: which folder is served and the biggest file returned."""

    documents_dir: Path = DEFAULT_DOCUMENTS_DIR
    """Relative paths are under the repository root."""
    max_file_bytes: int = Field(256 * 1024, ge=1, strict=True)

    @field_validator("documents_dir")
    @classmethod
    def _anchor(cls, value: Path) -> Path:
        return anchored(value)


class DocumentError(Exception):
    """A request for a document that cannot be served; carries the status code to return."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class DocumentFolder:
    """The one folder of readable documents."""

    def __init__(self, limits: Limits) -> None:
        self.root = limits.documents_dir.resolve()
        self.max_bytes = limits.max_file_bytes

    def _inside(self, path: Path) -> bool:
        try:
            return path.resolve().is_relative_to(self.root)
        except (OSError, RuntimeError):  # symlink loops, over-long names
            return False

    def list(self) -> list[tuple[str, int]]:
        """Return (name, size) of every readable document, sorted by name."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.rglob("*"):
            relative = path.relative_to(self.root)
            if any(part.startswith(".") for part in relative.parts):
                continue
            if path.is_file() and self._inside(path):
                found.append((relative.as_posix(), path.stat().st_size))
        return sorted(found)

    def resolve(self, filename: str) -> Path:
        """Return the file ``filename`` names, or raise DocumentError saying why not."""
        if not filename.strip():
            raise DocumentError(grpc.StatusCode.INVALID_ARGUMENT, "filename is required")
        if "\x00" in filename:
            raise DocumentError(grpc.StatusCode.INVALID_ARGUMENT, "filename contains a NUL byte")
        if "\\" in filename:
            raise DocumentError(grpc.StatusCode.INVALID_ARGUMENT, "filename must use '/' separators")
        relative = PurePosixPath(filename)
        if relative.is_absolute():
            raise DocumentError(grpc.StatusCode.INVALID_ARGUMENT, "filename must be relative to the documents folder")
        if ".." in relative.parts:
            raise DocumentError(grpc.StatusCode.INVALID_ARGUMENT, "filename must not contain '..'")
        if len(filename) > MAX_FILENAME_CHARS:
            raise DocumentError(grpc.StatusCode.INVALID_ARGUMENT, f"filename is longer than {MAX_FILENAME_CHARS}")
        path = self.root / relative
        if not self._inside(path):
            raise DocumentError(grpc.StatusCode.INVALID_ARGUMENT, "filename points outside the documents folder")
        if not path.is_file():
            available = ", ".join(name for name, _ in self.list()) or "none"
            raise DocumentError(grpc.StatusCode.NOT_FOUND, f"no document {filename!r}; available: {available}")
        return path

    def read(self, filename: str) -> tuple[str, str, int]:
        """Return (name, text, size) of one document, or raise DocumentError."""
        path = self.resolve(filename)
        size = path.stat().st_size
        if size > self.max_bytes:
            raise DocumentError(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"{filename!r} is {size} bytes; the limit is {self.max_bytes}"
            )
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise DocumentError(grpc.StatusCode.FAILED_PRECONDITION, f"{filename!r} is not UTF-8 text") from None
        except OSError as exc:
            raise DocumentError(grpc.StatusCode.UNAVAILABLE, f"cannot read {filename!r}: {exc.strerror}") from None
        return path.relative_to(self.root).as_posix(), text, size


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
        files = await asyncio.to_thread(self._folder.list)
        return file_reader_pb2.ListFilesResponse(
            files=[file_reader_pb2.FileInfo(name=name, size_bytes=size) for name, size in files]
        )


def service_definition(config: HeistConfig, limits: Limits) -> ServiceDefinition:
    """Build the file reader's servicer."""
    return ServiceDefinition("file_reader", FileReaderServicer(limits))


if __name__ == "__main__":
    raise SystemExit(lifecycle.main(__spec__))
