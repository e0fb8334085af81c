"""Where a run's steps execute, chosen by ``PRECOMPUTE_EXECUTOR`` when the Definitions load: Dagster's own
executors, never a home-made worker pool.

- ``multiprocess`` (default): one child process per step on the run's machine, as before.
- ``in_process``: every step in the run's process (debugging; no parallelism).
- ``celery``: every step is a task on a Celery queue (``dagster``) in a Redis-compatible broker
  (``PRECOMPUTE_CELERY_BROKER_URL``; results in ``PRECOMPUTE_CELERY_BACKEND_URL``, default the broker), run by
  ``dagster-celery worker start`` processes on any machine that sees the lake, the model store and the
  environment of the code location.
- ``k8s``: every step is a Kubernetes Job (``dagster-k8s``), with the image, namespace and environment of the
  ``K8sRunLauncher`` of the instance; its config can be refined per run under ``execution.config``.

``precompute_tasks_job`` (one step, started by user events) always runs in its run's process: a step process
or task would only add start-up time between a user's action and the value.

Steps hand data over through the lake (the ``ParquetIOManager``), never through memory, and report to the
PostgreSQL instance: both must be reachable from every worker. The executor packages are imported only when
they are chosen.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import dagster as dg

from ..stack import redact
from .settings import SettingError

ENV_EXECUTOR = "PRECOMPUTE_EXECUTOR"
ENV_CELERY_BROKER = "PRECOMPUTE_CELERY_BROKER_URL"
ENV_CELERY_BACKEND = "PRECOMPUTE_CELERY_BACKEND_URL"
DEFAULT_EXECUTOR = "multiprocess"
EXECUTORS = ("multiprocess", "in_process", "celery", "k8s")
# The package each executor needs beyond dagster (pinned in constraints.txt).
PACKAGES = {"celery": "dagster-celery", "k8s": "dagster-k8s"}


def executor_for(name: str, **options: object) -> dg.ExecutorDefinition | None:
    """The executor called ``name`` (one of ``EXECUTORS``), configured with ``options``; None for
    ``multiprocess``, Dagster's default (``Definitions(executor=None)``). ``SettingError`` for an unknown name.

    ``options`` are the executor's config fields (``broker``, ``backend`` for celery; ``max_concurrent`` for
    multiprocess); a value may be ``{"env": "VARIABLE"}``, read where the run executes, as ``EnvVar`` is.
    """
    key = name.strip().lower().replace("-", "_")
    if key == "multiprocess":
        return dg.multiprocess_executor.configured(dict(options)) if options else None
    if key == "in_process":
        return dg.in_process_executor.configured(dict(options)) if options else dg.in_process_executor
    if key == "celery":
        celery_executor = _import(key, "dagster_celery", "celery_executor")
        return celery_executor.configured(dict(options)) if options else celery_executor
    if key == "k8s":
        k8s_job_executor = _import(key, "dagster_k8s", "k8s_job_executor")
        return k8s_job_executor.configured(dict(options)) if options else k8s_job_executor
    raise SettingError(
        f"{ENV_EXECUTOR}={name!r} is not an executor: use one of {', '.join(EXECUTORS)} (default {DEFAULT_EXECUTOR})"
    )


def executor_from_env(environ: Mapping[str, str] | None = None) -> dg.ExecutorDefinition | None:
    """The executor ``PRECOMPUTE_EXECUTOR`` names (unset or blank: ``multiprocess``, returned as None), with its
    settings from the environment; ``SettingError`` naming the variable when one is missing or malformed."""
    env = os.environ if environ is None else environ
    name = (env.get(ENV_EXECUTOR) or "").strip() or DEFAULT_EXECUTOR
    if name.lower().replace("-", "_") != "celery":
        return executor_for(name)
    broker = (env.get(ENV_CELERY_BROKER) or "").strip()
    if not broker:
        raise SettingError(
            f"{ENV_EXECUTOR}=celery needs {ENV_CELERY_BROKER}: the Redis the Celery workers listen on, e.g. "
            "redis://127.0.0.1:6379/1 (a database apart from the serving cache's)"
        )
    if "://" not in broker:
        # Shown where the code location fails to load (the UI, the daemon's log): never with its password.
        raise SettingError(f"{ENV_CELERY_BROKER}={redact(broker)!r} is not a URL: use redis://host:port/db")
    backend = ENV_CELERY_BACKEND if (env.get(ENV_CELERY_BACKEND) or "").strip() else ENV_CELERY_BROKER
    # Read from the environment where the run executes, as the resources' EnvVar are: the URL (which may hold a
    # password) stays out of the Definitions and the UI.
    return executor_for("celery", broker={"env": ENV_CELERY_BROKER}, backend={"env": backend})


def _import(name: str, module: str, attribute: str) -> dg.ExecutorDefinition:
    try:
        imported = __import__(module, fromlist=[attribute])
    except ImportError:
        raise SettingError(
            f"{ENV_EXECUTOR}={name} needs the {PACKAGES[name]} package: pip install {PACKAGES[name]} "
            "(pinned in constraints.txt)"
        ) from None
    return getattr(imported, attribute)
