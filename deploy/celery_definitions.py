"""The code location for runs whose steps execute on Celery workers (dagster-celery).

The same definitions as `poll_assets.definitions`, with one step per generator and judge (so a
shard's members spread over the workers) and the Celery executor. Every process reads the same
environment: POLL_PANEL, DAGSTER_HOME (an instance on PostgreSQL, deploy/dagster.yaml),
POLL_STORAGE_DIR (s3://...), the members' keys, and the broker and result backend below.

    dagster dev -f deploy/celery_definitions.py              # webserver and daemon
    PYTHONPATH=deploy celery -A dagster_celery.app worker -Q dagster --pool solo -n w1@%h   # each worker

Workers import this file to rebuild the job, so it must be at the same path on every machine;
`deploy/dagster_celery_config.py` (on the workers' PYTHONPATH) is their Celery configuration.
"""

import dagster as dg
from dagster_celery import celery_executor

from poll_assets.panel import load_panel
from poll_assets.pipeline import JOB_NAME, build_definitions

BROKER_ENV = "POLL_CELERY_BROKER_URL"  # e.g. redis://host:6379/0
BACKEND_ENV = "POLL_CELERY_BACKEND_URL"  # e.g. redis://host:6379/1

executor = celery_executor.configured({"broker": {"env": BROKER_ENV}, "backend": {"env": BACKEND_ENV}})

defs = dg.Definitions.merge(
    build_definitions(*load_panel(), member_steps=True),
    dg.Definitions(executor=executor),
)


def celery_job() -> dg.JobDefinition:
    """The shard job on the Celery executor, for `dg.reconstructable` (scripts and tests)."""
    return defs.resolve_job_def(JOB_NAME)
