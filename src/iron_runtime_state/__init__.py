"""iron_runtime_state: the live state of fleets of AI agents.

Who is running, stopped or failed; what each has spent against its limit; how many PII
detections each has had; and a hash-chained audit trail that shows tampering. One API over an
in-memory store, a SQLite file or Redis, chosen by URL::

    from iron_runtime_state import AgentId, AgentState, AgentStatus, StateManager

    with StateManager.from_url("sqlite:///iron_state.db") as manager:
        agent_id = AgentId.generate()
        manager.save_agent_state(AgentState(agent_id, AgentStatus.RUNNING, budget_limit=10.0))
        manager.record_spend(agent_id, 2.5)
"""

from __future__ import annotations

from .aio import AsyncStateManager
from .audit_chain import GENESIS_HASH
from .errors import (
    AgentNotFound,
    AgentNotRunning,
    BackendError,
    BackendUnavailable,
    BudgetExceeded,
    BudgetNotFound,
    ConfigurationError,
    IdError,
    IdErrorCode,
    MissingDependency,
    PricingError,
    ReservationError,
    SchemaError,
    StateError,
    StateTypeError,
    ValidationError,
)
from .holds import AsyncBudgetHold, BudgetHold
from .ids import AgentId
from .ledger import SpendRow
from .manager import StateManager
from .models import (
    AgentState,
    AgentStatus,
    AuditCheckpoint,
    AuditEvent,
    AuditRecord,
    AuditVerification,
    BudgetState,
    FleetStats,
    Reservation,
)
from .pricing import Price, PriceBook, Usage

__version__ = "0.7.0"

__all__ = [
    "GENESIS_HASH",
    "AgentId",
    "AgentNotFound",
    "AgentNotRunning",
    "AgentState",
    "AgentStatus",
    "AsyncBudgetHold",
    "AsyncStateManager",
    "AuditCheckpoint",
    "AuditEvent",
    "AuditRecord",
    "AuditVerification",
    "BackendError",
    "BackendUnavailable",
    "BudgetExceeded",
    "BudgetHold",
    "BudgetNotFound",
    "BudgetState",
    "ConfigurationError",
    "FleetStats",
    "IdError",
    "IdErrorCode",
    "MissingDependency",
    "Price",
    "PriceBook",
    "PricingError",
    "Reservation",
    "ReservationError",
    "SchemaError",
    "SpendRow",
    "StateError",
    "StateManager",
    "StateTypeError",
    "Usage",
    "ValidationError",
    "__version__",
]
