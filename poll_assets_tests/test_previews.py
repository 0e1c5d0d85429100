"""The UI's previews (a few pairs, a few verdicts per judge) and a shard's LLM totals.

The markdown builders are tested on frames without Dagster; one scripted run checks that the
previews and the totals land in the materialization metadata, and that the totals are the sums
of what the member assets recorded.
"""

from __future__ import annotations

import dagster as dg
import pandas as pd
import pytest

from poll_assets.engine.previews import Markdown, md_cell, md_table, pairs_preview, pairs_table, verdicts_preview
from poll_assets.engine.totals import sum_call_metadata
from poll_assets.pipeline import JOB_NAME, build_definitions
from poll_assets_tests.fake_panel import scripted_resources, write_panel

SHARD = "shard-00000"


def table_rows(md: str) -> list[list[str]]:
    """The body cells of a markdown table, split on unescaped pipes, each backslash escape undone."""
    rows = []
    for line in md.splitlines()[2:]:
        cells, cell, chars = [], "", iter(line.strip().strip("|"))
        for ch in chars:
            if ch == "\\":
                cell += next(chars, "")
            elif ch == "|":
                cells.append(cell.strip())
                cell = ""
            else:
                cell += ch
        rows.append([*cells, cell.strip()])
    return rows


def test_cells_are_one_line_with_pipes_escaped_and_cut_to_the_limit():
    assert md_cell("a | b\nc\r\n\td") == "a \\| b c d"
    assert md_cell(None) == "" and md_cell(float("nan")) == "" and md_cell(4.0) == "4" and md_cell(3.25) == "3.25"
    cut = md_cell("word " * 50, limit=20)
    assert len(cut) <= 20 and cut.endswith("…") and "\n" not in cut
    assert md_cell("x" * 20, limit=20) == "x" * 20  # at the limit: untouched
    # A pipe at the cut is escaped after cutting, so the cell stays one cell.
    assert md_cell("abc|defghij", limit=5) == "abc\\|…"


def test_table_has_one_line_per_row_and_the_right_cells():
    md = md_table(("a", "b"), [("1 | 2", "line\nbreak"), (None, "z" * 30)], limits=(10, 8))
    lines = md.splitlines()
    assert lines[:2] == ["| a | b |", "|---|---|"] and len(lines) == 4
    assert table_rows(md) == [["1 | 2", "line br…"], ["", "zzzzzzz…"]]


def chat(prompt: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def _pairs(n: int = 7) -> pd.DataFrame:
    return pd.DataFrame([
        {"prompt_id": f"{i:064x}", "prompt": f"Prompt {i} with | pipe\nand newline", "chosen": chat("p", "good " * 80),
         "rejected": chat("p", f"bad {i}"), "chosen_model": "same-model", "rejected_model": "same-model",
         "chosen_generator": "gen_direct", "rejected_generator": "gen_loose",
         "chosen_rating": 4.5, "rejected_rating": 2.0, "margin": 2.5, "judge_agreement": 2 / 3,
         "judges_for": 2, "judges_against": 0, "judges_tied": 1,
         "margin_low": 1.0 if i else None, "margin_high": 4.0 if i else None}
        for i in range(n)
    ])


def test_the_in_place_pairs_preview_is_narrow_and_says_who_won_and_how_sure_the_judges_are():
    md = pairs_preview(_pairs(), n=5)
    header = md.splitlines()[0]
    assert header == "| prompt | chosen > rejected | judges for | margin [95% CI] |"
    rows = table_rows(md)
    assert len(rows) == 5 and all(len(r) == 4 for r in rows)
    assert rows[0] == ["Prompt 0 with | pipe and newline", "gen_direct > gen_loose", "2 of 3 (1 tied)", "2.50"]
    assert rows[1][3] == "2.50 [1.00, 4.00]"  # with two or more judges: the interval
    assert max(len(c) for r in rows for c in r) <= 48  # every cell short: the table fits the UI's width
    empty = pairs_preview(_pairs().head(0))  # still a table (its header), and a line saying why it is empty
    assert empty.splitlines()[0] == header and empty.endswith("_no pairs in this shard_")


def test_the_full_pairs_table_has_generators_models_confidence_and_cut_answers():
    md = pairs_table(_pairs(), n=5, answer_chars=40)
    rows = table_rows(md.split("\n\n")[0])
    assert len(rows) == 5
    first = rows[1]
    assert first[0] == f"{1:064x}"[:12]
    assert first[2:9] == ["gen_direct", "gen_loose", "same-model", "same-model", "4.5 vs 2", "2.50 [1.00, 4.00]",
                          "2 of 3 (1 tied)"]
    assert len(first[9]) <= 40 and first[9].startswith("good good") and first[9].endswith("…")
    assert first[10] == "bad 1"
    assert md.endswith("_first 5 of 7 pairs_")


def test_model_text_renders_literally_in_markdown():
    text = "# Title *bold* _it_ `code` <b>x</b> [link](u) a|b ~s~ & \\"
    cell = md_cell(text, limit=200)
    # every markup character is escaped; nothing else is touched
    for ch in "#*_`<>[]|~&":
        assert f"\\{ch}" in cell
    assert cell.replace("\\", "") == text.replace("\\", "")
    assert "\\\\" in cell  # a backslash is escaped too, so it cannot escape what follows
    # a cut is made before escaping: the limit counts the model's characters, the mark is kept
    cut = md_cell("*" * 30, limit=10)
    assert cut == "\\*" * 9 + "…"
    assert md_cell(Markdown("**total**")) == "**total**"  # markdown on purpose stays markdown


def test_every_cut_is_marked():
    for limit in (1, 2, 5, 17):
        out = md_cell("abcdefghijklmnopqrstuvwxyz" * 2, limit=limit)
        assert out.endswith("…") and len(out) <= limit
    assert not md_cell("short", limit=5).endswith("…")


def test_verdicts_preview_keeps_unrated_verdicts_with_their_reason():
    ratings = pd.DataFrame([
        {"prompt_id": "a" * 64, "ratings": [5, None], "rationales": ["fine | ok", None],
         "rating_errors": [None, "no block for text 2"]},
        {"prompt_id": "b" * 64, "ratings": [3, 2], "rationales": ["long " * 60, "meh"], "rating_errors": [None, None]},
        {"prompt_id": "c" * 64, "ratings": [None, 4], "rationales": [None, "good"],
         "rating_errors": ["judge call failed: HTTP 500", None]},
    ])
    md = verdicts_preview(ratings, ["gen_a", "gen_b"], n=4, max_unrated=2, rationale_chars=30)
    rows = table_rows(md)
    # Both unrated verdicts are kept (with their reasons), the rest filled with rated ones, in shard order.
    assert [(r[0], r[1], r[2]) for r in rows] == [("a" * 12, "gen_a", "5"), ("a" * 12, "gen_b", ""),
                                                  ("b" * 12, "gen_a", "3"), ("c" * 12, "gen_a", "")]
    assert rows[0][3] == "fine | ok" and rows[1][4] == "no block for text 2"
    assert len(rows[2][3]) <= 30 and rows[2][3].endswith("…")
    assert rows[3][4] == "judge call failed: HTTP 500"
    assert verdicts_preview(ratings.head(0), ["gen_a"]) == "_no verdicts in this shard_"


def test_sum_call_metadata_adds_counts_and_priced_costs():
    totals = sum_call_metadata({
        "generations/a": {"llm/calls": 3, "llm/cache_hits": 1, "llm/failures": 0, "llm/input_tokens": 30,
                          "llm/output_tokens": 60, "llm/cost_usd": 0.25},
        "generations/b": {"llm/calls": 2, "llm/cache_hits": 0, "llm/failures": 1, "llm/input_tokens": 20,
                          "llm/output_tokens": 10},
        "ratings/j": {"llm/calls": 4, "llm/cache_hits": 2, "llm/failures": 0, "llm/input_tokens": 400,
                      "llm/output_tokens": 40, "llm/cost_usd": 0.5},
        "ratings/k": None,
    })
    assert totals == {"shard/calls": 9, "shard/cache_hits": 3, "shard/failures": 1, "shard/input_tokens": 450,
                      "shard/output_tokens": 110, "shard/cost_usd": 0.75, "shard/priced_members": "2 of 3",
                      "shard/members_without_data": ["ratings/k"]}
    assert sum_call_metadata({"generations/a": {"llm/calls": 1}})["shard/cost_usd"] is None  # no price known


def values(meta: dict) -> dict:
    return {k: getattr(v, "value", v) for k, v in meta.items()}


@pytest.mark.parametrize("member_steps", [False, True])
def test_pairs_and_judges_carry_previews_and_the_shard_totals(tmp_path, dagster_home, member_steps):
    extra = {"prices": {"gen-model-0": {"input_per_mtok": 1000.0, "output_per_mtok": 2000.0}},
             # judge_1's refusals must not stop the run at its blocking unrated-verdict check
             "thresholds": {"max_generation_failure_rate": 0.1, "max_parse_failure_rate": 1.0, "min_agreement": -1.0}}
    panel, path = write_panel(tmp_path, extra=extra)
    defs = build_definitions(panel, path, storage_dir=str(tmp_path / "storage"), cache_path=str(tmp_path / "c.sqlite"),
                             member_steps=member_steps, resource_overrides=scripted_resources(panel, {"judge_1": "rivers"}))
    instance = dg.DagsterInstance.get()
    assert defs.resolve_job_def(JOB_NAME).execute_in_process(partition_key=SHARD, instance=instance).success

    def latest(key: dg.AssetKey) -> dict:
        return values(instance.get_latest_materialization_event(key).asset_materialization.metadata)

    members = [dg.AssetKey(["generations", g.name]) for g in panel.generators]
    members += [dg.AssetKey(["ratings", j.name]) for j in panel.judges]
    pairs = latest(dg.AssetKey("preference_pairs"))
    for c in ("calls", "cache_hits", "failures", "input_tokens", "output_tokens"):
        assert pairs[f"shard/{c}"] == sum(latest(k)[f"llm/{c}"] for k in members), c
    assert pairs["shard/calls"] == 2 * 2 + 2 * 2  # 2 prompts x (2 generators + 2 judges), no retries
    assert pairs["shard/cost_usd"] == pytest.approx(latest(members[0])["llm/cost_usd"]) and pairs["shard/cost_usd"] > 0
    assert pairs["shard/priced_members"] == "1 of 4" and pairs["shard/members_without_data"] == []
    assert "| **total** |" in pairs["shard/llm_table"]
    costs = {r[0]: r[-1] for r in table_rows(pairs["shard/llm_table"])}
    assert costs["generations/gen_1"] == costs["ratings/judge_0"] == "not priced"  # said, not blank
    assert float(costs["generations/gen_0"]) > 0
    assert latest(members[1])["llm/cost"] == "not priced" and "llm/cost" not in latest(members[0])
    assert len(table_rows(pairs["preview"])) == pairs["pairs"] > 0

    judge = latest(dg.AssetKey(["ratings", "judge_1"]))
    rows = table_rows(judge["preview"])
    assert rows and {r[1] for r in rows} <= {g.name for g in panel.generators}
    # judge_1 refuses the prompt about rivers: its unrated verdicts are shown with the reason.
    assert any(r[2] == "" and "refuses" in r[4] for r in rows)
