"""Precompute tasks: a small registry of task types, the sensor that turns user events into prioritised task runs,
and the op that computes a task type for its entities and writes the values to Redis as live values.

A task type (``TaskType``) is a name (also the cache kind its values are read under, unless ``kind`` says
otherwise), a function from an entity to a value (``compute(entity, ctx)``), a TTL, a priority (1-10: the run's
``dagster/priority``) and a batch size (entities per run). Built in:

- ``ctr`` (priority 8): a newly uploaded creative's CTR from the current approved ``ctr_model`` (its features from
  the lake's ``ads`` table); ``cache.get("ctr", creative_id)``.
- ``next_actions`` (7): a user's next-action probabilities from the approved ``next_action_model``, from the user's
  latest events in the stream; ``cache.get("next_actions", user)`` -> ``{"probabilities": {action: p}, ...}``.
- ``dashboard`` (3): a tenant's summary of the last 24 hours of query logs; ``cache.get("dashboard", tenant)``.

Which events imply which tasks is the registry's too (``on_event``): ``campaign_create`` -> the tenant's dashboard
and the user's next actions at priority 9, ``creative_upload`` -> ``ctr`` of the creative (8), ``login`` -> the
user's ``next_actions`` (7) and the tenant's ``dashboard`` (3, a refresh). Predicted actions (``on_predicted``): when
the model gives a user's next action a probability of at least the sensor's confidence (0.5), the tasks that action
needs are requested as background work (1): ``dashboard_view`` and ``analytics_view`` -> the tenant's dashboard.

Live values are written with their type's TTL. ``live_refresh_sensor`` (every minute) keeps the hot ones warm: the
keys of registered task types that had hits in the query log in the last 10 minutes and whose live value has less
than 20 % of its type's TTL left are requested again as runs at priority 3 (refresh); keys nobody read lately (the
cold tail) are left to expire (``serving.refresh``, ``plan_refresh``).

Your own task types live in your own module: call ``register_task_type`` (and ``on_event`` / ``on_predicted``)
there, and name the module in an entry point of the group ``precompute_assets.task_types`` so that every process
(the sensor's code location and the run workers) imports it; ``task_registry()`` loads the entry points once.
"""

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib.metadata import entry_points
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd
import psycopg2
import redis as redis_py
from pydantic import Field

from ..ml import ctr, next_action
from ..serving import refresh
from ..serving.connection import REDIS_ERRORS
from ..serving.events import (
    ACTION_INDEX,
    UserStatesSpan,
    events_stream,
    read_event_window,
    read_events_after,
    read_user_states,
    read_user_states_span,
    server_mark,
    validate_event,
    write_user_states,
)
from ..serving.keys import KIND_PATTERN, RESERVED_KINDS, KeySchema, check_key, codec_for
from ..serving.publish import FENCED_ATTEMPTS, InvalidatedMeanwhile, read_epoch, write_live_values
from ..serving.querylog import cut_after, stream_ms
from ..stack import ENV_APP_DB
from .campaigns import CTR_KIND, approved_model_version
from .models import CTR_MODEL
from .resources import (
    CampaignRegistryResource,
    DeploymentResource,
    LakeResource,
    ModelStoreResource,
    RedisResource,
    failing_clearly_when_full,
    missing_model,
)
from .runs import RERUN_IF_WORKER_DIES
from .user_events import NEXT_ACTION_MODEL, approved_next_action_version

PRIORITY_TAG = "dagster/priority"
TASK_TAG = "precompute/task"
ENTRY_POINT_GROUP = "precompute_assets.task_types"
ENTITY_FIELDS = ("entity", "user", "tenant")
DEFAULT_CONFIDENCE = 0.5
BACKGROUND_PRIORITY = 1
JOB_NAME = "precompute_tasks_job"
OP_NAME = "run_precompute_task"
# The whole run is retried when Redis refuses the write or every entity failed (1 s, 2 s, 4 s); a failing entity is
# retried inside the run first (TaskRunConfig.max_retries, backoff_s), and a codec error is never retried.
TASK_RETRY = dg.RetryPolicy(max_retries=3, delay=1, backoff=dg.Backoff.EXPONENTIAL)
MAX_TASK_RETRIES = 10  # retry rounds inside a run ...
MAX_TASK_BACKOFF_S = 60.0  # ... after at most this long before the first, doubled for each next (a sleep is capped)

log = logging.getLogger(__name__)


class TaskValueError(TypeError):
    """A task returned a value its kind's codec cannot encode."""


@dataclass(frozen=True)
class TaskType:
    """A kind of precomputed value: ``compute(entity, ctx)`` returns the value of one entity."""

    name: str
    compute: Callable[[str, "TaskContext"], Any]
    ttl_s: int
    priority: int
    batch_size: int = 500
    kind: str | None = None  # the cache kind its values are written under (default: the name)
    description: str = ""

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.name, str) or not KIND_PATTERN.fullmatch(self.name):
            problems.append(f"name {self.name!r} must be lower-case letters, digits and '_' (max 64)")
        kind = self.cache_kind if isinstance(self.name, str) else None
        if kind is not None and (not KIND_PATTERN.fullmatch(kind) or kind in RESERVED_KINDS):
            problems.append(f"kind {kind!r} is not a valid cache kind")
        if not callable(self.compute):
            problems.append("compute must be a function (entity, ctx) -> value")
        if not isinstance(self.ttl_s, int) or isinstance(self.ttl_s, bool) or self.ttl_s < 1:
            problems.append(f"ttl_s must be a positive number of seconds, got {self.ttl_s!r}")
        if not isinstance(self.priority, int) or isinstance(self.priority, bool) or not 1 <= self.priority <= 10:
            problems.append(f"priority must be an integer from 1 to 10, got {self.priority!r}")
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) or self.batch_size < 1:
            problems.append(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if problems:
            raise ValueError(f"invalid task type {self.name!r}: " + "; ".join(problems))

    @property
    def cache_kind(self) -> str:
        return self.kind or self.name


@dataclass(frozen=True)
class Trigger:
    """An event (or a predicted next action) of ``action`` requests ``task`` for the event's ``entity_field``
    (``entity``, ``user`` or ``tenant``) at ``priority`` (None: the task type's own)."""

    action: str
    task: str
    entity_field: str
    priority: int | None = None


class TaskRegistry:
    """Task types by name, and which events (and predicted next actions) request which of them."""

    def __init__(self) -> None:
        self.types: dict[str, TaskType] = {}
        self.triggers: dict[str, list[Trigger]] = {}
        self.predicted: dict[str, list[Trigger]] = {}

    def register(self, task_type: TaskType, *, replace: bool = False) -> TaskType:
        if not isinstance(task_type, TaskType):
            raise TypeError(f"register a TaskType, got {type(task_type).__name__}")
        if task_type.name in self.types and not replace and self.types[task_type.name] != task_type:
            raise ValueError(f"task type {task_type.name!r} is already registered (pass replace=True to replace it)")
        self.types[task_type.name] = task_type
        return task_type

    def get(self, name: str) -> TaskType:
        try:
            return self.types[name]
        except KeyError:
            raise KeyError(f"unknown task type {name!r}; registered: {', '.join(sorted(self.types))}") from None

    def on_event(self, action: str, task: str, *, entity: str = "entity", priority: int | None = None) -> Trigger:
        """Request ``task`` for the ``entity`` field (``entity``, ``user``, ``tenant``) of every ``action`` event."""
        return self._add(self.triggers, Trigger(action, task, entity, priority))

    def on_predicted(
        self, action: str, task: str, *, entity: str = "user", priority: int | None = BACKGROUND_PRIORITY
    ) -> Trigger:
        """Request ``task`` when a user's predicted next action is ``action`` (above the sensor's confidence), for
        the ``user`` or ``tenant`` of the user's latest event (background priority 1 unless given)."""
        if entity not in ("user", "tenant"):
            raise ValueError("a predicted action has no entity yet: request a task of its user or tenant")
        return self._add(self.predicted, Trigger(action, task, entity, priority))

    @staticmethod
    def _add(table: dict[str, list[Trigger]], trigger: Trigger) -> Trigger:
        if trigger.entity_field not in ENTITY_FIELDS:
            raise ValueError(f"entity must be one of {ENTITY_FIELDS}, got {trigger.entity_field!r}")
        if trigger.priority is not None and not (isinstance(trigger.priority, int) and 1 <= trigger.priority <= 10):
            raise ValueError(f"priority must be an integer from 1 to 10, got {trigger.priority!r}")
        if trigger.action not in ACTION_INDEX:
            raise ValueError(f"unknown action {trigger.action!r}: one of {', '.join(ACTION_INDEX)}")
        rules = table.setdefault(trigger.action, [])
        if trigger not in rules:
            rules.append(trigger)
        return trigger

    def priority_of(self, trigger: Trigger) -> int:
        return trigger.priority if trigger.priority is not None else self.get(trigger.task).priority


# --- running a task type -------------------------------------------------------------------------------


@dataclass
class TaskContext:
    """What a task function may use: the run's entities and clock, the resources, and ``memo`` to load a model or
    a table once per run (a factory that raised is tried again in the next retry round)."""

    task: TaskType
    entities: list[str]
    now_ms: int
    instance: dg.DagsterInstance | None = None
    redis: RedisResource | None = None
    lake: LakeResource | None = None
    model_store: ModelStoreResource | None = None
    deployment: DeploymentResource | None = None
    log: Any = field(default=log)
    _memo: dict[str, Any] = field(default_factory=dict)

    def memo(self, name: str, factory: Callable[[], Any]) -> Any:
        if name not in self._memo:
            try:
                self._memo[name] = (True, factory())
            except Exception as error:  # remembered for this round only: every entity fails fast with it
                self._memo[name] = (False, error)
        ok, value = self._memo[name]
        if not ok:
            raise value
        return value

    def new_round(self) -> None:
        """Forget failed loads, so a retry round tries them again."""
        self._memo = {k: v for k, v in self._memo.items() if v[0]}

    def forget(self) -> None:
        """Forget every load: what was read before an invalidation of the kind is read again."""
        self._memo = {}


class TaskUnavailable(LookupError):
    """Raised by a task function, or a loader it memoizes, when no retry can help (no approved model): its entity is
    not retried, and a run in which every entity failed so fails without Dagster's retries."""


@dataclass
class TaskOutcome:
    values: dict[str, Any]
    failed: dict[str, str]  # entity -> the last error
    retries: int  # retry rounds run
    encode_errors: dict[str, str] = field(default_factory=dict)
    unavailable: set[str] = field(default_factory=set)  # the failed entities whose error was TaskUnavailable


def compute_task(
    ctx: TaskContext,
    *,
    max_retries: int = 3,
    backoff_s: float = 0.5,
    sleep: Callable[[float], None] = time.sleep,
) -> TaskOutcome:
    """``ctx.task.compute`` for every entity; entities whose call raised are retried in rounds after
    ``backoff_s``, 2x, 4x... while the others keep their values; then every value is encoded with the kind's codec
    (a value it cannot encode is an ``encode_errors`` entry naming the type and entity)."""
    task, values, failed, unavailable = ctx.task, {}, {}, set()
    pending, rounds = list(dict.fromkeys(ctx.entities)), 0
    while True:
        for entity in pending:
            try:
                values[entity] = task.compute(entity, ctx)
                failed.pop(entity, None)
            except Exception as error:  # a task function's failure is its entity's, never the batch's
                failed[entity] = f"{type(error).__name__}: {error}"
                if isinstance(error, TaskUnavailable):
                    unavailable.add(entity)
        pending = [e for e in pending if e in failed and e not in unavailable]
        if not pending or rounds >= max_retries:
            break
        sleep(min(backoff_s * 2**rounds, MAX_TASK_BACKOFF_S))
        rounds += 1
        ctx.new_round()
    codec, encode_errors = codec_for(task.cache_kind), {}
    for entity in list(values):
        try:
            raw = codec.encode(values[entity])
            if codec.name == "f32" and not math.isfinite(codec.decode(raw)):
                raise ValueError("not a finite number")
            if codec.name == "json":  # NaN and Infinity are not JSON: readers in other languages refuse them
                json.dumps(values[entity], allow_nan=False)
        except (TypeError, ValueError, OverflowError) as error:
            del values[entity]
            encode_errors[entity] = (
                f"task type {task.name!r} returned a value for entity {entity!r} that codec {codec.name!r} of kind "
                f"{task.cache_kind!r} cannot encode: {type(error).__name__}: {error}"
            )
    return TaskOutcome(values, failed, rounds, encode_errors, unavailable)


def publish_task_values(
    redis: RedisResource, task: TaskType, values: dict[str, Any], now_s: float, *, epoch: bytes | None = None
) -> int:
    """Write ``values`` as live values of the task's kind, expiring ``ttl_s`` from ``now_s`` (or later where a key
    already lives longer), in one transaction: readable with ``PredictionCache.get(kind, entity)``. ``epoch``: the
    kind's invalidation epoch read before computing them (``InvalidatedMeanwhile`` when it moved since)."""
    expire_at = int(now_s) + task.ttl_s
    client, schema = redis.client(), redis.schema()
    outcome = f"no values of task {task.name} written"
    with failing_clearly_when_full(client, outcome, "Readers compute them live meanwhile."):
        return write_live_values(
            client, task.cache_kind, values.items(), expire_at=expire_at, schema=schema, epoch=epoch
        )


class TaskRunConfig(dg.Config):
    task_type: str = Field(description="A registered task type (precompute_assets.defs.tasks).")
    entities: list[str] = Field(description="The entities (users, creatives, tenants) to compute.")
    max_retries: int = Field(3, description="Retries of an entity whose task function raises (0 to 10).")
    backoff_s: float = Field(
        0.5, description="Seconds before the first retry (0 to 60), doubled for each next, at most 60 s each."
    )
    as_of_ms: int | None = Field(
        None, description="'now' for tasks that look back (a dashboard's 24 hours), in ms; null: the wall clock."
    )


@dg.op(
    name=OP_NAME,
    out=dg.Out(dg.Nothing),
    retry_policy=TASK_RETRY,
    description="Compute one task type for its entities (retrying failed entities with backoff) and write the values "
    "to Redis as live values with the type's TTL; ctr values of ads an active campaign's warming holds are left to it.",
)
def run_precompute_task(
    context: dg.OpExecutionContext,
    config: TaskRunConfig,
    redis: RedisResource,
    lake: LakeResource,
    model_store: ModelStoreResource,
    deployment: DeploymentResource,
    campaign_registry: CampaignRegistryResource,
):
    started = time.perf_counter()
    # NaN and infinity too (an infinite backoff raised OverflowError from sleep, retried 3 times; 30 retries slept
    # for years): the same config fails the same way again
    if not 0 <= config.max_retries <= MAX_TASK_RETRIES or not 0 <= config.backoff_s <= MAX_TASK_BACKOFF_S:
        raise dg.Failure(
            description=f"max_retries must be 0 to {MAX_TASK_RETRIES} and backoff_s 0 to {MAX_TASK_BACKOFF_S:.0f} "
            f"seconds, got {config.max_retries} and {config.backoff_s}",
            allow_retries=False,
        )
    try:
        task = task_registry().get(config.task_type)
    except KeyError as error:  # a module that registers it is not loaded here: retrying cannot help
        raise dg.Failure(description=str(error.args[0]), allow_retries=False) from None
    entities = list(dict.fromkeys(config.entities))
    bad = []
    for entity in entities:
        try:
            check_key(entity)
        except ValueError as error:
            bad.append(str(error))
    if bad:
        raise dg.Failure(description=f"task {task.name}: {len(bad)} invalid entities: {bad[:3]}", allow_retries=False)
    now_ms = config.as_of_ms if config.as_of_ms is not None else time.time_ns() // 1_000_000
    ctx = TaskContext(task, entities, now_ms, context.instance, redis, lake, model_store, deployment, context.log)
    # Fenced by the kind's invalidation epoch, as get_or_compute's stores are: values computed before an
    # invalidation of the kind are computed again rather than written after it, for their whole TTL (h_inval).
    for attempt in range(1, FENCED_ATTEMPTS + 1):
        epoch = redis.sensor_check(lambda client, schema: read_epoch(client, schema, task.cache_kind), context.log,
                                   f"the invalidation epoch of {task.cache_kind}")  # fmt: skip
        outcome = compute_task(ctx, max_retries=config.max_retries, backoff_s=config.backoff_s)
        held = leave_campaign_values(outcome.values, task, campaign_registry, context.log)
        try:
            written = (
                publish_task_values(redis, task, outcome.values, time.time(), epoch=epoch) if outcome.values else 0
            )
            break
        except InvalidatedMeanwhile:
            context.log.warning(f"task {task.name}: {task.cache_kind} was invalidated while computing (attempt "
                                f"{attempt} of {FENCED_ATTEMPTS}): nothing written")  # fmt: skip
            ctx.forget()  # its loads (a model, scores, states) may be what was invalidated: read again (h_diff)
    else:
        raise dg.Failure(
            description=f"task {task.name}: {task.cache_kind} was invalidated during each of {FENCED_ATTEMPTS} "
            "computations: nothing written (readers compute live meanwhile)",
            allow_retries=False,  # something keeps invalidating it: the next request of the entities computes again
        )
    for entity, error in list(outcome.failed.items())[:20]:
        context.log.warning(f"task {task.name} failed for {entity} after {outcome.retries} retries: {error}")
    metadata = {
        "task_type": task.name,
        "kind": task.cache_kind,
        "entities": len(entities),
        "written": written,
        "campaign_held": held,
        "failed": len(outcome.failed),
        "failed_entities": dg.MetadataValue.json(dict(list(outcome.failed.items())[:20])),
        "encode_errors": len(outcome.encode_errors),
        "retry_rounds": outcome.retries,
        "ttl_s": task.ttl_s,
        "seconds": time.perf_counter() - started,
    }
    left = f", {held} left to the campaigns that hold them" if held else ""
    context.log.info(f"task {task.name}: {written} of {len(entities)} written{left}, {len(outcome.failed)} failed")
    if outcome.encode_errors:
        first = next(iter(outcome.encode_errors.values()))
        raise dg.Failure(
            description=f"{first} ({len(outcome.encode_errors)} such values; the other {written} were published)",
            metadata=metadata,
            allow_retries=False,
        )
    if entities and not written and not held and outcome.failed:
        first_entity, first_error = next(iter(outcome.failed.items()))
        raise dg.Failure(
            description=f"task {task.name} failed for all {len(entities)} entities, e.g. {first_entity}: {first_error}",
            metadata=metadata,
            allow_retries=not outcome.failed.keys() <= outcome.unavailable,  # a retry cannot find a missing model
        )
    yield dg.Output(None, metadata=metadata)


def leave_campaign_values(
    values: dict[str, Any], task: TaskType, campaign_registry: CampaignRegistryResource, log: logging.Logger
) -> int:
    """Take out of a ``ctr`` task's ``values`` the ads whose keys an active campaign's warming holds
    (``held_by_campaigns``), right before they are written: a run requested before the warming and run after it
    wrote the lake's CTR over the campaign's for the task's TTL (the sensors check only when they request it). How
    many; a registry that does not answer takes none out, with a warning. Other kinds: 0, the registry not read."""
    if task.cache_kind != CTR_KIND or not values:
        return 0
    held = held_by_campaigns(campaign_registry, sorted(values), log, unanswered="write") or set()
    for ad in held:
        del values[ad]
    return len(held)


@dg.job(
    name=JOB_NAME,
    description="Compute one precompute task type for a batch of entities into Redis.",
    # One step: in the run's own process. A step process would import the code location a second time, seconds
    # that a user who just logged in would wait for (whichever executor the other jobs use).
    executor_def=dg.in_process_executor,
)
def precompute_tasks_job():
    run_precompute_task()


def task_run_config(task: str, entities: list[str], **options: Any) -> dict:
    return {"ops": {OP_NAME: {"config": {"task_type": task, "entities": entities, **options}}}}


def task_run_stats(
    instance: dg.DagsterInstance,
    tasks: Iterable[str],
    *,
    window_s: float,
    now_s: float | None = None,
    limit: int = 1000,
) -> dict[str, dict]:
    """Per task type, from Dagster's run storage: ``queued`` (queued or not yet started), ``running``, and over
    the last ``window_s`` the runs that ended: ``succeeded``, ``failed``, ``avg_run_s`` / ``max_run_s`` (start to
    end; None without one). At most ``limit`` ended runs per type are read (``ended_sampled`` says when more)."""
    now_s = time.time() if now_s is None else now_s
    since = datetime.fromtimestamp(now_s - window_s, UTC)
    out = {}
    status = dg.DagsterRunStatus
    for task in sorted(set(tasks)):
        tags = {TASK_TAG: task}
        records = instance.get_run_records(
            dg.RunsFilter(tags=tags, statuses=[status.SUCCESS, status.FAILURE], updated_after=since),
            limit=limit,
        )
        ended = [r for r in records if r.end_time is not None and r.end_time >= now_s - window_s]
        seconds = [r.end_time - r.start_time for r in ended if r.start_time is not None]
        out[task] = {
            "queued": instance.get_runs_count(dg.RunsFilter(tags=tags, statuses=[status.QUEUED, status.NOT_STARTED])),
            "running": instance.get_runs_count(dg.RunsFilter(tags=tags, statuses=[status.STARTING, status.STARTED])),
            "succeeded": sum(r.dagster_run.status == status.SUCCESS for r in ended),
            "failed": sum(r.dagster_run.status == status.FAILURE for r in ended),
            "avg_run_s": round(sum(seconds) / len(seconds), 3) if seconds else None,
            "max_run_s": round(max(seconds), 3) if seconds else None,
            "ended_sampled": len(records) >= limit,
        }
    return out


# --- the built-in task types ---------------------------------------------------------------------------


def _ctr_scores(ctx: TaskContext) -> dict[str, float]:
    try:
        version = approved_model_version(ctx.instance)
    except dg.Failure as error:  # none approved
        raise TaskUnavailable(error.description) from None
    model = _load(ctx, CTR_MODEL, version)
    try:
        ads = ctx.lake.lake().read("ads")
    except FileNotFoundError as error:  # no ads loaded yet: no retry finds a creative's features
        raise TaskUnavailable(f"{error} (load the ads first: precompute ads load)") from None
    known = set(ads["ad_id"].astype(str))
    frame, _ = ctr.score_ads(model, ads, [e for e in ctx.entities if e in known])
    return dict(zip(frame["ad_id"].tolist(), frame["ctr"].tolist(), strict=True))


def creative_ctr(entity: str, ctx: TaskContext) -> float:
    """The creative's CTR from the approved ``ctr_model`` (the whole batch is scored once)."""
    scores = ctx.memo("ctr_scores", lambda: _ctr_scores(ctx))
    if entity not in scores:  # no retry helps (the batch was scored once): not retried, nor the run if all are so
        raise TaskUnavailable(
            f"creative {entity!r} has no valid features in the lake's ads table (load it first: precompute ads load)"
        )
    return float(scores[entity])


def _recent_query_logs(ctx: TaskContext, hours: int = 24) -> pd.DataFrame:
    partitions = (ctx.deployment or DeploymentResource()).partitions().hourly
    end = datetime.fromtimestamp(ctx.now_ms / 1000, UTC)
    window = dg.TimeWindow(end - timedelta(hours=hours), end)
    lake, frames = ctx.lake.lake(), []
    for key in partitions.get_partition_keys_in_time_window(window):
        if lake.exists("query_logs", key):
            frames.append(lake.read("query_logs", key, columns=["kind", "key", "hit", "user", "tenant"]))
    if not frames:
        return pd.DataFrame({"kind": [], "key": [], "hit": pd.Series(dtype=bool), "user": [], "tenant": []})
    return pd.concat(frames, ignore_index=True)


def tenant_dashboard(entity: str, ctx: TaskContext) -> dict:
    """The tenant's last 24 hours of prediction queries: volume, hit rate, users, per kind, top keys."""
    logs = ctx.memo("query_logs_24h", lambda: _recent_query_logs(ctx))
    mine = logs[logs["tenant"] == entity]
    top = mine["key"].value_counts().head(5)
    return {
        "tenant": entity,
        "as_of_ms": ctx.now_ms,
        "hours": 24,
        "queries": len(mine),
        "hit_rate": round(float(mine["hit"].mean()), 4) if len(mine) else None,
        "users": int(mine["user"].nunique()),
        "by_kind": {str(k): int(v) for k, v in mine["kind"].value_counts().items()},
        "top_keys": [[str(k), int(v)] for k, v in top.items()],
    }


def _next_action_model(ctx: TaskContext) -> tuple[str, next_action.NextActionModel]:
    version = approved_next_action_version(ctx.instance)
    if version is None:
        raise TaskUnavailable("no approved next_action_model: materialize next_action_model first")
    return version, _load(ctx, NEXT_ACTION_MODEL, version)


def _load(ctx: TaskContext, name: str, version: str) -> Any:
    """The approved model ``version``; one the store lacks (restored from an older backup) is ``TaskUnavailable``, as
    ``ModelStoreResource.load`` fails an asset's step: no retry brings it back."""
    try:
        return ctx.model_store.store().load(name, version)
    except KeyError as error:
        raise TaskUnavailable(missing_model(error, name)) from None


def _user_states(ctx: TaskContext, timezone: str, hours: int = 24) -> pd.DataFrame:
    """The latest state of each of the batch's users with events in the last ``hours``: the state
    ``user_event_sensor`` stored (``next_action.UserState``) carried on over the events after it, when the sensor's
    span of stored states holds the state's whole day and session (``UserState.whole_since``); else, for that user,
    the last ``hours`` of the event stream. With every user's state whole, only the seconds since the sensor's tick
    are read, not the whole window. A Redis error reading the states is as if none were stored."""
    client, schema, since = ctx.redis.client(), ctx.redis.schema(), ctx.now_ms - hours * 3_600_000
    users = list(dict.fromkeys(ctx.entities))
    try:
        span = read_user_states_span(client, schema)
        found = read_user_states(client, schema, users, next_action.UserState.FIELDS) if span is not None else {}
    except REDIS_ERRORS as error:  # the publisher's ACL user of an older apply, say: the whole read
        ctx.log.warning(f"stored user states not read ({type(error).__name__}: {error}): reading {hours} h of events")
        span, found = None, {}
    parsed = {user: next_action.UserState.parse(values) for user, values in found.items()}
    stored = {
        user: state
        for user, state in parsed.items()
        if state is not None and state.ts_ms >= since and state.whole_since(span.since_ms, timezone)
    }
    start = since if len(stored) < len(users) else max(since, min(stream_ms(s.stream_id) for s in stored.values()))
    wanted, rows = set(users), []
    for page in read_event_window(client, schema, start, ctx.now_ms + 1):
        for entry_id, fields in page:
            if fields.get(b"user", b"").decode("utf-8", "replace") in wanted:
                row, _ = validate_event(entry_id, fields)
                if row is not None:
                    rows.append(row)
    frame = pd.DataFrame(rows, columns=["stream_id", "ts_ms", "user", "action", "tenant"])
    states = next_action.latest_states(frame, timezone, prior=stored)
    seen = set(states["user"].tolist())
    quiet = {user: state for user, state in stored.items() if user not in seen}  # no event since
    if quiet:
        states = pd.concat([states, next_action.state_rows(quiet, timezone)], ignore_index=True)
    return states.set_index("user")


def user_next_actions(entity: str, ctx: TaskContext) -> dict:
    """The user's next-action probabilities after their latest event (a user without events today: as if they
    had just logged in now)."""
    version, model = ctx.memo("next_action_model", lambda: _next_action_model(ctx))
    states = ctx.memo("user_states", lambda: _user_states(ctx, model.timezone))
    if entity in states.index:
        state = states.loc[[entity]]
    else:
        now = pd.Timestamp(ctx.now_ms, unit="ms", tz="UTC").tz_convert(model.timezone)
        state = pd.DataFrame(
            {"hour": [now.hour + now.minute / 60], "day_of_week": [now.dayofweek], "action": ["login"],
             "actions_today": [1], "session_minutes": [0.0]}
        )  # fmt: skip
    proba = next_action.probabilities(model, state)[0]
    return {"model_version": version, "as_of_ms": ctx.now_ms, "probabilities": proba}


def builtin_registry() -> TaskRegistry:
    """The registry with the built-in task types and triggers."""
    registry = TaskRegistry()
    registry.register(TaskType("ctr", creative_ctr, ttl_s=7 * 86_400, priority=8, batch_size=1000,
                               description="CTR of a newly uploaded creative from the approved ctr_model"))  # fmt: skip
    registry.register(TaskType("next_actions", user_next_actions, ttl_s=3_600, priority=7, batch_size=500,
                               description="a user's next-action probabilities"))  # fmt: skip
    registry.register(TaskType("dashboard", tenant_dashboard, ttl_s=900, priority=3, batch_size=200,
                               description="a tenant's summary of the last 24 hours of query logs"))  # fmt: skip
    registry.on_event("campaign_create", "dashboard", entity="tenant", priority=9)
    registry.on_event("campaign_create", "next_actions", entity="user", priority=9)
    registry.on_event("creative_upload", "ctr", entity="entity")
    registry.on_event("login", "next_actions", entity="user")
    registry.on_event("login", "dashboard", entity="tenant")
    registry.on_predicted("dashboard_view", "dashboard", entity="tenant")
    registry.on_predicted("analytics_view", "dashboard", entity="tenant")
    return registry


REGISTRY = builtin_registry()
_entry_points_loaded = False
# The sensor daemon ticks user_event_sensor and live_refresh_sensor in threads of one code server: a thread that came
# second must wait until the first has loaded the entry points, not plan its tick without their task types.
# Reentrant: a module an entry point names may call task_registry() itself while it loads.
_entry_points_lock = threading.RLock()


def load_entry_points(group: str = ENTRY_POINT_GROUP) -> list[str]:
    """Import every module named by an entry point of ``group`` (they register their task types); returns the
    names loaded. A module that fails to import is logged and skipped, never a broken code location."""
    loaded = []
    for point in entry_points(group=group):
        try:
            target = point.load()
            if callable(target):
                target(REGISTRY)  # an entry point may name a function taking the registry
            loaded.append(point.name)
        except Exception:
            log.exception(f"task type entry point {point.name!r} ({point.value}) failed to load")
    return loaded


def task_registry() -> TaskRegistry:
    """The process's registry: the built-ins, entry points (loaded once) and whatever ``register_task_type`` added."""
    global _entry_points_loaded
    with _entry_points_lock:
        if not _entry_points_loaded:
            _entry_points_loaded = True  # first: the loading thread's own calls return at once
            load_entry_points()
    return REGISTRY


def register_task_type(
    name: str,
    compute: Callable[[str, "TaskContext"], Any],
    *,
    ttl_s: int,
    priority: int,
    batch_size: int = 500,
    kind: str | None = None,
    description: str = "",
    replace: bool = False,
) -> TaskType:
    """Add a task type to the process's registry (from your own module; see the module docstring)."""
    return REGISTRY.register(TaskType(name, compute, ttl_s, priority, batch_size, kind, description), replace=replace)


def on_event(action: str, task: str, *, entity: str = "entity", priority: int | None = None) -> Trigger:
    return REGISTRY.on_event(action, task, entity=entity, priority=priority)


def on_predicted(
    action: str, task: str, *, entity: str = "user", priority: int | None = BACKGROUND_PRIORITY
) -> Trigger:
    return REGISTRY.on_predicted(action, task, entity=entity, priority=priority)


# --- the sensor ----------------------------------------------------------------------------------------

_MODELS: dict[str, next_action.NextActionModel] = {}  # loaded once per process and version


@dataclass
class TickPlan:
    """What one tick over some events asks for: ``wanted[(task, entity)] = priority``, and counts."""

    wanted: dict[tuple[str, str], int] = field(default_factory=dict)
    states: dict[str, next_action.UserState] = field(default_factory=dict)  # each predicted user's, to carry on
    events: int = 0
    malformed: int = 0
    no_entity: int = 0
    predicted: int = 0
    stale: int = 0  # tasks not asked: their event is older than the task type's TTL (``plan_events``' ``now_ms``)

    def want(self, task: str, entity: str, priority: int) -> None:
        key = (task, entity)
        if self.wanted.get(key, 0) < priority:
            self.wanted[key] = priority


def _valid_entity(value: Any) -> bool:
    if not value:
        return False
    try:
        check_key(value)
    except ValueError:
        return False
    return True


def plan_events(
    registry: TaskRegistry,
    entries: Iterable[tuple[bytes, dict[bytes, bytes]]],
    *,
    model: next_action.NextActionModel | None = None,
    confidence: float = DEFAULT_CONFIDENCE,
    prior: Callable[[list[str]], Mapping[str, next_action.UserState]] | None = None,
    timezone: str = "UTC",
    now_ms: int | None = None,
) -> TickPlan:
    """The task requests implied by ``entries`` (raw stream entries): each valid event's triggers, then for each
    user's latest event the tasks its predicted next actions (probability >= ``confidence``) need.

    ``prior(users)``: the states the users' earlier events left (``next_action.latest_states``), so that a user's
    state is that of their whole day, not of this tick's events alone; ``plan.states`` then holds every user's new
    one, with or without a model (counted in the model's time zone, else ``timezone``).

    ``now_ms``: the time of the tick. A task whose event arrived (its stream ID) longer ago than the task type's TTL
    is not asked, but counted in ``stale``: its value, computed on time, would have expired by now. A sensor that
    was off for a day (or a daemon down) read a day of logins and asked each one's next actions and dashboard."""
    plan, rows = TickPlan(), []

    def past(task: str, arrived_ms: int) -> bool:
        return now_ms is not None and now_ms - arrived_ms > registry.types[task].ttl_s * 1000

    for entry_id, fields in entries:
        plan.events += 1
        row, _ = validate_event(entry_id, fields)
        if row is None:
            plan.malformed += 1
            continue
        rows.append(row)
        for trigger in registry.triggers.get(row["action"], ()):
            if trigger.task not in registry.types:
                continue
            entity = row[trigger.entity_field]
            if not _valid_entity(entity):
                plan.no_entity += 1
                continue
            if past(trigger.task, stream_ms(row["stream_id"])):
                plan.stale += 1
                continue
            plan.want(trigger.task, entity, registry.priority_of(trigger))
    predicting = model is not None and bool(registry.predicted)
    if not rows or not (predicting or prior is not None):
        return plan
    frame = pd.DataFrame(rows)
    carried = prior(list(dict.fromkeys(frame["user"].tolist()))) if prior is not None else None
    states = next_action.latest_states(frame, model.timezone if model is not None else timezone, prior=carried)
    if prior is not None:
        plan.states = next_action.carried_states(states)
    if not predicting:
        return plan
    proba = model.predict_proba(states)
    users, tenants = states["user"].tolist(), states["tenant"].tolist()
    latest = frame.assign(arrived=frame["stream_id"].map(stream_ms)).groupby("user")["arrived"].max()
    for i, j in zip(*np.nonzero(proba >= confidence), strict=True):
        for trigger in registry.predicted.get(next_action.ACTIONS[j], ()):
            entity = users[i] if trigger.entity_field == "user" else tenants[i]
            if trigger.task in registry.types and _valid_entity(entity):
                if past(trigger.task, int(latest[users[i]])):  # predicted from a user's event long past
                    plan.stale += 1
                    continue
                plan.predicted += 1
                plan.want(trigger.task, entity, registry.priority_of(trigger))
    return plan


def run_requests(registry: TaskRegistry, plan: TickPlan, key_prefix: str) -> list[dg.RunRequest]:
    """One run per task type and priority, per ``batch_size`` entities (sorted), tagged with the priority."""
    groups: dict[tuple[str, int], list[str]] = {}
    for (task, entity), priority in plan.wanted.items():
        groups.setdefault((task, priority), []).append(entity)
    requests = []
    for (task, priority), entities in sorted(groups.items(), key=lambda item: (-item[0][1], item[0][0])):
        entities.sort()
        size = registry.get(task).batch_size
        for start in range(0, len(entities), size):
            requests.append(
                dg.RunRequest(
                    run_key=f"{key_prefix}:{task}:p{priority}:{start // size}",
                    job_name=JOB_NAME,
                    run_config=task_run_config(task, entities[start : start + size]),
                    tags={PRIORITY_TAG: str(priority), TASK_TAG: task, **RERUN_IF_WORKER_DIES},
                )
            )
    return requests


def _approved_model(context: dg.SensorEvaluationContext, model_store: ModelStoreResource):
    try:
        version = approved_next_action_version(context.instance)
        if version is None:
            return None
        if version not in _MODELS:
            _MODELS.clear()
            _MODELS[version] = model_store.store().load(NEXT_ACTION_MODEL, version)
        return _MODELS[version]
    except Exception as error:  # predictions are an extra: without them the triggers still run
        context.log.warning(f"no next-action predictions this tick: {error}")
        return None


class StoredStates:
    """What ``plan_events`` reads the users' earlier states with in a sensor tick: those stored in Redis (a malformed
    one is none), the span of ticks that stored them (``serving.events.UserStatesSpan``), and, read first, the
    servers' mark (``server_mark``): a span goes on only while it stays the same, so no state was evicted or lost in
    a restart meanwhile. ``read`` says whether Redis answered: when it did not, the tick's states are its own events'
    alone, and are not stored."""

    def __init__(self, redis: RedisResource, log: logging.Logger) -> None:
        self.redis, self.log = redis, log
        self.read, self.span, self.server = False, None, None

    def __call__(self, users: list[str]) -> dict[str, next_action.UserState]:
        def states(client: redis_py.Redis, schema: KeySchema):
            server = server_mark(client)  # before the states: a key lost after it changes the next tick's mark
            return (
                server,
                read_user_states_span(client, schema),
                read_user_states(client, schema, users, next_action.UserState.FIELDS),
            )

        found = self.redis.sensor_check(states, self.log, f"the states of {len(users)} users")
        if found is None:
            return {}
        self.read, (self.server, self.span, stored) = True, found
        parsed = {user: next_action.UserState.parse(values) for user, values in stored.items()}
        return {user: state for user, state in parsed.items() if state is not None}

    def store(self, states: Mapping[str, next_action.UserState], after: str, through: str) -> None:
        """Store ``states``, the events after stream ID ``after`` through ``through`` counted, and carry the span on;
        nothing when the earlier states were not read (the next tick starts a new span)."""
        if not self.read or not states:
            return
        carried = self.span is not None and self.span.carries(after, self.server)
        span = (self.span or UserStatesSpan(after, after)).after(after, through, self.server)
        fields = {user: state.fields() for user, state in states.items()}

        def write(client: redis_py.Redis, schema: KeySchema) -> None:
            if not carried:  # first, a new span over no event yet: the old one must not vouch for states after a loss
                write_user_states(client, schema, {}, span=UserStatesSpan(after, after, self.server))
            write_user_states(client, schema, fields, span=span)

        self.redis.sensor_check(write, self.log, f"the storing of {len(states)} users' session states")


def stream_id(text: str) -> str | None:
    """``text`` as a Redis Stream entry ID to read after (``MILLISECONDS-SEQUENCE``, two unsigned 64-bit numbers; a
    bare ``MILLISECONDS`` is ``MILLISECONDS-0``), or None when it is none (or the last possible one: nothing is after
    it, and Redis refuses to read after it)."""
    parts = text.split("-") if text.count("-") == 1 else [text, "0"]
    if not all(p.isascii() and p.isdigit() and int(p) < 2**64 for p in parts):
        return None
    return None if int(parts[0]) == int(parts[1]) == 2**64 - 1 else f"{int(parts[0])}-{int(parts[1])}"


def first_read_after(lookback_ms: int, span: UserStatesSpan | None) -> str:
    """Where a tick without a cursor (a new Dagster instance, the first ``precompute dev`` after the demo) reads the
    user events after: ``lookback_ms``, or the last event a tick of any instance handled (the stored states'
    ``span``), if that is later: the demo's own tick handled its events, and the next instance did them again."""
    start = (lookback_ms, 0)
    through = stream_id(span.through) if span is not None else None
    if through is not None and tuple(map(int, through.split("-"))) > start:
        return through
    return f"{lookback_ms}-0"


def build_user_event_sensor(
    *,
    name: str = "user_event_sensor",
    confidence: float = DEFAULT_CONFIDENCE,
    max_events: int = 100_000,
    first_lookback_s: int = 300,
    minimum_interval_seconds: int = 1,
    registry: Callable[[], TaskRegistry] = task_registry,
) -> dg.SensorDefinition:
    """The sensor: reads the events after its cursor (a stream ID; a first tick starts ``first_lookback_s`` back, or
    after the last event a tick handled, ``first_read_after``),
    at most ``max_events`` a tick, and requests the implied task runs, batched and prioritised.

    Dagster's sensor daemon visits sensors every 5 s; a minimum interval of 1 s lets this one tick on every
    visit (with 5 s, a visit that comes a moment short of 5 s after the last tick skips it: 10 s gaps)."""

    @dg.sensor(
        name=name,
        job=precompute_tasks_job,
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Turn new user events (and confident next-action predictions) into precompute task runs: one "
        "run per task type and priority per batch, tagged dagster/priority (campaign creation 9, upload 8, login 7, "
        "refresh 3, background 1). A ctr task of an ad whose campaign warmed it is left to the campaign.",
    )
    def user_event_sensor(
        context: dg.SensorEvaluationContext,
        redis: RedisResource,
        model_store: ModelStoreResource,
        deployment: DeploymentResource,
        campaign_registry: CampaignRegistryResource,
    ):
        started = time.perf_counter()
        after = stream_id(context.cursor) if context.cursor else None
        resumed = after is not None  # from a tick's cursor: what came after it must all be read
        if context.cursor and after is None:  # set by hand (`dagster sensor cursor --set`)
            context.log.warning(
                f"the cursor {context.cursor[:80]!r} is no stream ID to read after (MILLISECONDS-SEQUENCE): "
                f"reading from {first_lookback_s} s ago instead (or the last event a tick handled, if later)"
            )
        if after is None:
            span = redis.sensor_check(read_user_states_span, context.log, "the span of the stored user states")
            after = first_read_after(time.time_ns() // 1_000_000 - first_lookback_s * 1000, span)
        read = redis.sensor_check(
            lambda client, schema: (
                read_events_after(client, schema, after, limit=max_events),
                client.time(),
                resumed and cut_after(client, events_stream(schema), after),
            ),
            context.log, f"the user events after {after}",
        )  # fmt: skip
        if read is None:  # the cursor stays: the next tick reads the same events
            return dg.SkipReason(f"Redis does not answer: the user events after {after} were not read")
        entries, (seconds, micros), cut = read
        if cut:
            context.log.warning(
                f"the user events stream no longer holds this sensor's cursor {after} nor any event before it: events "
                f"after the cursor, before {entries[0][0].decode() if entries else 'the oldest left'}, may have gone "
                "unread, their tasks not requested (trimmed by the loggers' stream_maxlen or by the cleanup's "
                "retention while the sensor was off, or lost by Redis)"
            )
        now_ms = seconds * 1000 + micros // 1000  # Redis's clock, which stamped the events' stream IDs
        if not entries:
            return dg.SkipReason(f"no user events after {after}")
        tasks = registry()
        model = _approved_model(context, model_store) if tasks.predicted else None
        stored = StoredStates(redis, context.log)
        timezone = model.timezone if model is not None else deployment.partitions().timezone
        plan = plan_events(tasks, entries, model=model, confidence=confidence, prior=stored, timezone=timezone,
                           now_ms=now_ms)  # fmt: skip
        held = drop_campaign_held(
            tasks, plan, lambda ads: held_by_campaigns(campaign_registry, ads, context.log, unanswered="ask")
        )
        last = entries[-1][0].decode()
        stored.store(plan.states, after, last)  # not stored (warned): the next tick's span starts anew
        requests = run_requests(tasks, plan, f"{after}..{last}")
        context.log.info(
            f"{plan.events} events ({plan.malformed} malformed, {plan.no_entity} without an entity), "
            f"{plan.predicted} predicted needs, {plan.stale} tasks past their TTL not asked, "
            f"{held} ctr tasks left to the campaigns that hold their ads, "
            f"{len(plan.wanted)} tasks in {len(requests)} runs, "
            f"{time.perf_counter() - started:.2f} s"
        )
        if not requests:
            return dg.SensorResult(skip_reason=f"{plan.events} events, nothing to precompute", cursor=last)
        return dg.SensorResult(run_requests=requests, cursor=last)

    return user_event_sensor


user_event_sensor = build_user_event_sensor()


# --- proactive refresh ---------------------------------------------------------------------------------------

REFRESH_PRIORITY = 3


@dataclass
class RefreshPlan:
    """What one refresh tick found: hot keys of task kinds, how many of them are due, and the requests."""

    plan: TickPlan
    queries_read: int = 0
    hot: int = 0
    due: int = 0
    cooling: int = 0  # due, but requested less than cooldown_s ago (its run is still queued, or it failed)
    campaign_held: int = 0  # due ctr keys left to the campaigns that hold them
    registry_waits: int = 0  # due ctr keys that wait: the campaign registry did not answer
    requested: dict[str, dict[str, int]] = field(default_factory=dict)  # task -> entity -> requested at (ms)


def plan_refresh(
    registry: TaskRegistry,
    client: Any,
    schema: Any,
    *,
    now_ms: int,
    window_s: int = refresh.DEFAULT_WINDOW_S,
    fraction: float = refresh.DEFAULT_FRACTION,
    min_hits: int = 1,
    max_queries: int = refresh.DEFAULT_MAX_QUERIES,
    max_keys: int = 10_000,
    cooldown_s: int = 600,
    requested: dict[str, dict[str, int]] | None = None,
    held: Callable[[list[str]], set[str] | None] | None = None,
) -> RefreshPlan:
    """The live keys of registered task types that had hits in the query log in the last ``window_s`` and whose
    ``PTTL`` is below ``fraction`` of their type's TTL, or that are gone though no published version serves them
    (``serving.refresh``), at most ``max_keys`` (soonest expiry first), each at ``REFRESH_PRIORITY``, skipping those
    requested in the last ``cooldown_s`` (``requested``). A hot value that expired (a refresh failed, or a type's TTL
    is shorter than the cooldown) is thus asked again once the cooldown is over, not never. ``held`` names, of the due
    ``ctr`` keys, those campaigns hold (``CampaignRegistry.held_ads``): left alone, as their warming wrote them; None
    when the registry did not answer: they all wait for a tick that can tell (``registry_waits``)."""
    task_of: dict[str, TaskType] = {}
    for task in registry.types.values():
        task_of.setdefault(task.cache_kind, task)  # two types of one kind: the first registered refreshes it
    since = {
        task: {entity: at for entity, at in entities.items() if now_ms - at < cooldown_s * 1000}
        for task, entities in (requested or {}).items()
    }
    out = RefreshPlan(TickPlan(), requested={task: entities for task, entities in since.items() if entities})
    if not task_of:
        return out
    hot, out.queries_read = refresh.read_recent_hits(
        client, schema, task_of, since_ms=now_ms - window_s * 1000, max_queries=max_queries, min_hits=min_hits
    )
    out.hot = len(hot)
    pttls = refresh.live_pttls(client, schema, hot)
    gone = [pair for pair, pttl in pttls.items() if pttl == -2]
    for pair in refresh.published_keys(client, schema, gone):  # read from the version: nothing live to keep warm
        del pttls[pair]
    due = refresh.due_for_refresh(pttls, {kind: task.ttl_s for kind, task in task_of.items()}, fraction=fraction)
    out.due = len(due)
    ctr_due = [key for kind, key in due if kind == CTR_KIND]
    campaigns = held(ctr_due) if held is not None and ctr_due else set()  # the registry is read only when one may be
    if campaigns is None:
        out.registry_waits, campaigns = len(ctr_due), set(ctr_due)
    else:
        out.campaign_held = len(campaigns)
    due = [(kind, key) for kind, key in due if kind != CTR_KIND or key not in campaigns]
    for kind, key in due:
        task = task_of[kind].name
        if key in out.requested.get(task, {}):  # requested in the last cooldown_s: its run may still be queued
            out.cooling += 1
            continue
        if len(out.plan.wanted) >= max_keys:
            break
        out.plan.want(task, key, REFRESH_PRIORITY)
        out.requested.setdefault(task, {})[key] = now_ms
    return out


def held_by_campaigns(
    campaign_registry: CampaignRegistryResource, ads: list[str], log: logging.Logger, *, unanswered: str = "wait"
) -> set[str] | None:
    """``CampaignRegistry.held_ads`` of ``ads`` now; None, with a warning, when the registry does not answer, which
    says what the caller does then (``unanswered``): ``"wait"``, a refresh's ``ctr`` keys wait for a tick that can
    tell (``plan_refresh``); ``"ask"``, an event's task, which no later tick asks again, is requested, though it may
    overwrite a campaign's value (``drop_campaign_held``); ``"write"``, a task run's values are written all the same
    (``leave_campaign_values``)."""
    try:
        return campaign_registry.registry().held_ads(ads, datetime.now(UTC))
    except (dg.Failure, psycopg2.Error) as error:
        why = (
            error.description
            if isinstance(error, dg.Failure)
            else f"the campaign registry ({ENV_APP_DB}) failed: " + " ".join(str(error).split())
        )
        many = len(ads) != 1
        if unanswered in ("ask", "write"):
            what, done = ("task", "requested") if unanswered == "ask" else ("value", "written")
            log.warning(
                f"{why}; {len(ads)} ctr {what}{'s' if many else ''} {done} without knowing whether a campaign holds "
                f"{'them' if many else 'it'}: a campaign's warm value may be overwritten"
            )
        else:
            keys = f"{len(ads)} due ctr key" + ("s wait" if many else " waits")
            log.warning(f"{why}; the {keys} for the next tick, as a refresh could overwrite a campaign's values")
        return None


def drop_campaign_held(registry: TaskRegistry, plan: TickPlan, held: Callable[[list[str]], set[str] | None]) -> int:
    """Leaves out of ``plan`` the tasks that would write ``ctr`` keys campaigns hold (``held``: of some ads, those
    held; None, not known: none left out); how many. The registry is read only when the plan has such a task."""
    ctr = [entity for task, entity in plan.wanted if registry.types[task].cache_kind == CTR_KIND]
    campaigns = (held(sorted(set(ctr))) if ctr else None) or set()
    for task, entity in [pair for pair in plan.wanted if pair[1] in campaigns]:
        if registry.types[task].cache_kind == CTR_KIND:
            del plan.wanted[(task, entity)]
    return len(campaigns)


def build_live_refresh_sensor(
    *,
    name: str = "live_refresh_sensor",
    window_s: int = refresh.DEFAULT_WINDOW_S,
    fraction: float = refresh.DEFAULT_FRACTION,
    min_hits: int = 1,
    max_queries: int = refresh.DEFAULT_MAX_QUERIES,
    max_keys: int = 10_000,
    cooldown_s: int = 600,
    minimum_interval_seconds: int = 60,
    registry: Callable[[], TaskRegistry] = task_registry,
) -> dg.SensorDefinition:
    """The sensor that keeps hot live values of task types warm: every minute, the keys read (hits) in the last
    ``window_s`` whose remaining TTL is below ``fraction`` of their type's TTL are requested as
    ``precompute_tasks_job`` runs at priority 3 (refresh); keys nobody read lately are left to expire. Its cursor
    remembers what it requested in the last ``cooldown_s`` so that a queued run is not requested again. ``ctr`` keys
    that campaigns hold (``CampaignRegistry.held_ads``) are left alone: their warming wrote them, scored from the
    campaign's own features, to expire with it (a refresh wrote the lake's CTR over them for 7 days, and wrote a
    cancelled campaign's keys back after its cleanup)."""

    @dg.sensor(
        name=name,
        job=precompute_tasks_job,
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Refresh live values of task types that were read in the last {window_s // 60} minutes and "
        f"expire within {fraction:.0%} of their TTL (dagster/priority 3); the cold tail is left to expire.",
    )
    def live_refresh_sensor(
        context: dg.SensorEvaluationContext, redis: RedisResource, campaign_registry: CampaignRegistryResource
    ):
        started, now_ms = time.perf_counter(), time.time_ns() // 1_000_000
        try:
            requested = json.loads(context.cursor)["requested"] if context.cursor else {}
        except (ValueError, KeyError, TypeError):
            requested = {}
        tasks = registry()
        found = redis.sensor_check(
            lambda client, schema: plan_refresh(
                tasks, client, schema, now_ms=now_ms, window_s=window_s, fraction=fraction, min_hits=min_hits,
                max_queries=max_queries, max_keys=max_keys, cooldown_s=cooldown_s, requested=requested,
                held=lambda ads: held_by_campaigns(campaign_registry, ads, context.log),
            ),
            context.log, "which live values expire soon",
        )  # fmt: skip
        if found is None:
            return dg.SkipReason("Redis does not answer: which live values expire soon was not checked")
        requests = run_requests(tasks, found.plan, f"refresh:{now_ms}")
        cursor = json.dumps({"requested": found.requested}, separators=(",", ":"), sort_keys=True)
        summary = (
            f"{found.queries_read} logged queries, {found.hot} hot keys, {found.due} due "
            f"({found.cooling} already requested, {found.campaign_held} held for campaigns, {found.registry_waits} "
            "waiting for the campaign registry), "
            f"{len(found.plan.wanted)} refreshed in {len(requests)} runs, "
            f"{time.perf_counter() - started:.2f} s"
        )
        context.log.info(summary)
        if not requests:
            return dg.SensorResult(skip_reason=summary, cursor=cursor)
        return dg.SensorResult(run_requests=requests, cursor=cursor)

    return live_refresh_sensor


live_refresh_sensor = build_live_refresh_sensor()
