"""Prices per million tokens, token usage and the price book (pricing.py)."""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import pytest

from iron_runtime_state.errors import PricingError, StateTypeError, ValidationError
from iron_runtime_state.pricing import MAX_TOKENS, Price, PriceBook, Usage, catalogue_installed

TABLE: dict[str, Mapping[str, Any]] = {
    "house-model": {"input": "0.15", "output": 0.60, "cached_input": Decimal("0.075")},
    "gpt-4o": {"input": 1, "output": 2},  # overrides the catalogue's 2.50 / 10.00
}

needs_catalogue = pytest.mark.skipif(not catalogue_installed(), reason="genai-prices is not installed")


def test_a_price_is_exact_decimals_per_million_tokens() -> None:
    price = Price.of({"input": 0.1, "output": "10", "cached_input": 0})
    assert price == Price(Decimal("0.1"), Decimal(10), Decimal(0))  # a float by its shortest form
    assert Price.of(price) is price
    assert Price(1, 2).cached_input is None
    assert Price.of(price.to_dict()) == price
    assert Price("1.0000000000004", 1).input == Decimal("1")  # kept to 12 places (half to even)


def test_the_cost_is_exact_and_rounded_up_to_a_micro_unit() -> None:
    book = PriceBook(TABLE, catalog=False)
    # (1000 - 200) * 0.15 + 200 * 0.075 + 500 * 0.60 micro-units
    assert book.cost_micros("house-model", 1000, 500, 200) == 435
    assert book.cost("house-model", 1000, 500, 200) == Decimal("0.000435")
    assert book.cost("house-model", 1, 0) == Decimal("0.000001")  # 0.15 micro-units, rounded up
    assert book.cost_micros("house-model", 0, 0) == 0
    assert book.cost_micros("house-model", 3, 0) == 1  # 0.45
    assert book.cost_micros("house-model", 7, 0) == 2  # 1.05: up, never to nearest
    assert book.cost("gpt-4o", 1_000_000, 1_000_000) == Decimal(3)
    # A million calls of one token each cost what they say, not a float's sum of them.
    assert sum(book.cost_micros("gpt-4o", 1, 0) for _ in range(1000)) == 1000
    third = PriceBook({"m": Price("0.333333333333", "0")}, catalog=False)
    assert third.cost_micros("m", 3_000_000, 0) == 1_000_000  # 999_999.999999 up to 1_000_000


def test_cached_tokens_cost_the_cached_price_or_the_input_price() -> None:
    book = PriceBook({"a": {"input": 2, "output": 0, "cached_input": 1}, "b": {"input": 2, "output": 0}})
    assert book.cost_micros("a", 100, 0, 100) == 100
    assert book.cost_micros("a", 100, 0, 40) == 60 * 2 + 40
    assert book.cost_micros("b", 100, 0, 40) == 200  # no cached price: cached tokens cost input
    with pytest.raises(ValidationError, match="cannot exceed input_tokens"):
        book.cost_micros("a", 10, 0, 11)


def test_the_table_overrides_and_extends_the_catalogue() -> None:
    book = PriceBook(TABLE)
    assert book.cost("gpt-4o", 1_000_000, 0) == Decimal(1)
    assert book.cost("house-model", 1_000_000, 0) == Decimal("0.15")
    assert book.price("gpt-4o") == Price(1, 2)
    assert book.price("claude-3-5-sonnet") is None  # price() is the user's table only
    assert dict(book.prices) == {name: Price.of(p) for name, p in TABLE.items()}


@needs_catalogue
def test_the_catalogue_prices_known_models() -> None:
    book = PriceBook()
    assert book.catalog
    assert book.cost("gpt-4o", 1_000_000, 1_000_000) == Decimal("12.5")
    # Cache reads are inside input_tokens for the catalogue too: 500k at 2.50, 500k at 1.25.
    assert book.cost("gpt-4o", 1_000_000, 0, 500_000) == Decimal("1.875")
    assert book.cost("gpt-4o-2024-08-06", 1_000_000, 0) == Decimal("2.5")  # dated snapshot names
    assert book.cost("claude-3-5-sonnet", 1000, 1000) == Decimal("0.018")
    assert book.cost("openai/gpt-4o-mini", 1_000_000, 0) == Decimal("0.15")  # provider/model
    assert book.cost_micros("gpt-4o-mini", 1, 0) == 1  # 0.15 micro-units, rounded up


@needs_catalogue
def test_the_catalogue_knows_tiered_prices() -> None:
    book = PriceBook()
    # Claude Sonnet 4.5 doubles its input price past 200k prompt tokens.
    small = book.cost("claude-sonnet-4-5", 100_000, 0)
    large = book.cost("claude-sonnet-4-5", 300_000, 0)
    assert large > 3 * small


def test_an_unknown_model_is_a_pricing_error_naming_it() -> None:
    for book in (PriceBook(TABLE), PriceBook(TABLE, catalog=False)):
        with pytest.raises(PricingError, match="no-such-model-xyz") as caught:
            book.cost("no-such-model-xyz", 10, 10)
        assert caught.value.model == "no-such-model-xyz"
        assert "prices=" in str(caught.value)
        assert "default_price" in str(caught.value)
        assert isinstance(caught.value, LookupError)


def test_a_default_price_prices_every_other_model() -> None:
    book = PriceBook(TABLE, default={"input": 10, "output": 20}, catalog=False)
    assert book.cost_micros("anything-else", 10, 10) == 300
    assert book.cost_micros("house-model", 1000, 0) == 150  # the table first
    assert book.default == Price(10, 20)


@needs_catalogue
def test_the_catalogue_comes_before_the_default() -> None:
    book = PriceBook(default={"input": 1000, "output": 1000})
    assert book.cost("gpt-4o", 1_000_000, 0) == Decimal("2.5")
    assert book.cost_micros("no-such-model-xyz", 1, 0) == 1000


def test_the_table_works_without_the_catalogue() -> None:
    book = PriceBook(TABLE, catalog=False)
    assert not book.catalog
    assert book.cost("gpt-4o", 1_000_000, 0) == Decimal(1)
    with pytest.raises(PricingError, match="claude-3-5-sonnet"):
        book.cost("claude-3-5-sonnet", 1, 1)  # known to the catalogue, which is left out


def test_price_book_of_a_manager_s_arguments() -> None:
    book = PriceBook(TABLE)
    assert PriceBook.of(book) is book
    assert PriceBook.of(None).prices == {}
    assert PriceBook.of(TABLE, {"input": 1, "output": 1}).default == Price(1, 1)
    with pytest.raises(ValidationError, match="PriceBook"):
        PriceBook.of(book, {"input": 1, "output": 1})


@pytest.mark.parametrize(
    ("price", "error"),
    [
        ({"input": -1, "output": 1}, ValidationError),
        ({"input": "nan", "output": 1}, ValidationError),
        ({"input": float("inf"), "output": 1}, ValidationError),
        ({"input": 1, "output": "1e7"}, ValidationError),  # per MILLION tokens: 10 per token
        ({"input": 1}, ValidationError),
        ({"input": 1, "output": 1, "cache": 1}, ValidationError),
        ({"input": "abc", "output": 1}, ValidationError),
        ({"input": None, "output": 1}, StateTypeError),
        ({"input": True, "output": 1}, StateTypeError),
        ([1, 2], StateTypeError),
        (2.5, StateTypeError),
    ],
)
def test_bad_prices_are_refused(price: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        PriceBook({"m": price})  # type: ignore[dict-item]
    with pytest.raises(error):
        PriceBook(default=price)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("model", "error"),
    [
        ("", ValidationError),
        ("  ", ValidationError),
        ("a\nb", ValidationError),
        ("x" * 257, ValidationError),
        (None, StateTypeError),
        (4, StateTypeError),
        (b"gpt-4o", StateTypeError),
    ],
)
def test_bad_model_names_are_refused(model: object, error: type[Exception]) -> None:
    book = PriceBook(default={"input": 1, "output": 1})
    with pytest.raises(error):
        book.cost(model, 1, 1)  # type: ignore[arg-type]
    with pytest.raises(error):
        book.price(model)  # type: ignore[arg-type]
    with pytest.raises(error):
        PriceBook({model: {"input": 1, "output": 1}})  # type: ignore[dict-item]


@pytest.mark.parametrize(
    ("tokens", "error"),
    [
        ((-1, 0, 0), ValidationError),
        ((0, -1, 0), ValidationError),
        ((1, 0, 2), ValidationError),
        ((MAX_TOKENS + 1, 0, 0), ValidationError),
        ((1.0, 0, 0), StateTypeError),
        ((True, 0, 0), StateTypeError),
        ((1, "2", 0), StateTypeError),
        ((1, 2, None), StateTypeError),
    ],
)
def test_bad_token_counts_are_refused(tokens: tuple[object, object, object], error: type[Exception]) -> None:
    book = PriceBook(default={"input": 1, "output": 1})
    with pytest.raises(error):
        book.cost_micros("m", *tokens)  # type: ignore[arg-type]
    with pytest.raises(error):
        Usage("m", *tokens)  # type: ignore[arg-type]


def test_the_largest_counts_are_exact() -> None:
    book = PriceBook({"m": {"input": "0.000000000001", "output": 1_000_000}}, catalog=False)
    assert book.cost_micros("m", MAX_TOKENS, 0) == 9008  # 2**53 - 1 picounits, up
    assert book.cost_micros("m", 0, MAX_TOKENS) == MAX_TOKENS * 1_000_000


def test_usage_of_openai_and_langchain_shapes() -> None:
    assert Usage.of({"model": "m", "input_tokens": 10, "output_tokens": 2}) == Usage("m", 10, 2)
    openai_usage = SimpleNamespace(
        prompt_tokens=100, completion_tokens=20, prompt_tokens_details=SimpleNamespace(cached_tokens=64)
    )
    assert Usage.of(openai_usage, model="gpt-4o") == Usage("gpt-4o", 100, 20, 64)
    assert Usage.of(
        {"prompt_tokens": 5, "completion_tokens": 1, "prompt_tokens_details": None}, model="m"
    ) == Usage("m", 5, 1)
    langchain_usage = {
        "input_tokens": 50,
        "output_tokens": 5,
        "total_tokens": 55,
        "input_token_details": {"cache_read": 30},
    }
    assert Usage.of(langchain_usage, model="m") == Usage("m", 50, 5, 30)
    usage = Usage("m", 1, 1)
    assert Usage.of(usage) is usage
    assert Usage.of({"model": "own", "input_tokens": 1, "output_tokens": 1}, model="other").model == "own"


def test_bad_usage_is_refused() -> None:
    with pytest.raises(ValidationError, match="model"):
        Usage.of({"input_tokens": 1, "output_tokens": 1})
    with pytest.raises(ValidationError, match="input_tokens"):
        Usage.of({"output_tokens": 1}, model="m")
    with pytest.raises(StateTypeError):
        Usage.of(None, model="m")
    with pytest.raises(StateTypeError):
        Usage.of("10 tokens", model="m")
    with pytest.raises(ValidationError, match="cannot exceed"):
        Usage.of({"input_tokens": 1, "output_tokens": 1, "cached_input_tokens": 2}, model="m")
    with pytest.raises(StateTypeError):
        Usage.of({"input_tokens": 1.5, "output_tokens": 1}, model="m")
    with pytest.raises(ValidationError):
        Usage.of({"input_tokens": 1, "output_tokens": 1}, model="")
