"""The Definitions load and contain exactly what we expect."""

from datetime import datetime
from zoneinfo import ZoneInfo

import dagster as dg

from precompute_assets.definitions import defs
from precompute_assets.defs.automation import build_schedules


def repo():
    return defs.get_repository_def()


def test_asset_keys_checks_jobs_schedules_sensors():
    r = repo()
    assert {k.to_user_string() for k in r.asset_graph.get_all_asset_keys()} == {"query_logs", "query_log_quarantine"}
    checks = {(c.asset_key.to_user_string(), c.name) for c in r.asset_graph.asset_check_keys}
    assert checks == {("query_logs", "quarantine_rate")}
    assert {j.name for j in r.get_all_jobs()} - {"__ASSET_JOB"} == {"query_logs_job", "query_log_cleanup_job"}
    assert {s.name for s in r.schedule_defs} == {"query_logs_hourly", "query_log_cleanup_daily"}
    assert {s.name for s in r.sensor_defs} == set()


def ticks(schedule: dg.ScheduleDefinition, start: datetime, end: datetime) -> list[datetime]:
    """The instants the daemon would fire ``schedule`` in [start, end) (the daemon's own iterator)."""
    from dagster._utils.schedules import schedule_execution_time_iterator

    out = []
    for tick in schedule_execution_time_iterator(
        start.timestamp(), schedule.cron_schedule, schedule.execution_timezone
    ):
        if tick >= end:
            return out
        out.append(tick)
    return out


def test_cleanup_runs_at_three_local_time_even_on_dst_days():
    tz = ZoneInfo("America/New_York")
    cleanup = {s.name: s for s in build_schedules("America/New_York")}["query_log_cleanup_daily"]
    # 2026-03-08: spring forward (02:00 does not exist); 2026-11-01: fall back (01:00 happens twice).
    for month, day in ((3, 7), (3, 8), (3, 9), (11, 1)):
        fired = ticks(cleanup, datetime(2026, month, day, tzinfo=tz), datetime(2026, month, day, 23, 59, tzinfo=tz))
        assert [(t.astimezone(tz).hour, t.astimezone(tz).minute) for t in fired] == [(3, 0)], (month, day)


def test_hourly_schedule_requests_the_previous_hour():
    schedule = defs.get_schedule_def("query_logs_hourly")
    context = dg.build_schedule_context(scheduled_execution_time=datetime(2026, 11, 20, 11, 5, tzinfo=ZoneInfo("UTC")))
    requests = list(schedule.evaluate_tick(context).run_requests)
    assert [r.partition_key for r in requests] == ["2026-11-20-10:00"]
