"""Model prices, in USD per million input and output tokens, applied to every LLM call.

The defaults are list prices of common hosted models at the time of writing; prices change, so operators
override them with `PARLEY_MODEL_PRICES` (JSON) or `PARLEY_MODEL_PRICES_FILE` (a JSON file of the same shape:
`{"model": {"input_per_mtok": 0.15, "output_per_mtok": 0.6}}`). A dated model name (`gpt-4o-2024-08-06`)
takes the price of its longest listed prefix. The builtin model costs 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from parley.observability.logging import get_logger

log = get_logger("parley.analytics")


@dataclass(frozen=True, slots=True)
class Price:
    input_per_mtok: float
    output_per_mtok: float


DEFAULT_PRICES: dict[str, Price] = {
    "parley-builtin": Price(0.0, 0.0),
    "gpt-4o": Price(2.50, 10.00),
    "gpt-4o-mini": Price(0.15, 0.60),
    "gpt-4.1": Price(2.00, 8.00),
    "gpt-4.1-mini": Price(0.40, 1.60),
    "gpt-4.1-nano": Price(0.10, 0.40),
    "o3-mini": Price(1.10, 4.40),
    "o4-mini": Price(1.10, 4.40),
    "gpt-3.5-turbo": Price(0.50, 1.50),
    "claude-3-5-sonnet": Price(3.00, 15.00),
    "claude-3-5-haiku": Price(0.80, 4.00),
}


class PriceTable:
    def __init__(self, prices: dict[str, Price]) -> None:
        self._prices = dict(prices)
        self._by_length = sorted(self._prices, key=len, reverse=True)
        self._unpriced_seen: set[str] = set()

    @classmethod
    def load(cls, inline_json: str | None, file: Path | None) -> PriceTable:
        """Defaults, then the file's entries, then the inline JSON's (later wins). Bad input raises ValueError."""
        prices = dict(DEFAULT_PRICES)
        if file is not None:
            prices.update(_parse(file.read_bytes(), str(file)))
        if inline_json:
            prices.update(_parse(inline_json.encode(), "PARLEY_MODEL_PRICES"))
        return cls(prices)

    def price_of(self, model: str) -> Price | None:
        if model in self._prices:
            return self._prices[model]
        for name in self._by_length:
            if model.startswith(name):
                return self._prices[name]
        return None

    def cost(self, model: str, input_tokens: int, output_tokens: int) -> float:
        price = self.price_of(model)
        if price is None:
            if model not in self._unpriced_seen and len(self._unpriced_seen) < 1000:
                self._unpriced_seen.add(model)
                log.info("model_has_no_price", model=model, note="its calls are costed at 0; see PARLEY_MODEL_PRICES")
            return 0.0
        return round((input_tokens * price.input_per_mtok + output_tokens * price.output_per_mtok) / 1e6, 10)


def _parse(raw: bytes, source: str) -> dict[str, Price]:
    try:
        data: Any = orjson.loads(raw)
        if not isinstance(data, dict):
            raise TypeError("not an object")
        return {str(model): Price(float(entry["input_per_mtok"]), float(entry["output_per_mtok"]))
                for model, entry in data.items()}
    except (orjson.JSONDecodeError, TypeError, KeyError, ValueError) as exc:
        raise ValueError(f"{source}: expected {{\"model\": {{\"input_per_mtok\": n, \"output_per_mtok\": n}}}}: "
                         f"{exc}") from exc
