"""Benchmarks: each measures ours and a reference in the same run and returns one JSON-able dict."""

from __future__ import annotations

import contextlib
import os
import random
import time
import uuid

import numpy as np

from ..serving import KeySchema, PredictionCache, QueryLogger, connect, publish_version
from ..serving.stats import keys_memory
from ..stack import running_version
from .measure import bare_get, percentile_us, timed


def drop_namespace(client, schema: KeySchema) -> None:
    """Remove every key of a benchmark's own namespace (SCAN: maintenance only, never a serving path)."""
    for name in client.scan_iter(f"{schema.prefix}:*", count=5000):
        client.unlink(name)


# In-process runs of a benchmark log to Dagster's console logger only above this: its DEBUG event lines (140 for
# bench graph) and a failed step's stack trace flooded stderr, where a failure is one line (``_run_failure``)
QUIET_RUN = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}


def bench_serve(redis_url: str, *, n_keys: int = 10_000, lookups: int = 50_000, seed: int = 0) -> dict:
    """p50/p99 of ``PredictionCache.get`` with query logging on vs a bare GET of the same values on the same
    transport (``send_pipelined``, as the cache sends its commands), and the query-event rate the logger sustains."""
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
    raw_get = bare_get(connect(redis_url, socket_timeout=1.0), raw_prefix)
    rng = random.Random(seed)
    sample = [keys[min(int(rng.paretovariate(1.0)) - 1, n_keys - 1)] for _ in range(lookups)]
    # Warm both connections, then interleave blocks so drift on a shared machine hits both alike.
    timed(lambda k: cache.get("ctr", k), sample[:2000])
    timed(raw_get, sample[:2000])
    ours, bare = [], []
    for start in range(0, lookups, 1000):
        block = sample[start : start + 1000]
        ours += timed(lambda k: cache.get("ctr", k), block)
        bare += timed(raw_get, block)
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
        "log_events_dropped": logger.stats.not_confirmed,
        "lookup_events_logged": lookup_stats.written,
        "lookup_events_dropped": lookup_stats.not_confirmed,
        "redis_version": running_version(redis_url),  # "valkey 8.1.8": Valkey's redis_version field says 7.2.4
    }
    result["p50_ratio"] = round(result["get_p50_us"] / result["raw_get_p50_us"], 3)
    result["p99_ratio"] = round(result["get_p99_us"] / result["raw_get_p99_us"], 3)
    return result


BENCHMARK_DB = 9  # redis-benchmark writes keys named key:NNN; keep them out of database 0


def redis_benchmark_set(redis_url: str, *, requests: int, value_size: int, pipeline: int = 1000) -> float | None:
    """SET requests/s that ``redis-benchmark`` (Debian's redis-tools) reaches on the same server; None if absent.

    On a server with a password the tool logs in as a user made for the run (``ACL SETUSER``: ``SET`` on ``key:*``
    only, a one-off password, deleted afterwards): its command line, which every account of the machine can read,
    never holds the URL's password. A server that cannot make one (before Redis 6, a user without ``ACL``) gets no
    reference (None) rather than the password on the command line."""
    import csv
    import io
    import secrets
    import shutil
    import subprocess
    from dataclasses import replace
    from urllib.parse import urlsplit

    import redis

    from ..serving.connection import parse_sentinel_url, sentinel_primary
    from ..serving.urls import split_userinfo

    binary = shutil.which("redis-benchmark")
    if binary is None:
        return None
    if (sentinel := parse_sentinel_url(redis_url)) is not None:  # the primary the sentinels name, not a sentinel
        scratch = sentinel_primary(replace(sentinel, db=BENCHMARK_DB), socket_timeout=30, socket_connect_timeout=30)
        (host, port), password = scratch.connection_pool.get_master_address(), sentinel.password
        tls = sentinel.tls is not None
    else:
        url = urlsplit(redis_url)
        scratch = connect(url._replace(path=f"/{BENCHMARK_DB}").geturl(), socket_timeout=30)
        host, port, password, tls = url.hostname or "127.0.0.1", url.port or 6379, url.password, url.scheme == "rediss"
    command = [binary, "-h", host, "-p", str(port), "-t", "set"]
    command += ["-n", str(requests), "-P", str(pipeline), "-d", str(value_size), "-r", str(requests), "--csv"]
    command += ["--dbnum", str(BENCHMARK_DB)]
    if tls:
        command += ["--tls"]
    user = None
    if password or split_userinfo(redis_url)[1]:  # a login: redis-benchmark gets one of its own
        user, one_off = f"precompute-bench-{secrets.token_hex(4)}", secrets.token_urlsafe(18)
        rules = ["on", f">{one_off}", "resetkeys", "~key:*", "-@all", "+set", "+select", "+ping", "+config|get"]
        try:
            scratch.execute_command("ACL", "SETUSER", user, *rules)
        except redis.RedisError:
            return None
        command += ["--user", user, "-a", one_off]
    try:
        output = subprocess.run(command, check=True, capture_output=True, text=True, timeout=600).stdout
    except subprocess.CalledProcessError as error:
        raise RuntimeError(f"redis-benchmark failed (exit {error.returncode}): {error.stderr.strip()[-300:]}") from None
    finally:
        if user is not None:
            scratch.execute_command("ACL", "DELUSER", user)
    for name in scratch.scan_iter("key:*", count=5000):  # redis-benchmark's keys, in its own database
        scratch.unlink(name)
    rows = [row for row in csv.reader(io.StringIO(output)) if row and row[0] == "SET"]
    return float(rows[0][1]) if rows else None


def bench_publish(
    redis_url: str, *, n: int = 1_000_000, naive_n: int = 50_000, seed: int = 0, redis_benchmark: bool = True
) -> dict:
    """Keys/s of ``publish_version`` vs a naive one-``SET``-per-key JSON loop vs ``redis-benchmark`` SET, and
    the Redis memory each takes per key. ``redis_benchmark=False`` (an external server: it writes ``key:*`` into
    database 9 and deletes every ``key:*`` there afterwards, outside our namespace) reports ``null`` for it.

    ``redis_bytes_per_key``: the memory of the version's buckets (``MEMORY USAGE``, every field, ``keys_memory``) per
    key published; ``naive_redis_bytes_per_key``: the same of the naive loop's keys, per naive key. Neither counts
    the keyspace's hash-table slots, which the naive loop's one key per value fills more; the values differ too: ours
    are float32 (``value_bytes``), the naive loop's JSON text (``naive_value_bytes``, their mean length), so the ratio
    measures layout and encoding together. Other traffic on the server does not move either.
    ``ratio_bytes_vs_naive`` is ours over naive (below 1: ours takes less memory).
    """
    import json as _json

    from .progress import progress

    schema = KeySchema(f"bench{uuid.uuid4().hex[:8]}")
    client = connect(redis_url, socket_timeout=30)

    try:  # the version's buckets and the naive keys go, also when a step fails or the bench is interrupted
        rng = np.random.default_rng(seed)
        keys = [f"ad{i:07d}" for i in range(n)]
        values = rng.random(n).tolist()
        with progress(desc="publish", total=n, unit="keys") as bar:
            items = zip(keys, values, strict=True)
            ours = publish_version(
                client, "ctr", "bench", items, n_keys=n, schema=schema, ttl_s=600, progress=bar.update
            )
        ours_bytes = keys_memory(client, schema.bucket("ctr", "bench", "*"))[0]

        naive_n = min(naive_n, n)
        started = time.perf_counter()
        for key, value in zip(keys[:naive_n], values[:naive_n], strict=True):
            client.set(f"{schema.prefix}:naive:{key}", _json.dumps(value), ex=600)
        naive_s = time.perf_counter() - started
        naive_value_bytes = sum(len(_json.dumps(value)) for value in values[:naive_n]) / max(naive_n, 1)
        naive_bytes = keys_memory(client, f"{schema.prefix}:naive:*")[0]

        value_size = len(np.float32(0).tobytes())
        reference = redis_benchmark_set(redis_url, requests=n, value_size=value_size) if redis_benchmark else None
    finally:
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
        "naive_value_bytes": round(naive_value_bytes, 1),
        "redis_bytes_per_key": round(ours_bytes / max(ours.keys, 1), 1),
        "naive_redis_bytes_per_key": round(naive_bytes / max(naive_n, 1), 1),
    }
    result["ratio_vs_naive"] = round(result["keys_per_s"] / result["naive_keys_per_s"], 2)
    result["ratio_vs_redis_benchmark"] = round(result["keys_per_s"] / reference, 3) if reference else None
    result["ratio_bytes_vs_naive"] = round(result["redis_bytes_per_key"] / result["naive_redis_bytes_per_key"], 3)
    return result


GRAPH_DAYS = 7  # bench graph's days of logs: the daily graph's lookback


def check_graph_queries(queries: int, days: int = GRAPH_DAYS) -> None:
    """Refuse fewer logged queries than ``bench graph`` has days (a day without any has nothing to generate)."""
    if queries < days:
        raise ValueError(f"--queries must be at least {days} (some on each of the {days} days), got {queries}")


def _run_failure(result) -> str:
    """Why a Dagster run failed: its first failed blocking asset check (the input did not pass it), else its first
    failed step's error."""
    import dagster as dg

    for check in result.get_asset_check_evaluations():
        if not check.passed and check.severity == dg.AssetCheckSeverity.ERROR:
            return (f"{check.asset_key.to_user_string()}'s check {check.check_name}: {check.description}"
                    " (more --queries or --ads?)")  # fmt: skip
    for event in result.get_step_failure_events():
        error = event.event_specific_data.error
        return f"step {event.step_key}: {' '.join((error.message if error else 'failed').split())}"
    return "the run did not succeed"


def bench_graph(
    *,
    queries: int = 10_000_000,
    ads: int = 100_000,
    days: int = GRAPH_DAYS,
    top_ns=(1000, 100_000),
    redis_url: str | None = None,
) -> dict:
    """Seconds of asset compute of the daily graph on ``queries`` logged queries over ``ads`` ads, vs the
    I/O floor: one pyarrow scan of the same input files.

    The hourly ``query_logs`` partitions and daily impressions are written straight to a scratch lake
    (as the hourly job would have), then the daily graph runs once per ``top_n`` against ``redis_url``
    (default: the local stack's Redis), without ``demand_model`` (``bench demand`` measures the LSTM).

    ``io_floor_seconds``: ``pyarrow.parquet.read_table`` from the lake's filesystem of every hourly
    ``query_logs`` file of the days ``ad_demand``/``traffic_profile`` read (their columns ``ts``, ``kind``,
    ``key``) and every daily ``ad_impressions`` file ``ctr_model`` reads (its columns), each once, summing
    row counts (``io_floor_rows``). The files are scanned once untimed first, so the timed scan finds a warm
    page cache, as the asset runs do (they read the files just written). The graph reads each hour of logs
    twice (both selection assets) and does its compute besides, so ``ratio_vs_io_floor`` (each run's
    ``total_asset_seconds`` / ``io_floor_seconds``) is how far the graph is from what reading its inputs costs.
    """
    import shutil
    import tempfile

    import dagster as dg
    import pandas as pd
    import pyarrow.parquet as pq

    from ..definitions import defs as load_definitions
    from ..defs.automation import refresh_precompute_job
    from ..defs.models import CtrModelConfig
    from ..defs.partitions import deployment_partitions
    from ..defs.resources import (
        ExperimentResource,
        LakeResource,
        ModelStoreResource,
        ParquetIOManager,
        RedisResource,
    )
    from ..defs.selection import LOOKBACK_DAYS
    from ..ml.ctr import IMPRESSION_COLUMNS
    from ..stack import ENV_REDIS, Stack
    from ..storage.lake import Lake
    from ..storage.tables import QUERY_LOGS
    from ..workload.ads import generate_traffic, make_ads

    check_graph_queries(queries, days)
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
        "lake": LakeResource(base_uri=f"{scratch}/lake"),
        "model_store": ModelStoreResource(root=f"{scratch}/models"),
        "experiment": ExperimentResource(),
        "io_manager": ParquetIOManager(lake=LakeResource(base_uri=f"{scratch}/lake")),
    }
    runs, failure = {}, None
    # The daily graph without demand_model, whose LSTM has its own budget and benchmark (bench demand).
    assets = defs.resolve_job_def(refresh_precompute_job.name).asset_layer.executable_asset_keys
    # Each N publishes into a namespace of its own: with fewer ads than N, two selections predict the same ads, and
    # the second publish would find its version current and write nothing.
    namespaces = [RedisResource(url=redis_url, namespace=f"bench{uuid.uuid4().hex[:6]}") for _ in [None, *top_ns]]
    with dg.instance_for_test() as instance:
        # A first run untimed, as the floor's first scan: the graph's one-time costs (imports, first use) made the
        # first timed N look slower than the next (ctr_model 3.7 s against 1.7 s, h_bench)
        for top_n, namespace in zip([top_ns[0], *top_ns], namespaces, strict=True):
            result = dg.materialize(
                [spec for spec in defs.assets if getattr(spec, "keys", None) and spec.keys & assets],
                resources={**resources, "redis": namespace},
                partition_key=day_keys[-1],
                instance=instance,
                run_config={**QUIET_RUN, "ops": {"top_ads": {"config": {"top_n": top_n}}}},
                raise_on_error=False,
            )
            if not result.success:
                failure = _run_failure(result)
                break
            if namespace is namespaces[0]:
                continue  # the warm-up
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
    shutil.rmtree(scratch, ignore_errors=True)
    for namespace in namespaces:
        drop_namespace(connect(redis_url, socket_timeout=30), namespace.schema())
    if failure:
        raise ValueError(f"the daily graph failed on {written:,} queries over {ads:,} ads: {failure}")
    return {"bench": "graph", "queries": written, "ads": ads, "days": days, "setup_seconds": round(setup_s, 1),
            "goal_seconds": 120, "io_floor_seconds": io_floor_s, "io_floor_rows": io_floor_rows,
            **runs}  # fmt: skip


def pa_table(frame, schema):
    """``frame`` as a pyarrow table of ``schema``."""
    import pyarrow as pa

    return pa.Table.from_pandas(frame, schema=schema, preserve_index=False)


def bench_embed(
    redis_url: str, app_db_url: str, *, docs: int = 1_000_000, chunk_size: int = 20_000, service_docs: int = 100_000
) -> dict:
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
        embedder.encode(texts[:chunk_size])  # warm, as the sync is when it encodes: a cold start timed only here
        # made the sync look faster than the bare encode it contains (overhead -0.76 at 2,000 documents)

        started = time.perf_counter()
        for i in range(0, len(texts), chunk_size):
            embedder.encode(texts[i : i + chunk_size])
        encode_s = time.perf_counter() - started
        del texts

        stats = sync_embeddings(store, EmbeddingStore(db_url), client, embedder, schema=schema,
                                chunk_size=chunk_size, log=lambda message: None)  # fmt: skip
        redis_bytes = keys_memory(client, schema.bucket(EMBEDDING_KIND, "*", "*"))[0]

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
        raw = connect(redis_url, socket_timeout=1.0)  # as the cache's connection
        cleanup.callback(raw.close)
        raw_get = bare_get(raw, raw_prefix)
        # Both warmed alike, then the same ids in interleaved blocks: drift on a shared machine hits both alike
        timed(cache.get_embedding, ids[:1000])
        timed(raw_get, ids[:1000])
        single, bare = [], []
        for start in range(0, 5000, 500):
            block = ids[start : start + 500]
            single += timed(cache.get_embedding, block)
            bare += timed(raw_get, block)
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
            "raw_get_p50_us": percentile_us(bare, 50),
            "raw_get_p99_us": percentile_us(bare, 99),
            "recall_at_10_int8": round(recall, 4),
            "model_version": embedder.version,
            **bench_service_sync(db_url, client, schema, service_docs=min(docs, service_docs)),
        }
        result["p50_ratio"] = round(result["get_p50_us"] / result["raw_get_p50_us"], 3)
        result["p99_ratio"] = round(result["get_p99_us"] / result["raw_get_p99_us"], 3)
    return result


def bench_service_sync(db_url: str, client, schema: KeySchema, *, service_docs: int) -> dict:
    """The HTTP embedding backend against a stub that answers at once (``stub_embedding_service``): docs/s of a
    full sync of the first ``service_docs`` documents through it, beside its bare ``encode`` of the same texts
    (the service round trips alone) in the same run; ``service_overhead`` = the sync's extra time over that."""
    from ..ml.embedder import check_document
    from ..ml.embedding_service import HttpEmbedder
    from ..storage.documents import DocumentStore
    from ..storage.embeddings import EmbeddingStore
    from ..storage.postgres import transaction
    from ..sync.embeddings import sync_embeddings
    from .stub_embedding_service import stub_embedding_service

    subset = DocumentStore(db_url, table="service_docs")
    subset.ensure_schema()
    with transaction(db_url) as conn, conn.cursor() as cur:  # the same documents, copied inside PostgreSQL
        cur.execute(
            "INSERT INTO service_docs SELECT * FROM documents WHERE NOT deleted ORDER BY doc_id LIMIT %s",
            (service_docs,),
        )
        cur.execute("SELECT title, body FROM service_docs")
        texts = [check_document(title, body)[0] for title, body in cur.fetchall()]
    with stub_embedding_service() as url:
        embedder = HttpEmbedder(url=url, model="stub", batch_size=64, max_concurrency=4)
        embedder.encode(texts[:256])  # warm: the dimension, the connections
        started = time.perf_counter()
        embedder.encode(texts)
        encode_s = time.perf_counter() - started
        service_schema = KeySchema(f"{schema.namespace}s")
        try:
            stats = sync_embeddings(subset, EmbeddingStore(db_url), client, embedder, schema=service_schema,
                                    chunk_size=10_000, log=lambda message: None)  # fmt: skip
        finally:
            drop_namespace(client, service_schema)
    return {
        "service_docs": stats.embedded,
        "service_failed": stats.failed,
        "service_docs_per_s": round(stats.embedded / stats.seconds),
        "service_encode_only_docs_per_s": round(len(texts) / encode_s),
        "service_overhead": round((stats.seconds - encode_s) / encode_s, 3),
        "service_stub": "OpenAI-compatible, answers at once, its own process; batch 64, 4 requests at once",
    }


def bench_campaign(
    redis_url: str,
    app_db_url: str,
    dagster_pg_url: str,
    *,
    campaigns: int = 10_000,
    ads_per_campaign: int = 20,
    warm_ads: int = 1000,
    seed: int = 0,
) -> dict:
    """Campaign warming: one ``campaign_launch_sensor`` tick over ``campaigns`` registered campaigns, and the
    seconds from registering a ``warm_ads``-ad campaign to all its CTRs readable through the serving client
    via a real Dagster run, vs a naive loop doing the same warming.

    Set-up, not timed: a small synthetic lake (2,000 ads, 3 days of impressions), ``ctr_model`` trained on it
    and approved (its ``beats_baseline`` check passed) in a scratch Dagster instance on a scratch PostgreSQL
    database, a scratch application database for the registry, a private Redis namespace, and ``campaigns``
    campaigns of ``ads_per_campaign`` ads registered (all active, launching within the 24 h horizon, none
    warm). Everything is removed afterwards (databases dropped, namespace keys deleted, files removed).

    - ``sensor_tick_s``: the first tick (cursor None): every registered campaign is new to it, so it reads
      every change, the due campaigns and the instance's partitions and builds one run request per campaign
      (``runs_requested``). ``sensor_next_tick_s`` is the tick after it (its cursor, the partitions added as
      the daemon would): the steady state, nothing new. Goal < 5 s.
    - ``warm_seconds``: ``register_campaign_launch`` → a sensor tick (with the previous tick's cursor, so it
      requests only this campaign; the other campaigns are still due) → the requested ``campaign_warming_job``
      run executed in-process on the PostgreSQL-backed instance (``campaign_ctr`` then ``campaign_budget``)
      → ``PredictionCache.get_many`` polled until every ad answers. ``register_seconds`` and ``run_seconds``
      are parts of it. Goal < 20 s.
    - ``naive_warm_seconds``: the same CTRs written by a plain loop from the same registry rows into a second
      private namespace of the same Redis: read the campaign and its ads, find and load the same approved
      model, score the ads (the same batched ``score_ads`` call: only the writing is naive), one ``SET`` with
      the same expiry per key, then poll ``get_many`` the same way. It starts from the registered rows, so the
      registration (``register_seconds``) is counted for ours only; it writes no budget split, marks nothing
      warm and has no transaction (a reader can see part of the campaign).
    - ``ratio_vs_naive`` = ``naive_warm_seconds / warm_seconds``: above 1 ours is faster, below 1 slower (the
      Dagster run's own overhead: run and event records in PostgreSQL, step orchestration, the budget split).
    - ``values_agree``: ours and the naive loop's values are the same for every ad (float32).
    """
    import shutil
    import tempfile
    from datetime import UTC, date, datetime, timedelta

    import dagster as dg
    import pandas as pd

    from ..defs.campaigns import (
        CampaignWarmingConfig,
        approved_model_version,
        campaign_budget,
        campaign_ctr,
        campaign_launch_sensor,
        campaign_warming_job,
        expiry,
    )
    from ..defs.models import CTR_MODEL, ctr_model
    from ..defs.partitions import DEFAULT_PARTITIONS
    from ..defs.resources import (
        CampaignRegistryResource,
        LakeResource,
        ModelStoreResource,
        ParquetIOManager,
        RedisResource,
    )
    from ..defs.sources import ad_impressions, ads
    from ..ml import ctr
    from ..serving.keys import codec_for
    from ..storage.campaigns import CampaignRegistry, register_campaign_launch
    from ..storage.lake import Lake
    from ..storage.postgres import scratch_database
    from ..workload.ads import generate_traffic, make_ads

    def ad_records(prefix: str, n: int, features_seed: int) -> list[dict]:
        table = make_ads(n, days=1, seed=features_seed)
        return [
            {"ad_id": f"{prefix}{i:06d}", "quality": quality, "bid": bid, "text_len": text_len, "category": category}
            for i, (quality, bid, text_len, category) in enumerate(
                zip(table["quality"].tolist(), table["bid"].tolist(), table["text_len"].tolist(),
                    table["category"].tolist(), strict=True)
            )
        ]  # fmt: skip

    def readable(cache: PredictionCache, ids: list[str], timeout_s: float = 60.0) -> list:
        deadline = time.monotonic() + timeout_s
        while True:
            values = cache.get_many("ctr", ids)
            if all(value is not None for value in values):
                return values
            if time.monotonic() > deadline:
                missing = sum(value is None for value in values)
                raise RuntimeError(f"{missing} of {len(ids)} ads still unreadable after {timeout_s:.0f} s")
            time.sleep(0.005)

    schema = KeySchema(f"bench{uuid.uuid4().hex[:8]}")
    naive_schema = KeySchema(f"{schema.namespace}n")
    client = connect(redis_url, socket_timeout=30)
    with contextlib.ExitStack() as cleanup:
        scratch = tempfile.mkdtemp(prefix="precompute-bench-campaign-")
        cleanup.callback(shutil.rmtree, scratch, True)
        cleanup.callback(client.close)
        cleanup.callback(drop_namespace, client, naive_schema)
        cleanup.callback(drop_namespace, client, schema)
        app_db = cleanup.enter_context(scratch_database(app_db_url, "bench"))
        dagster_db = cleanup.enter_context(scratch_database(dagster_pg_url, "bench"))
        instance = cleanup.enter_context(
            dg.instance_for_test(overrides={"storage": {"postgres": {"postgres_url": dagster_db}}})
        )

        # An approved ctr_model, trained the way the daily graph trains it, on three synthetic days.
        started = time.perf_counter()
        lake_uri, models = f"{scratch}/lake", f"{scratch}/models"
        last = date.fromisoformat(DEFAULT_PARTITIONS.daily.get_last_partition_key())
        days = [(last - timedelta(days=back)).isoformat() for back in (2, 1, 0)]
        day_ms = [int(DEFAULT_PARTITIONS.daily.time_window_for_partition_key(d).start.timestamp() * 1000) for d in days]
        lake = Lake(lake_uri)
        catalog = make_ads(2000, days=len(days), seed=seed)
        lake.write("ads", None, catalog)
        traffic = pd.concat(generate_traffic(catalog, start_ms=day_ms[0], days=len(days), queries_per_day=40_000,
                                             seed=seed))  # fmt: skip
        for day, start_ms in zip(days, day_ms, strict=True):
            todays = traffic[(traffic["ts_ms"] >= start_ms) & (traffic["ts_ms"] < start_ms + 86_400_000)]
            lake.write("ad_impressions", day, todays[["ts_ms", "ad_id", "clicked"]])
        lake_resource = LakeResource(base_uri=lake_uri)
        model_store = ModelStoreResource(root=models)
        dg.materialize(
            [ads, ad_impressions, ctr_model],
            selection=[ctr_model],
            partition_key=days[-1],
            instance=instance,
            resources={"lake": lake_resource, "model_store": model_store},
            run_config={**QUIET_RUN, "ops": {"ctr_model": {"config": {"n_estimators": 40}}}},
        )
        model_version = approved_model_version(instance)  # fails here, saying so, if the model was not approved

        # The registry: `campaigns` campaigns, all launching within the horizon, none warm.
        registry = CampaignRegistry(app_db, spec=lake_resource.ad_feature_spec())
        registry.ensure_schema()
        now = datetime.now(UTC)
        features = ad_records("", campaigns * ads_per_campaign, seed + 1)
        batch = 2000
        for lo in range(0, campaigns, batch):
            records = []
            for i in range(lo, min(lo + batch, campaigns)):
                own = features[i * ads_per_campaign : (i + 1) * ads_per_campaign]
                records.append({
                    "campaign_id": f"bench{i:06d}", "tenant_id": "bench",
                    "launch_at": now + timedelta(minutes=10 + (i * 7) % (23 * 60)),
                    "ads": [{**ad, "ad_id": f"bench{i:06d}-{j:03d}"} for j, ad in enumerate(own)],
                })  # fmt: skip
            registry.register_many(records, now=now)
        del features
        setup_s = time.perf_counter() - started

        resource = CampaignRegistryResource(url=app_db)
        redis_resource = RedisResource(url=redis_url, namespace=schema.namespace)

        def tick(cursor: str | None) -> dg.SensorResult:
            sensor_resources = {"campaign_registry": resource, "redis": redis_resource}
            context = dg.build_sensor_context(instance=instance, cursor=cursor, resources=sensor_resources)
            return campaign_launch_sensor(context)

        def add_partitions(result: dg.SensorResult) -> None:  # what the daemon does with partition requests
            for request in result.dynamic_partitions_requests:
                instance.add_dynamic_partitions(request.partitions_def_name, request.partition_keys)

        started = time.perf_counter()
        first = tick(None)
        tick_s = time.perf_counter() - started
        add_partitions(first)
        started = time.perf_counter()
        second = tick(first.cursor)
        next_tick_s = time.perf_counter() - started

        resources = {
            "redis": redis_resource,
            "lake": lake_resource,
            "io_manager": ParquetIOManager(lake=lake_resource),
            "model_store": model_store,
            "campaign_registry": resource,
        }
        job = dg.Definitions(
            assets=[campaign_ctr, campaign_budget], jobs=[campaign_warming_job], resources=resources
        ).resolve_job_def(campaign_warming_job.name)
        warm_id = "bench-warm"
        warm_list = ad_records("bench-warm-", warm_ads, seed + 2)
        ids = [ad["ad_id"] for ad in warm_list]
        launch = datetime.now(UTC) + timedelta(hours=2)
        cache = PredictionCache(connect(redis_url, socket_timeout=5), schema=schema, pointer_ttl_s=0)
        cleanup.callback(cache.close)
        if any(value is not None for value in cache.get_many("ctr", ids)):
            raise RuntimeError("the campaign's ads are readable before it was warmed")

        # Ours: register -> sensor tick -> the requested run -> readable through the serving client.
        started = time.perf_counter()
        register_campaign_launch(app_db, warm_id, "bench", launch, warm_list, end_at=launch + timedelta(days=1))
        register_s = time.perf_counter() - started
        result = tick(second.cursor)
        (request,) = [r for r in result.run_requests if r.partition_key == warm_id]
        add_partitions(result)
        run_started = time.perf_counter()
        run = job.execute_in_process(partition_key=warm_id, instance=instance, tags=request.tags, run_config=QUIET_RUN)
        run_s = time.perf_counter() - run_started
        ours = readable(cache, ids)
        warm_s = time.perf_counter() - started
        if not run.success or not registry.get(warm_id).is_warm:
            raise RuntimeError("the warming run did not leave the campaign warm")
        meta = run.asset_materializations_for_node("campaign_ctr")[0].metadata

        # Naive: the same registry rows and approved model, one SET per key with the same expiry.
        naive_cache = PredictionCache(connect(redis_url, socket_timeout=5), schema=naive_schema, pointer_ttl_s=0)
        cleanup.callback(naive_cache.close)
        codec = codec_for("ctr")
        started = time.perf_counter()
        naive_registry = CampaignRegistry(app_db, spec=lake_resource.ad_feature_spec())
        campaign, rows = naive_registry.get(warm_id), naive_registry.ads(warm_id)
        model = model_store.store().load(CTR_MODEL, approved_model_version(instance))
        scores, _ = ctr.score_ads(model, rows, rows["ad_id"].tolist())
        expire_at = expiry(campaign, datetime.now(UTC), CampaignWarmingConfig())
        for ad_id, value in zip(scores["ad_id"].tolist(), scores["ctr"].tolist(), strict=True):
            client.set(naive_schema.live("ctr", ad_id), codec.encode(value), exat=expire_at)
        naive = readable(naive_cache, ids)
        naive_s = time.perf_counter() - started

        return {
            "bench": "campaign",
            "campaigns": campaigns,
            "ads_per_campaign": ads_per_campaign,
            "sensor_tick_s": round(tick_s, 3),
            "sensor_tick": "first tick (cursor None): every campaign new, one run request each",
            "runs_requested": len(first.run_requests),
            "sensor_next_tick_s": round(next_tick_s, 3),
            "sensor_goal_s": 5,
            "warm_ads": warm_ads,
            "warm_seconds": round(warm_s, 3),
            "register_seconds": round(register_s, 3),
            "run_seconds": round(run_s, 3),
            "warm_goal_s": 20,
            "minutes_before_launch": round(meta["minutes_before_launch"].value, 1),
            "model_version": model_version,
            "naive_warm_seconds": round(naive_s, 3),
            "ratio_vs_naive": round(naive_s / warm_s, 3),
            "values_agree": bool(np.allclose(ours, naive, rtol=0, atol=1e-7)),
            "setup_seconds": round(setup_s, 1),
        }


def synthetic_hourly_counts(keys: int, days: int, *, seed: int = 0):
    """Hourly requests of ``keys`` keys over ``days`` days starting on a Monday, generated in memory and
    deterministic under ``seed``: Zipf(0.9) popularity (about 20 requests per key and day on average), a
    diurnal cycle, quieter weekends, and a weekly structure that a recency-weighted frequency sees a week late:
    a random 30 % of the keys are asked for on one weekday only (at 7× their daily rate)."""
    from ..ml.demand import HOURS_PER_DAY, HourlyCounts

    rng = np.random.default_rng(seed)
    zipf = 1.0 / np.arange(1, keys + 1) ** 0.9
    daily_rate = rng.permutation(20.0 * keys * zipf / zipf.sum())
    weekly = rng.random(keys) < 0.3
    weekday_of = rng.integers(0, 7, keys)
    diurnal = 1 + 0.6 * np.sin(2 * np.pi * (np.arange(HOURS_PER_DAY) - 9) / HOURS_PER_DAY)
    diurnal = diurnal / diurnal.sum()
    weekend = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 0.7, 0.7])
    counts = np.zeros((keys, days * HOURS_PER_DAY), dtype=np.float32)
    for d in range(days):
        weekday = d % 7
        rate = daily_rate * weekend[weekday] * np.where(weekly, np.where(weekday_of == weekday, 7.0, 0.0), 1.0)
        hours = slice(d * HOURS_PER_DAY, (d + 1) * HOURS_PER_DAY)
        counts[:, hours] = rng.poisson(rate[:, None] * diurnal[None, :])
    return HourlyCounts(
        keys=np.array([f"k{i:07d}" for i in range(keys)], dtype=object),
        counts=counts,
        hour_of_day=np.tile(np.arange(HOURS_PER_DAY), days),
        weekday=np.repeat(np.arange(days) % 7, HOURS_PER_DAY),
        day=np.repeat(np.arange(days), HOURS_PER_DAY),
        missing=np.zeros(days * HOURS_PER_DAY, dtype=bool),
    )


def check_demand_size(keys: int, days: int, *, memory_bytes: int | None = None) -> None:
    """Refuse ``keys`` × ``days`` whose float32 hourly counts alone would take more than a quarter of the machine's
    memory (``memory_bytes``; default: physical memory, where the system reports it): training copies them into its
    features, and a typo of --days would otherwise end in the kernel's OOM killer, not an error."""
    if memory_bytes is None:
        try:
            memory_bytes = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):  # not reported (Windows): nothing to check against
            return
    needed = keys * days * 24 * np.dtype(np.float32).itemsize
    if needed > memory_bytes / 4:
        raise ValueError(
            f"{keys:,} keys × {days:,} days of hourly counts take {needed / 2**30:.1f} GiB, more than a quarter of "
            f"this machine's {memory_bytes / 2**30:.1f} GiB: use fewer --keys or --days"
        )


def bench_demand(keys: int = 100_000, days: int = 14, seed: int = 0, *, hp=None) -> dict:
    """The LSTM demand model on ``keys`` keys × ``days`` days of synthetic hourly counts
    (``synthetic_hourly_counts``), the last day held back, next to the frequency baseline in the same run.

    - ``lstm_train_s``: wall seconds of ``train_lstm`` (features of the sampled training keys, then the epochs,
      bounded by ``max_epochs`` and ``max_steps`` of ``hp``, with its ``max_seconds`` safety stop, which counts the
      features too; default: ``DemandHyperParams()``, torch threads as ``hp.threads``) on the days before the
      held-back day, measured around the call (so it includes the process's first-use costs of torch, such as the
      optimizer's imports); ``lstm_steps`` and ``lstm_stopped_by`` say how far it got and which bound stopped it.
    - ``lstm_forecast_s``: ``forecast_next_day`` of every key for the held-back day from the days before it
      (features of every key included).
    - ``frequency_s``: the frequency baseline on the same data (daily totals, then ``frequency_forecast``).
    - ``heldout_hit_rate``: for lstm, frequency, seasonal and ewma, the share of the held-back day's requests
      whose key is in the method's top ``hp.top_n`` (keys requested before that day), as ``evaluate_demand``.
    - ``lstm_forecast_vs_frequency`` = ``lstm_forecast_s / frequency_s`` (above 1: the LSTM is slower).
    """
    import pandas as pd
    import torch

    from ..ml.demand import (
        DemandHyperParams,
        ewma_forecast,
        forecast_next_day,
        frequency_forecast,
        seasonal_forecast,
        train_lstm,
        trained_hyper_params,
    )
    from ..ml.selection import coverage, select_top

    if days < 3:
        raise ValueError(f"need at least 3 days (train, hold back a day), got {days}")
    check_demand_size(keys, days)
    hp = hp or DemandHyperParams()
    started = time.perf_counter()
    data = synthetic_hourly_counts(keys, days, seed=seed)
    generate_s = time.perf_counter() - started
    held = days - 1
    end = data.day_start(held)
    before = type(data)(data.keys, data.counts[:, :end], data.hour_of_day[:end], data.weekday[:end],
                        data.day[:end], data.missing[:end])  # fmt: skip
    previous_threads = torch.get_num_threads()
    if hp.threads:
        torch.set_num_threads(hp.threads)
    try:
        started = time.perf_counter()
        model, info = train_lstm(before, hp, held)
        train_s = time.perf_counter() - started
        started = time.perf_counter()
        lstm = forecast_next_day(model, before, trained_hyper_params(hp, held)).to_numpy()
        forecast_s = time.perf_counter() - started
    finally:
        torch.set_num_threads(previous_threads)
    started = time.perf_counter()
    daily_before = before.daily()
    frequency = frequency_forecast(daily_before, before.keys, held, hp)
    frequency_s = time.perf_counter() - started
    forecasts = {
        "lstm": lstm,
        "frequency": frequency,
        "seasonal": seasonal_forecast(daily_before, held, before.logged_days()),
        "ewma": ewma_forecast(before, held, hp),
    }
    actual = pd.Series(data.daily()[:, held], index=pd.Index(data.keys))
    known = daily_before.sum(axis=1) > 0
    hit_rate = {
        name: round(coverage(select_top(pd.Series(values, index=pd.Index(data.keys))[known], hp.top_n), actual), 4)
        for name, values in forecasts.items()
    }
    return {
        "bench": "demand",
        "keys": keys,
        "days": days,
        "top_n": hp.top_n,
        "requests_held_back_day": int(actual.sum()),
        "lstm_train_s": round(train_s, 3),
        "lstm_epochs": info["epochs"],
        "lstm_steps": info["steps"],
        "lstm_stopped_by": info["stopped_by"],
        "lstm_train_samples": info["samples"],
        "lstm_budget": {
            "max_epochs": hp.max_epochs,
            "max_steps": hp.max_steps,
            "max_seconds": hp.max_seconds,
            "max_train_keys": hp.max_train_keys,
            "window_days": trained_hyper_params(hp, held).window_days,  # as trained: fewer days leave fewer
            "sequence_days": hp.sequence_days,
        },
        "torch_threads": hp.threads or torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "lstm_forecast_s": round(forecast_s, 3),
        "frequency_s": round(frequency_s, 3),
        "lstm_forecast_vs_frequency": round(forecast_s / frequency_s, 2) if frequency_s > 0 else None,
        "heldout_hit_rate": hit_rate,
        "train_goal_s": 60,
        "forecast_goal_s": 5,
        "generate_s": round(generate_s, 1),
    }


def bench_rerank(
    redis_url: str, *, docs: int = 100_000, dim: int = 300, candidates: int = 100, queries: int = 3000
) -> dict:
    """p50/p99 of ``rerank`` (query logging on) for ``candidates`` documents of a published ``docs``-document
    int8 version, against a bare pipelined ``HMGET`` of the same fields grouped the same way (no decode, no
    scoring, no logging), interleaved in blocks in the same run."""
    from ..serving.connection import send_pipelined
    from ..serving.keys import EMBEDDING_KIND, bucket_of
    from ..serving.rerank import rerank
    from ..serving.vectors import encode_batch

    schema = KeySchema(f"bench{uuid.uuid4().hex[:8]}")
    admin = connect(redis_url, socket_timeout=30)
    rng = np.random.default_rng(0)
    ids = [f"doc{i:07d}" for i in range(docs)]
    raws: list[bytes] = []
    for start in range(0, docs, 50_000):  # encode in slices: 100k × 300 floats at once is 120 MB
        part = rng.normal(size=(min(50_000, docs - start), dim)).astype(np.float32)
        raws += encode_batch(part, model_version="bench")
    publish_version(admin, EMBEDDING_KIND, "bench", zip(ids, raws, strict=True), n_keys=docs, schema=schema, ttl_s=600)
    pointer_buckets = admin.get(schema.pointer(EMBEDDING_KIND)).decode().rpartition(":")[2]
    buckets = int(pointer_buckets)
    cache = PredictionCache.from_url(redis_url, namespace=schema.namespace, socket_timeout=1.0)
    raw = connect(redis_url, socket_timeout=1.0)
    sets = [[ids[i] for i in rng.choice(docs, candidates, replace=False)] for _ in range(queries)]
    query = rng.normal(size=dim).astype(np.float32)

    def bare(doc_ids: list[str]) -> None:  # the same commands on the same transport: no decode, scoring or logging
        groups: dict[int, list[str]] = {}
        for doc_id in doc_ids:
            groups.setdefault(bucket_of(doc_id, buckets), []).append(doc_id)
        send_pipelined(raw, [("HMGET", schema.bucket(EMBEDDING_KIND, "bench", b), *m) for b, m in groups.items()])

    def redis_py(doc_ids: list[str]) -> None:  # the idiomatic redis-py pipeline of the same HMGETs
        groups: dict[int, list[str]] = {}
        for doc_id in doc_ids:
            groups.setdefault(bucket_of(doc_id, buckets), []).append(doc_id)
        pipe = raw.pipeline(transaction=False)
        for bucket, members in groups.items():
            pipe.hmget(schema.bucket(EMBEDDING_KIND, "bench", bucket), members)
        pipe.execute()

    def ours(doc_ids: list[str]) -> None:
        rerank(cache, query, doc_ids)

    for measured in (ours, bare, redis_py):  # warm all three alike: the same warm-up for every side compared
        timed(measured, sets[:200])
    mine, theirs, idiomatic = [], [], []
    for start in range(0, queries, 100):
        block = sets[start : start + 100]
        mine += timed(ours, block)
        theirs += timed(bare, block)
        idiomatic += timed(redis_py, block)
    cache.close()
    drop_namespace(admin, schema)
    result = {
        "bench": "rerank",
        "docs": docs,
        "dim": dim,
        "candidates": candidates,
        "queries": queries,
        "buckets": buckets,
        "rerank_p50_us": percentile_us(mine, 50),
        "rerank_p99_us": percentile_us(mine, 99),
        "raw_hmget_p50_us": percentile_us(theirs, 50),
        "raw_hmget_p99_us": percentile_us(theirs, 99),
        "redis_py_pipeline_p99_us": percentile_us(idiomatic, 99),
        "goal_p99_us": 2000,
    }
    result["p99_ratio"] = round(result["rerank_p99_us"] / result["raw_hmget_p99_us"], 3)
    return result
