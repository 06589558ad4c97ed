"""Choosing a store by URL: the registry, from_url and from_env."""

from __future__ import annotations

import pytest

from iron_runtime_state import ConfigurationError, StateManager, StateTypeError, ValidationError
from iron_runtime_state.backends import SCHEMES
from iron_runtime_state.backends.memory import MemoryBackend


def test_memory_url() -> None:
    with StateManager.from_url("memory://") as manager:
        assert isinstance(manager.backend, MemoryBackend)
        assert manager.url == "memory://"


@pytest.mark.parametrize("url", ["mysql://x", "ftp://host/db", "MONGO://x"])
def test_unknown_scheme_names_the_supported_ones(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        StateManager.from_url(url)
    message = str(info.value)
    assert "unknown store URL scheme" in message
    for spec in SCHEMES.values():
        assert spec.example in message


@pytest.mark.parametrize("url", ["", "memory", "/tmp/x.db", "://x"])
def test_not_a_url(url: str) -> None:
    with pytest.raises(ConfigurationError, match="not a store URL"):
        StateManager.from_url(url)


def test_url_must_be_str() -> None:
    with pytest.raises(StateTypeError):
        StateManager.from_url(b"memory://")  # type: ignore[arg-type]


def test_memory_takes_no_options() -> None:
    with pytest.raises(ConfigurationError, match="no options"):
        StateManager.from_url("memory://", colour="red")


def test_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IRON_STATE_URL", raising=False)
    monkeypatch.delenv("IRON_STATE_AUDIT_KEY", raising=False)
    assert StateManager.from_env().url == "memory://"
    monkeypatch.setenv("IRON_STATE_URL", "nope://x")
    with pytest.raises(ConfigurationError):
        StateManager.from_env()
    monkeypatch.setenv("IRON_STATE_URL", "memory://")
    monkeypatch.setenv("IRON_STATE_AUDIT_KEY", "k" * 32)
    assert StateManager.from_env().url == "memory://"
    monkeypatch.setenv("IRON_STATE_AUDIT_KEY", "short")
    with pytest.raises(ValidationError, match="16 bytes"):
        StateManager.from_env()


def test_backend_argument_is_checked() -> None:
    with pytest.raises(StateTypeError):
        StateManager("memory://")  # type: ignore[arg-type]
