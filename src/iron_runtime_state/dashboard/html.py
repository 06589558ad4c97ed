"""HTML built from Python values, escaped by construction.

Everything a page shows comes from the store (agent labels, audit details, scope names), so no
text reaches a page unescaped: :func:`el` escapes every child and attribute value unless it is
:class:`Html` already (made by :func:`el` itself, or by :func:`raw` for the few constants
written here). The same idea as ``markupsafe``, in the few lines the dashboard needs.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping
from typing import Final

__all__ = ["Html", "el", "escape", "join", "raw"]

#: Elements that have no end tag.
_VOID: Final = frozenset({"br", "hr", "img", "input", "link", "meta"})


class Html(str):
    """Text that is HTML already: :func:`el` puts it in as it is."""

    __slots__ = ()


def raw(text: str) -> Html:
    """Mark ``text``, written in this package, as HTML (never use it for data)."""
    return Html(text)


def escape(value: object) -> Html:
    """``value`` as text in HTML (``Html`` is kept as it is)."""
    if isinstance(value, Html):
        return value
    return Html(html.escape(str(value), quote=True))


Child = object  # Html, text, numbers, None (nothing) or iterables of them


def _children(items: Iterable[Child]) -> Iterable[str]:
    for item in items:
        if item is None or item is False:
            continue
        if isinstance(item, str):
            yield escape(item)
        elif isinstance(item, Iterable):
            yield from _children(item)
        else:
            yield escape(item)


def join(*children: Child) -> Html:
    """The children, escaped where they are not HTML, one after the other."""
    return Html("".join(_children(children)))


def el(tag: str, attrs: Mapping[str, object] | None = None, *children: Child) -> Html:
    """``<tag attrs>children</tag>``: ``None``/``False`` attributes are left out, ``True`` ones
    are written bare, every value and child is escaped."""
    parts = [tag]
    for name, value in (attrs or {}).items():
        if value is None or value is False:
            continue
        parts.append(name if value is True else f'{name}="{escape(value)}"')
    start = f"<{' '.join(parts)}>"
    if tag in _VOID:
        return Html(start)
    return Html(f"{start}{join(*children)}</{tag}>")
