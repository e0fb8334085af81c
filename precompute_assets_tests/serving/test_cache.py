"""PredictionCache against a real Redis: reads, read-through, versions, and a dead or silent server."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from precompute_assets.serving import (
    Experiment,
    KeySchema,
    PredictionCache,
    QueryLogger,
    arm_of,
    connect,
    publish_version,
)


def make_cache(url: str, schema: KeySchema, **options) -> PredictionCache:
    return PredictionCache(connect(url, socket_timeout=1.0), schema=schema, pointer_ttl_s=0, **options)


def test_get_reads_the_published_version(redis_url, redis_client, schema):
    publish_version(redis_client, "ctr", "v1", [("ad1", 0.25), ("ad2", 0.5)], n_keys=2, schema=schema)
    cache = make_cache(redis_url, schema)
    assert cache.get("ctr", "ad1") == pytest.approx(0.25)
    assert cache.get("ctr", "missing") is None
    assert cache.get_many("ctr", ["ad2", "nope", "ad1"]) == [pytest.approx(0.5), None, pytest.approx(0.25)]
    assert cache.current_version("ctr").version == "v1"


def test_get_or_compute_stores_with_ttl_and_serves_from_cache(redis_url, redis_client, schema):
    cache = make_cache(redis_url, schema, live_ttl_s=120)
    calls = []

    def compute(key: str) -> dict:
        calls.append(key)
        return {"score": len(key)}

    assert cache.get_or_compute("rank", "abc", compute) == {"score": 3}
    assert cache.get_or_compute("rank", "abc", compute) == {"score": 3}
    assert calls == ["abc"]
    ttl = redis_client.ttl(schema.live("rank", "abc"))
    assert 0 < ttl <= 120


def test_new_version_replaces_old_and_old_expires(redis_url, redis_client, schema):
    publish_version(redis_client, "ctr", "v1", [("a", 0.1)], n_keys=1, schema=schema)
    result = publish_version(redis_client, "ctr", "v2", [("a", 0.2)], n_keys=1, schema=schema, grace_s=30)
    assert result.previous_version == "v1"
    assert make_cache(redis_url, schema).get("ctr", "a") == pytest.approx(0.2)
    assert 0 < redis_client.ttl(schema.bucket("ctr", "v1", 0)) <= 30


def test_publish_rejects_a_count_mismatch_without_flipping(redis_client, schema):
    publish_version(redis_client, "ctr", "v1", [("a", 0.1)], n_keys=1, schema=schema)
    with pytest.raises(ValueError, match="expected 3 keys, got 1"):
        publish_version(redis_client, "ctr", "v2", [("a", 0.9)], n_keys=3, schema=schema)
    assert redis_client.get(schema.pointer("ctr")) == b"v1:1"


def test_queries_are_logged_with_hit_and_miss(redis_url, redis_client, schema):
    publish_version(redis_client, "ctr", "v1", [("ad1", 0.3)], n_keys=1, schema=schema)
    logger = QueryLogger(connect(redis_url), schema)
    cache = make_cache(redis_url, schema, logger=logger)
    cache.get("ctr", "ad1", user="u7", tenant="acme")
    cache.get("ctr", "ad404")
    cache.get_or_compute("ctr", "ad9", lambda key: 0.9)
    logger.close()
    entries = redis_client.xrange(schema.query_log())
    assert [(e[b"key"], e[b"hit"]) for _, e in entries] == [(b"ad1", b"1"), (b"ad404", b"0"), (b"ad9", b"0")]
    assert entries[0][1][b"user"] == b"u7" and entries[0][1][b"tenant"] == b"acme"
    assert b"user" not in entries[1][1]
    assert redis_client.hgetall(schema.stats("ctr")) == {b"hit": b"1", b"miss": b"2"}


def test_dead_redis_computes_live_without_raising(schema):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_url = f"redis://127.0.0.1:{s.getsockname()[1]}/0"  # nothing listens once closed
    cache = PredictionCache.from_url(dead_url, socket_timeout=0.1, namespace=schema.namespace)
    started = time.monotonic()
    assert cache.get_or_compute("ctr", "ad1", lambda key: 0.42) == 0.42
    assert cache.get("ctr", "ad1") is None
    assert cache.get_many("ctr", ["a", "b"]) == [None, None]
    # Bounded by the socket timeout, not hanging (a generous bound: this is not a speed assertion).
    assert time.monotonic() - started < 5
    assert cache.errors >= 1
    cache.close()
    assert cache.logger.stats.written == 0
    assert cache.logger.stats.dropped == 4  # every event accounted for, none retried


def test_silent_redis_times_out_and_degrades(schema):
    """A server that accepts connections but never answers: the socket timeout bounds the wait."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    url = f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
    try:
        cache = PredictionCache(connect(url, socket_timeout=0.2), schema=schema, backoff_s=60)
        started = time.monotonic()
        assert cache.get_or_compute("ctr", "ad1", lambda key: 0.1) == 0.1
        first = time.monotonic() - started
        # While the breaker is open, callers do not pay the timeout again.
        assert cache.get_or_compute("ctr", "ad2", lambda key: 0.2) == 0.2
        assert first < 5 and cache.errors == 1
    finally:
        listener.close()


def test_logger_buffer_is_bounded_and_counts_drops(schema):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_url = f"redis://127.0.0.1:{s.getsockname()[1]}/0"
    logger = QueryLogger(connect(dead_url, socket_timeout=0.05), schema, max_buffer=100, backoff_s=60)
    for i in range(1000):
        logger.log("ctr", f"k{i}", hit=False)
    assert logger.pending <= 100
    logger.close()
    assert logger.stats.logged == 1000
    assert logger.stats.written == 0
    assert logger.stats.dropped == 1000 and logger.pending == 0  # nothing lingers uncounted after close


def test_readers_never_see_a_mix_during_publish(redis_url, redis_client, schema):
    """A concurrent reader sees all-old or all-new values in every batch while versions flip."""
    keys = [f"ad{i}" for i in range(500)]
    publish_version(redis_client, "ctr", "v0", [(k, 0.0) for k in keys], n_keys=len(keys), schema=schema)
    cache = make_cache(redis_url, schema)
    seen: set[tuple[float, ...]] = set()
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            seen.add(tuple(sorted(set(cache.get_many("ctr", keys)))))

    reader = threading.Thread(target=read)
    reader.start()
    for version in range(1, 6):
        value = float(version)
        publish_version(redis_client, "ctr", f"v{version}", [(k, value) for k in keys], n_keys=len(keys), schema=schema)
    stop.set()
    reader.join()
    assert seen and all(len(values) == 1 for values in seen), seen


def test_error_replies_and_corrupt_values_degrade_to_misses(redis_url, redis_client, schema):
    """OOM on the live write and a corrupt stored value: the caller gets its value, nothing raises."""
    redis_client.set(schema.live("ctr", "corrupt"), b"\x01")  # not a float32
    cache = make_cache(redis_url, schema)
    assert cache.get("ctr", "corrupt") is None and cache.errors == 1
    redis_client.config_set("maxmemory", "1")
    try:
        assert cache.get_or_compute("ctr", "fresh", lambda key: 0.5) == 0.5
    finally:
        redis_client.config_set("maxmemory", "0")
    assert cache.errors == 2


EXPERIMENT = Experiment("freq-vs-lstm", "s1", ("frequency", "lstm"))


def test_the_experiment_key_and_value_layout_is_pinned():
    assert KeySchema("pc").experiment("ctr") == "pc:1:ctr:experiment"
    assert EXPERIMENT.encode() == b'{"name":"freq-vs-lstm","salt":"s1","arms":["frequency","lstm"]}'
    assert Experiment.decode(EXPERIMENT.encode()) == EXPERIMENT


def test_queries_carry_the_arm_of_the_published_experiment(redis_url, redis_client, schema):
    keys = [f"ad{i}" for i in range(200)]
    items = [(k, 0.1) for k in keys[:100]]
    publish_version(redis_client, "ctr", "v1", items, n_keys=100, schema=schema, experiment=EXPERIMENT)
    assert Experiment.decode(redis_client.get(schema.experiment("ctr"))) == EXPERIMENT
    logger = QueryLogger(connect(redis_url), schema)
    cache = make_cache(redis_url, schema, logger=logger)
    assert cache.current_experiment("ctr") == EXPERIMENT
    for key in keys[:150]:
        cache.get("ctr", key)
    cache.get_many("ctr", keys[150:175])
    cache.get_or_compute("ctr", keys[175], lambda key: 0.5)
    cache.get("rank", "other-kind")  # no experiment for this kind: no arm
    # A publish without an experiment ends it, in the same transaction as the flip.
    publish_version(redis_client, "ctr", "v2", items, n_keys=100, schema=schema)
    assert redis_client.get(schema.experiment("ctr")) is None
    cache.get("ctr", keys[0])
    logger.close()
    events = [fields for _, fields in redis_client.xrange(schema.query_log())]
    assert len(events) == 178
    with_arm = events[:176]
    for event in with_arm:
        assert event[b"arm"].decode() == arm_of("s1", event[b"key"].decode(), ["frequency", "lstm"])
    assert {e[b"arm"] for e in with_arm} == {b"frequency", b"lstm"}
    assert b"arm" not in events[176] and b"arm" not in events[177]
    assert cache.current_experiment("ctr") is None


class CountingClient:
    """A redis client that counts round trips: every direct command, and every pipeline executed."""

    def __init__(self, client):
        self.client, self.round_trips = client, 0

    def pipeline(self, *args, **kwargs):
        pipe = self.client.pipeline(*args, **kwargs)
        execute = pipe.execute

        def counted(*a, **k):
            self.round_trips += 1
            return execute(*a, **k)

        pipe.execute = counted
        return pipe

    def __getattr__(self, name):
        attribute = getattr(self.client, name)
        if not callable(attribute):
            return attribute

        def counted(*args, **kwargs):
            self.round_trips += 1
            return attribute(*args, **kwargs)

        return counted


def test_the_experiment_costs_no_round_trip_per_lookup(redis_url, redis_client, schema):
    publish_version(redis_client, "ctr", "v1", [("a", 0.1)], n_keys=1, schema=schema, experiment=EXPERIMENT)
    client = CountingClient(connect(redis_url, socket_timeout=1.0))
    logger = QueryLogger(connect(redis_url), schema)
    cache = PredictionCache(client, schema=schema, logger=logger, pointer_ttl_s=3600)
    assert cache.get("ctr", "a") == pytest.approx(0.1)
    assert client.round_trips == 2  # pointer and experiment together, then the bucket
    for _ in range(10):
        cache.get("ctr", "a")
    assert client.round_trips == 12  # one per lookup, as without an experiment
    logger.close()
    assert all(
        f[b"arm"] == arm_of("s1", "a", EXPERIMENT.arms).encode() for _, f in redis_client.xrange(schema.query_log())
    )


def test_a_malformed_experiment_is_ignored_and_counted(redis_url, redis_client, schema):
    publish_version(redis_client, "ctr", "v1", [("a", 0.1)], n_keys=1, schema=schema)
    redis_client.set(schema.experiment("ctr"), b'{"name": "x", "salt": "s", "arms": ["lstm", "lstm"]}')
    logger = QueryLogger(connect(redis_url), schema)
    cache = make_cache(redis_url, schema, logger=logger)
    assert cache.get("ctr", "a") == pytest.approx(0.1)
    assert cache.current_experiment("ctr") is None and cache.errors >= 1
    logger.close()
    assert all(b"arm" not in f for _, f in redis_client.xrange(schema.query_log()))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"name": "x", "salt": "s", "arms": ["a"]}', "two distinct arm names"),
        (b'{"name": "x", "salt": "s", "arms": ["a", "B!"]}', "two distinct arm names"),
        (b'{"name": "x", "salt": "", "arms": ["a", "b"]}', "non-empty salt"),
        (b'{"name": "x", "arms": ["a", "b"]}', "non-empty salt"),
    ],
)
def test_experiment_decode_rejects_malformed_values(raw, message):
    with pytest.raises(ValueError, match=message):
        Experiment.decode(raw)


@pytest.mark.parametrize("key", ["", "x" * 257, "a\nb", "ad\x00", "{ad1}", "ad}1"])
def test_crafted_keys_are_refused_at_the_boundary(redis_url, redis_client, schema, key):
    """Input that could reach out of its kind's namespace (or choose a cluster slot) is a ValueError before any
    command is sent, and nothing is stored or logged."""
    logger = QueryLogger(connect(redis_url), schema)
    cache = make_cache(redis_url, schema, logger=logger)
    calls = []
    for lookup in (
        lambda: cache.get("ctr", key),
        lambda: cache.get_many("ctr", ["ad1", key]),
        lambda: cache.get_or_compute("ctr", key, calls.append),
        lambda: cache.get_or_compute("ctr", key, calls.append, admission="second_miss"),
    ):
        with pytest.raises(ValueError, match="invalid prediction key"):
            lookup()
    for kind in ("ctr:live", "stats", "Ctr"):
        with pytest.raises(ValueError, match="invalid kind"):
            cache.get(kind, "ad1")
    logger.close()
    assert calls == [] and cache.errors == 0 and logger.stats.logged == 0
    assert redis_client.keys(f"{schema.prefix}:*") == []


def test_a_malformed_pointer_is_no_version_and_never_raises(redis_url, redis_client, schema):
    redis_client.set(schema.live("ctr", "ad1"), b"\x00\x00\x80>")  # 0.25
    redis_client.set(schema.pointer("ctr"), b"live:3")  # a version that would read live keys as buckets
    cache = make_cache(redis_url, schema)
    assert cache.get("ctr", "ad1") == pytest.approx(0.25)  # the live value, not a bucket
    assert cache.current_version("ctr") is None and cache.errors >= 1
