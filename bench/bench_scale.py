"""Scale: each query's time at 10,000, 100,000 and 1,000,000 agents and audit records, per store.

Run: .venv/bin/python bench/bench_scale.py [--quick] [--stores memory,sqlite,redis] [--json FILE] [--dir DIR]

At each size N a store holds N running agents, 10,000 stopped agents and N audit records; the
store grows from one size to the next (built with the batch calls, ``save_agent_states`` and
``save_audit_logs``, 10,000 at a time). Each query then runs a few hundred times on random
agents, and the median of a few runs is reported per call, with the growth factor from the
smallest size to the largest. Every query returns as much at each size (a state, 100 records,
the 10,000 stopped agents, the totals), so work that grows with N is a walk over data an index
could have skipped. Target: no query grows more than 3x from 10,000 to 1,000,000
(``--quick`` stops at 100,000).

The records: 100 agents take turns (so each has at least 100 at every size), four event types,
one second apart with up to a minute of jitter, so timestamps do not increase with seq.
``since`` is the time of the 1,000th newest record: about a thousand match.

Stores: ``memory``, ``sqlite`` (a file in a temporary folder, or ``--dir``) and ``redis`` (its
own redis-server on a free loopback port, started as bench/bench_redis.py does). A new store
is one entry in :data:`STORES`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT))

from _harness import header, time_per_op  # noqa: E402
from iron_runtime_state import AgentId, AgentState, AgentStatus, AuditEvent, StateManager  # noqa: E402

SIZES = (10_000, 100_000, 1_000_000)
QUICK_SIZES = SIZES[:2]
STOPPED = 10_000  # stopped agents at every size: what iter_agent_states(status=STOPPED) returns
WRITERS = 100  # agents that take turns writing the audit records
KINDS = ("tool_call", "pii_detected", "status_changed", "budget_exceeded")
T0 = 1_700_000_000
CHUNK = 10_000  # agents or records per batch call while building
RUNS = 5  # timed runs per query and size; the median is kept
RUN_S = 0.5  # a slow query makes fewer calls per run, so that a run takes about this long
GROWTH_TARGET = 3.0

#: A store's name -> a context manager that provides an empty store's URL in ``folder``.
StoreFactory = Callable[[Path], contextlib.AbstractContextManager[str]]


@contextlib.contextmanager
def memory_store(folder: Path) -> Iterator[str]:
    yield "memory://"


@contextlib.contextmanager
def sqlite_store(folder: Path) -> Iterator[str]:
    yield f"sqlite:///{folder / 'scale.db'}"


@contextlib.contextmanager
def redis_store(folder: Path) -> Iterator[str]:
    from tests.redis_servers import RedisServer, short_tmpdir

    server_folder = short_tmpdir("iron-scale-")
    server = RedisServer(server_folder).start()
    try:
        yield f"{server.url}?namespace=scale"
    finally:
        server.stop()
        shutil.rmtree(server_folder, ignore_errors=True)


STORES: dict[str, StoreFactory] = {"memory": memory_store, "sqlite": sqlite_store, "redis": redis_store}


class Fleet:
    """What has been written to one store so far, and the picks the queries use."""

    def __init__(self, manager: StateManager, rng: random.Random) -> None:
        self.manager = manager
        self.rng = rng
        self.running: list[AgentState] = []
        self.writers: list[AgentId] = []
        self.records = 0

    def grow(self, size: int) -> float:
        """Add agents and records up to ``size`` of each; the seconds it took."""
        started = time.perf_counter()
        if not self.running:
            stopped = [AgentState(AgentId.generate(), AgentStatus.STOPPED, 1.0) for _ in range(STOPPED)]
            self.manager.save_agent_states(stopped)
        while len(self.running) < size:
            count = min(CHUNK, size - len(self.running))
            batch = [
                AgentState(AgentId.generate(), AgentStatus.RUNNING, budget_limit=1e12) for _ in range(count)
            ]
            self.manager.save_agent_states(batch)
            self.running.extend(batch)
        if not self.writers:
            self.writers = [state.agent_id for state in self.running[:WRITERS]]
        while self.records < size:
            count = min(CHUNK, size - self.records)
            self.manager.save_audit_logs([self.event(i) for i in range(self.records, self.records + count)])
            self.records += count
        return time.perf_counter() - started

    def event(self, i: int) -> AuditEvent:
        jitter = (i * 7919) % 61  # deterministic, and timestamps go back now and then
        details = f"call {i} of the fleet"
        return AuditEvent(self.writers[i % WRITERS], KINDS[i % len(KINDS)], T0 + i - jitter, details)

    def picks(self, count: int) -> list[AgentState]:
        return [self.rng.choice(self.running) for _ in range(count)]


#: A query's name, how many calls one timed run makes, and the run itself (given the fleet).
Query = tuple[str, int, Callable[[Fleet], Callable[[int], None]]]


def get_agent_state(fleet: Fleet) -> Callable[[int], None]:
    ids = [state.agent_id for state in fleet.picks(10_000)]  # more than a read cache holds

    def run(k: int) -> None:
        get = fleet.manager.get_agent_state
        for i in range(k):
            get(ids[i % len(ids)])

    return run


def audit_since(fleet: Fleet) -> Callable[[int], None]:
    since = T0 + fleet.records - 1_000

    def run(k: int) -> None:
        for _ in range(k):
            found = fleet.manager.audit_log(since=since, limit=100)
            assert len(found) == 100

    return run


def audit_first(fleet: Fleet) -> Callable[[int], None]:
    def run(k: int) -> None:
        for _ in range(k):
            assert len(fleet.manager.audit_log(limit=100)) == 100

    return run


def audit_by_agent(fleet: Fleet) -> Callable[[int], None]:
    def run(k: int) -> None:
        for i in range(k):
            found = fleet.manager.audit_log(agent_id=fleet.writers[i % WRITERS], limit=100)
            assert len(found) == 100

    return run


def iter_stopped(fleet: Fleet) -> Callable[[int], None]:
    def run(k: int) -> None:
        for _ in range(k):
            count = sum(1 for _ in fleet.manager.iter_agent_states(status=AgentStatus.STOPPED))
            assert count == STOPPED, count

    return run


def stats(fleet: Fleet) -> Callable[[int], None]:
    def run(k: int) -> None:
        for _ in range(k):
            fleet.manager.stats()

    return run


def record_spend(fleet: Fleet) -> Callable[[int], None]:
    ids = [state.agent_id for state in fleet.picks(1_000)]

    def run(k: int) -> None:
        spend = fleet.manager.record_spend
        for i in range(k):
            spend(ids[i % len(ids)], 0.01)

    return run


def save_agent_state(fleet: Fleet) -> Callable[[int], None]:
    states = fleet.picks(1_000)

    def run(k: int) -> None:
        save = fleet.manager.save_agent_state
        for i in range(k):
            save(states[i % len(states)])

    return run


QUERIES: tuple[Query, ...] = (
    ("get_agent_state", 1_000, get_agent_state),
    ("audit_log(since=..., limit=100)", 100, audit_since),
    ("audit_log(limit=100)", 100, audit_first),
    ("audit_log(agent_id=..., limit=100)", 100, audit_by_agent),
    ("iter_agent_states(status=STOPPED)", 1, iter_stopped),
    ("stats()", 1_000, stats),
    ("record_spend", 300, record_spend),
    ("save_agent_state", 300, save_agent_state),
)


def median_time(op: Callable[[int], None], calls: int) -> float:
    """Median seconds per call over :data:`RUNS` runs of up to ``calls`` calls each."""
    first = time_per_op(op, 1)  # also the warm-up
    calls = max(1, min(calls, int(RUN_S / first)))
    return statistics.median(time_per_op(op, calls) for _ in range(RUNS))


def fmt_time(seconds: float) -> str:
    if seconds >= 1.0:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} µs"


def fmt_size(size: int) -> str:
    return f"{size // 1_000_000}M" if size >= 1_000_000 else f"{size // 1_000}k"


def run_store(
    name: str, factory: StoreFactory, sizes: tuple[int, ...], folder: Path
) -> dict[str, list[float]]:
    """Every query's time per call at each size, for one store."""
    header(f"scale: {name}, {', '.join(fmt_size(s) for s in sizes)} agents and audit records")
    times: dict[str, list[float]] = {query: [] for query, _, _ in QUERIES}
    with factory(folder) as url, StateManager.from_url(url) as manager:
        fleet = Fleet(manager, random.Random(15))
        for size in sizes:
            took = fleet.grow(size)
            print(f"  built {fmt_size(size):>4}: {fleet.records:,} records, "
                  f"{len(fleet.running) + STOPPED:,} agents ({took:.1f} s)", flush=True)  # fmt: skip
            for query, calls, make in QUERIES:
                times[query].append(median_time(make(fleet), calls))
    columns = "".join(f"{fmt_size(s):>12}" for s in sizes)
    print(f"  {'query':<36}{columns}   growth {fmt_size(sizes[0])} -> {fmt_size(sizes[-1])}")
    for query, row in times.items():
        growth = row[-1] / row[0]
        flag = "" if growth <= GROWTH_TARGET else f"   (above the {GROWTH_TARGET:g}x target)"
        cells = "".join(f"{fmt_time(t):>12}" for t in row)
        print(f"  {query:<36}{cells}   {growth:6.2f}x{flag}", flush=True)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="stop at 100,000 agents and records")
    parser.add_argument(
        "--stores",
        default="memory,sqlite",
        help=f"comma-separated, from {', '.join(STORES)} (default: memory,sqlite; redis starts a server)",
    )
    parser.add_argument("--json", help="also write the times (seconds per call) to this file")
    parser.add_argument("--dir", help="keep the SQLite file in a new folder in DIR (default: removed after)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(1))  # stop a Redis server on the way out
    names = [name.strip() for name in args.stores.split(",") if name.strip()]
    unknown = sorted(set(names) - set(STORES))
    if unknown:
        parser.error(f"unknown store(s) {unknown}; choose from {', '.join(STORES)}")
    sizes = QUICK_SIZES if args.quick else SIZES
    results: dict[str, dict[str, list[float]]] = {}
    for name in names:
        if args.dir:
            Path(args.dir).mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f"bench_scale_{name}_", dir=args.dir))
        try:
            results[name] = run_store(name, STORES[name], sizes, folder)
        finally:
            if not args.dir:
                shutil.rmtree(folder, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"sizes": list(sizes), "seconds_per_call": results}, file, indent=2)


if __name__ == "__main__":
    main()
