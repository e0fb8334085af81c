"""Jobs, schedules and sensors: when things run."""

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import dagster as dg

from .models import ctr_model
from .partitions import TIMEZONE
from .predictions import ctr_predictions
from .publishing import ctr_cache
from .query_logs import query_log_cleanup_job, query_logs_job
from .selection import ad_demand, top_ads, traffic_profile

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


def build_schedules(timezone: str = TIMEZONE) -> list:
    """Hourly query-log drain, the off-peak daily precompute, and the 03:00 stream cleanup."""

    @dg.schedule(
        name="daily_precompute",
        cron_schedule="0 * * * *",
        execution_timezone=timezone,
        target=daily_precompute_job,
        description="At the start of the off-peak window (02:00 until traffic_profile learns better).",
    )
    def daily_precompute(context: dg.ScheduleEvaluationContext):
        instance = context.instance if context.instance_ref is not None else None
        return precompute_request(context.scheduled_execution_time, offpeak_start_hour(instance), timezone)

    return [
        dg.build_schedule_from_partitioned_job(query_logs_job, name="query_logs_hourly", minute_of_hour=5),
        daily_precompute,
        dg.ScheduleDefinition(
            name="query_log_cleanup_daily",
            target=query_log_cleanup_job,
            cron_schedule="0 3 * * *",
            execution_timezone=timezone,
        ),
    ]
