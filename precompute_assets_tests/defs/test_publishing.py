"""ctr_cache: publishing a day's predictions from the lake, and going back to an earlier day."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from precompute_assets.defs.partitions import DEFAULT_PARTITIONS
from precompute_assets.defs.publishing import ctr_cache
from precompute_assets.defs.resources import LakeResource, ParquetIOManager, RedisResource
from precompute_assets.serving import Pointer
from precompute_assets.serving.admission import Probation
from precompute_assets.serving.cache import PredictionCache
from precompute_assets.serving.connection import connect
from precompute_assets.storage.lake import Lake

GOOD, BAD = "2026-11-18", "2026-11-19"


def run_ctr_cache(
    instance, lake_uri: str, redis_url: str, namespace: str, day: str, *, raise_on_error: bool = True, **config
) -> dg.ExecuteInProcessResult:
    lake = LakeResource(base_uri=lake_uri)
    return dg.materialize(
        [dg.AssetSpec("ctr_predictions", partitions_def=DEFAULT_PARTITIONS.daily), ctr_cache],
        selection=[ctr_cache],
        partition_key=day,
        instance=instance,
        resources={
            "lake": lake,
            "io_manager": ParquetIOManager(lake=lake),
            "redis": RedisResource(url=redis_url, namespace=namespace),
        },
        run_config={"ops": {"ctr_cache": {"config": config}}},
        raise_on_error=raise_on_error,
    )


def publish(instance, lake_uri: str, redis_url: str, namespace: str, day: str, **config) -> dict:
    result = run_ctr_cache(instance, lake_uri, redis_url, namespace, day, **config)
    return {k: v.value for k, v in result.asset_materializations_for_node("ctr_cache")[0].metadata.items()}


def health_ticks(instance, resources: dict):
    """A tick of cache_health on ``instance``: the check evaluations it reported, stored as the daemon stores them."""
    from precompute_assets.defs.automation import build_cache_health_sensor

    sensor = build_cache_health_sensor("UTC")

    def tick() -> list[dg.AssetCheckEvaluation]:
        with dg.build_sensor_context(instance=instance, resources=resources) as context:
            result = sensor(context)
        evaluations = result.asset_events if isinstance(result, dg.SensorResult) else []
        for evaluation in evaluations:
            instance.report_runless_asset_event(evaluation)
        return evaluations

    return tick


def test_a_rollback_hands_none_of_the_bad_days_values_to_probations_live_tier(
    lake_uri, redis_url, redis_client, schema
):
    """After a flip, probation's settling copies the keys the version before served and the new one drops into the
    live tier with that version's values. Going back from a bad day is such a flip: it once kept serving the bad
    day's predictions of the keys the earlier day lacks, as live values, for the readers' whole live TTL."""
    lake = Lake(lake_uri)
    lake.write("ctr_predictions", GOOD, pd.DataFrame({"ad_id": ["a1", "a2"], "ctr": [0.1, 0.2], "model_version": "m"}))
    lake.write("ctr_predictions", BAD, pd.DataFrame({"ad_id": ["a1", "b1"], "ctr": [0.9, 0.9], "model_version": "m"}))
    reader = PredictionCache(
        connect(redis_url, socket_timeout=5), schema=schema, pointer_ttl_s=0, admission=Probation(capacity=10)
    )
    assert reader.get_or_compute("ctr", "x", lambda key: 0.5) == 0.5  # a probation reader: publishes settle its tier
    with dg.instance_for_test() as instance:
        assert publish(instance, lake_uri, redis_url, schema.namespace, GOOD)["published"]
        bad = publish(instance, lake_uri, redis_url, schema.namespace, BAD)
        assert bad["published"] and bad["handed_over"] == 1  # a2, which the new day drops: a good day's value
        back = publish(instance, lake_uri, redis_url, schema.namespace, GOOD, rollback=True)
    assert back["published"] and back["previous_version"] == bad["version"] and back["handed_over"] == 0
    assert not redis_client.exists(schema.live("ctr", "b1"))  # the bad day's value is gone with its version's grace
    assert reader.get("ctr", "b1") is None and reader.get("ctr", "a1") == pytest.approx(0.1) and reader.errors == 0


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"ttl_hours": 0}, "ttl_hours must be from 1 to 277777777777, got 0"),
        ({"grace_seconds": -1}, "grace_seconds must be from 0 to 1000000000000000, got -1"),
        # Past what Redis's EXPIRE takes: the step failed after its flip, and each retry again.
        ({"grace_seconds": 10**16}, "grace_seconds must be from 0 to 1000000000000000, got 10000000000000000"),
        ({"ttl_hours": 10**13}, "ttl_hours must be from 1 to 277777777777, got 10000000000000"),
    ],
)
def test_a_bad_ttl_or_grace_is_refused_in_one_line_without_retries(
    lake_uri, redis_url, redis_client, schema, config, message
):
    """ttl_hours 0 made Redis delete every bucket as it was written: the step failed as if Redis had evicted them
    ("give Redis more memory") and was retried three times with the same config."""
    Lake(lake_uri).write("ctr_predictions", GOOD, pd.DataFrame({"ad_id": ["a1"], "ctr": [0.1], "model_version": "m"}))
    with dg.instance_for_test() as instance:
        result = run_ctr_cache(instance, lake_uri, redis_url, schema.namespace, GOOD, raise_on_error=False, **config)
    failure = result.failure_data_for_node("ctr_cache")
    assert not result.success and failure is not None and failure.user_failure_data.description == message
    assert not [event for event in result.all_events if event.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY]
    assert redis_client.get(schema.pointer("ctr")) is None


def test_a_lost_ctr_version_fails_ctr_caches_check_until_it_is_published_again(lake_uri, redis_url, redis_client,
                                                                                schema):  # fmt: skip
    """After Redis lost its data, ctr_cache stayed green in the UI: nothing on the asset said that the version its
    materialization published was gone. cache_health now reports its served_by_redis check whenever the verdict
    changes, and the check can be executed from the UI too."""
    from precompute_assets.defs.publishing import SERVED_CHECK, SERVED_CHECKS

    Lake(lake_uri).write("ctr_predictions", GOOD, pd.DataFrame({"ad_id": ["a1"], "ctr": [0.1], "model_version": "m"}))
    resources = {"redis": RedisResource(url=redis_url, namespace=schema.namespace)}
    with dg.instance_for_test() as instance:
        tick = health_ticks(instance, resources)

        def executed() -> dg.AssetCheckResult:
            (check,) = [c for c in SERVED_CHECKS if c.check_keys == {dg.AssetCheckKey(dg.AssetKey("ctr_cache"),
                                                                                        SERVED_CHECK)}]  # fmt: skip
            return check(dg.build_asset_check_context(instance=instance, resources=resources))

        assert tick() == []  # nothing published: nothing to report
        version = publish(instance, lake_uri, redis_url, schema.namespace, GOOD)["version"]
        assert tick() == [] and executed().passed
        redis_client.unlink(schema.pointer("ctr"))  # the namespace's share of a restart without persistence
        (lost,) = tick()
        assert lost.asset_key == dg.AssetKey("ctr_cache") and lost.check_name == SERVED_CHECK and not lost.passed
        assert lost.severity == dg.AssetCheckSeverity.ERROR and version in lost.description, lost.description
        assert lost.target_materialization_data is not None
        assert not executed().passed
        assert tick() == []  # reported once, not every 5 minutes
        redis_client.delete(*redis_client.keys(f"{schema.prefix}:ctr:*"))
        publish(instance, lake_uri, redis_url, schema.namespace, GOOD)
        (served,) = tick()
        assert served.passed and tick() == []
        latest = instance.event_log_storage.get_latest_asset_check_execution_by_key([lost.asset_check_key])
        assert latest[lost.asset_check_key].status.value == "SUCCEEDED"


def test_a_run_that_failed_before_its_publish_leaves_the_served_check_no_verdict_for_long(
    lake_uri, redis_url, redis_client, schema
):
    """A daily run that failed before ctr_cache published left served_by_redis planned and never evaluated: the UI
    showed it red, "Execution failed", while Redis served the version, and cache_health, which compared the verdict
    with the last one stored, reported nothing until a later run evaluated the check. It reports one at once."""
    from precompute_assets.defs.publishing import SERVED_CHECK, SERVED_CHECKS

    Lake(lake_uri).write("ctr_predictions", GOOD, pd.DataFrame({"ad_id": ["a1"], "ctr": [0.1], "model_version": "m"}))
    resources = {"redis": RedisResource(url=redis_url, namespace=schema.namespace)}
    key = dg.AssetCheckKey(dg.AssetKey("ctr_cache"), SERVED_CHECK)
    (check,) = [c for c in SERVED_CHECKS if c.check_keys == {key}]
    with dg.instance_for_test() as instance:
        tick = health_ticks(instance, resources)
        assert publish(instance, lake_uri, redis_url, schema.namespace, GOOD)["published"] and tick() == []
        lake = LakeResource(base_uri=lake_uri)
        failed = dg.materialize(  # the next day's run: no predictions in the lake, so ctr_cache fails
            [dg.AssetSpec("ctr_predictions", partitions_def=DEFAULT_PARTITIONS.daily), ctr_cache, check],
            selection=dg.AssetSelection.assets(ctr_cache),
            partition_key=BAD,
            instance=instance,
            resources={"lake": lake, "io_manager": ParquetIOManager(lake=lake), **resources},
            raise_on_error=False,
        )
        assert not failed.success
        latest = instance.event_log_storage.get_latest_asset_check_execution_by_key([key])[key]
        assert latest.status.value == "PLANNED" and latest.run_id == failed.run_id  # no verdict: "Execution failed"
        (served,) = tick()
        assert served.passed and served.asset_check_key == key and tick() == []  # reported once
        latest = instance.event_log_storage.get_latest_asset_check_execution_by_key([key])[key]
        assert latest.status.value == "SUCCEEDED"


def test_ctr_buckets_expired_under_their_pointer_fail_the_check_and_show_in_status(
    lake_uri, redis_url, redis_client, schema
):
    """The pointer has no TTL, a version's buckets expire ttl_hours after its publish: when no publish came for two
    days, the pointer named a version whose values were gone, and served_by_redis and `precompute status`, which
    looked at the pointer only, said Redis served it. An empty version (read-through only) has no bucket to lose."""
    from precompute_assets.defs.publishing import SERVED_CHECK, SERVED_CHECKS, lost_publishes

    ids = [f"ad{i:03d}" for i in range(200)]
    Lake(lake_uri).write("ctr_predictions", GOOD, pd.DataFrame({"ad_id": ids, "ctr": 0.1, "model_version": "m"}))
    Lake(lake_uri).write("ctr_predictions", BAD, pd.DataFrame({"ad_id": [], "ctr": [], "model_version": []}))
    resources = {"redis": RedisResource(url=redis_url, namespace=schema.namespace)}
    (check,) = [c for c in SERVED_CHECKS if c.check_keys == {dg.AssetCheckKey(dg.AssetKey("ctr_cache"), SERVED_CHECK)}]
    with dg.instance_for_test() as instance:

        def served() -> dg.AssetCheckResult:
            return check(dg.build_asset_check_context(instance=instance, resources=resources))

        version = publish(instance, lake_uri, redis_url, schema.namespace, GOOD)["version"]
        pointer = Pointer.decode(redis_client.get(schema.pointer("ctr")))
        assert pointer.buckets == 4 and served().passed and lost_publishes(instance, redis_client, schema) == []
        # their 48 hours are over (Redis deletes the expired buckets); the pointer, which has no TTL, stays
        redis_client.delete(*(schema.bucket("ctr", version, index) for index in range(pointer.buckets)))
        assert redis_client.exists(schema.pointer("ctr"))
        result = served()
        assert not result.passed and f"names version {version}, whose values are gone" in result.description
        (line,) = lost_publishes(instance, redis_client, schema)
        assert line.startswith(f"ctr: Redis's ctr pointer names version {version}, whose values are gone"), line

        empty = publish(instance, lake_uri, redis_url, schema.namespace, BAD)
        assert empty["published"] and empty["keys_written"] == 0 and "model_version" not in empty
        assert not redis_client.exists(schema.bucket("ctr", empty["version"], 0))  # no bucket: none lost
        assert served().passed and lost_publishes(instance, redis_client, schema) == []


def test_a_version_past_its_ttl_is_stale_not_restored_and_another_version_served_fails_the_check(
    lake_uri, redis_url, redis_client, schema, monkeypatch
):
    """ttl_hours did not bound how stale served predictions got: buckets expired under their pointer were "lost",
    and the restore published the same day again with a fresh 48 h, every 48 h while the nightly publish failed. And
    served_by_redis stayed green while the pointer named another, older version (a failover to a replica that missed
    the flip): readers got it without a word (h_feast). A version past its TTL stays expired, the check says why; a
    restore before then keeps the expiry the publish set; a pointer naming another version fails the check."""
    from types import SimpleNamespace

    from precompute_assets.defs import publishing
    from precompute_assets.defs.automation import restore_request
    from precompute_assets.defs.publishing import RestoreConfig, lost_publishes, recorded_publish, served_state

    ids = [f"ad{i:03d}" for i in range(100)]
    Lake(lake_uri).write("ctr_predictions", GOOD, pd.DataFrame({"ad_id": ids, "ctr": 0.1, "model_version": "m"}))
    with dg.instance_for_test() as instance:
        published = datetime.now(UTC)
        meta = publish(instance, lake_uri, redis_url, schema.namespace, GOOD, ttl_hours=2)
        version, expires_at = meta["version"], meta["expires_at"]
        assert abs(expires_at - (published.timestamp() + 2 * 3600)) < 60
        recorded = recorded_publish(instance, "ctr")
        assert recorded.expires_at == expires_at
        # a restore an hour after the publish gives the buckets the hour left, not a fresh ttl_hours (the expiry is
        # set from when the publish starts writing, a moment after `published`: on a loaded machine, seconds after)
        hour_later = published.timestamp() + 3600
        assert 3599 <= publishing.restored_ttl_s(RestoreConfig(), recorded, hour_later) <= 3660

        pointer = Pointer.decode(redis_client.get(schema.pointer("ctr")))
        redis_client.delete(*(schema.bucket("ctr", version, index) for index in range(pointer.buckets)))
        assert isinstance(
            restore_request(instance, redis_client, schema, published + timedelta(hours=1)), dg.RunRequest
        )
        past = published + timedelta(hours=3)  # its TTL ended: expired as configured, not lost
        assert restore_request(instance, redis_client, schema, past) is None
        # nor minutes before its end: the restored buckets would expire as they are written (h_diff8), as the check
        # says (h_diff9)
        soon = published + timedelta(minutes=115)
        assert restore_request(instance, redis_client, schema, soon) is None
        monkeypatch.setattr(publishing, "time", SimpleNamespace(time=lambda: soon.timestamp()))
        assert "too soon to restore it" in served_state(instance, redis_client, schema, "ctr")[1]
        monkeypatch.undo()
        monkeypatch.setattr(publishing, "time", SimpleNamespace(time=lambda: past.timestamp()))
        passed, said, _ = served_state(instance, redis_client, schema, "ctr")
        assert not passed and f"version {version} expired at " in said and "no newer one was published" in said
        (line,) = lost_publishes(instance, redis_client, schema)
        assert "expired at" in line
        monkeypatch.undo()

        publish(instance, lake_uri, redis_url, schema.namespace, GOOD)  # served again
        assert served_state(instance, redis_client, schema, "ctr")[0]
        older = Pointer(f"{BAD}.0123456789abcdef", 1)  # a failover back to a replica that missed the flip, say
        publishing.publish_version(redis_client, "ctr", older.version, [("ad000", 0.5)], n_keys=1, schema=schema)
        passed, said, _ = served_state(instance, redis_client, schema, "ctr")
        assert not passed and f"names version {older.version}, not {version}" in said
        (line,) = lost_publishes(instance, redis_client, schema)
        assert f"names version {older.version}" in line


def test_cache_health_restores_the_ctr_version_served_under_an_operators_rollback_without_traffic(
    lake_uri, redis_url, redis_client, schema
):
    """cache_health refreshed only after 200 ctr requests in the hour: after a loss with no traffic, ctr stayed lost
    until the night. And its refresh (yesterday's graph, retrained) would publish another version, or be refused while
    an operator's rollback holds the bad day back. The version served comes back as it was; the hold stays."""
    from dagster._core.test_utils import create_run_for_test

    from precompute_assets.defs.automation import build_cache_health_sensor, restore_request
    from precompute_assets.defs.publishing import ctr_restore_job, rolled_back_over

    ids = [f"ad{i:03d}" for i in range(150)]
    lake = Lake(lake_uri)
    lake.write("ctr_predictions", GOOD, pd.DataFrame({"ad_id": ids, "ctr": 0.25, "model_version": "m"}))
    lake.write("ctr_predictions", BAD, pd.DataFrame({"ad_id": ids, "ctr": 0.75, "model_version": "m"}))
    redis_resource = RedisResource(url=redis_url, namespace=schema.namespace)
    reader = PredictionCache(connect(redis_url, socket_timeout=5), schema=schema, pointer_ttl_s=0)
    with dg.instance_for_test() as instance:

        def tick() -> list[dg.RunRequest]:
            with dg.build_sensor_context(instance=instance, resources={"redis": redis_resource}) as context:
                result = build_cache_health_sensor("UTC")(context)
            return result.run_requests if isinstance(result, dg.SensorResult) else []

        def restore(request: dg.RunRequest) -> dg.ExecuteInProcessResult:
            """The run the daemon launches for ``request``."""
            resources = {"lake": LakeResource(base_uri=lake_uri), "redis": redis_resource}
            tags = {**request.tags, "dagster/run_key": request.run_key}
            return ctr_restore_job.execute_in_process(
                instance=instance, resources=resources, tags=tags, raise_on_error=False
            )

        good = publish(instance, lake_uri, redis_url, schema.namespace, GOOD)["version"]
        publish(instance, lake_uri, redis_url, schema.namespace, BAD)
        assert publish(instance, lake_uri, redis_url, schema.namespace, GOOD, rollback=True)["version"] == good
        assert rolled_back_over(instance) == BAD and tick() == []

        redis_client.delete(*redis_client.keys(f"{schema.prefix}:ctr:*"))  # a restart without persistence
        assert reader.get_many("ctr", ids[:3]) == [None] * 3
        (request,) = tick()  # no traffic at all
        assert request.job_name == "ctr_restore_job" and request.run_key.startswith(f"ctr-restore-{good}-")
        assert "Redis holds no ctr version" in request.tags["precompute/reason"]
        # while a restore runs, the sensor waits for it: judged meanwhile, a low hit rate requested a refresh too
        running = create_run_for_test(instance, job_name="ctr_restore_job", status=dg.DagsterRunStatus.STARTED)
        waiting = restore_request(instance, redis_client, schema, datetime.now(UTC))
        assert isinstance(waiting, dg.SkipReason) and running.run_id[:8] in waiting.skip_message
        instance.delete_run(running.run_id)
        assert restore(request).success
        assert reader.get_many("ctr", ids) == pytest.approx([0.25] * len(ids))  # the day rolled back to, not BAD
        assert rolled_back_over(instance) == BAD and tick() == []  # the hold stays: BAD is not published by itself
        assert not publish(instance, lake_uri, redis_url, schema.namespace, BAD)["published"]

        # buckets expired under the pointer: the missing ones are written back
        pointer = Pointer.decode(redis_client.get(schema.pointer("ctr")))
        redis_client.delete(*(schema.bucket("ctr", good, index) for index in range(pointer.buckets)))
        (request,) = tick()
        assert "whose values are gone" in request.tags["precompute/reason"]
        run = restore(request)
        assert run.success and reader.get_many("ctr", ids) == pytest.approx([0.25] * len(ids))
        (observation,) = [e for e in run.all_events if e.event_type == dg.DagsterEventType.ASSET_OBSERVATION]
        assert observation.event_specific_data.asset_observation.metadata["keys_written"].value == len(ids)

        # predictions of that day that changed since its publish are not what was served: nothing is restored
        lake.write("ctr_predictions", GOOD, pd.DataFrame({"ad_id": ids, "ctr": 0.5, "model_version": "m2"}))
        redis_client.delete(*redis_client.keys(f"{schema.prefix}:ctr:*"))
        (request,) = tick()
        run = restore(request)
        (failure,) = [e for e in run.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
        assert "changed since its publish" in failure.step_failure_data.user_failure_data.description
        assert redis_client.get(schema.pointer("ctr")) is None and reader.get("ctr", ids[0]) is None
        assert tick() == []  # not every 5 minutes: an hour after the failed one (the hit rate is judged meanwhile)
        later = restore_request(instance, redis_client, schema, datetime.now(UTC) + timedelta(minutes=61))
        assert later is not None and later.run_key != request.run_key
        redis_client.set(schema.pointer("ctr"), b"garbage")  # not ours: a restore fails at once, without retries
        run = restore(later)
        (failure,) = [e for e in run.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
        assert "ctr pointer is not one we wrote" in failure.step_failure_data.user_failure_data.description
        assert redis_client.get(schema.pointer("ctr")) == b"garbage"
        # a restore refuses such a pointer, or one naming another version whose values are gone, every time: none is
        # requested, not even an hour after the failed one (the hit rate decides on a refresh, served_by_redis tells)
        hours_later = datetime.now(UTC) + timedelta(hours=3)
        assert restore_request(instance, redis_client, schema, hours_later) is None
        redis_client.set(schema.pointer("ctr"), Pointer(f"{BAD}.0123456789abcdef", 4).encode())
        assert restore_request(instance, redis_client, schema, hours_later) is None
        redis_client.delete(schema.pointer("ctr"))  # gone: restorable again
        assert isinstance(restore_request(instance, redis_client, schema, hours_later), dg.RunRequest)
    reader.close()


def test_the_last_publish_is_found_behind_any_number_of_refused_runs_and_restored(
    lake_uri, redis_url, redis_client, schema
):
    """A backfill of 25 older days is refused day by day (a newer day is current): the search for the version to
    restore looked at the newest 20 materializations only, found none, and nothing was ever restored (h_ctr)."""
    from precompute_assets.defs.automation import restore_request
    from precompute_assets.defs.publishing import recorded_publish

    lake = Lake(lake_uri)
    lake.write("ctr_predictions", GOOD, pd.DataFrame({"ad_id": ["a1"], "ctr": [0.25], "model_version": "m"}))
    older = [f"2026-10-{day:02d}" for day in range(1, 26)]
    for day in older:
        lake.write("ctr_predictions", day, pd.DataFrame({"ad_id": ["a1"], "ctr": [0.5], "model_version": "m"}))
    with dg.instance_for_test() as instance:
        good = publish(instance, lake_uri, redis_url, schema.namespace, GOOD)["version"]
        assert not any(publish(instance, lake_uri, redis_url, schema.namespace, day)["published"] for day in older)
        redis_client.delete(*redis_client.keys(f"{schema.prefix}:ctr:*"))  # a restart without persistence
        assert recorded_publish(instance, "ctr").version == good
        request = restore_request(instance, redis_client, schema, datetime.now(UTC))
        assert isinstance(request, dg.RunRequest) and request.run_key.startswith(f"ctr-restore-{good}-")


def test_a_rollback_re_run_after_the_replaced_versions_grace_still_holds_the_bad_day(
    lake_uri, redis_url, redis_client, schema
):
    """A rollback whose flip landed and whose run failed, re-run once the replaced version's grace (and its record,
    ``{kind}:previous``) ended: it found no day it replaced, recorded no hold, and the next refresh published the bad
    day again (h_ctr). The day it replaced is now also read from Dagster's record of the publishes."""
    from precompute_assets.defs.publishing import content_version, rolled_back_over
    from precompute_assets.serving import publish_version

    lake = Lake(lake_uri)
    good_rows = pd.DataFrame({"ad_id": ["a1", "a2"], "ctr": [0.1, 0.2], "model_version": "m"})
    lake.write("ctr_predictions", GOOD, good_rows)
    lake.write("ctr_predictions", BAD, pd.DataFrame({"ad_id": ["a1"], "ctr": [0.9], "model_version": "m"}))
    with dg.instance_for_test() as instance:
        good = publish(instance, lake_uri, redis_url, schema.namespace, GOOD)["version"]
        assert good == content_version(GOOD, good_rows, None)
        bad = publish(instance, lake_uri, redis_url, schema.namespace, BAD)["version"]
        items = zip(good_rows["ad_id"], good_rows["ctr"], strict=True)  # the rollback's flip, then its run failed
        publish_version(redis_client, "ctr", good, items, n_keys=2, schema=schema, grace_s=1, hand_over=False)
        redis_client.delete(schema.previous("ctr"))  # its grace ended
        again = publish(instance, lake_uri, redis_url, schema.namespace, GOOD, rollback=True)
        assert again["already_current"] and again["rolled_back_over"] == BAD == rolled_back_over(instance)
        assert not publish(instance, lake_uri, redis_url, schema.namespace, BAD)["published"]
        assert Pointer.decode(redis_client.get(schema.pointer("ctr"))).version == good != bad
        # a plain re-run of the day rolled back to says it is current, not that it was rolled back (h_ops3)
        run = run_ctr_cache(instance, lake_uri, redis_url, schema.namespace, GOOD)
        said = [entry.user_message for entry in instance.all_logs(run.run_id) if "not published" in entry.user_message]
        assert said == [f"not published: {GOOD}'s version {good} is current, the day an operator rolled {BAD} back to; "
                        "config rollback: true publishes it again"], said  # fmt: skip


def test_a_version_whose_days_model_a_re_run_rejected_is_not_restored(lake_uri, redis_url, redis_client, schema):
    """The newest ctr_model materialization of a day is its verdict: once a re-run failed beats_baseline, the day's
    predictions are not served again by a restore (h_ctr); the hit rate decides on a refresh."""
    from precompute_assets.defs.automation import restore_request
    from precompute_assets.defs.publishing import ctr_restore_job

    predictions = pd.DataFrame({"ad_id": ["a1"], "ctr": [0.25], "model_version": f"{GOOD}.aaaaaaaa"})
    Lake(lake_uri).write("ctr_predictions", GOOD, predictions)
    redis_resource = RedisResource(url=redis_url, namespace=schema.namespace)
    resources = {"lake": LakeResource(base_uri=lake_uri), "redis": redis_resource}
    with dg.instance_for_test() as instance:
        verdict = {"model_version": f"{GOOD}.aaaaaaaa", "approved": True}
        instance.report_runless_asset_event(dg.AssetMaterialization("ctr_model", partition=GOOD, metadata=verdict))
        good = publish(instance, lake_uri, redis_url, schema.namespace, GOOD)["version"]
        redis_client.delete(*redis_client.keys(f"{schema.prefix}:ctr:*"))
        assert isinstance(restore_request(instance, redis_client, schema, datetime.now(UTC)), dg.RunRequest)
        rejected = {"model_version": f"{GOOD}.bbbbbbbb", "approved": False}
        instance.report_runless_asset_event(dg.AssetMaterialization("ctr_model", partition=GOOD, metadata=rejected))
        assert restore_request(instance, redis_client, schema, datetime.now(UTC)) is None
        run = ctr_restore_job.execute_in_process(instance=instance, resources=resources, raise_on_error=False)
        (failure,) = [e for e in run.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
        description = failure.step_failure_data.user_failure_data.description
        assert description == (f"ctr version {good} is not restored: its day's ctr_model {GOOD}.bbbbbbbb failed "
                               "beats_baseline since")  # fmt: skip
        assert redis_client.get(schema.pointer("ctr")) is None


def test_ctr_cache_publishes_only_the_days_approved_model_and_never_over_a_newer_day_redis_lost(
    lake_uri, redis_url, redis_client, schema
):
    """ctr_cache published whatever predictions the lake held: a day whose ctr_model a re-run rejected since, and,
    once Redis lost its pointer, an older day over the newer one Dagster had recorded, after which cache_health never
    restored the newer day (h_graph)."""
    lake = Lake(lake_uri)
    made_by = f"{GOOD}.aaaaaaaa"
    lake.write("ctr_predictions", GOOD, pd.DataFrame({"ad_id": ["a1"], "ctr": [0.1], "model_version": made_by}))
    lake.write("ctr_predictions", BAD, pd.DataFrame({"ad_id": ["a1"], "ctr": [0.2], "model_version": "m"}))
    with dg.instance_for_test() as instance:

        def verdict(version: str, approved: bool) -> None:
            metadata = {"model_version": version, "approved": approved}
            instance.report_runless_asset_event(dg.AssetMaterialization("ctr_model", partition=GOOD, metadata=metadata))

        verdict(made_by, False)  # a re-run of the day's model failed beats_baseline
        with pytest.raises(dg.Failure, match=f"ctr_model {made_by} of {GOOD} failed beats_baseline since"):
            publish(instance, lake_uri, redis_url, schema.namespace, GOOD)
        verdict(f"{GOOD}.bbbbbbbb", True)  # a newer approved model: these predictions are not its
        with pytest.raises(dg.Failure, match="made by ctr_model .*aaaaaaaa, and the day's approved ctr_model is"):
            publish(instance, lake_uri, redis_url, schema.namespace, GOOD)
        verdict(made_by, True)
        assert publish(instance, lake_uri, redis_url, schema.namespace, GOOD)["published"]
        newer = publish(instance, lake_uri, redis_url, schema.namespace, BAD)["version"]  # BAD is the later day
        redis_client.delete(schema.pointer("ctr"))  # Redis lost it
        older = publish(instance, lake_uri, redis_url, schema.namespace, GOOD)
        assert not older["published"] and older["current_version"] == newer
        assert publish(instance, lake_uri, redis_url, schema.namespace, GOOD, rollback=True)["published"]


def test_publishing_the_day_rolled_back_to_again_keeps_the_hold_on_the_bad_day(
    lake_uri, redis_url, redis_client, schema
):
    """After a rollback, the day rolled back to published again (its predictions fixed) with ``rollback: true``, as
    the hold requires, recorded no hold: a plain run of the bad day then published it (h_diff7)."""
    from precompute_assets.defs.publishing import rolled_back_over

    lake = Lake(lake_uri)
    lake.write("ctr_predictions", GOOD, pd.DataFrame({"ad_id": ["a1"], "ctr": [0.1], "model_version": "m"}))
    lake.write("ctr_predictions", BAD, pd.DataFrame({"ad_id": ["a1"], "ctr": [0.9], "model_version": "m"}))
    with dg.instance_for_test() as instance:
        publish(instance, lake_uri, redis_url, schema.namespace, GOOD)
        bad = publish(instance, lake_uri, redis_url, schema.namespace, BAD)["version"]
        assert publish(instance, lake_uri, redis_url, schema.namespace, GOOD, rollback=True)["rolled_back_over"] == BAD
        lake.write("ctr_predictions", GOOD, pd.DataFrame({"ad_id": ["a1"], "ctr": [0.2], "model_version": "m"}))
        fixed = publish(instance, lake_uri, redis_url, schema.namespace, GOOD, rollback=True)
        assert fixed["published"] and fixed["rolled_back_over"] == BAD == rolled_back_over(instance)
        assert not publish(instance, lake_uri, redis_url, schema.namespace, BAD)["published"]
        assert Pointer.decode(redis_client.get(schema.pointer("ctr"))).version == fixed["version"] != bad
        again = publish(instance, lake_uri, redis_url, schema.namespace, BAD, rollback=True)  # the operator's call
        assert again["published"] and "rolled_back_over" not in again and rolled_back_over(instance) is None


def test_a_restored_version_redis_evicts_again_is_not_restored_every_tick(lake_uri, redis_server, schema):
    """At ``maxmemory`` with a volatile policy a restore that succeeded was evicted again and requested again at the
    next tick, every 5 minutes, each one evicting other keys: now an hour after such a restore (the hit rate is judged
    meanwhile), as after a failed one. Keys lost without an eviction (a restart, a FLUSHALL) are restored at once."""
    from dagster._core.test_utils import create_run_for_test

    from precompute_assets.defs.automation import restore_request
    from precompute_assets.defs.publishing import ctr_restore_job
    from precompute_assets.defs.runs import SERVER_MARK_TAG

    server = redis_server(extra_config=("maxmemory-policy volatile-lru",))
    client = connect(server.url, socket_timeout=5)
    ids = [f"ad{i:03d}" for i in range(50)]
    Lake(lake_uri).write("ctr_predictions", GOOD, pd.DataFrame({"ad_id": ids, "ctr": 0.25, "model_version": "m"}))
    redis_resource = RedisResource(url=server.url, namespace=schema.namespace)
    resources = {"lake": LakeResource(base_uri=lake_uri), "redis": redis_resource}
    with dg.instance_for_test() as instance:
        publish(instance, lake_uri, server.url, schema.namespace, GOOD)
        client.delete(*client.keys(f"{schema.prefix}:ctr:*"))
        request = restore_request(instance, client, schema, datetime.now(UTC))
        tags = {**request.tags, "dagster/run_key": request.run_key}
        run = ctr_restore_job.execute_in_process(instance=instance, resources=resources, tags=tags)
        assert SERVER_MARK_TAG in instance.get_run_by_id(run.run_id).tags
        client.delete(*client.keys(f"{schema.prefix}:ctr:*"))  # lost without an eviction: at once
        assert isinstance(restore_request(instance, client, schema, datetime.now(UTC)), dg.RunRequest)
        client.config_set("maxmemory", 4 << 20)
        used = client.info("memory")["used_memory"]
        client.config_set("maxmemory", used + (1 << 20))  # room for about 1 MB more
        for i in range(40):  # 4 MB of volatile keys: the version's buckets go too
            client.set(f"{schema.prefix}:filler:{i}", b"x" * 100_000, ex=3600)
        assert client.info("stats")["evicted_keys"] > 0
        assert restore_request(instance, client, schema, datetime.now(UTC)) is None
        an_hour_later = datetime.now(UTC) + timedelta(minutes=61)
        assert isinstance(restore_request(instance, client, schema, an_hour_later), dg.RunRequest)
        create_run_for_test(instance, job_name=ctr_restore_job.name, status=dg.DagsterRunStatus.SUCCESS)
        assert isinstance(restore_request(instance, client, schema, datetime.now(UTC)), dg.RunRequest)  # no mark
    client.close()


def test_what_an_operator_invalidated_stays_out_of_a_restore_after_redis_lost_its_data(
    lake_uri, redis_url, redis_client, schema, dagster_pg_url, tmp_path, monkeypatch, capsys
):
    """Redis keeps the record of what `cache invalidate` took out of a version beside it, and lost it with its data:
    the restore that followed wrote the invalidated values back (h_ops3). The command now also keeps the record in
    Dagster's storage, and the restore (and a publish of the version again) gives it back to Redis first."""
    from precompute_assets.defs.automation import restore_request
    from precompute_assets.defs.publishing import ctr_restore_job
    from precompute_assets.storage.postgres import scratch_database
    from precompute_assets.tools.cli import main

    ids = [f"ad{i:03d}" for i in range(150)]
    Lake(lake_uri).write("ctr_predictions", GOOD, pd.DataFrame({"ad_id": ids, "ctr": 0.25, "model_version": "m"}))
    reader = PredictionCache(connect(redis_url, socket_timeout=5), schema=schema, pointer_ttl_s=0)
    with scratch_database(dagster_pg_url, "dagster") as url:
        home = tmp_path / "dagster_home"
        home.mkdir()
        (home / "dagster.yaml").write_text(f"storage:\n  postgres:\n    postgres_url: {url}\n")
        monkeypatch.setenv("DAGSTER_HOME", str(home))
        monkeypatch.setenv("PRECOMPUTE_REDIS_URL", redis_url)
        with dg.DagsterInstance.from_config(str(home)) as instance:
            good = publish(instance, lake_uri, redis_url, schema.namespace, GOOD)["version"]
            ns = ["--namespace", schema.namespace]
            assert main(["cache", "invalidate", "--kind", "ctr", "--key", "ad007", *ns]) == 0
            redis_client.delete(schema.invalidated("ctr", good))  # evicted at maxmemory: ad007 stays kept (h_diff23)
            assert main(["cache", "invalidate", "--kind", "ctr", "--prefix", "ad01", *ns]) == 0
            assert "recorded in Redis only" not in capsys.readouterr().err
            gone = ["ad007", *(f"ad01{i}" for i in range(10))]
            assert reader.get_many("ctr", gone) == [None] * 11

            redis_client.delete(*redis_client.keys(f"{schema.prefix}:*"))  # a restart without persistence
            request = restore_request(instance, redis_client, schema, datetime.now(UTC))
            resources = {"lake": LakeResource(base_uri=lake_uri),
                         "redis": RedisResource(url=redis_url, namespace=schema.namespace)}  # fmt: skip
            assert ctr_restore_job.execute_in_process(instance=instance, resources=resources, tags=request.tags).success
            assert reader.get_many("ctr", gone) == [None] * 11
            kept = [key for key in ids if key not in gone]
            assert reader.get_many("ctr", kept) == pytest.approx([0.25] * len(kept))
            # a publish of the day again after another loss leaves them out too
            redis_client.delete(*redis_client.keys(f"{schema.prefix}:*"))
            assert publish(instance, lake_uri, redis_url, schema.namespace, GOOD)["version"] == good
            assert reader.get_many("ctr", gone) == [None] * 11 and reader.get("ctr", "ad100") == pytest.approx(0.25)
    reader.close()


def test_a_restore_whose_predictions_the_lake_lost_fails_once_and_says_what_to_restore(
    lake_uri, redis_url, redis_client, schema, tmp_path
):
    """A lake restored from an older backup: the restore failed with FileNotFoundError's traceback, retried first by
    its policy though no retry brings the file back; and a model store restored so printed a KeyError (h_ops3)."""
    from precompute_assets.defs.automation import restore_request
    from precompute_assets.defs.publishing import ctr_restore_job
    from precompute_assets.defs.resources import ModelStoreResource

    lake = Lake(lake_uri)
    lake.write("ctr_predictions", GOOD, pd.DataFrame({"ad_id": ["a1", "a2"], "ctr": 0.25, "model_version": "m"}))
    with dg.instance_for_test() as instance:
        publish(instance, lake_uri, redis_url, schema.namespace, GOOD)
        redis_client.delete(*redis_client.keys(f"{schema.prefix}:ctr:*"))  # a restart without persistence
        (Path(lake_uri) / "ctr_predictions" / f"{GOOD}.parquet").unlink()  # and a lake from before that day
        request = restore_request(instance, redis_client, schema, datetime.now(UTC))
        resources = {"lake": LakeResource(base_uri=lake_uri),
                     "redis": RedisResource(url=redis_url, namespace=schema.namespace)}  # fmt: skip
        result = ctr_restore_job.execute_in_process(instance=instance, resources=resources, tags=request.tags,
                                                    raise_on_error=False)  # fmt: skip
        assert not result.success
        events = [e.event_type_value for e in result.all_events]
        assert "STEP_UP_FOR_RETRY" not in events
        (failure,) = result.get_step_failure_events()
        message = failure.step_failure_data.user_failure_data.description
        assert message.startswith("nothing restored: ") and "restore the lake (PRECOMPUTE_LAKE_URI)" in message
    with pytest.raises(dg.Failure) as raised:
        ModelStoreResource(root=str(tmp_path / "models")).load("ctr_model", "2026-11-18.abc")
    assert "version '2026-11-18.abc' not found in store" in raised.value.description
    assert "restore the model store (PRECOMPUTE_MODEL_STORE)" in raised.value.description
    assert not raised.value.allow_retries


def test_a_publisher_that_may_not_read_the_record_writes_the_version_whole_with_a_warning(redis_client, schema, caplog):
    """A publisher user made before the record (no SMEMBERS) failed every restore and publish of a version an operator
    had invalidated keys of, retried three times (h_diff23); as before the kept record, it writes the version whole."""
    import logging

    import redis

    from precompute_assets.defs import invalidations

    with dg.instance_for_test() as instance:
        invalidations.keep(instance, "ctr_cache", "2026-11-18.v", ["k:a1"])
        assert invalidations.keep(instance, "ctr_cache", "2026-11-18.v", ["k:a1", "p:b"]) == 1  # only what is new
        assert invalidations.kept(instance, "ctr_cache", "2026-11-18.v") == ["k:a1", "p:b"]

        def refused(*args, **kwargs):
            raise redis.exceptions.NoPermissionError("User pub has no permissions to run the 'smembers' command")

        log = logging.getLogger("test_give_back")
        with pytest.MonkeyPatch.context() as patch, caplog.at_level("WARNING", logger="test_give_back"):
            patch.setattr(invalidations, "remember", refused)
            given = invalidations.give_back(instance, redis_client, schema, asset="ctr_cache", kind="ctr",
                                            version="2026-11-18.v", n_keys=10, log=log)  # fmt: skip
        assert given == 0
        assert any(
            "not given back" in r.message and "precompute redis acl --apply" in r.message for r in caplog.records
        )
