"""How an error quotes what it was given: any input cut short, a URL with its passwords masked.

Shared by the stores whose URLs may carry a secret (Redis, PostgreSQL); it imports no driver,
so either store's URL checks work without the other's client library installed.
"""

from __future__ import annotations

from typing import Final
from urllib.parse import unquote

__all__ = ["SECRET_OPTIONS", "SHOWN_INPUT", "shown", "shown_url"]

#: The most characters of any input an error repeats.
SHOWN_INPUT: Final = 64
#: Query options whose value is a secret, masked wherever a URL is shown: Redis's ``password``
#: and ``ssl_password``, libpq's ``password`` and ``sslpassword``.
SECRET_OPTIONS: Final = frozenset({"password", "ssl_password", "sslpassword"})


def shown(value: object, limit: int = SHOWN_INPUT) -> str:
    """``value`` as an error message quotes it: its repr, from at most ``limit`` characters."""
    if isinstance(value, str):
        return repr(value if len(value) <= limit else value[: limit - 3] + "...")
    try:
        text = repr(value)
    except ValueError:  # an int past Python's digit limit for str()
        return f"a {type(value).__name__} too long to show"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def shown_url(url: str) -> str:
    """``url`` as an error message quotes it: every password masked, at most :data:`SHOWN_INPUT` long.

    The user info is taken to end at the last ``@`` before the query, or at the last ``@`` of all
    when there is none there (a password with a raw ``?`` or ``#``), so no part of a password
    shows, even in a URL that does not parse. The :data:`SECRET_OPTIONS` in the query are masked
    too.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    at = rest.partition("?")[0].rfind("@")
    if at < 0:
        at = rest.rfind("@")
    if at >= 0:
        user, colon, _ = rest[:at].partition(":")
        rest = user + (":***" if colon else "") + rest[at:]
    body, question, query = rest.partition("?")
    if question:
        pairs = query.split("&")
        for i, pair in enumerate(pairs):
            key, equals, _ = pair.partition("=")
            if equals and unquote(key) in SECRET_OPTIONS:
                pairs[i] = f"{key}=***"
        rest = f"{body}?{'&'.join(pairs)}"
    return shown(f"{scheme}{sep}{rest}")
