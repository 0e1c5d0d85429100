"""Row lineage: the full trail of one prompt through the stored Parquet files.

Column lineage (`dagster/column_lineage`) is declared by the stages that merge others, next to their
columns (assets/generations.py, assets/pooling.py, assets/preferences.py). Row lineage needs no
extra bookkeeping: every row keeps `prompt_id`, and the rows that came from a model keep the
`call_id` of that call. `prompt_trail` follows a prompt through the stored Parquet files and gathers
everything about it: the prompt, each generation with its model and token usage, each judge's raw
output and parsed ratings, the pooled ratings and the pairs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import dagster as dg
import pandas as pd
from upath import UPath

from poll_assets.assets.keys import COMBINED_KEY, GENERATIONS_PREFIX, PAIRS_KEY, POOLED_KEY, PROMPTS_KEY, RATINGS_PREFIX
from poll_assets.io_manager import asset_dir, read_partition, stored_partitions
from poll_assets.parquet_values import plain

MIN_PREFIX = 6  # shortest prompt-id prefix `prompt_trail` accepts


# --- the trail of one prompt ---------------------------------------------------------------------


class TrailError(LookupError):
    """The prompt cannot be traced; the message says what was searched."""


def _ints(values: list[Any] | None) -> list[Any] | None:
    """Ratings are integers; a list holding a None comes back from Parquet as floats."""
    if values is None:
        return None
    return [int(v) if isinstance(v, float) and v.is_integer() else v for v in values]


def _num(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}".rstrip("0").rstrip(".") if isinstance(value, float) else str(value)


def _row(df: pd.DataFrame | None, prompt_id: str) -> dict[str, Any] | None:
    if df is None:
        return None
    hit = df[df["prompt_id"] == prompt_id]
    return {k: plain(v) for k, v in hit.iloc[0].items()} if len(hit) else None


def _partitions(base: UPath) -> list[str]:
    folder = asset_dir(base, PROMPTS_KEY)
    if not folder.is_dir():
        raise TrailError(f"no prompts have been materialized under {base} (no folder {folder})")
    return stored_partitions(base, PROMPTS_KEY)


def _find(base: UPath, prompt_id: str, partition: str | None) -> tuple[str, str, pd.DataFrame]:
    """(partition, full prompt id, that partition's prompts), accepting a unique id prefix."""
    if len(prompt_id) < MIN_PREFIX:
        raise TrailError(f"prompt id {prompt_id!r} is too short; give at least {MIN_PREFIX} characters of it")
    searched = [partition] if partition else _partitions(base)
    matches: list[tuple[str, str, pd.DataFrame]] = []
    for key in searched:
        prompts = read_partition(base, PROMPTS_KEY, key)
        if prompts is None:
            raise TrailError(f"partition {key!r} of prompts is not materialized under {base}")
        for pid in prompts["prompt_id"]:
            if pid == prompt_id or pid.startswith(prompt_id):
                matches.append((key, pid, prompts))
    exact = [m for m in matches if m[1] == prompt_id]
    matches = exact or matches
    if not matches:
        where = f"partition {partition}" if partition else f"{len(searched)} materialized partition(s)"
        raise TrailError(f"prompt id {prompt_id!r} is not in {where} of prompts under {base}")
    if len({m[1] for m in matches}) > 1:
        ids = ", ".join(sorted({m[1][:16] for m in matches}))
        raise TrailError(f"prompt id prefix {prompt_id!r} matches several prompts ({ids}); give more characters")
    return matches[0]


def _members(base: UPath, prefix: str, order: list[str] | None) -> list[str]:
    """Member names with a folder under `prefix` (generations, ratings), in panel order when known."""
    folder = asset_dir(base, dg.AssetKey(prefix))
    found = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    if order:
        return [m for m in order if m in found] + [m for m in found if m not in order]
    return found


class _Reader:
    """Rows of one prompt in one partition, noting every asset not materialized yet in `missing`."""

    def __init__(self, base: UPath, partition: str, prompt_id: str) -> None:
        self.base, self.partition, self.prompt_id = base, partition, prompt_id
        self.missing: list[str] = []

    def frame(self, key: dg.AssetKey) -> pd.DataFrame | None:
        df = read_partition(self.base, key, self.partition)
        if df is None:
            self.missing.append(key.to_user_string())
        return df

    def row(self, key: dg.AssetKey) -> dict[str, Any] | None:
        row = _row(read_partition(self.base, key, self.partition), self.prompt_id)
        if row is None:
            self.missing.append(key.to_user_string())
        return row


    def member_rows(self, prefix: str, order: list[str] | None) -> Iterator[tuple[str, dict[str, Any]]]:
        """(member, its row) for every member stored under `prefix` that has a row for the prompt."""
        for name in _members(self.base, prefix, order):
            row = self.row(dg.AssetKey([prefix, name]))
            if row is not None:
                yield name, row


def _usage(row: dict[str, Any], *extra: str) -> dict[str, Any]:
    return {k: row.get(k) for k in ("input_tokens", "output_tokens", *extra)}


def _trail_generations(read: _Reader, order: list[str] | None) -> list[dict[str, Any]]:
    generations = []
    for name, row in read.member_rows(GENERATIONS_PREFIX, order):
        generations.append({
            "generator": name,
            "model": row.get("model_name"),
            "served_model": row.get("served_model"),
            "text": row.get("generation"),
            "finish_reason": row.get("finish_reason"),
            "usage": _usage(row, "latency_s", "cached"),
            "call_id": row.get("call_id"),
            "error": row.get("error"),
        })
    return generations


def _trail_judges(read: _Reader, pooled: dict[str, Any] | None) -> list[dict[str, Any]]:
    judges = []
    for name, row in read.member_rows(RATINGS_PREFIX, None):
        judges.append({
            "judge": name,
            "model": row.get("model_name"),
            "ratings": _ints(row.get("ratings")),
            **{k: row.get(k) for k in ("rationales", "rating_errors", "shown_order", "raw_output", "output_mode")},
            "usage": _usage(row),
            "call_id": row.get("call_id"),
            "error": row.get("error"),
        })
    if pooled is not None:  # judges in the pooled (panel) order
        rank = {cid: i for i, cid in enumerate(pooled.get("poll_call_ids") or [])}
        judges.sort(key=lambda j: rank.get(j["call_id"], len(rank)))
    return judges


def _trail_pairs(read: _Reader, generations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    pairs_df = read.frame(PAIRS_KEY)
    if pairs_df is None:
        return []
    by_call = {g["call_id"]: g["generator"] for g in generations}
    return [
        {k: plain(r[k]) for k in ("chosen_model", "rejected_model", "chosen_rating", "rejected_rating", "margin",
                                    "chosen_call_id", "rejected_call_id")}
        | {
            "chosen_generator": by_call.get(r["chosen_call_id"]),
            "rejected_generator": by_call.get(r["rejected_call_id"]),
            "chosen": plain(r["chosen"])[-1]["content"],
            "rejected": plain(r["rejected"])[-1]["content"],
        }
        for _, r in pairs_df[pairs_df["prompt_id"] == read.prompt_id].iterrows()
    ]


def prompt_trail(prompt_id: str, storage_dir: str, partition: str | None = None) -> dict[str, Any]:
    """Everything the pipeline stored about one prompt, read from the Parquet files.

    Args:
        prompt_id: the prompt's id (sha256 hex of its instruction), or a unique prefix of at least
            six characters.
        storage_dir: the IO manager's base folder (`$DAGSTER_HOME/storage` by default); a local
            path or an fsspec URL.
        partition: the shard to look in; by default every materialized shard of `prompts` is searched.

    Returns a JSON-ready dict with keys `prompt_id`, `partition`, `instruction`, `source_row`,
    `generations` (one per generator: generator, model, text, usage, call_id, error), `judges` (one
    per judge: raw_output, ratings and rationales per generation in generation order, shown_order,
    usage, call_id), `pooled` (avg_poll_ratings, poll_ratings, n_valid_judges) or None, `pairs` (a
    list, empty when the prompt was dropped as a tie), and `missing`: stages not materialized yet.

    Raises TrailError when the prompt id is not found (or is an ambiguous prefix), naming what was searched.
    """
    base = UPath(storage_dir)
    key, pid, prompts = _find(base, prompt_id, partition)
    prompt = _row(prompts, pid) or {}
    read = _Reader(base, key, pid)
    combined = read.row(COMBINED_KEY)
    generations = _trail_generations(read, combined and combined.get("generators"))
    pooled = read.row(POOLED_KEY)
    judges = _trail_judges(read, pooled)
    pairs = _trail_pairs(read, generations)
    return {
        "prompt_id": pid,
        "partition": key,
        "instruction": prompt.get("instruction"),
        "source_row": prompt.get("source_row"),
        "generations": generations,
        "judges": judges,
        "pooled": None if pooled is None else {
            k: pooled.get(k) for k in ("avg_poll_ratings", "poll_ratings", "poll_models", "n_valid_judges")
        },
        "pairs": pairs,
        "missing": read.missing,
    }


def _clip(text: Any, width: int) -> str:
    s = "" if text is None else " ".join(str(text).split())
    return s if len(s) <= width else s[: width - 1] + "…"


def format_trail(trail: dict[str, Any], width: int = 100) -> str:
    """The trail as text a person reads top to bottom: prompt, answers, verdicts, pooled, pairs."""
    out = [f"prompt {trail['prompt_id']}  ({trail['partition']}, source row {trail['source_row']})",
           f"  {_clip(trail['instruction'], width)}", "", "generations:"]
    for i, g in enumerate(trail["generations"]):
        u = g["usage"]
        status = f"ERROR {g['error']}" if g["error"] else f"{u['input_tokens']} in / {u['output_tokens']} out tokens"
        out.append(f"  [{i}] {g['generator']} ({g['model']}): {status}; call {str(g['call_id'])[:12]}")
        out.append(f"      {_clip(g['text'], width - 6)}")
    out += ["", "judges:"]
    for j in trail["judges"]:
        ratings = ", ".join("-" if r is None else str(r) for r in (j["ratings"] or []))
        out.append(f"  {j['judge']} ({j['model']}): ratings [{ratings}]; call {str(j['call_id'])[:12]}")
        for k, err in enumerate(j["rating_errors"] or []):
            if err:
                out.append(f"      [{k}] no rating: {err}")
        out.append(f"      raw: {_clip(j['raw_output'], width - 11) or '(none)'}")
    pooled = trail["pooled"]
    out += ["", "pooled:" if pooled else "pooled: (not materialized)"]
    if pooled:
        avg = ", ".join(_num(a) for a in pooled["avg_poll_ratings"])
        out.append(f"  avg_poll_ratings [{avg}]  (valid judges per generation: {pooled['n_valid_judges']})")
    out += ["", f"pairs: {len(trail['pairs'])}"]
    for p in trail["pairs"]:
        out.append(f"  chosen {p['chosen_generator'] or p['chosen_model']} ({_num(p['chosen_rating'])}) over "
                   f"{p['rejected_generator'] or p['rejected_model']} "
                   f"({_num(p['rejected_rating'])}), margin {_num(p['margin'])}; "
                   f"calls {str(p['chosen_call_id'])[:12]} / {str(p['rejected_call_id'])[:12]}")
    if trail["missing"]:
        out += ["", f"not materialized yet: {', '.join(trail['missing'])}"]
    return "\n".join(out)


def trail_json(trail: dict[str, Any]) -> str:
    return json.dumps(trail, indent=2, ensure_ascii=False)
