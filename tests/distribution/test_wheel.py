"""The wheel installs: built from a clean copy of the repository, installed into a fresh venv, it serves.

What a user gets from ``pip install .`` is checked from outside the checkout: the
wheel is built from a copy of the tracked files (no generated/heist, no build/
folder: what a fresh clone has), installed with its dependencies at the versions
of constraints.txt into a new venv, and run from an empty folder, so nothing can
be imported from the repository. It runs on this interpreter (CI's 3.11) and on
the newest other CPython the machine has (``interpreters``), and once more
installed by ``uv pip install`` straight from the source folder.

Why a wheelhouse: pip keeps no HTTP cache of its downloads here, so every fresh
venv would fetch its few dozen wheels from the index again. They are kept in
``~/.cache/heist-mesh/wheelhouse/<python tag>/``; pip runs offline against it
(``--no-index``) and downloads into it only what it misses, once per machine and
version pin.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
import zipfile
from collections.abc import Iterator, Sequence
from email.parser import Parser
from pathlib import Path

import grpc
import heist
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from heist_common.layout import REPO_ROOT
from tests.support.ports import free_ports

CONSTRAINTS = REPO_ROOT / "constraints.txt"
WHEELHOUSE = Path.home() / ".cache" / "heist-mesh" / "wheelhouse"
DOCUMENTS = REPO_ROOT / "servers" / "data" / "documents"
SERVICE = "heist.calculator.v1.CalculatorService"
CONTRACTS = sorted(p.relative_to(REPO_ROOT / "protos").with_suffix("") for p in (REPO_ROOT / "protos").rglob("*.proto"))

pytestmark = pytest.mark.timeout(900)  # a cold wheelhouse downloads every dependency once


# -- processes -------------------------------------------------------------------------------


def run(command: Sequence[str | Path], cwd: Path, env: dict[str, str] | None = None, timeout: float = 600):
    return subprocess.run(
        [str(part) for part in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, (
        f"{' '.join(result.args)} exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


def outside_env() -> dict[str, str]:
    """The environment minus whatever would point a process at the checkout or change the mesh's settings."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV") and not key.startswith(("HEIST_", "OTEL_"))
    }
    return {**env, "PYTHONNOUSERSITE": "1"}


def version_of(python: str) -> tuple[int, int] | None:
    """``(major, minor)`` of an interpreter that can make a venv with pip, else None."""
    try:
        result = subprocess.run(
            [python, "-c", "import ensurepip, sys, venv; print(*sys.version_info[:2])"],
            capture_output=True, text=True, timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return None
    major, minor = result.stdout.split()
    return int(major), int(minor)


def interpreters() -> list[str]:
    """This interpreter, and the newest newer CPython on the machine (on PATH, in /usr/bin, or pyenv's)."""
    current = sys.version_info[:2]
    candidates: list[tuple[tuple[int, int], str]] = []
    pyenv = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")
    for path in [*pyenv.glob("versions/3.*/bin/python3"), *Path("/usr/bin").glob("python3.*"),
                 *Path("/usr/local/bin").glob("python3.*")]:
        match = re.search(r"(?:/versions/3\.|python3\.)(\d+)(?:\.\d+)?(?:/bin/python3)?$", str(path))
        if match and int(match.group(1)) > current[1]:
            candidates.append(((3, int(match.group(1))), str(path)))
    for minor in range(current[1] + 1, current[1] + 6):
        found = shutil.which(f"python3.{minor}")
        if found:
            candidates.append(((3, minor), found))
    for claimed, path in sorted(candidates, reverse=True):
        if version_of(path) == claimed:
            return [sys.executable, path]
    return [sys.executable]


def pip_from_wheelhouse(python: str | Path, arguments: Sequence[str], requirements: Sequence[str], cwd: Path) -> None:
    """``pip <arguments>`` offline from the wheelhouse; on a miss, download ``requirements`` into it and retry."""
    tag = ok(run([python, "-c", "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')"], cwd)).stdout
    wheelhouse = WHEELHOUSE / tag.strip()
    wheelhouse.mkdir(parents=True, exist_ok=True)
    pip = [python, "-m", "pip", "--disable-pip-version-check"]
    command = [*pip, *arguments, "--no-index", "--find-links", str(wheelhouse)]
    if run(command, cwd, outside_env()).returncode == 0:
        return
    # Into a scratch folder first, then renamed: a concurrent run never sees half a wheel.
    with tempfile.TemporaryDirectory(dir=WHEELHOUSE) as scratch:
        ok(run([*pip, "download", "--dest", scratch, "--constraint", CONSTRAINTS, *requirements], cwd, outside_env()))
        for downloaded in Path(scratch).iterdir():
            os.replace(downloaded, wheelhouse / downloaded.name)
    ok(run(command, cwd, outside_env()))


def requires_dist(wheel: Path) -> list[str]:
    """The wheel's runtime requirements (no extras), from its METADATA."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(archive.read(name).decode())
    return [req for req in metadata.get_all("Requires-Dist") or [] if "extra ==" not in req]


# -- the wheel -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What a fresh clone has: the tracked (and new, not ignored) files, nothing generated."""
    root = tmp_path_factory.mktemp("source")
    listed = ok(run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], REPO_ROOT)).stdout
    for name in filter(None, listed.split("\0")):
        if (REPO_ROOT / name).is_file():  # a tracked file deleted in the work tree is not part of the copy
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, root / name)
    assert not (root / "generated" / "heist").exists()
    return root


@pytest.fixture(scope="module")
def wheel(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip wheel`` of the copy with build isolation, as ``pip install .`` builds it."""
    dist = tmp_path_factory.mktemp("dist")
    build_requires = tomllib.loads((source / "pyproject.toml").read_text())["build-system"]["requires"]
    pip_from_wheelhouse(sys.executable, ["wheel", "--no-deps", "--wheel-dir", str(dist), str(source)],
                        build_requires, dist)
    (built,) = dist.glob("heist_mesh-*.whl")
    return built


def test_build_requirements_are_the_pinned_versions() -> None:
    pins = dict(
        line.split("==") for line in CONSTRAINTS.read_text().splitlines() if "==" in line and not line.startswith("#")
    )
    pins = {name.lower().replace("_", "-"): version for name, version in pins.items()}
    build = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    for requirement in build:
        name, _, version = requirement.partition("==")
        assert version == pins[name.lower()], f"{requirement}: constraints.txt pins {pins[name.lower()]}"


def test_the_wheel_carries_the_contracts_config_documents_and_license(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert archive.read("heist_common/shipped/heist.yaml") == (REPO_ROOT / "config" / "heist.yaml").read_bytes()
        for document in DOCUMENTS.iterdir():
            assert archive.read(f"servers/data/documents/{document.name}") == document.read_bytes()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        license_text = archive.read(next(n for n in names if n.endswith(".dist-info/licenses/LICENSE")))
    for contract in CONTRACTS:
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi"):
            assert f"{contract.as_posix()}{suffix}" in names
    assert "heist/py.typed" in names and "heist/__init__.py" in names
    assert not [n for n in names if n.startswith(("tests/", "protos/", "config/", "generated/"))]
    assert license_text == (REPO_ROOT / "LICENSE").read_bytes() and b"Apache License" in license_text
    assert "License-Expression: Apache-2.0" in metadata and "Requires-Python: >=3.11" in metadata
    assert {f"Programming Language :: Python :: 3.{minor}" for minor in (11, 12, 13)} <= set(
        re.findall(r"^Classifier: (.*)$", metadata, re.MULTILINE)
    )


def test_the_source_distribution_can_build_the_wheel_on_its_own(source: Path, tmp_path: Path) -> None:
    """``python -m build`` goes through the sdist: it needs the protos, their generator and the config."""
    build = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    name = ok(run([sys.executable, "-c", build, tmp_path], source)).stdout.strip().splitlines()[-1]
    with tarfile.open(tmp_path / name) as archive:
        members = {member.split("/", 1)[1] for member in archive.getnames() if "/" in member}
    needed = {"setup.py", "pyproject.toml", "LICENSE", "config/heist.yaml", "protos/generate.py"}
    assert needed | {f"protos/{contract.as_posix()}.proto" for contract in CONTRACTS} <= members


# -- installed -------------------------------------------------------------------------------

PROBE = """
import json, heist, heist_common, orchestrator, servers
from heist_common import layout
from servers import file_reader
print(json.dumps({
    "modules": [m.__file__ for m in (heist, heist_common, orchestrator, servers)],
    "in_checkout": layout.IN_CHECKOUT,
    "root": str(layout.REPO_ROOT),
    "config": str(layout.shipped_config_path()),
    "documents": sorted(p.name for p in file_reader.DEFAULT_DOCUMENTS_DIR.iterdir()),
    "fingerprint": heist.PROTO_SOURCES_SHA256,
}))
"""


INTERPRETERS = interpreters()
INSTALLS = [("pip", python) for python in INTERPRETERS] + [("uv", INTERPRETERS[-1])]
"""pip on every interpreter; ``uv pip install`` of the source folder (its own build) on the newest."""


def install_id(install: tuple[str, str]) -> str:
    installer, python = install
    return f"{installer}-python{'.'.join(map(str, version_of(python) or ()))}"


@pytest.fixture(params=INSTALLS, ids=install_id)
def installed(request: pytest.FixtureRequest, source: Path, tmp_path: Path) -> Iterator[Path]:
    """A fresh venv of the interpreter with the project and its pinned dependencies; yields its bin/ folder."""
    installer, python = request.param
    venv = tmp_path / "venv"
    if installer == "pip":
        wheel: Path = request.getfixturevalue("wheel")
        ok(run([python, "-m", "venv", venv], tmp_path, outside_env()))
        pip_from_wheelhouse(venv / "bin" / "python", ["install", "--constraint", str(CONSTRAINTS), str(wheel)],
                            requires_dist(wheel), tmp_path)
    else:
        uv = Path(sys.executable).parent / "uv"
        ok(run([uv, "venv", "--quiet", "--python", python, venv], tmp_path, outside_env()))
        ok(run([uv, "pip", "install", "--quiet", "--python", venv / "bin" / "python", "--constraint", CONSTRAINTS,
                source], tmp_path, outside_env()))
    yield venv / "bin"


def health(address: str, credentials_dir: Path) -> str:
    """The calculator's health over mTLS with the supervisor's dev client certificate, or why not."""
    tls = credentials_dir / "tls"
    try:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=(tls / "ca.crt").read_bytes(),
            private_key=(tls / "supervisor.key").read_bytes(),
            certificate_chain=(tls / "supervisor.crt").read_bytes(),
        )
    except OSError as exc:
        return f"no credentials yet: {exc}"
    # The name the calculator's certificate carries (heist_common.tls.server_name), not the address dialled.
    name_override = [("grpc.ssl_target_name_override", "calculator.heist.internal")]
    with grpc.secure_channel(address, credentials, options=name_override) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=2)
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def test_the_installed_wheel_runs_the_cli_and_serves(installed: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"  # an empty folder: no config/, nothing of the checkout on sys.path
    work.mkdir()
    env = outside_env()

    usage = ok(run([installed / "orchestrator", "--help"], work, env))
    assert usage.stdout.startswith("usage: orchestrator") and "run" in usage.stdout

    probe = json.loads(ok(run([installed / "python", "-c", PROBE], work, env)).stdout)
    venv = installed.parent
    assert all(Path(module).is_relative_to(venv) for module in probe["modules"]), probe["modules"]
    assert probe["in_checkout"] is False and probe["root"] == str(work)
    assert Path(probe["config"]).is_relative_to(venv)
    assert Path(probe["config"]).read_bytes() == (REPO_ROOT / "config" / "heist.yaml").read_bytes()
    assert probe["documents"] == sorted(p.name for p in DOCUMENTS.iterdir())
    assert probe["fingerprint"] == heist.PROTO_SOURCES_SHA256

    # No --config: the shipped config, found in the package; its run_dir `var` lands in the working folder.
    port, metrics_port = free_ports(2)
    address = f"127.0.0.1:{port}"
    command = [installed / "python", "-m", "servers.calculator", "--address", address,
               "--metrics-address", f"127.0.0.1:{metrics_port}"]
    with (tmp_path / "calculator.log").open("wb") as log:
        server = subprocess.Popen([str(part) for part in command], cwd=work, env=env, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        status = "not started"
        while time.monotonic() < deadline and server.poll() is None:
            status = health(address, work / "var" / "credentials")
            if status == "SERVING":
                break
            time.sleep(0.2)
        assert status == "SERVING", f"{status}\n{(tmp_path / 'calculator.log').read_text()[-3000:]}"
    finally:
        os.kill(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.kill(server.pid, signal.SIGKILL)
            server.wait()
    assert server.returncode == 0, (tmp_path / "calculator.log").read_text()[-3000:]
    assert not list(venv.glob("lib/python3*/site-packages/var")), "the run folder went into the installation"
