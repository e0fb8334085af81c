"""The next-action model: session features, baselines on the same rows, and a calibrated forest that beats them."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from precompute_assets.ml import next_action as na
from precompute_assets.serving.events import ACTIONS
from precompute_assets.workload.users import generate_user_events, make_users

START_MS = 1_763_942_400_000  # Monday 2025-11-24 00:00 UTC
MIN = 60_000


@pytest.fixture(scope="module")
def split():
    frame = generate_user_events(make_users(150, seed=2), start_ms=START_MS, days=10, seed=2)
    rows = na.labelled(na.event_features(frame))
    return na.time_split(rows)


def test_features_split_sessions_and_count_the_day():
    at = START_MS + 9 * 60 * MIN  # 09:00
    frame = pd.DataFrame(
        {
            "ts_ms": [at, at + MIN, at + 3 * MIN, at + 90 * MIN, at + 91 * MIN, at + 2 * MIN],
            "user": ["a", "a", "a", "a", "a", "b"],
            "action": ["login", "dashboard_view", "campaign_create", "analytics_view", "dashboard_view", "login"],
        }
    )
    features = na.event_features(frame, "Europe/Berlin")
    a = features[features["user"] == "a"]
    assert a["next_action"].tolist() == ["dashboard_view", "campaign_create", None, "dashboard_view", None]
    assert a["actions_today"].tolist() == [1, 2, 3, 4, 5]
    assert a["session_minutes"].tolist() == [0, 1, 3, 0, 1]  # a 87-minute pause starts a new session
    assert a["hour"].iloc[0] == 10.0  # local time: Berlin is UTC+1 in November
    assert a["day_of_week"].iloc[0] == 0
    states = na.latest_states(frame)
    assert states.set_index("user").loc["a", "action"] == "dashboard_view"
    assert len(na.labelled(features)) == 3
    matrix = na.feature_matrix(features)
    assert matrix.shape == (6, len(na.FEATURES)) and np.isfinite(matrix).all()


def test_baselines_are_distributions_and_markov_follows_the_last_action(split):
    train, valid = split
    freq, markov = na.most_frequent_baseline(train, valid), na.markov_baseline(train, valid)
    assert np.allclose(freq.sum(axis=1), 1) and np.allclose(markov.sum(axis=1), 1)
    assert (freq[:, 0] == 0).all()  # login is never a next action in a session: no mass where no label was seen
    after_upload = markov[(valid["action"] == "creative_upload").to_numpy()][0]
    assert ACTIONS[int(np.argmax(after_upload))] in ("creative_upload", "variant_review")


def test_the_calibrated_forest_beats_both_baselines_on_a_time_split(split):
    train, valid = split
    assert train["ts_ms"].max() <= valid["ts_ms"].min()
    model = na.train_next_action_model(train, n_estimators=40)
    metrics, baselines = na.compare(model, train, valid)
    assert set(metrics) == {"top1", "top3", "log_loss"} and set(baselines) == {"most_frequent", "markov1"}
    passed, best = na.beats_baselines(metrics, baselines)
    assert passed and best == "markov1"
    assert metrics["top1"] > baselines["most_frequent"]["top1"]
    assert metrics["top3"] >= metrics["top1"]
    proba = model.predict_proba(valid.head(50))
    assert proba.shape == (50, len(ACTIONS)) and np.allclose(proba.sum(axis=1), 1)
    as_dicts = na.probabilities(model, valid.head(2))
    assert list(as_dicts[0]) == list(ACTIONS)


def test_a_model_no_better_than_the_baseline_is_refused():
    metrics = {"top1": 0.5, "top3": 0.9, "log_loss": 1.30}
    baselines = {"most_frequent": {"log_loss": 1.5}, "markov1": {"log_loss": 1.25}}
    assert na.beats_baselines(metrics, baselines) == (False, "markov1")
    assert na.beats_baselines({**metrics, "log_loss": 1.2}, baselines) == (True, "markov1")


def test_too_few_rows_is_a_clear_error():
    frame = pd.DataFrame({"ts_ms": [START_MS, START_MS + MIN], "user": ["a", "a"], "action": ["login", "login"]})
    with pytest.raises(ValueError, match="too few labelled rows"):
        na.time_split(na.labelled(na.event_features(frame)))


def test_a_next_action_seen_once_is_left_out_of_the_fit_not_a_failed_day(split):
    """CalibratedClassifierCV refuses a class of one row: one rare action in two weeks stopped every model."""
    train, valid = split
    once = train["next_action"] == "variant_review"
    train = train[~once | (once.cumsum() == 1)]  # the first variant_review as a label, no other
    model = na.train_next_action_model(train, n_estimators=20)
    assert "variant_review" not in model.classes and model.params["left_out_once_seen"] == ["variant_review"]
    proba = model.predict_proba(valid.head(20))
    assert np.allclose(proba.sum(axis=1), 1) and not proba[:, list(ACTIONS).index("variant_review")].any()
    metrics, _ = na.compare(model, train, valid)
    assert np.isfinite(metrics["log_loss"])
    logins, other = train[train["next_action"] == "login"], train[train["next_action"] != "login"].head(1)
    with pytest.raises(ValueError, match="fewer than 2 next actions have 2 or more training rows"):
        na.train_next_action_model(pd.concat([logins, other]))
