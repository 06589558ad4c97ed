"""Spend, limits, reservations and lifecycle rules, on every store."""

from __future__ import annotations

import json
import math
import random
import threading
import time

import pytest

from iron_runtime_state import (
    AgentId,
    AgentNotFound,
    AgentNotRunning,
    AgentState,
    AgentStatus,
    BudgetExceeded,
    Reservation,
    ReservationError,
    StateError,
    StateManager,
    StateTypeError,
    ValidationError,
)
from iron_runtime_state.models import MAX_AMOUNT
from iron_runtime_state.money import to_micros

from .stores import StoreHandle


def test_record_spend_adds(manager: StateManager, agent: AgentId) -> None:
    assert manager.record_spend(agent, 2.5).budget_spent == 2.5
    assert manager.record_spend(agent.as_str(), 1).budget_spent == 3.5


def test_ten_tenths_fit_a_limit_of_one(manager: StateManager) -> None:
    agent_id = AgentId.generate()
    manager.save_agent_state(AgentState(agent_id, AgentStatus.RUNNING, budget_limit=1.0))
    for _ in range(10):
        manager.record_spend(agent_id, 0.1)
    with pytest.raises(BudgetExceeded):
        manager.record_spend(agent_id, 0.1)


def test_spend_over_limit_changes_nothing_and_is_audited(manager: StateManager, agent: AgentId) -> None:
    manager.record_spend(agent, 9.0)
    with pytest.raises(BudgetExceeded) as info:
        manager.record_spend(agent, 1.5)
    err = info.value
    assert (err.agent_id, err.limit, err.spent, err.requested) == (agent.as_str(), 10.0, 9.0, 1.5)
    assert err.scope is None  # the agent's own limit refused, not a budget scope
    assert "limit" in str(err)
    state = manager.get_agent_state(agent)
    assert state is not None
    assert state.budget_spent == 9.0
    events = manager.audit_log(agent_id=agent, event_type="budget_exceeded")
    assert len(events) == 1
    details = json.loads(events[0].event.details)
    assert details["limit"] == 10.0
    assert details["requested"] == 1.5
    assert "scope" not in details
    manager.record_spend(agent, 1.0)  # exactly to the limit is allowed


def test_no_limit_means_unlimited(manager: StateManager) -> None:
    agent_id = AgentId.generate()
    manager.save_agent_state(AgentState(agent_id, AgentStatus.RUNNING))
    assert manager.record_spend(agent_id, MAX_AMOUNT).budget_spent == MAX_AMOUNT
    assert manager.budget_available(agent_id) == math.inf


def test_zero_limit_blocks_everything(manager: StateManager) -> None:
    agent_id = AgentId.generate()
    manager.save_agent_state(AgentState(agent_id, AgentStatus.RUNNING, budget_limit=0.0))
    with pytest.raises(BudgetExceeded):
        manager.record_spend(agent_id, 0.01)


@pytest.mark.parametrize("amount", [0, 0.0, -1.0, math.nan, math.inf])
def test_bad_amounts_are_refused(manager: StateManager, agent: AgentId, amount: float) -> None:
    with pytest.raises(ValidationError):
        manager.record_spend(agent, amount)
    with pytest.raises(ValidationError):
        manager.reserve_budget(agent, amount)
    state = manager.get_agent_state(agent)
    assert state is not None
    assert state.budget_spent == 0.0


def test_bad_amount_types(manager: StateManager, agent: AgentId) -> None:
    for amount in [None, True, b"1.0"]:
        with pytest.raises(StateTypeError):
            manager.record_spend(agent, amount)  # type: ignore[arg-type]
    assert manager.record_spend(agent, "1.0").budget_spent == 1.0  # a numeric str is an amount


def test_spend_on_missing_agent(manager: StateManager) -> None:
    with pytest.raises(AgentNotFound):
        manager.record_spend(AgentId.generate(), 1.0)
    with pytest.raises(AgentNotFound):
        manager.reserve_budget(AgentId.generate(), 1.0)
    with pytest.raises(AgentNotFound):
        manager.record_pii_detection(AgentId.generate())
    with pytest.raises(AgentNotFound):
        manager.set_status(AgentId.generate(), AgentStatus.STOPPED)
    with pytest.raises(AgentNotFound):
        manager.budget_available(AgentId.generate())


@pytest.mark.parametrize("status", [AgentStatus.STOPPED, AgentStatus.FAILED])
def test_spending_needs_a_running_agent(manager: StateManager, agent: AgentId, status: AgentStatus) -> None:
    manager.set_status(agent, status)
    with pytest.raises(AgentNotRunning, match=status.value) as info:
        manager.record_spend(agent, 1.0)
    assert isinstance(info.value, StateError)
    with pytest.raises(AgentNotRunning):
        manager.reserve_budget(agent, 1.0)
    manager.set_status(agent, AgentStatus.RUNNING)
    manager.record_spend(agent, 1.0)


def test_pii_detection(manager: StateManager, agent: AgentId) -> None:
    assert manager.record_pii_detection(agent).pii_detections == 1
    state = manager.record_pii_detection(agent, 4, details="Email address found in output")
    assert state.pii_detections == 5
    events = manager.audit_log(agent_id=agent, event_type="pii_detected")
    assert len(events) == 2
    assert json.loads(events[1].event.details) == {
        "count": 4,
        "details": "Email address found in output",
    }
    for bad in [0, -1]:
        with pytest.raises(ValidationError):
            manager.record_pii_detection(agent, bad)
    with pytest.raises(StateTypeError):
        manager.record_pii_detection(agent, 1.5)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        manager.record_pii_detection(agent, 1, details="x" * 70_000)
    assert manager.stats().pii_detections == 5


def test_set_status_writes_an_event(manager: StateManager, agent: AgentId) -> None:
    state = manager.set_status(agent, AgentStatus.STOPPED)
    assert state.status is AgentStatus.STOPPED
    manager.set_status(agent, "stopped")  # no change, no event
    events = manager.audit_log(agent_id=agent, event_type="status_changed")
    assert len(events) == 1
    assert json.loads(events[0].event.details) == {"from": "running", "to": "stopped"}
    with pytest.raises(ValidationError):
        manager.set_status(agent, "paused")


# -- reservations -----------------------------------------------------------------------------------


def test_reserve_commit(manager: StateManager, agent: AgentId) -> None:
    hold = manager.reserve_budget(agent, 4.0)
    assert isinstance(hold, Reservation)
    assert hold.agent_id == agent
    assert hold.amount == 4.0
    assert hold.scopes == ()
    assert manager.budget_available(agent) == 6.0
    state = manager.commit_reservation(hold, 3.0)
    assert state.budget_spent == 3.0
    assert manager.budget_available(agent) == 7.0


def test_holds_count_against_the_limit(manager: StateManager, agent: AgentId) -> None:
    manager.reserve_budget(agent, 6.0)
    with pytest.raises(BudgetExceeded) as info:
        manager.reserve_budget(agent, 5.0)
    assert info.value.reserved == 6.0
    with pytest.raises(BudgetExceeded):
        manager.record_spend(agent, 4.5)
    manager.record_spend(agent, 4.0)
    assert manager.budget_available(agent) == 0.0
    refusals = manager.audit_log(agent_id=agent, event_type="budget_exceeded")
    assert len(refusals) == 2


def test_release_frees_without_spending(manager: StateManager, agent: AgentId) -> None:
    hold = manager.reserve_budget(agent, 10.0)
    manager.release_reservation(hold)
    assert manager.budget_available(agent) == 10.0
    state = manager.get_agent_state(agent)
    assert state is not None
    assert state.budget_spent == 0.0


def test_settling_twice_is_an_error_never_a_double_charge(manager: StateManager, agent: AgentId) -> None:
    hold = manager.reserve_budget(agent, 2.0)
    manager.commit_reservation(hold, 2.0)
    with pytest.raises(ReservationError):
        manager.commit_reservation(hold, 2.0)
    with pytest.raises(ReservationError):
        manager.release_reservation(hold)
    other = manager.reserve_budget(agent, 1.0)
    manager.release_reservation(other)
    with pytest.raises(ReservationError):
        manager.release_reservation(other)
    with pytest.raises(ReservationError):
        manager.commit_reservation(other, 1.0)
    state = manager.get_agent_state(agent)
    assert state is not None
    assert state.budget_spent == 2.0


def test_commit_over_the_limit_is_recorded_and_audited(manager: StateManager, agent: AgentId) -> None:
    hold = manager.reserve_budget(agent, 5.0)
    state = manager.commit_reservation(hold, 12.0)
    assert state.budget_spent == 12.0
    events = manager.audit_log(agent_id=agent, event_type="budget_exceeded")
    assert len(events) == 1
    details = json.loads(events[0].event.details)
    assert details["committed"] == 12.0
    assert details["reservation"] == hold.reservation_id


def test_expired_hold_is_released(manager: StateManager, agent: AgentId) -> None:
    hold = manager.reserve_budget(agent, 9.0, ttl=0.3)
    assert manager.budget_available(agent) == 1.0
    time.sleep(0.5)
    assert manager.budget_available(agent) == 10.0
    manager.reserve_budget(agent, 9.0)
    with pytest.raises(ReservationError, match="record_spend"):
        manager.commit_reservation(hold, 1.0)


def test_reservation_bad_input(manager: StateManager, agent: AgentId) -> None:
    for ttl in [0, -1.0, math.inf, math.nan]:
        with pytest.raises(ValidationError):
            manager.reserve_budget(agent, 1.0, ttl=ttl)
    with pytest.raises(StateTypeError):
        manager.commit_reservation("res", 1.0)  # type: ignore[arg-type]
    hold = manager.reserve_budget(agent, 1.0)
    with pytest.raises(ValidationError):
        manager.commit_reservation(hold, -1.0)
    manager.commit_reservation(hold, 0.0)  # the call cost nothing
    forged = Reservation("0" * 32, agent, 1.0, time.time() + 60)
    with pytest.raises(ReservationError):
        manager.commit_reservation(forged, 1.0)
    assert manager.budget_available(agent) == 10.0


def test_removing_an_agent_drops_its_holds(manager: StateManager, agent: AgentId) -> None:
    hold = manager.reserve_budget(agent, 1.0)
    manager.remove_agent_state(agent)
    with pytest.raises(ReservationError):
        manager.commit_reservation(hold, 1.0)


def test_budget_context_manager(manager: StateManager, agent: AgentId) -> None:
    with manager.budget(agent, 3.0) as hold:
        assert manager.budget_available(agent) == 7.0
        hold.commit(2.0)
    assert manager.budget_available(agent) == 8.0

    class Boom(Exception):
        pass

    with pytest.raises(Boom), manager.budget(agent, 5.0):
        raise Boom
    assert manager.budget_available(agent) == 8.0
    with manager.budget(agent, 5.0):
        pass  # ended without commit: released
    assert manager.budget_available(agent) == 8.0
    with pytest.raises(BudgetExceeded), manager.budget(agent, 50.0):
        pass


def test_threads_never_pass_the_limit(store: StoreHandle) -> None:
    """8 threads reserve and commit at random; spent + held never passes the limit."""
    manager = store.open()
    agent_id = AgentId.generate()
    limit = 50.0
    manager.save_agent_state(AgentState(agent_id, AgentStatus.RUNNING, budget_limit=limit))
    committed: list[float] = []
    lock = threading.Lock()
    errors: list[BaseException] = []
    rounds = max(10, int(60 * store.scale))

    def work(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(rounds):
                amount = rng.choice([0.5, 1.0, 2.0, 3.0])
                try:
                    hold = manager.reserve_budget(agent_id, amount)
                except BudgetExceeded:
                    continue
                state, reserved = manager.backend.reserved(agent_id, time.time())
                assert to_micros(state.budget_spent) + reserved <= to_micros(limit)  # micro-units
                if rng.random() < 0.3:
                    manager.release_reservation(hold)
                else:
                    actual = rng.choice([amount, amount / 2, 0.0])
                    manager.commit_reservation(hold, actual)
                    with lock:
                        committed.append(actual)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    final = manager.get_agent_state(agent_id)
    assert final is not None
    assert final.budget_spent == math.fsum(committed)  # halves of binary-exact amounts: exact
    assert final.budget_spent <= limit
    assert manager.budget_available(agent_id) == limit - final.budget_spent
