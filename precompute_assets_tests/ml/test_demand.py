"""The LSTM demand model against its baselines on held-back days, its bounded training, and its weights file."""

from __future__ import annotations

import math
import pickle
import types
import zipfile
from dataclasses import asdict, replace
from datetime import datetime, timedelta

import numpy as np
import pandas as pd
import pytest
import torch

from precompute_assets.ml import demand as demand_module
from precompute_assets.ml.demand import (
    DemandHyperParams,
    HourlyCounts,
    UnsafeModelFile,
    _first_seen,
    _predict,
    evaluate_demand,
    ewma_forecast,
    forecast_next_day,
    frequency_forecast,
    load_model,
    load_weights,
    mase,
    mase_undefined,
    save_weights,
    seasonal_forecast,
    train_lstm,
)
from precompute_assets.ml.model_store import LocalModelStore

MONDAY = datetime(2026, 11, 2)
FAST = DemandHyperParams(top_n=20, max_epochs=5, max_seconds=60, threads=1)


def synthetic_hours(n_keys=200, days=21, *, weekly_share=0.3, seed=0, start=MONDAY):
    """Hourly requests per key: Zipf keys every day, and (``weekly_share``) keys asked for on one weekday only,
    which a recency-weighted frequency ranks a week late. Yields ``(day, hour start, counts)``."""
    rng = np.random.default_rng(seed)
    n_weekly = int(n_keys * weekly_share)
    zipf = 1.0 / np.arange(1, n_keys - n_weekly + 1) ** 0.9
    base = 4000 * zipf / zipf.sum()
    diurnal = 1 + 0.6 * np.sin(2 * np.pi * (np.arange(24) - 9) / 24)
    weekday_of = rng.integers(0, 7, n_weekly)
    weekly_rate = rng.uniform(150, 400, n_weekly)
    keys = np.array([f"k{i:04d}" for i in range(n_keys)], dtype=object)
    for d in range(days):
        for h in range(24):
            t = start + timedelta(days=d, hours=h)
            rate = np.concatenate([base, np.where(weekday_of == t.weekday(), weekly_rate, 0.0)]) * diurnal[h] / 24
            counts = pd.Series(rng.poisson(rate), index=keys)
            yield d, t, counts[counts > 0]


def synthetic(**kwargs) -> HourlyCounts:
    return HourlyCounts.from_hours(synthetic_hours(**kwargs))


@pytest.fixture(scope="module")
def weekly() -> HourlyCounts:
    return synthetic()


@pytest.fixture(scope="module")
def weekly_result(weekly):
    return evaluate_demand(weekly, FAST)


def test_the_lstm_sees_weekly_keys_that_frequency_ranks_a_week_late(weekly_result):
    e = weekly_result.evaluation
    assert set(e.hit_rate) == set(e.mase) == {"lstm", "frequency", "seasonal", "ewma"}
    assert e.hit_rate["lstm"] > e.hit_rate["frequency"] + 0.1
    assert e.mase["lstm"] < e.mase["frequency"]
    assert e.keys == 200 and e.epochs == 5 and not e.warm_started
    assert all(0 <= v <= 1 for v in e.hit_rate.values())


def test_on_stationary_zipf_traffic_the_winner_is_whoever_scores_best():
    e = evaluate_demand(synthetic(weekly_share=0.0, days=10, seed=3), FAST).evaluation
    best = max(e.hit_rate[name] for name in ("frequency", "seasonal", "ewma"))
    assert (e.winner == "lstm") == (e.hit_rate["lstm"] > best)
    assert e.hit_rate[e.best_baseline] == best


def test_keys_first_seen_on_the_held_back_day_do_not_change_the_training():
    """The held-back day is never trained on: not its counts, and not which keys it holds (keys only it requested
    must not enter the training sample, where they would displace others and teach all-zero rows)."""
    hp = DemandHyperParams(top_n=20, max_epochs=2, max_seconds=60, max_train_keys=50, threads=1)
    days = 10

    def with_newcomers():
        for day, start, counts in synthetic_hours(n_keys=120, days=days, seed=4):
            if day == days - 1:  # 60 keys requested on the held-back day only, sorted among the others
                counts = pd.concat([counts, pd.Series(50, index=[f"k{i:04d}n" for i in range(60)])])
            yield day, start, counts

    plain = evaluate_demand(HourlyCounts.from_hours(synthetic_hours(n_keys=120, days=days, seed=4)), hp)
    newcomers = evaluate_demand(HourlyCounts.from_hours(with_newcomers()), hp)
    assert newcomers.evaluation.keys == plain.evaluation.keys + 60
    for name, tensor in plain.state_dict().items():
        assert torch.equal(tensor, newcomers.state_dict()[name]), name
    ours = plain.evaluation.forecasts["lstm"]
    assert np.array_equal(newcomers.evaluation.forecasts["lstm"].reindex(ours.index).to_numpy(), ours.to_numpy())


def test_keys_first_seen_on_the_held_back_day_are_not_scored_by_the_mase():
    """The MASE is taken over keys fixed before the held-back day: a key that enters only because that day requested
    it is one every baseline forecasts 0 for, and would tilt the errors toward the LSTM; it is counted apart."""
    hp = DemandHyperParams(top_n=20, max_epochs=2, max_seconds=60, threads=1)
    days = 10

    def with_newcomers():
        for day, start, counts in synthetic_hours(n_keys=120, days=days, seed=4):
            if day == days - 1 and start.hour == 12:  # 60 keys requested on the held-back day only, 50 times each
                counts = pd.concat([counts, pd.Series(50, index=[f"k{i:04d}n" for i in range(60)])])
            yield day, start, counts

    plain = evaluate_demand(HourlyCounts.from_hours(synthetic_hours(n_keys=120, days=days, seed=4)), hp).evaluation
    newcomers = evaluate_demand(HourlyCounts.from_hours(with_newcomers()), hp).evaluation
    assert newcomers.mase == plain.mase
    assert (newcomers.new_keys, newcomers.new_key_requests) == (60, 3000.0)
    assert plain.new_keys == 0 and plain.new_key_requests == 0.0


def test_training_is_deterministic_under_a_seed_and_warm_starts(weekly, weekly_result):
    hp = DemandHyperParams(top_n=20, max_epochs=1, max_seconds=60, threads=1)
    a, b = evaluate_demand(weekly, hp), evaluate_demand(weekly, hp)
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[name]), name
    warm = evaluate_demand(weekly, hp, init_state=weekly_result.state_dict())
    assert warm.evaluation.warm_started
    other = evaluate_demand(weekly, DemandHyperParams(**{**hp.__dict__, "hidden_size": 8}),
                            init_state=weekly_result.state_dict())  # fmt: skip
    assert not other.evaluation.warm_started and "trained from scratch" in other.evaluation.notes[0]
    cold = evaluate_demand(weekly, DemandHyperParams(**{**hp.__dict__, "hidden_size": 8}))
    for name, tensor in cold.state_dict().items():  # a strict load that failed had copied the tensors that fit
        assert torch.equal(tensor, other.state_dict()[name]), name


def jumping_clock(monkeypatch, seconds_per_call: float) -> None:
    """``ml.demand``'s ``time.perf_counter`` runs ``seconds_per_call`` ahead at every call: a very slow machine."""
    now = [0.0]

    def perf_counter() -> float:
        now[0] += seconds_per_call
        return now[0]

    monkeypatch.setattr(demand_module, "time", types.SimpleNamespace(perf_counter=perf_counter))


def test_the_same_input_trains_the_same_weights_whatever_the_clock_says(weekly, monkeypatch):
    """The budget is steps, not seconds: a clock that says every step took an hour (a run of days) trains the same
    weights as the real one, as long as the safety stop does not fire."""
    hp = DemandHyperParams(top_n=20, max_epochs=1000, max_steps=25, max_seconds=1e9, threads=1)
    calm = evaluate_demand(weekly, hp)
    jumping_clock(monkeypatch, 3600.0)
    hurried = evaluate_demand(weekly, hp)
    assert hurried.evaluation.train_seconds > 25 * 3600  # the clock did say so
    for result in (calm, hurried):
        e = result.evaluation
        assert (e.stopped_by, e.train_steps) == ("steps", 25)
        assert not any("safety stop" in note for note in e.notes)
    for name, tensor in calm.state_dict().items():
        assert torch.equal(tensor, hurried.state_dict()[name]), name


def test_the_step_budget_stops_the_training_and_says_so(weekly):
    hp = DemandHyperParams(top_n=20, max_epochs=1000, max_steps=13, threads=1)
    said = []
    _, info = train_lstm(weekly, hp, weekly.n_days - 1, progress=lambda *args: said.append(args))
    per_epoch = math.ceil(info["samples"] / hp.batch_size)
    assert per_epoch == 11 and info["steps"] == 13 and info["stopped_by"] == "steps"
    assert info["epochs"] == len(said) == 2  # the second one cut short
    _, info = train_lstm(weekly, replace(hp, max_epochs=2, max_steps=22), weekly.n_days - 1)
    assert (info["stopped_by"], info["steps"], info["epochs"]) == ("epochs", 22, 2)  # both at once: the epochs


def test_a_lookback_longer_than_the_step_budget_reaches_builds_only_the_newest_days(weekly, monkeypatch):
    """Every day of the lookback was turned into features first: a year of 2,000 keys took 2.8 GB for the 512,000
    samples that 2,000 steps of 256 can see (h_demand3). The newest days the budget reaches are kept."""
    built: list[int] = []
    window = demand_module._window

    def spy(sample, every, day, hp, daily):
        built.append(day)
        return window(sample, every, day, hp, daily)

    monkeypatch.setattr(demand_module, "_window", spy)
    _, info = train_lstm(weekly, DemandHyperParams(top_n=20, max_epochs=1, threads=1), weekly.n_days - 1)
    assert info["days"] == len(built) == 13 and info["samples"] == 13 * 200  # the budget reaches every day
    built.clear()
    _, info = train_lstm(weekly, DemandHyperParams(top_n=20, max_steps=2, threads=1), weekly.n_days - 1)
    assert built == [18, 19] and info["days"] == 2 and info["samples"] == 400  # 2 × 256 samples: two days of 200


def test_the_safety_stop_fires_on_a_slow_machine_and_says_so(weekly, monkeypatch):
    jumping_clock(monkeypatch, 1.0)
    hp = DemandHyperParams(top_n=20, max_epochs=1000, max_steps=1000, max_seconds=30.0, threads=1)
    e = evaluate_demand(weekly, hp).evaluation
    assert e.stopped_by == "seconds" and 0 < e.train_steps < hp.max_steps and 0 < e.epochs < hp.max_epochs
    (note,) = [note for note in e.notes if "safety stop" in note]
    assert note.startswith(
        f"LSTM training stopped by its max_seconds safety stop (30 s, feature building included) after "
        f"{e.train_steps} of 1000 steps, in epoch {e.epochs} of 1000 ("
    )
    assert note.endswith("a slower machine than the step budget was sized for, so another run may train other weights")


def test_training_reports_each_epoch(weekly):
    said = []
    hp = DemandHyperParams(top_n=20, max_epochs=3, max_seconds=60, threads=1)
    _, info = train_lstm(weekly, hp, weekly.n_days - 1, progress=lambda *args: said.append(args))
    assert [epoch for epoch, _, _ in said] == [1, 2, 3] == list(range(1, info["epochs"] + 1))
    assert all(np.isfinite(loss) and loss > 0 for _, loss, _ in said)
    assert [s for _, _, s in said] == sorted(s for _, _, s in said) and said[-1][2] <= info["seconds"]


def test_the_safety_stop_counts_feature_building_too(weekly):
    hp = DemandHyperParams(top_n=20, max_epochs=1000, max_seconds=1e-9)
    model, info = train_lstm(weekly, hp, weekly.n_days - 1)
    assert info["epochs"] == info["steps"] == 0 and info["seconds"] >= hp.max_seconds  # the features used it up
    assert info["stopped_by"] == "seconds"
    assert info["samples"] == 200 * (weekly.n_days - 1 - hp.window_days)


def test_the_sequence_length_does_not_change_the_weights_shapes(weekly, weekly_result):
    assert FAST.sequence_days < FAST.window_days  # the default steps through fewer days than the window holds
    whole_window = DemandHyperParams(**{**FAST.__dict__, "sequence_days": FAST.window_days, "max_epochs": 1})
    warm = evaluate_demand(weekly, whole_window, init_state=weekly_result.state_dict())
    assert warm.evaluation.warm_started  # weights of one sequence length warm-start (and forecast) another
    assert len(forecast_next_day(load_model(warm.state_dict(), FAST.hidden_size), weekly, FAST)) == 200
    with pytest.raises(ValueError, match="sequence_days"):
        DemandHyperParams(sequence_days=0)


def test_chunked_forecasts_equal_a_single_pass(weekly, weekly_result):
    daily = weekly.daily()
    args = (weekly_result.model, weekly, weekly.n_days - 1, FAST, daily)
    whole = _predict(*args, chunk=1000, batch=1000)
    assert np.allclose(_predict(*args, chunk=64, batch=7), whole, rtol=1e-5, atol=1e-6)


def days_of(data: HourlyCounts, first: int, last: int) -> HourlyCounts:
    """Days ``first..last`` of ``data`` (renumbered from 0), with only the keys requested in them."""
    hours = (data.day >= first) & (data.day <= last)
    counts = data.counts[:, hours]
    rows = np.flatnonzero(np.nansum(counts, axis=1) > 0)
    return HourlyCounts(data.keys[rows], counts[rows], data.hour_of_day[hours], data.weekday[hours],
                        data.day[hours] - first, data.missing[hours])  # fmt: skip


def test_a_keys_age_at_serving_is_the_age_the_model_was_evaluated_with(weekly, weekly_result):
    """top_ads forecasts from the week before tomorrow, demand_model evaluates from two: a key's age must not depend
    on how far back the data goes, or every old key looks a week younger at serving than the model learned it."""
    held = weekly.n_days - 1
    week_before = days_of(weekly, held - FAST.window_days, held - 1)  # what top_ads reads on the day before
    assert week_before.n_days == FAST.window_days < held
    served = forecast_next_day(weekly_result.model, week_before, FAST)
    evaluated = weekly_result.evaluation.forecasts["lstm"].reindex(served.index)
    np.testing.assert_allclose(served.to_numpy(), evaluated.to_numpy(), rtol=1e-5)


@pytest.mark.parametrize("lookback", [4, 6, 8])
def test_a_model_trained_on_a_short_lookback_forecasts_from_the_layout_it_was_trained_on(weekly, lookback):
    """Fewer than 9 days shorten the window the LSTM trains with (and leave it no week-before total); top_ads still
    reads a week before tomorrow, and must forecast from what training used: the hyper-parameters as trained."""
    hp = DemandHyperParams(top_n=20, max_epochs=2, max_seconds=60, threads=1)
    last = 12
    result = evaluate_demand(days_of(weekly, last - lookback + 1, last), hp)
    assert result.hyper_params.window_days == min(hp.window_days, lookback - 2) < hp.window_days
    week_before = days_of(weekly, last - 7, last - 1)  # what top_ads reads on the day before the held-back one
    served = forecast_next_day(result.model, week_before, result.hyper_params)
    evaluated = result.evaluation.forecasts["lstm"]
    both = evaluated.index.intersection(served.index)  # the week may hold weekly keys the lookback does not
    assert len(both) > 150
    np.testing.assert_allclose(served[both].to_numpy(), evaluated[both].to_numpy(), rtol=1e-5)
    assert DemandHyperParams(**asdict(result.hyper_params)) == result.hyper_params  # stored and read back as JSON


def test_daily_totals_count_a_missing_hour_as_zero_in_any_hour_order():
    counts = np.array([[1.0, np.nan, 2.0, 3.0], [np.nan, np.nan, 0.0, 5.0]], dtype=np.float32)
    day = np.array([0, 0, 1, 1])
    data = HourlyCounts(np.array(["a", "b"], dtype=object), counts, np.array([0, 1, 0, 1]), day % 7, day)
    assert data.daily().tolist() == [[1.0, 5.0], [0.0, 5.0]]
    shuffled = HourlyCounts(data.keys, counts[:, [2, 0, 3, 1]], np.array([0, 0, 1, 1]), day % 7, day[[2, 0, 3, 1]])
    assert shuffled.daily().tolist() == [[1.0, 5.0], [0.0, 5.0]]
    assert _first_seen(data).tolist() == [0, 3]  # a NaN hour is not a request


def test_ewma_forecast_smooths_each_hour_in_order_and_skips_hours_missing_for_every_key():
    """The column of each hour is copied once and only a column holding a NaN goes through nan_to_num: the forecast
    is the smoothing written out step by step, bit for bit, on counts with NaN cells and a wholly missing hour."""
    rng = np.random.default_rng(3)
    counts = rng.poisson(2.0, size=(50, 72)).astype(np.float32)
    counts[rng.random(counts.shape) < 0.1] = np.nan  # hours missing for some keys: counted as 0
    counts[:, 30] = np.nan  # an hour missing for every key: skipped, the rate unchanged
    day = np.repeat(np.arange(3), 24)
    data = HourlyCounts(np.arange(50), counts, np.tile(np.arange(24), 3), day % 7, day)
    alpha = 1 - 0.5 ** (1 / FAST.ewma_half_life_hours)
    rate, started = np.zeros(50), False
    for t in range(48):
        if t == 30:
            continue
        x = np.nan_to_num(counts[:, t], nan=0.0)
        rate = alpha * x + (1 - alpha) * rate if started else x.astype(np.float64)
        started = True
    assert np.array_equal(ewma_forecast(data, 2, FAST), 24 * rate)


def test_the_next_day_forecast_covers_every_key(weekly, weekly_result):
    forecast = forecast_next_day(weekly_result.model, weekly, FAST)
    assert len(forecast) == 200 and (forecast >= 0).all()


def test_missing_hours_are_reported_not_fatal():
    hours = [(d, t, None if (d == 5 and t.hour < 6) else c) for d, t, c in synthetic_hours(n_keys=30, days=9)]
    data = HourlyCounts.from_hours(hours)
    assert data.missing_hours == 6
    e = evaluate_demand(data, DemandHyperParams(top_n=5, max_epochs=1, threads=1)).evaluation
    assert "6 hours of logs missing" in e.notes[0]


def test_days_without_logs_are_not_trained_on():
    """A day whose logs are missing is no day of zero requests: the LSTM learned such days as days nobody asked for
    anything, and from windows with no logs at all (a deployment's first days; h_demand)."""
    hours = [(d, t, None if d < 2 or (d == 5 and t.hour < 6) else c) for d, t, c in synthetic_hours(n_keys=30, days=10)]
    data = HourlyCounts.from_hours(hours)
    assert data.logged_days().tolist() == [False, False] + [True] * 8
    assert data.whole_days().tolist() == [False, False, True, True, True, False, True, True, True, True]
    # day 2 follows days 0-1 only, none logged; day 5, with 18 of its hours logged, counts its missing ones as none
    assert demand_module.trained_days(data, 3, 9) == [3, 4, 5, 6, 7, 8]
    assert demand_module.trained_days(data, 1, 9) == [3, 4, 5, 6, 7, 8]
    _, info = train_lstm(data, replace(FAST, window_days=3, max_epochs=1), 9)
    assert (info["days"], info["samples"]) == (6, 6 * 30)
    e = evaluate_demand(data, replace(FAST, window_days=3, max_epochs=1)).evaluation
    assert e.train_days == 6
    # quiet hours without files (an import writes none for an hour without requests) on every day: every day is
    # trained on (a rule of whole days, or of at most 3 missing hours, trained on none; h_diff12, h_diff14)
    quiet = HourlyCounts.from_hours(
        (d, t, None if 1 <= t.hour <= 4 else c) for d, t, c in synthetic_hours(n_keys=30, days=10)
    )
    assert demand_module.trained_days(quiet, 3, 9) == [3, 4, 5, 6, 7, 8]
    gaps = [(d, t, None if d in (0, 1, 3, 4, 5) else c) for d, t, c in synthetic_hours(n_keys=30, days=7)]
    with pytest.raises(ValueError, match="no day before the held-back one to train on"):
        train_lstm(HourlyCounts.from_hours(gaps), replace(FAST, window_days=1, max_epochs=1), 6)


def test_seasonal_takes_the_latest_day_with_logs_when_a_week_before_has_none():
    """A week-earlier day without logs ranked every key 0, so by name, with no word said (h_demand)."""
    daily = np.arange(1.0, 10.0)[None, :]  # days 0..8, forecasting day 9: a week earlier is day 2
    logged = np.ones(9, dtype=bool)
    assert seasonal_forecast(daily, 9, logged)[0] == 3 == seasonal_forecast(daily, 9)[0]
    logged[[2, 8]] = False
    assert seasonal_forecast(daily, 9, logged)[0] == 8  # day 7, the latest with logs
    assert seasonal_forecast(daily, 5, logged)[0] == 5  # no day a week earlier: the day before
    assert seasonal_forecast(daily, 9, np.zeros(9, dtype=bool))[0] == 0


def test_a_single_key_a_silent_day_and_a_short_lookback():
    one = [(d, t, c[c.index == "k0000"]) for d, t, c in synthetic_hours(n_keys=20, days=4)]
    e = evaluate_demand(HourlyCounts.from_hours(one), DemandHyperParams(top_n=5, max_epochs=1)).evaluation
    assert e.keys == 1 and e.hit_rate == dict.fromkeys(e.hit_rate, 1.0) and e.winner != "lstm"
    silent = [(d, t, c if d < 3 else c.iloc[:0]) for d, t, c in synthetic_hours(n_keys=20, days=4)]
    e = evaluate_demand(HourlyCounts.from_hours(silent), DemandHyperParams(top_n=5, max_epochs=1)).evaluation
    assert e.hit_rate == dict.fromkeys(e.hit_rate, 0.0)
    assert "the held-back day has no requests (0 of its hours missing)" in " ".join(e.notes)
    gone = [(d, t, c if d < 3 else None) for d, t, c in synthetic_hours(n_keys=20, days=4)]  # its logs missing
    e = evaluate_demand(HourlyCounts.from_hours(gone), DemandHyperParams(top_n=5, max_epochs=1)).evaluation
    assert "the held-back day has no requests (24 of its hours missing)" in " ".join(e.notes)
    with pytest.raises(ValueError, match="at least 3 days"):
        evaluate_demand(synthetic(n_keys=20, days=2), FAST)
    with pytest.raises(ValueError, match="no requests"):
        evaluate_demand(HourlyCounts.from_hours([(0, MONDAY, None)]), FAST)


def test_the_frequency_baseline_is_ad_demands_week_whatever_the_lstms_window():
    """The LSTM is approved against the frequency ranking top_ads falls back to (ad_demand: 7 days, half-life 2):
    a shorter window_days for the LSTM's features must not weaken the baseline it is measured against."""
    keys = np.array(["a", "b"], dtype=object)
    daily = np.array([[10.0] * 6 + [0.0], [0.0] * 6 + [3.0]])  # a: every day but the last; b: the last day only
    weights = 0.5 ** (np.arange(6, -1, -1) / 2)
    expected = (daily * weights).sum(axis=1) / weights.sum()
    for window_days in (1, 7, 14):
        forecast = frequency_forecast(daily, keys, 7, DemandHyperParams(window_days=window_days))
        assert forecast == pytest.approx(expected)  # a (21.1 / 2.9) ahead of b (3 / 2.9)


def test_mase_is_scaled_by_the_in_sample_seasonal_naive_error():
    daily = np.array([[1.0, 3.0, 1.0, 3.0]])  # in-sample naive (season 1) error over days 0..2: |3-1|, |1-3| → 2
    assert mase(np.array([4.0]), np.array([3.0]), daily, held_day=3) == pytest.approx(0.5)
    assert math.isnan(mase(np.array([1.0]), np.array([1.0]), np.ones((1, 4)), held_day=3))


def test_mase_undefined_says_why_the_scale_is_missing_or_zero():
    assert mase_undefined(np.array([[1.0, 3.0, 1.0, 3.0]]), held_day=3) is None
    assert "scale (the in-sample seasonal-naive error) is 0" in mase_undefined(np.ones((2, 4)), held_day=3)
    assert mase_undefined(np.ones((0, 4)), held_day=3) == "no key was requested before the held-back day"


def test_mase_scales_by_whole_days_only():
    """A day whose logs were missing counts 0 requests: each season pair with it added the day's whole traffic to the
    scale (a deployment's first two weeks scaled errors by 2.7 where 1.5 was due), so the methods looked better than
    seasonal naive. Only pairs of whole days scale, and a held-back day with missing hours measures no MASE."""
    daily = np.array([[0.0, 0.0, *(10.0 + 2 * (d % 2) for d in range(2, 11))]])  # days 0 and 1: logs missing
    whole = np.array([False, False, *[True] * 9])
    # season 7 before day 10: pairs (7, 0), (8, 1), (9, 2); only (9, 2) is of whole days: |12 - 10| = 2
    assert mase(np.array([14.0]), np.array([10.0]), daily, held_day=10, whole=whole) == pytest.approx(4 / 2)
    assert mase(np.array([14.0]), np.array([10.0]), daily, held_day=10) == pytest.approx(
        4 / 8
    )  # every pair: (12+10+2)/3
    short = np.array([False, False, False, *[True] * 8])  # (9, 2) lost too
    assert "no two whole days 7 day(s) apart" in mase_undefined(daily, held_day=10, whole=short)
    held_partly = np.array([*[True] * 10, False])
    assert "missing on the held-back day" in mase_undefined(daily, held_day=10, whole=held_partly)
    lost = [(d, t, None if d < 2 or (d == 9 and t.hour == 3) else c) for d, t, c in synthetic_hours(n_keys=5, days=11)]
    assert HourlyCounts.from_hours(lost).whole_days().tolist() == [False, False, *[True] * 7, False, True]


def test_an_evaluation_without_variation_notes_why_its_mase_is_nan():
    hours = [(d, MONDAY + timedelta(days=d, hours=h)) for d in range(4) for h in range(24)]
    flat = HourlyCounts.from_hours((d, start, pd.Series([1, 2], index=["a", "b"])) for d, start in hours)
    evaluation = evaluate_demand(flat, DemandHyperParams(top_n=2, max_epochs=1, threads=1)).evaluation
    assert all(math.isnan(value) for value in evaluation.mase.values())
    assert evaluation.mase_note is not None and f"MASE not measured: {evaluation.mase_note}" in evaluation.notes


class WritesAFile:
    """A pickle that would create ``path`` if it were ever unpickled."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_weights_round_trip_and_a_malicious_pickle_is_refused_without_running(tmp_path, weekly_result):
    state = weekly_result.state_dict()
    save_weights(state, tmp_path / "ok.pt")
    loaded = load_weights(tmp_path / "ok.pt")
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    victim = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(WritesAFile(victim)))
    with pytest.raises(UnsafeModelFile, match="not a plain state_dict") as refused:
        load_weights(evil)
    assert not victim.exists()
    # what the loader found, not PyTorch's advice to load the tampered file with weights_only=False (h_demand)
    assert "weights_only" not in str(refused.value) and "unsupported" in str(refused.value).lower()
    torch.save({"weights": [1, 2]}, tmp_path / "not_tensors.pt")  # loadable, but not names to tensors
    with pytest.raises(UnsafeModelFile, match="mapping of names to tensors"):
        load_weights(tmp_path / "not_tensors.pt")
    with pytest.raises(UnsafeModelFile):
        save_weights({"x": object()}, tmp_path / "bad.pt")


@pytest.mark.parametrize(
    "pickled",
    [b"\x80\x02.", b"\x80\x02h\x05.", b"ctorch._utils\n_rebuild_tensor_v2\n)R.", b"}(K\x01u"],
    ids=["empty-stack", "unknown-memo", "rebuild-without-arguments", "unterminated"],
)
def test_a_torch_file_with_a_malformed_pickle_is_refused(tmp_path, weekly_result, pickled):
    """The weights-only unpickler raises IndexError, KeyError or TypeError on these: they escaped the loader, and
    ``top_ads`` failed instead of ranking by the best baseline."""
    save_weights(weekly_result.state_dict(), tmp_path / "ok.pt")
    crafted = tmp_path / "crafted.pt"
    with zipfile.ZipFile(tmp_path / "ok.pt") as source, zipfile.ZipFile(crafted, "w") as target:
        for item in source.infolist():
            data = pickled if item.filename.endswith("/data.pkl") else source.read(item)
            target.writestr(item, data)
    with pytest.raises(UnsafeModelFile, match="not a plain state_dict"):
        load_weights(crafted)
    with pytest.raises(FileNotFoundError):  # a file that cannot be read is no verdict on its contents
        load_weights(tmp_path / "missing.pt")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_the_model_store_keeps_state_dicts_and_refuses_a_swapped_file(tmp_path, weekly_result):
    store = LocalModelStore(tmp_path / "models")
    uri = store.save_state_dict("demand_model", "2026-11-22.abc", weekly_result.state_dict(), {"top_n": 20})
    assert uri.startswith("file://") and store.metadata("demand_model", "2026-11-22.abc") == {"top_n": 20}
    assert set(store.load_state_dict("demand_model", "2026-11-22.abc")) == set(weekly_result.state_dict())
    victim = tmp_path / "pwned"
    (store.path("demand_model", "2026-11-22.abc") / "state_dict.pt").write_bytes(pickle.dumps(WritesAFile(victim)))
    with pytest.raises(UnsafeModelFile):
        store.load_state_dict("demand_model", "2026-11-22.abc")
    assert not victim.exists()
    with pytest.raises(KeyError):
        store.load_state_dict("demand_model", "missing")
