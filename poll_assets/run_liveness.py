"""A run whose process is gone is not a run in progress.

A run killed with SIGKILL (or on an OOM, or a closed terminal) never reports its end, so Dagster
keeps it STARTED forever; the re-run condition then sees the shard as in progress and never asks
for it again. Dagster's run monitoring fails such runs only for launchers that can check their
workers' health, which the default launcher (and `execute_in_process`, which `poll-assets run`
uses) cannot. So every run records the host and pid of its process as run tags, and
`fail_dead_runs` marks FAILURE each STARTING/STARTED run of this host whose process has exited.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
from dataclasses import dataclass

import dagster as dg

HOST_TAG = "poll-assets/host"
PID_TAG = "poll-assets/pid"
PID_START_TAG = "poll-assets/pid_start"  # tells a dead pid from the same number reused by a new process

_IN_PROGRESS = [dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED]


def _start_ticks(pid: int) -> str | None:
    """When `pid` started, in clock ticks since boot (Linux /proc); None where /proc is unavailable."""
    try:
        stat = open(f"/proc/{pid}/stat").read()  # noqa: SIM115 - one small read
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[19] if fields[0] != "Z" else None  # field 22 of the file; a zombie has exited


def process_tags(pid: int | None = None) -> dict[str, str]:
    """The run tags naming the process that executes a run (default: this one)."""
    pid = pid or os.getpid()
    tags = {HOST_TAG: socket.gethostname(), PID_TAG: str(pid)}
    start = _start_ticks(pid)
    if start is not None:
        tags[PID_START_TAG] = start
    return tags


def run_worker_pid() -> int:
    """This run's worker process: the parent of a multiprocess-executor step, else this process."""
    parent = multiprocessing.parent_process()
    return parent.pid if parent is not None and parent.pid else os.getpid()


def tag_run_with_process(instance: dg.DagsterInstance, run: dg.DagsterRun) -> None:
    """Record the run worker's host and pid on a run that does not have them yet (UI-launched runs)."""
    if PID_TAG not in run.tags:
        instance.add_run_tags(run.run_id, process_tags(run_worker_pid()))


def process_gone(tags: dict[str, str]) -> str | None:
    """Why the run's process is known to be gone (None if it may be alive or runs on another host)."""
    host, pid = tags.get(HOST_TAG), tags.get(PID_TAG)
    if host != socket.gethostname() or not (pid or "").isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return f"its process {pid} on {host} has exited"
    except PermissionError:
        pass  # alive, owned by another user
    now = _start_ticks(int(pid))
    if now is None and os.path.isdir("/proc"):
        return f"its process {pid} on {host} has exited"  # a zombie, or gone since the kill(0)
    recorded = tags.get(PID_START_TAG)
    if recorded and now and recorded != now:
        return f"its process {pid} on {host} has exited (the pid now belongs to another process)"
    return None


@dataclass(frozen=True)
class DeadRun:
    run_id: str
    job_name: str
    reason: str


def fail_dead_runs(instance: dg.DagsterInstance) -> list[DeadRun]:
    """Mark FAILURE every STARTING/STARTED run of this host whose process is gone; the runs marked."""
    dead: list[DeadRun] = []
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=_IN_PROGRESS)):
        reason = process_gone(dict(run.tags))
        if reason is None:
            continue
        instance.report_run_failed(
            run, message=f"run {run.run_id} died: {reason} without reporting an end; marked failed by poll-assets"
        )
        dead.append(DeadRun(run.run_id, run.job_name, reason))
    return dead


def fail_runs_of_this_process(instance: dg.DagsterInstance, why: str) -> list[str]:
    """Mark FAILURE each STARTING/STARTED run this process executes (after an interrupt that Dagster
    did not get to record); the ids of the runs marked."""
    marked = []
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=_IN_PROGRESS, tags={PID_TAG: str(os.getpid())})):
        if run.tags.get(HOST_TAG) == socket.gethostname():
            instance.report_run_failed(run, message=f"run {run.run_id}: {why}; marked failed by poll-assets")
            marked.append(run.run_id)
    return marked


RUN_PROCESS_KEY = "run_process"


class RunProcessResource(dg.ConfigurableResource):
    """Tags the run with its worker's host and pid when a step that holds it starts (every step that
    reads prompts or calls a provider does), so a run launched from the UI is marked before its first
    paid call, and `fail_dead_runs` can tell a run whose process died from one still working."""

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        if context.instance is not None and context.run is not None:
            tag_run_with_process(context.instance, context.run)
