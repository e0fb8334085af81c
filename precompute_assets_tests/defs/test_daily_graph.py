"""The daily graph on real Redis + PostgreSQL: selection, model, predictions, publish, and their checks."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest

from precompute_assets.defs.models import beats_baseline_check, ctr_model, new_ads_check
from precompute_assets.defs.partitions import Partitions
from precompute_assets.defs.predictions import ctr_predictions
from precompute_assets.defs.publishing import ctr_cache
from precompute_assets.defs.resources import (
    ExperimentResource,
    LakeResource,
    ModelStoreResource,
    ParquetIOManager,
    RedisResource,
)
from precompute_assets.defs.selection import (
    ad_demand,
    logged_trace,
    published_share,
    self_tuned_share,
    share_ranking,
    top_ads,
    traffic_profile,
)
from precompute_assets.defs.sources import ad_impressions, ads
from precompute_assets.ml.ctr import CtrModel, NewAdEvaluation
from precompute_assets.ml.features import AdFeatureSpec
from precompute_assets.ml.model_store import LocalModelStore
from precompute_assets.ml.replay import shards_keep
from precompute_assets.serving import Experiment, PredictionCache, connect
from precompute_assets.serving.keys import Pointer, arm_of
from precompute_assets.storage.lake import Lake
from precompute_assets_tests.factories import write_ad_platform, write_query_logs

DAYS = ["2026-11-16", "2026-11-17", "2026-11-18"]
GRAPH = [ads, ad_impressions, traffic_profile, ad_demand, top_ads, ctr_model, ctr_predictions, ctr_cache]


@pytest.fixture(scope="module")
def platform_template(tmp_path_factory) -> str:
    """Three days of ad traffic, generated once per module and copied into each test's lake."""
    root = tmp_path_factory.mktemp("platform")
    write_ad_platform(Lake(str(root)), DAYS)
    return str(root)


@pytest.fixture
def platform(platform_template, lake_uri) -> Lake:
    shutil.copytree(platform_template, lake_uri)
    return Lake(lake_uri)


@pytest.fixture
def resources(redis_url, schema, lake_uri, tmp_path):
    lake = LakeResource(base_uri=lake_uri)
    return {
        "redis": RedisResource(url=redis_url, namespace=schema.namespace),
        "lake": lake,
        "model_store": ModelStoreResource(root=str(tmp_path / "models")),
        "experiment": ExperimentResource(),
        "io_manager": ParquetIOManager(lake=lake),
    }


def run(resources, instance, *, top_n: int = 50, day: str = DAYS[-1], selection=None, **top_ads_config):
    return dg.materialize(
        GRAPH,
        selection=selection,
        resources=resources,
        partition_key=day,
        instance=instance,
        run_config={"ops": {"top_ads": {"config": {"top_n": top_n, **top_ads_config}}}},
        raise_on_error=False,
    )


def materialized(result, name: str) -> bool:
    return bool(result.asset_materializations_for_node(name))


def check(result, name: str) -> dg.AssetCheckEvaluation:
    return next(c for c in result.get_asset_check_evaluations() if c.check_name == name)


def test_whole_graph_publishes_predictions_readers_can_get(
    resources, pg_instance, platform, lake_uri, redis_url, schema
):
    result = run(resources, pg_instance)
    assert result.success
    top = Lake(lake_uri).read("top_ads", DAYS[-1])
    assert len(top) == 50 and list(top["rank"]) == list(range(1, 51))
    model_meta = result.asset_materializations_for_node("ctr_model")[0].metadata
    assert 0.5 < model_meta["auc"].value <= 1 and model_meta["auc"].value >= model_meta["baseline_auc"].value
    assert model_meta["auc"].value >= model_meta["ad_history_auc"].value  # approved: it beats both baselines
    assert 0 <= model_meta["ad_history_auc"].value <= 1 and model_meta["ad_history_log_loss"].value > 0
    publish = result.asset_materializations_for_node("ctr_cache")[0].metadata
    assert publish["keys_written"].value == 50
    assert publish["handed_over"].value == 0 and "settle_error" not in publish  # no probation client yet
    assert "previous_version" not in publish  # the first publish: the UI showed a blank value
    assert publish["model_version"].value == model_meta["model_version"].value
    cache = PredictionCache(connect(redis_url, socket_timeout=5), schema=schema)
    predictions = Lake(lake_uri).read("ctr_predictions", DAYS[-1]).set_index("ad_id")["ctr"]
    first = top["ad_id"].iloc[0]
    assert cache.get("ctr", first) == pytest.approx(predictions[first], rel=1e-6)
    profile = result.asset_materializations_for_node("traffic_profile")[0].metadata
    assert profile["offpeak_start_hour"].value in (1, 2, 3)  # the workload's trough is around 04:00 UTC


def test_a_full_model_store_deletes_the_versions_past_retention_even_when_the_days_save_fails(
    resources, pg_instance, platform, tmp_path, monkeypatch
):
    """Retention deleted old versions only after the day's save: once the model store's disk was full, every night's
    ctr_model failed at its save before deleting anything, so the store never had room again."""
    store = LocalModelStore(tmp_path / "models")
    old = "2026-09-01.0123abcd"  # a version of a day long past retention, never approved
    store.save("ctr_model", old, {"weights": [1.0]}, {})

    def disk_full(self, name, version, *args, **kwargs):
        raise OSError(errno.ENOSPC, f"No space left on device: {name}/{version}")

    monkeypatch.setattr(LocalModelStore, "save", disk_full)
    result = dg.materialize(GRAPH, selection=[ctr_model], resources=resources, partition_key=DAYS[-1],
                            instance=pg_instance, raise_on_error=False)  # fmt: skip
    assert not result.success and not materialized(result, "ctr_model")
    cause = result.get_step_failure_events()[0].step_failure_data.error.cause
    assert cause.cls_name == "OSError" and "No space left on device" in cause.message
    assert store.versions("ctr_model") == []  # the next night's save has the room the old version held


def test_retention_never_deletes_the_version_of_a_run_still_going(resources, pg_instance, platform, tmp_path):
    """A backfill run of an old day trains its ctr_model, then waits for top_ads (demand_model trains first) before
    ctr_predictions loads that version: the nightly run's retention deleted it meanwhile (its day is past retention),
    and the backfill run failed with "model not found"."""
    from dagster._core.test_utils import create_run_for_test

    store = LocalModelStore(tmp_path / "models")
    backfill = create_run_for_test(pg_instance, job_name="__ASSET_JOB", status=dg.DagsterRunStatus.STARTED)
    finished = create_run_for_test(pg_instance, job_name="__ASSET_JOB", status=dg.DagsterRunStatus.SUCCESS)
    going, done = f"2026-09-01.{backfill.run_id[:8]}", f"2026-09-02.{finished.run_id[:8]}"
    for version in (going, done):
        store.save("ctr_model", version, {"weights": [1.0]}, {})
    result = dg.materialize(GRAPH, selection=[ctr_model], resources=resources, partition_key=DAYS[-1],
                            instance=pg_instance)  # fmt: skip
    assert result.asset_materializations_for_node("ctr_model")[0].metadata["versions_pruned"].value == 1
    assert going in store.versions("ctr_model") and done not in store.versions("ctr_model")


def test_the_model_reports_cold_start_auc_beside_its_overall_auc(resources, pg_instance, platform, tmp_path):
    result = run(resources, pg_instance)
    assert result.success
    meta = result.asset_materializations_for_node("ctr_model")[0].metadata
    # The synthetic workload launches ads on later days: the last day's new ads have no training rows.
    assert meta["new_ads"].value > 0 and meta["new_ad_impressions"].value > 0
    assert 0.5 < meta["new_ad_auc"].value <= 1 and 0.5 < meta["baseline_new_ad_auc"].value <= 1
    assert "new_ad_auc_note" not in meta
    assert meta["feature_spec"].value == {"numeric": ["quality", "bid", "text_len"], "categorical": ["category"],
                                          "log_scaled": ["bid", "text_len"]}  # fmt: skip
    assert meta["category_values"].value == {"category": [str(c) for c in sorted(range(20), key=str)]}
    cold = check(result, "new_ads_beat_baseline")
    assert cold.severity == dg.AssetCheckSeverity.WARN
    assert cold.passed == (meta["new_ad_auc"].value >= meta["baseline_new_ad_auc"].value)
    assert cold.metadata["new_ad_auc"].value == meta["new_ad_auc"].value
    spec = next(s for s in ctr_model.check_specs if s.name == "new_ads_beat_baseline")
    assert not spec.blocking
    # The stored artifact carries the spec and vocabularies the predictions were made with.
    model = LocalModelStore(tmp_path / "models").load("ctr_model", meta["model_version"].value)
    assert isinstance(model, CtrModel) and model.spec == AdFeatureSpec()
    assert len(model.encoder.vocabularies["category"]) == 20


def test_the_model_says_what_it_fits_before_the_fit(resources, pg_instance, platform):
    # At millions of (ad, day) rows the forest's fit takes minutes, and the step said nothing until it ended.
    result = run(resources, pg_instance)
    assert result.success
    logs = pg_instance.all_logs(result.run_id)
    said = [i for i, entry in enumerate(logs) if entry.user_message.startswith("fitting 100 trees (depth 12) on ")]
    events = [(i, entry.dagster_event) for i, entry in enumerate(logs) if entry.dagster_event is not None]
    materialized = [i for i, event in events if event.is_step_materialization and event.step_key == "ctr_model"]
    assert len(said) == 1 and said[0] < materialized[0]
    message = logs[said[0]].user_message
    assert "(ad, day) rows of" in message and "impressions over 3 days" in message and "rows held back" in message


def test_the_gate_blocks_a_forest_that_beats_the_logistic_regression_but_not_the_ads_own_history():
    forest, logistic, history = {"auc": 0.70}, {"auc": 0.66}, {"auc": 0.72}
    lost = beats_baseline_check(forest, {"baseline": logistic, "ad_history": history}, None)
    assert not lost.passed and lost.severity == dg.AssetCheckSeverity.ERROR
    assert lost.description == "AUC 0.7000 vs logistic regression 0.6600, ad history 0.7200, chance 0.5000"
    assert lost.metadata["best_baseline"].value == "ad_history"
    assert lost.metadata["auc_lift"].value == pytest.approx(-0.02)
    assert lost.metadata["baseline_auc"].value == 0.66 and lost.metadata["ad_history_auc"].value == 0.72
    won = beats_baseline_check({"auc": 0.73}, {"baseline": logistic, "ad_history": history}, None)
    assert won.passed and won.metadata["auc_lift"].value == pytest.approx(0.01)
    # a few clicks without signal: a forest worse than chance beat baselines worse still, and was approved (h_ctr)
    noise = beats_baseline_check({"auc": 0.4932}, {"baseline": {"auc": 0.4258}, "ad_history": {"auc": 0.4584}}, None)
    assert not noise.passed and noise.metadata["best_baseline"].value == "chance"
    assert noise.metadata["auc_lift"].value == pytest.approx(-0.0068)
    tie = beats_baseline_check({"auc": 0.5}, {"baseline": {"auc": 0.45}, "ad_history": {"auc": 0.5}}, None)
    assert not tie.passed  # a constant forest ties chance: it beats nothing


def test_new_ads_check_warns_when_the_forest_loses_and_passes_with_a_note_when_unmeasurable():
    lost = new_ads_check(NewAdEvaluation(auc=0.61, baseline_auc=0.65, ads=40, impressions=900), None)
    assert not lost.passed and lost.severity == dg.AssetCheckSeverity.WARN
    assert lost.metadata["new_ad_auc_lift"].value == pytest.approx(-0.04)
    assert "0.6100 vs baseline 0.6500 on the 40 ads" in lost.description
    assert new_ads_check(NewAdEvaluation(0.7, 0.65, 40, 900), None).passed
    unmeasured = new_ads_check(NewAdEvaluation(None, None, 0, 0, "no ads first seen after the cutoff"), None)
    assert unmeasured.passed and unmeasured.description == "not measured: no ads first seen after the cutoff"
    # The UI showed the NaN AUCs of an unmeasured day as empty values: they are left out, and the note says why.
    assert "new_ad_auc" not in unmeasured.metadata and "baseline_new_ad_auc" not in unmeasured.metadata
    assert unmeasured.metadata["new_ad_auc_note"].value == "no ads first seen after the cutoff"
    assert unmeasured.metadata["new_ads"].value == 0


def test_a_users_own_ad_columns_train_and_publish(resources, pg_instance, platform, lake_uri, redis_url, schema):
    own = platform.read("ads").rename(columns={"quality": "score", "category": "segment"})
    own["segment"] = "seg-" + own["segment"].astype(str)  # text categories
    own = own.drop(columns=["bid", "text_len"])
    platform.write("ads", None, own)
    configured = {**resources, "lake": LakeResource(base_uri=lake_uri, ad_numeric="score", ad_categorical="segment")}
    configured["io_manager"] = ParquetIOManager(lake=configured["lake"])
    result = run(configured, pg_instance)
    assert result.success
    meta = result.asset_materializations_for_node("ctr_model")[0].metadata
    assert meta["feature_spec"].value == {"numeric": ["score"], "categorical": ["segment"], "log_scaled": []}
    assert all(v.startswith("seg-") for v in meta["category_values"].value["segment"])
    assert meta["n_features"].value == 1 + len(meta["category_values"].value["segment"])
    first = Lake(lake_uri).read("top_ads", DAYS[-1])["ad_id"].iloc[0]
    assert 0 < PredictionCache(connect(redis_url, socket_timeout=5), schema=schema).get("ctr", first) < 1


def test_a_spec_naming_a_column_the_ads_lack_trains_nothing(resources, pg_instance, platform, lake_uri, redis_client,
                                                            schema):  # fmt: skip
    configured = {**resources, "lake": LakeResource(base_uri=lake_uri, ad_categorical="category,brand")}
    result = run(configured, pg_instance)
    gate = check(result, "beats_baseline")
    assert not gate.passed and "ads table is missing columns ['brand']" in gate.description
    assert "PRECOMPUTE_AD_CATEGORICAL" in gate.description  # where the feature set is configured
    cold = check(result, "new_ads_beat_baseline")
    assert not cold.passed and cold.severity == dg.AssetCheckSeverity.WARN and "no model trained" in cold.description
    assert not materialized(result, "ctr_predictions") and not materialized(result, "ctr_cache")
    assert redis_client.get(schema.pointer("ctr")) is None


def test_empty_day_blocks_everything_downstream(resources, pg_instance, lake_uri, redis_client, schema):
    lake = Lake(lake_uri)
    write_ad_platform(lake, DAYS[:2])
    write_query_logs(lake, DAYS[-1], [])
    result = run(resources, pg_instance)
    check = [c for c in result.get_asset_check_evaluations() if c.check_name == "has_traffic"][0]
    assert not check.passed and "no prediction queries" in check.description
    assert not materialized(result, "top_ads") and not materialized(result, "ctr_cache")
    assert redis_client.get(schema.pointer("ctr")) is None


def test_unknown_ads_are_counted_and_never_published(resources, pg_instance, platform, lake_uri):
    ghosts = [f"ghost{i}" for i in range(40)]
    for day in DAYS:  # a lot of traffic for ads the catalog does not know
        write_query_logs(platform, day, ghosts * 20, append=True)
    result = run(resources, pg_instance)
    check = [c for c in result.get_asset_check_evaluations() if c.check_name == "known_ads"][0]
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
    assert check.metadata["unknown_ads"].value == 40
    assert result.success  # a warning does not block
    published = Lake(lake_uri).read("ctr_predictions", DAYS[-1])
    assert not set(published["ad_id"]) & set(ghosts)


def test_single_ad_day_fails_the_model_check_and_publishes_nothing(
    resources, pg_instance, lake_uri, redis_client, schema
):
    lake = Lake(lake_uri)
    ads_table = write_ad_platform(lake, DAYS, n_ads=1, queries_per_day=500)
    assert len(ads_table) == 1
    result = run(resources, pg_instance)
    check = [c for c in result.get_asset_check_evaluations() if c.check_name == "beats_baseline"][0]
    assert not check.passed and "no model trained" in check.description
    assert not materialized(result, "ctr_predictions") and not materialized(result, "ctr_cache")
    assert redis_client.get(schema.pointer("ctr")) is None


def test_ads_with_missing_features_are_skipped_and_counted(resources, pg_instance, platform, lake_uri):
    broken = platform.read("ads")
    popular = platform.read("ad_impressions", DAYS[-1])["ad_id"].value_counts().index[:5]
    broken.loc[broken["ad_id"].isin(popular), "quality"] = float("nan")
    platform.write("ads", None, broken)
    result = run(resources, pg_instance, top_n=300)
    assert result.success
    model_meta = result.asset_materializations_for_node("ctr_model")[0].metadata
    assert model_meta["ads_missing_features"].value > 0
    pred_meta = result.asset_materializations_for_node("ctr_predictions")[0].metadata
    scored = len(Lake(lake_uri).read("ctr_predictions", DAYS[-1]))
    assert pred_meta["skipped_ads"].value + scored == len(Lake(lake_uri).read("top_ads", DAYS[-1]))
    assert pred_meta["skipped_ads"].value > 0


def test_publish_failure_keeps_the_previous_version(
    resources, pg_instance, platform, redis_client, schema, monkeypatch
):
    assert ctr_cache.op.retry_policy is not None and ctr_cache.op.retry_policy.max_retries >= 1
    # The same retried publish without the policy's back-off (5 s, 10 s, 20 s), which in-process runs wait out.
    monkeypatch.setattr(
        ctr_cache.op, "_retry_policy", dg.RetryPolicy(max_retries=ctr_cache.op.retry_policy.max_retries)
    )
    assert run(resources, pg_instance).success
    before = redis_client.get(schema.pointer("ctr"))
    dead = {**resources, "redis": RedisResource(url="redis://127.0.0.1:1/0", namespace=schema.namespace, retries=0)}
    result = dg.materialize(
        GRAPH, selection=[ctr_cache], resources=dead, partition_key=DAYS[-1], instance=pg_instance, raise_on_error=False
    )
    assert not result.success
    restarts = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_RESTARTED]
    assert len(restarts) == ctr_cache.op.retry_policy.max_retries  # every retry failed too
    assert redis_client.get(schema.pointer("ctr")) == before


@pytest.mark.parametrize("policy", ["noeviction", "volatile-lru"])
def test_a_full_redis_fails_the_publish_naming_its_memory_and_policy(
    resources, pg_instance, platform, redis_server, schema, monkeypatch, policy
):
    """A production server at its maxmemory with the policy noeviction refused the publish with redis-py's bare
    "command not allowed when used memory > 'maxmemory'", naming neither the setting nor the policy to change. Under
    volatile-lru with nothing left to evict, Redis refuses it alike, and the advice was the policy it already had."""
    assert run(resources, pg_instance).success  # the predictions to publish are in the lake
    monkeypatch.setattr(ctr_cache.op, "_retry_policy", dg.RetryPolicy(max_retries=1))
    server = redis_server(extra_config=(f"maxmemory-policy {policy}",))
    admin = connect(server.url, socket_timeout=5)
    admin.config_set("maxmemory", 1)  # our own test server: full at once
    full = {**resources, "redis": RedisResource(url=server.url, namespace=schema.namespace)}
    result = dg.materialize(
        GRAPH, selection=[ctr_cache], resources=full, partition_key=DAYS[-1], instance=pg_instance, raise_on_error=False
    )
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    description = failure.step_failure_data.user_failure_data.description
    assert description.startswith("nothing published: the Redis of PRECOMPUTE_REDIS_URL is out of memory")
    assert f"maxmemory-policy {policy}" in description, description
    if policy == "noeviction":
        assert "or the policy volatile-lru" in description, description
    else:
        assert "Nothing is left that volatile-lru may evict" in description, description
        assert "or the policy volatile-lru" not in description, description
    assert admin.get(schema.pointer("ctr")) is None and admin.config_get("maxmemory-policy") == {
        "maxmemory-policy": policy
    }  # nothing flipped, and the server's configuration is the operator's
    admin.close()


def test_publishing_the_same_predictions_again_records_the_current_version(
    resources, pg_instance, platform, lake_uri, redis_client, schema
):
    """A re-execution of a run that failed after its flip (Dagster's storage was down when the step ended) must not
    publish the day a second time: the version is named by what it serves, so the same predictions are found current."""
    assert run(resources, pg_instance).success
    first = Pointer.decode(redis_client.get(schema.pointer("ctr")))

    def publish() -> dict:
        result = dg.materialize(GRAPH, selection=[ctr_cache], resources=resources, partition_key=DAYS[-1],
                                instance=pg_instance)  # fmt: skip
        return {k: v.value for k, v in result.asset_materializations_for_node("ctr_cache")[0].metadata.items()}

    again = publish()
    assert again["version"] == first.version and again["already_current"] is True
    assert again["keys_written"] == 0 and "keys_per_s" not in again  # nothing was written: no throughput to plot
    assert Pointer.decode(redis_client.get(schema.pointer("ctr"))) == first
    lake = Lake(lake_uri)
    changed = lake.read("ctr_predictions", DAYS[-1])
    changed.loc[changed.index[0], "ctr"] = 0.5 if changed["ctr"].iloc[0] != 0.5 else 0.25
    lake.write("ctr_predictions", DAYS[-1], changed.iloc[::-1])  # row order alone would not name a new version
    other = publish()
    assert other["version"] != first.version and other["already_current"] is False
    assert other["keys_written"] == len(changed) and other["keys_per_s"] > 0
    assert other["version"].startswith(f"{DAYS[-1]}.") and other["previous_version"] == first.version


def test_an_operator_can_go_back_to_an_earlier_days_predictions(
    resources, pg_instance, platform, lake_uri, redis_url, schema
):
    """After a bad publish, yesterday's version has expired (its grace is minutes): the way back is to publish
    yesterday's predictions again, which a plain re-run refuses (an older day) and ``rollback: true`` does."""
    assert run(resources, pg_instance, day=DAYS[-2]).success
    assert run(resources, pg_instance, day=DAYS[-1]).success
    cache = PredictionCache(connect(redis_url, socket_timeout=5), schema=schema, pointer_ttl_s=0)

    def publish(**config) -> dict:
        run_config = {"ops": {"ctr_cache": {"config": config}}}
        result = dg.materialize(GRAPH, selection=[ctr_cache], resources=resources, partition_key=DAYS[-2],
                                instance=pg_instance, run_config=run_config)  # fmt: skip
        return {k: v.value for k, v in result.asset_materializations_for_node("ctr_cache")[0].metadata.items()}

    assert publish()["published"] is False  # a backfill of an older day never replaces a newer one by itself
    assert cache.current_version("ctr").version.startswith(f"{DAYS[-1]}.")
    back = publish(rollback=True)
    assert back["published"] is True and back["version"].startswith(f"{DAYS[-2]}.")
    assert back["previous_version"].startswith(f"{DAYS[-1]}.")
    assert cache.current_version("ctr").version == back["version"]
    yesterday = Lake(lake_uri).read("ctr_predictions", DAYS[-2]).set_index("ad_id")["ctr"]
    first = yesterday.index[0]
    assert cache.get("ctr", first) == pytest.approx(yesterday[first], rel=1e-6)


def test_a_rolled_back_day_is_not_published_again_by_a_refresh(resources, pg_instance, platform, lake_uri, redis_url,
                                                               schema):  # fmt: skip
    """cache_health's refresh re-runs yesterday's graph when the hit rate falls: after a rollback that is the very
    day the operator took back, which it published again. It is held until a later day publishes."""
    assert run(resources, pg_instance, day=DAYS[-2]).success
    assert run(resources, pg_instance, day=DAYS[-1]).success
    cache = PredictionCache(connect(redis_url, socket_timeout=5), schema=schema, pointer_ttl_s=0)

    def publish(day: str, **config) -> dict:
        run_config = {"ops": {"ctr_cache": {"config": config}}}
        result = dg.materialize(GRAPH, selection=[ctr_cache], resources=resources, partition_key=day,
                                instance=pg_instance, run_config=run_config)  # fmt: skip
        return {k: v.value for k, v in result.asset_materializations_for_node("ctr_cache")[0].metadata.items()}

    back = publish(DAYS[-2], rollback=True)
    # A retry of the rollback after its flip landed (its run failed then) holds the day back all the same.
    assert publish(DAYS[-2], rollback=True)["already_current"] is True
    lake = Lake(lake_uri)
    changed = lake.read("ctr_predictions", DAYS[-1])
    changed["ctr"] = changed["ctr"] / 2  # the refresh's new predictions of the rolled-back day
    lake.write("ctr_predictions", DAYS[-1], changed)
    for _ in range(2):  # a refused publish keeps the hold for the next refresh
        held = publish(DAYS[-1])
        assert held["published"] is False and held["rolled_back_over"] == DAYS[-1]
        assert held["rolled_back_to"] == DAYS[-2]  # models of days after it stay out of campaigns
        assert cache.current_version("ctr").version == back["version"]
    assert back["rolled_back_over"] == DAYS[-1] and back["rolled_back_to"] == DAYS[-2]
    next_day = "2026-11-19"  # the next night publishes its own day, and the hold ends
    lake.write("ctr_predictions", next_day, changed)
    assert publish(next_day)["published"] is True and "rolled_back_over" not in publish(next_day)
    assert cache.current_version("ctr").version.startswith(f"{next_day}.")
    assert publish(DAYS[-1])["published"] is False  # an older day again: the usual backfill rule


def test_predictions_the_lake_gives_back_wrong_are_never_published_nor_retried(
    resources, pg_instance, platform, lake_uri, redis_client, schema
):
    assert run(resources, pg_instance).success
    before = redis_client.get(schema.pointer("ctr"))
    lake = Lake(lake_uri)
    path = lake.path("ctr_predictions", DAYS[-1])
    good = lake.read("ctr_predictions", DAYS[-1])

    def publish() -> dg.ExecuteInProcessResult:
        result = dg.materialize(GRAPH, selection=[ctr_cache], resources=resources, partition_key=DAYS[-1],
                                instance=pg_instance, raise_on_error=False)  # fmt: skip
        assert not result.success
        assert not [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_RESTARTED]
        return result

    def failure(result) -> str:
        (event,) = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
        return event.step_failure_data.user_failure_data.description

    wrong = good.copy()
    wrong.loc[wrong.index[:2], "ctr"] = [float("inf"), 5.0]  # what a flipped bit in the file gave: served as is
    lake.write("ctr_predictions", DAYS[-1], wrong)
    assert "nothing published: 2 of 50 predictions are not probabilities in [0, 1]" in failure(publish())
    lake.write("ctr_predictions", DAYS[-1], good)
    data = bytearray(Path(path).read_bytes())
    chunk = pq.ParquetFile(path).metadata.row_group(0).column(list(good.columns).index("ctr"))
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    data[start + chunk.total_compressed_size // 2] ^= 0x10  # inside ctr's pages: their checksum says so
    Path(path).write_bytes(bytes(data))
    assert f"the lake cannot read {path}" in failure(publish())
    Path(path).unlink()
    assert f"the lake has no ctr_predictions partition {DAYS[-1]}" in failure(publish())
    assert redis_client.get(schema.pointer("ctr")) == before


def test_an_older_day_never_replaces_a_newer_version():
    from precompute_assets.defs.publishing import newer_current_version

    assert newer_current_version(b"2026-11-18.abcd1234.0:16", "2026-11-17") == "2026-11-18.abcd1234.0"
    assert newer_current_version(b"2026-11-18.abcd1234.0:16", "2026-11-18") is None
    assert newer_current_version(b"2026-11-18.abcd1234.0:16", "2026-11-19") is None
    assert newer_current_version(b"bench:16", "2026-11-19") is None
    assert newer_current_version(None, "2026-11-19") is None
    for malformed in (b"garbage", b"\xff\xfe:16", b"v1:x"):  # serves nothing: ctr_cache publishes over it (h_pub)
        assert newer_current_version(malformed, "2026-11-19") is None


def test_predictions_refuse_a_model_that_failed_its_gate():
    from precompute_assets.defs.models import model_version

    with dg.instance_for_test() as instance:
        instance.report_runless_asset_event(
            dg.AssetMaterialization(
                "ctr_model", partition=DAYS[-1], metadata={"model_version": "m1", "approved": False}
            )
        )
        with pytest.raises(dg.Failure, match="failed beats_baseline"):
            model_version(instance, DAYS[-1])
        instance.report_runless_asset_event(
            dg.AssetMaterialization("ctr_model", partition=DAYS[-1], metadata={"model_version": "m2", "approved": True})
        )
        assert model_version(instance, DAYS[-1]) == "m2"


def test_self_tuned_share_precomputes_what_the_replayed_days_say(resources, pg_instance, platform, lake_uri):
    result = run(resources, pg_instance, precompute_share="auto", cache_capacity=400)
    assert result.success
    meta = result.asset_materializations_for_node("top_ads")[0].metadata
    candidates = {int(n): rate for n, rate in meta["share_candidates"].value.items()}
    assert sorted(candidates) == [0, 25, 50, 100, 200, 300]  # never the whole capacity
    chosen = meta["top_n"].value
    assert candidates[chosen] == meta["share_hit_rate"].value > candidates[0]
    assert meta["read_through_hit_rate"].value == candidates[0] and meta["share_replayed_requests"].value > 0
    # out of sample: on so short a history the replayed days keep read-through (C/16 alone did not beat it yet)
    assert candidates[0] <= meta["share_tuned_hit_rate"].value <= 1
    assert meta["share_sample_rate"].value == 1.0  # a few thousand logged requests: replayed whole
    assert len(Lake(lake_uri).read("top_ads", DAYS[-1])) == min(chosen, meta["dagster/row_count"].value)
    assert chosen > 0  # the workload's popular ads recur day after day: precomputing them pays


def test_self_tuned_share_rises_a_step_above_what_the_day_before_published(resources, pg_instance, platform):
    """Each run replays a new window whose own shares restart: ramping from them, the share could jump several steps
    overnight. top_ads ramps from the top_n the day before's top_ads selected."""
    assert published_share(pg_instance, Partitions(), DAYS[-1]) is None  # no top_ads the day before
    pg_instance.report_runless_asset_event(
        dg.AssetMaterialization("top_ads", partition=DAYS[-2], metadata={"top_n": 0})
    )
    assert published_share(pg_instance, Partitions(), DAYS[-1]) == 0
    result = run(resources, pg_instance, precompute_share="auto", cache_capacity=400)
    meta = result.asset_materializations_for_node("top_ads")[0].metadata
    assert meta["top_n"].value <= 25  # C/16 at most
    # what chose it: the history's best candidate and the share it rose from (h_demand: a capped share looked as if
    # the tuner had picked a worse candidate), and the ranking replayed
    assert meta["share_ramped_from"].value == 0 and meta["share_best_candidate"].value >= meta["top_n"].value
    assert meta["share_ranking"].value == share_ranking(meta["strategy"].value)


def test_self_tuned_share_is_tuned_on_the_serving_clients_live_tier(resources, pg_instance, platform, lake_uri):
    result = run(resources, pg_instance, precompute_share="auto", cache_capacity=400, admission="probation")
    assert result.success
    meta = result.asset_materializations_for_node("top_ads")[0].metadata
    assert meta["share_admission"].value == "probation"
    candidates = {int(n): rate for n, rate in meta["share_candidates"].value.items()}
    replayed = meta["strategy"].value if meta["strategy"].value in ("ewma", "seasonal") else "frequency"

    def tuned(admission: str):
        return self_tuned_share(Lake(lake_uri), Partitions(), DAYS[-1], replayed, 400, admission)

    probation, lru = tuned("probation"), tuned("always")
    assert candidates == probation.hit_rates  # the first run: from no share published, one step up at most
    assert meta["top_n"].value == min(probation.share, 25)
    assert probation.hit_rates != lru.hit_rates  # a different live tier, replayed as the client runs it
    # A bound on the replayed requests below the logged ones replays a sample of the keys, with C scaled alike.
    sampled = self_tuned_share(Lake(lake_uri), Partitions(), DAYS[-1], replayed, 400, "probation", max_requests=500)
    assert sampled.sample_rate < 1 and sorted(sampled.hit_rates) == sorted(candidates)
    assert sampled.requests == probation.requests
    # The sample is taken hour by hour as the logs are read: only the kept keys' requests, all of them, in order.
    days = Partitions().days_ending(DAYS[-1], 7)
    (whole, whole_days), (kept, kept_days) = (
        logged_trace(Lake(lake_uri), Partitions(), days),
        logged_trace(Lake(lake_uri), Partitions(), days, rate=0.3),
    )
    assert kept_days == whole_days and 0 < len(kept.keys) < len(whole.keys)
    assert list(kept.keys) == list(whole.keys[shards_keep(whole.keys, 0.3)])
    failed = run(resources, pg_instance, precompute_share="auto", cache_capacity=400, share_max_requests=0)
    assert not failed.success and "share_max_requests must be at least 1" in str(failed.get_step_failure_events())


def test_self_tuned_share_replays_seasonal_with_the_week_before_each_day(tmp_path):
    """Each weekday asks for its own 16 keys: the seasonal ranking top_ads uses tomorrow (a week earlier) names
    exactly the day's keys, the day before names none of them. The share is tuned on the ranking that will run,
    so every replayed day needs the week before it: tuned on "the day before", precomputing looked useless."""
    lake = Lake(str(tmp_path))
    days = Partitions().days_ending("2026-11-29", 14)
    for index, day in enumerate(days):
        weekday_keys = [f"w{index % 7}-{k:02d}" for k in range(16)]
        write_query_logs(lake, day, [weekday_keys] * 24)
    choice = self_tuned_share(lake, Partitions(), days[-1], "seasonal", 16)
    assert choice.share == 12 == max(choice.hit_rates, key=choice.hit_rates.get)  # the best, and largest, share
    assert choice.hit_rates[12] > choice.hit_rates[8] > choice.hit_rates[0]
    assert choice.requests == 6 * 24 * 16  # the replayed days are the lookback's 7, the first of them warming up


def test_self_tuned_share_of_zero_publishes_an_empty_version(
    resources, pg_instance, platform, lake_uri, redis_client, schema
):
    """Where yesterday's keys are never asked for again, any share hurts: the share is 0, the graph still
    succeeds, and the version it publishes is empty, so readers go read-through instead of keeping stale keys."""
    catalog = sorted(platform.read("ads")["ad_id"])
    for index, day in enumerate(DAYS):
        keys = catalog[index * 300 : (index + 1) * 300]
        write_query_logs(platform, day, [keys[h * 12 : (h + 1) * 12] * 3 for h in range(24)])
    result = run(resources, pg_instance, precompute_share="auto", cache_capacity=100)
    assert result.success
    meta = result.asset_materializations_for_node("top_ads")[0].metadata
    assert meta["top_n"].value == 0 and meta["dagster/row_count"].value == 0
    known = check(result, "known_ads")
    assert known.passed and "read-through only" in known.description
    assert check(result, "valid_ctr").passed
    published = result.asset_materializations_for_node("ctr_cache")[0].metadata
    assert published["keys_written"].value == 0
    assert redis_client.get(schema.pointer("ctr")) is not None
    # The UI plots these across days: a day with nothing to predict or write has neither, where 0.0 plotted as
    # the model predicting no clicks and the publisher stalling.
    assert "mean_ctr" not in result.asset_materializations_for_node("ctr_predictions")[0].metadata
    assert "keys_per_s" not in published


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"precompute_share": "auto"}, "needs cache_capacity"),
        ({"top_n": -3}, "top_n must be at least 0"),
    ],
)
def test_bad_share_config_fails_top_ads_clearly(resources, pg_instance, platform, config, message):
    result = run(resources, pg_instance, **{"top_n": 50, **config})
    assert not materialized(result, "top_ads")
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE" and e.step_key == "top_ads")
    assert message in str(failure.event_specific_data.error)


@pytest.mark.parametrize(
    "config", [{"precompute_share": "some"}, {"precompute_share": "auto", "cache_capacity": 100, "admission": "lfu"}]
)
def test_a_share_or_admission_of_no_known_name_is_refused_before_the_run(resources, pg_instance, config):
    """Fields of a few values are enums: the launchpad lists them and refuses another before the run starts."""
    with pytest.raises(dg.DagsterInvalidConfigError, match=f"{next(iter(config))} not in enum type|admission not in"):
        run(resources, pg_instance, **{"top_n": 50, **config})


def test_an_experiment_splits_the_selection_and_is_published_with_the_version(
    resources, pg_instance, platform, lake_uri, redis_url, schema
):
    experiment = ExperimentResource(arms="frequency,seasonal", salt="t1")
    result = run({**resources, "experiment": experiment}, pg_instance, top_n=50)
    assert result.success
    top = Lake(lake_uri).read("top_ads", DAYS[-1])
    assert sorted(top["arm"].value_counts().to_dict().items()) == [("frequency", 25), ("seasonal", 25)]
    pairs = zip(top["ad_id"], top["arm"], strict=True)
    assert all(arm_of("t1", ad, ("frequency", "seasonal")) == arm for ad, arm in pairs)
    meta = result.asset_materializations_for_node("top_ads")[0].metadata
    assert meta["experiment"].value == "frequency,seasonal" and meta["experiment_salt"].value == "t1"
    assert meta["frequency_selected"].value == 25 and "arm frequency:" in meta["strategy_reason"].value
    published = PredictionCache(connect(redis_url, socket_timeout=5), schema=schema).current_experiment("ctr")
    assert published is not None and published.arms == ("frequency", "seasonal") and published.salt == "t1"
    predictions = Lake(lake_uri).read("ctr_predictions", DAYS[-1])  # the experiment goes with the rows it chose
    assert {Experiment.decode(text) for text in predictions["experiment"]} == {published}


def test_an_aa_experiment_splits_one_strategys_selection_between_its_arms(resources, pg_instance, platform, lake_uri):
    """frequency,frequency: arms frequency_a and frequency_b, each the frequency top of its own keys."""
    experiment = ExperimentResource(arms="frequency,frequency", salt="t1")
    result = run({**resources, "experiment": experiment}, pg_instance, top_n=50)
    assert result.success
    top = Lake(lake_uri).read("top_ads", DAYS[-1])
    assert top["arm"].value_counts().to_dict() == {"frequency_a": 25, "frequency_b": 25}
    demand = Lake(lake_uri).read("ad_demand", DAYS[-1]).set_index("ad_id")["demand"]
    for arm, chosen in top.groupby("arm")["ad_id"]:
        mine = demand[[arm_of("t1", ad, ("frequency_a", "frequency_b")) == arm for ad in demand.index]]
        assert set(chosen) == set(mine.sort_values(ascending=False, kind="stable").index[:25])
    meta = result.asset_materializations_for_node("top_ads")[0].metadata
    assert meta["strategy"].value == "frequency_a:frequency,frequency_b:frequency"


def test_an_experiments_self_tuned_share_is_tuned_on_its_arms_split(resources, pg_instance, platform, lake_uri):
    """The share of a split selection was tuned with the configured strategy's ranking, which neither arm used
    (h_demand): it replays the arms' split, each arm's ranking on its own keys."""
    experiment = ExperimentResource(arms="frequency,seasonal", salt="t1")
    result = run({**resources, "experiment": experiment}, pg_instance, precompute_share="auto", cache_capacity=400)
    assert result.success
    meta = result.asset_materializations_for_node("top_ads")[0].metadata
    assert meta["share_ranking"].value == "frequency:frequency,seasonal:seasonal"
    split = self_tuned_share(
        Lake(lake_uri), Partitions(), DAYS[-1], "frequency", 400, split=("t1", ("frequency", "seasonal"),
                                                                          ("frequency", "seasonal"))
    )  # fmt: skip
    alone = self_tuned_share(Lake(lake_uri), Partitions(), DAYS[-1], "frequency", 400)
    candidates = {int(n): rate for n, rate in meta["share_candidates"].value.items()}
    assert candidates == split.hit_rates != alone.hit_rates  # the split, not the frequency ranking alone


@pytest.mark.parametrize(("node", "setting"), [("top_ads", {"half_life_days": 1.0}), ("ad_demand", {"top_n": 5})])
def test_a_selection_asset_refuses_a_setting_it_would_ignore(resources, node, setting):
    """top_ads's launchpad offered ad_demand's half_life_days and ad_demand's top_ads' top_n, each ignored: a run
    configured with them ran as if they were not there."""
    with pytest.raises(dg.DagsterInvalidConfigError, match=next(iter(setting))):
        dg.materialize(
            GRAPH,
            resources=resources,
            partition_key=DAYS[-1],
            instance=dg.DagsterInstance.ephemeral(),
            run_config={"ops": {node: {"config": setting}}},
        )
