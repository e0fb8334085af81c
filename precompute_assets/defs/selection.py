"""Selection: what will be asked tomorrow. Daily assets over a week of hourly query logs."""

from collections.abc import Iterator

import dagster as dg
import pandas as pd

from ..ml.selection import ad_demand as weighted_demand
from ..ml.selection import coverage, select_top
from ..ml.selection import traffic_profile as offpeak_profile
from ..storage.lake import Lake
from .partitions import DEFAULT_PARTITIONS, Partitions
from .resources import LakeResource, ModelStoreResource

PREDICTION_KIND = "ctr"
# A daily selection asset reads this many days of hourly logs: the day itself and the days before it. The
# declared dependency says the same, so the UI's lineage and backfills match what the asset reads.
LOOKBACK_DAYS = 7
LOOKBACK = dg.TimeWindowPartitionMapping(start_offset=-(LOOKBACK_DAYS - 1))
# Length of the quiet window traffic_profile learns and daily_precompute runs in.
OFFPEAK_WINDOW_HOURS = 4


class SelectionConfig(dg.Config):
    half_life_days: float = 2.0
    top_n: int = 1000


class TopAdsConfig(SelectionConfig):
    """``strategy``: how tomorrow's demand is ranked: ``frequency`` (ad_demand), ``ewma``, ``seasonal``, ``lstm``
    (the approved demand_model), or ``auto`` (the best on the held-back day per demand_model's evaluation)."""

    strategy: str = "frequency"


def hourly_logs(
    lake: Lake, hours: list[str], *, kind: str = PREDICTION_KIND
) -> Iterator[tuple[str, pd.DataFrame | None]]:
    """One hour of logs at a time (``ts``, ``key`` of ``kind``), so a week never sits in memory at once."""
    for hour in hours:
        if not lake.exists("query_logs", hour):
            yield hour, None
            continue
        frame = lake.read("query_logs", hour, columns=["ts", "kind", "key"])
        yield hour, frame[frame["kind"] == kind]


def day_counts(lake: Lake, hours: list[str]) -> tuple[pd.Series, list[str]]:
    """Requests per key over ``hours`` (one day's) and the hours whose logs are missing."""
    parts, missing = [], []
    for hour, frame in hourly_logs(lake, hours):
        if frame is None:
            missing.append(hour)
        elif len(frame):
            parts.append(frame["key"].value_counts())
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
        for hour, frame in hourly_logs(lake.lake(), partitions.hours_of(day)):
            if frame is None:
                missing += 1
                continue
            local_hour = partitions.hourly.time_window_for_partition_key(hour).start.hour
            tz_hours[local_hour] += len(frame)
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
    check_specs=[dg.AssetCheckSpec("has_traffic", asset="ad_demand", blocking=True)],
    description=f"Recency-weighted demand per ad over {LOOKBACK_DAYS} days of hourly query logs (the newest "
    "day weighs most), read one hour file at a time.",
)
def ad_demand(context: dg.AssetExecutionContext, config: SelectionConfig, lake: LakeResource):
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
        },
    )
    yield dg.AssetCheckResult(
        check_name="has_traffic",
        passed=last_day > 0,
        severity=dg.AssetCheckSeverity.ERROR,
        description="no prediction queries were logged on this day" if last_day == 0 else f"{last_day} requests",
        metadata={"requests_last_day": last_day},
    )


@dg.asset(
    partitions_def=DEFAULT_PARTITIONS.daily,
    kinds={"pandas"},
    group_name="selection",
    deps=["ads"],
    check_specs=[dg.AssetCheckSpec("known_ads", asset="top_ads", blocking=True)],
)
def top_ads(
    context: dg.AssetExecutionContext,
    config: TopAdsConfig,
    ad_demand: pd.DataFrame,
    lake: LakeResource,
    model_store: ModelStoreResource,
):
    """The N known ads to precompute, ranked by the configured strategy; unknown keys in the logs are counted,
    never scored."""
    from .demand import resolve_strategy, strategy_demand  # demand reads the hourly logs through this module

    catalog = set(lake.lake().read("ads", columns=["ad_id"])["ad_id"])
    known = ad_demand[ad_demand["ad_id"].isin(catalog)]
    unknown = ad_demand[~ad_demand["ad_id"].isin(catalog)]
    demand = known.set_index("ad_id")["demand"]
    strategy, reason = resolve_strategy(context.instance, context.partition_key, config.strategy)
    if strategy != "frequency":
        forecast, note = strategy_demand(context, strategy, lake.lake(), model_store)
        if forecast is None:
            strategy, reason = "frequency", f"{reason}; {note}: fell back to frequency"
        else:
            demand = forecast[forecast.index.isin(catalog)]
            reason = f"{reason} ({note})" if note else reason
    selected = select_top(demand, config.top_n)
    last_day = ad_demand.set_index("ad_id")["last_day_requests"]
    covered = coverage(selected, last_day)
    frame = pd.DataFrame({"rank": range(1, len(selected) + 1), "ad_id": selected})
    unknown_share = float(unknown["demand"].sum() / ad_demand["demand"].sum()) if len(ad_demand) else 0.0
    context.log.info(f"selected {len(selected)} ads by {strategy} ({reason}), covering {covered:.1%} of yesterday's")
    yield dg.Output(
        frame,
        metadata={
            "dagster/row_count": len(frame),
            "strategy": strategy,
            "strategy_reason": reason,
            "coverage_last_day": covered,
            "unknown_ads": len(unknown),
            "unknown_demand_share": unknown_share,
        },
    )
    yield dg.AssetCheckResult(
        check_name="known_ads",
        passed=bool(len(selected)) and unknown_share <= 0.01,
        severity=dg.AssetCheckSeverity.ERROR if not len(selected) else dg.AssetCheckSeverity.WARN,
        description=(
            "nothing to precompute: no known ad was requested"
            if not len(selected)
            else f"{len(unknown)} unknown ads carry {unknown_share:.2%} of the demand"
        ),
        metadata={"unknown_ads": len(unknown), "unknown_demand_share": unknown_share, "selected": len(selected)},
    )
