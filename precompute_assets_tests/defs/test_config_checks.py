"""A bad config value fails its step at once, in one line naming the field, without retries and without recording a
materialization: a model run with ``max_steps: 0`` was recorded as the day's demand_model (top_ads then ranked by
frequency), a ``valid_fraction`` of 1.5 failed as "blocking check beats_baseline" and left ctr_predictions without the
day's model, and a ``draws`` of 0 was retried three times (h_ui)."""

import dagster as dg
import pytest

from precompute_assets.defs.demand import demand_model
from precompute_assets.defs.embeddings import embedding_model
from precompute_assets.defs.experiment import selection_experiment
from precompute_assets.defs.models import ctr_model
from precompute_assets.defs.resources import (
    DocumentStoreResource,
    ExperimentResource,
    LakeResource,
    ModelStoreResource,
)
from precompute_assets.defs.selection import TopAdsConfig, ad_demand
from precompute_assets.defs.user_events import next_action_model


@pytest.mark.parametrize(
    ("asset", "config", "message"),
    [
        (demand_model, {"max_steps": 0}, "demand_model config: max_steps must be at least 1"),
        (demand_model, {"lookback_days": 2}, "demand_model config: lookback_days must be at least 3, got 2"),
        (demand_model, {"seed": -1}, "demand_model config: seed must be at least 0, got -1"),
        (
            demand_model,
            {"max_seconds": float("inf")},
            "demand_model config: max_seconds must be a finite number above 0",
        ),
        (demand_model, {"learning_rate": float("inf")}, "demand_model config: learning_rate must be a finite number"),
        (demand_model, {"margin": -0.005}, "demand_model config: margin must be a finite number of at least 0"),
        (ctr_model, {"valid_fraction": 1.5}, "ctr_model config: valid_fraction must be above 0 and below 1, got 1.5"),
        (ctr_model, {"training_days": 0}, "ctr_model config: training_days must be at least 2, got 0"),
        (ad_demand, {"half_life_days": 0}, "ad_demand config: half_life_days must be a number above 0, got 0.0"),
        (embedding_model, {"dim": -1}, "embedding_model config: dim must be at least 1, got -1"),
        (embedding_model, {"sample": 0}, "embedding_model config: sample must be at least 1, got 0"),
        (next_action_model, {"n_estimators": 0}, "next_action_model config: n_estimators must be at least 1, got 0"),
        (selection_experiment, {"n_boot": 0}, "selection_experiment config: n_boot must be at least 1, got 0"),
        (selection_experiment, {"alpha": 1.5}, "selection_experiment config: alpha must be above 0 and below 1"),
        (selection_experiment, {"seed": -1}, "selection_experiment config: seed must be at least 0, got -1"),
        (selection_experiment, {"n_boot": 10**12}, "selection_experiment config: n_boot must be at most 100,000"),
    ],
)
def test_a_bad_config_value_fails_at_once_naming_its_field(tmp_path, asset, config, message):
    resources = {
        "lake": LakeResource(base_uri=str(tmp_path / "lake")),
        "model_store": ModelStoreResource(uri=str(tmp_path / "models")),
        "documents": DocumentStoreResource(url="postgresql://nobody@127.0.0.1:1/none"),  # never reached
        "experiment": ExperimentResource(),
    }
    needed = {key: resources[key] for key in asset.required_resource_keys if key in resources}
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [asset],
            resources=needed,
            instance=instance,
            partition_key="2026-12-01" if asset.partitions_def else None,
            run_config={"ops": {asset.op.name: {"config": config}}},
            raise_on_error=False,
        )
    (failure,) = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    assert failure.step_failure_data.user_failure_data.description == message or (
        failure.step_failure_data.user_failure_data.description.startswith(message)
    )
    assert not result.asset_materializations_for_node(asset.op.name)
    assert not [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY]


@dg.asset
def selection(config: TopAdsConfig) -> None:
    del config


def test_a_field_of_a_few_values_is_checked_by_dagster_before_the_run():
    """``strategy: bogus`` showed "No errors" in the launchpad and failed inside the step: a Literal field is an enum
    the launchpad lists and checks."""
    with pytest.raises(dg.DagsterInvalidConfigError, match="strategy not in enum type"):
        dg.materialize([selection], run_config={"ops": {"selection": {"config": {"strategy": "bogus"}}}})


def test_a_negative_thread_count_is_refused_with_the_other_hyper_parameters(tmp_path):
    """``threads: -1`` got past the checks and was recorded as the day's demand_model, with torch's error (h_diff12)."""
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [demand_model],
            resources={
                "lake": LakeResource(base_uri=str(tmp_path / "lake")),
                "model_store": ModelStoreResource(uri=str(tmp_path / "models")),
            },  # fmt: skip
            instance=instance,
            partition_key="2026-12-01",
            run_config={"ops": {"demand_model": {"config": {"threads": -1}}}},
            raise_on_error=False,
        )
    (failure,) = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    assert failure.step_failure_data.user_failure_data.description == (
        "demand_model config: threads must be at least 0 (0 or null: torch's default), got -1"
    )
