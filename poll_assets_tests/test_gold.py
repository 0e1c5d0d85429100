"""Gold label files: what each format accepts, and an error naming file, line and field for each bad row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from poll_assets.scoring.gold import GoldLabelError, instruction_key, load_gold
from poll_assets.prompt_source import prompt_id

SCALE = (1, 2, 3, 4, 5)
PID = prompt_id("Name three primary colours.")


def _jsonl(tmp_path: Path, *rows: dict, name: str = "gold.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gold.csv"
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_rating_rows_ratings_mapping_and_preferences_are_read(tmp_path):
    path = _jsonl(tmp_path,
                  {"prompt_id": PID, "generator": "gen_0", "rating": 4, "annotator": "ann", "note": "clear"},
                  {"instruction": "Give a synonym for quick.", "ratings": {"gen_0": 2, "gen_1": 5}},
                  {"prompt_id": PID, "a": "gen_0", "b": "gen_1", "winner": "TIE"})
    gold = load_gold(path, SCALE)
    assert [(r.generator, r.rating, r.line) for r in gold.ratings] == [("gen_0", 4, 1), ("gen_0", 2, 2), ("gen_1", 5, 2)]
    assert gold.ratings[0].annotator == "ann" and gold.ratings[0].note == "clear"
    assert gold.ratings[1].by_text and gold.ratings[1].prompt == prompt_id("Give a synonym for quick.")
    assert [(p.a, p.b, p.winner, p.line) for p in gold.preferences] == [("gen_0", "gen_1", "tie", 3)]


def test_an_instruction_saved_with_windows_line_endings_matches_the_prompt():
    assert instruction_key("  two\r\nlines\r\n") == prompt_id("two\nlines")


def test_csv_rows_are_read_with_the_header_as_line_1(tmp_path):
    path = _csv(tmp_path, f"prompt_id,generator,rating,a,b,winner\n{PID},gen_0,3,,,\n{PID},,,gen_0,gen_1,b\n")
    gold = load_gold(path, SCALE)
    assert [(r.rating, r.line) for r in gold.ratings] == [(3, 2)]
    assert [(p.winner, p.line) for p in gold.preferences] == [("b", 3)]


def test_parquet_rows_are_read(tmp_path):
    import pandas as pd

    path = tmp_path / "gold.parquet"
    pd.DataFrame({"prompt_id": [PID, PID], "generator": ["gen_0", None], "rating": [5.0, None],
                  "a": [None, "gen_0"], "b": [None, "gen_1"], "winner": [None, "a"]}).to_parquet(path)
    gold = load_gold(path, SCALE)
    assert [(r.generator, r.rating) for r in gold.ratings] == [("gen_0", 5)]
    assert [(p.a, p.winner, p.line) for p in gold.preferences] == [("gen_0", "a", 2)]


def test_unknown_generators_are_counted_not_dropped(tmp_path):
    path = _jsonl(tmp_path, {"prompt_id": PID, "ratings": {"gen_0": 2, "gen_9": 5}},
                  {"prompt_id": PID, "a": "gen_0", "b": "gen_8", "winner": "a"})
    gold = load_gold(path, SCALE)
    assert len(gold) == 3 and gold.unknown_generator_labels(["gen_0", "gen_1"]) == 2


# --- one test per bad file; each message names the file, the line and the field ----------------------


def _error(path: Path) -> str:
    with pytest.raises(GoldLabelError) as caught:
        load_gold(path, SCALE)
    message = str(caught.value)
    assert message.startswith(str(path) + ": "), message
    return message


def test_missing_column_in_a_csv_header(tmp_path):
    message = _error(_csv(tmp_path, "prompt,generator,rating\nx,gen_0,3\n"))
    assert "line 1 (the header): field 'prompt_id': missing column" in message


def test_missing_field_in_a_rating_row(tmp_path):
    message = _error(_jsonl(tmp_path, {"prompt_id": PID, "generator": "gen_0", "rating": 3},
                            {"prompt_id": PID, "generator": "gen_1"}))
    assert "line 2: field 'rating': missing" in message


def test_unknown_winner_value(tmp_path):
    message = _error(_csv(tmp_path, f"prompt_id,a,b,winner\n{PID},gen_0,gen_1,a\n{PID},gen_0,gen_2,left\n"))
    assert "line 3: field 'winner': unknown winner 'left'; expected one of ['a', 'b', 'tie']" in message


def test_rating_off_the_scale(tmp_path):
    message = _error(_jsonl(tmp_path, {"prompt_id": PID, "ratings": {"gen_0": 3, "gen_1": 7}}))
    assert "line 1: field 'ratings.gen_1': rating 7 is off the scale; expected one of [1, 2, 3, 4, 5]" in message


def test_duplicate_rating_for_the_same_prompt_and_generator(tmp_path):
    message = _error(_jsonl(tmp_path, {"prompt_id": PID, "generator": "gen_0", "rating": 3},
                            {"prompt_id": PID, "generator": "gen_1", "rating": 3},
                            {"instruction": "Name three primary colours.", "generator": "gen_0", "rating": 4}))
    assert "line 3: field 'generator': duplicate label: generator 'gen_0'" in message and "already labelled at line 1" in message


def test_duplicate_preference_for_the_same_pair_in_either_order(tmp_path):
    message = _error(_jsonl(tmp_path, {"prompt_id": PID, "a": "gen_0", "b": "gen_1", "winner": "a"},
                            {"prompt_id": PID, "a": "gen_1", "b": "gen_0", "winner": "a"}))
    assert "line 2: field 'a/b': duplicate label" in message


def test_a_row_that_is_both_a_rating_and_a_preference(tmp_path):
    message = _error(_jsonl(tmp_path, {"prompt_id": PID, "generator": "gen_0", "rating": 3, "winner": "a"}))
    assert "line 1: field 'generator/rating/winner': a row is either a rating" in message


def test_a_row_that_is_neither_kind(tmp_path):
    message = _error(_csv(tmp_path, f"prompt_id,generator,rating,note\n{PID},,,just a note\n"))
    assert "line 2: field 'rating': the row is neither a rating" in message


def test_a_row_without_a_prompt(tmp_path):
    message = _error(_jsonl(tmp_path, {"generator": "gen_0", "rating": 3}))
    assert "line 1: field 'prompt_id': missing: give `prompt_id`" in message


def test_non_utf8_bytes_name_the_byte_offset_and_line(tmp_path):
    path = tmp_path / "gold.csv"
    path.write_bytes(f"prompt_id,generator,rating\n{PID},gen_\xe9,3\n".encode("latin-1"))
    message = _error(path)
    offset = len(f"prompt_id,generator,rating\n{PID},gen_".encode())
    assert f"line 2: not UTF-8 text (byte 0xe9 at byte offset {offset})" in message


def test_a_bad_parquet_row_is_named_by_its_row_number(tmp_path):
    import pandas as pd

    path = tmp_path / "gold.parquet"
    pd.DataFrame({"prompt_id": [PID, PID], "generator": ["gen_0", "gen_1"], "rating": [3, 0]}).to_parquet(path)
    assert "row 2: field 'rating': rating 0 is off the scale" in _error(path)


def test_a_broken_or_non_object_jsonl_line_is_named(tmp_path):
    path = tmp_path / "gold.jsonl"
    path.write_text(json.dumps({"prompt_id": PID, "generator": "g", "rating": 4}) + "\n\n{not json\n", encoding="utf-8")
    with pytest.raises(GoldLabelError, match=r"gold\.jsonl: line 3: not valid JSON \(Expecting property name"):
        load_gold(str(path), SCALE)
    path.write_text("[1, 2]\n", encoding="utf-8")
    with pytest.raises(GoldLabelError, match=r"gold\.jsonl: line 1: expected a JSON object, got a list \[1, 2\]"):
        load_gold(str(path), SCALE)
