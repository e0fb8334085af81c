"""``precompute bench events``: user events from the client to precomputed values, and stampede protection.

One JSON object; every ratio is against a reference measured in the same run:

- ``events_per_s`` / ``events_dropped``: ``record_event`` from one process (one thread) at a paced target rate
  (``event_rate``, default 50,000/s) over ``events`` events; the rate achieved and how many of them the event
  logger dropped (buffer full or write failed) once it flushed. ``burst_record_per_s`` / ``burst_dropped``: the
  same count unpaced (as fast as the caller can), and ``written_per_s``: the events of that burst written to Redis per
  second until the logger's ``close`` returned (the writer thread's drain rate). ``reference_xadd_per_s``: bare
  redis-py pipelined ``XADD`` of the same entries from the same process; ``ratio_vs_xadd`` = ``written_per_s`` /
  it (both unpaced; the paced ``events_per_s`` is the target's rate when nothing drops, not a throughput).
- ``sensor_tick_s``: one ``user_event_sensor`` evaluation over ``sensor_events`` new events on the real Redis,
  with the approved next-action model (its predictions included), on a PostgreSQL-backed instance.
- ``login_to_readable_s``: ``PredictionCache.record_event(login)`` → the logger's flush → one sensor tick (called
  in-process right away: a daemon ticks it every 5 s, which would add up to 5 s) → the requested
  ``next_actions`` run executed in-process (``execute_in_process`` on that instance, not a daemon-launched run
  worker) → ``PredictionCache.get("next_actions", user)`` polled until readable. With ``daemon_logins=N``, also
  ``login_to_readable_daemon_s``: N logins (3.7 s, 7.4 s... apart, unaligned with the daemon's 5 s sensor visits)
  through a real ``dagster-daemon`` subprocess on the same PostgreSQL instance (the project's dagster.yaml:
  QueuedRunCoordinator dequeuing every second, default run launcher: each run in its own process), with
  ``daemon_breakdown_s`` from the run records (login → run created → started → value readable).
- ``recomputes_per_expiry_early`` vs ``recomputes_per_expiry_plain``: one hot key with a ``hot_ttl_s`` live TTL
  read ~``hot_rate`` times a second by ``hot_threads`` threads (a client each) through ``get_or_compute`` for
  ``hot_seconds``; a compute takes ``compute_s``. Early = XFetch (beta 1) + the recompute lock (the default);
  plain = ``xfetch_beta=0, recompute_lock_ms=0`` (the read-through before them). Computes / (seconds / TTL).

Set-up (not timed): a scratch Dagster instance on a scratch PostgreSQL database, a private Redis namespace, a
synthetic week of user events in a scratch lake and ``next_action_model`` trained on it and approved. Everything is
removed afterwards.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import threading
import time
import uuid

from ..serving import KeySchema, PredictionCache, connect
from ..serving.connection import send_pipelined
from ..serving.events import ACTIONS, EventLogger, UserEvent, events_stream
from .bench import drop_namespace

DAY = "2026-11-20"


def _paced_events(logger: EventLogger, n: int, rate: float | None) -> float:
    """Record ``n`` events (at most ``rate`` a second when given); returns the seconds it took."""
    started = time.perf_counter()
    step = 1000
    for lo in range(0, n, step):
        for i in range(lo, min(lo + step, n)):
            logger.record_event(f"u{i % 5000:05d}", ACTIONS[i % 6], entity=f"e{i}", tenant=f"t{i % 100:02d}")
        if rate:
            ahead = (lo + step) / rate - (time.perf_counter() - started)
            if ahead > 0:
                time.sleep(ahead)
    return time.perf_counter() - started


def _event_rates(redis_url: str, namespace: str, n: int, rate: float) -> dict:
    out = {}
    for label, target in (("paced", rate), ("burst", None)):
        schema = KeySchema(f"{namespace}{label[0]}")
        logger = EventLogger(connect(redis_url, socket_timeout=5), schema)
        started = time.perf_counter()
        seconds = _paced_events(logger, n, target)
        logger.close()  # every event written (or dropped and counted)
        drained = time.perf_counter() - started
        client = logger.client
        written = client.xlen(events_stream(schema))
        out[label] = (n / seconds, logger.stats.not_confirmed, written, written / drained)
        drop_namespace(client, schema)
        client.close()
    # reference: bare pipelined XADD of the same entries, from this process
    schema = KeySchema(f"{namespace}x")
    client = connect(redis_url, socket_timeout=5)
    stream = events_stream(schema)
    now = time.time_ns() // 1_000_000
    started = time.perf_counter()
    # on the logger's transport (send_pipelined): a redis-py pipeline costs more
    for lo in range(0, n, 1000):
        commands = []
        for i in range(lo, min(lo + 1000, n)):
            event = UserEvent(now, f"u{i % 5000:05d}", ACTIONS[i % 6], f"e{i}", f"t{i % 100:02d}")
            fields = [part for item in event.fields().items() for part in item]
            commands.append((b"XADD", stream, b"MAXLEN", b"~", b"10000000", b"*", *fields))
        send_pipelined(client, commands)
    reference = n / (time.perf_counter() - started)
    drop_namespace(client, schema)
    client.close()
    (paced_rate, paced_dropped, paced_written, _), (burst_rate, burst_dropped, _, drained) = out["paced"], out["burst"]
    no_drop = paced_rate if not paced_dropped else None
    for share in (0.8, 0.6, 0.4) if paced_dropped else ():  # the highest paced rate without a drop
        schema = KeySchema(f"{namespace}n")
        logger = EventLogger(connect(redis_url, socket_timeout=5), schema)
        seconds = _paced_events(logger, n, rate * share)
        logger.close()
        drop_namespace(logger.client, schema)
        logger.client.close()
        if not logger.stats.not_confirmed:
            no_drop = n / seconds
            break
    return {
        "events": n,
        "event_rate_target": rate,
        "events_per_s": round(paced_rate),
        "events_dropped": paced_dropped,
        "events_written": paced_written,
        "no_drop_events_per_s": None if no_drop is None else round(no_drop),
        "burst_record_per_s": round(burst_rate),
        "burst_dropped": burst_dropped,
        "written_per_s": round(drained),
        "reference_xadd_per_s": round(reference),
        # both unpaced, the same entries from the same process, timed until the last is written: the paced rate is
        # the target's, whatever the logger could do
        "ratio_vs_xadd": round(drained / reference, 3),
    }


def _recomputes(redis_url: str, namespace: str, *, plain: bool, threads: int, rate: float, seconds: float,
                ttl_s: int, compute_s: float) -> dict:  # fmt: skip
    schema = KeySchema(namespace)
    options = {"xfetch_beta": 0.0, "recompute_lock_ms": 0} if plain else {}
    caches = [
        PredictionCache(
            connect(redis_url, socket_timeout=5), schema=schema, live_ttl_s=ttl_s, pointer_ttl_s=60, **options
        )  # fmt: skip
        for _ in range(threads)
    ]
    counted, lock = [0], threading.Lock()
    counting = threading.Event()

    def compute(key: str) -> dict:
        time.sleep(compute_s)
        if counting.is_set():
            with lock:
                counted[0] += 1
        return {"key": key, "at": time.time()}

    caches[0].get_or_compute("hot", "k", compute)  # warm: stored, not counted
    stop = threading.Event()
    reads = [0] * threads
    period = threads / rate

    def reader(index: int) -> None:
        cache, next_at = caches[index], time.perf_counter() + index * period / threads
        while not stop.is_set():
            cache.get_or_compute("hot", "k", compute)
            reads[index] += 1
            next_at += period
            delay = next_at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)

    workers = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(threads)]
    counting.set()
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    time.sleep(seconds)
    stop.set()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - started
    counting.clear()
    client = caches[0].client
    drop_namespace(client, schema)
    stats = {
        "recomputes": counted[0],
        "expiries": round(elapsed / ttl_s, 2),
        "per_expiry": round(counted[0] / (elapsed / ttl_s), 2),
        "reads_per_s": round(sum(reads) / elapsed),
        "early": sum(c.early_recomputes for c in caches),
        "lock_waits": sum(c.lock_waits for c in caches),
        "errors": sum(c.errors for c in caches),
    }
    for cache in caches:
        cache.close()
    return stats


def _login_pipeline(
    redis_url: str,
    dagster_pg_url: str,
    namespace: str,
    *,
    sensor_events: int,
    seed: int,
    daemon_logins: int = 0,
) -> dict:
    import dagster as dg

    from ..defs.partitions import DEFAULT_PARTITIONS
    from ..defs.resources import (
        CampaignRegistryResource,
        DeploymentResource,
        LakeResource,
        ModelStoreResource,
        ParquetIOManager,
        RedisResource,
    )
    from ..defs.tasks import TASK_TAG, build_user_event_sensor, precompute_tasks_job
    from ..defs.user_events import NEXT_ACTION_MODEL, next_action_model, write_user_event_lake
    from ..storage.lake import Lake
    from ..storage.postgres import scratch_database

    schema = KeySchema(namespace)
    with contextlib.ExitStack() as cleanup:
        scratch = tempfile.mkdtemp(prefix="precompute-bench-events-")
        cleanup.callback(shutil.rmtree, scratch, True)
        client = connect(redis_url, socket_timeout=5)
        cleanup.callback(client.close)
        cleanup.callback(drop_namespace, client, schema)
        dagster_db = cleanup.enter_context(scratch_database(dagster_pg_url, "bench"))
        # the sensor asks a campaign registry whether campaigns hold the uploads' CTRs: one of its own, on the server
        # that holds the scratch Dagster database already (the application database's role may not create databases)
        app_db = cleanup.enter_context(scratch_database(dagster_pg_url, "benchapp"))
        instance = cleanup.enter_context(
            dg.instance_for_test(overrides={"storage": {"postgres": {"postgres_url": dagster_db}}})
        )
        setup_started = time.perf_counter()
        lake_uri, models = f"{scratch}/lake", f"{scratch}/models"
        lake_resource = LakeResource(base_uri=lake_uri)
        resources = {
            "redis": RedisResource(url=redis_url, namespace=namespace),
            "lake": lake_resource,
            "io_manager": ParquetIOManager(lake=lake_resource),
            "model_store": ModelStoreResource(root=models),
            "deployment": DeploymentResource(),
            "campaign_registry": CampaignRegistryResource(url=app_db),
        }
        write_user_event_lake(Lake(lake_uri), DEFAULT_PARTITIONS.days_ending(DAY, 7), n_users=120, seed=seed)
        trained = dg.materialize(
            [next_action_model], partition_key=DAY, instance=instance, resources=resources,
            run_config={"ops": {NEXT_ACTION_MODEL: {"config": {"training_days": 7, "n_estimators": 30}}}},
        )  # fmt: skip
        if not trained.success:
            raise RuntimeError("next_action_model was not trained")
        # sensor_events new events of 600 users in the stream (the real clock), through the event logger
        logger = EventLogger(connect(redis_url, socket_timeout=5), schema, max_buffer=sensor_events + 1)
        for i in range(sensor_events):
            user = f"u{(i * 7919) % 600:04d}"
            action = ACTIONS[(i * 31) % 6]
            entity = f"cr{i:05d}" if action == "creative_upload" else None
            logger.record_event(user, action, entity=entity, tenant=f"t{int(user[1:]) % 100:02d}")
        logger.close()
        logger.client.close()
        if logger.stats.written != sensor_events:
            raise RuntimeError(f"only {logger.stats.written} of {sensor_events} events were written")
        sensor = build_user_event_sensor()
        sensor_resources = {k: resources[k] for k in ("redis", "model_store", "deployment", "campaign_registry")}

        def tick(cursor: str | None):
            return sensor(dg.build_sensor_context(instance=instance, cursor=cursor, resources=sensor_resources))

        setup_s = time.perf_counter() - setup_started
        started = time.perf_counter()
        first = tick(None)
        tick_s = time.perf_counter() - started
        if len(first.run_requests) == 0:
            raise RuntimeError("the sensor requested nothing")

        # login -> tick -> run -> readable
        user = f"login{uuid.uuid4().hex[:6]}"
        cache = PredictionCache.from_url(redis_url, namespace=namespace, socket_timeout=5, log_queries=False)
        cleanup.callback(cache.close)
        if cache.get("next_actions", user) is not None:
            raise RuntimeError("the user's next actions are readable before the login")
        started = time.perf_counter()
        cache.record_event(user, "login", tenant="t01")
        wanted: list = []
        while not wanted:
            if time.perf_counter() - started > 60:
                raise RuntimeError("the login never reached the sensor")
            time.sleep(0.005)  # the event logger flushes within its flush interval (50 ms)
            result = tick(first.cursor)  # a SkipReason while the event is not in the stream yet
            wanted = [r for r in getattr(result, "run_requests", []) if r.tags[TASK_TAG] == "next_actions"]
        tick_done = time.perf_counter()
        (request,) = wanted
        run = precompute_tasks_job.execute_in_process(
            run_config=request.run_config, tags=request.tags, instance=instance, resources=resources
        )
        run_done = time.perf_counter()
        value = cache.get("next_actions", user)
        while value is None and time.perf_counter() - started < 60:
            time.sleep(0.005)
            value = cache.get("next_actions", user)
        login_s = time.perf_counter() - started
        if not run.success or value is None or set(value["probabilities"]) != set(ACTIONS):
            raise RuntimeError("the login's next actions never became readable")
        daemon = (
            _login_with_daemon(
                instance, redis_url, dagster_db, app_db, f"{namespace}d", lake_uri, models, scratch, daemon_logins
            )
            if daemon_logins
            else {"login_to_readable_daemon_s": None}
        )
        if daemon_logins:
            cleanup.callback(drop_namespace, client, KeySchema(f"{namespace}d"))
        return {
            **daemon,
            "sensor_events": sensor_events,
            "sensor_tick_s": round(tick_s, 3),
            "sensor_runs_requested": len(first.run_requests),
            "login_to_readable_s": round(login_s, 3),
            "login_to_tick_s": round(tick_done - started, 3),
            "login_run_s": round(run_done - tick_done, 3),
            "login_path": "record_event -> sensor tick called in-process at once -> precompute_tasks_job "
            "execute_in_process on a PostgreSQL instance -> cache.get (no dagster-daemon: its sensor visits every 5 s "
            "and a run worker process would add to this)",
            "login_goal_s": 15,
            "setup_seconds": round(setup_s, 1),
        }


_CODE_LOCATION = """
import dagster as dg

from precompute_assets.defs.resources import (
    CampaignRegistryResource,
    DeploymentResource,
    LakeResource,
    ModelStoreResource,
    RedisResource,
)
from precompute_assets.defs.tasks import precompute_tasks_job, user_event_sensor

defs = dg.Definitions(
    jobs=[precompute_tasks_job],
    sensors=[user_event_sensor],
    resources={{
        "redis": RedisResource(url={redis_url!r}, namespace={namespace!r}),
        "lake": LakeResource(base_uri={lake_uri!r}),
        "model_store": ModelStoreResource(root={models!r}),
        "deployment": DeploymentResource(),
        "campaign_registry": CampaignRegistryResource(url={app_db!r}),
    }},
)
"""


def _instance_config(url: str) -> dict:
    """The project's dagster.yaml (its run coordinator, dequeue interval and concurrency limits: what a deployment
    runs with), its storage pointed at the scratch database."""
    import yaml

    from ..stack import project_dir

    config = yaml.safe_load((project_dir() / "dagster.yaml").read_text())
    config["storage"] = {"postgres": {"postgres_url": url}}
    return config


def _run_breakdown(instance, logged: list[tuple[str, float, float]]) -> list[dict]:
    """Per login: its next_actions run's record, seconds from the login to the run's creation (sensor tick),
    creation to start (queue and launch of the run process), start to the value readable, and the run's length."""
    parts = []
    records = instance.get_run_records()
    for user, login_at, readable_s in logged:
        for record in records:
            config = record.dagster_run.run_config.get("ops", {}).get("run_precompute_task", {}).get("config", {})
            if user in config.get("entities", []) and config.get("task_type") == "next_actions" and record.end_time:
                created = record.create_timestamp.timestamp()
                parts.append({
                    "login_to_run_created": round(created - login_at, 2),
                    "created_to_started": round(record.start_time - created, 2),
                    "started_to_readable": round(login_at + readable_s - record.start_time, 2),
                    "run_s": round(record.end_time - record.start_time, 2),
                })  # fmt: skip
    return parts


def _login_with_daemon(
    instance,
    redis_url: str,
    dagster_db: str,
    app_db: str,
    namespace: str,
    lake_uri: str,
    models: str,
    scratch: str,
    logins: int,
) -> dict:
    """``login_to_readable_s`` with a real ``dagster-daemon`` (sensor daemon + queued run coordinator + default run
    launcher: each run in its own process) on the same PostgreSQL instance and approved model, in a fresh Redis
    namespace: logins at unaligned moments, each timed from ``record_event`` to readable."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    from ..defs.tasks import user_event_sensor

    home = Path(scratch) / "dagster_home"
    home.mkdir()
    config = _instance_config(dagster_db)
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    # The queued run coordinator's dequeue interval (Dagster's default: 5 s).
    dequeue_s = float(config.get("run_coordinator", {}).get("config", {}).get("dequeue_interval_seconds", 5))
    (home / "bench_location.py").write_text(
        _CODE_LOCATION.format(redis_url=redis_url, namespace=namespace, lake_uri=lake_uri, models=models, app_db=app_db)
    )
    (home / "workspace.yaml").write_text(
        f"load_from:\n  - python_file:\n      relative_path: bench_location.py\n      working_directory: {home}\n"
    )
    daemon = shutil.which("dagster-daemon", path=str(Path(sys.executable).parent)) or "dagster-daemon"
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    log = open(home / "daemon.log", "wb")  # noqa: SIM115
    started = time.perf_counter()
    process = subprocess.Popen(
        [daemon, "run", "-w", str(home / "workspace.yaml")], env=env, cwd=home, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    cache = PredictionCache.from_url(redis_url, namespace=namespace, socket_timeout=5, log_queries=False)
    times: list[float] = []
    parts: list[dict] = []
    logged: list[tuple[str, float, float]] = []  # user, login at (epoch s), seconds to readable
    try:
        # wait until the sensor daemon has ticked once (its log line), so that start-up is not counted
        while b"user_event_sensor" not in (home / "daemon.log").read_bytes():
            if process.poll() is not None or time.perf_counter() - started > 120:
                raise RuntimeError("dagster-daemon did not start: " + (home / "daemon.log").read_text()[-2000:])
            time.sleep(0.2)
        daemon_start_s = time.perf_counter() - started
        for i in range(logins):
            time.sleep(3.7 * (i + 1))  # unaligned with the daemon's 5 s sensor visits
            user = f"dlogin{i}{uuid.uuid4().hex[:6]}"
            begun = time.perf_counter()
            cache.record_event(user, "login", tenant="t01")
            while cache.get("next_actions", user) is None:
                if time.perf_counter() - begun > 120:
                    raise RuntimeError("no value 120 s after the login: " + (home / "daemon.log").read_text()[-2000:])
                time.sleep(0.02)
            times.append(time.perf_counter() - begun)
            logged.append((user, time.time() - times[-1], times[-1]))
        deadline = time.perf_counter() + 30  # the runs end after they wrote the values: wait for their records
        while time.perf_counter() < deadline:
            parts = _run_breakdown(instance, logged)
            if len(parts) >= len(logged):
                break
            time.sleep(0.5)
    finally:
        cache.close()
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        # The daemon's code server outlives a SIGTERM (and its heartbeat timeout): the group is ours, end it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        log.close()
    return {
        "login_to_readable_daemon_s": [round(t, 2) for t in times],
        "login_to_readable_daemon_max_s": round(max(times), 2),
        "daemon_path": f"record_event -> dagster-daemon sensor tick (minimum_interval "
        f"{user_event_sensor.minimum_interval_seconds} s) -> QueuedRunCoordinator (the project's dagster.yaml: dequeue "
        f"every {dequeue_s:g} s) -> DefaultRunLauncher run process (a code location of the job and the "
        "sensor only) -> cache.get",
        "daemon_breakdown_s": parts,
        "daemon_start_s": round(daemon_start_s, 1),
    }


def bench_events(
    redis_url: str,
    app_db_url: str | None = None,
    dagster_pg_url: str | None = None,
    *,
    events: int = 200_000,
    event_rate: float = 50_000,
    sensor_events: int = 10_000,
    hot_threads: int = 8,
    hot_rate: float = 1000,
    hot_seconds: float = 6.0,
    hot_ttl_s: int = 1,
    compute_s: float = 0.05,
    daemon_logins: int = 0,
    seed: int = 0,
) -> dict:
    """The measurements of the module docstring, as one JSON-able dict. ``app_db_url`` is not used (the sensor's
    campaign registry is a scratch database beside the scratch Dagster one); without ``dagster_pg_url`` the sensor and
    login measurements are None."""
    namespace = f"bench{uuid.uuid4().hex[:8]}"
    result: dict = {"bench": "events"}
    result.update(_event_rates(redis_url, f"{namespace}e", events, event_rate))
    if dagster_pg_url:
        result.update(_login_pipeline(redis_url, dagster_pg_url, f"{namespace}s", sensor_events=sensor_events,
                                      seed=seed, daemon_logins=daemon_logins))  # fmt: skip
    else:
        result.update({"sensor_tick_s": None, "login_to_readable_s": None})
    hot = {"threads": hot_threads, "rate": hot_rate, "seconds": hot_seconds, "ttl_s": hot_ttl_s,
           "compute_s": compute_s}  # fmt: skip
    early = _recomputes(redis_url, f"{namespace}h", plain=False, **hot)
    plain = _recomputes(redis_url, f"{namespace}p", plain=True, **hot)
    result.update({
        "hot_key": f"{hot_threads} threads, ~{hot_rate:g} reads/s, TTL {hot_ttl_s} s, compute {compute_s * 1000:g} ms, "
                   f"{hot_seconds:g} s each",
        "recomputes_per_expiry_early": early["per_expiry"],
        "recomputes_per_expiry_plain": plain["per_expiry"],
        "early_detail": early,
        "plain_detail": plain,
    })  # fmt: skip
    return result
