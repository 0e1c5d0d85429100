"""A real `dagster dev` server for tests that drive the UI or the GraphQL API.

The server runs the project's code location with the fast test panel, on 127.0.0.1 at a free
port, in a throwaway DAGSTER_HOME, in its own process group so the whole tree (webserver,
daemon, code server, run workers) is killed at the end.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from poll_assets_tests.instance import make_dagster_home

REPO_ROOT = Path(__file__).resolve().parent.parent
FAST_PANEL = Path(__file__).resolve().parent / "panels" / "local_fast.yaml"
ARTIFACTS_ENV = "POLL_TEST_ARTIFACTS"  # where UI tests keep their screenshots; default: pytest's tmp dir
DAGSTER_EXE = Path(sys.executable).with_name("dagster")
START_TIMEOUT_S = 180.0
RUN_TIMEOUT_S = 600.0

# Loopback only: never route a request to the test server through a proxy from the environment.
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))

_LOCATION_QUERY = """
{ workspaceOrError { __typename ... on Workspace { locationEntries {
    name loadStatus locationOrLoadError { __typename ... on PythonError { message } } } } } }
"""


def require(condition: bool, what: str) -> None:
    """A missing system dependency skips the test locally, but fails it in CI (CI=true), where
    .ci/run installs everything: a skip there would hide a broken install step."""
    if condition:
        return
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{what} (CI=true: .ci/run should have provided it)", pytrace=False)
    pytest.skip(what)


def artifacts_dir(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """A folder for a test's artifacts: `$POLL_TEST_ARTIFACTS/<name>` when set (CI collects it),
    else `<pytest's base tmp dir>/artifacts/<name>`, which pytest keeps for the last three sessions."""
    root = os.environ.get(ARTIFACTS_ENV)
    base = Path(root) if root else tmp_path_factory.getbasetemp() / "artifacts"
    path = (base / name).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class DagsterDevServer:
    host: str
    port: int
    home: Path
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def graphql(self, query: str, variables: dict | None = None, timeout: float = 30.0) -> dict:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        req = urllib.request.Request(f"{self.url}/graphql", data=body, headers={"Content-Type": "application/json"})
        with _NO_PROXY.open(req, timeout=timeout) as resp:
            payload = json.loads(resp.read())
        if payload.get("errors"):
            raise AssertionError(f"GraphQL errors from {self.url}: {payload['errors']}")
        return payload["data"]

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"


def _location_state(server: DagsterDevServer) -> tuple[bool, str]:
    """(ready, why not): the webserver answers and the poll_assets code location has loaded."""
    try:
        data = server.graphql(_LOCATION_QUERY, timeout=5)
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
        return False, f"webserver not answering: {exc}"
    entries = data["workspaceOrError"].get("locationEntries") or []
    for entry in entries:
        if entry["name"] != "poll_assets":
            continue
        loaded = entry["locationOrLoadError"]
        if loaded and loaded["__typename"] == "PythonError":
            raise AssertionError(f"code location poll_assets failed to load: {loaded.get('message')}")
        if entry["loadStatus"] == "LOADED" and loaded and loaded["__typename"] == "RepositoryLocation":
            return True, ""
        return False, f"code location poll_assets is {entry['loadStatus']}"
    return False, f"no code location named poll_assets yet (have {[e['name'] for e in entries]})"


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group, then SIGKILL whatever is left of it."""
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        return
    # `dagster dev` may hang on SIGTERM while its children hold threads, hence the short grace.
    for sig, wait_s in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)  # any member of the group left?
            except ProcessLookupError:
                proc.wait(timeout=5)
                return
            proc.poll()
            time.sleep(0.2)
    proc.wait(timeout=5)


def write_test_home(home: Path) -> None:
    """A throwaway instance: no telemetry, two runs at once, and no first-visit dialog."""
    make_dagster_home(home, "concurrency:\n  runs:\n    max_concurrent_runs: 2\n")
    # The UI greets a fresh instance on 127.0.0.1 with a newsletter dialog that would cover the
    # page; this is the file Dagster writes when someone presses "Skip" (dagster/_core/nux.py).
    (home / ".nux").mkdir(exist_ok=True)
    (home / ".nux" / "nux.yaml").write_text("seen: 1\n")


def server_env(home: Path, panel: Path = FAST_PANEL, **extra: str) -> dict[str, str]:
    """The environment of a server under test: its home, the panel, and this checkout first on the
    import path (the code server imports poll_assets from here, whatever is installed)."""
    return {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "POLL_PANEL": str(panel),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        **extra,
    }


def serve(argv: list[str], env: dict[str, str], home: Path, port: int, cwd: Path = REPO_ROOT,
          host: str = "127.0.0.1") -> Iterator[DagsterDevServer]:
    """Start `argv` (a command that runs `dagster dev` on host:port), yield the server once the
    poll_assets code location has loaded, and kill its whole process tree afterwards."""
    log_path = home / "dagster_dev.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(
        argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True,  # own process group: killed as a whole at the end
    )
    server = DagsterDevServer(host=host, port=port, home=home, log_path=log_path)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        why = "not polled yet"
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"`{' '.join(argv)}` exited with {proc.returncode}; log:\n{server.log_tail()}")
            ready, why = _location_state(server)
            if ready:
                break
            time.sleep(1.0)
        else:
            raise AssertionError(f"`dagster dev` at {server.url} not ready after {START_TIMEOUT_S:.0f}s ({why}); "
                                 f"log:\n{server.log_tail()}")
        yield server
    finally:
        _kill_group(proc)
        log.close()


def start_dagster_dev(home: Path, panel: Path = FAST_PANEL) -> Iterator[DagsterDevServer]:
    """Generator for a fixture: yields a ready server, and kills its process tree afterwards."""
    write_test_home(home)
    host, port = "127.0.0.1", free_port()
    argv = [str(DAGSTER_EXE), "dev", "-w", str(REPO_ROOT / "workspace.yaml"), "-h", host, "-p", str(port)]
    yield from serve(argv, server_env(home, panel), home, port, host=host)


_RUN_QUERY = """
query ($runId: ID!) { runOrError(runId: $runId) { __typename
  ... on Run { runId status tags { key value } } ... on PythonError { message } } }
"""


def wait_for_run(server: DagsterDevServer, run_id: str, timeout_s: float = RUN_TIMEOUT_S) -> str:
    """Poll until the run reaches a terminal state; returns it (SUCCESS, FAILURE, CANCELED)."""
    deadline = time.monotonic() + timeout_s
    status = "?"
    while time.monotonic() < deadline:
        run = server.graphql(_RUN_QUERY, {"runId": run_id})["runOrError"]
        if run["__typename"] != "Run":
            raise AssertionError(f"run {run_id}: {run}")
        status = run["status"]
        if status in ("SUCCESS", "FAILURE", "CANCELED"):
            return status
        time.sleep(2.0)
    raise AssertionError(f"run {run_id} still {status} after {timeout_s:.0f}s; server log:\n{server.log_tail()}")


@pytest.fixture(scope="session")
def dagster_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DagsterDevServer]:
    """One `dagster dev` for the UI and GraphQL tests. Each test launches its own partition and
    waits for its own run, so they pass in any order and alone."""
    yield from start_dagster_dev(tmp_path_factory.mktemp("dagster_dev_home"))
