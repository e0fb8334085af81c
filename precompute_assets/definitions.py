"""The one place where the Dagster Definitions are assembled."""

import dagster as dg

from .defs.automation import build_schedules, daily_precompute_job
from .defs.embeddings import document_embeddings, document_embeddings_job, documents_changed, embedding_model
from .defs.models import ctr_model
from .defs.predictions import ctr_predictions
from .defs.publishing import ctr_cache
from .defs.query_logs import query_log_cleanup_job, query_logs, query_logs_job
from .defs.resources import build_resources
from .defs.selection import ad_demand, top_ads, traffic_profile
from .defs.sources import ad_impressions, ads

defs = dg.Definitions(
    assets=[
        ads,
        ad_impressions,
        query_logs,
        traffic_profile,
        ad_demand,
        top_ads,
        ctr_model,
        ctr_predictions,
        ctr_cache,
        embedding_model,
        document_embeddings,
    ],
    jobs=[query_logs_job, daily_precompute_job, query_log_cleanup_job, document_embeddings_job],
    sensors=[documents_changed],
    schedules=build_schedules(),
    resources=build_resources(),
)
