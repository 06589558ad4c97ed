"""How the in-memory store charges budgets: periods, checks, charges with their ledger records and
threshold alerts, and holds. A mixin of :class:`~.store.MemoryBackend`; every method runs under
the store's one lock, which its caller holds.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Final

from ... import events
from ...audit_chain import AuditChain
from ...budgets import alerts, check_total, passes, rolled_start
from ...errors import BudgetNotFound, ReservationError
from ...ids import AgentId
from ...ledger import SpendNote
from ...models import AuditEvent, AuditRecord, Reservation
from ...thresholds import DEFAULT_THRESHOLDS
from ..base import BudgetRow
from .budgets import Extra, Holds, Scope
from .trail import Trail

__all__ = ["NO_LIMIT", "Charges"]

NO_LIMIT: Final = -1  # the limit column's value for ``budget_limit=None``


class Charges:
    """Budget periods, checks, charges and holds of the in-memory store (see the module)."""

    _spent: array[int]
    _limit: array[int]
    _extra: dict[str, Extra]
    _holds: dict[str, Holds]
    _alerted: dict[str, float]
    _scopes: dict[str, Scope]
    _trail: Trail

    if TYPE_CHECKING:

        def _write(
            self, slot: int, now: float, code: int | None = None, spent: int | None = None
        ) -> None: ...

        def _slot(self, key: str, action: str = "") -> int: ...

    # -- budgets: periods, checks and charges (every caller holds the lock) -------------------

    def _scopes_of(self, agent_id: AgentId, names: Iterable[str]) -> list[tuple[str, Scope]]:
        """The agent's scopes; ``BudgetNotFound`` for one that does not exist."""
        found = []
        for name in names:
            scope = self._scopes.get(name)
            if scope is None:
                raise BudgetNotFound(name, agent_id.as_str())
            found.append((name, scope))
        return found

    def _roll_agent(self, agent_id: AgentId, slot: int, extra: Extra | None, now: float) -> list[AuditEvent]:
        """Start the agent's new period if its own has ended; the ``budget_reset`` it implies."""
        if extra is None:
            return []
        start = rolled_start(extra.period, extra.tz, extra.period_start, now)
        if start is None or extra.period is None:
            return []
        event = events.budget_reset(
            agent_id, None, extra.period, extra.tz, extra.period_start or start, self._spent[slot], now
        )
        self._write(slot, now, spent=0)
        self._alerted.pop(agent_id.as_str(), None)
        extra.period_start = start
        return [event]

    @staticmethod
    def _roll_scopes(scopes: Sequence[tuple[str, Scope]], now: float) -> list[AuditEvent]:
        """Start the new period of each scope whose period has ended; their ``budget_reset`` events."""
        resets = []
        for name, scope in scopes:
            start = rolled_start(scope.period, scope.tz, scope.period_start, now)
            if start is not None and scope.period is not None:
                resets.append(
                    events.budget_reset(
                        None, name, scope.period, scope.tz, scope.period_start or start, scope.spent, now
                    )
                )
                scope.spent = 0
                scope.alerted = 0.0
                scope.period_start = start
        return resets

    def _charge_check(self, slot: int, scopes: Sequence[tuple[str, Scope]], amount: int) -> None:
        """``ValidationError`` (before anything changes) if a charge would take a total past the maximum.

        Checked on the spends before any period ends: a total that a reset would bring down is
        refused here too, which only matters within a micro-unit of a billion units.
        """
        check_total(self._spent[slot] + amount, "the agent's budget_spent")
        for name, scope in scopes:
            check_total(scope.spent + amount, f"the spend of budget scope {name!r}")

    def _refusal(
        self,
        agent_id: AgentId,
        slot: int,
        scopes: Sequence[tuple[str, Scope]],
        amount: int,
        now: float,
        action: str,
    ) -> tuple[int, AuditEvent, BudgetRow | None] | None:
        """Why the agent or one of its scopes cannot take ``amount`` more: the agent's holds,
        the ``budget_exceeded`` event and the scope that refused; ``None`` when all can."""
        holds = self._holds.get(agent_id.as_str())
        held = 0 if holds is None else holds.total  # expired ones were dropped first
        spent, limit = self._spent[slot], self._limit[slot]
        if limit != NO_LIMIT and passes(limit, spent + held + amount):
            event = events.budget_exceeded(
                agent_id, now, action, limit=limit, spent=spent, reserved=held, requested=amount
            )
            return held, event, None
        for name, scope in scopes:
            scope_held = scope.holds.open_total(now)
            if passes(scope.limit, scope.spent + scope_held + amount):
                assert scope.limit is not None  # passes() is False without a limit
                event = events.budget_exceeded(
                    agent_id,
                    now,
                    action,
                    limit=scope.limit,
                    spent=scope.spent,
                    reserved=scope_held,
                    requested=amount,
                    scope=name,
                )
                return held, event, scope.row(name, now)
        return None

    def _prepare(
        self, agent_id: AgentId, amount: int, now: float, action: str
    ) -> tuple[int, list[tuple[str, Scope]], list[AuditEvent]]:
        """The checks that come before a spend or a hold: the agent's slot and scopes, the total's
        bound; then the holds that expired and the periods that ended go (their events)."""
        key = agent_id.as_str()
        slot = self._slot(key, action)
        extra = self._extra.get(key)
        if extra is None:  # no scopes and no period: nothing to roll
            self._charge_check(slot, (), amount)
            return slot, [], self._expire_holds(agent_id, now)
        scopes = self._scopes_of(agent_id, extra.scopes)
        self._charge_check(slot, scopes, amount)
        implied = self._expire_holds(agent_id, now)
        return (
            slot,
            scopes,
            implied + self._roll_agent(agent_id, slot, extra, now) + self._roll_scopes(scopes, now),
        )

    def _charge(
        self,
        agent_id: AgentId,
        slot: int,
        scopes: Sequence[tuple[str, Scope]],
        amount: int,
        now: float,
        chain: AuditChain,
        implied: Sequence[AuditEvent],
        reservation_id: str | None = None,
        note: SpendNote | None = None,
        overs: Sequence[AuditEvent] = (),
    ) -> list[AuditRecord]:
        """Charge ``amount`` to the agent and its scopes, appending after ``implied`` (expired
        holds, resets, a commit's ``budget_exceeded``) the ledger's ``spend`` record and then
        the thresholds the charge reached. The records are sealed first: a chain that fails
        leaves nothing charged."""
        key = agent_id.as_str()
        extra = self._extra.get(key)
        spent = self._spent[slot] + amount
        names = [name for name, _ in scopes]
        labels = {} if extra is None else extra.labels
        spend = events.spend(agent_id, now, amount, names, labels, reservation_id, note)
        found = [*implied, spend, *overs]
        level = self._alerted.get(key, 0.0)
        if self._limit[slot] != NO_LIMIT:
            thresholds = DEFAULT_THRESHOLDS if extra is None else extra.thresholds
            start = None if extra is None else extra.period_start
            more, level = alerts(agent_id, now, thresholds, level, self._limit[slot], spent, start)
            found += more
        levels = []
        for name, scope in scopes:
            more, scope_level = alerts(
                agent_id,
                now,
                scope.thresholds,
                scope.alerted,
                scope.limit,
                scope.spent + amount,
                scope.period_start,
                name,
            )
            found += more
            levels.append(scope_level)
        sealed = self._trail.seal(found, chain, now)
        self._write(slot, now, spent=spent)
        if level:
            self._alerted[key] = level
        for (_, scope), scope_level in zip(scopes, levels, strict=True):
            scope.spent += amount
            scope.alerted = scope_level
        return self._trail.keep(sealed)

    # -- holds (every caller holds the lock) ---------------------------------------------------

    def _expire_holds(self, agent_id: AgentId, now: float) -> list[AuditEvent]:
        """Drop the agent's holds whose time is up, on it and its scopes: a ``hold_expired`` each.

        Only operations that change the agent call it, so a read never writes an event.
        """
        key = agent_id.as_str()
        holds = self._holds.get(key)
        if holds is None or now < holds.soonest:
            return []
        expired = holds.expire(now)
        if not holds.amounts:
            del self._holds[key]
        found = []
        for reservation_id, (amount, expires_at, scopes) in expired:
            self._drop_scope_holds(reservation_id, scopes)
            found.append(events.hold_expired(agent_id, reservation_id, amount, expires_at, scopes, now))
        return found

    def _open_hold(
        self, reservation: Reservation, now: float, action: str
    ) -> tuple[int, float, tuple[str, ...]]:
        """The reservation's open hold; ``ReservationError`` unless it is open.

        An expired hold stays until an operation that writes events drops it (``hold_expired``).
        """
        holds = self._holds.get(reservation.agent_id.as_str())
        entry = None if holds is None else holds.amounts.get(reservation.reservation_id)
        if entry is not None and entry[1] > now:
            return entry
        raise ReservationError(
            f"cannot {action} reservation {reservation.reservation_id}: it is not open "
            "(already committed or released, expired after its ttl, or its agent was "
            "removed); if money was spent after the hold expired, record it with record_spend"
        )

    def _drop_hold(self, key: str, reservation_id: str) -> None:
        """Drop a hold known to be there, on the agent and on its scopes."""
        holds = self._holds[key]
        entry = holds.take(reservation_id)
        if not holds.amounts:
            del self._holds[key]
        if entry is not None:
            self._drop_scope_holds(reservation_id, entry[2])

    def _drop_scope_holds(self, reservation_id: str, scopes: Iterable[str]) -> None:
        for name in scopes:
            scope = self._scopes.get(name)
            if scope is not None:
                scope.holds.take(reservation_id)
