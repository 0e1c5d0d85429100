"""The Dagster UI in a real headless Chromium: the asset graph, a launch from the UI, and the
metadata of the result, and the places the getting-started tour (docs/getting-started.md) sends a new user to. Screenshots are kept as
test artifacts in `$POLL_TEST_ARTIFACTS/ui` (or pytest's tmp dir); the path is printed."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from poll_assets.cli import run_job
from poll_assets.panel import load_panel
from poll_assets.pipeline import build_definitions
from poll_assets_tests.dagster_dev import (
    FAST_PANEL,
    DagsterDevServer,
    artifacts_dir,
    require,
    wait_for_run,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--no-proxy-server",  # the server is on loopback; never ask a proxy from the environment
]
SIDEBAR = ("Overview", "Runs", "Catalog", "Jobs", "Automation", "Lineage", "Deployment")
UI_PARTITION = "shard-00000"  # the GraphQL test launches another shard, so the two never collide


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require(False, "the `playwright` Python package is not installed (pip install playwright)")
    require(CHROMIUM.is_file(), f"{CHROMIUM} not found (apt-get install -y chromium)")
    with sync_playwright() as p:
        # Debian's Chromium, not a Playwright browser build: nothing is downloaded.
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Path:
    """Where this module's screenshots go, printed past pytest's output capture so it is seen."""
    path = artifacts_dir(tmp_path_factory, "ui")
    with pytestconfig.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
        print(f"\nUI screenshots: {path}")
    return path


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    context.set_default_timeout(60_000)
    pg = context.new_page()
    yield pg
    context.close()


def _shot(page, shots: Path, name: str) -> Path:
    path = shots / f"{name}.png"
    page.screenshot(path=str(path))
    return path


def _expand_all_groups(page) -> None:
    """The lineage view starts with each group collapsed; its settings menu expands them."""
    page.locator("button:has([aria-label=zoom_in])").wait_for()  # the graph has rendered
    page.locator("button:has([aria-label=settings])").last.click()
    page.get_by_role("menuitem", name="Expand all groups").click()


@pytest.mark.slow
def test_asset_graph_has_a_node_per_generator_and_judge(dagster_server: DagsterDevServer, page, shots: Path) -> None:
    panel, path = load_panel(FAST_PANEL)
    n_assets = len(build_definitions(panel, path).resolve_all_asset_keys())
    page.goto(f"{dagster_server.url}/asset-groups", wait_until="domcontentloaded")
    # The README names the sidebar's entries: Catalog and Lineage (there is no "Assets" entry).
    nav = page.locator("a")
    for entry in SIDEBAR:
        nav.filter(has_text=re.compile(f"^{entry}$")).first.wait_for(state="visible")
    assert nav.filter(has_text=re.compile("^Assets$")).count() == 0
    _expand_all_groups(page)
    # Asset nodes are HTML inside the graph's SVG; group titles there carry the same names as
    # some assets (`prompts`), so match the asset-name element of the pinned UI's node component.
    names = page.locator("svg foreignObject [class*='AssetNode_assetName']")
    for name in [*(m.name for m in panel.generators), *(m.name for m in panel.judges)]:
        node = names.filter(has_text=re.compile(f"^{re.escape(name)}$"))
        node.wait_for(state="visible")
        assert node.count() == 1, f"expected one graph node labelled {name!r}, found {node.count()}"
    # Zoomed out, long names are shortened in the middle (`combi…_generations`), so the other
    # assets are counted rather than read: one node per asset of the code location.
    assert names.count() == n_assets, names.all_inner_texts()
    page.keyboard.press("Escape")  # close the settings menu before the picture
    _shot(page, shots, "01_asset_graph")


@pytest.mark.slow
def test_materialize_one_partition_from_the_ui(dagster_server: DagsterDevServer, page, shots: Path) -> None:
    page.goto(f"{dagster_server.url}/asset-groups", wait_until="domcontentloaded")
    page.locator("button:has([aria-label=zoom_in])").wait_for()
    page.get_by_role("button", name="Materialize all").click()

    # The launch dialog: a custom selection of exactly one shard makes it a single run.
    dialog = page.get_by_role("dialog")
    dialog.get_by_text("Select a partition or create one").click()
    page.get_by_role("menuitem", name=UI_PARTITION).click()  # name repeats the key (label + measure)
    page.keyboard.press("Escape")  # close the partition menu, not the dialog
    launch = dialog.get_by_role("button", name="Launch 1 run")
    launch.wait_for(state="visible")
    _shot(page, shots, "02_launch_dialog")
    launch.click()

    # The toast links to the new run.
    view = page.locator("a[href*='/runs/']").filter(has_text="View").first
    href = view.get_attribute("href", timeout=30_000)
    match = re.search(r"/runs/([0-9a-f-]{36})", href or "")
    assert match, f"no run link in the launch toast (href={href!r})"
    run_id = match.group(1)

    # Watch the run page until the run succeeds; the server's view is the arbiter of the end state.
    page.goto(f"{dagster_server.url}/runs/{run_id}", wait_until="domcontentloaded")
    status = wait_for_run(dagster_server, run_id)
    assert status == "SUCCESS", f"run {run_id} ended {status}; server log:\n{dagster_server.log_tail()}"
    run = dagster_server.graphql(
        "query($id: ID!){ runOrError(runId: $id){ ... on Run { jobName tags { key value } } } }", {"id": run_id}
    )["runOrError"]
    assert {"key": "dagster/partition", "value": UI_PARTITION} in run["tags"]
    # The UI launches the implicit asset job; `poll-assets run` uses the same one (cli.run_job).
    assert run["jobName"] == run_job(build_definitions(*load_panel(FAST_PANEL))).name == "__ASSET_JOB"
    page.reload(wait_until="domcontentloaded")
    page.get_by_text("Success", exact=True).first.wait_for(state="visible")
    page.get_by_text(f"partition: {UI_PARTITION}").wait_for(state="visible")
    page.get_by_text("Errored (0)").wait_for(state="visible")  # no step failed
    page.get_by_text("RUN_SUCCESS").first.wait_for(state="visible")  # the event log has loaded
    _shot(page, shots, "03_run_succeeded")

    # The preference_pairs asset page, on the partition the UI launched.
    page.goto(f"{dagster_server.url}/assets/preference_pairs", wait_until="domcontentloaded")
    page.get_by_role("tab", name="Partitions").click()
    page.get_by_text(UI_PARTITION, exact=True).first.click()
    metadata = _metadata_table(page)
    _shot(page, shots, "04_preference_pairs_metadata")

    assert metadata.get("path", "").endswith(f"preference_pairs/{UI_PARTITION}.parquet"), metadata
    parquet = Path(metadata["path"])
    assert parquet.is_file() and parquet.is_relative_to(dagster_server.home), parquet
    rows = len(pd.read_parquet(parquet))
    assert int(metadata["pairs"]) == rows
    assert int(metadata["dagster/row_count"]) == rows
    assert int(metadata["prompts"]) == 1  # shard_size 1 in the fast panel
    # The shard's LLM totals: 1 prompt x (2 generators + 2 judges) calls, every member accounted for.
    assert int(metadata["shard/calls"]) == 4 and int(metadata["shard/failures"]) == 0, metadata
    preview = _markdown_table(page, "preview", "chosen > rejected")  # narrow: who won, judges, margin
    assert len(preview) == rows  # one line per pair (none when the shard's answers tied)
    _shot(page, shots, "04b_preference_pairs_preview")
    page.keyboard.press("Escape")
    full = _markdown_table(page, "pairs_table", "chosen generator")  # every column, behind Show Markdown
    assert len(full) == rows
    page.keyboard.press("Escape")
    _column_descriptions(page, dagster_server, "preference_pairs", {"margin": "chosen_rating - rejected_rating, > 0"})
    _shot(page, shots, "04c_preference_pairs_columns")

    # A judge's page: a few verdicts with their rationales, and its column descriptions.
    judge = load_panel(FAST_PANEL)[0].judges[0].name
    page.goto(f"{dagster_server.url}/assets/ratings/{judge}", wait_until="domcontentloaded")
    page.get_by_role("tab", name="Partitions").click()
    page.get_by_text(UI_PARTITION, exact=True).first.click()
    _metadata_table(page, needs=("preview", "rubric"))
    verdicts = _markdown_table(page, "preview", "rationale")
    assert len(verdicts) == 2  # 1 prompt x 2 generators
    _shot(page, shots, "04d_judge_verdicts_preview")
    page.keyboard.press("Escape")
    _column_descriptions(page, dagster_server, f"ratings/{judge}", {"judge": "the panel member that judged"})
    _shot(page, shots, "04e_judge_columns")

    # Numeric metadata plots: Overview -> Metadata -> Plots, per partition by default, over time
    # behind the Events toggle; each judge pair's kappa is a plot of its own.
    page.goto(f"{dagster_server.url}/assets/pooled_ratings", wait_until="domcontentloaded")
    plots = page.locator("button").filter(has_text=re.compile("^Plots$"))
    plots.scroll_into_view_if_needed()
    plots.click()
    for toggle in ("Partitions", "Events"):
        page.locator("button").filter(has_text=re.compile(f"^{toggle}$")).first.wait_for(state="visible")
    page.get_by_text(re.compile(r"^agreement/kappa/\w+~\w+$")).first.wait_for(state="visible")
    page.locator("button").filter(has_text=re.compile("^Events$")).first.click()
    page.get_by_text("agreement/krippendorff_alpha", exact=True).first.wait_for(state="visible")
    _shot(page, shots, "05_pooled_ratings_plots_events")


@pytest.mark.slow
def test_publish_job_launchpad(dagster_server: DagsterDevServer, page, shots: Path) -> None:
    """The docs' way to publish (docs/operations.md): Jobs -> publish_job -> Launchpad -> Launch Run."""
    page.goto(f"{dagster_server.url}/jobs", wait_until="domcontentloaded")
    page.locator("a").filter(has_text=re.compile("^publish_job$")).first.click()
    page.get_by_role("tab", name="Launchpad").click()
    page.locator("button").filter(has_text=re.compile("^Launch Run$")).wait_for(state="visible")
    _shot(page, shots, "06_publish_job_launchpad")


def _metadata_table(page, timeout_s: float = 60.0, needs: tuple[str, ...] = ("pairs", "path")) -> dict[str, str]:
    """Key -> value text of the metadata table shown for the selected partition, once it has `needs`."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows = page.locator("tr").filter(has=page.locator("td"))
        found: dict[str, str] = {}
        for i in range(rows.count()):
            cells = rows.nth(i).locator("td")
            if cells.count() >= 2:
                found[cells.nth(0).inner_text().strip()] = cells.nth(1).inner_text().strip()
        if all(k in found for k in needs):
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"no {needs} metadata on the page; saw {found}")
        time.sleep(1.0)


def _markdown_table(page, key: str, header: str) -> list[str]:
    """The body rows (text) of the markdown table in metadata entry `key`. The UI shows a long
    markdown entry behind a `[Show Markdown]` link that opens a dialog, a short one in place."""
    row = page.locator("tr").filter(has=page.locator("td", has_text=re.compile(f"^{re.escape(key)}$"))).first
    show = row.get_by_text("[Show Markdown]")
    scope = row
    if show.count():
        show.click()
        scope = page.get_by_role("dialog")
    table = scope.locator("table").filter(has=page.locator("th", has_text=re.compile(f"^{re.escape(header)}$")))
    table.first.wait_for(state="visible")
    return table.first.locator("tbody tr").all_inner_texts()


def _column_descriptions(page, server: DagsterDevServer, asset: str, described: dict[str, str]) -> None:
    """The asset's Overview lists its columns with their descriptions (from `dagster/column_schema`)."""
    page.goto(f"{server.url}/assets/{asset}", wait_until="domcontentloaded")
    page.get_by_text("Columns", exact=True).first.wait_for(state="visible")
    for column, description in described.items():
        page.get_by_text(column, exact=True).first.wait_for(state="visible")
        page.get_by_text(description, exact=True).first.scroll_into_view_if_needed()
        page.get_by_text(description, exact=True).first.wait_for(state="visible")


CLI_PARTITION = "shard-00001"  # the UI test launches shard-00000 and the GraphQL test shard-00002
_TIMELINE_RUNS = """
query($after: Float!) { runsOrError(filter: {updatedAfter: $after}) { ... on Runs { results {
  id pipelineName repositoryOrigin { repositoryName repositoryLocationName } } } } }
"""


@pytest.mark.slow
def test_a_cli_run_is_listed_under_its_job_and_on_the_overview_timeline(
        dagster_server: DagsterDevServer, page, shots: Path) -> None:
    """`poll-assets run` on the server's instance: the UI's timeline keeps only runs that name their
    code location (repositoryOrigin); the CLI's run names the one the server loaded from workspace.yaml."""
    import subprocess
    import sys

    from poll_assets_tests.dagster_dev import server_env

    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "poll_assets.cli", "run", "--partition", CLI_PARTITION],
                          env=server_env(dagster_server.home), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    runs = dagster_server.graphql(_TIMELINE_RUNS, {"after": started - 1})["runsOrError"]["results"]
    assert len(runs) == 1, runs  # the CLI's one run, as the timeline's query returns it
    locations = dagster_server.graphql("{ workspaceOrError { ... on Workspace { locationEntries { name } } } }")
    served = [entry["name"] for entry in locations["workspaceOrError"]["locationEntries"]]
    assert runs[0]["repositoryOrigin"] == {"repositoryName": "__repository__", "repositoryLocationName": served[0]}
    assert runs[0]["pipelineName"] == "__ASSET_JOB"

    # The timeline names runs of the implicit asset job "Jobless asset materializations", by location.
    page.goto(f"{dagster_server.url}/overview/activity/timeline", wait_until="domcontentloaded")
    page.get_by_text("Jobless asset materializations").first.wait_for(state="visible")
    _shot(page, shots, "07_timeline_with_cli_run")
    page.goto(f"{dagster_server.url}/runs/{runs[0]['id']}", wait_until="domcontentloaded")
    page.get_by_text("RUN_SUCCESS").first.wait_for(state="visible")
    _shot(page, shots, "08_cli_run")
