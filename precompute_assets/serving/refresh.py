"""Proactive refresh of live values: which keys are still being read and expire soon.

A live value (``{kind}:live:{key}``) written by a task run lives for its task type's TTL. A key that readers still
ask for should be recomputed *before* it expires, so that they never see the miss; a key nobody read lately (the
cold tail) should be left to expire. The evidence is the query-log stream (``{ns}:1:qlog``): a key is *hot* when
it had at least ``min_hits`` hits (``hit=1``) in the last ``window_s``; a hot key is *due* when its live value's
``PTTL`` is below ``fraction`` of its kind's TTL, or when its live value is gone (``PTTL -2``: it expired while read,
its refresh having failed or come too late) and the published version does not serve it (``published_keys``: its
hits came from the version). A live value without expiry (``-1``) is never due.

``read_recent_hits`` and ``live_pttls`` talk to Redis (bounded: at most ``max_queries`` logged queries, newest first;
one pipelined ``PTTL`` per key, in chunks); ``hot_keys`` and ``due_for_refresh`` are pure. ``live_refresh_sensor``
(``defs.tasks``) turns the due keys into ``precompute_tasks_job`` runs at priority 3.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

import redis

from .keys import KeySchema, Pointer, check_key, check_kind
from .querylog import read_newest_queries

DEFAULT_WINDOW_S = 600
DEFAULT_FRACTION = 0.2
DEFAULT_MAX_QUERIES = 500_000
PTTL_GONE = -2
PTTL_PERSISTENT = -1


def hot_keys(
    entries: Iterable[tuple[bytes, Mapping[bytes, bytes]]], kinds: Iterable[str], *, min_hits: int = 1
) -> Counter:
    """``(kind, key) -> hits`` over logged queries (``querylog.expand_entries``) for keys of ``kinds`` with at least
    ``min_hits`` hits. Misses do not count (a key that only missed has no live value to keep warm); malformed
    queries are skipped."""
    wanted = {kind.encode() for kind in kinds}
    counts: Counter = Counter()
    for _, fields in entries:
        kind = fields.get(b"kind")
        if kind in wanted and fields.get(b"hit") == b"1":
            key = fields.get(b"key")
            if key:
                counts[(kind, key)] += 1
    out: Counter = Counter()
    for (kind, key), hits in counts.items():
        if hits < min_hits:
            continue
        try:
            out[(kind.decode(), check_key(key.decode()))] = hits
        except (UnicodeDecodeError, ValueError):
            continue
    return out


def due_for_refresh(
    pttls: Mapping[tuple[str, str], int], ttl_s: Mapping[str, int], *, fraction: float = DEFAULT_FRACTION
) -> list[tuple[str, str]]:
    """The ``(kind, key)`` pairs whose ``PTTL`` (ms) is below ``fraction`` of their kind's TTL (``ttl_s[kind]``),
    soonest expiry first: gone ones (-2) first, since the caller passes keys read lately (a hot key whose refresh
    failed, or came too late, expired while read, and was never due again); persistent (-1) and unknown kinds are
    never due."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    due = [
        (pttl, kind, key)
        for (kind, key), pttl in pttls.items()
        if kind in ttl_s and pttl is not None and (pttl == -2 or 0 <= pttl < fraction * ttl_s[kind] * 1000)
    ]
    return [(kind, key) for _, kind, key in sorted(due)]


def read_recent_hits(
    client: redis.Redis,
    schema: KeySchema,
    kinds: Iterable[str],
    *,
    since_ms: int,
    max_queries: int = DEFAULT_MAX_QUERIES,
    min_hits: int = 1,
    page: int = 1000,
) -> tuple[Counter, int]:
    """Hot keys of ``kinds`` from the query log since ``since_ms`` (arrival time), newest queries first, reading at
    most ``max_queries`` (``page`` stream entries at a time); returns ``(hot_keys, queries_read)``."""
    kinds = [check_kind(kind) for kind in kinds]
    queries = list(read_newest_queries(client, schema, since_ms, limit=max_queries, page=page))
    return hot_keys(queries, kinds, min_hits=min_hits), len(queries)


def published_keys(client: redis.Redis, schema: KeySchema, pairs: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
    """The ``(kind, key)`` pairs the current version of their kind serves (``HEXISTS`` on the key's bucket, pipelined
    per kind)."""
    by_kind: dict[str, list[str]] = {}
    for kind, key in pairs:
        by_kind.setdefault(kind, []).append(key)
    out: set[tuple[str, str]] = set()
    for kind, keys in by_kind.items():
        raw = client.get(schema.pointer(kind))
        if raw is None:
            continue
        pointer = Pointer.decode(raw)
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.hexists(schema.bucket_for_key(kind, pointer, key), key)
        out |= {(kind, key) for key, served in zip(keys, pipe.execute(), strict=True) if served}
    return out


def live_pttls(
    client: redis.Redis, schema: KeySchema, pairs: Iterable[tuple[str, str]], *, chunk: int = 5000
) -> dict[tuple[str, str], int]:
    """``PTTL`` (ms) of the live value of each ``(kind, key)``, pipelined in chunks."""
    pairs = list(pairs)
    out: dict[tuple[str, str], int] = {}
    for start in range(0, len(pairs), chunk):
        part = pairs[start : start + chunk]
        pipe = client.pipeline(transaction=False)
        for kind, key in part:
            pipe.pttl(schema.live(kind, key))
        for pair, pttl in zip(part, pipe.execute(), strict=True):
            out[pair] = int(pttl)
    return out
