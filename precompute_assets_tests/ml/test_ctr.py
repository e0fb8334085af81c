"""The CTR model on small synthetic data whose true click-through rate is known and non-linear, with the default
feature spec and with a user's own columns (text categories, unseen values, cold-start ads)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from precompute_assets.ml.ctr import (
    MS_PER_DAY,
    CtrModel,
    NewAdEvaluation,
    TrainingIssues,
    calibration_error,
    evaluate,
    evaluate_new_ads,
    fit_encoder,
    new_ad_rows,
    predict_ctr,
    score_ads,
    time_split,
    train_ad_history,
    train_baseline,
    train_ctr_model,
    training_frame,
)
from precompute_assets.ml.features import AdFeatureSpec, clean_ad_columns
from precompute_assets.ml.model_store import LocalModelStore

FIRST_DAY = 19_700  # an arbitrary UTC day number, so days are not 0-based by accident


def make_ads(n_ads: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "ad_id": [f"ad{i:05d}" for i in range(n_ads)],
            "campaign_id": [f"c{i % 37}" for i in range(n_ads)],
            "category": rng.integers(0, 20, n_ads),
            "quality": rng.uniform(0, 1, n_ads),
            "bid": rng.lognormal(0.0, 0.7, n_ads),
            "text_len": rng.integers(10, 200, n_ads),
            "created_day": rng.integers(0, 30, n_ads),
        }
    )


def true_ctr(ads: pd.DataFrame) -> np.ndarray:
    """Mostly an XOR of two thresholds (invisible to a linear model), plus a category x length interaction."""
    xor = (ads["quality"].to_numpy() > 0.5) != (ads["bid"].to_numpy() > 1.0)
    wordy_category = (ads["category"].to_numpy() % 4 == 0) & (ads["text_len"].to_numpy() > 100)
    return 0.01 + 0.08 * xor + 0.04 * wordy_category


def make_impressions(ads: pd.DataFrame, days: int, per_ad_day: float, seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    ctr = true_ctr(ads)
    counts = rng.poisson(per_ad_day, (days, len(ads)))
    ad_index = np.concatenate([np.repeat(np.arange(len(ads)), counts[d]) for d in range(days)])
    day = np.repeat(np.arange(days), counts.sum(axis=1))
    ts_ms = (FIRST_DAY + day) * MS_PER_DAY + rng.integers(0, MS_PER_DAY, len(day))
    frame = pd.DataFrame(
        {
            "ts_ms": ts_ms.astype(np.int64),
            "ad_id": ads["ad_id"].to_numpy()[ad_index],
            "clicked": rng.random(len(day)) < ctr[ad_index],
        }
    )
    return frame.sample(frac=1.0, random_state=2).reset_index(drop=True)


def agg_frame(rows: list[tuple[str, int, int, int]], quality: list[float] | None = None) -> pd.DataFrame:
    """A training-shaped frame from (ad_id, day, impressions, clicks) rows, with neutral features."""
    frame = pd.DataFrame(rows, columns=["ad_id", "day", "impressions", "clicks"])
    frame["quality"] = quality if quality is not None else np.linspace(0.1, 0.9, len(frame))
    frame["bid"], frame["text_len"], frame["category"] = 1.0, 50.0, "0"
    return frame


class Oracle:
    """A stand-in regressor whose prediction is the ``quality`` column."""

    def predict(self, x: pd.DataFrame) -> np.ndarray:
        return x["quality"].to_numpy()


@pytest.fixture(scope="module")
def synthetic() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    ads = make_ads(400)
    frame, issues = training_frame(make_impressions(ads, days=8, per_ad_day=50), ads)
    assert issues == TrainingIssues(unknown_ads=0, missing_features=0, excluded_impressions=0)
    train, valid = time_split(frame, valid_fraction=0.25)
    return ads, train, valid


@pytest.fixture(scope="module")
def encoder(synthetic):
    _, train, _ = synthetic
    return fit_encoder(train)


@pytest.fixture(scope="module")
def forest(synthetic, encoder):
    _, train, _ = synthetic
    return train_ctr_model(train, encoder, n_estimators=30, min_samples_leaf=5, n_jobs=2)


@pytest.fixture(scope="module")
def baseline(synthetic, encoder):
    _, train, _ = synthetic
    return train_baseline(train, encoder)


# --- ad columns -----------------------------------------------------------------------------------------


def test_both_models_carry_the_encoding_learned_from_the_training_rows(synthetic, encoder, forest, baseline) -> None:
    _, train, _ = synthetic
    assert isinstance(forest, CtrModel) and isinstance(baseline, CtrModel)
    assert forest.encoder is encoder and baseline.encoder is encoder and forest.spec == AdFeatureSpec()
    assert encoder.vocabularies == {"category": tuple(sorted(str(c) for c in range(20)))}
    assert encoder.feature_names[:3] == ["quality", "log1p_bid", "log1p_text_len"]
    assert forest.estimator.n_features_in_ == baseline.estimator.n_features_in_ == 3 + 20


def test_invalid_ads_are_left_out_of_training_and_counted() -> None:
    ads = make_ads(6)
    ads["category"] = ads["category"].astype(float)
    ads["text_len"] = ads["text_len"].astype(float)
    ads.loc[1, "quality"] = np.nan
    ads.loc[2, "bid"] = -1.0  # log-scaled columns must be >= 0
    ads.loc[3, "category"] = np.nan
    ads.loc[4, "text_len"] = np.inf
    ads.loc[5, "ad_id"] = " "
    frame, issues = training_frame(make_impressions(ads, days=2, per_ad_day=5), ads)
    assert set(frame["ad_id"]) == {ads.loc[0, "ad_id"]}
    assert issues.missing_features == 5 and issues.unknown_ads == 0


def test_ads_table_problems_raise() -> None:
    ads = make_ads(3)
    impressions = make_impressions(ads, days=2, per_ad_day=5)
    with pytest.raises(ValueError, match="duplicate ad_id"):
        training_frame(impressions, pd.concat([ads, ads.iloc[[0]]]))
    with pytest.raises(ValueError, match=r"missing columns \['bid'\]"):
        training_frame(impressions, ads.drop(columns="bid"))
    with pytest.raises(ValueError, match=r"ads table is missing columns \['brand'\]"):
        training_frame(impressions, ads, AdFeatureSpec(numeric=("quality",), categorical=("brand",), log_scaled=()))


# --- training frame -------------------------------------------------------------------------------------


def test_training_frame_aggregates_per_ad_and_utc_day_and_reports_exclusions() -> None:
    ads = make_ads(3)
    ads.loc[2, "quality"] = np.nan
    a1, a2, nan_ad = ads["ad_id"]
    day0 = FIRST_DAY * MS_PER_DAY
    impressions = pd.DataFrame(
        [
            (day0, a1, False),
            (day0 + 1000, a1, True),
            (day0 + MS_PER_DAY - 1, a1, False),  # last ms of day 0
            (day0 + MS_PER_DAY, a1, True),  # first ms of day 1
            (day0 + MS_PER_DAY + 5, a1, True),
            (day0 + MS_PER_DAY + 7, a2, False),
            (day0, nan_ad, True),
            (day0 + 9, nan_ad, False),
            (day0, "unknown-1", True),
            (day0 + 1, "unknown-2", False),
            (day0 + MS_PER_DAY, "unknown-1", False),
            (day0 + 2, None, False),
        ],
        columns=["ts_ms", "ad_id", "clicked"],
    )
    frame, issues = training_frame(impressions, ads)
    assert issues == TrainingIssues(unknown_ads=4, missing_features=1, excluded_impressions=6)
    assert frame[["ad_id", "day", "impressions", "clicks"]].values.tolist() == [
        [a1, FIRST_DAY, 3, 1],
        [a1, FIRST_DAY + 1, 2, 2],
        [a2, FIRST_DAY + 1, 1, 0],
    ]
    columns = ["quality", "bid", "text_len", "category"]
    expected = clean_ad_columns(ads, AdFeatureSpec()).set_index(ads["ad_id"]).loc[[a1, a1, a2], columns]
    assert frame[columns].values.tolist() == expected.values.tolist()
    assert frame[columns].notna().all().all()
    assert frame["category"].tolist() == [str(c) for c in ads["category"].iloc[[0, 0, 1]]]


def test_training_frame_days_are_the_partitions_local_days() -> None:
    """Days were UTC days while the partitions are local: in Los Angeles the held-back "last day" was 00:00-08:00 of
    the partition's day, and its evening fell in the next UTC day (h_ctr)."""
    from datetime import datetime
    from zoneinfo import ZoneInfo

    ads = make_ads(2)
    la = ZoneInfo("America/Los_Angeles")

    def ms_at(day: int, hour: int) -> int:
        return int(datetime(2026, 11, day, hour, tzinfo=la).timestamp() * 1000)

    impressions = pd.DataFrame(
        [(ms_at(17, 1), "ad00000", False), (ms_at(17, 20), "ad00000", True), (ms_at(18, 1), "ad00001", True)],
        columns=["ts_ms", "ad_id", "clicked"],
    )
    local, _ = training_frame(impressions, ads, timezone="America/Los_Angeles")
    nov17 = (datetime(2026, 11, 17) - datetime(1970, 1, 1)).days
    assert local[["ad_id", "day", "impressions"]].values.tolist() == [["ad00000", nov17, 2], ["ad00001", nov17 + 1, 1]]
    utc, _ = training_frame(impressions, ads)  # 20:00 in Los Angeles is 04:00 UTC the next day
    assert utc[["ad_id", "day", "impressions"]].values.tolist() == [
        ["ad00000", nov17, 1], ["ad00000", nov17 + 1, 1], ["ad00001", nov17 + 1, 1]
    ]  # fmt: skip


def test_training_frame_compresses_impressions_into_ad_days(synthetic) -> None:
    _, train, valid = synthetic
    both = pd.concat([train, valid])
    assert len(both) <= 400 * 8
    assert not both.duplicated(["ad_id", "day"]).any()
    assert int(both["impressions"].sum()) > 100_000
    assert (both["clicks"] <= both["impressions"]).all()


def test_integer_ad_ids_in_the_impressions_match_the_ads_by_their_text() -> None:
    """An ad server that writes its ids as integers (Parquet int64) trains as one that writes text: the ads table
    is indexed by its ids' text, and the impressions' ids were compared as integers, so every one was unknown."""
    ads = make_ads(40).assign(ad_id=lambda frame: np.arange(1000, 1040))
    impressions = make_impressions(ads, days=2, per_ad_day=5)
    as_text = impressions.assign(ad_id=impressions["ad_id"].astype(str))
    frame, issues = training_frame(impressions, ads)
    expected, _ = training_frame(as_text, ads)
    assert issues.unknown_ads == 0 and len(frame) > 0
    pd.testing.assert_frame_equal(frame, expected)


def test_integer_ad_ids_with_a_missing_one_match_the_ads_by_their_text() -> None:
    """pandas reads a Parquet int64 column with a null as floats: their text ('1000.0') matched no ad, so one
    impression without an ad id made every impression unknown and training failed with 'training data is empty'."""
    import pyarrow as pa

    ads = make_ads(40).assign(ad_id=lambda frame: np.arange(1000, 1040))
    impressions = make_impressions(ads, days=2, per_ad_day=5)
    with_null = pd.concat([impressions, impressions.iloc[:1].assign(ad_id=None)], ignore_index=True)
    written = pa.table({name: pa.array(with_null[name].tolist()) for name in ("ts_ms", "ad_id", "clicked")})
    read = written.to_pandas()  # an ad server's int64 column, as the lake reads it
    assert pd.api.types.is_float_dtype(read["ad_id"])
    frame, issues = training_frame(read, ads)
    expected, _ = training_frame(impressions.assign(ad_id=impressions["ad_id"].astype(str)), ads)
    assert issues.unknown_ads == 1
    pd.testing.assert_frame_equal(frame, expected)


# --- time split -----------------------------------------------------------------------------------------


def test_time_split_holds_out_the_last_days() -> None:
    frame = agg_frame([(f"a{d % 3}", d, 10, 1) for d in range(10, 20)])
    train, valid = time_split(frame, valid_fraction=0.2)
    assert sorted(valid["day"]) == [18, 19]
    assert sorted(train["day"]) == list(range(10, 18))
    # Days are counted as distinct days present, so gaps do not matter.
    gappy = agg_frame([("a", 1, 5, 1), ("b", 1, 5, 1), ("a", 5, 5, 1), ("b", 9, 5, 1)])
    train, valid = time_split(gappy, valid_fraction=0.2)
    assert valid["day"].tolist() == [9]
    assert train["day"].max() < valid["day"].min()


def test_time_split_always_keeps_a_training_day() -> None:
    frame = agg_frame([("a", 1, 5, 1), ("b", 2, 5, 1)])
    train, valid = time_split(frame, valid_fraction=0.9)
    assert train["day"].tolist() == [1]
    assert valid["day"].tolist() == [2]


def test_time_split_rejects_single_day_empty_data_and_bad_fractions() -> None:
    one_day = agg_frame([("a", 3, 5, 1), ("b", 3, 5, 0)])
    with pytest.raises(ValueError, match="at least 2 distinct days.*has 1"):
        time_split(one_day)
    with pytest.raises(ValueError, match="at least 2 distinct days.*has 0"):
        time_split(one_day.iloc[:0])
    for fraction in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="valid_fraction"):
            time_split(one_day, valid_fraction=fraction)


# --- models and metrics ---------------------------------------------------------------------------------


def test_forest_beats_logistic_baseline_on_non_linear_ctr(synthetic, forest, baseline) -> None:
    ads, _, valid = synthetic
    rf = evaluate(forest, valid)
    lr = evaluate(baseline, valid)
    assert set(rf) == {"auc", "log_loss", "calibration_error", "valid_impressions"}
    assert rf["auc"] > lr["auc"] + 0.05
    assert rf["log_loss"] < lr["log_loss"]
    assert 0.5 < lr["auc"] < rf["auc"]
    # Clicks are coin flips, so even the true CTR ranks them imperfectly: the forest should come close.
    truth = pd.Series(true_ctr(ads), index=ads["ad_id"])
    oracle = evaluate(Oracle(), valid.assign(quality=truth.loc[valid["ad_id"]].to_numpy()))
    assert rf["auc"] > oracle["auc"] - 0.02
    assert rf["log_loss"] < oracle["log_loss"] + 0.005


def test_rare_clicks_get_calibrated_rates_not_the_clip() -> None:
    """At a CTR of 0.1 % most (ad, day) rows hold no click: leaves of such rows predicted 0, served as the 1e-6 clip
    to ads whose CTR was 100 to 700 times that (h_ctr). Leaves are shrunk toward the overall CTR by one click."""
    rng = np.random.default_rng(7)
    ads = make_ads(2000, seed=7)
    ctr = 0.001 * np.exp(rng.normal(0.0, 0.5, len(ads))) * np.where(ads["quality"].to_numpy() > 0.5, 2.0, 0.5)
    popularity = 1.0 / np.arange(1, len(ads) + 1) ** 1.1
    counts = rng.poisson(150_000 * popularity / popularity.sum(), (8, len(ads)))
    ad_index = np.concatenate([np.repeat(np.arange(len(ads)), counts[d]) for d in range(8)])
    day = np.repeat(np.arange(8), counts.sum(axis=1))
    impressions = pd.DataFrame(
        {
            "ts_ms": ((FIRST_DAY + day) * MS_PER_DAY + rng.integers(0, MS_PER_DAY, len(day))).astype(np.int64),
            "ad_id": ads["ad_id"].to_numpy()[ad_index],
            "clicked": rng.random(len(day)) < ctr[ad_index],
        }
    )
    frame, _ = training_frame(impressions, ads)
    train, valid = time_split(frame, valid_fraction=0.25)
    encoder = fit_encoder(train)
    forest = train_ctr_model(train, encoder, n_estimators=30, n_jobs=2)
    predicted = predict_ctr(forest, ads)
    overall = train["clicks"].sum() / train["impressions"].sum()
    assert predicted.min() > overall / 20, np.sort(predicted)[:5]  # unshrunk: overall / 50 here, the clip elsewhere
    assert evaluate(forest, valid)["calibration_error"] < overall / 5  # still calibrated on the held-back days
    assert np.corrcoef(np.log(predicted), np.log(ctr))[0, 1] > 0.5


def test_metrics_are_in_sane_ranges(synthetic, forest, baseline) -> None:
    _, train, valid = synthetic
    prior = train["clicks"].sum() / train["impressions"].sum()
    valid_ctr = valid["clicks"].sum() / valid["impressions"].sum()
    constant_log_loss = -(valid_ctr * math.log(prior) + (1 - valid_ctr) * math.log(1 - prior))
    for model in (forest, baseline):
        metrics = evaluate(model, valid)
        assert 0 < metrics["log_loss"] < constant_log_loss
        assert 0 <= metrics["calibration_error"] < 0.02
        assert metrics["valid_impressions"] == valid["impressions"].sum()


def test_forest_predictions_track_the_true_ctr(synthetic, forest) -> None:
    ads, _, _ = synthetic
    predicted = predict_ctr(forest, ads)
    assert np.corrcoef(predicted, true_ctr(ads))[0, 1] > 0.8


def test_weighted_auc_and_log_loss_equal_the_expanded_impressions() -> None:
    valid = agg_frame([("a", 1, 7, 2), ("b", 1, 5, 0), ("c", 1, 4, 3), ("d", 1, 6, 1)], quality=[0.3, 0.1, 0.6, 0.2])
    metrics = evaluate(Oracle(), valid)
    ctr = valid["quality"].to_numpy()
    pairs = zip(valid["clicks"], valid["impressions"], strict=True)
    y = np.concatenate([np.repeat([1, 0], [c, n - c]) for c, n in pairs])
    p = np.repeat(ctr, valid["impressions"])
    assert metrics["auc"] == pytest.approx(roc_auc_score(y, p))
    assert metrics["log_loss"] == pytest.approx(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    assert metrics["valid_impressions"] == 22


def test_calibration_error_is_zero_for_a_calibrated_predictor_and_measures_bias() -> None:
    rng = np.random.default_rng(3)
    ctr = rng.integers(1, 400, 200) / 1000
    impressions = np.full(200, 1000)
    clicks = impressions * ctr
    assert calibration_error(ctr, impressions, clicks) == pytest.approx(0.0, abs=1e-12)
    # Predicting double the rate is off by exactly the mean rate in every bin.
    assert calibration_error(2 * ctr, impressions, clicks) == pytest.approx(ctr.mean())
    # A constant at the mean rate is calibrated (if useless): one bin, no gap.
    flat = np.full(200, ctr.mean())
    assert calibration_error(flat, impressions, clicks) == pytest.approx(0.0, abs=1e-12)
    # Right rates, wrong ads: the lowest predictions get the highest observed rates and vice versa.
    reversed_ctr = np.sort(ctr)
    reversed_clicks = impressions * reversed_ctr[::-1]
    assert calibration_error(reversed_ctr, impressions, reversed_clicks) > 0.1


def test_evaluate_reports_zero_calibration_error_for_an_oracle() -> None:
    rows = [(f"a{i}", 1, 1000, q) for i, q in enumerate(range(10, 400, 13))]
    valid = agg_frame(rows, quality=[r[3] / 1000 for r in rows])
    assert evaluate(Oracle(), valid)["calibration_error"] == pytest.approx(0.0, abs=1e-12)


def test_predict_ctr_clips_and_uses_the_click_class(baseline, synthetic) -> None:
    class Wild:
        def predict(self, x: pd.DataFrame) -> np.ndarray:
            return np.array([-0.5, 0.0, 0.3, 1.0, 2.0])

    clipped = predict_ctr(Wild(), agg_frame([(f"a{i}", 1, 1, 0) for i in range(5)]))
    np.testing.assert_allclose(clipped, [1e-6, 1e-6, 0.3, 1 - 1e-6, 1 - 1e-6])
    _, _, valid = synthetic
    expected = baseline.estimator.predict_proba(baseline.encoder.encode(valid))[:, 1]
    np.testing.assert_allclose(predict_ctr(baseline, valid), expected)


# --- clear errors on degenerate data --------------------------------------------------------------------


def test_empty_training_data_raises() -> None:
    ads = make_ads(3)
    no_impressions = pd.DataFrame({"ts_ms": pd.Series(dtype="int64"), "ad_id": [], "clicked": []})
    frame, issues = training_frame(no_impressions, ads)
    assert len(frame) == 0
    assert issues == TrainingIssues(0, 0, 0)
    encoder = fit_encoder(frame)
    assert encoder.vocabularies == {"category": ()}
    for train in (train_ctr_model, train_baseline):
        with pytest.raises(ValueError, match="training data is empty"):
            train(frame, encoder)


def test_only_unknown_ads_leave_nothing_to_train_on() -> None:
    ads = make_ads(3)
    impressions = make_impressions(ads, days=2, per_ad_day=5)
    impressions["ad_id"] = "gone-" + impressions["ad_id"]
    frame, issues = training_frame(impressions, ads)
    assert issues.unknown_ads == len(impressions) == issues.excluded_impressions
    with pytest.raises(ValueError, match="training data is empty"):
        train_ctr_model(frame, fit_encoder(frame), n_jobs=1)


def test_single_ad_data_raises() -> None:
    single = agg_frame([("a", 1, 50, 5), ("a", 2, 50, 4), ("a", 3, 40, 2)])
    train, valid = time_split(single)
    with pytest.raises(ValueError, match="single ad"):
        train_ctr_model(train, fit_encoder(train), n_jobs=1)
    with pytest.raises(ValueError, match="single ad"):
        train_baseline(train, fit_encoder(train))
    with pytest.raises(ValueError, match="validation set has a single ad"):
        evaluate(Oracle(), valid)


def test_validation_without_clicks_or_non_clicks_raises() -> None:
    with pytest.raises(ValueError, match="validation set has no clicks"):
        evaluate(Oracle(), agg_frame([("a", 9, 10, 0), ("b", 9, 20, 0)]))
    with pytest.raises(ValueError, match="validation set has no non-clicks"):
        evaluate(Oracle(), agg_frame([("a", 9, 10, 10), ("b", 9, 20, 20)]))
    with pytest.raises(ValueError, match="validation set is empty"):
        evaluate(Oracle(), agg_frame([]))
    no_clicks = agg_frame([("a", 1, 10, 0), ("b", 1, 20, 0)])
    with pytest.raises(ValueError, match="training data has no clicks"):
        train_baseline(no_clicks, fit_encoder(no_clicks))


# --- scoring --------------------------------------------------------------------------------------------


def test_score_ads_keeps_order_and_returns_skipped_ids(synthetic, forest) -> None:
    ads, _, _ = synthetic
    ads = ads.copy()
    ads.loc[7, "bid"] = np.nan
    ids = ads["ad_id"]
    requested = [ids[5], "no-such-ad", ids[2], ids[7], ids[5], ids[300]]
    scores, skipped = score_ads(forest, ads, requested)
    assert list(scores.columns) == ["ad_id", "ctr"]
    assert scores["ad_id"].tolist() == [ids[5], ids[2], ids[5], ids[300]]
    assert skipped == ["no-such-ad", ids[7]]
    assert scores["ctr"].dtype == np.float64
    expected = predict_ctr(forest, ads.set_index("ad_id").loc[[ids[5], ids[2], ids[5], ids[300]]])
    np.testing.assert_allclose(scores["ctr"], expected)
    assert ((scores["ctr"] > 0) & (scores["ctr"] < 1)).all()


def test_score_ads_works_for_the_baseline_and_empty_requests(synthetic, baseline) -> None:
    ads, _, _ = synthetic
    scores, skipped = score_ads(baseline, ads, ads["ad_id"].tolist())
    assert skipped == []
    assert scores["ad_id"].tolist() == ads["ad_id"].tolist()
    empty, skipped = score_ads(baseline, ads, [])
    assert list(empty.columns) == ["ad_id", "ctr"]
    assert len(empty) == 0
    assert skipped == []


def test_score_ads_needs_a_model_with_its_encoding_and_the_spec_columns(synthetic, forest) -> None:
    ads, _, _ = synthetic
    with pytest.raises(TypeError, match="needs a CtrModel.*trained again"):
        score_ads(forest.estimator, ads, ads["ad_id"].tolist())
    with pytest.raises(ValueError, match=r"ads table is missing columns \['category'\]"):
        score_ads(forest, ads.drop(columns="category"), ads["ad_id"].tolist())


def test_a_stored_model_scores_with_nothing_but_the_ads(tmp_path, synthetic, forest) -> None:
    ads, _, _ = synthetic
    store = LocalModelStore(tmp_path)
    store.save("ctr_model", "v1", forest, {})
    loaded = store.load("ctr_model", "v1")
    ids = ads["ad_id"].tolist()[:50]
    pd.testing.assert_frame_equal(score_ads(loaded, ads, ids)[0], score_ads(forest, ads, ids)[0])
    assert loaded.encoder == forest.encoder


# --- a user's own ad columns ------------------------------------------------------------------------------

OWN_SPEC = AdFeatureSpec(numeric=("price", "age_days"), categorical=("brand", "device"), log_scaled=("price",))
BRANDS = ["acme", "globex", "initech", "umbrella", "hooli"]


def make_own_ads(n_ads: int, seed: int = 0) -> pd.DataFrame:
    """A catalog with text categories and no synthetic-workload columns at all."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "ad_id": [f"own-{i}" for i in range(n_ads)],
            "price": rng.lognormal(3.0, 1.0, n_ads),
            "age_days": rng.integers(0, 400, n_ads).astype(float),
            "brand": rng.choice(BRANDS, n_ads),
            "device": rng.choice(["mobile", "desktop", "tablet"], n_ads),
        }
    )


def own_ctr(ads: pd.DataFrame) -> np.ndarray:
    """Brand x device interaction (a linear model sees only the average of each) plus a price step."""
    liked = {("acme", "mobile"), ("globex", "desktop"), ("initech", "tablet"), ("umbrella", "mobile")}
    pairs = zip(ads["brand"], ads["device"], strict=True)
    return 0.01 + 0.07 * np.array([pair in liked for pair in pairs]) + 0.03 * (ads["price"].to_numpy() > 20)


def own_impressions(ads: pd.DataFrame, days: int, *, first_day: np.ndarray | None = None) -> pd.DataFrame:
    rng = np.random.default_rng(5)
    counts = rng.poisson(60, (days, len(ads)))
    if first_day is not None:
        counts[np.arange(days)[:, None] < first_day[None, :]] = 0
    ad_index = np.concatenate([np.repeat(np.arange(len(ads)), counts[d]) for d in range(days)])
    day = np.repeat(np.arange(days), counts.sum(axis=1))
    return pd.DataFrame(
        {
            "ts_ms": ((FIRST_DAY + day) * MS_PER_DAY + rng.integers(0, MS_PER_DAY, len(day))).astype(np.int64),
            "ad_id": ads["ad_id"].to_numpy()[ad_index],
            "clicked": rng.random(len(day)) < own_ctr(ads)[ad_index],
        }
    )


@pytest.fixture(scope="module")
def own() -> dict:
    """300 ads of a user's own columns; the last 90 launch on the first validation day (cold start)."""
    ads = make_own_ads(300)
    first_day = np.where(np.arange(300) >= 210, 6, 0)
    frame, issues = training_frame(own_impressions(ads, 8, first_day=first_day), ads, OWN_SPEC)
    assert issues == TrainingIssues(0, 0, 0)
    train, valid = time_split(frame, valid_fraction=0.25)
    encoder = fit_encoder(train, OWN_SPEC)
    forest = train_ctr_model(train, encoder, n_estimators=40, min_samples_leaf=5, n_jobs=2)
    return {"ads": ads, "train": train, "valid": valid, "forest": forest, "baseline": train_baseline(train, encoder)}


def test_own_columns_are_learned_with_text_vocabularies(own) -> None:
    forest, baseline, valid = own["forest"], own["baseline"], own["valid"]
    assert forest.encoder.vocabularies == {"brand": tuple(sorted(BRANDS)), "device": ("desktop", "mobile", "tablet")}
    assert forest.encoder.feature_names[:2] == ["log1p_price", "age_days"]
    assert list(own["train"].columns) == ["ad_id", "day", "impressions", "clicks", *OWN_SPEC.columns[1:]]
    rf, lr = evaluate(forest, valid), evaluate(baseline, valid)
    assert rf["auc"] > lr["auc"] > 0.5


def test_unseen_category_values_score_as_the_unseen_bucket_never_an_error(own) -> None:
    forest = own["forest"]
    ads = own["ads"].iloc[:3].copy()
    ads["ad_id"] = ["n1", "n2", "n3"]
    ads["price"], ads["age_days"], ads["device"] = 30.0, 10.0, "mobile"
    ads["brand"] = ["brand-new", "another-new", "acme"]
    ads.loc[2, "device"] = "smart-tv"  # a known brand on an unseen device
    scores, skipped = score_ads(forest, ads, ["n1", "n2", "n3"])
    assert skipped == [] and scores["ad_id"].tolist() == ["n1", "n2", "n3"]
    assert scores["ctr"].iloc[0] == scores["ctr"].iloc[1]  # both brands encode as all zeros
    brand_block = forest.encoder.encode(ads)[:, 2 : 2 + len(BRANDS)]
    assert brand_block[:2].sum() == 0 and brand_block[2].sum() == 1
    assert forest.encoder.unseen(ads) == {"brand": 2, "device": 1}


def test_rare_category_values_are_folded_into_the_unseen_bucket() -> None:
    ads = make_own_ads(60)
    ads.loc[:1, "brand"] = "tiny"  # two ads
    frame, _ = training_frame(own_impressions(ads, 2), ads, OWN_SPEC)
    assert "tiny" not in fit_encoder(frame, OWN_SPEC, min_category_ads=3).vocabularies["brand"]
    assert "tiny" in fit_encoder(frame, OWN_SPEC, min_category_ads=2).vocabularies["brand"]
    capped = fit_encoder(frame, OWN_SPEC, max_category_values=2).vocabularies["brand"]
    counts = ads[ads["brand"] != "tiny"]["brand"].value_counts()
    assert len(capped) == 2 and set(capped) <= set(counts.index)
    assert min(counts[list(capped)]) >= counts.drop(list(capped)).max()
    # categorical columns only, every value rarer than min_category_ads: scikit-learn's "0 feature(s)" (h_ctr)
    only_categories = AdFeatureSpec(numeric=(), categorical=("brand", "device"), log_scaled=())
    with pytest.raises(ValueError, match="no feature to learn from: .* categorical only"):
        fit_encoder(frame, only_categories, min_category_ads=1000)


# --- cold start: ads first seen after the training cutoff -------------------------------------------------


def test_new_ad_auc_is_measured_for_both_models_on_the_same_rows(own) -> None:
    train, valid = own["train"], own["valid"]
    rows = new_ad_rows(train, valid)
    assert set(rows["ad_id"]) == {f"own-{i}" for i in range(210, 300)}
    assert not set(rows["ad_id"]) & set(train["ad_id"])
    result = evaluate_new_ads(own["forest"], own["baseline"], train, valid)
    assert result.ads == 90 and result.impressions == int(rows["impressions"].sum()) and result.note is None
    assert 0.5 < result.baseline_auc < result.auc <= 1.0
    # The same number evaluate() gives on exactly those rows.
    assert result.auc == pytest.approx(evaluate(own["forest"], rows)["auc"])
    assert result.baseline_auc == pytest.approx(evaluate(own["baseline"], rows)["auc"])


def test_new_ad_auc_is_not_measurable_without_new_ads_one_ad_or_one_class() -> None:
    train = agg_frame([("a", 1, 10, 2), ("b", 1, 10, 1)])
    cases = {
        "no ads first seen": agg_frame([("a", 2, 10, 1), ("b", 2, 10, 3)]),
        "a single ad first seen": agg_frame([("a", 2, 10, 1), ("new", 2, 10, 3)]),
        "no clicks among the 30 impressions": agg_frame([("n1", 2, 10, 0), ("n2", 2, 20, 0), ("a", 2, 5, 1)]),
        "every one of the 30 impressions": agg_frame([("n1", 2, 10, 10), ("n2", 2, 20, 20)]),
    }
    for expected, valid in cases.items():
        result = evaluate_new_ads(Oracle(), Oracle(), train, valid)
        assert result.auc is None and result.baseline_auc is None and expected in result.note, result
    measured = evaluate_new_ads(Oracle(), Oracle(), train, agg_frame([("n1", 2, 10, 1), ("n2", 2, 10, 5)]))
    # clicks 1 at 0.1 and 5 at 0.9, non-clicks 9 at 0.1 and 5 at 0.9: (5 * 9 + 34 ties / 2) / (6 * 14) pairs
    assert measured == NewAdEvaluation(auc=pytest.approx(62 / 84), baseline_auc=pytest.approx(62 / 84), ads=2,
                                       impressions=20)  # fmt: skip


def test_the_logistic_baseline_is_not_broken_by_a_numeric_column_in_the_millions() -> None:
    """A user's numeric column in the millions (a budget in micros) whose CTR is logistic in it: the baseline ranks
    the validation rows about as well as the true CTR does (unscaled, lbfgs stopped with the sign wrong: AUC 0.19)."""
    rng = np.random.default_rng(0)
    n_ads, days = 200, 6
    z = rng.normal(0, 1, n_ads)
    ads = pd.DataFrame({"ad_id": [f"ad{i}" for i in range(n_ads)], "budget": 5e6 + 1e6 * z,
                        "category": rng.integers(0, 4, n_ads)})  # fmt: skip
    counts = rng.poisson(40, (days, n_ads))
    ad_index = np.concatenate([np.repeat(np.arange(n_ads), counts[d]) for d in range(days)])
    day = np.repeat(np.arange(days), counts.sum(axis=1))
    impressions = pd.DataFrame(
        {
            "ts_ms": ((FIRST_DAY + day) * MS_PER_DAY).astype(np.int64),
            "ad_id": ads["ad_id"].to_numpy()[ad_index],
            "clicked": rng.random(len(day)) < (1 / (1 + np.exp(3 - 1.5 * z)))[ad_index],
        }
    )
    spec = AdFeatureSpec(numeric=("budget",), categorical=("category",), log_scaled=())
    train, valid = time_split(training_frame(impressions, ads, spec)[0], valid_fraction=0.34)
    true_ctr = 1 / (1 + np.exp(3 - 1.5 * (valid["budget"] / 1e6 - 5)))
    oracle = evaluate(Oracle(), valid.assign(quality=true_ctr))["auc"]
    assert evaluate(train_baseline(train, fit_encoder(train, spec)), valid)["auc"] > oracle - 0.01


def test_the_ad_history_baseline_is_each_ads_clicks_shrunk_toward_the_overall_rate():
    """The simplest baseline, beside the forest and the logistic regression: an ad's own training clicks over its
    impressions, with a prior of one expected click; an ad without training rows gets the overall rate."""
    train = pd.DataFrame({"ad_id": ["a", "a", "b"], "clicks": [4, 6, 0], "impressions": [50, 50, 100]})
    model = train_ad_history(train)  # overall 10 / 200 = 0.05: the prior is 20 impressions holding 1 click
    rows = pd.DataFrame({"ad_id": ["a", "b", "new"]})
    assert predict_ctr(model, rows) == pytest.approx([11 / 120, 1 / 120, 0.05])
    valid = pd.DataFrame({"ad_id": ["a", "b", "new"], "clicks": [9, 1, 5], "impressions": [100, 100, 100]})
    assert evaluate(model, valid)["auc"] == pytest.approx(
        roc_auc_score([1, 1, 1, 0, 0, 0], [11 / 120, 1 / 120, 0.05] * 2, sample_weight=[9, 1, 5, 91, 99, 95])
    )
    with pytest.raises(ValueError, match="no clicks"):
        train_ad_history(train.assign(clicks=0))
