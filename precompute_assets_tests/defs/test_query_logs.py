"""The query_logs asset on real Redis + PostgreSQL: range reads, quarantine, check severities, cleanup."""

from __future__ import annotations

import functools
import json
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import redis
from dagster._core.test_utils import create_run_for_test, freeze_time

from precompute_assets.defs import query_logs as query_logs_module
from precompute_assets.defs.partitions import DEFAULT_PARTITIONS, Partitions
from precompute_assets.defs.query_logs import (
    HOUR_END_WAIT_S,
    quarantine_check,
    query_log_cleanup_job,
    query_logs,
    safe_trim_boundary,
    wait_for_hour_end,
)
from precompute_assets.defs.resources import (
    CampaignRegistryResource,
    DeploymentResource,
    DocumentStoreResource,
    LakeResource,
    ParquetIOManager,
    RedisResource,
)
from precompute_assets.serving import QueryLogger
from precompute_assets.serving.querylog import TRIM_BATCH
from precompute_assets.storage.lake import Lake
from precompute_assets_tests.factories import (
    LOG_EVERY_COMMAND,
    commands_run,
    fill_the_disk_for,
    log_client,
    logged_queries,
)

HOUR = "2026-11-20-10:00"
HOURLY = DEFAULT_PARTITIONS.hourly
HOUR_START_MS = int(datetime(2026, 11, 20, 10, tzinfo=UTC).timestamp() * 1000)


def fill(redis_url, schema, at_ms: int, n: int, *, hit_every: int = 2) -> None:
    logger = QueryLogger(log_client(redis_url), schema, clock=lambda: at_ms)
    for i in range(n):
        logger.log("ctr", f"ad{i % 7}", hit=i % hit_every == 0, latency_us=40, user=f"u{i}")
    logger.close()


def resources(redis_url, schema, lake_uri):
    lake = LakeResource(base_uri=lake_uri)
    return {
        "redis": RedisResource(url=redis_url, namespace=schema.namespace),
        "io_manager": ParquetIOManager(lake=lake),
        "lake": lake,
    }


def cleanup(res, instance, app_db: str, *, succeed: bool = True, **run_config) -> dg.ExecuteInProcessResult:
    """The cleanup job with the resources it has in the Definitions, the lake's IO manager included."""
    resources = {
        "redis": res["redis"], "deployment": DeploymentResource(), "io_manager": res["io_manager"], "lake": res["lake"],
        "campaign_registry": CampaignRegistryResource(url=app_db), "documents": DocumentStoreResource(url=app_db),
    }  # fmt: skip
    job = query_log_cleanup_job.execute_in_process(
        resources=resources, instance=instance, run_config=run_config, raise_on_error=succeed
    )
    assert job.success == succeed
    return job


def drain_metadata(result: dg.ExecuteInProcessResult) -> dict:
    """The metadata of the run's query_logs materialization (its node also materializes the quarantine, first)."""
    (materialization,) = [m for m in result.asset_materializations_for_node("query_logs")
                          if m.asset_key == dg.AssetKey("query_logs")]  # fmt: skip
    return materialization.metadata


def materialize(redis_url, schema, lake_uri, instance, partition=HOUR, **options):
    return dg.materialize(
        [query_logs],
        resources=resources(redis_url, schema, lake_uri),
        partition_key=partition,
        instance=instance,
        **options,
    )


def test_partition_reads_exactly_its_hour_and_is_idempotent(redis_url, schema, lake_uri, pg_instance):
    fill(redis_url, schema, HOUR_START_MS - 1, 5)  # previous hour
    fill(redis_url, schema, HOUR_START_MS, 100)
    fill(redis_url, schema, HOUR_START_MS + 3_599_999, 10)
    fill(redis_url, schema, HOUR_START_MS + 3_600_000, 7)  # next hour
    first = materialize(redis_url, schema, lake_uri, pg_instance)
    assert first.success
    logs = Lake(lake_uri).read("query_logs", HOUR)
    assert len(logs) == 110
    assert logs["hit"].mean() == pytest.approx(0.5, abs=0.01)
    meta = drain_metadata(first)
    assert meta["dagster/row_count"].value == 110
    assert meta["distinct_keys"].value == 7
    assert meta["hit_rate"].value == pytest.approx(logs["hit"].mean())

    again = materialize(redis_url, schema, lake_uri, pg_instance)
    assert again.success
    assert Lake(lake_uri).read("query_logs", HOUR).equals(logs)
    # The run history went to PostgreSQL.
    assert pg_instance.get_materialized_partitions(dg.AssetKey("query_logs")) == {HOUR}


def test_malformed_events_are_quarantined_with_reasons(redis_url, redis_client, schema, lake_uri, pg_instance):
    fill(redis_url, schema, HOUR_START_MS, 60)
    stream = schema.query_log()
    bad = [
        {"kind": "ctr", "key": "ad1", "hit": "1"},  # missing lat_us, ts
        {"ts": "soon", "kind": "ctr", "key": "ad1", "hit": "1", "lat_us": "1"},
        {"ts": str(HOUR_START_MS), "kind": "ctr", "key": "a\tb", "hit": "1", "lat_us": "1"},
        {"ts": str(HOUR_START_MS), "kind": "ctr", "key": "k" * 300, "hit": "1", "lat_us": "1"},
        {"ts": str(HOUR_START_MS), "kind": "ctr", "key": "ad1", "hit": "maybe", "lat_us": "1"},
    ]
    cols = "ts,kind,keys,hits,lat_us,user,tenant,arms,ver"
    good = [HOUR_START_MS, "ctr", ["ad9"], "1", 3, None, None, None, None]
    bad += [
        {"n": "2", "cols": cols, "groups": "[[1, 2"},  # a batch that is not JSON: quarantined once
        {"n": "3", "cols": cols, "groups": json.dumps([good, [HOUR_START_MS, "ctr"], good])},  # one bad group
        # a latency past int64 (a writer's unsigned underflow): the whole hour's drain crashed on it, every retry
        {"n": "1", "cols": cols, "groups": json.dumps([[HOUR_START_MS, "ctr", ["ad3"], "1", 2**64 - 1, *[None] * 4]])},
    ]
    for offset, fields in enumerate(bad, start=1):
        redis_client.xadd(stream, fields, id=f"{HOUR_START_MS + 1000 + offset}-0")
    result = materialize(redis_url, schema, lake_uri, pg_instance)
    assert result.success
    quarantine = Lake(lake_uri).read("query_log_quarantine", HOUR)
    assert len(quarantine) == 8
    assert len(Lake(lake_uri).read("query_logs", HOUR)) == 62  # the two good groups of the last batch are kept
    reasons = " | ".join(quarantine["reason"])
    for expected in ("missing field ts", "ts is not an integer", "control characters", "longer than", "hit must be",
                     "unreadable batch entry", "batch group is not an array of 9 values",
                     "lat_us out of range"):  # fmt: skip
        assert expected in reasons
    check = result.get_asset_check_evaluations()[0]
    assert not check.passed
    assert check.severity == dg.AssetCheckSeverity.ERROR  # 9/71 > 5%
    # Queries, not rows: the batch that is not JSON is one row for its 2 queries.
    assert (check.metadata["quarantined"].value, check.metadata["events"].value) == (9, 71)
    assert drain_metadata(result)["quarantined_queries"].value == 9


def test_the_arm_of_each_query_is_stored_and_a_bad_arm_is_quarantined(
    redis_url, redis_client, schema, lake_uri, pg_instance
):
    logger = QueryLogger(log_client(redis_url), schema, clock=lambda: HOUR_START_MS)
    for i in range(30):
        logger.log("ctr", f"ad{i}", hit=i % 2 == 0, arm="lstm" if i % 3 else "frequency")
    logger.log("ctr", "plain", hit=False)  # outside any experiment
    logger.close()
    stream = schema.query_log()
    for offset, arm in enumerate(("", "Not An Arm", "x" * 300), start=1):
        fields = {"ts": str(HOUR_START_MS), "kind": "ctr", "key": "ad1", "hit": "1", "lat_us": "1", "arm": arm}
        redis_client.xadd(stream, fields, id=f"{HOUR_START_MS + 1000 + offset}-0")
    result = materialize(redis_url, schema, lake_uri, pg_instance)
    assert result.success
    logs = Lake(lake_uri).read("query_logs", HOUR)
    assert len(logs) == 31
    assert logs["arm"].value_counts().to_dict() == {"lstm": 20, "frequency": 10}
    assert logs.loc[logs["key"] == "plain", "arm"].isna().all()
    assert drain_metadata(result)["experiment_rows"].value == 30
    reasons = Lake(lake_uri).read("query_log_quarantine", HOUR)["reason"].tolist()
    assert reasons == ["invalid arm: ''", "invalid arm: 'Not An Arm'", "arm longer than 256 characters"]


def test_an_hour_without_arms_still_has_the_column(redis_url, schema, lake_uri, pg_instance):
    fill(redis_url, schema, HOUR_START_MS, 5)
    assert materialize(redis_url, schema, lake_uri, pg_instance).success
    logs = Lake(lake_uri).read("query_logs", HOUR, columns=["key", "arm"])
    assert len(logs) == 5 and logs["arm"].isna().all()


@pytest.mark.parametrize(
    ("quarantined", "total", "passed", "severity"),
    [
        (0, 1000, True, None),
        (1, 1000, True, None),
        (2, 1000, False, dg.AssetCheckSeverity.WARN),
        (50, 1000, False, dg.AssetCheckSeverity.WARN),
        (51, 1000, False, dg.AssetCheckSeverity.ERROR),
        (0, 0, True, None),
    ],
)
def test_quarantine_check_thresholds(quarantined, total, passed, severity):
    result = quarantine_check(quarantined, total)
    assert result.passed is passed
    if severity is not None:
        assert result.severity == severity


def test_empty_hour_materializes_empty(redis_url, schema, lake_uri, pg_instance):
    result = materialize(redis_url, schema, lake_uri, pg_instance)
    assert result.success
    assert Lake(lake_uri).read("query_logs", HOUR).empty
    assert result.get_asset_check_evaluations()[0].passed
    meta = drain_metadata(result)
    # The UI plots hit_rate across hours: a quiet hour has none, and its 0.0 plotted as the cache going cold.
    assert meta["dagster/row_count"].value == 0 and "hit_rate" not in meta


def _ms(hour: int) -> int:
    return int(datetime(2026, 11, 20, hour, tzinfo=UTC).timestamp() * 1000)


def test_trim_boundary_stops_at_the_first_unmaterialized_hour():
    done = {f"2026-11-20-{h:02d}:00" for h in range(0, 6)} - {"2026-11-20-03:00"}
    assert safe_trim_boundary(_ms(0) + 5, _ms(5) + 10, done, HOURLY) == _ms(3)
    done.add("2026-11-20-03:00")
    assert safe_trim_boundary(_ms(0) + 5, _ms(5) + 10, done, HOURLY) == _ms(5) + 10
    assert safe_trim_boundary(_ms(6), _ms(5), done, HOURLY) == _ms(6)  # nothing older than the cutoff


def test_entries_before_the_first_partition_never_hold_the_trim_back():
    """A service that logged before PRECOMPUTE_PARTITIONS_START left entries in no hour: the trim stopped at them for
    good, and the stream grew to its MAXLEN (found by review)."""
    hourly = Partitions(start="2026-11-20").hourly
    done = {f"2026-11-20-{h:02d}:00" for h in range(0, 6)}
    before_start = _ms(0) - 5 * 86_400_000
    assert safe_trim_boundary(before_start, _ms(5) + 10, done, hourly) == _ms(5) + 10
    assert safe_trim_boundary(before_start, _ms(5) + 10, done - {"2026-11-20-02:00"}, hourly) == _ms(2)


def test_hours_logged_before_the_first_drain_are_drained_too(redis_url, redis_client, schema):
    """A new deployment drained only the hour that just ended: a service that logged from 07:00 while the daemon's
    first tick came at 10:05 left 07:00 and 08:00 undrained for good, and the nightly trim stopped at 07:00 forever
    (the stream, without a TTL, then grew to its MAXLEN). The hours from the stream's oldest entry are drained."""
    from precompute_assets.definitions import build_definitions
    from precompute_assets.defs.settings import Settings

    tick = datetime(2026, 11, 20, 10, 5, tzinfo=UTC)
    for at in (datetime(2026, 11, 20, 7, 30, tzinfo=UTC), datetime(2026, 11, 20, 9, 10, tzinfo=UTC)):
        redis_client.xadd(schema.query_log(), {"k": "ad1"}, id=f"{int(at.timestamp() * 1000)}-0")
    schedule = build_definitions(Settings("UTC")).get_repository_def().get_schedule_def("query_logs_hourly")
    resources = {"redis": RedisResource(url=redis_url, namespace=schema.namespace)}
    with dg.instance_for_test() as instance:
        with dg.build_schedule_context(instance, scheduled_execution_time=tick, resources=resources) as context:
            requested = [request.partition_key for request in schedule.evaluate_tick(context).run_requests]
        assert requested == ["2026-11-20-07:00", "2026-11-20-08:00", "2026-11-20-09:00"]

        @dg.asset(name="query_logs", partitions_def=HOURLY, io_manager_key="mem")
        def drained() -> None: ...

        mem = {"mem": dg.InMemoryIOManager()}
        assert dg.materialize([drained], partition_key="2026-11-20-08:00", instance=instance, resources=mem).success
        # An import recorded 07:00 outside any run (`query-logs import`): the stream may still hold its queries.
        instance.report_runless_asset_event(dg.AssetMaterialization("query_logs", partition="2026-11-20-07:00"))
        with dg.build_schedule_context(instance, scheduled_execution_time=tick, resources=resources) as context:
            requested = [request.partition_key for request in schedule.evaluate_tick(context).run_requests]
    assert requested == ["2026-11-20-07:00", "2026-11-20-09:00"]


def test_the_drain_schedule_leaves_the_hours_a_backfill_or_the_ui_is_materializing(redis_url, redis_client, schema):
    """Its tick asked again for hours that an asset backfill or a UI run (``__ASSET_JOB``) was draining: each hour
    drained twice, two materializations, and two drains of one hour could write its lake file at once (h_dagster2)."""
    from precompute_assets.definitions import build_definitions
    from precompute_assets.defs.settings import Settings

    tick = datetime(2026, 11, 20, 10, 5, tzinfo=UTC)
    redis_client.xadd(
        schema.query_log(), {"k": "ad1"}, id=f"{int(datetime(2026, 11, 20, 3, 30, tzinfo=UTC).timestamp() * 1000)}-0"
    )
    schedule = build_definitions(Settings("UTC")).get_repository_def().get_schedule_def("query_logs_hourly")
    resources = {"redis": RedisResource(url=redis_url, namespace=schema.namespace)}
    logs = frozenset({dg.AssetKey("query_logs"), dg.AssetKey("query_log_quarantine")})
    with dg.instance_for_test() as instance:
        for tags, status, selection in [
            ({"dagster/partition": "2026-11-20-05:00"}, dg.DagsterRunStatus.STARTED, logs),  # a backfill's run
            ({"dagster/partition": "2026-11-20-06:00"}, dg.DagsterRunStatus.STARTING, logs),  # the UI's
            (  # a single-run backfill of a range
                {"dagster/asset_partition_range_start": "2026-11-20-07:00",
                 "dagster/asset_partition_range_end": "2026-11-20-08:00"},
                dg.DagsterRunStatus.STARTED, logs,
            ),
            (  # a range from before the partitions' start (moved later since): no error, its hours still busy
                {"dagster/asset_partition_range_start": "2019-12-31-22:00",
                 "dagster/asset_partition_range_end": "2026-11-20-04:00"},
                dg.DagsterRunStatus.STARTED, logs,
            ),
            (  # tags of no hour: ignored
                {"dagster/asset_partition_range_start": "garbage", "dagster/asset_partition_range_end": "2026-11-20"},
                dg.DagsterRunStatus.STARTED, logs,
            ),
            ({"dagster/partition": "2026-11-20-09:00"}, dg.DagsterRunStatus.FAILURE, logs),  # over: drained again
            ({"dagster/partition": "2026-11-20-09:00"}, dg.DagsterRunStatus.STARTED, frozenset({dg.AssetKey("other")})),
        ]:  # fmt: skip
            run = dg.DagsterRun(job_name="__ASSET_JOB", status=status, tags=tags, asset_selection=selection)
            instance.add_run(run)
        with dg.build_schedule_context(instance, scheduled_execution_time=tick, resources=resources) as context:
            requested = [request.partition_key for request in schedule.evaluate_tick(context).run_requests]
    assert requested == ["2026-11-20-09:00"]


def test_cleanup_job_trims_only_materialized_hours(redis_url, redis_client, schema, lake_uri, pg_instance, app_db):
    old = HOUR_START_MS - 30 * 86_400_000  # 30 days ago: past retention
    old_hours = [HOURLY.get_partition_key_for_timestamp((old + h * 3_600_000) / 1000) for h in range(2)]
    fill(redis_url, schema, old, 10)
    fill(redis_url, schema, old + 3_600_000, 10)
    fill(redis_url, schema, HOUR_START_MS, 10)
    res = resources(redis_url, schema, lake_uri)
    dg.materialize([query_logs], resources=res, partition_key=old_hours[0], instance=pg_instance)

    cleanup(res, pg_instance, app_db)
    remaining = logged_queries(redis_client, schema)
    assert len(remaining) == 20  # the second old hour was never materialized: kept, and all after it
    # An import of that hour (`query-logs import` records it outside any run) drained none of the client's queries in
    # the stream: the trim deleted them all the same (h_qlog2).
    pg_instance.report_runless_asset_event(dg.AssetMaterialization("query_logs", partition=old_hours[1]))
    cleanup(res, pg_instance, app_db)
    assert len(logged_queries(redis_client, schema)) == 20

    dg.materialize([query_logs], resources=res, partition_key=old_hours[1], instance=pg_instance)
    run = cleanup(res, pg_instance, app_db)
    assert len(logged_queries(redis_client, schema)) == 10
    # the boundary as a time a reader can check, not a raw epoch in milliseconds (h_ops3)
    said = [entry.user_message for entry in pg_instance.all_logs(run.run_id) if "stream entries older than" in
            entry.user_message]  # fmt: skip
    boundary = datetime.fromtimestamp((old + 2 * 3_600_000) / 1000, UTC)
    assert any(f"older than {boundary:%Y-%m-%d %H:%M:%S} UTC" in message for message in said), said


def test_cleanup_job_frees_a_full_redis(redis_server, schema, lake_uri, pg_instance, app_db):
    """At ``maxmemory`` with ``noeviction`` (or ``volatile-lru`` with nothing volatile left) the query-log stream, which
    no TTL frees, is what the cleanup trims; its first step, recording the trim boundary, was a ``SET`` that Redis
    refuses there (OOM), so the job failed and the server stayed full. A private server: an OOM limit on the shared
    one would fail other tests' writes."""
    server = redis_server(extra_config=("maxmemory-policy noeviction",))
    client = redis.Redis.from_url(server.url)
    old = HOUR_START_MS - 30 * 86_400_000  # 30 days ago: past retention
    fill(server.url, schema, old, 10)
    fill(server.url, schema, HOUR_START_MS, 10)
    res = resources(server.url, schema, lake_uri)
    old_hour = HOURLY.get_partition_key_for_timestamp(old / 1000)
    dg.materialize([query_logs], resources=res, partition_key=old_hour, instance=pg_instance)
    client.config_set("maxmemory", 1)  # full at once
    cleanup(res, pg_instance, app_db)
    assert len(logged_queries(client, schema)) == 10  # the drained old hour went
    assert int(client.get(schema.query_log_trimmed())) == old + 3_600_000
    client.close()


def test_cleanup_job_trims_the_user_event_stream_past_its_materialized_hours(
    redis_url, redis_client, schema, lake_uri, pg_instance, app_db
):
    """The event stream was capped by MAXLEN alone (10 million entries of Redis memory that no TTL frees): events
    past the retention go like queries, never those of an hour user_events has not drained."""
    old = HOUR_START_MS - 30 * 86_400_000
    for at in (old, old + 1, HOUR_START_MS, HOUR_START_MS + 1):
        redis_client.xadd(schema.events(), {"ts": str(at), "user": "u1", "action": "login"}, id=f"{at}-0")
    res = resources(redis_url, schema, lake_uri)
    cleanup(res, pg_instance, app_db)
    assert redis_client.xlen(schema.events()) == 4  # the old hour was never drained: kept
    old_hour = HOURLY.get_partition_key_for_timestamp(old / 1000)
    pg_instance.report_runless_asset_event(dg.AssetMaterialization("user_events", partition=old_hour))
    cleanup(res, pg_instance, app_db)
    assert [entry_id for entry_id, _ in redis_client.xrange(schema.events())] == [
        f"{HOUR_START_MS}-0".encode(),
        f"{HOUR_START_MS + 1}-0".encode(),
    ]
    # Its boundary recorded, as the query log's: a drain after it knows the trimmed entries were ours
    assert int(redis_client.get(schema.events_trimmed())) > old


def test_cleanup_job_trims_a_stream_a_batch_of_entries_per_command(redis_server, schema, lake_uri, pg_instance, app_db):
    """The trim was one exact XTRIM of every entry past the retention, a day of the query log's millions of entries
    freed in one command while every other client of the server waited. Whole nodes now go at most ``TRIM_BATCH``
    entries per ``XTRIM MINID ~ LIMIT``, and one exact XTRIM takes what is left of the oldest node."""
    server = redis_server(extra_config=LOG_EVERY_COMMAND)
    client = redis.Redis.from_url(server.url)
    old = HOUR_START_MS - 30 * 86_400_000
    pipe = client.pipeline(transaction=False)
    for at in [old + i for i in range(5000)] + [HOUR_START_MS, HOUR_START_MS + 1]:
        pipe.xadd(schema.events(), {"ts": str(at), "user": "u1", "action": "login"}, id=f"{at}-0")
    pipe.execute()
    old_hour = HOURLY.get_partition_key_for_timestamp(old / 1000)
    pg_instance.report_runless_asset_event(dg.AssetMaterialization("user_events", partition=old_hour))
    commands_run(client)
    cleanup(resources(server.url, schema, lake_uri), pg_instance, app_db)
    trims = [args[2:] for args, _ in commands_run(client) if args[:2] == ["XTRIM", schema.events()]]
    *batches, last = trims
    boundary = f"{old + 3_600_000}-0"  # the end of the one hour drained
    assert len(batches) >= 5000 // TRIM_BATCH and last == ["MINID", boundary]
    assert all(args == ["MINID", "~", boundary, "LIMIT", str(TRIM_BATCH)] for args in batches), batches
    assert [entry_id for entry_id, _ in client.xrange(schema.events())] == [
        f"{HOUR_START_MS}-0".encode(),
        f"{HOUR_START_MS + 1}-0".encode(),
    ]


def test_cleanup_job_deletes_lake_files_past_their_retention(redis_url, schema, lake_uri, pg_instance, app_db):
    """Every hour of queries and every day of impressions stayed in the lake for good: the cleanup deletes the
    files of days past retention_days (90), and keeps the rest, files not named by a day, and all with 0."""
    today = datetime.now(UTC).date()
    old, recent = (today - timedelta(days=100)).isoformat(), (today - timedelta(days=10)).isoformat()
    lake, frame = Lake(lake_uri), pd.DataFrame({"x": [1]})
    for day in (old, recent):
        for hour in ("00:00", "23:00"):
            lake.write("query_logs", f"{day}-{hour}", frame)
            lake.write("query_log_quarantine", f"{day}-{hour}", frame)
        lake.write("ad_impressions", day, frame)
    lake.write("ads", None, frame)
    res = resources(redis_url, schema, lake_uri)
    cleanup(res, pg_instance, app_db, ops={"expire_lake_partitions": {"config": {"retention_days": 0}}})
    assert lake.partitions("query_logs") == [f"{old}-00:00", f"{old}-23:00", f"{recent}-00:00", f"{recent}-23:00"]
    # The temporary file of a write killed before its move, of an hour nobody writes again: swept an hour on.
    folder = Path(lake.path("query_logs", f"{recent}-00:00")).parent
    killed, writing = folder / f".{recent}-05:00.parquet.tmp-1", folder / f".{recent}-06:00.parquet.tmp-2"
    for path in (killed, writing):
        path.write_bytes(b"PAR1")
    os.utime(killed, (time.time() - 7200, time.time() - 7200))
    cleanup(res, pg_instance, app_db, ops={"expire_lake_partitions": {"config": {"retention_days": 0}}})
    assert not killed.exists() and writing.exists()
    cleanup(res, pg_instance, app_db)
    assert lake.partitions("query_logs") == lake.partitions("query_log_quarantine")
    assert lake.partitions("query_logs") == [f"{recent}-00:00", f"{recent}-23:00"]
    assert lake.partitions("ad_impressions") == [recent] and lake.exists("ads")


def test_cleanup_job_deletes_old_runs_of_the_precompute_task_jobs(redis_url, schema, lake_uri, pg_instance, app_db):
    """user_event_sensor asks for a precompute_tasks_job run or more a second while users are active, and every run
    and its event log stayed in Dagster's database: finished runs of the task jobs past 14 days go, nothing else."""
    from precompute_assets.defs.tasks import JOB_NAME

    def ended(job: str) -> str:
        run = create_run_for_test(pg_instance, job_name=job, status=dg.DagsterRunStatus.STARTED)
        pg_instance.report_run_failed(run)
        return run.run_id

    with freeze_time(datetime.now(UTC) - timedelta(days=20)):
        old_task, old_nightly = ended(JOB_NAME), ended("daily_precompute_job")
        still_running = create_run_for_test(pg_instance, job_name=JOB_NAME, status=dg.DagsterRunStatus.STARTED).run_id
    recent_task = ended(JOB_NAME)
    # their stdout and stderr, where the default compute log manager writes them: a folder per run (h_ops3: left)
    logs = {}
    for run in (old_task, recent_task):
        path = Path(pg_instance.compute_log_manager.get_captured_local_path([run, "compute_logs", "step"], "out"))
        path.parent.mkdir(parents=True)
        path.write_text("a task's stdout\n")
        logs[run] = path
    cleanup(resources(redis_url, schema, lake_uri), pg_instance, app_db)
    assert pg_instance.get_run_by_id(old_task) is None and not pg_instance.all_logs(old_task)
    assert all(pg_instance.get_run_by_id(run) for run in (old_nightly, still_running, recent_task))
    assert not logs[old_task].parent.parent.exists() and logs[recent_task].exists()


def test_run_retention_refuses_an_asset_job_and_deletes_nothing(redis_url, schema, lake_uri, pg_instance, app_db):
    """jobs names an asset job by mistake: its runs are its assets' history, so the op fails with one line before
    deleting any run, and keeps every run of every job it lists."""
    from precompute_assets.defs.query_logs import query_logs_job
    from precompute_assets.defs.tasks import JOB_NAME

    res = resources(redis_url, schema, lake_uri)
    with freeze_time(datetime.now(UTC) - timedelta(days=20)):
        old_task = create_run_for_test(pg_instance, job_name=JOB_NAME, status=dg.DagsterRunStatus.SUCCESS).run_id
        old_drain = create_run_for_test(pg_instance, job_name="query_logs_job", status=dg.DagsterRunStatus.SUCCESS)
    drain = dg.Definitions(assets=[query_logs], jobs=[query_logs_job], resources=res).resolve_job_def("query_logs_job")
    assert drain.execute_in_process(partition_key=HOUR, instance=pg_instance).success
    config = {"jobs": [JOB_NAME, "query_logs_job"]}
    result = cleanup(res, pg_instance, app_db, succeed=False, ops={"delete_old_runs": {"config": config}})
    failure = next(e for e in result.get_step_failure_events() if e.step_key == "delete_old_runs")
    message = failure.step_failure_data.user_failure_data.description
    assert message.startswith(
        "delete_old_runs: query_logs_job materializes query_log_quarantine, query_logs: list only op jobs"
    )
    assert "\n" not in message
    assert pg_instance.get_run_by_id(old_drain.run_id) and pg_instance.get_run_by_id(old_task)


def test_cleanup_job_purges_the_ads_of_long_ended_campaigns(redis_url, schema, lake_uri, pg_instance, app_db):
    registry = CampaignRegistryResource(url=app_db).registry()
    then = datetime.now(UTC) - timedelta(days=60)
    ad = {"ad_id": "a1", "quality": 0.5, "bid": 1.0, "text_len": 40, "category": "shoes"}
    registry.register("old", "acme", then + timedelta(hours=1), [ad], end_at=then + timedelta(days=1), now=then)
    registry.register("next", "acme", datetime.now(UTC) + timedelta(hours=1), [ad])
    pg_instance.add_dynamic_partitions("campaigns", ["old", "next"])
    cleanup(resources(redis_url, schema, lake_uri), pg_instance, app_db)
    assert registry.ads("old").empty and registry.get("old") is not None
    assert pg_instance.get_dynamic_partitions("campaigns") == ["next"] and not registry.ads("next").empty


def test_cleanup_job_expires_the_quarantined_rows_of_old_document_loads(
    redis_url, schema, lake_uri, pg_instance, app_db
):
    import psycopg2

    from precompute_assets.storage.postgres import libpq_url

    store = DocumentStoreResource(url=app_db).store()
    frame = pd.DataFrame({"doc_id": ["d1", "", "d2"], "title": ["t"] * 3, "body": ["b"] * 3, "language": ["en"] * 3})
    old, new = store.load_frame(frame), store.load_frame(frame)
    assert old.quarantined == new.quarantined == 1
    with psycopg2.connect(libpq_url(app_db)) as conn, conn.cursor() as cur:  # the first load, 40 days ago
        cur.execute(
            "UPDATE documents_quarantine SET quarantined_at = now() - interval '40 days' WHERE load_id = %s",
            (old.load_id,),
        )
    conn.close()
    res = resources(redis_url, schema, lake_uri)
    cleanup(res, pg_instance, app_db, ops={"expire_document_quarantine": {"config": {"retention_days": 0}}})
    assert len(list(store.quarantined(old.load_id))) == 1  # retention off: kept
    cleanup(res, pg_instance, app_db)  # the default, 30 days
    assert list(store.quarantined(old.load_id)) == []
    assert len(list(store.quarantined(new.load_id))) == 1


def test_rematerializing_a_trimmed_hour_keeps_the_good_partition(
    redis_url, redis_client, schema, lake_uri, pg_instance, app_db
):
    old = HOUR_START_MS - 30 * 86_400_000
    old_hour = HOURLY.get_partition_key_for_timestamp(old / 1000)
    fill(redis_url, schema, old, 10)
    fill(redis_url, schema, HOUR_START_MS, 10)
    res = resources(redis_url, schema, lake_uri)
    assert dg.materialize([query_logs], resources=res, partition_key=old_hour, instance=pg_instance).success
    cleanup(res, pg_instance, app_db)
    assert len(logged_queries(redis_client, schema)) == 10  # the old hour is gone from the stream

    again = dg.materialize(
        [query_logs], resources=res, partition_key=old_hour, instance=pg_instance, raise_on_error=False
    )
    assert not again.success
    assert len(Lake(lake_uri).read("query_logs", old_hour)) == 10  # not replaced by an empty hour


@pytest.mark.parametrize("loss", ["restart", "maxlen"])
def test_rematerializing_an_hour_the_stream_lost_keeps_the_good_partition(
    loss, redis_url, redis_client, schema, lake_uri, pg_instance
):
    fill(redis_url, schema, HOUR_START_MS + 10, 100)
    assert materialize(redis_url, schema, lake_uri, pg_instance).success
    logs = Lake(lake_uri).read("query_logs", HOUR)
    if loss == "restart":  # Redis restarted without persistence: the stream (and the trim marker) are gone
        redis_client.delete(schema.query_log())
    else:  # later traffic past the logger's own MAXLEN ~ trimmed the hour away, with no trim marker
        logger = QueryLogger(log_client(redis_url), schema, clock=lambda: HOUR_START_MS + 7_200_000, stream_maxlen=50)
        for i in range(64 * 200):
            logger.log("ctr", f"ad{i % 7}", hit=True)
        logger.close()
        assert not logged_queries(redis_client, schema, max=f"{HOUR_START_MS + 3_599_999}-0")

    again = materialize(redis_url, schema, lake_uri, pg_instance, raise_on_error=False)
    assert not again.success
    failure = again.get_step_failure_events()[0].step_failure_data.error.message
    assert "no longer holds 100 of its 100 events" in failure
    assert Lake(lake_uri).read("query_logs", HOUR).equals(logs)  # not replaced by an empty hour


def test_a_stream_cut_by_its_maxlen_before_a_first_drain_says_so(
    redis_url, redis_client, schema, lake_uri, pg_instance
):
    """A new deployment's loggers cut the stream by their stream_maxlen before anything was drained: the first drain
    kept the hour's last events as if they were all of them, without a word (h_qlog). (A first drain of a stream
    nothing was removed from says nothing: test_the_first_drain_after_redis_lost_the_stream_says_so_with_counts.)"""
    import logging

    logger = QueryLogger(log_client(redis_url), schema, clock=lambda: HOUR_START_MS + 60_000, stream_maxlen=1)
    for i in range(250):  # an entry each: MAXLEN ~ trims whole nodes of 100 entries
        logger.log("ctr", f"ad{i}", hit=True, latency_us=40)
        logger.flush()
    logger.close()
    assert redis_client.xlen(schema.query_log()) < 250
    result = materialize(redis_url, schema, lake_uri, pg_instance)
    warnings = [e.user_message for e in pg_instance.all_logs(result.run_id) if e.level == logging.WARNING]
    assert len(warnings) == 1 and "entries that no cleanup trimmed (the loggers' stream_maxlen cut it" in warnings[0]
    assert drain_metadata(result)["stream_lost"].value.startswith("the stream lost ")


def test_the_first_drain_after_redis_lost_the_stream_says_so_with_counts(
    redis_url, redis_client, schema, lake_uri, pg_instance
):
    """Redis lost the stream in the middle of an hour not drained yet: its drain materialized the events logged after
    the loss as if they were the whole hour, without a word. The hours after it, whose stream is whole, say nothing,
    also one drained first (a catch-up after a daemon outage drains hours in any order)."""
    import logging

    next_hour, after_next = "2026-11-20-11:00", "2026-11-20-12:00"
    fill(redis_url, schema, HOUR_START_MS + 10, 100)
    assert materialize(redis_url, schema, lake_uri, pg_instance).success
    fill(redis_url, schema, HOUR_START_MS + 3_660_000, 40)  # 11:01, then Redis restarts without persistence
    redis_client.delete(schema.query_log())
    fill(redis_url, schema, HOUR_START_MS + 5_400_000, 30)  # 11:30
    fill(redis_url, schema, HOUR_START_MS + 7_200_000, 20)  # 12:00
    first = materialize(redis_url, schema, lake_uri, pg_instance, partition=after_next)
    assert not [e for e in pg_instance.all_logs(first.run_id) if e.level == logging.WARNING]
    result = materialize(redis_url, schema, lake_uri, pg_instance, partition=next_hour)
    assert result.success and len(Lake(lake_uri).read("query_logs", next_hour)) == 30  # what is left, kept
    warnings = [e.user_message for e in pg_instance.all_logs(result.run_id) if e.level == logging.WARNING]
    assert warnings == [
        f"the stream lost every event logged after partition {HOUR} (its 100 events) was drained: this hour holds "
        "only the 30 events logged after the loss, the first at 2026-11-20 11:30:00 UTC"
    ], warnings
    meta = drain_metadata(result)
    assert meta["stream_lost"].value.startswith("the stream lost every event")

    later = materialize(redis_url, schema, lake_uri, pg_instance, partition=after_next)  # again, after 11:00's
    assert not [e for e in pg_instance.all_logs(later.run_id) if e.level == logging.WARNING]
    assert "stream_lost" not in drain_metadata(later)


def test_an_hour_of_many_chunks_is_drained_whole_and_in_order(
    monkeypatch, redis_url, redis_client, schema, lake_uri, pg_instance
):
    """Rows become columns ROWS_PER_CHUNK at a time: every query of the hour lands once, in stream order, the arm and
    version columns included, and the quarantine is untouched by the chunking."""
    monkeypatch.setattr(query_logs_module, "ROWS_PER_CHUNK", 7)
    fill(redis_url, schema, HOUR_START_MS + 10, 100)
    redis_client.xadd(schema.query_log(), {"kind": "ctr"}, id=f"{HOUR_START_MS + 20}-0")  # malformed
    assert materialize(redis_url, schema, lake_uri, pg_instance).success
    logs = Lake(lake_uri).read("query_logs", HOUR)
    streamed = [entry_id.decode() for entry_id, _ in logged_queries(redis_client, schema)]
    assert len(logs) == 100
    assert logs["stream_id"].tolist() == [entry_id for entry_id in streamed if entry_id != f"{HOUR_START_MS + 20}-0"]
    assert logs["user"].tolist() == [f"u{i}" for i in range(100)]
    assert {"arm", "version"} <= set(logs.columns)
    assert len(Lake(lake_uri).read("query_log_quarantine", HOUR)) == 1


def test_rematerializing_an_hour_that_lost_some_events_counts_them(
    redis_url, redis_client, schema, lake_uri, pg_instance
):
    for i in range(100):  # one query per entry, so that deleting entries loses a known count of queries
        fields = {"ts": HOUR_START_MS + i, "kind": "ctr", "key": f"ad{i}", "hit": 1, "lat_us": 9}
        redis_client.xadd(schema.query_log(), fields, id=f"{HOUR_START_MS + i}-0")
    assert materialize(redis_url, schema, lake_uri, pg_instance).success
    redis_client.xdel(schema.query_log(), *(f"{HOUR_START_MS + i}-0" for i in (5, 50, 99)))
    again = materialize(redis_url, schema, lake_uri, pg_instance, raise_on_error=False)
    assert not again.success
    assert "no longer holds 3 of its 100 events" in again.get_step_failure_events()[0].step_failure_data.error.message


def test_an_imported_hour_the_stream_never_had_is_kept(redis_url, schema, lake_uri, pg_instance):
    import numpy as np

    from precompute_assets.storage.query_log_import import hour_rows

    start = HOUR_START_MS / 1000
    rows = hour_rows(np.array(["a", "b", "a"], dtype=object), np.array([start + 1, start + 2, start + 3]),
                     kind="ctr", source="history.csv", partition_key=HOURLY.get_partition_key_for_timestamp,
                     first_s=0, last_s=start + 7200)  # fmt: skip
    Lake(lake_uri).write("query_logs", HOUR, rows.frames[HOUR])
    result = materialize(redis_url, schema, lake_uri, pg_instance)  # the stream holds nothing for the hour
    assert result.success
    assert list(Lake(lake_uri).read("query_logs", HOUR)["key"]) == ["a", "b", "a"]
    metadata = drain_metadata(result)
    assert metadata["imported"].value is True and metadata["dagster/row_count"].value == 3
    # a malformed entry alone (a misconfigured client): no valid query, so the import stays, and it is quarantined
    # (the import was replaced by an empty hour; h_qlog)
    client = redis.Redis.from_url(redis_url)
    bad = {"ts": HOUR_START_MS + 30_000, "kind": "ctr", "key": "x"}  # no hit, no latency
    client.xadd(schema.query_log(), bad, id=f"{HOUR_START_MS + 30_000}-0")
    malformed = materialize(redis_url, schema, lake_uri, pg_instance)
    assert list(Lake(lake_uri).read("query_logs", HOUR)["key"]) == ["a", "b", "a"]
    assert len(Lake(lake_uri).read("query_log_quarantine", HOUR)) == 1
    assert drain_metadata(malformed)["quarantined_queries"].value == 1
    client.close()
    fill(redis_url, schema, HOUR_START_MS + 60_000, 5)  # served traffic for the hour: the stream's rows win
    assert materialize(redis_url, schema, lake_uri, pg_instance).success
    assert len(Lake(lake_uri).read("query_logs", HOUR)) == 5


def test_queries_of_a_server_whose_clock_runs_ahead_are_kept(redis_url, redis_client, schema, lake_uri, pg_instance):
    """Services stamp queries with their own clock, Redis the arrival with its own: a server whose clock runs a few
    seconds or a minute fast still has its queries kept (all of them were quarantined as "in the future" past 1 s);
    one 10 minutes ahead is a wrong clock or unit, quarantined."""
    cols = "ts,kind,keys,hits,lat_us,user,tenant,arms,ver"
    for offset, ahead_ms in enumerate((2_000, 60_000, 600_000), start=1):
        arrival = HOUR_START_MS + offset * 1000
        group = [arrival + ahead_ms, "ctr", [f"ad{offset}", "ad0"], "10", 3, None, None, None, None]
        fields = {"n": "2", "cols": cols, "groups": json.dumps([group])}
        redis_client.xadd(schema.query_log(), fields, id=f"{arrival}-0")
    result = materialize(redis_url, schema, lake_uri, pg_instance)
    assert result.success
    logs = Lake(lake_uri).read("query_logs", HOUR)
    assert sorted(logs["key"]) == ["ad0", "ad0", "ad1", "ad2"]
    quarantine = Lake(lake_uri).read("query_log_quarantine", HOUR)
    assert (
        len(quarantine) == 2
        and quarantine["reason"].str.contains("after its arrival (a clock ahead)", regex=False).all()
    )
    assert drain_metadata(result)["quarantined"].value == 2


def test_an_hour_not_over_on_redis_clock_is_not_read(redis_url, redis_client, schema, lake_uri, pg_instance):
    """Stream IDs are Redis's clock, the partitions Dagster's: on a Dagster host whose clock runs ahead, the hour in
    progress on Redis is offered as over. Its drain read it while services still logged into it (here it took the 10
    queries so far, and every later one of the hour would have been in no partition); it now fails, writing nothing.
    A Redis clock at most ``HOUR_END_WAIT_S`` behind is waited for."""
    seconds = int(redis_client.time()[0])
    if 3600 - seconds % 3600 < HOUR_END_WAIT_S + 30:  # the drain would wait for this hour's end: log in the next one
        time.sleep(3600 - seconds % 3600 + 1)
        seconds = int(redis_client.time()[0])
    hour_start = seconds - seconds % 3600
    hour = HOURLY.get_partition_key_for_timestamp(hour_start)
    logger = QueryLogger(log_client(redis_url), schema)
    for i in range(10):
        logger.log("ctr", f"ad{i}", hit=True)
    logger.close()
    with freeze_time(hour_start + 3600 + 300):  # Dagster's host is an hour ahead: the hour is over for it
        result = materialize(redis_url, schema, lake_uri, pg_instance, partition=hour, raise_on_error=False)
    assert not result.success
    failure = result.get_step_failure_events()[0].step_failure_data.error.message
    assert f"partition {hour} is not over on Redis's clock" in failure
    assert not Lake(lake_uri).exists("query_logs", hour)


def test_a_drain_waits_for_a_redis_clock_a_little_behind(redis_client):
    seconds, micros = redis_client.time()
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    wait_for_hour_end(redis_client, now_ms + 300, "2026-11-20-10:00")  # 0.3 s to go on Redis's clock: waited for
    seconds, micros = redis_client.time()
    assert int(seconds) * 1000 + int(micros) // 1000 >= now_ms + 300
    with pytest.raises(dg.Failure, match="not over on Redis's clock"):
        wait_for_hour_end(redis_client, now_ms + 600_000, "2026-11-20-10:00")  # 10 minutes behind: no waiting


def test_the_quarantine_reasons_in_the_metadata_add_up(redis_url, redis_client, schema, lake_uri, pg_instance):
    """The ``reasons`` metadata counts the quarantined events by reason. Reasons that embedded their values before
    the colon (``ts 1 is more than an hour from its arrival 2``, ``negative lat_us -3``) were each a reason of their
    own: 30 stale queries showed as 20 reasons of one query, the other 10 in none."""
    cols = "ts,kind,keys,hits,lat_us,user,tenant,arms,ver"
    for i in range(30):
        stale = [HOUR_START_MS - 7_200_000 + i, "ctr", ["ad1"], "1", 3, None, None, None, None]
        negative = [HOUR_START_MS + i, "ctr", ["ad2"], "0", -1 - i, None, None, None, None]
        fields = {"n": "2", "cols": cols, "groups": json.dumps([stale, negative])}
        redis_client.xadd(schema.query_log(), fields, id=f"{HOUR_START_MS + 1000 + i}-0")
    result = materialize(redis_url, schema, lake_uri, pg_instance)
    (meta,) = [m.metadata for m in result.asset_materializations_for_node("query_logs")
               if m.asset_key == dg.AssetKey("query_log_quarantine")]  # fmt: skip
    reasons = meta["reasons"].value
    assert sum(reasons.values()) == meta["dagster/row_count"].value == 60
    assert len(reasons) == 2 and reasons["negative lat_us"] == 30


def step_failure(result) -> str:
    (failure,) = [event for event in result.all_events if event.event_type == dg.DagsterEventType.STEP_FAILURE]
    return failure.step_failure_data.user_failure_data.description


def test_a_redis_setting_that_does_not_work_fails_the_run_naming_the_variable(
    redis_server, schema, lake_uri, pg_instance
):
    """A wrong password, a typo'd scheme, a database the server refuses or a read-only replica failed the step with
    the first command's bare redis-py error (AuthenticationError, "Redis URL must specify ...", READONLY), which named
    no setting."""
    primary = redis_server(password="right-password-0123")
    replica = redis_server(
        password="right-password-0123",
        extra_config=(f"replicaof 127.0.0.1 {primary.port}", "masterauth right-password-0123"),
    )
    good = f"redis://:right-password-0123@127.0.0.1:{primary.port}/0"
    assert materialize(good, schema, lake_uri, pg_instance).success
    for url, reason in [
        (f"redis://:wrong-secret@127.0.0.1:{primary.port}/0", "refuses us: invalid username-password pair"),
        (f"rdis://:right-password-0123@127.0.0.1:{primary.port}/0", "is not a Redis URL"),
        (f"redis://:right-password-0123@127.0.0.1:{primary.port}/99", "refuses us: DB index is out of range"),
        (f"redis://:right-password-0123@127.0.0.1:{replica.port}/0", f"read-only replica of 127.0.0.1:{primary.port}"),
    ]:
        result = materialize(url, schema, lake_uri, pg_instance, raise_on_error=False)
        assert not result.success
        description = step_failure(result)
        assert description.startswith("PRECOMPUTE_REDIS_URL (") and reason in description, description
        assert "wrong-secret" not in description and "right-password" not in description
    assert not [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_RESTARTED]


@pytest.mark.parametrize("retention_hours", [0, -24])
def test_a_retention_of_no_hours_is_refused_and_trims_nothing(
    redis_url, redis_client, schema, lake_uri, pg_instance, app_db, retention_hours
):
    """retention_hours 0 or less put the cutoff at now or later: the cleanup trimmed every drained hour of both
    streams, queries a re-run of the hour could still need, and reported success."""
    fill(redis_url, schema, HOUR_START_MS, 10)
    res = resources(redis_url, schema, lake_uri)
    dg.materialize([query_logs], resources=res, partition_key=HOUR, instance=pg_instance)
    config = {"config": {"retention_hours": retention_hours}}
    ops = {"trim_query_log": config, "trim_user_events": config}
    result = cleanup(res, pg_instance, app_db, succeed=False, ops=ops)
    message = result.failure_data_for_node("trim_query_log").error.message
    assert f"retention_hours must be at least 1, got {retention_hours}" in message
    assert len(logged_queries(redis_client, schema)) == 10


def test_a_drain_logs_its_progress_per_million_events_not_per_page(
    redis_url, redis_client, schema, lake_uri, pg_instance, monkeypatch
):
    """The drain logged 'read N events' after every page of the stream: with pages of 1,000 entries, a busy hour's
    run wrote hundreds of lines into Dagster's event log."""
    fill(redis_url, schema, HOUR_START_MS, 2000)
    pages = functools.partial(query_logs_module.read_stream_window, page=2)
    assert len(list(pages(redis_client, schema, HOUR_START_MS, HOUR_START_MS + 3_600_000))) > 2000 // 500 + 1
    monkeypatch.setattr(query_logs_module, "read_stream_window", pages)
    monkeypatch.setattr(query_logs_module, "PROGRESS_EVENTS", 500, raising=False)
    result = materialize(redis_url, schema, lake_uri, pg_instance)
    assert result.success
    lines = [e.user_message for e in pg_instance.all_logs(result.run_id) if e.user_message.startswith("read ")]
    assert len(lines) <= 2000 // 500 + 1 and lines[-1] == "read 2000 events (0 quarantined)", lines


def test_a_quarantine_that_cannot_be_written_leaves_the_hour_undrained(
    redis_url, schema, lake_uri, pg_instance, monkeypatch
):
    """query_logs was written before its quarantine: a quarantine write that failed (a full disk) left the hour
    materialized, never drained again, and the cleanup then trimmed its stream entries, the malformed ones with them
    (found by review). The quarantine goes first now: the hour stays undrained, and the retry writes both."""
    fill(redis_url, schema, HOUR_START_MS, 20)
    fill_the_disk_for(monkeypatch, "query_log_quarantine")
    failed = materialize(redis_url, schema, lake_uri, pg_instance, raise_on_error=False)
    assert not failed.success and not Lake(lake_uri).exists("query_logs", HOUR)
    assert not pg_instance.get_materialized_partitions(dg.AssetKey("query_logs"))
    monkeypatch.undo()
    again = materialize(redis_url, schema, lake_uri, pg_instance)
    assert again.success and len(Lake(lake_uri).read("query_logs", HOUR)) == 20


def test_imported_and_drained_hours_share_one_schema_so_the_folder_reads_as_one_table(
    redis_url, schema, lake_uri, pg_instance
):
    """An import wrote its empty columns (hit, latency, arm, version) as of no type, a drained hour without
    experiments its arm and version alike: a reader of the whole folder (a pyarrow dataset, pandas) failed to cast
    between them (h_qlog2)."""
    import numpy as np
    import pyarrow.dataset as ds

    from precompute_assets.storage.query_log_import import hour_rows
    from precompute_assets.storage.tables import QUERY_LOG_DRAIN

    fill(redis_url, schema, HOUR_START_MS, 10)  # no experiment: arm and version hold nothing
    assert materialize(redis_url, schema, lake_uri, pg_instance).success
    start_s = HOUR_START_MS / 1000 - 3600  # the hour before: imported
    imported = hour_rows(np.array(["ad1", "ad2"], dtype=object), np.array([start_s + 1, start_s + 2]), kind="ctr",
                         source="old.csv", partition_key=HOURLY.get_partition_key_for_timestamp, first_s=0,
                         last_s=HOUR_START_MS / 1000)  # fmt: skip
    lake = Lake(lake_uri)
    for hour, frame in imported.frames.items():
        lake.write("query_logs", hour, frame)
    table = ds.dataset(lake.path("query_logs", HOUR).rsplit("/", 1)[0], format="parquet").to_table()
    assert table.num_rows == 12 and table.schema.remove_metadata() == QUERY_LOG_DRAIN


def test_the_drain_plots_the_stream_s_footprint_and_warns_before_it_fills_maxmemory(
    redis_url, redis_client, schema, lake_uri, pg_instance
):
    """The streams have no TTL: a stream grown into ``maxmemory`` makes Redis evict version buckets instead, and
    nothing said so before readers missed. Each drain now records the stream's entries, bytes and the server's
    ``maxmemory`` as numbers, and warns above half of it."""
    from precompute_assets.defs.query_logs import stream_footprint, stream_memory_warning

    fill(redis_url, schema, HOUR_START_MS, 200)
    result = materialize(redis_url, schema, lake_uri, pg_instance)
    meta = drain_metadata(result)
    assert meta["stream_entries"].value == redis_client.xlen(schema.query_log()) > 0
    assert meta["stream_bytes"].value > 0
    assert meta["maxmemory_bytes"].value == int(redis_client.config_get("maxmemory")["maxmemory"])
    footprint = stream_footprint(redis_client, schema.query_log())
    assert stream_memory_warning(footprint, "s") is None  # a few hundred bytes of a server's maxmemory
    full = {"stream_entries": 9, "stream_bytes": 600, "maxmemory_bytes": 1000}
    assert "takes 60% of maxmemory" in stream_memory_warning(full, "s")
    assert stream_memory_warning({**full, "maxmemory_bytes": 0}, "s") is None  # no maxmemory: nothing to warn of
    assert stream_memory_warning({}, "s") is None  # a server that refused the footprint


def test_compute_logs_that_cannot_be_deleted_do_not_stop_the_others():
    """One error stopped every later delete of the cleanup, and the runs went, their logs left for good (h_diff23)."""
    from types import SimpleNamespace

    from precompute_assets.defs.query_logs import delete_compute_logs

    deleted = []

    def delete_logs(prefix):
        if prefix == ["r2"]:
            raise PermissionError("[Errno 13] Permission denied: 'storage/r2'")
        deleted.append(prefix[0])

    instance = SimpleNamespace(compute_log_manager=SimpleNamespace(delete_logs=delete_logs))
    problems: list[str] = []
    for run in ("r1", "r2", "r3"):
        delete_compute_logs(instance, run, problems)
    assert deleted == ["r1", "r3"] and len(problems) == 1 and "PermissionError" in problems[0]
