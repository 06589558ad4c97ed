"""Budget scopes above agents: ``budgets`` (all of them) and ``budget set|show|remove``."""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Final

import typer
from rich.table import Table
from rich.text import Text

from ..config import CLI_DEFAULT_URL
from ..errors import StateTypeError, ValidationError
from ..models import BudgetState
from ..money import to_decimal
from ..periods import bounds, zone
from ..thresholds import check_thresholds
from .exit_codes import EXIT_NOT_FOUND, CommandError
from .options import DebugOption, JsonOption, UrlOption, YesOption
from .render import fmt_exact, fmt_money, fmt_period, fmt_thresholds, usage_bar
from .session import Session, confirm, url_flag

__all__ = [
    "BUDGET_HELP",
    "PeriodChoice",
    "budget_json",
    "budget_remove",
    "budget_set",
    "budget_show",
    "budgets",
    "budgets_table",
    "parse_limit",
    "parse_thresholds",
]

#: The help of ``iron-state budget``, the group of the commands on one scope.
BUDGET_HELP: Final = "Set, show or remove one budget scope (a team's or an org's budget above its agents)."

#: Cells of the usage bar in the ``budgets`` table (``budget show`` draws the full width).
TABLE_BAR_WIDTH: Final = 10

ScopeArgument = Annotated[
    str, typer.Argument(metavar="SCOPE", help="The budget scope, e.g. team:support or org:acme.")
]


class PeriodChoice(str, enum.Enum):
    """A budget period as typed on the command line (``none``: the spend never resets)."""

    day = "day"
    week = "week"
    month = "month"
    none = "none"


def parse_limit(text: str) -> Decimal | None:
    """``--limit``: an amount (kept exactly, to the micro-unit), or ``none`` for no limit."""
    if text.strip().lower() == "none":
        return None
    try:
        return to_decimal(text.strip(), "--limit")
    except ValidationError:
        raise ValidationError(
            f"--limit: cannot read {text[:32]!r} as an amount; use a number such as 100 or 12.50 "
            "(amounts are kept to the micro-unit, 0.000001), or none to track spend without a limit"
        ) from None


def parse_thresholds(text: str) -> tuple[float, ...]:
    """``--thresholds``: shares of the limit, comma-separated, as fractions or percentages
    (``0.5,0.8,1`` or ``50%,80%,100%``), or ``none`` for no alerts."""
    if text.strip().lower() == "none":
        return ()
    values: list[float] = []
    for part in (p.strip() for p in text.split(",")):
        try:
            values.append(float(part[:-1]) / 100 if part.endswith("%") else float(part))
        except ValueError:
            raise ValidationError(
                f"--thresholds: cannot read {part[:32]!r} as a share of the limit; write fractions or "
                "percentages separated by commas (0.5,0.8,1 or 50%,80%,100%), or none for no alerts"
            ) from None
    try:
        return check_thresholds(values, "--thresholds")
    except (StateTypeError, ValidationError) as exc:
        raise ValidationError(str(exc)) from None


def budget_json(budget: BudgetState) -> dict[str, Any]:
    """A scope for ``--json``: :meth:`BudgetState.to_dict`, its share of the limit used (spent
    and held, ``null`` without a limit) and when its period ends (ISO 8601, ``null`` without one)."""
    end = _period_end(budget)
    return {
        **budget.to_dict(),
        "used": None if budget.limit is None else round(budget.used, 6),
        "period_end": None if end is None else end.isoformat(),
    }


def _period_end(budget: BudgetState) -> datetime | None:
    if budget.period is None or budget.period_start is None:
        return None
    end = bounds(budget.period_start.timestamp(), budget.period, budget.tz)[1]
    return datetime.fromtimestamp(end, zone(budget.tz))


def _fmt_start(moment: datetime | None, tz: str) -> str:
    """A period's start in its budget's own time zone: ``2025-06-01`` (periods start at midnight)."""
    if moment is None:
        return "-"
    local = moment.astimezone(zone(tz))
    midnight = (local.hour, local.minute, local.second) == (0, 0, 0)
    return local.strftime("%Y-%m-%d") if midnight else local.isoformat()


def _not_found(scope: str, session: Session, url: str) -> CommandError:
    flag = url_flag(session.url)
    return CommandError(
        f"budget scope {scope!r} is not in {url}; list the scopes with `iron-state budgets{flag}`, "
        f"or create it with `iron-state budget set {scope} --limit AMOUNT{flag}`",
        EXIT_NOT_FOUND,
    )


def budgets_table(scopes: Sequence[BudgetState]) -> Table:
    """Budget scopes, one line each: limit, period (since when), spent, held, available and a
    usage bar; narrow enough for a 120-column terminal."""
    table = Table()
    table.add_column("scope", no_wrap=True)
    table.add_column("limit", justify="right")
    table.add_column("period", no_wrap=True)
    for name in ("spent", "held", "available"):
        table.add_column(name, justify="right")
    table.add_column("used", no_wrap=True)
    for b in scopes:
        table.add_row(
            Text(b.scope),
            fmt_money(b.limit),
            _period_cell(b),
            fmt_money(b.spent),
            fmt_money(b.held),
            "-" if math.isinf(b.available) else fmt_money(b.available),
            usage_bar(b.spent, b.held, b.limit, TABLE_BAR_WIDTH),
        )
    return table


def _period_cell(budget: BudgetState) -> str:
    """``month from 2025-06-01``, with the zone when it is not UTC; ``-`` without a period."""
    if budget.period is None:
        return "-"
    zone_name = "" if budget.tz == "UTC" else f" {budget.tz}"
    return f"{budget.period} from {_fmt_start(budget.period_start, budget.tz)}{zone_name}"


def budgets(
    url: UrlOption = CLI_DEFAULT_URL, json_output: JsonOption = False, debug: DebugOption = False
) -> None:
    """List the budget scopes: limit, period, spent and held in the current period, what is
    still available, and how much of the limit is used, as a bar."""
    session = Session(url, json_output)
    with session.open() as manager:
        scopes = manager.list_budgets()
        if session.json:
            session.emit([budget_json(b) for b in scopes])
            return
        if not scopes:
            session.note(
                f"no budget scopes in {manager.url}; create one with "
                f"`iron-state budget set team:support --limit 100 --period month{url_flag(session.url)}`"
            )
            return
        session.out.print(budgets_table(scopes))
        s = "" if len(scopes) == 1 else "s"
        session.note(f"{len(scopes):,} budget scope{s} in {manager.url}")


def budget_set(
    scope: ScopeArgument,
    limit: Annotated[
        str,
        typer.Option(
            "--limit",
            metavar="AMOUNT",
            help="The limit per period, e.g. 100 or 12.50; none to track spend without a limit.",
        ),
    ],
    period: Annotated[
        PeriodChoice | None,
        typer.Option(
            "--period",
            metavar="[day|week|month|none]",
            help="When the spend starts from zero again (calendar-aligned); none: never. "
            "Default: the scope's current period (none for a new scope).",
        ),
    ] = None,
    tz: Annotated[
        str | None,
        typer.Option(
            "--tz",
            metavar="ZONE",
            help="The IANA time zone the periods follow, e.g. Europe/Paris. "
            "Default: the scope's current zone (UTC for a new scope).",
        ),
    ] = None,
    thresholds: Annotated[
        str | None,
        typer.Option(
            "--thresholds",
            metavar="SHARES",
            help="The shares of the limit whose first crossing in a period writes a budget_threshold "
            "event: 0.5,0.8,1 or 50%,80%,100%; none for no alerts. "
            "Default: the scope's current thresholds (50%, 80%, 100% for a new scope).",
        ),
    ] = None,
    url: UrlOption = CLI_DEFAULT_URL,
    json_output: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Create a budget scope, or change its limit, period, time zone or alert thresholds.

    Agents draw on it by listing it in their budget_scopes; each spend and hold is then charged
    to the agent and to every scope it lists, all or nothing. Changing an existing scope keeps
    what it has spent; a new period or zone starts the current period afresh.
    """
    session = Session(url, json_output)
    amount = parse_limit(limit)
    shares = None if thresholds is None else parse_thresholds(thresholds)
    with session.open() as manager:
        before = manager.get_budget(scope)
        if period is None:
            new_period = None if before is None else before.period
        else:
            new_period = None if period is PeriodChoice.none else period.value
        new_tz = tz if tz is not None else ("UTC" if before is None else before.tz)
        if shares is None and before is not None:
            shares = before.thresholds
        after = manager.set_budget(scope, limit=amount, period=new_period, tz=new_tz, thresholds=shares)
        if session.json:
            session.emit({**budget_json(after), "created": before is None})
            return
        if before is None:
            session.say(f"created budget scope {after.scope} in {manager.url}")
        else:
            was = f"limit {_limit_text(before)}, period {_period_text(before)}"
            session.say(f"changed budget scope {after.scope} in {manager.url} (was: {was})")
        _print_budget(session, after)


def budget_show(
    scope: ScopeArgument,
    url: UrlOption = CLI_DEFAULT_URL,
    json_output: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """One budget scope: limit, period and when it ends, spent, held and still available."""
    session = Session(url, json_output)
    with session.open() as manager:
        found = manager.get_budget(scope)
        if found is None:
            raise _not_found(scope, session, manager.url)
        if session.json:
            session.emit(budget_json(found))
            return
        session.out.print(Text.assemble((f"{'scope':<12}", "bold"), found.scope))
        _print_budget(session, found)


def _limit_text(budget: BudgetState) -> str:
    return "none (spend is tracked)" if budget.limit is None else fmt_exact(budget.limit)


def _period_text(budget: BudgetState) -> str:
    return "none (the spend never resets)" if budget.period is None else fmt_period(budget.period, budget.tz)


def _alerts_text(budget: BudgetState) -> str:
    """Where the scope's ``budget_threshold`` events fire: ``at 50%, 80%, 100% of the limit``."""
    if not budget.thresholds:
        return "none"
    shown = f"at {fmt_thresholds(budget.thresholds)} of the limit"
    return shown if budget.limit else f"{shown} (none without a limit)"


def _print_budget(session: Session, budget: BudgetState) -> None:
    end = _period_end(budget)
    period = fmt_period(budget.period, budget.tz)
    if budget.period_start is not None:
        period += f", from {_fmt_start(budget.period_start, budget.tz)}"
    if end is not None:
        period += f" to {_fmt_start(end, budget.tz)}"
    rows: list[tuple[str, str | Text]] = [
        ("limit", _limit_text(budget)),
        ("period", _period_text(budget) if budget.period is None else period),
        ("spent", fmt_exact(budget.spent)),
        ("held", fmt_exact(budget.held)),
        ("available", "unlimited" if math.isinf(budget.available) else fmt_exact(budget.available)),
        ("used", usage_bar(budget.spent, budget.held, budget.limit)),
        ("alerts", _alerts_text(budget)),
    ]
    for label, value in rows:
        session.out.print(Text.assemble((f"{label:<12}", "bold"), value))


def budget_remove(
    scope: ScopeArgument,
    yes: YesOption = False,
    url: UrlOption = CLI_DEFAULT_URL,
    json_output: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Remove a budget scope and its spend (a budget_removed audit event records it).

    Agents that still list it in their budget_scopes are refused every spend and hold
    (BudgetNotFound) until it is set again or taken off their list.
    """
    session = Session(url, json_output)
    with session.open() as manager:
        found = manager.get_budget(scope)
        if found is None:
            raise _not_found(scope, session, manager.url)
        confirm(
            yes,
            f"Remove budget scope {scope} ({fmt_exact(found.spent)} spent this period) from {manager.url}?",
        )
        if not manager.remove_budget(scope):  # removed by someone else meanwhile
            raise _not_found(scope, session, manager.url)
        if session.json:
            session.emit({"url": manager.url, "scope": scope, "removed": True, "spent": found.spent})
            return
        session.say(
            f"removed budget scope {scope} from {manager.url} ({fmt_exact(found.spent)} spent this period)"
        )
        session.note(
            "agents that list it in their budget_scopes are now refused every spend and hold: "
            "take it off their list, or set it again"
        )
