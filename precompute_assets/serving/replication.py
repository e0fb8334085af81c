"""Waiting for replicas before a pointer flip, so that a failover cannot promote a replica without the version.

Redis replicates asynchronously: a primary acknowledges a write before its replicas hold it, and a replica promoted
after its primary dies (Sentinel, Redis Cluster) lacks whatever it had not received. A version whose buckets were
lost that way would be served with holes, and a lost pointer write would put readers back on the version before,
whose buckets the flip had already given a short grace. ``wait_for_replicas`` reads each primary's replication
offset (``INFO replication``) and waits until every replica that was online then has acknowledged it. Replicas
acknowledge about once a second, so a wait costs about a second where there are replicas and one ``INFO`` per primary
where there are none. ``WAIT`` would be quicker, but it counts only the writes of the connection it runs on, and a
publish writes through many.
"""

from __future__ import annotations

import logging
import time

import redis

from .connection import is_cluster

_log = logging.getLogger(__name__)

REPLICA_WAIT_S = 30.0  # default: how long a flip waits for replicas before it gives up
POLL_S = 0.05


class ReplicationTimeoutError(redis.RedisError):
    """Replicas had not acknowledged their primary's writes when the wait ended: a failover could lose them."""


def confirm_replicas(client: redis.Redis, timeout_s: float = REPLICA_WAIT_S) -> None:
    """``wait_for_replicas``, where the server can be asked: a server that refuses ``INFO`` (an ACL user without it,
    a proxy that does not forward it) is warned about once per call and waited for in no way."""
    try:
        wait_for_replicas(client, timeout_s)
    except redis.ResponseError as error:  # not ReplicationTimeoutError: that one is not a reply of the server
        _log.warning("cannot wait for replicas: the server refused INFO (%s); grant the Redis user +info", error)


def _replication_infos(client: redis.Redis) -> dict[str, dict]:
    """``INFO replication`` of each primary that ``client`` writes to, by node name (a single server: ``""``)."""
    if is_cluster(client):
        return {node.name: client.info("replication", target_nodes=node) for node in client.get_primaries()}
    return {"": client.info("replication")}


def online_replicas(info: dict) -> dict[str, int]:
    """The acknowledged replication offset of each online replica in an ``INFO replication`` reply, by ``ip:port``."""
    return {
        f"{value.get('ip')}:{value.get('port')}": int(value.get("offset", -1))
        for name, value in info.items()
        if name.startswith("slave") and isinstance(value, dict) and value.get("state") == "online"
    }


def wait_for_replicas(client: redis.Redis, timeout_s: float = REPLICA_WAIT_S, *, poll_s: float = POLL_S) -> int:
    """Wait until each replica that is online now has acknowledged everything its primary holds now (its
    ``master_repl_offset``), on every primary of ``client``; return how many replicas confirmed (0 when there are
    none, or when ``timeout_s`` <= 0 asks for no wait). Raise ``ReplicationTimeoutError`` naming the replicas still
    behind after ``timeout_s``, and a Redis error as it comes (a primary that does not answer confirms nothing)."""
    if timeout_s <= 0:
        return 0
    targets: dict[str, tuple[int, set[str]]] = {}
    for node, info in _replication_infos(client).items():
        if replicas := online_replicas(info):
            targets[node] = (int(info.get("master_repl_offset", 0)), set(replicas))
    deadline = time.monotonic() + timeout_s
    while targets:
        time.sleep(poll_s)
        infos = _replication_infos(client)
        behind = {}
        for node, (offset, replicas) in targets.items():
            acknowledged = online_replicas(infos.get(node, {}))
            if late := sorted(replica for replica in replicas if acknowledged.get(replica, -1) < offset):
                behind[node] = (offset, late)
        if not behind:
            return sum(len(replicas) for _, replicas in targets.values())
        if time.monotonic() >= deadline:
            described = "; ".join(
                f"{', '.join(late)} behind {node or 'the server'} (offset {offset})"
                for node, (offset, late) in behind.items()
            )
            raise ReplicationTimeoutError(f"replicas behind their primary after {timeout_s:g} s: {described}")
    return 0
