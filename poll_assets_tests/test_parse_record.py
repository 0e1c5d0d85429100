"""parse_verdicts reads every recorded judge answer exactly as it did when the record was made.

The record (data/parse_record.json) was made from commit 92cacae (the parser before the issue 24
speed work) over 3,000 answers composed by judge_fuzz with fixed seeds, read against real judge
prompts, some echoing their prompt, plus every corpus answer with and without a prompt
(poll_assets_tests/parse_record.py builds them). It holds, per answer, every verdict's rating, error,
type and reading mode, and a digest of the rationales. Why: a rating must never be read onto the
wrong text (issue 20), so a change of how an answer is read must be deliberate. A faster parser
must reproduce this record exactly; only a deliberate change of reading re-records it (and says
why in its commit).
"""

from __future__ import annotations

import json

import pytest

from poll_assets_tests.parse_record import RECORD, recorded_inputs, summarize


@pytest.fixture(scope="module")
def record() -> dict:
    return json.loads(RECORD.read_text(encoding="utf-8"))


def test_every_recorded_answer_reads_as_recorded(record):
    errors = {e: i for i, e in enumerate(record["errors"])}
    rows = record["readings"]
    seen, changed, inputs_changed = 0, [], []
    for x in recorded_inputs():
        seen += 1
        assert x.id in rows, f"input {x.id} is not in the record: re-record deliberately (parse_record.py)"
        digest, *want = rows[x.id]
        if digest != x.digest():
            inputs_changed.append(x.id)
            continue
        got = summarize(x.read(), errors)
        if got != want:
            changed.append(f"{x.id}: recorded {want}, now {got}")
    assert seen == len(rows)
    assert not inputs_changed, f"the generated inputs changed (judge_fuzz or the prompt builder?): {inputs_changed[:5]}"
    new = [e for e, i in errors.items() if i >= len(record["errors"])]
    assert not changed, f"{len(changed)} answers read differently; new errors {new[:5]}:\n" + "\n".join(changed[:10])


def test_the_record_covers_every_outcome(record):
    """The record is worth checking: ratings, unread texts, echo, names, position, types."""
    rows = list(record["readings"].values())
    ratings = [r for row in rows for r in row[1]]
    assert sum(r is not None for r in ratings) > 3000 and sum(r is None for r in ratings) > 3000
    modes = "".join(row[4] for row in rows)
    assert {"l", "n", "p"} <= set(modes)
    assert any(row[3] for row in rows)
    assert any("only repeats its prompt" in e for e in record["errors"])
    assert any("more than one scheme" in e for e in record["errors"])
