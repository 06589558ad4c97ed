"""asyncio: AsyncStateManager with 100 concurrent tasks against StateManager from one thread.

Run: .venv/bin/python bench/bench_async.py [--quick] [--json out.json] [--stores memory,sqlite,redis]
                                           [--threads 1,2,4,8] [--redis-url redis://host:port/db]

For each store (memory, SQLite, Redis), on the same store in the same run:

- ours: ``AsyncStateManager``, 100 tasks on one event loop, each calling the operation in a
  loop (n calls in all);
- baseline: ``StateManager``, the same n calls one after another from one thread.

Each figure is the median of several interleaved runs (bench/_harness.py).

The issue's target is for Redis, whose asyncio side is native (``redis.asyncio`` with automatic
pipelining): at least 3x the baseline's throughput. Redis runs on a redis-server this script
starts on a free loopback port (tests/redis_servers.py) unless ``--redis-url`` names one.
Memory and SQLite report what the asyncio layer costs or gains there: memory runs on the loop
(no thread), SQLite in the adapter's worker threads (``--threads`` compares pool sizes; SQLite
writes one transaction at a time, so more threads add little).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT))

from _harness import Comparison, compare, header, save_json  # noqa: E402
from iron_runtime_state import AgentId, AgentState, AgentStatus, AsyncStateManager, StateManager  # noqa: E402
from iron_runtime_state.backends import SCHEMES  # noqa: E402
from iron_runtime_state.backends.memory import MemoryBackend  # noqa: E402

TASKS = 100
N_AGENTS = 100


def _ops(
    name: str,
    sync: StateManager,
    aio: AsyncStateManager,
    loop: asyncio.AbstractEventLoop,
    ids: list[AgentId],
    call: Callable[[Any, AgentId], Any],
    *,
    n: int,
    runs: int,
    target: str,
) -> Comparison:
    m = len(ids)

    async def task(first: int, count: int) -> None:
        for i in range(first, first + count * TASKS, TASKS):
            await call(aio, ids[i % m])

    async def tasks(count: int) -> None:
        share, extra = divmod(count, TASKS)
        await asyncio.gather(*(task(t, share + (t < extra)) for t in range(TASKS)))

    def ours(count: int) -> None:
        loop.run_until_complete(tasks(count))

    def baseline(count: int) -> None:
        for i in range(count):
            call(sync, ids[i % m])

    return compare(name, ours, baseline, n=n, runs=runs, target=target)


def store(
    label: str,
    sync: StateManager,
    aio: AsyncStateManager,
    *,
    n: int,
    runs: int,
    target: str = "",
) -> list[Comparison]:
    """Both comparisons on one store, reached by both managers."""
    loop = asyncio.new_event_loop()
    try:
        ids = [AgentId.generate() for _ in range(N_AGENTS)]
        sync.save_agent_states(AgentState(a, AgentStatus.RUNNING) for a in ids)
        spend: Callable[[Any, AgentId], Any] = lambda m, a: m.record_spend(a, 0.01)  # noqa: E731
        get: Callable[[Any, AgentId], Any] = lambda m, a: m.get_agent_state(a)  # noqa: E731
        return [
            _ops(f"{label} record_spend", sync, aio, loop, ids, spend, n=n, runs=runs, target=target),
            _ops(f"{label} get_agent_state", sync, aio, loop, ids, get, n=n, runs=runs, target=target),
        ]
    finally:
        loop.run_until_complete(aio.close())
        loop.close()
        sync.close()


@contextlib.contextmanager
def redis_url(given: str) -> Iterator[str]:
    """The given Redis URL, or that of a fresh redis-server on a free loopback port."""
    if given:
        yield given
        return
    from tests.redis_servers import RedisServer, redis_available, short_tmpdir

    if not redis_available():
        raise SystemExit("redis-server is not installed; pass --redis-url or run scripts/test once")
    folder = short_tmpdir("iron-bench-")
    server = RedisServer(folder).start()
    try:
        yield server.url
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer operations and runs")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--stores", default="memory,sqlite,redis", help="which stores, comma-separated")
    parser.add_argument("--threads", default="", help="SQLite worker-thread counts to compare, e.g. 1,2,4,8")
    parser.add_argument("--redis-url", default="", help="a Redis server to use (test data only)")
    args = parser.parse_args()
    stores = {name.strip() for name in args.stores.split(",") if name.strip()}
    runs = 3 if args.quick else 7
    header(f"asyncio: {TASKS} concurrent tasks vs one thread (ours: async, baseline: sync)")
    results: list[Comparison] = []
    if "memory" in stores:
        memory = MemoryBackend()
        n = 20_000 if args.quick else 100_000
        results += store("memory", StateManager(memory), AsyncStateManager(memory), n=n, runs=runs)
    if "sqlite" in stores and "sqlite" in SCHEMES:
        with tempfile.TemporaryDirectory() as folder:
            url = f"sqlite:///{Path(folder) / 'bench.db'}"
            n = 2_000 if args.quick else 10_000
            threads = [int(t) for t in args.threads.split(",") if t] or [None]
            for count in threads:
                label = "sqlite" if count is None else f"sqlite threads={count}"
                aio = AsyncStateManager.from_url(url, max_threads=count)
                results += store(label, StateManager.from_url(url), aio, n=n, runs=runs)
    elif "sqlite" in stores:
        print("sqlite: not registered yet, skipped", flush=True)
    if "redis" in stores:
        with redis_url(args.redis_url) as base:
            url = f"{base.split('?')[0]}?namespace=bench-{uuid.uuid4().hex[:8]}"
            n = 4_000 if args.quick else 20_000
            sync, aio = StateManager.from_url(url), AsyncStateManager.from_url(url)
            results += store("redis", sync, aio, n=n, runs=runs, target=">= 3x throughput")
    save_json(args.json, results, tasks=TASKS)


if __name__ == "__main__":
    main()
