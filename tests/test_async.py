"""What is special to asyncio: concurrency, an event loop that never stalls, cancellation, closing.

Behaviour shared with StateManager is tested once, by the contract suite, for both managers.
The stores here are those of the contract suite (tests/contract/stores.py) that the library
registers, plus "threads", the memory store served through worker threads. Redis (standalone
and cluster) is served natively by redis.asyncio; what only that backend has is in
tests/test_redis_async.py.
"""

from __future__ import annotations

import asyncio
import inspect
import io
import json
import random
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from iron_runtime_state import (
    AgentId,
    AgentState,
    AgentStatus,
    AsyncBudgetHold,
    AsyncStateManager,
    AuditEvent,
    BackendError,
    BudgetExceeded,
    ConfigurationError,
    StateError,
    StateManager,
    StateTypeError,
)
from iron_runtime_state.audit_chain import AuditChain
from iron_runtime_state.backends import SCHEMES, BackendSpec, Change
from iron_runtime_state.backends.async_base import (
    AsyncBackend,
    ThreadedAsyncBackend,
    open_async_backend,
)
from iron_runtime_state.backends.memory import MemoryBackend

from .contract.stores import PROVISIONERS, MemoryHandle, StoreHandle

#: Store kinds; "threads" is the memory store posing as a blocking one, so the worker-thread
#: path is covered whatever store backends exist.
KINDS = ("memory", "threads", "sqlite", "redis", "redis-cluster")
#: Kinds served natively by asyncio (no worker threads).
NATIVE = ("redis", "redis-cluster")
#: The URL scheme of each kind whose name is not one.
SCHEME_OF = {"redis-cluster": "redis+cluster"}


def _handle(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> StoreHandle:
    if kind == "threads":
        return ThreadsHandle()
    if SCHEME_OF.get(kind, kind) not in SCHEMES:
        pytest.skip(f"the {kind} backend is not registered yet")
    if kind not in PROVISIONERS:
        pytest.skip(f"no contract-suite provisioner for {kind} yet")
    return PROVISIONERS[kind](request, tmp_path)


@pytest.fixture(params=KINDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreHandle]:
    """An empty store of each registered kind."""
    handle = _handle(request.param, request, tmp_path)
    try:
        yield handle
    finally:
        handle.close_all()


@pytest.fixture
def sqlite_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreHandle]:
    """An empty SQLite store."""
    handle = _handle("sqlite", request, tmp_path)
    try:
        yield handle
    finally:
        handle.close_all()


@pytest.fixture(params=[k for k in KINDS if k != "memory" and k not in NATIVE])
def blocking_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreHandle]:
    """An empty store of each registered kind whose calls block (run in worker threads)."""
    handle = _handle(request.param, request, tmp_path)
    try:
        yield handle
    finally:
        handle.close_all()


class GatedMemory(MemoryBackend):
    """The memory store posing as a blocking one, whose PII and spend calls can be held at a gate."""

    blocking = True

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.delay = delay

    def _wait(self) -> None:
        self.entered.set()
        assert self.gate.wait(10), "the test never opened the gate"

    def record_pii(
        self, agent_id: AgentId, count: int, now: float, event: AuditEvent, chain: AuditChain
    ) -> Change:
        self._wait()
        return super().record_pii(agent_id, count, now, event, chain)

    def save_many(self, states: Sequence[AgentState], now: float) -> None:
        time.sleep(self.delay)  # a slow write that does not hold the GIL, as a disk would
        super().save_many(states, now)


class ThreadsHandle(MemoryHandle):
    """One :class:`GatedMemory` store (gate open): the memory store served through worker threads."""

    def __init__(self) -> None:
        super().__init__()
        self._backend = GatedMemory()

    def open_async(self, *, max_threads: int | None = None, **options: Any) -> AsyncStateManager:
        return AsyncStateManager(ThreadedAsyncBackend(self._backend, max_threads=max_threads), **options)


def running(limit: float | None = None) -> AgentState:
    return AgentState(AgentId.generate(), AgentStatus.RUNNING, budget_limit=limit)


def iron_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("iron-state-")]


# -- concurrency ------------------------------------------------------------------------------------


def test_thousand_concurrent_spends_end_with_the_exact_total(store: StoreHandle) -> None:
    async def main() -> None:
        async with store.open_async() as manager:
            free, capped = running(), running(limit=600.0)
            await manager.save_agent_states([free, capped])
            await asyncio.gather(*(manager.record_spend(free.agent_id, 1.0) for _ in range(1000)))
            results = await asyncio.gather(
                *(manager.record_spend(capped.agent_id, 1.0) for _ in range(1000)),
                return_exceptions=True,
            )
            refused = [r for r in results if isinstance(r, BudgetExceeded)]
            assert len(refused) == 400
            assert all(isinstance(r, (AgentState, BudgetExceeded)) for r in results)
            got = await manager.get_agent_states([free.agent_id, capped.agent_id])
            assert [s.budget_spent for s in got if s is not None] == [1000.0, 600.0]
            assert (await manager.stats()).budget_spent == 1600.0
            events = await manager.audit_log(agent_id=capped.agent_id, event_type="budget_exceeded")
            assert len(events) == 400
            assert (await manager.verify_audit_log()).ok

    asyncio.run(main())


def test_concurrent_reservations_never_pass_the_limit(store: StoreHandle) -> None:
    async def main() -> None:
        async with store.open_async() as manager:
            agent = running(limit=50.0)
            await manager.save_agent_state(agent)
            committed: list[float] = []

            async def work(seed: int) -> None:
                rng = random.Random(seed)
                for _ in range(10):
                    try:
                        async with manager.budget(agent.agent_id, rng.choice([1.0, 2.0, 5.0])) as hold:
                            await asyncio.sleep(rng.random() / 1000)
                            if rng.random() < 0.7:
                                cost = rng.choice([0.0, 0.5, 1.0])
                                await hold.commit(cost)
                                committed.append(cost)
                    except BudgetExceeded:
                        pass

            await asyncio.gather(*(work(i) for i in range(100)))
            state = await manager.get_agent_state(agent.agent_id)
            assert state is not None
            assert state.budget_spent == sum(committed)
            assert await manager.budget_available(agent.agent_id) == 50.0 - state.budget_spent

    asyncio.run(main())


async def _max_gap_while(work: Any, tick: float = 0.002) -> tuple[float, float]:
    """Run ``work`` while a ticker sleeps ``tick`` in a loop: the longest the ticker waited, and
    how long ``work`` took."""
    done = asyncio.Event()
    gaps: list[float] = []

    async def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(tick)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    start = time.perf_counter()
    try:
        await work
    finally:
        took = time.perf_counter() - start
        done.set()
        await task
    return max(gaps), took


def _best_of(attempts: int, measure: Any) -> Any:
    """The first passing measurement of up to ``attempts``: a loaded machine can pause any thread
    for a while, so one stall can be the machine's, but a blocking store stalls every time."""
    failure: AssertionError | None = None
    for _ in range(attempts):
        try:
            return measure()
        except AssertionError as exc:
            failure = exc
    assert failure is not None
    raise failure


def test_the_loop_keeps_serving_while_the_store_blocks() -> None:
    """Writes that take 200 ms each never hold the loop: they run in the adapter's threads."""

    async def main() -> None:
        backend = GatedMemory(delay=0.2)
        async with AsyncStateManager(backend) as manager:  # 2 worker threads
            states = [running() for _ in range(60)]
            writes = asyncio.gather(*(manager.save_agent_states(states[i::6]) for i in range(6)))
            gap, took = await _max_gap_while(writes)
            assert took >= 0.55  # 6 writes of 200 ms on 2 threads
            # Held by a write, the loop would wait 200 ms; a loaded machine adds tens of ms.
            assert gap < 0.15, f"the loop stalled for {gap * 1000:.0f} ms"
            assert (await manager.stats()).total == 60

    _best_of(3, lambda: asyncio.run(main()))


def test_the_loop_keeps_serving_while_sqlite_writes(sqlite_store: StoreHandle) -> None:
    """Writes of megabytes take hundreds of ms each; the loop is never held for long.

    A manager that blocked would stall the loop for at least one whole write. Worker threads
    still take the GIL for their Python parts, so the loop waits a few switch intervals at
    worst (more on a loaded machine): the bound leaves room for that, not for a whole write.
    """
    details = "x" * 32_000

    async def main() -> tuple[float, float, float]:
        async with sqlite_store.open_async(max_threads=2) as manager:
            agent = AgentId.generate()
            batch = [AuditEvent(agent, "tool_call", 1_000 + i, details) for i in range(300)]
            start = time.perf_counter()
            await manager.save_audit_logs(batch)  # how long one write takes on this machine
            one_write = time.perf_counter() - start
            before = await manager.audit_count()
            states = [running() for _ in range(5000)]
            writes = asyncio.gather(
                *(manager.save_audit_logs(batch) for _ in range(4)),
                manager.save_agent_states(states),
            )
            gap, took = await _max_gap_while(writes)
            assert (await manager.audit_count()) == before + 4 * 300
            return gap, one_write, took

    def measure() -> None:
        gap, one_write, took = asyncio.run(main())
        assert gap < max(0.1, one_write / 3), (
            f"the loop stalled {gap * 1000:.0f} ms; one write takes {one_write * 1000:.0f} ms, "
            f"all took {took * 1000:.0f} ms"
        )

    _best_of(3, measure)


def test_iterating_while_writing(store: StoreHandle) -> None:
    """Async iterators fetch their batches (on one worker thread each) while other tasks write."""

    async def main() -> None:
        async with store.open_async() as manager:
            states = [running() for _ in range(1200)]
            await manager.save_agent_states(states)
            await manager.save_audit_logs(
                [AuditEvent(s.agent_id, "tool_call", 1_000, "") for s in states[:700]]
            )

            async def read_states() -> int:
                return len([s async for s in manager.iter_agent_states(batch_size=100)])

            async def read_trail() -> int:
                return len([r async for r in manager.iter_audit_log(page_size=64, limit=650)])

            async def write() -> None:
                for s in states[:200]:
                    await manager.record_pii_detection(s.agent_id)

            counts = await asyncio.gather(read_states(), read_trail(), read_states(), write())
            assert counts[:3] == [1200, 650, 1200]
            # Leaving an iterator early closes it on its thread; the manager stays usable.
            async for _ in manager.iter_agent_states(batch_size=10):
                break
            stopped = manager.iter_agent_states(status=AgentStatus.STOPPED)
            assert [s async for s in stopped] == []
            assert (await manager.stats()).pii_detections == 200

    asyncio.run(main())


# -- reservations -----------------------------------------------------------------------------------


def test_async_with_budget(store: StoreHandle) -> None:
    async def main() -> None:
        async with store.open_async() as manager:
            agent = running(limit=10.0)
            await manager.save_agent_state(agent)
            aid = agent.agent_id
            async with manager.budget(aid, 3.0) as hold:
                assert isinstance(hold, AsyncBudgetHold)
                assert await manager.budget_available(aid) == pytest.approx(7.0)
                state = await hold.commit(2.0)
                assert state.budget_spent == 2.0
            assert await manager.budget_available(aid) == pytest.approx(8.0)

            async def fails() -> None:
                async with manager.budget(aid, 5.0):
                    assert await manager.budget_available(aid) == pytest.approx(3.0)
                    raise RuntimeError("boom")

            with pytest.raises(RuntimeError, match="boom"):
                await fails()
            assert await manager.budget_available(aid) == pytest.approx(8.0)

            async with manager.budget(aid, 5.0):
                pass  # no commit: released, with a warning in the log
            assert await manager.budget_available(aid) == pytest.approx(8.0)

            with pytest.raises(BudgetExceeded):
                async with manager.budget(aid, 50.0):
                    raise AssertionError("never entered")

            # A task cancelled inside the block releases its hold.
            entered = asyncio.Event()

            async def holder() -> None:
                async with manager.budget(aid, 4.0):
                    entered.set()
                    await asyncio.sleep(60)

            task = asyncio.create_task(holder())
            await entered.wait()
            assert await manager.budget_available(aid) == pytest.approx(4.0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await manager.budget_available(aid) == pytest.approx(8.0)

    asyncio.run(main())


# -- cancellation -----------------------------------------------------------------------------------


def test_a_call_cancelled_in_its_thread_still_writes_its_event() -> None:
    """The PII counter and its audit event are never split by a cancellation."""
    backend = GatedMemory()

    async def main() -> None:
        manager = AsyncStateManager(backend)
        agent = running()
        await manager.save_agent_state(agent)
        backend.gate.clear()
        task = asyncio.create_task(manager.record_pii_detection(agent.agent_id, 3, details="email"))
        assert await asyncio.to_thread(backend.entered.wait, 5)  # the call is in its thread now
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task  # returns at once, while the call is still held at the gate
        assert backend.get(agent.agent_id.as_str()) == agent  # nothing happened yet
        backend.gate.set()
        await manager.close()  # waits for the call it left running
        state = backend.get(agent.agent_id.as_str())
        assert state is not None
        assert state.pii_detections == 3
        events = StateManager(backend).audit_log(event_type="pii_detected")
        assert [json.loads(e.event.details)["count"] for e in events] == [3]

    asyncio.run(main())


def test_cancelling_at_random_leaves_the_store_consistent(store: StoreHandle) -> None:
    async def main() -> None:
        manager = store.open_async()
        agents = [running(limit=1e9) for _ in range(5)]
        await manager.save_agent_states(agents)

        async def work(rng: random.Random) -> None:
            agent_id = rng.choice(agents).agent_id
            for _ in range(5):
                choice = rng.random()
                if choice < 0.4:
                    await manager.record_spend(agent_id, 1.0)
                elif choice < 0.7:
                    await manager.record_pii_detection(agent_id)
                else:
                    async with manager.budget(agent_id, 2.0) as hold:
                        await hold.commit(1.0)

        rng = random.Random(7)
        tasks = [asyncio.create_task(work(random.Random(i))) for i in range(300)]
        for _ in range(150):
            await asyncio.sleep(rng.random() / 500)
            rng.choice(tasks).cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        if manager.backend.suspends:  # (memory calls never suspend: tasks finish before a cancel)
            assert any(isinstance(r, asyncio.CancelledError) for r in results)
        assert not [r for r in results if r is not None and not isinstance(r, asyncio.CancelledError)]
        await manager.close()  # waits for the calls that cancelled callers left running

        async with store.open_async() as fresh:
            states = [s for s in await fresh.get_agent_states([a.agent_id for a in agents]) if s]
            stats = await fresh.stats()
            assert stats.budget_spent == sum(s.budget_spent for s in states)
            assert stats.pii_detections == sum(s.pii_detections for s in states)
            assert all(s.budget_spent == int(s.budget_spent) for s in states)
            # Every PII change wrote its event; every open hold was released or committed.
            pii_events = await fresh.audit_log(event_type="pii_detected")
            assert len(pii_events) == stats.pii_detections
            for s in states:
                assert await fresh.budget_available(s.agent_id) == 1e9 - s.budget_spent
            assert (await fresh.verify_audit_log()).ok

    asyncio.run(main())


def test_cancelling_an_export_stops_its_thread(tmp_path: Path) -> None:
    async def main() -> None:
        async with AsyncStateManager(GatedMemory()) as manager:
            agent = AgentId.generate()
            for _ in range(10):
                await manager.save_audit_logs([AuditEvent(agent, "e", i, "d" * 500) for i in range(2000)])
            task = asyncio.create_task(manager.export_audit_log(tmp_path / "out.jsonl", page_size=100))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # The manager is still whole: a full export and a verification succeed.
            assert await manager.export_audit_log(tmp_path / "all.jsonl") == 20_000
            assert (await manager.verify_audit_log()).checked == 20_000

    asyncio.run(main())


# -- lifecycle --------------------------------------------------------------------------------------


def test_close_releases_the_threads() -> None:
    async def main() -> None:
        before = set(iron_threads())
        manager = AsyncStateManager(GatedMemory())
        await asyncio.gather(*(manager.save_agent_state(running()) for _ in range(50)))
        assert len(set(iron_threads()) - before) >= 1
        await manager.close()
        assert set(iron_threads()) - before == set()
        with pytest.raises(BackendError, match="closed"):
            await manager.list_agents()
        await manager.close()  # twice is harmless

    asyncio.run(main())


def test_memory_runs_on_the_loop_without_threads() -> None:
    async def main() -> None:
        before = set(iron_threads())
        async with AsyncStateManager() as manager:
            assert manager.url == "memory://"
            assert repr(manager) == "AsyncStateManager('memory://')"
            assert not manager.backend.suspends
            agent = running()
            await manager.save_agent_state(agent)
            await manager.record_spend(agent.agent_id, 1.0)
            (got,) = [s async for s in manager.iter_agent_states()]
            assert got.budget_spent == 1.0
        assert set(iron_threads()) - before == set()

    asyncio.run(main())


def test_a_blocking_store_runs_in_threads(blocking_store: StoreHandle) -> None:
    async def main() -> None:
        async with blocking_store.open_async(max_threads=2) as manager:
            assert manager.backend.suspends
            await asyncio.gather(*(manager.save_agent_state(running()) for _ in range(20)))
            assert 1 <= len(iron_threads()) <= 2
            assert len(await manager.list_agents()) == 20

    asyncio.run(main())


# -- construction and the registry -----------------------------------------------------------------


def test_constructors() -> None:
    async def main() -> None:
        async with AsyncStateManager(MemoryBackend()) as manager:
            assert isinstance(manager.backend, ThreadedAsyncBackend)
        async with AsyncStateManager.from_url("memory://") as manager:
            assert manager.url == "memory://"
        with pytest.raises(StateTypeError):
            AsyncStateManager("memory://")  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="unknown store URL scheme"):
            AsyncStateManager.from_url("nope://x")
        with pytest.raises(ConfigurationError, match="max_threads"):
            AsyncStateManager.from_url("memory://", max_threads=0)
        with pytest.raises(StateError):
            AsyncStateManager.from_url("memory://", audit_key=b"short")

    asyncio.run(main())


def test_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IRON_STATE_URL", "memory://")
    monkeypatch.setenv("IRON_STATE_AUDIT_KEY", "k" * 32)
    manager = AsyncStateManager.from_env()
    assert manager.url == "memory://"


class FakeDriverError(Exception):
    """What a native driver would raise."""


class NativeStore(ThreadedAsyncBackend):
    """Stands in for a native asyncio backend: a driver error on ``get`` and while iterating."""

    driver_errors = (FakeDriverError,)

    async def call(self, name: str, *args: Any) -> Any:
        if name == "get":
            raise FakeDriverError("connection reset")
        return await super().call(name, *args)

    async def stream(self, name: str, *args: Any) -> AsyncIterator[Any]:
        yield running()
        raise FakeDriverError("connection reset")


def open_native(url: str, **options: Any) -> AsyncBackend:
    return NativeStore(MemoryBackend(), **options)


def test_registry_native_async_factory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(
        SCHEMES, "native", BackendSpec(__name__, "nope", None, "native://", async_factory="open_native")
    )

    async def main() -> None:
        backend = open_async_backend("native://")
        assert isinstance(backend, NativeStore)
        with pytest.raises(ConfigurationError, match="max_threads"):
            open_async_backend("native://", max_threads=2)
        async with AsyncStateManager(backend) as manager:
            with pytest.raises(BackendError, match="connection reset") as info:
                await manager.get_agent_state(AgentId.generate())
            assert isinstance(info.value.__cause__, FakeDriverError)
            with pytest.raises(BackendError):
                _ = [s async for s in manager.iter_agent_states()]

    asyncio.run(main())


def test_update_function_must_be_plain() -> None:
    async def main() -> None:
        async with AsyncStateManager() as manager:
            agent = running()
            await manager.save_agent_state(agent)

            async def bump(state: AgentState) -> AgentState:
                return state

            with pytest.raises(StateTypeError, match="async"):
                await manager.update_agent_state(agent.agent_id, bump)  # type: ignore[arg-type]

    asyncio.run(main())


def test_export_matches_the_sync_manager() -> None:
    backend = MemoryBackend()
    sync = StateManager(backend)
    agent = AgentId.generate()
    sync.save_audit_logs([AuditEvent(agent, "tool_call", 1_000 + i, f"call {i}") for i in range(12_000)])
    expected = io.StringIO()
    sync.export_audit_log(expected, format="csv", since=1_100)

    async def main() -> None:
        async with AsyncStateManager(backend) as manager:
            out = io.StringIO()
            assert await manager.export_audit_log(out, format="csv", since=1_100) == 11_900
            assert out.getvalue() == expected.getvalue()
            with pytest.raises(StateTypeError):
                await manager.export_audit_log(42)  # type: ignore[arg-type]

    asyncio.run(main())


# -- the API mirrors StateManager -------------------------------------------------------------------

#: Keyword-only parameters the asyncio manager adds (for its worker threads).
ASYNC_ONLY = {"max_threads"}
ITERATORS = {"iter_agent_states", "iter_audit_log", "watch"}


def _public(cls: type) -> dict[str, Any]:
    return {name: value for name, value in vars(cls).items() if not name.startswith("_")}


def test_same_methods_and_parameters_as_state_manager() -> None:
    sync, aio = _public(StateManager), _public(AsyncStateManager)
    assert set(sync) == set(aio)
    for name, value in sync.items():
        if isinstance(value, property):
            assert isinstance(aio[name], property), name
            continue
        ours = inspect.signature(getattr(AsyncStateManager, name)).parameters
        theirs = inspect.signature(getattr(StateManager, name)).parameters
        extra = set(ours) - set(theirs)
        assert extra <= ASYNC_ONLY, (name, extra)
        for param in extra:
            assert ours[param].kind is inspect.Parameter.KEYWORD_ONLY
        assert [(p.name, p.kind, p.default) for p in theirs.values()] == [
            (p.name, p.kind, p.default) for p in ours.values() if p.name not in extra
        ], name
        method = getattr(AsyncStateManager, name)
        if name in ITERATORS or name == "budget" or isinstance(value, classmethod):
            assert not inspect.iscoroutinefunction(method), name
        else:
            assert inspect.iscoroutinefunction(method), name


def test_every_operation_of_the_sync_contract_is_reachable_by_name_on_an_async_store() -> None:
    from iron_runtime_state.backends.base import ITERATORS, OPERATIONS

    async def main() -> None:
        backend = ThreadedAsyncBackend(MemoryBackend())
        agent = running()
        await backend.save(agent, 0.0)
        assert await backend.get(agent.agent_id.as_str()) == agent
        assert [s async for s in backend.iter_states(None, None, 10)] == [agent]
        for name in OPERATIONS:
            assert callable(getattr(backend, name))
        with pytest.raises(AttributeError):
            _ = backend.no_such_operation
        with pytest.raises(StateTypeError):
            await backend.call("iter_states", None, None, 10)  # a stream, not a call
        with pytest.raises(StateTypeError):
            backend.stream("get", agent.agent_id.as_str())
        assert {"iter_states", "iter_audit_rows"} == ITERATORS

    asyncio.run(main())


def test_importing_the_package_does_not_import_asyncio() -> None:
    code = "import sys, iron_runtime_state; print('asyncio' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
