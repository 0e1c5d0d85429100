"""`poll-assets`: run the main job from the shell, open the UI on the project's instance, or trace a prompt."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import dagster as dg

    from poll_assets.panel import Panel
    from poll_assets.run_plan import PlannedRun


def _use_project_home() -> Path:
    """DAGSTER_HOME defaults to ./.dagster_home so the CLI and `dagster dev` share run history."""
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(Path.cwd() / ".dagster_home"))).resolve()
    home.mkdir(parents=True, exist_ok=True)
    os.environ["DAGSTER_HOME"] = str(home)
    return home


# Dagster reads this variable each time it stores an event (dagster/_core/instance/utils.py): above 0,
# the events it sends as a batch (a step's materializations of a shard range, a run's planned
# events) reach the event log's `store_event_batch` together.
EVENT_BATCH_ENV = "DAGSTER_EVENT_BATCH_SIZE"
EVENT_BATCH_SIZE = 1000  # above any shard range's materializations of one asset (shards_per_run)


def event_log_batches(instance: dg.DagsterInstance) -> bool:
    """True when the instance's event log writes a batch in one statement (dagster-postgres's
    `store_event_batch`: one INSERT for a batch of materializations). Dagster's SQLite event logs
    keep the base class's, which stores the events one by one
    (dagster/_core/storage/event_log/base.py, `EventLogStorage.store_event_batch`)."""
    from dagster._core.storage.event_log.base import EventLogStorage

    return type(instance.event_log_storage).store_event_batch is not EventLogStorage.store_event_batch


def enable_event_batching(instance: dg.DagsterInstance) -> bool:
    """Turn Dagster's batched event writes on for this process (and the processes it starts) when
    the instance's event log can batch and the environment does not say otherwise; whether they are on."""
    if event_log_batches(instance):
        os.environ.setdefault(EVENT_BATCH_ENV, str(EVENT_BATCH_SIZE))
    try:
        return event_log_batches(instance) and int(os.environ.get(EVENT_BATCH_ENV, "0")) > 0
    except ValueError:
        raise SystemExit(f"poll-assets: {EVENT_BATCH_ENV}={os.environ[EVENT_BATCH_ENV]!r} is not a whole number") from None


def run_job(defs: dg.Definitions) -> dg.JobDefinition:
    """The job `poll-assets run` launches: Dagster's implicit asset job (`__ASSET_JOB`), the one the
    UI's *Materialize all* and the automation sensor launch, so every run of the graph carries
    one job name. (`poll_job` selects the same assets under a name of its own, for the launchpad.)"""
    return defs.resolve_implicit_global_asset_job_def()


def _metadata_text(metadata: dict) -> str:
    """`key=value` pairs of a check's metadata (rates, counts, thresholds), skipping long values."""
    parts = []
    for key, value in metadata.items():
        raw = getattr(value, "value", value)
        if isinstance(raw, float):
            parts.append(f"{key}={raw:.4g}")
        elif isinstance(raw, (int, str, bool)) and len(str(raw)) <= 80:
            parts.append(f"{key}={raw}")
    return ", ".join(parts)


def failure_report(result) -> tuple[list[str], bool]:
    """One line per failed check (asset, check, its message and key metadata), per failed step
    (its error message) and for the run failure itself, read from the run's own events; and
    whether any of it is an error (a WARN-severity check alone is reported but not an error)."""
    import dagster as dg

    lines, error = [], not result.success
    for check in result.get_asset_check_evaluations():
        if not check.passed:
            warn = check.severity == dg.AssetCheckSeverity.WARN
            error = error or not warn
            meta = _metadata_text(dict(check.metadata))
            lines.append(
                f"check {'warning' if warn else 'failed'}: {check.asset_key.to_user_string()}: {check.check_name}: "
                f"{check.description or 'no message'}{' [' + meta + ']' if meta else ''}"
            )
    for event in result.get_step_failure_events():
        lines.append(f"step failed: {event.step_key}: {_step_failure_message(event)}")
    for event in result.all_events:
        if event.event_type_value == dg.DagsterEventType.RUN_FAILURE.value and event.message:
            lines.append(f"run failed: {event.message}")
    return lines, error


def _step_failure_message(event) -> str:
    """A step's own failure sentence (a raised dg.Failure's description), else its error and causes."""
    data = event.step_failure_data
    if data is None:
        return event.message or "no message"
    if data.user_failure_data is not None and data.user_failure_data.description:
        return data.user_failure_data.description
    parts, error = [], data.error
    while error is not None:
        parts.append(error.message.strip())
        error = error.cause
    return " <- caused by: ".join(parts) or "no message"


def _report_dead_runs(instance) -> None:
    from poll_assets.run_liveness import fail_dead_runs

    for dead in fail_dead_runs(instance):
        print(f"run {dead.run_id} ({dead.job_name}) was still marked as running but {dead.reason}; "
              "marked it failed", file=sys.stderr)


def _check_prompt_files(panel, panel_path: Path) -> bool:
    """Read local prompt files once before any run starts: a bad file stops here, naming its line,
    and a num_examples beyond the file is reported with the file's row count."""
    from poll_assets.prompt_source import PromptSourceError, count_local_rows

    try:
        rows = count_local_rows(panel.source, panel_path.parent)
    except PromptSourceError as exc:
        print(f"poll-assets run: {exc}", file=sys.stderr)
        return False
    if rows is not None and panel.source.num_examples > rows:
        print(f"warning: source.num_examples is {panel.source.num_examples} but the prompt files have {rows} rows; "
              f"shards past row {rows - 1} will fail until num_examples is lowered or rows are added", file=sys.stderr)
    return True


def run_shards(args: argparse.Namespace, keys: list[str]) -> list[str]:
    """The shards `poll-assets run` materializes: --all, --partitions A...B, --partition K, else the first."""
    from poll_assets.partitions import select_shards

    if args.all:
        return keys
    return select_shards(keys, args.partitions or args.partition or keys[0])


def range_tags(shards: list[str]) -> dict[str, str]:
    """The tags that make a run materialize a partition range (what a UI backfill sets)."""
    return {"dagster/asset_partition_range_start": shards[0], "dagster/asset_partition_range_end": shards[-1]}


def cmd_run(args: argparse.Namespace) -> int:
    _use_project_home()
    import dagster as dg

    from poll_assets.panel import load_panel
    from poll_assets.pipeline import build_definitions

    panel, path = load_panel(args.panel)
    if not _check_prompt_files(panel, path):
        return 2
    job = run_job(build_definitions(panel, path))
    try:
        shards = run_shards(args, job.partitions_def.get_partition_keys())
    except ValueError as exc:
        print(f"poll-assets run: {exc}", file=sys.stderr)
        return 2
    print(f"panel {panel.name} ({path}); {len(shards)} shard(s) {shards[0]}"
          f"{' ... ' + shards[-1] if len(shards) > 1 else ''}, {panel.source.shard_size} prompts a shard "
          f"({panel.source.shard_size_origin}){'; --force: every asset' if args.force else ''}", flush=True)
    with dg.DagsterInstance.get() as instance:
        if enable_event_batching(instance):
            print(f"event writes batched ({EVENT_BATCH_ENV}={os.environ[EVENT_BATCH_ENV]})", flush=True)
        _report_dead_runs(instance)  # a killed run must not look in progress to this run or the next tick
        runs = _planned_runs(instance, job, shards, panel.source.shards_per_run, args.force)
        if not runs:
            return 0
        _interrupt_on_sigterm()
        try:
            return _run_all(job, instance, runs, shards)
        except KeyboardInterrupt:
            return _interrupted(instance)


def _planned_runs(instance: dg.DagsterInstance, job: dg.JobDefinition, shards: list[str], shards_per_run: int,
                  force: bool) -> list[PlannedRun]:
    """The runs that make what is missing or stale in `shards` (everything, with `force`), printed."""
    from poll_assets.engine.run_state import asset_states
    from poll_assets.run_plan import plan_runs, plan_shards, plan_summary

    plan = plan_shards(asset_states(instance, job), shards, force=force)
    for line in plan_summary(plan):
        print(line)
    runs = plan_runs(plan, shards_per_run)
    if runs:
        todo = list(plan.todo)
        print(f"materializing {len(todo)} shard(s) {todo[0]}{' ... ' + todo[-1] if len(todo) > 1 else ''} "
              f"in {len(runs)} run(s) of at most {shards_per_run} (source.shards_per_run) ...", flush=True)
    return runs


def _interrupt_on_sigterm() -> None:
    """Ctrl-C and SIGTERM (`kill`, a service manager, a container stop) stop a run gracefully: no new
    call starts, the calls in flight finish and are cached, and the run fails as interrupted (never
    left STARTED). A second signal stops at once."""
    import signal

    from poll_assets.llm.online.runner import enable_graceful_stop

    def notice(name: str) -> None:
        print(f"poll-assets run: {name}: starting no new calls; waiting for the calls in flight to be answered "
              "and cached (send it again to stop at once)", file=sys.stderr, flush=True)

    handler = enable_graceful_stop(notice)
    signal.signal(signal.SIGTERM, handler)  # between runs; during a run's batches the runner puts it back
    signal.signal(signal.SIGINT, handler)


def _interrupted(instance: dg.DagsterInstance) -> int:
    """After Ctrl-C or SIGTERM: mark this process's runs that were left in progress as failed, and say
    how to resume. Exit status 130, as a shell reports an interrupted command."""
    import signal

    from poll_assets.run_liveness import fail_runs_of_this_process

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a third Ctrl-C must not cut the bookkeeping short
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for run_id in fail_runs_of_this_process(instance, "interrupted (Ctrl-C or SIGTERM)"):
        print(f"run {run_id} was interrupted; marked it failed", file=sys.stderr)
    print("poll-assets run: interrupted. The answers that arrived are in the response cache; run the same "
          "command again to pay only for what is missing.", file=sys.stderr)
    return 130


def _run_all(job: dg.JobDefinition, instance: dg.DagsterInstance, runs: list[PlannedRun], shards: list[str]) -> int:
    """Run each planned run in turn (its assets over its shards); 1 when any run failed. Runs are
    recorded under the code location `poll-assets ui` serves, so the UI lists them (engine/launch.py)."""
    from poll_assets.engine.launch import runs_from_location, workspace_job_origin

    failed_runs = 0
    with runs_from_location(instance, workspace_job_origin(job.name)):
        for run in runs:
            failed_runs += _execute(job, instance, run, alone=len(shards) == 1)
    return 1 if failed_runs else 0


def _execute(job: dg.JobDefinition, instance: dg.DagsterInstance, run: PlannedRun, alone: bool) -> int:
    """One planned run: its asset selection over its shards (one partition, or a range as a backfill
    sets it); prints what failed, or the shards' pairs. 1 when it failed."""
    import dagster as dg

    from poll_assets.llm.online.runner import stop_requested
    from poll_assets.run_liveness import process_tags
    from poll_assets.terminal import escape_controls

    shards = list(run.shards)
    one = {"partition_key": shards[0], "tags": process_tags()} if len(shards) == 1 else {
        "tags": {**process_tags(), **range_tags(shards)}}
    # An explicit selection, as the UI's *Materialize* sets it: the run's target in Runs → Target.
    result = job.execute_in_process(
        instance=instance,
        raise_on_error=False,
        run_config={"loggers": {"console": {"config": {"log_level": "INFO"}}}},
        asset_selection=[dg.AssetKey.from_user_string(a) for a in run.assets],
        **one,
    )
    problems, failed = failure_report(result)
    for line in problems:
        print(escape_controls(line), file=sys.stderr)  # messages may quote prompts
    if stop_requested() or any("DagsterExecutionInterruptedError" in line for line in problems):
        raise KeyboardInterrupt  # interrupted (by us in a batch, or by Dagster between steps): no later run
    if failed:
        print(f"run {result.run_id} ({shards[0]} ... {shards[-1]}) failed; see `poll-assets ui` for the event log",
              file=sys.stderr)
        return 1
    print(f"run {result.run_id} succeeded")
    for line in shard_summary(instance, shards, alone=alone):
        print(line)
    return 0


def shard_summary(instance: dg.DagsterInstance, shards: list[str], alone: bool = False) -> list[str]:
    """One line per shard: where its preference pairs are and how many (from its latest
    materialization); `alone`, the one shard of the command: two lines, as the README shows."""
    import dagster as dg

    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("preference_pairs"), asset_partitions=shards), limit=len(shards)
    ).records
    latest = {}
    for rec in records:  # newest first
        latest.setdefault(rec.partition_key, rec.asset_materialization.metadata if rec.asset_materialization else {})
    lines = []
    for shard in shards:
        meta = latest.get(shard, {})
        where = meta["path"].value if "path" in meta else "?"
        pairs = meta["pairs"].value if "pairs" in meta else "?"
        lines += [f"preference set: {where}", f"pairs: {pairs}"] if alone else [f"{shard}: {pairs} pairs  {where}"]
    return lines


# `dagster dev` warns on every start that it is superseded by `dg dev`, which needs the dagster-dg
# CLI and a dg project; we ship neither, so this exact hint is silenced (in that process only).
_DG_DEV_HINT = "ignore:Function `dev_command` is superseded:Warning"


def ui_argv(host: str, port: int) -> list[str]:
    """`dagster dev` run by this interpreter (`python -m dagster`), so it works from the venv's
    script without the venv on PATH; its webserver and daemon start with the same interpreter."""
    workspace = Path(__file__).resolve().parent.parent / "workspace.yaml"
    argv = [sys.executable, "-W", _DG_DEV_HINT, "-m", "dagster", "dev", "-h", host, "-p", str(port)]
    return argv + (["-w", str(workspace)] if workspace.is_file() else ["-m", "poll_assets.definitions"])


def cmd_ui(args: argparse.Namespace) -> int:
    home = _use_project_home()
    import dagster as dg

    with dg.DagsterInstance.get() as instance:
        enable_event_batching(instance)  # inherited by `dagster dev`, its daemon and its run workers
    argv = ui_argv(args.host, args.port)
    print(f"DAGSTER_HOME={home}; opening http://{args.host}:{args.port}", flush=True)
    os.execv(argv[0], argv)
    return 0


def cmd_trail(args: argparse.Namespace) -> int:
    from poll_assets.io_manager import default_storage_dir
    from poll_assets.lineage import TrailError, format_trail, prompt_trail, trail_json

    if args.storage is None:
        _use_project_home()
    storage = args.storage or default_storage_dir()
    try:
        trail = prompt_trail(args.prompt_id, storage, partition=args.partition)
    except TrailError as exc:
        print(f"poll-assets trail: {exc}", file=sys.stderr)
        return 2
    from poll_assets.terminal import escape_controls

    print(escape_controls(trail_json(trail) if args.json else format_trail(trail)))
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    """Print what partitions will cost, from the built prompts and the response cache; no model is called."""
    _use_project_home()
    import pandas as pd

    from poll_assets.estimate import estimate_prompts, format_estimate, partition_prompts
    from poll_assets.llm.resources import build_cache_resource
    from poll_assets.panel import PanelConfigError, load_panel
    from poll_assets.partitions import shard_keys

    try:
        panel, path = load_panel(args.panel)
    except PanelConfigError as exc:
        print(f"poll-assets estimate: {exc}", file=sys.stderr)
        return 2
    keys = shard_keys(panel.source.num_examples, panel.source.shard_size)
    chosen = keys if args.all else [args.partition or keys[0]]
    unknown = [k for k in chosen if k not in keys]
    if unknown:
        print(f"poll-assets estimate: no partition {unknown[0]!r} in panel {panel.name}; "
              f"they are {keys[0]} .. {keys[-1]}", file=sys.stderr)
        return 2
    resource = build_cache_resource(panel.cache)
    # Read what is cached; a SQLite file that does not exist yet is not created just to find it empty.
    fresh = panel.cache.resolved_backend == "sqlite" and not resource.resolved_path().is_file()
    cache = None if fresh or panel.cache.mode != "use" else resource.get_cache()
    try:
        prompts = pd.concat([partition_prompts(panel.source, path.parent, k) for k in chosen], ignore_index=True)
    except (OSError, ValueError) as exc:  # an unreadable prompt file, or a Hub dataset out of reach
        print(f"poll-assets estimate: cannot read the prompts of panel {panel.name}: {exc}", file=sys.stderr)
        return 2
    print(format_estimate(estimate_prompts(panel.jury, panel.member_prices(), prompts, cache, partitions=chosen)))
    print(shard_size_line(panel))
    return 0


def shard_size_line(panel: Panel) -> str:
    """The panel's shard size, where it came from, and the share of a shard's time that the cost
    model expects Dagster's fixed cost to take at that size."""
    from poll_assets.shard_cost import overhead_share

    share = overhead_share(panel.shard_shape(), panel.source.shard_size)
    return (f"shard size: {panel.source.shard_size} prompts ({panel.source.shard_size_origin}); "
            f"expected Dagster overhead {share:.1%} of a shard's time (docs/operations.md, Shard size)")


def _stored_pooled(command: str, args: argparse.Namespace,
                   needs: Callable[[Panel], str | None]) -> tuple[Panel, Path, Any] | None:
    """The panel and every stored pooled_ratings shard, for a report over the whole dataset; None after
    printing why not (a bad panel, what the report `needs` of it, unreadable storage)."""
    if args.storage is None:
        _use_project_home()
    import dagster as dg

    from poll_assets.assets.keys import POOLED_KEY
    from poll_assets.assets.publishing import read_all_partitions
    from poll_assets.io_manager import default_storage_dir
    from poll_assets.panel import PanelConfigError, load_panel

    try:
        panel, path = load_panel(args.panel)
    except PanelConfigError as exc:
        print(f"poll-assets {command}: {exc}", file=sys.stderr)
        return None
    missing = needs(panel)
    if missing:
        print(f"poll-assets {command}: panel {panel.name} ({path}) {missing}", file=sys.stderr)
        return None
    try:
        return panel, path, read_all_partitions(args.storage or default_storage_dir(), POOLED_KEY)
    except dg.Failure as exc:
        print(f"poll-assets {command}: {exc.description}", file=sys.stderr)
        return None


def cmd_calibration(args: argparse.Namespace) -> int:
    """Print the calibration table over every stored shard of the panel (the dataset card's figures)."""
    stored = _stored_pooled("calibration", args, lambda panel: None if panel.gold else
                            "has no gold labels; add `gold: {path: ...}` (docs/calibration.md)")
    if stored is None:
        return 2
    panel, path, pooled = stored
    import dagster as dg

    from poll_assets.assets.publishing import dataset_calibration
    from poll_assets.scoring.calibration import calibration_markdown
    from poll_assets.rubrics.ultrafeedback import get_rubric

    try:
        result = dataset_calibration(panel, get_rubric(panel.judging.aspect), pooled, panel.gold.location(path))
    except dg.Failure as exc:
        print(f"poll-assets calibration: {exc.description}", file=sys.stderr)
        return 2
    if args.json:
        import json

        print(json.dumps(result, indent=2))
    else:
        print(f"panel {panel.name}: {len(pooled)} prompts in the stored shards; gold labels {panel.gold.path}\n")
        print(calibration_markdown(result))
    return 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    """Print the generators' leaderboard over every stored shard (pairwise mode; the dataset card's table)."""
    stored = _stored_pooled("leaderboard", args, lambda panel: None if panel.judging.mode == "pairwise" else (
        f"judges in mode {panel.judging.mode!r}; the leaderboard comes from pairwise comparisons: set "
        "`judging: {mode: pairwise}` (docs/pairwise.md)"))
    if stored is None:
        return 2
    panel, _, pooled = stored
    from poll_assets.assets.publishing import dataset_pairwise
    from poll_assets.scoring.pooled_comparisons import position_markdown

    summary = dataset_pairwise(panel, pooled, resamples=args.resamples)
    if summary is None:
        print("poll-assets leaderboard: the stored pooled_ratings shards hold no comparisons; re-run them in "
              "pairwise mode", file=sys.stderr)
        return 2
    if args.json:
        import json

        print(json.dumps({k: v for k, v in summary.items() if k != "leaderboard_markdown"}, indent=2))
    else:
        print(f"panel {panel.name}: {len(pooled)} prompts in the stored shards\n")
        print(summary["leaderboard_markdown"])
        print("\n" + position_markdown(summary["position"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="poll-assets", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="materialize what is missing or stale in some shards (default: the first)")
    run.add_argument("--panel", help="bundled panel name or YAML path (default: $POLL_PANEL or 'local')")
    which = run.add_mutually_exclusive_group()
    which.add_argument("--partition", help="shard key, e.g. shard-00000")
    which.add_argument("--partitions", metavar="A...B",
                       help="a range of shards, both ends included, e.g. shard-00000...shard-00019; "
                            "run as runs of source.shards_per_run shards")
    which.add_argument("--all", action="store_true", help="every shard of the panel (runs of source.shards_per_run)")
    run.add_argument("--force", action="store_true",
                     help="materialize every asset of the shards asked for, even those up to date "
                          "(default: only what is missing or stale; cached calls are not paid again)")
    run.set_defaults(fn=cmd_run)
    ui = sub.add_parser("ui", help="start `dagster dev` on the project's instance")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=3000)
    ui.set_defaults(fn=cmd_ui)
    trail = sub.add_parser("trail", help="everything stored about one prompt: answers, verdicts, pooled ratings, pairs")
    trail.add_argument("prompt_id", help="the prompt's id (sha256 of its text) or a unique prefix of 6+ characters")
    trail.add_argument("--partition", help="shard to look in (default: search every materialized shard)")
    trail.add_argument("--json", action="store_true", help="print the trail as JSON")
    trail.add_argument("--storage", help="storage folder or URL (default: $DAGSTER_HOME/storage)")
    trail.set_defaults(fn=cmd_trail)
    est = sub.add_parser("estimate", help="what a partition's LLM calls will cost, without calling any model")
    est.add_argument("--panel", help="bundled panel name or YAML path (default: $POLL_PANEL or 'local')")
    which = est.add_mutually_exclusive_group()
    which.add_argument("--partition", help="shard key, e.g. shard-00000 (default: the first)")
    which.add_argument("--all", action="store_true", help="every partition of the panel")
    est.set_defaults(fn=cmd_estimate)
    cal = sub.add_parser("calibration", help="the judges and the jury against the gold labels, over every stored shard")
    cal.add_argument("--panel", help="bundled panel name or YAML path (default: $POLL_PANEL or 'local')")
    cal.add_argument("--storage", help="storage folder or URL (default: $DAGSTER_HOME/storage)")
    cal.add_argument("--json", action="store_true", help="print the result as JSON")
    cal.set_defaults(fn=cmd_calibration)
    board = sub.add_parser("leaderboard", help="pairwise mode: the generators ranked by Bradley-Terry over every stored shard")
    board.add_argument("--panel", help="bundled panel name or YAML path (default: $POLL_PANEL or 'local')")
    board.add_argument("--storage", help="storage folder or URL (default: $DAGSTER_HOME/storage)")
    board.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples over prompts (default 1000; 0: no intervals)")
    board.add_argument("--json", action="store_true", help="print the result as JSON")
    board.set_defaults(fn=cmd_leaderboard)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    raise SystemExit(main())
