"""The offline embedding store: PostgreSQL tables of embeddings, failures and sync progress."""

from __future__ import annotations

import contextlib
import io
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import psycopg2
from psycopg2 import sql

from ..serving.vectors import DTYPE_CODES
from .documents import DocumentRow, DocumentStore, body_column
from .postgres import connect, copy_in, schema_missing, transaction

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
-- failures the next sync retries (an inference service's), found without scanning the whole table
CREATE INDEX IF NOT EXISTS embedding_failures_retry ON embedding_failures (model_version, doc_id)
    WHERE reason LIKE 'service:%';
-- embeddings of another model than the one synced (a sync of that model since), found without scanning the table
CREATE INDEX IF NOT EXISTS document_embeddings_model ON document_embeddings (model_version, doc_id);
"""
SYNC_LOCK_KEY = "hashtext('precompute.embedding_sync')"  # the advisory lock of one sync at a time (bigint key)
# The sync lock as pg_locks lists it, held by the session of a given pid: a bigint key's low 32 bits are its objid.
HOLDS_SYNC_LOCK = (
    "SELECT EXISTS (SELECT FROM pg_locks WHERE locktype = 'advisory' AND granted AND pid = %s AND objsubid = 1"
    f" AND objid = ({SYNC_LOCK_KEY}::bigint & 4294967295)::oid)"
)
SCHEMA_OBJECTS = (
    "document_embeddings",
    "embedding_failures",
    "embedding_progress",
    "embedding_failures_retry",
    "document_embeddings_model",
)
EXACT_COUNT_BELOW = 10_000  # the staleness denominator is counted exactly below this, else estimated
SAMPLE_OVERSAMPLE = 3  # TABLESAMPLE reads this many times the rows asked for, then picks among them


@dataclass(frozen=True)
class Progress:
    redis_version: str
    buckets: int
    watermark: tuple[datetime, str] | None
    complete: bool


class SyncLockLost(RuntimeError):
    """The session holding the embedding-sync lock ended while the sync ran (a server restart, a terminated
    backend, an idle-session timeout): another sync may have started, so this one stops before it commits more."""


class EmbeddingStore:
    """The offline embedding tables in the application database."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._lock_pid: int | None = None  # the backend holding the sync lock, while ``exclusive`` runs

    def connect(self) -> contextlib.AbstractContextManager[psycopg2.extensions.connection]:
        return transaction(self.url)

    def ensure_schema(self) -> None:
        with self.connect() as conn, conn.cursor() as cur:
            if schema_missing(cur, SCHEMA_OBJECTS):
                cur.execute(SCHEMA)

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the embedding-sync advisory lock: two syncs never interleave their chunks and watermarks. The lock
        lives as long as its session; the sync's writes check that it still does (``SyncLockLost``)."""
        conn = connect(self.url)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                # The session idles for the whole sync: a server's idle_session_timeout (PostgreSQL 14+, often set on
                # managed servers) would end it, and the lock with it, in every sync that outlasts the timeout.
                cur.execute(
                    "SELECT set_config('idle_session_timeout', '0', false)"
                    " WHERE current_setting('idle_session_timeout', true) IS NOT NULL"
                )
                cur.execute(f"SELECT pg_try_advisory_lock({SYNC_LOCK_KEY}), pg_backend_pid()")
                locked, pid = cur.fetchone()
                if not locked:
                    raise RuntimeError("another embedding sync is running on this database; try again later")
            self._lock_pid = pid
            yield
            # Released here, not only by closing the session: the server ends a closed session's backend, and frees
            # its locks, a moment later, and a sync started at once (the next chunked run) found the lock still held.
            with contextlib.suppress(psycopg2.Error), conn.cursor() as cur:  # a session that died holds nothing
                cur.execute(f"SELECT pg_advisory_unlock({SYNC_LOCK_KEY})")
        finally:
            self._lock_pid = None
            conn.close()  # closing the session releases the lock too, after an error or a crash

    def _check_lock(self, cur: psycopg2.extensions.cursor) -> None:
        """Inside a write's transaction: ``SyncLockLost`` if ``exclusive``'s session no longer holds the lock. Each
        write connects anew, so without this a sync went on writing chunks and watermarks after a PostgreSQL restart
        had dropped its lock, beside any sync that took the lock meanwhile."""
        if self._lock_pid is None:
            return
        cur.execute(HOLDS_SYNC_LOCK, (self._lock_pid,))
        if not cur.fetchone()[0]:
            raise SyncLockLost(
                "the embedding sync lost its lock (the PostgreSQL session holding it ended: a server restart or a"
                " terminated connection), so it stopped before committing more; the next sync resumes at the last"
                " committed chunk"
            )

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

    def newest_complete_version(self) -> str | None:
        """The Redis version the newest complete sync flipped to (of any model version), or None: no sync completed,
        or no sync ever created the table."""
        with self.connect() as conn, conn.cursor() as cur:
            cur.execute("SELECT to_regclass('embedding_progress') IS NOT NULL")
            if not cur.fetchone()[0]:
                return None
            cur.execute("SELECT redis_version FROM embedding_progress WHERE complete ORDER BY updated_at DESC LIMIT 1")
            row = cur.fetchone()
        return None if row is None else row[0]

    def start_build(self, model_version: str, redis_version: str, buckets: int) -> Progress:
        with self.connect() as conn, conn.cursor() as cur:
            self._check_lock(cur)
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
            self._check_lock(cur)
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
        watermark: tuple[datetime, str] | None,
    ) -> None:
        """Upsert a chunk's embeddings and failures, drop deleted documents, advance the watermark: atomically.

        ``watermark`` None leaves it where it is (a retry of earlier failures, behind the watermark)."""
        now = datetime.now(UTC)
        with self.connect() as conn, conn.cursor() as cur:
            self._check_lock(cur)
            # Safe without waiting for the WAL flush: a commit lost in a server crash takes its watermark
            # with it, so the next sync redoes exactly that chunk.
            cur.execute("SET LOCAL synchronous_commit = off")
            if embedded:
                cur.execute(
                    'CREATE TEMP TABLE chunk (doc_id TEXT COLLATE "C", modified_at TIMESTAMPTZ, value BYTEA)'
                    " ON COMMIT DROP"
                )
                copy_in(cur, "COPY chunk (doc_id, modified_at, value) FROM STDIN WITH (FORMAT binary)",
                        io.BytesIO(binary_copy(embedded)))  # fmt: skip
                cur.execute(
                    "INSERT INTO document_embeddings (doc_id, model_version, modified_at, embedded_at, value)"
                    " SELECT doc_id, %s, modified_at, %s, value FROM chunk"
                    " ON CONFLICT (doc_id) DO UPDATE SET model_version = EXCLUDED.model_version,"
                    " modified_at = EXCLUDED.modified_at, embedded_at = EXCLUDED.embedded_at, value = EXCLUDED.value",
                    (model_version, now),
                )
                cur.execute("DELETE FROM embedding_failures f USING chunk c WHERE f.doc_id = c.doc_id")
            if deleted:
                cur.execute("DELETE FROM document_embeddings WHERE doc_id = ANY(%s)", (deleted,))
            if failures:  # another model's embedding stays: a failed build of a new model must not cost the old one
                cur.execute(
                    "DELETE FROM document_embeddings WHERE doc_id = ANY(%s) AND model_version = %s",
                    ([doc_id for doc_id, _, _ in failures], model_version),
                )
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
            if watermark is not None:
                cur.execute(
                    "UPDATE embedding_progress SET watermark_modified_at = %s, watermark_doc_id = %s,"
                    " updated_at = now() WHERE model_version = %s",
                    (*watermark, model_version),
                )

    def retryable_failures(
        self,
        documents: DocumentStore,
        model_version: str,
        *,
        after: str = "",
        limit: int = 10_000,
        body_chars: int | None = None,
    ) -> list[DocumentRow]:
        """Up to ``limit`` documents (doc_id order, after ``after``) whose embedding by ``model_version``
        failed in the service (reason ``service:...``) and that have not changed since: the next sync
        retries them. A changed document is left to the watermark scan. Reads the partial index only.
        Bodies are cut to ``body_chars`` characters (``body_column``)."""
        return self._document_rows(
            documents,
            body_chars,
            " FROM embedding_failures f JOIN {t} d ON d.doc_id = f.doc_id"
            " WHERE f.model_version = %s AND f.reason LIKE 'service:%%' AND f.doc_id > %s"
            " AND d.modified_at = f.modified_at AND NOT d.deleted ORDER BY f.doc_id LIMIT %s",
            (model_version, after, limit),
        )

    def other_model_documents(
        self,
        documents: DocumentStore,
        model_version: str,
        *,
        after: str = "",
        limit: int = 10_000,
        body_chars: int | None = None,
    ) -> list[DocumentRow]:
        """Up to ``limit`` live documents (doc_id order, after ``after``) at or behind the sync watermark of
        ``model_version`` whose stored embedding is another model's: a sync of that model (a build killed half-way,
        say) replaced theirs since, so the version of ``model_version`` cannot be copied whole from the store, and
        they are embedded again (those past the watermark, the watermark scan embeds). Reads the
        ``(model_version, doc_id)`` index: two ranges, empty but after a switch between models."""
        return self._document_rows(
            documents,
            body_chars,
            " FROM document_embeddings e JOIN {t} d ON d.doc_id = e.doc_id"
            " JOIN embedding_progress p ON p.model_version = %s"
            " WHERE (e.model_version < %s OR e.model_version > %s) AND e.doc_id > %s AND NOT d.deleted"
            " AND (d.modified_at, d.doc_id) <= (p.watermark_modified_at, p.watermark_doc_id)"
            " AND NOT EXISTS (SELECT FROM embedding_failures f"  # one it failed on: tried, not to be tried again
            " WHERE f.doc_id = e.doc_id AND f.model_version = p.model_version)"
            " ORDER BY e.doc_id LIMIT %s",
            (model_version, model_version, model_version, after, limit),
        )

    def _document_rows(
        self, documents: DocumentStore, body_chars: int | None, rest: str, params: tuple
    ) -> list[DocumentRow]:
        """The ``DocumentRow``s (``d``) that ``rest`` selects (from ``{t}``, the documents table, on), bodies cut to
        ``body_chars`` characters (``body_column``)."""
        query = sql.SQL(
            "SELECT d.doc_id, d.title, {body}, d.language, d.indexed_at, d.modified_at, d.deleted" + rest
        ).format(t=sql.Identifier(documents.table), body=body_column(body_chars, "d"))
        with self.connect() as conn, conn.cursor() as cur:
            cur.execute(query, params)
            return list(map(DocumentRow._make, cur.fetchall()))

    def stale_share(
        self, documents: DocumentStore, model_version: str | None = None, *, max_age_hours: float = 24
    ) -> tuple[float, int, int]:
        """Share of live documents modified more than ``max_age_hours`` ago whose embedding is missing or
        older than the document: those past the sync watermark of ``model_version`` (the newest version
        synced when None). Everything at or before the watermark was embedded or recorded as a failure
        (failures are reported on their own), so only the backlog is read, by the (modified_at, doc_id)
        index: the cost follows the change, not the corpus. The denominator is counted exactly for small
        tables and estimated by the planner above ``EXACT_COUNT_BELOW`` documents."""
        t = sql.Identifier(documents.table)
        with self.connect() as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT watermark_modified_at, watermark_doc_id FROM embedding_progress"
                " WHERE model_version = %s OR %s IS NULL ORDER BY updated_at DESC LIMIT 1",
                (model_version, model_version),
            )
            row = cur.fetchone()
            watermark = (row[0], row[1]) if row and row[0] is not None else None
            cur.execute(*stale_count_query(t, watermark, max_age_hours))
            stale = cur.fetchone()[0]
            total_query = sql.SQL(
                "SELECT count(*) FROM {t} WHERE NOT deleted AND modified_at < now() - make_interval(hours => %s)"
            ).format(t=t)
            total = planner_rows(cur, total_query, (max_age_hours,))
            if total < EXACT_COUNT_BELOW:
                cur.execute(total_query, (max_age_hours,))
                total = cur.fetchone()[0]
        total = max(total, stale)
        return (stale / total if total else 0.0), stale, total

    def unembedded_count(
        self, documents: DocumentStore, model_version: str, watermark: tuple[datetime, str] | None, horizon: datetime
    ) -> int:
        """At most how many embeddings a sync of ``model_version`` adds: live documents changed past ``watermark``
        and before ``horizon`` that have none stored, and the service failures it retries. Reads the changes and the
        failures' partial index, not the corpus."""
        after = sql.SQL("(d.modified_at, d.doc_id) > (%s, %s) AND ") if watermark else sql.SQL("")
        query = sql.SQL(
            "SELECT (SELECT count(*) FROM {t} d WHERE {after}d.modified_at < %s AND NOT d.deleted AND NOT EXISTS"
            " (SELECT FROM document_embeddings e WHERE e.doc_id = d.doc_id AND e.model_version = %s)),"
            " (SELECT count(*) FROM embedding_failures WHERE model_version = %s AND reason LIKE 'service:%%')"
        ).format(t=sql.Identifier(documents.table), after=after)
        with self.connect() as conn, conn.cursor() as cur:
            cur.execute(query, (*(watermark or ()), horizon, model_version, model_version))
            changed, failed = cur.fetchone()
        return changed + failed

    def failure_count(self, model_version: str) -> int:
        """Documents whose latest embedding with ``model_version`` failed."""
        with self.connect() as conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM embedding_failures WHERE model_version = %s", (model_version,))
            return cur.fetchone()[0]

    def failures_served_elsewhere(self, model_version: str, served_model: str | None) -> int:
        """Documents ``model_version`` failed on that the version readers are on likely serves: those the embedding
        service failed on (its documents were embedded before), and, when readers are on another model's version
        (``served_model``), those that model embedded (a failure keeps another model's stored embedding). A document
        every model fails on (blank text, or text no model maps to a direction) is none of them."""
        with self.connect() as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT count(*) FROM embedding_failures f WHERE f.model_version = %s AND (f.reason LIKE 'service:%%'"
                " OR EXISTS (SELECT FROM document_embeddings e WHERE e.doc_id = f.doc_id AND e.model_version = %s"
                " AND e.model_version <> f.model_version))",
                (model_version, served_model),
            )
            return cur.fetchone()[0]

    def model_of(self, redis_version: str) -> str | None:
        """The model version whose sync built ``redis_version``, while its progress still names it."""
        with self.connect() as conn, conn.cursor() as cur:
            cur.execute("SELECT model_version FROM embedding_progress WHERE redis_version = %s", (redis_version,))
            row = cur.fetchone()
        return None if row is None else row[0]

    def stored_count(self, model_version: str, dtype: str) -> int:
        """How many embeddings of ``model_version`` the store holds when every one is in ``dtype`` (the second byte
        of a value's header, ``serving.vectors``), else 0: values of two layouts never go into one version."""
        with self.connect() as conn, conn.cursor() as cur:
            cur.execute(
                f"SELECT count(*), count(*) FILTER (WHERE {_DTYPE_BYTE} IS DISTINCT FROM %s) FROM document_embeddings"
                " WHERE model_version = %s",
                (bytes([DTYPE_CODES[dtype]]), model_version),
            )
            stored, other = cur.fetchone()
        return 0 if other else stored

    def embedded_count(self, model_version: str, *, dtype: str | None = None) -> int:
        """How many embeddings of ``model_version`` the store holds (only those in ``dtype``, when given)."""
        with self.connect() as conn, conn.cursor() as cur:
            condition, params = _in_dtype(dtype)
            cur.execute(
                f"SELECT count(*) FROM document_embeddings WHERE model_version = %s{condition}",
                (model_version, *params),
            )
            return cur.fetchone()[0]

    def iter_values(
        self, model_version: str, *, dtype: str | None = None, page: int = 50_000
    ) -> Iterator[list[tuple[str, bytes]]]:
        """Every stored (doc_id, value) of ``model_version`` (in ``dtype``, when given) in pages, by doc_id."""
        for rows in self._pages("doc_id, value", model_version, dtype, page):
            yield [(doc_id, bytes(value)) for doc_id, value in rows]

    def iter_ids(self, model_version: str, *, dtype: str | None = None, page: int = 200_000) -> Iterator[list[str]]:
        """The doc_ids of ``iter_values``, without reading the values."""
        for rows in self._pages("doc_id", model_version, dtype, page):
            yield [doc_id for (doc_id,) in rows]

    def _pages(self, columns: str, model_version: str, dtype: str | None, page: int) -> Iterator[list[tuple]]:
        """Rows of ``columns`` (doc_id first) of the stored embeddings of ``model_version`` (in ``dtype``, when given),
        in pages by doc_id (keyset over the primary key)."""
        after, (condition, params) = "", _in_dtype(dtype)
        while True:
            with self.connect() as conn, conn.cursor() as cur:
                cur.execute(
                    f"SELECT {columns} FROM document_embeddings WHERE doc_id > %s AND model_version = %s{condition}"
                    " ORDER BY doc_id LIMIT %s",
                    (after, model_version, *params, page),
                )
                rows = cur.fetchall()
            if rows:
                yield rows
            if len(rows) < page:
                return
            after = rows[-1][0]

    def move_version(self, model_version: str, redis_version: str, buckets: int) -> None:
        """Record that ``model_version`` moves to ``redis_version`` with ``buckets`` buckets, a copy not yet flipped
        to: like a build, it is not ``complete`` until ``mark_complete`` (the watermark stays)."""
        with self.connect() as conn, conn.cursor() as cur:
            self._check_lock(cur)
            cur.execute(
                "UPDATE embedding_progress SET redis_version = %s, buckets = %s, complete = false, updated_at = now()"
                " WHERE model_version = %s",
                (redis_version, buckets, model_version),
            )

    def values(self, doc_ids: list[str], model_version: str | None = None) -> dict[str, bytes]:
        """Stored embeddings of ``doc_ids`` (those that have one; of ``model_version`` only, when given)."""
        with self.connect() as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT doc_id, value FROM document_embeddings WHERE doc_id = ANY(%s)"
                " AND (%s::text IS NULL OR model_version = %s)",
                (doc_ids, model_version, model_version),
            )
            return {doc_id: bytes(value) for doc_id, value in cur.fetchall()}


def stale_count_query(
    table: sql.Composable, watermark: tuple[datetime, str] | None, max_age_hours: float
) -> tuple[sql.Composable, tuple]:
    """Live documents past ``watermark`` and older than ``max_age_hours``: a range of the
    (modified_at, doc_id) index."""
    if watermark is None:
        where, params = sql.SQL(""), ()
    else:
        where, params = sql.SQL("(modified_at, doc_id) > (%s, %s) AND "), tuple(watermark)
    query = sql.SQL(
        "SELECT count(*) FROM {t} WHERE {where}modified_at < now() - make_interval(hours => %s) AND NOT deleted"
    ).format(t=table, where=where)
    return query, (*params, max_age_hours)


def planner_rows(cur, query: sql.Composable, params: tuple) -> int:
    """The planner's estimate of the rows ``query`` returns (its top node): costs one EXPLAIN."""
    cur.execute(sql.SQL("EXPLAIN (FORMAT JSON) ") + query, params)
    plan = cur.fetchone()[0]
    if isinstance(plan, str):
        plan = json.loads(plan)
    top = plan[0]["Plan"]
    while top.get("Node Type") == "Aggregate" and top.get("Plans"):  # count(*): the rows under it
        top = top["Plans"][0]
    return int(top.get("Plan Rows", 0))


def sample_query(
    table: str, percent: float, n: int, seed: int, body_chars: int | None = None
) -> tuple[sql.Composable, tuple]:
    """A repeatable sample of live documents: ``percent`` of the table's pages (``TABLESAMPLE SYSTEM``
    reads only those), then ``n`` of their rows by a hash of doc_id: only the sampled rows are sorted.
    Bodies are cut to ``body_chars`` characters (``body_column``)."""
    query = sql.SQL(
        "SELECT doc_id, title, {body} FROM {t} TABLESAMPLE SYSTEM (%s) REPEATABLE (%s)"
        " WHERE NOT deleted ORDER BY md5(doc_id || %s) LIMIT %s"
    ).format(t=sql.Identifier(table), body=body_column(body_chars))
    return query, (percent, seed, str(seed), n)


def sample_documents(
    documents: DocumentStore, n: int, *, seed: int = 42, body_chars: int | None = None
) -> list[tuple[str, str | None, str | None]]:
    """About ``n`` random live documents (doc_id, title, body), repeatable for a seed, reading about
    ``SAMPLE_OVERSAMPLE * n`` rows whatever the size of the table (no ``ORDER BY random()`` over all of it).
    Bodies are cut to ``body_chars`` characters in the server (``body_column``): fitting and checks embed no more.

    The share of pages is computed from the planner's row estimate (``pg_class.reltuples``, or pages when
    the table was never analysed) and widened when too few rows come back; pages are sampled whole, so
    documents loaded together come together: good enough for quality checks and fitting."""
    if n <= 0:
        return []
    with transaction(documents.url) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT reltuples, relpages, pg_relation_size(oid) / current_setting('block_size')::int"
            " FROM pg_class WHERE oid = to_regclass(%s)",
            (documents.table,),
        )
        found = cur.fetchone()
        if found is None:
            return []
        reltuples, relpages, pages = found
        # never analysed (reltuples -1): assume small rows, so the first try reads at least what we need
        rows = reltuples if reltuples and reltuples > 0 else max(pages, 1) * 50
        percent = min(100.0, 100.0 * SAMPLE_OVERSAMPLE * n / max(rows, 1))
        while True:
            cur.execute(*sample_query(documents.table, percent, n, seed, body_chars))
            picked = cur.fetchall()
            if len(picked) >= n or percent >= 100.0:
                return picked
            percent = min(100.0, percent * 4)


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


# A value's dtype code: the second byte of its header (``serving.vectors``). ``substring`` reads only the first bytes
# of a value (``get_byte`` read every TOASTed value whole), and a value shorter than its header is of no dtype
# (``get_byte`` raised on it).
_DTYPE_BYTE = "substring(value from 2 for 1)"


def _in_dtype(dtype: str | None) -> tuple[str, tuple[bytes, ...]]:
    """The condition that keeps only values of ``dtype``, and its parameter; none without a dtype."""
    if dtype is None:
        return "", ()
    return f" AND {_DTYPE_BYTE} = %s", (bytes([DTYPE_CODES[dtype]]),)
