"""The ``degraded`` rule (``orchestrator.session.runner.unusable_services``) on hand-made turns."""

from __future__ import annotations

from heist_common.audit import EventRow
from orchestrator.session.runner import UnusableService, unusable_services
from orchestrator.tracing import Step
from orchestrator.turn.turn import Turn

ORDER = ("oauth", "memory", "calculator", "file_reader")


def turn(turn_id: int, *steps: tuple[str, str, str], events: tuple[EventRow, ...] = ()) -> Turn:
    """A turn whose timeline holds ``(kind, name, code)`` steps."""
    made = Turn(turn_id, "safecracker", "Safecracker")
    made.steps.extend(Step(kind, name, 0.0, 1.0, code) for kind, name, code in steps)
    made.events.extend(events)
    return made


def test_a_service_that_answered_once_is_usable() -> None:
    turns = [
        turn(1, ("memory", "memory.GetCompressedMemory", "UNAVAILABLE"), ("tool", "calculator.Evaluate", "OK")),
        turn(2, ("memory", "memory.StoreMemory", "OK"), ("llm", "completions", "HTTP 500")),
    ]
    assert unusable_services(turns, ORDER) == []


def test_request_errors_show_a_working_service() -> None:
    steps = (("tool", "file_reader.ReadFile", "NOT_FOUND"), ("tool", "calculator.Evaluate", "INVALID_ARGUMENT"))
    turns = [turn(1, *steps)]
    assert unusable_services(turns, ORDER) == []


def test_the_cause_is_the_first_failure_not_the_breakers_skips() -> None:
    down = EventRow("memory", "StoreMemory", "UNAVAILABLE", "connection refused", 1.0, 1)
    skipped = EventRow("memory", "GetCompressedMemory", "CIRCUIT_OPEN", "circuit open", 0.0, 2)
    turns = [
        turn(1, ("memory", "memory.GetCompressedMemory", "CIRCUIT_OPEN")),
        turn(2, ("memory", "memory.StoreMemory", "UNAVAILABLE"), events=(down,)),
        turn(3, ("memory", "memory.StoreMemory", "CIRCUIT_OPEN"), ("token", "token (cached)", "OK"), events=(skipped,)),
    ]
    assert unusable_services(turns, ORDER) == [UnusableService("memory", 3, "UNAVAILABLE", "connection refused")]
    assert unusable_services(turns)[0].describe() == "memory: 0 of 3 calls succeeded (UNAVAILABLE: connection refused)"


def test_services_are_reported_in_the_configs_order_and_causes_are_cut() -> None:
    long = EventRow("oauth", "IssueToken", "RESOURCE_EXHAUSTED", "x" * 1000, 1.0, 1)
    turns = [
        turn(1, ("tool", "calculator.Evaluate", "NO_TOKEN"), ("token", "oauth.IssueToken", "RESOURCE_EXHAUSTED"),
             events=(long,)),
    ]  # fmt: skip
    found = unusable_services(turns, ORDER)
    assert [service.service for service in found] == ["oauth", "calculator"]
    assert len(found[0].describe()) < 300 and found[0].describe().endswith("...)")
    assert found[1].describe() == "calculator: 0 of 1 calls succeeded (NO_TOKEN)"
