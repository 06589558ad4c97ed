"""The JSON forms of what the dashboard shows: the ``/api/...`` answers and the event stream's data."""

from __future__ import annotations

import math
import time
from typing import Any

from ..models import AgentState, AuditRecord, BudgetState
from .hub import Hub, Verification
from .link import LinkStatus

__all__ = [
    "agent_json",
    "budget_json",
    "clock",
    "record_json",
    "status_json",
    "summary_json",
    "verification_json",
]


def clock(stamp: float) -> str:
    """A Unix time as shown on the pages: ``2026-11-03 14:05:09`` (UTC)."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(stamp))


def record_json(record: AuditRecord) -> dict[str, Any]:
    """An audit record for the page: its fields, and its time as text."""
    return {
        "seq": record.seq,
        "agent_id": record.agent_id.as_str(),
        "event_type": record.event_type,
        "timestamp": record.timestamp,
        "time": clock(record.timestamp),
        "details": record.details,
        "hash": record.hash,
    }


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def budget_json(budget: BudgetState) -> dict[str, Any]:
    """A budget scope with what is left of it (``available`` is ``None`` without a limit)."""
    data = budget.to_dict()
    data["available"] = None if budget.limit is None else _finite(budget.available)
    data["used"] = budget.used if budget.limit else None
    return data


def agent_json(state: AgentState) -> dict[str, Any]:
    """An agent's state as the table shows it."""
    return state.to_dict()


def status_json(status: LinkStatus) -> dict[str, Any]:
    """Whether the store is up (``None``: not known yet), why not, and since when."""
    return {"up": status.up, "error": status.error, "since": status.since}


def verification_json(verification: Verification | None) -> dict[str, Any] | None:
    """The last check of the chain (``None`` before the first)."""
    if verification is None:
        return None
    return {
        "ok": verification.ok,
        "checked": verification.checked,
        "first_bad_seq": verification.first_bad_seq,
        "reason": verification.reason,
        "last_seq": verification.last_seq,
        "at": verification.at,
        "took": round(verification.took, 3),
    }


def summary_json(hub: Hub) -> dict[str, Any]:
    """The store's status, the totals and budgets last read, and the chain's last check."""
    snapshot = hub.snapshot
    return {
        "store": status_json(hub.link.status),
        "stats": None if snapshot is None else snapshot.stats.to_dict(),
        "audit_records": None if snapshot is None else snapshot.audit_records,
        "budgets": [] if snapshot is None else [budget_json(b) for b in snapshot.budgets],
        "taken_at": None if snapshot is None else snapshot.taken_at,
        "verification": verification_json(hub.verification),
        "last_seq": hub.last_seq,
    }
