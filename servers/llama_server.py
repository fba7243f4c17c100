"""The embedded model's server: llama.cpp's own ``llama-server``, as ``make install`` built it.

Why one module: the supervisor (``make serve``), the tests and the benchmarks
start the very same command line, so what the tests prove is what users run.

Why llama.cpp's server and not llama-cpp-python's: it batches the requests of
``parallel`` slots continuously (four heists at once share the CPU instead of
queueing), its sampler masks the vocabulary only when a sampled token breaks
the grammar, and it exports Prometheus metrics.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

BINARY = Path(sys.prefix) / "bin" / "llama-server"
"""Where ``make install`` links the binary (its libraries sit beside the real file, found through $ORIGIN).
Without it (the mesh installed with pip), a ``llama-server`` on the PATH is used."""
CONTEXT_PER_SLOT = 4096
"""Tokens of context each slot gets: a heist prompt plus its reply fit with room to spare."""
CHAT_TEMPLATE_FILE = "gemma-3-chat-template.jinja"


def default_threads() -> int:
    """One thread per CPU core this process may use: on a machine of its own the server is fastest so."""
    return len(os.sched_getaffinity(0))


# Gemma 3's turn format (<start_of_turn>user|model ... <end_of_turn>), which the
# model file does not carry. Unlike Google's template it does not refuse
# non-alternating roles, and it renders tools: how to call one and their
# definitions open the first user turn, a call is <tool_call>{json}</tool_call>
# making up the model's turn, a result a <tool_response> in a user turn.
# llama-server reads the call format from this template (--jinja), parses the
# model's calls into `tool_calls`, and builds the grammar of a call (strict
# schemas, `tool_choice: "required"`) from it.
CHAT_TEMPLATE = """\
{{- bos_token -}}
{%- set ns = namespace(prefix="", first=true) -%}
{%- if tools -%}
{%- set ns.prefix = ns.prefix + "To call a function, reply with <tool_call>" -%}
{%- set ns.prefix = ns.prefix + '{"name": <function name>, "arguments": <arguments object>}</tool_call>.' -%}
{%- set ns.prefix = ns.prefix + "\\nFunctions:\\n" -%}
{%- for tool in tools -%}
{%- set fn = tool.function -%}
{%- set ns.prefix = ns.prefix + '{"name": "' + fn.name + '", "description": ' + ((fn.description or "") | tojson) -%}
{%- set ns.prefix = ns.prefix + ', "parameters": ' + (fn.parameters | tojson) + "}\\n" -%}
{%- endfor -%}
{%- set ns.prefix = ns.prefix + "\\n" -%}
{%- endif -%}
{%- if messages and messages[0].role == "system" -%}
{%- set ns.prefix = ns.prefix + messages[0].content + "\\n\\n" -%}
{%- set loop_messages = messages[1:] -%}
{%- else -%}
{%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
{%- if ns.first and message.role != "user" and ns.prefix -%}
{{- "<start_of_turn>user\\n" + (ns.prefix | trim) + "<end_of_turn>\\n" -}}
{%- set ns.prefix = "" -%}
{%- endif -%}
{%- if message.role == "assistant" -%}
{{- "<start_of_turn>model\\n" -}}
{%- if message.tool_calls -%}
{%- for call in message.tool_calls -%}
{{- '<tool_call>{"name": "' + call.function.name + '", "arguments": ' -}}
{%- if call.function.arguments is string -%}{{- call.function.arguments -}}
{%- else -%}{{- call.function.arguments | tojson -}}{%- endif -%}
{{- "}</tool_call>" -}}
{%- endfor -%}
{%- elif message.content is string -%}{{- message.content | trim -}}
{%- endif -%}
{{- "<end_of_turn>\\n" -}}
{%- elif message.role == "tool" -%}
{{- "<start_of_turn>user\\n<tool_response>\\n" + message.content + "\\n</tool_response><end_of_turn>\\n" -}}
{%- else -%}
{{- "<start_of_turn>user\\n" -}}
{%- if ns.first -%}{{- ns.prefix -}}{%- endif -%}
{%- if message.content is string -%}{{- message.content | trim -}}{%- endif -%}
{{- "<end_of_turn>\\n" -}}
{%- endif -%}
{%- set ns.first = false -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- "<start_of_turn>model\\n" -}}{%- endif -%}
"""


def binary() -> Path:
    """Return the llama-server to run: the venv's (``make install``), else the first on the PATH, else the venv's."""
    if BINARY.exists():
        return BINARY
    found = shutil.which(BINARY.name)
    return Path(found) if found else BINARY


def missing() -> str | None:
    """Why there is no llama-server to run; None when there is."""
    path = binary()
    if not path.resolve().is_file():
        return f"{path} is missing: run 'make install' (it builds llama.cpp's llama-server once) or put one on the PATH"
    if not os.access(path, os.X_OK):
        return f"{path} is not executable"
    return None


def write_chat_template(models_dir: Path) -> Path:
    """Write the chat template next to the model (rewritten at every start, so an update takes effect)."""
    path = models_dir / CHAT_TEMPLATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(CHAT_TEMPLATE, encoding="utf-8")
    return path


def command(
    model: Path, alias: str, host: str, port: int, parallel: int, chat_template: Path, threads: int | None = None
) -> list[str]:
    """Return the ``llama-server`` command line: ``parallel`` slots batched continuously, metrics, the template.

    ``threads`` (None: one per core) serves both generation and prompt batches.
    """
    threads = threads or default_threads()
    return [
        str(binary()),
        "--model", str(model),
        "--alias", alias,
        "--host", host,
        "--port", str(port),
        "--ctx-size", str(CONTEXT_PER_SLOT * parallel),
        "--parallel", str(parallel),
        "--cont-batching",
        "--threads", str(threads),
        "--threads-batch", str(threads),
        "--metrics",
        "--jinja",
        "--chat-template-file", str(chat_template),
        "--no-webui",
    ]  # fmt: skip


def is_llama_server(cmdline: list[bytes]) -> bool:
    """Whether a process's ``/proc/<pid>/cmdline`` is a llama-server (pid checks of the supervisor)."""
    return bool(cmdline) and Path(cmdline[0].decode(errors="replace")).name == BINARY.name
