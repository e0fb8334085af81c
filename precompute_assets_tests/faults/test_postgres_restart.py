"""Fault: PostgreSQL (Dagster's run, event and schedule storage) restarts while a run is executing.

A private PostgreSQL server of this module (the same embedded server code as the stack, on its own port and data
folder: the session's server is never touched) holds the Dagster instance. An earlier run is recorded; then a run
is executing (its op writes an event every 100 ms) while the server is stopped (``pg_ctl -m fast``, as an upgrade
or a crash-restart would) and started again on the same port: after 1 s (the run writes log lines), and after
14 s, longer than Dagster's storage retries a connection (the run writes asset observations, system events). A
real Dagster webserver (``DagsterWebserver`` under uvicorn, on 127.0.0.1) on the same instance is polled with a
GraphQL runs query all along.

Measured: the run's outcome (it ends SUCCESS or FAILURE, never stuck in STARTED), whether the earlier run and its
materialization are still there, how long after the server accepts connections again ``DagsterInstance`` queries
and the webserver's GraphQL answer again, and what the webserver answered during the outage.
"""

import contextlib
import json
import shutil
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import dagster as dg
import psycopg2
import pytest
import uvicorn
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster._core.workspace.load_target import EmptyWorkspaceTarget
from dagster_webserver.webserver import DagsterWebserver

from precompute_assets.stack import PostgresServer, free_port
from precompute_assets.storage.postgres import libpq_url
from precompute_assets_tests.faults.figures import record

# How long the server stays stopped after its shutdown: a quick restart, and one longer than Dagster's PostgreSQL
# storage keeps retrying a connection (5 retries after 0.2, 0.6, 1.4, 3.0 and 6.2 s, each +-0.2 s: 11.4 s).
SHORT_DOWN_S, LONG_DOWN_S = 1.0, 14.0
RUNS_QUERY = "{ runsOrError { __typename ... on Runs { results { runId status } } ... on PythonError { message } } }"


@pytest.fixture(scope="module")
def private_postgres(session_dir: Path):
    """A PostgreSQL server of this test only (initdb in the session folder), stopped and deleted on every exit."""
    server = PostgresServer(session_dir / "servers" / f"pg-{uuid.uuid4().hex[:8]}", free_port(),
                            services=session_dir / "services")  # fmt: skip
    try:
        server.start()
        yield server
    finally:
        with contextlib.suppress(Exception):
            server.stop()
        server.remove()
        shutil.rmtree(server.dir, ignore_errors=True)


def admin(url: str, statement: str) -> None:
    conn = psycopg2.connect(libpq_url(url), connect_timeout=10)  # a new connection: the server restarts between
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(statement)
    finally:
        conn.close()


@contextlib.contextmanager
def fresh_database(server: PostgresServer):
    """A database of its own on ``server`` for one test's Dagster instance, dropped afterwards."""
    name = f"dagster_{uuid.uuid4().hex[:10]}"
    admin(server.url("postgres"), f'CREATE DATABASE "{name}"')
    try:
        yield server.url(name)
    finally:
        admin(server.url("postgres"), f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def webserver(instance: dg.DagsterInstance):
    """The Dagster webserver's ASGI app on ``instance``, served by uvicorn on 127.0.0.1 from a thread."""
    port = free_port()
    with WorkspaceProcessContext(instance, EmptyWorkspaceTarget()) as context:
        app = DagsterWebserver(context).create_asgi_app()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 60
            while not server.started:
                assert thread.is_alive() and time.monotonic() < deadline, "the webserver did not start"
                time.sleep(0.05)
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
            thread.join(timeout=30)


def graphql_runs(base: str) -> tuple[bool, str, set[str]]:
    """(answered with runs, what it answered, run ids) for the webserver's runs query."""
    request = urllib.request.Request(f"{base}/graphql", data=json.dumps({"query": RUNS_QUERY}).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as error:
        return False, f"HTTP {error.code}", set()
    except (urllib.error.URLError, OSError) as error:
        return False, f"no answer: {error}", set()
    runs = (body.get("data") or {}).get("runsOrError") or {}
    if runs.get("__typename") == "Runs":
        return True, "Runs", {r["runId"] for r in runs["results"]}
    detail = runs.get("__typename") or "errors"
    return False, f"HTTP 200, {detail}", set()


class Poller:
    """Calls ``probe`` every 100 ms from a thread, recording (sent, answered, ok, what it answered)."""

    def __init__(self, probe) -> None:
        self.probe, self.samples, self._stop = probe, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            sent = time.monotonic()
            ok, what = self.probe()
            self.samples.append((sent, time.monotonic(), ok, what))
            time.sleep(0.1)

    def first_ok_after(self, moment: float) -> float | None:
        """When a probe first answered successfully at or after ``moment`` (one sent earlier and still waiting
        counts: that is what its caller sees)."""
        return min((a for _, a, ok, _ in self.samples if ok and a >= moment), default=None)

    def during(self, start: float, end: float) -> list:
        return [sample for sample in self.samples if start <= sample[0] < end]

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def instance_probe(instance: dg.DagsterInstance):
    def probe() -> tuple[bool, str]:
        try:
            instance.get_runs(limit=1)
            return True, "runs"
        except Exception as error:  # noqa: BLE001 - what a caller of the instance sees
            return False, type(error).__name__

    return probe


def webserver_probe(base: str):
    def probe() -> tuple[bool, str]:
        ok, what, _ = graphql_runs(base)
        return ok, what

    return probe


@dg.asset
def earlier() -> int:
    return 1


class Restart:
    """Stops the server and starts it again on the same port after ``down_s``, from a thread; records when."""

    def __init__(self, server: PostgresServer, down_s: float, events: str) -> None:
        self.server, self.down_s, self.events, self.times, self.error = server, down_s, events, {}, None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.attempted = 0  # progress events the run tried to write

    def _run(self) -> None:
        try:
            self.times["stop"] = time.monotonic()
            self.server.stop()
            self.times["stopped"] = time.monotonic()
            time.sleep(self.down_s)
            self.server.start()
            self.times["accepting"] = time.monotonic()  # start() returns once it accepts connections
        except BaseException as error:  # reported by the test
            self.error = error


RESTART: dict[str, Restart | None] = {"current": None}


@dg.asset
def during(context: dg.AssetExecutionContext) -> int:
    """Restarts the server (when the test asks) and records progress every 100 ms until it is back (and a few times
    more): a log line (a user event: Dagster drops it if it cannot be stored) or an asset observation (a system
    event: its failure fails the step), each one an insert into the event log."""
    restart = RESTART["current"]
    if restart is not None:
        restart.thread.start()
    n = 0
    while (restart is not None and restart.thread.is_alive()) or n < 5:
        n += 1
        if restart is not None:
            restart.attempted = n
        if restart is not None and restart.events == "observation":
            context.log_event(dg.AssetObservation(asset_key="during", metadata={"progress": n}))
        else:
            context.log.info(f"progress {n}")
        time.sleep(0.1)
    return n


@dg.asset
def after(during: int) -> int:
    return during + 1


def progress_events(instance: dg.DagsterInstance, run_id: str) -> int:
    return sum(
        1
        for e in instance.all_logs(run_id)
        if e.user_message.startswith("progress ")
        or (e.is_dagster_event and e.dagster_event.event_type == dg.DagsterEventType.ASSET_OBSERVATION)
    )


def failure_summary(instance: dg.DagsterInstance, run_id: str) -> str | None:
    """The recorded failure of the run (a step's, else the run's own), as its root cause."""
    failures = [
        e.dagster_event.event_specific_data.error
        for e in instance.all_logs(run_id)
        if e.is_dagster_event
        and e.dagster_event.event_type in (dg.DagsterEventType.STEP_FAILURE, dg.DagsterEventType.RUN_FAILURE)
        and e.dagster_event.event_specific_data.error is not None
    ]
    if not failures:
        return None
    error = failures[0]
    while error.cause is not None:
        error = error.cause
    return f"{error.cls_name}: {error.message.strip().splitlines()[0]}"[:200]


@pytest.mark.parametrize(
    ("down_s", "events"),
    [(SHORT_DOWN_S, "log"), (LONG_DOWN_S, "observation")],
    ids=["quick-restart", "longer-than-retry-budget"],
)
def test_a_run_ends_cleanly_through_a_postgres_restart_and_history_is_kept(
    private_postgres, down_s, events, record_property
):
    with (
        fresh_database(private_postgres) as url,
        dg.instance_for_test(overrides={"storage": {"postgres": {"postgres_url": url}}}) as instance,
    ):
        first = dg.materialize([earlier], instance=instance)
        assert first.success
        with webserver(instance) as base:
            ok, _, ids = graphql_runs(base)
            assert ok and first.run_id in ids

            RESTART["current"] = restart = Restart(private_postgres, down_s, events)
            try:
                with Poller(webserver_probe(base)) as web, Poller(instance_probe(instance)) as queries:
                    started = time.monotonic()
                    outcome_error = None
                    try:
                        result = dg.materialize([during, after], instance=instance, raise_on_error=False)
                    except Exception as error:  # the run's own storage failing under it: recorded as the outcome
                        outcome_error = error
                    run_seconds = time.monotonic() - started
                    restart.thread.join(timeout=120)
                    assert restart.error is None, restart.error
                    accepting = restart.times["accepting"]
                    deadline = time.monotonic() + 60
                    while web.first_ok_after(accepting) is None or queries.first_ok_after(accepting) is None:
                        assert time.monotonic() < deadline, (web.samples[-3:], queries.samples[-3:])
                        time.sleep(0.05)
            finally:
                RESTART["current"] = None
            ok, _, ids_after = graphql_runs(base)

        # The run ended, one way or the other, and says so after the restart (never left STARTED)
        runs = {r.run_id: r for r in instance.get_runs()}
        (run_id,) = [rid for rid in runs if rid != first.run_id]
        status = runs[run_id].status
        assert status in (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE), status
        stored = progress_events(instance, run_id)
        failure = failure_summary(instance, run_id)
        if status == dg.DagsterRunStatus.SUCCESS:
            assert outcome_error is None and result.success
            assert instance.get_latest_materialization_event(dg.AssetKey("after")).run_id == run_id
            rerun = None
        else:
            assert failure is not None  # the failure is recorded with its cause
            rerun = dg.materialize([during, after], instance=instance)  # a retry now succeeds
            assert rerun.success
        # History is kept: the earlier run, its events and its materialization, also in the webserver
        assert runs[first.run_id].status == dg.DagsterRunStatus.SUCCESS
        event = instance.get_latest_materialization_event(dg.AssetKey("earlier"))
        assert event is not None and event.run_id == first.run_id
        assert ok and {first.run_id, run_id} <= ids_after

    outage = web.during(restart.times["stop"], accepting)
    record(
        record_property,
        f"postgresql restarted during a run ({down_s:.0f} s down, the run writing {events} events)",
        run_status=status.value,
        run_failure=failure,
        run_raised=None if outcome_error is None else repr(outcome_error)[:200],
        retry_status=None if rerun is None else "SUCCESS",
        run_seconds=round(run_seconds, 3),
        shutdown_s=round(restart.times["stopped"] - restart.times["stop"], 3),
        down_s=round(accepting - restart.times["stopped"], 3),
        events_attempted=restart.attempted,
        events_stored=stored,
        earlier_run_kept=True,
        instance_queries_back_after_s=round(max(0.0, queries.first_ok_after(accepting) - accepting), 3),
        webserver_graphql_back_after_s=round(max(0.0, web.first_ok_after(accepting) - accepting), 3),
        webserver_answers_during_outage=sorted({what for *_, what in outage}),
        webserver_failed_polls_during_outage=sum(not ok for *_, ok, _ in outage),
        webserver_polls_during_outage=len(outage),
        webserver_slowest_answer_s=round(max(a - s for s, a, *_ in web.samples), 3),
    )
