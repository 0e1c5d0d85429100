"""Run one shard of deploy/celery_definitions.py's job on the Celery executor, for test_celery.py:

    python -m poll_assets_tests.celery_run PARTITION

in the instance DAGSTER_HOME names (needs deploy/ on PYTHONPATH). Prints `<run id> success|failure`
and exits 0 on success. SIGTERM interrupts the run: the executor revokes the steps in flight."""

from __future__ import annotations

import sys

import dagster as dg
from celery_definitions import celery_job  # deploy/ is on PYTHONPATH (workers import it too)


def main(partition: str) -> int:
    with dg.DagsterInstance.get() as instance:
        result = dg.execute_job(dg.reconstructable(celery_job), instance, tags={"dagster/partition": partition})
        print(result.run_id, "success" if result.success else "failure", flush=True)
        return 0 if result.success else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
