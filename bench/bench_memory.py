"""In-memory store: our operations against a dict behind a lock, and memory per agent.

Run: .venv/bin/python bench/bench_memory.py [--quick] [--json out.json]

Baseline: a plain dict of slotted dataclasses keyed by the id string, behind a threading.Lock,
copying the dataclass on every read and write (what a careful hand-rolled store does, without
validation, statistics, reservations or an audit trail).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _harness import Comparison, compare, header, rss_bytes, save_json
from iron_runtime_state import AgentId, AgentState, AgentStatus, AuditEvent, StateManager
from iron_runtime_state.audit_chain import GENESIS_HASH, AuditChain, canonical_event_json


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

    def update(self, key: str, fn: object) -> PlainState:
        with self.lock:
            s = self.data[key]
            new = fn(PlainState(s.agent_id, s.status, s.budget_spent, s.pii_detections, s.budget_limit))  # type: ignore[operator]
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


class NoChain(AuditChain):
    """Bench-only: appends without hashing, to price the hash chain."""

    def seal(
        self, prev_hash: str, seq: int, agent_id: str, event_type: str, timestamp: int, details: str
    ) -> str:
        return prev_hash


def bump_ours(s: AgentState) -> AgentState:
    s.pii_detections += 1
    return s


def bump_plain(s: PlainState) -> PlainState:
    s.pii_detections += 1
    return s


def operations(n_agents: int, n: int, runs: int) -> list[Comparison]:
    manager = StateManager()
    plain = PlainStore()
    ids = [AgentId.generate() for _ in range(n_agents)]
    keys = [a.as_str() for a in ids]
    # Two versions of each agent, saved in turn, so that every save changes the stored values.
    states = [AgentState(a, AgentStatus.RUNNING, 0.0, 0, None) for a in ids]
    states += [AgentState(a, AgentStatus.RUNNING, 1.5, 1, None) for a in ids]
    plains = [PlainState(k, "running", 0.0, 0, None) for k in keys]
    plains += [PlainState(k, "running", 1.5, 1, None) for k in keys]
    for s in states:
        manager.save_agent_state(s)
    for p in plains:
        plain.save(p)
    m = len(keys)
    m2 = len(states)
    results = []

    def ours_get(count: int) -> None:
        get = manager.get_agent_state
        for i in range(count):
            get(keys[i % m])

    def base_get(count: int) -> None:
        get = plain.get
        for i in range(count):
            get(keys[i % m])

    results.append(compare("get_agent_state(str)", ours_get, base_get, n=n, runs=runs, target="<= 1.5x time"))

    def ours_save(count: int) -> None:
        save = manager.save_agent_state
        for i in range(count):
            save(states[i % m2])

    def base_save(count: int) -> None:
        save = plain.save
        for i in range(count):
            save(plains[i % m2])

    results.append(compare("save_agent_state", ours_save, base_save, n=n, runs=runs, target="<= 1.5x time"))

    def ours_update(count: int) -> None:
        update = manager.update_agent_state
        for i in range(count):
            update(ids[i % m], bump_ours)

    def base_update(count: int) -> None:
        update = plain.update
        for i in range(count):
            update(keys[i % m], bump_plain)

    results.append(compare("update_agent_state", ours_update, base_update, n=n, runs=runs))

    def ours_spend(count: int) -> None:
        spend = manager.record_spend
        for i in range(count):
            spend(ids[i % m], 0.01)

    def base_spend(count: int) -> None:
        spend = plain.spend
        for i in range(count):
            spend(keys[i % m], 0.01)

    results.append(compare("record_spend", ours_spend, base_spend, n=n, runs=runs))

    def ours_pair(count: int) -> None:
        reserve, commit = manager.reserve_budget, manager.commit_reservation
        for i in range(count):
            commit(reserve(ids[i % m], 0.02), 0.01)

    results.append(
        compare(
            "reserve+commit vs record_spend", ours_pair, ours_spend, n=n // 2, runs=runs, target="<= 2.5x"
        )
    )

    backend = manager.backend
    chain, no_chain = AuditChain(), NoChain()
    event = AuditEvent(ids[0], "tool_call", 1_700_000_000, "called search with 3 arguments")

    def with_chain(count: int) -> None:
        append = backend.append_audit
        batch = (event,)
        for _ in range(count):
            append(batch, chain)

    def without_chain(count: int) -> None:
        append = backend.append_audit
        batch = (event,)
        for _ in range(count):
            append(batch, no_chain)

    results.append(
        compare(
            "audit append: chain vs no chain", with_chain, without_chain, n=n, runs=runs, target="<= 1.25x"
        )
    )
    keyed = AuditChain(b"k" * 32)

    def with_hmac(count: int) -> None:
        append = backend.append_audit
        batch = (event,)
        for _ in range(count):
            append(batch, keyed)

    results.append(compare("audit append: HMAC chain vs no chain", with_hmac, without_chain, n=n, runs=runs))

    # The floor: what one seal costs next to an unchained append. The chained append does the
    # unchained one plus a seal, so its ratio cannot go below 1 + seal / unchained append.
    seal, agent = chain.seal, ids[0].as_str()

    def seal_only(count: int) -> None:
        for i in range(count):
            seal(GENESIS_HASH, i, agent, "tool_call", 1_700_000_000, "called search with 3 arguments")

    floor = compare("  one seal vs one unchained append", seal_only, without_chain, n=n, runs=runs)
    print(f"  => the chained append cannot cost less than {1 + floor.ratio:.2f}x here", flush=True)
    results.append(floor)
    # And with no encoding at all: hashlib's SHA-256 of an already encoded record.
    body = canonical_event_json(agent, "tool_call", 1_700_000_000, event.details)
    message = f"{GENESIS_HASH}\n1\n{body}".encode()

    def hash_only(count: int) -> None:
        for _ in range(count):
            hashlib.sha256(message).hexdigest()

    bare = compare("  bare sha256 vs unchained append", hash_only, without_chain, n=n, runs=runs)
    print(f"  => even a seal that only hashed would cost {1 + bare.ratio:.2f}x", flush=True)
    results.append(bare)
    return results


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
    out = {}
    for kind in ("ours", "plain"):
        code = MEMORY_CHILD.format(bench=str(Path(__file__).parent), n=n, kind=kind)
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        rss, held = (float(x) for x in result.stdout.split())
        out[kind] = held
        out[kind + "_rss"] = rss
    print(
        f"{'memory per agent at ' + format(n, ',') + ' agents':<42} ours {out['ours']:6.1f} B "
        f"(RSS {out['ours_rss']:.1f})  dict of dataclasses {out['plain']:6.1f} B "
        f"(RSS {out['plain_rss']:.1f})  target: <= 200 B (aim < 150)",
        flush=True,
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer operations and a smaller store")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    header("in-memory store vs dict behind a lock")
    n, runs, agents = (20_000, 5, 100_000) if args.quick else (100_000, 9, 1_000_000)
    results = operations(min(agents, 10_000), n, runs)
    gc.collect()
    memory = memory_per_agent(agents)
    save_json(args.json, results, memory_per_agent=memory, rss=rss_bytes())


if __name__ == "__main__":
    main()
