"""Proactive refresh: hot keys from the query log, due keys from their PTTL, on the real Redis."""

from __future__ import annotations

import time

import pytest

from precompute_assets.serving import PredictionCache, QueryLogger, connect
from precompute_assets.serving.refresh import due_for_refresh, hot_keys, live_pttls, read_recent_hits
from precompute_assets_tests.factories import log_client


def entry(kind: str, key: str, hit: bool) -> tuple[bytes, dict[bytes, bytes]]:
    return b"1-0", {b"ts": b"1", b"kind": kind.encode(), b"key": key.encode(), b"hit": b"1" if hit else b"0"}


def test_hot_keys_count_hits_of_the_wanted_kinds_only():
    entries = [
        entry("dash", "t1", True), entry("dash", "t1", True), entry("dash", "t2", True), entry("dash", "t3", False),
        entry("other", "x", True), entry("dash", "{bad}", True), (b"1-0", {b"kind": b"dash", b"hit": b"1"}),
    ]  # fmt: skip
    assert hot_keys(entries, ["dash"]) == {("dash", "t1"): 2, ("dash", "t2"): 1}
    assert hot_keys(entries, ["dash"], min_hits=2) == {("dash", "t1"): 2}
    assert hot_keys(entries, []) == {}


def test_due_keys_expire_within_the_fraction_of_their_ttl():
    pttls = {("d", "soon"): 100_000, ("d", "sooner"): 5_000, ("d", "late"): 800_000, ("d", "gone"): -2,
             ("d", "forever"): -1, ("n", "x"): 100, ("d", "edge"): 180_000}  # fmt: skip
    # 20 % of 900 s = 180 s; a key read lately that is gone expired while read: due first (it was never due again)
    assert due_for_refresh(pttls, {"d": 900}) == [("d", "gone"), ("d", "sooner"), ("d", "soon")]
    assert due_for_refresh(pttls, {"d": 900}, fraction=1.0) == [("d", "gone"), ("d", "sooner"), ("d", "soon"),
                                                              ("d", "edge"), ("d", "late")]  # fmt: skip
    with pytest.raises(ValueError):
        due_for_refresh(pttls, {"d": 900}, fraction=0)


def test_recent_hits_and_pttls_on_the_real_redis(redis_url, redis_client, schema):
    redis_client.set(schema.live("dash", "warm"), b"{}", px=60_000)
    redis_client.set(schema.live("dash", "cold"), b"{}", px=60_000)
    redis_client.set(schema.live("dash", "fresh"), b"{}", px=900_000)
    logger = QueryLogger(log_client(redis_url), schema)
    cache = PredictionCache(connect(redis_url, socket_timeout=5), schema=schema, logger=logger, pointer_ttl_s=0)
    for _ in range(3):
        cache.get("dash", "warm")
        cache.get("dash", "fresh")
        cache.get("dash", "nothing")  # misses: not hot
    cache.close()
    since = time.time_ns() // 1_000_000 - 60_000
    hot, read = read_recent_hits(redis_client, schema, ["dash"], since_ms=since, page=2)
    assert read == 9 and hot == {("dash", "warm"): 3, ("dash", "fresh"): 3}
    bounded, read = read_recent_hits(redis_client, schema, ["dash"], since_ms=since, max_queries=4, page=3)
    assert read == 4 and sum(bounded.values()) <= 3  # the newest queries only
    assert read_recent_hits(redis_client, schema, ["dash"], since_ms=since + 120_000)[1] == 0
    pttls = live_pttls(redis_client, schema, [*hot, ("dash", "nothing")], chunk=2)
    assert pttls[("dash", "nothing")] == -2 and 0 < pttls[("dash", "warm")] <= 60_000
    del pttls[("dash", "nothing")]  # never a hit: not hot, not passed by the refresh sensor
    assert due_for_refresh(pttls, {"dash": 900}) == [("dash", "warm")]  # not the cold key, not the fresh one
