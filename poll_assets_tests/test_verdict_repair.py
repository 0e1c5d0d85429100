"""The pure parts of the repair re-ask: the repair conversation, merging, and parse-failure counts."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poll_assets.panel import Judging
from poll_assets.rubrics import build_judge_messages, build_repair_messages, get_rubric, verdict_json_schema
from poll_assets.verdicts import (
    NA,
    Verdict,
    failure_reason,
    merge_repair,
    parse_failure_rate,
    parse_failures_by_reason,
    parse_verdicts,
    repair_summary,
    unread_texts,
)

RUBRIC = get_rubric("instruction-following")
TEXTS = ["Drops on the roof.", "Rain, rain.", "A haiku about snow."]
FIRST = (
    "#### Output for Text 1\nRating: 4\nRationale: Fine.\n\n"
    "#### Output for Text 2\nRating: 3\nRating: 5\nRationale: Undecided.\n"
)


def test_repair_conversation_names_the_unread_texts_and_the_format():
    messages = build_judge_messages(RUBRIC, "Write a poem about rain.", TEXTS, structured=False)
    first = parse_verdicts(FIRST, 3, RUBRIC, structured=False, messages=messages)
    unread = unread_texts(first)
    assert sorted(unread) == [2, 3] and "conflicting" in unread[2] and "no block for text 3" in unread[3]
    convo = build_repair_messages(messages, FIRST, unread, RUBRIC, structured=False)
    assert convo[: len(messages)] == messages
    assert convo[-2] == {"role": "assistant", "content": FIRST}
    ask = convo[-1]["content"]
    assert convo[-1]["role"] == "user"
    assert "- Text 2: conflicting ratings" in ask and "- Text 3: no block for text 3" in ask
    assert "#### Output for Text <k>" in ask and "Rating: <an integer from 1 to 5>" in ask
    assert "Text 1:" not in ask  # a text already rated is not asked again
    with pytest.raises(ValueError, match="nothing to repair"):
        build_repair_messages(messages, FIRST, {}, RUBRIC, structured=False)


def test_structured_repair_asks_for_the_missing_keys_only():
    rubric = get_rubric("helpfulness")
    messages = build_judge_messages(rubric, "Q", TEXTS, structured=True)
    convo = build_repair_messages(messages, "{}", {3: "no verdict"}, rubric, structured=True)
    assert '"text_3"' in convo[-1]["content"] and '"text_1"' not in convo[-1]["content"]
    schema = verdict_json_schema(rubric, 3, only=[3])
    assert schema["required"] == ["text_3"] and list(schema["properties"]) == ["text_3"]


def test_repair_round_trip_fills_without_overriding():
    messages = build_judge_messages(RUBRIC, "Write a poem about rain.", TEXTS, structured=False)
    first = parse_verdicts(FIRST, 3, RUBRIC, structured=False, messages=messages)
    # The judge rates texts 2 and 3, and (against the request) text 1 again with another value.
    answer = "#### Output for Text 1\nRating: 1\n\n#### Output for Text 2\nRating: 3\n\n#### Output for Text 3\nRating: 2\n"
    repair = parse_verdicts(answer, 3, RUBRIC, structured=False, messages=messages)
    merged = merge_repair(first, repair)
    assert [v.rating for v in merged] == [4, 3, 2]
    summary = repair_summary(first, merged)
    assert summary["repair_asked"] == 2 and summary["repair_recovered"] == 2
    assert summary["parse_failures_before"] == {"conflicting ratings": 1, "text not rated": 1}
    assert summary["parse_failures_after"] == {}


def test_a_failed_repair_keeps_both_reasons():
    first = [Verdict(None, None, error="conflicting ratings for text 1 in one block: 3, 5")]
    merged = merge_repair(first, [Verdict(None, None, error="empty judge answer")])
    assert merged[0].rating is None and "conflicting" in merged[0].error and "repair: empty judge answer" in merged[0].error
    assert failure_reason(merged[0]) == "conflicting ratings"
    with pytest.raises(ValueError, match="1 first verdicts but 2"):
        merge_repair(first, merged * 2)


_verdict = st.one_of(
    st.builds(lambda r: Verdict(r, "why"), st.integers(1, 5)),
    st.just(Verdict(None, None, error=NA)),
    st.just(Verdict.judge_failed("timeout")),
    st.just(Verdict.generation_failed()),
    st.sampled_from(["no block for text 1", "conflicting ratings for text 2 in 2 blocks: 1, 5",
                     "rating '9' is not on the 1-5 scale"]).map(lambda e: Verdict(None, None, error=e)),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_verdict, _verdict), min_size=0, max_size=6))
def test_merge_never_overrides_and_only_fills_parse_failures(pairs):
    first = [a for a, _ in pairs]
    repair = [b for _, b in pairs]
    merged = merge_repair(first, repair)
    assert len(merged) == len(first)
    for a, b, m in zip(first, repair, merged):
        if a.kind != "parse_failed":
            assert m == a
        elif b.kind in ("ok", "na"):
            assert m == b
        else:
            assert m.kind == "parse_failed" and m.error.startswith(a.error)
    assert sum(parse_failures_by_reason(merged).values()) <= sum(parse_failures_by_reason(first).values())


def test_parse_failures_count_only_unreadable_answers():
    verdicts = [
        Verdict(4, "ok"),
        Verdict(None, None, error="rating 'great' is not on the 1-5 scale"),
        Verdict(None, None, error="the answer uses another scale (rating '8' is not on the 1-5 scale)"),
        Verdict(None, None, error=NA),
        Verdict.judge_failed("timeout after 3 attempts"),
        Verdict.generation_failed(),
        Verdict(None, None, error="no block for text 3"),
        Verdict(None, None, error="something new"),
    ]
    assert parse_failures_by_reason(verdicts) == {
        "another scale": 1, "other": 1, "rating off the scale": 1, "text not rated": 1,
    }
    assert parse_failure_rate(verdicts) == pytest.approx(4 / 5)
    assert failure_reason(Verdict(None, None, error=NA)) is None


def test_repair_attempts_lives_in_the_judging_config():
    assert Judging().repair_attempts == 1
    assert Judging(repair_attempts=0).repair_attempts == 0
    with pytest.raises(ValueError):
        Judging(repair_attempts=-1)


def test_an_empty_first_answer_is_named_not_sent_empty():
    messages = build_judge_messages(RUBRIC, "Q", TEXTS, structured=False)
    convo = build_repair_messages(messages, "  \n", {1: "empty judge answer"}, RUBRIC, structured=False)
    assert convo[-2] == {"role": "assistant", "content": "(no answer)"}  # some providers refuse an empty turn
