"""The verdict parser against composed judge answers (poll_assets_tests/judge_fuzz.py) and against
inputs built to break it: it never misattributes a rating, never raises, and stays within its time
bound for answers up to 1 MB and 10,000-deep nesting. bench/fuzz_verdicts.py runs the same
harness at 100,000 answers."""

from __future__ import annotations

import os
import random
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from poll_assets.rubrics import get_rubric
from poll_assets.verdicts import MAX_ANSWER_CHARS, parse_verdicts
from poll_assets_tests.judge_fuzz import compose, outcomes

RUBRIC = get_rubric("instruction-following")
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "300")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
# Generous for a shared 2-core machine: bench/fuzz_verdicts.py and docs/verdicts.md give the measured figures.
SECONDS_PER_MB = 30.0


def _read(text: str, n: int, structured: bool) -> list[int | None]:
    got = parse_verdicts(text, n, RUBRIC, structured=structured)
    assert len(got) == n
    for v in got:
        assert (v.rating is None and v.error) or v.rating in RUBRIC.ratings
    return [v.rating for v in got]


@FUZZ
@given(st.integers(0, 2**32 - 1))
def test_composed_answers_never_misattribute(seed):
    c = compose(random.Random(seed))
    got = _read(c.text, c.n, c.dims["layout"].startswith("json"))
    outs = outcomes(c, got)
    assert "misattributed" not in outs, (c.dims, c.truth, got, c.text)


def test_unread_share_of_readable_texts_is_at_most_ten_percent():
    rng = random.Random(20)
    counts = {"correct": 0, "unread": 0, "misattributed": 0}
    for _ in range(800):
        c = compose(rng)
        for o in outcomes(c, _read(c.text, c.n, c.dims["layout"].startswith("json"))):
            if o in counts:
                counts[o] += 1
    readable = sum(counts.values())
    assert counts["misattributed"] == 0
    assert readable > 1000
    assert counts["unread"] / readable <= 0.10, counts


def test_outcomes_catch_a_wrong_rating():
    """The harness can fail: a rating moved to another text is counted as misattributed."""
    rng = random.Random(3)
    c = next(c for c in (compose(rng) for _ in range(200)) if not any(c.ambiguous) and len(set(filter(None, c.truth))) > 1)
    moved = c.truth[1:] + c.truth[:1]
    assert "misattributed" in outcomes(c, moved)
    assert outcomes(c, None) == ["crashed"] * c.n


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=3000), st.integers(1, 6), st.booleans())
def test_random_bytes_never_raise(raw, n, structured):
    _read(raw.decode("latin-1"), n, structured)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list('[]{}()"\\:,<>/ \n0123456789abtexrting_')), max_size=3000), st.booleans())
def test_bracket_soup_never_raises(text, structured):
    _read(text, 3, structured)


_DEEP = {
    "brackets": "[" * 10_000,
    "braces": '{"a":' * 10_000,
    "parens": "(" * 10_000,
    "quoted_brackets": '"[' * 10_000,
    "mixed": '[{("' * 10_000,
    "closed_deep_json": '{"text_1": ' + "[" * 10_000 + "4" + "]" * 10_000 + "}",
    "deep_then_answer": "[" * 10_000 + "\n#### Output for Text 1\nRating: 4",
}


@pytest.mark.parametrize("name", sorted(_DEEP))
def test_ten_thousand_deep_nesting_is_unread_not_raised(name):
    start = time.perf_counter()
    for structured in (False, True):
        got = _read(_DEEP[name], 2, structured)
    assert time.perf_counter() - start < SECONDS_PER_MB
    if name == "deep_then_answer":
        assert got[0] == 4  # the deep garbage costs nothing to the answer after it
    else:
        assert got == [None, None]


def _megabyte(kind: str) -> str:
    rng = random.Random(kind)
    if kind == "random_bytes":
        return rng.randbytes(1_000_000).decode("latin-1")
    if kind == "truncated_json":
        return '{"text_1": {"rating": 4, "rationale": "' + "[{" * 500_000
    if kind == "long_rationale":
        return "#### Output for Text 1\nRating: 4\nRationale: " + "word " * 200_000 + "\n#### Output for Text 2\nRating: 2"
    if kind == "many_lines":
        return "Rating: 3\n" * 100_000
    return "{ " * 500_000  # open_braces


@pytest.mark.parametrize("kind", ["random_bytes", "truncated_json", "long_rationale", "many_lines", "open_braces"])
def test_one_megabyte_answers_stay_within_the_bound(kind):
    text = _megabyte(kind)
    assert len(text) >= 1_000_000
    start = time.perf_counter()
    for structured in (False, True):
        got = _read(text, 2, structured)
    assert time.perf_counter() - start < 2 * SECONDS_PER_MB
    if kind == "long_rationale":
        assert got == [4, 2]


def test_answers_over_the_cap_are_unread_with_the_reason():
    got = parse_verdicts("#### Output for Text 1\nRating: 4\n" + " " * MAX_ANSWER_CHARS, 1, RUBRIC, structured=False)
    assert got[0].rating is None and "too long" in got[0].error
