"""Replies read back: what each script's or command's reply means, as results or errors.

A script's reply starts with a code saying what it did (-1: no such agent, -2: not running,
-3: no such hold, -4 and -5: a count would overflow) and then carries the agent's fields, in the
order of :data:`~.keys.STATE_FIELDS`, where it has them. A change that queued an audit event in
its group's outbox ends its reply with the entry (:class:`Queued`); :func:`outbox_event` builds
an entry's event. Data that cannot be read raises ``SchemaError``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Final, NamedTuple

from ... import events
from ...audit_chain import GENESIS_HASH, AuditRow
from ...errors import AgentNotFound, AgentNotRunning, ReservationError, SchemaError
from ...ids import AgentId
from ...models import (
    AgentState,
    AgentStatus,
    AuditEvent,
    AuditRecord,
    FleetStats,
    Reservation,
    check_count,
)
from ..base import AuditMarks, CommitResult, SpendResult

__all__ = [
    "Queued",
    "decode_agent_id",
    "decode_audit_row",
    "decode_commit",
    "decode_head",
    "decode_marks",
    "decode_pii",
    "decode_query_rows",
    "decode_reserve",
    "decode_reserved",
    "decode_spend",
    "decode_state",
    "decode_stats",
    "decode_status",
    "outbox_event",
    "reservation_error",
    "row_to_record",
]

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


def decode_state(agent_id: AgentId, reply: Sequence[Any], at: int = 0) -> AgentState | None:
    """The state in ``reply[at:at + 4]`` (status, budget_spent, pii_detections, budget_limit).

    ``None`` when the status is missing (no such agent). A missing or empty limit is no limit.
    """
    status = reply[at]
    if status is None:
        return None
    limit = reply[at + 3]
    try:
        return AgentState._trusted(
            agent_id,
            _STATUS[status],
            float(reply[at + 1]),
            int(reply[at + 2]),
            float(limit) if limit else None,
        )
    except (KeyError, TypeError, ValueError):
        raise SchemaError(
            f"agent {agent_id} has unreadable fields in Redis: {[reply[at + i] for i in range(4)]!r:.200}"
        ) from None


def _state(agent_id: AgentId, reply: Sequence[Any], at: int) -> AgentState:
    state = decode_state(agent_id, reply, at)
    assert state is not None
    return state


class Queued(NamedTuple):
    """An audit event a change queued in its group's outbox, as the change script replied it."""

    entry_id: bytes  # its outbox entry
    fields: list[bytes]  # the entry's fields, flat (see :func:`outbox_event`)
    waiting: int  # the entries in the outbox, this one included (more: older ones wait too)


def _queued(reply: Sequence[Any], at: int) -> Queued | None:
    """The queued event at ``reply[at:at + 3]``, if the reply has one."""
    if len(reply) <= at:
        return None
    return Queued(reply[at], reply[at + 1], int(reply[at + 2]))


def _not_running(agent_id: AgentId, status: bytes, action: str) -> AgentNotRunning:
    return AgentNotRunning(agent_id.as_str(), status.decode("utf-8", "replace"), action)


def decode_spend(agent_id: AgentId, reply: Sequence[Any]) -> tuple[SpendResult, Queued | None]:
    """What ``record_spend.lua`` did, and the ``budget_exceeded`` event a refusal queued."""
    code = reply[0]
    if code == 1:
        return SpendResult(_state(agent_id, reply, 1), reserved=float(reply[5])), None
    if code == 0:
        return SpendResult(_state(agent_id, reply, 1), True, float(reply[5])), _queued(reply, 6)
    if code == -2:
        raise _not_running(agent_id, reply[1], "record spend")
    raise AgentNotFound(agent_id.as_str())


def decode_reserve(
    agent_id: AgentId, amount: float, reservation_id: str, reply: Sequence[Any]
) -> tuple[Reservation | SpendResult, Queued | None]:
    """What ``reserve.lua`` did, and the ``budget_exceeded`` event a refusal queued."""
    code = reply[0]
    if code == 1:
        return Reservation._trusted(reservation_id, agent_id, amount, float(reply[1])), None
    if code == 0:
        return SpendResult(_state(agent_id, reply, 1), True, float(reply[5])), _queued(reply, 6)
    if code == -2:
        raise _not_running(agent_id, reply[1], "reserve budget")
    raise AgentNotFound(agent_id.as_str())


def reservation_error(reservation: Reservation, action: str) -> ReservationError:
    """The error for settling a hold that is not open (the memory backend's wording)."""
    return ReservationError(
        f"cannot {action} reservation {reservation.reservation_id}: it is not open "
        "(already committed or released, expired after its ttl, or its agent was "
        "removed); if money was spent after the hold expired, record it with record_spend"
    )


def decode_commit(reservation: Reservation, reply: Sequence[Any]) -> tuple[CommitResult, Queued | None]:
    """What ``commit.lua`` did, and the ``budget_exceeded`` event an overspend queued."""
    code = reply[0]
    if code == -3:
        raise reservation_error(reservation, "commit")
    if code == -1:
        raise AgentNotFound(reservation.agent_id.as_str())
    return CommitResult(_state(reservation.agent_id, reply, 1), exceeded=code == 1), _queued(reply, 5)


def decode_reserved(agent_id: AgentId, reply: Sequence[Any]) -> tuple[AgentState, float]:
    """What ``reserved.lua`` read."""
    if reply[0] != 1:
        raise AgentNotFound(agent_id.as_str())
    return _state(agent_id, reply, 1), float(reply[5])


def decode_status(agent_id: AgentId, reply: Sequence[Any]) -> tuple[AgentState, Queued | None]:
    """What ``set_status.lua`` did: the new state, and the ``status_changed`` event it queued."""
    if reply[0] != 1:
        raise AgentNotFound(agent_id.as_str())
    return _state(agent_id, reply, 2), _queued(reply, 6)


def decode_pii(agent_id: AgentId, count: int, reply: Sequence[Any]) -> tuple[AgentState, Queued]:
    """What ``record_pii.lua`` did, and the ``pii_detected`` event it queued.

    A count that would reach 2**63 is a ``ValidationError`` (the script changed nothing).
    """
    code = reply[0]
    if code == -4:
        check_count(int(reply[1]) + count, "the agent's pii_detections")
    if code == -5:
        check_count(int(reply[1]) + count, "the fleet's pii_detections")
    if code != 1:
        raise AgentNotFound(agent_id.as_str())
    queued = _queued(reply, 5)
    assert queued is not None  # every PII change has its event
    return _state(agent_id, reply, 1), queued


def outbox_event(fields: Sequence[bytes]) -> AuditEvent:
    """The audit event of an outbox entry (its fields as a flat list), built by ``events.py``.

    Entries hold raw values (the numbers as the script read them, the shortest text of each
    double), so the JSON of the details is written here, exactly as the other stores write it.
    """
    entry = dict(zip(fields[::2], fields[1::2], strict=True))
    try:
        kind = entry[b"kind"]
        agent_id = decode_agent_id(entry[b"agent"])
        if kind == b"event":
            return AuditEvent._trusted(
                agent_id, _text(entry[b"type"]), int(entry[b"timestamp"]), _text(entry[b"details"])
            )
        now = float(entry[b"at"])
        if kind == b"status":
            return events.status_changed(agent_id, _STATUS[entry[b"from"]], _STATUS[entry[b"to"]], now)
        limit, spent = float(entry[b"limit"]), float(entry[b"spent"])
        state = AgentState._trusted(agent_id, AgentStatus.RUNNING, spent, 0, limit)
        if kind == b"commit":
            held = Reservation._trusted(_text(entry[b"reservation"]), agent_id, float(entry[b"held"]), 0.0)
            return events.overspent(state, held, float(entry[b"actual"]), now)
        if kind in (b"spend", b"reserve"):
            reserved, amount = float(entry[b"reserved"]), float(entry[b"amount"])
            return events.budget_exceeded(agent_id, state, reserved, amount, now, kind.decode())
    except (KeyError, ValueError):
        pass
    raise SchemaError(
        f"an audit outbox entry holds unreadable fields: {fields!r:.200}; remove it from the "
        "namespace's outbox (XDEL) to let the others through"
    )


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
    """Fleet totals from every group's statistics hash (``HMGET`` of :data:`~.keys.STATS_FIELDS`)."""
    counts = [0, 0, 0]
    spent: list[float] = []
    pii = 0
    for reply in replies:
        if reply[0] is None and reply[1] is None and reply[2] is None:
            continue  # an empty group keeps no statistics hash
        try:
            for i in range(3):
                counts[i] += int(reply[i] or 0)
            spent.append(float(reply[3] or 0.0))
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
        budget_spent=math.fsum(spent),
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
