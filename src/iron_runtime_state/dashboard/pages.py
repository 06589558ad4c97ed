"""The dashboard's pages as HTML, from what the routes read (no I/O here).

Every page is whole HTML that works without its script; ``static/dashboard.js`` then keeps it
live (the feed, the totals, the store's status) from the event stream. Every value is escaped
(:mod:`.html`); the few attributes the script reads are ``data-*`` attributes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlencode

from ..events import SYSTEM_AGENT
from ..ids import AgentId
from ..models import AgentState, AgentStatus, AuditRecord, BudgetState
from .charts import spend_chart, usage_bar
from .data import clock
from .html import Html, el, join, raw
from .hub import Snapshot, Verification
from .link import LinkStatus

__all__ = [
    "AgentPage",
    "AgentsTable",
    "agent_page",
    "agent_state_part",
    "agents_page",
    "chart_part",
    "message_page",
    "overview_page",
    "overview_part",
    "spenders_part",
]

#: Characters of an audit record's details shown in a table cell (all of it in the tooltip).
DETAILS_SHOWN = 160


def money(value: float | None) -> str:
    """An amount as shown: up to 6 decimals, no trailing zeros (``-`` for none, ``∞`` unlimited)."""
    if value is None:
        return "-"
    if math.isinf(value):
        return "∞"
    text = f"{value:,.6f}".rstrip("0").rstrip(".")
    return text or "0"


def agent_link(agent_id: AgentId, *, short: bool = False) -> Html:
    """A link to the agent's page (``system`` for the trail's own events)."""
    if agent_id == SYSTEM_AGENT:
        return el("span", {"class": "muted"}, "system")
    text = agent_id.as_str()
    shown = text[:14] + "…" if short else text
    return el("a", {"href": f"/agents/{text}", "class": "mono", "title": text}, shown)


def status_badge(status: AgentStatus) -> Html:
    """The status, coloured."""
    return el("span", {"class": f"badge badge-{status.value}"}, status.value)


def _labels(labels: Mapping[str, str]) -> Html:
    return join(el("span", {"class": "chip"}, f"{k}={v}") for k, v in sorted(labels.items()))


def _grid(table_id: str, headers: Sequence[object], rows: Sequence[Html], *, kind: str = "grid") -> Html:
    """A table: ``headers`` are text (or ``<th>`` already made), ``rows`` are ``<tr>``."""
    head = el("tr", None, [h if isinstance(h, Html) else el("th", None, h) for h in headers])
    return el("table", {"class": kind, "id": table_id}, el("thead", None, head), el("tbody", None, rows))


# -- the frame of every page ---------------------------------------------------------------------


def _store_line(url: str, status: LinkStatus, snapshot: Snapshot | None) -> tuple[Html, Html]:
    state = {True: "up", False: "down", None: "unknown"}[status.up]
    line = el(
        "span",
        {"id": "store-status", "class": f"store store-{state}", "title": status.error or ""},
        el("span", {"class": "mono"}, url),
        " · ",
        el("strong", {"id": "store-state"}, {"up": "up", "down": "DOWN", "unknown": "connecting"}[state]),
    )
    when = f" (figures from {clock(snapshot.taken_at)} UTC)" if snapshot is not None else ""
    banner = el(
        "div",
        {"id": "banner", "class": "banner", "hidden": status.up is not False, "role": "alert"},
        el("strong", None, "The store is down. "),
        el("span", {"id": "banner-text"}, f"{status.error or ''}{when}"),
        " The dashboard keeps trying; this page updates when it answers.",
    )
    return line, banner


def layout(
    title: str,
    body: Html,
    *,
    url: str,
    status: LinkStatus,
    snapshot: Snapshot | None,
    live: Mapping[str, object] | None = None,
    nav: str = "overview",
) -> Html:
    """A whole page: head, header with the store's status, ``body``; ``live`` are the ``data-*``
    attributes that tell the script what to follow (``after``, ``agent``)."""
    line, banner = _store_line(url, status, snapshot)
    links = [
        el("a", {"href": "/", "class": "active" if nav == "overview" else None}, "Overview"),
        el("a", {"href": "/agents", "class": "active" if nav == "agents" else None}, "Agents"),
    ]
    attrs = {f"data-{k}": v for k, v in (live or {}).items()}
    return join(
        raw("<!doctype html>\n"),
        el(
            "html",
            {"lang": "en"},
            el(
                "head",
                None,
                el("meta", {"charset": "utf-8"}),
                el("meta", {"name": "viewport", "content": "width=device-width, initial-scale=1"}),
                el("title", None, f"{title} · iron-state"),
                el("link", {"rel": "stylesheet", "href": "/static/dashboard.css"}),
                el("link", {"rel": "icon", "href": "/static/favicon.svg", "type": "image/svg+xml"}),
                el("script", {"src": "/static/dashboard.js", "defer": True}),
            ),
            el(
                "body",
                attrs,
                el(
                    "header",
                    None,
                    el("a", {"class": "brand", "href": "/"}, "iron-state"),
                    el("nav", None, links),
                    line,
                ),
                banner,
                el("main", None, body),
                el("footer", None, "Read-only view · live from the store's audit trail · times in UTC"),
            ),
        ),
    )


def message_page(title: str, text: str, *, url: str, status: LinkStatus, snapshot: Snapshot | None) -> Html:
    """A page that only says something (not found, bad filter, store down)."""
    return layout(
        title,
        el("section", None, el("h1", None, title), el("p", None, text)),
        url=url,
        status=status,
        snapshot=snapshot,
    )


# -- the overview -------------------------------------------------------------------------------


def _card(label: str, value: str, *, field: str, kind: str = "", note: str | None = None) -> Html:
    return el(
        "div",
        {"class": f"card {kind}".strip()},
        el("div", {"class": "card-label"}, label),
        el("div", {"class": "card-value", "data-field": field}, value),
        el("div", {"class": "card-note"}, note) if note else None,
    )


def _verification(verification: Verification | None) -> Html:
    if verification is None:
        return _card("Audit chain", "not checked yet", field="chain", kind="card-wide")
    if verification.ok:
        text = f"verified: {verification.checked:,} records"
        kind = "card-wide card-ok"
    else:
        text = f"BROKEN at seq {verification.first_bad_seq}: {verification.reason}"
        kind = "card-wide card-bad"
    note = f"checked {clock(verification.at)} in {verification.took:.2f}s"
    return _card("Audit chain", text, field="chain", kind=kind, note=note)


def _since(budget: BudgetState) -> str:
    start = budget.period_start
    if start is None:
        return "-"
    return start.strftime("%Y-%m-%d" if (start.hour, start.minute) == (0, 0) else "%Y-%m-%d %H:%M")


def budgets_table(budgets: Sequence[BudgetState]) -> Html:
    """The budget scopes, each with its period's usage as a bar."""
    if not budgets:
        return el(
            "p",
            {"class": "muted"},
            "No budget scopes. Create one with ",
            el("code", None, "iron-state budget set team:support --limit 100 --period month"),
            ".",
        )
    rows = [
        el(
            "tr",
            {"data-scope": b.scope},
            el("td", {"class": "mono nowrap"}, b.scope),
            el("td", None, b.period or "-", f" ({b.tz})" if b.period and b.tz != "UTC" else ""),
            el("td", {"class": "nowrap"}, _since(b)),
            el("td", {"class": "num"}, money(b.spent)),
            el("td", {"class": "num"}, money(b.held)),
            el("td", {"class": "num"}, money(b.limit)),
            el("td", {"class": "num"}, money(b.available)),
            el("td", None, usage_bar(b.spent, b.held, b.limit)),
        )
        for b in budgets
    ]
    headers = ("Scope", "Period", "Since", "Spent", "Held", "Limit", "Available", "Usage")
    return _grid("budgets", headers, rows)


def overview_part(snapshot: Snapshot | None, verification: Verification | None) -> Html:
    """The totals, the chain's status and the budget scopes: reloaded when the figures change."""
    if snapshot is None:
        return el(
            "div",
            {"id": "overview-part", "data-part": "/parts/overview"},
            el("p", {"class": "muted"}, "No figures read from the store yet."),
        )
    s = snapshot.stats
    cards = el(
        "div",
        {"class": "cards"},
        _card("Agents", f"{s.total:,}", field="total"),
        _card("Running", f"{s.running:,}", field="running", kind="card-running"),
        _card("Stopped", f"{s.stopped:,}", field="stopped", kind="card-stopped"),
        _card("Failed", f"{s.failed:,}", field="failed", kind="card-failed"),
        _card("Spend", money(s.budget_spent), field="budget_spent"),
        _card("PII detections", f"{s.pii_detections:,}", field="pii_detections"),
        _card("Audit records", f"{snapshot.audit_records:,}", field="audit_records"),
        _verification(verification),
    )
    return el(
        "div",
        {"id": "overview-part", "data-part": "/parts/overview"},
        cards,
        el("h2", None, "Budget scopes"),
        budgets_table(snapshot.budgets),
    )


def chart_part(history: Sequence[tuple[float, float]]) -> Html:
    """The spend-over-time chart: reloaded when the figures change."""
    return el("div", {"id": "chart-part", "data-part": "/parts/chart"}, spend_chart(history))


def feed_table(records: Sequence[AuditRecord], *, short_ids: bool = True) -> Html:
    """Audit records, newest first; the script adds rows at the top as they arrive."""
    rows = [
        el(
            "tr",
            {"data-seq": r.seq},
            el("td", {"class": "num"}, r.seq),
            el("td", {"class": "nowrap"}, clock(r.timestamp)),
            el("td", None, agent_link(r.agent_id, short=short_ids)),
            el("td", None, el("span", {"class": f"event event-{r.event_type}"}, r.event_type)),
            el("td", {"class": "details", "title": r.details}, r.details[:DETAILS_SHOWN]),
        )
        for r in reversed(records)
    ]
    headers = [
        el("th", {"class": f"col-{h.lower()}"}, h) for h in ("Seq", "Time", "Agent", "Event", "Details")
    ]
    return _grid("feed", headers, rows, kind="grid feed" if short_ids else "grid feed feed-long")


def spenders_part(agents: Sequence[AgentState] | None) -> Html:
    """The agents that spent the most: loaded by the script once the overview shows (``None``:
    not yet, or the store could not say), so the overview never waits for a sort of the fleet."""
    frame = {"id": "spenders-part", "data-part": "/parts/spenders", "data-lazy": True}
    if agents is None:
        return el("div", frame, el("p", {"class": "muted"}, "loading…"))
    return el("div", frame, _spenders(agents))


def _spenders(agents: Sequence[AgentState]) -> Html:
    if not agents:
        return el("p", {"class": "muted"}, "No agents yet.")
    rows = [
        el(
            "tr",
            None,
            el("td", None, agent_link(a.agent_id, short=True)),
            el("td", None, status_badge(a.status)),
            el("td", {"class": "num"}, money(a.budget_spent)),
            el("td", {"class": "num"}, money(a.budget_limit)),
            el("td", None, usage_bar(a.budget_spent, 0.0, a.budget_limit, width=120)),
        )
        for a in agents
    ]
    return _grid("spenders", ("Agent", "Status", "Spent", "Limit", "Usage"), rows)


def overview_page(
    *,
    url: str,
    status: LinkStatus,
    snapshot: Snapshot | None,
    verification: Verification | None,
    history: Sequence[tuple[float, float]],
    feed: Sequence[AuditRecord],
    after: int | None,
) -> Html:
    """``/``: the totals, chain status and budgets; spend over time and top spenders; the live feed."""
    everyone = el("a", {"href": "/agents?order_by=budget_spent&descending=1", "class": "more"}, "all agents")
    body = join(
        el("section", {"id": "overview"}, overview_part(snapshot, verification)),
        el(
            "div",
            {"class": "split"},
            el("section", None, el("h2", None, "Spend over time (UTC)"), chart_part(history)),
            el(
                "section",
                None,
                el("h2", None, "Top spenders ", everyone),
                spenders_part(None),
            ),
        ),
        el(
            "section",
            None,
            el("h2", None, "Live audit feed ", el("span", {"id": "feed-state", "class": "muted"}, "")),
            feed_table(feed),
        ),
    )
    return layout("Overview", body, url=url, status=status, snapshot=snapshot, live={"after": after})


# -- the agents table -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AgentsTable:
    """One page of the agents table and the filters that made it."""

    agents: Sequence[AgentState]
    status: str | None
    labels: Mapping[str, str]
    order_by: str
    descending: bool
    offset: int
    limit: int
    has_next: bool
    error: str | None = None

    def link(self, **changes: object) -> str:
        """The address of this table with some parameters changed."""
        params: dict[str, object] = {
            "status": self.status,
            "order_by": self.order_by,
            "descending": 1 if self.descending else None,
            "offset": self.offset or None,
            "limit": self.limit if self.limit != 50 else None,
        }
        params.update(changes)
        pairs = [(k, str(v)) for k, v in params.items() if v is not None]
        pairs += [("label", f"{k}={v}") for k, v in sorted(self.labels.items())]  # a value may hold a comma
        query = urlencode(pairs)
        return "/agents" + (f"?{query}" if query else "")


def _filters(table: AgentsTable) -> Html:
    options = [el("option", {"value": ""}, "any status")] + [
        el("option", {"value": s.value, "selected": table.status == s.value}, s.value) for s in AgentStatus
    ]
    labels = ", ".join(f"{k}={v}" for k, v in sorted(table.labels.items()))
    return el(
        "form",
        {"method": "get", "action": "/agents", "class": "filters", "id": "filters"},
        el("label", None, "Status ", el("select", {"name": "status", "id": "filter-status"}, options)),
        el(
            "label",
            None,
            "Labels ",
            el(
                "input",
                {
                    "name": "labels",
                    "id": "filter-labels",
                    "value": labels,
                    "placeholder": "team=support, env=prod",
                    "size": 28,
                },
            ),
        ),
        el("input", {"type": "hidden", "name": "order_by", "value": table.order_by}),
        el("input", {"type": "hidden", "name": "descending", "value": "1"}) if table.descending else None,
        el("button", {"type": "submit"}, "Filter"),
        el("a", {"href": "/agents", "class": "more"}, "clear"),
    )


def _sort_header(table: AgentsTable, label: str, column: str) -> Html:
    current = table.order_by == column
    descending = not table.descending if current else column in ("budget_spent", "pii_detections")
    arrow = (" ▼" if table.descending else " ▲") if current else ""
    href = table.link(order_by=column, descending=1 if descending else None, offset=None)
    return el(
        "th",
        {"aria-sort": ("descending" if table.descending else "ascending") if current else None},
        el("a", {"href": href, "data-sort": column}, label, arrow),
    )


def agents_page(table: AgentsTable, *, url: str, status: LinkStatus, snapshot: Snapshot | None) -> Html:
    """``/agents``: one page of agents, filtered and sorted on the server."""
    rows = [
        el(
            "tr",
            {"data-agent": a.agent_id.as_str()},
            el("td", None, agent_link(a.agent_id)),
            el("td", None, status_badge(a.status)),
            el("td", None, _labels(a.labels)),
            el("td", {"class": "num"}, money(a.budget_spent)),
            el("td", {"class": "num"}, money(a.budget_limit)),
            el("td", None, usage_bar(a.budget_spent, 0.0, a.budget_limit, width=120)),
            el("td", {"class": "num"}, f"{a.pii_detections:,}"),
            el("td", {"class": "mono"}, ", ".join(a.budget_scopes)),
        )
        for a in table.agents
    ]
    headers = (
        _sort_header(table, "Agent", "agent_id"),
        _sort_header(table, "Status", "status"),
        "Labels",
        _sort_header(table, "Spent", "budget_spent"),
        "Limit",
        "Usage",
        _sort_header(table, "PII", "pii_detections"),
        "Scopes",
    )
    first = table.offset + 1
    shown = f"agents {first:,} to {table.offset + len(table.agents):,}" if table.agents else "no agents match"
    pager = el(
        "div",
        {"class": "pager"},
        el(
            "a",
            {
                "href": table.link(offset=max(0, table.offset - table.limit) or None),
                "rel": "prev",
                "id": "prev",
            },
            "← previous",
        )
        if table.offset > 0
        else None,
        el("span", {"id": "shown"}, shown),
        el(
            "a",
            {"href": table.link(offset=table.offset + table.limit), "rel": "next", "id": "next"},
            "next →",
        )
        if table.has_next
        else None,
    )
    body = join(
        el("h1", None, "Agents"),
        _filters(table),
        el("p", {"class": "error", "role": "alert"}, table.error) if table.error else None,
        _grid("agents", headers, rows),
        pager,
    )
    return layout("Agents", body, url=url, status=status, snapshot=snapshot, nav="agents")


# -- one agent ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AgentPage:
    """What the agent's page shows."""

    state: AgentState
    held: float
    available: float
    scopes: Sequence[tuple[str, BudgetState | None]]
    events: Sequence[AuditRecord]


def agent_state_part(page: AgentPage) -> Html:
    """The agent's state, holds and budgets: the part the script reloads when figures change."""
    a = page.state
    facts = [
        ("Status", status_badge(a.status)),
        ("Spent", money(a.budget_spent)),
        ("Held (open reservations)", money(page.held)),
        ("Limit", money(a.budget_limit)),
        ("Available (agent and scopes)", money(page.available)),
        ("Usage", usage_bar(a.budget_spent, page.held, a.budget_limit)),
        ("PII detections", f"{a.pii_detections:,}"),
        ("Period", f"{a.budget_period} ({a.budget_tz})" if a.budget_period else "none"),
        ("Period start", "-" if a.period_start is None else f"{clock(a.period_start)} UTC"),
        ("Labels", _labels(a.labels) if a.labels else "none"),
    ]
    table = el(
        "dl",
        {"class": "facts", "id": "agent-state"},
        [join(el("dt", None, k), el("dd", {"data-fact": k}, v)) for k, v in facts],
    )
    scopes = [
        el(
            "tr",
            None,
            el("td", {"class": "mono"}, name),
            el("td", {"colspan": 5, "class": "error"}, "this scope does not exist: spends are refused"),
        )
        if budget is None
        else el(
            "tr",
            None,
            el("td", {"class": "mono"}, name),
            el("td", {"class": "num"}, money(budget.spent)),
            el("td", {"class": "num"}, money(budget.held)),
            el("td", {"class": "num"}, money(budget.limit)),
            el("td", {"class": "num"}, money(budget.available)),
            el("td", None, usage_bar(budget.spent, budget.held, budget.limit)),
        )
        for name, budget in page.scopes
    ]
    headers = ("Scope", "Spent", "Held", "Limit", "Available", "Usage")
    scope_table = (
        _grid("agent-scopes", headers, scopes)
        if scopes
        else el("p", {"class": "muted"}, "Draws on no budget scope.")
    )
    part = f"/parts/agents/{a.agent_id}"
    return el(
        "div", {"id": "agent-part", "data-part": part}, table, el("h2", None, "Budget scopes"), scope_table
    )


def agent_page(
    page: AgentPage, *, after: int | None, url: str, status: LinkStatus, snapshot: Snapshot | None
) -> Html:
    """``/agents/<id>``: the agent's state, holds, budgets and audit events (live)."""
    aid = page.state.agent_id.as_str()
    body = join(
        el("h1", None, "Agent ", el("span", {"class": "mono"}, aid)),
        el("section", {"id": "agent"}, agent_state_part(page)),
        el(
            "section",
            None,
            el("h2", None, "Audit events ", el("span", {"id": "feed-state", "class": "muted"})),
            feed_table(page.events, short_ids=False),
        ),
    )
    return layout(
        f"Agent {aid[:14]}…",
        body,
        url=url,
        status=status,
        snapshot=snapshot,
        nav="agents",
        live={"after": after, "agent": aid},
    )
