"""The Lua scripts: loaded once from ``lua/`` beside this module, and the calls that run them.

Redis scripts cannot import one another, so each script is sent as the definitions of
``lua/_prelude.lua`` that it uses (directly or through each other) followed by its own file;
the prelude's placeholders take the Python constants they stand for (:data:`GENESIS_HASH`,
:data:`LANDED_KEEP`, :data:`TIME_BLOCK`, :data:`~...money.MAX_MICROS`, :data:`AGENT_FIELDS`,
:data:`~...thresholds.DEFAULT_THRESHOLDS`), so the two languages agree by construction.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final, NamedTuple

from ...audit_chain import GENESIS_HASH
from ...errors import SchemaError
from ...money import MAX_MICROS
from ...thresholds import DEFAULT_THRESHOLDS

__all__ = [
    "ABSENT",
    "AGENT_FIELDS",
    "LANDED_KEEP",
    "OUTBOX_BATCH",
    "SCRIPT_NAMES",
    "TIME_BLOCK",
    "Script",
    "ScriptCall",
    "load_scripts",
]

#: Outbox entries a client reads, and appends, at a time (see :mod:`.ops`).
OUTBOX_BATCH: Final = 100
#: How many of the newest records that came from outboxes the trail remembers the origin of, so
#: that a caller whose event another process appended finds its record (see :mod:`.ops`).
LANDED_KEEP: Final = 10_000
#: Seqs per block of the audit trail's time index: a query by time examines at most about this
#: many records outside its time range at each end (see ``index_time`` in ``lua/_prelude.lua``).
TIME_BLOCK: Final = 100

#: What the client sends for an optional field that takes its default (the field is then absent),
#: where ``""`` is a value of its own (thresholds: ``""`` is none). ``ABSENT`` in the prelude.
ABSENT: Final = "\x00"

#: The fields of an agent's hash that the scripts read, in order: the state (status to
#: thresholds, as replies carry it: see ``state_reply`` in ``lua/_prelude.lua``), where its
#: period ends, and the highest threshold alerted in that period (absent: none). An agent
#: 0.4/0.5 stored lacks ``spent_micros`` until migrated; one 0.6 stored lacks ``thresholds``
#: (the default) and ``alerted``.
AGENT_FIELDS: Final = (
    "status",
    "spent_micros",
    "pii_detections",
    "limit_micros",
    "labels",
    "scopes",
    "period",
    "tz",
    "period_start",
    "thresholds",
    "period_end",
    "alerted",
)

SCRIPT_NAMES: Final = (
    "save",
    "remove",
    "record_spend",
    "record_pii",
    "set_status",
    "reserve",
    "commit",
    "release",
    "reserved",
    "settle_pending",
    "resolve_holds",
    "resolve_ops",
    "scope_spend",
    "scope_settle",
    "budget_set",
    "budget_remove",
    "budgets_read",
    "migrate",
    "purge",
    "meta",
    "index_status",
    "append_audit",
    "audit_marks",
    "query_audit",
    "prune_audit",
    "prune_indexes",
    "index_time",
    "stats",
)


@dataclass(frozen=True, slots=True)
class Script:
    """A Lua script as sent to Redis: the shared prelude followed by the script's own file."""

    name: str
    source: str
    sha: str


_DEFINITION_RE: Final = re.compile(r"^local (?:function )?([A-Za-z_][A-Za-z0-9_]*)", re.MULTILINE)
_NAME_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _prelude_blocks(prelude: str) -> list[tuple[str, str]]:
    """The prelude's top-level definitions as ``(name, text)``, each with its comment."""
    blocks: list[tuple[str, str]] = []
    for chunk in re.split(r"\n\s*\n", prelude):
        found = _DEFINITION_RE.search(chunk)
        if found is not None:
            blocks.append((found.group(1), chunk.strip("\n")))
    return blocks


def _assemble(blocks: list[tuple[str, str]], body: str) -> str:
    """The prelude definitions that ``body`` uses (directly or through each other), then ``body``.

    Each helper in a script is a closure made on every call, so a script carries only the
    helpers it needs.
    """
    defined = {name for name, _ in blocks}
    needed: set[str] = set()
    pending = set(_NAME_RE.findall(body)) & defined
    texts = dict(blocks)
    while pending:
        name = pending.pop()
        needed.add(name)
        pending |= (set(_NAME_RE.findall(texts[name])) & defined) - needed - {name}
    parts = [text for name, text in blocks if name in needed]
    return "\n\n".join([*parts, body])


@functools.cache
def load_scripts() -> dict[str, Script]:
    """Every script of ``lua/``, with the prelude helpers it uses and their constants."""
    folder = resources.files("iron_runtime_state.backends.redis").joinpath("lua")
    prelude = folder.joinpath("_prelude.lua").read_text(encoding="utf-8")
    for placeholder, value in (
        ("__MAX_MICROS__", str(MAX_MICROS)),
        ("__AGENT_FIELDS__", "{" + ", ".join(f"'{name}'" for name in AGENT_FIELDS) + "}"),
        ("__GENESIS_HASH__", GENESIS_HASH),
        ("__LANDED_KEEP__", str(LANDED_KEEP)),
        ("__TIME_BLOCK__", str(TIME_BLOCK)),
        ("__DEFAULT_THRESHOLDS__", "{" + ", ".join(f"'{t!r}'" for t in DEFAULT_THRESHOLDS) + "}"),
    ):
        if placeholder not in prelude:  # pragma: no cover - a broken package
            raise SchemaError(f"backends/redis/lua/_prelude.lua lacks {placeholder}")
        prelude = prelude.replace(placeholder, value)
    blocks = _prelude_blocks(prelude)
    scripts: dict[str, Script] = {}
    for name in SCRIPT_NAMES:
        body = folder.joinpath(f"{name}.lua").read_text(encoding="utf-8")
        source = _assemble(blocks, f"-- {name}.lua\n{body}")
        scripts[name] = Script(name, source, hashlib.sha1(source.encode()).hexdigest())
    return scripts


class ScriptCall(NamedTuple):
    """One script to run: where (the slot of its keys), with which keys and arguments."""

    script: Script
    slot: int
    keys: Sequence[str]
    args: Sequence[str | int | float | bytes]

    def command(self) -> tuple[Any, ...]:
        """The ``EVALSHA`` command."""
        return ("EVALSHA", self.script.sha, len(self.keys), *self.keys, *self.args)
