"""``watch()`` on PostgreSQL: ``wait_audit`` blocks on ``LISTEN/NOTIFY`` (backends/postgres/listen.py).

Every append notifies the schema's channel with the new head in its own transaction; a waiting
consumer, sync or asyncio, is woken by an append made by another process within 50 ms (median);
a wait with nothing new returns ``False`` after its timeout and holds no pool connection; a
server restart between waits, or during one, costs at most that wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from iron_runtime_state import AgentId, AsyncStateManager, AuditEvent, BackendUnavailable, StateManager

from .postgres_server import PostgresServer, new_schema

pytest.importorskip("psycopg")

from iron_runtime_state.backends.postgres.trail import audit_channel

ROOT = Path(__file__).resolve().parents[1]
EVENTS = 40

#: Appends EVENTS records, 10 to 20 ms apart, printing "<seq> <wall clock>" after each one.
PRODUCER = textwrap.dedent(
    """
    import random, sys, time
    from iron_runtime_state import AgentId, AuditEvent, StateManager
    url, events = sys.argv[1], int(sys.argv[2])
    sys.stdin.readline()  # the consumer is waiting
    agent = AgentId.generate()
    with StateManager.from_url(url) as manager:
        manager.audit_checkpoint()  # connected, schema ready: the first append is not slower
        for i in range(events):
            time.sleep(random.uniform(0.01, 0.02))
            record = manager.save_audit_log(AuditEvent(agent, "tick", details=str(i)))
            print(record.seq, time.time(), flush=True)
    """
)


@pytest.fixture
def url(postgres_server: PostgresServer) -> Iterator[str]:
    schema = new_schema()
    yield postgres_server.url(schema=schema)
    postgres_server.drop_schema(schema)


@contextlib.contextmanager
def producer(url: str) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(
        [sys.executable, "-c", PRODUCER, url, str(EVENTS)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def latencies(process: subprocess.Popen[str], received: dict[int, float]) -> list[float]:
    out, _ = process.communicate(timeout=60)
    stored = {int(seq): float(at) for seq, at in (line.split() for line in out.splitlines())}
    assert sorted(received) == sorted(stored)
    return [received[seq] - at for seq, at in stored.items()]


def test_every_append_notifies_the_new_head_on_commit(url: str, postgres_server: PostgresServer) -> None:
    with StateManager.from_url(url) as manager, postgres_server.connect() as listener:
        channel = audit_channel(f'"{manager.backend.schema}"')  # type: ignore[attr-defined]
        assert channel == f"iron_audit_{manager.backend.schema}"  # type: ignore[attr-defined]
        listener.execute(f'LISTEN "{channel}"')
        record = manager.save_audit_log(AuditEvent(AgentId.generate(), "tick"))
        notes = list(listener.notifies(timeout=2, stop_after=1))
        assert [(n.channel, n.payload) for n in notes] == [(channel, str(record.seq))]


def test_a_long_schema_name_gets_a_channel_postgresql_accepts() -> None:
    channel = audit_channel(f'"{"s" * 63}"')
    assert len(channel) <= 63
    assert channel.startswith("iron_audit_")
    assert channel != audit_channel(f'"{"s" * 62}t"')


def test_a_sync_consumer_has_another_process_s_records_within_50_ms(url: str) -> None:
    received: dict[int, float] = {}
    with StateManager.from_url(url) as consumer, producer(url) as process:
        feed = consumer.watch(idle_timeout=30)
        started = threading.Event()

        def consume() -> None:
            started.set()
            for record in feed:
                received[record.seq] = time.time()
                if len(received) >= EVENTS:
                    return

        thread = threading.Thread(target=consume, daemon=True)
        thread.start()
        started.wait()
        time.sleep(0.3)  # the consumer is in wait_audit
        assert process.stdin is not None
        process.stdin.write("go\n")
        process.stdin.flush()
        thread.join(60)
        median = statistics.median(latencies(process, received))
    assert median < 0.050, f"median {median * 1000:.1f} ms"


def test_an_async_consumer_has_another_process_s_records_within_50_ms(url: str) -> None:
    received: dict[int, float] = {}

    async def main() -> list[float]:
        async with AsyncStateManager.from_url(url) as consumer:
            with producer(url) as process:

                async def consume() -> None:
                    async for record in consumer.watch(idle_timeout=30):
                        received[record.seq] = time.time()
                        if len(received) >= EVENTS:
                            return

                task = asyncio.create_task(consume())
                await asyncio.sleep(0.3)
                assert process.stdin is not None
                process.stdin.write("go\n")
                process.stdin.flush()
                await asyncio.wait_for(task, 60)
                return latencies(process, received)

    median = statistics.median(asyncio.run(main()))
    assert median < 0.050, f"median {median * 1000:.1f} ms"


def test_a_wait_with_nothing_new_returns_false_after_its_timeout(url: str) -> None:
    with StateManager.from_url(url) as manager:
        backend = manager.backend
        head = backend.audit_marks().head[0]
        started = time.monotonic()
        assert backend.wait_audit(head, 0.3) is False
        assert 0.29 <= time.monotonic() - started < 1.0
        manager.save_audit_log(AuditEvent(AgentId.generate(), "tick"))
        started = time.monotonic()
        assert backend.wait_audit(head, 5) is True  # already past: at once
        assert time.monotonic() - started < 0.5
        assert list(manager.watch(after_seq=head + 1, idle_timeout=0.2)) == []

    async def main() -> None:
        async with AsyncStateManager.from_url(url) as manager:
            head = (await manager.backend.call("audit_marks")).head[0]
            started = time.monotonic()
            assert await manager.backend.call("wait_audit", head, 0.3) is False
            assert 0.29 <= time.monotonic() - started < 1.0

    asyncio.run(main())


def test_a_wait_holds_no_pool_connection(url: str) -> None:
    """With a pool of one connection, calls go on while another thread waits."""
    with StateManager.from_url(url, max_connections=1) as manager:
        head = manager.backend.audit_marks().head[0]
        waiter = threading.Thread(target=manager.backend.wait_audit, args=(head, 1.5))
        waiter.start()
        time.sleep(0.1)
        started = time.monotonic()
        for _ in range(5):
            manager.audit_checkpoint()
        assert time.monotonic() - started < 0.5
        waiter.join()


def test_waits_survive_a_server_restart(pg_server: PostgresServer) -> None:
    url = pg_server.url(schema="wrestart")
    with StateManager.from_url(url, timeout=2) as consumer, StateManager.from_url(url, timeout=2) as producer:
        head = consumer.backend.audit_marks().head[0]
        assert consumer.backend.wait_audit(head, 0.1) is False  # its listening connection is open
        pg_server.restart()
        # Between waits: the next wait finds its connection dead, reconnects and listens again.
        assert consumer.backend.wait_audit(head, 0.1) is False
        threading.Timer(0.2, producer_append, (producer,)).start()
        started = time.monotonic()
        assert consumer.backend.wait_audit(head, 5) is True
        assert time.monotonic() - started < 2

        # During a wait: that wait fails, the next one works.
        head += 1
        threading.Timer(0.2, pg_server.stop, ("immediate",)).start()
        with pytest.raises(BackendUnavailable):
            consumer.backend.wait_audit(head, 5)
        pg_server.start()
        assert consumer.backend.wait_audit(head, 0.1) is False
        producer_append_when_up(producer)
        assert consumer.backend.wait_audit(head, 1) is True

    async def main() -> None:
        async with AsyncStateManager.from_url(url, timeout=2) as manager:
            head = (await manager.backend.call("audit_marks")).head[0]
            assert await manager.backend.call("wait_audit", head, 0.1) is False
            pg_server.restart()
            assert await manager.backend.call("wait_audit", head, 0.1) is False
            await manager.save_audit_log(AuditEvent(AgentId.generate(), "tick"))
            assert await manager.backend.call("wait_audit", head, 1) is True

    asyncio.run(main())


def producer_append(manager: StateManager) -> None:
    manager.save_audit_log(AuditEvent(AgentId.generate(), "tick"))


def producer_append_when_up(manager: StateManager) -> None:
    deadline = time.monotonic() + 15
    while True:
        try:
            return producer_append(manager)
        except BackendUnavailable:
            assert time.monotonic() < deadline
            time.sleep(0.05)
