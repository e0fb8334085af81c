"""User events through the serving client: non-blocking, capped, validated, and counted when Redis is down."""

from __future__ import annotations

import contextlib
import time

import redis

from precompute_assets.serving import connect
from precompute_assets.serving.events import (
    ACTIONS,
    EventLogger,
    UserStatesSpan,
    events_stream,
    read_event_window,
    read_events_after,
    server_mark,
    unknown_action,
    validate_event,
)
from precompute_assets.stack import free_port
from precompute_assets_tests.factories import log_client

T0 = 1_790_000_000_000


def test_record_event_lands_in_the_event_stream(redis_url, redis_client, schema):
    logger = EventLogger(log_client(redis_url), schema)
    logger.record_event("u1", "login", tenant="acme")
    logger.record_event("u1", "creative_upload", entity="cr-1", tenant="acme")
    logger.record_event("u2", "dashboard_view")
    logger.close()
    stream = events_stream(schema)
    assert stream == f"{schema.prefix}:events"
    entries = redis_client.xrange(stream)
    assert [(f[b"user"], f[b"action"], f.get(b"entity"), f.get(b"tenant")) for _, f in entries] == [
        (b"u1", b"login", None, b"acme"),
        (b"u1", b"creative_upload", b"cr-1", b"acme"),
        (b"u2", b"dashboard_view", None, None),
    ]
    rows = [validate_event(i, f)[0] for i, f in entries]
    assert [r["action"] for r in rows] == ["login", "creative_upload", "dashboard_view"]
    assert logger.stats.written == 3 and logger.stats.dropped == 0
    assert not redis_client.exists(schema.query_log())  # the query log is untouched


def test_an_event_without_a_user_or_action_is_quarantined_not_recorded_as_none(redis_url, redis_client, schema):
    """record_event(None, ...) (a request without a logged-in user) was recorded as user 'None': one user the
    predictive precompute then warmed next actions for, sharing every anonymous session's history."""
    logger = EventLogger(log_client(redis_url), schema)
    logger.record_event(None, "login")
    logger.record_event("u1", None)
    logger.close()
    entries = redis_client.xrange(events_stream(schema))
    assert [validate_event(i, f) for i, f in entries] == [(None, "empty user"), (None, "empty action")]
    assert logger.stats.written == 2  # kept in the stream, for the drain's quarantine and its counts


class NoText:
    def __str__(self) -> str:
        raise RuntimeError("no text")


def test_a_field_without_text_is_dropped_and_counted_never_raised_nor_holding_the_buffer(
    redis_url, redis_client, schema
):
    """record_event raised the field's error into the caller, after taking a slot of the buffer that nothing freed:
    after max_buffer such calls every later event was dropped as "buffer full"."""
    logger = EventLogger(log_client(redis_url), schema, max_buffer=3)
    for _ in range(3):
        logger.record_event(NoText(), "login")
        logger.record_event("u1", "creative_upload", entity=NoText())
    for user in ("u1", "u2", "u3"):
        logger.record_event(user, "login")
    logger.close()
    assert logger.stats.dropped_invalid == 6 and logger.stats.dropped == 6
    assert logger.stats.logged == 9 and logger.stats.written == 3
    assert [f[b"user"] for _, f in redis_client.xrange(events_stream(schema))] == [b"u1", b"u2", b"u3"]


def test_bytes_are_recorded_as_their_text(redis_url, redis_client, schema):
    """A user id read from Redis is bytes: str() recorded it as "b'u1'", a user no one else had."""
    logger = EventLogger(log_client(redis_url), schema)
    logger.record_event(b"u1", b"creative_upload", entity=bytearray(b"cr-1"), tenant=b"acme")
    logger.record_event(b"u1", b"creative_upload", tenant=b"\xffacme")  # no UTF-8: kept as it came, for the quarantine
    logger.close()
    (good, bad) = redis_client.xrange(events_stream(schema))
    row, reason = validate_event(*good)
    assert reason is None and (row["user"], row["action"], good[1][b"entity"]) == ("u1", "creative_upload", b"cr-1")
    assert validate_event(*bad) == (None, "tenant is not valid UTF-8")
    assert bad[1][b"tenant"] == b"\xffacme"  # as it came: was b"\xed\xb3\xbfacme", the surrogate's own UTF-8


def test_a_user_entity_or_tenant_no_cache_key_can_name_is_quarantined():
    """A user holding a brace got a state and a sensor's request, but its next actions could never be stored (a
    brace picks a key's Redis Cluster slot: no cache key may hold one), nor read: cache.get raised (h_user2). An
    entity or tenant with one was stored as valid, and the sensor dropped its task with a count in a log line only
    (h_events). Written empty, they are none, as when left out."""
    fields = {b"ts": b"1764000000000", b"user": b"{u1}", b"action": b"login"}
    for name in (b"user", b"entity", b"tenant"):
        assert validate_event(b"1764000000000-0", {**fields, b"user": b"u1", name: b"cr{1}"}) == (
            None,
            f"{name.decode()} has a brace ('{{' or '}}'): no cache key can name it",
        )
    row, reason = validate_event(b"1764000000000-0", {**fields, b"user": b"u1", b"entity": b"", b"tenant": b""})
    assert reason is None and (row["user"], row["entity"], row["tenant"]) == ("u1", None, None)


def test_a_huge_user_or_entity_is_recorded_cut_short_and_still_quarantined(redis_url, redis_client, schema):
    """A service that records a request body as the entity (or the user): the query logger cuts such text to
    LOGGED_TEXT_CHARS, the event logger kept it whole in the buffer and in the stream, which Redis never evicts."""
    from collections import Counter

    logger = EventLogger(log_client(redis_url), schema)
    body = "x" * 1_000_000
    for i in range(10):
        logger.record_event("u1", "creative_upload", entity=body + str(i), tenant="acme")
        logger.record_event(body, "login", tenant=body)
        logger.record_event("u2", body)
    logger.close()
    assert logger.stats.written == 30
    assert redis_client.memory_usage(events_stream(schema)) < 1_000_000
    entries = redis_client.xrange(events_stream(schema))
    assert Counter(validate_event(i, f)[1] for i, f in entries) == {
        "entity longer than 256 characters": 10,
        "user longer than 256 characters": 10,
        "action longer than 256 characters": 10,
    }


def test_the_stream_is_capped_with_approximate_maxlen(redis_url, redis_client, schema):
    logger = EventLogger(log_client(redis_url), schema, stream_maxlen=200, batch_size=500)
    for i in range(3000):
        logger.record_event(f"u{i}", "login")
    logger.close()
    assert logger.stats.written == 3000
    assert redis_client.xlen(events_stream(schema)) < 1000  # MAXLEN ~ trims whole nodes: near 200, never 3000


def test_simulated_clock_ids_follow_event_times_and_windows_read_exactly(redis_url, redis_client, schema):
    now = [T0]
    logger = EventLogger(log_client(redis_url), schema, clock=lambda: now[0])
    for i in range(2500):
        now[0] = T0 + i * 1000  # 2,500 seconds
        logger.record_event(f"u{i % 7}", ACTIONS[i % len(ACTIONS)])
    logger.close()
    window = [e for page in read_event_window(redis_client, schema, T0, T0 + 1_000_000, page=300) for e in page]
    assert len(window) == 1000 and window[0][0] == f"{T0}-0".encode()
    after = read_events_after(redis_client, schema, f"{T0 + 999_000}-0", limit=10_000, page=700)
    assert len(after) == 1500 and after[0][0] == f"{T0 + 1_000_000}-0".encode()
    assert len(read_events_after(redis_client, schema, "0-0", limit=1234, page=500)) == 1234


def test_redis_down_during_a_burst_drops_and_counts_but_never_blocks():
    client = connect(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=0.2)
    logger = EventLogger(client, max_buffer=5000, batch_size=500, backoff_s=0.05)
    started = time.perf_counter()
    for i in range(20_000):
        logger.record_event(f"u{i}", "login", tenant="t")
    recorded_in = time.perf_counter() - started
    logger.close()
    stats = logger.stats
    assert stats.written == 0 and stats.logged == 20_000
    assert stats.dropped + stats.unconfirmed == 20_000  # every event is accounted for: buffer full or write failed
    assert stats.dropped_write_failed + stats.unconfirmed > 0 and stats.flush_errors > 0
    # never blocked on the dead server: 20,000 calls take far less than one connect timeout each
    assert recorded_in < 2.0


def test_a_failing_redis_recovers_after_the_backoff(redis_server, schema):
    server = redis_server()
    logger = EventLogger(connect(server.url, socket_timeout=0.5), schema, backoff_s=0.05)
    logger.record_event("u1", "login")
    logger.flush()
    server.stop()
    for i in range(50):
        logger.record_event(f"u{i}", "login")
    logger.flush()
    # The first unit sent is lost (unconfirmed: sent, no reply), counted; the rest waits out the backoff in the buffer.
    lost = logger.stats.dropped_write_failed + logger.stats.unconfirmed
    assert lost > 0 and lost + logger.pending == 50
    logger.close()
    lost = logger.stats.dropped_write_failed + logger.stats.unconfirmed
    assert logger.stats.written == 1 and lost == 50  # still down at close: all counted


def test_validation_quarantines_malformed_and_unknown_events():
    entry = f"{T0}-0".encode()
    good = {b"ts": str(T0).encode(), b"user": b"u1", b"action": b"login"}
    assert validate_event(entry, good)[0] == {
        "stream_id": f"{T0}-0", "ts_ms": T0, "user": "u1", "action": "login", "entity": None, "tenant": None,
    }  # fmt: skip
    cases = {
        "missing field ts": {b"user": b"u1", b"action": b"login"},
        "ts is not an integer": {**good, b"ts": b"soon"},
        "ts more than an hour before its arrival": {**good, b"ts": b"1"},
        # a unit error says so, not a clock's (h_qlog): seconds, microseconds, nanoseconds
        "ts in seconds, not milliseconds": {**good, b"ts": str(T0 // 1000 + 600).encode()},  # and a clock 10 min fast
        "ts in microseconds, not milliseconds": {**good, b"ts": str((T0 - 7_200_000) * 1000).encode()},  # 2 h slow
        "ts in nanoseconds, not milliseconds": {**good, b"ts": str(T0 * 1_000_000).encode()},
        "ts more than 5 minutes after its arrival": {**good, b"ts": str(T0 + 3_600_000).encode()},
        "missing field user": {b"ts": str(T0).encode(), b"action": b"login"},
        "empty action": {**good, b"action": b""},
        "user contains control characters": {**good, b"user": b"u\x00"},
        "entity is not valid UTF-8": {**good, b"entity": b"\xff"},
        "tenant longer than 256": {**good, b"tenant": b"t" * 300},
        "unknown action: 'logout'": {**good, b"action": b"logout"},
    }
    for expected, fields in cases.items():
        row, reason = validate_event(entry, fields)
        assert row is None and reason.startswith(expected), (expected, reason)
    assert unknown_action(validate_event(entry, cases["unknown action: 'logout'"])[1])
    assert not unknown_action(validate_event(entry, cases["empty action"])[1])


def test_the_serving_client_records_events_on_the_event_stream(redis_url, redis_client, schema):
    from precompute_assets.serving import PredictionCache

    cache = PredictionCache.from_url(redis_url, namespace=schema.namespace)
    cache.record_event("u1", "creative_upload", entity="cr9", tenant="t1")
    cache.record_event("u1", "login")
    cache.close()  # flushes
    entries = [fields for _, fields in redis_client.xrange(schema.events())]
    assert [(e[b"user"], e[b"action"], e.get(b"entity")) for e in entries] == [
        (b"u1", b"creative_upload", b"cr9"),
        (b"u1", b"login", None),
    ]
    silent = PredictionCache.from_url(redis_url, namespace=schema.namespace, log_events=False)
    silent.record_event("u2", "login")  # no event logger: nothing queued, nothing raised
    silent.close()
    assert redis_client.xlen(schema.events()) == 2


def test_events_of_a_server_whose_clock_runs_a_minute_ahead_are_kept():
    """The event's time is the service's clock, its arrival Redis's: a service a minute fast sends no malformed event
    (every event of a service 2 s fast was quarantined); ten minutes ahead is one."""
    entry = f"{T0}-0".encode()
    for ahead_ms, kept in ((2_000, True), (60_000, True), (600_000, False)):
        fields = {b"ts": str(T0 + ahead_ms).encode(), b"user": b"u1", b"action": b"login"}
        row, reason = validate_event(entry, fields)
        assert (row is not None) is kept, reason


def test_a_span_goes_on_only_from_where_it_ended_on_servers_that_lost_no_key():
    span = UserStatesSpan("1-0", "5-0", "r1:0")
    assert span.after("5-0", "9-0", "r1:0") == UserStatesSpan("1-0", "9-0", "r1:0")
    assert span.after("6-0", "9-0", "r1:0") == UserStatesSpan("6-0", "9-0", "r1:0")  # a tick's states not stored
    assert span.after("5-0", "9-0", "r1:3") == UserStatesSpan("5-0", "9-0", "r1:3")  # keys evicted meanwhile
    assert span.after("5-0", "9-0", "r2:0") == UserStatesSpan("5-0", "9-0", "r2:0")  # a restart
    assert span.after("5-0", "9-0", None).since == "5-0"  # servers that do not say: never carried on
    assert UserStatesSpan("1-0", "5-0").after("5-0", "9-0", None).since == "5-0"
    assert UserStatesSpan.decode(span.encode().encode()) == span
    assert UserStatesSpan.decode(b"1-0 5-0") == UserStatesSpan("1-0", "5-0")  # written before the mark: no server
    for malformed in (b"", b"x 5-0", b"1-0 5-0 a b", None):
        assert UserStatesSpan.decode(malformed) is None


def test_the_server_mark_changes_when_redis_evicts_a_key_or_restarts(redis_server):
    server = redis_server(extra_config=("maxmemory-policy volatile-lru",))
    client = connect(server.url)
    before = server_mark(client)
    assert before is not None and before == server_mark(client)
    client.set("k0", "x", ex=600)
    client.config_set("maxmemory", 1)  # our own test server: full at once, so a write evicts the volatile key
    with contextlib.suppress(redis.OutOfMemoryError):  # refused once nothing volatile is left: evicted before it
        client.set("k1", "y")
    client.config_set("maxmemory", 0)
    evicted = server_mark(client)
    assert evicted != before and client.get("k0") is None and client.info("stats")["evicted_keys"] >= 1
    server.stop()
    server.start()
    assert server_mark(connect(server.url)) not in (before, evicted)  # a new run_id, and perhaps no evictions


def test_a_server_that_refuses_info_gives_no_mark(redis_server):
    server = redis_server()
    connect(server.url).acl_setuser("noinfo", enabled=True, nopass=True, commands=["+@all", "-info"], keys=["*"])
    assert server_mark(connect(server.url.replace("redis://", "redis://noinfo@"))) is None
