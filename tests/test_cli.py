"""The ``iron-state`` command line: every command through Typer's runner, the demo and copy as real processes.

Stores are SQLite files in temporary folders (``memory://`` does not outlive one command).
Error paths check the promise of the issue: one line on stderr, a documented exit status, no
traceback unless ``--debug``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

typer_testing = pytest.importorskip("typer.testing")

from iron_runtime_state import AgentId, AgentState, AgentStatus, AuditEvent, StateManager  # noqa: E402
from iron_runtime_state._demo import DEMO_PRICES, run_fleet  # noqa: E402
from iron_runtime_state.backends import SCHEMES  # noqa: E402
from iron_runtime_state.cli import (  # noqa: E402
    EXIT_CHECK_FAILED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    app,
)
from iron_runtime_state.cli import audit as cli_audit  # noqa: E402
from iron_runtime_state.cli import metrics as cli_metrics  # noqa: E402
from iron_runtime_state.cli import session as cli_session  # noqa: E402
from iron_runtime_state.cli.exit_codes import CommandError  # noqa: E402
from iron_runtime_state.errors import ConfigurationError  # noqa: E402
from iron_runtime_state.money import exact  # noqa: E402

needs_sqlite = pytest.mark.skipif("sqlite" not in SCHEMES, reason="the SQLite backend is not registered")
pytestmark = needs_sqlite

KEY = "k" * 32  # an HMAC key for the audit chain (>= 16 bytes)


# -- helpers ------------------------------------------------------------------------------------------


class Run:
    """What one ``iron-state`` invocation gave."""

    def __init__(self, code: int, stdout: str, stderr: str, exception: BaseException | None = None):
        self.code = code
        self.stdout = stdout
        self.stderr = stderr
        self.exception = exception

    def json(self) -> Any:
        return json.loads(self.stdout)

    def __repr__(self) -> str:
        return f"Run(code={self.code}, stdout={self.stdout[-2000:]!r}, stderr={self.stderr[-2000:]!r})"


def invoke(*args: str, env: dict[str, str] | None = None, input: str | None = None) -> Run:
    """``iron-state ARGS`` through Typer's CliRunner (in this process)."""
    runner = typer_testing.CliRunner()
    result = runner.invoke(app, list(args), env=env, input=input, prog_name="iron-state")
    exc = result.exception if not isinstance(result.exception, SystemExit) else None
    return Run(result.exit_code, result.stdout, result.stderr, exc)


def ok(*args: str, env: dict[str, str] | None = None) -> Run:
    run = invoke(*args, env=env)
    assert run.code == EXIT_OK, run
    assert run.exception is None, run
    return run


def one_error_line(run: Run, code: int, *fragments: str) -> str:
    """Assert the failure promise: the exit status, one ``error:`` line, no traceback."""
    assert run.code == code, run
    assert run.exception is None, run
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run
    assert lines[0].startswith("error: "), run
    assert "Traceback" not in run.stderr + run.stdout
    for fragment in fragments:
        assert fragment in lines[0], run
    return lines[0]


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"  # tmp paths are absolute: sqlite:////tmp/...


def iron_state_command() -> list[str]:
    """The installed console script, or the same entry point through this interpreter."""
    script = Path(sys.executable).with_name("iron-state")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from iron_runtime_state.cli import main; main()"]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IRON_STATE_")}
    env.update(extra)
    env["NO_COLOR"] = "1"
    return env


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("IRON_STATE_URL", "IRON_STATE_AUDIT_KEY", "IRON_STATE_DEBUG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_COLOR", "1")


@pytest.fixture(scope="module")
def fleet_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite store with a small demo fleet (seed 11), shared by the read-only tests."""
    path = tmp_path_factory.mktemp("fleet") / "fleet.db"
    with StateManager.from_url(sqlite_url(path), prices=DEMO_PRICES) as manager:
        run_fleet(manager, agents=80, steps=6, seed=11)
    return path


@pytest.fixture
def fleet(fleet_file: Path) -> str:
    """The shared fleet's URL (do not change it)."""
    return sqlite_url(fleet_file)


@pytest.fixture
def own_fleet(tmp_path: Path, fleet_file: Path) -> str:
    """A private copy of the shared fleet, for tests that change it."""
    target = tmp_path / "own.db"
    for suffix in ("", "-wal", "-shm"):
        source = Path(f"{fleet_file}{suffix}")
        if source.exists():
            shutil.copy(source, f"{target}{suffix}")
    return sqlite_url(target)


def open_manager(url: str, key: str | None = None) -> StateManager:
    return StateManager.from_url(url, audit_key=key)


# -- the root command ---------------------------------------------------------------------------------


def test_bare_command_shows_the_commands() -> None:
    run = invoke()
    assert run.code == EXIT_OK
    for command in ("demo", "agents", "show", "stats", "audit", "verify", "export", "prune", "purge", "copy"):
        assert command in run.stdout


def test_version() -> None:
    from iron_runtime_state import __version__

    assert ok("--version").stdout.strip() == f"iron-state {__version__}"


def test_unknown_command_and_option_are_one_line_usage_errors(fleet: str) -> None:
    one_error_line(invoke("frobnicate"), EXIT_USAGE, "frobnicate")
    one_error_line(invoke("stats", "--colour", "--url", fleet), EXIT_USAGE, "--colour")
    one_error_line(invoke("agents", "--status", "sleeping", "--url", fleet), EXIT_USAGE, "sleeping")
    one_error_line(invoke("demo", "--agents", "0", "--url", fleet), EXIT_USAGE, "--agents")


# -- demo -----------------------------------------------------------------------------------------------


def test_demo_prints_a_summary_and_the_next_commands(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "demo.db")
    run = ok("demo", "--agents", "120", "--steps", "6", "--seed", "5", "--url", url)
    out = run.stdout
    for text in (
        "Fleet demo-5",
        "Agents by status",
        "running",
        "stopped",
        "failed",
        "total",
        "Budget",
        "PII",
    ):
        assert text in out
    assert "Last audit events" in out
    assert f"iron-state verify --url {url}" in out
    assert "iron-state show agent_" in out
    with open_manager(url) as manager:
        stats = manager.stats()
        assert stats.total == 120
        assert stats.running + stats.stopped + stats.failed == 120
        assert stats.budget_spent > 0
        assert manager.audit_count() > 120  # agent_started events and more
        assert manager.verify_audit_log().ok


def test_demo_json_is_valid_and_consistent(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "demo.db")
    data = ok("demo", "-n", "150", "-s", "8", "--seed", "2", "--url", url, "--json").json()
    assert data["agents"] == 150
    assert sum(row["agents"] for row in data["by_status"].values()) == 150
    assert data["store"]["total"] == 150
    assert data["refused"] > 0
    assert data["failed"] > 0
    assert data["pii_events"] > 0
    assert data["calls"] > 0
    assert data["by_status"]["failed"]["agents"] == data["failed"]
    assert "overspent" not in data  # a call never costs more than its hold
    assert {row["model"] for row in data["spend_by_model"]} == set(DEMO_PRICES)
    assert sum(row["calls"] for row in data["spend_by_model"]) == data["calls"]
    assert data["threshold_alerts"] > 0
    with open_manager(url) as manager:
        assert manager.stats().to_dict() == {k: v for k, v in data["store"].items() if k != "audit_records"}
        assert manager.audit_count() == data["store"]["audit_records"]


def test_demo_is_deterministic_with_a_seed(tmp_path: Path) -> None:
    def outcome(name: str) -> dict[str, Any]:
        data = ok(
            "demo", "-n", "60", "-s", "5", "--seed", "9", "--url", sqlite_url(tmp_path / name), "--json"
        )
        result = data.json()
        for key in ("seconds", "url"):
            result.pop(key)
        return result

    assert outcome("a.db") == outcome("b.db")


def test_demo_again_adds_a_fleet_and_reset_empties_first(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "demo.db")
    ok("demo", "-n", "40", "-s", "3", "--url", url, "--json")
    ok("demo", "-n", "40", "-s", "3", "--url", url, "--json")
    with open_manager(url) as manager:
        assert manager.stats().total == 80
    run = ok("demo", "-n", "40", "-s", "3", "--url", url, "--json", "--reset")
    assert "removed 80 agents" in run.stderr
    assert run.json()["store"]["total"] == 40
    with open_manager(url) as manager:
        assert manager.verify_audit_log().ok


def test_demo_same_seed_replaces_its_own_fleet(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "demo.db")
    ok("demo", "-n", "30", "-s", "3", "--seed", "4", "--url", url, "--json")
    first = ok("demo", "-n", "30", "-s", "3", "--seed", "4", "--url", url, "--json")
    run = ok("demo", "-n", "30", "-s", "3", "--seed", "4", "--url", url, "--json")
    assert run.json()["replaced"] == 30
    # The ledger keeps both runs' spends; the summary counts this run's only.
    assert run.json()["spend_by_model"] == first.json()["spend_by_model"]
    assert "already in the store" in run.stderr
    assert run.json()["store"]["total"] == 30


@pytest.mark.parametrize("scheme", ["sqlite", "memory"])
def test_demo_ledger_sums_to_the_agents_spend(scheme: str, tmp_path: Path) -> None:
    """Every call the demo settles is in the spend ledger: by model, team and in all, the
    ledger's totals are what the agents and the scopes show as spent."""
    url = sqlite_url(tmp_path / "demo.db") if scheme == "sqlite" else "memory://"
    with StateManager.from_url(url, prices=DEMO_PRICES) as manager:
        result = run_fleet(manager, agents=120, steps=6, seed=8)
        states = [s for s in manager.get_agent_states(result.agent_ids) if s is not None]
        agents_spent = sum(exact(s.budget_spent) for s in states)
        by_model = manager.spend_report(group_by=("model",))
        assert [row.group["model"] for row in by_model] == sorted(DEMO_PRICES)
        assert sum(row.amount_exact for row in by_model) == agents_spent > 0
        assert sum(row.amount_exact for row in result.spend_by_model) == agents_spent
        assert sum(row.calls for row in by_model) == result.calls
        assert exact(manager.get_budget(f"org:{result.fleet}").spent) == agents_spent  # type: ignore[union-attr]
        for row in manager.spend_report(group_by=("label:team",)):
            team = row.group["label:team"]
            assert row.amount_exact == sum(exact(s.budget_spent) for s in states if s.labels["team"] == team)
            scope = manager.get_budget(f"team:{result.fleet}.{team}")
            assert scope is not None
            assert exact(scope.spent) == row.amount_exact
        spends = list(manager.iter_audit_log(event_type="spend"))
        assert len(spends) == result.calls
        alerts = list(manager.iter_audit_log(event_type="budget_threshold"))
        assert len(alerts) == result.threshold_alerts > 0
        assert manager.verify_audit_log().ok


def test_demo_needs_its_prices() -> None:
    with StateManager.from_url("memory://") as manager:
        with pytest.raises(ConfigurationError, match="prices=DEMO_PRICES"):
            run_fleet(manager, agents=2, steps=1, seed=1)
        assert manager.list_agents() == []  # nothing was written
        assert manager.list_budgets() == []


def test_demo_on_memory_says_it_does_not_last() -> None:
    run = ok("demo", "-n", "20", "-s", "2", "--url", "memory://")
    assert "memory:// lives only as long as this command" in run.stdout
    assert "Explore further" not in run.stdout


def test_demo_uses_iron_state_url_and_the_default_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = sqlite_url(tmp_path / "from_env.db")
    ok("demo", "-n", "10", "-s", "2", "--json", env={"IRON_STATE_URL": url})
    assert (tmp_path / "from_env.db").exists()
    monkeypatch.chdir(tmp_path)
    run = ok("demo", "-n", "10", "-s", "2")
    assert (tmp_path / "iron_state.db").exists()
    assert "--url" not in run.stdout  # the suggested commands need no --url for the default store


# -- agents, show, stats ------------------------------------------------------------------------------


def test_agents_table_and_json(fleet: str) -> None:
    run = ok("agents", "--url", fleet)
    assert "agent_" in run.stdout
    assert "status" in run.stdout
    assert "50 of 80 agents" in run.stderr  # the default limit, and how to see all
    rows = ok("agents", "--url", fleet, "--json").json()
    assert len(rows) == 80
    assert {tuple(sorted(row)) for row in rows} == {
        (
            "agent_id",
            "budget_limit",
            "budget_period",
            "budget_scopes",
            "budget_spent",
            "budget_thresholds",
            "budget_tz",
            "labels",
            "period_start",
            "pii_detections",
            "status",
        )
    }
    assert {row["labels"]["team"] for row in rows} == {"support", "research"}


def test_agents_filter_sort_and_limit(fleet: str) -> None:
    with open_manager(fleet) as manager:
        stats = manager.stats()
        spent = sorted((s.budget_spent for s in manager.iter_agent_states()), reverse=True)
    failed = ok("agents", "--status", "failed", "--url", fleet, "--json").json()
    assert len(failed) == stats.failed > 0
    assert {row["status"] for row in failed} == {"failed"}
    top = ok("agents", "--sort", "spent", "--limit", "3", "--url", fleet, "--json").json()
    assert [row["budget_spent"] for row in top] == spent[:3]
    ids = ok("agents", "--sort", "id", "--limit", "0", "--url", fleet, "--json").json()
    assert [row["agent_id"] for row in ids] == sorted(row["agent_id"] for row in ids)
    assert len(ok("agents", "--limit", "0", "--url", fleet).stdout.splitlines()) > 80


def test_show_an_agent(fleet: str) -> None:
    with open_manager(fleet) as manager:
        state = next(manager.iter_agent_states(status="failed"))
    run = ok("show", str(state.agent_id), "--url", fleet)
    assert str(state.agent_id) in run.stdout
    assert "failed" in run.stdout
    assert "agent_error" in run.stdout
    data = ok("show", str(state.agent_id), "--url", fleet, "--json").json()
    assert data["agent_id"] == str(state.agent_id)
    assert data["status"] == "failed"
    assert data["budget_available"] == pytest.approx(max(0.0, state.budget_limit - state.budget_spent))
    assert data["events"][0]["event_type"] == "agent_started"
    assert {e["agent_id"] for e in data["events"]} == {str(state.agent_id)}
    # The legacy prefix is accepted and normalised.
    legacy = str(state.agent_id).replace("agent_", "agent-", 1)
    assert ok("show", legacy, "--url", fleet, "--json").json()["agent_id"] == str(state.agent_id)


def test_show_unknown_agent_and_bad_id(fleet: str) -> None:
    absent = AgentId.test_fixture(424242)
    one_error_line(invoke("show", str(absent), "--url", fleet), EXIT_NOT_FOUND, str(absent), "is not in")
    one_error_line(invoke("show", "agent_nope", "--url", fleet), EXIT_USAGE, "agent id")
    one_error_line(invoke("show", "", "--url", fleet, "--json"), EXIT_USAGE, "empty")


def test_stats(fleet: str) -> None:
    with open_manager(fleet) as manager:
        expected = {**manager.stats().to_dict(), "audit_records": manager.audit_count()}
    data = ok("stats", "--url", fleet, "--json").json()
    data.pop("url")
    assert data == expected
    table = ok("stats", "--url", fleet).stdout
    assert "audit records" in table
    assert "80" in table


# -- audit ------------------------------------------------------------------------------------------------


def test_audit_shows_the_newest_records(fleet: str) -> None:
    with open_manager(fleet) as manager:
        records = manager.audit_log()
    newest = ok("audit", "--limit", "5", "--url", fleet, "--json").json()
    assert [r["seq"] for r in newest] == [r.seq for r in records[-5:]]
    assert [r["hash"] for r in newest] == [r.hash for r in records[-5:]]
    everything = ok("audit", "--limit", "0", "--url", fleet, "--json").json()
    assert len(everything) == len(records)
    run = ok("audit", "--url", fleet)
    assert "20 records shown" in run.stderr
    assert str(records[-1].seq) in run.stdout


def test_audit_filters(fleet: str) -> None:
    with open_manager(fleet) as manager:
        records = manager.audit_log()
    agent = records[0].agent_id
    mine = ok("audit", "--agent", str(agent), "--limit", "0", "--url", fleet, "--json").json()
    assert [r["seq"] for r in mine] == [r.seq for r in records if r.agent_id == agent]
    refused = ok("audit", "--type", "budget_exceeded", "--limit", "3", "--url", fleet, "--json").json()
    assert refused
    assert len(refused) <= 3
    assert {r["event_type"] for r in refused} == {"budget_exceeded"}
    expected = [r for r in records if r.event_type == "budget_exceeded"][-3:]
    assert refused == [{**r.to_dict(), "details": json.loads(r.details)} for r in expected]  # JSON, not text
    stamp = records[0].timestamp
    assert ok("audit", "--since", str(stamp + 10_000), "--url", fleet, "--json").json() == []
    assert len(ok("audit", "--until", str(stamp - 1), "--url", fleet, "--json").json()) == 0
    assert len(ok("audit", "--since", "1h", "--limit", "0", "--url", fleet, "--json").json()) == len(records)
    iso = ok("audit", "--since", "2000-01-01T00:00:00Z", "--limit", "0", "--url", fleet, "--json").json()
    assert len(iso) == len(records)
    after = ok("audit", "--after-seq", str(records[-3].seq), "--url", fleet, "--json").json()
    assert [r["seq"] for r in after] == [r.seq for r in records[-2:]]


def test_audit_bad_inputs(fleet: str) -> None:
    one_error_line(invoke("audit", "--since", "yesterday-ish", "--url", fleet), EXIT_USAGE, "--since")
    one_error_line(invoke("audit", "--agent", "bob", "--url", fleet), EXIT_USAGE, "agent id")
    one_error_line(invoke("audit", "--type", "Not A Type", "--url", fleet), EXIT_USAGE, "event_type")


def test_audit_follow_prints_new_records_and_stops_cleanly_on_ctrl_c(
    own_fleet: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = AgentId.test_fixture(7)
    polls = []

    def idle() -> None:  # --follow waited _FOLLOW_IDLE seconds with nothing new
        polls.append(1)
        if len(polls) == 1:
            with open_manager(own_fleet) as manager:
                manager.save_audit_log(AuditEvent(agent, "follow_me", details="hello"))
                manager.save_audit_log(AuditEvent(agent, "other_type", details="filtered out"))
        elif len(polls) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(cli_audit, "_idle", idle)
    monkeypatch.setattr(cli_audit, "_FOLLOW_IDLE", 0.1)
    # --interval is ignored now (the command waits on the store), but old scripts still pass it.
    run = invoke("audit", "--follow", "--limit", "2", "--interval", "0.1", "--url", own_fleet, "--json")
    assert run.code == EXIT_OK, run
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    assert len(lines) == 4
    assert [line["event_type"] for line in lines[2:]] == ["follow_me", "other_type"]
    assert polls == [1, 1, 1]

    polls.clear()
    run = invoke("audit", "-f", "--type", "follow_me", "--limit", "0", "--url", own_fleet)
    assert run.code == EXIT_OK, run
    assert run.stdout.count("follow_me") == 2  # one from before, one appended while following
    assert "other_type" not in run.stdout


# -- verify ----------------------------------------------------------------------------------------------


def test_verify_ok(fleet: str) -> None:
    run = ok("verify", "--url", fleet)
    assert run.stdout.startswith("ok: ")
    data = ok("verify", "--url", fleet, "--json").json()
    assert data["ok"] is True
    assert data["first_bad_seq"] is None
    assert data["checked"] > 0


def test_verify_broken_chain_exits_1_with_the_first_bad_record(own_fleet: str) -> None:
    # The trail was sealed without a key: checked with one, the first record does not match.
    env = {"IRON_STATE_AUDIT_KEY": KEY}
    run = invoke("verify", "--url", own_fleet, env=env)
    assert run.code == EXIT_CHECK_FAILED, run
    assert "BROKEN" in run.stdout
    assert "seq 1" in run.stdout
    assert "edited" in run.stdout
    data = invoke("verify", "--url", own_fleet, "--json", env=env)
    assert data.code == EXIT_CHECK_FAILED
    assert data.json()["ok"] is False
    assert data.json()["first_bad_seq"] == 1


def test_verify_finds_an_edited_record(own_fleet: str, tmp_path: Path) -> None:
    stores = pytest.importorskip("tests.contract.stores")
    handle = stores.SQLiteHandle(tmp_path)
    handle.path = tmp_path / "own.db"  # the file behind own_fleet
    with open_manager(own_fleet) as manager:
        handle.tamper_edit_details(manager, 5, "forged")
    run = invoke("verify", "--url", own_fleet)
    assert run.code == EXIT_CHECK_FAILED, run
    assert "BROKEN" in run.stdout
    assert "seq 5" in run.stdout
    assert invoke("verify", "--url", own_fleet, "--json").json()["first_bad_seq"] == 5
    # A broken source is not copied: the copy would seal the forgery into a valid chain.
    one_error_line(invoke("copy", own_fleet, sqlite_url(tmp_path / "c.db")), EXIT_CHECK_FAILED, "seq 5")


def test_short_audit_key_is_a_clear_error(fleet: str) -> None:
    run = invoke("verify", "--url", fleet, env={"IRON_STATE_AUDIT_KEY": "short"})
    one_error_line(run, EXIT_USAGE, "IRON_STATE_AUDIT_KEY", "16 bytes")


# -- export, prune, purge ----------------------------------------------------------------------------


def test_export_jsonl_and_csv(fleet: str, tmp_path: Path) -> None:
    with open_manager(fleet) as manager:
        records = [r.to_dict() for r in manager.audit_log()]
    run = ok("export", "--url", fleet)
    assert [json.loads(line) for line in run.stdout.splitlines()] == records
    assert f"exported {len(records)} audit records" in run.stderr
    rows = list(csv.DictReader(io.StringIO(ok("export", "--format", "csv", "--url", fleet).stdout)))
    assert len(rows) == len(records)
    assert rows[0]["hash"] == records[0]["hash"]
    target = tmp_path / "pii.jsonl"
    ok("export", "--type", "pii_detected", "-o", str(target), "--url", fleet)
    exported = [json.loads(line) for line in target.read_text().splitlines()]
    assert exported == [r for r in records if r["event_type"] == "pii_detected"]


def test_export_to_an_unwritable_place(fleet: str, tmp_path: Path) -> None:
    target = tmp_path / "no" / "such" / "dir" / "out.jsonl"
    one_error_line(invoke("export", "-o", str(target), "--url", fleet), EXIT_USAGE, "No such file")


def test_prune(own_fleet: str) -> None:
    refused = invoke("prune", "--before", "1h", "--url", own_fleet)
    one_error_line(refused, EXIT_USAGE, "--yes")
    with open_manager(own_fleet) as manager:
        total = manager.audit_count()
        last = manager.audit_log()[-1]
    assert ok("prune", "--before", "2000-01-01", "--yes", "--url", own_fleet, "--json").json()["removed"] == 0
    data = ok("prune", "--before", str(last.timestamp + 1), "-y", "--url", own_fleet, "--json").json()
    assert data["removed"] == total
    assert data["remaining"] == 0
    assert ok("verify", "--url", own_fleet, "--json").json()["ok"] is True
    assert "removed 0 audit records" in ok("prune", "--before", "1d", "--yes", "--url", own_fleet).stdout


def test_prune_asks_on_a_terminal(own_fleet: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_session, "_stdin_is_terminal", lambda: True)
    run = invoke("prune", "--before", "2000-01-01", "--url", own_fleet, input="n\n")
    assert run.code == EXIT_CHECK_FAILED, run
    assert "Remove the audit records before 2000-01-01T00:00:00Z" in run.stderr  # the question
    assert run.stderr.rstrip().endswith("error: cancelled, nothing was changed")
    run = invoke("prune", "--before", "2000-01-01", "--url", own_fleet, input="y\n")
    assert run.code == EXIT_OK, run


def test_purge(own_fleet: str) -> None:
    with open_manager(own_fleet) as manager:
        before = manager.stats()
    one_error_line(invoke("purge", "--older-than", "0", "--url", own_fleet), EXIT_USAGE, "--yes")
    one_error_line(
        invoke("purge", "--older-than", "0", "--status", "running", "-y", "--url", own_fleet),
        EXIT_USAGE,
        "finished agents only",
    )
    one_error_line(invoke("purge", "--older-than", "soon", "-y", "--url", own_fleet), EXIT_USAGE, "duration")
    assert ok("purge", "--older-than", "1d", "-y", "--url", own_fleet, "--json").json()["removed"] == 0
    data = ok("purge", "--older-than", "0", "--status", "failed", "-y", "--url", own_fleet, "--json").json()
    assert data["removed"] == before.failed == len(data["agent_ids"])
    run = ok("purge", "--older-than", "0s", "-y", "--url", own_fleet)
    assert f"removed {before.stopped} stopped and failed agents from" in run.stdout
    with open_manager(own_fleet) as manager:
        after = manager.stats()
    assert (after.total, after.running, after.stopped, after.failed) == (before.running, before.running, 0, 0)


# -- copy -----------------------------------------------------------------------------------------------


def _contents(url: str) -> tuple[list[dict[str, Any]], list[tuple[str, str, int, str]]]:
    with open_manager(url) as manager:
        agents = sorted((s.to_dict() for s in manager.iter_agent_states()), key=lambda d: d["agent_id"])
        events = [(str(r.agent_id), r.event_type, r.timestamp, r.details) for r in manager.iter_audit_log()]
    return agents, events


def _scopes(url: str) -> int:
    with open_manager(url) as manager:
        return len(manager.list_budgets())


def _copied(dest: str, fleet: str, copies: int = 1) -> bool:
    """Whether ``dest`` holds ``fleet``'s agents, and its trail ``copies`` times, each followed by
    the ``budget_set`` events of the scopes the copy set."""
    (agents, events), (dest_agents, dest_events) = _contents(fleet), _contents(dest)
    scopes = _scopes(fleet)
    size = len(events) + scopes
    return (
        dest_agents == agents
        and len(dest_events) == copies * size
        and all(dest_events[i * size : i * size + len(events)] == events for i in range(copies))
        and all(
            event[1] == "budget_set"
            for i in range(copies)
            for event in dest_events[i * size + len(events) :][:scopes]
        )
    )


def test_copy_sqlite_to_sqlite(fleet: str, tmp_path: Path) -> None:
    dest = sqlite_url(tmp_path / "copy.db")
    run = ok("copy", fleet, dest)
    assert "copied 80 agents, 3 budget scopes" in run.stdout
    assert "ok: " in run.stdout
    assert _copied(dest, fleet)
    with open_manager(dest) as manager:
        assert manager.verify_audit_log().ok


def test_copy_refuses_a_non_empty_destination_unless_asked(fleet: str, tmp_path: Path) -> None:
    dest = sqlite_url(tmp_path / "copy.db")
    ok("copy", fleet, dest, "--json")
    one_error_line(invoke("copy", fleet, dest), EXIT_USAGE, "already holds 80 agents", "--append", "--force")
    _, events = _contents(fleet)
    data = ok("copy", fleet, dest, "--append", "--json").json()
    assert data["verification"]["ok"] is True
    assert data["verification"]["checked"] == 2 * (len(events) + _scopes(fleet))
    assert _copied(dest, fleet, copies=2)
    forced = ok("copy", fleet, dest, "--force")
    assert "emptied" in forced.stderr
    assert _copied(dest, fleet)
    one_error_line(invoke("copy", fleet, dest, "--force", "--append"), EXIT_USAGE, "one of")


def test_copy_refuses_the_same_store_a_missing_source_and_a_broken_chain(fleet: str, tmp_path: Path) -> None:
    one_error_line(invoke("copy", fleet, fleet), EXIT_USAGE, "same store")
    missing = sqlite_url(tmp_path / "missing.db")
    one_error_line(invoke("copy", missing, sqlite_url(tmp_path / "x.db")), EXIT_NOT_FOUND, "no such file")
    assert not (tmp_path / "missing.db").exists()
    broken = invoke("copy", fleet, sqlite_url(tmp_path / "y.db"), env={"IRON_STATE_AUDIT_KEY": KEY})
    one_error_line(broken, EXIT_CHECK_FAILED, "broken at seq 1")


def test_copy_with_a_destination_key(fleet: str, tmp_path: Path) -> None:
    dest = sqlite_url(tmp_path / "keyed.db")
    data = ok("copy", fleet, dest, "--dest-audit-key-env", "DEST_KEY", "--json", env={"DEST_KEY": KEY}).json()
    assert data["verification"]["ok"] is True
    assert invoke("verify", "--url", dest).code == EXIT_CHECK_FAILED  # sealed with the key
    assert ok("verify", "--url", dest, env={"IRON_STATE_AUDIT_KEY": KEY}).code == EXIT_OK


# -- metrics through the runner (the real process is in test_metrics.py) ---------------------------


def test_metrics_command_serves_the_collector(fleet: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.request

    port = free_port()
    scraped: list[str] = []

    def scrape_then_stop(stop: Any) -> None:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            scraped.append(response.read().decode())
        raise KeyboardInterrupt  # what Ctrl-C does

    monkeypatch.setattr(cli_metrics, "_serve_until_stopped", scrape_then_stop)
    run = invoke("metrics", "--port", str(port), "--url", fleet)
    assert run.code == EXIT_OK, run
    assert f"http://127.0.0.1:{port}/metrics" in run.stderr
    assert 'iron_state_agents{status="running"}' in scraped[0]
    assert "iron_state_audit_records" in scraped[0]
    assert "iron_state_up 1.0" in scraped[0]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_metrics_port_in_use(fleet: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        one_error_line(invoke("metrics", "--port", str(port), "--url", fleet), EXIT_USAGE, "cannot listen")


# -- bad URLs, unreachable stores, --debug -----------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("iron_state.db", "did you mean sqlite:///iron_state.db"),
        ("localhost:6379", "did you mean redis://localhost:6379"),
        ("nosuch://x", "unknown store URL scheme 'nosuch'"),
    ],
)
def test_bad_url(url: str, fragment: str) -> None:
    for command in (["stats"], ["agents"], ["verify", "--json"], ["demo", "-n", "1"]):
        one_error_line(invoke(*command, "--url", url), EXIT_USAGE, fragment)


def test_missing_sqlite_file_is_not_created_by_inspection(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "typo.db")
    for command in ("stats", "agents", "audit", "verify", "export"):
        one_error_line(invoke(command, "--url", url), EXIT_NOT_FOUND, "no such file", "iron-state demo")
    assert not (tmp_path / "typo.db").exists()


def test_unreachable_sqlite_store(tmp_path: Path) -> None:
    # A file under a path that cannot be created: the store cannot be opened.
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    url = sqlite_url(blocker / "sub" / "state.db")
    run = invoke("demo", "-n", "2", "--url", url)
    assert run.code in (EXIT_UNAVAILABLE, EXIT_USAGE), run
    one_error_line(run, run.code)


def test_not_a_sqlite_database(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database file, just some bytes" * 100)
    run = invoke("stats", "--url", sqlite_url(junk))
    assert run.code in (EXIT_UNAVAILABLE, EXIT_USAGE), run
    one_error_line(run, run.code)


def test_unreachable_redis(fleet: str) -> None:
    if "redis" not in SCHEMES:
        pytest.skip("the Redis backend is not registered")
    url = f"redis://127.0.0.1:{free_port()}/0?timeout=0.5"  # nothing listens there
    for command in (["stats"], ["agents", "--json"], ["demo", "-n", "2"]):
        one_error_line(invoke(*command, "--url", url), EXIT_UNAVAILABLE)
    one_error_line(invoke("copy", fleet, url), EXIT_UNAVAILABLE)


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "typo.db")
    run = invoke("stats", "--url", url, "--debug")
    assert run.code != EXIT_OK
    assert isinstance(run.exception, CommandError)
    run = invoke("stats", "--url", "nosuch://x", env={"IRON_STATE_DEBUG": "1"})
    assert run.exception is not None


def test_missing_cli_extra_is_one_line() -> None:
    code = (
        "import sys; sys.modules['typer'] = None; sys.modules['rich'] = None\n"
        "from iron_runtime_state.cli import main\n"
        "main(['stats'])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(), timeout=60
    )
    assert result.returncode == EXIT_USAGE
    assert result.stderr.strip() == (
        "error: the iron-state command line needs the 'cli' extra: pip install 'iron-runtime-state[cli]'"
    )


def test_importing_the_cli_module_needs_no_typer() -> None:
    code = (
        "import sys; sys.modules['typer'] = None\n"
        "import iron_runtime_state.cli as cli\n"
        "print(cli.DEFAULT_URL)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(), timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "sqlite:///iron_state.db"


# -- real processes ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_demo_as_a_process_with_1000_agents(tmp_path: Path) -> None:
    started = time.perf_counter()
    result = subprocess.run(
        [*iron_state_command(), "demo", "--seed", "1"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=subprocess_env(),
        timeout=120,
    )
    elapsed = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    assert "1,000 agents" in result.stdout
    assert "Agents by status" in result.stdout
    assert "Traceback" not in result.stderr
    assert (tmp_path / "iron_state.db").exists()
    print(f"demo, 1,000 agents x 10 steps on SQLite, as a process: {elapsed:.1f} s")
    stats = subprocess.run(
        [*iron_state_command(), "stats", "--json"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=subprocess_env(),
        timeout=60,
    )
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["total"] == 1000


@pytest.mark.slow
def test_errors_as_a_process_have_no_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [*iron_state_command(), "show", str(AgentId.test_fixture(1)), "--url", sqlite_url(tmp_path / "x.db")],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=60,
    )
    assert result.returncode == EXIT_NOT_FOUND
    assert result.stderr.startswith("error: ")
    assert len(result.stderr.strip().splitlines()) == 1
    debug = subprocess.run(
        [*iron_state_command(), "stats", "--url", "nosuch://x", "--debug"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=60,
    )
    assert debug.returncode != 0
    assert "Traceback" in debug.stderr
    assert "ConfigurationError" in debug.stderr


@pytest.mark.slow
def test_copy_as_a_process_sqlite_to_sqlite(fleet: str, tmp_path: Path) -> None:
    dest = sqlite_url(tmp_path / "backup.db")
    result = subprocess.run(
        [*iron_state_command(), "copy", fleet, dest, "--json"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["agents"] == 80
    assert data["budget_scopes"] == 3
    assert data["verification"]["ok"] is True
    assert _copied(dest, fleet)


@pytest.fixture
def redis_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A URL of an empty Redis database from the colleagues' fixtures, when they exist."""
    if "redis" not in SCHEMES:
        pytest.skip("the Redis backend is not registered")
    for name in ("redis_url", "redis_server_url", "redis_server"):
        if name in request.fixturenames:
            continue
        try:
            value = request.getfixturevalue(name)
        except pytest.FixtureLookupError:
            continue
        url = value if isinstance(value, str) else getattr(value, "url", None)
        if isinstance(url, str):
            yield url
            return
    pytest.skip("no Redis server fixture in tests/conftest.py")


@pytest.mark.slow
def test_copy_as_a_process_sqlite_to_redis_and_back(fleet: str, redis_url: str, tmp_path: Path) -> None:
    dest = f"{redis_url.split('?')[0]}?namespace=copytest{os.getpid()}"
    result = subprocess.run(
        [*iron_state_command(), "copy", fleet, dest, "--json"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["verification"]["ok"] is True
    assert _copied(dest, fleet)
    back = sqlite_url(tmp_path / "back.db")
    ok("copy", dest, back)
    # The trail came back with the scopes' budget_set events of both copies after it.
    agents, events = _contents(fleet)
    back_agents, back_events = _contents(back)
    assert back_agents == agents
    assert back_events[: len(events)] == events
    assert [e[1] for e in back_events[len(events) :]] == ["budget_set"] * (2 * _scopes(fleet))


def test_state_json_round_trip_of_agents(fleet: str) -> None:
    rows = ok("agents", "--limit", "0", "--url", fleet, "--json").json()
    assert all(isinstance(AgentState.from_dict(row).status, AgentStatus) for row in rows)


# -- inspection never creates a store; a failed copy leaves no destination ---------------------------


def _beside(path: Path) -> list[str]:
    """The files in the path's folder: SQLite's -wal and -shm would show a store was opened."""
    return sorted(p.name for p in path.parent.iterdir())


def test_inspection_writes_no_store_into_an_empty_or_missing_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.db"
    empty.touch()
    bare = tmp_path / "bare.db"  # a SQLite database with no table in it
    db = sqlite3.connect(bare)
    db.execute("CREATE TABLE t (x)")
    db.execute("DROP TABLE t")
    db.close()
    bare_bytes = bare.read_bytes()
    agent = str(AgentId.test_fixture(1))
    commands = [["stats"], ["verify"], ["agents"], ["show", agent], ["audit"], ["export"]]
    for path in (empty, bare):
        for command in commands:
            run = invoke(*command, "--url", sqlite_url(path))
            one_error_line(run, EXIT_UNAVAILABLE, str(path), "no SQLite store")
    assert empty.read_bytes() == b""
    assert bare.read_bytes() == bare_bytes
    missing = tmp_path / "missing.db"
    for command in commands:
        one_error_line(invoke(*command, "--url", sqlite_url(missing)), EXIT_NOT_FOUND, "no such file")
    assert _beside(missing) == ["bare.db", "empty.db"]


def test_a_copy_from_a_source_it_cannot_use_creates_no_destination(fleet: str, tmp_path: Path) -> None:
    dest = tmp_path / "dest.db"
    broken = invoke("copy", fleet, sqlite_url(dest), env={"IRON_STATE_AUDIT_KEY": KEY})
    one_error_line(broken, EXIT_CHECK_FAILED, "broken at seq")
    empty = tmp_path / "empty.db"
    empty.touch()
    one_error_line(invoke("copy", sqlite_url(empty), sqlite_url(dest)), EXIT_UNAVAILABLE, "no SQLite store")
    missing = sqlite_url(tmp_path / "missing.db")
    one_error_line(invoke("copy", missing, sqlite_url(dest)), EXIT_NOT_FOUND, "no such file")
    short_key = invoke("copy", fleet, sqlite_url(dest), "--dest-audit-key-env", "SHORT", env={"SHORT": "k"})
    one_error_line(short_key, EXIT_USAGE, "shorter than 16 bytes")
    assert _beside(dest) == ["empty.db"]
    assert empty.read_bytes() == b""


def test_a_copy_that_fails_midway_removes_the_destination_it_created(
    fleet: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from iron_runtime_state import BackendUnavailable

    def lost_connection(self: StateManager, events: Any, **options: Any) -> Any:
        raise BackendUnavailable("the destination went away")

    monkeypatch.setattr(StateManager, "save_audit_logs", lost_connection)
    dest = tmp_path / "dest.db"
    one_error_line(invoke("copy", fleet, sqlite_url(dest)), EXIT_UNAVAILABLE, "went away")
    assert _beside(dest) == []  # no empty or half-filled store left behind
    kept = tmp_path / "kept.db"  # a destination that was there before the copy stays
    with open_manager(sqlite_url(kept)) as manager:
        manager.save_agent_state(AgentState(AgentId.test_fixture(9), AgentStatus.RUNNING))
    one_error_line(invoke("copy", fleet, sqlite_url(kept), "--append"), EXIT_UNAVAILABLE, "went away")
    monkeypatch.undo()
    with open_manager(sqlite_url(kept)) as manager:
        assert manager.get_agent_state(AgentId.test_fixture(9)) is not None
    assert ok("copy", fleet, sqlite_url(dest)).code == EXIT_OK


def test_a_checkpoint_catches_a_truncation_that_verify_alone_cannot(own_fleet: str, tmp_path: Path) -> None:
    checkpoint = tmp_path / "cp.json"
    run = ok("checkpoint", "--url", own_fleet, "--out", str(checkpoint))
    saved = json.loads(checkpoint.read_text(encoding="utf-8"))
    assert set(saved) == {"seq", "hash", "time", "signature"}
    assert saved["signature"] == ""  # no key: unsigned
    assert json.loads(ok("checkpoint", "--url", own_fleet).stdout)["seq"] == saved["seq"]
    one_error_line(invoke("checkpoint", "--url", own_fleet, "--out", str(checkpoint)), EXIT_USAGE, "exists")
    assert ok("verify", "--url", own_fleet, "--checkpoint", str(checkpoint)).stdout.startswith("ok: ")
    # Remove the newest records and move the head back to match: a valid, shorter chain.
    path = tmp_path / "own.db"
    db = sqlite3.connect(path, isolation_level=None)
    try:
        keep = saved["seq"] - 3
        (digest,) = db.execute("SELECT hash FROM iron_audit WHERE seq = ?", (keep,)).fetchone()
        db.execute("BEGIN IMMEDIATE")
        db.execute("DELETE FROM iron_audit WHERE seq > ?", (keep,))
        db.execute("DELETE FROM iron_ledger WHERE seq > ?", (keep,))  # their index rows too
        db.execute("UPDATE iron_audit_chain SET head_seq = ?, head_hash = ?", (keep, digest))
        db.execute("COMMIT")
    finally:
        db.close()
    assert ok("verify", "--url", own_fleet).stdout.startswith("ok: ")
    run = invoke("verify", "--url", own_fleet, "--checkpoint", str(checkpoint))
    assert run.code == EXIT_CHECK_FAILED, run
    assert "checkpoint" in run.stdout
    assert (
        invoke("verify", "--url", own_fleet, "--checkpoint", str(checkpoint), "--json").json()["ok"] is False
    )


def test_a_bad_checkpoint_file_is_one_error_line(own_fleet: str, tmp_path: Path) -> None:
    one_error_line(
        invoke("verify", "--url", own_fleet, "--checkpoint", str(tmp_path / "nope.json")), EXIT_USAGE
    )
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    one_error_line(invoke("verify", "--url", own_fleet, "--checkpoint", str(bad)), EXIT_USAGE, "checkpoint")
    bad.write_text('{"seq": 1}', encoding="utf-8")
    one_error_line(invoke("verify", "--url", own_fleet, "--checkpoint", str(bad)), EXIT_USAGE, "keys")


# -- help, --json everywhere, details as JSON (issue #15) ----------------------------------------------

COMMAND_NAMES = (
    "demo",
    "agents",
    "show",
    "stats",
    "purge",
    "budgets",
    "spend",
    "audit",
    "verify",
    "checkpoint",
    "export",
    "prune",
    "copy",
    "migrate",
    "metrics",
    "serve",
)


def _panels(help_text: str) -> dict[str, list[str]]:
    """The commands under each heading of ``iron-state --help``."""
    panels: dict[str, list[str]] = {}
    current = ""
    for line in help_text.splitlines():
        if line.startswith("╭─"):
            current = line.strip("╭─╮ ")
            panels[current] = []
        elif line.startswith("│") and current:
            words = line.strip("│ ").split()
            if words and words[0] in COMMAND_NAMES:
                panels[current].append(words[0])
    return panels


def test_help_shows_no_bare_python_types_and_purge_with_the_agents() -> None:
    wide = {"COLUMNS": "140", "TERMINAL_WIDTH": "140"}
    root = ok("--help", env=wide).stdout
    panels = _panels(root)
    assert panels["Agents"] == ["agents", "show", "stats", "purge"], panels
    assert panels["Audit trail"] == ["audit", "verify", "checkpoint", "export", "prune"], panels
    assert panels["Budgets"] == ["budgets", "spend"], panels  # and the group `budget` (test_cli_budgets.py)
    assert panels["Operate"] == ["copy", "migrate", "metrics", "serve"], panels
    for command in ("", *COMMAND_NAMES):
        text = ok(*([command] if command else []), "--help", env=wide).stdout
        for line in text.splitlines():
            types = [t for t in ("<bool>", "<int", "<float", "<path", "list[", "<str>") if t in line]
            # Only an argument (AGENT_ID, SOURCE_URL, DEST_URL) still shows Typer's <str>.
            assert types in ([], ["<str>"]), (command, line)
            argument = any(name in line for name in ("AGENT_ID", "SOURCE_URL", "DEST_URL"))
            assert types == [] or argument, (command, line)
    purge = ok("purge", "--help", env=wide).stdout
    assert "--status" in purge
    assert "[stopped|failed]" in purge
    assert "(default: both)" in purge  # not swallowed as Rich markup
    assert "(default: 50, or all with --json)" in ok("agents", "--help", env=wide).stdout
    audit = ok("audit", "--help", env=wide).stdout
    for metavar in ("URL", "ID", "TYPE", "WHEN", "SEQ"):
        assert f" {metavar} " in audit, metavar
    assert "--interval" not in audit  # ignored since --follow waits on the store; hidden


def test_every_command_takes_json_and_all_but_copy_take_url() -> None:
    for command in COMMAND_NAMES:
        text = ok(command, "--help", env={"COLUMNS": "140"}).stdout
        assert "--json" in text, command
        assert ("--url" in text) is (command != "copy"), command


def test_export_json_is_a_summary_when_writing_a_file(fleet: str, tmp_path: Path) -> None:
    target = tmp_path / "trail.jsonl"
    summary = ok("export", "-o", str(target), "--json", "--url", fleet).json()
    lines = target.read_text(encoding="utf-8").splitlines()
    with open_manager(fleet) as manager:
        count = manager.audit_count()
        url = manager.url
    assert summary == {"url": url, "output": str(target), "format": "jsonl", "records": count}
    assert len(lines) == count
    as_csv = ok("export", "-f", "csv", "-o", str(tmp_path / "t.csv"), "--json", "--url", fleet).json()
    assert (as_csv["format"], as_csv["records"]) == ("csv", count)
    # Without --output, stdout is the export itself: JSON Lines, one record per line.
    run = ok("export", "--json", "--type", "budget_exceeded", "--url", fleet)
    exported = [json.loads(line) for line in run.stdout.splitlines()]
    assert exported
    assert {r["event_type"] for r in exported} == {"budget_exceeded"}
    assert all(isinstance(r["details"], str) for r in exported)  # the hashed text, as stored
    one_error_line(invoke("export", "--json", "-f", "csv", "--url", fleet), EXIT_USAGE, "--output")


def test_metrics_json_prints_where_it_listens(fleet: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def stop_at_once(stop: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_metrics, "_serve_until_stopped", stop_at_once)
    run = invoke("metrics", "--port", "0", "--json", "--url", fleet)
    assert run.code == EXIT_OK, run
    [line] = run.stdout.splitlines()
    started = json.loads(line)
    assert set(started) == {"url", "host", "port", "endpoint"}
    assert started["host"] == "127.0.0.1"
    assert started["port"] > 0
    assert started["endpoint"] == f"http://127.0.0.1:{started['port']}/metrics"
    assert started["url"].startswith("sqlite:///")
    assert started["endpoint"] in run.stderr  # the note for a person stays on stderr


def test_checkpoint_json_with_out_is_a_summary(own_fleet: str, tmp_path: Path) -> None:
    target = tmp_path / "cp.json"
    summary = ok("checkpoint", "--out", str(target), "--json", "--url", own_fleet).json()
    saved = json.loads(target.read_text(encoding="utf-8"))
    assert summary["out"] == str(target)
    assert (summary["seq"], summary["hash"]) == (saved["seq"], saved["hash"])
    assert json.loads(ok("checkpoint", "--json", "--url", own_fleet).stdout)["seq"] == saved["seq"]


def test_audit_and_show_json_give_details_as_json_where_they_are(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = sqlite_url(tmp_path / "details.db")
    agent = AgentId.test_fixture(15)
    texts = {
        "object": '{"count":2,"details":"passport"}',
        "array": "[1, 2, 3]",
        "text": "hello",
        "scalar": "42",
        "cut": '{"a": 1',
        "twice": '{"a": 1, "a": 2}',
        "nan": '{"a": NaN}',
    }
    with StateManager.from_url(url) as manager:
        manager.save_agent_state(AgentState(agent, AgentStatus.RUNNING))
        manager.save_audit_logs(
            [AuditEvent(agent, kind, 1_700_000_000, text) for kind, text in texts.items()]
        )
        manager.set_status(agent, AgentStatus.STOPPED)
    expected = {
        "object": {"count": 2, "details": "passport"},
        "array": [1, 2, 3],
        "text": "hello",
        "scalar": "42",  # not an object or array: the text, so details keep one type per kind
        "cut": '{"a": 1',
        "twice": '{"a": 1, "a": 2}',  # would not read back as the same text
        "nan": '{"a": NaN}',
        "status_changed": {"from": "running", "to": "stopped"},
    }
    listed = ok("audit", "--limit", "0", "--json", "--url", url).json()
    assert {r["event_type"]: r["details"] for r in listed} == expected
    shown = ok("show", str(agent), "--events", "20", "--json", "--url", url).json()
    assert {r["event_type"]: r["details"] for r in shown["events"]} == expected

    def stop() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_audit, "_idle", stop)
    monkeypatch.setattr(cli_audit, "_FOLLOW_IDLE", 0.05)
    followed = ok("audit", "--follow", "--limit", "0", "--json", "--url", url).stdout.splitlines()
    assert {r["event_type"]: r["details"] for r in map(json.loads, followed)} == expected
    with StateManager.from_url(url) as manager:  # stored, and exported, as the text that was hashed
        assert [r.details for r in manager.audit_log()][:7] == list(texts.values())
    exported = ok("export", "--url", url).stdout.splitlines()
    assert [json.loads(line)["details"] for line in exported][:7] == list(texts.values())
