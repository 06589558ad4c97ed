"""A change and its audit event on Redis: one write through the outbox, resent without counting twice.

On Redis a change queues its event in its group's outbox in the same script, and the client
appends it to the trail after (backends/redis/ops.py explains why). These tests break that
sequence where it can break: a process killed between any two round trips (for real, with
SIGKILL, and exactly, by dropping an operation after a chosen request), a reply lost and the call
sent again, a namespace written by 0.4, which has neither outboxes nor seals. Each runs on a
standalone server and on a three-master cluster.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from iron_runtime_state import (
    AgentId,
    AgentNotRunning,
    AgentState,
    AgentStatus,
    AsyncStateManager,
    AuditEvent,
    BudgetExceeded,
    SchemaError,
    StateManager,
    ValidationError,
    events,
)
from iron_runtime_state.audit_chain import AuditChain
from iron_runtime_state.backends.redis import RedisBackend, RedisLayout, load_scripts, open_redis
from iron_runtime_state.backends.redis.aio import AsyncRedisBackend
from iron_runtime_state.backends.redis.ops import Call, Op

from .contract.facade import LoopThread
from .redis_servers import HOST, RedisCluster, RedisServer, ReplyDropper, redis_available, release_source

pytestmark = pytest.mark.skipif(not redis_available(), reason="redis-server is not installed")

Target = RedisServer | RedisCluster
ROOT = Path(__file__).resolve().parents[1]
#: The last commit of version 0.4: a namespace it wrote has no outboxes and no seals.
V04 = "2b0e376"
CHANGE_SCRIPTS = ("record_spend", "record_pii", "set_status", "reserve", "commit", "release")


@pytest.fixture(params=["redis", "redis-cluster"])
def target(request: pytest.FixtureRequest) -> Target:
    """The session's standalone server, then its cluster."""
    name = "redis_server" if request.param == "redis" else "redis_cluster"
    found: Target = request.getfixturevalue(name)
    return found


@pytest.fixture
def url(target: Target, ns: str) -> str:
    return f"{target.url}?namespace={ns}"


def running(limit: float | None = None) -> AgentState:
    return AgentState(AgentId.generate(), AgentStatus.RUNNING, budget_limit=limit)


def pending(target: Target, ns: str) -> int:
    """Entries waiting in the namespace's outboxes (read past the library)."""
    client = target.client()
    return sum(int(client.xlen(g.outbox)) for g in RedisLayout(ns).group_keys)


def runs(*scripts: str) -> Callable[[Any], bool]:
    """Whether a request runs one of the named Lua scripts."""
    shas = {load_scripts()[name].sha for name in scripts}
    return lambda request: (
        isinstance(request, Call) and request.command[0] == "EVALSHA" and request.command[1] in shas
    )


def appended(request: Any, reply: Any) -> bool:
    """Whether a request appended to the trail (and did not find the head moved)."""
    return runs("append_audit")(request) and reply == [1]


def changed(request: Any, reply: Any) -> bool:
    """Whether a request ran a change script."""
    return runs(*CHANGE_SCRIPTS)(request)


def crash_after(backend: RedisBackend, op: Op[Any], stop: Callable[[Any, Any], bool]) -> None:
    """Run ``op`` until ``stop`` picks a request and its reply, then drop it: what a process killed
    right after that round trip leaves behind."""
    backend.stats()  # the namespace check, done first
    reply = None
    while True:
        request = op.send(reply)
        reply = backend._do(request)
        if stop(request, reply):
            op.close()
            return


class Case(NamedTuple):
    """A change that writes events: their types, the operation, and what it leaves."""

    event_types: tuple[str, ...]
    agent_id: AgentId
    make: Callable[[], Op[Any]]
    check: Callable[[AgentState, float], bool]  # the state and open holds after the change


def changes(manager: StateManager, chain: AuditChain) -> list[Case]:
    """Every kind of change that writes an event, each on a fresh agent with a limit of 1.0."""
    backend = manager.backend
    assert isinstance(backend, RedisBackend)
    ops, now = backend.ops, time.time()
    agents = [running(1.0) for _ in range(5)]
    manager.save_agent_states(agents)
    a, b, c, d, e = (s.agent_id for s in agents)
    hold = manager.reserve_budget(e, 1.0)
    return [
        Case(
            ("pii_detected",),
            a,
            lambda: ops.record_pii(a, 3, now, events.pii_detected(a, 3, "mail", now), chain),
            lambda s, _: s.pii_detections == 3,
        ),
        Case(
            ("status_changed",),
            b,
            lambda: ops.set_status(b, AgentStatus.FAILED, now, chain),
            lambda s, _: s.status is AgentStatus.FAILED,
        ),
        Case(
            ("budget_exceeded",),
            c,
            lambda: ops.record_spend(c, 2_000_000, now, chain),
            lambda s, h: (s.budget_spent, h) == (0.0, 0.0),
        ),
        Case(
            ("budget_exceeded",),
            d,
            lambda: ops.reserve(d, 2_000_000, 60.0, now, "r" * 32, chain),
            lambda s, h: (s.budget_spent, h) == (0.0, 0.0),
        ),
        Case(
            # The ledger's record, the overspend, and the thresholds 50%, 80% and 100% it reached.
            ("spend", "budget_exceeded", *("budget_threshold",) * 3),
            e,
            lambda: ops.commit(hold, 5_000_000, now, chain),
            lambda s, h: (s.budget_spent, h) == (5.0, 0.0),
        ),
    ]


def first_write(url: str) -> StateManager:
    """A new manager (a restarted process) after its first write, which drains every outbox."""
    manager = StateManager.from_url(url)
    agent = running()
    manager.save_agent_state(agent)
    manager.set_status(agent.agent_id, AgentStatus.RUNNING)  # no change, no event: a write all the same
    return manager


@pytest.mark.parametrize("killed_after", ["change", "append"])
def test_a_change_whose_process_died_gets_its_event_from_the_next_writer(
    target: Target, url: str, ns: str, killed_after: str
) -> None:
    """Killed after the change (its event queued), or after the append (on a cluster, before the
    outbox was trimmed): the next writer appends what is missing, and nothing twice."""
    manager = StateManager.from_url(url)
    backend = manager.backend
    assert isinstance(backend, RedisBackend)
    cases = changes(manager, AuditChain())
    for case in cases:
        crash_after(backend, case.make(), appended if killed_after == "append" else changed)
    if killed_after == "change":
        # Each change stands, its events queued with it.
        assert pending(target, ns) == sum(len(case.event_types) for case in cases)
        for case in cases:
            state, held = manager.backend.reserved(case.agent_id, time.time())
            assert case.check(state, held), case
        reader = open_redis(url)  # a store that never wrote has no chain to seal with: no drain
        assert reader.audit_count() == 0
        reader.close()
    later = first_write(url)
    # A sweep drains group by group: the events of different agents may land in another order.
    assert sorted((r.event.event_type, r.event.agent_id.as_str()) for r in later.audit_log()) == sorted(
        (kind, case.agent_id.as_str()) for case in cases for kind in case.event_types
    )
    assert pending(target, ns) == 0
    for case in cases:
        state, held = later.backend.reserved(case.agent_id, time.time())
        assert case.check(state, held), case
    assert later.verify_audit_log().ok
    later.close()
    manager.close()


def test_audit_reads_of_a_writer_drain_first(target: Target, url: str, ns: str) -> None:
    """A store that has written drains the outboxes before it reads the trail, so a reader never
    sees a trail that lacks the event of a change made before the read."""
    writer = StateManager.from_url(url)
    writer.save_agent_state(running())
    other = StateManager.from_url(url)
    backend = other.backend
    assert isinstance(backend, RedisBackend)
    for case in changes(other, AuditChain()):
        crash_after(backend, case.make(), changed)
    writer.save_audit_log(AuditEvent(AgentId.generate(), "note", 1, "a write: this store has a chain"))
    for case in changes(other, AuditChain()):
        crash_after(backend, case.make(), changed)
    assert pending(target, ns) == 9
    assert writer.audit_count() == 19
    assert pending(target, ns) == 0
    assert writer.verify_audit_log().ok
    writer.close()
    other.close()


# -- a reply lost after the server ran the call, and the call sent again ------------------------------


def lose_first_replies(backend: RedisBackend | AsyncRedisBackend, lose: Callable[[Any], bool]) -> list[str]:
    """Make the store send each request that ``lose`` picks twice, dropping the first reply: a
    reply lost after the server ran the call, and the driver's resend. Returns what was resent."""
    resent: list[str] = []
    run = backend._run
    if isinstance(backend, RedisBackend):

        def losing(call: Call) -> Any:
            if lose(call):
                resent.append(call.what)
                run(call)  # the server runs it; the reply is lost
            return run(call)

        backend._run = losing  # type: ignore[method-assign]
    else:

        async def losing_async(call: Call) -> Any:
            if lose(call):
                resent.append(call.what)
                await run(call)
            return await run(call)

        backend._run = losing_async  # type: ignore[method-assign]
    return resent


def exercise(manager: StateManager) -> dict[str, AgentId]:
    """Every change that writes an event, and the other changes, each once through the manager."""
    agents = {name: running(10.0) for name in ("pii", "status", "refused", "held", "over", "spend")}
    manager.save_agent_states(list(agents.values()))
    ids = {name: state.agent_id for name, state in agents.items()}
    manager.record_pii_detection(ids["pii"], 2, details="once")
    manager.set_status(ids["status"], AgentStatus.STOPPED)
    with pytest.raises(BudgetExceeded):
        manager.record_spend(ids["refused"], 11.0)
    with pytest.raises(BudgetExceeded):
        manager.reserve_budget(ids["held"], 11.0)
    manager.commit_reservation(manager.reserve_budget(ids["over"], 4.0), 12.0)
    manager.release_reservation(manager.reserve_budget(ids["spend"], 1.0))
    manager.record_spend(ids["spend"], 3.0)
    return ids


def assert_counted_once(url: str, ids: dict[str, AgentId]) -> None:
    checker = first_write(url)
    states = {name: checker.get_agent_state(agent) for name, agent in ids.items()}
    assert all(state is not None for state in states.values())
    assert checker.get_agent_state(ids["pii"]).pii_detections == 2  # type: ignore[union-attr]
    assert checker.get_agent_state(ids["status"]).status is AgentStatus.STOPPED  # type: ignore[union-attr]
    spent = [checker.get_agent_state(ids[n]).budget_spent for n in ("refused", "held", "over", "spend")]  # type: ignore[union-attr]
    assert spent == [0.0, 0.0, 12.0, 3.0]
    assert checker.budget_available(ids["spend"]) == 7.0  # the hold was released, once
    assert [(r.event.event_type, r.event.agent_id) for r in checker.audit_log()] == [
        ("pii_detected", ids["pii"]),
        ("status_changed", ids["status"]),
        ("budget_exceeded", ids["refused"]),
        ("budget_exceeded", ids["held"]),
        ("spend", ids["over"]),
        ("budget_exceeded", ids["over"]),
        *[("budget_threshold", ids["over"])] * 3,
        ("spend", ids["spend"]),
    ]
    assert checker.verify_audit_log().ok
    checker.close()


@pytest.mark.parametrize("api", ["sync", "async"])
def test_a_call_resent_after_a_lost_reply_counts_once(url: str, api: str) -> None:
    """Every change, and every append of its event, runs twice at the server with the first reply
    lost: each change counts once, each hold is taken and settled once, each event is stored once."""
    lose = runs(*CHANGE_SCRIPTS, "append_audit")
    if api == "sync":
        manager = StateManager.from_url(url)
        assert isinstance(manager.backend, RedisBackend)
        resent = lose_first_replies(manager.backend, lose)
        ids = exercise(manager)
        manager.close()
    else:
        loop = LoopThread()
        try:
            native = AsyncStateManager.from_url(url)
            assert isinstance(native.backend, AsyncRedisBackend)
            resent = lose_first_replies(native.backend, lose)
            facade = loop.facade(native)
            ids = exercise(facade)
            facade.close()
        finally:
            loop.close()
    assert {"record PII detections", "set a status", "record spend", "reserve budget"} <= set(resent)
    assert {"commit a reservation", "release a reservation", "append to the audit trail"} <= set(resent)
    assert_counted_once(url, ids)


def test_a_reply_lost_on_the_wire_is_resent_and_counts_once(redis_server: RedisServer, ns: str) -> None:
    """The same through a TCP proxy that really drops the server's reply and hangs up."""
    proxy = ReplyDropper(redis_server.port)
    url = f"redis://{HOST}:{proxy.port}/0?namespace={ns}"
    direct = StateManager.from_url(f"{redis_server.url}?namespace={ns}")
    through = StateManager.from_url(url)
    agent = running(10.0)
    direct.save_agent_state(agent)
    aid = agent.agent_id
    through.release_reservation(through.reserve_budget(aid, 1.0))  # connected, scripts cached
    steps: list[Callable[[], object]] = [
        lambda: through.record_pii_detection(aid, 2, details="once"),
        lambda: through.set_status(aid, AgentStatus.STOPPED),
        lambda: through.set_status(aid, AgentStatus.RUNNING),
        lambda: through.record_spend(aid, 4.0),
    ]
    for step in steps:
        proxy.drop = 1
        step()
    proxy.drop = 1
    with pytest.raises(BudgetExceeded):
        through.record_spend(aid, 7.0)
    state = direct.get_agent_state(aid)
    assert state is not None
    assert (state.pii_detections, state.status, state.budget_spent) == (2, AgentStatus.RUNNING, 4.0)
    kinds = [r.event.event_type for r in direct.audit_log(agent_id=aid)]
    assert kinds == ["pii_detected", "status_changed", "status_changed", "spend", "budget_exceeded"]
    assert direct.verify_audit_log().ok
    through.close()
    direct.close()
    proxy.close()


# -- processes killed for real ---------------------------------------------------------------------------

KILLED_WORKER = """
import itertools, os, random, sys, uuid
from iron_runtime_state import AgentStatus, BudgetExceeded, StateManager
url, detector, toggler, spender = sys.argv[1:5]
manager = StateManager.from_url(url)
manager.set_status(toggler, manager.get_agent_state(toggler).status)  # the first write drains
print("ready", flush=True)
rng = random.Random()
for n in itertools.count():
    manager.record_pii_detection(detector, rng.randint(1, 5), details=uuid.uuid4().hex)
    now = manager.get_agent_state(toggler).status
    manager.set_status(toggler, AgentStatus.STOPPED if now is AgentStatus.RUNNING else AgentStatus.RUNNING)
    try:
        manager.record_spend(spender, 1000 + os.getpid() % 10**5 + n / 1e6)  # unique: each refusal told apart
    except BudgetExceeded:
        pass
"""


def test_processes_killed_at_random_leave_every_change_with_its_event(
    target: Target, url: str, ns: str
) -> None:
    """A process doing PII counts, status changes and refused spends, killed with SIGKILL again and
    again: each counter equals the sum of its events, each status change has its event, in
    order, and no event is stored twice."""
    manager = StateManager.from_url(url)
    detector, toggler, spender = running(), running(), running(1.0)
    manager.save_agent_states([detector, toggler, spender])
    args = [url, detector.agent_id.as_str(), toggler.agent_id.as_str(), spender.agent_id.as_str()]
    rng = random.Random()
    left_behind = 0
    for _ in range(25):
        worker = subprocess.Popen(
            [sys.executable, "-c", KILLED_WORKER, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert worker.stdout is not None
        assert worker.stdout.readline().strip() == "ready", worker.stderr.read() if worker.stderr else ""
        time.sleep(rng.uniform(0.02, 0.25))
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
        left_behind += pending(target, ns) > 0
    assert left_behind > 0  # some kill fell between a change and its drain
    checker = first_write(url)
    assert pending(target, ns) == 0
    pii = checker.audit_log(agent_id=detector.agent_id)
    state = checker.get_agent_state(detector.agent_id)
    assert state is not None
    assert pii
    assert state.pii_detections == sum(json.loads(r.event.details)["count"] for r in pii)
    assert len({json.loads(r.event.details)["details"] for r in pii}) == len(pii)
    moves = [json.loads(r.event.details) for r in checker.audit_log(agent_id=toggler.agent_id)]
    assert moves
    expected = "running"
    for move in moves:  # each change from where the last one left off: none lost, none twice
        assert move["from"] == expected, moves
        expected = move["to"]
    final = checker.get_agent_state(toggler.agent_id)
    assert final is not None
    assert final.status.value == expected
    refusals = [json.loads(r.event.details) for r in checker.audit_log(agent_id=spender.agent_id)]
    assert refusals
    seen: dict[float, list[dict[str, Any]]] = {}
    for r in refusals:
        seen.setdefault(r["requested"], []).append(r)
    assert not [same for same in seen.values() if len(same) > 1]
    assert checker.get_agent_state(spender.agent_id) == spender
    assert checker.verify_audit_log().ok
    checker.close()
    manager.close()


# -- what only the outbox design has -----------------------------------------------------------------


def test_concurrent_writers_of_one_group_each_get_their_own_record(url: str) -> None:
    """Writers of one agent drain each other's events (whoever drains first appends every entry
    up to its own); each still gets the record of its own event, and every event is stored once."""
    managers = [StateManager.from_url(url) for _ in range(4)]
    agent = running()
    managers[0].save_agent_state(agent)
    seen: list[list[Any]] = [[] for _ in managers]

    def work(i: int) -> None:
        backend, chain = managers[i].backend, AuditChain()
        for n in range(40):
            now = time.time()
            event = events.pii_detected(agent.agent_id, 1, f"{i}-{n}", now)
            change = backend.record_pii(agent.agent_id, 1, now, event, chain)
            seen[i] += change.records

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(managers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    records = managers[0].audit_log()
    assert len(records) == 160 == len({r.event.details for r in records})
    assert sorted((r for mine in seen for r in mine), key=lambda r: r.seq) == records
    for i, mine in enumerate(seen):
        assert [json.loads(r.event.details)["details"] for r in mine] == [f"{i}-{n}" for n in range(40)]
    state = managers[0].get_agent_state(agent.agent_id)
    assert state is not None
    assert state.pii_detections == 160
    for manager in managers:
        manager.close()


def test_threads_sharing_a_store_see_no_rewind(url: str, caplog: pytest.LogCaptureFixture) -> None:
    """Threads of one store object append, change and read at once: a head one thread was told
    before another appended is older, not a rewind, and is neither logged nor recorded as one."""
    manager = StateManager.from_url(url)
    agent = running()
    manager.save_agent_state(agent)

    def work(i: int) -> None:
        for n in range(30):
            if n % 3 == 0:
                manager.record_pii_detection(agent.agent_id, 1, details=f"{i}-{n}")
            elif n % 3 == 1:
                manager.save_audit_log(AuditEvent(agent.agent_id, "note", 1, f"{i}-{n}"))
            else:
                manager.backend.audit_marks()

    with caplog.at_level(logging.WARNING, logger="iron_runtime_state"):
        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not [r for r in caplog.records if "went back" in r.getMessage()]
    kinds = [r.event.event_type for r in manager.audit_log()]
    assert (kinds.count("pii_detected"), kinds.count("note"), len(kinds)) == (80, 80, 160)
    assert manager.verify_audit_log().ok
    manager.close()


def test_a_pii_total_past_2_63_in_the_group_is_refused_and_changes_nothing(url: str) -> None:
    """The group's running total overflows before the agent's: a ValidationError, nothing changed,
    no event queued."""
    manager = StateManager.from_url(url)
    layout = RedisLayout("x")
    first = running()
    group = layout.group_of(first.agent_id.as_str())
    second = next(s for s in iter(running, None) if layout.group_of(s.agent_id.as_str()) == group)
    manager.save_agent_states([first, second])
    manager.record_pii_detection(first.agent_id, 2**63 - 3)
    with pytest.raises(ValidationError, match="2\\*\\*63"):
        manager.record_pii_detection(second.agent_id, 5)
    assert manager.get_agent_state(second.agent_id) == second
    assert manager.stats().pii_detections == 2**63 - 3
    assert len(manager.audit_log()) == 1
    manager.close()


def test_moving_the_anchor_hides_no_record(target: Target, url: str, ns: str) -> None:
    """Moving the anchor forward by hand (what a prune does, without removing anything) leaves
    every record visible to readers, and verify reports it."""
    manager = StateManager.from_url(url)
    agent = AgentId.generate()
    records = manager.save_audit_logs([AuditEvent(agent, "note", 1_000 + i, f"n{i}") for i in range(6)])
    layout = RedisLayout(ns)
    target.client().hset(
        layout.audit_head, mapping={"anchor_seq": records[2].seq, "anchor_hash": records[2].hash}
    )
    assert manager.audit_log() == records
    assert [r.seq for r in manager.iter_audit_log()] == [r.seq for r in records]
    assert manager.audit_log(agent_id=agent) == records
    assert manager.audit_count() == 6
    report = manager.verify_audit_log()
    assert not report.ok
    manager.close()


def test_seals_sit_beside_the_head_and_the_anchor(target: Target, url: str, ns: str) -> None:
    key = b"k" * 32
    chain = AuditChain(key)
    manager = StateManager.from_url(url, audit_key=key)
    records = manager.save_audit_logs(
        [AuditEvent(AgentId.generate(), "note", 1_000 + i, "") for i in range(4)]
    )
    assert manager.prune_audit_log(before=1_002) == 2
    head: dict[bytes, bytes] = target.client().hgetall(RedisLayout(ns).audit_head)  # type: ignore[assignment]
    assert head[b"seal"].decode() == chain.seal_mark("head", records[-1].seq, records[-1].hash)
    assert head[b"anchor_seal"].decode() == chain.seal_mark("anchor", records[1].seq, records[1].hash)
    unkeyed = StateManager.from_url(url)  # a writer without the key leaves no stale seal behind
    unkeyed.save_audit_log(AuditEvent(AgentId.generate(), "note", 2_000, ""))
    assert b"seal" not in target.client().hgetall(RedisLayout(ns).audit_head)
    assert manager.verify_audit_log().ok is False  # the head is no longer sealed with the key
    unkeyed.close()
    manager.close()


# -- a namespace written by 0.4 ---------------------------------------------------------------------------

V04_WRITER = """
import sys
from iron_runtime_state import AgentId, AgentState, AgentStatus, AuditEvent, BudgetExceeded, StateManager
manager = StateManager.from_url(sys.argv[1])
agent = AgentId.generate()
manager.save_agent_state(AgentState(agent, AgentStatus.RUNNING, budget_limit=10.0))
manager.save_audit_logs([AuditEvent(agent, "note", 1_000 + i, f"old {i}") for i in range(4)])
manager.record_pii_detection(agent, 3, details="old")
manager.set_status(agent, AgentStatus.STOPPED)
manager.set_status(agent, AgentStatus.RUNNING)
manager.record_spend(agent, 4.0)
try:
    manager.record_spend(agent, 40.0)
except BudgetExceeded:
    pass
manager.reserve_budget(agent, 2.0, ttl=600)
manager.prune_audit_log(before=1_002)
print(agent.as_str())
"""


@pytest.fixture(scope="module")
def v04_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package as it was at 0.4 (commit 2b0e376), from this repository's history."""
    return release_source(tmp_path_factory.mktemp("v04"), V04, "0.4")


def test_a_namespace_written_by_0_4_keeps_working(
    target: Target, url: str, ns: str, v04_source: Path
) -> None:
    """0.4 wrote no outboxes and no seals, and money as floats: its trail reads, verifies and grows;
    its agents and holds read as they are, and change once migrated."""
    env = {**os.environ, "PYTHONPATH": str(v04_source)}
    done = subprocess.run(
        [sys.executable, "-c", V04_WRITER, url], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr
    agent = AgentId.parse(done.stdout.strip())
    manager = StateManager.from_url(url)
    marks = manager.backend.audit_marks()
    assert (marks.head[0], marks.anchor[0], marks.count) == (8, 2, 6)
    assert (marks.head_seal, marks.anchor_seal) == (None, None)
    assert [r.seq for r in manager.audit_log()] == [3, 4, 5, 6, 7, 8]
    assert manager.verify_audit_log().ok
    state = manager.get_agent_state(agent)
    assert state is not None
    assert (state.budget_spent, state.pii_detections) == (4.0, 3)
    assert manager.budget_available(agent) == 4.0  # the 0.4 hold of 2.0 is open
    with pytest.raises(SchemaError, match="iron-state migrate"):  # floats: read, not changed
        manager.record_pii_detection(agent, 1)
    assert "1 agents converted" in manager.backend.migrate()
    assert manager.backend.migrate().endswith("nothing to migrate")
    assert manager.budget_available(agent) == 4.0  # the hold, converted to micro-units
    assert manager.stats().budget_spent == 4.0
    manager.record_pii_detection(agent, 1)
    manager.set_status(agent, AgentStatus.STOPPED)
    with pytest.raises(AgentNotRunning):
        manager.record_spend(agent, 1.0)
    assert [r.event.event_type for r in manager.audit_log()][-2:] == ["pii_detected", "status_changed"]
    assert pending(target, ns) == 0
    assert manager.verify_audit_log().ok
    keyed = StateManager.from_url(url, audit_key=b"k" * 32)
    keyed.save_audit_log(AuditEvent(agent, "note", 3_000, "sealed from here on"))
    assert keyed.backend.audit_marks().head_seal is not None
    manager.close()
    keyed.close()
