"""The user_events asset (hourly drain of the event stream, quarantine) and next_action_model, on real Redis and
PostgreSQL."""

from __future__ import annotations

import errno
from datetime import UTC, datetime

import dagster as dg
import pytest
from dagster._core.test_utils import freeze_time

from precompute_assets.defs import user_events as user_events_module
from precompute_assets.defs.partitions import DEFAULT_PARTITIONS
from precompute_assets.defs.resources import LakeResource, ModelStoreResource, ParquetIOManager, RedisResource
from precompute_assets.defs.user_events import (
    NEXT_ACTION_MODEL,
    approved_next_action_version,
    next_action_model,
    user_events,
    write_user_event_lake,
)
from precompute_assets.ml.model_store import LocalModelStore
from precompute_assets.ml.next_action import NextActionModel
from precompute_assets.serving.events import EventLogger, events_stream
from precompute_assets.storage.lake import Lake
from precompute_assets_tests.factories import fill_the_disk_for, log_client

HOUR = "2026-11-20-10:00"
HOUR_START_MS = int(datetime(2026, 11, 20, 10, tzinfo=UTC).timestamp() * 1000)
DAY = "2026-11-20"


def resources(redis_url, schema, lake_uri, models=None):
    lake = LakeResource(base_uri=lake_uri)
    out = {
        "redis": RedisResource(url=redis_url, namespace=schema.namespace),
        "io_manager": ParquetIOManager(lake=lake),
        "lake": lake,
    }
    if models is not None:
        out["model_store"] = ModelStoreResource(root=models)
    return out


def record(redis_url, schema, at_ms: int, n: int) -> None:
    logger = EventLogger(log_client(redis_url), schema, clock=lambda: at_ms)
    for i in range(n):
        logger.record_event(f"u{i % 5}", ["login", "dashboard_view", "creative_upload"][i % 3], tenant="acme",
                            entity=f"cr{i}" if i % 3 == 2 else None)  # fmt: skip
    logger.close()


def test_an_hour_is_drained_exactly_idempotently_with_quarantine(
    redis_url, redis_client, schema, lake_uri, pg_instance
):
    record(redis_url, schema, HOUR_START_MS - 1, 4)  # the hour before
    record(redis_url, schema, HOUR_START_MS, 90)
    record(redis_url, schema, HOUR_START_MS + 3_599_999, 10)
    stream, at = events_stream(schema), HOUR_START_MS + 3_599_999
    bad = [
        {"ts": str(at), "user": "u1", "action": "logout"},
        {"ts": str(at), "user": "u2", "action": "logout"},
        {"ts": str(at), "user": "u3", "action": "teleport"},
        {"ts": str(at), "action": "login"},
        {"ts": "later", "user": "u1", "action": "login"},
        {"ts": str(at), "user": "u\x01", "action": "login"},
    ]
    for i, fields in enumerate(bad):
        redis_client.xadd(stream, fields, id=f"{at}-{100 + i}")
    record(redis_url, schema, HOUR_START_MS + 3_600_000, 6)  # the hour after
    res = resources(redis_url, schema, lake_uri)
    result = dg.materialize([user_events], resources=res, partition_key=HOUR, instance=pg_instance)
    assert result.success
    lake = Lake(lake_uri)
    events = lake.read("user_events", HOUR)
    assert len(events) == 100 and set(events["tenant"]) == {"acme"}
    assert events["ts_ms"].between(HOUR_START_MS, HOUR_START_MS + 3_599_999).all()
    meta = result.asset_materializations_for_node("user_events")
    by_key = {m.asset_key.path[-1]: m.metadata for m in meta}
    assert by_key["user_events"]["dagster/row_count"].value == 100
    assert by_key["user_events"]["unknown_actions"].value == 3
    assert by_key["user_events"]["unknown_action_names"].value == {"logout": 2, "teleport": 1}
    assert by_key["user_events"]["quarantined"].value == 6
    assert by_key["user_event_quarantine"]["reasons"].value == {
        "unknown action": 3, "missing field user": 1, "ts is not an integer": 1, "user contains control characters": 1,
    }  # fmt: skip
    quarantine = lake.read("user_event_quarantine", HOUR)
    assert len(quarantine) == 6 and "logout" in quarantine["raw"].iloc[0]
    (check,) = result.get_asset_check_evaluations()
    assert not check.passed and check.severity == dg.AssetCheckSeverity.ERROR  # 6 of 106 is above 5 %

    again = dg.materialize([user_events], resources=res, partition_key=HOUR, instance=pg_instance)
    assert again.success and lake.read("user_events", HOUR).equals(events)


def test_user_ids_of_bytes_that_are_no_utf8_are_quarantined_not_merged(redis_url, schema, lake_uri, pg_instance):
    """``record_event(b"\\xff\\xfe", ...)`` and ``(b"\\xfe\\xff", ...)`` were decoded with U+FFFD: two users became one
    valid user of two U+FFFD, never quarantined, while a str user with a lone surrogate was (h_user2)."""
    logger = EventLogger(log_client(redis_url), schema, clock=lambda: HOUR_START_MS + 5)
    for user in (b"\xff\xfe", b"\xfe\xff", "u\ud800", b"ok"):
        logger.record_event(user, "login", tenant="acme")
    logger.close()
    assert logger.stats.dropped == 0
    result = dg.materialize([user_events], resources=resources(redis_url, schema, lake_uri), partition_key=HOUR,
                            instance=pg_instance)  # fmt: skip
    by_key = {m.asset_key.path[-1]: m.metadata for m in result.asset_materializations_for_node("user_events")}
    assert by_key["user_event_quarantine"]["reasons"].value == {"user is not valid UTF-8": 3}
    assert Lake(lake_uri).read("user_events", HOUR)["user"].tolist() == ["ok"]


def test_an_hour_of_many_chunks_is_drained_whole_and_in_order(
    monkeypatch, redis_url, redis_client, schema, lake_uri, pg_instance
):
    monkeypatch.setattr(user_events_module, "ROWS_PER_CHUNK", 7)  # rows become columns 7 at a time
    record(redis_url, schema, HOUR_START_MS + 5, 100)
    res = resources(redis_url, schema, lake_uri)
    assert dg.materialize([user_events], resources=res, partition_key=HOUR, instance=pg_instance).success
    events = Lake(lake_uri).read("user_events", HOUR)
    streamed = [entry_id.decode() for entry_id, _ in redis_client.xrange(events_stream(schema))]
    assert events["stream_id"].tolist() == streamed and len(streamed) == 100


def test_rematerializing_an_hour_the_stream_lost_keeps_the_good_partition(
    redis_url, redis_client, schema, lake_uri, pg_instance
):
    record(redis_url, schema, HOUR_START_MS + 10, 30)
    res = resources(redis_url, schema, lake_uri)
    assert dg.materialize([user_events], resources=res, partition_key=HOUR, instance=pg_instance).success
    events = Lake(lake_uri).read("user_events", HOUR)
    redis_client.delete(events_stream(schema))  # Redis restarted without persistence (or MAXLEN ~ trimmed it)

    again = dg.materialize([user_events], resources=res, partition_key=HOUR, instance=pg_instance, raise_on_error=False)
    assert not again.success
    assert "no longer holds 30 of its 30 events" in again.get_step_failure_events()[0].step_failure_data.error.message
    assert Lake(lake_uri).read("user_events", HOUR).equals(events)  # not replaced by an empty hour


def test_the_first_drain_after_redis_lost_the_event_stream_says_so_with_counts(
    redis_url, redis_client, schema, lake_uri, pg_instance
):
    """As query_logs': the hour after a loss held only what was logged after it, and its drain said nothing."""
    import logging

    next_hour = "2026-11-20-11:00"
    res = resources(redis_url, schema, lake_uri)
    record(redis_url, schema, HOUR_START_MS + 10, 30)
    assert dg.materialize([user_events], resources=res, partition_key=HOUR, instance=pg_instance).success
    record(redis_url, schema, HOUR_START_MS + 3_660_000, 12)  # 11:01, then Redis restarts without persistence
    redis_client.delete(events_stream(schema))
    record(redis_url, schema, HOUR_START_MS + 5_400_000, 9)  # 11:30
    result = dg.materialize([user_events], resources=res, partition_key=next_hour, instance=pg_instance)
    assert result.success and len(Lake(lake_uri).read("user_events", next_hour)) == 9  # what is left, kept
    warnings = [e.user_message for e in pg_instance.all_logs(result.run_id) if e.level == logging.WARNING]
    assert warnings == [
        f"the stream lost every event logged after partition {HOUR} (its 30 events) was drained: this hour holds "
        "only the 9 events logged after the loss, the first at 2026-11-20 11:30:00 UTC"
    ], warnings
    meta = {m.asset_key.path[-1]: m.metadata for m in result.asset_materializations_for_node("user_events")}
    assert meta["user_events"]["stream_lost"].value.startswith("the stream lost every event")


def test_a_drain_after_our_own_trim_warns_of_no_loss(redis_url, redis_client, schema, lake_uri, pg_instance):
    """The cleanup trims the event stream too, but kept no marker: a drain whose previous drained hour our trim had
    removed warned "the stream lost every event" (found by review). The trim records its boundary, as for queries."""
    import logging

    from precompute_assets.serving.querylog import trim_stream_before

    next_hour = "2026-11-20-11:00"
    res = resources(redis_url, schema, lake_uri)
    record(redis_url, schema, HOUR_START_MS + 10, 30)
    assert dg.materialize([user_events], resources=res, partition_key=HOUR, instance=pg_instance).success
    record(redis_url, schema, HOUR_START_MS + 5_400_000, 9)  # 11:30
    boundary = HOUR_START_MS + 3_600_000  # the cleanup's trim of the drained hour, as trim_user_events records it
    redis_client.set(schema.events_trimmed(), boundary)
    trim_stream_before(redis_client, events_stream(schema), f"{boundary}-0")
    result = dg.materialize([user_events], resources=res, partition_key=next_hour, instance=pg_instance)
    assert result.success and len(Lake(lake_uri).read("user_events", next_hour)) == 9
    assert not [e for e in pg_instance.all_logs(result.run_id) if e.level == logging.WARNING]


def test_next_action_model_beats_its_baselines_and_is_approved(tmp_path, pg_instance):
    lake_uri, models = str(tmp_path / "lake"), str(tmp_path / "models")
    days = DEFAULT_PARTITIONS.days_ending(DAY, 7)
    n = write_user_event_lake(Lake(lake_uri), days)
    config = {"ops": {NEXT_ACTION_MODEL: {"config": {"training_days": 7, "n_estimators": 40}}}}
    res = {"lake": LakeResource(base_uri=lake_uri), "model_store": ModelStoreResource(root=models)}
    result = dg.materialize([next_action_model], resources=res, partition_key=DAY, instance=pg_instance,
                            run_config=config)  # fmt: skip
    assert result.success
    meta = result.asset_materializations_for_node(NEXT_ACTION_MODEL)[0].metadata
    assert meta["events"].value == n and meta["approved"].value is True
    for name in ("top1", "top3", "log_loss", "most_frequent_top1", "most_frequent_log_loss", "markov1_top1",
                 "markov1_top3", "markov1_log_loss"):  # fmt: skip
        assert isinstance(meta[name].value, float), name
    assert meta["log_loss"].value < min(meta["markov1_log_loss"].value, meta["most_frequent_log_loss"].value)
    (check,) = result.get_asset_check_evaluations()
    assert check.passed and check.metadata["best_baseline"].value == "markov1"
    version = approved_next_action_version(pg_instance)
    assert version == meta["model_version"].value
    model = LocalModelStore(models).load(NEXT_ACTION_MODEL, version)  # checksummed by the store
    assert isinstance(model, NextActionModel)


def test_the_run_log_says_what_next_action_model_trained_on_in_numbers(tmp_path, pg_instance):
    lake_uri = str(tmp_path / "lake")
    n = write_user_event_lake(Lake(lake_uri), DEFAULT_PARTITIONS.days_ending(DAY, 7))
    config = {"ops": {NEXT_ACTION_MODEL: {"config": {"training_days": 7, "n_estimators": 20}}}}
    res = {"lake": LakeResource(base_uri=lake_uri), "model_store": ModelStoreResource(root=str(tmp_path / "models"))}
    result = dg.materialize([next_action_model], resources=res, partition_key=DAY, instance=pg_instance,
                            run_config=config)  # fmt: skip
    meta = result.asset_materializations_for_node(NEXT_ACTION_MODEL)[0].metadata
    (line,) = [e.user_message for e in pg_instance.all_logs(result.run_id) if e.user_message.startswith("trained ")]
    assert (
        f"on {meta['training_rows'].value:,} rows of {n:,} events ({meta['validation_rows'].value:,} held back)" in line
    )
    assert f"top-1 {meta['top1'].value:.3f}, top-3 {meta['top3'].value:.3f}, log-loss " in line and "{" not in line


def test_a_full_model_store_deletes_the_versions_past_retention_even_when_the_days_save_fails(
    tmp_path, pg_instance, monkeypatch
):
    """As ctr_model: the old versions go before the day's save, which a full disk fails, so the next night has room."""
    lake_uri, models = str(tmp_path / "lake"), str(tmp_path / "models")
    write_user_event_lake(Lake(lake_uri), DEFAULT_PARTITIONS.days_ending(DAY, 7))
    LocalModelStore(models).save(NEXT_ACTION_MODEL, "2026-09-01.0123abcd", {"weights": [1.0]}, {})

    def disk_full(self, name, version, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(LocalModelStore, "save", disk_full)
    config = {"ops": {NEXT_ACTION_MODEL: {"config": {"training_days": 7, "n_estimators": 10}}}}
    res = {"lake": LakeResource(base_uri=lake_uri), "model_store": ModelStoreResource(root=models)}
    result = dg.materialize([next_action_model], resources=res, partition_key=DAY, instance=pg_instance,
                            run_config=config, raise_on_error=False)  # fmt: skip
    assert not result.success
    assert result.get_step_failure_events()[0].step_failure_data.error.cause.cls_name == "OSError"
    assert LocalModelStore(models).versions(NEXT_ACTION_MODEL) == []


def test_without_enough_events_no_model_is_approved(tmp_path, pg_instance):
    res = {"lake": LakeResource(base_uri=str(tmp_path / "lake")), "model_store": ModelStoreResource(root=str(tmp_path))}
    result = dg.materialize([next_action_model], resources=res, partition_key=DAY, instance=pg_instance,
                            raise_on_error=False)  # fmt: skip
    (check,) = result.get_asset_check_evaluations()
    assert not check.passed and "no model trained" in check.description
    assert approved_next_action_version(pg_instance) is None


@pytest.mark.parametrize("n", [0])
def test_an_empty_hour_is_an_empty_partition(redis_url, schema, lake_uri, pg_instance, n):
    result = dg.materialize([user_events], resources=resources(redis_url, schema, lake_uri), partition_key=HOUR,
                            instance=pg_instance)  # fmt: skip
    assert result.success and len(Lake(lake_uri).read("user_events", HOUR)) == n
    (check,) = result.get_asset_check_evaluations()
    assert check.passed


def test_an_hour_not_over_on_redis_clock_is_not_read(redis_url, redis_client, schema, lake_uri, pg_instance):
    """As query_logs': on a Dagster host whose clock runs ahead, the hour in progress on Redis is offered as over. The
    drain read it and marked it materialized while users still acted in it: their later events were in no partition,
    and trimmed (found by review). It fails now, writing nothing."""
    seconds = int(redis_client.time()[0])
    next_hour = seconds - seconds % 3600 + 3600  # over an hour ahead on Redis's clock: never waited for
    hour = DEFAULT_PARTITIONS.hourly.get_partition_key_for_timestamp(next_hour)
    with freeze_time(next_hour + 3600 + 300):
        result = dg.materialize([user_events], resources=resources(redis_url, schema, lake_uri), partition_key=hour,
                                instance=pg_instance, raise_on_error=False)  # fmt: skip
    assert not result.success
    failure = result.get_step_failure_events()[0].step_failure_data.error.message
    assert f"partition {hour} is not over on Redis's clock" in failure
    assert not Lake(lake_uri).exists("user_events", hour)


def test_a_quarantine_that_cannot_be_written_leaves_the_hour_undrained(
    redis_url, schema, lake_uri, pg_instance, monkeypatch
):
    """The events were written before their quarantine: a quarantine write that failed left the hour materialized,
    which is never drained again and whose stream entries the cleanup trims, its rejected events with them (found by
    review). The quarantine goes first now: the hour stays undrained, and the retry writes both."""
    record(redis_url, schema, HOUR_START_MS, 20)
    fill_the_disk_for(monkeypatch, "user_event_quarantine")
    failed = dg.materialize([user_events], resources=resources(redis_url, schema, lake_uri), partition_key=HOUR,
                            instance=pg_instance, raise_on_error=False)  # fmt: skip
    assert not failed.success and not Lake(lake_uri).exists("user_events", HOUR)
    assert not pg_instance.get_materialized_partitions(dg.AssetKey("user_events"))
    monkeypatch.undo()
    again = dg.materialize([user_events], resources=resources(redis_url, schema, lake_uri), partition_key=HOUR,
                           instance=pg_instance)  # fmt: skip
    assert again.success and len(Lake(lake_uri).read("user_events", HOUR)) == 20
