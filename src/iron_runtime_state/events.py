"""The audit events the library writes itself, built in one place (no I/O).

The managers and the stores both build them here: a store that appends an operation's event in
the same atomic step as its change (a refused spend and its ``budget_exceeded`` event) builds
exactly what the manager would have.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from .ids import AgentId
from .models import AgentStatus, AuditEvent
from .money import from_micros
from .thresholds import DEFAULT_THRESHOLDS

if TYPE_CHECKING:
    from .ledger import SpendNote

__all__ = [
    "REWOUND_AGENT",
    "SYSTEM_AGENT",
    "audit_rewound",
    "budget_exceeded",
    "budget_removed",
    "budget_reset",
    "budget_set",
    "budget_threshold",
    "event_json",
    "hold_expired",
    "overspent",
    "pii_detected",
    "spend",
    "status_changed",
]


#: One encoder for every event: ``json.dumps`` with options builds a new one per call, which
#: costs more than encoding a small event (every settled spend writes one).
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"))


def event_json(**fields: object) -> str:
    """Details of the events the library writes itself: compact JSON with sorted keys."""
    return _ENCODER.encode(fields)


def _budget_fields(scope: str | None) -> dict[str, object]:
    """The ``scope`` field of a budget event: present only for a scope (agent events keep 0.4's shape)."""
    return {} if scope is None else {"scope": scope}


def budget_exceeded(
    agent_id: AgentId,
    now: float,
    action: str,
    *,
    limit: int,
    spent: int,
    reserved: int,
    requested: int,
    scope: str | None = None,
) -> AuditEvent:
    """A spend (``action="spend"``) or hold (``"reserve"``) of ``agent_id`` refused because it would
    pass the limit of the agent (``scope=None``) or of the budget scope named. Amounts in micro-units."""
    details = event_json(
        action=action,
        limit=from_micros(limit),
        spent=from_micros(spent),
        reserved=from_micros(reserved),
        requested=from_micros(requested),
        **_budget_fields(scope),
    )
    return AuditEvent._trusted(agent_id, "budget_exceeded", int(now), details)


def overspent(
    agent_id: AgentId,
    now: float,
    reservation_id: str,
    *,
    limit: int,
    spent: int,
    committed: int,
    reserved: int,
    scope: str | None = None,
) -> AuditEvent:
    """A commit whose real cost took the agent (or a scope it draws on) past its limit; the spend
    stands. ``spent`` is the total after the commit; amounts in micro-units."""
    details = event_json(
        action="commit",
        limit=from_micros(limit),
        spent=from_micros(spent),
        committed=from_micros(committed),
        reserved=from_micros(reserved),
        reservation=reservation_id,
        **_budget_fields(scope),
    )
    return AuditEvent._trusted(agent_id, "budget_exceeded", int(now), details)


def budget_reset(
    agent_id: AgentId | None,
    scope: str | None,
    period: str,
    tz: str,
    period_start: float,
    spent: int,
    now: float,
) -> AuditEvent:
    """A budget's period ended: its spend (``spent`` micro-units, in the period that started at
    ``period_start``) starts from zero. An agent's own budget (``scope=None``) or a scope's."""
    details = event_json(
        period=period,
        tz=tz,
        period_start=int(period_start),
        spent=from_micros(spent),
        **_budget_fields(scope),
    )
    return AuditEvent._trusted(agent_id or SYSTEM_AGENT, "budget_reset", int(now), details)


def budget_set(
    scope: str,
    limit: int | None,
    period: str | None,
    tz: str,
    now: float,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
) -> AuditEvent:
    """A budget scope was created or changed by ``set_budget`` (``thresholds`` are named when
    they are not the default)."""
    extra: dict[str, object] = {}
    if tuple(thresholds) != DEFAULT_THRESHOLDS:
        extra["thresholds"] = list(thresholds)
    details = event_json(
        scope=scope, limit=None if limit is None else from_micros(limit), period=period, tz=tz, **extra
    )
    return AuditEvent._trusted(SYSTEM_AGENT, "budget_set", int(now), details)


def budget_removed(scope: str, spent: int, now: float) -> AuditEvent:
    """A budget scope was removed by ``remove_budget`` (``spent``: its spend in the open period)."""
    details = event_json(scope=scope, spent=from_micros(spent))
    return AuditEvent._trusted(SYSTEM_AGENT, "budget_removed", int(now), details)


def hold_expired(
    agent_id: AgentId, reservation_id: str, amount: int, expires_at: float, scopes: Sequence[str], now: float
) -> AuditEvent:
    """A budget hold lapsed unsettled (its caller neither committed nor released it before
    ``expires_at``; often a crashed process): the budget it held is free again. Written by the
    store when it drops the hold, at the first operation on the agent after the expiry."""
    details = event_json(
        reservation=reservation_id,
        amount=from_micros(amount),
        expires_at=int(expires_at),
        scopes=list(scopes),
    )
    return AuditEvent._trusted(agent_id, "hold_expired", int(now), details)


def spend(
    agent_id: AgentId,
    now: float,
    amount: int,
    scopes: Sequence[str],
    labels: Mapping[str, str],
    reservation_id: str | None,
    note: SpendNote | None,
) -> AuditEvent:
    """A settled spend: the ledger's record (``record_spend``, or a commit of ``reservation_id``).

    ``amount`` micro-units were charged to the agent and to ``scopes`` (the scopes that exist
    and were charged); ``labels`` are the agent's at the time, so reports group by them after
    the agent is gone. ``note`` adds the model call and tags (see :class:`..ledger.SpendNote`).
    Empty fields are left out: a plain spend's record is small.
    """
    fields: dict[str, object] = {"amount": from_micros(amount)}
    if scopes:
        fields["scopes"] = list(scopes)
    if labels:
        fields["labels"] = dict(labels)
    if reservation_id is not None:
        fields["reservation"] = reservation_id
    if note is not None:
        fields.update(note.fields())
    return AuditEvent._trusted(agent_id, "spend", int(now), event_json(**fields))


def budget_threshold(
    agent_id: AgentId,
    now: float,
    threshold: float,
    *,
    limit: int,
    spent: int,
    period_start: float | None,
    scope: str | None = None,
) -> AuditEvent:
    """A spend of ``agent_id`` took a budget (its own, or ``scope``) to ``threshold`` of its limit
    (``spent``: the total after it, micro-units) for the first time in the period that started
    at ``period_start`` (``None`` without a period). See :mod:`.thresholds`."""
    details = event_json(
        threshold=threshold,
        limit=from_micros(limit),
        spent=from_micros(spent),
        period_start=None if period_start is None else int(period_start),
        **_budget_fields(scope),
    )
    return AuditEvent._trusted(agent_id, "budget_threshold", int(now), details)


def pii_detected(agent_id: AgentId, count: int, details: str, now: float) -> AuditEvent:
    """PII detections added to an agent's count (``details`` is validated here)."""
    return AuditEvent(agent_id, "pii_detected", int(now), event_json(count=count, details=details))


#: The agent id of events that concern no agent: the trail's own (``audit_rewound``) and budget
#: scopes' (``budget_set``, ``budget_removed``, a scope's ``budget_reset``).
SYSTEM_AGENT = AgentId.test_fixture(0)
REWOUND_AGENT = SYSTEM_AGENT


def audit_rewound(expected: tuple[int, str], found: tuple[int, str], now: float) -> AuditEvent:
    """A writer found the trail's head below the highest it had seen: a restore, a failover or a
    truncation. The record says what was expected and what was found, so a reader sees the gap."""
    details = event_json(
        expected_seq=expected[0], expected_hash=expected[1], found_seq=found[0], found_hash=found[1]
    )
    return AuditEvent._trusted(REWOUND_AGENT, "audit_rewound", int(now), details)


def status_changed(agent_id: AgentId, old: AgentStatus, new: AgentStatus, now: float) -> AuditEvent:
    """An agent's status changed from ``old`` to ``new``."""
    details = event_json(**{"from": old.value, "to": new.value})
    return AuditEvent._trusted(agent_id, "status_changed", int(now), details)
