"""Delivery latency of ``watch()``: from an append to a consumer that was waiting for it, per store.

Run: .venv/bin/python bench/bench_watch.py [--events 1000] [--stores memory,sqlite,redis] [--json FILE]

A consumer thread waits in ``manager.watch()``; a producer (another manager on the same store,
as another process would be) appends one record, then another after a random pause of 5 to
15 ms, so the consumer is always waiting when a record comes: the figure is the wake-up, not a
backlog. Latency is from the moment the append returned (the record is stored) to the moment
the consumer has it; the median and 95th percentile over ``--events`` records are reported,
with the target of issue 19 (memory and Redis <= 50 ms, SQLite <= 100 ms). The sync manager is
measured (the asyncio manager's ``watch()`` runs the same store calls off the event loop).

What makes the figure: how ``Backend.wait_audit`` waits. The default polls the head every
``WAIT_POLL`` (50 ms) seconds; memory waits on a condition; the stores of issue 16 override it
(SQLite ``PRAGMA data_version``, Redis ``XREAD BLOCK``, PostgreSQL ``LISTEN/NOTIFY``). The line
says which one the store uses.

Stores: ``memory``, ``sqlite`` (a file in a temporary folder), ``redis`` (its own redis-server
on a free loopback port) and ``postgres`` (a throwaway cluster, when PostgreSQL is installed),
each skipped with a note when it cannot run here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT))

from _harness import header  # noqa: E402
from bench_scale import memory_store, redis_store, sqlite_store  # noqa: E402
from iron_runtime_state import AgentId, AuditEvent, StateManager  # noqa: E402
from iron_runtime_state.backends.base import Backend, OpsBackend  # noqa: E402

TARGET_MS = {"memory": 50.0, "redis": 50.0, "sqlite": 100.0, "postgres": 50.0}


@contextlib.contextmanager
def postgres_store(folder: Path) -> Iterator[str]:
    from tests.postgres_server import PostgresServer, postgres_available, server_folder

    if not postgres_available():
        raise RuntimeError("PostgreSQL is not installed")
    pg_folder = server_folder()  # short, and readable by the user initdb runs as
    server = PostgresServer(pg_folder).start()
    try:
        yield server.url()
    finally:
        server.stop()
        shutil.rmtree(pg_folder, ignore_errors=True)


STORES: dict[str, Callable[[Path], contextlib.AbstractContextManager[str]]] = {
    "memory": memory_store,
    "sqlite": sqlite_store,
    "redis": redis_store,
    "postgres": postgres_store,
}


def waiting_kind(backend: Backend) -> str:
    """How the store's ``wait_audit`` waits: the first line of the docstring of the one it runs."""
    method = Backend.wait_audit
    if isinstance(backend, OpsBackend):  # its forwarders fall back to the default when ops lack it
        method = getattr(type(backend.ops), "wait_audit", method)
    elif type(backend).wait_audit is not Backend.wait_audit:
        method = type(backend).wait_audit
    if method is Backend.wait_audit:
        return "the default wait_audit: polls the head every 50 ms"
    doc = (method.__doc__ or "its own wait_audit").strip().splitlines()[0]
    return f"{type(backend).__name__}: {doc}"


def measure(url: str, events: int, shared: Backend | None = None) -> tuple[list[float], str]:
    """Latencies in seconds of ``events`` records, and how the store waits."""
    consumer = StateManager(shared) if shared is not None else StateManager.from_url(url)
    producer = StateManager(shared) if shared is not None else StateManager.from_url(url)
    agent = AgentId.generate()
    received: dict[int, float] = {}
    start = producer.audit_checkpoint().seq
    ready = threading.Event()

    def consume() -> None:
        feed = consumer.watch(after_seq=start, idle_timeout=30)
        ready.set()
        for record in feed:
            received[record.seq] = time.perf_counter()
            if len(received) >= events:
                return

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    ready.wait()
    rng = random.Random(19)
    stored: dict[int, float] = {}
    try:
        time.sleep(0.2)
        for i in range(events):
            time.sleep(rng.uniform(0.005, 0.015))
            record = producer.save_audit_log(AuditEvent(agent, "tick", details=str(i)))
            stored[record.seq] = time.perf_counter()
        thread.join(60)
    finally:
        kind = waiting_kind(consumer.backend)
        consumer.close()
        producer.close()
    latencies = [received[seq] - at for seq, at in stored.items() if seq in received]
    if len(latencies) != events:
        raise RuntimeError(f"only {len(latencies)} of {events} records arrived")
    return latencies, kind


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--stores", default=",".join(STORES))
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = parser.parse_args()
    header("watch(): delivery latency to a waiting consumer")
    results: dict[str, dict[str, object]] = {}
    for name in args.stores.split(","):
        folder = Path(tempfile.mkdtemp(prefix=f"iron-watch-{name}-"))
        try:
            with STORES[name](folder) as url:
                shared = None
                if name == "memory":
                    from iron_runtime_state.backends.memory import MemoryBackend

                    shared = MemoryBackend()  # both managers on one in-process store
                latencies, kind = measure(url, args.events, shared)
        except Exception as exc:  # a store that cannot run here is reported, not fatal
            print(f"{name:<9} skipped: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        ms = sorted(x * 1000 for x in latencies)
        median, p95 = statistics.median(ms), ms[int(len(ms) * 0.95) - 1]
        target = TARGET_MS[name]
        verdict = "meets" if median <= target else "MISSES"
        print(
            f"{name:<9} median {median:7.2f} ms  p95 {p95:7.2f} ms  max {ms[-1]:7.2f} ms  "
            f"target <= {target:.0f} ms ({verdict})  [{kind}]"
        )
        results[name] = {
            "median_ms": median,
            "p95_ms": p95,
            "max_ms": ms[-1],
            "target_ms": target,
            "wait": kind,
        }
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
