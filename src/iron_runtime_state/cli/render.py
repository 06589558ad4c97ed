"""How the commands show things: numbers and times, the agent and audit tables, streamed JSON."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, Final

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..models import AgentState, AgentStatus, AuditRecord, AuditVerification
from ..money import exact

__all__ = [
    "BAR_WIDTH",
    "agents_table",
    "audit_table",
    "clip",
    "emit_stream",
    "finite",
    "fmt_exact",
    "fmt_labels",
    "fmt_money",
    "fmt_period",
    "fmt_thresholds",
    "fmt_time",
    "fmt_used",
    "plural",
    "print_verification",
    "record_json",
    "status_text",
    "usage_bar",
]

#: The widest details column of an audit table.
DETAILS_WIDTH: Final = 100
#: Cells in a usage bar (``budgets``, ``budget show``).
BAR_WIDTH: Final = 20


def fmt_time(timestamp: int) -> str:
    """Unix seconds as ISO 8601 UTC, e.g. ``2024-05-01T12:00:00Z``."""
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def fmt_money(value: float | None) -> str:
    """An amount with two decimals, ``-`` for none."""
    return "-" if value is None else f"{value:,.2f}"


def fmt_exact(value: float | None) -> str:
    """An amount to the micro-unit the store keeps, at least two decimals: ``18.5326``, ``100.00``."""
    if value is None:
        return "-"
    text = f"{exact(value):,.6f}".rstrip("0")
    whole, _, decimals = text.partition(".")
    return f"{whole}.{decimals.ljust(2, '0')}"


def fmt_period(period: str | None, tz: str) -> str:
    """A budget's period and its time zone: ``month (Europe/Paris)``, ``-`` without a period."""
    return "-" if period is None else f"{period} ({tz})"


def fmt_thresholds(thresholds: Sequence[float]) -> str:
    """Budget thresholds as percentages: ``50%, 80%, 100%`` (``none`` for none)."""
    return ", ".join(f"{100 * t:g}%" for t in thresholds) or "none"


def fmt_labels(labels: Mapping[str, str]) -> str:
    """Labels as ``key=value`` pairs, sorted by key: ``env=prod team=support``."""
    return " ".join(f"{key}={value}" for key, value in sorted(labels.items()))


def fmt_used(spent: float, limit: float | None) -> str:
    """Spend as a percentage of the limit."""
    if limit is None:
        return "-"
    if limit == 0:
        return "100%" if spent == 0 else "over"
    return f"{100 * spent / limit:.0f}%"


def plural(count: int, noun: str) -> str:
    """``1 agent``, ``2 agents``, ``1,000 agents``."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def clip(text: str, width: int = DETAILS_WIDTH) -> str:
    """``text`` cut to ``width`` characters, an ellipsis marking the cut."""
    return text if len(text) <= width else text[: width - 1] + "…"


def finite(value: float) -> float | None:
    """``value``, or ``None`` for an infinity (which JSON cannot hold)."""
    return value if math.isfinite(value) else None


def usage_bar(spent: float, held: float, limit: float | None, width: int = BAR_WIDTH) -> Text:
    """A budget's use of its limit as a bar and a percentage: ``█`` spent, ``▒`` held by open
    reservations, ``░`` still available; green, then yellow from 75 %, red at or past the limit.

    The three marks differ in shape as well as colour, so the bar reads without colour too. Any
    spend, and any hold, shows at least one cell.
    """
    if limit is None:
        return Text("no limit", style="dim")
    used = spent + held
    share = used / limit if limit else (0.0 if used == 0 else math.inf)
    spent_cells = min(width, _cells(spent, limit, width))
    held_cells = min(width - spent_cells, max(held > 0, _cells(used, limit, width) - spent_cells))
    style = "red" if share >= 1.0 else "yellow" if share >= 0.75 else "green"
    if math.isinf(share):
        percent = "over"
    else:
        # Rounded down below the limit, so that 100 % means the limit is reached.
        percent = f"{round(100 * share) if share >= 1.0 else math.floor(100 * share + 1e-9)}%"
    return Text.assemble(
        ("█" * spent_cells, style),
        ("▒" * held_cells, style),
        ("░" * (width - spent_cells - held_cells), "dim"),
        f" {percent:>4}",
    )


def _cells(amount: float, limit: float, width: int) -> int:
    # Rounded down, except that any use at all shows at least one cell.
    if amount <= 0:
        return 0
    if limit <= 0:
        return width
    return max(1, math.floor(width * amount / limit))


def status_text(status: AgentStatus) -> Text:
    """An agent status in its colour."""
    style = {"running": "green", "stopped": "yellow", "failed": "red"}[status.value]
    return Text(status.value, style=style)


def audit_table(records: Sequence[AuditRecord], width: int) -> Table:
    """Audit records, one line each, fitted to ``width`` columns.

    Only the details are shortened (with an ellipsis); in a narrow terminal the time column goes
    first, so that the ids, which users copy into other commands, stay whole.
    """
    seq_w = max((len(str(r.seq)) for r in records), default=3)
    event_w = max((len(r.event_type) for r in records), default=5)

    def room(time_w: int) -> int:
        # Rich's default box: each column adds 2 of padding and 1 border, plus the last border.
        columns = 5 if time_w else 4
        return width - (max(seq_w, 3) + time_w + 42 + max(event_w, 5)) - 3 * columns - 1

    # The full UTC time, then a shorter one, then none: the ids, which users copy, stay whole.
    time_w, time_fmt = next(
        ((w, f) for w, f in ((20, "%Y-%m-%dT%H:%M:%SZ"), (14, "%m-%d %H:%M:%S")) if room(w) >= 24), (0, "")
    )
    details_w = max(12, min(DETAILS_WIDTH, room(time_w)))
    table = Table()
    table.add_column("seq", no_wrap=True, justify="right")
    if time_w:
        table.add_column("time (UTC)", no_wrap=True, min_width=time_w)
    table.add_column("agent", no_wrap=True, min_width=42)
    table.add_column("event", no_wrap=True)
    table.add_column("details", no_wrap=True, overflow="ellipsis", max_width=details_w)
    for r in records:
        cells: list[str | Text] = [str(r.seq)]
        if time_w:
            cells.append(datetime.fromtimestamp(r.timestamp, tz=timezone.utc).strftime(time_fmt))
        cells += [
            Text(r.agent_id.as_str()),
            Text(r.event_type, style="cyan"),
            Text(clip(r.details, details_w)),
        ]
        table.add_row(*cells)
    return table


def agents_table(states: Iterable[AgentState], width: int | None = None) -> Table:
    """Agents, one line each: status, spend against the limit (and its period), PII detections;
    then their labels and their budget scopes, when some agent has them and they fit in
    ``width`` columns (labels first; ``None``: always). Both wrap at spaces, one per line."""
    rows = list(states)
    cells: list[list[str | Text]] = []
    for s in rows:
        limit = fmt_money(s.budget_limit)
        if s.budget_period is not None and s.budget_limit is not None:
            limit += f"/{s.budget_period}"
        cells.append(
            [
                Text(s.agent_id.as_str()),
                status_text(s.status),
                fmt_money(s.budget_spent),
                limit,
                fmt_used(s.budget_spent, s.budget_limit),
                str(s.pii_detections),
            ]
        )
    headers = ["agent", "status", "spent", "limit", "used", "PII"]
    # Rich's default box: each column adds 2 of padding and 1 border, plus the last border.
    used = 1 + sum(3 + max([len(h), *(len(str(c[i])) for c in cells)]) for i, h in enumerate(headers))
    extra: list[tuple[str, list[str]]] = []
    for header, values in (
        ("labels", [fmt_labels(s.labels) for s in rows]),
        ("scopes", [" ".join(s.budget_scopes) for s in rows]),
    ):
        if not any(values):
            continue
        need = 3 + max([len(header), *(len(word) for value in values for word in value.split())])
        if width is not None and used + need > width:
            break
        used += need
        extra.append((header, values))
    table = Table()
    for header in headers:
        table.add_column(
            header, justify="left" if header in ("agent", "status") else "right", no_wrap=header == "agent"
        )
    for header, _ in extra:
        table.add_column(header)
    for i, row in enumerate(cells):
        table.add_row(*row, *(Text(values[i].replace(" ", "\n")) for _, values in extra))
    return table


def print_verification(out: Console, url: str, report: AuditVerification) -> None:
    """One line: the audit chain of ``url`` verified, or where it breaks."""
    span = ""
    if report.checked:
        span = f", seq {report.anchor_seq + 1 if report.anchor_seq else 1}..{report.last_seq}"
    if report.ok:
        pruned = f" (pruned before seq {report.anchor_seq + 1})" if report.anchor_seq else ""
        out.print(
            Text.assemble(
                ("ok", "bold green"), f": {report.checked:,} audit records verified{span}{pruned} in {url}"
            )
        )
    else:
        out.print(
            Text.assemble(
                ("BROKEN", "bold red"),
                f": the chain breaks at seq {report.first_bad_seq}: {report.reason} "
                f"({report.checked:,} records before it verified) in {url}",
            )
        )


def record_json(record: AuditRecord) -> dict[str, Any]:
    """An audit record for ``--json`` output: its details as JSON where they hold a JSON object
    or array (as the library's own events do), else as the text they are.

    Only exact JSON is turned into a value: a duplicate key or NaN would not read back as the
    same text, so such details stay text. (Exports keep the text always: the hashes cover it.)
    """
    data = record.to_dict()
    details = record.details
    if details.startswith(("{", "[")):
        try:
            value = json.loads(details, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
        except ValueError:
            return data
        data["details"] = value
    return data


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        raise ValueError("a duplicate key")
    return found


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def emit_stream(items: Iterable[Any]) -> None:
    """A JSON array on stdout, written item by item (flat memory for any count)."""
    write = sys.stdout.write
    first = True
    write("[")
    for item in items:
        write("\n  " if first else ",\n  ")
        write(json.dumps(item, allow_nan=False))
        first = False
    write("\n]\n" if not first else "]\n")
