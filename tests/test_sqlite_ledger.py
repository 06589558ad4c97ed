"""What only the SQLite store has of the spend ledger (issue 17): its index table, the schema
migration that adds it and the thresholds, its query plans, and a SIGKILLed writer.

The ledger's behaviour every store shares (records, reports, thresholds) is in
tests/contract, which runs on SQLite too. Here: files written by 0.4, 0.5 and 0.6 open and
migrate; each ``iron_ledger`` row matches its chained ``spend`` record; the SQL reports equal
``ledger.aggregate`` over the same records, on random data; a report over a span reads the
span from an index; pruning takes the rows with the records; a writer killed at any moment
never leaves a charge without its record and row.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from iron_runtime_state import AgentId, AgentState, AgentStatus, StateManager
from iron_runtime_state.audit_chain import AuditChain
from iron_runtime_state.backends import AuditQuery, Backend
from iron_runtime_state.backends.sqlite import SCHEMA_VERSION, SQLiteBackend
from iron_runtime_state.backends.sqlite import ledger as sqlite_ledger
from iron_runtime_state.ledger import LedgerEntry, SpendNote, SpendQuery, aggregate, entry_of
from iron_runtime_state.models import AuditRecord, Reservation
from iron_runtime_state.money import to_micros

from .sqlite_support import Workers, header_of, raw, url_of, worker_group

DATA = Path(__file__).with_name("data")
DAY = 86_400
#: The clock store-0.6.db was written at (tests/data/make_store_0_6.py): 2026-03-10 12:00 UTC.
NOW_0_6 = 1_773_144_000.0


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state.db"


@pytest.fixture
def workers() -> Iterator[Workers]:
    yield from worker_group()


def ledger_rows(path: Path) -> list[tuple[object, ...]]:
    """Every ``iron_ledger`` row, read with raw sqlite3, in seq order."""
    db = raw(path)
    try:
        return db.execute(
            "SELECT seq, ts, agent_id, amount, scopes, labels, model, input_tokens, output_tokens, "
            "cached_input_tokens, tags FROM iron_ledger ORDER BY seq"
        ).fetchall()
    finally:
        db.close()


def as_row(e: LedgerEntry) -> tuple[object, ...]:
    """A ledger entry read from a record, in the shape :func:`ledger_rows` reads the table."""

    def text(mapping: object) -> str | None:
        return (
            json.dumps(mapping, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
            if mapping
            else None
        )

    scopes = '["' + '","'.join(e.scopes) + '"]' if e.scopes else None
    return (
        e.seq,
        e.timestamp,
        e.agent_id,
        e.amount,
        scopes,
        text(dict(e.labels)),
        e.model,
        e.input_tokens,
        e.output_tokens,
        e.cached_input_tokens,
        text(dict(e.tags)),
    )


def spend_records(backend: Backend) -> list[AuditRecord]:
    return backend.query_audit(AuditQuery(event_type="spend"))


def assert_rows_match_records(path: Path, backend: Backend) -> list[LedgerEntry]:
    """Each ledger row is its spend record's entry, and each spend record has its row."""
    entries = [entry_of(record) for record in spend_records(backend)]
    assert ledger_rows(path) == [as_row(e) for e in entries]
    return entries


# -- files written by older versions ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "version"),
    [("store-0.4.db", 1), ("store-0.4-keyed.db", 1), ("store-0.5.db", 3), ("store-0.6.db", 4)],
)
def test_older_files_gain_the_ledger_and_thresholds(path: Path, name: str, version: int) -> None:
    shutil.copy(DATA / name, path)
    assert header_of(path)[0] == version
    key = "k" * 32 if "keyed" in name else None
    with StateManager.with_sqlite(path, audit_key=key) as manager:
        assert header_of(path)[0] == SCHEMA_VERSION == 5
        assert ledger_rows(path) == []  # spends before this version have no record: no row
        assert manager.audit_log(event_type="spend") == []
        agent = AgentId.test_fixture(1)
        state = manager.get_agent_state(agent)
        assert state is not None
        assert state.budget_thresholds == (0.5, 0.8, 1.0)  # the default
        manager.record_spend(agent, "0.25", tags={"run": "first"})
        entries = assert_rows_match_records(path, manager.backend)
        assert [(e.agent_id, e.amount, dict(e.tags)) for e in entries] == [
            (agent.as_str(), 250_000, {"run": "first"})
        ]
        if key is None:
            assert manager.verify_audit_log().ok
    db = raw(path)
    try:
        agents = db.execute("SELECT DISTINCT budget_thresholds, typeof(alerted) FROM iron_agents").fetchall()
        assert agents == [(None, "real")]  # default thresholds (NULL), a level of its own
        budgets = db.execute("SELECT thresholds, alerted FROM iron_budgets").fetchall()
        assert set(budgets) <= {(None, 0.0)}
    finally:
        db.close()


def test_a_0_6_file_alerts_from_its_next_spend_and_keeps_the_levels(path: Path) -> None:
    # Agent 1 of store-0.6.db spent 7.5 of its 10 today (periods of a day, in 2026-03-10) with
    # no alert: 0.6 had none. Migrated, nothing is alerted yet, so its next spend alerts every
    # threshold it has reached, once; the levels are kept by saves and set back by a new day.
    shutil.copy(DATA / "store-0.6.db", path)
    clock = [NOW_0_6 + 60]
    agent = AgentId.test_fixture(1)
    with StateManager.with_sqlite(path, clock=lambda: clock[0]) as manager:
        before = manager.get_agent_state(agent)
        assert before is not None
        assert before.budget_spent == 7.5
        assert (before.labels, before.budget_scopes) == (
            {"env": "prod", "team": "support"},
            ("team:support", "org:acme"),
        )
        manager.record_spend(agent, "0.5")
        spend, *alerts = manager.audit_log(agent_id=agent)[1:]  # after 0.6's one note
        assert spend.event_type == "spend"
        assert json.loads(spend.details) == {
            "amount": 0.5,
            "labels": {"env": "prod", "team": "support"},
            "scopes": ["team:support", "org:acme"],
        }
        assert [(r.event_type, json.loads(r.details)["threshold"]) for r in alerts] == [
            ("budget_threshold", 0.5),
            ("budget_threshold", 0.8),
        ]
        assert json.loads(alerts[0].details)["period_start"] == 1_773_100_800  # the agent's day
        assert alert_levels(path, agent) == (0.8, {"team:support": 0.0, "org:acme": 0.0})
        # A save and an update of the agent keep its level: 8.5 alerts nothing new.
        manager.save_agent_state(manager.get_agent_state(agent))  # type: ignore[arg-type]
        manager.update_agent_state(agent, lambda s: s)
        manager.record_spend(agent, "0.5")
        assert len(manager.audit_log(agent_id=agent, event_type="budget_threshold")) == 2
        assert alert_levels(path, agent)[0] == 0.8
        # The next day starts from nothing spent and nothing alerted.
        clock[0] += DAY
        manager.record_spend(agent, "6")
        found = manager.audit_log(agent_id=agent, event_type="budget_threshold")
        assert [json.loads(r.details)["threshold"] for r in found] == [0.5, 0.8, 0.5]
        assert alert_levels(path, agent)[0] == 0.5
        assert_rows_match_records(path, manager.backend)
        assert manager.verify_audit_log().ok


def alert_levels(path: Path, agent: AgentId) -> tuple[float, dict[str, float]]:
    """The agent's alerted level and each scope's, as stored."""
    db = raw(path)
    try:
        (level,) = db.execute(
            "SELECT alerted FROM iron_agents WHERE agent_id = ?", (agent.as_str(),)
        ).fetchone()
        scopes = dict(db.execute("SELECT scope, alerted FROM iron_budgets").fetchall())
    finally:
        db.close()
    return level, scopes


def test_thresholds_are_stored_as_text_null_for_the_default(path: Path) -> None:
    agents = [AgentId.test_fixture(n) for n in range(1, 4)]
    with StateManager.with_sqlite(path) as manager:
        manager.save_agent_states(
            [
                AgentState(agents[0], AgentStatus.RUNNING),
                AgentState(agents[1], AgentStatus.RUNNING, budget_thresholds=()),
                AgentState(agents[2], AgentStatus.RUNNING, budget_thresholds=(0.25, 0.9)),
            ]
        )
        manager.set_budget("team:a", limit=10, thresholds=(0.75,))
        manager.set_budget("team:b", limit=10)
    with StateManager.with_sqlite(path) as manager:  # read back from the file
        got = [s.budget_thresholds for s in manager.get_agent_states(agents)]  # type: ignore[union-attr]
        assert got == [(0.5, 0.8, 1.0), (), (0.25, 0.9)]
        assert [b.thresholds for b in manager.list_budgets()] == [(0.75,), (0.5, 0.8, 1.0)]
    db = raw(path)
    try:
        stored = db.execute("SELECT budget_thresholds FROM iron_agents ORDER BY agent_id").fetchall()
        assert stored == [(None,), ("",), ("0.25,0.9",)]
        assert db.execute("SELECT thresholds FROM iron_budgets ORDER BY scope").fetchall() == [
            ("0.75",),
            (None,),
        ]
    finally:
        db.close()


# -- the index rows and the reports, on random data -------------------------------------------------

_BASE = 1_790_000_000  # 2026-09-21
_MODELS = ("gpt-4o", "claude-sonnet", "gemini-flash")


def _random_ledger(backend: SQLiteBackend, rng: random.Random, spends: int) -> None:
    """Spends and commits by agents with and without labels and scopes, notes and tags, over 12
    days; labels change, a scope is removed while a hold on it is open, an agent is removed."""
    chain = AuditChain(None)
    for scope in ("org:o", "team:a", "team:b"):
        backend.set_budget(scope, None, None, "UTC", _BASE, chain)
    label_sets = [{}, {"team": "a"}, {"team": "b", "env": "prod"}, {"env": "dev"}]
    scope_sets = [(), ("org:o",), ("team:a", "org:o"), ("team:b",)]
    agents = [AgentId.generate() for _ in range(8)]
    for k, agent in enumerate(agents):
        state = AgentState(
            agent, AgentStatus.RUNNING, labels=label_sets[k % 4], budget_scopes=scope_sets[(k // 2) % 4]
        )
        backend.save(state, _BASE)
    open_holds: list[tuple[Reservation, int]] = []
    live = list(agents)
    for i in range(spends):
        now = _BASE + rng.randrange(12 * DAY)
        agent = rng.choice(live)
        note = rng.choice(
            [
                None,
                SpendNote(),
                SpendNote(
                    model=rng.choice(_MODELS),
                    input_tokens=rng.randrange(5_000),
                    output_tokens=rng.randrange(900),
                ),
                SpendNote(
                    model=rng.choice(_MODELS),
                    input_tokens=rng.randrange(5_000),
                    output_tokens=rng.randrange(900),
                    cached_input_tokens=rng.randrange(100),
                    tags={"run": rng.choice(["nightly", "adhoc"])},
                ),
                SpendNote(tags={"run": "nightly", "user": rng.choice(["u1", "u2"])}),
            ]
        )
        amount = rng.randrange(0, 3_000_000)
        if rng.random() < 0.6:
            backend.record_spend(agent, amount, now, chain, note)
        else:
            held = backend.reserve(agent, amount + 1, 3_600, now, f"r{i}", chain)
            assert isinstance(held, Reservation)
            open_holds.append((held, amount))
            if rng.random() < 0.7:
                hold, actual = open_holds.pop(rng.randrange(len(open_holds)))
                backend.commit(hold, actual, now, chain, note)
        if i == spends // 3:  # new labels count from now on; the old records keep theirs
            backend.save(AgentState(agents[1], AgentStatus.RUNNING, labels={"team": "c"}), now)
        if i == spends // 2:  # the holds on it are committed without it
            backend.remove_budget("team:b", now, chain)
            for k, agent in enumerate(agents):
                if "team:b" in scope_sets[(k // 2) % 4]:
                    backend.save(AgentState(agent, AgentStatus.RUNNING, labels=label_sets[k % 4]), now)
        if i == 2 * spends // 3:
            backend.remove(agents[2])
            live.remove(agents[2])
            open_holds = [(h, a) for h, a in open_holds if h.agent_id != agents[2]]
    for hold, actual in open_holds:
        backend.commit(hold, actual, _BASE + 12 * DAY, chain, None)


def _random_query(rng: random.Random) -> SpendQuery:
    keys = ("bucket", "agent", "scope", "model", "label:team", "label:env", "tag:run", "tag:user")
    since = rng.choice([None, _BASE + rng.randrange(6 * DAY)])
    until = rng.choice([None, _BASE + rng.randrange(6 * DAY, 13 * DAY)])
    return SpendQuery(
        since=since,
        until=until,
        keys=tuple(rng.sample(keys, rng.randrange(0, 4))),
        scope=rng.choice([None, None, "org:o", "team:b"]),
        model=rng.choice([None, None, None, "gpt-4o"]),
        labels=rng.choice([{}, {}, {"team": "a"}, {"env": "prod", "team": "b"}]),
        tags=rng.choice([{}, {}, {"run": "nightly"}]),
    )


def _sorted(totals: Sequence[object]) -> list[str]:
    return sorted(repr(t) for t in totals)


def test_ledger_rows_match_the_records_and_sql_totals_match_aggregate(path: Path) -> None:
    rng = random.Random(17)
    backend = SQLiteBackend(path)
    try:
        _random_ledger(backend, rng, 600)
        entries = assert_rows_match_records(path, backend)
        assert len(entries) > 450
        agent_query = SpendQuery(keys=("agent",), agent_id=entries[0].agent_id)
        for query in [agent_query, SpendQuery(), SpendQuery(keys=("scope",))] + [
            _random_query(rng) for _ in range(300)
        ]:
            sql = backend.spend_totals(query)
            assert _sorted(sql) == _sorted(aggregate(entries, query)), query
            # The Backend's default (reading the records) agrees with the index.
            assert _sorted(sql) == _sorted(Backend.spend_totals(backend, query)), query
        assert backend.spend_totals(SpendQuery(since=_BASE + 99 * DAY)) == []
    finally:
        backend.close()


@pytest.mark.parametrize(
    ("query", "index"),
    [
        (SpendQuery(keys=("bucket",), since=_BASE, until=_BASE + DAY), "PRIMARY KEY (bucket>? AND bucket<?)"),
        (SpendQuery(keys=("bucket", "scope"), since=_BASE), "PRIMARY KEY (bucket>?)"),
        (
            SpendQuery(keys=("bucket",), agent_id="agent_x", since=_BASE),
            "INDEX iron_ledger_by_agent (agent_id=? AND bucket>?)",
        ),
        (
            SpendQuery(keys=("agent",), model="gpt-4o", until=_BASE),
            "INDEX iron_ledger_by_model (model=? AND bucket<?)",
        ),
    ],
)
def test_a_report_reads_its_span_from_an_index(path: Path, query: SpendQuery, index: str) -> None:
    StateManager.with_sqlite(path).close()
    sql, params = sqlite_ledger.totals_select(query)
    db = raw(path)
    try:
        plan = " | ".join(row[3] for row in db.execute("EXPLAIN QUERY PLAN " + sql, params).fetchall())
    finally:
        db.close()
    assert f"SEARCH l USING {index}" in plan, plan
    assert "SCAN l" not in plan, plan
    if query.keys == ("bucket",):  # grouped in the key's order, not sorted
        assert "TEMP B-TREE" not in plan, plan


def test_pruning_takes_the_ledger_rows_of_the_pruned_records(path: Path) -> None:
    rng = random.Random(5)
    backend = SQLiteBackend(path)
    chain = AuditChain(None)
    try:
        _random_ledger(backend, rng, 200)
        records = spend_records(backend)
        # Records are pruned in seq order up to the first at or after the bound: find a bound
        # that cuts the trail in two, like an operator pruning old records.
        ordered = backend.query_audit(AuditQuery())
        cut = len(ordered) // 2
        before = max(r.timestamp for r in ordered[:cut]) + 1
        removed = backend.prune_audit(before, chain)
        assert 0 < removed < len(ordered)
        kept = spend_records(backend)
        assert 0 < len(kept) < len(records)
        entries = assert_rows_match_records(path, backend)
        query = SpendQuery(keys=("bucket", "agent"))
        assert _sorted(backend.spend_totals(query)) == _sorted(aggregate(entries, query))
        assert backend.prune_audit(_BASE + 99 * DAY, chain) > 0  # everything
        assert ledger_rows(path) == []
        assert backend.spend_totals(SpendQuery(keys=("bucket",))) == []
    finally:
        backend.close()


def test_a_failed_settle_writes_no_ledger_row(path: Path) -> None:
    with StateManager.with_sqlite(path) as manager:
        agent = AgentId.generate()
        manager.save_agent_state(
            AgentState(agent, AgentStatus.RUNNING, budget_limit=1.0, budget_scopes=("team:x",))
        )
        with pytest.raises(Exception, match="team:x"):
            manager.record_spend(agent, "0.5")  # the scope does not exist: nothing changes
        manager.set_budget("team:x", limit=None)
        with pytest.raises(Exception, match="limit"):
            manager.record_spend(agent, "2")  # refused: budget_exceeded, no spend
        hold = manager.reserve_budget(agent, "0.5")
        manager.commit_reservation(hold, "0.25")
        with pytest.raises(Exception, match="not open"):
            manager.commit_reservation(hold, "0.25")
        assert [row[3] for row in ledger_rows(path)] == [250_000]
        assert_rows_match_records(path, manager.backend)


# -- a writer killed at any moment ------------------------------------------------------------------


def test_a_killed_writer_never_leaves_a_charge_without_its_record(path: Path, workers: Workers) -> None:
    # Spends and commits (each a charge, its spend record, its ledger row and the threshold
    # alerts it implies, in one transaction) by two processes SIGKILLed mid-loop, twenty times:
    # what the budgets show as spent is always what the records and the rows add up to.
    url = url_of(path)
    plain, scoped = AgentId.generate(), AgentId.generate()
    with StateManager.with_sqlite(path) as manager:
        # Ten thresholds of 0.01%..0.1% of 1000: the scope alerts every 0.1 spent, up to 1.0.
        manager.set_budget("team:k", limit=1000, thresholds=[n / 10_000 for n in range(1, 11)])
        manager.save_agent_states(
            [
                AgentState(plain, AgentStatus.RUNNING, budget_limit=1e6),
                AgentState(scoped, AgentStatus.RUNNING, budget_scopes=("team:k",)),
            ]
        )
    rng = random.Random(9)
    for _ in range(20):
        procs = [workers.spawn("ledger", url, plain, scoped) for _ in range(2)]
        for proc in procs:
            line = proc.stdout.readline() if proc.stdout else ""
            assert line == "ready\n", proc.stderr.read() if proc.stderr else line
        time.sleep(rng.uniform(0.05, 0.3))
        for proc in procs:
            os.kill(proc.pid, signal.SIGKILL)
        for proc in procs:
            _, err = workers.rest_of(proc)
            assert proc.returncode == -signal.SIGKILL, err
    with StateManager.with_sqlite(path) as manager:
        entries = assert_rows_match_records(path, manager.backend)
        for agent in (plain, scoped):
            state = manager.get_agent_state(agent)
            assert state is not None
            recorded = sum(e.amount for e in entries if e.agent_id == agent.as_str())
            assert to_micros(state.budget_spent) == recorded > 0, "a charge without its record"
        scope = manager.get_budget("team:k")
        assert scope is not None
        assert to_micros(scope.spent) == sum(e.amount for e in entries if "team:k" in e.scopes)
        totals = manager.backend.spend_totals(SpendQuery(keys=("agent",)))
        assert sorted((t.key[0], t.amount) for t in totals) == sorted(
            (a.as_str(), sum(e.amount for e in entries if e.agent_id == a.as_str())) for a in (plain, scoped)
        )
        # Each threshold alerted once, in order, each with the spend that reached it; the level
        # stored is the last one alerted.
        alerts = [json.loads(r.details) for r in manager.audit_log(event_type="budget_threshold")]
        levels = [a["threshold"] for a in alerts]
        assert levels, "the run crossed no threshold"
        assert levels == sorted(set(levels)), levels
        assert all(a["scope"] == "team:k" and a["spent"] >= a["threshold"] * 1000 - 1e-9 for a in alerts)
        assert alert_levels(path, scoped)[1]["team:k"] == levels[-1]
        report = manager.verify_audit_log()
        assert report.ok, report
