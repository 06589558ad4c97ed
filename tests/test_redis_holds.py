"""Holds that lapse unsettled on Redis: one ``hold_expired`` record each, written by the next
write on the agent, on a standalone server and on a Redis Cluster.

The contract suite (tests/contract/test_hold_expired.py) checks the rule on every store. Here:
what only Redis has. Holds expire by the server's clock, and the agent's holds set keeps no
expiry of its own, so a hold that lapsed long before the next write is still reported; the
events travel through the group's outbox like any change's; on a cluster a hold's copy on a
scope (settled in the budgets slot, see backends/redis/spend.py) writes no event of its own; and
a watcher blocked in ``XREAD BLOCK`` counts the record (``iron_state_holds_expired_total``).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import pytest

from iron_runtime_state import (
    AgentId,
    AgentState,
    AgentStatus,
    AuditRecord,
    BudgetExceeded,
    ReservationError,
    StateManager,
)
from iron_runtime_state.backends.redis import RedisLayout

from .redis_servers import RedisCluster, RedisServer, redis_available

pytestmark = pytest.mark.skipif(not redis_available(), reason="redis-server is not installed")

TTL = 0.2
#: Longer than the second a holds set once kept after its last hold: the lapse is still reported.
LAPSE = 1.5


@pytest.fixture(params=["redis", "redis-cluster"])
def target(request: pytest.FixtureRequest) -> RedisServer | RedisCluster:
    """The session's standalone server, then its cluster."""
    name = "redis_server" if request.param == "redis" else "redis_cluster"
    found: RedisServer | RedisCluster = request.getfixturevalue(name)
    return found


@pytest.fixture
def manager(target: RedisServer | RedisCluster, ns: str) -> Iterator[StateManager]:
    found = StateManager.from_url(f"{target.url}?namespace={ns}")
    yield found
    found.close()


def agent_on(manager: StateManager, *scopes: str, limit: float | None = 10.0) -> AgentId:
    agent = AgentId.generate()
    manager.save_agent_state(AgentState(agent, AgentStatus.RUNNING, budget_limit=limit, budget_scopes=scopes))
    return agent


def lapsed(manager: StateManager, agent: AgentId | None = None) -> list[AuditRecord]:
    return manager.audit_log(agent_id=agent, event_type="hold_expired")


def test_each_lapse_is_written_once_by_the_next_write_and_reads_write_nothing(
    manager: StateManager,
) -> None:
    manager.set_budget("team:x", limit=100.0)
    agent = agent_on(manager, "team:x")
    gone = manager.reserve_budget(agent, 3.0, ttl=TTL)
    committed = manager.reserve_budget(agent, 1.0, ttl=TTL)
    released = manager.reserve_budget(agent, 1.0, ttl=TTL)
    manager.commit_reservation(committed, 1.0)
    manager.release_reservation(released)
    time.sleep(LAPSE)
    # Reads see the hold gone and write nothing.
    assert manager.budget_available(agent) == 9.0
    assert manager.get_budget("team:x").held == 0.0  # type: ignore[union-attr]
    manager.list_budgets()
    manager.get_agent_state(agent)
    assert lapsed(manager) == []
    before = manager.audit_checkpoint().seq
    result = manager.record_spend(agent, 1.0)
    assert result.budget_spent == 2.0
    (record,) = lapsed(manager)
    assert record.seq == before + 1  # appended by the spend, in the same call
    assert record.agent_id == agent
    details = json.loads(record.details)
    assert details == {
        "amount": 3.0,
        "expires_at": int(gone.expires_at),
        "reservation": gone.reservation_id,
        "scopes": ["team:x"],
    }
    manager.record_spend(agent, 1.0)
    manager.reserve_budget(agent, 1.0)
    assert len(lapsed(manager)) == 1  # never twice
    assert manager.verify_audit_log().ok


def test_a_hold_that_lapsed_goes_with_the_first_reserve_commit_or_refusal(manager: StateManager) -> None:
    # By a reserve.
    agent = agent_on(manager)
    manager.reserve_budget(agent, 2.0, ttl=TTL)
    time.sleep(TTL + 0.3)
    manager.reserve_budget(agent, 1.0)
    assert len(lapsed(manager, agent)) == 1
    # By a refused spend: its event comes after the lapse's.
    agent = agent_on(manager, limit=5.0)
    manager.reserve_budget(agent, 2.0, ttl=TTL)
    time.sleep(TTL + 0.3)
    with pytest.raises(BudgetExceeded):
        manager.record_spend(agent, 6.0)
    kinds = [r.event_type for r in manager.audit_log(agent_id=agent)]
    assert kinds == ["hold_expired", "budget_exceeded"]
    # By a commit of another hold.
    agent = agent_on(manager)
    manager.reserve_budget(agent, 2.0, ttl=TTL)
    kept = manager.reserve_budget(agent, 1.0, ttl=60)
    time.sleep(TTL + 0.3)
    manager.commit_reservation(kept, 1.0)
    assert len(lapsed(manager, agent)) == 1


def test_committing_a_lapsed_hold_reports_it_once_and_refuses(manager: StateManager) -> None:
    agent = agent_on(manager)
    hold = manager.reserve_budget(agent, 2.0, ttl=TTL)
    time.sleep(TTL + 0.3)
    with pytest.raises(ReservationError):
        manager.commit_reservation(hold, 2.0)
    (record,) = lapsed(manager, agent)
    assert json.loads(record.details)["reservation"] == hold.reservation_id
    with pytest.raises(ReservationError):
        manager.commit_reservation(hold, 2.0)
    manager.record_spend(agent, 1.0)
    assert len(lapsed(manager, agent)) == 1
    assert manager.get_agent_state(agent).budget_spent == 1.0  # type: ignore[union-attr]


def test_releasing_a_lapsed_hold_leaves_it_for_the_next_write(manager: StateManager) -> None:
    agent = agent_on(manager)
    hold = manager.reserve_budget(agent, 2.0, ttl=TTL)
    time.sleep(TTL + 0.3)
    with pytest.raises(ReservationError):
        manager.release_reservation(hold)
    assert lapsed(manager, agent) == []  # a release writes no event ...
    manager.record_spend(agent, 1.0)
    assert len(lapsed(manager, agent)) == 1  # ... the next spend does


def test_settled_holds_never_produce_one(manager: StateManager) -> None:
    manager.set_budget("team:y", limit=100.0)
    agent = agent_on(manager, "team:y")
    for _ in range(3):
        manager.commit_reservation(manager.reserve_budget(agent, 1.0, ttl=TTL), 1.0)
        manager.release_reservation(manager.reserve_budget(agent, 1.0, ttl=TTL))
    time.sleep(TTL + 0.3)
    manager.record_spend(agent, 1.0)
    manager.reserve_budget(agent, 1.0)
    assert lapsed(manager) == []


def test_concurrent_writers_report_a_lapse_once(manager: StateManager) -> None:
    agent = agent_on(manager, limit=1000.0)
    manager.reserve_budget(agent, 5.0, ttl=TTL)
    time.sleep(TTL + 0.3)
    errors: list[BaseException] = []

    def spend() -> None:
        try:
            for _ in range(5):
                manager.record_spend(agent, 1.0)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=spend) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert len(lapsed(manager, agent)) == 1
    assert manager.get_agent_state(agent).budget_spent == 40.0  # type: ignore[union-attr]


def test_the_agents_holds_set_keeps_no_expiry(
    manager: StateManager, target: RedisServer | RedisCluster, ns: str
) -> None:
    agent = agent_on(manager)
    manager.reserve_budget(agent, 1.0, ttl=TTL)
    key = RedisLayout(ns).agent_keys(agent)["holds"]
    client = target.client()
    assert client.pttl(key) == -1
    time.sleep(LAPSE)
    assert client.zcard(key) == 1  # lapsed, kept for the next write to report
    manager.record_spend(agent, 1.0)
    assert client.exists(key) == 0
    assert len(lapsed(manager, agent)) == 1


def test_on_a_cluster_the_scope_copy_writes_no_event(redis_cluster: RedisCluster, ns: str) -> None:
    manager = StateManager.from_url(f"{redis_cluster.url}?namespace={ns}")
    try:
        manager.set_budget("org:z", limit=100.0)
        agent = agent_on(manager, "org:z")
        other = agent_on(manager, "org:z")
        manager.reserve_budget(agent, 4.0, ttl=TTL)
        time.sleep(TTL + 0.3)
        # Another agent's spend on the scope settles the lapsed hold's copy there (asking the
        # agent's slot): no event. The agent's own next write reports the hold: one event.
        manager.record_spend(other, 1.0)
        assert lapsed(manager) == []
        manager.record_spend(agent, 1.0)
        manager.record_spend(other, 1.0)
        manager.reserve_budget(other, 1.0)
        (record,) = lapsed(manager)
        assert record.agent_id == agent
        assert manager.get_budget("org:z").spent == 3.0  # type: ignore[union-attr]
        assert manager.get_budget("org:z").held == 1.0  # type: ignore[union-attr]
    finally:
        manager.close()


def test_a_watching_counter_counts_each_lapse_once(manager: StateManager) -> None:
    pytest.importorskip("prometheus_client")
    from iron_runtime_state.metrics import TrailCounters, follow_trail

    counters = TrailCounters(after_seq=manager.audit_checkpoint().seq)
    stop = threading.Event()
    follower = threading.Thread(target=follow_trail, args=(manager, counters, stop), daemon=True)
    follower.start()
    try:
        agent = agent_on(manager)
        for _ in range(3):
            manager.reserve_budget(agent, 1.0, ttl=TTL)
        time.sleep(TTL + 0.3)
        manager.record_spend(agent, 1.0)
        manager.record_spend(agent, 1.0)
        deadline = time.monotonic() + 5
        while counters.snapshot()[1].get(("holds_expired", ""), 0) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)
        assert counters.snapshot()[1].get(("holds_expired", "")) == 3
    finally:
        stop.set()
        follower.join(5)
