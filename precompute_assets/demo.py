"""The demo: synthetic traffic through the serving client, then the asset graph through Dagster."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import dagster as dg

from .defs.partitions import hourly_partitions
from .serving import PredictionCache, connect
from .stack import ENV_REDIS, Stack
from .workload.ads import generate_traffic, make_ads, true_ctr
from .workload.serve import SimClock, serve_traffic


def _progress(total: int, label: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=label, unit="q", leave=False)


def run_demo(stack: Stack, *, hours: int = 3, queries_per_hour: int = 20_000, seed: int = 0) -> dict:
    """Generate ``hours`` of traffic ending at the last full hour, materialize those query_logs partitions."""
    from .definitions import defs

    env = stack.env()
    if not stack.status()[0].embedded:  # the Redis entry
        raise SystemExit("the demo resets the query-log stream: run it on the embedded stack, not on a shared Redis")
    stages: dict[str, float] = {}
    redis_url = env[ENV_REDIS]
    admin = connect(redis_url, socket_timeout=10)
    admin.flushdb()  # embedded demo server only (checked above)

    end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    start = end - timedelta(hours=hours)
    day_start = start.replace(hour=0)
    started = time.perf_counter()
    ads = make_ads(5_000, days=1, seed=seed)
    ctr = dict(zip(ads["ad_id"], true_ctr(ads), strict=True))
    start_ms, end_ms = int(start.timestamp() * 1000), int(end.timestamp() * 1000)
    days = (end - day_start).days + 1
    chunks = [
        chunk[(chunk["ts_ms"] >= start_ms) & (chunk["ts_ms"] < end_ms)]
        for chunk in generate_traffic(
            ads, start_ms=int(day_start.timestamp() * 1000), days=days, queries_per_day=queries_per_hour * 24, seed=seed
        )
    ]
    total = sum(len(c) for c in chunks)
    clock = SimClock()
    cache = PredictionCache.from_url(redis_url, clock=clock, socket_timeout=1.0)
    with _progress(total, "serving traffic") as bar:
        served = serve_traffic(cache, clock, chunks, lambda key: float(ctr[key]), progress=bar.update)
    cache.close()
    stages["serve_traffic_s"] = time.perf_counter() - started

    started = time.perf_counter()
    instance = dg.DagsterInstance.get()
    job = defs.resolve_job_def("query_logs_job")
    keys = hourly_partitions.get_partition_keys_in_range(
        dg.PartitionKeyRange(
            hourly_partitions.get_partition_key_for_timestamp(start.timestamp()),
            hourly_partitions.get_partition_key_for_timestamp((end - timedelta(hours=1)).timestamp()),
        )
    )
    rows = quarantined = 0
    for key in keys:
        result = job.execute_in_process(partition_key=key, instance=instance)
        meta = result.asset_materializations_for_node("query_logs")[0].metadata
        rows += meta["dagster/row_count"].value
        quarantined += meta["quarantined"].value
        print(f"materialized query_logs {key}: {meta['dagster/row_count'].value} events", flush=True)
    stages["materialize_query_logs_s"] = time.perf_counter() - started
    return {
        "events_served": served.queries,
        "events_logged": rows,
        "events_quarantined": quarantined,
        "events_dropped": cache.logger.stats.dropped,
        "partitions": keys,
        "hit_rate": round(served.hit_rate, 4),
        "stage_seconds": {name: round(value, 2) for name, value in stages.items()},
        "dagster_home": env["DAGSTER_HOME"],
    }
