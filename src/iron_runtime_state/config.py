"""Names and defaults shared by the library and the command line, each defined once here."""

from __future__ import annotations

import os
import re
from typing import Final

__all__ = [
    "CLI_DEFAULT_URL",
    "DASHBOARD_PORT",
    "DEFAULT_NAMESPACE",
    "DEFAULT_SCHEMA",
    "DEFAULT_URL",
    "ENV_AUDIT_KEY",
    "ENV_DASHBOARD_TOKEN",
    "ENV_DEBUG",
    "ENV_URL",
    "METRICS_PORT",
    "env_config",
    "masked_url",
]

#: The store of ``StateManager.from_env()`` when ``$IRON_STATE_URL`` is unset: this process's memory.
DEFAULT_URL: Final = "memory://"
#: The store of the ``iron-state`` commands without ``--url`` or ``$IRON_STATE_URL``: a file in
#: the working folder, so that one command sees what another wrote.
CLI_DEFAULT_URL: Final = "sqlite:///iron_state.db"
#: The prefix of every key a Redis store writes, unless told otherwise (``?namespace=``).
DEFAULT_NAMESPACE: Final = "iron"
#: The PostgreSQL schema the tables live in unless a URL's ``?schema=`` says otherwise.
DEFAULT_SCHEMA: Final = "iron"
#: The store URL.
ENV_URL: Final = "IRON_STATE_URL"
#: The HMAC key of the audit chain.
ENV_AUDIT_KEY: Final = "IRON_STATE_AUDIT_KEY"
#: Tracebacks and debug logs for the command line.
ENV_DEBUG: Final = "IRON_STATE_DEBUG"
#: The port ``/metrics`` is served on unless told otherwise (Prometheus exporters' custom range).
METRICS_PORT: Final = 9464
#: The port ``iron-state serve`` (the dashboard) listens on unless told otherwise.
DASHBOARD_PORT: Final = 8080
#: The bearer token of the dashboard (``iron-state serve --token``), kept out of ``ps`` output.
ENV_DASHBOARD_TOKEN: Final = "IRON_STATE_DASHBOARD_TOKEN"

_PASSWORD: Final = re.compile(r"(//[^/@:?#]*:)[^@/?#]*@")


def masked_url(url: str) -> str:
    """``url`` as it may be shown or logged: a password in it replaced by ``***``."""
    return _PASSWORD.sub(r"\1***@", url)


def env_config(default_url: str = DEFAULT_URL) -> tuple[str, str | None]:
    """The store URL and audit key from ``$IRON_STATE_URL`` and ``$IRON_STATE_AUDIT_KEY``."""
    return os.environ.get(ENV_URL) or default_url, os.environ.get(ENV_AUDIT_KEY) or None
