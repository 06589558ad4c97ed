"""Small helpers shared by the budget contract tests (scopes, periods, labels, money).

Calendar times here are computed with ``datetime`` and ``zoneinfo`` directly, not with the
library's period code, so the tests check the library's alignment rather than repeat it.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any
from zoneinfo import ZoneInfo

from iron_runtime_state import AgentId, AgentState, AgentStatus, AuditRecord, StateManager
from iron_runtime_state.money import to_micros

#: The agent id of events that concern no agent (``budget_set``, a scope's ``budget_reset``).
SYSTEM = AgentId.test_fixture(0)


class FakeClock:
    """A clock the test moves by hand: ``StateManager(..., clock=FakeClock(t))``.

    Only for periods: stores may time holds with their own clock, so hold expiry is tested
    with short ttls and real sleeps, never with this.
    """

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def set(self, now: float) -> None:
        self.now = now


def at(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, tz: str = "UTC"
) -> float:
    """Unix seconds of a wall-clock time in ``tz``."""
    zone = timezone.utc if tz == "UTC" else ZoneInfo(tz)
    return datetime(year, month, day, hour, minute, second, tzinfo=zone).timestamp()


#: Midnight UTC on Monday 1 February 2027: the boundary of a day, a week and a month at once,
#: ahead of the real clock (so a store that times holds by its own clock never sees the past).
BOUNDARY = at(2027, 2, 1)


def agent_on(
    manager: StateManager,
    *scopes: str,
    limit: float | str | None = None,
    period: str | None = None,
    tz: str = "UTC",
    labels: dict[str, str] | None = None,
    status: AgentStatus = AgentStatus.RUNNING,
) -> AgentId:
    """A new agent drawing on ``scopes``, saved in the store."""
    agent_id = AgentId.generate()
    manager.save_agent_state(
        AgentState(
            agent_id,
            status,
            budget_limit=limit,  # type: ignore[arg-type]  # a str limit is accepted and converted
            budget_scopes=scopes,
            budget_period=period,
            budget_tz=tz,
            labels=labels or {},
        )
    )
    return agent_id


def state_of(manager: StateManager, agent_id: AgentId) -> AgentState:
    state = manager.get_agent_state(agent_id)
    assert state is not None
    return state


def details(record: AuditRecord) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(record.event.details)
    return parsed


def events(manager: StateManager, event_type: str, agent_id: AgentId | None = None) -> list[AuditRecord]:
    return manager.audit_log(event_type=event_type, agent_id=agent_id)


def micros(amount: float) -> int:
    """An amount read back from the store, in the micro-units the store keeps."""
    return to_micros(amount)


def is_positive_zero(value: float) -> bool:
    """``0.0`` and not ``-0.0`` (``-0.0 == 0.0``, so equality alone cannot tell)."""
    return value == 0.0 and str(value) == "0.0"
