"""Fitting a judge's prompt into its context window: pure functions, no provider."""

from __future__ import annotations

from poll_assets.llm.base import CallRequest, GenerationParams
from poll_assets.llm.context_fit import CONTEXT_SHARE, cut_to_tokens, fit_request, fit_texts
from poll_assets.llm.tokens import estimate_tokens
from poll_assets.llm.tokens import approx_tokens


def test_a_cut_text_keeps_a_prefix_within_the_budget_and_says_what_it_left_out():
    text = "word " * 400  # 2,000 characters, 500 tokens by the estimate
    cut = cut_to_tokens(text, 100)
    assert approx_tokens(cut) <= 100 and cut.startswith("word word")
    kept = cut.index("\n[... cut here by poll-assets: ")
    assert f"{len(text) - kept} of {len(text)} characters left out" in cut
    assert cut_to_tokens("short", 100) == "short"


def test_short_texts_keep_everything_and_long_ones_share_the_rest():
    texts = ["a" * 40, "b" * 4000, "c" * 4000]  # 10, 1,000 and 1,000 tokens
    fitted = fit_texts(texts, 610)
    assert fitted.texts[0] == texts[0] and fitted.truncated == [1, 2]
    sizes = [approx_tokens(t) for t in fitted.texts]
    assert sum(sizes) <= 610 and abs(sizes[1] - sizes[2]) <= 1  # the 600 left, shared equally


def test_a_request_is_rebuilt_only_when_it_would_not_fit():
    params = GenerationParams(max_new_tokens=100)

    def build(texts: list[str]) -> CallRequest:
        return CallRequest.build([{"role": "user", "content": "Rate these:\n" + "\n---\n".join(texts)}], params)

    small, cut = fit_request(build, ["x" * 400, "y" * 400], 1000)
    assert cut == [] and small == build(["x" * 400, "y" * 400])
    big, cut = fit_request(build, ["x" * 4000, "y" * 400], 1000)
    assert cut == [0] and estimate_tokens(big) <= 1000 * CONTEXT_SHARE
    assert "y" * 400 in big.messages[0][1]  # the short text is whole
    assert fit_request(build, ["x" * 40000], None)[1] == []  # no window declared: nothing is cut
