"""The one place where the Dagster Definitions are assembled."""

from __future__ import annotations

import dagster as dg

from .defs.automation import build_schedules
from .defs.query_logs import query_log_cleanup_job, query_logs, query_logs_job
from .defs.resources import build_resources

defs = dg.Definitions(
    assets=[query_logs],
    jobs=[query_logs_job, query_log_cleanup_job],
    schedules=build_schedules(),
    resources=build_resources(),
)
