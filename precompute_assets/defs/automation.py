"""Schedules and sensors: when things run."""

from __future__ import annotations

import dagster as dg

from .partitions import TIMEZONE
from .query_logs import query_log_cleanup_job, query_logs_job


def build_schedules(timezone: str = TIMEZONE) -> list[dg.ScheduleDefinition]:
    """Hourly query-log drain (5 past, once the hour's events have landed) and the 03:00 stream cleanup."""
    return [
        dg.build_schedule_from_partitioned_job(
            query_logs_job,
            name="query_logs_hourly",
            minute_of_hour=5,
        ),
        dg.ScheduleDefinition(
            name="query_log_cleanup_daily",
            target=query_log_cleanup_job,
            cron_schedule="0 3 * * *",
            execution_timezone=timezone,
        ),
    ]
