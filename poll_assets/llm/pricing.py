"""What a model's tokens cost, as a panel's `prices:` section states it.

Prompt caching and batch APIs change the price of the same tokens: a price therefore states
multipliers of the input price for tokens read from (and, at Anthropic, written to) the provider's
prompt cache, and the batch discount. Unset multipliers take the provider's published rates
(`Price.for_provider`)."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

# Published rates as multipliers of the online input price (cache read, cache write) and of the online
# price (batch). OpenAI: cached input at half price (some newer models cheaper: override it), no write
# surcharge, Batch API at half price. Anthropic: cache writes 1.25x (5-minute cache), reads 0.1x,
# Message Batches at half price. Other providers state no rates: cached tokens at the full price.
PROVIDER_RATES: dict[str, tuple[float, float, float | None]] = {
    "openai": (0.5, 1.0, 0.5),
    "anthropic": (0.1, 1.25, 0.5),
}
_NO_RATES = (1.0, 1.0, None)


@dataclass
class TokenUsage:
    """Tokens of some calls, as providers bill them. `input_tokens` counts every input token; the
    cache reads and writes are the parts of it the provider's prompt cache served or stored."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0

    def add(self, input_tokens: int, output_tokens: int, cache_read: int = 0, cache_write: int = 0) -> None:
        self.input_tokens += input_tokens
        self.output_tokens += output_tokens
        self.cache_read_tokens += cache_read
        self.cache_write_tokens += cache_write


class Price(BaseModel):
    """US dollars per million input and output tokens."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_per_mtok: float = Field(ge=0, description="US dollars per million input tokens.")
    output_per_mtok: float = Field(ge=0, description="US dollars per million output tokens.")
    # What a batch API charges as a fraction of the online price (OpenAI and Anthropic: 0.5); None = unknown.
    batch_discount: float | None = Field(default=None, gt=0, le=1, description="What a batch API charges as a fraction of the online price; None takes the provider's (openai, anthropic: 0.5).")
    # Input tokens read from / written to the provider's prompt cache, as multiples of input_per_mtok.
    cache_read_multiplier: float | None = Field(default=None, ge=0, le=1, description="Input tokens read from the provider's prompt cache, as a multiple of input_per_mtok; None takes the provider's.")
    cache_write_multiplier: float | None = Field(default=None, ge=1, description="Input tokens written to the provider's prompt cache, as a multiple of input_per_mtok; None takes the provider's.")

    def for_provider(self, provider: str) -> "Price":
        """This price with every unset rate taken from the provider's published ones."""
        read, write, batch = PROVIDER_RATES.get(provider, _NO_RATES)
        return self.model_copy(update={
            "cache_read_multiplier": read if self.cache_read_multiplier is None else self.cache_read_multiplier,
            "cache_write_multiplier": write if self.cache_write_multiplier is None else self.cache_write_multiplier,
            "batch_discount": batch if self.batch_discount is None else self.batch_discount,
        })

    def cost_usd(self, input_tokens: int, output_tokens: int) -> float:
        """Online and uncached: every input token at the input price."""
        return (input_tokens * self.input_per_mtok + output_tokens * self.output_per_mtok) / 1e6

    def batch_cost_usd(self, input_tokens: int, output_tokens: int) -> float | None:
        """The same tokens sent through a batch API; None when the panel states no batch discount."""
        if self.batch_discount is None:
            return None
        return self.cost_usd(input_tokens, output_tokens) * self.batch_discount

    def usage_cost_usd(self, usage: TokenUsage, *, batch: bool = False) -> float:
        """What `usage` costs with its cache reads and writes priced as such, through a batch API when
        `batch` (the discounts stack, as both providers bill them); unset rates count as 1."""
        read = 1.0 if self.cache_read_multiplier is None else self.cache_read_multiplier
        write = 1.0 if self.cache_write_multiplier is None else self.cache_write_multiplier
        plain = usage.input_tokens - usage.cache_read_tokens - usage.cache_write_tokens
        input_cost = (plain + usage.cache_read_tokens * read + usage.cache_write_tokens * write) * self.input_per_mtok
        cost = (input_cost + usage.output_tokens * self.output_per_mtok) / 1e6
        return cost * (self.batch_discount or 1.0) if batch else cost
