import os
from pathlib import Path

import grpc
import pytest
import yaml
from heist.file_reader.v1 import file_reader_pb2 as pb
from heist.file_reader.v1 import file_reader_pb2_grpc

from heist_common.config import load_config
from servers.file_reader import DEFAULT_DOCUMENTS_DIR

SHIPPED = ["bank_layout.md", "guard_rotation_notes.md", "security_system.md", "vault_time_lock.md"]


@pytest.fixture
async def files(mesh):
    stub = file_reader_pb2_grpc.FileReaderServiceStub(await mesh.channel("file_reader"))
    metadata = mesh.auth("file_reader:use")

    async def read(name: str) -> pb.ReadFileResponse:
        return await stub.ReadFile(pb.ReadFileRequest(filename=name), metadata=metadata)

    read.list = lambda: stub.ListFiles(pb.ListFilesRequest(), metadata=metadata)
    return read


async def test_lists_the_shipped_documents(files):
    listing = await files.list()
    assert [entry.name for entry in listing.files] == SHIPPED
    assert all(entry.size_bytes == (DEFAULT_DOCUMENTS_DIR / entry.name).stat().st_size for entry in listing.files)


async def test_reads_a_document(files):
    response = await files("vault_time_lock.md")
    assert response.filename == "vault_time_lock.md"
    assert "07:45" in response.content
    assert response.size_bytes == len(response.content.encode())
    assert (await files("./bank_layout.md")).filename == "bank_layout.md"


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("", "required"),
        ("   ", "required"),
        ("../settings.py", ".."),
        ("../../config/heist.yaml", ".."),
        ("subdir/../../x", ".."),
        ("/etc/passwd", "relative"),
        ("bank_layout.md\x00.txt", "NUL"),
        ("..\\settings.py", "'/'"),
        ("x" * 300, "longer"),
    ],
)
async def test_rejects_unsafe_names(files, fails_with, name, fragment):
    await fails_with(files(name), grpc.StatusCode.INVALID_ARGUMENT, fragment)


async def test_unknown_document_lists_what_is_available(files, fails_with):
    message = await fails_with(files("floor_plan.pdf"), grpc.StatusCode.NOT_FOUND, "floor_plan.pdf")
    assert all(name in message for name in SHIPPED)


async def test_symlink_out_of_the_folder_is_refused(tmp_path: Path, mesh, fails_with):
    documents = tmp_path / "docs"
    documents.mkdir()
    (documents / "ok.md").write_text("inside")
    secret = tmp_path / "secret.txt"
    secret.write_text("outside")
    os.symlink(secret, documents / "leak.md")
    os.symlink(tmp_path, documents / "escape")
    config = yaml.safe_load(mesh.config.config_path.read_text())
    config["services"]["file_reader"]["limits"] = {"documents_dir": str(documents), "max_file_bytes": 10}
    (tmp_path / "docs.yaml").write_text(yaml.safe_dump(config))
    mesh.config = load_config(tmp_path / "docs.yaml")
    stub = file_reader_pb2_grpc.FileReaderServiceStub(await mesh.channel("file_reader"))
    metadata = mesh.auth("file_reader:use")
    for name in ("leak.md", "escape/secret.txt"):
        await fails_with(
            stub.ReadFile(pb.ReadFileRequest(filename=name), metadata=metadata),
            grpc.StatusCode.INVALID_ARGUMENT,
            "outside",
        )
    listing = await stub.ListFiles(pb.ListFilesRequest(), metadata=metadata)
    assert [entry.name for entry in listing.files] == ["ok.md"]
    (documents / "big.md").write_text("x" * 11)
    await fails_with(
        stub.ReadFile(pb.ReadFileRequest(filename="big.md"), metadata=metadata),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "limit is 10",
    )


def test_a_file_removed_between_open_and_check_is_not_found(tmp_path: Path) -> None:
    """A document unlinked after open() has no links left: it is gone (NOT_FOUND), not a hard-link attack."""
    from servers.file_reader import DocumentError, DocumentFolder, Limits

    (tmp_path / "plan.md").write_text("inside")
    folder = DocumentFolder(Limits(documents_dir=tmp_path))
    fd = os.open(tmp_path / "plan.md", os.O_RDONLY)
    try:
        os.unlink(tmp_path / "plan.md")
        with pytest.raises(DocumentError) as raised:
            folder._read(fd, "plan.md")
    finally:
        os.close(fd)
    assert raised.value.code == grpc.StatusCode.NOT_FOUND and "removed" in raised.value.message
