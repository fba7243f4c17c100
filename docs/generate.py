"""Write the parts of docs/ that are derived from the code, or with ``--check`` verify them.

Why generated: a reference table copied by hand drifts from the code the day
someone changes a default. So ``docs/configuration.md`` is written from the
pydantic models (``heist_common.config`` and each service's ``Limits``), and the
exit-code and make-target tables in ``docs/cli.md`` from
``heist_common.exit_codes`` and the Makefile. ``--check`` exits 1 naming every
stale file, as ``protos/generate.py --check`` does for ``generated/``.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import itertools
import re
import sys
import types
from collections.abc import Callable, Iterator, Mapping
from enum import IntEnum
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python docs/generate.py` puts docs/ first, not the repository
    sys.path.insert(0, str(ROOT))

from heist_common.config import HeistConfig  # noqa: E402 (needs the repository on the path)
from heist_common.exit_codes import ExitCode  # noqa: E402
from orchestrator.session.records import SHAPES  # noqa: E402

DOCS = ROOT / "docs"
SHIPPED_CONFIG = ROOT / "config" / "heist.yaml"
MAKEFILE = ROOT / "Makefile"
BLOCK = re.compile(r"(<!-- generated: (?P<name>[a-z-]+) -->\n).*?(<!-- end generated: (?P=name) -->)", re.DOTALL)
MAKE_TARGET = re.compile(r"^([a-z][a-z-]*):.*?## (.+)$", re.MULTILINE)
WITHOUT_DESCRIPTION = "—"


class GenerationError(Exception):
    """The code cannot be documented as it is (e.g. a config field without a description)."""


# -- rendering values and types --------------------------------------------------------------


def cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def yaml_value(value: Any, *, in_bytes: bool = False) -> str:
    """Render a default or shipped value as the YAML a user would write (``in_bytes``: with its unit)."""
    if value is None:
        return "unset"
    if isinstance(value, BaseModel):
        return "(section)"
    if isinstance(value, Path):
        value = value.relative_to(ROOT).as_posix() if value.is_absolute() and value.is_relative_to(ROOT) else str(value)
    if isinstance(value, tuple):
        value = list(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False).strip()
    text = text.removesuffix("\n...").removesuffix("...").strip()
    shown = f"`{text}`"
    if in_bytes and isinstance(value, int) and not isinstance(value, bool) and value >= 1024 and value % 1024 == 0:
        shown += f" ({size(value)})"
    return shown


def is_bytes(name: str) -> bool:
    """Whether a field counts bytes, whose values read better with a unit."""
    return name.endswith("_bytes")


def size(value: int) -> str:
    """1048576 -> 1 MiB (only exact multiples of 1024 are given a unit)."""
    for unit in ("GiB", "MiB", "KiB"):
        scale = {"KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}[unit]
        if value % scale == 0:
            return f"{value // scale} {unit}"
    return str(value)


SCALARS = {str: "string", int: "integer", float: "number", bool: "boolean", Path: "path", type(None): "null"}


def type_name(annotation: Any) -> str:
    """Name a type as a YAML author reads it: ``list of string (non-empty)``, ``one of `a`, `b```."""
    origin = get_origin(annotation)
    if origin is Annotated:
        base, *metadata = get_args(annotation)
        words = constraints([item for entry in metadata for item in _flatten(entry)], base)
        return type_name(base) + (f" ({', '.join(words)})" if words else "")
    if origin is Literal:
        return "one of " + ", ".join(f"`{value}`" for value in get_args(annotation))
    if origin in (Union, types.UnionType):
        options = [arg for arg in get_args(annotation) if arg is not type(None)]
        return " or ".join(type_name(arg) for arg in options) + (
            " (optional)" if len(options) < len(get_args(annotation)) else ""
        )
    if origin is tuple:
        return f"list of {type_name(get_args(annotation)[0])}"
    if origin is dict:
        key, value = get_args(annotation)
        return f"mapping of {type_name(key)} to {type_name(value)}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    if annotation is Any:
        return "any"
    return SCALARS.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _flatten(entry: Any) -> Iterator[Any]:
    """Constraint objects of one ``Annotated`` argument (a ``Field(...)`` carries several)."""
    if isinstance(entry, FieldInfo):
        yield from entry.metadata
    else:
        yield entry


def constraints(metadata: list[Any], base: Any = None) -> list[str]:
    """Bounds in words: ``> 0``, ``≤ 16``, ``non-empty``, ``not blank``; strictness is said once per page."""
    words = []
    for item in metadata:
        if isinstance(item, annotated_types.Gt):
            words.append(f"> {item.gt}")
        elif isinstance(item, annotated_types.Ge):
            bound = item.ge
            big = isinstance(bound, int) and bound >= 1024**2 and bound % 1024 == 0
            words.append(f"≥ {bound}" + (f" ({size(bound)})" if isinstance(bound, int) and big else ""))
        elif isinstance(item, annotated_types.Lt):
            words.append(f"< {item.lt}")
        elif isinstance(item, annotated_types.Le):
            words.append(f"≤ {item.le}")
        elif isinstance(item, annotated_types.MinLen):
            if base is str and item.min_length == 1:
                words.append("non-empty")
            else:
                words.append(f"at least {item.min_length}")
        elif isinstance(item, annotated_types.MaxLen):
            words.append(f"at most {item.max_length}")
        elif getattr(item, "pattern", None) == r"\S":
            words.append("not blank")
        elif getattr(item, "pattern", None):
            words.append(f"matches `{item.pattern}`")
    return words


# -- the configuration reference --------------------------------------------------------------


def attribute_docstrings(model: type[BaseModel]) -> dict[str, str]:
    """``field: T = ...`` followed by a string literal: that string, per field (the services' ``Limits`` style)."""
    try:
        tree = ast.parse(inspect.getsource(model))
    except (OSError, TypeError):
        return {}
    found: dict[str, str] = {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    for statement, following in itertools.pairwise(body):
        if (
            isinstance(statement, ast.AnnAssign)
            and isinstance(statement.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            found[statement.target.id] = " ".join(following.value.value.split())
    return found


def description(model: type[BaseModel], name: str, field: FieldInfo, docstrings: Mapping[str, str]) -> str | None:
    """Return the field's ``description``, else its attribute docstring (reST literals turned into Markdown)."""
    text = field.description or docstrings.get(name)
    return text.replace("``", "`") if text else None


def field_type(field: FieldInfo) -> str:
    """Name the field's type with its own bounds (pydantic keeps top-level ones in ``metadata``)."""
    words = constraints(list(field.metadata), field.annotation)
    return type_name(field.annotation) + (f" ({', '.join(words)})" if words else "")


def default_of(field: FieldInfo) -> Any:
    """Return the code's default (PydanticUndefined when the key is required)."""
    if field.default_factory is not None:
        return field.default_factory()  # type: ignore[call-arg]
    return field.default


def section_model(annotation: Any) -> tuple[type[BaseModel], str] | None:
    """Return the section model behind a field and the key suffix of its entries (``.<name>``, ``[]``, none)."""
    origin = get_origin(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, ""
    if origin is dict:
        value = get_args(annotation)[1]
        if isinstance(value, type) and issubclass(value, BaseModel):
            return value, ".<name>"
    if origin is tuple:
        item = get_args(annotation)[0]
        if isinstance(item, type) and issubclass(item, BaseModel):
            return item, "[]"
    return None


def anchor(key: str) -> str:
    """GitHub's heading anchor for a heading that is just ``key`` in code style."""
    return re.sub(r"[^a-z0-9_ -]", "", key.lower()).replace(" ", "-")


def lookup(data: Any, path: tuple[str, ...]) -> list[Any]:
    """Every value at ``path`` in the shipped YAML; ``*`` stands for each entry of a mapping or list."""
    found = [data]
    for part in path:
        following = []
        for value in found:
            if part == "*":
                following += list(value.values()) if isinstance(value, dict) else list(value or [])
            elif isinstance(value, dict) and part in value:
                following.append(value[part])
        found = following
    return found


def shipped_text(value: Any) -> str:
    """Render a shipped value, shortened when it is prose (an objective, a prompt) or a whole mapping."""
    if isinstance(value, dict):
        return ", ".join(f"`{key}`" for key in value) or "`{}`"
    if isinstance(value, str) and len(value) > 40:
        return f"`{value[:37].rstrip()}…`"
    return yaml_value(value)


LOADER_DEFAULTS = {"database": "see section", "database.url": "`sqlite:///<mesh.run_dir>/audit/heist.db`"}
"""Required by the model but filled in by ``HeistConfig``'s loader when absent: what it fills in."""
ENTRY_TABLES = {"services.<name>": "services", "agents[]": "agents"}
"""Sections whose shipped values differ per entry: a table of the shipped entries follows them."""


class ConfigPage:
    """docs/configuration.md: every section of the config file, its fields, and each service's limits."""

    def __init__(self, shipped: Mapping[str, Any]) -> None:
        self.shipped = shipped
        self.missing: list[str] = []
        self.seen: set[str] = set()
        self.lines: list[str] = []

    def render(self) -> str:
        """Render the whole page."""
        self.lines = [
            "# Configuration reference",
            "",
            "<!-- Generated by docs/generate.py from heist_common/config.py and each service's Limits model."
            " Do not edit: run `make docs`. -->",
            "",
            "`config/heist.yaml` is the one file a user edits. It is declared once, as pydantic models in",
            "`heist_common/config.py`, and validated on load: an unknown key, a wrong type or a value out of",
            "bounds fails naming the key and the file (`orchestrator` exits 3). Scalars are strict: YAML already",
            'types its values, so `"3"` where a number belongs is an error. Relative paths are under the',
            "repository root. `orchestrator --config PATH` (or `HEIST_CONFIG`) and `make serve CONFIG=PATH` read",
            "another file.",
            "",
            "**default** is the code's: what applies when the key is absent. **shipped** is what",
            "`config/heist.yaml` sets, where it sets the key.",
            "",
        ]
        self.section("", HeistConfig, ())
        unknown = set(LOADER_DEFAULTS) - self.seen
        if unknown:
            raise GenerationError(f"LOADER_DEFAULTS names keys the config no longer has: {sorted(unknown)}")
        if self.missing:
            raise GenerationError(
                "config fields without a description (add Field(description=...) in heist_common/config.py): "
                + ", ".join(self.missing)
            )
        self.lines += [
            "## Service limits",
            "",
            "Each service validates its own `limits` mapping with its `Limits` model when it starts (`make serve`",
            "checks them all before it starts anything), so each service owns its bounds.",
            "",
        ]
        for service in self.shipped.get("services", {}):
            self.limits(service)
        return "\n".join(self.lines).rstrip("\n") + "\n"

    def section(self, key: str, model: type[BaseModel], path: tuple[str, ...]) -> None:
        """One table for ``model``, then a section per nested model."""
        docstrings = attribute_docstrings(model)
        nested: list[tuple[str, type[BaseModel], tuple[str, ...]]] = []
        summary = " ".join((inspect.getdoc(model) or "").split("\n\n")[0].split()).replace("``", "`")
        self.lines += [f"## `{key}`" if key else "## Top level", "", summary, ""]
        self.lines += ["| key | type | default | shipped | description |", "| --- | --- | --- | --- | --- |"]
        for name, field in model.model_fields.items():
            full = f"{key}.{name}" if key else name
            self.seen.add(full)
            text = description(model, name, field, docstrings)
            if text is None:
                self.missing.append(full)
                text = WITHOUT_DESCRIPTION
            default = default_of(field)
            inner = section_model(field.annotation)
            values = lookup(self.shipped, (*path, name))
            if inner is not None:
                child, suffix = inner
                child_key = full + suffix
                nested.append((child_key, child, (*path, name, "*") if suffix else (*path, name)))
                kind = {"": "mapping", ".<name>": "mapping of name to mapping", "[]": "list of mappings"}[suffix]
                words = constraints(list(field.metadata))
                shown_type = (
                    f"{kind}{f' ({chr(44).join(words)})' if words else ''}, see [`{child_key}`](#{anchor(child_key)})"
                )
                shown_default = "required" if default is PydanticUndefined else "see section"
                shipped = shipped_text(values[0]) if suffix == ".<name>" and values else ""
            else:
                shown_type = field_type(field)
                shown_default = (
                    "required" if default is PydanticUndefined else yaml_value(default, in_bytes=is_bytes(name))
                )
                distinct = {yaml.safe_dump(value) for value in values}
                if distinct and key in ENTRY_TABLES:
                    shipped = "per entry, below"
                elif len(distinct) == 1:
                    shipped = shipped_text(values[0])
                else:
                    shipped = "varies" if distinct else ""
            shown_default = LOADER_DEFAULTS.get(full, shown_default)
            self.lines.append(
                f"| `{full}` | {cell(shown_type)} | {cell(shown_default)} | {cell(shipped)} | {cell(text)} |"
            )
        self.lines.append("")
        if key in ENTRY_TABLES:
            self.shipped_entries(ENTRY_TABLES[key])
        for child_key, child, child_path in nested:
            self.section(child_key, child, child_path)

    def shipped_entries(self, key: str) -> None:
        """Add a table of the shipped file's services or crew, one row each (their values differ per entry)."""
        entries = self.shipped.get(key)
        if isinstance(entries, dict):
            rows = [{"name": name, **(value or {})} for name, value in entries.items()]
        elif isinstance(entries, list):
            rows = [dict(entry) for entry in entries]
        else:
            return
        columns = list(dict.fromkeys(column for row in rows for column in row if column != "system_prompt"))
        self.lines += [f"Shipped `{key}` (`config/heist.yaml`):", ""]
        self.lines += ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
        for row in rows:
            values = [cell(shipped_text(row[column])) if column in row else "" for column in columns]
            self.lines.append("| " + " | ".join(values) + " |")
        self.lines.append("")

    def limits(self, service: str) -> None:
        """``services.<service>.limits``, from the model the service validates it with (as the servers find it)."""
        try:
            module = importlib.import_module(f"servers.{service}")
        except ModuleNotFoundError:
            return
        model = getattr(module, "Limits", None)
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or not model.model_fields:
            return
        docstrings = attribute_docstrings(model)
        key = f"services.{service}.limits"
        summary = " ".join((inspect.getdoc(model) or "").split("\n\n")[0].split()).replace("``", "`")
        self.lines += [f"### `{key}`", "", summary, ""]
        self.lines += ["| key | type | default | shipped | description |", "| --- | --- | --- | --- | --- |"]
        for name, field in model.model_fields.items():
            values = lookup(self.shipped, ("services", service, "limits", name))
            text = description(model, name, field, docstrings) or WITHOUT_DESCRIPTION
            default = default_of(field)
            shown_default = "required" if default is PydanticUndefined else yaml_value(default, in_bytes=is_bytes(name))
            shown_shipped = shipped_text(values[0]) if values else ""
            self.lines.append(
                f"| `{key}.{name}` | {cell(field_type(field))} | {cell(shown_default)} | {cell(shown_shipped)} "
                f"| {cell(text)} |"
            )
        self.lines.append("")


def configuration_page() -> str:
    """docs/configuration.md."""
    shipped = yaml.safe_load(SHIPPED_CONFIG.read_text(encoding="utf-8")) or {}
    return ConfigPage(shipped).render()


# -- blocks inside hand-written pages ---------------------------------------------------------


def enum_docstrings(enum: type[IntEnum]) -> dict[str, str]:
    """Each member's docstring (the string literal after ``NAME = value``)."""
    tree = ast.parse(inspect.getsource(enum))
    body = tree.body[0].body if isinstance(tree.body[0], ast.ClassDef) else []
    found: dict[str, str] = {}
    for statement, following in itertools.pairwise(body):
        if (
            isinstance(statement, ast.Assign)
            and isinstance(statement.targets[0], ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            found[statement.targets[0].id] = " ".join(following.value.value.split()).replace("``", "`")
    return found


def exit_codes_block() -> str:
    """Render the exit-code table from ``heist_common.exit_codes.ExitCode``."""
    meanings = enum_docstrings(ExitCode)
    undocumented = [code.name for code in ExitCode if code.name not in meanings]
    if undocumented:
        raise GenerationError(f"exit codes without a docstring in heist_common/exit_codes.py: {undocumented}")
    rows = ["| code | name | meaning |", "| --- | --- | --- |"]
    rows += [f"| {int(code)} | `{code.name}` | {cell(meanings[code.name])} |" for code in ExitCode]
    return "\n".join(rows) + "\n"


def make_targets_block() -> str:
    """Render the make targets with their ``## `` help, as ``make help`` lists them."""
    rows = ["| target | what it does |", "| --- | --- |"]
    rows += [f"| `make {name}` | {cell(text.strip())} |" for name, text in MAKE_TARGET.findall(MAKEFILE.read_text())]
    return "\n".join(rows) + "\n"


def json_records_block() -> str:
    """Render one table per ``--json`` record type from ``orchestrator.session.records.SHAPES``."""
    parts = []
    for kind, fields in SHAPES.items():
        rows = [f"`{kind}` objects:", "", "| field | meaning |", "| --- | --- |"]
        rows += [f"| `{name}` | {cell(meaning)} |" for name, meaning in fields.items()]
        parts.append("\n".join(rows) + "\n")
    return "\n".join(parts)


BLOCKS: dict[str, Callable[[], str]] = {
    "exit-codes": exit_codes_block,
    "make-targets": make_targets_block,
    "json-records": json_records_block,
}


def fill_blocks(text: str, source: str) -> str:
    """Replace every generated block of a hand-written page; an unknown block name is an error."""

    def replace(match: re.Match[str]) -> str:
        name = match.group("name")
        if name not in BLOCKS:
            raise GenerationError(f"{source}: unknown generated block {name!r} (known: {', '.join(BLOCKS)})")
        return match.group(1) + BLOCKS[name]() + match.group(3)

    return BLOCK.sub(replace, text)


# -- writing and checking ---------------------------------------------------------------------


def expected(docs: Path) -> dict[Path, str]:
    """Every generated file under ``docs`` with the content it should have."""
    pages = {docs / "configuration.md": configuration_page()}
    cli = docs / "cli.md"
    pages[cli] = fill_blocks(cli.read_text(encoding="utf-8"), str(cli))
    return pages


def main(argv: list[str] | None = None) -> int:
    """Generate, or with ``--check`` verify, the generated parts of docs/."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--check", action="store_true", help="verify docs/ is up to date instead of writing")
    parser.add_argument("--docs", type=Path, default=DOCS, help="the docs folder (default: docs/)")
    options = parser.parse_args(argv)
    try:
        pages = expected(options.docs)
    except (GenerationError, OSError) as exc:
        print(f"docs/generate.py: {exc}", file=sys.stderr)
        return 1
    if options.check:
        stale = [path for path, text in pages.items() if not path.exists() or path.read_text(encoding="utf-8") != text]
        for path in stale:
            print(f"{path} is stale: run `make docs` (python docs/generate.py)", file=sys.stderr)
        return 1 if stale else 0
    for path, text in pages.items():
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
