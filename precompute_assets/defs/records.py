"""What the Dagster instance recorded: the metadata of an asset's newest materialization, and its materializations
newest first."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import dagster as dg


def newest_metadata(instance: dg.DagsterInstance, asset: str, partition: str | None = None) -> Mapping:
    """The metadata (``MetadataValue``s by key) of the newest materialization of ``asset`` (of its ``partition``,
    when given); empty when there is none."""
    key = dg.AssetKey(asset)
    records_filter = key if partition is None else dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition])
    records = instance.fetch_materializations(records_filter, limit=1).records
    return metadata_of(records[0]) if records else {}


def metadata_of(record: dg.EventLogRecord) -> Mapping:
    """The metadata of a materialization ``record``; empty for a record of no materialization."""
    return record.asset_materialization.metadata if record.asset_materialization else {}


def materializations(instance: dg.DagsterInstance, asset: str, *, page: int = 100) -> Iterator[dg.EventLogRecord]:
    """Every materialization of ``asset``, newest first, read ``page`` at a time as they are consumed: a search for
    the newest of some kind reads only as far back as it has to, however many others came after it."""
    cursor = None
    while True:
        result = instance.fetch_materializations(dg.AssetKey(asset), limit=page, cursor=cursor)
        yield from result.records
        if not result.has_more:
            return
        cursor = result.cursor
