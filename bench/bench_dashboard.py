"""The dashboard's first pages at 1,000,000 agents on SQLite: server time per page.

Run: .venv/bin/python bench/bench_dashboard.py [--agents 1000000] [--dir DIR] [--runs 5] [--json FILE]

The fleet: ``--agents`` agents (90% running, 8% stopped, 2% failed), each with the labels
``team`` (one of 20) and ``env``, a spend and a limit, drawing on its team's budget scope; 20
scopes; 10,000 audit records. It is built once into ``DIR/dashboard-<agents>.db`` (a temporary
folder unless ``--dir`` is given, so a second run with the same ``--dir`` reuses it).

A dashboard serves the file (in this process, on a free loopback port) and each page is asked
for ``--runs`` times after one warm-up; the figure is the median **server time**, read from the
``Server-Timing`` header the dashboard sets on every answer (the time until the answer starts,
without the network or the client), with the wall time beside it. Target (issue 19): the first
page under 300 ms. The store call behind the table (``page_agent_states``) is timed alone too,
so a slow page shows whether the store or the dashboard is slow.

What the pages need from the store: ``/`` reads the totals the hub keeps (no store call) and
the feed's ring; ``/agents`` is one ``page_agent_states`` call (a sorted, filtered page of the
fleet); ``/parts/spenders`` is the same call sorted by spend. ``Backend.page_agents``'s default
sorts every matching agent in Python: a store answers it from indexes (SQLite: an index per
sort order, ``(status, agent_id)``, ``(budget_spent, agent_id)``, and the labels index) to meet
the target.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT))

from _harness import header  # noqa: E402
from iron_runtime_state import AgentId, AgentState, AgentStatus, AuditEvent, StateManager  # noqa: E402
from iron_runtime_state.dashboard import DashboardServer, DashboardSettings  # noqa: E402

TEAMS = 20
CHUNK = 10_000
RECORDS = 10_000
TARGET_MS = 300.0

PAGES = (
    ("overview", "/"),
    ("agents table, first page", "/agents"),
    ("agents table, by label", "/agents?labels=team%3Dt7"),
    ("agents table, failed by spend", "/agents?status=failed&order_by=budget_spent&descending=1"),
    ("agents table, page 10,000", "/agents?offset=500000"),
    ("top spenders (overview part)", "/parts/spenders"),
    ("one agent", "/agents/{agent}"),
    ("metrics", "/metrics"),
)


def build(path: Path, agents: int) -> float:
    """Write the fleet into ``path``; the seconds it took."""
    started = time.perf_counter()
    rng = random.Random(19)
    with StateManager.from_url(f"sqlite:///{path}") as manager:
        for team in range(TEAMS):
            manager.set_budget(f"team:t{team}", limit=1e8, period="month")
        done = 0
        while done < agents:
            batch = []
            for i in range(done, min(done + CHUNK, agents)):
                roll = rng.random()
                status = (
                    AgentStatus.RUNNING
                    if roll < 0.9
                    else AgentStatus.STOPPED
                    if roll < 0.98
                    else AgentStatus.FAILED
                )
                batch.append(
                    AgentState(
                        AgentId.generate(),
                        status,
                        budget_spent=round(rng.uniform(0, 50), 6),
                        budget_limit=100.0,
                        labels={"team": f"t{i % TEAMS}", "env": "prod" if i % 3 else "dev"},
                        budget_scopes=(f"team:t{i % TEAMS}",),
                    )
                )
            manager.save_agent_states(batch)
            done += len(batch)
            print(f"\r  built {done:,} agents", end="", flush=True)
        writer = AgentId.generate()
        manager.save_audit_logs(
            [AuditEvent(writer, "tool_call", details=f"call {i}") for i in range(RECORDS)]
        )
    print()
    return time.perf_counter() - started


def ask(base: str, path: str) -> tuple[float, float, int]:
    """Server time (ms, from Server-Timing), wall time (ms) and status of one GET."""
    started = time.perf_counter()
    with urllib.request.urlopen(base + path, timeout=600) as response:
        response.read()
        status = response.status
        timing = response.headers["Server-Timing"]
    wall = (time.perf_counter() - started) * 1000
    server = float(timing.split("dur=")[1]) if timing else wall
    return server, wall, status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=1_000_000)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    folder = args.dir or Path(tempfile.mkdtemp(prefix="iron-dashboard-"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"dashboard-{args.agents}.db"
    header(f"dashboard pages at {args.agents:,} agents on SQLite")
    try:
        if not path.exists():
            print(f"building {path} ...")
            print(f"  built in {build(path, args.agents):.0f}s")
        url = f"sqlite:///{path}"
        with StateManager.from_url(url) as manager:
            total = manager.stats().total
            agent = manager.page_agent_states(limit=1)[0].agent_id
            store_times = []
            for order in ("agent_id", "budget_spent"):
                started = time.perf_counter()
                manager.page_agent_states(order_by=order, descending=order != "agent_id", limit=51)
                store_times.append((order, (time.perf_counter() - started) * 1000))
        print(
            f"store: {total:,} agents; page_agent_states(limit=51) alone: "
            + ", ".join(f"by {o} {ms:,.0f} ms" for o, ms in store_times)
        )
        settings = DashboardSettings.for_url(url, refresh=5.0, verify_every=0, timeout=600)
        server = DashboardServer(settings, "127.0.0.1", 0)
        server.start()
        results: dict[str, dict[str, float]] = {}
        try:
            base = server.url.rstrip("/")
            for name, template in PAGES:
                page = template.format(agent=agent)
                ask(base, page)  # warm-up: caches, the hub's first read
                runs = [ask(base, page) for _ in range(args.runs)]
                server_ms = statistics.median(r[0] for r in runs)
                wall_ms = statistics.median(r[1] for r in runs)
                target = (
                    f"  target < {TARGET_MS:.0f} ms ({'meets' if server_ms < TARGET_MS else 'MISSES'})"
                    if name
                    in (
                        "overview",
                        "agents table, first page",
                    )
                    else ""
                )
                print(
                    f"{name:<32} server {server_ms:9.1f} ms  wall {wall_ms:9.1f} ms  [{runs[0][2]}]{target}"
                )
                results[name] = {"server_ms": server_ms, "wall_ms": wall_ms}
        finally:
            server.stop()
        if args.json:
            args.json.write_text(json.dumps({"agents": total, "pages": results}, indent=2))
    finally:
        if args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
