"""The dashboard's addresses: each reads what it needs from the store (or the hub) and renders it.

============================  ========================================================
``/``                         overview: totals, budget scopes, spend chart, chain status,
                              top spenders, live audit feed
``/agents``                   the agents table: ``?status=``, ``?labels=team=a,env=b``,
                              ``?order_by=``, ``?descending=1``, ``?offset=``, ``?limit=``
``/agents/<id>``              one agent: state, holds, budgets, audit events (live)
``/events``                   server-sent events (:mod:`.sse`)
``/parts/overview``           the overview's live parts, reloaded by the page's script
``/parts/chart``, ``/parts/spenders``
``/parts/agents/<id>``        the agent page's live part
``/api/summary``              the totals, budgets, store status and chain check as JSON
``/api/agents``               a page of the agents table as JSON (same parameters)
``/metrics``                  Prometheus metrics (:mod:`iron_runtime_state.metrics`)
``/healthz``                  ``{"ok": true, "store": "up"|"down"|"unknown"}``, always 200
============================  ========================================================

Reads go through the :class:`~.link.StoreLink`: when the store is down a page still renders,
with the last figures the hub read and a banner.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from typing import Any, Final

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from ..aio import AsyncStateManager
from ..core import MAX_PAGE
from ..errors import StateError
from ..ids import AgentId
from ..metrics import FleetReading, fleet_families
from ..models import AgentStatus, AuditRecord
from ..money import from_micros
from ..names import check_labels
from .data import agent_json, status_json, summary_json
from .html import Html, el
from .hub import Hub
from .link import StoreDown, StoreSlow
from .pages import (
    AgentPage,
    AgentsTable,
    agent_page,
    agent_state_part,
    agents_page,
    chart_part,
    message_page,
    overview_page,
    overview_part,
    spenders_part,
)
from .sse import event_stream

__all__ = ["ROUTES"]

#: Records on the overview's feed and an agent's page when they load.
FEED_SHOWN: Final = 50
AGENT_EVENTS: Final = 100
#: Rows of the agents table unless ``?limit=`` says otherwise, and the most it shows.
PAGE_ROWS: Final = 50
MAX_ROWS: Final = min(500, MAX_PAGE)
#: Agents in the overview's top spenders.
SPENDERS: Final = 5


def _hub(request: Request) -> Hub:
    hub: Hub = request.app.state.hub
    return hub


def _frame(hub: Hub) -> dict[str, Any]:
    """What every page's frame shows: the store's URL (password masked), status and figures' age."""
    return {"url": hub.link.url, "status": hub.link.status, "snapshot": hub.snapshot}


def _html(page: Html, status: int = 200) -> HTMLResponse:
    return HTMLResponse(page, status_code=status, headers={"Cache-Control": "no-store"})


def _unavailable(hub: Hub, title: str, exc: StoreDown) -> HTMLResponse:
    """The page for a read the store did not answer: down (503) or too slow (504)."""
    if isinstance(exc, StoreSlow):
        text = f"The store is slow: {exc}. Narrow the filters, or try again."
        return _html(message_page(title, text, **_frame(hub)), 504)
    return _html(message_page(title, f"The store is down: {exc}", **_frame(hub)), 503)


async def _first_snapshot(hub: Hub) -> None:
    """Read the totals now if the hub has none yet (the first page after start-up)."""
    if hub.snapshot is None:
        with contextlib.suppress(StateError):  # the page shows the store as down
            await hub.sample()


# -- the overview ---------------------------------------------------------------------------------


async def overview(request: Request) -> Response:
    """``/``."""
    hub = _hub(request)
    await _first_snapshot(hub)
    page = overview_page(
        **_frame(hub),
        verification=hub.verification,
        history=_history(hub),
        feed=hub.recent(FEED_SHOWN),
        after=hub.last_seq,
    )
    return _html(page)


async def overview_fragment(request: Request) -> Response:
    """``/parts/overview``."""
    hub = _hub(request)
    return _html(overview_part(hub.snapshot, hub.verification))


async def spenders_fragment(request: Request) -> Response:
    """``/parts/spenders``: the agents that spent the most (one sorted page of the fleet)."""
    hub = _hub(request)
    try:
        spenders = await hub.link.read(
            lambda m: m.page_agent_states(order_by="budget_spent", descending=True, limit=SPENDERS)
        )
    except StoreDown as exc:
        return _html(el("div", {"id": "spenders-part"}, el("p", {"class": "muted"}, str(exc))))
    return _html(spenders_part(spenders))


async def chart_fragment(request: Request) -> Response:
    """``/parts/chart``."""
    return _html(chart_part(_history(_hub(request))))


def _history(hub: Hub) -> list[tuple[float, float]]:
    """The spend samples, drawn on to now (a sample is kept only when the spend changed)."""
    points = list(hub.history.points)
    if points and hub.link.status.up:
        points.append((time.time(), points[-1][1]))
    return points


# -- the agents table ---------------------------------------------------------------------------


def _labels(boxes: Iterable[str], pairs: Iterable[str]) -> dict[str, str]:
    """The label filters: ``labels=`` as typed in the box (``team=a, env=b``: pairs split at
    commas) and ``label=`` (one ``key=value`` each, so a value may hold a comma)."""
    items = [item.strip() for box in boxes for item in box.split(",")]
    found: dict[str, str] = {}
    for item in [*items, *pairs]:
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"a label filter is key=value, got {item[:40]!r}")
        found[key.strip()] = value
    return check_labels(found)


def _count(text: str | None, what: str, default: int, maximum: int) -> int:
    if text is None or text == "":
        return default
    if not text.isdigit():
        raise ValueError(f"{what} must be a whole number, got {text[:20]!r}")
    return min(int(text), maximum)


def _table_request(request: Request) -> AgentsTable:
    """The table's parameters (no agents yet); ``ValueError`` for a bad one."""
    q = request.query_params
    status = q.get("status") or None
    if status is not None:
        status = AgentStatus.parse(status).value
    order_by = q.get("order_by") or "agent_id"
    return AgentsTable(
        agents=(),
        status=status,
        labels=_labels(q.getlist("labels"), q.getlist("label")),
        order_by=order_by,
        descending=q.get("descending", "") in ("1", "true", "yes"),
        offset=_count(q.get("offset"), "offset", 0, 10**12),
        limit=max(1, _count(q.get("limit"), "limit", PAGE_ROWS, MAX_ROWS)),
        has_next=False,
    )


async def _agents_table(hub: Hub, request: Request) -> AgentsTable:
    table = _table_request(request)
    found = await hub.link.read(
        lambda m: m.page_agent_states(
            status=table.status,
            labels=table.labels or None,
            order_by=table.order_by,
            descending=table.descending,
            offset=table.offset,
            limit=table.limit + 1,  # one more: is there a next page?
        )
    )
    return AgentsTable(
        found[: table.limit],
        table.status,
        table.labels,
        table.order_by,
        table.descending,
        table.offset,
        table.limit,
        len(found) > table.limit,
    )


async def agents(request: Request) -> Response:
    """``/agents``."""
    hub = _hub(request)
    await _first_snapshot(hub)
    try:
        table = await _agents_table(hub, request)
    except StoreDown as exc:
        return _unavailable(hub, "Agents", exc)
    except (ValueError, StateError) as exc:
        empty = AgentsTable((), None, {}, "agent_id", False, 0, PAGE_ROWS, False, error=str(exc))
        return _html(agents_page(empty, **_frame(hub)), 400)
    return _html(agents_page(table, **_frame(hub)))


async def api_agents(request: Request) -> Response:
    """``/api/agents``."""
    hub = _hub(request)
    try:
        table = await _agents_table(hub, request)
    except StoreDown as exc:
        return JSONResponse({"error": str(exc), "store": status_json(hub.link.status)}, 503)
    except (ValueError, StateError) as exc:
        return JSONResponse({"error": str(exc)}, 400)
    return JSONResponse(
        {
            "agents": [agent_json(a) for a in table.agents],
            "offset": table.offset,
            "limit": table.limit,
            "has_next": table.has_next,
        }
    )


# -- one agent ----------------------------------------------------------------------------------


async def _tail(manager: AsyncStateManager, agent_id: AgentId, count: int) -> list[AuditRecord]:
    """The agent's newest ``count`` records: windows before the head, widened until they hold enough."""
    marks = await manager.backend.call("audit_marks")
    head, floor = marks.head[0], marks.anchor[0]
    window = max(4 * count, 256)
    while True:
        after = max(head - window, floor)
        records = await manager.audit_log(agent_id=agent_id, after_seq=after)
        if len(records) >= count or after <= floor:
            return records[-count:]
        window *= 8


async def _agent(hub: Hub, agent_id: AgentId, *, events: bool) -> AgentPage | None:
    async def read(m: AsyncStateManager) -> AgentPage | None:
        state = await m.get_agent_state(agent_id)
        if state is None:
            return None
        _, held = await m.backend.call("reserved", agent_id, time.time())
        available = await m.budget_available(agent_id)
        scopes = [(name, await m.get_budget(name)) for name in state.budget_scopes]
        tail = await _tail(m, agent_id, AGENT_EVENTS) if events else []
        return AgentPage(state, from_micros(held), available, scopes, tail)

    return await hub.link.read(read)


def _agent_id(request: Request) -> AgentId:
    return AgentId.parse_flexible(str(request.path_params["agent_id"]))


async def agent(request: Request) -> Response:
    """``/agents/<id>``."""
    hub = _hub(request)
    await _first_snapshot(hub)
    try:
        agent_id = _agent_id(request)
        page = await _agent(hub, agent_id, events=True)
    except StoreDown as exc:
        return _unavailable(hub, "Agent", exc)
    except (ValueError, StateError) as exc:
        return _html(message_page("Not an agent id", str(exc), **_frame(hub)), 400)
    if page is None:
        text = f"No agent {agent_id} in this store (it may have been removed)."
        return _html(message_page("Agent not found", text, **_frame(hub)), 404)
    after = max(hub.last_seq or 0, page.events[-1].seq if page.events else 0)
    return _html(agent_page(page, after=after, **_frame(hub)))


async def agent_fragment(request: Request) -> Response:
    """``/parts/agents/<id>``."""
    hub = _hub(request)
    try:
        page = await _agent(hub, _agent_id(request), events=False)
    except StoreDown as exc:
        return Response(str(exc), 503)
    except (ValueError, StateError) as exc:
        return Response(str(exc), 400)
    if page is None:
        return Response("no such agent", 404)
    return _html(agent_state_part(page))


# -- for machines ---------------------------------------------------------------------------------


async def api_summary(request: Request) -> Response:
    """``/api/summary``."""
    hub = _hub(request)
    await _first_snapshot(hub)
    return JSONResponse(summary_json(hub))


class _Families:
    """The families of one scrape, as the collector ``generate_latest`` reads."""

    def __init__(self, families: list[Any]) -> None:
        self._families = families

    def collect(self) -> list[Any]:
        return self._families

    def describe(self) -> list[Any]:
        return []


async def metrics(request: Request) -> Response:
    """``/metrics``: the totals and budget scopes read now, and the counters the feed keeps."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    hub = _hub(request)
    started = time.perf_counter()

    async def read(m: AsyncStateManager) -> FleetReading:
        return FleetReading(await m.stats(), await m.audit_count(), await m.list_budgets())

    reading = None
    with contextlib.suppress(StoreDown):
        reading = await hub.link.read(read)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(fleet_families(reading, time.perf_counter() - started, hub.counters)))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


async def healthz(request: Request) -> Response:
    """``/healthz``: the dashboard answers; whether the store does is in the body."""
    up = _hub(request).link.status.up
    return JSONResponse({"ok": True, "store": {True: "up", False: "down", None: "unknown"}[up]})


ROUTES: Final = [
    Route("/", overview),
    Route("/agents", agents),
    Route("/agents/{agent_id}", agent),
    Route("/events", event_stream),
    Route("/parts/overview", overview_fragment),
    Route("/parts/chart", chart_fragment),
    Route("/parts/spenders", spenders_fragment),
    Route("/parts/agents/{agent_id}", agent_fragment),
    Route("/api/summary", api_summary),
    Route("/api/agents", api_agents),
    Route("/metrics", metrics),
    Route("/healthz", healthz),
]
