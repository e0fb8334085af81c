"""Keep document embeddings in step with the document store: offline (PostgreSQL) and online (Redis).

One sync walks the documents changed since its watermark in (modified_at, doc_id) order, chunk by chunk:
embed, quantise, write Redis, then commit the chunk's embeddings, failures and the advanced watermark in
one PostgreSQL transaction (Redis writes of consecutive chunks are grouped, up to ``REDIS_BATCH_DOCS``
documents). A crash loses at most the chunks not yet committed, which the next sync redoes (Redis writes
are idempotent), so nothing is duplicated or skipped.

The first sync of an embedding model version builds a new Redis version and flips to it at the end;
later syncs patch that version in place (new, modified and deleted documents only).
"""

from __future__ import annotations

import contextlib
import io
import struct
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np
import psycopg2
import redis

from .docstore import DocumentRow, DocumentStore
from .ml.embedder import Embedder, embed_documents
from .pg import libpq_url, transaction
from .serving.keys import EMBEDDING_KIND, KeySchema, Pointer
from .serving.publish import bucket_count, flip_pointer, patch_version, send_commands
from .serving.vectors import encode_batch

REDIS_BATCH_DOCS = 100_000  # documents whose Redis writes go out together (see _ChunkWriter)

SCHEMA = """
CREATE TABLE IF NOT EXISTS document_embeddings (
    doc_id TEXT COLLATE "C" PRIMARY KEY,
    model_version TEXT NOT NULL,
    modified_at TIMESTAMPTZ NOT NULL,   -- the document version that was embedded
    embedded_at TIMESTAMPTZ NOT NULL,
    value BYTEA NOT NULL                -- serving.vectors layout: dtype, dim, scale, model id, payload
);
CREATE TABLE IF NOT EXISTS embedding_failures (
    doc_id TEXT COLLATE "C" PRIMARY KEY,
    model_version TEXT NOT NULL,
    modified_at TIMESTAMPTZ NOT NULL,
    reason TEXT NOT NULL,
    failed_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS embedding_progress (
    model_version TEXT PRIMARY KEY,
    redis_version TEXT NOT NULL,
    buckets INTEGER NOT NULL,
    watermark_modified_at TIMESTAMPTZ,
    watermark_doc_id TEXT,
    complete BOOLEAN NOT NULL DEFAULT false,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
"""


@dataclass
class SyncStats:
    model_version: str
    redis_version: str
    full_build: bool
    embedded: int = 0
    deleted: int = 0
    failed: int = 0
    chunks: int = 0
    seconds: float = 0.0
    failure_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def docs_per_s(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    @property
    def error_rate(self) -> float:
        seen = self.embedded + self.failed
        return self.failed / seen if seen else 0.0


@dataclass(frozen=True)
class Progress:
    redis_version: str
    buckets: int
    watermark: tuple[datetime, str] | None
    complete: bool


class EmbeddingStore:
    """The offline embedding tables in the application database."""

    def __init__(self, url: str) -> None:
        self.url = url

    def connect(self) -> contextlib.AbstractContextManager[psycopg2.extensions.connection]:
        return transaction(self.url)

    def ensure_schema(self) -> None:
        with self.connect() as conn, conn.cursor() as cur:
            cur.execute(SCHEMA)

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the embedding-sync advisory lock: two syncs never interleave their chunks and watermarks."""
        conn = psycopg2.connect(libpq_url(self.url))
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT pg_try_advisory_lock(hashtext('precompute.embedding_sync'))")
                if not cur.fetchone()[0]:
                    raise RuntimeError("another embedding sync is running on this database; try again later")
            yield
        finally:
            conn.close()  # closing the session releases the lock, even after a crash

    def progress(self, model_version: str) -> Progress | None:
        with self.connect() as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT redis_version, buckets, watermark_modified_at, watermark_doc_id, complete"
                " FROM embedding_progress WHERE model_version = %s",
                (model_version,),
            )
            row = cur.fetchone()
        if row is None:
            return None
        watermark = (row[2], row[3]) if row[2] is not None else None
        return Progress(row[0], row[1], watermark, row[4])

    def start_build(self, model_version: str, redis_version: str, buckets: int) -> Progress:
        with self.connect() as conn, conn.cursor() as cur:
            cur.execute(
                "INSERT INTO embedding_progress (model_version, redis_version, buckets) VALUES (%s, %s, %s)"
                " ON CONFLICT (model_version) DO UPDATE SET redis_version = EXCLUDED.redis_version,"
                " buckets = EXCLUDED.buckets, watermark_modified_at = NULL, watermark_doc_id = NULL,"
                " complete = false, updated_at = now()",
                (model_version, redis_version, buckets),
            )
        return Progress(redis_version, buckets, None, False)

    def mark_complete(self, model_version: str) -> None:
        with self.connect() as conn, conn.cursor() as cur:
            cur.execute(
                "UPDATE embedding_progress SET complete = true, updated_at = now() WHERE model_version = %s",
                (model_version,),
            )

    def commit_chunk(
        self,
        model_version: str,
        embedded: list[tuple[str, datetime, bytes]],
        deleted: list[str],
        failures: list[tuple[str, datetime, str]],
        watermark: tuple[datetime, str],
    ) -> None:
        """Upsert a chunk's embeddings and failures, drop deleted documents, advance the watermark: atomically."""
        now = datetime.now(UTC)
        with self.connect() as conn, conn.cursor() as cur:
            # Safe without waiting for the WAL flush: a commit lost in a server crash takes its watermark
            # with it, so the next sync redoes exactly that chunk.
            cur.execute("SET LOCAL synchronous_commit = off")
            if embedded:
                cur.execute(
                    'CREATE TEMP TABLE chunk (doc_id TEXT COLLATE "C", modified_at TIMESTAMPTZ, value BYTEA)'
                    " ON COMMIT DROP"
                )
                cur.copy_expert("COPY chunk (doc_id, modified_at, value) FROM STDIN WITH (FORMAT binary)",
                                 io.BytesIO(binary_copy(embedded)))  # fmt: skip
                cur.execute(
                    "INSERT INTO document_embeddings (doc_id, model_version, modified_at, embedded_at, value)"
                    " SELECT doc_id, %s, modified_at, %s, value FROM chunk"
                    " ON CONFLICT (doc_id) DO UPDATE SET model_version = EXCLUDED.model_version,"
                    " modified_at = EXCLUDED.modified_at, embedded_at = EXCLUDED.embedded_at, value = EXCLUDED.value",
                    (model_version, now),
                )
                cur.execute("DELETE FROM embedding_failures f USING chunk c WHERE f.doc_id = c.doc_id")
            gone = deleted + [doc_id for doc_id, _, _ in failures]
            if gone:
                cur.execute("DELETE FROM document_embeddings WHERE doc_id = ANY(%s)", (gone,))
            if deleted:
                cur.execute("DELETE FROM embedding_failures WHERE doc_id = ANY(%s)", (deleted,))
            for doc_id, modified_at, reason in failures:
                cur.execute(
                    "INSERT INTO embedding_failures (doc_id, model_version, modified_at, reason, failed_at)"
                    " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (doc_id) DO UPDATE SET"
                    " model_version = EXCLUDED.model_version, modified_at = EXCLUDED.modified_at,"
                    " reason = EXCLUDED.reason, failed_at = EXCLUDED.failed_at",
                    (doc_id, model_version, modified_at, reason, now),
                )
            cur.execute(
                "UPDATE embedding_progress SET watermark_modified_at = %s, watermark_doc_id = %s, updated_at = now()"
                " WHERE model_version = %s",
                (*watermark, model_version),
            )

    def stale_share(self, documents: DocumentStore, *, max_age_hours: float = 24) -> tuple[float, int, int]:
        """Share of live documents modified more than ``max_age_hours`` ago whose embedding is missing or
        older than the document (failures excluded: they are reported on their own)."""
        query = f"""
            SELECT count(*) FILTER (WHERE e.doc_id IS NULL OR e.modified_at < d.modified_at), count(*)
            FROM {documents.table} d
            LEFT JOIN document_embeddings e ON e.doc_id = d.doc_id
            LEFT JOIN embedding_failures f ON f.doc_id = d.doc_id AND f.modified_at >= d.modified_at
            WHERE NOT d.deleted AND f.doc_id IS NULL AND d.modified_at < now() - make_interval(hours => %s)
        """
        with self.connect() as conn, conn.cursor() as cur:
            cur.execute(query, (max_age_hours,))
            stale, total = cur.fetchone()
        return (stale / total if total else 0.0), stale, total

    def values(self, doc_ids: list[str]) -> dict[str, bytes]:
        """Stored embeddings of ``doc_ids`` (those that have one)."""
        with self.connect() as conn, conn.cursor() as cur:
            cur.execute("SELECT doc_id, value FROM document_embeddings WHERE doc_id = ANY(%s)", (doc_ids,))
            return {doc_id: bytes(value) for doc_id, value in cur.fetchall()}


PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_ROW = struct.Struct("!hi")  # field count, then the first field's length


def binary_copy(rows: list[tuple[str, datetime, bytes]]) -> bytes:
    """PostgreSQL binary COPY of (text, timestamptz, bytea) rows: no hex or escaping to build or parse."""
    parts = [b"PGCOPY\n\xff\r\n\x00", struct.pack("!ii", 0, 0)]
    for doc_id, modified_at, value in rows:
        key = doc_id.encode()
        micros = (modified_at - PG_EPOCH) // timedelta(microseconds=1)
        parts += [_ROW.pack(3, len(key)), key, struct.pack("!iqi", 8, micros, len(value)), value]
    parts.append(struct.pack("!h", -1))
    return b"".join(parts)


def sync_embeddings(
    documents: DocumentStore,
    store: EmbeddingStore,
    client: redis.Redis,
    embedder: Embedder,
    *,
    schema: KeySchema | None = None,
    dtype: str = "int8",
    chunk_size: int = 10_000,
    grace_s: int = 600,
    ttl_s: int = 7 * 86400,
    log: Callable[[str], None] = print,
    write_batch: int = REDIS_BATCH_DOCS,
    stop_after_chunks: int | None = None,
) -> SyncStats:
    """Bring the embeddings of ``embedder.version`` up to date; see the module docstring.

    Each sync renews the TTL (``ttl_s``) of the version it wrote; a replaced version gets ``grace_s``.
    Redis writes of up to ``write_batch`` documents go out together, before their chunks commit.
    ``stop_after_chunks`` ends the sync early as a crash would (for tests of resumption).
    """
    schema = schema or KeySchema()
    store.ensure_schema()
    with store.exclusive():
        return _sync(documents, store, client, embedder, schema, dtype, chunk_size, grace_s, ttl_s, log,
                     write_batch, stop_after_chunks)  # fmt: skip


def _sync(
    documents, store, client, embedder, schema, dtype, chunk_size, grace_s, ttl_s, log, write_batch, stop_after_chunks
):
    """The body of ``sync_embeddings``, run under the sync lock."""
    model_version = embedder.version
    progress = store.progress(model_version)
    current = _current_pointer(client, schema)
    intact = progress is not None and bool(client.exists(_sentinel(schema, progress.redis_version)))
    if not intact or (progress.complete and (current is None or current.version != progress.redis_version)):
        # A new model version, or Redis lost (flushed, expired, evicted) the version we build or patch:
        # rebuild from scratch rather than patch a version that is no longer whole.
        n_docs = max(documents.count(), 1)
        redis_version = f"emb{int(time.time())}.{uuid.uuid4().hex[:8]}"  # never the version being read
        progress = store.start_build(model_version, redis_version, bucket_count(n_docs))
        client.set(_sentinel(schema, redis_version), b"building", ex=ttl_s)
        log(f"full build of {n_docs} documents with {model_version} into Redis version {redis_version}")
    target = Pointer(progress.redis_version, progress.buckets)
    stats = SyncStats(model_version, target.version, full_build=not progress.complete)
    horizon = documents.stable_horizon()
    started = time.perf_counter()

    def read(watermark: tuple[datetime, str] | None) -> list[DocumentRow]:
        return [row for row in documents.changed_since(watermark, limit=chunk_size) if row.modified_at < horizon]

    # Three stages overlap: the next chunk is read and the previous ones written (Redis, then the
    # PostgreSQL commits that advance the watermark) while this one is embedded. Writes stay in order.
    stopped_early = False
    chunks = _ChunkWriter(store, client, schema, target, model_version, write_batch)
    with ThreadPoolExecutor(1, "embedding-read") as reader, ThreadPoolExecutor(1, "embedding-write") as writer:
        next_rows: Future = reader.submit(read, progress.watermark)
        written: Future | None = None
        while True:
            if stop_after_chunks is not None and stats.chunks >= stop_after_chunks:
                stopped_early = True
                break
            rows = next_rows.result()
            if not rows:
                break
            last = len(rows) < chunk_size
            if not last:
                next_rows = reader.submit(read, rows[-1].watermark)
            chunk = _embed_chunk(rows, embedder, dtype, model_version)
            if written is not None:
                written.result()
            written = writer.submit(chunks.add, chunk)
            chunk.count_into(stats)
            elapsed = time.perf_counter() - started
            log(f"chunk {stats.chunks}: {stats.embedded} embedded, {stats.deleted} deleted, {stats.failed} failed"
                f" ({stats.embedded / max(elapsed, 1e-9):,.0f} docs/s)")  # fmt: skip
            if last:
                break
        if written is not None:
            written.result()
        writer.submit(chunks.flush).result()
    if not stopped_early:
        # Every sync renews the version's TTL: it outlives a stalled pipeline by ``ttl_s``, never forever.
        send_commands(client, [(b"EXPIRE", schema.bucket(EMBEDDING_KIND, target.version, b).encode(), b"%d" % ttl_s)
                               for b in range(target.buckets)])  # fmt: skip
        client.set(_sentinel(schema, target.version), b"synced", ex=ttl_s)
    if not stopped_early and stats.full_build:
        flip_pointer(client, schema, EMBEDDING_KIND, target, grace_s=grace_s)
        store.mark_complete(model_version)
    # stopped early (as a crash would): the next sync resumes at the committed watermark
    stats.seconds = time.perf_counter() - started
    return stats


def _sentinel(schema: KeySchema, version: str) -> str:
    """A key that lives exactly as long as the version's buckets: its absence means the version is gone."""
    return schema.bucket(EMBEDDING_KIND, version, "meta")


def _current_pointer(client: redis.Redis, schema: KeySchema) -> Pointer | None:
    raw = client.get(schema.pointer(EMBEDDING_KIND))
    return None if raw is None else Pointer.decode(raw)


@dataclass
class Chunk:
    """One chunk of documents, embedded and encoded, ready to write."""

    embedded: list[tuple[str, datetime, bytes]]  # doc_id, modified_at, encoded vector
    deleted: list[str]
    failures: list[tuple[str, datetime, str]]  # doc_id, modified_at, reason
    watermark: tuple[datetime, str]

    def count_into(self, stats: SyncStats) -> None:
        stats.chunks += 1
        stats.embedded += len(self.embedded)
        stats.deleted += len(self.deleted)
        stats.failed += len(self.failures)
        for _, _, reason in self.failures:
            stats.failure_reasons[reason] = stats.failure_reasons.get(reason, 0) + 1


def _embed_chunk(rows: list[DocumentRow], embedder: Embedder, dtype: str, model_version: str) -> Chunk:
    live = [row for row in rows if not row.deleted]
    result = embed_documents(embedder, [(row.title, row.body) for row in live])
    values = encode_batch(np.asarray(result.vectors, dtype=np.float32), dtype=dtype, model_version=model_version)
    return Chunk(
        embedded=[
            (live[i].doc_id, live[i].modified_at, value) for i, value in zip(result.indices, values, strict=True)
        ],
        deleted=[row.doc_id for row in rows if row.deleted],
        failures=[(live[i].doc_id, live[i].modified_at, reason) for i, reason in result.failures.items()],
        watermark=rows[-1].watermark,
    )


class _ChunkWriter:
    """Writes chunks in order: Redis first, then each chunk's PostgreSQL commit, which advances the watermark.

    Chunks are held until ``batch`` documents are pending, so that each Redis bucket gets one HSET with
    several fields rather than several with one (a version of 1M documents has ~16k buckets, so a chunk of
    10k documents touches most buckets once). A crash loses at most the held chunks: the next sync redoes
    them, and their Redis writes are idempotent.
    """

    def __init__(
        self, store: EmbeddingStore, client: redis.Redis, schema: KeySchema, target: Pointer, model_version: str,
        batch: int = REDIS_BATCH_DOCS,
    ) -> None:  # fmt: skip
        self.store, self.client, self.schema, self.target = store, client, schema, target
        self.model_version, self.batch = model_version, batch
        self._held: list[Chunk] = []
        self._docs = 0

    def add(self, chunk: Chunk) -> None:
        self._held.append(chunk)
        self._docs += len(chunk.embedded) + len(chunk.deleted) + len(chunk.failures)
        if self._docs >= self.batch:
            self.flush()

    def flush(self) -> None:
        # The last word on a document wins: its value, or its removal (deleted documents, and failed ones,
        # whose stale vector must not outlive the change that made them fail).
        final: dict[str, bytes | None] = {}
        for chunk in self._held:
            final.update((doc_id, value) for doc_id, _, value in chunk.embedded)
            final.update((doc_id, None) for doc_id in chunk.deleted)
            final.update((doc_id, None) for doc_id, _, _ in chunk.failures)
        patch_version(
            self.client,
            EMBEDDING_KIND,
            self.target,
            upserts=[(doc_id, value) for doc_id, value in final.items() if value is not None],
            deletes=[doc_id for doc_id, value in final.items() if value is None],
            schema=self.schema,
        )
        for chunk in self._held:
            self.store.commit_chunk(self.model_version, chunk.embedded, chunk.deleted, chunk.failures, chunk.watermark)
        self._held, self._docs = [], 0


def int8_recall(store: EmbeddingStore, documents: DocumentStore, embedder: Embedder, *, n: int = 2000) -> float:
    """recall@10 of the stored int8 vectors against float32 vectors re-encoded from the same documents,
    over a random sample of ``n`` documents (neighbours searched within the sample)."""
    from .ml.embedder import check_document
    from .ml.quantize import recall_at_k
    from .serving.vectors import decode_vector

    rows = documents.sample(n)
    stored = store.values([doc_id for doc_id, _, _ in rows])
    texts, approx = [], []
    for doc_id, title, body in rows:
        text, reason = check_document(title, body)
        if doc_id in stored and reason is None:
            texts.append(text)
            approx.append(decode_vector(stored[doc_id]).vector)
    if len(texts) < 20:
        return float("nan")
    return recall_at_k(embedder.encode(texts), np.stack(approx), k=10, sample=min(500, len(texts)))
