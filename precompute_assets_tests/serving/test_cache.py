"""PredictionCache against a real Redis: reads, read-through, versions, and a dead or silent server."""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time

import pytest

from precompute_assets.serving import (
    Experiment,
    KeySchema,
    Pointer,
    PredictionCache,
    QueryLogger,
    arm_of,
    connect,
    publish_version,
)
from precompute_assets.serving import cache as cache_module
from precompute_assets.serving.keys import codec_for
from precompute_assets_tests.factories import (
    CountingClient,
    child_exit_code,
    log_client,
    logged_queries,
    run_interleaved,
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


def test_get_many_takes_any_iterable_of_keys_and_logs_each(redis_url, redis_client, schema):
    """A numpy array of keys failed with "the truth value of an array is ambiguous", a generator with "has no
    len()", and a set was read but its queries were dropped from the log as invalid (h_serve)."""
    import numpy as np
    import pandas as pd

    publish_version(redis_client, "ctr", "v1", [("ad1", 0.25), ("ad2", 0.5)], n_keys=2, schema=schema)
    logger = QueryLogger(log_client(redis_url), schema)
    cache = make_cache(redis_url, schema, logger=logger)
    want, given = [pytest.approx(0.5), None, pytest.approx(0.25)], ["ad2", "nope", "ad1"]
    for keys in (np.array(given), pd.Series(given), (key for key in given)):
        assert cache.get_many("ctr", keys) == want
    assert cache.get_many("ctr", {"ad1"}) == [pytest.approx(0.25)]
    logger.close()
    assert [entry[b"key"] for _, entry in logged_queries(redis_client, schema)] == [b"ad2", b"nope", b"ad1"] * 3 + [
        b"ad1"
    ]
    with pytest.raises(ValueError, match="keys must be a sequence of keys, not one str"):
        cache.get_many("ctr", "ad1")


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
    logger = QueryLogger(log_client(redis_url), schema)
    cache = make_cache(redis_url, schema, logger=logger)
    cache.get("ctr", "ad1", user="u7", tenant="acme")
    cache.get("ctr", "ad404")
    cache.get_or_compute("ctr", "ad9", lambda key: 0.9)
    logger.close()
    entries = logged_queries(redis_client, schema)
    assert [(e[b"key"], e[b"hit"]) for _, e in entries] == [(b"ad1", b"1"), (b"ad404", b"0"), (b"ad9", b"0")]
    assert entries[0][1][b"user"] == b"u7" and entries[0][1][b"tenant"] == b"acme"
    assert b"user" not in entries[1][1]
    assert redis_client.hgetall(schema.stats("ctr")) == {b"hit": b"1", b"miss": b"2"}


def test_from_url_takes_a_schema_as_the_constructor_does(redis_url, redis_client, schema):
    cache = PredictionCache.from_url(redis_url, schema=schema, log_queries=False, log_events=False)
    cache.get_or_compute("ctr", "ad1", lambda key: 0.5)  # it raised TypeError: schema given twice
    assert redis_client.exists(schema.live("ctr", "ad1")) and cache.schema == schema
    cache.close()
    with pytest.raises(ValueError, match="namespace 'other' and schema"):
        PredictionCache.from_url(redis_url, schema=schema, namespace="other")


def test_dead_redis_computes_live_without_raising(schema):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_url = f"redis://127.0.0.1:{s.getsockname()[1]}/0"  # nothing listens once closed
    cache = PredictionCache.from_url(dead_url, socket_timeout=0.1, namespace=schema.namespace)
    started = time.monotonic()
    assert cache.get_or_compute("ctr", "ad1", lambda key: 0.42) == pytest.approx(0.42)  # as float32, as a hit
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
        assert cache.get_or_compute("ctr", "ad1", lambda key: 0.1) == pytest.approx(0.1)
        first = time.monotonic() - started
        # While the breaker is open, callers do not pay the timeout again.
        assert cache.get_or_compute("ctr", "ad2", lambda key: 0.2) == pytest.approx(0.2)
        assert first < 5 and cache.errors == 1
    finally:
        listener.close()


def test_a_wrong_password_is_warned_of_not_only_counted(redis_server, schema, caplog):
    """A service configured with a wrong password (or an unreachable host) served every request live, and nothing said
    so but ``cache.errors``: now one warning a minute names the error."""
    server = redis_server(password="right-password-0123")
    cache = PredictionCache.from_url(f"redis://:wrong-secret@127.0.0.1:{server.port}/0", namespace=schema.namespace)
    try:
        with caplog.at_level(logging.WARNING, logger="precompute_assets.serving.cache"):
            for i in range(50):
                assert cache.get_or_compute("ctr", f"ad{i}", lambda key: 0.5) == 0.5
        assert cache.errors >= 1 and cache.hits == 0
        warnings = [record.getMessage() for record in caplog.records if record.name.endswith("serving.cache")]
        assert len(warnings) == 1, warnings
        assert "AuthenticationError" in warnings[0] and "computed live" in warnings[0], warnings
        assert "wrong-secret" not in warnings[0]
    finally:
        cache.close()


def test_the_current_version_survives_redis_trouble(redis_url, redis_client, schema):
    """``current_version`` / ``current_experiment`` are read paths too: with Redis gone they give what the reader last
    read instead of raising, and pay the timeout once, then back off like lookups (they raised ConnectionError)."""
    publish_version(redis_client, "ctr", "v1", [("a", 0.1)], n_keys=1, schema=schema, experiment=EXPERIMENT)
    cache = make_cache(redis_url, schema, backoff_s=60)
    assert cache.current_version("ctr").version == "v1" and cache.current_experiment("ctr") == EXPERIMENT
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_url = f"redis://127.0.0.1:{s.getsockname()[1]}/0"
    cache.client = connect(dead_url, socket_timeout=0.2)  # the server is gone
    assert cache.current_version("ctr").version == "v1" and cache.current_experiment("ctr") == EXPERIMENT
    assert cache.errors == 1  # one failure, then the backoff
    fresh = PredictionCache(connect(dead_url, socket_timeout=0.2), schema=schema)
    assert fresh.current_version("ctr") is None and fresh.current_experiment("ctr") is None


class PausingPipelines:
    """A client whose pipelines (a pointer refresh is one) pause after Redis replied, in the threads given a gate."""

    def __init__(self, client) -> None:
        self.client = client
        self.gates: dict[int, tuple[threading.Event, threading.Event]] = {}  # thread: (replied, go on)

    def pipeline(self, *args, **kwargs):
        pipe = self.client.pipeline(*args, **kwargs)
        execute = pipe.execute

        def paused(*a, **k):
            replies = execute(*a, **k)
            if gate := self.gates.get(threading.get_ident()):
                gate[0].set()
                gate[1].wait(10)
            return replies

        pipe.execute = paused
        return pipe

    def __getattr__(self, name):
        return getattr(self.client, name)


def test_a_slower_pointer_refresh_never_takes_the_cached_pointer_back(redis_url, redis_client, schema):
    """Two threads refresh the pointer at once; the one that read Redis before a flip finishes after the one that
    read it after the flip: the cached pointer stays on the new version (it went back to the old one, read by every
    thread of the cache for ``pointer_ttl_s``)."""
    publish_version(redis_client, "ctr", "v1", [("a", 0.1)], n_keys=1, schema=schema)
    client = PausingPipelines(connect(redis_url, socket_timeout=1.0))
    cache = PredictionCache(client, schema=schema, pointer_ttl_s=60)
    replied, go_on = threading.Event(), threading.Event()
    slow_read = []

    def slow_refresh() -> None:
        client.gates[threading.get_ident()] = (replied, go_on)
        slow_read.append(cache.current_version("ctr").version)

    slow = threading.Thread(target=slow_refresh)
    slow.start()
    assert replied.wait(10)  # it read v1
    publish_version(redis_client, "ctr", "v2", [("a", 0.2)], n_keys=1, schema=schema)
    assert cache.current_version("ctr").version == "v2"
    go_on.set()
    slow.join()
    assert cache.current_version("ctr").version == "v2" and cache.get("ctr", "a") == pytest.approx(0.2)
    assert slow_read == ["v2"]  # the slow refresh reads what the cache holds: never older than another thread


def test_a_refresh_whose_cluster_master_failed_keeps_the_newest_cached_pointer(
    redis_url, redis_client, schema, monkeypatch
):
    """On Redis Cluster a refresh whose pointer's master is down keeps the last pointer read. It kept the one it had
    looked at before taking its ticket: another thread's refresh that stored v2 in between was undone, and every
    thread read v1 again for ``pointer_ttl_s`` (found by review)."""
    publish_version(redis_client, "ctr", "v1", [("a", 0.1)], n_keys=1, schema=schema)
    cache = PredictionCache(connect(redis_url, socket_timeout=1.0), schema=schema, pointer_ttl_s=0.0)
    assert cache.current_version("ctr").version == "v1"
    publish_version(redis_client, "ctr", "v2", [("a", 0.2)], n_keys=1, schema=schema)
    newer = Pointer.decode(redis_client.get(schema.pointer("ctr")))
    take_ticket = cache._pointer_ticket

    def other_thread_stores_first() -> int:  # another thread's whole refresh, just before this one's ticket
        cache._store_pointer("ctr", (newer, None, time.monotonic()), take_ticket())
        monkeypatch.setattr(cache, "_pointer_ticket", take_ticket)
        return take_ticket()

    monkeypatch.setattr(cache, "_pointer_ticket", other_thread_stores_first)
    monkeypatch.setattr(cache, "_cluster", True)
    monkeypatch.setattr(cache, "_cluster_fetch", lambda commands: [cache_module.FAILED] * len(commands))
    assert cache.current_version("ctr").version == "v2"
    assert cache._pointers["ctr"][0].version == "v2"


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


def test_error_replies_and_corrupt_values_degrade_to_misses(redis_server, schema):
    """OOM on the live write and a corrupt stored value: the caller gets its value, nothing raises. A private
    server: an OOM limit on the shared one would evict other tests' keys."""
    server = redis_server()
    client = connect(server.url)
    client.set(schema.live("ctr", "corrupt"), b"\x01")  # not a float32
    cache = make_cache(server.url, schema)
    assert cache.get("ctr", "corrupt") is None and cache.errors == 1
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", "1")
    assert cache.get_or_compute("ctr", "fresh", lambda key: 0.5) == 0.5
    assert cache.errors >= 2  # the refused lock, value and delta writes each count


def test_an_error_reply_fails_its_command_not_the_reads_after_it(redis_server, schema):
    """At ``maxmemory`` with ``noeviction`` every write is refused (OOM) while reads still work: a refused store
    costs no backoff, so the values already cached keep being served (it once made every lookup a miss for
    ``backoff_s``)."""
    server = redis_server()
    client = connect(server.url)
    cache = make_cache(server.url, schema, backoff_s=60)
    cache.get_or_compute("ctr", "hot", lambda key: 0.25)
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", "1")
    for key in ("cold1", "cold2"):
        assert cache.get_or_compute("ctr", key, lambda key: 0.5) == 0.5  # its store is refused
    assert cache.get("ctr", "hot") == pytest.approx(0.25)
    assert cache.get_or_compute("ctr", "hot", lambda key: 0.9) == pytest.approx(0.25)
    assert cache.errors >= 2  # each refused store counts


def test_an_error_reply_in_a_batch_fails_its_key_not_the_batch(redis_url, redis_client, schema):
    """A live key of another type (WRONGTYPE on its GET) and a published bucket of another type cost their own keys
    only: the batch's other hits are returned, in their places, and counted; each failed key is an error and a miss
    (one error reply made the whole batch misses, published hits included)."""
    items = [(f"ad{i}", i / 1000) for i in range(200)]
    publish_version(redis_client, "ctr", "v1", items, n_keys=len(items), schema=schema)
    cache = make_cache(redis_url, schema)
    broken = schema.bucket_for_key("ctr", cache.current_version("ctr"), "ad7")
    redis_client.delete(broken)
    redis_client.set(broken, "not a hash")
    kept = [key for key, _ in items if schema.bucket_for_key("ctr", cache.current_version("ctr"), key) != broken]
    redis_client.hset(schema.live("ctr", "bad"), "field", "value")
    redis_client.set(schema.live("ctr", "fresh"), codec_for("ctr").encode(0.75))
    values = cache.get_many("ctr", [kept[0], "bad", "fresh", "ad7", "nope", kept[1]])
    expected = [dict(items)[kept[0]], None, 0.75, None, None, dict(items)[kept[1]]]
    assert values == [None if value is None else pytest.approx(value) for value in expected]
    assert (cache.hits, cache.misses, cache.errors) == (3, 3, 2)


def test_counters_are_exact_when_threads_share_a_cache(redis_url, redis_client, schema):
    """A service shares one cache across its thread pool: every lookup of every thread is counted, none lost."""
    publish_version(redis_client, "ctr", "v1", [("ad1", 0.25), ("ad2", 0.5)], n_keys=2, schema=schema)
    redis_client.hset(schema.live("ctr", "bad"), "field", "value")  # WRONGTYPE: an error per lookup
    cache = make_cache(redis_url, schema)
    n_threads, rounds = 4, 20

    def lookups() -> None:
        for _ in range(rounds):
            cache.get("ctr", "ad1")
            cache.get("ctr", "nope")
            cache.get_many("ctr", ["ad2", "nope", "bad"])

    run_interleaved(lookups, n_threads, cache_module.__file__)
    lookups_made = n_threads * rounds
    assert (cache.hits, cache.misses, cache.errors) == (2 * lookups_made, 3 * lookups_made, lookups_made)


def test_a_child_forked_while_a_thread_looks_up_never_hangs_on_the_caches_locks(redis_url, redis_client, schema):
    """A worker forked (gunicorn's preload) while another thread of the parent was counting a lookup or storing a
    pointer: the child inherits that thread's lock held, with no thread left to release it; it uses new ones."""
    publish_version(redis_client, "ctr", "v1", [("ad1", 0.25)], n_keys=1, schema=schema)
    cache = make_cache(redis_url, schema)
    assert cache.get("ctr", "ad1") == pytest.approx(0.25) and cache.get("ctr", "nope") is None
    with cache._count_lock, cache._pointer_lock:  # as threads inside ``_count`` and ``_store_pointer`` hold them
        pid = os.fork()
        if pid == 0:  # the child: report through the exit code, never return into pytest
            code = 1
            try:
                # its counters are its own, as its query logger's: they once went on from the parent's
                counts = (cache.hits, cache.misses)
                code = (
                    0 if counts == (0, 0) and cache.get("ctr", "ad1") == pytest.approx(0.25) and cache.hits == 1 else 3
                )
            finally:
                os._exit(code)
    assert child_exit_code(pid) == 0  # None: the child hung on the parent's lock; 3: it counted the parent's lookups
    assert (cache.hits, cache.misses) == (1, 1)


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
    logger = QueryLogger(log_client(redis_url), schema)
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
    events = [fields for _, fields in logged_queries(redis_client, schema)]
    assert len(events) == 178
    with_arm = events[:176]
    for event in with_arm:
        assert event[b"arm"].decode() == arm_of("s1", event[b"key"].decode(), ["frequency", "lstm"])
    assert {e[b"arm"] for e in with_arm} == {b"frequency", b"lstm"}
    assert b"arm" not in events[176] and b"arm" not in events[177]
    assert cache.current_experiment("ctr") is None


def test_a_reader_that_read_the_pointer_and_the_experiment_around_a_flip_takes_no_experiment(
    redis_url, redis_client, schema
):
    """The experiment names the version it is served with: a reader that read the old pointer and the new experiment
    (its GETs on either side of the flip) logged the old version's queries with arms of the new split."""
    publish_version(redis_client, "ctr", "v1", [("a", 0.1)], n_keys=1, schema=schema, experiment=EXPERIMENT)
    assert Experiment.served_version(redis_client.get(schema.experiment("ctr"))) == "v1"
    cache = make_cache(redis_url, schema)
    assert cache.current_experiment("ctr") == EXPERIMENT
    newer = Experiment("next", "s2", ("frequency", "lstm"))
    redis_client.set(schema.experiment("ctr"), newer.encode("v2"))  # as read just before v2's pointer lands
    assert cache.current_version("ctr").version == "v1" and cache.current_experiment("ctr") is None
    redis_client.set(schema.experiment("ctr"), newer.encode())  # one stored before versions were named: taken
    assert cache.current_experiment("ctr") == newer
    assert Experiment.served_version(b"not json") is None and Experiment.served_version(b"[1]") is None


def test_the_experiment_costs_no_round_trip_per_lookup(redis_url, redis_client, schema):
    publish_version(redis_client, "ctr", "v1", [("a", 0.1)], n_keys=1, schema=schema, experiment=EXPERIMENT)
    client = CountingClient(connect(redis_url, socket_timeout=1.0))
    logger = QueryLogger(log_client(redis_url), schema)
    cache = PredictionCache(client, schema=schema, logger=logger, pointer_ttl_s=3600)
    assert cache.get("ctr", "a") == pytest.approx(0.1)
    assert client.round_trips == 2  # pointer and experiment together, then the bucket
    for _ in range(10):
        cache.get("ctr", "a")
    assert client.round_trips == 12  # one per lookup, as without an experiment
    logger.close()
    assert all(
        f[b"arm"] == arm_of("s1", "a", EXPERIMENT.arms).encode() for _, f in logged_queries(redis_client, schema)
    )


def test_a_query_is_logged_with_the_version_and_arm_its_own_lookup_read(redis_url, redis_client, schema):
    """Threads share a cache: another thread that refreshes the pointer after a flip, while this thread's lookup is
    reading the old version, must not relabel this query. Its ``ver`` and ``arm`` were read from the shared cache of
    pointers after the lookup, so they named the new version and its experiment beside the old version's value."""
    keys = [("a", 0.1)]
    publish_version(redis_client, "ctr", "v1", keys, n_keys=1, schema=schema, experiment=EXPERIMENT)
    logger = QueryLogger(log_client(redis_url), schema)
    cache = make_cache(redis_url, schema, logger=logger)  # pointer_ttl_s=0: every lookup reads the pointer
    flipped = []

    def another_thread_reads_after_a_flip() -> None:  # runs while this thread's HGET of v1 is in flight
        if flipped:
            return
        flipped.append(True)
        new_experiment = Experiment("other", "s3", ("lstm", "frequency"))  # "a" is in arm lstm
        publish_version(redis_client, "ctr", "v2", [("a", 0.2)], n_keys=1, schema=schema, experiment=new_experiment)
        other = threading.Thread(target=cache.current_version, args=("ctr",))
        other.start()
        other.join()

    cache._while_waiting = another_thread_reads_after_a_flip
    assert cache.get("ctr", "a") == pytest.approx(0.1)  # v1's value: the lookup read v1
    assert cache.current_version("ctr").version == "v2"
    logger.close()
    ((_, fields),) = logged_queries(redis_client, schema)
    assert fields[b"ver"] == b"v1"
    assert fields[b"arm"].decode() == EXPERIMENT.arm("a") == "frequency"


def test_a_malformed_experiment_is_ignored_and_counted(redis_url, redis_client, schema):
    publish_version(redis_client, "ctr", "v1", [("a", 0.1)], n_keys=1, schema=schema)
    redis_client.set(schema.experiment("ctr"), b'{"name": "x", "salt": "s", "arms": ["lstm", "lstm"]}')
    logger = QueryLogger(log_client(redis_url), schema)
    cache = make_cache(redis_url, schema, logger=logger)
    assert cache.get("ctr", "a") == pytest.approx(0.1)
    assert cache.current_experiment("ctr") is None and cache.errors >= 1
    logger.close()
    assert all(b"arm" not in f for _, f in logged_queries(redis_client, schema))


def test_an_experiment_with_arms_that_are_not_names_never_raises_from_a_lookup(redis_url, redis_client, schema):
    """Arms that are JSON arrays or objects (a hand-written experiment key) once raised TypeError from every lookup of
    the kind (``set()`` of unhashable arms), which is documented never to raise: it is no experiment, counted."""
    publish_version(redis_client, "ctr", "v1", [("a", 0.1)], n_keys=1, schema=schema)
    redis_client.set(schema.experiment("ctr"), b'{"name": "x", "salt": "s", "arms": [["lstm"], ["frequency"]]}')
    cache = make_cache(redis_url, schema)
    assert cache.get("ctr", "a") == pytest.approx(0.1)
    assert cache.get_many("ctr", ["a", "b"]) == [pytest.approx(0.1), None]
    assert cache.get_or_compute("ctr", "b", lambda key: 0.5) == 0.5
    assert cache.current_version("ctr").version == "v1"
    assert cache.current_experiment("ctr") is None and cache.errors >= 1


def test_deeply_nested_json_values_are_misses_not_exceptions(redis_url, redis_client, schema):
    """A live value or an experiment of JSON nested deeper than Python's recursion limit (a corrupt or hostile write:
    a reader's credentials may write live values) raised RecursionError from the lookup, which is documented to count
    a corrupt value as an error and a miss."""
    publish_version(redis_client, "ctr", "v1", [("a", 0.1)], n_keys=1, schema=schema)
    redis_client.set(schema.live("rank", "deep"), b"[" * 100_000)
    redis_client.set(schema.experiment("ctr"), b"[" * 100_000)
    cache = make_cache(redis_url, schema)
    assert cache.get("rank", "deep") is None
    assert cache.get_many("rank", ["deep", "other"]) == [None, None]
    assert cache.get("ctr", "a") == pytest.approx(0.1)
    assert cache.current_experiment("ctr") is None and cache.errors >= 3


def test_an_experiment_key_of_another_type_is_no_experiment(redis_url, redis_client, schema):
    """The pointer and the experiment are read together: a WRONGTYPE reply to the experiment's GET (a hash written
    there by hand) failed the pointer's refresh too, so every lookup of the kind was a miss, live values included,
    and the pointer was read again on every one. A malformed experiment is no experiment, as on a cluster."""
    publish_version(redis_client, "ctr", "v1", [("a", 0.1)], n_keys=1, schema=schema)
    redis_client.set(schema.live("ctr", "z"), b"\x00\x00\x00\x3f")  # 0.5 as float32
    redis_client.hset(schema.experiment("ctr"), "arms", "lstm,frequency")
    cache = make_cache(redis_url, schema)
    assert cache.get("ctr", "a") == pytest.approx(0.1)
    assert cache.get_many("ctr", ["a", "z"]) == [pytest.approx(0.1), pytest.approx(0.5)]
    assert cache.current_version("ctr").version == "v1"
    assert cache.current_experiment("ctr") is None and cache.errors >= 1


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"name": "x", "salt": "s", "arms": ["a"]}', "two distinct arm names"),
        (b'{"name": "x", "salt": "s", "arms": ["a", "B!"]}', "two distinct arm names"),
        (b'{"name": "x", "salt": "", "arms": ["a", "b"]}', "non-empty salt"),
        (b'{"name": "x", "arms": ["a", "b"]}', "non-empty salt"),
        (b'{"name": "x", "salt": "s", "arms": [["a"], ["b"]]}', "two distinct arm names"),  # unhashable arms
        (b'{"name": "x", "salt": "s", "arms": [{}, {}]}', "two distinct arm names"),
    ],
)
def test_experiment_decode_rejects_malformed_values(raw, message):
    with pytest.raises(ValueError, match=message):
        Experiment.decode(raw)


@pytest.mark.parametrize("key", ["", "x" * 257, "a\nb", "ad\x00", "{ad1}", "ad}1"])
def test_crafted_keys_are_refused_at_the_boundary(redis_url, redis_client, schema, key):
    """Input that could reach out of its kind's namespace (or choose a cluster slot) is a ValueError before any
    command is sent, and nothing is stored or logged."""
    logger = QueryLogger(log_client(redis_url), schema)
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


# --- stampede protection: the XFetch rule and the recompute lock ---------------------------------------------


def test_xfetch_rule():
    from precompute_assets.serving.cache import xfetch_due

    assert xfetch_due(100, 1.0, 1.0, 0.5)  # -1 s * ln(0.5) = 0.69 s >= 0.1 s left
    assert not xfetch_due(10_000, 1.0, 1.0, 0.5)  # 0.69 s < 10 s left
    assert xfetch_due(10_000, 1.0, 20.0, 0.5)  # beta 20: 13.9 s >= 10 s
    assert not xfetch_due(100, 1.0, 1.0, 1.0)  # ln(1) = 0: never early
    assert xfetch_due(0, 0.001, 1.0, 0.9)  # no time left: due
    for ttl, delta, beta in [(None, 1.0, 1.0), (100, None, 1.0), (-1, 1.0, 1.0), (100, 1.0, 0.0), (100, 0.0, 1.0)]:
        assert not xfetch_due(ttl, delta, beta, 1e-9)


def test_the_delta_is_stored_beside_a_plain_value(redis_url, redis_client, schema):
    from precompute_assets.serving.cache import live_delta_key
    from precompute_assets.serving.keys import codec_for

    cache = make_cache(redis_url, schema, live_ttl_s=120)

    def slow(key):
        time.sleep(0.02)
        return 0.25

    assert cache.get_or_compute("ctr", "ad1", slow) == 0.25
    assert redis_client.get(schema.live("ctr", "ad1")) == codec_for("ctr").encode(0.25)  # GET is the codec's bytes
    assert cache.get("ctr", "ad1") == 0.25
    delta = float(redis_client.get(live_delta_key(schema, "ctr", "ad1")))
    assert 0.02 <= delta < 5
    assert 0 < redis_client.ttl(live_delta_key(schema, "ctr", "ad1")) <= 120
    assert cache.computes == 1 and cache.early_recomputes == 0 and cache.errors == 0


def test_a_value_near_expiry_is_recomputed_early_by_the_lock_holder_only(redis_url, redis_client, schema):
    from precompute_assets.serving.cache import live_delta_key, recompute_lock_key

    cache = make_cache(redis_url, schema, live_ttl_s=300)
    cache._random.random = lambda: 0.5  # ln(0.5): due when delta * 0.69 >= the time left
    calls = []
    assert cache.get_or_compute("rank", "k", lambda key: calls.append(key) or {"v": len(calls)}) == {"v": 1}
    redis_client.set(live_delta_key(schema, "rank", "k"), b"10.0")  # a 10 s computation...
    redis_client.pexpire(schema.live("rank", "k"), 5000)  # ...of a value with 5 s left: due
    redis_client.set(recompute_lock_key(schema, "rank", "k"), b"1", px=60_000)  # but another reader holds the lock
    assert cache.get_or_compute("rank", "k", lambda key: calls.append(key) or {"v": len(calls)}) == {"v": 1}
    assert calls == ["k"] and cache.early_recomputes == 0  # served the still-valid value
    redis_client.delete(recompute_lock_key(schema, "rank", "k"))
    recorded = []  # the lock is taken (SET NX PX) before the early computation
    compute = lambda key: recorded.append(redis_client.pttl(recompute_lock_key(schema, "rank", "k"))) or {"v": 2}  # noqa: E731
    assert cache.get_or_compute("rank", "k", compute) == {"v": 2} and 0 < recorded[0] <= 1000
    assert cache.early_recomputes == 1 and cache.get("rank", "k") == {"v": 2}
    assert redis_client.pttl(schema.live("rank", "k")) > 250_000  # rewritten with the full TTL
    time.sleep(0.01)
    assert redis_client.get(recompute_lock_key(schema, "rank", "k")) is None  # released with the write
    # Far from expiry nothing is recomputed, and a value written by a task run (no delta) never early.
    assert cache.get_or_compute("rank", "k", lambda key: calls.append(key)) == {"v": 2}
    redis_client.set(schema.live("rank", "t"), b'{"v": 0}', px=50)
    assert cache.get_or_compute("rank", "t", lambda key: calls.append(key)) == {"v": 0}
    assert calls == ["k"] and cache.early_recomputes == 1


def test_an_early_recomputation_that_raises_serves_the_cached_value(redis_url, redis_client, schema, caplog):
    """XFetch recomputes a hit early: when that compute raises (the model is down), the value read is still valid
    and is what the caller gets; it once got the exception, which a hit never raises without XFetch."""
    from precompute_assets.serving.cache import live_delta_key, recompute_lock_key

    cache = make_cache(redis_url, schema, live_ttl_s=300)
    cache._random.random = lambda: 0.5
    assert cache.get_or_compute("rank", "k", lambda key: {"v": 1}) == {"v": 1}
    redis_client.set(live_delta_key(schema, "rank", "k"), b"10.0")
    redis_client.pexpire(schema.live("rank", "k"), 5000)  # due (see above)
    redis_client.delete(recompute_lock_key(schema, "rank", "k"))  # the first compute's released lock, if not lapsed yet

    def down(key: str) -> dict:
        raise RuntimeError("model down")

    with caplog.at_level(logging.WARNING, logger="precompute_assets.serving.cache"):
        assert cache.get_or_compute("rank", "k", down) == {"v": 1}
        assert cache.early_recomputes == 1 and cache.computes == 2 and cache.failed_early_recomputes == 1
        time.sleep(0.01)
        assert redis_client.get(recompute_lock_key(schema, "rank", "k")) is None  # released for the next reader
        assert cache.get_or_compute("rank", "k", down) == {"v": 1}  # due again, fails again: counted, not logged
        assert cache.failed_early_recomputes == 2
    warnings = [record for record in caplog.records if "early recomputation" in record.getMessage()]
    assert len(warnings) == 1 and warnings[0].exc_info is not None  # a model outage is one warning a minute
    with pytest.raises(RuntimeError):  # a miss has no value to serve: its compute's error is the caller's
        cache.get_or_compute("rank", "gone", down)


def test_an_early_recomputation_never_brings_back_a_value_deleted_while_it_computed(redis_url, redis_client, schema):
    """A value invalidated (or evicted by ``probation``) while an early recomputation ran stays gone: the
    recomputation once stored over the deletion, serving for a whole live TTL what the invalidation removed, or
    keeping a value outside probation's capacity that nothing tracked or deleted."""
    from precompute_assets.serving.admission import Probation, fifo_names
    from precompute_assets.serving.cache import live_delta_key
    from precompute_assets.serving.invalidate import invalidate

    def make_due(cache, key):
        redis_client.set(live_delta_key(schema, "rank", key), b"10.0")
        redis_client.pexpire(schema.live("rank", key), 5000)  # due at rand 0.5 (see above)
        time.sleep(0.01)  # the miss's released lock lapses

    cache = make_cache(redis_url, schema, live_ttl_s=300)
    cache._random.random = lambda: 0.5
    assert cache.get_or_compute("rank", "k", lambda key: {"v": 1}) == {"v": 1}
    make_due(cache, "k")

    def invalidated_meanwhile(key):
        assert invalidate(redis_client, "rank", key=key, schema=schema).live_keys == 1
        return {"v": "computed before the invalidation"}

    assert cache.get_or_compute("rank", "k", invalidated_meanwhile) == {"v": "computed before the invalidation"}
    assert cache.early_recomputes == 1 and redis_client.get(schema.live("rank", "k")) is None
    # probation, capacity 2: another reader's misses evict "a" while its early recomputation runs
    policy = Probation(capacity=2)
    early = make_cache(redis_url, schema, live_ttl_s=300, admission=policy)
    early._random.random = lambda: 0.5
    other = make_cache(redis_url, schema, live_ttl_s=300, admission=policy, xfetch_beta=0)
    assert early.get_or_compute("rank", "a", lambda key: {"v": 1}) == {"v": 1}
    make_due(early, "a")

    def evicted_meanwhile(key):
        for name in ("b", "c", "d", "e"):
            for _ in range(2):  # a hit in probation: each goes on to the main LRU, past "a"
                other.get_or_compute("rank", name, lambda key: {"v": key})
        return {"v": 2}

    assert early.get_or_compute("rank", "a", evicted_meanwhile) == {"v": 2} and early.early_recomputes == 1
    small, _, main, *_ = fifo_names(schema, "rank")
    tracked = {name.decode() for name in [*redis_client.lrange(small, 0, -1), *redis_client.zrange(main, 0, -1)]}
    live = {name.decode().rpartition(":live:")[2] for name in redis_client.scan_iter(f"{schema.prefix}:rank:live:*")}
    assert "a" not in tracked and live == tracked and len(live) == 2


@pytest.mark.parametrize("stampede", [{}, {"xfetch_beta": 0, "recompute_lock_ms": 0}])
def test_a_published_null_is_a_hit_never_recomputed(redis_url, redis_client, schema, stampede):
    """A published JSON null is the model's answer ("nothing"): a hit for every lookup, and ``get_or_compute``
    neither computes nor writes a live value. Decoded to None, it was taken for an absent value: computed and
    written live at every call, a live value the published one then hid."""
    publish_version(redis_client, "rank", "v1", [("empty", None), ("full", [1, 2])], n_keys=2, schema=schema)
    cache = make_cache(redis_url, schema, **stampede)
    calls = []

    def compute(key: str) -> list:
        calls.append(key)
        return ["computed"]

    assert [cache.get_or_compute("rank", "empty", compute) for _ in range(2)] == [None, None]
    assert cache.get("rank", "empty") is None
    assert cache.get_many("rank", ["empty", "full", "absent"]) == [None, [1, 2], None]
    assert calls == [] and redis_client.exists(schema.live("rank", "empty")) == 0
    assert (cache.hits, cache.misses, cache.computes) == (5, 1, 0)


@pytest.mark.parametrize("stampede", [{}, {"xfetch_beta": 0, "recompute_lock_ms": 0}])
def test_a_non_finite_ctr_is_returned_but_never_cached(redis_url, redis_client, schema, stampede):
    """The publish refuses predictions that are not finite; the read-through once stored the NaN a model returned
    for a key (a missing feature, a transient fault) and served it for a whole live TTL."""
    cache = make_cache(redis_url, schema, **stampede)
    for bad in (math.nan, math.inf):
        assert str(cache.get_or_compute("ctr", "ad1", lambda key, bad=bad: bad)) == str(bad)  # the caller gets it
        assert redis_client.get(schema.live("ctr", "ad1")) is None
    assert cache.get_or_compute("ctr", "ad1", lambda key: 0.25) == 0.25  # computed again, and now cached
    assert cache.get_or_compute("ctr", "ad1", lambda key: float("nan")) == 0.25
    assert cache.computes == 3 and cache.errors == 0


@pytest.mark.parametrize("stampede", [{}, {"xfetch_beta": 0, "recompute_lock_ms": 0}])
def test_a_json_value_with_nan_is_returned_but_never_cached(redis_url, redis_client, schema, stampede):
    """JSON has no NaN or Infinity: stored as they were, readers in other languages refused them, and this client
    served them as hits for the whole live TTL (h_serve)."""
    cache = make_cache(redis_url, schema, **stampede)
    for bad in ({"score": math.nan}, math.inf, [1, -math.inf]):
        assert str(cache.get_or_compute("rank", "u1", lambda key, bad=bad: bad)) == str(bad)  # the caller gets it
        assert redis_client.get(schema.live("rank", "u1")) is None
    assert cache.get_or_compute("rank", "u1", lambda key: {"score": 0.5}) == {"score": 0.5}
    assert redis_client.get(schema.live("rank", "u1")) == b'{"score":0.5}'


def test_a_stored_ctr_that_is_not_finite_is_a_corrupt_value_recomputed(redis_url, redis_client, schema):
    """A NaN or Infinity another writer stored was served as a hit and never recomputed (h_serve): every writer of
    ours refuses them, so it is corrupt, like bytes of the wrong length."""
    cache = make_cache(redis_url, schema)
    for raw in (b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f"):  # float32 NaN, +Infinity
        redis_client.set(schema.live("ctr", "ad1"), raw, ex=3600)
        assert cache.get("ctr", "ad1") is None
    assert cache.errors == 2
    assert cache.get_or_compute("ctr", "ad1", lambda key: 0.25) == 0.25 and cache.computes == 1
    assert cache.get("ctr", "ad1") == 0.25


@pytest.mark.parametrize("logit", [1.5, -3.0])
def test_a_ctr_that_is_no_probability_is_returned_but_never_stored_nor_served(redis_url, redis_client, schema, logit):
    """A model bug returning a logit was cached for the live TTL and served by every later read, while the publish
    refuses such values (h_feast). It is returned to the caller that computed it, not stored; one another writer
    stored is corrupt, a miss counted in ``errors``."""
    cache = make_cache(redis_url, schema)
    assert cache.get_or_compute("ctr", "a4", lambda key: logit) == logit
    assert redis_client.get(schema.live("ctr", "a4")) is None and cache.get("ctr", "a4") is None
    redis_client.set(schema.live("campaign", "a5"), codec_for("campaign").encode(logit), ex=3600)
    errors = cache.errors
    assert cache.get("campaign", "a5") is None and cache.errors == errors + 1
    assert cache.get_or_compute("ctr", "a6", lambda key: 1.0) == 1.0 and cache.get("ctr", "a6") == 1.0  # a bound


def test_a_corrupt_or_wrong_type_value_is_read_past_to_the_live_one_and_replaced(redis_url, redis_client, schema):
    """A published value that does not decode made a miss of every lookup of its key while the value
    ``get_or_compute`` stored for it went unread, so it computed on almost every call; a pointer or a live key of
    another type (WRONGTYPE) turned the kind's live values off, or made a key compute on every call and store nothing
    (h_serve). Each is an error and a miss now, read past to the live value, which a computation replaces."""
    publish_version(redis_client, "ctr", "v1", [("ad1", 0.25), ("bad", 0.5)], n_keys=2, schema=schema)
    cache = make_cache(redis_url, schema)
    redis_client.hset(schema.bucket_for_key("ctr", cache.current_version("ctr"), "bad"), "bad", b"zz")
    calls = []

    def compute(key: str) -> float:
        calls.append(key)
        return 0.125

    assert [cache.get_or_compute("ctr", "bad", compute) for _ in range(5)] == [0.125] * 5 and calls == ["bad"]
    assert cache.get("ctr", "bad") == 0.125 and cache.get_many("ctr", ["ad1", "bad"]) == [0.25, 0.125]
    assert cache.errors == 7  # each lookup read the corrupt value first
    pointer = schema.pointer("ctr")
    redis_client.delete(pointer)
    redis_client.hset(pointer, "field", "value")  # WRONGTYPE on the pointer's GET: no published version
    assert cache.get("ctr", "bad") == 0.125 and cache.get_many("ctr", ["bad", "ad1"]) == [0.125, None]
    assert [cache.get_or_compute("ctr", "z", compute) for _ in range(3)] == [0.125] * 3 and calls == ["bad", "z"]
    redis_client.hset(schema.live("ctr", "hash"), "field", "value")  # a live key of another type
    assert [cache.get_or_compute("ctr", "hash", compute) for _ in range(3)] == [0.125] * 3
    assert calls == ["bad", "z", "hash"] and redis_client.type(schema.live("ctr", "hash")) == b"string"


@pytest.mark.parametrize("stored", [b"xx", b"\x00\x00\xc0\x7f"], ids=["garbage", "nan"])
def test_readers_waiting_on_a_lock_wait_past_a_corrupt_value(redis_url, redis_client, schema, stored):
    """Readers that found the recompute lock taken returned the first live value they polled: the corrupt one
    still there, which decoded to a miss, so each computed at once (8 computations for 8 readers, h_serve)."""
    redis_client.set(schema.live("ctr", "hot"), stored, ex=3600)
    cache = make_cache(redis_url, schema, recompute_lock_ms=5000, lock_poll_s=0.01)
    barrier, calls, got = threading.Barrier(8), [], []

    def compute(key: str) -> float:
        calls.append(key)
        time.sleep(0.3)
        return 0.25

    def read() -> None:
        barrier.wait()
        got.append(cache.get_or_compute("ctr", "hot", compute))

    threads = [threading.Thread(target=read) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert got == [0.25] * 8 and calls == ["hot"] and cache.lock_waits == 7


def test_a_stored_embedding_that_is_not_finite_is_a_corrupt_value(redis_url, redis_client, schema):
    """A float32 embedding with a NaN, which another writer stored, was returned as a vector that ranks nothing, and
    the reranker dropped it without a count (h_emb): a miss now, counted in ``errors``."""
    import numpy as np

    from precompute_assets.serving.keys import EMBEDDING_KIND
    from precompute_assets.serving.vectors import HEADER, HEADER_SIZE

    cache = make_cache(redis_url, schema)
    good = np.array([0.6, 0.8, 0.0], dtype="<f4")
    raw = bytearray(HEADER.pack(1, 2, 3, 1.0, 7) + good.tobytes())  # float32 layout (dtype code 2)
    redis_client.set(schema.live(EMBEDDING_KIND, "d1"), bytes(raw), ex=3600)
    assert np.allclose(cache.get_embedding("d1"), good) and cache.errors == 0
    raw[HEADER_SIZE : HEADER_SIZE + 4] = np.array([np.nan], dtype="<f4").tobytes()
    redis_client.set(schema.live(EMBEDDING_KIND, "d1"), bytes(raw), ex=3600)
    assert cache.get_embedding("d1") is None and cache.get_embeddings(["d1"]) == [None] and cache.errors == 2


def test_get_many_refuses_one_string_for_its_keys(redis_url, schema):
    """``get_many("ctr", "abc")`` looked up "a", "b" and "c" (h_serve)."""
    cache = make_cache(redis_url, schema)
    with pytest.raises(ValueError, match="keys must be a sequence of keys, not one str: 'abc'"):
        cache.get_many("ctr", "abc")


@pytest.mark.parametrize("stampede", [{}, {"xfetch_beta": 0, "recompute_lock_ms": 0}])
def test_a_value_the_server_refuses_fails_its_store_not_every_lookup(redis_server, schema, stampede):
    """A store that fails right after a lookup that worked (here a value over the server's ``proto-max-bulk-len``,
    which resets the connection; over a network, a value too big to send within ``socket_timeout``) once backed the
    whole client off: every lookup a miss for ``backoff_s``, again at each request of that key."""
    server = redis_server(extra_config=("proto-max-bulk-len 1mb",))
    cache = PredictionCache(connect(server.url, socket_timeout=5), schema=schema, backoff_s=3600, **stampede)
    assert cache.get_or_compute("rank", "small", lambda key: 1) == 1
    big = "x" * 2_000_000
    assert cache.get_or_compute("rank", "big", lambda key: big) == big and cache.errors == 1
    assert cache.get("rank", "small") == 1 and cache.get("rank", "big") is None
    assert cache.errors == 1 and cache.hits == 1


def test_a_connection_the_server_closes_after_a_protocol_error_is_not_used_again(redis_server, schema):
    """After its "Protocol error" reply to a value over ``proto-max-bulk-len`` the server closes the connection. If
    the close landed only after the next lookup was written on it (a busy machine), that lookup failed reading its
    reply and backed the client off: every lookup a miss for ``backoff_s`` (seen once in CI). The client now drops
    its idle connections on that reply, so no lookup is sent on one the server is closing."""
    server = redis_server(extra_config=("proto-max-bulk-len 1mb",))
    cache = PredictionCache(connect(server.url, socket_timeout=5), schema=schema, backoff_s=3600,
                            xfetch_beta=0, recompute_lock_ms=0)  # fmt: skip
    assert cache.get_or_compute("rank", "small", lambda key: 1) == 1
    big = "x" * 2_000_000
    assert cache.get_or_compute("rank", "big", lambda key: big) == big and cache.errors == 1
    pool = cache.client.connection_pool
    assert pool._available_connections and all(c._sock is None for c in pool._available_connections)
    assert cache.get("rank", "small") == 1 and cache.errors == 1


def test_a_hot_miss_is_computed_once_by_concurrent_readers(redis_url, schema):
    def run(**options) -> tuple[int, list]:
        caches = [make_cache(redis_url, schema, **options) for _ in range(8)]
        calls, results = [], []
        barrier = threading.Barrier(len(caches))

        def compute(key):
            calls.append(key)
            time.sleep(0.2)
            return 0.5

        def reader(cache):
            barrier.wait()
            results.append(cache.get_or_compute("ctr", key, compute))

        threads = [threading.Thread(target=reader, args=(cache,)) for cache in caches]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sum(c.lock_waits for c in caches) == (len(caches) - len(calls) if "xfetch_beta" not in options else 0)
        return len(calls), results

    key = "hot-locked"
    locked, results = run()
    assert locked == 1 and results == [0.5] * 8
    key = "hot-plain"
    plain, results = run(xfetch_beta=0, recompute_lock_ms=0)
    assert plain > 1 and results == [0.5] * 8  # the old read-through: every reader that missed computed


def test_the_wait_for_a_lock_holder_is_bounded(redis_url, redis_client, schema):
    from precompute_assets.serving.cache import recompute_lock_key

    cache = make_cache(redis_url, schema, recompute_lock_ms=150)
    redis_client.set(recompute_lock_key(schema, "ctr", "stuck"), b"1", px=60_000)  # a holder that died
    started = time.monotonic()
    assert cache.get_or_compute("ctr", "stuck", lambda key: 0.5) == 0.5
    assert time.monotonic() - started < 30  # bounded by recompute_lock_ms (a generous bound, not a speed check)
    assert cache.computes == 1 and cache.lock_waits == 0 and cache.get("ctr", "stuck") == 0.5
    # A holder whose compute raises lets the lock lapse at once, so the waiters compute without waiting it out.
    with pytest.raises(RuntimeError):
        cache.get_or_compute("ctr", "fails", lambda key: (_ for _ in ()).throw(RuntimeError("model down")))
    time.sleep(0.01)
    assert redis_client.get(recompute_lock_key(schema, "ctr", "fails")) is None
    assert cache.get_or_compute("ctr", "fails", lambda key: 0.75) == 0.75 and cache.errors == 0
    # So does one whose value the kind's codec refuses (the caller gets the codec's error): the lock once stayed
    # held for recompute_lock_ms, and every reader waiting on the key waited it out.
    with pytest.raises(TypeError):
        cache.get_or_compute("ctr", "unencodable", lambda key: object())
    time.sleep(0.01)
    assert redis_client.get(recompute_lock_key(schema, "ctr", "unencodable")) is None
    # A None of a float32 kind is no prediction: returned and never stored, as a JSON kind's, and the lock released.
    # The float32 codec once refused it, and the caller got a TypeError.
    for stampede in (cache, make_cache(redis_url, schema, xfetch_beta=0, recompute_lock_ms=0)):
        assert stampede.get_or_compute("ctr", "nothing", lambda key: None) is None
    time.sleep(0.01)  # the release leaves the lock to lapse within a millisecond (as above)
    assert redis_client.exists(schema.live("ctr", "nothing"), recompute_lock_key(schema, "ctr", "nothing")) == 0


def test_a_reader_without_the_new_permissions_falls_back_to_the_plain_read_through(redis_url, redis_client, schema):
    from precompute_assets.serving.acl import reader_rules

    name, password = f"{schema.namespace}-r", "p" * 24
    redis_client.execute_command("ACL", "SETUSER", name, "reset", "on", f">{password}", *reader_rules(schema.namespace))
    try:
        host, port = (
            redis_client.connection_pool.connection_kwargs["host"],
            redis_client.connection_pool.connection_kwargs["port"],
        )
        reader = connect(f"redis://{name}:{password}@{host}:{port}/0", socket_timeout=5)
        cache = PredictionCache(reader, schema=schema, pointer_ttl_s=0)
        assert [cache.get_or_compute("ctr", "a", lambda key: 0.5) for _ in range(3)] == [0.5] * 3
        assert cache.computes == 1 and cache.errors == 0
        granted = "+pttl" in reader_rules(schema.namespace)
        assert cache.refused == (0 if granted else 1)
        reader.close()
    finally:
        redis_client.execute_command("ACL", "DELUSER", name)


def test_xfetch_and_the_lock_on_redis_cluster(redis_cluster, schema):
    from precompute_assets.serving.cache import live_delta_key, recompute_lock_key

    client = connect(redis_cluster.url, socket_timeout=5)
    cache = PredictionCache(connect(redis_cluster.url, socket_timeout=5), schema=schema, pointer_ttl_s=0)
    cache._random.random = lambda: 0.5
    calls = []
    assert cache.get_or_compute("rank", "k", lambda key: calls.append(key) or len(calls)) == 1
    assert float(client.get(live_delta_key(schema, "rank", "k"))) >= 0  # another slot than the value: one round trip
    client.set(live_delta_key(schema, "rank", "k"), b"10.0")
    client.pexpire(schema.live("rank", "k"), 5000)
    time.sleep(0.01)  # the first computation's lock lapses 1 ms after its write (SET 0 PX 1 XX); until then it is held
    assert cache.get_or_compute("rank", "k", lambda key: calls.append(key) or len(calls)) == 2  # early
    assert cache.early_recomputes == 1 and client.pttl(schema.live("rank", "k")) > 3_000_000
    client.set(recompute_lock_key(schema, "rank", "m"), b"1", px=60_000)  # held by a reader that never writes
    other = PredictionCache(connect(redis_cluster.url, socket_timeout=5), schema=schema, recompute_lock_ms=100)
    assert other.get_or_compute("rank", "m", lambda key: 7) == 7 and other.computes == 1 and other.lock_waits == 0
    assert cache.errors == other.errors == 0
    for closing in (cache, other, client):
        closing.close()


def test_a_computation_slower_than_its_lock_never_releases_another_readers_lock(redis_url, redis_client, schema):
    """A computation that outlives ``recompute_lock_ms`` has lost its lock; when another reader then took it, the slow
    one's store once released that reader's lock too (``SET 0 PX 1 XX`` on whatever the key held), so a third reader
    computed as well. The release now compares the owner's token first; a reader with the ACL of ``reader_rules``
    can run it."""
    from precompute_assets.serving.acl import reader_rules
    from precompute_assets.serving.cache import recompute_lock_key

    lock = recompute_lock_key(schema, "ctr", "slow")
    name, password = f"{schema.namespace}-r", "p" * 24
    redis_client.execute_command("ACL", "SETUSER", name, "reset", "on", f">{password}", *reader_rules(schema.namespace))
    kwargs = redis_client.connection_pool.connection_kwargs
    url = f"redis://{name}:{password}@{kwargs['host']}:{kwargs['port']}/0"
    try:
        slow, other = make_cache(url, schema), make_cache(url, schema)
        taken = []

        def outlives_its_lock(key: str) -> float:
            redis_client.delete(lock)  # the lock's PX ran out while this computed (forced, not waited for)
            token, *_ = other._take_lock("ctr", key)  # another reader's miss takes it and starts computing
            assert isinstance(token, bytes)
            taken.append(redis_client.get(lock))
            return 0.5

        assert slow.get_or_compute("ctr", "slow", outlives_its_lock) == 0.5
        assert taken[0] not in (b"0", None) and redis_client.get(lock) == taken[0]  # still the other reader's
        assert redis_client.pttl(lock) > 0 and slow.errors == 0
        # The owner's release works under the reader's ACL: the lock lapses at once for the waiters.
        assert other.get_or_compute("ctr", "fresh", lambda key: 0.25) == 0.25
        assert redis_client.get(recompute_lock_key(schema, "ctr", "fresh")) in (b"0", None) and other.errors == 0
        for cache in (slow, other):
            cache.close()
    finally:
        redis_client.execute_command("ACL", "DELUSER", name)


@pytest.mark.parametrize("stampede", [{}, {"xfetch_beta": 0, "recompute_lock_ms": 0}, {"recompute_lock_ms": 0}])
def test_a_value_computed_before_an_invalidation_is_never_stored_after_it(redis_url, redis_client, schema, stampede):
    """A miss whose computation started before ``invalidate()`` of its key and stored after it once put the old value
    back for a whole live TTL (the invalidation found nothing to delete yet). The caller still gets the value; it is
    not stored, counted in ``invalidated``; the next miss computes from the new data and stores it."""
    from precompute_assets.serving.invalidate import invalidate
    from precompute_assets.serving.publish import delete_live_values

    cache = make_cache(redis_url, schema, **stampede)
    invalidations = {
        "key": lambda key: invalidate(redis_client, "ctr", key=key, schema=schema),
        "prefix": lambda key: invalidate(redis_client, "ctr", prefix=key[:2], schema=schema),
        "delete_live_values": lambda key: delete_live_values(redis_client, [("ctr", key)], schema=schema),
    }
    for number, (how, invalidation) in enumerate(invalidations.items(), start=1):
        key = f"ad-{how}"

        def computed_before(key: str, invalidation=invalidation) -> float:
            invalidation(key)  # the data changed and was invalidated while this computed from the old data
            return 0.25

        assert cache.get_or_compute("ctr", key, computed_before) == 0.25  # the caller still gets it
        assert redis_client.get(schema.live("ctr", key)) is None, how
        assert cache.invalidated == number and cache.errors == 0
        assert cache.get_or_compute("ctr", key, lambda key: 0.5) == 0.5  # computed after: stored
        assert cache.get("ctr", key) == 0.5


def test_an_early_recomputation_from_before_an_invalidation_never_replaces_a_newer_value(
    redis_url, redis_client, schema
):
    """``SET ... XX`` kept an early recomputation from bringing back a value an invalidation deleted, but not from
    overwriting the value another reader computed after the invalidation: the old data won for a whole live TTL."""
    from precompute_assets.serving.cache import live_delta_key
    from precompute_assets.serving.invalidate import invalidate

    early, other = make_cache(redis_url, schema, live_ttl_s=300), make_cache(redis_url, schema, xfetch_beta=0)
    early._random.random = lambda: 0.5
    assert early.get_or_compute("rank", "k", lambda key: {"v": "old"}) == {"v": "old"}
    redis_client.set(live_delta_key(schema, "rank", "k"), b"10.0")
    redis_client.pexpire(schema.live("rank", "k"), 5000)  # due at rand 0.5 (see above)
    time.sleep(0.01)  # the miss's released lock lapses

    def recomputed_from_old_data(key: str) -> dict:
        invalidate(redis_client, "rank", key=key, schema=schema)
        assert other.get_or_compute("rank", key, lambda key: {"v": "new"}) == {"v": "new"}  # stored: after it
        return {"v": "old, recomputed"}

    assert early.get_or_compute("rank", "k", recomputed_from_old_data) == {"v": "old, recomputed"}
    assert other.get("rank", "k") == {"v": "new"}
    assert early.early_recomputes == 1 and early.invalidated == 1


def test_a_reader_on_the_acl_before_the_scripts_says_so_once_and_keeps_serving(redis_url, redis_client, schema, caplog):
    """A reader whose ACL was made before the lock's release script and the invalidation-fenced store (no ``+eval`` on
    ``lock:`` keys, no selector with the epoch) keeps computing and storing, its first refused store included (sent
    again as a plain ``SET``); each refusal is one warning and one count in ``refused``, not an error per lookup."""
    from precompute_assets.serving.acl import reader_rules

    rules = [rule for rule in reader_rules(schema.namespace) if ":epoch" not in rule]
    rules = [rule.replace(" +set +eval)", " +set)") if ":lock:" in rule else rule for rule in rules]
    name, password = f"{schema.namespace}-old", "p" * 24
    redis_client.execute_command("ACL", "SETUSER", name, "reset", "on", f">{password}", *rules)
    kwargs = redis_client.connection_pool.connection_kwargs
    try:
        cache = make_cache(f"redis://{name}:{password}@{kwargs['host']}:{kwargs['port']}/0", schema)
        with caplog.at_level(logging.WARNING, logger="precompute_assets.serving.cache"):
            assert [cache.get_or_compute("ctr", key, lambda key: 0.5) for key in ("a", "b", "c")] == [0.5] * 3
            assert cache.get_or_compute("ctr", "a", lambda key: 0.9) == 0.5  # the first, refused store, sent again
            assert cache.get_or_compute("ctr", "c", lambda key: 0.9) == 0.5  # stored, with a plain SET
            with pytest.raises(RuntimeError):
                cache.get_or_compute("ctr", "d", lambda key: (_ for _ in ()).throw(RuntimeError("model down")))
        warnings = [record.getMessage() for record in caplog.records if "may not EVAL" in record.getMessage()]
        assert len(warnings) == 2 and cache.refused == 2, warnings  # the store script and the lock's release
        assert cache.errors == 0
        cache.close()
    finally:
        redis_client.execute_command("ACL", "DELUSER", name)


def test_a_reader_limited_to_some_kinds_keeps_the_fence_on_its_own(redis_url, redis_client, schema, caplog):
    """A reader made with ``--kinds ctr`` that looks up another kind is refused that kind's store script: the fence
    is turned off for that kind only, not for ``ctr``, whose value computed before an invalidation is still not
    stored after it."""
    from precompute_assets.serving.acl import reader_rules
    from precompute_assets.serving.invalidate import invalidate

    name, password = f"{schema.namespace}-ctronly", "p" * 24
    rules = reader_rules(schema.namespace, kinds=["ctr"])
    redis_client.execute_command("ACL", "SETUSER", name, "reset", "on", f">{password}", *rules)
    kwargs = redis_client.connection_pool.connection_kwargs
    try:
        cache = make_cache(f"redis://{name}:{password}@{kwargs['host']}:{kwargs['port']}/0", schema)
        with caplog.at_level(logging.WARNING, logger="precompute_assets.serving.cache"):
            assert cache.get_or_compute("score", "s1", lambda key: 1.0) == 1.0  # served; not its kind to store
        assert redis_client.get(schema.live("score", "s1")) is None and cache.errors == 1
        assert any("score:live" in record.getMessage() for record in caplog.records)

        def computed_before(key: str) -> float:
            invalidate(redis_client, "ctr", key=key, schema=schema)
            return 0.25

        assert cache.get_or_compute("ctr", "ad1", computed_before) == 0.25
        assert redis_client.get(schema.live("ctr", "ad1")) is None and cache.invalidated == 1
        assert cache.get_or_compute("ctr", "ad1", lambda key: 0.5) == 0.5
        assert redis_client.get(schema.live("ctr", "ad1")) is not None
        cache.close()
    finally:
        redis_client.execute_command("ACL", "DELUSER", name)


def test_a_batch_of_many_keys_is_sent_in_chunks_within_the_socket_timeout(redis_url, redis_client, schema):
    """A get_many of 200,000 published keys was one write that outlasted the default 50 ms socket timeout while
    Redis worked through it: every key a miss, logged as such, and the whole client backing off (h_sec). It is sent
    ``PIPELINE_CHUNK`` commands at a time, each chunk's replies read before the next is written."""
    keys = [f"k{i}" for i in range(250_000)]
    publish_version(redis_client, "ctr", "v1", [(k, 0.5) for k in keys], n_keys=len(keys), schema=schema)
    cache = PredictionCache.from_url(redis_url, schema=schema, pointer_ttl_s=0)  # socket_timeout: the default
    try:
        assert cache.get_many("ctr", keys) == [0.5] * len(keys) and cache.errors == 0
        assert cache.get("ctr", "k2") == 0.5
    finally:
        cache.close()


def test_a_store_whose_write_timed_out_is_called_unconfirmed_not_lost():
    """A 20 MB value outlasting a 50 ms socket timeout was stored all the same, while the warning said "a computed
    value was not stored" (h_sec): a timed-out write may land, a refused or cut-off one did not."""
    import redis

    assert cache_module._store_failure(redis.TimeoutError("Timeout reading from socket")) == (
        "a computed value's store was not confirmed (it may have been stored all the same)"
    )
    for lost in (redis.TimeoutError("Timeout writing to socket"), redis.ConnectionError("Connection reset by peer")):
        assert cache_module._store_failure(lost) == "a computed value was not stored"  # cut off mid-value


def test_a_miss_returns_the_value_as_a_hit_reads_it(redis_url, redis_client, schema):
    """A service got another type on a key's first request than on the next ones (h_serve2): an embedding's encoded
    bytes and then a vector, a tuple and then a list, a dict's int keys and then strings, a float32 kind's str and
    then a float."""
    import numpy as np

    from precompute_assets.serving.vectors import encode_vector

    vector = np.array([0.6, 0.8], dtype=np.float32)
    cases = [
        ("doc_embedding", lambda key: encode_vector(vector, dtype="float32", model_version="m1")),
        ("rank", lambda key: (1, 2)),
        ("rank", lambda key: {1: "a"}),
        ("ctr", lambda key: "0.5"),
    ]
    for i, (kind, compute) in enumerate(cases):
        for cache in (make_cache(redis_url, schema), make_cache(redis_url, schema, xfetch_beta=0, recompute_lock_ms=0)):
            key = f"k{i}-{cache.recompute_lock_ms}"
            missed, hit = cache.get_or_compute(kind, key, compute), cache.get_or_compute(kind, key, compute)
            assert cache.computes == 1 and type(missed) is type(hit), (kind, missed, hit)
            if kind == "doc_embedding":
                assert np.array_equal(missed, hit) and np.allclose(missed, vector)
            else:
                assert missed == hit
    # a value that is not stored is returned as computed: None, and a logit of a probability kind
    cache = make_cache(redis_url, schema)
    assert cache.get_or_compute("ctr", "none", lambda key: None) is None
    assert cache.get_or_compute("ctr", "logit", lambda key: 2.5) == 2.5


def test_a_value_stored_just_before_this_reader_took_the_lock_is_served_not_computed(redis_url, redis_client, schema):
    """The holder stored its value and released its lock between this reader's lookup (a miss) and its lock: the
    reader took the lock and computed again, so a stampede on a fast compute computed it twice (h_serve2)."""
    from precompute_assets.serving.cache import recompute_lock_key

    other = make_cache(redis_url, schema)
    cache = make_cache(redis_url, schema)
    lookup = cache._lookup_admitting

    def lookup_then_the_holder_finishes(*args, **kwargs):
        found = lookup(*args, **kwargs)
        other.get_or_compute("ctr", "cold", lambda key: 0.25)  # another reader computes and stores meanwhile
        time.sleep(0.01)  # and its released lock has lapsed
        return found

    cache._lookup_admitting = lookup_then_the_holder_finishes
    calls = []
    assert cache.get_or_compute("ctr", "cold", lambda key: calls.append(key) or 0.75) == pytest.approx(0.25)
    assert calls == [] and cache.computes == 0 and cache.lock_waits == 1 and other.computes == 1
    time.sleep(0.01)  # the lock this reader took is released (it lapses within a millisecond)
    assert redis_client.exists(recompute_lock_key(schema, "ctr", "cold")) == 0
