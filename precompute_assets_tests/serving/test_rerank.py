"""Re-ranking from the cache against a real Redis: the order numpy gives, from one version, never a raise."""

from __future__ import annotations

import numpy as np
import pytest

from precompute_assets.serving import PredictionCache, QueryLogger, connect, publish_version
from precompute_assets.serving import rerank as rerank_module
from precompute_assets.serving.rerank import rerank
from precompute_assets.serving.vectors import decode_batch, decode_vector, encode_batch
from precompute_assets_tests.factories import log_client, logged_queries, run_interleaved


def publish_docs(client, schema, n: int = 500, dim: int = 32, seed: int = 0, version: str = "e1"):
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"doc{i}" for i in range(n)]
    raws = encode_batch(vectors, model_version="m1")
    publish_version(client, "doc_embedding", version, zip(ids, raws, strict=True), n_keys=n, schema=schema)
    return ids, raws


def test_candidates_come_back_in_cosine_order_with_the_missing_last(redis_url, redis_client, schema):
    ids, raws = publish_docs(redis_client, schema)
    logger = QueryLogger(log_client(redis_url), schema)
    cache = PredictionCache(connect(redis_url, socket_timeout=5), schema=schema, logger=logger)
    rng = np.random.default_rng(1)
    query = rng.normal(size=32).astype(np.float32)
    candidates = [ids[i] for i in rng.choice(len(ids), 100, replace=False)] + ["absent1", "absent2"]
    result = rerank(cache, query, candidates)
    stored = {doc_id: decode_vector(raw).vector for doc_id, raw in zip(ids, raws, strict=True)}
    expected = sorted(
        candidates[:100],
        key=lambda d: -float(stored[d] @ query / (np.linalg.norm(stored[d]) * np.linalg.norm(query))),
    )
    assert [doc_id for doc_id, _ in result[:100]] == expected
    assert result[100:] == [("absent1", None), ("absent2", None)]
    assert all(-1.0 <= score <= 1.0 for _, score in result[:100])
    assert cache.hits == 100 and cache.misses == 2
    logger.close()
    assert len(logged_queries(redis_client, schema)) == 102


def test_a_stored_vector_of_zeros_comes_last_without_a_score(redis_url, redis_client, schema):
    """A vector of zeros has no direction: scored 0, it ranked above every candidate of negative cosine (h_emb)."""
    vectors = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]], dtype=np.float32)
    raws = encode_batch(vectors, model_version="m1")
    publish_version(redis_client, "doc_embedding", "z1", zip(["a", "b", "zero"], raws, strict=True), n_keys=3,
                    schema=schema)  # fmt: skip
    cache = PredictionCache(connect(redis_url, socket_timeout=5), schema=schema)
    assert rerank(cache, np.array([-1.0, 0.0]), ["zero", "a", "b"]) == [("b", 1.0), ("a", -1.0), ("zero", None)]


def test_bad_queries_are_refused_and_redis_trouble_is_misses(redis_url, redis_client, schema):
    ids, _ = publish_docs(redis_client, schema, n=50)
    cache = PredictionCache(connect(redis_url, socket_timeout=5), schema=schema)
    with pytest.raises(ValueError, match="query vector has 16 dimensions, the stored embeddings 32"):
        rerank(cache, np.ones(16), ids[:5])
    with pytest.raises(ValueError, match="finite and not all zeros"):
        rerank(cache, np.zeros(32), ids[:5])
    with pytest.raises(ValueError, match="finite and not all zeros"):
        rerank(cache, np.full(32, np.nan), ids[:5])
    assert rerank(cache, np.ones(32), []) == []
    dead = PredictionCache(connect("redis://127.0.0.1:1/0", socket_timeout=0.05), schema=schema)
    assert rerank(dead, np.ones(32), ids[:3]) == [(doc_id, None) for doc_id in ids[:3]]


def test_a_corrupt_stored_embedding_is_a_miss_not_a_raise(redis_url, redis_client, schema):
    """A malformed value in a bucket (cut short, a foreign writer) is a miss counted in ``errors``, as ``get`` has
    it; it made every re-rank of a candidate list holding it raise ``ValueError``."""
    ids, _ = publish_docs(redis_client, schema, n=50)
    cache = PredictionCache(connect(redis_url, socket_timeout=5), schema=schema)
    pointer = cache.current_version("doc_embedding")
    for doc_id in (ids[0], ids[3]):
        redis_client.hset(schema.bucket_for_key("doc_embedding", pointer, doc_id), doc_id, b"\x01\x02")
    assert cache.get_embedding(ids[3]) is None and cache.errors == 1
    result = rerank(cache, np.ones(32), ids[:10])
    assert [doc_id for doc_id, _ in result[-2:]] == [ids[0], ids[3]] and result[-1][1] is None
    assert all(score is not None for _, score in result[:8])
    assert cache.errors == 3 and cache.hits == 8 and cache.misses == 3


def test_a_bucket_of_another_type_makes_misses_of_its_own_candidates_only(redis_url, redis_client, schema):
    """A bucket whose ``HMGET`` answers with an error (WRONGTYPE: a foreign writer) costs its own candidates, counted
    as an error: the other buckets' candidates are still ranked (the whole batch came back unranked)."""
    ids, _ = publish_docs(redis_client, schema, n=500)
    cache = PredictionCache(connect(redis_url, socket_timeout=5), schema=schema)
    pointer = cache.current_version("doc_embedding")
    broken = schema.bucket_for_key("doc_embedding", pointer, ids[0])
    redis_client.delete(broken)
    redis_client.set(broken, "not a hash")
    lost = [doc_id for doc_id in ids[:100] if schema.bucket_for_key("doc_embedding", pointer, doc_id) == broken]
    result = rerank(cache, np.ones(32), ids[:100])
    assert sorted(doc_id for doc_id, score in result if score is None) == sorted(lost)
    assert len(lost) < 100 and cache.errors == 1 and (cache.hits, cache.misses) == (100 - len(lost), len(lost))


def test_errors_counted_by_threads_reranking_at_once_are_exact(redis_url, redis_client, schema):
    """Threads sharing a cache count the corrupt embeddings they find under the cache's lock, as its lookups do."""
    ids, _ = publish_docs(redis_client, schema, n=50)
    cache = PredictionCache(connect(redis_url, socket_timeout=5), schema=schema)
    pointer = cache.current_version("doc_embedding")
    for doc_id in (ids[0], ids[3]):
        redis_client.hset(schema.bucket_for_key("doc_embedding", pointer, doc_id), doc_id, b"\x01\x02")
    n_threads, rounds = 4, 10

    def reranks() -> None:
        for _ in range(rounds):
            rerank(cache, np.ones(32), ids[:10])

    run_interleaved(reranks, n_threads, rerank_module.__file__)
    assert cache.errors == 2 * n_threads * rounds


def test_decode_batch_equals_one_at_a_time_and_refuses_mixed_layouts():
    rng = np.random.default_rng(2)
    raws = encode_batch(rng.normal(size=(20, 8)), model_version="m1")
    vectors, models = decode_batch(raws)
    assert np.array_equal(vectors, np.stack([decode_vector(raw).vector for raw in raws]))
    assert set(models.tolist()) == {decode_vector(raws[0]).model_id}
    floats = encode_batch(rng.normal(size=(1, 8)), dtype="float32", model_version="m1")
    with pytest.raises(ValueError, match="different layouts"):
        decode_batch(raws + floats)
    with pytest.raises(ValueError, match="shorter than its 12-byte header"):
        decode_batch([raws[0], b"\x01"])
