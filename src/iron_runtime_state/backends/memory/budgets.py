"""The in-memory store's budgets: open holds, budget scopes, and the per-agent fields beyond the columns.

Plain structures with no lock of their own: the store calls them under its one lock. Amounts
are whole micro-units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ...thresholds import DEFAULT_THRESHOLDS
from ..base import BudgetRow

__all__ = ["Extra", "Holds", "Scope"]


class Holds:
    """One budget's open reservations and their running total (an agent's or a scope's).

    ``soonest`` is never later than the first expiry, so the holds are scanned for expired ones
    only once ``now`` reaches it: many open holds stay cheap. A settled hold may leave it early,
    which costs one scan that finds the true value. An agent's hold remembers the scopes it
    also holds on.
    """

    __slots__ = ("amounts", "soonest", "total")

    def __init__(self) -> None:
        # reservation id -> (amount, expires_at, scopes)
        self.amounts: dict[str, tuple[int, float, tuple[str, ...]]] = {}
        self.soonest = math.inf
        self.total = 0

    def add(self, reservation_id: str, amount: int, expires_at: float, scopes: tuple[str, ...] = ()) -> None:
        self.amounts[reservation_id] = (amount, expires_at, scopes)
        self.total += amount
        self.soonest = min(self.soonest, expires_at)

    def take(self, reservation_id: str) -> tuple[int, float, tuple[str, ...]] | None:
        """Drop one hold; its entry, or ``None`` if there is no such hold."""
        entry = self.amounts.pop(reservation_id, None)
        if entry is not None:
            self.total -= entry[0]
        return entry

    def expire(self, now: float) -> list[tuple[str, tuple[int, float, tuple[str, ...]]]]:
        """Drop the holds whose time is up; each with its entry."""
        if now < self.soonest:
            return []
        gone = [(rid, entry) for rid, entry in self.amounts.items() if entry[1] <= now]
        for reservation_id, _ in gone:
            self.take(reservation_id)
        self.soonest = min((entry[1] for entry in self.amounts.values()), default=math.inf)
        return gone

    def open_total(self, now: float) -> int:
        """Drop the holds whose time is up; the total of those left."""
        self.expire(now)
        return self.total

    def total_at(self, now: float) -> int:
        """The total of the holds still open at ``now``, dropping nothing (for reads)."""
        if now < self.soonest:
            return self.total
        return sum(amount for amount, expires_at, _ in self.amounts.values() if expires_at > now)


@dataclass(slots=True)
class Scope:
    """A budget scope: its limit, period and spend, the holds on it, its thresholds and the
    highest of them alerted in the current period."""

    limit: int | None
    period: str | None
    tz: str
    period_start: float | None
    spent: int = 0
    holds: Holds = field(default_factory=Holds)
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    alerted: float = 0.0

    def row(self, name: str, now: float) -> BudgetRow:
        """The scope as the store contract returns it (``held``: unexpired holds at ``now``)."""
        return BudgetRow(
            name,
            self.limit,
            self.period,
            self.tz,
            self.period_start,
            self.spent,
            self.holds.open_total(now),
            self.thresholds,
        )


@dataclass(slots=True)
class Extra:
    """An agent's fields beyond the columns; kept only for agents that have any."""

    labels: dict[str, str]
    scopes: tuple[str, ...]
    period: str | None
    tz: str
    period_start: float | None
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
