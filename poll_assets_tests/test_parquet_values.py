"""Values read back from a real Parquet file come out as plain Python."""

from __future__ import annotations

import pandas as pd

from poll_assets.parquet_values import is_missing, plain, plain_list


def test_a_parquet_round_trip_gives_lists_ints_and_none(tmp_path):
    frame = pd.DataFrame(
        {
            "ratings": [[4, None, 2], None],
            "messages": [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "yo"}]],
            "error": [None, "timeout"],
            "score": [3, 5],
        }
    )
    path = tmp_path / "f.parquet"
    frame.to_parquet(path)
    back = pd.read_parquet(path)

    first = back.iloc[0]
    assert plain_list(first["ratings"]) == [4, None, 2]
    assert plain_list(back.iloc[1]["ratings"]) == []  # a missing list cell
    assert plain(first["messages"]) == [{"role": "user", "content": "hi"}]
    assert plain(first["error"]) is None and plain(back.iloc[1]["error"]) == "timeout"
    score = plain(first["score"])
    assert score == 3 and type(score) is int  # numpy int64 -> int, JSON-ready


def test_is_missing():
    assert is_missing(None) and is_missing(float("nan"))
    assert not is_missing(0) and not is_missing("") and not is_missing([])
