"""Publishing: every stored shard of the preference set as one `datasets.Dataset`, with a dataset card,
and an optional Hub upload.

It is a job rather than a partitioned asset because it reads all shards at once; the result is
recorded as the `preference_dataset` asset so it sits in the lineage graph downstream of
`preference_pairs`, without joining the per-shard job or the UI's "Materialize all".
"""

from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd

from poll_assets.assets.keys import PAIRS_KEY, POOLED_KEY, ratings_key
from poll_assets.assets.judging import repair_figures
from poll_assets.assets.pooling import jury_spec, leaderboard_metadata, pooled_agreement, pooled_calibration, read_gold
from poll_assets.assets.preferences import pair_quality
from poll_assets.io_manager import asset_dir, default_dagster_home, read_partition, stored_partitions
from poll_assets.scoring.calibration import calibration_markdown
from poll_assets.scoring.bradley_terry import leaderboard_svg
from poll_assets.scoring.pooled_comparisons import pairwise_summary, stored_answers
from poll_assets.panel import Panel
from poll_assets.parquet_values import plain_list
from poll_assets.rubrics.ultrafeedback import Rubric, prompt_version

DATASET_KEY = dg.AssetKey("preference_dataset")
PUBLISH_JOB = "publish_job"


class HubPublisherResource(dg.ConfigurableResource):
    """Where the export goes. `token` comes from the environment through EnvVar, only when a repo is set."""

    storage_dir: str
    out_dir: str
    repo_id: str | None = None
    private: bool = True
    token: str | None = None


def read_all_partitions(storage_dir: str, key: dg.AssetKey) -> pd.DataFrame:
    """Every stored partition of an asset, in partition order."""
    frames = [read_partition(storage_dir, key, p) for p in stored_partitions(storage_dir, key)]
    if not frames:
        raise dg.Failure(f"no stored partitions of {key.to_user_string()!r} under {asset_dir(storage_dir, key)}; "
                         "materialize some shards first")
    return pd.concat(frames, ignore_index=True)


def unrated_verdicts(pooled: pd.DataFrame) -> int:
    """Judge ratings missing for a generation that exists: unreadable answers, failed judge calls and
    the rubric's N/A together (the frame keeps only the rating, not why it is missing)."""
    return sum(
        r is None and isinstance(g, str)
        for matrix, gens in zip(pooled["poll_ratings"], pooled["generations"])
        for row in plain_list(matrix)
        for r, g in zip(plain_list(row), plain_list(gens))
    )


def unread_comparisons(pooled: pd.DataFrame) -> int:
    """Pairwise mode: comparisons without a preference (unreadable answers, failed judge calls)."""
    return sum(x[3] is None for cell in pooled["poll_comparisons"] for judge in stored_answers(cell) for x in judge)


def judge_verdicts(panel: Panel, storage_dir: str) -> dict[str, dict[str, Any]]:
    """Per judge with stored ratings: its parse failures before and after repair over every stored shard
    (the figures its asset metadata gives per shard, see `repair_figures`). Pairwise mode: none (the
    judges' frames hold comparisons; their figures are in `dataset_pairwise`)."""
    out: dict[str, dict[str, Any]] = {}
    if panel.judging.mode == "pairwise":
        return out
    for judge in panel.judges:
        shards = stored_partitions(storage_dir, ratings_key(judge))
        if shards:
            frames = [f for p in shards if (f := read_partition(storage_dir, ratings_key(judge), p)) is not None]
            out[judge.name] = repair_figures(pd.concat(frames, ignore_index=True))
    return out


def card_info(panel: Panel, rubric: Rubric, pairs: pd.DataFrame, pooled: pd.DataFrame,
              verdicts: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    member = lambda m: {"name": m.name, "model": m.model, "family": m.family, "provider": m.provider}  # noqa: E731
    return {
        "panel": {
            "name": panel.name,
            "generators": [member(m) for m in panel.generators],
            "judges": [member(m) for m in panel.judges],
        },
        "source": panel.source.model_dump(include={"repo_id", "data_files", "split", "revision"}),
        "rubric": {"aspect": rubric.aspect, "version": prompt_version(rubric, structured=True)},
        "judging": {**panel.judging.model_dump(exclude={"aspect"}), "structured": True},
        "pooling": panel.pooling.model_dump(),
        "binarization": panel.binarization.model_dump(),
        "counts": {
            "prompts": len(pooled),
            "pairs": len(pairs),
            "prompts_without_pair": len(pooled) - int(pairs["prompt_id"].nunique()) if len(pairs) else len(pooled),
            **({"unread_comparisons": unread_comparisons(pooled)} if panel.judging.mode == "pairwise"
               else {"unrated_verdicts": unrated_verdicts(pooled)}),
        },
        "agreement": pooled_agreement(pooled, [j.name for j in panel.judges], rubric.ratings),
        "quality": pair_quality(panel.jury, panel.binarization, pairs, pooled),
        "verdicts": verdicts or {},
    }


LEADERBOARD_RESAMPLES = 1000


def dataset_pairwise(panel: Panel, pooled: pd.DataFrame, resamples: int = LEADERBOARD_RESAMPLES) -> dict[str, Any] | None:
    """Pairwise mode, over every stored shard: the generators' leaderboard (bootstrap over prompts, seeded
    by judging.seed) and each judge's position figures; None in rating mode."""
    if panel.judging.mode != "pairwise" or "poll_comparisons" not in pooled:
        return None
    mask = jury_spec(panel.jury, panel.gold).exclude
    return pairwise_summary(list(pooled["prompt_id"]), list(pooled["poll_comparisons"]), [j.name for j in panel.judges],
                            [g.name for g in panel.generators], mask, resamples=resamples, seed=panel.judging.seed)


def dataset_calibration(panel: Panel, rubric: Rubric, pooled: pd.DataFrame, gold_location: str | None) -> dict[str, Any] | None:
    """The calibration over every stored shard (None without gold labels), as the card keeps it. Labels
    for prompts in no stored shard are counted in it (`labels_outside_prompts`)."""
    if panel.gold is None:
        return None
    gold = read_gold(gold_location, rubric.ratings)
    return None if gold is None else pooled_calibration(panel.jury, panel.gold, pooled, gold, rubric.ratings).to_dict()


def build_publish_job(panel: Panel, rubric: Rubric, gold_location: str | None = None) -> tuple[dg.AssetSpec, dg.JobDefinition]:
    spec = dg.AssetSpec(
        DATASET_KEY,
        deps=[PAIRS_KEY, POOLED_KEY],
        group_name="publishing",
        kinds={"huggingface", "parquet"},
        description=(
            "All shards of the preference set as one Hugging Face `datasets.Dataset` (Parquet and save_to_disk) "
            "with a generated dataset card; uploaded to the Hub when publish.repo_id is set. Built by `publish_job`."
        ),
    )

    @dg.op(required_resource_keys={"hub_publisher"})
    def export_preference_dataset(context: dg.OpExecutionContext) -> None:
        # imported here: huggingface_hub's Hub client is only needed when publishing
        from poll_assets.dataset_export import export_preference_set

        hub: HubPublisherResource = context.resources.hub_publisher
        pairs = read_all_partitions(hub.storage_dir, PAIRS_KEY)
        pooled = read_all_partitions(hub.storage_dir, POOLED_KEY)
        info = card_info(panel, rubric, pairs, pooled, judge_verdicts(panel, hub.storage_dir))
        calibration = dataset_calibration(panel, rubric, pooled, gold_location)
        if calibration is not None:
            info["calibration"] = calibration
        pairwise = dataset_pairwise(panel, pooled)
        if pairwise is not None:
            info["pairwise"] = pairwise
        result = export_preference_set(
            pairs, Path(hub.out_dir), info, repo_id=hub.repo_id, token=hub.token, private=hub.private
        )
        plot = {}
        if pairwise is not None:  # a picture of the leaderboard beside the dataset, linked from the metadata
            svg = Path(hub.out_dir) / "leaderboard.svg"
            svg.write_text(leaderboard_svg(pairwise["leaderboard"], level=pairwise["level"]), encoding="utf-8")
            plot = {"leaderboard_plot": dg.MetadataValue.path(str(svg)), **leaderboard_metadata(pairwise)}
        context.log.info(f"exported {result['rows']} pairs to {hub.out_dir}; pushed to Hub: {result['pushed']}")
        context.log_event(
            dg.AssetMaterialization(
                DATASET_KEY,
                metadata={
                    "dagster/row_count": result["rows"],
                    "path": dg.MetadataValue.path(result["parquet_path"]),
                    "save_to_disk": dg.MetadataValue.path(result["disk_path"]),
                    "card": dg.MetadataValue.md(Path(result["card_path"]).read_text(encoding="utf-8")),
                    "pushed": result["pushed"],
                    "repo_id": hub.repo_id or "",
                    "counts": dg.MetadataValue.json(info["counts"]),
                    **({"calibration": dg.MetadataValue.md(calibration_markdown(calibration))} if calibration else {}),
                    **plot,
                },
            )
        )

    @dg.job(name=PUBLISH_JOB, description="Export every stored shard of the preference set as one dataset (and push it).")
    def publish_job() -> None:
        export_preference_dataset()

    return spec, publish_job


def build_hub_publisher(panel: Panel, storage_dir: str) -> HubPublisherResource:
    out_dir = panel.publish.out_dir or str(default_dagster_home() / "exports" / panel.name)
    token = dg.EnvVar(panel.publish.token_env) if panel.publish.repo_id else None
    return HubPublisherResource(
        storage_dir=storage_dir, out_dir=out_dir, repo_id=panel.publish.repo_id, private=panel.publish.private, token=token
    )
