"""The Definitions load and contain exactly what we expect, on the partitions and timezone of the environment."""

import os
import subprocess
import sys
import warnings
from datetime import datetime
from zoneinfo import ZoneInfo

import dagster as dg
import pytest

from precompute_assets.definitions import build_definitions, defs
from precompute_assets.defs.automation import build_schedules, precompute_request
from precompute_assets.defs.partitions import DEFAULT_PARTITIONS, Partitions
from precompute_assets.defs.resources import RedisResource
from precompute_assets.defs.settings import SettingError, Settings

SETTINGS = ("PRECOMPUTE_TIMEZONE", "PRECOMPUTE_PARTITIONS_START")
# The drains ask Redis for their stream's oldest entry; a server that does not answer skips that, with a warning.
NO_REDIS = {"redis": RedisResource(url="redis://127.0.0.1:1/0", socket_timeout_s=1, retries=0)}


@pytest.fixture(autouse=True)
def environment(monkeypatch, tmp_path):
    """The variables ``precompute up`` exports, and none of the deployment settings (their defaults apply)."""
    monkeypatch.setenv("PRECOMPUTE_LAKE_URI", str(tmp_path / "lake"))
    monkeypatch.setenv("PRECOMPUTE_MODEL_STORE", str(tmp_path / "models"))
    for name in SETTINGS:
        monkeypatch.delenv(name, raising=False)


def repo():
    return defs().get_repository_def()


def test_asset_keys_checks_jobs_schedules_sensors():
    r = repo()
    assert {k.to_user_string() for k in r.asset_graph.get_all_asset_keys()} == {
        "ads", "ad_impressions", "query_logs", "query_log_quarantine", "traffic_profile", "ad_demand", "top_ads",
        "ctr_model", "ctr_predictions", "ctr_cache", "embedding_model", "document_embeddings", "campaign_ctr",
        "campaign_budget", "demand_model", "selection_experiment", "user_events", "user_event_quarantine",
        "next_action_model",
    }  # fmt: skip
    checks = {(c.asset_key.to_user_string(), c.name) for c in r.asset_graph.asset_check_keys}
    assert checks == {
        ("query_logs", "quarantine_rate"), ("ad_demand", "has_traffic"), ("top_ads", "known_ads"),
        ("ctr_model", "beats_baseline"), ("ctr_model", "new_ads_beat_baseline"), ("ctr_predictions", "valid_ctr"),
        ("document_embeddings", "embedding_error_rate"), ("document_embeddings", "int8_recall"),
        ("document_embeddings", "staleness"), ("demand_model", "beats_baselines"),
        ("selection_experiment", "sample_ratio"), ("user_events", "quarantine_rate"),
        ("next_action_model", "beats_baselines"), ("ctr_cache", "served_by_redis"),
        ("document_embeddings", "served_by_redis"),
    }  # fmt: skip
    assert {j.name for j in r.get_all_jobs()} - {"__ASSET_JOB"} == {
        "query_logs_job", "daily_precompute_job", "refresh_precompute_job", "ctr_restore_job", "query_log_cleanup_job",
        "document_embeddings_job",
        "campaign_warming_job", "campaign_cleanup_job", "user_events_job", "next_action_model_job",
        "precompute_tasks_job",
    }  # fmt: skip
    assert {s.name for s in r.schedule_defs} == {
        "query_logs_hourly", "daily_precompute", "query_log_cleanup_daily", "document_embeddings_daily",
        "campaign_warming_backstop", "campaign_cleanup_backstop", "user_events_hourly", "next_action_model_daily",
    }  # fmt: skip
    assert {s.name for s in r.sensor_defs} == {
        "documents_changed", "campaign_launch_sensor", "cache_health", "user_event_sensor", "live_refresh_sensor",
    }  # fmt: skip


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


def test_a_drain_whose_worker_died_is_failed_within_the_hour_not_six():
    """With the default launcher a run whose worker died ends only at its max runtime, and the drain schedule counts
    it as busy until then: dagster.yaml's 6 h held an hour (and the day's precompute) back (h_qlog2)."""
    for job in ("query_logs_job", "user_events_job"):
        assert int(repo().get_job(job).tags["dagster/max_runtime"]) <= 3600, job


def test_cleanup_runs_at_three_local_time_even_on_dst_days():
    tz = ZoneInfo("America/New_York")
    cleanup = {s.name: s for s in build_schedules(Partitions("America/New_York"))}["query_log_cleanup_daily"]
    # 2026-03-08: spring forward (02:00 does not exist); 2026-11-01: fall back (01:00 happens twice).
    for month, day in ((3, 7), (3, 8), (3, 9), (11, 1)):
        fired = ticks(cleanup, datetime(2026, month, day, tzinfo=tz), datetime(2026, month, day, 23, 59, tzinfo=tz))
        assert [(t.astimezone(tz).hour, t.astimezone(tz).minute) for t in fired] == [(3, 0)], (month, day)


def test_hourly_schedule_requests_the_previous_hour():
    schedule = repo().get_schedule_def("query_logs_hourly")
    context = dg.build_schedule_context(
        scheduled_execution_time=datetime(2026, 11, 20, 11, 5, tzinfo=ZoneInfo("UTC")), resources=NO_REDIS
    )
    requests = list(schedule.evaluate_tick(context).run_requests)
    assert [r.partition_key for r in requests] == ["2026-11-20-10:00"]


@pytest.mark.parametrize(
    ("timezone", "day", "expected"),
    [
        ("America/New_York", (11, 1), ["2026-10-31-23:00", "2026-11-01-00:00", "2026-11-01-01:00",
                                       "2026-11-01-01:00-0500", "2026-11-01-02:00", "2026-11-01-03:00"]),
        ("Europe/Berlin", (10, 25), ["2026-10-24-23:00", "2026-10-25-00:00", "2026-10-25-01:00", "2026-10-25-02:00",
                                     "2026-10-25-02:00+0100", "2026-10-25-03:00"]),
        ("America/New_York", (3, 8), ["2026-03-07-23:00", "2026-03-08-00:00", "2026-03-08-01:00", "2026-03-08-03:00"]),
    ],
)  # fmt: skip
def test_each_hourly_drain_requests_the_hour_that_just_ended_on_dst_days(timezone, day, expected):
    """On a fall-back day the drains requested the repeated hour before it had ended (one instant compared with
    another of the same zone by wall clock), and never the hour that had; the first 5 hours, a tick each."""
    tz = ZoneInfo(timezone)
    r = build_definitions(Settings(timezone)).get_repository_def()
    for name in ("query_logs_hourly", "user_events_hourly"):
        schedule = r.get_schedule_def(name)
        requested = []
        for tick in ticks(schedule, datetime(2026, *day, tzinfo=tz), datetime(2026, *day, 5, tzinfo=tz)):
            context = dg.build_schedule_context(scheduled_execution_time=tick, repository_def=r, resources=NO_REDIS)
            requested += [q.partition_key for q in schedule.evaluate_tick(context).run_requests]
        assert requested == expected, name


def _precompute(moment: datetime, timezone: str = "America/New_York", instance=None):
    schedule = {s.name: s for s in build_schedules(Partitions(timezone))}["daily_precompute"]
    context = dg.build_schedule_context(
        instance=instance,
        scheduled_execution_time=moment,
        repository_def=build_definitions(Settings(timezone)).get_repository_def(),
    )
    return schedule.evaluate_tick(context)


def test_daily_precompute_fires_at_two_for_yesterday_and_skips_otherwise():
    tz = ZoneInfo("America/New_York")
    fired = _precompute(datetime(2026, 11, 20, 2, tzinfo=tz))
    assert [(r.partition_key, r.run_key) for r in fired.run_requests] == [("2026-11-19", "precompute-2026-11-19")]
    assert not _precompute(datetime(2026, 11, 20, 14, tzinfo=tz)).run_requests


def test_a_late_precompute_is_of_the_day_before_the_newest_window():
    tz = ZoneInfo("UTC")
    for hour, day in ((1, "2026-11-18"), (6, "2026-11-19"), (23, "2026-11-19")):  # the window is 02:00-06:00
        moment = datetime(2026, 11, 20, hour, tzinfo=tz)
        assert isinstance(precompute_request(moment, 2, "UTC"), dg.SkipReason)
        late = precompute_request(moment, 2, "UTC", late=True)
        assert (late.partition_key, late.run_key) == (day, f"precompute-{day}")
        assert late.tags["precompute/late"].startswith(f"{day} had no run in the off-peak window")
    in_window = precompute_request(datetime(2026, 11, 20, 3, tzinfo=tz), 2, "UTC", late=True)
    assert in_window.partition_key == "2026-11-19" and "precompute/late" not in in_window.tags


def test_a_window_across_midnight_runs_the_day_that_just_ended():
    """A learned window of 22:00-02:00 ran the day before yesterday after midnight (the day before the window's
    start): every publish came a day late. After midnight it is the day that has just ended."""
    tz = ZoneInfo("UTC")
    requested = {hour: precompute_request(datetime(2026, 3, 11, hour, tzinfo=tz), 22, "UTC", late=True)
                 for hour in (0, 1, 2, 12, 22)}  # fmt: skip
    assert {hour: r.partition_key for hour, r in requested.items()} == {
        0: "2026-03-10",
        1: "2026-03-10",
        2: "2026-03-10",
        12: "2026-03-10",
        22: "2026-03-10",
    }
    assert [hour for hour, r in requested.items() if "precompute/late" in r.tags] == [2, 12]
    before_midnight = precompute_request(datetime(2026, 3, 10, 23, tzinfo=tz), 22, "UTC")
    assert before_midnight.partition_key == "2026-03-09"  # the newest whole day then (its run came after midnight)


def test_a_day_a_backfill_ran_gets_no_late_run():
    """A backfill or a launch from the UI has no run key: the late catch-up looked for its run key only, so every
    tick after the window launched the whole graph of that day again."""
    tz = ZoneInfo("UTC")
    with dg.instance_for_test() as instance:
        _logs_done(instance, "2026-11-19")
        tags = {"dagster/partition": "2026-11-19", "dagster/backfill": "abc"}
        instance.add_run(dg.DagsterRun(job_name="daily_precompute_job", run_id="b" * 36, tags=tags))
        skipped = _precompute(datetime(2026, 11, 20, 10, tzinfo=tz), "UTC", instance)
        assert not skipped.run_requests and "2026-11-19 already has a run (run bbbbbbbb" in skipped.skip_message


def test_daily_precompute_skips_the_day_before_the_first_partition():
    """On a deployment's first night, yesterday is no partition: the tick says so instead of waiting for its logs."""
    schedule = {s.name: s for s in build_schedules(Partitions("UTC", "2026-11-20"))}["daily_precompute"]
    moment = datetime(2026, 11, 20, 2, tzinfo=ZoneInfo("UTC"))
    with (
        dg.instance_for_test() as instance,
        dg.build_schedule_context(instance, scheduled_execution_time=moment) as context,
    ):
        first_night = schedule.evaluate_tick(context)
    assert not first_night.run_requests
    assert first_night.skip_message == "2026-11-19 is before the first partition (2026-11-20)"


def test_daily_precompute_on_dst_days():
    tz = ZoneInfo("America/New_York")
    schedule = {s.name: s for s in build_schedules(Partitions("America/New_York"))}["daily_precompute"]
    for month, day in ((3, 8), (11, 1)):  # spring forward: no 02:00; fall back: 01:00 twice
        requested = set()
        for tick in ticks(schedule, datetime(2026, month, day, tzinfo=tz), datetime(2026, month, day, 23, tzinfo=tz)):
            for request in _precompute(tick).run_requests:
                requested.add((request.partition_key, request.run_key))
        previous = f"2026-{month:02d}-{day - 1:02d}" if day > 1 else "2026-10-31"
        assert requested == {(previous, f"precompute-{previous}")}, (month, day)


def _logs_done(instance, day: str, hours: int = 24) -> None:
    for hour in DEFAULT_PARTITIONS.hours_of(day)[:hours]:
        instance.report_runless_asset_event(dg.AssetMaterialization("query_logs", partition=hour))


@pytest.mark.parametrize(("hours", "waits_at", "fires_at", "late"), [(23, 2, 3, False), (20, 9, 10, True)])
def test_daily_precompute_waits_for_every_hour_of_the_day(hours, waits_at, fires_at, late):
    """In its window, and late after it (a daemon that was down, logs that came late)."""
    tz = ZoneInfo("UTC")
    with dg.instance_for_test() as instance:
        _logs_done(instance, "2026-11-19", hours=hours)
        waiting = _precompute(datetime(2026, 11, 20, waits_at, tzinfo=tz), "UTC", instance)
        assert not waiting.run_requests
        assert f"waiting for {24 - hours} query_logs hours of 2026-11-19" in waiting.skip_message
        _logs_done(instance, "2026-11-19")
        (fired,) = _precompute(datetime(2026, 11, 20, fires_at, tzinfo=tz), "UTC", instance).run_requests
        assert fired.partition_key == "2026-11-19" and ("precompute/late" in fired.tags) == late


def test_daily_precompute_follows_the_learned_offpeak_window():
    tz = ZoneInfo("UTC")
    with dg.instance_for_test() as instance:
        _logs_done(instance, "2026-11-19")
        instance.report_runless_asset_event(
            dg.AssetMaterialization("traffic_profile", partition="2026-11-19", metadata={"offpeak_start_hour": 4})
        )
        assert not _precompute(datetime(2026, 11, 20, 2, tzinfo=tz), "UTC", instance).run_requests
        fired = _precompute(datetime(2026, 11, 20, 4, tzinfo=tz), "UTC", instance)
        assert [r.partition_key for r in fired.run_requests] == ["2026-11-19"]


def test_a_backfilled_old_day_does_not_move_tonights_offpeak_window():
    """The window came from the latest traffic_profile materialization: backfilling an old day (its profile said
    01:00) moved tonight's precompute off the newest day's learned 04:00."""
    tz = ZoneInfo("UTC")
    with dg.instance_for_test() as instance:
        _logs_done(instance, "2026-11-19")
        for day, hour in (("2026-11-19", 4), ("2026-06-01", 1)):  # the newest day, then a backfill
            instance.report_runless_asset_event(
                dg.AssetMaterialization("traffic_profile", partition=day, metadata={"offpeak_start_hour": hour})
            )
        assert not _precompute(datetime(2026, 11, 20, 2, tzinfo=tz), "UTC", instance).run_requests
        fired = _precompute(datetime(2026, 11, 20, 4, tzinfo=tz), "UTC", instance)
        assert [r.partition_key for r in fired.run_requests] == ["2026-11-19"]


PARTITIONED = {"ad_impressions", "query_logs", "query_log_quarantine", "traffic_profile", "ad_demand", "top_ads",
               "ctr_model", "ctr_predictions", "ctr_cache", "demand_model", "selection_experiment",
               "user_events", "user_event_quarantine", "next_action_model"}  # fmt: skip


def test_defaults_are_utc_from_2026():
    r = repo()
    for key in PARTITIONED:
        definition = r.asset_graph.get(dg.AssetKey(key)).partitions_def
        assert (definition.timezone, definition.start.date().isoformat()) == ("UTC", "2026-01-01"), key
    assert {s.execution_timezone for s in r.schedule_defs} == {"UTC"}


def test_the_environment_moves_every_partition_and_schedule(monkeypatch):
    monkeypatch.setenv("PRECOMPUTE_TIMEZONE", "America/New_York")
    monkeypatch.setenv("PRECOMPUTE_PARTITIONS_START", "2025-06-01")
    loaded = defs()
    r = loaded.get_repository_def()
    for key in PARTITIONED:
        node = r.asset_graph.get(dg.AssetKey(key))
        assert node.partitions_def in (Partitions("America/New_York", "2025-06-01").hourly,
                                       Partitions("America/New_York", "2025-06-01").daily), key  # fmt: skip
        # ... and the UI shows both values with the asset
        assert node.metadata["partitions_timezone"] == "America/New_York", key
        assert node.metadata["partitions_start"] == "2025-06-01", key
    assert {s.execution_timezone for s in r.schedule_defs} == {"America/New_York"}
    assert r.get_job("query_logs_job").partitions_def.timezone == "America/New_York"
    deployment = loaded.resources["deployment"]
    assert (deployment.timezone, deployment.partitions_start) == ("America/New_York", "2025-06-01")
    # the hourly drain follows the deployment's hours
    hourly = r.get_schedule_def("query_logs_hourly")
    tz = ZoneInfo("America/New_York")
    context = dg.build_schedule_context(
        scheduled_execution_time=datetime(2026, 11, 20, 11, 5, tzinfo=tz), resources=NO_REDIS
    )
    assert [q.partition_key for q in hourly.evaluate_tick(context).run_requests] == ["2026-11-20-10:00"]


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("PRECOMPUTE_TIMEZONE", "Europe/Atlantis", "PRECOMPUTE_TIMEZONE='Europe/Atlantis' is not a known timezone"),
        ("PRECOMPUTE_PARTITIONS_START", "2026-02-30", "PRECOMPUTE_PARTITIONS_START='2026-02-30' is not a date"),
    ],
)
def test_a_bad_setting_fails_loading_with_its_name(monkeypatch, variable, value, message):
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingError, match=message):
        defs()


def test_loading_the_definitions_warns_nothing():
    """The webserver's code server and the daemon load the Definitions: a warning there is printed in their logs.
    Dagster's copies of our sensors warned about its beta ``owners`` parameter on every load."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        defs().get_repository_def()
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []


def test_importing_reads_no_setting():
    """A bad setting breaks loading the Definitions, not importing the modules (tests import assets directly)."""
    code = (
        "import precompute_assets.defs.automation, precompute_assets.defs.selection\n"
        "from precompute_assets.definitions import defs\n"
        "from precompute_assets.defs.settings import SettingError\n"
        "try:\n    defs()\nexcept SettingError as error:\n    print('refused:', error)"
    )
    env = {**os.environ, "PRECOMPUTE_TIMEZONE": "Nowhere/Special"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "refused: PRECOMPUTE_TIMEZONE='Nowhere/Special'" in out.stdout


def test_every_schedule_and_sensor_runs_by_default():
    r = repo()
    statuses = {d.name: d.default_status for d in [*r.schedule_defs, *r.sensor_defs]}
    assert len(statuses) == 13
    assert {name: status.value for name, status in statuses.items()} == dict.fromkeys(statuses, "RUNNING")


def test_every_job_schedule_sensor_and_check_says_what_it_does():
    """The UI shows these descriptions on the Automation, Jobs and Checks pages; none may be blank."""
    r = repo()
    described = {
        **{f"job {j.name}": j.description for j in r.get_all_jobs() if j.name != "__ASSET_JOB"},
        **{f"schedule {s.name}": s.description for s in r.schedule_defs},
        **{f"sensor {s.name}": s.description for s in r.sensor_defs},
        **{
            f"check {k.to_user_string()}": r.asset_graph.get_check_spec(k).description
            for k in r.asset_graph.asset_check_keys
        },
    }
    assert [name for name, description in described.items() if not (description or "").strip()] == []


def test_every_asset_has_a_plain_text_description_a_group_and_kinds():
    """The catalog lists each asset with the start of its description as plain text, in its group, with its kinds'
    icons. Descriptions taken from docstrings showed their reST markup there (``training_days``) literally."""
    graph = repo().asset_graph
    nodes = {key.to_user_string(): graph.get(key) for key in graph.get_all_asset_keys()}
    assert [name for name, node in nodes.items() if not (node.description or "").strip()] == []
    assert [name for name, node in nodes.items() if "``" in node.description] == []
    assert [name for name, node in nodes.items() if node.group_name == "default" or not node.kinds] == []


def test_every_resource_describes_itself_in_plain_text():
    """Dagster takes a resource's description (the launchpad's sidebar, the resource pages) from its class docstring
    and shows it as plain text: the docstrings' reST (``PRECOMPUTE_REDIS_URL``, ``cluster=True``) showed literally."""
    resources = repo().get_top_level_resources()
    descriptions = {name: resource.description or "" for name, resource in resources.items()}
    assert [name for name, text in descriptions.items() if not text.strip()] == []
    markup = ("``", ":class:", ":func:", ":meth:", ":mod:")
    assert [name for name, text in descriptions.items() if any(mark in text for mark in markup)] == []


def test_every_config_field_has_a_description():
    """The launchpad shows each op's and asset's config fields with their description beside the default."""
    r = repo()
    nodes = {node.name: node for job in r.get_all_jobs() for node in job.graph.node_defs}
    missing = [
        f"{name}.{field_name}"
        for name, node in sorted(nodes.items())
        if node.config_field is not None
        for field_name, field in getattr(node.config_field.config_type, "fields", {}).items()
        if not (field.description or "").strip()
    ]
    assert missing == []


def test_every_resource_config_field_has_a_description():
    """The Resources page and the launchpad's resources section show each field's description beside its value."""
    resources = repo().get_top_level_resources()
    missing = [
        f"{name}.{field_name}"
        for name, resource in sorted(resources.items())
        for field_name, field in getattr(resource.config_field.config_type, "fields", {}).items()
        if not (field.description or "").strip()
    ]
    assert missing == []


def test_the_daily_embedding_sync_waits_for_an_embedder():
    """A deployment that never materialized embedding_model gets no failing 04:00 sync, like documents_changed."""
    schedule = repo().get_schedule_def("document_embeddings_daily")
    at_four = datetime(2026, 11, 20, 4, tzinfo=ZoneInfo("UTC"))
    with (
        dg.instance_for_test() as instance,
        dg.build_schedule_context(instance=instance, scheduled_execution_time=at_four) as context,
    ):
        skipped = schedule.evaluate_tick(context)
        assert not skipped.run_requests and "materialize embedding_model" in skipped.skip_message
        instance.report_runless_asset_event(dg.AssetMaterialization("embedding_model"))
        assert len(schedule.evaluate_tick(context).run_requests) == 1
