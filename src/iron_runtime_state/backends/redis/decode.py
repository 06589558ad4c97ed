"""Replies read back: what each script's or command's reply means, as results or errors.

A script's reply starts with a code saying what it did (-1: no such agent, -2: not running,
-3: no such hold, -4 and -5: a count would overflow, and the codes of :data:`CODES`) and then
carries the agent's fields, in the order of :data:`~.keys.READ_FIELDS`, where it has them. A
change that queued audit events in an outbox ends its reply with them (:class:`Queued`);
:func:`outbox_event` builds an entry's event. Data that cannot be read raises ``SchemaError``.
Money is whole micro-units; a value 0.4/0.5 stored (a float) reads as the micro-units nearest it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Final, NamedTuple

from ... import events
from ...audit_chain import GENESIS_HASH, AuditRow
from ...budgets import check_total
from ...errors import (
    AgentNotFound,
    AgentNotRunning,
    BudgetNotFound,
    ReservationError,
    SchemaError,
    StateError,
)
from ...ids import AgentId
from ...ledger import SpendNote
from ...models import AgentState, AgentStatus, AuditEvent, AuditRecord, FleetStats, Reservation, check_count
from ...money import from_micros, to_micros
from ...thresholds import parse_thresholds
from ..base import AuditMarks, BudgetRow

__all__ = [
    "LATE",
    "LEGACY",
    "NO_SCOPE",
    "RESOLVE",
    "ROLL",
    "TOO_BIG",
    "Queued",
    "decode_agent_id",
    "decode_audit_row",
    "decode_head",
    "decode_marks",
    "decode_pii",
    "decode_query_rows",
    "decode_row",
    "decode_state",
    "decode_stats",
    "decode_status",
    "float_micros",
    "legacy_error",
    "outbox_event",
    "queued",
    "refused_change",
    "reservation_error",
    "row_to_record",
]

#: Reply codes (``lua/_prelude.lua``): the client computes new periods and runs the script again;
#: (cluster) the client settles holds whose other half lives in another slot, and runs it again.
ROLL: Final = -10
RESOLVE: Final = -11
#: Reply codes of refusals that changed nothing: a scope the agent lists does not exist; (cluster)
#: a step that came after its pending hold expired; a total past MAX_MICROS; an agent 0.4/0.5
#: stored, not migrated yet.
NO_SCOPE: Final = -6
LATE: Final = -7
TOO_BIG: Final = -8
LEGACY: Final = -9

_STATUS: Final = {s.value.encode(): s for s in AgentStatus}


def _text(value: bytes) -> str:
    return value.decode("utf-8")


def decode_agent_id(value: bytes | str) -> AgentId:
    """An agent id read back from the store (a ``SchemaError`` if someone stored garbage)."""
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    try:
        return AgentId.parse(text)
    except ValueError:
        raise SchemaError(f"the store holds {text[:64]!r} where an agent id belongs") from None


def float_micros(value: bytes | str) -> int:
    """An amount 0.4/0.5 stored (a float's text, ``"4"`` or ``"0.30000000000000004"``) as the
    micro-units nearest it."""
    return to_micros(float(value))


def decode_state(agent_id: AgentId, reply: Sequence[Any], at: int = 0) -> AgentState | None:
    """The state in ``reply[at:at + 10]`` (the first ten :data:`~.scripts.AGENT_FIELDS`), or in a
    read of an agent 0.4/0.5 stored, its float spend and limit at ``at + 10`` and ``at + 11``.

    ``None`` when the status is missing (no such agent). A missing limit is no limit, missing
    thresholds the default ones (an agent 0.6 or older stored).
    """
    status = reply[at]
    if status is None:
        return None
    try:
        spent, limit = reply[at + 1], reply[at + 3]
        if spent is None:  # 0.4/0.5: float fields
            spent, limit = float_micros(reply[at + 10]), reply[at + 11] and float_micros(reply[at + 11])
        labels, scopes, period, tz, start, thresholds = reply[at + 4 : at + 10]
        return AgentState._trusted(
            agent_id,
            _STATUS[status],
            from_micros(int(spent)),
            int(reply[at + 2]),
            None if limit is None else from_micros(int(limit)),
            json.loads(labels) if labels else {},
            tuple(scopes.decode().split(",")) if scopes else (),
            None if period is None else period.decode(),
            "UTC" if tz is None else tz.decode(),
            None if start is None else float(start),
            parse_thresholds(thresholds),
        )
    except (KeyError, TypeError, ValueError, IndexError):
        raise SchemaError(
            f"agent {agent_id} has unreadable fields in Redis: {list(reply[at : at + 12])!r:.200}"
        ) from None


def decode_row(row: Sequence[Any]) -> BudgetRow:
    """A budget scope as replies carry it (``budget_row`` in ``lua/_prelude.lua``)."""
    try:
        name, limit, period, tz, start, spent, held, thresholds = row
        return BudgetRow(
            name.decode(),
            None if limit is None else int(limit),
            None if period is None else period.decode(),
            tz.decode(),
            float(start) if start else None,
            int(spent),
            int(held),
            parse_thresholds(thresholds),
        )
    except (TypeError, ValueError, AttributeError):
        raise SchemaError(f"a budget scope in Redis has unreadable fields: {row!r:.200}") from None


def _state(agent_id: AgentId, reply: Sequence[Any], at: int) -> AgentState:
    state = decode_state(agent_id, reply, at)
    assert state is not None
    return state


class Queued(NamedTuple):
    """The audit events a change queued in an outbox, as the change script replied them."""

    #: Each event's outbox entry, ``[entry id, fields (flat, see outbox_event)]``, in order.
    entries: list[list[Any]]
    waiting: int  # the entries in the outbox, these included (more: older ones wait too)


def queued(reply: Sequence[Any], at: int) -> Queued | None:
    """The events queued at ``reply[at:]`` (see ``queue_events``), if the reply has any."""
    if len(reply) <= at:
        return None
    return Queued([[reply[i], reply[i + 1]] for i in range(at + 1, len(reply), 2)], int(reply[at]))


def legacy_error(namespace: str) -> SchemaError:
    """A change of a namespace (or an agent) still in the layout 0.4 and 0.5 wrote."""
    return SchemaError(
        f"namespace {namespace!r} was written by iron-runtime-state 0.4 or 0.5 (money as floats): it "
        "reads as it is, but must be migrated before it changes. Stop the processes that still run "
        "0.4 or 0.5 on it, then run `iron-state migrate` with its URL (or call the store's migrate())"
    )


def refused_change(reply: Sequence[Any], agent_id: AgentId, namespace: str, what: str) -> Exception:
    """The error of a reply whose code refused a change outright (changing nothing)."""
    code = reply[0]
    if code == -2:
        return AgentNotRunning(agent_id.as_str(), reply[1].decode("utf-8", "replace"), what)
    if code == NO_SCOPE:
        return BudgetNotFound(reply[1].decode(), agent_id.as_str())
    if code == TOO_BIG:
        scope = reply[1].decode()
        try:
            check_total(
                int(reply[2]), f"the spend of budget scope {scope!r}" if scope else "the agent's spend"
            )
        except StateError as exc:
            return exc
    if code == LEGACY:
        return legacy_error(namespace)
    return AgentNotFound(agent_id.as_str())


def reservation_error(reservation: Reservation, action: str) -> ReservationError:
    """The error for settling a hold that is not open (the memory backend's wording)."""
    return ReservationError(
        f"cannot {action} reservation {reservation.reservation_id}: it is not open "
        "(already committed or released, expired after its ttl, or its agent was "
        "removed); if money was spent after the hold expired, record it with record_spend"
    )


def decode_status(
    agent_id: AgentId, reply: Sequence[Any], namespace: str
) -> tuple[AgentState, Queued | None]:
    """What ``set_status.lua`` did: the new state, and the ``status_changed`` event it queued."""
    if reply[0] != 1:
        raise refused_change(reply, agent_id, namespace, "set status")
    return _state(agent_id, reply, 2), queued(reply, 12)


def decode_pii(
    agent_id: AgentId, count: int, reply: Sequence[Any], namespace: str
) -> tuple[AgentState, Queued]:
    """What ``record_pii.lua`` did, and the ``pii_detected`` event it queued.

    A count that would reach 2**63 is a ``ValidationError`` (the script changed nothing).
    """
    code = reply[0]
    if code == -4:
        check_count(int(reply[1]) + count, "the agent's pii_detections")
    if code == -5:
        check_count(int(reply[1]) + count, "the fleet's pii_detections")
    if code != 1:
        raise refused_change(reply, agent_id, namespace, "record PII detections")
    events = queued(reply, 11)
    assert events is not None  # every PII change has its event
    return _state(agent_id, reply, 1), events


def outbox_event(fields: Sequence[bytes]) -> AuditEvent:
    """The audit event of an outbox entry (its fields as a flat list), built by ``events.py``.

    Entries hold raw values (amounts in micro-units, times as the client sent them), so the JSON
    of the details is written here, exactly as the other stores write it. An entry 0.5 left in an
    outbox (float amounts, no scope) reads too.
    """
    entry = dict(zip(fields[::2], fields[1::2], strict=True))
    kind = entry.get(b"kind")
    if kind == b"charge" or kind == b"threshold":
        return _ledger_event(kind, entry, fields)
    # An entry of this version always has a scope field (b"" for an agent's own budget); 0.5's had
    # none, and float amounts.
    micros = int if b"scope" in entry else float_micros
    try:
        kind = entry[b"kind"]
        now = float(entry[b"at"]) if b"at" in entry else 0.0
        scope = _text(entry[b"scope"]) if entry.get(b"scope") else None
        if kind == b"set":
            limit = entry[b"limit"]
            period = _text(entry[b"period"]) or None
            return events.budget_set(
                _text(entry[b"scope"]),
                micros(limit) if limit else None,
                period,
                _text(entry[b"tz"]),
                now,
                parse_thresholds(entry.get(b"thresholds")),
            )
        if kind == b"removed":
            return events.budget_removed(_text(entry[b"scope"]), micros(entry[b"spent"]), now)
        agent_id = decode_agent_id(entry[b"agent"]) if entry[b"agent"] else None
        if kind == b"reset":
            return events.budget_reset(
                agent_id,
                scope,
                _text(entry[b"period"]),
                _text(entry[b"tz"]),
                float(entry[b"start"]),
                micros(entry[b"spent"]),
                now,
            )
        assert agent_id is not None
        if kind == b"expired":
            scopes = _text(entry[b"scopes"])
            return events.hold_expired(
                agent_id,
                _text(entry[b"reservation"]),
                int(entry[b"amount"]),
                float(entry[b"expires"]),
                tuple(scopes.split(",")) if scopes else (),
                now,
            )
        if kind == b"event":
            return AuditEvent._trusted(
                agent_id, _text(entry[b"type"]), int(entry[b"timestamp"]), _text(entry[b"details"])
            )
        if kind == b"status":
            return events.status_changed(agent_id, _STATUS[entry[b"from"]], _STATUS[entry[b"to"]], now)
        limit_micros, spent = micros(entry[b"limit"]), micros(entry[b"spent"])
        if kind == b"commit":
            return events.overspent(
                agent_id,
                now,
                _text(entry[b"reservation"]),
                limit=limit_micros,
                spent=spent,
                committed=micros(entry[b"actual"]),
                reserved=micros(entry[b"held"]),
                scope=scope,
            )
        if kind in (b"spend", b"reserve"):
            return events.budget_exceeded(
                agent_id,
                now,
                kind.decode(),
                limit=limit_micros,
                spent=spent,
                reserved=micros(entry[b"reserved"]),
                requested=micros(entry[b"amount"]),
                scope=scope,
            )
    except (KeyError, ValueError, AssertionError):
        pass
    raise _unreadable(fields)


def _unreadable(fields: Sequence[bytes]) -> SchemaError:
    return SchemaError(
        f"an audit outbox entry holds unreadable fields: {fields!r:.200}; remove it from the "
        "namespace's outbox (XDEL) to let the others through"
    )


def _note(text: bytes) -> SpendNote | None:
    """A spend's note from its JSON (``SpendNote.fields()``; ``b""``: none)."""
    if not text:
        return None
    d: dict[str, Any] = json.loads(text)
    return SpendNote(
        d.get("model"),
        d.get("input_tokens", 0),
        d.get("output_tokens", 0),
        d.get("cached_input_tokens", 0),
        d.get("tags", {}),
    )


def _ledger_event(kind: bytes, entry: Mapping[bytes, bytes], fields: Sequence[bytes]) -> AuditEvent:
    """A ``spend`` record (``charge`` entry) or a ``budget_threshold`` event (``threshold``),
    as ``spend_record`` and ``alert`` in ``lua/_prelude.lua`` queue them (micro-units, raw text)."""
    try:
        agent_id = decode_agent_id(entry[b"agent"])
        now = float(entry[b"at"])
        if kind == b"charge":
            scopes, labels = entry[b"scopes"], entry[b"labels"]
            rid = _text(entry[b"reservation"])
            return events.spend(
                agent_id,
                now,
                int(entry[b"amount"]),
                scopes.decode().split(",") if scopes else (),
                json.loads(labels) if labels else {},
                rid or None,
                _note(entry[b"note"]),
            )
        start = entry[b"start"]
        return events.budget_threshold(
            agent_id,
            now,
            float(entry[b"threshold"]),
            limit=int(entry[b"limit"]),
            spent=int(entry[b"spent"]),
            period_start=float(start) if start else None,
            scope=_text(entry[b"scope"]) or None,
        )
    except (KeyError, ValueError):
        raise _unreadable(fields) from None


def decode_audit_row(entry_id: bytes, fields: Mapping[bytes, bytes] | Sequence[bytes]) -> AuditRow:
    """An audit stream entry (its id ``<seq>-0`` and fields) as a plain row."""
    if not isinstance(fields, Mapping):
        fields = dict(zip(fields[::2], fields[1::2], strict=True))
    try:
        return (
            int(entry_id.partition(b"-")[0]),
            _text(fields[b"agent_id"]),
            _text(fields[b"event_type"]),
            int(fields[b"timestamp"]),
            _text(fields[b"details"]),
            _text(fields[b"prev_hash"]),
            _text(fields[b"hash"]),
        )
    except (KeyError, ValueError):
        raise SchemaError(
            f"audit entry {entry_id!r:.40} lacks a field or holds an unreadable one; "
            "every entry has agent_id, event_type, timestamp, details, prev_hash and hash"
        ) from None


def decode_query_rows(reply: Sequence[Any]) -> list[AuditRow]:
    """The records in a ``query_audit.lua`` reply (after its two header values)."""
    rows: list[AuditRow] = []
    for i in range(2, len(reply), 7):
        try:
            rows.append(
                (
                    int(reply[i].partition(b"-")[0]),
                    _text(reply[i + 1]),
                    _text(reply[i + 2]),
                    int(reply[i + 3]),
                    _text(reply[i + 4]),
                    _text(reply[i + 5]),
                    _text(reply[i + 6]),
                )
            )
        except (AttributeError, TypeError, ValueError):
            raise SchemaError(
                f"audit entry {reply[i]!r:.40} lacks a field or holds an unreadable one"
            ) from None
    return rows


def row_to_record(row: AuditRow) -> AuditRecord:
    """The :class:`~iron_runtime_state.models.AuditRecord` of a row."""
    seq, agent, event_type, timestamp, details, prev_hash, digest = row
    event = AuditEvent._trusted(decode_agent_id(agent), event_type, timestamp, details)
    return AuditRecord(seq, event, digest, prev_hash)


def decode_stats(replies: Sequence[Sequence[Any]]) -> FleetStats:
    """Fleet totals from every group's statistics hash (``HMGET`` of :data:`~.keys.STATS_FIELDS`):
    exact sums of micro-units (and of the float totals of a namespace 0.4/0.5 wrote)."""
    counts = [0, 0, 0]
    spent = 0
    pii = 0
    for reply in replies:
        if reply[0] is None and reply[1] is None and reply[2] is None:
            continue  # an empty group keeps no statistics hash
        try:
            for i in range(3):
                counts[i] += int(reply[i] or 0)
            spent += int(reply[3] or 0) + (to_micros(float(reply[5])) if reply[5] else 0)
            pii += int(reply[4] or 0)
        except ValueError:
            raise SchemaError(
                f"a group statistics hash in Redis holds unreadable values: {reply!r:.200}"
            ) from None
    running, stopped, failed = counts
    return FleetStats(
        total=running + stopped + failed,
        running=running,
        stopped=stopped,
        failed=failed,
        budget_spent=from_micros(spent),
        pii_detections=pii,
    )


def decode_marks(reply: Sequence[Any]) -> AuditMarks:
    """What ``audit_marks.lua`` read: the head, the anchor, the count and the seals."""
    seq, digest, anchor_seq, anchor_hash, head_seal, anchor_seal, count = reply
    return AuditMarks(
        decode_head((seq, digest)),
        decode_head((anchor_seq, anchor_hash)),
        int(count),
        None if head_seal is None else _text(head_seal),
        None if anchor_seal is None else _text(anchor_seal),
    )


def decode_head(reply: Sequence[Any]) -> tuple[int, str]:
    """``(seq, hash)`` from an ``HMGET`` of two fields of the audit head (absent: the genesis,
    ``(0, GENESIS_HASH)``, which is also the anchor of a trail never pruned)."""
    seq, digest = reply
    if seq is None or digest is None:
        return 0, GENESIS_HASH
    return int(seq), digest.decode()
