"""Budget scopes, periods, labels and exact money on Redis: what only the Redis store has.

The contract suite (tests/contract/) checks the rules through both managers on every store. Here:
the script protocol that rolls periods (Lua knows no time zones), the steps a spend takes on a
Redis Cluster and how a crash between any two of them is recovered (steps driven by hand, and a
real process killed with SIGKILL between two of them), processes killed at random while spending
from shared scopes, the label sets, and namespaces written by 0.4 and 0.5 (migrated by
``migrate()``). See backends/redis/spend.py and docs/redis.md for the design.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from iron_runtime_state import (
    AgentId,
    AgentState,
    AgentStatus,
    BudgetExceeded,
    SchemaError,
    StateManager,
)
from iron_runtime_state.audit_chain import AuditChain
from iron_runtime_state.backends.redis import RedisBackend, RedisLayout, load_scripts
from iron_runtime_state.backends.redis.decode import LATE, outbox_event
from iron_runtime_state.backends.redis.ops import Call, Op
from iron_runtime_state.periods import bounds

from .redis_servers import RedisCluster, RedisServer, redis_available, release_source

pytestmark = pytest.mark.skipif(not redis_available(), reason="redis-server is not installed")

Target = RedisServer | RedisCluster
ROOT = Path(__file__).resolve().parents[1]
#: The last commit of 0.5 (money as floats in Redis, layout 1).
V05 = "71c1d72"
DAY = 86_400.0


@pytest.fixture(params=["redis", "redis-cluster"])
def target(request: pytest.FixtureRequest) -> Target:
    """The session's standalone server, then its cluster."""
    name = "redis_server" if request.param == "redis" else "redis_cluster"
    found: Target = request.getfixturevalue(name)
    return found


@pytest.fixture
def url(target: Target, ns: str) -> str:
    return f"{target.url}?namespace={ns}"


def backend_of(manager: StateManager) -> RedisBackend:
    backend = manager.backend
    assert isinstance(backend, RedisBackend)
    return backend


def agent_on(manager: StateManager, *scopes: str, limit: float | None = None, **fields: Any) -> AgentId:
    state = AgentState(
        AgentId.generate(), AgentStatus.RUNNING, budget_limit=limit, budget_scopes=scopes, **fields
    )
    manager.save_agent_state(state)
    return state.agent_id


def runs(name: str) -> Callable[[Any], bool]:
    """Whether a request runs the named Lua script."""
    sha = load_scripts()[name].sha
    return lambda request: isinstance(request, Call) and request.command[:2] == ("EVALSHA", sha)


def drive(backend: RedisBackend, op: Op[Any], stop_after: str | None = None) -> tuple[Any, list[Any]]:
    """Run ``op`` request by request; with ``stop_after``, drop it right after the first run of that
    script (what a process killed there leaves). Returns its result (``None`` when dropped) and the
    requests it made."""
    backend.stats()  # the namespace check, done first
    requests: list[Any] = []
    reply = None
    while True:
        try:
            request = op.send(reply)
        except StopIteration as stop:
            return stop.value, requests
        requests.append(request)
        reply = backend._do(request)
        if stop_after is not None and runs(stop_after)(request):
            op.close()
            return None, requests


def scope(manager: StateManager, name: str) -> tuple[float, float]:
    """A scope's spent and held."""
    budget = manager.get_budget(name)
    assert budget is not None
    return budget.spent, budget.held


def expire_pending(target: Target, ns: str, agent: AgentId) -> None:
    """Make the agent's pending holds (cluster spends under way) expired now, as time would."""
    key = RedisLayout(ns).keys_of(agent).pending + agent.as_str()
    client = target.client()
    for member in client.zrange(key, 0, -1):
        client.zadd(key, {member: 1.0}, xx=True)


# -- the period protocol --------------------------------------------------------------------------


def test_a_script_asks_for_the_new_periods_and_changes_nothing_until_it_gets_them(
    target: Target, url: str
) -> None:
    """Lua knows no time zones: a script that finds a period ended replies ROLL (name, period, zone
    and period_start of each budget), changes nothing and keeps nothing under its op key, and the
    client runs the same call again with the new bounds computed in Python."""
    then = 1_750_000_000.0
    clock = [then]
    manager = StateManager.from_url(url, clock=lambda: clock[0])
    backend = backend_of(manager)
    manager.set_budget("team:tz", limit=100.0, period="day", tz="Asia/Tokyo")
    agent = agent_on(manager, "team:tz", limit=50.0, budget_period="week", budget_tz="America/New_York")
    manager.record_spend(agent, 3.0)
    clock[0] = then + 8 * DAY
    op = backend.ops.record_spend(agent, 1_000_000, clock[0], AuditChain())
    backend.stats()  # the namespace check, done first
    request = op.send(None)
    while not runs("record_spend")(request):
        request = op.send(backend._do(request))
    reply = backend._do(request)
    assert reply[0] == -10  # ROLL
    asked = {reply[i].decode(): reply[i + 1 : i + 4] for i in range(1, len(reply), 4)}
    assert asked[""][:2] == [b"week", b"America/New_York"]
    if isinstance(target, RedisServer):  # one script: the scopes are asked for too
        assert asked["team:tz"][:2] == [b"day", b"Asia/Tokyo"]
    op_key = request.command[3 + 5]  # KEYS[6]
    assert target.client().exists(op_key) == 0  # not kept: the run again is the real one
    assert backend.get(agent.as_str()).budget_spent == 3.0  # type: ignore[union-attr]  # as stored
    while True:
        try:
            request = op.send(reply)
        except StopIteration as stop:
            result = stop.value
            break
        reply = backend._do(request)
    resets = [json.loads(r.event.details) for r in result.records if r.event.event_type == "budget_reset"]
    assert sorted(r.get("scope", "") for r in resets) == ["", "team:tz"]
    assert resets[0]["spent"] == 3.0
    week = bounds(clock[0], "week", "America/New_York")[0]
    assert (result.state.period_start, result.state.budget_spent) == (week, 1.0)
    assert target.client().exists(op_key) == 1
    manager.close()


def test_processes_racing_past_a_boundary_write_one_reset_per_budget(url: str) -> None:
    """Eight store objects (eight connection pools, as eight processes) spend at once after a day
    ended: exactly one budget_reset for the agent and one for its scope, and every spend counts."""
    then = 1_750_000_000.0
    first = StateManager.from_url(url, clock=lambda: then)
    first.set_budget("team:race", limit=1000.0, period="day")
    agent = agent_on(first, "team:race", limit=1000.0, budget_period="day")
    first.record_spend(agent, 5.0)
    later = then + DAY
    managers = [StateManager.from_url(url, clock=lambda: later) for _ in range(8)]
    barrier = threading.Barrier(len(managers))

    def spend(manager: StateManager) -> None:
        barrier.wait()
        for _ in range(5):
            manager.record_spend(agent, 1.0)

    threads = [threading.Thread(target=spend, args=(m,)) for m in managers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    resets = [json.loads(r.event.details) for r in first.audit_log(event_type="budget_reset")]
    assert sorted(r.get("scope", "") for r in resets) == ["", "team:race"]
    assert all(r["spent"] == 5.0 for r in resets)
    state = managers[0].get_agent_state(agent)
    assert state is not None
    assert state.budget_spent == 40.0
    assert scope(managers[0], "team:race") == (40.0, 0.0)
    for manager in (first, *managers):
        manager.close()


# -- a cluster's steps, and a crash between any two ---------------------------------------------------


@pytest.fixture
def cluster_url(redis_cluster: RedisCluster, ns: str) -> str:
    return f"{redis_cluster.url}?namespace={ns}"


def test_a_spend_killed_after_the_agents_step_charges_nothing(
    redis_cluster: RedisCluster, cluster_url: str, ns: str
) -> None:
    """Killed after the agent's step: the pending hold counts as held until it expires; the next
    call resolves it (the scopes' step never ran: fenced off, and dropped), and the step, if it
    comes after all, changes nothing."""
    manager = StateManager.from_url(cluster_url)
    backend = backend_of(manager)
    manager.set_budget("org:a", limit=10.0)
    manager.set_budget("team:a", limit=10.0)
    agent = agent_on(manager, "org:a", "team:a", limit=10.0)
    op = backend.ops.record_spend(agent, 4_000_000, time.time(), AuditChain())
    assert drive(backend, op, stop_after="record_spend")[0] is None
    assert manager.budget_available(agent) == 6.0  # held by the pending spend
    assert scope(manager, "org:a") == (0.0, 0.0)
    expire_pending(redis_cluster, ns, agent)
    manager.record_spend(agent, 1.0)  # resolves the expired pending hold first
    state = manager.get_agent_state(agent)
    assert state is not None
    assert state.budget_spent == 1.0
    assert manager.budget_available(agent) == 9.0
    assert scope(manager, "org:a") == scope(manager, "team:a") == (1.0, 0.0)
    manager.close()


def test_a_late_scope_step_after_its_pending_hold_was_resolved_changes_nothing(
    redis_cluster: RedisCluster, cluster_url: str, ns: str
) -> None:
    manager = StateManager.from_url(cluster_url)
    backend = backend_of(manager)
    manager.set_budget("team:late", limit=10.0)
    agent = agent_on(manager, "team:late")
    requests = drive(
        backend, backend.ops.record_spend(agent, 4_000_000, time.time(), AuditChain()), "record_spend"
    )[1]
    killed_op = requests[-1].command[-3]  # record_spend.lua's ARGV (no rolls) end: op id, note, trim point
    expire_pending(redis_cluster, ns, agent)
    manager.record_spend(agent, 1.0)  # resolves: the killed spend's step gets a LATE reply in its place
    b = backend.layout.budgets
    script = load_scripts()["scope_spend"]
    reply = backend._do(
        Call(
            b.slot,
            (
                "EVALSHA",
                script.sha,
                2,
                b.outbox,
                b.op + killed_op,
                "spend",
                "4000000",
                repr(time.time()),
                agent.as_str(),
                60_000,
                b.prefix,
                repr(time.time() + 60),
                "",
                "",
                "team:late",
                "",  # the outbox's trim point: none
            ),
            True,
            "scope step",
        )
    )
    assert reply == [LATE]
    assert scope(manager, "team:late") == (1.0, 0.0)
    manager.close()


def test_a_spend_killed_after_the_scopes_step_is_charged_to_the_agent_by_the_next_call(
    redis_cluster: RedisCluster, cluster_url: str, ns: str
) -> None:
    manager = StateManager.from_url(cluster_url)
    backend = backend_of(manager)
    manager.set_budget("org:b", limit=10.0)
    agent = agent_on(manager, "org:b", limit=10.0)
    op = backend.ops.record_spend(agent, 4_000_000, time.time(), AuditChain())
    drive(backend, op, stop_after="scope_spend")
    assert scope(manager, "org:b") == (4.0, 0.0)
    assert manager.budget_available(agent) == 6.0  # pending: held, not yet spent
    expire_pending(redis_cluster, ns, agent)
    manager.record_spend(agent, 1.0)
    state = manager.get_agent_state(agent)
    assert state is not None
    assert state.budget_spent == 5.0
    assert scope(manager, "org:b") == (5.0, 0.0)
    assert manager.stats().budget_spent == 5.0
    manager.close()


@pytest.mark.parametrize("step", ["commit", "release"])
def test_a_settle_killed_after_the_agents_step_is_resolved_when_the_scope_hold_expires(
    cluster_url: str, step: str
) -> None:
    """Commit (or release) killed after the agent's step: the scopes' holds count as held until
    they expire; the next call on the scopes asks the agent's slot what became of each, and
    charges what was committed (or drops what was released)."""
    manager = StateManager.from_url(cluster_url)
    backend = backend_of(manager)
    manager.set_budget("org:c", limit=10.0)
    manager.set_budget("team:c", limit=10.0)
    agent = agent_on(manager, "org:c", "team:c")
    other = agent_on(manager, "org:c", "team:c")
    hold = manager.reserve_budget(agent, 5.0, ttl=1.0)
    now = time.time()
    op = (
        backend.ops.commit(hold, 3_000_000, now, AuditChain())
        if step == "commit"
        else backend.ops.release(hold, now)
    )
    drive(backend, op, stop_after="commit" if step == "commit" else "release")
    assert scope(manager, "org:c") == (0.0, 5.0)
    time.sleep(1.2)
    assert scope(manager, "org:c") == (0.0, 0.0)  # a read counts only open holds
    manager.record_spend(other, 1.0)  # a change on the scopes settles the expired holds first
    spent = 4.0 if step == "commit" else 1.0
    assert scope(manager, "org:c") == scope(manager, "team:c") == (spent, 0.0)
    state = manager.get_agent_state(agent)
    assert state is not None
    assert state.budget_spent == (3.0 if step == "commit" else 0.0)
    if step == "commit":
        marker = backend.layout.keys_of(agent).committed + hold.reservation_id
        assert any(command[1] == marker for _, command in backend.ops._garbage)  # deleted in a batch
    manager.close()


def test_a_hold_killed_after_the_agents_step_expires_with_its_ttl(cluster_url: str) -> None:
    manager = StateManager.from_url(cluster_url)
    backend = backend_of(manager)
    manager.set_budget("team:d", limit=10.0)
    agent = agent_on(manager, "team:d", limit=10.0)
    op = backend.ops.reserve(agent, 4_000_000, 1.0, time.time(), "r" * 32, AuditChain())
    drive(backend, op, stop_after="reserve")
    assert manager.budget_available(agent) == 6.0
    assert scope(manager, "team:d") == (0.0, 0.0)
    time.sleep(1.2)
    assert manager.budget_available(agent) == 10.0
    manager.close()


KILLED_BETWEEN_STEPS = """
import sys, time
from iron_runtime_state import StateManager
from iron_runtime_state.backends.redis import load_scripts
url, agent = sys.argv[1:3]
manager = StateManager.from_url(url)
backend = manager.backend
run = backend._run
step = load_scripts()["scope_spend"].sha
def paused_after_scopes(call):
    reply = run(call)
    if call.command[:2] == ("EVALSHA", step):
        print("between steps", flush=True)
        time.sleep(60)
    return reply
backend._run = paused_after_scopes
manager.record_spend(agent, 4.0)
"""


def test_a_process_killed_between_two_steps_for_real(
    redis_cluster: RedisCluster, cluster_url: str, ns: str
) -> None:
    """A real process, killed with SIGKILL right after the scopes' step of a spend: the scopes are
    charged, the agent holds the amount as pending; the next call charges the agent too."""
    manager = StateManager.from_url(cluster_url)
    manager.set_budget("org:e", limit=10.0)
    agent = agent_on(manager, "org:e", limit=10.0)
    worker = subprocess.Popen(
        [sys.executable, "-c", KILLED_BETWEEN_STEPS, cluster_url, agent.as_str()],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert worker.stdout is not None
    assert worker.stdout.readline().strip() == "between steps"
    worker.send_signal(signal.SIGKILL)
    worker.wait(10)
    assert scope(manager, "org:e") == (4.0, 0.0)
    assert manager.budget_available(agent) == 6.0
    with pytest.raises(BudgetExceeded):
        manager.record_spend(agent, 7.0)  # the pending hold counts: never past the limit
    expire_pending(redis_cluster, ns, agent)
    manager.record_spend(agent, 1.0)
    state = manager.get_agent_state(agent)
    assert state is not None
    assert state.budget_spent == 5.0
    assert scope(manager, "org:e") == (5.0, 0.0)
    manager.close()


# -- processes killed at random while spending from shared scopes -----------------------------------

CHAOS_WORKER = """
import random, sys
from iron_runtime_state import BudgetExceeded, StateManager
url, agents = sys.argv[1], sys.argv[2].split(",")
manager = StateManager.from_url(url, timeout=1.0)
rng = random.Random()
print("ready", flush=True)
while True:
    agent = rng.choice(agents)
    amount = rng.choice([0.25, 0.5, 1.0, 2.0])
    try:
        if rng.random() < 0.5:
            manager.record_spend(agent, amount)
        else:
            hold = manager.reserve_budget(agent, amount, ttl=1.0)
            if rng.random() < 0.7:
                manager.commit_reservation(hold, rng.choice([amount, amount / 2]))
            else:
                manager.release_reservation(hold)
    except BudgetExceeded:
        pass
"""


def test_processes_killed_at_random_never_pass_a_scope_limit_and_totals_converge(
    target: Target, url: str, ns: str
) -> None:
    """Three processes spend and hold on four agents sharing a team and an org scope, and are killed
    with SIGKILL at random and started again. Watched from outside, no scope and no agent ever
    holds and spends past its limit; once holds expired and the next calls settled what the killed
    processes left, each scope's spend is the sum of its agents'."""
    manager = StateManager.from_url(url, timeout=1.0)
    manager.set_budget("org:chaos", limit=60.0)
    manager.set_budget("team:chaos", limit=40.0)
    agents = [agent_on(manager, "org:chaos", "team:chaos", limit=15.0) for _ in range(4)]
    arg = ",".join(a.as_str() for a in agents)
    rng = random.Random(16)

    def start() -> subprocess.Popen[str]:
        worker = subprocess.Popen(
            [sys.executable, "-c", CHAOS_WORKER, url, arg],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert worker.stdout is not None
        assert worker.stdout.readline().strip() == "ready"
        return worker

    workers = [start() for _ in range(3)]
    violations: list[Any] = []
    kills = 0
    deadline = time.monotonic() + 8.0
    try:
        while time.monotonic() < deadline:
            for name, limit in (("org:chaos", 60.0), ("team:chaos", 40.0)):
                spent, held = scope(manager, name)
                if spent + held > limit + 1e-9:
                    violations.append((name, spent, held))
            time.sleep(rng.uniform(0.02, 0.2))
            if rng.random() < 0.3:
                victim = rng.randrange(len(workers))
                workers[victim].send_signal(signal.SIGKILL)
                workers[victim].wait(10)
                kills += 1
                workers[victim] = start()
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGKILL)
            worker.wait(10)
    assert kills > 0
    assert not violations
    time.sleep(3.5)  # every hold (ttl 1 s) and every pending spend (timeout 1 s + 2 s) has expired
    if isinstance(target, RedisCluster):
        for agent in agents:
            expire_pending(target, ns, agent)
    # Settle what the killed processes left: a hold on each agent (and so on both scopes) settles
    # its expired pending spends and the scopes' expired holds first.
    manager.set_budget("org:chaos", limit=1000.0)
    manager.set_budget("team:chaos", limit=1000.0)
    spent = []
    for agent in agents:
        state = manager.get_agent_state(agent)
        assert state is not None
        manager.update_agent_state(
            agent,
            lambda s: AgentState(
                s.agent_id, s.status, s.budget_spent, budget_limit=1000.0, budget_scopes=s.budget_scopes
            ),
        )
        manager.release_reservation(manager.reserve_budget(agent, 0.000001))
        settled = manager.get_agent_state(agent)
        assert settled is not None
        assert settled.budget_spent >= state.budget_spent
        spent.append(settled.budget_spent)
    total = round(sum(spent), 6)
    org, team = scope(manager, "org:chaos"), scope(manager, "team:chaos")
    assert all(s <= 15.0 for s in spent)
    assert org == team == (total, 0.0), (org, team, spent)
    assert total <= 40.0
    manager.close()


# -- labels -------------------------------------------------------------------------------------------


def test_labels_are_indexed_per_group_and_the_sets_follow_every_change(
    target: Target, url: str, ns: str
) -> None:
    manager = StateManager.from_url(url)
    layout = RedisLayout(ns)
    support = [agent_on(manager, labels={"team": "support", "env": "prod"}) for _ in range(3)]
    sales = agent_on(manager, labels={"team": "sales"})
    agent_on(manager)
    found = {s.agent_id for s in manager.iter_agent_states(labels={"team": "support"})}
    assert found == set(support)
    assert {s.agent_id for s in manager.iter_agent_states(labels={"team": "support", "env": "dev"})} == set()
    client = target.client()
    key = layout.keys_of(sales).label + "team=sales"
    assert client.zrange(key, 0, -1) == [sales.as_str().encode()]
    manager.update_agent_state(sales, lambda s: AgentState(s.agent_id, s.status, labels={"team": "support"}))
    assert client.exists(key) == 0
    assert {s.agent_id for s in manager.iter_agent_states(labels={"team": "support"})} == {*support, sales}
    manager.remove_agent_state(support[0])
    assert client.zscore(layout.keys_of(support[0]).label + "team=support", support[0].as_str()) is None
    stored = client.hget(layout.agent_key(support[1]), "labels")
    assert json.loads(stored) == {"env": "prod", "team": "support"}
    manager.close()


# -- namespaces written by 0.4 and 0.5 -------------------------------------------------------------------

V05_WRITER = """
import sys
from iron_runtime_state import AgentId, AgentState, AgentStatus, BudgetExceeded, StateManager
manager = StateManager.from_url(sys.argv[1])
agents = [AgentId.generate() for _ in range(3)]
manager.save_agent_state(AgentState(agents[0], AgentStatus.RUNNING, budget_limit=1.0))
for _ in range(3):
    manager.record_spend(agents[0], 0.1)  # 0.30000000000000004 as a float
manager.save_agent_state(AgentState(agents[1], AgentStatus.STOPPED, budget_spent=2.5, budget_limit=1e12))
manager.save_agent_state(AgentState(agents[2], AgentStatus.RUNNING, budget_spent=1.0, pii_detections=4))
manager.reserve_budget(agents[0], 0.25, ttl=600)
try:
    manager.record_spend(agents[0], 5.0)
except BudgetExceeded:
    pass
print(",".join(a.as_str() for a in agents))
"""


@pytest.fixture(scope="module")
def v05_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package as it was at 0.5 (commit 71c1d72), from this repository's history."""
    return release_source(tmp_path_factory.mktemp("v05"), V05, "0.5")


def run_05(v05_source: Path, code: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(v05_source)}
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, env=env
    )


def test_a_namespace_written_by_0_5_reads_as_it_is_then_migrates(url: str, v05_source: Path) -> None:
    """0.5 stored floats: this version reads them as the micro-units nearest them, refuses to
    change them until migrate() converts every agent, hold and total exactly; then 0.5 refuses the
    namespace instead of corrupting it."""
    done = run_05(v05_source, V05_WRITER, url)
    assert done.returncode == 0, done.stderr
    first, stopped, plain = (AgentId.parse(a) for a in done.stdout.strip().split(","))
    manager = StateManager.from_url(url)
    state = manager.get_agent_state(first)
    assert state is not None
    assert (state.budget_spent, state.budget_limit, state.labels, state.budget_scopes) == (0.3, 1.0, {}, ())
    assert manager.budget_available(first) == 0.45  # 1.0 - 0.3 - the 0.5 hold of 0.25
    assert manager.stats().budget_spent == 3.8
    assert [s.agent_id for s in manager.iter_agent_states(status="stopped")] == [stopped]
    assert manager.audit_log(event_type="budget_exceeded")  # the trail reads too
    with pytest.raises(SchemaError, match="iron-state migrate"):
        manager.record_spend(plain, 1.0)
    with pytest.raises(SchemaError, match="iron-state migrate"):
        manager.set_budget("team:x", limit=1.0)
    report = manager.backend.migrate()
    assert "3 agents converted" in report
    assert manager.backend.migrate().endswith("nothing to migrate")
    assert manager.stats().budget_spent == 3.8
    assert manager.budget_available(first) == 0.45
    big = manager.get_agent_state(stopped)
    assert big is not None
    assert big.budget_limit == 1e9
    manager.record_spend(first, 0.45)
    with pytest.raises(BudgetExceeded):
        manager.record_spend(first, 0.000001)
    assert manager.verify_audit_log().ok
    refused = run_05(
        v05_source,
        "import sys\nfrom iron_runtime_state import StateManager\nStateManager.from_url(sys.argv[1]).stats()",
        url,
    )
    assert refused.returncode != 0
    assert "layout" in refused.stderr
    manager.close()


def test_an_outbox_entry_0_5_left_reads_with_its_floats() -> None:
    agent = AgentId.generate()
    fields = [b"kind", b"spend", b"agent", agent.as_str().encode(), b"at", b"1750000000.5", b"spent", b"4",
              b"limit", b"4.5", b"reserved", b"0", b"amount", b"0.30000000000000004"]  # fmt: skip
    event = outbox_event(fields)
    assert json.loads(event.details) == {
        "action": "spend",
        "limit": 4.5,
        "reserved": 0.0,
        "requested": 0.3,
        "spent": 4.0,
    }
