"""Selection logic: daily counts, recency-weighted demand, top-N, coverage and the off-peak window."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from precompute_assets.ml.selection import ad_demand, coverage, daily_counts, select_top, traffic_profile


def counts(**by_key: int) -> pd.Series:
    return pd.Series(by_key, dtype="int64")


def test_daily_counts_from_array_and_series():
    result = daily_counts(np.array(["b", "a", "b", "c", "b", "a"]))
    assert result.to_dict() == {"b": 3, "a": 2, "c": 1}
    assert result.dtype == np.int64
    assert daily_counts(pd.Series([7, 7, 9])).to_dict() == {7: 2, 9: 1}
    unused = pd.Series(["x", "x"], dtype="category").cat.add_categories(["never"])
    assert daily_counts(unused).to_dict() == {"x": 2}
    assert daily_counts(np.array([], dtype=np.int64)).empty


def test_demand_weights_days_by_recency_by_hand():
    # half-life 1 day: the older day counts half.
    demand = ad_demand([counts(a=4, b=1), counts(b=2, c=1)], half_life_days=1.0)
    assert demand.index.tolist() == ["b", "a", "c"]
    assert demand.to_dict() == pytest.approx({"b": 2.5, "a": 2.0, "c": 1.0})


def test_demand_half_life_weights_over_three_days():
    demand = ad_demand([counts(x=1), counts(y=1), counts(z=1)], half_life_days=2.0)
    assert demand.to_dict() == pytest.approx({"z": 1.0, "y": 0.5**0.5, "x": 0.5})
    # A longer half-life flattens the weights toward a plain sum.
    flat = ad_demand([counts(x=3), counts(y=2)], half_life_days=1e9)
    assert flat.to_dict() == pytest.approx({"x": 3.0, "y": 2.0})


def test_demand_sorted_descending_with_ties_by_key():
    demand = ad_demand([counts(d=2, b=2, c=1, a=2)])
    assert demand.index.tolist() == ["a", "b", "d", "c"]


def test_demand_of_no_traffic_is_empty():
    assert ad_demand([]).empty
    assert ad_demand([pd.Series(dtype="int64"), pd.Series(dtype="int64")]).empty
    with pytest.raises(ValueError):
        ad_demand([counts(a=1)], half_life_days=0)


def test_select_top():
    demand = pd.Series({"c": 1.0, "b": 5.0, "a": 5.0, "d": 3.0})  # deliberately unsorted
    assert select_top(demand, 2) == ["a", "b"]
    assert select_top(demand, 3) == ["a", "b", "d"]
    assert select_top(demand, 10) == ["a", "b", "d", "c"]
    assert select_top(demand, 0) == []
    assert select_top(pd.Series(dtype=float), 5) == []
    ints = select_top(ad_demand([daily_counts(np.array([5, 5, 3, 9, 9, 9]))]), 2)
    assert ints == [9, 5] and all(type(k) is int for k in ints)


def test_coverage():
    day = counts(a=6, b=3, c=1)
    assert coverage(["a"], day) == pytest.approx(0.6)
    assert coverage(iter(["a", "c", "zz"]), day) == pytest.approx(0.7)
    assert coverage([], day) == 0.0
    assert coverage(["a", "b", "c"], day) == pytest.approx(1.0)
    assert coverage(["a"], pd.Series(dtype="int64")) == 0.0
    assert coverage(["a"], counts(a=0, b=0)) == 0.0


def test_traffic_profile_finds_the_night_trough():
    hourly = [100.0] * 24
    hourly[2:6] = [10, 5, 5, 10]
    profile = traffic_profile(hourly, window_hours=4)
    assert profile == {"queries_per_hour": hourly, "offpeak_start_hour": 2, "offpeak_hours": 4}
    assert traffic_profile(hourly, window_hours=2)["offpeak_start_hour"] == 3


def test_traffic_profile_window_wraps_around_midnight():
    hourly = [50.0] * 24
    hourly[22], hourly[23], hourly[0], hourly[1] = 3, 2, 1, 4
    assert traffic_profile(hourly, window_hours=4)["offpeak_start_hour"] == 22
    assert traffic_profile(hourly, window_hours=3)["offpeak_start_hour"] == 22


def test_traffic_profile_ties_go_to_the_earliest_start():
    assert traffic_profile([7] * 24)["offpeak_start_hour"] == 0
    hourly = [9.0] * 24
    hourly[5] = hourly[15] = 0.1
    assert traffic_profile(hourly, window_hours=3)["offpeak_start_hour"] == 3
    # 0.1 + 0.2 != 0.3 + 0.0 in floating point, but the two windows carry the same traffic.
    hourly = [9.0] * 24
    hourly[1], hourly[2], hourly[4], hourly[5] = 0.1, 0.2, 0.3, 0.0
    assert traffic_profile(hourly, window_hours=2)["offpeak_start_hour"] == 1
    assert traffic_profile(hourly, window_hours=24)["offpeak_start_hour"] == 0


@pytest.mark.parametrize(
    ("hourly", "window"), [([1.0] * 23, 4), ([1.0] * 24, 0), ([1.0] * 24, 25), ([-1.0] + [1.0] * 23, 4)]
)
def test_traffic_profile_rejects_bad_input(hourly: list[float], window: int):
    with pytest.raises(ValueError):
        traffic_profile(hourly, window_hours=window)
