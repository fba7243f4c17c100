"""Text from the model or a caller, made safe for what a session leaves behind: files, and the terminal.

The model writes whatever it likes, including bytes a viewer obeys instead of
showing: ESC starts a terminal escape sequence, BEL rings, NUL truncates in
many tools, and XML (an HTML page saved as XHTML, an SVG) forbids most of them.
"""

from __future__ import annotations

import re

__all__ = ["CONTROL_CHARACTERS", "markdown_text", "strip_controls"]

CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
"""C0 control characters except tab and newline, DEL, and the C1 control characters."""

_MARKDOWN_INLINE = re.compile(r"[\\`*\[\]|~]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")
"""Characters that make emphasis, code, links and images, tables and strikethrough wherever they stand.

``_`` inside a word (``file_reader``) emphasises nothing and is left as it is.
"""
_MARKDOWN_LINE_START = re.compile(r"^([ \t]*(?:\d+(?=[.)]))?)([#+=.)-])", re.MULTILINE)
"""What makes a heading, a list item (``-``, ``+``, ``1.``, ``1)``) or a setext underline at the start of a line."""
_AUTOLINK = re.compile(r"(?i)\b(https?|ftp|www)([:.])")
"""Where GitHub's Markdown turns a bare address (``http://``, ``www.``) into a link.

(It links a bare e-mail address too, whatever is escaped: a ``mailto:`` link
that shows its own address, nothing hidden.)
"""


def strip_controls(text: str) -> str:
    """Drop the control characters a viewer would obey (``CONTROL_CHARACTERS``); tab and newline stay."""
    return CONTROL_CHARACTERS.sub("", text)


def markdown_text(text: str, *, inline: bool = False) -> str:
    """Return ``text`` as Markdown that renders it literally: no HTML, link, image, emphasis or heading of its own.

    ``&``, ``<`` and ``>`` become character references (what every Markdown
    dialect shows as the character, and no renderer takes for a tag); the
    rest of Markdown's syntax is backslash-escaped, and so is the character that
    makes a bare web address a link. Line breaks stay line breaks.

    ``inline=True``: for a fragment in the middle of a line (a table cell, a
    heading's end), where nothing can start a block; newlines become spaces.
    """
    if inline:
        text = text.replace("\n", " ")
    text = strip_controls(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    text = _MARKDOWN_INLINE.sub(lambda match: "\\" + match.group(), text)
    text = _AUTOLINK.sub(r"\1\\\2", text)
    if inline:
        return text
    text = _MARKDOWN_LINE_START.sub(r"\1\\\2", text)
    # A single newline inside a paragraph is a soft break that renderers join; two spaces keep it a line break.
    return re.sub(r"(?<=\S)\n(?=[^\n])", "  \n", text)
