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
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
from tests.redis_servers import RedisServer, short_tmpdir  # noqa: E402

from _harness import Comparison, compare, header, save_json  # noqa: E402
from iron_runtime_state import AgentId, AgentState, AgentStatus, AuditEvent, StateManager  # noqa: E402
from iron_runtime_state.audit_chain import AuditChain  # noqa: E402
from iron_runtime_state.backends.redis import RedisBackend  # noqa: E402

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
    manager.save_agent_states(AgentState(a, AgentStatus.RUNNING, 1.5, 2, 1e12) for a in ids)
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

    mapping = {"status": "running", "budget_spent": "1.5", "pii_detections": "2", "budget_limit": "1e12"}

    def raw_hset(k: int) -> None:
        hset = raw.hset
        for _ in range(k):
            hset(raw_key, mapping=mapping)

    results.append(compare("save_agent_state vs HSET", ours_save, raw_hset, n=n, runs=runs, target="<= 1.2x"))

    spender = ids[1]
    call = layout.record_spend(spender, 0.25, 1.0)
    raw.script_load(call.script.source)

    def ours_spend(k: int) -> None:
        spend = manager.record_spend
        for _ in range(k):
            spend(spender, 0.25)

    def raw_evalsha(k: int) -> None:
        evalsha = raw.evalsha
        sha, keys, args = call.script.sha, call.keys, call.args
        for _ in range(k):
            evalsha(sha, len(keys), *keys, *args)

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter runs")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--redis-url", help="use this server instead of starting one")
    args = parser.parse_args()
    header("Redis backend vs raw redis-py")
    with server_url(args.redis_url) as url:
        results = run(url, quick=args.quick)
    save_json(args.json, results)


if __name__ == "__main__":
    main()
