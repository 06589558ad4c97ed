"""PostgreSQL: our operations against raw psycopg running the same statements, in the same run.

Run: .venv/bin/python bench/bench_postgres.py [--quick] [--json out.json] [--url postgresql://...]

Starts its own PostgreSQL server (initdb in a temporary folder, tests/postgres_server.py; fsync
off, as for the tests) unless ``--url`` names one. Every figure is a ratio of medians, ours over
the baseline, with the two interleaved (bench/_harness.py). Targets, from issue 18:

- ``get_agent_state`` and ``save_agent_state`` within 1.3x of raw psycopg running the same
  statement on one connection (our call adds validation, the pool, and building the state);
- ``record_spend`` within 1.3x of the same single statement (the schema's ``spend`` function,
  with the spend record as the store sends it on an unkeyed chain, sealed by the server) by hand;
- faster than LangGraph's ``PostgresStore`` (package langgraph-checkpoint-postgres, the
  ``bench`` extra) on the same put and get of one agent's state;
- 4 processes spending on their own agents: at least 1.5x the throughput of one process, with
  where the time goes (client and server CPU per call; the server and the clients share the
  machine's cores).

And issue 16's, on this store:

- a ``record_spend`` on an agent with two budget scopes at most 2.5x one on an agent with none,
  and a reserve + commit with two scopes at most 2.5x one with none;
- the period check adds at most 10% to a spend on an agent without a period: the ``spend``
  statement against a copy of it without the check (bench-only, raw psycopg); and, for
  information, a spend on an agent with a period (checked, not ending) against one without.

And issue 17's (the spend ledger):

- settling with its ledger record (``record_spend``; ``reserve_budget`` + ``commit_reservation``)
  at most 2x settling without one in 0.6.0 (run from a git worktree of that release, each run
  a fresh process, the two alternating; medians);
- 4 processes against 1 (issue 18's figure, >= 1.5x) now that every spend appends a record
  to the one chain: on an unkeyed chain (sealed by the server) and a keyed one (by the client);
  ``--ledger`` runs these and the two above only;
- ``spend_report`` by day over 200,000 ledger rows (1,000,000 without ``--quick``): the time of
  one report, median of several.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
from tests.postgres_server import PostgresServer, server_folder  # noqa: E402

from _harness import (  # noqa: E402
    RELEASE_0_6,
    Comparison,
    Op,
    compare,
    compare_with_previous_release,
    header,
    save_json,
)
from iron_runtime_state import AgentId, AgentState, AgentStatus, StateManager, events  # noqa: E402
from iron_runtime_state.backends.postgres import PostgresBackend  # noqa: E402
from iron_runtime_state.backends.postgres.requests import agent_params  # noqa: E402
from iron_runtime_state.backends.postgres.trail import audit_channel  # noqa: E402
from iron_runtime_state.money import to_micros  # noqa: E402

#: The chains measured: unkeyed (the server seals spend records) and keyed (the client does).
CHAINS: tuple[tuple[str, str | None], ...] = (("unkeyed", None), ("keyed", "bench-audit-key-" + "k" * 16))


@contextlib.contextmanager
def server(given: str | None) -> Iterator[tuple[str, PostgresServer | None]]:
    """The server's URL (no schema), and the server when this bench started it."""
    if given:
        yield given, None
        return
    folder = server_folder()
    started = PostgresServer(folder).start()
    try:
        yield started.url(), started
    finally:
        started.stop()
        shutil.rmtree(folder, ignore_errors=True)


def with_schema(url: str, schema: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}schema={schema}"


def loop(call: Any, *args: Any) -> Op:
    def op(k: int) -> None:
        for _ in range(k):
            call(*args)

    return op


def raw_loop(conn: psycopg.Connection[Any], sql: str, params: Any, *, rows: bool) -> Op:
    """The statement by hand on one connection: execute, and fetch its rows if it returns some."""

    def op(k: int) -> None:
        execute = conn.execute
        if rows:
            for _ in range(k):
                execute(sql, params).fetchall()
        else:
            for _ in range(k):
                execute(sql, params)

    return op


class RawSpender:
    """The ``spend`` function by hand on one connection, with what the store sends on an
    unkeyed chain: the spend record, to be sealed by the server after the head it locks (with
    the highest head seen, kept here as the store keeps it), and the ledger's columns."""

    def __init__(self, conn: psycopg.Connection[Any], schema: str, function: str = "spend") -> None:
        self.conn = conn
        self.statement = f"SELECT * FROM {schema}.{function}({', '.join(['%s'] * 17)})"
        self.channel = audit_channel(f'"{schema}"')
        found = conn.execute(f"SELECT head_seq, head_hash FROM {schema}.audit_chain").fetchone()
        assert found is not None
        self.head: tuple[int, str] = (found[0], found[1])

    def spend(self, agent: AgentId, amount: int) -> None:
        now = time.time()
        event = events.spend(agent, now, amount, (), {}, None, None)
        params: tuple[Any, ...] = (
            agent.as_str(),
            amount,
            now,
            "{}",
            [],
            *self.head,
            None,
            None,
            event.timestamp,
            event.details,
        )
        row = self.conn.execute(self.statement, (*params, self.channel, None, 0, 0, 0, None)).fetchone()
        assert row is not None
        assert row[0] is not None, "the raw spend fell to the general path"
        self.head = (row[-3], row[-2])


def versus_raw(url: str, *, quick: bool) -> list[Comparison]:
    n, runs = (300, 7) if quick else (1000, 15)
    manager = StateManager.from_url(with_schema(url, "bench"))
    backend = manager.backend
    assert isinstance(backend, PostgresBackend)
    sql = backend.ops.sql
    raw = psycopg.connect(url, autocommit=True)
    results: list[Comparison] = []
    ids = [AgentId.generate() for _ in range(1000)]
    # Agents 0 and 1 (read and saved) have an everyday limit; 2 and 3 (charged) one they never reach.
    manager.save_agent_states(
        AgentState(a, AgentStatus.RUNNING, 1.5, 2, 100.0 if i < 2 else 1e9) for i, a in enumerate(ids)
    )
    agent = ids[0]
    key = agent.as_str()
    state = manager.get_agent_state(agent)
    assert state is not None

    results.append(
        compare(
            "get_agent_state vs raw SELECT",
            loop(manager.get_agent_state, agent),
            raw_loop(raw, sql["get"], (key,), rows=True),
            n=n,
            runs=runs,
            target="<= 1.3x",
        )
    )
    # A save of an agent that exists is one UPDATE. The raw one's values are made once; only its
    # time is new on each call, as in any save (a row rewritten with the very same values costs
    # the server less: its WAL record shrinks).
    values, other = agent_params(state), ids[1].as_str()

    def raw_save(k: int) -> None:
        execute, update = raw.execute, sql["replace"]
        for _ in range(k):
            execute(update, (*values, time.time(), other))

    results.append(
        compare(
            "save_agent_state vs raw UPDATE",
            loop(manager.save_agent_state, state),
            raw_save,
            n=n,
            runs=runs,
            target="<= 1.3x",
        )
    )

    spender = RawSpender(raw, "bench")

    def raw_spend(k: int) -> None:
        spender.head = RawSpender(raw, "bench").head  # ours moved it meanwhile
        spend, target, amount = spender.spend, ids[2], to_micros(0.25)
        for _ in range(k):
            spend(target, amount)

    manager.record_spend(ids[3], 0.25)  # the store object learns the head: the fast path from now on

    results.append(
        compare(
            "record_spend vs the spend statement by hand",
            loop(manager.record_spend, ids[3], 0.25),
            raw_spend,
            n=n,
            runs=runs,
            target="<= 1.3x",
        )
    )
    raw.close()
    manager.close()
    return results


def versus_langgraph(url: str, *, quick: bool) -> list[Comparison]:
    """The same put and get of one agent's state: ours against LangGraph's PostgresStore."""
    try:
        from langgraph.store.postgres import PostgresStore
    except ImportError:
        print(
            "LangGraph's PostgresStore: skipped, langgraph-checkpoint-postgres is not installed "
            "(pip install 'iron-runtime-state[bench]')",
            flush=True,
        )
        return []
    n, runs = (300, 7) if quick else (1000, 11)
    results: list[Comparison] = []
    with (
        StateManager.from_url(with_schema(url, "bench_lg")) as manager,
        PostgresStore.from_conn_string(url) as store,
    ):
        store.setup()
        agent = AgentId.generate()
        state = AgentState(agent, AgentStatus.RUNNING, 1.5, 2, 100.0, labels={"team": "support"})
        value = state.to_dict()
        namespace, key = ("agents",), agent.as_str()
        store.put(namespace, key, value)
        manager.save_agent_state(state)
        results.append(
            compare(
                "save_agent_state vs PostgresStore.put",
                loop(manager.save_agent_state, state),
                loop(store.put, namespace, key, value),
                n=n,
                runs=runs,
                target="< 1.0x",
            )
        )
        results.append(
            compare(
                "get_agent_state vs PostgresStore.get",
                loop(manager.get_agent_state, agent),
                loop(store.get, namespace, key),
                n=n,
                runs=runs,
                target="< 1.0x",
            )
        )
    return results


def scopes_cost(url: str, *, quick: bool) -> list[Comparison]:
    """A spend, and a reserve + commit, on an agent with two scopes against one with none."""
    n, runs = (200, 7) if quick else (600, 11)
    manager = StateManager.from_url(with_schema(url, "bench_scopes"))
    manager.set_budget("org:bench", limit=1e9)
    manager.set_budget("team:bench", limit=1e9)
    plain, scoped = AgentId.generate(), AgentId.generate()
    manager.save_agent_state(AgentState(plain, AgentStatus.RUNNING, budget_limit=1e9))
    manager.save_agent_state(
        AgentState(scoped, AgentStatus.RUNNING, budget_limit=1e9, budget_scopes=("org:bench", "team:bench"))
    )

    def pairs(agent: AgentId) -> Op:
        def pair(k: int) -> None:
            reserve, commit = manager.reserve_budget, manager.commit_reservation
            for _ in range(k):
                commit(reserve(agent, 1.0), 0.5)

        return pair

    results = [
        compare(
            "record_spend, 2 scopes vs none",
            loop(manager.record_spend, scoped, 0.25),
            loop(manager.record_spend, plain, 0.25),
            n=n,
            runs=runs,
            target="<= 2.5x",
        ),
        compare(
            "reserve + commit, 2 scopes vs none",
            pairs(scoped),
            pairs(plain),
            n=n,
            runs=runs,
            target="<= 2.5x",
        ),
    ]
    manager.close()
    return results


def period_check_cost(url: str, *, quick: bool) -> list[Comparison]:
    """What the period check costs a spend on an agent without a period."""
    n, runs = (300, 7) if quick else (1000, 15)
    manager = StateManager.from_url(with_schema(url, "bench_period"))
    plain, monthly = AgentId.generate(), AgentId.generate()
    manager.save_agent_state(AgentState(plain, AgentStatus.RUNNING, budget_limit=1e9))
    manager.save_agent_state(
        AgentState(monthly, AgentStatus.RUNNING, budget_limit=1e9, budget_period="month")
    )
    raw = psycopg.connect(url, autocommit=True)
    # A bench-only copy of the spend function without the period check.
    body = raw.execute("SELECT pg_get_functiondef('bench_period.spend'::regproc)").fetchone()[0]  # type: ignore[index]
    unchecked = body.replace("bench_period.spend(", "bench_period.spend_unchecked(")
    for alias in ("a", "b"):
        ended = f"{alias}.period_end IS NULL OR p_now >= {alias}.period_end"
        clause = f" OR ({alias}.period IS NOT NULL AND ({ended}))"
        assert clause in unchecked, clause
        unchecked = unchecked.replace(clause, "")
    raw.execute(unchecked)
    amount = to_micros(0.25)

    def raw_spend(function: str) -> Op:
        spender = RawSpender(raw, "bench_period", function)

        def op(k: int) -> None:
            spender.head = RawSpender(raw, "bench_period").head  # the other copy moved it too
            spend = spender.spend
            for _ in range(k):
                spend(plain, amount)

        return op

    results = [
        compare(
            "spend statement, no period: check vs none",
            raw_spend("spend"),
            raw_spend("spend_unchecked"),
            n=n,
            runs=runs,
            target="<= 1.10x",
        ),
        compare(
            "record_spend, agent with a period vs without",
            loop(manager.record_spend, monthly, 0.25),
            loop(manager.record_spend, plain, 0.25),
            n=n,
            runs=runs,
            target="(information)",
        ),
    ]
    raw.close()
    manager.close()
    return results


_SETTLE = """
import importlib.util
from iron_runtime_state import AgentId, AgentState, AgentStatus, StateManager
this = importlib.util.find_spec("iron_runtime_state.ledger") is not None  # 0.6.0 has no ledger
manager = StateManager.from_url({ours!r} if this else {base!r}, audit_key={key!r})
agent = AgentId.generate()
manager.save_agent_state(AgentState(agent, AgentStatus.RUNNING, budget_limit=1e8))
manager.record_spend(agent, 0.01)  # the store object learns the audit head
def op(k):
    for _ in range(k):
        {call}
"""


def ledger_cost(url: str, *, quick: bool) -> list[Comparison]:
    """Settling with the ledger's record against 0.6.0 settling without one (fresh processes)."""
    n, runs = (400, 5) if quick else (1000, 9)
    results = []
    for (name, call), (chain, key) in itertools.product(
        (
            ("record_spend: ledger vs 0.6.0", "manager.record_spend(agent, 0.25)"),
            (
                "reserve + commit: ledger vs 0.6.0",
                "manager.commit_reservation(manager.reserve_budget(agent, 1.0), 0.5)",
            ),
        ),
        CHAINS,
    ):
        ours, base = with_schema(url, f"bench_ledger_{chain}"), with_schema(url, f"bench_v06_{chain}")
        results.append(
            compare_with_previous_release(
                f"{name}, {chain}",
                _SETTLE.format(ours=ours, base=base, call=call, key=key),
                n=n,
                runs=runs,
                teardown="manager.close()",
                target="<= 2x",
                release=RELEASE_0_6,
            )
        )
    return results


def report_time(url: str, *, quick: bool) -> list[Comparison]:
    """``spend_report`` by day over many ledger rows (written straight into the table), against
    a ``count(*)`` over the same span's rows of the index, for scale."""
    rows, runs = (200_000, 5) if quick else (1_000_000, 7)
    target = with_schema(url, "bench_report")
    manager = StateManager.from_url(target)
    manager.stats()  # the schema
    raw = psycopg.connect(url, autocommit=True)
    raw.execute("TRUNCATE bench_report.ledger")
    start = 1_790_000_000
    step = 30 * 86_400 // rows  # a month of spends
    raw.execute(
        "INSERT INTO bench_report.ledger (seq, ts, agent_id, amount, model, input_tokens, output_tokens, "
        "cached_input_tokens, scopes) SELECT n, %s + n * %s, 'agent-' || (n %% 100), 1234, "
        "'model-' || (n %% 5), 100, 20, 0, '{}' FROM generate_series(1, %s) n",
        (start, step, rows),
    )
    raw.execute("VACUUM ANALYZE bench_report.ledger")  # what autovacuum does after a bulk of inserts

    def report(k: int) -> None:
        for _ in range(k):
            found = manager.spend_report(group_by=("day",))
            assert sum(row.calls for row in found) == rows

    def count(k: int) -> None:
        for _ in range(k):
            raw.execute("SELECT count(*) FROM bench_report.ledger WHERE ts >= %s", (start,)).fetchall()

    result = compare(
        f"spend_report by day, {rows:,} rows vs count(*)", report, count, n=1, runs=runs, target="< 1 s"
    )
    print(f"{'':<42} one report: {result.ours_s * 1000:.0f} ms", flush=True)
    result.extra["rows"] = rows
    result.extra["report_ms"] = result.ours_s * 1000
    raw.close()
    manager.close()
    return [result]


_SPENDER = r"""
import json, sys, time
from iron_runtime_state import AgentId, AgentState, AgentStatus, StateManager
url, seconds, count, key = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4] or None
with StateManager.from_url(url, audit_key=key) as manager:
    agents = [AgentId.generate() for _ in range(count)]
    manager.save_agent_states([AgentState(a, AgentStatus.RUNNING, budget_limit=1e9) for a in agents])
    for agent in agents:
        manager.record_spend(agent, 0.01)
    print("ready", flush=True)
    sys.stdin.readline()
    done, started, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - started < seconds:
        manager.record_spend(agents[done % count], 0.01)
        done += 1
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    print(json.dumps({"ops": done, "seconds": wall, "cpu": cpu}))
"""


def _server_cpu(postmaster: int | None) -> float:
    """CPU seconds used so far by the server's processes (when this bench started it)."""
    if postmaster is None:
        return 0.0
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == postmaster:  # a live server process: utime + stime
            total += (int(fields[11]) + int(fields[12])) / tick
        elif int(entry) == postmaster:  # and the ended ones, through their parent: + cutime + cstime
            total += sum(int(field) for field in fields[11:15]) / tick
    return total


def _spend_in_processes(
    url: str, processes: int, seconds: float, postmaster: int | None, key: str | None
) -> dict[str, float]:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _SPENDER, url, str(seconds), "20", key or ""],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    for proc in procs:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
    server_before = _server_cpu(postmaster)
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    reports = []
    for proc in procs:
        out, _ = proc.communicate(timeout=seconds + 60)
        reports.append(json.loads(out.strip().splitlines()[-1]))
    server = _server_cpu(postmaster) - server_before
    ops = sum(r["ops"] for r in reports)
    wall = max(r["seconds"] for r in reports)
    return {
        "ops_per_s": ops / wall,
        "client_cpu_us_per_op": 1e6 * sum(r["cpu"] for r in reports) / ops,
        "server_cpu_us_per_op": 1e6 * server / ops,
        "wall_us_per_op": 1e6 * wall / ops,
    }


def processes_throughput(url: str, *, quick: bool, postmaster: int | None) -> list[Comparison]:
    """Spends per second of 4 processes on their own agents against one process, alternating;
    on an unkeyed chain (records sealed by the server) and a keyed one (sealed by the clients)."""
    seconds, runs = (2.0, 3) if quick else (4.0, 5)
    results = []
    for chain, key in CHAINS:
        target = with_schema(url, f"bench_procs_{chain}")
        StateManager.from_url(target).close()  # the schema, created once before the processes race
        one: list[dict[str, float]] = []
        four: list[dict[str, float]] = []
        for i in range(runs):
            for count in (1, 4) if i % 2 == 0 else (4, 1):
                group = one if count == 1 else four
                group.append(_spend_in_processes(target, count, seconds, postmaster, key))

        def median(runs_: list[dict[str, float]], key: str) -> float:
            return statistics.median(r[key] for r in runs_)

        result = Comparison(
            f"record_spend: 4 processes vs 1 (throughput), {chain}",
            1.0 / median(four, "ops_per_s"),
            1.0 / median(one, "ops_per_s"),
            ">= 1.5x throughput",
            runs,
        )
        print(result.line(), flush=True)
        for name, group in (("1 process", one), ("4 processes", four)):
            where = f"client CPU {median(group, 'client_cpu_us_per_op'):.0f} us/call"
            if postmaster is not None:
                where += f", server CPU {median(group, 'server_cpu_us_per_op'):.0f} us/call"
            print(f"{'':<42} {name}: {median(group, 'ops_per_s'):,.0f} calls/s; {where}", flush=True)
            result.extra[name.replace(" ", "_")] = {k: median(group, k) for k in group[0]}
        results.append(result)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter runs")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--url", help="use this server (postgresql://...) instead of starting one")
    parser.add_argument("--ledger", action="store_true", help="only the spend ledger's figures")
    args = parser.parse_args()
    results: list[Comparison] = []
    with server(args.url) as (url, started):
        postmaster = started.process.pid if started is not None and started.process is not None else None
        if args.ledger:
            header("The spend ledger (issue 17)")
            results += ledger_cost(url, quick=args.quick)
            results += report_time(url, quick=args.quick)
            header("Processes sharing the store (server and clients on this machine's cores)")
            results += processes_throughput(url, quick=args.quick, postmaster=postmaster)
            save_json(args.json, results)
            return
        header("PostgreSQL backend vs raw psycopg")
        results += versus_raw(url, quick=args.quick)
        header("PostgreSQL backend vs LangGraph's PostgresStore")
        results += versus_langgraph(url, quick=args.quick)
        header("Budget scopes and periods")
        results += scopes_cost(url, quick=args.quick)
        results += period_check_cost(url, quick=args.quick)
        header("The spend ledger (issue 17)")
        results += ledger_cost(url, quick=args.quick)
        results += report_time(url, quick=args.quick)
        header("Processes sharing the store (server and clients on this machine's cores)")
        results += processes_throughput(url, quick=args.quick, postmaster=postmaster)
    save_json(args.json, results)


if __name__ == "__main__":
    main()
