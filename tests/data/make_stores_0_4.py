"""Writes the SQLite stores of version 0.4 (schema version 1) that tests/test_sqlite.py migrates.

They were made by the code of commit 2b0e376, the last before schema version 2::

    git worktree add /tmp/base-0.4 2b0e376
    PYTHONPATH=/tmp/base-0.4/src python tests/data/make_stores_0_4.py tests/data

Each file holds three agents and a pruned audit trail (so its anchor is not the genesis):
``store-0.4.db`` unkeyed, ``store-0.4-keyed.db`` sealed with :data:`KEY`. Nothing here may
change: the files are the old format, as shipped.
"""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

from iron_runtime_state import AgentId, AgentState, AgentStatus, AuditEvent, StateManager

KEY = "k" * 32


def make(path: Path, key: str | None) -> None:
    path.unlink(missing_ok=True)
    with StateManager.with_sqlite(path, audit_key=key) as manager:
        a, b, c = (AgentId.test_fixture(n) for n in (1, 2, 3))
        manager.save_agent_states(
            [
                AgentState(a, AgentStatus.RUNNING, budget_limit=10.0),
                AgentState(b, AgentStatus.RUNNING, 2.5, 1),
                AgentState(c, AgentStatus.STOPPED),
            ]
        )
        manager.save_audit_logs([AuditEvent(a, "note", 100 + i, f"old {i}") for i in range(4)])
        manager.prune_audit_log(before=102)  # the anchor moves to seq 2
        manager.record_spend(a, 4.0)
        manager.record_pii_detection(b, 2, details="email")
        manager.set_status(c, AgentStatus.FAILED)
        manager.save_audit_log(AuditEvent(c, "note", 2_000_000_000, "last"))
        assert manager.verify_audit_log().ok
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("VACUUM")  # a small file (still in WAL mode; closing removes the -wal)
    finally:
        db.close()


if __name__ == "__main__":
    folder = Path(sys.argv[1])
    make(folder / "store-0.4.db", None)
    make(folder / "store-0.4-keyed.db", KEY)
