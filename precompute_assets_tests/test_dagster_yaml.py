"""The project's dagster.yaml, loaded as the instance loads it, keeps the instance's own bookkeeping bounded."""

from __future__ import annotations

import shutil
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
