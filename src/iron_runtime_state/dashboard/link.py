"""The dashboard's hold on the store: opened lazily, every read timed out, up or down known.

The dashboard keeps serving while the store cannot be reached: a read that fails with a
:class:`~iron_runtime_state.BackendError` marks the store down and raises :class:`StoreDown`,
which the pages turn into a banner; the next read that works marks it up again. A read that
takes longer than the timeout raises :class:`StoreSlow` (a page says so); the sampler, whose
reads are the cheap totals, counts that as down. A store that cannot even be opened (a server
that is down at start-up, a SQLite file not there yet) is opened again at the next read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, TypeVar

from ..aio import AsyncStateManager
from ..errors import BackendError, BackendUnavailable, StateError

__all__ = ["LinkStatus", "StoreDown", "StoreLink", "StoreSlow"]

_T = TypeVar("_T")

logger: Final = logging.getLogger("iron_runtime_state.dashboard")


class StoreDown(BackendUnavailable):
    """The store did not answer a read of the dashboard (the message says why)."""


class StoreSlow(StoreDown):
    """A read took longer than the timeout: the store answers, slowly (it is not marked down)."""


@dataclass(frozen=True, slots=True)
class LinkStatus:
    """Whether the store answered its last read: ``up`` is ``None`` before the first one."""

    up: bool | None
    error: str | None
    since: float  # Unix seconds of the last change


class StoreLink:
    """One store for the whole dashboard, opened on first use by ``opener``."""

    def __init__(
        self, opener: Callable[[], AsyncStateManager], *, url: str = "", timeout: float = 5.0
    ) -> None:
        """``opener`` builds the manager (run in a worker thread: opening may touch files);
        ``url`` is what the pages show of the store (no password); ``timeout`` bounds each
        read, in seconds."""
        self.url = url
        self._opener = opener
        self._timeout = timeout
        self._manager: AsyncStateManager | None = None
        self._opening = asyncio.Lock()
        self.status = LinkStatus(None, None, time.time())

    async def manager(self) -> AsyncStateManager:
        """The manager, opened now if it is not yet; :class:`StoreDown` if it cannot be."""
        if self._manager is not None:
            return self._manager
        async with self._opening:
            if self._manager is None:
                try:
                    self._manager = await asyncio.wait_for(asyncio.to_thread(self._opener), self._timeout)
                except (StateError, asyncio.TimeoutError) as exc:
                    raise self._down(exc, "cannot open the store") from exc
            return self._manager

    async def read(self, fn: Callable[[AsyncStateManager], Awaitable[_T]], *, timed: bool = True) -> _T:
        """``await fn(manager)`` within the timeout (``timed=False``: however long it takes);
        :class:`StoreDown` when the store failed.

        Errors that say something about the request (an agent that does not exist, a bad
        filter) pass through and say nothing about the store.
        """
        manager = await self.manager()
        try:
            result = await asyncio.wait_for(fn(manager), self._timeout if timed else None)
        except asyncio.TimeoutError as exc:
            raise StoreSlow(f"the store did not answer within {self._timeout:g}s") from exc
        except BackendError as exc:
            if isinstance(exc, StoreDown):
                raise
            raise self.failed(exc) from exc
        self.mark_up()
        return result

    def mark_up(self) -> None:
        """Note that the store answered."""
        if self.status.up is not True:
            if self.status.up is False:
                logger.warning("the store answers again")
            self.status = LinkStatus(True, None, time.time())

    def failed(self, exc: BaseException) -> StoreDown:
        """Note that a call to the store failed with ``exc``; the error to raise."""
        return self._down(exc, "the store did not answer")

    def _down(self, exc: BaseException, what: str) -> StoreDown:
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, asyncio.TimeoutError):
            reason = f"no answer within {self._timeout:g}s"
        message = reason if isinstance(exc, StoreDown) else f"{what}: {reason}"
        if self.status.up is not False or self.status.error != message:
            logger.warning("%s", message)
            self.status = LinkStatus(False, message, time.time())
        return StoreDown(message)

    async def close(self) -> None:
        """Close the manager, if it was opened."""
        manager, self._manager = self._manager, None
        if manager is not None:
            await manager.close()
