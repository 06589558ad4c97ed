"""The command line of issue #16: ``budgets``, ``budget set|show|remove``, ``agents --label``,
``migrate``, and the demo fleet's teams and scopes.

Through Typer's runner, on SQLite files in temporary folders, with the helpers of test_cli.py.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import pytest

pytest.importorskip("typer.testing")

from iron_runtime_state import AgentId, AgentState, AgentStatus, StateManager
from iron_runtime_state.backends import SCHEMES
from iron_runtime_state.cli import EXIT_NOT_FOUND, EXIT_USAGE
from iron_runtime_state.cli.application import exit_code_for
from iron_runtime_state.cli.render import agents_table, usage_bar
from iron_runtime_state.errors import BudgetNotFound

from .test_cli import invoke, ok, one_error_line, sqlite_url

pytestmark = pytest.mark.skipif("sqlite" not in SCHEMES, reason="the SQLite backend is not registered")

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
#: The last commit of version 0.4, and what it writes into a Redis namespace for migrate.
V04 = "2b0e376"
V04_WRITER = """
import sys
from iron_runtime_state import AgentId, AgentState, AgentStatus, StateManager
manager = StateManager.from_url(sys.argv[1])
agent = AgentId.test_fixture(7)
manager.save_agent_state(AgentState(agent, AgentStatus.RUNNING, budget_limit=10.0))
manager.record_spend(agent, 0.1)
manager.record_spend(agent, 0.2)
"""
SCOPES = ("org:acme", "team:support")


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("IRON_STATE_URL", "IRON_STATE_AUDIT_KEY", "IRON_STATE_DEBUG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_COLOR", "1")


@pytest.fixture
def store(tmp_path: Path) -> str:
    """A SQLite store with an org and a team scope and four agents: three of the support team
    (two in production), one of research."""
    url = sqlite_url(tmp_path / "budgets.db")
    with StateManager.from_url(url) as manager:
        manager.set_budget("org:acme", limit=1000, period="month")
        manager.set_budget("team:support", limit=100, period="month", tz="Europe/Paris")
        for n, (team, env) in enumerate(
            [("support", "prod"), ("support", "prod"), ("support", "dev"), ("research", "prod")], 1
        ):
            manager.save_agent_state(
                AgentState(
                    AgentId.test_fixture(n),
                    AgentStatus.RUNNING,
                    budget_limit=60,
                    labels={"team": team, "env": env},
                    budget_scopes=("org:acme", f"team:{team}") if team == "support" else ("org:acme",),
                    budget_period="day" if n == 1 else None,
                )
            )
        manager.record_spend(AgentId.test_fixture(1), 55)
        manager.record_spend(AgentId.test_fixture(2), "20.25")
        manager.reserve_budget(AgentId.test_fixture(3), 4, ttl=3600)
    return url


# -- budget set ----------------------------------------------------------------------------------------


def test_budget_set_creates_a_scope(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "new.db")
    StateManager.from_url(url).close()
    run = ok(
        "budget",
        "set",
        "team:ops",
        "--limit",
        "250.5",
        "--period",
        "week",
        "--tz",
        "America/New_York",
        "--url",
        url,
    )
    assert "created budget scope team:ops" in run.stdout
    assert "250.50" in run.stdout
    assert "week (America/New_York)" in run.stdout
    data = ok("budget", "show", "team:ops", "--json", "--url", url).json()
    assert data["limit"] == 250.5
    assert data["period"] == "week"
    assert data["tz"] == "America/New_York"
    assert data["spent"] == 0.0
    assert data["available"] == 250.5
    assert data["used"] == 0.0
    start = datetime.fromisoformat(data["period_start"])
    end = datetime.fromisoformat(data["period_end"])
    assert start.weekday() == 0
    assert (start.hour, start.minute) == (0, 0)
    assert (end - start).days == 7
    with StateManager.from_url(url) as manager:
        [event] = manager.audit_log(event_type="budget_set")
        assert '"scope":"team:ops"' in event.details


def test_budget_set_json_and_tracking_only(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "new.db")
    StateManager.from_url(url).close()
    data = ok("budget", "set", "org:acme", "--limit", "none", "--json", "--url", url).json()
    assert data["created"] is True
    assert data["limit"] is None
    assert data["available"] is None
    assert data["used"] is None
    assert data["period"] is None
    assert data["period_start"] is None
    assert data["period_end"] is None
    assert "no limit" in ok("budgets", "--url", url).stdout


def test_budget_set_on_an_existing_scope_keeps_its_period_zone_and_spend(store: str) -> None:
    run = ok("budget", "set", "team:support", "--limit", "150", "--url", store)
    assert "changed budget scope team:support" in run.stdout
    assert "was: limit 100.00, period month (Europe/Paris)" in run.stdout
    data = ok("budget", "show", "team:support", "--json", "--url", store).json()
    assert (data["limit"], data["period"], data["tz"]) == (150.0, "month", "Europe/Paris")
    assert data["spent"] == 75.25  # kept
    assert data["held"] == 4.0
    changed = ok(
        "budget", "set", "team:support", "--limit", "150", "--tz", "UTC", "--json", "--url", store
    ).json()
    assert changed["created"] is False
    assert (changed["period"], changed["tz"]) == ("month", "UTC")
    removed = ok(
        "budget", "set", "team:support", "--limit", "150", "--period", "none", "--json", "--url", store
    )
    assert removed.json()["period"] is None


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--limit", "abc"], "--limit"),
        (["--limit", "nan"], "--limit"),
        (["--limit", "inf"], "--limit"),
        (["--limit", "-5"], "limit"),
        (["--limit", "10", "--period", "year"], "--period"),
        (["--limit", "10", "--period", "month", "--tz", "Mars/Olympus"], "Mars/Olympus"),
        (["--limit", "10", "--thresholds", "half"], "--thresholds: cannot read 'half'"),
        (["--limit", "10", "--thresholds", "0.5,0"], "--thresholds: 0.0 is not a fraction"),
        (["--limit", "10", "--thresholds", "1200%"], "(0, 10]"),
        (["--limit", "10", "--thresholds", ",".join(["0.1"] * 11)], "at most 10"),
    ],
)
def test_budget_set_bad_input_is_one_line_and_changes_nothing(
    store: str, args: list[str], fragment: str
) -> None:
    before = ok("budgets", "--json", "--url", store).json()
    one_error_line(invoke("budget", "set", "team:support", *args, "--url", store), EXIT_USAGE, fragment)
    assert ok("budgets", "--json", "--url", store).json() == before


def test_budget_set_thresholds_and_keeping_them(store: str) -> None:
    assert (
        "alerts      at 50%, 80%, 100% of the limit"
        in ok("budget", "show", "org:acme", "--url", store).stdout
    )
    run = ok("budget", "set", "team:support", "--limit", "100", "--thresholds", "90%,0.5", "--url", store)
    assert "alerts      at 50%, 90% of the limit" in run.stdout
    # Changed again without --thresholds: kept, as the period and the zone are.
    data = ok("budget", "set", "team:support", "--limit", "120", "--json", "--url", store).json()
    assert data["thresholds"] == [0.5, 0.9]
    with StateManager.from_url(store) as manager:
        assert manager.get_budget("team:support").thresholds == (0.5, 0.9)  # type: ignore[union-attr]
        assert '"thresholds":[0.5,0.9]' in manager.audit_log(event_type="budget_set")[-1].details
    data = ok(
        "budget", "set", "team:support", "--limit", "120", "--thresholds", "none", "--json", "--url", store
    )
    assert data.json()["thresholds"] == []
    assert "alerts      none" in ok("budget", "show", "team:support", "--url", store).stdout
    created = ok("budget", "set", "team:new", "--limit", "none", "--url", store).stdout
    assert "at 50%, 80%, 100% of the limit (none without a limit)" in created


def test_a_bad_scope_name_is_a_usage_error(store: str) -> None:
    for command in (
        ["set", "Team Support", "--limit", "1"],
        ["show", "Team Support"],
        ["remove", "-x-", "--yes"],
    ):
        run = invoke("budget", *command, "--url", store)
        assert run.code == EXIT_USAGE, run
        assert "Traceback" not in run.stderr
    one_error_line(invoke("budget", "show", "Team Support", "--url", store), EXIT_USAGE, "team:support")
    one_error_line(invoke("budget", "set", "x" * 200, "--limit", "1", "--url", store), EXIT_USAGE, "128")


def test_budget_set_needs_a_limit(store: str) -> None:
    run = invoke("budget", "set", "team:x", "--url", store)
    assert run.code == EXIT_USAGE, run
    assert "--limit" in run.stderr


# -- budgets, budget show ------------------------------------------------------------------------------


def test_budgets_lists_every_scope_with_a_bar(store: str) -> None:
    run = ok("budgets", "--url", store)
    lines = run.stdout.splitlines()
    org = next(line for line in lines if "org:acme" in line)
    team = next(line for line in lines if "team:support" in line)
    assert lines.index(org) < lines.index(team)  # sorted by name
    assert "1,000.00" in org
    assert "75.25" in org
    assert "920.75" in org
    assert "   7%" in org
    assert "month from " in team
    assert "Europe/Paris" in team
    # 75.25 spent and 4 held of 100 in 10 cells: 7 spent, one held (any hold shows), the rest free.
    assert "█" * 7 + "▒" + "░" * 2 + "  79%" in team
    assert "2 budget scopes in" in run.stderr
    data = ok("budgets", "--json", "--url", store).json()
    assert [b["scope"] for b in data] == list(SCOPES)
    assert data[1] | {"period_start": None, "period_end": None} == {
        "scope": "team:support",
        "limit": 100.0,
        "period": "month",
        "tz": "Europe/Paris",
        "period_start": None,
        "period_end": None,
        "spent": 75.25,
        "held": 4.0,
        "available": 20.75,
        "used": 0.7925,
        "thresholds": [0.5, 0.8, 1.0],
    }


def test_budgets_on_a_store_without_scopes(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "empty.db")
    StateManager.from_url(url).close()
    run = ok("budgets", "--url", url)
    assert run.stdout == ""
    assert "no budget scopes" in run.stderr
    assert "iron-state budget set" in run.stderr
    assert ok("budgets", "--json", "--url", url).json() == []


def test_budget_show(store: str) -> None:
    run = ok("budget", "show", "team:support", "--url", store)
    for text in (
        "team:support",
        "100.00",
        "75.25",
        "4.00",
        "20.75",
        "month (Europe/Paris), from ",
        " to ",
        "79%",
    ):
        assert text in run.stdout, text
    one_error_line(
        invoke("budget", "show", "team:nobody", "--url", store),
        EXIT_NOT_FOUND,
        "'team:nobody' is not in",
        "iron-state budgets",
    )
    one_error_line(invoke("budget", "show", "team:nobody", "--json", "--url", store), EXIT_NOT_FOUND)


def test_a_read_after_the_period_ended_shows_the_new_period_and_writes_nothing(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "old.db")
    january = datetime(2020, 1, 15, tzinfo=timezone.utc).timestamp()
    with StateManager.from_url(url, clock=lambda: january) as manager:
        manager.set_budget("team:support", limit=100, period="month")
        manager.save_agent_state(
            AgentState(AgentId.test_fixture(1), AgentStatus.RUNNING, budget_scopes=("team:support",))
        )
        manager.record_spend(AgentId.test_fixture(1), 30)
        records = manager.audit_count()
    data = ok("budget", "show", "team:support", "--json", "--url", url).json()
    assert data["spent"] == 0.0
    assert datetime.fromisoformat(data["period_start"]) > datetime(2020, 2, 1, tzinfo=timezone.utc)
    with StateManager.from_url(url) as manager:
        assert manager.audit_count() == records  # the reset is written by the next operation, not a read


# -- budget remove -------------------------------------------------------------------------------------


def test_budget_remove(store: str) -> None:
    one_error_line(invoke("budget", "remove", "team:support", "--url", store), EXIT_USAGE, "--yes")
    assert len(ok("budgets", "--json", "--url", store).json()) == 2
    run = ok("budget", "remove", "team:support", "--yes", "--url", store)
    assert "removed budget scope team:support" in run.stdout
    assert "budget_scopes" in run.stderr  # what happens to the agents that list it
    assert [b["scope"] for b in ok("budgets", "--json", "--url", store).json()] == ["org:acme"]
    one_error_line(
        invoke("budget", "remove", "team:support", "--yes", "--url", store), EXIT_NOT_FOUND, "not in"
    )
    data = ok("budget", "remove", "org:acme", "--yes", "--json", "--url", store).json()
    assert data["removed"] is True
    assert data["scope"] == "org:acme"
    assert data["spent"] == 75.25 + 0.0
    with StateManager.from_url(store) as manager:
        assert len(manager.audit_log(event_type="budget_removed")) == 2


def test_budget_not_found_is_exit_status_4() -> None:
    assert exit_code_for(BudgetNotFound("team:x", "agent_x")) == EXIT_NOT_FOUND


# -- agents --label, show --------------------------------------------------------------------------------


def test_agents_by_label(store: str) -> None:
    def ids(*labels: str) -> list[str]:
        args = [a for label in labels for a in ("--label", label)]
        return sorted(row["agent_id"] for row in ok("agents", *args, "--json", "--url", store).json())

    fixture = [str(AgentId.test_fixture(n)) for n in range(5)]
    assert ids("team=support") == fixture[1:4]
    assert ids("team=support", "env=prod") == fixture[1:3]  # every label must match
    assert ids("team=support", "env=staging") == []
    assert ids("env=prod", "team=research") == [fixture[4]]
    assert ids("nothing=here") == []
    run = ok("agents", "--label", "team=support", "--label", "env=prod", "--url", store)
    assert "2 agents with env=prod team=support in" in run.stderr
    assert "labels" in run.stdout
    assert "scopes" in run.stdout
    lines = run.stdout.splitlines()  # one label and one scope a line
    first = next(i for i, line in enumerate(lines) if str(AgentId.test_fixture(1)) in line)
    assert "env=prod" in lines[first]
    assert "org:acme" in lines[first]
    assert "team=support" in lines[first + 1]
    assert "team:support" in lines[first + 1]
    assert "60.00/day" in run.stdout  # agent 1 has a daily limit
    limited = ok("agents", "--label", "team=support", "--limit", "1", "--url", store)
    assert "(--limit 0 for all)" in limited.stderr
    rows = ok(
        "agents",
        "--label",
        "team=support",
        "--status",
        "running",
        "--sort",
        "spent",
        "--json",
        "--url",
        store,
    )
    assert [row["budget_spent"] for row in rows.json()] == [55.0, 20.25, 0.0]
    assert rows.json()[0]["labels"] == {"team": "support", "env": "prod"}
    assert rows.json()[0]["budget_scopes"] == list(SCOPES)


@pytest.mark.parametrize(
    ("label", "fragment"),
    [("team", "KEY=VALUE"), ("=support", "KEY=VALUE"), ("Team=x", "label key"), ("a=1 --label a=2", None)],
)
def test_bad_labels_are_usage_errors(store: str, label: str, fragment: str | None) -> None:
    args = ["--label", label] if fragment else ["--label", "a=1", "--label", "a=2"]
    line = one_error_line(invoke("agents", *args, "--url", store), EXIT_USAGE)
    assert (fragment or "twice") in line


def test_agents_without_labels_keep_the_old_table(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "plain.db")
    with StateManager.from_url(url) as manager:
        manager.save_agent_state(AgentState(AgentId.test_fixture(1), AgentStatus.RUNNING, budget_limit=5))
    header = ok("agents", "--url", url).stdout.splitlines()[1]
    assert "labels" not in header
    assert "scopes" not in header


def test_the_agents_table_adds_labels_then_scopes_where_they_fit() -> None:
    state = AgentState(
        AgentId.test_fixture(1),
        AgentStatus.RUNNING,
        labels={"team": "support", "env": "prod"},
        budget_scopes=("org:acme", "team:support"),
    )

    def headers(width: int | None) -> list[str]:
        return [str(column.header) for column in agents_table([state], width).columns]

    base = ["agent", "status", "spent", "limit", "used", "PII"]
    assert headers(None) == [*base, "labels", "scopes"]
    assert headers(200) == [*base, "labels", "scopes"]
    assert headers(110) == [*base, "labels"]  # an 80 + 15 + 15 column table does not fit
    assert headers(80) == base
    assert [str(c.header) for c in agents_table([], 80).columns] == base


def test_show_an_agent_with_labels_scopes_and_a_period(store: str) -> None:
    run = ok("show", str(AgentId.test_fixture(1)), "--url", store)
    assert "env=prod team=support" in run.stdout
    assert "org:acme team:support" in run.stdout
    assert "day (UTC), since " in run.stdout
    assert "alerts     at 50%, 80%, 100% of the limit" in run.stdout  # the agent's own budget
    data = ok("show", str(AgentId.test_fixture(3)), "--json", "--url", store).json()
    assert data["budget_thresholds"] == [0.5, 0.8, 1.0]
    # Its own limit leaves 56 (4 held); the team leaves 20.75: the least of them.
    assert data["budget_available"] == 20.75
    assert data["labels"] == {"team": "support", "env": "dev"}


# -- migrate -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["store-0.4.db", "store-0.5.db"])
def test_migrate_an_old_sqlite_file(tmp_path: Path, name: str) -> None:
    if not (DATA / name).exists():
        pytest.skip(f"tests/data/{name} is not there")
    path = tmp_path / name
    shutil.copy(DATA / name, path)
    with sqlite3.connect(path) as db:
        old = db.execute("PRAGMA user_version").fetchone()[0]
    url = sqlite_url(path)
    data = ok("migrate", "--json", "--url", url).json()
    assert data["migrated"] is True
    assert data["schema_version"]["before"] == old
    assert data["schema_version"]["after"] > old
    run = ok("migrate", "--url", url)
    assert "nothing to do" in run.stdout
    assert ok("migrate", "--json", "--url", url).json()["migrated"] is False
    assert ok("agents", "--json", "--url", url).json()  # its agents read
    with StateManager.from_url(url) as manager:
        assert manager.verify_audit_log().ok


def test_migrate_text_says_what_was_done(tmp_path: Path) -> None:
    if not (DATA / "store-0.4.db").exists():
        pytest.skip("tests/data/store-0.4.db is not there")
    path = tmp_path / "old.db"
    shutil.copy(DATA / "store-0.4.db", path)
    run = ok("migrate", "--url", sqlite_url(path))
    assert "schema migrated from version" in run.stdout


def test_migrate_refuses_a_missing_file_and_has_nothing_to_do_in_memory(tmp_path: Path) -> None:
    one_error_line(
        invoke("migrate", "--url", sqlite_url(tmp_path / "typo.db")), EXIT_NOT_FOUND, "no such file"
    )
    assert not (tmp_path / "typo.db").exists()
    data = ok("migrate", "--url", "memory://", "--json").json()
    assert "nothing to migrate" in data["report"]


def test_migrate_a_redis_namespace_written_by_0_4(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    if "redis" not in SCHEMES:
        pytest.skip("the Redis backend is not registered")
    server = request.getfixturevalue("redis_server")
    url = f"redis://127.0.0.1:{server.port}/0?namespace=climigrate{os.getpid()}"
    try:  # the package as 0.4 shipped it, from this repository's history
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", V04, "src"], check=True, capture_output=True, timeout=60
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(tmp_path)], input=archive, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"0.4 (commit {V04}) is not in this checkout's history: {exc}")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "src")}
    written = subprocess.run(
        [sys.executable, "-c", V04_WRITER, url], capture_output=True, text=True, timeout=120, env=env
    )
    assert written.returncode == 0, written.stderr
    data = ok("migrate", "--json", "--url", url).json()
    assert "0.4/0.5" in data["report"]
    assert "1 agents converted" in data["report"]
    assert data["done"] == data["report"].splitlines()
    assert data["migrated"] is None  # the store's report says what it did
    again = ok("migrate", "--url", url).stdout
    assert "nothing to migrate" in again
    [row] = ok("agents", "--json", "--url", url).json()
    assert row["budget_spent"] == 0.3
    with StateManager.from_url(url) as manager:
        state = manager.get_agent_state(AgentId.test_fixture(7))
        assert state is not None
        assert state.spent_exact == Decimal("0.3")


def test_migrate_a_store_with_nothing_to_convert(request: pytest.FixtureRequest) -> None:
    if "redis" not in SCHEMES:
        pytest.skip("the Redis backend is not registered")
    server = request.getfixturevalue("redis_server")
    url = f"redis://127.0.0.1:{server.port}/0?namespace=clinew{os.getpid()}"
    data = ok("migrate", "--json", "--url", url).json()
    assert "nothing to migrate" in data["report"]


# -- the demo's teams and scopes ---------------------------------------------------------------------------


def test_the_demo_runs_two_teams_under_an_org(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "demo.db")
    data = ok("demo", "-n", "120", "-s", "10", "--seed", "5", "--json", "--url", url).json()
    scopes = [b["scope"] for b in data["budgets"]]
    assert scopes == ["org:demo-5", "team:demo-5.support", "team:demo-5.research"]
    assert all(b["period"] == "month" for b in data["budgets"])
    assert set(data["by_team"]) == {"support", "research"}
    assert sum(data["by_team"].values()) == 120
    assert sum(data["refused_by"].values()) == data["refused"]
    assert data["refused_by"].get("team:demo-5.support", 0) > 0  # the tight team runs out
    listed = ok("budgets", "--json", "--url", url).json()
    assert sorted(b["scope"] for b in listed) == sorted(scopes)
    support = ok(
        "agents", "--label", "team=support", "--label", "fleet=demo-5", "--json", "--url", url
    ).json()
    assert len(support) == data["by_team"]["support"]
    assert {tuple(row["budget_scopes"]) for row in support} == {("org:demo-5", "team:demo-5.support")}
    text = ok("demo", "-n", "60", "-s", "10", "--seed", "5", "--url", url).stdout
    assert "at team:demo-5.support" in text
    assert "Budgets of the org and its teams" in text
    assert "iron-state budgets" in text
    assert "--label team=" in text
    # Running the same seed again started its budgets afresh: removed, then set again.
    with StateManager.from_url(url) as manager:
        removed = [r.details for r in manager.audit_log(event_type="budget_removed")]
    assert sum('"team:demo-5.support"' in details for details in removed) == 1


def test_demo_reset_removes_the_scopes(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "demo.db")
    ok("demo", "-n", "20", "-s", "2", "--json", "--url", url)
    run = ok("demo", "-n", "20", "-s", "2", "--json", "--reset", "--url", url)
    assert "3 budget scopes" in run.stderr
    assert len(ok("budgets", "--json", "--url", url).json()) == 3


def test_copy_takes_the_scopes_and_says_their_spend_stays_behind(store: str, tmp_path: Path) -> None:
    dest = sqlite_url(tmp_path / "copy.db")
    run = ok("copy", store, dest, "--json")
    assert run.json()["budget_scopes"] == 2
    assert "not their spend" in run.stderr
    copied = ok("budgets", "--json", "--url", dest).json()
    assert [(b["scope"], b["limit"], b["period"], b["tz"]) for b in copied] == [
        ("org:acme", 1000.0, "month", "UTC"),
        ("team:support", 100.0, "month", "Europe/Paris"),
    ]
    one_error_line(invoke("copy", store, dest), EXIT_USAGE, "2 budget scopes")


# -- the usage bar ---------------------------------------------------------------------------------------


def test_usage_bar() -> None:
    assert usage_bar(1, 0, None).plain == "no limit"
    assert usage_bar(0, 0, 100).plain == "░" * 20 + "   0%"
    assert usage_bar(50, 25, 100).plain == "█" * 10 + "▒" * 5 + "░" * 5 + "  75%"
    assert usage_bar(0.01, 0, 100).plain.startswith("█░")  # any use shows
    assert usage_bar(99.99, 0, 100).plain.endswith("  99%")  # 100% only at the limit
    assert usage_bar(100, 0, 100).plain == "█" * 20 + " 100%"
    assert usage_bar(150, 10, 100).plain == "█" * 20 + " 160%"
    assert usage_bar(0, 0, 0).plain == "░" * 20 + "   0%"
    assert usage_bar(1, 0, 0).plain == "█" * 20 + " over"
    assert usage_bar(100, 0, 100).style == ""
    assert usage_bar(100, 0, 100).spans[0].style == "red"
    assert usage_bar(80, 0, 100).spans[0].style == "yellow"
    assert usage_bar(10, 0, 100).spans[0].style == "green"


# -- help ------------------------------------------------------------------------------------------------


def test_help_lists_the_budget_commands() -> None:
    wide = {"COLUMNS": "140"}
    root = ok("--help", env=wide).stdout
    assert "Budgets" in root
    assert "budgets" in root
    assert "migrate" in root
    group = ok("budget", env=wide)  # bare: its help
    for sub in ("set", "show", "remove"):
        assert sub in group.stdout
        text = ok("budget", sub, "--help", env=wide).stdout
        assert "--json" in text, sub
        assert "--url" in text, sub
        assert "<bool>" not in text, sub
    assert "--label" in ok("agents", "--help", env=wide).stdout
    one_error_line(invoke("budget", "frobnicate"), EXIT_USAGE, "frobnicate")
