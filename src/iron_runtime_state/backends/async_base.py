"""The store contract for asyncio, and the adapter that serves it from any sync store.

:class:`AsyncBackend` runs the operations that :class:`~iron_runtime_state.backends.Backend`
declares, by name: ``await store.call("record_spend", agent_id, amount, now)``, and
``store.stream("iter_states", status, batch_size)`` for the two that hand out items. The
operations are declared once, on ``Backend``; nothing here lists them again. Everything a store
does without I/O (validation, encoding, hashing, scripts, key layout) is shared with the sync
backend of the same store.

A store with a native asyncio driver implements :class:`AsyncBackend` directly and names its
factory as the ``async_factory`` of its URL scheme in the registry (the Redis store, over
``redis.asyncio``). Every other store is served by :class:`ThreadedAsyncBackend`, which
wraps the sync backend:

- a store whose calls can block (``Backend.blocking``: SQLite's file I/O and locks) runs each
  call in a small pool of worker threads owned by the adapter, so the event loop never waits;
- the in-memory store (``blocking = False``) is called directly on the event loop: its calls
  take microseconds, far less than a thread hop would.

:func:`open_async_backend` picks between the two for a URL.

asyncio and ``concurrent.futures`` are imported on first use, so ``import iron_runtime_state``
stays as cheap as before for sync programs and the command line.
"""

from __future__ import annotations

import abc
import collections
import contextlib
import functools
import itertools
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar, Final, TypeVar

from ..errors import BackendError, ConfigurationError, StateError, StateTypeError
from . import load_factory, open_backend, spec_for
from .base import ITERATORS, OPERATIONS, WAITING, Backend

if TYPE_CHECKING:
    import asyncio

_Call = tuple["asyncio.AbstractEventLoop", "asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]

__all__ = ["DEFAULT_THREADS", "AsyncBackend", "ThreadedAsyncBackend", "open_async_backend"]

#: Worker threads of a :class:`ThreadedAsyncBackend` over a blocking store, unless told otherwise.
#: SQLite writes one transaction at a time, so more threads add contention, not throughput.
DEFAULT_THREADS: Final = 2

_T = TypeVar("_T")
_F = TypeVar("_F", bound=Callable[..., Any])


def _wrap(method: _F) -> _F:
    @functools.wraps(method)
    async def wrapper(self: AsyncBackend, *args: Any, **kwargs: Any) -> Any:
        try:
            return await method(self, *args, **kwargs)
        except StateError:
            raise
        except BaseException as exc:
            if isinstance(exc, self.driver_errors):
                raise self.map_driver_error(exc) from exc
            raise

    return wrapper  # type: ignore[return-value]


def _wrap_iter(method: _F) -> _F:
    @functools.wraps(method)
    async def wrapper(self: AsyncBackend, *args: Any, **kwargs: Any) -> Any:
        try:
            async for item in method(self, *args, **kwargs):
                yield item
        except StateError:
            raise
        except BaseException as exc:
            if isinstance(exc, self.driver_errors):
                raise self.map_driver_error(exc) from exc
            raise

    return wrapper  # type: ignore[return-value]


class AsyncBackend(abc.ABC):
    """A store of agent states, reservations and one hash-chained audit trail, for asyncio.

    The operations are those of :class:`~iron_runtime_state.backends.Backend`, with the same
    arguments and meaning; they are not declared again here. A store runs one by name:
    :meth:`call` for an operation that returns a result, :meth:`stream` for one of
    :data:`~iron_runtime_state.backends.base.ITERATORS`. ``await store.get(key)`` works too,
    as a shorthand for ``await store.call("get", key)``. Driver exceptions listed in
    ``driver_errors`` are mapped once, here. An incomplete backend cannot be built.
    """

    #: Driver exception types that the wrapper turns into ``BackendError``.
    driver_errors: ClassVar[tuple[type[BaseException], ...]] = ()
    #: Whether a call can yield to the event loop before it completes. ``False`` only when
    #: every call runs straight through on the loop (the in-memory store): a task can then not
    #: be cancelled between a change and the audit event the manager writes for it.
    suspends: bool = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.driver_errors:
            return
        for name, wrap in (("call", _wrap), ("stream", _wrap_iter), ("close", _wrap)):
            method = cls.__dict__.get(name)
            if method is not None and not getattr(method, "__isabstractmethod__", False):
                setattr(cls, name, wrap(method))

    def map_driver_error(self, exc: BaseException) -> StateError:
        """The library error for a driver exception (the wrapper chains ``exc`` as the cause).

        A native backend usually returns what its sync twin's ``map_driver_error`` does.
        """
        return BackendError(f"{type(exc).__name__}: {exc}")

    @property
    @abc.abstractmethod
    def url(self) -> str:
        """The store's URL with any password masked."""

    @abc.abstractmethod
    async def call(self, name: str, *args: Any) -> Any:
        """Run the operation ``name`` of the store contract with ``args``; its result."""

    @abc.abstractmethod
    def stream(self, name: str, *args: Any) -> AsyncIterator[Any]:
        """Run the streaming operation ``name`` (one of ``ITERATORS``); its items."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections, files and threads; calling it twice is harmless."""

    def __getattr__(self, name: str) -> Callable[..., Any]:
        # ``await store.get(key)`` for ``await store.call("get", key)``: the operations are
        # declared once, on Backend, and reached by name here.
        if name in ITERATORS:
            return functools.partial(self.stream, name)
        if name in OPERATIONS:
            return functools.partial(self.call, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


def _take(items: Iterator[_T], n: int) -> list[_T]:
    return list(itertools.islice(items, n))


def _close_iterator(items: Iterator[object]) -> None:
    close = getattr(items, "close", None)
    if close is not None:
        close()


class _Lane:
    """One worker thread and its queue of calls.

    It takes every queued call at once, runs them in order, and hands all their results to
    each event loop in one wake-up: a call costs a few microseconds of hand-off instead of the
    tens that a thread-pool future and a wake-up per call cost (``bench/bench_async.py``).
    """

    def __init__(self, name: str) -> None:
        self._calls: collections.deque[_Call] = collections.deque()
        self._cond = threading.Condition(threading.Lock())
        self._waiting = False  # the thread sleeps on the condition: a new call must wake it
        self._closed = False
        #: Calls queued or running; read without the lock to pick a lane (a stale value only
        #: sends a call to a busier lane).
        self.load = 0
        self._name = name
        self._thread: threading.Thread | None = None  # started by the first call

    def submit(self, call: _Call) -> None:
        """Queue a call; its result reaches its future on its event loop."""
        with self._cond:
            if self._closed:
                raise BackendError("this async store was closed; open a new manager")
            self._calls.append(call)
            self.load += 1
            if self._thread is None:
                # A daemon: an idle lane of a manager never closed must not hold the exit.
                self._thread = threading.Thread(target=self._serve, name=self._name, daemon=True)
                self._thread.start()
            elif self._waiting:
                self._cond.notify()

    def close(self) -> None:
        """Refuse new calls; the thread finishes the queued ones, then ends."""
        with self._cond:
            self._closed = True
            self._cond.notify()

    def join(self) -> None:
        """Wait for the thread to end (after :meth:`close`)."""
        with self._cond:
            thread = self._thread
        if thread is not None:
            thread.join()

    def _serve(self) -> None:
        calls = self._calls
        finished = 0
        while True:
            with self._cond:
                self.load -= finished
                while not calls and not self._closed:
                    self._waiting = True
                    self._cond.wait()
                    self._waiting = False
                if not calls:
                    return
                batch = list(calls)
                calls.clear()
            finished = len(batch)
            results: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]] = {}
            for loop, future, fn, args in batch:
                # Reading the state of another thread's future is a hint only: a call
                # cancelled a moment later runs anyway, and its result is dropped.
                if future.cancelled():
                    continue
                try:
                    outcome = (future, True, fn(*args))
                except BaseException as exc:  # delivered to the caller, whatever it is
                    outcome = (future, False, exc)
                results.setdefault(loop, []).append(outcome)
            for loop, outcomes in results.items():
                with contextlib.suppress(RuntimeError):  # the loop was closed: nobody waits
                    loop.call_soon_threadsafe(_deliver, outcomes)


def _deliver(outcomes: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    """Settle futures on their own loop with what the worker thread computed."""
    for future, ok, value in outcomes:
        if future.cancelled():
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


class _Lanes:
    """Worker threads, one queue each: a call goes to the least busy, an iterator keeps one.

    A sync backend may tie an open iterator to the thread that started it (a SQLite cursor
    belongs to its connection, and a connection often to its thread), so all the batches of
    one iterator run on one thread; other calls spread over the lanes.
    """

    def __init__(self, count: int) -> None:
        self._lanes = [_Lane(f"iron-state-{i}") for i in range(count)]

    def pick(self) -> int:
        """The lane with the fewest calls queued or running."""
        lanes = self._lanes
        return min(range(len(lanes)), key=lambda i: lanes[i].load)

    def submit(self, lane: int | None, fn: Callable[..., _T], args: tuple[Any, ...]) -> asyncio.Future[_T]:
        """Queue ``fn(*args)`` on ``lane`` (the least busy one when ``None``); await the result."""
        import asyncio

        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()
        self._lanes[self.pick() if lane is None else lane].submit((loop, future, fn, args))
        return future

    def close(self) -> None:
        """Refuse new calls from now on (the queued ones still run)."""
        for lane in self._lanes:
            lane.close()

    def join(self) -> None:
        """Wait for the queued calls and the threads to end (blocks: run it off the loop)."""
        for lane in self._lanes:
            lane.join()


class ThreadedAsyncBackend(AsyncBackend):
    """Serves the asyncio contract from a sync :class:`~iron_runtime_state.backends.Backend`.

    For a blocking store each call runs in one of ``max_threads`` worker threads that this
    adapter owns (``close()`` stops them); the event loop keeps serving other tasks meanwhile.
    A non-blocking store (memory) is called directly on the loop. A task cancelled while its
    call runs in a thread returns at once; the call itself, atomic in the store, completes or
    never starts, so the store stays consistent.
    """

    def __init__(self, backend: Backend, *, max_threads: int | None = None) -> None:
        """Wrap ``backend``; ``max_threads`` bounds the worker threads of a blocking store."""
        if not isinstance(backend, Backend):
            raise StateTypeError(f"backend must be a Backend, got {type(backend).__name__}")
        if max_threads is not None and (
            isinstance(max_threads, bool) or not isinstance(max_threads, int) or max_threads < 1
        ):
            raise ConfigurationError(f"max_threads must be an int >= 1, got {max_threads!r}")
        self._backend = backend
        self._lanes: _Lanes | None = None
        if type(backend).blocking:
            self._lanes = _Lanes(max_threads or DEFAULT_THREADS)
        self.suspends = self._lanes is not None
        self._closing = threading.Lock()
        self._closed = False

    @property
    def sync_backend(self) -> Backend:
        """The sync store this adapter serves."""
        return self._backend

    @property
    def url(self) -> str:
        """The store's URL with any password masked."""
        return self._backend.url

    async def _run(self, fn: Callable[..., _T], *args: Any, lane: int | None = None) -> _T:
        """``fn(*args)``: in a worker thread for a blocking store, else right here."""
        lanes = self._lanes
        if lanes is None:
            return fn(*args)
        # Cancelling the awaiting task skips a call that has not started; one that has
        # started runs to its end in the thread (its result is dropped).
        return await lanes.submit(lane, fn, args)

    async def _iterate(self, start: Callable[[], Iterator[_T]], batch_size: int) -> AsyncIterator[_T]:
        """The sync iterator ``start()`` as an async one, a batch per worker call."""
        import asyncio

        lanes = self._lanes
        if lanes is None:
            items = start()
            try:
                while batch := _take(items, batch_size):
                    for item in batch:
                        yield item
                    await asyncio.sleep(0)  # let other tasks run between batches
            finally:
                _close_iterator(items)
            return
        lane = lanes.pick()
        items = await self._run(start, lane=lane)
        try:
            while batch := await self._run(_take, items, batch_size, lane=lane):
                for item in batch:
                    yield item
        finally:
            # Closed meanwhile (the adapter or the loop): the iterator dies with it.
            with contextlib.suppress(StateError, RuntimeError):
                await self._run(_close_iterator, items, lane=lane)

    async def call(self, name: str, *args: Any) -> Any:
        """Run the sync store's operation ``name`` (in a worker thread for a blocking store)."""
        if name not in OPERATIONS or name in ITERATORS:
            raise StateTypeError(f"{name!r} is not an operation of the store contract that returns a result")
        if name in WAITING:  # off the loop and off the workers: it may wait for seconds
            import asyncio

            return await asyncio.get_running_loop().run_in_executor(None, getattr(self._backend, name), *args)
        return await self._run(getattr(self._backend, name), *args)

    def stream(self, name: str, *args: Any) -> AsyncIterator[Any]:
        """The sync store's streaming operation ``name``, a batch per worker call.

        The last argument of every streaming operation is its batch size.
        """
        if name not in ITERATORS:
            raise StateTypeError(f"{name!r} is not a streaming operation of the store contract")
        return self._iterate(functools.partial(getattr(self._backend, name), *args), args[-1])

    # -- lifecycle --------------------------------------------------------------------------

    async def close(self) -> None:
        """Wait for the calls under way, stop the worker threads, then close the sync store."""
        lanes = self._lanes
        if lanes is None:
            self._backend.close()
            return
        with self._closing:
            if self._closed:
                return
            self._closed = True
        lanes.close()
        import asyncio

        # Joining threads blocks, so it happens off the loop, in a thread of the loop's own.
        await asyncio.get_running_loop().run_in_executor(None, self._shutdown, lanes)

    def _shutdown(self, lanes: _Lanes) -> None:
        lanes.join()
        self._backend.close()

    def __repr__(self) -> str:
        mode = "threads" if self._lanes is not None else "inline"
        return f"ThreadedAsyncBackend({self.url!r}, {mode})"


def open_async_backend(url: str, *, max_threads: int | None = None, **options: Any) -> AsyncBackend:
    """The asyncio backend for ``url``; ``options`` go to the backend's factory.

    A scheme whose registry entry names an ``async_factory`` gets that native backend; any
    other is the sync backend in a :class:`ThreadedAsyncBackend` (``max_threads`` bounds its
    worker threads and is refused for a native backend, which has none).
    """
    scheme, spec = spec_for(url)
    if spec.async_factory is None:
        return ThreadedAsyncBackend(open_backend(url, **options), max_threads=max_threads)
    if max_threads is not None:
        raise ConfigurationError(f"{scheme}:// is served natively by asyncio; remove max_threads")
    backend = load_factory(scheme, spec, spec.async_factory)(url, **options)
    if not isinstance(backend, AsyncBackend):
        raise StateTypeError(f"{spec.module}.{spec.async_factory} returned {type(backend).__name__}")
    return backend
