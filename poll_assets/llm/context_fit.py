"""Fitting a judge's prompt into its context window before the call, so no request is sent that
the provider must refuse with a 400 (or a llama.cpp context error).

The rule: when the estimated request (its messages, its schema, and the answer's `max_new_tokens`)
would pass `CONTEXT_SHARE` of the judge's context, the generations shown to it are cut to a
budget: what the context holds once the rest of the prompt and the answer are reserved, shared
fairly (a text shorter than its share keeps all of it, and passes the rest on). Each cut text ends
with a visible marker, and the caller records which texts were cut. Pure functions, no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from poll_assets.llm.base import CallRequest
from poll_assets.llm.tokens import approx_tokens, estimate_tokens

# The token estimate is a rule of thumb (characters / 4, digits one each): keep a tenth of the
# window spare for where a real tokenizer counts more.
CONTEXT_SHARE = 0.9
MARKER = "\n[... cut here by poll-assets: {cut} of {total} characters left out to fit the judge's context ...]"


@dataclass(frozen=True)
class FittedTexts:
    texts: list[str]
    truncated: list[int]  # positions in `texts` that were cut


def cut_to_tokens(text: str, tokens: int) -> str:
    """The longest prefix of `text` within `tokens` (by `approx_tokens`), the marker included."""
    if approx_tokens(text) <= tokens:
        return text
    lo, hi = 0, len(text)
    while lo < hi:  # the longest prefix whose cut version fits
        mid = (lo + hi + 1) // 2
        if approx_tokens(text[:mid] + MARKER.format(cut=len(text) - mid, total=len(text))) <= tokens:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo] + MARKER.format(cut=len(text) - lo, total=len(text))


def fit_texts(texts: Sequence[str], budget_tokens: int) -> FittedTexts:
    """`texts` within `budget_tokens` together: the shortest keep all they have, the others share
    what is left equally."""
    budget = max(0, budget_tokens)
    fitted = list(texts)
    truncated = []
    left = len(texts)
    for i in sorted(range(len(texts)), key=lambda k: approx_tokens(texts[k])):
        share = budget // left
        size = approx_tokens(texts[i])
        if size > share:
            fitted[i] = cut_to_tokens(texts[i], share)
            truncated.append(i)
            size = approx_tokens(fitted[i])
        budget -= size
        left -= 1
    return FittedTexts(fitted, sorted(truncated))


def fit_request(build: Callable[[list[str]], CallRequest], texts: Sequence[str],
                context_tokens: int | None) -> tuple[CallRequest, list[int]]:
    """The request `build` makes of `texts`, with the texts cut to fit `context_tokens` when the
    whole would not; and the positions of the texts cut (empty when nothing was)."""
    request = build(list(texts))
    limit = int(context_tokens * CONTEXT_SHARE) if context_tokens else None
    if limit is None or estimate_tokens(request) <= limit:
        return request, []
    reserved = estimate_tokens(build([""] * len(texts)))  # instructions, schema and the answer's allowance
    fitted = fit_texts(texts, limit - reserved)
    return build(fitted.texts), fitted.truncated
