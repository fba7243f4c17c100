"""What an agent sends the model: pure functions of the config, the conversation and memory.

No I/O here, so every prompt can be tested (and read) without servers or a model.
Two styles: ``chat`` (system/user messages for instruction-tuned models) and
``transcript`` (the meeting as a plain transcript for a small base model to
continue, see ``transcript_prompt``).
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from heist_common.config import AgentConfig, SessionConfig
from heist_common.tools.registry import ToolMethod
from orchestrator.tools import markers

__all__ = [
    "NO_REPLY",
    "ConversationMessage",
    "chat_messages",
    "close_prefill",
    "last_full_sentence",
    "one_line",
    "parrots",
    "speaker_label",
    "system_prompt",
    "transcript_prompt",
    "transcript_tool_brief",
]

PARROT_SIMILARITY = 0.8
"""A transcript reply this similar to an earlier line is resampled."""
NO_REPLY = "(says nothing)"
"""A transcript turn whose every sample was empty: recorded as such rather than as an empty message."""
SABOTEUR_BRIEF = (
    " Secretly you are a mole working for the police: subtly steer the crew towards mistakes without ever revealing it."
)


@dataclass(frozen=True, slots=True)
class ConversationMessage:
    """One line of the shared conversation."""

    turn_id: int
    agent_name: str
    agent_role: str
    message: str


def speaker_label(agent_name: str) -> str:
    """How an agent appears in a transcript: ``safecracker`` -> ``Safecracker``."""
    return agent_name.replace("_", " ").title()


@functools.lru_cache(maxsize=4096)
def one_line(text: str, limit: int = 240) -> str:
    """Flatten a message to one transcript line, without tool markers or their results.

    A newline would end the speaker's turn, and a 270M model copies whatever
    bracket syntax or tool output it sees in the lines before (once a result is
    in the transcript, later turns tend to parrot it). So the
    transcript keeps only what was said; the full results stay in the audit.
    Cached: every turn re-renders the same recent lines.
    """
    flat = markers.SHOWN.sub("", " ".join(text.split()))
    flat = " ".join(flat.replace("[", " ").replace("]", " ").split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def parrots(reply: str, spoken: Sequence[str]) -> bool:
    """Whether a reply is empty or (nearly) a copy of a line already in the transcript."""
    said = one_line(reply).lower()
    return not said or any(
        difflib.SequenceMatcher(None, said, line.lower()).ratio() > PARROT_SIMILARITY for line in spoken
    )


def last_full_sentence(text: str) -> str:
    """Cut a reply that ran out of tokens back to its last complete sentence (if it has one)."""
    end = max(text.rfind(mark) for mark in ".!?")
    return text[: end + 1] if end > 0 else text


def close_prefill(prefill: str, continuation: str) -> str:
    """Join a prefilled marker opening and the model's continuation, closing the marker if the line ended first."""
    if not prefill:
        return continuation
    return (prefill + markers.close(continuation)).strip()


def _brief(agent: AgentConfig) -> str:
    return agent.system_prompt + (SABOTEUR_BRIEF if agent.is_saboteur else "")


def system_prompt(agent: AgentConfig, inline_methods: Sequence[ToolMethod]) -> str:
    """Build the chat system prompt; with ``inline_methods`` it also teaches the ``[TOOL:...]`` convention."""
    prompt = _brief(agent)
    if not inline_methods:
        return prompt
    lines = [f"- {method.tool}: {method.description}" for method in inline_methods]
    return (
        f"{prompt}\nTo use a tool, write {markers.written('<tool>', '<argument>')} in your reply, "
        f"for example {markers.written(inline_methods[0].tool, '...')}. Your tools:\n" + "\n".join(lines)
    )


def chat_messages(
    agent: AgentConfig,
    system: str,
    history: Sequence[ConversationMessage],
    memory: str,
    session: SessionConfig,
) -> list[dict[str, Any]]:
    """Build the chat request: system prompt (with the agent's notes), briefing, recent lines, the cue."""
    if memory:
        system = f"{system}\nYour notes from earlier turns:\n{memory}"
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": system},
        {"role": "user", "content": f"[briefing]: {session.objective}"},
    ]
    recent = history[-session.context_messages :] if session.context_messages else ()
    messages.extend({"role": "user", "content": f"[{m.agent_name}]: {m.message}"} for m in recent)
    messages.append({"role": "user", "content": f"Your turn, {agent.name} ({agent.role}). Reply briefly."})
    return messages


def transcript_tool_brief(agent_name: str, inline_methods: Sequence[ToolMethod]) -> str:
    """Build the transcript's tool brief: a description and an example line per tool ('' without tools).

    Small models imitate example lines far better than they follow instructions.
    """
    if not inline_methods:
        return ""
    speaker = speaker_label(agent_name)
    return (
        f"{speaker} uses tools by writing a marker, and the result appears in the transcript:\n"
        + "\n".join(f"{m.tool}: {m.description}" for m in inline_methods)
        + "\nFor example:\n"
        + "\n".join(f"{speaker}: {markers.written(m.tool, m.inline_example)}" for m in inline_methods)
    )


def transcript_prompt(
    agent: AgentConfig,
    session: SessionConfig,
    history: Sequence[ConversationMessage],
    memory: str,
    tool_brief: str,
) -> tuple[str, list[str]]:
    """Render the meeting so far as a plain transcript ending in "<Speaker>:", for a base model to continue.

    A base model has no notion of system prompts or turns; what it does well is
    continue a document. So the brief, the tool convention (``tool_brief``, ''
    when the agent has no tools this turn) and the recent conversation become
    one transcript, one line per speaker. Also returns the recent lines, to
    detect a reply that merely parrots one of them.
    """
    speaker = speaker_label(agent.name)
    parts = [
        "The following is the transcript of a heist crew's planning meeting. "
        f"{session.objective} Each crew member speaks in one or two short sentences.",
        f"About {speaker} ({agent.role}): {_brief(agent)}",
    ]
    if tool_brief:
        parts.append(tool_brief)
    notes = [note for line in memory.splitlines() if (note := one_line(line)) and not note.endswith(":")]
    if notes:
        parts.append(f"{speaker}'s notes from earlier turns:\n" + "\n".join(notes))
    recent = history[-session.context_messages :] if session.context_messages else ()
    spoken = [(m.agent_name, said) for m in recent if (said := one_line(m.message))]
    lines = [f"{speaker_label(name)}: {said}" for name, said in spoken]
    parts.append("Transcript:\n" + "\n".join([*lines, f"{speaker}:"]))
    return "\n\n".join(parts), [said for _, said in spoken]
