"""Where a warm re-run of one shard spends its time, by phase, as `poll-assets run` does it.

Not a test. Run it in a DAGSTER_HOME where the shard was built before (every call cached):

    DAGSTER_HOME=... .venv/bin/python bench/warm_phases.py --panel panel.yaml --partition shard-00000

Phases: interpreter start to `main` (measured by the caller as wall minus what this prints), imports
(dagster, pandas, the project), loading the panel, building the definitions (this imports the panel's
provider SDKs), the run itself, split into Dagster's steps (from its step records) and the rest (run
creation, event writes between steps, the run's end). Each as wall and CPU seconds of this process, and
as a share of the whole, since the machine's load makes absolute seconds noisy.
"""

from __future__ import annotations

import time

START = (time.monotonic(), time.process_time())

import argparse  # noqa: E402
import json  # noqa: E402


def _mark(marks: list[tuple[str, float, float]], name: str) -> None:
    marks.append((name, time.monotonic(), time.process_time()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--panel", required=True)
    parser.add_argument("--partition", default="shard-00000")
    args = parser.parse_args()
    marks = [("start", *START)]
    import dagster as dg
    import pandas  # noqa: F401

    _mark(marks, "import dagster, pandas")
    from poll_assets.cli import run_job
    from poll_assets.panel import load_panel
    from poll_assets.pipeline import build_definitions

    _mark(marks, "import poll_assets")
    panel, path = load_panel(args.panel)
    _mark(marks, "load panel")
    job = run_job(build_definitions(panel, path))
    _mark(marks, "build definitions")
    with dg.DagsterInstance.get() as instance:
        _mark(marks, "open instance")
        result = job.execute_in_process(partition_key=args.partition, instance=instance, raise_on_error=False,
                                        run_config={"loggers": {"console": {"config": {"log_level": "INFO"}}}})
        _mark(marks, "run")
        steps = {s.step_key: s.end_time - s.start_time for s in instance.get_run_step_stats(result.run_id)
                 if s.start_time and s.end_time}
        events = len(instance.all_logs(result.run_id))
    total_wall, total_cpu = marks[-1][1] - marks[0][1], marks[-1][2] - marks[0][2]
    rows = {}
    for (_, w0, c0), (name, w1, c1) in zip(marks, marks[1:]):
        rows[name] = {"wall_s": round(w1 - w0, 3), "cpu_s": round(c1 - c0, 3), "share": round((w1 - w0) / total_wall, 3)}
    rows["run: steps"] = {"wall_s": round(sum(steps.values()), 3)}
    rows["run: outside steps"] = {"wall_s": round(rows["run"]["wall_s"] - sum(steps.values()), 3)}
    print("PHASES " + json.dumps({"success": result.success, "phases": rows, "steps": steps, "events": events,
                                  "total_wall_s": round(total_wall, 3), "total_cpu_s": round(total_cpu, 3)}))


if __name__ == "__main__":
    main()
