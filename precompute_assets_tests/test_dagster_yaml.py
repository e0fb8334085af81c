"""The project's dagster.yaml, loaded as the instance loads it, keeps the instance's own bookkeeping bounded."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import dagster as dg
from dagster._core.definitions.run_request import InstigatorType
from dagster._core.scheduler.instigation import TickStatus

from precompute_assets.storage.postgres import scratch_database

ROOT = Path(__file__).resolve().parents[1]


def test_sensor_and_automation_ticks_are_purged_after_a_month(dagster_pg_url: str, tmp_path: Path, monkeypatch) -> None:
    """user_event_sensor ticks every second: by Dagster's default its ticks that requested runs are kept forever."""
    shutil.copy(ROOT / "dagster.yaml", tmp_path / "dagster.yaml")
    with scratch_database(dagster_pg_url, "dagster") as url:
        monkeypatch.setenv("DAGSTER_PG_URL", url)
        with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
            for kind in (InstigatorType.SENSOR, InstigatorType.AUTO_MATERIALIZE):
                days = instance.get_tick_retention_settings(kind)
                assert all(0 < days[status] <= 30 for status in TickStatus), (kind, days)
                assert days[TickStatus.SKIPPED] == 7


def test_a_slow_sensor_tick_does_not_hold_up_the_other_sensors(dagster_pg_url: str, tmp_path: Path, monkeypatch):
    """Without threads the daemon ticks sensors one after another: one tick waiting on a database or scanning the
    query log held up user_event_sensor, whose runs must start while the user is still there."""
    from dagster._core.remote_origin import InProcessCodeLocationOrigin
    from dagster._core.test_utils import create_test_daemon_workspace_context
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
    from dagster._core.workspace.load_target import InProcessWorkspaceLoadTarget
    from dagster._daemon.daemon import SensorDaemon

    from precompute_assets_tests import sensor_daemon_defs

    shutil.copy(ROOT / "dagster.yaml", tmp_path / "dagster.yaml")
    origin = LoadableTargetOrigin(
        module_name=sensor_daemon_defs.__name__, attribute="defs", working_directory=str(ROOT)
    )
    target = InProcessWorkspaceLoadTarget(InProcessCodeLocationOrigin(origin))
    stop, shutdown = threading.Event(), threading.Event()
    sensor_daemon_defs.QUICK_TICKS.clear()
    sensor_daemon_defs.RELEASE.clear()
    with scratch_database(dagster_pg_url, "dagster") as url:
        monkeypatch.setenv("DAGSTER_PG_URL", url)
        with (
            dg.DagsterInstance.from_config(str(tmp_path)) as instance,
            create_test_daemon_workspace_context(target, instance) as workspace,
            SensorDaemon(instance.get_settings("sensors")) as daemon,
        ):

            def loop() -> None:
                for _ in daemon.core_loop(workspace, shutdown):
                    if stop.is_set():
                        return

            looping = threading.Thread(target=loop, daemon=True)
            looping.start()
            try:
                deadline = time.monotonic() + 60
                while len(sensor_daemon_defs.QUICK_TICKS) < 3 and time.monotonic() < deadline:
                    time.sleep(0.2)
                ticks_while_slow = len(sensor_daemon_defs.QUICK_TICKS)
            finally:
                stop.set()
                shutdown.set()
                sensor_daemon_defs.RELEASE.set()
                looping.join(timeout=120)
    assert ticks_while_slow >= 3  # the quick sensor kept ticking while the slow tick was still going
