"""What runs on its own: every schedule and sensor by default, and the state the daemon acts on."""

from __future__ import annotations

import dagster as dg
import pytest
from dagster._core.test_utils import in_process_test_workspace
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin

from precompute_assets.definitions import defs
from precompute_assets.defs.automation import automation_states

EVERYTHING = [
    ("campaign_launch_sensor", "sensor"),
    ("campaign_warming_backstop", "schedule"),
    ("daily_precompute", "schedule"),
    ("document_embeddings_daily", "schedule"),
    ("documents_changed", "sensor"),
    ("query_log_cleanup_daily", "schedule"),
    ("query_logs_hourly", "schedule"),
]


@pytest.fixture(autouse=True)
def environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PRECOMPUTE_LAKE_URI", str(tmp_path / "lake"))
    monkeypatch.setenv("PRECOMPUTE_MODEL_STORE", str(tmp_path / "models"))
    monkeypatch.delenv("PRECOMPUTE_TIMEZONE", raising=False)
    monkeypatch.delenv("PRECOMPUTE_PARTITIONS_START", raising=False)


def test_a_fresh_instance_runs_everything():
    with dg.instance_for_test() as instance:
        assert automation_states(instance, defs()) == [(name, kind, "RUNNING") for name, kind in EVERYTHING]


def test_a_toggle_in_the_ui_is_what_is_reported():
    """Stopped and started the way the UI toggle and ``dagster schedule stop`` do it, through the instance."""
    with dg.instance_for_test() as instance:
        origin = LoadableTargetOrigin(module_name="precompute_assets.definitions", attribute="defs")
        with in_process_test_workspace(instance, origin) as workspace:
            (location_name,) = workspace.code_location_names
            repository = workspace.get_code_location(location_name).get_repository("__repository__")
            hourly, sensor = repository.get_schedule("query_logs_hourly"), repository.get_sensor("documents_changed")
            instance.stop_schedule(hourly.get_remote_origin_id(), hourly.selector_id, hourly)
            instance.stop_sensor(sensor.get_remote_origin_id(), sensor.selector_id, sensor)
            states = {(name, kind): state for name, kind, state in automation_states(instance, defs())}
            assert states == {
                **dict.fromkeys(EVERYTHING, "RUNNING"),
                ("query_logs_hourly", "schedule"): "STOPPED",
                ("documents_changed", "sensor"): "STOPPED",
            }
            # states stored for another code location do not apply to this one
            elsewhere = automation_states(instance, defs(), location_name="somewhere-else")
            assert {state for _, _, state in elsewhere} == {"RUNNING"}

            instance.start_schedule(hourly)
            assert ("query_logs_hourly", "schedule", "RUNNING") in automation_states(instance, defs())
