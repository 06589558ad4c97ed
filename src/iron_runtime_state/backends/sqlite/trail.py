"""The SQLite store's audit trail: its statements, and appending to the hash chain.

``iron_audit_chain`` holds the head (newest ``seq`` and hash ever appended) and the anchor (left
behind by pruning), each with its seal under an audit key. A trigger refuses any record that
does not extend the head and moves the head, atomically with the insert. So a single unkeyed
append is one statement built from the newest head this store object knows; when another
connection appended in between (or the head went back), the database refuses it and the append
is redone under ``BEGIN IMMEDIATE``, which reads the head. Every operation that appends events
with a change (:mod:`.store`, :mod:`.spending`) uses :func:`append`, inside its transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from ...audit_chain import AuditChain
from ...models import AuditEvent, AuditRecord
from ..base import AuditQuery
from .connection import Connection

__all__ = [
    "AUDIT_COLUMNS",
    "ROWS_PER_READ",
    "SQL_APPEND",
    "SQL_COUNT",
    "SQL_FIRST_KEPT",
    "SQL_HEAD_SEQ",
    "SQL_LAST",
    "SQL_LAST_BEFORE",
    "SQL_MARKS",
    "SQL_PRUNE",
    "SQL_ROWS",
    "SQL_SET_ANCHOR",
    "append",
    "audit_select",
]

AUDIT_COLUMNS: Final = "seq, agent_id, event_type, timestamp, details, prev_hash, hash"
SQL_APPEND: Final = f"INSERT INTO iron_audit ({AUDIT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"
SQL_HEAD: Final = "SELECT head_seq, head_hash FROM iron_audit_chain"
SQL_HEAD_SEQ: Final = "SELECT head_seq FROM iron_audit_chain"
SQL_SEAL_HEAD: Final = "UPDATE iron_audit_chain SET head_seal = ?"
# One statement, so one snapshot: the marks and the count agree with each other.
SQL_MARKS: Final = (
    "SELECT head_seq, head_hash, anchor_seq, anchor_hash, (SELECT count(*) FROM iron_audit), "
    "head_seal, anchor_seal FROM iron_audit_chain"
)
SQL_SET_ANCHOR: Final = "UPDATE iron_audit_chain SET anchor_seq = ?, anchor_hash = ?, anchor_seal = ?"
SQL_COUNT: Final = "SELECT count(*) FROM iron_audit"
SQL_ROWS: Final = f"SELECT {AUDIT_COLUMNS} FROM iron_audit WHERE seq > ? ORDER BY seq LIMIT ?"
# NOT INDEXED: walk seq order from the oldest record and stop at the first recent one, instead
# of sorting every recent record by seq (the time index would find them all first).
SQL_FIRST_KEPT: Final = "SELECT seq FROM iron_audit NOT INDEXED WHERE timestamp >= ? ORDER BY seq LIMIT 1"
SQL_LAST: Final = "SELECT seq, hash FROM iron_audit ORDER BY seq DESC LIMIT 1"
SQL_LAST_BEFORE: Final = "SELECT seq, hash FROM iron_audit WHERE seq < ? ORDER BY seq DESC LIMIT 1"
SQL_PRUNE: Final = "DELETE FROM iron_audit WHERE seq <= ?"

ROWS_PER_READ: Final = 256  # audit rows per read while iterating the trail


def audit_select(query: AuditQuery) -> tuple[str, list[object]]:
    """The SELECT and parameters for an audit query (``query.limit`` of 0 is the caller's case).

    Every filter is a plain comparison on an indexed column. SQLite answers by agent or by event
    type from that column's index, in ``seq`` order for free. A time window alone is read from
    the time index: left to itself, SQLite would walk the whole trail in ``seq`` order to find
    a recent window. With ``after_seq`` (the next page), walking ``seq`` order from there is
    cheaper, and SQLite does that.
    """
    where: list[str] = []
    params: list[object] = []
    if query.agent_id is not None:
        where.append("agent_id = ?")
        params.append(query.agent_id.as_str())
    if query.event_type is not None:
        where.append("event_type = ?")
        params.append(query.event_type)
    if query.since is not None:
        where.append("timestamp >= ?")
        params.append(query.since)
    if query.until is not None:
        where.append("timestamp <= ?")
        params.append(query.until)
    if query.after_seq is not None:
        where.append("seq > ?")
        params.append(query.after_seq)
    sql = f"SELECT {AUDIT_COLUMNS} FROM iron_audit"
    by_time_only = query.agent_id is None and query.event_type is None and query.after_seq is None
    if by_time_only and (query.since is not None or query.until is not None):
        sql += " INDEXED BY iron_audit_by_time"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY seq"
    if query.limit is not None:
        sql += " LIMIT ?"
        params.append(query.limit)
    return sql, params


def append(conn: Connection, batch: Sequence[AuditEvent], chain: AuditChain, now: float) -> list[AuditRecord]:
    """Append ``batch`` in the transaction ``conn`` holds; the records of ``batch``.

    The head is read in the same transaction, so the records extend it whoever appended last.
    A head behind the one this store object last saw gets an ``audit_rewound`` record first
    (:class:`~..head_watch.HeadWatch`). With a keyed chain the new head's seal is stored with it
    (the chain's trigger cleared the old one). The connection notes the new head, for the
    store object to remember once the transaction commits.
    """
    if not batch:
        return []
    db = conn.db
    head: tuple[int, str] = db.execute(SQL_HEAD).fetchone()
    rewound = conn.watch.check(head, now)
    rows, records = chain.seal_rows([*rewound, *batch], *head)
    db.executemany(SQL_APPEND, rows)
    head = (rows[-1][0], rows[-1][6])
    head_seal = chain.seal_mark("head", *head)
    if head_seal is not None:
        db.execute(SQL_SEAL_HEAD, (head_seal,))
    conn.appended = head
    return records[len(rewound) :]
