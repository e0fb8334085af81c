"""Freshness policies of the assets serving reads, evaluated by Dagster's own freshness daemon on PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import dagster as dg
from dagster._core.definitions.freshness import FreshnessState
from dagster._core.remote_origin import InProcessCodeLocationOrigin
from dagster._core.test_utils import create_test_daemon_workspace_context, freeze_time
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from dagster._core.workspace.load_target import InProcessWorkspaceLoadTarget
from dagster._daemon.freshness import FreshnessDaemon

from precompute_assets.defs.selection import OFFPEAK_WINDOW_HOURS

SERVED = ("query_logs", "ctr_cache", "document_embeddings")


def test_served_assets_turn_warn_then_fail_as_their_newest_materialization_ages(pg_instance, monkeypatch):
    for variable in ("PRECOMPUTE_REDIS_URL", "PRECOMPUTE_APP_DB_URL"):  # resources resolve them; never used here
        monkeypatch.setenv(variable, "redis://127.0.0.1:9/0")
    origin = LoadableTargetOrigin(module_name="precompute_assets.definitions", attribute="defs")
    target = InProcessWorkspaceLoadTarget(InProcessCodeLocationOrigin(origin))
    published = datetime(2026, 12, 2, 3, 0, tzinfo=UTC)
    with create_test_daemon_workspace_context(target, pg_instance) as workspace:

        def states(at: datetime) -> dict[str, FreshnessState]:
            with freeze_time(at):
                list(FreshnessDaemon().run_iteration(workspace))
            records = pg_instance.get_freshness_state_records([dg.AssetKey(name) for name in SERVED])
            return {name: records[dg.AssetKey(name)].freshness_state for name in SERVED}

        assert set(states(published).values()) == {FreshnessState.UNKNOWN}  # never materialized: nothing to judge
        with freeze_time(published):
            for name, partition in (("query_logs", "2026-12-02-02:00"), ("ctr_cache", "2026-12-01"),
                                    ("document_embeddings", None)):  # fmt: skip
                pg_instance.report_runless_asset_event(dg.AssetMaterialization(name, partition=partition))
        assert set(states(published + timedelta(minutes=50)).values()) == {FreshnessState.PASS}
        # One hourly drain missed: the log warns; the nightly publish and the daily sync are still on time.
        later = states(published + timedelta(hours=3))
        assert later == {"query_logs": FreshnessState.WARN, "ctr_cache": FreshnessState.PASS,
                         "document_embeddings": FreshnessState.PASS}  # fmt: skip
        # A day and the off-peak window later, the next night's publish is late; the sync was due two hours ago.
        late = states(published + timedelta(hours=24 + OFFPEAK_WINDOW_HOURS, minutes=1))
        assert late == {"query_logs": FreshnessState.FAIL, "ctr_cache": FreshnessState.WARN,
                        "document_embeddings": FreshnessState.WARN}  # fmt: skip
        assert set(states(published + timedelta(hours=48)).values()) == {FreshnessState.FAIL}  # a whole night missed
