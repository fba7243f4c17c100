"""The embedded model's llama.cpp build runs on every x86-64 server CPU.

llama.cpp's AMX matmul faults on some Sapphire Rapids VMs (a general protection
fault at ``ldtilecfg``), and a ``-march=native`` build from one CPU dies with an
illegal instruction on another. ``make install`` builds a portable wheel; these
tests read the installed libraries' machine code to prove it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import llama_cpp
import pytest

AMX_INSTRUCTIONS = re.compile(
    r"\s(ldtilecfg|sttilecfg|tileloadd|tileloaddt1|tilestored|tilezero|tilerelease|tdpb\w*)\s"
)
AVX512_REGISTERS = re.compile(r"%zmm\d+|%k[1-7]\b")


def ggml_libraries() -> list[Path]:
    package = Path(llama_cpp.__file__).resolve().parent
    libraries = sorted(package.rglob("libggml*.so*"))
    assert libraries, f"no libggml*.so under {package}"
    return libraries


def disassemble(library: Path) -> str:
    objdump = shutil.which("objdump")
    assert objdump, "objdump (binutils) is needed to inspect the llama.cpp build"
    return subprocess.run(
        [objdump, "-d", "--no-show-raw-insn", str(library)], capture_output=True, text=True, check=True
    ).stdout


@pytest.fixture(scope="module")
def disassembly() -> dict[str, str]:
    return {library.name: disassemble(library) for library in ggml_libraries()}


def test_the_cpu_backend_is_among_the_inspected_libraries(disassembly: dict[str, str]) -> None:
    assert any(name.startswith("libggml-cpu") for name in disassembly), sorted(disassembly)


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
