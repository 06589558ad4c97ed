"""``spend``: the spend ledger's totals, grouped by time, agent, scope, model, label or tag.

A table by default, a JSON array of :meth:`SpendRow.to_dict` with ``--json``, CSV with a
header with ``--csv``. The report is :meth:`StateManager.spend_report`, answered by the store
from its ledger (an index on the SQL stores): the command adds the reading of the options and
the total line.
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Sequence
from datetime import date, datetime
from decimal import Decimal
from typing import Annotated, Any, Final

import typer
from rich.table import Table
from rich.text import Text

from ..config import CLI_DEFAULT_URL
from ..errors import StateTypeError, ValidationError
from ..ids import AgentId
from ..ledger import TIME_KEYS, SpendRow, group_keys
from .exit_codes import CommandError
from .options import DebugOption, UrlOption, parse_pairs, parse_time, relative_time
from .render import fmt_time, plural
from .session import Session

__all__ = ["SPEND_COLUMNS", "parse_bound", "parse_group_by", "spend", "spend_csv", "spend_table"]

#: The totals of each row, after its group's columns (``--csv``'s header, the table's columns).
SPEND_COLUMNS: Final = ("amount", "calls", "input_tokens", "output_tokens", "cached_input_tokens")
#: How a group value that is missing (a spend without a model, an agent without the label) shows.
NONE_CELL: Final = "-"
#: The forms ``--since`` and ``--until`` read.
BOUND_HELP: Final = (
    "a date (2026-11-01: midnight in --tz), an ISO 8601 time (2026-11-01T08:00, in --tz unless it "
    "has an offset), Unix seconds, or a duration ago (90m, 12h, 7d, 1w)"
)


def parse_group_by(text: str) -> tuple[str, ...]:
    """``--by``: comma-separated report keys (``model,day``), checked as the report checks them."""
    keys = tuple(part.strip() for part in text.split(",") if part.strip())
    try:
        return group_keys(keys)[0]
    except (StateTypeError, ValidationError) as exc:
        raise ValidationError(f"--by: {exc}") from None


def parse_bound(text: str, what: str) -> date | datetime | int:
    """``--since`` or ``--until``: a date or a naive time (read in the report's ``--tz`` by the
    report), an aware time, Unix seconds or a duration ago (both as Unix seconds)."""
    value = text.strip()
    if relative_time(value):
        return parse_time(value, what)
    # Python 3.10 reads neither ``Z`` nor a date without a time through datetime.fromisoformat.
    iso = value[:-1] + "+00:00" if value.endswith(("Z", "z")) else value
    try:
        return date.fromisoformat(iso) if len(iso) == 10 else datetime.fromisoformat(iso)
    except ValueError:
        raise ValidationError(
            f"{what}: cannot read {value[:32]!r} as a date or time; use {BOUND_HELP}"
        ) from None


def _cell(value: str | None) -> Text:
    return Text(NONE_CELL, style="dim") if value is None else Text(value)


def spend_table(rows: Sequence[SpendRow], keys: Sequence[str], total: SpendRow | None) -> Table:
    """Report rows, one line each: the group's columns, amount, calls and token counts; then a
    total line (``total``: ``None`` leaves it out)."""
    table = Table(show_footer=total is not None)
    places = _places([*rows, *([total] if total is not None else [])])
    totals = _total_cells(total, places)
    for i, key in enumerate(keys):
        footer = "total" if i == 0 else ""
        table.add_column(key, footer=footer, no_wrap=key in TIME_KEYS or key == "agent")
    if not keys:  # a report without groups: one row, the total
        table.add_column("", footer="total")
    headers = ("amount", "calls", "input tokens", "output tokens", "cached tokens")
    for header, footer in zip(headers, totals, strict=True):
        table.add_column(header, footer=footer, justify="right")
    for row in rows:
        group = [_cell(row.group[k]) for k in keys] if keys else [Text("")]
        table.add_row(*group, *_total_cells(row, places))
    return table


def _places(rows: Sequence[SpendRow]) -> int:
    """Decimals that show every amount exactly (2 to 6), so that the amounts line up."""
    needed = (-row.amount_exact.normalize().as_tuple().exponent for row in rows)  # type: ignore[operator]
    return max(2, *needed) if rows else 2


def _total_cells(row: SpendRow | None, places: int) -> list[str]:
    if row is None:
        return [""] * len(SPEND_COLUMNS)
    return [
        f"{row.amount_exact:,.{places}f}",
        f"{row.calls:,}",
        f"{row.input_tokens:,}",
        f"{row.output_tokens:,}",
        f"{row.cached_input_tokens:,}",
    ]


def spend_csv(rows: Sequence[SpendRow], keys: Sequence[str]) -> None:
    """The rows as CSV on stdout: a header (the group's keys, then :data:`SPEND_COLUMNS`), one
    line per row; amounts exact to the micro-unit (``0.300000``), a missing value empty."""
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow([*keys, *SPEND_COLUMNS])
    for row in rows:
        writer.writerow(
            [
                *("" if row.group[k] is None else row.group[k] for k in keys),
                f"{row.amount_exact:f}",
                row.calls,
                row.input_tokens,
                row.output_tokens,
                row.cached_input_tokens,
            ]
        )


def _sum(rows: Sequence[SpendRow]) -> SpendRow:
    """The rows added up (exactly: amounts as micro-unit Decimals)."""
    amount = sum((row.amount_exact for row in rows), Decimal(0))
    return SpendRow(
        group={},
        amount=float(amount),
        calls=sum(row.calls for row in rows),
        input_tokens=sum(row.input_tokens for row in rows),
        output_tokens=sum(row.output_tokens for row in rows),
        cached_input_tokens=sum(row.cached_input_tokens for row in rows),
    )


def _span(
    since: date | datetime | int | None, until: date | datetime | int | None, tz: str, keys: Sequence[str]
) -> str:
    """The report's span and its time zone, for the line under the table."""

    def shown(bound: date | datetime | int) -> str:
        return fmt_time(bound) if isinstance(bound, int) else bound.isoformat()

    parts = []
    if since is not None:
        parts.append(f"from {shown(since)}")
    if until is not None:
        parts.append(f"until {shown(until)} (not included)")
    span = " ".join(parts) or "all time"
    # A date, or a time without an offset, is read in --tz (a date has no tzinfo at all).
    naive = any(isinstance(b, date) and getattr(b, "tzinfo", None) is None for b in (since, until))
    if naive or any(key in TIME_KEYS for key in keys):
        span += f", in {tz} time"
    return span


def spend(
    by: Annotated[
        str,
        typer.Option(
            "--by",
            "-b",
            metavar="KEYS",
            help="What to group by, comma-separated: one of hour, day, week, month (in --tz), and any "
            "of agent, scope, model, label:KEY (an agent label), tag:KEY (a spend's tag). "
            "Empty: one total.",
        ),
    ] = "day",
    since: Annotated[
        str | None, typer.Option("--since", metavar="WHEN", help=f"Spend at or after: {BOUND_HELP}.")
    ] = None,
    until: Annotated[
        str | None,
        typer.Option("--until", metavar="WHEN", help="Spend before (not at): the same forms as --since."),
    ] = None,
    tz: Annotated[
        str,
        typer.Option(
            "--tz", metavar="ZONE", help="The IANA time zone of days, weeks and months, e.g. Europe/Paris."
        ),
    ] = "UTC",
    agent: Annotated[
        str | None, typer.Option("--agent", "-a", metavar="ID", help="Only this agent's spend.")
    ] = None,
    scope: Annotated[
        str | None,
        typer.Option(
            "--scope", metavar="SCOPE", help="Only spend charged to this budget scope, e.g. team:support."
        ),
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", metavar="MODEL", help="Only calls to this model, e.g. gpt-4o.")
    ] = None,
    label: Annotated[
        list[str] | None,
        typer.Option(
            "--label",
            metavar="KEY=VALUE",
            help="Only spend of agents that had this label when they spent; repeat to require several.",
        ),
    ] = None,
    tag: Annotated[
        list[str] | None,
        typer.Option(
            "--tag", metavar="KEY=VALUE", help="Only spends with this tag; repeat to require several."
        ),
    ] = None,
    json_output: Annotated[
        bool,
        typer.Option("--json", help="A JSON array of rows on stdout: the group's keys, then the totals."),
    ] = False,
    csv_output: Annotated[
        bool, typer.Option("--csv", help="CSV on stdout, with a header: the group's keys, then the totals.")
    ] = False,
    url: UrlOption = CLI_DEFAULT_URL,
    debug: DebugOption = False,
) -> None:
    """Report spend from the ledger: amount, calls and tokens per group.

    Every settled spend (record_spend, a commit, a metered model call) is a spend record in
    the audit trail; this totals them per day, model, agent, budget scope, agent label or
    spend tag, e.g. iron-state spend --by model,day --since 2026-11-01. Grouped by scope, a
    spend counts under each scope it charged; the total line counts it once.
    """
    if json_output and csv_output:
        raise CommandError("pass --json or --csv, not both")
    session = Session(url, json_output)
    keys = parse_group_by(by)
    filters: dict[str, Any] = {
        "since": None if since is None else parse_bound(since, "--since"),
        "until": None if until is None else parse_bound(until, "--until"),
        "tz": tz,
        "agent_id": None if agent is None else AgentId.parse_flexible(agent),
        "scope": scope,
        "model": model,
        "labels": parse_pairs(label or [], "--label", "team=support") or None,
        "tags": parse_pairs(tag or [], "--tag", "run=nightly") or None,
    }
    with session.open() as manager:
        rows = manager.spend_report(group_by=keys, **filters)
        if json_output:
            session.emit([row.to_dict() for row in rows])
            return
        if csv_output:
            spend_csv(rows, keys)
            return
        span = _span(filters["since"], filters["until"], tz, keys)
        if not rows:
            session.note(
                f"no spend in the ledger of {manager.url} for this report ({span}); spends settled "
                "before version 0.7 have no ledger record"
            )
            return
        # Grouped by scope a spend is in a row per scope it charged: the total asks the store
        # for the sum without groups, which counts it once.
        total = manager.spend_report(group_by=(), **filters)[0] if "scope" in keys else _sum(rows)
        session.out.print(spend_table(rows, keys, total))
        session.note(f"{plural(len(rows), 'row')}, {span}, in {manager.url}")
