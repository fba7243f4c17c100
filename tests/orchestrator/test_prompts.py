"""Prompts are pure functions: checked here without a server, a model or an event loop."""

from __future__ import annotations

from heist_common.config import AgentConfig, SessionConfig
from heist_common.tools.registry import ToolRegistry
from orchestrator.turn import prompts
from orchestrator.turn.prompts import ConversationMessage
from tests.support.config import TOOLS

AGENT = AgentConfig(name="safecracker", role="Safecracker", system_prompt="You do the numbers.", tools=(TOOLS[0],))
MOLE = AgentConfig(name="mole", role="Inside Man", system_prompt="You work inside.", is_saboteur=True)
SESSION = SessionConfig(context_messages=2, objective="Plan the job.")
HISTORY = [
    ConversationMessage(1, "planner", "Mastermind", "We go on Friday."),
    ConversationMessage(2, "hacker", "Hacker", "Cameras loop\nat 02:10. [file_reader: x.md -> secret text]"),
    ConversationMessage(3, "mole", "Inside Man", "Guards change at ten."),
]


def inline_methods() -> tuple[object, ...]:
    registry = ToolRegistry.for_services(TOOLS)
    return tuple(m for tool in AGENT.tools if (m := registry.service(tool).inline_method) is not None)


def test_transcript_has_brief_tools_notes_and_only_recent_lines_without_tool_output() -> None:
    brief = prompts.transcript_tool_brief(AGENT.name, inline_methods())  # type: ignore[arg-type]
    prompt, spoken = prompts.transcript_prompt(AGENT, SESSION, HISTORY, "Turn 1: vault is steel\n", brief)
    assert prompt.startswith("The following is the transcript of a heist crew's planning meeting. Plan the job.")
    assert "About Safecracker (Safecracker): You do the numbers." in prompt
    assert f"Safecracker: [TOOL:{TOOLS[0]}:" in prompt  # an example line for the tool
    assert "Safecracker's notes from earlier turns:\nTurn 1: vault is steel" in prompt
    assert prompt.endswith("Transcript:\nHacker: Cameras loop at 02:10.\nMole: Guards change at ten.\nSafecracker:")
    assert "secret text" not in prompt and "Friday" not in prompt  # tool output dropped, only 2 recent lines
    assert spoken == ["Cameras loop at 02:10.", "Guards change at ten."]


def test_without_tools_this_turn_the_transcript_has_no_tool_brief() -> None:
    prompt, _ = prompts.transcript_prompt(AGENT, SESSION, HISTORY, "", "")
    assert "[TOOL:" not in prompt and "notes from earlier turns" not in prompt


def test_chat_messages_and_the_saboteur_brief() -> None:
    system = prompts.system_prompt(MOLE, ())
    assert system.startswith("You work inside. Secretly you are a mole")
    messages = prompts.chat_messages(MOLE, system, HISTORY, "note", SESSION)
    assert [m["role"] for m in messages] == ["system", "user", "user", "user", "user"]
    assert messages[0]["content"].endswith("Your notes from earlier turns:\nnote")
    assert messages[-1]["content"] == "Your turn, mole (Inside Man). Reply briefly."


def test_reply_shaping() -> None:
    assert prompts.parrots("we go on friday.", ["We go on Friday."])
    assert not prompts.parrots("The vault opens at six.", ["We go on Friday."])
    assert prompts.parrots("   ", [])
    assert prompts.last_full_sentence("We go. Then we") == "We go."
    assert prompts.close_prefill(" [TOOL:x:", "1+1") == "[TOOL:x:1+1]"
    assert prompts.close_prefill("", "plain") == "plain"
