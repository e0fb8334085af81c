"""What runs on its own: every schedule and sensor by default, and the state the daemon acts on."""

from __future__ import annotations

import contextlib
import logging
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import dagster as dg
import pytest
import yaml
from dagster._core.remote_origin import InProcessCodeLocationOrigin
from dagster._core.test_utils import create_test_daemon_workspace_context, freeze_time, in_process_test_workspace
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from dagster._core.workspace.load_target import InProcessWorkspaceLoadTarget
from dagster._scheduler.scheduler import launch_scheduled_runs

from precompute_assets.definitions import defs
from precompute_assets.defs.automation import automation_states, build_cache_health_sensor, health_request
from precompute_assets.defs.partitions import DEFAULT_PARTITIONS, Partitions
from precompute_assets.storage.postgres import scratch_database
from precompute_assets_tests.factories import log_client

EVERYTHING = [
    ("cache_health", "sensor"),
    ("campaign_cleanup_backstop", "schedule"),
    ("campaign_launch_sensor", "sensor"),
    ("campaign_warming_backstop", "schedule"),
    ("daily_precompute", "schedule"),
    ("document_embeddings_daily", "schedule"),
    ("documents_changed", "sensor"),
    ("live_refresh_sensor", "sensor"),
    ("next_action_model_daily", "schedule"),
    ("query_log_cleanup_daily", "schedule"),
    ("query_logs_hourly", "schedule"),
    ("user_event_sensor", "sensor"),
    ("user_events_hourly", "schedule"),
]


@pytest.fixture(autouse=True)
def environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PRECOMPUTE_LAKE_URI", str(tmp_path / "lake"))
    monkeypatch.setenv("PRECOMPUTE_MODEL_STORE", str(tmp_path / "models"))
    monkeypatch.delenv("PRECOMPUTE_TIMEZONE", raising=False)
    monkeypatch.delenv("PRECOMPUTE_PARTITIONS_START", raising=False)


def test_a_fresh_instance_runs_everything():
    with dg.instance_for_test() as instance:
        assert automation_states(instance, defs()) == [(name, kind, "RUNNING") for name, kind in EVERYTHING]


def test_a_toggle_in_the_ui_is_what_is_reported():
    """Stopped and started the way the UI toggle and ``dagster schedule stop`` do it, through the instance."""
    with dg.instance_for_test() as instance:
        origin = LoadableTargetOrigin(module_name="precompute_assets.definitions", attribute="defs")
        with in_process_test_workspace(instance, origin) as workspace:
            (location_name,) = workspace.code_location_names
            repository = workspace.get_code_location(location_name).get_repository("__repository__")
            hourly, sensor = repository.get_schedule("query_logs_hourly"), repository.get_sensor("documents_changed")
            instance.stop_schedule(hourly.get_remote_origin_id(), hourly.selector_id, hourly)
            instance.stop_sensor(sensor.get_remote_origin_id(), sensor.selector_id, sensor)
            states = {(name, kind): state for name, kind, state in automation_states(instance, defs())}
            assert states == {
                **dict.fromkeys(EVERYTHING, "RUNNING"),
                ("query_logs_hourly", "schedule"): "STOPPED",
                ("documents_changed", "sensor"): "STOPPED",
            }
            # states stored for another code location do not apply to this one
            elsewhere = automation_states(instance, defs(), location_name="somewhere-else")
            assert {state for _, _, state in elsewhere} == {"RUNNING"}

            instance.start_schedule(hourly)
            assert ("query_logs_hourly", "schedule", "RUNNING") in automation_states(instance, defs())


ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def scheduler_daemon(dagster_pg_url: str, monkeypatch, schedule_name: str, start: datetime):
    """The real definitions in Dagster's scheduler loop, one iteration per call of the yielded ``iterate(at)``, on a
    PostgreSQL instance with this repo's dagster.yaml (its run coordinator only queues runs); only
    ``schedule_name`` runs, started at ``start``."""
    for variable in ("PRECOMPUTE_REDIS_URL", "PRECOMPUTE_APP_DB_URL"):  # resolved when a run is created, never used
        monkeypatch.setenv(variable, "redis://127.0.0.1:9/0")
    config = yaml.safe_load((ROOT / "dagster.yaml").read_text())
    overrides = {key: config[key] for key in ("run_coordinator", "scheduler") if key in config}
    origin = LoadableTargetOrigin(module_name="precompute_assets.definitions", attribute="defs")
    target = InProcessWorkspaceLoadTarget(InProcessCodeLocationOrigin(origin))
    with (
        scratch_database(dagster_pg_url, "dagster") as url,
        dg.instance_for_test(overrides={"storage": {"postgres": {"postgres_url": url}}, **overrides}) as instance,
        freeze_time(start),
        create_test_daemon_workspace_context(target, instance) as workspace,
    ):
        (location,) = workspace.create_request_context().get_code_location_entries().values()
        (repository,) = location.code_location.get_repositories().values()
        for schedule in repository.get_schedules():
            if schedule.name == schedule_name:
                instance.start_schedule(schedule)
            else:
                instance.stop_schedule(schedule.get_remote_origin_id(), schedule.selector_id, schedule)

        def iterate(at: datetime) -> None:
            """One iteration of the daemon's loop at ``at``, with the catch-up limit the daemon reads."""
            with freeze_time(at):
                list(launch_scheduled_runs(workspace, logging.getLogger("scheduler"), at, {},
                                           max_catchup_runs=instance.scheduler.max_catchup_runs))  # fmt: skip

        yield instance, iterate


def test_the_scheduler_daemon_launches_one_nightly_precompute_per_day(dagster_pg_url, monkeypatch):
    """daily_precompute ticks every hour of its 4-hour window; Dagster dedupes a schedule's run keys only within one
    tick, so the real scheduler loop launched yesterday's whole graph once per hour of the window."""
    utc = ZoneInfo("UTC")
    start = datetime(2026, 11, 20, 0, 30, tzinfo=utc)
    with scheduler_daemon(dagster_pg_url, monkeypatch, "daily_precompute", start) as (instance, iterate):
        for hour in DEFAULT_PARTITIONS.hours_of("2026-11-19"):
            instance.report_runless_asset_event(dg.AssetMaterialization("query_logs", partition=hour))
        for hour in range(1, 8):  # 01:00 to 07:00: the window is 02:00-06:00
            iterate(datetime(2026, 11, 20, hour, 0, 30, tzinfo=utc))
        runs = instance.get_runs(dg.RunsFilter(job_name="daily_precompute_job"))
        assert [(r.tags["dagster/partition"], r.tags["dagster/run_key"]) for r in runs] == [
            ("2026-11-19", "precompute-2026-11-19")
        ]


def test_a_day_the_asset_graph_is_materializing_gets_no_second_nightly_run(dagster_pg_url, monkeypatch):
    """The UI's Materialize all, `dagster asset materialize` and asset backfills run as __ASSET_JOB: the schedule
    looked at daily_precompute_job's runs only, and launched the day's graph a second time (h_auto). A run of part of
    the graph, or a refresh (no demand_model), is no day's run (h_diff9)."""
    from dagster._core.test_utils import create_run_for_test

    from precompute_assets.defs.automation import DAY_GRAPH

    utc = ZoneInfo("UTC")
    start = datetime(2026, 11, 20, 1, 0, 30, tzinfo=utc)
    with scheduler_daemon(dagster_pg_url, monkeypatch, "daily_precompute", start) as (instance, iterate):
        for hour in DEFAULT_PARTITIONS.hours_of("2026-11-19"):
            instance.report_runless_asset_event(dg.AssetMaterialization("query_logs", partition=hour))
        day = {"dagster/partition": "2026-11-19"}
        part = {dg.AssetKey(name) for name in ("ctr_model", "ctr_predictions", "ctr_cache")}
        create_run_for_test(instance, job_name="__ASSET_JOB", status=dg.DagsterRunStatus.CANCELED, tags=day,
                            asset_selection=part)  # fmt: skip
        refresh = DAY_GRAPH - {dg.AssetKey("demand_model")}
        create_run_for_test(instance, job_name="refresh_precompute_job", status=dg.DagsterRunStatus.SUCCESS,
                            tags=day, asset_selection=refresh)  # fmt: skip
        whole = create_run_for_test(instance, job_name="__ASSET_JOB", status=dg.DagsterRunStatus.STARTED, tags=day,
                                    asset_selection=set(DAY_GRAPH))  # fmt: skip
        for hour in range(1, 4):
            iterate(datetime(2026, 11, 20, hour, 0, 30, tzinfo=utc))
        assert instance.get_runs(dg.RunsFilter(job_name="daily_precompute_job")) == []
        instance.delete_run(whole.run_id)  # only part of the graph, and a refresh, ran the day: the night's run comes
        iterate(datetime(2026, 11, 20, 4, 0, 30, tzinfo=utc))
        assert len(instance.get_runs(dg.RunsFilter(job_name="daily_precompute_job"))) == 1


def test_a_nightly_precompute_waits_while_a_refresh_of_its_day_runs(dagster_pg_url, monkeypatch):
    """cache_health's refresh of yesterday, launched before the window, trains and publishes the day: the nightly run
    launched beside it trained and published it a second time at once (h_diff9). It waits for the refresh to end."""
    from dagster._core.test_utils import create_run_for_test

    utc = ZoneInfo("UTC")
    start = datetime(2026, 11, 20, 1, 0, 30, tzinfo=utc)
    with scheduler_daemon(dagster_pg_url, monkeypatch, "daily_precompute", start) as (instance, iterate):
        for hour in DEFAULT_PARTITIONS.hours_of("2026-11-19"):
            instance.report_runless_asset_event(dg.AssetMaterialization("query_logs", partition=hour))
        refresh = create_run_for_test(
            instance,
            job_name="refresh_precompute_job",
            status=dg.DagsterRunStatus.STARTED,
            tags={"dagster/partition": "2026-11-19", "dagster/sensor_name": "cache_health"},
        )
        for hour in range(1, 4):
            iterate(datetime(2026, 11, 20, hour, 0, 30, tzinfo=utc))
        assert instance.get_runs(dg.RunsFilter(job_name="daily_precompute_job")) == []
        instance.report_run_failed(refresh)  # it ended: the next tick of the window runs the night's graph
        iterate(datetime(2026, 11, 20, 4, 0, 30, tzinfo=utc))
        assert len(instance.get_runs(dg.RunsFilter(job_name="daily_precompute_job"))) == 1


def test_a_nightly_precompute_the_daemon_missed_runs_late_once(dagster_pg_url, monkeypatch):
    """Dagster runs only the newest missed tick of daily_precompute, and every tick outside the off-peak window
    skipped: a daemon down through the window lost that night's precompute, and the cache served predictions a day
    older until cache_health saw the hit rate fall."""
    utc = ZoneInfo("UTC")
    start = datetime(2026, 11, 20, 1, 0, 30, tzinfo=utc)
    with scheduler_daemon(dagster_pg_url, monkeypatch, "daily_precompute", start) as (instance, iterate):
        for hour in DEFAULT_PARTITIONS.hours_of("2026-11-19"):
            instance.report_runless_asset_event(dg.AssetMaterialization("query_logs", partition=hour))
        iterate(start)  # its last iteration before the window (02:00-06:00)
        iterate(datetime(2026, 11, 20, 10, 0, 30, tzinfo=utc))  # back at 10:00
        iterate(datetime(2026, 11, 20, 11, 0, 30, tzinfo=utc))
        runs = instance.get_runs(dg.RunsFilter(job_name="daily_precompute_job"))
        assert [(r.tags["dagster/partition"], r.tags["dagster/run_key"]) for r in runs] == [
            ("2026-11-19", "precompute-2026-11-19")
        ]
        assert "no run in the off-peak window starting at 02:00 UTC" in runs[0].tags["precompute/late"]


def test_after_a_daemon_outage_every_missed_hour_is_drained(dagster_pg_url, monkeypatch):
    """Dagster runs only the newest missed tick of these schedules ("has no partition set, so not trying to catch
    up"): after an outage the older hours of query_logs were never drained, and that day's precompute, which waits
    for all 24 hours, never ran."""
    utc = ZoneInfo("UTC")
    down = datetime(2026, 11, 20, 1, 30, tzinfo=utc)  # the daemon dies after draining 00:00 at 01:05
    with scheduler_daemon(dagster_pg_url, monkeypatch, "query_logs_hourly", down) as (instance, iterate):
        for hour in [*DEFAULT_PARTITIONS.hours_of("2026-11-19"), "2026-11-20-00:00"]:
            instance.report_runless_asset_event(dg.AssetMaterialization("query_logs", partition=hour))
        iterate(down)  # its last iteration
        iterate(datetime(2026, 11, 20, 10, 6, tzinfo=utc))  # back: the ticks of 02:05 ... 10:05 were missed
        runs = instance.get_runs(dg.RunsFilter(job_name="query_logs_job"))
        assert sorted(run.tags["dagster/partition"] for run in runs) == [
            f"2026-11-20-{hour:02d}:00" for hour in range(1, 10)
        ]
        iterate(datetime(2026, 11, 20, 11, 6, tzinfo=utc))  # their runs are queued: only the hour that just ended
        assert len(instance.get_runs(dg.RunsFilter(job_name="query_logs_job"))) == 10


def test_an_hour_whose_drain_failed_is_drained_again_after_a_later_one_succeeded(dagster_pg_url, monkeypatch):
    """Only the hours after the newest drained one were requested: an hour whose run failed (the lake's disk full, a
    PostgreSQL restart) while the next hour's run succeeded was never requested again, and its day's precompute,
    which waits for all 24 hours, never ran."""
    utc = ZoneInfo("UTC")
    start = datetime(2026, 11, 20, 3, 30, tzinfo=utc)
    with scheduler_daemon(dagster_pg_url, monkeypatch, "query_logs_hourly", start) as (instance, iterate):
        drained = [*DEFAULT_PARTITIONS.hours_of("2026-11-19"), "2026-11-20-00:00", "2026-11-20-02:00"]
        for hour in drained:  # 01:00's drain failed at 02:05 and again at 03:05, when 02:00's succeeded
            instance.report_runless_asset_event(dg.AssetMaterialization("query_logs", partition=hour))
        iterate(start)
        iterate(datetime(2026, 11, 20, 4, 6, tzinfo=utc))
        runs = instance.get_runs(dg.RunsFilter(job_name="query_logs_job"))
        assert sorted(run.tags["dagster/partition"] for run in runs) == ["2026-11-20-01:00", "2026-11-20-03:00"]


def window(requests: int, hits: int) -> dict:
    return {"requests": requests, "hits": hits, "hit_rate": hits / requests if requests else None,
            "most_missed": [["ad9", 30], ["ad7", 4]], "sampled": False}  # fmt: skip


NOON = datetime(2026, 11, 20, 12, 0, tzinfo=ZoneInfo("UTC"))


def test_cache_health_requests_a_refresh_below_the_threshold_and_says_why():
    request = health_request(window(1000, 700), NOON, "UTC", None)
    assert isinstance(request, dg.RunRequest) and request.partition_key == "2026-11-19"
    assert "hit rate 70.0% over the last hour's 1000 requests is below 80%" in request.tags["precompute/reason"]
    assert request.tags["precompute/most_missed"] == "ad9, ad7"
    healthy = health_request(window(1000, 850), NOON, "UTC", None)
    assert isinstance(healthy, dg.SkipReason) and "85.0%" in healthy.skip_message
    quiet = health_request(window(50, 0), NOON, "UTC", None)
    assert isinstance(quiet, dg.SkipReason) and "fewer than 200" in quiet.skip_message
    assert isinstance(health_request(None, NOON, "UTC", None), dg.SkipReason)
    recently = health_request(window(1000, 700), NOON, "UTC", NOON.timestamp() - 3600)
    assert isinstance(recently, dg.SkipReason) and "less than 6 h ago" in recently.skip_message
    later = health_request(window(1000, 700), NOON, "UTC", NOON.timestamp() - 7 * 3600)
    assert isinstance(later, dg.RunRequest)


def test_cache_health_retries_an_hour_after_a_refresh_that_failed():
    """A failed refresh left the cache as cold as it was: the 6-hour cooldown kept it so until the next one."""
    two_hours_ago = NOON.timestamp() - 2 * 3600
    assert isinstance(health_request(window(1000, 700), NOON, "UTC", two_hours_ago), dg.SkipReason)
    assert isinstance(health_request(window(1000, 700), NOON, "UTC", two_hours_ago, last_failed=True), dg.RunRequest)
    soon = health_request(window(1000, 700), NOON, "UTC", NOON.timestamp() - 600, last_failed=True)
    assert (
        isinstance(soon, dg.SkipReason) and "the refresh requested (it failed) less than 1 h ago" in soon.skip_message
    )


def test_cache_health_refreshes_no_day_before_the_first_partition_or_with_a_run_of_the_day_in_progress():
    """On a deployment's first day, yesterday is no partition: the tick failed on its request all day. A refresh of
    the day whose nightly run is in progress trained and published the day twice at once (h_auto). And one just after
    midnight selected from the 23 hours drained so far (h_auto's suspicion)."""
    from dagster._core.test_utils import create_run_for_test

    from precompute_assets.defs.automation import refresh_or_skip

    request = health_request(window(1000, 700), NOON, "UTC", None)
    with dg.instance_for_test() as instance:
        first = refresh_or_skip(instance, request, Partitions("UTC", "2026-11-20"))
        assert isinstance(first, dg.SkipReason) and "2026-11-19 is before the first partition" in first.skip_message
        deployed = Partitions("UTC", "2026-11-01")
        hours = deployed.hours_of("2026-11-19")
        for hour in hours[:-1]:
            instance.report_runless_asset_event(dg.AssetMaterialization("query_logs", partition=hour))
        early = refresh_or_skip(instance, request, deployed)
        assert isinstance(early, dg.SkipReason) and "1 query_logs hours of 2026-11-19 are not drained" in str(early)
        instance.report_runless_asset_event(dg.AssetMaterialization("query_logs", partition=hours[-1]))
        assert refresh_or_skip(instance, request, deployed) is request
        nightly = create_run_for_test(instance, job_name="daily_precompute_job", status=dg.DagsterRunStatus.STARTED,
                                      tags={"dagster/partition": "2026-11-19"})  # fmt: skip
        busy = refresh_or_skip(instance, request, None)
        assert isinstance(busy, dg.SkipReason) and f"run {nightly.run_id[:8]} of 2026-11-19 is STARTED" in str(busy)
        instance.report_run_failed(nightly)
        assert refresh_or_skip(instance, request, None) is request


def test_cache_health_sees_whether_its_last_refresh_failed():
    from dagster._core.storage.dagster_run import DagsterRun
    from dagster._core.utils import make_new_run_id

    from precompute_assets.defs.automation import last_refresh_failed

    with dg.instance_for_test() as instance:
        assert not last_refresh_failed(instance)
        for status in (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE):
            tags = {"dagster/sensor_name": "cache_health"}
            run = DagsterRun(job_name="refresh_precompute_job", run_id=make_new_run_id(), status=status, tags=tags)
            instance.add_run(run)
            assert last_refresh_failed(instance) == (status == dg.DagsterRunStatus.FAILURE)
        other = DagsterRun(
            job_name="refresh_precompute_job", run_id=make_new_run_id(), status=dg.DagsterRunStatus.SUCCESS
        )
        instance.add_run(other)  # a refresh launched by hand is not the sensor's
        assert last_refresh_failed(instance)


def test_cache_health_skips_with_a_warning_when_redis_does_not_answer(schema, capsys):
    """The sensor asked the resource's default client (10 s a command, two retries), which raises dg.Failure when the
    server does not answer: every tick failed after its retries. It now skips, saying why, and looks again next tick."""
    from precompute_assets.defs.resources import RedisResource

    down = RedisResource(url="redis://127.0.0.1:1/0", namespace=schema.namespace)
    with dg.instance_for_test() as instance, dg.build_sensor_context(instance=instance, resources={"redis": down}) as c:
        result = build_cache_health_sensor("UTC")(c)
    assert isinstance(result, dg.SkipReason) and "Redis does not answer" in result.skip_message
    assert c.cursor is None  # no refresh was requested: its cooldown has not started
    warned = capsys.readouterr().err
    assert "not checked the cache's health" in warned and "does not answer" in warned


def test_cache_health_reads_the_query_log_of_a_real_redis(redis_url, schema):
    from precompute_assets.defs.resources import RedisResource
    from precompute_assets.serving import QueryLogger

    logger = QueryLogger(log_client(redis_url), schema)
    for i in range(300):
        logger.log("ctr", f"ad{i % 40}", hit=i % 2 == 0)
    logger.close()
    sensor = build_cache_health_sensor("UTC")
    redis = RedisResource(url=redis_url, namespace=schema.namespace)
    with dg.instance_for_test() as instance:
        with dg.build_sensor_context(instance=instance, resources={"redis": redis}) as context:
            result = sensor(context)
        assert isinstance(result, dg.RunRequest) and "hit rate 50.0%" in result.tags["precompute/reason"]
        assert result.asset_selection is None  # the whole refresh job: the day has no ctr_model to keep
        assert context.cursor is not None  # the cooldown starts
        with dg.build_sensor_context(instance=instance, resources={"redis": redis}, cursor=context.cursor) as again:
            assert isinstance(sensor(again), dg.SkipReason)
        # two hours on, the refresh requested then has failed: the sensor asks again rather than wait 6 h
        from dagster._core.storage.dagster_run import DagsterRun

        tags = {"dagster/sensor_name": "cache_health"}
        failed = DagsterRun(job_name="refresh_precompute_job", status=dg.DagsterRunStatus.FAILURE, tags=tags)
        instance.add_run(failed)
        earlier = str(float(context.cursor) - 2 * 3600)
        with dg.build_sensor_context(instance=instance, resources={"redis": redis}, cursor=earlier) as retry:
            assert isinstance(sensor(retry), dg.RunRequest)
        # once the day has an approved ctr_model, a refresh publishes without fitting the forest again
        approved = {"model_version": f"{result.partition_key}.run", "approved": True}
        instance.report_runless_asset_event(
            dg.AssetMaterialization("ctr_model", partition=result.partition_key, metadata=approved)
        )
        with dg.build_sensor_context(instance=instance, resources={"redis": redis}, cursor=earlier) as retry:
            refresh = sensor(retry)
        assert isinstance(refresh, dg.RunRequest) and refresh.partition_key == result.partition_key
        assert dg.AssetKey("ctr_model") not in refresh.asset_selection
        assert {dg.AssetKey("top_ads"), dg.AssetKey("ctr_predictions"), dg.AssetKey("ctr_cache")} <= set(
            refresh.asset_selection
        )
