"""Benchmark: the whole PoLL graph against the loopback fake provider server, and distilabel 1.5.3 beside it.

Not a test. Run from the repository root with the project's venv:

    .venv/bin/python bench/bench_pipeline.py                      # everything (a few minutes)
    .venv/bin/python bench/bench_pipeline.py --sizes 300 --no-distilabel

Shape (the seed pipeline's): the `paper` panel, 4 generators and 3 judges with their provider types
(hf_inference, openai, anthropic), every member's base_url pointed at the fake server, 64 concurrent
calls per member, no rpm/tpm budget (the fake server has none), and one partition holding all N prompts
of a generated JSONL file. The server answers each request after 500 +- 100 ms.

Every measurement runs in a fresh subprocess, so its peak RSS is its own. The server lives in this
(parent) process; its request counter is the number of HTTP requests a measurement made.

distilabel runs from its own venv (default /work/bench-venv, override with --distilabel-python),
because it pins packages the project does not want; see bench/distilabel_pipeline.py.

ideal = sum over the two LLM stages of ceil(calls per member / concurrency) x mean latency: what a
stage takes when all its members run at once and each keeps `concurrency` calls in flight.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

LATENCY_MS = 500.0
JITTER_MS = 100.0
CONCURRENCY = 64
FAKE_KEY_ENV = "POLL_BENCH_FAKE_KEY"
PARTITION = "shard-00000"
DEFAULT_DISTILABEL_PYTHON = "/work/bench-venv/bin/python"

TOPICS = (
    "tides", "compound interest", "photosynthesis", "the printing press", "sourdough starters", "binary search",
    "volcanoes", "jazz harmony", "the immune system", "bicycle gears", "supply and demand", "black holes",
    "crop rotation", "public-key cryptography", "glaciers", "the Roman calendar", "vaccines", "wind turbines",
)
TASKS = (
    "Explain {t} to a twelve-year-old in three sentences.",
    "Write a short, friendly email inviting a colleague to a talk about {t}.",
    "List four common misconceptions about {t} and correct each one.",
    "Give a step-by-step plan for a one-hour workshop on {t}.",
    "Summarize the history of {t} in one paragraph.",
)


# -- the prompt file and the panel ---------------------------------------------------------------------


def write_prompts(path: Path, n: int) -> None:
    """n distinct prompts (the numbering keeps them distinct past len(TOPICS) x len(TASKS))."""
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            text = TASKS[i % len(TASKS)].format(t=TOPICS[(i // len(TASKS)) % len(TOPICS)])
            f.write(json.dumps({"prompt": f"{text} (request {i})"}) + "\n")


def member_base_url(server_url: str, provider: str, name: str) -> str:
    """Each member gets its own path prefix ("tag"), so the server counts requests per member."""
    if provider == "anthropic":
        return f"{server_url}/{name}"  # the SDK appends /v1/messages
    if provider == "hf_inference":
        return f"{server_url}/hf_{name}/v1"  # "hf" tags get TGI-shaped errors
    return f"{server_url}/{name}/v1"


def bench_panel(
    server_url: str, prompts_file: Path, n: int, concurrency: int = CONCURRENCY, shard_size: int | None = None
) -> Any:
    """The `paper` panel, aimed at the fake server; one partition holds all n prompts unless `shard_size` is given."""
    from poll_assets.panel import load_panel

    paper, _ = load_panel("paper")

    def aim(m: Any) -> Any:
        limits = m.limits.model_copy(update={"max_concurrency": concurrency, "rpm": None, "tpm": None})
        return m.model_copy(
            update={"base_url": member_base_url(server_url, m.provider, m.name), "limits": limits, "api_key_env": FAKE_KEY_ENV}
        )

    source = paper.source.model_copy(
        update={"repo_id": None, "data_files": [str(prompts_file)], "num_examples": n, "shard_size": shard_size or n}
    )
    return paper.model_copy(
        update={
            "name": f"bench_{n}",
            "source": source,
            "generators": [aim(m) for m in paper.generators],
            "judges": [aim(m) for m in paper.judges],
        }
    )


def write_panel_yaml(panel: Any, path: Path) -> Path:
    """Round-trip through YAML so the panel is validated like a user's file, and a step subprocess can load it."""
    import yaml

    from poll_assets.panel import load_panel

    path.write_text(yaml.safe_dump(panel.model_dump(mode="json", exclude_none=True), sort_keys=False))
    load_panel(path)  # fails here, with the field named, if the edits made it invalid
    return path


# -- the child: one measurement of our pipeline -----------------------------------------------------------


def multiprocess_job() -> Any:
    """Module-level so Dagster can rebuild the job in each step subprocess (reconstructable)."""
    from poll_assets.panel import load_panel
    from poll_assets.pipeline import JOB_NAME, build_definitions

    panel, path = load_panel(Path(os.environ["POLL_BENCH_PANEL"]))
    defs = build_definitions(
        panel, path, storage_dir=os.environ["POLL_BENCH_STORAGE"], cache_path=os.environ["POLL_BENCH_CACHE"],
        member_steps=True,  # one process per member is the point of this executor
    )
    return defs.resolve_job_def(JOB_NAME)


def child_ours(args: argparse.Namespace) -> None:
    started = time.monotonic()
    import resource

    import dagster as dg

    from poll_assets.panel import load_panel
    from poll_assets.partitions import build_partitions_def
    from poll_assets.pipeline import JOB_NAME, build_definitions

    work = Path(args.workdir)
    os.environ[FAKE_KEY_ENV] = "fake-key"
    os.environ["POLL_BENCH_PANEL"] = str(work / "panel.yaml")
    os.environ["POLL_BENCH_STORAGE"] = str(work / "storage")
    os.environ["POLL_BENCH_CACHE"] = str(work / "cache.sqlite")
    home = work / "dagster_home"
    home.mkdir(exist_ok=True)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    os.environ["DAGSTER_HOME"] = str(home)
    panel, path = load_panel(work / "panel.yaml")
    imported = time.monotonic()
    with dg.DagsterInstance.get() as instance:
        run_start = time.monotonic()
        if args.executor in ("in_process", "in_process_member_steps"):
            defs = build_definitions(
                panel, path, storage_dir=str(work / "storage"), cache_path=str(work / "cache.sqlite"),
                member_steps=args.executor == "in_process_member_steps",
            )
            job = defs.resolve_job_def(JOB_NAME)
            # Loading definitions (which imports the panel's provider SDKs) is what a code location
            # does before any run; it is timed apart from the run itself.
            defs_s = time.monotonic() - run_start
            run_start = time.monotonic()
            # Every shard in turn, in this one process (one shard unless the panel was sharded), so
            # the peak RSS below covers all of them.
            keys = build_partitions_def(panel.source).get_partition_keys()
            success = True
            for key in keys:
                result = job.execute_in_process(partition_key=key, instance=instance, raise_on_error=False)
                success = success and result.success
            run_id = result.run_id
        else:
            defs_s = 0.0  # each step process loads the definitions itself
            run_config = {"execution": {"config": {"multiprocess": {"max_concurrent": args.max_concurrent}}}}
            if args.executor == "multiprocess_forkserver":
                run_config["execution"]["config"]["multiprocess"]["start_method"] = {
                    "forkserver": {"preload_modules": ["poll_assets.pipeline", "bench.bench_pipeline"]}
                }
            with dg.execute_job(
                dg.reconstructable(multiprocess_job),
                instance=instance,
                run_config=run_config,
                tags={"dagster/partition": PARTITION},
                raise_on_error=False,
            ) as result:
                success = result.success
                run_id = result.run_id
        run_s = time.monotonic() - run_start
        # Where the run's time went, per step, from Dagster's own records.
        steps = {
            s.step_key: round(s.end_time - s.start_time, 3)
            for s in instance.get_run_step_stats(run_id)
            if s.start_time is not None and s.end_time is not None
        }
    rows = _count_rows(work / "storage", panel)
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    self_rss, child_rss = me.ru_maxrss, kids.ru_maxrss
    print(
        "BENCH_RESULT "
        + json.dumps(
            {
                "success": success,
                "run_s": run_s,
                "startup_s": imported - started,
                "defs_s": defs_s,
                "rows": rows,
                "steps_s": steps,
                "self_maxrss_mb": self_rss / 1024,
                "children_maxrss_mb": child_rss / 1024,
                # CPU seconds spent (user + system), which other load on the machine does not inflate much.
                "cpu_s": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime,
            }
        ),
        flush=True,
    )


def _count_rows(storage: Path, panel: Any) -> dict[str, int]:
    import pandas as pd

    out = {}
    for key in (
        ["prompts"], *[["generations", m.name] for m in panel.generators], ["combined_generations"],
        *[["ratings", m.name] for m in panel.judges], ["pooled_ratings"], ["preference_pairs"],
    ):
        f = storage.joinpath(*key, f"{PARTITION}.parquet")
        out["/".join(key)] = len(pd.read_parquet(f)) if f.is_file() else -1
    return out


# -- the bare-client floor: the same calls from a plain aiohttp client ------------------------------------


def _bare_call(member: Any, server_url: str, content: str) -> tuple[str, dict[str, Any], dict[str, str]]:
    """URL, body and headers of one chat call to the fake server, in the member's wire format."""
    base = member_base_url(server_url, member.provider, member.name)
    messages = [{"role": "user", "content": content}]
    if member.provider == "anthropic":
        return (f"{base}/v1/messages", {"model": member.model, "max_tokens": 1024, "messages": messages},
                {"x-api-key": "fake-key", "anthropic-version": "2023-06-01"})
    return (f"{base}/chat/completions", {"model": member.model, "max_tokens": 1024, "messages": messages},
            {"authorization": "Bearer fake-key"})


async def _bare_stage(session: Any, server_url: str, members: list[Any], contents: list[str]) -> dict[str, list[str]]:
    """Every member sends one call per content, `CONCURRENCY` in flight per member, all members at once;
    returns each member's answers in order."""
    import asyncio

    async def member_calls(m: Any) -> list[str]:
        gate = asyncio.Semaphore(CONCURRENCY)

        async def one(content: str) -> str:
            url, body, headers = _bare_call(m, server_url, content)
            async with gate, session.post(url, json=body, headers=headers) as resp:
                data = await resp.json()
            if m.provider == "anthropic":
                return data["content"][0]["text"]
            return data["choices"][0]["message"]["content"]

        return await asyncio.gather(*(one(c) for c in contents))

    answers = await asyncio.gather(*(member_calls(m) for m in members))
    return {m.name: a for m, a in zip(members, answers)}


def child_floor(args: argparse.Namespace) -> None:
    """The bare-client floor: the generation calls, then judge calls carrying the prompt and the four
    answers, from one aiohttp session on one event loop. No cache, no retries, no storage."""
    import asyncio

    import aiohttp

    from poll_assets.panel import load_panel

    panel, _ = load_panel(Path(args.panel))
    prompts = [json.loads(line)["prompt"] for line in Path(args.prompts).read_text().splitlines()]

    async def both_stages() -> int:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            answers = await _bare_stage(session, args.server, panel.generators, prompts)
            judge_prompts = [
                p + "".join(f"\n\n[text {k + 1}]\n{answers[g.name][i]}" for k, g in enumerate(panel.generators))
                for i, p in enumerate(prompts)
            ]
            verdicts = await _bare_stage(session, args.server, panel.judges, judge_prompts)
        return sum(len(a) for a in answers.values()) + sum(len(v) for v in verdicts.values())

    start = time.monotonic()
    calls = asyncio.run(both_stages())
    print("BENCH_RESULT " + json.dumps({"success": calls == 7 * len(prompts), "run_s": time.monotonic() - start}),
          flush=True)


# -- the parent: server, subprocesses, memory sampling -----------------------------------------------------


def _tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants, from /proc (Linux)."""
    total_kb = 0
    stack = [pid]
    seen = set()
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total_kb += int(line.split()[1])
                        break
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total_kb / 1024


@dataclass
class Measurement:
    label: str
    n: int
    wall_s: float  # the subprocess, start to exit (interpreter, imports, pipeline start-up included)
    run_s: float | None  # the pipeline run alone, as the child timed it (loading definitions excluded)
    requests: int
    peak_tree_rss_mb: float  # sampled every 50 ms: the process and all its children, summed
    peak_proc_rss_mb: float  # getrusage: the largest single process
    ok: bool
    detail: dict[str, Any] = field(default_factory=dict)


def run_child(
    cmd: list[str], env: dict[str, str], server: Any, label: str, n: int, log: Path, reports: bool = True
) -> Measurement:
    """Run `cmd`, sampling its process tree's memory. `reports`: it prints a BENCH_RESULT line (our
    children do; `poll-assets run` itself does not, and succeeds by its exit code)."""
    import resource

    before = server.stats()["total"]
    parent_cpu = resource.getrusage(resource.RUSAGE_SELF)
    kids_cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak = 0.0
    t0 = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=out, text=True, cwd=REPO)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)  # type: ignore[arg-type]
        reader.start()
        while proc.poll() is None:
            peak = max(peak, _tree_rss_mb(proc.pid))
            time.sleep(0.05)
        wall = time.monotonic() - t0
        reader.join(timeout=5)
    now = resource.getrusage(resource.RUSAGE_SELF)
    # This process is mostly the fake server's thread, so its CPU time is the server's share.
    server_cpu = (now.ru_utime + now.ru_stime) - (parent_cpu.ru_utime + parent_cpu.ru_stime)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds of the child process (and the descendants it waited for): the load of other jobs
    # on the machine inflates wall time far more than this
    child_cpu = (kids.ru_utime + kids.ru_stime) - (kids_cpu.ru_utime + kids_cpu.ru_stime)
    result: dict[str, Any] = {}
    for line in lines:
        if line.startswith("BENCH_RESULT "):
            result = json.loads(line[len("BENCH_RESULT ") :])
    ok = proc.returncode == 0 and (bool(result.get("success", False)) or not reports)
    if not ok:
        sys.stderr.write(f"[{label} N={n}] failed (exit {proc.returncode}); log: {log}\n")
        sys.stderr.write("".join(log.read_text().splitlines(keepends=True)[-30:]))
    proc_rss = max(result.get("self_maxrss_mb", 0.0), result.get("children_maxrss_mb", 0.0))
    return Measurement(
        label=label,
        n=n,
        wall_s=wall,
        run_s=result.get("run_s"),
        requests=server.stats()["total"] - before,
        peak_tree_rss_mb=peak,
        peak_proc_rss_mb=proc_rss,
        ok=ok,
        detail={**result, "server_cpu_s": server_cpu, "process_cpu_s": child_cpu},
    )


def _llm_stage_s(m: Measurement) -> float | None:
    """Seconds in the steps that make LLM calls (the generation and ratings stages, or their members)."""
    steps = m.detail.get("steps_s")
    if not steps:
        return None
    return sum(d for k, d in steps.items() if k.split("__")[0] in ("generations", "ratings"))


def ours_cmd(work: Path, executor: str, max_concurrent: int) -> list[str]:
    return [
        sys.executable, str(Path(__file__).resolve()), "child-ours", "--workdir", str(work),
        "--executor", executor, "--max-concurrent", str(max_concurrent),
    ]


def ideal_s(n: int, concurrency: int, latency_s: float) -> float:
    """Both LLM stages, each member's n calls in waves of `concurrency`, members of a stage side by side."""
    return 2 * math.ceil(n / concurrency) * latency_s


def fmt(m: Measurement) -> str:
    run = f"{m.run_s:6.2f}s" if m.run_s is not None else "     - "
    return (
        f"{m.label:<28} N={m.n:<5} wall {m.wall_s:6.2f}s  run {run}  defs {m.detail.get('defs_s', 0.0):5.2f}s  "
        f"requests {m.requests:5d}  "
        f"peak RSS tree {m.peak_tree_rss_mb:7.1f} MB  largest proc {m.peak_proc_rss_mb:7.1f} MB"
        + (f"  cpu {m.detail['cpu_s']:6.1f}s (+ server {m.detail['server_cpu_s']:5.1f}s)" if "cpu_s" in m.detail else "")
        + (f"  process cpu {m.detail['process_cpu_s']:6.1f}s" if "process_cpu_s" in m.detail else "")
        + ("" if m.ok else "  FAILED")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    child = sub.add_parser("child-ours")
    child.add_argument("--workdir", required=True)
    child.add_argument("--executor", default="in_process")
    child.add_argument("--max-concurrent", type=int, default=8)
    floor = sub.add_parser("child-floor")
    floor.add_argument("--panel", required=True)
    floor.add_argument("--prompts", required=True)
    floor.add_argument("--server", required=True)
    parser.add_argument("--dataset-sizes", default="",
                        help="N values for the dataset-scale case (shards of 50, one `poll-assets run --all`), e.g. 300,1000,3000")
    parser.add_argument("--sizes", default="100,300", help="N values for the timed runs")
    parser.add_argument("--memory-sizes", default="300,3000", help="N values for the memory runs (zero latency)")
    parser.add_argument(
        "--memory-shard-sizes", default="0,50",
        help="shard_size for the memory runs: 0 = one partition of N prompts; 50 = the project default, shards run in turn",
    )
    parser.add_argument(
        "--executors", default="in_process,in_process_member_steps",
        help=(
            "our set-ups to time: in_process (one step per stage, the default graph), in_process_member_steps "
            "(one step per member, run one after another), multiprocess / multiprocess_forkserver (one process per member step)"
        ),
    )
    parser.add_argument("--max-concurrent", type=int, default=8, help="multiprocess executor: steps at once")
    parser.add_argument("--batch-sizes", default="seed,50", help="distilabel input_batch_size: 'seed' (10/5) and/or numbers")
    parser.add_argument("--distilabel-python", default=DEFAULT_DISTILABEL_PYTHON)
    parser.add_argument("--no-distilabel", action="store_true")
    parser.add_argument("--distilabel-dataset-sizes", default="1000",
                        help="dataset-case N values that also run distilabel (batches of 50) on the same prompts")
    parser.add_argument("--json", help="also write every measurement to this file")
    args = parser.parse_args(argv)
    if args.command == "child-ours":
        child_ours(args)
        return 0
    if args.command == "child-floor":
        child_floor(args)
        return 0
    return run_bench(args)


DATASET_SHARD = 50


def run_distilabel(python: str, work: Path, server: Any, env: dict[str, str], prompts: Path, n: int,
                   gen_bs: int, judge_bs: int) -> Measurement:
    """distilabel's pipeline (bench/distilabel_pipeline.py) from its own venv, on the same server."""
    work.mkdir()
    server.reset(latency_ms=LATENCY_MS, jitter_ms=JITTER_MS)
    cmd = [
        python, str(REPO / "bench" / "distilabel_pipeline.py"),
        "--server", server.url, "--prompts", str(prompts), "--workdir", str(work),
        "--gen-batch-size", str(gen_bs), "--judge-batch-size", str(judge_bs),
    ]
    dl_env = {k: v for k, v in env.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    dl_env["DISTILABEL_CACHE_DIR"] = str(work / "distilabel_cache")
    return run_child(cmd, dl_env, server, f"distilabel/batch {gen_bs}/{judge_bs}", n, work / "run.log")


def dataset_case(root: Path, server: Any, env: dict[str, str], n: int, record: Any,
                 distilabel_python: str | None = None) -> list[str]:
    """N prompts in shards of 50, built as a whole dataset by ONE `poll-assets run --all` process
    (runs of `shards_per_run` shards), against the bare-client floor for the same calls measured
    just before it; then a warm re-run of one shard as a whole process, against a whole process
    running Dagster's floor for the same graph shape (bench/dagster_floor.py, one run)."""
    work = root / f"dataset_{n}"
    work.mkdir()
    prompts = work / "prompts.jsonl"
    write_prompts(prompts, n)
    panel = write_panel_yaml(bench_panel(server.url, prompts, n, shard_size=DATASET_SHARD), work / "panel.yaml")
    expected = 7 * n
    print(f"\n== dataset N = {n} in shards of {DATASET_SHARD}: {expected} calls expected ==")
    server.reset(latency_ms=LATENCY_MS, jitter_ms=JITTER_MS)
    floor_cmd = [sys.executable, str(Path(__file__).resolve()), "child-floor", "--panel", str(panel),
                 "--prompts", str(prompts), "--server", server.url]
    floor = record(run_child(floor_cmd, env, server, "bare aiohttp client", n, work / "floor.log"))
    home = work / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    cli_env = {**env, "DAGSTER_HOME": str(home), FAKE_KEY_ENV: "fake-key"}
    cli = [sys.executable, "-m", "poll_assets.cli", "run", "--panel", str(panel)]
    server.reset(latency_ms=LATENCY_MS, jitter_ms=JITTER_MS)
    build = record(run_child(cli + ["--all"], cli_env, server, "ours: poll-assets run --all", n, work / "build.log",
                             reports=False))
    # --force: a re-run that re-materializes the shard (the default would find nothing to do and launch no run)
    warm = record(run_child(cli + ["--partition", "shard-00000", "--force"], cli_env, server, "ours: warm re-run of one shard",
                            n, work / "warm.log", reports=False))
    dagster_floor = [sys.executable, str(REPO / "bench" / "dagster_floor.py"), "--runs", "1"]
    dfloor = record(run_child(dagster_floor, env, server, "dagster floor, one run", n, work / "dagster_floor.log",
                              reports=False))
    versus = []
    if distilabel_python:  # the same prompts through distilabel, batches of 50 (one partition: it has no shards)
        d = record(run_distilabel(distilabel_python, work / "distilabel_50", server, env, prompts, n,
                                  DATASET_SHARD, DATASET_SHARD))
        versus = [f"dataset N={n}: build / distilabel (batches of {DATASET_SHARD}) {build.wall_s / d.wall_s:.2f} "
                  f"(target <= 0.3): build {build.wall_s:.1f}s, distilabel {d.wall_s:.1f}s, {d.requests} requests"]
    return versus + [
        f"dataset N={n}: build {build.wall_s:.1f}s, requests {build.requests} (expected {expected}); "
        f"bare client {floor.wall_s:.1f}s (calls {floor.run_s or float('nan'):.1f}s); "
        f"build / bare-client process {build.wall_s / floor.wall_s:.2f} (target <= 1.5), "
        f"build / bare-client calls {build.wall_s / (floor.run_s or float('nan')):.2f}; "
        f"CPU s build {build.detail['process_cpu_s']:.1f}, bare client {floor.detail['process_cpu_s']:.1f}; "
        f"peak RSS {build.peak_tree_rss_mb:.0f} MB tree, {build.peak_proc_rss_mb:.0f} MB largest process",
        f"dataset N={n}: warm re-run of one shard {warm.wall_s:.2f}s, {warm.requests} requests; Dagster floor "
        f"process {dfloor.wall_s:.2f}s; warm / floor {warm.wall_s / dfloor.wall_s:.2f} (target <= 1.3); "
        f"in CPU seconds {warm.detail['process_cpu_s']:.2f} / {dfloor.detail['process_cpu_s']:.2f} = "
        f"{warm.detail['process_cpu_s'] / dfloor.detail['process_cpu_s']:.2f}",
    ]


def run_bench(args: argparse.Namespace) -> int:
    from poll_assets_tests.fake_llm_server import FakeLLMServer

    sizes = [int(s) for s in args.sizes.split(",") if s]
    memory_sizes = [int(s) for s in args.memory_sizes.split(",") if s]
    executors = [e for e in args.executors.split(",") if e]
    batch_sizes = [b for b in args.batch_sizes.split(",") if b]
    latency_s = LATENCY_MS / 1000
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "PYTHONUNBUFFERED": "1"}
    env.pop("DAGSTER_HOME", None)
    measurements: list[Measurement] = []
    print(f"machine: {os.cpu_count()} cores; python {sys.version.split()[0]}; fake latency {LATENCY_MS:g} +- {JITTER_MS:g} ms")

    def record(m: Measurement) -> Measurement:
        measurements.append(m)
        print(fmt(m), flush=True)
        return m

    with FakeLLMServer() as server, tempfile.TemporaryDirectory(prefix="poll-bench-") as tmp:
        root = Path(tmp)
        url = server.url
        summary: list[str] = []
        for n in sizes:
            prompts = root / f"prompts_{n}.jsonl"
            write_prompts(prompts, n)
            ideal = ideal_s(n, CONCURRENCY, latency_s)
            expected = 4 * n + 3 * n
            print(f"\n== N = {n}: {expected} calls expected; ideal {ideal:.2f}s ==")
            ours: dict[str, Measurement] = {}
            for executor in executors:
                work = root / f"ours_{executor}_{n}"
                work.mkdir()
                write_panel_yaml(bench_panel(url, prompts, n), work / "panel.yaml")
                server.reset(latency_ms=LATENCY_MS, jitter_ms=JITTER_MS)
                cold = record(run_child(ours_cmd(work, executor, args.max_concurrent), env, server, f"ours/{executor}", n, work / "cold.log"))
                ours[executor] = cold
                warm = record(run_child(ours_cmd(work, executor, args.max_concurrent), env, server, f"ours/{executor} warm", n, work / "warm.log"))
                llm_cold, llm_warm = _llm_stage_s(cold), _llm_stage_s(warm)
                if llm_cold and llm_warm is not None:
                    summary.append(
                        f"N={n} ours/{executor}: LLM stage steps {llm_cold:.2f}s cold, {llm_warm:.2f}s warm "
                        f"(warm/cold {llm_warm / llm_cold:.2f}); other steps and run overhead "
                        f"{(cold.run_s or 0) - llm_cold:.2f}s cold, {(warm.run_s or 0) - llm_warm:.2f}s warm"
                    )
                summary.append(
                    f"N={n} ours/{executor}: requests {cold.requests} (expected {expected}); "
                    f"wall/ideal {cold.wall_s / ideal:.2f}, run/ideal {(cold.run_s or float('nan')) / ideal:.2f}; "
                    f"warm re-run: {warm.requests} requests, warm/cold wall {warm.wall_s / cold.wall_s:.2f}, "
                    f"warm/cold run {(warm.run_s or 0) / (cold.run_s or 1):.2f}"
                )
            if not args.no_distilabel:
                for bs in batch_sizes:
                    gen_bs, judge_bs = (10, 5) if bs == "seed" else (int(bs), int(bs))
                    d = record(run_distilabel(args.distilabel_python, root / f"distilabel_{bs}_{n}", server, env,
                                              prompts, n, gen_bs, judge_bs))
                    for executor, mine in ours.items():
                        summary.append(
                            f"N={n} ours/{executor} vs distilabel batch {gen_bs}/{judge_bs}: wall {mine.wall_s / d.wall_s:.2f}"
                            + (f", run {mine.run_s / d.run_s:.2f}" if mine.run_s and d.run_s else "")
                            + f" (distilabel requests {d.requests}, ideal ratio {d.wall_s / ideal:.2f})"
                        )
        datasets = [int(x) for x in args.dataset_sizes.split(",") if x]
        distilabel_sizes = {int(x) for x in args.distilabel_dataset_sizes.split(",") if x}
        for n in datasets:
            summary += dataset_case(root, server, env, n, record,
                                    None if args.no_distilabel or n not in distilabel_sizes else args.distilabel_python)
        built = [m for m in measurements if m.label == "ours: poll-assets run --all"]
        if len(built) >= 2:
            a, b = built[0], built[-1]
            summary.append(f"dataset builds: peak RSS of the process tree N={b.n} / N={a.n} = "
                           f"{b.peak_tree_rss_mb / a.peak_tree_rss_mb:.2f} (target <= 1.3)")
        if memory_sizes:
            print("\n== memory: zero latency, in_process executor ==")
            for shard in [int(x) for x in args.memory_shard_sizes.split(",") if x]:
                what = "one partition" if not shard else f"shards of {shard}"
                label = f"ours/in_process mem, {what}"
                for n in memory_sizes:
                    prompts = root / f"prompts_mem_{n}.jsonl"
                    if not prompts.exists():
                        write_prompts(prompts, n)
                    work = root / f"mem_{shard}_{n}"
                    work.mkdir()
                    write_panel_yaml(bench_panel(url, prompts, n, shard_size=shard or None), work / "panel.yaml")
                    server.reset()
                    record(run_child(ours_cmd(work, "in_process", args.max_concurrent), env, server, label, n, work / "cold.log"))
                mem = [m for m in measurements if m.label == label]
                if len(mem) >= 2:
                    a, b = mem[0], mem[-1]
                    summary.append(
                        f"memory ({what}): peak RSS N={b.n} / N={a.n} = {b.peak_tree_rss_mb / a.peak_tree_rss_mb:.2f} "
                        f"({a.peak_tree_rss_mb:.0f} MB -> {b.peak_tree_rss_mb:.0f} MB) for {b.n / a.n:.0f}x the rows"
                    )
        print("\n== ratios (measured within this run) ==")
        for line in summary:
            print(line)
    if args.json:
        Path(args.json).write_text(json.dumps([m.__dict__ for m in measurements], indent=2))
    return 0 if all(m.ok for m in measurements) else 1


if __name__ == "__main__":
    raise SystemExit(main())
