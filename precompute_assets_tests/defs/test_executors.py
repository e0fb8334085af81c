"""Executors chosen by configuration: the daily graph and the embedding sync with their steps in two real Celery
workers (a private Valkey as broker, the PostgreSQL instance, the lake shared through the IO manager), the
mapping of ``PRECOMPUTE_EXECUTOR``, and the production Kubernetes configuration, validated by dagster-k8s."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pandas as pd
import psutil
import pytest
import yaml
from dagster._core.definitions.reconstruct import ReconstructableJob, ReconstructableRepository

from precompute_assets.definitions import build_definitions
from precompute_assets.defs.embeddings import embedding_model
from precompute_assets.defs.executors import (
    ENV_CELERY_BACKEND,
    ENV_CELERY_BROKER,
    ENV_EXECUTOR,
    executor_for,
    executor_from_env,
)
from precompute_assets.defs.resources import (
    DocumentStoreResource,
    LakeResource,
    ModelStoreResource,
    ParquetIOManager,
)
from precompute_assets.defs.settings import SettingError, load_settings
from precompute_assets.serving import KeySchema, PredictionCache, connect
from precompute_assets.stack import ENV_APP_DB, ENV_LAKE, ENV_MODEL_STORE, ENV_REDIS, RedisServer, free_port
from precompute_assets.storage.documents import DocumentStore
from precompute_assets.storage.lake import Lake
from precompute_assets.storage.postgres import scratch_database
from precompute_assets.workload.documents import generate_documents
from precompute_assets_tests.factories import write_ad_platform

# dagster-celery builds its task anew for each step it submits, and Celery warns that the name is taken.
pytestmark = pytest.mark.filterwarnings("ignore:Task name 'execute_plan' is already registered")

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DAY = "2026-11-18"
WORKERS = ("w0", "w1")
BARRIER_TIMEOUT_S = 60
# The README's worker config: the same broker and backend as the executor's, from the environment.
CELERY_WORKER_YAML = textwrap.dedent(
    """\
    execution:
      config:
        broker:
          env: PRECOMPUTE_CELERY_BROKER_URL
        backend:
          env: PRECOMPUTE_CELERY_BROKER_URL
    """
)


# -- Reconstructable targets: every Celery worker imports this module and calls these to load the job. --------


def deployment_definitions() -> dg.Definitions:
    """The deployment's Definitions with the executor ``PRECOMPUTE_EXECUTOR`` names, as ``defs()`` builds them."""
    return dg.Definitions.merge(build_definitions(load_settings()), dg.Definitions(executor=executor_from_env()))


@dg.definitions
def location() -> dg.Definitions:
    """This code location as workspace.yaml loads ``precompute_assets.definitions:defs``, executor included."""
    return deployment_definitions()


def location_job(name: str) -> ReconstructableJob:
    """A job of ``location`` by module and attribute, the pointer a code server gives its runs and their steps."""
    return ReconstructableRepository.for_module(__name__, "location", str(ROOT)).get_reconstructable_job(name)


def step_frame(step: str, **extra) -> pd.DataFrame:
    return pd.DataFrame([{"step": step, "pid": os.getpid(), **extra}])


@dg.asset
def fan_out_source() -> pd.DataFrame:
    return step_frame("fan_out_source")


def meet(lake: LakeResource, mine: str, other: str) -> None:
    """Announce ``mine`` in the lake and wait for ``other``: only steps running at once, in two processes, meet."""
    store = lake.lake()
    store.write(f"barrier_{mine}", None, step_frame(mine))
    deadline = time.monotonic() + BARRIER_TIMEOUT_S
    while not store.exists(f"barrier_{other}"):
        if time.monotonic() > deadline:
            raise dg.Failure(f"{other} did not run while {mine} was running")
        time.sleep(0.1)


@dg.asset
def left_branch(lake: LakeResource, fan_out_source: pd.DataFrame) -> pd.DataFrame:
    meet(lake, "left_branch", "right_branch")
    return step_frame("left_branch", source_pid=int(fan_out_source["pid"].iloc[0]))


@dg.asset
def right_branch(lake: LakeResource, fan_out_source: pd.DataFrame) -> pd.DataFrame:
    meet(lake, "right_branch", "left_branch")
    return step_frame("right_branch", source_pid=int(fan_out_source["pid"].iloc[0]))


def fan_out_job() -> dg.JobDefinition:
    lake = LakeResource(base_uri=dg.EnvVar(ENV_LAKE))
    return dg.Definitions(
        assets=[fan_out_source, left_branch, right_branch],
        jobs=[dg.define_asset_job("fan_out_job")],
        resources={"lake": lake, "io_manager": ParquetIOManager(lake=lake)},
        executor=executor_from_env(),
    ).resolve_job_def("fan_out_job")


# -- Two Celery workers on a private Valkey, with the environment of the code location. ----------------------


class Workers:
    def __init__(self, env: dict[str, str], processes: list[subprocess.Popen], logs: list[Path]) -> None:
        self.env, self.processes, self.logs = env, processes, logs

    @property
    def lake(self) -> Lake:
        return Lake(self.env[ENV_LAKE])

    def owner(self, pid: int) -> str | None:
        """The worker (``w0``/``w1``) whose process tree ``pid`` belongs to, or None."""
        try:
            ancestors = {p.pid for p in psutil.Process(pid).parents()} | {pid}
        except psutil.NoSuchProcess:
            return None
        return next((name for name, p in zip(WORKERS, self.processes, strict=True) if p.pid in ancestors), None)

    def tail(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in self.logs if log.exists())


def wait_ready(workers: Workers, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(log.exists() and " ready." in log.read_text() for log in workers.logs):
        if time.monotonic() > deadline or any(p.poll() is not None for p in workers.processes):
            pytest.fail(f"the Celery workers did not start:\n{workers.tail()}")
        time.sleep(0.2)


def stop(processes: list[subprocess.Popen]) -> None:
    """Stop the workers we started: SIGQUIT to each ``celery`` process (a cold shutdown: no task is left running,
    then the CLI that started it exits); what is left of a worker's process group is killed after 30 s."""
    for process in processes:
        try:
            for child in psutil.Process(process.pid).children():
                child.send_signal(signal.SIGQUIT)
        except psutil.NoSuchProcess:
            pass
    for process in processes:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@pytest.fixture(scope="module")
def workers(session_dir: Path, app_db_url: str, tmp_path_factory) -> Iterator[Workers]:
    """Two ``dagster-celery worker start`` processes of one pool process each, listening on a private Valkey
    (database 1; database 0 is this module's serving cache), with the code location's environment."""
    root = tmp_path_factory.mktemp("celery")
    server = RedisServer(session_dir / "servers" / uuid.uuid4().hex[:8], free_port())
    processes: list[subprocess.Popen] = []
    logs = [root / f"{name}.log" for name in WORKERS]
    with pytest.MonkeyPatch.context() as patch, scratch_database(app_db_url, "app") as app_db:
        try:
            server.start()
            broker = server.url.rsplit("/", 1)[0] + "/1"
            (root / "celery.yaml").write_text(CELERY_WORKER_YAML)
            env = {
                ENV_EXECUTOR: "celery",
                ENV_CELERY_BROKER: broker,
                ENV_REDIS: server.url,
                ENV_LAKE: str(root / "lake"),
                ENV_MODEL_STORE: str(root / "models"),
                ENV_APP_DB: app_db,
            }
            for variable, value in env.items():  # the orchestrating run (this process) loads the same Definitions
                patch.setenv(variable, value)
            patch.delenv(ENV_CELERY_BACKEND, raising=False)
            worker_env = {
                **os.environ,
                "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                "PYTHONPATH": str(ROOT),
            }
            for name, log in zip(WORKERS, logs, strict=True):
                # The CLI writes the worker's Celery config under $DAGSTER_HOME: one home each, as on two machines
                # (the steps' instance is the run's, sent with every task).
                home = root / f"dagster_home_{name}"
                home.mkdir()
                (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
                # --disable-prefetch: an idle worker gets the next step, rather than a busy one reserving it (a step
                # waiting on its sibling, as the fan-out test's do, timed out behind it in a clean-clone run).
                command = [str(BIN / "dagster-celery"), "worker", "start", "-A", "dagster_celery.app",
                           "-y", str(root / "celery.yaml"), "-n", name,
                           "--", "--concurrency=1", "--disable-prefetch"]  # fmt: skip
                with log.open("w") as out:
                    processes.append(
                        subprocess.Popen(
                            command,
                            cwd=ROOT,
                            env={**worker_env, "DAGSTER_HOME": str(home)},
                            stdout=out,
                            stderr=subprocess.STDOUT,
                            start_new_session=True,
                        )
                    )
            running = Workers(env, processes, logs)
            wait_ready(running)
            yield running
        finally:
            stop(processes)
            server.stop()


def step_pids(instance: dg.DagsterInstance, run_id: str) -> dict[str, int]:
    records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.STEP_START).records
    return {r.event_log_entry.step_key: r.event_log_entry.dagster_event.pid for r in records}


def celery_hosts(result: dg.ExecuteJobResult) -> dict[str, str]:
    """Step key -> the Celery worker that ran it, from the executor's "Executing steps ... in celery worker"."""
    hosts = {}
    for event in result.all_events:
        if event.is_engine_event and "in celery worker" in (event.message or ""):
            hosts[event.step_key] = event.engine_event_data.metadata["Celery worker"].value
    return hosts


def test_steps_run_at_once_in_two_worker_processes_and_hand_over_through_the_lake(workers, pg_instance):
    with dg.execute_job(dg.reconstructable(fan_out_job), instance=pg_instance, raise_on_error=False) as result:
        assert result.success, workers.tail()
        hosts = celery_hosts(result)
    pids = step_pids(pg_instance, result.run_id)
    assert set(pids) == {"fan_out_source", "left_branch", "right_branch"}
    assert os.getpid() not in pids.values()  # the run (this process) only orchestrates
    # left and right met in the lake while both ran: two processes, one in each worker.
    assert pids["left_branch"] != pids["right_branch"]
    assert {workers.owner(pids["left_branch"]), workers.owner(pids["right_branch"])} == set(WORKERS)
    assert {host.split("@")[0] for host in hosts.values()} <= set(WORKERS) and set(hosts) == set(pids)
    # Every output went through the lake: the branches read the source's frame written by another process.
    lake = workers.lake
    for branch in ("left_branch", "right_branch"):
        frame = lake.read(branch)
        assert frame["pid"].iloc[0] == pids[branch]
        assert frame["source_pid"].iloc[0] == pids["fan_out_source"]


def test_the_daily_graph_runs_through_the_celery_workers(workers, pg_instance):
    lake = workers.lake
    shutil.rmtree(workers.env[ENV_LAKE], ignore_errors=True)
    write_ad_platform(lake, ["2026-11-16", "2026-11-17", DAY])
    with dg.execute_job(
        location_job("daily_precompute_job"),
        instance=pg_instance,
        tags={"dagster/partition": DAY},
        # demand_model trains its LSTM in a worker like every step; one epoch is enough for that (test_demand
        # covers what it learns).
        run_config={"ops": {"top_ads": {"config": {"top_n": 50}}, "demand_model": {"config": {"max_epochs": 1}}}},
        raise_on_error=False,
    ) as result:
        assert result.success, workers.tail()
        publish = result.asset_materializations_for_node("ctr_cache")[0].metadata
    pids = step_pids(pg_instance, result.run_id)
    job_steps = set(location_job("daily_precompute_job").get_definition().graph.node_dict)
    assert set(pids) == job_steps  # every step of the job ran, in a worker
    assert {"traffic_profile", "ad_demand", "top_ads", "ctr_model", "ctr_predictions", "ctr_cache"} <= set(pids)
    assert os.getpid() not in pids.values()
    assert all(workers.owner(pid) in WORKERS for pid in pids.values())
    # Outputs are in the shared lake, and the published predictions answer through the serving client.
    top = lake.read("top_ads", DAY)
    assert len(top) == 50 and publish["keys_written"].value == 50
    predictions = lake.read("ctr_predictions", DAY).set_index("ad_id")["ctr"]
    first = top["ad_id"].iloc[0]
    cache = PredictionCache(connect(workers.env[ENV_REDIS], socket_timeout=5), schema=KeySchema("pc"))
    assert cache.get("ctr", first) == pytest.approx(predictions[first], rel=1e-6)
    # One materialization per asset: the worker's events are stored once, not again by the orchestrator.
    records = pg_instance.get_records_for_run(result.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION).records
    keys = [r.event_log_entry.dagster_event.asset_key for r in records]
    assert len(keys) == len(set(keys)) and dg.AssetKey("ctr_cache") in keys


def test_a_failed_blocking_check_in_a_worker_stops_the_publish(workers, pg_instance):
    # One ad: no model can beat the baseline, so the blocking check fails in its worker; Dagster's own
    # execution loop (which the Celery executor keeps) never submits what depends on it, as in one process.
    shutil.rmtree(workers.env[ENV_LAKE], ignore_errors=True)
    write_ad_platform(workers.lake, ["2026-11-16", "2026-11-17", DAY], n_ads=1, queries_per_day=500)
    with dg.execute_job(
        location_job("daily_precompute_job"),
        instance=pg_instance,
        tags={"dagster/partition": DAY},
        raise_on_error=False,
    ) as result:
        gate = next(c for c in result.get_asset_check_evaluations() if c.check_name == "beats_baseline")
        assert not gate.passed and "no model trained" in gate.description
        started = {e.step_key for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_START}
        assert "ctr_model" in started and not {"ctr_predictions", "ctr_cache"} & started  # never sent to a worker
        assert not result.success
        assert not result.asset_materializations_for_node("ctr_cache")
    assert not workers.lake.exists("ctr_predictions", DAY)


def test_the_embedding_sync_runs_in_a_celery_worker(workers, pg_instance):
    env = workers.env
    documents = DocumentStore(env[ENV_APP_DB])
    documents.ensure_schema()
    documents.load_frame(pd.concat(generate_documents(400, seed=5)))
    model = dg.materialize(
        [embedding_model],
        instance=pg_instance,
        resources={
            "documents": DocumentStoreResource(url=env[ENV_APP_DB]),
            "model_store": ModelStoreResource(root=env[ENV_MODEL_STORE]),
        },
        run_config={"ops": {"embedding_model": {"config": {"dim": 32, "sample": 400}}}},
    )
    assert model.success
    with dg.execute_job(location_job("document_embeddings_job"), instance=pg_instance, raise_on_error=False) as result:
        assert result.success, workers.tail()
        meta = result.asset_materializations_for_node("document_embeddings")[0].metadata
    pids = step_pids(pg_instance, result.run_id)
    # the sync, then the served_by_redis check of what it published: each in a worker
    assert sorted(pids) == ["document_embeddings", "document_embeddings_served_by_redis"], pids
    assert {workers.owner(pid) for pid in pids.values()} <= set(WORKERS)
    assert meta["embedded"].value == 400 and meta["failed"].value == 0
    cache = PredictionCache(connect(env[ENV_REDIS], socket_timeout=5), schema=KeySchema("pc"))
    assert cache.get_embedding("doc00000000") is not None


# -- The mapping of PRECOMPUTE_EXECUTOR. ------------------------------------------------------------------------


def test_the_executor_is_chosen_by_name_and_multiprocess_stays_the_default():
    assert executor_from_env({}) is None and executor_from_env({ENV_EXECUTOR: " "}) is None
    assert executor_for("multiprocess") is None
    assert executor_for("in_process") is dg.in_process_executor
    assert executor_for("In-Process").name == "in_process"
    assert executor_for("multiprocess", max_concurrent=2).name == "multiprocess"
    assert executor_for("k8s").name == "k8s"
    celery = executor_from_env({ENV_EXECUTOR: "celery", ENV_CELERY_BROKER: "redis://secret@h:6379/1"})
    assert celery.name == "celery"
    with pytest.raises(SettingError, match=r"PRECOMPUTE_EXECUTOR='dask' is not an executor: use one of"):
        executor_from_env({ENV_EXECUTOR: "dask"})
    with pytest.raises(SettingError, match=r"needs PRECOMPUTE_CELERY_BROKER_URL"):
        executor_from_env({ENV_EXECUTOR: "celery"})
    with pytest.raises(SettingError, match=r"PRECOMPUTE_CELERY_BROKER_URL='localhost' is not a URL"):
        executor_from_env({ENV_EXECUTOR: "celery", ENV_CELERY_BROKER: "localhost"})
    with pytest.raises(SettingError, match=r"is not a URL") as refused:  # a mistyped '://' with a password
        executor_from_env({ENV_EXECUTOR: "celery", ENV_CELERY_BROKER: "redis//:s3cretPW@h:6379/1"})
    assert "s3cretPW" not in str(refused.value), refused.value


def test_every_job_of_the_deployment_takes_the_chosen_executor(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_EXECUTOR, "celery")
    monkeypatch.setenv(ENV_CELERY_BROKER, "redis://127.0.0.1:1/1")
    defs = deployment_definitions()
    for name in ("daily_precompute_job", "document_embeddings_job", "query_logs_job", "campaign_warming_job"):
        assert defs.resolve_job_def(name).executor_def.name == "celery"
    # ... except the one-step predictive task job, which runs in its run's process (no second start-up).
    assert defs.resolve_job_def("precompute_tasks_job").executor_def.name == "in_process"
    monkeypatch.delenv(ENV_EXECUTOR)
    assert (
        deployment_definitions().resolve_job_def("daily_precompute_job").executor_def.name
        == "multi_or_in_process_executor"
    )


# -- Production: K8sRunLauncher + k8s_job_executor (the README's configuration). ---------------------------------

K8S_DAGSTER_YAML = textwrap.dedent(
    """\
    storage:
      postgres:
        postgres_url:
          env: DAGSTER_PG_URL
    run_coordinator:
      module: dagster._core.run_coordinator
      class: QueuedRunCoordinator
      config:
        dequeue_interval_seconds: 1
    run_launcher:
      module: dagster_k8s
      class: K8sRunLauncher
      config:
        service_account_name: precompute
        job_image: registry.example.com/precompute-assets:1.0.0
        image_pull_policy: IfNotPresent
        job_namespace: precompute
        load_incluster_config: true
        instance_config_map: precompute-dagster-instance
        env_config_maps:
          - precompute-env                 # PRECOMPUTE_LAKE_URI=s3://..., PRECOMPUTE_TIMEZONE, PRECOMPUTE_EXECUTOR=k8s
        env_secrets:
          - precompute-secrets             # DAGSTER_PG_URL, PRECOMPUTE_REDIS_URL, PRECOMPUTE_APP_DB_URL
        volume_mounts:
          - name: models
            mount_path: /models            # PRECOMPUTE_MODEL_STORE=/models
        volumes:
          - name: models
            persistentVolumeClaim:
              claimName: precompute-models # ReadWriteMany: every step pod reads the models
        run_k8s_config:
          container_config:
            resources:
              requests: {cpu: 250m, memory: 512Mi}
    concurrency:
      runs:
        max_concurrent_runs: 4
        tag_concurrency_limits:          # as the project's dagster.yaml: campaign warming relies on them
          - key: precompute/warming        # 2 campaign runs at once,
            limit: 2
          - key: precompute/campaign       # one per campaign: its revisions and cancellation apply in order
            value:
              applyLimitPerUniqueValue: true
            limit: 1
          - key: dagster/backfill
            limit: 2
      pools:
        default_limit: 1
    run_retries:                       # the daemon re-executes campaign runs whose pod died (dagster/max_retries)
      enabled: true
      max_retries: 0
      retry_on_asset_or_op_failure: false
    run_monitoring:
      enabled: true
      poll_interval_seconds: 60
      free_slots_after_run_end_seconds: 30
    telemetry:
      enabled: false
    """
)

K8S_RUN_CONFIG = textwrap.dedent(
    """\
    execution:
      config:
        max_concurrent: 4
        step_k8s_config:
          container_config:
            resources:
              requests: {cpu: "1", memory: 2Gi}
              limits: {memory: 4Gi}
    """
)


def test_the_production_kubernetes_configuration_loads(tmp_path, monkeypatch):
    pytest.importorskip("dagster_k8s", reason="dagster-k8s is not installed (the k8s extra)")
    from dagster._config import validate_config
    from dagster._core.instance.config import dagster_instance_config
    from dagster_k8s import K8sRunLauncher

    (tmp_path / "dagster.yaml").write_text(K8S_DAGSTER_YAML)
    instance_config, _ = dagster_instance_config(str(tmp_path))  # the instance schema, as dagster reads it
    # What campaign warming relies on, as the project's dagster.yaml has it: the README's block lacked both (h_readme)
    project = yaml.safe_load((Path(__file__).resolve().parents[2] / "dagster.yaml").read_text())
    shown = yaml.safe_load(K8S_DAGSTER_YAML)
    assert shown["run_retries"] == project["run_retries"]
    assert shown["concurrency"]["runs"] == project["concurrency"]["runs"]
    assert shown["run_coordinator"] == project["run_coordinator"]  # its 1 s dequeue interval too (h_diff3)
    assert instance_config["run_monitoring"]["free_slots_after_run_end_seconds"] == 30
    launcher = instance_config["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_k8s", "K8sRunLauncher")
    checked = validate_config(K8sRunLauncher.config_type(), launcher["config"])
    assert checked.success, checked.errors
    # The executor's per-run config against k8s_job_executor's schema, on the deployment's own job.
    pod_env = {ENV_EXECUTOR: "k8s", ENV_REDIS: "rediss://cache:6380/0", ENV_APP_DB: "postgresql+psycopg2://db/app",
               ENV_LAKE: "s3://precompute/lake", ENV_MODEL_STORE: "/models"}  # fmt: skip
    for variable, value in pod_env.items():  # what the ConfigMap and the Secret give every pod
        monkeypatch.setenv(variable, value)
    job = deployment_definitions().resolve_job_def("daily_precompute_job")
    assert job.executor_def.name == "k8s"
    run_config = {**yaml.safe_load(K8S_RUN_CONFIG), "ops": {"top_ads": {"config": {"top_n": 50}}}}
    assert dg.validate_run_config(job, run_config)["execution"]["k8s"]["max_concurrent"] == 4
    with pytest.raises(dg.DagsterInvalidConfigError):
        dg.validate_run_config(job, {"execution": {"config": {"max_concurent": 4}}})
