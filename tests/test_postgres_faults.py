"""The PostgreSQL store under faults, on a server of each test's own (tests/postgres_server.py).

The server restarts (cleanly, or crashing) while threads spend and append, and connections are
killed with ``pg_terminate_backend``: calls fail with ``BackendUnavailable`` within the store's
timeout, the store recovers by itself, no acknowledged write is lost, and nothing is half-applied
(a spend charges the agent and its scope together, or neither).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable

import pytest

from iron_runtime_state import (
    AgentId,
    AgentState,
    AgentStatus,
    AsyncStateManager,
    AuditEvent,
    BackendUnavailable,
    StateManager,
)
from iron_runtime_state.money import to_micros

from .postgres_server import PostgresServer

pytestmark = pytest.mark.slow

TIMEOUT = 2.0
#: How much later than the timeout a failing call may return (thread scheduling, a busy machine).
SLACK = 2.0
AMOUNT = "0.01"
SCOPE = "team:load"


class Load:
    """Threads spending on their own agents (which share a scope) and appending audit events,
    counting what was acknowledged and what failed, until stopped."""

    def __init__(self, manager: StateManager, threads: int = 4) -> None:
        self.manager = manager
        manager.set_budget(SCOPE, limit=None)
        self.agents = [AgentId.generate() for _ in range(threads)]
        for agent in self.agents:
            manager.save_agent_state(AgentState(agent, AgentStatus.RUNNING, budget_scopes=(SCOPE,)))
        self.acked: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.appended = 0
        self.slow: list[float] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        workers: list[Callable[[], None]] = [lambda a=agent: self._spend(a) for agent in self.agents]
        workers.append(self._append)
        self._threads = [threading.Thread(target=work) for work in workers]

    def _attempt(self, call: Callable[[], object], key: str) -> bool:
        started = time.monotonic()
        try:
            call()
        except BackendUnavailable:
            took = time.monotonic() - started
            with self._lock:
                self.failed[key] += 1
                if took > TIMEOUT + SLACK:
                    self.slow.append(took)
            time.sleep(0.01)
            return False
        except BaseException as exc:  # anything else is a failure of the test
            with self._lock:
                self.errors.append(exc)
            return False
        return True

    def _spend(self, agent: AgentId) -> None:
        key = agent.as_str()
        while not self._stop.is_set():
            if self._attempt(lambda: self.manager.record_spend(agent, AMOUNT), key):
                with self._lock:
                    self.acked[key] += 1

    def _append(self) -> None:
        agent = AgentId.generate()
        while not self._stop.is_set():
            if self._attempt(lambda: self.manager.save_audit_log(AuditEvent(agent, "load")), "audit"):
                with self._lock:
                    self.appended += 1

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def acknowledged(self) -> int:
        with self._lock:
            return sum(self.acked.values())

    def check(self) -> None:
        """Nothing acknowledged was lost, nothing was half-applied, the trail verifies."""
        assert not self.errors, self.errors[:3]
        assert not self.slow, f"calls failed only after {self.slow[:5]} s (timeout {TIMEOUT} s)"
        each = to_micros(AMOUNT)
        total = 0
        for agent in self.agents:
            state = self.manager.get_agent_state(agent)
            assert state is not None
            spent = to_micros(state.budget_spent)
            key = agent.as_str()
            # Every acknowledged spend is there; a failed one may or may not have committed.
            assert self.acked[key] * each <= spent <= (self.acked[key] + self.failed[key]) * each, key
            total += spent
        budget = self.manager.get_budget(SCOPE)
        assert budget is not None
        assert to_micros(budget.spent) == total  # the agent and its scope: together or neither
        assert to_micros(self.manager.stats().budget_spent) == total
        assert self.manager.audit_count() >= self.appended
        report = self.manager.verify_audit_log()
        assert report.ok, report


def wait_until(check: Callable[[], bool], seconds: float) -> float:
    """Seconds until ``check()`` held; fails after ``seconds``."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > seconds:
            pytest.fail(f"not within {seconds} s")
        time.sleep(0.05)
    return time.monotonic() - started


def unavailable_within_timeout(call: Callable[[], object]) -> None:
    started = time.monotonic()
    with pytest.raises(BackendUnavailable):
        call()
    assert time.monotonic() - started <= TIMEOUT + SLACK


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_a_server_restart_mid_load_loses_nothing_acknowledged(pg_server: PostgresServer, mode: str) -> None:
    with StateManager.from_url(pg_server.url(schema="load"), timeout=TIMEOUT) as manager:
        load = Load(manager)
        with load:
            wait_until(lambda: load.acknowledged() > 200, 30)
            pg_server.stop(mode)  # "immediate" is a crash: no checkpoint, recovery from the WAL
            unavailable_within_timeout(manager.stats)
            before = load.acknowledged()
            time.sleep(0.5)
            pg_server.start()
            recovered = wait_until(lambda: load.acknowledged() > before + 200, 30)
        assert recovered < 15
        assert sum(load.failed.values()) > 0
        load.check()


def test_killed_connections_fail_their_calls_and_the_store_carries_on(pg_server: PostgresServer) -> None:
    with StateManager.from_url(pg_server.url(schema="load"), timeout=TIMEOUT) as manager:
        load = Load(manager)
        with load:
            for _ in range(5):
                wait_until(lambda: load.acknowledged() > 100, 30)
                mark = load.acknowledged()
                assert pg_server.terminate_backends("iron-runtime-state") >= 1
                wait_until(lambda m=mark: load.acknowledged() > m + 100, 15)
        load.check()


def test_a_store_opened_while_the_server_is_down_starts_working_when_it_is_up(
    pg_server: PostgresServer,
) -> None:
    pg_server.stop()
    with StateManager.from_url(pg_server.url(schema="late"), timeout=TIMEOUT) as manager:
        unavailable_within_timeout(manager.stats)
        agent = AgentId.generate()
        unavailable_within_timeout(lambda: manager.save_agent_state(AgentState(agent, AgentStatus.RUNNING)))
        pg_server.start()

        def works() -> bool:
            try:
                manager.save_agent_state(AgentState(agent, AgentStatus.RUNNING))
            except BackendUnavailable:
                return False
            return True

        assert wait_until(works, 15) < 10
        assert manager.get_agent_state(agent) is not None


def test_the_asyncio_store_fails_within_its_timeout_and_recovers(pg_server: PostgresServer) -> None:
    async def main() -> None:
        async with AsyncStateManager.from_url(pg_server.url(schema="aload"), timeout=TIMEOUT) as manager:
            agent = AgentId.generate()
            await manager.save_agent_state(AgentState(agent, AgentStatus.RUNNING))
            await asyncio.gather(*(manager.record_spend(agent, AMOUNT) for _ in range(20)))
            pg_server.terminate_backends("iron-runtime-state")
            await manager.record_spend(agent, AMOUNT)  # a dead idle connection is never used
            pg_server.stop("immediate")
            started = time.monotonic()
            with pytest.raises(BackendUnavailable):
                await manager.record_spend(agent, AMOUNT)
            assert time.monotonic() - started <= TIMEOUT + SLACK
            pg_server.start()
            deadline = time.monotonic() + 15
            while True:
                try:
                    state = await manager.record_spend(agent, AMOUNT)
                    break
                except BackendUnavailable:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.05)
            assert to_micros(state.budget_spent) == 22 * to_micros(AMOUNT)
            assert (await manager.verify_audit_log()).ok

    asyncio.run(main())


def test_a_transaction_that_fails_midway_leaves_nothing(pg_server: PostgresServer) -> None:
    """A spend refused by a scope, after its agent's period rolled: one transaction, so a
    connection killed inside it (here: a lock it cannot get in time) changes nothing."""
    with StateManager.from_url(pg_server.url(schema="tx"), timeout=TIMEOUT) as manager:
        manager.set_budget("team:tx", limit=1.0)
        agent = AgentId.generate()
        manager.save_agent_state(AgentState(agent, AgentStatus.RUNNING, budget_scopes=("team:tx",)))
        marks = manager.backend.audit_marks()
        with pg_server.connect() as blocker, blocker.transaction():
            # Another client holds the scope's row: the spend locks the agent, then waits for
            # the scope, and gives up after the lock timeout; its transaction rolls back whole.
            blocker.execute('SELECT * FROM "tx".budgets WHERE scope = %s FOR UPDATE', ("team:tx",))
            unavailable_within_timeout(lambda: manager.record_spend(agent, 2))
        state = manager.get_agent_state(agent)
        assert state is not None
        assert state.budget_spent == 0.0
        assert manager.backend.audit_marks() == marks
        with pytest.raises(Exception, match="team:tx"):
            manager.record_spend(agent, 2)  # refused, with its event, once the lock is free
        assert manager.get_budget("team:tx").spent == 0.0  # type: ignore[union-attr]
