"""SQLite store: our operations against raw sqlite3 running the same statements, same run.

Run: .venv/bin/python bench/bench_sqlite.py [--quick] [--json out.json] [--dir DIR]

Baseline: a plain ``sqlite3`` connection on a second file that has the same schema (made by
the store itself: tables, indexes and the triggers that keep the fleet totals and the chain
head) and the same pragmas (WAL, synchronous=NORMAL, the same busy timeout), running the very
statements the store runs, in autocommit or one transaction as the store does. The ratio is
therefore the price of everything the library adds in Python: validation, the id and state
objects, the read cache check, hashing, the records it returns. ``record_spend`` is the
exception: its baseline is the least any store does, one transaction of a bare ``UPDATE``
adding to the spend (no status, limit or holds check), the spend's chained record (hashed in
advance) and its ledger row, so its ratio also prices the checks. For transparency the two
write paths are also timed against a plain table without triggers (informational). Each file
first takes 4,000 writes, so that what is timed is the steady state of a running service, in
which the WAL is checkpointed regularly.

Then the budget model (issue 16), each a ratio in the same run: a spend, and a reserve + commit,
on an agent drawing on two budget scopes against one drawing on none (target <= 2.5x).

Then the spend ledger (issue 17, bench/bench_sqlite_ledger.py): a spend, and a reserve + commit,
each with its ledger record, on this tree against the same code on 0.6.0 without one (target
<= 2x), and the by-day spend report over 1,000,000 ledger rows (target < 1 s).

Then a trail of 1,000,000 records (100,000 with --quick): how fast verify_audit_log checks it,
how an audit query by agent uses its index, and that exporting it keeps memory flat.

Then the dashboard's agents table (issue 19) on a fleet of 1,000,000 agents (100,000 with
--quick): the server time of page_agent_states for a first page of 50 in each order, with and
without filters (target: well under 300 ms; the median of the runs).
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import bench_sqlite_ledger
from _harness import Comparison, Op, compare, header, rss_bytes, save_json
from iron_runtime_state import AgentId, AgentState, AgentStatus, AuditEvent, StateManager
from iron_runtime_state.audit_chain import GENESIS_HASH, AuditChain
from iron_runtime_state.backends import AuditQuery
from iron_runtime_state.backends.sqlite import connection, store
from iron_runtime_state.backends.sqlite import ledger as sqlite_ledger
from iron_runtime_state.backends.sqlite import trail as audit_trail
from iron_runtime_state.money import to_micros

# The store's own statements, so the baseline runs exactly what the store runs.
UPSERT = store._SQL_UPSERT
APPEND = audit_trail.SQL_APPEND
GET = store._SQL_GET
# What any store must do at least to record a spend: add it to the row, in autocommit (the
# triggers keep the fleet totals, as for ours). No limit check, no holds, no status check.
BARE_SPEND = "UPDATE iron_agents SET budget_spent = budget_spent + ?, changed_at = ? WHERE agent_id = ?"
# ... with its ledger row (the spend's record is appended with APPEND, in the same transaction).
LEDGER_ROW = sqlite_ledger.SQL_RECORD
CENT = to_micros(0.01)  # what the benchmark spends, in the micro-units the store keeps
PRAGMAS = (
    "PRAGMA synchronous = normal",
    f"PRAGMA journal_size_limit = {connection.JOURNAL_SIZE_LIMIT}",
    f"PRAGMA wal_autocheckpoint = {connection.WAL_AUTOCHECKPOINT}",
    f"PRAGMA cache_size = -{connection.DEFAULT_PAGE_CACHE_MIB * 1024}",
    "PRAGMA trusted_schema = OFF",
    "PRAGMA temp_store = MEMORY",
)


class ConstantChain(AuditChain):
    """Bench-only: a chain whose seal is a constant, to price the hashing."""

    def seal(
        self, prev_hash: str, seq: int, agent_id: str, event_type: str, timestamp: int, details: str
    ) -> str:
        return GENESIS_HASH


# Hash values for the baseline's records, made in advance: it pays for the INSERT only.
POOL = 65_536
HASHES = [os.urandom(32).hex() for _ in range(POOL)]


class RawTrail:
    """The baseline's position in its audit table.

    The table's chain trigger takes a record only if it extends the head (the next seq, the
    head's hash as prev_hash), so the baseline inserts linked records too, with hash values
    from :data:`HASHES`.
    """

    def __init__(self, db: sqlite3.Connection) -> None:
        found = db.execute("SELECT max(seq), hash FROM iron_audit").fetchone()
        self.seq: int = found[0] or 0
        self.prev: str = found[1] or GENESIS_HASH


def raw_connection(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, timeout=30.0, cached_statements=256)
    for pragma in PRAGMAS:
        db.execute(pragma)
    return db


def same_schema(path: Path) -> sqlite3.Connection:
    """A raw connection to a new file whose schema the store itself created."""
    StateManager.with_sqlite(path).close()
    return raw_connection(path)


def row_of(key: str, state: AgentState) -> tuple[object, ...]:
    """The parameters of the store's upsert for ``state``, as the store binds them."""
    limit = None if state.budget_limit is None else to_micros(state.budget_limit)
    return (
        key,
        0,
        to_micros(state.budget_spent),
        state.pii_detections,
        limit,
        None,
        None,
        None,
        "UTC",
        None,
        None,
        time.time(),
    )


def plain_schema(path: Path) -> sqlite3.Connection:
    """The same tables and indexes without any trigger (informational baseline)."""
    StateManager.with_sqlite(path).close()
    db = sqlite3.connect(path, isolation_level=None)
    for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
        db.execute(f"DROP TRIGGER {name}")
    db.close()
    return raw_connection(path)


def operations(folder: Path, n: int, runs: int) -> list[Comparison]:
    results: list[Comparison] = []
    manager = StateManager.with_sqlite(folder / "ours.db")
    raw = same_schema(folder / "raw.db")
    plain = plain_schema(folder / "plain.db")
    m = 1_000
    ids = [AgentId.generate() for _ in range(m)]
    keys = [a.as_str() for a in ids]
    states = [AgentState(a, AgentStatus.RUNNING, float(i % 97), i % 5, 1e9) for i, a in enumerate(ids)]
    manager.save_agent_states(states)
    raw.execute("BEGIN")
    raw.executemany(UPSERT, [row_of(k, s) for k, s in zip(keys, states, strict=True)])
    raw.execute("COMMIT")

    # -- save_agent_state ---------------------------------------------------------------------
    def ours_save(count: int) -> None:
        save = manager.save_agent_state
        for i in range(count):
            save(states[i % m])

    def upsert_on(db: sqlite3.Connection) -> Op:
        def base_save(count: int) -> None:
            execute = db.execute
            for i in range(count):
                execute(UPSERT, row_of(keys[i % m], states[i % m]))

        return base_save

    # Steady state first: every file past its first WAL checkpoints, as in a running service
    # (until the -wal file first fills, commits skip the checkpoints that later ones share).
    for warm in (ours_save, upsert_on(raw), upsert_on(plain)):
        warm(4 * m)

    results.append(
        compare(
            "save_agent_state vs raw upsert",
            ours_save,
            upsert_on(raw),
            n=n,
            runs=runs,
            target=">= 0.8x throughput",
        )
    )
    results.append(
        compare(
            "  (info) vs upsert, table without triggers",
            ours_save,
            upsert_on(plain),
            n=n,
            runs=runs,
        )
    )

    # -- save_audit_log -----------------------------------------------------------------------
    event = AuditEvent(ids[0], "tool_call", 1_700_000_000, "called search with 3 arguments")

    def ours_append(count: int) -> None:
        append = manager.save_audit_log
        for _ in range(count):
            append(event)

    def insert_on(db: sqlite3.Connection) -> Op:
        trail = RawTrail(db)

        def base_append(count: int) -> None:
            execute, pool = db.execute, HASHES
            key, kind, at, details = keys[0], event.event_type, event.timestamp, event.details
            seq, prev = trail.seq, trail.prev
            for _ in range(count):
                seq += 1
                digest = pool[seq % POOL]
                execute(APPEND, (seq, key, kind, at, details, prev, digest))
                prev = digest
            trail.seq, trail.prev = seq, prev

        return base_append

    results.append(
        compare(
            "save_audit_log vs raw single insert",
            ours_append,
            insert_on(raw),
            n=n,
            runs=runs,
            target=">= 0.8x throughput",
        )
    )
    results.append(
        compare(
            "  (info) vs insert, table without triggers",
            ours_append,
            insert_on(plain),
            n=n,
            runs=runs,
        )
    )

    # -- get_agent_state ----------------------------------------------------------------------
    def ours_get(count: int) -> None:
        get = manager.get_agent_state
        for i in range(count):
            get(ids[i % m])

    def base_get(count: int) -> None:
        execute = raw.execute
        for i in range(count):
            execute(GET, (keys[i % m],)).fetchone()

    results.append(
        compare(
            "get_agent_state vs raw primary-key select",
            ours_get,
            base_get,
            n=n * 5,
            runs=runs,
            target=">= 1.0x throughput",
        )
    )
    uncached = StateManager.with_sqlite(folder / "ours.db", read_cache=0)

    def ours_get_uncached(count: int) -> None:
        get = uncached.get_agent_state
        for i in range(count):
            get(ids[i % m])

    results.append(
        compare("  (info) read_cache=0 vs raw select", ours_get_uncached, base_get, n=n * 5, runs=runs)
    )
    uncached.close()

    # -- save_audit_logs of 10,000 --------------------------------------------------------------
    batch = [AuditEvent(ids[i % m], "tool_call", 1_700_000_000 + i, f"call {i}") for i in range(10_000)]

    def ours_bulk(count: int) -> None:
        for _ in range(count):
            manager.save_audit_logs(batch)

    trail = RawTrail(raw)

    def base_bulk(count: int) -> None:
        for _ in range(count):
            seq, prev = trail.seq, trail.prev
            rows = []
            for e in batch:
                seq += 1
                digest = HASHES[seq % POOL]
                rows.append((seq, e.agent_id.as_str(), e.event_type, e.timestamp, e.details, prev, digest))
                prev = digest
            raw.execute("BEGIN IMMEDIATE")
            raw.executemany(APPEND, rows)
            raw.execute("COMMIT")
            trail.seq, trail.prev = seq, prev

    results.append(
        compare(
            "save_audit_logs(10,000) vs raw executemany",
            ours_bulk,
            base_bulk,
            n=1,
            runs=runs,
            target=">= 0.8x throughput",
        )
    )

    # -- record_spend ---------------------------------------------------------------------------
    def ours_spend(count: int) -> None:
        spend = manager.record_spend
        for i in range(count):
            spend(ids[i % m], 0.01)

    def update_on(db: sqlite3.Connection) -> Op:
        trail = RawTrail(db)

        def base_spend(count: int) -> None:
            execute, pool = db.execute, HASHES
            seq, prev = trail.seq, trail.prev
            for i in range(count):
                seq += 1
                digest, key, now = pool[seq % POOL], keys[i % m], time.time()
                execute("BEGIN IMMEDIATE")
                execute(BARE_SPEND, (CENT, now, key))
                execute(APPEND, (seq, key, "spend", int(now), '{"amount":0.01}', prev, digest))
                execute(LEDGER_ROW, (int(now), seq, key, CENT, None, 0, 0, 0, None, None, None))
                execute("COMMIT")
                prev = digest
            trail.seq, trail.prev = seq, prev

        return base_spend

    results.append(
        compare(
            "record_spend vs raw UPDATE + record + ledger row",
            ours_spend,
            update_on(raw),
            n=n,
            runs=runs,
            target=">= 0.8x throughput",
        )
    )
    results.append(
        compare("  (info) vs the same, tables without triggers", ours_spend, update_on(plain), n=n, runs=runs)
    )

    # -- reservations ---------------------------------------------------------------------------
    def ours_pair(count: int) -> None:
        reserve, commit = manager.reserve_budget, manager.commit_reservation
        for i in range(count):
            commit(reserve(ids[i % m], 0.02), 0.01)

    results.append(
        compare(
            "reserve+commit vs record_spend", ours_pair, ours_spend, n=n // 2, runs=runs, target="<= 2.5x"
        )
    )

    # -- the price of the hash chain ----------------------------------------------------------------
    backend = manager.backend
    chain, constant = AuditChain(), ConstantChain()

    def appender(with_chain: AuditChain, size: int) -> Op:
        events = tuple(batch[:size])

        def run(count: int) -> None:
            append = backend.append_audit
            for _ in range(count):
                append(events, with_chain)

        return run

    results.append(
        compare(
            "audit append: chain vs constant seal",
            appender(chain, 1),
            appender(constant, 1),
            n=n,
            runs=runs,
            target="<= 1.25x",
        )
    )
    results.append(
        compare(
            "  batches of 1,000: chain vs constant seal",
            appender(chain, 1_000),
            appender(constant, 1_000),
            n=max(2, n // 1_000),
            runs=runs,
            target="<= 1.25x",
        )
    )
    manager.close()
    raw.close()
    plain.close()
    return results


# -- the budget model ----------------------------------------------------------------------------


def budget_ops(folder: Path, n: int, runs: int) -> list[Comparison]:
    """Two budget scopes against none (same run)."""
    manager = StateManager.with_sqlite(folder / "budgets.db")
    for scope in ("org:acme", "team:support"):
        manager.set_budget(scope, limit=1e8, period="month")
    plain = [AgentId.generate() for _ in range(100)]
    scoped = [AgentId.generate() for _ in range(100)]
    periodic = [AgentId.generate() for _ in range(100)]
    manager.save_agent_states(AgentState(a, AgentStatus.RUNNING, budget_limit=1e6) for a in plain)
    manager.save_agent_states(
        AgentState(a, AgentStatus.RUNNING, budget_limit=1e6, budget_scopes=("org:acme", "team:support"))
        for a in scoped
    )
    manager.save_agent_states(
        AgentState(a, AgentStatus.RUNNING, budget_limit=1e6, budget_period="month") for a in periodic
    )

    def spend(agents: list[AgentId]) -> Op:
        def run(count: int) -> None:
            record = manager.record_spend
            for k in range(count):
                record(agents[k % 100], 0.01)

        return run

    def reserve_commit(agents: list[AgentId]) -> Op:
        def run(count: int) -> None:
            reserve, commit = manager.reserve_budget, manager.commit_reservation
            for k in range(count):
                commit(reserve(agents[k % 100], 0.02), 0.01)

        return run

    for warm in (spend(plain), spend(scoped), spend(periodic)):
        warm(4_000)  # the steady state, as above
    results = [
        compare(
            "record_spend: 2 scopes vs none", spend(scoped), spend(plain), n=n, runs=runs, target="<= 2.5x"
        ),
        compare(
            "reserve+commit: 2 scopes vs none",
            reserve_commit(scoped),
            reserve_commit(plain),
            n=n // 2,
            runs=runs,
            target="<= 2.5x",
        ),
        compare("  (info) record_spend: a period vs none", spend(periodic), spend(plain), n=n, runs=runs),
    ]
    manager.close()
    return results


def big_trail(folder: Path, records: int, runs: int) -> tuple[list[Comparison], dict[str, float]]:
    """verify, an indexed query by agent, and export on a store of ``records`` records."""
    path = folder / "trail.db"
    agents = [AgentId.generate() for _ in range(1_000)]
    kinds = ["tool_call", "pii_detected", "status_changed", "budget_exceeded"]
    figures: dict[str, float] = {}
    with StateManager.with_sqlite(path) as manager:
        started = time.perf_counter()
        for start in range(0, records, 10_000):
            manager.save_audit_logs(
                [
                    AuditEvent(agents[i % 1_000], kinds[i % 4], 1_600_000_000 + i, f"event {i} of the fleet")
                    for i in range(start, min(records, start + 10_000))
                ]
            )
        elapsed = time.perf_counter() - started
        figures["append_records_per_s"] = records / elapsed
        label = f"built a trail of {records:,} records"
        print(f"{label:<42} {records / elapsed:>12,.0f} records/s (save_audit_logs of 10,000)")

        # verify_audit_log vs the least any verifier does: read every row with raw sqlite3
        # (one SELECT) and check it with the same AuditChain.verify.
        raw = raw_connection(path)
        reports = []

        def ours_verify(count: int) -> None:
            for _ in range(count):
                reports.append(manager.verify_audit_log())

        def base_verify(count: int) -> None:
            for _ in range(count):
                rows = raw.execute(f"SELECT {audit_trail.AUDIT_COLUMNS} FROM iron_audit ORDER BY seq")
                reports.append(AuditChain().verify(rows))

        gc.collect()
        verify = compare(
            f"verify_audit_log, whole {records:,}-record trail",
            ours_verify,
            base_verify,
            n=1,
            runs=3,
            warmup=False,
            target="see records/s below",
        )
        assert all(r.ok and r.checked == records for r in reports), reports[-1]
        verify.ours_s /= records
        verify.base_s /= records
        figures["verify_records_per_s"] = 1.0 / verify.ours_s
        print(
            f"{'  verify_audit_log':<42} ours {1.0 / verify.ours_s:>12,.0f} records/s  "
            f"raw rows + verify {1.0 / verify.base_s:>12,.0f} records/s  target: >= 200,000 records/s",
            flush=True,
        )
        comparisons = [verify]

        # Audit query by agent: the store's call vs the same indexed SELECT in raw sqlite3.
        sql, params = store.audit_select(AuditQuery(agent_id=agents[0], limit=100))
        plan = " | ".join(row[3] for row in raw.execute("EXPLAIN QUERY PLAN " + sql, params))
        print(f"{'  query plan, audit_log(agent_id=, limit=100)':<42} {plan}")
        rng = random.Random(1)
        picks = [rng.choice(agents) for _ in range(1_000)]

        def ours_query(count: int) -> None:
            for i in range(count):
                manager.audit_log(agent_id=picks[i % 1_000], limit=100)

        def base_query(count: int) -> None:
            for i in range(count):
                q_sql, q_params = store.audit_select(AuditQuery(agent_id=picks[i % 1_000], limit=100))
                raw.execute(q_sql, q_params).fetchall()

        query = compare(
            "audit_log(agent_id, limit=100), indexed",
            ours_query,
            base_query,
            n=200,
            runs=runs,
            target="indexed: ms, not a scan",
        )
        comparisons.append(query)
        per_query = query.ours_s
        started = time.perf_counter()
        raw.execute(
            "SELECT seq FROM iron_audit NOT INDEXED WHERE agent_id = ? ORDER BY seq LIMIT 100 OFFSET 900",
            (agents[0].as_str(),),
        ).fetchall()
        scan = time.perf_counter() - started
        figures["query_by_agent_ms"] = per_query * 1e3
        figures["full_scan_ms"] = scan * 1e3
        print(
            f"{'  one query by agent':<42} {per_query * 1e3:8.3f} ms  (a full scan of the trail "
            f"instead: {scan * 1e3:,.0f} ms)",
            flush=True,
        )
        raw.close()

    figures.update(export_memory(path, records))
    return comparisons, figures


def fleet_pages(folder: Path, agents: int, runs: int) -> dict[str, float]:
    """The first page of 50 of a fleet of ``agents`` in each order, filtered or not (ms)."""
    path = folder / "fleet.db"
    rng = random.Random(19)
    statuses = [AgentStatus.RUNNING] * 18 + [AgentStatus.STOPPED, AgentStatus.FAILED]
    figures: dict[str, float] = {}
    with StateManager.with_sqlite(path) as manager:
        started = time.perf_counter()
        for start in range(0, agents, 10_000):
            manager.save_agent_states(
                AgentState(
                    AgentId.test_fixture(i + 1),
                    statuses[i % 20],
                    rng.randrange(10_000) / 100,
                    rng.randrange(50),
                    labels={"team": f"t{i % 20}", "env": ("prod", "dev")[i % 2]},
                )
                for i in range(start, min(agents, start + 10_000))
            )
        label = f"built a fleet of {agents:,} agents"
        print(f"{label:<42} {time.perf_counter() - started:8.1f} s (save_agent_states of 10,000)")
        pages: dict[str, dict[str, Any]] = {
            "by id": {},
            "by id, failed only": {"status": "failed"},
            "by id, one team (5%)": {"labels": {"team": "t3"}},
            "by status": {"order_by": "status"},
            "by spend, descending": {"order_by": "budget_spent", "descending": True},
            "by PII count, running only": {"order_by": "pii_detections", "status": "running"},
            "by spend, one team (5%)": {"order_by": "budget_spent", "labels": {"team": "t3"}},
            "by spend, prod (50%)": {"order_by": "budget_spent", "labels": {"env": "prod"}},
        }
        for name, filters in pages.items():
            times = []
            for _ in range(runs):
                begun = time.perf_counter()
                assert len(manager.page_agent_states(limit=50, **filters)) == 50
                times.append(time.perf_counter() - begun)
            figures[f"page_ms {name}"] = statistics.median(times) * 1e3
            label = f"  first page of 50, {name}"
            print(f"{label:<48} {figures[f'page_ms {name}']:8.1f} ms  target: well under 300 ms", flush=True)
    return figures


EXPORT_CHILD = r"""
import gc, os, sys, time
sys.path.insert(0, {bench!r})
from _harness import rss_bytes
from iron_runtime_state import StateManager
with StateManager.with_sqlite({path!r}) as manager:
    manager.export_audit_log(os.devnull)  # warm: fills SQLite's page cache up to its cap
    gc.collect()
    before = rss_bytes()
    tenth = manager.export_audit_log(os.devnull, limit={records} // 10)
    after_tenth = rss_bytes()
    started = time.perf_counter()
    count = manager.export_audit_log(os.devnull)
    elapsed = time.perf_counter() - started
    after_all = rss_bytes()
print(count, elapsed, before, after_tenth, after_all)
"""


def export_memory(path: Path, records: int) -> dict[str, float]:
    """Export a tenth of the trail, then all of it, in a fresh process; report its memory.

    Memory is flat when exporting ten times as many records takes no more of it. A first
    export fills SQLite's page cache to its cap (page_cache_mib) before anything is measured.
    """
    code = EXPORT_CHILD.format(bench=str(Path(__file__).parent), path=str(path), records=records)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    count, elapsed, before, after_tenth, after_all = (float(x) for x in done.stdout.split())
    assert int(count) == records
    mib = 1024 * 1024
    print(
        f"{'export_audit_log (jsonl), RSS':<42} {before / mib:.1f} MiB before, "
        f"+{(after_tenth - before) / mib:.1f} MiB after {records // 10:,} records, "
        f"+{(after_all - before) / mib:.1f} MiB after all {records:,} "
        f"({records / elapsed:,.0f} records/s)  target: flat",
        flush=True,
    )
    return {
        "export_rss_before_mib": before / mib,
        "export_rss_growth_tenth_mib": (after_tenth - before) / mib,
        "export_rss_growth_all_mib": (after_all - before) / mib,
        "export_records_per_s": records / elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer operations and a 100,000-record trail")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--dir", help="folder for the database files (default: a new temporary folder)")
    args = parser.parse_args()
    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_sqlite_"))
    folder.mkdir(parents=True, exist_ok=True)
    header(f"SQLite store vs raw sqlite3 {sqlite3.sqlite_version}, same statements (files in {folder})")
    n, runs, records = (1_000, 7, 100_000) if args.quick else (2_000, 11, 1_000_000)
    try:
        results = operations(folder, n, runs)
        print(flush=True)
        results.extend(budget_ops(folder, n, runs))
        print(flush=True)
        more, figures = bench_sqlite_ledger.run(folder, args.quick)
        results.extend(more)
        print(flush=True)
        more, trail_figures = big_trail(folder, records, runs)
        results.extend(more)
        figures.update(trail_figures)
        print(flush=True)
        figures.update(fleet_pages(folder, records, runs))
        save_json(args.json, results, sqlite_version=sqlite3.sqlite_version, rss=rss_bytes(), **figures)
    finally:
        if not args.dir:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
