"""A separate process for tests/test_sqlite*.py: ``python tests/sqlite_worker.py <job> <args...>``.

Each job works on a SQLite store given by URL and reports on stdout, one line per event,
flushed at once (the parent reads them while the job runs, and may kill it with SIGKILL).
Jobs that race other processes wait for a line on stdin before they start, so they all begin
together. A failed check exits with status 2; any other error with status 1 and a traceback on
stderr.
"""

from __future__ import annotations

import json
import random
import sys
import threading
import time
from collections.abc import Callable

from iron_runtime_state import (
    AgentId,
    AgentState,
    AgentStatus,
    AuditEvent,
    BudgetExceeded,
    StateManager,
)
from iron_runtime_state.money import from_micros, to_micros


def say(*words: object) -> None:
    """One line on stdout, flushed: the parent counts it as done."""
    sys.stdout.write(" ".join(str(w) for w in words) + "\n")
    sys.stdout.flush()


def wait_for_go() -> None:
    say("ready")
    sys.stdin.readline()


def durable(url: str) -> None:
    """Write forever; report each write once the call returned (acknowledged)."""
    with StateManager.from_url(url) as manager:
        spender = AgentId.generate()
        manager.save_agent_state(AgentState(spender, AgentStatus.RUNNING))
        say("spender", spender)
        i = 0
        while True:
            i += 1
            agent_id = AgentId.test_fixture(i)
            manager.save_agent_state(AgentState(agent_id, AgentStatus.RUNNING, float(i), i % 7))
            say("state", agent_id, i)
            state = manager.record_spend(spender, 1.0)
            say("spend", state.budget_spent)
            record = manager.save_audit_log(AuditEvent(spender, "ack", i, f"w{i}"))
            say("audit", record.seq, f"w{i}")
            if i % 5 == 0:
                batch = [AuditEvent(agent_id, "bulk", i, f"b{i}.{k}") for k in range(4)]
                for record in manager.save_audit_logs(batch):
                    say("audit", record.seq, record.event.details)


def spend(url: str, agent: str, count: str) -> None:
    with StateManager.from_url(url) as manager:
        wait_for_go()
        for _ in range(int(count)):
            manager.record_spend(agent, 1.0)
        say("done")


def mixed(url: str, shared: str, seed: str, rounds: str) -> None:
    """Read and write at once with the other workers; report what this one added."""
    rng = random.Random(int(seed))
    with StateManager.from_url(url) as manager:
        own = [AgentId.generate() for _ in range(5)]
        wait_for_go()
        spent = 0.0
        pii = audits = 0
        for n in range(int(rounds)):
            action = n % 8
            if action == 0:
                agent_id = rng.choice(own)
                manager.save_agent_state(AgentState(agent_id, AgentStatus.RUNNING, float(n), 0, 1e9))
            elif action == 1:
                manager.record_spend(shared, 0.5)
                spent += 0.5
            elif action == 2:
                manager.update_agent_state(shared, _add_pii)
                pii += 1
            elif action == 3:
                manager.save_audit_log(AuditEvent(AgentId(shared), "tick", n, seed))
                audits += 1
            elif action == 4:
                manager.get_agent_state(shared)
                manager.get_agent_states(own)
                manager.stats()
            elif action == 5:
                manager.audit_log(agent_id=shared, limit=20)
                manager.list_agents()
            elif action == 6:
                with manager.budget(shared, 0.25) as hold:
                    hold.commit(0.25)
                spent += 0.25
            else:
                manager.record_pii_detection(shared, details=seed)
                pii += 1
                audits += 1
        say("added", spent, pii, audits)


def _add_pii(state: AgentState) -> AgentState:
    state.pii_detections += 1
    return state


def reserve(url: str, agent: str, limit: str, rounds: str, seed: str) -> None:
    """Random holds and commits against one limit; check spent + held after every hold."""
    rng = random.Random(int(seed))
    cap = float(limit)
    with StateManager.from_url(url) as manager:
        agent_id = AgentId(agent)
        wait_for_go()
        for _ in range(int(rounds)):
            amount = rng.choice([0.25, 0.5, 1.0, 2.0])
            try:
                hold = manager.reserve_budget(agent_id, amount, ttl=60.0)
            except BudgetExceeded:
                continue
            state, held = manager.backend.reserved(agent_id, time.time())  # held: micro-units
            if to_micros(state.budget_spent) + held > to_micros(cap):
                say("violation", state.budget_spent, from_micros(held))
                sys.exit(2)
            if rng.random() < 0.3:
                manager.release_reservation(hold)
            else:
                actual = rng.choice([amount, amount / 2, 0.0])
                manager.commit_reservation(hold, actual)
                say("commit", actual)
        say("done")


def hold(url: str, agent: str, amount: str, ttl: str) -> None:
    """Take holds, report them, then wait to be killed."""
    with StateManager.from_url(url) as manager:
        for _ in range(2):
            reservation = manager.reserve_budget(agent, float(amount) / 2, ttl=float(ttl))
            say("held", reservation.reservation_id, reservation.expires_at)
        time.sleep(600)


def changes(url: str, agent: str, refused: str) -> None:
    """Change counters and statuses, and spend past a limit, until killed (each implies an event)."""
    with StateManager.from_url(url) as manager:
        say("ready")
        statuses = (AgentStatus.STOPPED, AgentStatus.RUNNING)
        n = 0
        while True:
            n += 1
            manager.record_pii_detection(agent, 1 + n % 3, details=f"n{n}")
            manager.set_status(agent, statuses[n % 2])
            try:
                manager.record_spend(refused, 1.0)
            except BudgetExceeded:
                say("refused")


def ledger(url: str, plain: str, scoped: str) -> None:
    """Settle spends (each with its ledger record and any threshold alerts) until killed."""
    with StateManager.from_url(url) as manager:
        say("ready")
        n = 0
        while True:
            n += 1
            manager.record_spend(plain, "0.01", tags={"n": str(n % 3)})
            manager.record_spend(scoped, "0.02")
            hold = manager.reserve_budget(scoped, "0.05")
            manager.commit_reservation(hold, "0.03", tags={"held": "yes"})


def hold_ahead(url: str, agent: str, amount: str, skew: str) -> None:
    """Reserve with a clock ``skew`` seconds off the real one; report what the store allowed."""
    real = time.time
    time.time = lambda: real() + float(skew)
    with StateManager.from_url(url) as manager:
        available = manager.budget_available(agent)
        try:
            manager.reserve_budget(agent, float(amount), ttl=60.0)
        except BudgetExceeded:
            say("refused", available)
        else:
            say("held", available)


def append(url: str, tag: str, count: str) -> None:
    """Append numbered events (singles and batches) once the parent says go."""
    with StateManager.from_url(url) as manager:
        agent_id = AgentId.generate()
        wait_for_go()
        j = 0
        while j < int(count):
            if j % 7 == 0:
                manager.save_audit_logs(
                    [AuditEvent(agent_id, "batch", j, f"{tag}:{j + k}") for k in range(3)]
                )
                j += 3
            else:
                manager.save_audit_log(AuditEvent(agent_id, "single", j, f"{tag}:{j}"))
                j += 1
        say("done", j)


def create(url: str, tag: str) -> None:
    """Open the store only once the parent says go (all workers open a new file at once)."""
    wait_for_go()
    with StateManager.from_url(url) as manager:
        agent_id = AgentId.generate()
        manager.save_agent_state(AgentState(agent_id, AgentStatus.RUNNING))
        manager.save_audit_log(AuditEvent(agent_id, "created", 1, tag))
        say("done", agent_id)


def open_store(path: str) -> None:
    """Try to open a store at ``path``; report the outcome as JSON (for unprivileged runs)."""
    try:
        StateManager.with_sqlite(path).close()
    except Exception as exc:
        cause = exc.__cause__
        say(
            json.dumps(
                {
                    "error": type(exc).__name__,
                    "message": str(exc),
                    "cause": None if cause is None else type(cause).__name__,
                }
            )
        )
    else:
        say(json.dumps({"error": None}))


def scoped(url: str, agents: str, seed: str, rounds: str) -> None:
    """8 threads spend, reserve, commit and release on agents that share budget scopes; report
    what each agent was charged (micro-units, as JSON) once they are done."""
    ids = [AgentId(text) for text in agents.split(",")]
    charged = dict.fromkeys(agents.split(","), 0)
    lock = threading.Lock()
    with StateManager.from_url(url) as manager:

        def run(k: int) -> None:
            rng = random.Random(int(seed) * 100 + k)
            for _ in range(int(rounds)):
                agent_id = rng.choice(ids)
                amount = rng.choice([0.25, 0.5, 1.0])
                try:
                    if rng.random() < 0.5:
                        manager.record_spend(agent_id, amount)
                        paid = amount
                    else:
                        hold = manager.reserve_budget(agent_id, amount, ttl=60.0)
                        if rng.random() < 0.3:
                            manager.release_reservation(hold)
                            paid = 0.0
                        else:
                            paid = rng.choice([amount, amount / 2])
                            manager.commit_reservation(hold, paid)
                except BudgetExceeded:
                    continue
                with lock:
                    charged[agent_id.as_str()] += to_micros(paid)

        threads = [threading.Thread(target=run, args=(k,)) for k in range(8)]
        wait_for_go()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    say("charged", json.dumps(charged))


def tick(url: str, count: str, gap: str) -> None:
    """Append an event every ``gap`` seconds or so, its details the time just before the append.

    The gaps vary (0.5 to 1.5 times ``gap``), so that the appends do not fall in step with a
    consumer that polls.
    """
    rng = random.Random(int(count))
    with StateManager.from_url(url) as manager:
        agent = AgentId.test_fixture(1)
        wait_for_go()
        for _ in range(int(count)):
            time.sleep(float(gap) * rng.uniform(0.5, 1.5))
            record = manager.save_audit_log(AuditEvent(agent, "tick", 1_700_000_000, repr(time.time())))
            say("appended", record.seq)
        # An agent's change commits but appends nothing: a waiting watch must not see a record.
        manager.save_agent_state(AgentState(agent, AgentStatus.RUNNING))
        say("saved")


JOBS: dict[str, Callable[..., None]] = {
    "durable": durable,
    "spend": spend,
    "mixed": mixed,
    "ledger": ledger,
    "reserve": reserve,
    "hold": hold,
    "hold_ahead": hold_ahead,
    "changes": changes,
    "append": append,
    "create": create,
    "open": open_store,
    "scoped": scoped,
    "tick": tick,
}

if __name__ == "__main__":
    JOBS[sys.argv[1]](*sys.argv[2:])
