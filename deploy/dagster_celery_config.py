"""Celery settings for the workers of deploy/celery_definitions.py: dagster-celery's worker app
imports this module when it is on the PYTHONPATH."""

import os

broker_url = os.environ["POLL_CELERY_BROKER_URL"]
result_backend = os.environ["POLL_CELERY_BACKEND_URL"]

# A worker takes the next step only when it has finished the one it runs, so the steps of a shard
# spread over idle workers instead of queueing behind a busy one. (With early acks a worker would
# reserve a second step while running the first.) A step whose worker dies unacknowledged goes
# back to the queue after the broker's visibility timeout; the response cache makes that re-run
# request only the calls that were not answered.
task_acks_late = True
worker_prefetch_multiplier = 1
broker_transport_options = {"visibility_timeout": 3600}
