"""The offline embedding store: PostgreSQL tables of embeddings, failures and sync progress."""

from __future__ import annotations

import contextlib
import io
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import psycopg2

from .documents import DocumentStore
from .postgres import libpq_url, transaction

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
