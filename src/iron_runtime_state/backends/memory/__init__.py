"""The in-memory store: ``memory://``, the default.

Nothing survives the process. The modules, by concern:

- :mod:`.store`: :class:`MemoryBackend`, the agents in typed columns, the atomic counters, the
  budget holds and the one lock that guards everything;
- :mod:`.trail`: the audit trail (records, head and anchor marks and their seals, the indexes
  and timeline the queries use), a plain class the store calls under its lock.
"""

from __future__ import annotations

from .store import MemoryBackend, open_memory

__all__ = ["MemoryBackend", "open_memory"]
