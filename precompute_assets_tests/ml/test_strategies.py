"""Demand strategies replayed on a trace: the same days and capacity as replay, nothing of the counted day seen."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pytest

from precompute_assets.ml import replay as replay_module
from precompute_assets.ml import strategies as strategies_module
from precompute_assets.ml.demand import DemandHyperParams, evaluate_demand
from precompute_assets.ml.replay import Trace, parse_trace, read_through_day_hits, replay, split_days
from precompute_assets.ml.strategies import (
    STRATEGIES,
    TraceHours,
    compare_strategies,
    day_hyper_params,
    progress_stages,
    rankings_of,
    strategy_rankings,
    strategy_sets,
    trace_hours,
)
from precompute_assets.tools.cli import main
from precompute_assets_tests.ml.test_demand import jumping_clock

TINY = DemandHyperParams(max_epochs=1, max_seconds=30, max_train_keys=200, hidden_size=8)


def zipf_trace(n=6000, keys=400, seed=0, timestamps=False) -> Trace:
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, keys + 1)
    drawn = rng.choice(keys, size=n, p=p / p.sum())
    ts = np.sort(rng.uniform(0, 86_400 * 6, n)) if timestamps else None
    return Trace(keys=drawn.astype(np.int64), timestamps=ts)


def weekly_trace(days=15, seed=0) -> Trace:
    """Every day 600 requests of 200 steady Zipf keys and 600 of the 30 keys of that weekday's group (20 each),
    which are asked for on that weekday only: frequency ranks them a week late, seasonal naive on time."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, 201)
    out = []
    for d in range(days):
        steady = [f"s{k:03d}" for k in rng.choice(200, size=600, p=p / p.sum())]
        weekly = [f"w{d % 7}_{i:02d}" for i in range(30) for _ in range(20)]
        day = np.array(steady + weekly, dtype=object)
        out.append(day[rng.permutation(len(day))])
    return Trace(keys=np.concatenate(out))


@pytest.mark.parametrize("timestamps", [False, True])
def test_days_are_split_days_and_hours_cover_each_day(timestamps):
    trace = zipf_trace(timestamps=timestamps)
    hours = trace_hours(trace, 5)
    for mine, theirs in zip(hours.day_keys(), split_days(trace, 5), strict=True):
        assert np.array_equal(mine, theirs)
    assert hours.hour.min() == 0 and hours.hour.max() == 23
    assert np.all(np.diff(hours.day) >= 0)
    if timestamps:  # time order: within a day the hour never goes back
        assert all(np.all(np.diff(hours.hour[hours.day == d]) >= 0) for d in range(5))


def test_hourly_counts_are_each_keys_requests_in_each_hour_of_the_days():
    hours = trace_hours(zipf_trace(timestamps=True), 5)
    data = hours.hourly_counts(1, 3)
    inside = (hours.day >= 1) & (hours.day <= 3)
    columns = (hours.day[inside] - 1) * 24 + hours.hour[inside]
    expected = Counter(zip(hours.keys[inside].tolist(), columns.tolist(), strict=True))
    assert data.counts.dtype == np.float32 and data.counts.shape == (len(data.keys), 72)
    assert list(data.keys) == sorted({key for key, _ in expected})
    got = {(data.keys[row], col): data.counts[row, col] for row, col in zip(*np.nonzero(data.counts), strict=True)}
    assert got == expected and data.counts.sum() == inside.sum()
    assert data.n_days == 3 and list(data.weekday[::24]) == [1, 2, 3]


def test_frequency_is_replays_own_top_n_at_the_same_capacity():
    trace = zipf_trace()
    ours = replay(split_days(trace, 6), top_n=40, capacity=120)["hit_rate_ours"]
    result = compare_strategies(trace, 6, ["frequency"], top_n=40, capacity=120)
    assert result["strategies"] == {"frequency": {"hit_rate": ours, "top_n": 40}}
    # Beside the serving clients' live tier instead of the LRU: replay's ours with the same admission.
    for admission, share in (("probation", 40), ("second_miss", "auto")):
        expected = replay(split_days(trace, 6), top_n=share, capacity=120, admission=admission)
        entry = compare_strategies(trace, 6, ["frequency"], top_n=share, capacity=120, admission=admission)
        entry = entry["strategies"]["frequency"]
        assert entry["hit_rate_admission"] == expected["hit_rate_ours_admission"] != expected["hit_rate_ours"]
        if share == "auto":
            assert entry["top_n_admission"] == expected["top_n_mean_admission"]


def test_no_precompute_is_plain_lru_for_every_baseline():
    trace = zipf_trace(seed=2)
    lru = replay(split_days(trace, 5), top_n=0, capacity=80)["hit_rate_lru"]
    stages: list[str] = []
    result = compare_strategies(
        trace, 5, ["frequency", "ewma", "seasonal"], top_n=0, capacity=80, progress=stages.append
    )
    assert {name: entry["hit_rate"] for name, entry in result["strategies"].items()} == {
        "frequency": lru,
        "ewma": lru,
        "seasonal": lru,
    }
    # A long replay says what it is doing: one stage per strategy (replay's progress bar), and one ranking stage
    # when the LSTM trains.
    assert stages == [f"replaying strategy {name}" for name in ("frequency", "ewma", "seasonal")]
    assert len(stages) == progress_stages(["frequency", "ewma", "seasonal"])
    assert progress_stages(["frequency", "lstm", "auto"]) == 4


def test_on_weekly_traffic_seasonal_beats_frequency():
    result = compare_strategies(weekly_trace(), 15, ["frequency", "seasonal", "ewma"], top_n=60, capacity=100)
    rates = {name: entry["hit_rate"] for name, entry in result["strategies"].items()}
    assert rates["seasonal"] > rates["frequency"] + 0.05
    assert all(0 <= rate <= 1 for rate in rates.values())


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_day_is_ranked_from_the_days_before_it_only(strategy):
    hours = trace_hours(zipf_trace(seed=3), 5)
    d = 4
    changed = hours.keys.copy()
    counted = hours.day >= d
    changed[counted] = changed[counted][::-1] + 10_000  # other keys on the counted day
    other = TraceHours(changed, hours.day, hours.hour, hours.n_days)
    mine, _ = strategy_sets(hours, strategy, 30, hp=TINY)
    theirs, _ = strategy_sets(other, strategy, 30, hp=TINY)
    assert mine == theirs
    assert mine[0] == set() and all(len(chosen) <= 30 for chosen in mine)
    assert not any(key >= 10_000 for chosen in mine for key in chosen)


def test_the_lstm_is_trained_once_it_has_three_days_and_reported():
    trace = zipf_trace(seed=4)
    result = compare_strategies(trace, 5, ["lstm"], top_n=30, capacity=90, hp=TINY)
    assert set(result["strategies"]) == {"lstm"} and result["strategies"]["lstm"]["top_n"] == 30
    assert 0 <= result["strategies"]["lstm"]["hit_rate"] <= 1
    (note,) = result["strategy_notes"]
    assert "trained on 2 days" in note and "2 counted days had fewer than 3 days" in note
    assert "at most 1 epochs and 2000 steps a day" in note  # 8400 steps over 2 trained days: the day's own bound
    _, info = strategy_sets(trace_hours(trace, 5), "lstm", 30, hp=TINY)
    assert info["trained_days"] == 2 and info["fallback_days"] == 2 and info["safety_stop_days"] == 0


def test_the_days_share_a_budget_of_steps_and_replay_the_same_whatever_the_clock_says(monkeypatch):
    """Each day's LSTM trains its share of the steps: the same trace replays the same on a machine whose clock says
    every step took a minute (as long as the safety stop does not fire), where a budget of seconds stopped early."""
    trace = zipf_trace(seed=4)
    hp = replace(TINY, max_epochs=1000, max_seconds=1e9)
    assert day_hyper_params(hp, 5, 7, 360.0) == replace(hp, max_steps=3, max_seconds=180.0)  # 2 days train
    assert day_hyper_params(replace(hp, max_steps=2), 5, 7, 1e12).max_steps == 2  # within the day's own bound
    assert day_hyper_params(hp, 3, 7, 360.0) == hp  # no day trains
    args = dict(top_n=30, capacity=90, hp=hp, lstm_budget_steps=7, lstm_safety_s=1e9)
    calm = compare_strategies(trace, 5, ["lstm", "auto"], **args)
    trained = []

    def recording(*args, **kwargs):
        trained.append(evaluate_demand(*args, **kwargs))
        return trained[-1]

    monkeypatch.setattr(strategies_module, "evaluate_demand", recording)
    jumping_clock(monkeypatch, 60.0)
    hurried = compare_strategies(trace, 5, ["lstm", "auto"], **args)
    assert hurried == calm
    assert [(r.evaluation.train_steps, r.evaluation.stopped_by) for r in trained] == [(3, "steps")] * 2
    assert all(r.evaluation.train_seconds > 3 * 60 for r in trained)  # the clock did say so
    assert "at most 1000 epochs and 3 steps a day" in calm["strategy_notes"][0]
    assert not any("safety stop" in note for note in calm["strategy_notes"])


def test_the_safety_stop_firing_is_reported_as_not_reproducible():
    """The LSTM's training stops at max_epochs or its steps, the same on any machine; when its seconds' safety stop
    ends it instead, it stops wherever the machine got to, and the results can differ between runs: said."""
    trace = zipf_trace(seed=4)
    result = compare_strategies(trace, 5, ["lstm", "auto"], top_n=30, capacity=90, hp=TINY, lstm_safety_s=1e-6)
    stopped = [note for note in result["strategy_notes"] if "safety stop" in note]
    assert stopped == [
        "the LSTM's safety stop (0.0 s a day) ended its training before its 2000 steps and 1 epochs on 2 of 2 days: "
        "those models depend on how busy the cores were: lstm can differ between runs, and auto used none of them "
        "(beats_baselines approves no model the safety stop cut short)"
    ]
    _, info = strategy_sets(trace_hours(trace, 5), "lstm", 30, hp=replace(TINY, max_seconds=1e-6))
    assert info["safety_stop_days"] == info["trained_days"] == 2
    _, info = strategy_sets(trace_hours(trace, 5), "auto", 30, hp=replace(TINY, max_seconds=1e-6))
    assert info["approved_days"] == 0 and info["safety_stop_days"] == 2  # as top_ads would decide


def test_auto_follows_the_approved_lstm_else_the_best_baseline_of_each_held_back_day():
    hours = trace_hours(weekly_trace(), 15)
    ranked = rankings_of(hours, STRATEGIES, 30, hp=replace(TINY, top_n=30))
    auto, info = ranked["auto"]
    used = info["used"]
    assert len(auto) == len(used) == 15 and used[:3] == ["frequency"] * 3  # no model before day 3
    for d in range(15):
        assert auto[d] == ranked[used[d]][0][d], d  # the very ranking of the strategy it followed
    assert set(used) <= {"lstm", "frequency", "ewma", "seasonal"}
    assert used.count("lstm") == info["approved_days"] and info["trained_days"] == 12
    assert ranked["lstm"][1] == {k: v for k, v in info.items() if k != "used"}  # one model a day, shared
    # The weekday groups: once the held-back day has a week before it, frequency never wins (seasonal naive sees them).
    assert used[8:] and "frequency" not in used[8:]
    result = compare_strategies(weekly_trace(), 15, ["auto"], top_n=60, capacity=60, hp=TINY)
    (note,) = result["strategy_notes"]
    assert note.startswith("auto: followed ") and "frequency on 2" in note  # counted days 1 and 2


@pytest.mark.parametrize("margin", [1.0, -1.0])
def test_approved_only_ranks_by_the_newest_approved_model_else_the_best_baseline(margin):
    """As top_ads configured with lstm: never approved (a margin of 1), the day's best baseline on its held-back
    evaluation (it ranked by frequency, where top_ads takes that baseline), frequency before a model is trained;
    always approved, the day's own model, which auto follows too."""
    trace, days = (weekly_trace(), 15) if margin > 0 else (zipf_trace(seed=6), 6)
    hours = trace_hours(trace, days)
    ranked = rankings_of(hours, ["lstm", "auto", "frequency"], 30, hp=replace(TINY, top_n=30), margin=margin,
                         approved_only=True)  # fmt: skip
    lstm, info = ranked["lstm"]
    if margin > 0:
        assert info["approved_days"] == 0 and info["fallback_days"] == days - 1  # 2 too early, the rest not approved
        used = ranked["auto"][1]["used"]
        assert lstm[3:] == ranked["auto"][0][3:] and set(used[3:]) - {"frequency"}  # seasonal wins on weekly traffic
        assert lstm[1:3] == ranked["frequency"][0][1:3]
    else:
        assert info["approved_days"] == 3 and info["fallback_days"] == 2
        assert lstm[3:] == ranked["auto"][0][3:] and lstm[1:3] == ranked["frequency"][0][1:3]


@pytest.mark.parametrize("admission", [None, "probation", "second_miss"])
def test_a_given_read_through_replays_as_the_read_through_replayed_again(admission):
    """A strategy's self-tuned replay given the read-through's hits (its candidate N = 0) gives what it gives
    when it replays that candidate itself."""
    trace = zipf_trace(seed=7)
    day_keys = split_days(trace, 6)
    ranked = rankings_of(trace_hours(trace, 6), ["seasonal"], 120)["seasonal"][0]
    args = dict(top_n="auto", capacity=120, admission=admission, ranked=ranked, baselines=False)
    given = read_through_day_hits(day_keys, 120, admission=admission)
    assert replay(day_keys, **args, read_through=given) == replay(day_keys, **args)
    policies = dict(top_n="auto", capacity=120, admission=admission)
    assert replay(day_keys, **policies, read_through=given) == replay(day_keys, **policies)
    with pytest.raises(ValueError, match="one count per day"):
        replay(day_keys, **args, read_through={name: hits[1:] for name, hits in given.items()})


def counting(calls: Counter, name: str):
    """``replay``'s live tier ``name``, counting in ``calls`` its replays of the read-through alone: 120 slots, nothing
    precomputed."""
    tier = getattr(replay_module, name)

    def counted(days, slots, *, precomputed=None, **kw):
        if not isinstance(slots, list) and slots == 120 and not any(len(keys) for keys in precomputed or []):
            calls[name] += 1
        return tier(days, slots, precomputed=precomputed, **kw)

    return counted


def test_strategies_replay_the_read_through_alone_once(monkeypatch):
    """The read-through of C keys alone is every strategy's share candidate N = 0: one replay for all of them,
    on the LRU and on the live tier, not one per strategy."""
    calls: Counter = Counter()

    for name in ("_lru_day_hits", "_probation_day_hits"):
        monkeypatch.setattr(replay_module, name, counting(calls, name))
    names = ["frequency", "ewma", "seasonal"]
    result = compare_strategies(zipf_trace(), 6, names, top_n="auto", capacity=120, admission="probation")
    assert calls == {"_lru_day_hits": 1, "_probation_day_hits": 1}
    assert set(result["strategies"]) == set(names)


def test_replay_cli_replays_the_read_through_once_for_the_policies_and_the_strategies(tmp_path, capsys, monkeypatch):
    """``--top-n auto`` with a strategy: the policies' LRU and live tier and every strategy's share candidate N = 0
    are one replay of the read-through tier, given to both, and each result is what it gets replaying it alone."""
    from precompute_assets.tools import cli

    calls: Counter = Counter()

    @contextlib.contextmanager
    def in_process(wanted: bool):
        with ThreadPoolExecutor(1) as pool:  # the jobs in this process, where the counting tiers are
            yield pool

    for name in ("_lru_day_hits", "_probation_day_hits"):
        monkeypatch.setattr(replay_module, name, counting(calls, name))
    monkeypatch.setattr(cli, "_replay_pool", in_process)
    trace = zipf_trace(timestamps=True)
    path = timed_trace(tmp_path / "trace.csv", list(zip(trace.timestamps.tolist(), trace.keys.tolist(), strict=True)))
    args = ["--days", "6", "--top-n", "auto", "--capacity", "120", "--admission", "probation"]
    assert main(["replay", "--trace", path, *args, "--strategy", "seasonal"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert calls == {"_lru_day_hits": 1, "_probation_day_hits": 1}
    trace = parse_trace(path)
    policies = replay(split_days(trace, 6), top_n="auto", capacity=120, admission="probation")
    assert {name: out[name] for name in policies} == json.loads(json.dumps(policies))
    alone = compare_strategies(trace, 6, ["seasonal"], top_n="auto", capacity=120, admission="probation")
    assert out["strategies"] == alone["strategies"]


def test_the_lstm_trains_on_the_recent_counts_when_they_span_its_lookback(monkeypatch):
    """On a trace shorter than the LSTM's lookback its history is the days the baselines' recent counts hold: one
    matrix counted once a day, and what the LSTM trains on is the count of those days, untouched by the baselines."""
    hours = trace_hours(zipf_trace(seed=3), 6)
    counted: Counter = Counter()
    trained = []
    count_hours, evaluate = TraceHours.hourly_counts, strategies_module.evaluate_demand

    def counting(self, first, last):
        counted[first, last] += 1
        return count_hours(self, first, last)

    def evaluating(history, hp, **kw):
        trained.append(history)
        return evaluate(history, hp, **kw)

    monkeypatch.setattr(TraceHours, "hourly_counts", counting)
    monkeypatch.setattr(strategies_module, "evaluate_demand", evaluating)
    rankings_of(hours, ["lstm"], 20, hp=TINY)
    assert counted == {(0, d - 1): 1 for d in range(1, 6)}
    assert [history.n_days for history in trained] == [3, 4, 5]
    for history in trained:
        fresh = count_hours(hours, 0, history.n_days - 1)
        assert np.array_equal(history.keys, fresh.keys) and np.array_equal(history.counts, fresh.counts)


def test_a_process_pool_gives_the_results_of_one_process():
    # The baselines rank and replay in the pool while the LSTM trains here; the LSTM's replays go there too.
    trace, names = zipf_trace(seed=5, timestamps=True), ["frequency", "seasonal", "lstm"]
    args = dict(top_n="auto", capacity=60, hp=TINY, admission="probation")
    alone = compare_strategies(trace, 6, names, **args)
    stages: list[str] = []
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        pooled = compare_strategies(trace, 6, names, **args, pool=pool, progress=stages.append)
    assert pooled == alone and set(pooled["strategies"]) == set(names)
    assert stages == ["ranking 6 days by lstm", *(f"replaying strategy {name}" for name in names)]


def test_unknown_strategy_and_bad_share_are_refused():
    with pytest.raises(ValueError, match="unknown strategy 'oracle'"):
        compare_strategies(zipf_trace(), 3, ["oracle"], top_n=5, capacity=10)
    with pytest.raises(ValueError, match="whole number >= 0 or 'auto'"):
        compare_strategies(zipf_trace(), 3, ["frequency"], top_n="some", capacity=10)
    with pytest.raises(ValueError, match="whole number >= 0 or 'auto'"):
        compare_strategies(zipf_trace(), 3, ["frequency"], top_n=-1, capacity=10)


def drifting_trace(days=6, seed=40) -> Trace:
    """Each day's keys are new: whatever yesterday ranked is never asked for again, so precompute only hurts."""
    rng = np.random.default_rng(seed)
    return Trace(keys=np.concatenate([np.minimum(rng.zipf(1.1, 3000), 5000) + 100_000 * d for d in range(days)]))


@pytest.mark.parametrize("strategy", ["frequency", "ewma", "seasonal"])
def test_auto_share_falls_back_to_lru_where_every_strategy_hurts(strategy):
    trace = drifting_trace()
    lru = replay(split_days(trace, 6), top_n=0, capacity=100)["hit_rate_lru"]
    result = compare_strategies(trace, 6, [strategy], top_n="auto", capacity=100)["strategies"][strategy]
    assert result["top_n_chosen"] == [0] * 5 and result["top_n"] == 0.0
    assert result["hit_rate"] == lru
    fixed = compare_strategies(trace, 6, [strategy], top_n=50, capacity=100)["strategies"][strategy]
    assert fixed["hit_rate"] < lru  # the fixed share it avoided


@pytest.mark.parametrize("strategy", ["frequency", "ewma", "seasonal"])
def test_auto_share_precomputes_where_it_helps(strategy):
    """Skewed days over the same keys, with many keys asked for once that push popular ones out of an LRU: each
    strategy's tuned share precomputes after the first counted day and beats plain LRU (by about a point and a
    half over five counted days: the share grows a step a day)."""
    rng = np.random.default_rng(41)
    trace = Trace(keys=np.concatenate([np.minimum(rng.zipf(1.1, 3000), 20_000) for _ in range(6)]))
    lru = replay(split_days(trace, 6), top_n=0, capacity=100)["hit_rate_lru"]
    result = compare_strategies(trace, 6, [strategy], top_n="auto", capacity=100)["strategies"][strategy]
    assert result["top_n_chosen"][0] == 0 and all(share > 0 for share in result["top_n_chosen"][1:])
    assert result["hit_rate"] > lru + 0.01


def test_auto_share_on_zipf_is_within_noise_of_lru_or_better():
    trace = zipf_trace(n=12_000, keys=3000, seed=5)
    lru = replay(split_days(trace, 6), top_n=0, capacity=200)["hit_rate_lru"]
    result = compare_strategies(trace, 6, ["frequency", "ewma", "seasonal"], top_n="auto", capacity=200)
    for name, entry in result["strategies"].items():
        assert entry["hit_rate"] >= lru - 0.01, name


def test_replay_cli_merges_the_strategies(tmp_path, capsys):
    trace = tmp_path / "trace.txt"
    trace.write_text("\n".join(str(k) for k in zipf_trace(n=3000).keys) + "\n")
    args = ["replay", "--trace", str(trace), "--days", "4", "--top-n", "20", "--capacity", "60"]
    assert main([*args, "--strategy", "seasonal"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["strategies"]) == {"seasonal"} and out["strategies"]["seasonal"]["top_n"] == 20
    assert "hit_rate_lru" in out and "hit_rate_belady" in out
    assert main([*args, "--strategy", "auto"]) == 0  # top_ads' default, replayed like the others
    out = json.loads(capsys.readouterr().out)
    assert set(out["strategies"]) == {"auto"} and out["strategy_notes"][0].startswith("auto: followed frequency")
    # The approval margin, as demand_model's config sets it: below -1 every trained LSTM is approved, above 1 none.
    for margin, approved in (("-1.5", True), ("1.5", False)):
        assert main([*args, "--strategy", "auto", "--margin", margin]) == 0
        note = strict_json(capsys.readouterr().out)["strategy_notes"][0]
        assert note.startswith("auto: followed frequency on 2, ") and ("lstm on 1" in note) == approved, note
    assert main([*args, "--strategy", "auto", "--margin", "nan"]) == 2
    assert "--margin must be a finite number, got nan" in capsys.readouterr().err
    assert main([*args, "--strategy", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("precompute replay: unknown --strategy 'nope'") and err.count("\n") == 1
    assert main([*args[:-4], "--top-n", "auto", "--capacity", "60", "--strategy", "ewma"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["top_n"] == "auto" and out["strategies"]["ewma"]["top_n"] == pytest.approx(
        sum(out["strategies"]["ewma"]["top_n_chosen"]) / 3
    )


def test_replay_cli_takes_several_strategies_separated_by_commas(tmp_path, capsys):
    """``--strategy frequency,ewma`` was an unknown strategy: one name or all were the only choices."""
    trace = tmp_path / "trace.txt"
    trace.write_text("\n".join(str(k) for k in zipf_trace(n=3000).keys) + "\n")
    args = ["replay", "--trace", str(trace), "--days", "4", "--top-n", "20", "--capacity", "60"]
    assert main([*args, "--strategy", "seasonal, frequency,seasonal"]) == 0
    both = json.loads(capsys.readouterr().out)["strategies"]
    assert list(both) == ["seasonal", "frequency"]
    assert main([*args, "--strategy", "frequency"]) == 0
    assert json.loads(capsys.readouterr().out)["strategies"]["frequency"] == both["frequency"]
    for bad, named in (("frequency,nope", "'nope'"), ("frequency,", "''")):
        assert main([*args, "--strategy", bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"precompute replay: unknown --strategy {named}") and err.count("\n") == 1


def test_replay_cli_runs_an_ab_experiment_and_refuses_bad_arms(tmp_path, capsys):
    trace = tmp_path / "weekly.txt"
    trace.write_text("\n".join(weekly_trace().keys) + "\n")
    args = ["replay", "--trace", str(trace), "--days", "15", "--top-n", "60", "--capacity", "60"]
    assert main([*args, "--ab", "frequency,seasonal", "--ab-salt", "s2"]) == 0
    ab = json.loads(capsys.readouterr().out)["ab"]
    assert ab["arms"] == ["frequency", "seasonal"] and ab["salt"] == "s2"
    assert ab["top_n"] == {"frequency": 30, "seasonal": 30}
    # Seasonal ranks each weekday's keys on time, frequency a week late; with no LRU to hide it the gap is clear.
    assert ab["difference"]["excludes_zero"] and ab["difference"]["value"] > 0
    assert main([*args, "--ab", "seasonal,seasonal"]) == 0  # an A/A test
    aa = json.loads(capsys.readouterr().out)["ab"]
    assert aa["arms"] == ["seasonal_a", "seasonal_b"] and not aa["difference"]["excludes_zero"]
    bad_arms = [
        ("frequency", "--ab 'frequency'"),
        ("frequency,oracle", "--ab 'frequency,oracle'"),
        ("lstm_b,lstm_b", "names an arm of an A/A test"),
    ]
    for bad, message in bad_arms:
        assert main([*args, "--ab", bad]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    assert main([*args[:-4], "--top-n", "auto", "--capacity", "60", "--ab", "frequency,ewma"]) == 2
    assert "--ab needs a fixed --top-n" in capsys.readouterr().err


def test_replay_ab_splits_zero_padded_ids_as_written(tmp_path, capsys):
    """A text trace's integer keys were read as integers, so ``007`` was hashed into its arm as ``7``, while top_ads
    and the serving client hash the id as written: the replay's split was not production's (h_replay). With salt s1,
    ``007`` is in the first arm and ``7`` in the second: the hot key's requests show which was hashed."""
    import random

    from precompute_assets.serving.keys import arm_of

    arms = ["frequency", "seasonal"]
    assert arm_of("s1", "007", arms) == "frequency" != arm_of("s1", "7", arms)
    rng = random.Random(3)
    keys = ["007" if rng.random() < 0.5 else f"{rng.randrange(10, 300):03d}" for _ in range(4000)]
    trace = tmp_path / "padded.txt"
    trace.write_text("\n".join(keys) + "\n")
    args = ["replay", "--trace", str(trace), "--days", "4", "--top-n", "20", "--capacity", "60"]
    assert main([*args, "--ab", ",".join(arms), "--ab-salt", "s1"]) == 0
    per_arm = json.loads(capsys.readouterr().out)["ab"]["per_arm"]
    assert per_arm["frequency"]["requests"] > per_arm["seasonal"]["requests"]  # 007's half of the requests
    # Only integer spellings are kept: a CSV whose keys are quoted on some lines reads as every replay reads it, so
    # the references (LRU here) do not change with --admission (h_diff7: they did, as its quotes were removed).
    rows = [f'{1_767_225_600 + i},"ad{i % 40}"' if i % 3 else f"{1_767_225_600 + i},ad{i % 40}" for i in range(3000)]
    quoted = tmp_path / "quoted.csv"
    quoted.write_text("\n".join(rows) + "\n")
    lru = []
    for admission in ("probation", "frequency"):
        command = ["replay", "--trace", str(quoted), "--days", "3", "--top-n", "5", "--capacity", "30"]
        assert main([*command, "--admission", admission]) == 0
        lru.append(json.loads(capsys.readouterr().out)["hit_rate_lru"])
    assert lru[0] == lru[1]


def strict_json(text: str) -> dict:
    """JSON as other languages read it: NaN and Infinity are not JSON."""

    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def timed_trace(path, rows: list[tuple[float, str]]) -> str:
    path.write_text("".join(f"{ts},{key}\n" for ts, key in rows))
    return str(path)


@pytest.mark.parametrize(
    ("name", "rows", "days"),
    [
        # Day 2 of 5 has no requests at all (a gap in the timestamps).
        ("empty_day", [(d * 86_400 + i * 60, f"k{(i * 7 + d) % 40}") for d in (0, 1, 3, 4) for i in range(300)], 5),
        ("single_key", [(i * 300.0, "only") for i in range(5 * 288)], 5),
        # Three days: shorter than every lookback (the LSTM's 14, the baselines' 7, seasonal's week).
        ("shorter_than_lookback", [(d * 86_400 + i * 90, f"k{i % 25}") for d in range(3) for i in range(500)], 3),
    ],
)
def test_replay_cli_runs_every_strategy_on_degenerate_traces(tmp_path, capsys, name, rows, days):
    trace = timed_trace(tmp_path / f"{name}.csv", rows)
    if name == "empty_day":
        assert [len(day) for day in split_days(parse_trace(trace), days)].count(0) == 1
    args = ["replay", "--trace", trace, "--days", str(days), "--top-n", "auto", "--capacity", "10"]
    assert main([*args, "--strategy", "all", "--next-key", "--admission", "probation"]) == 0
    out = strict_json(capsys.readouterr().out)
    assert set(out["strategies"]) == {*STRATEGIES, "prefetch"}
    rates = [entry["hit_rate"] for entry in out["strategies"].values()]
    rates += [value for key, value in out.items() if key.startswith("hit_rate_")]
    assert all(0.0 <= rate <= 1.0 for rate in rates), rates
    if name == "single_key":  # one key: after its first request every lookup hits, whatever the strategy
        assert out["hit_rate_lru"] == out["strategies"]["frequency"]["hit_rate"] == 1.0
    if name == "shorter_than_lookback":
        assert "2 counted days had fewer than 3 days" in " ".join(out["strategy_notes"])
    fixed = [*args[:5], "--top-n", "4", "--capacity", "10", "--ab", "frequency,lstm"]
    assert main(fixed) == 0
    ab = strict_json(capsys.readouterr().out)["ab"]
    assert ab["arms"] == ["frequency", "lstm"] and ab["requests"] == sum(a["requests"] for a in ab["per_arm"].values())


def test_a_replayed_seasonal_ranking_skips_a_day_without_logs():
    """The self-tuned share replayed seasonal from a day whose logs were missing as a day of no requests, ranking
    every key by name, where top_ads ranks from the latest day with logs (h_diff12)."""
    rng = np.random.default_rng(3)
    popular = [f"k{i:04d}" for i in range(12)]
    keys, day, hour = [], [], []
    for d in range(9):
        if d == 1:
            continue  # its logs are missing
        drawn = np.repeat(popular, np.arange(1, 13) * 10)  # k0011 most popular
        keys += list(drawn)
        day += [d] * len(drawn)
        hour += list(rng.integers(0, 24, len(drawn)))
    order = np.lexsort((hour, day))
    missing = np.zeros(9 * 24, dtype=bool)
    missing[24:48] = True
    hours = TraceHours(np.array(keys, dtype=object)[order], np.array(day)[order], np.array(hour)[order], 9, missing)
    ranked, _ = strategy_rankings(hours, "seasonal", 5)
    assert ranked[8][:3] == ["k0011", "k0010", "k0009"], ranked[8]  # from day 7, not from day 1's nothing
    without = TraceHours(hours.keys, hours.day, hours.hour, 9)  # the missing day read as a day of no requests
    assert strategy_rankings(without, "seasonal", 5)[0][8] == ["k0000", "k0001", "k0002", "k0003", "k0004"]  # names
