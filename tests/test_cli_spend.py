"""``iron-state spend`` (issue #17): the spend ledger's report as a table, JSON and CSV, its
filters, and bad input as one line with status 2.

Through Typer's runner, on a SQLite file in a temporary folder, with the helpers of test_cli.py.
The fleet's spends happen at fixed times (a manager clock), so days are known.
"""

from __future__ import annotations

import csv
import io
import time
from datetime import date, datetime, timezone
from pathlib import Path

import pytest

pytest.importorskip("typer.testing")

from iron_runtime_state import AgentId, AgentState, AgentStatus, StateManager
from iron_runtime_state.backends import SCHEMES
from iron_runtime_state.cli import EXIT_NOT_FOUND, EXIT_USAGE
from iron_runtime_state.cli.spend import parse_bound, parse_group_by
from iron_runtime_state.errors import ValidationError

from .test_cli import invoke, ok, one_error_line, sqlite_url

pytestmark = pytest.mark.skipif("sqlite" not in SCHEMES, reason="the SQLite backend is not registered")

PRICES = {
    "gpt-4o": {"input": 2.5, "output": 10},
    "mini": {"input": 0.15, "output": 0.6, "cached_input": 0.075},
}
SUPPORT, RESEARCH = AgentId.test_fixture(1), AgentId.test_fixture(2)


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("IRON_STATE_URL", "IRON_STATE_AUDIT_KEY", "IRON_STATE_DEBUG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_COLOR", "1")


@pytest.fixture
def store(tmp_path: Path) -> str:
    """Four settled spends of two agents over three days of November 2026 (UTC):

    ====================  ========  ======  ========  =======================  ==================
    time (UTC)            agent     model   amount    tokens in/out/cached     scopes, tag
    ====================  ========  ======  ========  =======================  ==================
    11-01 10:00           support   gpt-4o  0.0045    1000/200/0               org, team; nightly
    11-01 23:30 (Paris:   research  mini    0.0024    10000/2000/4000          org
    11-02 00:30)
    11-02 09:00           support   -       0.1       -                        org, team
    11-03 12:00           support   gpt-4o  0.01      2000/500/0 (a hold)      org, team
    ====================  ========  ======  ========  =======================  ==================
    """
    url = sqlite_url(tmp_path / "spend.db")
    now = [at("2026-11-01T08:00:00")]
    with StateManager.from_url(url, clock=lambda: now[0], prices=PRICES) as manager:
        manager.set_budget("org:acme", limit=1000, period="month")
        manager.set_budget("team:support", limit=100, period="month")
        for agent, team in ((SUPPORT, "support"), (RESEARCH, "research")):
            scopes = ("org:acme", "team:support") if team == "support" else ("org:acme",)
            manager.save_agent_state(
                AgentState(agent, AgentStatus.RUNNING, labels={"team": team}, budget_scopes=scopes)
            )
        now[0] = at("2026-11-01T10:00:00")
        manager.record_usage(
            SUPPORT, model="gpt-4o", input_tokens=1000, output_tokens=200, tags={"run": "nightly"}
        )
        now[0] = at("2026-11-01T23:30:00")
        manager.record_usage(
            RESEARCH, model="mini", input_tokens=10_000, output_tokens=2000, cached_input_tokens=4000
        )
        now[0] = at("2026-11-02T09:00:00")
        manager.record_spend(SUPPORT, 0.1)
        now[0] = at("2026-11-03T12:00:00")
        with manager.reserve_for_call(
            SUPPORT, model="gpt-4o", input_tokens=2000, max_output_tokens=800
        ) as hold:
            hold.commit_usage(input_tokens=2000, output_tokens=500)
    return url


def table_rows(stdout: str) -> list[list[str]]:
    """The cells of a Rich table's body and footer lines."""
    return [
        [cell.strip() for cell in line.strip("│").split("│")]
        for line in stdout.splitlines()
        if line.startswith("│")
    ]


# -- the three outputs ----------------------------------------------------------------------------


def test_table_by_model_and_day_with_a_total_line(store: str) -> None:
    run = ok("spend", "--by", "model,day", "--url", store)
    header = next(line for line in run.stdout.splitlines() if line.startswith("┃"))
    assert [h.strip() for h in header.strip("┃").split("┃")] == [
        "model",
        "day",
        "amount",
        "calls",
        "input tokens",
        "output tokens",
        "cached tokens",
    ]
    assert table_rows(run.stdout) == [
        ["gpt-4o", "2026-11-01", "0.0045", "1", "1,000", "200", "0"],
        ["gpt-4o", "2026-11-03", "0.0100", "1", "2,000", "500", "0"],  # amounts line up
        ["mini", "2026-11-01", "0.0024", "1", "10,000", "2,000", "4,000"],
        ["-", "2026-11-02", "0.1000", "1", "0", "0", "0"],  # a spend that names no model
        ["total", "", "0.1169", "4", "13,000", "2,700", "4,000"],
    ]
    assert "4 rows, all time, in UTC time, in sqlite:///" in run.stderr


def test_json_is_the_managers_report(store: str) -> None:
    rows = ok("spend", "--by", "model,day", "--json", "--url", store).json()
    with StateManager.from_url(store) as manager:
        assert rows == [row.to_dict() for row in manager.spend_report(group_by=("model", "day"))]
    assert rows[0] == {
        "model": "gpt-4o",
        "day": "2026-11-01",
        "amount": 0.0045,
        "calls": 1,
        "input_tokens": 1000,
        "output_tokens": 200,
        "cached_input_tokens": 0,
    }
    assert rows[-1]["model"] is None


def test_csv_has_a_header_exact_amounts_and_empty_cells_for_none(store: str) -> None:
    run = ok("spend", "--by", "day,model", "--csv", "--url", store)
    assert run.stderr == ""
    lines = list(csv.reader(io.StringIO(run.stdout)))
    assert lines == [
        ["day", "model", "amount", "calls", "input_tokens", "output_tokens", "cached_input_tokens"],
        ["2026-11-01", "gpt-4o", "0.004500", "1", "1000", "200", "0"],
        ["2026-11-01", "mini", "0.002400", "1", "10000", "2000", "4000"],
        ["2026-11-02", "", "0.100000", "1", "0", "0", "0"],
        ["2026-11-03", "gpt-4o", "0.010000", "1", "2000", "500", "0"],
    ]


def test_an_empty_report(store: str) -> None:
    run = ok("spend", "--since", "2030-01-01", "--url", store)
    assert run.stdout == ""
    assert "no spend in the ledger" in run.stderr
    assert ok("spend", "--since", "2030-01-01", "--json", "--url", store).json() == []
    assert ok("spend", "--since", "2030-01-01", "--csv", "--url", store).stdout == (
        "day,amount,calls,input_tokens,output_tokens,cached_input_tokens\n"
    )


def test_no_groups_is_one_total(store: str) -> None:
    assert ok("spend", "--by", "", "--json", "--url", store).json() == [
        {
            "amount": 0.1169,
            "calls": 4,
            "input_tokens": 13_000,
            "output_tokens": 2700,
            "cached_input_tokens": 4000,
        }
    ]
    assert table_rows(ok("spend", "--by", "", "--url", store).stdout)[-1][:3] == ["total", "0.1169", "4"]


# -- groups and filters ---------------------------------------------------------------------------


def amounts(store: str, *args: str) -> dict[tuple[str | None, ...], tuple[float, int]]:
    """``spend --json ARGS`` as group values -> (amount, calls)."""
    rows = ok("spend", "--json", "--url", store, *args).json()
    totals = {"amount", "calls", "input_tokens", "output_tokens", "cached_input_tokens"}
    return {
        tuple(value for key, value in row.items() if key not in totals): (row["amount"], row["calls"])
        for row in rows
    }


def test_by_scope_counts_a_spend_under_each_scope_and_once_in_the_total(store: str) -> None:
    assert amounts(store, "--by", "scope") == {
        ("org:acme",): (0.1169, 4),
        ("team:support",): (0.1145, 3),
    }
    rows = table_rows(ok("spend", "--by", "scope", "--url", store).stdout)
    assert rows[-1][:3] == ["total", "0.1169", "4"]  # not 0.2314 and 7
    assert amounts(store, "--by", "scope", "--scope", "team:support") == {("team:support",): (0.1145, 3)}


def test_filters(store: str) -> None:
    assert amounts(store, "--by", "", "--since", "2026-11-02") == {(): (0.11, 2)}
    assert amounts(store, "--by", "", "--until", "2026-11-03") == {(): (0.1069, 3)}  # not included
    assert amounts(store, "--by", "", "--since", "2026-11-01T23:00:00Z", "--until", "1793664000") == {
        (): (0.1024, 2)  # 1793664000 is 2026-11-03T00:00:00Z
    }
    assert amounts(store, "--by", "model", "--agent", SUPPORT.as_str()) == {
        ("gpt-4o",): (0.0145, 2),
        (None,): (0.1, 1),
    }
    assert amounts(store, "--by", "agent", "--model", "mini") == {(RESEARCH.as_str(),): (0.0024, 1)}
    assert amounts(store, "--by", "label:team") == {("research",): (0.0024, 1), ("support",): (0.1145, 3)}
    assert amounts(store, "--by", "", "--label", "team=research") == {(): (0.0024, 1)}
    assert amounts(store, "--by", "tag:run", "--tag", "run=nightly") == {("nightly",): (0.0045, 1)}
    assert amounts(store, "--by", "", "--label", "team=support", "--tag", "run=other") == {}


def test_days_and_dates_follow_tz(store: str) -> None:
    # 23:30 UTC on the 1st is 00:30 on the 2nd in Paris (UTC+1 in November).
    assert amounts(store, "--by", "day", "--tz", "Europe/Paris") == {
        ("2026-11-01",): (0.0045, 1),
        ("2026-11-02",): (0.1024, 2),
        ("2026-11-03",): (0.01, 1),
    }
    # A date is midnight in --tz: Paris's 2 November starts at 23:00 UTC on the 1st.
    assert amounts(store, "--by", "", "--since", "2026-11-02", "--tz", "Europe/Paris") == {(): (0.1124, 3)}
    assert amounts(store, "--by", "month") == {("2026-11",): (0.1169, 4)}
    # Weeks start on Monday: 1 November 2026 is a Sunday.
    assert amounts(store, "--by", "week") == {("2026-10-26",): (0.0069, 2), ("2026-11-02",): (0.11, 2)}
    run = ok("spend", "--by", "hour", "--since", "2026-11-03", "--url", store)
    assert table_rows(run.stdout)[0][0] == "2026-11-03T12:00+0000"


# -- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (("--by", "colour"), ("--by: cannot group a spend report by 'colour'", "label:<key>")),
        (("--by", "day,month"), ("--by:", "one time key")),
        (("--by", "model,model"), ("--by:", "twice")),
        (("--since", "yesterday"), ("--since: cannot read 'yesterday' as a date or time", "2026-11-01")),
        (("--until", "2026-02-30"), ("--until: cannot read '2026-02-30'",)),
        (("--since", "2026-11-03", "--until", "2026-11-01"), ("must come after",)),
        (("--label", "team"), ("--label 'team': use KEY=VALUE", "--label team=support")),
        (("--label", "Team=x"), ("label key 'Team' is invalid",)),
        (("--tag", "=x"), ("--tag '=x': use KEY=VALUE",)),
        (("--label", "team=a", "--label", "team=b"), ("--label team is given twice",)),
        (("--tz", "Mars/Olympus"), ("unknown time zone 'Mars/Olympus'",)),
        (("--agent", "bob"), ("agent id 'bob'",)),
        (("--scope", "Team:X"), ("budget scope 'Team:X' is invalid",)),
        (("--json", "--csv"), ("pass --json or --csv, not both",)),
    ],
)
def test_bad_input_is_one_line_and_status_2(
    store: str, args: tuple[str, ...], fragments: tuple[str, ...]
) -> None:
    one_error_line(invoke("spend", "--url", store, *args), EXIT_USAGE, *fragments)


def test_a_missing_store_is_not_found(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "typo.db")
    one_error_line(invoke("spend", "--url", url), EXIT_NOT_FOUND, "no such file")
    assert not (tmp_path / "typo.db").exists()


def test_the_url_comes_from_the_environment(store: str) -> None:
    assert ok("spend", "--by", "", "--json", env={"IRON_STATE_URL": store}).json()[0]["calls"] == 4


def test_parsers() -> None:
    assert parse_group_by(" model , day ") == ("model", "day")
    assert parse_group_by("") == ()
    assert parse_bound("2026-11-01", "--since") == date(2026, 11, 1)
    assert parse_bound("2026-11-01T08:00Z", "--since") == datetime(2026, 11, 1, 8, tzinfo=timezone.utc)
    assert parse_bound("1793664000", "--since") == 1793664000
    ago = parse_bound("1h", "--since")  # a duration ago, as Unix seconds
    assert isinstance(ago, int)
    assert abs(ago - (time.time() - 3600)) < 60
    with pytest.raises(ValidationError, match="--until"):
        parse_bound("soon", "--until")


def test_help(store: str) -> None:
    text = ok("spend", "--help", env={"COLUMNS": "140"}).stdout
    for option in ("--by", "--since", "--until", "--tz", "--agent", "--scope", "--model", "--label", "--tag"):
        assert option in text, option
    assert "--csv" in text
    assert "<bool>" not in text
