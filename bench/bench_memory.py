"""In-memory store: our operations against a dict behind a lock, at several fleet sizes.

Run: .venv/bin/python bench/bench_memory.py [--quick] [--json out.json]

Baseline: a plain dict of slotted dataclasses keyed by the id string, behind a threading.Lock,
copying the dataclass on every read and write (what a careful hand-rolled store does, without
validation, statistics, reservations or an audit trail). Ours goes through the public
``StateManager``. Both read and write agents in the same random order, so a large fleet pays
its cache misses on both sides.

Targets (time ratio, ours over the baseline, at every size): get <= 2.5x, save <= 3x,
record_spend <= 4x; no cliff: the ratio at the largest size at most 1.3x the ratio at 1,000;
at most 250 bytes held per agent at 1,000,000 agents.
"""

from __future__ import annotations

import argparse
import gc
import random
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from _harness import (
    RELEASE_0_6,
    Comparison,
    Op,
    compare,
    compare_with_previous_release,
    header,
    save_json,
)
from iron_runtime_state import AgentId, AgentState, AgentStatus, AuditEvent, StateManager
from iron_runtime_state.audit_chain import AuditChain

#: Operation name -> the largest time ratio aimed for.
TARGETS = {
    "get_agent_state(str)": 2.5,
    "get_agent_state(AgentId)": 2.5,
    "save_agent_state": 3.0,
    "record_spend": 4.0,
}
CLIFF = 1.3  # ratio at the largest size / ratio at the smallest, at most
BYTES_PER_AGENT = 250


@dataclass(slots=True)
class PlainState:
    agent_id: str
    status: str
    budget_spent: float
    pii_detections: int
    budget_limit: float | None


class PlainStore:
    """The raw baseline: a dict behind a lock, returning dataclass copies."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.data: dict[str, PlainState] = {}

    def get(self, key: str) -> PlainState | None:
        with self.lock:
            s = self.data.get(key)
            if s is None:
                return None
            return PlainState(s.agent_id, s.status, s.budget_spent, s.pii_detections, s.budget_limit)

    def save(self, s: PlainState) -> None:
        copy = PlainState(s.agent_id, s.status, s.budget_spent, s.pii_detections, s.budget_limit)
        with self.lock:
            self.data[s.agent_id] = copy

    def update(self, key: str, fn: Callable[[PlainState], PlainState]) -> PlainState:
        with self.lock:
            s = self.data[key]
            new = fn(PlainState(s.agent_id, s.status, s.budget_spent, s.pii_detections, s.budget_limit))
            self.data[key] = new
            return PlainState(
                new.agent_id, new.status, new.budget_spent, new.pii_detections, new.budget_limit
            )

    def spend(self, key: str, amount: float) -> PlainState:
        with self.lock:
            s = self.data[key]
            total = s.budget_spent + amount
            if s.budget_limit is not None and total > s.budget_limit:
                raise ValueError("over")
            s.budget_spent = total
            return PlainState(s.agent_id, s.status, s.budget_spent, s.pii_detections, s.budget_limit)


def calls(fn: Callable[[Any], object], items: list[Any]) -> Op:
    """An operation that calls ``fn(item)`` for each of the first ``count`` items."""

    def run(count: int) -> None:
        for item in items[:count]:
            fn(item)

    return run


def fleet(agents: int, n: int) -> tuple[StateManager, PlainStore, list[AgentId]]:
    """Both stores holding the same ``agents`` running agents, and ``n`` of them drawn at random."""
    manager, plain = StateManager(), PlainStore()
    ids = [AgentId.generate() for _ in range(agents)]
    manager.save_agent_states(AgentState(a, AgentStatus.RUNNING) for a in ids)
    for a in ids:
        plain.save(PlainState(a.as_str(), "running", 0.0, 0, None))
    rng = random.Random(agents)
    return manager, plain, [ids[rng.randrange(agents)] for _ in range(n)]


def fleet_ops(agents: int, n: int, runs: int) -> list[Comparison]:
    """The table's four operations on a fleet of ``agents``, each ``n`` times per run."""
    manager, plain, picked = fleet(agents, n)
    texts = [a.as_str() for a in picked]
    # Every save stores a spend not stored before, so that it changes the agent's values.
    states = [AgentState(a, AgentStatus.RUNNING, float(k + 1), 1, None) for k, a in enumerate(picked)]
    plains = [PlainState(t, "running", float(k + 1), 1, None) for k, t in enumerate(texts)]

    def spend(count: int) -> None:
        record = manager.record_spend
        for agent_id in picked[:count]:
            record(agent_id, 0.01)

    def base_spend(count: int) -> None:
        record = plain.spend
        for key in texts[:count]:
            record(key, 0.01)

    base_get = calls(plain.get, texts)
    pairs = [
        ("get_agent_state(str)", calls(manager.get_agent_state, texts), base_get),
        ("get_agent_state(AgentId)", calls(manager.get_agent_state, picked), base_get),
        ("save_agent_state", calls(manager.save_agent_state, states), calls(plain.save, plains)),
        ("record_spend", spend, base_spend),
    ]
    results = []
    for name, ours, base in pairs:
        result = compare(name, ours, base, n=n, runs=runs)
        result.extra["agents"] = agents
        results.append(result)
    return results


def bump(state: AgentState) -> AgentState:
    state.pii_detections += 1
    return state


def bump_plain(state: PlainState) -> PlainState:
    state.pii_detections += 1
    return state


class NoChain(AuditChain):
    """Appends without hashing, to price the hash chain."""

    def seal(self, prev_hash: str, seq: int, agent: str, kind: str, ts: int, details: str) -> str:
        return prev_hash


def other_ops(n: int, runs: int) -> list[Comparison]:
    """Figures beyond the table, at 10,000 agents: updates, holds and the hash chain."""
    manager, plain, picked = fleet(10_000, n)
    texts = [a.as_str() for a in picked]
    backend = manager.backend
    event = AuditEvent(picked[0], "tool_call", 1_700_000_000, "called search with 3 arguments")

    def update(count: int) -> None:
        for agent_id in picked[:count]:
            manager.update_agent_state(agent_id, bump)

    def base_update(count: int) -> None:
        for key in texts[:count]:
            plain.update(key, bump_plain)

    def spend(count: int) -> None:
        for agent_id in picked[:count]:
            manager.record_spend(agent_id, 0.01)

    def reserve_commit(count: int) -> None:
        for agent_id in picked[:count]:
            manager.commit_reservation(manager.reserve_budget(agent_id, 0.02), 0.01)

    def append(chain: AuditChain) -> Op:
        return calls(lambda _: backend.append_audit((event,), chain), picked)

    return [
        compare("update_agent_state vs dict update", update, base_update, n=n, runs=runs),
        compare("reserve+commit vs record_spend", reserve_commit, spend, n=n // 2, runs=runs),
        compare("audit append: chain vs no chain", append(AuditChain()), append(NoChain()), n=n, runs=runs),
    ]


def budget_ops(n: int, runs: int) -> list[Comparison]:
    """The budget model's figures: two scopes against none, and this release against 0.5.0."""
    manager = StateManager()
    for scope in ("org:acme", "team:support"):
        manager.set_budget(scope, limit=1e8, period="month")
    plain, scoped = [AgentId.generate() for _ in range(100)], [AgentId.generate() for _ in range(100)]
    manager.save_agent_states(AgentState(a, AgentStatus.RUNNING, budget_limit=1e6) for a in plain)
    manager.save_agent_states(
        AgentState(a, AgentStatus.RUNNING, budget_limit=1e6, budget_scopes=("org:acme", "team:support"))
        for a in scoped
    )

    def spend(agents: list[AgentId]) -> Op:
        def run(count: int) -> None:
            for k in range(count):
                manager.record_spend(agents[k % 100], 0.000001)

        return run

    def reserve_commit(agents: list[AgentId]) -> Op:
        def run(count: int) -> None:
            for k in range(count):
                manager.commit_reservation(manager.reserve_budget(agents[k % 100], 0.000002), 0.000001)

        return run

    previous = """
from iron_runtime_state import AgentId, AgentState, AgentStatus, StateManager
manager = StateManager()
agents = [AgentId.generate() for _ in range(100)]
for a in agents:
    manager.save_agent_state(AgentState(a, AgentStatus.RUNNING, budget_limit=1e6))
def op(count):
    for k in range(count):
        manager.record_spend(agents[k % 100], 0.000001)
"""
    hold_setup = previous.replace(
        """def op(count):
    for k in range(count):
        manager.record_spend(agents[k % 100], 0.000001)""",
        """def op(count):
    for k in range(count):
        hold = manager.reserve_budget(agents[k % 100], 0.000002)
        manager.commit_reservation(hold, 0.000001)""",
    )
    return [
        compare(
            "record_spend: 2 scopes vs none", spend(scoped), spend(plain), n=n, runs=runs, target="<= 2.5x"
        ),
        compare(
            "reserve+commit: 2 scopes vs none",
            reserve_commit(scoped),
            reserve_commit(plain),
            n=n // 2,
            runs=runs,
            target="<= 2.5x",
        ),
        compare_with_previous_release("record_spend, no period: this vs 0.5.0", previous, n=n, runs=runs),
        # Issue 17: every settled spend appends its ledger record (a SHA-256 in the chain).
        compare_with_previous_release(
            "record_spend with ledger vs 0.6.0",
            previous,
            n=n,
            runs=runs,
            target="<= 4x",
            release=RELEASE_0_6,
        ),
        compare_with_previous_release(
            "reserve+commit with ledger vs 0.6.0",
            hold_setup,
            n=n // 2,
            runs=runs,
            target="<= 4x",
            release=RELEASE_0_6,
        ),
    ]


MEMORY_CHILD = r"""
import gc, sys
sys.path.insert(0, {bench!r})
from _harness import rss_bytes
from iron_runtime_state import AgentId, AgentState, AgentStatus, StateManager
import bench_memory
n, kind, chunk = {n}, {kind!r}, 10_000
store = StateManager() if kind == "ours" else bench_memory.PlainStore()
gc.collect()
before = rss_bytes()
# Agents arrive in chunks and only the store keeps them: what is measured is what it holds.
for _ in range(n // chunk):
    ids = [AgentId.generate() for _ in range(chunk)]
    if kind == "ours":
        store.save_agent_states([AgentState(a, AgentStatus.RUNNING, 1.5, 2, 10.0) for a in ids])
    else:
        for a in ids:
            store.save(bench_memory.PlainState("agent_" + str(a.uuid), "running", 1.5, 2, 10.0))
    del ids
gc.collect()
rss = (rss_bytes() - before) / n
# Freed temporaries stay in glibc's heap until trimmed; what the store holds is measured after.
import ctypes
ctypes.CDLL("libc.so.6").malloc_trim(0)
print(rss, (rss_bytes() - before) / n)
"""


def memory_per_agent(n: int) -> dict[str, float]:
    """Bytes held per agent by ours and by the baseline, each measured in a fresh process."""
    out = {}
    for kind in ("ours", "plain"):
        code = MEMORY_CHILD.format(bench=str(Path(__file__).parent), n=n, kind=kind)
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        rss, held = (float(x) for x in result.stdout.split())
        out[kind], out[kind + "_rss"] = held, rss
    return out


def table(sizes: list[int], results: list[Comparison]) -> None:
    """Time ratios (ours / baseline) per operation and fleet size, against the targets."""
    by = {(r.name, r.extra["agents"]): r for r in results}
    cols = "".join(f"{f'{size:,} agents':>17}" for size in sizes)
    print(f"\n{'operation':<26}{cols}{'cliff':>8}  target", flush=True)
    for name, target in TARGETS.items():
        cells, ratios = "", []
        for size in sizes:
            r = by[(name, size)]
            ratios.append(r.ratio)
            cells += f"{r.ratio:6.2f}x {r.ours_s * 1e9:5.0f} ns{'' if r.ratio <= target else ' !':2}"
        cliff = ratios[-1] / ratios[0]
        mark = "" if cliff <= CLIFF else " !"
        print(f"{name:<26}{cells}{cliff:6.2f}x{mark:2} <= {target}x, cliff <= {CLIFF}x", flush=True)
    print("(time ratio, then our time per call; ! marks a missed target)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer calls and runs, fleets up to 100,000")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    header("in-memory store vs dict behind a lock")
    sizes = [1_000, 100_000] if args.quick else [1_000, 100_000, 1_000_000]
    n, runs = (20_000, 5) if args.quick else (100_000, 9)
    results: list[Comparison] = []
    for size in sizes:
        print(f"fleet of {size:,} agents ...", flush=True)
        results += fleet_ops(size, n, runs)
        gc.collect()
    table(sizes, results)
    print(flush=True)
    others = other_ops(n, runs)
    print(flush=True)
    others += budget_ops(n, runs)
    memory = memory_per_agent(sizes[-1])
    mark = "" if memory["ours"] <= BYTES_PER_AGENT else "  !"
    print(
        f"\nmemory per agent at {sizes[-1]:,} agents: ours {memory['ours']:.0f} B "
        f"(RSS {memory['ours_rss']:.0f} before trimming the heap), dict of dataclasses "
        f"{memory['plain']:.0f} B (RSS {memory['plain_rss']:.0f}); target <= {BYTES_PER_AGENT} B{mark}",
        flush=True,
    )
    save_json(args.json, results + others, memory_per_agent=memory, sizes=sizes)


if __name__ == "__main__":
    main()
