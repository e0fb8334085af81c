"""A/B experiments: the salted split, the budget split, honest intervals, the SRM check and the replay."""

from __future__ import annotations

import hashlib
import math

import fakeredis
import numpy as np
import pandas as pd
import pytest

from precompute_assets.ml.demand import DemandHyperParams
from precompute_assets.ml.experiment import (
    SRM_ALPHA,
    ab_replay,
    arm_budgets,
    arm_of,
    arm_report,
    arm_strategy,
    arms_of,
    parse_arms,
    split_selection,
)
from precompute_assets.ml.replay import Trace, replay
from precompute_assets.ml.strategies import strategy_sets, trace_hours
from precompute_assets.serving import Experiment, PredictionCache, QueryLogger, publish_version
from precompute_assets.serving.keys import KeySchema
from precompute_assets_tests.factories import logged_queries

ARMS = ("frequency", "lstm")


# --- the split -------------------------------------------------------------------------------------------


def test_arm_of_is_the_documented_salted_sha256():
    for key in ("ad1", "ad000001", "ключ", "42"):
        digest = hashlib.sha256(f"ab1:{key}".encode()).digest()
        assert arm_of("ab1", key, ARMS) == ARMS[int.from_bytes(digest[:8], "big") % 2]
    # Pinned: a change of the hash would silently reshuffle running experiments (and other languages' clients).
    assert "".join("fl"[ARMS.index(arm_of("ab1", f"ad{i}", ARMS))] for i in range(12)) == "fffllfllflfl"
    assert arm_of("ab2", "ad1", ARMS) == "lstm"


def test_arms_split_many_keys_about_evenly_and_a_new_salt_reshuffles():
    keys = [f"ad{i:06d}" for i in range(100_000)]
    first = arms_of("ab1", keys, ARMS)
    share = float(np.mean(first == "frequency"))
    assert abs(share - 0.5) < 0.01  # sd 0.0016
    second = arms_of("ab2", keys, ARMS)
    assert abs(float(np.mean(first == second)) - 0.5) < 0.01  # independent of the first split
    # Vectorised and scalar agree, for integer keys (a trace's) too: the arm of 7 is the arm of "7".
    assert [arm_of("ab1", k, ARMS) for k in keys[:500]] == first[:500].tolist()
    ints = np.arange(1000, dtype=np.int64)
    assert arms_of("s", ints, ARMS).tolist() == [arm_of("s", str(i), ARMS) for i in range(1000)]


def test_the_serving_client_logs_the_arm_ml_computes():
    """Client and ml agree (fakeredis: a pure unit test; the real-Redis one is in serving/test_cache.py)."""
    client = fakeredis.FakeRedis()
    schema = KeySchema("unit")
    experiment = Experiment("e", "s9", ARMS)
    keys = [f"ad{i}" for i in range(300)]
    publish_version(client, "ctr", "v1", [(k, 0.1) for k in keys[:50]], n_keys=50, schema=schema, experiment=experiment)
    logger = QueryLogger(client, schema)
    cache = PredictionCache(client, schema=schema, logger=logger, pointer_ttl_s=0)
    for key in keys:
        cache.get("ctr", key)
    logger.close()
    logged = {f[b"key"].decode(): f[b"arm"].decode() for _, f in logged_queries(client, schema)}
    assert logged == dict(zip(keys, arms_of("s9", keys, ARMS).tolist(), strict=True))


@pytest.mark.parametrize(
    ("arms", "message"),
    [
        ("frequency", "exactly two"),
        ("frequency,lstm,ewma", "exactly two"),
        ("frequency,", "exactly two"),
        ("frequency,magic", "unknown strategy 'magic'"),
        ("frequency_c,lstm", "unknown strategy 'frequency_c'"),
        ("_a,lstm", "unknown strategy '_a'"),
        ("frequency_a,frequency_a", "names an arm of an A/A test"),
        ("frequency,frequency_a", "names an arm of an A/A test"),  # (h_diff22: an A/A under names that hid it)
        ("frequency_b,frequency_a", "give its two arms as S_a,S_b"),
        ("ewma_b,seasonal_a", "'ewma_b' names an arm of an A/A test"),
    ],
)
def test_parse_arms_rejects_bad_experiments(arms, message):
    with pytest.raises(ValueError, match=message):
        parse_arms(arms)


def test_parse_arms_accepts_spaces_and_sequences():
    assert parse_arms(" ewma , seasonal ") == ("ewma", "seasonal")
    assert parse_arms(["lstm", "frequency"]) == ("lstm", "frequency")


def test_an_aa_test_names_its_arms_apart_and_both_select_by_the_one_strategy():
    """An A/A test checks the experiment itself (a platform's first experiment): one strategy in both arms."""
    assert parse_arms("frequency, frequency") == ("frequency_a", "frequency_b")
    assert parse_arms("lstm_a,lstm_b") == ("lstm_a", "lstm_b")  # as it names them: a config can say so too
    assert [arm_strategy(arm) for arm in ("lstm_a", "lstm_b", "lstm", "auto_b")] == ["lstm", "lstm", "lstm", "auto"]
    with pytest.raises(ValueError, match="'oracle_a' names no selection strategy"):
        arm_strategy("oracle_a")


def test_split_selection_gives_each_arm_half_the_budget_from_its_own_keys_by_its_own_scores():
    keys = [f"ad{i}" for i in range(1000)]
    up = pd.Series(np.arange(1000.0), index=keys)  # frequency: higher index, more demand
    down = pd.Series(-np.arange(1000.0), index=keys)  # lstm: the opposite
    frame = split_selection({"frequency": up, "lstm": down}, salt="s", top_n=101)
    assert list(frame.columns) == ["ad_id", "arm"]
    counts = frame["arm"].value_counts()
    assert (counts["frequency"], counts["lstm"]) == (51, 50) == tuple(arm_budgets(101))
    assert frame["ad_id"].is_unique
    # Purity: every key chosen by an arm hashes into that arm.
    assert (arms_of("s", frame["ad_id"], ARMS) == frame["arm"].to_numpy()).all()
    # Each arm took its own top: the highest indexes for frequency, the lowest for lstm.
    freq_keys = [k for k in keys if arm_of("s", k, ARMS) == "frequency"]
    lstm_keys = [k for k in keys if arm_of("s", k, ARMS) == "lstm"]
    assert frame.loc[frame["arm"] == "frequency", "ad_id"].tolist() == freq_keys[::-1][:51]
    assert frame.loc[frame["arm"] == "lstm", "ad_id"].tolist() == lstm_keys[:50]


def test_split_selection_leaves_an_arms_unfillable_budget_unused():
    scores = pd.Series([3.0, 2.0, 1.0], index=["a", "b", "c"])
    frame = split_selection({"frequency": scores, "lstm": pd.Series(dtype=float)}, salt="s", top_n=10)
    assert set(frame["arm"]) <= {"frequency"}
    assert len(frame) == int((arms_of("s", ["a", "b", "c"], ARMS) == "frequency").sum())
    assert split_selection({"frequency": scores, "lstm": scores}, salt="s", top_n=0).empty
    with pytest.raises(ValueError, match="exactly two arms"):
        split_selection({"frequency": scores}, salt="s", top_n=2)


# --- intervals and SRM -----------------------------------------------------------------------------------


def population(rng: np.random.Generator, n_keys: int) -> pd.DataFrame:
    """Keys with heavy-tailed request counts and their own hit probability (hot keys are hit more)."""
    requests = rng.geometric(0.05, n_keys)  # mean 20 requests a key
    p = np.clip(0.2 + 0.5 * (requests > 30) + rng.normal(0, 0.1, n_keys), 0, 1)
    hits = rng.binomial(requests, p)
    key = np.repeat(np.arange(n_keys), requests)
    hit = np.concatenate([np.arange(n) < h for n, h in zip(requests, hits, strict=True)])
    return pd.DataFrame({"key": key, "hit": hit, "arm": "frequency"})


def test_bootstrap_interval_covers_the_true_rate_at_about_the_nominal_rate():
    # The population's rate: E[requests * p] / E[requests], from a large sample.
    big = population(np.random.default_rng(10_000), 400_000)
    truth = big["hit"].mean()
    covered = 0
    for seed in range(100):
        sample = population(np.random.default_rng(seed), 300)
        report = arm_report(sample, arms=ARMS, n_boot=400, seed=seed)
        low, high = report["per_arm"]["frequency"]["ci"]
        covered += low <= truth <= high
    assert covered >= 85, covered


def test_bootstrap_is_wider_than_the_per_request_interval_when_keys_repeat():
    rng = np.random.default_rng(3)
    n_keys, repeats = 100, 200
    p = np.where(rng.random(n_keys) < 0.5, 0.05, 0.95)  # a key is either almost always hit or almost never
    hits = rng.random((n_keys, repeats)) < p[:, None]
    frame = pd.DataFrame({"key": np.repeat(np.arange(n_keys), repeats), "hit": hits.ravel(), "arm": "lstm"})
    stats = arm_report(frame, arms=ARMS, n_boot=1000)["per_arm"]["lstm"]
    boot = stats["ci"][1] - stats["ci"][0]
    naive = stats["naive_ci"][1] - stats["naive_ci"][0]
    assert naive == pytest.approx(2 * 1.959964 * math.sqrt(stats["hit_rate"] * (1 - stats["hit_rate"]) / 20_000))
    assert boot > 5 * naive, (boot, naive)  # ~0.19 vs ~0.014: 100 keys, not 20,000 requests


def keys_frame(n_first: int, n_second: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "key": np.arange(n_first + n_second),
            "hit": np.arange(n_first + n_second) % 3 == 0,
            "arm": ["frequency"] * n_first + ["lstm"] * n_second,
        }
    )


def test_srm_flags_a_55_45_split_of_20k_keys_and_not_a_hashed_one():
    skewed = arm_report(keys_frame(11_000, 9_000), arms=ARMS, n_boot=50)["srm"]
    assert skewed["mismatch"] and skewed["p_value"] < 1e-30
    assert skewed["keys"] == {"frequency": 11_000, "lstm": 9_000}
    keys = [f"ad{i}" for i in range(20_000)]
    hashed = pd.DataFrame({"key": keys, "hit": True, "arm": arms_of("ab1", keys, ARMS)})
    fair = arm_report(hashed, arms=ARMS, n_boot=50)["srm"]
    assert not fair["mismatch"] and fair["p_value"] > 0.001
    # The chi-square survival function with one degree of freedom, checked against scipy.
    stats = pytest.importorskip(
        "scipy.stats", reason="scipy is not installed: it only checks our chi-square against its"
    )
    assert fair["p_value"] == pytest.approx(stats.chi2.sf(fair["chi2"], 1))
    assert skewed["p_value"] == pytest.approx(stats.chi2.sf(200.0, 1))


def test_repeated_requests_count_once_in_the_srm_check():
    frame = keys_frame(1000, 1000)
    heavy = pd.concat([frame, *[frame[frame["arm"] == "frequency"]] * 5])  # one arm's keys asked 6 times as often
    report = arm_report(heavy, arms=ARMS, n_boot=20)
    assert report["per_arm"]["frequency"]["requests"] == 6000 and not report["srm"]["mismatch"]


def test_the_difference_and_its_interval():
    rng = np.random.default_rng(5)
    n = 4000
    arm = np.where(np.arange(n) % 2 == 0, "frequency", "lstm")
    hit = rng.random(n) < np.where(arm == "lstm", 0.6, 0.4)
    report = arm_report(pd.DataFrame({"key": np.arange(n), "hit": hit, "arm": arm}), arms=ARMS, n_boot=500)
    diff = report["difference"]
    assert diff["of"] == "lstm - frequency"
    rates = report["per_arm"]
    assert diff["value"] == pytest.approx(rates["lstm"]["hit_rate"] - rates["frequency"]["hit_rate"])
    assert diff["ci"][0] < diff["value"] < diff["ci"][1] and diff["ci"][0] > 0.1 and diff["excludes_zero"]
    # Same seed, same report; requests and hits add up.
    again = arm_report(pd.DataFrame({"key": np.arange(n), "hit": hit, "arm": arm}), arms=ARMS, n_boot=500)
    assert again == report
    assert sum(s["requests"] for s in rates.values()) == n and sum(s["hits"] for s in rates.values()) == hit.sum()


def test_a_rate_resting_on_few_keys_says_its_interval_runs_narrow():
    """A/A replays (600 seeds) of the bootstrap over keys: the 95 % difference interval covered 0 94.7 % of the time
    with ~900 effective keys per arm, but about 90.5 % with 10-15, where a few keys carry the rate. Said, not hidden."""
    hot = pd.DataFrame({"key": ["a"] * 90 + ["b"] * 5 + ["c"] * 5, "hit": [True] * 100, "arm": "lstm"})
    many = pd.DataFrame({"key": np.arange(200), "hit": np.arange(200) % 2 == 0, "arm": "frequency"})
    report = arm_report(pd.concat([hot, many], ignore_index=True), arms=ARMS, n_boot=50)
    few = [note for note in report["notes"] if "effective keys" in note]
    # Kish's effective number of keys: requests² / sum of each key's requests² = 100² / (90² + 5² + 5²) = 1.2
    assert few == [
        "arm lstm's hit rate rests on 1.2 effective keys (requests² / Σ requests per key²), fewer than 30: its own "
        "interval runs narrow (in A/A replays with 10-15 effective keys a 95 % interval covered about 90 %; the "
        "difference's, from re-randomization, does not)"
    ]


def test_one_key_per_arm_is_no_evidence_of_a_difference():
    """A bootstrap over keys gave one key per arm, at 50 % and 55 %, a difference interval [0.05, 0.05] that
    "excluded zero" (h_ab): two keys can differ for any reason, and re-randomizing them says so."""
    frame = pd.DataFrame(
        {"key": ["a"] * 100 + ["b"] * 100, "hit": [True] * 50 + [False] * 50 + [True] * 55 + [False] * 45,
         "arm": ["frequency"] * 100 + ["lstm"] * 100}
    )  # fmt: skip
    diff = arm_report(frame, arms=ARMS, n_boot=200)["difference"]
    assert diff["value"] == pytest.approx(0.05) and diff["excludes_zero"] is False and diff["p_value"] == 1.0
    assert diff["ci"] == pytest.approx([0.0, 0.1])


def test_the_difference_interval_stays_within_what_a_difference_of_rates_can_be():
    """A few hot keys spread the re-randomized null past 1: an interval [-1.08, 0.04] for a difference of two hit
    rates, charted so by selection_experiment (h_demand3)."""
    frame = pd.DataFrame(
        {"key": ["a"] * 100 + ["b"] * 100 + ["c"] * 3 + ["d"] * 3,
         "hit": [True] * 100 + [False] * 100 + [True] * 3 + [False] * 3,
         "arm": ["frequency"] * 100 + ["lstm"] * 100 + ["frequency"] * 3 + ["lstm"] * 3}
    )  # fmt: skip
    diff = arm_report(frame, arms=ARMS, n_boot=200)["difference"]
    assert diff["value"] == pytest.approx(-1.0) and diff["excludes_zero"] is False
    assert diff["ci"][0] == -1.0 and diff["ci"][1] <= 1.0 and diff["ci"][0] <= diff["value"] <= diff["ci"][1]


def test_the_difference_interval_excludes_zero_exactly_when_the_verdict_says_so():
    """An interpolated quantile gave an interval that excluded 0 beside excludes_zero False (2 of 300 reports, h_diff):
    the interval's half-width is now the order statistic of the p-value's rule."""
    for seed in range(300):
        rng = np.random.default_rng(seed)
        key = rng.zipf(1.3, 800) % 40
        hit = rng.random(800) < 0.4
        arm = np.where(rng.random(40) < 0.5, "frequency", "lstm")[key]
        diff = arm_report(pd.DataFrame({"key": key, "hit": hit, "arm": arm}), arms=ARMS, n_boot=200, seed=seed)[
            "difference"
        ]
        low, high = diff["ci"]
        assert (low > 0 or high < 0) == diff["excludes_zero"] == (diff["p_value"] <= 0.05), (seed, diff)


def test_an_aa_test_of_skewed_traffic_excludes_zero_as_often_as_its_level_says():
    """Zipf-like traffic (s = 1, 20,000 keys, 20,000 requests; the hottest 5 % of keys hit 95 % of the time, the
    rest 20 %), both arms one strategy, 300 seeds: the bootstrap's 95 % interval excluded 0 in 13 % of them (40);
    the re-randomization test at p <= 0.05, in 5.3 % (16)."""
    keys, requests = 20_000, 20_000
    weights = 1 / np.arange(1, keys + 1)
    weights /= weights.sum()
    excluded = 0
    for seed in range(300):
        rng = np.random.default_rng(seed)
        key = rng.choice(keys, size=requests, p=weights)
        hit = rng.random(requests) < np.where(key < keys // 20, 0.95, 0.2)
        arm = np.where(rng.random(keys) < 0.5, "frequency", "lstm")[key]
        report = arm_report(pd.DataFrame({"key": key, "hit": hit, "arm": arm}), arms=ARMS, n_boot=1000, seed=seed)
        excluded += report["difference"]["excludes_zero"]
    assert excluded / 300 <= 0.075  # 5 % expected: 2.2 standard errors of 300 draws above it


def test_degenerate_inputs_give_defined_values_and_notes():
    empty = arm_report(pd.DataFrame({"key": [], "hit": [], "arm": []}), arms=ARMS)
    assert empty["rows"] == 0
    assert empty["per_arm"]["frequency"] == {
        "requests": 0, "keys": 0, "hits": 0, "hit_rate": None, "ci": [None, None], "naive_ci": [None, None]
    }  # fmt: skip
    assert empty["difference"]["value"] is None and empty["difference"]["excludes_zero"] is None
    assert empty["srm"]["p_value"] is None and not empty["srm"]["mismatch"]
    assert any("no keys in either arm" in note for note in empty["notes"])
    one = arm_report(pd.DataFrame({"key": ["a", "b", "c"], "hit": [True, False, True], "arm": "lstm"}), arms=ARMS)
    assert one["per_arm"]["lstm"]["hit_rate"] == pytest.approx(2 / 3)
    assert one["per_arm"]["frequency"]["hit_rate"] is None
    assert one["difference"]["value"] is None
    assert any("arm frequency has no requests" in note for note in one["notes"])
    stray = arm_report(pd.DataFrame({"key": ["a", "b"], "hit": [True, True], "arm": ["lstm", None]}), arms=ARMS)
    assert stray["rows"] == 1 and any("1 rows of other arms" in note for note in stray["notes"])


def test_too_few_re_randomizations_to_reject_say_so():
    """With n_boot 10 the smallest p-value is 1/11: a total separation came out not significant, with no word why."""
    frame = pd.DataFrame({"key": [f"k{i}" for i in range(20)], "hit": [True] * 10 + [False] * 10,
                          "arm": ["lstm"] * 10 + ["frequency"] * 10})  # fmt: skip
    few = arm_report(frame, arms=ARMS, n_boot=10)
    assert few["difference"]["excludes_zero"] is False
    assert any("10 re-randomizations cannot show a difference at alpha 0.05" in n and "at least 19" in n
               for n in few["notes"])  # fmt: skip
    enough = arm_report(frame, arms=ARMS, n_boot=19)
    assert not any("re-randomizations" in note for note in enough["notes"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"arms": ["lstm"]}, "exactly two distinct arms"),
        ({"arms": ["lstm", "lstm"]}, "exactly two distinct arms"),
        ({"arms": ARMS, "n_boot": 0}, "n_boot"),
        ({"arms": ARMS, "alpha": 1.5}, "alpha"),
    ],
)
def test_arm_report_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        arm_report(keys_frame(5, 5), **kwargs)
    with pytest.raises(ValueError, match="missing"):
        arm_report(pd.DataFrame({"key": [1]}), arms=ARMS)


# --- the replay ------------------------------------------------------------------------------------------


def weekly_trace(days: int = 10, per_day: int = 3000, hot: int = 60, seed: int = 0) -> Trace:
    """Each weekday has its own hot keys (disjoint sets): the same day a week earlier predicts a day, the days
    just before it do not."""
    rng = np.random.default_rng(seed)
    keys = []
    for d in range(days):
        weekday = d % 7
        hot_keys = np.arange(hot) + 1000 * weekday
        keys.append(rng.choice(hot_keys, per_day))
    return Trace(np.concatenate(keys).astype(np.int64))


def test_ab_replay_finds_the_strategy_that_wins_with_an_interval_excluding_zero():
    trace = weekly_trace()
    out = ab_replay(trace, 10, arms=("frequency", "seasonal"), top_n=60, capacity=66, salt="ab1", warmup_days=7)
    ab = out["ab"]
    assert ab["arms"] == ["frequency", "seasonal"] and ab["salt"] == "ab1"
    assert ab["top_n"] == {"frequency": 30, "seasonal": 30}
    rates = ab["per_arm"]
    assert rates["seasonal"]["hit_rate"] > 0.8 > 0.3 > rates["frequency"]["hit_rate"]
    assert ab["difference"]["of"] == "seasonal - frequency"
    assert ab["difference"]["ci"][0] > 0.5 and ab["difference"]["excludes_zero"]
    assert not ab["srm"]["mismatch"]
    assert ab["requests"] == 3 * 3000 == sum(s["requests"] for s in rates.values())


@pytest.mark.parametrize("keys", [np.array([f"user:{i}" for i in range(40_000)], dtype=object), np.arange(40_000)])
@pytest.mark.parametrize("salt", ["ab1", "x", "s2"])
def test_the_arms_split_is_independent_of_the_shards_sample(keys, salt):
    """``replay --sample --ab``: if the arms' hash followed the sample's, one arm would get most of the sampled keys.
    A chi-square test (1 dof) of arm against kept over 40,000 keys, at the SRM threshold."""
    from precompute_assets.ml.replay import shards_keep

    kept = shards_keep(keys, 0.3)
    first = arms_of(salt, keys, ("a", "b")) == "a"
    table = np.array([[np.sum(kept & first), np.sum(kept & ~first)], [np.sum(~kept & first), np.sum(~kept & ~first)]])
    expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0, keepdims=True) / table.sum()
    chi2 = float(((table - expected) ** 2 / expected).sum())
    assert math.erfc(math.sqrt(chi2 / 2)) > SRM_ALPHA, table


def test_an_aa_replay_splits_one_ranking_between_its_arms_and_finds_no_difference():
    trace = weekly_trace(days=9, seed=3)
    kwargs = {"top_n": 41, "capacity": 50, "salt": "x", "warmup_days": 2}
    ab = ab_replay(trace, 9, arms=parse_arms("seasonal,seasonal"), **kwargs)["ab"]
    assert ab["arms"] == ["seasonal_a", "seasonal_b"] and ab["top_n"] == {"seasonal_a": 21, "seasonal_b": 20}
    # Each arm's budget from one ranking on its own keys: together the seasonal top 41 of each day, as when all of
    # it is precomputed by seasonal (replay's precomputed sets, here without an experiment).
    hours = trace_hours(trace, 9)
    arm = arms_of("x", hours.keys, ab["arms"])
    sets = []
    for name, budget in (("seasonal_a", 21), ("seasonal_b", 20)):
        mask = arm == name
        sub = type(hours)(hours.keys[mask], hours.day[mask], hours.hour[mask], 9)
        sets.append(strategy_sets(sub, "seasonal", budget)[0])
    union = [a | b for a, b in zip(*sets, strict=True)]
    expected = replay(hours.day_keys(), top_n=41, capacity=50, warmup_days=2, precomputed=union[2:])
    assert ab["hit_rate_ours"] == pytest.approx(expected["hit_rate_ours"])
    assert not ab["difference"]["excludes_zero"] and not ab["srm"]["mismatch"]


def test_ab_replay_is_replays_ours_with_the_union_of_the_arms_sets():
    trace = weekly_trace(days=9, seed=1)
    out = ab_replay(trace, 9, arms=("seasonal", "ewma"), top_n=41, capacity=50, salt="x", warmup_days=2)["ab"]
    hours = trace_hours(trace, 9)
    arm = arms_of("x", hours.keys, ("seasonal", "ewma"))
    sets = {}
    for name, budget in (("seasonal", 21), ("ewma", 20)):
        mask = arm == name
        sub = type(hours)(hours.keys[mask], hours.day[mask], hours.hour[mask], 9)
        sets[name] = strategy_sets(sub, name, budget)[0]
    union = [sets["seasonal"][d] | sets["ewma"][d] for d in range(9)]
    expected = replay(hours.day_keys(), top_n=41, capacity=50, warmup_days=2, precomputed=union[2:])
    assert out["hit_rate_ours"] == pytest.approx(expected["hit_rate_ours"])
    assert out["requests"] == expected["requests"] and out["admission"] == "always"
    # Beside the serving clients' live tier: replay's ours with the same admission and the same sets.
    kwargs = {"arms": ("seasonal", "ewma"), "top_n": 41, "capacity": 50, "salt": "x", "warmup_days": 2}
    for admission in ("probation", "second_miss"):
        tier = ab_replay(trace, 9, **kwargs, admission=admission)["ab"]
        expected = replay(hours.day_keys(), top_n=41, capacity=50, warmup_days=2, precomputed=union[2:],
                          admission=admission)  # fmt: skip
        assert tier["hit_rate_ours"] == pytest.approx(expected["hit_rate_ours_admission"])
        assert tier["admission"] == admission and tier["hit_rate_ours"] != out["hit_rate_ours"]


def test_ab_replay_trains_a_learned_arm_on_all_the_traffic_as_top_ads_does(monkeypatch):
    """Under an experiment top_ads ranks by demand_model's LSTM, trained on every key, and splits afterwards: the
    replayed LSTM arm learns from the same traffic, not from its own half of the keys."""
    from precompute_assets.ml import strategies

    trained_on = []
    real = strategies.evaluate_demand

    def recording(history, hp, **kwargs):
        trained_on.append(set(history.keys.tolist()))
        return real(history, hp, **kwargs)

    monkeypatch.setattr(strategies, "evaluate_demand", recording)
    trace = weekly_trace(days=6, per_day=400, hot=30, seed=2)
    hp = DemandHyperParams(max_epochs=1, max_seconds=30, max_train_keys=500, threads=1)
    out = ab_replay(trace, 6, arms=("frequency", "lstm"), top_n=20, capacity=30, salt="s", warmup_days=3, hp=hp)
    assert trained_on and out["ab"]["top_n"] == {"frequency": 10, "lstm": 10}
    keys = np.unique(trace.keys)
    arm = dict(zip(keys.tolist(), arms_of("s", keys, ("frequency", "lstm")).tolist(), strict=True))
    for seen in trained_on:  # one model a day, on the keys of both arms
        assert {arm[key] for key in seen} == {"frequency", "lstm"}


def test_ab_replay_shares_the_step_budget_among_the_days_and_reports_the_safety_stop(monkeypatch):
    """The learned arm's days train within compare_strategies' budget of steps, shared by the days; when the seconds'
    safety stop ends a day's training instead, the notes say the arm can differ between runs."""
    from precompute_assets.ml import strategies

    budgets = []
    real = strategies.evaluate_demand

    def recording(history, hp, **kwargs):
        budgets.append((hp.max_steps, hp.max_seconds))
        return real(history, hp, **kwargs)

    monkeypatch.setattr(strategies, "evaluate_demand", recording)
    trace = weekly_trace(days=6, per_day=400, hot=30, seed=2)
    hp = DemandHyperParams(max_epochs=1000, max_seconds=30, max_train_keys=500, threads=1)
    kwargs = {"arms": ("frequency", "lstm"), "top_n": 20, "capacity": 30, "salt": "s", "warmup_days": 3, "hp": hp}
    out = ab_replay(trace, 6, **kwargs, lstm_budget_steps=9, lstm_safety_s=120.0)["ab"]
    assert budgets == [(3, 30)] * 3  # days 3..5 train: 9 steps and 120 s shared, within hp's 30 s a day
    assert not any("safety stop" in note for note in out["notes"])
    stopped = ab_replay(trace, 6, **kwargs, lstm_safety_s=1e-6)["ab"]["notes"]
    assert [note for note in stopped if "safety stop" in note] == [
        "the LSTM's safety stop (0.0 s a day) ended its training before its 2000 steps and 1000 epochs on 3 of 3 "
        "days: those models depend on how busy the cores were: lstm can differ between runs"
    ]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"arms": ("frequency_a", "frequency_a")}, "names an arm of an A/A test"),
        ({"arms": ("frequency", "oracle")}, "unknown strategy"),
        ({"top_n": 70}, "top_n <= capacity"),
        ({"top_n": "auto"}, "fixed top_n"),
        ({"salt": ""}, "salt of 1 to 256 characters, got 0"),
        ({"salt": "s" * 257}, "salt of 1 to 256 characters, got 257"),  # production's Experiment refuses it
        ({"warmup_days": 5}, "warmup_days"),
    ],
)
def test_ab_replay_rejects_bad_arguments(kwargs, message):
    arguments = {"arms": ("frequency", "ewma"), "top_n": 10, "capacity": 20, "salt": "s", **kwargs}
    with pytest.raises(ValueError, match=message):
        ab_replay(weekly_trace(days=5, per_day=100), 5, **arguments)


def test_a_split_ranking_holds_each_arms_budget_in_every_prefix():
    """The self-tuned share replays a split selection as one ranking: any first N keys are the N split_selection
    would precompute, each arm's best keys among its own (h_demand)."""
    from precompute_assets.ml.experiment import arm_budgets, arms_of, split_ranking

    keys = [f"ad{i:03d}" for i in range(200)]
    arms = ("frequency", "seasonal")
    by_name, reversed_names = keys, keys[::-1]  # the arms rank the keys in opposite orders
    merged = split_ranking([by_name, reversed_names], salt="s1", arms=arms)
    assert sorted(merged) == keys  # every key once, in its own arm's ranking
    owner = dict(zip(keys, arms_of("s1", keys, arms), strict=True))
    for n in (1, 2, 7, 50, 100):
        prefix = merged[:n]
        counts = [sum(owner[key] == arm for key in prefix) for arm in arms]
        assert counts == arm_budgets(n), n
        assert [k for k in prefix if owner[k] == "frequency"] == [k for k in by_name if owner[k] == "frequency"][
            : counts[0]
        ]
        assert [k for k in prefix if owner[k] == "seasonal"] == [k for k in reversed_names if owner[k] == "seasonal"][
            : counts[1]
        ]
    assert (
        split_ranking([[], reversed_names], salt="s1", arms=arms)[:3]
        == [k for k in reversed_names if owner[k] == "seasonal"][:3]
    )  # an arm without keys leaves its turns to the other
