"""A model's words land in the session's files as words: never markup, links, images or control bytes."""

from __future__ import annotations

import json
import re
from pathlib import Path

from orchestrator.output.text import markdown_text, strip_controls
from orchestrator.session.runner import RunOptions, run_session
from tests.support.inprocess import InProcessMesh
from tests.support.scripted_llm import ScriptedLLM, text

HOSTILE = "<img src=x onerror=alert(1)> ![x](http://e/x.png) [click](javascript:alert(1)) \x00\x1b[31m\x07red"
PLAIN = "It's the vault's `SELECT 1` moment.\nSecond line: 2 < 3 & *done*."
CONTROL_BYTES = ("\x00", "\x1b", "\x07", "\x7f", "\x9b")


async def test_model_text_is_inert_in_the_markdown_and_the_report(
    mesh: InProcessMesh, scripted_llm: ScriptedLLM, tmp_path: Path
) -> None:
    scripted_llm.script(text(HOSTILE), text(PLAIN))
    out = tmp_path / "out"
    result = await run_session(mesh.config, RunOptions(session_id="heist_escape_1", turns=2, export_dir=out))
    assert result.exit_code == 0, result.error
    markdown = (out / "heist_escape_1.md").read_text(encoding="utf-8")
    report = (out / "heist_escape_1.html").read_text(encoding="utf-8")

    assert "<img" not in markdown and "<http" not in markdown
    assert not re.search(r"(?<!\\)\]\(", markdown), "a link or an image: ](...) without its backslash"
    for byte in CONTROL_BYTES:
        assert byte not in markdown and byte not in report
    assert "<img" not in report
    # What the model said is still there to read, literally.
    assert "&lt;img src=x onerror=alert(1)&gt; !\\[x\\](http\\://e/x.png)" in markdown
    assert "[31mred" in report
    # Ordinary text reads as before: apostrophes, code, its line break.
    assert "It's the vault's \\`SELECT 1\\` moment.  \nSecond line: 2 &lt; 3 &amp; \\*done\\*." in markdown
    assert "It&#x27;s the vault&#x27;s `SELECT 1` moment.\nSecond line: 2 &lt; 3 &amp; *done*." in report
    # The JSON export is data: it keeps the text exactly (JSON escapes control characters itself).
    exported = json.loads((out / "heist_escape_1.json").read_text(encoding="utf-8"))
    assert exported["messages"][0]["message"].endswith("\x00\x1b[31m\x07red")


def test_stripping_keeps_tab_and_newline_and_drops_every_other_control() -> None:
    controls = "".join(map(chr, [*range(0x20), 0x7F, *range(0x80, 0xA0)]))
    assert strip_controls(f"a{controls}b") == "a\t\nb"
    assert strip_controls("naïve café — ok") == "naïve café — ok"


def test_markdown_escaping_covers_block_syntax_at_the_start_of_a_line() -> None:
    escaped = markdown_text("# title\n1. one\n- item\n> quote\n---\n| a | b |")
    assert escaped.splitlines() == [
        "\\# title  ",
        "1\\. one  ",
        "\\- item  ",
        "&gt; quote  ",
        "\\---  ",
        "\\| a \\| b \\|",
    ]
