"""Fault: a sensor tick raises, because the campaign registry's database refuses connections.

The real ``campaign_launch_sensor`` runs in the real sensor daemon loop (``execute_sensor_iteration``, in process,
on a Dagster instance whose run coordinator only queues runs). Its registry is a scratch database on the real
PostgreSQL, closed to new connections for one tick (``ALTER DATABASE ... ALLOW_CONNECTIONS false``) and opened
again. The failed tick is recorded as FAILURE with the database's error, the cursor stays where it was, no run is
requested; the next tick succeeds and requests the campaign registered during the outage.
"""

import logging
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import psycopg2
from dagster._core.definitions.run_request import InstigatorType
from dagster._core.remote_origin import InProcessCodeLocationOrigin
from dagster._core.scheduler.instigation import TickStatus
from dagster._core.test_utils import create_test_daemon_workspace_context, freeze_time
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from dagster._core.workspace.load_target import InProcessWorkspaceLoadTarget
from dagster._daemon.sensor import execute_sensor_iteration

from precompute_assets.defs.campaigns import LaunchCursor
from precompute_assets.storage.campaigns import CampaignRegistry
from precompute_assets.storage.postgres import libpq_url
from precompute_assets.workload.ads import make_ads
from precompute_assets_tests.faults.figures import record
from precompute_assets_tests.faults.sensor_defs import REGISTRY_URL_ENV

ROOT = Path(__file__).resolve().parents[2]
SENSOR = "campaign_launch_sensor"
INTERVAL = timedelta(seconds=31)  # past the sensor's minimum_interval_seconds (30)


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


def campaign_ads(prefix: str, n: int) -> list[dict]:
    """``n`` new ads with the features of the synthetic workload."""
    table = make_ads(n, days=1, seed=0)
    return [
        {"ad_id": f"{prefix}-ad{i:04d}", "category": int(row.category), "quality": float(row.quality),
         "bid": float(row.bid), "text_len": int(row.text_len)}
        for i, row in enumerate(table.itertuples())
    ]  # fmt: skip


def allow_connections(admin_url: str, database: str, allowed: bool) -> None:
    conn = psycopg2.connect(libpq_url(admin_url))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS {str(allowed).lower()}')
            if not allowed:  # close the sessions already open, as a database restart would
                cur.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = %s AND pid <> pg_backend_pid()",
                    (database,),
                )
    finally:
        conn.close()


def sensor_ticks(instance: dg.DagsterInstance, workspace) -> list:
    """The sensor's ticks, oldest first."""
    (location,) = workspace.create_request_context().get_code_location_entries().values()
    (repository,) = location.code_location.get_repositories().values()
    sensor = repository.get_sensor(SENSOR)
    origin_id, selector_id = sensor.get_remote_origin_id(), sensor.selector_id
    return list(reversed(instance.get_ticks(origin_id, selector_id)))


def cursor_of(instance: dg.DagsterInstance) -> LaunchCursor:
    (state,) = [s for s in instance.all_instigator_state(instigator_type=InstigatorType.SENSOR) if s.name == SENSOR]
    return LaunchCursor.decode(state.instigator_data.cursor)


def test_a_sensor_tick_that_raises_is_recorded_and_the_next_tick_catches_up(
    app_db, app_db_url, monkeypatch, caplog, record_property
):
    registry = CampaignRegistry(app_db)
    registry.ensure_schema()
    database = app_db.rsplit("/", 1)[1]
    now = datetime.now(UTC)
    before, during = unique("before"), unique("during")
    registry.register(before, "acme", now + timedelta(hours=1), campaign_ads(before, 3))
    monkeypatch.setenv(REGISTRY_URL_ENV, app_db)
    origin = LoadableTargetOrigin(
        module_name="precompute_assets_tests.faults.sensor_defs", attribute="defs", working_directory=str(ROOT)
    )
    target = InProcessWorkspaceLoadTarget(InProcessCodeLocationOrigin(origin))  # the real loader, in this process
    queued = {"run_coordinator": {"module": "dagster._core.run_coordinator", "class": "QueuedRunCoordinator"}}
    logger = logging.getLogger("fault-sensor-daemon")
    opened = False
    caplog.set_level(logging.INFO)
    with (
        dg.instance_for_test(overrides=queued) as instance,
        create_test_daemon_workspace_context(target, instance) as workspace,
    ):

        def tick(at: datetime) -> float:
            started = time.perf_counter()
            with freeze_time(at):
                list(execute_sensor_iteration(workspace, logger, None, None))
            return time.perf_counter() - started

        clock = datetime.now(UTC)
        tick(clock)
        first = sensor_ticks(instance, workspace)[-1]
        assert first.status == TickStatus.SUCCESS and first.run_keys == [f"{before}-r1"]
        cursor_before = cursor_of(instance)

        # The outage: a campaign registered just before, then the database refuses connections.
        registry.register(during, "acme", now + timedelta(hours=2), campaign_ads(during, 3))
        allow_connections(app_db_url, database, False)
        try:
            failed_tick_s = tick(clock := clock + INTERVAL)
            failed = sensor_ticks(instance, workspace)[-1]
            assert failed.status == TickStatus.FAILURE
            error = failed.error.to_string()
            assert "not currently accepting connections" in error and database in error, error
            # ... and logged by the daemon, naming the sensor
            assert any(SENSOR in r.getMessage() and r.levelno >= logging.ERROR for r in caplog.records), caplog.records
            assert not failed.run_keys and cursor_of(instance) == cursor_before  # nothing lost, nothing skipped
            runs_during = len(instance.get_runs())
        finally:
            allow_connections(app_db_url, database, True)
            opened = True
        reopened = time.perf_counter()

        tick(clock := clock + INTERVAL)
        recovered = sensor_ticks(instance, workspace)[-1]
        assert recovered.status == TickStatus.SUCCESS
        assert recovered.run_keys == [f"{during}-r1"]  # the campaign of the outage, and only it
        assert cursor_of(instance).seq == registry.max_change_seq()
        keys = sorted(run.tags["dagster/run_key"] for run in instance.get_runs())
        assert keys == sorted([f"{before}-r1", f"{during}-r1"])  # one run each, none twice
    assert opened
    ticks_to_recover = 1
    record(
        record_property,
        "sensor tick raises (registry database refuses connections)",
        failed_tick_seconds=round(failed_tick_s, 3),
        failed_tick_status="FAILURE",
        error=next(line for line in error.splitlines() if "accepting connections" in line).strip()[:200],
        runs_requested_during_outage=runs_during - 1,
        ticks_to_recover=ticks_to_recover,
        delay_added_s=30,  # one minimum_interval_seconds: the campaign is requested on the next tick
        requested_after_recovery=[f"{during}-r1"],
        seconds_from_reopen_to_recovered_tick=round(time.perf_counter() - reopened, 3),
    )
