"""An embedding sync commits a chunk (advances its watermark) only once Redis's replicas hold the chunk's writes: a
failover after a commit can then not lose documents that the next sync would skip."""

from __future__ import annotations

import os
import signal

import pandas as pd
import pytest
import redis

from precompute_assets.serving import KeySchema, connect
from precompute_assets.serving.replication import ReplicationTimeoutError
from precompute_assets.storage.documents import DocumentStore
from precompute_assets.storage.embeddings import EmbeddingStore
from precompute_assets.sync.embeddings import sync_embeddings
from precompute_assets.workload.documents import generate_documents
from precompute_assets_tests.serving.test_replication import replica_of
from precompute_assets_tests.sync.test_week_of_churn import fitted


def test_a_sync_commits_no_chunk_while_a_replica_lacks_its_writes(app_db, redis_server):
    primary = redis_server()
    replica = replica_of(redis_server, primary)
    corpus = pd.concat(generate_documents(600, seed=3))
    docs, store = DocumentStore(app_db), EmbeddingStore(app_db)
    docs.ensure_schema()
    docs.load_frame(corpus)
    embedder = fitted(corpus, dim=16, seed=0)
    quiet = {"log": lambda message: None, "chunk_size": 200, "schema": KeySchema("rep")}
    assert sync_embeddings(docs, store, connect(primary.url, socket_timeout=5), embedder, **quiet).embedded == 600
    before = store.progress(embedder.version).watermark

    edited = corpus.iloc[:50].assign(title="edited")
    docs.load_frame(edited[["doc_id", "title", "body", "language"]])
    os.kill(replica.pid, signal.SIGSTOP)  # a replica that lags: a failover would lose what it lacks
    try:
        with pytest.raises(ReplicationTimeoutError, match=rf"127.0.0.1:{replica.port} behind the server"):
            sync_embeddings(docs, store, connect(primary.url, socket_timeout=5), embedder, replica_wait_s=1, **quiet)
        assert store.progress(embedder.version).watermark == before  # nothing committed: the next sync redoes it
    finally:
        os.kill(replica.pid, signal.SIGCONT)
    again = sync_embeddings(docs, store, connect(primary.url, socket_timeout=5), embedder, **quiet)
    assert again.embedded == 50 and again.failed == 0
    assert store.progress(embedder.version).watermark > before
    with redis.Redis(port=primary.port) as ours, redis.Redis(port=replica.port) as theirs:
        names = ours.keys("rep:1:doc_embedding:*")
        assert names and [theirs.dump(n) for n in names] == [ours.dump(n) for n in names]  # it holds the writes
