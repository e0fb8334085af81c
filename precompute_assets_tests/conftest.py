"""Shared fixtures: one real embedded stack (Redis + PostgreSQL) per test session, isolated per test by
Redis key namespace and by a fresh Dagster instance on the same PostgreSQL."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
import redis

from precompute_assets.pg import scratch_database
from precompute_assets.serving import KeySchema, connect
from precompute_assets.stack import ENV_APP_DB, ENV_DAGSTER_PG, ENV_REDIS, Stack


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    """The real embedded services, started by our own code (or the servers named by the environment).

    Kept outside pytest's temp tree: pytest prunes and re-permissions that tree when other sessions start,
    which would pull the data folder from under the PostgreSQL server (it runs as another user as root).
    """
    home = Path(tempfile.mkdtemp(prefix="precompute-stack-"))
    services = Stack(home)
    services.up()
    yield services
    services.down()
    shutil.rmtree(home, ignore_errors=True)


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


@pytest.fixture
def pg_instance(dagster_pg_url: str) -> Iterator[dg.DagsterInstance]:
    """A Dagster instance whose run/event/schedule storage is the real PostgreSQL, in a fresh database."""
    with (
        scratch_database(dagster_pg_url, "dagster") as url,
        dg.instance_for_test(overrides={"storage": {"postgres": {"postgres_url": url}}}) as instance,
    ):
        yield instance
