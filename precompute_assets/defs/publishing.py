"""Publishing: precomputed values into Redis as a new version, made current by one pointer flip."""

import dagster as dg
import pandas as pd

from ..serving import publish_version
from .partitions import daily_partitions
from .resources import RedisResource


class PublishConfig(dg.Config):
    ttl_hours: int = 48
    grace_seconds: int = 600


@dg.asset(
    partitions_def=daily_partitions,
    kinds={"redis"},
    group_name="publishing",
    retry_policy=dg.RetryPolicy(max_retries=3, delay=5, backoff=dg.Backoff.EXPONENTIAL),
)
def ctr_cache(
    context: dg.AssetExecutionContext, config: PublishConfig, ctr_predictions: pd.DataFrame, redis: RedisResource
) -> dg.MaterializeResult:
    """Write every prediction as a new version in pipelined batches with its TTL, then flip the pointer.

    A failure before the flip leaves readers on the previous version; the retry writes the version again.
    """
    version = f"{context.partition_key}.{context.run_id[:8]}"
    items = zip(ctr_predictions["ad_id"].tolist(), ctr_predictions["ctr"].tolist(), strict=True)
    result = publish_version(
        redis.client(),
        "ctr",
        version,
        items,
        n_keys=len(ctr_predictions),
        ttl_s=config.ttl_hours * 3600,
        grace_s=config.grace_seconds,
        schema=redis.schema(),
    )
    context.log.info(f"published {result.keys} keys as ctr version {version} ({result.keys_per_s:,.0f} keys/s)")
    return dg.MaterializeResult(
        metadata={
            "version": version,
            "previous_version": result.previous_version or "",
            "keys_written": result.keys,
            "bytes": result.bytes,
            "seconds": result.seconds,
            "keys_per_s": result.keys_per_s,
            "model_version": str(ctr_predictions["model_version"].iloc[0]) if len(ctr_predictions) else "",
        }
    )
