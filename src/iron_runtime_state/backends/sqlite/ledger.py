"""The spend ledger in the SQLite store: the index row written with each ``spend`` record, and
the reports answered from those rows (``Backend.spend_totals``).

Every settled spend appends its ``spend`` record to the audit trail (:func:`...events.spend`)
and, in the same transaction, one row of ``iron_ledger`` (schema version 5) holding what reports
group and sum: the record's ``seq`` and timestamp, the agent, the amount in micro-units, the
model and token counts, and the scopes charged, the agent's labels and the spend's tags as JSON
text (the forms :mod:`.rows` writes: sorted keys, ``NULL`` for none). :func:`append_spend` is
the one place that writes both, so neither exists without the other; pruning the trail deletes
the rows of the pruned records in its own transaction (:data:`SQL_PRUNE`).

A report is one ``SELECT ... GROUP BY`` (:func:`totals_select`). The table is keyed by
(bucket, seq), the bucket being the record's :data:`...ledger.BUCKET` of time (``ts // 900``,
written with the row): a span reads only the rows of its buckets (those of the two ends
checked on ``ts``), in time order, without a lookup, and a report by time groups them in that
order, with no sort (a third of the time of grouping ``ts / 900``, measured on 1,000,000 rows).
A report for one agent or one model reads that key's buckets of its index instead, in the
same order. Grouped by scope, a row counts under each scope it charged (``json_each``), or
under ``NULL`` when it charged none; a scope filter is an ``instr`` of the scope's quoted name
in the row's scope list, which is exact: scope names hold nothing JSON escapes, so ``"name"``
appears in the text only as that element. Labels and tags are read with ``json_extract``. The
totals equal :func:`...ledger.aggregate` over the same records.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Final

from ... import events
from ...audit_chain import AuditChain
from ...ids import AgentId
from ...ledger import BUCKET, SpendNote, SpendQuery, SpendTotal, entry_of
from ...models import AuditEvent, AuditRecord
from .connection import Connection
from .rows import labels_of, labels_text, scopes_of, scopes_text
from .trail import append

__all__ = [
    "SQL_PRUNE",
    "SQL_RECORD",
    "Spend",
    "append_spend",
    "check",
    "index_appended",
    "prune_params",
    "spend",
    "totals",
    "totals_select",
]

_COLUMNS: Final = (
    "bucket, seq, ts, agent_id, amount, model, input_tokens, output_tokens, cached_input_tokens, "
    "scopes, labels, tags"
)
#: A ledger row: its columns in the order of :data:`_COLUMNS`.
SQL_RECORD: Final = f"INSERT INTO iron_ledger ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
#: The rows of the pruned records (``seq <= ?3``): every one is older than the prune's bound
#: ``?2`` (the trail keeps every record from the first at or after it), so the delete is a
#: range of the table's key (``?1``: the bound's bucket).
SQL_PRUNE: Final = "DELETE FROM iron_ledger WHERE bucket <= ?1 AND ts < ?2 AND seq <= ?3"

#: A spend's ledger row without its bucket and seq: ts, agent, amount, model, three token
#: counts, scopes, labels, tags.
_Row = tuple[int, str, int, str | None, int, int, int, str | None, str | None, str | None]


class Spend:
    """A settled spend's ``spend`` record and the ledger row that goes with it."""

    __slots__ = ("event", "row")

    def __init__(self, event: AuditEvent, row: _Row) -> None:
        self.event = event
        self.row = row


def spend(
    agent_id: AgentId,
    now: float,
    amount: int,
    scopes: str | None,
    labels: str | None,
    reservation_id: str | None,
    note: SpendNote | None,
) -> Spend:
    """The record and ledger row of ``amount`` charged to the agent and to ``scopes`` (the scope
    list's stored text), the agent's ``labels`` being the stored text of its labels."""
    event = events.spend(agent_id, now, amount, scopes_of(scopes), labels_of(labels), reservation_id, note)
    if note is None:
        model, tokens, tags = None, (0, 0, 0), None
    else:
        model, tags = note.model, labels_text(dict(note.tags))
        tokens = (note.input_tokens, note.output_tokens, note.cached_input_tokens)
    row: _Row = (event.timestamp, agent_id._value, amount, model, *tokens, scopes, labels, tags)
    return Spend(event, row)


def append_spend(
    conn: Connection,
    before: Sequence[AuditEvent],
    charged: Spend,
    after: Sequence[AuditEvent],
    chain: AuditChain,
    now: float,
) -> list[AuditRecord]:
    """Append ``before``, the spend's record and ``after`` in the transaction ``conn`` holds,
    and the spend's ledger row under its record's seq; the records appended."""
    records = append(conn, [*before, charged.event, *after], chain, now)
    seq = records[len(before)].seq
    row = charged.row
    conn.db.execute(SQL_RECORD, (row[0] // BUCKET, seq, *row))
    return records


def index_appended(conn: Connection, records: Sequence[AuditRecord]) -> None:
    """The ledger rows of ``spend`` records appended as they are (``append_audit``: a trail
    copied from another store with ``save_audit_logs(..., ledger=True)``), in the transaction
    ``conn`` holds, read back from each record as ``ledger.entry_of`` reads it."""
    for record in records:
        if record.event.event_type != "spend":
            continue
        e = entry_of(record)
        row: _Row = (
            e.timestamp,
            e.agent_id,
            e.amount,
            e.model,
            e.input_tokens,
            e.output_tokens,
            e.cached_input_tokens,
            scopes_text(e.scopes),
            labels_text(dict(e.labels)),
            labels_text(dict(e.tags)),
        )
        conn.db.execute(SQL_RECORD, (e.timestamp // BUCKET, record.seq, *row))


#: The first ``spend`` record whose ledger row is missing or says something else (the row's
#: key is found from the record: its bucket and seq), and the first row without its record.
_SQL_CHECK_RECORDS: Final = f"""
SELECT a.seq, l.seq IS NULL FROM iron_audit a
LEFT JOIN iron_ledger l ON l.bucket = a.timestamp / {BUCKET} AND l.seq = a.seq
WHERE a.event_type = 'spend' AND (
    l.seq IS NULL OR l.agent_id != a.agent_id OR l.ts != a.timestamp
    OR l.amount != CAST(round(json_extract(a.details, '$.amount') * 1000000) AS INTEGER)
    OR l.model IS NOT json_extract(a.details, '$.model')
    OR l.input_tokens != coalesce(json_extract(a.details, '$.input_tokens'), 0)
    OR l.output_tokens != coalesce(json_extract(a.details, '$.output_tokens'), 0)
    OR l.cached_input_tokens != coalesce(json_extract(a.details, '$.cached_input_tokens'), 0))
ORDER BY a.seq LIMIT 1"""
_SQL_CHECK_ROWS: Final = """
SELECT l.seq FROM iron_ledger l LEFT JOIN iron_audit a ON a.seq = l.seq AND a.event_type = 'spend'
WHERE a.seq IS NULL ORDER BY l.seq LIMIT 1"""


def check(db: sqlite3.Connection) -> tuple[int, str] | None:
    """``Backend.check_ledger``: the first disagreement between the records and their rows."""
    found = db.execute(_SQL_CHECK_RECORDS).fetchone()
    if found is not None:
        what = "has no ledger row" if found[1] else "disagrees with its ledger row"
        return found[0], f"spend record {found[0]} {what}: the ledger index was changed in the store"
    orphan = db.execute(_SQL_CHECK_ROWS).fetchone()
    if orphan is not None:
        return orphan[0], f"the ledger index holds a row for seq {orphan[0]}, which is no spend record"
    return None


def prune_params(before: int, last_seq: int) -> tuple[int, int, int]:
    """The parameters of :data:`SQL_PRUNE` for a prune before ``before`` up to ``last_seq``."""
    return before // BUCKET, before, last_seq


def _json_path(key: str) -> str:
    # Label and tag keys are [a-z][a-z0-9_.-]*: quoted, a dot in one is part of the key.
    return f'$."{key}"'


def totals_select(query: SpendQuery) -> tuple[str, dict[str, object]]:
    """The ``SELECT`` (and its named parameters) that totals ``query`` from ``iron_ledger``."""
    params: dict[str, object] = {}
    groups: list[str] = []
    join = ""
    for i, key in enumerate(query.keys):
        if key == "bucket":
            groups.append("l.bucket")
        elif key == "agent":
            groups.append("l.agent_id")
        elif key == "model":
            groups.append("l.model")
        elif key == "scope":
            if query.scope is not None:  # only under the scope filtered on
                groups.append(":scope")
            else:
                join = " LEFT JOIN json_each(l.scopes) s"
                groups.append("s.value")
        else:  # label:<key> or tag:<key>
            column, name = ("labels", key[6:]) if key.startswith("label:") else ("tags", key[4:])
            params[f"k{i}"] = _json_path(name)
            groups.append(f"json_extract(l.{column}, :k{i})")
    where: list[str] = []
    # The span: its buckets (a range of the key), then the exact bounds within the end ones.
    if query.since is not None:
        where += ["l.bucket >= :since_bucket", "l.ts >= :since"]
        params["since_bucket"], params["since"] = query.since // BUCKET, query.since
    if query.until is not None:
        where += ["l.bucket <= :until_bucket", "l.ts < :until"]
        params["until_bucket"], params["until"] = (query.until - 1) // BUCKET, query.until
    if query.agent_id is not None:
        where.append("l.agent_id = :agent")
        params["agent"] = query.agent_id
    if query.model is not None:
        where.append("l.model = :model")
        params["model"] = query.model
    if query.scope is not None:
        where.append("instr(l.scopes, :quoted) > 0")
        params["scope"] = query.scope
        params["quoted"] = f'"{query.scope}"'
    for column, wanted in (("labels", query.labels), ("tags", query.tags)):
        for j, (name, value) in enumerate(sorted(wanted.items())):
            where.append(f"json_extract(l.{column}, :{column}_k{j}) = :{column}_v{j}")
            params[f"{column}_k{j}"] = _json_path(name)
            params[f"{column}_v{j}"] = value
    sums = "sum(l.amount), count(*), sum(l.input_tokens), sum(l.output_tokens), sum(l.cached_input_tokens)"
    sql = f"SELECT {', '.join([*groups, sums])} FROM iron_ledger l{join}"
    if where:
        sql += " WHERE " + " AND ".join(where)
    if groups:
        sql += " GROUP BY " + ", ".join(str(n) for n in range(1, len(groups) + 1))
    return sql, params


def totals(db: sqlite3.Connection, query: SpendQuery) -> list[SpendTotal]:
    """The ledger's totals for ``query`` (``Backend.spend_totals``), read in one statement."""
    sql, params = totals_select(query)
    n = len(query.keys)
    found: list[SpendTotal] = []
    for row in db.execute(sql, params).fetchall():
        if row[n + 1] == 0:  # no keys and no rows: the one row of an empty aggregate
            continue
        found.append(SpendTotal(tuple(row[:n]), *row[n:]))
    return found
