"""External sources written by the ad platform, not by Dagster: the ad catalog and daily impressions."""

import dagster as dg

from .partitions import DEFAULT_PARTITIONS

ads = dg.AssetSpec(
    "ads",
    description="Ad catalog (ad_id, campaign_id, category, quality, bid, text_len, created_day), in the lake.",
    group_name="sources",
    kinds={"pandas"},
)
ad_impressions = dg.AssetSpec(
    "ad_impressions",
    description="Impressions and clicks of one day (ts_ms, ad_id, clicked), written by the ad server.",
    partitions_def=DEFAULT_PARTITIONS.daily,
    group_name="sources",
    kinds={"pandas"},
)
