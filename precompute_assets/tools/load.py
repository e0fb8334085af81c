"""``precompute bench load``: the serving client under load from several processes, beside a bare load.

Each of ``processes`` worker processes (spawned, so each has its own interpreter and GIL, like service
workers) opens its own ``PredictionCache`` with query logging on and calls ``get`` on keys drawn from a
Zipf-like popularity over a published version (a share of them missing, so misses and their live-tier lookup
are part of the load). The bare reference is the same processes doing an ``HGET`` of the same field in the same
bucket on the serving client's transport (``send_pipelined``), with no logging: what a service would do with no
client at all. Two measurements, each of four
phases of ``seconds`` in the order ours, bare, bare, ours (a drift of the machine falls on both alike):

- capacity: a closed loop (each call right after the last): ``requests_per_s`` / ``raw_requests_per_s``;
- latency at a sustained rate: every process paced at the same rate for both, ``rate_share`` (default half) of
  the bare load's capacity, the operating point of a service with headroom: ``p50_us``/``p99_us``/``p999_us``
  and ``raw_*``. A closed loop on 2 shared cores measures run-queue waits, not the client: its latencies are
  reported too (``saturated``).

Latency is per call, measured in the worker: ``p50_us``... are each call's own time (a call that starts late
because the ones before ran long is not charged for the wait), and ``response_p50_us``... (with ``raw_`` ones and
``response_p999_ratio``) count a late call from when it was due, as wrk2 does: what a caller whose requests arrive
at that rate waits, the time a process spent behind its schedule (descheduled on busy cores, a GIL held by the
logger's thread) included. ``rate_held`` and ``raw_rate_held``: the share of the rate each side kept. Redis CPU is
the server's own ``used_cpu_user + used_cpu_sys`` in a phase, the mean of the phases of a side.
"""

from __future__ import annotations

import multiprocessing
import random
import time
import uuid
from dataclasses import dataclass

import numpy as np

from ..serving import KeySchema, PredictionCache, connect, publish_version
from ..serving.connection import send_pipelined
from ..serving.keys import Pointer
from ..stack import running_version
from .bench import drop_namespace
from .interrupts import interrupts_ignored


@dataclass(frozen=True)
class LoadPlan:
    redis_url: str
    namespace: str
    keys: int
    seconds: float
    miss_share: float
    seed: int


_START_TIMEOUT_S = 120.0  # a worker that has not imported and warmed up by then breaks the barrier


def _sample(plan: LoadPlan, worker: int, n: int) -> list[str]:
    """``n`` keys: Pareto-popular published keys, and ``miss_share`` of keys that were never published."""
    rng = random.Random(plan.seed * 1000 + worker)
    out = []
    for _ in range(n):
        if rng.random() < plan.miss_share:
            out.append(f"absent{rng.randrange(plan.keys)}")
        else:
            out.append(f"ad{min(int(rng.paretovariate(1.0)) - 1, plan.keys - 1):07d}")
    return out


def _worker(plan: LoadPlan, worker: int, mode: str, start, queue, rate: float | None = None) -> None:
    """Lookups for ``plan.seconds`` once every worker is warm (``start``, a barrier of all workers and the phase),
    back to back or ``rate`` a second; puts (latencies ns, calls, errors, logger stats) on ``queue``."""
    from ..serving.querylog import fine_timer_slack

    try:  # a worker that cannot start breaks the barrier: the phase fails now, not at its timeout
        fine_timer_slack()  # pacing sleeps end on time
        keys = _sample(plan, worker, 200_000)
        errors = 0
        latencies = np.empty(4_000_000, dtype=np.int64)
        responses = np.empty(4_000_000, dtype=np.int64)  # from when each call was due, when it started late
        calls = 0
        clock = time.perf_counter_ns
        written = dropped = 0
        if mode == "ours":
            cache = PredictionCache.from_url(plan.redis_url, namespace=plan.namespace, socket_timeout=1.0)
            lookup = lambda key: cache.get("ctr", key)  # noqa: E731
        else:
            client = connect(plan.redis_url, socket_timeout=1.0)
            schema = KeySchema(plan.namespace)
            pointer = Pointer.decode(client.get(schema.pointer("ctr")))

            def lookup(key: str):  # on the serving client's transport: redis-py's hget costs more per call
                return send_pipelined(client, [(b"HGET", schema.bucket_for_key("ctr", pointer, key), key)])[0]

        for key in keys[:2000]:  # warm the connection and the pointer
            lookup(key)
    except BaseException:
        start.abort()
        raise
    start.wait(timeout=_START_TIMEOUT_S)
    begin = clock()
    deadline = begin + int(plan.seconds * 1e9)
    period = int(1e9 / rate) if rate else 0
    n = len(keys)
    while True:
        due = None  # when the call was due, if it is late: the worker fell behind its rate
        if period:
            wait = begin + calls * period - clock()
            if wait > 0:
                time.sleep(wait / 1e9)
            else:
                due = begin + calls * period
        key = keys[calls % n]
        started = clock()
        try:
            lookup(key)
        except Exception:  # the bare client raises; ours never should, and any raise is counted as an error
            errors += 1
        done = clock()
        if calls < len(latencies):
            latencies[calls] = done - started
            responses[calls] = done - (started if due is None else due)
        calls += 1
        if done >= deadline:
            break
    if mode == "ours":
        errors += cache.errors
        cache.close()  # flushes the query log
        written, dropped = cache.logger.stats.written, cache.logger.stats.not_confirmed
    kept = min(calls, len(latencies))
    queue.put((latencies[:kept].tobytes(), calls, errors, written, dropped, responses[:kept].tobytes()))


def _phase(plan: LoadPlan, processes: int, mode: str, admin, rate: float | None = None) -> dict:
    """One phase: ``processes`` workers of ``mode`` for ``plan.seconds``; their raw results and Redis's CPU."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    start = context.Barrier(processes + 1)  # spawned interpreters import and warm up before anyone starts
    workers = [context.Process(target=_worker, args=(plan, i, mode, start, queue, rate)) for i in range(processes)]
    start_ignoring_interrupt(workers)
    try:
        start.wait(timeout=_START_TIMEOUT_S)
        cpu_before = _redis_cpu(admin)
        results = [queue.get(timeout=plan.seconds + 120) for _ in workers]
        cpu_after = _redis_cpu(admin)
    except BaseException:  # Ctrl-C or a failure: the workers' results are lost, their phase is not waited out
        for worker in workers:
            worker.terminate()
        raise
    finally:
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():  # stuck: never left waiting on at exit
                worker.terminate()
    return {"results": results, "redis_cpu_s": cpu_after - cpu_before}


def start_ignoring_interrupt(workers: list) -> None:
    """Start ``workers`` ignoring Ctrl-C (``interrupts_ignored``); ``_phase`` stops them."""
    with interrupts_ignored():
        for worker in workers:
            worker.start()


PERCENTILES = (("p50", 50), ("p99", 99), ("p999", 99.9))


def _summary(phases: list[dict], seconds: float) -> dict:
    """Requests/s and latency percentiles over ``phases`` of ``seconds`` each, as if they were one."""
    results = [result for phase in phases for result in phase["results"]]
    latencies = np.concatenate([np.frombuffer(raw, dtype=np.int64) for raw, *_ in results])
    responses = np.concatenate([np.frombuffer(r[5], dtype=np.int64) for r in results])
    calls = sum(r[1] for r in results)
    return {
        "requests_per_s": round(calls / (seconds * len(phases))),
        **{f"{name}_us": round(float(np.percentile(latencies, q)) / 1000, 1) for name, q in PERCENTILES},
        **{f"response_{name}_us": round(float(np.percentile(responses, q)) / 1000, 1) for name, q in PERCENTILES},
        "errors": sum(r[2] for r in results),
        "events_written": sum(r[3] for r in results),
        "events_dropped": sum(r[4] for r in results),
        "redis_cpu_s": round(sum(phase["redis_cpu_s"] for phase in phases) / len(phases), 2),
    }


def _abba(plan: LoadPlan, processes: int, admin, rate: float | None = None) -> tuple[dict, dict]:
    """Ours, bare, bare, ours: a drift of the machine over the four phases (another tenant's load, Redis's own
    background work after the publish) falls on both sides alike. Returns (ours, bare) summaries."""
    ours = [_phase(plan, processes, "ours", admin, rate)]
    bare = [_phase(plan, processes, "bare", admin, rate) for _ in range(2)]
    ours.append(_phase(plan, processes, "ours", admin, rate))
    return _summary(ours, plan.seconds), _summary(bare, plan.seconds)


def _redis_cpu(client) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def bench_load(
    redis_url: str,
    *,
    processes: int = 2,
    seconds: float = 10.0,
    keys: int = 100_000,
    miss_share: float = 0.05,
    rate_share: float = 0.5,
) -> dict:
    """Ours (``PredictionCache.get`` with query logging) and the bare ``HGET`` load from ``processes`` processes,
    ours-bare-bare-ours phases of ``seconds`` each, in a closed loop (capacity) and then paced at ``rate_share`` of
    the bare load's capacity (latency); one JSON-able dict with the issue's keys and the ratios to the bare load."""
    if processes < 1 or seconds <= 0 or keys < 1 or not 0 <= miss_share < 1 or not 0 < rate_share <= 1:
        raise ValueError("need processes >= 1, seconds > 0, keys >= 1, 0 <= miss_share < 1 and 0 < rate_share <= 1")
    schema = KeySchema(f"load{uuid.uuid4().hex[:8]}")
    admin = connect(redis_url, socket_timeout=30)
    rng = random.Random(0)
    items = [(f"ad{i:07d}", rng.random()) for i in range(keys)]
    publish_version(admin, "ctr", "load", items, n_keys=keys, schema=schema, ttl_s=3600)
    plan = LoadPlan(redis_url, schema.namespace, keys, seconds, miss_share, seed=0)
    try:
        ours_closed, bare_closed = _abba(plan, processes, admin)
        rate = rate_share * bare_closed["requests_per_s"] / processes  # per process, the same for both
        ours, bare = _abba(plan, processes, admin, rate)
        memory = admin.info("memory")
        stream_entries = admin.xlen(schema.query_log())
    finally:
        drop_namespace(admin, schema)
    return {
        "bench": "load",
        "processes": processes,
        "seconds": seconds,
        "keys": keys,
        "miss_share": miss_share,
        "requests_per_s": ours_closed["requests_per_s"],
        "raw_requests_per_s": bare_closed["requests_per_s"],
        "throughput_ratio": _ratio(ours_closed["requests_per_s"], bare_closed["requests_per_s"]),
        "rate_per_s": round(rate * processes),
        "rate_share": rate_share,
        "paced_requests_per_s": ours["requests_per_s"],
        "raw_paced_requests_per_s": bare["requests_per_s"],
        "rate_held": _ratio(ours["requests_per_s"], rate * processes),  # below 1: it fell behind its rate
        "raw_rate_held": _ratio(bare["requests_per_s"], rate * processes),
        **{f"response_{name}_us": ours[f"response_{name}_us"] for name, _ in PERCENTILES},
        **{f"raw_response_{name}_us": bare[f"response_{name}_us"] for name, _ in PERCENTILES},
        "response_p999_ratio": _ratio(ours["response_p999_us"], bare["response_p999_us"]),
        **{key: ours[key] for key in ("p50_us", "p99_us", "p999_us")},
        "errors": ours["errors"] + ours_closed["errors"],
        "events_written": ours["events_written"] + ours_closed["events_written"],
        "events_dropped": ours["events_dropped"] + ours_closed["events_dropped"],
        "query_log_entries": stream_entries,
        "redis_cpu_s": ours["redis_cpu_s"],
        "redis_used_memory_bytes": int(memory["used_memory"]),
        "redis_maxmemory_bytes": int(memory.get("maxmemory", 0)),
        "redis_maxmemory_policy": memory.get("maxmemory_policy", ""),
        "raw_p50_us": bare["p50_us"],
        "raw_p99_us": bare["p99_us"],
        "raw_p999_us": bare["p999_us"],
        "raw_errors": bare["errors"] + bare_closed["errors"],
        "raw_redis_cpu_s": bare["redis_cpu_s"],
        "p999_ratio": _ratio(ours["p999_us"], bare["p999_us"]),
        "saturated": {
            "p50_us": ours_closed["p50_us"],
            "p99_us": ours_closed["p99_us"],
            "p999_us": ours_closed["p999_us"],
            "raw_p50_us": bare_closed["p50_us"],
            "raw_p99_us": bare_closed["p99_us"],
            "raw_p999_us": bare_closed["p999_us"],
        },  # fmt: skip
        "goals": {"p99_us": 1000, "p999_ratio_max": 2.0, "throughput_ratio_min": 0.7},
        "redis_version": running_version(redis_url),
    }


def _ratio(ours: float, bare: float) -> float | None:
    return round(ours / bare, 3) if bare else None
