"""Precompute tasks: the registry, retries and codec errors, the user_event_sensor over 10,000 events on the real
Redis, and the vertical slice events -> lake -> model -> sensor -> runs -> values readable through PredictionCache."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import threading
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from importlib.metadata import EntryPoint

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import redis as redis_py

from precompute_assets.definitions import build_definitions
from precompute_assets.defs import tasks
from precompute_assets.defs.models import ctr_model
from precompute_assets.defs.partitions import DEFAULT_PARTITIONS
from precompute_assets.defs.resources import (
    CampaignRegistryResource,
    DeploymentResource,
    LakeResource,
    ModelStoreResource,
    ParquetIOManager,
    RedisResource,
)
from precompute_assets.defs.settings import Settings
from precompute_assets.defs.sources import ad_impressions, ads
from precompute_assets.defs.tasks import (
    ENTRY_POINT_GROUP,
    PRIORITY_TAG,
    TASK_TAG,
    TaskContext,
    TaskRegistry,
    TaskType,
    TaskUnavailable,
    build_live_refresh_sensor,
    build_user_event_sensor,
    builtin_registry,
    compute_task,
    plan_events,
    precompute_tasks_job,
    register_task_type,
    run_requests,
    task_registry,
    task_run_config,
)
from precompute_assets.defs.user_events import (
    NEXT_ACTION_MODEL,
    next_action_model,
    user_events,
    write_user_event_lake,
)
from precompute_assets.ml import next_action as na
from precompute_assets.ml.next_action import NextActionModel
from precompute_assets.serving import PredictionCache, connect, publish_version
from precompute_assets.serving.events import (
    ACTIONS,
    USER_STATE_TTL_S,
    EventLogger,
    UserStatesSpan,
    read_user_states_span,
    write_user_states,
)
from precompute_assets.serving.keys import codec_for
from precompute_assets.storage.lake import Lake
from precompute_assets.storage.tables import query_log_frame
from precompute_assets_tests.factories import log_client, write_ad_platform

DAY = "2026-11-20"


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:6]}"


def task_resources(redis_url, schema, lake_uri, models, registry_url: str | None = None) -> dict:
    """The job's resources; the campaign registry is read only for values of kind ``ctr`` (by default: none, as where
    PRECOMPUTE_APP_DB_URL is not set, which a run of another kind needs not)."""
    lake = LakeResource(base_uri=lake_uri)
    return {
        "redis": RedisResource(url=redis_url, namespace=schema.namespace),
        "lake": lake,
        "io_manager": ParquetIOManager(lake=lake),
        "model_store": ModelStoreResource(root=models),
        "deployment": DeploymentResource(),
        "campaign_registry": CampaignRegistryResource(url=registry_url),
    }


def op_metadata(result) -> dict:
    (output,) = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT"]
    return {k: v.value for k, v in output.event_specific_data.metadata.items()}


@pytest.fixture
def cache(redis_url, schema):
    reader = PredictionCache(connect(redis_url, socket_timeout=5), schema=schema, pointer_ttl_s=0)
    yield reader
    reader.close()


# --- the registry ------------------------------------------------------------------------------------------


def test_task_types_are_validated_and_triggers_checked():
    def compute(entity, ctx):
        return 1

    for bad, message in [
        ({"priority": 0}, "priority must be an integer from 1 to 10"),
        ({"priority": 11}, "priority must be an integer from 1 to 10"),
        ({"ttl_s": 0}, "ttl_s must be a positive"),
        ({"batch_size": 0}, "batch_size must be a positive"),
        ({"name": "Bad-Name"}, "must be lower-case"),
        ({"name": "stats"}, "not a valid cache kind"),
    ]:
        options = {"name": "ok", "compute": compute, "ttl_s": 60, "priority": 5, **bad}
        with pytest.raises(ValueError, match=message):
            TaskType(**options)
    registry = TaskRegistry()
    registry.register(TaskType("ok", compute, 60, 5))
    with pytest.raises(ValueError, match="already registered"):
        registry.register(TaskType("ok", compute, 120, 5))
    registry.register(TaskType("ok", compute, 120, 5), replace=True)
    with pytest.raises(KeyError, match="unknown task type 'nope'; registered: ok"):
        registry.get("nope")
    with pytest.raises(ValueError, match="unknown action"):
        registry.on_event("logout", "ok")
    with pytest.raises(ValueError, match="no entity yet"):
        registry.on_predicted("login", "ok", entity="entity")
    built_in = builtin_registry()
    assert {n: (t.priority, t.ttl_s) for n, t in built_in.types.items()} == {
        "ctr": (8, 7 * 86_400), "next_actions": (7, 3_600), "dashboard": (3, 900),
    }  # fmt: skip


def test_failing_entities_are_retried_with_backoff_while_the_rest_are_kept():
    calls: Counter[str] = Counter()

    def flaky(entity, ctx):
        calls[entity] += 1
        if entity == "broken" or (entity == "flaky" and calls[entity] < 3):
            raise RuntimeError(f"{entity} is down")
        return {"entity": entity}

    task = TaskType("flaky_task", flaky, ttl_s=60, priority=5)
    delays: list[float] = []
    outcome = compute_task(
        TaskContext(task, ["a", "flaky", "broken", "b"], now_ms=0), max_retries=3, backoff_s=0.1, sleep=delays.append
    )
    assert outcome.values == {"a": {"entity": "a"}, "flaky": {"entity": "flaky"}, "b": {"entity": "b"}}
    assert outcome.failed == {"broken": "RuntimeError: broken is down"}
    assert delays == [0.1, 0.2, 0.4] and outcome.retries == 3
    assert calls == {"a": 1, "b": 1, "flaky": 3, "broken": 4}  # the good ones are never computed again
    delays.clear()
    compute_task(TaskContext(task, ["broken"], now_ms=0), max_retries=8, backoff_s=1, sleep=delays.append)
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60]  # each sleep at most MAX_TASK_BACKOFF_S


def test_an_entity_that_no_retry_can_help_is_not_retried():
    calls: Counter[str] = Counter()

    def needs_a_model(entity, ctx):
        calls[entity] += 1
        return ctx.memo("model", lambda: (_ for _ in ()).throw(TaskUnavailable("no approved model")))

    task = TaskType("needs_model", needs_a_model, ttl_s=60, priority=5)
    delays: list[float] = []
    outcome = compute_task(TaskContext(task, ["a", "b"], now_ms=0), backoff_s=0.1, sleep=delays.append)
    assert outcome.failed == {e: "TaskUnavailable: no approved model" for e in "ab"} and outcome.unavailable == {
        "a",
        "b",
    }
    assert delays == [] and calls == {"a": 1, "b": 1}


def test_a_creative_the_lake_does_not_have_is_not_retried():
    """Its CTR failed 3 times a step and 4 steps a run (40 s of retries) though the batch's scores are read once: no
    retry could find it. It fails once, and a run of such creatives alone fails without Dagster's retries."""
    ctx = TaskContext(builtin_registry().get("ctr"), ["known", "unknown"], now_ms=0)
    ctx.memo("ctr_scores", lambda: {"known": 0.25})  # the batch's scores, as _ctr_scores reads them from the lake
    delays: list[float] = []
    outcome = compute_task(ctx, backoff_s=0.1, sleep=delays.append)
    assert outcome.values == {"known": 0.25} and outcome.unavailable == {"unknown"} and delays == []
    assert "load it first: precompute ads load" in outcome.failed["unknown"]


def test_a_lake_without_ads_is_no_reason_to_retry_a_creatives_ctr(tmp_path, monkeypatch):
    """Before any `precompute ads load`, reading the ads raised FileNotFoundError, retried like a passing fault."""
    from types import SimpleNamespace

    monkeypatch.setattr(tasks, "approved_model_version", lambda instance: "v1")
    store = SimpleNamespace(store=lambda: SimpleNamespace(load=lambda name, version: object()))
    ctx = TaskContext(builtin_registry().get("ctr"), ["cr1"], now_ms=0,
                      lake=LakeResource(base_uri=str(tmp_path / "lake")), model_store=store)  # fmt: skip
    delays: list[float] = []
    outcome = compute_task(ctx, backoff_s=0.1, sleep=delays.append)
    assert outcome.unavailable == {"cr1"} and delays == [] and "precompute ads load" in outcome.failed["cr1"]


def test_a_run_without_an_approved_model_fails_once_without_dagsters_retries(redis_url, schema, tmp_path, pg_instance):
    """Each login's next_actions run took 26 s and 4 attempts to fail while no next_action_model was approved."""
    res = task_resources(redis_url, schema, str(tmp_path / "lake"), str(tmp_path / "models"))
    for task, entities in (("next_actions", ["u1", "u2"]), ("ctr", ["ad1"])):
        result = precompute_tasks_job.execute_in_process(
            run_config=task_run_config(task, entities), resources=res, instance=pg_instance, raise_on_error=False
        )
        assert not result.success
        assert "no approved" in result.failure_data_for_node("run_precompute_task").error.message
        assert not [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"], task


def test_a_value_its_codec_cannot_encode_names_the_type_and_entity():
    task = TaskType("ctr", lambda entity, ctx: {"not": "a float"} if entity == "ad2" else 0.25, ttl_s=60, priority=8)
    outcome = compute_task(TaskContext(task, ["ad1", "ad2"], now_ms=0), sleep=lambda s: None)
    assert outcome.values == {"ad1": 0.25}
    (message,) = outcome.encode_errors.values()
    assert "task type 'ctr'" in message and "entity 'ad2'" in message and "'f32'" in message
    nan = TaskType("scores", lambda entity, ctx: {"p": float("nan")}, ttl_s=60, priority=2)
    assert "entity 'x'" in compute_task(TaskContext(nan, ["x"], now_ms=0)).encode_errors["x"]


def test_the_job_writes_live_values_with_their_ttl_and_counts_failures(
    redis_url, redis_client, schema, tmp_path, pg_instance, cache
):
    name = unique("greeting")

    def greet(entity, ctx):
        if entity == "mallory":
            raise PermissionError("no greeting for mallory")
        if entity == "bytes":
            return b"\x00"  # JSON cannot encode bytes
        return {"hello": entity, "as_of_ms": ctx.now_ms}

    register_task_type(name, greet, ttl_s=600, priority=4, batch_size=10)
    assert task_registry().get(name).priority == 4
    res = task_resources(redis_url, schema, str(tmp_path / "lake"), str(tmp_path / "models"))
    config = task_run_config(name, ["alice", "bob", "mallory"], backoff_s=0.01, max_retries=2, as_of_ms=123)
    result = precompute_tasks_job.execute_in_process(run_config=config, resources=res, instance=pg_instance)
    assert result.success
    meta = op_metadata(result)
    assert (meta["written"], meta["failed"], meta["retry_rounds"]) == (2, 1, 2)
    assert meta["failed_entities"] == {"mallory": "PermissionError: no greeting for mallory"}
    assert cache.get(name, "alice") == {"hello": "alice", "as_of_ms": 123}
    assert cache.get(name, "mallory") is None
    assert 590 <= redis_client.ttl(schema.live(name, "bob")) <= 600

    bad = task_run_config(name, ["carol", "bytes"], backoff_s=0.01)
    failed = precompute_tasks_job.execute_in_process(
        run_config=bad, resources=res, instance=pg_instance, raise_on_error=False
    )
    assert not failed.success
    message = failed.failure_data_for_node("run_precompute_task").error.message
    assert f"task type {name!r}" in message and "entity 'bytes'" in message
    assert cache.get(name, "carol") == {"hello": "carol", "as_of_ms": pytest.approx(time.time() * 1000, abs=60_000)}

    unknown = precompute_tasks_job.execute_in_process(
        run_config=task_run_config("no_such_task", ["x"]), resources=res, instance=pg_instance, raise_on_error=False
    )
    assert "unknown task type 'no_such_task'" in unknown.failure_data_for_node("run_precompute_task").error.message


def test_a_full_redis_fails_the_task_in_one_line_naming_maxmemory(
    redis_server, schema, tmp_path, pg_instance, monkeypatch
):
    """At ``maxmemory`` with ``noeviction`` the write of the task's values failed with redis-py's bare
    ``OutOfMemoryError`` and its traceback; only the CTR publish said what to change. A private server: an OOM limit
    on the shared one would fail other tests' writes."""
    from precompute_assets.defs.tasks import run_precompute_task

    monkeypatch.setattr(run_precompute_task, "_retry_policy", None)  # one attempt: the same server is full again
    name = unique("full")
    register_task_type(name, lambda entity, ctx: {"hello": entity}, ttl_s=600, priority=1)
    server = redis_server(extra_config=("maxmemory-policy noeviction",))
    connect(server.url).config_set("maxmemory", 1)  # our own test server: full at once
    res = task_resources(server.url, schema, str(tmp_path / "lake"), str(tmp_path / "models"))
    result = precompute_tasks_job.execute_in_process(
        run_config=task_run_config(name, ["alice"]), resources=res, instance=pg_instance, raise_on_error=False
    )
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    description = failure.step_failure_data.user_failure_data.description
    assert description.startswith(f"no values of task {name} written: the Redis of PRECOMPUTE_REDIS_URL is out of")
    assert "maxmemory" in description and "volatile-lru" in description and "\n" not in description


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("max_retries", -1),
        ("backoff_s", -0.5),
        ("backoff_s", float("nan")),
        ("backoff_s", float("inf")),
        ("max_retries", 30),
        ("backoff_s", 61),
    ],  # fmt: skip
)
def test_a_negative_retry_setting_fails_once_in_one_line(redis_url, schema, tmp_path, pg_instance, option, value):
    """Both were accepted: a negative max_retries meant no retries without a word, and a negative or NaN backoff_s
    failed only when an entity failed, at time.sleep, after which the op's retry policy re-ran the whole task three
    times to fail the same way; an infinite one raised OverflowError there, and 30 retries slept for years (h_inval)."""
    name = unique("retries")
    calls: list[str] = []
    register_task_type(name, lambda entity, ctx: calls.append(entity) or 1.0, ttl_s=60, priority=1, batch_size=10)
    res = task_resources(redis_url, schema, str(tmp_path / "lake"), str(tmp_path / "models"))
    result = precompute_tasks_job.execute_in_process(
        run_config=task_run_config(name, ["a"], **{option: value}), resources=res, instance=pg_instance,
        raise_on_error=False,
    )  # fmt: skip
    assert not result.success
    message = result.failure_data_for_node("run_precompute_task").error.message
    assert "max_retries must be 0 to 10 and backoff_s 0 to 60 seconds" in message, message
    assert calls == []  # refused before any entity was computed, and not retried


def test_values_computed_before_an_invalidation_of_their_kind_are_computed_again_not_written(
    redis_url, redis_client, schema, tmp_path, pg_instance
):
    """A task run that computed its values before an invalidation of its kind wrote them after it, so the
    invalidated values came back for the type's whole TTL: task runs were not fenced by the epoch as
    get_or_compute's stores are (h_inval)."""
    from precompute_assets.serving.invalidate import invalidate

    name = unique("fenced")
    computed: list[int] = []
    source = {"model": "old"}

    def compute(entity, ctx):
        computed.append(len(computed))
        model = ctx.memo("model", lambda: source["model"])  # a load the task caches, as creative_ctr's scores
        if len(computed) == 1:  # an operator replaces the model and invalidates the kind while this one computes
            source["model"] = "new"
            invalidate(redis_client, name, prefix="e", schema=schema)
        return {"computation": len(computed), "model": model}

    register_task_type(name, compute, ttl_s=600, priority=1, batch_size=10, kind=name)
    res = task_resources(redis_url, schema, str(tmp_path / "lake"), str(tmp_path / "models"))
    result = precompute_tasks_job.execute_in_process(
        run_config=task_run_config(name, ["e1"]), resources=res, instance=pg_instance
    )
    assert result.success and computed == [0, 1]
    # computed again from a fresh load, not from what was read before the invalidation (h_diff)
    assert json.loads(redis_client.get(schema.live(name, "e1"))) == {"computation": 2, "model": "new"}
    name = unique("always")
    register_task_type(name, lambda entity, ctx: [invalidate(redis_client, name, key=entity, schema=schema), 1][1],
                       ttl_s=600, priority=1, batch_size=10, kind=name)  # fmt: skip
    result = precompute_tasks_job.execute_in_process(
        run_config=task_run_config(name, ["e1"]), resources=res, instance=pg_instance, raise_on_error=False
    )
    message = result.failure_data_for_node("run_precompute_task").error.message
    assert "was invalidated during each of 3 computations: nothing written" in message
    assert not redis_client.exists(schema.live(name, "e1"))


def test_task_run_stats_count_queued_and_ended_runs_per_task_type(redis_url, schema, tmp_path, pg_instance):
    name = unique("stats")
    register_task_type(name, lambda entity, ctx: 1.0 if entity != "bad" else b"\x00", ttl_s=60, priority=2,
                       batch_size=10)  # fmt: skip
    res = task_resources(redis_url, schema, str(tmp_path / "lake"), str(tmp_path / "models"))
    tags = {TASK_TAG: name, PRIORITY_TAG: "2"}
    for entities in (["a"], ["b", "c"], ["bad"]):  # two succeed, one fails (its value cannot be encoded)
        precompute_tasks_job.execute_in_process(run_config=task_run_config(name, entities), tags=tags,
                                                instance=pg_instance, resources=res, raise_on_error=False)  # fmt: skip
    precompute_tasks_job.execute_in_process(run_config=task_run_config(name, ["d"]), instance=pg_instance,
                                            resources=res, tags={TASK_TAG: "other"})  # fmt: skip
    for _ in range(2):  # created, never launched (QUEUED needs a code location's origin; both count as queued)
        pg_instance.create_run_for_job(precompute_tasks_job, run_config=task_run_config(name, ["e"]), tags=tags,
                                       status=dg.DagsterRunStatus.NOT_STARTED)  # fmt: skip
    stats = tasks.task_run_stats(pg_instance, [name, "idle"], window_s=3600)
    mine = stats[name]
    assert (mine["queued"], mine["running"], mine["succeeded"], mine["failed"]) == (2, 0, 2, 1)
    assert 0 < mine["avg_run_s"] <= mine["max_run_s"] and not mine["ended_sampled"]
    assert stats["idle"] == {"queued": 0, "running": 0, "succeeded": 0, "failed": 0, "avg_run_s": None,
                             "max_run_s": None, "ended_sampled": False}  # fmt: skip
    later = tasks.task_run_stats(pg_instance, [name], window_s=60, now_s=time.time() + 3600)[name]
    assert (later["queued"], later["succeeded"], later["avg_run_s"]) == (2, 0, None)  # ended before the window
    assert tasks.task_run_stats(pg_instance, [name], window_s=3600, limit=2)[name]["ended_sampled"]


# --- the sensor ------------------------------------------------------------------------------------------


def burst(redis_url, schema, n=10_000, seed=0) -> list[tuple[str, str, str | None, str]]:
    """``n`` events of 600 users in 100 tenants sent through the serving client (real clock), plus malformed ones."""
    rng = np.random.default_rng(seed)
    weights = np.array([0.2, 0.295, 0.005, 0.3, 0.1, 0.1])  # ~50 campaigns: some tenants only log in
    events = []
    for i in range(n):
        user = f"u{rng.integers(600):04d}"
        action = ACTIONS[rng.choice(6, p=weights)]
        entity = {"creative_upload": f"cr{i:05d}", "campaign_create": f"c{i:05d}", "dashboard_view": None}.get(action)
        events.append((user, action, entity, f"t{int(user[1:]) % 100:02d}"))
    logger = EventLogger(log_client(redis_url), schema, max_buffer=n)
    for user, action, entity, tenant in events:
        logger.record_event(user, action, entity=entity, tenant=tenant)
    logger.close()
    assert logger.stats.written == n
    return events


def expected_tasks(events) -> dict[tuple[str, str], int]:
    want: dict[tuple[str, str], int] = {}

    def add(task, entity, priority):
        want[(task, entity)] = max(want.get((task, entity), 0), priority)

    for user, action, entity, tenant in events:
        if action == "campaign_create":
            add("dashboard", tenant, 9)
            add("next_actions", user, 9)
        elif action == "creative_upload":
            add("ctr", entity, 8)
        elif action == "login":
            add("next_actions", user, 7)
            add("dashboard", tenant, 3)
    return want


def tick(sensor, instance, redis_url, schema, models, *, registry_url, cursor=None):
    resources = {"redis": RedisResource(url=redis_url, namespace=schema.namespace),
                 "model_store": ModelStoreResource(root=models), "deployment": DeploymentResource(),
                 "campaign_registry": CampaignRegistryResource(url=registry_url)}  # fmt: skip
    return sensor(dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources))


def test_a_tick_over_10000_events_requests_few_batched_prioritised_runs(
    redis_url, redis_client, schema, tmp_path, pg_instance, app_db_url
):
    events = burst(redis_url, schema)
    stream = f"{schema.prefix}:events"
    redis_client.xadd(stream, {"ts": "soon", "user": "u1", "action": "login"})  # malformed: skipped, counted
    redis_client.xadd(stream, {"ts": str(time.time_ns() // 1_000_000), "user": "u1", "action": "logout"})
    sensor = build_user_event_sensor()
    result = tick(sensor, pg_instance, redis_url, schema, str(tmp_path), registry_url=app_db_url)
    want = expected_tasks(events)
    by_group = Counter((task, priority) for (task, _), priority in want.items())
    sizes = {"ctr": 1000, "next_actions": 500, "dashboard": 200}
    runs = {(task, p): -(-n // sizes[task]) for (task, p), n in by_group.items()}
    assert len(result.run_requests) == sum(runs.values()) <= 12  # a few runs, not 10,000
    requested: dict[tuple[str, str], int] = {}
    for request in result.run_requests:
        task, priority = request.tags[TASK_TAG], int(request.tags[PRIORITY_TAG])
        assert request.job_name == "precompute_tasks_job"
        entities = request.run_config["ops"]["run_precompute_task"]["config"]["entities"]
        assert (
            len(entities) <= sizes[task]
            and request.run_config["ops"]["run_precompute_task"]["config"]["task_type"] == task
        )
        requested.update({(task, e): priority for e in entities})
    assert requested == want
    priorities = [int(r.tags[PRIORITY_TAG]) for r in result.run_requests]
    assert priorities == sorted(priorities, reverse=True)  # campaign creation 9, upload 8, login 7, refresh 3
    assert set(priorities) == {9, 8, 7, 3}
    assert len({r.run_key for r in result.run_requests}) == len(result.run_requests)
    # the cursor is the last entry read: the next tick reads nothing more
    ((last_id, _),) = redis_client.xrevrange(stream, count=1)
    assert result.cursor == last_id.decode()
    again = tick(sensor, pg_instance, redis_url, schema, str(tmp_path), cursor=result.cursor, registry_url=app_db_url)
    assert isinstance(again, dg.SkipReason)


@pytest.mark.parametrize(
    "cursor", ["garbage", "99999999999999999999-0", "18446744073709551615-18446744073709551615", "1-2-3", "-1-0"]
)
def test_a_cursor_that_is_no_stream_id_is_replaced_with_a_warning(
    redis_url, schema, tmp_path, pg_instance, cursor, app_db_url
):
    """A cursor set by hand (`dagster sensor cursor --set`) that Redis refuses stopped the sensor for good, saying
    "Redis does not answer" on every tick."""
    logger = EventLogger(log_client(redis_url), schema)
    logger.record_event("u1", "login", tenant="acme")
    logger.close()
    result = tick(
        build_user_event_sensor(), pg_instance, redis_url, schema, str(tmp_path), cursor=cursor, registry_url=app_db_url
    )
    assert isinstance(result, dg.SensorResult) and result.run_requests
    assert {r.tags[TASK_TAG] for r in result.run_requests} == {"next_actions", "dashboard"}
    assert tasks.stream_id(result.cursor) == result.cursor


def test_a_tick_without_a_cursor_starts_after_the_last_event_any_tick_handled(
    redis_url, schema, tmp_path, pg_instance, app_db_url
):
    """The demo's in-process tick handled its events, and the first tick of ``precompute dev`` after it (no cursor:
    another instance) read the last 5 minutes again and requested the same runs (h_newbie)."""
    logger = EventLogger(log_client(redis_url), schema)
    logger.record_event("u1", "login", tenant="acme")
    logger.close()
    sensor = build_user_event_sensor()
    first = tick(sensor, pg_instance, redis_url, schema, str(tmp_path), registry_url=app_db_url)
    assert isinstance(first, dg.SensorResult) and first.run_requests
    # a new instance: no cursor
    again = tick(sensor, pg_instance, redis_url, schema, str(tmp_path), registry_url=app_db_url)
    assert isinstance(again, dg.SkipReason) and f"no user events after {first.cursor}" in str(again.skip_message)
    logger = EventLogger(log_client(redis_url), schema)
    logger.record_event("u2", "login", tenant="acme")
    logger.close()
    later = tick(sensor, pg_instance, redis_url, schema, str(tmp_path), registry_url=app_db_url)
    entities = {e for r in later.run_requests for e in r.run_config["ops"]["run_precompute_task"]["config"]["entities"]}
    assert "u2" in entities and "u1" not in entities
    # A span older than the lookback does not reach further back than it.
    old = tasks.UserStatesSpan("1-0", "2-0")
    assert tasks.first_read_after(5_000, old) == "5000-0" and tasks.first_read_after(1, old) == "2-0"
    assert tasks.first_read_after(5_000, None) == "5000-0"


def test_events_trimmed_before_the_sensor_read_them_are_warned_about(
    redis_url, redis_client, schema, tmp_path, pg_instance, capfd, app_db_url
):
    """A stream cut by the loggers' MAXLEN (or by the cleanup while the sensor was off) lost events after the cursor:
    the sensor read on from the oldest entry left, and nothing said that tasks went unrequested."""
    logger = EventLogger(log_client(redis_url), schema)
    logger.record_event("u1", "login", tenant="acme")
    logger.close()
    sensor = build_user_event_sensor()
    first = tick(sensor, pg_instance, redis_url, schema, str(tmp_path), registry_url=app_db_url)
    stream = f"{schema.prefix}:events"
    now_ms = time.time_ns() // 1_000_000
    for user in range(20):
        redis_client.xadd(stream, {"ts": str(now_ms), "user": f"v{user}", "action": "login", "tenant": "acme"})
    # nothing went yet
    kept = tick(sensor, pg_instance, redis_url, schema, str(tmp_path), cursor=first.cursor, registry_url=app_db_url)
    assert kept.run_requests and "no longer holds" not in capfd.readouterr().err
    for user in range(20, 40):
        redis_client.xadd(stream, {"ts": str(now_ms), "user": f"v{user}", "action": "login", "tenant": "acme"})
    ((newest, _),) = redis_client.xrevrange(stream, count=1)
    redis_client.xtrim(stream, maxlen=5, approximate=False)  # v20..v34 go unread
    after = tick(sensor, pg_instance, redis_url, schema, str(tmp_path), cursor=kept.cursor, registry_url=app_db_url)
    assert after.cursor == newest.decode()  # the five left are read
    ((oldest, _),) = redis_client.xrange(stream, count=1)
    said = f"no longer holds this sensor's cursor {kept.cursor} nor any event before it: events after the cursor, "
    assert said + f"before {oldest.decode()}, may have gone unread" in capfd.readouterr().err
    assert isinstance(
        tick(sensor, pg_instance, redis_url, schema, str(tmp_path), cursor=after.cursor, registry_url=app_db_url),
        dg.SkipReason,
    )
    assert "no longer holds" not in capfd.readouterr().err  # said once: the cursor is past the trimmed entries now


def test_a_bare_millisecond_cursor_reads_after_its_first_entry_id():
    assert tasks.stream_id("1700000000000") == "1700000000000-0" and tasks.stream_id("5-07") == "5-7"


class _Stub:
    """An estimator that is sure the next action is a dashboard view."""

    classes_ = np.array(ACTIONS[1:], dtype=object)

    def predict_proba(self, x):
        return np.tile([0.6, 0.1, 0.1, 0.1, 0.1], (len(x), 1))


def test_confident_predictions_request_what_the_predicted_action_needs():
    now = time.time_ns() // 1_000_000
    entries = [
        (f"{now}-0".encode(), {b"ts": str(now).encode(), b"user": b"u1", b"action": b"login", b"tenant": b"t1"}),
        (
            f"{now}-1".encode(),
            {b"ts": str(now).encode(), b"user": b"u2", b"action": b"analytics_view", b"tenant": b"t2"},
        ),  # fmt: skip
        (f"{now}-2".encode(), {b"ts": str(now).encode(), b"user": b"u3", b"action": b"variant_review"}),
    ]
    model = NextActionModel(_Stub(), list(ACTIONS[1:]))
    registry = builtin_registry()
    plan = plan_events(registry, entries, model=model, confidence=0.5)
    assert plan.wanted == {("next_actions", "u1"): 7, ("dashboard", "t1"): 3, ("dashboard", "t2"): 1}
    assert plan.predicted == 2  # u3 has no tenant: nothing to prefetch for it
    requests = run_requests(registry, plan, "k")
    assert [(r.tags[TASK_TAG], r.tags[PRIORITY_TAG]) for r in requests] == [
        ("next_actions", "7"), ("dashboard", "3"), ("dashboard", "1"),
    ]  # fmt: skip
    unsure = plan_events(registry, entries, model=model, confidence=0.7)
    assert unsure.wanted == {("next_actions", "u1"): 7, ("dashboard", "t1"): 3} and unsure.predicted == 0


def test_events_older_than_their_tasks_ttl_ask_for_nothing():
    """A sensor off for a day (or a daemon down) read a day of logins and asked each one's next actions and dashboard,
    and predicted next actions from them: values that, computed on time, would have expired long ago. A task is asked
    only while its event (its arrival, the stream ID) is younger than the task type's TTL; the rest are counted."""
    now = time.time_ns() // 1_000_000

    def event(ago_s: int, seq: int, user: str, action: str, **more: str) -> tuple[bytes, dict[bytes, bytes]]:
        at = now - ago_s * 1000
        fields = {b"ts": str(at).encode(), b"user": user.encode(), b"action": action.encode()}
        return f"{at}-{seq}".encode(), fields | {k.encode(): v.encode() for k, v in more.items()}

    entries = [
        event(86_400, 0, "day-old", "login", tenant="t-day"),  # next_actions (1 h) and dashboard (15 min): both past
        event(1_200, 0, "twenty-min", "login", tenant="t-twenty"),  # its dashboard is past, its next actions are not
        event(2 * 86_400, 0, "uploader", "creative_upload", entity="cr1"),  # a creative's CTR lives 7 days
    ]
    model = NextActionModel(_Stub(), list(ACTIONS[1:]))  # sure of a dashboard view (a 15-minute task) next
    plan = plan_events(builtin_registry(), entries, model=model, confidence=0.5, now_ms=now)
    assert plan.wanted == {("next_actions", "twenty-min"): 7, ("ctr", "cr1"): 8}
    assert plan.stale == 3 + 2 and plan.predicted == 0  # three triggered tasks, two predicted dashboards (the uploader
    # has no tenant to show one to)
    assert plan_events(builtin_registry(), entries, model=model, confidence=0.5).stale == 0  # no tick time: all asked


def requested_tasks(result) -> set[tuple[str, str, int]]:
    return {
        (request.tags[TASK_TAG], entity, int(request.tags[PRIORITY_TAG]))
        for request in result.run_requests
        for entity in request.run_config["ops"]["run_precompute_task"]["config"]["entities"]
    }


class _Counting:
    """An estimator sure of a dashboard view from a user's third action of the day on, unsure before."""

    classes_ = np.array(ACTIONS[1:], dtype=object)

    def predict_proba(self, x):
        sure = x[:, na.FEATURES.index("actions_today")] >= 3
        return np.where(sure[:, None], [0.9, 0.025, 0.025, 0.025, 0.025], [0.2] * 5)


def test_the_sensor_predicts_from_a_users_whole_day_not_from_its_tick_alone(
    redis_url, redis_client, schema, tmp_path, pg_instance, monkeypatch, app_db_url
):
    model = NextActionModel(_Counting(), list(ACTIONS[1:]))
    approved = itertools.chain([None], itertools.repeat(model))  # the first tick before a model is approved: its
    # states are kept all the same
    monkeypatch.setattr(tasks, "_approved_model", lambda context, model_store: next(approved))
    logger = EventLogger(log_client(redis_url), schema)
    sensor, cursor, dashboards, cursors = build_user_event_sensor(), None, [], []
    for action in ("login", "campaign_create", "analytics_view"):  # one event a tick
        logger.record_event("u1", action, tenant="acme")
        logger.flush()
        result = tick(sensor, pg_instance, redis_url, schema, str(tmp_path), cursor=cursor, registry_url=app_db_url)
        cursor = result.cursor
        cursors.append(cursor)
        dashboards.append(("dashboard", "acme", tasks.BACKGROUND_PRIORITY) in requested_tasks(result))  # predicted
    logger.close()
    assert dashboards == [False, False, True]  # the third action of the day, though the tick saw one
    key = schema.user_state("u1")
    stored = na.UserState.parse(redis_client.hmget(key, na.UserState.FIELDS))
    assert stored is not None and stored.actions_today == 3 and stored.tenant == "acme"
    assert 0 < redis_client.ttl(key) <= USER_STATE_TTL_S
    span = read_user_states_span(redis_client, schema)  # one span over the three ticks, from the first's start
    assert span.through == cursors[-1] and span.since_ms < int(cursors[0].split("-")[0])
    redis_client.hset(key, "today", "many")  # a malformed state: the user starts afresh, the tick goes on
    logger = EventLogger(log_client(redis_url), schema)
    logger.record_event("u1", "dashboard_view", tenant="acme")
    logger.close()
    result = tick(sensor, pg_instance, redis_url, schema, str(tmp_path), cursor=cursor, registry_url=app_db_url)
    assert na.UserState.parse(redis_client.hmget(key, na.UserState.FIELDS)).actions_today == 1
    assert result.cursor != cursor


def test_a_state_redis_evicted_starts_its_user_afresh_under_a_new_span_that_does_not_vouch_for_it(
    redis_server, schema, tmp_path, pg_instance, monkeypatch, app_db_url
):
    """The fresh state looks like a day that began at the user's next event; only the servers' mark (``INFO``'s
    ``evicted_keys``) tells the sensor a state may be gone, so the span starts anew there."""
    server = redis_server(extra_config=("maxmemory-policy volatile-lru",))
    client = connect(server.url)
    monkeypatch.setattr(tasks, "_approved_model", lambda context, model_store: None)
    logger = EventLogger(log_client(server.url), schema)
    sensor, cursors = build_user_event_sensor(), [None]
    key = schema.user_state("u1")

    def one_tick(action: str) -> na.UserState:
        logger.record_event("u1", action, tenant="acme")
        logger.flush()
        cursors.append(
            tick(
                sensor, pg_instance, server.url, schema, str(tmp_path), cursor=cursors[-1], registry_url=app_db_url
            ).cursor
        )
        return na.UserState.parse(client.hmget(key, na.UserState.FIELDS))

    one_tick("login")
    assert one_tick("campaign_create").actions_today == 2
    assert read_user_states_span(client, schema).since_ms < int(cursors[1].split("-")[0])  # carried on
    client.config_set("maxmemory", 1)  # our own test server: full, so a write evicts every key with a TTL
    with contextlib.suppress(redis_py.OutOfMemoryError):  # refused once nothing volatile was left to evict
        client.set("filler", "x")
    client.config_set("maxmemory", 0)
    assert client.exists(key) == 0
    state = one_tick("analytics_view")
    logger.close()
    span = read_user_states_span(client, schema)
    assert state.actions_today == 1 and span.since == cursors[2] and span.through == cursors[3]
    assert not state.whole_since(span.since_ms, "UTC")


def test_a_span_that_starts_anew_replaces_the_old_one_before_the_states_a_failed_write_leaves_behind(
    redis_url, redis_client, schema, monkeypatch
):
    """After a loss (another mark) the old span must not vouch for the fresh states, should the span's own write
    fail after them: it is replaced first by a new one over no event yet."""
    resource = RedisResource(url=redis_url, namespace=schema.namespace)
    write_user_states(redis_client, schema, {}, span=UserStatesSpan("1-0", "5-0", "before-the-loss:0"))
    stored = tasks.StoredStates(resource, logging.getLogger("test"))
    assert stored(["u1"]) == {} and stored.span.since == "1-0"
    writing = tasks.write_user_states

    def failing(client, schema_, states, *, span=None):
        if states:  # the states land, then the connection goes before the span's write
            writing(client, schema_, states)
            raise redis_py.ConnectionError("connection lost")
        return writing(client, schema_, states, span=span)

    monkeypatch.setattr(tasks, "write_user_states", failing)
    now = time.time_ns() // 1_000_000
    stored.store({"u1": na.UserState(f"{now}-0", now, "login", None, now, 1)}, "5-0", f"{now}-0")
    span = read_user_states_span(redis_client, schema)
    assert redis_client.exists(schema.user_state("u1")) and (span.since, span.through) == ("5-0", "5-0")
    assert span.server == tasks.server_mark(redis_client) != "before-the-loss:0"


def test_a_next_actions_run_goes_on_from_the_stored_states_and_reads_only_the_events_after_them(
    redis_url, redis_client, schema, monkeypatch
):
    now = time.time_ns() // 1_000_000
    users, actions = "abacabacb", ["login", "login", "campaign_create", "login", "analytics_view", "dashboard_view",
                                   "dashboard_view", "creative_upload", "variant_review"]  # fmt: skip
    plan = list(zip(users, actions, strict=True))
    entries = []
    for i, (user, action) in enumerate(plan):  # an hour ago, a minute apart
        ts = now - 3_600_000 + i * 60_000
        entry_id = redis_client.xadd(
            schema.events(), {"ts": ts, "user": user, "action": action, "tenant": "t"}, id=f"{ts}-0"
        )
        entries.append((entry_id, {b"ts": str(ts).encode(), b"user": user.encode(), b"action": action.encode()}))
    resource = RedisResource(url=redis_url, namespace=schema.namespace)
    starts = []
    reading = tasks.read_event_window
    monkeypatch.setattr(
        tasks, "read_event_window", lambda c, s, start, end: starts.append(start) or reading(c, s, start, end)
    )

    def states() -> dict:
        ctx = TaskContext(tasks.builtin_registry().get("next_actions"), ["a", "b", "c"], now_ms=now, redis=resource)
        frame = tasks._user_states(ctx, "UTC").reset_index()
        return (
            frame[["user", "stream_id", "action", "actions_today", "session_minutes"]]
            .set_index("user")
            .to_dict("index")
        )

    whole = states()  # nothing stored: the last 24 hours of the stream
    assert whole["a"]["actions_today"] == 4 and whole["a"]["session_minutes"] == 6.0 and starts[-1] == now - 86_400_000
    rows = pd.DataFrame([tasks.validate_event(e, f)[0] for e, f in entries[:6]])  # a tick that saw the first six
    carried = {u: st.fields() for u, st in na.carried_states(na.latest_states(rows)).items()}
    write_user_states(redis_client, schema, carried)  # no span: nothing says the sensor saw their whole days
    assert states() == whole and starts[-1] == now - 86_400_000
    late = UserStatesSpan(f"{now - 3_600_000 + 30_000}-0", rows["stream_id"].iloc[-1])  # after their sessions began
    write_user_states(redis_client, schema, {}, span=late)
    assert states() == whole and starts[-1] == now - 86_400_000
    write_user_states(redis_client, schema, {}, span=UserStatesSpan("0-0", rows["stream_id"].iloc[-1]))
    assert states() == whole and starts[-1] == now - 3_600_000 + 3 * 60_000  # the oldest stored event on
    redis_client.delete(schema.user_state("c"))
    assert states() == whole and starts[-1] == now - 86_400_000  # c has none: the whole window, for c


# --- the vertical slice ----------------------------------------------------------------------------------


def test_events_to_lake_to_model_to_sensor_to_values_readable_through_the_cache(
    redis_url, redis_client, schema, tmp_path, pg_instance, cache, app_db_url
):
    lake_uri, models = str(tmp_path / "lake"), str(tmp_path / "models")
    lake = Lake(lake_uri)
    res = task_resources(redis_url, schema, lake_uri, models)
    days = DEFAULT_PARTITIONS.days_ending(DAY, 7)
    # 1. an approved ctr_model, trained as the daily graph trains it
    ads_table = write_ad_platform(lake, days[-3:], n_ads=2000, queries_per_day=40_000)
    trained = dg.materialize([ads, ad_impressions, ctr_model], selection=[ctr_model], partition_key=days[-1],
                             instance=pg_instance, resources=res,
                             run_config={"ops": {"ctr_model": {"config": {"n_estimators": 30}}}})  # fmt: skip
    assert trained.success
    # 2. a week of user events in the lake; one hour of them drained from the stream by the user_events asset
    write_user_event_lake(lake, days)
    hour = DEFAULT_PARTITIONS.hours_of(DAY)[14]
    written = lake.read("user_events", hour)
    clock = [0]
    logger = EventLogger(log_client(redis_url), schema, clock=lambda: clock[0])
    columns = ["ts_ms", "user", "action", "entity", "tenant"]
    for ts, user, action, entity, tenant in written[columns].itertuples(index=False):
        clock[0] = int(ts)
        logger.record_event(user, action, entity=entity if isinstance(entity, str) else None, tenant=tenant)
    logger.close()
    drained = dg.materialize([user_events], partition_key=hour, instance=pg_instance, resources=res)
    assert drained.success
    again = lake.read("user_events", hour)
    assert again[columns].equals(written[columns]) and len(again) > 10
    # 3. the next-action model, approved by its blocking check
    config = {"ops": {NEXT_ACTION_MODEL: {"config": {"training_days": 7, "n_estimators": 30}}}}
    model_run = dg.materialize([next_action_model], partition_key=DAY, instance=pg_instance, resources=res,
                               run_config=config)  # fmt: skip
    assert model_run.success
    # 4. query logs of the last hours for the dashboards
    now_ms = time.time_ns() // 1_000_000
    previous_hour = DEFAULT_PARTITIONS.hourly.get_partition_key_for_timestamp(now_ms / 1000 - 3600)
    start = int(DEFAULT_PARTITIONS.hourly.time_window_for_partition_key(previous_hour).start.timestamp() * 1000)
    rows = [
        {"stream_id": f"{start + i}-0", "ts_ms": start + i, "kind": "ctr", "key": f"ad{i % 3}", "hit": i % 2 == 0,
         "latency_us": 50, "user": f"u{i % 4}", "tenant": "t001" if i < 30 else "t002"}
        for i in range(40)
    ]  # fmt: skip
    lake.write("query_logs", previous_hour, query_log_frame(rows))
    # 5. live events through the serving client, a sensor tick, and the runs it requests
    creatives = ads_table["ad_id"].head(3).tolist()
    live = EventLogger(log_client(redis_url), schema)
    live.record_event("u00001", "login", tenant="t001")
    for creative in creatives:
        live.record_event("u00002", "creative_upload", entity=creative, tenant="t002")
    live.record_event("u00002", "creative_upload", entity="never-seen-creative", tenant="t002")
    live.record_event("u00003", "campaign_create", entity="u00003-c1", tenant="t002")
    live.close()
    result = tick(build_user_event_sensor(), pg_instance, redis_url, schema, models, registry_url=app_db_url)
    summary = sorted((r.tags[TASK_TAG], int(r.tags[PRIORITY_TAG])) for r in result.run_requests)
    assert ("ctr", 8) in summary and ("next_actions", 7) in summary and ("next_actions", 9) in summary
    assert ("dashboard", 9) in summary  # t002 by the campaign; t001 by the login (3), unless a prediction ran
    outcomes = {}
    for request in sorted(result.run_requests, key=lambda r: -int(r.tags[PRIORITY_TAG])):
        run_config = request.run_config
        run_config["ops"]["run_precompute_task"]["config"]["backoff_s"] = 0.01
        run = precompute_tasks_job.execute_in_process(
            run_config=run_config, tags=request.tags, instance=pg_instance, resources=res
        )
        assert run.success
        outcomes[(request.tags[TASK_TAG], request.tags[PRIORITY_TAG])] = op_metadata(run)
    assert outcomes[("ctr", "8")]["written"] == 3 and outcomes[("ctr", "8")]["failed"] == 1
    assert "never-seen-creative" in outcomes[("ctr", "8")]["failed_entities"]
    # 6. every value is readable through the serving client
    for creative in creatives:
        assert 0 < cache.get("ctr", creative) < 1
    for user in ("u00001", "u00003"):
        value = cache.get("next_actions", user)
        assert set(value["probabilities"]) == set(ACTIONS)
        assert sum(value["probabilities"].values()) == pytest.approx(1, abs=0.01)
    board = cache.get("dashboard", "t001")
    assert board["tenant"] == "t001" and board["queries"] == 30 and board["users"] == 4
    assert cache.get("dashboard", "t002")["queries"] == 10
    assert 800 < redis_client.ttl(schema.live("dashboard", "t001")) <= 900
    run_tags = [r.tags for r in pg_instance.get_runs()]
    assert any(t.get(PRIORITY_TAG) == "9" for t in run_tags)


# --- registration beside the project's Definitions ----------------------------------------------------------


def test_the_registration_loads_with_the_project(monkeypatch, tmp_path):
    """In the deployment's Definitions, on a deployment timezone: every name resolves, the sensor's and the op's
    resources are the project's, and the schedules fire in that timezone."""
    monkeypatch.setenv("PRECOMPUTE_LAKE_URI", str(tmp_path / "lake"))
    monkeypatch.setenv("PRECOMPUTE_MODEL_STORE", str(tmp_path / "models"))
    settings = Settings("Europe/Berlin", "2026-01-01")
    repo = build_definitions(settings).get_repository_def()
    keys = {k.to_user_string() for k in repo.asset_graph.get_all_asset_keys()}
    assert {"user_events", "user_event_quarantine", "next_action_model"} <= keys
    checks = {(c.asset_key.to_user_string(), c.name) for c in repo.asset_graph.asset_check_keys}
    assert {("user_events", "quarantine_rate"), ("next_action_model", "beats_baselines")} <= checks
    assert repo.get_job("precompute_tasks_job") and repo.get_job("user_events_job")
    assert repo.get_sensor_def("user_event_sensor").job_name == "precompute_tasks_job"
    hourly = repo.get_schedule_def("user_events_hourly")
    assert hourly.execution_timezone == "Europe/Berlin" and hourly.cron_schedule == "5 * * * *"
    assert repo.get_schedule_def("next_action_model_daily").cron_schedule == "30 3 * * *"
    job = repo.get_job("user_events_job")
    assert job.partitions_def.timezone == "Europe/Berlin"


def campaign_forecast(campaign_id: str, ctx: TaskContext) -> dict:
    """The worked example of a user task type (README): one value per campaign, computed from the entity."""
    if campaign_id.startswith("broken"):
        raise LookupError(f"no stats for {campaign_id}")
    return {"campaign": campaign_id, "expected_clicks": 10.0 * len(campaign_id)}


def register_example(registry: TaskRegistry) -> None:
    """What an entry point of the group ``precompute_assets.task_types`` may name: a function taking the registry
    (or a module that calls ``register_task_type`` / ``on_event`` when imported)."""
    registry.register(TaskType("campaign_forecast", campaign_forecast, ttl_s=6 * 3600, priority=9, batch_size=200))
    registry.on_event("campaign_create", "campaign_forecast", entity="entity")


def test_task_types_from_entry_points_are_loaded_and_requested(monkeypatch):
    points = [
        EntryPoint("example", "precompute_assets_tests.defs.test_tasks:register_example", ENTRY_POINT_GROUP),
        EntryPoint("broken", "no_such_module_for_tasks:register", ENTRY_POINT_GROUP),
    ]
    monkeypatch.setattr(tasks, "entry_points", lambda group: [p for p in points if p.group == group])
    registry = builtin_registry()
    monkeypatch.setattr(tasks, "REGISTRY", registry)
    assert tasks.load_entry_points() == ["example"]  # the broken one is logged and skipped
    assert registry.get("campaign_forecast").priority == 9
    now = time.time_ns() // 1_000_000
    fields = {b"ts": str(now).encode(), b"user": b"u1", b"action": b"campaign_create", b"entity": b"spring-sale",
              b"tenant": b"acme"}  # fmt: skip
    plan = plan_events(registry, [(f"{now}-0".encode(), fields)])
    assert plan.wanted[("campaign_forecast", "spring-sale")] == 9
    requests = run_requests(registry, plan, "k")
    assert {(r.tags[TASK_TAG], r.tags[PRIORITY_TAG]) for r in requests} == {
        ("campaign_forecast", "9"), ("dashboard", "9"), ("next_actions", "9"),
    }  # fmt: skip


def test_a_sensor_thread_waits_for_the_entry_points_another_thread_is_loading(monkeypatch):
    """The sensor daemon ticks user_event_sensor and live_refresh_sensor at once: the second caller of task_registry
    got the registry while the first was still loading the entry points, and planned its tick without their types."""
    loading, release = threading.Event(), threading.Event()

    def slow_example(registry: TaskRegistry) -> None:
        loading.set()
        release.wait(timeout=30)
        register_example(registry)

    monkeypatch.setattr(tasks, "entry_points", lambda group: [EntryPoint("example", "x:y", group)])
    monkeypatch.setattr(EntryPoint, "load", lambda point: slow_example)
    monkeypatch.setattr(tasks, "REGISTRY", builtin_registry())
    monkeypatch.setattr(tasks, "_entry_points_loaded", False)
    first = threading.Thread(target=tasks.task_registry)
    first.start()
    assert loading.wait(timeout=30)
    seen: list[set[str]] = []
    second = threading.Thread(target=lambda: seen.append(set(tasks.task_registry().types)))
    second.start()
    second.join(timeout=0.5)  # time to return early, were it not made to wait; it never fails the test itself
    release.set()
    first.join(timeout=30)
    second.join(timeout=30)
    assert seen and "campaign_forecast" in seen[0]


# --- proactive refresh --------------------------------------------------------------------------------------


def test_live_refresh_requests_hot_keys_near_expiry_and_never_the_cold_tail(
    redis_url, redis_client, schema, tmp_path, pg_instance, cache, app_db
):
    from precompute_assets.defs.tasks import REFRESH_PRIORITY
    from precompute_assets.serving import QueryLogger

    name = unique("board")
    register_task_type(name, lambda entity, ctx: {"tenant": entity, "as_of_ms": ctx.now_ms}, ttl_s=900, priority=5)
    other = unique("forecast")  # a second task type: its hot key is fresh, nothing to do
    register_task_type(other, lambda entity, ctx: 1.0, ttl_s=600, priority=6)
    # hot and expiring (< 20 % of 900 s left), hot and fresh, cold and expiring, hot but only published (no live key)
    for key, ttl_ms in [("hot", 60_000), ("fresh", 800_000), ("cold", 60_000)]:
        redis_client.set(schema.live(name, key), b'{"old": 1}', px=ttl_ms)
    redis_client.set(schema.live(other, "x"), b"1.0", px=550_000)
    reader = PredictionCache(connect(redis_url, socket_timeout=5), schema=schema, pointer_ttl_s=0,
                             logger=QueryLogger(log_client(redis_url), schema))  # fmt: skip
    for _ in range(5):
        reader.get(name, "hot")
        reader.get(name, "fresh")
        reader.get(other, "x")
        reader.get(name, "never-written")
    reader.close()
    res = task_resources(redis_url, schema, str(tmp_path / "lake"), str(tmp_path / "models"))
    sensor = build_live_refresh_sensor(registry=task_registry)

    def evaluate(cursor=None):
        resources = {"redis": res["redis"], "campaign_registry": CampaignRegistryResource(url=app_db)}
        context = dg.build_sensor_context(instance=pg_instance, cursor=cursor, resources=resources)
        return sensor(context)

    result = evaluate()
    (request,) = result.run_requests
    assert request.tags == {PRIORITY_TAG: str(REFRESH_PRIORITY), TASK_TAG: name, **tasks.RERUN_IF_WORKER_DIES}
    assert request.run_config["ops"]["run_precompute_task"]["config"]["entities"] == ["hot"]
    # The next tick does not request it again while its run is queued (the cursor remembers it)...
    again = evaluate(result.cursor)
    assert (
        not again.run_requests
        and "1 due (1 already requested, 0 held for campaigns, 0 waiting for the campaign registry)"
        in again.skip_reason.skip_message
    )
    # ...and once the run wrote it with the full TTL it is no longer due.
    run = precompute_tasks_job.execute_in_process(
        run_config=request.run_config, tags=request.tags, instance=pg_instance, resources=res
    )
    assert run.success and op_metadata(run)["written"] == 1
    assert cache.get(name, "hot")["tenant"] == "hot" and redis_client.pttl(schema.live(name, "hot")) > 890_000
    assert cache.get(name, "cold") == {"old": 1} and redis_client.pttl(schema.live(name, "cold")) <= 60_000
    after = evaluate()
    assert not after.run_requests and "0 due" in after.skip_reason.skip_message


def test_a_hot_value_that_expired_is_refreshed_after_the_cooldown_unless_the_version_serves_it(
    redis_url, redis_client, schema
):
    """With a type's TTL of 300 s under the 600 s cooldown, a refresh that failed let a hot key expire, and a gone
    key was never due again (h_inval); a key the published version serves is gone from the live tier by design,
    and is never due (h_diff)."""
    from precompute_assets.defs.tasks import TaskRegistry, plan_refresh
    from precompute_assets.serving import QueryLogger

    name = unique("short")
    registry = TaskRegistry()
    registry.register(TaskType(name, lambda entity, ctx: 1, 300, 5))
    publish_version(redis_client, name, "v1", [("p1", 1)], n_keys=1, schema=schema)
    redis_client.set(schema.live(name, "t1"), b"1", px=50_000)  # 50 s of 300 left: due (under 20 %)
    reader = PredictionCache(connect(redis_url, socket_timeout=5), schema=schema, pointer_ttl_s=0,
                             logger=QueryLogger(log_client(redis_url), schema))  # fmt: skip
    assert reader.get_many(name, ["t1", "p1"]) == [1, 1]
    reader.close()
    now = time.time_ns() // 1_000_000
    first = plan_refresh(registry, redis_client, schema, now_ms=now, window_s=900)
    assert list(first.plan.wanted) == [(name, "t1")] and first.hot == 2 and first.due == 1  # not p1: published
    redis_client.delete(schema.live(name, "t1"))  # its run failed: the value expired while read
    cooling = plan_refresh(registry, redis_client, schema, now_ms=now + 310_000, window_s=900,
                           requested=first.requested)  # fmt: skip
    assert not cooling.plan.wanted and cooling.cooling == 1  # its run may still be queued: not asked twice
    later = plan_refresh(registry, redis_client, schema, now_ms=now + 601_000, window_s=900,
                         requested=cooling.requested)  # fmt: skip
    assert list(later.plan.wanted) == [(name, "t1")]


def test_the_live_refresh_leaves_the_ctr_keys_campaigns_hold(
    redis_url, redis_client, schema, pg_instance, app_db, capsys
):
    """It took a warm campaign's CTR keys for the ctr task type's: read, and under 20 % of 7 days left, they were
    refreshed from the lake's features for 7 days (the budget split over values no longer served), and a cancelled
    campaign's keys, hot and gone after its cleanup, were written back (h_events2). A campaign holds only what its
    warming wrote (a far launch held its ads' keys for weeks, h_diff20), and a registry that does not answer holds back
    only the ctr keys, with a warning that names it (it skipped every kind's, blaming Redis)."""
    from precompute_assets.serving import QueryLogger
    from precompute_assets.storage.campaigns import CampaignRegistry

    now = datetime.now(UTC)
    registry = CampaignRegistry(app_db)
    registry.ensure_schema()
    warm, far = unique("camp"), unique("far")
    held, later, plain = unique("held-ad"), unique("later-ad"), unique("plain-ad")
    features = {"category": 1, "quality": 0.5, "bid": 1.0, "text_len": 40}
    registry.register(warm, "acme", now + timedelta(minutes=5), [{"ad_id": held, **features}],
                      end_at=now + timedelta(hours=2))  # fmt: skip
    registry.register(far, "acme", now + timedelta(days=30), [{"ad_id": later, **features}])  # not warmed yet
    assert registry.record_written(warm, 1)  # what its warming records before it writes...
    assert registry.mark_warm(warm, 1, warm_until=now + timedelta(hours=3))  # ...and once it wrote
    value = codec_for("ctr").encode(0.04)
    for ad in (held, later, plain):  # 3 h of 7 days left: due for a ctr task
        redis_client.set(schema.live("ctr", ad), value, px=3 * 3_600_000)
    name = unique("board")
    register_task_type(name, lambda entity, ctx: 1.0, ttl_s=900, priority=5)
    redis_client.set(schema.live(name, "t1"), b"1.0", px=60_000)  # another kind's key, due too
    reader = PredictionCache(connect(redis_url, socket_timeout=5), schema=schema, pointer_ttl_s=0,
                             logger=QueryLogger(log_client(redis_url), schema))  # fmt: skip
    assert reader.get_many("ctr", [held, later, plain]) == [pytest.approx(0.04)] * 3
    assert reader.get(name, "t1") == 1.0
    reader.close()
    redis_resource = RedisResource(url=redis_url, namespace=schema.namespace)
    sensor = build_live_refresh_sensor()

    def refreshed(registry_url: str = app_db) -> tuple[list[str], str]:
        resources = {"redis": redis_resource, "campaign_registry": CampaignRegistryResource(url=registry_url)}
        result = sensor(dg.build_sensor_context(instance=pg_instance, resources=resources))
        entities = [
            e for r in result.run_requests for e in r.run_config["ops"]["run_precompute_task"]["config"]["entities"]
        ]
        return sorted(entities), "" if result.run_requests else result.skip_reason.skip_message

    assert refreshed()[0] == sorted([later, plain, "t1"])  # the warm campaign's key is its own
    capsys.readouterr()
    assert refreshed("postgresql://127.0.0.1:1/never")[0] == ["t1"]  # the ctr keys wait; the others do not
    warned = capsys.readouterr().err
    assert "PRECOMPUTE_APP_DB_URL (postgresql://127.0.0.1:1/never) does not answer" in warned, warned
    assert "the 3 due ctr keys wait for the next tick" in warned and "Redis" not in warned, warned
    # counted as waiting, not as held: no campaign holds them (h_readme3)
    assert "0 held for campaigns, 3 waiting for the campaign registry" in warned, warned
    # Re-registered after its warming, a campaign no longer knows when its old values expire: its next warming writes
    # its keys again, and until then they are anyone's (it held them to its end, or for good when open-ended).
    registry.register(warm, "acme", now + timedelta(days=30), [{"ad_id": held, **features}],
                      end_at=now + timedelta(days=31))  # fmt: skip
    assert refreshed()[0] == sorted([held, later, plain, "t1"])
    assert registry.record_written(warm, 2) and registry.mark_warm(warm, 2, warm_until=now + timedelta(days=31))
    assert refreshed()[0] == sorted([later, plain, "t1"])
    registry.cancel(warm)
    redis_client.delete(schema.live("ctr", held))  # what the cancelled campaign's cleanup does
    assert refreshed()[0] == sorted([held, later, plain, "t1"])  # no campaign holds it: refreshed as any other


def warm_campaign(app_db: str):
    """A campaign launching in 5 minutes whose warming wrote its one ad (held) and marked it warm, and an ad of no
    campaign (free): ``(registry, campaign_id, held, free)``."""
    from precompute_assets.storage.campaigns import CampaignRegistry

    now = datetime.now(UTC)
    registry = CampaignRegistry(app_db)
    registry.ensure_schema()
    camp, held, free = unique("camp"), unique("held-ad"), unique("free-ad")
    features = {"category": 1, "quality": 0.5, "bid": 1.0, "text_len": 40}
    registry.register(camp, "acme", now + timedelta(minutes=5), [{"ad_id": held, **features}],
                      end_at=now + timedelta(hours=2))  # fmt: skip
    assert registry.record_written(camp, 1) and registry.mark_warm(camp, 1, warm_until=now + timedelta(hours=3))
    return registry, camp, held, free


def test_an_upload_of_a_creative_a_warm_campaign_holds_leaves_its_ctr_to_the_campaign(
    redis_url, redis_client, schema, pg_instance, app_db, tmp_path, capsys
):
    """A creative_upload event's ctr task scored the ad from the lake's features over the value its campaign's warming
    scored from the campaign's own, for 7 days (the live refresh already left it alone, h_events2). The event sensor
    now leaves it to the campaign too; a registry that does not answer cannot tell, and the task is requested with a
    warning (no later tick asks for an event's task again)."""
    registry, camp, held, free = warm_campaign(app_db)
    stream = f"{schema.prefix}:events"
    after = redis_client.xadd(stream, {"ts": str(time.time_ns() // 1_000_000), "user": "u0", "action": "noop"})
    for ad in (held, free):
        redis_client.xadd(stream, {"ts": str(time.time_ns() // 1_000_000), "user": "u1", "action": "creative_upload",
                                   "entity": ad, "tenant": "acme"})  # fmt: skip
    sensor = build_user_event_sensor()

    def uploads(registry_url: str) -> list[str]:
        result = tick(sensor, pg_instance, redis_url, schema, str(tmp_path), registry_url=registry_url,
                      cursor=after.decode())  # fmt: skip
        return [
            e
            for r in result.run_requests
            if r.tags[TASK_TAG] == "ctr"
            for e in r.run_config["ops"]["run_precompute_task"]["config"]["entities"]
        ]

    assert uploads(app_db) == [free]
    assert "1 ctr tasks left to the campaigns that hold their ads" in capsys.readouterr().err
    assert sorted(uploads("postgresql://127.0.0.1:1/never")) == sorted([held, free])
    warned = capsys.readouterr().err
    assert "PRECOMPUTE_APP_DB_URL (postgresql://127.0.0.1:1/never) does not answer" in warned, warned
    assert "2 ctr tasks requested without knowing whether a campaign holds them" in warned, warned
    registry.cancel(camp)
    assert sorted(uploads(app_db)) == sorted([held, free])  # no campaign holds it now


def test_a_ctr_task_run_after_a_campaigns_warming_leaves_the_campaigns_values(
    redis_url, redis_client, schema, tmp_path, pg_instance, app_db, cache, capsys
):
    """A ctr task requested before a campaign's warming (an upload's) and run after it wrote the lake's CTR over the
    campaign's, for the task's TTL: the sensors checked only when they requested it. The run now leaves the ads the
    campaign holds, counted; a registry that does not answer leaves none, with a warning that names it."""
    registry, camp, held, free = warm_campaign(app_db)
    redis_client.set(schema.live("ctr", held), codec_for("ctr").encode(0.04), px=3 * 3_600_000)  # the warming's
    name = unique("ctr_from_lake")
    register_task_type(name, lambda entity, ctx: 0.5, ttl_s=600, priority=8, kind="ctr")

    def run(registry_url: str | None) -> dict:
        res = task_resources(redis_url, schema, str(tmp_path / "lake"), str(tmp_path / "models"), registry_url)
        result = precompute_tasks_job.execute_in_process(run_config=task_run_config(name, [held, free]), resources=res,
                                                         instance=pg_instance)  # fmt: skip
        assert result.success
        return op_metadata(result)

    meta = run(app_db)
    assert (meta["written"], meta["campaign_held"]) == (1, 1)
    assert cache.get("ctr", held) == pytest.approx(0.04) and cache.get("ctr", free) == 0.5
    assert "1 of 2 written, 1 left to the campaigns that hold them" in capsys.readouterr().err
    meta = run("postgresql://127.0.0.1:1/never")
    assert (meta["written"], meta["campaign_held"]) == (2, 0) and cache.get("ctr", held) == 0.5
    warned = capsys.readouterr().err
    assert "PRECOMPUTE_APP_DB_URL (postgresql://127.0.0.1:1/never) does not answer" in warned, warned
    assert "2 ctr values written without knowing whether a campaign holds them" in warned, warned
    meta = run(None)  # PRECOMPUTE_APP_DB_URL not set where the Definitions loaded: the run is not refused whole
    assert (meta["written"], meta["campaign_held"]) == (2, 0)
    assert "PRECOMPUTE_APP_DB_URL is not set" in capsys.readouterr().err


def test_both_task_sensors_skip_with_a_warning_when_redis_does_not_answer(tmp_path, capsys):
    """They read Redis on the resource's default client (10 s a command, two retries), which raises dg.Failure when the
    server does not answer: a tick every second that failed. They now skip, say why, and keep their cursors."""
    unasked = CampaignRegistryResource(url="postgresql://127.0.0.1:1/never")  # Redis first: never reached
    down = {"redis": RedisResource(url="redis://127.0.0.1:1/0", namespace="down"), "deployment": DeploymentResource(),
            "model_store": ModelStoreResource(root=str(tmp_path / "models")), "campaign_registry": unasked}  # fmt: skip
    with dg.instance_for_test() as instance:
        events = build_user_event_sensor()(dg.build_sensor_context(instance=instance, cursor="5-0", resources=down))
        context = dg.build_sensor_context(
            instance=instance, resources={"redis": down["redis"], "campaign_registry": unasked}
        )
        refresh = build_live_refresh_sensor()(context)
    assert isinstance(events, dg.SkipReason) and "the user events after 5-0 were not read" in events.skip_message
    assert isinstance(refresh, dg.SkipReason) and "Redis does not answer" in refresh.skip_message
    warned = capsys.readouterr().err
    assert "not checked the user events after 5-0" in warned and "not checked which live values" in warned


def test_a_model_version_the_store_lacks_is_unavailable_not_retried(tmp_path):
    """A model store restored from an older backup: the ctr and next_actions tasks raised a KeyError for each entity,
    retried in rounds and then by the run's retries (h_diff23)."""
    from types import SimpleNamespace

    from precompute_assets.defs.tasks import TaskUnavailable, _load

    ctx = SimpleNamespace(model_store=ModelStoreResource(root=str(tmp_path / "models")))
    with pytest.raises(
        TaskUnavailable, match=r"not found in store .*restore the model store \(PRECOMPUTE_MODEL_STORE\)"
    ):
        _load(ctx, "ctr_model", "2026-11-18.abc")
