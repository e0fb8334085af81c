"""External sources written by the ad platform, not by Dagster: the ad catalog and daily impressions."""

import dagster as dg

from .partitions import DEFAULT_PARTITIONS

ads = dg.AssetSpec(
    "ads",
    description="Ad catalog in the lake: ad_id and the feature columns the lake resource names (by default the "
    "synthetic workload's quality, bid, text_len, category), written by `precompute ads load` or the workload.",
    group_name="sources",
    kinds={"pandas"},
)
ad_impressions = dg.AssetSpec(
    "ad_impressions",
    description="Impressions and clicks of one day (ts_ms, ad_id, clicked), written by the ad server or "
    "`precompute impressions load` (split into days by ts_ms in the deployment's timezone).",
    partitions_def=DEFAULT_PARTITIONS.daily,
    group_name="sources",
    kinds={"pandas"},
)
