"""Who may look, and what every answer carries: the dashboard's one ASGI middleware.

- **Read-only.** Only ``GET`` and ``HEAD`` are served; anything else is ``405``.
- **Loopback unless a token is set.** :func:`check_bind` refuses an address beyond loopback
  without a bearer token. With a token, every path but ``/healthz`` and ``/static/`` needs it:
  ``Authorization: Bearer <token>`` (Prometheus, curl), or the cookie a browser gets by opening
  any page once with ``?token=<token>`` (the token leaves the address bar at once: the answer
  is a redirect that sets an ``HttpOnly``, ``SameSite=Strict`` cookie holding a digest of the
  token, not the token). Tokens are compared in constant time (``hmac.compare_digest``).
- **No DNS rebinding.** Without a token the ``Host`` header must name a loopback address (or
  the address listened on), so a web page elsewhere cannot reach the dashboard through a name
  it points at 127.0.0.1.
- **Headers.** A content security policy that allows only the package's own scripts and
  styles, no framing, no sniffing, no referrer; and ``Server-Timing: app;dur=<ms>``, the time
  the server took until the answer started (``bench/bench_dashboard.py`` reads it).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import time
from collections.abc import Iterable
from http.cookies import CookieError, SimpleCookie
from typing import Final
from urllib.parse import parse_qsl, urlencode

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..config import ENV_DASHBOARD_TOKEN
from ..errors import ConfigurationError

__all__ = ["COOKIE", "Guard", "check_bind", "check_token", "is_loopback"]

#: The cookie a browser keeps the token's digest in.
COOKIE: Final = "iron_state_dashboard"
#: The shortest token accepted.
MIN_TOKEN: Final = 16
#: Paths served without the token: the health check, and the package's own scripts and styles.
_OPEN_PREFIXES: Final = ("/static/",)
_OPEN_PATHS: Final = frozenset({"/healthz"})
_HEADERS: Final = (
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        b"connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
)
_LOOPBACK_NAMES: Final = frozenset({"localhost", "localhost.", "ip6-localhost"})


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) only reaches this machine."""
    name = host.strip().strip("[]").lower()
    if name in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_token(token: str | None) -> str | None:
    """``token`` if it is long enough to be a secret (or ``None``)."""
    if token is None:
        return None
    if len(token) < MIN_TOKEN or token != token.strip():
        raise ConfigurationError(
            f"the dashboard token must be at least {MIN_TOKEN} characters with no spaces around it; "
            'make one with: python -c "import secrets; print(secrets.token_urlsafe(32))"'
        )
    return token


def check_bind(host: str, token: str | None) -> None:
    """Refuse to listen beyond the loopback interface without a token."""
    if token is None and not is_loopback(host):
        raise ConfigurationError(
            f"refusing to serve the dashboard on {host[:64]!r} without a token: anyone who can reach "
            f"it would see the fleet. Pass --token (or set ${ENV_DASHBOARD_TOKEN}), or listen on "
            "127.0.0.1 and reach it through an SSH tunnel or a proxy"
        )


def _digest(token: str) -> str:
    return hashlib.sha256(b"iron-state-dashboard\0" + token.encode()).hexdigest()


def _host_name(value: str) -> str:
    """The name in a ``Host`` header, without its port or brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


class Guard:
    """The middleware described in the module docstring."""

    def __init__(self, app: ASGIApp, *, token: str | None, hosts: Iterable[str] = ()) -> None:
        """Guard ``app``; ``hosts`` are extra names the ``Host`` header may carry without a token."""
        self._app = app
        self._token = check_token(token)
        self._digest = None if token is None else _digest(token)
        self._hosts = frozenset(h.strip("[]").lower() for h in hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = time.perf_counter()

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                took = (time.perf_counter() - started) * 1000
                headers = list(message.get("headers", []))
                headers.extend(_HEADERS)
                headers.append((b"server-timing", f"app;dur={took:.2f}".encode()))
                message = {**message, "headers": headers}
            await send(message)

        refusal = self._refusal(scope)
        if refusal is not None:
            status, text, extra = refusal
            await _answer(send_with_headers, status, text, extra)
            return
        await self._app(scope, receive, send_with_headers)

    def _refusal(self, scope: Scope) -> tuple[int, str, list[tuple[bytes, bytes]]] | None:
        """Why the request is not served (status, text, headers), or ``None`` to serve it."""
        if scope["method"] not in ("GET", "HEAD"):
            return 405, "the dashboard is read-only: GET only\n", [(b"allow", b"GET, HEAD")]
        if self._token is None:
            host = _host_name(_header(scope, b"host") or "")
            if host and not is_loopback(host) and host not in self._hosts:
                return 421, "this dashboard answers to its loopback address only\n", []
            return None
        path = scope["path"]
        if path in _OPEN_PATHS or path.startswith(_OPEN_PREFIXES):
            return None
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        offered = query.pop("token", None)
        if offered is not None and hmac.compare_digest(offered.encode(), self._token.encode()):
            rest = urlencode(query)
            location = path + (f"?{rest}" if rest else "")
            cookie = f"{COOKIE}={self._digest}; HttpOnly; SameSite=Strict; Path=/"
            return 303, "signed in\n", [(b"location", location.encode()), (b"set-cookie", cookie.encode())]
        if self._authorized(scope):
            return None
        return (
            401,
            "this dashboard needs its token: send 'Authorization: Bearer <token>', or open "
            "/?token=<token> once in the browser\n",
            [(b"www-authenticate", b'Bearer realm="iron-state"')],
        )

    def _authorized(self, scope: Scope) -> bool:
        assert self._token is not None
        assert self._digest is not None
        bearer = _header(scope, b"authorization") or ""
        scheme, _, value = bearer.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), self._token.encode()):
            return True
        cookies = SimpleCookie()
        try:
            cookies.load(_header(scope, b"cookie") or "")
        except CookieError:  # a malformed cookie header is no credential
            return False
        kept = cookies.get(COOKIE)
        return kept is not None and hmac.compare_digest(kept.value.encode(), self._digest.encode())


async def _answer(send: Send, status: int, text: str, headers: list[tuple[bytes, bytes]]) -> None:
    body = text.encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
