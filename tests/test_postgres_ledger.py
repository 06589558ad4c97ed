"""The PostgreSQL store's spend ledger and thresholds, where only this store can be looked at: the
ledger's index table against the chained records, pruning, reports in SQL against reading the
records, the indexes a report uses, a killed connection in the middle of a settle, and a schema
written by 0.6.0 (run from a git worktree of that release) migrating. The shared behaviour is in
the contract suite (``tests/contract -k postgres``).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from iron_runtime_state import (
    AgentId,
    AgentState,
    AgentStatus,
    Reservation,
    SchemaError,
    StateManager,
    events,
)
from iron_runtime_state.audit_chain import AuditChain
from iron_runtime_state.backends.base import AuditQuery, Backend
from iron_runtime_state.ledger import SpendNote, SpendQuery, SpendTotal, entry_of
from iron_runtime_state.thresholds import DEFAULT_THRESHOLDS

from .postgres_server import PostgresServer, new_schema

pytest.importorskip("psycopg")

import psycopg

from iron_runtime_state.backends.postgres import PostgresBackend, open_postgres
from iron_runtime_state.backends.postgres import schema as layout
from iron_runtime_state.backends.postgres.sync import execute

ROOT = Path(__file__).resolve().parents[1]
#: The release whose schema (version 1) this version migrates: 0.6.0.
RELEASE_0_6 = "8e46e75"
DAY = 86_400
T0 = 1_790_000_000  # 2026-09-21, a Monday
KEY = b"k" * 32


@pytest.fixture
def schema(postgres_server: PostgresServer) -> Iterator[str]:
    name = new_schema()
    try:
        yield name
    finally:
        postgres_server.drop_schema(name)


@pytest.fixture
def url(postgres_server: PostgresServer, schema: str) -> str:
    return postgres_server.url(schema=schema)


@pytest.fixture
def backend(url: str) -> Iterator[PostgresBackend]:
    store = open_postgres(url)
    try:
        yield store
    finally:
        store.close()


def _agent(backend: Backend, **fields: Any) -> AgentId:
    agent_id = AgentId.generate()
    backend.save(AgentState(agent_id, AgentStatus.RUNNING, **fields), time.time())
    return agent_id


def _ledger(server: PostgresServer, schema: str) -> list[tuple[Any, ...]]:
    return server.execute(
        "SELECT seq, ts, agent_id, amount, scopes, coalesce(labels, '{}'), model, input_tokens, "
        f"output_tokens, cached_input_tokens, coalesce(tags, '{{}}') FROM \"{schema}\".ledger ORDER BY seq"
    )


def _spend_records(backend: Backend) -> list[tuple[Any, ...]]:
    """The ``spend`` records, as the ledger rows should hold them."""
    records = backend.query_audit(AuditQuery(event_type="spend"))
    rows = []
    for record in records:
        e = entry_of(record)
        rows.append(
            (
                e.seq,
                e.timestamp,
                e.agent_id,
                e.amount,
                list(e.scopes),
                dict(e.labels),
                e.model,
                e.input_tokens,
                e.output_tokens,
                e.cached_input_tokens,
                dict(e.tags),
            )
        )
    return rows


def _spent(server: PostgresServer, schema: str, agent_id: AgentId) -> int:
    return int(
        server.execute(f'SELECT spent FROM "{schema}".agents WHERE agent_id = %s', (agent_id.as_str(),))[0][0]
    )


# -- the ledger's rows ---------------------------------------------------------------------------


def test_default_thresholds_written_in_the_schema_are_the_librarys() -> None:
    assert "'{" + ",".join(str(t) for t in DEFAULT_THRESHOLDS) + "}'::float8[]" == layout._DEFAULT_THRESHOLDS


def test_ledger_rows_match_the_chained_spend_records(
    postgres_server: PostgresServer, schema: str, url: str, backend: PostgresBackend
) -> None:
    chain = AuditChain()
    now = float(T0)
    backend.set_budget("org:a", 50_000_000, None, "UTC", now, chain)
    backend.set_budget("team:b", 40_000_000, "day", "Europe/Paris", now, chain, (0.25,))
    plain = _agent(backend, budget_limit=100.0)
    rich = _agent(
        backend, budget_limit=80.0, labels={"team": "b", "env": "prod"}, budget_scopes=("team:b", "org:a")
    )
    ops = backend.ops
    fast = {"tried": 0, "took": 0}
    original = ops._fast

    def counted(*args: Any) -> Any:
        fast["tried"] += 1
        found = yield from original(*args)
        fast["took"] += found is not None
        return found

    ops._fast = counted
    note = SpendNote("gpt-4o", 1200, 300, 100, {"run": "nightly"})
    for i in range(6):  # plain: fast from the second on; rich: general first, then fast
        now += 60
        backend.record_spend(plain, 1_000_000, now, chain, note if i % 2 else None)
        backend.record_spend(rich, 2_000_000, now, chain, note)
    held = backend.reserve(rich, 5_000_000, 60, now, "r-1", chain)
    assert isinstance(held, Reservation)
    backend.commit(held, 4_000_000, now + 1, chain, SpendNote(tags={"kind": "commit"}))
    held = backend.reserve(rich, 1_000_000, 60, now, "r-2", chain)
    assert isinstance(held, Reservation)
    backend.remove_budget("org:a", now + 2, chain)  # the commit skips it, and its record says so
    result = backend.commit(held, 0, now + 3, chain)  # a commit of 0 still writes its record
    assert [r.event_type for r in result.records] == ["spend"]
    backend.set_budget("org:a", None, None, "UTC", now + 4, chain)  # back, for the next spends
    now += DAY  # team:b's period rolls: its threshold fires again
    backend.record_spend(rich, 10_000_000, now, chain)
    backend.record_spend(plain, 45_000_000, now, chain)  # crosses 50%: the general path
    ops._fast = original

    assert fast["took"] >= 8  # both paths ran
    assert fast["took"] < fast["tried"]
    ledger = _ledger(postgres_server, schema)
    assert ledger == _spend_records(backend)
    assert len(ledger) == 16
    assert ledger[-3][4] == ["team:b"]  # the commit after org:a was removed
    with StateManager.from_url(url) as manager:
        assert manager.verify_audit_log().ok
    # The ledger sums to what the budgets show spent.
    for agent_id in (plain, rich):
        total = sum(row[3] for row in ledger if row[2] == agent_id.as_str())
        assert total == _spent(postgres_server, schema, agent_id)
    alerts = [json.loads(r.details) for r in backend.query_audit(AuditQuery(event_type="budget_threshold"))]
    assert [(a["threshold"], a.get("scope")) for a in alerts] == [
        (0.25, "team:b"),
        (0.25, "team:b"),
        (0.5, None),
    ]


@pytest.mark.parametrize("key", [None, KEY], ids=["unkeyed", "keyed"])
def test_writers_that_interleave_settle_on_the_fast_path_or_holding_the_head(
    postgres_server: PostgresServer,
    schema: str,
    url: str,
    backend: PostgresBackend,
    monkeypatch: pytest.MonkeyPatch,
    key: bytes | None,
) -> None:
    """Another store object appends between every two spends. Unkeyed, the server seals each
    record after the head it finds (no retry); keyed, after its head missed (here at once: no
    retries), a fast path runs in a transaction that locks the head after the charge."""
    from iron_runtime_state.backends.postgres import sealing

    monkeypatch.setattr(sealing, "_TRIES", 0)
    chain = AuditChain(key)
    backend.set_budget("org:i", None, None, "UTC", T0, chain)
    agent = _agent(backend, budget_limit=1000.0, labels={"team": "i"}, budget_scopes=("org:i",))
    other = open_postgres(url)
    try:
        for i in range(5):
            other.append_audit(
                [events.status_changed(agent, AgentStatus.RUNNING, AgentStatus.RUNNING, T0)], chain
            )
            backend.record_spend(agent, 1_000_000, T0 + i, chain, SpendNote("m", 1, 2, 3))
            held = backend.reserve(agent, 2_000_000, 60, T0 + i, f"h{i}", chain)
            assert isinstance(held, Reservation)
            result = backend.commit(held, 1_500_000, T0 + i, chain)
            assert [r.event_type for r in result.records] == ["spend"]
    finally:
        other.close()
    ledger = _ledger(postgres_server, schema)
    assert ledger == _spend_records(backend)
    assert len(ledger) == 10
    assert all(row[4] == ["org:i"] and row[5] == {"team": "i"} for row in ledger)
    assert sum(row[3] for row in ledger) == _spent(postgres_server, schema, agent) == 12_500_000
    with StateManager.from_url(url, audit_key=key) as manager:
        assert manager.verify_audit_log().ok


def test_spend_records_appended_as_they_are_get_their_ledger_rows(
    postgres_server: PostgresServer, schema: str, backend: PostgresBackend
) -> None:
    """A copy of a trail appends its spend records as they are: each gets its ledger row."""
    chain = AuditChain()
    agent = AgentId.generate()
    note = SpendNote("gpt-4o", 10, 20, 5, {"run": "copied"})
    copied = [
        events.spend(agent, T0, 1_250_000, ("org:c",), {"team": "c"}, "r-9", note),
        events.status_changed(agent, AgentStatus.RUNNING, AgentStatus.STOPPED, T0),
        events.spend(agent, T0 + 5, 3, (), {}, None, None),
    ]
    backend.append_audit(copied[:1], chain)
    backend.append_audit(copied, chain)  # the store object knows the head now: still its rows
    assert _ledger(postgres_server, schema) == _spend_records(backend)
    assert len(_ledger(postgres_server, schema)) == 3


def test_pruning_the_trail_removes_the_ledger_rows_of_its_records(
    postgres_server: PostgresServer, schema: str, backend: PostgresBackend
) -> None:
    chain = AuditChain()
    agent = _agent(backend)
    for day in range(4):
        for _ in range(3):
            backend.record_spend(agent, 1_000_000, T0 + day * DAY, chain)
    removed = backend.prune_audit(T0 + 2 * DAY, chain)
    assert removed == 6
    ledger = _ledger(postgres_server, schema)
    assert ledger == _spend_records(backend)
    assert [row[1] for row in ledger] == [T0 + 2 * DAY] * 3 + [T0 + 3 * DAY] * 3
    totals = backend.spend_totals(SpendQuery(keys=("bucket",)))
    assert sorted((t.key, t.amount, t.calls) for t in totals) == [
        (((T0 + 2 * DAY) // 900,), 3_000_000, 3),
        (((T0 + 3 * DAY) // 900,), 3_000_000, 3),
    ]


# -- reports in SQL --------------------------------------------------------------------------------


def _sorted(totals: list[SpendTotal]) -> list[tuple[Any, ...]]:
    return sorted(
        (
            tuple((v is None, str(v) if v is not None else "") for v in t.key),
            t.key,
            t.amount,
            t.calls,
            t.input_tokens,
            t.output_tokens,
            t.cached_input_tokens,
        )
        for t in totals
    )


def test_reports_in_sql_equal_reading_the_records_on_random_data(backend: PostgresBackend) -> None:
    rng = random.Random(17)
    chain = AuditChain()
    scopes = ["org:x", "team:y", "team:z"]
    for scope in scopes:
        backend.set_budget(scope, None, None, "UTC", T0, chain)
    agents = []
    for i in range(6):
        labels = {"team": rng.choice(["a", "b"])} if i % 3 else {}
        if i % 2:
            labels["env"] = rng.choice(["prod", "dev"])
        chosen = tuple(rng.sample(scopes, rng.randint(0, 2)))
        agents.append(_agent(backend, labels=labels, budget_scopes=chosen))
    now = T0
    for _ in range(400):
        now += rng.randint(1, 1800)
        model = rng.choice([None, "gpt-4o", "claude"])
        tags = rng.choice([{}, {"run": "a"}, {"run": "b", "kind": "x"}])
        note = (
            SpendNote(model, rng.randint(0, 5000), rng.randint(0, 900), rng.randint(0, 50), tags)
            if model or tags
            else None
        )
        agent = rng.choice(agents)
        if rng.random() < 0.3:
            held = backend.reserve(agent, 3_000_000, 60, now, f"r{now}", chain)
            assert isinstance(held, Reservation)
            backend.commit(held, rng.randint(0, 3_000_000), now, chain, note)
        else:
            backend.record_spend(agent, rng.randint(1, 2_000_000), now, chain, note)
    key_sets = [
        (),
        ("bucket",),
        ("agent",),
        ("scope",),
        ("model",),
        ("label:team",),
        ("tag:run",),
        ("bucket", "scope", "model"),
        ("label:env", "tag:kind", "agent"),
    ]
    filters: list[dict[str, Any]] = [
        {},
        {"since": T0 + 20_000, "until": T0 + 150_000},
        {"agent_id": agents[1].as_str()},
        {"scope": "team:y"},
        {"model": "gpt-4o"},
        {"labels": {"team": "a"}},
        {"tags": {"run": "b"}},
        {"labels": {"team": "b", "env": "prod"}, "tags": {"kind": "x"}},
    ]
    checked = 0
    for keys, found in itertools.product(key_sets, filters):
        query = SpendQuery(keys=keys, **found)
        ours = backend.spend_totals(query)
        reading = Backend.spend_totals(backend, query)  # the default: reads the records
        assert _sorted(ours) == _sorted(reading), (keys, found)
        checked += bool(reading)
    assert checked > 50


def test_reports_read_only_their_span(
    postgres_server: PostgresServer, schema: str, backend: PostgresBackend
) -> None:
    backend.stats()  # creates the schema
    # 200,000 rows over 100 days, straight into the table (what a long-lived fleet leaves).
    postgres_server.execute(
        f'INSERT INTO "{schema}".ledger (seq, ts, agent_id, amount, model, input_tokens, output_tokens, '
        "cached_input_tokens, scopes) SELECT n, %s + n * 43, 'agent-' || (n %% 50), 1000, "
        "'m' || (n %% 7), 10, 5, 0, ARRAY['org:x'] FROM generate_series(1, 200000) n",
        (T0,),
    )
    postgres_server.execute(f'VACUUM ANALYZE "{schema}".ledger')
    from iron_runtime_state.backends.postgres.ledger import totals_select

    def plan(query: SpendQuery) -> str:
        sql, params = totals_select(f'"{schema}"', query)
        rows = postgres_server.execute(f"EXPLAIN {sql}", params)
        return "\n".join(row[0] for row in rows)

    span: dict[str, Any] = {"since": T0 + 10 * DAY, "until": T0 + 11 * DAY}
    by_day = plan(SpendQuery(keys=("bucket",), **span))
    assert "Index Only Scan using ledger_by_time" in by_day, by_day
    # With other keys or filters, an index range of the span (the planner picks which).
    for query in (
        SpendQuery(keys=("bucket", "model"), **span),
        SpendQuery(keys=("bucket",), agent_id="agent-7", **span),
        SpendQuery(keys=("agent",), model="m3", **span),
        SpendQuery(keys=("scope", "label:team", "tag:run"), scope="org:x", **span),
    ):
        found = plan(query)
        assert "Index Cond: ((ts >= " in found or "AND (ts >= " in found, found
        assert "Seq Scan" not in found, found
    totals = backend.spend_totals(SpendQuery(keys=("bucket",), **span))
    assert sum(t.calls for t in totals) == len(range(10 * DAY // 43 + 1, 11 * DAY // 43 + 1))


# -- a connection killed in the middle of a settle -----------------------------------------------


def _kill(server: PostgresServer, conn: psycopg.Connection[Any]) -> None:
    server.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))


def test_a_killed_connection_never_leaves_a_charge_without_its_record(
    postgres_server: PostgresServer, schema: str, backend: PostgresBackend
) -> None:
    """The general path killed after each of its statements in turn, and the fast path killed
    while it waits for the audit head: each spend is kept whole (charge, record, ledger row,
    threshold events) or not at all."""
    chain = AuditChain()
    backend.set_budget("org:k", 100_000_000, "day", "UTC", T0, chain)
    agent = _agent(backend, budget_limit=100.0, labels={"team": "k"}, budget_scopes=("org:k",))
    ops = backend.ops
    steps = 0
    while True:
        steps += 1
        ops.watch._highest = None  # no head known: the general path, statement by statement
        conn = psycopg.connect(postgres_server.url(), autocommit=True)
        op = ops.record_spend(agent, 30_000_000, T0 + steps, chain, SpendNote(tags={"n": str(steps)}))
        reply: Any = None
        finished = False
        try:
            for _ in range(steps):
                request = op.send(reply)
                reply = execute(conn, request)
            _kill(postgres_server, conn)
            request = op.send(reply)
            execute(conn, request)  # the connection is gone: the transaction rolled back
            with contextlib.suppress(StopIteration):
                op.send(reply)
        except StopIteration:
            finished = True  # the whole spend ran in fewer statements: it is kept whole
        except psycopg.OperationalError:
            pass
        finally:
            op.close()
            conn.close()
        spent = _spent(postgres_server, schema, agent)
        ledger = _ledger(postgres_server, schema)
        assert ledger == _spend_records(backend)
        assert sum(row[3] for row in ledger) == spent
        scope = backend.get_budget("org:k", T0)
        assert scope is not None
        assert scope.spent == spent
        if finished:
            break
    assert steps > 8  # every statement of the general path was a place to be killed
    assert len(_ledger(postgres_server, schema)) == 1

    # The fast path: one statement, killed while it waits for the head's lock.
    backend.record_spend(agent, 1_000_000, T0 + 100, chain)  # the head is known again
    before = _spent(postgres_server, schema, agent), len(_ledger(postgres_server, schema))
    blocker = psycopg.connect(postgres_server.url())
    blocker.execute(f'SELECT * FROM "{schema}".audit_chain WHERE id = 0 FOR UPDATE')
    errors: list[BaseException] = []

    def spend() -> None:
        try:
            backend.record_spend(agent, 1_000_000, T0 + 101, chain)
        except BaseException as exc:  # reported below
            errors.append(exc)

    worker = threading.Thread(target=spend)
    worker.start()
    deadline = time.monotonic() + 10
    waiting: list[tuple[Any, ...]] = []
    while not waiting and time.monotonic() < deadline:
        waiting = postgres_server.execute(
            "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %s",
            (f'%"{schema}".spend(%',),
        )
        time.sleep(0.02)
    assert waiting, "the spend never waited for the head"
    postgres_server.execute("SELECT pg_terminate_backend(%s)", (waiting[0][0],))
    worker.join(30)
    blocker.rollback()
    blocker.close()
    assert errors
    assert type(errors[0]).__name__ in {"BackendUnavailable", "BackendError"}, errors
    assert (_spent(postgres_server, schema, agent), len(_ledger(postgres_server, schema))) == before
    assert _ledger(postgres_server, schema) == _spend_records(backend)


# -- a schema written by 0.6.0 -------------------------------------------------------------------


def release_src(commit: str) -> str:
    """The ``src`` folder of ``commit``, checked out once as a git worktree in the temp folder."""
    root = os.path.join(tempfile.gettempdir(), f"iron-state-{commit}")
    if not os.path.isdir(root):
        done = subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", root, commit],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot check out {commit} (git worktree): {done.stderr.strip()[:200]}")
    return os.path.join(root, "src")


_WRITE_0_6 = r"""
import json, sys, time
from iron_runtime_state import AgentId, AgentState, AgentStatus, StateManager
with StateManager.from_url(sys.argv[1]) as manager:
    manager.set_budget("org:old", limit=100.0)
    manager.set_budget("team:old", limit=50.0, period="month")
    plain, rich = AgentId.generate(), AgentId.generate()
    manager.save_agent_state(AgentState(plain, AgentStatus.RUNNING, budget_limit=10.0))
    manager.save_agent_state(AgentState(rich, AgentStatus.RUNNING, budget_limit=40.0,
        labels={"team": "old"}, budget_scopes=("org:old", "team:old"), budget_period="day"))
    manager.record_spend(plain, 1.5)
    manager.record_spend(rich, 2.5)
    hold = manager.reserve_budget(rich, 4.0, ttl=3600)
    print(json.dumps({"plain": plain.as_str(), "rich": rich.as_str(), "hold": [hold.reservation_id,
        hold.amount, hold.expires_at, list(hold.scopes)], "records": manager.audit_count()}))
"""


@pytest.mark.slow
def test_a_schema_written_by_0_6_migrates_and_opens(
    postgres_server: PostgresServer, url: str, schema: str
) -> None:
    env = dict(os.environ, PYTHONPATH=release_src(RELEASE_0_6))
    written = subprocess.run(
        [sys.executable, "-c", _WRITE_0_6, url], env=env, capture_output=True, text=True, timeout=120
    )
    assert written.returncode == 0, written.stderr
    old = json.loads(written.stdout)
    assert postgres_server.execute(f'SELECT version FROM "{schema}".meta')[0][0] == 1

    with StateManager.from_url(url) as manager:
        plain, rich = AgentId(old["plain"]), AgentId(old["rich"])
        state = manager.get_agent_state(rich)
        assert state is not None
        assert state.budget_thresholds is DEFAULT_THRESHOLDS
        assert state.labels == {"team": "old"}
        assert state.budget_spent == 2.5
        assert state.budget_scopes == ("org:old", "team:old")
        assert postgres_server.execute(f'SELECT version FROM "{schema}".meta')[0][0] == layout.SCHEMA_VERSION
        assert postgres_server.execute(f'SELECT DISTINCT alerted FROM "{schema}".agents') == [(0.0,)]
        assert [b.thresholds for b in manager.list_budgets()] == [DEFAULT_THRESHOLDS] * 2
        assert _ledger(postgres_server, schema) == []  # the ledger starts with this version
        assert manager.verify_audit_log().ok

        # The old hold commits through the new function, with its ledger record.
        rid, amount, expires_at, scopes = old["hold"]
        manager.commit_reservation(Reservation(rid, rich, amount, expires_at, tuple(scopes)), 3.0)
        manager.record_spend(plain, 4.0)  # 55% of 10: the 50% threshold
        records = manager.audit_log(after_seq=old["records"])
        assert [r.event_type for r in records] == ["spend", "spend", "budget_threshold"]
        assert [r[3] for r in _ledger(postgres_server, schema)] == [3_000_000, 4_000_000]
        assert manager.get_budget("org:old").spent == 5.5  # type: ignore[union-attr]
        assert manager.verify_audit_log().ok

    # 0.6.0 now finds a newer schema and leaves it alone.
    refused = subprocess.run(
        [sys.executable, "-c", _WRITE_0_6, url], env=env, capture_output=True, text=True, timeout=120
    )
    assert refused.returncode != 0
    assert SchemaError.__name__ in refused.stderr
    assert "newer" in refused.stderr
