"""``precompute bench admission``: what each admission policy costs a ``get_or_compute``, and what it keeps.

One JSON object. Every policy serves the same key stream (``lookups`` draws from ``keys`` keys by a Zipf law of
exponent 0.9: a few hot keys, a long tail asked for once) through its own ``PredictionCache`` (the defaults: the
query log off, XFetch and the recompute lock on) in its own Redis namespace, with a compute that costs nothing, so
the times are the client's and Redis's alone. The stream is served in blocks of 1,000 lookups, each block by every
policy in turn, so drift on a shared machine hits all alike; nothing is warmed before the first block.

Per policy (``policies``): ``hit_rate``; ``p50_us`` / ``p99_us`` over every lookup; ``hit_p50_us`` /
``hit_p99_us`` over the hits and ``miss_p50_us`` / ``miss_p99_us`` over the misses (the miss times include storing
the value, the policy's housekeeping and deleting what it evicted); ``live_keys``, the live values in Redis at the
end. ``hit_p50_ratio`` and ``miss_p50_ratio`` map each policy to its median over ``always``'s, the client's whole
read-through that admits every miss (its lookup, the recompute lock, the fenced store): what a policy adds to it.
``bare``: a naive read-through from the same stream in the same blocks, with the same connection settings and
transport (``send_pipelined``: ``GET``, and on a miss ``SET ... EX`` of the computed value), in a namespace of its
own; ``hit_p50_ratio_vs_bare`` and ``miss_p50_ratio_vs_bare`` map each policy to its median over that one's.
``probation`` gets ``capacity`` keys (default a tenth of ``keys``); the others are bounded only by the live TTL, so
their hit rates are an upper bound on what Redis's own eviction would keep within the same memory.
"""

from __future__ import annotations

import time
import uuid

import numpy as np

from ..serving import KeySchema, PredictionCache, connect
from ..serving.admission import AdmissionPolicy, FrequencySketch, Probation, SecondMiss
from ..serving.connection import send_pipelined
from ..stack import running_version
from .bench import drop_namespace
from .measure import percentile_us

BLOCK = 1000
ZIPF_EXPONENT = 0.9  # a long tail: many keys are asked for once, as on the product-page traces
REFERENCE = "always"
BARE = "bare"  # the naive read-through beside the policies


def key_stream(n_keys: int, lookups: int, seed: int, *, exponent: float = ZIPF_EXPONENT) -> list[str]:
    """``lookups`` keys drawn from ``n_keys`` keys by a Zipf law: the key of rank r with weight r^-exponent."""
    weights = np.arange(1, n_keys + 1, dtype=np.float64) ** -exponent
    ranks = np.random.default_rng(seed).choice(n_keys, size=lookups, p=weights / weights.sum())
    return [f"ad{rank:07d}" for rank in ranks.tolist()]


def bench_admission(
    redis_url: str, *, n_keys: int = 100_000, lookups: int = 50_000, capacity: int | None = None, seed: int = 0
) -> dict:
    """Latency and hit rate of ``get_or_compute`` under each admission policy (see the module docstring)."""
    capacity = max(1, n_keys // 10) if capacity is None else capacity
    policies: dict[str, AdmissionPolicy | str] = {
        REFERENCE: REFERENCE,
        "second_miss": SecondMiss(window_s=3600.0),
        "frequency": FrequencySketch(),
        "probation": Probation(capacity=capacity),
    }
    run = uuid.uuid4().hex[:8]
    schemas = {name: KeySchema(f"bench{run}{index}") for index, name in enumerate(policies)}
    caches = {
        name: PredictionCache(connect(redis_url, socket_timeout=1.0), schema=schemas[name], admission=policy)
        for name, policy in policies.items()
    }
    stream = key_stream(n_keys, lookups, seed)
    times: dict[str, dict[bool, list[int]]] = {name: {True: [], False: []} for name in [*policies, BARE]}
    clock = time.perf_counter_ns
    bare_schema = KeySchema(f"bench{run}{len(policies)}")
    bare = connect(redis_url, socket_timeout=1.0)
    live_ttl_s = next(iter(caches.values())).live_ttl_s
    try:
        for start in range(0, lookups, BLOCK):
            block = stream[start : start + BLOCK]
            for name, cache in caches.items():
                samples = times[name]
                for key in block:
                    misses = cache.misses
                    began = clock()
                    cache.get_or_compute("ctr", key, _free)
                    samples[cache.misses == misses].append(clock() - began)
            samples = times[BARE]
            for key in block:  # the naive read-through: GET, and on a miss the computed value SET with its TTL
                began = clock()
                name = bare_schema.live("ctr", key)
                hit = send_pipelined(bare, [(b"GET", name)])[0] is not None  # the cache's transport, not redis-py's
                if not hit:
                    send_pipelined(bare, [(b"SET", name, b"%f" % _free(key), b"EX", live_ttl_s)])
                samples[hit].append(clock() - began)
        admin = connect(redis_url, socket_timeout=10)
        result_policies = {}
        for name, cache in caches.items():
            hits, misses = times[name][True], times[name][False]
            live = sum(1 for _ in admin.scan_iter(f"{schemas[name].prefix}:ctr:live:*", count=5000))
            result_policies[name] = {
                "hit_rate": round(len(hits) / lookups, 4),
                "p50_us": percentile_us(hits + misses, 50),
                "p99_us": percentile_us(hits + misses, 99),
                "hit_p50_us": percentile_us(hits, 50) if hits else None,
                "hit_p99_us": percentile_us(hits, 99) if hits else None,
                "miss_p50_us": percentile_us(misses, 50) if misses else None,
                "miss_p99_us": percentile_us(misses, 99) if misses else None,
                "live_keys": live,
                "errors": cache.errors,
            }
        bare_hits, bare_misses = times[BARE][True], times[BARE][False]
        bare_result = {
            "hit_rate": round(len(bare_hits) / lookups, 4),
            "hit_p50_us": percentile_us(bare_hits, 50) if bare_hits else None,
            "miss_p50_us": percentile_us(bare_misses, 50) if bare_misses else None,
        }
    finally:
        for name, cache in caches.items():
            cache.close()
            drop_namespace(connect(redis_url, socket_timeout=10), schemas[name])
        drop_namespace(bare, bare_schema)
        bare.close()
    reference = result_policies[REFERENCE]
    return {
        "bench": "admission",
        "keys": n_keys,
        "lookups": lookups,
        "capacity": capacity,
        "reference": REFERENCE,
        "policies": result_policies,
        "hit_p50_ratio": _ratios(result_policies, reference, "hit_p50_us"),
        "miss_p50_ratio": _ratios(result_policies, reference, "miss_p50_us"),
        BARE: bare_result,
        "hit_p50_ratio_vs_bare": _ratios(result_policies, bare_result, "hit_p50_us"),
        "miss_p50_ratio_vs_bare": _ratios(result_policies, bare_result, "miss_p50_us"),
        "redis_version": running_version(redis_url),
    }


def _free(key: str) -> float:
    """A compute that costs nothing: the bench times the cache, not a model."""
    return 0.5


def _ratios(policies: dict[str, dict], reference: dict, field: str) -> dict[str, float | None]:
    base = reference[field]
    return {
        name: round(stats[field] / base, 3) if stats[field] is not None and base else None
        for name, stats in policies.items()
    }
