"""Query logs: the hourly partitions drained from the serving client's Redis Stream, and their cleanup."""

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

import dagster as dg
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import redis.exceptions as redis_errors
from pydantic import Field

from ..serving.acl import acl_hint
from ..serving.keys import KeySchema
from ..serving.querylog import (
    expand_entries,
    quarantine_row,
    queries_of,
    read_stream_window,
    stream_ms,
    trim_stream_before,
    validate_entry,
)
from ..storage.lake import LakeReadError, partitions_before
from ..storage.query_log_import import IMPORTED, is_imported
from ..storage.tables import QUERY_LOG_DRAIN, QuarantinedRows, query_log_table
from .campaigns import purge_campaign_ads
from .embeddings import expire_document_quarantine
from .freshness import QUERY_LOGS_FRESHNESS
from .partitions import DEFAULT_PARTITIONS
from .resources import DeploymentResource, LakeResource, RedisResource
from .retention import retention_start
from .runs import ACTIVE_RUN_STATUSES, PARTITION_TAG, RANGE_END_TAG, RANGE_START_TAG

if TYPE_CHECKING:  # what define_asset_job returns (not exported by dagster)
    from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition

# The two outputs of each stream drain: its events and their quarantine.
QUARANTINE_OF = {"query_logs": "query_log_quarantine", "user_events": "user_event_quarantine"}
# Record a trim boundary, never moving it back, also when Redis is at maxmemory (allow-oom): the trim after it is what
# frees memory there (the streams have no TTL, nothing evicts them), so a full server must not stop its own cleanup.
RECORD_BOUNDARY = """#!lua flags=allow-oom
if tonumber(ARGV[1]) > tonumber(redis.call('GET', KEYS[1]) or '0') then
    redis.call('SET', KEYS[1], ARGV[1])
end
return 1
"""
HOUR_END_WAIT_S = 60.0  # a drain waits at most this long for Redis's clock to reach the end of its hour
# A drain turns its rows into columns this many at a time: a row as a dict costs about 600 bytes, as columns about
# 50, and an hour of a busy service holds millions of queries.
ROWS_PER_CHUNK = 50_000
# The drain logs its progress once per this many events read, not per page: pages of 1,000 stream entries (64,000
# queries) made a busy hour's run write a log line, a row of Dagster's event log, every few hundred milliseconds.
PROGRESS_EVENTS = 1_000_000
QUARANTINE_WARN_RATE = 0.001
QUARANTINE_FAIL_RATE = 0.05
QUARANTINE_CHECK_DESCRIPTION = (
    f"Share of the hour's events quarantined: warns above {QUARANTINE_WARN_RATE:.1%}, fails above "
    f"{QUARANTINE_FAIL_RATE:.0%}; never blocks."
)


def epoch_ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def wait_for_hour_end(client, end_ms: int, hour: str, *, max_wait_s: float = HOUR_END_WAIT_S) -> None:
    """Return once Redis's clock, which stamps the stream's IDs, has reached ``end_ms``: until then queries may still
    arrive in ``hour`` after its partition was read, and be in no partition. Waits at most ``max_wait_s``; a Redis
    clock further behind (than the clock of Dagster's host, which offered the partition) is a ``dg.Failure``."""
    deadline = time.monotonic() + max_wait_s
    while True:
        try:
            seconds, micros = client.time()
        except redis_errors.NoPermissionError as error:  # a publisher user of an older `precompute redis acl --apply`
            raise dg.Failure(description=f"{hour} not read: {error}; {acl_hint(error)}", allow_retries=False) from None
        left_ms = end_ms - (int(seconds) * 1000 + int(micros) // 1000)
        if left_ms <= 0:
            return
        if time.monotonic() + left_ms / 1000 > deadline:
            raise dg.Failure(
                description=f"partition {hour} is not over on Redis's clock ({left_ms / 1000:.1f} s to go): queries "
                "may still arrive in it after it is read, so it is not read yet. Redis's clock is behind the clock of "
                "Dagster's host; run it again once the hour is over for Redis"
            )
        time.sleep(left_ms / 1000)


def quarantine_check(quarantined: int, total: int, asset_key: str = "query_logs") -> dg.AssetCheckResult:
    """``quarantine_rate`` of ``asset_key``: passes up to 0.1% quarantined, warns up to 5%, errors above."""
    rate = quarantined / total if total else 0.0
    return dg.AssetCheckResult(
        check_name="quarantine_rate",
        asset_key=asset_key,
        passed=rate <= QUARANTINE_WARN_RATE,
        severity=dg.AssetCheckSeverity.ERROR if rate > QUARANTINE_FAIL_RATE else dg.AssetCheckSeverity.WARN,
        metadata={"quarantine_rate": rate, "quarantined": quarantined, "events": total},
        description=f"{quarantined} of {total} events quarantined ({rate:.3%})",
    )


@dg.multi_asset(
    outs={
        "query_logs": dg.AssetOut(
            description="Validated prediction-query events of one hour, read from the query-log stream.",
            kinds={"redis", "pandas"},
            freshness_policy=QUERY_LOGS_FRESHNESS,
        ),
        "query_log_quarantine": dg.AssetOut(
            description="Malformed query-log events of one hour, with the reason each was rejected.",
            kinds={"pandas"},
        ),
    },
    partitions_def=DEFAULT_PARTITIONS.hourly,
    check_specs=[
        dg.AssetCheckSpec(
            "quarantine_rate",
            asset="query_logs",
            description=QUARANTINE_CHECK_DESCRIPTION,
        )
    ],
    group_name="query_logs",
)
def query_logs(context: dg.AssetExecutionContext, redis: RedisResource, lake: LakeResource):
    """Range-read the stream entries that arrived in this hour (idempotent), validate, quarantine the rest."""
    window = context.partition_time_window
    client = redis.client()
    wait_for_hour_end(client, epoch_ms(window.end), context.partition_key)
    trimmed_before = int(client.get(redis.schema().query_log_trimmed()) or 0)
    start_ms = epoch_ms(window.start)
    trimmed = start_ms < trimmed_before
    if trimmed and lake.lake().exists("query_logs", context.partition_key):
        raise dg.Failure(
            description=f"the stream was trimmed past {context.partition_key}: re-reading it would replace the "
            "materialized partition with a partial one, so the existing partition is kept"
        )
    if trimmed:
        context.log.warning("the stream was trimmed inside this hour: materializing what is left")
    chunks, rows, rejected, read, report_at = [], [], QuarantinedRows(ROWS_PER_CHUNK), 0, PROGRESS_EVENTS
    lost_queries = 0  # queries the rejected rows stand for (a batch entry rejected whole: all of its queries)
    for page in read_stream_window(client, redis.schema(), start_ms, epoch_ms(window.end)):
        for entry_id, fields in expand_entries(page):
            read += 1
            row, reason = validate_entry(entry_id, fields)
            if row is None:
                rejected.append(quarantine_row(entry_id, fields, reason))
                lost_queries += queries_of(fields)
                continue
            rows.append(row)
            if len(rows) == ROWS_PER_CHUNK:
                chunks.append(query_log_table(rows, QUERY_LOG_DRAIN))
                rows = []
        if read >= report_at:
            context.log.info(f"read {read} events ({len(rejected)} quarantined) so far")
            report_at = read + PROGRESS_EVENTS
    context.log.info(f"read {read} events ({len(rejected)} quarantined)")
    table = pa.concat_tables([*chunks, query_log_table(rows, QUERY_LOG_DRAIN)])
    del chunks, rows
    quarantined = rejected.table()
    if lost := lost_events(lake, context.partition_key, drained_ids(table, quarantined), "query_logs"):
        raise stream_lost_failure(lost, context.partition_key)
    first_ts = pc.min(table.column("ts")).as_py()
    logs, quarantine = table.to_pandas(), quarantined.to_pandas()
    del table
    # Nothing valid: an imported hour stays (its quarantine of what the stream held for it, malformed entries, too).
    if not len(logs) and (kept := _imported(lake, context.partition_key)) is not None:
        malformed = f" and quarantining the stream's {len(quarantine)} malformed entries" if len(quarantine) else ""
        context.log.info(
            f"the stream holds no valid query for this hour: keeping its {len(kept)} imported requests{malformed}"
        )
        yield from _keep_imported(kept, quarantine, lost_queries)
        return
    stream = redis.schema().query_log()
    if loss := stream_loss(client, stream, lake, "query_logs", context.partition_key, start_ms, trimmed_before):
        context.log.warning(loss_warning(loss, len(logs), first_ts))  # nothing brings them back: the rest is kept
    footprint = stream_footprint(client, stream)
    if warning := stream_memory_warning(footprint, stream):
        context.log.warning(warning)
    total = len(logs) + lost_queries
    # The quarantine first: once query_logs is materialized the hour counts as drained (never drained again, its
    # stream entries trimmed), so a write of the quarantine that failed after it lost the hour's rejected rows.
    yield dg.Output(
        quarantine,
        output_name="query_log_quarantine",
        metadata={
            "dagster/row_count": len(quarantine),
            "reasons": dg.MetadataValue.json(_reason_counts(quarantine)),
        },
    )
    yield dg.Output(
        logs,
        output_name="query_logs",
        metadata={
            "dagster/row_count": len(logs),
            # An hour without queries has no hit rate: a 0 plotted as the cache going cold (left out, as undefined).
            **({"hit_rate": float(logs["hit"].mean())} if len(logs) else {}),
            "distinct_keys": int(logs["key"].nunique()),
            "quarantined": len(quarantine),
            "quarantined_queries": lost_queries,  # a batch entry rejected whole is one row for all of its queries
            "stream_trimmed": trimmed,
            **({"stream_lost": loss} if loss else {}),
            **footprint,
            "events_by_kind": dg.MetadataValue.json(logs["kind"].value_counts().to_dict()),
            "experiment_rows": int(logs["arm"].notna().sum()),
        },
    )
    yield quarantine_check(lost_queries, total)


def _imported(lake: LakeResource, hour: str) -> pd.DataFrame | None:
    """The hour's partition when it holds imported requests (``precompute query-logs import``), else None."""
    store = lake.lake()
    if not store.exists("query_logs", hour):
        return None
    existing = store.read("query_logs", hour)
    return existing if is_imported(existing) else None


def drained_ids(table: pa.Table, rejected: pa.Table) -> pa.Array:
    """The stream IDs a drain read: its rows' (``table``) and its quarantined rows' (``rejected``)."""
    return pa.concat_arrays([table.column("stream_id").combine_chunks(), rejected.column("stream_id").combine_chunks()])


def lost_events(lake: LakeResource, hour: str, found: pa.Array, asset: str) -> str | None:
    """``"N of its M"`` when the hour's materialized partitions of the drain ``asset`` (and its quarantine) hold events
    that this read of the stream (``found``: the stream IDs of its rows and quarantined rows, ``drained_ids``) did not
    find again, else None. Stream IDs are arrival times, so a complete stream always gives them back; imported rows
    never came from it."""
    store = lake.lake()
    kept: list[str] = []
    try:
        for name in (asset, QUARANTINE_OF[asset]):
            if store.exists(name, hour):
                kept += store.read(name, hour, columns=["stream_id"])["stream_id"].tolist()
    except LakeReadError:  # an unreadable partition is better replaced
        return None
    kept = [stream_id for stream_id in kept if not stream_id.startswith(IMPORTED)]
    missing = len(kept) - pc.sum(pc.is_in(pa.array(kept, pa.string()), value_set=found)).as_py() if kept else 0
    return f"{missing} of its {len(kept)}" if missing else None


LOSS_LOOKBACK_PARTITIONS = 24  # drained partitions searched, newest first, for an event the stream must still hold


def newest_stream_entry(lake: LakeResource, asset: str, before: str) -> tuple[str, str, int] | None:
    """``(partition, stream entry ID, rows)``: the newest stream entry of the newest materialized partition of the
    drain ``asset`` before the hour ``before`` that holds any (up to ``LOSS_LOOKBACK_PARTITIONS``; imported rows
    never came from the stream), or None. A drain writes its rows in stream order: the last one is the newest."""
    store = lake.lake()
    earlier = [key for key in store.partitions(asset) if key < before][-LOSS_LOOKBACK_PARTITIONS:]
    for partition in reversed(earlier):
        try:
            ids = store.read(asset, partition, columns=["stream_id"])["stream_id"]
        except LakeReadError:
            continue
        if len(ids) and not ids.iloc[-1].startswith(IMPORTED):
            # ``{entry ID}/{i}`` for a query of a batch entry; the ID itself in the one-query-per-entry form
            return partition, ids.iloc[-1].split("/", 1)[0], len(ids)
    return None


def stream_loss(
    client, stream: str, lake: LakeResource, asset: str, hour: str, start_ms: int, trimmed_before_ms: int
) -> str | None:
    """Why the stream may no longer hold all of ``asset``'s hour ``hour`` (starting at ``start_ms``), or None: the
    newest event of the last drained partition before it (``newest_stream_entry``) is gone, no trim of ours removed
    it, and the stream's oldest entry is not older than the hour. Entries go only from the old end, so what came
    after that event went with it: Redis restarted without persistence, was flushed, failed over to an empty
    replica, or its MAXLEN cut the stream. An oldest entry older than the hour says the loss came before it."""
    newest = newest_stream_entry(lake, asset, hour)
    if newest is None:
        return cut_before_first_drain(client, stream, start_ms, trimmed_before_ms)
    partition, entry, rows = newest
    if stream_ms(entry) < trimmed_before_ms or client.xrange(stream, min=entry, max=entry, count=1):
        return None
    if (oldest := oldest_entry_ms(client, stream)) is not None and oldest < start_ms:
        return None
    return f"the stream lost every event logged after partition {partition} (its {rows} events) was drained"


def cut_before_first_drain(client, stream: str, start_ms: int, trimmed_before_ms: int) -> str | None:
    """``stream_loss`` of a stream no hour before this one was drained from (a new deployment; or 24 hours of nothing
    but imports or quiet): entries were removed (``XINFO STREAM``'s ``entries-added`` above its length, Redis 7 or
    later), by none of our trims (there has been none), and its oldest entry is not older than the hour
    (``start_ms``), so the removed ones came before, or in, it: the loggers' ``stream_maxlen`` cut the stream before
    its first drain. None when that cannot be told."""
    if trimmed_before_ms:
        return None  # our cleanup trimmed it: the entries it removed are not counted apart from others
    try:
        info = client.xinfo_stream(stream)
    except redis_errors.RedisError:  # no stream, an ACL without XINFO: nothing to tell
        return None
    removed = int(info.get("entries-added") or 0) - int(info.get("length") or 0)
    oldest = oldest_entry_ms(client, stream)
    if removed <= 0 or oldest is None or oldest < start_ms:
        return None
    return (
        f"the stream lost {removed} entries that no cleanup trimmed (the loggers' stream_maxlen cut it, or entries "
        f"were deleted) and holds none before {datetime.fromtimestamp(oldest / 1000, UTC):%Y-%m-%d %H:%M:%S} UTC"
    )


def loss_warning(loss: str, kept: int, first: datetime | None) -> str:
    """A drain's warning when ``stream_loss`` found one: what its hour holds (``kept`` valid events), and since
    when."""
    since = f", the first at {first:%Y-%m-%d %H:%M:%S} UTC" if first is not None else ""
    return f"{loss}: this hour holds only the {kept} events logged after the loss{since}"


def stream_lost_failure(lost: str, hour: str) -> dg.Failure:
    """The failure of a drain whose stream lost events of its materialized partition (``lost_events``)."""
    return dg.Failure(
        description=f"the stream no longer holds {lost} events of partition {hour} (trimmed by its MAXLEN, or Redis "
        "restarted without persistence): re-reading it would replace the materialized partition with a partial one, "
        "so the existing partition is kept"
    )


def _keep_imported(logs: pd.DataFrame, quarantine: pd.DataFrame, lost_queries: int):
    """The outputs of an hour whose imported requests stay: the stream never had its traffic, only (``quarantine``,
    standing for ``lost_queries``) malformed entries, if anything."""
    metadata = {"dagster/row_count": len(logs), "distinct_keys": int(logs["key"].nunique()), "imported": True}
    yield dg.Output(quarantine, output_name="query_log_quarantine", metadata={"dagster/row_count": len(quarantine)})
    yield dg.Output(logs, output_name="query_logs", metadata={**metadata, "quarantined_queries": lost_queries})
    yield quarantine_check(lost_queries, len(logs) + lost_queries)


def _reason_counts(quarantine: pd.DataFrame) -> dict[str, int]:
    if quarantine.empty:
        return {}
    # Reasons embed offending values; group by their stable prefix.
    return quarantine["reason"].str.split(":").str[0].value_counts().head(20).to_dict()


# --- cleanup -------------------------------------------------------------------------------------------


def safe_trim_boundary(
    first_entry_ms: int,
    cutoff_ms: int,
    materialized: set[str],
    partitions_def: dg.TimeWindowPartitionsDefinition,
) -> int:
    """The newest stream ID (ms) that may be trimmed: the retention cutoff, or earlier if an hour before
    it has not been materialized yet (its events would be lost). Entries before the first partition are in no hour
    that could be: they never hold the trim back (they did for good, the stream then capped only by MAXLEN)."""
    for key in trimmed_hours(first_entry_ms, cutoff_ms, partitions_def):
        if key not in materialized:
            return min(cutoff_ms, epoch_ms(partitions_def.time_window_for_partition_key(key).start))
    return max(first_entry_ms, cutoff_ms)


def trimmed_hours(first_entry_ms: int, cutoff_ms: int, partitions_def: dg.TimeWindowPartitionsDefinition) -> list[str]:
    """The hours whose entries a trim of the stream from its oldest entry to ``cutoff_ms`` would take, oldest first."""
    if first_entry_ms >= cutoff_ms:
        return []
    first_partition = partitions_def.time_window_for_partition_key(partitions_def.get_first_partition_key()).start
    if first_entry_ms < epoch_ms(first_partition):
        start = first_partition
    else:
        first_key = partitions_def.get_partition_key_for_timestamp(first_entry_ms / 1000)
        start = partitions_def.time_window_for_partition_key(first_key).start
    end = datetime.fromtimestamp(cutoff_ms / 1000, tz=ZoneInfo(partitions_def.timezone))
    return list(partitions_def.get_partition_keys_in_time_window(dg.TimeWindow(start, end)))


STREAM_MEMORY_WARN_SHARE = 0.5  # a stream above this share of maxmemory leaves little for the versions before eviction


def stream_footprint(client, stream: str) -> dict[str, int]:
    """``stream``'s entries, its bytes (``MEMORY USAGE``) and its server's ``maxmemory`` (0: none), as numbers the UI
    plots; what Redis refuses (an ACL, a managed server) is left out."""
    node = {"target_nodes": client.get_node_from_key(stream)} if hasattr(client, "get_node_from_key") else {}
    reads = {
        "stream_entries": lambda: client.xlen(stream),
        "stream_bytes": lambda: client.memory_usage(stream) or 0,
        "maxmemory_bytes": lambda: client.info("memory", **node).get("maxmemory", 0),
    }
    out: dict[str, int] = {}
    for name, read in reads.items():  # each on its own: a user refused MEMORY USAGE still records the others
        try:
            out[name] = int(read())
        except (redis_errors.RedisError, ValueError, TypeError, AttributeError):
            continue
    return out


def stream_memory_warning(footprint: dict[str, int], stream: str) -> str | None:
    """A warning when ``stream`` takes more than ``STREAM_MEMORY_WARN_SHARE`` of its server's ``maxmemory``: the
    streams have no TTL, so at ``maxmemory`` Redis evicts version buckets instead, and readers miss."""
    used, limit = footprint.get("stream_bytes", 0), footprint.get("maxmemory_bytes", 0)
    if not limit or used <= STREAM_MEMORY_WARN_SHARE * limit:
        return None
    return (
        f"the stream {stream} takes {used / limit:.0%} of maxmemory ({used} of {limit} bytes, "
        f"{footprint.get('stream_entries', 0)} entries): at maxmemory Redis evicts version buckets and readers miss; "
        "drain the hours behind, or cap the loggers' stream_maxlen"
    )


def oldest_entry_ms(client, stream: str) -> int | None:
    """The arrival time (ms) of ``stream``'s oldest entry, or None when it holds none."""
    first = client.xrange(stream, count=1)
    if not first:
        return None
    return stream_ms(first[0][0])


class CleanupConfig(dg.Config):
    retention_hours: int = Field(
        7 * 24, description="Stream entries older than this are trimmed, never those of an unmaterialized hour."
    )


def trim_stream(
    context: dg.OpExecutionContext, client, stream: str, asset: str, retention_hours: int, hourly, marker: str | None
) -> None:
    """Trim ``stream``'s entries older than ``retention_hours``, never those of an hour of ``asset`` (its drain) not
    materialized yet; ``marker`` (when given) records the boundary first. Logs and observes what went."""
    if retention_hours < 1:  # 0 or less put the cutoff at now or later: every drained hour's entries would go
        raise dg.Failure(description=f"retention_hours must be at least 1, got {retention_hours}", allow_retries=False)
    first_ms = oldest_entry_ms(client, stream)
    if first_ms is None:
        context.log.info(f"{asset} stream is empty")
        return
    now_ms = epoch_ms(datetime.now(tz=UTC))
    cutoff_ms = now_ms - retention_hours * 3_600_000
    materialized = context.instance.get_materialized_partitions(dg.AssetKey(asset))
    if asset == "query_logs":  # an hour only `query-logs import` recorded was never drained: its stream entries stay
        recorded = [key for key in trimmed_hours(first_ms, cutoff_ms, hourly) if key in materialized]
        materialized = materialized - imported_only(context.instance, asset, recorded)
    boundary = safe_trim_boundary(first_ms, cutoff_ms, materialized, hourly)
    removed = 0
    if boundary > first_ms:
        if marker is not None:
            # Record the boundary first: a re-run of a trimmed hour must know it can no longer read it whole.
            client.eval(RECORD_BOUNDARY, 1, marker, boundary)
        removed = trim_stream_before(client, stream, f"{boundary}-0")
    if boundary < cutoff_ms:
        hour = hourly.get_partition_key_for_timestamp(boundary / 1000)
        context.log.warning(
            f"stopped trimming the {asset} stream at {hour}, an hour that is not materialized yet: its schedule drains "
            f"it if it is at most {CATCH_UP_HOURS} hours old, else materialize {asset} for it (a backfill in the UI)"
        )
    when = f"{datetime.fromtimestamp(boundary / 1000, UTC):%Y-%m-%d %H:%M:%S} UTC"  # it said a raw epoch in ms
    context.log.info(f"trimmed {removed} {asset} stream entries older than {when}")
    # An observation, not an op output: the job's IO manager stores DataFrames, and the UI plots these numbers.
    context.log_event(
        dg.AssetObservation(
            asset_key=asset, metadata={"trimmed_entries": int(removed), "trimmed_before_ms": int(boundary)}
        )
    )


@dg.op(description="Trim query-log stream entries older than the retention, never an unmaterialized hour.")
def trim_query_log(
    context: dg.OpExecutionContext, config: CleanupConfig, redis: RedisResource, deployment: DeploymentResource
) -> None:
    schema = redis.schema()
    trim_stream(context, redis.client(), schema.query_log(), "query_logs", config.retention_hours,
                deployment.partitions().hourly, schema.query_log_trimmed())  # fmt: skip


@dg.op(description="Trim user-event stream entries older than the retention, never an unmaterialized hour.")
def trim_user_events(
    context: dg.OpExecutionContext, config: CleanupConfig, redis: RedisResource, deployment: DeploymentResource
) -> None:
    # Capped only by MAXLEN (10 million entries, ~70 bytes each) before: Redis memory no TTL frees, held for nothing.
    schema = redis.schema()
    trim_stream(context, redis.client(), schema.events(), "user_events", config.retention_hours,
                deployment.partitions().hourly, schema.events_trimmed())  # fmt: skip


# The lake's partitioned files that grow with traffic: every query, event and impression, hour by hour or day by day.
LAKE_RETENTION_ASSETS = ("query_logs", "query_log_quarantine", "user_events", "user_event_quarantine", "ad_impressions")


class LakeRetentionConfig(dg.Config):
    retention_days: int = Field(
        90,
        description="Lake files of the assets' partitions of days more than this before today (in the deployment's "
        "timezone) are deleted; 0 keeps them all. Keep it above the models' lookbacks (14 days by default).",
    )
    assets: list[str] = Field(list(LAKE_RETENTION_ASSETS), description="The lake's assets whose old files go.")


@dg.op(
    description="Delete the lake files of old query-log, user-event and impression partitions past their retention, "
    "and the stale temporary files of killed writes."
)
def expire_lake_partitions(
    context: dg.OpExecutionContext, config: LakeRetentionConfig, lake: LakeResource, deployment: DeploymentResource
) -> None:
    store = lake.lake()
    if config.retention_days <= 0:
        context.log.info("lake retention is off (retention_days 0): every partition's file is kept")
    today = datetime.now(tz=ZoneInfo(deployment.timezone)).date()
    before = (today - timedelta(days=config.retention_days)).isoformat()
    for asset in config.assets:
        old = partitions_before(store.partitions(asset), before) if config.retention_days > 0 else []
        for partition in old:
            store.delete(asset, partition)
        store.sweep_temporaries(asset)  # a partition written once never sweeps its own killed writes'
        if old:
            context.log.info(f"deleted {len(old)} {asset} files of days before {before} ({old[0]} to {old[-1]})")
            context.log_event(dg.AssetObservation(asset_key=asset, metadata={"lake_files_deleted": len(old)}))


# Op jobs that materialize no asset, whose runs may go whole: precompute_tasks_job (``tasks.JOB_NAME``; tasks imports
# this module), a run or more per second of user_event_sensor while users are active.
RUN_RETENTION_JOBS = ("precompute_tasks_job",)
RUN_DELETE_BATCH = 1000
FINISHED = [dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED]


class RunRetentionConfig(dg.Config):
    retention_days: int = Field(
        14, description="Finished runs of the jobs older than these days are deleted with their event logs; 0: none."
    )
    jobs: list[str] = Field(
        list(RUN_RETENTION_JOBS),
        description="Jobs whose old runs go. Never an asset job: an asset's history is the event log of its runs.",
    )


def job_assets(instance: dg.DagsterInstance, job: str) -> list[str]:
    """The assets the newest run of ``job`` materializes (from its execution plan): an asset job is known by what its
    runs do, whichever code location defines it (a job without runs has none to delete)."""
    records = instance.get_run_records(filters=dg.RunsFilter(job_name=job), limit=1)
    plan_id = records[0].dagster_run.execution_plan_snapshot_id if records else None
    plan = instance.get_execution_plan_snapshot(plan_id) if plan_id else None
    outputs = [output for step in plan.steps for output in step.outputs] if plan else []
    keys = {output.properties.asset_key for output in outputs if output.properties and output.properties.asset_key}
    return sorted(key.to_user_string() for key in keys)


@dg.op(description="Delete the finished runs of the precompute task jobs past their retention, with their event logs.")
def delete_old_runs(context: dg.OpExecutionContext, config: RunRetentionConfig) -> None:
    # Checked before any deletion: the runs of an asset job are its assets' materialization history.
    for job in config.jobs:
        if assets := job_assets(context.instance, job):
            named = ", ".join(assets[:3]) + (", ..." if len(assets) > 3 else "")
            raise dg.Failure(
                description=f"delete_old_runs: {job} materializes {named}: list only op jobs in jobs, never an asset "
                "job (an asset's history is the event log of its runs)",
                allow_retries=False,
            )
    before = retention_start(context.log.info, config.retention_days, "run", "every run is kept")
    if before is None:
        return
    logs_kept: list[str] = []  # why the compute logs of a deleted run stayed, an entry a run
    for job in config.jobs:
        deleted = 0
        while True:
            records = context.instance.get_run_records(
                filters=dg.RunsFilter(job_name=job, statuses=FINISHED, updated_before=before),
                limit=RUN_DELETE_BATCH,
            )
            for record in records:
                context.instance.delete_run(record.dagster_run.run_id)
                delete_compute_logs(context.instance, record.dagster_run.run_id, logs_kept)
            deleted += len(records)
            if len(records) < RUN_DELETE_BATCH:
                break
        context.log.info(f"deleted {deleted} {job} runs that ended before {before:%Y-%m-%d %H:%M} UTC")
    if logs_kept:
        context.log.warning(
            f"the compute logs of {len(logs_kept)} deleted runs stay where the compute log manager keeps them (the "
            f"first: {logs_kept[0]})"
        )


def delete_compute_logs(instance: dg.DagsterInstance, run_id: str, problems: list[str]) -> None:
    """Delete the compute logs (stdout, stderr) of a deleted run: ``delete_run`` leaves them, a folder of files per run
    in ``$DAGSTER_HOME/storage`` by default, so a run or more a second of the task sensors left ~86,000 a day for good.
    Logs that cannot be deleted (a manager without a delete, a folder of another user) stay: ``problems`` gets why."""
    try:
        instance.compute_log_manager.delete_logs(prefix=[run_id])
    except Exception as error:  # NotImplementedError of a manager that has no delete, or its storage's error
        problems.append(f"{type(instance.compute_log_manager).__name__}: {type(error).__name__}: {error}"[:300])


@dg.job(
    description="Trim the query-log and user-event streams past their retention, the lake's old hourly and daily "
    "files, old runs, the ads of long-ended campaigns and the document loads' old quarantined rows."
)
def query_log_cleanup_job():
    trim_query_log()
    trim_user_events()
    expire_lake_partitions()
    delete_old_runs()
    purge_campaign_ads()
    expire_document_quarantine()


# With the default launcher, run monitoring ends a run whose worker died (the OOM killer on a busy hour) only at its
# max runtime, and the drain schedule counts it as busy until then: an hour, not dagster.yaml's 6 h. A drain that
# needs longer than the hour it drains would fall behind for good anyway.
DRAIN_TAGS = {"dagster/max_runtime": "3600"}

query_logs_job = dg.define_asset_job(
    "query_logs_job",
    selection=dg.AssetSelection.assets(query_logs),
    description="Drain one hour of query logs.",
    tags=DRAIN_TAGS,
)


# --- the hourly drains -----------------------------------------------------------------------------------


CATCH_UP_HOURS = 7 * 24  # after a daemon outage, drain at most this many missed hours (the stream's retention)


def hours_to_drain(
    keys: list[str], materialized: set[str], busy: set[str], *, ever_materialized: bool, first_logged: int | None = None
) -> list[str]:
    """Of ``keys`` (the hours up to the one that just ended, oldest first): the last one, and every hour not
    ``materialized`` after the oldest one that is, when there is a drained hour to resume from: the hours a daemon
    outage missed, and those whose drain failed, even when a later hour's succeeded; also every one not materialized
    from ``first_logged`` (the index of the first hour that may hold the stream's oldest entry) on: hours logged
    before the first drain (the service ran before the daemon's first tick) were never drained, and the nightly trim
    stopped at them for good; less the ``busy`` ones (a run going)."""
    done = [i for i, key in enumerate(keys) if key in materialized]
    # nothing drained in the window: all of it after an outage that long, only the last on a new deployment
    start = done[0] if done else (0 if ever_materialized else len(keys) - 1)
    if first_logged is not None:
        start = min(start, first_logged)
    wanted = [key for key in keys[start:] if key not in materialized]
    if keys and keys[-1] not in wanted:
        wanted.append(keys[-1])  # drained again, as every tick does (a hook for an hour imported before)
    return [key for key in wanted if key not in busy]


def imported_only(instance: dg.DagsterInstance, asset_key: str, hours: list[str]) -> set[str]:
    """Of ``hours`` (materialized partitions of ``asset_key``), those that no run materialized: recorded only by an
    import, outside any run, so never drained."""
    if not hours:
        return set()
    drained: set[str] = set()
    records_filter = dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset_key), asset_partitions=hours)
    cursor = None
    while True:
        page = instance.fetch_materializations(records_filter, limit=1000, cursor=cursor)
        drained.update(record.partition_key for record in page.records if record.run_id)
        if not page.has_more:
            return set(hours) - drained
        cursor = page.cursor


def partitions_in_flight(
    instance: dg.DagsterInstance, asset_key: str, job_name: str, partitions_def: dg.TimeWindowPartitionsDefinition
) -> set[str]:
    """The partitions of ``asset_key`` that active runs are materializing: runs of ``job_name``, and any other run whose
    assets include it (the UI's *Materialize*, an asset backfill, ``dagster asset materialize``: ``__ASSET_JOB``), by
    their partition tag or their partition range (a single-run backfill)."""
    key, busy = dg.AssetKey(asset_key), set()
    for run in instance.get_runs(dg.RunsFilter(statuses=ACTIVE_RUN_STATUSES)):
        if run.job_name != job_name and key not in (run.asset_selection or ()):
            continue
        if (partition := run.tags.get(PARTITION_TAG)) is not None:
            busy.add(partition)
        first, last = run.tags.get(RANGE_START_TAG), run.tags.get(RANGE_END_TAG)
        if first is not None and last is not None:
            busy.update(_keys_between(partitions_def, first, last))
    return busy


def _keys_between(partitions_def: dg.TimeWindowPartitionsDefinition, first: str, last: str) -> list[str]:
    """The partition keys from ``first`` to ``last`` by their time windows: a range that starts before the definition
    does (its start moved later since the run began) still names its hours; a key that is no time of the definition's
    format, none (one odd run must not fail every tick of the schedule)."""
    try:
        start = partitions_def.time_window_for_partition_key(first).start
        end = partitions_def.time_window_for_partition_key(last).end
    except ValueError:
        return []
    return partitions_def.get_partition_keys_in_time_window(dg.TimeWindow(start, end))


def build_drain_schedule(
    job: "UnresolvedAssetJobDefinition",
    asset_key: str,
    partitions_def: dg.TimeWindowPartitionsDefinition,
    *,
    name: str,
    description: str,
    stream: Callable[[KeySchema], str],
    catch_up_hours: int = CATCH_UP_HOURS,
) -> dg.ScheduleDefinition:
    """5 past every hour, the hour that ended; also every hour since the first drained one, or since the one of the
    oldest entry of ``stream`` (its Redis key in a schema), that is not drained yet: after a daemon outage (Dagster
    catches up no tick of a schedule like this: only the newest missed tick runs), after a drain that failed, and the
    hours logged before the first drain."""

    @dg.schedule(
        name=name,
        cron_schedule="5 * * * *",
        execution_timezone=partitions_def.timezone,
        target=job,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description=description,
    )
    def drain(context: dg.ScheduleEvaluationContext, redis: RedisResource):
        tick = (context.scheduled_execution_time or datetime.now(UTC)).astimezone(UTC)
        window = dg.TimeWindow(tick - pd.Timedelta(hours=catch_up_hours), tick)
        # compared as instants: two times of one zone compare by wall clock, and a fall-back hour repeats it
        keys = [
            key
            for key in partitions_def.get_partition_keys_in_time_window(window)
            if partitions_def.time_window_for_partition_key(key).end.timestamp() <= tick.timestamp()
        ]
        if not keys:
            return dg.SkipReason(f"no hour of {asset_key} has ended yet")
        materialized: set[str] = set()
        busy: set[str] = set()
        if context.instance_ref is not None:
            materialized = context.instance.get_materialized_partitions(dg.AssetKey(asset_key))
            busy = partitions_in_flight(context.instance, asset_key, job.name, partitions_def)
        oldest = redis.sensor_check(lambda client, schema: oldest_entry_ms(client, stream(schema)), context.log,
                                    f"the oldest entry of the {asset_key} stream")  # fmt: skip
        first_logged = None
        if oldest is not None:  # the first hour that ends after it: every hour from there may hold entries
            ends = [partitions_def.time_window_for_partition_key(key).end.timestamp() * 1000 for key in keys]
            first_logged = next((i for i, end in enumerate(ends) if end > oldest), None)
        if first_logged is not None and context.instance_ref is not None:
            # An hour only an import recorded (``query-logs import``) may still hold the client's queries in the stream
            # (the drain then replaces the import; it keeps it when the stream holds nothing for the hour).
            recorded = [key for key in keys[first_logged:] if key in materialized]
            materialized = materialized - imported_only(context.instance, asset_key, recorded)
        wanted = hours_to_drain(
            keys, materialized, busy, ever_materialized=bool(materialized), first_logged=first_logged
        )
        if not wanted:
            return dg.SkipReason(f"every missed hour of {asset_key} is being drained")
        # As Dagster's own partitioned schedules request them: the run key is the hour (a tick resumed after a crash
        # launches only the hours it had not launched yet), the partition tag already set (resolved).
        return [
            dg.RunRequest(run_key=key, partition_key=key, job_name=job.name, tags={PARTITION_TAG: key})
            for key in wanted
        ]

    return drain
