import hashlib
import json
from pathlib import Path

import datasets
import pandas as pd
import pytest

from poll_assets.panel import Source
from poll_assets.partitions import shard_bounds, shard_keys
from poll_assets.prompt_source import PromptSourceError, count_local_rows, load_instructions, prompt_id, select_shard


def test_prompt_id_is_sha256_of_instruction():
    assert prompt_id("Say hi.") == hashlib.sha256(b"Say hi.").hexdigest()
    assert prompt_id("Say hi.") != prompt_id("Say hi!")


def test_shard_keys_and_bounds():
    src = Source(data_files=["x.jsonl"], num_examples=7, shard_size=3)
    keys = shard_keys(src.num_examples, src.shard_size)
    assert keys == ["shard-00000", "shard-00001", "shard-00002"]
    assert [shard_bounds(k, src) for k in keys] == [(0, 3), (3, 6), (6, 7)]
    # Raising num_examples appends shards and leaves earlier ones unchanged.
    bigger = Source(data_files=["x.jsonl"], num_examples=10, shard_size=3)
    assert shard_keys(10, 3)[:3] == keys and shard_bounds("shard-00001", bigger) == (3, 6)
    with pytest.raises(ValueError, match="past num_examples"):
        shard_bounds("shard-00003", src)
    with pytest.raises(ValueError, match="not a shard key"):
        shard_bounds("first", src)


def test_select_shard_drops_empty_and_duplicates_across_shards():
    texts = pd.Series(["a", "  ", "b", "a", None, "c", "b "], dtype=object)
    first = select_shard(texts, 0, 3)
    assert first.rows["instruction"].tolist() == ["a", "b"]
    assert (first.dropped_empty, first.dropped_duplicate) == (1, 0)
    second = select_shard(texts, 3, 7)
    # "a" and "b " (stripped to "b") already appeared in shard 0.
    assert second.rows["instruction"].tolist() == ["c"]
    assert second.rows["source_row"].tolist() == [5]
    assert (second.dropped_empty, second.dropped_duplicate) == (1, 2)
    assert second.rows["prompt_id"].tolist() == [prompt_id("c")]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_load_from_local_jsonl_with_column_mapping(tmp_path):
    _jsonl(tmp_path / "p.jsonl", [{"prompt": f"q{i}", "other": i} for i in range(5)])
    src = Source(data_files=["p.jsonl"], column_mapping={"prompt": "instruction"}, num_examples=5, shard_size=2)
    assert load_instructions(src, tmp_path, 3).tolist() == ["q0", "q1", "q2"]


def test_load_from_datasets_parquet_export(tmp_path):
    ds = datasets.Dataset.from_dict({"instruction": ["x", "y", "z"], "id": [1, 2, 3]})
    ds.to_parquet(str(tmp_path / "export.parquet"))
    src = Source(data_files=[str(tmp_path / "export.parquet")], num_examples=3, shard_size=3)
    assert load_instructions(src, Path("/"), 3).tolist() == ["x", "y", "z"]


def test_load_from_csv(tmp_path):
    (tmp_path / "p.csv").write_text("question,label\nwhat?,1\nwhy?,2\n")
    src = Source(data_files=["p.csv"], column_mapping={"question": "instruction"}, num_examples=2, shard_size=2)
    assert load_instructions(src, tmp_path, 2).tolist() == ["what?", "why?"]


def test_missing_column_lists_available_columns(tmp_path):
    f = _jsonl(tmp_path / "p.jsonl", [{"question": "q", "answer": "a"}])
    src = Source(data_files=[str(f)], column_mapping={"prompt": "instruction"}, num_examples=1, shard_size=1)
    with pytest.raises(PromptSourceError) as err:
        load_instructions(src, tmp_path, 1)
    msg = str(err.value)
    assert str(f) in msg and "'prompt'" in msg and "['question', 'answer']" in msg


def test_missing_file_is_named(tmp_path):
    src = Source(data_files=["nope.jsonl"], num_examples=1, shard_size=1)
    with pytest.raises(PromptSourceError, match="nope.jsonl"):
        load_instructions(src, tmp_path, 1)


def _source(name: str, n: int = 2) -> Source:
    return Source(data_files=[name], column_mapping={"prompt": "instruction"}, num_examples=n, shard_size=n)


def test_empty_file_is_named(tmp_path):
    (tmp_path / "p.jsonl").write_text("\n  \n")
    with pytest.raises(PromptSourceError, match=r"p\.jsonl: the file is empty"):
        load_instructions(_source("p.jsonl"), tmp_path, 1)


def test_non_utf8_file_names_file_and_line(tmp_path):
    (tmp_path / "p.jsonl").write_bytes(b'{"prompt": "fine"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(PromptSourceError) as err:
        load_instructions(_source("p.jsonl"), tmp_path, 2)
    assert f"{tmp_path / 'p.jsonl'}: line 2: not UTF-8 text (byte 0xe9" in str(err.value)


def test_non_utf8_csv_is_named_too(tmp_path):
    (tmp_path / "p.csv").write_bytes(b"prompt\nok\n\xff\xfe bad\n")
    with pytest.raises(PromptSourceError, match=r"p\.csv: line 3: not UTF-8"):
        load_instructions(_source("p.csv"), tmp_path, 2)


def test_broken_jsonl_line_is_named(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b"\n{"prompt": "c"}\n')
    with pytest.raises(PromptSourceError) as err:
        load_instructions(_source("p.jsonl", 3), tmp_path, 3)
    assert f"{tmp_path / 'p.jsonl'}: line 2: not valid JSON (Expecting ',' delimiter" in str(err.value)


@pytest.mark.parametrize(("value", "shown"), [(42, "int 42"), (["a", "b"], 'list ["a", "b"]'), (True, "bool true")])
def test_non_string_instruction_is_refused_with_its_line(tmp_path, value, shown):
    _jsonl(tmp_path / "p.jsonl", [{"prompt": "fine"}, {"prompt": value}])
    with pytest.raises(PromptSourceError) as err:
        load_instructions(_source("p.jsonl"), tmp_path, 2)
    assert f"p.jsonl: line 2: 'prompt' is a {shown}, not text" in str(err.value)


def test_non_string_instruction_in_parquet_is_refused_with_its_row(tmp_path):
    datasets.Dataset.from_dict({"instruction": [1, 2, 3]}).to_parquet(str(tmp_path / "p.parquet"))
    src = Source(data_files=["p.parquet"], num_examples=3, shard_size=3)
    with pytest.raises(PromptSourceError, match=r"p\.parquet: row 0: 'instruction' is a int 1, not text"):
        load_instructions(src, tmp_path, 3)


def test_json_array_record_is_named(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps([{"prompt": "a"}, "not an object"]))
    with pytest.raises(PromptSourceError, match=r"p\.json: record 1: expected a JSON object, got a str"):
        load_instructions(_source("p.json"), tmp_path, 2)


def test_shard_past_the_end_of_the_file_says_how_many_rows_it_has(tmp_path):
    _jsonl(tmp_path / "p.jsonl", [{"prompt": f"q{i}"} for i in range(3)])
    src = Source(data_files=["p.jsonl"], column_mapping={"prompt": "instruction"}, num_examples=10, shard_size=2)
    assert load_instructions(src, tmp_path, 2).tolist() == ["q0", "q1"]  # shards inside the file still load
    with pytest.raises(PromptSourceError) as err:
        load_instructions(src, tmp_path, 4)
    assert "p.jsonl: has 3 rows, but this shard needs rows up to 3 (source.num_examples is 10)" in str(err.value)
    assert count_local_rows(src, tmp_path) == 3
