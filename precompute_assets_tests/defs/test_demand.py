"""demand_model on real PostgreSQL: hourly logs read from the lake, weights in the model store, beats_baselines."""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import asdict, replace
from datetime import date, timedelta
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from precompute_assets.defs import demand as demand_defs
from precompute_assets.defs.demand import (
    DemandModelConfig,
    beats_baselines_check,
    demand_model,
    read_hourly_counts,
    training_log,
)
from precompute_assets.defs.partitions import DEFAULT_PARTITIONS
from precompute_assets.defs.resources import ExperimentResource, LakeResource, ModelStoreResource, ParquetIOManager
from precompute_assets.defs.selection import ad_demand, day_counts, self_tuned_share, top_ads
from precompute_assets.ml.demand import (
    DemandEvaluation,
    DemandHyperParams,
    ewma_forecast,
    forecast_next_day,
    load_model,
    trained_hyper_params,
)
from precompute_assets.ml.model_store import LocalModelStore
from precompute_assets.ml.selection import select_top
from precompute_assets.storage.lake import Lake
from precompute_assets_tests.factories import write_query_logs
from precompute_assets_tests.ml.test_demand import MONDAY, synthetic_hours

DAYS = [(date(2026, 11, 9) + timedelta(days=d)).isoformat() for d in range(14)]  # Monday to Sunday, twice


def write_traffic(lake: Lake, days: list[str], hours) -> None:
    """One day of hourly logs at a time from ``(day index, hour start, counts)``."""
    per_day: dict[int, list[list[str]]] = {}
    for d, _, counts in hours:
        per_day.setdefault(d, []).append(np.repeat(counts.index.to_numpy(), counts.to_numpy()).tolist())
    for d, keys_per_hour in per_day.items():
        write_query_logs(lake, days[d], keys_per_hour)


@pytest.fixture(scope="module")
def weekly_template(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("weekly")
    write_traffic(Lake(str(root)), DAYS, synthetic_hours(days=14, start=MONDAY + timedelta(days=7)))
    return str(root)


@pytest.fixture
def approving(monkeypatch) -> dict[str, bool]:
    """demand_model approves whatever LSTM it trains while ``approving["any"]`` (the tests' one-epoch trainings rarely
    beat the baselines, and a negative margin is refused), otherwise by its rule; a safety stop is never approved."""
    state = {"any": True}
    rule = demand_defs.approves

    def approves(evaluation: DemandEvaluation, margin: float) -> bool:
        return evaluation.stopped_by != "seconds" if state["any"] else rule(evaluation, margin)

    monkeypatch.setattr(demand_defs, "approves", approves)
    return state


@pytest.fixture
def resources(lake_uri, tmp_path):
    return {
        "lake": LakeResource(base_uri=lake_uri),
        "model_store": ModelStoreResource(root=str(tmp_path / "models")),
        "experiment": ExperimentResource(),
    }


def run(resources, instance, day: str = DAYS[-1], **config):
    config = {"top_n": 20, "max_epochs": 4, **config}
    return dg.materialize(
        [demand_model],
        resources=resources,
        partition_key=day,
        instance=instance,
        run_config={"ops": {"demand_model": {"config": config}}},
        raise_on_error=False,
    )


def metadata(result) -> dict:
    return {k: v.value for k, v in result.asset_materializations_for_node("demand_model")[0].metadata.items()}


def check(result) -> dg.AssetCheckEvaluation:
    return next(c for c in result.get_asset_check_evaluations() if c.check_name == "beats_baselines")


def test_weekly_traffic_the_lstm_beats_frequency_and_its_weights_are_stored(
    resources, pg_instance, weekly_template, lake_uri, tmp_path
):
    shutil.copytree(weekly_template, lake_uri)
    result = run(resources, pg_instance)
    meta = metadata(result)
    for name in ("lstm", "frequency", "seasonal", "ewma"):
        assert 0 <= meta[f"hit_rate_{name}"] <= 1 and meta[f"mase_{name}"] >= 0
    assert meta["hit_rate_lstm"] > meta["hit_rate_frequency"] + 0.1
    assert meta["keys"] == 200 and meta["missing_hours"] == 0 and meta["days"] == 14 and meta["epochs"] == 4
    assert meta["train_seconds"] > 0 and "warm_started_from" not in meta  # the UI showed a blank value
    assert (meta["stopped_by"], meta["train_steps"], meta["max_steps"]) == ("epochs", 4 * 5, 2000)  # 1200 samples
    gate = check(result)
    best = max(meta[f"hit_rate_{n}"] for n in ("frequency", "seasonal", "ewma"))
    assert gate.passed == (meta["hit_rate_lstm"] > best + 0.005) == meta["approved"]
    assert gate.metadata["use"].value == meta["strategy"]
    assert meta["model_version"].startswith(f"{DAYS[-1]}.")
    store = LocalModelStore(tmp_path / "models")
    assert store.metadata("demand_model", meta["model_version"])["hyper_params"]["top_n"] == 20
    assert "lstm.weight_ih_l0" in store.load_state_dict("demand_model", meta["model_version"])


def test_a_mase_that_cannot_be_measured_is_left_out_of_the_metadata_with_a_note(resources, pg_instance, lake_uri):
    """Traffic without variation (every key asked for as often every day) gives MASE a scale of 0: the metadata
    recorded NaN, which the UI shows as an empty value and charts as nothing."""
    lake = Lake(lake_uri)
    for day in DAYS:
        write_query_logs(lake, day, ["a", "b", "b", "c"])
    result = run(resources, pg_instance, max_epochs=1)
    assert result.success
    meta = metadata(result)
    assert [key for key in meta if key.startswith("mase_") and key != "mase_note"] == []
    assert "scale (the in-sample seasonal-naive error) is 0" in meta["mase_note"]
    assert all(0 <= meta[f"hit_rate_{name}"] <= 1 for name in ("lstm", "frequency", "seasonal", "ewma"))


def test_the_run_log_says_what_the_lstm_trains_on_before_training(resources, pg_instance, weekly_template, lake_uri):
    shutil.copytree(weekly_template, lake_uri)
    result = run(resources, pg_instance, max_epochs=1)
    messages = [e.user_message for e in pg_instance.all_logs(result.run_id) if e.step_key == "demand_model"]
    read = next(i for i, m in enumerate(messages) if m.startswith("read 14 days of hourly query logs: 200 keys"))
    assert "training the LSTM for at most 1 epochs or 2000 steps (safety stop 180 s)" in messages[read]
    epoch = next(i for i, m in enumerate(messages) if m.startswith("LSTM epoch 1/1: training loss "))
    assert read < epoch < next(i for i, m in enumerate(messages) if m.startswith("trained "))


def test_the_run_log_and_metadata_say_when_the_step_budget_stopped_the_training(
    resources, pg_instance, weekly_template, lake_uri
):
    """The progress log is throttled and names the last epoch only when it is max_epochs: a training the budget
    stopped ended on an earlier epoch's line, as if it had stopped there."""
    shutil.copytree(weekly_template, lake_uri)
    result = run(resources, pg_instance, max_epochs=100_000, max_steps=12)
    messages = [e for e in pg_instance.all_logs(result.run_id) if e.step_key == "demand_model"]
    meta = metadata(result)
    assert (meta["train_steps"], meta["max_steps"], meta["stopped_by"], meta["epochs"]) == (12, 12, "steps", 3)
    assert "safety_stop" not in meta and isinstance(meta["train_steps"], int)  # a number: the UI plots it
    said = [e.user_message for e in messages if e.level == logging.INFO]
    assert any(m.startswith("LSTM training stopped by its budget of 12 steps in epoch 3 of 100000 (") for m in said)
    assert not [e for e in messages if e.level >= logging.WARNING and "safety stop" in e.user_message]


def test_the_safety_stop_firing_is_a_warning_in_the_run_log_and_the_metadata(
    resources, pg_instance, weekly_template, lake_uri
):
    """max_seconds only guards against a machine far slower than the step budget was sized for: when it ends the
    training, the weights depend on that machine's speed, and the run must say so."""
    shutil.copytree(weekly_template, lake_uri)
    result = run(resources, pg_instance, max_epochs=100_000, max_seconds=1e-6)  # the features alone outlast it
    assert result.success
    meta = metadata(result)
    assert (meta["stopped_by"], meta["train_steps"], meta["epochs"]) == ("seconds", 0, 0)
    assert meta["safety_stop"].startswith("LSTM training stopped by its max_seconds safety stop (1e-06 s, ")
    warned = [e.user_message for e in pg_instance.all_logs(result.run_id) if e.level == logging.WARNING]
    assert meta["safety_stop"] in warned


def test_the_config_shows_the_models_own_defaults():
    """The asset trains with what ``DemandHyperParams`` documents unless the UI's config says otherwise (the safety
    stop was once 120 s here and 180 s there)."""
    assert DemandModelConfig().hyper_params(2.0) == DemandHyperParams(half_life_days=2.0)


def test_the_training_log_is_throttled_but_names_the_first_and_last_epochs():
    lines = []
    log = type("Log", (), {"info": lambda self, line: lines.append(line)})()
    progress = training_log(log, 5, every_s=10.0)
    for epoch, seconds in [(1, 1.0), (2, 5.0), (3, 11.5), (4, 12.0), (5, 13.0)]:
        progress(epoch, 0.25, seconds)
    assert [line.split(":")[0] for line in lines] == ["LSTM epoch 1/5", "LSTM epoch 3/5", "LSTM epoch 5/5"]
    assert lines[0] == "LSTM epoch 1/5: training loss 0.2500 after 1.0 s"


def test_an_approved_version_warm_starts_the_next_day(approving, resources, pg_instance, weekly_template, lake_uri):
    shutil.copytree(weekly_template, lake_uri)
    first = run(resources, pg_instance, DAYS[-2], max_epochs=1)
    assert check(first).passed
    second = metadata(run(resources, pg_instance, DAYS[-1], max_epochs=1))
    assert second["warm_started_from"] == metadata(first)["model_version"]
    assert second["days"] == 14 and second["days_short_of_lookback"] == 0


def test_old_versions_leave_the_model_store_but_the_newest_approved_stays(
    approving, selection_resources, pg_instance, weekly_template, lake_uri, tmp_path
):
    """A version a day for months filled the model store: versions of days past retention_days are deleted, except
    the newest approved one, which the next days warm-start from and rank with."""
    with_catalog(weekly_template, lake_uri)
    store = LocalModelStore(tmp_path / "models")
    old = store.path("demand_model", f"{DAYS[0]}.0123abcd")  # a version of two weeks ago, never approved
    old.mkdir(parents=True)
    (old / "state_dict.pt").write_bytes(b"weights")
    approved = metadata(run(selection_resources, pg_instance, DAYS[-3], max_epochs=1))
    approving["any"] = False
    rejected = metadata(run(selection_resources, pg_instance, DAYS[-2], margin=1.0, max_epochs=1))
    assert approved["approved"] and not rejected["approved"]
    today = metadata(run(selection_resources, pg_instance, DAYS[-1], margin=1.0, max_epochs=1, retention_days=1))
    assert today["versions_pruned"] == 1 and today["warm_started_from"] == approved["model_version"]
    assert store.versions("demand_model") == sorted(
        [approved["model_version"], rejected["model_version"], today["model_version"]]
    )
    # A backfill's lstm ranking whose approved version is gone from the store: the day still gets its selection.
    store.delete("demand_model", approved["model_version"])
    gone = select(selection_resources, pg_instance, "lstm").asset_materializations_for_node("top_ads")[0].metadata
    assert gone["strategy"].value == today["best_baseline"] and gone["dagster/row_count"].value == 20
    assert f"demand_model {approved['model_version']} is no longer in the model store" in gone["strategy_reason"].value


def test_a_day_rejected_by_a_rerun_is_not_warm_started_from(
    approving, resources, pg_instance, weekly_template, lake_uri
):
    """An operator who finds a day's approved LSTM bad re-runs the day, and the re-run fails its check: the next
    day warm-starts from the day before it, not from the rejected day's earlier run."""
    shutil.copytree(weekly_template, lake_uri)
    before = metadata(run(resources, pg_instance, DAYS[-3], max_epochs=1))
    bad = metadata(run(resources, pg_instance, DAYS[-2], max_epochs=1))
    assert before["approved"] and bad["approved"]
    approving["any"] = False
    rejected = run(resources, pg_instance, DAYS[-2], margin=1.0, max_epochs=1)  # the re-run: nothing beats 1.0
    assert not check(rejected).passed
    assert metadata(rejected)["warm_started_from"] == before["model_version"]  # as the day's first run, not from it
    assert metadata(run(resources, pg_instance, DAYS[-1], max_epochs=1))["warm_started_from"] == before["model_version"]


def test_an_approved_version_that_cannot_be_read_now_is_trained_from_scratch(
    approving, resources, pg_instance, weekly_template, lake_uri, monkeypatch
):
    """An I/O error reading the warm start's weights (EIO on a flaky disk, EACCES after a permissions change) failed
    the step, and with it the night's top_ads and publish."""
    import errno

    shutil.copytree(weekly_template, lake_uri)
    first = metadata(run(resources, pg_instance, DAYS[-2], max_epochs=1))

    def unreadable(self, name, version):
        raise OSError(errno.EIO, "Input/output error", version)

    monkeypatch.setattr(LocalModelStore, "load_state_dict", unreadable)
    result = run(resources, pg_instance, DAYS[-1], max_epochs=1)
    assert result.success and "warm_started_from" not in metadata(result)
    said = "\n".join(entry.user_message for entry in pg_instance.all_logs(result.run_id))
    assert f"not warm-starting from {first['model_version']}: [Errno 5] Input/output error" in said


def test_re_runs_of_a_day_train_the_same_weights(approving, resources, pg_instance, weekly_template, lake_uri,
                                                 tmp_path):  # fmt: skip
    """Each re-run of a day warm-started from the day's previous run, so the same logs and config trained other
    weights every time, and a verdict near the margin could flip between re-runs."""
    import torch

    shutil.copytree(weekly_template, lake_uri)
    before = metadata(run(resources, pg_instance, DAYS[-2], max_epochs=1))
    runs = [metadata(run(resources, pg_instance, DAYS[-1], max_epochs=1)) for _ in range(2)]
    assert [meta["warm_started_from"] for meta in runs] == [before["model_version"]] * 2
    assert runs[0]["model_version"] != runs[1]["model_version"]
    store = LocalModelStore(tmp_path / "models")
    first, second = (store.load_state_dict("demand_model", meta["model_version"]) for meta in runs)
    assert first.keys() == second.keys() and all(torch.equal(first[name], second[name]) for name in first)
    assert runs[0]["hit_rate_lstm"] == runs[1]["hit_rate_lstm"]


def test_stationary_zipf_traffic_is_approved_only_if_the_lstm_wins(resources, pg_instance, lake_uri):
    write_traffic(Lake(lake_uri), DAYS[-8:], synthetic_hours(days=8, weekly_share=0.0, seed=5))
    meta = metadata(run(resources, pg_instance, lookback_days=8, max_epochs=2))
    best = max(meta[f"hit_rate_{n}"] for n in ("frequency", "seasonal", "ewma"))
    assert meta["approved"] == (meta["hit_rate_lstm"] > best + 0.005)
    assert meta["days_short_of_lookback"] == 0 and meta["days"] == 8


def test_missing_hours_a_short_lookback_and_a_single_key_are_reported(resources, pg_instance, lake_uri):
    lake = Lake(lake_uri)
    start = ["2026-01-01", "2026-01-02", "2026-01-03", "2026-01-04"]  # the first days: no longer lookback exists
    hours = [(d, t, c[c.index == "k0000"]) for d, t, c in synthetic_hours(n_keys=20, days=4, weekly_share=0.0)]
    write_traffic(lake, start, hours)
    os.remove(lake.path("query_logs", "2026-01-02-05:00"))
    meta = metadata(run(resources, pg_instance, start[-1], max_epochs=1))
    assert meta["days"] == 4 and meta["days_short_of_lookback"] == 10
    assert meta["missing_hours"] == 1 and meta["keys"] == 1
    assert meta["hit_rate_lstm"] == meta["hit_rate_frequency"] == 1.0 and not meta["approved"]


def test_a_lookback_without_traffic_fails_the_check_without_crashing(resources, pg_instance, lake_uri):
    for day in DAYS[-3:]:
        write_query_logs(Lake(lake_uri), day, [])
    result = run(resources, pg_instance)
    meta = metadata(result)
    assert "no requests" in meta["error"] and meta["keys"] == 0 and meta["missing_hours"] == 11 * 24
    gate = check(result)
    assert not gate.passed and "no demand model trained" in gate.description


def test_weights_the_model_store_cannot_take_fail_the_check_not_the_day(
    approving, resources, pg_instance, weekly_template, lake_uri, tmp_path
):
    shutil.copytree(weekly_template, lake_uri)
    (tmp_path / "not_a_folder").write_text("")  # the store's root cannot be created: as on a full or read-only disk
    resources = {**resources, "model_store": ModelStoreResource(root=str(tmp_path / "not_a_folder" / "models"))}
    result = run(resources, pg_instance, max_epochs=1)  # an LSTM that would be approved
    assert result.success  # the day's selection and publish wait for this step: it must not fail
    meta, gate = metadata(result), check(result)
    assert not meta["approved"] and meta["model_uri"] == "" and meta["strategy"] == meta["best_baseline"]
    assert not gate.passed and gate.severity == dg.AssetCheckSeverity.WARN
    assert "the weights could not be saved: [Errno 20] the model store could not write" in gate.description
    assert str(tmp_path / "not_a_folder" / "models" / "demand_model") in gate.description


def test_the_check_names_the_winner_and_respects_the_margin():
    def evaluation(lstm: float) -> DemandEvaluation:
        hits = {"lstm": lstm, "frequency": 0.40, "seasonal": 0.50, "ewma": 0.45}
        winner = "lstm" if lstm > 0.50 else "seasonal"
        return DemandEvaluation(hits, dict.fromkeys(hits, 1.0), {}, winner, "seasonal", 10, 1.0, 1, 10, False)

    won = beats_baselines_check(evaluation(0.52), 0.005)
    assert won.passed and won.metadata["use"].value == "lstm" and won.metadata["winner"].value == "lstm"
    assert won.metadata["lift"].value == pytest.approx(0.02)
    close = beats_baselines_check(evaluation(0.503), 0.005)
    assert not close.passed and close.metadata["use"].value == "seasonal" and close.metadata["winner"].value == "lstm"
    assert "lstm 0.5030 vs best baseline seasonal 0.5000" in close.description
    # weights the safety stop cut short depend on the machine's load: never approved, however well they scored
    cut = beats_baselines_check(replace(evaluation(0.52), stopped_by="seconds"), 0.005)
    assert not cut.passed and cut.metadata["use"].value == "seasonal"
    assert "cut short by the max_seconds safety stop, so never approved: use seasonal" in cut.description
    spec = next(iter(demand_model.check_specs))
    assert spec.name == "beats_baselines" and spec.blocking


@pytest.fixture
def selection_resources(resources, lake_uri):
    return {**resources, "io_manager": ParquetIOManager(lake=resources["lake"])}


def select(resources, instance, strategy: str):
    return dg.materialize(
        [ad_demand, top_ads],
        resources=resources,
        partition_key=DAYS[-1],
        instance=instance,
        run_config={"ops": {"top_ads": {"config": {"top_n": 20, "strategy": strategy}}}},
        raise_on_error=False,
    )


def with_catalog(template: str, lake_uri: str) -> Lake:
    shutil.copytree(template, lake_uri)
    lake = Lake(lake_uri)
    lake.write("ads", None, pd.DataFrame({"ad_id": [f"k{i:04d}" for i in range(200)]}))
    return lake


def test_a_model_of_a_short_lookback_ranks_tomorrow_with_the_window_it_trained_with(
    approving, selection_resources, pg_instance, weekly_template, lake_uri, tmp_path
):
    """6 days of logs train the LSTM with a 4-day window, forecasting the held-back day from the 5 days before it;
    top_ads reads a week and must forecast tomorrow as the model was trained and scored, not with the configured 7."""
    with_catalog(weekly_template, lake_uri)
    meta = metadata(run(selection_resources, pg_instance, lookback_days=6, max_epochs=1))
    store = LocalModelStore(tmp_path / "models")
    stored = store.metadata("demand_model", meta["model_version"])["hyper_params"]
    trained = trained_hyper_params(DemandModelConfig(top_n=20, max_epochs=1).hyper_params(2.0), 5)
    assert (trained.window_days, trained.history_days) == (4, 5) and stored == meta["hyper_params"] == asdict(trained)
    chosen = select(selection_resources, pg_instance, "lstm").asset_materializations_for_node("top_ads")[0].metadata
    assert chosen["strategy"].value == "lstm"
    model = load_model(store.load_state_dict("demand_model", meta["model_version"]), stored["hidden_size"])
    last_five = read_hourly_counts(Lake(lake_uri), DEFAULT_PARTITIONS, DAYS[-5:])
    expected = forecast_next_day(model, last_five, trained)
    assert Lake(lake_uri).read("top_ads", DAYS[-1])["ad_id"].tolist() == select_top(expected, 20)


def test_the_frequency_baseline_is_scored_with_the_half_life_ad_demand_ranks_by(
    selection_resources, pg_instance, weekly_template, lake_uri
):
    """top_ads ranks by ad_demand as frequency: demand_model must score that ranking, with ad_demand's half-life of
    the day, not a second setting of its own that could differ (which it refuses)."""
    with_catalog(weekly_template, lake_uri)

    def evaluated(ad_demand_config: dict) -> dict:
        result = dg.materialize(
            [ad_demand, demand_model],
            resources=selection_resources,
            partition_key=DAYS[-1],
            instance=pg_instance,
            run_config={
                "ops": {
                    "ad_demand": {"config": ad_demand_config},
                    "demand_model": {"config": {"top_n": 20, "max_epochs": 1}},
                }
            },  # fmt: skip
        )
        return metadata(result)

    short, flat = evaluated({"half_life_days": 0.25}), evaluated({"half_life_days": 1000.0})
    assert short["hyper_params"]["half_life_days"] == 0.25 and flat["hyper_params"]["half_life_days"] == 1000.0
    assert short["hit_rate_frequency"] != flat["hit_rate_frequency"]  # the baseline scored is the one configured
    alone = metadata(run(selection_resources, pg_instance, DAYS[-2], max_epochs=1))  # no ad_demand of that day
    assert alone["hyper_params"]["half_life_days"] == 2.0  # ad_demand's default
    with pytest.raises(dg.DagsterInvalidConfigError, match="half_life_days"):
        run(selection_resources, pg_instance, half_life_days=1.0)


def test_top_ads_ranks_by_the_configured_strategy(selection_resources, pg_instance, weekly_template, lake_uri):
    lake = with_catalog(weekly_template, lake_uri)
    result = select(selection_resources, pg_instance, "seasonal")
    meta = result.asset_materializations_for_node("top_ads")[0].metadata
    assert meta["strategy"].value == "seasonal" and meta["strategy_reason"].value == "configured"
    week_before_tomorrow, _ = day_counts(lake, DEFAULT_PARTITIONS.hours_of(DAYS[-7]))
    chosen = lake.read("top_ads", DAYS[-1])["ad_id"].tolist()
    assert chosen == select_top(week_before_tomorrow.astype(float), 20)
    ewma = select(selection_resources, pg_instance, "ewma").asset_materializations_for_node("top_ads")[0].metadata
    assert ewma["strategy"].value == "ewma" and ewma["dagster/row_count"].value == 20


def test_auto_and_lstm_follow_the_demand_models_evaluation(
    approving, selection_resources, pg_instance, weekly_template, lake_uri
):
    with_catalog(weekly_template, lake_uri)
    before = select(selection_resources, pg_instance, "auto").asset_materializations_for_node("top_ads")[0].metadata
    assert before["strategy"].value == "frequency" and "no demand_model evaluation" in before["strategy_reason"].value
    lstm = select(selection_resources, pg_instance, "lstm").asset_materializations_for_node("top_ads")[0].metadata
    assert lstm["strategy"].value == "frequency" and "fell back to frequency" in lstm["strategy_reason"].value
    trained = metadata(run(selection_resources, pg_instance, max_epochs=1, top_n=10))
    version = trained["model_version"]
    after = select(selection_resources, pg_instance, "auto").asset_materializations_for_node("top_ads")[0].metadata
    assert after["strategy"].value == "lstm" and after["strategy_reason"].value.count(f"demand_model {version}") == 1
    # the verdict compared the strategies at demand_model's top_n 10, not at the 20 selected here: said, not hidden
    assert after["strategy_evaluated_top_n"].value == trained["top_n"] == 10
    assert after["dagster/row_count"].value == 20
    # A stored model that cannot be used: the day still gets its selection, by the best baseline on the held-back day
    # (it fell back to frequency, or failed the step on the last two).
    folder = Path(selection_resources["model_store"].root) / "demand_model" / version
    weights, meta_file = folder / "state_dict.pt", folder / "metadata.json"
    kept = weights.read_bytes(), meta_file.read_bytes()
    damages = {
        "refused": lambda: weights.write_bytes(kept[0][:-100]),  # a cut file
        "is no longer in the model store": weights.unlink,
        "refused (Expecting": lambda: meta_file.write_text("{"),
    }
    for said, damage in damages.items():
        damage()
        cut = select(selection_resources, pg_instance, "auto").asset_materializations_for_node("top_ads")[0].metadata
        assert cut["strategy"].value == trained["best_baseline"] and cut["dagster/row_count"].value == 20, said
        assert f"demand_model {version} {said}" in cut["strategy_reason"].value
        assert (
            f"fell back to {trained['best_baseline']}, the held-back day's best baseline"
            in cut["strategy_reason"].value
        )
        weights.write_bytes(kept[0])
        meta_file.write_bytes(kept[1])
    with pytest.raises(dg.DagsterInvalidConfigError, match="strategy not in enum type"):  # refused before the run
        select(selection_resources, pg_instance, "oracle")


def select_after_demand(resources, instance, **demand_config):
    """demand_model then top_ads (strategy auto, top 20) in one run, as the daily job orders them; must succeed."""
    result = dg.materialize(
        [ad_demand, demand_model, top_ads],
        resources=resources,
        partition_key=DAYS[-1],
        instance=instance,
        run_config={
            "ops": {"demand_model": {"config": demand_config}, "top_ads": {"config": {"top_n": 20, "strategy": "auto"}}}
        },  # fmt: skip
        raise_on_error=False,
    )
    assert result.success
    return result


def test_in_the_daily_job_demand_model_runs_first_and_a_losing_lstm_never_stops_the_selection(
    selection_resources, pg_instance, weekly_template, lake_uri
):
    from precompute_assets.definitions import defs

    job = defs().resolve_job_def("daily_precompute_job")
    assert dg.AssetKey("demand_model") in job.asset_layer.executable_asset_keys
    upstream = job.asset_layer.asset_graph.get(dg.AssetKey("top_ads")).parent_keys
    assert dg.AssetKey("demand_model") in upstream  # so top_ads reads the verdict of the same run

    with_catalog(weekly_template, lake_uri)
    result = select_after_demand(selection_resources, pg_instance, top_n=20, max_epochs=1, margin=1.0)
    gate = check(result)
    assert not gate.passed and gate.severity == dg.AssetCheckSeverity.WARN  # no LSTM beats by a whole 1.0
    evaluation = metadata(result)
    chosen = result.asset_materializations_for_node("top_ads")[0].metadata
    assert chosen["strategy"].value == evaluation["best_baseline"] != "lstm"
    assert "strategy_evaluated_top_n" not in chosen  # compared at the N it selects: nothing to warn of
    assert "not approved" in chosen["strategy_reason"].value and evaluation["model_version"] in (
        chosen["strategy_reason"].value
    )
    assert chosen["dagster/row_count"].value == 20


def test_a_crashing_lstm_is_a_warning_and_the_selection_goes_on(
    selection_resources, pg_instance, weekly_template, lake_uri, monkeypatch
):
    import precompute_assets.defs.demand as demand

    def crash(*args, **kwargs):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(demand, "evaluate_demand", crash)
    with_catalog(weekly_template, lake_uri)
    result = select_after_demand(selection_resources, pg_instance)
    gate = check(result)
    assert not gate.passed and gate.severity == dg.AssetCheckSeverity.WARN
    assert "RuntimeError: CUDA error: out of memory" in gate.description
    assert metadata(result)["error"] == "RuntimeError: CUDA error: out of memory"
    chosen = result.asset_materializations_for_node("top_ads")[0].metadata
    assert chosen["strategy"].value == "frequency" and chosen["dagster/row_count"].value == 20


def test_the_cache_health_refresh_publishes_without_retraining_the_lstm():
    from precompute_assets.definitions import defs
    from precompute_assets.defs.automation import PRECOMPUTE_ASSETS, build_cache_health_sensor
    from precompute_assets.defs.models import ctr_model

    # its other job, ctr_restore_job, publishes again the version Redis lost: it trains nothing
    assert {job.name for job in build_cache_health_sensor("UTC").jobs} == {"refresh_precompute_job", "ctr_restore_job"}
    refresh = defs().resolve_job_def("refresh_precompute_job").asset_layer.executable_asset_keys
    daily = defs().resolve_job_def("daily_precompute_job").asset_layer.executable_asset_keys
    assert refresh == daily - {dg.AssetKey("demand_model")}
    # what cache_health runs of it once the day has an approved ctr_model: a subset the daemon can launch
    keys = [key for asset in PRECOMPUTE_ASSETS if asset is not ctr_model for key in asset.keys]
    subset = defs().resolve_job_def("refresh_precompute_job").get_subset(asset_selection=set(keys))
    assert subset.asset_layer.executable_asset_keys == refresh - {dg.AssetKey("ctr_model")}


def test_ewma_ranks_tomorrow_with_the_half_life_demand_model_scored(
    selection_resources, pg_instance, weekly_template, lake_uri
):
    """demand_model scores ewma with its configured half-life: top_ads must rank by that ewma, not by the default
    one, or auto follows a verdict on one method and ranks by another."""
    lake = with_catalog(weekly_template, lake_uri)
    assert metadata(run(selection_resources, pg_instance, ewma_half_life_hours=1.0, max_epochs=1))["keys"] == 200
    data = read_hourly_counts(lake, DEFAULT_PARTITIONS, DAYS[-7:])

    def ranked(half_life_hours: float) -> list[str]:
        hp = DemandHyperParams(ewma_half_life_hours=half_life_hours)
        return select_top(pd.Series(ewma_forecast(data, data.n_days, hp), index=data.keys), 20)

    assert ranked(1.0) != ranked(12.0)  # the two half-lives choose differently on these days
    assert select(selection_resources, pg_instance, "ewma").success
    assert lake.read("top_ads", DAYS[-1])["ad_id"].tolist() == ranked(1.0)


def self_tuned_candidates(
    selection_resources, pg_instance, strategy: str, ad_demand_config: dict | None = None
) -> dict[int, float]:
    """The candidates' hit rates top_ads reports when it tunes its share (capacity 40) for the last day."""
    top_ads_config = {"strategy": strategy, "precompute_share": "auto", "cache_capacity": 40}
    ops = {"top_ads": {"config": top_ads_config}}
    if ad_demand_config is not None:
        ops["ad_demand"] = {"config": ad_demand_config}
    result = dg.materialize(
        [ad_demand, top_ads],
        resources=selection_resources,
        partition_key=DAYS[-1],
        instance=pg_instance,
        run_config={"ops": ops},
    )
    candidates = result.asset_materializations_for_node("top_ads")[0].metadata["share_candidates"].value
    return {int(n): rate for n, rate in candidates.items()}


def test_the_self_tuned_share_replays_ewma_with_the_half_life_demand_model_scored(
    selection_resources, pg_instance, weekly_template, lake_uri
):
    """The share is tuned by replaying the ranking top_ads uses: ewma with demand_model's half-life of the day."""
    lake = with_catalog(weekly_template, lake_uri)
    assert metadata(run(selection_resources, pg_instance, ewma_half_life_hours=1.0, max_epochs=1))["keys"] == 200

    def tuned(half_life_hours: float) -> dict:
        hp = DemandHyperParams(ewma_half_life_hours=half_life_hours)
        return self_tuned_share(lake, DEFAULT_PARTITIONS, DAYS[-1], "ewma", 40, hp=hp).hit_rates

    assert tuned(1.0) != tuned(12.0)  # the two half-lives replay differently on these days
    assert self_tuned_candidates(selection_resources, pg_instance, "ewma") == tuned(1.0)


def test_the_self_tuned_share_replays_frequency_with_the_half_life_top_ads_ranks_by(
    selection_resources, pg_instance, weekly_template, lake_uri
):
    """top_ads ranks frequency by its ad_demand: the share is tuned by replaying that ranking, with ad_demand's
    half-life, also when no demand_model evaluated the day (it replayed ad_demand's default 2 days then)."""
    lake = with_catalog(weekly_template, lake_uri)

    def tuned(half_life_days: float) -> dict:
        hp = DemandHyperParams(half_life_days=half_life_days)
        return self_tuned_share(lake, DEFAULT_PARTITIONS, DAYS[-1], "frequency", 40, hp=hp).hit_rates

    assert tuned(0.25) != tuned(2.0)  # the two half-lives replay differently on these days
    ad_demand_config = {"half_life_days": 0.25}
    assert self_tuned_candidates(selection_resources, pg_instance, "frequency", ad_demand_config) == tuned(0.25)


def test_the_verdicts_top_n_is_told_when_an_arm_follows_it_not_by_the_configured_strategy():
    """Under an experiment the arms rank the selection: the warning followed the configured strategy instead, so
    arms frequency,lstm under strategy frequency said nothing, and arms frequency,ewma under auto warned (h_dmd)."""
    from precompute_assets.defs.selection import verdict_top_n

    warned = []
    context = type("Context", (), {"log": type("Log", (), {"warning": lambda self, line: warned.append(line)})()})()
    assert verdict_top_n(context, ("frequency", "lstm"), 20, {"top_n": 10}) == {"strategy_evaluated_top_n": 10}
    assert verdict_top_n(context, ("frequency", "ewma"), 20, {"top_n": 10}) == {}
    assert verdict_top_n(context, ("auto",), 10, {"top_n": 10}) == {} and len(warned) == 1


def test_top_ads_reads_the_demand_models_evaluation_once(
    approving, selection_resources, pg_instance, weekly_template, lake_uri, monkeypatch
):
    """Strategy, baselines' parameters, share replay and verdict all follow one read of the day's evaluation: one
    event-log query a run, and never two verdicts in one selection."""
    with_catalog(weekly_template, lake_uri)
    assert run(selection_resources, pg_instance, max_epochs=1).success  # approved: auto follows lstm
    reads = []
    fetch = pg_instance.fetch_materializations

    def counting(records_filter, *args, **kwargs):
        if getattr(records_filter, "asset_key", None) == dg.AssetKey("demand_model"):
            reads.append(records_filter)
        return fetch(records_filter, *args, **kwargs)

    monkeypatch.setattr(pg_instance, "fetch_materializations", counting)
    result = dg.materialize(
        [ad_demand, top_ads],
        resources=selection_resources,
        partition_key=DAYS[-1],
        instance=pg_instance,
        run_config={
            "ops": {"top_ads": {"config": {"strategy": "auto", "precompute_share": "auto", "cache_capacity": 40}}}
        },
    )
    chosen = result.asset_materializations_for_node("top_ads")[0].metadata
    assert chosen["strategy"].value == "lstm" and "strategy_evaluated_top_n" in chosen  # every reader took part
    assert len(reads) == 1
