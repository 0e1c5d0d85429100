"""The dataset case of bench_pipeline.py (issue 24): a whole dataset built by `poll-assets run --all`.

Not a test. bench_pipeline.py runs it for each `--dataset-sizes` N; this module also answers one
subcommand of its own, run by the benchmark in a subprocess after each phase:

    python bench/dataset_scale.py events --home DAGSTER_HOME [--skip RUN_ID,...]

which prints, as one `BENCH_RESULT` JSON line, what the instance's event log holds for the runs
not skipped: events by type, the partitions materialized per asset, the rows the SQLite index
mirrors for them, and the shard size (rows of shard-00000, from the prompts asset's metadata).

One row of the case, against the loopback fake server (500 +- 100 ms, 64 calls in flight per member):
1. the bare-client floor: the same 7 x N calls from one aiohttp session (`child-floor`);
2. the cold build: one `poll-assets run --all` process on an empty instance and cache;
3. Dagster's floor for the same graph: `bench/dagster_floor.py` over the same shards in the same
   runs, whose steps do no work (its CPU is subtracted to get our own CPU per call);
4. the warm re-run: `poll-assets run --all` again, whatever it chooses to do;
5. a cached pass: every shard re-materialized with every call served by the cache (`run --all
   --force` where the CLI has it; without it, the warm re-run already is one);
6. one judge changed: the first judge's temperature raised by 0.1, then `poll-assets run --all`;
7. distilabel on the same prompts, batches of 50 (N in --distilabel-dataset-sizes).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.bench_pipeline import (  # noqa: E402 - after the path set-up, for `python bench/dataset_scale.py`
    FAKE_KEY_ENV, JITTER_MS, LATENCY_MS, Measurement, bench_panel, member_base_url, run_child, run_distilabel,
    write_panel_yaml, write_prompts,
)

DISTILABEL_BATCH = 50
STAGE_ASSETS = ("prompts", "combined_generations", "pooled_ratings", "preference_pairs")  # besides one per member
BENCH = Path(__file__).resolve().parent

# The targets (issue 24, "Done when").
COLD_OVER_FLOOR = 1.25
COLD_OVER_DISTILABEL = 0.2
WARM_10K_S = 10.0
CACHED_CALL_US = 150.0
PEAK_10K_OVER_1K = 1.3


# -- the event log, read in a subprocess (the parent does not import Dagster) -----------------------------


@dataclass
class Events:
    """What the instance's event log holds for some runs."""

    runs: int = 0
    by_type: dict[str, int] = field(default_factory=dict)
    materialized: dict[str, int] = field(default_factory=dict)  # asset key -> partitions materialized
    index_rows: int | None = None  # rows the SQLite index mirrors for these runs (None: not SQLite)
    shard_size: int | None = None  # rows of shard-00000, from its newest prompts materialization
    run_ids: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.by_type.values())


def read_events(home: Path, skip: set[str]) -> Events:
    """The runs of the instance at `home` that are not in `skip` (child side)."""
    import sqlite3

    import dagster as dg

    with dg.DagsterInstance.from_config(str(home)) as instance:
        run_ids = [r.run_id for r in instance.get_runs() if r.run_id not in skip]
        by_type: Counter[str] = Counter()
        materialized: Counter[str] = Counter()
        for run_id in run_ids:
            for e in instance.all_logs(run_id):
                by_type[e.dagster_event_type.value if e.dagster_event_type else "LOG_MESSAGE"] += 1
                if e.dagster_event_type == dg.DagsterEventType.ASSET_MATERIALIZATION:
                    materialized[e.dagster_event.asset_key.to_user_string()] += 1
        shard_size = _shard_size(instance)
    index = home / "history" / "runs" / "index.db"
    index_rows = None
    if index.is_file() and run_ids:
        with sqlite3.connect(index) as db:
            marks = ",".join("?" * len(run_ids))
            index_rows = db.execute(f"SELECT COUNT(*) FROM event_logs WHERE run_id IN ({marks})", run_ids).fetchone()[0]
    return Events(len(run_ids), dict(by_type), dict(materialized), index_rows, shard_size, run_ids)


def _shard_size(instance: Any) -> int | None:
    """Rows of the first shard, from its prompts materialization: `source_rows` ("0-49"), else the row count."""
    import dagster as dg

    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("prompts"), asset_partitions=["shard-00000"]), limit=1
    ).records
    if not records or records[0].asset_materialization is None:
        return None
    meta = records[0].asset_materialization.metadata
    if "source_rows" in meta:
        first, _, last = str(meta["source_rows"].value).partition("-")
        return int(last) - int(first) + 1
    return int(meta["dagster/row_count"].value) if "dagster/row_count" in meta else None


def events_since(home: Path, env: dict[str, str], seen: set[str]) -> Events:
    """Events of the runs made since `seen` (which this adds them to), read by a subprocess."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "events", "--home", str(home), "--skip", ",".join(sorted(seen))]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    line = next((x for x in out.stdout.splitlines() if x.startswith("BENCH_RESULT ")), None)
    if out.returncode != 0 or line is None:
        sys.stderr.write(f"reading the event log of {home} failed (exit {out.returncode}):\n{out.stderr[-3000:]}\n")
        return Events()
    events = Events(**json.loads(line[len("BENCH_RESULT "):]))
    seen.update(events.run_ids)
    return events


# -- one row --------------------------------------------------------------------------------------------


@dataclass
class Phase:
    """One measured process and what it wrote to the event log."""

    m: Measurement
    events: Events | None = None


@dataclass
class DatasetRow:
    n: int
    calls: int  # calls the graph makes: one per prompt and member
    assets: int  # assets per shard
    shards: int
    shard_size: int | None
    bare: Measurement
    build: Phase
    dagster_floor: Phase
    warm: Phase
    cached: Phase | None  # a pass with every call served by the cache; None when none could be made
    judge: Phase
    judge_name: str
    judge_tag: str
    distilabel: Measurement | None = None


@dataclass
class _Case:
    """What the phases of one row share."""

    n: int
    work: Path
    panel: Path
    server: Any
    env: dict[str, str]
    record: Callable[[Measurement], Measurement]
    home: Path
    seen: set[str] = field(default_factory=set)

    @property
    def cli_env(self) -> dict[str, str]:
        return {**self.env, "DAGSTER_HOME": str(self.home), FAKE_KEY_ENV: "fake-key"}

    def cli(self, label: str, args: list[str], log: str) -> Phase:
        """`poll-assets run` with `args` as a whole process, and the events its runs wrote."""
        cmd = [sys.executable, "-m", "poll_assets.cli", "run", "--panel", str(self.panel), *args]
        m = self.record(run_child(cmd, self.cli_env, self.server, label, self.n, self.work / log, reports=False))
        return Phase(m, events_since(self.home, self.env, self.seen))


def cli_has_force(env: dict[str, str]) -> bool:
    """Whether `poll-assets run` has `--force` (a re-run that redoes fresh shards)."""
    out = subprocess.run([sys.executable, "-m", "poll_assets.cli", "run", "--help"], env=env, capture_output=True,
                         text=True, cwd=REPO)
    return "--force" in out.stdout


def change_first_judge(panel_path: Path, server_url: str) -> tuple[str, str]:
    """Raise the first judge's temperature by 0.1 in the panel file; its name and its server tag."""
    import yaml

    from poll_assets.panel import load_panel

    data = yaml.safe_load(panel_path.read_text())
    judge = data["judges"][0]
    params = judge.setdefault("params", {})
    params["temperature"] = round((params.get("temperature") or 0.0) + 0.1, 3)
    panel_path.write_text(yaml.safe_dump(data, sort_keys=False))
    load_panel(panel_path)  # the edit must leave a valid panel
    base = member_base_url(server_url, judge["provider"], judge["name"])[len(server_url):].strip("/")
    return judge["name"], base.removesuffix("/v1")


def prepare(root: Path, server: Any, n: int, shard_size: int | None) -> tuple[Path, Path, Path, int, int]:
    """The row's folder, prompts and panel (`shard_size` None: left unset, the project's default
    decides); the calls and the assets per shard."""
    work = root / f"dataset_{n}"
    work.mkdir()
    prompts = work / "prompts.jsonl"
    write_prompts(prompts, n)
    panel = bench_panel(server.url, prompts, n, shard_size=shard_size)
    path = write_panel_yaml(panel, work / "panel.yaml", drop_shard_size=shard_size is None)
    members = len(panel.generators) + len(panel.judges)
    return work, prompts, path, members * n, members + len(STAGE_ASSETS)


def dataset_row(root: Path, server: Any, env: dict[str, str], n: int, record: Callable[[Measurement], Measurement],
                shard_size: int | None = None, distilabel_python: str | None = None) -> DatasetRow:
    """Every phase of one row, in order (see the module's docstring)."""
    from poll_assets.panel import load_panel

    work, prompts, panel, calls, assets = prepare(root, server, n, shard_size)
    print(f"\n== dataset N = {n}, shard size {shard_size or 'unset (the default)'}: {calls} calls expected ==")
    home = work / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    case = _Case(n, work, panel, server, env, record, home)
    server.reset(latency_ms=LATENCY_MS, jitter_ms=JITTER_MS)
    floor_cmd = [sys.executable, str(BENCH / "bench_pipeline.py"), "child-floor", "--panel", str(panel),
                 "--prompts", str(prompts), "--server", server.url]
    bare = record(run_child(floor_cmd, env, server, "bare aiohttp client", n, work / "floor.log"))
    server.reset(latency_ms=LATENCY_MS, jitter_ms=JITTER_MS)
    build = case.cli("ours: cold build, run --all", ["--all"], "build.log")
    shards = build.events.materialized.get("prompts", 0) if build.events else 0
    size = build.events.shard_size if build.events else None
    shards = shards or math.ceil(n / (size or n))
    per_run = load_panel(panel)[0].source.shards_per_run
    dfloor = Phase(record(run_child(
        [sys.executable, str(BENCH / "dagster_floor.py"), "--runs", "1", "--shards", str(shards),
         "--shards-per-run", str(per_run)], env, server, "dagster floor, same runs", n, work / "dagster_floor.log")))
    warm = case.cli("ours: warm re-run, run --all", ["--all"], "warm.log")
    cached = cached_pass(case, warm, shards * assets)
    server.reset(latency_ms=LATENCY_MS, jitter_ms=JITTER_MS)
    judge_name, judge_tag = change_first_judge(panel, server.url)
    judge = case.cli(f"ours: {judge_name} changed, run --all", ["--all"], "judge.log")
    row = DatasetRow(n, calls, assets, shards, size, bare, build, dfloor, warm, cached, judge, judge_name, judge_tag)
    if distilabel_python:  # the same prompts through distilabel (one partition: it has no shards)
        row.distilabel = record(run_distilabel(distilabel_python, work / "distilabel_50", server, env, prompts, n,
                                               DISTILABEL_BATCH, DISTILABEL_BATCH))
    return row


def cached_pass(case: _Case, warm: Phase, every_partition: int) -> Phase | None:
    """A pass that re-materializes every asset of every shard with no request: the warm re-run when it
    was one, else `run --all --force` when the CLI has it; None when neither."""
    if warm.events and sum(warm.events.materialized.values()) == every_partition and warm.m.requests == 0:
        return warm
    if not cli_has_force(case.cli_env):
        print("no cached pass: the warm re-run did not redo every shard and `poll-assets run` has no --force")
        return None
    phase = case.cli("ours: cached pass, run --all --force", ["--all", "--force"], "cached.log")
    full = phase.events and sum(phase.events.materialized.values()) == every_partition and phase.m.requests == 0
    return phase if full else None


# -- figures and targets --------------------------------------------------------------------------------


def cpu(m: Measurement) -> float:
    """CPU seconds (user + system) of the process and the descendants it waited for."""
    return float(m.detail["process_cpu_s"])


def own_us_per_call(row: DatasetRow, phase: Phase | None) -> float | None:
    """Our own CPU per call: the phase's CPU less Dagster's floor for the same runs, over the calls."""
    if phase is None or not phase.m.ok or not row.dagster_floor.m.ok:
        return None
    return (cpu(phase.m) - cpu(row.dagster_floor.m)) / row.calls * 1e6


def judge_outcome(row: DatasetRow) -> tuple[bool, str]:
    """Whether changing one judge called only that judge, N times, and re-materialized only what
    depends on it; and what it did."""
    tags = {t: c for t, c in row.judge.m.detail.get("requests_by_tag", {}).items() if c}
    done = row.judge.events.materialized if row.judge.events else {}
    allowed = {f"ratings/{row.judge_name}", "pooled_ratings", "preference_pairs"}
    met = row.judge.m.ok and tags == {row.judge_tag: row.n} and bool(done) and set(done) <= allowed
    beyond = sorted(set(done) - allowed)
    what = (f"{row.judge.m.requests} requests ({', '.join(f'{t} {c}' for t, c in sorted(tags.items())) or 'none'}); "
            f"re-materialized {sum(done.values())} partitions of {len(done)} assets"
            + (f", {len(beyond)} of them not depending on the judge ({', '.join(beyond)})" if beyond else ""))
    return met, what


def row_lines(row: DatasetRow) -> list[str]:
    """The row's figures, one line each."""
    b, ev = row.build, row.build.events or Events()
    floor_ev = Events(by_type=row.dagster_floor.m.detail.get("events_by_type", {}))
    lines = [
        f"N={row.n}: {row.shards} shards of {row.shard_size} (from the prompts' metadata), {row.calls} calls",
        f"  cold build {b.m.wall_s:.1f}s wall, {cpu(b.m):.1f}s CPU (process tree), {b.m.requests} requests; "
        f"bare client {row.bare.wall_s:.1f}s wall ({cpu(row.bare):.1f}s CPU); cold / floor {b.m.wall_s / row.bare.wall_s:.2f}",
        f"  Dagster floor, the same runs ({row.dagster_floor.m.detail.get('runs', '?')}): {row.dagster_floor.m.wall_s:.1f}s wall, "
        f"{cpu(row.dagster_floor.m):.1f}s CPU, {floor_ev.total / row.shards:.1f} events per shard",
        f"  events per shard, cold build: {ev.total / row.shards:.1f} (+ {(ev.index_rows or 0) / row.shards:.1f} index rows); "
        + ", ".join(f"{k} {v / row.shards:.1f}" for k, v in sorted(ev.by_type.items(), key=lambda kv: -kv[1])),
        f"  warm re-run {row.warm.m.wall_s:.1f}s wall, {cpu(row.warm.m):.1f}s CPU, {row.warm.m.requests} requests, "
        f"{sum((row.warm.events or Events()).materialized.values())} partitions re-materialized",
    ]
    if row.cached is not None and row.cached is not row.warm:
        lines.append(f"  cached pass (--force) {row.cached.m.wall_s:.1f}s wall, {cpu(row.cached.m):.1f}s CPU, "
                     f"{row.cached.m.requests} requests")
    cold_us, cached_us = own_us_per_call(row, row.build), own_us_per_call(row, row.cached)
    lines.append(f"  our own CPU per call: cold {_num(cold_us, '{:.0f} µs')}, cached {_num(cached_us, '{:.0f} µs')}; "
                 f"bare client {cpu(row.bare) / row.calls * 1e6:.0f} µs")
    lines.append(f"  peak RSS of the process tree: build {b.m.peak_tree_rss_mb:.0f} MB, warm {row.warm.m.peak_tree_rss_mb:.0f} MB")
    lines.append(f"  {row.judge_name} changed: {judge_outcome(row)[1]}, {row.judge.m.wall_s:.1f}s wall")
    if row.distilabel is not None:
        d = row.distilabel
        lines.append(f"  distilabel (batches of {DISTILABEL_BATCH}) {d.wall_s:.1f}s wall, {d.requests} requests, "
                     f"peak RSS {d.peak_tree_rss_mb:.0f} MB; cold / distilabel {b.m.wall_s / d.wall_s:.2f}")
    return lines


def _num(value: float | None, form: str) -> str:
    return "not measured" if value is None else form.format(value)


def _verdict(value: float | None, limit: float) -> str:
    return "not measured" if value is None else ("met" if value <= limit else "NOT MET")


def target_rows(rows: list[DatasetRow]) -> list[tuple[str, str, str]]:
    """(target, measured, met?) for each of the issue's targets, in the issue's order; a size the
    run did not measure says so."""
    by_n = {r.n: r for r in rows}
    out = []
    for n in (3000, 10000):
        r = by_n.get(n)
        ratio = r.build.m.wall_s / r.bare.wall_s if r and r.build.m.ok and r.bare.ok else None
        out.append((f"cold build <= {COLD_OVER_FLOOR} x bare client, N={n:,}", _num(ratio, "{:.2f}"), _verdict(ratio, COLD_OVER_FLOOR)))
    r = by_n.get(1000)
    d = r.distilabel if r else None
    ratio = r.build.m.wall_s / d.wall_s if r and d and d.ok and r.build.m.ok else None
    out.append((f"cold build <= {COLD_OVER_DISTILABEL} x distilabel (batches of 50), N=1,000", _num(ratio, "{:.2f}"),
                _verdict(ratio, COLD_OVER_DISTILABEL)))
    r = by_n.get(10000)
    warm = r.warm.m.wall_s if r and r.warm.m.ok else None
    out.append((f"warm re-run <= {WARM_10K_S:g} s, N=10,000", _num(warm, "{:.1f} s"), _verdict(warm, WARM_10K_S)))
    for r in rows:
        us = own_us_per_call(r, r.cached)
        out.append((f"our CPU per cached call <= {CACHED_CALL_US:g} µs, N={r.n:,}", _num(us, "{:.0f} µs"),
                    _verdict(us, CACHED_CALL_US)))
    small, big = by_n.get(1000), by_n.get(10000)
    mem = big.build.m.peak_tree_rss_mb / small.build.m.peak_tree_rss_mb if small and big else None
    out.append((f"peak RSS N=10,000 <= {PEAK_10K_OVER_1K} x N=1,000", _num(mem, "{:.2f}"), _verdict(mem, PEAK_10K_OVER_1K)))
    if mem is None and len(rows) >= 2:
        lo, hi = min(rows, key=lambda x: x.n), max(rows, key=lambda x: x.n)
        info = hi.build.m.peak_tree_rss_mb / lo.build.m.peak_tree_rss_mb
        out.append((f"(not the target's sizes) peak RSS N={hi.n:,} / N={lo.n:,}", f"{info:.2f}", "-"))
    for r in rows:
        met, what = judge_outcome(r)
        out.append((f"one judge changed: only its {r.n:,} calls and its dependents, N={r.n:,}", what,
                    "met" if met else "NOT MET"))
    return out


def summary(rows: list[DatasetRow]) -> list[str]:
    """Every row's figures, then the issue's targets as a table."""
    lines = [line for r in rows for line in row_lines(r)]
    table = target_rows(rows)
    width = max(len(t) for t, _, _ in table)
    lines += ["", "targets of issue 24 (measured in this run):", f"{'target':<{width}}  met?          measured"]
    lines += [f"{t:<{width}}  {v:<12}  {m}" for t, m, v in table]
    return lines


def row_json(row: DatasetRow) -> dict[str, Any]:
    """The row as JSON, with its derived figures."""
    out = asdict(row)
    out["own_cpu_us_per_call"] = {"cold": own_us_per_call(row, row.build), "cached": own_us_per_call(row, row.cached)}
    out["judge_change_met"] = judge_outcome(row)[0]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    events = sub.add_parser("events", help="print the event log's figures for the runs not skipped")
    events.add_argument("--home", required=True, help="the DAGSTER_HOME of the instance")
    events.add_argument("--skip", default="", help="run ids already counted, comma-separated")
    args = parser.parse_args(argv)
    found = read_events(Path(args.home), {r for r in args.skip.split(",") if r})
    print("BENCH_RESULT " + json.dumps(asdict(found)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
