"""SQLite store, the spend ledger (issue 17): what a settle's record costs, and a report's speed.

Run: .venv/bin/python bench/bench_sqlite_ledger.py [--quick] [--json out.json] [--dir DIR]
(bench/bench_sqlite.py runs it too, after its own figures.)

1. Settling with a ledger record against 0.6.0 without one (commit 8e46e75, checked out as a
   git worktree and run in fresh processes that alternate with this tree's; medians of the
   runs): ``record_spend`` and ``reserve_budget`` + ``commit_reservation`` on agents with a
   limit, each file first taking 4,000 settles so that what is timed is the steady state, WAL
   checkpoints included. Target: <= 2x (the record goes in the same transaction as the charge).
2. ``spend_totals`` grouped by time bucket over 1,000,000 ledger rows (100,000 with
   ``--quick``), then merged into days by ``ledger.report_rows``: what ``spend_report(group_by=
   ("day",))`` asks of the store. The rows are written straight into ``iron_ledger`` of a real
   store file by ``executemany`` (settling a million spends through the manager would take
   minutes and time nothing more), spread over 30 days, a tenth with a model and tokens.
   Target: < 1 s. Also: one agent's report over the same span, and one day of the month.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _harness import RELEASE_0_6, Comparison, compare_with_previous_release, header, save_json
from iron_runtime_state import AgentId, AgentState, AgentStatus, StateManager
from iron_runtime_state.backends.sqlite import ledger as sqlite_ledger
from iron_runtime_state.ledger import BUCKET, SpendQuery, report_rows

_SETUP = """
import os, shutil, tempfile
from iron_runtime_state import AgentId, AgentState, AgentStatus, StateManager
folder = tempfile.mkdtemp(prefix="bench_sqlite_ledger_")
manager = StateManager.with_sqlite(os.path.join(folder, "state.db"))
agents = [AgentId.generate() for _ in range(100)]
for a in agents:
    manager.save_agent_state(AgentState(a, AgentStatus.RUNNING, budget_limit=1e6))
{op}
op(4_000)  # the steady state: past the file's first WAL checkpoints
"""
_SPEND = """
def op(count):
    for k in range(count):
        manager.record_spend(agents[k % 100], 0.01)
"""
_RESERVE_COMMIT = """
def op(count):
    reserve, commit = manager.reserve_budget, manager.commit_reservation
    for k in range(count):
        commit(reserve(agents[k % 100], 0.02), 0.01)
"""
_TEARDOWN = "manager.close(); shutil.rmtree(folder)"


def settle_vs_release(n: int, runs: int) -> list[Comparison]:
    """``record_spend`` and reserve + commit on this tree (a ledger record each) against 0.6.0."""
    return [
        compare_with_previous_release(
            "record_spend + ledger record vs 0.6.0",
            _SETUP.format(op=_SPEND),
            teardown=_TEARDOWN,
            n=n,
            runs=runs,
            target="<= 2x",
            release=RELEASE_0_6,
        ),
        compare_with_previous_release(
            "reserve+commit + ledger record vs 0.6.0",
            _SETUP.format(op=_RESERVE_COMMIT),
            teardown=_TEARDOWN,
            n=n // 2,
            runs=runs,
            target="<= 2x",
            release=RELEASE_0_6,
        ),
    ]


_LEDGER_ROW = sqlite_ledger.SQL_RECORD  # the store's own statement
_START = 1_793_491_200  # 2026-11-01 00:00 UTC
_DAYS = 30


def _fill(path: Path, rows: int, agents: list[str]) -> None:
    """``rows`` ledger rows, straight into the store file's ``iron_ledger`` (one transaction)."""
    rng = random.Random(17)
    span = _DAYS * 86_400
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("BEGIN")
        batch: list[tuple[object, ...]] = []
        for seq in range(1, rows + 1):
            model = "gpt-4o" if seq % 10 == 0 else None
            tokens = (rng.randrange(10_000), rng.randrange(2_000), 0) if model else (0, 0, 0)
            agent = agents[seq % len(agents)]
            ts = _START + seq * span // rows
            amount = rng.randrange(1, 50_000)
            batch.append((ts // BUCKET, seq, ts, agent, amount, model, *tokens, '["team:a"]', None, None))
            if len(batch) == 50_000:
                db.executemany(_LEDGER_ROW, batch)
                batch.clear()
        db.executemany(_LEDGER_ROW, batch)
        db.execute("COMMIT")
    finally:
        db.close()


def _median_s(fn: object, runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def report_speed(folder: Path, rows: int, runs: int) -> dict[str, float]:
    """The by-day report (and two narrower ones) over ``rows`` ledger rows; medians in seconds."""
    path = folder / "ledger.db"
    agent_ids = [AgentId.generate() for _ in range(1_000)]
    with StateManager.with_sqlite(path) as manager:
        manager.save_agent_states(AgentState(a, AgentStatus.RUNNING) for a in agent_ids)
    started = time.perf_counter()
    _fill(path, rows, [a.as_str() for a in agent_ids])
    filled = time.perf_counter() - started
    figures: dict[str, float] = {"ledger_rows": rows, "ledger_fill_s": filled}
    with StateManager.with_sqlite(path) as manager:
        backend = manager.backend
        by_day = SpendQuery(keys=("bucket",))
        report = report_rows(backend.spend_totals(by_day), ("day",), "UTC")
        assert len(report) in (_DAYS, _DAYS + 1), report[:3]
        assert sum(r.calls for r in report) == rows

        def day_report() -> None:
            report_rows(backend.spend_totals(by_day), ("day",), "UTC")

        one_agent = SpendQuery(keys=("bucket",), agent_id=agent_ids[7].as_str())
        one_day = SpendQuery(keys=("model",), since=_START + 86_400 * 14, until=_START + 86_400 * 15)
        cases = (
            ("spend_report by day", day_report, "< 1 s"),
            ("  one agent, by day", lambda: backend.spend_totals(one_agent), ""),
            ("  one day, by model", lambda: backend.spend_totals(one_day), ""),
        )
        for name, fn, target in cases:
            seconds = _median_s(fn, runs)
            shown = f"  target: {target}" if target else ""
            print(f"{name + f' over {rows:,} ledger rows':<60} {seconds * 1e3:9.1f} ms{shown}", flush=True)
            figures[name.strip().replace(" ", "_").replace(",", "")] = seconds
    print(f"{'  (setup) ledger rows written by executemany':<60} {filled:9.1f} s", flush=True)
    return figures


def run(folder: Path, quick: bool) -> tuple[list[Comparison], dict[str, float]]:
    """Both parts, as bench_sqlite.py calls them."""
    n, runs, rows = (1_000, 5, 100_000) if quick else (2_000, 9, 1_000_000)
    results = settle_vs_release(n, runs)
    print(flush=True)
    return results, report_speed(folder, rows, min(runs, 7))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer runs and 100,000 ledger rows")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--dir", help="folder for the database files (default: a new temporary folder)")
    args = parser.parse_args()
    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_sqlite_ledger_"))
    folder.mkdir(parents=True, exist_ok=True)
    header(f"SQLite store {sqlite3.sqlite_version}: the spend ledger (files in {folder})")
    try:
        results, figures = run(folder, args.quick)
        save_json(args.json, results, sqlite_version=sqlite3.sqlite_version, **figures)
    finally:
        if not args.dir:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
