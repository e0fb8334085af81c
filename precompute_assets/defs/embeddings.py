"""Document embeddings: an embedding model fitted on the corpus, and embeddings kept in step with the
document store, offline (PostgreSQL) and in Redis. A sensor runs the sync when documents change."""

import json
import logging
import math
import time
from pathlib import Path
from typing import Literal

import dagster as dg
from pydantic import Field

from ..ml.embedder import MAX_CHARS, Embedder, HashingSvdEmbedder, SentenceTransformerEmbedder, document_text
from ..ml.embedding_service import ENV_API_KEY, http_embedder_from_config
from ..ml.model_store import write_atomically
from ..storage.embeddings import EmbeddingStore, sample_documents
from ..sync.embedding_quality import int8_recall
from ..sync.embeddings import SyncStats, lost_redis_version, sync_embeddings
from .config_checks import at_least, positive, refuse
from .freshness import EMBEDDINGS_FRESHNESS
from .publishing import GRACE_SECONDS, expiry_problem
from .resources import (
    AppDatabaseResource,
    DocumentStoreResource,
    ModelStoreResource,
    RedisResource,
    failing_clearly_when_full,
)
from .retention import retention_start
from .runs import ACTIVE_RUN_STATUSES

EMBEDDING_MODEL = "embedding_model"
ERROR_WARN, ERROR_FAIL = 0.01, 0.05
RECALL_GOAL = 0.95
STALE_GOAL = 0.01
STALE_AFTER_HOURS = 24  # a document changed longer ago than this should have its embedding
NO_EMBEDDER = "no embedder yet: materialize embedding_model (it fits on the documents)"
UNSETTLED = "~unsettled"  # documents_changed's marker while an older transaction may still commit documents


class EmbeddingModelConfig(dg.Config):
    backend: Literal["hashing-svd", "pretrained", "http", "sentence-transformers"] = Field(
        "hashing-svd",
        description='"hashing-svd", "pretrained" (a multilingual encoder shipped with its weights, extra '
        '"pretrained"), "http" (an inference service) or "sentence-transformers" (optional extra).',
    )
    model: str = Field(
        "",
        description="pretrained: use-multilingual-v3 (default) or multilingual-e5-small; http: the service's model "
        "name; sentence-transformers: a local path or an installed model name.",
    )
    dim: int = Field(300, description="hashing-svd: dimensions fitted (http: the service's, asked once).")
    sample: int = Field(20_000, description="hashing-svd: documents sampled to fit the SVD.")
    url: str = Field(
        "",
        description='http: the inference service (OpenAI-compatible /v1/embeddings, or api "tei": /embed); '
        '"" reads PRECOMPUTE_EMBEDDING_URL.',
    )
    api: Literal["openai", "tei"] = Field("openai", description='http: "openai" or "tei".')
    api_key_env: str = Field(
        ENV_API_KEY, description="http: the NAME of the environment variable holding the API key, never the key."
    )
    batch_size: int = Field(64, description="http: documents per request.")
    max_concurrency: int = Field(4, description="http: requests in flight.")
    timeout_s: float = Field(30.0, description="http: seconds per request.")
    max_retries: int = Field(5, description="http: retries of a timeout, connection error, 429 or 5xx.")


HTTP_SETTINGS = ("url", "model", "api", "api_key_env", "batch_size", "max_concurrency", "timeout_s", "max_retries")


def load_embedder(path: Path):
    """The embedder saved at ``path`` by the ``embedding_model`` asset."""
    meta = json.loads((path / "embedder.json").read_text())
    if meta["backend"] == "sentence-transformers":
        return SentenceTransformerEmbedder(meta["model"])
    if meta["backend"] == "http":
        return http_embedder_from_config(meta)  # the dimension saved at fit: no probe request
    if meta["backend"] == "pretrained":
        from ..ml.pretrained import PretrainedEmbedder

        return PretrainedEmbedder(meta["model"] or "use-multilingual-v3")
    return HashingSvdEmbedder.load(path / "hashing_svd")


def save_embedder(path: Path, embedder: Embedder, saved: dict[str, object]) -> None:
    """Save what ``load_embedder`` reads at ``path``: ``saved`` (backend and settings) and a hashing-svd embedder's
    arrays. The path is the version's, so a save that fails (disk full) must leave the version's earlier save, which
    the last materialization names, whole: each file is replaced whole."""
    path.mkdir(parents=True, exist_ok=True)
    if isinstance(embedder, HashingSvdEmbedder):
        embedder.save(path / "hashing_svd")
    text = json.dumps(saved)
    write_atomically(path / "embedder.json", lambda f: f.write(text.encode()))


@dg.asset(kinds={"sklearn"}, group_name="embeddings")
def embedding_model(
    context: dg.AssetExecutionContext,
    config: EmbeddingModelConfig,
    documents: DocumentStoreResource,
    model_store: ModelStoreResource,
) -> dg.MaterializeResult:
    """The default embedder: hashed character n-grams reduced by a truncated SVD fitted on a corpus sample
    (any language or script, CPU only, nothing downloaded). Its version is a hash of its content."""
    refuse(
        "embedding_model",
        at_least(config, 1, "dim", "sample", "batch_size", "max_concurrency"),
        positive(config, "timeout_s"),
        at_least(config, 0, "max_retries"),
    )
    started = time.perf_counter()
    saved: dict[str, object] = {"backend": config.backend, "model": config.model}
    if config.backend == "sentence-transformers":
        embedder, sampled = SentenceTransformerEmbedder(config.model), 0
    elif config.backend == "http":
        settings = {name: getattr(config, name) for name in HTTP_SETTINGS}
        embedder, sampled = http_embedder_from_config(settings), 0  # dim 0: one probe request
        saved |= settings | {"dim": embedder.dim}  # url "" stays "": read from the environment at load
    elif config.backend == "pretrained":
        from ..ml.pretrained import PretrainedEmbedder

        embedder, sampled = PretrainedEmbedder(config.model or "use-multilingual-v3"), 0
    else:  # hashing-svd
        rows = sample_documents(documents.store(), config.sample, body_chars=MAX_CHARS)  # all that is fitted on
        texts = [document_text(title or "", body or "") for _, title, body in rows]
        if len(texts) <= config.dim:
            raise dg.Failure(
                description=f"need more than {config.dim} documents to fit {config.dim} dimensions, found "
                f"{len(texts)}: lower the config dim below {len(texts)}, or add documents"
            )
        embedder, sampled = HashingSvdEmbedder.fit(texts, dim=config.dim, sample=config.sample), len(texts)
    path = Path(model_store.store().root) / EMBEDDING_MODEL / embedder.version.replace(":", "_").replace("/", "_")
    save_embedder(path, embedder, saved)
    context.log.info(f"embedding model {embedder.version} ({embedder.dim} dims, {sampled} documents sampled)")
    return dg.MaterializeResult(
        metadata={
            "model_version": embedder.version,
            "model_path": dg.MetadataValue.path(str(path)),
            "dim": embedder.dim,
            "documents_sampled": sampled,
            "fit_seconds": time.perf_counter() - started,
        }
    )


class EmbeddingSyncConfig(dg.Config):
    chunk_size: int = Field(
        10_000,
        description="Documents embedded per chunk (at least 1). Chunks commit once their Redis writes, grouped up to "
        "100,000 documents, went out; a killed run resumes after the last commit (the log's 'committed').",
    )
    dtype: Literal["int8", "float32"] = Field("int8", description='Stored vectors: "int8" or "float32".')
    recall_sample: int = Field(2000, description="About this many documents sampled by the int8_recall check.")
    ttl_days: int = Field(
        7,
        description="TTL of the Redis version, renewed by every sync: it outlives a stalled pipeline, not forever "
        "(at least 1).",
    )
    grace_seconds: int = Field(
        GRACE_SECONDS, description="Seconds the replaced Redis version lives on after a flip, for readers holding it."
    )


def sync_config_problem(config: EmbeddingSyncConfig) -> str | None:
    """Why ``config`` cannot sync, or None. Each of these failed deep in the sync (a PostgreSQL limit, a Redis
    expiry), three retries later and holding the embedding_sync pool all along, with the same config every time."""
    if problem := at_least(config, 1, "chunk_size", "recall_sample"):
        return problem
    return expiry_problem("ttl_days", config.ttl_days, 1, 86_400) or expiry_problem(
        "grace_seconds", config.grace_seconds, 0, 1
    )


def current_model_path(instance: dg.DagsterInstance) -> Path:
    event = instance.get_latest_materialization_event(dg.AssetKey(EMBEDDING_MODEL))
    if event is None or event.asset_materialization is None:
        # Retrying cannot help: the embedder appears only when embedding_model is materialized.
        raise dg.Failure(description="materialize embedding_model first: there is no embedder yet", allow_retries=False)
    return Path(event.asset_materialization.metadata["model_path"].value)


@dg.asset(
    deps=[EMBEDDING_MODEL],
    kinds={"redis", "pandas"},
    group_name="embeddings",
    retry_policy=dg.RetryPolicy(max_retries=3, delay=5, backoff=dg.Backoff.EXPONENTIAL),
    pool="embedding_sync",
    freshness_policy=EMBEDDINGS_FRESHNESS,
    check_specs=[
        dg.AssetCheckSpec(
            "embedding_error_rate",
            asset="document_embeddings",
            description=f"Share of documents that failed to embed: warns above {ERROR_WARN:.0%}, fails above "
            f"{ERROR_FAIL:.0%}.",
        ),
        dg.AssetCheckSpec(
            "int8_recall",
            asset="document_embeddings",
            description=f"Recall@10 of int8 against float32 neighbours, searched within a sample of documents (the "
            f"whole corpus's is lower: its neighbours are closer); warns below {RECALL_GOAL}.",
        ),
        dg.AssetCheckSpec(
            "staleness",
            asset="document_embeddings",
            description=f"Share of documents changed over {STALE_AFTER_HOURS} h ago whose embedding is missing or "
            f"older; warns at {STALE_GOAL:.0%} or more.",
        ),
    ],
)
def document_embeddings(
    context: dg.AssetExecutionContext,
    config: EmbeddingSyncConfig,
    documents: DocumentStoreResource,
    app_db: AppDatabaseResource,
    redis: RedisResource,
) -> dg.MaterializeResult:
    """Embed new and modified documents (everything when the embedder changes), drop deleted ones, and
    keep Redis in step; resumes from the last finished chunk after a crash."""
    if problem := sync_config_problem(config):
        raise dg.Failure(description=problem, allow_retries=False)
    embedder = load_embedder(current_model_path(context.instance))
    store, docs, client = EmbeddingStore(app_db.url), documents.store(), redis.client()
    synced = "Readers keep what Redis holds; a retry resumes from the last finished chunk."
    with failing_clearly_when_full(client, "the embedding sync stopped", synced):
        stats = sync_embeddings(
            docs, store, client, embedder, schema=redis.schema(), dtype=config.dtype,
            chunk_size=config.chunk_size, ttl_s=config.ttl_days * 86_400, grace_s=config.grace_seconds,
            replica_wait_s=redis.replica_wait_s, log=context.log.info,
        )  # fmt: skip
    if stats.held_back:
        context.log.warning(f"{stats.held_back} changed documents wait for the oldest open transaction on the database"
                            f" to end: {stats.held_back_by}")  # fmt: skip
    if stats.flip_waits:
        context.log.warning(f"the new embedding version is not served yet: {stats.flip_waits}")
    recall = int8_recall(store, docs, embedder, n=config.recall_sample) if config.dtype == "int8" else 1.0
    stale, stale_docs, aged_docs = store.stale_share(docs, stats.model_version, max_age_hours=STALE_AFTER_HOURS)
    return dg.MaterializeResult(
        metadata={
            "model_version": stats.model_version,
            # the version readers are served (what served_by_redis checks), and a build that waits beside it
            "redis_version": stats.served_version or stats.redis_version,
            **({"building_version": stats.redis_version} if stats.served_version else {}),
            "full_build": stats.full_build,
            "embedded": stats.embedded,
            "deleted": stats.deleted,
            "failed": stats.failed,
            "failure_reasons": dg.MetadataValue.json(stats.failure_reasons),
            "retried": stats.retried,
            "held_back": stats.held_back,
            "mended": stats.mended,
            "restored": stats.restored,
            "live_values_dropped": stats.live_values_dropped,
            **({"flip_waits": stats.flip_waits} if stats.flip_waits else {}),
            "rebuilt_buckets": dg.MetadataValue.json(list(stats.rebuilt_buckets or [])),
            "error_rate": stats.error_rate,
            # A sync that embedded nothing measured no throughput: a 0 would plot as a collapse on every quiet day.
            **({"docs_per_s": stats.docs_per_s} if stats.embedded else {}),
            "seconds": stats.seconds,
            **({} if math.isnan(recall) else {"recall_at_10_int8": recall}),  # NaN: too few documents to measure
            "stale_share": stale,
        },
        check_results=sync_check_results(
            stats, recall, (stale, stale_docs, aged_docs), dtype=config.dtype, corpus=corpus_failures(store, stats)
        ),
    )


MIN_RUN_DOCS = 100  # a sync that embedded fewer documents is judged by the corpus' failures, not its own few


def corpus_failures(store: EmbeddingStore, stats: SyncStats) -> tuple[int, int]:
    """``(failed, documents)`` of the sync's model over the whole corpus: its latest failures, and those beside its
    stored embeddings."""
    failed = store.failure_count(stats.model_version)
    return failed, failed + store.embedded_count(stats.model_version)


def sync_check_results(
    stats: SyncStats,
    recall: float,
    staleness: tuple[float, int, int],
    *,
    dtype: str = "int8",
    corpus: tuple[int, int] | None = None,
) -> list[dg.AssetCheckResult]:
    """The three checks of a sync, each saying what it measured: ``stats``' failures, ``recall`` of the stored int8
    vectors (NaN: too few documents to measure; not measured for float32) and ``staleness`` (``stale_share``:
    share, stale documents, documents changed over ``STALE_AFTER_HOURS`` ago). A sync of fewer than
    ``MIN_RUN_DOCS`` documents is judged by the ``corpus``' share (failed, documents): one blank document synced
    alone was 100 % and failed the check."""
    seen = stats.embedded + stats.failed
    reasons = ", ".join(f"{reason}: {n}" for reason, n in stats.failure_reasons.items())
    errors = (
        f"{stats.failed} of {seen} documents failed to embed ({stats.error_rate:.2%})" if seen else "nothing to embed"
    )
    rate = stats.error_rate
    if corpus is not None and seen < MIN_RUN_DOCS and corpus[1]:
        rate = corpus[0] / corpus[1]
        errors += f"; judged by the corpus: {corpus[0]} of {corpus[1]} documents fail with this model ({rate:.2%})"
    if reasons:
        errors += f"; {reasons}"
    measured = dtype == "int8" and not math.isnan(recall)
    if measured:
        recall_description = f"recall@10 of int8 against float32: {recall:.3f} (goal {RECALL_GOAL})"
    elif dtype == "int8":
        recall_description = "not measured: too few embedded documents to sample"
    else:
        recall_description = f"not measured: the vectors are stored as {dtype}, not quantised"
    stale, stale_docs, aged_docs = staleness
    return [
        dg.AssetCheckResult(
            check_name="embedding_error_rate",
            passed=rate <= ERROR_WARN,
            severity=dg.AssetCheckSeverity.ERROR if rate > ERROR_FAIL else dg.AssetCheckSeverity.WARN,
            metadata={"error_rate": rate, "run_error_rate": stats.error_rate, "failed": stats.failed},
            description=errors,
        ),
        dg.AssetCheckResult(
            check_name="int8_recall",
            passed=not recall < RECALL_GOAL,  # NaN (too few documents to measure) passes
            severity=dg.AssetCheckSeverity.WARN,
            # left out when not measured: the UI shows a NaN as an empty value
            metadata={**({"recall_at_10": recall} if measured else {}), "goal": RECALL_GOAL},
            description=recall_description,
        ),
        dg.AssetCheckResult(
            check_name="staleness",
            passed=stale < STALE_GOAL,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={
                "stale_share": stale,
                "stale_documents": stale_docs,
                f"documents_older_than_{STALE_AFTER_HOURS}h": aged_docs,
            },
            description=f"{stale_docs} of {aged_docs} documents changed over {STALE_AFTER_HOURS} h ago have a missing "
            f"or older embedding ({stale:.2%})",
        ),
    ]


def has_embedder(instance: dg.DagsterInstance) -> bool:
    """Whether ``embedding_model`` has been materialized: without it a sync fails at once."""
    return instance.get_latest_materialization_event(dg.AssetKey(EMBEDDING_MODEL)) is not None


document_embeddings_job = dg.define_asset_job(
    "document_embeddings_job",
    selection=dg.AssetSelection.assets(document_embeddings),
    description="Sync the embeddings with the documents table, offline and in Redis.",
)


SYNC_RETRY_AFTER_S = 600  # a failed sync is requested again this long after it ended, doubled per failure in a row


def sync_retry_key(instance: dg.DagsterInstance, now: float, *, after_s: float = SYNC_RETRY_AFTER_S) -> str | None:
    """A run key for the sync to run again when the newest syncs failed (Redis or PostgreSQL was away for longer than
    the step's retries) and the last one ended ``after_s`` ago, doubled per failure in a row (at most 8); else None."""
    records = instance.get_run_records(dg.RunsFilter(job_name=document_embeddings_job.name), limit=8)  # newest first
    failed = []
    for record in records:
        if record.dagster_run.status != dg.DagsterRunStatus.FAILURE:
            break
        failed.append(record)
    if not failed or failed[0].end_time is None or now - failed[0].end_time < after_s * 2 ** (len(failed) - 1):
        return None
    return f"documents-retry-{failed[0].dagster_run.run_id}"


def lost_version_key(store: EmbeddingStore, redis: RedisResource, log: logging.Logger) -> tuple[str, str] | None:
    """A run key for a full rebuild, and why, when Redis no longer serves the embedding version a sync completed: no
    pointer (a restart without persistence, a flush), or a pointer naming a version whose values are gone (expired,
    evicted at maxmemory: the pointer has no TTL). The sync rebuilds such a version, but only runs when documents
    change or at 04:00. None while the version is whole, or, with a warning on ``log``, when Redis does not answer or
    refuses us (the next tick looks again)."""
    version = store.newest_complete_version()
    if version is None:
        return None
    lost = redis.sensor_check(lost_redis_version, log, f"whether Redis still serves embedding version {version}")
    return None if lost is None else (f"documents-redis-lost-{version}", lost)


@dg.sensor(
    job=document_embeddings_job,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Every minute: run the embedding sync when documents were added, modified or deleted since the last "
    "request, or Redis lost the embeddings, and no sync is running (once embedding_model has been materialized).",
)
def documents_changed(context: dg.SensorEvaluationContext, documents: DocumentStoreResource, redis: RedisResource):
    """Run the incremental sync when documents were added, modified or deleted since the last request, and a
    rebuild when Redis lost the embedding version a sync completed."""
    active = context.instance.get_runs(
        dg.RunsFilter(job_name=document_embeddings_job.name, statuses=ACTIVE_RUN_STATUSES), limit=1
    )
    if active:
        return dg.SkipReason(f"a sync is already running ({active[0].run_id[:8]}); it will pick the changes up")
    if not has_embedder(context.instance):
        # The run would fail at once; the cursor stays, so the first tick after the model's materialization syncs.
        return dg.SkipReason(NO_EMBEDDER)
    store = documents.store()
    latest = store.latest_change()
    if latest is None:
        return dg.SkipReason("no documents yet")
    marker = latest.isoformat()
    if store.stable_horizon() <= latest:
        # A transaction older than the newest change is still open: the sync stops short of it, and its rows will
        # commit dated before ``latest``, leaving the newest change as it is. Marked unsettled, so that its commit
        # changes the marker and gets a sync of its own.
        marker += UNSETTLED
    if context.cursor == marker:
        # The cursor moved when the sync was requested: a sync that failed would leave these changes to 04:00.
        if retry := sync_retry_key(context.instance, time.time()):
            return dg.RunRequest(run_key=retry)
        if lost := lost_version_key(EmbeddingStore(documents.url), redis, context.log):
            run_key, why = lost
            context.log.info(f"{why}, though a sync completed it: rebuilding it from the offline store")
            return dg.RunRequest(run_key=run_key)
        return dg.SkipReason(f"no document changed since {marker}")
    context.update_cursor(marker)
    return dg.RunRequest(run_key=f"documents-{marker}")


class QuarantineRetentionConfig(dg.Config):
    retention_days: int = Field(
        30, description="The rows docs load quarantined more than these days ago are deleted; 0 keeps every row."
    )


@dg.op(description="Delete the document loads' quarantined rows past their retention.")
def expire_document_quarantine(
    context: dg.OpExecutionContext, config: QuarantineRetentionConfig, documents: DocumentStoreResource
) -> None:
    before = retention_start(
        context.log.info, config.retention_days, "document quarantine", "every quarantined row is kept"
    )
    if before is None:
        return
    deleted = documents.store().expire_quarantine(before)
    context.log.info(f"deleted {deleted} quarantined document rows of loads before {before:%Y-%m-%d %H:%M} UTC")
