"""Selection: what will be asked tomorrow. Daily assets over a week of hourly query logs."""

from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Literal

import dagster as dg
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from ..ml.demand import DemandHyperParams
from ..ml.experiment import arm_strategy, split_ranking, split_selection
from ..ml.replay import ShareChoice, shards_keep, shards_rate, tune_share
from ..ml.selection import DEMAND_WINDOW_DAYS, coverage, select_top
from ..ml.selection import ad_demand as weighted_demand
from ..ml.selection import traffic_profile as offpeak_profile
from ..ml.strategies import BASELINE_DAYS, REPLAY_HYPER_PARAMS, Strategy, TraceHours, strategy_rankings
from ..serving.admission import AdmissionName
from ..storage.lake import Lake
from .config_checks import at_least, positive, refuse
from .partitions import DEFAULT_PARTITIONS, Partitions
from .records import newest_metadata
from .resources import ExperimentResource, LakeResource, ModelStoreResource

PREDICTION_KIND = "ctr"
# A daily selection asset reads this many days of hourly logs: the day itself and the days before it. The
# declared dependency says the same, so the UI's lineage and backfills match what the asset reads.
LOOKBACK_DAYS = DEMAND_WINDOW_DAYS
LOOKBACK = dg.TimeWindowPartitionMapping(start_offset=-(LOOKBACK_DAYS - 1))
# Length of the quiet window traffic_profile learns and daily_precompute runs in.
OFFPEAK_WINDOW_HOURS = 4


class AdDemandConfig(dg.Config):
    half_life_days: float = Field(
        2.0,
        description="Recency half-life of the demand: the newest day weighs most. The frequency ranking's only "
        "setting: demand_model scores the frequency baseline with the day's ad_demand half-life.",
    )


class TopAdsConfig(dg.Config):
    """``strategy``: how tomorrow's demand is ranked: ``frequency`` (ad_demand), ``ewma``, ``seasonal``, ``lstm``
    (the approved demand_model), or ``auto`` (the best on the held-back day per demand_model's evaluation).

    ``precompute_share``: ``fixed`` precomputes ``top_n`` ads; ``auto`` chooses how many within
    ``cache_capacity`` (the keys the serving cache holds, precomputed plus read-through): the N of
    0, C/16, C/8, C/4, C/2, 3C/4 whose "top-N + read-through of C-N" got the most hits replaying the
    logged days, the recent ones weighing more, but at most one candidate above the day before's published share
    (``ml.replay.tune_share``), so where precomputing would hurt it precomputes nothing.

    ``admission``: the serving clients' admission policy (``serving.admission``: ``always``, ``second_miss``,
    ``frequency``, ``probation``), so the share is tuned on the live tier that shares the capacity with it.

    ``share_max_requests``: a longer logged history is replayed on a SHARDS sample of its keys that holds about
    this many requests (capacity scaled alike), so the tuning's time stays bounded as traffic grows."""

    top_n: int = Field(1000, description="The ads to precompute with precompute_share fixed.")
    strategy: Strategy = Field(
        "auto",
        description="frequency (ad_demand), ewma, seasonal, lstm (the approved demand_model) or auto (the best on "
        "the held-back day per demand_model's evaluation).",
    )
    precompute_share: Literal["fixed", "auto"] = Field(
        "fixed", description="fixed: precompute top_n ads; auto: choose how many within cache_capacity by replay."
    )
    cache_capacity: int = Field(
        0, description="Keys the serving cache holds (precomputed plus read-through), for precompute_share auto."
    )
    admission: AdmissionName = Field(
        "always",
        description="The serving clients' admission policy (always, second_miss, frequency, probation), for "
        "precompute_share auto.",
    )
    share_max_requests: int = Field(
        5_000_000,
        description="A logged history longer than this (rows of every kind, from the hour files' metadata) is "
        "replayed on a SHARDS sample of its keys holding about this many (capacity scaled alike), for "
        "precompute_share auto.",
    )


def hourly_logs(lake: Lake, hours: list[str], *, kind: str = PREDICTION_KIND) -> Iterator[tuple[str, pa.Table | None]]:
    """One hour of logs at a time (``ts``, ``key`` of ``kind``, as Arrow: nothing per row becomes a Python object),
    so a week never sits in memory at once; None for an hour without a file."""
    for hour in hours:
        if not lake.exists("query_logs", hour):
            yield hour, None
            continue
        table = lake.read_table("query_logs", hour, columns=["ts", "kind", "key"])
        yield hour, table.filter(pc.equal(table["kind"], kind)).select(["ts", "key"])


def key_counts(table: pa.Table) -> pd.Series:
    """Requests per key (as text) in an hour of ``hourly_logs``."""
    counts = pc.value_counts(pc.cast(table["key"], pa.string()))
    keys = counts.field("values").to_numpy(zero_copy_only=False)
    return pd.Series(counts.field("counts").to_numpy(), index=pd.Index(keys, dtype=object), dtype="int64")


def day_counts(lake: Lake, hours: list[str]) -> tuple[pd.Series, list[str]]:
    """Requests per key over ``hours`` (one day's) and the hours whose logs are missing."""
    parts, missing = [], []
    for hour, table in hourly_logs(lake, hours):
        if table is None:
            missing.append(hour)
        elif table.num_rows:
            parts.append(key_counts(table))
    counts = pd.concat(parts).groupby(level=0).sum() if parts else pd.Series(dtype="int64")
    return counts.astype("int64"), missing


@dg.asset(
    partitions_def=DEFAULT_PARTITIONS.daily,
    deps=[dg.AssetDep("query_logs", partition_mapping=LOOKBACK)],
    kinds={"pandas"},
    group_name="selection",
    description=f"Queries per local hour of day over {LOOKBACK_DAYS} days of query logs, and the quietest "
    f"{OFFPEAK_WINDOW_HOURS}-hour window (metadata offpeak_start_hour), which daily_precompute follows.",
)
def traffic_profile(context: dg.AssetExecutionContext, lake: LakeResource) -> dg.Output:
    partitions = Partitions.of(context)
    tz_hours = [0.0] * 24
    missing = 0
    for day in partitions.days_ending(context.partition_key, LOOKBACK_DAYS):
        for hour, table in hourly_logs(lake.lake(), partitions.hours_of(day)):
            if table is None:
                missing += 1
                continue
            local_hour = partitions.hourly.time_window_for_partition_key(hour).start.hour
            tz_hours[local_hour] += table.num_rows
    profile = offpeak_profile(tz_hours, window_hours=OFFPEAK_WINDOW_HOURS)
    frame = pd.DataFrame({"hour": range(24), "queries": profile["queries_per_hour"]})
    context.log.info(f"off-peak window starts at {profile['offpeak_start_hour']:02d}:00 ({missing} hours missing)")
    return dg.Output(
        frame,
        metadata={
            "offpeak_start_hour": profile["offpeak_start_hour"],
            "offpeak_hours": profile["offpeak_hours"],
            "queries": int(sum(tz_hours)),
            "missing_hours": missing,
        },
    )


@dg.asset(
    partitions_def=DEFAULT_PARTITIONS.daily,
    deps=[dg.AssetDep("query_logs", partition_mapping=LOOKBACK)],
    kinds={"pandas"},
    group_name="selection",
    check_specs=[
        dg.AssetCheckSpec(
            "has_traffic",
            asset="ad_demand",
            blocking=True,
            description="Prediction queries were logged on the day; blocks selection and publish without them.",
        )
    ],
    description=f"Recency-weighted demand per ad over {LOOKBACK_DAYS} days of hourly query logs (the newest "
    "day weighs most), read one hour file at a time.",
)
def ad_demand(context: dg.AssetExecutionContext, config: AdDemandConfig, lake: LakeResource):
    refuse("ad_demand", positive(config, "half_life_days"))
    partitions = Partitions.of(context)
    days, missing = [], []
    for day in partitions.days_ending(context.partition_key, LOOKBACK_DAYS):
        counts, missing_hours = day_counts(lake.lake(), partitions.hours_of(day))
        days.append(counts)
        missing += missing_hours
        context.log.info(f"{day}: {int(counts.sum())} requests for {len(counts)} keys")
    demand = weighted_demand(days, half_life_days=config.half_life_days)
    frame = pd.DataFrame(
        {
            "ad_id": demand.index.astype(str),
            "demand": demand.to_numpy(),
            "last_day_requests": days[-1].reindex(demand.index).fillna(0).astype("int64").to_numpy(),
        }
    )
    last_day = int(days[-1].sum())
    yield dg.Output(
        frame,
        metadata={
            "dagster/row_count": len(frame),
            "requests_last_day": last_day,
            "missing_hours": len(missing),
            "half_life_days": config.half_life_days,  # demand_model scores this frequency ranking with it
        },
    )
    yield dg.AssetCheckResult(
        check_name="has_traffic",
        passed=last_day > 0,
        severity=dg.AssetCheckSeverity.ERROR,
        description="no prediction queries were logged on this day" if last_day == 0 else f"{last_day} requests",
        metadata={"requests_last_day": last_day},
    )


def logged_rows(lake: Lake, partitions: Partitions, days: list[str]) -> int | None:
    """Rows of the ``query_logs`` hours of ``days`` (every kind's: a bound on one kind's requests), from the files'
    metadata, without reading them; None when a file does not say."""
    total = 0
    for day in days:
        for hour in partitions.hours_of(day):
            if lake.exists("query_logs", hour):
                if (rows := lake.rows("query_logs", hour)) is None:
                    return None
                total += rows
    return total


def logged_trace(
    lake: Lake, partitions: Partitions, days: list[str], *, rate: float = 1.0
) -> tuple[TraceHours, list[int]]:
    """The ``ctr`` queries logged on ``days``, in time order, with the day (0..) and hour (0..23) of each and the
    hours whose logs are missing, and each day's requests. With ``rate`` below 1 only a SHARDS sample of the keys is
    kept (``shards_keep``), hour by hour, so a long history never sits in memory whole; the day counts are still the
    whole days'."""
    keys, day_index, hour_index, whole = [], [], [], [0] * len(days)
    missing = np.zeros(len(days) * 24, dtype=bool)  # hours without logs: no hours of zero requests (seasonal skips)
    for d, day in enumerate(days):
        for h, (_, table) in enumerate(hourly_logs(lake, partitions.hours_of(day))):
            if table is None:
                missing[d * 24 + min(h, 23)] = True
                continue
            if not table.num_rows:
                continue
            in_order = table["key"].take(pc.sort_indices(table["ts"]))  # a stable sort: ties keep the logged order
            ordered = pc.cast(in_order, pa.string()).to_numpy(zero_copy_only=False)
            whole[d] += len(ordered)
            if rate < 1:
                ordered = ordered[shards_keep(ordered, rate)]
            keys.append(ordered)
            day_index.append(np.full(len(ordered), d, dtype=np.int64))
            hour_index.append(np.full(len(ordered), min(h, 23), dtype=np.int64))  # a 25-hour DST day: 24 -> 23

    def joined(parts: list[np.ndarray], dtype) -> np.ndarray:
        return np.concatenate(parts) if parts else np.empty(0, dtype=dtype)

    hours = TraceHours(
        joined(keys, object), joined(day_index, np.int64), joined(hour_index, np.int64), len(days), missing
    )
    return hours, whole


def self_tuned_share(
    lake: Lake,
    partitions: Partitions,
    day: str,
    strategy: str,
    capacity: int,
    admission: str = "always",
    max_requests: int | None = None,
    hp: DemandHyperParams = REPLAY_HYPER_PARAMS,
    previous_share: int | None = None,
    split: tuple[str, Sequence[str], Sequence[str]] | None = None,
) -> ShareChoice:
    """The precompute share for the day after ``day`` within ``capacity`` keys, from replaying the logged days
    (``LOOKBACK_DAYS`` up to ``day``, from the first with logs; that one only warms the caches) beside the live
    tier ``admission`` gives, on a sample of at most about ``max_requests`` requests (``tune_share``). Each replayed
    day is ranked by ``strategy`` (with ``hp``'s baseline parameters) from the ``BASELINE_DAYS`` before it, as
    tomorrow is ranked (so those days are read too); the LSTM, whose daily retraining a replay cannot afford here,
    is replayed with the frequency ranking. ``previous_share``: what the day before published, which the share rises
    at most one candidate above (``tune_share``). ``split``: an A/B experiment's ``(salt, arms, strategies)``, whose
    split selection (``split_selection``: each arm's own ranking on its own keys) is replayed instead of ``strategy``'s
    ranking (``split_ranking``)."""
    days = partitions.days_ending(day, LOOKBACK_DAYS + BASELINE_DAYS)
    history = max(0, len(days) - LOOKBACK_DAYS)  # read for the rankings only, never replayed
    logged = logged_rows(lake, partitions, days[history:]) if max_requests is not None else None
    rate = 1.0 if logged is None else shards_rate(logged, max_requests, capacity)
    hours, whole = logged_trace(lake, partitions, days, rate=rate)
    if split is None:
        rankings, _ = strategy_rankings(hours, share_ranking(strategy), capacity, hp=hp)
    else:
        salt, arms, strategies = split
        by_arm = [strategy_rankings(hours, share_ranking(used), capacity, hp=hp)[0] for used in strategies]
        rankings = [split_ranking(day, salt=salt, arms=arms) for day in zip(*by_arm, strict=True)]
    # Days before the first logged one would make that day count cold.
    first = next((d for d in range(history, len(days)) if whole[d]), history)
    sampled = (rate, whole[first:]) if rate < 1 else None  # else tune_share samples what it was given, if over
    return tune_share(
        hours.day_keys()[first:],
        capacity,
        ranked=rankings[first:],
        admission=admission,
        max_requests=max_requests,
        sampled=sampled,
        previous_share=previous_share,
    )


def share_ranking(strategy: str) -> str:
    """The ranking ``self_tuned_share`` replays for ``strategy``: a baseline as it is; the LSTM, whose daily retraining
    a replay cannot afford here, as frequency."""
    return strategy if strategy in ("frequency", "ewma", "seasonal") else "frequency"


def published_share(instance: dg.DagsterInstance, partitions: Partitions, day: str) -> int | None:
    """The ``top_n`` the newest ``top_ads`` of the day before ``day`` selected (None: none ran), which today's
    self-tuned share rises at most one step above (``top_ads`` takes none as 0)."""
    before = partitions.days_ending(day, 2)[0]
    if before == day:
        return None
    top_n = getattr(newest_metadata(instance, "top_ads", before).get("top_n"), "value", None)
    return int(top_n) if isinstance(top_n, int) and top_n >= 0 else None


def verdict_top_n(
    context: dg.AssetExecutionContext, strategies: Sequence[str], top_n: int, evaluation: dict | None
) -> dict:
    """``{"strategy_evaluated_top_n": M}`` when one of the ``strategies`` ranking the selection (the configured one, or
    an experiment's arms) follows demand_model's verdict of the day (``auto``, ``lstm``; its ``evaluation``) and that
    verdict compared the strategies at a top-N other than the ``top_n`` selected now, with a warning: which ranking
    wins (and the LSTM's approval) can change with N. Empty otherwise."""
    follows = any(strategy in ("auto", "lstm") for strategy in strategies)
    evaluated = evaluation.get("top_n") if evaluation is not None and follows else None
    if evaluated is None or evaluated == top_n or top_n == 0:
        return {}
    context.log.warning(
        f"demand_model compared the strategies (and approved or refused the LSTM) at top_n {evaluated}, and this "
        f"selection precomputes {top_n}: the verdict may not hold at this N (demand_model's top_n sets where it is "
        "reached; a self-tuned share moves N from day to day)"
    )
    return {"strategy_evaluated_top_n": int(evaluated)}


@dg.asset(
    partitions_def=DEFAULT_PARTITIONS.daily,
    kinds={"pandas"},
    group_name="selection",
    description="The day's ads to precompute: the top N known ads ranked by the configured strategy (auto follows "
    "demand_model's held-back verdict), N fixed or self-tuned within the cache capacity; under an A/B experiment the "
    "keys are split between its two arms (column arm). Unknown keys in the logs are counted, never scored.",
    # demand_model: strategy auto (and lstm) read its verdict on the day, so it runs first in the daily job.
    deps=["ads", "demand_model"],
    check_specs=[
        dg.AssetCheckSpec(
            "known_ads",
            asset="top_ads",
            blocking=True,
            description="Warns when ads missing from the ads table carry over 1% of the demand; blocks when nothing "
            "could be selected while the precompute share is above 0.",
        )
    ],
)
def top_ads(
    context: dg.AssetExecutionContext,
    config: TopAdsConfig,
    ad_demand: pd.DataFrame,
    lake: LakeResource,
    model_store: ModelStoreResource,
    experiment: ExperimentResource,
):
    """The N known ads to precompute, ranked by the configured strategy; unknown keys in the logs are counted,
    never scored. Under an A/B experiment (``ExperimentResource``) the keys are split between its two arms by a
    salted hash and each arm's half of N is ranked by the arm's own strategy (column ``arm``)."""
    # demand reads the hourly logs through this module
    from .demand import (
        demand_evaluation,
        evaluated_hyper_params,
        frequency_half_life,
        resolve_strategy,
        strategy_demand,
    )
    from .experiment import EXPERIMENT_COLUMN, experiment_column, experiment_metadata

    auto = config.precompute_share == "auto"
    refuse(
        "top_ads",
        "precompute_share auto needs cache_capacity: the keys the serving cache holds"
        if auto and config.cache_capacity < 1
        else None,
        at_least(config, 1, "share_max_requests"),
        None if auto else at_least(config, 0, "top_n"),
    )
    catalog = set(lake.lake().read("ads", columns=["ad_id"])["ad_id"])
    known = ad_demand[ad_demand["ad_id"].isin(catalog)]
    unknown = ad_demand[~ad_demand["ad_id"].isin(catalog)]
    frequency = known.set_index("ad_id")["demand"]
    # Read once: every use below (strategy, baselines' parameters, share replay, verdict) sees the same verdict,
    # even when demand_model materializes the day again meanwhile.
    evaluation = demand_evaluation(context.instance, context.partition_key)

    def ranked_by(name: str) -> tuple[pd.Series, str, str]:
        """Known ads' demand under strategy ``name`` (``auto`` resolved), the strategy used and why."""
        used, why = resolve_strategy(evaluation, context.partition_key, name)
        if used == "frequency":
            return frequency, used, why
        forecast, note = strategy_demand(context, used, lake.lake(), model_store, evaluation)
        if forecast is None:  # the lstm's model cannot be used: the best baseline on the held-back day instead
            used = evaluation["best_baseline"] if evaluation else "frequency"
            why = f"{why}; {note}: fell back to {used}" + (", the held-back day's best baseline" if evaluation else "")
            if used == "frequency":
                return frequency, used, why
            forecast, _ = strategy_demand(context, used, lake.lake(), model_store, evaluation)
            return forecast[forecast.index.isin(catalog)], used, why
        # the note names the model version ranked with; auto's reason names it already when it is the evaluated one
        return forecast[forecast.index.isin(catalog)], used, f"{why} ({note})" if note and note not in why else why

    running = experiment.experiment()
    demand, strategy, reason = ranked_by(config.strategy)
    arms = {arm: ranked_by(arm_strategy(arm)) for arm in running.arms} if running is not None else {}
    share_metadata: dict = {"precompute_share": config.precompute_share}
    top_n = config.top_n
    if config.precompute_share == "auto":
        # frequency replayed as it ranks here: with the half-life of the ad_demand given to this step (the day's
        # newest), not the one demand_model scored with (an ad_demand since, or ad_demand's default without one)
        half_life, _ = frequency_half_life(context.instance, context.partition_key)
        choice = self_tuned_share(
            lake.lake(),
            Partitions.of(context),
            context.partition_key,
            strategy,
            config.cache_capacity,
            config.admission,
            config.share_max_requests,
            replace(evaluated_hyper_params(evaluation), half_life_days=half_life),  # as strategy_demand ranks
            # none known (a first run, a day that failed): 0, so the share starts a step up, as after a day of none
            previous_share=published_share(context.instance, Partitions.of(context), context.partition_key) or 0,
            # an experiment's selection is its arms' split: replayed as such
            split=(running.salt, running.arms, [used for _, used, _ in arms.values()]) if running else None,
        )
        top_n = choice.share
        replayed_ranking = (
            ",".join(f"{arm}:{share_ranking(used)}" for arm, (_, used, _) in arms.items())
            if running
            else share_ranking(strategy)
        )
        share_metadata.update(
            cache_capacity=config.cache_capacity,
            # what chose it: the ranking replayed (under an experiment, each arm's), the best candidate and the share
            # before, which the share rises at most one candidate above
            share_ranking=replayed_ranking,
            share_best_candidate=choice.best,
            share_ramped_from=choice.ramped_from,
            share_admission=config.admission,
            share_hit_rate=choice.hit_rates[choice.share],
            share_tuned_hit_rate=choice.tuned_hit_rate,
            read_through_hit_rate=choice.hit_rates[0],
            share_replayed_requests=choice.requests,
            share_sample_rate=choice.sample_rate,
            share_candidates=dg.MetadataValue.json({str(n): rate for n, rate in choice.hit_rates.items()}),
        )
        # The chosen share's own rate is on the days that chose it: in-sample. The self-tuning policy replayed out
        # of sample (each day's share from the days before it) is the rate to set beside read-through.
        capped = (
            f"; the history's best, {choice.best}, is more than one step above the share before, {choice.ramped_from}"
            if choice.best > top_n
            else ""
        )
        context.log.info(
            f"self-tuned share: {top_n} of {config.cache_capacity} keys (self-tuned shares replayed day by day: hit "
            f"rate {choice.tuned_hit_rate:.4f} against read-through only {choice.hit_rates[0]:.4f}; this share on "
            f"the days that chose it {choice.hit_rates[top_n]:.4f}; {choice.requests} logged requests on the counted "
            f"days, replayed on a sample of {choice.sample_rate:.2%} of the keys, live tier: {config.admission}, "
            f"ranked by {replayed_ranking}{capped})"
        )
    # the arms rank an experiment's selection, whatever the configured strategy
    verdict_metadata = verdict_top_n(
        context, [arm_strategy(arm) for arm in running.arms] if running else (config.strategy,), top_n, evaluation
    )
    arm_metadata: dict = {}
    if running is None:
        selected = select_top(demand, top_n)
        frame = pd.DataFrame({"rank": range(1, len(selected) + 1), "ad_id": selected})
        frame[EXPERIMENT_COLUMN] = experiment_column(None)
    else:
        split = split_selection({arm: ranked[0] for arm, ranked in arms.items()}, salt=running.salt, top_n=top_n)
        selected = split["ad_id"].tolist()
        frame = pd.DataFrame({"rank": range(1, len(split) + 1), "ad_id": selected, "arm": split["arm"].tolist(),
                              EXPERIMENT_COLUMN: experiment_column(running)})  # fmt: skip
        strategy = ",".join(f"{arm}:{used}" for arm, (_, used, _) in arms.items())
        reason = "; ".join(f"arm {arm}: {why}" for arm, (_, _, why) in arms.items())
        arm_metadata = {f"{arm}_selected": int((split["arm"] == arm).sum()) for arm in running.arms}
    last_day = ad_demand.set_index("ad_id")["last_day_requests"]
    covered = coverage(selected, last_day)
    unknown_share = float(unknown["demand"].sum() / ad_demand["demand"].sum()) if len(ad_demand) else 0.0
    context.log.info(f"selected {len(selected)} ads by {strategy} ({reason}), covering {covered:.1%} of yesterday's")
    yield dg.Output(
        frame,
        metadata={
            "dagster/row_count": len(frame),
            "strategy": strategy,
            "strategy_reason": reason,
            "top_n": top_n,
            **share_metadata,
            **verdict_metadata,
            **experiment_metadata(running),
            **arm_metadata,
            "coverage_last_day": covered,
            "unknown_ads": len(unknown),
            "unknown_demand_share": unknown_share,
        },
    )
    read_through = top_n == 0  # chosen or configured: nothing to precompute is then the intended result
    yield dg.AssetCheckResult(
        check_name="known_ads",
        passed=(bool(len(selected)) or read_through) and unknown_share <= 0.01,
        severity=dg.AssetCheckSeverity.ERROR if not len(selected) and not read_through else dg.AssetCheckSeverity.WARN,
        description=(
            f"precompute share {top_n}: read-through only"
            if read_through
            else "nothing to precompute: no known ad was requested"
            if not len(selected)
            else f"{len(unknown)} unknown ads carry {unknown_share:.2%} of the demand"
        ),
        metadata={"unknown_ads": len(unknown), "unknown_demand_share": unknown_share, "selected": len(selected)},
    )
