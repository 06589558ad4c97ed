"""The audit trail's operations on PostgreSQL, and the append every other operation uses.

**Appends in seq order.** The head row (``audit_chain``, one row) is the lock: an append updates
it and inserts its records in one statement, whose ``UPDATE`` takes the row's lock and holds it
to the end of the transaction. The statement only matches when the head is still the one its
records were sealed after (``WHERE head_seq = ... AND head_hash = ...``); PostgreSQL re-reads
the row after waiting for another appender's lock, so a second appender that sealed after the
same head matches nothing, inserts nothing, and appends again after reading the head under its
lock (``SELECT ... FOR UPDATE``). So records commit in seq order, each linking to the one
before, whoever writes: a reader that saw seq ``n`` never later finds a new record below it.
A writer seals first after the head it last knew (one statement, the common case of one
process); only when another writer moved the head does it pay the second round trip.

A head found below the highest this store object saw gets an ``audit_rewound`` record first
(:class:`~..head_watch.HeadWatch`); the watch moves only after the transaction committed.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from typing import Final

from ...audit_chain import AuditChain, AuditRow
from ...models import AuditEvent, AuditRecord
from ..base import AuditMarks, AuditQuery
from ..head_watch import HeadWatch
from ..sql_rows import audit_records
from .ledger import INSERT, ledger_row
from .requests import BEGIN, COMMIT, Emit, Listen, Op, Sql, restartable
from .schema import render

__all__ = ["TrailOps", "audit_channel", "audit_select"]

_AUDIT_COLUMNS: Final = "seq, agent_id, event_type, timestamp, details, prev_hash, hash"

_STATEMENTS: Final = {
    # Insert the records only if the head is still (after, prev), moving it in the same statement.
    # The same statement tells the schema's channel the new head ({c}: see audit_channel); the
    # server delivers it when the transaction commits, and never if it rolls back. `note` is
    # read by the EXISTS (an unread CTE that is no data change never runs), once: the head
    # matched one row or none.
    "append": (
        "WITH head AS (UPDATE {s}.audit_chain SET head_seq = %s, head_hash = %s, head_seal = %s "
        "WHERE id = 0 AND head_seq = %s AND head_hash = %s RETURNING head_seq), "
        "note AS (SELECT pg_notify('{c}', head_seq::text) FROM head) "
        f"INSERT INTO {{s}}.audit ({_AUDIT_COLUMNS}) "
        "SELECT * FROM unnest(%s::bigint[], %s::text[], %s::text[], %s::bigint[], %s::text[], "
        "%s::text[], %s::text[]) WHERE EXISTS (SELECT FROM note)"
    ),
    "lock_head": "SELECT head_seq, head_hash FROM {s}.audit_chain WHERE id = 0 FOR UPDATE",
    "head": "SELECT head_seq FROM {s}.audit_chain WHERE id = 0",
    # One statement, so one snapshot: the marks and the count agree with each other.
    "marks": (
        "SELECT head_seq, head_hash, anchor_seq, anchor_hash, (SELECT count(*) FROM {s}.audit), "
        "head_seal, anchor_seal FROM {s}.audit_chain WHERE id = 0"
    ),
    "count": "SELECT count(*) FROM {s}.audit",
    "rows": f"SELECT {_AUDIT_COLUMNS} FROM {{s}}.audit WHERE seq > %s ORDER BY seq LIMIT %s",
    "first_kept": "SELECT seq FROM {s}.audit WHERE timestamp >= %s ORDER BY seq LIMIT 1",
    "last": "SELECT seq, hash FROM {s}.audit ORDER BY seq DESC LIMIT 1",
    "last_before": "SELECT seq, hash FROM {s}.audit WHERE seq < %s ORDER BY seq DESC LIMIT 1",
    "prune": "DELETE FROM {s}.audit WHERE seq <= %s",
    # The spend ledger's rows of the pruned records (see ledger.py), in the same transaction.
    "prune_ledger": "DELETE FROM {s}.ledger WHERE seq <= %s",
    "ledger_row": INSERT,
    "set_anchor": (
        "UPDATE {s}.audit_chain SET anchor_seq = %s, anchor_hash = %s, anchor_seal = %s WHERE id = 0"
    ),
}

#: Audit rows per read while iterating the trail (small batches verify faster: their rows are
#: still in the CPU's caches when checked).
_ROWS_PER_READ: Final = 1000


def audit_channel(quoted_schema: str) -> str:
    """The ``LISTEN/NOTIFY`` channel of a schema's audit trail: ``iron_audit_<schema>``.

    The schema name is checked (``a-z 0-9 _``, see ``check_schema``), so the channel needs no
    quoting inside a string or a quoted identifier; a channel name is limited to 63 bytes, so a
    long schema name is replaced by a digest of it.
    """
    schema = quoted_schema.strip('"')
    channel = f"iron_audit_{schema}"
    if len(channel) > 63:
        channel = "iron_audit_" + hashlib.sha256(schema.encode()).hexdigest()[:32]
    return channel


def audit_select(schema: str, query: AuditQuery) -> tuple[str, list[object]]:
    """The SELECT and parameters for an audit query (``query.limit`` of 0 is the caller's case).

    Every filter is a comparison on an indexed column: by agent or by event type, the index on
    (column, seq) reads the matches in seq order; a time window alone is read from the time index.
    """
    where: list[str] = []
    params: list[object] = []
    if query.agent_id is not None:
        where.append("agent_id = %s")
        params.append(query.agent_id.as_str())
    if query.event_type is not None:
        where.append("event_type = %s")
        params.append(query.event_type)
    if query.since is not None:
        where.append("timestamp >= %s")
        params.append(query.since)
    if query.until is not None:
        where.append("timestamp <= %s")
        params.append(query.until)
    if query.after_seq is not None:
        where.append("seq > %s")
        params.append(query.after_seq)
    sql = f"SELECT {_AUDIT_COLUMNS} FROM {schema}.audit"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY seq"
    if query.limit is not None:
        sql += " LIMIT %s"
        params.append(query.limit)
    return sql, params


class TrailOps:
    """The audit trail's operations, and :meth:`_append` for the operations that write events."""

    def __init__(self, quoted_schema: str) -> None:
        self.quoted_schema = quoted_schema
        #: The channel every append notifies with the new head seq; ``wait_audit`` listens on it.
        self.channel = audit_channel(quoted_schema)
        self.sql: dict[str, str] = {
            name: render(text, quoted_schema).replace("{c}", self.channel)
            for name, text in _STATEMENTS.items()
        }
        #: The highest head this store object saw or wrote (rewind detection).
        self.watch = HeadWatch()

    def _append_rows(self, rows: list[AuditRow], chain: AuditChain, after: tuple[int, str]) -> Sql:
        """The statement appending ``rows`` if the head is still ``after``."""
        head_seq, head_hash = rows[-1][0], rows[-1][6]
        columns = list(zip(*rows, strict=True))
        return Sql(
            self.sql["append"],
            (head_seq, head_hash, chain.seal_mark("head", head_seq, head_hash), *after, *map(list, columns)),
        )

    def _append(
        self, events: Sequence[AuditEvent], chain: AuditChain, now: float, *, hinted: bool = True
    ) -> Op[tuple[list[AuditRecord], tuple[int, str] | None]]:
        """Append ``events`` in the caller's transaction (or as one statement in autocommit, when
        sealed after the head this store object knows and that head has not moved).

        Returns the records and the new head; the caller tells ``self.watch`` the head once its
        transaction committed. In autocommit, a failed first try leaves nothing behind, and the
        second runs in the caller's transaction: callers in autocommit use :meth:`append_audit`.
        """
        if not events:
            return [], None
        hint = self.watch.highest if hinted else None
        if hint is not None:
            rows, records = chain.seal_rows(events, *hint)
            if (yield self._append_rows(rows, chain, hint)):
                return records, (rows[-1][0], rows[-1][6])
        found = (yield Sql(self.sql["lock_head"]))[0]
        head: tuple[int, str] = (found[0], found[1])
        rewound = self.watch.check(head, now)
        rows, records = chain.seal_rows([*rewound, *events], *head)
        if not (yield self._append_rows(rows, chain, head)):  # we hold the head's lock
            raise AssertionError("the audit head moved while locked")  # pragma: no cover
        return records[len(rewound) :], (rows[-1][0], rows[-1][6])

    # -- operations ---------------------------------------------------------------------------

    def append_audit(self, events: Sequence[AuditEvent], chain: AuditChain) -> Op[list[AuditRecord]]:
        if not events:
            return []
        now = time.time()
        hint = self.watch.highest
        # A spend record (a copy of a trail brings them) gets its ledger row in the same transaction.
        spends = any(event.event_type == "spend" for event in events)
        if hint is not None and not spends:
            # One statement in autocommit, linked to the newest head this store object knows.
            rows, records = chain.seal_rows(events, *hint)
            if (yield self._append_rows(rows, chain, hint)):
                self.watch.wrote((rows[-1][0], rows[-1][6]))
                return records
        yield BEGIN
        records, head = yield from self._append(events, chain, now, hinted=False)
        for record in records:
            if record.event_type == "spend":
                yield Sql(self.sql["ledger_row"], ledger_row(record))
        yield COMMIT
        if head is not None:
            self.watch.wrote(head)
        return records

    def query_audit(self, query: AuditQuery) -> Op[list[AuditRecord]]:
        if query.limit == 0:
            return []
        sql, params = audit_select(self.quoted_schema, query)
        rows = yield Sql(sql, params)
        return audit_records(rows)

    def iter_audit_rows(self, after_seq: int, batch_size: int) -> Op[None]:
        size = min(batch_size, _ROWS_PER_READ)
        after = after_seq
        while True:
            rows: list[AuditRow] = yield Sql(self.sql["rows"], (after, size))
            if rows:
                yield Emit(rows)
            if len(rows) < size:
                return
            after = rows[-1][0]

    def audit_marks(self) -> Op[AuditMarks]:
        head_seq, head_hash, anchor_seq, anchor_hash, count, head_seal, anchor_seal = (
            yield Sql(self.sql["marks"])
        )[0]
        self.watch.saw((head_seq, head_hash))
        return AuditMarks((head_seq, head_hash), (anchor_seq, anchor_hash), count, head_seal, anchor_seal)

    def wait_audit(self, after_seq: int, timeout: float) -> Op[bool]:
        """See ``Backend.wait_audit``: ``LISTEN`` on the schema's channel, woken by the append's ``NOTIFY``.

        Every append notifies :attr:`channel` with the new head seq in its own transaction. The
        driver waits on a listening connection of its own, not one of the pool's (see
        :class:`Listen`): it listens, reads the head (a record appended before the ``LISTEN``
        took effect is seen there, so no wake-up is lost), then waits for a notification past
        ``after_seq``, up to ``timeout``.
        """
        return bool((yield Listen(self.channel, self.sql["head"], after_seq, timeout)))

    def audit_count(self) -> Op[int]:
        return int((yield Sql(self.sql["count"]))[0][0])

    @restartable
    def prune_audit(self, before: int, chain: AuditChain) -> Op[int]:
        sql = self.sql
        yield BEGIN
        yield Sql(sql["lock_head"])  # appenders wait: the anchor and the head move one at a time
        first_kept = yield Sql(sql["first_kept"], (before,))
        last = yield (Sql(sql["last"]) if not first_kept else Sql(sql["last_before"], (first_kept[0][0],)))
        if not last:
            yield COMMIT
            return 0
        seq, digest = last[0]
        removed: int = yield Sql(sql["prune"], (seq,))
        yield Sql(sql["prune_ledger"], (seq,))
        yield Sql(sql["set_anchor"], (seq, digest, chain.seal_mark("anchor", seq, digest)))
        yield COMMIT
        return removed
