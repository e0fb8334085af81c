"""Deployment settings: read and checked once, partitions derived from them, locations with no fallback."""

from __future__ import annotations

import dagster as dg
import pandas as pd
import pytest

from precompute_assets.defs.models import CtrModelConfig, ctr_model
from precompute_assets.defs.partitions import DEFAULT_PARTITIONS, Partitions
from precompute_assets.defs.resources import (
    DeploymentResource,
    LakeResource,
    ModelStoreResource,
    build_resources,
)
from precompute_assets.defs.selection import LOOKBACK, LOOKBACK_DAYS
from precompute_assets.defs.settings import SettingError, Settings, load_settings
from precompute_assets.ml.model_store import LocalModelStore
from precompute_assets.storage.lake import Lake


def test_defaults_when_unset_or_blank():
    assert load_settings({}) == Settings("UTC", "2026-01-01")
    assert load_settings({"PRECOMPUTE_TIMEZONE": " ", "PRECOMPUTE_PARTITIONS_START": ""}) == Settings()
    loaded = load_settings({"PRECOMPUTE_TIMEZONE": "Europe/Berlin", "PRECOMPUTE_PARTITIONS_START": "2025-03-01"})
    assert loaded == Settings("Europe/Berlin", "2025-03-01")


@pytest.mark.parametrize("timezone", ["Mars/Olympus", "utc", "Europe", "../etc/passwd", "UTC+2"])
def test_unknown_timezone_is_an_error_naming_the_variable(timezone):
    with pytest.raises(SettingError, match=r"PRECOMPUTE_TIMEZONE=.* is not a known timezone"):
        load_settings({"PRECOMPUTE_TIMEZONE": timezone})


@pytest.mark.parametrize("start", ["2026-13-01", "2026-02-30", "01/02/2026", "20260101", "2026-1-1", "yesterday"])
def test_malformed_start_is_an_error_naming_the_variable(start):
    with pytest.raises(SettingError, match=r"PRECOMPUTE_PARTITIONS_START=.* is not a date: use YYYY-MM-DD"):
        load_settings({"PRECOMPUTE_PARTITIONS_START": start})


def test_partitions_follow_the_settings():
    partitions = Partitions.of_settings(Settings("America/New_York", "2025-06-01"))
    assert partitions.daily.timezone == partitions.hourly.timezone == "America/New_York"
    assert partitions.daily.get_first_partition_key() == "2025-06-01"
    assert partitions.hourly.get_first_partition_key() == "2025-06-01-00:00"
    assert len(partitions.hours_of("2026-03-08")) == 23  # spring forward
    assert len(partitions.hours_of("2026-11-01")) == 25  # fall back
    assert len(DEFAULT_PARTITIONS.hours_of("2026-03-08")) == 24
    assert partitions.days_ending("2025-06-02", 7) == ["2025-06-01", "2025-06-02"]  # nothing before the first day
    assert DEFAULT_PARTITIONS.days_ending("2026-03-01", 3) == ["2026-02-27", "2026-02-28", "2026-03-01"]


def test_lookback_dependency_is_what_the_assets_read():
    """The declared hourly dependency of a daily selection asset covers exactly the hours it reads."""
    assert LOOKBACK.start_offset == -(LOOKBACK_DAYS - 1) and LOOKBACK.end_offset == 0
    partitions = Partitions("America/New_York")
    day = "2026-03-09"  # the week holds a 23-hour day
    upstream = LOOKBACK.get_upstream_mapped_partitions_result_for_partitions(
        partitions.daily.subset_with_partition_keys([day]), partitions.daily, partitions.hourly
    ).partitions_subset.get_partition_keys()
    read = [hour for d in partitions.days_ending(day, LOOKBACK_DAYS) for hour in partitions.hours_of(d)]
    assert sorted(upstream) == sorted(read) and len(read) == LOOKBACK_DAYS * 24 - 1


def test_ctr_model_declares_the_days_of_impressions_it_trains_on():
    """ctr_model reads training_days of ad_impressions up to its day; it declared only its own day, so the UI's
    lineage of a model named one day of the fourteen it was trained on."""
    day = "2026-03-20"
    # None: Dagster's default for two daily assets, the same day
    mapping = ctr_model.get_partition_mapping(dg.AssetKey("ad_impressions")) or dg.TimeWindowPartitionMapping()
    upstream = mapping.get_upstream_mapped_partitions_result_for_partitions(
        DEFAULT_PARTITIONS.daily.subset_with_partition_keys([day]), DEFAULT_PARTITIONS.daily, DEFAULT_PARTITIONS.daily
    ).partitions_subset.get_partition_keys()
    assert sorted(upstream) == DEFAULT_PARTITIONS.days_ending(day, CtrModelConfig().training_days)


@pytest.mark.parametrize(
    ("resource", "variable"),
    [
        (lambda: LakeResource().lake(), "PRECOMPUTE_LAKE_URI"),
        (lambda: ModelStoreResource().store(), "PRECOMPUTE_MODEL_STORE"),
    ],
)
def test_an_unset_location_is_a_clear_error(resource, variable):
    with pytest.raises(SettingError) as error:
        resource()
    message = str(error.value)
    assert message.startswith(f"{variable} is not set")
    assert "`precompute up`" in message and 'eval "$(precompute env)"' in message


def test_locations_come_from_the_environment_and_never_default(monkeypatch, tmp_path):
    monkeypatch.delenv("PRECOMPUTE_LAKE_URI", raising=False)
    monkeypatch.delenv("PRECOMPUTE_MODEL_STORE", raising=False)
    unset = build_resources(Settings())
    assert unset["lake"].base_uri is None and unset["model_store"].root is None
    monkeypatch.setenv("PRECOMPUTE_LAKE_URI", str(tmp_path / "lake"))
    monkeypatch.setenv("PRECOMPUTE_MODEL_STORE", str(tmp_path / "models"))
    resources = build_resources(Settings("Europe/Berlin"))
    # EnvVar fields: the UI shows where the value comes from, and runs resolve it from their environment.
    assert resources["lake"].base_uri.env_var_name == "PRECOMPUTE_LAKE_URI"
    assert resources["model_store"].root.env_var_name == "PRECOMPUTE_MODEL_STORE"
    assert resources["io_manager"].lake is resources["lake"]  # one lake, not two URIs to keep equal
    assert resources["deployment"] == DeploymentResource(timezone="Europe/Berlin", partitions_start="2026-01-01")


def test_empty_locations_are_refused_rather_than_the_working_directory():
    with pytest.raises(ValueError, match="working directory"):
        Lake("")
    with pytest.raises(ValueError, match="working directory"):
        LocalModelStore(" ")


@dg.asset
def written() -> pd.DataFrame:
    return pd.DataFrame({"n": [1, 2, 3]})


@dg.asset(deps=[written])
def read_back(lake: LakeResource) -> dg.MaterializeResult:
    return dg.MaterializeResult(metadata={"rows": len(lake.lake().read("written"))})


def test_io_manager_and_assets_share_the_lake_of_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PRECOMPUTE_LAKE_URI", str(tmp_path / "lake"))
    resources = build_resources(Settings())
    result = dg.materialize(
        [written, read_back], resources={"lake": resources["lake"], "io_manager": resources["io_manager"]}
    )
    assert result.asset_materializations_for_node("read_back")[0].metadata["rows"].value == 3
    assert (tmp_path / "lake" / "written" / "__unpartitioned__.parquet").is_file()


def test_io_manager_without_a_lake_fails_naming_the_variable(monkeypatch):
    monkeypatch.delenv("PRECOMPUTE_LAKE_URI", raising=False)
    resources = build_resources(Settings())
    with pytest.raises(SettingError, match="PRECOMPUTE_LAKE_URI is not set"):
        dg.materialize([written], resources={"io_manager": resources["io_manager"]})
