"""Shared fixtures: one real embedded stack (Redis + PostgreSQL) per test session, isolated per test by
Redis key namespace and by a fresh Dagster instance on the same PostgreSQL."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import dagster as dg
import pytest
import redis

from precompute_assets.serving import KeySchema, connect
from precompute_assets.stack import (
    ENV_APP_DB,
    ENV_DAGSTER_PG,
    ENV_REDIS,
    ENV_SERVICE_ROOT,
    RedisServer,
    Stack,
    alive,
    free_port,
)
from precompute_assets.storage.postgres import scratch_database
from precompute_assets_tests.factories import PROMPT_FULL_SYNC

SESSION_PREFIX = "precompute-tests-"


def pytest_configure(config: pytest.Config) -> None:
    """A SIGTERM (CI's time limit, ``kill``) unwinds like Ctrl-C, so fixtures stop the servers they started."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


def stop_orphaned_sessions() -> None:
    """Stop the servers of earlier test sessions that died without cleaning up (SIGKILL, a lost machine).

    Each session writes its pid into its folder; a folder whose pid no longer runs pytest is an orphan.
    """
    for folder in Path(tempfile.gettempdir()).glob(f"{SESSION_PREFIX}*"):
        try:
            owner = int((folder / "owner.pid").read_text())
        except (OSError, ValueError):
            continue
        if alive(owner, ("pytest", "python")):
            continue
        for home in [folder / "stack", *folder.glob("servers/*")]:
            if (home / "stack.json").exists():
                Stack(home, services=folder / "services").purge()
            elif home.is_dir():
                RedisServer(home, 0).stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def session_dir() -> Iterator[Path]:
    """This session's folder: the stack's home, and (as root) PostgreSQL's service folder, never the system's.

    Kept outside pytest's temp tree: pytest prunes and re-permissions that tree when other sessions start,
    which would pull the data folder from under the PostgreSQL server (it runs as another user as root).
    """
    stop_orphaned_sessions()
    folder = Path(tempfile.mkdtemp(prefix=SESSION_PREFIX))
    (folder / "owner.pid").write_text(str(os.getpid()))
    services = folder / "services"
    services.mkdir(mode=0o711)
    services.chmod(0o711)  # our own folder: the PostgreSQL service user passes through it to its data
    folder.chmod(0o711)
    previous = os.environ.get(ENV_SERVICE_ROOT)
    os.environ[ENV_SERVICE_ROOT] = str(services)
    try:
        yield folder
    finally:
        if previous is None:
            os.environ.pop(ENV_SERVICE_ROOT, None)
        else:
            os.environ[ENV_SERVICE_ROOT] = previous
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(autouse=True)
def environment_restored() -> Iterator[None]:
    """Each test leaves ``os.environ`` as it found it. A command run in-process through ``cli.main`` exports the
    stack's URLs into the environment, as it must for the work it runs after ``up``; monkeypatch restores only what a
    test set itself, so a ``bench publish`` test handed its lake to a later demo test on the same worker, which then
    refused it as someone else's."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(autouse=True)
def no_progress_heartbeat(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process commands say no progress lines (``tools.progress``): a command slowed past ``LOG_EVERY_S`` by a
    loaded machine would add one to the standard error that a test compares whole. ``test_progress`` sets its own."""
    from precompute_assets.tools import progress

    monkeypatch.setattr(progress, "LOG_EVERY_S", 10.0**6)


@pytest.fixture(scope="session")
def stack(session_dir: Path) -> Iterator[Stack]:
    """The real embedded services, started by our own code (or the servers named by the environment),
    stopped and deleted on every exit path."""
    services = Stack(session_dir / "stack")
    try:
        services.up()
        yield services
    finally:
        services.purge()


@pytest.fixture
def redis_server(session_dir: Path) -> Iterator[Callable[..., RedisServer]]:
    """Start private Redis servers for one test (``redis_server(password=..., binary=..., extra_config=...)``);
    every one is stopped when the test ends, passed or failed."""
    started: list[RedisServer] = []

    def start(**options) -> RedisServer:
        options["extra_config"] = (PROMPT_FULL_SYNC, *options.get("extra_config", ()))
        server = RedisServer(session_dir / "servers" / uuid.uuid4().hex[:8], free_port(), **options)
        started.append(server)
        server.start()
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()


@pytest.fixture(scope="session")
def redis_url(stack: Stack) -> str:
    return stack.env()[ENV_REDIS]


@pytest.fixture(scope="session")
def dagster_pg_url(stack: Stack) -> str:
    return stack.env()[ENV_DAGSTER_PG]


@pytest.fixture(scope="session")
def app_db_url(stack: Stack) -> str:
    return stack.env()[ENV_APP_DB]


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = connect(redis_url, socket_timeout=5)
    yield client
    client.close()


@pytest.fixture
def schema() -> KeySchema:
    """A namespace of its own for each test, so tests share one Redis without seeing each other."""
    return KeySchema(f"t{uuid.uuid4().hex[:10]}")


@pytest.fixture
def lake_uri(tmp_path: Path) -> str:
    return str(tmp_path / "lake")


@pytest.fixture
def app_db(app_db_url: str) -> Iterator[str]:
    """A fresh application database of its own (documents, embeddings) on the real PostgreSQL."""
    with scratch_database(app_db_url, "app") as url:
        yield url


@pytest.fixture(scope="session")
def dagster_template(dagster_pg_url: str) -> Iterator[str]:
    """The name of a database that holds Dagster's tables and nothing else, made once per session: a copy of it
    (``CREATE DATABASE ... TEMPLATE``) takes a fraction of the time Dagster takes to create and stamp its tables."""
    with scratch_database(dagster_pg_url, "dagster_template") as url:
        with dg.instance_for_test(overrides={"storage": {"postgres": {"postgres_url": url}}}):
            pass  # creates the tables; no connection stays open (Dagster's storages use NullPool), as a copy needs
        yield url.rsplit("/", 1)[1]


@pytest.fixture
def pg_instance(dagster_pg_url: str, dagster_template: str) -> Iterator[dg.DagsterInstance]:
    """A Dagster instance whose run/event/schedule storage is the real PostgreSQL, in a fresh database."""
    with (
        scratch_database(dagster_pg_url, "dagster", template=dagster_template) as url,
        dg.instance_for_test(overrides={"storage": {"postgres": {"postgres_url": url}}}) as instance,
    ):
        yield instance
