"""Fault: Redis cannot write to its disk (a full disk under its AOF or RDB), so it refuses every write with MISCONF,
PING included, while it still answers reads.

It was taken for a login refusal: `status` said "refuses us" without the warning written for this case, a step's
Redis check failed "refuses us" with no retry (a disk freed a minute later left the publish failed), and the serving
client warned that lookups were misses while they kept hitting. A real server is put in that state: its RDB folder
is removed under it with a save point set, so its background save fails (as root, permissions cannot make it fail).
"""

import contextlib
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
import redis

from precompute_assets.defs.resources import RedisResource
from precompute_assets.serving import KeySchema, PredictionCache, connect, publish_version
from precompute_assets.stack import ENV_REDIS, RedisServer, free_port, login_problem, persistence_warnings


@pytest.fixture(scope="module")
def full_disk_url(session_dir: Path) -> Iterator[str]:
    """A private server that has published a version, then lost the folder it saves to: every write is MISCONF."""
    folder = session_dir / "servers" / f"misconf-{uuid.uuid4().hex[:8]}"
    server = RedisServer(folder, free_port(), "misconf-pw-0123456789", extra_config=("enable-protected-configs yes",))
    server.start(timeout_s=30)
    admin = connect(server.url, socket_timeout=5)
    try:
        publish_version(admin, "ctr", "v1", [("ad1", 0.25)], n_keys=1, schema=KeySchema("full"))
        gone = folder / "gone"
        gone.mkdir()
        admin.config_set("save", "3600 1")
        admin.config_set("dir", str(gone))
        shutil.rmtree(gone)
        admin.bgsave()
        deadline = time.monotonic() + 10
        while admin.info("persistence")["rdb_last_bgsave_status"] != "err" and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(redis.ResponseError, match="^MISCONF"):
            admin.ping()
        yield server.url
    finally:
        with contextlib.suppress(redis.RedisError):  # back in its folder: `stop` knows its server by its working dir
            admin.config_set("dir", str(folder))
        os.makedirs(folder / "gone", exist_ok=True)  # else it saves there as it stops
        admin.close()
        server.stop()
        assert server.pid is None, "the test's server is still running"


def test_status_says_the_disk_not_the_login(full_disk_url: str) -> None:
    assert login_problem(ENV_REDIS, full_disk_url) is None  # was "MISCONF ...", shown as "refuses us"
    (warning,) = persistence_warnings(full_disk_url)
    assert warning == "its last RDB save failed (a full disk?): it refuses writes until one succeeds"


def test_a_steps_redis_check_names_the_disk_and_is_retried(full_disk_url: str) -> None:
    with pytest.raises(dg.Failure) as failed:
        RedisResource(url=full_disk_url).client()
    assert "cannot write to its disk, and refuses writes until it can (full?): MISCONF" in failed.value.description
    assert failed.value.allow_retries  # the step's retry policy tries again: the space may come back


def test_readers_keep_hitting_and_are_not_told_lookups_are_misses(full_disk_url: str, caplog) -> None:
    cache = PredictionCache(connect(full_disk_url, socket_timeout=5), schema=KeySchema("full"))
    try:
        with caplog.at_level(logging.WARNING, logger="precompute_assets.serving.cache"):
            assert cache.get("ctr", "ad1") == pytest.approx(0.25)
            assert cache.get_or_compute("ctr", "new", lambda key: 0.5) == 0.5  # computed; its store refused
            assert cache.get("ctr", "ad1") == pytest.approx(0.25)  # no back-off: the server answers
    finally:
        cache.close()
    said = " ".join(record.getMessage() for record in caplog.records)
    assert "MISCONF" in said and "lookups are misses" not in said
