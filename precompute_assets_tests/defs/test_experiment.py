"""The selection_experiment asset on lake data, the experiment resource, and ctr_cache publishing the experiment
its day's top_ads selected with."""

from __future__ import annotations

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from precompute_assets.defs.experiment import (
    EXPERIMENT_COLUMN,
    experiment_column,
    experiment_from_metadata,
    experiment_metadata,
    report_arms,
    sample_ratio_check,
    selection_experiment,
)
from precompute_assets.defs.partitions import DEFAULT_PARTITIONS
from precompute_assets.defs.publishing import ctr_cache
from precompute_assets.defs.resources import (
    ExperimentResource,
    LakeResource,
    ParquetIOManager,
    RedisResource,
    build_resources,
    experiment_fields,
)
from precompute_assets.defs.settings import SettingError, Settings
from precompute_assets.ml.experiment import arms_of
from precompute_assets.serving import Experiment
from precompute_assets.storage.lake import Lake
from precompute_assets.storage.tables import query_log_frame
from precompute_assets_tests.factories import day_start_ms, write_query_logs

DAY = "2026-11-20"
ARMS = ("frequency", "lstm")


def write_experiment_day(lake: Lake, *, salt: str = "s1", n_keys: int = 2000, drop_lstm_share: float = 0.0, seed=0):
    """A day of hourly ctr logs whose keys carry their arm: lstm keys are hit more often than frequency keys;
    a few rows of another kind and without arm are mixed in. ``drop_lstm_share`` loses that share of lstm keys
    (a logging gap: the sample-ratio check should notice)."""
    rng = np.random.default_rng(seed)
    keys = np.array([f"ad{i}" for i in range(n_keys)], dtype=object)
    arm = arms_of(salt, keys, ARMS)
    keep = (arm == "frequency") | (rng.random(n_keys) >= drop_lstm_share)
    keys, arm = keys[keep], arm[keep]
    p_hit = np.where(arm == "lstm", 0.7, 0.4)
    for index, hour in enumerate(DEFAULT_PARTITIONS.hours_of(DAY)):
        chosen = rng.integers(0, len(keys), 400)
        start = day_start_ms(DAY) + index * 3_600_000
        rows = [
            {"stream_id": f"{start + i}-0", "ts_ms": start + i, "kind": "ctr", "key": keys[j],
             "hit": bool(rng.random() < p_hit[j]), "latency_us": 50, "user": None, "tenant": None}
            for i, j in enumerate(chosen)
        ]  # fmt: skip
        frame = query_log_frame(rows)
        frame["arm"] = arm[chosen]
        extra = query_log_frame(
            [{"stream_id": f"{start + 500}-0", "ts_ms": start + 500, "kind": "doc_embedding", "key": "d1", "hit": True,
              "latency_us": 1, "user": None, "tenant": None},
             {"stream_id": f"{start + 501}-0", "ts_ms": start + 501, "kind": "ctr", "key": "ad1", "hit": True,
              "latency_us": 1, "user": None, "tenant": None}]
        )  # fmt: skip
        extra["arm"] = ["lstm", None]  # another kind's arm, and a ctr query outside the experiment
        lake.write("query_logs", hour, pd.concat([frame, extra], ignore_index=True))


@pytest.fixture(scope="module")
def instance():
    with dg.instance_for_test() as instance:
        yield instance


def materialize(instance, lake_uri: str, *, arms: str = "frequency,lstm", salt: str = "s1", **kwargs):
    return dg.materialize(
        [selection_experiment],
        partition_key=DAY,
        instance=instance,
        resources={"lake": LakeResource(base_uri=lake_uri), "experiment": ExperimentResource(arms=arms, salt=salt)},
        **kwargs,
    )


def test_the_report_has_per_arm_rates_intervals_difference_and_srm(instance, lake_uri):
    write_experiment_day(Lake(lake_uri))
    result = materialize(instance, lake_uri, run_config={"ops": {"selection_experiment": {"config": {"n_boot": 300}}}})
    assert result.success
    meta = result.asset_materializations_for_node("selection_experiment")[0].metadata
    assert meta["experiment_rows"].value == 24 * 400
    assert meta["arms"].value == "frequency,lstm"
    assert meta["frequency_hit_rate"].value == pytest.approx(0.4, abs=0.03)
    assert meta["lstm_hit_rate"].value == pytest.approx(0.7, abs=0.03)
    assert meta["frequency_requests"].value + meta["lstm_requests"].value == 24 * 400
    low, high = meta["difference_ci_low"].value, meta["difference_ci_high"].value
    assert 0.2 < low < meta["difference"].value < high < 0.4
    assert meta["lstm_hit_rate_ci_low"].value < meta["lstm_hit_rate"].value < meta["lstm_hit_rate_ci_high"].value
    assert meta["srm_p_value"].value > 0.001
    assert meta["difference_p_value"].value < 0.05
    for name in ("frequency_hit_rate", "difference", "difference_ci_low", "difference_p_value", "srm_p_value"):
        assert isinstance(meta[name], dg.FloatMetadataValue), name  # plain numbers: the UI charts them
    assert isinstance(meta["lstm_keys"], dg.IntMetadataValue)
    assert meta["report"].value["difference"]["of"] == "lstm - frequency"
    assert meta["experiment_salt"].value == "s1" and meta["experiment_name"].value == "frequency-vs-lstm"
    assert "other_split_rows" not in meta  # every row's arm is its key's under s1
    (check,) = result.get_asset_check_evaluations()
    assert check.check_name == "sample_ratio" and check.passed


def test_rows_of_another_split_are_left_out_when_no_version_tells_them_apart(instance, lake_uri, tmp_path):
    """The salt changed at 16:00 and no version was recorded (logs from before the version column, or a new Dagster
    storage): the report pooled both splits' rows, 465 of 5388 keys counted in both arms (h_ab2). Rows whose logged arm
    is not their key's under the reported experiment's salt now leave, counted, and the report names that salt."""
    lake, later = Lake(lake_uri), Lake(str(tmp_path / "s2"))
    write_experiment_day(lake, salt="s1")
    write_experiment_day(later, salt="s2", seed=1)
    hours = DEFAULT_PARTITIONS.hours_of(DAY)
    for hour in hours[16:]:
        lake.write("query_logs", hour, later.read("query_logs", hour))
    result = materialize(instance, lake_uri, salt="s2", run_config={
        "ops": {"selection_experiment": {"config": {"n_boot": 50}}}})  # fmt: skip
    meta = result.asset_materializations_for_node("selection_experiment")[0].metadata
    other = meta["other_split_rows"].value
    assert 0.4 * 16 * 400 < other < 0.6 * 16 * 400  # about half the keys change arms with the salt
    assert meta["experiment_rows"].value == 24 * 400 - other and meta["experiment_salt"].value == "s2"
    kept = pd.concat([lake.read("query_logs", hour) for hour in hours])
    kept = kept[(kept["kind"] == "ctr") & kept["arm"].isin(ARMS)]
    kept = kept[kept["arm"].to_numpy() == arms_of("s2", kept["key"].to_numpy(), ARMS)]
    assert meta["frequency_keys"].value + meta["lstm_keys"].value == kept["key"].nunique()  # no key in both arms


def test_a_sample_ratio_mismatch_fails_the_check_as_a_warning(instance, lake_uri):
    write_experiment_day(Lake(lake_uri), drop_lstm_share=0.2)
    result = materialize(instance, lake_uri, run_config={"ops": {"selection_experiment": {"config": {"n_boot": 50}}}})
    assert result.success  # a warning, not a failed run
    (check,) = result.get_asset_check_evaluations()
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
    assert "sample-ratio mismatch" in check.description
    meta = result.asset_materializations_for_node("selection_experiment")[0].metadata
    assert meta["srm_p_value"].value < 0.001


def test_a_day_without_experiment_rows_materializes_with_zero_rows(instance, lake_uri):
    write_query_logs(Lake(lake_uri), DAY, ["ad1", "ad2"])  # files written before the arm column existed
    result = materialize(instance, lake_uri)
    assert result.success
    meta = result.asset_materializations_for_node("selection_experiment")[0].metadata
    assert meta["experiment_rows"].value == 0 and meta["missing_hours"].value == 0
    assert meta["hours_without_arm"].value == 24
    assert "frequency_hit_rate" not in meta
    (check,) = result.get_asset_check_evaluations()
    assert check.passed and "no experiment rows" in check.description
    # No logs at all: every hour missing, still materialized.
    empty = materialize(instance, lake_uri + "-empty")
    assert empty.asset_materializations_for_node("selection_experiment")[0].metadata["missing_hours"].value == 24


def test_the_logs_arms_are_reported_when_the_configured_experiment_differs(instance, lake_uri):
    write_experiment_day(Lake(lake_uri))
    result = materialize(
        instance, lake_uri, arms="", run_config={"ops": {"selection_experiment": {"config": {"n_boot": 50}}}}
    )
    meta = result.asset_materializations_for_node("selection_experiment")[0].metadata
    assert meta["arms"].value == "frequency,lstm" and "lstm_hit_rate" in meta
    counts = pd.Series({"seasonal": 5, "ewma": 9, "lstm": 1})
    assert report_arms(None, counts)[0] == ["ewma", "seasonal"]
    # an experiment recorded as the day's, with an arm that got no request: compared (the SRM check tells)
    assert report_arms(Experiment("e", "s", ("lstm", "frequency")), counts, recorded=True)[0] == ["lstm", "frequency"]
    # one only configured now, sharing an arm with the logs: the logs' arms
    assert report_arms(Experiment("e", "s", ("lstm", "frequency")), counts)[0] == ["ewma", "seasonal"]
    assert report_arms(None, pd.Series({"lstm": 3}))[0] is None
    # its arm the only one logged (the other's rows lost, h_ab): compared, so the SRM check fails, not passes "no rows"
    assert report_arms(Experiment("e", "s", ("lstm", "frequency")), pd.Series({"lstm": 3}))[0] == ["lstm", "frequency"]
    assert report_arms(Experiment("e", "s", ("ewma", "frequency")), pd.Series({"lstm": 3}))[0] is None
    why = "7200 experiment rows, but only arm 'lstm' in the logs"
    check = sample_ratio_check(None, why)
    assert check.passed and check.description == f"{why}: nothing to check"


def test_a_configured_experiment_that_shares_one_arm_with_the_logs_is_not_reported(instance, lake_uri):
    """Configured ewma,lstm, logged frequency,lstm (the setting changed since the day was served, no version
    recorded): the report compared ewma, without a request, against lstm, dropped most rows and failed the
    sample-ratio check (h_dmd)."""
    write_experiment_day(Lake(lake_uri))
    result = materialize(instance, lake_uri, arms="ewma,lstm", run_config={
        "ops": {"selection_experiment": {"config": {"n_boot": 50}}}})  # fmt: skip
    meta = result.asset_materializations_for_node("selection_experiment")[0].metadata
    assert meta["arms"].value == "frequency,lstm" and meta["experiment_rows"].value == 24 * 400
    (srm,) = [c for c in result.get_asset_check_evaluations() if c.check_name == "sample_ratio"]
    assert srm.passed


def test_the_report_follows_the_experiment_the_serving_days_top_ads_ran_not_todays_setting(lake_uri):
    write_experiment_day(Lake(lake_uri))
    served = Experiment("served", "s1", ("lstm", "frequency"))
    with dg.instance_for_test() as fresh:
        fresh.report_runless_asset_event(
            dg.AssetMaterialization("top_ads", partition="2026-11-19", metadata=experiment_metadata(served))
        )
        result = materialize(fresh, lake_uri, run_config={"ops": {"selection_experiment": {"config": {"n_boot": 50}}}})
    meta = result.asset_materializations_for_node("selection_experiment")[0].metadata
    # PRECOMPUTE_EXPERIMENT now says frequency,lstm; the day was served by lstm,frequency (its baseline is lstm).
    assert meta["arms"].value == "lstm,frequency" and meta["report"].value["difference"]["of"] == "frequency - lstm"


# --- the resource ----------------------------------------------------------------------------------------


def test_the_resource_builds_the_experiment_and_names_the_variable_when_it_is_wrong():
    assert ExperimentResource().experiment() is None
    assert ExperimentResource(arms="  ").experiment() is None
    assert ExperimentResource(arms="frequency, lstm").experiment() == Experiment("frequency-vs-lstm", "ab1", ARMS)
    assert ExperimentResource(arms="ewma,seasonal", salt="x", name="n").experiment().name == "n"
    aa = ExperimentResource(arms="lstm,lstm").experiment()  # an A/A test
    assert aa == Experiment("lstm_a-vs-lstm_b", "ab1", ("lstm_a", "lstm_b"))
    for arms, message in (
        ("lstm", "exactly two"),
        ("lstm_a,lstm_a", "names an arm of an A/A test"),
        ("lstm,oracle", "unknown"),
    ):
        with pytest.raises(SettingError, match=f"PRECOMPUTE_EXPERIMENT='{arms}'.*{message}"):
            ExperimentResource(arms=arms).experiment()
    with pytest.raises(SettingError, match="PRECOMPUTE_EXPERIMENT_SALT"):
        ExperimentResource(arms="frequency,lstm", salt=" ").experiment()


def test_the_environment_sets_the_experiment_when_the_definitions_load(monkeypatch):
    assert experiment_fields({}) == {}
    assert experiment_fields({"PRECOMPUTE_EXPERIMENT": " "}) == {}
    fields = experiment_fields({"PRECOMPUTE_EXPERIMENT": "frequency,lstm", "PRECOMPUTE_EXPERIMENT_SALT": "s7"})
    assert fields == {"arms": dg.EnvVar("PRECOMPUTE_EXPERIMENT"), "salt": dg.EnvVar("PRECOMPUTE_EXPERIMENT_SALT")}
    with pytest.raises(SettingError, match="PRECOMPUTE_EXPERIMENT='frequency,magic'"):
        experiment_fields({"PRECOMPUTE_EXPERIMENT": "frequency,magic"})
    monkeypatch.delenv("PRECOMPUTE_EXPERIMENT", raising=False)
    assert build_resources(Settings())["experiment"].arms == ""
    monkeypatch.setenv("PRECOMPUTE_EXPERIMENT", "seasonal,lstm")
    resource = build_resources(Settings())["experiment"]
    assert resource.arms == dg.EnvVar("PRECOMPUTE_EXPERIMENT")


# --- publishing ------------------------------------------------------------------------------------------


def test_metadata_round_trip():
    experiment = Experiment("n", "salt", ARMS)
    assert experiment_from_metadata(experiment_metadata(experiment)) == experiment
    assert experiment_from_metadata(experiment_metadata(None)) is None
    assert experiment_from_metadata({}) is None
    # A day without an experiment records none: the UI showed its three keys as blank values.
    assert experiment_metadata(None) == {}


def publish(instance, lake_uri, redis_url, schema):
    lake = LakeResource(base_uri=lake_uri)
    predictions = dg.AssetSpec("ctr_predictions", partitions_def=DEFAULT_PARTITIONS.daily)
    return dg.materialize(
        [predictions, ctr_cache],
        selection=[ctr_cache],
        partition_key=DAY,
        instance=instance,
        resources={
            "lake": lake,
            "io_manager": ParquetIOManager(lake=lake),
            "redis": RedisResource(url=redis_url, namespace=schema.namespace),
        },
    )


def test_ctr_cache_publishes_the_experiment_its_top_ads_selected_with(lake_uri, redis_url, redis_client, schema):
    # An instance of its own: the top_ads events below must not leak into other tests.
    frame = pd.DataFrame({"ad_id": ["ad1", "ad2"], "ctr": [0.1, 0.2], "model_version": "m1"})
    Lake(lake_uri).write("ctr_predictions", DAY, frame)
    experiment = Experiment("frequency-vs-lstm", "s1", ARMS)
    with dg.instance_for_test() as instance:
        instance.report_runless_asset_event(
            dg.AssetMaterialization("top_ads", partition=DAY, metadata=experiment_metadata(experiment))
        )
        first = publish(instance, lake_uri, redis_url, schema)
        assert first.success
        assert Experiment.decode(redis_client.get(schema.experiment("ctr"))) == experiment
        assert first.asset_materializations_for_node("ctr_cache")[0].metadata["experiment"].value == "frequency,lstm"
        # The day is selected again without an experiment: the next publish ends it.
        instance.report_runless_asset_event(
            dg.AssetMaterialization("top_ads", partition=DAY, metadata=experiment_metadata(None))
        )
        ended = publish(instance, lake_uri, redis_url, schema)
        assert ended.success
        assert redis_client.get(schema.experiment("ctr")) is None
        assert "experiment" not in ended.asset_materializations_for_node("ctr_cache")[0].metadata


def test_ctr_cache_publishes_the_experiment_its_predictions_were_selected_under_not_the_newest_top_ads(
    lake_uri, redis_url, redis_client, schema
):
    """ctr_cache published the experiment of the newest top_ads: a top_ads run again under another salt, and the
    predictions of the first selection were served with arms logged by the second split, the difference washed out."""
    chose, since = Experiment("e1", "s1", ARMS), Experiment("e2", "s2", ARMS)
    frame = pd.DataFrame({"ad_id": ["ad1", "ad2"], "ctr": [0.1, 0.2], "model_version": "m1",
                          EXPERIMENT_COLUMN: experiment_column(chose)})  # fmt: skip
    Lake(lake_uri).write("ctr_predictions", DAY, frame)
    with dg.instance_for_test() as instance:
        instance.report_runless_asset_event(
            dg.AssetMaterialization("top_ads", partition=DAY, metadata=experiment_metadata(since))
        )
        result = publish(instance, lake_uri, redis_url, schema)
        assert Experiment.decode(redis_client.get(schema.experiment("ctr"))) == chose
        metadata = result.asset_materializations_for_node("ctr_cache")[0].metadata
        assert experiment_from_metadata(metadata) == chose  # the salt and name too: the report credits by version
        Lake(lake_uri).write(
            "ctr_predictions", DAY, frame.assign(**{EXPERIMENT_COLUMN: ["", experiment_column(chose)]})
        )
        with pytest.raises(dg.Failure, match="nothing published: ctr_predictions: its rows were selected under 2"):
            publish(instance, lake_uri, redis_url, schema)


def test_each_query_is_credited_to_the_experiment_its_version_was_published_with(lake_uri):
    """The report took the experiment of the day before's top_ads for the whole day: the hours before that night's
    publish (the version of two days before served them, with its own experiment) were counted in its arms, and the
    sample-ratio check failed on a split that was never run."""
    old, new = Experiment("old", "s0", ("frequency", "ewma")), Experiment("new", "s1", ARMS)
    versions = {"2026-11-18.aaaa": old, "2026-11-19.bbbb": new}
    rng, lake = np.random.default_rng(3), Lake(lake_uri)
    keys = np.array([f"ad{i}" for i in range(3000)], dtype=object)
    for index, hour in enumerate(DEFAULT_PARTITIONS.hours_of(DAY)):
        version = "2026-11-18.aaaa" if index < 3 else "2026-11-19.bbbb"
        experiment, start = versions[version], day_start_ms(DAY) + index * 3_600_000
        chosen = keys[rng.integers(0, len(keys), 300)]
        arm = arms_of(experiment.salt, chosen, experiment.arms)
        p_hit = {"ewma": 0.95, "frequency": 0.95 if experiment is old else 0.4, "lstm": 0.7}
        rows = [
            {"stream_id": f"{start + i}-0", "ts_ms": start + i, "kind": "ctr", "key": key, "latency_us": 50,
             "hit": bool(rng.random() < p_hit[a]), "user": None, "tenant": None}
            for i, (key, a) in enumerate(zip(chosen, arm, strict=True))
        ]  # fmt: skip
        frame = query_log_frame(rows)
        lake.write("query_logs", hour, frame.assign(arm=arm, version=version))
    with dg.instance_for_test() as fresh:
        for version, experiment in versions.items():
            fresh.report_runless_asset_event(dg.AssetMaterialization(
                "ctr_cache", partition=version[:10], metadata={"published": True, "version": version,
                                                               **experiment_metadata(experiment)}))  # fmt: skip
        result = materialize(fresh, lake_uri, run_config={"ops": {"selection_experiment": {"config": {"n_boot": 50}}}})
    meta = {k: v.value for k, v in result.asset_materializations_for_node("selection_experiment")[0].metadata.items()}
    assert meta["arms"] == "frequency,lstm" and meta["other_experiment_rows"] == 900  # hours 0-2: the old one's
    assert meta["experiment_rows"] == 21 * 300 and abs(meta["frequency_hit_rate"] - 0.4) < 0.03
    assert meta["report"]["srm"]["mismatch"] is False
