"""Prices: prompt-cache and batch rates, the providers' defaults and a panel's overrides."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from poll_assets.llm.pricing import Price, TokenUsage
from poll_assets.llm.online.runner import CallStats
from poll_assets.llm.base import Completion

PRICE = Price(input_per_mtok=10.0, output_per_mtok=40.0)


def test_provider_rates_fill_only_what_the_panel_left_unset():
    anthropic = PRICE.for_provider("anthropic")
    assert (anthropic.cache_read_multiplier, anthropic.cache_write_multiplier, anthropic.batch_discount) == (0.1, 1.25, 0.5)
    openai = Price(input_per_mtok=1, output_per_mtok=2, cache_read_multiplier=0.25).for_provider("openai")
    assert (openai.cache_read_multiplier, openai.cache_write_multiplier, openai.batch_discount) == (0.25, 1.0, 0.5)
    local = PRICE.for_provider("openai_compatible")
    assert (local.cache_read_multiplier, local.batch_discount) == (1.0, None)


def test_cache_reads_writes_and_batch_are_priced_and_stack():
    usage = TokenUsage(input_tokens=1_000_000, output_tokens=100_000, cache_read_tokens=600_000, cache_write_tokens=100_000)
    price = PRICE.for_provider("anthropic")
    online = (300_000 * 10 + 600_000 * 1.0 + 100_000 * 12.5 + 100_000 * 40) / 1e6
    assert price.usage_cost_usd(usage) == pytest.approx(online)
    assert price.usage_cost_usd(usage, batch=True) == pytest.approx(online / 2)
    assert PRICE.cost_usd(usage.input_tokens, usage.output_tokens) == pytest.approx(14.0)  # uncached, online


def test_call_stats_split_batch_from_online_calls_and_price_each():
    stats = CallStats()
    stats.add(Completion(text="a", input_tokens=1000, output_tokens=100, cached_input_tokens=800))
    stats.add(Completion(text="b", input_tokens=1000, output_tokens=100, extra={"batch_id": "batch_1"}))
    stats.add(Completion(text="c", input_tokens=5000, output_tokens=500, cached=True))  # a cache hit is free
    price = PRICE.for_provider("openai")
    assert stats.online_usage.cache_read_tokens == 800 and stats.batch_usage.input_tokens == 1000
    paid = ((200 * 10 + 800 * 5 + 100 * 40) + (1000 * 10 + 100 * 40) * 0.5) / 1e6
    assert stats.paid_usd(price) == pytest.approx(paid)
    assert stats.cost_usd(price) == pytest.approx((2000 * 10 + 200 * 40) / 1e6)


def test_a_multiplier_outside_its_range_is_refused():
    with pytest.raises(ValidationError, match="cache_read_multiplier"):
        Price(input_per_mtok=1, output_per_mtok=1, cache_read_multiplier=2.0)
