"""Writes the SQLite store of version 0.6 (schema version 4) that tests/test_sqlite_ledger.py migrates.

It was made by the code of commit 8e46e75 (0.6.0: exact money, labels, periods and budget
scopes, no spend ledger and no thresholds)::

    git worktree add /tmp/sqlite-v06 8e46e75
    PYTHONPATH=/tmp/sqlite-v06/src python tests/data/make_store_0_6.py tests/data

``store-0.6.db`` holds three agents (one labelled, with a daily period and two scopes; one with
a limit; one stopped), two budget scopes (one monthly with a limit, one without), spends and
committed holds (which 0.6 recorded without any ``spend`` record or threshold alert) and a
pruned audit trail. Nothing here may change: the file is the old format, as shipped.
"""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

from iron_runtime_state import AgentId, AgentState, AgentStatus, AuditEvent, StateManager

#: The clock the file was written at: 2026-03-10 12:00 UTC (the tests read periods against it).
NOW = 1_773_144_000.0


def make(path: Path) -> None:
    path.unlink(missing_ok=True)
    with StateManager.with_sqlite(path, clock=lambda: NOW) as manager:
        a, b, c = (AgentId.test_fixture(n) for n in (1, 2, 3))
        manager.save_audit_logs([AuditEvent(a, "note", 100 + i, f"old {i}") for i in range(3)])
        manager.prune_audit_log(before=102)  # the anchor moves to seq 2
        manager.set_budget("team:support", limit=100, period="month")
        manager.set_budget("org:acme", limit=None)
        manager.save_agent_states(
            [
                AgentState(
                    a,
                    AgentStatus.RUNNING,
                    budget_limit=10,
                    labels={"team": "support", "env": "prod"},
                    budget_scopes=("team:support", "org:acme"),
                    budget_period="day",
                ),
                AgentState(b, AgentStatus.RUNNING, budget_limit=50),
                AgentState(c, AgentStatus.STOPPED, 0.5),
            ]
        )
        manager.record_spend(a, 6)  # past 50% of the agent's 10: 0.6 wrote no alert
        manager.record_spend(b, "1.25")
        hold = manager.reserve_budget(a, 2)
        assert hold.scopes == ("team:support", "org:acme")
        manager.commit_reservation(hold, "1.5")  # 7.5 of 10: still no alert in 0.6
        spare = manager.reserve_budget(b, 1)
        manager.commit_reservation(spare, "0.75")
        assert manager.verify_audit_log().ok
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("VACUUM")  # a small file (still in WAL mode; closing removes the -wal)
    finally:
        db.close()


if __name__ == "__main__":
    make(Path(sys.argv[1]) / "store-0.6.db")
