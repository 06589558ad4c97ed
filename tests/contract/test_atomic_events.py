"""A state change and the audit events it implies are one write, on every store.

The store appends the event in the same atomic step as the change (a transaction, a lock, a
script, or, on Redis, a script that queues the event in an outbox beside the change, which the
next drain appends), so no crash can leave one without the other. The tests drive the store
contract (``manager.backend``) with a chain that cannot seal: the failure a crash between two
writes would leave behind. Then either nothing changed (a transaction rolled back) or the change
stands with its event queued, and the next drain appends it: either way, once read, the state
and the trail agree. With a working chain, the records the step returns are the ones stored.
"""

from __future__ import annotations

import json
import time

import pytest

from iron_runtime_state import (
    AgentId,
    AgentState,
    AgentStatus,
    AuditRecord,
    BudgetExceeded,
    Reservation,
    StateManager,
    ValidationError,
    events,
)
from iron_runtime_state.audit_chain import AuditChain
from iron_runtime_state.backends import AuditQuery, SpendResult


class BrokenChain(AuditChain):
    """A chain that fails to seal any record."""

    def seal(
        self, prev_hash: str, seq: int, agent_id: str, event_type: str, timestamp: int, details: str
    ) -> str:
        raise RuntimeError("the seal failed")


def stored(manager: StateManager, event_type: str) -> list[AuditRecord]:
    return list(manager.backend.query_audit(AuditQuery(event_type=event_type)))


def state_of(manager: StateManager, agent: AgentId) -> AgentState:
    state = manager.get_agent_state(agent)
    assert state is not None
    return state


def test_a_pii_count_and_its_event_are_one_write(manager: StateManager, agent: AgentId) -> None:
    backend, now = manager.backend, time.time()
    event = events.pii_detected(agent, 2, "email", now)
    change = backend.record_pii(agent, 2, now, event, AuditChain())
    assert change.state.pii_detections == 2
    assert [r.event for r in change.records] == [event]
    assert change.records == stored(manager, "pii_detected")
    with pytest.raises(RuntimeError, match="seal"):
        backend.record_pii(agent, 3, now, events.pii_detected(agent, 3, "", now), BrokenChain())
    counts = [json.loads(r.event.details)["count"] for r in stored(manager, "pii_detected")]
    assert counts in ([2], [2, 3])  # rolled back, or queued and appended by the next drain
    assert state_of(manager, agent).pii_detections == sum(counts)
    assert manager.stats().pii_detections == sum(counts)
    assert manager.audit_count() == len(counts)


def test_a_status_change_and_its_event_are_one_write(manager: StateManager, agent: AgentId) -> None:
    backend, now = manager.backend, time.time()
    change = backend.set_status(agent, AgentStatus.STOPPED, now, AuditChain())
    assert change.state.status is AgentStatus.STOPPED
    (record,) = change.records
    assert record == stored(manager, "status_changed")[0]
    assert json.loads(record.event.details) == {"from": "running", "to": "stopped"}
    same = backend.set_status(agent, AgentStatus.STOPPED, now, BrokenChain())  # no change: no event
    assert (same.state.status, same.records) == (AgentStatus.STOPPED, [])
    with pytest.raises(RuntimeError, match="seal"):
        backend.set_status(agent, AgentStatus.FAILED, now, BrokenChain())
    moves = [json.loads(r.event.details)["to"] for r in stored(manager, "status_changed")]
    assert moves in (["stopped"], ["stopped", "failed"])  # rolled back, or queued and appended
    assert state_of(manager, agent).status.value == moves[-1]
    assert (manager.stats().stopped, manager.stats().failed) == ((1, 0) if len(moves) == 1 else (0, 1))
    assert manager.audit_count() == len(moves)


@pytest.mark.parametrize("action", ["spend", "reserve"])
def test_a_refusal_appends_its_event_in_the_same_step(
    manager: StateManager, agent: AgentId, action: str
) -> None:
    backend, now = manager.backend, time.time()
    backend.record_spend(agent, 9_000_000, now, AuditChain())  # micro-units
    result: SpendResult | Reservation
    if action == "spend":
        result = backend.record_spend(agent, 2_000_000, now, AuditChain())
    else:
        result = backend.reserve(agent, 2_000_000, 60.0, now, "r" * 32, AuditChain())
    assert isinstance(result, SpendResult)
    assert result.exceeded
    assert result.state.budget_spent == 9.0
    (record,) = result.records
    assert record == stored(manager, "budget_exceeded")[0]
    details = json.loads(record.event.details)
    assert (details["action"], details["spent"], details["requested"]) == (action, 9.0, 2.0)
    with pytest.raises(RuntimeError, match="seal"):
        backend.record_spend(agent, 2_000_000, now, BrokenChain())
    # its event rolled back, or queued and appended
    assert len(stored(manager, "budget_exceeded")) in (1, 2)
    assert manager.budget_available(agent) == 1.0


def test_a_refusal_through_the_manager_is_audited_once(manager: StateManager, agent: AgentId) -> None:
    manager.record_spend(agent, 9.0)
    with pytest.raises(BudgetExceeded):
        manager.record_spend(agent, 2.0)
    with pytest.raises(BudgetExceeded):
        manager.reserve_budget(agent, 2.0)
    actions = [json.loads(r.event.details)["action"] for r in manager.audit_log(event_type="budget_exceeded")]
    assert actions == ["spend", "reserve"]


def test_an_overspending_commit_and_its_event_are_one_write(manager: StateManager, agent: AgentId) -> None:
    backend = manager.backend
    hold = manager.reserve_budget(agent, 5.0)
    with pytest.raises(RuntimeError, match="seal"):
        backend.commit(hold, 12_000_000, time.time(), BrokenChain())
    if stored(manager, "spend"):  # the commit stands, its events queued and appended since
        assert state_of(manager, agent).budget_spent == 12.0
        (record,) = stored(manager, "budget_exceeded")
    else:  # rolled back: nothing was spent, the hold is still open
        assert state_of(manager, agent).budget_spent == 0.0
        result = backend.commit(hold, 12_000_000, time.time(), AuditChain())
        assert (result.exceeded, result.state.budget_spent) == (True, 12.0)
        (record,) = [r for r in result.records if r.event.event_type == "budget_exceeded"]
        assert record == stored(manager, "budget_exceeded")[0]
    details = json.loads(record.event.details)
    assert (details["committed"], details["spent"], details["reservation"]) == (
        12.0,
        12.0,
        hold.reservation_id,
    )


def test_a_pii_count_past_2_63_is_refused_and_changes_nothing(manager: StateManager, agent: AgentId) -> None:
    manager.record_pii_detection(agent, 2**63 - 2)
    with pytest.raises(ValidationError, match="2\\*\\*63"):
        manager.record_pii_detection(agent, 2)
    assert state_of(manager, agent).pii_detections == 2**63 - 2
    assert manager.stats().pii_detections == 2**63 - 2
    assert len(manager.audit_log(event_type="pii_detected")) == 1
    assert manager.record_pii_detection(agent, 1).pii_detections == 2**63 - 1
