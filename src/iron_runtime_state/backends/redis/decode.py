"""Replies read back: what each script's or command's reply means, as results or errors.

A script's reply starts with a code saying what it did (-1: no such agent, -2: not running,
-3: no such hold) and then carries the agent's fields, in the order of
:data:`~.keys.STATE_FIELDS`, where it has them. Data that cannot be read raises
``SchemaError``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Final

from ...audit_chain import GENESIS_HASH, AuditRow
from ...errors import AgentNotFound, AgentNotRunning, ReservationError, SchemaError
from ...ids import AgentId
from ...models import AgentState, AgentStatus, AuditEvent, AuditRecord, FleetStats, Reservation
from ..base import CommitResult, SpendResult

__all__ = [
    "decode_agent_id",
    "decode_audit_row",
    "decode_commit",
    "decode_head",
    "decode_pii",
    "decode_query_rows",
    "decode_reserve",
    "decode_reserved",
    "decode_spend",
    "decode_state",
    "decode_stats",
    "decode_status",
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


def _not_running(agent_id: AgentId, status: bytes, action: str) -> AgentNotRunning:
    return AgentNotRunning(agent_id.as_str(), status.decode("utf-8", "replace"), action)


def decode_spend(agent_id: AgentId, reply: Sequence[Any]) -> SpendResult:
    """What ``record_spend.lua`` did."""
    code = reply[0]
    if code == 1:
        return SpendResult(_state(agent_id, reply, 1), reserved=float(reply[5]))
    if code == 0:
        return SpendResult(_state(agent_id, reply, 1), exceeded=True, reserved=float(reply[5]))
    if code == -2:
        raise _not_running(agent_id, reply[1], "record spend")
    raise AgentNotFound(agent_id.as_str())


def decode_reserve(
    agent_id: AgentId, amount: float, reservation_id: str, reply: Sequence[Any]
) -> Reservation | SpendResult:
    """What ``reserve.lua`` did."""
    code = reply[0]
    if code == 1:
        return Reservation(reservation_id, agent_id, amount, float(reply[1]))
    if code == 0:
        return SpendResult(_state(agent_id, reply, 1), exceeded=True, reserved=float(reply[5]))
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


def decode_commit(reservation: Reservation, reply: Sequence[Any]) -> CommitResult:
    """What ``commit.lua`` did."""
    code = reply[0]
    if code == -3:
        raise reservation_error(reservation, "commit")
    if code == -1:
        raise AgentNotFound(reservation.agent_id.as_str())
    return CommitResult(_state(reservation.agent_id, reply, 1), exceeded=code == 1)


def decode_reserved(agent_id: AgentId, reply: Sequence[Any]) -> tuple[AgentState, float]:
    """What ``reserved.lua`` read."""
    if reply[0] != 1:
        raise AgentNotFound(agent_id.as_str())
    return _state(agent_id, reply, 1), float(reply[5])


def decode_status(agent_id: AgentId, reply: Sequence[Any]) -> tuple[AgentStatus, AgentState]:
    """What ``set_status.lua`` did: the old status and the new state."""
    if reply[0] != 1:
        raise AgentNotFound(agent_id.as_str())
    try:
        old = _STATUS[reply[1]]
    except KeyError:
        raise SchemaError(f"agent {agent_id} has an unknown status {reply[1]!r:.40} in Redis") from None
    return old, _state(agent_id, reply, 2)


def decode_pii(agent_id: AgentId, reply: Sequence[Any]) -> AgentState:
    """What ``record_pii.lua`` did."""
    if reply[0] != 1:
        raise AgentNotFound(agent_id.as_str())
    return _state(agent_id, reply, 1)


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


def decode_head(reply: Sequence[Any]) -> tuple[int, str]:
    """``(seq, hash)`` from an ``HMGET`` of two fields of the audit head (absent: the genesis)."""
    seq, digest = reply
    if seq is None or digest is None:
        return 0, GENESIS_HASH
    return int(seq), digest.decode()
