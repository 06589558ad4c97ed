"""``watch()`` on Redis: a consumer resumes across a restart of the server with no gap and no
repeat, and waits on the server (``XREAD BLOCK``), not by polling.

The contract suite (tests/contract/test_watch.py) covers the feed on every store; what only
Redis has is a server that goes away and comes back while a consumer waits on it (the server
here keeps its data: append-only file, fsync always, as a production server would), and how
``wait_audit`` waits: one blocking read at a time, a second at most, on a connection nothing else
waits on, woken within a millisecond or so by an append or a change's event.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import statistics
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from iron_runtime_state import (
    AgentId,
    AgentState,
    AgentStatus,
    AsyncStateManager,
    AuditEvent,
    AuditRecord,
    BackendError,
    BudgetExceeded,
    StateManager,
)
from iron_runtime_state.backends.redis import RedisLayout

from .contract.facade import LoopThread
from .redis_servers import RedisCluster, RedisServer, namespace, redis_available, short_tmpdir

pytestmark = pytest.mark.skipif(not redis_available(), reason="redis-server is not installed")


@pytest.fixture
def durable_server() -> Iterator[RedisServer]:
    """A redis-server of this test's own that keeps its data across a restart."""
    folder = short_tmpdir("iron-watch-")
    server = RedisServer(folder, extra=["--appendonly", "yes", "--appendfsync", "always"]).start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


def follow(manager: StateManager, after: int, want: int, got: list[AuditRecord], errors: list[str]) -> None:
    """What a consumer does: follow the feed, and on a store error resume from the last seq handled."""
    deadline = time.monotonic() + 60
    last = after
    while len(got) < want and time.monotonic() < deadline:
        try:
            for record in manager.watch(after_seq=last, idle_timeout=1.0):
                got.append(record)
                last = record.seq
                if len(got) >= want:
                    return
        except BackendError as exc:
            errors.append(type(exc).__name__)
            time.sleep(0.2)


def append_until_it_works(manager: StateManager, event: AuditEvent) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            manager.save_audit_log(event)
            return
        except BackendError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.parametrize("api", ["sync", "async"])
def test_a_consumer_resumes_across_a_server_restart(durable_server: RedisServer, api: str) -> None:
    url = f"{durable_server.url}?namespace={namespace()}"
    loop = LoopThread() if api == "async" else None
    consumer: StateManager = (
        loop.facade(AsyncStateManager.from_url(url, timeout=1.0))
        if loop
        else StateManager.from_url(url, timeout=1.0)
    )
    writer = StateManager.from_url(url, timeout=1.0)
    try:
        agent_id = AgentId.generate()
        start = writer.audit_checkpoint().seq
        got: list[AuditRecord] = []
        errors: list[str] = []
        thread = threading.Thread(target=follow, args=(consumer, start, 20, got, errors), daemon=True)
        thread.start()
        for i in range(10):
            writer.save_audit_log(AuditEvent(agent_id, "before", details=str(i)))
        time.sleep(0.5)  # the consumer is waiting on the server
        durable_server.restart(kill=True)
        for i in range(10):
            append_until_it_works(writer, AuditEvent(agent_id, "after", details=str(i)))
        thread.join(60)
        assert not thread.is_alive()
        stored = writer.audit_log(after_seq=start)
        assert [r.seq for r in got] == [r.seq for r in stored]
        assert [(r.event_type, r.details) for r in got] == [
            *(("before", str(i)) for i in range(10)),
            *(("after", str(i)) for i in range(10)),
        ]
    finally:
        writer.close()
        consumer.close()
        if loop is not None:
            loop.close()


# -- wait_audit: XREAD BLOCK on the trail ----------------------------------------------------------

Target = RedisServer | RedisCluster


@pytest.fixture(params=["redis", "redis-cluster"])
def target(request: pytest.FixtureRequest) -> Target:
    """The session's standalone server, then its cluster."""
    name = "redis_server" if request.param == "redis" else "redis_cluster"
    found: Target = request.getfixturevalue(name)
    return found


def trail_server(target: Target, ns: str) -> RedisServer:
    """The server that holds the namespace's audit trail (a cluster's: the master of its slot)."""
    if isinstance(target, RedisCluster):
        return target.master_of_slot(RedisLayout(ns).audit_slot)
    return target


def xreads(server: RedisServer) -> int:
    """How many XREAD commands the server ran so far."""
    stats: dict[str, Any] = server.client().info("commandstats")
    return int(stats.get("cmdstat_xread", {}).get("calls", 0))


def test_a_wait_blocks_on_the_server_instead_of_polling(target: Target, ns: str) -> None:
    manager = StateManager.from_url(f"{target.url}?namespace={ns}")
    try:
        backend = manager.backend
        head = manager.audit_checkpoint().seq
        server = trail_server(target, ns)
        before = xreads(server)
        started = time.monotonic()
        assert backend.wait_audit(head, 0.8) is False
        assert time.monotonic() - started >= 0.75
        assert xreads(server) - before == 1  # one blocking read, not a poll every 50 ms
        # A record past after_seq already stored: at once, blocking or not.
        manager.save_audit_log(AuditEvent(AgentId.generate(), "x"))
        started = time.monotonic()
        assert backend.wait_audit(head, 5) is True
        assert backend.wait_audit(head, 0) is True
        assert time.monotonic() - started < 0.5
        assert backend.wait_audit(head + 1, 0) is False
    finally:
        manager.close()


def test_a_wait_ends_after_at_most_a_second_per_command(target: Target, ns: str) -> None:
    """A long wait is made of bounded blocks (a second at most, half the socket timeout if less),
    so no connection is tied up, nor a reply awaited, past its timeout."""
    manager = StateManager.from_url(f"{target.url}?namespace={ns}", timeout=0.8)  # socket 0.4 s
    try:
        head = manager.audit_checkpoint().seq
        server = trail_server(target, ns)
        before = xreads(server)
        assert manager.backend.wait_audit(head, 1.0) is False
        assert 4 <= xreads(server) - before <= 6  # blocks of 0.2 s
    finally:
        manager.close()


def _latencies(manager: StateManager, writer: StateManager, agent: AgentId, records: int) -> list[float]:
    """Per record: from the writer's call returning to the waiting consumer having the record;
    every other record is the event of a change (a refused spend, through the group's outbox)."""
    start = writer.audit_checkpoint().seq
    got: list[float] = []
    ready = threading.Event()

    def consume() -> None:
        feed = manager.watch(after_seq=start, agent_id=agent, idle_timeout=10)
        ready.set()
        for _ in feed:
            got.append(time.perf_counter())
            if len(got) >= records:
                return

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    ready.wait(10)
    time.sleep(0.2)
    stored: list[float] = []
    for i in range(records):
        time.sleep(0.01)
        if i % 2:
            with contextlib.suppress(BudgetExceeded):
                writer.record_spend(agent, 1.0)
        else:
            writer.save_audit_log(AuditEvent(agent, "tick", details=str(i)))
        stored.append(time.perf_counter())
    thread.join(20)
    assert len(got) == records
    return [a - b for a, b in zip(got, stored, strict=True)]


@pytest.mark.parametrize("api", ["sync", "async"])
def test_a_waiting_consumer_has_each_record_within_50_ms(target: Target, ns: str, api: str) -> None:
    url = f"{target.url}?namespace={ns}"
    loop = LoopThread() if api == "async" else None
    consumer: StateManager = (
        loop.facade(AsyncStateManager.from_url(url)) if loop else StateManager.from_url(url)
    )
    writer = StateManager.from_url(url)
    try:
        agent = AgentId.generate()
        writer.save_agent_state(AgentState(agent, AgentStatus.RUNNING, budget_limit=0.0))
        latencies = _latencies(consumer, writer, agent, 40)
        assert statistics.median(latencies) <= 0.050  # issue 19 (measured: under a millisecond)
    finally:
        writer.close()
        consumer.close()
        if loop is not None:
            loop.close()


def test_an_async_wait_holds_up_no_other_call(target: Target, ns: str) -> None:
    """The asyncio wait runs on a connection of its own: the calls pipelined on the shared one
    go on meanwhile; a wait given up (cancelled) closes its connection, and the next one works."""
    url = f"{target.url}?namespace={ns}"

    async def scenario() -> None:
        manager = AsyncStateManager.from_url(url)
        try:
            agent = AgentId.generate()
            await manager.save_agent_state(AgentState(agent, AgentStatus.RUNNING))
            head = (await manager.audit_checkpoint()).seq
            waits = [asyncio.create_task(manager.backend.call("wait_audit", head, 1.0)) for _ in range(3)]
            await asyncio.sleep(0.1)
            started = time.monotonic()
            for _ in range(20):
                assert await manager.get_agent_state(agent) is not None
            assert time.monotonic() - started < 0.5
            assert not any(wait.done() for wait in waits)
            waits[0].cancel()
            await manager.save_audit_log(AuditEvent(agent, "x"))
            assert await asyncio.wait_for(asyncio.gather(*waits[1:]), 2) == [True, True]
            assert await manager.backend.call("wait_audit", head, 1.0) is True
            assert await manager.backend.call("wait_audit", head + 1, 0.2) is False
        finally:
            await manager.close()

    asyncio.run(scenario())


def test_a_sync_wait_holds_up_no_other_thread(target: Target, ns: str) -> None:
    manager = StateManager.from_url(f"{target.url}?namespace={ns}")
    try:
        agent = AgentId.generate()
        manager.save_agent_state(AgentState(agent, AgentStatus.RUNNING))
        head = manager.audit_checkpoint().seq
        waited: list[bool] = []
        thread = threading.Thread(target=lambda: waited.append(manager.backend.wait_audit(head, 1.0)))
        thread.start()
        time.sleep(0.1)
        started = time.monotonic()
        for _ in range(20):
            manager.release_reservation(manager.reserve_budget(agent, 0.5))
        assert time.monotonic() - started < 0.5
        assert thread.is_alive()
        thread.join(5)
        assert waited == [False]  # holds write no event
    finally:
        manager.close()
