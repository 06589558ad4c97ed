"""What only the in-memory store has: its compact column layout, slot reuse and hold heap."""

from __future__ import annotations

import threading
import time

from iron_runtime_state import AgentId, AgentState, AgentStatus, StateManager
from iron_runtime_state.backends.memory import MemoryBackend


def test_removed_slots_are_reused() -> None:
    backend = MemoryBackend()
    manager = StateManager(backend)
    ids = [AgentId.generate() for _ in range(100)]
    for agent_id in ids:
        manager.save_agent_state(AgentState(agent_id, AgentStatus.RUNNING, 1.0, 1, 5.0))
    for agent_id in ids[:50]:
        manager.remove_agent_state(agent_id)
    for _ in range(50):
        manager.save_agent_state(AgentState(AgentId.generate(), AgentStatus.STOPPED))
    assert len(backend._status) == 100  # no growth: the 50 freed slots were taken again
    stats = manager.stats()
    assert (stats.total, stats.running, stats.stopped) == (100, 50, 50)
    assert stats.budget_spent == 50.0
    assert stats.pii_detections == 50
    for agent_id in ids[50:]:
        state = manager.get_agent_state(agent_id)
        assert state == AgentState(agent_id, AgentStatus.RUNNING, 1.0, 1, 5.0)


def test_stats_stay_consistent_under_concurrent_saves_and_removes() -> None:
    manager = StateManager()
    ids = [AgentId.generate() for _ in range(64)]
    stop = threading.Event()

    def churn(offset: int) -> None:
        n = 0
        while not stop.is_set():
            agent_id = ids[(n + offset) % len(ids)]
            if n % 3:
                manager.save_agent_state(AgentState(agent_id, AgentStatus.RUNNING, 2.0, 1))
            else:
                manager.remove_agent_state(agent_id)
            n += 1

    threads = [threading.Thread(target=churn, args=(i * 7,)) for i in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join()
    stats = manager.stats()
    present = list(manager.iter_agent_states())
    assert stats.total == len(present) == len(manager.list_agents())
    assert stats.running == len(present)
    assert stats.budget_spent == 2.0 * len(present)
    assert stats.pii_detections == len(present)


def test_many_open_holds_stay_cheap_and_exact() -> None:
    manager = StateManager()
    agent_id = AgentId.generate()
    manager.save_agent_state(AgentState(agent_id, AgentStatus.RUNNING, budget_limit=1e9))
    holds = [manager.reserve_budget(agent_id, 0.1) for _ in range(5000)]
    assert manager.budget_available(agent_id) == 1e9 - 500.0
    for hold in holds:
        manager.release_reservation(hold)
    assert manager.budget_available(agent_id) == 1e9  # exactly: no rounding left behind


def test_ids_are_rebuilt_exactly_from_the_compact_key() -> None:
    manager = StateManager()
    fixture = AgentId.test_fixture(1)
    manager.save_agent_state(AgentState(fixture, AgentStatus.RUNNING))
    assert manager.list_agents() == ["agent_00000000-0000-0000-0000-000000000001"]
    (state,) = manager.iter_agent_states()
    assert state.agent_id == fixture
