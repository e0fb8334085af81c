"""The serving contract through Redis Sentinel (a primary, a replica and a sentinel of the embedded server on
127.0.0.1): the URL, publish and read through the sentinel's primary, a killed primary replaced by its replica
under a running serving client, and ACL users on every server."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator

import dagster as dg
import pytest
import redis

from precompute_assets.defs.resources import RedisResource
from precompute_assets.serving import KeySchema, Pointer, PredictionCache, connect, publish_version
from precompute_assets.serving.connection import SentinelUrl, is_sentinel, parse_sentinel_url, sentinel_servers
from precompute_assets.stack import RedisServer, free_port, reachable, redact, url_problem
from precompute_assets_tests.factories import logged_queries

from .conftest import SERVICE, SentinelGroup, SentinelServer
from .test_auth_tls import self_signed_certificate, tls_redis_server

# --- the URL (no server) --------------------------------------------------------------------------------------


def test_a_sentinel_url_is_taken_apart():
    assert parse_sentinel_url("redis://h:1/0") is None
    assert parse_sentinel_url("redis+sentinel://s1,s2:26380,[::1]:7/mymaster") == SentinelUrl(
        (("s1", 26379), ("s2", 26380), ("::1", 7)), "mymaster"
    )
    assert parse_sentinel_url(
        "REDIS+SENTINEL://app:p%40ss@s1:26379/my%20master/3?sentinel_username=sen&sentinel_password=sp"
    ) == SentinelUrl((("s1", 26379),), "my master", 3, "app", "p@ss", "sen", "sp")
    assert parse_sentinel_url("rediss+sentinel://s1/m?ssl_cert_reqs=required&ssl_ca_certs=/ca.pem").tls == (
        ("ssl_cert_reqs", "required"),
        ("ssl_ca_certs", "/ca.pem"),
    )
    encrypted_key = "rediss+sentinel://s1/m?ssl_keyfile=/key.pem&ssl_password=key-secret"  # was refused as unknown
    assert ("ssl_password", "key-secret") in parse_sentinel_url(encrypted_key).tls
    assert "key-secret" not in redact(encrypted_key)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel:///mymaster", "names no sentinel"),
        ("redis+sentinel://s1:26379", "path must be /service"),
        ("redis+sentinel://s1:26379/m/0/extra", "path must be /service"),
        ("redis+sentinel://s1:26379/m/one", "database must be a whole number"),
        ("redis+sentinel://s1:99999/m", "is not host:port"),
        ("redis+sentinel://s1:port/m", "is not host:port"),
        ("redis+sentinel://s1/m?cluster=1", "unknown parameter"),
        ("redis+sentinels://s1/m", "unknown Redis URL scheme"),
        ("redis+sentinel://s1/m?ssl_ca_certs=/ca.pem", "TLS options need rediss"),
        ("rediss+sentinel://s1/m?ssl_check_hostname=maybe", "not one of"),
    ],
)
def test_a_bad_sentinel_url_is_one_clear_error(url, message):
    with pytest.raises(ValueError, match=message):
        parse_sentinel_url(url)
    with pytest.raises(ValueError, match=message):
        connect(url)
    if "sentinels://" not in url:  # what `up` and `status` say of it, before any connection
        assert message in (url_problem("PRECOMPUTE_REDIS_URL", url) or "")


def test_up_and_status_take_a_sentinel_url_for_a_redis_url():
    assert url_problem("PRECOMPUTE_REDIS_URL", "redis+sentinel://s1:26379,s2:26380/mymaster/2") is None
    assert url_problem("PRECOMPUTE_REDIS_URL", "rediss+sentinel://s1/m?ssl_cert_reqs=required") is None


def test_a_sentinel_url_is_neither_a_cluster_nor_redacted_loosely():
    with pytest.raises(ValueError, match="names a Sentinel primary"):
        connect("redis+sentinel://127.0.0.1:1/m", cluster=True)
    assert is_sentinel(connect("redis+sentinel://127.0.0.1:1/m")) and not is_sentinel(redis.Redis())  # not connected
    with pytest.raises(dg.Failure, match="does not answer: no sentinel names a primary for 'm'"):
        RedisResource(url="redis+sentinel://127.0.0.1:1/m").client()  # Dagster's resource checks its server first
    shown = redact("redis+sentinel://app:secret1@s1:26379/m?sentinel_password=secret2")
    assert "secret1" not in shown and "secret2" not in shown, shown


@pytest.mark.parametrize("password", ["s3cr/et", "s3cr@et", "s3/cr@et/"])
def test_an_unencoded_slash_or_at_in_the_password_is_taken_and_never_shown(password):
    """The authority ended at the password's first '/': the rest of the URL was misread, and the error named the
    "sentinel" 'app:s3cr', a part of the password."""
    assert parse_sentinel_url(f"redis+sentinel://app:{password}@s1,s2:26380/m/2") == SentinelUrl(
        (("s1", 26379), ("s2", 26380)), "m", 2, "app", password
    )
    with pytest.raises(ValueError, match="is not host:port") as raised:
        parse_sentinel_url(f"redis+sentinel://app:{password}@s1:99999/m")
    assert "s3" not in str(raised.value), raised.value


def test_a_url_of_several_sentinels_is_reachable_when_any_answers():
    """``reachable`` (``precompute status``, ``up``) read a Sentinel URL's port as a single server's: a list of
    sentinels, the README's form, raised ``ValueError`` instead."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert reachable(f"redis+sentinel://app:pw@127.0.0.1:1,127.0.0.1:{port}/m")
    assert not reachable(f"redis+sentinel://127.0.0.1:1,127.0.0.1:{port}/m")


@contextlib.contextmanager
def hanging_up_server() -> Iterator[tuple[int, list]]:
    """A port on 127.0.0.1 whose server accepts each connection and closes it at once, and the list of those it
    accepted (as a dead sentinel or replica behind a proxy looks)."""
    accepted: list = []
    stopped = threading.Event()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        listener.settimeout(0.1)

        def serve() -> None:
            while not stopped.is_set():
                with contextlib.suppress(OSError):
                    connection, _ = listener.accept()
                    accepted.append(connection)
                    connection.close()

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            yield listener.getsockname()[1], accepted
        finally:
            stopped.set()
            thread.join()


def test_a_dead_sentinel_is_asked_once_per_lookup_not_retried():
    """The sentinels' own clients had redis-py's default retry (10 attempts, exponential backoff up to 1 s): a lookup
    through a sentinel that fails took seconds instead of one ``socket_timeout``. Here a sentinel that accepts and
    hangs up at once is connected to once per lookup."""
    with hanging_up_server() as (port, accepted):
        client = connect(f"redis+sentinel://127.0.0.1:{port}/m", socket_timeout=0.5)
        with pytest.raises(redis.ConnectionError, match="no sentinel names a primary"):
            client.get("a")
    assert len(accepted) == 1, len(accepted)


def test_a_replica_that_fails_is_asked_once_when_acl_users_are_set():
    """``sentinel_servers`` (``redis acl --apply``) gave the replicas' clients redis-py's default retry, 10 attempts
    with backoff: a listed replica that failed held the command for seconds (a minute, at the CLI's 5 s timeout, for
    one that does not answer). Here a replica that accepts and hangs up is connected to once."""
    with hanging_up_server() as (port, accepted):
        client = connect("redis+sentinel://127.0.0.1:1/m", socket_timeout=0.5)
        replica = ("127.0.0.1", port)
        client.connection_pool.sentinel_manager.discover_slaves = lambda service: [replica]  # no sentinel here
        _, listed = sentinel_servers(client)
        with pytest.raises(redis.ConnectionError):
            listed.ping()
    assert len(accepted) == 1, len(accepted)


def test_no_primary_is_one_short_line_naming_each_sentinel():
    """redis-py's MasterNotFoundError held the repr of every sentinel's client (about 1,500 characters each), which
    the CLI printed as its one-line error."""
    url = f"redis+sentinel://127.0.0.1:{free_port()},127.0.0.1:{free_port()}/m"
    with pytest.raises(redis.ConnectionError) as raised:
        connect(url, socket_timeout=0.5).get("a")
    message = str(raised.value)
    ports = [address.rpartition(":")[2] for address in url.split("//")[1].split("/")[0].split(",")]
    assert all(f"127.0.0.1:{port}" in message for port in ports), message
    assert "'m'" in message and "\n" not in message and len(message) < 400, message


# --- on a real primary, replica and sentinel -------------------------------------------------------------------


def test_publish_and_read_through_the_sentinels_primary(sentinel_group: SentinelGroup, monkeypatch, tmp_path, capsys):
    from precompute_assets.tools.cli import main

    schema = KeySchema(f"s{uuid.uuid4().hex[:8]}")
    publisher = connect(sentinel_group.url, socket_timeout=5)
    keys = [f"ad{i}" for i in range(200)]
    result = publish_version(
        publisher, "ctr", "v1", [(k, i / 256) for i, k in enumerate(keys)], n_keys=200, schema=schema
    )
    assert result.keys == 200
    with redis.Redis(port=sentinel_group.replica.port) as replica:  # the flip waited for the replica to hold them
        # (the pointer written by the flip itself follows asynchronously: checking it here failed once in CI)
        assert all(replica.exists(schema.bucket("ctr", "v1", b)) for b in range(result.buckets))
    cache = PredictionCache.from_url(sentinel_group.url, namespace=schema.namespace, socket_timeout=1.0)
    try:
        assert cache.get_many("ctr", keys) == [i / 256 for i in range(200)]
    finally:
        cache.close()
    assert reachable(sentinel_group.url) and not reachable("redis+sentinel://127.0.0.1:1/m")
    monkeypatch.setattr(os, "environ", os.environ.copy())
    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PRECOMPUTE_REDIS_URL", sentinel_group.url)
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "redis     external  reachable" in out and ("(valkey " in out or "(redis " in out), out


def test_a_killed_primary_is_replaced_under_a_running_client(sentinel_group: SentinelGroup):
    schema = KeySchema(f"s{uuid.uuid4().hex[:8]}")
    publisher = connect(sentinel_group.url, socket_timeout=2)
    publish_version(publisher, "ctr", "v1", [("a", 0.25), ("b", 0.5)], n_keys=2, schema=schema)
    cache = PredictionCache.from_url(
        sentinel_group.url, namespace=schema.namespace, socket_timeout=0.5, log_events=False
    )
    try:
        assert cache.get("ctr", "a") == 0.25
        old = sentinel_group.primary.port
        os.kill(sentinel_group.primary.pid, signal.SIGKILL)
        new = sentinel_group.wait_failover(old)
        assert new == sentinel_group.replica.port
        deadline = time.monotonic() + 15  # misses while the client backs off, then the promoted primary answers
        while cache.get("ctr", "a") != 0.25:
            assert time.monotonic() < deadline, "the client never reached the promoted primary"
            time.sleep(0.2)
        assert cache.get_or_compute("ctr", "live-key", lambda key: 0.75) == 0.75
        with redis.Redis(port=new) as promoted:  # the miss was stored on the new primary
            assert promoted.exists(schema.live("ctr", "live-key"))
        # The query logger's own connection finds the promoted primary too, but only after its backoff_s (1 s) when
        # its last attempt fell in the outage: a flush() within that sends nothing, so one flush is not enough.
        deadline = time.monotonic() + 15
        with redis.Redis(port=new) as promoted:
            while b"live-key" not in {fields[b"key"] for _, fields in logged_queries(promoted, schema)}:
                assert time.monotonic() < deadline, "the query logger never reached the promoted primary"
                cache.logger.flush()
                time.sleep(0.2)
        publish_version(publisher, "ctr", "v2", [("a", 0.125)], n_keys=1, schema=schema, replica_wait_s=0)
        assert cache.get("ctr", "a") in (0.25, 0.125)  # the pointer may be cached for pointer_ttl_s
    finally:
        cache.close()


def test_a_lookup_interrupted_mid_read_leaves_no_reply_for_the_next(sentinel_group: SentinelGroup, monkeypatch):
    """An exception raised while a lookup reads its reply (``KeyboardInterrupt``, a worker's timeout signal, a gevent
    ``Timeout``) must drop the connection, as redis-py's plain connections do: its Sentinel connections did not by
    default, so one went back to the pool with the reply unread, and the next lookup on it, sent before that reply
    came (a slow server), read it as its own: key ``b`` was served key ``a``'s value."""
    schema = KeySchema(f"s{uuid.uuid4().hex[:8]}")
    publisher = connect(sentinel_group.url, socket_timeout=5)
    publish_version(publisher, "ctr", "v1", [("a", 0.25), ("b", 0.5)], n_keys=2, schema=schema, replica_wait_s=0)
    cache = PredictionCache(  # the plain read-through: its lookup is one redis-py command, no lock or XFetch
        connect(sentinel_group.url, socket_timeout=5), schema=schema, xfetch_beta=0, recompute_lock_ms=0
    )
    assert cache.get_or_compute("ctr", "a", lambda key: 0.75) == 0.25  # connects, reads the pointer
    pool = cache.client.connection_pool
    connection = pool.get_connection()
    pool.release(connection)
    parser, read, calls = type(connection._parser), type(connection._parser).read_response, [0]

    def interrupted(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 1:
            raise KeyboardInterrupt
        return read(self, *args, **kwargs)

    os.kill(sentinel_group.primary.pid, signal.SIGSTOP)  # replies come 0.3 s late (the sentinel waits 0.5 s)
    resume = threading.Timer(0.3, os.kill, (sentinel_group.primary.pid, signal.SIGCONT))
    resume.start()
    try:
        monkeypatch.setattr(parser, "read_response", interrupted)
        with pytest.raises(KeyboardInterrupt):
            cache.get_or_compute("ctr", "a", lambda key: 0.75)
        monkeypatch.undo()
        assert cache.get_or_compute("ctr", "b", lambda key: 0.75) == 0.5
    finally:
        resume.join()
        os.kill(sentinel_group.primary.pid, signal.SIGCONT)
        cache.close()


def test_a_service_the_sentinel_does_not_monitor_is_named_in_the_error(sentinel_group: SentinelGroup):
    client = connect(sentinel_group.url.replace("/serving", "/servnig"), socket_timeout=2)
    with pytest.raises(redis.ConnectionError, match=r"monitors no 'servnig' \(it monitors \['serving'\]\)"):
        client.get("a")
    assert connect(sentinel_group.url, socket_timeout=2).ping()


def test_a_publisher_opened_before_a_failover_publishes_to_the_new_primary(sentinel_group: SentinelGroup):
    """The pool asks the sentinels only when it opens a connection: a publisher whose connections were open before
    a failover wrote its next version to the replaced primary while it still ran as one (a partition, or the seconds
    before the sentinels demote it: about 10 s after a SENTINEL FAILOVER here), where it was lost."""
    schema = KeySchema(f"s{uuid.uuid4().hex[:8]}")
    publisher = connect(sentinel_group.url, socket_timeout=5)
    publish_version(publisher, "ctr", "v1", [("a", 0.25)], n_keys=1, schema=schema)
    new = sentinel_group.replica.port
    with redis.Redis(port=new) as replica:  # the sentinels name the replica; the old primary runs on as a primary
        replica.replicaof("NO", "ONE")
    with redis.Redis(port=sentinel_group.sentinel.port) as sentinel:
        sentinel.execute_command("SENTINEL", "REMOVE", SERVICE)
        sentinel.execute_command("SENTINEL", "MONITOR", SERVICE, "127.0.0.1", new, 1)
    assert sentinel_group.primary_port() == new
    publish_version(publisher, "ctr", "v2", [("a", 0.5)], n_keys=1, schema=schema, replica_wait_s=0)
    with redis.Redis(port=new) as promoted:
        assert Pointer.decode(promoted.get(schema.pointer("ctr"))).version == "v2"


def test_a_failover_during_a_publish_fails_it(sentinel_group: SentinelGroup):
    """A publish whose primary the sentinels replace while it writes landed on the replaced one and returned as if
    published: it must fail, so that it is retried on the new primary."""
    schema = KeySchema(f"s{uuid.uuid4().hex[:8]}")
    publisher = connect(sentinel_group.url, socket_timeout=5)
    new = sentinel_group.replica.port

    def fail_over(_: int) -> None:  # between two pipelines of buckets
        if sentinel_group.primary_port() != new:
            with redis.Redis(port=new) as replica:
                replica.replicaof("NO", "ONE")
            with redis.Redis(port=sentinel_group.sentinel.port) as sentinel:
                sentinel.execute_command("SENTINEL", "REMOVE", SERVICE)
                sentinel.execute_command("SENTINEL", "MONITOR", SERVICE, "127.0.0.1", new, 1)

    items = [(f"ad{i}", i / 4096) for i in range(4000)]
    with pytest.raises(redis.ConnectionError, match="another primary"):
        publish_version(publisher, "ctr", "v1", items, n_keys=4000, schema=schema, progress=fail_over)
    assert sentinel_group.primary_port() == new  # the switch happened during the publish
    publish_version(publisher, "ctr", "v1", items, n_keys=4000, schema=schema, replica_wait_s=0)  # the retry
    with redis.Redis(port=new) as promoted:
        assert Pointer.decode(promoted.get(schema.pointer("ctr"))).version == "v1"


def test_a_sentinel_failover_while_replicas_are_waited_for_fails_the_wait_at_once(sentinel_group, session_dir):
    """The sentinels kill the demoted primary's connections, so a Sentinel client asks the promoted replica next: it
    answers as a primary, of another replication history, whose replicas never reach the old primary's offset. The
    wait ran out its whole timeout (30 s for a flip), then named the new primary "behind". It now fails at once."""
    from precompute_assets.serving.replication import ReplicaLostError, wait_for_replicas
    from precompute_assets_tests.factories import PROMPT_FULL_SYNC, wait_for_replica

    never = RedisServer(  # a second replica the sentinels never promote: stopped, it keeps the wait from ending
        session_dir / "servers" / uuid.uuid4().hex[:8], free_port(),
        extra_config=("appendonly no", PROMPT_FULL_SYNC, "replica-priority 0",
                      f"replicaof 127.0.0.1 {sentinel_group.primary.port}"),
    )  # fmt: skip
    never.start(timeout_s=30)
    try:
        wait_for_replica(redis.Redis(port=sentinel_group.primary.port), redis.Redis(port=never.port))
        client = connect(sentinel_group.url, socket_timeout=5)
        os.kill(never.pid, signal.SIGSTOP)
        client.set("written", "after the second replica stopped")

        def fail_over() -> None:
            with redis.Redis(port=sentinel_group.sentinel.port) as sentinel:
                sentinel.execute_command("SENTINEL", "FAILOVER", SERVICE)

        timer = threading.Timer(0.5, fail_over)
        timer.start()
        started = time.monotonic()
        with pytest.raises(ReplicaLostError, match="failover"):
            wait_for_replicas(client, 60)
        timer.join()
        assert time.monotonic() - started < 45  # not the whole wait
        client.close()
    finally:
        os.kill(never.pid, signal.SIGKILL)  # stopped (and its primary demoted): it would refuse SIGTERM for a minute


@pytest.mark.skipif(shutil.which("redis-benchmark") is None, reason="no redis-benchmark (apt-get install redis-tools)")
def test_bench_publish_reference_runs_on_the_sentinels_primary(sentinel_group: SentinelGroup):
    """``bench publish``'s redis-benchmark reference took a Sentinel URL's host:port for the server's: it benchmarked
    the sentinel, then cleaned up through 'redis+sentinel://.../9', service '9'."""
    from precompute_assets.tools.bench import BENCHMARK_DB, redis_benchmark_set

    assert redis_benchmark_set(sentinel_group.url, requests=2000, value_size=16) > 0
    with redis.Redis(port=sentinel_group.primary.port, db=BENCHMARK_DB) as primary:
        assert not list(primary.scan_iter("key:*"))  # its keys were there, and were cleaned up
        assert primary.info("commandstats")["cmdstat_set"]["calls"] >= 2000


def test_redis_acl_apply_sets_the_users_on_the_primary_and_its_replicas(sentinel_group: SentinelGroup, monkeypatch):
    from precompute_assets.tools.cli import main

    namespace = f"s{uuid.uuid4().hex[:8]}"
    monkeypatch.setattr(os, "environ", os.environ.copy())
    monkeypatch.setenv("PRECOMPUTE_REDIS_ADMIN_URL", sentinel_group.url)
    monkeypatch.setenv("PRECOMPUTE_REDIS_PUBLISHER_PASSWORD", "publisher-pw-0123456789")
    monkeypatch.setenv("PRECOMPUTE_REDIS_READER_PASSWORD", "reader-pw-0123456789")
    assert main(["redis", "acl", "--apply", "--namespace", namespace]) == 0
    for server in (sentinel_group.primary, sentinel_group.replica):  # ACL users are per server, not replicated
        with redis.Redis(port=server.port, decode_responses=True) as node:
            assert {f"{namespace}-publisher", f"{namespace}-reader"} <= set(node.acl_users()), server.port


@pytest.mark.skipif(tls_redis_server() is None, reason="no TLS-capable redis-server (apt-get install redis-server)")
def test_rediss_sentinel_url_speaks_tls_to_the_sentinel_and_the_primary(tmp_path, session_dir):
    key, cert = self_signed_certificate(tmp_path)
    tls = (f"tls-cert-file {cert}", f"tls-key-file {key}", f"tls-ca-cert-file {cert}", "tls-auth-clients no")
    primary_tls, sentinel_tls = free_port(), free_port()
    binary = tls_redis_server()
    base = session_dir / "servers"
    primary = RedisServer(
        base / uuid.uuid4().hex[:8], free_port(), binary=binary, extra_config=(f"tls-port {primary_tls}", *tls)
    )
    sentinel = SentinelServer(
        base / uuid.uuid4().hex[:8],
        free_port(),
        primary_tls,  # the sentinel watches the primary over TLS, and names its TLS port to clients
        binary=binary,
        extra_config=(f"tls-port {sentinel_tls}", "tls-replication yes", *tls),
    )
    try:
        primary.start(timeout_s=30)
        sentinel.start()
        url = f"rediss+sentinel://127.0.0.1:{sentinel_tls}/serving?ssl_cert_reqs=required&ssl_ca_certs={cert}"
        schema = KeySchema(f"s{uuid.uuid4().hex[:8]}")
        publish_version(connect(url, socket_timeout=5), "ctr", "v1", [("ad1", 0.25)], n_keys=1, schema=schema)
        cache = PredictionCache.from_url(url, namespace=schema.namespace, socket_timeout=5)
        try:
            assert cache.get("ctr", "ad1") == 0.25
        finally:
            cache.close()
        with pytest.raises(redis.ConnectionError):  # plain text to the sentinel's TLS port is refused
            connect(url.replace("rediss+", "redis+").split("?")[0], socket_timeout=2).ping()
    finally:
        sentinel.stop()
        primary.stop()


def test_redis_acl_apply_closes_the_replica_clients_it_made(monkeypatch):
    """``sentinel_servers`` makes a client per replica for ``apply_acl``; they were left open."""
    from precompute_assets.serving import acl

    class Server:
        def __init__(self) -> None:
            self.sent, self.closed = [], False

        def pipeline(self, transaction: bool) -> Server:
            return self

        def execute_command(self, *args) -> None:
            self.sent.append(args)

        def execute(self) -> list:
            return []

        def close(self) -> None:
            self.closed = True

    primary, replica = Server(), Server()
    monkeypatch.setattr(acl, "is_sentinel", lambda client: True)
    monkeypatch.setattr(acl, "sentinel_servers", lambda client: [client, replica])
    monkeypatch.setattr(acl, "unknown_commands", lambda server: set())
    acl.apply_acl(
        primary,
        "ns",
        publisher=("ns-publisher", "publisher-pw-0123456789"),
        reader=("ns-reader", "reader-pw-0123456789"),
    )
    assert primary.sent and replica.sent  # both servers got the users
    assert replica.closed and not primary.closed  # the caller's own client stays the caller's to close


@pytest.mark.parametrize("password", ["pa?s3cret", "pa#s3cret", "?s3cret"])
def test_a_question_mark_or_hash_in_the_password_is_never_shown_as_a_sentinel(password):
    """The authority ended at the password's '?' or '#': the error named the sentinel 'app:pa', the password's start."""
    url = f"redis+sentinel://app:{password}@s1:26379/m"
    with pytest.raises(ValueError, match="percent-encode") as refused:
        parse_sentinel_url(url)
    assert "pa" not in str(refused.value).replace("password", "") and "s3cret" not in str(refused.value)
    problem = url_problem("PRECOMPUTE_REDIS_URL", url)
    assert "percent-encode" in problem and "app:" not in problem, problem


@pytest.mark.parametrize(
    "url", ["redis+sentinel://app:s3c@r/x?etTAIL@s1:26379/m", "redis+sentinel://app:s3c@r?etTAIL@s1:26379/m"]
)
def test_an_at_sign_before_a_question_mark_in_the_password_is_refused_without_it(url):
    """The user info ended at the last '@' before the first '?': the password's rest became a sentinel 'r', a
    service 'x' and a parameter, and `up` said "unknown parameter(s) etTAIL@s1:26379/m" (or "path must be ...")."""
    with pytest.raises(ValueError, match="percent-encode") as refused:
        parse_sentinel_url(url)
    assert "etTAIL" not in str(refused.value), refused.value
    problem = url_problem("PRECOMPUTE_REDIS_URL", url)
    assert "percent-encode" in problem and "etTAIL" not in problem, problem


@pytest.mark.parametrize(
    "url, field, value",
    [
        ("redis+sentinel://s1:26379/m?sentinel_password=p@ss", "sentinel_password", "p@ss"),
        ("rediss+sentinel://s1:26379/m?ssl_keyfile=/k/s@p.pem", "tls", (("ssl_keyfile", "/k/s@p.pem"),)),
    ],
)
def test_an_at_sign_in_a_parameter_of_a_sentinel_url_without_user_info_is_read(url, field, value):
    """The check for a password's unencoded '?' (6b40a1e) refused any '@' after the query's '?' when the URL had no
    user info: a sentinel password or key file path holding one, which parsed before, stopped `up` and every run."""
    assert getattr(parse_sentinel_url(url), field) == value
    assert url_problem("PRECOMPUTE_REDIS_URL", url) is None


def test_a_plain_url_of_a_sentinel_is_refused_in_one_line_naming_the_sentinel_form(sentinel_group):
    """A Sentinel answers PING: `up` said reachable, and every publish failed on GET (h_ops)."""
    from precompute_assets.stack import ENV_REDIS, login_problem

    plain = f"redis://127.0.0.1:{sentinel_group.sentinel.port}/0"
    expected = "a Redis Sentinel, not a data server: use redis+sentinel://host:port/service_name"
    assert login_problem(ENV_REDIS, plain) == expected
    with pytest.raises(dg.Failure, match="is a Redis Sentinel, not a data server"):
        RedisResource(url=plain).client()
