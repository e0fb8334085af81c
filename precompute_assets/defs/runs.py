"""Dagster run tags and states that the schedules and sensors look for."""

import dagster as dg

RUN_KEY_TAG = "dagster/run_key"  # the tag Dagster gives a run launched with a run key
PARTITION_TAG = "dagster/partition"  # ... and a run of one partition, its key
RANGE_START_TAG = "dagster/asset_partition_range_start"  # ... and a run of a range of partitions, its first
RANGE_END_TAG = "dagster/asset_partition_range_end"  # ... and its last
SENSOR_NAME_TAG = "dagster/sensor_name"  # ... and a run a sensor launched, its sensor's name
SERVER_MARK_TAG = "precompute/server_mark"  # a ctr restore's: Redis's ``server_mark`` once it had restored

# A run in these states will still do its work: a schedule or sensor does not request the same work again.
ACTIVE_RUN_STATUSES = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]

# A run in these states counts against dagster.yaml's max_concurrent_runs: one whose worker was killed (a `dagster asset
# materialize` SIGKILLed) stays so until run monitoring's max runtime, and queued runs wait behind it.
IN_PROGRESS = [dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]

# dagster.yaml's run_retries re-execute a run that asks with this tag when its worker died (or it never started), not
# when a step failed: warming, cleanup and task runs, whose sensors never request their run keys again.
RERUN_IF_WORKER_DIES = {"dagster/max_retries": "2"}

DAEMON_FRESH_S = 60  # a daemon beats every 30 s or so: one whose last beat is older has stopped


def daemon_heartbeat_age_s(instance: dg.DagsterInstance) -> float | None:
    """Seconds since the newest heartbeat of a Dagster daemon on ``instance``, or None when none ever beat."""
    import time

    beats = instance.get_daemon_heartbeats().values()
    return None if not beats else time.time() - max(beat.timestamp for beat in beats)
