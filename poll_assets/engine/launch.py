"""Runs that `poll-assets run` executes in its own process, recorded under the code location the UI
serves, so the UI lists them as it lists its own launches.

`JobDefinition.execute_in_process` records a run with no code-location origin: the UI then shows no
target for it and leaves it out of the Overview timeline, which groups runs by the (location,
repository, job) they came from. The origin here is the one `poll-assets ui` loads (workspace.yaml's
location, else the `poll_assets.definitions` module), built from the same workspace target Dagster's
webserver reads, without starting it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
from dagster._core.definitions.repository_definition.valid_definitions import SINGLETON_REPOSITORY_NAME
from dagster._core.remote_origin import RemoteJobOrigin, RemoteRepositoryOrigin
from dagster._core.workspace.load_target import ModuleTarget, WorkspaceFileTarget

# The workspace `poll-assets ui` serves, beside the package in a source checkout.
WORKSPACE = Path(__file__).resolve().parents[2] / "workspace.yaml"
DEFINITIONS_MODULE = "poll_assets.definitions"


def workspace_job_origin(job_name: str, workspace: Path = WORKSPACE) -> RemoteJobOrigin:
    """Where the UI finds `job_name`: the workspace's location holding poll_assets.definitions (the
    module itself when there is no workspace file), its one repository (a Definitions object's)."""
    if workspace.is_file():
        origins = WorkspaceFileTarget(paths=[str(workspace)]).create_origins()
        ours = [o for o in origins if getattr(getattr(o, "loadable_target_origin", None), "module_name", None)
                == DEFINITIONS_MODULE]
        location = (ours or list(origins))[0]
    else:
        location = ModuleTarget(DEFINITIONS_MODULE, None, None, None).create_origins()[0]
    return RemoteRepositoryOrigin(location, SINGLETON_REPOSITORY_NAME).get_job_origin(job_name)


@contextmanager
def runs_from_location(instance: dg.DagsterInstance, origin: RemoteJobOrigin) -> Iterator[None]:
    """Within the block, every run `instance` creates for `origin`'s job without an origin of its
    own records `origin` (execute_in_process takes none). Only this instance object is touched."""
    create = instance.create_run_for_job

    def create_with_origin(*args: Any, **kwargs: Any) -> dg.DagsterRun:
        job_def = kwargs.get("job_def", args[0] if args else None)
        if kwargs.get("remote_job_origin") is None and getattr(job_def, "name", None) == origin.job_name:
            kwargs["remote_job_origin"] = origin
        return create(*args, **kwargs)

    instance.create_run_for_job = create_with_origin  # type: ignore[method-assign]
    try:
        yield
    finally:
        del instance.create_run_for_job  # the class's method again
