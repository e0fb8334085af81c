"""Benchmarks: each measures ours and a reference in the same run and returns one JSON-able dict."""

from __future__ import annotations

import contextlib
import random
import time
import uuid

import numpy as np

from ..serving import KeySchema, PredictionCache, QueryLogger, connect, publish_version
from ..stack import running_version
from .measure import percentile_us, timed


def drop_namespace(client, schema: KeySchema) -> None:
    """Remove every key of a benchmark's own namespace (SCAN: maintenance only, never a serving path)."""
    for name in client.scan_iter(f"{schema.prefix}:*", count=5000):
        client.unlink(name)


def bench_serve(redis_url: str, *, n_keys: int = 10_000, lookups: int = 50_000, seed: int = 0) -> dict:
    """p50/p99 of ``PredictionCache.get`` with query logging on vs a bare redis-py GET of the same values,
    and the query-event rate the logger sustains."""
    schema = KeySchema(f"bench{uuid.uuid4().hex[:8]}")
    admin = connect(redis_url, socket_timeout=10)
    keys = [f"ad{i:06d}" for i in range(n_keys)]
    values = {key: random.Random(key).random() for key in keys}
    publish_version(admin, "ctr", "bench", values.items(), n_keys=n_keys, schema=schema, ttl_s=600)
    raw_prefix = f"{schema.prefix}:raw:"
    pipe = admin.pipeline(transaction=False)
    codec_bytes = {key: np.float32(v).tobytes() for key, v in values.items()}
    for key in keys:
        pipe.set(raw_prefix + key, codec_bytes[key], ex=600)
    pipe.execute()

    cache = PredictionCache.from_url(redis_url, namespace=schema.namespace, socket_timeout=1.0)
    raw = connect(redis_url, socket_timeout=1.0)
    rng = random.Random(seed)
    sample = [keys[min(int(rng.paretovariate(1.0)) - 1, n_keys - 1)] for _ in range(lookups)]
    # Warm both connections, then interleave blocks so drift on a shared machine hits both alike.
    timed(lambda k: cache.get("ctr", k), sample[:2000])
    timed(lambda k: raw.get(raw_prefix + k), sample[:2000])
    ours, bare = [], []
    for start in range(0, lookups, 1000):
        block = sample[start : start + 1000]
        ours += timed(lambda k: cache.get("ctr", k), block)
        bare += timed(lambda k: raw.get(raw_prefix + k), block)
    cache.close()
    lookup_stats = cache.logger.stats

    logger = QueryLogger(connect(redis_url, socket_timeout=5), schema)
    n_events = 200_000
    started = time.perf_counter()
    for i in range(n_events):
        logger.log("ctr", keys[i % n_keys], hit=True, latency_us=40, user="u1")
        if i % 1000 == 999:
            # Stay within the buffer: a sustained rate is what the flusher keeps up with.
            while logger.pending > logger.max_buffer // 2:
                time.sleep(0.001)
    logger.close()
    elapsed = time.perf_counter() - started

    drop_namespace(admin, schema)
    result = {
        "bench": "serve",
        "lookups": lookups,
        "keys": n_keys,
        "get_p50_us": percentile_us(ours, 50),
        "get_p99_us": percentile_us(ours, 99),
        "raw_get_p50_us": percentile_us(bare, 50),
        "raw_get_p99_us": percentile_us(bare, 99),
        "log_events_per_s": round(logger.stats.written / elapsed),
        "log_events_dropped": logger.stats.dropped,
        "lookup_events_logged": lookup_stats.written,
        "lookup_events_dropped": lookup_stats.dropped,
        "redis_version": running_version(redis_url),  # "valkey 8.1.8": Valkey's redis_version field says 7.2.4
    }
    result["p50_ratio"] = round(result["get_p50_us"] / result["raw_get_p50_us"], 3)
    result["p99_ratio"] = round(result["get_p99_us"] / result["raw_get_p99_us"], 3)
    return result


BENCHMARK_DB = 9  # redis-benchmark writes keys named key:NNN; keep them out of database 0


def redis_benchmark_set(redis_url: str, *, requests: int, value_size: int, pipeline: int = 1000) -> float | None:
    """SET requests/s that ``redis-benchmark`` (Debian's redis-tools) reaches on the same server; None if absent."""
    import csv
    import io
    import shutil
    import subprocess
    from urllib.parse import urlsplit

    binary = shutil.which("redis-benchmark")
    if binary is None:
        return None
    url = urlsplit(redis_url)
    command = [binary, "-h", url.hostname or "127.0.0.1", "-p", str(url.port or 6379), "-t", "set"]
    command += ["-n", str(requests), "-P", str(pipeline), "-d", str(value_size), "-r", str(requests), "--csv"]
    command += ["--dbnum", str(BENCHMARK_DB)]
    if url.password:
        command += ["-a", url.password, "--no-auth-warning"]
    if url.scheme == "rediss":
        command += ["--tls"]
    output = subprocess.run(command, check=True, capture_output=True, text=True, timeout=600).stdout
    scratch = connect(url._replace(path=f"/{BENCHMARK_DB}").geturl(), socket_timeout=30)
    for name in scratch.scan_iter("key:*", count=5000):  # redis-benchmark's keys, in its own database
        scratch.unlink(name)
    rows = [row for row in csv.reader(io.StringIO(output)) if row and row[0] == "SET"]
    return float(rows[0][1]) if rows else None


def bench_publish(redis_url: str, *, n: int = 1_000_000, naive_n: int = 50_000, seed: int = 0) -> dict:
    """Keys/s of ``publish_version`` vs a naive one-``SET``-per-key JSON loop vs ``redis-benchmark`` SET, and
    the Redis memory each takes per key.

    ``redis_bytes_per_key``: growth of the server's ``used_memory`` (``INFO memory``) over our publish, per
    key published; ``naive_redis_bytes_per_key``: the same over the naive loop, per naive key. Each is read
    before ``redis-benchmark`` runs and with no lazily freed object pending (an earlier ``UNLINK`` would shrink
    ``used_memory`` meanwhile). ``used_memory`` is server-wide: the figures assume nothing else writes to this
    Redis during the bench. ``ratio_bytes_vs_naive`` is ours over naive (below 1: ours takes less memory).
    """
    import json as _json

    from tqdm import tqdm

    schema = KeySchema(f"bench{uuid.uuid4().hex[:8]}")
    client = connect(redis_url, socket_timeout=30)

    def used_memory() -> int:
        deadline = time.monotonic() + 30
        while True:
            memory = client.info("memory")
            if not memory.get("lazyfree_pending_objects") or time.monotonic() > deadline:
                return memory["used_memory"]
            time.sleep(0.01)

    rng = np.random.default_rng(seed)
    keys = [f"ad{i:07d}" for i in range(n)]
    values = rng.random(n).tolist()
    memory_before = used_memory()
    with tqdm(total=n, desc="publish", unit="key", disable=None, leave=False) as bar:
        items = zip(keys, values, strict=True)
        ours = publish_version(client, "ctr", "bench", items, n_keys=n, schema=schema, ttl_s=600, progress=bar.update)
    ours_bytes = used_memory() - memory_before

    naive_n = min(naive_n, n)
    memory_before = used_memory()
    started = time.perf_counter()
    for key, value in zip(keys[:naive_n], values[:naive_n], strict=True):
        client.set(f"{schema.prefix}:naive:{key}", _json.dumps(value), ex=600)
    naive_s = time.perf_counter() - started
    naive_bytes = used_memory() - memory_before

    value_size = len(np.float32(0).tobytes())
    reference = redis_benchmark_set(redis_url, requests=n, value_size=value_size)
    drop_namespace(client, schema)
    result = {
        "bench": "publish",
        "keys": n,
        "keys_per_s": round(ours.keys_per_s),
        "publish_seconds": round(ours.seconds, 3),
        "naive_keys": naive_n,
        "naive_keys_per_s": round(naive_n / naive_s),
        "redis_benchmark_set_per_s": reference,
        "redis_benchmark_args": f"-t set -n {n} -P 1000 -d {value_size} -r {n}" if reference else None,
        "value_bytes": value_size,
        "redis_bytes_per_key": round(ours_bytes / max(ours.keys, 1), 1),
        "naive_redis_bytes_per_key": round(naive_bytes / max(naive_n, 1), 1),
    }
    result["ratio_vs_naive"] = round(result["keys_per_s"] / result["naive_keys_per_s"], 2)
    result["ratio_vs_redis_benchmark"] = round(result["keys_per_s"] / reference, 3) if reference else None
    result["ratio_bytes_vs_naive"] = round(result["redis_bytes_per_key"] / result["naive_redis_bytes_per_key"], 3)
    return result


def bench_graph(
    *,
    queries: int = 10_000_000,
    ads: int = 100_000,
    days: int = 7,
    top_ns=(1000, 100_000),
    redis_url: str | None = None,
) -> dict:
    """Seconds of asset compute of the daily graph on ``queries`` logged queries over ``ads`` ads, vs the
    I/O floor: one pyarrow scan of the same input files.

    The hourly ``query_logs`` partitions and daily impressions are written straight to a scratch lake
    (as the hourly job would have), then the daily graph runs once per ``top_n`` against ``redis_url``
    (default: the local stack's Redis).

    ``io_floor_seconds``: ``pyarrow.parquet.read_table`` from the lake's filesystem of every hourly
    ``query_logs`` file of the days ``ad_demand``/``traffic_profile`` read (their columns ``ts``, ``kind``,
    ``key``) and every daily ``ad_impressions`` file ``ctr_model`` reads (its columns), each once, summing
    row counts (``io_floor_rows``). The files are scanned once untimed first, so the timed scan finds a warm
    page cache, as the asset runs do (they read the files just written). The graph reads each hour of logs
    twice (both selection assets) and does its compute besides, so ``ratio_vs_io_floor`` (each run's
    ``total_asset_seconds`` / ``io_floor_seconds``) is how far the graph is from what reading its inputs costs.
    """
    import tempfile

    import dagster as dg
    import pandas as pd
    import pyarrow.parquet as pq

    from ..definitions import defs as load_definitions
    from ..defs.automation import daily_precompute_job
    from ..defs.models import CtrModelConfig
    from ..defs.partitions import deployment_partitions
    from ..defs.resources import LakeResource, ModelStoreResource, ParquetIOManager, RedisResource
    from ..defs.selection import LOOKBACK_DAYS
    from ..ml.ctr import IMPRESSION_COLUMNS
    from ..stack import ENV_REDIS, Stack
    from ..storage.lake import Lake
    from ..storage.tables import QUERY_LOGS
    from ..workload.ads import generate_traffic, make_ads

    redis_url = redis_url or Stack().env()[ENV_REDIS]
    defs, partitions = load_definitions(), deployment_partitions()
    scratch = tempfile.mkdtemp(prefix="precompute-bench-graph-")
    lake = Lake(f"{scratch}/lake")
    last = partitions.daily.get_last_partition_key()
    window = partitions.daily.time_window_for_partition_key(last)
    day_keys = [(window.start - pd.Timedelta(days=d)).date().isoformat() for d in range(days - 1, -1, -1)]
    start_ms = int(partitions.daily.time_window_for_partition_key(day_keys[0]).start.timestamp() * 1000)
    started = time.perf_counter()
    catalog = make_ads(ads, days=days, seed=0)
    lake.write("ads", None, catalog)
    written = 0
    for day_index, day in enumerate(day_keys):
        traffic = pd.concat(
            generate_traffic(catalog, start_ms=start_ms + day_index * 86_400_000, days=1,
                             queries_per_day=queries // days, seed=day_index)
        )  # fmt: skip
        lake.write("ad_impressions", day, traffic[["ts_ms", "ad_id", "clicked"]])
        hour = (traffic["ts_ms"].to_numpy() - (start_ms + day_index * 86_400_000)) // 3_600_000
        for index, key in enumerate(partitions.hours_of(day)):
            part = traffic[hour == index]
            frame = pd.DataFrame(
                {
                    "stream_id": (part["ts_ms"].astype(str) + "-0").to_numpy(),
                    "ts": pd.to_datetime(part["ts_ms"].to_numpy(), unit="ms", utc=True),
                    "kind": "ctr",
                    "key": part["ad_id"].to_numpy(),
                    "hit": False,
                    "latency_us": 50,
                    "user": part["user"].to_numpy(),
                    "tenant": None,
                }
            )
            lake.write("query_logs", key, pa_table(frame, QUERY_LOGS))
        written += len(traffic)
    setup_s = time.perf_counter() - started

    # The I/O floor: the files the graph reads (those that exist), with the columns it reads, once each.
    log_days = partitions.days_ending(day_keys[-1], LOOKBACK_DAYS)
    reads = [("query_logs", hour, ["ts", "kind", "key"]) for day in log_days for hour in partitions.hours_of(day)]
    reads += [("ad_impressions", day, IMPRESSION_COLUMNS)
              for day in partitions.days_ending(day_keys[-1], CtrModelConfig().training_days)]  # fmt: skip
    reads = [(asset, part, columns) for asset, part, columns in reads if lake.exists(asset, part)]
    filesystem = lake._fs[0]

    def scan() -> int:
        return sum(
            pq.read_table(lake.path(asset, part), filesystem=filesystem, columns=columns).num_rows
            for asset, part, columns in reads
        )

    scan()  # untimed: warm the page cache, as the asset runs find it
    started = time.perf_counter()
    io_floor_rows = scan()
    io_floor_s = max(round(time.perf_counter() - started, 4), 0.0001)

    resources = {
        "redis": RedisResource(url=redis_url, namespace=f"bench{uuid.uuid4().hex[:6]}"),
        "lake": LakeResource(base_uri=f"{scratch}/lake"),
        "model_store": ModelStoreResource(root=f"{scratch}/models"),
        "io_manager": ParquetIOManager(lake=LakeResource(base_uri=f"{scratch}/lake")),
    }
    runs = {}
    assets = defs.resolve_job_def(daily_precompute_job.name).asset_layer.executable_asset_keys
    with dg.instance_for_test() as instance:
        for top_n in top_ns:
            result = dg.materialize(
                [spec for spec in defs.assets if getattr(spec, "keys", None) and spec.keys & assets],
                resources=resources,
                partition_key=day_keys[-1],
                instance=instance,
                run_config={"ops": {"top_ads": {"config": {"top_n": top_n}}}},
            )
            steps = {
                s.step_key: round(s.end_time - s.start_time, 2) for s in instance.get_run_step_stats(result.run_id)
            }
            total_s = round(sum(steps.values()), 2)
            runs[f"top_{top_n}"] = {
                "asset_seconds": steps,
                "total_asset_seconds": total_s,
                "keys_published": result.asset_materializations_for_node("ctr_cache")[0].metadata["keys_written"].value,
                "ratio_vs_io_floor": round(total_s / io_floor_s, 2),
            }
    import shutil

    shutil.rmtree(scratch, ignore_errors=True)
    drop_namespace(connect(redis_url, socket_timeout=30), resources["redis"].schema())
    return {"bench": "graph", "queries": written, "ads": ads, "days": days, "setup_seconds": round(setup_s, 1),
            "goal_seconds": 120, "io_floor_seconds": io_floor_s, "io_floor_rows": io_floor_rows,
            **runs}  # fmt: skip


def pa_table(frame, schema):
    """``frame`` as a pyarrow table of ``schema``."""
    import pyarrow as pa

    return pa.Table.from_pandas(frame, schema=schema, preserve_index=False)


def bench_embed(redis_url: str, app_db_url: str, *, docs: int = 1_000_000, chunk_size: int = 20_000) -> dict:
    """End-to-end embedding sync (PostgreSQL → embed → quantise → offline store → Redis) vs the
    embedder's raw encode on the same texts; Redis bytes per document; lookup latency vs a bare GET."""
    from ..ml.embedder import HashingSvdEmbedder, check_document
    from ..serving.keys import EMBEDDING_KIND
    from ..storage.documents import DocumentStore
    from ..storage.embeddings import EmbeddingStore
    from ..storage.postgres import scratch_database
    from ..sync.embedding_quality import int8_recall
    from ..sync.embeddings import sync_embeddings
    from ..workload.documents import generate_documents

    schema = KeySchema(f"bench{uuid.uuid4().hex[:8]}")
    client = connect(redis_url, socket_timeout=30)
    with contextlib.ExitStack() as cleanup:
        db_url = cleanup.enter_context(scratch_database(app_db_url, "bench"))
        cleanup.callback(drop_namespace, client, schema)
        store = DocumentStore(db_url)
        store.ensure_schema()
        started = time.perf_counter()
        texts = []
        for chunk in generate_documents(docs, seed=0):
            store.load_frame(chunk)
            texts += [check_document(t, b)[0] for t, b in zip(chunk["title"], chunk["body"], strict=True)]
        load_s = time.perf_counter() - started
        embedder = HashingSvdEmbedder.fit(texts, sample=20_000)

        started = time.perf_counter()
        for i in range(0, len(texts), chunk_size):
            embedder.encode(texts[i : i + chunk_size])
        encode_s = time.perf_counter() - started
        del texts

        memory_before = client.info("memory")["used_memory"]
        stats = sync_embeddings(store, EmbeddingStore(db_url), client, embedder, schema=schema,
                                chunk_size=chunk_size, log=lambda message: None)  # fmt: skip
        redis_bytes = client.info("memory")["used_memory"] - memory_before

        cache = PredictionCache(connect(redis_url, socket_timeout=1.0), schema=schema)
        rng = np.random.default_rng(0)
        ids = [f"doc{i:08d}" for i in rng.integers(0, docs, 20_000)]
        raw_prefix = f"{schema.prefix}:raw:"
        values = cache.client.pipeline(transaction=False)
        for doc_id in ids[:5000]:
            values.hget(schema.bucket_for_key(EMBEDDING_KIND, cache.current_version(EMBEDDING_KIND), doc_id), doc_id)
        pipe = client.pipeline(transaction=False)
        for doc_id, value in zip(ids[:5000], values.execute(), strict=True):
            pipe.set(raw_prefix + doc_id, value, ex=600)
        pipe.execute()
        cache.get_embeddings(ids[:1000])  # warm
        single = timed(cache.get_embedding, ids[:10_000])
        bare = timed(lambda doc_id: client.get(raw_prefix + doc_id), ids[:5000])
        batches = [ids[i : i + 100] for i in range(0, 10_000, 100)]
        batch = timed(cache.get_embeddings, batches)
        recall = int8_recall(EmbeddingStore(db_url), store, embedder, n=2000)
        result = {
            "bench": "embed",
            "docs": stats.embedded,
            "failed": stats.failed,
            "load_seconds": round(load_s, 1),
            "sync_seconds": round(stats.seconds, 1),
            "encode_seconds": round(encode_s, 1),
            "docs_per_s": round(stats.embedded / stats.seconds),
            "encode_only_docs_per_s": round(docs / encode_s),
            "overhead": round((stats.seconds - encode_s) / encode_s, 3),
            "redis_bytes_per_doc": round(redis_bytes / max(stats.embedded, 1), 1),
            "get_p50_us": percentile_us(single, 50),
            "get_p99_us": percentile_us(single, 99),
            "batch100_p99_us": percentile_us(batch, 99),
            "raw_get_p99_us": percentile_us(bare, 99),
            "recall_at_10_int8": round(recall, 4),
            "model_version": embedder.version,
        }
    return result
