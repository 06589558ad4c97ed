"""``GET /events``: server-sent events from the audit trail, the totals and the store's status.

One ``text/event-stream`` per browser, fed by the :class:`~.hub.Hub` (one ``watch()`` for
every browser). Each audit record is an ``audit`` event whose ``id`` is its ``seq``: a browser
that loses the connection reconnects by itself with ``Last-Event-ID`` and resumes right after
the last record it got. A page starts the stream with ``?after=<seq>``, the newest record it
was rendered with, so nothing falls between the page and its stream. ``?agent=`` and
``?type=`` filter the records. Other events: ``totals`` (the figures changed: the page reloads
its overview), ``store`` (up or down) and ``verify`` (the chain was checked), each carrying
JSON; a comment every 15 seconds keeps proxies from closing an idle stream.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, Final

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from ..errors import StateError
from ..ids import AgentId
from ..models import check_event_type
from .data import record_json, status_json, summary_json, verification_json
from .hub import Hub, Message

__all__ = ["encode", "event_stream"]

#: Tells a browser how long to wait before reconnecting, in milliseconds.
RETRY_MS: Final = 2000


def encode(event: str, data: Any, event_id: int | None = None) -> bytes:
    """One server-sent event: ``data`` as compact JSON on one line."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _payload(hub: Hub, message: Message) -> bytes:
    kind, item = message
    if kind == "audit":
        return encode("audit", record_json(item), item.seq)
    if kind == "totals":
        return encode("totals", summary_json(hub))
    if kind == "store":
        return encode("store", status_json(hub.link.status))
    if kind == "verify":
        return encode("verify", verification_json(hub.verification))
    return b": ping\n\n"


def _cursor(request: Request) -> int | None:
    text = request.headers.get("last-event-id") or request.query_params.get("after")
    if text is None or text == "":
        return None
    if not text.isdigit():
        raise ValueError(f"the cursor must be a record seq (digits), got {text[:32]!r}")
    return int(text)


async def event_stream(request: Request) -> Response:
    """The event stream of one browser (see the module docstring)."""
    hub: Hub = request.app.state.hub
    try:
        cursor = _cursor(request)
        agent = request.query_params.get("agent")
        agent_id = AgentId.parse(agent) if agent else None
        kind = request.query_params.get("type")
        event_type = check_event_type(kind) if kind else None
    except (ValueError, StateError) as exc:
        return Response(f"bad request: {exc}\n", status_code=400, media_type="text/plain")

    async def body() -> AsyncIterator[bytes]:
        yield f"retry: {RETRY_MS}\n\n".encode()
        async for message in hub.stream(cursor, agent_id, event_type):
            yield _payload(hub, message)

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
