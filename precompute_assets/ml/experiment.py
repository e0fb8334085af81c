"""A/B experiments between two selection strategies: arms by a salted hash of the key, each arm's half of the
precompute budget chosen by its own strategy, and per-arm hit rates with honest confidence intervals.

The arm of a key is ``serving.keys.arm_of`` (the serving client computes the same one when it logs a query).
Requests of one key are not independent (a key is hot or cold, precomputed or not, for a whole day), so the
intervals come from a bootstrap over keys: each key's requests and hits are resampled together. It is a Poisson
bootstrap (every key gets a Poisson(1) weight), grouped by identical (requests, hits) pairs, whose summed weights
are Poisson(multiplicity): exact, and its cost grows with the number of distinct pairs, not of keys.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import replace
from statistics import NormalDist
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..serving.keys import MAX_SALT, arm_index, arm_of
from .replay import Trace, _as_codes, _codes_of, _live_tier, _precomputed_sets
from .selection import select_top

if TYPE_CHECKING:  # ml.strategies imports torch: only the replay needs it, so it is imported there
    from .demand import DemandHyperParams

__all__ = [
    "SRM_ALPHA",
    "ab_replay",
    "arm_budgets",
    "arm_of",
    "arm_report",
    "arm_strategy",
    "arms_of",
    "parse_arms",
    "split_selection",
]

SRM_ALPHA = 0.001  # a sample-ratio mismatch is flagged below this p-value (the usual, conservative threshold)
# Below this many effective keys an arm's rate rests on a few keys, and a percentile bootstrap over keys (an arm's own
# interval; the difference's comes from re-randomization) runs narrow:
# in A/A replays (600 seeds) its 95 % interval of the difference covered 0 94.7 % of the time with ~900 effective
# keys per arm, 93.5 % with ~84 and about 90.5 % with 10-15.
FEW_EFFECTIVE_KEYS = 30
_TIE = 1e-12  # a re-randomized difference this close to the observed one is as far apart (float rounding)
_BOOT_CELLS = 4_000_000  # weights drawn at once (bootstrap draws x distinct pairs), to bound memory


AA_SUFFIXES = ("_a", "_b")  # the arm names of an A/A test of one strategy S: S_a and S_b


def parse_arms(arms: str | Sequence[str]) -> tuple[str, str]:
    """Two distinct arm names from ``"frequency,lstm"`` or a sequence; ``ValueError`` otherwise. An arm is named by its
    strategy; an A/A test (``"frequency,frequency"``, to check the experiment itself: its difference should be
    significant at ``alpha`` in about that share of tests) names its arms ``frequency_a`` and ``frequency_b``, which
    are also taken as given (``arm_strategy``)."""
    from .strategies import STRATEGIES

    names = [a.strip() for a in arms.split(",")] if isinstance(arms, str) else [str(a).strip() for a in arms]
    if len(names) != 2 or not all(names):
        raise ValueError(f"an experiment needs exactly two strategies such as 'frequency,lstm', got {arms!r}")
    unknown = [name for name in names if _strategy_of(name) is None]
    if unknown:
        raise ValueError(
            f"unknown strategy {unknown[0]!r} in experiment arms: use two of {', '.join(STRATEGIES)} (the same one "
            "twice for an A/A test)"
        )
    if names[0] == names[1] and names[0] in STRATEGIES:
        return names[0] + AA_SUFFIXES[0], names[1] + AA_SUFFIXES[1]
    suffixed = [name for name in names if name not in STRATEGIES]
    strategy = _strategy_of(names[0])
    if suffixed and names != [f"{strategy}{AA_SUFFIXES[0]}", f"{strategy}{AA_SUFFIXES[1]}"]:
        raise ValueError(
            f"{suffixed[0]!r} names an arm of an A/A test: give its two arms as S_a,S_b of one strategy S (or S,S), "
            f"got {arms!r}"
        )
    return names[0], names[1]


def _strategy_of(arm: str) -> str | None:
    from .strategies import STRATEGIES

    if arm in STRATEGIES:
        return arm
    base, suffix = arm[:-2], arm[-2:]
    return base if suffix in AA_SUFFIXES and base in STRATEGIES else None


def arm_strategy(arm: str) -> str:
    """The selection strategy of an arm that ``parse_arms`` named: ``lstm`` for ``lstm`` and for an A/A test's
    ``lstm_a`` and ``lstm_b``; ``ValueError`` for a name of no strategy."""
    strategy = _strategy_of(arm)
    if strategy is None:
        raise ValueError(f"experiment arm {arm!r} names no selection strategy")
    return strategy


def arms_of(salt: str, keys: Sequence[Hashable] | np.ndarray | pd.Index, arms: Sequence[str]) -> np.ndarray:
    """``arm_of(salt, str(key), arms)`` for every key (an object array of arm names), hashing each distinct key
    once."""
    codes, unique = pd.factorize(keys if isinstance(keys, pd.Index) else np.asarray(keys))
    table = np.array([arms[arm_index(salt, str(key), len(arms))] for key in unique] + [None], dtype=object)
    return table[codes]  # code -1 (a missing key) maps to None


def arm_budgets(top_n: int, n_arms: int = 2) -> list[int]:
    """Each arm's share of ``top_n`` precomputed keys: equal, the first arms taking the remainder."""
    if top_n < 0:
        raise ValueError(f"top_n must be >= 0, got {top_n}")
    return [top_n // n_arms + (i < top_n % n_arms) for i in range(n_arms)]


def split_ranking(rankings: Sequence[Sequence[Hashable]], *, salt: str, arms: Sequence[str]) -> list[Hashable]:
    """One ranking whose first N keys are the split ``split_selection`` precomputes for a top-N: each arm's own
    ``rankings`` (in arm order, best first) kept to the keys hashed into it, taken in turns from the first arm, so any
    prefix holds ``arm_budgets`` of each. When an arm runs out of keys the other's follow (``split_selection`` leaves
    that budget unused); the self-tuned share replays a split selection with it."""
    mine = [
        [key for key, arm in zip(ranked, arms_of(salt, list(ranked), arms), strict=True) if arm == own]
        for ranked, own in zip(rankings, arms, strict=True)
    ]
    none = object()  # an arm with no key left in its turn
    return [key for turn in itertools.zip_longest(*mine, fillvalue=none) for key in turn if key is not none]


def split_selection(rankings: Mapping[str, pd.Series], *, salt: str, top_n: int) -> pd.DataFrame:
    """The keys to precompute under an experiment: ``ad_id`` and ``arm``, arm by arm, best first.

    ``rankings`` maps each arm's strategy name (in arm order, two of them) to its demand scores per key (index:
    key; higher: more demand). Each arm takes the top of its own scores among the keys hashed into it, up to
    its budget (``arm_budgets``: half each, the first arm the extra one); a budget an arm cannot fill stays
    unused rather than going to the other arm, so neither arm is helped by the other.
    """
    arms = list(rankings)
    if len(arms) != 2 or len(set(arms)) != 2:
        raise ValueError(f"split_selection needs the rankings of exactly two arms, got {arms!r}")
    parts = []
    for arm, budget in zip(arms, arm_budgets(top_n), strict=True):
        scores = rankings[arm]
        mine = scores[arms_of(salt, scores.index, arms) == arm] if len(scores) else scores
        chosen = select_top(mine, budget)
        parts.append(pd.DataFrame({"ad_id": pd.Series(chosen, dtype=object), "arm": arm}))
    return pd.concat(parts, ignore_index=True)


def _chi2_sf_1dof(x: float) -> float:
    """P(X > x) for a chi-square variable with one degree of freedom (= scipy.stats.chi2.sf(x, 1))."""
    return math.erfc(math.sqrt(max(x, 0.0) / 2))


def _draw_sums(
    requests: np.ndarray, hits: np.ndarray, n_draws: int, draw: Callable[[np.ndarray, tuple[int, int]], np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Per draw, the requests and the hits of the keys weighted by ``draw(multiplicity, shape)``. Keys of equal counts
    are alike, so each distinct (requests, hits) pair is drawn once, its weight standing for all its keys (a Poisson
    or a binomial of their number); ``_BOOT_CELLS`` weights at a time."""
    pairs, multiplicity = np.unique(np.stack([requests, hits], axis=1), axis=0, return_counts=True)
    n, h = pairs[:, 0].astype(float), pairs[:, 1].astype(float)
    sum_n, sum_h = np.empty(n_draws), np.empty(n_draws)
    step = max(1, _BOOT_CELLS // len(pairs))
    for lo in range(0, n_draws, step):
        weights = draw(multiplicity, (min(step, n_draws - lo), len(pairs))).astype(float)
        sum_n[lo : lo + len(weights)], sum_h[lo : lo + len(weights)] = weights @ n, weights @ h
    return sum_n, sum_h


def _boot_rates(requests: np.ndarray, hits: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``n_boot`` bootstrap hit rates over keys, from per-key request and hit counts (NaN: a draw without
    requests)."""
    total, hit = _draw_sums(requests, hits, n_boot, lambda m, shape: rng.poisson(m, size=shape))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, hit / total, np.nan)


def _rerandomized(requests: np.ndarray, hits: np.ndarray, n_draws: int, rng: np.random.Generator) -> np.ndarray:
    """``n_draws`` differences of the hit rates (second minus first) of random even splits of the keys, each key's
    ``requests`` and ``hits`` (pooled over the arms) going to one side, as the salted hash splits them: how far apart
    two arms of one strategy fall (NaN: a split with an empty side)."""
    n2, h2 = _draw_sums(requests, hits, n_draws, lambda m, shape: rng.binomial(m, 0.5, size=shape))
    n1, h1 = float(requests.sum()) - n2, float(hits.sum()) - h2
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n1 > 0) & (n2 > 0), h2 / n2 - h1 / n1, np.nan)


def _interval(draws: np.ndarray, alpha: float) -> list[float | None]:
    finite = draws[np.isfinite(draws)]
    if not len(finite):
        return [None, None]
    low, high = np.quantile(finite, [alpha / 2, 1 - alpha / 2])
    return [float(low), float(high)]


def arm_report(
    frame: pd.DataFrame, *, arms: Sequence[str], n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> dict:
    """Per-arm hit rates with bootstrap-over-keys intervals, the difference (second arm minus first) and a
    sample-ratio-mismatch check, from per-request rows ``key``, ``hit`` (bool), ``arm``.

    Returns ``{"arms", "rows", "per_arm": {arm: {"requests", "keys", "hits", "hit_rate", "ci", "naive_ci"}},
    "difference": {"value", "ci", "excludes_zero", "p_value"}, "srm": {"keys", "chi2", "p_value", "mismatch"},
    "alpha", "n_boot", "notes"}``. An arm's ``ci`` is the ``1 - alpha`` percentile interval of the bootstrap over
    keys; ``naive_ci`` the per-request (Wald) binomial interval, shown to make the effect of repeated keys visible.
    The difference's interval is its value plus or minus the ``1 - alpha`` quantile of ``|difference|`` over
    ``n_boot`` re-randomizations (the keys split anew at random, as the hash splits them), and ``p_value`` the
    share of them at least as far apart: exact when the arms do not differ, however few keys carry the traffic (a
    bootstrap's interval of the difference ran narrow there: with Zipf-like traffic and ~270 effective keys per
    arm an A/A test's 95 % interval excluded 0 7 % of the time, and with one key per arm it had zero width). SRM is a
    chi-square test (1 dof) of the distinct keys per arm against the equal split the hash promises, flagged
    below ``SRM_ALPHA``. An arm of fewer than ``FEW_EFFECTIVE_KEYS`` effective keys gets a note: its own interval
    runs narrow. Undefined values are None, never NaN: an arm without requests has hit rate and
    intervals None (and so has the difference), no keys at all gives an SRM p-value of None; ``notes`` says why.
    Rows of other arms are ignored and counted in ``notes``.
    """
    arms = list(arms)
    if len(arms) != 2 or len(set(arms)) != 2:
        raise ValueError(f"arm_report compares exactly two distinct arms, got {arms!r}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    missing = {"key", "hit", "arm"} - set(frame.columns)
    if missing:
        raise ValueError(f"arm_report needs columns key, hit and arm; missing {sorted(missing)}")
    notes: list[str] = []
    inside = frame["arm"].isin(arms)
    if (~inside).any():
        notes.append(f"{int((~inside).sum())} rows of other arms (or none) ignored")
    rows = frame.loc[inside, ["key", "hit", "arm"]]
    rng = np.random.default_rng(seed)
    z = NormalDist().inv_cdf(1 - alpha / 2)
    per_arm: dict[str, dict] = {}
    draws: dict[str, np.ndarray | None] = {}
    for arm in arms:
        mine = rows[rows["arm"] == arm]
        per_key = mine.groupby("key", sort=False)["hit"].agg(["size", "sum"])
        requests, hits = int(per_key["size"].sum()), int(per_key["sum"].sum())
        if requests == 0:
            notes.append(f"arm {arm} has no requests: its hit rate and interval are undefined (None)")
            per_arm[arm] = {"requests": 0, "keys": 0, "hits": 0, "hit_rate": None, "ci": [None, None],
                            "naive_ci": [None, None]}  # fmt: skip
            draws[arm] = None
            continue
        rate = hits / requests
        sizes = per_key["size"].to_numpy(np.float64)
        effective = requests**2 / float((sizes**2).sum())  # Kish: the keys of equal traffic that vary as much
        if effective < FEW_EFFECTIVE_KEYS:
            notes.append(
                f"arm {arm}'s hit rate rests on {effective:.1f} effective keys (requests² / Σ requests per key²), "
                f"fewer than {FEW_EFFECTIVE_KEYS}: its own interval runs narrow (in A/A replays with 10-15 effective "
                "keys a 95 % interval covered about 90 %; the difference's, from re-randomization, does not)"
            )
        draws[arm] = _boot_rates(per_key["size"].to_numpy(np.int64), per_key["sum"].to_numpy(np.int64), n_boot, rng)
        half = z * math.sqrt(rate * (1 - rate) / requests)
        per_arm[arm] = {
            "requests": requests,
            "keys": len(per_key),
            "hits": hits,
            "hit_rate": rate,
            "ci": _interval(draws[arm], alpha),
            "naive_ci": [max(0.0, rate - half), min(1.0, rate + half)],
        }
    first, second = arms
    difference: dict = {"value": None, "ci": [None, None], "excludes_zero": None, "p_value": None}
    if draws[first] is not None and draws[second] is not None:
        value = per_arm[second]["hit_rate"] - per_arm[first]["hit_rate"]
        pooled = rows.groupby("key", sort=False)["hit"].agg(["size", "sum"])
        null = _rerandomized(pooled["size"].to_numpy(np.int64), pooled["sum"].to_numpy(np.int64), n_boot, rng)
        spread = np.abs(null[np.isfinite(null)])
        difference["value"] = value
        if len(spread):
            difference["p_value"] = float((1 + (spread >= abs(value) - _TIE).sum()) / (1 + len(spread)))
            difference["excludes_zero"] = bool(difference["p_value"] <= alpha)  # the test, exact at any n_boot
            # The j-th largest distance: beyond it exactly when p_value <= alpha, so the interval and the verdict agree
            j = math.floor(alpha * (1 + len(spread)) + 1e-9)
            if j < 1:
                notes.append(
                    f"{len(spread)} re-randomizations cannot show a difference at alpha {alpha:g}: the smallest "
                    f"p-value they give is 1/{1 + len(spread)}, so excludes_zero is false and the interval None "
                    f"whatever the arms did (use n_boot of at least {math.ceil(1 / alpha - 1 - 1e-9)})"
                )
            else:
                half = float(np.sort(spread)[::-1][j - 1]) + _TIE  # a tie counts in p_value: it is inside
                # a difference of two rates lies in [-1, 1]: few keys spread the null wider (a wall of them is no test)
                difference["ci"] = [max(-1.0, value - half), min(1.0, value + half)]
    keys = {arm: per_arm[arm]["keys"] for arm in arms}
    total = sum(keys.values())
    srm: dict = {"keys": keys, "chi2": None, "p_value": None, "mismatch": False}
    if total == 0:
        notes.append("no keys in either arm: the sample-ratio check is undefined (p_value None)")
    else:
        chi2 = (keys[first] - keys[second]) ** 2 / total  # sum of (observed - total/2)^2 / (total/2)
        p_value = _chi2_sf_1dof(chi2)
        srm.update(chi2=float(chi2), p_value=p_value, mismatch=p_value < SRM_ALPHA)
        if srm["mismatch"]:
            notes.append(
                f"sample-ratio mismatch: {keys[first]} vs {keys[second]} keys (p={p_value:.2g}): arms are not "
                "comparable (a logging gap, a changed salt, or traffic that depends on the arm)"
            )
    return {
        "arms": arms,
        "rows": len(rows),
        "per_arm": per_arm,
        "difference": {"of": f"{second} - {first}", **difference},
        "srm": srm,
        "alpha": alpha,
        "n_boot": n_boot,
        "notes": notes,
    }


def ab_replay(
    trace: Trace,
    days: int,
    *,
    arms: Sequence[str],
    top_n: int,
    capacity: int,
    salt: str,
    warmup_days: int = 1,
    hp: DemandHyperParams | None = None,
    lstm_budget_steps: int | None = None,
    lstm_safety_s: float | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    admission: str | None = None,
    margin: float | None = None,
    sample: float = 1.0,
) -> dict:
    """The A/B experiment replayed on a trace: ``{"ab": {...}}`` to merge into ``precompute replay``'s JSON.

    The trace is cut into ``days`` days as ``compare_strategies`` cuts it. Each day, each arm's strategy ranks
    every key from the days before only, as ``top_ads`` ranks them under an experiment (``rankings_of`` on all the
    requests: a learned strategy's model is trained on all the traffic, as ``demand_model``'s is, approved at
    ``top_n``, and ranks only once approved, as the newest approved version does in ``top_ads``), and the arm
    precomputes its budget (``arm_budgets(top_n)``) of the keys hashed into it, best first
    (``split_selection``'s rule); the union is precomputed, beside one read-through LRU of
    ``capacity - top_n`` keys that both arms share: ``replay``'s "ours" with these ``precomputed=`` sets (its
    warm-up days keep replay's own selection). Every counted request's outcome then goes to ``arm_report``.
    ``admission`` (a serving admission policy's name) replaces that LRU by the policy's live tier, as ``replay``
    models it (``hit_rate_ours_admission``).

    The shared LRU couples the arms a little: an arm whose precomputed keys answer more of its traffic leaves
    more LRU room to the other arm, which narrows the measured difference rather than inflating it. ``hp``,
    ``lstm_budget_steps`` and ``lstm_safety_s`` default to ``compare_strategies``'s, and bound the training of the
    days as there (``day_hyper_params``).

    ``sample`` < 1 replays only the keys ``replay.sample_trace`` keeps at that rate, on the whole trace's days, as
    ``compare_strategies`` does (``capacity``, ``top_n`` and ``hp.top_n`` scaled by the caller). The arms' hash
    (SHA-256 of ``salt:key``) and the sample's (pandas' unsalted ``hash_array`` of the key) are unrelated, so
    the sampled keys split between the arms as evenly as all the keys do.
    """
    from .strategies import (
        LEARNED,
        LSTM_BUDGET_STEPS,
        LSTM_SAFETY_S,
        MARGIN,
        REPLAY_HYPER_PARAMS,
        day_hyper_params,
        rankings_of,
        safety_stop_days_note,
        trace_hours,
    )

    hp = REPLAY_HYPER_PARAMS if hp is None else hp
    lstm_budget_steps = LSTM_BUDGET_STEPS if lstm_budget_steps is None else lstm_budget_steps
    lstm_safety_s = LSTM_SAFETY_S if lstm_safety_s is None else lstm_safety_s
    names = parse_arms(arms)
    if isinstance(top_n, str | bool) or top_n < 0:
        raise ValueError(f"an A/B replay needs a fixed top_n >= 0, got {top_n!r}")
    if capacity < 1 or top_n > capacity:
        raise ValueError(f"need capacity >= 1 and top_n <= capacity, got top_n={top_n}, capacity={capacity}")
    if not salt or len(salt) > MAX_SALT:  # the salts production's Experiment takes: a replay's can be served
        raise ValueError(f"an A/B replay needs a salt of 1 to {MAX_SALT} characters, got {len(salt)}")
    hours = trace_hours(trace, days).sampled(sample)
    day_keys = hours.day_keys()
    if not 1 <= warmup_days <= max(1, days - 1):
        raise ValueError(f"warmup_days must be at least 1 and less than the {days} days, got {warmup_days}")
    key_codes, unique = pd.factorize(hours.keys)
    unique_arm = arms_of(salt, unique, names)
    key_arm = unique_arm[key_codes]
    budgets = dict(zip(names, arm_budgets(top_n), strict=True))
    day_hp = day_hyper_params(replace(hp, top_n=top_n), days, lstm_budget_steps, lstm_safety_s)
    # Every key's history ranks, as in top_ads: a learned strategy trained on one arm's keys alone would see half
    # the traffic its production model learns from (the baselines rank each key by its own counts either way).
    arm_of_key = dict(zip(unique.tolist(), unique_arm.tolist(), strict=True))
    strategies = {name: arm_strategy(name) for name in names}  # an A/A test's arms rank by one strategy
    ranked = rankings_of(hours, list(dict.fromkeys(strategies.values())), len(unique), hp=day_hp,
                         margin=MARGIN if margin is None else margin, approved_only=True)  # fmt: skip
    arm_sets, infos = {}, {}
    for name in names:
        rankings, infos[name] = ranked[strategies[name]]
        arm_sets[name] = [
            set(itertools.islice((key for key in ranking if arm_of_key[key] == name), budgets[name]))
            for ranking in rankings
        ]
    union = [arm_sets[names[0]][d] | arm_sets[names[1]][d] for d in range(days)]

    codes, index = _as_codes(day_keys)
    chosen = _precomputed_sets(codes[:warmup_days], top_n=top_n, half_life_days=2.0)
    chosen += [_codes_of(given, index) for given in union[warmup_days:]]
    outcomes: list[str] = []
    live = _live_tier(admission or "always", None, capacity)(index)
    live(codes, capacity - top_n, precomputed=chosen, outcomes=outcomes)
    start = sum(len(day) for day in day_keys[:warmup_days])
    hit = np.asarray(outcomes[start:]) == "hit"
    frame = pd.DataFrame({"key": hours.keys[start:], "hit": hit, "arm": key_arm[start:]})
    report = arm_report(frame, arms=names, n_boot=n_boot, seed=seed, alpha=alpha)
    notes = report.pop("notes")
    lstm_arms = [name for name in names if strategies[name] == "lstm"]  # both in an A/A test: one model
    if lstm_arms:
        info = infos[lstm_arms[0]]
        notes.append(
            f"{' and '.join(lstm_arms)} arm{'s' if len(lstm_arms) > 1 else ''}: trained on {info['trained_days']} "
            f"days (approved on {info['approved_days']}); {info['fallback_days']} days without an approved model (too"
            " few days to train, or none approved yet) ranked as top_ads does then: by frequency before day 3, else by"
            " the day's best baseline on its held-back day"
        )
    learned = [name for name in names if strategies[name] in LEARNED]
    if learned and (
        note := safety_stop_days_note(infos[learned[0]], day_hp, list(dict.fromkeys(strategies[n] for n in learned)))
    ):
        notes.append(note)
    return {
        "ab": {
            "salt": salt,
            **report,
            "top_n": {name: int(budgets[name]) for name in names},
            "capacity": int(capacity),
            "requests": int(len(frame)),
            "hit_rate_ours": float(hit.mean()) if len(hit) else 0.0,
            "warmup_days": int(warmup_days),
            "days": int(days),
            "admission": admission or "always",
            "notes": notes,
        }
    }
