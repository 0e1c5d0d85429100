"""CPU per judge answer on the judging stage's reading path (issue 24). Not a test.

What is timed is what `poll_assets.assets.judging.judge` does per answer once the calls are back:
`first_reading` (parse_verdicts on the answer, against the request's messages, the echo removed,
the verdicts put back in generation order), then per row `rating_row`, and `repair_figures` on the
frame (which reads every stored answer again for its reading mode). The answers are realistic:
judge_fuzz's composed answers (4 texts, seeded) and every answer of the corpus
(poll_assets_tests/data/judge_outputs), each with the judge messages the production planner
(`plan_judge_task`) builds for an instruction and texts of a few hundred characters.

    PYTHONPATH=$PWD .venv/bin/python bench/parse_speed.py [--answers 2000] [--seed 0] [--repeat 3] [--profile] [--pool]

Figures are `time.process_time` (this process's CPU), the best of `--repeat` passes; `--profile`
adds cProfile's top functions by own time over one pass of `first_reading` (the profiler inflates
the times, so read µs from a run without it). `--pool` times a whole step's parsing (every answer)
in this process alone against half of it handed to one worker process (spawn or fork, its start-up
included) while this process parses the other half: wall time, and this process's CPU.
"""

from __future__ import annotations

import argparse
import cProfile
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
import datetime
import io
import pstats
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from poll_assets.assets.judging import first_reading, rating_row, repair_figures
from poll_assets.assets.keys import RATING_COLUMNS
from poll_assets.llm.base import Completion
from poll_assets.panel import Judging, Member
from poll_assets.rubrics import echo, get_rubric
from poll_assets.rubrics.ultrafeedback import Rubric
from poll_assets.stage_requests import JudgeTask, plan_judge_task
from poll_assets.verdicts import Verdict, parse_verdicts
from poll_assets_tests.judge_fuzz import compose
from poll_assets_tests.parse_record import realistic_text

CORPUS = Path(__file__).resolve().parent.parent / "poll_assets_tests" / "data" / "judge_outputs"
MEMBER = Member(name="judge", provider="openai", model="judge-1", family="judge")
JUDGING = Judging()


@dataclass
class Case:
    task: JudgeTask
    completion: Completion
    rubric: Rubric


def _case(rng: random.Random, prompt_id: str, text: str, n: int, structured: bool, rubric: Rubric,
          generations: list[str] | None = None) -> Case:
    gens = generations if generations and len(generations) == n else [realistic_text(rng) for _ in range(n)]
    row = pd.Series({"prompt_id": prompt_id, "instruction": realistic_text(rng), "generations": gens})
    task = plan_judge_task(row, MEMBER, JUDGING, rubric)
    return Case(task, Completion(text, output_mode="json_schema" if structured else "text"), rubric)


def workload(answers: int, seed: int) -> list[Case]:
    """`answers` composed 4-text answers (judge_fuzz, seeded), then every corpus answer."""
    rng = random.Random(seed)
    rubric = get_rubric("instruction-following")
    cases = []
    for i in range(answers):
        c = compose(rng, 4)
        cases.append(_case(rng, f"fuzz-{seed}-{i}", c.text, 4, c.dims["layout"].startswith("json"), rubric))
    for spec in yaml.safe_load((CORPUS / "cases.yaml").read_text(encoding="utf-8")):
        if spec["n"] < 1:
            continue
        text = (CORPUS / spec["file"]).read_bytes().decode("utf-8")
        cases.append(_case(rng, spec["file"], text, spec["n"], spec["structured"],
                           get_rubric(spec.get("aspect", "instruction-following")), spec.get("generations")))
    return cases


def best_cpu(fn: Callable[[], Any], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        _forget_prompts()
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def _forget_prompts() -> None:
    """Each pass reads every answer as a first reading: no prompt's echo material cached from the last."""
    material = getattr(echo, "_material", None)
    if material is not None and hasattr(material, "cache_clear"):
        material.cache_clear()


def measure(cases: list[Case], repeat: int) -> dict[str, float]:
    """µs per answer of each part of the reading path."""
    def parse_only() -> None:
        for c in cases:
            assert c.task.request is not None
            parse_verdicts(c.completion.text, len(c.task.shown), c.rubric, structured=c.completion.structured,
                           messages=c.task.request.message_dicts())

    def readings() -> list[Any]:
        return [first_reading(c.task, c.completion, c.rubric) for c in cases]

    calls = readings()

    def rows() -> pd.DataFrame:
        return RATING_COLUMNS.frame([rating_row(call, MEMBER) for call in calls])

    frame = rows()
    per = 1e6 / len(cases)
    return {
        "parse_verdicts": best_cpu(parse_only, repeat) * per,
        "first_reading": best_cpu(readings, repeat) * per,
        "rating_row + frame": best_cpu(rows, repeat) * per,
        "repair_figures": best_cpu(lambda: repair_figures(frame), repeat) * per,
    }


Item = tuple[str, int, str, bool, list[dict[str, str]]]  # answer, n, aspect, structured, messages


def read_items(items: list[Item]) -> list[list[Verdict]]:
    """What a worker process would do: parse_verdicts on each answer against its messages."""
    return [parse_verdicts(text, n, get_rubric(aspect), structured=structured, messages=messages)
            for text, n, aspect, structured, messages in items]


def pool_figures(cases: list[Case], method: str) -> dict[str, float]:
    """Seconds of wall and of this process's CPU: every answer here, or half of them in one worker."""
    items: list[Item] = [(c.completion.text or "", len(c.task.shown), c.rubric.aspect, c.completion.structured,
                          c.task.request.message_dicts()) for c in cases if c.task.request is not None]
    _forget_prompts()
    wall, cpu = time.perf_counter(), time.process_time()
    serial = read_items(items)
    out = {"serial wall": time.perf_counter() - wall, "serial cpu": time.process_time() - cpu}
    _forget_prompts()
    wall, cpu = time.perf_counter(), time.process_time()
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context(method)) as pool:
        started = pool.submit(int, 0)  # the worker up and importing
        started.result()
        out["pool start-up wall"] = time.perf_counter() - wall
        half = len(items) // 2
        there = pool.submit(read_items, items[:half])
        here = read_items(items[half:])
        pooled = there.result() + here
    out["pooled wall"] = time.perf_counter() - wall
    out["pooled cpu (this process)"] = time.process_time() - cpu
    assert pooled == serial, "the worker read some answer differently"
    return out


def profile(cases: list[Case], top: int = 25) -> str:
    prof = cProfile.Profile()
    prof.enable()
    for c in cases:
        first_reading(c.task, c.completion, c.rubric)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--answers", type=int, default=2000, help="composed 4-text answers (the corpus is added)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--pool", action="store_true", help="also time the parse split with one worker process")
    args = parser.parse_args()
    cases = workload(args.answers, args.seed)
    chars = sum(len(c.completion.text or "") for c in cases) / len(cases)
    prompt = sum(len(c.task.request.messages[-1][1]) for c in cases if c.task.request) / len(cases)
    print(f"parse_speed {datetime.date.today().isoformat()}: {len(cases)} answers ({args.answers} composed + corpus), "
          f"mean answer {chars:.0f} chars, mean judge prompt {prompt:.0f} chars; best of {args.repeat}; shared machine")
    figures = measure(cases, args.repeat)
    for name, us in figures.items():
        print(f"  {name:<20} {us:8.0f} µs/answer")
    total = figures["first_reading"] + figures["rating_row + frame"] + figures["repair_figures"]
    print(f"  {'reading path total':<20} {total:8.0f} µs/answer")
    if args.pool:
        for method in ("spawn", "fork"):
            figures = pool_figures(cases, method)
            print(f"  pool ({method}): " + ", ".join(f"{k} {v:.2f} s" for k, v in figures.items()))
    if args.profile:
        print(profile(cases))


if __name__ == "__main__":
    main()
