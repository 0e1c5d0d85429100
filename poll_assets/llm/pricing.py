"""What a model's tokens cost, as a panel's `prices:` section states it."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Price(BaseModel):
    """US dollars per million input and output tokens."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_per_mtok: float = Field(ge=0)
    output_per_mtok: float = Field(ge=0)
    # What a batch API charges as a fraction of the online price (OpenAI and Anthropic: 0.5); None = unknown.
    batch_discount: float | None = Field(default=None, gt=0, le=1)

    def cost_usd(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.input_per_mtok + output_tokens * self.output_per_mtok) / 1e6

    def batch_cost_usd(self, input_tokens: int, output_tokens: int) -> float | None:
        """The same tokens sent through a batch API; None when the panel states no batch discount."""
        if self.batch_discount is None:
            return None
        return self.cost_usd(input_tokens, output_tokens) * self.batch_discount
