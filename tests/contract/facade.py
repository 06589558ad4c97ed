"""StateManager's synchronous interface over an AsyncStateManager, for the contract suite.

The contract tests are written once, against ``StateManager``. For the "async" api they get a
:class:`SyncFacade` instead: each call becomes the AsyncStateManager's coroutine, run on an event
loop in a background thread (:class:`LoopThread`), and the result comes back to the test. Async
iterators become iterators and async context managers (``budget``) context managers. Threads of
a test calling the facade at once become concurrent tasks on the one loop, as in a real program.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from types import TracebackType
from typing import Any, TypeVar

from iron_runtime_state import AsyncStateManager
from iron_runtime_state.backends.async_base import ThreadedAsyncBackend

_T = TypeVar("_T")
_END = object()


class LoopThread:
    """An event loop running forever in a daemon thread; :meth:`run` calls into it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name="contract-loop", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run ``coro`` on the loop and wait for its result (or exception) here."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def facade(self, manager: AsyncStateManager) -> Any:
        """``manager`` behind StateManager's synchronous interface."""
        return SyncFacade(manager, self)

    def close(self) -> None:
        """Finish async generators and executor threads, then stop and close the loop."""
        if self.loop.is_closed():
            return
        self.run(self.loop.shutdown_asyncgens())
        self.run(self.loop.shutdown_default_executor())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class SyncFacade:
    """Forwards every attribute of an async object, turning what it returns synchronous."""

    def __init__(self, target: Any, runner: LoopThread) -> None:
        self._target = target
        self._runner = runner

    @property
    def backend(self) -> Any:
        """The store, as the tests use ``StateManager.backend``.

        Behind the threaded adapter: the sync backend itself (what the memory tamper helpers
        edit). A native asyncio backend (Redis): that backend behind this facade, so a call such
        as ``manager.backend.reserved(...)`` runs the native coroutine on the loop; the Redis
        tamper helpers edit Redis directly and need no backend.
        """
        backend = self._target.backend
        if isinstance(backend, ThreadedAsyncBackend):
            return backend.sync_backend
        return SyncFacade(backend, self._runner)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if not callable(value):
            return value

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._sync(value(*args, **kwargs))

        call.__name__ = name
        return call

    def _sync(self, result: Any) -> Any:
        if asyncio.iscoroutine(result):
            result = self._runner.run(result)
            # An awaited hold (reserve_for_call) is used as ``with``, as StateManager's is.
            return _SyncContext(result, self._runner) if hasattr(result, "__aenter__") else result
        if hasattr(result, "__anext__"):
            return self._iterate(result)
        if hasattr(result, "__aenter__"):
            return _SyncContext(result, self._runner)
        return result

    def _iterate(self, items: AsyncIterator[Any]) -> Iterator[Any]:
        async def step() -> Any:
            try:
                return await items.__anext__()
            except StopAsyncIteration:
                return _END

        try:
            while (item := self._runner.run(step())) is not _END:
                yield item
        finally:
            aclose = getattr(items, "aclose", None)
            if aclose is not None:
                self._runner.run(aclose())

    def close(self) -> None:
        """``await manager.close()``."""
        self._runner.run(self._target.close())

    def __enter__(self) -> SyncFacade:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SyncFacade({self._target!r})"


class _SyncContext:
    """An async context manager used with ``with``; what it yields is a facade in turn."""

    def __init__(self, context: Any, runner: LoopThread) -> None:
        self._context = context
        self._runner = runner

    def __enter__(self) -> SyncFacade:
        return SyncFacade(self._runner.run(self._context.__aenter__()), self._runner)

    def __getattr__(self, name: str) -> Any:
        # A hold used without ``with`` (``hold.commit_usage(...)``): its methods, synchronous.
        return getattr(SyncFacade(self._context, self._runner), name)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        result: bool | None = self._runner.run(self._context.__aexit__(exc_type, exc, tb))
        return result
