"""Helpers of the asyncio manager: work handed to a thread, and operations run to their end.

Kept apart from :mod:`.aio` (the manager itself); nothing here is public.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Final, TypeVar

from .models import Reservation

if TYPE_CHECKING:
    import asyncio

logger: Final = logging.getLogger("iron_runtime_state")

__all__ = ["HANDOFF_BATCH", "Completing", "drain_in_thread", "run_to_end"]

_R = TypeVar("_R")
_T = TypeVar("_T")

#: Records handed at a time from the event loop to the thread that verifies or exports them.
HANDOFF_BATCH: Final = 5000


async def drain_in_thread(source: AsyncIterator[_T], consume: Callable[[Iterable[_T]], _R]) -> _R:
    """``consume(items)`` in a worker thread, over items read from ``source`` on the event loop.

    For work that is slow without being I/O on the store: hashing a whole chain, writing an
    export file. The loop reads the store (as only it may), a batch at a time; the thread does
    the rest; the loop keeps serving other tasks. Cancelling stops the thread at its next batch.
    """
    import asyncio
    import concurrent.futures

    loop = asyncio.get_running_loop()
    stop = threading.Event()

    async def next_batch() -> list[_T]:
        batch: list[_T] = []
        if stop.is_set():
            return batch
        with contextlib.suppress(StopAsyncIteration):
            while len(batch) < HANDOFF_BATCH:
                batch.append(await source.__anext__())
        return batch

    def fetch() -> list[_T]:
        future = asyncio.run_coroutine_threadsafe(next_batch(), loop)
        while True:
            try:
                return future.result(timeout=1.0)
            except concurrent.futures.TimeoutError:  # the loop may have gone: then stop
                if loop.is_closed():
                    raise _Stopped from None

    def items() -> Iterator[_T]:
        while not stop.is_set():
            batch = fetch()
            if not batch:
                return
            yield from batch
        raise _Stopped

    work = loop.run_in_executor(None, consume, items())
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        stop.set()
        await asyncio.wait([work])  # never leave the thread reading a closed source
        if not work.cancelled():
            work.exception()  # _Stopped, most likely: retrieved, so never logged
        raise
    finally:
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            await aclose()


async def run_to_end(operation: Coroutine[Any, Any, _R], outcome: asyncio.Future[_R]) -> object:
    """Run ``operation`` and hand its result or error to ``outcome`` while someone awaits it.

    Once nobody does (the caller was cancelled), the task itself ends as the operation did, for
    :meth:`AsyncStateManager._orphaned` to deal with.
    """
    import asyncio

    try:
        result = await operation
    except BaseException as exc:
        if outcome.done():
            raise
        if isinstance(exc, asyncio.CancelledError):  # the task itself (the loop is shutting down)
            outcome.cancel()
            raise
        outcome.set_exception(exc)
        return None
    if not outcome.done():
        outcome.set_result(result)
    return result


class _Stopped(Exception):
    """Ends the worker side of :func:`drain_in_thread` when its caller was cancelled."""


class Completing:
    """The asyncio manager's operations that run to their end even if their caller is cancelled.

    A change the store may have made must reach its outcome (its records logged and handed to
    ``on_event``; a hold made for a cancelled caller released), so such an operation runs in a
    task of its own that a cancelled caller leaves running; the manager's ``close`` waits for
    those tasks (``_background``).
    """

    _background: set[asyncio.Task[Any]]
    _background_lock: threading.Lock

    def _init_background(self) -> None:
        self._background = set()
        self._background_lock = threading.Lock()

    if TYPE_CHECKING:

        async def release_reservation(self, reservation: Reservation) -> None: ...

    async def _complete(self, operation: Coroutine[Any, Any, _R]) -> _R:
        """Await ``operation`` in a task of its own that a cancelled caller leaves running.

        The task hands its outcome straight to the future the caller awaits: what
        ``asyncio.shield`` does, less a future and a turn of the loop, on every spend.
        """
        import asyncio

        loop = asyncio.get_running_loop()
        outcome: asyncio.Future[_R] = loop.create_future()
        task = loop.create_task(run_to_end(operation, outcome))
        try:
            return await outcome
        except asyncio.CancelledError:
            if outcome.done() and not outcome.cancelled():
                outcome.exception()  # finished as the caller was cancelled: nobody reads it
            if task.done():
                self._orphaned(task)
            else:
                self._leave_running(task)
            raise

    def _leave_running(self, task: asyncio.Task[Any]) -> None:
        with self._background_lock:
            self._background.add(task)
        task.add_done_callback(self._orphaned)

    def _orphaned(self, task: asyncio.Task[Any]) -> None:
        """A call whose caller was cancelled has ended: nobody will read what it returned."""
        import asyncio

        with self._background_lock:
            self._background.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            logger.debug("a call whose caller was cancelled ended with %r", error)
        elif isinstance(hold := task.result(), Reservation):
            self._leave_running(asyncio.ensure_future(self.release_reservation(hold)))
