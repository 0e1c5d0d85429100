"""Pairwise answers, added up (pure): one prompt's comparisons pooled over the judges and both orders
(Bradley-Terry strengths, win counts), a judge's outcome on a pair, the stored form of an answer,
and over many prompts the generators' leaderboard and each judge's position figures (position
consistency, first-position rate). How a comparison is asked and its answer read: poll_assets/pairwise.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from poll_assets.scoring.bradley_terry import DEFAULT_PRIOR, fit, leaderboard, leaderboard_markdown, win_counts
from poll_assets.scoring.bradley_terry import Outcome as BTOutcome


# ---------------------------------------------------------------------------------------------
# What a judge's answers say about it


@dataclass(frozen=True)
class PositionFigures:
    """How a judge's preferences depend on the order it saw the answers in."""

    consistency: float | None  # share of pairs asked in both orders, read both times, whose answers agree
    pairs_both_orders: int
    first_position_rate: float | None  # share of read, non-tie answers that prefer the answer shown first
    decisive_answers: int
    tie_rate: float | None
    read_answers: int


def position_figures(answers: Iterable[tuple[str, int, int, int, int | str | None]]) -> PositionFigures:
    """answers: (prompt_id, a, b, first, winner) per comparison of one judge; winner a generation index,
    'tie' or None (unread). Consistency is over pairs with both orders read; None where there are none."""
    by_pair: dict[tuple[str, int, int], dict[int, Any]] = {}
    decisive = first_won = ties = read = 0
    for pid, a, b, first, won in answers:
        if won is None:
            continue
        read += 1
        by_pair.setdefault((pid, a, b), {})[first] = won
        if won == "tie":
            ties += 1
        else:
            decisive += 1
            first_won += won == first
    both = [v for v in by_pair.values() if len(v) == 2]
    agree = sum(len(set(v.values())) == 1 for v in both)
    return PositionFigures(agree / len(both) if both else None, len(both),
                           first_won / decisive if decisive else None, decisive,
                           ties / read if read else None, read)


# ---------------------------------------------------------------------------------------------
# Pooling one prompt's comparisons over the judges


Answer = tuple[int, int, int, "int | str | None"]  # (a, b, first shown, winner: a generation, 'tie' or None)


@dataclass
class PooledComparisons:
    """One prompt's comparisons pooled over judges and orders: Bradley–Terry strengths, win counts."""

    strengths: list[float | None]  # None: the generation took part in no read comparison
    wins: list[float]  # ties as half wins
    comparisons: list[int]
    n_judges: list[int]  # judges with at least one read comparison of the generation
    outcomes: list[BTOutcome]
    excluded: int = 0  # read comparisons left out by the self-family mask


def pool_comparisons(n: int, answers: Sequence[Sequence[Answer]], exclude: Sequence[Sequence[bool]] | None = None,
                     *, prior: float = DEFAULT_PRIOR) -> PooledComparisons:
    """answers[j]: judge j's answers on one prompt. exclude[j][g] True leaves out judge j's comparisons
    that involve generation g (a judge comparing an answer of its own model family)."""
    outcomes: list[BTOutcome] = []
    judges_of: list[set[int]] = [set() for _ in range(n)]
    excluded = 0
    for j, rows in enumerate(answers):
        for a, b, _first, won in rows:
            if won is None:
                continue
            if exclude is not None and (exclude[j][a] or exclude[j][b]):
                excluded += 1
                continue
            outcomes.append(BTOutcome(a, b, 0.5 if won == "tie" else 1.0 if won == a else 0.0))
            judges_of[a].add(j)
            judges_of[b].add(j)
    wins, played = win_counts(n, outcomes)
    return PooledComparisons(fit(n, outcomes, prior=prior), wins, played, [len(s) for s in judges_of], outcomes, excluded)


def pair_label(answers: Iterable[Answer], a: int, b: int) -> int:
    """One judge's (or the pooled judges') outcome on the pair (a, b) from its answers in either order:
    0 a better, 1 b better, 2 tie (as many wins each way), -1 none read (calibration's codes)."""
    score, read = 0.0, 0
    for x, y, _first, won in answers:
        if {x, y} != {a, b} or won is None:
            continue
        read += 1
        score += 0.0 if won == "tie" else 1.0 if won == a else -1.0
    return -1 if not read else 0 if score > 0 else 1 if score < 0 else 2


TIE_CODE = -1  # a tie in a stored answer's winner slot


def encode_answer(answer: Answer) -> list[int | None]:
    """(a, b, first, winner) as stored in `poll_comparisons`: winner a generation index, -1 tie, None unread."""
    a, b, first, won = answer
    return [a, b, first, TIE_CODE if won == "tie" else won]  # type: ignore[list-item]


def decode_answer(stored: Sequence[Any]) -> Answer:
    a, b, first, won = (None if x is None or x != x else int(x) for x in stored)
    return (a, b, first, "tie" if won == TIE_CODE else won)  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# Across prompts: the leaderboard and each judge's position figures


def stored_answers(cell: Any) -> list[list[Answer]]:
    """A `poll_comparisons` cell (judge x comparison x [a, b, first, winner]) back as answers per judge."""
    if cell is None or (isinstance(cell, float) and cell != cell):
        return []
    return [[decode_answer(list(x)) for x in judge] for judge in cell]


def pairwise_summary(prompt_ids: Sequence[str], cells: Sequence[Any], judges: Sequence[str], generators: Sequence[str],
                     exclude: Sequence[Sequence[bool]] | None = None, *, resamples: int = 1000, seed: int = 0,
                     level: float = 0.95) -> dict[str, Any]:
    """Over every prompt given: the generators' leaderboard (Bradley–Terry over the prompts pooled,
    bootstrap over prompts) and each judge's position figures; plain data for metadata and the card."""
    answers = [stored_answers(c) for c in cells]
    outcomes = [pool_comparisons(len(generators), a, exclude).outcomes for a in answers]
    board = leaderboard(generators, outcomes, resamples=resamples, seed=seed, level=level)
    position = {}
    for j, name in enumerate(judges):
        mine = [(pid, *x) for pid, a in zip(prompt_ids, answers) if j < len(a) for x in a[j]]
        position[name] = asdict(position_figures(mine))  # type: ignore[arg-type]
    return {"prompts": len(prompt_ids), "resamples": resamples, "level": level,
            "leaderboard": [{**asdict(r), "win_rate": r.win_rate} for r in board],
            "leaderboard_markdown": leaderboard_markdown(board, level=level, prompts=len(prompt_ids)),
            "position": position}


def position_markdown(position: dict[str, dict[str, Any]]) -> str:
    """Each judge's position figures as a markdown table."""
    def pct(x: Any) -> str:
        return "–" if x is None else f"{x:.1%}"

    lines = ["| judge | position consistency | pairs asked in both orders | first-position rate | tie rate | read answers |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, f in position.items():
        lines.append(f"| {name} | {pct(f['consistency'])} | {f['pairs_both_orders']} | {pct(f['first_position_rate'])} | "
                     f"{pct(f['tie_rate'])} | {f['read_answers']} |")
    return "\n".join(lines)
