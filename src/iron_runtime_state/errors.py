"""Every error the library raises on purpose.

Each one derives from :class:`StateError` and, where one fits, from the builtin that an
existing handler would already catch::

    StateError
    ├── IdError(StateError, ValueError)              an agent id that does not parse
    ├── ValidationError(StateError, ValueError)      a value out of range: a negative spend, a bad event
    ├── StateTypeError(StateError, TypeError)        a value of the wrong type: a str where an AgentId goes
    ├── ConfigurationError(StateError, ValueError)   a bad store URL or option
    │   └── MissingDependency(ConfigurationError, ImportError)   an optional extra is not installed
    ├── AgentNotFound(StateError, KeyError)          the agent has no stored state
    ├── AgentNotRunning(StateError)                  spending or reserving on a stopped or failed agent
    ├── BudgetExceeded(StateError)                   the spend or hold would pass the agent's limit
    ├── ReservationError(StateError)                 committing or releasing a hold that is not open
    └── BackendError(StateError)                     the store failed; the driver's error is __cause__
        ├── BackendUnavailable(BackendError, ConnectionError)   the store cannot be reached
        └── SchemaError(BackendError)                the stored data has a layout this version cannot use

A driver's exception (``sqlite3``, ``redis``) never escapes raw: each backend maps it in one
place to a :class:`BackendError`, with the original chained as ``__cause__``.
"""

from __future__ import annotations

import enum

__all__ = [
    "AgentNotFound",
    "AgentNotRunning",
    "BackendError",
    "BackendUnavailable",
    "BudgetExceeded",
    "BudgetNotFound",
    "ConfigurationError",
    "IdError",
    "IdErrorCode",
    "MissingDependency",
    "PricingError",
    "ReservationError",
    "SchemaError",
    "StateError",
    "StateTypeError",
    "ValidationError",
]


class StateError(Exception):
    """Root of every error that iron_runtime_state raises on purpose."""


class IdErrorCode(str, enum.Enum):
    """Why a string is not an :class:`~iron_runtime_state.AgentId`.

    The members compare equal to their names as plain strings (``code == "EMPTY_ID"``).
    """

    EMPTY_ID = "EMPTY_ID"
    INVALID_PREFIX = "INVALID_PREFIX"
    MISSING_UUID = "MISSING_UUID"
    INVALID_UUID = "INVALID_UUID"

    def __str__(self) -> str:
        return self.value


class IdError(StateError, ValueError):
    """A string that is not a valid agent id.

    ``code`` says which rule failed and ``suggestion`` (or ``None``) how to fix the input.
    """

    def __init__(self, message: str, code: IdErrorCode, suggestion: str | None = None) -> None:
        full = message if suggestion is None else f"{message}; {suggestion}"
        super().__init__(full)
        self.code = code
        self.suggestion = suggestion


class ValidationError(StateError, ValueError):
    """A value that has the right type but is out of range or malformed."""


class StateTypeError(StateError, TypeError):
    """A value of the wrong type, such as a ``str`` where an ``AgentId`` is required."""


class ConfigurationError(StateError, ValueError):
    """A store URL or option that cannot be used; the message names the accepted forms."""


class MissingDependency(ConfigurationError, ImportError):
    """A backend needs an optional extra that is not installed; the message names the pip command."""


class AgentNotFound(StateError, KeyError):
    """The agent has no stored state."""

    def __init__(self, agent_id: str) -> None:
        super().__init__(agent_id)
        self.agent_id = agent_id

    def __str__(self) -> str:
        return (
            f"agent {self.agent_id} has no stored state; save one first with "
            "save_agent_state(AgentState(...))"
        )


class AgentNotRunning(StateError):
    """Spending or reserving budget for an agent whose status is not RUNNING."""

    def __init__(self, agent_id: str, status: str, action: str) -> None:
        super().__init__(
            f"cannot {action} for agent {agent_id}: its status is {status!r}, not 'running'; "
            "set_status(agent_id, AgentStatus.RUNNING) first if it should run again"
        )
        self.agent_id = agent_id
        self.status = status


class BudgetExceeded(StateError):
    """A spend or a hold that would take an agent, or a budget scope it draws on, past its limit.

    Nothing was charged anywhere; a ``budget_exceeded`` audit event was written. ``scope`` names
    the budget scope that refused (``None``: the agent's own ``budget_limit``); ``limit``,
    ``spent`` and ``reserved`` are that budget's, at the moment of the check.
    """

    def __init__(
        self,
        agent_id: str,
        limit: float,
        spent: float,
        requested: float,
        reserved: float = 0.0,
        scope: str | None = None,
    ) -> None:
        held = f" with {reserved:g} held by open reservations" if reserved else ""
        if scope is None:
            what, fix = "its budget limit", "raise budget_limit or spend less"
        else:
            what = f"the limit of budget scope {scope!r}"
            fix = f"raise it with set_budget({scope!r}, limit=...) or spend less"
        super().__init__(
            f"agent {agent_id} would pass {what}: {spent:g} spent{held} + "
            f"{requested:g} requested > limit {limit:g}; {fix}"
        )
        self.agent_id = agent_id
        self.limit = limit
        self.spent = spent
        self.requested = requested
        self.reserved = reserved
        self.scope = scope


class BudgetNotFound(StateError, KeyError):
    """A budget scope that was never set (or was removed), named by an agent or a call."""

    def __init__(self, scope: str, agent_id: str | None = None) -> None:
        super().__init__(scope)
        self.scope = scope
        self.agent_id = agent_id

    def __str__(self) -> str:
        who = f"agent {self.agent_id} draws on budget scope" if self.agent_id else "budget scope"
        return (
            f"{who} {self.scope!r}, which does not exist; create it with "
            f"set_budget({self.scope!r}, limit=...) (limit=None tracks spend without a limit), "
            "or remove it from the agent's budget_scopes"
        )


class PricingError(StateError, LookupError):
    """A model call could not be priced: no price is known for ``model``.

    The message names the model and how to give it a price (a ``prices=`` table on the manager,
    a ``default_price=``, or the ``[prices]`` extra for the genai-prices catalogue when the
    catalogue was not consulted: ``catalogue=False``).
    """

    def __init__(self, model: str, detail: str = "", *, catalogue: bool = False) -> None:
        install = (
            "" if catalogue else ", or install iron-runtime-state[prices] for the genai-prices catalogue"
        )
        super().__init__(
            f"no price is known for model {model!r}{detail}; add it to the manager's price table "
            f"(prices={{{model!r}: {{'input': 2.50, 'output': 10.00}}}}, USD per million tokens)"
            f"{' or' if catalogue else ','} set default_price=...{install}"
        )
        self.model = model


class ReservationError(StateError):
    """Committing or releasing a reservation that is not open (settled already, or expired)."""


class BackendError(StateError):
    """The store failed. The driver's own exception is chained as ``__cause__``."""


class BackendUnavailable(BackendError, ConnectionError):
    """The store cannot be reached (server down, network, timeout)."""


class SchemaError(BackendError):
    """The store holds data in a layout this version cannot use (for example, written by a newer one)."""
