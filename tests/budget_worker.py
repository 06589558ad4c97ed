"""A separate process for tests/test_overspend_processes.py.

Run as ``python tests/budget_worker.py <job> <args...>``.

Each job opens the store at a URL and reports on stdout, one flushed line at a time. Jobs that
race other processes say ``ready`` and wait for a line on stdin, so they all start together.
Any error exits with a non-zero status and a traceback on stderr.
"""

from __future__ import annotations

import json
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable

from iron_runtime_state import BudgetExceeded, ReservationError, StateManager
from iron_runtime_state.money import to_micros

#: What a call costs (decimal strings: exact in micro-units, and awkward as binary floats).
AMOUNTS = ("0.1", "0.3", "0.7", "1.1")
#: The ttl of the hammer's holds: far longer than a call, so none expires before it is settled.
HOLD_TTL = 30.0


def say(*words: object) -> None:
    """One line on stdout, flushed at once (the parent reads while the job runs)."""
    sys.stdout.write(" ".join(str(w) for w in words) + "\n")
    sys.stdout.flush()


def wait_for_go() -> None:
    say("ready")
    sys.stdin.readline()


def run_threads(count: int, work: Callable[[int], None]) -> None:
    """``work(i)`` in ``count`` threads; the first error is raised here."""
    errors: list[BaseException] = []

    def guarded(i: int) -> None:
        try:
            work(i)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def hammer(url: str, seed: str, threads: str, rounds: str, *agents: str) -> None:
    """Spend, reserve and commit (at most the hold), or release, at random on ``agents``.

    Reports what it charged to each agent (micro-units) and which budget refused each call
    (the scope, or "" for the agent's own limit).
    """
    charged: Counter[str] = Counter()
    refused: Counter[str] = Counter()
    calls: Counter[str] = Counter()
    lock = threading.Lock()

    with StateManager.from_url(url) as manager:

        def work(i: int) -> None:
            rng = random.Random(int(seed) * 1000 + i)
            for _ in range(int(rounds)):
                agent = rng.choice(agents)
                amount = rng.choice(AMOUNTS)
                actual = rng.choice([amount, "0.05", "0"])
                kind = rng.random()
                cost = "0"
                try:
                    if kind < 0.4:
                        manager.record_spend(agent, amount)
                        cost, call = amount, "spend"
                    elif kind < 0.55:
                        with manager.budget(agent, amount, ttl=HOLD_TTL) as hold:
                            hold.commit(actual)
                        cost, call = actual, "budget"
                    else:
                        reservation = manager.reserve_budget(agent, amount, ttl=HOLD_TTL)
                        if rng.random() < 0.25:
                            manager.release_reservation(reservation)
                            call = "release"
                        else:
                            manager.commit_reservation(reservation, actual)
                            cost, call = actual, "commit"
                except BudgetExceeded as exc:
                    with lock:
                        refused[exc.scope or ""] += 1
                    continue
                except ReservationError:  # a hold that expired before it was settled
                    call = "expired"
                with lock:
                    charged[agent] += to_micros(cost)
                    calls[call] += 1

        wait_for_go()
        run_threads(int(threads), work)
    say(json.dumps({"charged": charged, "refused": refused, "calls": calls}))


def hold(url: str, agent: str, ttl: str, count: str, amount: str) -> None:
    """Take ``count`` holds, say ``held``, then wait to be killed."""
    manager = StateManager.from_url(url)
    for _ in range(int(count)):
        manager.reserve_budget(agent, amount, ttl=float(ttl))
    say("held")
    time.sleep(600)


def race(url: str, now: str, threads: str, rounds: str, *agents: str) -> None:
    """Spend 0.25 at a time with a clock stopped at ``now`` (just past a period boundary)."""
    spends: Counter[str] = Counter()
    lock = threading.Lock()
    with StateManager.from_url(url, clock=lambda: float(now)) as manager:

        def work(i: int) -> None:
            for n in range(int(rounds)):
                agent = agents[(i + n) % len(agents)]
                manager.record_spend(agent, "0.25")
                with lock:
                    spends[agent] += 1

        wait_for_go()
        run_threads(int(threads), work)
    say(json.dumps(spends))


JOBS: dict[str, Callable[..., None]] = {"hammer": hammer, "hold": hold, "race": race}

if __name__ == "__main__":
    JOBS[sys.argv[1]](*sys.argv[2:])
