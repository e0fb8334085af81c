"""Publishing: precomputed values into Redis as a new version, made current by one pointer flip."""

import hashlib
import re
import time
from datetime import UTC, datetime
from typing import NamedTuple

import dagster as dg
import numpy as np
import pandas as pd
import redis
import redis.exceptions as redis_errors
from pydantic import Field

from ..serving import Experiment, KeySchema, Pointer, publish_version
from ..serving.events import server_mark
from ..serving.keys import EMBEDDING_KIND
from ..serving.publish import IncompleteVersionError, missing_buckets, sampled_buckets
from ..stack import ENV_LAKE
from ..sync.embeddings import lost_redis_version
from .experiment import carried_experiment, experiment_metadata, selected_experiment
from .freshness import CTR_CACHE_FRESHNESS
from .invalidations import give_back
from .models import CTR_MODEL
from .partitions import DEFAULT_PARTITIONS
from .records import materializations, metadata_of, newest_metadata
from .resources import LakeResource, RedisResource, out_of_memory
from .runs import SERVER_MARK_TAG

DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
# How long a replaced version stays readable after a flip, for every kind we publish (ctr, doc_embedding):
# a reader that fetched the old pointer a moment ago still finds its buckets.
GRACE_SECONDS = 600
ROLLED_BACK_OVER = "rolled_back_over"  # metadata: the day a rollback replaced
ROLLED_BACK_TO = "rolled_back_to"  # metadata, beside it: the day the rollback published (older, or the same)
# The kinds whose versions are published by a materialization: the asset that records each publish, and the metadata
# field of its materialization naming the version it made current.
PUBLISHED_KINDS = {"ctr": ("ctr_cache", "version"), EMBEDDING_KIND: ("document_embeddings", "redis_version")}
SERVED_CHECK = "served_by_redis"  # the check, on each of those assets, that Redis still serves what it published


class PublishConfig(dg.Config):
    ttl_hours: int = Field(48, description="TTL of the published version's keys (at least 1).")
    grace_seconds: int = Field(
        GRACE_SECONDS,
        description="Seconds the replaced version lives on after the flip, for readers holding it (0: none).",
    )
    rollback: bool = Field(
        False,
        description="Publish this day's predictions even though a newer day's version is current: how an operator "
        "goes back to an earlier day after a bad publish (README: Going back to an earlier day).",
    )


@dg.asset(
    partitions_def=DEFAULT_PARTITIONS.daily,
    kinds={"redis"},
    group_name="publishing",
    description="The day's ctr_predictions served from Redis: one version of keys with their TTL, made current by one "
    "pointer flip (with the day's A/B experiment, if any). A re-run of an older day never replaces a newer day's "
    "version unless its config says rollback: true.",
    retry_policy=dg.RetryPolicy(max_retries=3, delay=5, backoff=dg.Backoff.EXPONENTIAL),
    pool="redis_publish",
    freshness_policy=CTR_CACHE_FRESHNESS,
)
def ctr_cache(
    context: dg.AssetExecutionContext, config: PublishConfig, ctr_predictions: pd.DataFrame, redis: RedisResource
) -> dg.MaterializeResult:
    """Write every prediction as a new version in pipelined batches with its TTL, then flip the pointer, with the
    A/B experiment the day's ``top_ads`` selected with (none ends the previous one) in the same transaction.

    The version is named by the day and what it serves (``content_version``). A failure before the flip leaves
    readers on the previous version, and the retry writes the version again; a retry or re-execution after the flip
    (its run failed once the flip had landed) finds its version current and only records and settles it.
    """
    if problem := publish_config_problem(config):
        raise dg.Failure(description=problem, allow_retries=False)  # the same run config fails the same way again
    client, schema = redis.client(), redis.schema()
    # The pointer, or, when Redis lost it (or failed over to an older one), the newest publish Dagster recorded: a
    # backfill of an older day published over a lost newer one, and cache_health then never restored the newer day.
    raw_pointer = client.get(schema.pointer("ctr"))
    newer = newer_current_version(raw_pointer, context.partition_key) or newer_recorded(
        context.instance, context.partition_key
    )
    held, held_to = rollback_hold(context.instance)
    carried = {ROLLED_BACK_OVER: held, **({ROLLED_BACK_TO: held_to} if held_to else {})} if held else {}
    if newer is not None and config.rollback:
        context.log.warning(f"rollback: {newer} (a newer day) gives way to the predictions of {context.partition_key}")
    elif newer is not None:
        # A backfill of an older day must not replace the predictions of a newer one.
        context.log.warning(f"not published: {newer} (a newer day) is current")
        return dg.MaterializeResult(metadata={"published": False, "current_version": newer, "keys_written": 0,
                                              **carried})  # fmt: skip
    elif held is not None and not config.rollback and context.partition_key <= held:
        # An operator rolled the day back: a refresh (cache_health) or re-run must not publish it again by itself.
        current = Pointer.decode_or_none(raw_pointer)
        if current is not None and version_day(current.version) == context.partition_key:  # the day rolled back to
            context.log.info(
                f"not published: {context.partition_key}'s version {current.version} is current, the day an operator "
                f"rolled {held} back to; config rollback: true publishes it again"
            )
        else:
            context.log.warning(f"not published: an operator rolled {held} back; publish it with config rollback: true")
        return dg.MaterializeResult(metadata={"published": False, **carried, "keys_written": 0})
    if problem := not_probabilities(ctr_predictions):
        # Wrong values would be served as they are; the predictions on disk do not change by retrying.
        raise dg.Failure(description=f"nothing published: {problem}", allow_retries=False)
    if problem := not_the_days_verdict(context.instance, context.partition_key, ctr_predictions):
        raise dg.Failure(description=f"nothing published: {problem}", allow_retries=False)
    items = zip(ctr_predictions["ad_id"].tolist(), ctr_predictions["ctr"].tolist(), strict=True)
    try:
        experiment = carried_experiment(
            ctr_predictions, lambda: selected_experiment(context.instance, context.partition_key)
        )
    except ValueError as error:
        raise dg.Failure(description=f"nothing published: ctr_predictions: {error}", allow_retries=False) from None
    version = content_version(context.partition_key, ctr_predictions, experiment)
    writes_from = time.time()  # the buckets' TTL runs from their writes
    try:
        give_back(context.instance, client, schema, asset="ctr_cache", kind="ctr", version=version,
                  n_keys=len(ctr_predictions), log=context.log)  # fmt: skip
        result = publish_version(
            client,
            "ctr",
            version,
            items,
            n_keys=len(ctr_predictions),
            ttl_s=config.ttl_hours * 3600,
            grace_s=config.grace_seconds,
            schema=schema,
            experiment=experiment,
            replica_wait_s=redis.replica_wait_s,
            hand_over=not config.rollback,  # also on its retry: the newer day's values must not live on
        )
    except redis_errors.OutOfMemoryError as error:
        # A full server refuses writes (maxmemory reached, and its policy has nothing with a TTL to evict, or is
        # noeviction). The version replaced by an earlier flip may free room when its grace ends: still retried.
        raise dg.Failure(description=out_of_memory(client, error)) from None
    except IncompleteVersionError as error:
        # Evicted at maxmemory: a retry writes the same version into the same memory and evicts what is left (the
        # serving version's buckets, live values, the version in its grace) three more times.
        raise dg.Failure(description=str(error), allow_retries=not error.evicted) from None
    except ValueError as error:  # keys it refuses before writing (given twice, malformed): a retry sends the same
        raise dg.Failure(description=f"nothing published: {error}", allow_retries=False) from None
    over = newer
    if config.rollback and over is None and result.already_current:
        # A retry of a rollback whose flip landed: the version it replaced is the one its flip remembered, or, once
        # that record's grace ended, the newest publish of a later day Dagster recorded.
        over = newer_current_version(client.get(schema.previous("ctr")), context.partition_key) or published_after(
            context.instance, context.partition_key
        )
    over_day = None if over is None else version_day(over)
    if config.rollback and held is not None and context.partition_key < held:
        # a rollback to a day before the one held back (its predictions published again, say) keeps the hold
        over_day = max(over_day or held, held)
    if result.already_current:
        context.log.info(f"ctr version {version} (these predictions) is current already: recorded, not published twice")
    else:
        context.log.info(f"published {result.keys} keys as ctr version {version} ({result.keys_per_s:,.0f} keys/s)")
    if result.handed_over:
        context.log.info(f"handed {result.handed_over} keys of the version before to probation's live tier")
    if result.settle_error:
        context.log.warning(f"probation's live tier was not settled after the flip: {result.settle_error}")
    if experiment is not None:
        context.log.info(f"serving experiment {experiment.name}: arms {', '.join(experiment.arms)}")
    # A version found current was not written again (only the buckets a failover lost, ``mended``): no bytes or
    # throughput to plot beside real publishes. An empty version (read-through only) measured no throughput either.
    written = {} if result.already_current else {"bytes": result.bytes}
    if result.keys and not result.already_current:
        written["keys_per_s"] = result.keys_per_s
    return dg.MaterializeResult(
        metadata={
            "published": True,
            "already_current": result.already_current,
            "version": version,
            # when the version's buckets expire (a retry of the current version renews them): a restore after then
            # would serve predictions older than ttl_hours again (``expired_at``)
            "expires_at": dg.MetadataValue.timestamp(writes_from + config.ttl_hours * 3600),
            # each left out rather than shown as a blank value in the UI: a first publish replaced no version, an
            # empty version (read-through only) has no model, and the settling of probation's live tier went well
            **({"previous_version": result.previous_version} if result.previous_version else {}),
            "keys_written": result.mended if result.already_current else result.keys,
            **written,
            "seconds": result.seconds,
            **({"model_version": str(ctr_predictions["model_version"].iloc[0])} if len(ctr_predictions) else {}),
            **experiment_metadata(experiment),  # selection_experiment credits the version's queries to it
            "handed_over": result.handed_over,
            **({"settle_error": result.settle_error} if result.settle_error else {}),
            **({ROLLED_BACK_OVER: over_day, ROLLED_BACK_TO: context.partition_key} if over_day is not None else {}),
        }
    )


MAX_EXPIRE_S = 10**15  # Redis refuses an EXPIRE whose time in ms from the epoch overflows 64 bits (about 9.2e15 s)


def publish_config_problem(config: PublishConfig) -> str | None:
    """Why ``config`` cannot publish, or None. Redis deletes a key whose expiry is not in the future: with
    ``ttl_hours`` 0 every bucket vanished as it was written, and the publish failed as if Redis had evicted them. One
    past what Redis takes failed at its EXPIRE, for ``grace_seconds`` after the flip, and every retry again."""
    return expiry_problem("ttl_hours", config.ttl_hours, 1, 3600) or expiry_problem(
        "grace_seconds", config.grace_seconds, 0, 1
    )


def expiry_problem(name: str, value: int, least: int, unit_s: int) -> str | None:
    """Why a config's ``name`` (``value`` units of ``unit_s`` seconds) is not an expiry Redis takes, or None."""
    if least <= value <= MAX_EXPIRE_S // unit_s:
        return None
    return f"{name} must be from {least} to {MAX_EXPIRE_S // unit_s}, got {value}"


def rolled_back_over(instance: dg.DagsterInstance) -> str | None:
    """The day an operator's rollback replaced, while the newest ``ctr_cache`` materialization still carries it
    (the rollback's own, or a publish refused since): until a later day publishes, that day and older ones are
    published only with ``rollback: true``."""
    return rollback_hold(instance)[0]


def rollback_hold(instance: dg.DagsterInstance) -> tuple[str | None, str | None]:
    """``rolled_back_over`` and the day that rollback published (``rolled_back_to``; None for a hold recorded before
    it was kept, or for no hold): the days between them were backed out of too."""
    metadata = newest_metadata(instance, "ctr_cache")
    over, to = (metadata[name].value if name in metadata else None for name in (ROLLED_BACK_OVER, ROLLED_BACK_TO))
    return over, to if over is not None else None


def version_day(version: str) -> str:
    """The day a ctr version was published for: ``content_version`` puts it first."""
    return version.split(".", 1)[0]


def content_version(day: str, predictions: pd.DataFrame, experiment: Experiment | None) -> str:
    """``{day}.{digest}``: the same predictions (in any row order) with the same experiment name the same version,
    so publishing them again is recognised; anything else, a new one. The day comes first: ``newer_current_version``
    reads it back."""
    rows = predictions[["ad_id", "ctr"]].astype({"ad_id": str, "ctr": "float32"}).sort_values("ad_id", kind="stable")
    digest = hashlib.sha256(pd.util.hash_pandas_object(rows, index=False).to_numpy().tobytes())
    digest.update(b"" if experiment is None else experiment.encode())
    return f"{day}.{digest.hexdigest()[:16]}"


def not_probabilities(predictions: pd.DataFrame) -> str | None:
    """Why ``predictions``' ``ctr`` values cannot be served (some are not finite numbers in [0, 1]), or None.
    ``ctr_predictions``' check ``valid_ctr`` tests them when they are made; this tests what the lake gives back."""
    values = pd.to_numeric(predictions["ctr"], errors="coerce").to_numpy(dtype=float)
    bad = ~np.isfinite(values) | (values < 0) | (values > 1)
    if not bad.any():
        return None
    examples = ", ".join(
        f"{ad}: {value}" for ad, value in zip(predictions["ad_id"][bad][:3], predictions["ctr"][bad][:3], strict=True)
    )
    return f"{int(bad.sum())} of {len(values)} predictions are not probabilities in [0, 1] ({examples})"


def newer_current_version(raw_pointer: bytes | None, partition: str) -> str | None:
    """The current version if it was published for a later day than ``partition``, else None."""
    if (pointer := Pointer.decode_or_none(raw_pointer)) is None:  # none, or malformed: it serves no newer day
        return None
    current = pointer.version
    day = version_day(current)
    return current if DAY.fullmatch(day) and day > partition else None


def newer_recorded(instance: dg.DagsterInstance, partition: str) -> str | None:
    """The ctr version the newest recorded publish made current if it is of a later day than ``partition``."""
    recorded = recorded_publish(instance, "ctr")
    if recorded is None:
        return None
    day = version_day(recorded.version)
    return recorded.version if DAY.fullmatch(day) and day > partition else None


def not_the_days_verdict(instance: dg.DagsterInstance, partition: str, predictions: pd.DataFrame) -> str | None:
    """Why ``predictions`` of ``partition`` must not be published: the newest ``ctr_model`` materialization of the
    day (its verdict) rejects it, or approved another model version than the one that made them (the predictions on
    disk predate a re-run of the day's model); None when they are its approved model's, or the day records no
    verdict, or there are none (read-through only). The restore refuses the same (``rejected_since``)."""
    metadata = newest_metadata(instance, CTR_MODEL, partition)
    if not len(predictions) or "approved" not in metadata or "model_version" not in predictions.columns:
        return None
    verdict, made_by = str(metadata["model_version"].value), sorted(set(predictions["model_version"].astype(str)))
    if not metadata["approved"].value:
        return f"ctr_model {verdict} of {partition} failed beats_baseline since these predictions were made"
    if made_by != [verdict]:
        return (f"the predictions of {partition} were made by ctr_model {', '.join(made_by)}, and the day's approved "
                f"ctr_model is {verdict} now: materialize ctr_predictions again")  # fmt: skip
    return None


class RecordedPublish(NamedTuple):
    """The version the newest publish of a kind made current, and the newest materialization of its asset."""

    version: str
    newest: dg.EventLogRecord
    empty: bool  # published without values (read-through only): no bucket of it is ever in Redis
    expires_at: float | None = None  # when its buckets' TTL ends (ctr publishes recorded since it is recorded)


def recorded_publish(instance: dg.DagsterInstance, kind: str) -> RecordedPublish | None:
    """The version the newest publish of ``kind`` (``PUBLISHED_KINDS``) made current, with the newest materialization
    of its asset (what a check evaluated now is about); None when none published. Refused runs (a backfill of older
    days, a refresh held by a rollback) record no version: the search pages back past any number of them. A ctr
    version is empty when its publish recorded no ``model_version`` (no predictions, so no model)."""
    asset, field = PUBLISHED_KINDS[kind]
    newest = None
    for record in materializations(instance, asset):
        newest = newest or record
        metadata = metadata_of(record)
        if field in metadata:
            empty = kind == "ctr" and "model_version" not in metadata
            expires = metadata.get("expires_at")
            return RecordedPublish(
                str(metadata[field].value), newest, empty, None if expires is None else expires.value
            )
    return None


def published_after(instance: dg.DagsterInstance, day: str) -> str | None:
    """The ctr version the newest publish of a day after ``day`` made current (the one a rollback to ``day``
    replaced), or None."""
    for record in materializations(instance, "ctr_cache"):
        metadata = metadata_of(record)
        if "version" in metadata and version_day(version := str(metadata["version"].value)) > day:
            return version
    return None


def lost_in_redis(client: redis.Redis, schema: KeySchema, kind: str, recorded: RecordedPublish) -> str | None:
    """Why Redis serves no version of ``kind``, or None: its pointer is gone (a restart without persistence, a flush,
    a failover to an empty replica), or the pointer's version lost its values: for embeddings its marker, for the
    other kinds its first or last bucket (``publish.missing_buckets``; expired, as a version's buckets do ``ttl_hours``
    after its publish while its pointer has no TTL, or evicted). ``recorded`` is the publish Dagster recorded: an
    empty version was published without values, so none are missing."""
    empty_version = recorded.version if recorded.empty else None
    if kind == EMBEDDING_KIND:
        return lost_redis_version(client, schema)
    raw = client.get(schema.pointer(kind))
    if raw is None:
        return f"Redis holds no {kind} version"
    try:
        pointer = Pointer.decode(raw)
    except ValueError as error:
        return f"Redis's {kind} pointer is unreadable ({error})"
    if pointer.version == empty_version or not (gone := missing_buckets(client, schema, kind, pointer)):
        return None
    looked_at = len(sampled_buckets(pointer))
    return (
        f"Redis's {kind} pointer names version {pointer.version}, whose values are gone ({gone} of {looked_at} "
        "buckets looked at are missing: expired or evicted)"
    )


RESTORE_MIN_TTL_S = 600  # a version closer to its expiry than this is not restored: its buckets would go as written


def expired_at(recorded: RecordedPublish, now: float | None = None) -> str | None:
    """When the TTL of ``recorded``'s buckets ended (UTC, as text), or None while it has not (or is not recorded):
    values gone after then expired as configured, and restoring them would serve predictions older than
    ``ttl_hours``; a newer publish is what serves again."""
    if recorded.expires_at is None or (time.time() if now is None else now) < recorded.expires_at:
        return None
    return datetime.fromtimestamp(recorded.expires_at, UTC).strftime("%Y-%m-%d %H:%M UTC")


def unserved(client: redis.Redis, schema: KeySchema, kind: str, recorded: RecordedPublish) -> str | None:
    """Why Redis does not serve ``recorded``, the version of ``kind`` Dagster recorded as published, or None: its
    values are lost (``lost_in_redis``; expired when its TTL ended, ``expired_at``), or the ctr pointer names another
    version (a failover back to a replica that missed the flip, a publish outside this deployment's record), which
    readers were served without a word (h_feast)."""
    if (why := lost_in_redis(client, schema, kind, recorded)) is not None:
        if (when := expired_at(recorded)) is not None:
            return (
                f"{why}: version {recorded.version} expired at {when} (its ttl_hours), and no newer one was published"
            )
        if (when := expired_at(recorded, time.time() + RESTORE_MIN_TTL_S)) is not None:  # as restore_request judges
            return (
                f"{why}: version {recorded.version} expires at {when} (its ttl_hours), too soon to restore it, and no "
                "newer one was published"
            )
        return why
    return foreign_pointer(client, schema, recorded) if kind == "ctr" else None


def lost_publish(instance: dg.DagsterInstance, client: redis.Redis, schema: KeySchema, kind: str) -> str | None:
    """One line saying that the version of ``kind`` Dagster recorded as published is not served by Redis, or None
    (also when nothing was published yet)."""
    recorded = recorded_publish(instance, kind)
    if recorded is None:
        return None
    if (why := unserved(client, schema, kind, recorded)) is None:
        return None
    asset, _ = PUBLISHED_KINDS[kind]
    return f"{kind}: {why}, although {asset} recorded publishing version {recorded.version}"


def lost_publishes(instance: dg.DagsterInstance, client: redis.Redis, schema: KeySchema) -> list[str]:
    """``lost_publish`` of every published kind that has one."""
    return [line for kind in PUBLISHED_KINDS if (line := lost_publish(instance, client, schema, kind))]


def served_state(
    instance: dg.DagsterInstance, client: redis.Redis, schema: KeySchema, kind: str
) -> tuple[bool, str, dg.EventLogRecord | None]:
    """Whether Redis serves the version of ``kind`` Dagster recorded as published (True also before any publish),
    saying so, with the newest materialization of its asset."""
    recorded = recorded_publish(instance, kind)
    if recorded is None:
        return True, f"no {kind} version published yet", None
    version, newest = recorded.version, recorded.newest
    if (why := unserved(client, schema, kind, recorded)) is not None:
        return False, f"{why}, although this asset recorded publishing version {version}", newest
    return True, f"Redis serves a {kind} version (this asset last published {version})", newest


def served_evaluation(
    instance: dg.DagsterInstance, client: redis.Redis, schema: KeySchema, kind: str
) -> dg.AssetCheckEvaluation:
    """``SERVED_CHECK`` of ``kind``'s asset as a sensor reports it: about the asset's newest materialization."""
    from dagster._core.definitions.asset_checks.asset_check_evaluation import (
        AssetCheckEvaluationTargetMaterializationData,
    )

    passed, description, newest = served_state(instance, client, schema, kind)
    target = None
    if newest is not None:
        target = AssetCheckEvaluationTargetMaterializationData(
            storage_id=newest.storage_id, run_id=newest.run_id, timestamp=newest.timestamp
        )
    return dg.AssetCheckEvaluation(
        asset_key=dg.AssetKey(PUBLISHED_KINDS[kind][0]), check_name=SERVED_CHECK, passed=passed,
        severity=dg.AssetCheckSeverity.ERROR, description=description, target_materialization_data=target,
        metadata={},
    )  # fmt: skip


def changed_served_evaluations(
    instance: dg.DagsterInstance, client: redis.Redis, schema: KeySchema
) -> list[dg.AssetCheckEvaluation]:
    """``served_evaluation`` of each published kind whose verdict differs from its check's last stored one (none
    stored counts as passed): reported once when Redis loses a version, and once when it serves one again. A last
    record that is no verdict (planned by a run that ended without evaluating it: a daily run that failed before its
    publish) is replaced by one at once: the UI showed the check red, "Execution failed", while Redis served the
    version, until a later run evaluated it."""
    from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus as Status

    keys = [dg.AssetCheckKey(dg.AssetKey(asset), SERVED_CHECK) for asset, _ in PUBLISHED_KINDS.values()]
    latest = instance.event_log_storage.get_latest_asset_check_execution_by_key(keys)
    changed = []
    for kind, key in zip(PUBLISHED_KINDS, keys, strict=True):
        evaluation = served_evaluation(instance, client, schema, kind)
        record = latest.get(key)
        status = Status.SUCCEEDED if record is None else record.status
        if status == Status.PLANNED:  # no verdict yet: a run evaluating it now has the word, a finished one none
            run = instance.get_run_by_id(record.run_id)
            if run is not None and not run.is_finished:
                continue
            changed.append(evaluation)
        elif (status == Status.SUCCEEDED) != evaluation.passed:
            changed.append(evaluation)
    return changed


def build_served_check(kind: str) -> dg.AssetChecksDefinition:
    """``SERVED_CHECK`` on the asset that publishes ``kind``: fails when Redis lost the version it recorded."""
    asset, _ = PUBLISHED_KINDS[kind]

    @dg.asset_check(
        asset=asset,
        name=SERVED_CHECK,
        description=f"Redis still serves the {kind} version this asset published: fails when its pointer is gone "
        "(Redis restarted without its data, was flushed or failed over to an empty replica) or names a version "
        "whose values are gone ("
        + ("its marker key" if kind == EMBEDDING_KIND else "its first or last bucket: expired, or evicted")
        + ")"
        + ("" if kind == EMBEDDING_KIND else ", or names another version than the one it recorded")
        + ". The cache_health sensor evaluates it every 5 minutes and reports each change.",
    )
    def served(context: dg.AssetCheckExecutionContext, redis: RedisResource) -> dg.AssetCheckResult:
        passed, description, _ = served_state(context.instance, redis.client(), redis.schema(), kind)
        return dg.AssetCheckResult(passed=passed, severity=dg.AssetCheckSeverity.ERROR, description=description)

    return served


SERVED_CHECKS = [build_served_check(kind) for kind in PUBLISHED_KINDS]


# --- restoring a lost version --------------------------------------------------------------------------


class RestoreConfig(dg.Config):
    ttl_hours: int = Field(
        48,
        description="TTL of the restored version's keys, from the restore (at least 1), but never past the expiry "
        "its publish set (ctr_cache's ttl_hours).",
    )


def foreign_pointer(client: redis.Redis, schema: KeySchema, recorded: RecordedPublish) -> str | None:
    """Why Redis's ctr pointer is not one a restore of ``recorded`` may write over (unreadable, or naming another
    version: someone published since, outside this deployment's record), or None (it is gone or names that version)."""
    raw = client.get(schema.pointer("ctr"))
    try:
        current = None if raw is None else Pointer.decode(raw).version
    except ValueError as error:
        return f"Redis's ctr pointer is not one we wrote ({error})"
    if current not in (None, recorded.version):
        return f"Redis's ctr pointer names version {current}, not {recorded.version}, the one ctr_cache last published"
    return None


def served_ctr_version(instance: dg.DagsterInstance, client: redis.Redis, schema: KeySchema) -> RecordedPublish:
    """The ctr publish to restore: the one ``ctr_cache`` last recorded (the approved version, or the one an operator
    rolled back to), when Redis's pointer is gone or names that same version; ``dg.Failure`` otherwise."""
    recorded = recorded_publish(instance, "ctr")
    if recorded is None:
        raise dg.Failure(description="ctr_cache never published a ctr version: nothing to restore", allow_retries=False)
    if (why := foreign_pointer(client, schema, recorded)) is not None:  # retried, it would fail alike
        raise dg.Failure(description=f"{why}: nothing restored over it", allow_retries=False)
    if (why := rejected_since(instance, recorded)) is not None:
        raise dg.Failure(description=f"ctr version {recorded.version} is not restored: {why}", allow_retries=False)
    return recorded


def rejected_since(instance: dg.DagsterInstance, recorded: RecordedPublish) -> str | None:
    """Why the ctr version ``recorded`` must not be published again: the newest ``ctr_model`` materialization of
    its day rejects the day (a re-run that failed ``beats_baseline``: the day's verdict), so its predictions are no
    longer to be served; None when it does not (or records no verdict), and for an empty version, which no model
    made."""
    metadata = {} if recorded.empty else newest_metadata(instance, CTR_MODEL, version_day(recorded.version))
    if "approved" not in metadata or metadata["approved"].value:
        return None
    return f"its day's ctr_model {metadata['model_version'].value} failed beats_baseline since"


@dg.op(
    retry_policy=dg.RetryPolicy(max_retries=3, delay=5, backoff=dg.Backoff.EXPONENTIAL),
    pool="redis_publish",
    description="Publish again the ctr version ctr_cache last published (the approved one, or the one an operator "
    "rolled back to) from its day's ctr_predictions, when Redis lost it: only if they still make exactly that version. "
    "A version whose pointer survived gets back only its missing buckets, and every bucket's TTL anew.",
)
def restore_ctr_version(
    context: dg.OpExecutionContext, config: RestoreConfig, lake: LakeResource, redis: RedisResource
) -> None:
    # An op, not a ctr_cache materialization: the newest materialization carries an operator's rollback hold
    # (rolled_back_over), and its time is ctr_cache's freshness; a restore changes neither. It is an observation.
    if problem := expiry_problem("ttl_hours", config.ttl_hours, 1, 3600):
        raise dg.Failure(description=problem, allow_retries=False)
    client = redis.client()
    try:
        restore_served_version(context, config, lake, redis, client)
    finally:
        client.close()


def restored_ttl_s(config: RestoreConfig, recorded: RecordedPublish, now: float | None = None) -> int:
    """The TTL a restore gives ``recorded``'s buckets: ``ttl_hours``, but never past the expiry its publish set (a
    restore gave a version a day from expiry a fresh 48 hours, and readers got day-old predictions for good while
    the nightly publish failed, h_feast)."""
    ttl_s = config.ttl_hours * 3600
    if recorded.expires_at is not None:
        ttl_s = min(ttl_s, int(recorded.expires_at - (time.time() if now is None else now)))
    return max(1, ttl_s)


def restore_served_version(
    context: dg.OpExecutionContext, config: RestoreConfig, lake: LakeResource, redis: RedisResource, client: redis.Redis
) -> None:
    """``restore_ctr_version``'s work on ``client``."""
    schema = redis.schema()
    recorded = served_ctr_version(context.instance, client, schema)
    served = recorded.version
    if (why := lost_in_redis(client, schema, "ctr", recorded)) is None:
        context.log.info(f"Redis serves ctr version {served} whole: nothing to restore")
        return
    if (when := expired_at(recorded, time.time() + RESTORE_MIN_TTL_S)) is not None:
        raise dg.Failure(
            description=f"ctr version {served} expires at {when} (its ttl_hours; past, or less than "
            f"{RESTORE_MIN_TTL_S // 60} minutes away): nothing restored, as that would serve predictions older than "
            "ttl_hours; publish a newer day with ctr_cache",
            allow_retries=False,
        )
    context.log.info(f"restoring ctr version {served}: {why}")
    mark = server_mark(client)  # before the writes: evictions while they run are evictions after the restore too
    day = version_day(served)
    try:
        predictions = lake.lake().read("ctr_predictions", day)
    except FileNotFoundError as error:  # a lake restored from an older backup, or wiped: no retry brings it back
        raise dg.Failure(
            description=f"nothing restored: {error}, from which version {served} was published: restore the lake "
            f"({ENV_LAKE}) from a backup taken after that publish, or publish a day with ctr_cache",
            allow_retries=False,
        ) from None
    try:
        experiment = carried_experiment(predictions, lambda: selected_experiment(context.instance, day))
    except ValueError as error:
        raise dg.Failure(
            description=f"nothing restored: ctr_predictions of {day}: {error}", allow_retries=False
        ) from None
    version = content_version(day, predictions, experiment)
    if version != served:
        raise dg.Failure(
            description=f"the lake's ctr_predictions of {day} make version {version}, not {served}, the one served: "
            "they changed since its publish, so nothing was restored; publish them with ctr_cache instead",
            allow_retries=False,
        )
    items = zip(predictions["ad_id"].tolist(), predictions["ctr"].tolist(), strict=True)
    try:
        give_back(context.instance, client, schema, asset="ctr_cache", kind="ctr", version=version,
                  n_keys=len(predictions), log=context.log)  # fmt: skip
        result = publish_version(
            client, "ctr", version, items, n_keys=len(predictions), ttl_s=restored_ttl_s(config, recorded),
            grace_s=GRACE_SECONDS, schema=schema, experiment=experiment, replica_wait_s=redis.replica_wait_s,
            hand_over=False,  # the version it replaces, if any, is not one to serve live
        )  # fmt: skip
    except redis_errors.OutOfMemoryError as error:
        why = out_of_memory(client, error, "nothing restored", "Readers miss the lost version's keys meanwhile.")
        raise dg.Failure(description=why) from None
    except IncompleteVersionError as error:  # evicted at maxmemory: a retry evicts again
        raise dg.Failure(description=str(error), allow_retries=not error.evicted) from None
    written = result.mended if result.already_current else result.keys
    context.log.info(f"restored ctr version {version}: {written} keys written again")
    if mark is not None:  # cache_health tells evictions since from a restart
        context.instance.add_run_tags(context.run_id, {SERVER_MARK_TAG: mark})
    context.log_event(
        dg.AssetObservation(
            asset_key=dg.AssetKey(PUBLISHED_KINDS["ctr"][0]),
            partition=day,
            metadata={"restored": True, "version": version, "keys_written": written},
        )
    )


@dg.job(description="Publish again the ctr version Redis lost (cache_health requests it): see restore_ctr_version.")
def ctr_restore_job():
    restore_ctr_version()
