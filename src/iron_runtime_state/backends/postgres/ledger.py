"""The spend ledger's index on PostgreSQL: its rows, and the reports read from them (no I/O).

Every ``spend`` record has one row in ``ledger`` (see :mod:`.schema`), inserted in the record's
transaction: by the fast paths' ``log_spend``, or by the general path (:mod:`.spending`) right
after its append. ``prune_audit`` deletes the rows of the records it removes in the same
transaction. A report (:class:`~...ledger.SpendQuery`) is one ``GROUP BY`` over the rows of its
span, answered with the same totals :func:`...ledger.aggregate` finds reading the records.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Final

from ...ledger import BUCKET, SpendNote, SpendQuery, SpendTotal, entry_of
from ...models import AuditRecord
from .requests import Op, Sql

__all__ = [
    "INSERT",
    "check_ledger",
    "labels_json",
    "ledger_row",
    "note_columns",
    "spend_totals",
    "totals_of",
    "totals_select",
]

#: A general-path spend record's row (the fast paths insert theirs in ``log_spend``).
INSERT: Final = (
    "INSERT INTO {s}.ledger (seq, ts, agent_id, amount, model, input_tokens, output_tokens, "
    "cached_input_tokens, scopes, labels, tags) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
)

_SUMS: Final = "sum(amount), count(*), sum(input_tokens), sum(output_tokens), sum(cached_input_tokens)"


def labels_json(labels: Mapping[str, str]) -> str:
    """Labels (or tags) as the ``jsonb`` parameter they are sent as."""
    return json.dumps(labels, separators=(",", ":")) if labels else "{}"


def note_columns(note: SpendNote | None) -> tuple[str | None, int, int, int, str | None]:
    """The ledger columns a spend's note fills: model, the three token counts, tags (``NULL``
    when none). Read from the fields the ``spend`` record carries, so that the row says what
    the record says (:func:`...ledger.entry_of`)."""
    if note is None:
        return None, 0, 0, 0, None
    fields: dict[str, Any] = note.fields()
    tags = fields.get("tags")
    return (
        fields.get("model"),
        int(fields.get("input_tokens", 0)),
        int(fields.get("output_tokens", 0)),
        int(fields.get("cached_input_tokens", 0)),
        labels_json(tags) if tags else None,
    )


def ledger_row(record: AuditRecord) -> tuple[Any, ...]:
    """:data:`INSERT`'s parameters for a ``spend`` record appended as it is (a copied trail);
    ``SchemaError`` (from ``entry_of``) for one the library did not write."""
    e = entry_of(record)
    labels, tags = dict(e.labels), dict(e.tags)
    return (
        e.seq,
        e.timestamp,
        e.agent_id,
        e.amount,
        e.model,
        e.input_tokens,
        e.output_tokens,
        e.cached_input_tokens,
        list(e.scopes),
        labels_json(labels) if labels else None,
        labels_json(tags) if tags else None,
    )


def _key(key: str, query: SpendQuery, params: list[Any]) -> str:
    """The SQL of one group key (its parameters appended to ``params``)."""
    if key == "bucket":
        return f"l.ts / {BUCKET}"  # timestamps are Unix seconds, never negative: / is floor
    if key == "agent":
        return "l.agent_id"
    if key == "model":
        return "l.model"
    if key == "scope":
        if query.scope is not None:  # only under the scope filtered on
            params.append(query.scope)
            return "%s::text"
        return "u.scope"
    column, name = ("l.labels", key[6:]) if key.startswith("label:") else ("l.tags", key[4:])
    params.append(name)
    return f"{column} ->> %s::text"


def totals_select(quoted_schema: str, query: SpendQuery) -> tuple[str, list[Any]]:
    """The statement answering ``query``, and its parameters.

    The span and the filters are comparisons on indexed columns or on the row itself: a span
    reads one range of ``ledger_by_time`` (of ``ledger_by_agent`` or ``ledger_by_model`` with
    that filter), so a report never reads rows outside its span. Grouped by scope without a
    scope filter, a row counts once under each scope it charged (``NULL`` when it charged none).
    """
    params: list[Any] = []
    keys = [_key(key, query, params) for key in query.keys]
    source = f"{quoted_schema}.ledger l"
    if "scope" in query.keys and query.scope is None:
        source += (
            " CROSS JOIN LATERAL unnest(CASE WHEN cardinality(l.scopes) = 0 THEN ARRAY[NULL]::text[] "
            "ELSE l.scopes END) AS u(scope)"
        )
    where: list[str] = []
    if query.since is not None:
        where.append("l.ts >= %s")
        params.append(query.since)
    if query.until is not None:
        where.append("l.ts < %s")
        params.append(query.until)
    if query.agent_id is not None:
        where.append("l.agent_id = %s")
        params.append(query.agent_id)
    if query.scope is not None:
        where.append("%s::text = ANY (l.scopes)")
        params.append(query.scope)
    if query.model is not None:
        where.append("l.model = %s")
        params.append(query.model)
    for column, wanted in (("l.labels", query.labels), ("l.tags", query.tags)):
        for name, value in wanted.items():
            where.append(f"{column} ->> %s::text = %s")
            params += [name, value]
    sql = f"SELECT {', '.join([*keys, _SUMS])} FROM {source}"
    if where:
        sql += " WHERE " + " AND ".join(where)
    if keys:
        sql += " GROUP BY " + ", ".join(str(i) for i in range(1, len(keys) + 1))
    return sql, params


def totals_of(rows: Sequence[Sequence[Any]], width: int) -> list[SpendTotal]:
    """The totals of the statement's rows (``width`` group keys first, then the sums)."""
    totals = []
    for row in rows:
        amount, calls, input_tokens, output_tokens, cached = row[width:]
        if not calls:  # no key and no row: the one row of an empty aggregate
            continue
        sums = int(amount), int(calls), int(input_tokens), int(output_tokens), int(cached)
        totals.append(SpendTotal(tuple(row[:width]), *sums))
    return totals


def spend_totals(quoted_schema: str, query: SpendQuery) -> Op[list[SpendTotal]]:
    """See ``Backend.spend_totals``: one ``GROUP BY`` over the ledger rows of the span."""
    sql, params = totals_select(quoted_schema, query)
    rows = yield Sql(sql, params)
    return totals_of(rows, len(query.keys))


#: The first ``spend`` record whose ledger row is missing or says something else, and the first
#: row without its record (``{s}``: the schema). Amounts are whole micro-units in the row and a
#: float of units in the record (exact to the micro-unit below a billion units).
_CHECK_RECORDS: Final = """
SELECT a.seq, l.seq IS NULL FROM {s}.audit a LEFT JOIN {s}.ledger l ON l.seq = a.seq
WHERE a.event_type = 'spend' AND (
    l.seq IS NULL OR l.agent_id <> a.agent_id OR l.ts <> a.timestamp
    OR l.amount <> round((a.details::jsonb ->> 'amount')::numeric * 1000000)
    OR l.model IS DISTINCT FROM a.details::jsonb ->> 'model'
    OR l.input_tokens <> coalesce((a.details::jsonb ->> 'input_tokens')::bigint, 0)
    OR l.output_tokens <> coalesce((a.details::jsonb ->> 'output_tokens')::bigint, 0)
    OR l.cached_input_tokens <> coalesce((a.details::jsonb ->> 'cached_input_tokens')::bigint, 0))
ORDER BY a.seq LIMIT 1"""
_CHECK_ROWS: Final = """
SELECT l.seq FROM {s}.ledger l LEFT JOIN {s}.audit a ON a.seq = l.seq AND a.event_type = 'spend'
WHERE a.seq IS NULL ORDER BY l.seq LIMIT 1"""


def check_ledger(quoted_schema: str) -> Op[tuple[int, str] | None]:
    """See ``Backend.check_ledger``: the first disagreement between the records and their rows."""
    rows = yield Sql(_CHECK_RECORDS.format(s=quoted_schema), [])
    if rows:
        seq, missing = rows[0]
        what = "has no ledger row" if missing else "disagrees with its ledger row"
        return int(seq), f"spend record {seq} {what}: the ledger index was changed in the store"
    rows = yield Sql(_CHECK_ROWS.format(s=quoted_schema), [])
    if rows:
        seq = int(rows[0][0])
        return seq, f"the ledger index holds a row for seq {seq}, which is no spend record"
    return None
