"""The code location the sensor-fault test loads into an in-process Dagster daemon: the real campaign sensor and
the jobs it targets, with the campaign registry at ``PRECOMPUTE_FAULT_REGISTRY_URL`` (the test's scratch database).
The other resources are never used: the test's instance only queues the requested runs."""

import dagster as dg

from precompute_assets.defs.campaigns import (
    campaign_budget,
    campaign_cleanup_job,
    campaign_ctr,
    campaign_launch_sensor,
    campaign_warming_job,
)
from precompute_assets.defs.resources import CampaignRegistryResource, LakeResource, ModelStoreResource, RedisResource

REGISTRY_URL_ENV = "PRECOMPUTE_FAULT_REGISTRY_URL"

defs = dg.Definitions(
    assets=[campaign_ctr, campaign_budget],
    jobs=[campaign_warming_job, campaign_cleanup_job],
    sensors=[campaign_launch_sensor],
    resources={
        "campaign_registry": CampaignRegistryResource(url=dg.EnvVar(REGISTRY_URL_ENV)),
        "redis": RedisResource(url="redis://127.0.0.1:9/0"),  # never reached: runs stay queued
        "lake": LakeResource(base_uri="/nonexistent-lake"),
        "model_store": ModelStoreResource(root="/nonexistent-models"),
    },
)
