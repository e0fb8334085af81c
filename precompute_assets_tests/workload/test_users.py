"""Synthetic users: deterministic sessions with habits, sent through the serving client's event logger."""

from __future__ import annotations

import numpy as np
import pandas as pd

from precompute_assets.serving.events import ACTIONS, events_stream, validate_event
from precompute_assets.workload.users import (
    DAY_MS,
    HOUR_MS,
    SESSION_GAP_MS,
    generate_user_events,
    make_users,
    next_action_probabilities,
    send_user_events,
)

START_MS = 1_763_942_400_000  # 2025-11-24 00:00 UTC, a Monday


def events(n_users=60, days=7, seed=0):
    return generate_user_events(make_users(n_users, seed=seed), start_ms=START_MS, days=days, seed=seed)


def test_deterministic_under_a_seed():
    first, again, other = events(seed=3), events(seed=3), events(seed=4)
    pd.testing.assert_frame_equal(first, again)
    assert not first.equals(other)
    assert set(first["action"]) == set(ACTIONS)
    assert first["ts_ms"].is_monotonic_increasing
    assert first["ts_ms"].between(START_MS, START_MS + 7 * DAY_MS).all()


def test_sessions_start_with_a_login_and_entities_follow_the_action():
    frame = events().sort_values(["user", "ts_ms"], kind="stable")
    gap = frame.groupby("user")["ts_ms"].diff()
    session_start = gap.isna() | (gap > SESSION_GAP_MS)
    assert (frame.loc[session_start, "action"] == "login").all()
    assert (frame.loc[frame["action"] == "login", "entity"].isna()).all()
    uploads = frame[frame["action"] == "creative_upload"]
    assert uploads["entity"].is_unique and uploads["entity"].str.contains("-cr").all()
    assert (
        frame.loc[frame["action"] == "dashboard_view", "entity"]
        == frame.loc[frame["action"] == "dashboard_view", "tenant"]
    ).all()  # noqa: E501
    assert frame.loc[frame["action"] == "campaign_create", "entity"].str.contains("-c").all()


def test_users_keep_their_hours_and_weekends_are_quiet():
    users = make_users(80, seed=1)
    frame = generate_user_events(users, start_ms=START_MS, days=14, seed=1)
    logins = frame[frame["action"] == "login"].merge(users[["user", "peak_hour"]], on="user")
    hour = (logins["ts_ms"] % DAY_MS) / HOUR_MS
    assert np.median(np.abs(hour - logins["peak_hour"])) < 3  # sessions start around the user's preferred hour
    weekday = pd.to_datetime(frame["ts_ms"], unit="ms").dt.dayofweek
    assert (weekday >= 5).mean() < 0.15  # 2 of 7 days, at under a third of the sessions


def test_the_next_action_depends_on_more_than_the_last_action():
    morning = next_action_probabilities("dashboard_view", 9.0, False, False, 0, "creator")
    afternoon = next_action_probabilities("dashboard_view", 14.0, False, False, 0, "creator")
    assert np.isclose(morning.sum(), 1) and np.isclose(afternoon.sum(), 1)
    index = {a: i for i, a in enumerate(ACTIONS)}
    assert morning[index["analytics_view"]] > afternoon[index["analytics_view"]]
    assert afternoon[index["campaign_create"]] > morning[index["campaign_create"]]
    piled = next_action_probabilities("creative_upload", 14.0, False, False, 3, "creator")
    fresh = next_action_probabilities("creative_upload", 14.0, False, False, 0, "creator")
    assert piled[index["variant_review"]] > fresh[index["variant_review"]]
    assert morning[index["login"]] == 0  # a session never logs in twice


def test_send_user_events_lands_each_event_at_its_own_time(redis_client, schema):
    frame = events(n_users=10, days=2)
    stats = send_user_events(frame, redis_client, schema)
    assert stats.written == len(frame) and stats.dropped == 0
    entries = redis_client.xrange(events_stream(schema))
    assert len(entries) == len(frame)
    rows = [validate_event(i, f)[0] for i, f in entries]
    assert [r["ts_ms"] for r in rows] == frame["ts_ms"].tolist()
    assert [int(i.split(b"-")[0]) for i, _ in entries] == frame["ts_ms"].tolist()
    assert [r["action"] for r in rows] == frame["action"].tolist()
