"""The spend ledger and threshold alerts on Redis: what only the Redis store has.

The contract suite (tests/contract/test_ledger.py, test_thresholds.py) checks the rules on every
store. Here: on a Redis Cluster a spend takes steps (backends/redis/spend.py), and a process
killed between any two of them (driven by hand, and a real one killed with SIGKILL) never loses
nor duplicates a ``spend`` record or a ``budget_threshold`` event; the alerted levels the hashes
keep, and their reset when a period rolls; the outbox entries of the new records; and namespaces
written by 0.6.0 (no thresholds, no alerted levels, no ledger), which this version uses as they are.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from iron_runtime_state import AgentId, AgentState, AgentStatus, AuditRecord, Reservation, StateManager
from iron_runtime_state.audit_chain import AuditChain
from iron_runtime_state.backends.redis import RedisLayout
from iron_runtime_state.backends.redis.decode import outbox_event
from iron_runtime_state.backends.redis.trail import TRIM_BATCH
from iron_runtime_state.ledger import SpendNote, SpendQuery, aggregate, entry_of
from iron_runtime_state.thresholds import DEFAULT_THRESHOLDS

from . import test_redis_budgets as budget_tests
from .redis_servers import RedisCluster, redis_available, release_source
from .test_redis_budgets import Target, agent_on, backend_of, drive, expire_pending, scope

pytestmark = pytest.mark.skipif(not redis_available(), reason="redis-server is not installed")

ROOT = Path(__file__).resolve().parents[1]
#: 0.6.0: exact money, scopes and periods in Redis (layout 2), no ledger, no thresholds.
V06 = "8e46e75"
DAY = 86_400.0

# The fixtures of test_redis_budgets: the standalone server then the cluster, a namespace's URL.
target, url, cluster_url = budget_tests.target, budget_tests.url, budget_tests.cluster_url


def details(record: AuditRecord) -> dict[str, Any]:
    found: dict[str, Any] = json.loads(record.event.details)
    return found


def spends(manager: StateManager, agent: AgentId | None = None) -> list[dict[str, Any]]:
    """The details of the ``spend`` records (of one agent)."""
    return [details(r) for r in manager.audit_log(event_type="spend", agent_id=agent)]


def alerts(manager: StateManager) -> Counter[tuple[str | None, float]]:
    """How often each (scope, threshold) was alerted (``None``: an agent's own budget)."""
    found = (details(r) for r in manager.audit_log(event_type="budget_threshold"))
    return Counter((d.get("scope"), d["threshold"]) for d in found)


def assert_ledger_matches(manager: StateManager, agents: list[AgentId], scopes: list[str]) -> None:
    """The ledger sums to what the budgets show as spent, for each agent and each scope."""
    records = manager.audit_log(event_type="spend")
    for agent in agents:
        state = manager.get_agent_state(agent)
        assert state is not None
        assert sum(details(r)["amount"] for r in records if r.event.agent_id == agent) == pytest.approx(
            state.budget_spent
        )
    for name in scopes:
        total = sum(details(r)["amount"] for r in records if name in details(r).get("scopes", ()))
        assert total == pytest.approx(scope(manager, name)[0])
    assert manager.verify_audit_log().ok


NOTE = SpendNote("gpt-x", 100, 20, 5, {"run": "nightly"})


# -- the records, as the scripts queue them ------------------------------------------------------------


def test_a_spend_record_carries_the_call_and_the_agents_labels(url: str) -> None:
    manager = StateManager.from_url(url)
    manager.set_budget("org:a", limit=100.0, thresholds=[0.05])
    agent = agent_on(manager, "org:a", limit=10.0, labels={"team": "support"})
    backend = backend_of(manager)
    chain = manager._chain  # type: ignore[attr-defined]
    backend.record_spend(agent, 6_000_000, time.time(), chain, NOTE)
    hold = manager.reserve_budget(agent, 1.0)
    backend.commit(hold, 500_000, time.time(), chain, SpendNote(tags={"step": "2"}))
    first, second = spends(manager, agent)
    assert first == {
        "amount": 6.0,
        "scopes": ["org:a"],
        "labels": {"team": "support"},
        "model": "gpt-x",
        "input_tokens": 100,
        "output_tokens": 20,
        "cached_input_tokens": 5,
        "tags": {"run": "nightly"},
    }
    assert second == {
        "amount": 0.5,
        "scopes": ["org:a"],
        "labels": {"team": "support"},
        "reservation": hold.reservation_id,
        "tags": {"step": "2"},
    }
    assert alerts(manager) == {(None, 0.5): 1, ("org:a", 0.05): 1}
    assert_ledger_matches(manager, [agent], ["org:a"])
    manager.close()


def test_alerted_levels_live_in_the_hashes_and_a_period_roll_clears_them(
    target: Target, url: str, ns: str
) -> None:
    manager = StateManager.from_url(url)
    backend = backend_of(manager)
    chain = AuditChain()
    start = time.time()
    manager.set_budget("team:p", limit=10.0, period="day")
    agent = agent_on(manager, "team:p", limit=10.0, budget_period="day")
    layout = RedisLayout(ns)
    agent_key = layout.agent_key(agent)
    scope_key = layout.budgets.scope + "team:p"
    client = target.client()
    backend.record_spend(agent, 6_000_000, start, chain)
    assert client.hget(agent_key, "alerted") == client.hget(scope_key, "alerted") == b"0.5"
    backend.record_spend(agent, 3_000_000, start, chain)
    assert client.hget(agent_key, "alerted") == client.hget(scope_key, "alerted") == b"0.8"
    result = backend.record_spend(agent, 1_000_000, start + DAY, chain)  # the next day: both roll
    assert result.state.budget_spent == 1.0
    assert client.hget(agent_key, "alerted") is None
    assert client.hget(scope_key, "alerted") is None
    backend.record_spend(agent, 4_000_000, start + DAY, chain)  # 50% again, in the new period
    assert alerts(manager) == {(None, 0.5): 2, (None, 0.8): 1, ("team:p", 0.5): 2, ("team:p", 0.8): 1}
    state = manager.get_agent_state(agent)
    assert state is not None
    manager.save_agent_state(state)  # a save keeps the agent's alerted level
    assert client.hget(agent_key, "alerted") == b"0.5"
    manager.set_budget("team:p", limit=20.0, period="day")  # same period: the level stays
    assert client.hget(scope_key, "alerted") == b"0.5"
    manager.set_budget("team:p", limit=20.0, period="week")  # another period: it starts again
    assert client.hget(scope_key, "alerted") is None
    assert manager.verify_audit_log().ok
    manager.close()


def test_thresholds_are_stored_as_text_and_read_back(target: Target, url: str, ns: str) -> None:
    manager = StateManager.from_url(url)
    layout = RedisLayout(ns)
    client = target.client()
    budget = manager.set_budget("team:t", limit=1.0, thresholds=[0.25, 0.9])
    assert budget.thresholds == (0.25, 0.9)
    assert client.hget(layout.budgets.scope + "team:t", "thresholds") == b"0.25,0.9"
    manager.set_budget("team:t", limit=1.0, thresholds=[])
    assert client.hget(layout.budgets.scope + "team:t", "thresholds") == b""  # none
    got = manager.get_budget("team:t")
    assert got is not None
    assert got.thresholds == ()
    manager.set_budget("team:t", limit=1.0)
    assert client.hget(layout.budgets.scope + "team:t", "thresholds") is None  # the default
    state = AgentState(AgentId.generate(), AgentStatus.RUNNING, budget_limit=1.0, budget_thresholds=())
    manager.save_agent_state(state)
    assert client.hget(layout.agent_key(state.agent_id), "thresholds") == b""
    read = manager.get_agent_state(state.agent_id)
    assert read is not None
    assert read.budget_thresholds == ()
    read.budget_thresholds = DEFAULT_THRESHOLDS
    manager.save_agent_state(read)
    assert client.hget(layout.agent_key(state.agent_id), "thresholds") is None
    manager.close()


def test_outbox_entries_of_the_ledger_read_as_the_events_the_other_stores_write() -> None:
    agent = AgentId.generate()
    charge = [b"kind", b"charge", b"agent", agent.as_str().encode(), b"at", b"1750000000.5",
              b"amount", b"1500000", b"scopes", b"org:a,team:b", b"labels", b'{"team":"x"}',
              b"reservation", b"", b"note", b'{"model":"m","input_tokens":1,"output_tokens":2,'
              b'"cached_input_tokens":0,"tags":{"k":"v"}}']  # fmt: skip
    event = outbox_event(charge)
    assert (event.event_type, event.timestamp) == ("spend", 1750000000)
    assert json.loads(event.details) == {
        "amount": 1.5,
        "scopes": ["org:a", "team:b"],
        "labels": {"team": "x"},
        "model": "m",
        "input_tokens": 1,
        "output_tokens": 2,
        "cached_input_tokens": 0,
        "tags": {"k": "v"},
    }
    threshold = [b"kind", b"threshold", b"agent", agent.as_str().encode(), b"at", b"1750000000.5",
                 b"threshold", b"0.8", b"limit", b"10000000", b"spent", b"8000000",
                 b"start", b"1749945600.0", b"scope", b""]  # fmt: skip
    event = outbox_event(threshold)
    assert event.event_type == "budget_threshold"
    assert json.loads(event.details) == {
        "threshold": 0.8,
        "limit": 10.0,
        "spent": 8.0,
        "period_start": 1749945600,
    }


def test_spend_totals_read_only_the_ledger(url: str) -> None:
    """The store answers reports from the trail's index of ``spend`` records (by type and time),
    through the sync and the asyncio backend alike, as ``ledger.aggregate`` would."""
    manager = StateManager.from_url(url)
    manager.set_budget("org:r", limit=None)
    a = agent_on(manager, "org:r", labels={"team": "a"})
    b = agent_on(manager)
    for i in range(30):
        manager.record_spend(a if i % 3 else b, 0.25, tags={"i": str(i % 2)})
        manager.record_pii_detection(b, 1)  # records of other types, passed over
    query = SpendQuery(keys=("agent", "scope", "tag:i"))
    expected = aggregate(map(entry_of, manager.audit_log(event_type="spend")), query)
    got = manager.backend.spend_totals(query)
    assert sorted((t.key, t.amount, t.calls) for t in got) == sorted(
        (t.key, t.amount, t.calls) for t in expected
    )
    assert sum(t.amount for t in got) == 7_500_000
    manager.close()


# -- a Redis Cluster: two round trips a spend, the outbox trimmed by the group's next change -------


def outbox_len(cluster: RedisCluster, backend: Any, *groups: int) -> int:
    """Entries in the outboxes of ``groups`` (every group's when none), read past the library."""
    client = cluster.client()
    keys = backend.layout.group_keys
    return sum(int(client.xlen(keys[g].outbox)) for g in (groups or range(len(keys))))


def test_a_spend_on_a_cluster_takes_two_round_trips_and_the_next_change_trims(
    redis_cluster: RedisCluster, cluster_url: str
) -> None:
    """The change script, then the append; the entry that landed is trimmed by the group's next
    change script (no third command), and by the sweep of an audit read. A second process that
    meets entries landed but not trimmed appends nothing twice."""
    manager = StateManager.from_url(cluster_url)
    backend = backend_of(manager)
    chain = manager._chain  # type: ignore[attr-defined]
    agent = agent_on(manager)
    group = backend.layout.group_of(agent.as_str())
    manager.record_spend(agent, 0.5)  # the first write sweeps every outbox
    for _ in range(5):
        result, requests = drive(backend, backend.ops.record_spend(agent, 250_000, time.time(), chain))
        assert len(requests) == 2, requests  # record_spend.lua, append_audit.lua
        assert [r.event.event_type for r in result.records] == ["spend"]
        assert outbox_len(redis_cluster, backend, group) == 1  # this one, trimmed by the next change
    hold, requests = drive(backend, backend.ops.reserve(agent, 1_000_000, 60.0, time.time(), "r" * 32, chain))
    assert len(requests) == 1
    result, requests = drive(backend, backend.ops.commit(hold, 500_000, time.time(), chain))
    assert len(requests) == 2
    assert outbox_len(redis_cluster, backend, group) == 1
    other = StateManager.from_url(cluster_url)  # meets the entry landed but not trimmed
    other.record_spend(agent, 0.25)
    manager.record_spend(agent, 0.25)  # and this one meets the other's
    assert [s["amount"] for s in spends(manager, agent)] == [0.5, *[0.25] * 5, 0.5, 0.25, 0.25]
    assert outbox_len(redis_cluster, backend) == 0  # the audit read swept and trimmed
    assert_ledger_matches(manager, [agent], [])
    other.close()
    manager.close()


def test_landed_entries_of_groups_that_see_no_further_change_are_trimmed_in_batches(
    redis_cluster: RedisCluster, cluster_url: str
) -> None:
    """Outboxes whose groups this store object changes no more keep at most ``TRIM_BATCH - 1``
    landed entries between them: then they are all trimmed in one pipelined batch."""
    manager = StateManager.from_url(cluster_url)
    backend = backend_of(manager)
    by_group: dict[int, AgentId] = {}
    while len(by_group) < TRIM_BATCH + 8:
        state = AgentState(AgentId.generate(), AgentStatus.RUNNING)
        by_group.setdefault(backend.layout.group_of(state.agent_id.as_str()), state.agent_id)
    manager.save_agent_states([AgentState(a, AgentStatus.RUNNING) for a in by_group.values()])
    most = 0
    for agent in by_group.values():
        manager.record_spend(agent, 0.5)
        most = max(most, outbox_len(redis_cluster, backend))
    assert most == TRIM_BATCH - 1
    assert outbox_len(redis_cluster, backend) == 8
    assert len(spends(manager)) == len(by_group)
    assert outbox_len(redis_cluster, backend) == 0
    manager.close()


# -- a Redis Cluster: a process killed between the steps of a spend -------------------------------


@pytest.mark.parametrize("killed_after", ["record_spend", "scope_spend", "settle_pending", "append_audit"])
def test_a_spend_killed_between_its_steps_loses_and_duplicates_nothing(
    redis_cluster: RedisCluster, cluster_url: str, ns: str, killed_after: str
) -> None:
    """Killed after the agent's first step (nothing charged: the next call drops the pending
    hold), after the scopes' step (the scopes' alerts wait in the budgets outbox; the next call
    charges the agent, with the spend's record and note), after the agent's charge (its record
    waits in the group's outbox), or after the first append: each record and alert reaches the
    trail exactly once."""
    manager = StateManager.from_url(cluster_url)
    backend = backend_of(manager)
    manager.set_budget("team:k", limit=10.0)
    agent = agent_on(manager, "team:k", limit=10.0)
    op = backend.ops.record_spend(agent, 6_000_000, time.time(), AuditChain(), NOTE)
    drive(backend, op, stop_after=killed_after)
    expire_pending(redis_cluster, ns, agent)
    later = StateManager.from_url(cluster_url)  # a restarted process: its first write sweeps
    later.record_spend(agent, 1.0)  # resolves the expired pending hold first
    charged = killed_after != "record_spend"
    assert [s["amount"] for s in spends(later, agent)] == ([6.0, 1.0] if charged else [1.0])
    if charged:
        assert spends(later, agent)[0]["model"] == "gpt-x"  # the note went through the pending hold
        assert alerts(later) == {(None, 0.5): 1, ("team:k", 0.5): 1}
    else:
        assert alerts(later) == {}
    assert_ledger_matches(later, [agent], ["team:k"])
    later.close()
    manager.close()


@pytest.mark.parametrize("killed_after", ["commit", "scope_settle"])
def test_a_commit_killed_between_its_steps_loses_and_duplicates_nothing(
    cluster_url: str, killed_after: str
) -> None:
    """Killed after the agent's step (charged, its record queued; the scopes' hold expires and
    the next call on the scopes charges it, with their alerts) or after the scopes' step."""
    manager = StateManager.from_url(cluster_url)
    backend = backend_of(manager)
    manager.set_budget("org:k", limit=10.0)
    manager.set_budget("team:k", limit=10.0, thresholds=[0.5, 1.0])
    agent = agent_on(manager, "org:k", "team:k", limit=10.0)
    other = agent_on(manager, "org:k", "team:k")
    hold = manager.reserve_budget(agent, 5.0, ttl=1.0)
    drive(backend, backend.ops.commit(hold, 6_000_000, time.time(), AuditChain(), NOTE), killed_after)
    time.sleep(1.2)  # the scopes' hold expires (when the scopes' step never ran)
    later = StateManager.from_url(cluster_url)
    later.record_spend(other, 1.0)  # settles the expired scope hold first
    assert [s["amount"] for s in spends(later, agent)] == [6.0]
    assert spends(later, agent)[0]["reservation"] == hold.reservation_id
    assert scope(later, "org:k") == scope(later, "team:k") == (7.0, 0.0)
    assert alerts(later) == {(None, 0.5): 1, ("org:k", 0.5): 1, ("team:k", 0.5): 1}
    assert_ledger_matches(later, [agent, other], ["org:k", "team:k"])
    later.close()
    manager.close()


#: The worker of test_redis_budgets, spending with tags.
KILLED_BETWEEN_STEPS = budget_tests.KILLED_BETWEEN_STEPS.replace(
    "manager.record_spend(agent, 4.0)", 'manager.record_spend(agent, 8.0, tags={"job": "killed"})'
)


def test_a_process_killed_between_the_steps_of_a_spend_for_real(
    redis_cluster: RedisCluster, cluster_url: str, ns: str
) -> None:
    """A real process, SIGKILLed right after the scopes' step: the scopes' alerts are in the
    trail once the next writer sweeps, and the spend's record, with its tags, once the agent is
    charged by the next call on it."""
    manager = StateManager.from_url(cluster_url)
    manager.set_budget("org:real", limit=10.0)
    agent = agent_on(manager, "org:real", limit=10.0)
    worker = subprocess.Popen(
        [sys.executable, "-c", KILLED_BETWEEN_STEPS, cluster_url, agent.as_str()],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    assert worker.stdout is not None
    assert worker.stdout.readline().strip() == "between steps"
    worker.send_signal(signal.SIGKILL)
    worker.wait(10)
    later = StateManager.from_url(cluster_url)
    other = agent_on(later)
    later.record_spend(other, 1.0)  # a first write: sweeps every outbox
    assert alerts(later) == {("org:real", 0.5): 1, ("org:real", 0.8): 1}
    assert spends(later, agent) == []  # the agent is not charged yet: no record
    expire_pending(redis_cluster, ns, agent)
    later.record_spend(agent, 1.0)
    assert spends(later, agent) == [
        {"amount": 8.0, "scopes": ["org:real"], "tags": {"job": "killed"}},
        {"amount": 1.0, "scopes": ["org:real"]},
    ]
    assert alerts(later) == {("org:real", 0.5): 1, ("org:real", 0.8): 1, (None, 0.5): 1, (None, 0.8): 1}
    assert_ledger_matches(later, [agent], ["org:real"])
    later.close()
    manager.close()


# -- namespaces written by 0.6.0 ----------------------------------------------------------------------

V06_WRITER = """
import sys
from iron_runtime_state import AgentId, AgentState, AgentStatus, StateManager
manager = StateManager.from_url(sys.argv[1])
manager.set_budget("team:old", limit=10.0, period="month")
a, b = AgentId.generate(), AgentId.generate()
manager.save_agent_state(AgentState(a, AgentStatus.RUNNING, budget_limit=10.0, labels={"env": "prod"},
                                    budget_scopes=("team:old",), budget_period="day"))
manager.save_agent_state(AgentState(b, AgentStatus.RUNNING, budget_limit=4.0))
manager.record_spend(a, 6.0)  # past 50%: 0.6 wrote no alert and no ledger record
manager.record_spend(b, 1.0)
hold = manager.reserve_budget(a, 1.0, ttl=600)
print(a.as_str(), b.as_str(), hold.reservation_id, hold.expires_at)
"""


@pytest.fixture(scope="module")
def v06_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package as it was at 0.6.0, from this repository's history."""
    return release_source(tmp_path_factory.mktemp("v06"), V06, "0.6.0")


def test_a_namespace_written_by_0_6_works_as_it_is(url: str, v06_source: Path) -> None:
    """0.6.0 kept no thresholds, alerted levels nor ledger: its agents and scopes read with the
    default thresholds and nothing alerted, its holds commit, and the ledger starts with the
    first spend this version settles; no migration."""
    env = {**os.environ, "PYTHONPATH": str(v06_source)}
    done = subprocess.run(
        [sys.executable, "-c", V06_WRITER, url], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr
    a_text, b_text, rid, expires = done.stdout.split()
    a, b = AgentId.parse(a_text), AgentId.parse(b_text)
    manager = StateManager.from_url(url)
    state = manager.get_agent_state(a)
    assert state is not None
    assert (state.budget_spent, state.budget_thresholds, state.labels) == (
        6.0,
        DEFAULT_THRESHOLDS,
        {"env": "prod"},
    )
    budget = manager.get_budget("team:old")
    assert budget is not None
    assert (budget.spent, budget.held, budget.thresholds) == (6.0, 1.0, DEFAULT_THRESHOLDS)
    assert manager.backend.migrate().endswith("nothing to migrate")
    assert spends(manager) == []
    hold = Reservation._trusted(rid, a, 1.0, float(expires), ("team:old",))
    manager.commit_reservation(hold, 1.0)  # a hold 0.6 made: 7.0 of 10, past 50% (not alerted yet)
    manager.record_spend(b, 1.0)  # 2.0 of 4: 50%
    assert [s["amount"] for s in spends(manager)] == [1.0, 1.0]
    assert alerts(manager) == {(None, 0.5): 2, ("team:old", 0.5): 1}
    report = manager.spend_report(group_by=("agent",))
    assert sorted(row.amount for row in report) == [1.0, 1.0]  # the ledger starts with this version
    assert manager.verify_audit_log().ok
    manager.close()
