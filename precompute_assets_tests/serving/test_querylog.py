"""Query logging: decorator, context manager, simulated clocks, and what the validator rejects."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import threading
import time
import weakref
from collections import Counter

import fakeredis
import pytest

from precompute_assets.serving import KeySchema, QueryLogger, connect, log_prediction_query, query_logger, querylog
from precompute_assets.serving.events import read_event_window, read_events_after
from precompute_assets.serving.querylog import (
    ENTRY_EVENTS,
    READ_PAGE,
    expand_entries,
    quarantine_row,
    read_stream_window,
    validate_entry,
)
from precompute_assets_tests.factories import (
    LOG_EVERY_COMMAND,
    child_exit_code,
    commands_run,
    log_client,
    logged_queries,
)


def test_decorator_logs_each_call_as_a_live_miss(redis_url, redis_client, schema):
    logger = QueryLogger(log_client(redis_url), schema)

    @log_prediction_query("ctr", logger)
    def predict(ad_id: str, *, user: str | None = None) -> float:
        return 0.5

    assert predict("ad1", user="u1") == 0.5
    assert predict("ad2") == 0.5
    logger.close()
    events = [fields for _, fields in logged_queries(redis_client, schema)]
    assert [(e[b"key"], e[b"hit"], e.get(b"user")) for e in events] == [
        (b"ad1", b"0", b"u1"),
        (b"ad2", b"0", None),
    ]


def test_decorator_finds_the_key_by_position_or_by_name(redis_url, redis_client, schema):
    """However the key is passed, the call is logged with it; the wrapper once raised KeyError or IndexError (and
    never called the function) when the key came by position for a named ``key_arg``, or by name for a position."""
    logger = QueryLogger(log_client(redis_url), schema)

    @log_prediction_query("ctr", logger, key_arg="ad_id")
    def by_name(model: str, ad_id: str) -> float:
        return 0.5

    @log_prediction_query("ctr", logger)
    def by_position(ad_id: str) -> float:
        return 0.25

    assert by_name("m", "ad1") == 0.5 and by_name("m", ad_id="ad2") == 0.5
    assert by_position("ad3") == 0.25 and by_position(ad_id="ad4") == 0.25
    with pytest.raises(TypeError):  # the function's own error, not the logger's
        by_position()
    logger.close()
    assert [fields[b"key"] for _, fields in logged_queries(redis_client, schema)] == [b"ad1", b"ad2", b"ad3", b"ad4"]


def test_decorator_given_the_cache_logs_each_call_under_the_served_version_and_its_arm(redis_url, redis_client, schema):
    """A service that logs its live predictions with the decorator had those misses outside the A/B report: they
    carried no arm (h_ab2). Given the cache, each call names the version the cache sees and the key's arm in it."""
    from precompute_assets.serving import Experiment, PredictionCache, publish_version

    logger = QueryLogger(log_client(redis_url), schema)
    cache = PredictionCache(connect(redis_url, socket_timeout=5), schema=schema, logger=logger, pointer_ttl_s=0)

    @log_prediction_query("ctr", logger, cache=cache)
    def predict(ad_id: str) -> float:
        return 0.5

    predict("before")  # nothing published yet: no version, no arm
    experiment = Experiment("e1", "salt", ("frequency", "lstm"))
    publish_version(redis_client, "ctr", "v1", [("a", 0.1)], n_keys=1, schema=schema, experiment=experiment)
    keys = [f"ad{i}" for i in range(20)]
    for key in keys:
        predict(key)
    publish_version(redis_client, "ctr", "v2", [("a", 0.2)], n_keys=1, schema=schema)  # the experiment ends
    predict("after")
    logger.close()
    cache.close()
    logged = [(f[b"key"].decode(), f.get(b"arm"), f.get(b"ver")) for _, f in logged_queries(redis_client, schema)]
    assert logged == [
        ("before", None, None),
        *((key, experiment.arm(key).encode(), b"v1") for key in keys),
        ("after", None, b"v2"),
    ]
    assert {arm for _, arm, _ in logged[1:-1]} == {b"frequency", b"lstm"}  # both arms, so the arm is not a constant


def test_context_manager_logs_even_when_the_block_raises(redis_url, redis_client, schema):
    logger = QueryLogger(log_client(redis_url), schema)
    with query_logger(logger, "ctr", "ad1", tenant="t1") as record:
        record.hit = True
    with pytest.raises(RuntimeError), query_logger(logger, "ctr", "ad2"):
        raise RuntimeError("model crashed")
    logger.close()
    events = [fields for _, fields in logged_queries(redis_client, schema)]
    assert [(e[b"key"], e[b"hit"]) for e in events] == [(b"ad1", b"1"), (b"ad2", b"0")]
    assert events[0][b"tenant"] == b"t1"


def test_queries_buffered_past_the_hour_a_drain_accepts_are_dropped_and_counted(redis_url, redis_client, schema):
    """Through a Redis outage of over an hour the buffer held its oldest queries, counted `written` once sent, and the
    drain then quarantined every one ("ts more than an hour before its arrival"). They are dropped, as stale."""
    from precompute_assets.serving.querylog import STALE_MS

    logger = QueryLogger(log_client(redis_url), schema, flush_interval_s=60)
    now = [time.time_ns() // 1_000_000]
    logger.clock = lambda: now[0]  # Redis still stamps the entries (no simulated IDs): the real clock's case
    logger.log("ctr", "before", hit=True)
    now[0] += STALE_MS + 1
    logger.log("ctr", "after", hit=False)
    logger.close()
    assert [f[b"key"] for _, f in expand_entries(logged_queries(redis_client, schema))] == [b"after"]
    stats = logger.stats
    assert (stats.logged, stats.written, stats.dropped_stale, stats.dropped) == (2, 1, 1, 1)


def test_simulated_clock_writes_ids_at_event_time(redis_url, redis_client, schema):
    now = [1_790_000_000_000]
    logger = QueryLogger(log_client(redis_url), schema, clock=lambda: now[0], flush_interval_s=60)
    for _ in range(3):
        logger.log("ctr", "a", hit=True)
    now[0] += 999  # the same entry: within a second of its first query
    logger.log("ctr", "a2", hit=True)
    now[0] += 1  # a second after it: an entry of its own
    logger.log("ctr", "a3", hit=True)
    now[0] += 3_600_000
    logger.log("ctr", "b", hit=False)
    logger.close()
    first_hour = [e for page in read_stream_window(redis_client, schema, 1_790_000_000_000, now[0]) for e in page]
    assert [i for i, _ in first_hour] == [b"1790000000000-0", b"1790000001000-0"]
    assert [i for i, _ in expand_entries(first_hour)] == [b"1790000000000-0/0", b"1790000000000-0/1",
                                                         b"1790000000000-0/2", b"1790000000000-0/3",
                                                         b"1790000001000-0/0"]  # fmt: skip
    later = [e for page in read_stream_window(redis_client, schema, now[0], now[0] + 1) for e in page]
    assert [f[b"key"] for _, f in expand_entries(later)] == [b"b"]


def test_read_stream_window_pages_through_everything(redis_url, redis_client, schema):
    logger = QueryLogger(log_client(redis_url), schema, clock=lambda: 1_790_000_000_000, flush_interval_s=60)
    for i in range(2500):
        logger.log("ctr", f"k{i}", hit=True)
    logger.close()
    pages = list(read_stream_window(redis_client, schema, 1_790_000_000_000, 1_790_000_000_001, page=15))
    # Entries of at least ENTRY_EVENTS queries, except the last of a flush: how many depends on when the logger's
    # thread flushed (40 or 41 seen), so the stream's own count is the one paged through.
    entries = redis_client.xlen(schema.query_log())
    assert entries >= -(-2500 // ENTRY_EVENTS)
    assert [len(p) for p in pages] == [15] * (entries // 15) + ([entries % 15] if entries % 15 else [])
    queries = [query for page in pages for query in expand_entries(page)]
    assert [f[b"key"] for _, f in queries] == [f"k{i}".encode() for i in range(2500)]
    assert len({i for i, _ in queries}) == 2500


def test_a_flush_writes_an_entry_per_entry_events_queries(redis_url, redis_client, schema):
    logger = QueryLogger(log_client(redis_url), schema, flush_interval_s=60)
    n = 2 * ENTRY_EVENTS + 3
    for i in range(n - 5):
        logger.log("ctr", f"k{i}", hit=i % 2 == 0, version="v1")
    logger.log_many("ctr", [f"m{i}" for i in range(5)], [True, False, True, True, True], arms=["a", "b", "a", "a", "b"])
    logger.close()
    entries = redis_client.xrange(schema.query_log())
    # An entry closes once it holds ENTRY_EVENTS queries; a group (one call's keys) is never split.
    assert [int(fields[b"n"]) for _, fields in entries] == [ENTRY_EVENTS, ENTRY_EVENTS + 3]
    assert all(fields[b"cols"] == b"ts,kind,keys,hits,lat_us,user,tenant,arms,ver" for _, fields in entries)
    groups = json.loads(entries[-1][1][b"groups"])
    assert groups[-2][1:] == ["ctr", [f"k{n - 6}"], "0", 0, None, None, None, "v1"]  # a get: a group of one key
    arms = ["a", "b", "a", "a", "b"]
    assert groups[-1][1:] == ["ctr", [f"m{i}" for i in range(5)], "10111", 0, None, None, arms, None]
    assert redis_client.hgetall(schema.stats("ctr")) == {b"hit": b"%d" % (len(range(0, n - 5, 2)) + 4),
                                                         b"miss": b"%d" % (len(range(1, n - 5, 2)) + 1)}  # fmt: skip


GROUPS = [[1000, "ctr", ["ad1"], "1", 5, None, None, None, None], [1001, "ctr", ["ad2", "ad3"], "01", 6, "u1", None,
          ["lstm", "frequency"], "v1"]]  # fmt: skip
COLS = b"ts,kind,keys,hits,lat_us,user,tenant,arms,ver"


def batch(groups, cols: bytes = COLS, n: int | None = None) -> dict[bytes, bytes]:
    n = sum(len(g[2]) if isinstance(g, list) and len(g) == 9 and isinstance(g[2], list) else 1 for g in groups) \
        if n is None else n  # fmt: skip
    return {b"n": b"%d" % max(n, 1), b"cols": cols, b"groups": json.dumps(groups).encode()}


def test_expand_entries_reads_batches_and_the_one_query_form():
    queries = list(expand_entries([(b"1000-0", batch(GROUPS)), (b"1001-0", dict(GOOD))]))
    assert [i for i, _ in queries] == [b"1000-0/0", b"1000-0/1", b"1000-0/2", b"1001-0"]
    assert queries[0][1] == {b"ts": b"1000", b"kind": b"ctr", b"key": b"ad1", b"hit": b"1", b"lat_us": b"5"}
    rows = [validate_entry(i, f) for i, f in queries]
    assert all(reason is None for _, reason in rows)
    assert [(row["key"], row["hit"], row["arm"], row["user"], row["version"]) for row, _ in rows[1:3]] == [
        ("ad2", False, "lstm", "u1", "v1"), ("ad3", True, "frequency", "u1", "v1")]  # fmt: skip
    assert rows[2][0]["stream_id"] == "1000-0/2"


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({b"n": b"1", b"cols": COLS, b"groups": b"[[1000,"}, "unreadable batch entry"),
        ({b"n": b"1", b"cols": COLS, b"groups": b"\xff"}, "unreadable batch entry"),
        ({b"n": b"1", b"cols": COLS, b"groups": b'{"a": 1}'}, "not an array"),
        ({b"n": b"1", b"cols": b"\xffts", b"groups": b"[]"}, "unreadable batch entry"),
        ({b"n": b"1", b"cols": b"ts,kind,key,hit", b"groups": b"[]"}, "unknown cols"),
    ],
)
def test_an_unreadable_batch_entry_is_quarantined_once(fields, reason):
    ((event_id, event),) = expand_entries([(b"1000-0", fields)])
    row, why = validate_entry(event_id, event)
    assert row is None and reason in why
    assert "_error" not in quarantine_row(event_id, event, why)["raw"]  # the raw entry, as it was


def test_an_entry_with_fields_named_as_the_expansions_markers_is_quarantined_as_one_query():
    """An entry of another producer with a _queries field of text failed every drain of its hour (int() of it), and a
    numeric one counted as many quarantined queries (h_qlog)."""
    from precompute_assets.serving.querylog import queries_of

    for fields in (
        {b"ts": b"1000", b"kind": b"ctr", b"key": b"x", b"lat_us": b"1", b"_queries": b"many"},
        {b"ts": b"1000", b"kind": b"ctr", b"key": b"x", b"lat_us": b"1", b"hit": b"1", b"_queries": b"500"},
        {b"ts": b"1000", b"kind": b"ctr", b"key": b"x", b"lat_us": b"1", b"hit": b"1", b"_error": b"mine"},
        {b"n": b"3", b"cols": COLS, b"groups": b"[]", b"_queries": b"9"},
    ):
        ((event_id, event),) = expand_entries([(b"1000-0", fields)])
        row, why = validate_entry(event_id, event)
        assert row is None and "which no query logger writes" in why
        assert queries_of(event) == (3 if b"n" in fields else 1)  # a batch stands for its n (h_diff13)
        assert any(name.startswith(b"written:_") for name in event)  # what the producer wrote, kept


def test_a_batch_whose_count_does_not_match_is_flagged():
    queries = list(expand_entries([(b"1000-0", batch(GROUPS, n=5))]))  # holds 3
    assert [i for i, _ in queries] == [b"1000-0/0", b"1000-0/1", b"1000-0/2", b"1000-0/n"]
    assert all(validate_entry(i, f)[1] is None for i, f in queries[:3])
    assert "holds 3 queries, its n says b'5'" in validate_entry(*queries[3])[1]
    empty_keys = b'[[1000, "ctr", [], "", 5, null, null, null, null]]'
    for fields in ({b"cols": COLS, b"groups": b"[]"}, {b"n": b"1", b"cols": COLS, b"groups": b"[]"},
                   {b"n": b"1", b"cols": COLS, b"groups": empty_keys}):  # fmt: skip
        ((event_id, event),) = expand_entries([(b"1000-0", fields)])  # no query, and no count saying so
        assert "holds 0 queries" in validate_entry(event_id, event)[1]


def test_a_rejected_batch_stands_for_all_of_its_queries():
    """A batch entry rejected whole was one quarantined row whatever its n: 64 queries lost counted as 1, so
    query_logs' quarantine_rate understated the loss 64 times (found by review)."""
    from precompute_assets.serving.querylog import queries_of

    ((event_id, event),) = expand_entries([(b"1000-0", {b"n": b"64", b"cols": COLS, b"groups": b"[[1000,"})])
    assert queries_of(event) == 64 and "_queries" not in quarantine_row(event_id, event, "x")["raw"]
    bad_group = [1000, "ctr", [f"ad{i}" for i in range(10)], "1", 5, None, None, None, None]  # hits too short
    queries = list(expand_entries([(b"1000-0", batch([GROUPS[0], bad_group], n=11))]))
    assert [queries_of(fields) for _, fields in queries] == [1, 10]  # the good query, the group of 10: no n row
    held = list(expand_entries([(b"1000-0", batch(GROUPS, n=5))]))  # holds 3, says 5: 2 missing
    assert [queries_of(fields) for _, fields in held] == [1, 1, 1, 2]
    ((_, nothing),) = expand_entries([(b"1000-0", {b"cols": COLS, b"groups": b"[]"})])
    assert queries_of(nothing) == 0  # no count, and no query: none lost


def test_expand_entries_never_raises_on_deep_nesting():
    for raw in (b"[" * 100_000, b"[" * 5000 + b"]" * 5000):
        ((_, event),) = expand_entries([(b"1000-0", {b"n": b"1", b"cols": COLS, b"groups": raw})])
        assert validate_entry(b"1000-0", event)[0] is None


@pytest.mark.parametrize(
    ("group", "reason"),
    [
        ([1000, "ctr", ["ad1"], "1", 5], "not an array of 9 values"),
        ("ad1", "not an array of 9 values"),
        ([1000, "ctr", "ad1", "1", 5, None, None, None, None], "of one length"),
        ([1000, "ctr", ["ad1"], "10", 5, None, None, None, None], "of one length"),
        ([1000, "ctr", ["ad1"], [1], 5, None, None, None, None], "of one length"),
        ([1000, "ctr", ["ad1"], "1", 5, None, None, ["a", "b"], None], "of one length"),
        ([1000, "ctr", ["ad1"], "1", True, None, None, None, None], "lat_us is a JSON bool"),
        ([1000.5, "ctr", ["ad1"], "1", 5, None, None, None, None], "ts is a JSON float"),
        ([1000, "ctr", [["ad1"]], "1", 5, None, None, None, None], "key is a JSON list"),
        ([1000, "ctr", ["\ud800"], "1", 5, None, None, None, None], "key is not valid UTF-8"),
        ([1000, "ctr", ["ad\n1"], "1", 5, None, None, None, None], "key contains control characters"),
        ([1000, "ctr", ["ad1"], "2", 5, None, None, None, None], "hit must be 0 or 1"),
        ([1000, "ctr", ["ad1"], "\u00e9", 5, None, None, None, None], "hit must be 0 or 1"),
        ([1000, "ctr", ["ad1"], "1", 5, None, None, ["LSTM"], None], "invalid arm"),
    ],
)
def test_a_malformed_group_of_a_batch_is_quarantined_alone(group, reason):
    queries = list(expand_entries([(b"1000-0", batch([GROUPS[0], group, GROUPS[1]]))]))
    checked = [validate_entry(i, f) for i, f in queries]
    assert [r is not None for r, _ in checked] == [True, False, True, True]
    assert reason in checked[1][1]


GOOD = {b"ts": b"1000", b"kind": b"ctr", b"key": b"ad1", b"hit": b"1", b"lat_us": b"55"}


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({b"kind": None}, "missing field kind"),
        ({b"key": None}, "missing field key"),
        ({b"hit": None}, "missing field hit"),
        ({b"ts": None}, "missing field ts"),
        ({b"ts": b"yesterday"}, "ts is not an integer"),
        ({b"ts": b"-5000000"}, "more than an hour"),
        ({b"ts": b"99999999999"}, "after its arrival (a clock ahead)"),
        ({b"lat_us": b"fast"}, "lat_us is not an integer"),
        ({b"lat_us": b"-3"}, "negative lat_us"),
        ({b"lat_us": b"18446744073709551615"}, "lat_us out of range"),  # a writer's unsigned underflow
        ({b"lat_us": b"9223372036854775808"}, "lat_us out of range"),
        ({b"hit": b"yes"}, "hit must be 0 or 1"),
        ({b"kind": b"CTR!"}, "invalid kind"),
        ({b"key": b""}, "empty key"),
        ({b"key": b"x" * 257}, "key longer than 256"),
        ({b"key": b"ad\n1"}, "key contains control characters"),
        ({b"key": b"\xff\xfe"}, "key is not valid UTF-8"),
        ({b"user": b"u\x00"}, "user contains control characters"),
        ({b"arm": b""}, "invalid arm: ''"),
        ({b"arm": b"LSTM"}, "invalid arm: 'LSTM'"),
        ({b"arm": b"freq uency"}, "invalid arm"),
        ({b"arm": b"a" * 65}, "invalid arm"),
        ({b"arm": b"a" * 300}, "arm longer than 256"),
        ({b"arm": b"lstm\n"}, "arm contains control characters"),
        ({b"arm": b"\xffx"}, "arm is not valid UTF-8"),
        ({b"ver": b"v:1"}, "invalid ver: 'v:1'"),
        ({b"ver": b""}, "invalid ver: ''"),
        ({b"ver": b"v\x00"}, "ver contains control characters"),
    ],
)
def test_validator_rejects_each_malformed_kind(change, reason):
    fields = {**GOOD, **change}
    fields = {k: v for k, v in fields.items() if v is not None}
    row, why = validate_entry(b"1000-0", fields)
    assert row is None
    assert reason in why


def test_validator_accepts_a_good_event():
    row, why = validate_entry(b"1000-3", GOOD)
    assert why is None
    assert row == {
        "stream_id": "1000-3",
        "ts_ms": 1000,
        "kind": "ctr",
        "key": "ad1",
        "hit": True,
        "latency_us": 55,
        "user": None,
        "tenant": None,
        "arm": None,
        "version": None,
    }


def test_validator_keeps_a_valid_arm_and_version():
    row, why = validate_entry(b"1000-3", {**GOOD, b"arm": b"lstm", b"ver": b"2026-11-20.a1"})
    assert why is None and row["arm"] == "lstm" and row["version"] == "2026-11-20.a1"


def test_the_logger_writes_the_arm_only_when_given(redis_url, redis_client, schema):
    logger = QueryLogger(log_client(redis_url), schema)
    logger.log("ctr", "ad1", hit=True, arm="frequency")
    logger.log("ctr", "ad2", hit=False)
    with query_logger(logger, "ctr", "ad3", arm="lstm", version="2026-11-20.a1"):
        pass
    logger.close()
    events = [fields for _, fields in logged_queries(redis_client, schema)]
    assert [e.get(b"arm") for e in events] == [b"frequency", None, b"lstm"]
    # the block's version too: selection_experiment credits an arm's row by it (it left out one without, h_ab2)
    assert [e.get(b"ver") for e in events] == [None, None, b"2026-11-20.a1"]


def test_counts_are_exact_when_threads_share_a_logger(redis_url, redis_client, schema):
    import threading

    # A buffer smaller than what the threads log: some events are dropped, and each is counted once.
    logger = QueryLogger(log_client(redis_url), schema, max_buffer=3000)
    per_thread, threads = 5000, 8
    workers = [
        threading.Thread(target=lambda: [logger.log("ctr", f"ad{i}", hit=True) for i in range(per_thread)])
        for _ in range(threads)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    logger.close()
    stats = logger.stats
    assert stats.logged == per_thread * threads
    assert stats.written + stats.dropped == stats.logged  # every event is accounted for
    assert len(logged_queries(redis_client, schema)) == stats.written


def test_queries_logged_after_close_are_counted_as_dropped(redis_url, redis_client, schema):
    """Lookups still finishing during a graceful shutdown log after close(): those queries stayed in the buffer,
    neither sent nor counted, so written + dropped fell short of logged."""
    logger = QueryLogger(log_client(redis_url), schema)
    logger.log("ctr", "before", hit=True)
    logger.close()
    logger.log("ctr", "after", hit=False)
    logger.log_many("ctr", ["a", "b"], [True, False])
    stats = logger.stats
    assert (stats.logged, stats.written, stats.dropped_closed, stats.dropped) == (4, 1, 3, 3)
    assert logger.pending == 0
    assert [fields[b"key"] for _, fields in logged_queries(redis_client, schema)] == [b"before"]


def test_a_batch_with_an_error_reply_is_counted_and_the_connection_stays_usable(redis_url, redis_client, schema):
    """A simulated clock behind the stream's last ID makes Redis refuse those XADDs: the batch is counted as
    dropped (not retried), and once the backoff passes the next batch goes through the same pool intact."""
    redis_client.xadd(schema.query_log(), {"ts": "0"}, id="1790000000100-0")
    now = [1_790_000_000_000]
    logger = QueryLogger(log_client(redis_url), schema, clock=lambda: now[0], backoff_s=0.01, batch_size=40)
    for i in range(25):  # one refused XADD, then the HINCRBYs: the error reply is not the last one read
        logger.log("ctr", f"k{i}", hit=i % 2 == 0)
    logger.flush()
    assert logger.stats.flush_errors == 1 and logger.stats.dropped_write_failed == 25 and logger.stats.written == 0
    now[0] = 1_790_000_000_200  # after the existing entry: accepted
    time.sleep(0.02)
    for i in range(30):
        logger.log("ctr", f"later{i}", hit=True)
    logger.close()
    assert logger.stats.written == 30
    keys = [fields[b"key"] for _, fields in logged_queries(redis_client, schema, min="1790000000101")]
    assert keys == [f"later{i}".encode() for i in range(30)]
    # The stats count the lookups of every batch Redis received, the refused batch's 13 hits included.
    assert redis_client.hget(schema.stats("ctr"), "hit") == b"43"


def test_log_many_queues_one_event_per_key_and_counts_what_does_not_fit(redis_url, redis_client, schema):
    logger = QueryLogger(log_client(redis_url), schema, max_buffer=3, flush_interval_s=60)
    logger.log_many("ctr", ["a", "b", "c", "d", "e"], [True, False, True, True, False], latency_us=7, user="u1",
                    arms=["x", "y", None, "x", "y"])  # fmt: skip
    assert logger.stats.logged == 5 and logger.stats.dropped_buffer_full == 2 and logger.pending == 3
    logger.close()
    events = [fields for _, fields in logged_queries(redis_client, schema)]
    assert [(e[b"key"], e[b"hit"], e[b"lat_us"], e.get(b"arm")) for e in events] == [
        (b"a", b"1", b"7", b"x"), (b"b", b"0", b"7", b"y"), (b"c", b"1", b"7", None),
    ]  # fmt: skip
    assert len({e[b"ts"] for e in events}) == 1 and all(e[b"user"] == b"u1" for e in events)


def test_pack_resp_is_the_wire_format_redis_py_sends(redis_client):
    from precompute_assets.serving.connection import pack_resp

    commands = [(b"XADD", b"s", b"MAXLEN", b"~", b"10", b"*", b"key", "caf\u00e9 \r\n".encode()), (b"PING",),
                ("HMGET", "b\u00e9", "f"), ("SET", "k", 1.5, "PX", 10, "NX")]  # fmt: skip
    connection = redis_client.connection_pool.get_connection()
    try:
        assert pack_resp(commands) == b"".join(connection.pack_commands(commands))
    finally:
        redis_client.connection_pool.release(connection)
    assert pack_resp([]) == b""


def test_a_backlog_is_drained_in_order_with_every_reply_read(redis_url, redis_client, schema):
    # One batch of many entries (and a partial one): nothing lost or reordered, the stats counted once.
    logger = QueryLogger(log_client(redis_url), schema, max_buffer=4000, batch_size=10**6, flush_interval_s=60)
    n = 3005
    for i in range(n):
        logger.log("ctr", f"k{i}", hit=i % 3 == 0)
    logger.close()
    assert logger.stats.written == n and logger.stats.dropped == 0 and logger.stats.flush_errors == 0
    keys = [fields[b"key"] for _, fields in logged_queries(redis_client, schema)]
    assert keys == [f"k{i}".encode() for i in range(n)]
    assert int(redis_client.hget(schema.stats("ctr"), "hit")) == len(range(0, n, 3))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_TIMERSLACK) is Linux's")
def test_the_flushing_thread_alone_gets_a_fine_timer_slack():
    import ctypes
    import threading

    from precompute_assets.serving.querylog import fine_timer_slack

    prctl = ctypes.CDLL(None).prctl
    before, seen = prctl(30, 0, 0, 0, 0), []  # PR_GET_TIMERSLACK
    worker = threading.Thread(target=lambda: seen.append((fine_timer_slack(), prctl(30, 0, 0, 0, 0))))
    worker.start()
    worker.join()
    assert seen == [(True, 1)] and prctl(30, 0, 0, 0, 0) == before  # the caller's thread keeps its own


def _wait_for(condition, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_a_full_entry_is_sent_by_the_callers_thread(redis_url, redis_client, schema):
    """With the flushing thread asleep for a minute, the lookup that fills an entry sends it itself."""
    logger = QueryLogger(log_client(redis_url), schema, flush_interval_s=60)
    assert _wait_for(lambda: logger._connection is not None)  # the thread connects at once
    for i in range(ENTRY_EVENTS - 1):
        logger.log("ctr", f"k{i}", hit=True)
    assert logger.pending == ENTRY_EVENTS - 1  # not a full entry: it waits for the thread
    logger.log("ctr", "last", hit=False)
    assert logger.pending == 0  # sent before log() returned
    assert _wait_for(lambda: redis_client.xlen(schema.query_log()) == 1)
    logger.close()
    assert logger.stats.written == ENTRY_EVENTS and logger.stats.dropped == 0
    assert [f[b"key"] for _, f in logged_queries(redis_client, schema)][-1] == b"last"


class _ShortSends:
    """A socket whose non-blocking ``send`` takes a few bytes at a time (a kernel buffer that is full)."""

    def __init__(self, sock):
        self._real = sock

    def send(self, data, flags=0):
        return self._real.send(data[:10], flags)

    def __getattr__(self, name):
        return getattr(self._real, name)


def test_what_a_callers_send_could_not_hand_over_is_sent_by_the_thread(redis_url, redis_client, schema):
    logger = QueryLogger(log_client(redis_url), schema, flush_interval_s=0.05)
    assert _wait_for(lambda: logger._connection is not None)
    with logger._lock:
        logger._connection._sock = _ShortSends(logger._connection._sock)
    logger.log_many("ctr", [f"k{i}" for i in range(3 * ENTRY_EVENTS)], [True] * (3 * ENTRY_EVENTS))
    assert logger.pending == 0 and logger._unsent  # three entries queued, most of their bytes still unsent
    assert _wait_for(lambda: logger.stats.written == 3 * ENTRY_EVENTS)
    logger.close()
    keys = [f[b"key"] for _, f in logged_queries(redis_client, schema)]
    assert keys == [f"k{i}".encode() for i in range(3 * ENTRY_EVENTS)]  # whole, in order, once


def test_a_serving_client_sends_the_log_while_it_waits_for_a_lookup(redis_url, redis_client, schema):
    """PredictionCache hands its logger the time its lookups wait for Redis: a full entry goes out during the next
    lookup, not inside the log() call after one (which sends only once four entries are waiting)."""
    from precompute_assets.serving import PredictionCache, publish_version

    publish_version(redis_client, "ctr", "v1", [("a", 0.5)], n_keys=1, schema=schema)
    logger = QueryLogger(log_client(redis_url), schema, flush_interval_s=60)
    cache = PredictionCache(connect(redis_url, socket_timeout=5), schema=schema, logger=logger)
    assert logger.lookup_sends and _wait_for(lambda: logger._connection is not None)
    for _ in range(ENTRY_EVENTS):
        cache.get("ctr", "a")
    assert logger.pending == ENTRY_EVENTS  # full, but log() leaves it to the next lookup
    cache.get("ctr", "a")
    assert logger.pending == 1  # the full entry went out while Redis answered; this lookup's query waits
    assert _wait_for(lambda: redis_client.xlen(schema.query_log()) == 1)
    for i in range(4 * ENTRY_EVENTS - 1):
        logger.log("ctr", f"direct{i}", hit=True)  # no lookups: log() itself sends at four entries
    assert logger.pending == 0
    cache.close()
    assert logger.stats.written == 5 * ENTRY_EVENTS and logger.stats.dropped == 0


def test_a_callers_send_never_waits_for_room_in_the_socket(redis_url, redis_client, schema):
    """With the logger's socket full (a peer that never reads), the lookup that fills an entry hands everything to
    the thread instead of waiting: a wait would end in the socket's timeout, counted as a failed flush."""
    import socket

    logger = QueryLogger(log_client(redis_url), schema, flush_interval_s=60)
    assert _wait_for(lambda: logger._connection is not None)
    mine, peer = socket.socketpair()
    mine.setblocking(False)
    while True:  # fill both buffers
        try:
            mine.send(b"x" * 65536)
        except BlockingIOError:
            break
    mine.settimeout(0.5)  # what redis-py's socket_timeout sets
    with logger._lock:
        real, logger._connection._sock = logger._connection._sock, mine
    for i in range(ENTRY_EVENTS):
        logger.log("ctr", f"k{i}", hit=True)
    assert logger.pending == 0 and len(logger._unsent) > 0  # built and queued for the thread, not sent
    assert logger.stats.flush_errors == 0 and mine.gettimeout() == 0.5  # no wait, no timeout; the timeout kept
    with logger._lock:  # nothing went out on the full socket: on the real one the thread sends it all
        logger._connection._sock = real
    logger.close()
    mine.close()
    peer.close()
    assert logger.stats.written == ENTRY_EVENTS and logger.stats.dropped == 0
    assert [f[b"key"] for _, f in logged_queries(redis_client, schema)] == [f"k{i}".encode() for i in range(64)]


def test_an_event_no_encoding_takes_does_not_stop_the_thread(redis_url, redis_client, schema):
    from precompute_assets.serving import EventLogger
    from precompute_assets.serving.events import events_stream, read_event_window, validate_event

    logger = EventLogger(log_client(redis_url), schema, flush_interval_s=0.01)
    logger.record_event("\ud800", "login")  # a lone surrogate, e.g. from a JSON body
    assert _wait_for(lambda: logger.stats.written + logger.stats.dropped == 1)
    logger.record_event("u2", "login")
    assert _wait_for(lambda: logger.stats.written + logger.stats.dropped == 2)  # the thread is still there
    logger.close()
    assert logger.stats.written == 2 and redis_client.xlen(events_stream(schema)) == 2
    entries = [e for page in read_event_window(redis_client, schema, 0, 2**62) for e in page]
    assert "not valid UTF-8" in validate_event(*entries[0])[1]  # written as it came, quarantined downstream


def test_a_forked_child_logs_with_its_own_thread_and_connection(redis_url, redis_client, schema):
    """A service that builds its logger before forking workers (gunicorn's preload): the child's queries are sent
    by a thread of its own on a connection of its own, without a flush, and each process counts only its own.
    The child once had no thread (its queries waited in the buffer) and shared the parent's socket."""
    logger = QueryLogger(log_client(redis_url), schema, flush_interval_s=0.01)
    for i in range(5):
        logger.log("ctr", f"parent{i}", hit=False)
    deadline = time.monotonic() + 5
    while logger.stats.written < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert logger.stats.written == 5
    pid = os.fork()
    if pid == 0:  # the child: report through the exit code, never return into pytest
        code = 1
        try:
            for i in range(10):
                logger.log("ctr", f"child{i}", hit=True)
            deadline = time.monotonic() + 10  # a bound for a loaded machine, not a speed check
            while time.monotonic() < deadline:
                keys = [f[b"key"] for _, f in logged_queries(redis_client, schema)]
                # The sender counts a batch once its reply is in, which can be after a reader sees the entries.
                if sum(key.startswith(b"child") for key in keys) == 10 and logger.stats.written == 10:
                    break
                time.sleep(0.02)
            else:
                os._exit(2)
            code = 0 if (logger.stats.logged, logger.stats.written, logger.stats.dropped) == (10, 10, 0) else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0  # 2: the child's queries never arrived; 3: its counts were wrong
    logger.log("ctr", "parent-after", hit=False)
    logger.close()
    assert (logger.stats.logged, logger.stats.written, logger.stats.dropped) == (6, 6, 0)
    assert len(logged_queries(redis_client, schema)) == 16


def test_a_connection_the_server_closed_while_idle_loses_nothing(redis_server, schema):
    """Redis's ``timeout`` (or a proxy) closes the logger's kept connection while the service is quiet: the next
    queries go out on a new connection. The first batch after each idle spell was sent into the closed socket,
    counted as dropped, and the logger then backed off."""
    server = redis_server()
    admin = connect(server.url, socket_timeout=5)
    admin.config_set("timeout", "1")
    logger = QueryLogger(log_client(server.url), schema, flush_interval_s=0.01)
    for i in range(5):
        logger.log("ctr", f"before{i}", hit=False)
    deadline = time.monotonic() + 10
    while logger.stats.written < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    while admin.info("clients")["connected_clients"] > 1 and time.monotonic() < deadline:
        time.sleep(0.05)  # until the server has closed the idle logger's connection
    assert admin.info("clients")["connected_clients"] == 1
    for i in range(300):
        logger.log("ctr", f"after{i}", hit=False)
    logger.close()
    assert (logger.stats.written, logger.stats.dropped) == (305, 0)


def test_workers_forked_as_the_logger_starts_each_send_their_queries(redis_url, redis_client, schema):
    """gunicorn's preload builds the cache, then forks its workers at once, while the logger's new thread is taking
    its connection from redis-py's pool. A child forked with the pool's lock held inherited it held: its thread hung
    for ever in the pool's fork reset and none of its queries were sent (3 children in 10 here)."""
    hung = []
    for round_ in range(10):
        logger = QueryLogger(log_client(redis_url), schema)
        pid = os.fork()
        if pid == 0:  # the child: report through the exit code, never return into pytest
            code = 1
            try:
                for i in range(100):
                    logger.log("ctr", f"r{round_}-{i}", hit=False)
                logger.close()
                code = 0 if logger.stats.written == 100 else 3
            finally:
                os._exit(code)
        code = child_exit_code(pid)
        if code is None:
            hung.append(round_)
        else:
            assert code == 0
        logger.close()
    assert hung == []
    assert len(logged_queries(redis_client, schema)) == 1000


def test_loggers_add_no_fork_hooks_of_their_own(redis_url, schema, monkeypatch):
    """``os.register_at_fork`` has no unregister: three hooks registered per logger piled up for ever in a process that
    makes many (tests, a reloading worker), each fork calling every one. The module's hooks, registered once, visit the
    loggers not collected yet (the fork tests above); a collected logger is gone from them."""
    registered = []
    monkeypatch.setattr(os, "register_at_fork", lambda **hooks: registered.append(hooks))
    loggers = [QueryLogger(log_client(redis_url), schema) for _ in range(3)]
    for logger in loggers:
        logger.close()
    assert registered == []
    assert all(logger in querylog._FORKABLE for logger in loggers)
    collected = weakref.ref(loggers.pop(0))
    gc.collect()
    assert collected() is None and all(logger in querylog._FORKABLE for logger in loggers)


EXITS_WITHOUT_CLOSE = """
import os, sys
from precompute_assets.serving import KeySchema, QueryLogger, connect

logger = QueryLogger(connect(sys.argv[1], socket_timeout=5), KeySchema(sys.argv[2]), flush_interval_s=60)
for i in range(10):
    logger.log("ctr", f"parent{i}", hit=False)
pid = os.fork()
if pid == 0:  # a worker that is recycled: it returns from its loop and exits, as gunicorn's do, never closing
    for i in range(20):
        logger.log("ctr", f"child{i}", hit=True)
    sys.exit(0)
os.waitpid(pid, 0)
"""


def test_queries_still_buffered_when_a_process_exits_are_sent(redis_url, redis_client, schema):
    """A worker that exits without ``close()`` (gunicorn's ``sys.exit`` when it recycles or stops one) and the
    process that forked it: each sends what it still buffered. Both lost it, counted nowhere."""
    subprocess.run([sys.executable, "-c", EXITS_WITHOUT_CLOSE, redis_url, schema.namespace], check=True, timeout=60)
    keys = sorted(fields[b"key"].decode() for _, fields in logged_queries(redis_client, schema))
    assert keys == sorted([f"parent{i}" for i in range(10)] + [f"child{i}" for i in range(20)])


IN_MULTIPROCESSING_CHILDREN = """
import multiprocessing, sys
from concurrent.futures import ProcessPoolExecutor
from precompute_assets.serving import KeySchema, QueryLogger, connect

logger = QueryLogger(connect(sys.argv[1], socket_timeout=5), KeySchema(sys.argv[2]), flush_interval_s=60)

def serve(name):  # returns normally: multiprocessing then ends the child with os._exit, without atexit
    for i in range(20):
        logger.log("ctr", f"{name}{i}", hit=True)
    return name

if __name__ == "__main__":
    fork = multiprocessing.get_context("fork")
    child = fork.Process(target=serve, args=("process",))
    child.start()
    child.join()
    pool = fork.Pool(1)  # closed, not terminated (its `with` does): terminate kills its workers with SIGTERM
    pool.map(serve, ["pool"])
    pool.close()
    pool.join()
    with ProcessPoolExecutor(1, mp_context=fork) as workers:
        list(workers.map(serve, ["executor"]))
    logger.close()
"""


def test_multiprocessing_children_send_what_they_buffered(redis_url, redis_client, schema):
    """A service that hands work to multiprocessing children forked after the logger was built: each child exits with
    os._exit after its target returns, past atexit, and lost the queries it still buffered, counted nowhere (h_serve3:
    187 of 300). Their finalizers now close the loggers."""
    subprocess.run([sys.executable, "-c", IN_MULTIPROCESSING_CHILDREN, redis_url, schema.namespace], check=True,
                   timeout=120)  # fmt: skip
    keys = sorted(fields[b"key"].decode() for _, fields in logged_queries(redis_client, schema))
    assert keys == sorted(f"{name}{i}" for name in ("process", "pool", "executor") for i in range(20))


FORKSERVER_CHILDREN = """
import multiprocessing, sys
from precompute_assets.serving import KeySchema, QueryLogger, connect

def serve(name, url, namespace):  # a child builds its own logger, and returns without closing it
    logger = QueryLogger(connect(url, socket_timeout=5), KeySchema(namespace), flush_interval_s=60)
    for i in range(20):
        logger.log("ctr", f"{name}{i}", hit=True)
    return name

if __name__ == "__main__":
    server = multiprocessing.get_context("forkserver")  # Python 3.14's default start method on Linux
    child = server.Process(target=serve, args=("process", *sys.argv[1:]))
    child.start()
    child.join()
    pool = server.Pool(1)
    pool.starmap(serve, [("pool", *sys.argv[1:])])
    pool.close()
    pool.join()
"""


def test_forkserver_children_send_what_their_own_loggers_buffered(redis_url, redis_client, schema, tmp_path):
    """A forkserver child ends with os._exit too, and its loggers, made after its start, had no finalizer: every query
    it logged was lost (h_readme3: 0 of 100)."""
    script = tmp_path / "forkserver_children.py"
    script.write_text(FORKSERVER_CHILDREN)
    subprocess.run([sys.executable, str(script), redis_url, schema.namespace], check=True, timeout=120)
    keys = sorted(fields[b"key"].decode() for _, fields in logged_queries(redis_client, schema))
    assert keys == sorted(f"{name}{i}" for name in ("process", "pool") for i in range(20))


SERVING_ON_AFTER_THE_TARGET = """
import atexit, multiprocessing, sys, threading, time
from precompute_assets.serving import KeySchema, QueryLogger, connect

def serve(method, url, namespace):  # its work goes on in a thread after the target returns, and at its exit
    logger = QueryLogger(connect(url, socket_timeout=5), KeySchema(namespace), flush_interval_s=60)
    logger.log("ctr", f"{method}-target", hit=True)
    atexit.register(lambda: logger.log("ctr", f"{method}-atexit", hit=True))  # runs only where Python's exit runs

    def later():
        time.sleep(0.3)
        logger.log("ctr", f"{method}-thread", hit=True)

    threading.Thread(target=later).start()

if __name__ == "__main__":
    for method in ("fork", "forkserver", "spawn"):
        child = multiprocessing.get_context(method).Process(target=serve, args=(method, *sys.argv[1:]))
        child.start()
        child.join()
"""


def test_a_child_that_logs_after_its_target_returns_loses_nothing(redis_url, redis_client, schema, tmp_path):
    """The children's loggers were closed by multiprocessing's finalizers, which run as soon as the target returns:
    before Python waits for the child's threads, and before a spawn child's atexit hooks, so what those logged was
    dropped (h_diff24: 19 of 20). The finalizers now wait for the threads and flush, leaving the loggers open."""
    script = tmp_path / "serving_on.py"
    script.write_text(SERVING_ON_AFTER_THE_TARGET)
    subprocess.run([sys.executable, str(script), redis_url, schema.namespace], check=True, timeout=120)
    keys = sorted(fields[b"key"].decode() for _, fields in logged_queries(redis_client, schema))
    expected = [f"{m}-{what}" for m in ("fork", "forkserver", "spawn") for what in ("target", "thread")]
    assert keys == sorted([*expected, "spawn-atexit"])  # fork and forkserver children end with os._exit: no atexit


def test_a_huge_key_or_user_is_logged_cut_short_and_still_quarantined(redis_url, redis_client, schema):
    """A service that logs a request body as the key (``query_logger`` and the decorator take any string), or as the
    user: each such query still reaches the quarantine with its reason, but cut to ``LOGGED_TEXT_CHARS``. Whole, each
    1 MB key stayed in the buffer and then in the stream, which Redis never evicts (20 MB here)."""
    logger = QueryLogger(log_client(redis_url), schema)
    body = "x" * 1_000_000
    for i in range(20):
        with query_logger(logger, "ctr", body + str(i)):
            pass
        logger.log_many("ctr", ["ok", body], [True, False])
        logger.log("ctr", "ok2", hit=True, user=body)
    logger.close()
    assert logger.stats.written == 80
    assert redis_client.memory_usage(schema.query_log()) < 1_000_000
    reasons = Counter(validate_entry(*query)[1] for query in logged_queries(redis_client, schema))
    assert reasons == {None: 20, "key longer than 256 characters": 40, "user longer than 256 characters": 20}


class LateThread(QueryLogger):
    """A logger whose thread starts only when told (``go``), as a busy machine may schedule it."""

    def __init__(self, *args, **kwargs) -> None:
        self.go = threading.Event()
        super().__init__(*args, **kwargs)

    def _run(self) -> None:
        self.go.wait(10)
        super()._run()


def test_a_flush_before_the_thread_has_connected_loses_nothing(redis_url, redis_client, schema):
    """``flush()`` right after the logger starts connects and sends; the thread, scheduled only then, connected
    again over the connection whose replies were still due: the flush waited ``socket_timeout`` for replies that
    came on the other connection, and its queries were counted as dropped (every query of a 200,000-query replay
    once), the first connection never returned to the pool."""
    logger = LateThread(connect(redis_url, socket_timeout=1), schema)
    logger.log("ctr", "ad1", hit=True)  # no connection yet: it waits in the buffer
    with logger._lock:  # the flush's first step: connect and send
        logger._send(logger._take(1)[0])
    first = logger._connection
    logger.go.set()  # the thread starts between the flush's send and its reading of the reply
    time.sleep(0.5)
    logger.flush()
    assert logger._connection is first
    logger.close()
    assert (logger.stats.written, logger.stats.dropped) == (1, 0)
    assert len(logged_queries(redis_client, schema)) == 1


def test_a_drain_reads_the_stream_a_bounded_page_per_xrange(redis_server):
    """Drains and the event sensor's cursor read 10,000 entries per XRANGE: of the query log (64 queries an entry,
    about 9 MB) a reply that held Redis for 11 ms per page, every page of every hour. ``READ_PAGE`` entries now."""
    server = redis_server(extra_config=LOG_EVERY_COMMAND)
    client = connect(server.url, socket_timeout=5)
    schema = KeySchema("drain")
    # A buffer for every query: on a busy machine the flushing thread may not run before the loop ends, and the
    # default buffer (100,000 queries) drops the rest, leaving fewer pages to read.
    logger = QueryLogger(log_client(server.url), schema, clock=lambda: 5_000, max_buffer=2500 * 64)
    for i in range(2500):
        logger.log_many("ctr", [f"ad{i}:{j}" for j in range(64)], [True] * 64, latency_us=40)
    logger.close()
    pipe = client.pipeline(transaction=False)
    for i in range(2500):
        pipe.xadd(schema.events(), {"ts": "5000", "user": f"u{i}", "action": "login"}, id=f"5000-{i + 1}")
    pipe.execute()
    commands_run(client)
    entries = [entry for page in read_stream_window(client, schema, 0, 10_000) for entry in page]
    events = [entry for page in read_event_window(client, schema, 0, 10_000) for entry in page]
    after = read_events_after(client, schema, "0-0", limit=3000)
    counts = [int(args[args.index("COUNT") + 1]) for args, _ in commands_run(client) if args[0] == "XRANGE"]
    assert len(counts) >= 3 * 3 and max(counts) <= READ_PAGE
    assert len(entries) == client.xlen(schema.query_log()) == len({entry_id for entry_id, _ in entries})
    assert len(logged_queries(client, schema)) == 2500 * 64
    assert len(events) == len(after) == 2500 and [e for e, _ in events] == [e for e, _ in after]


def test_a_caller_that_read_the_send_flag_before_the_thread_connected_a_test_double_sends_nothing(schema):
    """Callers check ``_caller_sends`` without the lock. One that read it before the thread connected a socket
    callers cannot use (a test double here; fakeredis: a pure unit test) sent on it anyway, failed and backed the
    logger off: every query buffered until ``close()`` was lost (a CI run lost all 300 of a test's)."""
    logger = QueryLogger(fakeredis.FakeRedis(), schema)
    deadline = time.monotonic() + 5
    while logger._connection is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert logger._connection is not None and not logger._caller_sends
    for i in range(ENTRY_EVENTS):
        logger.log("ctr", f"ad{i}", hit=True)
    logger._caller_flush()  # what the lookup that read the flag first goes on to do
    logger.close()
    assert (logger.stats.written, logger.stats.dropped) == (ENTRY_EVENTS, 0)


def test_a_query_counted_while_close_runs_is_sent_or_dropped_never_left_behind(redis_url, redis_client, schema):
    """A lookup's query was counted, and buffered only after the lock was let go: a ``close()`` in between took the
    buffer first, so the query stayed in it, neither written nor dropped (1 trial in 150 under load, h_flaky). It is
    now buffered in the same hold of the lock that counts it, which close() needs to stop the counting."""
    logger = QueryLogger(connect(redis_url, socket_timeout=5), schema)
    closer = threading.Thread(target=logger.close)

    def item(room: int) -> tuple:
        closer.start()
        time.sleep(0.2)  # close() waits for the lock meanwhile
        return (logger.clock(), "ctr", ["ad1"], "1", 0, None, None, None, None)

    assert logger._queue(1, item) == 1
    closer.join(10)
    assert logger.pending == 0 and logger.stats.logged == logger.stats.written + logger.stats.dropped == 1


def test_services_can_cap_the_streams_to_a_memory_budget(redis_url, redis_client, schema):
    """The 10-million-entry cap is ~40 GB of queries: a service could not bound the streams below its server's
    maxmemory through ``from_url``, and a cap below 1 was taken (MAXLEN ~ 0 trims the stream as it is written)."""
    from precompute_assets.serving import PredictionCache

    cache = PredictionCache.from_url(redis_url, schema=schema, stream_maxlen=100, socket_timeout=5)
    try:
        assert cache.logger.stream_maxlen == 100 and cache.events.stream_maxlen == 100
        for i in range(3_000):
            cache.logger.log("ctr", f"ad{i}", hit=False)
            cache.logger.flush()  # one entry each
    finally:
        cache.close()
    assert 100 <= redis_client.xlen(schema.query_log()) < 300  # MAXLEN ~ trims whole nodes of 100 entries
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"stream_maxlen must be at least 1 entry, got {bad}"):
            QueryLogger(redis_client, schema, stream_maxlen=bad)
