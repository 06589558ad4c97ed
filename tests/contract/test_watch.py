"""The change feed, ``watch()``, on every store and through both managers.

Records come in ``seq`` order, each once; a consumer that stops and resumes from the last
``seq`` it handled misses nothing and repeats nothing; filters; ``idle_timeout``; records
appended by another manager (another process, for the shared stores) arrive. Delivery latency
is measured by ``bench/bench_watch.py``, not asserted here beyond "promptly".
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable

import pytest

from iron_runtime_state import (
    AgentId,
    AgentState,
    AgentStatus,
    AuditEvent,
    AuditRecord,
    BudgetExceeded,
    IdError,
    StateManager,
    ValidationError,
)

from .stores import StoreHandle


def head(manager: StateManager) -> int:
    """The seq of the newest record (0 for an empty trail)."""
    return manager.audit_checkpoint().seq


def later(delay: float, action: Callable[[], object]) -> threading.Thread:
    """Run ``action`` in a thread after ``delay`` seconds (the consumer is waiting by then)."""

    def run() -> None:
        time.sleep(delay)
        action()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def append(
    manager: StateManager, agent_id: AgentId, n: int, kind: str = "tool_call", pause: float = 0.0
) -> None:
    for i in range(n):
        manager.save_audit_log(AuditEvent(agent_id, kind, details=f"{kind} {i}"))
        if pause:
            time.sleep(pause)


def test_records_arrive_in_seq_order_each_once(store: StoreHandle, manager: StateManager) -> None:
    agent_id = AgentId.generate()
    append(manager, agent_id, 3)  # before: not wanted
    start = head(manager)
    writer = store.open()
    producer = later(0.2, lambda: append(writer, agent_id, 25, pause=0.005))
    got = list(itertools.islice(manager.watch(after_seq=start, idle_timeout=10), 25))
    producer.join()
    assert [r.seq for r in got] == sorted({r.seq for r in got})
    assert got == manager.audit_log(after_seq=start)
    assert [r.details for r in got] == [f"tool_call {i}" for i in range(25)]


def test_a_batch_appended_at_once_arrives_whole_and_in_order(
    store: StoreHandle, manager: StateManager
) -> None:
    agent_id = AgentId.generate()
    start = head(manager)
    writer = store.open()
    batch = [AuditEvent(agent_id, "step", details=str(i)) for i in range(1200)]  # past one page
    producer = later(0.2, lambda: writer.save_audit_logs(batch))
    got = list(itertools.islice(manager.watch(after_seq=start, idle_timeout=10), 1200))
    producer.join()
    assert [r.details for r in got] == [str(i) for i in range(1200)]
    assert all(a.seq < b.seq for a, b in itertools.pairwise(got))


def test_from_now_on_by_default(manager: StateManager) -> None:
    agent_id = AgentId.generate()
    append(manager, agent_id, 5, kind="old")
    producer = later(0.5, lambda: append(manager, agent_id, 1, kind="new"))
    got = list(itertools.islice(manager.watch(idle_timeout=10), 1))
    producer.join()
    assert [r.event_type for r in got] == ["new"]


def test_resume_after_the_consumer_stops_misses_nothing_and_repeats_nothing(
    store: StoreHandle, manager: StateManager
) -> None:
    agent_id = AgentId.generate()
    start = head(manager)
    append(manager, agent_id, 10)
    first = manager.watch(after_seq=start, idle_timeout=5)
    handled = list(itertools.islice(first, 4))
    first.close()  # the consumer stops (a restart) after handling 4
    writer = store.open()
    append(writer, agent_id, 10)  # while nobody follows
    consumer = store.open()  # a new consumer, as after a restart
    resumed = list(consumer.watch(after_seq=handled[-1].seq, idle_timeout=0.5))
    seqs = [r.seq for r in handled + resumed]
    assert seqs == [r.seq for r in manager.audit_log(after_seq=start)]
    assert len(seqs) == len(set(seqs)) == 20


def test_filters_by_agent_and_event_type(store: StoreHandle, manager: StateManager) -> None:
    a, b = AgentId.generate(), AgentId.generate()
    start = head(manager)
    writer = store.open()
    for i in range(30):
        writer.save_audit_log(AuditEvent(a if i % 2 else b, "even" if i % 3 else "third", details=str(i)))
    mine = list(manager.watch(after_seq=start, agent_id=a, idle_timeout=0.3))
    assert [r.agent_id for r in mine] == [a] * 15
    assert [int(r.details) for r in mine] == list(range(1, 30, 2))
    thirds = list(manager.watch(after_seq=start, event_type="third", idle_timeout=0.3))
    assert [int(r.details) for r in thirds] == list(range(0, 30, 3))
    both = list(manager.watch(after_seq=start, agent_id=str(a), event_type="third", idle_timeout=0.3))
    assert [int(r.details) for r in both] == [3, 9, 15, 21, 27]


def test_a_filter_waits_past_records_that_do_not_match(store: StoreHandle, manager: StateManager) -> None:
    a, b = AgentId.generate(), AgentId.generate()
    writer = store.open()

    def noise_then_match() -> None:
        append(writer, b, 40)  # none of them match: the feed must not hand them out or stall
        append(writer, a, 1, kind="wanted")

    producer = later(0.3, noise_then_match)
    got = list(itertools.islice(manager.watch(agent_id=a, idle_timeout=10), 1))
    producer.join()
    assert [(r.agent_id, r.event_type) for r in got] == [(a, "wanted")]


def test_idle_timeout_ends_the_feed(manager: StateManager) -> None:
    started = time.monotonic()
    assert list(manager.watch(idle_timeout=0.4)) == []
    took = time.monotonic() - started
    assert 0.35 <= took < 3.0, took


def test_idle_timeout_counts_from_the_last_record(manager: StateManager) -> None:
    agent_id = AgentId.generate()
    producer = later(0.3, lambda: append(manager, agent_id, 3, pause=0.3))
    started = time.monotonic()
    got = list(manager.watch(idle_timeout=0.8))
    producer.join()
    assert len(got) == 3
    assert time.monotonic() - started >= 0.3 + 0.6 + 0.8 - 0.1


def test_events_the_library_writes_arrive_too(manager: StateManager) -> None:
    agent_id = AgentId.generate()
    manager.save_agent_state(AgentState(agent_id, AgentStatus.RUNNING, budget_limit=1.0))
    start = head(manager)

    def work() -> None:
        manager.record_pii_detection(agent_id, 2)
        with pytest.raises(BudgetExceeded):
            manager.record_spend(agent_id, 5.0)
        manager.set_status(agent_id, AgentStatus.STOPPED)

    producer = later(0.2, work)
    got = list(itertools.islice(manager.watch(after_seq=start, agent_id=agent_id, idle_timeout=10), 3))
    producer.join()
    assert [r.event_type for r in got] == ["pii_detected", "budget_exceeded", "status_changed"]


def test_a_record_appended_elsewhere_arrives_promptly(store: StoreHandle, manager: StateManager) -> None:
    agent_id = AgentId.generate()
    writer = store.open()  # another manager (for shared stores: as another process would)
    start = head(manager)
    sent: list[float] = []

    def produce() -> None:
        sent.append(time.monotonic())
        writer.save_audit_log(AuditEvent(agent_id, "ping"))

    producer = later(0.5, produce)
    got: list[AuditRecord] = []
    for record in manager.watch(after_seq=start, idle_timeout=10):
        got.append(record)
        break
    received = time.monotonic()
    producer.join()
    assert [r.event_type for r in got] == ["ping"]
    assert received - sent[0] < 1.0  # the bench measures the real figure (tens of ms)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"after_seq": -1}, ValidationError),
        ({"idle_timeout": -1.0}, ValidationError),
        ({"idle_timeout": float("nan")}, ValidationError),
        ({"agent_id": "bob"}, IdError),
        ({"event_type": "Not A Type"}, ValidationError),
    ],
)
def test_bad_arguments_are_refused(
    manager: StateManager, kwargs: dict[str, object], error: type[Exception]
) -> None:
    with pytest.raises(error):
        next(iter(manager.watch(**kwargs)))  # type: ignore[arg-type]
