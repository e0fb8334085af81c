"""Redis clients built from URLs, with timeouts that fail fast instead of hanging the caller."""

from __future__ import annotations

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry


def connect(
    url: str,
    *,
    socket_timeout: float | None = 0.05,
    cluster: bool = False,
    retries: int = 0,
) -> redis.Redis:
    """A client for ``url`` (``redis://``, ``rediss://`` with TLS, user/password for AUTH).

    ``socket_timeout`` bounds every connect and command, so a dead server costs at most that long;
    ``retries`` defaults to none because a serving path would rather compute live than wait twice.
    ``cluster=True`` returns a Redis Cluster client.
    """
    options = dict(
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_timeout,
        retry=Retry(NoBackoff(), retries),
        health_check_interval=0,
    )
    if cluster:
        from redis.cluster import RedisCluster

        return RedisCluster.from_url(url, **options)
    return redis.Redis.from_url(url, **options)


# Everything a serving path degrades on: dead or slow servers, and error replies (OOM, READONLY,
# CLUSTERDOWN, LOADING, NOPERM) alike.
REDIS_ERRORS = (redis.RedisError, OSError)
