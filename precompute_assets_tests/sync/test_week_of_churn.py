"""A week of churn without loss: seven simulated days of adds, edits and deletes, an embedder change mid-week,
a Redis restart and a killed sync, and at the end Redis and the offline store match the documents exactly."""

from __future__ import annotations

import numpy as np
import pandas as pd
import psycopg2

from precompute_assets.ml.embedder import HashingSvdEmbedder, document_text
from precompute_assets.serving import KeySchema, Pointer, connect
from precompute_assets.serving.keys import EMBEDDING_KIND, bucket_of
from precompute_assets.serving.vectors import decode_vector, encode_vector
from precompute_assets.storage.documents import DocumentStore
from precompute_assets.storage.embeddings import EmbeddingStore
from precompute_assets.storage.postgres import libpq_url
from precompute_assets.sync.embeddings import sync_embeddings
from precompute_assets.workload.documents import generate_documents

START_DOCS = 1500
PER_DAY = {"add": 120, "edit": 150, "delete": 60}


def fitted(corpus: pd.DataFrame, *, dim: int, seed: int) -> HashingSvdEmbedder:
    texts = [document_text(t, b) for t, b in zip(corpus.title, corpus.body, strict=True)]
    return HashingSvdEmbedder.fit(texts, dim=dim, sample=1000, seed=seed)


def churn(docs: DocumentStore, live: set[str], day: int, rng: np.random.Generator, pool: pd.DataFrame) -> None:
    """One day: new documents, edits of live ones (new title and body), deletes of live ones."""
    added = pool.iloc[day * PER_DAY["add"] : (day + 1) * PER_DAY["add"]].copy()
    added["doc_id"] = [f"day{day}-{i}" for i in range(len(added))]
    edited_ids = rng.choice(sorted(live), PER_DAY["edit"], replace=False)
    edits = pd.DataFrame({"doc_id": edited_ids, "title": [f"edited on day {day}"] * len(edited_ids),
                          "body": [f"day {day} rewrite of {d}: " + "words " * (day + 3) for d in edited_ids],
                          "language": ["en"] * len(edited_ids)})  # fmt: skip
    docs.load_frame(pd.concat([added[["doc_id", "title", "body", "language"]], edits], ignore_index=True))
    live |= set(added["doc_id"])
    gone = rng.choice(sorted(live - set(edited_ids)), PER_DAY["delete"], replace=False).tolist()
    docs.delete(gone)
    live -= set(gone)


def test_a_week_of_churn_ends_with_redis_and_the_offline_store_matching_the_documents(app_db, redis_server):
    server = redis_server()
    schema = KeySchema("churn")
    corpus = pd.concat(generate_documents(START_DOCS + 7 * PER_DAY["add"], seed=11))
    start, pool = corpus.iloc[:START_DOCS], corpus.iloc[START_DOCS:]
    docs = DocumentStore(app_db)
    docs.ensure_schema()
    docs.load_frame(start)
    live = set(start["doc_id"])
    store = EmbeddingStore(app_db)
    embedder = fitted(start, dim=48, seed=0)
    rng = np.random.default_rng(5)
    quiet = {"log": lambda message: None, "chunk_size": 400, "schema": schema}
    sync_embeddings(docs, store, connect(server.url), embedder, **quiet)
    for day in range(7):
        churn(docs, live, day, rng, pool)
        if day == 3:  # mid-week: a new embedder, so a full rebuild into a new version and a flip
            embedder = fitted(start, dim=32, seed=1)
        if day == 2:  # a sync killed after one chunk, then the next one resumes it
            sync_embeddings(docs, store, connect(server.url), embedder, stop_after_chunks=1, **quiet)
        if day == 5:  # Redis restarts between two syncs (AOF: the version survives)
            server.stop()
            server.start()
        stats = sync_embeddings(docs, store, connect(server.url), embedder, **quiet)
        assert stats.failure_reasons == {}, f"day {day}: {stats.failure_reasons}"

    # The documents table, the offline store and Redis agree exactly.
    with psycopg2.connect(libpq_url(app_db)) as conn, conn.cursor() as cur:
        cur.execute("SELECT doc_id, title, body, modified_at FROM documents WHERE NOT deleted")
        documents = {row[0]: row[1:] for row in cur.fetchall()}
        cur.execute("SELECT doc_id, model_version, modified_at, value FROM document_embeddings")
        offline = {row[0]: row[1:] for row in cur.fetchall()}
    assert set(documents) == live
    assert set(offline) == live, "the offline store has missing or extra documents"
    assert {version for version, _, _ in offline.values()} == {embedder.version}
    stale = [d for d, (_, modified_at, _) in offline.items() if modified_at != documents[d][2]]
    assert stale == []  # every embedding is of the document's latest text
    client = connect(server.url)
    pointer = Pointer.decode(client.get(schema.pointer(EMBEDDING_KIND)))
    buckets = [schema.bucket(EMBEDDING_KIND, pointer.version, b) for b in range(pointer.buckets)]
    in_redis = {field.decode(): value for name in buckets for field, value in client.hgetall(name).items()}
    assert set(in_redis) == live, "Redis has missing or extra documents"
    assert all(in_redis[d] == bytes(offline[d][2]) for d in live)
    # ... and each value is the embedding of the current text by the current model, in its own bucket.
    sample = sorted(live)[::25]
    for doc_id in sample:
        title, body, _ = documents[doc_id]
        expected = encode_vector(embedder.encode([document_text(title, body)])[0], model_version=embedder.version)
        assert np.allclose(decode_vector(in_redis[doc_id]).vector, decode_vector(expected).vector, atol=1e-6)
        assert client.hexists(schema.bucket(EMBEDDING_KIND, pointer.version, bucket_of(doc_id, pointer.buckets)),
                              doc_id)  # fmt: skip
