"""What a model call costs: prices per million tokens, token usage, and the price book (no I/O).

A :class:`PriceBook` prices a call from its model and token counts. It looks the model up, in
this order:

1. the user's price table (``{"gpt-4o": {"input": 2.50, "output": 10.00}}``, USD, or whatever
   unit the budgets count, per million tokens), which overrides and extends
2. the catalogue of the ``genai-prices`` package (extra ``[prices]``), when installed: it knows
   the models of the main providers under their providers' names, tiered prices and cache
   prices, and how prices changed over time;
3. the ``default`` price, if one was given;

and raises :class:`~iron_runtime_state.errors.PricingError`, naming the model, when none of them
knows it. The table alone serves without the extra.

Token counts follow OpenAI's convention: ``input_tokens`` counts every prompt token, the cached
ones included, and ``cached_input_tokens`` says how many of them were read from the provider's
prompt cache (so ``cached_input_tokens <= input_tokens``). A call then costs::

    (input_tokens - cached_input_tokens) * input + cached_input_tokens * cached_input
        + output_tokens * output                                  (per million tokens)

rounded UP to a whole micro-unit (a millionth of a unit): a budget never undercounts a call.
Prices are kept to 12 decimal places, so the arithmetic is exact integers throughout.
"""

from __future__ import annotations

import decimal
import functools
import importlib
import math
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from types import MappingProxyType, ModuleType
from typing import Any, Final

from .errors import PricingError, StateTypeError, ValidationError
from .money import MICROS_PER_UNIT, to_decimal

__all__ = [
    "MAX_MODEL_NAME",
    "MAX_PRICE",
    "MAX_TOKENS",
    "Price",
    "PriceBook",
    "Usage",
    "check_model",
    "check_tokens",
]

#: The longest model name accepted (provider paths such as ``accounts/x/models/y`` included).
MAX_MODEL_NAME: Final = 256
#: Token counts are below 2**53, so they survive JSON and every store's numbers exactly.
MAX_TOKENS: Final = 2**53 - 1
#: The highest price accepted per million tokens (a unit per token), which bounds every cost.
MAX_PRICE: Final = Decimal(1_000_000)
#: Prices are kept to this many decimal places (finer digits are rounded half to even).
PRICE_PLACES: Final = 12
_PRICE_QUANTUM: Final = Decimal(1).scaleb(-PRICE_PLACES)
_SCALE: Final = 10**PRICE_PLACES
_PRICE_KEYS: Final = frozenset({"input", "output", "cached_input"})


def check_model(value: object, what: str = "model") -> str:
    """``value`` if it is a model name: a str of 1 to 256 characters without control characters."""
    if not isinstance(value, str):
        raise StateTypeError(f"{what} must be a str such as 'gpt-4o', got {type(value).__name__}")
    if not value or not value.strip():
        raise ValidationError(f"{what} must name a model, such as 'gpt-4o'; got an empty name")
    if len(value) > MAX_MODEL_NAME:
        raise ValidationError(
            f"{what} is {len(value)} characters long; at most {MAX_MODEL_NAME} are allowed "
            f"(got {value[:64]!r}...)"
        )
    # isprintable() is False for every control character (and a few other kinds): the
    # character scan runs only for the rare name it does not clear.
    if not value.isprintable() and any(unicodedata.category(c) == "Cc" for c in value):
        raise ValidationError(f"{what} {value[:64]!r} holds control characters; remove them")
    return value


def check_tokens(value: object, what: str) -> int:
    """``value`` if it is a token count: an ``int`` (not a ``bool``) from 0 to 2**53 - 1."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise StateTypeError(f"{what} must be an int count of tokens, got {type(value).__name__}")
    if not 0 <= value <= MAX_TOKENS:
        raise ValidationError(f"{what} must be from 0 to 2**53 - 1, got {value}")
    return value


def _check_cached(cached_input_tokens: int, input_tokens: int) -> None:
    if cached_input_tokens > input_tokens:
        raise ValidationError(
            f"cached_input_tokens ({cached_input_tokens}) cannot exceed input_tokens ({input_tokens}): "
            "input_tokens counts every prompt token, the cached ones included (OpenAI's convention); "
            "pass their sum as input_tokens if your provider counts them apart"
        )


def _price_value(value: object, what: str) -> Decimal:
    amount = to_decimal(value, what)
    if amount < 0:
        raise ValidationError(f"{what} must be >= 0 (per million tokens), got {str(value)[:64]!r}")
    if amount > MAX_PRICE:
        raise ValidationError(
            f"{what} must be at most {MAX_PRICE} per million tokens, got {str(value)[:64]!r}; "
            "prices are per MILLION tokens (gpt-4o's input is 2.50)"
        )
    quantized = amount.quantize(_PRICE_QUANTUM, rounding=decimal.ROUND_HALF_EVEN)
    return quantized.normalize() if quantized else Decimal(0)


@dataclass(frozen=True, slots=True, init=False)
class Price:
    """What a model's tokens cost, in budget units (USD for the catalogue) per million tokens.

    ``cached_input`` prices prompt tokens read from the provider's cache; ``None`` prices them
    as ``input``. Each price is a number (``int``, ``float``, ``Decimal`` or numeric ``str``)
    from 0 to :data:`MAX_PRICE`, kept as a ``Decimal`` to 12 decimal places.
    """

    input: Decimal
    output: Decimal
    cached_input: Decimal | None

    def __init__(
        self,
        input: Decimal | float | str,  # the name users write in price tables
        output: Decimal | float | str,
        cached_input: Decimal | float | str | None = None,
    ) -> None:
        object.__setattr__(self, "input", _price_value(input, "Price.input"))
        object.__setattr__(self, "output", _price_value(output, "Price.output"))
        cached = None if cached_input is None else _price_value(cached_input, "Price.cached_input")
        object.__setattr__(self, "cached_input", cached)

    @classmethod
    def of(cls, value: object, what: str = "price") -> Price:
        """``value`` as a :class:`Price`: a ``Price``, or a mapping with the keys ``input``,
        ``output`` and optionally ``cached_input`` (numbers or numeric strings)."""
        if isinstance(value, Price):
            return value
        if not isinstance(value, Mapping):
            raise StateTypeError(
                f"{what} must be a Price or a mapping such as {{'input': 2.50, 'output': 10.00}} "
                f"(per million tokens), got {type(value).__name__}"
            )
        unknown = sorted(str(k)[:40] for k in value if k not in _PRICE_KEYS)
        if unknown or "input" not in value or "output" not in value:
            raise ValidationError(
                f"{what} must have the keys 'input' and 'output' (and optionally 'cached_input'), "
                f"per million tokens; got the keys {sorted(str(k)[:40] for k in value)}"
            )
        return cls(value["input"], value["output"], value.get("cached_input"))

    def cost_micros(self, input_tokens: int, output_tokens: int, cached_input_tokens: int = 0) -> int:
        """The exact cost of a call at this price in micro-units, rounded up (counts checked)."""
        check_tokens(input_tokens, "input_tokens")
        check_tokens(output_tokens, "output_tokens")
        check_tokens(cached_input_tokens, "cached_input_tokens")
        _check_cached(cached_input_tokens, input_tokens)
        cached = self.input if self.cached_input is None else self.cached_input
        # A price P per million tokens makes a token cost P micro-units; prices have at most
        # PRICE_PLACES decimals, so scaled by 10**PRICE_PLACES they are exact integers.
        scaled = (
            (input_tokens - cached_input_tokens) * int(self.input.scaleb(PRICE_PLACES))
            + cached_input_tokens * int(cached.scaleb(PRICE_PLACES))
            + output_tokens * int(self.output.scaleb(PRICE_PLACES))
        )
        return -(-scaled // _SCALE)

    def to_dict(self) -> dict[str, str]:
        """The price as a JSON-ready mapping (``Price.of`` reads it back)."""
        out = {"input": str(self.input), "output": str(self.output)}
        if self.cached_input is not None:
            out["cached_input"] = str(self.cached_input)
        return out


def _field(value: object, key: str) -> object:
    """``value[key]`` of a mapping, or ``value.key`` of an object (``None`` when absent)."""
    if isinstance(value, Mapping):
        return value.get(key)
    return getattr(value, key, None)


def _first(value: object, *keys: str) -> object:
    for key in keys:
        found = _field(value, key)
        if found is not None:
            return found
    return None


@dataclass(frozen=True, slots=True)
class Usage:
    """The tokens one model call used: ``input_tokens`` counts every prompt token, the cached
    ones included (OpenAI's convention), and ``cached_input_tokens`` those read from the cache."""

    model: str
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int = 0

    def __post_init__(self) -> None:
        check_model(self.model, "Usage.model")
        check_tokens(self.input_tokens, "Usage.input_tokens")
        check_tokens(self.output_tokens, "Usage.output_tokens")
        check_tokens(self.cached_input_tokens, "Usage.cached_input_tokens")
        _check_cached(self.cached_input_tokens, self.input_tokens)

    @classmethod
    def of(cls, value: object, model: str | None = None) -> Usage:
        """``value`` as a :class:`Usage`.

        ``value`` is a ``Usage``, or a mapping (or an object with the same attributes, such as
        an OpenAI ``CompletionUsage``) with ``input_tokens`` / ``output_tokens`` /
        ``cached_input_tokens``, or OpenAI's ``prompt_tokens`` / ``completion_tokens`` /
        ``prompt_tokens_details.cached_tokens``, or LangChain's ``input_token_details.cache_read``.
        ``model`` names the model when ``value`` does not.
        """
        if isinstance(value, Usage):
            return value
        if value is None or isinstance(value, (str, bytes, int, float)):
            raise StateTypeError(
                "usage must be a Usage or a mapping such as {'input_tokens': 1200, 'output_tokens': 300}, "
                f"got {type(value).__name__}"
            )
        found_model = _field(value, "model")
        name = found_model if found_model is not None else model
        if name is None:
            raise ValidationError("usage names no model: pass model='...' or include a 'model' key")
        input_tokens = _first(value, "input_tokens", "prompt_tokens")
        output_tokens = _first(value, "output_tokens", "completion_tokens")
        if input_tokens is None or output_tokens is None:
            raise ValidationError(
                "usage must give input_tokens and output_tokens (or OpenAI's prompt_tokens and "
                "completion_tokens)"
            )
        cached = _first(value, "cached_input_tokens")
        if cached is None:
            cached = _field(_field(value, "prompt_tokens_details"), "cached_tokens")
        if cached is None:
            cached = _field(_field(value, "input_token_details"), "cache_read")
        return cls(
            model=name,  # type: ignore[arg-type]  # checked by __post_init__
            input_tokens=input_tokens,  # type: ignore[arg-type]
            output_tokens=output_tokens,  # type: ignore[arg-type]
            cached_input_tokens=0 if cached is None else cached,  # type: ignore[arg-type]
        )


@functools.cache
def _genai_prices() -> ModuleType | None:
    """The ``genai_prices`` module, imported on first use; ``None`` when it is not installed."""
    try:
        return importlib.import_module("genai_prices")
    except ImportError:
        return None


def catalogue_installed() -> bool:
    """Whether the genai-prices catalogue (extra ``[prices]``) can be used."""
    return _genai_prices() is not None


class PriceBook:
    """Prices model calls from a user price table, the genai-prices catalogue and a default.

    ``prices`` maps model names (matched exactly) to a :class:`Price` or a mapping such as
    ``{"input": 2.50, "output": 10.00, "cached_input": 1.25}`` per million tokens; it overrides
    and extends the catalogue. ``catalog=False`` leaves the catalogue out even when installed.
    ``default`` prices every model that neither knows. Immutable, so safe to share by threads.
    """

    __slots__ = ("_catalog", "_default", "_prices")

    def __init__(
        self,
        prices: Mapping[str, Price | Mapping[str, Any]] | None = None,
        *,
        default: Price | Mapping[str, Any] | None = None,
        catalog: bool = True,
    ) -> None:
        if prices is None:
            prices = {}
        if not isinstance(prices, Mapping):
            raise StateTypeError(
                "prices must be a mapping of model name to price, such as "
                f"{{'gpt-4o': {{'input': 2.50, 'output': 10.00}}}}, got {type(prices).__name__}"
            )
        table = {
            check_model(model, "a model name in prices"): Price.of(price, f"prices[{str(model)[:64]!r}]")
            for model, price in prices.items()
        }
        if not isinstance(catalog, bool):
            raise StateTypeError(f"catalog must be True or False, got {type(catalog).__name__}")
        self._prices: Mapping[str, Price] = MappingProxyType(table)
        self._default = None if default is None else Price.of(default, "default price")
        self._catalog = catalog

    @classmethod
    def of(cls, prices: object = None, default: object = None) -> PriceBook:
        """A price book from a manager's ``prices=`` (a ``PriceBook``, a mapping or ``None``) and
        ``default_price=``."""
        if isinstance(prices, PriceBook):
            if default is not None:
                raise ValidationError(
                    "pass default_price=None with a PriceBook: give the default to PriceBook(default=...)"
                )
            return prices
        return cls(prices, default=default, catalog=True)  # type: ignore[arg-type]  # checked inside

    @property
    def prices(self) -> Mapping[str, Price]:
        """The user's price table (read-only)."""
        return self._prices

    @property
    def default(self) -> Price | None:
        """The price of models that neither the table nor the catalogue knows, or ``None``."""
        return self._default

    @property
    def catalog(self) -> bool:
        """Whether models missing from the table are looked up in the genai-prices catalogue
        (asked for and installed)."""
        return self._catalog and catalogue_installed()

    def price(self, model: str) -> Price | None:
        """The user table's price of ``model`` (``None`` when the table does not list it)."""
        return self._prices.get(check_model(model))

    def cost_micros(
        self, model: str, input_tokens: int, output_tokens: int, cached_input_tokens: int = 0
    ) -> int:
        """The cost of a call in whole micro-units: its exact cost rounded up."""
        check_model(model)
        check_tokens(input_tokens, "input_tokens")
        check_tokens(output_tokens, "output_tokens")
        check_tokens(cached_input_tokens, "cached_input_tokens")
        _check_cached(cached_input_tokens, input_tokens)
        price = self._prices.get(model)
        if price is not None:
            return price.cost_micros(input_tokens, output_tokens, cached_input_tokens)
        module = _genai_prices() if self._catalog else None
        if module is not None:
            total = _catalogue_cost(module, model, input_tokens, output_tokens, cached_input_tokens)
            if total is not None:
                # The catalogue's Decimal total, exactly, then up to a whole micro-unit.
                return math.ceil(Fraction(total) * MICROS_PER_UNIT)
        if self._default is not None:
            return self._default.cost_micros(input_tokens, output_tokens, cached_input_tokens)
        if not self._catalog:
            detail = " in the price table"
        elif module is None:
            detail = " in the price table (genai-prices, the catalogue, is not installed)"
        else:
            detail = " in the price table or the genai-prices catalogue"
        raise PricingError(model, detail, catalogue=module is not None)

    def cost(
        self, model: str, input_tokens: int, output_tokens: int, cached_input_tokens: int = 0
    ) -> Decimal:
        """The cost of a call, exactly: :meth:`cost_micros` as a ``Decimal`` of budget units."""
        return Decimal(self.cost_micros(model, input_tokens, output_tokens, cached_input_tokens)).scaleb(-6)

    def usage_cost_micros(self, usage: Usage) -> int:
        """:meth:`cost_micros` of a :class:`Usage`."""
        return self.cost_micros(
            usage.model, usage.input_tokens, usage.output_tokens, usage.cached_input_tokens
        )

    def __repr__(self) -> str:
        default = "" if self._default is None else f", default={self._default!r}"
        return f"PriceBook({len(self._prices)} prices{default}, catalog={self.catalog})"


def _catalogue_cost(
    module: ModuleType, model: str, input_tokens: int, output_tokens: int, cached_input_tokens: int
) -> Decimal | None:
    """The catalogue's total for a call, or ``None`` when it does not know the model.

    A name the catalogue does not match as a whole is tried once more as ``provider/model``
    (``openai/gpt-4o``, as LiteLLM and OpenRouter write them).
    """
    # genai-prices counts cache reads inside input_tokens too, so the counts pass as they are.
    usage = module.Usage(
        input_tokens=input_tokens, output_tokens=output_tokens, cache_read_tokens=cached_input_tokens
    )
    attempts: list[tuple[str, str | None]] = [(model, None)]
    provider, _, name = model.partition("/")
    if provider and name:
        attempts.append((name, provider))
    for ref, provider_id in attempts:
        try:
            calculation = module.calc_price(usage, ref, provider_id=provider_id)
        except LookupError:
            continue
        except Exception as exc:  # the package's own failure must not escape raw
            raise PricingError(model, f" (genai-prices failed to price it: {str(exc)[:200]})") from exc
        total = calculation.total_price
        return total if isinstance(total, Decimal) else Decimal(str(total))
    return None
