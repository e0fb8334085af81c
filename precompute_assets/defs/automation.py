"""Jobs, schedules and sensors: when things run."""

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import dagster as dg

from .embeddings import build_embedding_schedule
from .models import ctr_model
from .partitions import TIMEZONE
from .predictions import ctr_predictions
from .publishing import ctr_cache
from .query_logs import query_log_cleanup_job, query_logs_job
from .selection import ad_demand, hours_of, top_ads, traffic_profile

DEFAULT_OFFPEAK_START_HOUR = 2
OFFPEAK_WINDOW_HOURS = 4

daily_precompute_job = dg.define_asset_job(
    "daily_precompute_job",
    selection=dg.AssetSelection.assets(traffic_profile, ad_demand, top_ads, ctr_model, ctr_predictions, ctr_cache),
    description="Selection, model, predictions and publish for one day (run off-peak for the day just ended).",
)


def offpeak_start_hour(instance: dg.DagsterInstance | None) -> int:
    """The start of the off-peak window learned by the newest ``traffic_profile``, or 02:00."""
    if instance is None:
        return DEFAULT_OFFPEAK_START_HOUR
    event = instance.get_latest_materialization_event(dg.AssetKey("traffic_profile"))
    metadata = event.asset_materialization.metadata if event and event.asset_materialization else {}
    value = metadata.get("offpeak_start_hour")
    return int(value.value) if value is not None else DEFAULT_OFFPEAK_START_HOUR


def precompute_request(moment: datetime, start_hour: int, timezone: str) -> dg.RunRequest | dg.SkipReason:
    """Request yesterday's precompute when ``moment`` falls in the off-peak window starting at ``start_hour``.

    A window rather than one instant: on a spring-forward day the start hour may not exist; the run key
    (one per day) keeps later ticks of the window from launching it twice.
    """
    local = moment.astimezone(ZoneInfo(timezone))
    if (local.hour - start_hour) % 24 >= OFFPEAK_WINDOW_HOURS:
        return dg.SkipReason(f"outside the off-peak window starting at {start_hour:02d}:00 {timezone}")
    day = (local - timedelta(hours=(local.hour - start_hour) % 24)).date() - timedelta(days=1)
    partition = day.isoformat()
    return dg.RunRequest(run_key=f"precompute-{partition}", partition_key=partition)


def missing_log_hours(instance: dg.DagsterInstance, day: str) -> list[str]:
    """Hourly query_logs partitions of ``day`` not materialized yet."""
    done = instance.get_materialized_partitions(dg.AssetKey("query_logs"))
    return [hour for hour in hours_of(day) if hour not in done]


def build_schedules(timezone: str = TIMEZONE) -> list:
    """Hourly query-log drain, the off-peak daily precompute, the 04:00 embedding sync, the 03:00 cleanup."""

    @dg.schedule(
        name="daily_precompute",
        cron_schedule="0 * * * *",
        execution_timezone=timezone,
        target=daily_precompute_job,
        description="At the start of the off-peak window (02:00 until traffic_profile learns better).",
    )
    def daily_precompute(context: dg.ScheduleEvaluationContext):
        instance = context.instance if context.instance_ref is not None else None
        request = precompute_request(context.scheduled_execution_time, offpeak_start_hour(instance), timezone)
        if instance is not None and isinstance(request, dg.RunRequest):
            missing = missing_log_hours(instance, request.partition_key)
            if missing:
                # Later ticks of the window try again; the run key keeps it to one run a day.
                return dg.SkipReason(f"waiting for {len(missing)} query_logs hours of {request.partition_key}")
        return request

    return [
        dg.build_schedule_from_partitioned_job(query_logs_job, name="query_logs_hourly", minute_of_hour=5),
        daily_precompute,
        build_embedding_schedule(timezone),
        dg.ScheduleDefinition(
            name="query_log_cleanup_daily",
            target=query_log_cleanup_job,
            cron_schedule="0 3 * * *",
            execution_timezone=timezone,
        ),
    ]
