"""Fuzz benchmark of the verdict parser: composed judge answers -> correct / unread / misattributed /
crashed texts, in total and per style dimension (poll_assets_tests/judge_fuzz.py composes them).

    PYTHONPATH=$PWD python bench/fuzz_verdicts.py --answers 100000 --seed 0 > bench/fuzz-verdicts-<date>.txt

Texts marked ambiguous (a careful reader could not tell) are counted apart and never scored.
"unread" is the share of readable texts (not ambiguous, rated in the answer) that came back None.
Exit status 1 when any readable text is misattributed or any answer raised.
"""

from __future__ import annotations

import argparse
import datetime
import random
import sys
import time
from collections import Counter, defaultdict

from poll_assets.rubrics import get_rubric
from poll_assets.verdicts import parse_verdicts
from poll_assets_tests.judge_fuzz import DIMENSIONS, compose, outcomes

KINDS = ("correct", "unread", "misattributed", "crashed", "ambiguous")


def run(answers: int, seed: int) -> tuple[Counter[str], dict[tuple[str, str], Counter[str]], list[str], float]:
    rubric = get_rubric("instruction-following")
    total: Counter[str] = Counter()
    by_dim: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    examples: list[str] = []
    rng = random.Random(seed)
    start = time.perf_counter()
    for _ in range(answers):
        c = compose(rng)
        try:
            got = [v.rating for v in parse_verdicts(c.text, c.n, rubric, structured=c.dims["layout"].startswith("json"))]
        except Exception as exc:  # counted, not raised: the benchmark reports every crash
            got = None
            examples.append(f"CRASH {type(exc).__name__}: {c.text[:200]!r}")
        outs = outcomes(c, got)
        for o in outs:
            total[o] += 1
            for dim in DIMENSIONS:
                by_dim[(dim, c.dims[dim])][o] += 1
        if "misattributed" in outs and len(examples) < 20:
            examples.append(f"MISATTRIBUTED truth={c.truth} got={got} dims={c.dims}\n{c.text[:600]}")
    return total, by_dim, examples, time.perf_counter() - start


def _row(label: str, c: Counter[str]) -> str:
    readable = c["correct"] + c["unread"] + c["misattributed"]
    unread = c["unread"] / readable if readable else 0.0
    return (f"{label:<34} {c['correct']:>8} {c['unread']:>8} {c['misattributed']:>6} {c['crashed']:>6} "
            f"{c['ambiguous']:>8} {unread:>8.1%}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--answers", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    total, by_dim, examples, seconds = run(args.answers, args.seed)
    print(f"fuzz_verdicts: {args.answers:,} composed answers, seed {args.seed}, "
          f"{datetime.date.today().isoformat()}, {seconds:.0f} s ({seconds / args.answers * 1e3:.2f} ms/answer, shared machine)")
    print(f"{'texts':<34} {'correct':>8} {'unread':>8} {'misatt':>6} {'crash':>6} {'ambig':>8} {'unread%':>8}")
    print(_row("ALL", total))
    for dim in DIMENSIONS:
        print(f"-- {dim}")
        for (d, value), c in sorted(by_dim.items()):
            if d == dim:
                print(_row(f"  {value}", c))
    for e in examples[:20]:
        print(e, file=sys.stderr)
    return 1 if total["misattributed"] or total["crashed"] else 0


if __name__ == "__main__":
    sys.exit(main())
