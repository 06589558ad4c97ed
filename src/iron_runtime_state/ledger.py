"""The spend ledger: one ``spend`` record per settled spend, and the reports read from it (no I/O).

Every settled spend (``record_spend``, a commit, a usage-priced call) appends one ``spend``
record to the audit trail in the same atomic step as the charge, inside the same hash chain:
the ledger is tamper-evident like the rest of the trail. The record carries the agent, the
amount, the budget scopes charged, the agent's labels at the time, and the call's metadata
(:class:`SpendNote`: model, token counts, the caller's tags). Over any span of time the
ledger sums to what the budgets show as spent in it.

Reports group the ledger by time and by what the records carry. A store answers
:class:`SpendQuery` with :class:`SpendTotal` rows: the SQL stores from an index table written
with each record, the others by reading the ``spend`` records (:func:`aggregate`). Time is
grouped by :data:`BUCKET` seconds in the store (every time zone's offset is a whole number of
quarter hours), and the buckets are merged into local days, weeks or months here
(:func:`report_rows`), so a day in any time zone is exact, daylight saving included.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from decimal import Decimal
from types import MappingProxyType
from typing import Any, Final

from .errors import SchemaError, StateTypeError, ValidationError
from .models import AuditRecord
from .money import exact, from_micros, to_micros
from .names import LABEL_KEY_RE, check_labels, check_scope
from .periods import zone

__all__ = [
    "BUCKET",
    "GROUP_KEYS",
    "MAX_TAGS",
    "LedgerEntry",
    "SpendNote",
    "SpendQuery",
    "SpendRow",
    "SpendTotal",
    "aggregate",
    "check_tags",
    "entry_of",
    "group_keys",
    "report_rows",
    "time_of",
]

#: Seconds per time bucket a store groups by (15 minutes: every UTC offset is a multiple).
BUCKET: Final = 900
#: What a report may group by: time (local to the report's ``tz``), then what records carry.
TIME_KEYS: Final = ("hour", "day", "week", "month")
GROUP_KEYS: Final = (*TIME_KEYS, "agent", "scope", "model")
#: Tags a spend may carry, and their shape (the same as agents' labels).
MAX_TAGS: Final = 16
_EMPTY: Final[Mapping[str, str]] = MappingProxyType({})


def check_tags(value: object) -> Mapping[str, str]:
    """``value`` as a read-only mapping of tags (``{"run": "nightly"}``), shaped like labels."""
    if value is None:
        return _EMPTY
    try:
        tags = check_labels(value)
    except (StateTypeError, ValidationError) as exc:
        raise type(exc)(str(exc).replace("AgentState.labels", "tags").replace("label", "tag")) from None
    return MappingProxyType(tags) if tags else _EMPTY


@dataclass(frozen=True, slots=True)
class SpendNote:
    """What the ledger keeps of a spend beyond its amount: the model call that cost it, if any,
    and the caller's tags. Checked by the manager; stores copy it into the ``spend`` record."""

    model: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    tags: Mapping[str, str] = field(default_factory=lambda: _EMPTY)

    def fields(self) -> dict[str, object]:
        """The note's fields of a ``spend`` record's details (only those that say something)."""
        out: dict[str, object] = {}
        if self.model is not None:
            out["model"] = self.model
            out["input_tokens"] = self.input_tokens
            out["output_tokens"] = self.output_tokens
            out["cached_input_tokens"] = self.cached_input_tokens
        if self.tags:
            out["tags"] = dict(self.tags)
        return out


#: The note of a spend that says nothing beyond its amount.
NO_NOTE: Final = SpendNote()


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """A ``spend`` record, read: what reports group and sum."""

    seq: int
    timestamp: int
    agent_id: str
    amount: int  # micro-units
    scopes: tuple[str, ...]
    labels: Mapping[str, str]
    model: str | None
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    tags: Mapping[str, str]


def entry_of(record: AuditRecord) -> LedgerEntry:
    """The ledger entry of a ``spend`` record (as ``events.spend`` wrote it); ``SchemaError``
    for one that something other than the library wrote (``verify_audit_log`` says what)."""
    try:
        return _entry_of(record)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise SchemaError(
            f"spend record {record.seq} cannot be read as a ledger entry ({type(exc).__name__}: "
            f"{str(exc)[:80]}); the library did not write it: run verify_audit_log"
        ) from None


def _entry_of(record: AuditRecord) -> LedgerEntry:
    d: dict[str, Any] = json.loads(record.details)
    return LedgerEntry(
        seq=record.seq,
        timestamp=record.timestamp,
        agent_id=record.agent_id.as_str(),
        amount=to_micros(d["amount"]),
        scopes=tuple(d.get("scopes", ())),
        labels=d.get("labels", _EMPTY),
        model=d.get("model"),
        input_tokens=int(d.get("input_tokens", 0)),
        output_tokens=int(d.get("output_tokens", 0)),
        cached_input_tokens=int(d.get("cached_input_tokens", 0)),
        tags=d.get("tags", _EMPTY),
    )


@dataclass(frozen=True, slots=True)
class SpendQuery:
    """What a store totals: ``spend`` records with ``since <= timestamp < until`` that pass every
    filter, grouped by ``keys`` (each ``"bucket"`` (``timestamp // BUCKET``), ``"agent"``,
    ``"scope"``, ``"model"``, ``"label:<key>"`` or ``"tag:<key>"``).

    A record counts under each scope it charged when grouped by scope (``None``: it charged
    none); with a ``scope`` filter, only under that scope. A missing label, tag or model groups
    as ``None``.
    """

    since: int | None = None
    until: int | None = None
    keys: tuple[str, ...] = ()
    agent_id: str | None = None
    scope: str | None = None
    model: str | None = None
    labels: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    tags: Mapping[str, str] = field(default_factory=lambda: _EMPTY)

    def admits(self, e: LedgerEntry) -> bool:
        """Whether the entry passes the time span and every filter."""
        return (
            (self.since is None or e.timestamp >= self.since)
            and (self.until is None or e.timestamp < self.until)
            and (self.agent_id is None or e.agent_id == self.agent_id)
            and (self.scope is None or self.scope in e.scopes)
            and (self.model is None or e.model == self.model)
            and all(e.labels.get(k) == v for k, v in self.labels.items())
            and all(e.tags.get(k) == v for k, v in self.tags.items())
        )


@dataclass(slots=True)
class SpendTotal:
    """A store's total for one group: the group's values (in the query's ``keys`` order) and sums."""

    key: tuple[str | int | None, ...]
    amount: int = 0  # micro-units
    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0

    def add(self, other: SpendTotal) -> None:
        """Add another total's sums to this one."""
        self.amount += other.amount
        self.calls += other.calls
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cached_input_tokens += other.cached_input_tokens


def _values(query: SpendQuery, e: LedgerEntry) -> list[tuple[str | int | None, ...]]:
    """The groups an entry counts in (one, or one per scope when grouped by scope)."""
    keys: list[tuple[str | int | None, ...]] = [()]
    for k in query.keys:
        if k == "scope":
            scopes: Sequence[str | None] = (
                (query.scope,) if query.scope is not None else (e.scopes or (None,))
            )
            keys = [(*key, s) for key in keys for s in scopes]
            continue
        value: str | int | None
        if k == "bucket":
            value = e.timestamp // BUCKET
        elif k == "agent":
            value = e.agent_id
        elif k == "model":
            value = e.model
        elif k.startswith("label:"):
            value = e.labels.get(k[6:])
        else:  # tag:<key>
            value = e.tags.get(k[4:])
        keys = [(*key, value) for key in keys]
    return keys


def aggregate(entries: Iterable[LedgerEntry], query: SpendQuery) -> list[SpendTotal]:
    """The totals of ``query`` over ``entries`` (for stores that read the records themselves)."""
    groups: dict[tuple[str | int | None, ...], SpendTotal] = {}
    for e in entries:
        if not query.admits(e):
            continue
        for key in _values(query, e):
            total = groups.get(key)
            if total is None:
                total = groups[key] = SpendTotal(key)
            total.amount += e.amount
            total.calls += 1
            total.input_tokens += e.input_tokens
            total.output_tokens += e.output_tokens
            total.cached_input_tokens += e.cached_input_tokens
    return list(groups.values())


# -- the manager's side: what a report asks, and what it answers -----------------------------------


def group_keys(group_by: object) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The report's keys (checked) and the store's keys for them (time keys become ``bucket``)."""
    if isinstance(group_by, str):
        group_by = tuple(part.strip() for part in group_by.split(",") if part.strip())
    if not isinstance(group_by, Sequence):
        raise StateTypeError(
            f"group_by must be a sequence of keys such as ('day', 'model'), got {type(group_by).__name__}"
        )
    keys: list[str] = []
    for key in group_by:
        ok = isinstance(key, str) and (
            key in GROUP_KEYS
            or (key[:6] == "label:" and LABEL_KEY_RE.fullmatch(key[6:]) is not None)
            or (key[:4] == "tag:" and LABEL_KEY_RE.fullmatch(key[4:]) is not None)
        )
        if not ok:
            raise ValidationError(
                f"cannot group a spend report by {str(key)[:40]!r}: use {', '.join(GROUP_KEYS)}, "
                "'label:<key>' (an agent label) or 'tag:<key>' (a spend's tag)"
            )
        if key in keys:
            raise ValidationError(f"group_by names {key!r} twice")
        keys.append(key)
    if sum(k in TIME_KEYS for k in keys) > 1:
        raise ValidationError(f"group_by may hold one time key of {', '.join(TIME_KEYS)}, got {keys}")
    store = tuple("bucket" if k in TIME_KEYS else k for k in keys)
    return tuple(keys), store


def time_of(value: object, tz: str, what: str) -> int | None:
    """A report bound as Unix seconds: a ``datetime`` (naive ones are in ``tz``), a ``date`` (its
    start in ``tz``), an ISO 8601 text of either, Unix seconds, or ``None``."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value
        try:
            value = date.fromisoformat(text) if len(text) == 10 else datetime.fromisoformat(text)
        except ValueError:
            raise ValidationError(
                f"{what}={text[:40]!r} is not a date or time: write 2026-11-01 or 2026-11-01T08:00:00+00:00"
            ) from None
    if isinstance(value, datetime):
        moment = value if value.tzinfo is not None else value.replace(tzinfo=zone(tz))
        return int(moment.timestamp())
    if isinstance(value, date):
        return int(datetime(value.year, value.month, value.day, tzinfo=zone(tz)).timestamp())
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return int(value)
    raise StateTypeError(
        f"{what} must be a datetime, a date, an ISO 8601 text or Unix seconds, got {type(value).__name__}"
    )


@dataclass(frozen=True, slots=True)
class SpendRow:
    """One line of a spend report: the group (``{"day": "2026-11-01", "model": "gpt-4o"}``) and
    its totals. ``amount`` is a float of an exact micro-unit total (``amount_exact``: the Decimal)."""

    group: Mapping[str, str | None]
    amount: float
    calls: int
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int

    @property
    def amount_exact(self) -> Decimal:
        """``amount`` as the exact ``Decimal`` the ledger sums to."""
        return exact(self.amount)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: the group's keys, then the totals."""
        return {
            **self.group,
            "amount": self.amount,
            "calls": self.calls,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cached_input_tokens": self.cached_input_tokens,
        }


def _local(bucket: int, key: str, tz: str) -> str:
    moment = datetime.fromtimestamp(bucket * BUCKET, timezone.utc).astimezone(zone(tz))
    if key == "hour":
        return moment.strftime("%Y-%m-%dT%H:00%z")
    if key == "day":
        return moment.date().isoformat()
    if key == "week":  # the Monday that starts the ISO week
        return date.fromordinal(moment.toordinal() - moment.weekday()).isoformat()
    return moment.strftime("%Y-%m")


def report_rows(totals: Iterable[SpendTotal], keys: Sequence[str], tz: str) -> list[SpendRow]:
    """A store's totals as report rows: buckets merged into local time keys, sorted by group."""
    merged: dict[tuple[str | None, ...], SpendTotal] = {}
    for total in totals:
        values = tuple(
            _local(int(v), k, tz) if k in TIME_KEYS and v is not None else (None if v is None else str(v))
            for k, v in zip(keys, total.key, strict=True)
        )
        into = merged.get(values)
        if into is None:
            merged[values] = into = SpendTotal(values)
        into.add(total)
    rows = [
        SpendRow(
            group=dict(zip(keys, values, strict=True)),
            amount=from_micros(t.amount),
            calls=t.calls,
            input_tokens=t.input_tokens,
            output_tokens=t.output_tokens,
            cached_input_tokens=t.cached_input_tokens,
        )
        for values, t in merged.items()
    ]
    rows.sort(key=lambda row: tuple((v is None, v or "") for v in row.group.values()))
    return rows


def check_filter_scope(scope: object) -> str | None:
    """A report's ``scope`` filter, checked (``None``: any)."""
    return None if scope is None else check_scope(scope)
