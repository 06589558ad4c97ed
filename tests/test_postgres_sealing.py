"""Spend records sealed by the PostgreSQL server (unkeyed chains) or by the client (keyed ones).

On an unkeyed chain the ``spend`` and ``commit_hold`` functions hash the ledger's record
themselves, under the audit head's lock (``seal`` and ``seal_spend`` in the schema): these tests
check that the server's hash is byte for byte :meth:`AuditChain.seal`'s for every character a
``text`` can hold, that concurrent writers (threads and processes, unkeyed and keyed) leave a
chain that verifies with every spend recorded once, that no unkeyed writer ever seals again, and
that a head that went back is still recorded (``audit_rewound``) before the next spend.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from json.encoder import encode_basestring
from typing import Any

import pytest

from iron_runtime_state import AgentId, AgentState, AgentStatus, Reservation, StateManager
from iron_runtime_state.audit_chain import GENESIS_HASH, AuditChain
from iron_runtime_state.backends.base import AuditQuery

from .postgres_server import PostgresServer, new_schema

pytest.importorskip("psycopg")

from iron_runtime_state.backends.postgres import PostgresBackend, open_postgres, sealing

KEY = b"s" * 32
T0 = 1_790_000_000
#: Characters per ``details`` text when sweeping every code point.
CHUNK = 2048


@pytest.fixture
def schema(postgres_server: PostgresServer) -> Iterator[str]:
    name = new_schema()
    try:
        yield name
    finally:
        postgres_server.drop_schema(name)


@pytest.fixture
def url(postgres_server: PostgresServer, schema: str) -> str:
    with StateManager.from_url(postgres_server.url(schema=schema)) as manager:
        manager.stats()  # creates the schema
    return postgres_server.url(schema=schema)


def _every_character() -> list[str]:
    """Every code point a PostgreSQL ``text`` can hold (not NUL, not a surrogate), in chunks."""
    points = [c for c in range(1, 0x110000) if not 0xD800 <= c <= 0xDFFF]
    return ["".join(map(chr, points[i : i + CHUNK])) for i in range(0, len(points), CHUNK)]


# -- the server's hash is AuditChain.seal's ------------------------------------------------------


def test_to_json_escapes_every_character_as_encode_basestring(postgres_server: PostgresServer) -> None:
    """One character per text for the first 0x3000 code points (every escape, DEL, the C1
    controls, Latin, U+2028/2029), then every code point up to U+10FFFF in chunks."""
    singles = [chr(c) for c in range(1, 0x3000) if not 0xD800 <= c <= 0xDFFF]
    texts = singles + _every_character()
    found = postgres_server.execute("SELECT to_json(t)::text FROM unnest(%s::text[]) AS t", (texts,))
    for text, (escaped,) in zip(texts, found, strict=True):
        assert escaped == encode_basestring(text), (text[:8], escaped[:40])
    assert len(found) == len(texts)


def test_the_servers_seal_is_the_chains_for_every_character(
    postgres_server: PostgresServer, url: str, schema: str
) -> None:
    chain = AuditChain()
    texts = [
        "",
        '{"amount":250000,"labels":{"team":"support"}}',
        '\x01\x1f\x7f"\\/\b\f\n\r\t \u0080\u00e9\u2028\u2029\ufeff\uffff\U0001f600\U0010ffff',
        *_every_character(),
    ]
    prev, agent = "ab" * 32, AgentId.generate().as_str()
    found = postgres_server.execute(
        f'SELECT "{schema}".seal(%s, 1000 + n, %s, %s, %s, t) '
        "FROM unnest(%s::text[]) WITH ORDINALITY AS x(t, n) ORDER BY n",
        (prev, agent, "spend", T0, texts),
    )
    expected = [chain.seal(prev, 1000 + n, agent, "spend", T0, text) for n, text in enumerate(texts, 1)]
    assert [row[0] for row in found] == expected


# -- concurrent writers leave a chain that verifies -----------------------------------------------


def _check_trail(url: str, key: bytes | str | None, agents: list[AgentId], spends: int) -> None:
    """The chain verifies, each spend is one record and one ledger row, and they add up."""
    with StateManager.from_url(url, audit_key=key) as manager:
        assert manager.verify_audit_log().ok
        backend = manager.backend
        records = backend.query_audit(AuditQuery(event_type="spend"))
        assert len(records) == spends
        total = sum(json.loads(r.event.details)["amount"] for r in records)
        spent = sum(manager.get_agent_state(a).budget_spent for a in agents)
        assert total == pytest.approx(spent)


@pytest.mark.parametrize("key", [None, KEY], ids=["unkeyed", "keyed"])
def test_threads_spending_at_once_leave_a_chain_that_verifies(
    url: str, key: bytes | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    locked: list[int] = []
    original = sealing.SealOps._locked

    def counted(self: Any, *args: Any) -> Any:
        locked.append(1)
        return (yield from original(self, *args))

    monkeypatch.setattr(sealing.SealOps, "_locked", counted)
    threads_n, per_thread = 8, 40
    with StateManager.from_url(url, audit_key=key, max_connections=threads_n) as manager:
        manager.set_budget("team:s", limit=None)
        agents = [AgentId.generate() for _ in range(threads_n)]
        manager.save_agent_states(
            [AgentState(a, AgentStatus.RUNNING, budget_limit=1e6, budget_scopes=("team:s",)) for a in agents]
        )
        for agent in agents:  # learn the scopes (the first spend of each takes the general path)
            manager.record_spend(agent, 0.01)
        barrier = threading.Barrier(threads_n)
        errors: list[BaseException] = []

        def work(agent: AgentId) -> None:
            try:
                barrier.wait()
                for i in range(per_thread):
                    if i % 4 == 3:
                        hold = manager.reserve_budget(agent, 0.5)
                        assert isinstance(hold, Reservation)
                        manager.commit_reservation(hold, 0.25)
                    else:
                        manager.record_spend(agent, 0.01)
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        workers = [threading.Thread(target=work, args=(a,)) for a in agents]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        assert not errors, errors
        assert manager.get_budget("team:s").spent == pytest.approx(
            sum(manager.get_agent_state(a).budget_spent for a in agents)
        )
    _check_trail(url, key, agents, threads_n * (per_thread + 1))
    if key is None:
        assert not locked  # sealed by the server: no writer ever sealed again
    # (keyed: writers that interleave may fall back to the locked transaction; correct either way)


_WORKER = r"""
import sys
from iron_runtime_state import AgentId, AgentState, AgentStatus, StateManager
url, key, n = sys.argv[1], sys.argv[2] or None, int(sys.argv[3])
with StateManager.from_url(url, audit_key=key) as manager:
    agent = AgentId.generate()
    manager.save_agent_state(AgentState(agent, AgentStatus.RUNNING, budget_limit=1e6))
    print(agent.as_str(), flush=True)
    sys.stdin.readline()
    for _ in range(n):
        manager.record_spend(agent, 0.01)
    print("done", flush=True)
"""


@pytest.mark.parametrize("key", [None, KEY], ids=["unkeyed", "keyed"])
def test_processes_spending_at_once_leave_a_chain_that_verifies(url: str, key: bytes | None) -> None:
    processes, per_process = 4, 150
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, url, (key or b"").decode(), str(per_process)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    agents = []
    for proc in procs:
        assert proc.stdout is not None
        agents.append(AgentId(proc.stdout.readline().strip()))
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        assert out.strip() == "done"
    _check_trail(url, key, agents, processes * per_process)


# -- a head that went back ---------------------------------------------------------------------


def test_a_server_sealed_spend_after_the_head_went_back_records_the_rewind_first(
    postgres_server: PostgresServer, url: str, schema: str
) -> None:
    backend = open_postgres(url)
    assert isinstance(backend, PostgresBackend)
    try:
        chain = AuditChain()
        agent = AgentId.generate()
        backend.save(AgentState(agent, AgentStatus.RUNNING, budget_limit=100.0), time.time())
        for _ in range(3):
            backend.record_spend(agent, 1_000_000, time.time(), chain)
        records = backend.query_audit(AuditQuery(event_type="spend"))
        kept = records[0]
        # A restore: the newest records are gone and the head is back at the first spend.
        postgres_server.execute(f'DELETE FROM "{schema}".audit WHERE seq > %s', (kept.seq,))
        postgres_server.execute(f'DELETE FROM "{schema}".ledger WHERE seq > %s', (kept.seq,))
        postgres_server.execute(
            f'UPDATE "{schema}".audit_chain SET head_seq = %s, head_hash = %s', (kept.seq, kept.hash)
        )
        result = backend.record_spend(agent, 1_000_000, time.time(), chain)
        kinds = [r.event_type for r in backend.query_audit(AuditQuery(after_seq=kept.seq))]
        assert kinds == ["audit_rewound", "spend"]
        assert [r.event_type for r in result.records] == ["spend"]
        # The next spend is sealed by the server again, after the new head.
        after = backend.record_spend(agent, 1_000_000, time.time(), chain).records[0]
        assert after.prev_hash == result.records[0].hash
    finally:
        backend.close()
    with StateManager.from_url(url) as manager:
        assert manager.verify_audit_log().ok


def test_the_server_seals_after_the_genesis_hash_on_a_new_trail(url: str) -> None:
    backend = open_postgres(url)
    try:
        agent = AgentId.generate()
        backend.save(AgentState(agent, AgentStatus.RUNNING), time.time())
        record = backend.record_spend(agent, 5, time.time(), AuditChain()).records[0]
        assert (record.seq, record.prev_hash) == (1, GENESIS_HASH)
        assert record.hash == AuditChain().seal(
            GENESIS_HASH, 1, agent.as_str(), "spend", record.timestamp, record.event.details
        )
    finally:
        backend.close()
