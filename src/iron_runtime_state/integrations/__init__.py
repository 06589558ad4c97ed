"""Hooks that meter the LLM clients agents use, each an optional extra.

- :mod:`iron_runtime_state.integrations.openai` (extra ``[openai]``): ``metered(client, manager,
  agent_id)`` wraps an ``openai.OpenAI`` or ``openai.AsyncOpenAI`` client so that each
  chat-completions call holds its worst case, then commits the usage the reply reports.
- :mod:`iron_runtime_state.integrations.langchain` (extra ``[langchain]``): callback handlers that
  do the same for any ``langchain-core`` chat model.

Both estimate a prompt's tokens without a tokenizer (:func:`estimate_input_tokens`), raise
:class:`~iron_runtime_state.BudgetExceeded` before anything is sent when the hold is refused,
and release the hold when the call fails or is cancelled. See docs/metering.md.
"""

from __future__ import annotations

from ._calls import (
    ATTACHMENT_TOKENS,
    CHARS_PER_TOKEN,
    DEFAULT_CALL_TTL,
    DEFAULT_MAX_OUTPUT_TOKENS,
    MESSAGE_OVERHEAD,
    REPLY_OVERHEAD,
    estimate_input_tokens,
    estimate_text_tokens,
)

__all__ = [
    "ATTACHMENT_TOKENS",
    "CHARS_PER_TOKEN",
    "DEFAULT_CALL_TTL",
    "DEFAULT_MAX_OUTPUT_TOKENS",
    "MESSAGE_OVERHEAD",
    "REPLY_OVERHEAD",
    "estimate_input_tokens",
    "estimate_text_tokens",
]
