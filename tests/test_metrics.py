"""Prometheus metrics: the FleetCollector in a registry, and ``iron-state metrics`` as a real process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

prometheus_client = pytest.importorskip("prometheus_client")

from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from iron_runtime_state import (  # noqa: E402
    AgentId,
    AgentState,
    AgentStatus,
    AuditEvent,
    BackendUnavailable,
    BudgetExceeded,
    BudgetState,
    FleetStats,
    StateManager,
)
from iron_runtime_state._demo import DEMO_PRICES, run_fleet  # noqa: E402
from iron_runtime_state.backends import SCHEMES  # noqa: E402
from iron_runtime_state.metrics import FleetCollector, TrailCounters, follow_trail  # noqa: E402

from .processes import clean_env, iron_state_command, terminate  # noqa: E402

NAMES = (
    "iron_state_agents",
    "iron_state_budget_spent",
    "iron_state_pii_detections",
    "iron_state_audit_records",
    "iron_state_scope_spent",
    "iron_state_scope_limit",
    "iron_state_scope_held",
    "iron_state_scope_period_start_seconds",
    "iron_state_up",
    "iron_state_scrape_duration_seconds",
)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Parsed exposition text: (name, labels) -> value."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def expected(manager: StateManager) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    stats = manager.stats()
    return {
        ("iron_state_agents", (("status", "running"),)): stats.running,
        ("iron_state_agents", (("status", "stopped"),)): stats.stopped,
        ("iron_state_agents", (("status", "failed"),)): stats.failed,
        ("iron_state_budget_spent", ()): pytest.approx(stats.budget_spent),
        ("iron_state_pii_detections", ()): stats.pii_detections,
        ("iron_state_audit_records", ()): manager.audit_count(),
        ("iron_state_up", ()): 1.0,
    }


def small_fleet() -> StateManager:
    manager = StateManager()
    a, b, c = (AgentId.test_fixture(n) for n in (1, 2, 3))
    manager.save_agent_states(
        [
            AgentState(a, AgentStatus.RUNNING, budget_limit=10.0),
            AgentState(b, AgentStatus.STOPPED, budget_spent=2.5),
            AgentState(c, AgentStatus.FAILED),
        ]
    )
    manager.record_spend(a, 1.25)
    manager.record_pii_detection(a, 2)
    manager.save_audit_log(AuditEvent(c, "agent_error"))
    return manager


def test_collector_reports_the_fleet() -> None:
    manager = small_fleet()
    registry = CollectorRegistry()
    registry.register(FleetCollector(manager))
    found = samples(generate_latest(registry).decode())
    assert {k: v for k, v in found.items() if k[0] != "iron_state_scrape_duration_seconds"} == expected(
        manager
    )
    assert found[("iron_state_agents", (("status", "running"),))] == 1
    assert found[("iron_state_budget_spent", ())] == pytest.approx(3.75)
    assert found[("iron_state_pii_detections", ())] == 2
    assert found[("iron_state_audit_records", ())] == 3  # the spend's ledger record, the agent_error
    assert found[("iron_state_scrape_duration_seconds", ())] >= 0


def test_collector_reads_totals_at_scrape_time_and_never_scans() -> None:
    class Counting(StateManager):
        calls: list[str] = []  # noqa: RUF012

        def stats(self) -> FleetStats:
            self.calls.append("stats")
            return super().stats()

        def audit_count(self) -> int:
            self.calls.append("audit_count")
            return super().audit_count()

        def list_budgets(self) -> list[BudgetState]:
            self.calls.append("list_budgets")
            return super().list_budgets()

        def iter_agent_states(self, **kwargs: object) -> Iterator[AgentState]:  # type: ignore[override]
            raise AssertionError("the collector must not scan the agents")

        def list_agents(self) -> list[str]:
            raise AssertionError("the collector must not scan the agents")

    manager = Counting()
    registry = CollectorRegistry()
    registry.register(FleetCollector(manager))
    assert manager.calls == []  # describe() names the metrics without reading the store
    assert samples(generate_latest(registry).decode())[("iron_state_agents", (("status", "running"),))] == 0
    manager.save_agent_state(AgentState(AgentId.test_fixture(9), AgentStatus.RUNNING))
    assert samples(generate_latest(registry).decode())[("iron_state_agents", (("status", "running"),))] == 1
    assert manager.calls == ["stats", "audit_count", "list_budgets"] * 2


def test_describe_lists_every_metric_without_samples() -> None:
    described = list(FleetCollector(StateManager()).describe())
    assert [m.name for m in described] == list(NAMES)
    assert all(m.type == "gauge" and not m.samples for m in described)
    assert all(m.documentation for m in described)


def test_a_failing_store_scrapes_as_down(caplog: pytest.LogCaptureFixture) -> None:
    class Down(StateManager):
        def stats(self) -> FleetStats:
            raise BackendUnavailable("connection refused")

    registry = CollectorRegistry()
    registry.register(FleetCollector(Down()))
    found = samples(generate_latest(registry).decode())
    assert found[("iron_state_up", ())] == 0
    assert not any(name == "iron_state_agents" for name, _ in found)
    assert "connection refused" in caplog.text


def test_register_in_the_default_registry() -> None:
    from prometheus_client import REGISTRY

    collector = FleetCollector(small_fleet())
    REGISTRY.register(collector)
    try:
        text = generate_latest(REGISTRY).decode()
        assert 'iron_state_agents{status="failed"} 1.0' in text
    finally:
        REGISTRY.unregister(collector)


def test_collector_needs_a_manager() -> None:
    with pytest.raises(TypeError, match="StateManager"):
        FleetCollector("memory://")  # type: ignore[arg-type]
    assert "memory://" in repr(FleetCollector(StateManager()))


def test_core_library_does_not_import_prometheus_client() -> None:
    code = (
        "import sys, iron_runtime_state, iron_runtime_state.cli;sys.exit('prometheus_client' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False, timeout=60).returncode == 0


def test_serve_metrics_on_a_free_port() -> None:
    from iron_runtime_state.metrics import serve_metrics

    manager = small_fleet()
    server, thread = serve_metrics(manager, port=0)
    try:
        assert server.server_address[0] == "127.0.0.1"
        text = scrape(f"http://127.0.0.1:{server.server_port}/metrics", time.monotonic() + 10)
        assert samples(text)[("iron_state_agents", (("status", "stopped"),))] == 1
        assert "python_gc" not in text  # only the fleet's metrics
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_metrics_command_without_the_extra_is_one_line(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['prometheus_client'] = None\n"
        "from iron_runtime_state.cli import main\n"
        "main(['metrics', '--url', 'memory://'])\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("IRON_STATE_")}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: iron_runtime_state.metrics needs the 'metrics' extra: "
        "pip install 'iron-runtime-state[metrics]'"
    ]


# -- iron-state metrics as a process ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def scrape(url: str, deadline: float) -> str:
    """GET ``url``, retrying until the server is up or ``deadline`` passes."""
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                assert response.status == 200
                assert response.headers["Content-Type"].startswith("text/plain")
                return str(response.read().decode())
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.skipif("sqlite" not in SCHEMES, reason="the SQLite backend is not registered")
def test_metrics_endpoint_as_a_process(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    with StateManager.from_url(url, prices=DEMO_PRICES) as manager:
        run_fleet(manager, agents=50, steps=4, seed=3)
        want = expected(manager)
    port = free_port()
    process = subprocess.Popen(
        [*iron_state_command(), "metrics", "--port", str(port), "--url", url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )
    try:
        text = scrape(f"http://127.0.0.1:{port}/metrics", time.monotonic() + 30)
        found = samples(text)
        assert {k: v for k, v in found.items() if k in want} == want
        # Live: a change in the store shows at the next scrape.
        with StateManager.from_url(url) as manager:
            manager.save_agent_state(AgentState(AgentId.test_fixture(77), AgentStatus.RUNNING))
        again = samples(scrape(f"http://127.0.0.1:{port}/metrics", time.monotonic() + 10))
        running = ("iron_state_agents", (("status", "running"),))
        assert again[running] == want[running] + 1
    finally:
        out, err = terminate(process)
    assert process.returncode == 0, err
    assert f"http://127.0.0.1:{port}/metrics" in err
    assert "Traceback" not in err
    assert out == ""


# -- budget scopes, event counters, a store that is down ------------------------------------------


def test_scope_gauges(tmp_path: Path) -> None:
    manager = StateManager()
    manager.set_budget("team:support", limit=100.0, period="month")
    manager.set_budget("org:acme", limit=None)
    agent = AgentId.test_fixture(1)
    manager.save_agent_state(
        AgentState(agent, AgentStatus.RUNNING, budget_scopes=("org:acme", "team:support"))
    )
    manager.record_spend(agent, 2.5)
    manager.reserve_budget(agent, 1.25)
    registry = CollectorRegistry()
    registry.register(FleetCollector(manager))
    found = samples(generate_latest(registry).decode())
    team, org = (("scope", "team:support"),), (("scope", "org:acme"),)
    assert found[("iron_state_scope_spent", team)] == 2.5
    assert found[("iron_state_scope_held", team)] == 1.25
    assert found[("iron_state_scope_limit", team)] == 100.0
    start = manager.get_budget("team:support").period_start  # type: ignore[union-attr]
    assert found[("iron_state_scope_period_start_seconds", team)] == start.timestamp()  # type: ignore[union-attr]
    assert found[("iron_state_scope_spent", org)] == 2.5
    assert ("iron_state_scope_limit", org) not in found  # no limit: no sample
    assert ("iron_state_scope_period_start_seconds", org) not in found  # no period


def test_trail_counters_count_budget_events() -> None:
    manager = StateManager()
    manager.set_budget("team:support", limit=3.0)
    agent = AgentId.test_fixture(1)
    manager.save_agent_state(
        AgentState(agent, AgentStatus.RUNNING, budget_limit=5.0, budget_scopes=("team:support",))
    )
    counters = TrailCounters(after_seq=manager.audit_checkpoint().seq)
    with pytest.raises(BudgetExceeded):
        manager.record_spend(agent, 6.0)  # the agent's own limit
    with pytest.raises(BudgetExceeded):
        manager.reserve_budget(agent, 4.0)  # the team's
    hold = manager.reserve_budget(agent, 2.0)
    manager.commit_reservation(hold, 4.5)  # past the team's 3: stands, and is counted
    manager.save_audit_logs(  # a record copied from another store (iron-state copy)
        [AuditEvent(agent, "budget_threshold", details='{"scope":"team:support","threshold":0.8}')],
        ledger=True,
    )
    manager.save_audit_log(AuditEvent(agent, "hold_expired", details="not json"))
    records = manager.audit_log(after_seq=0)
    counters.count(records)
    counters.count(records)  # counted once only
    registry = CollectorRegistry()
    registry.register(FleetCollector(manager, counters=counters))
    found = samples(generate_latest(registry).decode())
    assert found[("iron_state_spends_refused_total", (("scope", ""),))] == 1
    assert found[("iron_state_reservations_refused_total", (("scope", "team:support"),))] == 1
    assert found[("iron_state_overspent_total", (("scope", "team:support"),))] == 1
    # The commit of 4.5 took the team (limit 3) past 50%, 80% and 100%, and the agent (limit 5)
    # past 50% and 80%: one budget_threshold each, beside the event saved by hand.
    assert found[("iron_state_threshold_crossings_total", (("scope", "team:support"),))] == 3 + 1
    assert found[("iron_state_threshold_crossings_total", (("scope", ""),))] == 2
    assert found[("iron_state_holds_expired_total", (("scope", ""),))] == 1
    assert found[("iron_state_audit_followed_seq", ())] == records[-1].seq


def test_trail_counters_sum_the_spend_ledger_by_model() -> None:
    manager = StateManager(prices={"gpt-test": {"input": 2, "output": 10, "cached_input": 1}})
    agent = AgentId.test_fixture(1)
    manager.save_agent_state(AgentState(agent, AgentStatus.RUNNING, budget_limit=100.0))
    counters = TrailCounters(after_seq=manager.audit_checkpoint().seq)
    manager.record_spend(agent, 0.1)
    manager.record_spend(agent, 0.2)  # 0.1 + 0.2 summed exactly: 0.3, not 0.30000000000000004
    manager.record_usage(agent, model="gpt-test", input_tokens=1000, output_tokens=500)
    with manager.reserve_for_call(agent, model="gpt-test", input_tokens=2000, max_output_tokens=1000) as hold:
        hold.commit_usage(input_tokens=2000, output_tokens=100, cached_input_tokens=1000)
    held = manager.reserve_budget(agent, 1.0)
    manager.release_reservation(held)  # a release spends nothing: no spend record
    with pytest.raises(BudgetExceeded):
        manager.record_spend(agent, 1000)  # refused: no spend record
    report = {row.group["model"]: row for row in manager.spend_report(group_by=("model",))}
    # A record the library did not write (copied with ledger=True): one call, no amount.
    manager.save_audit_logs([AuditEvent(agent, "spend", details="not json")], ledger=True)
    counters.count(manager.audit_log(after_seq=0))
    registry = CollectorRegistry()
    registry.register(FleetCollector(manager, counters=counters))
    found = samples(generate_latest(registry).decode())
    assert found[("iron_state_spend_total", (("model", ""),))] == 0.3
    assert found[("iron_state_spend_calls_total", (("model", ""),))] == 3
    # 1000 * 2 + 500 * 10 per million, then 1000 * 2 + 1000 * 1 + 100 * 10 per million.
    assert found[("iron_state_spend_total", (("model", "gpt-test"),))] == pytest.approx(0.007 + 0.004)
    assert found[("iron_state_spend_calls_total", (("model", "gpt-test"),))] == 2
    tokens = {
        kind: found[("iron_state_spend_tokens_total", (("kind", kind), ("model", "gpt-test")))]
        for kind in ("input", "output", "cached_input")
    }
    assert tokens == {"input": 3000, "output": 600, "cached_input": 1000}
    assert found[("iron_state_spend_tokens_total", (("kind", "input"), ("model", "")))] == 0
    # The same totals as the ledger's own report.
    assert report["gpt-test"].amount == found[("iron_state_spend_total", (("model", "gpt-test"),))]
    assert counters.spend()["gpt-test"] == (report["gpt-test"].amount, 2, tokens)


def test_counter_families_are_described() -> None:
    names = [m.name for m in FleetCollector(StateManager(), counters=TrailCounters()).describe()]
    assert names[len(NAMES) :] == [
        "iron_state_spends_refused",
        "iron_state_reservations_refused",
        "iron_state_overspent",
        "iron_state_budget_resets",
        "iron_state_holds_expired",
        "iron_state_threshold_crossings",
        "iron_state_spend",
        "iron_state_spend_calls",
        "iron_state_spend_tokens",
        "iron_state_audit_followed_seq",
    ]


def test_follow_trail_counts_as_records_arrive_and_survives_a_store_that_is_down(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'late.db'}"  # not there yet

    def opener() -> StateManager:
        return StateManager.from_url(url, create=False)

    counters = TrailCounters()
    registry = CollectorRegistry()
    registry.register(FleetCollector(opener, counters=counters))
    assert samples(generate_latest(registry).decode())[("iron_state_up", ())] == 0  # down, no exit
    stop = threading.Event()
    follower = threading.Thread(target=follow_trail, args=(opener, counters, stop), kwargs={"idle": 0.2})
    follower.start()
    try:
        with StateManager.from_url(url) as manager:
            agent = AgentId.test_fixture(1)
            manager.save_agent_state(AgentState(agent, AgentStatus.RUNNING, budget_limit=1.0))
            deadline = time.monotonic() + 10
            while counters.last_seq is None and time.monotonic() < deadline:
                time.sleep(0.05)  # the follower opened the store and starts at its head
            for _ in range(3):
                with pytest.raises(BudgetExceeded):
                    manager.record_spend(agent, 2.0)
            while time.monotonic() < deadline:
                found = samples(generate_latest(registry).decode())
                if found.get(("iron_state_spends_refused_total", (("scope", ""),))) == 3:
                    break
                time.sleep(0.05)
            assert found[("iron_state_up", ())] == 1
            assert found[("iron_state_spends_refused_total", (("scope", ""),))] == 3
    finally:
        stop.set()
        follower.join(10)
    assert not follower.is_alive()


@pytest.mark.slow
def test_metrics_command_serves_up_0_while_the_store_is_down(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'late.db'}"  # not there yet: the command must not exit
    port = free_port()
    process = subprocess.Popen(
        [*iron_state_command(), "metrics", "--port", str(port), "--url", url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )
    try:
        found = samples(scrape(f"http://127.0.0.1:{port}/metrics", time.monotonic() + 30))
        assert found[("iron_state_up", ())] == 0
        assert process.poll() is None
        with StateManager.from_url(url) as manager:
            manager.save_agent_state(AgentState(AgentId.test_fixture(5), AgentStatus.RUNNING))
        again = samples(scrape(f"http://127.0.0.1:{port}/metrics", time.monotonic() + 10))
        assert again[("iron_state_up", ())] == 1
        assert again[("iron_state_agents", (("status", "running"),))] == 1
    finally:
        _out, err = terminate(process)
    assert process.returncode == 0, err
    assert "the store is down" in err
    assert "Traceback" not in err
