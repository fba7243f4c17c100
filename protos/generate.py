"""Generate the Python modules and .pyi stubs for every contract into generated/.

Why a script and not a bare protoc line: the output must import as the normal
package ``heist`` (``__init__.py`` files), and must carry a fingerprint of the
sources it came from so that a stale ``generated/`` is detected (``--check``)
instead of silently serving an old contract.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUTPUT_ROOT = ROOT / "generated"
PACKAGE = "heist"
FINGERPRINT_NAME = "PROTO_SOURCES_SHA256"


def proto_files() -> list[Path]:
    """All contract files, in a stable order."""
    return sorted((PROTO_ROOT / PACKAGE).rglob("*.proto"))


def sources_fingerprint() -> str:
    """SHA-256 over the relative paths and bytes of every .proto file."""
    digest = hashlib.sha256()
    for path in proto_files():
        digest.update(path.relative_to(PROTO_ROOT).as_posix().encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def plugin(name: str) -> Path:
    """Find the protoc plugin script ``name`` installed with the importable mypy-protobuf.

    Why not only next to ``sys.executable``: in pip's isolated build of the wheel
    (setup.py runs this module) mypy-protobuf and its scripts live in a
    temporary prefix of their own, not in the interpreter's folder.
    """
    try:
        files = metadata.distribution("mypy-protobuf").files or []
    except metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.name == name and Path(str(file.locate())).is_file():
            return Path(str(file.locate())).resolve()
    return Path(sys.executable).parent / name


def generate(output_root: Path) -> None:
    """Run grpcio-tools (with mypy-protobuf plugins) into ``output_root``."""
    well_known = Path(protoc.__file__).parent / "_proto"
    package_dir = output_root / PACKAGE
    if package_dir.exists():
        shutil.rmtree(package_dir)
    output_root.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--plugin=protoc-gen-mypy={plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={output_root}",
        f"--grpc_python_out={output_root}",
        f"--mypy_out=quiet:{output_root}",
        f"--mypy_grpc_out=quiet:{output_root}",
        *[str(path.relative_to(PROTO_ROOT)) for path in proto_files()],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed; see the messages above")
    for directory in [package_dir, *[p for p in package_dir.rglob("*") if p.is_dir()]]:
        (directory / "__init__.py").touch()
    (package_dir / "__init__.py").write_text(
        '"""Generated from protos/ by protos/generate.py. Do not edit."""\n\n'
        f'{FINGERPRINT_NAME} = "{sources_fingerprint()}"\n'
    )
    (package_dir / "py.typed").touch()


def generated_fingerprint(output_root: Path) -> str | None:
    """Return the fingerprint recorded in ``output_root``, or None if nothing is generated."""
    init = output_root / PACKAGE / "__init__.py"
    if not init.exists():
        return None
    for line in init.read_text().splitlines():
        if line.startswith(FINGERPRINT_NAME):
            return line.split("=", 1)[1].strip().strip('"')
    return None


def check(output_root: Path) -> int:
    """Exit status 1 (with a message) when generated/ is missing or stale."""
    recorded = generated_fingerprint(output_root)
    if recorded is None:
        print(f"{output_root}/{PACKAGE} is missing: run `make protos`", file=sys.stderr)
        return 1
    if recorded != sources_fingerprint():
        print(f"{output_root}/{PACKAGE} is stale (protos changed): run `make protos`", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as scratch:
        generate(Path(scratch))
        fresh = {p.relative_to(scratch): p.read_bytes() for p in Path(scratch).rglob("*") if p.is_file()}
    current = {
        p.relative_to(output_root): p.read_bytes()
        for p in (output_root / PACKAGE).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    if fresh != current:
        differing = {p for p in fresh if fresh[p] != current.get(p)}
        changed = sorted(str(p) for p in set(fresh) ^ set(current) | differing)
        print(f"generated/ differs from a fresh generation (hand-edited?): {', '.join(changed[:5])}", file=sys.stderr)
        return 1
    return 0


def main() -> int:
    """Generate, or with ``--check`` verify, the Python code for every contract."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="verify generated/ matches protos/ instead of writing")
    parser.add_argument("--out", type=Path, default=OUTPUT_ROOT, help="output root (default: generated/)")
    options = parser.parse_args()
    if options.check:
        return check(options.out)
    generate(options.out)
    print(f"generated {len(proto_files())} contracts into {options.out}/{PACKAGE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
