"""Bad input gets a StateError that says what was wrong, and leaves stored data as it was.

Each case here once escaped as a builtin exception (OverflowError, TypeError) or went through
to the store; the checks live in the manager's core, so one store shows them for all.
"""

from __future__ import annotations

import asyncio
import math
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
    ],
)
def test_a_bad_call_is_a_state_error_and_changes_nothing(call: Any, error: type[StateError]) -> None:
    with StateManager() as manager:
        agent_id = _agent(manager)
        manager.record_spend(agent_id, 1.0)
        before = (manager.get_agent_state(agent_id), manager.audit_count(), manager.stats())
        with pytest.raises(error) as info:
            call(manager, agent_id)
        assert len(str(info.value)) < 400
        assert (manager.get_agent_state(agent_id), manager.audit_count(), manager.stats()) == before


def test_totals_stay_finite_however_much_is_spent() -> None:
    with StateManager() as manager:
        agent_id = _agent(manager)
        for _ in range(3):
            manager.record_spend(agent_id, MAX_AMOUNT)
        state = manager.get_agent_state(agent_id)
        assert state is not None
        assert math.isfinite(state.budget_spent)
        assert math.isfinite(manager.stats().budget_spent)
        manager.set_status(agent_id, AgentStatus.STOPPED)
        assert manager.remove_agent_state(agent_id)


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

    asyncio.run(main())
