"""Writes the SQLite store of version 0.5 (schema version 3) that tests/test_sqlite_budgets.py migrates.

It was made by the code of commit 71c1d72 (0.5.0, amounts stored as binary floats)::

    git worktree add /tmp/base-0.5 71c1d72
    PYTHONPATH=/tmp/base-0.5/src python tests/data/make_store_0_5.py tests/data

``store-0.5.db`` holds five agents whose spends carry binary float error (``0.1 + 0.2``), one
with amounts past what this version counts (a billion units), an open hold, a stopped and a
failed agent, fleet totals that drifted, and a pruned audit trail. Nothing here may change:
the file is the old format, as shipped.
"""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

from iron_runtime_state import AgentId, AgentState, AgentStatus, AuditEvent, StateManager


def make(path: Path) -> None:
    path.unlink(missing_ok=True)
    with StateManager.with_sqlite(path) as manager:
        a, b, c, d, e = (AgentId.test_fixture(n) for n in (1, 2, 3, 4, 5))
        manager.save_agent_states(
            [
                AgentState(a, AgentStatus.RUNNING, budget_limit=10.0),
                AgentState(b, AgentStatus.RUNNING, 0.0, 1),
                AgentState(c, AgentStatus.STOPPED, 0.5),
                AgentState(d, AgentStatus.RUNNING, 2e9, 0, 5e11),  # past 0.6's largest amount
                AgentState(e, AgentStatus.FAILED, 1.25, 7, 2.0),
            ]
        )
        manager.save_audit_logs([AuditEvent(a, "note", 100 + i, f"old {i}") for i in range(4)])
        manager.prune_audit_log(before=102)  # the anchor moves to seq 2
        manager.record_spend(a, 0.1)
        manager.record_spend(a, 0.2)  # 0.30000000000000004 as a float
        for amount in (7.3, 11.2326, 0.0000005, 0.0000015):  # sums to 18.532602 with float error
            manager.record_spend(b, amount)
        hold = manager.reserve_budget(a, 1.5, ttl=86_400.0)
        assert hold.amount == 1.5
        manager.set_status(c, AgentStatus.RUNNING)
        manager.set_status(c, AgentStatus.STOPPED)
        assert manager.verify_audit_log().ok
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("VACUUM")  # a small file (still in WAL mode; closing removes the -wal)
    finally:
        db.close()


if __name__ == "__main__":
    make(Path(sys.argv[1]) / "store-0.5.db")
