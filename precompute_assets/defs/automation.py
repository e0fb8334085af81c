"""Jobs, schedules and sensors: when things run. Every schedule and sensor starts RUNNING, so a fresh
deployment drains its query logs and precomputes without anyone switching it on."""

import time
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import dagster as dg
import redis as redis_py

from ..serving import KeySchema
from ..serving.events import evicted_since, server_mark
from ..serving.stats import window_stats
from .demand import demand_model
from .embeddings import NO_EMBEDDER, document_embeddings_job, has_embedder
from .experiment import selection_experiment
from .models import ctr_model, model_version
from .partitions import Partitions
from .predictions import ctr_predictions
from .publishing import (
    RESTORE_MIN_TTL_S,
    SERVED_CHECK,
    changed_served_evaluations,
    ctr_cache,
    ctr_restore_job,
    expired_at,
    foreign_pointer,
    lost_in_redis,
    recorded_publish,
    rejected_since,
)
from .query_logs import build_drain_schedule, query_log_cleanup_job, query_logs_job
from .records import newest_metadata
from .resources import RedisResource
from .runs import ACTIVE_RUN_STATUSES, IN_PROGRESS, PARTITION_TAG, SENSOR_NAME_TAG, SERVER_MARK_TAG
from .selection import OFFPEAK_WINDOW_HOURS, ad_demand, top_ads, traffic_profile

# Until traffic_profile has learned the quiet window of the traffic, it is assumed to start at 02:00.
DEFAULT_OFFPEAK_START_HOUR = 2
RUNNING = dg.DefaultScheduleStatus.RUNNING

# One day's selection, model, predictions, publish and experiment report; the daily run also trains demand_model.
PRECOMPUTE_ASSETS = (traffic_profile, ad_demand, top_ads, ctr_model, ctr_predictions, ctr_cache, selection_experiment)
PRECOMPUTE_SELECTION = dg.AssetSelection.assets(*PRECOMPUTE_ASSETS)

daily_precompute_job = dg.define_asset_job(
    "daily_precompute_job",
    selection=PRECOMPUTE_SELECTION | dg.AssetSelection.assets(demand_model),
    description="Selection (after demand_model's held-back evaluation, which strategy auto follows), model, "
    "predictions and publish for one day (run off-peak for the day just ended), and the report of the A/B "
    "experiment that served that day, if any.",
)

refresh_precompute_job = dg.define_asset_job(
    "refresh_precompute_job",
    selection=PRECOMPUTE_SELECTION,
    description="daily_precompute_job without training demand_model: a refresh of a cold cache publishes at once, "
    "top_ads following the demand_model verdict its nightly run left.",
)
JOBS_OF_A_DAY = (daily_precompute_job.name, refresh_precompute_job.name)  # the jobs that train and publish a day


def offpeak_start_hour(instance: dg.DagsterInstance | None) -> int:
    """The start of the off-peak window learned by ``traffic_profile`` of the newest day, or the default."""
    if instance is None:
        return DEFAULT_OFFPEAK_START_HOUR
    days = instance.get_materialized_partitions(dg.AssetKey("traffic_profile"))
    if not days:
        return DEFAULT_OFFPEAK_START_HOUR
    # The newest day's, not the latest materialization: a backfill of an older day must not move tonight's window.
    value = newest_metadata(instance, "traffic_profile", max(days)).get("offpeak_start_hour")
    return int(value.value) if value is not None else DEFAULT_OFFPEAK_START_HOUR


def precompute_request(
    moment: datetime, start_hour: int, timezone: str, *, late: bool = False
) -> dg.RunRequest | dg.SkipReason:
    """Request the precompute of the newest whole day (yesterday) when ``moment`` falls in the off-peak window
    starting at ``start_hour``. At any later hour, when ``late`` (the caller found no run of that day: the daemon was
    down through the window, or the day's logs came in after it), request the day the newest window served: the day
    before its last tick's, tagged ``precompute/late`` with why. A window that crosses midnight (22:00-02:00) thus
    runs the day that has just ended after midnight: it ran the day before, a day late (h_diff11).

    A window rather than one instant: on a spring-forward day the start hour may not exist. The run key is one per
    day; the schedule skips a day whose run key an earlier tick launched (Dagster would launch it again).
    """
    local = moment.astimezone(ZoneInfo(timezone))
    since_start = (local.hour - start_hour) % 24
    in_window = since_start < OFFPEAK_WINDOW_HOURS
    last_tick = local if in_window else local - timedelta(hours=since_start - (OFFPEAK_WINDOW_HOURS - 1))
    partition = (last_tick.date() - timedelta(days=1)).isoformat()
    request = dg.RunRequest(run_key=f"precompute-{partition}", partition_key=partition)
    if in_window:
        return request
    if not late:
        return dg.SkipReason(f"outside the off-peak window starting at {start_hour:02d}:00 {timezone}")
    why = f"{partition} had no run in the off-peak window starting at {start_hour:02d}:00 {timezone}: run late"
    return request.with_replaced_attrs(tags={"precompute/late": why})


HEALTH_THRESHOLD = 0.8  # cache_health refreshes when the last hour's ctr hit rate falls below this
HEALTH_MIN_REQUESTS = 200  # ... over at least this many requests (fewer say nothing)
HEALTH_COOLDOWN_S = 6 * 3600  # and at most once in this long, so a cache that stays cold is not rebuilt hourly
HEALTH_RETRY_S = 3600  # ... but an hour after a refresh that failed, which left the cache as cold as it was


def health_request(
    window: dict | None,
    now: datetime,
    timezone: str,
    last_request_s: float | None,
    *,
    last_failed: bool = False,
    threshold: float = HEALTH_THRESHOLD,
    min_requests: int = HEALTH_MIN_REQUESTS,
    cooldown_s: float = HEALTH_COOLDOWN_S,
    retry_s: float = HEALTH_RETRY_S,
) -> dg.RunRequest | dg.SkipReason:
    """A refresh of yesterday's precompute when the last hour's hit rate (``window``: ``serving.stats``'s entry
    of the ``ctr`` kind) is below ``threshold``, saying why; else why not. The refresh requested at
    ``last_request_s`` holds the next off for ``cooldown_s``, or for ``retry_s`` when it failed (``last_failed``)."""
    requests = 0 if window is None else window["requests"]
    if requests < min_requests:
        return dg.SkipReason(f"{requests} ctr requests in the last hour: fewer than {min_requests}, nothing to judge")
    rate = window["hits"] / requests
    if rate >= threshold:
        return dg.SkipReason(f"hit rate {rate:.1%} over {requests} requests: at or above {threshold:.0%}")
    wait_s = retry_s if last_failed else cooldown_s
    if last_request_s is not None and now.timestamp() - last_request_s < wait_s:
        requested = "the refresh requested" + (" (it failed)" if last_failed else "")
        return dg.SkipReason(f"hit rate {rate:.1%} is below {threshold:.0%}, but {requested} less than "
                             f"{wait_s / 3600:g} h ago")  # fmt: skip
    day = (now.astimezone(ZoneInfo(timezone)).date() - timedelta(days=1)).isoformat()
    missed = ", ".join(key for key, _ in window["most_missed"][:5])
    reason = f"hit rate {rate:.1%} over the last hour's {requests} requests is below {threshold:.0%}"
    return dg.RunRequest(
        run_key=f"cache-health-{day}-{int(now.timestamp()) // 3600}",
        job_name=refresh_precompute_job.name,
        partition_key=day,
        tags={"precompute/reason": reason[:200], "precompute/most_missed": missed[:200]},
    )


def restore_request(
    instance: dg.DagsterInstance,
    client: redis_py.Redis,
    schema: KeySchema,
    now: datetime,
    *,
    retry_s: float = HEALTH_RETRY_S,
) -> dg.RunRequest | dg.SkipReason | None:
    """A run of ``ctr_restore_job`` when Redis lost the ctr version ``ctr_cache`` last published (its pointer, or its
    values under it), whatever the traffic; a SkipReason while one is queued or running (a refresh would publish
    another version meanwhile); None when nothing is lost, when Redis's pointer names another version (or is not one
    we wrote: a restore refuses to write over it), or for ``retry_s`` after a restore failed (it cannot restore that
    version, or Redis refused it) or succeeded and Redis evicted it again since (its memory is too small for it: a
    restore every tick would only evict other keys): the hit rate is judged then."""
    recorded = recorded_publish(instance, "ctr")
    if recorded is None:
        return None
    why = lost_in_redis(client, schema, "ctr", recorded)
    if why is None or foreign_pointer(client, schema, recorded) is not None or rejected_since(instance, recorded):
        return None  # a restore would refuse (another version, a rejected day): the hit rate decides on a refresh
    if expired_at(recorded, now.timestamp() + RESTORE_MIN_TTL_S) is not None:
        return None  # expired as configured (or about to): a restore would serve stale predictions; the check says so
    records = instance.get_run_records(dg.RunsFilter(job_name=ctr_restore_job.name), limit=1)  # the newest
    if records and (status := records[0].dagster_run.status) in ACTIVE_RUN_STATUSES:
        return dg.SkipReason(f"restoring the ctr version Redis lost (run {records[0].dagster_run.run_id[:8]}): {why}")
    if records:
        ended = records[0].end_time or records[0].update_timestamp.timestamp()
        failed = status in (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)
        evicted = status == dg.DagsterRunStatus.SUCCESS and evicted_since(
            records[0].dagster_run.tags.get(SERVER_MARK_TAG), server_mark(client)
        )
        if (failed or evicted) and now.timestamp() - ended < retry_s:
            return None
    return dg.RunRequest(
        run_key=f"ctr-restore-{recorded.version}-{int(now.timestamp())}",
        job_name=ctr_restore_job.name,
        tags={"precompute/reason": why[:200]},
    )


def without_retraining(instance: dg.DagsterInstance, request: dg.RunRequest) -> dg.RunRequest:
    """``request``, a refresh of one day, without ``ctr_model`` when that day has an approved one: a refresh is for a
    cold cache, and the forest's fit (minutes on a large day) would delay the publish only to train the same model
    on the same impressions again. A day with none (its night's run never trained one) trains it."""
    try:
        model_version(instance, request.partition_key)
    except dg.Failure:
        return request
    keys = [key for asset in PRECOMPUTE_ASSETS if asset is not ctr_model for key in asset.keys]
    return request.with_replaced_attrs(asset_selection=keys)


def build_cache_health_sensor(
    timezone: str, *, threshold: float = HEALTH_THRESHOLD, partitions: Partitions | None = None
) -> dg.SensorDefinition:
    """``cache_health``: every 5 minutes, the ctr hit rate of the last hour from the query log; below
    ``threshold`` it requests ``refresh_precompute_job`` for yesterday (at most every 6 hours, or an hour after a
    refresh that failed) and says why: the daily graph without retraining the LSTM, which would delay the publish
    and could switch the day's strategy. When Redis lost the ctr version ``ctr_cache`` last published, it requests
    ``restore_request``'s run instead, whatever the traffic. It also reports the published assets' ``served_by_redis``
    checks when their verdict changes."""

    @dg.sensor(
        name="cache_health",
        jobs=[refresh_precompute_job, ctr_restore_job],
        minimum_interval_seconds=300,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Refresh yesterday's precompute when the last hour's ctr hit rate is below {threshold:.0%} "
        f"(over at least {HEALTH_MIN_REQUESTS} requests; at most every {HEALTH_COOLDOWN_S // 3600} h, or "
        f"{HEALTH_RETRY_S // 3600} h after a refresh that failed); when Redis lost the ctr version ctr_cache last "
        "published, whatever the traffic, restores that version (ctr_restore_job) instead, or "
        f"{HEALTH_RETRY_S // 3600} h after a restore that failed; "
        "reports the served_by_redis checks of the published assets when Redis loses or regains their versions.",
    )
    def cache_health(context: dg.SensorEvaluationContext, redis: RedisResource):
        now = datetime.now(ZoneInfo("UTC"))

        def look(client: redis_py.Redis, schema: KeySchema) -> tuple:
            restore = restore_request(context.instance, client, schema, now)
            window = window_stats(client, schema, window_s=3600).get("ctr") if restore is None else None
            return restore, window, changed_served_evaluations(context.instance, client, schema)

        # A quick client (a few seconds, no retries): a stalled Redis skips the tick, with a warning, rather than
        # hold it for the default client's retries or fail it. The next tick looks again.
        seen = redis.sensor_check(look, context.log, "the cache's health")
        if seen is None:
            return dg.SkipReason("Redis does not answer: the cache's health was not checked (see the tick's log)")
        result, window, evaluations = seen
        if isinstance(result, dg.RunRequest):
            # The version served comes back as it was; a refresh would retrain and publish yesterday anew (or be
            # refused under an operator's rollback). The next tick judges the hit rate again.
            context.log.warning(f"restoring the ctr version Redis lost: {result.tags['precompute/reason']}")
        elif result is None:  # nothing lost, or a restore failed: the hit rate is judged
            last = float(context.cursor) if context.cursor else None
            failed = last is not None and last_refresh_failed(context.instance)
            result = health_request(window, now, timezone, last, last_failed=failed, threshold=threshold)
            if isinstance(result, dg.RunRequest):
                result = refresh_or_skip(context.instance, result, partitions)
            if isinstance(result, dg.RunRequest):
                result = without_retraining(context.instance, result)
                context.log.info(result.tags["precompute/reason"])
                context.update_cursor(str(now.timestamp()))
        # The published assets' served_by_redis checks, reported when their verdict changes: a lost version shows on
        # the asset in the UI, not only as a falling hit rate.
        for evaluation in evaluations:
            context.log.info(f"{SERVED_CHECK} of {evaluation.asset_key.to_user_string()}: {evaluation.description}")
        if not evaluations:
            return result
        if isinstance(result, dg.SkipReason):
            return dg.SensorResult(skip_reason=result, asset_events=evaluations)
        return dg.SensorResult(run_requests=[result], asset_events=evaluations)

    return cache_health


def refresh_or_skip(
    instance: dg.DagsterInstance, request: dg.RunRequest, partitions: Partitions | None
) -> dg.RunRequest | dg.SkipReason:
    """``request``, a refresh of one day, or why not now: a run of that day's graph is in progress (the nightly one,
    say: its publish is the refresh, and a second run would train and publish the day twice); and, given the
    deployment's ``partitions``, the day is before the first one (a deployment's first day: no such partition, and
    the tick failed on it all day), or some of its query_logs hours are not drained yet (just after midnight: the
    refresh would select from 23 hours, as the nightly run never does)."""
    day, reason = request.partition_key, request.tags["precompute/reason"]
    if partitions is not None and day < partitions.start:
        return dg.SkipReason(
            f"{reason}, but {day} is before the first partition ({partitions.start}): nothing to refresh"
        )
    if (running := run_of_day(instance, day, JOBS_OF_A_DAY, active_only=True)) is not None:
        return dg.SkipReason(f"{reason}, but run {running.run_id[:8]} of {day} is {running.status.value}")
    if partitions is not None and (missing := missing_log_hours(instance, partitions.hours_of(day))):
        return dg.SkipReason(f"{reason}, but {len(missing)} query_logs hours of {day} are not drained yet")
    return request


def last_refresh_failed(instance: dg.DagsterInstance) -> bool:
    """Whether the newest refresh ``cache_health`` requested failed or was canceled."""
    runs = instance.get_runs(
        dg.RunsFilter(job_name=refresh_precompute_job.name, tags={SENSOR_NAME_TAG: "cache_health"}), limit=1
    )
    return bool(runs) and runs[0].status in (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)


# What a nightly run materializes: a run of the asset graph that covers all of it (the UI's *Materialize all*, an asset
# backfill of the day) is the day's run too.
DAY_GRAPH = frozenset(key for asset in (*PRECOMPUTE_ASSETS, demand_model) for key in asset.keys)


def run_of_day(
    instance: dg.DagsterInstance, partition: str, jobs: tuple[str, ...], *, active_only: bool = False
) -> dg.DagsterRun | None:
    """The newest run for ``partition`` of one of ``jobs``, or, with ``daily_precompute_job`` among them, one that
    materializes the whole day's graph (``DAY_GRAPH``) from the asset graph: the UI's *Materialize all*, ``dagster
    asset materialize``, an asset backfill; whatever launched it and, unless ``active_only``, whatever its status. A
    schedule needs this: Dagster dedupes a schedule's run keys only among the runs of one tick (one scheduled time),
    never across ticks, and a backfill or a launch from the UI has no run key at all."""
    statuses = ACTIVE_RUN_STATUSES if active_only else None
    runs = instance.get_runs(dg.RunsFilter(tags={PARTITION_TAG: partition}, statuses=statuses), limit=100)
    whole = daily_precompute_job.name in jobs
    for run in runs:  # newest first
        if run.job_name in jobs or (
            whole and run.job_name not in JOBS_OF_A_DAY and set(run.asset_selection or ()) >= DAY_GRAPH
        ):
            return run
    return None


def missing_log_hours(instance: dg.DagsterInstance, hours: list[str]) -> list[str]:
    """The hourly query_logs partitions among ``hours`` not materialized yet."""
    done = instance.get_materialized_partitions(dg.AssetKey("query_logs"))
    return [hour for hour in hours if hour not in done]


def build_schedules(partitions: Partitions) -> list:
    """Hourly query-log drain, the off-peak daily precompute, the 03:00 cleanup and the 04:00 embedding sync,
    all in the timezone of ``partitions`` and all RUNNING by default."""
    timezone = partitions.timezone

    @dg.schedule(
        name="daily_precompute",
        cron_schedule="0 * * * *",
        execution_timezone=timezone,
        target=daily_precompute_job,
        default_status=RUNNING,
        description=f"Ticks every hour and runs yesterday's precompute once a day: in the {OFFPEAK_WINDOW_HOURS}-hour "
        f"off-peak window traffic_profile learned (from {DEFAULT_OFFPEAK_START_HOUR:02d}:00 {timezone} until it has), "
        "once all of yesterday's query_logs hours are materialized; when the window passed without that run (the "
        "daemon was down, the logs came late), at the next tick after it, tagged precompute/late; the other ticks "
        "skip, saying why.",
    )
    def daily_precompute(context: dg.ScheduleEvaluationContext):
        instance = context.instance if context.instance_ref is not None else None
        # Outside the window only with an instance to ask whether the day already ran: a late catch-up, once.
        request = precompute_request(
            context.scheduled_execution_time, offpeak_start_hour(instance), timezone, late=instance is not None
        )
        if isinstance(request, dg.RunRequest) and request.partition_key < partitions.start:
            # The first night of a deployment: yesterday is no partition, and its logs will never come.
            return dg.SkipReason(f"{request.partition_key} is before the first partition ({partitions.start})")
        if instance is not None and isinstance(request, dg.RunRequest):
            earlier = run_of_day(instance, request.partition_key, (daily_precompute_job.name,))
            # A refresh of the day in progress (cache_health's, before the window) would publish beside it: wait.
            earlier = earlier or run_of_day(instance, request.partition_key, (refresh_precompute_job.name,),
                                            active_only=True)  # fmt: skip
            if earlier is not None:
                # Every hour of the window ticks, and Dagster would launch each tick's request: one run a day (or
                # none, when a backfill or the UI ran the day).
                return dg.SkipReason(
                    f"{request.partition_key} already has a run (run {earlier.run_id[:8]}, {earlier.status.value})"
                )
            missing = missing_log_hours(instance, partitions.hours_of(request.partition_key))
            if missing:
                # Later ticks of the window try again; the run above keeps it to one run a day.
                return dg.SkipReason(f"waiting for {len(missing)} query_logs hours of {request.partition_key}")
        return request

    @dg.schedule(
        name="document_embeddings_daily",
        cron_schedule="0 4 * * *",
        execution_timezone=timezone,
        target=document_embeddings_job,
        default_status=RUNNING,
        description=f"A sync even without changes, at 04:00 {timezone}: renews the embedding version's TTL and "
        "catches anything the documents_changed sensor missed (once embedding_model has been materialized).",
    )
    def document_embeddings_daily(context: dg.ScheduleEvaluationContext):
        if context.instance_ref is not None and not has_embedder(context.instance):
            return dg.SkipReason(NO_EMBEDDER)  # the sync would fail at once
        return dg.RunRequest()

    return [
        build_drain_schedule(
            query_logs_job,
            "query_logs",
            partitions.hourly,
            name="query_logs_hourly",
            stream=KeySchema.query_log,
            description=f"Drain the previous hour of query logs, 5 minutes past every hour ({timezone}); after a "
            "daemon outage also every hour missed since the last one drained (up to a week).",
        ),
        daily_precompute,
        dg.ScheduleDefinition(
            name="query_log_cleanup_daily",
            target=query_log_cleanup_job,
            cron_schedule="0 3 * * *",
            execution_timezone=timezone,
            default_status=RUNNING,
            description=f"At 03:00 {timezone}, query_log_cleanup_job: trim the query-log and user-event streams past "
            "their retention (trim_query_log, trim_user_events), delete the lake's old hourly and daily files "
            "(expire_lake_partitions), old runs (delete_old_runs), the ads and partitions of long-ended campaigns "
            "(purge_campaign_ads) and the document loads' old quarantined rows (expire_document_quarantine).",
        ),
        document_embeddings_daily,
    ]


def automation_states(
    instance: dg.DagsterInstance, defs: dg.Definitions, *, location_name: str | None = None
) -> list[tuple[str, str, str]]:
    """``(name, "schedule" | "sensor", "RUNNING" | "STOPPED")`` for every schedule and sensor of ``defs``, by name.

    The state is the one the daemon acts on: what was stored when someone started or stopped it (UI toggle,
    ``dagster schedule stop``), else its default in code. ``location_name`` narrows the stored states to one
    code location (by default any: our instigator names are unique in the instance).
    """
    repository = defs.get_repository_def()
    stored = {
        (state.instigator_name, state.instigator_type.value.lower()): state.status.value
        for state in instance.all_instigator_state()
        if location_name is None or state.origin.location_name == location_name
    }
    rows = []
    for kind, definitions in (("schedule", repository.schedule_defs), ("sensor", repository.sensor_defs)):
        for definition in definitions:
            # DECLARED_IN_CODE (or nothing stored) means "as the code says"; Dagster stores it for defaults.
            status = stored.get((definition.name, kind), "DECLARED_IN_CODE")
            if status == "DECLARED_IN_CODE":
                status = definition.default_status.value
            rows.append((definition.name, kind, "STOPPED" if status == "STOPPED" else "RUNNING"))
    return sorted(rows)


def _pools(defs: dg.Definitions) -> list[str]:
    return sorted({a.op.pool for a in defs.resolve_asset_graph().assets_defs if a.is_executable and a.op.pool})


LONG_HOLD_S = 3600.0  # a STARTED run holding a pool slot this long may have lost its worker: status says what to do
FREE_SLOTS_AFTER_END_S = 30  # dagster.yaml's free_slots_after_run_end_seconds: a daemon frees an ended run's slots


def pool_states(
    instance: dg.DagsterInstance, defs: dg.Definitions, *, now: float | None = None
) -> list[tuple[str, str]]:
    """``(pool, "free" | what holds it)`` for every concurrency pool of ``defs``' assets: the runs holding a slot,
    with their status and age, and the steps waiting. A STARTED run that holds a slot for long may have lost its
    worker (run monitoring ends it, or force termination in the UI); an ended one frees its slot shortly, if a daemon
    runs: without one, the holder's line names the ``precompute pools free`` that frees it."""
    now = time.time() if now is None else now
    rows = []
    for pool in _pools(defs):
        info = instance.event_log_storage.get_concurrency_info(pool)
        holders = []
        for run_id in sorted(info.active_run_ids):
            record = instance.get_run_record_by_id(run_id)
            if record is None:
                holders.append(f"run {run_id[:8]} (deleted; `precompute pools free` frees it)")
                continue
            if record.end_time:
                age = f"ended {_duration(now - record.end_time)} ago"
                if now - record.end_time > FREE_SLOTS_AFTER_END_S:
                    age += " (no daemon freed it: `precompute pools free` does)"
            else:
                held_s = now - (record.start_time or record.create_timestamp.timestamp())
                age = f"for {_duration(held_s)}"
                if held_s > LONG_HOLD_S:
                    age += f" (if its worker is gone: `precompute pools free --run {run_id[:8]}`)"
            holders.append(f"run {run_id[:8]} {record.dagster_run.status.value} {age}")
        waiting = f"; {info.pending_step_count} step(s) waiting" if info.pending_step_count else ""
        rows.append((pool, f"held by {', '.join(holders)}{waiting}" if holders else f"free{waiting}"))
    return rows


RUNS_SHOWN = 20  # runs in progress that ``precompute status`` lists, the longest running first


def runs_in_progress(instance: dg.DagsterInstance, *, now: float | None = None) -> list[tuple[str, str]]:
    """``(status, "ID job for DURATION")`` for each run in progress (STARTING, STARTED, CANCELING), the longest
    running first, at most ``RUNS_SHOWN`` and a line for the rest. Each holds one of ``dagster.yaml``'s run slots: a
    worker killed without a daemon leaves its run STARTED, queued runs wait behind it until run monitoring's max
    runtime, and the whole ID here is what ``precompute pools free --run`` takes for a run that holds no pool slot."""
    now = time.time() if now is None else now
    records = instance.get_run_records(dg.RunsFilter(statuses=IN_PROGRESS))
    records.sort(key=lambda record: record.start_time or record.create_timestamp.timestamp())
    rows = []
    for record in records[:RUNS_SHOWN]:
        held_s = now - (record.start_time or record.create_timestamp.timestamp())
        line = f"{record.dagster_run.run_id} {record.dagster_run.job_name} for {_duration(held_s)}"
        if held_s > LONG_HOLD_S:
            line += " (if its worker is gone: `precompute pools free --run ID` fails it and frees its slots)"
        rows.append((record.dagster_run.status.value, line))
    if len(records) > RUNS_SHOWN:
        rows.append(("...", f"{len(records) - RUNS_SHOWN} more runs in progress (the UI's Runs page lists them)"))
    return rows


def free_pool_slots(instance: dg.DagsterInstance, defs: dg.Definitions, *, run: str | None = None) -> dict:
    """Free the pool slots no running worker will free: those of runs that ended or were deleted (the daemon's run
    monitoring frees them ``FREE_SLOTS_AFTER_END_S`` after the end; without a daemon, after ``dagster asset
    materialize`` was killed, nothing does, and every later run of the pool waits for good). With ``run`` (a run ID
    or its first characters, as ``precompute status`` shows it), that run's too, after marking it failed if it has
    not ended: what the UI's force termination does, for a run whose worker is gone; ``run`` may also be the whole ID
    of a run in progress that holds no pool slot, which still holds one of the run slots. ``ValueError`` when ``run``
    names no such run, or several (listing the runs in progress). Returns ``{"freed": [...], "held": [...]}``, each
    run with its pools and status."""
    holders: dict[str, list[str]] = {}
    for pool in _pools(defs):
        for run_id in instance.event_log_storage.get_concurrency_info(pool).active_run_ids:
            holders.setdefault(run_id, []).append(pool)
    chosen = None
    if run is not None:
        matches = [run_id for run_id in holders if run_id.startswith(run.strip())] if run.strip() else []
        going = []
        if not matches and run.strip():  # a run in progress that holds no pool slot, but one of the run slots:
            # named by its whole ID only (a prefix could name a healthy run, which its worker would then go on with)
            going = instance.get_runs(dg.RunsFilter(statuses=IN_PROGRESS))
            matches = [r.run_id for r in going if r.run_id == run.strip()]
            holders.update((run_id, []) for run_id in matches)
        if len(matches) != 1:
            shown = ", ".join(run_id[:8] for run_id in sorted(holders)) or "none"
            progress = ", ".join(f"{r.run_id} ({r.job_name})" for r in going[:20]) or "none"
            what = "several runs" if matches else "no run"
            raise ValueError(
                f"{what} holding a pool slot start with {run!r} (runs holding one: {shown}), nor is it the whole ID of "
                f"a run in progress (runs in progress: {progress})"
            )
        chosen = matches[0]
    freed, held = [], []
    for run_id, pools in sorted(holders.items()):
        record = instance.get_run_record_by_id(run_id)
        status = "deleted" if record is None else record.dagster_run.status.value
        entry = {"run": run_id, "pools": pools, "status": status}
        running = record is not None and not record.dagster_run.is_finished
        if running and run_id != chosen:
            held.append(entry)
            continue
        if running:
            held_what = "a pool slot" if pools else "a run slot"
            instance.report_run_failed(record.dagster_run, message="marked failed by `precompute pools free --run`: "
                                       f"its worker is gone, and it held {held_what}")  # fmt: skip
            entry["status"] = f"{status} -> FAILURE"
        instance.event_log_storage.free_concurrency_slots_for_run(run_id)
        freed.append(entry)
    return {"freed": freed, "held": held}


def _duration(seconds: float) -> str:
    minutes = max(0, int(seconds // 60))
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min"
