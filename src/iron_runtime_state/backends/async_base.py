"""The store contract for asyncio, and the adapter that serves it from any sync store.

:class:`AsyncBackend` mirrors :class:`~iron_runtime_state.backends.Backend` method for method:
the same names, arguments and meaning, as coroutines (the two iterators are async iterators).
Everything a store does without I/O (validation, encoding, hashing, scripts, key layout) is
shared with the sync backend of the same store, never written again here.

A store with a native asyncio driver implements :class:`AsyncBackend` directly and names its
factory as the ``async_factory`` of its URL scheme in the registry (the Redis store, over
``redis.asyncio``, will). Every other store is served by :class:`ThreadedAsyncBackend`, which
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
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Final, TypeVar

from ..audit_chain import AuditChain, AuditRow
from ..errors import BackendError, ConfigurationError, StateError, StateTypeError
from ..ids import AgentId
from ..models import AgentState, AgentStatus, AuditEvent, AuditRecord, FleetStats, Reservation
from . import load_factory, open_backend, spec_for
from .base import ITERATORS as _ITERATORS, OPERATIONS as _WRAPPED, AuditQuery, Backend, CommitResult, SpendResult, UpdateFn

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

    The same contract as :class:`~iron_runtime_state.backends.Backend`, method for method, with
    ``await``. Driver exceptions listed in ``driver_errors`` are mapped once, here, for every
    method (as in the sync contract). An incomplete backend cannot be built.
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
        for name in _WRAPPED:
            method = cls.__dict__.get(name)
            if method is None or getattr(method, "__isabstractmethod__", False):
                continue
            wrap = _wrap_iter if name in _ITERATORS else _wrap
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

    # -- agent states ---------------------------------------------------------------------

    @abc.abstractmethod
    async def save(self, state: AgentState, now: float) -> None:
        """Insert or replace ``state`` (already validated; the backend may keep it)."""

    async def save_many(self, states: Sequence[AgentState], now: float) -> None:
        """Insert or replace many states; backends override this to batch the writes."""
        for state in states:
            await self.save(state, now)

    @abc.abstractmethod
    async def get(self, agent_id: AgentId) -> AgentState | None:
        """An independent copy of the agent's state, or ``None``."""

    async def get_many(self, agent_ids: Sequence[AgentId]) -> list[AgentState | None]:
        """The states of many agents, in order; backends override this to batch the reads."""
        return [await self.get(agent_id) for agent_id in agent_ids]

    @abc.abstractmethod
    async def remove(self, agent_id: AgentId) -> bool:
        """Remove the agent and its open reservations; ``True`` when it existed."""

    @abc.abstractmethod
    async def list_ids(self) -> list[str]:
        """Every stored agent's canonical id."""

    @abc.abstractmethod
    def iter_states(self, status: AgentStatus | None, batch_size: int) -> AsyncIterator[AgentState]:
        """Every state (or those with ``status``), fetched ``batch_size`` at a time."""

    @abc.abstractmethod
    async def stats(self) -> FleetStats:
        """Fleet totals, from aggregates kept up to date by every change (no scan)."""

    @abc.abstractmethod
    async def update(self, agent_id: AgentId, fn: UpdateFn, now: float) -> AgentState:
        """Atomically replace the state with ``fn(copy)``; ``AgentNotFound`` when absent.

        ``fn`` is a plain function: it validates its own result and may be called more than once.
        """

    @abc.abstractmethod
    async def record_spend(self, agent_id: AgentId, amount: float, now: float) -> SpendResult:
        """Atomically add ``amount`` to ``budget_spent`` unless that passes the limit.

        The check counts open reservations: ``spent + reserved + amount <= limit``. Raises
        ``AgentNotFound`` or ``AgentNotRunning``; a refused spend is ``exceeded=True``.
        """

    @abc.abstractmethod
    async def record_pii(self, agent_id: AgentId, count: int, now: float) -> AgentState:
        """Atomically add ``count`` to ``pii_detections``; ``AgentNotFound`` when absent."""

    @abc.abstractmethod
    async def set_status(
        self, agent_id: AgentId, status: AgentStatus, now: float
    ) -> tuple[AgentStatus, AgentState]:
        """Atomically set the status; returns the old status and the new state."""

    # -- reservations ---------------------------------------------------------------------

    @abc.abstractmethod
    async def reserve(
        self, agent_id: AgentId, amount: float, ttl: float, now: float, reservation_id: str
    ) -> Reservation | SpendResult:
        """Hold ``amount`` if ``spent + open holds + amount <= limit``; a ``SpendResult`` when refused."""

    @abc.abstractmethod
    async def commit(self, reservation: Reservation, actual: float, now: float) -> CommitResult:
        """Record ``actual`` as spent and drop the hold, atomically; ``ReservationError`` if not open."""

    @abc.abstractmethod
    async def release(self, reservation: Reservation, now: float) -> None:
        """Drop the hold without spending; ``ReservationError`` if it is not open."""

    @abc.abstractmethod
    async def reserved(self, agent_id: AgentId, now: float) -> tuple[AgentState, float]:
        """The agent's state and the sum of its open (unexpired) holds."""

    # -- audit trail ------------------------------------------------------------------------

    @abc.abstractmethod
    async def append_audit(self, events: Sequence[AuditEvent], chain: AuditChain) -> list[AuditRecord]:
        """Append events in order, atomically as a batch, each sealed into the chain."""

    @abc.abstractmethod
    async def query_audit(self, query: AuditQuery) -> list[AuditRecord]:
        """Records matching ``query`` in ``seq`` order, at most ``query.limit`` of them."""

    @abc.abstractmethod
    def iter_audit_rows(self, after_seq: int, batch_size: int) -> AsyncIterator[AuditRow]:
        """Every record with ``seq > after_seq`` as plain rows, in ``seq`` order, in batches."""

    @abc.abstractmethod
    async def audit_anchor(self) -> tuple[int, str]:
        """``(seq, hash)`` the first remaining record links to: ``(0, GENESIS_HASH)`` unpruned."""

    @abc.abstractmethod
    async def audit_head(self) -> tuple[int, str]:
        """``(seq, hash)`` of the newest record ever appended (the anchor if none remain)."""

    @abc.abstractmethod
    async def audit_count(self) -> int:
        """How many records the trail holds."""

    @abc.abstractmethod
    async def prune_audit(self, before: int) -> int:
        """Remove the longest run of oldest records whose timestamp is before ``before``."""

    @abc.abstractmethod
    async def purge_agents(self, statuses: Sequence[AgentStatus], changed_before: float) -> list[str]:
        """Remove agents with one of ``statuses`` whose state last changed before the time."""

    # -- lifecycle --------------------------------------------------------------------------

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections, files and threads; calling it twice is harmless."""


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

    # -- agent states ---------------------------------------------------------------------

    async def save(self, state: AgentState, now: float) -> None:
        """See :meth:`AsyncBackend.save`."""
        await self._run(self._backend.save, state, now)

    async def save_many(self, states: Sequence[AgentState], now: float) -> None:
        """See :meth:`AsyncBackend.save_many`."""
        await self._run(self._backend.save_many, states, now)

    async def get(self, agent_id: AgentId) -> AgentState | None:
        """See :meth:`AsyncBackend.get`."""
        return await self._run(self._backend.get, agent_id)

    async def get_many(self, agent_ids: Sequence[AgentId]) -> list[AgentState | None]:
        """See :meth:`AsyncBackend.get_many`."""
        return await self._run(self._backend.get_many, agent_ids)

    async def remove(self, agent_id: AgentId) -> bool:
        """See :meth:`AsyncBackend.remove`."""
        return await self._run(self._backend.remove, agent_id)

    async def list_ids(self) -> list[str]:
        """See :meth:`AsyncBackend.list_ids`."""
        return await self._run(self._backend.list_ids)

    def iter_states(self, status: AgentStatus | None, batch_size: int) -> AsyncIterator[AgentState]:
        """See :meth:`AsyncBackend.iter_states`."""
        return self._iterate(functools.partial(self._backend.iter_states, status, batch_size), batch_size)

    async def stats(self) -> FleetStats:
        """See :meth:`AsyncBackend.stats`."""
        return await self._run(self._backend.stats)

    async def update(self, agent_id: AgentId, fn: UpdateFn, now: float) -> AgentState:
        """See :meth:`AsyncBackend.update` (``fn`` runs in the worker thread)."""
        return await self._run(self._backend.update, agent_id, fn, now)

    async def record_spend(self, agent_id: AgentId, amount: float, now: float) -> SpendResult:
        """See :meth:`AsyncBackend.record_spend`."""
        return await self._run(self._backend.record_spend, agent_id, amount, now)

    async def record_pii(self, agent_id: AgentId, count: int, now: float) -> AgentState:
        """See :meth:`AsyncBackend.record_pii`."""
        return await self._run(self._backend.record_pii, agent_id, count, now)

    async def set_status(
        self, agent_id: AgentId, status: AgentStatus, now: float
    ) -> tuple[AgentStatus, AgentState]:
        """See :meth:`AsyncBackend.set_status`."""
        return await self._run(self._backend.set_status, agent_id, status, now)

    # -- reservations ---------------------------------------------------------------------

    async def reserve(
        self, agent_id: AgentId, amount: float, ttl: float, now: float, reservation_id: str
    ) -> Reservation | SpendResult:
        """See :meth:`AsyncBackend.reserve`."""
        return await self._run(self._backend.reserve, agent_id, amount, ttl, now, reservation_id)

    async def commit(self, reservation: Reservation, actual: float, now: float) -> CommitResult:
        """See :meth:`AsyncBackend.commit`."""
        return await self._run(self._backend.commit, reservation, actual, now)

    async def release(self, reservation: Reservation, now: float) -> None:
        """See :meth:`AsyncBackend.release`."""
        await self._run(self._backend.release, reservation, now)

    async def reserved(self, agent_id: AgentId, now: float) -> tuple[AgentState, float]:
        """See :meth:`AsyncBackend.reserved`."""
        return await self._run(self._backend.reserved, agent_id, now)

    # -- audit trail ------------------------------------------------------------------------

    async def append_audit(self, events: Sequence[AuditEvent], chain: AuditChain) -> list[AuditRecord]:
        """See :meth:`AsyncBackend.append_audit`."""
        return await self._run(self._backend.append_audit, events, chain)

    async def query_audit(self, query: AuditQuery) -> list[AuditRecord]:
        """See :meth:`AsyncBackend.query_audit`."""
        return await self._run(self._backend.query_audit, query)

    def iter_audit_rows(self, after_seq: int, batch_size: int) -> AsyncIterator[AuditRow]:
        """See :meth:`AsyncBackend.iter_audit_rows`."""
        return self._iterate(
            functools.partial(self._backend.iter_audit_rows, after_seq, batch_size), batch_size
        )

    async def audit_anchor(self) -> tuple[int, str]:
        """See :meth:`AsyncBackend.audit_anchor`."""
        return await self._run(self._backend.audit_anchor)

    async def audit_head(self) -> tuple[int, str]:
        """See :meth:`AsyncBackend.audit_head`."""
        return await self._run(self._backend.audit_head)

    async def audit_count(self) -> int:
        """See :meth:`AsyncBackend.audit_count`."""
        return await self._run(self._backend.audit_count)

    async def prune_audit(self, before: int) -> int:
        """See :meth:`AsyncBackend.prune_audit`."""
        return await self._run(self._backend.prune_audit, before)

    async def purge_agents(self, statuses: Sequence[AgentStatus], changed_before: float) -> list[str]:
        """See :meth:`AsyncBackend.purge_agents`."""
        return await self._run(self._backend.purge_agents, statuses, changed_before)

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
