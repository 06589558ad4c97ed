"""What only the PostgreSQL store has: URLs and libpq parameters, the password kept out of sight,
schemas and their migrations, the indexes its queries use, the native asyncio driver, copies to
and from other stores. Faults (restarts, killed connections) are in test_postgres_faults.py; the
shared behaviour is the contract suite's (``-k postgres``).

Every test runs on a real server (tests/postgres_server.py), in a schema of its own.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from iron_runtime_state import (
    AgentId,
    AgentState,
    AgentStatus,
    AsyncStateManager,
    AuditEvent,
    BackendError,
    BackendUnavailable,
    ConfigurationError,
    SchemaError,
    StateManager,
)
from iron_runtime_state.backends.base import AgentPage, AuditQuery

from .postgres_server import PASSWORD, PostgresServer, new_schema

pytest.importorskip("psycopg")

from iron_runtime_state.backends.postgres import PostgresBackend
from iron_runtime_state.backends.postgres import schema as layout
from iron_runtime_state.backends.postgres.aio import AsyncPostgresBackend
from iron_runtime_state.backends.postgres.trail import audit_select


@pytest.fixture
def schema(postgres_server: PostgresServer) -> Iterator[str]:
    """A schema name of this test's own, dropped at the end."""
    name = new_schema()
    try:
        yield name
    finally:
        postgres_server.drop_schema(name)


@pytest.fixture
def url(postgres_server: PostgresServer, schema: str) -> str:
    return postgres_server.url(schema=schema)


def running(manager: StateManager, **fields: Any) -> AgentId:
    agent_id = AgentId.generate()
    manager.save_agent_state(AgentState(agent_id, AgentStatus.RUNNING, **fields))
    return agent_id


# -- URLs, options and the password --------------------------------------------------------------


def test_both_schemes_reach_the_same_store_and_the_url_hides_the_password(
    postgres_server: PostgresServer, url: str, schema: str
) -> None:
    other = url.replace("postgresql://", "postgres://")
    with StateManager.from_url(url) as a, StateManager.from_url(other) as b:
        agent = running(a, budget_limit=5.0)
        assert b.get_agent_state(agent) == a.get_agent_state(agent)
        for shown in (a.url, b.url, repr(a.backend), repr(b.backend), repr(a)):
            assert PASSWORD not in shown
            assert "***" in shown
            assert f"schema={schema}" in shown
        assert isinstance(a.backend, PostgresBackend)
    keyword = StateManager.with_postgres(postgres_server.url(), schema=schema)
    with keyword:
        assert keyword.get_agent_state(agent) is not None


def test_libpq_parameters_pass_through(postgres_server: PostgresServer, url: str) -> None:
    with StateManager.from_url(f"{url}&application_name=iron-pass-through") as manager:
        manager.stats()
        names = postgres_server.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'iron-pass-through'"
        )
        assert names[0][0] >= 1
    with StateManager.from_url(url, application_name="iron-keyword") as manager:
        manager.stats()
        names = postgres_server.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'iron-keyword'"
        )
        assert names[0][0] >= 1


@pytest.mark.parametrize(
    ("query", "fragment"),
    [
        ("bogus_param=1", "bogus_param"),
        ("schema=Bad-Name", "schema"),
        ("schema=pg_catalog", "schema"),
        ("timeout=-1", "timeout"),
        ("timeout=soon", "timeout"),
        ("max_connections=0", "max_connections"),
    ],
)
def test_bad_options_are_refused_before_connecting(query: str, fragment: str) -> None:
    secret = "s3cret-in-url"
    with pytest.raises(ConfigurationError) as raised:
        StateManager.from_url(f"postgresql://iron:{secret}@127.0.0.1:1/db?{query}")
    assert fragment in str(raised.value)
    assert secret not in str(raised.value)


def test_a_wrong_password_or_a_refused_connection_never_shows_the_password(
    postgres_server: PostgresServer, schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-pw-7f3a9"
    bad = postgres_server.url(schema=schema).replace(PASSWORD, wrong)
    for target, kwargs in (
        (bad, {}),
        (f"{bad}&sslmode=require", {}),  # the test server speaks no TLS
        (bad.replace(str(postgres_server.port), "1"), {}),  # nothing listens there
        (postgres_server.url(schema=schema).replace(PASSWORD, "x%3Fy%40z"), {"password": wrong}),
    ):
        with StateManager.from_url(target, timeout=1, **kwargs) as manager:
            with pytest.raises(BackendError) as raised:
                manager.stats()
            assert isinstance(raised.value, BackendUnavailable)
            message = str(raised.value)
            assert wrong not in message
            assert PASSWORD not in message
            assert wrong not in manager.url
            assert wrong not in repr(manager.backend)
    for record in caplog.records:
        assert wrong not in record.getMessage()


# -- schemas and migrations --------------------------------------------------------------------


def test_schemas_are_created_on_first_use_and_isolated(postgres_server: PostgresServer, schema: str) -> None:
    second = new_schema()
    try:
        with (
            StateManager.from_url(postgres_server.url(schema=schema)) as a,
            StateManager.from_url(postgres_server.url(schema=second)) as b,
        ):
            agent = running(a)
            assert b.get_agent_state(agent) is None
            assert a.stats().total == 1
            assert b.stats().total == 0
        tables = postgres_server.execute("SELECT count(*) FROM pg_tables WHERE schemaname = %s", (schema,))[
            0
        ][0]
        assert tables >= 8
        version = postgres_server.execute(f'SELECT version FROM "{schema}".meta')[0][0]
        assert version == layout.SCHEMA_VERSION
    finally:
        postgres_server.drop_schema(second)


def test_a_newer_schema_is_refused_and_left_untouched(
    postgres_server: PostgresServer, url: str, schema: str
) -> None:
    with StateManager.from_url(url) as manager:
        agent = running(manager, budget_limit=3.0)
    postgres_server.execute(f'UPDATE "{schema}".meta SET version = 99')
    with StateManager.from_url(url) as manager, pytest.raises(SchemaError) as raised:
        manager.get_agent_state(agent)
    assert "version 99" in str(raised.value)
    assert "newer" in str(raised.value)
    assert postgres_server.execute(f'SELECT version FROM "{schema}".meta')[0][0] == 99
    assert postgres_server.execute(f'SELECT count(*) FROM "{schema}".agents')[0][0] == 1


def test_a_schema_holding_other_tables_is_refused_and_left_untouched(
    postgres_server: PostgresServer, url: str, schema: str
) -> None:
    postgres_server.execute(f'CREATE SCHEMA "{schema}"')
    postgres_server.execute(f'CREATE TABLE "{schema}".orders (id int)')
    with StateManager.from_url(url) as manager, pytest.raises(SchemaError) as raised:
        manager.stats()
    assert "did not create" in str(raised.value)
    tables = postgres_server.execute("SELECT tablename FROM pg_tables WHERE schemaname = %s", (schema,))
    assert tables == [("orders",)]


def test_an_older_schema_is_migrated_once_by_concurrent_openers(
    postgres_server: PostgresServer, url: str, schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with StateManager.from_url(url) as manager:
        agent = running(manager, budget_limit=3.0)
        manager.record_spend(agent, 1)
    extended = (
        *layout.MIGRATIONS,
        ("CREATE TABLE {s}.migrated (n integer)", "INSERT INTO {s}.migrated VALUES (1)"),
    )
    monkeypatch.setattr(layout, "MIGRATIONS", extended)
    managers = [StateManager.from_url(url) for _ in range(4)]
    errors: list[BaseException] = []

    def first_call(manager: StateManager) -> None:
        try:
            assert manager.get_agent_state(agent) is not None
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=first_call, args=(m,)) for m in managers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for manager in managers:
        manager.close()
    assert not errors
    assert postgres_server.execute(f'SELECT version FROM "{schema}".meta')[0][0] == len(extended)
    assert postgres_server.execute(f'SELECT count(*) FROM "{schema}".migrated')[0][0] == 1
    monkeypatch.undo()
    with StateManager.from_url(url) as manager, pytest.raises(SchemaError):
        manager.stats()  # this code now finds a newer schema


def test_a_table_removed_by_hand_is_a_schema_error(
    postgres_server: PostgresServer, url: str, schema: str
) -> None:
    with StateManager.from_url(url) as manager:
        running(manager)
        postgres_server.execute(f'DROP TABLE "{schema}".budgets')
        with pytest.raises(SchemaError) as raised:
            manager.list_budgets()
        assert schema in str(raised.value)


# -- the statements use indexes ------------------------------------------------------------------


def _first(op: Any) -> tuple[str, Any]:
    """The first statement an operation runs, and its parameters."""
    request = next(op)
    op.close()
    return request.query, request.params


def _plan(postgres_server: PostgresServer, sql: str, params: Any) -> str:
    rows = postgres_server.execute(f"EXPLAIN {sql}", params)
    return "\n".join(row[0] for row in rows)


@pytest.mark.slow
def test_agent_and_audit_queries_stay_off_full_scans(
    postgres_server: PostgresServer, url: str, schema: str
) -> None:
    agents, records = 200_000, 200_000
    q = f'"{schema}"'
    with StateManager.from_url(url) as manager:
        manager.stats()  # creates the schema
        # A large fleet and trail, written straight into the tables (the triggers keep the
        # labels and the totals): 2% stopped, 100 teams, 2,000 users, two environments.
        postgres_server.execute(
            f"INSERT INTO {q}.agents (agent_id, status, spent, pii, labels, changed_at) "
            "SELECT 'agent_00000000-0000-0000-0000-' || lpad(to_hex(n), 12, '0'), "
            "CASE WHEN n % 50 = 0 THEN 1 ELSE 0 END, n, 0, "
            "jsonb_build_object('team', 't' || (n % 100), 'user', 'u' || (n % 2000), "
            "'env', CASE WHEN n % 2 = 0 THEN 'dev' ELSE 'prod' END), "
            f"0 FROM generate_series(1, {agents}) AS n"
        )
        postgres_server.execute(
            f"INSERT INTO {q}.audit SELECT n, "
            "'agent_00000000-0000-0000-0000-' || lpad(to_hex(n % 500 + 1), 12, '0'), "
            f"'kind' || (n % 40), 1000000 + n, 'x', '', '' FROM generate_series(1, {records}) AS n"
        )
        for table in ("agents", "agent_labels", "audit"):
            postgres_server.execute(f"ANALYZE {q}.{table}")
        team = list(manager.iter_agent_states(labels={"team": "t7", "env": "prod"}))
        assert len(team) == agents // 100
        assert all(state.labels["team"] == "t7" and state.labels["env"] == "prod" for state in team)
        assert manager.stats().stopped == agents // 50
        ops = manager.backend.ops  # type: ignore[attr-defined]
    plans = {
        "label": _first(ops.iter_states(None, {"team": "t7"}, 100)),
        "labels+status": _first(ops.iter_states(AgentStatus.STOPPED, {"team": "t7", "env": "dev"}, 100)),
        "status": _first(ops.iter_states(AgentStatus.STOPPED, None, 100)),
        "all": _first(ops.iter_states(None, None, 100)),
        "get": _first(ops.get("agent_x")),
        "page by id": _first(ops.page_agents(AgentPage(limit=50, offset=1000))),
        "page by label": _first(ops.page_agents(AgentPage(labels={"team": "t7"}, offset=500))),
        # Sorted by spend, the server sorts the matches (no index on spends: spends stay cheap).
        "top spenders of a user": _first(
            ops.page_agents(AgentPage(labels={"user": "u7"}, order_by="budget_spent", descending=True))
        ),
    }
    for name, query in {
        "by agent": AuditQuery(agent_id=AgentId.test_fixture(7), limit=100),
        "by type": AuditQuery(event_type="kind3", after_seq=100, limit=100),
        "by time": AuditQuery(since=1_010_000, until=1_010_050),
        "next page": AuditQuery(after_seq=15_000, limit=100),
    }.items():
        plans[name] = audit_select(q, query)
    for name, (sql, params) in plans.items():
        plan = _plan(postgres_server, sql, params)
        assert "Seq Scan" not in plan, f"{name}:\n{plan}"


def test_stats_read_aggregate_rows_spread_over_slots(
    postgres_server: PostgresServer, url: str, schema: str
) -> None:
    with StateManager.from_url(url) as manager:
        ids = [running(manager) for _ in range(30)]
        for agent in ids:
            manager.record_spend(agent, "0.5")
        manager.set_status(ids[0], AgentStatus.FAILED)
        stats = manager.stats()
        assert (stats.total, stats.running, stats.failed, stats.budget_spent) == (30, 29, 1, 15.0)
        assert manager.remove_agent_state(ids[1])
        assert manager.stats().budget_spent == 14.5
    plan = _plan(postgres_server, f'SELECT sum(spent) FROM "{schema}".stats', None)
    assert "agents" not in plan
    used = postgres_server.execute(f'SELECT count(*) FROM "{schema}".stats WHERE spent <> 0 OR running <> 0')[
        0
    ][0]
    assert used > 1  # writers spread over the rows instead of queueing on one


# -- concurrency: the chain in seq order, one store shared by processes --------------------------


_APPENDER = """
import sys
from iron_runtime_state import AgentId, AuditEvent, StateManager
url, n = sys.argv[1], int(sys.argv[2])
with StateManager.from_url(url) as manager:
    agent = AgentId.generate()
    for i in range(n):
        manager.save_audit_log(AuditEvent(agent, "appended", 1000 + i, str(i)))
    manager.record_spend(AgentId(sys.argv[3]), 1)
"""


@pytest.mark.slow
def test_processes_and_threads_extend_one_chain_in_seq_order(url: str) -> None:
    per, processes, threads = 150, 4, 4
    with StateManager.from_url(url) as manager:
        shared = running(manager)
        procs = [
            subprocess.Popen([sys.executable, "-c", _APPENDER, url, str(per), shared.as_str()])
            for _ in range(processes)
        ]

        def append() -> None:
            agent = AgentId.generate()
            for i in range(per):
                manager.save_audit_log(AuditEvent(agent, "threaded", 2000 + i, str(i)))

        workers = [threading.Thread(target=append) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        for proc in procs:
            assert proc.wait(120) == 0
        total = per * (processes + threads) + processes  # and each process's spend record
        assert manager.audit_count() == total
        seqs = [record.seq for record in manager.audit_log()]
        assert seqs == list(range(1, total + 1))
        report = manager.verify_audit_log()
        assert report.ok, report
        assert manager.get_agent_state(shared).budget_spent == processes  # type: ignore[union-attr]


# -- asyncio: psycopg's own async connections ----------------------------------------------------


def test_the_asyncio_manager_runs_natively_and_concurrently(url: str) -> None:
    async def main() -> None:
        async with AsyncStateManager.from_url(url) as manager:
            assert isinstance(manager.backend, AsyncPostgresBackend)
            assert PASSWORD not in manager.url
            agent = AgentId.generate()
            await manager.save_agent_state(AgentState(agent, AgentStatus.RUNNING, budget_limit=10.0))
            await manager.set_budget("team:async", limit=7.5)
            scoped = AgentId.generate()
            await manager.save_agent_state(
                AgentState(scoped, AgentStatus.RUNNING, budget_scopes=("team:async",))
            )
            results = await asyncio.gather(
                *(manager.record_spend(agent, "0.1") for _ in range(120)),
                *(manager.record_spend(scoped, "0.1") for _ in range(100)),
                return_exceptions=True,
            )
            refused = [r for r in results if isinstance(r, Exception)]
            assert all(type(r).__name__ == "BudgetExceeded" for r in refused)
            state = await manager.get_agent_state(agent)
            assert state is not None
            assert state.budget_spent == 10.0
            budget = await manager.get_budget("team:async")
            assert budget is not None
            assert budget.spent == 7.5
            assert len(refused) == 20 + 25
            assert (await manager.verify_audit_log()).ok
            states = [s async for s in manager.iter_agent_states(batch_size=1)]
            assert len(states) == 2

    asyncio.run(main())


# -- copies between stores -------------------------------------------------------------------------


def test_copy_moves_a_fleet_from_sqlite_to_postgres_and_back(url: str, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from iron_runtime_state.cli import app

    source = f"sqlite:///{tmp_path / 'fleet.db'}"
    with StateManager.from_url(source) as manager:
        manager.set_budget("team:copy", limit=50.0, period="month")
        for i in range(30):
            agent = running(manager, budget_limit=9.0, labels={"n": str(i)}, budget_scopes=("team:copy",))
            manager.record_spend(agent, "1.25")
            manager.set_status(agent, AgentStatus.STOPPED if i % 3 else AgentStatus.RUNNING)

    def contents(target: str) -> tuple[list[dict[str, Any]], list[tuple[str, str, int, str]], int]:
        with StateManager.from_url(target) as manager:
            states = sorted((s.to_dict() for s in manager.iter_agent_states()), key=lambda d: d["agent_id"])
            events = [
                (r.agent_id.as_str(), r.event_type, r.timestamp, r.details) for r in manager.audit_log()
            ]
            return states, events, len(manager.list_budgets())

    runner = CliRunner()
    there = runner.invoke(app, ["copy", source, url, "--json"], prog_name="iron-state")
    assert there.exit_code == 0, there.output
    assert PASSWORD not in there.output
    copied = contents(url)
    original = contents(source)
    assert copied[0] == original[0]
    # The trail is sealed anew in the destination; the scopes' budget_set events come after it.
    assert copied[1][: len(original[1])] == original[1]
    assert [event[1] for event in copied[1][len(original[1]) :]] == ["budget_set"]
    assert copied[2] == original[2] == 1
    back = f"sqlite:///{tmp_path / 'back.db'}"
    returned = runner.invoke(app, ["copy", url, back], prog_name="iron-state")
    assert returned.exit_code == 0, returned.output
    assert contents(back)[0] == original[0]
    with StateManager.from_url(back) as manager:
        assert manager.verify_audit_log().ok


# -- the extra ---------------------------------------------------------------------------------


def test_a_missing_driver_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['psycopg'] = None\n"
        "from iron_runtime_state import StateManager, MissingDependency\n"
        "try:\n"
        "    StateManager.from_url('postgresql://u:p@127.0.0.1/db')\n"
        "except MissingDependency as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert "iron-runtime-state[postgres]" in out.stdout


def test_close_is_idempotent_and_a_closed_store_says_so(url: str) -> None:
    manager = StateManager.from_url(url)
    manager.stats()
    manager.close()
    manager.close()
    with pytest.raises(BackendError) as raised:
        manager.stats()
    assert "closed" in str(raised.value)
