"""Demand strategies replayed on a key trace: each ranks the keys of every day from the days before it only, and
"ours" is its top-N precomputed plus a read-through LRU of C-N keys, at the same capacity as ``replay``'s policies.

Strategies are the ones ``top_ads`` can use (``ml.demand``): ``frequency`` (recency-weighted daily counts over
the 7 days before the day, ``ad_demand``'s semantics), ``ewma`` (an exponentially smoothed hourly rate),
``seasonal`` (the same day a week earlier; the day before while there is none), ``lstm``, and ``auto``, what
``top_ads`` uses by default: each day the LSTM when the ``beats_baselines`` rule approved that day's model, else
the best baseline on its held-back day (frequency while no model can be trained). The baselines see the 7 days
before the day (``max(7, window_days)``), as ``strategy_demand`` reads them for ``top_ads``.

The LSTM is trained the way the ``demand_model`` asset trains it: for day d, ``evaluate_demand`` on the
``lookback_days`` days before d (the last of them, d-1, held back and scored, never trained on), warm-started
from the model of the day before when that model passed the asset's ``beats_baselines`` rule (its held-back hit
rate above the best baseline's by more than ``margin``); then ``forecast_next_day`` over the days before d ranks
day d. Its ranking is used on every day it could be trained, approved or not, so the LSTM itself is measured;
a day with fewer than 3 days before it cannot train a model and takes the frequency ranking, as ``top_ads``
falls back to frequency when there is no model (``notes`` says on how many days). Training is bounded by the
hyper-parameters' ``max_epochs`` and ``max_steps`` per day, and ``compare_strategies`` lowers ``max_steps`` so that
the days together make at most ``lstm_budget_steps`` steps: a budget of work, so a trace replays the same however
busy the cores. Their ``max_seconds`` is only a safety stop, lowered so that the days together stop within
``lstm_safety_s``; the notes say on how many days it fired.

Hours: with timestamps, each day (the same equal time spans as ``replay.split_days``) is cut into 24 equal spans;
without, each day's requests (equal counts, as ``split_days``) into 24 equal counts. The calendar features see
hour 0..23 of the day and a weekday of ``day index mod 7``: a trace's days are spans, not calendar dates.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, replace
from typing import Literal, get_args

import numpy as np
import pandas as pd

from .demand import (
    HOURS_PER_DAY,
    DemandHyperParams,
    HourlyCounts,
    approves,
    evaluate_demand,
    ewma_forecast,
    forecast_next_day,
    frequency_forecast,
    seasonal_forecast,
)
from .replay import Trace, read_through_day_hits, replay, sampled_size, shards_keep
from .selection import select_top

Strategy = Literal["frequency", "ewma", "seasonal", "lstm", "auto"]  # a Config field of this type lists them
STRATEGIES: tuple[str, ...] = get_args(Strategy)
LEARNED = ("lstm", "auto")  # ranked by the daily LSTM models (the others: baselines, ranked from counts alone)
REPLAY_STRATEGIES = (*STRATEGIES, "prefetch")  # prefetch: ours plus learned next-key prefetch (ml.next_key)
LOOKBACK_DAYS = 14  # demand_model's lookback (defs.demand.DEMAND_LOOKBACK_DAYS)
BASELINE_DAYS = 7  # what strategy_demand reads for the baselines (at least 7 days)
MARGIN = 0.005  # demand_model's default approval margin (DemandModelConfig.margin)
# Bounded training per replayed day: the asset's, with fewer steps so a whole trace replays in minutes. 1400 steps
# is what 30 s reached on a replayed day's model on 2 shared cores (2115 in 45 s, an 8-day trace of 1.2 million
# requests: its days train 240 steps, their 30 epochs); the safety stop is three times that.
REPLAY_HYPER_PARAMS = DemandHyperParams(max_steps=1400, max_seconds=90.0)
LSTM_BUDGET_STEPS = 8400  # optimizer steps of all replayed days together: what 180 s reached
LSTM_SAFETY_S = 360.0  # training seconds of all replayed days together: a safety stop only, reported when it fires


def sampled_hyper_params(rate: float, hp: DemandHyperParams = REPLAY_HYPER_PARAMS) -> DemandHyperParams:
    """``hp`` on a SHARDS sample of ``rate`` (``replay --sample``): the LSTM's approval ``top_n``, a count of keys,
    scaled as the capacity is (a fixed top-N replaces it anyway). ``max_train_keys`` stays: it bounds the keys
    trained on, and a sample of more keys than that trains the same model as the whole trace would."""
    return replace(hp, top_n=sampled_size(hp.top_n, rate))


@dataclass(frozen=True)
class TraceHours:
    """A trace's requests in time order with the day (0..n_days-1) and hour (0..23) each belongs to."""

    keys: np.ndarray
    day: np.ndarray
    hour: np.ndarray
    n_days: int
    # per hour of the days (n_days * 24, day by day): whether its logs are missing (None: none is; a trace's hours)
    missing: np.ndarray | None = None

    def sampled(self, rate: float) -> TraceHours:
        """Only the requests of the keys ``replay.sample_trace`` keeps at ``rate`` (all at 1), each on the day and
        hour it had in the whole trace: a sample's days are the whole trace's, as ``replay --sample`` counts them."""
        if rate == 1:
            return self
        keep = shards_keep(self.keys, rate)
        return TraceHours(self.keys[keep], self.day[keep], self.hour[keep], self.n_days, self.missing)

    def day_keys(self) -> list[np.ndarray]:
        """Each day's requested keys, in order (the same days as ``split_days``)."""
        bounds = np.searchsorted(self.day, np.arange(self.n_days + 1), side="left")
        return [self.keys[bounds[d] : bounds[d + 1]] for d in range(self.n_days)]

    def hourly_counts(self, first: int, last: int) -> HourlyCounts:
        """Requests per key and hour of days ``first..last`` (keys sorted; every hour present, possibly empty, or
        missing where ``missing`` says so: NaN for every key, as ``HourlyCounts`` marks a missing hour)."""
        lo, hi = np.searchsorted(self.day, [first, last + 1], side="left")
        n_days = last - first + 1
        n_hours = n_days * HOURS_PER_DAY
        keys, rows = np.unique(self.keys[lo:hi], return_inverse=True)
        column = (self.day[lo:hi] - first) * HOURS_PER_DAY + self.hour[lo:hi]
        # Each (key, hour) cell's requests counted by one sort (np.add.at adds one request at a time), then put into
        # float32 in place: no int64 matrix twice its size.
        cells, requests = np.unique(rows.ravel() * n_hours + column, return_counts=True)
        counts = np.zeros((len(keys), n_hours), dtype=np.float32)
        np.put(counts, cells, requests)
        if self.missing is None:
            missing = np.zeros(n_hours, dtype=bool)
        else:
            missing = self.missing[first * HOURS_PER_DAY : (last + 1) * HOURS_PER_DAY].copy()
            counts[:, missing] = np.nan
        return HourlyCounts(
            keys=keys,
            counts=counts,
            hour_of_day=np.tile(np.arange(HOURS_PER_DAY), n_days),
            weekday=np.repeat((first + np.arange(n_days)) % 7, HOURS_PER_DAY),
            day=np.repeat(np.arange(n_days), HOURS_PER_DAY),
            missing=missing,
        )


def trace_hours(trace: Trace, days: int) -> TraceHours:
    """Split ``trace`` into ``days`` days exactly as ``split_days`` does, and each day into 24 hours."""
    if days < 1:
        raise ValueError("days must be >= 1")
    keys = np.asarray(trace.keys)
    ts = trace.timestamps
    n = len(keys)
    if ts is None or n == 0 or ts.min() == ts.max():
        day = np.empty(n, dtype=np.int64)
        hour = np.empty(n, dtype=np.int64)
        for d, part in enumerate(np.array_split(np.arange(n), days)):
            day[part] = d
            for h, piece in enumerate(np.array_split(part, HOURS_PER_DAY)):
                hour[piece] = h
        return TraceHours(keys, day, hour, days)
    order = np.argsort(ts, kind="stable")
    ts, keys = ts[order], keys[order]
    position = (ts - ts[0]) / (ts[-1] - ts[0]) * days  # split_days' expression, so the days are the same
    day = np.minimum(position.astype(np.int64), days - 1)
    hour = np.clip(((position - day) * HOURS_PER_DAY).astype(np.int64), 0, HOURS_PER_DAY - 1)
    return TraceHours(keys, day, hour, days)


def _ranking(values: np.ndarray, keys: np.ndarray, limit: int) -> list[Hashable]:
    return select_top(pd.Series(values, index=pd.Index(keys)), limit)


def strategy_rankings(
    hours: TraceHours,
    strategy: str,
    limit: int,
    *,
    hp: DemandHyperParams = REPLAY_HYPER_PARAMS,
    lookback_days: int = LOOKBACK_DAYS,
    margin: float = MARGIN,
) -> tuple[list[list[Hashable]], dict]:
    """The ``limit`` best keys of every day (day 0: none), best first, ranked by ``strategy`` from the days
    before it only, and ``{"fallback_days", "approved_days", "trained_days", "safety_stop_days"}`` (the LSTM's, for
    ``lstm`` and ``auto``, ``safety_stop_days`` those whose training ``hp.max_seconds``' safety stop ended; zeros for
    the baselines; ``auto`` adds ``used``: the strategy it followed each day). The LSTM's
    approval rule and evaluation use ``hp.top_n``; the ranking uses ``limit``."""
    return rankings_of(hours, [strategy], limit, hp=hp, lookback_days=lookback_days, margin=margin)[strategy]


def check_strategies(strategies: Sequence[str]) -> None:
    """Raise ValueError naming the first of ``strategies`` that is not one of ``STRATEGIES``."""
    if unknown := [name for name in strategies if name not in STRATEGIES]:
        raise ValueError(f"unknown strategy {unknown[0]!r}: use one of {', '.join(STRATEGIES)} or all")


def rankings_of(
    hours: TraceHours,
    strategies: Sequence[str],
    limit: int,
    *,
    hp: DemandHyperParams = REPLAY_HYPER_PARAMS,
    lookback_days: int = LOOKBACK_DAYS,
    margin: float = MARGIN,
    approved_only: bool = False,
) -> dict[str, tuple[list[list[Hashable]], dict]]:
    """``strategy_rankings`` of several strategies at once: ``lstm`` and ``auto`` share one trained model a day.

    ``approved_only``: ``lstm`` ranks as ``top_ads`` configured with it does, by the newest approved model (the
    day's own when approved), and while none is by the day's evaluation's best baseline (frequency before any
    model was trained; ``fallback_days`` counts those days too)."""
    check_strategies(strategies)
    learned = [name for name in strategies if name in LEARNED]
    out = {
        name: ([[]], {"trained_days": 0, "approved_days": 0, "fallback_days": 0, "safety_stop_days": 0})
        for name in strategies
    }
    if "auto" in out:
        out["auto"][1]["used"] = ["frequency"]  # day 0: nothing to rank, as frequency
    state = None  # the previous day's model when it was approved: the next day warm-starts from it
    approved_model = None  # the newest approved model and its trained hyper-parameters (``approved_only``)
    for d in range(1, hours.n_days):
        recent_first = max(0, d - max(BASELINE_DAYS, hp.window_days))
        recent = hours.hourly_counts(recent_first, d - 1)  # days before d only
        if len(recent.keys) == 0 or limit == 0:
            for name in strategies:
                out[name][0].append([])
            if "auto" in out:
                out["auto"][1]["used"].append("frequency")
            continue
        baseline = _baseline_rankings(recent, hp, limit)
        for name in strategies:
            if name not in learned:
                out[name][0].append(baseline(name))
        if not learned:
            continue
        if d < 3:  # too few days to train: frequency, as top_ads falls back to it without a model
            for name in learned:
                out[name][0].append(baseline("frequency"))
                out[name][1]["fallback_days"] += 1
            if "auto" in out:
                out["auto"][1]["used"].append("frequency")
            continue
        history_first = max(0, d - lookback_days)
        # The same days as recent (a trace shorter than the lookback): the same counts, not a second matrix of them.
        history = recent if history_first == recent_first else hours.hourly_counts(history_first, d - 1)
        result = evaluate_demand(history, hp, init_state=state)
        evaluation = result.evaluation
        approved = approves(evaluation, margin)
        if approved:
            state, approved_model = result.state_dict(), (result.model, result.hyper_params)
        ranker = approved_model if approved_only else (result.model, result.hyper_params)
        lstm = None
        if ranker is not None:
            model, trained = ranker
            lstm = _ranking(forecast_next_day(model, recent, trained).to_numpy(), recent.keys, limit)
        for name in learned:
            out[name][1]["trained_days"] += 1
            out[name][1]["approved_days"] += int(approved)
            out[name][1]["safety_stop_days"] += int(evaluation.stopped_by == "seconds")
        if "lstm" in out:
            out["lstm"][0].append(baseline(evaluation.best_baseline) if lstm is None else lstm)
            out["lstm"][1]["fallback_days"] += int(lstm is None)
        if "auto" in out:
            used = "lstm" if approved else evaluation.best_baseline
            out["auto"][0].append(lstm if approved else baseline(used))
            out["auto"][1]["used"].append(used)
    return out


def _baseline_rankings(recent: HourlyCounts, hp: DemandHyperParams, limit: int) -> Callable[[str], list[Hashable]]:
    """Each baseline's ``limit`` best keys of the day after ``recent``, by name, each made at most once."""

    @functools.cache
    def ranking(name: str) -> list[Hashable]:
        return _ranking(_baseline_forecast(name, recent, hp), recent.keys, limit)

    return ranking


def _baseline_forecast(name: str, recent: HourlyCounts, hp: DemandHyperParams) -> np.ndarray:
    """Tomorrow's demand per key of ``recent``'s keys under a baseline."""
    if name == "seasonal":
        return seasonal_forecast(recent.daily(), recent.n_days, recent.logged_days())
    if name == "ewma":
        return ewma_forecast(recent, recent.n_days, hp)
    return frequency_forecast(recent.daily(), recent.keys, recent.n_days, hp)


def strategy_sets(
    hours: TraceHours,
    strategy: str,
    top_n: int,
    *,
    hp: DemandHyperParams = REPLAY_HYPER_PARAMS,
    lookback_days: int = LOOKBACK_DAYS,
    margin: float = MARGIN,
) -> tuple[list[set[Hashable]], dict]:
    """The top-N set of every day (day 0: empty) of ``strategy_rankings``; the LSTM is evaluated at ``top_n``."""
    rankings, info = strategy_rankings(
        hours, strategy, top_n, hp=replace(hp, top_n=top_n), lookback_days=lookback_days, margin=margin
    )
    return [set(ranking) for ranking in rankings], info


def day_hyper_params(hp: DemandHyperParams, days: int, budget_steps: int, safety_s: float) -> DemandHyperParams:
    """``hp`` for each day's LSTM of a ``days``-day replay: the days that train (3..days-1) share ``budget_steps``
    steps and ``safety_s`` seconds of safety stop equally, within ``hp``'s own bounds of a day."""
    trained_days = max(0, days - 3)  # days 3..D-1 have the 3 days before them that training needs
    if not trained_days:
        return hp
    steps = max(1, min(hp.max_steps, budget_steps // trained_days))
    return replace(hp, max_steps=steps, max_seconds=min(hp.max_seconds, safety_s / trained_days))


def safety_stop_days_note(info: dict, hp: DemandHyperParams, learned: Sequence[str]) -> str | None:
    """What the ``rankings_of`` ``info`` of the ``learned`` strategies says when the days' safety stop (``hp``'s
    ``max_seconds``) ended some of their training; None when it never fired."""
    if not info["safety_stop_days"]:
        return None
    others = [name for name in learned if name != "auto"]
    said = [f"{' and '.join(others)} can differ between runs"] if others else []
    if "auto" in learned:
        said.append("auto used none of them (beats_baselines approves no model the safety stop cut short)")
    return (
        f"the LSTM's safety stop ({hp.max_seconds:.1f} s a day) ended its training before its {hp.max_steps} steps "
        f"and {hp.max_epochs} epochs on {info['safety_stop_days']} of {info['trained_days']} days: those models "
        f"depend on how busy the cores were: {', and '.join(said)}"
    )


def progress_stages(strategies: Sequence[str]) -> int:
    """How many stages ``compare_strategies`` announces for ``strategies``: one ranking stage for the learned
    strategies (when asked for), and one per strategy."""
    return any(name in LEARNED for name in strategies) + len(strategies)


def compare_strategies(
    trace: Trace,
    days: int,
    strategies: Sequence[str],
    *,
    top_n: int | str,
    capacity: int,
    hp: DemandHyperParams = REPLAY_HYPER_PARAMS,
    warmup_days: int = 1,
    lstm_budget_steps: int = LSTM_BUDGET_STEPS,
    lstm_safety_s: float = LSTM_SAFETY_S,
    admission: str | None = None,
    margin: float = MARGIN,
    progress: Callable[[str], None] = lambda stage: None,
    pool: Executor | None = None,
    read_through: dict[str, list[int]] | None = None,
    sample: float = 1.0,
) -> dict:
    """``{"strategies": {name: {"hit_rate", "top_n"}}, "strategy_notes": [...]}``: the hit rate over the
    counted days of each strategy's top-N plus an LRU of ``capacity - top_n`` keys (``replay``'s ``ours`` with
    the strategy's ranking), at the same capacity and warm-up as ``replay``.

    ``top_n="auto"``: each strategy tunes its own share as ``replay`` does (each day the candidate N whose
    "top-N of this strategy + LRU of C-N" got the most hits on the counted days before it, the recent ones weighing
    more, growing a step a day at most), and ``top_n`` is
    the mean share it chose. The LSTM is evaluated for approval at ``hp.top_n`` then (at ``top_n`` otherwise);
    ``lstm`` and ``auto`` share its daily models, approved by the ``beats_baselines`` rule with ``margin``, each
    trained within ``day_hyper_params``: ``lstm_budget_steps`` steps and a safety stop of ``lstm_safety_s`` seconds,
    shared by the days.

    ``admission`` (a serving admission policy's name, as ``replay`` takes it) adds ``hit_rate_admission`` to each
    entry: the same top-N beside that policy's live tier instead of the LRU (with ``"auto"``, its own share
    tuned on that tier, ``top_n_admission``). ``progress`` hears the name of each stage as it starts
    (``progress_stages`` of them).

    Given a ``pool`` of processes, each baseline's ranking and replay and each learned strategy's replay run there
    as jobs of their own, the baselines' while the LSTM trains here. The jobs share nothing, so the results are
    those of a run without one.

    ``read_through`` (``read_through_day_hits`` of the trace's days, capacity and admission), from a caller that
    replays the policies too, is the read-through tier that ``"auto"`` needs: given, it is not replayed here.

    ``sample`` < 1 replays only the keys ``replay.sample_trace`` keeps at that rate, on the whole trace's days
    (``TraceHours.sampled``): ``capacity``, ``top_n`` and ``hp.top_n`` are then the caller's to scale, and the rates
    are the sample's, not adjusted.
    """
    auto = top_n == "auto"
    if not auto and (isinstance(top_n, str) or top_n < 0):
        raise ValueError(f"top_n must be a whole number >= 0 or 'auto', got {top_n!r}")
    check_strategies(strategies)
    hours = trace_hours(trace, days).sampled(sample)
    day_hp = day_hyper_params(hp if auto else replace(hp, top_n=top_n), days, lstm_budget_steps, lstm_safety_s)
    limit = capacity if auto else top_n
    # The read-through policies are the same for every strategy: the caller's own replay has them.
    replay_args = dict(top_n=top_n, capacity=capacity, warmup_days=warmup_days, admission=admission, baselines=False)
    if auto:  # every strategy's share candidate N = 0 is the read-through alone: replayed once, here or by the caller
        if read_through is None:
            read_through = read_through_day_hits(hours.day_keys(), capacity, admission=admission)
        replay_args["read_through"] = read_through

    def start(job: Callable, *args) -> Future | Callable[[], tuple[dict, dict]]:
        """The job running in the pool, or (without one) to be run when its result is wanted."""
        return pool.submit(job, *args) if pool is not None else functools.partial(job, *args)

    jobs = {
        name: start(_baseline_replay, hours, name, limit, day_hp, margin, replay_args)
        for name in strategies
        if name not in LEARNED
    }
    if learned := [name for name in strategies if name in LEARNED]:
        progress(f"ranking {days} days by {', '.join(learned)}")
        for name, ranked in rankings_of(hours, learned, limit, hp=day_hp, margin=margin).items():
            jobs[name] = start(_replay_ranked, hours, ranked, replay_args)
    results = {}
    for name in strategies:
        progress(f"replaying strategy {name}")
        job = jobs[name]
        results[name] = job.result() if isinstance(job, Future) else job()
    out, notes = {}, []
    for name in strategies:
        result, info = results[name]
        out[name] = {
            "hit_rate": result["hit_rate_ours"],
            "top_n": result["top_n_mean"] if auto else int(top_n),
        }
        if auto:
            out[name]["top_n_chosen"] = result["top_n_chosen"]
        if admission is not None:
            out[name]["hit_rate_admission"] = result["hit_rate_ours_admission"]
            if auto:
                out[name]["top_n_admission"] = result["top_n_mean_admission"]
        if name == "lstm":
            counted = range(warmup_days, days)
            notes.append(
                f"lstm: trained on {info['trained_days']} days (approved by the beats_baselines rule on "
                f"{info['approved_days']}; at most {day_hp.max_epochs} epochs and {day_hp.max_steps} steps a day); "
                f"{sum(d < 3 for d in counted)} counted days had fewer than 3 days before them and used the "
                "frequency ranking"
            )
        if name == "auto":
            used = Counter(info["used"][warmup_days:])
            notes.append(
                "auto: followed "
                + ", ".join(f"{strategy} on {used[strategy]}" for strategy in sorted(used))
                + " of the counted days (the lstm when its day's model was approved, else the best baseline on "
                "the held-back day)"
            )
    if learned and (note := safety_stop_days_note(results[learned[0]][1], day_hp, learned)):
        notes.append(note)
    return {"strategies": out, "strategy_notes": notes}


def _baseline_replay(
    hours: TraceHours, name: str, limit: int, hp: DemandHyperParams, margin: float, replay_args: dict
) -> tuple[dict, dict]:
    """A baseline's rankings (``rankings_of``) and ``replay`` of them, with the rankings' info: a job."""
    return _replay_ranked(hours, rankings_of(hours, [name], limit, hp=hp, margin=margin)[name], replay_args)


def _replay_ranked(
    hours: TraceHours, ranked: tuple[list[list[Hashable]], dict], replay_args: dict
) -> tuple[dict, dict]:
    """``replay`` of the days' rankings, with the rankings' info: a job."""
    rankings, info = ranked
    return replay(hours.day_keys(), ranked=rankings, **replay_args), info
