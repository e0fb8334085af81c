"""Least-privilege ACL users against a real server (Valkey 8, Redis 7 ACL syntax): what the publisher and the
reader may do, proven with connections authenticated as each; and URLs printed without their secrets."""

from __future__ import annotations

import re
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from precompute_assets.defs.query_logs import stream_footprint, wait_for_hour_end
from precompute_assets.serving import KeySchema, PredictionCache, QueryLogger, connect, publish_version
from precompute_assets.serving.acl import (
    FORBIDDEN_COMMANDS,
    PUBLISHER_COMMANDS,
    READER_COMMANDS,
    acl_file_lines,
    acl_setuser_commands,
    apply_acl,
    check_rules,
    password_hash,
    publisher_rules,
    reader_rules,
)
from precompute_assets.serving.admission import FrequencySketch, Probation, SecondMiss
from precompute_assets.serving.events import (
    UserStatesSpan,
    read_user_states,
    read_user_states_span,
    write_user_states,
)
from precompute_assets.serving.keys import Pointer
from precompute_assets.serving.publish import (
    delete_live_values,
    flip_pointer,
    patch_version,
    write_live_values,
)
from precompute_assets.serving.querylog import read_stream_window
from precompute_assets.serving.refresh import published_keys, read_recent_hits
from precompute_assets.serving.replication import wait_for_replicas
from precompute_assets.serving.stats import window_stats
from precompute_assets.stack import RedisServer, StackError, free_port, redact, server_version, url_error
from precompute_assets_tests.factories import logged_queries

ADMIN_PASSWORD = "admin-pw-0123456789"
PUBLISHER_PASSWORD = "publisher-pw-0123456789"
READER_PASSWORD = "reader-pw-0123456789"


@pytest.fixture(scope="module")
def server(session_dir: Path) -> Iterator[RedisServer]:
    """One private server for this module (its default user needs a password); tests use their own namespace."""
    instance = RedisServer(session_dir / "servers" / f"acl-{uuid.uuid4().hex[:8]}", free_port(), ADMIN_PASSWORD)
    try:
        instance.start()
        yield instance
    finally:
        instance.stop()


@pytest.fixture
def admin(server: RedisServer) -> Iterator[redis.Redis]:
    client = connect(server.url, socket_timeout=5)
    yield client
    client.close()


def url_of(server: RedisServer, user: str, password: str) -> str:
    return f"redis://{user}:{password}@127.0.0.1:{server.port}/0"


@pytest.fixture
def users(server: RedisServer, admin: redis.Redis, schema: KeySchema) -> Iterator[dict[str, redis.Redis]]:
    """The publisher and reader of this test's namespace, and a client authenticated as each."""
    publisher, reader = f"{schema.namespace}-publisher", f"{schema.namespace}-reader"
    names = apply_acl(
        admin, schema.namespace, publisher=(publisher, PUBLISHER_PASSWORD), reader=(reader, READER_PASSWORD)
    )
    assert names == [publisher, reader]
    clients = {
        "publisher": connect(url_of(server, publisher, PUBLISHER_PASSWORD), socket_timeout=5),
        "reader": connect(url_of(server, reader, READER_PASSWORD), socket_timeout=5),
    }
    yield clients
    for client in clients.values():
        client.close()
    admin.execute_command("ACL", "DELUSER", publisher, reader)


def refused_by_acl(admin: redis.Redis, user: str, *command: str) -> None:
    """The server's ACL check (``ACL DRYRUN``) denies ``command`` to ``user``; for commands that are refused for
    other reasons first (``DEBUG`` is disabled by configuration) or would be harmful to really try."""
    assert admin.execute_command("ACL", "DRYRUN", user, *command) != b"OK", command


def refused(call) -> None:
    """``call`` is refused by the ACL (NOPERM, or an ACL failure inside a script), not by anything else."""
    with pytest.raises(redis.ResponseError, match="(?i)no permissions|ACL failure in script"):
        call()


# --- the rules themselves ----------------------------------------------------------------------------------


def test_the_exact_rules_of_namespace_pc() -> None:
    assert publisher_rules() == [
        "resetkeys", "~pc:1:*", "resetchannels", "-@all",
        "+ping", "+client|setinfo", "+cluster|slots", "+command", "+asking",
        "+get", "+set", "+del", "+exists", "+expire", "+expireat", "+hset", "+hdel",
        "+multi", "+exec", "+discard", "+watch", "+unwatch", "+incrby", "+xrange", "+xrevrange", "+xtrim", "+xdel",
        "+xlen", "+xinfo|stream", "+hget", "+hmget", "+hlen", "+ttl", "+pttl", "+type", "+eval", "+lrange", "+rpush",
        "+unlink",
        "+zrem", "+zadd", "+zscore", "+zrange", "+zcard", "+llen", "+hexists", "+info", "+memory|usage",
        "+time", "+sadd", "+smembers",
    ]  # fmt: skip
    assert reader_rules() == [
        "resetkeys", "%R~pc:1:*", "resetchannels", "-@all", "+ping", "+client|setinfo", "+cluster|slots", "+command",
        "+asking", "+get", "+hget", "+hmget", "+pttl", "clearselectors",
        "(~pc:1:*:live:* +set +unlink)",
        "(~pc:1:*:delta:* +set +unlink)",
        "(~pc:1:*:live:* ~pc:1:*:delta:* ~pc:1:*:epoch +eval)",
        "(~pc:1:*:lock:* +set +eval)",
        "(~pc:1:*:seen:* +set)",
        "(~pc:1:*:sketch ~pc:1:*:sketch:* +bitfield +eval +getrange +setrange)",
        "(~pc:1:*:fifo:* +eval +hexists +hincrby +hset +hdel +zscore +zadd +zrem +zcard +zpopmin +incr +llen +lpop"
        " +rpush)",
        "(%W~pc:1:qlog +xadd)",
        "(%W~pc:1:events +xadd)",
        "(~pc:1:stats:* +hincrby)",
    ]  # fmt: skip
    assert reader_rules(kinds=["ctr", "campaign"])[-10] == "(~pc:1:ctr:live:* ~pc:1:campaign:live:* +set +unlink)"
    commands = acl_setuser_commands("pc", publisher=("pub", PUBLISHER_PASSWORD), reader=("rd", READER_PASSWORD))
    assert commands[0][:6] == ["ACL", "SETUSER", "pub", "reset", "on", password_hash(PUBLISHER_PASSWORD)]
    assert commands[1][:6] == ["ACL", "SETUSER", "rd", "reset", "on", password_hash(READER_PASSWORD)]
    lines = acl_file_lines("pc", publisher=("pub", PUBLISHER_PASSWORD), reader=("rd", READER_PASSWORD))
    assert lines == [" ".join(["user", *command[2:]]) for command in commands]
    assert not any(PUBLISHER_PASSWORD in line or READER_PASSWORD in line for line in lines)  # hashes only
    assert not {c.split("|")[0] for c in PUBLISHER_COMMANDS + READER_COMMANDS} & (
        FORBIDDEN_COMMANDS - {"client", "cluster"}
    )


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"namespace": "p*"}, "invalid namespace"),
        ({"namespace": "a b"}, "invalid namespace"),
        ({"publisher": ("default", PUBLISHER_PASSWORD)}, "not 'default'"),
        ({"reader": ("rd", "short")}, "at least 16 characters"),
        ({"reader": ("pub", READER_PASSWORD)}, "two different users"),
        ({"kinds": ["Bad"]}, "invalid kind"),
        ({"kinds": "ctr"}, "non-empty list"),
    ],
)
def test_bad_arguments_are_refused(arguments: dict, message: str) -> None:
    options = {"namespace": "pc", "publisher": ("pub", PUBLISHER_PASSWORD), "reader": ("rd", READER_PASSWORD)}
    with pytest.raises(ValueError, match=message):
        acl_setuser_commands(**{**options, **arguments})


@pytest.mark.parametrize("rule", ["+@all", "+flushall", "+config|get", "+client|kill", "allkeys", "~*", "&*"])
def test_the_rule_checker_refuses_broad_grants(rule: str) -> None:
    with pytest.raises(ValueError):
        check_rules(["-@all", f"({rule})" if rule.startswith("+") else rule])


# --- the reader --------------------------------------------------------------------------------------------


def test_the_reader_serves_logs_and_admits_but_cannot_write_versions(
    server: RedisServer, admin: redis.Redis, users: dict[str, redis.Redis], schema: KeySchema
) -> None:
    publish_version(users["publisher"], "ctr", "v1", [("ad1", 0.5), ("ad2", 0.25)], n_keys=2, schema=schema)
    reader = users["reader"]
    logger = QueryLogger(connect(url_of(server, f"{schema.namespace}-reader", READER_PASSWORD), socket_timeout=5),
                         schema, flush_interval_s=3600)  # fmt: skip
    cache = PredictionCache(reader, schema=schema, logger=logger, pointer_ttl_s=0)
    assert cache.get("ctr", "ad1") == pytest.approx(0.5)
    assert cache.get_many("ctr", ["ad2", "nope", "ad1"]) == [pytest.approx(0.25), None, pytest.approx(0.5)]
    # Live read-through values, and both admission policies that write to Redis.
    assert cache.get_or_compute("ctr", "new", lambda key: 0.125) == 0.125
    assert cache.get("ctr", "new") == 0.125
    second = [cache.get_or_compute("ctr", "rare", lambda key: 0.5, admission=SecondMiss(60)) for _ in range(3)]
    assert second == [0.5, 0.5, 0.5] and cache.rejected == 1  # stored on its second miss, a hit the third time
    sketch = FrequencySketch(width=64, depth=2, threshold=2, sample_size=3)
    for key in ("h1", "h2", "h3"):  # the third miss fills the sample and ages the sketch (EVAL)
        assert cache.get_or_compute("ctr", key, lambda key: 0.75, admission=sketch) == 0.75
    assert cache.rejected == 4 and admin.exists(sketch.key(schema, "ctr"))  # its own shape's key: ctr:sketch:64x2
    assert int.from_bytes(admin.getrange(sketch.key(schema, "ctr"), 0, 3), "big") == 0  # aged: count zeroed
    for _ in range(2):  # aging halved h3's count to 0: two more lookups reach the threshold, and it is stored
        assert cache.get_or_compute("ctr", "h3", lambda key: 0.75, admission=sketch) == 0.75
    assert cache.rejected == 5 and admin.exists(schema.live("ctr", "h3"))
    probation = Probation(capacity=2)  # its scripts, and the UNLINK of the values they evict
    for key in ("p1", "p2", "p1", "p3"):  # p3's miss: p1 (hit in probation) moves to main, p2 leaves
        assert cache.get_or_compute("rank", key, lambda key: 1, admission=probation) == 1
    assert not admin.exists(schema.live("rank", "p2")) and admin.exists(schema.live("rank", "p3"))
    assert admin.zrange(schema.admission_fifo("rank", "main"), 0, -1) == [b"p1"]
    logger.flush()
    assert cache.errors == 0  # the client absorbs Redis errors: none happened
    assert logger.stats.flush_errors == 0 and logger.stats.written == logger.stats.logged == 18
    assert len(logged_queries(admin, schema)) == 18
    assert admin.hgetall(schema.stats("ctr")) == {b"hit": b"5", b"miss": b"9"}
    cache.close()

    bucket = schema.bucket("ctr", "v1", 0)
    refused(lambda: reader.hset(bucket, "ad1", b"\x00\x00\x00\x00"))
    refused(lambda: reader.set(bucket, b"x"))
    refused(lambda: reader.delete(bucket))
    refused(lambda: reader.expire(bucket, 1))
    refused(lambda: reader.set(schema.pointer("ctr"), b"evil:1"))
    refused(lambda: reader.set(schema.experiment("ctr"), b"{}"))
    refused(lambda: flip_pointer(reader, schema, "ctr", Pointer("evil", 1), grace_s=1))
    refused(lambda: publish_version(reader, "ctr", "v2", [("ad1", 0.9)], n_keys=1, schema=schema))
    refused(lambda: reader.set(schema.query_log(), b"x"))  # XADD only on the stream, not SET
    refused(lambda: reader.xrange(schema.query_log(), count=1))  # and it cannot read it back
    refused(lambda: reader.xtrim(schema.query_log(), maxlen=0))
    refused(lambda: reader.set(schema.stats("ctr"), b"x"))
    refused(lambda: reader.set(schema.query_log_trimmed(), b"9999999999999"))
    refused(lambda: reader.eval("return redis.call('SET', KEYS[1], 'evil:1')", 1, schema.pointer("ctr")))
    refused(lambda: reader.eval("return redis.call('DEL', KEYS[1])", 1, schema.admission_sketch("ctr")))
    refused(lambda: reader.eval("return redis.call('DEL', KEYS[1])", 1, schema.admission_fifo("ctr", "main")))
    refused(lambda: reader.unlink(schema.pointer("ctr")))  # UNLINK only on live values and their deltas
    admin.set("other:1:ctr:current", b"v1:1")
    refused(lambda: reader.get("other:1:ctr:current"))
    refused(lambda: reader.set("other:1:ctr:live:x", b"x"))
    refused(lambda: reader.xadd("other:1:qlog", {"a": "1"}))
    for command in (("CONFIG", "GET", "*"), ("FLUSHALL",), ("FLUSHDB",), ("KEYS", "*"), ("SCAN", "0"),
                    ("ACL", "LIST"), ("MODULE", "LIST"), ("SHUTDOWN", "NOSAVE"), ("CLIENT", "LIST"), ("SELECT", "1"),
                    ("SUBSCRIBE", "x")):  # fmt: skip
        refused(lambda command=command: reader.execute_command(*command))
    for command in (("DEBUG", "SLEEP", "0"), ("FUNCTION", "FLUSH"), ("SCRIPT", "FLUSH"), ("CLIENT", "KILL", "ID", "1"),
                    ("MIGRATE", "h", "1", "k", "0", "1"), ("XRANGE", schema.query_log(), "-", "+")):  # fmt: skip
        refused_by_acl(admin, f"{schema.namespace}-reader", *command)
    assert reader.get(schema.pointer("ctr")) == b"v1:1" and admin.get("other:1:ctr:current") == b"v1:1"


# --- the publisher -----------------------------------------------------------------------------------------


def test_the_publisher_publishes_flips_and_drains_but_nothing_outside_its_namespace(
    admin: redis.Redis, users: dict[str, redis.Redis], schema: KeySchema
) -> None:
    publisher = users["publisher"]
    assert wait_for_replicas(publisher, 1) == 0  # it may read INFO replication: a flip can wait for replicas
    publish_version(publisher, "ctr", "v1", [("ad1", 0.5)], n_keys=1, schema=schema)
    result = publish_version(publisher, "ctr", "v2", [("ad1", 0.75), ("ad2", 0.25)], n_keys=2, schema=schema)
    assert result.previous_version == "v1" and publisher.ttl(schema.bucket("ctr", "v1", 0)) <= 600
    patch_version(publisher, "ctr", Pointer("v2", result.buckets), [("ad3", 0.5)], ["ad2"], schema=schema)
    write_live_values(publisher, "ctr", [("ad9", 0.5)], expire_at=int(time.time()) + 60, schema=schema)
    assert delete_live_values(publisher, [("ctr", "ad9")], schema=schema) == 1
    reader = PredictionCache(users["reader"], schema=schema, pointer_ttl_s=0)
    assert reader.get_many("ctr", ["ad1", "ad2", "ad3"]) == [pytest.approx(0.75), None, pytest.approx(0.5)]
    assert reader.errors == 0
    # With a probation reader's live tier, a publish settles it: the dropped key is handed over as a live value.
    probation = PredictionCache(users["reader"], schema=schema, pointer_ttl_s=0, admission=Probation(capacity=4))
    assert probation.get_or_compute("ctr", "ad7", lambda key: 0.125) == pytest.approx(0.125)
    assert publish_version(publisher, "ctr", "v3", [("ad4", 0.5)], n_keys=1, schema=schema).handed_over == 0
    assert publish_version(publisher, "ctr", "v4", [("ad5", 0.5)], n_keys=1, schema=schema).handed_over == 1
    assert probation.get("ctr", "ad4") == pytest.approx(0.5) and probation.errors == 0

    # The query-log drain and cleanup: wait for the hour's end on Redis's clock (TIME: the drains of the query log
    # and of user events failed on it for every hour, h_ops), read a window, record the trimmed boundary, trim, delete.
    wait_for_hour_end(publisher, 0, "2026-12-06-10:00")
    stream = schema.query_log()
    for ms in (1000, 2000, 3000):
        users["reader"].xadd(stream, {"ts": str(ms), "kind": "ctr", "key": "ad1", "hit": "1", "lat_us": "5"}, id=ms)
    assert [len(page) for page in read_stream_window(publisher, schema, 0, 2500)] == [2]
    publisher.set(schema.query_log_trimmed(), 2000)
    assert publisher.xtrim(stream, minid="2000-0", approximate=False) == 1
    assert publisher.xdel(stream, "3000-0") == 1 and publisher.xlen(stream) == 1

    admin.set("other:1:ctr:current", b"v1:1")
    refused(lambda: publisher.get("other:1:ctr:current"))
    refused(lambda: publisher.set("other:1:ctr:current", b"evil:1"))
    refused(lambda: publisher.delete("other:1:ctr:current"))
    refused(lambda: publish_version(publisher, "ctr", "v1", [("ad1", 0.5)], n_keys=1, schema=KeySchema("other")))
    refused(lambda: publisher.set(f"{schema.namespace}:2:x", b"x"))  # another schema version
    refused(lambda: publisher.eval("return redis.call('GET', KEYS[1])", 1, "other:1:ctr:current"))
    refused(lambda: publisher.eval("return redis.call('GET', 'other:1:ctr:current')", 0))
    for command in (("FLUSHALL",), ("FLUSHDB",), ("CONFIG", "SET", "appendonly", "no"), ("KEYS", "*"),
                    ("SCAN", "0"), ("ACL", "SETUSER", "evil", "on", "nopass", "~*", "+@all"), ("ACL", "WHOAMI"),
                    ("MODULE", "LIST"), ("SHUTDOWN", "NOSAVE"), ("SWAPDB", "0", "1"),
                    ("RENAME", schema.pointer("ctr"), "other:x")):  # fmt: skip
        refused(lambda command=command: publisher.execute_command(*command))
    for command in (("DEBUG", "SLEEP", "0"), ("MONITOR",), ("FUNCTION", "FLUSH"), ("SCRIPT", "FLUSH"),
                    ("CLIENT", "KILL", "ID", "1"), ("REPLICAOF", "127.0.0.1", "1"), ("BGSAVE",)):  # fmt: skip
        refused_by_acl(admin, f"{schema.namespace}-publisher", *command)
    assert admin.get("other:1:ctr:current") == b"v1:1" and admin.acl_getuser("evil") is None


def test_the_publisher_reads_the_newest_queries_as_the_sensors_do(
    server: RedisServer, users: dict[str, redis.Redis], schema: KeySchema
) -> None:
    """cache_health (``window_stats``) and live_refresh_sensor (``read_recent_hits``) run as the publisher."""
    logger = QueryLogger(connect(url_of(server, f"{schema.namespace}-reader", READER_PASSWORD), socket_timeout=5),
                         schema, flush_interval_s=3600)  # fmt: skip
    reader = PredictionCache(users["reader"], schema=schema, logger=logger, pointer_ttl_s=0)
    assert reader.get_or_compute("ctr", "ad1", lambda key: 0.5) == pytest.approx(0.5)  # a miss, then a hit
    assert reader.get("ctr", "ad1") == pytest.approx(0.5)
    reader.logger.flush()
    publisher = users["publisher"]
    assert window_stats(publisher, schema, window_s=3600)["ctr"]["requests"] == 2
    hot, read = read_recent_hits(publisher, schema, ["ctr"], since_ms=0)
    assert read == 2 and dict(hot) == {("ctr", "ad1"): 1}
    assert published_keys(publisher, schema, [("ctr", "ad1")]) == set()  # the refresh's check of gone keys
    # the drains' footprint of their stream: MEMORY USAGE was refused, and the memory warning could never fire
    footprint = stream_footprint(publisher, schema.query_log())
    assert footprint["stream_entries"] == 1 and footprint["stream_bytes"] > 0 and "maxmemory_bytes" in footprint
    reader.close()


def test_the_publisher_keeps_and_reads_the_user_event_sensors_states(
    users: dict[str, redis.Redis], schema: KeySchema
) -> None:
    """user_event_sensor and the next_actions task run as the publisher: its HGETALL of a state was refused (NOPERM),
    so every tick started its users afresh, and every next_actions run failed."""
    publisher = users["publisher"]
    span = UserStatesSpan("1-0", "2-0")
    write_user_states(publisher, schema, {"u1": {"id": "2-0", "today": "3"}}, span=span)
    assert read_user_states(publisher, schema, ["u1", "u2"], (b"today",)) == {"u1": [b"3"]}
    assert read_user_states_span(publisher, schema) == span


def test_users_of_an_older_version_are_told_to_apply_the_rules_again(
    server: RedisServer, admin: redis.Redis, users: dict[str, redis.Redis], schema: KeySchema, caplog
) -> None:
    """Users made before XREVRANGE (publisher) and GETRANGE/SETRANGE on the sketch (reader) were granted: the sensors'
    read and the sketch's aging fail with NOPERM, whose message now says to run `precompute redis acl --apply`."""
    publisher, reader = f"{schema.namespace}-publisher", f"{schema.namespace}-reader"
    old_publisher = [rule for rule in publisher_rules(schema.namespace) if rule != "+xrevrange"]
    old_reader = [rule.replace("+getrange +setrange", "+set") for rule in reader_rules(schema.namespace)]
    assert old_reader != reader_rules(schema.namespace)  # the sketch's rule as it was
    admin.execute_command("ACL", "SETUSER", publisher, "reset", "on", f">{PUBLISHER_PASSWORD}", *old_publisher)
    admin.execute_command("ACL", "SETUSER", reader, "reset", "on", f">{READER_PASSWORD}", *old_reader)
    with pytest.raises(redis.exceptions.NoPermissionError, match=r"xrevrange.*run `precompute redis acl --apply`"):
        window_stats(users["publisher"], schema, window_s=3600)
    cache = PredictionCache(users["reader"], schema=schema, admission=FrequencySketch(width=64, depth=2, sample_size=4))
    with caplog.at_level("WARNING", logger="precompute_assets.serving.cache"):
        for i in range(8):
            assert cache.get_or_compute("score", f"k{i}", lambda key: 1.0) == 1.0  # served all the same
    assert cache.errors >= 1
    assert any("getrange" in r.message and "precompute redis acl --apply" in r.message for r in caplog.records)


def test_users_on_another_database_are_told_it_is_database_0_only(
    server: RedisServer, users: dict[str, redis.Redis], schema: KeySchema, monkeypatch, caplog
) -> None:
    """The users get no SELECT: on a URL naming database 3 every lookup failed, and the warning (and `status`/`up`'s
    refusal) said to apply the users again, which changed nothing. They now say the users work on database 0 only."""
    from precompute_assets.stack import ENV_REDIS, check_login

    reader = f"{schema.namespace}-reader"
    url = f"redis://{reader}:{READER_PASSWORD}@127.0.0.1:{server.port}/3"
    cache = PredictionCache.from_url(url, schema=schema, log_queries=False, log_events=False, socket_timeout=5)
    with caplog.at_level("WARNING", logger="precompute_assets.serving.cache"):
        assert cache.get("ctr", "ad1") is None
    assert cache.errors == 1 and "work on database 0 only" in caplog.text, caplog.text
    assert "acl --apply" not in caplog.text
    cache.close()
    with pytest.raises(StackError, match="refuses us: .*select.*work on database 0 only"):
        check_login(ENV_REDIS, url)
    publisher = connect(f"redis://{schema.namespace}-publisher:{PUBLISHER_PASSWORD}@127.0.0.1:{server.port}/3")
    with pytest.raises(redis.exceptions.NoPermissionError, match="select.*work on database 0 only") as refused:
        window_stats(publisher, schema, window_s=3600)  # as `cache stats` and the sensors read the newest queries
    assert "acl --apply" not in str(refused.value)
    publisher.close()


def test_a_publisher_without_the_invalidation_record_still_invalidates_and_checks(
    admin: redis.Redis, users: dict[str, redis.Redis], schema: KeySchema, caplog
) -> None:
    """A publisher made before the invalidation record (no SADD, SMEMBERS) still invalidates, and the health check of
    a version with a missing bucket still counts it (SMEMBERS refused would have failed the check), with warnings."""
    from precompute_assets.serving.invalidate import invalidate
    from precompute_assets.serving.publish import missing_buckets

    publisher = f"{schema.namespace}-publisher"
    old_rules = [rule for rule in publisher_rules(schema.namespace) if rule not in {"+sadd", "+smembers"}]
    admin.execute_command("ACL", "SETUSER", publisher, "reset", "on", f">{PUBLISHER_PASSWORD}", *old_rules)
    client = users["publisher"]
    publish_version(client, "ctr", "v1", [("a", 0.5), ("b", 0.5)], n_keys=2, schema=schema)
    with caplog.at_level("WARNING", logger="precompute_assets.serving.invalidate"):
        assert invalidate(client, "ctr", key="a", schema=schema).fields == 1
        admin.delete(schema.bucket("ctr", "v1", 0))  # evicted
        assert missing_buckets(client, schema, "ctr", Pointer("v1", 1)) == 1
    assert sum("precompute redis acl --apply" in r.message for r in caplog.records) >= 2


def test_a_publisher_of_an_older_version_is_told_why_the_tier_was_not_settled(
    admin: redis.Redis, users: dict[str, redis.Redis], schema: KeySchema
) -> None:
    """A publisher made before probation's settling was granted (no EVAL, ZADD ...): the publish succeeds, and its
    ``settle_error`` says to apply the users again rather than only NOPERM."""
    settling = {"+eval", "+lrange", "+rpush", "+unlink", "+zrem", "+zadd", "+zscore", "+zrange", "+zcard", "+llen"}
    old_rules = [rule for rule in publisher_rules(schema.namespace) if rule not in settling | {"+hexists"}]
    publisher = f"{schema.namespace}-publisher"
    admin.execute_command("ACL", "SETUSER", publisher, "reset", "on", f">{PUBLISHER_PASSWORD}", *old_rules)
    probation = PredictionCache(users["reader"], schema=schema, pointer_ttl_s=0, admission=Probation(capacity=4))
    assert probation.get_or_compute("ctr", "ad7", lambda key: 0.125) == pytest.approx(0.125)  # a tracked live key
    publish_version(users["publisher"], "ctr", "v1", [("ad1", 0.5)], n_keys=1, schema=schema)
    result = publish_version(users["publisher"], "ctr", "v2", [("ad2", 0.5)], n_keys=1, schema=schema)
    assert result.previous_version == "v1"  # published all the same
    assert "no permissions" in result.settle_error and "run `precompute redis acl --apply`" in result.settle_error


def test_a_publisher_of_an_older_version_still_invalidates_without_the_epoch(
    admin: redis.Redis, users: dict[str, redis.Redis], schema: KeySchema, caplog
) -> None:
    """A publisher made before the invalidation epoch was granted (no INCRBY): `cache invalidate` and a campaign's
    cleanup still delete, unfenced, and say to apply the users again, rather than fail on the fence."""
    from precompute_assets.serving.invalidate import invalidate

    old_rules = [rule for rule in publisher_rules(schema.namespace) if rule != "+incrby"]
    assert old_rules != publisher_rules(schema.namespace)
    publisher = f"{schema.namespace}-publisher"
    admin.execute_command("ACL", "SETUSER", publisher, "reset", "on", f">{PUBLISHER_PASSWORD}", *old_rules)
    write_live_values(users["publisher"], "ctr", [("a1", 0.5), ("a2", 0.25)], expire_at=None, schema=schema)
    with caplog.at_level("WARNING", logger="precompute_assets.serving.invalidate"):
        assert invalidate(users["publisher"], "ctr", key="a1", schema=schema).live_keys == 1
        assert delete_live_values(users["publisher"], [("ctr", "a2")], schema=schema) == 1
    assert admin.exists(schema.live("ctr", "a1"), schema.live("ctr", "a2")) == 0
    assert admin.get(schema.epoch("ctr")) is None  # never incremented: refused
    assert any("precompute redis acl --apply" in record.message for record in caplog.records)


def test_applying_again_converges_and_replaces_the_password(
    server: RedisServer, admin: redis.Redis, users: dict[str, redis.Redis], schema: KeySchema
) -> None:
    publisher, reader = f"{schema.namespace}-publisher", f"{schema.namespace}-reader"
    apply_acl(admin, schema.namespace, publisher=(publisher, "a-new-publisher-pw!"), reader=(reader, READER_PASSWORD))
    with pytest.raises(redis.AuthenticationError):
        connect(url_of(server, publisher, PUBLISHER_PASSWORD), socket_timeout=5).ping()
    assert connect(url_of(server, publisher, "a-new-publisher-pw!"), socket_timeout=5).ping()
    assert admin.acl_getuser(reader) is not None
    assert admin.execute_command("ACL", "DRYRUN", reader, "SET", schema.live("ctr", "k"), "x") == b"OK"
    assert admin.execute_command("ACL", "DRYRUN", reader, "SET", schema.pointer("ctr"), "x") != b"OK"


def test_an_acl_file_of_these_lines_is_loaded_by_the_server(session_dir: Path, schema: KeySchema) -> None:
    folder = session_dir / "servers" / f"aclfile-{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True)
    users = {"publisher": ("pub", PUBLISHER_PASSWORD), "reader": ("rd", READER_PASSWORD)}
    lines = [f"user default on {password_hash(ADMIN_PASSWORD)} ~* &* +@all",
             *acl_file_lines(schema.namespace, **users)]  # fmt: skip
    (folder / "users.acl").write_text("\n".join(lines) + "\n")
    server = RedisServer(folder, free_port(), ADMIN_PASSWORD, extra_config=(f"aclfile {folder / 'users.acl'}",))
    server.config = lambda version, config=server.config: [  # requirepass and aclfile do not mix
        line for line in config(version) if not line.startswith("requirepass")
    ]
    try:
        server.start(timeout_s=30)
        reader = connect(url_of(server, "rd", READER_PASSWORD), socket_timeout=5)
        publisher = connect(url_of(server, "pub", PUBLISHER_PASSWORD), socket_timeout=5)
        publish_version(publisher, "ctr", "v1", [("ad1", 0.5)], n_keys=1, schema=schema)
        assert PredictionCache(reader, schema=schema).get("ctr", "ad1") == pytest.approx(0.5)
        refused(lambda: reader.set(schema.pointer("ctr"), b"evil:1"))
        refused(lambda: publisher.execute_command("FLUSHALL"))
        reader.close()
        publisher.close()
    finally:
        server.stop()


def redis_7_0() -> str | None:
    """A redis-server binary of Redis 7.0 or 7.1 (Debian 12's), which has no CLIENT SETINFO; None when there is none."""
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    name, version = server_version(binary)
    return binary if name == "redis" and (7, 0) <= version < (7, 2) else None


@pytest.mark.skipif(redis_7_0() is None, reason="no Redis 7.0 redis-server (Debian 12: apt-get install redis-server)")
def test_users_are_applied_on_redis_7_0_which_has_no_client_setinfo(session_dir: Path, schema: KeySchema) -> None:
    """Redis 7.0 refused the whole ACL SETUSER ("Unknown command or category name in ACL": +client|setinfo), so
    `precompute redis acl --apply` failed on a Debian 12 server; its ACL file lines are written for it with
    ``unknown=OPTIONAL_COMMANDS``."""
    from precompute_assets.serving.acl import OPTIONAL_COMMANDS, unknown_commands

    folder = session_dir / "servers" / f"acl70-{uuid.uuid4().hex[:8]}"
    server = RedisServer(folder, free_port(), ADMIN_PASSWORD, binary=redis_7_0())
    try:
        server.start(timeout_s=30)
        admin = connect(server.url, socket_timeout=5)
        assert unknown_commands(admin) == {"client|setinfo"}
        publisher, reader = f"{schema.namespace}-publisher", f"{schema.namespace}-reader"
        apply_acl(admin, schema.namespace, publisher=(publisher, PUBLISHER_PASSWORD), reader=(reader, READER_PASSWORD))
        writer = connect(url_of(server, publisher, PUBLISHER_PASSWORD), socket_timeout=5)
        publish_version(writer, "ctr", "v1", [("ad1", 0.5)], n_keys=1, schema=schema)
        serving = connect(url_of(server, reader, READER_PASSWORD), socket_timeout=5)
        assert PredictionCache(serving, schema=schema).get("ctr", "ad1") == pytest.approx(0.5)
        refused(lambda: serving.set(schema.pointer("ctr"), b"evil:1"))
        lines = acl_file_lines(
            schema.namespace, publisher=("pub", PUBLISHER_PASSWORD), reader=("rd", READER_PASSWORD),
            unknown=OPTIONAL_COMMANDS,
        )  # fmt: skip
        for line in lines:  # what an aclfile line of Redis 7.0 must be: the server takes it as ACL SETUSER
            assert admin.execute_command("ACL", "SETUSER", *re.findall(r"\([^)]*\)|\S+", line)[1:]) == b"OK"
        for client in (writer, serving, admin):
            client.close()
    finally:
        server.stop()


# --- secrets are never printed -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://publisher:s3cret@127.0.0.1:6379/0", "redis://publisher:***@127.0.0.1:6379/0"),
        ("redis://:s3cret@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("rediss://reader:s3cret@cache.example:6380/0?ssl_cert_reqs=required",
         "rediss://reader:***@cache.example:6380/0?ssl_cert_reqs=required"),
        ("postgresql://user:pw@db.example:5432/app", "postgresql://user:***@db.example:5432/app"),
        ("postgresql://user:p%40ss:w/rd@db.example/app", "postgresql://user:***@db.example/app"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ],
)  # fmt: skip
def test_redact_hides_the_password(url: str, shown: str) -> None:
    assert redact(url) == shown
    assert "s3cret" not in redact(url) and ":pw@" not in redact(url)


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0?password=s3cret",  # redis-py reads a password from the query string
        "redis://user:s3@cret@127.0.0.1:6379/0",  # an unencoded '@' in the password
        "postgresql://db.example/app?user=u&password=s3cret",
        "rediss://cache.example:6380/0?ssl_keyfile=/k.pem&ssl_password=s3cret",  # redis-py: the key file's passphrase
        "host=db.example password=s3cret dbname=app",  # a libpq key=value string
        "postgresql+psycopg2//user:s3cret@db.example/app",  # a mistyped '://': an error about the scheme shows it
        "redis:/user:s3cret@127.0.0.1:6379/0",
        "user:s3cret@127.0.0.1:6379",  # no scheme at all
    ],
)
def test_redact_hides_passwords_given_in_other_forms(url: str) -> None:
    assert "s3cret" not in redact(url) and "cret@" not in redact(url)


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0?password=s3c@retTAIL",
        "redis+sentinel://s1:26379/m?sentinel_password=s3c@retTAIL",  # parse_sentinel_url reads it
        "rediss://cache.example:6380/0?ssl_password=s3c@retTAIL",
        "postgresql://db.example:5432/app?user=u&password=s3c@retTAIL",
        "redis://127.0.0.1:6379/0?client_name=a@b&password=s3c@retTAIL",
    ],
)
def test_a_password_parameter_with_an_at_sign_is_hidden_whole(url: str) -> None:
    """The rule for a '?' in a user info password (198b65c) took such a URL's port for a password and cut at the '@':
    'redis://127.0.0.1:***@retTAIL' showed the rest of the password, which the password= rule then no longer found."""
    assert "s3c" not in redact(url) and "retTAIL" not in redact(url), redact(url)
    assert "password=***" in redact(url), redact(url)


@pytest.mark.parametrize(
    "url",
    [
        "redis://app:s3c@r?etTAIL@127.0.0.1:6379/0",  # an '@' and then a '?' in the password
        "rediss://:s3c@r#etTAIL@cache.example:6380/0",
        "redis+sentinel://app:s3c?retTAIL@s1:26379/m?sentinel_password=p@ss",  # a '?' and a password= parameter
        "rediss://:s3c#retTAIL@cache.example:6380/0?ssl_password=key",
    ],
)
def test_a_password_with_an_at_sign_or_a_password_parameter_beside_its_question_mark_is_hidden(url: str) -> None:
    """redact's rules for a password's '@' (to the last '@' before the '?') and for its '?' (never across a
    password= parameter) each stopped short: 'redis://app:***@r?etTAIL@...' and the Sentinel URL whole but its
    sentinel_password were shown by `up`, `status` and every Dagster failure naming the URL."""
    assert "s3c" not in redact(url) and "etTAIL" not in redact(url), redact(url)
    if "sentinel" in url:  # the line `up` and `status` print for it
        problem = url_error("PRECOMPUTE_REDIS_URL", url)
        assert "percent-encode" in problem and "etTAIL" not in problem, problem


@pytest.mark.parametrize("url", ["redis://app:s3cr/et@cache.example:6379/0", "rediss://:s3cr?et@cache.example/0"])
def test_a_password_that_cuts_the_url_short_is_never_shown_in_its_error(url: str, monkeypatch, capsys) -> None:
    """An unencoded '/' or '?' in a password ends the authority there, and what followed its ':' was read as the
    port: the error, 'Port could not be cast to integer value as 's3cr'', showed the start of the password."""
    from precompute_assets.stack import reachable
    from precompute_assets.tools.cli import main

    for attempt in (lambda: connect(url), lambda: reachable(url)):
        with pytest.raises(ValueError, match="percent-encode") as raised:
            attempt()
        assert "s3" not in str(raised.value), raised.value
    monkeypatch.setenv("PRECOMPUTE_REDIS_URL", url)
    assert main(["cache", "stats"]) == 2
    assert "s3" not in capsys.readouterr().err


def test_cli_prints_acl_lines_with_hashes_only_and_refuses_a_missing_password(monkeypatch, capsys):
    from precompute_assets.tools.cli import main

    monkeypatch.setenv("PRECOMPUTE_REDIS_PUBLISHER_PASSWORD", "publisher-password-1234")
    monkeypatch.delenv("PRECOMPUTE_REDIS_READER_PASSWORD", raising=False)
    assert main(["redis", "acl", "--namespace", "pc"]) == 2
    err = capsys.readouterr().err
    assert "set PRECOMPUTE_REDIS_READER_PASSWORD" in err and err.count("\n") == 1
    monkeypatch.setenv("PRECOMPUTE_REDIS_READER_PASSWORD", "reader-password-12345")
    assert main(["redis", "acl", "--namespace", "pc"]) == 0
    out = capsys.readouterr().out
    lines = out.strip().split("\n")
    assert [line.split()[1] for line in lines] == ["pc-publisher", "pc-reader"]
    assert "password-1234" not in out and "password-12345" not in out and "#" in out


@pytest.mark.parametrize("kinds", ["", ","])
def test_cli_refuses_a_kinds_option_that_names_no_kind(monkeypatch, capsys, kinds):
    """`--kinds ""` (an empty shell variable) printed a reader that may write live values of every kind, the widest
    rule, where the option is there to narrow it; `--kinds ,` failed with the Python API's wording (None)."""
    from precompute_assets.tools.cli import main

    monkeypatch.setenv("PRECOMPUTE_REDIS_PUBLISHER_PASSWORD", "publisher-password-1234")
    monkeypatch.setenv("PRECOMPUTE_REDIS_READER_PASSWORD", "reader-password-12345")
    assert main(["redis", "acl", "--kinds", kinds]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        "precompute redis: --kinds names no kind: give KIND[,KIND...], or leave the option out for every kind\n"
    )


def test_the_readers_fenced_store_and_lock_release_and_the_publishers_epoch_are_granted(
    admin: redis.Redis, users: dict[str, redis.Redis], schema: KeySchema
) -> None:
    """Each is allowed by the rules, not skipped: a refused ``INCRBY`` (publisher), store script or lock release
    (reader) only logs a warning and goes on unfenced, so the tests above, which count errors, passed without them."""
    from precompute_assets.serving.cache import recompute_lock_key
    from precompute_assets.serving.invalidate import invalidate

    publisher = users["publisher"]
    write_live_values(publisher, "ctr", [("a1", 0.5)], expire_at=None, schema=schema)
    assert delete_live_values(publisher, [("ctr", "a1")], schema=schema) == 1
    assert invalidate(publisher, "ctr", key="a2", schema=schema).live_keys == 0
    assert admin.get(schema.epoch("ctr")) == b"2"  # incremented by both, as the publisher
    cache = PredictionCache(users["reader"], schema=schema, pointer_ttl_s=0, recompute_lock_ms=60_000)
    assert cache.get_or_compute("ctr", "k1", lambda key: 0.5) == 0.5
    assert admin.get(recompute_lock_key(schema, "ctr", "k1")) in (None, b"0")  # released by its owner, not held 60 s

    def invalidated_meanwhile(key: str) -> float:
        invalidate(publisher, "ctr", key=key, schema=schema)
        return 0.25

    assert cache.get_or_compute("ctr", "k2", invalidated_meanwhile) == 0.25
    assert admin.exists(schema.live("ctr", "k2")) == 0 and cache.invalidated == 1  # the store script compared
    assert admin.get(recompute_lock_key(schema, "ctr", "k2")) in (None, b"0")
    assert cache.refused == 0 and cache.errors == 0 and admin.get(schema.epoch("ctr")) == b"3"
    cache.close()


def test_users_applied_on_the_embedded_server_survive_its_restart(tmp_path: Path, monkeypatch, capsys) -> None:
    """`redis acl --apply` on the home's own server set the users until its next start: `down` and `up` lost them,
    and every service logging in as the reader failed. They are kept in the home, replaced when applied again."""
    from precompute_assets.stack import Stack
    from precompute_assets.tools.cli import main

    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PRECOMPUTE_REDIS_URL", raising=False)
    monkeypatch.delenv("PRECOMPUTE_REDIS_ADMIN_URL", raising=False)
    monkeypatch.setenv("PRECOMPUTE_REDIS_PUBLISHER_PASSWORD", PUBLISHER_PASSWORD)
    stack = Stack()
    stack.up(postgres=False)
    try:
        for reader_password in ("first-reader-pw-0123456789", READER_PASSWORD):
            monkeypatch.setenv("PRECOMPUTE_REDIS_READER_PASSWORD", reader_password)
            assert main(["redis", "acl", "--apply", "--namespace", "kept"]) == 0
        assert f"kept in {stack.redis.users_file} for its restarts" in capsys.readouterr().out
        assert main(["redis", "acl", "--apply", "--namespace", "other"]) == 0
        assert [line.split()[1] for line in stack.redis.kept_users()] == [
            "kept-publisher",
            "kept-reader",
            "other-publisher",
            "other-reader",
        ]
        assert READER_PASSWORD not in stack.redis.users_file.read_text()  # hashes only
        assert stack.redis.users_file.stat().st_mode & 0o777 == 0o600
        stack.down()
        stack = Stack()
        stack.up(postgres=False)
        port = stack.redis.port
        reader = redis.Redis(port=port, username="kept-reader", password=READER_PASSWORD, socket_timeout=5)
        try:
            assert reader.ping()
            with pytest.raises(redis.exceptions.NoPermissionError):
                reader.flushall()
        finally:
            reader.close()
        stale = redis.Redis(port=port, username="kept-reader", password="first-reader-pw-0123456789")
        with pytest.raises(redis.AuthenticationError):
            stale.ping()
        stale.close()
    finally:
        stack.down()


def test_applying_refuses_the_admin_user_it_runs_as_and_a_shared_password(
    server: RedisServer, admin: redis.Redis, schema: KeySchema
) -> None:
    """``--publisher-user`` naming the operator's own admin user reset it first, then the next SETUSER was refused:
    ACL changes are not rolled back, and the admin was locked out; the same password for both users gave every reader
    service the publisher's (h_secrets). Both are refused before anything is written."""
    ops, password = f"{schema.namespace}-ops", "an-admin-password-1234"
    admin.execute_command("ACL", "SETUSER", ops, "reset", "on", f">{password}", "~*", "&*", "+@all")
    operator = connect(url_of(server, ops, password), socket_timeout=5)
    reader = f"{schema.namespace}-reader"
    with pytest.raises(ValueError, match=f"the publisher user '{ops}' is the user this connection runs as"):
        apply_acl(operator, schema.namespace, publisher=(ops, PUBLISHER_PASSWORD), reader=(reader, READER_PASSWORD))
    assert operator.config_get("maxmemory") and admin.acl_getuser(reader) is None  # still admin; nothing applied
    with pytest.raises(ValueError, match="must have different passwords"):
        apply_acl(admin, schema.namespace, publisher=("p-user", READER_PASSWORD), reader=(reader, READER_PASSWORD))
    assert admin.acl_getuser("p-user") is None
    operator.close()
