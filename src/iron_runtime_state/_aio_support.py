"""Helpers of the asyncio manager: work handed to a thread, and operations run to their end.

Kept apart from :mod:`.aio` (the manager itself); nothing here is public.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Final, TypeVar

if TYPE_CHECKING:
    import asyncio

__all__ = ["HANDOFF_BATCH", "drain_in_thread", "run_to_end"]

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
