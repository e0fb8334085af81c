"""A run killed while it holds a pool slot must not block the pool for good: dagster.yaml's run monitoring ends it.

A real run, on the real PostgreSQL with the project's own dagster.yaml, is SIGKILLed inside a step of the
``redis_publish`` pool; Dagster's own monitoring functions (what the daemon runs) then fail it and free its slot.
Time is moved forward instead of waited for.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import pytest
from dagster._core.test_utils import create_run_for_test
from dagster._daemon.monitoring import concurrency, run_monitoring
from dagster._time import datetime_from_timestamp

from precompute_assets.definitions import defs
from precompute_assets.defs.automation import free_pool_slots, pool_states, runs_in_progress
from precompute_assets.defs.campaigns import WARMING_TAGS
from precompute_assets.defs.tasks import PRIORITY_TAG, RERUN_IF_WORKER_DIES, TASK_TAG
from precompute_assets.stack import project_dir
from precompute_assets.storage.postgres import scratch_database

POOLED_RUN = textwrap.dedent(
    """\
    import time
    import dagster as dg

    @dg.asset(pool="redis_publish")
    def publish():
        time.sleep(600)

    dg.materialize([publish], instance=dg.DagsterInstance.get())
    """
)


@pytest.fixture
def home(dagster_pg_url: str, tmp_path: Path, monkeypatch) -> Path:
    with scratch_database(dagster_pg_url, "dagster") as url:
        shutil.copy(project_dir() / "dagster.yaml", tmp_path / "dagster.yaml")
        monkeypatch.setenv("DAGSTER_PG_URL", url)
        monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
        yield tmp_path


def held_slots(instance: dg.DagsterInstance) -> set[str]:
    return {slot.run_id for slot in instance.event_log_storage.get_concurrency_info("redis_publish").claimed_slots}


def killed_pooled_run(instance: dg.DagsterInstance) -> str:
    """The ID of a run SIGKILLed while it holds a ``redis_publish`` slot, without a daemon: it stays STARTED."""
    worker = subprocess.Popen([sys.executable, "-c", POOLED_RUN], env=os.environ.copy())
    try:
        deadline = time.monotonic() + 120
        while not held_slots(instance) and worker.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        (killed,) = held_slots(instance)
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    return killed


def test_a_killed_run_is_failed_and_frees_its_pool_slot(home: Path, monkeypatch) -> None:
    with dg.DagsterInstance.get() as instance:
        assert instance.run_monitoring_enabled and instance.run_monitoring_settings["free_slots_after_run_end_seconds"]
        max_runtime = instance.run_monitoring_max_runtime_seconds
        assert max_runtime > 0
        killed = killed_pooled_run(instance)
        record = instance.get_run_record_by_id(killed)
        assert record.dagster_run.status == dg.DagsterRunStatus.STARTED  # nothing told Dagster it died
        blocked = instance.event_log_storage.claim_concurrency_slot("redis_publish", "next-run", "publish")
        assert not blocked.is_claimed
        states = dict(pool_states(instance, defs(), now=record.start_time + 3 * 3600 + 60))
        gone = f"(if its worker is gone: `precompute pools free --run {killed[:8]}`)"
        held = f"held by run {killed[:8]} STARTED for 3 h 1 min {gone}; 1 step(s) waiting"
        assert states == {"embedding_sync": "free", "redis_publish": held}

        later = record.start_time + max_runtime + 1
        monkeypatch.setattr(run_monitoring, "get_current_timestamp", lambda: later)
        run_monitoring.monitor_started_run(instance, None, record, logging.getLogger("test"))
        assert instance.get_run_by_id(killed).status == dg.DagsterRunStatus.FAILURE
        assert held_slots(instance) == {killed}  # ended, not yet freed
        ended = instance.get_run_record_by_id(killed).end_time
        held = dict(pool_states(instance, defs(), now=ended + 10))["redis_publish"]
        assert held == f"held by run {killed[:8]} FAILURE ended 0 min ago; 1 step(s) waiting"

        wait = instance.run_monitoring_settings["free_slots_after_run_end_seconds"]
        monkeypatch.setattr(
            concurrency, "get_current_datetime", lambda: datetime_from_timestamp(ended) + timedelta(seconds=wait + 1)
        )
        list(concurrency.execute_concurrency_slots_iteration(SimpleNamespace(instance=instance), logging.getLogger()))
        assert held_slots(instance) == set()
        assert dict(pool_states(instance, defs()))["redis_publish"] == "free"  # the waiting step was given the slot
        instance.event_log_storage.free_concurrency_slots_for_run("next-run")
        claimed = instance.event_log_storage.claim_concurrency_slot("redis_publish", "next-run", "publish")
        assert claimed.is_claimed


def test_without_a_daemon_pools_free_releases_what_a_killed_run_held(home: Path) -> None:
    """Without a daemon (``dagster asset materialize`` killed, no ``precompute dev``) nothing freed the slot of a
    dead run, even once it was marked failed: every later run of the pool waited for good (h_crash)."""
    with dg.DagsterInstance.get() as instance:
        killed = killed_pooled_run(instance)
        done = free_pool_slots(instance, defs())
        assert done == {"freed": [], "held": [{"run": killed, "pools": ["redis_publish"], "status": "STARTED"}]}
        assert held_slots(instance) == {killed}  # a run that has not ended keeps its slot unless named
        with pytest.raises(
            ValueError, match=f"no run holding a pool slot start with 'zz' .runs holding one: {killed[:8]}"
        ):
            free_pool_slots(instance, defs(), run="zz")
        done = free_pool_slots(instance, defs(), run=killed[:8])
        assert done["freed"] == [{"run": killed, "pools": ["redis_publish"], "status": "STARTED -> FAILURE"}]
        assert held_slots(instance) == set() and instance.get_run_by_id(killed).status == dg.DagsterRunStatus.FAILURE
        assert dict(pool_states(instance, defs()))["redis_publish"] == "free"
        # A run that ended (failed by the UI or run monitoring) is freed without being named.
        ended = killed_pooled_run(instance)
        instance.report_run_failed(instance.get_run_by_id(ended))
        later = instance.get_run_record_by_id(ended).end_time + 60
        assert "`precompute pools free` does" in dict(pool_states(instance, defs(), now=later))["redis_publish"]
        assert free_pool_slots(instance, defs())["freed"][0]["run"] == ended and held_slots(instance) == set()
        # A killed run that held no pool slot (a drain, a warming) still holds one of dagster.yaml's run slots, until
        # run monitoring's max runtime (6 h): queued runs waited behind it, and it could not be named (h_crash2).
        drain = create_run_for_test(instance, job_name="__ASSET_JOB", status=dg.DagsterRunStatus.STARTED).run_id
        started = instance.get_run_record_by_id(drain).create_timestamp.timestamp()
        # `precompute status` lists it with the whole ID `pools free --run` takes for it, and says so once it is old
        assert runs_in_progress(instance, now=started + 120) == [("STARTED", f"{drain} __ASSET_JOB for 2 min")]
        ((_, old),) = runs_in_progress(instance, now=started + 2 * 3600)
        assert old.endswith("for 2 h 0 min (if its worker is gone: `precompute pools free --run ID` fails it and "
                            "frees its slots)")  # fmt: skip
        with pytest.raises(
            ValueError, match=f"nor is it the whole ID of a run in progress .runs in progress: {drain} "
        ):
            free_pool_slots(instance, defs(), run=drain[:8])  # a prefix could name a healthy run: its whole ID only
        assert instance.get_run_by_id(drain).status == dg.DagsterRunStatus.STARTED
        done = free_pool_slots(instance, defs(), run=drain)
        assert done["freed"] == [{"run": drain, "pools": [], "status": "STARTED -> FAILURE"}]
        assert instance.get_run_by_id(drain).status == dg.DagsterRunStatus.FAILURE


WARMING_RUN = textwrap.dedent(
    """\
    import time
    import dagster as dg
    from precompute_assets.defs.campaigns import WARMING_TAGS

    @dg.asset
    def campaign_ctr():
        time.sleep(600)

    dg.materialize([campaign_ctr], instance=dg.DagsterInstance.get(), tags=WARMING_TAGS)
    """
)


def test_a_killed_warming_run_is_failed_and_retried_within_the_hour(home: Path, monkeypatch) -> None:
    """A dead warming run holds its campaign's run slot and counts as busy for the backstop: it must end (and be
    re-executed) long before a campaign in the 24 h warming horizon launches, not after the default 6 h."""
    from dagster._daemon.auto_run_reexecution.auto_run_reexecution import should_retry

    with dg.DagsterInstance.get() as instance:
        worker = subprocess.Popen([sys.executable, "-c", WARMING_RUN], env=os.environ.copy())
        try:
            deadline = time.monotonic() + 120
            while worker.poll() is None and time.monotonic() < deadline:
                started = instance.get_run_records(dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]))
                if started:
                    break
                time.sleep(0.2)
            (record,) = started
        finally:
            worker.send_signal(signal.SIGKILL)
            worker.wait()
        monkeypatch.setattr(run_monitoring, "get_current_timestamp", lambda: record.start_time + 3600 + 1)
        run_monitoring.monitor_started_run(instance, None, record, logging.getLogger("test"))
        run = instance.get_run_by_id(record.dagster_run.run_id)
        assert run.status == dg.DagsterRunStatus.FAILURE
        assert should_retry(run, instance)


TASK_RUN_TAGS = {PRIORITY_TAG: "7", TASK_TAG: "next_actions", **RERUN_IF_WORKER_DIES}  # as run_requests tags them


@pytest.mark.parametrize(
    ("tags", "reason", "retried"),
    [
        (WARMING_TAGS, "START_TIMEOUT", True),  # the daemon died with the run STARTING: run monitoring failed it
        (WARMING_TAGS, "UNEXPECTED_TERMINATION", True),  # its worker was killed
        (WARMING_TAGS, "STEP_FAILURE", False),  # a step that failed had its own retries (WARMING_RETRY)
        ({}, "START_TIMEOUT", False),  # other jobs are not retried
        (TASK_RUN_TAGS, "UNEXPECTED_TERMINATION", True),  # a task run's worker killed: the sensor never asks again
        (TASK_RUN_TAGS, "STEP_FAILURE", False),
    ],
)
def test_a_warming_or_task_run_that_died_is_re_executed_by_the_daemon(home: Path, tags, reason, retried) -> None:
    from dagster._core.storage.tags import RUN_FAILURE_REASON_TAG
    from dagster._daemon.auto_run_reexecution.auto_run_reexecution import should_retry

    with dg.DagsterInstance.get() as instance:
        assert instance.run_retries_enabled and instance.run_retries_max_retries == 0
        run = create_run_for_test(instance, job_name="campaign_warming_job", status=dg.DagsterRunStatus.FAILURE,
                                  tags={**tags, RUN_FAILURE_REASON_TAG: reason})  # fmt: skip
        assert should_retry(run, instance) is retried
