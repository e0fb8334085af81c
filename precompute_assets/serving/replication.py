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
import math
import time
from collections.abc import Collection

import redis

from .connection import is_cluster

_log = logging.getLogger(__name__)

REPLICA_WAIT_S = 30.0  # default: how long a flip waits for replicas before it gives up
POLL_S = 0.05


class ReplicationTimeoutError(redis.RedisError):
    """Replicas had not acknowledged their primary's writes when the wait ended: a failover could lose them."""


class ReplicaLostError(ReplicationTimeoutError):
    """A replica that held its primary's writes went offline, or the primary stopped being one, before the wait
    ended: the signature of a failover, which may have promoted a replica without the writes since."""


Replicas = dict[str, set[str]]  # the online replicas (``ip:port``) of each primary, by node name (one server: "")


def confirm_replicas(
    client: redis.Redis, timeout_s: float = REPLICA_WAIT_S, *, since: Replicas | None = None
) -> Replicas:
    """``wait_for_replicas`` (with ``since``), where the server can be asked; returns the replicas that confirmed. A
    server that refuses ``INFO`` (an ACL user without it, a proxy that does not forward it) is warned about once per
    call and waited for in no way (none confirmed)."""
    try:
        return _wait(client, timeout_s, POLL_S, since or {})
    except redis.ResponseError as error:  # not ReplicationTimeoutError: that one is not a reply of the server
        _log.warning("cannot wait for replicas: the server refused INFO (%s); grant the Redis user +info", error)
        return {}


def _replication_infos(client: redis.Redis) -> dict[str, dict]:
    """``INFO replication`` of each primary that ``client`` writes to, by node name (a single server: ``""``)."""
    if is_cluster(client):
        return {node.name: client.info("replication", target_nodes=node) for node in client.get_primaries()}
    try:
        return {"": client.info("replication")}
    except redis.ConnectionError:  # not TimeoutError: a server that is slow to answer is not asked twice
        # A connection the server closed: at a Sentinel failover the sentinels kill the demoted primary's clients.
        # INFO is a read, asked once more on a new connection (to the primary the sentinels name now).
        return {"": client.info("replication")}


def online_replicas(info: dict) -> dict[str, int]:
    """The acknowledged replication offset of each online replica in an ``INFO replication`` reply, by ``ip:port``."""
    return {
        f"{value.get('ip')}:{value.get('port')}": int(value.get("offset", -1))
        for name, value in info.items()
        if name.startswith("slave") and isinstance(value, dict) and value.get("state") == "online"
    }


def wait_for_replicas(
    client: redis.Redis, timeout_s: float = REPLICA_WAIT_S, *, poll_s: float = POLL_S, since: Replicas | None = None
) -> int:
    """Wait until each replica that is online now has acknowledged everything its primary holds now (its
    ``master_repl_offset``), on every primary of ``client``; return how many replicas confirmed (0 when there are
    none, or when ``timeout_s`` <= 0 asks for no wait). Raise ``ReplicationTimeoutError`` naming the replicas still
    behind after ``timeout_s``, and a Redis error as it comes (a primary that does not answer confirms nothing).

    ``since``: replicas that confirmed an earlier wait (a flip's, before its pointer write), which must confirm this
    one too: one of them no longer online when the wait ends, or a primary that is one no more, raises
    ``ReplicaLostError`` (at once for the latter). A Sentinel failover stops the promoted replica's replication
    before the sentinels name it: without ``since``, the wait after a flip counted only the replicas left, none, and
    confirmed a flip the demoted primary then dropped."""
    return sum(len(replicas) for replicas in _wait(client, timeout_s, poll_s, since or {}).values())


def _wait(client: redis.Redis, timeout_s: float, poll_s: float, since: Replicas) -> Replicas:
    """``wait_for_replicas``; the replicas that confirmed, by primary. ``ValueError`` for a wait that is not a finite
    number of seconds (NaN or infinity never reached its deadline: a flip waited for good on a replica behind)."""
    if not math.isfinite(timeout_s):
        raise ValueError(f"replica_wait_s must be a finite number of seconds (0: no wait), got {timeout_s}")
    if timeout_s <= 0:
        return {}
    targets: dict[str, tuple[int, set[str]]] = {}
    history: dict[str, object] = {}  # each target's replication ID: another one is another primary (a failover)
    for node, info in _checked_infos(client, since).items():
        if replicas := set(online_replicas(info)) | since.get(node, set()):
            targets[node] = (int(info.get("master_repl_offset", 0)), replicas)
            history[node] = info.get("master_replid")
    deadline = time.monotonic() + timeout_s
    while targets:
        time.sleep(poll_s)
        infos = _checked_infos(client, since, targets)
        for node, replid in history.items():
            # A Sentinel client follows the promoted replica (the sentinel kills the demoted primary's connections):
            # it answers as a primary, of another history, whose replicas never reach the old one's offsets.
            if replid is not None and infos.get(node, {}).get("master_replid", replid) != replid:
                raise ReplicaLostError(
                    f"{node or 'the server'} is another primary now (its replication ID changed): a failover?"
                )
        behind, gone = {}, []  # gone: late replicas that confirmed the earlier wait and are offline now
        for node, (offset, replicas) in targets.items():
            acknowledged = online_replicas(infos.get(node, {}))
            if late := sorted(replica for replica in replicas if acknowledged.get(replica, -1) < offset):
                behind[node] = (offset, late)
                gone += [replica for replica in late if replica not in acknowledged and replica in since.get(node, ())]
        if not behind:
            return {node: replicas for node, (_, replicas) in targets.items()}
        if time.monotonic() >= deadline:
            described = "; ".join(
                f"{', '.join(late)} behind {node or 'the server'} (offset {offset})"
                for node, (offset, late) in behind.items()
            )
            message = f"replicas behind their primary after {timeout_s:g} s: {described}"
            if gone:
                raise ReplicaLostError(f"{message} ({', '.join(gone)} went offline since the last wait: a failover?)")
            raise ReplicationTimeoutError(message)
    return {}


def _checked_infos(client: redis.Redis, since: Replicas, waited: Collection[str] = ()) -> dict[str, dict]:
    """``_replication_infos``; raise ``ReplicaLostError`` if a primary whose replicas confirmed an earlier wait
    (``since``), or one this wait is waiting on (``waited``), is a primary no more: its replicas never acknowledge
    it again (a failover, even a lossless ``CLUSTER FAILOVER``, waited out the whole wait, then named the new primary
    as "behind" the old one)."""
    infos = _replication_infos(client)
    for node in {node for node, replicas in since.items() if replicas} | set(waited):
        role = infos[node].get("role", "master") if node in infos else "former primary"
        if role != "master":
            raise ReplicaLostError(f"{node or 'the server'} is a {role} now, no longer a primary: a failover?")
    return infos
