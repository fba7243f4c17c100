from __future__ import annotations

import itertools

import pytest

from orchestrator.session.schedule import turn_schedule

CREW = ("planner", "hacker", "safecracker", "mole")


def test_round_robin_repeats_turn_order() -> None:
    assert turn_schedule("round_robin", CREW, 6) == ["planner", "hacker", "safecracker", "mole", "planner", "hacker"]


def test_random_planner_opens_and_never_repeats() -> None:
    schedule = turn_schedule("random", CREW, 200, seed=7)
    assert schedule[0] == "planner"
    assert all(a != b for a, b in itertools.pairwise(schedule))
    assert set(schedule) == set(CREW)


def test_random_is_reproducible_with_seed() -> None:
    assert turn_schedule("random", CREW, 30, seed=3) == turn_schedule("random", CREW, 30, seed=3)
    assert turn_schedule("random", CREW, 30, seed=3) != turn_schedule("random", CREW, 30, seed=4)


def test_random_without_planner_starts_with_first_agent() -> None:
    assert turn_schedule("random", ("a", "b"), 4, seed=1) == ["a", "b", "a", "b"]


def test_unknown_strategy_rejected() -> None:
    with pytest.raises(ValueError, match="unknown turn strategy"):
        turn_schedule("chaos", CREW, 3)
