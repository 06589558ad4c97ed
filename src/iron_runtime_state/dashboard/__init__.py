"""A read-only web dashboard of a fleet: ``iron-state serve --url URL``.

Needs the ``dashboard`` extra (``pip install 'iron-runtime-state[dashboard]'``: Starlette,
uvicorn and prometheus-client). The pages are rendered on the server, charts included (SVG);
the one small script and stylesheet ship in ``static/`` (no build step, nothing fetched from
elsewhere). The live parts follow the store through server-sent events fed by
:meth:`~iron_runtime_state.AsyncStateManager.watch`. See ``docs/dashboard.md``.

The package, by concern:

===============  ===============================================================================
``app.py``       the settings, the Starlette application, and the server ``iron-state serve`` runs
``routes.py``    the addresses: what each reads from the store, and which page it renders
``pages.py``     the pages as HTML (no I/O)
``charts.py``    usage bars and the spend-over-time chart, as SVG
``html.py``      HTML built from values, escaped by construction
``hub.py``       the background tasks: the audit feed (one ``watch()`` for every browser), the
                 totals sampler, the chain verifier
``sse.py``       ``/events``: the server-sent event stream of one browser
``data.py``      the JSON forms of what the pages show (``/api/...``, the event stream)
``link.py``      the store, opened lazily, every read timed out, up or down known
``security.py``  read-only, bearer token, loopback-only without one, security headers
``static/``      ``dashboard.js``, ``dashboard.css``, ``favicon.svg``
===============  ===============================================================================
"""

from __future__ import annotations

from ..errors import MissingDependency

try:
    import starlette  # noqa: F401  # checked here so a missing extra is one clear line
    import uvicorn  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise MissingDependency(
        "the dashboard needs the 'dashboard' extra: pip install 'iron-runtime-state[dashboard]'"
    ) from exc

from .app import DashboardServer, DashboardSettings, create_app
from .security import check_bind

__all__ = ["DashboardServer", "DashboardSettings", "check_bind", "create_app"]
