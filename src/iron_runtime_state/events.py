"""The audit events the library writes itself, built in one place (no I/O).

The managers and the stores both build them here: a store that appends an operation's event in
the same atomic step as its change (a refused spend and its ``budget_exceeded`` event) builds
exactly what the manager would have.
"""

from __future__ import annotations

import json

from .ids import AgentId
from .models import AgentState, AgentStatus, AuditEvent, Reservation

__all__ = [
    "REWOUND_AGENT",
    "audit_rewound",
    "budget_exceeded",
    "event_json",
    "overspent",
    "pii_detected",
    "status_changed",
]


def event_json(**fields: object) -> str:
    """Details of the events the library writes itself: compact JSON with sorted keys."""
    return json.dumps(fields, sort_keys=True, separators=(",", ":"))


def budget_exceeded(
    agent_id: AgentId, state: AgentState, reserved: float, requested: float, now: float, action: str
) -> AuditEvent:
    """A spend (``action="spend"``) or hold (``"reserve"``) refused because it would pass the limit."""
    details = event_json(
        action=action,
        limit=state.budget_limit,
        spent=state.budget_spent,
        reserved=reserved,
        requested=requested,
    )
    return AuditEvent._trusted(agent_id, "budget_exceeded", int(now), details)


def overspent(state: AgentState, reservation: Reservation, actual: float, now: float) -> AuditEvent:
    """A commit whose real cost took the agent past its limit (the spend stands)."""
    details = event_json(
        action="commit",
        limit=state.budget_limit,
        spent=state.budget_spent,
        committed=actual,
        reserved=reservation.amount,
        reservation=reservation.reservation_id,
    )
    return AuditEvent._trusted(state.agent_id, "budget_exceeded", int(now), details)


def pii_detected(agent_id: AgentId, count: int, details: str, now: float) -> AuditEvent:
    """PII detections added to an agent's count (``details`` is validated here)."""
    return AuditEvent(agent_id, "pii_detected", int(now), event_json(count=count, details=details))


#: The agent id of the trail's own events (``audit_rewound``), which concern no agent.
REWOUND_AGENT = AgentId.test_fixture(0)


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
