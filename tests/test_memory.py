"""What only the in-memory store has: its column layout, slot reuse and hold bookkeeping."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iron_runtime_state import (
    GENESIS_HASH,
    AgentId,
    AgentState,
    AgentStatus,
    AuditEvent,
    FleetStats,
    Reservation,
    ReservationError,
    StateManager,
    events,
)
from iron_runtime_state.audit_chain import AuditChain
from iron_runtime_state.backends import AuditMarks, AuditQuery
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
    assert len(backend._status) == 100  # no growth: the 50 freed slots were taken again
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


def test_ids_come_back_exactly_as_saved() -> None:
    manager = StateManager()
    fixture = AgentId.test_fixture(1)
    manager.save_agent_state(AgentState(fixture, AgentStatus.RUNNING))
    assert manager.list_agents() == ["agent_00000000-0000-0000-0000-000000000001"]
    (state,) = manager.iter_agent_states()
    assert state.agent_id == fixture


def test_columns_grow_and_keep_every_value() -> None:
    backend = MemoryBackend()
    manager = StateManager(backend)
    ids = [AgentId.generate() for _ in range(3000)]
    for n, agent_id in enumerate(ids):
        manager.save_agent_state(AgentState(agent_id, AgentStatus.RUNNING, n / 4, n, n + 0.5))
    assert len(backend._status) == 3000
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
    backend = MemoryBackend()
    manager = StateManager(backend)
    agent_id = AgentId.generate()
    manager.save_agent_state(AgentState(agent_id, AgentStatus.RUNNING, budget_limit=10.0))
    first = manager.reserve_budget(agent_id, 1.0)
    assert manager.budget_available(agent_id) == 9.0
    second = manager.reserve_budget(agent_id, 2.0)
    third = manager.reserve_budget(agent_id, 3.0)
    assert manager.budget_available(agent_id) == 4.0
    manager.commit_reservation(second, 1.5)
    assert manager.budget_available(agent_id) == 10.0 - 1.5 - 1.0 - 3.0
    manager.release_reservation(first)
    manager.commit_reservation(third, 3.0)
    assert agent_id.as_str() not in backend._holds  # nothing held: nothing kept
    assert manager.budget_available(agent_id) == 10.0 - 4.5
    for settled in (first, second, third):
        with pytest.raises(ReservationError, match="not open"):
            manager.release_reservation(settled)


def test_expired_holds_are_dropped_and_refuse_to_settle() -> None:
    backend = MemoryBackend()
    agent_id = AgentId.generate()
    backend.save(AgentState(agent_id, AgentStatus.RUNNING, budget_limit=10.0), now=0.0)
    chain = AuditChain()
    unit = 1_000_000  # amounts reach a store in micro-units
    lone = backend.reserve(agent_id, 4 * unit, ttl=10.0, now=0.0, reservation_id="lone", chain=chain)
    assert isinstance(lone, Reservation)
    assert backend.reserved(agent_id, now=9.0)[1] == 4 * unit
    assert backend.reserved(agent_id, now=10.0)[1] == 0  # expired: no longer counted
    assert agent_id.as_str() in backend._holds  # a read writes no event, so it drops nothing
    with pytest.raises(ReservationError):
        backend.commit(lone, unit, now=10.0, chain=chain)
    assert backend.audit_count() == 0  # a refused commit changes nothing
    a = backend.reserve(agent_id, 4 * unit, ttl=5.0, now=20.0, reservation_id="a", chain=chain)
    # The next write drops the expired hold, and says so once.
    (expired,) = backend.query_audit(AuditQuery(event_type="hold_expired"))
    assert json.loads(expired.event.details) == {
        "amount": 4.0,
        "expires_at": 10,
        "reservation": "lone",
        "scopes": [],
    }
    b = backend.reserve(agent_id, 4 * unit, ttl=50.0, now=20.0, reservation_id="b", chain=chain)
    assert isinstance(a, Reservation)
    assert isinstance(b, Reservation)
    # At 30 'a' has expired, so 6.0 fits beside 'b' (4.0); an expired hold cannot be committed.
    c = backend.reserve(agent_id, 6 * unit, ttl=50.0, now=30.0, reservation_id="c", chain=chain)
    assert isinstance(c, Reservation)
    with pytest.raises(ReservationError):
        backend.commit(a, unit, now=30.0, chain=chain)
    backend.commit(b, 4 * unit, now=31.0, chain=chain)
    backend.commit(c, 6 * unit, now=31.0, chain=chain)
    state, reserved = backend.reserved(agent_id, now=31.0)
    assert (state.budget_spent, reserved) == (10.0, 0)


def test_purge_uses_the_time_a_finished_agent_last_changed() -> None:
    # Running agents are never purged, so only finished agents' change times are kept.
    backend = MemoryBackend()
    old, recent, running = (AgentId.generate() for _ in range(3))
    backend.save(AgentState(old, AgentStatus.RUNNING), now=0.0)
    backend.save(AgentState(recent, AgentStatus.RUNNING), now=0.0)
    backend.save(AgentState(running, AgentStatus.STOPPED), now=0.0)
    chain = AuditChain()
    backend.set_status(old, AgentStatus.STOPPED, now=100.0, chain=chain)
    backend.save(AgentState(recent, AgentStatus.FAILED), now=100.0)
    pii = events.pii_detected(recent, 1, "", 500.0)
    backend.record_pii(recent, 1, now=500.0, event=pii, chain=chain)  # a change while failed counts
    backend.set_status(running, AgentStatus.RUNNING, now=100.0, chain=chain)
    removed = backend.purge_agents([AgentStatus.STOPPED, AgentStatus.FAILED], changed_before=200.0)
    assert removed == [old.as_str()]
    assert backend.purge_agents([AgentStatus.FAILED], changed_before=600.0) == [recent.as_str()]
    assert backend.list_ids() == [running.as_str()]


def test_a_read_by_text_never_finds_an_agent_in_a_removed_agents_slot() -> None:
    backend = MemoryBackend()
    manager = StateManager(backend)
    gone = AgentId.generate()
    manager.save_agent_state(AgentState(gone, AgentStatus.RUNNING, 1.0))
    assert manager.get_agent_state(gone.as_str()) is not None
    assert manager.remove_agent_state(gone)
    newcomer = AgentId.generate()
    manager.save_agent_state(AgentState(newcomer, AgentStatus.FAILED, 2.0))
    assert backend._slots[newcomer.as_str()] == 0  # the freed slot was reused
    assert manager.get_agent_state(gone.as_str()) is None
    assert manager.get_agent_state(newcomer.as_str()) == AgentState(newcomer, AgentStatus.FAILED, 2.0)
    # Purging frees slots through the same path.
    manager.set_status(newcomer, AgentStatus.STOPPED)
    assert manager.purge_agents(older_than=0) == [newcomer.as_str()]
    assert manager.get_agent_state(newcomer.as_str()) is None


def test_reads_are_keyed_by_the_canonical_text_alone() -> None:
    backend = MemoryBackend()
    agent_id = AgentId.generate()
    backend.save(AgentState(agent_id, AgentStatus.RUNNING, 1.0), now=0.0)
    text = agent_id.as_str()
    state = backend.get("".join(text))  # an equal string, another object
    assert state is not None
    assert state.agent_id == agent_id
    assert backend.get(text.upper()) is None  # the same id, not in canonical form
    assert backend.get_many([text, "agent_", text]) == [state, None, state]


def test_the_spend_total_is_exactly_zero_once_the_store_is_empty() -> None:
    manager = StateManager()
    ids = [AgentId.generate() for _ in range(3)]
    for n, agent_id in enumerate(ids):
        manager.save_agent_state(AgentState(agent_id, AgentStatus.RUNNING, 0.1 * (n + 1)))
    manager.record_spend(ids[0], 0.7)
    for agent_id in ids:
        manager.remove_agent_state(agent_id)
    assert manager.stats() == FleetStats(0, 0, 0, 0, 0.0, 0)


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


_POOL = [AgentId.generate() for _ in range(4)]
_VALID: dict[str, list[object]] = {
    "status": [AgentStatus.RUNNING, AgentStatus.STOPPED, AgentStatus.FAILED],
    "budget_spent": [0.0, 1.5, 2],  # an int is valid: stored as a float
    "pii_detections": [0, 3, 2**63 - 1],
    "budget_limit": [None, 5.0, 7],
}
_INVALID: dict[str, list[object]] = {
    "status": ["running", None],
    "budget_spent": [-1.0, float("nan"), True, "one", 2e9],
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


def _normalised(state: AgentState) -> AgentState:
    limit = state.budget_limit
    return AgentState(
        state.agent_id,
        state.status,
        float(state.budget_spent),
        state.pii_detections,
        None if limit is None else float(limit),
    )


@settings(max_examples=300, deadline=None)
@given(st.lists(_operation, max_size=30))
def test_any_sequence_of_saves_reads_and_removes_matches_a_dict(operations: list[tuple[Any, ...]]) -> None:
    # Slots are freed and reused, and the stats() aggregates follow every change: the store
    # answers as a plain dict of the states saved would.
    manager = StateManager(MemoryBackend())
    model: dict[AgentId, AgentState] = {}
    for kind, which, *rest in operations:
        agent_id = _POOL[which]
        if kind == "save":
            fields, broken = rest
            state = AgentState(agent_id, **fields)
            if broken is None:
                manager.save_agent_state(state)
                model[agent_id] = _normalised(state)
            else:
                object.__setattr__(state, *broken)  # broken after construction: refused
                with pytest.raises((TypeError, ValueError)):
                    manager.save_agent_state(state)
        elif kind == "get":
            key = agent_id.as_str() if rest[0] else agent_id
            assert manager.get_agent_state(key) == model.get(agent_id)
        else:
            assert manager.remove_agent_state(agent_id) == (model.pop(agent_id, None) is not None)
        states = list(model.values())
        assert manager.stats() == FleetStats(
            total=len(states),
            running=sum(s.status is AgentStatus.RUNNING for s in states),
            stopped=sum(s.status is AgentStatus.STOPPED for s in states),
            failed=sum(s.status is AgentStatus.FAILED for s in states),
            budget_spent=sum(s.budget_spent for s in states),
            pii_detections=sum(s.pii_detections for s in states),
        )
    assert sorted(manager.list_agents()) == sorted(a.as_str() for a in model)


def test_a_batch_whose_sealing_fails_keeps_nothing() -> None:
    # Records are sealed first and kept only once all of them are: a batch is whole or absent.
    class FailsAtThree(AuditChain):
        def seal(
            self, prev_hash: str, seq: int, agent_id: str, event_type: str, timestamp: int, details: str
        ) -> str:
            if seq == 3:
                raise RuntimeError("the seal failed")
            return super().seal(prev_hash, seq, agent_id, event_type, timestamp, details)

    backend = MemoryBackend()
    agent_id = AgentId.generate()
    batch = [AuditEvent(agent_id, "note", i, "") for i in range(5)]
    with pytest.raises(RuntimeError):
        backend.append_audit(batch, FailsAtThree())
    assert backend.audit_marks() == AuditMarks((0, GENESIS_HASH), (0, GENESIS_HASH), 0)
    assert backend.query_audit(AuditQuery(agent_id=agent_id)) == []
    records = backend.append_audit(batch, AuditChain())
    assert [r.seq for r in records] == [1, 2, 3, 4, 5]
    assert backend.query_audit(AuditQuery(agent_id=agent_id)) == records


def test_queries_find_records_by_seq_after_the_list_was_edited() -> None:
    # The indexes hold seqs; a record is found by its seq, not by its place, so a list edited
    # by hand (what verify exists to catch) answers queries with what it holds, never another
    # record or an IndexError.
    backend = MemoryBackend()
    a, b = AgentId.generate(), AgentId.generate()
    backend.append_audit([AuditEvent(a if i % 2 else b, "note", i, str(i)) for i in range(10)], AuditChain())
    del backend._trail.records[3]  # seq 4, an agent-a record
    by_a = backend.query_audit(AuditQuery(agent_id=a))
    assert [r.seq for r in by_a] == [2, 6, 8, 10]
    assert [r.event.details for r in by_a] == ["1", "5", "7", "9"]
    assert [r.seq for r in backend.query_audit(AuditQuery(after_seq=2))] == [3, 5, 6, 7, 8, 9, 10]


@settings(max_examples=200, deadline=None)
@given(st.lists(_operation, max_size=30))
def test_iteration_by_status_follows_saves_removes_and_slot_reuse(operations: list[tuple[Any, ...]]) -> None:
    # iter_agent_states(status=...) searches the status column: freed and reused slots must
    # never show an agent under a status it left, or a removed one.
    manager = StateManager(MemoryBackend())
    model: dict[AgentId, AgentState] = {}
    for kind, which, *rest in operations:
        agent_id = _POOL[which]
        if kind == "save" and rest[1] is None:
            state = AgentState(agent_id, **rest[0])
            manager.save_agent_state(state)
            model[agent_id] = _normalised(state)
        elif kind == "remove":
            manager.remove_agent_state(agent_id)
            model.pop(agent_id, None)
        for status in AgentStatus:
            found = [s.agent_id for s in manager.iter_agent_states(status=status, batch_size=2)]
            expected = [a for a, s in model.items() if s.status is status]
            assert sorted(found, key=str) == sorted(expected, key=str)


def _random_trail_step(rng: Any, agents: list[AgentId], clock: int) -> list[AuditEvent]:
    """Events about one second apart with jitter, now and then one from long ago."""
    events_ = []
    for i in range(rng.randrange(1, 400)):
        late = rng.random() < 0.01  # now and then a late event, with an old timestamp
        at = rng.randrange(0, 1_000) if late else clock + i + rng.randrange(-60, 60)
        events_.append(AuditEvent(rng.choice(agents), rng.choice(["a", "b", "c"]), max(0, at), ""))
    return events_


@pytest.mark.parametrize("block", [3, 1024])
def test_time_window_queries_match_a_scan_whatever_the_timestamps(
    block: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # audit_log(since=, until=) skips, by the trail's timeline, what cannot match; timestamps
    # need not grow with seq, and prunes cut the timeline's front. Every answer must equal a
    # plain filter of the records kept. Small blocks put many block edges in the way.
    import random

    from iron_runtime_state.backends.memory import trail

    monkeypatch.setattr(trail, "_BLOCK", block)
    rng = random.Random(15)
    backend = MemoryBackend()
    chain = AuditChain()
    agents = [AgentId.generate() for _ in range(4)]
    kept: list[Any] = []
    clock = 1_000
    for step in range(30):
        batch = _random_trail_step(rng, agents, clock)
        clock += len(batch)
        kept += backend.append_audit(batch, chain)
        if step % 6 == 5:
            removed = backend.prune_audit(rng.randrange(clock - 2_000, clock), chain)
            kept = kept[removed:]
        for _ in range(30):
            since = rng.choice([None, rng.randrange(0, clock + 100)])
            until = rng.choice([None, rng.randrange(0, clock + 100)])
            if since is not None and until is not None and rng.random() < 0.7:
                until = since + rng.randrange(0, 300)  # a window
            query = AuditQuery(
                agent_id=rng.choice([None, None, *agents]),
                event_type=rng.choice([None, None, "a"]),
                since=since,
                until=until,
                after_seq=rng.choice([None, rng.randrange(0, kept[-1].seq + 2)]),
                limit=rng.choice([None, 1, 100]),
            )
            expected = [
                r
                for r in kept
                if query.matches(r.seq, r.event.agent_id.as_str(), r.event.event_type, r.event.timestamp)
            ][: query.limit]
            assert backend.query_audit(query) == expected, query


def test_a_time_query_on_a_list_edited_by_hand_answers_with_what_it_holds() -> None:
    backend = MemoryBackend()
    agent_id = AgentId.generate()
    backend.append_audit([AuditEvent(agent_id, "note", 100 + i, str(i)) for i in range(3_000)], AuditChain())
    del backend._trail.records[2_500]  # seq 2501, timestamp 2600
    del backend._trail.records[:10]
    found = backend.query_audit(AuditQuery(since=2_590, until=2_610))
    assert [r.event.timestamp for r in found] == [t for t in range(2_590, 2_611) if t != 2_600]
    assert [r.seq for r in backend.query_audit(AuditQuery(until=112))] == [11, 12, 13]
