"""Budget holds as context managers: what ``budget()`` and ``reserve_for_call()`` return.

A hold is settled exactly once: committed (an amount, or a model call's usage, priced by the
manager) or released. Leaving the ``with`` block without settling releases it (a warning when
the block did not raise); a hold that expired meanwhile has nothing left to release.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from decimal import Decimal
from types import TracebackType
from typing import TYPE_CHECKING

from .core import check_unsettled, warn_unsettled
from .errors import ReservationError
from .metering import merged, usage_of
from .models import AgentState, Reservation

if TYPE_CHECKING:
    from .aio import AsyncStateManager
    from .manager import StateManager

__all__ = ["AsyncBudgetHold", "BudgetHold"]


class BudgetHold:
    """An open reservation used as a context manager (see :meth:`StateManager.budget`)."""

    def __init__(
        self,
        manager: StateManager,
        reservation: Reservation,
        *,
        model: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        """A hold on ``reservation``, settled through ``manager``; ``model`` and ``tags``: those of
        the call it was made for (:meth:`StateManager.reserve_for_call`)."""
        self.manager = manager
        self.reservation = reservation
        self.model = model
        self.tags = tags
        self.settled = False

    def commit_usage(
        self,
        *,
        input_tokens: int,
        output_tokens: int,
        cached_input_tokens: int = 0,
        model: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> AgentState:
        """Record what the call really used, priced by the manager, and free the hold.

        ``model`` defaults to the one the hold was made for; ``tags`` add to the hold's.
        """
        check_unsettled(self.reservation, self.settled)
        usage = usage_of(self.model, model, input_tokens, output_tokens, cached_input_tokens)
        state = self.manager.commit_reservation(self.reservation, usage=usage, tags=merged(self.tags, tags))
        self.settled = True
        return state

    def commit(self, actual: float | int | Decimal | str) -> AgentState:
        """Record what was really spent and free the hold."""
        check_unsettled(self.reservation, self.settled)
        state = self.manager.commit_reservation(self.reservation, actual, tags=self.tags)
        self.settled = True
        return state

    def release(self) -> None:
        """Free the hold without spending."""
        check_unsettled(self.reservation, self.settled)
        self.manager.release_reservation(self.reservation)
        self.settled = True

    def __enter__(self) -> BudgetHold:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.settled:
            return
        if exc_type is None:
            warn_unsettled(self.reservation)
        with contextlib.suppress(ReservationError):  # it expired meanwhile: nothing is held
            self.release()


class AsyncBudgetHold:
    """An open reservation used as an async context manager (see :meth:`AsyncStateManager.budget`)."""

    def __init__(
        self,
        manager: AsyncStateManager,
        reservation: Reservation,
        *,
        model: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        """A hold on ``reservation``, settled through ``manager``; ``model`` and ``tags``: those of
        the call it was made for (:meth:`AsyncStateManager.reserve_for_call`)."""
        self.manager = manager
        self.reservation = reservation
        self.model = model
        self.tags = tags
        self.settled = False

    async def commit_usage(
        self,
        *,
        input_tokens: int,
        output_tokens: int,
        cached_input_tokens: int = 0,
        model: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> AgentState:
        """Record what the call really used, priced by the manager, and free the hold.

        ``model`` defaults to the one the hold was made for; ``tags`` add to the hold's.
        """
        check_unsettled(self.reservation, self.settled)
        usage = usage_of(self.model, model, input_tokens, output_tokens, cached_input_tokens)
        state = await self.manager.commit_reservation(
            self.reservation, usage=usage, tags=merged(self.tags, tags)
        )
        self.settled = True
        return state

    async def commit(self, actual: float | int | Decimal | str) -> AgentState:
        """Record what was really spent and free the hold."""
        check_unsettled(self.reservation, self.settled)
        state = await self.manager.commit_reservation(self.reservation, actual, tags=self.tags)
        self.settled = True
        return state

    async def release(self) -> None:
        """Free the hold without spending."""
        check_unsettled(self.reservation, self.settled)
        await self.manager.release_reservation(self.reservation)
        self.settled = True

    async def __aenter__(self) -> AsyncBudgetHold:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.settled:
            return
        if exc_type is None:
            warn_unsettled(self.reservation)
        with contextlib.suppress(ReservationError):  # it expired meanwhile: nothing is held
            await self.release()
