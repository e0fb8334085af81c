"""The one place where the Dagster Definitions are assembled, from the environment when Dagster loads them.

``defs`` is what ``workspace.yaml`` points at: a ``@dg.definitions`` function, so the deployment's settings
(``PRECOMPUTE_TIMEZONE``, ``PRECOMPUTE_PARTITIONS_START``) are read and checked when the code location
loads, not when a module is imported. Call ``defs()`` for the Definitions.
"""

import warnings

import dagster as dg

from .defs.automation import build_cache_health_sensor, build_schedules, daily_precompute_job, refresh_precompute_job
from .defs.campaigns import (
    build_campaign_cleanup_schedule,
    build_campaign_schedules,
    campaign_budget,
    campaign_cleanup_job,
    campaign_ctr,
    campaign_launch_sensor,
    campaign_warming_job,
)
from .defs.demand import demand_model
from .defs.embeddings import document_embeddings, document_embeddings_job, documents_changed, embedding_model
from .defs.executors import executor_from_env
from .defs.experiment import selection_experiment
from .defs.models import ctr_model
from .defs.partitions import Partitions
from .defs.predictions import ctr_predictions
from .defs.publishing import SERVED_CHECKS, ctr_cache, ctr_restore_job
from .defs.query_logs import query_log_cleanup_job, query_logs, query_logs_job
from .defs.resources import build_resources
from .defs.selection import ad_demand, top_ads, traffic_profile
from .defs.settings import Settings, load_settings
from .defs.sources import ad_impressions, ads
from .defs.tasks import live_refresh_sensor, precompute_tasks_job, user_event_sensor
from .defs.user_events import (
    build_user_event_schedules,
    next_action_model,
    next_action_model_job,
    user_events,
    user_events_job,
)

ASSETS = [
    ads,
    ad_impressions,
    query_logs,
    traffic_profile,
    ad_demand,
    top_ads,
    demand_model,
    ctr_model,
    ctr_predictions,
    ctr_cache,
    embedding_model,
    document_embeddings,
    selection_experiment,
    user_events,
    next_action_model,
]
# On the dynamic "campaigns" partitions, which no deployment setting moves.
CAMPAIGN_ASSETS = [campaign_ctr, campaign_budget]


def build_definitions(settings: Settings, executor: dg.ExecutorDefinition | None = None) -> dg.Definitions:
    """Every asset, job, schedule, sensor and resource, on the partitions and in the timezone of ``settings``;
    ``executor`` runs every job's steps (None: Dagster's multiprocess default)."""
    partitions = Partitions.of_settings(settings)
    return dg.Definitions(
        assets=[*(partitions.move(asset) for asset in ASSETS), *CAMPAIGN_ASSETS],
        asset_checks=SERVED_CHECKS,
        jobs=[
            query_logs_job,
            daily_precompute_job,
            refresh_precompute_job,
            ctr_restore_job,
            query_log_cleanup_job,
            document_embeddings_job,
            campaign_warming_job,
            campaign_cleanup_job,
            user_events_job,
            next_action_model_job,
            precompute_tasks_job,
        ],
        sensors=[
            documents_changed,
            campaign_launch_sensor,
            build_cache_health_sensor(partitions.timezone, partitions=partitions),
            user_event_sensor,
            live_refresh_sensor,
        ],
        schedules=[
            *build_schedules(partitions),
            *build_campaign_schedules(partitions.timezone),
            build_campaign_cleanup_schedule(partitions.timezone),
            *build_user_event_schedules(partitions),
        ],
        resources=build_resources(settings),
        executor=executor,
    )


# Resolving Definitions copies every sensor that targets an op job, to bind the resources; Dagster's copy passes the
# sensor's owners ([] when it has none) to a beta parameter and so warns when the code location loads (seen at WARNING
# in the logs of dagster-webserver's code server and of dagster-daemon) about a parameter we never use.
SENSOR_OWNERS_BETA = "Parameter `owners` of initializer `SensorDefinition.__init__`"


def resolved(definitions: dg.Definitions) -> dg.Definitions:
    """``definitions`` with its repository resolved (Dagster caches it) without Dagster's warning about its own
    copies of our sensors (``SENSOR_OWNERS_BETA``); any other warning is shown."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=SENSOR_OWNERS_BETA, category=dg.BetaWarning)
        definitions.get_repository_def()
    return definitions


@dg.definitions
def defs() -> dg.Definitions:
    """The Definitions of this deployment, with its settings and executor read from the environment now."""
    return resolved(build_definitions(load_settings(), executor=executor_from_env()))
