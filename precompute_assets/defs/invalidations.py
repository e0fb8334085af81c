"""A copy, in Dagster's storage, of what ``precompute cache invalidate`` took out of a published version.

Redis keeps that record beside the version (``KeySchema.invalidated``), and a publish of the version again (a
restore, a retry, a rollback) leaves out what it names. A Redis that lost its data lost the record too, and the
restore that follows (``ctr_restore_job``) wrote the invalidated values back. So the command also records the
members it added as an observation of the asset that publishes the kind (``keep``), and the publishers give every
member kept back to Redis (``give_back``) before they write the version.
"""

import logging

import dagster as dg
import redis
import redis.exceptions

from ..serving import KeySchema, Pointer
from ..serving.acl import acl_hint
from ..serving.invalidate import remember
from ..serving.publish import bucket_count

VERSION_KEY = "invalidated_version"  # observation metadata: the version
MEMBERS_KEY = "invalidated"  # observation metadata: the record's members (``k:KEY``, ``p:PREFIX``, ``b:BUCKET``)
PAGE = 1000  # observations of the asset read at a time


def keep(instance: dg.DagsterInstance, asset: str, version: str, members: list[str]) -> int:
    """Record on ``asset`` those of ``members`` (Redis's record of ``version`` after an invalidation) that no earlier
    ``keep`` recorded: each observation holds what was new, so a record Redis evicted between two invalidations loses
    nothing already kept. How many were new."""
    new = sorted(set(members) - set(kept(instance, asset, version)))
    if new:
        metadata = {VERSION_KEY: version, MEMBERS_KEY: dg.MetadataValue.json(new)}
        instance.report_runless_asset_event(dg.AssetObservation(asset_key=asset, metadata=metadata))
    return len(new)


def kept(instance: dg.DagsterInstance, asset: str, version: str) -> list[str]:
    """Every member the ``keep`` calls of ``version`` recorded on ``asset``, sorted; every observation is read."""
    found: set[str] = set()
    cursor = None
    while True:
        result = instance.fetch_observations(dg.AssetKey(asset), limit=PAGE, cursor=cursor)
        for record in result.records:
            observation = record.asset_observation
            metadata = observation.metadata if observation is not None else {}
            if getattr(metadata.get(VERSION_KEY), "value", None) == version:
                members = getattr(metadata.get(MEMBERS_KEY), "value", None)
                if isinstance(members, list):
                    found.update(str(member) for member in members)
        if not result.has_more:
            return sorted(found)
        cursor = result.cursor


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
    try:
        added = remember(client, schema, kind, Pointer(version, bucket_count(n_keys)), members)
    except redis.exceptions.NoPermissionError as error:  # a publisher user older than the record: as before it
        log.warning(f"{schema.invalidated(kind, version)}: not given back ({error}); {acl_hint(error)}; the version is "
                    "written whole, its invalidated keys too")  # fmt: skip
        return 0
    if added:
        log.warning(
            f"Redis no longer recorded {added} invalidations of {kind} version {version} (it lost its data since): "
            "given back from Dagster's storage, so their keys stay out of it"
        )
    return added
