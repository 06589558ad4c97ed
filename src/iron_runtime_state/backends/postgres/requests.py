"""What an operation of :mod:`.ops` yields to its driver, and how rows become records (no I/O).

An operation is a generator: it yields :class:`Sql` (one statement) and receives the statement's
rows (a list of tuples), or its row count for a statement that returns no rows. A streaming
operation also yields :class:`Emit` with items for its caller, and a waiting one :class:`Listen`.
A driver error is thrown into the operation at the ``yield`` that caused it, after the driver
rolled back any open transaction: :func:`restartable` catches the ones that mean "run it
again". The sync and asyncio drivers (:mod:`.sync`, :mod:`.aio`) only carry statements and
replies.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Generator, Sequence
from typing import Any, Final, NamedTuple, TypeVar

from psycopg import errors as pgerrors

from ...ids import AgentId
from ...models import AgentState
from ...money import from_micros, to_micros
from ...periods import bounds
from ...thresholds import DEFAULT_THRESHOLDS
from ..base import BudgetRow
from .schema import STATUS_CODE, STATUSES

__all__ = [
    "AGENT_COLUMNS",
    "BEGIN",
    "BUDGET_COLUMNS",
    "CLOCK",
    "COMMIT",
    "Emit",
    "Listen",
    "Op",
    "Sql",
    "agent_params",
    "budget_row",
    "period_end",
    "restartable",
    "state_of",
    "stored_thresholds",
    "thresholds_of",
]

_T = TypeVar("_T")


class Sql(NamedTuple):
    """Run one statement; the reply is its rows, or its row count when it returns none."""

    query: str
    params: Sequence[Any] | None = None


class Emit(NamedTuple):
    """Items a streaming operation hands to its caller; the reply is ``None``."""

    items: list[Any]


class Listen(NamedTuple):
    """Wait for the head of the trail to pass ``after_seq``; the reply is ``True`` when it did,
    ``False`` after ``timeout`` seconds.

    The driver runs it on a connection kept for listening, never one of the pool's (a wait may
    last a second, and the pool's connections serve the calls): ``LISTEN`` on ``channel``, then
    ``head`` (a statement returning the head seq) and, if the head is not past ``after_seq``
    yet, a wait for a notification on ``channel`` whose payload (the new head) is.
    """

    channel: str
    head: str
    after_seq: int
    timeout: float


Request = Sql | Emit | Listen
#: An operation: yields requests, receives replies, returns its result.
Op = Generator[Request, Any, _T]

BEGIN: Final = Sql("BEGIN")
COMMIT: Final = Sql("COMMIT")

#: The database's clock, Unix seconds: holds expire by it, one clock for every client.
CLOCK: Final = "extract(epoch FROM clock_timestamp())::float8"

#: Failures after which the whole operation can run again: the server rolled the transaction
#: back (a deadlock it broke, a serialization failure), so nothing of it was applied.
_RETRYABLE: Final = (pgerrors.DeadlockDetected, pgerrors.SerializationFailure)
_ATTEMPTS: Final = 3


def restartable(method: Callable[..., Op[_T]]) -> Callable[..., Op[_T]]:
    """Run the operation again (up to 3 times) when the server rolled it back to break a deadlock.

    Writers lock rows in one order (an agent, then its scopes by name, then the audit head), so
    single-agent operations never deadlock; a batch over many agents (``save_many``,
    ``purge_agents``) can still meet one the other way round, and PostgreSQL then aborts one
    of the two. The driver has rolled back by the time the error arrives here.
    """

    @functools.wraps(method)
    def op(*args: Any) -> Op[_T]:
        for attempt in range(_ATTEMPTS):
            try:
                return (yield from method(*args))
            except _RETRYABLE:
                if attempt == _ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    return op


# -- agents ------------------------------------------------------------------------------------

#: The columns an agent's state is read from, in :func:`state_of`'s order.
AGENT_COLUMNS: Final = (
    "status, spent, pii, budget_limit, labels, scopes, period, tz, period_start, thresholds"
)


def thresholds_of(stored: Sequence[float] | None) -> tuple[float, ...]:
    """A budget's thresholds as stored (``NULL``: the default ones, the very same tuple)."""
    return DEFAULT_THRESHOLDS if stored is None else tuple(stored)


def stored_thresholds(thresholds: tuple[float, ...]) -> list[float] | None:
    """How a ``thresholds`` column keeps a budget's thresholds (``None`` for the default)."""
    return None if thresholds == DEFAULT_THRESHOLDS else list(thresholds)


def state_of(agent_id: AgentId, row: Sequence[Any]) -> AgentState:
    """The state stored in ``row`` (the :data:`AGENT_COLUMNS`)."""
    status, spent, pii, limit, labels, scopes, period, tz, start, thresholds = row
    return AgentState._trusted(
        agent_id,
        STATUSES[status],
        from_micros(spent),
        pii,
        None if limit is None else from_micros(limit),
        labels or None,
        tuple(scopes) if scopes else (),
        period,
        tz,
        start,
        thresholds_of(thresholds),
    )


def period_end(period: str | None, tz: str, start: float | None) -> float | None:
    """The end of the period that started at ``start`` (``None`` without a period or a start)."""
    if period is None or start is None:
        return None
    return bounds(start, period, tz)[1]


def agent_params(state: AgentState) -> tuple[Any, ...]:
    """The stored columns of a state: status, spent, pii, limit, labels, scopes, period, tz,
    period_start, period_end, thresholds (amounts in micro-units)."""
    limit = state.budget_limit
    labels = state.labels
    return (
        STATUS_CODE[state.status._value_],
        to_micros(state.budget_spent),
        state.pii_detections,
        None if limit is None else to_micros(limit),
        json.dumps(labels, separators=(",", ":")) if labels else "{}",
        list(state.budget_scopes),
        state.budget_period,
        state.budget_tz,
        state.period_start,
        period_end(state.budget_period, state.budget_tz, state.period_start),
        stored_thresholds(state.budget_thresholds),
    )


# -- budget scopes -----------------------------------------------------------------------------

#: The columns a scope is read from, in :func:`budget_row`'s order (its open holds come last).
BUDGET_COLUMNS: Final = "scope, budget_limit, period, tz, period_start, spent, thresholds"


def budget_row(row: Sequence[Any], held: int) -> BudgetRow:
    """A scope as stored (the :data:`BUDGET_COLUMNS`) with ``held`` micro-units of open holds."""
    scope, limit, period, tz, start, spent, thresholds = row
    return BudgetRow(scope, limit, period, tz, start, spent, int(held), thresholds_of(thresholds))
