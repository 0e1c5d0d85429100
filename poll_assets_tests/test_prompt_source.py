import hashlib
import json
from pathlib import Path

import datasets
import pandas as pd
import pytest

from poll_assets.panel import Source
from poll_assets.partitions import shard_bounds, shard_keys
from poll_assets.prompt_source import PromptSourceError, load_instructions, prompt_id, select_shard


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
