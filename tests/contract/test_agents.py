"""Agent state: the seed's operations and the atomic ones beyond it, on every store."""

from __future__ import annotations

import math
import threading

import pytest

from iron_runtime_state import (
    AgentId,
    AgentNotFound,
    AgentState,
    AgentStatus,
    IdError,
    StateError,
    StateManager,
    StateTypeError,
    ValidationError,
)
from iron_runtime_state.backends import SCHEMES

from .stores import PROVISIONERS, SCHEME_COVERAGE, StoreHandle


def test_every_scheme_is_provisioned() -> None:
    missing = [s for s in SCHEMES if SCHEME_COVERAGE.get(s) not in PROVISIONERS]
    assert not missing, f"register a contract-suite provisioner for {missing} in stores.py"


def running(limit: float | None = None, spent: float = 0.0) -> AgentState:
    return AgentState(AgentId.generate(), AgentStatus.RUNNING, spent, 0, limit)


def test_save_then_get_returns_equal_independent_copy(manager: StateManager) -> None:
    state = AgentState(AgentId.generate(), AgentStatus.RUNNING, 5.0, 2, 100.0)
    manager.save_agent_state(state)
    got = manager.get_agent_state(state.agent_id.as_str())
    assert got == state
    assert got is not state
    assert got is not None
    got.budget_spent = 99.0
    assert manager.get_agent_state(state.agent_id) == state


def test_saved_state_is_a_snapshot(manager: StateManager) -> None:
    state = running()
    manager.save_agent_state(state)
    state.budget_spent = 50.0
    got = manager.get_agent_state(state.agent_id)
    assert got is not None
    assert got.budget_spent == 0.0


def test_save_replaces(manager: StateManager) -> None:
    state = running(limit=3.0)
    manager.save_agent_state(state)
    state.status = AgentStatus.STOPPED
    state.budget_limit = None
    state.pii_detections = 7
    manager.save_agent_state(state)
    assert manager.get_agent_state(state.agent_id) == state
    assert manager.list_agents() == [state.agent_id.as_str()]


def test_values_round_trip_exactly(manager: StateManager) -> None:
    # Amounts are kept to the micro-unit, up to a billion (tests/contract/test_money.py).
    state = AgentState(AgentId.generate(), AgentStatus.FAILED, 123_456_789.000001, 2**40, 1e9)
    manager.save_agent_state(state)
    assert manager.get_agent_state(state.agent_id) == state


def test_get_absent_and_garbage_return_none(manager: StateManager) -> None:
    assert manager.get_agent_state(AgentId.generate()) is None
    for garbage in ["", "nope", "agent_", "agent-" + str(AgentId.generate().uuid), "x" * 10_000]:
        assert manager.get_agent_state(garbage) is None
    assert manager.get_agent_state(123) is None  # type: ignore[arg-type]


def test_list_agents(manager: StateManager) -> None:
    assert manager.list_agents() == []
    ids = {running().agent_id for _ in range(3)}
    for agent_id in ids:
        manager.save_agent_state(AgentState(agent_id, AgentStatus.RUNNING))
    listed = manager.list_agents()
    assert sorted(listed) == sorted(a.as_str() for a in ids)
    assert all(isinstance(s, str) for s in listed)


def test_invalid_state_is_never_stored(manager: StateManager) -> None:
    state = running()
    state.budget_spent = -1.0
    with pytest.raises(ValidationError):
        manager.save_agent_state(state)
    state.budget_spent = math.nan
    with pytest.raises(ValueError, match="finite"):
        manager.save_agent_state(state)
    state.budget_spent = 0.0
    state.status = "running"  # type: ignore[assignment]
    with pytest.raises(TypeError):
        manager.save_agent_state(state)
    state.status = AgentStatus.RUNNING
    state.pii_detections = True  # bool is not a count
    with pytest.raises(StateTypeError):
        manager.save_agent_state(state)
    state.pii_detections = 2**63  # past what every store keeps (a signed 64-bit count)
    with pytest.raises(ValidationError, match="2\\*\\*63"):
        manager.save_agent_state(state)
    state.pii_detections = 0
    state.agent_id = state.agent_id.as_str()  # type: ignore[assignment]
    with pytest.raises(TypeError, match=r"AgentId\.parse"):
        manager.save_agent_state(state)
    with pytest.raises(StateTypeError, match=r"got dict; build one with AgentState\("):
        manager.save_agent_state({"agent_id": "x"})  # type: ignore[arg-type]
    assert manager.list_agents() == []
    assert manager.stats().total == 0


def test_invalid_replacement_leaves_old_state(manager: StateManager) -> None:
    state = running(limit=5.0, spent=1.0)
    manager.save_agent_state(state)
    bad = state.copy()
    bad.budget_limit = -3.0
    with pytest.raises(ValidationError):
        manager.save_agent_state(bad)
    assert manager.get_agent_state(state.agent_id) == state


def test_int_values_are_normalised(manager: StateManager) -> None:
    state = AgentState(AgentId.generate(), AgentStatus.RUNNING, 3, 0, 10)
    manager.save_agent_state(state)
    got = manager.get_agent_state(state.agent_id)
    assert got is not None
    assert type(got.budget_spent) is float
    assert type(got.budget_limit) is float


def test_remove(manager: StateManager) -> None:
    state = running()
    manager.save_agent_state(state)
    assert manager.remove_agent_state(state.agent_id) is True
    assert manager.remove_agent_state(state.agent_id.as_str()) is False
    assert manager.get_agent_state(state.agent_id) is None
    assert manager.list_agents() == []
    with pytest.raises(IdError):
        manager.remove_agent_state("garbage")


def test_update_is_atomic_read_modify_write(manager: StateManager) -> None:
    state = running(limit=None)
    manager.save_agent_state(state)

    def bump(s: AgentState) -> AgentState:
        s.budget_spent += 1.5
        s.pii_detections += 1
        return s

    new = manager.update_agent_state(state.agent_id, bump)
    assert new.budget_spent == 1.5
    assert new.pii_detections == 1
    assert manager.get_agent_state(state.agent_id) == new


def test_update_errors_change_nothing(manager: StateManager) -> None:
    state = running(spent=2.0)
    manager.save_agent_state(state)
    with pytest.raises(AgentNotFound) as info:
        manager.update_agent_state(AgentId.generate(), lambda s: s)
    assert isinstance(info.value, KeyError)
    assert "save_agent_state" in str(info.value)

    def breaks(s: AgentState) -> AgentState:
        s.budget_spent = -5.0
        return s

    with pytest.raises(ValidationError):
        manager.update_agent_state(state.agent_id, breaks)

    def renames(s: AgentState) -> AgentState:
        s.agent_id = AgentId.generate()
        return s

    with pytest.raises(ValidationError, match="agent_id"):
        manager.update_agent_state(state.agent_id, renames)
    with pytest.raises(StateTypeError):
        manager.update_agent_state(state.agent_id, lambda s: None)  # type: ignore[arg-type,return-value]

    def fails(s: AgentState) -> AgentState:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        manager.update_agent_state(state.agent_id, fails)
    assert manager.get_agent_state(state.agent_id) == state
    assert manager.stats().budget_spent == 2.0


def test_iter_agent_states(manager: StateManager) -> None:
    states = [running() for _ in range(7)]
    states[0].status = AgentStatus.STOPPED
    states[1].status = AgentStatus.FAILED
    for s in states:
        manager.save_agent_state(s)
    every = list(manager.iter_agent_states(batch_size=3))
    assert sorted(every, key=lambda s: s.agent_id) == sorted(states, key=lambda s: s.agent_id)
    assert list(manager.iter_agent_states(status=AgentStatus.STOPPED)) == [states[0]]
    assert list(manager.iter_agent_states(status="failed")) == [states[1]]
    assert len(list(manager.iter_agent_states(status=AgentStatus.RUNNING, batch_size=1))) == 5
    with pytest.raises(ValidationError):
        list(manager.iter_agent_states(status="sleeping"))
    with pytest.raises(ValidationError):
        list(manager.iter_agent_states(batch_size=0))


def test_get_agent_states_batched(manager: StateManager) -> None:
    states = [running() for _ in range(5)]
    for s in states:
        manager.save_agent_state(s)
    absent = AgentId.generate()
    ids = [states[0].agent_id, "garbage", absent, states[4].agent_id.as_str(), states[2].agent_id]
    got = manager.get_agent_states(ids)
    assert got == [states[0], None, None, states[4], states[2]]
    assert manager.get_agent_states([]) == []


def test_stats_follow_every_change(manager: StateManager) -> None:
    assert manager.stats().total == 0
    a, b, c = running(limit=10.0), running(), running()
    for s in (a, b, c):
        manager.save_agent_state(s)
    manager.record_spend(a.agent_id, 2.5)
    manager.record_pii_detection(b.agent_id, 3)
    manager.set_status(c.agent_id, AgentStatus.FAILED)
    manager.update_agent_state(b.agent_id, lambda s: AgentState(s.agent_id, AgentStatus.STOPPED, 1.0, 5))
    stats = manager.stats()
    assert (stats.total, stats.running, stats.stopped, stats.failed) == (3, 1, 1, 1)
    assert stats.budget_spent == 3.5
    assert stats.pii_detections == 5
    manager.remove_agent_state(b.agent_id)
    stats = manager.stats()
    assert (stats.total, stats.running, stats.stopped, stats.failed) == (2, 1, 0, 1)
    assert stats.budget_spent == 2.5
    assert stats.pii_detections == 0
    manager.remove_agent_state(a.agent_id)
    manager.remove_agent_state(c.agent_id)
    assert manager.stats().budget_spent == 0.0


def test_state_is_shared_between_managers_of_one_store(store: StoreHandle) -> None:
    first, second = store.open(), store.open()
    state = running(limit=4.0)
    first.save_agent_state(state)
    assert second.get_agent_state(state.agent_id) == state
    second.record_spend(state.agent_id, 1.0)
    got = first.get_agent_state(state.agent_id)
    assert got is not None
    assert got.budget_spent == 1.0
    assert first.stats() == second.stats()


def test_concurrent_updates_lose_nothing(store: StoreHandle) -> None:
    manager = store.open()
    state = running()
    manager.save_agent_state(state)
    threads_n = 16
    per_thread = max(20, int(1000 * store.scale))
    errors: list[BaseException] = []

    def bump(s: AgentState) -> AgentState:
        s.pii_detections += 1
        return s

    def work(i: int) -> None:
        try:
            for n in range(per_thread):
                if (n + i) % 2:
                    manager.update_agent_state(state.agent_id, bump)
                else:
                    manager.record_spend(state.agent_id, 1.0)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    final = manager.get_agent_state(state.agent_id)
    assert final is not None
    total = threads_n * per_thread
    assert final.pii_detections + final.budget_spent == total
    assert final.budget_spent == float(total // 2)
    assert manager.stats().budget_spent == final.budget_spent


def test_errors_are_state_errors(manager: StateManager) -> None:
    with pytest.raises(StateError):
        manager.update_agent_state("agent_bad", lambda s: s)
    with pytest.raises(StateError):
        manager.record_spend(AgentId.generate(), 1.0)
