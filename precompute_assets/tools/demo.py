"""The demo: days of synthetic ad traffic through the serving client, the daily graph through Dagster, a
campaign launching in the next day warmed by the launch sensor, then the next day's traffic served from the
warmed cache, and the policies compared on that same traffic."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Collection, Hashable, Sequence
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import dagster as dg
import numpy as np
import pandas as pd

from ..defs.partitions import deployment_partitions
from ..defs.publishing import newer_recorded, rolled_back_over
from ..defs.query_logs import QUARANTINE_OF
from ..defs.runs import DAEMON_FRESH_S, daemon_heartbeat_age_s
from ..ml.replay import replay
from ..serving import KeySchema, Pointer, PredictionCache, connect
from ..serving.urls import redact
from ..stack import ENV_APP_DB, ENV_DAGSTER_PG, ENV_LAKE, ENV_MODEL_STORE, ENV_REDIS, Stack, StackError
from ..storage.lake import Lake
from ..workload.ads import generate_traffic, make_ads, true_ctr
from ..workload.serve import SimClock, serve_traffic
from .measure import percentile_us, timed
from .progress import heartbeat, progress

DEMO_TENANT = "demo"
# Dagster's console logger at WARNING for the demo's runs: at DEBUG its event lines (about 4,000) buried the stages and
# the summary; a run's warnings and failures still show.
RUN_LOGS = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
# The replayed day lies in the past, but the registry, the sensor and the warming run work on the real clock:
# the demo campaign is registered to launch this long after now, which stands for its launch in the replayed day.
CAMPAIGN_LEAD = timedelta(hours=1)
HOUR_MS = 3_600_000
EVENT_DAYS = 7  # days of users' sessions the demo's next_action_model is trained on


@contextmanager
def _progress(total: int, label: str):
    with progress(desc=label, total=total, unit="queries") as bar:
        yield bar.update


class Stages(dict):
    """Wall time of each demo stage, in seconds."""

    @contextmanager
    def timed(self, name: str, *, counted: bool = False):
        """Time stage ``name``; one of minutes of Dagster runs says it is working, in a log too, unless ``counted``
        (its own progress counter says so)."""
        print(f"== {name}", flush=True)
        started = time.perf_counter()
        with nullcontext() if counted else heartbeat(name):
            yield
        self[name] = round(time.perf_counter() - started, 2)


def _by_day(chunks: list[pd.DataFrame], day_starts_ms: list[int]) -> list[pd.DataFrame]:
    traffic = pd.concat(chunks, ignore_index=True)
    bounds = [*day_starts_ms, day_starts_ms[-1] + 86_400_000]
    return [
        traffic[(traffic["ts_ms"] >= lo) & (traffic["ts_ms"] < hi)] for lo, hi in zip(bounds, bounds[1:], strict=False)
    ]


def is_own_folder(uri: str, stack: Stack, folder: str) -> bool:
    """Whether ``uri`` is the stack's own ``folder`` (``$PRECOMPUTE_HOME/lake`` or ``/models``, as ``precompute env``
    exports them), which the demo may write over; a URI (``s3://...``) or another folder is someone's data."""
    return "://" not in uri and Path(uri).expanduser().resolve() == (stack.home / folder).resolve()


def foreign_state(stack: Stack, env: dict[str, str]) -> list[str]:
    """The variables naming Dagster's storage, the application database or the model store of someone else: the
    demo's runs would land in their run history, its synthetic ``ctr_model`` would become their newest approved
    model, and the day's ``ctr_predictions`` of that deployment would follow it."""
    foreign = [variable for variable in (ENV_DAGSTER_PG, ENV_APP_DB) if not stack.embeds(variable)]
    return foreign + ([] if is_own_folder(env[ENV_MODEL_STORE], stack, "models") else [ENV_MODEL_STORE])


DEMO_HISTORY = ("ad_impressions", "query_logs")  # what the demo writes per day (an hour) of its new catalog


def clear_other_days(lake: Lake, days: list[str]) -> int:
    """Delete the partitions of ``DEMO_HISTORY`` outside ``days`` (an earlier demo's, of another catalog: a demo of
    fewer days trained ctr_model on those impressions too, with other ads under the same ids); how many."""
    deleted = 0
    for asset in DEMO_HISTORY:
        for partition in lake.partitions(asset):
            if not partition.startswith(tuple(days)):
                lake.delete(asset, partition)
                deleted += 1
    return deleted


def run_demo(
    stack: Stack,
    *,
    days: int = 3,
    queries_per_day: int = 40_000,
    n_ads: int = 20_000,
    top_n: int = 1000,
    capacity: int | None = None,
    n_docs: int = 50_000,
    seed: int = 0,
) -> dict:
    """``days`` of history ending yesterday-minus-one, the daily graph for the last of them, then yesterday's
    traffic served end to end from the warmed cache, and the policies compared on it at ``capacity`` keys
    (default ``2 * top_n``), all warmed on the same history (see ``compare_policies``)."""
    capacity = 2 * top_n if capacity is None else capacity
    if capacity < top_n:
        raise ValueError(f"capacity {capacity} is smaller than top_n {top_n}: the precomputed keys would not fit")
    from ..definitions import defs as load_definitions

    defs = load_definitions()
    env = stack.env()
    if not is_own_folder(env[ENV_LAKE], stack, "lake"):  # before the Redis check and anything written, as that check is
        raise StackError(
            f"the demo replaces the lake's ads and ad_impressions: run it on the stack's own lake, not on "
            f"{redact(env[ENV_LAKE])} of {ENV_LAKE}"
        )
    if not stack.status()[0].embedded:  # the Redis entry
        # One line and exit code 2 like every command error (SystemExit exited 1), before anything is written.
        raise StackError(f"the demo resets Redis: run it on the embedded stack, not on the server of {ENV_REDIS}")
    if foreign := foreign_state(stack, env):
        raise StackError(
            "the demo records its runs and approves a synthetic ctr_model: run it on the stack's own state, not on "
            f"what {', '.join(foreign)} name{'s' if len(foreign) == 1 else ''}"
        )
    instance = dg.DagsterInstance.get()
    age = daemon_heartbeat_age_s(instance)
    if age is not None and age < DAEMON_FRESH_S:  # its cache_health put the last demo's version back into Redis
        raise StackError(
            f"a Dagster daemon runs on this stack (`precompute dev`?; its last heartbeat {age:.0f} s ago): its sensors"
            " and schedules would act on the demo's reset Redis and lake while it runs; stop it first (a daemon"
            f" stopped just now counts as running until its last heartbeat is {DAEMON_FRESH_S} s old: retry in"
            f" {DAEMON_FRESH_S - age:.0f} s)"
        )
    partitions = deployment_partitions()
    tz = ZoneInfo(partitions.timezone)
    today = datetime.now(tz).replace(hour=0, minute=0, second=0, microsecond=0)
    day_starts = [today - timedelta(days=days + 1 - d) for d in range(days + 1)]
    day_keys = [d.date().isoformat() for d in day_starts]
    starts_ms = [int(d.timestamp() * 1000) for d in day_starts]
    if blocked := publish_blocked(instance, day_keys[-2]):  # before anything is reset: it would crash half-way
        raise StackError(
            f"the demo publishes the predictions of {day_keys[-2]}, and ctr_cache would not: {blocked} (the daily "
            "schedule ran on this stack); run the demo with another PRECOMPUTE_HOME, or after `precompute down --purge`"
        )
    stages = Stages()
    redis_url = env[ENV_REDIS]
    connect(redis_url, socket_timeout=10).flushdb()  # embedded demo server only (checked above)
    lake = Lake(env[ENV_LAKE])

    with stages.timed("generate_workload"):
        ads = make_ads(n_ads, days=days + 1, seed=seed)
        clear_other_days(lake, day_keys)
        lake.write("ads", None, ads)
        live_ctr = dict(zip(ads["ad_id"], true_ctr(ads).tolist(), strict=True))
        chunks = list(
            generate_traffic(ads, start_ms=starts_ms[0], days=days + 1, queries_per_day=queries_per_day, seed=seed)
        )
        traffic = _by_day(chunks, starts_ms)
        for key, day in zip(day_keys, traffic, strict=True):
            lake.write("ad_impressions", key, day[["ts_ms", "ad_id", "clicked"]])
    history, next_day = traffic[:-1], traffic[-1]

    with stages.timed("serve_history", counted=True):
        clock = SimClock()
        cache = PredictionCache.from_url(redis_url, clock=clock, socket_timeout=1.0)
        with _progress(sum(map(len, history)), "serving history") as bar:
            serve_traffic(cache, clock, history, live_ctr.__getitem__, progress=bar)
        cache.close()

    with stages.timed("materialize_query_logs"):
        hours = [h for key in day_keys[:-1] for h in partitions.hours_of(key)]
        logged = drain(defs.resolve_job_def("query_logs_job"), instance, lake, hours, "query_logs")
        print(f"   {logged} events in {days * 24} hourly partitions", flush=True)

    with stages.timed("daily_precompute"):
        partition = day_keys[-2]
        # demand_model (the LSTM: its step budget, a 30 s safety stop here) scores every strategy at top_ads' N.
        demand_config = {"max_seconds": 30.0, "top_n": top_n}
        result = defs.resolve_job_def("daily_precompute_job").execute_in_process(
            partition_key=partition,
            instance=instance,
            run_config={
                **RUN_LOGS,
                "ops": {"top_ads": {"config": {"top_n": top_n}}, "demand_model": {"config": demand_config}},
            },
        )
        meta = {
            step: result.asset_materializations_for_node(step)[0].metadata
            for step in ("ctr_model", "top_ads", "ctr_cache")
        }
        demand_meta = _metadata(result, "demand_model")

    with stages.timed("warm_campaign"):
        # The ads the workload launches on the replayed day, registered as one campaign and warmed by the sensor.
        launching = ads[ads["created_day"] == days]
        campaign = warm_demo_campaign(
            env[ENV_APP_DB], redis_url, defs, instance, launching, campaign_id=f"demo-launch-{day_keys[-1]}"
        )

    with stages.timed("serve_next_day"):
        # Ours in the comparison is exactly the version ctr_cache published in this run.
        published = published_keys(redis_url, "ctr", version=meta["ctr_cache"]["version"].value)
        misses: list[tuple[int, str]] = []
        served = serve_end_to_end(redis_url, next_day, published, live_ctr.__getitem__, misses=misses)
        lookup_us = ours_latency(redis_url, next_day["ad_id"].head(5000).tolist())
        if "ad_ids" in campaign:
            campaign = campaign_first_hour(
                redis_url, campaign, history, next_day, misses, published, live_ctr.__getitem__
            )

    with stages.timed("compare_policies"):
        history_keys = [day["ad_id"].to_numpy() for day in history]
        rates = compare_policies(history_keys, next_day["ad_id"].to_numpy(), published, top_n=top_n, capacity=capacity)

    with stages.timed("predictive_precompute"):
        predictive = predictive_precompute(redis_url, defs, instance, lake, day_keys, seed=seed)

    with stages.timed("embed_documents"):
        embeddings = embed_demo_documents(stack, defs, instance, n_docs=n_docs, seed=seed)

    return {
        "history_days": days,
        "queries_per_day": queries_per_day,
        "ads": n_ads,
        "events_logged": logged,
        "precomputed_day": partition,
        "top_n": top_n,
        **{name: round(value, 4) if isinstance(value, float) else value for name, value in rates.items()},
        "served_end_to_end": served,
        "campaign": campaign,
        "top_ads_coverage_last_day": round(meta["top_ads"]["coverage_last_day"].value, 4),
        "auc": round(meta["ctr_model"]["auc"].value, 4),
        "baseline_auc": round(meta["ctr_model"]["baseline_auc"].value, 4),
        "keys_published": meta["ctr_cache"]["keys_written"].value,
        "publish_keys_per_s": (  # none for an empty version
            round(meta["ctr_cache"]["keys_per_s"].value) if "keys_per_s" in meta["ctr_cache"] else None
        ),
        "get_p99_us": lookup_us,
        "demand_model": {
            key: round(demand_meta[key], 4) if isinstance(demand_meta.get(key), float) else demand_meta.get(key)
            for key in ("strategy", "hit_rate_lstm", "hit_rate_frequency", "hit_rate_seasonal", "hit_rate_ewma")
        },
        "top_ads_strategy": meta["top_ads"]["strategy"].value,
        "predictive_precompute": predictive,
        **embeddings,
        "stage_seconds": dict(stages),
        "dagster_home": env["DAGSTER_HOME"],
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def compare_policies(
    history_days: Sequence[np.ndarray],
    next_day: np.ndarray,
    published: Collection[Hashable],
    *,
    top_n: int,
    capacity: int,
) -> dict:
    """Hit rates on ``next_day`` at equal capacity in keys, every policy warmed on the same ``history_days``.

    Ours: the ``published`` set (at most ``top_n`` keys) plus a read-through LRU of ``capacity - top_n`` keys.
    Read-through: an LRU of ``capacity`` keys. Static top-N, and the two bounds (Belady, the read-through
    optimum; oracle preload, the precompute optimum), as ``replay`` defines them.
    """
    if not history_days:
        raise ValueError("need at least one day of history to warm the caches")
    if capacity < top_n:
        raise ValueError(f"capacity {capacity} is smaller than top_n {top_n}")
    result = replay(
        [*history_days, next_day],
        top_n=top_n,
        capacity=capacity,
        warmup_days=len(history_days),
        precomputed=[published],
    )
    return {
        "capacity_keys": capacity,
        "warmup_days": len(history_days),
        "requests_compared": result["requests"],
        "hit_rate_ours": result["hit_rate_ours"],
        "hit_rate_read_through": result["hit_rate_lru"],
        "hit_rate_static_top_n": result["hit_rate_static_top_n"],
        "hit_rate_belady": result["hit_rate_belady"],
        "hit_rate_oracle_preload": result["hit_rate_oracle_preload"],
    }


def published_keys(redis_url: str, kind: str, *, version: str) -> set[str]:
    """The keys of the current published ``version`` of ``kind``, read bucket by bucket from Redis."""
    client, schema = connect(redis_url, socket_timeout=10), KeySchema()
    try:
        raw = client.get(schema.pointer(kind))
        pointer = None if raw is None else Pointer.decode(raw)
        if pointer is None or pointer.version != version:
            current = pointer.version if pointer else "nothing"
            raise RuntimeError(f"{kind} version {version} is not the current one ({current} is)")
        pipe = client.pipeline(transaction=False)
        for bucket in range(pointer.buckets):
            pipe.hkeys(schema.bucket(kind, version, bucket))
        return {key.decode() for fields in pipe.execute() for key in fields}
    finally:
        client.close()


def serve_end_to_end(
    redis_url: str,
    next_day: pd.DataFrame,
    published: set[str],
    compute: Callable[[str], float],
    *,
    misses: list[tuple[int, str]] | None = None,
) -> dict:
    """The day through the real ``PredictionCache``: the published version, then live read-through keys.

    A miss is exactly a call of ``compute``, so hits on published keys (the version) and on the others (live
    keys) are counted without touching the client. ``misses``, when given, receives each miss as
    ``(ts_ms, key)``.
    """
    missed: list[str] = []

    def compute_and_count(key: str) -> float:
        missed.append(key)
        if misses is not None:
            misses.append((clock.now_ms, key))
        return compute(key)

    clock = SimClock()
    cache = PredictionCache.from_url(redis_url, clock=clock, socket_timeout=1.0)
    with _progress(len(next_day), "serving next day (precomputed + read-through)") as bar:
        served = serve_traffic(cache, clock, [next_day], compute_and_count, progress=bar)
    cache.close()
    version_hits = int(next_day["ad_id"].isin(published).sum()) - sum(key in published for key in missed)
    return {
        "hit_rate": round(served.hit_rate, 4),
        "queries": served.queries,
        "hits_published_version": version_hits,
        "hits_live_read_through": served.hits - version_hits,
        "note": "live read-through keys expire on wall-clock time, so every key asked in the history is still "
        "live: not bounded in capacity, not comparable with the hit rates above",
    }


def warm_demo_campaign(
    app_db_url: str,
    redis_url: str,
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    launching: pd.DataFrame,
    *,
    campaign_id: str,
) -> dict:
    """Register ``launching`` (ads with the CTR model's features) as one campaign that launches ``CAMPAIGN_LEAD``
    from now, evaluate ``campaign_launch_sensor`` once against ``instance``, execute in-process the run it
    requests for this campaign, and check that every ad answers through ``PredictionCache`` before the launch.

    Returns the summary's ``campaign`` block so far, with ``ad_ids`` for ``campaign_first_hour``. The sensor
    also requests runs for campaigns registered on this stack outside the demo (``other_runs_requested``):
    those are left to the daemon, or to the backstop.
    """
    from ..storage.campaigns import CampaignError, register_campaign_launch

    if launching.empty:
        return {"campaign_id": None, "note": "no ad launches on the replayed day (too few --ads)"}
    columns = [launching[c].tolist() for c in ("ad_id", "quality", "bid", "text_len", "category")]
    ad_list = [
        {"ad_id": ad_id, "quality": quality, "bid": bid, "text_len": text_len, "category": category}
        for ad_id, quality, bid, text_len, category in zip(*columns, strict=True)
    ]
    ids = [ad["ad_id"] for ad in ad_list]
    launch_at = datetime.now(UTC) + CAMPAIGN_LEAD
    started = time.perf_counter()
    try:
        register_campaign_launch(
            app_db_url, campaign_id, DEMO_TENANT, launch_at, ad_list, end_at=launch_at + timedelta(days=1)
        )
    except CampaignError as error:  # e.g. these ad ids were registered to another tenant on this stack
        return {"campaign_id": campaign_id, "note": f"not registered: {error}"}
    # One tick, as the daemon evaluates it: the sensor of the Definitions with their resources, on the real instance.
    sensor = defs.resolve_sensor_def("campaign_launch_sensor")
    top_level = defs.get_repository_def().get_top_level_resources()
    resources = {key: top_level[key] for key in sensor.required_resource_keys}
    with dg.build_sensor_context(instance=instance, cursor=None, definitions=defs, resources=resources) as context:
        result = sensor(context)
    for request in result.dynamic_partitions_requests or []:  # what the daemon does with them
        instance.add_dynamic_partitions(request.partitions_def_name, request.partition_keys)
    requests = result.run_requests or []
    ours = [request for request in requests if request.partition_key == campaign_id]
    if not ours:
        raise RuntimeError(f"campaign_launch_sensor requested no warming run for {campaign_id}")
    for request in ours:
        run = defs.resolve_job_def(request.job_name).execute_in_process(
            partition_key=request.partition_key, instance=instance, tags=request.tags,
            run_config={**(request.run_config or {}), **RUN_LOGS},
        )  # fmt: skip
    cache = PredictionCache.from_url(redis_url, log_queries=False, socket_timeout=1.0)
    deadline = time.monotonic() + 30
    while (missing := sum(value is None for value in cache.get_many("ctr", ids))) and time.monotonic() < deadline:
        time.sleep(0.01)
    cache.close()
    warm_seconds, readable_at = time.perf_counter() - started, datetime.now(UTC)
    if missing or readable_at >= launch_at:
        raise RuntimeError(
            f"campaign {campaign_id}: {missing} of {len(ids)} ads unreadable through PredictionCache "
            f"at {readable_at.isoformat()} (launch {launch_at.isoformat()})"
        )
    meta = run.asset_materializations_for_node("campaign_ctr")[0].metadata
    return {
        "campaign_id": campaign_id,
        "ads": len(ids),
        "synthetic_campaigns": int(launching["campaign_id"].nunique()),
        "registered_launch_at": launch_at.isoformat(timespec="seconds"),
        "warm_seconds": round(warm_seconds, 2),
        "minutes_before_launch": round((launch_at - readable_at).total_seconds() / 60, 1),
        "model_version": meta["model_version"].value,
        "other_runs_requested": len(requests) - len(ours),
        "ad_ids": ids,
    }


def campaign_first_hour(
    redis_url: str,
    campaign: dict,
    history: Sequence[pd.DataFrame],
    next_day: pd.DataFrame,
    misses: Sequence[tuple[int, str]],
    published: Collection[str],
    compute: Callable[[str], float],
) -> dict:
    """The ``campaign`` block with the share of the campaign's first-hour queries answered from the cache.

    The campaign launches in the replayed day at the first request of any of its ads; its first hour is the
    hour from then. Warmed: the misses (``(ts_ms, key)``) of the end-to-end serve of ``next_day``, which found
    the warmed keys. Without warming: the same requests of these ads (in the history, none by construction, and
    in the replayed day up to the end of the first hour) through the real ``PredictionCache`` read-through, in a
    namespace of its own that lacks only the campaign's keys; a key of the ``published`` version counts as a
    hit there as it would in the real serve. Live read-through keys are per key and not bounded in capacity,
    so the other keys' traffic cannot change whether these hit: the rest of the day is not needed.
    """
    from .bench import drop_namespace

    block = dict(campaign)
    ids = set(block.pop("ad_ids"))
    asked = next_day[next_day["ad_id"].isin(ids)]
    if asked.empty:
        return {**block, "first_hour_queries": 0, "first_hour_hit_rate_warmed": None,
                "first_hour_hit_rate_without_warming": None}  # fmt: skip
    launch_ms = int(asked["ts_ms"].min())
    end_ms = launch_ms + HOUR_MS
    first_hour = asked[asked["ts_ms"] < end_ms]
    warmed_misses = sum(1 for ts, key in misses if key in ids and launch_ms <= ts < end_ms)

    before = pd.concat([*(day[day["ad_id"].isin(ids)] for day in history), first_hour], ignore_index=True)
    before = before[~before["ad_id"].isin(published)]
    schema, clock, cold_misses = KeySchema(f"demo{uuid.uuid4().hex[:8]}"), SimClock(), []

    def compute_and_record(key: str) -> float:
        if launch_ms <= clock.now_ms < end_ms:
            cold_misses.append(key)
        return compute(key)

    cold = PredictionCache.from_url(redis_url, namespace=schema.namespace, log_queries=False, socket_timeout=1.0)
    try:
        serve_traffic(cold, clock, [before], compute_and_record)
    finally:
        cold.close()
        admin = connect(redis_url, socket_timeout=10)
        drop_namespace(admin, schema)
        admin.close()
    n = len(first_hour)
    tz = ZoneInfo(deployment_partitions().timezone)
    return {
        **block,
        "launch_in_replayed_day": datetime.fromtimestamp(launch_ms / 1000, tz).isoformat(timespec="seconds"),
        "first_hour_queries": n,
        "first_hour_ads_asked": int(first_hour["ad_id"].nunique()),
        "first_hour_hit_rate_warmed": round(1 - warmed_misses / n, 4),
        "first_hour_hit_rate_without_warming": round(1 - len(cold_misses) / n, 4),
    }


def ours_latency(redis_url: str, keys: list[str]) -> float:
    """p99 of ``PredictionCache.get`` over ``keys`` (microseconds), logging off."""

    cache = PredictionCache.from_url(redis_url, log_queries=False, socket_timeout=1.0)
    samples = timed(lambda key: cache.get("ctr", key), keys)
    cache.close()
    return percentile_us(samples, 99)


def embed_demo_documents(stack: Stack, defs, instance: dg.DagsterInstance, *, n_docs: int, seed: int) -> dict:
    """Generate documents into the document store, fit the embedder, embed and publish; measure Redis."""
    from ..serving.keys import EMBEDDING_KIND
    from ..serving.stats import keys_memory
    from ..stack import ENV_APP_DB
    from ..storage.documents import DocumentStore
    from ..storage.embeddings import EmbeddingStore
    from ..workload.documents import generate_documents

    env = stack.env()
    store = DocumentStore(env[ENV_APP_DB])
    store.ensure_schema()
    for chunk in generate_documents(n_docs, seed=seed):
        store.load_frame(chunk)
    job = dg.define_asset_job("demo_embeddings", selection=["embedding_model", "document_embeddings"])
    result = (
        dg.Definitions(assets=defs.assets, jobs=[job], resources=defs.resources)
        .resolve_job_def("demo_embeddings")
        .execute_in_process(instance=instance, run_config=RUN_LOGS)
    )
    meta = result.asset_materializations_for_node("document_embeddings")[0].metadata
    client = connect(env[ENV_REDIS], socket_timeout=10)
    redis_bytes = keys_memory(client, KeySchema().bucket(EMBEDDING_KIND, meta["redis_version"].value, "*"))[0]
    cache = PredictionCache.from_url(env[ENV_REDIS], log_queries=False, socket_timeout=1.0)
    ids = [f"doc{i:08d}" for i in range(0, n_docs, max(1, n_docs // 5000))]
    samples = timed(cache.get_embedding, ids)
    cache.close()
    held = EmbeddingStore(env[ENV_APP_DB]).embedded_count(meta["model_version"].value)  # what the version holds
    return {
        "documents": n_docs,  # generated by this demo
        "documents_in_store": store.count(),  # with any other: an earlier demo's with more, or `docs load`'s
        "docs_embedded": meta["embedded"].value,
        "embed_docs_per_s": round(meta["docs_per_s"].value) if "docs_per_s" in meta else None,  # nothing embedded
        # over the embeddings the version holds, whatever this run embedded (none, a second demo on one home)
        "redis_bytes_per_doc": round(redis_bytes / max(held, 1), 1),
        "embedding_get_p99_us": percentile_us(samples, 99),
        "recall_at_10_int8": round(meta["recall_at_10_int8"].value, 4) if "recall_at_10_int8" in meta else None,
    }


def drain(job: dg.JobDefinition, instance: dg.DagsterInstance, lake: Lake, hours: list[str], asset: str) -> int:
    """Materialize ``asset`` (``query_logs`` or ``user_events``) for each of ``hours`` with ``job``; returns its rows.
    The demo reset Redis, so an earlier demo's partitions of these hours hold stream IDs the stream no longer has, and a
    drain refuses to replace such a partition (``defs.query_logs.lost_events``): they are deleted first."""
    rows = 0
    for hour in hours:
        for name in (asset, QUARANTINE_OF[asset]):
            lake.delete(name, hour)
        result = job.execute_in_process(partition_key=hour, instance=instance, raise_on_error=True, run_config=RUN_LOGS)
        for materialization in result.asset_materializations_for_node(asset):
            if materialization.asset_key == dg.AssetKey(asset):
                rows += materialization.metadata["dagster/row_count"].value
    return rows


def predictive_precompute(
    redis_url: str,
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    lake: Lake,
    day_keys: list[str],
    *,
    seed: int,
    n_users: int = 300,
) -> dict:
    """Users' sessions of the history days through the event stream, drained hour by hour by ``user_events``,
    ``next_action_model`` trained on them, then live events (a login, creative uploads) through
    ``PredictionCache.record_event``, one ``user_event_sensor`` tick as the daemon evaluates it, the runs it
    requests executed in-process in priority order, and the values read back through the serving client."""
    from ..serving import KeySchema
    from ..workload.users import generate_user_events, make_users, send_user_events

    partitions = deployment_partitions()
    users = make_users(n_users, seed=seed)
    # A week of sessions ending with the last history day: the model needs every weekday and hour in training.
    event_days = partitions.days_ending(day_keys[-2], EVENT_DAYS)
    first_ms = int(partitions.daily.time_window_for_partition_key(event_days[0]).start.timestamp() * 1000)
    events = generate_user_events(users, start_ms=first_ms, days=len(event_days), seed=seed)
    sent = send_user_events(events, connect(redis_url, socket_timeout=10), KeySchema())
    hours = [h for key in event_days for h in partitions.hours_of(key)]
    drained = drain(defs.resolve_job_def("user_events_job"), instance, lake, hours, "user_events")
    model_run = defs.resolve_job_def("next_action_model_job").execute_in_process(
        partition_key=day_keys[-2],
        instance=instance,
        run_config={
            **RUN_LOGS,
            "ops": {"next_action_model": {"config": {"training_days": len(event_days), "n_estimators": 50}}},
        },
        raise_on_error=False,
    )
    model_meta = _metadata(model_run, "next_action_model")
    user, tenant = users["user"].iloc[0], users["tenant"].iloc[0]
    creatives = lake.read("ads", columns=["ad_id"])["ad_id"].head(3).tolist()  # standing for new uploads
    started = time.perf_counter()
    cache = PredictionCache.from_url(redis_url, socket_timeout=1.0)
    cache.record_event(user, "login", tenant=tenant)
    for creative in creatives:
        cache.record_event(user, "creative_upload", entity=creative, tenant=tenant)
    cache.events.flush()
    sensor = defs.resolve_sensor_def("user_event_sensor")
    top_level = defs.get_repository_def().get_top_level_resources()
    resources = {key: top_level[key] for key in sensor.required_resource_keys}
    with dg.build_sensor_context(instance=instance, cursor=None, definitions=defs, resources=resources) as context:
        result = sensor(context)
    requests = sorted(result.run_requests or [], key=lambda r: -int(r.tags.get("dagster/priority", 0)))
    for request in requests:
        defs.resolve_job_def(request.job_name).execute_in_process(
            instance=instance, tags=request.tags, run_config={**(request.run_config or {}), **RUN_LOGS},
            raise_on_error=False,
        )  # fmt: skip
    next_actions = cache.get("next_actions", user)
    ctr = [cache.get("ctr", creative) for creative in creatives]
    readable_s = time.perf_counter() - started
    cache.close()
    return {
        "users": n_users,
        "events_sent": sent.written,
        "events_dropped": sent.not_confirmed,
        "events_drained": drained,
        "next_action_approved": bool(model_run.success),
        "next_action_log_loss": round(model_meta.get("log_loss", float("nan")), 4),
        "markov1_log_loss": round(model_meta.get("markov1_log_loss", float("nan")), 4),
        "runs_requested": [f"{r.tags.get('precompute/task')}@{r.tags.get('dagster/priority')}" for r in requests],
        "next_actions_readable": next_actions is not None,
        "creative_ctr_readable": sum(value is not None for value in ctr),
        "creatives_uploaded": len(creatives),
        "events_to_readable_s": round(readable_s, 2),
    }


def _metadata(result: dg.ExecuteInProcessResult, node: str) -> dict:
    """The plain metadata values of ``node``'s first materialization in ``result`` ({} when it has none)."""
    materializations = result.asset_materializations_for_node(node)
    return {key: value.value for key, value in materializations[0].metadata.items()} if materializations else {}


def publish_blocked(instance: dg.DagsterInstance, day: str) -> str | None:
    """Why ``ctr_cache`` would not publish ``day`` into the demo's reset Redis, as Dagster's storage records it: a
    later day's publish (which it never replaces), or an operator's rollback over a day not before it; else None."""
    if newer := newer_recorded(instance, day):
        return f"Dagster records a publish of a later day, {newer}"
    if (held := rolled_back_over(instance)) is not None and day <= held:
        return f"an operator rolled {held} back"
    return None
