"""A flip waits for replicas: a failover never promotes a replica that lacks the version readers were flipped to,
nor puts readers back on a version whose buckets the flip had already given a short grace."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import pytest
import redis

from precompute_assets.serving import PredictionCache, connect, publish_version, replication
from precompute_assets.serving import publish as publish_module
from precompute_assets.serving.keys import Pointer
from precompute_assets.serving.replication import (
    ReplicaLostError,
    ReplicationTimeoutError,
    online_replicas,
    wait_for_replicas,
)
from precompute_assets.stack import RedisServer
from precompute_assets_tests.factories import PROMPT_FULL_SYNC, wait_for_replica
from precompute_assets_tests.serving.conftest import CLUSTER_CONFIG


def replica_of(redis_server, primary: RedisServer) -> RedisServer:
    replica = redis_server(extra_config=(f"replicaof 127.0.0.1 {primary.port}",))
    with redis.Redis(port=primary.port) as theirs, redis.Redis(port=replica.port) as node:
        wait_for_replica(theirs, node)
    return replica


def version_on(server: RedisServer, schema, kind: str = "ctr") -> str | None:
    with redis.Redis(port=server.port) as node:
        raw = node.get(schema.pointer(kind))
    return None if raw is None else Pointer.decode(raw).version


def keys_on(server: RedisServer, schema, version: str) -> int:
    with redis.Redis(port=server.port) as node:
        return sum(node.hlen(name) for name in node.keys(schema.bucket("ctr", version, 0)[:-1] + "*"))


def test_a_test_primary_starts_a_replicas_full_sync_at_once(redis_server, sentinel_group):
    """Redis waits 5 s by default before a diskless full sync, for more replicas to share it: each test that started a
    replica, or failed over to one, spent them doing nothing."""
    for port in (redis_server().port, sentinel_group.primary.port, sentinel_group.replica.port):
        with redis.Redis(port=port) as node:
            assert node.config_get("repl-diskless-sync-delay") == {"repl-diskless-sync-delay": "0"}
    assert PROMPT_FULL_SYNC in CLUSTER_CONFIG


def test_a_flip_waits_for_the_replica_and_refuses_while_it_lags(redis_server, schema):
    primary = redis_server()
    replica = replica_of(redis_server, primary)
    client = connect(primary.url, socket_timeout=5)
    items = [(f"ad{i}", 0.25) for i in range(20_000)]
    assert wait_for_replicas(client, 5) == 1
    publish_version(client, "ctr", "v1", items, n_keys=len(items), schema=schema)
    # Nothing to wait for here: the publish returned once the replica held the version and the flip to it.
    assert version_on(replica, schema) == "v1" and keys_on(replica, schema, "v1") == len(items)

    os.kill(replica.pid, signal.SIGSTOP)  # a replica that lags: a failover now would lose what it lacks
    try:
        with pytest.raises(ReplicationTimeoutError, match=rf"127.0.0.1:{replica.port} behind the server") as raised:
            publish_version(client, "ctr", "v2", items, n_keys=len(items), schema=schema, replica_wait_s=1)
        assert "readers stay where they were" in str(raised.value.__notes__)
        assert version_on(primary, schema) == "v1"  # not flipped
    finally:
        os.kill(replica.pid, signal.SIGCONT)
    publish_version(client, "ctr", "v2", items, n_keys=len(items), schema=schema)  # the step's retry
    assert version_on(replica, schema) == "v2" and keys_on(replica, schema, "v2") == len(items)
    assert 0 < client.ttl(schema.bucket("ctr", "v1", 0)) <= 600  # confirmed: the old version gets its grace
    client.close()


def test_without_replicas_nothing_is_waited_for(redis_client):
    assert online_replicas(redis_client.info("replication")) == {}
    assert wait_for_replicas(redis_client, 5) == 0
    assert wait_for_replicas(redis_client, 0) == 0
    for endless in (float("nan"), float("inf")):  # never reached their deadline: a flip waited for good (h_inval)
        with pytest.raises(ValueError, match="replica_wait_s must be a finite number of seconds"):
            wait_for_replicas(redis_client, endless)


def test_a_flip_its_replicas_did_not_confirm_leaves_the_old_version_its_ttl(redis_client, schema, monkeypatch, caplog):
    """If the pointer write may still be lost in a failover, the version before must stay whole for as long as it
    would have lived: readers put back on it then read every key."""

    real_wait = replication._wait

    def unconfirmed_after_the_flip(client, timeout_s, poll_s, since):
        real_wait(client, timeout_s, poll_s, since)
        if version_on_client(client) == "v2":
            raise ReplicationTimeoutError("replicas behind their primary after 1 s: 127.0.0.1:1 behind the server")
        return 0

    def version_on_client(client) -> str | None:
        raw = client.get(schema.pointer("ctr"))
        return None if raw is None else Pointer.decode(raw).version

    monkeypatch.setattr(replication, "_wait", unconfirmed_after_the_flip)
    publish_version(redis_client, "ctr", "v1", [("a", 0.1)], n_keys=1, schema=schema, ttl_s=3600)
    with caplog.at_level(logging.WARNING, logger=publish_module.__name__):
        publish_version(redis_client, "ctr", "v2", [("a", 0.2)], n_keys=1, schema=schema, ttl_s=3600, grace_s=5)
    assert version_on_client(redis_client) == "v2"
    assert redis_client.ttl(schema.bucket("ctr", "v1", 0)) > 3000  # not shortened to the 5 s grace
    assert Pointer.decode(redis_client.get(schema.previous("ctr"))).version == "v1"  # still handed over from
    assert "did not confirm the flip" in caplog.text and "v1 keeps its TTL" in caplog.text


def test_a_replica_promoted_during_a_flip_fails_the_publish(redis_server, schema, monkeypatch):
    """Sentinel stops the replica it promotes from replicating before it names it: the wait after the flip counted
    the replicas left, none, and confirmed a flip the demoted primary then dropped, while the publish returned
    success. The replicas that confirmed the wait before the flip must confirm the flip too."""
    primary = redis_server()
    replica = replica_of(redis_server, primary)
    client = connect(primary.url, socket_timeout=5)
    items = [(f"ad{i}", 0.25) for i in range(100)]
    publish_version(client, "ctr", "v1", items, n_keys=len(items), schema=schema, ttl_s=3600)
    real_wait = replication._wait

    def promoted_after_the_flip(client, timeout_s, poll_s, since):
        if since:  # the wait after the pointer write: the replica is promoted now
            with redis.Redis(port=replica.port) as node:
                node.replicaof("NO", "ONE")
        return real_wait(client, timeout_s, poll_s, since)

    monkeypatch.setattr(replication, "_wait", promoted_after_the_flip)
    with pytest.raises(ReplicaLostError, match=f"127.0.0.1:{replica.port} went offline since the last wait"):
        publish_version(client, "ctr", "v2", items, n_keys=len(items), schema=schema, ttl_s=3600, replica_wait_s=2)
    assert client.ttl(schema.bucket("ctr", "v1", 0)) > 3000  # the version before keeps its TTL
    monkeypatch.undo()
    with redis.Redis(port=primary.port) as node:  # the old primary, demoted: it answers as a replica now
        node.replicaof("127.0.0.1", replica.port)
        with pytest.raises(ReplicaLostError, match="the server is a slave now, no longer a primary"):
            wait_for_replicas(client, 2, since={"": {f"127.0.0.1:{replica.port}"}})


def test_a_primary_demoted_while_its_replicas_are_waited_for_fails_the_wait_at_once(redis_server):
    """A failover while a flip waits for replicas (even a lossless ``CLUSTER FAILOVER``) left the wait on the old
    primary, whose replicas never acknowledge it again: the publish stalled for the whole ``replica_wait_s``, then
    failed naming the new primary "behind" the old one. A waited-on primary that is one no more fails it at once."""
    primary, elsewhere = redis_server(), redis_server()
    replica = replica_of(redis_server, primary)
    client = connect(primary.url, socket_timeout=5)
    os.kill(replica.pid, signal.SIGSTOP)  # behind from now on: the wait cannot end by its acknowledgement
    try:
        client.set("written", "after the replica stopped")
        demote = threading.Timer(0.3, lambda: redis.Redis(port=primary.port).replicaof("127.0.0.1", elsewhere.port))
        demote.start()
        started = time.monotonic()
        with pytest.raises(ReplicaLostError, match="the server is a slave now, no longer a primary") as caught:
            wait_for_replicas(client, 60)
        demote.join()
    finally:  # the test's servers, demoted and resumed mid-sync, each refused SIGTERM for a minute: killed
        for server in (replica, primary, elsewhere):
            os.kill(server.pid, signal.SIGKILL)
    assert time.monotonic() - started < 30, caught.value  # not the whole wait


def test_a_connection_reset_during_a_wait_is_asked_again_on_a_new_one(redis_server, monkeypatch):
    """At a Sentinel failover the sentinels kill the demoted primary's clients: an INFO in flight then failed the
    wait with "connection reset" instead of finding the new primary (and its other replication ID) on a new
    connection. A closed connection between two polls was always replaced (redis-py checks one before it lends it);
    one closed while its reply was awaited is what the sentinels' kill hit, simulated here by one reset reply."""
    primary = redis_server()
    replica = replica_of(redis_server, primary)
    client = connect(primary.url, socket_timeout=5)
    real_info, calls = client.info, []

    def reset_once(*args, **kwargs):
        calls.append(args)
        if len(calls) == 3:  # a poll of the wait, not the first INFO that sets its target
            client.connection_pool.disconnect()
            raise redis.ConnectionError("Error while reading from 127.0.0.1 : (104, 'Connection reset by peer')")
        return real_info(*args, **kwargs)

    os.kill(replica.pid, signal.SIGSTOP)  # behind until resumed: the wait polls through the reset
    try:
        client.set("written", "after the replica stopped")
        monkeypatch.setattr(client, "info", reset_once)
        timer = threading.Timer(0.5, lambda: os.kill(replica.pid, signal.SIGCONT))
        timer.start()
        assert wait_for_replicas(client, 30) == 1
        timer.join()
    finally:
        os.kill(replica.pid, signal.SIGCONT)
    assert len(calls) > 4  # the wait went on after the reset


def test_a_first_publish_whose_replica_lags_after_the_flip_only_warns(redis_server, schema, monkeypatch, caplog):
    """A replica that merely lags behind a first publish's flip (nothing to retire) is warned about, as after any
    other flip; it failed the publish, whose pointer had flipped."""
    primary = redis_server()
    replica = replica_of(redis_server, primary)
    client = connect(primary.url, socket_timeout=5)
    real_wait = replication._wait

    def stopped_after_the_flip(client, timeout_s, poll_s, since):
        if since:
            os.kill(replica.pid, signal.SIGSTOP)  # online still (its link is up), but it acknowledges nothing
            return real_wait(client, timeout_s, poll_s, since)
        # before the flip: time for a replica on a loaded machine (1 s failed a CI run there), then 1 s after it
        return real_wait(client, 60, poll_s, since)

    monkeypatch.setattr(replication, "_wait", stopped_after_the_flip)
    try:
        with caplog.at_level(logging.WARNING, logger=publish_module.__name__):
            publish_version(client, "ctr", "v1", [("a", 0.1)], n_keys=1, schema=schema, replica_wait_s=1)
    finally:
        os.kill(replica.pid, signal.SIGCONT)
    assert version_on(primary, schema) == "v1" and "did not confirm the flip" in caplog.text


def test_a_retry_of_the_current_version_writes_back_the_buckets_a_failover_lost(redis_url, redis_client, schema):
    items = [(f"ad{i}", i / 1000) for i in range(1000)]
    first = publish_version(redis_client, "ctr", "v1", items, n_keys=len(items), schema=schema)
    lost = [schema.bucket("ctr", "v1", b) for b in (0, 3, first.buckets - 1)]
    kept_without_ttl = schema.bucket("ctr", "v1", 1)
    redis_client.persist(kept_without_ttl)  # its HSET reached the replica, its EXPIRE did not
    lost_keys = sum(redis_client.hlen(name) for name in lost)  # counted before they go
    redis_client.delete(*lost)  # as a replica promoted without them would lack them
    again = publish_version(redis_client, "ctr", "v1", items, n_keys=len(items), schema=schema)
    assert again.already_current and again.mended == lost_keys > 0  # what ctr_cache reports as keys_written
    assert all(redis_client.exists(name) for name in lost)
    assert all(0 < redis_client.ttl(name) <= 2 * 86400 for name in [*lost, kept_without_ttl])
    cache = PredictionCache(connect(redis_url, socket_timeout=5), schema=schema)
    assert cache.get_many("ctr", [key for key, _ in items]) == [pytest.approx(value) for _, value in items]


def test_a_user_that_may_not_run_info_flips_without_waiting(redis_server, schema, caplog):
    """Redis users without INFO (an ACL from before the publisher got it) and proxies that do not forward it still
    publish, as before, with a warning that nothing waited for replicas."""
    server = redis_server()
    with redis.Redis(port=server.port) as admin:
        admin.acl_setuser("noinfo", enabled=True, passwords=["+a-long-password-1234"], keys=["*"],
                          commands=["+@all", "-info"])  # fmt: skip
    client = connect(f"redis://noinfo:a-long-password-1234@127.0.0.1:{server.port}/0", socket_timeout=5)
    with caplog.at_level(logging.WARNING, logger=replication.__name__):
        publish_version(client, "ctr", "v1", [("a", 0.1)], n_keys=1, schema=schema)
    assert version_on(server, schema) == "v1"
    assert "the server refused INFO (" in caplog.text and "grant the Redis user +info" in caplog.text
    client.close()
