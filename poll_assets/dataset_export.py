"""Writing the preference set: Parquet + `save_to_disk` + a dataset card, and an optional Hub upload.

`card_info` layout (every section optional except `rubric`; unknown keys are kept in the YAML):

    {
      "pretty_name": str, "license": str, "description": str,
      "panel": {"name": str, "generators": [{"name", "model", "family", "provider"}], "judges": [...]},
      "source": {"repo_id" | "data_files": ..., "split": str},
      "rubric": {"aspect": str, "version": str},
      "judging": {"shuffle_positions": bool, "exclude_self_family": bool, "seed": int, "structured": bool},
      "pooling": {"method": str, "min_judges": int},
      "binarization": {"strategy": str, "min_margin": float, "seed": int},
      "counts": {"prompts": int, "pairs": int, "prompts_without_pair": int, "unrated_verdicts": int, ...},
      "agreement": {"krippendorff_alpha": float | None, "mean_cohen_kappa_quadratic": ..., "pairwise": [...]},
      "calibration": Calibration.to_dict() of poll_assets/scoring/calibration.py (only with gold labels),
      "quality": {"settings": {"min_judge_agreement", "min_margin_low"}, "pairs": int, "mean_judge_agreement": float,
                  "judge_agreement": {bin: pairs}, "margin_low": {bin: pairs},
                  "left_out": {"prompts_without_pair": {reason: int}, "contested_pairs": {reason: int}}},
      "pairwise": pairwise.pairwise_summary(...) (judging.mode 'pairwise' only: leaderboard, position figures),
      "verdicts": {<judge>: {"parse_failures_before": int, "parse_failures_after": int,
                             "parse_failure_rate_before": float, "parse_failure_rate_after": float,
                             "by_reason_before": {reason: int}, "by_reason_after": {reason: int},
                             "repairs_asked": int, "repair_call_failures": int, "texts_recovered": int,
                             "reading": {"read_by_layout"|"read_by_names"|"read_by_position"|"unread/<reason>": int}}},
    }

The card's YAML header holds the Hub's own fields (pretty_name, license, task_categories, tags,
size_categories, configs) plus one `poll` mapping with the panel, rubric, settings, counts and
agreement figures, so tools can read how the set was made without parsing prose.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
from huggingface_hub import DatasetCardData, HfApi

REQUIRED_COLUMNS = ("prompt", "chosen", "rejected")
DATA_DIR = "data"
DISK_DIR = "hf_dataset"
UPLOAD_PATTERNS = ["README.md", f"{DATA_DIR}/*"]
# Key names that would hold a credential ("hf_token", "api_key"); "max_new_tokens", "api_key_env" are fine.
_SECRET_KEY_RE = re.compile(r"(?:.*[_\-])?(?:token|api_?key|secret|password|authorization)", re.IGNORECASE)


def _secret_keys(value: Any, path: str = "card_info") -> list[str]:
    found: list[str] = []
    if isinstance(value, dict):
        for k, v in value.items():
            where = f"{path}.{k}"
            if isinstance(k, str) and _SECRET_KEY_RE.fullmatch(k):
                found.append(where)
            found += _secret_keys(v, where)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += _secret_keys(v, f"{path}[{i}]")
    return found


def _size_category(n: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                         (1_000_000, "100K<n<1M")):
        if n < limit:
            return label
    return "1M<n<10M"


def _fmt(x: Any) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.3f}"
    return str(x)


def _cell(x: Any) -> str:
    return str(x if x is not None else "").replace("|", "\\|").replace("\n", " ")


def _members_table(members: list[dict[str, Any]]) -> list[str]:
    if not members:
        return ["(none listed)"]
    rows = ["| name | model | family | provider |", "| --- | --- | --- | --- |"]
    rows += ["| " + " | ".join(_cell(m.get(k)) for k in ("name", "model", "family", "provider")) + " |"
             for m in members]
    return rows


def _validated_rubric(info: dict[str, Any]) -> dict[str, Any]:
    leaks = _secret_keys(info)
    if leaks:
        raise ValueError(f"card info must not carry credentials; remove {leaks}")
    rubric = info.get("rubric")
    if not isinstance(rubric, dict) or not rubric.get("aspect") or not rubric.get("version"):
        raise ValueError("card_info['rubric'] must give 'aspect' and 'version' (e.g. {'aspect': "
                         "'instruction-following', 'version': 'if-1'})")
    return rubric


def _card_header(info: dict[str, Any], pretty: str, split: str) -> str:
    """The YAML header: the Hub's own fields, plus everything about the build under `poll`."""
    counts = info.get("counts") or {}
    poll_meta = {k: info[k] for k in ("panel", "source", "rubric", "judging", "pooling", "binarization",
                                      "counts", "agreement", "quality", "verdicts") if k in info}
    extra = {k: v for k, v in info.items() if k not in poll_meta and k not in ("pretty_name", "license", "description")}
    card_data = DatasetCardData(
        pretty_name=pretty,
        license=info.get("license", "other"),
        task_categories=["text-generation"],
        size_categories=_size_category(int(counts.get("pairs", 0) or 0)),
        tags=["dpo", "preference", "synthetic", "llm-as-a-judge", "poll"],
        configs=[{"config_name": "default", "data_files": [{"split": split, "path": f"{DATA_DIR}/{split}-*"}]}],
        poll={**poll_meta, **extra},
    )
    return card_data.to_yaml()


def _panel_section(panel: dict[str, Any]) -> list[str]:
    return [
        "## Panel", "", f"Panel config: `{panel.get('name', 'n/a')}`.", "",
        "Generators:", "", *_members_table(panel.get("generators") or []), "",
        "Judges:", "", *_members_table(panel.get("judges") or []), "",
    ]


def _judging_section(info: dict[str, Any], rubric: dict[str, Any]) -> list[str]:
    judging, pooling, binar = info.get("judging") or {}, info.get("pooling") or {}, info.get("binarization") or {}
    return [
        "## Judging",
        "",
        f"- Rubric: UltraFeedback **{rubric['aspect']}**, prompt version `{rubric['version']}` (ratings 1-5).",
        f"- Answer format: {'JSON schema' if judging.get('structured') else 'text blocks'}"
        if "structured" in judging else "- Answer format: n/a",
        f"- Position bias: texts shown in a per-judge, per-prompt shuffled order: "
        f"{_fmt(judging.get('shuffle_positions'))} (seed {_fmt(judging.get('seed'))}).",
        f"- Self-preference: ratings by a judge of its own model family dropped: "
        f"{_fmt(judging.get('exclude_self_family'))}.",
        f"- Pooling: {_fmt(pooling.get('method'))} of the valid ratings; at least "
        f"{_fmt(pooling.get('min_judges'))} judge(s) per answer.",
        f"- Binarization: {_fmt(binar.get('strategy'))}, min margin {_fmt(binar.get('min_margin'))}, "
        f"seed {_fmt(binar.get('seed'))}; ties dropped.",
        "",
    ]


def _counts_and_agreement_sections(info: dict[str, Any]) -> list[str]:
    counts, agreement = info.get("counts") or {}, info.get("agreement") or {}
    lines = [
        "## Counts", "", "| what | count |", "| --- | --- |",
        *[f"| {k.replace('_', ' ')} | {_fmt(v)} |" for k, v in counts.items()],
        "",
        "## Judge agreement",
        "",
        f"- Krippendorff's alpha (ordinal): {_fmt(agreement.get('krippendorff_alpha'))}",
        f"- Mean Cohen's kappa (quadratic): {_fmt(agreement.get('mean_cohen_kappa_quadratic'))}",
        f"- Mean Kendall's tau-b: {_fmt(agreement.get('mean_kendall_tau'))}",
    ]
    pairwise = agreement.get("pairwise") or []
    if pairwise:
        lines += ["", "| judges | items | kappa (quadratic) | Kendall tau |", "| --- | --- | --- | --- |"]
        lines += [f"| {_cell(p.get('judge_a'))} / {_cell(p.get('judge_b'))} | {_fmt(p.get('n_items'))} | "
                  f"{_fmt(p.get('cohen_kappa_quadratic'))} | {_fmt(p.get('kendall_tau'))} |" for p in pairwise]
    return lines


def _quality_section(info: dict[str, Any]) -> list[str]:
    """How far to trust each pair without gold labels: the judges' agreement overall, the spread of the
    per-pair confidence over the written pairs, and what was left out and why."""
    quality, agreement = info.get("quality"), info.get("agreement") or {}
    if not quality:
        return []
    settings = quality.get("settings") or {}
    left_out = quality.get("left_out") or {}
    table = lambda title, counts: ["", f"| {title} | pairs |", "| --- | --- |",  # noqa: E731
                                   *[f"| {_cell(k)} | {_fmt(v)} |" for k, v in counts.items()]]
    reasons = lambda counts: "; ".join(f"{_cell(k)}: {v}" for k, v in counts.items()) or "none"  # noqa: E731
    return [
        "", "## Quality", "",
        f"- Inter-judge agreement: Krippendorff's alpha {_fmt(agreement.get('krippendorff_alpha'))} over every "
        "rating (see *Judge agreement*); it says the judges agree with each other, not that they are right.",
        "- Per pair, `judge_agreement` is the share of the judges that rated both answers (after the self-family "
        "mask) and put chosen strictly above rejected; `margin_low`/`margin_high` bound a 95% bootstrap "
        "interval over judges on the pooled margin (absent with fewer than 2 judges).",
        f"- Mean judge agreement over the written pairs: {_fmt(quality.get('mean_judge_agreement'))}.",
        f"- Minimums: min_judge_agreement {_fmt(settings.get('min_judge_agreement'))}, "
        f"min_margin_low {_fmt(settings.get('min_margin_low'))} (n/a: not set).",
        f"- Left out: contested pairs: {reasons(left_out.get('contested_pairs') or {})}; prompts without a pair: "
        f"{reasons(left_out.get('prompts_without_pair') or {})}.",
        *table("judges preferring chosen", quality.get("judge_agreement") or {}),
        *table("margin lower bound", quality.get("margin_low") or {}),
    ]


def _verdicts_section(verdicts: dict[str, dict[str, Any]]) -> list[str]:
    """Per judge: texts whose rating could not be read, before and after the repair re-ask, and why."""
    if not verdicts:
        return []
    lines = [
        "", "## Unreadable verdicts and repairs", "",
        "A judge whose answer left texts unread was asked once more for them (repair); a repair only fills "
        "a missing rating, it never changes one.", "",
        "| judge | unread before repair | repairs asked | texts recovered | unread after | rate before | "
        "rate after | reasons before (after) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    reading = {judge: f["reading"] for judge, f in verdicts.items() if f.get("reading")}
    for judge, f in verdicts.items():
        after = f.get("by_reason_after") or {}
        reasons = "; ".join(f"{r}: {n} ({after.get(r, 0)})" for r, n in (f.get("by_reason_before") or {}).items())
        lines.append(
            f"| {_cell(judge)} | {_fmt(f.get('parse_failures_before'))} | {_fmt(f.get('repairs_asked'))} | "
            f"{_fmt(f.get('texts_recovered'))} | {_fmt(f.get('parse_failures_after'))} | "
            f"{_fmt(f.get('parse_failure_rate_before'))} | {_fmt(f.get('parse_failure_rate_after'))} | "
            f"{_cell(reasons or 'none')} |"
        )
    cut = [(j, f) for j, f in verdicts.items() if f.get("texts_cut_to_fit") or f.get("answers_cut_at_token_limit")]
    if cut:
        lines += ["", "Cut to fit: " + "; ".join(
            f"{_cell(j)}: {_fmt(f.get('texts_cut_to_fit'))} texts shortened to its context (marked in the prompt, "
            f"listed in `truncated_texts`), {_fmt(f.get('answers_cut_at_token_limit'))} answers cut off at its "
            "token limit" for j, f in cut) + "."]
    if reading:  # how each judge's answers were read: asked layout, other names, unnamed position, unread
        lines += ["", "How each judge's ratings were tied to texts (after repair):", "",
                  "| judge | how read (texts) |", "| --- | --- |"]
        lines += [f"| {_cell(j)} | {_cell('; '.join(f'{k}: {v}' for k, v in r.items()))} |" for j, r in reading.items()]
    return lines


def _calibration_section(calibration: dict[str, Any] | None) -> list[str]:
    """Quality: the judges and the jury against the gold labels (poll_assets/scoring/calibration.py), where there are any."""
    if not calibration:
        return []
    from poll_assets.scoring.calibration import calibration_markdown

    return ["", "## Quality: calibration against gold labels", "",
            "Each judge, the jury and each jury without one judge, scored against human labels over every "
            "stored shard (the poll-assets documentation, page *Calibration*, says what each figure means).", "",
            calibration_markdown(calibration)]


def _pairwise_section(pairwise: dict[str, Any] | None) -> list[str]:
    """Pairwise judging (poll_assets/pairwise.py): the generators' leaderboard and each judge's position figures."""
    if not pairwise:
        return []
    from poll_assets.scoring.pooled_comparisons import position_markdown

    return ["", "## Pairwise judging: leaderboard and position bias", "",
            "The judges compared the answers two at a time, each pair in both orders; the pairs above are built "
            "from each prompt's Bradley-Terry strengths (chosen_rating and rejected_rating hold those strengths).", "",
            "### Generators", "", pairwise["leaderboard_markdown"], "",
            "### Judges", "",
            "Position consistency: the share of pairs asked in both orders whose two answers agree. First-position "
            "rate: the share of decisive answers that prefer the answer shown first (0.5 is no bias).", "",
            position_markdown(pairwise["position"])]


def _use_and_limits_sections(repo_id: str | None, split: str) -> list[str]:
    return [
        "",
        "## Use",
        "",
        "```python",
        "from datasets import load_dataset",
        f'ds = load_dataset("{repo_id or "<this folder or repo id>"}", split="{split}")',
        "```",
        "",
        "## Limitations",
        "",
        "Ratings come from language models, not people: they carry the judges' own biases, and pooling "
        "several judges reduces but does not remove them. Check the agreement figures above before "
        "relying on small margins.",
        "",
    ]


def build_dataset_card(info: dict[str, Any], *, repo_id: str | None = None, split: str = "train") -> str:
    """The README.md of the dataset: YAML header plus a description of how it was built."""
    rubric = _validated_rubric(info)
    panel = info.get("panel") or {}
    pretty = info.get("pretty_name") or f"{panel.get('name', 'poll')} preference pairs ({rubric['aspect']})"
    description = info.get("description") or (
        "Preference pairs (prompt, chosen, rejected) for DPO-style training. Several generator models "
        "answered each prompt; a panel of judge models (PoLL) rated every answer with an UltraFeedback "
        "rubric; ratings were pooled per answer and turned into chosen/rejected pairs."
        if (info.get("judging") or {}).get("mode") != "pairwise" else
        "Preference pairs (prompt, chosen, rejected) for DPO-style training. Several generator models "
        "answered each prompt; a panel of judge models (PoLL) compared the answers two at a time, in both "
        "orders, on an UltraFeedback aspect; the comparisons were pooled into Bradley-Terry strengths per "
        "answer and turned into chosen/rejected pairs."
    )
    lines = [
        "---", _card_header(info, pretty, split), "---", "", f"# {pretty}", "", description, "",
        *_panel_section(panel),
        *_judging_section(info, rubric),
        *_counts_and_agreement_sections(info),
        *_quality_section(info),
        *_verdicts_section(info.get("verdicts") or {}),
        *_calibration_section(info.get("calibration")),
        *_pairwise_section(info.get("pairwise")),
        *_use_and_limits_sections(repo_id, split),
    ]
    return "\n".join(lines)


def export_preference_set(
    df: pd.DataFrame,
    out_dir: Path,
    card_info: dict[str, Any],
    *,
    repo_id: str | None = None,
    token: str | None = None,
    api: HfApi | None = None,
    private: bool | None = None,
    split: str = "train",
    commit_message: str | None = None,
) -> dict[str, Any]:
    """Write the pairs as Parquet (Hub layout) and with `save_to_disk`, plus README.md; upload the
    Parquet and card to the dataset repo when both repo_id and token are given."""
    import datasets  # heavy import, only when exporting

    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"preference set is missing column(s) {missing}; it has {list(df.columns)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    card = build_dataset_card(card_info, repo_id=repo_id, split=split)  # validate before writing anything
    ds = datasets.Dataset.from_pandas(df.reset_index(drop=True), preserve_index=False)

    data_dir, disk_dir = out_dir / DATA_DIR, out_dir / DISK_DIR
    for stale in (data_dir, disk_dir):  # a re-export replaces the previous one entirely
        if stale.exists():
            shutil.rmtree(stale)
    data_dir.mkdir()
    parquet_path = data_dir / f"{split}-00000-of-00001.parquet"
    ds.to_parquet(str(parquet_path))
    ds.save_to_disk(str(disk_dir))
    card_path = out_dir / "README.md"
    card_path.write_text(card, encoding="utf-8")

    result: dict[str, Any] = {
        "rows": ds.num_rows,
        "columns": list(ds.column_names),
        "parquet_path": str(parquet_path),
        "disk_path": str(disk_dir),
        "card_path": str(card_path),
        "repo_id": repo_id,
        "pushed": False,
        "commit_url": None,
    }
    if repo_id is None:
        return result
    if not token:
        result["push_skipped"] = "no token given"
        return result
    message = commit_message or f"Upload preference set ({ds.num_rows} pairs)"
    result["commit_url"] = _upload(api or HfApi(), out_dir, repo_id, token, private, message)
    result["pushed"] = True
    return result


def _upload(api: HfApi, out_dir: Path, repo_id: str, token: str, private: bool | None, message: str) -> str | None:
    """Create the dataset repo if needed and upload the card and Parquet; the commit's URL."""
    try:
        api.create_repo(repo_id, repo_type="dataset", exist_ok=True, private=private, token=token)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(out_dir),
            repo_type="dataset",
            allow_patterns=UPLOAD_PATTERNS,
            commit_message=message,
            token=token,
        )
    except Exception as exc:  # the Hub client's errors name the repo and status; never the token
        detail = str(exc).replace(token, "***")
        raise RuntimeError(f"uploading {out_dir} to Hub dataset {repo_id!r} failed: {type(exc).__name__}: {detail}") from None
    return getattr(commit, "commit_url", None)
