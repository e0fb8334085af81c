"""The serving contract on a real Redis Cluster (three masters of the embedded server on 127.0.0.1): publish and
flip, readers that never mix versions, admission, query logging, campaign live values, and a master killed
mid-publish."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid

import pytest
import redis
from redis.cluster import RedisCluster

from precompute_assets.defs.resources import RedisResource
from precompute_assets.serving import Experiment, KeySchema, PredictionCache, QueryLogger, connect, publish_version
from precompute_assets.serving.acl import apply_acl, publisher_rules
from precompute_assets.serving.admission import FrequencySketch, Probation, SecondMiss
from precompute_assets.serving.connection import REDIS_ERRORS, key_slot, split_cluster_url
from precompute_assets.serving.keys import FIFO_PARTS, Pointer, bucket_of
from precompute_assets.serving.publish import bucket_count, delete_live_values, patch_version, write_live_values
from precompute_assets.serving.replication import ReplicationTimeoutError
from precompute_assets.serving.stats import keys_memory
from precompute_assets_tests.factories import logged_queries

from .conftest import Cluster


@pytest.fixture
def ns() -> KeySchema:
    return KeySchema(f"c{uuid.uuid4().hex[:10]}")


@pytest.fixture
def cluster_client(redis_cluster: Cluster):
    client = connect(redis_cluster.url, socket_timeout=5)
    yield client
    client.close()


def cache_on(cluster: Cluster, schema: KeySchema, **options) -> PredictionCache:
    return PredictionCache(connect(cluster.url, socket_timeout=1.0), schema=schema, pointer_ttl_s=0, **options)


def master_port(client: RedisCluster, name: str) -> int:
    return client.nodes_manager.get_node_from_slot(key_slot(name)).port


# --- selecting cluster mode -------------------------------------------------------------------------------


def test_the_url_selects_cluster_mode():
    assert split_cluster_url("redis://h:1/0") == ("redis://h:1/0", None)
    assert split_cluster_url("rediss://u:p@h:1?cluster=1") == ("rediss://u:p@h:1", True)
    assert split_cluster_url("redis://h:1/0?cluster=no&ssl_cert_reqs=none") == (
        "redis://h:1/0?ssl_cert_reqs=none",
        False,
    )
    with pytest.raises(ValueError, match="not one of"):
        split_cluster_url("redis://h:1?cluster=maybe")
    with pytest.raises(ValueError, match="only database 0"):
        split_cluster_url("redis://h:1/3?cluster=1")
    with pytest.raises(ValueError, match="2 times"):
        split_cluster_url("redis://h:1?cluster=1&cluster=0")
    with pytest.raises(ValueError, match="only database 0"):
        connect("redis://127.0.0.1:1/2", cluster=True)
    with pytest.raises(ValueError, match="says cluster=0"):
        connect("redis://127.0.0.1:1?cluster=0", cluster=True)
    assert type(connect("redis://127.0.0.1:1/0?cluster=0")) is redis.Redis  # no connection made yet


def test_a_cluster_url_parameter_its_client_does_not_take_is_refused_before_connecting():
    """redis-py's cluster client silently drops a URL parameter outside its list (a misspelt ``socket_timout``, a
    ``health_check_interval``) and hands a TLS option on redis:// to every node's connection, which failed as
    "Redis Cluster cannot be connected ... unexpected keyword argument": both are refused, naming them, as on one
    server, before any node is asked."""
    for query, named in [
        ("socket_timout=5", "socket_timout that redis-py's cluster client does not take"),
        ("health_check_interval=30", "health_check_interval that redis-py's cluster client does not take"),
        ("ssl_cert_reqs=none", "ssl_cert_reqs that redis-py's cluster client does not take (TLS options need rediss"),
    ]:
        with pytest.raises(ValueError, match=named.replace("(", r"\(")):
            connect(f"redis://127.0.0.1:1?cluster=1&{query}", pending=True)
        with pytest.raises(ValueError, match=named.replace("(", r"\(")):
            connect(f"redis://127.0.0.1:1?{query}", cluster=True, pending=True)
    # what it takes still passes (no node answers on port 1: the client is built later)
    connect("redis://127.0.0.1:1?cluster=1&socket_timeout=5&client_name=x&max_connections=9", pending=True)
    connect("rediss://127.0.0.1:1?cluster=1&ssl_cert_reqs=none", pending=True)
    connect("redis://127.0.0.1:1/0?health_check_interval=30")  # one server takes it


def test_the_resource_and_the_url_give_a_cluster_client(redis_cluster: Cluster):
    plain = redis_cluster.url.replace("?cluster=1", "")
    for resource in (RedisResource(url=redis_cluster.url), RedisResource(url=plain, cluster=True)):
        client = resource.client()
        try:
            assert isinstance(client, RedisCluster) and len(client.get_primaries()) == 3
        finally:
            client.close()
    cache = PredictionCache.from_url(redis_cluster.url, namespace="fromurl")
    try:
        assert isinstance(cache.client, RedisCluster) and isinstance(cache.logger.client, RedisCluster)
    finally:
        cache.close()


def test_status_names_the_cluster_servers_version(redis_cluster: Cluster, tmp_path, monkeypatch, capsys):
    from precompute_assets.stack import running_version
    from precompute_assets.tools.cli import main

    assert running_version(redis_cluster.url).startswith(("valkey ", "redis "))
    monkeypatch.setattr(os, "environ", os.environ.copy())  # `status` reads the stack's URLs from the environment
    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PRECOMPUTE_REDIS_URL", redis_cluster.url)
    assert main(["status"]) == 0  # was a TypeError traceback: the plain client took ?cluster=1 as an argument
    out = capsys.readouterr().out
    assert "redis     external  reachable" in out and ("(valkey " in out or "(redis " in out), out


def test_redis_acl_apply_sets_the_users_on_every_node(redis_cluster: Cluster, ns, monkeypatch, capsys):
    from precompute_assets.tools.cli import main

    monkeypatch.setattr(os, "environ", os.environ.copy())
    monkeypatch.setenv("PRECOMPUTE_REDIS_ADMIN_URL", redis_cluster.url)
    monkeypatch.setenv("PRECOMPUTE_REDIS_PUBLISHER_PASSWORD", "publisher-pw-0123456789")
    monkeypatch.setenv("PRECOMPUTE_REDIS_READER_PASSWORD", "reader-pw-0123456789")
    users = [f"{ns.namespace}-publisher", f"{ns.namespace}-reader"]
    try:  # was exit 2: "No way to dispatch this command to Redis Cluster. Missing key."
        assert main(["redis", "acl", "--apply", "--namespace", ns.namespace]) == 0, capsys.readouterr().err
        for server in redis_cluster.nodes:
            with redis_cluster.client(server.port) as node:
                assert set(users) <= set(node.acl_users()), server.port
        url = redis_cluster.url.replace("://", f"://{users[0]}:publisher-pw-0123456789@")
        publisher = connect(url, socket_timeout=5)
        keys = [f"ad{i}" for i in range(300)]  # buckets on every master
        publish_version(publisher, "ctr", "v1", [(k, 0.5) for k in keys], n_keys=len(keys), schema=ns)
        reader = connect(redis_cluster.url.replace("://", f"://{users[1]}:reader-pw-0123456789@"), socket_timeout=5)
        assert PredictionCache(reader, schema=ns, pointer_ttl_s=0).get_many("ctr", keys) == [0.5] * len(keys)
    finally:
        for server in redis_cluster.nodes:
            with redis_cluster.client(server.port) as node:
                node.acl_deluser(*users)


def test_a_cluster_publisher_of_an_older_version_writes_buckets_without_their_script(
    redis_cluster: Cluster, cluster_client, ns, caplog
):
    """A publisher made before the bucket script was granted (no EVAL): a publish on the cluster still writes every
    bucket with its TTL, as two commands, and a warning says to apply the users again."""
    users = [f"{ns.namespace}-publisher", f"{ns.namespace}-reader"]
    apply_acl(cluster_client, ns.namespace, publisher=(users[0], "publisher-pw-0123456789"),
              reader=(users[1], "reader-pw-0123456789"))  # fmt: skip
    old_rules = [rule for rule in publisher_rules(ns.namespace) if rule != "+eval"]
    try:
        for server in redis_cluster.nodes:
            with redis_cluster.client(server.port) as node:
                node.execute_command("ACL", "SETUSER", users[0], "reset", "on", ">publisher-pw-0123456789", *old_rules)
        publisher = connect(redis_cluster.url.replace("://", f"://{users[0]}:publisher-pw-0123456789@"))
        keys = [f"ad{i}" for i in range(300)]  # buckets on every master
        with caplog.at_level("WARNING", logger="precompute_assets.serving.publish"):
            result = publish_version(publisher, "ctr", "v1", [(k, 0.5) for k in keys], n_keys=len(keys), schema=ns)
            for _page in range(3):  # as the embedding sync patches page after page, each with a sender of its own
                patch_version(publisher, "ctr", Pointer("v2", result.buckets), [("ad1", 0.25)], schema=ns, ttl_s=600)
        assert cache_on(redis_cluster, ns).get_many("ctr", keys) == [0.5] * len(keys)
        warned = [record for record in caplog.records if "bucket writes without their script" in record.message]
        assert len(warned) == 1  # once for this client, not once a publish or page
        assert all(cluster_client.ttl(ns.bucket("ctr", "v1", b)) > 0 for b in range(result.buckets))
        assert 0 < cluster_client.ttl(ns.bucket("ctr", "v2", bucket_of("ad1", result.buckets))) <= 600
        assert any("precompute redis acl --apply" in record.message for record in caplog.records)
    finally:
        for server in redis_cluster.nodes:
            with redis_cluster.client(server.port) as node:
                node.acl_deluser(*users)


def test_a_cluster_without_eval_publishes_its_buckets_without_the_script(cluster_factory, ns, caplog):
    """A hardened server with EVAL renamed away failed every publish with "unknown command 'EVAL'": the publish now
    writes each bucket's HSET and EXPIRE as two commands, after one warning saying what the server lacks."""
    cluster = cluster_factory(extra_config=('rename-command EVAL ""',))
    publisher = connect(cluster.url)
    keys = [f"ad{i}" for i in range(300)]  # buckets on every master
    with caplog.at_level("WARNING", logger="precompute_assets.serving.publish"):
        result = publish_version(publisher, "ctr", "v1", [(k, 0.5) for k in keys], n_keys=len(keys), schema=ns)
    assert cache_on(cluster, ns).get_many("ctr", keys) == [0.5] * len(keys)
    assert all(publisher.ttl(ns.bucket("ctr", "v1", b)) > 0 for b in range(result.buckets))
    warned = [record.message for record in caplog.records if "bucket writes without their script" in record.message]
    assert len(warned) == 1 and "rename-command" in warned[0], warned


# --- publish and read ---------------------------------------------------------------------------------------


def test_publish_spreads_buckets_over_the_masters_and_readers_never_mix(redis_cluster, cluster_client, ns):
    keys = [f"ad{i}" for i in range(3000)]
    first = publish_version(cluster_client, "ctr", "v0", [(k, 0.0) for k in keys], n_keys=len(keys), schema=ns)
    per_master: dict[int, int] = {}
    for bucket in range(first.buckets):
        port = master_port(cluster_client, ns.bucket("ctr", "v0", bucket))
        per_master[port] = per_master.get(port, 0) + cluster_client.hlen(ns.bucket("ctr", "v0", bucket))
    assert len(per_master) == 3 and sum(per_master.values()) == len(keys)  # write load on every master
    assert min(per_master.values()) > len(keys) / 6

    stop, failures = threading.Event(), []
    batches: set[tuple[float, ...]] = set()
    pairs: set[tuple[str, str | None]] = set()

    def read(cache: PredictionCache, first_read: threading.Event, last_read: threading.Event) -> None:
        try:
            while not stop.is_set():
                batch = tuple(sorted(set(cache.get_many("ctr", keys[::7]))))
                batches.add(batch)
                single = cache.get("ctr", keys[11])
                batches.add((single,))
                if batch == (0.5,) and single == 0.5:
                    last_read.set()
                pointer, experiment, _ = cache._pointers["ctr"]
                pairs.add((pointer.version, None if experiment is None else experiment.name))
                first_read.set()
        except Exception as error:  # noqa: BLE001 - a reader must never raise: record it for the assertion
            failures.append(error)
            first_read.set()

    ready, done = [threading.Event() for _ in range(2)], [threading.Event() for _ in range(2)]
    readers = [
        threading.Thread(target=read, args=(cache_on(redis_cluster, ns), first, last))
        for first, last in zip(ready, done, strict=True)
    ]
    for reader in readers:
        reader.start()
    try:
        for event in ready:  # every reader has read v0 before the first flip, however loaded the machine is
            assert event.wait(timeout=60)
        for version in range(1, 6):
            experiment = Experiment(f"e{version}", f"s{version}", ("frequency", "lstm")) if version % 2 else None
            items = [(k, version / 10) for k in keys]  # CTRs: a value outside [0, 1] is never served
            publish_version(
                cluster_client, "ctr", f"v{version}", items, n_keys=len(keys), schema=ns, experiment=experiment
            )
            time.sleep(0.05)
        for event in done:  # every reader has read v5, however loaded the machine is (a stalled master backs off 1 s)
            assert event.wait(timeout=60)
    finally:
        stop.set()
        for reader in readers:
            reader.join()
    assert not failures
    assert batches and all(len(values) == 1 for values in batches), batches  # whole versions only
    assert {values[0] for values in batches} >= {0.0, 0.5}

    # The experiment is written before the pointer and read after it: a reader on a new version never holds an
    # older version's experiment (it may hold the next one's, for a refresh, as a single-server reader may).
    def experiment_of(number: int) -> str | None:
        return f"e{number}" if number % 2 else None

    for version, name in pairs:  # (v2, e1) or (v5, None) would be the new version with an older experiment
        assert any(experiment_of(m) == name for m in range(int(version[1:]), 6)), (version, name)
    assert PredictionCache(cluster_client, schema=ns).current_experiment("ctr").name == "e5"
    assert cluster_client.ttl(ns.bucket("ctr", "v4", 0)) <= 600  # the replaced version expires after its grace


def test_patch_version_and_a_retried_version_on_the_cluster(redis_cluster, cluster_client, ns):
    publish_version(cluster_client, "emb", "v1", [("a", [1]), ("b", [2])], n_keys=2, schema=ns)
    publish_version(cluster_client, "emb", "v0", [("z", [0])], n_keys=1, schema=ns)
    result = publish_version(cluster_client, "emb", "v1", [(f"k{i}", [i]) for i in range(300)], n_keys=300, schema=ns)
    cache = cache_on(redis_cluster, ns)
    assert cache.get_many("emb", ["a", "k7", "k299"]) == [None, [7], [299]]  # the retry started clean
    patch_version(
        cluster_client, "emb", Pointer("v1", result.buckets), [("k7", [70]), ("new", [1])], ["k299"], schema=ns
    )
    assert cache.get_many("emb", ["k7", "new", "k299"]) == [[70], [1], None]


class Killed(BaseException):
    """The publisher dying mid-write (not a Redis error: nothing in the publisher handles or retries it)."""


def resp_commands(data: bytes) -> list[tuple[bytes, int]]:
    """Each command's name and the offset where it ends, in a packed RESP write."""
    commands, position = [], 0
    while position < len(data):
        end = data.index(b"\r\n", position)
        count, position, name = int(data[position + 1 : end]), end + 2, b""
        for _ in range(count):
            end = data.index(b"\r\n", position)
            size = int(data[position + 1 : end])
            name = name or data[end + 2 : end + 2 + size].upper()
            position = end + 2 + size + 2
        commands.append((name, position))
    return commands


@pytest.mark.parametrize("write", ["publish", "patch", "mend"])
def test_a_write_cut_between_a_buckets_commands_leaves_no_bucket_without_its_ttl_on_the_cluster(
    redis_cluster, cluster_client, ns, monkeypatch, write
):
    """A publisher SIGKILLed with replies unread can have the kernel reset its connection and drop the rest of its
    stream. Each bucket write of a version (publish, patch of a version being built, a current version's lost bucket
    written back) is cut after its first, second, ... command on the first master written: Redis ran what arrived
    whole, and no bucket may be left without its TTL (a version that never flipped is retired by nothing: such a
    bucket lived forever). On one server each bucket's HSET and EXPIRE were one MULTI/EXEC; on a cluster they were
    two commands, and a cut between them left the bucket without a TTL."""
    keys = [(f"ad{i}", [float(i)]) for i in range(2000)]  # 32 buckets, about ten on each master
    send = redis.connection.AbstractConnection.send_packed_command
    for cut_after in range(1, 5):
        version, cut = f"cut{cut_after}", []

        def cut_stream(self, command, check_health=True, cut_after=cut_after, cut=cut):
            data = b"".join(command) if isinstance(command, list) else command
            commands = resp_commands(data)
            if cut or commands[0][0] not in (b"HSET", b"MULTI", b"EVAL", b"EVALSHA") or len(commands) <= cut_after:
                return send(self, command, check_health)
            cut.append((self.port, self._sock.getsockname()))
            self._sock.sendall(data[: commands[cut_after - 1][1]])
            self.disconnect()
            raise Killed

        if write == "mend":  # the version is current and lost its buckets (a failover): a retry writes them back
            publish_version(cluster_client, "emb", version, keys, n_keys=len(keys), schema=ns)
            cluster_client.delete(*(ns.bucket("emb", version, b) for b in range(bucket_count(len(keys)))))
        monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", cut_stream)
        with pytest.raises(Killed):
            if write == "patch":
                pointer = Pointer(version, bucket_count(len(keys)))
                patch_version(cluster_client, "emb", pointer, keys, schema=ns, ttl_s=86400)
            else:
                publish_version(cluster_client, "emb", version, keys, n_keys=len(keys), schema=ns)
        monkeypatch.undo()
        ((port, address),) = cut
        with redis_cluster.client(port) as node:  # the master has read the cut stream and closed that connection
            deadline = time.monotonic() + 10
            while any(client["addr"] == f"{address[0]}:{address[1]}" for client in node.client_list()):
                assert time.monotonic() < deadline
                time.sleep(0.01)
        names = [ns.bucket("emb", version, b) for b in range(bucket_count(len(keys)))]
        ttls = [cluster_client.ttl(name) for name in names]
        assert -1 not in ttls, f"cut after {cut_after} commands: {ttls}"
        assert any(ttl > 0 for ttl in ttls)  # the cut stream wrote something


def test_get_or_compute_and_admission_on_the_cluster(redis_cluster, cluster_client, ns):
    publish_version(cluster_client, "ctr", "v1", [("published", 0.5)], n_keys=1, schema=ns)
    cache = cache_on(redis_cluster, ns, live_ttl_s=60)
    assert cache.get_or_compute("ctr", "published", lambda key: 0.9) == pytest.approx(0.5)
    assert cache.get_or_compute("ctr", "fresh", lambda key: 0.25) == pytest.approx(0.25)
    assert cache.get("ctr", "fresh") == pytest.approx(0.25)
    assert 0 < cluster_client.ttl(ns.live("ctr", "fresh")) <= 60

    second = cache_on(redis_cluster, ns, admission=SecondMiss(window_s=60))
    assert second.get_or_compute("ctr", "twice", lambda key: 0.1) == pytest.approx(0.1)
    assert cluster_client.get(ns.live("ctr", "twice")) is None and second.rejected == 1
    assert cluster_client.exists(ns.admission_seen("ctr", "twice"))
    second.get_or_compute("ctr", "twice", lambda key: 0.1)
    assert second.get("ctr", "twice") == pytest.approx(0.1)  # stored on the second miss

    sketch = FrequencySketch(width=64, depth=2, threshold=2, sample_size=4)
    frequent = cache_on(redis_cluster, ns, admission=sketch)
    for _ in range(2):
        frequent.get_or_compute("rank", "hot", lambda key: {"v": 1})
    assert frequent.get("rank", "hot") == {"v": 1} and frequent.rejected == 1
    for i in range(3):
        frequent.get_or_compute("rank", f"cold{i}", lambda key: 0)  # the 4th lookup ages the sketch (Lua, one key)
    # the get of hot's live value counted as the 3rd lookup; aged at the 4th (count back to 0), then two counted
    assert int.from_bytes(cluster_client.get(sketch.key(ns, "rank"))[:4], "big") == 2

    # Probation: its state shares one slot (the scripts need it), the evicted values live on other masters.
    probation = cache_on(redis_cluster, ns, admission=Probation(capacity=2))
    for key in ("p1", "p2", "p1", "p3", "p4"):
        probation.get_or_compute("emb", key, lambda key: [1])
    assert len({key_slot(ns.admission_fifo("emb", part)) for part in FIFO_PARTS}) == 1
    assert cluster_client.zrange(ns.admission_fifo("emb", "main"), 0, -1) == [b"p1"]
    assert [cluster_client.exists(ns.live("emb", key)) for key in ("p1", "p2", "p3", "p4")] == [1, 0, 0, 1]
    # A published key takes one of the two: the next miss shrinks the tier to one key (its count shares the slot).
    publish_version(cluster_client, "emb", "v1", [("z", [0])], n_keys=1, schema=ns)
    assert cluster_client.get(ns.admission_fifo("emb", "published")) == b"1"
    probation.get_or_compute("emb", "p5", lambda key: [1])
    assert cluster_client.lrange(ns.admission_fifo("emb", "small"), 0, -1) == [b"p5"]
    assert cluster_client.zcard(ns.admission_fifo("emb", "main")) == 0
    assert [cluster_client.exists(ns.live("emb", key)) for key in ("p1", "p4", "p5")] == [0, 0, 1]
    # A version without z hands z over to the main LRU, its value copied from v1's bucket (another master); a
    # version with z again takes it back out and deletes the live copy.
    assert publish_version(cluster_client, "emb", "v2", [], n_keys=0, schema=ns).handed_over == 1
    assert cluster_client.zrange(ns.admission_fifo("emb", "main"), 0, -1) == [b"z"]
    assert probation.get("emb", "z") == pytest.approx([0])
    assert publish_version(cluster_client, "emb", "v3", [("z", [0.5])], n_keys=1, schema=ns).handed_over == 0
    assert cluster_client.zcard(ns.admission_fifo("emb", "main")) == 0
    assert not cluster_client.exists(ns.live("emb", "z"))
    assert frequent.errors == 0 and second.errors == 0 and cache.errors == 0 and probation.errors == 0


def test_a_refused_command_in_a_lookup_is_warned_of_on_the_cluster_as_on_one_server(
    redis_cluster, cluster_client, ns, caplog
):
    """An error reply in a cluster lookup (here WRONGTYPE: a hash where the live value goes; NOPERM of an older ACL
    alike) was only counted: no warning, no ACL hint, where one server warns (h_cluster2)."""
    cluster_client.hset(ns.live("ctr", "wrong"), "a", "b")
    cache = cache_on(redis_cluster, ns)
    with caplog.at_level("WARNING", logger="precompute_assets.serving.cache"):
        assert cache.get("ctr", "wrong") is None
    assert cache.errors == 1
    assert any(
        "WRONGTYPE" in record.message and "that command was refused" in record.message for record in caplog.records
    )


def test_probation_leaves_a_campaigns_longer_lived_value_on_the_cluster(redis_cluster, cluster_client, ns):
    probation = cache_on(redis_cluster, ns, admission=Probation(capacity=2), live_ttl_s=60)
    probation.get_or_compute("ctr", "ad1", lambda key: 0.1)  # a reader's lookup: tracked
    write_live_values(cluster_client, "ctr", [("ad1", 0.5)], expire_at=int(time.time()) + 86_400, schema=ns)
    for key in ("a", "b", "c"):
        probation.get_or_compute("ctr", key, lambda key: 0.2)  # the client deletes what the tier evicted
    assert probation.get("ctr", "ad1") == pytest.approx(0.5) and cluster_client.ttl(ns.live("ctr", "ad1")) > 60
    assert not cluster_client.exists(ns.live("ctr", "a")) and probation.errors == 0


def test_query_logger_and_stats_on_the_cluster(redis_cluster, cluster_client, ns):
    publish_version(cluster_client, "ctr", "v1", [("ad1", 0.3)], n_keys=1, schema=ns)
    logger = QueryLogger(connect(redis_cluster.url, socket_timeout=1), ns)
    cache = cache_on(redis_cluster, ns, logger=logger)
    cache.get("ctr", "ad1", user="u1")
    cache.get_many("ctr", ["ad1", "ad404"])
    cache.get_or_compute("rank", "r1", lambda key: 1)
    logger.close()
    assert logger.stats.written == 4 and logger.stats.dropped == 0
    entries = [fields for _, fields in logged_queries(cluster_client, ns)]
    assert [(e[b"kind"], e[b"key"], e[b"hit"]) for e in entries] == [
        (b"ctr", b"ad1", b"1"),
        (b"ctr", b"ad1", b"1"),
        (b"ctr", b"ad404", b"0"),
        (b"rank", b"r1", b"0"),
    ]
    assert cluster_client.hgetall(ns.stats("ctr")) == {b"hit": b"2", b"miss": b"1"}
    assert cluster_client.hgetall(ns.stats("rank")) == {b"miss": b"1"}


def test_a_campaign_that_lost_one_ctr_is_found_on_the_cluster(redis_cluster, cluster_client, ns):
    """On one server one EXISTS counts a campaign's keys; on a cluster they are in many slots: one per key."""
    from datetime import UTC, datetime

    from precompute_assets.defs.campaigns import values_lost
    from precompute_assets.storage.campaigns import Campaign

    now, late = datetime.now(UTC), int(time.time()) + 3600
    campaigns = []
    for name in ("kept", "evicted"):
        ads = [f"{name}-ad{i}" for i in range(12)]
        write_live_values(cluster_client, "ctr", [(ad, 0.1) for ad in ads], expire_at=late, schema=ns)
        write_live_values(cluster_client, "budget", [(name, {ad: 1.0 for ad in ads})], expire_at=late, schema=ns)
        campaigns.append(Campaign(name, "acme", now, None, 12.0, "active", 1, 1, 1, now, 12))
    assert values_lost(cluster_client, ns, campaigns) == []
    cluster_client.delete(ns.live("ctr", "evicted-ad7"))
    assert [c.campaign_id for c in values_lost(cluster_client, ns, campaigns)] == ["evicted"]


def test_campaign_live_values_are_written_per_slot_on_the_cluster(redis_cluster, cluster_client, ns):
    now = int(time.time())
    late, early = now + 30 * 86400, now + 86400
    ads = [f"ad{i}" for i in range(40)]
    assert len({master_port(cluster_client, ns.live("ctr", ad)) for ad in ads}) == 3  # keys on every master
    assert write_live_values(cluster_client, "ctr", [(ad, 0.1) for ad in ads], expire_at=late, schema=ns) == 40
    write_live_values(cluster_client, "ctr", [(ads[0], 0.3), ("only_b", 0.4)], expire_at=early, schema=ns)
    assert cluster_client.expiretime(ns.live("ctr", ads[0])) == late  # not shortened
    assert cluster_client.expiretime(ns.live("ctr", "only_b")) == early
    cache = cache_on(redis_cluster, ns)
    assert cache.get_many("ctr", [ads[0], ads[1], "only_b"]) == [pytest.approx(v) for v in (0.3, 0.1, 0.4)]
    write_live_values(cluster_client, "budget", [("camp", {"ad1": 10})], expire_at=None, schema=ns)
    assert cache.get("budget", "camp") == {"ad1": 10}
    assert delete_live_values(cluster_client, [("ctr", ad) for ad in ads] + [("budget", "camp")], schema=ns) == 41
    assert cache.get_many("ctr", ads[:3]) == [None, None, None]


def test_an_interrupted_lookup_leaves_no_replies_for_the_next(redis_cluster, cluster_client, ns, monkeypatch):
    """A lookup interrupted while it reads its replies (``KeyboardInterrupt``: SIGTERM in the tests, a worker's timeout
    signal) drops the connections it wrote on. One went back to its pool with replies unread, which the next lookup
    on that master read as its values; the other masters' connections were never given back."""
    from redis.connection import Connection

    keys = [f"ad{i}" for i in range(300)]
    publish_version(cluster_client, "ctr", "v1", [(k, i / 1000) for i, k in enumerate(keys)], n_keys=300, schema=ns)
    cache = cache_on(redis_cluster, ns)
    expected = [pytest.approx(i / 1000) for i in range(300)]
    assert cache.get_many("ctr", keys) == expected
    read, calls = Connection.read_response, [0]

    def interrupted(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 4:  # the second reply of the buckets, the pointer and experiment read
            raise KeyboardInterrupt
        return read(self, *args, **kwargs)

    monkeypatch.setattr(Connection, "read_response", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cache.get_many("ctr", keys)
    monkeypatch.undo()
    assert cache.get_many("ctr", keys) == expected
    in_use = [node.redis_connection.connection_pool._in_use_connections for node in cache.client.get_nodes()]
    assert not any(in_use)


def test_a_master_failing_for_the_first_time_never_breaks_a_concurrent_lookup(redis_cluster, ns):
    """Threads share a cache: a lookup iterated the masters backing off while another thread recorded a master that
    had never failed before, and raised ``RuntimeError: dictionary changed size during iteration`` out of ``get_many``.
    Fast thread switches and many first failures make the rare interleaving common."""
    import sys

    cache = cache_on(redis_cluster, ns, backoff_s=60.0)
    errors: list[BaseException] = []
    stop = threading.Event()

    def look_up() -> None:
        while not stop.is_set():
            try:
                cache.get_many("ctr", ["a", "b", "c"])
            except Exception as error:  # noqa: BLE001 - what the lookup must never raise
                errors.append(error)
                return

    def fail_masters() -> None:  # as a lookup whose master failed records it; never-seen names, over and over
        number = 0
        while not stop.is_set() and number < 200_000:
            cache._node_failed(f"192.0.2.{number % 250}:{1024 + number // 250}")
            number += 1

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    threads = [threading.Thread(target=look_up) for _ in range(3)] + [threading.Thread(target=fail_masters)]
    try:
        for thread in threads:
            thread.start()
        threads[-1].join()
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        sys.setswitchinterval(interval)
    assert not errors, errors[:1]


def test_crafted_keys_are_refused_before_touching_the_cluster(redis_cluster, cluster_client, ns):
    cache = cache_on(redis_cluster, ns)
    for bad in ("{tag}", "a\nb", "", "x" * 257):
        with pytest.raises(ValueError, match="invalid prediction key"):
            cache.get("ctr", bad)
        with pytest.raises(ValueError, match="invalid prediction key"):
            write_live_values(cluster_client, "ctr", [(bad, 0.1)], expire_at=None, schema=ns)
    # A key with ':' stays under its kind's live prefix, in the slot its full name hashes to.
    name = ns.live("ctr", "tenant:ad1")
    assert name == f"{ns.prefix}:ctr:live:tenant:ad1" and key_slot(name) == key_slot(name.encode())


# --- a master killed mid-publish ----------------------------------------------------------------------------


@pytest.mark.parametrize("victim_holds", ["buckets", "pointer"])
def test_a_master_killed_mid_publish(cluster_factory, victim_holds):
    """SIGKILL of a master (no replica) after the first pipeline of a publish: the publish raises; readers never
    raise and see the old version or misses; keys whose bucket lives on the dead master are misses, every other key
    keeps the old value, and the pointer stays on the old version. When the dead master holds the pointer, a reader
    keeps the pointer it last read (nobody can flip it meanwhile); a reader that never read it has no version."""
    cluster = cluster_factory()
    schema = KeySchema(f"k{uuid.uuid4().hex[:8]}")
    publisher = connect(cluster.url, socket_timeout=2)
    keys = [f"ad{i}" for i in range(66_000)]  # 1,032 buckets: two pipelines (1,000 commands, a bucket each, at most)
    old = publish_version(publisher, "ctr", "old", [(k, 0.25) for k in keys], n_keys=len(keys), schema=schema)
    pointer_port = master_port(publisher, schema.pointer("ctr"))
    victim = next(s for s in cluster.masters if (s.port == pointer_port) == (victim_holds == "pointer"))
    on_victim = {b for b in range(old.buckets) if master_port(publisher, schema.bucket("ctr", "old", b)) == victim.port}
    cache = PredictionCache(connect(cluster.url, socket_timeout=0.5), schema=schema, pointer_ttl_s=0, backoff_s=0.2)
    seen: set[float | None] = set()
    stop, failures = threading.Event(), []

    def read() -> None:
        try:
            while not stop.is_set():
                seen.update(None if v is None else round(v, 3) for v in cache.get_many("ctr", keys[::97]))
        except Exception as error:  # noqa: BLE001 - recorded for the assertion below
            failures.append(error)

    reader = threading.Thread(target=read)
    reader.start()
    started = time.monotonic()
    try:
        with pytest.raises(REDIS_ERRORS) as raised:
            publish_version(
                publisher, "ctr", "new", [(k, 0.75) for k in keys], n_keys=len(keys), schema=schema,
                progress=lambda written: os.kill(victim.pid, signal.SIGKILL) if victim.pid else None,
            )  # fmt: skip
        failed_after = time.monotonic() - started
        time.sleep(0.3)  # the reader keeps reading past the failure
    finally:
        stop.set()
        reader.join()
    assert not failures
    assert "readers stay on the previous version" in "\n".join(getattr(raised.value, "__notes__", []))
    assert seen <= {0.25, None} and 0.25 in seen  # never 0.75
    assert failed_after < 30
    # The figure: the old version stays current; the keys whose bucket lives on the dead master are misses.
    values = cache.get_many("ctr", keys)
    lost = [k for k in keys if bucket_of(k, old.buckets) in on_victim]
    lost_set = set(lost)
    assert [value is None for value in values] == [k in lost_set for k in keys]
    assert all(v == pytest.approx(0.25) for v in values if v is not None)
    assert 0.2 < len(lost) / len(keys) < 0.5  # about a third: that master's share of the buckets
    alive = next(s for s in cluster.masters if s is not victim)  # a new client needs a live node to start from
    fresh_client = connect(f"redis://127.0.0.1:{alive.port}?cluster=1", socket_timeout=2)  # 50 ms: misses under load
    fresh = PredictionCache(fresh_client, schema=schema, pointer_ttl_s=0)
    if victim_holds == "pointer":
        assert fresh.get_many("ctr", keys[:100]) == [None] * 100  # no pointer was ever read: no version
    else:
        assert fresh.get_many("ctr", keys) == values
        assert Pointer.decode(publisher.get(schema.pointer("ctr"))).version == "old"
    print(
        f"master killed ({victim_holds}): {len(lost)} of {len(keys)} keys unreadable "
        f"({len(on_victim)} of {old.buckets} buckets)"
    )


def test_reads_follow_ask_while_a_slot_migrates(cluster_factory):
    """Resharding moves a slot's keys one by one: meanwhile the slot's old master answers ASK for a key already moved.
    Lookups and ``get_or_compute`` (``probation``) follow it with ``ASKING`` to the new master, so the values stay
    hits; they were misses (recomputed, counted as errors, each refreshing the slot map) until the slot finished."""
    cluster = cluster_factory()
    schema = KeySchema("mig")
    cache = cache_on(cluster, schema, admission=Probation(capacity=1000))
    keys = [f"ad{i}" for i in range(60)]
    for key in keys:
        assert cache.get_or_compute("ctr", key, lambda key: 0.25) == pytest.approx(0.25)
    source, target = cluster.masters[0], cluster.masters[1]
    moving = [key for key in keys if cluster.master_of_slot(key_slot(schema.live("ctr", key))) is source]
    assert len(moving) >= 4
    with cluster.client(source.port) as old, cluster.client(target.port) as new:
        for slot in {key_slot(schema.live("ctr", key)) for key in moving}:
            new.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", cluster.node_id(source.port))
            old.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", cluster.node_id(target.port))
        moved = moving[::2]
        for key in moved:
            old.execute_command("MIGRATE", "127.0.0.1", target.port, schema.live("ctr", key), 0, 5000)
        with pytest.raises(redis.exceptions.AskError):  # moved: the old master redirects
            old.get(schema.live("ctr", moved[0]))
    errors, computes = cache.errors, cache.computes
    assert cache.get_many("ctr", keys) == [pytest.approx(0.25)] * len(keys)
    assert [cache.get("ctr", key) for key in moved] == [pytest.approx(0.25)] * len(moved)
    assert [cache.get_or_compute("ctr", key, lambda key: 0.9) for key in moved] == [pytest.approx(0.25)] * len(moved)
    assert cache.errors == errors and cache.computes == computes


def test_writes_follow_a_migrating_slot_and_reads_a_moved_one(cluster_factory):
    """A resharding's slots: a live-value write (campaign warming, a task run) raised ``AskError`` while one of its
    slots migrated (``TryAgainError`` where it wrote two keys of that slot) and ``MovedError`` once it had moved, for
    every run while a rebalance touched it; and the first read of a key in a slot that had moved was a miss, counted
    as an error (``get_or_compute`` recomputed it)."""
    cluster = cluster_factory()
    schema = KeySchema("reshard")
    writer = connect(cluster.url, socket_timeout=5)
    keys = [f"ad{i}" for i in range(90)]
    write_live_values(writer, "ctr", [(k, 0.25) for k in keys], expire_at=None, schema=schema)
    cache = cache_on(cluster, schema)
    assert cache.get_many("ctr", keys) == [pytest.approx(0.25)] * len(keys)  # its slot map: before the move
    source, target = cluster.masters[0], cluster.masters[1]
    moving = [k for k in keys if cluster.master_of_slot(key_slot(schema.live("ctr", k))) is source]
    slots = {key_slot(schema.live("ctr", key)) for key in moving}
    assert len(slots) >= 2
    # a key in the slot of one that moves: a transaction of the two got TRYAGAIN while the slot migrated
    twin_slot = key_slot(schema.live("ctr", moving[0]))
    twin = next(f"tw{i}" for i in range(10**6) if key_slot(schema.live("ctr", f"tw{i}")) == twin_slot)
    keys.append(twin)
    moving.append(twin)
    with cluster.client(source.port) as old, cluster.client(target.port) as new:
        for slot in slots:
            new.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", cluster.node_id(source.port))
            old.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", cluster.node_id(target.port))
        for key in moving[::2]:
            old.execute_command("MIGRATE", "127.0.0.1", target.port, schema.live("ctr", key), 0, 5000)
        assert write_live_values(writer, "ctr", [(k, 0.5) for k in keys], expire_at=None, schema=schema) == 91
        assert cache.get_many("ctr", keys) == [pytest.approx(0.5)] * len(keys)
        for slot in slots:  # the migration ends: every key of the slots to the target, then the slots
            while names := old.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
                old.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *names)
            for server in cluster.masters:
                with cluster.client(server.port) as node:
                    node.execute_command("CLUSTER", "SETSLOT", slot, "NODE", cluster.node_id(target.port))
    errors = cache.errors
    assert [cache.get("ctr", k) for k in moving] == [pytest.approx(0.5)] * len(moving)
    assert cache.errors == errors
    assert writer.nodes_manager.get_node_from_slot(min(slots)).port == source.port  # its map: before the move
    assert write_live_values(writer, "ctr", [(k, 0.75) for k in keys], expire_at=None, schema=schema) == 91
    assert cache.get_many("ctr", keys) == [pytest.approx(0.75)] * len(keys)


def test_an_ask_target_that_is_down_backs_off_alone(cluster_factory):
    """A slot migrating to a master that dies: the keys already moved (the old master answers ASK) are misses, and it is
    the dead master that backs off, once. The old master's other keys stay hits; they were all misses for
    ``backoff_s`` (the failed ASK counted as the old master's failure), and the dead master was tried again by every
    lookup of a moved key."""
    cluster = cluster_factory()
    schema = KeySchema("askdown")
    cache = cache_on(cluster, schema, backoff_s=60)
    keys = [f"ad{i}" for i in range(90)]
    write_live_values(connect(cluster.url, socket_timeout=5), "ctr", [(k, 0.25) for k in keys], expire_at=None,
                      schema=schema)  # fmt: skip
    source, target = cluster.masters[0], cluster.masters[1]
    on = {k: cluster.master_of_slot(key_slot(schema.live("ctr", k))) for k in keys}
    moving = [k for k in keys if on[k] is source]
    moved = moving[::2]
    assert len(moved) >= 2 and len(moving) - len(moved) >= 2
    with cluster.client(source.port) as old, cluster.client(target.port) as new:
        for slot in {key_slot(schema.live("ctr", key)) for key in moving}:
            new.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", cluster.node_id(source.port))
            old.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", cluster.node_id(target.port))
        for key in moved:
            old.execute_command("MIGRATE", "127.0.0.1", target.port, schema.live("ctr", key), 0, 5000)
    os.kill(target.pid, signal.SIGKILL)
    expected = [None if k in moved or on[k] is target else pytest.approx(0.25) for k in keys]
    for _ in range(3):
        assert cache.get_many("ctr", keys) == expected
        assert [cache.get("ctr", k) for k in moving] == [None if k in moved else pytest.approx(0.25) for k in moving]
    assert cache.errors == 1  # the dead master, once; then it backs off, also as the ASK target


def test_a_replica_takes_over_a_killed_master(cluster_factory):
    """With a replica per master the killed master's slots fail over within a few seconds: then every key of the old
    version is readable again, by the same client, after it refreshed its slot map."""
    cluster = cluster_factory(replicas=1)
    schema = KeySchema(f"r{uuid.uuid4().hex[:8]}")
    publisher = connect(cluster.url, socket_timeout=2, retries=2)  # as RedisResource
    keys = [f"ad{i}" for i in range(3000)]
    publish_version(publisher, "ctr", "old", [(k, 0.25) for k in keys], n_keys=len(keys), schema=schema)
    # No wait here: the publish returned once every master's replica held its buckets and the pointer.
    cache = PredictionCache(connect(cluster.url, socket_timeout=0.5), schema=schema, pointer_ttl_s=0, backoff_s=0.2)
    assert cache.get_many("ctr", keys[::50]) == [pytest.approx(0.25)] * len(keys[::50])
    victim = cluster.masters[1]
    os.kill(victim.pid, signal.SIGKILL)
    deadline, values = time.monotonic() + 20, []
    while time.monotonic() < deadline:
        values = cache.get_many("ctr", keys)  # never raises: misses while the slots have no master
        if all(v is not None for v in values):
            break
        time.sleep(0.2)
    assert values == [pytest.approx(0.25)] * len(keys)
    publish_version(publisher, "ctr", "new", [(k, 0.75) for k in keys], n_keys=len(keys), schema=schema)
    assert cache.get_many("ctr", keys[::50]) == [pytest.approx(0.75)] * len(keys[::50])


def test_a_master_lost_while_its_flip_is_confirmed_fails_the_publish(cluster_factory, monkeypatch):
    """The pointer's master killed after the flip, before its replica acknowledged it: the wait after the flip failed
    to reach it, only warned, and the publish returned success while the promoted replica named the old version."""
    from precompute_assets.serving import replication
    from precompute_assets.serving.replication import ReplicaLostError

    cluster = cluster_factory(replicas=1)
    schema = KeySchema(f"r{uuid.uuid4().hex[:8]}")
    publisher = connect(cluster.url, socket_timeout=2, retries=2)
    items = [(f"ad{i}", 0.25) for i in range(300)]
    publish_version(publisher, "ctr", "v1", items, n_keys=len(items), schema=schema)
    victim = next(s for s in cluster.masters if s.port == master_port(publisher, schema.pointer("ctr")))
    real_wait = replication._wait

    def killed_after_the_flip(client, timeout_s, poll_s, since):
        if since:
            os.kill(victim.pid, signal.SIGKILL)
        return real_wait(client, timeout_s, poll_s, since)

    monkeypatch.setattr(replication, "_wait", killed_after_the_flip)
    with pytest.raises(ReplicaLostError, match="a primary stopped answering after the flip of ctr to v2"):
        publish_version(publisher, "ctr", "v2", items, n_keys=len(items), schema=schema, replica_wait_s=2)


def test_a_service_starts_while_no_node_of_the_cluster_answers(cluster_factory):
    """``from_url`` on a cluster none of whose nodes answers builds the cache and its loggers (it raised
    ``RedisClusterException``: building a cluster client reads the slot map), as on a single server that is down:
    lookups are misses, one error per ``backoff_s``; once a node answers, the same cache serves hits."""
    from precompute_assets.serving.events import EventLogger
    from precompute_assets.stack import free_port

    cache = PredictionCache.from_url(f"redis://127.0.0.1:{free_port()}?cluster=1", backoff_s=60)
    assert cache.get("ctr", "ad1") is None and cache.get_or_compute("ctr", "ad1", lambda key: 0.5) == 0.5
    assert cache.get_many("ctr", ["ad1", "ad2"]) == [None, None] and cache.errors == 1  # then it backs off
    cache.close()
    EventLogger.from_url(f"redis://127.0.0.1:{free_port()}?cluster=1").close()

    cluster = cluster_factory()
    schema = KeySchema(f"s{uuid.uuid4().hex[:8]}")
    keys = [f"ad{i}" for i in range(300)]  # buckets on every master
    publish_version(connect(cluster.url, socket_timeout=5), "ctr", "v1", [(k, 0.25) for k in keys], n_keys=300,
                    schema=schema)  # fmt: skip
    for server in cluster.nodes:
        os.kill(server.pid, signal.SIGSTOP)
    try:
        cache = PredictionCache.from_url(
            cluster.url, namespace=schema.namespace, socket_timeout=0.2, pointer_ttl_s=0, backoff_s=0.2
        )
        assert cache.get_many("ctr", keys) == [None] * len(keys) and cache.errors == 1
        assert cache.get_or_compute("ctr", "ad1", lambda key: 0.9) == pytest.approx(0.9)
    finally:
        for server in cluster.nodes:
            os.kill(server.pid, signal.SIGCONT)
    deadline, values = time.monotonic() + 20, []
    while time.monotonic() < deadline:
        values = cache.get_many("ctr", keys)
        if all(v is not None for v in values):
            break
        time.sleep(0.1)
    assert values == [pytest.approx(0.25)] * len(keys)
    assert isinstance(cache.client, RedisCluster)
    cache.close()
    assert cache.logger.stats.written > 0  # the query logger built its client too


# --- invalidation, stats and the event logger on the cluster (modules of their own; tested here on a cluster) -----


def test_a_flip_waits_for_every_replica_so_a_failover_keeps_the_version(cluster_factory):
    """A replica that lags when its master dies is promoted without what it lacked. So the flip waits until every
    master's replicas hold the version, refuses while one lags, and then a master killed right after the publish
    hands its slots to a replica that serves the whole version."""
    cluster = cluster_factory(replicas=1)
    schema = KeySchema(f"w{uuid.uuid4().hex[:8]}")
    publisher = connect(cluster.url, socket_timeout=2, retries=2)  # as RedisResource
    keys = [f"ad{i}" for i in range(6000)]
    publish_version(publisher, "ctr", "old", [(k, 0.25) for k in keys], n_keys=len(keys), schema=schema)
    lagging, its_master = cluster.replicas[0], cluster.masters[0]  # replica i follows master i
    os.kill(lagging.pid, signal.SIGSTOP)
    try:
        behind = rf"127.0.0.1:{lagging.port} behind 127.0.0.1:{its_master.port}"
        with pytest.raises(ReplicationTimeoutError, match=behind):
            publish_version(publisher, "ctr", "new", [(k, 0.5) for k in keys], n_keys=len(keys), schema=schema,
                            replica_wait_s=1)  # fmt: skip
        assert Pointer.decode(publisher.get(schema.pointer("ctr"))).version == "old"
    finally:
        os.kill(lagging.pid, signal.SIGCONT)
    cluster.wait_ok()
    publish_version(publisher, "ctr", "new", [(k, 0.5) for k in keys], n_keys=len(keys), schema=schema)
    cache = PredictionCache(connect(cluster.url, socket_timeout=0.5), schema=schema, pointer_ttl_s=0, backoff_s=0.2)
    os.kill(its_master.pid, signal.SIGKILL)  # at once: anything the replica lacked now would be lost
    deadline, values = time.monotonic() + 30, []
    while time.monotonic() < deadline:
        values = cache.get_many("ctr", keys)
        if all(v is not None for v in values):
            break
        time.sleep(0.2)
    assert values == [pytest.approx(0.5)] * len(keys)  # the new version, whole, after the failover


def test_invalidation_on_the_cluster(redis_cluster, cluster_client, ns):
    from precompute_assets.serving.invalidate import invalidate

    keys = [f"ad{i}" for i in range(300)]
    publish_version(cluster_client, "ctr", "v1", [(k, 0.5) for k in keys], n_keys=len(keys), schema=ns)
    publish_version(cluster_client, "ctr", "v2", [(k, 0.6) for k in keys], n_keys=len(keys), schema=ns)
    write_live_values(cluster_client, "ctr", [(f"ad{i}", 0.1) for i in range(10, 20)], expire_at=None, schema=ns)
    cache = cache_on(redis_cluster, ns)
    assert invalidate(cluster_client, "ctr", key="ad1", schema=ns).fields == 1
    gone = invalidate(cluster_client, "ctr", prefix="ad1", schema=ns)  # ad1x, ad1xx and the live ad10..ad19
    assert gone.live_keys == 10 and gone.fields == 110
    assert cache.get_many("ctr", ["ad1", "ad15", "ad150", "ad2"]) == [None, None, None, pytest.approx(0.6)]
    assert invalidate(cluster_client, "ctr", version="v1", schema=ns).buckets == 5  # on every master


def test_a_value_computed_before_an_invalidation_is_not_stored_on_the_cluster(redis_cluster, cluster_client, ns):
    """The kind's epoch is in another slot than the value: the store compares it first (not atomically, see
    ``PredictionCache._invalidated_on_cluster``), so a computation that overlapped an invalidation stores nothing."""
    from precompute_assets.serving.invalidate import invalidate

    for stampede in ({}, {"xfetch_beta": 0, "recompute_lock_ms": 0}):
        cache = cache_on(redis_cluster, ns, **stampede)
        key = f"ad-{len(stampede)}"

        def computed_before(key: str) -> float:
            invalidate(cluster_client, "ctr", key=key, schema=ns)
            return 0.25

        assert cache.get_or_compute("ctr", key, computed_before) == 0.25
        assert cluster_client.get(ns.live("ctr", key)) is None and cache.invalidated == 1
        assert cache.get_or_compute("ctr", key, lambda key: 0.5) == 0.5 and cache.get("ctr", key) == 0.5
        assert cache.errors == 0
        cache.close()


def test_probation_admits_no_key_whose_store_an_invalidation_refused_on_the_cluster(redis_cluster, cluster_client, ns):
    """The admit script went out even when the epoch had moved and the value was not stored: the key took probation's
    only slot with no value behind it, evicting the key that had one."""
    from precompute_assets.serving.invalidate import invalidate

    for stampede in ({}, {"xfetch_beta": 0, "recompute_lock_ms": 0}):
        kind = "ctr" if stampede else "campaign"  # a tier of its own for each
        cache = cache_on(redis_cluster, ns, admission=Probation(capacity=1), **stampede)
        assert cache.get_or_compute(kind, "a", lambda key: 0.5) == 0.5

        def computed_before(key: str, kind: str = kind) -> float:
            invalidate(cluster_client, kind, key=key, schema=ns)
            return 0.25

        assert cache.get_or_compute(kind, "b", computed_before) == 0.25 and cache.invalidated == 1
        small = cluster_client.lrange(ns.admission_fifo(kind, "small"), 0, -1)
        assert small == [b"a"] and cache.get(kind, "a") == 0.5 and cache.errors == 0
        cache.close()


def test_cache_stats_on_the_cluster(redis_cluster, cluster_client, ns):
    from precompute_assets.serving.stats import cache_stats

    publish_version(cluster_client, "ctr", "v1", [(f"ad{i}", 0.5) for i in range(300)], n_keys=300, schema=ns)
    logger = QueryLogger(connect(redis_cluster.url, socket_timeout=1), ns)
    cache = cache_on(redis_cluster, ns, logger=logger)
    cache.get_many("ctr", ["ad1", "ad2", "nope"])
    logger.close()
    stats = cache_stats(cluster_client, ns)["kinds"]["ctr"]
    assert stats["current"]["version"] == "v1" and stats["current"]["keys"] == 300
    assert stats["window"]["requests"] == 3 and stats["window"]["hits"] == 2


@pytest.mark.parametrize("which", ["queries", "events"])
def test_a_master_that_stalls_past_the_timeout_never_gets_a_logged_batch_twice(cluster_factory, which):
    """redis-py's cluster pipeline sent again the commands whose reply timed out: a master that stalled for a second and
    a half (stopped here) ran each ``XADD`` twice once it went on, which the hourly drains read as twice the queries
    (or handled each login twice), while the logger counted them once. Now at most once: a batch without a reply is
    counted as dropped, and whether it landed or not, it is never sent again."""
    from precompute_assets.serving.events import EventLogger, events_stream

    cluster, ns = cluster_factory(), KeySchema("stall")
    admin = connect(cluster.url, socket_timeout=5)
    stream = ns.query_log() if which == "queries" else events_stream(ns)
    victim = next(server for server in cluster.masters if server.port == master_port(admin, stream))
    client = connect(cluster.url, socket_timeout=1)
    logger = QueryLogger(client, ns) if which == "queries" else EventLogger(client, ns)

    def record(i: int) -> None:
        if which == "queries":
            logger.log("ctr", f"k{i}", hit=True)
        else:
            logger.record_event(f"u{i}", "login")

    record(0)
    logger.flush()  # connected, and one batch written
    os.kill(victim.pid, signal.SIGSTOP)
    resume = threading.Timer(1.5, os.kill, (victim.pid, signal.SIGCONT))
    resume.start()
    try:
        for i in range(1, 51):
            record(i)
        logger.flush()  # its reply times out after 1 s; the master goes on half a second later, and runs the batch
    finally:
        resume.join()
    cluster.wait_ok()
    logger.close()
    if which == "queries":
        written = [fields[b"key"] for _, fields in logged_queries(admin, ns)]
    else:
        written = [fields[b"user"] for _, fields in admin.xrange(stream)]
    assert len(written) == len(set(written)), f"{len(written) - len(set(written))} written twice"
    # the batch without a reply is unconfirmed, not dropped: it ran (h_serve)
    assert logger.stats.written + logger.stats.dropped + logger.stats.unconfirmed == 51 and logger.stats.unconfirmed
    assert logger.stats.written <= len(written) <= logger.stats.written + logger.stats.unconfirmed
    admin.close()


def test_event_logger_on_the_cluster(redis_cluster, cluster_client, ns):
    from precompute_assets.serving.events import EventLogger, events_stream

    events = EventLogger(connect(redis_cluster.url, socket_timeout=1), ns)
    events.record_event("u1", "login", tenant="acme")
    events.record_event("u1", "campaign_create", entity="c1")
    events.close()
    assert events.stats.written == 2 and events.stats.dropped == 0
    assert [f[b"action"] for _, f in cluster_client.xrange(events_stream(ns))] == [b"login", b"campaign_create"]


def test_user_states_over_many_slots_on_the_cluster(cluster_client, ns):
    from precompute_assets.serving.events import (
        UserStatesSpan,
        read_user_states,
        read_user_states_span,
        server_mark,
        write_user_states,
    )

    mark = server_mark(cluster_client)  # every primary's run_id and evictions: a state lost on any one shows
    assert mark is not None and len(mark.split(",")) == 3 and mark == server_mark(cluster_client)
    users = [f"user{i}" for i in range(50)]
    slots = {key_slot(ns.user_state(user)) for user in users}
    assert len(slots) > 10  # spread over every master
    span = UserStatesSpan("1-0", "9-0")
    write_user_states(
        cluster_client, ns, {u: {"id": f"{i}-0", "today": str(i)} for i, u in enumerate(users)}, span=span
    )
    stored = read_user_states(cluster_client, ns, [*users, "nobody"], (b"today", b"id"))
    assert {user: values[0] for user, values in stored.items()} == {u: str(i).encode() for i, u in enumerate(users)}
    assert 0 < cluster_client.ttl(ns.user_state("user7")) <= 2 * 86_400
    assert read_user_states_span(cluster_client, ns) == span


def test_a_cluster_of_one_primary_gives_its_server_mark_too(cluster_factory):
    """redis-py unwraps the reply of a single node: ``INFO`` of the primaries is then one server's dict."""
    from precompute_assets.serving.events import server_mark

    client = connect(cluster_factory(masters=1).url, socket_timeout=5)
    mark = server_mark(client)
    assert mark is not None and len(mark.split(",")) == 1 and mark.endswith(":0") and mark == server_mark(client)


def test_rerank_on_the_cluster(redis_cluster, cluster_client, ns):
    import numpy as np

    from precompute_assets.serving.rerank import rerank
    from precompute_assets.serving.vectors import decode_vector, encode_batch

    rng = np.random.default_rng(3)
    ids = [f"doc{i}" for i in range(400)]
    raws = encode_batch(rng.normal(size=(400, 16)), model_version="m1")
    publish_version(cluster_client, "doc_embedding", "e1", zip(ids, raws, strict=True), n_keys=400, schema=ns)
    cache = cache_on(redis_cluster, ns)
    query = rng.normal(size=16).astype(np.float32)
    candidates = ids[::7] + ["absent"]
    result = rerank(cache, query, candidates)
    vectors = {doc_id: decode_vector(raw).vector for doc_id, raw in zip(ids, raws, strict=True)}
    cosine = {d: float(vectors[d] @ query / np.linalg.norm(vectors[d]) / np.linalg.norm(query)) for d in ids[::7]}
    assert [doc_id for doc_id, _ in result[:-1]] == sorted(cosine, key=lambda d: -cosine[d])
    assert result[-1] == ("absent", None)


def test_rerank_keeps_the_other_masters_candidates_when_one_is_down(cluster_factory):
    """A dead master makes only its buckets' candidates misses, and backs off alone, as ``get_many`` has it: rerank
    once sent around the per-master backoff, so every call lost every candidate and retried the dead master."""
    import numpy as np

    from precompute_assets.serving.rerank import rerank
    from precompute_assets.serving.vectors import encode_batch

    cluster = cluster_factory()
    schema = KeySchema("rr")
    client = connect(cluster.url, socket_timeout=5)
    ids = [f"doc{i}" for i in range(300)]
    raws = encode_batch(np.random.default_rng(4).normal(size=(300, 16)), model_version="m1")
    publish_version(client, "doc_embedding", "e1", zip(ids, raws, strict=True), n_keys=300, schema=schema)
    cache = cache_on(cluster, schema)
    pointer = cache.current_version("doc_embedding")
    victim = cluster.masters[2]
    buckets = {d: schema.bucket_for_key("doc_embedding", pointer, d) for d in ids[:100]}
    alive = [d for d in ids[:100] if cluster.master_of_slot(key_slot(buckets[d])) is not victim]
    assert 0 < len(alive) < 100
    os.kill(victim.pid, signal.SIGKILL)
    for _ in range(3):
        result = rerank(cache, np.ones(16), ids[:100])
        assert {doc_id for doc_id, score in result if score is not None} == set(alive)
    assert cache.errors == 1  # the dead master was tried once, then backed off


def test_a_pointer_write_that_landed_but_lost_its_reply_is_a_flip_with_its_experiment(
    cluster_client: RedisCluster, ns: KeySchema, monkeypatch
):
    """On a cluster the flip writes the experiment, then the pointer. When the pointer's SET landed but its reply was
    lost, the old experiment was put back and the error raised; the retry found the version current and never wrote
    the experiment: the new version served with the old experiment until the next publish (found by review)."""
    from precompute_assets.serving import publish as publish_module

    keys = [f"k{i}" for i in range(300)]
    old, new = Experiment("e1", "s1", ("a", "b")), Experiment("e2", "s2", ("a", "b"))
    publish_version(cluster_client, "ctr", "old", [(k, 0.25) for k in keys], n_keys=300, schema=ns, experiment=old,
                    replica_wait_s=0)  # fmt: skip
    run_commands = publish_module.run_commands

    def reply_lost(client, commands):
        replies = run_commands(client, commands)
        if commands and commands[0][0] == b"SET" and commands[0][1] == ns.pointer("ctr").encode():
            monkeypatch.setattr(publish_module, "run_commands", run_commands)
            raise redis.ConnectionError("the reply was lost after the SET landed")
        return replies

    monkeypatch.setattr(publish_module, "run_commands", reply_lost)
    result = publish_version(cluster_client, "ctr", "new", [(k, 0.75) for k in keys], n_keys=300, schema=ns,
                             experiment=new, replica_wait_s=0)  # fmt: skip
    assert result.previous_version == "old" and not result.already_current
    assert Pointer.decode(cluster_client.get(ns.pointer("ctr"))).version == "new"
    assert Experiment.decode(cluster_client.get(ns.experiment("ctr"))) == new

    # A flip that died between its writes left another experiment: a retried publish of the current version mends it.
    cluster_client.set(ns.experiment("ctr"), old.encode())
    again = publish_version(cluster_client, "ctr", "new", [(k, 0.75) for k in keys], n_keys=300, schema=ns,
                            experiment=new, replica_wait_s=0)  # fmt: skip
    assert again.already_current and Experiment.decode(cluster_client.get(ns.experiment("ctr"))) == new


# --- memory, as bench publish counts it ------------------------------------------------------------------------


def test_keys_memory_sums_every_primary(cluster_client: RedisCluster, ns: KeySchema):
    """Every primary's keys, and only the matched ones: bench publish once counted one node of three."""
    value = b"x" * 100_000
    names = [f"{ns.prefix}:memory:{i}" for i in range(30)]
    assert len({master_port(cluster_client, name) for name in names}) == 3  # spread over every primary
    for name in names:
        cluster_client.set(name, value)
    cluster_client.set(f"{ns.prefix}:other", value)  # not matched
    used, keys = keys_memory(cluster_client, f"{ns.prefix}:memory:*", batch=7)  # batches that split the nodes' keys
    for name in [*names, f"{ns.prefix}:other"]:
        cluster_client.delete(name)
    assert keys == len(names)
    assert len(names) * len(value) <= used < len(names) * (len(value) + 20_000)  # allocator rounding, no more


def test_bench_publish_runs_on_a_cluster_and_counts_its_memory(redis_cluster: Cluster):
    from precompute_assets.tools.bench import bench_publish

    result = bench_publish(redis_cluster.url, n=20_000, naive_n=2_000, redis_benchmark=False)
    assert result["keys"] == 20_000 and result["redis_benchmark_set_per_s"] is None
    # A float32 value each, in hash buckets: a few bytes a key on every node together, not a third of them. Other
    # tests' keys expiring meanwhile do not move it (a used_memory difference came out at -1.1 bytes a key).
    assert 4 <= result["redis_bytes_per_key"] < result["naive_redis_bytes_per_key"]


def test_a_plain_url_of_a_cluster_node_is_refused_in_one_line_naming_cluster_1(redis_cluster):
    """Without ``?cluster=1`` a node answered PING and `up` said reachable; every publish then failed on MOVED, and
    every read of the services missed (h_ops)."""
    from precompute_assets.stack import ENV_REDIS, login_problem

    plain = redis_cluster.url.replace("?cluster=1", "/0")
    assert login_problem(ENV_REDIS, plain) == "a Redis Cluster node: add ?cluster=1 to the URL"
    with pytest.raises(Exception, match=r"is a Redis Cluster node: add \?cluster=1 to the URL"):
        RedisResource(url=plain).client()
    RedisResource(url=redis_cluster.url).client().close()  # the cluster URL itself is fine


def test_out_of_memory_on_the_cluster_reads_its_policy(redis_cluster, cluster_client):
    """On a cluster the failure read no ``INFO`` and took the policy for noeviction: a cluster under volatile-lru was
    told to switch to volatile-lru."""
    from precompute_assets.defs.resources import out_of_memory

    nodes = [redis_cluster.client(server.port) for server in redis_cluster.masters]
    before = [node.config_get("maxmemory-policy")["maxmemory-policy"] for node in nodes]
    try:
        for node in nodes:
            node.config_set("maxmemory-policy", "volatile-lru")
        text = out_of_memory(cluster_client, redis.exceptions.OutOfMemoryError("OOM command not allowed"))
        assert "maxmemory-policy volatile-lru" in text and "Nothing is left that volatile-lru may evict" in text, text
        assert "or the policy volatile-lru" not in text
    finally:
        for node, policy in zip(nodes, before, strict=True):
            node.config_set("maxmemory-policy", policy)
            node.close()
