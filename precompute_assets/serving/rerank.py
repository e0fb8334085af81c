"""Re-ranking from the cache: candidates ordered by cosine similarity to a query vector, their embeddings read
from one published version in one round trip (one ``HMGET`` per bucket the candidates fall in, packed and sent
at once by ``connection.send_pipelined``, through the cache's ``_round_trip``)."""

from __future__ import annotations

import struct
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

from .cache import FAILED
from .connection import REDIS_ERRORS
from .keys import EMBEDDING_KIND, bucket_of, check_keys, key_list
from .vectors import decode_batch, decode_vector

if TYPE_CHECKING:
    from .cache import PredictionCache


def rerank(
    cache: PredictionCache,
    query_vector: np.ndarray,
    doc_ids: Iterable[str],
    *,
    kind: str = EMBEDDING_KIND,
    user: str | None = None,
    tenant: str | None = None,
) -> list[tuple[str, float | None]]:
    """``doc_ids`` as ``(doc_id, cosine)`` pairs, most similar first; candidates without an embedding in the
    current version (or when Redis is unreachable), or with one of zeros, come last with ``None``, in their given
    order. Every candidate is logged as a query of ``kind``. A query vector of another dimension than the stored
    ones, or stored vectors of different models, raise ``ValueError`` (comparing them would rank nonsense)."""
    doc_ids = key_list(doc_ids)
    check_keys(doc_ids)
    query = np.asarray(query_vector, dtype=np.float32).ravel()
    if not np.isfinite(query).all() or not query.any():
        raise ValueError("the query vector must be finite and not all zeros")
    start = time.perf_counter_ns()
    raws = _fetch(cache, kind, list(doc_ids))
    found, vectors, models = _decoded(cache, raws, [i for i, raw in enumerate(raws) if raw is not None])
    cache._log_many(kind, doc_ids, [raw is not None for raw in raws], start, user, tenant)  # as get_many logs
    if not found:
        return [(doc_id, None) for doc_id in doc_ids]
    if len(set(models.tolist())) > 1:
        raise ValueError("candidates carry embeddings of different models: re-rank within one version")
    if vectors.shape[1] != len(query):
        raise ValueError(f"query vector has {len(query)} dimensions, the stored embeddings {vectors.shape[1]}")
    norms = np.linalg.norm(vectors, axis=1) * np.linalg.norm(query)
    scores = np.divide(vectors @ query, norms, out=np.zeros(len(found), dtype=np.float32), where=norms > 0)
    # a stored vector of zeros (written before the sync refused them) has no direction: no score, not a cosine of 0
    order = [j for j in np.argsort(-scores, kind="stable").tolist() if norms[j] > 0]
    ranked: list[tuple[str, float | None]] = [(doc_ids[found[j]], float(scores[j])) for j in order]
    missing = set(range(len(doc_ids))) - {found[j] for j in order}
    return ranked + [(doc_ids[i], None) for i in sorted(missing)]


def _decoded(
    cache: PredictionCache, raws: list[bytes | None], found: list[int]
) -> tuple[list[int], np.ndarray, np.ndarray]:
    """``found`` and ``decode_batch`` of the values at ``found``. A malformed value (``decode_vector`` refuses it) is
    a miss counted in ``cache.errors``, as ``get`` counts it (its entry in ``raws`` becomes None), never a raise;
    well-formed values of different layouts still raise."""
    try:
        return found, *decode_batch([raws[i] for i in found])
    except ValueError:
        kept = []
        for i in found:
            try:
                decode_vector(raws[i])
                kept.append(i)
            except (ValueError, TypeError, struct.error):
                cache._count("errors")  # the cache's lock: threads share it
                raws[i] = None
        return kept, *decode_batch([raws[i] for i in kept])


def _fetch(cache: PredictionCache, kind: str, doc_ids: list[str]) -> list[bytes | None]:
    """The stored values of ``doc_ids`` in one version: one pipelined ``HMGET`` per bucket; all None when Redis
    fails (the cache then backs off, as its own lookups do), on a cluster those of the failing master's buckets."""
    if not doc_ids or not cache._available():
        return [None] * len(doc_ids)
    try:
        pointer = cache._pointer(kind)  # raises on Redis trouble: one failure, then the backoff
        if pointer is None:
            return [None] * len(doc_ids)
        groups: dict[int, list[int]] = {}
        for i, doc_id in enumerate(doc_ids):
            groups.setdefault(bucket_of(doc_id, pointer.buckets), []).append(i)
        commands = [
            ("HMGET", cache.schema.bucket(kind, pointer.version, bucket), *(doc_ids[i] for i in members))
            for bucket, members in groups.items()
        ]
        # On a cluster each master backs off alone (``_cluster_fetch``): a failing one's candidates are misses; on one
        # server a bucket whose HMGET fails (WRONGTYPE) makes misses of its own candidates only.
        replies = cache._cluster_fetch(commands) if cache._cluster else cache._round_trip_per_key(commands)
    except REDIS_ERRORS as error:
        cache._trip(error)
        return [None] * len(doc_ids)
    out: list[bytes | None] = [None] * len(doc_ids)
    for members, values in zip(groups.values(), replies, strict=True):
        if values is not FAILED:
            for i, value in zip(members, values, strict=True):
                out[i] = value
    return out
