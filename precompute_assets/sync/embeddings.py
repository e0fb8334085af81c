"""Keep document embeddings in step with the document store: offline (PostgreSQL) and online (Redis).

One sync walks the documents changed since its watermark in (modified_at, doc_id) order, chunk by chunk:
embed, quantise, write Redis, then commit the chunk's embeddings, failures and the advanced watermark in
one PostgreSQL transaction (Redis writes of consecutive chunks are grouped, up to ``REDIS_BATCH_DOCS``
documents). A crash loses at most the chunks not yet committed, which the next sync redoes (Redis writes
are idempotent), so nothing is duplicated or skipped. Chunks commit only once Redis's replicas hold their writes
(``replication.confirm_replicas``), so a failover cannot lose documents the watermark has passed.

The first sync of an embedding model version builds a new Redis version and flips to it at the end;
later syncs patch that version in place (new, modified and deleted documents only). While readers are served a
version whole, a build is not flipped to when documents an open transaction held back would be missing from it, or
when more than ``max_error_rate`` of its documents failed where the version served likely has them (a service
down, whose failures the next sync retries; a model that maps text to zeros, where the last one did not): readers keep
their version (its TTL renewed, documents deleted meanwhile taken out of it too), and the next sync goes on with the
build (``SyncStats.flip_waits``).

Documents an inference service failed to embed (reason ``service: ...``, see ``ml.embedding_service``) are
retried at the start of the next sync, before the watermark scan, without moving the watermark; so are documents
behind the watermark whose stored embedding (one per document) a sync of another model replaced since, a build
killed half-way before going back to the earlier model, say: else a copy of the version from the store lacks them.

A version patched in place grows with the corpus; no bucket should hold more than ``max_bucket_fill`` keys on
average (past that, hashing puts some buckets over the 128 entries of Redis' compact listpack encoding). Before it
writes, a sync counts the embeddings it may add (``EmbeddingStore.unembedded_count``); when they would take the
version past that fill, it first copies the stored embeddings into a new version with ``bucket_count(n)`` buckets,
writes the changes there, and flips the pointer to it atomically at the end, like a build: readers stay on the old
version, unchanged, until then. So a big load into a version built for a small corpus never grows its buckets to
hundreds of thousands of fields. Nothing is re-embedded, also when the sync is killed on the way (the copy is
resumed like a build). A version found past the fill after a sync (one the count missed) is copied and flipped the
same way then (``_rebuild_wider``).
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import redis

from ..ml.embedder import MAX_CHARS, Embedder, embed_documents
from ..serving.events import server_mark
from ..serving.keys import EMBEDDING_KIND, KeySchema, Pointer, bucket_ids, check_key, check_keys
from ..serving.publish import (
    KEYS_PER_BUCKET,
    IncompleteVersionError,
    bucket_count,
    delete_live_values,
    flip_pointer,
    memory_note,
    patch_version,
    record_published,
    run_commands,
    send_commands,
)
from ..serving.replication import REPLICA_WAIT_S, confirm_replicas
from ..serving.vectors import DTYPE_CODES, encode_batch
from ..storage.documents import DocumentRow, DocumentStore
from ..storage.embeddings import EmbeddingStore

REDIS_BATCH_DOCS = 100_000  # documents whose Redis writes go out together (see _ChunkWriter)
MAX_BUCKET_FILL = 1.25 * KEYS_PER_BUCKET  # mean keys per bucket past which a version is rebuilt wider
MAX_BUILD_ERROR_RATE = 0.05  # the share of a build's documents that may fail for readers to move to it
FILL_SAMPLE_BUCKETS = 64  # buckets whose HLEN estimates the mean fill
INVALID_ID = "invalid doc_id"  # a failure: the id cannot be a key of the serving cache (serving.keys.check_key)


@dataclass
class SyncStats:
    model_version: str
    redis_version: str
    full_build: bool
    embedded: int = 0
    deleted: int = 0
    failed: int = 0
    chunks: int = 0
    # earlier service failures tried again, and documents behind the watermark whose stored embedding a sync of
    # another model replaced (counted in embedded or failed as well)
    retried: int = 0
    rebuilt_buckets: tuple[int, int] | None = None  # (old, new) when the version was widened
    held_back: int = 0  # documents changed after the oldest open transaction began: left for a later sync
    held_back_by: str | None = None  # that transaction's session, when documents were held back
    # why a build was not flipped to (readers stay on the version they have; the next sync goes on with it), or None
    flip_waits: str | None = None
    served_version: str | None = None  # while a build waits (``flip_waits``): the version readers stay on
    live_values_dropped: int = 0  # readers' live values deleted when the flip brought another model's embeddings
    mended: int = 0  # stored embeddings written back into buckets Redis lost (evicted, expired) under the marker
    restored: int = 0  # stored embeddings copied into a new version after Redis lost the version whole (none embedded)
    seconds: float = 0.0
    failure_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def docs_per_s(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    @property
    def error_rate(self) -> float:
        seen = self.embedded + self.failed
        return self.failed / seen if seen else 0.0


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
    max_bucket_fill: float = MAX_BUCKET_FILL,
    replica_wait_s: float = REPLICA_WAIT_S,
    max_error_rate: float = MAX_BUILD_ERROR_RATE,
) -> SyncStats:
    """Bring the embeddings of ``embedder.version`` up to date; see the module docstring.

    Each sync renews the TTL (``ttl_s``) of the version it wrote; a replaced version gets ``grace_s``.
    Redis writes of up to ``write_batch`` documents go out together, before their chunks commit.
    ``stop_after_chunks`` ends the sync early as a crash would (for tests of resumption).
    ``max_bucket_fill``: the mean keys per bucket past which the version is rebuilt with more buckets.
    ``replica_wait_s``: how long a flip waits for replicas to hold the version (``flip_pointer``).
    ``max_error_rate``: the share of a build's documents that may have failed to embed for readers to move to it
    from a version they are served whole (``SyncStats.flip_waits`` says why they did not).
    """
    if dtype not in DTYPE_CODES:  # before the version's dtype is compared: a typo must not start a rebuild
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPE_CODES)}")
    schema = schema or KeySchema()
    store.ensure_schema()
    with store.exclusive():
        return _sync(documents, store, client, embedder, schema, dtype, chunk_size, grace_s, ttl_s, log,
                     write_batch, stop_after_chunks, max_bucket_fill, replica_wait_s, max_error_rate)  # fmt: skip


def _sync(
    documents, store, client, embedder, schema, dtype, chunk_size, grace_s, ttl_s, log, write_batch, stop_after_chunks,
    max_bucket_fill, replica_wait_s, max_error_rate,
):  # fmt: skip
    """The body of ``sync_embeddings``, run under the sync lock."""
    model_version = embedder.version
    progress = store.progress(model_version)
    current = _current_pointer(client, schema)
    served_model = None if current is None else store.model_of(current.version)  # before a build renames this one's
    marker = None if progress is None else client.get(_sentinel(schema, progress.redis_version))
    # a version written in another dtype (the config changed) is rebuilt too: one version never mixes layouts
    intact = marker is not None and marker.split()[1:] in ([], [dtype.encode()])
    restored = 0
    mark = server_mark(client)  # before this sync writes: evictions, a restart or a failover change it (None: unknown)
    if progress is not None and marker is None and (restored := store.stored_count(model_version, dtype)):
        # Redis lost (flushed, restarted without persistence, evicted) the version of a model whose embeddings the
        # offline store holds, all in this dtype: copied into a new version, nothing embedded again (a full rebuild
        # paid an embedding service for the whole corpus again, and took hours with a large model); the sync then
        # goes on from its watermark and flips.
        log(f"Redis lost embedding version {progress.redis_version}: restoring its {restored} stored embeddings")
        _copy_wider(store, client, schema, model_version, dtype, ttl_s, max(documents.count(), 1))
        progress = store.progress(model_version)
    elif not intact or (progress.complete and (current is None or current.version != progress.redis_version)):
        # A new model version or dtype, or Redis lost the version of a build whose stored embeddings are not all of
        # this dtype: rebuild from scratch rather than patch a version that is no longer whole.
        n_docs = max(documents.count(), 1)
        redis_version = f"emb{int(time.time())}.{uuid.uuid4().hex[:8]}"  # never the version being read
        progress = store.start_build(model_version, redis_version, bucket_count(n_docs))
        client.set(_sentinel(schema, redis_version), f"building {dtype}", ex=ttl_s)
        log(f"full build of {n_docs} documents with {model_version} into Redis version {redis_version}")
    target = Pointer(progress.redis_version, progress.buckets)
    stats = SyncStats(model_version, target.version, full_build=not progress.complete, restored=restored)
    if not restored and (progress.complete or progress.watermark is not None):  # Redis may have lost some values
        stats.mended = _mend_lost_buckets(store, client, schema, model_version, target, dtype, ttl_s, log)
    horizon = documents.stable_horizon()
    started = time.perf_counter()  # before the copy below: a sync's seconds include it, as they did at the end
    # Widen before writing, not after: a big load patched into a version sized for a small (or empty) corpus grew
    # one bucket to hundreds of thousands of fields until the end of the sync (a huge key to free, expire, replicate).
    # The version's size is what the store holds: Redis's fill also counts what a killed sync wrote and never
    # committed, which this sync writes again (counted twice, it copied a resumed build wider for nothing).
    held = store.embedded_count(model_version)
    expected = held + store.unembedded_count(documents, model_version, progress.watermark, horizon)
    if expected > max_bucket_fill * target.buckets:
        log(f"{expected} documents would fill Redis version {target.version} past {max_bucket_fill:.0f} keys per "
            "bucket: copying it wider first")  # fmt: skip
        wider = _copy_wider(store, client, schema, model_version, dtype, ttl_s, expected)
        if current is None or current.version != target.version:  # a build nobody reads, replaced: it goes now
            send_commands(
                client, [(b"EXPIRE", name.encode(), b"%d" % grace_s) for name in _version_keys(schema, target)]
            )
        stats.rebuilt_buckets, stats.redis_version = (target.buckets, wider.buckets), wider.version
        target, progress = wider, store.progress(model_version)
    body_chars = getattr(embedder, "max_chars", MAX_CHARS)  # all of a body that is embedded: read no more

    def read(watermark: tuple[datetime, str] | None) -> list[DocumentRow]:
        rows = documents.changed_since(watermark, limit=chunk_size, body_chars=body_chars)
        return [row for row in rows if row.modified_at < horizon]

    def behind_pages(find: Callable[..., list[DocumentRow]]) -> Iterator[list[DocumentRow]]:
        """Documents behind the watermark that ``find`` names, a page at a time (a fresh build embeds everything
        anyway)."""
        after = ""
        while progress.watermark is not None:
            page = find(documents, model_version, after=after, limit=chunk_size, body_chars=body_chars)
            if page:
                yield page
            if len(page) < chunk_size:
                return
            after = page[-1].doc_id

    def retry_pages() -> Iterator[tuple[list[DocumentRow], str]]:
        """Earlier service failures, then documents whose stored embedding another model's sync replaced."""
        for page in behind_pages(store.retryable_failures):
            yield page, f"retrying {len(page)} documents the embedding service failed on before"
        for page in behind_pages(store.other_model_documents):
            yield page, f"embedding again {len(page)} documents whose stored embedding a sync of another model replaced"

    # Three stages overlap: the next chunk is read and the previous ones written (Redis, then the
    # PostgreSQL commits that advance the watermark) while this one is embedded. Writes stay in order.
    stopped_early = False
    # a build's deletes reach the version readers are on too: a deleted document is never served while a build waits
    served = current if _served_whole(client, schema, current, target) else None
    chunks = _ChunkWriter(store, client, schema, target, model_version, write_batch, replica_wait_s, ttl_s, served)
    with ThreadPoolExecutor(1, "embedding-read") as reader, ThreadPoolExecutor(1, "embedding-write") as writer:
        next_rows: Future = reader.submit(read, progress.watermark)
        written: Future | None = None
        # Earlier service failures first, in doc_id pages; their chunks leave the watermark where it is,
        # and the scan after them finds the documents changed meanwhile.
        for page, why in retry_pages():
            if stop_after_chunks is not None and stats.chunks >= stop_after_chunks:
                break
            log(why)
            chunk = _embed_chunk(page, embedder, dtype, model_version)
            chunk.watermark = None  # behind the watermark: leave it where it is
            if written is not None:
                written.result()
            written = writer.submit(chunks.add, chunk)
            chunk.count_into(stats)
            stats.retried += len(page)
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
            # committed: what a killed sync keeps (chunks commit once their Redis writes of up to write_batch went out)
            log(f"chunk {stats.chunks}: {stats.embedded} embedded, {stats.deleted} deleted, {stats.failed} failed, "
                f"{chunks.committed} committed ({stats.embedded / max(elapsed, 1e-9):,.0f} docs/s)")  # fmt: skip
            if last:
                break
        if written is not None:
            written.result()
        writer.submit(chunks.flush).result()
        if stats.chunks:  # the chunk lines count commits as they land: the last ones land here
            log(f"{chunks.committed} documents committed in {stats.chunks} chunks")
    if not stopped_early:
        # Every sync renews the version's TTL: it outlives a stalled pipeline by ``ttl_s``, never forever.
        send_commands(client, [(b"EXPIRE", schema.bucket(EMBEDDING_KIND, target.version, b).encode(), b"%d" % ttl_s)
                               for b in range(target.buckets)])  # fmt: skip
        client.set(_sentinel(schema, target.version), f"synced {dtype}", ex=ttl_s)
        # At maxmemory a volatile policy evicts buckets of the version this sync wrote into, readers' own when it
        # patches in place, without an error: written back from the store now, and the run fails if they cannot be.
        # Looked for only when Redis evicted keys meanwhile (or cannot say): a sync's cost follows the change.
        lacking = 0
        if mark is None or server_mark(client) != mark:
            mended, lacking = _mend_and_recount(store, client, schema, model_version, target, dtype, ttl_s, log)
            stats.mended += mended
        if lacking:
            raise IncompleteVersionError(
                f"embedding version {target.version} lacks {lacking} of its stored embeddings after this sync: Redis "
                f"evicted them while it wrote, and again when they were written back{memory_note(client)}. Give Redis "
                "more memory (maxmemory); the next sync writes them back"
            )
    # A transaction open since the horizon and still open holds back every change after it (silent before: a session
    # left idle in transaction, or a backup's, held them back for good); one that ended meanwhile does not.
    holder = None if stopped_early else documents.oldest_transaction()
    if holder is not None and holder[0] <= horizon and (held_back := documents.changed_from(horizon)):
        stats.held_back, stats.held_back_by = held_back, holder[1]
        log(f"{held_back} documents changed after {horizon.isoformat()} are left for a later sync: the oldest open "
            f"transaction on the database began then ({holder[1]})")  # fmt: skip
    # looked at again: a build may take hours, and a version Redis lost meanwhile is no reason to wait
    if not stopped_early and stats.full_build and _served_whole(client, schema, current, target):
        stats.flip_waits = _flip_waits(store, model_version, current, stats.held_back, max_error_rate)
    if stats.flip_waits:  # readers keep the version they are served, which lives on while the build waits
        stats.served_version = current.version
        send_commands(client, [(b"EXPIRE", name.encode(), b"%d" % ttl_s) for name in _version_keys(schema, current)])
        log(f"Redis version {target.version} is not served yet: {stats.flip_waits}; readers stay on "
            f"{current.version}, and the next sync goes on with the build")  # fmt: skip
    elif not stopped_early and not progress.complete:  # a build, or a version copied wider above: readers move to it
        flip_pointer(client, schema, EMBEDDING_KIND, target, grace_s=grace_s, replica_wait_s=replica_wait_s)
        if current is not None and current.version != target.version:
            client.expire(_sentinel(schema, current.version), grace_s)  # the old version's marker goes with it
        # Readers were served another model's version (or this flip was made by a run that died before it was done
        # here: the pointer is already the target's): their live values are of that model. None served: none are.
        if current is not None and (served_model != model_version or current.version == target.version):
            stats.live_values_dropped = _drop_live_values(client, schema, documents)
            log(f"readers now get {model_version}'s embeddings: {stats.live_values_dropped} live values computed "
                "before it were deleted")  # fmt: skip
        store.mark_complete(model_version)
    elif not stopped_early and (fill := _mean_fill(client, schema, target)) > max_bucket_fill:
        log(f"Redis version {target.version} holds {fill:.0f} keys per bucket (> {max_bucket_fill:.0f}): rebuilding")
        wider = _rebuild_wider(store, client, schema, model_version, dtype, ttl_s, grace_s, replica_wait_s)
        client.expire(_sentinel(schema, target.version), grace_s)  # the old version's marker goes with it
        stats.rebuilt_buckets, stats.redis_version = (target.buckets, wider.buckets), wider.version
        log(f"embeddings moved to Redis version {wider.version}: {target.buckets} -> {wider.buckets} buckets")
    if not stopped_early and not stats.flip_waits:  # the current version, flipped or patched in place, holds them
        record_published(client, schema, EMBEDDING_KIND, store.embedded_count(model_version))
    # stopped early (as a crash would): the next sync resumes at the committed watermark
    stats.seconds = time.perf_counter() - started
    return stats


def _served_whole(client: redis.Redis, schema: KeySchema, current: Pointer | None, target: Pointer) -> bool:
    """Whether readers are served another version than ``target`` whose values are there (its marker lives as long
    as they do): a build then has something to wait beside. A version lost, or none, is replaced at once."""
    return (
        current is not None
        and current.version != target.version
        and bool(client.exists(_sentinel(schema, current.version)))
    )


def _flip_waits(
    store: EmbeddingStore, model_version: str, served: Pointer, held_back: int, max_error_rate: float
) -> str | None:
    """Why readers should not move to the build of ``model_version`` from the version ``served`` yet, or None:
    documents an open transaction held back (the build would serve none of them, where the version readers have
    serves their earlier text), or more than ``max_error_rate`` of its documents failed where the version served
    likely has them (``failures_served_elsewhere``: an embedding service down, a model that maps text to zeros). A
    document every model fails on (blank text) costs readers nothing. The next sync retries service failures."""
    reasons = []
    if held_back:
        reasons.append(f"{held_back} changed documents are held back by an open transaction")
    lost = store.failures_served_elsewhere(model_version, store.model_of(served.version))
    total = store.failure_count(model_version) + store.embedded_count(model_version)
    if lost and lost > max_error_rate * total:
        reasons.append(
            f"{lost} of its {total} documents failed to embed, which readers are served now (over {max_error_rate:.0%})"
        )
    return "; ".join(reasons) or None


def _version_keys(schema: KeySchema, version: Pointer) -> list[str]:
    """The keys of a Redis version: its buckets and its marker."""
    return [*(schema.bucket(EMBEDDING_KIND, version.version, b) for b in range(version.buckets)),
            _sentinel(schema, version.version)]  # fmt: skip


def _mend_lost_buckets(
    store: EmbeddingStore, client: redis.Redis, schema: KeySchema, model_version: str, target: Pointer, dtype: str,
    ttl_s: int, log: Callable[[str], None],
) -> int:  # fmt: skip
    """Write the stored embeddings of ``target``'s buckets that Redis lost, whole or in part (evicted or expired, while
    its marker, read and renewed by every sync, lived on; a bucket evicted and then re-created by a later write of the
    same sync holds only that write's fields), back from the offline store, which holds every embedding the version
    holds in its ``dtype``; the number written (``_short_buckets``)."""
    short, lacking = _short_buckets(store, client, schema, model_version, target, dtype)
    if not short:
        return 0
    written = 0
    for page in store.iter_values(model_version, dtype=dtype):
        ids = bucket_ids([doc_id.encode() for doc_id, _ in page], target.buckets)
        lost = [item for item, bucket in zip(page, ids.tolist(), strict=True) if bucket in short]
        if lost:
            patch_version(client, EMBEDDING_KIND, target, upserts=lost, schema=schema, ttl_s=ttl_s)
            written += len(lost)
    log(f"Redis lost {lacking} embeddings from {len(short)} of the {target.buckets} buckets of version "
        f"{target.version} (evicted or expired): {written} stored embeddings of them written back")  # fmt: skip
    return written


def _mend_and_recount(
    store: EmbeddingStore, client: redis.Redis, schema: KeySchema, model_version: str, version: Pointer, dtype: str,
    ttl_s: int, log: Callable[[str], None],
) -> tuple[int, int]:  # fmt: skip
    """``_mend_lost_buckets`` of ``version``, and how many embeddings it still lacks after it (evicted again as they
    were written back at maxmemory; 0 when nothing was written back: nothing was short)."""
    mended = _mend_lost_buckets(store, client, schema, model_version, version, dtype, ttl_s, log)
    return mended, (_short_buckets(store, client, schema, model_version, version, dtype)[1] if mended else 0)


def _short_buckets(
    store: EmbeddingStore, client: redis.Redis, schema: KeySchema, model_version: str, target: Pointer, dtype: str
) -> tuple[set[int], int]:
    """The buckets of ``target`` that hold fewer fields than the store has embeddings of ``dtype`` in them (its layout:
    a stored value of another, a document an open transaction held back from a rebuild in a new dtype, is not the
    version's), and how many fields they lack. One ``HLEN`` per bucket and a count; the store's ids are read only when
    the fields fall short of that count (fields a killed sync wrote and never committed could hide a loss, until the
    next sync writes them again)."""
    names = [schema.bucket(EMBEDDING_KIND, target.version, b).encode() for b in range(target.buckets)]
    lengths = np.array(run_commands(client, [(b"HLEN", name) for name in names]), dtype=np.int64)
    fields = int(lengths.sum())
    # The count of every dtype first (its index alone answers it): the one of this dtype reads each row's value,
    # which only a version short of the whole count needs (a rebuild in a new dtype, or a loss).
    if fields >= store.embedded_count(model_version) or fields >= store.embedded_count(model_version, dtype=dtype):
        return set(), 0
    expected = np.zeros(target.buckets, dtype=np.int64)
    for ids in store.iter_ids(model_version, dtype=dtype):
        expected += np.bincount(bucket_ids([doc_id.encode() for doc_id in ids], target.buckets),
                                minlength=target.buckets)  # fmt: skip
    missing = np.maximum(expected - lengths, 0)
    return set(np.flatnonzero(missing).tolist()), int(missing.sum())


def _mean_fill(client: redis.Redis, schema: KeySchema, target: Pointer, sample: int = FILL_SAMPLE_BUCKETS) -> float:
    """Mean keys per bucket of ``target``, from the HLEN of up to ``sample`` random buckets: bounded work."""
    picked = random.sample(range(target.buckets), min(sample, target.buckets))
    lengths = run_commands(client, [(b"HLEN", schema.bucket(EMBEDDING_KIND, target.version, b).encode())
                                     for b in picked])  # fmt: skip
    return sum(lengths) / len(lengths)


def _rebuild_wider(
    store: EmbeddingStore,
    client: redis.Redis,
    schema: KeySchema,
    model_version: str,
    dtype: str,
    ttl_s: int,
    grace_s: int,
    replica_wait_s: float,
) -> Pointer:
    """Copy the stored embeddings of ``model_version`` into a new Redis version with ``bucket_count(n)``
    buckets, then flip to it (one atomic SET of the pointer; the old version lives ``grace_s`` more).

    The offline store mirrors the version being patched (every chunk commits after its Redis writes), so
    nothing is re-embedded. A crash during the copy leaves readers on the old version and the copy to
    expire. Once the copy is whole it is recorded as an unfinished build (``move_version``), so a crash between
    that and the flip is resumed like one: the next sync patches in what changed since and flips to it, rather
    than embedding the corpus again."""
    wider = _copy_wider(store, client, schema, model_version, dtype, ttl_s, store.embedded_count(model_version))
    client.set(_sentinel(schema, wider.version), f"synced {dtype}", ex=ttl_s)
    flip_pointer(client, schema, EMBEDDING_KIND, wider, grace_s=grace_s, replica_wait_s=replica_wait_s)
    store.mark_complete(model_version)
    return wider


def _copy_wider(
    store: EmbeddingStore, client: redis.Redis, schema: KeySchema, model_version: str, dtype: str, ttl_s: int,
    n_docs: int,
) -> Pointer:  # fmt: skip
    """Copy the stored embeddings of ``model_version`` into a new Redis version of ``bucket_count(n_docs)`` buckets
    and record it as an unfinished build (``move_version``): nothing reads it until a flip."""
    wider = Pointer(f"emb{int(time.time())}.{uuid.uuid4().hex[:8]}", bucket_count(n_docs))
    client.set(_sentinel(schema, wider.version), f"building {dtype}", ex=ttl_s)
    for page in store.iter_values(model_version, dtype=dtype):  # a version holds one layout (values of another wait)
        patch_version(client, EMBEDDING_KIND, wider, upserts=page, schema=schema, ttl_s=ttl_s)  # each bucket's TTL
    # The biggest write of all, and the likeliest to evict its own buckets at maxmemory (a restore, a rebuild that
    # flips at once): checked whole before anything reads it, written back once, and refused if still short.
    _, lacking = _mend_and_recount(store, client, schema, model_version, wider, dtype, ttl_s, lambda message: None)
    if lacking:
        send_commands(client, [(b"UNLINK", name.encode()) for name in _version_keys(schema, wider)])  # its memory back
        raise IncompleteVersionError(
            f"the copy of the stored embeddings into Redis version {wider.version} lacked {lacking} of them: Redis "
            f"evicted them as they were written, and again when written back{memory_note(client)}; the copy was "
            "deleted. Readers are served the version they were (none, after Redis lost it) until a copy fits: give "
            "Redis more memory (maxmemory)"
        )
    store.move_version(model_version, wider.version, wider.buckets)
    return wider


def _sentinel(schema: KeySchema, version: str) -> str:
    """A key that lives exactly as long as the version's buckets: its absence means the version is gone. Its value,
    ``building int8`` or ``synced float32``, names the dtype the version's values are written in."""
    return schema.bucket(EMBEDDING_KIND, version, "meta")


def lost_redis_version(client: redis.Redis, schema: KeySchema) -> str | None:
    """Why Redis serves no embeddings, as a sync would judge it, or None: no pointer, or a pointer whose version's
    marker is gone (expired, evicted or lost with the buckets it lives as long as), which the sync rebuilds."""
    current = _current_pointer(client, schema)
    if current is None:
        return "Redis holds no embedding version"
    if not client.exists(_sentinel(schema, current.version)):
        return f"Redis's embedding pointer names version {current.version}, whose values are gone"
    return None


def _current_pointer(client: redis.Redis, schema: KeySchema) -> Pointer | None:
    raw = client.get(schema.pointer(EMBEDDING_KIND))
    return None if raw is None else Pointer.decode(raw)


@dataclass
class Chunk:
    """One chunk of documents, embedded and encoded, ready to write."""

    embedded: list[tuple[str, datetime, bytes]]  # doc_id, modified_at, encoded vector
    deleted: list[str]
    failures: list[tuple[str, datetime, str]]  # doc_id, modified_at, reason
    watermark: tuple[datetime, str] | None  # None: a retry of earlier failures, the watermark stays

    def count_into(self, stats: SyncStats) -> None:
        stats.chunks += 1
        stats.embedded += len(self.embedded)
        stats.deleted += len(self.deleted)
        stats.failed += len(self.failures)
        for _, _, reason in self.failures:
            stats.failure_reasons[reason] = stats.failure_reasons.get(reason, 0) + 1


def _drop_live_values(client: redis.Redis, schema: KeySchema, documents: DocumentStore) -> int:
    """Delete the live values readers computed (``get_or_compute``) of every document the table holds, deleted ones
    too, after the kind's epoch moved (``delete_live_values``: a computation running meanwhile stores nothing): they
    were computed for the model served before, whose vectors are of another space than the new one's, and a lookup
    that the new version cannot answer fell back to them. One ``DEL`` per document, a page at a time (the publisher
    may not ``SCAN``); returns how many existed."""
    dropped = 0
    for ids in documents.iter_ids():
        dropped += delete_live_values(client, [(EMBEDDING_KIND, doc_id) for doc_id in _servable(ids)], schema=schema)
    return dropped


def _servable(doc_ids: list[str]) -> list[str]:
    """``doc_ids`` without those that cannot be keys of the serving cache (``_unservable``), in their order."""
    unservable = _unservable(doc_ids)
    return [doc_id for doc_id in doc_ids if doc_id not in unservable]


def _unservable(doc_ids: list[str]) -> set[str]:
    """The ids that cannot be keys of the serving cache; loads refuse them, but a table may hold older ones."""
    try:
        check_keys(doc_ids)
        return set()
    except ValueError:
        pass
    bad = set()
    for doc_id in doc_ids:
        try:
            check_key(doc_id)
        except ValueError:
            bad.add(doc_id)
    return bad


def _embed_chunk(rows: list[DocumentRow], embedder: Embedder, dtype: str, model_version: str) -> Chunk:
    unservable = _unservable([row.doc_id for row in rows])  # failures, never written to Redis
    live = [row for row in rows if not row.deleted and row.doc_id not in unservable]
    result = embed_documents(embedder, [(row.title, row.body) for row in live])
    values = encode_batch(np.asarray(result.vectors, dtype=np.float32), dtype=dtype, model_version=model_version)
    return Chunk(
        embedded=[
            (live[i].doc_id, live[i].modified_at, value) for i, value in zip(result.indices, values, strict=True)
        ],
        deleted=[row.doc_id for row in rows if row.deleted],
        failures=[(live[i].doc_id, live[i].modified_at, reason) for i, reason in result.failures.items()]
        + [(row.doc_id, row.modified_at, INVALID_ID) for row in rows if not row.deleted and row.doc_id in unservable],
        watermark=rows[-1].watermark,
    )


class _ChunkWriter:
    """Writes chunks in order: Redis first, then each chunk's PostgreSQL commit, which advances the watermark. During
    a build, ``served`` is the version readers are on: deleted documents leave it too.

    Chunks are held until ``batch`` documents are pending, so that each Redis bucket gets one HSET with
    several fields rather than several with one (a version of 1M documents has ~16k buckets, so a chunk of
    10k documents touches most buckets once). A crash loses at most the held chunks: the next sync redoes
    them, and their Redis writes are idempotent. Buckets written get ``ttl_s`` in the same pipeline.
    """

    def __init__(
        self, store: EmbeddingStore, client: redis.Redis, schema: KeySchema, target: Pointer, model_version: str,
        batch: int = REDIS_BATCH_DOCS, replica_wait_s: float = REPLICA_WAIT_S, ttl_s: int | None = None,
        served: Pointer | None = None,
    ) -> None:  # fmt: skip
        self.store, self.client, self.schema, self.target, self.served = store, client, schema, target, served
        self.model_version, self.batch, self.replica_wait_s, self.ttl_s = model_version, batch, replica_wait_s, ttl_s
        self._held: list[Chunk] = []
        self._docs = 0
        self.committed = 0  # documents whose chunks committed (embedded, deleted or failed)

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
        removed = _servable([doc_id for doc_id, value in final.items() if value is None])  # others: never written
        patch_version(
            self.client,
            EMBEDDING_KIND,
            self.target,
            upserts=[(doc_id, value) for doc_id, value in final.items() if value is not None],
            deletes=removed,
            schema=self.schema,
            ttl_s=self.ttl_s,  # a build killed and never resumed (a new embedder came) still expires
        )
        gone = {doc_id for chunk in self._held for doc_id in chunk.deleted}
        if self.served is not None and (deleted := [doc_id for doc_id in removed if doc_id in gone]):
            patch_version(self.client, EMBEDDING_KIND, self.served, deletes=deleted, schema=self.schema)
        # A reader's get_or_compute may hold a live value of a removed document, which its lookups fall back to once
        # the version has none: served until its TTL, a deleted document's vector, a failed one's from its old text.
        if removed:
            delete_live_values(self.client, [(EMBEDDING_KIND, doc_id) for doc_id in removed], schema=self.schema)
        # The commits below say these documents are in Redis: first their replicas must hold them too, or a failover
        # could lose writes the watermark has passed (ReplicationTimeoutError: nothing commits, the next sync redoes).
        confirm_replicas(self.client, self.replica_wait_s)
        for chunk in self._held:
            self.store.commit_chunk(self.model_version, chunk.embedded, chunk.deleted, chunk.failures, chunk.watermark)
            self.committed += len(chunk.embedded) + len(chunk.deleted) + len(chunk.failures)
        self._held, self._docs = [], 0
