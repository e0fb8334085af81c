"""Dagster run tags and states that the schedules and sensors look for."""

import dagster as dg

RUN_KEY_TAG = "dagster/run_key"  # the tag Dagster gives a run launched with a run key
PARTITION_TAG = "dagster/partition"  # ... and a run of one partition, its key
SENSOR_NAME_TAG = "dagster/sensor_name"  # ... and a run a sensor launched, its sensor's name

# A run in these states will still do its work: a schedule or sensor does not request the same work again.
ACTIVE_RUN_STATUSES = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]
