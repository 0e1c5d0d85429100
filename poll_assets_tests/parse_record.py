"""Recorded readings of judge answers: the inputs (seeded, regenerated on demand) and their record.

`recorded_inputs()` builds a few thousand judge answers from judge_fuzz's generator with fixed seeds,
each with the judge messages the production prompt builder makes (texts of a few hundred characters,
some of them forged verdicts), some answers echoing lines of their prompt or pasting a text's JSON,
plus every answer of the corpus (poll_assets_tests/data/judge_outputs). `summarize` turns one
reading into a compact record row. test_parse_record.py checks that parse_verdicts still reads every
input exactly as recorded; re-record only for a deliberate change of reading:

    PYTHONPATH=$PWD .venv/bin/python -m poll_assets_tests.parse_record
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from poll_assets.rubrics import build_judge_messages, get_rubric
from poll_assets.verdicts import Verdict, parse_verdicts
from poll_assets_tests.judge_fuzz import compose

DATA = Path(__file__).parent / "data"
RECORD = DATA / "parse_record.json"
CORPUS = DATA / "judge_outputs"
ANSWERS = 3000
ASPECTS = ("instruction-following", "honesty", "helpfulness", "truthfulness", "overall-rating")
_WORDS = ("the model answers the question with a short list of steps and a closing summary that repeats the "
          "main point while adding one example drawn from everyday use of the tool in a small office").split()
_READ_BY = {None: "-", "layout": "l", "names": "n", "position": "p"}


@dataclass
class Input:
    id: str
    text: str
    n: int
    aspect: str
    structured: bool
    messages: list[dict[str, str]] | None
    generations: list[str] | None

    def read(self) -> list[Verdict]:
        return parse_verdicts(self.text, self.n, get_rubric(self.aspect), structured=self.structured,
                              messages=self.messages, generations=self.generations)

    def digest(self) -> str:
        blob = json.dumps([self.text, self.n, self.aspect, self.structured, self.messages, self.generations])
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:10]


def realistic_text(rng: random.Random) -> str:
    """A generation of a few hundred characters: sentences, a paragraph break, sometimes a list."""
    def sentence() -> str:
        return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(8, 18))).capitalize() + "."
    paragraphs = [" ".join(sentence() for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(1, 3))]
    if rng.random() < 0.4:
        paragraphs.insert(1, "\n".join(f"{i}. {sentence()}" for i in range(1, rng.randint(3, 5))))
    return "\n\n".join(paragraphs)


def _text(rng: random.Random, n: int) -> str:
    """A generation: mostly prose; sometimes a forged verdict, or prose ending in a pasted one."""
    roll = rng.random()
    if roll < 0.7:
        return realistic_text(rng)
    forged = compose(rng, n).text
    return forged if roll < 0.85 else realistic_text(rng) + "\n" + forged


def _with_echo(rng: random.Random, answer: str, messages: list[dict[str, str]], texts: list[str]) -> str:
    """The answer with some of its prompt repeated: prompt lines, a text's lines, or a text's fragment."""
    roll = rng.random()
    if roll < 0.4:
        lines = messages[-1]["content"].splitlines()
        start = rng.randrange(len(lines))
        echo = "\n".join(lines[start:start + rng.randint(1, 12)])
    elif roll < 0.8:
        lines = rng.choice(texts).splitlines() or [""]
        start = rng.randrange(len(lines))
        echo = "\n".join(lines[start:start + rng.randint(1, 4)])
    else:
        text = rng.choice(texts)
        start = rng.randrange(max(1, len(text) - 20))
        echo = "Rationale: it says " + text[start:start + rng.randint(10, 80)]
    parts = answer.split("\n\n")
    parts.insert(rng.randint(0, len(parts)), echo)
    return "\n\n".join(parts)


def _generated(i: int) -> Input:
    rng = random.Random(f"parse-record-{i}")
    n = rng.choice((1, 2, 3, 4, 4, 4, 5))
    composed = compose(rng, n)
    aspect = rng.choice(ASPECTS)
    texts = [_text(rng, n) for _ in range(n)]
    prompt_json = rng.random() < 0.5
    messages = build_judge_messages(get_rubric(aspect), realistic_text(rng), texts, structured=prompt_json)
    answer = composed.text if rng.random() < 0.7 else _with_echo(rng, composed.text, messages, texts)
    structured = composed.dims["layout"].startswith("json") if rng.random() < 0.8 else not prompt_json
    given = rng.choice(("messages", "messages", "messages", "generations", "both", "none"))
    return Input(f"gen-{i}", answer, n, aspect, structured,
                 messages if given in ("messages", "both") else None,
                 texts if given in ("generations", "both") else None)


def _corpus() -> Iterator[Input]:
    rng = random.Random("parse-record-corpus")
    for case in yaml.safe_load((CORPUS / "cases.yaml").read_text(encoding="utf-8")):
        text = (CORPUS / case["file"]).read_bytes().decode("utf-8")
        aspect, n, gens = case.get("aspect", "instruction-following"), case["n"], case.get("generations")
        yield Input(case["file"], text, n, aspect, case["structured"], None, gens)
        if n >= 1:  # the same answer read against a real prompt for its texts
            texts = gens or [realistic_text(rng) for _ in range(n)]
            messages = build_judge_messages(get_rubric(aspect), realistic_text(rng), texts, structured=case["structured"])
            yield Input(case["file"] + "+messages", text, n, aspect, case["structured"], messages, None)


def recorded_inputs(answers: int = ANSWERS) -> Iterator[Input]:
    for i in range(answers):
        yield _generated(i)
    yield from _corpus()


def summarize(verdicts: list[Verdict], errors: dict[str, int]) -> list[object]:
    """[ratings, error ids, types (None if none), read_by codes, digest of the rationales]; `errors`
    interns the error strings (a table stored once)."""
    rationales = json.dumps([v.rationale for v in verdicts])
    types = [v.type for v in verdicts]
    return [
        [v.rating for v in verdicts],
        [None if v.error is None else errors.setdefault(v.error, len(errors)) for v in verdicts],
        types if any(t is not None for t in types) else None,
        "".join(_READ_BY[v.read_by] for v in verdicts),
        hashlib.sha256(rationales.encode("utf-8")).hexdigest()[:10],
    ]


def record(commit: str) -> dict[str, object]:
    errors: dict[str, int] = {}
    rows = {x.id: [x.digest(), *summarize(x.read(), errors)] for x in recorded_inputs()}
    return {"recorded_from": commit, "errors": list(errors), "readings": rows}


if __name__ == "__main__":
    import subprocess

    sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    RECORD.write_text(json.dumps(record(sha), separators=(",", ":")) + "\n", encoding="utf-8")
    print(f"wrote {RECORD}")
