"""The next-action model: session features, baselines on the same rows, and a calibrated forest that beats them."""

from __future__ import annotations

from dataclasses import replace

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


FEATURE_COLUMNS = ["user", "stream_id", "action", "hour", "actions_today", "session_minutes"]


def _by_user(states: pd.DataFrame) -> pd.DataFrame:
    return states[FEATURE_COLUMNS].sort_values("user", ignore_index=True)


def stored_values(state: na.UserState) -> list[bytes]:
    """The state as Redis gives it back (``HMGET`` of its fields)."""
    fields = state.fields()
    return [fields[name.decode()].encode() for name in na.UserState.FIELDS]


def _ticks(cuts: list[int], n: int) -> list[tuple[int, int]]:
    return list(zip([0, *cuts], [*cuts, n], strict=True))


def _carried(frame: pd.DataFrame, cuts: list[int], timezone: str, *, crash_at: int | None = None):
    """The latest states after reading ``frame`` tick by tick (``cuts``: where each tick ends), carrying the states
    as the sensor does; a tick at ``crash_at`` is read twice (its first result was lost with its cursor)."""
    carried: dict[str, na.UserState] = {}
    latest = None
    for tick, (lo, hi) in enumerate(_ticks(cuts, len(frame))):
        for _ in range(2 if tick == crash_at else 1):
            latest = na.latest_states(frame.iloc[lo:hi], timezone, prior=carried)
            carried = carried | {u: na.UserState.parse(stored_values(s))
                                 for u, s in na.carried_states(latest).items()}  # fmt: skip
    return carried, latest


def test_states_carried_over_ticks_are_those_of_the_whole_day():
    frame = generate_user_events(make_users(60, seed=5), start_ms=START_MS, days=2, seed=5)
    frame = frame.sort_values("ts_ms", kind="stable", ignore_index=True)
    frame["stream_id"] = [f"{ts}-{i}" for i, ts in enumerate(frame["ts_ms"].tolist())]
    whole = na.latest_states(frame, "America/New_York")
    cuts = list(range(37, len(frame), 37))  # many ticks: sessions and days run across them
    carried, _ = _carried(frame, cuts, "America/New_York", crash_at=5)
    restored = na.state_rows(carried, "America/New_York")
    pd.testing.assert_frame_equal(_by_user(restored), _by_user(whole), check_dtype=False)
    alone = pd.concat([na.latest_states(frame.iloc[lo:hi]) for lo, hi in _ticks(cuts, len(frame))])
    assert (alone.groupby("user")["actions_today"].max() < whole.set_index("user")["actions_today"]).any()


def test_a_tick_read_again_after_a_crash_counts_nothing_twice():
    at = START_MS + 9 * 60 * MIN
    frame = pd.DataFrame(
        {
            "stream_id": [f"{at + i * MIN}-0" for i in range(4)], "ts_ms": [at + i * MIN for i in range(4)],
            "user": ["a", "a", "b", "a"], "action": ["login", "dashboard_view", "login", "analytics_view"],
            "tenant": ["t1", "t1", None, "t1"],
        }
    )  # fmt: skip
    first = na.carried_states(na.latest_states(frame.iloc[:2]))
    once = na.latest_states(frame.iloc[2:], prior=first).set_index("user")
    again = na.latest_states(frame.iloc[:4], prior=na.carried_states(once.reset_index()) | {}).set_index("user")
    assert once.loc["a", "actions_today"] == again.loc["a", "actions_today"] == 3
    assert once.loc["a", "session_minutes"] == again.loc["a", "session_minutes"] == 3.0
    assert again.loc["b", "actions_today"] == 1 and again.loc["a", "tenant"] == "t1"
    replayed = na.latest_states(frame.iloc[:2], prior=first).set_index("user")  # all counted: the stored row
    assert replayed.loc["a", "action"] == "dashboard_view" and replayed.loc["a", "actions_today"] == 2


def test_an_event_that_arrived_after_the_latest_is_not_counted_again_on_a_read_again():
    """A user's first events read out of time order (the last to arrive is not the latest): the state kept the latest
    event's stream ID, so the one that arrived after it counted again when the tick was read again (h_user2)."""
    at = START_MS + 9 * 60 * MIN
    frame = pd.DataFrame(
        {
            "stream_id": [f"{at + i * MIN}-0" for i in range(3)], "ts_ms": [at - 20 * MIN, at - 2 * MIN, at - 10 * MIN],
            "user": ["a", "a", "a"], "action": ["login", "dashboard_view", "analytics_view"],
        }
    )  # fmt: skip
    first = na.latest_states(frame)
    assert first.loc[0, "stream_id"] == f"{at + 2 * MIN}-0" and first.loc[0, "action"] == "dashboard_view"
    again = na.latest_states(frame, prior=na.carried_states(first))
    assert first.loc[0, "actions_today"] == again.loc[0, "actions_today"] == 3


def test_a_pause_a_login_or_a_new_day_starts_afresh_across_ticks():
    at = START_MS + 23 * 60 * MIN  # 23:00 UTC
    prior = {"a": na.UserState(f"{at}-0", at, "dashboard_view", None, at - 10 * MIN, 7)}

    def state(ts: int, action: str) -> pd.Series:
        frame = pd.DataFrame({"stream_id": [f"{ts}-0"], "ts_ms": [ts], "user": ["a"], "action": [action]})
        return na.latest_states(frame, prior=prior).iloc[0]

    goes_on = state(at + 5 * MIN, "analytics_view")
    assert goes_on["actions_today"] == 8 and goes_on["session_minutes"] == 15.0
    paused = state(at + 31 * MIN, "analytics_view")  # a pause: a new session, the same day
    assert paused["session_minutes"] == 0.0 and paused["actions_today"] == 8
    login = state(at + 2 * MIN, "login")
    assert login["session_minutes"] == 0.0 and login["actions_today"] == 8
    assert state(at + 61 * MIN, "dashboard_view")["actions_today"] == 1  # past midnight: a new day
    # A login in the same millisecond as the tick's first event (clients that stamp whole seconds): a new session.
    ts = at + 2 * MIN
    actions = ["analytics_view", "login"]
    ids = [f"{ts}-0", f"{ts}-1"]
    same_ms = pd.DataFrame({"stream_id": ids, "ts_ms": [ts] * 2, "user": ["a"] * 2, "action": actions})
    latest = na.latest_states(same_ms, prior=prior).iloc[0]
    assert (latest["action"], latest["session_start_ms"], latest["session_minutes"]) == ("login", ts, 0.0)


def test_a_late_event_counts_in_its_day_and_never_moves_the_state_back():
    """An event's time may trail its arrival: one older than the stored state replaced it, so the day flipped back and
    the next event restarted the count and the session."""
    midnight = START_MS + 86_400_000  # Tuesday 00:00 UTC
    arrivals = [  # (arrival, time, action) in minutes from midnight: the third arrives after the second, from before it
        (-15, -15, "login"), (10, 10, "campaign_create"), (20, -5, "analytics_view"), (30, 30, "dashboard_view"),
    ]  # fmt: skip
    arrivals = [(midnight + a * MIN, midnight + t * MIN, action) for a, t, action in arrivals]
    frame = pd.DataFrame(
        {"stream_id": [f"{a}-0" for a, _, _ in arrivals], "ts_ms": [t for _, t, _ in arrivals], "user": "u",
         "action": [action for _, _, action in arrivals], "tenant": "t"}
    )  # fmt: skip
    whole = na.latest_states(frame).iloc[0]
    carried, latest = _carried(frame, [2, 3], "UTC")
    after_late = na.latest_states(frame.iloc[2:3], prior=na.carried_states(na.latest_states(frame.iloc[:2])))
    assert (
        after_late.iloc[0]["action"] == "campaign_create" and after_late.iloc[0]["stream_id"] == frame["stream_id"][2]
    )
    row = latest.iloc[0]
    assert (
        row["actions_today"] == whole["actions_today"] == 2 and row["session_minutes"] == whole["session_minutes"] == 45
    )
    assert carried["u"].stream_id == frame["stream_id"].iloc[-1]


def test_a_malformed_stored_state_is_no_state():
    good = na.UserState("5-1", 5, "login", "t", 1, 2)
    raw = stored_values(good)
    assert (
        na.UserState.parse(raw) == good and na.UserState.parse(stored_values(replace(good, tenant=None))).tenant is None
    )
    for field, broken in ((b"id", b"x"), (b"ts", b"soon"), (b"today", b"0"), (b"action", b"logout"), (b"start", b"9")):
        values = list(raw)
        values[na.UserState.FIELDS.index(field)] = broken
        assert na.UserState.parse(values) is None
    assert na.UserState.parse([*raw[:-1], None]) is None and na.UserState.parse(raw[:-1]) is None


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


def test_a_state_is_whole_when_its_day_began_after_the_span_and_its_session_a_pause_after():
    """Events up to ``since`` were not counted: one at the day's first moment is of the day, and one within a pause
    (``SESSION_GAP_MS``) before the session's first counted event would have made it part of an earlier session."""
    midnight = int(pd.Timestamp("2026-03-04", tz="UTC").timestamp() * 1000)
    state = na.UserState(
        f"{midnight + 10 * 60 * MIN}-0", midnight + 10 * 60 * MIN, "login", None, midnight + 9 * 60 * MIN, 3
    )
    since = midnight - na.MAX_CLOCK_AHEAD_MS - 1  # the latest from which an event seen then is dated before midnight
    assert state.whole_since(since, "UTC")
    assert not state.whole_since(since + 1, "UTC")  # an event at midnight, before the span, was of the day
    assert not state.whole_since(since, "Asia/Tokyo")  # 19:00 there: its day began at 15:00 UTC the day before
    soon = replace(state, session_start_ms=midnight + 20 * MIN)  # may go on a session of events before the span
    assert not soon.whole_since(since, "UTC")
    assert replace(state, session_start_ms=midnight + na.SESSION_GAP_MS).whole_since(since, "UTC")


def test_a_state_is_whole_only_beyond_what_a_clock_ahead_could_have_dated_an_event_seen_before_the_span():
    """An event that arrived by ``since`` may carry a time up to ``MAX_CLOCK_AHEAD_MS`` later: in the day after
    midnight, or in a session that seems to start more than a pause after ``since``."""
    from precompute_assets.serving.querylog import MAX_CLOCK_AHEAD_MS

    midnight = int(pd.Timestamp("2026-03-04", tz="UTC").timestamp() * 1000)
    since = midnight - MAX_CLOCK_AHEAD_MS // 2  # an event arriving then may be dated after midnight
    state = na.UserState("1-0", midnight + 10 * 60 * MIN, "login", None, midnight + 9 * 60 * MIN, 3)
    assert not state.whole_since(since, "UTC")
    assert state.whole_since(midnight - MAX_CLOCK_AHEAD_MS - 1, "UTC")
    session = since + MAX_CLOCK_AHEAD_MS + na.SESSION_GAP_MS  # late by the pause and the clock's allowance, not more
    day_after = replace(state, ts_ms=midnight + 2 * 86_400_000, session_start_ms=session + 86_400_000)
    assert day_after.whole_since(since + 86_400_000 - 1, "UTC")
    assert not replace(day_after, session_start_ms=session + 86_400_000 - 1).whole_since(since + 86_400_000, "UTC")


def test_a_day_whose_midnight_a_clock_change_skips_starts_at_its_first_moment():
    """Chile's daylight saving time starts at 00:00 on 2026-09-06: that day begins at 01:00 local, 04:00 UTC."""
    at = int(pd.Timestamp("2026-09-06 10:00", tz="America/Santiago").timestamp() * 1000)
    assert na.day_start_ms(at, "America/Santiago") == int(pd.Timestamp("2026-09-06 04:00", tz="UTC").timestamp() * 1000)
    state = na.UserState("1-0", at, "login", None, at, 1)
    assert state.whole_since(at - 12 * 3_600_000, "America/Santiago") is True
    assert na.day_start_ms(at, "UTC") == int(pd.Timestamp("2026-09-06", tz="UTC").timestamp() * 1000)
