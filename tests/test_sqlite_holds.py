"""Holds that lapse unsettled in the SQLite store: each is written once, as ``hold_expired``.

The rule is in tests/contract/test_hold_expired.py (run on SQLite too). Here: every path that
can find a lapsed hold writes its event (the one-statement spend and hold give way to the
transaction, a commit settles the lapsed holds with its own, a refusal keeps the drop), reads
and failed settlements leave the hold rows untouched, the path for SQLite without RETURNING does
the same, and threads racing to find one lapsed hold write it once.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from iron_runtime_state import (
    AgentId,
    AgentState,
    AgentStatus,
    BudgetExceeded,
    Reservation,
    ReservationError,
    StateManager,
)
from iron_runtime_state.backends.sqlite import SQLiteBackend, spending, store

from .sqlite_support import raw

#: Long enough to make the holds of a test, short enough to wait for.
TTL = 0.3


@pytest.fixture(params=["returning", "no returning"])
def manager(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[StateManager]:
    if request.param == "no returning":  # SQLite before 3.35: a SELECT, then the DELETEs
        monkeypatch.setattr(store, "_SPEND_IN_ONE_STATEMENT", False)
        monkeypatch.setattr(spending, "_TAKE_IN_ONE_STATEMENT", False)
    with StateManager.with_sqlite(tmp_path / "state.db") as opened:
        opened.set_budget("team:a", limit=100.0)
        yield opened


def _path(manager: StateManager) -> Path:
    backend = manager.backend
    assert isinstance(backend, SQLiteBackend)
    return Path(backend.path)


def _rows(manager: StateManager, sql: str) -> set[tuple[object, ...]]:
    db = raw(_path(manager))
    try:
        return set(db.execute(sql).fetchall())
    finally:
        db.close()


def _holds(manager: StateManager) -> set[tuple[object, ...]]:
    """Every hold and scope entry stored, lapsed or not."""
    return _rows(manager, "SELECT agent_id, reservation_id FROM iron_holds") | _rows(
        manager, "SELECT scope, reservation_id FROM iron_scope_holds"
    )


def _expired(manager: StateManager) -> list[dict[str, object]]:
    return [json.loads(r.details) for r in manager.audit_log(event_type="hold_expired")]


def _agent(manager: StateManager, *scopes: str, limit: float = 10.0) -> AgentId:
    agent_id = AgentId.generate()
    manager.save_agent_state(
        AgentState(agent_id, AgentStatus.RUNNING, budget_limit=limit, budget_scopes=scopes)
    )
    return agent_id


def _traced(manager: StateManager, call: object) -> list[str]:
    backend = manager.backend
    assert isinstance(backend, SQLiteBackend)
    assert callable(call)
    statements: list[str] = []
    db = backend._connections.get().db
    db.set_trace_callback(statements.append)
    try:
        call()
    finally:
        db.set_trace_callback(None)
    return statements


def test_reads_and_failed_settlements_leave_a_lapsed_hold_where_it_is(manager: StateManager) -> None:
    agent_id = _agent(manager, "team:a")
    lapsed = manager.reserve_budget(agent_id, 4.0, ttl=TTL)
    time.sleep(TTL + 0.1)
    stored = _holds(manager)
    assert len(stored) == 2  # the hold and its scope entry
    assert manager.budget_available(agent_id) == 10.0
    assert manager.get_budget("team:a").held == 0.0  # type: ignore[union-attr]
    assert [b.held for b in manager.list_budgets()] == [0.0]
    assert [s.agent_id for s in manager.iter_agent_states()] == [agent_id]
    for settle in (
        lambda: manager.release_reservation(lapsed),
        lambda: manager.commit_reservation(lapsed, 1.0),
    ):
        with pytest.raises(ReservationError, match="not open"):
            settle()
    assert _holds(manager) == stored
    assert _expired(manager) == []
    assert manager.get_agent_state(agent_id).budget_spent == 0.0  # type: ignore[union-attr]
    manager.record_spend(agent_id, 1.0)
    assert [e["reservation"] for e in _expired(manager)] == [lapsed.reservation_id]
    assert _holds(manager) == set()


def test_the_one_statement_spend_and_hold_give_way_to_the_transaction(manager: StateManager) -> None:
    spender, holder = _agent(manager), _agent(manager)
    lapsed = [manager.reserve_budget(a, 2.0, ttl=TTL) for a in (spender, holder, spender)]
    time.sleep(TTL + 0.1)
    statements = _traced(manager, lambda: manager.record_spend(spender, 1.0))
    assert "BEGIN IMMEDIATE" in statements, statements
    statements = _traced(manager, lambda: manager.reserve_budget(holder, 1.0))
    assert "BEGIN IMMEDIATE" in statements, statements
    events = manager.audit_log(event_type="hold_expired")
    assert sorted((r.agent_id, json.loads(r.details)["reservation"]) for r in events) == sorted(
        (h.agent_id, h.reservation_id) for h in lapsed
    )
    assert {json.loads(r.details)["amount"] for r in events} == {2.0}
    assert {json.loads(r.details)["scopes"] == [] for r in events} == {True}
    statements = _traced(manager, lambda: manager.record_spend(spender, 1.0))
    if store._SPEND_IN_ONE_STATEMENT:  # nothing left to clear: the one checked UPDATE again
        words = [text.split()[0] for text in dict.fromkeys(statements)]
        assert words == ["BEGIN", "UPDATE", "SELECT", "INSERT", "INSERT", "COMMIT"], statements
    assert manager.get_agent_state(spender).budget_spent == 2.0  # type: ignore[union-attr]
    assert len(manager.audit_log(event_type="hold_expired")) == 3


def test_a_commit_settles_the_lapsed_holds_with_its_own(manager: StateManager) -> None:
    agent_id = _agent(manager, "team:a")
    lapsed = manager.reserve_budget(agent_id, 3.0, ttl=TTL)
    kept = manager.reserve_budget(agent_id, 1.0, ttl=60.0)
    time.sleep(TTL + 0.1)
    assert [b.held for b in manager.list_budgets()] == [1.0]
    assert manager.commit_reservation(kept, 1.0).budget_spent == 1.0
    record, spend = manager.audit_log(agent_id=agent_id)  # the commit's events, in order
    assert (record.event_type, spend.event_type) == ("hold_expired", "spend")
    assert json.loads(spend.details) == {
        "amount": 1.0,
        "reservation": kept.reservation_id,
        "scopes": ["team:a"],
    }
    details = json.loads(record.details)
    assert (details["reservation"], details["amount"], details["scopes"]) == (
        lapsed.reservation_id,
        3.0,
        ["team:a"],
    )
    assert abs(float(details["expires_at"]) - lapsed.expires_at) < 2
    assert _holds(manager) == set()
    assert manager.get_budget("team:a").spent == 1.0  # type: ignore[union-attr]
    with pytest.raises(ReservationError):
        manager.commit_reservation(kept, 1.0)  # settled once
    assert len(_expired(manager)) == 1


def test_a_refused_spend_still_drops_the_lapsed_holds(manager: StateManager) -> None:
    agent_id = _agent(manager, "team:a", limit=5.0)
    lapsed = manager.reserve_budget(agent_id, 2.0, ttl=TTL)
    time.sleep(TTL + 0.1)
    with pytest.raises(BudgetExceeded):
        manager.record_spend(agent_id, 6.0)
    trail = [r.event_type for r in manager.audit_log(agent_id=agent_id)]
    assert trail[-2:] == ["hold_expired", "budget_exceeded"]  # in one transaction, in that order
    assert _expired(manager)[0]["reservation"] == lapsed.reservation_id
    assert _holds(manager) == set()
    assert manager.verify_audit_log().ok


def test_threads_racing_to_a_lapsed_hold_write_it_once(manager: StateManager) -> None:
    agent_id = _agent(manager, "team:a", limit=100.0)
    lapsed: list[Reservation] = [manager.reserve_budget(agent_id, 1.0, ttl=TTL) for _ in range(5)]
    time.sleep(TTL + 0.1)
    start = threading.Barrier(8)
    errors: list[BaseException] = []

    def write(k: int) -> None:
        try:
            start.wait()
            if k % 2:
                manager.record_spend(agent_id, 1.0)
            else:
                manager.commit_reservation(manager.reserve_budget(agent_id, 1.0), 1.0)
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=write, args=(k,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(str(e["reservation"]) for e in _expired(manager)) == sorted(
        h.reservation_id for h in lapsed
    )
    assert manager.get_agent_state(agent_id).budget_spent == 8.0  # type: ignore[union-attr]
    assert manager.verify_audit_log().ok
