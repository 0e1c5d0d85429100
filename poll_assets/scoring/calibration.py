"""Calibration against gold labels: each judge, the jury and each jury that leaves one judge out,
with percentile bootstrap intervals over prompts (pure, no Dagster).

Ratings give quadratic-weighted Cohen's kappa, Kendall's tau-b, Spearman's rho, the mean absolute
error and the mean signed error (bias); preferences (gold rows, or pairs derived from two gold
ratings of one prompt) give the agreement on a / b / tie and Cohen's kappa on that 3-way label.
Every figure comes from per-prompt contingency tables, so one bootstrap resample is a weighted sum
of them: the point estimate is the resample that weighs every prompt once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

import numpy as np

from poll_assets.scoring.agreement import kendall_tau_b_table, quadratic_kappa_table
from poll_assets.scoring.gold import GoldSet, instruction_key
from poll_assets.scoring.pooled_ratings import pool_ratings, prompt_fold

MIN_ITEMS = 5  # fewer labelled items for a rater and its figures are absent
MIN_PROMPTS = 5  # fewer labelled prompts and no interval (a bootstrap over a handful of prompts is too narrow)
MAX_UNDEFINED_SHARE = 0.05  # more resamples than this where a figure is undefined: no interval
FIT_MIN_ITEMS = 3  # labelled items per judge needed to fit its weight
FIT_FLOOR = 0.1  # added to a judge's error before inverting it, so a perfect fold does not get all the weight
RATING_METRICS = ("kappa", "tau", "spearman", "mae", "bias")
PREFERENCE_METRICS = ("pref_agreement", "pref_kappa")
HIGHER_IS_BETTER = ("kappa", "tau", "spearman", "pref_agreement", "pref_kappa")
WINNER_CODES = {"a": 0, "b": 1, "tie": 2}


@dataclass(frozen=True)
class JurySpec:
    """How the panel pools: the judges and generators (panel order), the method, the self-family
    mask, and the weights (`None`, a mapping judge -> weight, or "fit")."""

    judges: tuple[str, ...]
    generators: tuple[str, ...]
    method: str = "mean"
    min_judges: int = 1
    exclude: tuple[tuple[bool, ...], ...] | None = None
    weights: Mapping[str, float] | str | None = None
    folds: int = 5
    seed: int = 0


@dataclass
class RunRatings:
    """The run's prompts and every judge's rating of every generation: ratings[j, p, g] (nan: none)."""

    prompt_ids: list[str]
    instructions: list[str]
    ratings: np.ndarray

    @classmethod
    def from_lists(cls, prompt_ids: Sequence[str], instructions: Sequence[str],
                   poll_ratings: Sequence[Sequence[Sequence[int | None]]], n_judges: int, n_generators: int) -> "RunRatings":
        """From the pooled frame's columns (`poll_ratings`: judge x generation per prompt)."""
        array = np.full((n_judges, len(prompt_ids), n_generators), np.nan)
        for p, matrix in enumerate(poll_ratings):
            for j, row in enumerate(matrix):
                for g, value in enumerate(row):
                    if value is not None and value == value:
                        array[j, p, g] = float(value)
        return cls(list(prompt_ids), list(instructions), array)


@dataclass
class GoldItems:
    """Gold labels matched to the run: rating items (prompt, generation, rating) and preference items
    (prompt, a, b, winner code 0=a 1=b 2=tie), as index arrays; `counts` says what matched and what not."""

    rating_p: np.ndarray
    rating_g: np.ndarray
    rating_gold: np.ndarray
    pref_p: np.ndarray
    pref_a: np.ndarray
    pref_b: np.ndarray
    pref_win: np.ndarray
    counts: dict[str, int] = field(default_factory=dict)

    def prompts(self) -> np.ndarray:
        return np.unique(np.concatenate([self.rating_p, self.pref_p]).astype(int))

    def restrict(self, keep_prompt: np.ndarray) -> "GoldItems":
        """The items whose prompt index is marked in the boolean `keep_prompt`."""
        r, q = keep_prompt[self.rating_p], keep_prompt[self.pref_p]
        return GoldItems(self.rating_p[r], self.rating_g[r], self.rating_gold[r], self.pref_p[q], self.pref_a[q],
                         self.pref_b[q], self.pref_win[q], dict(self.counts))


@dataclass(frozen=True)
class Estimate:
    """One figure: its value on the labelled prompts and a percentile bootstrap interval; None with a reason
    when it cannot be computed."""

    value: float | None
    low: float | None = None
    high: float | None = None
    n: int = 0
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "low": self.low, "high": self.high, "n": self.n, "reason": self.reason}


@dataclass
class CalibrationRow:
    key: str  # machine name: a judge's name, jury_mean, jury_weighted, without_<judge>
    label: str
    kind: str  # "judge", "jury" or "leave_one_out"
    n_ratings: int
    n_pairs: int
    metrics: dict[str, Estimate]


@dataclass
class Calibration:
    rows: list[CalibrationRow]
    jury: str  # the key of the jury the panel pools with (jury_mean, jury_weighted, ...)
    primary: str | None  # the figure the verdict compares: kappa on ratings, else kappa on preferences
    comparisons: dict[str, Estimate]  # "jury_minus_best", "without_<judge>_minus_jury": paired differences
    verdict: list[str]
    counts: dict[str, int]
    weights: dict[str, float] | None  # the weighted jury's weights (fitted on every labelled prompt, or given)
    weights_source: str
    resamples: int
    level: float

    def row(self, key: str) -> CalibrationRow:
        return next(r for r in self.rows if r.key == key)

    def to_dict(self) -> dict[str, Any]:
        return {
            "jury": self.jury, "primary": self.primary, "verdict": self.verdict, "counts": self.counts, "weights": self.weights,
            "weights_source": self.weights_source, "resamples": self.resamples, "level": self.level,
            "rows": [{"key": r.key, "label": r.label, "kind": r.kind, "n_ratings": r.n_ratings, "n_pairs": r.n_pairs,
                      "metrics": {m: e.to_dict() for m, e in r.metrics.items()}} for r in self.rows],
            "comparisons": {k: e.to_dict() for k, e in self.comparisons.items()},
        }


# --- matching gold labels to the run ---------------------------------------------------------------


def match_gold(gold: GoldSet, run: RunRatings, generators: Sequence[str]) -> GoldItems:
    """The gold labels of `run`'s prompts, as items. Labels for prompts outside the run (another shard,
    or none) and for generators the panel does not have are counted, never used silently. Two gold
    ratings of one prompt also give a preference item, unless a gold preference names that pair."""
    by_id = {pid: p for p, pid in enumerate(run.prompt_ids)}
    by_text = {instruction_key(text): p for p, text in enumerate(run.instructions)}
    gen = {name: g for g, name in enumerate(generators)}
    counts = {"rating_labels": 0, "preference_labels": 0, "derived_pairs": 0,
              "labels_outside_prompts": 0, "labels_unknown_generator": 0, "labels_repeated": 0}

    def prompt_of(ref: str, text: bool) -> int | None:
        return (by_text.get(ref) if text else None) if ref not in by_id else by_id[ref]

    ratings: dict[tuple[int, int], int] = {}
    for r in gold.ratings:
        p = prompt_of(r.prompt, r.by_text)
        if r.generator not in gen:
            counts["labels_unknown_generator"] += 1
        elif p is None:
            counts["labels_outside_prompts"] += 1
        elif (p, gen[r.generator]) in ratings:
            # one prompt named by id in one row and by a text that differs only in line endings in another
            counts["labels_repeated"] += 1
        else:
            ratings[(p, gen[r.generator])] = r.rating
    prefs: dict[tuple[int, int, int], int] = {}
    for q in gold.preferences:
        p = prompt_of(q.prompt, q.by_text)
        if q.a not in gen or q.b not in gen:
            counts["labels_unknown_generator"] += 1
        elif p is None:
            counts["labels_outside_prompts"] += 1
        elif (p, gen[q.a], gen[q.b]) in prefs or (p, gen[q.b], gen[q.a]) in prefs:
            counts["labels_repeated"] += 1
        else:
            prefs[(p, gen[q.a], gen[q.b])] = WINNER_CODES[q.winner]
    counts["rating_labels"], counts["preference_labels"] = len(ratings), len(prefs)
    rated = [(p, g, rating) for (p, g), rating in ratings.items()]
    counts["derived_pairs"] = _derive_pairs(rated, prefs)
    rating_arrays = [np.array(c, dtype=int) for c in zip(*rated)] if rated else [np.zeros(0, int)] * 3
    pref_arrays = ([np.array([k[i] for k in prefs], dtype=int) for i in range(3)] + [np.array(list(prefs.values()), dtype=int)]
                   if prefs else [np.zeros(0, int)] * 4)
    return GoldItems(*rating_arrays, *pref_arrays, counts=counts)


def _derive_pairs(ratings: list[tuple[int, int, int]], prefs: dict[tuple[int, int, int], int]) -> int:
    """Add a preference item for every two gold ratings of one prompt (a tie when they are equal)."""
    by_prompt: dict[int, list[tuple[int, int]]] = {}
    for p, g, rating in ratings:
        by_prompt.setdefault(p, []).append((g, rating))
    added = 0
    for p, rated in by_prompt.items():
        for (ga, ra), (gb, rb) in combinations(sorted(rated), 2):
            if (p, ga, gb) in prefs or (p, gb, ga) in prefs:
                continue  # an explicit preference for this pair wins over the one its ratings imply
            prefs[(p, ga, gb)] = 0 if ra > rb else 1 if rb > ra else 2
            added += 1
    return added


# --- the raters: judges, juries, juries without one judge -------------------------------------------


def jury_values(run: RunRatings, spec: JurySpec, members: Sequence[int], method: str,
                weights_of: Any = None) -> np.ndarray:
    """The pooled rating (P, G) of the jury made of judges `members`, pooled as the pipeline pools
    (pool_ratings, with the self-family mask); `weights_of(p)`: the judges' weights for prompt p."""
    out = np.full(run.ratings.shape[1:], np.nan)
    exclude = [list(spec.exclude[j]) for j in members] if spec.exclude is not None else None
    for p in range(run.ratings.shape[1]):
        matrix = [[None if v != v else int(v) for v in run.ratings[j, p]] for j in members]
        weights = weights_of(p) if weights_of is not None else None
        pooled = pool_ratings(matrix, method=method, min_judges=min(spec.min_judges, len(members)),
                              exclude=exclude, weights=weights)
        out[p] = [np.nan if v is None else v for v in pooled.avg]
    return out


def fit_weights(run: RunRatings, items: GoldItems, members: Sequence[int],
                names: Sequence[str] | None = None) -> tuple[list[float] | None, str]:
    """Weights for the judges `members` from the gold items given: the inverse of each judge's mean
    squared error on gold ratings (plus FIT_FLOOR), or, with no gold ratings, of its share of gold
    preferences it gets wrong; normalized to sum to 1. None, with the reason, when a judge has fewer
    than FIT_MIN_ITEMS labelled items."""
    errors = []
    use_ratings = len(items.rating_p) > 0
    for j in members:
        if use_ratings:
            values = run.ratings[j, items.rating_p, items.rating_g]
            ok = ~np.isnan(values)
            error = np.mean((values[ok] - items.rating_gold[ok]) ** 2) if ok.sum() >= FIT_MIN_ITEMS else None
        else:
            labels = _preference_labels(run.ratings[j], items)
            ok = labels >= 0
            error = np.mean(labels[ok] != items.pref_win[ok]) if ok.sum() >= FIT_MIN_ITEMS else None
        if error is None:
            return None, f"fewer than {FIT_MIN_ITEMS} gold-labelled items rated by judge {names[j] if names else j}"
        errors.append(float(error))
    raw = [1.0 / (e + FIT_FLOOR) for e in errors]
    basis = "mean squared error on gold ratings" if use_ratings else "error share on gold preferences"
    return [w / sum(raw) for w in raw], f"inverse {basis}"


def crossfit_weights(run: RunRatings, items: GoldItems, members: Sequence[int], folds: int, seed: int,
                     names: Sequence[str] | None = None) -> tuple[dict[int, list[float]], list[float], str]:
    """Weights per prompt, cross-fitted: a labelled prompt gets weights fitted on the labelled prompts
    of the other folds (so no figure is reported on the prompts its weights were fitted on); every
    other prompt gets weights fitted on all labelled prompts. A fit without enough labels falls back
    to equal weights (the mean), and the returned description says so."""
    equal = [1.0 / len(members)] * len(members)
    fold = np.array([prompt_fold(pid, folds, seed) for pid in run.prompt_ids], dtype=int)
    labelled = np.zeros(len(run.prompt_ids), dtype=bool)
    labelled[items.prompts()] = True
    overall, reason = fit_weights(run, items, members, names)
    if overall is None:
        return {p: equal for p in range(len(run.prompt_ids))}, equal, f"equal weights (not fitted: {reason})"
    per_fold = {f: fit_weights(run, items.restrict(labelled & (fold != f)), members)[0] for f in range(folds)}
    fallback = sorted(f for f, w in per_fold.items() if w is None and (labelled & (fold == f)).any())
    per_prompt = {p: ((per_fold[int(fold[p])] or equal) if labelled[p] else overall) for p in range(len(run.prompt_ids))}
    source = f"fitted: {reason} (+{FIT_FLOOR}), cross-fitted over {folds} prompt folds"
    if fallback:
        source += f"; folds {fallback} had too few labels outside them and use equal weights"
    return per_prompt, overall, source


def jury_weights(run: RunRatings, items: GoldItems, spec: JurySpec, members: Sequence[int]) -> tuple[Any, dict[str, Any]]:
    """The weighted jury's weights per prompt (a function of the prompt index) and what they are: the
    panel's own (given), else cross-fitted on the gold items."""
    if isinstance(spec.weights, Mapping):
        given = [float(spec.weights.get(spec.judges[j], 0.0)) for j in members]
        return (lambda p: given), {"source": "given", "weights": {spec.judges[j]: w for j, w in zip(members, given)}}
    per_prompt, overall, source = crossfit_weights(run, items, members, spec.folds, spec.seed, spec.judges)
    return per_prompt.get, {"source": source, "weights": {spec.judges[j]: w for j, w in zip(members, overall)}}


def pooling_weights(run: RunRatings, gold: GoldSet | None, spec: JurySpec) -> tuple[Any, dict[str, Any]]:
    """What the pipeline pools a shard with under `pooling.method: weighted`: weights per prompt index."""
    if isinstance(spec.weights, Mapping) or gold is None:
        return jury_weights(run, match_gold(GoldSet("none"), run, spec.generators), spec, range(len(spec.judges)))
    return jury_weights(run, match_gold(gold, run, spec.generators), spec, range(len(spec.judges)))


def _raters(run: RunRatings, items: GoldItems, spec: JurySpec) -> tuple[dict[str, tuple[str, str, np.ndarray]], dict[str, Any]]:
    """Every rater's values: key -> (label, kind, values (P, G)), and the weighted jury's weights."""
    everyone = list(range(len(spec.judges)))
    raters = {name: (name, "judge", run.ratings[j]) for j, name in enumerate(spec.judges)}
    raters["jury_mean"] = ("jury (mean)", "jury", jury_values(run, spec, everyone, "mean"))
    if spec.method in ("median", "majority"):
        raters[f"jury_{spec.method}"] = (f"jury ({spec.method})", "jury", jury_values(run, spec, everyone, spec.method))
    weights_of, info = jury_weights(run, items, spec, everyone)
    raters["jury_weighted"] = (f"jury (weighted, {info['source'].split(':')[0].split(' (')[0]})", "jury",
                               jury_values(run, spec, everyone, "weighted", weights_of))
    if len(spec.judges) > 1:
        for j, name in enumerate(spec.judges):
            rest = [k for k in everyone if k != j]
            rest_weights = jury_weights(run, items, spec, rest)[0] if spec.method == "weighted" else None
            raters[f"without_{name}"] = (f"jury without {name}", "leave_one_out",
                                         jury_values(run, spec, rest, spec.method, rest_weights))
    return raters, info


# --- figures from per-prompt tables, for the point estimate and every resample at once ---------------


def _preference_labels(values: np.ndarray, items: GoldItems) -> np.ndarray:
    """A rater's 3-way label per preference item (0: a above b, 1: b above a, 2: tie; -1: unrated)."""
    va, vb = values[items.pref_p, items.pref_a], values[items.pref_p, items.pref_b]
    labels = np.where(va > vb, 0, np.where(vb > va, 1, 2))
    return np.where(np.isnan(va) | np.isnan(vb), -1, labels)


def spearman_table(table: np.ndarray) -> np.ndarray:
    """Spearman's rho (ties as mid-ranks) of contingency tables (..., K, L); nan where a side is constant."""
    rows, cols = table.sum(axis=-1), table.sum(axis=-2)
    row_rank = np.cumsum(rows, axis=-1) - rows + (rows + 1) / 2
    col_rank = np.cumsum(cols, axis=-1) - cols + (cols + 1) / 2
    n = rows.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        rc = row_rank - (rows * row_rank).sum(axis=-1, keepdims=True) / n
        cc = col_rank - (cols * col_rank).sum(axis=-1, keepdims=True) / n
        cov = (table * rc[..., :, None] * cc[..., None, :]).sum(axis=(-2, -1))
        var = (rows * rc ** 2).sum(axis=-1) * (cols * cc ** 2).sum(axis=-1)
        rho = cov / np.sqrt(var)
    return np.where(var > 1e-12, rho, np.nan)


def cohen_kappa_table(table: np.ndarray) -> np.ndarray:
    """Unweighted Cohen's kappa of square tables (..., K, K); nan where chance agreement is 1."""
    total = table.sum(axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        observed = np.trace(table, axis1=-2, axis2=-1) / total
        chance = (table.sum(axis=-1) * table.sum(axis=-2)).sum(axis=-1) / total ** 2
        kappa = (observed - chance) / (1 - chance)
    return np.where((total > 0) & (chance < 1 - 1e-12), kappa, np.nan)


def _per_prompt_tables(p: np.ndarray, rows: np.ndarray, cols: np.ndarray, n_prompts: int, shape: tuple[int, int]) -> np.ndarray:
    tables = np.zeros((n_prompts, *shape))
    np.add.at(tables, (p, rows, cols), 1)
    return tables


def rating_stats(values: np.ndarray, items: GoldItems, scale: Sequence[int], resample: np.ndarray) -> tuple[dict[str, np.ndarray], int]:
    """Rating figures of a rater for each row of `resample` (resamples x prompts: how often each prompt
    is drawn), and how many labelled generations the rater rated. The rater's value is rounded to the
    nearest scale point for kappa only; tau, rho and the errors use it as it is (a jury's mean)."""
    v = values[items.rating_p, items.rating_g]
    ok = ~np.isnan(v)
    p, gold, v = items.rating_p[ok], items.rating_gold[ok], v[ok]
    n_prompts, scale_arr = resample.shape[1], np.asarray(scale, dtype=float)
    gold_pos = np.searchsorted(scale_arr, gold)
    nearest = np.searchsorted((scale_arr[:-1] + scale_arr[1:]) / 2, v, side="right")
    levels = np.unique(v)
    square = _per_prompt_tables(p, gold_pos, nearest, n_prompts, (len(scale), len(scale)))
    ranked = _per_prompt_tables(p, gold_pos, np.searchsorted(levels, v), n_prompts, (len(scale), max(len(levels), 1)))
    count, abs_err, signed = (np.bincount(p, w, minlength=n_prompts) for w in (np.ones_like(v), np.abs(v - gold), v - gold))
    with np.errstate(invalid="ignore", divide="ignore"):
        stats = {
            "kappa": quadratic_kappa_table(np.einsum("bp,pkl->bkl", resample, square)),
            "tau": kendall_tau_b_table(np.einsum("bp,pkl->bkl", resample, ranked)),
            "spearman": spearman_table(np.einsum("bp,pkl->bkl", resample, ranked)),
            "mae": resample @ abs_err / (resample @ count),
            "bias": resample @ signed / (resample @ count),
        }
    return stats, int(ok.sum())


def preference_stats(values: np.ndarray, items: GoldItems, resample: np.ndarray) -> tuple[dict[str, np.ndarray], int]:
    """Preference figures of a rater for each resample: agreement on a / b / tie and Cohen's kappa on it."""
    return preference_label_stats(_preference_labels(values, items), items, resample)


def preference_label_stats(labels: np.ndarray, items: GoldItems, resample: np.ndarray) -> tuple[dict[str, np.ndarray], int]:
    """`preference_stats` from a rater's label per preference item (0 a, 1 b, 2 tie, -1 none): pairwise
    judging gives these labels directly."""
    ok = labels >= 0
    tables = _per_prompt_tables(items.pref_p[ok], items.pref_win[ok], labels[ok], resample.shape[1], (3, 3))
    batch = np.einsum("bp,pkl->bkl", resample, tables)
    with np.errstate(invalid="ignore", divide="ignore"):
        agreement = np.trace(batch, axis1=-2, axis2=-1) / batch.sum(axis=(-2, -1))
    return {"pref_agreement": agreement, "pref_kappa": cohen_kappa_table(batch)}, int(ok.sum())


def estimate(stats: np.ndarray, n: int, n_prompts: int, level: float) -> Estimate:
    """stats[0]: the figure on the labelled prompts; stats[1:]: on each resample. Absent, with the reason,
    when there are too few labels or the figure is undefined (no variance)."""
    if n < MIN_ITEMS:
        return Estimate(None, n=n, reason=f"too few labels ({n} < {MIN_ITEMS})")
    if not np.isfinite(stats[0]):
        return Estimate(None, n=n, reason="undefined: no variance in the gold labels or in this rater's ratings")
    value = float(stats[0])
    if n_prompts < MIN_PROMPTS:
        return Estimate(value, n=n, reason=f"no interval: {n_prompts} labelled prompts (< {MIN_PROMPTS})")
    boot = stats[1:]
    if not len(boot):
        return Estimate(value, n=n, reason="no interval: gold.bootstrap_resamples is 0")
    undefined = float(np.mean(~np.isfinite(boot)))
    if undefined > MAX_UNDEFINED_SHARE:
        return Estimate(value, n=n, reason=f"no interval: undefined in {undefined:.0%} of resamples (too few labels)")
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(boot[np.isfinite(boot)], [tail, 100 - tail])
    return Estimate(value, float(low), float(high), n=n)


# --- the table and the verdict ----------------------------------------------------------------------


def bootstrap_weights(n_prompts: int, resamples: int, seed: int) -> np.ndarray:
    """Row 0: every prompt once (the point estimate); rows 1..: how often each prompt is drawn in a
    resample of the labelled prompts with replacement (seeded)."""
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n_prompts, np.full(n_prompts, 1 / n_prompts), size=resamples) if n_prompts else \
        np.zeros((resamples, 0))
    return np.vstack([np.ones((1, n_prompts)), draws]).astype(float)


def calibrate(run: RunRatings, gold: GoldSet, spec: JurySpec, scale: Sequence[int], *, resamples: int = 1000,
              seed: int = 0, level: float = 0.95) -> Calibration:
    """The calibration table of every judge, the jury (mean, weighted, and the panel's method) and every
    jury without one judge, on the prompts of `run` that have gold labels."""
    items = match_gold(gold, run, spec.generators)
    labelled = items.prompts()
    # Only labelled prompts are scored and resampled: index every item by its labelled prompt's position.
    position = np.full(len(run.prompt_ids), -1)
    position[labelled] = np.arange(len(labelled))
    sub = RunRatings([run.prompt_ids[p] for p in labelled], [run.instructions[p] for p in labelled],
                     run.ratings[:, labelled])
    local = GoldItems(position[items.rating_p], items.rating_g, items.rating_gold, position[items.pref_p],
                      items.pref_a, items.pref_b, items.pref_win, items.counts)
    raters, weight_info = _raters(sub, local, spec)
    resample = bootstrap_weights(len(labelled), resamples, seed)
    counts = {**items.counts, "labelled_prompts": len(labelled), "prompts": len(run.prompt_ids)}
    rows, raw = [], {}
    for key, (label, kind, values) in raters.items():
        r_stats, n_r = rating_stats(values, local, scale, resample)
        p_stats, n_p = preference_stats(values, local, resample)
        raw[key] = {**r_stats, **p_stats}
        metrics = {m: estimate(s, n_r, len(labelled), level) for m, s in r_stats.items()}
        metrics.update({m: estimate(s, n_p, len(labelled), level) for m, s in p_stats.items()})
        rows.append(CalibrationRow(key, label, kind, n_r, n_p, metrics))
    primary = _primary(rows)
    jury = f"jury_{spec.method}"
    comparisons = _comparisons(rows, raw, primary, jury, len(labelled), level) if primary else {}
    return Calibration(rows, jury, primary, comparisons, _verdict(rows, comparisons, primary, jury), counts,
                       weight_info["weights"], weight_info["source"], resamples, level)


def _primary(rows: list[CalibrationRow]) -> str | None:
    """Kappa on ratings when some judge has it, else kappa on preferences, else nothing to compare."""
    for metric in ("kappa", "pref_kappa"):
        if any(r.metrics[metric].value is not None for r in rows if r.kind == "judge"):
            return metric
    return None


def best_judge(rows: list[CalibrationRow], metric: str) -> CalibrationRow | None:
    judged = [r for r in rows if r.kind == "judge" and r.metrics[metric].value is not None]
    return max(judged, key=lambda r: r.metrics[metric].value) if judged else None


def _difference(a: np.ndarray, b: np.ndarray, n: int, n_prompts: int, level: float) -> Estimate:
    """a - b on the same resamples (paired), so what the two raters share cancels out."""
    return estimate(a - b, n, n_prompts, level)


def _comparisons(rows: list[CalibrationRow], raw: dict[str, dict[str, np.ndarray]], metric: str, jury: str,
                 n_prompts: int, level: float) -> dict[str, Estimate]:
    best = best_judge(rows, metric)
    by_key = {r.key: r for r in rows}
    n_of = lambda key: by_key[key].n_ratings if metric in RATING_METRICS else by_key[key].n_pairs  # noqa: E731
    out = {}
    if best is not None:
        out["jury_minus_best"] = _difference(raw[jury][metric], raw[best.key][metric],
                                             min(n_of(jury), n_of(best.key)), n_prompts, level)
    for key in (r.key for r in rows if r.kind == "leave_one_out"):
        out[f"{key}_minus_jury"] = _difference(raw[key][metric], raw[jury][metric],
                                               min(n_of(key), n_of(jury)), n_prompts, level)
    return out


def _span(e: Estimate) -> str:
    return f"difference {e.value:+.3f}, interval {e.low:+.3f} to {e.high:+.3f}"


def _verdict(rows: list[CalibrationRow], comparisons: dict[str, Estimate], metric: str | None, jury: str) -> list[str]:
    """Sentences stated only where the paired interval excludes 0; otherwise: the data cannot tell."""
    if metric is None:
        return ["No verdict: too few gold labels matched this run for any judge's figures."]
    name = {"kappa": "quadratic kappa on ratings", "pref_kappa": "kappa on preferences"}[metric]
    best = best_judge(rows, metric)
    diff = comparisons.get("jury_minus_best")
    jury_label = next(r.label for r in rows if r.key == jury)
    if best is None or diff is None or diff.low is None:
        said = [f"The data cannot tell whether the {jury_label} beats its best judge ({name}: "
                f"{diff.reason if diff else 'no comparable figure'})."]
    elif diff.low > 0:
        said = [f"The {jury_label} agrees with the gold labels better than its best judge, {best.key} ({name} {_span(diff)})."]
    elif diff.high < 0:
        said = [f"The best judge, {best.key}, agrees with the gold labels better than the {jury_label} ({name} {_span(diff)})."]
    else:
        said = [f"The data cannot tell the {jury_label} from its best judge, {best.key} ({name} {_span(diff)}: the interval spans 0)."]
    better = [k.removesuffix("_minus_jury").removeprefix("without_") for k, e in comparisons.items()
              if k.endswith("_minus_jury") and e.low is not None and e.low > 0]
    worse = [k.removesuffix("_minus_jury").removeprefix("without_") for k, e in comparisons.items()
             if k.endswith("_minus_jury") and e.high is not None and e.high < 0]
    if better:
        said.append(f"Leaving out {', '.join(better)} improves the jury ({name}; the interval of the difference is above 0).")
    elif any(k.endswith("_minus_jury") for k in comparisons):
        said.append("The data do not show that leaving out any one judge would improve the jury.")
    if worse:
        said.append(f"Leaving out {', '.join(worse)} makes the jury worse.")
    return said


# --- how it is shown ----------------------------------------------------------------------------------

COLUMNS = (("kappa", "kappa (quadratic)"), ("tau", "Kendall tau-b"), ("spearman", "Spearman rho"), ("mae", "MAE"),
           ("bias", "bias"), ("pref_agreement", "pref. agreement"), ("pref_kappa", "pref. kappa"))


def _cell(e: Mapping[str, Any]) -> str:
    if e["value"] is None:
        return "n/a"
    return f"{e['value']:.2f} [{e['low']:.2f}, {e['high']:.2f}]" if e["low"] is not None else f"{e['value']:.2f}"


def calibration_markdown(cal: Calibration | Mapping[str, Any]) -> str:
    """The table (one row per judge, jury and leave-one-out jury), the verdict, and what is absent and
    why; from a Calibration or its `to_dict()` (as the dataset card keeps it)."""
    d = cal.to_dict() if isinstance(cal, Calibration) else cal
    head = "| rater | ratings | pairs | " + " | ".join(t for _, t in COLUMNS) + " |"
    lines = [head, "|" + " --- |" * (3 + len(COLUMNS))]
    for r in d["rows"]:
        lines.append(f"| {r['label']} | {r['n_ratings']} | {r['n_pairs']} | "
                     + " | ".join(_cell(r["metrics"][m]) for m, _ in COLUMNS) + " |")
    c = d["counts"]
    lines += ["", f"Intervals: {d['level']:.0%} percentile bootstrap over the {c.get('labelled_prompts', 0)} labelled "
              f"prompts, {d['resamples']} resamples. Bias: mean signed error against the gold rating.",
              f"Weighted jury: {d['weights_source']}" + (f"; weights {_weights_text(d['weights'])}" if d["weights"] else "") + ".",
              f"Gold labels used: {c.get('rating_labels', 0)} rating(s), {c.get('preference_labels', 0)} preference(s) "
              f"(+{c.get('derived_pairs', 0)} pairs derived from ratings); not used: {c.get('labels_outside_prompts', 0)} "
              f"for prompts outside these shards, {c.get('labels_unknown_generator', 0)} naming a generator the panel does not have"
              + (f", {c['labels_repeated']} repeating a label (the first kept)" if c.get("labels_repeated") else "") + ".",
              "", *[f"- {s}" for s in d["verdict"]]]
    reasons = sorted({f"{m}: {e['reason']}" for r in d["rows"] for m, e in r["metrics"].items() if e["reason"]})
    if reasons:
        lines += ["", "Figures absent or without an interval: " + "; ".join(reasons[:8]) + ("; ..." if len(reasons) > 8 else "") + "."]
    return "\n".join(lines)


def _weights_text(weights: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in weights.items())


def calibration_numbers(cal: Calibration) -> dict[str, float]:
    """Flat numbers for asset metadata (the UI plots numbers over time): `calibration/<figure>/<rater>`,
    plus the headline `calibration/jury_<figure>` and `calibration/best_judge_<figure>`; absent figures left out."""
    flat = {f"calibration/{m}/{r.key}": e.value for r in cal.rows for m, e in r.metrics.items() if e.value is not None}
    if cal.primary:
        short = cal.primary
        best = best_judge(cal.rows, short)
        jury = cal.row(cal.jury)
        if jury.metrics[short].value is not None:
            flat[f"calibration/jury_{short}"] = jury.metrics[short].value
        if best is not None:
            flat[f"calibration/best_judge_{short}"] = best.metrics[short].value
        diff = cal.comparisons.get("jury_minus_best")
        if diff is not None and diff.value is not None:
            flat[f"calibration/jury_minus_best_{short}"] = diff.value
    flat["calibration/labelled_prompts"] = float(cal.counts.get("labelled_prompts", 0))
    return {k: float(v) for k, v in flat.items()}

