"""The asset keys and column schemas that several stages share, in data-flow order.

A stage reads its upstream stages' frames by these keys and schemas; keeping them here, rather
than in the stage that writes them, lets each stage import only this module and the engine,
never another stage."""

from __future__ import annotations

from typing import Any

import dagster as dg
import pandas as pd

from poll_assets.engine.schema import schema
from poll_assets.panel import Judging, Member
from poll_assets.parquet_values import is_missing, plain_list

PROMPTS_KEY = dg.AssetKey("prompts")
PROMPT_COLUMNS = schema(
    PROMPTS_KEY.to_user_string(),
    ("prompt_id", "string", "sha256 hex of the instruction; every later row of this prompt carries it"),
    ("instruction", "string", "the prompt text, as read from the source"),
    ("source_row", "int", "the row of the source it was read from"),
)


GENERATIONS_PREFIX = "generations"  # generations/<member>
COMBINED_KEY = dg.AssetKey("combined_generations")
GENERATION_COLUMNS = schema(
    f"{GENERATIONS_PREFIX}/<g>",
    ("prompt_id", "string", "the prompt answered"),
    ("generation", "string", "the answer; None when the call failed"),
    ("model_name", "string", "the model the panel names"),
    ("generator", "string", "the panel member that answered"),
    ("finish_reason", "string", "why the model stopped (stop, length, ...)"),
    ("input_tokens", "int", "prompt tokens the provider counted"),
    ("output_tokens", "int", "answer tokens the provider counted"),
    ("latency_s", "float", "seconds the call took (0 for a cache hit)"),
    ("served_model", "string", "the model as the server reported it"),
    ("request_id", "string", "the provider's request id"),
    ("call_id", "string", "hash of the request; the response cache's key"),
    ("cached", "bool", "served from the response cache"),
    ("error", "string", "why the call failed; None on success"),
    ("error_kind", "string", "the failure's kind (server, timeout, rate_limit, connection, bad_request, ...); None on success"),
)
COMBINED_COLUMNS = schema(
    COMBINED_KEY.to_user_string(),
    ("prompt_id", "string", "the prompt"),
    ("instruction", "string", "the prompt text"),
    ("generations", "list<string>", "every generator's answer, in panel order; None for a failed one"),
    ("generation_models", "list<string>", "the model behind each answer"),
    ("generators", "list<string>", "the panel member behind each answer"),
    ("generation_call_ids", "list<string>", "the call id of each answer"),
    ("generation_errors", "list<string>", "why each failed answer failed; None for the others"),
)


def generation_key(member: Member) -> dg.AssetKey:
    return dg.AssetKey([GENERATIONS_PREFIX, member.name])


def generation_counts(combined: pd.DataFrame) -> dict[Any, int]:
    """How many generations each prompt of combined_generations has."""
    return {pid: len(plain_list(g)) for pid, g in zip(combined["prompt_id"], combined["generations"])}


RATINGS_PREFIX = "ratings"  # ratings/<member>
RATING_COLUMNS = schema(
    f"{RATINGS_PREFIX}/<j>",
    ("prompt_id", "string", "the prompt judged"),
    ("judge", "string", "the panel member that judged"),
    ("model_name", "string", "the judge's model"),
    ("ratings", "list<int>", "one rating per generation, in generation order; None with the reason in rating_errors"),
    ("rationales", "list<string>", "the judge's rationale for each generation"),
    ("rating_types", "list<string>", "the aspect's type for each generation (helpfulness, truthfulness), else None"),
    ("rating_errors", "list<string>", "why a rating is None: unreadable, N/A, judge call failed, generation failed"),
    ("shown_order", "list<int>", "the generations in the order the judge saw them (position-bias control)"),
    ("raw_output", "string", "the judge's answer as returned"),
    ("output_mode", "string", "how the answer was constrained: json_schema, json_object, tool_use, grammar, text, "
     "or text_fallback (a paid answer without the structured part, read as text)"),
    ("call_id", "string", "hash of the request; the response cache's key"),
    ("input_tokens", "int", "prompt tokens of the judge call"),
    ("output_tokens", "int", "answer tokens of the judge call"),
    ("error", "string", "why the judge call failed; None on success"),
    ("error_kind", "string", "the failure's kind (server, timeout, rate_limit, connection, bad_request, ...); None on success"),
    ("repair_outputs", "list<string>", "the judge's answers to the repair re-asks for texts its answer left unread, "
     "one per round (None where the repair call failed); empty when no repair was asked"),
    ("repair_call_ids", "list<string>", "hash of each repair request (the response cache's key), one per round"),
    ("repaired_errors", "list<string>", "per generation, why the first answer left it unread when a repair "
     "filled its rating; None elsewhere"),
    ("truncated_texts", "list<int>", "the generations (indices, in generation order) cut with a visible marker to "
     "fit the judge's context (`context_tokens`); empty when every text was shown whole"),
    ("finish_reason", "string", "why the judge's answer ended: stop, or length (cut off at max_new_tokens: what it "
     "holds is read, the rest goes to repair)"),
)


def ratings_key(member: Member) -> dg.AssetKey:
    return dg.AssetKey([RATINGS_PREFIX, member.name])


# judging.mode "pairwise": a judge's asset keeps the key ratings/<judge>, with these columns
COMPARISON_COLUMNS = schema(
    "ratings/<j> (pairwise mode)",
    ("prompt_id", "string", "the prompt judged"),
    ("judge", "string", "the panel member that judged"),
    ("model_name", "string", "the judge's model"),
    ("pair_a", "list<int>", "per comparison: the pair's first generation (index in generation order; a < b)"),
    ("pair_b", "list<int>", "per comparison: the pair's second generation"),
    ("first_shown", "list<int>", "per comparison: the generation shown as Response A (position-bias control)"),
    ("preferred", "list<string>", "per comparison: 'a' (pair_a is better), 'b', 'tie', or None with the "
     "reason in comparison_errors"),
    ("rationales", "list<string>", "per comparison: the judge's rationale"),
    ("comparison_errors", "list<string>", "per comparison: why `preferred` is None (unreadable answer, judge call failed)"),
    ("raw_outputs", "list<string>", "per comparison: the judge's answer as returned"),
    ("output_modes", "list<string>", "per comparison: how the answer was constrained (json_schema, tool_use, text, ...)"),
    ("call_ids", "list<string>", "per comparison: hash of the request; the response cache's key"),
    ("repair_outputs", "list<string>", "per comparison: the answer to its repair re-ask (None: none asked, or it failed)"),
    ("repaired_errors", "list<string>", "per comparison: why the first answer was unread when a repair filled it; else None"),
    ("input_tokens", "int", "prompt tokens of the prompt's judge calls"),
    ("output_tokens", "int", "answer tokens of the prompt's judge calls"),
    ("error", "string", "the first failed call's error; None when every call succeeded"),
    ("error_kind", "string", "that failure's kind (server, timeout, rate_limit, ...); None on success"),
)


def comparison_answers(frame: pd.DataFrame) -> list[tuple[str, int, int, int, int | str | None]]:
    """(prompt_id, a, b, first shown, winner) per comparison of a judge's frame; winner a generation, 'tie' or None."""
    out: list[tuple[str, int, int, int, int | str | None]] = []
    for pid, aa, bb, ff, pp in zip(frame["prompt_id"], frame["pair_a"], frame["pair_b"], frame["first_shown"], frame["preferred"]):
        for a, b, f, p in zip(plain_list(aa), plain_list(bb), plain_list(ff), plain_list(pp)):
            won = None if is_missing(p) else "tie" if p == "tie" else int(a) if p == "a" else int(b)
            out.append((pid, int(a), int(b), int(f), won))
    return out


POOLED_KEY = dg.AssetKey("pooled_ratings")
POOLED_COLUMNS = schema(
    POOLED_KEY.to_user_string(),
    ("prompt_id", "string", "the prompt"),
    ("instruction", "string", "the prompt text"),
    ("generations", "list<string>", "the answers, in panel order (as in combined_generations)"),
    ("generation_models", "list<string>", "the model behind each answer"),
    ("generation_call_ids", "list<string>", "the call id of each answer"),
    ("poll_ratings", "list<list<int>>", "judge x generation: every judge's rating of every answer, None where missing"),
    ("poll_rationales", "list<list<string>>", "judge x generation: the judges' rationales"),
    ("poll_models", "list<string>", "the judges' models, in panel order"),
    ("poll_call_ids", "list<string>", "the call id of each judge's verdict"),
    ("avg_poll_ratings", "list<float>", "the pooled rating of each answer; None below pooling.min_judges"),
    ("n_valid_judges", "list<int>", "how many ratings went into each pooled rating (pairwise mode: how many "
     "judges compared each answer)"),
    ("judge_weights", "list<float>", "pooling.method weighted: each judge's weight for this prompt (given, or fitted on other prompts' gold labels); None otherwise"),
    ("bt_strengths", "list<float>", "pairwise mode: each answer's Bradley-Terry strength over every judge's "
     "comparisons, both orders (log odds, mean 0; None where no comparison was read); None in rating mode"),
    ("win_counts", "list<float>", "pairwise mode: each answer's wins over every judge and order, a tie as half a win"),
    ("n_comparisons", "list<int>", "pairwise mode: the read comparisons each answer took part in"),
    ("poll_comparisons", "list<list<list<int>>>", "pairwise mode: judge x comparison: [a, b, shown first, winner] "
     "(generation indices; winner -1 for a tie, None where unread)"),
)


def scores_column(judging: Judging) -> str:
    """The pooled score of each answer: the pooled rating, or in pairwise mode its Bradley-Terry strength."""
    return "bt_strengths" if judging.mode == "pairwise" else "avg_poll_ratings"


PAIRS_KEY = dg.AssetKey("preference_pairs")
PAIR_COLUMNS = schema(
    PAIRS_KEY.to_user_string(),
    ("prompt", "string", "the prompt text"),
    ("prompt_id", "string", "the prompt's id"),
    ("chosen", "list<struct<role,content>>", "the chat: the prompt, then the preferred answer"),
    ("rejected", "list<struct<role,content>>", "the chat: the prompt, then the other answer"),
    ("chosen_model", "string", "the model that wrote the chosen answer"),
    ("rejected_model", "string", "the model that wrote the rejected answer"),
    ("chosen_generator", "string", "the panel member (generator) that wrote the chosen answer"),
    ("rejected_generator", "string", "the panel member (generator) that wrote the rejected answer"),
    ("chosen_rating", "float", "the chosen answer's pooled rating"),
    ("rejected_rating", "float", "the rejected answer's pooled rating"),
    ("margin", "float", "chosen_rating - rejected_rating, > 0"),
    ("judge_agreement", "float", "share of the judges rating both answers (self-family mask applied) that rate "
                                 "chosen strictly above rejected; None when no judge rated both"),
    ("judges_for", "int", "judges rating chosen strictly above rejected"),
    ("judges_against", "int", "judges rating chosen strictly below rejected"),
    ("judges_tied", "int", "judges rating both answers the same"),
    ("margin_low", "float", "lower bound of the 95% bootstrap interval (over judges) on the pooled margin; "
                            "None with fewer than 2 judges"),
    ("margin_high", "float", "upper bound of that interval; None with fewer than 2 judges"),
    ("poll_ratings", "list<list<int>>", "judge x generation: every rating of the prompt's answers"),
    ("poll_models", "list<string>", "the judges' models, in panel order"),
    ("avg_poll_ratings", "list<float>", "the pooled rating of every answer of the prompt"),
    ("chosen_call_id", "string", "the call that wrote the chosen answer"),
    ("rejected_call_id", "string", "the call that wrote the rejected answer"),
    ("rating_call_ids", "list<string>", "the judge calls behind the ratings, in panel order"),
    ("bt_strengths", "list<float>", "pairwise mode: every answer's Bradley-Terry strength, the score pairs are "
     "formed from (chosen_rating/rejected_rating are then strengths); None in rating mode"),
    ("win_counts", "list<float>", "pairwise mode: every answer's wins over the judges and both orders (a tie: half)"),
)


def generator_names(combined: pd.DataFrame) -> list[str]:
    """Who wrote each answer of combined_generations, in panel order (every row lists every generator)."""
    if not len(combined) or "generators" not in combined:
        return []  # a frame made by hand (tests): the preview numbers the texts instead
    return [str(g) for g in plain_list(combined["generators"].iloc[0])]
