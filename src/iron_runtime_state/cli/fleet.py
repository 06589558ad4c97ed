"""The agents: ``agents`` (list them), ``show`` (one of them), ``stats`` (totals) and ``purge``."""

from __future__ import annotations

import enum
import heapq
import itertools
import math
from collections.abc import Callable, Iterator
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ..config import CLI_DEFAULT_URL
from ..errors import AgentNotFound, ValidationError
from ..ids import AgentId
from ..models import AgentState, AgentStatus
from .audit import tail_audit
from .exit_codes import EXIT_NOT_FOUND, CommandError
from .options import (
    DebugOption,
    JsonOption,
    StatusChoice,
    UrlOption,
    YesOption,
    parse_duration,
    parse_pairs,
)
from .render import (
    agents_table,
    audit_table,
    emit_stream,
    finite,
    fmt_labels,
    fmt_money,
    fmt_period,
    fmt_thresholds,
    fmt_time,
    fmt_used,
    plural,
    record_json,
    status_text,
)
from .session import Session, confirm

__all__ = ["SortKey", "agents", "parse_labels", "purge", "show", "stats"]


class SortKey(str, enum.Enum):
    """How ``iron-state agents`` orders its rows."""

    store = "store"
    id = "id"
    spent = "spent"
    pii = "pii"
    used = "used"


def agents(
    status: Annotated[
        StatusChoice | None,
        typer.Option("--status", metavar="[running|stopped|failed]", help="Only agents with this status."),
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option(
            "--limit",
            "-l",
            min=0,
            metavar="N",
            help="Rows to show; 0 for all (default: 50, or all with --json).",
        ),
    ] = None,
    label: Annotated[
        list[str] | None,
        typer.Option(
            "--label",
            metavar="KEY=VALUE",
            help="Only agents with this label, e.g. team=support; repeat to require several.",
        ),
    ] = None,
    sort: Annotated[
        SortKey,
        typer.Option(
            "--sort",
            metavar="[store|id|spent|pii|used]",
            help="Order: store (fastest), id, spent, pii or used (highest first).",
        ),
    ] = SortKey.store,
    url: UrlOption = CLI_DEFAULT_URL,
    json_output: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """List agents with their status, spend against their limit, PII detections, labels and
    budget scopes."""
    session = Session(url, json_output)
    wanted = None if status is None else AgentStatus(status.value)
    labels = parse_labels(label or [])
    if limit is None:
        limit = 0 if json_output else 50
    with session.open() as manager:
        stats = manager.stats()
        rows = _select_agents(manager.iter_agent_states(status=wanted, labels=labels or None), sort, limit)
        if session.json:
            emit_stream(state.to_dict() for state in rows)
            return
        shown = list(rows)
        session.out.print(agents_table(shown, session.out.width))
        what = "agents" if wanted is None else f"{wanted.value} agents"
        if labels:
            # The store's totals do not count by label: say how many are shown, and whether
            # the limit may have cut the list.
            more = " (--limit 0 for all)" if limit and len(shown) == limit else ""
            session.note(f"{len(shown):,} {what} with {fmt_labels(labels)} in {manager.url}{more}")
            return
        matching = stats.total if wanted is None else getattr(stats, wanted.value)
        more = "" if len(shown) >= matching else " (--limit 0 for all)"
        session.note(f"{len(shown):,} of {matching:,} {what} in {manager.url}{more}")


def parse_labels(pairs: list[str]) -> dict[str, str]:
    """``--label KEY=VALUE`` options as a dict (every one must match)."""
    return parse_pairs(pairs, "--label", "team=support")


def _select_agents(states: Iterator[AgentState], sort: SortKey, limit: int) -> Iterator[AgentState]:
    if sort is SortKey.store:
        return states if limit == 0 else itertools.islice(states, limit)
    keys: dict[SortKey, Callable[[AgentState], Any]] = {
        SortKey.id: lambda s: s.agent_id.as_str(),
        SortKey.spent: lambda s: s.budget_spent,
        SortKey.pii: lambda s: s.pii_detections,
        SortKey.used: lambda s: (
            -1.0 if s.budget_limit is None else s.budget_spent / (s.budget_limit or 1e-12)
        ),
    }
    key = keys[sort]
    ascending = sort is SortKey.id
    if limit == 0:
        return iter(sorted(states, key=key, reverse=not ascending))
    pick = heapq.nsmallest if ascending else heapq.nlargest
    return iter(pick(limit, states, key=key))


def show(
    agent_id: Annotated[
        str,
        typer.Argument(
            metavar="AGENT_ID", help="The agent, e.g. agent_550e8400-e29b-41d4-a716-446655440000."
        ),
    ],
    events: Annotated[
        int, typer.Option("--events", "-e", min=0, metavar="N", help="How many of its newest audit events.")
    ] = 10,
    url: UrlOption = CLI_DEFAULT_URL,
    json_output: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """One agent: status, budget (spent, limit, still available) and its latest audit events."""
    session = Session(url, json_output)
    aid = AgentId.parse_flexible(agent_id)
    with session.open() as manager:
        state = manager.get_agent_state(aid)
        if state is None:
            raise CommandError(f"agent {aid} is not in {manager.url}", EXIT_NOT_FOUND)
        try:
            available = manager.budget_available(aid)
        except AgentNotFound:  # removed between the two reads
            raise CommandError(f"agent {aid} is not in {manager.url}", EXIT_NOT_FOUND) from None
        records = tail_audit(manager, events, agent_id=aid)
        if session.json:
            session.emit(
                {
                    **state.to_dict(),
                    "budget_available": finite(round(available, 10)),
                    "events": [record_json(r) for r in records],
                }
            )
            return
        limit = (
            "none"
            if state.budget_limit is None
            else f"{fmt_money(state.budget_limit)} ({fmt_used(state.budget_spent, state.budget_limit)} used)"
        )
        rows: list[tuple[str, str | Text]] = [
            ("agent", Text(aid.as_str())),
            ("status", status_text(state.status)),
            ("spent", fmt_money(state.budget_spent)),
            ("limit", limit),
        ]
        if state.budget_period is not None:
            since = "" if state.period_start is None else f", since {fmt_time(int(state.period_start))}"
            rows.append(("period", f"{fmt_period(state.budget_period, state.budget_tz)}{since}"))
        if state.budget_limit is not None:
            shares = fmt_thresholds(state.budget_thresholds)
            rows.append(("alerts", f"at {shares} of the limit" if state.budget_thresholds else "none"))
        rows += [
            ("available", "unlimited" if math.isinf(available) else fmt_money(available)),
            ("PII", str(state.pii_detections)),
        ]
        if state.labels:
            rows.append(("labels", Text(fmt_labels(state.labels))))
        if state.budget_scopes:
            rows.append(("scopes", Text(" ".join(state.budget_scopes))))
        for label, value in rows:
            session.out.print(Text.assemble((f"{label:<11}", "bold"), value))
        if events:
            session.out.print()
            if records:
                session.out.print(f"[bold]Last {plural(len(records), 'audit event')}[/bold]")
                session.out.print(audit_table(records, session.out.width))
            else:
                session.say("no audit events for this agent")


def stats(
    url: UrlOption = CLI_DEFAULT_URL, json_output: JsonOption = False, debug: DebugOption = False
) -> None:
    """Fleet totals: agents by status, budget spent, PII detections and audit records."""
    session = Session(url, json_output)
    with session.open() as manager:
        totals = manager.stats()
        records = manager.audit_count()
        if session.json:
            session.emit({"url": manager.url, **totals.to_dict(), "audit_records": records})
            return
        session.out.print(f"[bold]{escape(manager.url)}[/bold]")
        table = Table(show_header=False)
        table.add_column("")
        table.add_column("value", justify="right")
        table.add_row("agents", f"{totals.total:,}")
        for status in AgentStatus:
            table.add_row(Text.assemble("  ", status_text(status)), f"{getattr(totals, status.value):,}")
        table.add_row("budget spent", fmt_money(totals.budget_spent))
        table.add_row("PII detections", f"{totals.pii_detections:,}")
        table.add_row("audit records", f"{records:,}")
        session.out.print(table)


def purge(
    older_than: Annotated[
        str,
        typer.Option(
            "--older-than",
            metavar="AGE",
            help="Only agents unchanged for this long: 90s, 30m, 2h, 7d, 1w (0: all).",
        ),
    ],
    status: Annotated[
        list[StatusChoice] | None,
        typer.Option(
            "--status", metavar="[stopped|failed]", help="stopped or failed; repeat for both (default: both)."
        ),
    ] = None,
    yes: YesOption = False,
    url: UrlOption = CLI_DEFAULT_URL,
    json_output: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Remove finished agents (stopped and/or failed) whose state has not changed for a while.

    Their audit records stay (prune those with `prune`).
    """
    session = Session(url, json_output)
    seconds = parse_duration(older_than, "--older-than")
    wanted = [AgentStatus(s.value) for s in status] if status else [AgentStatus.STOPPED, AgentStatus.FAILED]
    if AgentStatus.RUNNING in wanted:
        raise ValidationError(
            "purge removes finished agents only: use --status stopped and/or --status failed"
        )
    names = " and ".join(s.value for s in wanted)
    with session.open() as manager:
        since = f" unchanged for {older_than}" if seconds else ""
        confirm(yes, f"Remove every {names} agent{since} from {manager.url}?")
        removed = manager.purge_agents(older_than=seconds, status=wanted)
        if session.json:
            session.emit({"url": manager.url, "removed": len(removed), "agent_ids": removed})
            return
        session.say(f"removed {len(removed):,} {names} agents{since} from {manager.url}")
