"""Redis: our operations against raw redis-py doing the same round trips, in the same run.

Run: .venv/bin/python bench/bench_redis.py [--quick] [--json out.json] [--redis-url redis://host:port/db]

Starts its own redis-server on a free loopback port (tests/redis_servers.py) unless
``--redis-url`` names one. Every figure is a ratio of medians, ours over the baseline, with the
two interleaved (bench/_harness.py). Targets, from the issues:

- ``get_agent_state`` within 1.2x of a raw ``HGETALL`` round trip;
- ``save_agent_state`` within 1.2x of a raw ``HSET`` round trip;
- ``record_spend`` within 1.3x of a raw ``EVALSHA`` round trip (the same script, same keys;
  a second line compares with a script that does nothing, for information);
- ``get_agent_states(ids)`` at least 0.8x the throughput of raw pipelined ``HGETALL``;
- a reserve-plus-commit pair at most 2.5x one ``record_spend``;
- appending to the audit trail with the hash chain at most 1.25x appending without it (a
  bench-only chain whose ``seal`` returns a constant, passed straight to the backend).

For information, each change that may write an audit event (a spend, a reserve-plus-commit, a
status change, a PII count, a refused spend) against one raw round trip, with the round trips it
took per call: a change and its event are one write through the group's outbox (see
``backends/redis/ops.py``), one round trip without an event and two with one.

And what ``durability="replicated"`` costs a write against the default ``"async"``, on a master
with one replica that the bench starts (not with ``--redis-url``): sync calls one after
another, and 100 concurrent asyncio calls.

Budget scopes and periods (issue 16), on the standalone server and on a three-master Redis
Cluster the bench starts (not with ``--redis-url``), with the round trips per call:

- a ``record_spend`` on an agent with two budget scopes at most 2.5x one on an agent with none,
  and a reserve + commit with two scopes at most 2.5x one with none (standalone: one script per
  call either way; a cluster takes steps, see ``backends/redis/spend.py``: information);
- the period check adds at most 10% to a spend on an agent without a period: this tree against
  0.5.0 (commit 71c1d72, a git worktree in /tmp), each run a fresh process, alternating.

The spend ledger (issue 17, ``--ledger-only``): settling with the ``spend`` record (queued in
the same script as the charge, appended to the trail through the outbox) at most 2x settling
without it, ``record_spend`` and a reserve + commit, this tree against 0.6.0 (commit 8e46e75,
before the ledger), each run a fresh process, alternating; standalone and on a cluster.

``--watch-only`` (issue 19): the delivery latency of ``watch()`` to a consumer waiting in
``XREAD BLOCK``, sync and asyncio, on the standalone server and on the cluster, for appended
records and for changes' events (which come through outboxes): median <= 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
from tests.redis_servers import RedisCluster, RedisServer, ReplicatedServer, short_tmpdir  # noqa: E402

from _harness import (  # noqa: E402
    RELEASE_0_6,
    Comparison,
    Op,
    compare,
    compare_with_previous_release,
    header,
    save_json,
)
from iron_runtime_state import (  # noqa: E402
    AgentId,
    AgentState,
    AgentStatus,
    AsyncStateManager,
    AuditEvent,
    BudgetExceeded,
    StateManager,
)
from iron_runtime_state.audit_chain import AuditChain  # noqa: E402
from iron_runtime_state.backends.redis import RedisBackend  # noqa: E402
from iron_runtime_state.backends.redis.spend import record_spend_call  # noqa: E402

BATCH = 100  # ids per batched read


class ConstantChain(AuditChain):
    """Bench only: a 'chain' that does no hashing, to measure what hashing costs."""

    __slots__ = ()

    def seal(
        self, prev_hash: str, seq: int, agent_id: str, event_type: str, timestamp: int, details: str
    ) -> str:
        return "0" * 64


@contextlib.contextmanager
def server_url(given: str | None) -> Iterator[str]:
    """The Redis URL to use: the given one, or a fresh local server's."""
    if given:
        yield given
        return
    folder = short_tmpdir("iron-bench-")
    server = RedisServer(folder).start()
    try:
        yield server.url
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


def run(url: str, *, quick: bool) -> list[Comparison]:
    # Many short interleaved runs: the medians shrug off bursts of load on a shared machine.
    n = 300 if quick else 1000
    runs = 7 if quick else 15
    manager = StateManager.from_url(f"{url.split('?')[0]}?namespace=bench")
    backend = manager.backend
    assert isinstance(backend, RedisBackend)
    layout = backend.layout
    raw = redis.Redis.from_url(url.split("?")[0])
    results: list[Comparison] = []

    ids = [AgentId.generate() for _ in range(1000)]
    manager.save_agent_states(AgentState(a, AgentStatus.RUNNING, 1.5, 2, 1e9) for a in ids)
    agent = ids[0]
    state = manager.get_agent_state(agent)
    assert state is not None
    key = layout.agent_key(agent)
    raw_key = "bench:raw"
    raw.hset(raw_key, mapping={"status": "running", "budget_spent": "1.5", "pii_detections": "2"})

    def ours_get(k: int) -> None:
        get = manager.get_agent_state
        for _ in range(k):
            get(agent)

    def raw_hgetall(k: int) -> None:
        hgetall = raw.hgetall
        for _ in range(k):
            hgetall(key)

    results.append(
        compare("get_agent_state vs HGETALL", ours_get, raw_hgetall, n=n, runs=runs, target="<= 1.2x")
    )

    def ours_save(k: int) -> None:
        save = manager.save_agent_state
        for _ in range(k):
            save(state)

    mapping = {
        "status": "running",
        "spent_micros": "1500000",
        "pii_detections": "2",
        "limit_micros": "1000000000000000",
    }

    def raw_hset(k: int) -> None:
        hset = raw.hset
        for _ in range(k):
            hset(raw_key, mapping=mapping)

    results.append(compare("save_agent_state vs HSET", ours_save, raw_hset, n=n, runs=runs, target="<= 1.2x"))

    spender = ids[1]
    # Each call runs once per op key (a random name per call): the baseline names each call too.
    call = record_spend_call(layout, spender, 250_000, 1.0, "", layout.budgets.prefix)
    raw.script_load(call.script.source)

    def ours_spend(k: int) -> None:
        spend = manager.record_spend
        for _ in range(k):
            spend(spender, 0.25)

    def raw_evalsha(k: int) -> None:
        evalsha = raw.evalsha
        sha, keys, args = call.script.sha, call.keys[:-1], (*call.args, "")  # "": no outbox trim point
        op = call.keys[-1]
        for _ in range(k):
            evalsha(sha, len(keys) + 1, *keys, op + os.urandom(9).hex(), *args)

    results.append(
        compare(
            "record_spend vs EVALSHA (same script)", ours_spend, raw_evalsha, n=n, runs=runs, target="<= 1.3x"
        )
    )

    trivial = raw.script_load("return 1")

    def raw_trivial(k: int) -> None:
        evalsha = raw.evalsha
        for _ in range(k):
            evalsha(trivial, 0)

    results.append(
        compare(
            "record_spend vs EVALSHA 'return 1'",
            ours_spend,
            raw_trivial,
            n=n,
            runs=runs,
            target="(information)",
        )
    )

    batch = ids[:BATCH]
    keys = [layout.agent_key(a) for a in batch]
    m = max(1, n // 20)

    def ours_many(k: int) -> None:
        get_many = manager.get_agent_states
        for _ in range(k):
            get_many(batch)

    def raw_pipeline(k: int) -> None:
        for _ in range(k):
            pipe = raw.pipeline(transaction=False)
            for key in keys:
                pipe.hgetall(key)
            pipe.execute()

    result = compare(
        f"get_agent_states({BATCH} ids) vs pipelined HGETALL",
        ours_many,
        raw_pipeline,
        n=m,
        runs=runs,
        target="throughput >= 0.8x",
    )
    results.append(result)

    holder = ids[2]

    def ours_pair(k: int) -> None:
        reserve, commit = manager.reserve_budget, manager.commit_reservation
        for _ in range(k):
            commit(reserve(holder, 1.0), 0.5)

    results.append(
        compare(
            "reserve + commit vs one record_spend", ours_pair, ours_spend, n=n, runs=runs, target="<= 2.5x"
        )
    )

    results += changes_with_events(manager, backend, raw, ids[3:6], trivial, n=n, runs=runs)

    chain, constant = AuditChain(), ConstantChain()
    event = AuditEvent(agent, "tool_call", 1_700_000_000, "called search with 3 arguments")
    append = backend.append_audit

    def chained(k: int) -> None:
        batch_of_one = (event,)
        for _ in range(k):
            append(batch_of_one, chain)

    def unchained(k: int) -> None:
        batch_of_one = (event,)
        for _ in range(k):
            append(batch_of_one, constant)

    results.append(
        compare(
            "append_audit chained vs constant seal", chained, unchained, n=n, runs=runs, target="<= 1.25x"
        )
    )
    manager.close()
    raw.close()
    return results


def scopes_cost(url: str, *, quick: bool, cluster: bool) -> list[Comparison]:
    """A spend, and a reserve + commit, on an agent with two budget scopes against one on an agent
    with none, same store, same run; with the round trips each call took."""
    n = 200 if quick else 600
    runs = 7 if quick else 11
    manager = StateManager.from_url(f"{url.split('?')[0]}?namespace=bench-scopes")
    backend = manager.backend
    assert isinstance(backend, RedisBackend)
    manager.set_budget("org:bench", limit=1e9)
    manager.set_budget("team:bench", limit=1e9)
    plain, scoped = AgentId.generate(), AgentId.generate()
    manager.save_agent_state(AgentState(plain, AgentStatus.RUNNING, budget_limit=1e9))
    manager.save_agent_state(
        AgentState(scoped, AgentStatus.RUNNING, budget_limit=1e9, budget_scopes=("org:bench", "team:bench"))
    )

    def spender(agent: AgentId) -> Op:
        def spend(k: int) -> None:
            record = manager.record_spend
            for _ in range(k):
                record(agent, 0.25)

        return spend

    def pairs(agent: AgentId) -> Op:
        def pair(k: int) -> None:
            reserve, commit = manager.reserve_budget, manager.commit_reservation
            for _ in range(k):
                commit(reserve(agent, 1.0), 0.5)

        return pair

    where = "cluster" if cluster else "standalone"
    target = "(information)" if cluster else "<= 2.5x"
    results: list[Comparison] = []
    for name, make in (("record_spend", spender), ("reserve + commit", pairs)):
        result = compare(
            f"{name}, 2 scopes vs none ({where})", make(scoped), make(plain), n=n, runs=runs, target=target
        )
        trips = round_trips_per_call(backend, make(scoped)), round_trips_per_call(backend, make(plain))
        result.extra["round_trips_per_call"] = {"two_scopes": trips[0], "no_scope": trips[1]}
        print(
            f"{'':<42} {trips[0]:.2f} round trips per call with 2 scopes, {trips[1]:.2f} with none",
            flush=True,
        )
        results.append(result)
    manager.close()
    return results


#: Both trees: a spend on an agent without a period (the 0.5 API is a subset of this one's).
_PERIOD_SETUP = """
import uuid
from iron_runtime_state import AgentId, AgentState, AgentStatus, StateManager
manager = StateManager.from_url("{url}?namespace=bench-period-" + uuid.uuid4().hex[:8])
agent = AgentId.generate()
manager.save_agent_state(AgentState(agent, AgentStatus.RUNNING, budget_limit=1e9))
def op(count):
    record = manager.record_spend
    for _ in range(count):
        record(agent, 0.25)
"""


def period_check_cost(url: str, *, quick: bool) -> list[Comparison]:
    """A spend on an agent without a period, this tree against 0.5.0 (before periods, scopes and
    exact money), each run a fresh process on the same server, alternating."""
    return [
        compare_with_previous_release(
            "record_spend, no period: this tree vs 0.5.0",
            _PERIOD_SETUP.format(url=url.split("?")[0]),
            n=1000 if quick else 3000,
            runs=7 if quick else 11,
            teardown="manager.close()",
            target="<= 1.10x",
        )
    ]


#: Both trees: settling on an agent whose limit no threshold comes near (the ledger's cost alone).
_SETTLE_SETUP = """
import uuid
from iron_runtime_state import AgentId, AgentState, AgentStatus, StateManager
manager = StateManager.from_url("{url}" + uuid.uuid4().hex[:8])
agent = AgentId.generate()
manager.save_agent_state(AgentState(agent, AgentStatus.RUNNING, budget_limit=1e9))
def op(count):
    for _ in range(count):
        {body}
"""
_SETTLES = {
    "record_spend": "manager.record_spend(agent, 0.25)",
    "reserve + commit": "manager.commit_reservation(manager.reserve_budget(agent, 1.0), 0.5)",
}


def ledger_cost(url: str, *, quick: bool, where: str) -> list[Comparison]:
    """Settling with the ledger's record (this tree) against 0.6.0 without it, fresh processes."""
    base = url.split("?")[0] + "?namespace=bench-ledger-"
    return [
        compare_with_previous_release(
            f"{name} with ledger vs 0.6.0 ({where})",
            _SETTLE_SETUP.format(url=base, body=body),
            n=500 if quick else 2000,
            runs=5 if quick else 9,
            teardown="manager.close()",
            target="<= 2x",
            release=RELEASE_0_6,
        )
        for name, body in _SETTLES.items()
    ]


@contextlib.contextmanager
def cluster_url() -> Iterator[str]:
    """A fresh three-master Redis Cluster on loopback."""
    folder = short_tmpdir("iron-bench-cluster-")
    cluster = RedisCluster(folder).start()
    try:
        yield cluster.url
    finally:
        cluster.stop()
        shutil.rmtree(folder, ignore_errors=True)


def round_trips_per_call(backend: RedisBackend, op: Op, k: int = 200) -> float:
    """Requests the store sent per call of ``op``: one round trip each (a pipeline counts once)."""
    sent = 0
    run, batch = backend._run, backend._batch

    def counted(method: Callable[..., object]) -> Callable[..., object]:
        def wrapper(*args: object) -> object:
            nonlocal sent
            sent += 1
            return method(*args)

        return wrapper

    backend._run, backend._batch = counted(run), counted(batch)  # type: ignore[method-assign]
    try:
        op(k)
    finally:
        del backend._run, backend._batch
    return sent / k


def changes_with_events(
    manager: StateManager,
    backend: RedisBackend,
    raw: redis.Redis,
    agents: list[AgentId],
    trivial: str,
    *,
    n: int,
    runs: int,
) -> list[Comparison]:
    """The changes that write an audit event with them, against one raw round trip."""
    toggler, detector, spender = agents

    def raw_trivial(k: int) -> None:
        evalsha = raw.evalsha
        for _ in range(k):
            evalsha(trivial, 0)

    def ours_status(k: int) -> None:
        set_status = manager.set_status
        for _ in range(k // 2):
            set_status(toggler, AgentStatus.STOPPED)
            set_status(toggler, AgentStatus.RUNNING)

    def ours_pii(k: int) -> None:
        record = manager.record_pii_detection
        for _ in range(k):
            record(detector, 1, details="email address")

    def ours_spend(k: int) -> None:
        spend = manager.record_spend
        for _ in range(k):
            spend(spender, 0.25)

    def ours_refused(k: int) -> None:
        spend = manager.record_spend
        for _ in range(k):
            with contextlib.suppress(BudgetExceeded):
                spend(spender, 1e12)

    def ours_pair(k: int) -> None:
        reserve, commit = manager.reserve_budget, manager.commit_reservation
        for _ in range(k):
            commit(reserve(spender, 1.0), 0.5)

    results: list[Comparison] = []
    for name, ours in (
        ("record_spend", ours_spend),
        ("reserve + commit", ours_pair),
        ("set_status (a change)", ours_status),
        ("record_pii_detection", ours_pii),
        ("record_spend refused", ours_refused),
    ):
        result = compare(
            f"{name} vs one round trip", ours, raw_trivial, n=n, runs=runs, target="(information)"
        )
        trips = result.extra["round_trips_per_call"] = round_trips_per_call(backend, ours)
        print(f"{'':<42} {trips:.2f} round trips per call", flush=True)
        results.append(result)
    return results


def durability_cost(*, quick: bool) -> list[Comparison]:
    """What ``durability="replicated"`` costs a write: against ``"async"``, same master, same run.

    Starts a master and one replica on loopback. Sync: one ``record_spend`` after another (each
    waits for its own WAIT). Asyncio: 100 concurrent ``record_spend`` calls per round (each
    pipelined batch shares one WAIT).
    """
    n = 300 if quick else 1000
    runs = 7 if quick else 15
    folder = short_tmpdir("iron-bench-replicated-")
    pair = ReplicatedServer(folder).start()
    try:
        base = f"{pair.url}?namespace=bench-durability"
        fast = StateManager.from_url(base)
        safe = StateManager.from_url(f"{base}&durability=replicated")
        agent = AgentId.generate()
        fast.save_agent_state(AgentState(agent, AgentStatus.RUNNING))

        def spender(manager: StateManager) -> Op:
            def spend(k: int) -> None:
                record = manager.record_spend
                for _ in range(k):
                    record(agent, 0.25)

            return spend

        results = [
            compare(
                "record_spend replicated vs async (sync)",
                spender(safe),
                spender(fast),
                n=n,
                runs=runs,
                target="(information)",
            )
        ]
        fast.close()
        safe.close()

        def concurrent(url: str) -> Op:
            def spend(k: int) -> None:
                async def rounds() -> None:
                    async with AsyncStateManager.from_url(url) as manager:
                        for _ in range(max(1, k // 100)):
                            await asyncio.gather(*(manager.record_spend(agent, 0.25) for _ in range(100)))

                asyncio.run(rounds())

            return spend

        results.append(
            compare(
                "100 concurrent record_spend replicated vs async (asyncio)",
                concurrent(f"{base}&durability=replicated"),
                concurrent(base),
                n=n * 10,
                runs=runs,
                target="(information)",
            )
        )
        return results
    finally:
        pair.stop()
        shutil.rmtree(folder, ignore_errors=True)


def watch_latency(url: str, *, events: int, where: str) -> list[dict[str, object]]:
    """Delivery latency of ``watch()`` to a consumer waiting in ``XREAD BLOCK`` (issue 19: median
    <= 50 ms), sync and asyncio consumers, for records appended directly (``save_audit_log``) and
    for the events of changes, which reach the trail through their group's outbox (a refused
    ``record_spend``: its ``budget_exceeded``). From the moment the producer's call returned to
    the moment the consumer has the record; the producer pauses 5 to 15 ms between records, so
    the consumer is always waiting (the wake-up is measured, not a backlog)."""
    rows: list[dict[str, object]] = []
    for api in ("sync", "async"):
        for source in ("append", "change"):
            latencies = _watch_once(url, events, api, source)
            ms = sorted(x * 1000 for x in latencies)
            median, p95 = statistics.median(ms), ms[int(len(ms) * 0.95) - 1]
            verdict = "meets" if median <= 50 else "MISSES"
            print(
                f"  {where:<10} {api:<5} {source:<6}  median {median:6.2f} ms  p95 {p95:6.2f} ms  "
                f"max {ms[-1]:7.2f} ms  (target median <= 50 ms: {verdict})",
                flush=True,
            )
            rows.append(
                {
                    "where": where,
                    "api": api,
                    "source": source,
                    "median_ms": median,
                    "p95_ms": p95,
                    "max_ms": ms[-1],
                }
            )
    return rows


def _watch_once(url: str, events: int, api: str, source: str) -> list[float]:
    url = f"{url}{'&' if '?' in url else '?'}namespace=watch-{os.urandom(4).hex()}"
    producer = StateManager.from_url(url)
    agent = AgentId.generate()
    producer.save_agent_state(AgentState(agent, AgentStatus.RUNNING, budget_limit=0.0))
    start = producer.audit_checkpoint().seq
    received: list[float] = []
    ready = threading.Event()

    def consume_sync() -> None:
        consumer = StateManager.from_url(url)
        try:
            feed = consumer.watch(after_seq=start, agent_id=agent, idle_timeout=30)
            ready.set()
            for _ in feed:
                received.append(time.perf_counter())
                if len(received) >= events:
                    return
        finally:
            consumer.close()

    async def consume_async() -> None:
        consumer = AsyncStateManager.from_url(url)
        try:
            feed = consumer.watch(after_seq=start, agent_id=agent, idle_timeout=30)
            ready.set()
            async for _ in feed:
                received.append(time.perf_counter())
                if len(received) >= events:
                    return
        finally:
            await consumer.close()

    target = consume_sync if api == "sync" else lambda: asyncio.run(consume_async())
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    ready.wait(10)
    rng = random.Random(19)
    stored: list[float] = []
    try:
        time.sleep(0.3)
        for i in range(events):
            time.sleep(rng.uniform(0.005, 0.015))
            if source == "append":
                producer.save_audit_log(AuditEvent(agent, "tick", details=str(i)))
            else:
                with contextlib.suppress(BudgetExceeded):
                    producer.record_spend(agent, 1.0)
            stored.append(time.perf_counter())
        thread.join(60)
    finally:
        producer.close()
    if len(received) != events:
        raise RuntimeError(f"only {len(received)} of {events} records arrived")
    return [got - at for got, at in zip(received, stored, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter runs")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--redis-url", help="use this server instead of starting one")
    parser.add_argument(
        "--budgets-only", action="store_true", help="only the budget scopes and periods figures"
    )
    parser.add_argument(
        "--watch-only", action="store_true", help="only the watch() delivery latency (standalone and cluster)"
    )
    parser.add_argument("--events", type=int, default=1000, help="records per watch() latency run")
    parser.add_argument("--ledger-only", action="store_true", help="only the spend ledger's settle cost")
    args = parser.parse_args()
    if args.ledger_only:
        header("Settling with the spend ledger vs 0.6.0 without it")
        with server_url(args.redis_url) as url:
            results = ledger_cost(url, quick=args.quick, where="standalone")
        if not args.redis_url:
            with cluster_url() as url:
                results += ledger_cost(url, quick=args.quick, where="cluster")
        save_json(args.json, results)
        return
    if args.watch_only:
        header("watch(): delivery latency to a waiting consumer (XREAD BLOCK)")
        rows: list[dict[str, object]] = []
        with server_url(args.redis_url) as url:
            rows += watch_latency(url, events=args.events, where="standalone")
        if not args.redis_url:
            with cluster_url() as url:
                rows += watch_latency(url, events=args.events, where="cluster")
        save_json(args.json, [], watch=rows)
        return
    results: list[Comparison] = []
    with server_url(args.redis_url) as url:
        if not args.budgets_only:
            header("Redis backend vs raw redis-py")
            results += run(url, quick=args.quick)
        header("Budget scopes and periods (standalone)")
        results += scopes_cost(url, quick=args.quick, cluster=False)
        results += period_check_cost(url, quick=args.quick)
        results += ledger_cost(url, quick=args.quick, where="standalone")
    if not args.redis_url:
        header("Budget scopes on a three-master Redis Cluster")
        with cluster_url() as url:
            results += scopes_cost(url, quick=args.quick, cluster=True)
            results += ledger_cost(url, quick=args.quick, where="cluster")
    if not args.redis_url and not args.budgets_only:  # it needs a master with a replica of its own
        header("durability='replicated' vs 'async' (a master and one replica)")
        results += durability_cost(quick=args.quick)
    save_json(args.json, results)


if __name__ == "__main__":
    main()
