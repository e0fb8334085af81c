"""Fault: a serving process is SIGKILLed before each of its round trips, in turn, while a miss under admission
``probation`` evicts another key: no live value may outlive its place in the tier (nothing would delete it, and it
would sit outside the capacity for a whole live TTL)."""

from __future__ import annotations

import uuid

from precompute_assets.serving import KeySchema, PredictionCache, connect
from precompute_assets.serving.admission import Probation, fifo_names
from precompute_assets_tests.faults.killing import REDIS_SEND, run_killed

MISS = """
import sys
from precompute_assets.serving import KeySchema, PredictionCache, connect
from precompute_assets.serving.admission import Probation
url, namespace = sys.argv[1:]
cache = PredictionCache(connect(url, socket_timeout=10), schema=KeySchema(namespace), pointer_ttl_s=0,
                        admission=Probation(capacity=2))
cache.get_or_compute("rank", "c", lambda key: {"key": key})
"""


def tracked_and_live(client, schema: KeySchema) -> tuple[set[str], set[str]]:
    small, _, main, *_ = fifo_names(schema, "rank")
    tracked = {name.decode() for name in [*client.lrange(small, 0, -1), *client.zrange(main, 0, -1)]}
    live = {name.decode().rpartition(":live:")[2] for name in client.scan_iter(f"{schema.prefix}:rank:live:*")}
    return tracked, live


def test_a_reader_killed_at_any_round_trip_of_an_evicting_miss_leaves_no_untracked_value(redis_url):
    client = connect(redis_url, socket_timeout=10)
    calls, at = None, 1
    while calls is None or at <= calls:
        schema = KeySchema(f"k{uuid.uuid4().hex[:10]}")
        cache = PredictionCache(client, schema=schema, pointer_ttl_s=0, admission=Probation(capacity=2))
        for key in ("a", "b"):  # the tier is full: c's miss evicts a
            assert cache.get_or_compute("rank", key, lambda key: {"key": key}) == {"key": key}
        outcome = run_killed(MISS, [redis_url, schema.namespace], [REDIS_SEND], None if calls is None else at)
        tracked, live = tracked_and_live(client, schema)
        assert len(tracked) <= 2 and live <= tracked, (at, tracked, live)
        if calls is None:
            calls = outcome.calls  # the whole run, not killed: then kill before each of its round trips in turn
            assert tracked == live == {"b", "c"}
        else:
            assert outcome.killed
            at += 1
