"""Fault: the document embedding sync is SIGKILLed before each of its round trips to Redis and each of its PostgreSQL
commits in turn, then run again.

Four syncs are killed: the first full build, an incremental one (documents added, edited and deleted), one that
widens its version (``max_bucket_fill`` passed), and the full build of a new embedder while an older version is
served. After the sync runs again to completion, PostgreSQL and the served Redis version must hold exactly what a sync
that was never killed holds (the same value for every live document, once; no deleted one), the sync must not have
embedded the corpus again where nothing asked for it, and every other version must be on its way out (its grace, or
its TTL for a build that was never served), never left to live without end.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import redis

from precompute_assets.ml.embedder import HashingSvdEmbedder, document_text
from precompute_assets.serving import KeySchema, connect
from precompute_assets.serving.keys import EMBEDDING_KIND, Pointer
from precompute_assets.storage.documents import DocumentStore
from precompute_assets.storage.embeddings import EmbeddingStore
from precompute_assets.storage.postgres import scratch_database, transaction
from precompute_assets.sync.embeddings import sync_embeddings
from precompute_assets.workload.documents import generate_documents
from precompute_assets_tests.faults.killing import REDIS_SEND, restore, run_killed, snapshot

N_DOCS = 1200
CHUNK, BATCH = 100, 300  # 12 chunks, written to Redis 3 at a time: many points to die at
GRACE_S, TTL_S = 600, 7 * 86400
STORE_COMMITS = [
    f"precompute_assets.storage.embeddings:EmbeddingStore.{name}"
    for name in ("start_build", "commit_chunk", "mark_complete", "move_version")
]
HOOKS = [REDIS_SEND, *STORE_COMMITS]

SYNC = """
import sys
from precompute_assets.ml.embedder import HashingSvdEmbedder
from precompute_assets.serving import KeySchema, connect
from precompute_assets.storage.documents import DocumentStore
from precompute_assets.storage.embeddings import EmbeddingStore
from precompute_assets.sync.embeddings import sync_embeddings

app_db, redis_url, namespace, model, fill = sys.argv[1:]
sync_embeddings(DocumentStore(app_db), EmbeddingStore(app_db), connect(redis_url, socket_timeout=10),
                HashingSvdEmbedder.load(model), schema=KeySchema(namespace), chunk_size=100, write_batch=300,
                grace_s=600, replica_wait_s=0, max_bucket_fill=float(fill), log=lambda message: None)
"""


@pytest.fixture(scope="module")
def corpus() -> pd.DataFrame:
    return pd.concat(generate_documents(N_DOCS + 200, seed=5))


@pytest.fixture(scope="module")
def models(corpus, tmp_path_factory) -> tuple[Path, Path]:
    texts = [document_text(t, b) for t, b in zip(corpus.title, corpus.body, strict=True)]
    folder = tmp_path_factory.mktemp("embedders")
    for seed in (0, 1):
        HashingSvdEmbedder.fit(texts, dim=32, sample=1000, seed=seed).save(folder / f"m{seed}")
    return folder / "m0", folder / "m1"


def sync(app_db: str, client: redis.Redis, schema: KeySchema, model: Path, fill: float):
    return sync_embeddings(DocumentStore(app_db), EmbeddingStore(app_db), client, HashingSvdEmbedder.load(model),
                           schema=schema, chunk_size=CHUNK, write_batch=BATCH, grace_s=GRACE_S, replica_wait_s=0,
                           max_bucket_fill=fill, log=lambda message: None)  # fmt: skip


def prepare(scenario: str, app_db: str, client: redis.Redis, schema: KeySchema, corpus, models) -> tuple[Path, float]:
    """The documents and earlier syncs of ``scenario``; returns the embedder and the fill of the sync to kill."""
    documents = DocumentStore(app_db)
    documents.ensure_schema()
    documents.load_frame(corpus.iloc[:N_DOCS])
    if scenario == "first build":
        return models[0], 1e9
    sync(app_db, client, schema, models[0], 1e9)
    if scenario == "new embedder":
        return models[1], 1e9
    documents.load_frame(corpus.iloc[N_DOCS:])  # 200 new documents
    if scenario == "widen":
        return models[0], 10.0  # the version holds ~19 keys per bucket now: past 10, it is copied wider
    edited = corpus.iloc[:100].assign(body=lambda frame: frame.body + " edited")
    documents.load_frame(edited)
    documents.delete(corpus.doc_id.iloc[100:150])
    return models[0], 1e9


def wait_for_the_killed_sessions_lock(app_db: str, timeout_s: float = 60.0) -> None:
    """Wait until PostgreSQL has ended the killed sync's session, and with it the sync's advisory lock: the server
    notices the closed connection asynchronously, and on a loaded machine the resumed sync could otherwise find the
    lock still held ("another embedding sync is running"), which is the right answer for a live sync, not a crash."""
    deadline = time.monotonic() + timeout_s
    while True:
        with transaction(app_db) as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT count(*) FROM pg_locks JOIN pg_database d ON d.oid = pg_locks.database"
                " WHERE locktype = 'advisory' AND d.datname = current_database()"
            )
            (held,) = cur.fetchone()
        if not held:
            return
        assert time.monotonic() < deadline, "the killed sync's advisory lock outlived its process"
        time.sleep(0.05)


def served(client: redis.Redis, schema: KeySchema) -> tuple[Pointer, dict[str, bytes]]:
    """The current version and every (doc_id, value) its buckets hold."""
    pointer = Pointer.decode(client.get(schema.pointer(EMBEDDING_KIND)))
    values: dict[str, bytes] = {}
    for bucket in range(pointer.buckets):
        for field, value in client.hgetall(schema.bucket(EMBEDDING_KIND, pointer.version, bucket)).items():
            assert field.decode() not in values
            values[field.decode()] = value
    return pointer, values


def stored(app_db: str) -> tuple[dict[str, bytes], dict[str, bool]]:
    """PostgreSQL's embeddings, and each model version's ``complete``."""
    with transaction(app_db) as conn, conn.cursor() as cur:
        cur.execute("SELECT doc_id, value FROM document_embeddings")
        values = {doc_id: bytes(value) for doc_id, value in cur.fetchall()}
        cur.execute("SELECT model_version, complete FROM embedding_progress")
        progress = dict(cur.fetchall())
    return values, progress


def leftovers(client: redis.Redis, schema: KeySchema, current: Pointer) -> list[str]:
    """Keys of other versions that are not on their way out: without a TTL, or served-version TTLs on a version that
    was served (its buckets were flipped away from, so they should be on their grace)."""
    bad = []
    for raw in client.scan_iter(f"{schema.prefix}:{EMBEDDING_KIND}:*", count=10_000):
        name = raw.decode()
        version = name.split(":")[3]
        if version in (current.version, "current", "previous", "fifo", "epoch"):  # the kind's, not a version's
            continue
        if client.ttl(raw) < 0:
            bad.append(f"{name} has no TTL")
    return bad


def replaced_version_ttl(client: redis.Redis, schema: KeySchema, current: Pointer) -> int | None:
    """The TTL of the first bucket of the version the last flip replaced (None: none was)."""
    raw = client.get(schema.previous(EMBEDDING_KIND))
    if raw is None or Pointer.decode(raw).version == current.version:
        return None
    return client.ttl(schema.bucket(EMBEDDING_KIND, Pointer.decode(raw).version, 0))


@pytest.mark.parametrize("scenario", ["first build", "incremental", "widen", "new embedder"])
def test_a_sync_killed_anywhere_resumes_to_what_an_unkilled_sync_leaves(
    scenario, app_db_url, redis_server, corpus, models
):
    url = redis_server().url
    client = connect(url, socket_timeout=10)

    # What ``prepare`` leaves is made once, then copied for every kill point (a PostgreSQL template database and a
    # Redis snapshot, under one namespace as the server is emptied before each): the same start, without loading the
    # documents and running the earlier syncs again for each point.
    schema = KeySchema(f"s{uuid.uuid4().hex[:8]}")
    client.flushall()
    with scratch_database(app_db_url, "prepared") as template:
        model, fill = prepare(scenario, template, client, schema, corpus, models)
        prepared = snapshot(client)

        def run(at: int | None) -> dict:
            """Start from the prepared ``scenario``, kill its sync at ``at``, and run it again."""
            restore(client, prepared)
            with scratch_database(app_db_url, "kill", template=template.rpartition("/")[2]) as app_db:
                outcome = run_killed(SYNC, [app_db, url, schema.namespace, str(model), str(fill)], HOOKS, at)
                if outcome.killed:
                    wait_for_the_killed_sessions_lock(app_db)
                resumed = sync(app_db, client, schema, model, fill) if outcome.killed else None
                pointer, values = served(client, schema)
                return {
                    "outcome": outcome,
                    "resumed": resumed,
                    "pointer": pointer,
                    "redis": values,
                    "postgres": stored(app_db),
                    "leftovers": leftovers(client, schema, pointer),
                    "replaced_ttl": replaced_version_ttl(client, schema, pointer),
                }

        failures = check_every_point(scenario, run)
    assert not failures, "\n".join(failures)


def check_every_point(scenario: str, run: Callable[[int | None], dict]) -> list[str]:
    """Run the unkilled sync, then kill at each chosen point; what differs from the unkilled one, one line each."""
    reference = run(None)
    assert not reference["outcome"].killed and reference["outcome"].calls > 10
    expected_redis = reference["redis"]
    expected_postgres, _ = reference["postgres"]
    assert expected_redis == expected_postgres and len(expected_redis) >= N_DOCS - 50
    failures = []
    calls = reference["outcome"].calls
    # Every other point of the widening sync, every fifth of the others (each is a sync of its own, a second or two
    # forked from the warm parent, and the suite must stay within its time), and all of their last steps, where the
    # flips and the records of what they did happen.
    stride = 2 if scenario == "widen" else 5
    points = sorted({*range(1, calls + 1, stride), *range(calls - 5, calls + 1)})
    for at in points:
        got = run(at)
        where = f"{scenario}, killed at hooked call {at}"
        if not got["outcome"].killed:
            failures.append(f"{where}: not killed")
            continue
        values, progress = got["postgres"]
        if got["redis"] != expected_redis:
            missing = set(expected_redis) - set(got["redis"])
            extra = set(got["redis"]) - set(expected_redis)
            changed = {k for k in set(expected_redis) & set(got["redis"]) if expected_redis[k] != got["redis"][k]}
            failures.append(f"{where}: Redis: {len(missing)} missing, {len(extra)} extra, {len(changed)} stale")
        if values != expected_postgres:
            failures.append(f"{where}: PostgreSQL differs ({len(values)} vs {len(expected_postgres)})")
        if not all(progress.values()):
            failures.append(f"{where}: progress not complete: {progress}")
        if got["leftovers"]:
            failures.append(f"{where}: {len(got['leftovers'])} leftover keys, such as {got['leftovers'][:3]}")
        if got["replaced_ttl"] is not None and got["replaced_ttl"] > GRACE_S:
            failures.append(f"{where}: the replaced version lives {got['replaced_ttl']} s, not its grace")
        resumed = got["resumed"]
        if scenario in ("incremental", "widen") and resumed.embedded > 400:  # a few chunks redone, not the corpus
            failures.append(f"{where}: the resumed sync embedded {resumed.embedded} documents")
    return failures
