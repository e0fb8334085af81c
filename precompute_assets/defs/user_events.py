"""User events: the hourly partitions drained from the serving client's event stream, and the next-action model
trained on them (a calibrated RandomForest gated by a blocking check against two baselines)."""

import time
from typing import Any, Literal

import dagster as dg
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from ..ml import next_action
from ..serving import KeySchema
from ..serving.events import events_stream, read_event_window, unknown_action, validate_event
from ..serving.querylog import quarantine_row
from ..storage.tables import USER_EVENT_SCHEMA, QuarantinedRows
from ..workload.users import generate_user_events, make_users
from .config_checks import at_least, fraction, refuse
from .models import approved_materializations, prune_model_versions, retention_field
from .partitions import DEFAULT_PARTITIONS, Partitions
from .query_logs import (
    DRAIN_TAGS,
    QUARANTINE_CHECK_DESCRIPTION,
    ROWS_PER_CHUNK,
    build_drain_schedule,
    drained_ids,
    epoch_ms,
    loss_warning,
    lost_events,
    quarantine_check,
    stream_footprint,
    stream_loss,
    stream_lost_failure,
    stream_memory_warning,
    wait_for_hour_end,
)
from .resources import LakeResource, ModelStoreResource, RedisResource

USER_EVENTS = "user_events"
NEXT_ACTION_MODEL = "next_action_model"
NEXT_ACTION_LOOKBACK_DAYS = 14
BEATS_BASELINES = dg.AssetCheckKey(dg.AssetKey(NEXT_ACTION_MODEL), "beats_baselines")


def user_event_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Validated events (``serving.events.validate_event``) as a typed table."""
    columns = {name: [row[name] for row in rows] for name in USER_EVENT_SCHEMA.names if name != "ts"}
    columns["ts"] = columns["ts_ms"]
    return pa.table(
        {name: pa.array(columns[name], type=USER_EVENT_SCHEMA.field(name).type) for name in USER_EVENT_SCHEMA.names}
    )


def user_event_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Validated events (``serving.events.validate_event``) as a typed DataFrame."""
    return user_event_table(rows).to_pandas()


@dg.multi_asset(
    outs={
        USER_EVENTS: dg.AssetOut(
            description="Validated user events (login, dashboard_view, ...) of one hour, read from the event stream.",
            kinds={"redis", "pandas"},
        ),
        "user_event_quarantine": dg.AssetOut(
            description="Malformed or unknown-action user events of one hour, with the reason each was rejected.",
            kinds={"pandas"},
        ),
    },
    partitions_def=DEFAULT_PARTITIONS.hourly,
    check_specs=[
        dg.AssetCheckSpec(
            "quarantine_rate",
            asset=USER_EVENTS,
            description=QUARANTINE_CHECK_DESCRIPTION,
        )
    ],
    group_name="user_events",
)
def user_events(context: dg.AssetExecutionContext, redis: RedisResource, lake: LakeResource):
    """Range-read the events that arrived in this hour (idempotent: the same hour reads the same entries), validate,
    quarantine the rest with their reason; unknown actions are counted per action. A re-run that no longer finds
    every event of the materialized partition in the stream fails and keeps it."""
    window = context.partition_time_window
    chunks, rows, rejected, unknown = [], [], QuarantinedRows(ROWS_PER_CHUNK), {}
    client, schema = redis.client(), redis.schema()
    wait_for_hour_end(client, epoch_ms(window.end), context.partition_key)  # as query_logs: events may still come
    start_ms = epoch_ms(window.start)
    for page in read_event_window(client, schema, start_ms, epoch_ms(window.end)):
        for entry_id, fields in page:
            row, reason = validate_event(entry_id, fields)
            if row is not None:
                rows.append(row)
                if len(rows) == ROWS_PER_CHUNK:
                    chunks.append(user_event_table(rows))
                    rows = []
                continue
            rejected.append(quarantine_row(entry_id, fields, reason))
            if unknown_action(reason):
                name = fields.get(b"action", b"")[:64].decode("utf-8", "backslashreplace")
                unknown[name] = unknown.get(name, 0) + 1
    table = pa.concat_tables([*chunks, user_event_table(rows)])
    del chunks, rows
    quarantined = rejected.table()
    if lost := lost_events(lake, context.partition_key, drained_ids(table, quarantined), USER_EVENTS):
        raise stream_lost_failure(lost, context.partition_key)
    first_ts = pc.min(table.column("ts")).as_py()
    events, quarantine = table.to_pandas(), quarantined.to_pandas()
    del table
    read = len(events) + len(rejected)
    context.log.info(f"read {read} events ({len(rejected)} quarantined)")
    # As query_logs': entries our cleanup trimmed (below its marker) are not a loss.
    trimmed_before = int(client.get(schema.events_trimmed()) or 0)
    stream = events_stream(schema)
    if loss := stream_loss(client, stream, lake, USER_EVENTS, context.partition_key, start_ms, trimmed_before):
        context.log.warning(loss_warning(loss, len(events), first_ts))
    footprint = stream_footprint(client, stream)
    if warning := stream_memory_warning(footprint, stream):
        context.log.warning(warning)
    reasons = quarantine["reason"].str.split(":").str[0].value_counts().head(20).to_dict() if len(quarantine) else {}
    # The quarantine first, as query_logs': a materialized hour is never drained again.
    yield dg.Output(
        quarantine,
        output_name="user_event_quarantine",
        metadata={"dagster/row_count": len(quarantine), "reasons": dg.MetadataValue.json(reasons)},
    )
    yield dg.Output(
        events,
        output_name=USER_EVENTS,
        metadata={
            "dagster/row_count": len(events),
            "distinct_users": int(events["user"].nunique()),
            "events_by_action": dg.MetadataValue.json(events["action"].value_counts().to_dict()),
            "quarantined": len(quarantine),
            "unknown_actions": sum(unknown.values()),
            "unknown_action_names": dg.MetadataValue.json(dict(sorted(unknown.items())[:20])),
            **({"stream_lost": loss} if loss else {}),
            **footprint,
        },
    )
    # unknown actions are among the quarantined
    yield quarantine_check(len(quarantine), len(events) + len(quarantine), USER_EVENTS)


user_events_job = dg.define_asset_job(
    "user_events_job",
    selection=dg.AssetSelection.assets(user_events),
    description="Drain one hour of user events.",
    tags=DRAIN_TAGS,
)


# --- the next-action model --------------------------------------------------------------------------------


class NextActionModelConfig(dg.Config):
    training_days: int = Field(NEXT_ACTION_LOOKBACK_DAYS, description="Days of user events up to the partition's day.")
    valid_fraction: float = Field(0.2, description="The newest share of the events held out for validation.")
    n_estimators: int = Field(100, description="Trees of the forest.")
    max_depth: int = Field(10, description="Depth of each tree.")
    min_samples_leaf: int = Field(10, description="Events per leaf, at least.")
    calibration: Literal["isotonic", "sigmoid"] = Field(
        "isotonic", description='Probability calibration: "isotonic" or "sigmoid".'
    )
    retention_days: int = retention_field()


def read_user_events(lake, hours: list[str]) -> tuple[pd.DataFrame, int]:
    """The events of ``hours`` from the lake (one file at a time), and how many hours are missing."""
    frames, missing = [], 0
    for hour in hours:
        if lake.exists(USER_EVENTS, hour):
            frames.append(lake.read(USER_EVENTS, hour, columns=["ts_ms", "user", "action"]))
        else:
            missing += 1
    if not frames:
        return pd.DataFrame({"ts_ms": pd.Series(dtype="int64"), "user": [], "action": []}), missing
    return pd.concat(frames, ignore_index=True), missing


def baselines_check(
    metrics: dict | None, baselines: dict | None, error: str | None
) -> tuple[dg.AssetCheckResult, bool]:
    """Blocking: passes only when the model's log-loss is below the better baseline's on the same rows."""
    if error is not None:
        check = dg.AssetCheckResult(
            check_name="beats_baselines", passed=False, severity=dg.AssetCheckSeverity.ERROR, description=error
        )
        return check, False
    passed, best = next_action.beats_baselines(metrics, baselines)
    check = dg.AssetCheckResult(
        check_name="beats_baselines",
        passed=passed,
        severity=dg.AssetCheckSeverity.ERROR,
        description=f"log-loss {metrics['log_loss']:.4f} vs {best} {baselines[best]['log_loss']:.4f}",
        metadata={
            "log_loss": metrics["log_loss"],
            "best_baseline": best,
            "best_baseline_log_loss": baselines[best]["log_loss"],
            "log_loss_gain": baselines[best]["log_loss"] - metrics["log_loss"],
        },
    )
    return check, passed


@dg.asset(
    partitions_def=DEFAULT_PARTITIONS.daily,
    deps=[
        dg.AssetDep(
            USER_EVENTS, partition_mapping=dg.TimeWindowPartitionMapping(start_offset=-(NEXT_ACTION_LOOKBACK_DAYS - 1))
        )
    ],
    kinds={"sklearn"},
    group_name="models",
    description="Calibrated RandomForest of each user's next action, trained on the last training_days of user events "
    "(split by time); approved by beats_baselines only when its log-loss is below the most-frequent-action and "
    "Markov-1 baselines'.",
    check_specs=[
        dg.AssetCheckSpec(
            "beats_baselines",
            asset=NEXT_ACTION_MODEL,
            blocking=True,
            description="The calibrated forest's validation log-loss is below the better of the most-frequent-action "
            "and first-order Markov baselines on the same rows; otherwise the version is not approved.",
        )
    ],
)
def next_action_model(
    context: dg.AssetExecutionContext,
    config: NextActionModelConfig,
    lake: LakeResource,
    model_store: ModelStoreResource,
) -> dg.MaterializeResult:
    """Calibrated RandomForest of each user's next action on the last ``training_days`` of user events, split by
    time; top-1/top-3 accuracy and log-loss beside the most-frequent-action and Markov-1 baselines."""
    refuse(
        "next_action_model",
        at_least(config, 1, "training_days", "n_estimators", "max_depth", "min_samples_leaf"),
        fraction(config, "valid_fraction"),
        at_least(config, 0, "retention_days"),
    )
    partitions = Partitions.of(context)
    hours = [h for day in partitions.days_ending(context.partition_key, config.training_days)
             for h in partitions.hours_of(day)]  # fmt: skip
    events, missing = read_user_events(lake.lake(), hours)
    started = time.perf_counter()
    try:
        rows = next_action.labelled(next_action.event_features(events, partitions.timezone))
        train, valid = next_action.time_split(rows, valid_fraction=config.valid_fraction)
        model = next_action.train_next_action_model(
            train,
            timezone=partitions.timezone,
            n_estimators=config.n_estimators,
            max_depth=config.max_depth,
            min_samples_leaf=config.min_samples_leaf,
            calibration=config.calibration,
        )
        metrics, baselines = next_action.compare(model, train, valid)
    except ValueError as error:
        context.log.error(f"no model trained: {error}")
        check, _ = baselines_check(None, None, f"no model trained: {error}")
        return dg.MaterializeResult(
            metadata={"error": str(error), "events": len(events), "missing_hours": missing}, check_results=[check]
        )
    seconds = time.perf_counter() - started
    version = f"{context.partition_key}.{context.run_id[:8]}"
    check, passed = baselines_check(metrics, baselines, None)
    pruned = prune_model_versions(  # before the save, which a full model store fails
        context, model_store.store(), NEXT_ACTION_MODEL, BEATS_BASELINES, config.retention_days, version
    )
    uri = model_store.store().save(
        NEXT_ACTION_MODEL, version, model, {"metrics": metrics, "baselines": baselines}, overwrite=True
    )
    context.log.info(
        f"trained {version} on {len(train):,} rows of {len(events):,} events ({len(valid):,} held back): top-1 "
        f"{metrics['top1']:.3f}, top-3 {metrics['top3']:.3f}, {check.description}"
    )
    baseline_metadata = {f"{name}_{m}": value for name, ms in baselines.items() for m, value in ms.items()}
    return dg.MaterializeResult(
        metadata={
            "model_version": version,
            "approved": passed,
            "model_uri": uri,
            **metrics,
            **baseline_metadata,
            "training_rows": len(train),
            "validation_rows": len(valid),
            "events": len(events),
            "users": int(events["user"].nunique()),
            "missing_hours": missing,
            "train_seconds": seconds,
            "versions_pruned": pruned,
        },
        check_results=[check],
    )


def approved_next_action_version(instance: dg.DagsterInstance) -> str | None:
    """The newest day's ``next_action_model`` version whose ``beats_baselines`` passed, or None."""
    approved = [
        ((partition, storage_id), metadata["model_version"].value)
        for partition, storage_id, _, metadata in approved_materializations(instance, BEATS_BASELINES)
        if "model_version" in metadata and (metadata.get("approved") is None or metadata["approved"].value)
    ]
    return max(approved)[1] if approved else None


next_action_model_job = dg.define_asset_job(
    "next_action_model_job",
    selection=dg.AssetSelection.assets(next_action_model),
    description="Train the next-action model on the user events of the days up to one day.",
)


def build_user_event_schedules(partitions: Partitions) -> list[dg.ScheduleDefinition]:
    """The hourly drain (5 past every hour, the previous hour) and the daily next-action model (03:30, the day just
    ended), in the timezone of ``partitions``, RUNNING by default."""
    timezone = partitions.timezone
    return [
        build_drain_schedule(
            user_events_job,
            USER_EVENTS,
            partitions.hourly,
            name="user_events_hourly",
            stream=KeySchema.events,
            description=f"Drain the previous hour of user events, 5 minutes past every hour ({timezone}); after a "
            "daemon outage also every hour missed since the last one drained (up to a week).",
        ),
        dg.build_schedule_from_partitioned_job(
            next_action_model_job,
            name="next_action_model_daily",
            hour_of_day=3,
            minute_of_hour=30,
            default_status=dg.DefaultScheduleStatus.RUNNING,
            description=f"Train next_action_model on the day just ended, at 03:30 {timezone}.",
        ),
    ]


def write_user_event_lake(lake, days: list[str], *, n_users: int = 120, seed: int = 5) -> int:
    """The workload's sessions of ``days`` written straight into the hourly ``user_events`` partitions, as the
    drain would have (for benchmarks and tests that need a model's input without a stream); returns how many."""
    start = int(DEFAULT_PARTITIONS.daily.time_window_for_partition_key(days[0]).start.timestamp() * 1000)
    frame = generate_user_events(make_users(n_users, seed=seed), start_ms=start, days=len(days), seed=seed)
    hour_of = (frame["ts_ms"] - start) // 3_600_000
    for day_index, day in enumerate(days):
        for h, hour in enumerate(DEFAULT_PARTITIONS.hours_of(day)):
            part = frame[hour_of == day_index * 24 + h]
            rows = [
                {"stream_id": f"{ts}-0", "ts_ms": ts, "user": u, "action": a, "entity": e, "tenant": t}
                for ts, u, a, e, t in part[["ts_ms", "user", "action", "entity", "tenant"]].itertuples(index=False)
            ]
            lake.write("user_events", hour, user_event_frame(rows))
    return len(frame)
