"""The embedding sync with the HTTP inference-service backend on real PostgreSQL + Redis, against a local
fake service that injects faults: every fault is a counted failure with its reason, retried by the next sync."""

from __future__ import annotations

import random
import time

import numpy as np
import pandas as pd

from precompute_assets.ml import embedding_service as es
from precompute_assets.ml.embedding_service import HttpEmbedder
from precompute_assets.serving import PredictionCache
from precompute_assets.storage.documents import DocumentStore
from precompute_assets.storage.embeddings import EmbeddingStore
from precompute_assets.sync.embeddings import sync_embeddings
from precompute_assets.workload.documents import generate_documents
from precompute_assets_tests.sync.fake_embedding_service import (
    FakeEmbeddingService,
    fault_by_title,
    item_fault_by_title,
    vector_of,
)

DIM = 32
FAULTS = {
    "timeout": es.TIMEOUT,
    "reset": es.CONNECTION,
    "429": "service: http 429",
    "500": "service: http 500",
    "503": "service: http 503",
    "dim": es.WRONG_DIMENSION,
    "nan": es.NON_FINITE,
    "missing": es.MISSING_ITEM,
}
RETRIED = {"timeout", "reset", "429", "500", "503"}


class RecordingSleep(list):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)
        time.sleep(min(seconds, 0.05))


def quiet(message: str) -> None:
    pass


def test_each_fault_is_a_counted_failure_that_the_next_sync_retries(app_db, redis_client, schema):
    docs = DocumentStore(app_db)
    docs.ensure_schema()
    corpus = pd.concat(generate_documents(200, seed=5))
    faulty = pd.DataFrame({
        "doc_id": [f"f-{name}" for name in FAULTS] + ["flaky-once"],
        "title": [f"fault-{name}" for name in FAULTS] + ["flaky"],
        "body": ["some words"] * (len(FAULTS) + 1),
        "language": ["en"] * (len(FAULTS) + 1),
    })  # fmt: skip
    docs.load_frame(pd.concat([corpus, faulty], ignore_index=True))
    store = EmbeddingStore(app_db)
    with FakeEmbeddingService(dim=DIM, hang_s=1.0, retry_after="0.2") as service:
        flaky_seen = []

        def plan(texts, number):
            if any(t.startswith("flaky") for t in texts) and not flaky_seen:
                flaky_seen.append(number)
                return "503"  # fails once, then succeeds within the same sync
            return fault_by_title(texts, number)

        service.plan, service.item_plan = plan, item_fault_by_title
        sleep = RecordingSleep()
        embedder = HttpEmbedder(url=service.url, model="fake", dim=DIM, batch_size=1, max_concurrency=4,
                                timeout_s=0.3, max_retries=2, backoff_s=0.01, sleep=sleep)  # fmt: skip
        first = sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=quiet)
        assert first.embedded == 201 and first.failed == len(FAULTS)
        assert first.failure_reasons == {reason: 1 for reason in FAULTS.values()}
        for name in FAULTS:  # transient faults were retried, invalid answers were not
            assert service.attempts[f"fault-{name}\nsome words"] == (3 if name in RETRIED else 1), name
        assert sum(1 for s in sleep if s >= 0.2) >= 2  # Retry-After: 0.2 was honoured on both retries of 429
        with store.connect() as conn, conn.cursor() as cur:
            cur.execute("SELECT doc_id, reason FROM embedding_failures ORDER BY doc_id")
            assert dict(cur.fetchall()) == {f"f-{name}": reason for name, reason in FAULTS.items()}
        cache = PredictionCache(redis_client, schema=schema, pointer_ttl_s=0)
        assert all(v is None for v in cache.get_embeddings([f"f-{name}" for name in FAULTS]))
        flaky = cache.get_embedding("flaky-once")
        expected = vector_of("flaky\nsome words", DIM)
        assert float(flaky @ expected / np.linalg.norm(expected)) > 0.99  # int8, but the right vector
        watermark = store.progress(embedder.version).watermark

        # Nothing changed, but the failures are retried; the service has recovered.
        service.plan, service.item_plan = (lambda texts, number: None), (lambda text: None)
        second = sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=quiet)
        assert (second.retried, second.embedded, second.failed, second.full_build) == (len(FAULTS), len(FAULTS), 0,
                                                                                      False)  # fmt: skip
        assert store.progress(embedder.version).watermark == watermark
        with store.connect() as conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM embedding_failures")
            assert cur.fetchone()[0] == 0
        assert all(v is not None for v in cache.get_embeddings([f"f-{name}" for name in FAULTS]))

        third = sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=quiet)
        assert (third.retried, third.embedded, third.failed) == (0, 0, 0)


def test_a_failure_of_a_document_that_changed_is_left_to_the_watermark_scan(app_db, redis_client, schema):
    docs = DocumentStore(app_db)
    docs.ensure_schema()
    docs.load_frame(pd.DataFrame({"doc_id": ["a", "b"], "title": ["fault-503", "fine"], "body": ["x", "y"],
                                  "language": ["en", "en"]}))  # fmt: skip
    store = EmbeddingStore(app_db)
    with FakeEmbeddingService(dim=DIM) as service:
        service.plan = fault_by_title
        embedder = HttpEmbedder(url=service.url, model="fake", dim=DIM, batch_size=1, max_retries=0)
        assert sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=quiet).failed == 1
        docs.load_frame(pd.DataFrame({"doc_id": ["a"], "title": ["fixed"], "body": ["x"], "language": ["en"]}))
        again = sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=quiet)
        assert (again.retried, again.embedded, again.failed) == (0, 1, 0)  # embedded once, by the scan
        assert service.attempts["fixed\nx"] == 1


def test_a_five_percent_flaky_service_leaves_under_a_tenth_of_a_percent_failed(app_db, redis_client, schema):
    n = 2000
    docs = DocumentStore(app_db)
    docs.ensure_schema()
    docs.load_frame(pd.concat(generate_documents(n, seed=9)))
    store = EmbeddingStore(app_db)
    rng = random.Random(7)
    with FakeEmbeddingService(dim=DIM, hang_s=0.5, retry_after="0.05") as service:
        service.plan = lambda texts, number: rng.choice(["timeout", "reset", "429", "500", "503"]) if (
            rng.random() < 0.05) else None  # fmt: skip
        embedder = HttpEmbedder(url=service.url, model="fake", dim=DIM, batch_size=8, max_concurrency=4,
                                timeout_s=0.25, max_retries=4, backoff_s=0.02)  # fmt: skip
        stats = sync_embeddings(docs, store, redis_client, embedder, schema=schema, chunk_size=500, log=quiet)
        assert sum(service.faults.values()) >= 5  # ~5 % of ~250 requests failed
        assert stats.embedded + stats.failed == n
        assert stats.failed / n < 0.001, stats.failure_reasons
        print(f"flaky service: {dict(service.faults)} injected in {service.requests} requests, {stats.failed} failed")
        cache = PredictionCache(redis_client, schema=schema)
        served = cache.get_embeddings([f"doc{i:08d}" for i in range(n)])
        assert sum(v is not None for v in served) == stats.embedded


def test_a_build_the_service_failed_waits_while_readers_keep_the_version_they_are_served(app_db, redis_client, schema):
    """A new model's build with the inference service down embedded nothing: readers stay on the old version (its
    TTL renewed), and the sync after the service is back retries the failures and flips."""
    docs = DocumentStore(app_db)
    docs.ensure_schema()
    docs.load_frame(pd.concat(generate_documents(120, seed=6)))
    ids = [f"doc{i:08d}" for i in range(120)]
    store = EmbeddingStore(app_db)
    cache = PredictionCache(redis_client, schema=schema, pointer_ttl_s=0)
    with FakeEmbeddingService(dim=DIM) as service:
        old = HttpEmbedder(url=service.url, model="old", dim=DIM, batch_size=40, max_retries=0)
        served = sync_embeddings(docs, store, redis_client, old, schema=schema, log=quiet).redis_version
        before = cache.get_embeddings(ids)
        assert all(v is not None for v in before)
        service.plan = lambda texts, number: "500"
        new = HttpEmbedder(url=service.url, model="new", dim=DIM, batch_size=40, max_retries=0)
        bucket = schema.bucket("doc_embedding", served, 0)
        redis_client.expire(bucket, 60)
        waiting = sync_embeddings(docs, store, redis_client, new, schema=schema, log=quiet)
        assert (waiting.embedded, waiting.failed, waiting.full_build) == (0, 120, True)
        assert waiting.flip_waits == "120 of its 120 documents failed to embed, which readers are served now (over 5%)"
        assert np.array_equal(np.stack(cache.get_embeddings(ids)), np.stack(before))
        assert redis_client.get(schema.pointer("doc_embedding")).decode().startswith(f"{served}:")
        assert redis_client.ttl(bucket) > 86_400
        assert store.embedded_count(old.version) == 120  # the failed build cost the old model none of its own (h_diff7)
        docs.delete([ids[7]])  # a document deleted while the build waits is not served on (h_diff7)
        still = sync_embeddings(docs, store, redis_client, new, schema=schema, log=quiet)
        assert still.deleted == 1 and still.flip_waits and cache.get_embedding(ids[7]) is None
        service.plan = lambda texts, number: None
        done = sync_embeddings(docs, store, redis_client, new, schema=schema, log=quiet)
        assert (done.retried, done.embedded, done.failed, done.flip_waits) == (119, 119, 0, None)
        ids.remove(ids[7])
        assert done.redis_version != served and all(v is not None for v in cache.get_embeddings(ids))
        assert redis_client.get(schema.pointer("doc_embedding")).decode().startswith(f"{done.redis_version}:")
