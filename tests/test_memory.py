"""What only the in-memory store has: its column layout, slot reuse and hold bookkeeping."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iron_runtime_state import AgentId, AgentState, AgentStatus, Reservation, ReservationError, StateManager
from iron_runtime_state.backends.memory import MemoryBackend


def test_removed_slots_are_reused() -> None:
    backend = MemoryBackend()
    manager = StateManager(backend)
    ids = [AgentId.generate() for _ in range(100)]
    for agent_id in ids:
        manager.save_agent_state(AgentState(agent_id, AgentStatus.RUNNING, 1.0, 1, 5.0))
    for agent_id in ids[:50]:
        manager.remove_agent_state(agent_id)
    for _ in range(50):
        manager.save_agent_state(AgentState(AgentId.generate(), AgentStatus.STOPPED))
    assert backend._size == 100  # no growth: the 50 freed slots were taken again
    stats = manager.stats()
    assert (stats.total, stats.running, stats.stopped) == (100, 50, 50)
    assert stats.budget_spent == 50.0
    assert stats.pii_detections == 50
    for agent_id in ids[50:]:
        state = manager.get_agent_state(agent_id)
        assert state == AgentState(agent_id, AgentStatus.RUNNING, 1.0, 1, 5.0)


def test_stats_stay_consistent_under_concurrent_saves_and_removes() -> None:
    manager = StateManager()
    ids = [AgentId.generate() for _ in range(64)]
    stop = threading.Event()

    def churn(offset: int) -> None:
        n = 0
        while not stop.is_set():
            agent_id = ids[(n + offset) % len(ids)]
            if n % 3:
                manager.save_agent_state(AgentState(agent_id, AgentStatus.RUNNING, 2.0, 1))
            else:
                manager.remove_agent_state(agent_id)
            n += 1

    threads = [threading.Thread(target=churn, args=(i * 7,)) for i in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join()
    stats = manager.stats()
    present = list(manager.iter_agent_states())
    assert stats.total == len(present) == len(manager.list_agents())
    assert stats.running == len(present)
    assert stats.budget_spent == 2.0 * len(present)
    assert stats.pii_detections == len(present)


def test_many_open_holds_stay_cheap_and_exact() -> None:
    manager = StateManager()
    agent_id = AgentId.generate()
    manager.save_agent_state(AgentState(agent_id, AgentStatus.RUNNING, budget_limit=1e9))
    holds = [manager.reserve_budget(agent_id, 0.1) for _ in range(5000)]
    assert manager.budget_available(agent_id) == 1e9 - 500.0
    for hold in holds:
        manager.release_reservation(hold)
    assert manager.budget_available(agent_id) == 1e9  # exactly: no rounding left behind


def test_ids_are_rebuilt_exactly_from_the_compact_key() -> None:
    manager = StateManager()
    fixture = AgentId.test_fixture(1)
    manager.save_agent_state(AgentState(fixture, AgentStatus.RUNNING))
    assert manager.list_agents() == ["agent_00000000-0000-0000-0000-000000000001"]
    (state,) = manager.iter_agent_states()
    assert state.agent_id == fixture


def test_columns_grow_past_their_capacity_and_keep_every_value() -> None:
    backend = MemoryBackend()
    manager = StateManager(backend)
    ids = [AgentId.generate() for _ in range(3000)]  # the columns start at 1,024 slots
    for n, agent_id in enumerate(ids):
        manager.save_agent_state(AgentState(agent_id, AgentStatus.RUNNING, n / 4, n, n + 0.5))
    assert backend._size == 3000
    assert len(backend._status) >= 3000
    for n, agent_id in enumerate(ids):
        assert manager.get_agent_state(agent_id) == AgentState(
            agent_id, AgentStatus.RUNNING, n / 4, n, n + 0.5
        )
    manager.record_spend(ids[-1], 1.0)  # writes go to the arrays the reads come from
    state = manager.get_agent_state(ids[-1])
    assert state is not None
    assert state.budget_spent == 2999 / 4 + 1.0
    assert manager.stats().pii_detections == sum(range(3000))


def test_a_save_that_changes_nothing_keeps_the_totals() -> None:
    manager = StateManager()
    state = AgentState(AgentId.generate(), AgentStatus.RUNNING, 1.5, 2, 10.0)
    for _ in range(3):
        manager.save_agent_state(state)
    stats = manager.stats()
    assert (stats.total, stats.budget_spent, stats.pii_detections) == (1, 1.5, 2)
    state.status, state.budget_spent, state.pii_detections = AgentStatus.FAILED, 0.25, 7
    manager.save_agent_state(state)
    stats = manager.stats()
    assert (stats.running, stats.failed, stats.budget_spent, stats.pii_detections) == (0, 1, 0.25, 7)


def test_one_hold_then_several_then_none() -> None:
    # One open hold is kept as a tuple, several in a _Holds; both shapes settle exactly.
    backend = MemoryBackend()
    manager = StateManager(backend)
    agent_id = AgentId.generate()
    manager.save_agent_state(AgentState(agent_id, AgentStatus.RUNNING, budget_limit=10.0))
    first = manager.reserve_budget(agent_id, 1.0)
    assert isinstance(backend._holds[agent_id._int], tuple)
    second = manager.reserve_budget(agent_id, 2.0)
    third = manager.reserve_budget(agent_id, 3.0)
    assert not isinstance(backend._holds[agent_id._int], tuple)
    assert manager.budget_available(agent_id) == 4.0
    manager.commit_reservation(second, 1.5)
    assert manager.budget_available(agent_id) == 10.0 - 1.5 - 1.0 - 3.0
    manager.release_reservation(first)
    manager.commit_reservation(third, 3.0)
    assert agent_id._int not in backend._holds  # nothing held: nothing kept
    assert manager.budget_available(agent_id) == 10.0 - 4.5
    for settled in (first, second, third):
        with pytest.raises(ReservationError, match="not open"):
            manager.release_reservation(settled)


def test_expired_holds_of_either_shape_are_dropped_and_refuse_to_settle() -> None:
    backend = MemoryBackend()
    agent_id = AgentId.generate()
    backend.save(AgentState(agent_id, AgentStatus.RUNNING, budget_limit=10.0), now=0.0)
    lone = backend.reserve(agent_id, 4.0, ttl=10.0, now=0.0, reservation_id="lone")
    assert isinstance(lone, Reservation)
    assert backend.reserved(agent_id, now=9.0)[1] == 4.0
    assert backend.reserved(agent_id, now=10.0)[1] == 0.0  # expired: dropped
    assert agent_id._int not in backend._holds
    with pytest.raises(ReservationError):
        backend.commit(lone, 1.0, now=10.0)
    a = backend.reserve(agent_id, 4.0, ttl=5.0, now=20.0, reservation_id="a")
    b = backend.reserve(agent_id, 4.0, ttl=50.0, now=20.0, reservation_id="b")
    assert isinstance(a, Reservation)
    assert isinstance(b, Reservation)
    # At 30 'a' has expired, so 6.0 fits beside 'b' (4.0); an expired hold cannot be committed.
    c = backend.reserve(agent_id, 6.0, ttl=50.0, now=30.0, reservation_id="c")
    assert isinstance(c, Reservation)
    with pytest.raises(ReservationError):
        backend.commit(a, 1.0, now=30.0)
    backend.commit(b, 4.0, now=31.0)
    backend.commit(c, 6.0, now=31.0)
    state, reserved = backend.reserved(agent_id, now=31.0)
    assert (state.budget_spent, reserved) == (10.0, 0.0)


def test_purge_uses_the_time_a_finished_agent_last_changed() -> None:
    # Running agents are never purged, so only finished agents' change times are kept.
    backend = MemoryBackend()
    old, recent, running = (AgentId.generate() for _ in range(3))
    backend.save(AgentState(old, AgentStatus.RUNNING), now=0.0)
    backend.save(AgentState(recent, AgentStatus.RUNNING), now=0.0)
    backend.save(AgentState(running, AgentStatus.STOPPED), now=0.0)
    backend.set_status(old, AgentStatus.STOPPED, now=100.0)
    backend.save(AgentState(recent, AgentStatus.FAILED), now=100.0)
    backend.record_pii(recent, 1, now=500.0)  # a change while failed counts
    backend.set_status(running, AgentStatus.RUNNING, now=100.0)
    removed = backend.purge_agents([AgentStatus.STOPPED, AgentStatus.FAILED], changed_before=200.0)
    assert removed == [old.as_str()]
    assert backend.purge_agents([AgentStatus.FAILED], changed_before=600.0) == [recent.as_str()]
    assert backend.list_ids() == [running.as_str()]


# -- the manager's save and get, done whole by the store (Backend.manager_methods) ---------------


def generic(backend: MemoryBackend) -> StateManager:
    """A manager on ``backend`` that uses its generic save and get, as on every other store."""
    manager = StateManager(backend)
    del manager.save_agent_state, manager.get_agent_state  # the class's methods show through
    return manager


class _Subclass(AgentState):
    pass


def _bad_states(agent_id: AgentId) -> list[object]:
    """Inputs to save: each invalid in one way, or valid only once copied or normalised."""

    def mutated(**fields: object) -> AgentState:
        state = AgentState(agent_id, AgentStatus.RUNNING, 1.0, 1, 5.0)
        for name, value in fields.items():
            object.__setattr__(state, name, value)
        return state

    return [
        None,
        "agent state",
        {"agent_id": agent_id.as_str(), "status": "running"},
        mutated(agent_id=agent_id.as_str()),
        mutated(status="running"),
        mutated(status=None),
        mutated(budget_spent=-1.0),
        mutated(budget_spent=float("nan")),
        mutated(budget_spent=float("inf")),
        mutated(budget_spent="1.0"),
        mutated(budget_spent=True),
        mutated(budget_spent=3),  # valid: stored as 3.0
        mutated(pii_detections=True),
        mutated(pii_detections=-1),
        mutated(pii_detections=2**63),
        mutated(pii_detections=1.0),
        mutated(budget_limit=-0.5),
        mutated(budget_limit=float("inf")),
        mutated(budget_limit=False),
        mutated(budget_limit=7),  # valid: stored as 7.0
        mutated(status=AgentStatus.FAILED),  # valid, and not running
        _Subclass(agent_id, AgentStatus.STOPPED, 2.0, 2, None),  # valid: saved as a copy
    ]


def _outcome(manager: StateManager, agent_id: AgentId, state: object) -> tuple[object, ...]:
    try:
        manager.save_agent_state(state)  # type: ignore[arg-type]
        error = None
    except Exception as exc:
        error = (type(exc), str(exc))
    stored = manager.get_agent_state(agent_id)
    assert stored is None or type(stored) is AgentState
    return error, stored, manager.stats()


def test_the_memory_manager_binds_the_stores_own_save_and_get() -> None:
    backend = MemoryBackend()
    manager = StateManager(backend)
    assert manager.save_agent_state.__func__ is MemoryBackend._save_agent_state  # type: ignore[attr-defined]
    assert manager.get_agent_state.__func__ is MemoryBackend._get_agent_state  # type: ignore[attr-defined]
    assert manager.save_agent_state.__self__ is backend  # type: ignore[attr-defined]
    assert generic(MemoryBackend()).save_agent_state.__func__ is StateManager.save_agent_state  # type: ignore[attr-defined]


def test_the_bound_save_treats_every_input_as_the_generic_one_does() -> None:
    agent_id = AgentId.generate()
    for existing in (False, True):
        for state in _bad_states(agent_id):
            managers = [StateManager(MemoryBackend()), generic(MemoryBackend())]
            if existing:
                for manager in managers:
                    manager.save_agent_state(AgentState(agent_id, AgentStatus.STOPPED, 0.5, 0, 9.0))
            fast, slow = (_outcome(manager, agent_id, state) for manager in managers)
            assert fast == slow, state
    # And the valid ones were stored normalised.
    manager = StateManager()
    manager.save_agent_state(AgentState(agent_id, AgentStatus.RUNNING, 3, 1, 7))
    stored = manager.get_agent_state(agent_id)
    assert stored is not None
    assert (type(stored.budget_spent), type(stored.budget_limit)) == (float, float)


def test_the_bound_get_answers_every_input_as_the_generic_one_does() -> None:
    fast, slow = StateManager(MemoryBackend()), generic(MemoryBackend())
    agent_id = AgentId.generate()
    for manager in (fast, slow):
        manager.save_agent_state(AgentState(agent_id, AgentStatus.FAILED, 1.25, 3, None))
    text = agent_id.as_str()
    inputs: list[object] = [
        agent_id,
        text,
        str(text),  # an equal string that is another object
        text.upper(),
        text[:-1],
        AgentId.generate(),
        AgentId.generate().as_str(),
        "",
        "nope",
        None,
        42,
        b"agent_",
    ]
    for value in inputs:
        assert fast.get_agent_state(value) == slow.get_agent_state(value), value  # type: ignore[arg-type]
    state = fast.get_agent_state(text)
    assert state == AgentState(agent_id, AgentStatus.FAILED, 1.25, 3, None)
    assert state is not fast.get_agent_state(text)  # a copy every time


def test_a_manager_subclass_that_overrides_save_keeps_its_own() -> None:
    calls: list[AgentState] = []

    class Audited(StateManager):
        def save_agent_state(self, state: AgentState) -> None:
            calls.append(state)
            super().save_agent_state(state)

    manager = Audited()
    state = AgentState(AgentId.generate(), AgentStatus.RUNNING)
    manager.save_agent_state(state)
    assert calls == [state]
    assert manager.get_agent_state(state.agent_id) == state
    assert manager.get_agent_state.__func__ is MemoryBackend._get_agent_state  # type: ignore[attr-defined]


def test_a_store_subclass_gets_the_generic_save_and_get() -> None:
    saved: list[AgentId] = []

    class Counting(MemoryBackend):
        def save_values(
            self,
            agent_id: AgentId,
            status: AgentStatus,
            budget_spent: float,
            pii_detections: int,
            budget_limit: float | None,
        ) -> None:
            saved.append(agent_id)
            super().save_values(agent_id, status, budget_spent, pii_detections, budget_limit)

    manager = StateManager(Counting())
    state = AgentState(AgentId.generate(), AgentStatus.STOPPED, 1.0)
    manager.save_agent_state(state)
    assert saved == [state.agent_id]
    assert manager.get_agent_state(state.agent_id.as_str()) == state
    assert manager.stats().stopped == 1


def test_a_read_by_text_never_finds_an_agent_in_a_removed_agents_slot() -> None:
    backend = MemoryBackend()
    manager = StateManager(backend)
    gone = AgentId.generate()
    manager.save_agent_state(AgentState(gone, AgentStatus.RUNNING, 1.0))
    assert manager.get_agent_state(gone.as_str()) is not None  # its text now leads to its slot
    assert manager.remove_agent_state(gone)
    newcomer = AgentId.generate()
    manager.save_agent_state(AgentState(newcomer, AgentStatus.FAILED, 2.0))
    assert backend._index[newcomer._int] == 0  # the freed slot was reused
    assert manager.get_agent_state(gone.as_str()) is None
    assert manager.get_agent_state(newcomer.as_str()) == AgentState(newcomer, AgentStatus.FAILED, 2.0)
    # Purging frees slots through the same path.
    manager.set_status(newcomer, AgentStatus.STOPPED)
    assert manager.purge_agents(older_than=0) == [newcomer.as_str()]
    assert manager.get_agent_state(newcomer.as_str()) is None


def test_texts_remembered_for_reads_stay_bounded() -> None:
    from iron_runtime_state.backends.memory import _BY_TEXT_MAX

    backend = MemoryBackend()
    manager = StateManager(backend)
    ids = [AgentId.generate() for _ in range(_BY_TEXT_MAX + 100)]
    manager.save_agent_states(AgentState(a, AgentStatus.RUNNING, 1.0, 3) for a in ids)
    for _ in range(2):
        for agent_id in ids:
            state = manager.get_agent_state(agent_id.as_str())
            assert state is not None
            assert state.agent_id == agent_id
            assert len(backend._by_text) <= _BY_TEXT_MAX


def test_reads_by_text_race_removals_and_slot_reuse_without_mixing_agents() -> None:
    manager = StateManager()
    ids = [AgentId.generate() for _ in range(32)]
    texts = [a.as_str() for a in ids]
    for which, agent_id in enumerate(ids):
        manager.save_agent_state(AgentState(agent_id, AgentStatus.RUNNING, 0.0, which))
    stop = threading.Event()
    errors: list[str] = []

    def churn() -> None:
        # Remove and re-add agents so that slots keep changing hands.
        n = 0
        while not stop.is_set():
            which = n % len(ids)
            manager.remove_agent_state(ids[which])
            # Each agent's count is its own number: a read can tell whose values it got.
            manager.save_agent_state(AgentState(ids[which], AgentStatus.RUNNING, float(n % 7), which))
            n += 1

    def read() -> None:
        try:
            while not stop.is_set():
                for which, text in enumerate(texts):
                    state = manager.get_agent_state(text)
                    if state is not None and (state.agent_id.as_str(), state.pii_detections) != (text, which):
                        errors.append(f"agent {which} read as {state}")
        except Exception as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=churn) for _ in range(2)] + [
        threading.Thread(target=read) for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    stop.set()
    for thread in threads:
        thread.join()
    assert errors == []
    assert manager.stats().total == len(ids)


def test_a_store_may_only_replace_the_methods_the_manager_allows() -> None:
    from iron_runtime_state import ConfigurationError

    class Overreaching(MemoryBackend):
        def manager_methods(self) -> dict[str, Callable[..., Any]]:
            return {"record_spend": lambda *args: None}

    with pytest.raises(ConfigurationError, match="may only replace"):
        StateManager(Overreaching())


_POOL = [AgentId.generate() for _ in range(4)]
_VALID: dict[str, list[object]] = {
    "status": [AgentStatus.RUNNING, AgentStatus.STOPPED, AgentStatus.FAILED],
    "budget_spent": [0.0, 1.5, 2],  # an int is valid: stored as a float
    "pii_detections": [0, 3, 2**63 - 1],
    "budget_limit": [None, 5.0, 7],
}
_INVALID: dict[str, list[object]] = {
    "status": ["running", None],
    "budget_spent": [-1.0, float("nan"), True, "1"],
    "pii_detections": [2**63, -1, False, 1.0],
    "budget_limit": [-0.5, float("inf"), True],
}
_save = st.tuples(
    st.just("save"),
    st.sampled_from(range(len(_POOL))),
    st.fixed_dictionaries({name: st.sampled_from(values) for name, values in _VALID.items()}),
    st.one_of(  # half the saves break one field
        st.none(),
        st.sampled_from([(name, bad) for name, values in _INVALID.items() for bad in values]),
    ),
)
_operation = st.one_of(
    _save,
    _save,
    st.tuples(st.just("get"), st.sampled_from(range(len(_POOL))), st.booleans()),
    st.tuples(st.just("remove"), st.sampled_from(range(len(_POOL)))),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_operation, max_size=30))
def test_any_sequence_of_saves_reads_and_removes_matches_the_generic_manager(
    operations: list[tuple[Any, ...]],
) -> None:
    fast, slow = StateManager(MemoryBackend()), generic(MemoryBackend())
    for kind, which, *rest in operations:
        agent_id = _POOL[which]
        outcomes = []
        for manager in (fast, slow):
            outcome: object = None
            try:
                if kind == "save":
                    fields, broken = rest
                    state = AgentState(agent_id, **fields)
                    if broken is not None:
                        object.__setattr__(state, *broken)  # mutated after construction
                    manager.save_agent_state(state)
                elif kind == "get":
                    outcome = manager.get_agent_state(agent_id.as_str() if rest[0] else agent_id)
                else:
                    outcome = manager.remove_agent_state(agent_id)
            except Exception as exc:
                outcome = (type(exc), str(exc))
            outcomes.append((outcome, manager.stats()))
        assert outcomes[0] == outcomes[1], (kind, which, rest)
