"""A hold that lapses unsettled is written to the trail once, as ``hold_expired``, by the next
write on its agent; a read never writes it, and a settled hold never produces one."""

from __future__ import annotations

import json
import time

from iron_runtime_state import AgentId, AgentState, AgentStatus, StateManager

from .stores import StoreHandle


def _expired(manager: StateManager) -> list[dict[str, object]]:
    return [json.loads(r.details) for r in manager.audit_log(event_type="hold_expired")]


def test_a_lapsed_hold_is_written_once_by_the_next_write(store: StoreHandle, manager: StateManager) -> None:
    manager.set_budget("team:a", limit=100)
    agent = AgentId.generate()
    manager.save_agent_state(
        AgentState(agent, AgentStatus.RUNNING, budget_limit=10.0, budget_scopes=("team:a",))
    )
    lapsed = manager.reserve_budget(agent, 4.0, ttl=0.5)
    settled = manager.commit_reservation(manager.reserve_budget(agent, 1.0), 1.0)
    released = manager.reserve_budget(agent, 1.0)
    manager.release_reservation(released)
    time.sleep(1.2)
    assert manager.budget_available(agent) == 9.0  # no longer counted ...
    assert manager.get_budget("team:a").held == 0.0  # type: ignore[union-attr]
    assert _expired(manager) == []  # ... but reads write nothing
    manager.record_spend(agent, 1.0)
    manager.record_spend(agent, 1.0)
    (event,) = _expired(manager)
    assert event["reservation"] == lapsed.reservation_id
    assert event["amount"] == 4.0
    assert event["scopes"] == ["team:a"]
    assert abs(float(str(event["expires_at"])) - lapsed.expires_at) < 2  # the store's clock
    assert settled.budget_spent == 1.0
    (record,) = manager.audit_log(event_type="hold_expired")
    assert record.agent_id == agent
    assert manager.verify_audit_log().ok
