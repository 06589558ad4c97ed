"""What only the SQLite store has for budgets, labels and money (schema version 4).

The rules themselves are in tests/contract (run on SQLite too). Here: files written by 0.4 and
0.5 migrate to exact integer amounts; the label index and the scope holds follow every change
and answer from their indexes; a spend is one statement or one short transaction; and processes
and threads sharing budget scopes never pass a limit, even when one is killed holding budget.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import sys
import time
from decimal import Decimal
from pathlib import Path

import pytest

from iron_runtime_state import (
    AgentId,
    AgentState,
    AgentStatus,
    BudgetExceeded,
    BudgetNotFound,
    ReservationError,
    StateManager,
    ValidationError,
)
from iron_runtime_state.backends.sqlite import MIGRATIONS, SCHEMA_VERSION, SQLiteBackend, spending, store
from iron_runtime_state.backends.sqlite import schema as sqlite_schema
from iron_runtime_state.money import MAX_MICROS, from_micros, to_micros

from .sqlite_support import Workers, header_of, raw, url_of, worker_group

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

DATA = Path(__file__).with_name("data")

workers = pytest.fixture(worker_group, name="workers")


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state.db"


def backend_of(manager: StateManager) -> SQLiteBackend:
    backend = manager.backend
    assert isinstance(backend, SQLiteBackend)
    return backend


def column_types(path: Path, table: str, columns: str) -> set[tuple[str, ...]]:
    """The SQLite storage classes found in ``columns`` of ``table`` (NULLs left out)."""
    db = raw(path)
    try:
        names = [c.strip() for c in columns.split(",")]
        types = ", ".join(f"typeof({name})" for name in names)
        return set(db.execute(f"SELECT {types} FROM {table}").fetchall())
    finally:
        db.close()


# -- files written by older versions ------------------------------------------------------------


def test_a_store_written_by_0_5_opens_with_exact_amounts(path: Path) -> None:
    # Written by commit 71c1d72 (0.5.0, schema version 3): tests/data/make_store_0_5.py.
    shutil.copy(DATA / "store-0.5.db", path)
    assert header_of(path) == (3, sqlite_schema.APPLICATION_ID)
    with StateManager.with_sqlite(path) as manager:
        assert header_of(path)[0] == SCHEMA_VERSION
        a, b, c, d, e = manager.get_agent_states([AgentId.test_fixture(n) for n in range(1, 6)])
        assert a == AgentState(
            AgentId.test_fixture(1), AgentStatus.RUNNING, 0.3, 0, 10.0
        )  # not 0.30000000000000004
        assert b == AgentState(AgentId.test_fixture(2), AgentStatus.RUNNING, 18.532602, 1)
        assert c == AgentState(AgentId.test_fixture(3), AgentStatus.STOPPED, 0.5)
        # 0.5 counted up to a trillion; this version counts to a billion, and keeps the rest there.
        assert d == AgentState(AgentId.test_fixture(4), AgentStatus.RUNNING, 1e9, 0, 1e9)
        assert e == AgentState(AgentId.test_fixture(5), AgentStatus.FAILED, 1.25, 7, 2.0)
        for state in (a, b, c, d, e):
            assert state is not None
            assert (state.labels, state.budget_scopes, state.budget_period, state.period_start) == (
                {},
                (),
                None,
                None,
            )
        stats = manager.stats()
        assert (stats.total, stats.running, stats.stopped, stats.failed) == (5, 3, 1, 1)
        assert stats.budget_spent == 1_000_000_020.582602  # recounted exactly: the floats had drifted
        assert stats.pii_detections == 8
        assert manager.verify_audit_log().ok
        # The open hold of 1.5 became micro-units and still counts until its ttl.
        db = raw(path)
        try:
            holds = db.execute("SELECT amount, scopes FROM iron_holds").fetchall()
        finally:
            db.close()
        assert holds == [(1_500_000, None)]
        assert manager.record_spend(AgentId.test_fixture(1), 0.1).spent_exact == Decimal("0.4")
        assert manager.stats().budget_spent == 1_000_000_020.682602
    assert column_types(path, "iron_agents", "budget_spent, budget_limit") <= {
        ("integer", "integer"),
        ("integer", "null"),
    }
    assert column_types(path, "iron_stats", "budget_spent") == {("integer",)}


@pytest.mark.parametrize("name", ["store-0.4.db", "store-0.4-keyed.db"])
def test_stores_written_by_0_4_reach_integer_amounts(path: Path, name: str) -> None:
    shutil.copy(DATA / name, path)
    assert header_of(path)[0] == 1
    with StateManager.with_sqlite(path) as manager:
        assert manager.stats().budget_spent == 6.5
        assert [s.budget_spent for s in manager.iter_agent_states()] == [4.0, 2.5, 0.0]
    assert column_types(path, "iron_agents", "budget_spent") == {("integer",)}
    assert header_of(path)[0] == SCHEMA_VERSION


def test_migration_4_converts_every_float_to_its_decimal_value(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A version 3 file holding floats such as 0.5 wrote them: the sums of random cents, halves of
    # a micro-unit (rounded half to even), and amounts past a billion.
    rng = random.Random(11)
    monkeypatch.setattr(sqlite_schema, "MIGRATIONS", MIGRATIONS[:3])
    db = raw(path)
    db.execute("BEGIN")
    sqlite_schema.migrate(db, 0, 0)  # the file 0.5 would create
    db.execute("COMMIT")
    db.close()
    monkeypatch.undo()
    assert header_of(path) == (3, sqlite_schema.APPLICATION_ID)
    spends = [sum(rng.randrange(1, 10_000) / 100 for _ in range(rng.randrange(1, 30))) for _ in range(200)]
    spends += [0.0000005, 0.0000015, 0.0000025, 2e9, 1e300]
    limits = [None if i % 3 == 0 else rng.randrange(1, 10**6) / 7 for i in range(len(spends))]
    rows = [(AgentId.test_fixture(i + 1).as_str(), spent, limits[i]) for i, spent in enumerate(spends)]
    db = raw(path)
    try:
        db.execute("BEGIN")
        db.executemany(
            "INSERT INTO iron_agents (agent_id, status, budget_spent, pii_detections, budget_limit, "
            "changed_at) VALUES (?, 0, ?, 0, ?, 0)",
            rows,
        )
        db.execute(
            "INSERT INTO iron_holds VALUES (?, 'r', ?, 1e12)", (AgentId.test_fixture(1).as_str(), 0.1 + 0.2)
        )
        db.execute("COMMIT")
    finally:
        db.close()
    expected = {key: (min(to_micros(spent), MAX_MICROS), limit) for key, spent, limit in rows}
    for key, (_, limit) in expected.items():
        expected[key] = (expected[key][0], None if limit is None else min(to_micros(limit), MAX_MICROS))
    assert [expected[AgentId.test_fixture(n).as_str()][0] for n in range(201, 206)] == [
        0,  # half a micro-unit: to the even neighbour, 0
        2,  # one and a half: 2
        2,  # two and a half: 2
        MAX_MICROS,
        MAX_MICROS,
    ]
    with StateManager.with_sqlite(path) as manager:
        for state in manager.iter_agent_states():
            spent, limit = expected[state.agent_id.as_str()]
            assert to_micros(state.budget_spent) == spent
            assert (None if state.budget_limit is None else to_micros(state.budget_limit)) == limit
        assert to_micros(manager.stats().budget_spent) == sum(spent for spent, _ in expected.values())
        assert backend_of(manager).reserved(AgentId.test_fixture(1), time.time())[1] == 300_000


def test_iron_micros_is_money_to_micros() -> None:
    convert = sqlite_schema._micros_of_real
    assert convert(None) is None
    assert convert(18.532601999999997) == 18_532_602
    assert convert(0.30000000000000004) == 300_000
    assert convert(1e15) == MAX_MICROS
    assert convert(3) == 3_000_000


# -- the label index ------------------------------------------------------------------------------


def label_rows(path: Path) -> tuple[set[tuple[str, str, str]], set[tuple[str, str, str]]]:
    """(the label index, the labels every agent's row holds) read with raw sqlite3."""
    db = raw(path)
    try:
        index = set(db.execute("SELECT agent_id, key, value FROM iron_labels").fetchall())
        held = {
            (agent, key, value)
            for agent, text in db.execute("SELECT agent_id, labels FROM iron_agents WHERE labels IS NOT NULL")
            for key, value in json.loads(text).items()
        }
        return index, held
    finally:
        db.close()


def test_the_label_index_follows_every_write(path: Path) -> None:
    rng = random.Random(5)
    teams = ["a", "b", "c"]
    with StateManager.with_sqlite(path) as manager:
        ids = [AgentId.generate() for _ in range(30)]

        def labels() -> dict[str, str]:
            chosen = {"team": rng.choice(teams)}
            if rng.random() < 0.5:
                chosen["user"] = rng.choice(["ann", "bo", "ünï"])
            return {} if rng.random() < 0.2 else chosen

        for _ in range(400):
            agent_id = rng.choice(ids)
            action = rng.randrange(6)
            if action == 0:
                manager.save_agent_state(AgentState(agent_id, AgentStatus.RUNNING, labels=labels()))
            elif action == 1:
                manager.save_agent_states(
                    [AgentState(a, AgentStatus.STOPPED, labels=labels()) for a in rng.sample(ids, 4)]
                )
            elif action == 2 and manager.get_agent_state(agent_id) is not None:
                new = labels()
                manager.update_agent_state(agent_id, lambda s, new=new: _relabel(s, new))
            elif action == 3:
                manager.remove_agent_state(agent_id)
            elif action == 4:
                manager.purge_agents(older_than=0, status=[AgentStatus.FAILED])
            elif manager.get_agent_state(agent_id) is not None:
                manager.set_status(agent_id, rng.choice(list(AgentStatus)))
            index, held = label_rows(path)
            assert index == held
        everyone = list(manager.iter_agent_states())
        for team in teams:
            for status in (None, *AgentStatus):
                for user in (None, "ünï"):
                    wanted = {"team": team} if user is None else {"team": team, "user": user}
                    expected = [
                        s
                        for s in everyone
                        if all(s.labels.get(k) == v for k, v in wanted.items())
                        and (status is None or s.status is status)
                    ]
                    got = list(manager.iter_agent_states(status=status, labels=wanted, batch_size=3))
                    assert got == sorted(expected, key=lambda s: s.agent_id.as_str())


def _relabel(state: AgentState, labels: dict[str, str]) -> AgentState:
    state.labels = labels
    return state


@pytest.mark.parametrize(("status", "others"), [(None, 0), (AgentStatus.STOPPED, 0), (None, 2)])
def test_a_label_filter_reads_only_the_matching_agents(
    path: Path, status: AgentStatus | None, others: int
) -> None:
    with StateManager.with_sqlite(path) as manager:
        manager.save_agent_states(
            [
                AgentState(AgentId.generate(), AgentStatus.RUNNING, labels={"team": f"t{i % 50}"})
                for i in range(500)
            ]
        )
        db = raw(path)
        try:
            db.execute("ANALYZE")
            sql = store._label_page(status, others)
            params = ("team", "t1", "", *["k", "v"] * others, 10)
            plan = " | ".join(row[3] for row in db.execute("EXPLAIN QUERY PLAN " + sql, params).fetchall())
        finally:
            db.close()
        assert (
            "SEARCH l USING COVERING INDEX iron_labels_by_value (key=? AND value=? AND agent_id>?)" in plan
        ), plan
        assert "SEARCH a USING PRIMARY KEY (agent_id=?)" in plan, plan
        assert "SCAN" not in plan, plan
        assert "TEMP B-TREE" not in plan, plan


# -- budget scopes and their holds ----------------------------------------------------------------


def scope_hold_rows(path: Path) -> tuple[set[tuple[str, str, str, int]], set[tuple[str, str, str, int]]]:
    """(iron_scope_holds, what the holds naming scopes imply for the scopes that exist)."""
    db = raw(path)
    try:
        entries = set(
            db.execute("SELECT scope, agent_id, reservation_id, amount FROM iron_scope_holds").fetchall()
        )
        scopes = {scope for (scope,) in db.execute("SELECT scope FROM iron_budgets")}
        implied = {
            (scope, agent, reservation, amount)
            for agent, reservation, amount, text in db.execute(
                "SELECT agent_id, reservation_id, amount, scopes FROM iron_holds WHERE scopes IS NOT NULL"
            )
            for scope in json.loads(text)
            if scope in scopes
        }
        return entries, implied
    finally:
        db.close()


def test_scope_holds_follow_every_hold(path: Path) -> None:
    rng = random.Random(9)
    with StateManager.with_sqlite(path) as manager:
        for scope in ("org:o", "team:a", "team:b"):
            manager.set_budget(scope, limit=1000.0)
        ids = [AgentId.generate() for _ in range(6)]
        scope_lists = [("org:o", "team:a"), ("org:o", "team:b"), ("team:a",)]

        def save(agent_id: AgentId) -> None:
            scopes = rng.choice(scope_lists)
            manager.save_agent_state(AgentState(agent_id, AgentStatus.RUNNING, budget_scopes=scopes))

        for agent_id in ids:
            save(agent_id)
        holds = []
        dropped: set[tuple[str, str, str]] = set()
        for _ in range(300):
            action = rng.randrange(8)
            try:
                if action < 3:
                    holds.append(manager.reserve_budget(rng.choice(ids), 1.0, ttl=rng.choice([60.0, 0.05])))
                elif action == 3 and holds:
                    manager.commit_reservation(holds.pop(rng.randrange(len(holds))), 0.5)
                elif action == 4 and holds:
                    manager.release_reservation(holds.pop(rng.randrange(len(holds))))
                elif action == 5:
                    agent_id = rng.choice(ids)
                    manager.remove_agent_state(agent_id)
                    save(agent_id)
                elif action == 6:
                    scope = rng.choice(["team:a", "team:b"])
                    # The holds made before stay open on the agent and the other scopes, and
                    # count nowhere on the scope made again under the same name.
                    dropped |= {entry[:3] for entry in scope_hold_rows(path)[1] if entry[0] == scope}
                    manager.remove_budget(scope)
                    manager.set_budget(scope, limit=1000.0)
                else:
                    time.sleep(0.01)
            except ReservationError:
                pass  # a hold that expired, or was dropped with its agent
            entries, implied = scope_hold_rows(path)
            assert entries == {entry for entry in implied if entry[:3] not in dropped}
        now = time.time()
        for budget in backend_of(manager).list_budgets(now):
            db = raw(path)
            try:
                open_total = db.execute(
                    "SELECT coalesce(sum(amount), 0) FROM iron_scope_holds WHERE scope = ? "
                    "AND expires_at > (julianday('now') - 2440587.5) * 86400.0",
                    (budget.scope,),
                ).fetchone()[0]
            finally:
                db.close()
            assert budget.held == open_total


def test_a_scopes_held_total_reads_only_its_open_holds(path: Path) -> None:
    StateManager.with_sqlite(path).close()
    db = raw(path)
    try:
        plan = " | ".join(row[3] for row in db.execute("EXPLAIN QUERY PLAN " + spending._SQL_SCOPE, ("s",)))
    finally:
        db.close()
    assert "SEARCH h USING PRIMARY KEY (scope=? AND expires_at>?)" in plan, plan


# -- statements per spend ------------------------------------------------------------------------


def traced(manager: StateManager, call: object) -> list[str]:
    """The statements one call ran on this thread's connection."""
    connection = backend_of(manager)._connections.get().db
    statements: list[str] = []
    connection.set_trace_callback(statements.append)
    try:
        assert callable(call)
        call()
    finally:
        connection.set_trace_callback(None)
    # The trace repeats a statement once for each trigger program it runs: keep one of each.
    return [s for i, s in enumerate(statements) if i == 0 or s != statements[i - 1]]


def test_a_spend_with_scopes_or_a_period_is_one_short_transaction(path: Path) -> None:
    with StateManager.with_sqlite(path) as manager:
        manager.set_budget("org:o", limit=100.0, period="month")
        manager.set_budget("team:a", limit=100.0)
        scoped = AgentState(AgentId.generate(), AgentStatus.RUNNING, budget_scopes=("org:o", "team:a"))
        periodic = AgentState(AgentId.generate(), AgentStatus.RUNNING, budget_limit=5.0, budget_period="day")
        plain = AgentState(AgentId.generate(), AgentStatus.RUNNING, budget_limit=5.0)
        manager.save_agent_states([scoped, periodic, plain])
        statements = traced(manager, lambda: manager.record_spend(scoped.agent_id, 1.0))
        # Read the agent, read its scopes, write the agent, write the scopes; then the spend's
        # record (the chain's head read, the record written) and its ledger row.
        record = ["SELECT", "INSERT", "INSERT"]
        assert (statements[0], statements[-1]) == ("BEGIN IMMEDIATE", "COMMIT"), statements
        assert [s.split()[0] for s in statements[1:-1]] == [
            "SELECT",
            "SELECT",
            "UPDATE",
            "UPDATE",
            "UPDATE",
            *record,
        ]  # agent, 2 scopes
        statements = traced(manager, lambda: manager.record_spend(periodic.agent_id, 1.0))
        assert [s.split()[0] for s in statements] == ["BEGIN", "SELECT", "UPDATE", *record, "COMMIT"]
        statements = traced(manager, lambda: manager.record_spend(plain.agent_id, 1.0))
        # The one checked UPDATE, then the record.
        assert [s.split()[0] for s in statements] == ["BEGIN", "UPDATE", *record, "COMMIT"], statements
        assert statements[1].startswith("UPDATE iron_agents"), statements
        assert [b.spent for b in manager.list_budgets()] == [1.0, 1.0]


def test_a_hold_on_an_agent_without_scopes_or_period_is_one_statement(path: Path) -> None:
    with StateManager.with_sqlite(path) as manager:
        manager.set_budget("team:a", limit=100.0)
        plain = AgentState(AgentId.generate(), AgentStatus.RUNNING, budget_limit=5.0)
        scoped = AgentState(AgentId.generate(), AgentStatus.RUNNING, budget_scopes=("team:a",))
        manager.save_agent_states([plain, scoped])
        before = time.time()
        holds = []
        statements = traced(
            manager, lambda: holds.append(manager.reserve_budget(plain.agent_id, 2.0, ttl=60))
        )
        assert len(statements) == 1, statements
        assert statements[0].startswith("INSERT INTO iron_holds"), statements
        assert before + 59 < holds[0].expires_at < time.time() + 61  # the database's clock
        assert holds[0].scopes == ()
        assert not backend_of(manager)._connections.get().db.in_transaction

        # Refused (its event appended), with scopes, or with a lapsed hold to clear: a transaction.
        def refused() -> None:
            with pytest.raises(BudgetExceeded):
                manager.reserve_budget(plain.agent_id, 4.0)

        for call in (refused, lambda: manager.reserve_budget(scoped.agent_id, 1.0)):
            statements = traced(manager, call)
            assert "BEGIN IMMEDIATE" in statements, statements
        assert manager.audit_log(event_type="budget_exceeded", limit=5)[-1].event.agent_id == plain.agent_id
        manager.reserve_budget(plain.agent_id, 1.0, ttl=0.05)
        time.sleep(0.1)
        statements = traced(manager, lambda: manager.reserve_budget(plain.agent_id, 1.0))
        assert "BEGIN IMMEDIATE" in statements, statements
        db = raw(path)
        try:
            amounts = db.execute(
                "SELECT amount FROM iron_holds WHERE agent_id = ? ORDER BY amount", (plain.agent_id.as_str(),)
            ).fetchall()
        finally:
            db.close()
        assert amounts == [(1_000_000,), (2_000_000,)]  # the lapsed hold was cleared
        assert manager.commit_reservation(holds[0], 1.5).budget_spent == 1.5


def test_a_total_past_the_largest_amount_changes_nothing(path: Path) -> None:
    with StateManager.with_sqlite(path) as manager:
        agent_id = AgentId.generate()
        manager.save_agent_state(AgentState(agent_id, AgentStatus.RUNNING, 1e9 - 1))
        with pytest.raises(ValidationError, match="past the largest amount"):
            manager.record_spend(agent_id, 2)  # the one-statement spend refuses; the transaction says why
        assert manager.record_spend(agent_id, 1).budget_spent == 1e9
        assert manager.stats().budget_spent == 1e9


# -- many processes and threads on shared scopes -------------------------------------------------


def test_four_processes_of_eight_threads_never_pass_a_shared_scope(path: Path, workers: Workers) -> None:
    limits = {"org:o": 80.0, "team:a": 50.0, "team:b": 50.0}
    with StateManager.with_sqlite(path) as manager:
        for scope, limit in limits.items():
            manager.set_budget(scope, limit=limit)
        team_of = {}
        for i in range(8):
            team = "team:a" if i % 2 else "team:b"
            state = AgentState(
                AgentId.generate(), AgentStatus.RUNNING, budget_limit=15.0, budget_scopes=("org:o", team)
            )
            manager.save_agent_state(state)
            team_of[state.agent_id.as_str()] = team
        agents = ",".join(team_of)
        procs = [workers.spawn("scoped", url_of(path), agents, seed, 100) for seed in range(4)]
        workers.start_together(procs)
        backend = backend_of(manager)
        watched = 0
        while any(proc.poll() is None for proc in procs):  # watch from outside: never past a limit
            for row in backend.list_budgets(time.time()):
                assert row.spent + row.held <= to_micros(limits[row.scope]), row
            for key in team_of:
                state, held = backend.reserved(AgentId(key), time.time())
                assert to_micros(state.budget_spent) + held <= 15_000_000, (state, held)
            watched += 1
        charged: dict[str, int] = dict.fromkeys(team_of, 0)
        for proc in procs:
            [line] = workers.finish(proc)
            for key, micros in json.loads(line.split(" ", 1)[1]).items():
                charged[key] += micros
        assert watched > 0
        for key, state in zip(team_of, manager.get_agent_states(list(team_of)), strict=True):
            assert state is not None
            assert to_micros(state.budget_spent) == charged[key]  # every charge reported, and no other
        budgets = {b.scope: b for b in manager.list_budgets()}
        assert to_micros(budgets["org:o"].spent) == sum(charged.values())
        for team in ("team:a", "team:b"):
            assert to_micros(budgets[team].spent) == sum(v for k, v in charged.items() if team_of[k] == team)
        assert all(b.held == 0.0 and b.spent <= limits[b.scope] for b in budgets.values())
        refusals = manager.audit_log(event_type="budget_exceeded")
        assert {json.loads(r.event.details).get("scope") for r in refusals} >= {"org:o"}  # contended
        assert to_micros(manager.stats().budget_spent) == sum(charged.values())


def test_holds_of_a_killed_process_leave_every_scope_after_their_ttl(path: Path, workers: Workers) -> None:
    with StateManager.with_sqlite(path) as manager:
        manager.set_budget("org:o", limit=10.0)
        manager.set_budget("team:a", limit=10.0)
        agent_id = AgentId.generate()
        manager.save_agent_state(AgentState(agent_id, AgentStatus.RUNNING, budget_scopes=("org:o", "team:a")))
        holder = workers.spawn("hold", url_of(path), agent_id, 6.0, 2.0)
        assert holder.stdout is not None
        held = [holder.stdout.readline().split() for _ in range(2)]
        assert [h[0] for h in held] == ["held", "held"]
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
        expires_at = min(float(h[2]) for h in held)
        if time.time() < expires_at - 0.3:
            assert [b.held for b in manager.list_budgets()] == [6.0, 6.0]
            with pytest.raises(BudgetExceeded) as refused:
                manager.reserve_budget(agent_id, 5.0)
            assert refused.value.scope == "org:o"
        time.sleep(max(0.0, expires_at - time.time()) + 0.1)
        assert [(b.held, b.available) for b in manager.list_budgets()] == [(0.0, 10.0), (0.0, 10.0)]
        hold = manager.reserve_budget(agent_id, 10.0)  # the dead process's holds are gone everywhere
        manager.commit_reservation(hold, 10.0)
        assert [b.spent for b in manager.list_budgets()] == [10.0, 10.0]


def test_a_missing_scope_is_found_before_anything_changes(path: Path) -> None:
    with StateManager.with_sqlite(path) as manager:
        manager.set_budget("org:o", limit=10.0, period="day")
        agent_id = AgentId.generate()
        manager.save_agent_state(AgentState(agent_id, AgentStatus.RUNNING, budget_scopes=("org:o", "team:x")))
        before = sqlite3.connect(path).execute("SELECT * FROM iron_budgets").fetchall()
        for call in (
            lambda: manager.record_spend(agent_id, 1.0),
            lambda: manager.reserve_budget(agent_id, 1.0),
        ):
            with pytest.raises(BudgetNotFound) as missing:
                call()
            assert (missing.value.scope, missing.value.agent_id) == ("team:x", agent_id.as_str())
        assert sqlite3.connect(path).execute("SELECT * FROM iron_budgets").fetchall() == before
        assert manager.audit_count() == 1  # budget_set only


def test_stats_are_exact_integers_after_many_small_spends(path: Path) -> None:
    with StateManager.with_sqlite(path) as manager:
        agent_id = AgentId.generate()
        manager.save_agent_state(AgentState(agent_id, AgentStatus.RUNNING))
        for _ in range(3000):
            manager.record_spend(agent_id, 0.1)
        assert manager.get_agent_state(agent_id).budget_spent == 300.0  # type: ignore[union-attr]
        assert manager.stats().budget_spent == 300.0
        manager.update_agent_state(agent_id, lambda s: _spent(s, 0.0))
        assert repr(manager.stats().budget_spent) == "0.0"
    assert from_micros(0) == 0.0


def _spent(state: AgentState, spent: float) -> AgentState:
    state.budget_spent = spent
    return state
