"""The embedded model's llama.cpp build runs on every x86-64 server CPU.

llama.cpp's AMX matmul faults on some Sapphire Rapids VMs (a general protection
fault at ``ldtilecfg``), and a ``-march=native`` build from one CPU dies with an
illegal instruction on another. ``make install`` builds llama-server and its
shared libraries portably; these tests read their machine code to prove it
(and that llama-cpp-python's bindings load those very libraries).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import llama_cpp
import pytest

from servers import llama_server

AMX_INSTRUCTIONS = re.compile(
    r"\s(ldtilecfg|sttilecfg|tileloadd|tileloaddt1|tilestored|tilezero|tilerelease|tdpb\w*)\s"
)
AVX512_REGISTERS = re.compile(r"%zmm\d+|%k[1-7]\b")


def llama_build() -> list[Path]:
    """The llama-server binary and every shared library beside it (each real file once, not its version links)."""
    folder = llama_server.BINARY.resolve().parent
    files = {path.resolve() for path in [folder / llama_server.BINARY.name, *folder.glob("lib*.so*")]}
    return sorted(files)


def disassemble(library: Path) -> str:
    objdump = shutil.which("objdump")
    assert objdump, "objdump (binutils) is needed to inspect the llama.cpp build"
    return subprocess.run(
        [objdump, "-d", "--no-show-raw-insn", str(library)], capture_output=True, text=True, check=True
    ).stdout


@pytest.fixture(scope="module")
def disassembly() -> dict[str, str]:
    return {library.name: disassemble(library) for library in llama_build()}


def test_the_server_and_its_libraries_are_among_the_inspected_files(disassembly: dict[str, str]) -> None:
    names = sorted(disassembly)
    assert "llama-server" in names, names
    for library in ("libggml-cpu", "libggml-base", "libllama", "libmtmd"):
        assert any(name.startswith(library + ".so") for name in names), (library, names)


def test_the_python_bindings_load_the_same_libraries() -> None:
    package_libs = Path(llama_cpp.__file__).resolve().parent / "lib"
    assert package_libs.resolve() == llama_server.BINARY.resolve().parent
    # `import llama_cpp` (above) loaded libllama: the real file is the one beside llama-server.
    libllama = (llama_server.BINARY.resolve().parent / "libllama.so").resolve()
    assert str(libllama) in Path(f"/proc/{os.getpid()}/maps").read_text()


def test_no_amx_tile_instructions(disassembly: dict[str, str]) -> None:
    found = {name: sorted(set(AMX_INSTRUCTIONS.findall(code))) for name, code in disassembly.items()}
    assert not any(found.values()), f"AMX instructions in the llama.cpp build: {found}"


def test_no_avx512_code_for_a_cpu_that_has_only_avx2(disassembly: dict[str, str]) -> None:
    found = {name: len(AVX512_REGISTERS.findall(code)) for name, code in disassembly.items()}
    assert not any(found.values()), f"AVX-512 registers used by the llama.cpp build: {found}"


def test_the_detector_finds_amx_when_it_is_there() -> None:
    """The pattern itself must match what objdump prints for AMX, or the test above proves nothing."""
    sample = (
        "  4011a0:\tldtilecfg (%rax)\n  4011a5:\ttileloadd (%rsi,%rdx,1),%tmm0\n  4011ab:\ttdpbssd %tmm2,%tmm1,%tmm0\n"
    )
    assert AMX_INSTRUCTIONS.findall(sample) == ["ldtilecfg", "tileloadd", "tdpbssd"]
    assert AVX512_REGISTERS.findall("vpaddd %zmm1,%zmm2,%zmm3") == ["%zmm1", "%zmm2", "%zmm3"]
