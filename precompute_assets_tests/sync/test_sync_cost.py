"""Sync work that follows the change, not the corpus: the int8-recall sample and the staleness check read a
bounded number of rows of a 50,000-document table (their EXPLAIN ANALYZE plans), and a version that outgrew
Redis' compact bucket encoding is rebuilt wider and flipped atomically."""

from __future__ import annotations

import time
import types
import zlib
from collections.abc import Sequence

import numpy as np
import pandas as pd
import pytest
import redis
from psycopg2 import sql

from precompute_assets.serving import PredictionCache, publish
from precompute_assets.serving.keys import EMBEDDING_KIND, Pointer
from precompute_assets.serving.vectors import DTYPE_CODES, encode_vector
from precompute_assets.storage.documents import DocumentStore
from precompute_assets.storage.embeddings import (
    EmbeddingStore,
    sample_documents,
    sample_query,
    stale_count_query,
)
from precompute_assets.sync import embeddings as sync_module
from precompute_assets.sync.embeddings import sync_embeddings

N_BIG = 50_000
STALE = 120  # documents past the watermark, all changed over 24 h ago


def quiet(message: str) -> None:
    pass


@pytest.fixture
def big(app_db) -> DocumentStore:
    docs = DocumentStore(app_db, table="big_documents")
    docs.ensure_schema()
    with docs._connect() as conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO big_documents (doc_id, title, body, language, modified_at)"
            " SELECT 'doc' || lpad(i::text, 8, '0'), 'title ' || i, 'some words of body ' || i, 'en',"
            " now() - interval '48 hours' - i * interval '1 second' FROM generate_series(1, %s) i",
            (N_BIG,),
        )
        cur.execute("ANALYZE big_documents")
    return docs


def plan_nodes(cur, query: sql.Composable, params: tuple) -> list[dict]:
    cur.execute(sql.SQL("EXPLAIN (ANALYZE, FORMAT JSON) ") + query, params)
    nodes, todo = [], [cur.fetchone()[0][0]["Plan"]]
    while todo:
        node = todo.pop()
        nodes.append(node)
        todo.extend(node.get("Plans", []))
    return nodes


def test_the_recall_sample_reads_a_bounded_share_of_the_table(big):
    n = 500
    with big._connect() as conn, conn.cursor() as cur:
        nodes = plan_nodes(cur, *sample_query(big.table, 100.0 * 3 * n / N_BIG, n, 42))
    types = {node["Node Type"] for node in nodes}
    assert "Seq Scan" not in types and "Sample Scan" in types, types
    scanned = sum(node["Actual Rows"] for node in nodes if node["Node Type"] == "Sample Scan")
    assert n <= scanned <= 10 * n  # ~3n rows of ~3 % of the pages, not 50,000 sorted by random()

    picked = sample_documents(big, n)
    assert len(picked) == n and len({doc_id for doc_id, _, _ in picked}) == n
    assert picked == sample_documents(big, n)  # repeatable
    assert {d for d, _, _ in picked} != {d for d, _, _ in sample_documents(big, n, seed=7)}
    assert len(sample_documents(big, N_BIG * 2)) == N_BIG  # asking for more than there is: all of it


def test_the_staleness_check_reads_only_the_backlog_past_the_watermark(big, app_db):
    store = EmbeddingStore(app_db)
    store.ensure_schema()
    store.start_build("m1", "v1", 1)
    with big._connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT modified_at, doc_id FROM big_documents ORDER BY modified_at DESC, doc_id LIMIT 1 OFFSET %s",
                    (STALE,))  # fmt: skip
        watermark = cur.fetchone()
        cur.execute(
            "INSERT INTO big_documents (doc_id, title, body, modified_at) SELECT 'new' || i, 't', 'b', now()"
            " FROM generate_series(1, 30) i"
        )  # fmt: skip  (changed within 24 h: not stale yet)
    store.commit_chunk("m1", [], [], [], watermark)

    with big._connect() as conn, conn.cursor() as cur:
        nodes = plan_nodes(cur, *stale_count_query(sql.Identifier(big.table), watermark, 24))
    assert "Seq Scan" not in {node["Node Type"] for node in nodes}
    assert sum(node["Actual Rows"] for node in nodes if "Scan" in node["Node Type"]) <= 2 * STALE + 30

    share, stale, total = store.stale_share(big, "m1", max_age_hours=24)
    assert stale == STALE
    assert abs(total - N_BIG) < N_BIG * 0.1  # the planner's estimate of the live documents over 24 h old
    assert share == pytest.approx(STALE / total)


class HashEmbedder:
    """Deterministic random unit vectors per text: fast, for tests of the sync itself."""

    version = "hash16-test"
    dim = 16

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        vectors = np.stack([np.random.default_rng(zlib.crc32(t.encode())).standard_normal(16) for t in texts])
        return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def frame(start: int, n: int, title: str = "title") -> pd.DataFrame:
    ids = range(start, start + n)
    return pd.DataFrame({"doc_id": [f"d{i:06d}" for i in ids], "title": [f"{title} {i}" for i in ids],
                         "body": [f"words {i}" for i in ids], "language": ["en"] * n})  # fmt: skip


def test_a_version_that_outgrew_its_buckets_is_rebuilt_wider_and_flipped(app_db, redis_client, schema):
    docs = DocumentStore(app_db)
    docs.ensure_schema()
    docs.load_frame(frame(0, 300))
    store, embedder = EmbeddingStore(app_db), HashEmbedder()
    first = sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=quiet)
    assert Pointer.decode(redis_client.get(schema.pointer(EMBEDDING_KIND))) == Pointer(first.redis_version, 5)

    docs.load_frame(frame(300, 500))  # 800 documents in 5 buckets: 160 a bucket, past listpack's 128
    grown = sync_embeddings(docs, store, redis_client, embedder, schema=schema, grace_s=60, log=quiet)
    assert grown.embedded == 500 and grown.rebuilt_buckets == (5, 13)
    assert grown.redis_version != first.redis_version
    assert Pointer.decode(redis_client.get(schema.pointer(EMBEDDING_KIND))) == Pointer(grown.redis_version, 13)
    assert store.progress(embedder.version).redis_version == grown.redis_version
    assert store.progress(embedder.version).buckets == 13
    old = schema.bucket(EMBEDDING_KIND, first.redis_version, 0)
    # the 500 new documents went into the wider version only: the served one was never patched past listpack's 128
    assert 0 < redis_client.hlen(old) <= 128
    assert 0 < redis_client.ttl(old) <= 60  # the old version lives out its grace
    new = [schema.bucket(EMBEDDING_KIND, grown.redis_version, b) for b in range(13)]
    assert {redis_client.object("encoding", name) for name in new} == {b"listpack"}
    assert max(redis_client.hlen(name) for name in new) <= 128
    assert all(redis_client.ttl(name) > 0 for name in new)
    cache = PredictionCache(redis_client, schema=schema, pointer_ttl_s=0)
    ids = [f"d{i:06d}" for i in range(800)]
    served = cache.get_embeddings(ids)
    assert all(v is not None for v in served)
    np.testing.assert_allclose(served[7], embedder.encode(["title 7\nwords 7"])[0], atol=0.02)  # int8

    # The next sync patches the wider version in place: no second rebuild.
    docs.load_frame(frame(5, 1, title="changed"))
    docs.delete(["d000009"])
    after = sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=quiet)
    assert (after.embedded, after.deleted, after.rebuilt_buckets) == (1, 1, None)
    assert after.redis_version == grown.redis_version
    np.testing.assert_allclose(cache.get_embedding("d000005"), embedder.encode(["changed 5\nwords 5"])[0], atol=0.02)
    assert cache.get_embedding("d000009") is None


def test_a_big_load_into_a_version_built_for_an_empty_table_never_grows_a_bucket_past_listpack(
    app_db, redis_client, schema, monkeypatch
):
    docs = DocumentStore(app_db)
    docs.ensure_schema()
    store, embedder = EmbeddingStore(app_db), HashEmbedder()
    first = sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=quiet)
    assert Pointer.decode(redis_client.get(schema.pointer(EMBEDDING_KIND))) == Pointer(first.redis_version, 1)
    fields: dict[bytes, set[bytes]] = {}  # every field any HSET wrote, per bucket
    sent = publish.send_commands

    def record(client, commands):
        for command in commands:
            if command[0] == b"HSET":
                fields.setdefault(command[1], set()).update(command[2::2])
        return sent(client, commands)

    monkeypatch.setattr(publish, "send_commands", record)
    docs.load_frame(frame(0, 2000))  # a big first load: 2000 documents for a version of one bucket
    killed = sync_embeddings(docs, store, redis_client, embedder, schema=schema, chunk_size=500, write_batch=500,
                             stop_after_chunks=1, log=quiet)  # fmt: skip
    old = schema.bucket(EMBEDDING_KIND, first.redis_version, 0)
    cache = PredictionCache(redis_client, schema=schema, pointer_ttl_s=0)
    # killed half-way: readers stay on the old version, untouched; the load went into a version of 32 buckets
    assert Pointer.decode(redis_client.get(schema.pointer(EMBEDDING_KIND))).version == first.redis_version
    assert redis_client.hlen(old) == 0 and cache.get_embedding("d000000") is None
    assert killed.rebuilt_buckets == (1, 32)

    done = sync_embeddings(docs, store, redis_client, embedder, schema=schema, chunk_size=500, log=quiet)
    assert done.redis_version == killed.redis_version and done.embedded == 1500
    assert Pointer.decode(redis_client.get(schema.pointer(EMBEDDING_KIND))) == Pointer(done.redis_version, 32)
    assert all(v is not None for v in cache.get_embeddings([f"d{i:06d}" for i in range(2000)]))
    assert redis_client.hlen(old) == 0
    assert max(map(len, fields.values())) <= 128, max(map(len, fields.values()))  # no bucket ever past listpack


def test_a_syncs_seconds_include_the_copy_into_a_wider_version(app_db, redis_client, schema, monkeypatch):
    docs = DocumentStore(app_db)
    docs.ensure_schema()
    store, embedder = EmbeddingStore(app_db), HashEmbedder()
    sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=quiet)
    docs.load_frame(frame(0, 200))
    clock = types.SimpleNamespace(time=time.time, perf_counter=lambda: ticks[0])  # a clock only the copy moves
    ticks, copy = [0.0], sync_module._copy_wider

    def slow_copy(*args):
        ticks[0] += 1000.0
        return copy(*args)

    monkeypatch.setattr(sync_module, "time", clock)
    monkeypatch.setattr(sync_module, "_copy_wider", slow_copy)
    stats = sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=quiet)
    assert stats.rebuilt_buckets == (1, 4) and stats.seconds == 1000.0


def test_a_wider_copy_that_crashes_half_way_expires(app_db, redis_client, schema, monkeypatch):
    docs = DocumentStore(app_db)
    docs.ensure_schema()
    docs.load_frame(frame(0, 300))
    store, embedder = EmbeddingStore(app_db), HashEmbedder()
    first = sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=quiet)
    docs.load_frame(frame(300, 500))
    pages = store.iter_values

    def crash_after_one_page(model_version, **options):
        yield next(pages(model_version, **options))
        raise ConnectionError("killed half-way through the copy")

    monkeypatch.setattr(store, "iter_values", crash_after_one_page)
    with pytest.raises(ConnectionError):
        sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=quiet)
    assert Pointer.decode(redis_client.get(schema.pointer(EMBEDDING_KIND))).version == first.redis_version
    versions = redis_client.scan_iter(f"{schema.prefix}:{EMBEDDING_KIND}:emb*")
    copies = [name for name in versions if first.redis_version.encode() not in name]
    assert copies and all(redis_client.ttl(name) > 0 for name in copies)  # the orphaned copy expires


def test_a_new_model_version_flips_and_the_old_versions_marker_expires_with_its_buckets(app_db, redis_client, schema):
    docs = DocumentStore(app_db)
    docs.ensure_schema()
    docs.load_frame(frame(0, 50))
    store = EmbeddingStore(app_db)
    first = sync_embeddings(docs, store, redis_client, HashEmbedder(), schema=schema, log=quiet)

    class NextModel(HashEmbedder):
        version = "hash16-test-v2"

    second = sync_embeddings(docs, store, redis_client, NextModel(), schema=schema, grace_s=60, log=quiet)
    assert second.full_build and second.redis_version != first.redis_version
    assert Pointer.decode(redis_client.get(schema.pointer(EMBEDDING_KIND))).version == second.redis_version
    for part in (0, "meta"):  # a bucket, and the marker of the version's life
        name = schema.bucket(EMBEDDING_KIND, first.redis_version, part)
        assert 0 < redis_client.ttl(name) <= 60, name  # the old version and its marker live out the same grace
    assert redis_client.ttl(schema.bucket(EMBEDDING_KIND, second.redis_version, "meta")) > 60


def test_what_a_killed_sync_wrote_and_never_committed_is_not_counted_twice(app_db, redis_client, schema):
    """The size of the version was read from Redis's fill, which held what a killed sync had written and not committed,
    and the count of documents to embed added them again: a resumed sync copied the whole version wider for nothing
    (h_faults2). The store's count is what the version holds."""
    docs = DocumentStore(app_db)
    docs.ensure_schema()
    docs.load_frame(frame(0, 300))
    store, embedder = EmbeddingStore(app_db), HashEmbedder()
    first = sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=quiet)
    docs.load_frame(frame(300, 100))  # 400 in 5 buckets: 80 a bucket, at the fill and not past it
    pointer = Pointer(first.redis_version, 5)
    uncommitted = [(f"d{i:06d}", b"\x01" * 8) for i in range(300, 400)]  # what the killed sync wrote
    publish.patch_version(redis_client, EMBEDDING_KIND, pointer, upserts=uncommitted, schema=schema)
    resumed = sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=quiet)
    assert resumed.embedded == 100 and resumed.rebuilt_buckets is None
    assert resumed.redis_version == first.redis_version
    cache = PredictionCache(redis_client, schema=schema, pointer_ttl_s=0)
    np.testing.assert_allclose(cache.get_embedding("d000350"), embedder.encode(["title 350\nwords 350"])[0], atol=0.02)


def test_an_unfinished_build_copied_wider_again_expires_at_once(app_db, redis_client, schema):
    """A build nobody reads, replaced by a wider copy, kept its whole TTL (7 days of memory) (h_faults2)."""
    docs = DocumentStore(app_db)
    docs.ensure_schema()
    store, embedder = EmbeddingStore(app_db), HashEmbedder()
    sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=quiet)
    docs.load_frame(frame(0, 2000))
    killed = sync_embeddings(docs, store, redis_client, embedder, schema=schema, chunk_size=500, write_batch=500,
                             stop_after_chunks=1, log=quiet)  # fmt: skip
    assert killed.rebuilt_buckets == (1, 32)  # an unfinished build of 32 buckets
    docs.load_frame(frame(2000, 2000))  # 4000 documents would fill it past 80 a bucket
    done = sync_embeddings(docs, store, redis_client, embedder, schema=schema, grace_s=60, log=quiet)
    assert done.redis_version != killed.redis_version and done.rebuilt_buckets == (32, 63)
    for part in (0, 31, "meta"):
        assert 0 < redis_client.ttl(schema.bucket(EMBEDDING_KIND, killed.redis_version, part)) <= 60
    assert Pointer.decode(redis_client.get(schema.pointer(EMBEDDING_KIND))) == Pointer(done.redis_version, 63)


def test_embeddings_evicted_while_a_sync_writes_are_written_back_before_it_ends(
    app_db, redis_client, schema, monkeypatch
):
    """At maxmemory, a sync patching the version readers use in place had Redis evict its buckets, whole or in part
    (one re-created by a later write of the same sync held only that write's fields), and ended in success; the next
    sync wrote back only the buckets gone whole (h_faults2). Both are written back before the sync ends, and a loss
    that stays fails it."""
    docs = DocumentStore(app_db)
    docs.ensure_schema()
    docs.load_frame(frame(0, 300))
    store, embedder = EmbeddingStore(app_db), HashEmbedder()
    first = sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=quiet)
    bucket = schema.bucket(EMBEDDING_KIND, first.redis_version, 0)
    docs.load_frame(frame(0, 10, title="changed"))
    # what happened is what Redis's count of evicted keys says (on a cluster, unknown: looked at every time)
    evicted = [0]
    monkeypatch.setattr(sync_module, "server_mark", lambda client: f"run1:{evicted[0]}")
    looked = []
    short = sync_module._short_buckets
    monkeypatch.setattr(sync_module, "_short_buckets", lambda *args: looked.append(1) or short(*args))
    assert sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=quiet).embedded == 10
    assert len(looked) == 1  # no eviction: the start's look only, a sync's cost follows the change
    docs.load_frame(frame(0, 10, title="changed again"))

    def evict_on_the_first_chunk(message: str) -> None:
        if message.startswith("chunk 1:"):  # as eviction would, while the sync writes: part of one bucket
            victims = sorted(set(redis_client.hkeys(bucket)) - {f"d{i:06d}".encode() for i in range(10)})[:7]
            redis_client.hdel(bucket, *victims)
            evicted[0] += 7

    stats = sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=evict_on_the_first_chunk)
    assert stats.embedded == 10 and stats.mended > 0
    cache = PredictionCache(redis_client, schema=schema, pointer_ttl_s=0)
    assert all(v is not None for v in cache.get_embeddings([f"d{i:06d}" for i in range(300)]))
    # part of a bucket lost between syncs: the next one writes it back
    redis_client.hdel(bucket, *sorted(redis_client.hkeys(bucket))[:5])
    lines: list[str] = []
    assert sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=lines.append).mended > 0
    assert any(line.startswith("Redis lost 5 embeddings from 1 of the 5 buckets") for line in lines), lines
    assert all(v is not None for v in cache.get_embeddings([f"d{i:06d}" for i in range(300)]))
    # evicted again as they are written back (memory still short): the sync fails, saying so
    monkeypatch.setattr(sync_module, "_mend_lost_buckets", lambda *args: 7)  # written back, and evicted again
    docs.load_frame(frame(20, 1, title="again"))
    with pytest.raises(publish.IncompleteVersionError, match="lacks 7 of its stored embeddings after this sync"):
        sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=evict_on_the_first_chunk)


def test_a_resumed_build_in_a_new_dtype_mends_nothing_from_the_old_dtypes_values(app_db, redis_client, schema):
    """The store holds the int8 values of the documents a float32 build has not reached yet: counted as lost from the
    build, they were written into it (mixed layouts, and served so when the flip came before they were embedded again:
    a rerank then raised), and the log said Redis had evicted them (h_diff16)."""
    docs = DocumentStore(app_db)
    docs.ensure_schema()
    docs.load_frame(frame(0, 300))
    store, embedder = EmbeddingStore(app_db), HashEmbedder()
    sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=quiet)
    killed = sync_embeddings(docs, store, redis_client, embedder, schema=schema, dtype="float32", chunk_size=100,
                             write_batch=100, stop_after_chunks=1, log=quiet)  # fmt: skip
    assert killed.full_build and killed.embedded == 100
    lines: list[str] = []
    resumed = sync_embeddings(docs, store, redis_client, embedder, schema=schema, dtype="float32", log=lines.append)
    assert resumed.mended == 0 and not any(line.startswith("Redis lost") for line in lines)
    assert resumed.redis_version == killed.redis_version and resumed.embedded == 200
    pointer = Pointer.decode(redis_client.get(schema.pointer(EMBEDDING_KIND)))
    values = [
        v for b in range(pointer.buckets) for v in redis_client.hvals(schema.bucket(EMBEDDING_KIND, pointer.version, b))
    ]
    assert len(values) == 300 and {value[1] for value in values} == {DTYPE_CODES["float32"]}


def synced_then_lost(app_db, redis_client, schema):
    """300 documents synced, then their Redis version lost (a flush, a restart without persistence): the documents,
    the embedding store, the embedder and the first sync's stats."""
    docs = DocumentStore(app_db)
    docs.ensure_schema()
    docs.load_frame(frame(0, 300))
    store, embedder = EmbeddingStore(app_db), HashEmbedder()
    first = sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=quiet)
    for name in redis_client.scan_iter(f"{schema.prefix}:{EMBEDDING_KIND}:*"):
        redis_client.unlink(name)
    return docs, store, embedder, first


def test_a_copy_into_a_new_version_is_whole_before_anything_reads_it(app_db, redis_client, schema, monkeypatch):
    """A restore (Redis lost the version) copies the whole corpus, the likeliest write to evict its own buckets at
    maxmemory; it was never checked, and readers were flipped to a version missing some (h_diff17). The copy holds only
    values of the version's dtype: a widening during a rebuild in a new dtype copied the old dtype's too."""
    docs, store, embedder, first = synced_then_lost(app_db, redis_client, schema)
    patch, dropped = sync_module.patch_version, []

    def evicted_as_written(client, kind, pointer, **kwargs):
        patch(client, kind, pointer, **kwargs)
        if not dropped and pointer.version != first.redis_version:  # the copy's first page: some of it evicted
            bucket = schema.bucket(EMBEDDING_KIND, pointer.version, 0)
            dropped.extend(sorted(redis_client.hkeys(bucket))[:5])
            redis_client.hdel(bucket, *dropped)

    monkeypatch.setattr(sync_module, "patch_version", evicted_as_written)
    restored = sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=quiet)
    assert restored.restored == 300 and len(dropped) == 5
    cache = PredictionCache(redis_client, schema=schema, pointer_ttl_s=0)
    assert all(v is not None for v in cache.get_embeddings([f"d{i:06d}" for i in range(300)]))
    # values of another dtype are not the version's: a float32 build half done, copied wider, holds only its own
    monkeypatch.setattr(sync_module, "patch_version", patch)
    killed = sync_embeddings(docs, store, redis_client, embedder, schema=schema, dtype="float32", chunk_size=100,
                             write_batch=100, stop_after_chunks=1, log=quiet)  # fmt: skip
    assert killed.embedded == 100
    wider = sync_module._copy_wider(store, redis_client, schema, embedder.version, "float32", 3600, 300)
    buckets = [schema.bucket(EMBEDDING_KIND, wider.version, b) for b in range(wider.buckets)]
    values = [value for bucket in buckets for value in redis_client.hvals(bucket)]
    assert len(values) == 100 and {value[1] for value in values} == {DTYPE_CODES["float32"]}


def test_a_stored_value_shorter_than_its_header_is_of_no_dtype(app_db):
    """``get_byte(value, 1)`` raised on a one-byte value (another tool's row), failing every sync (h_diff17)."""
    store = EmbeddingStore(app_db)
    store.ensure_schema()
    with store.connect() as conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO document_embeddings (doc_id, model_version, modified_at, embedded_at, value)"
            " VALUES ('a', 'm', now(), now(), %s), ('b', 'm', now(), now(), %s)",
            (b"\x01", bytes([1, DTYPE_CODES["int8"], 0, 0])),
        )
    assert store.embedded_count("m") == 2 and store.embedded_count("m", dtype="int8") == 1
    assert [ids for ids in store.iter_ids("m", dtype="int8")] == [["b"]]
    assert store.stored_count("m", "int8") == 0  # not all of this dtype: never copied as one


def test_a_copy_that_stays_short_is_refused_and_deleted(app_db, redis_client, schema, monkeypatch):
    """A restore into a Redis too small for it was refused, but each attempt's copy stayed for its 7-day TTL, and the
    message said readers stayed on their version, which Redis had lost (h_diff18)."""
    docs, store, embedder, first = synced_then_lost(app_db, redis_client, schema)
    patch = sync_module.patch_version

    def always_evicted(client, kind, pointer, **kwargs):  # every write of the copy loses a field: memory too small
        patch(client, kind, pointer, **kwargs)
        bucket = schema.bucket(EMBEDDING_KIND, pointer.version, 0)
        if pointer.version != first.redis_version and (fields := redis_client.hkeys(bucket)):
            redis_client.hdel(bucket, fields[0])

    monkeypatch.setattr(sync_module, "patch_version", always_evicted)
    with pytest.raises(publish.IncompleteVersionError, match="the copy was deleted. Readers are served the version"):
        sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=quiet)
    assert list(redis_client.scan_iter(f"{schema.prefix}:{EMBEDDING_KIND}:*")) == []  # nothing left to hold memory


def test_a_deleted_or_failed_documents_live_value_goes_with_it(app_db, redis_client, schema):
    """A reader's get_or_compute of a document loaded but not yet synced stored a live value; the sync that removed the
    document (deleted, or now failing) left it, and every lookup fell back to it until its TTL (h_corpus2)."""
    docs = DocumentStore(app_db)
    docs.ensure_schema()
    docs.load_frame(frame(0, 20))
    store, embedder = EmbeddingStore(app_db), HashEmbedder()
    sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=quiet)
    docs.load_frame(frame(20, 3))  # not synced yet: readers compute them live
    cache = PredictionCache(redis_client, schema=schema, pointer_ttl_s=0)
    for doc_id in ("d000020", "d000021", "d000022", "d000005"):
        value = encode_vector(np.ones(16), dtype="float32", model_version=embedder.version)
        cache.get_or_compute(EMBEDDING_KIND, doc_id, lambda _, value=value: value)
    assert redis_client.exists(*(schema.live(EMBEDDING_KIND, d) for d in ("d000020", "d000021", "d000022"))) == 3
    redis_client.set(schema.live(EMBEDDING_KIND, "d000005"), value, ex=3600)  # one computed before the first sync
    docs.delete(["d000020", "d000005"])
    blank = frame(21, 1).assign(title="", body="")  # now fails: no text to embed
    docs.load_frame(blank)
    stats = sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=quiet)
    assert stats.failed == 1, stats
    for doc_id in ("d000020", "d000005", "d000021"):
        assert cache.get_embedding(doc_id) is None, doc_id
        assert not redis_client.exists(schema.live(EMBEDDING_KIND, doc_id)), doc_id
    assert cache.get_embedding("d000022") is not None  # synced: the version serves it


def test_a_new_models_flip_deletes_the_live_values_computed_for_the_model_before(app_db, redis_client, schema):
    """After a refit, a lookup the new version could not answer fell back to a live value of the old model: vectors
    of two spaces in one batch, which no caller can tell apart (h_corpus2). The same model's next sync keeps them."""
    docs = DocumentStore(app_db)
    docs.ensure_schema()
    docs.load_frame(frame(0, 20))
    store, embedder = EmbeddingStore(app_db), HashEmbedder()
    old = encode_vector(np.ones(16), dtype="float32", model_version=embedder.version)
    redis_client.set(schema.live(EMBEDDING_KIND, "d000019"), old, ex=3600)  # before any version: no model to differ
    assert sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=quiet).live_values_dropped == 0
    assert redis_client.exists(schema.live(EMBEDDING_KIND, "d000019"))
    docs.load_frame(frame(20, 2))
    for doc_id in ("d000020", "d000021"):
        redis_client.set(schema.live(EMBEDDING_KIND, doc_id), old, ex=3600)
    again = sync_embeddings(docs, store, redis_client, embedder, schema=schema, log=quiet)
    assert again.live_values_dropped == 0 and redis_client.exists(schema.live(EMBEDDING_KIND, "d000020")) == 1
    docs.load_frame(frame(22, 1))
    redis_client.set(schema.live(EMBEDDING_KIND, "d000022"), old, ex=3600)  # not in any version yet
    redis_client.set(schema.live(EMBEDDING_KIND, "elsewhere"), old, ex=3600)  # no document of the table

    class NextModel(HashEmbedder):
        version = "hash16-test-v2"

    said: list[str] = []
    refit = sync_embeddings(docs, store, redis_client, NextModel(), schema=schema, log=said.append, stop_after_chunks=0)
    assert refit.live_values_dropped == 0 and redis_client.exists(schema.live(EMBEDDING_KIND, "d000022"))  # no flip
    refit = sync_embeddings(docs, store, redis_client, NextModel(), schema=schema, log=said.append)
    assert refit.full_build and refit.live_values_dropped == 4, refit  # d000019's too
    assert not any(redis_client.exists(schema.live(EMBEDDING_KIND, d)) for d in ("d000020", "d000021", "d000022"))
    assert redis_client.exists(schema.live(EMBEDDING_KIND, "elsewhere"))  # only the table's documents are known
    assert any("4 live values computed before it were deleted" in line for line in said), said


def test_a_refit_whose_sync_died_while_deleting_the_old_live_values_deletes_them_when_run_again(
    app_db, redis_client, schema, monkeypatch
):
    """The flip came first: a run killed (or failing) while deleting left the rest for their TTL, and the next run,
    finding the new model served already, deleted none (h_diff19)."""
    docs = DocumentStore(app_db)
    docs.ensure_schema()
    docs.load_frame(frame(0, 30))
    store = EmbeddingStore(app_db)
    sync_embeddings(docs, store, redis_client, HashEmbedder(), schema=schema, log=quiet)
    old = encode_vector(np.ones(16), dtype="float32", model_version=HashEmbedder.version)
    names = [schema.live(EMBEDDING_KIND, f"d{i:06d}") for i in range(30)]
    for name in names:
        redis_client.set(name, old, ex=3600)

    class NextModel(HashEmbedder):
        version = "hash16-test-v2"

    pages = docs.iter_ids
    monkeypatch.setattr(DocumentStore, "iter_ids", lambda self: pages(page=10))
    deletes, calls = sync_module.delete_live_values, []

    def dies_on_the_second_page(client, keys, **kwargs):
        calls.append(len(keys))
        if len(calls) == 2:
            raise redis.ConnectionError("the run died here")
        return deletes(client, keys, **kwargs)

    monkeypatch.setattr(sync_module, "delete_live_values", dies_on_the_second_page)
    with pytest.raises(redis.ConnectionError):
        sync_embeddings(docs, store, redis_client, NextModel(), schema=schema, log=quiet)
    assert sum(map(redis_client.exists, names)) == 20  # the first page's went
    monkeypatch.setattr(sync_module, "delete_live_values", deletes)
    again = sync_embeddings(docs, store, redis_client, NextModel(), schema=schema, log=quiet)
    assert again.live_values_dropped == 20 and sum(map(redis_client.exists, names)) == 0
    assert sync_embeddings(docs, store, redis_client, NextModel(), schema=schema, log=quiet).live_values_dropped == 0
