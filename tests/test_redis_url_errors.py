"""Bad Redis URLs and options: what their errors may show.

A password never appears in an error, through the API or the CLI, even in a URL that does not
parse; an option given twice in a URL is an error; and no error repeats more than 64 characters
of what it was given. No server is needed: every URL here fails before any connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from iron_runtime_state import AsyncStateManager, ConfigurationError, StateManager
from iron_runtime_state.backends.redis import parse_redis_url

typer_testing = pytest.importorskip("typer.testing")

from iron_runtime_state.cli import EXIT_USAGE, app  # noqa: E402

SECRET = "Pa55-s3cr3t-W0rd"

#: The seven URL errors that used to repeat the whole URL, password included.
LEAKING_URLS = [
    pytest.param(f"redis://alice:{SECRET}@127.0.0.1:99999/0", "bad port", id="bad-port"),
    pytest.param(f"redis://alice:{SECRET}@127.0.0.1:6379/zero", "bad database", id="bad-db"),
    pytest.param(f"redis://alice:{SECRET}@[::1:6379/0", "unclosed '['", id="unclosed-bracket"),
    pytest.param(f"redis://alice:{SECRET}@:6379/0", "missing host", id="missing-host"),
    pytest.param(f"unix://alice:{SECRET}@host/tmp/redis.sock", "has a host", id="unix-with-host"),
    pytest.param(f"unix://alice:{SECRET}@", "no socket path", id="unix-without-path"),
    pytest.param(
        f"redis+cluster://alice:{SECRET}@127.0.0.1:7000,127.0.0.1:x", "bad port", id="bad-cluster-port"
    ),
]
#: Passwords written without percent-encoding their special characters, and a password in
#: the query string: the URL does not parse as meant, and still no part of the password shows.
MALFORMED_URLS = [
    pytest.param(f"redis://alice:{SECRET}/x@127.0.0.1:6379/0", id="raw-slash"),
    pytest.param(f"redis://alice:{SECRET}?x@127.0.0.1:6379/0", id="raw-question-mark"),
    pytest.param(f"redis://alice:{SECRET}#x@127.0.0.1:99999/0", id="raw-hash"),
    pytest.param(f"redis://127.0.0.1:99999/0?password={SECRET}", id="password-option"),
    pytest.param(f"redis://127.0.0.1:6379/0?ssl_password={SECRET}&colour=red", id="ssl-password-option"),
    pytest.param(f"http://alice:{SECRET}@127.0.0.1:6379/0", id="not-redis"),
]


def assert_no_secret(text: str) -> None:
    for part in (SECRET, "s3cr3t", "W0rd", "Pa55"):
        assert part not in text, text


@pytest.mark.parametrize(("url", "message"), LEAKING_URLS)
def test_url_errors_never_show_the_password(url: str, message: str) -> None:
    opened: list[Callable[[], object]] = [
        lambda: parse_redis_url(url),
        lambda: StateManager.with_redis(url),
        lambda: StateManager.from_url(url),
        lambda: asyncio.run(AsyncStateManager.from_url(url).close()),
    ]
    for open_store in opened:
        with pytest.raises(ConfigurationError) as info:
            open_store()
        assert message in str(info.value)
        assert "alice:***@" in str(info.value)
        assert_no_secret(str(info.value))
        assert_no_secret(repr(info.value))


@pytest.mark.parametrize("url", MALFORMED_URLS)
def test_malformed_urls_never_show_the_password(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        StateManager.with_redis(url)
    assert_no_secret(str(info.value))


@pytest.mark.parametrize(("url", "message"), [*LEAKING_URLS, pytest.param(None, "", id="twice")])
def test_cli_errors_never_show_the_password(url: str | None, message: str) -> None:
    url = url or f"redis://alice:{SECRET}@127.0.0.1:1/0?namespace=a&namespace=b"
    runner = typer_testing.CliRunner()
    for args in (["stats", "--url", url], ["agents", "--url", url], ["verify", "--url", url]):
        result = runner.invoke(app, args, prog_name="iron-state")
        assert result.exit_code == EXIT_USAGE, (args, result.stdout, result.stderr)
        assert message in result.stderr
        assert_no_secret(result.stdout + result.stderr)


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0?namespace=x&namespace=y",
        "redis://127.0.0.1:6379/0?namespace=x&namespace=x",
        "redis://127.0.0.1:6379/0?timeout=1&timeout=2",
        "redis://127.0.0.1:6379/0?durability=replicated&durability=async",
    ],
)
def test_an_option_given_twice_in_a_url_is_refused(url: str) -> None:
    for open_store in (lambda: StateManager.from_url(url), lambda: parse_redis_url(url)):
        with pytest.raises(ConfigurationError, match="given twice"):
            open_store()


def longest_run(text: str, char: str) -> int:
    """The longest run of ``char`` in ``text``."""
    longest = run = 0
    for c in text:
        run = run + 1 if c == char else 0
        longest = max(longest, run)
    return longest


@pytest.mark.parametrize(
    ("url", "options"),
    [
        pytest.param("redis://h?namespace=" + "a" * 60, {"namespace": "n" * 5000}, id="namespace-twice"),
        pytest.param("redis://h", {"namespace": "n" * 5000}, id="bad-namespace"),
        pytest.param("rediss://h", {"ssl_cert_reqs": "n" * 5000}, id="ssl-cert-reqs"),
        pytest.param("redis://h", {"durability": "n" * 5000}, id="durability"),
        pytest.param("redis://h", {"timeout": "n" * 5000}, id="timeout-text"),
        pytest.param("redis://h", {"timeout": 10**5000}, id="timeout-huge"),
        pytest.param("redis://h", {"db": -(10**5000)}, id="db-huge"),
        pytest.param("redis://h", {"ssl": "n" * 5000}, id="bool"),
        pytest.param("redis://h", {"n" * 5000: 1}, id="unknown-keyword"),
        pytest.param("redis://h?" + "n" * 5000 + "=1", {}, id="unknown-query-option"),
        pytest.param("redis://h:" + "n" * 5000, {}, id="bad-port"),
        pytest.param("redis://h/" + "n" * 5000, {}, id="bad-db"),
        pytest.param("redis://" + "n" * 5000 + ":1,h:2", {}, id="one-host"),
        pytest.param("unix://h" + "n" * 5000, {}, id="unix-host"),
        pytest.param("nnnn" + "n" * 5000, {}, id="not-a-url"),
        pytest.param("redis://h?timeout=1&timeout=" + "n" * 5000, {}, id="given-twice"),
    ],
)
def test_errors_repeat_at_most_64_characters_of_input(url: str, options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError) as info:
        parse_redis_url(url, **options)
    message = str(info.value)
    assert longest_run(message, "n") <= 64, message
    assert longest_run(message, "0") <= 64, message
    assert len(message) < 2000  # the list of accepted options is the longest thing an error holds
