"""Cache statistics for the people who run it: what each kind serves, how well, and what it costs in Redis.

``cache_stats`` reads, never writes: per kind, the current version (buckets, keys, memory of its buckets, TTL
left) and, over a window of the query log, requests, hits, the hit rate (also per published version the lookups
read: a publish inside the window shows the old and the new version side by side) and the most-missed keys. The window
is read newest first, at most ``sample`` queries (``sampled`` says when the window held more), so a busy hour
costs a bounded read. Kinds are found by their pointers (``SCAN`` for ``{ns}:1:*:current``, bounded batches).
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Sequence

import redis

from .keys import KIND_PATTERN, KeySchema, Pointer, check_kind
from .querylog import read_newest_queries

MEMORY_SAMPLE_BUCKETS = 64  # buckets whose MEMORY USAGE is read; the version's memory is extrapolated from them
# Fields MEMORY USAGE reads per bucket: every field of a bucket of the usual size (KEYS_PER_BUCKET), not all of one
# grown big (SAMPLES 0 walked the 300,000 fields of an embedding bucket for 26 ms, one command blocking the server).
MEMORY_SAMPLE_FIELDS = 128
TOP_MISSED = 10


def keys_memory(client: redis.Redis, match: str, *, batch: int = 1000) -> tuple[int, int]:
    """``(bytes, keys)``: the exact ``MEMORY USAGE`` (``SAMPLES 0``: every field) of every key matching ``match``,
    summed, on every primary of a cluster. Other clients' writes, expiries and buffers do not move it, as they move a
    difference of ``used_memory``; it leaves out what the keyspace's own tables spend per key (and an expiry entry),
    which a layout of fewer keys spends less of: a comparison with one key per value errs against the fewer keys."""
    seen: set[bytes | str] = set()  # SCAN may return a key twice (the keyspace rehashing meanwhile)
    names = (name for name in client.scan_iter(match=match, count=batch) if not (name in seen or seen.add(name)))
    total = count = 0
    while chunk := list(itertools.islice(names, batch)):
        pipe = client.pipeline(transaction=False)
        for name in chunk:
            pipe.memory_usage(name, samples=0)
        total += sum(int(n or 0) for n in pipe.execute())  # None: expired or deleted since the SCAN
        count += len(chunk)
    return total, count


def kinds_with_versions(client: redis.Redis, schema: KeySchema) -> list[str]:
    """Every kind that has a published pointer, sorted."""
    found = set()
    for name in client.scan_iter(match=f"{schema.prefix}:*:current", count=1000):
        text = name.decode() if isinstance(name, bytes) else str(name)
        found.add(text[len(schema.prefix) + 1 : -len(":current")])
    return sorted(kind for kind in found if ":" not in kind)


def version_stats(client: redis.Redis, schema: KeySchema, kind: str, *, previous: bool = False) -> dict:
    """The current version of ``kind`` (with ``previous``: the one the last flip replaced, while it lives out its
    grace): ``version``, ``buckets``, ``keys``, ``memory_bytes`` (exact up to ``MEMORY_SAMPLE_BUCKETS`` buckets of
    up to ``MEMORY_SAMPLE_FIELDS`` keys, else extrapolated: ``memory_estimated``), ``ttl_s`` (-1: no TTL; None: no
    bucket holds a key)."""
    raw = client.get(schema.previous(kind) if previous else schema.pointer(check_kind(kind)))
    if raw is None:
        return {"version": None}
    try:
        pointer = Pointer.decode(raw)
    except ValueError as error:  # one kind's bad pointer must not hide every other kind's statistics
        return {"version": None, "problem": str(error)}
    names = [schema.bucket(kind, pointer.version, index) for index in range(pointer.buckets)]
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.hlen(name)
    sizes = [int(n) for n in pipe.execute()]
    keys = sum(sizes)
    step = max(1, len(names) // MEMORY_SAMPLE_BUCKETS)
    sampled = names[::step][:MEMORY_SAMPLE_BUCKETS]
    # MEMORY USAGE of a bucket of more fields than it samples extrapolates from those: an estimate too
    fields_sampled = all(size <= MEMORY_SAMPLE_FIELDS for size in sizes[::step][:MEMORY_SAMPLE_BUCKETS])
    pipe = client.pipeline(transaction=False)
    for name in sampled:
        pipe.memory_usage(name, samples=MEMORY_SAMPLE_FIELDS)
    usage = [int(n or 0) for n in pipe.execute()]
    memory = round(sum(usage) * len(names) / len(sampled)) if sampled else 0
    return {
        "version": pointer.version,
        "buckets": pointer.buckets,
        "keys": keys,
        "memory_bytes": memory,
        "memory_estimated": len(sampled) < len(names) or not fields_sampled,
        # a bucket that exists: an empty version has none, and invalidations may have emptied bucket 0 (TTL -2)
        "ttl_s": next((int(client.ttl(name)) for name, size in zip(names, sizes, strict=True) if size), None),
    }


def window_stats(
    client: redis.Redis, schema: KeySchema, *, window_s: float, now_ms: int | None = None, sample: int = 200_000
) -> dict[str, dict]:
    """Per kind over the last ``window_s`` of the query log: ``requests``, ``hits``, ``hit_rate``,
    ``most_missed`` ([key, misses] pairs), ``versions`` (the same per version read, ``_per_version``), and
    ``sampled`` when the window held more than ``sample`` queries."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    start_ms = max(0, now_ms - int(window_s * 1000))  # a window longer than the epoch is the whole log
    by_version: dict[str, Counter[tuple[str | None, bool]]] = {}  # kind -> (version read, hit) -> lookups
    missed: dict[str, Counter[str]] = {}
    read = 0
    for _, fields in read_newest_queries(client, schema, start_ms, limit=sample + 1):
        read += 1
        if read > sample:
            break
        kind = fields.get(b"kind", b"").decode(errors="replace")
        hit = fields.get(b"hit") == b"1"
        version = fields.get(b"ver")
        version = None if version is None else version.decode(errors="replace")
        by_version.setdefault(kind, Counter())[(version, hit)] += 1
        if not hit:
            missed.setdefault(kind, Counter())[fields.get(b"key", b"").decode(errors="replace")] += 1
    sampled = read > sample
    out = {}
    for kind, counts in sorted(by_version.items()):
        versions = _per_version(counts)
        requests, hits = sum(row["requests"] for row in versions), sum(row["hits"] for row in versions)
        out[kind] = {
            "requests": requests,
            "hits": hits,
            "hit_rate": hits / requests,
            "most_missed": [[key, count] for key, count in missed.get(kind, Counter()).most_common(TOP_MISSED)],
            "versions": versions,
            "sampled": sampled,
        }
    return out


def _per_version(counts: Counter[tuple[str | None, bool]]) -> list[dict]:
    """``[{"version", "requests", "hits", "hit_rate"}]``, most requested first (version None: lookups made while the
    kind had no published version, or logged by a client that does not record it)."""
    versions = {version for version, _ in counts}
    rows = []
    for version in versions:
        hit, miss = counts[(version, True)], counts[(version, False)]
        rows.append({"version": version, "requests": hit + miss, "hits": hit, "hit_rate": hit / (hit + miss)})
    return sorted(rows, key=lambda row: (-row["requests"], row["version"] or ""))


def cache_stats(
    client: redis.Redis,
    schema: KeySchema | None = None,
    *,
    kinds: Sequence[str] | None = None,
    window_s: float = 3600,
    now_ms: int | None = None,
    sample: int = 200_000,
) -> dict:
    """``{"window_s", "kinds": {kind: {"current": version_stats, "previous": version_stats of the replaced
    version, "window": window_stats or empty}}, "without_statistics": [kinds asked for with neither a published
    version nor requests in the window], "kinds_with_statistics": [...]}``."""
    schema = schema or KeySchema()
    if window_s <= 0:
        raise ValueError(f"window must be positive, got {window_s} s")
    windows = window_stats(client, schema, window_s=window_s, now_ms=now_ms, sample=sample)
    found = set(kinds_with_versions(client, schema)) | {kind for kind in windows if KIND_PATTERN.fullmatch(kind)}
    names = [check_kind(kind) for kind in kinds] if kinds else sorted(found)
    empty = {"requests": 0, "hits": 0, "hit_rate": None, "most_missed": [], "versions": [], "sampled": False}
    return {
        "window_s": window_s,
        "kinds": {
            kind: {
                "current": version_stats(client, schema, kind),
                "previous": version_stats(client, schema, kind, previous=True),
                "window": windows.get(kind, empty),
            }
            for kind in names
        },
        "without_statistics": [kind for kind in names if kind not in found],  # a typo, or a kind not used yet
        "kinds_with_statistics": sorted(found),
    }
