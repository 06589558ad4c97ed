"""Bad input gets a StateError that says what was wrong, and leaves stored data as it was.

Each case here once escaped as a builtin exception (OverflowError, TypeError) or went through
to the store; the checks live in the manager's core, so one store shows them for all.
"""

from __future__ import annotations

import asyncio
import math
from decimal import Decimal
from typing import Any

import pytest

from iron_runtime_state import (
    AgentId,
    AgentState,
    AgentStatus,
    AsyncStateManager,
    Reservation,
    StateError,
    StateManager,
    StateTypeError,
    ValidationError,
)
from iron_runtime_state.models import MAX_AMOUNT, MAX_TTL


def _agent(manager: StateManager, limit: float | None = None) -> AgentId:
    agent_id = AgentId.generate()
    manager.save_agent_state(AgentState(agent_id, AgentStatus.RUNNING, budget_limit=limit))
    return agent_id


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda m, a: m.audit_log(since=1e19), ValidationError),
        (lambda m, a: m.audit_log(until=10**30), ValidationError),
        (lambda m, a: m.prune_audit_log(before=1e300), ValidationError),
        (lambda m, a: m.purge_agents(older_than=1, status=5), StateTypeError),
        (lambda m, a: m.record_spend(a, 1e308), ValidationError),
        (lambda m, a: m.record_spend(a, 10**400), ValidationError),
        (lambda m, a: m.record_spend(a, MAX_AMOUNT * 2), ValidationError),
        (lambda m, a: m.reserve_budget(a, 1.0, ttl=1e300), ValidationError),
        (lambda m, a: m.reserve_budget(a, 1.0, ttl=MAX_TTL + 1), ValidationError),
        (lambda m, a: m.reserve_budget(a, 1.0, ttl=math.inf), ValidationError),
        (lambda m, a: m.record_pii_detection(a, 2**63), ValidationError),
        (lambda m, a: m.commit_reservation(Reservation("x" * 100, a, 1.0, 1e9), 1.0), ValidationError),
        (lambda m, a: m.commit_reservation(Reservation("r1", "agent", 1.0, 1e9), 1.0), StateTypeError),  # type: ignore[arg-type]
        (lambda m, a: m.commit_reservation(Reservation("r1", a, math.nan, 1e9), 1.0), ValidationError),
        (lambda m, a: m.release_reservation(Reservation("r1", a, 1.0, math.inf)), ValidationError),
        (lambda m, a: m.commit_reservation(Reservation("r1", a, 1.0, 1e9), 1e300), ValidationError),
        # amounts: int, float, Decimal and numeric str, finite, >= one micro-unit, <= MAX_AMOUNT
        (lambda m, a: m.record_spend(a, MAX_AMOUNT + 1), ValidationError),
        (lambda m, a: m.reserve_budget(a, MAX_AMOUNT + 1), ValidationError),
        (lambda m, a: m.record_spend(a, "1e400"), ValidationError),
        (lambda m, a: m.record_spend(a, "9" * 5_000), ValidationError),
        (lambda m, a: m.record_spend(a, "0x10"), ValidationError),
        (lambda m, a: m.record_spend(a, "two"), ValidationError),
        (lambda m, a: m.record_spend(a, Decimal("sNaN")), ValidationError),
        (lambda m, a: m.record_spend(a, Decimal("-0.5")), ValidationError),
        (lambda m, a: m.record_spend(a, "0.0000004"), ValidationError),
        (lambda m, a: m.record_spend(a, b"1"), StateTypeError),
        (lambda m, a: m.record_spend(a, 1 + 0j), StateTypeError),
        (lambda m, a: m.reserve_budget(a, False), StateTypeError),
        # budget scopes
        (lambda m, a: m.set_budget("Team:Support", limit=1), ValidationError),
        (lambda m, a: m.set_budget("", limit=1), ValidationError),
        (lambda m, a: m.set_budget(":team", limit=1), ValidationError),
        (lambda m, a: m.set_budget("team support", limit=1), ValidationError),
        (lambda m, a: m.set_budget("t" * 129, limit=1), ValidationError),
        (lambda m, a: m.set_budget("x" * 10_000, limit=1), ValidationError),
        (lambda m, a: m.set_budget(5, limit=1), StateTypeError),
        (lambda m, a: m.set_budget(None, limit=1), StateTypeError),
        (lambda m, a: m.set_budget("team:a", limit=-1), ValidationError),
        (lambda m, a: m.set_budget("team:a", limit=math.nan), ValidationError),
        (lambda m, a: m.set_budget("team:a", limit=math.inf), ValidationError),
        (lambda m, a: m.set_budget("team:a", limit="lots"), ValidationError),
        (lambda m, a: m.set_budget("team:a", limit=MAX_AMOUNT * 2), ValidationError),
        (lambda m, a: m.set_budget("team:a", limit=True), StateTypeError),
        (lambda m, a: m.set_budget("team:a", limit=[1]), StateTypeError),
        (lambda m, a: m.set_budget("team:a", limit=1, period="year"), ValidationError),
        (lambda m, a: m.set_budget("team:a", limit=1, period="Day"), ValidationError),
        (lambda m, a: m.set_budget("team:a", limit=1, period=7), StateTypeError),
        (lambda m, a: m.set_budget("team:a", limit=1, period="day", tz="Mars/Olympus"), ValidationError),
        (lambda m, a: m.set_budget("team:a", limit=1, period="day", tz="../../etc/passwd"), ValidationError),
        (lambda m, a: m.set_budget("team:a", limit=1, tz=None), StateTypeError),
        (lambda m, a: m.remove_budget("Team X"), ValidationError),
        (lambda m, a: m.remove_budget(None), StateTypeError),
        # label filters
        (lambda m, a: list(m.iter_agent_states(labels={"team": 5})), StateTypeError),
        (lambda m, a: list(m.iter_agent_states(labels={"Team": "a"})), ValidationError),
        (lambda m, a: list(m.iter_agent_states(labels="team=a")), StateTypeError),
    ],
)
def test_a_bad_call_is_a_state_error_and_changes_nothing(call: Any, error: type[StateError]) -> None:
    with StateManager() as manager:
        agent_id = _agent(manager)
        manager.record_spend(agent_id, 1.0)
        manager.set_budget("team:a", limit=5, period="week")

        def snapshot() -> tuple[object, ...]:
            return (
                manager.get_agent_state(agent_id),
                manager.audit_count(),
                manager.stats(),
                manager.list_budgets(),
            )

        before = snapshot()
        with pytest.raises(error) as info:
            call(manager, agent_id)
        assert len(str(info.value)) < 400
        assert snapshot() == before


def test_a_total_past_the_largest_amount_changes_nothing() -> None:
    with StateManager() as manager:
        agent_id = _agent(manager)
        manager.record_spend(agent_id, MAX_AMOUNT)
        events = manager.audit_count()
        for amount in (MAX_AMOUNT, 0.000001):
            with pytest.raises(ValidationError, match="largest amount"):
                manager.record_spend(agent_id, amount)
            with pytest.raises(ValidationError):
                manager.reserve_budget(agent_id, amount)
        state = manager.get_agent_state(agent_id)
        assert state is not None
        assert state.budget_spent == MAX_AMOUNT
        assert manager.stats().budget_spent == MAX_AMOUNT
        assert manager.audit_count() == events
        manager.set_status(agent_id, AgentStatus.STOPPED)
        assert manager.remove_agent_state(agent_id)


@pytest.mark.parametrize("spent", [MAX_AMOUNT * 1.5, 1e300, -0.000001])
def test_a_state_past_the_largest_amount_is_never_saved(spent: float) -> None:
    with StateManager() as manager:
        with pytest.raises(ValidationError):
            manager.save_agent_state(AgentState(AgentId.generate(), AgentStatus.RUNNING, spent))
        with pytest.raises(ValidationError):
            AgentState(AgentId.generate(), AgentStatus.RUNNING, budget_limit=spent)
        assert manager.list_agents() == []


@pytest.mark.parametrize("clock", [5, "now", 1.5])
def test_a_clock_must_be_callable(clock: object) -> None:
    with pytest.raises(StateTypeError, match="clock"):
        StateManager(clock=clock)  # type: ignore[arg-type]
    with pytest.raises(StateTypeError, match="clock"):
        AsyncStateManager(clock=clock)  # type: ignore[arg-type]
    with pytest.raises(StateTypeError, match="clock"):
        StateManager.from_url("memory://", clock=clock)  # type: ignore[arg-type]


def test_a_pii_count_that_would_pass_the_largest_count_changes_nothing() -> None:
    with StateManager() as manager:
        agent_id = AgentId.generate()
        manager.save_agent_state(AgentState(agent_id, AgentStatus.RUNNING, pii_detections=2**63 - 2))
        events = manager.audit_count()
        with pytest.raises(ValidationError):
            manager.record_pii_detection(agent_id, 5)
        state = manager.get_agent_state(agent_id)
        assert state is not None
        assert state.pii_detections == 2**63 - 2
        assert manager.audit_count() == events


def test_the_async_manager_refuses_the_same_input() -> None:
    async def main() -> None:
        async with AsyncStateManager() as manager:
            agent_id = AgentId.generate()
            await manager.save_agent_state(AgentState(agent_id, AgentStatus.RUNNING))
            with pytest.raises(ValidationError):
                await manager.audit_log(since=1e19)
            with pytest.raises(ValidationError):
                await manager.reserve_budget(agent_id, 1.0, ttl=1e300)
            with pytest.raises(StateTypeError):
                await manager.purge_agents(older_than=1, status=5)  # type: ignore[arg-type]
            with pytest.raises(ValidationError):
                await manager.set_budget("Team X", limit=1)
            with pytest.raises(ValidationError):
                await manager.record_spend(agent_id, "lots")
            with pytest.raises(StateTypeError):
                await manager.record_spend(agent_id, True)  # a bool is not an amount
            assert await manager.list_budgets() == []

    asyncio.run(main())
