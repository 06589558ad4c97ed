"""Every example of the original crate's documentation, ported to Python, asserting what it shows."""

from __future__ import annotations

import logging
import threading

import pytest

from iron_runtime_state import (
    AgentId,
    AgentState,
    AgentStatus,
    AuditEvent,
    StateManager,
    StateTypeError,
)


def test_quick_start() -> None:
    manager = StateManager()
    agent_id = AgentId.generate()
    manager.save_agent_state(
        AgentState(agent_id=agent_id, status=AgentStatus.RUNNING, budget_spent=5.0, pii_detections=0)
    )
    state = manager.get_agent_state(agent_id.as_str())
    assert state is not None, "Agent state should exist"
    assert state.agent_id == agent_id
    assert state.status is AgentStatus.RUNNING


def test_type_safety() -> None:
    agent_id = AgentId.parse("agent_550e8400-e29b-41d4-a716-446655440000")
    state = AgentState(agent_id=agent_id, status=AgentStatus.RUNNING, budget_spent=0.0, pii_detections=0)
    assert state.agent_id.as_str() == "agent_550e8400-e29b-41d4-a716-446655440000"
    # The seed's "compile error: can't use raw strings" is a TypeError here (and a mypy error,
    # see test_typing.py).
    with pytest.raises(TypeError):
        AgentState(agent_id="invalid-format", status=AgentStatus.RUNNING)  # type: ignore[arg-type]


def test_in_memory_default() -> None:
    manager = StateManager()
    assert manager.url == "memory://"


def test_state_lifecycle() -> None:
    manager = StateManager()
    agent_id = AgentId.generate()
    # 1. Agent starts
    manager.save_agent_state(AgentState(agent_id, AgentStatus.RUNNING, 0.0, 0))
    # 2. Agent executes (update metrics)
    state = manager.get_agent_state(agent_id.as_str())
    if state is not None:
        state.budget_spent += 2.5
        state.pii_detections += 1
        manager.save_agent_state(state)
    # 3. Agent stops
    state = manager.get_agent_state(agent_id.as_str())
    if state is not None:
        state.status = AgentStatus.STOPPED
        manager.save_agent_state(state)
    final = manager.get_agent_state(agent_id)
    assert final == AgentState(agent_id, AgentStatus.STOPPED, 2.5, 1)


def test_listing_agents() -> None:
    manager = StateManager()
    for _ in range(3):
        manager.save_agent_state(AgentState(AgentId.generate(), AgentStatus.RUNNING, 0.0, 0))
    agent_ids = manager.list_agents()
    assert len(agent_ids) == 3


def test_audit_logging(caplog: pytest.LogCaptureFixture) -> None:
    manager = StateManager()
    agent_id = AgentId.generate()
    with caplog.at_level(logging.DEBUG, logger="iron_runtime_state.audit"):
        manager.save_audit_log(
            AuditEvent(
                agent_id=agent_id,
                event_type="pii_detected",
                timestamp=1234567890,
                details="Email address found in output",
            )
        )
        manager.save_audit_log(
            AuditEvent(
                agent_id=agent_id,
                event_type="budget_exceeded",
                timestamp=1234567900,
                details="Budget limit $10 exceeded",
            )
        )
    # The seed only logged at DEBUG; here the events are also stored.
    messages = [r.getMessage() for r in caplog.records]
    assert any("pii_detected" in m for m in messages)
    assert any("budget_exceeded" in m for m in messages)
    assert [r.event.event_type for r in manager.audit_log()] == ["pii_detected", "budget_exceeded"]


def test_thread_safety() -> None:
    manager = StateManager()
    agent_id = AgentId.generate()
    manager.save_agent_state(AgentState(agent_id, AgentStatus.RUNNING, 0.0, 0))

    def work(i: int) -> None:
        # The seed's read-then-save can lose updates under contention; the atomic
        # update_agent_state (beyond the seed) cannot.
        manager.update_agent_state(agent_id, lambda s: _add(s, float(i)))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    state = manager.get_agent_state(agent_id)
    assert state is not None
    assert state.budget_spent == sum(range(10))


def _add(state: AgentState, amount: float) -> AgentState:
    state.budget_spent += amount
    return state


def test_remove_stopped_agents_periodically() -> None:
    # The seed's TODO: remove_agent_state now exists.
    manager = StateManager()
    keep = AgentId.generate()
    manager.save_agent_state(AgentState(keep, AgentStatus.RUNNING))
    for _ in range(3):
        manager.save_agent_state(AgentState(AgentId.generate(), AgentStatus.STOPPED))
    for agent_id in manager.list_agents():
        state = manager.get_agent_state(agent_id)
        if state is not None and state.status is AgentStatus.STOPPED:
            assert manager.remove_agent_state(agent_id)
    assert manager.list_agents() == [keep.as_str()]


def test_error_handling_infallible_in_memory() -> None:
    manager = StateManager()
    assert manager.get_agent_state(AgentId.generate()) is None
    assert manager.list_agents() == []
    with pytest.raises(StateTypeError):
        manager.save_agent_state("not a state")  # type: ignore[arg-type]


def test_monitoring() -> None:
    manager = StateManager()
    for status in [AgentStatus.RUNNING] * 3 + [AgentStatus.STOPPED] * 2 + [AgentStatus.FAILED]:
        manager.save_agent_state(AgentState(AgentId.generate(), status))
    total_agents = len(manager.list_agents())
    running = stopped = 0
    for agent_id in manager.list_agents():
        state = manager.get_agent_state(agent_id)
        if state is not None:
            if state.status is AgentStatus.RUNNING:
                running += 1
            elif state.status is AgentStatus.STOPPED:
                stopped += 1
    assert (total_agents, running, stopped) == (6, 3, 2)
    # The same figures without reading every agent:
    stats = manager.stats()
    assert (stats.total, stats.running, stats.stopped, stats.failed) == (6, 3, 2, 1)


def test_migration_from_v0_2() -> None:
    state = AgentState(
        agent_id=AgentId.parse("agent_550e8400-e29b-41d4-a716-446655440000"),
        status=AgentStatus.RUNNING,
        budget_spent=0.0,
        pii_detections=0,
    )
    assert state.agent_id.as_str() == "agent_550e8400-e29b-41d4-a716-446655440000"
