"""The demo: days of synthetic ad traffic through the serving client, the daily graph through Dagster,
then the next day's traffic served from the warmed cache."""

from __future__ import annotations

import time
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import dagster as dg
import pandas as pd

from .defs.partitions import TIMEZONE
from .defs.selection import hours_of
from .lake import Lake, default_lake_uri
from .serving import KeySchema, PredictionCache, connect
from .stack import ENV_REDIS, Stack
from .workload.ads import generate_traffic, make_ads, true_ctr
from .workload.serve import SimClock, serve_traffic


@contextmanager
def _progress(total: int, label: str):
    from tqdm import tqdm

    with tqdm(total=total, desc=label, unit="q", leave=False) as bar:
        yield bar.update


class Stages(dict):
    """Wall time of each demo stage, in seconds."""

    @contextmanager
    def timed(self, name: str):
        print(f"== {name}", flush=True)
        started = time.perf_counter()
        yield
        self[name] = round(time.perf_counter() - started, 2)


def _by_day(chunks: list[pd.DataFrame], day_starts_ms: list[int]) -> list[pd.DataFrame]:
    traffic = pd.concat(chunks, ignore_index=True)
    bounds = [*day_starts_ms, day_starts_ms[-1] + 86_400_000]
    return [
        traffic[(traffic["ts_ms"] >= lo) & (traffic["ts_ms"] < hi)] for lo, hi in zip(bounds, bounds[1:], strict=False)
    ]


def run_demo(
    stack: Stack,
    *,
    days: int = 3,
    queries_per_day: int = 40_000,
    n_ads: int = 20_000,
    top_n: int = 1000,
    n_docs: int = 50_000,
    seed: int = 0,
) -> dict:
    """``days`` of history ending yesterday-minus-one, the daily graph for the last of them, then yesterday's
    traffic replayed against the warmed cache and against a read-through cache alone."""
    from .definitions import defs

    env = stack.env()
    if not stack.status()[0].embedded:  # the Redis entry
        raise SystemExit("the demo resets Redis: run it on the embedded stack, not on a shared server")
    stages = Stages()
    redis_url = env[ENV_REDIS]
    connect(redis_url, socket_timeout=10).flushdb()  # embedded demo server only (checked above)
    lake = Lake(default_lake_uri())
    tz = ZoneInfo(TIMEZONE)
    today = datetime.now(tz).replace(hour=0, minute=0, second=0, microsecond=0)
    day_starts = [today - timedelta(days=days + 1 - d) for d in range(days + 1)]
    day_keys = [d.date().isoformat() for d in day_starts]
    starts_ms = [int(d.timestamp() * 1000) for d in day_starts]

    with stages.timed("generate_workload"):
        ads = make_ads(n_ads, days=days + 1, seed=seed)
        lake.write("ads", None, ads)
        live_ctr = dict(zip(ads["ad_id"], true_ctr(ads).tolist(), strict=True))
        chunks = list(
            generate_traffic(ads, start_ms=starts_ms[0], days=days + 1, queries_per_day=queries_per_day, seed=seed)
        )
        traffic = _by_day(chunks, starts_ms)
        for key, day in zip(day_keys, traffic, strict=True):
            lake.write("ad_impressions", key, day[["ts_ms", "ad_id", "clicked"]])
    history, next_day = traffic[:-1], traffic[-1]

    with stages.timed("serve_history"):
        clock = SimClock()
        cache = PredictionCache.from_url(redis_url, clock=clock, socket_timeout=1.0)
        with _progress(sum(map(len, history)), "serving history") as bar:
            serve_traffic(cache, clock, history, live_ctr.__getitem__, progress=bar)
        cache.close()

    instance = dg.DagsterInstance.get()
    with stages.timed("materialize_query_logs"):
        job = defs.resolve_job_def("query_logs_job")
        logged = 0
        for hour in [h for key in day_keys[:-1] for h in hours_of(key)]:
            result = job.execute_in_process(partition_key=hour, instance=instance, raise_on_error=True)
            logged += result.asset_materializations_for_node("query_logs")[0].metadata["dagster/row_count"].value
        print(f"   {logged} events in {days * 24} hourly partitions", flush=True)

    with stages.timed("daily_precompute"):
        partition = day_keys[-2]
        result = defs.resolve_job_def("daily_precompute_job").execute_in_process(
            partition_key=partition,
            instance=instance,
            run_config={"ops": {"top_ads": {"config": {"top_n": top_n}}}},
        )
        meta = {
            step: result.asset_materializations_for_node(step)[0].metadata
            for step in ("ctr_model", "top_ads", "ctr_cache")
        }

    with stages.timed("serve_next_day"):
        clock = SimClock()
        ours = PredictionCache.from_url(redis_url, clock=clock, socket_timeout=1.0)
        with _progress(len(next_day), "serving next day (precomputed + read-through)") as bar:
            served = serve_traffic(ours, clock, [next_day], live_ctr.__getitem__, progress=bar)
        ours.close()
        alone = PredictionCache(connect(redis_url, socket_timeout=1.0), schema=KeySchema("readthrough"))
        with _progress(len(next_day), "serving next day (read-through alone)") as bar:
            baseline = serve_traffic(alone, SimClock(), [next_day], live_ctr.__getitem__, progress=bar)
        lookup_us = ours_latency(redis_url, next_day["ad_id"].head(5000).tolist())

    with stages.timed("embed_documents"):
        embeddings = embed_demo_documents(stack, defs, instance, n_docs=n_docs, seed=seed)

    return {
        "history_days": days,
        "queries_per_day": queries_per_day,
        "ads": n_ads,
        "events_logged": logged,
        "precomputed_day": partition,
        "hit_rate_ours": round(served.hit_rate, 4),
        "hit_rate_read_through_alone": round(baseline.hit_rate, 4),
        "top_ads_coverage_last_day": round(meta["top_ads"]["coverage_last_day"].value, 4),
        "auc": round(meta["ctr_model"]["auc"].value, 4),
        "baseline_auc": round(meta["ctr_model"]["baseline_auc"].value, 4),
        "keys_published": meta["ctr_cache"]["keys_written"].value,
        "publish_keys_per_s": round(meta["ctr_cache"]["keys_per_s"].value),
        "get_p99_us": lookup_us,
        **embeddings,
        "stage_seconds": dict(stages),
        "dagster_home": env["DAGSTER_HOME"],
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def ours_latency(redis_url: str, keys: list[str]) -> float:
    """p99 of ``PredictionCache.get`` over ``keys`` (microseconds), logging off."""
    from .bench import percentile_us, timed

    cache = PredictionCache.from_url(redis_url, log_queries=False, socket_timeout=1.0)
    samples = timed(lambda key: cache.get("ctr", key), keys)
    cache.close()
    return percentile_us(samples, 99)


def embed_demo_documents(stack: Stack, defs, instance: dg.DagsterInstance, *, n_docs: int, seed: int) -> dict:
    """Generate documents into the document store, fit the embedder, embed and publish; measure Redis."""
    from .bench import percentile_us, timed
    from .docstore import DocumentStore
    from .stack import ENV_APP_DB
    from .workload.documents import generate_documents

    env = stack.env()
    store = DocumentStore(env[ENV_APP_DB])
    store.ensure_schema()
    for chunk in generate_documents(n_docs, seed=seed):
        store.load_frame(chunk)
    client = connect(env[ENV_REDIS], socket_timeout=10)
    before = client.info("memory")["used_memory"]
    job = dg.define_asset_job("demo_embeddings", selection=["embedding_model", "document_embeddings"])
    result = (
        dg.Definitions(assets=defs.assets, jobs=[job], resources=defs.resources)
        .resolve_job_def("demo_embeddings")
        .execute_in_process(instance=instance)
    )
    meta = result.asset_materializations_for_node("document_embeddings")[0].metadata
    after = client.info("memory")["used_memory"]
    cache = PredictionCache.from_url(env[ENV_REDIS], log_queries=False, socket_timeout=1.0)
    ids = [f"doc{i:08d}" for i in range(0, n_docs, max(1, n_docs // 5000))]
    samples = timed(cache.get_embedding, ids)
    cache.close()
    return {
        "documents": store.count(),
        "docs_embedded": meta["embedded"].value,
        "embed_docs_per_s": round(meta["docs_per_s"].value),
        "redis_bytes_per_doc": round((after - before) / max(meta["embedded"].value, 1), 1),
        "embedding_get_p99_us": percentile_us(samples, 99),
        "recall_at_10_int8": round(meta["recall_at_10_int8"].value, 4),
    }
