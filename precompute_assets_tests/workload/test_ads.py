"""The synthetic ad platform: schema, determinism, CTR shape, volume seasonality and popularity drift."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from precompute_assets.ml.selection import traffic_profile
from precompute_assets.workload.ads import (
    DAY_MS,
    HOUR_MS,
    WEEKDAY_FACTOR,
    generate_traffic,
    hourly_volume,
    make_ads,
    true_ctr,
)

MONDAY = 1_704_067_200_000  # 2024-01-01 00:00 UTC, a Monday
DAYS = 14
QPD = 30_000


@pytest.fixture(scope="module")
def ads() -> pd.DataFrame:
    return make_ads(3_000, days=DAYS, seed=3)


@pytest.fixture(scope="module")
def traffic(ads: pd.DataFrame) -> pd.DataFrame:
    frame = pd.concat(list(generate_traffic(ads, start_ms=MONDAY, days=DAYS, queries_per_day=QPD, seed=3)))
    frame["day"] = (frame["ts_ms"] - MONDAY) // DAY_MS
    return frame.reset_index(drop=True)


def day_counts(traffic: pd.DataFrame, day: int) -> pd.Series:
    return traffic.loc[traffic["day"] == day, "ad_id"].value_counts()


def test_make_ads_schema_and_ranges():
    ads = make_ads(20_000, days=30, seed=1)
    columns = ["ad_id", "campaign_id", "category", "quality", "bid", "text_len", "created_day"]
    assert list(ads.columns) == columns
    assert ads["ad_id"].iloc[0] == "ad000000" and ads["ad_id"].iloc[-1] == "ad019999"
    assert ads["ad_id"].is_unique
    assert ads["campaign_id"].str.fullmatch(r"c\d{5}").all()
    assert 15 <= len(ads) / ads["campaign_id"].nunique() <= 25
    # A campaign sells one kind of thing.
    assert (ads.groupby("campaign_id")["category"].nunique() == 1).all()
    assert ads["category"].between(0, 19).all() and ads["category"].nunique() == 20
    assert ads["quality"].between(0, 1).all()
    assert (ads["bid"] > 0).all()
    assert ads["text_len"].between(10, 300).all()
    for column in ("category", "text_len", "created_day"):
        assert ads[column].dtype == np.int64


def test_most_ads_exist_at_day_zero_and_the_rest_launch_steadily():
    created = make_ads(20_000, days=30, seed=1)["created_day"]
    assert 0.7 < (created == 0).mean() < 0.9
    assert created.max() <= 29
    later = created[created > 0].value_counts()
    assert set(later.index) == set(range(1, 30))  # every later day launches some ads
    assert later.max() < 2 * later.min()
    assert (make_ads(100, days=1)["created_day"] == 0).all()


def test_make_ads_is_deterministic_under_seed():
    pd.testing.assert_frame_equal(make_ads(500, days=7, seed=4), make_ads(500, days=7, seed=4))
    assert not make_ads(500, days=7, seed=4).equals(make_ads(500, days=7, seed=5))


def test_true_ctr_range_and_spread():
    ctr = true_ctr(make_ads(20_000, days=5, seed=2))
    assert ctr.min() >= 0.005 and ctr.max() <= 0.20
    assert np.quantile(ctr, 0.05) < 0.015 and np.quantile(ctr, 0.95) > 0.08


def test_true_ctr_has_a_bid_step_and_category_dependent_quality_effect():
    base = {"ad_id": "x", "campaign_id": "c", "category": 0, "quality": 0.5, "bid": 1.0, "text_len": 80}
    ads = pd.DataFrame([base | {"bid": b} for b in (1.2, 1.45, 1.55, 1.8)])
    ctr = true_ctr(ads)
    assert ctr[0] == ctr[1] and ctr[2] == ctr[3]  # flat on either side of the threshold
    assert ctr[2] > 1.5 * ctr[1]  # a jump across it
    sample = make_ads(20_000, days=5, seed=2).assign(ctr=lambda f: true_ctr(f))
    slope_sign = sample.groupby("category")[["quality", "ctr"]].corr().xs("quality", level=1)["ctr"]
    assert slope_sign.max() > 0.5 and slope_sign.min() < -0.3


def r_squared(predicted: np.ndarray, actual: np.ndarray) -> float:
    return float(1 - ((actual - predicted) ** 2).sum() / ((actual - actual.mean()) ** 2).sum())


def test_a_partition_model_beats_a_linear_model_on_true_ctr():
    """What a tree ensemble exploits: cell means over coarse feature bins beat the best linear fit."""
    ads = make_ads(20_000, days=5, seed=5)
    y = true_ctr(ads)
    train = np.arange(len(ads)) < 15_000
    # One-hot categories so the linear model is not handicapped by an arbitrary category order.
    x = np.column_stack([ads[["quality", "bid", "text_len"]], np.eye(20)[ads["category"]], np.ones(len(ads))])
    coef = np.linalg.lstsq(x[train], y[train], rcond=None)[0]
    linear_r2 = r_squared(x[~train] @ coef, y[~train])
    quality, bid, text_len = (
        pd.qcut(ads[column], n, labels=False).to_numpy() for column, n in (("quality", 5), ("bid", 4), ("text_len", 4))
    )
    cell = ((ads["category"].to_numpy() * 5 + quality) * 4 + bid) * 4 + text_len
    cell_mean = pd.Series(y[train]).groupby(cell[train]).mean()
    predicted = pd.Series(cell[~train]).map(cell_mean).fillna(y[train].mean()).to_numpy()
    assert r_squared(predicted, y[~train]) > linear_r2 + 0.2


def test_hourly_volume_daily_totals_weekly_cycle_and_night_trough():
    volume = hourly_volume(start_ms=MONDAY, days=14, queries_per_day=10_000)
    assert volume.shape == (14, 24)
    weekday = np.arange(14) % 7
    np.testing.assert_array_equal(volume.sum(axis=1), np.rint(10_000 * WEEKDAY_FACTOR[weekday]))
    assert volume.sum() == 14 * 10_000  # whole weeks average exactly queries_per_day
    assert set(np.argsort(volume[0])[:2]) == {3, 4}
    assert volume[0].max() > 3 * volume[0].min()
    # A start that is not midnight shifts the hour slots but keeps the hour-of-day shape.
    shifted = hourly_volume(start_ms=MONDAY + 6 * HOUR_MS, days=1, queries_per_day=10_000)[0]
    np.testing.assert_array_equal(shifted, np.roll(volume[0], -6))


def test_traffic_schema_order_and_volume(ads: pd.DataFrame, traffic: pd.DataFrame):
    assert list(traffic.columns[:4]) == ["ts_ms", "ad_id", "user", "clicked"]
    assert traffic["ts_ms"].dtype == np.int64 and traffic["clicked"].dtype == bool
    assert traffic["ts_ms"].is_monotonic_increasing
    assert traffic["ts_ms"].between(MONDAY, MONDAY + DAYS * DAY_MS - 1).all()
    assert traffic["ad_id"].isin(ads["ad_id"]).all()
    assert traffic["user"].str.fullmatch(r"u\d+").all()
    expected = hourly_volume(start_ms=MONDAY, days=DAYS, queries_per_day=QPD)
    hour = (traffic["ts_ms"] - MONDAY) // HOUR_MS
    np.testing.assert_array_equal(hour.value_counts().sort_index().to_numpy(), expected.ravel())


def test_traffic_is_deterministic_and_independent_of_chunk_size(ads: pd.DataFrame, traffic: pd.DataFrame):
    kwargs = {"start_ms": MONDAY, "days": 3, "queries_per_day": 5_000, "seed": 9}
    chunks = list(generate_traffic(ads, chunk_size=4_000, **kwargs))
    assert [len(c) for c in chunks[:-1]] == [4_000] * (len(chunks) - 1) and 0 < len(chunks[-1]) <= 4_000
    small = pd.concat(chunks, ignore_index=True)
    whole = pd.concat(list(generate_traffic(ads, **kwargs)), ignore_index=True)
    pd.testing.assert_frame_equal(small, whole)
    other = pd.concat(list(generate_traffic(ads, **(kwargs | {"seed": 10}))), ignore_index=True)
    assert not other["ad_id"].equals(whole["ad_id"])


def test_night_trough_and_weekend_dip(traffic: pd.DataFrame):
    hour_of_day = (traffic["ts_ms"] // HOUR_MS) % 24
    hourly = hour_of_day.value_counts().reindex(range(24), fill_value=0).to_numpy()
    assert hourly.argmin() in (2, 3, 4)
    assert traffic_profile(hourly, window_hours=4)["offpeak_start_hour"] == 2
    per_day = traffic["day"].value_counts().sort_index().to_numpy()
    weekend = np.isin(np.arange(DAYS) % 7, (5, 6))
    assert per_day[weekend].max() < 0.8 * per_day[~weekend].min()


def test_ads_get_traffic_only_once_launched(ads: pd.DataFrame, traffic: pd.DataFrame):
    created = traffic["ad_id"].map(ads.set_index("ad_id")["created_day"])
    assert (traffic["day"] >= created).all()
    assert (created[traffic["day"] == 0] == 0).all()
    assert (created[traffic["day"] == DAYS - 1] > 0).mean() > 0.1


def test_popularity_is_zipf_like(traffic: pd.DataFrame):
    counts = day_counts(traffic, 0).to_numpy()[:200]
    slope = np.polyfit(np.log(np.arange(1, 201)), np.log(counts), 1)[0]
    assert -1.3 < slope < -0.8


def test_popularity_drifts(ads: pd.DataFrame, traffic: pd.DataFrame):
    def top(day: int) -> set[str]:
        return set(day_counts(traffic, day).index[:100])

    assert len(top(0) & top(1)) > 50  # day to day the head is fairly stable ...
    assert len(top(0) & top(DAYS - 1)) < 30  # ... but over two weeks it turns over
    # New ads rise for a couple of days after launch: traffic per new ad grows from age 0 to age 2.
    launched = ads.set_index("ad_id")["created_day"]
    age = traffic["day"] - traffic["ad_id"].map(launched)
    late = traffic["ad_id"].map(launched).between(1, DAYS - 3)
    assert (late & (age == 2)).sum() > 1.5 * (late & (age == 0)).sum()


def test_old_ads_fade(ads: pd.DataFrame, traffic: pd.DataFrame):
    created = traffic["ad_id"].map(ads.set_index("ad_id")["created_day"])
    last_day = traffic["day"] == DAYS - 1
    live = ads["created_day"] <= DAYS - 1
    # Day-0 ads are most of the live catalogue on the last day, yet aging leaves them a minority of traffic.
    assert (ads.loc[live, "created_day"] == 0).mean() > 0.75
    assert (created[last_day] == 0).mean() < 0.4


def test_clicks_follow_true_ctr(ads: pd.DataFrame, traffic: pd.DataFrame):
    ctr = pd.Series(true_ctr(ads), index=ads["ad_id"])
    expected = traffic["ad_id"].map(ctr)
    n = len(traffic)
    assert abs(traffic["clicked"].mean() - expected.mean()) < 4 * np.sqrt(expected.mean() / n)
    per_ad = traffic.groupby("ad_id")["clicked"].agg(["mean", "size"]).nlargest(20, "size")
    p = ctr.loc[per_ad.index]
    assert (np.abs(per_ad["mean"] - p) < 5 * np.sqrt(p * (1 - p) / per_ad["size"])).all()
