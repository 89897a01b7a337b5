"""Model prices: defaults, dated model names, overrides, and bad input refused at start."""

from __future__ import annotations

from pathlib import Path

import pytest

from parley.analytics.pricing import PriceTable
from parley.settings import Settings, UnsafeSettings


def test_defaults_longest_prefix_and_builtin_free() -> None:
    prices = PriceTable.load(None, None)
    assert prices.cost("parley-builtin", 10_000, 10_000) == 0.0
    # gpt-4o-mini's price, not gpt-4o's, for a dated mini model.
    assert prices.cost("gpt-4o-mini-2024-07-18", 1_000_000, 1_000_000) == pytest.approx(0.15 + 0.60)
    assert prices.cost("gpt-4o-2024-08-06", 2_000, 1_000) == pytest.approx((2_000 * 2.5 + 1_000 * 10) / 1e6)
    assert prices.cost("some-local-model", 5_000, 5_000) == 0.0


def test_file_then_inline_overrides(tmp_path: Path) -> None:
    file = tmp_path / "prices.json"
    file.write_text('{"local-llama": {"input_per_mtok": 1, "output_per_mtok": 2}, '
                    '"gpt-4o": {"input_per_mtok": 5, "output_per_mtok": 5}}')
    prices = PriceTable.load('{"gpt-4o": {"input_per_mtok": 7, "output_per_mtok": 9}}', file)
    assert prices.cost("local-llama", 1_000_000, 1_000_000) == pytest.approx(3.0)
    assert prices.cost("gpt-4o", 1_000_000, 1_000_000) == pytest.approx(16.0)  # inline wins over the file


@pytest.mark.parametrize("bad", ['{"m": {"input_per_mtok": 1}}', "[1, 2]", "not json", '{"m": {"input_per_mtok": "x", '
                                                                                       '"output_per_mtok": 1}}'])
def test_bad_prices_are_refused_at_start(bad: str, tmp_path: Path) -> None:
    settings = Settings(_env_file=None, data_dir=tmp_path, jwt_secret="x" * 40, model_prices=bad)  # type: ignore[call-arg]
    with pytest.raises(UnsafeSettings, match="model prices"):
        settings.check()
