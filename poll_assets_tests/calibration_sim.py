"""Simulated judges with known behaviour, for the calibration tests and bench/calibration_coverage.py.

Each prompt has GENERATORS answers whose true quality (the gold rating a person gives) is drawn on
the 1-5 scale. Judges: `close` is off by one a fifth of the time; `biased` rates one point high;
`random` ignores the answer; `position` rates whichever answer it is shown first a 5 (the others
as the truth, off by one a third of the time). The known value of a figure is its value on a very
large simulation (`population`), which a bootstrap interval from a small one should cover.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from poll_assets.scoring.calibration import JurySpec, RunRatings, calibrate
from poll_assets.scoring.gold import GoldRating, GoldSet

SCALE = (1, 2, 3, 4, 5)
JUDGES = ("close", "biased", "random", "position")
GENERATORS = ("gen_a", "gen_b", "gen_c")


def _noisy(truth: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    step = rng.choice([-1, 1], size=truth.shape) * (rng.random(truth.shape) < share)
    return np.clip(truth + step, 1, 5)


def simulate(n_prompts: int, seed: int) -> tuple[RunRatings, GoldSet]:
    """A run of `n_prompts` prompts rated by the four judges, and the gold ratings of every answer."""
    rng = np.random.default_rng(seed)
    shape = (n_prompts, len(GENERATORS))
    truth = rng.integers(1, 6, size=shape)
    first = rng.integers(0, len(GENERATORS), size=n_prompts)  # the answer the position judge is shown first
    position = _noisy(truth, 1 / 3, rng)
    position[np.arange(n_prompts), first] = 5
    ratings = np.stack([_noisy(truth, 0.2, rng), np.clip(truth + 1, 1, 5), rng.integers(1, 6, size=shape), position])
    ids = [f"{seed:08x}{p:056x}" for p in range(n_prompts)]
    run = RunRatings(ids, [f"prompt {seed} {p}" for p in range(n_prompts)], ratings.astype(float))
    gold = GoldSet("simulated", [GoldRating(ids[p], False, GENERATORS[g], int(truth[p, g]), line=p + 1)
                                 for p in range(n_prompts) for g in range(len(GENERATORS))])
    return run, gold


SPEC = JurySpec(judges=JUDGES, generators=GENERATORS)


@lru_cache(maxsize=1)
def population(n_prompts: int = 10_000, seed: int = 10**6) -> dict[str, dict[str, float | None]]:
    """The known value of every figure of every rater: its value on a very large simulation."""
    run, gold = simulate(n_prompts, seed)
    cal = calibrate(run, gold, SPEC, SCALE, resamples=0)
    return {r.key: {m: e.value for m, e in r.metrics.items()} for r in cal.rows}


def coverage(n_sims: int, n_prompts: int, resamples: int, keys: tuple[str, ...], metrics: tuple[str, ...]) -> dict[str, float]:
    """Share of `n_sims` seeded simulations whose interval covers the known value, per rater/figure."""
    known = population()
    hits = {f"{k}/{m}": 0 for k in keys for m in metrics}
    for seed in range(n_sims):
        run, gold = simulate(n_prompts, seed)
        cal = calibrate(run, gold, SPEC, SCALE, resamples=resamples, seed=seed)
        for k in keys:
            for m in metrics:
                e, truth = cal.row(k).metrics[m], known[k][m]
                hits[f"{k}/{m}"] += e.low is not None and truth is not None and e.low <= truth <= e.high
    return {name: n / n_sims for name, n in hits.items()}
