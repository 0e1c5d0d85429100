"""Measure `poll-assets run --all` on a dataset that is already built: the whole process's wall time
when nothing is missing or stale (the default does nothing), beside the same command with --force
(every asset of every shard re-made from the response cache, what a re-run cost before).

Not a test. From the repository root, with the project's venv:

    .venv/bin/python bench/noop_rerun.py --n 600 --shard-size 2      # 300 shards

The `paper` panel on the loopback fake server (answers at once), N generated prompts in shards of
`--shard-size`, `--shards-per-run` shards per run for the cold build.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.bench_pipeline import FAKE_KEY_ENV, bench_panel, write_panel_yaml, write_prompts  # noqa: E402


def timed(cmd: list[str], env: dict[str, str], log: Path) -> tuple[float, int, str]:
    """Wall seconds of one whole process, its exit code and its stdout."""
    start = time.monotonic()
    with log.open("w") as err:
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO)
    return time.monotonic() - start, proc.returncode, proc.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=600)
    parser.add_argument("--shard-size", type=int, default=2)
    parser.add_argument("--shards-per-run", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3, help="warm no-op re-runs measured")
    parser.add_argument("--force", action="store_true", help="also measure a warm --force re-run")
    parser.add_argument("--work", type=Path, help="keep the instance and files in this new folder (default: a temp dir)")
    args = parser.parse_args(argv)
    from poll_assets_tests.fake_llm_server import FakeLLMServer

    with FakeLLMServer() as server, tempfile.TemporaryDirectory(prefix="poll-noop-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        prompts = work / "prompts.jsonl"
        write_prompts(prompts, args.n)
        panel = bench_panel(server.url, prompts, args.n, shard_size=args.shard_size)
        panel = panel.model_copy(update={"source": panel.source.model_copy(update={"shards_per_run": args.shards_per_run})})
        path = write_panel_yaml(panel, work / "panel.yaml")
        home = work / "home"
        home.mkdir()
        (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        env = {**os.environ, "PYTHONPATH": str(REPO), "DAGSTER_HOME": str(home), FAKE_KEY_ENV: "fake-key"}
        cmd = [sys.executable, "-m", "poll_assets.cli", "run", "--panel", str(path), "--all"]
        shards = -(-args.n // args.shard_size)
        print(f"N={args.n} in {shards} shards of {args.shard_size}; {os.cpu_count()} cores", flush=True)
        server.reset(latency_ms=0, jitter_ms=0)
        wall, code, _ = timed(cmd, env, work / "build.log")
        print(f"cold build: {wall:.1f}s, exit {code}, {server.stats()['total']} requests", flush=True)
        for i in range(args.repeats):
            server.reset(latency_ms=0, jitter_ms=0)
            wall, code, out = timed(cmd, env, work / f"noop{i}.log")
            print(f"warm re-run, nothing to do: {wall:.2f}s, exit {code}, {server.stats()['total']} requests; "
                  f"{out.strip().splitlines()[-1]}", flush=True)
        if args.force:
            server.reset(latency_ms=0, jitter_ms=0)
            wall, code, _ = timed(cmd + ["--force"], env, work / "force.log")
            print(f"warm re-run with --force: {wall:.1f}s, exit {code}, {server.stats()['total']} requests", flush=True)
        probe = [sys.executable, "-c", "import poll_assets.cli, dagster; from poll_assets.pipeline import build_definitions"]
        wall, _, _ = timed(probe, env, work / "probe.log")
        print(f"for scale: the interpreter importing dagster and the package: {wall:.2f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
