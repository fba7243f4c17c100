"""file_reader under a hostile local user who can write into the documents folder, against a real server process.

Classes: links swapped in while reading (a file or a folder on the way becomes a
symlink out of the folder), entries appearing and disappearing during ListFiles
and ReadFile, hidden files, things that are not regular files (FIFO, folder,
hard link), sizes (a sparse 8 GiB file, a file over the limit) and a folder
with too many entries. Every loop is bounded in count and time.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from heist.file_reader.v1 import file_reader_pb2 as pb
from heist.file_reader.v1 import file_reader_pb2_grpc as pb_grpc

from tests.abuse.harness import PeakRss, RunningService, mib

pytestmark = pytest.mark.abuse

MAX_FILE_BYTES = 4096
MAX_LISTED_ENTRIES = 300
SECRET = "OUTSIDE-SECRET: the vault code is 7-3-1-9"
INSIDE = "inside: the guard changes at 22:00"
RACE_READS = 300
RACE_TIME_LIMIT_S = 60.0


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(documents folder, a folder outside it holding secrets)."""
    base = tmp_path_factory.mktemp("files")
    documents, outside = base / "documents", base / "outside"
    documents.mkdir()
    outside.mkdir()
    (outside / "secret.md").write_text(SECRET)
    (outside / "plan.md").write_text(SECRET)
    (documents / "plan.md").write_text(INSIDE)
    return documents, outside


@pytest.fixture(scope="module")
def files(service_factory: Callable[..., RunningService], folders: tuple[Path, Path]) -> RunningService:
    limits = {
        "file_reader": {
            "documents_dir": str(folders[0]),
            "max_file_bytes": MAX_FILE_BYTES,
            "max_listed_entries": MAX_LISTED_ENTRIES,
        }
    }
    return service_factory("file_reader", "file_reader:use", limits)


def read(files: RunningService, name: str) -> tuple[grpc.StatusCode, str, float]:
    """(code, content or details, seconds) of one ReadFile."""
    started = time.monotonic()
    try:
        response = pb_grpc.FileReaderServiceStub(files.channel).ReadFile(
            pb.ReadFileRequest(filename=name), metadata=files.metadata, timeout=5.0
        )
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or "", time.monotonic() - started
    return grpc.StatusCode.OK, response.content, time.monotonic() - started


def listing(files: RunningService) -> tuple[grpc.StatusCode, list[str]]:
    try:
        response = pb_grpc.FileReaderServiceStub(files.channel).ListFiles(
            pb.ListFilesRequest(), metadata=files.metadata, timeout=5.0
        )
    except grpc.RpcError as exc:
        return exc.code(), [exc.details() or ""]
    return grpc.StatusCode.OK, [entry.name for entry in response.files]


@contextlib.contextmanager
def swapping(flip: Callable[[int], None], period_s: float = 0.0005) -> Iterator[list[int]]:
    """Call ``flip(n)`` on a thread with n = 0, 1, 2, ... until the block ends; yields [flips done]."""
    done = [0]
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            flip(done[0])
            done[0] += 1
            time.sleep(period_s)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield done
    finally:
        stop.set()
        thread.join(timeout=10)


SWAPPER = """
import os, shutil, sys, time
kind, target, link_to, inside, stop_file, limit_s = sys.argv[1:7]
staging = os.path.join(os.path.dirname(target), ".staging-" + os.path.basename(target))
scratch = stop_file + ".scratch"
end = time.monotonic() + float(limit_s)
n = 0
while not os.path.exists(stop_file) and time.monotonic() < end:
    # both branches write one small file, so each state lasts about as long as the other
    if kind == "file":  # atomic: rename a fresh regular file or symlink onto the target
        if os.path.lexists(staging):
            os.unlink(staging)
        with open(scratch if n % 2 else staging, "w") as handle:
            handle.write(inside)
        if n % 2:
            os.symlink(link_to, staging)
        os.replace(staging, target)
    else:  # a folder holding plan.md, or a symlink to a folder outside
        if os.path.islink(target):
            os.unlink(target)
        elif os.path.exists(target):
            shutil.rmtree(target)
        if n % 2:
            with open(scratch, "w") as handle:
                handle.write(inside)
            os.symlink(link_to, target)
        else:
            os.mkdir(target)
            with open(os.path.join(target, "plan.md"), "w") as handle:
                handle.write(inside)
    n += 1
print(n)
"""
"""The attacker: its own process (real parallelism, no GIL shared with the reading client)."""


@contextlib.contextmanager
def swapper_process(kind: str, target: Path, link_to: Path) -> Iterator[list[int]]:
    """Run SWAPPER on ``target`` until the block ends (or RACE_TIME_LIMIT_S); yields [swaps done] afterwards."""
    stop_file = target.parent.parent / f"stop-{target.name}"
    stop_file.unlink(missing_ok=True)
    swaps = [0]
    command = [sys.executable, "-c", SWAPPER, kind, str(target), str(link_to), INSIDE, str(stop_file)]
    process = subprocess.Popen([*command, str(RACE_TIME_LIMIT_S)], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.1)
        yield swaps
    finally:
        stop_file.touch()
        try:
            swaps[0] = int(process.communicate(timeout=10)[0] or 0)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
        for leftover in (target, target.parent / f".staging-{target.name}"):
            if leftover.is_symlink() or leftover.is_file():
                leftover.unlink()
            elif leftover.exists():
                shutil.rmtree(leftover)


def race(files: RunningService, name: str) -> Counter[str]:
    """RACE_READS reads of ``name`` (bounded by RACE_TIME_LIMIT_S); outcomes by kind, leaks counted apart."""
    outcomes: Counter[str] = Counter()
    deadline = time.monotonic() + RACE_TIME_LIMIT_S
    for _ in range(RACE_READS):
        if time.monotonic() > deadline:
            break
        code, text, _ = read(files, name)
        if code == grpc.StatusCode.OK and SECRET in text:
            outcomes["LEAK"] += 1
        else:
            outcomes[code.name] += 1
        assert code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), text
    return outcomes


def test_a_file_swapped_for_a_symlink_while_reading_never_leaks(
    files: RunningService, folders: tuple[Path, Path]
) -> None:
    documents, outside = folders
    with swapper_process("file", documents / "swap.md", outside / "secret.md") as swaps:
        outcomes = race(files, "swap.md")
    print(f"\nfile <-> symlink swap, {sum(outcomes.values())} reads, {swaps[0]} swaps: {dict(outcomes)}")
    assert outcomes["LEAK"] == 0
    assert outcomes["OK"] > 0 and outcomes["INVALID_ARGUMENT"] > 0  # both states were really hit
    assert sum(outcomes.values()) == RACE_READS


def test_a_folder_swapped_for_a_symlink_while_reading_never_leaks(
    files: RunningService, folders: tuple[Path, Path]
) -> None:
    documents, outside = folders
    with swapper_process("folder", documents / "room", outside) as swaps:
        outcomes = race(files, "room/plan.md")
    print(f"\nfolder <-> symlink swap, {sum(outcomes.values())} reads, {swaps[0]} swaps: {dict(outcomes)}")
    assert outcomes["LEAK"] == 0
    assert outcomes["OK"] > 0 and outcomes["INVALID_ARGUMENT"] > 0
    assert set(outcomes) <= {"OK", "INVALID_ARGUMENT", "NOT_FOUND"}


def test_entries_appearing_and_vanishing_are_not_found_never_internal(
    files: RunningService, folders: tuple[Path, Path]
) -> None:
    churn = folders[0] / "churn"
    churn.mkdir()

    def flip(n: int) -> None:
        slot = churn / f"d{n % 7}"
        if n % 2:
            shutil.rmtree(slot, ignore_errors=True)
            (churn / f"f{n % 5}.md").unlink(missing_ok=True)
        else:
            slot.mkdir(exist_ok=True)
            (slot / "x.md").write_text(INSIDE)
            (churn / f"f{n % 5}.md").write_text(INSIDE)

    codes: Counter[str] = Counter()
    try:
        with swapping(flip, period_s=0.0002) as flips:
            for index in range(150):
                code, names = listing(files)
                assert code == grpc.StatusCode.OK, names
                codes[f"ListFiles {code.name}"] += 1
                for name in (f"churn/f{index % 5}.md", f"churn/d{index % 7}/x.md"):
                    code, text, _ = read(files, name)
                    assert code in (grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND), text
                    codes[f"ReadFile {code.name}"] += 1
    finally:
        shutil.rmtree(churn)
    print(f"\nchurn ({flips[0]} changes): {dict(codes)}")
    assert codes["ReadFile OK"] > 0 and codes["ReadFile NOT_FOUND"] > 0


def test_hidden_files_are_neither_listed_nor_read(files: RunningService, folders: tuple[Path, Path]) -> None:
    documents = folders[0]
    (documents / ".env").write_text(SECRET)
    (documents / ".hidden").mkdir()
    (documents / ".hidden" / "doc.md").write_text(SECRET)
    (documents / "notes").mkdir()
    (documents / "notes" / ".draft.md").write_text(SECRET)
    (documents / "notes" / "open.md").write_text(INSIDE)
    try:
        code, names = listing(files)
        assert code == grpc.StatusCode.OK
        assert "notes/open.md" in names
        assert not [name for name in names if any(part.startswith(".") for part in name.split("/"))]
        for name in (".env", ".hidden/doc.md", "notes/.draft.md", "./.env"):
            code, text, _ = read(files, name)
            assert code == grpc.StatusCode.NOT_FOUND, (name, text)
            assert "hidden" in text and SECRET not in text
    finally:
        (documents / ".env").unlink()
        shutil.rmtree(documents / ".hidden")
        shutil.rmtree(documents / "notes")


def test_what_is_not_a_single_regular_file_is_refused_at_once(
    files: RunningService, folders: tuple[Path, Path]
) -> None:
    documents, outside = folders
    os.mkfifo(documents / "pipe.md")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(documents / "socket.md"))
    os.link(outside / "secret.md", documents / "hardlink.md")
    (documents / "folder.md").mkdir()
    try:
        expectations = {
            "pipe.md": "not a regular file",
            "socket.md": "not a regular file",
            "hardlink.md": "hard links",
            "folder.md": "is a folder",
            "plan.md/x": "is not a folder",
        }
        for name, fragment in expectations.items():
            code, text, elapsed = read(files, name)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (name, text)
            assert fragment in text and SECRET not in text
            assert elapsed < 0.5
        code, names = listing(files)
        assert code == grpc.StatusCode.OK
        assert not {"pipe.md", "socket.md", "hardlink.md", "folder.md"} & set(names)
    finally:
        listener.close()
        (documents / "socket.md").unlink()
        (documents / "pipe.md").unlink()
        (documents / "hardlink.md").unlink()
        (documents / "folder.md").rmdir()


def test_sizes_are_bounded_by_what_was_opened(files: RunningService, folders: tuple[Path, Path]) -> None:
    documents = folders[0]
    with (documents / "huge.md").open("wb") as huge:
        huge.truncate(8 * 1024**3)  # sparse: 8 GiB on paper, nothing on disk
    (documents / "edge.md").write_text("x" * MAX_FILE_BYTES)
    (documents / "over.md").write_text("x" * (MAX_FILE_BYTES + 1))
    try:
        with PeakRss(files.pid) as memory:
            code, text, elapsed = read(files, "huge.md")
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_file_bytes" in text
        assert elapsed < 0.5
        assert memory.peak - memory.baseline < 8 * 1024 * 1024
        print(f"\n8 GiB sparse file: {code.name} in {elapsed:.3f} s, server RSS {mib(memory.baseline):.0f} -> "
              f"peak {mib(memory.peak):.0f} MiB")
        assert read(files, "edge.md")[0] == grpc.StatusCode.OK
        assert read(files, "over.md")[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        for name in ("huge.md", "edge.md", "over.md"):
            (documents / name).unlink()


def test_a_folder_with_too_many_entries_is_resource_exhausted_not_a_partial_list(
    files: RunningService, folders: tuple[Path, Path]
) -> None:
    bulk = folders[0] / "bulk"
    bulk.mkdir()
    for index in range(MAX_LISTED_ENTRIES + 1):
        (bulk / f"{index}.md").write_text("x")
    try:
        code, details = listing(files)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_listed_entries" in details[0]
        code, text, _ = read(files, "bulk/nope.md")
        assert code == grpc.StatusCode.NOT_FOUND and len(text) < 400
        assert read(files, "bulk/7.md")[0] == grpc.StatusCode.OK
    finally:
        shutil.rmtree(bulk)
    assert listing(files)[0] == grpc.StatusCode.OK


def test_nested_folders_and_long_names_are_bounded(files: RunningService, folders: tuple[Path, Path]) -> None:
    deep = folders[0] / "/".join(["d"] * 12)
    deep.mkdir(parents=True)
    (deep / "x.md").write_text(INSIDE)
    try:
        code, text, _ = read(files, "/".join(["d"] * 12) + "/x.md")
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "deeper" in text
        assert all(name.count("/") <= 8 for name in listing(files)[1])
        code, text, _ = read(files, "y" * 250)
        assert code == grpc.StatusCode.NOT_FOUND
        assert "more characters" in text and "y" * 101 not in text
    finally:
        shutil.rmtree(folders[0] / "d")


def test_a_request_protobuf_cannot_parse_is_invalid_argument(files: RunningService) -> None:
    raw = files.channel.unary_unary(
        "/heist.file_reader.v1.FileReaderService/ReadFile",
        request_serializer=lambda body: body,
        response_deserializer=lambda body: body,
    )
    with pytest.raises(grpc.RpcError) as caught:
        raw(b"\x0a\x02\xff\xfe", metadata=files.metadata, timeout=5.0)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
