"""A copy, in Dagster's storage, of what ``precompute cache invalidate`` took out of a published version.

Redis keeps that record beside the version (``KeySchema.invalidated``), and a publish of the version again (a
restore, a retry, a rollback) leaves out what it names. A Redis that lost its data lost the record too, and the
restore that follows (``ctr_restore_job``) wrote the invalidated values back. So the command also records the
version's members as an observation of the asset that publishes the kind, and the publishers give them back to Redis
(``give_back``) before they write the version.
"""

import logging

import dagster as dg
import redis

from ..serving import KeySchema, Pointer
from ..serving.invalidate import remember
from ..serving.publish import bucket_count

VERSION_KEY = "invalidated_version"  # observation metadata: the version
MEMBERS_KEY = "invalidated"  # observation metadata: the record's members (``k:KEY``, ``p:PREFIX``, ``b:BUCKET``)
MAX_OBSERVATIONS = 10_000  # observations of the asset read back, newest first, for one version's


def keep(instance: dg.DagsterInstance, asset: str, version: str, members: list[str]) -> None:
    """Record ``members``, the whole of Redis's record of ``version`` after an invalidation, on ``asset``."""
    metadata = {VERSION_KEY: version, MEMBERS_KEY: dg.MetadataValue.json(sorted(members))}
    instance.report_runless_asset_event(dg.AssetObservation(asset_key=asset, metadata=metadata))


def kept(instance: dg.DagsterInstance, asset: str, version: str) -> list[str]:
    """The members the newest ``keep`` of ``version`` recorded on ``asset`` (each records the whole set); none."""
    cursor, read = None, 0
    while read < MAX_OBSERVATIONS:
        result = instance.fetch_observations(dg.AssetKey(asset), limit=500, cursor=cursor)
        for record in result.records:
            observation = record.asset_observation
            metadata = observation.metadata if observation is not None else {}
            if getattr(metadata.get(VERSION_KEY), "value", None) == version:
                members = getattr(metadata.get(MEMBERS_KEY), "value", None)
                return [str(m) for m in members] if isinstance(members, list) else []
        read += len(result.records)
        if not result.has_more:
            break
        cursor = result.cursor
    return []


def give_back(
    instance: dg.DagsterInstance,
    client: redis.Redis,
    schema: KeySchema,
    *,
    asset: str,
    kind: str,
    version: str,
    n_keys: int,
    log: logging.Logger | dg.DagsterLogManager,
) -> int:
    """Before ``version`` of ``kind`` (``n_keys`` keys) is written: add to Redis's record of its invalidations what
    ``keep`` recorded and Redis no longer holds, so the write leaves those keys out. How many it gave back."""
    members = kept(instance, asset, version)
    if not members:
        return 0
    added = remember(client, schema, kind, Pointer(version, bucket_count(n_keys)), members)
    if added:
        log.warning(
            f"Redis no longer recorded {added} invalidations of {kind} version {version} (it lost its data since): "
            "given back from Dagster's storage, so their keys stay out of it"
        )
    return added
