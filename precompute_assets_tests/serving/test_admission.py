"""Admission of live values against a real Redis: the policies, their memory bound, Redis trouble, and the
replay's model of the same decisions (``ml.replay.admission_decisions``) request by request."""

from __future__ import annotations

import itertools
import socket
import time

import numpy as np
import pytest
import redis

from precompute_assets.ml.replay import _probation_day_hits, admission_decisions
from precompute_assets.serving import KeySchema, PredictionCache, connect, publish_version
from precompute_assets.serving import publish as publish_module
from precompute_assets.serving.admission import (
    AGE_STEP_BYTES,
    MAX_WINDOW_S,
    Always,
    Decision,
    FrequencySketch,
    Probation,
    SecondMiss,
    admission_policy,
    probation_sizes,
    sketch_columns,
)
from precompute_assets.serving.keys import FIFO_PARTS
from precompute_assets.serving.publish import SETTLE_SCRIPT_KEYS, PublishResult, write_live_values
from precompute_assets_tests.factories import LOG_EVERY_COMMAND, CountingClient, commands_run


def make_cache(url: str, schema: KeySchema, **options) -> PredictionCache:
    return PredictionCache(connect(url, socket_timeout=2.0), schema=schema, pointer_ttl_s=0, **options)


class Calls:
    """A ``compute`` that remembers the keys it was asked for."""

    def __init__(self) -> None:
        self.keys: list[str] = []

    def __call__(self, key: str) -> dict:
        self.keys.append(key)
        return {"key": key}


def run_through_client(cache: PredictionCache, redis_client, schema: KeySchema, keys: list[str]) -> list[str]:
    """``hit`` / ``admitted`` / ``rejected`` for each request, as the real client handled it."""
    outcomes = []
    for key in keys:
        compute = Calls()
        assert cache.get_or_compute("rank", key, compute) == {"key": key}
        if not compute.keys:
            outcomes.append("hit")
        else:
            outcomes.append("admitted" if redis_client.exists(schema.live("rank", key)) else "rejected")
    return outcomes


def test_policy_names_and_arguments():
    assert admission_policy(None) == Always() == admission_policy("always")
    assert admission_policy("second_miss") == SecondMiss()
    assert admission_policy("frequency") == FrequencySketch()
    assert admission_policy(SecondMiss(5.0)).window_s == 5.0
    for bad in ("lfu", "", 3):
        with pytest.raises(ValueError):
            admission_policy(bad)
    for options in ({"width": 0}, {"depth": 17}, {"threshold": 16}, {"threshold": 0}, {"sample_size": -1}):
        with pytest.raises(ValueError):
            FrequencySketch(**options)
    with pytest.raises(ValueError):
        SecondMiss(0)
    assert admission_policy("probation") == Probation()
    for bad in (0, -1, 1.5, True, "10"):
        with pytest.raises(ValueError, match="capacity"):
            Probation(capacity=bad)
    assert probation_sizes(1) == (1, 0) and probation_sizes(10) == (1, 9) and probation_sizes(1000) == (100, 900)
    # 4-byte count + 4 rows of 32768 4-bit counters + 4-byte aging cursor: the documented 64 KiB per kind.
    assert FrequencySketch().bytes == 8 + 65536 and FrequencySketch().sample == 327680
    assert FrequencySketch(width=3, depth=1).bytes == 10 and FrequencySketch(width=3, depth=1).counter_bytes == 2


def test_frequency_sketch_refuses_a_width_that_is_no_whole_number(redis_url, redis_client, schema):
    """A float passed the range checks, then every lookup's BITFIELD offset (``#12353.0``) was refused by Redis;
    a numpy integer too, then redis-py refused to send it: every lookup an error, nothing ever stored."""
    for options in ({"width": 1e5}, {"depth": 2.0}, {"threshold": True}, {"sample_size": 1e6}):
        with pytest.raises(ValueError, match=f"{next(iter(options))} must be a whole number, got"):
            FrequencySketch(**options)
    sketch = FrequencySketch(width=np.int64(64), depth=np.int64(2))  # numpy's integers are whole numbers
    assert sketch == FrequencySketch(width=64, depth=2) and type(sketch.width) is int
    cache = make_cache(redis_url, schema, admission=sketch)
    assert run_through_client(cache, redis_client, schema, ["a", "a", "a"]) == ["rejected", "admitted", "hit"]
    assert cache.errors == 0


def test_sketch_columns_are_portable_double_hashing():
    import hashlib

    h = int.from_bytes(hashlib.blake2b(b"ad000001", digest_size=8).digest(), "little")
    h1, h2 = h & 0xFFFFFFFF, (h >> 32) | 1
    assert sketch_columns("ad000001", 1000, 3) == [h1 % 1000, (h1 + h2) % 1000, (h1 + 2 * h2) % 1000]
    assert FrequencySketch(width=1000, depth=3).counters("ad000001")[1] == 1000 + (h1 + h2) % 1000


def test_always_is_the_default_and_stores_every_miss(redis_url, redis_client, schema):
    cache = make_cache(redis_url, schema, live_ttl_s=60)
    assert cache.admission == Always()
    assert run_through_client(cache, redis_client, schema, ["a", "a", "b"]) == ["admitted", "hit", "admitted"]
    assert cache.rejected == 0
    assert not redis_client.exists(schema.admission_seen("rank", "a"), schema.admission_sketch("rank"))


def test_second_miss_stores_on_the_second_miss_within_the_window(redis_url, redis_client, schema):
    cache = make_cache(redis_url, schema, live_ttl_s=60, admission=SecondMiss(window_s=30))
    outcomes = run_through_client(cache, redis_client, schema, ["a", "b", "a", "a", "b", "c"])
    assert outcomes == ["rejected", "rejected", "admitted", "hit", "admitted", "rejected"]
    assert (cache.hits, cache.misses, cache.rejected, cache.errors) == (1, 5, 3, 0)
    marker = schema.admission_seen("rank", "c")
    assert redis_client.get(marker) == b"1" and 0 < redis_client.pttl(marker) <= 30_000


def test_second_miss_marker_expires_after_the_window(redis_url, redis_client, schema):
    # A second wide enough for two lookups on a loaded machine (at 50 ms, the marker lapsed between them at times).
    cache = make_cache(redis_url, schema, admission=SecondMiss(window_s=1))
    assert run_through_client(cache, redis_client, schema, ["a"]) == ["rejected"]
    time.sleep(1.2)  # the marker's PX TTL has passed: the next miss is a first miss again
    assert run_through_client(cache, redis_client, schema, ["a", "a"]) == ["rejected", "admitted"]


def test_a_second_miss_window_redis_cannot_take_is_refused_and_the_longest_works(redis_url, redis_client, schema):
    """``inf`` raised OverflowError at every lookup, 1e16 s had every lookup's SET PX refused (nothing ever stored,
    a warning blaming Redis), and "600" a bare TypeError."""
    for window in (float("inf"), float("nan"), 1e16, "600", True, 0, -5):
        with pytest.raises(ValueError, match="window_s must be a number of seconds in"):
            SecondMiss(window_s=window)
    cache = make_cache(redis_url, schema, admission=SecondMiss(window_s=MAX_WINDOW_S))
    assert run_through_client(cache, redis_client, schema, ["a", "a"]) == ["rejected", "admitted"]
    assert cache.errors == 0


def test_a_per_call_policy_overrides_the_caches(redis_url, redis_client, schema):
    cache = make_cache(redis_url, schema, admission="second_miss")
    cache.get_or_compute("rank", "a", Calls(), admission="always")
    assert redis_client.exists(schema.live("rank", "a"))


def test_published_keys_never_reach_the_policy(redis_url, redis_client, schema):
    publish_version(redis_client, "ctr", "v1", [("ad1", 0.25)], n_keys=1, schema=schema)
    for policy in (SecondMiss(), FrequencySketch(width=64)):
        cache = make_cache(redis_url, schema, admission=policy)
        assert cache.get_or_compute("ctr", "ad1", lambda key: 0.9) == pytest.approx(0.25)
    sketch = FrequencySketch(width=64).key(schema, "ctr")
    assert not redis_client.exists(schema.admission_seen("ctr", "ad1"), sketch)


def test_frequency_admits_at_the_threshold_and_stays_within_its_bytes(redis_url, redis_client, schema):
    policy = FrequencySketch(width=256, depth=3, threshold=3)
    cache = make_cache(redis_url, schema, admission=policy)
    assert run_through_client(cache, redis_client, schema, ["a", "a", "a", "a"]) == [
        "rejected",
        "rejected",
        "admitted",
        "hit",
    ]
    sketch = policy.key(schema, "rank")
    assert int.from_bytes(redis_client.get(sketch)[:4], "big") == 4  # the lookup count, hits included
    for key in map(str, range(3000)):
        cache.get_or_compute("rank", key, Calls())
    assert redis_client.strlen(sketch) <= policy.bytes == 8 + 384


def test_frequency_sketch_ages_by_halving(redis_url, redis_client, schema):
    policy = FrequencySketch(width=8, depth=2, threshold=15, sample_size=20)
    cache = make_cache(redis_url, schema, admission=policy)
    keys = ["hot"] * 12 + [f"k{i}" for i in range(7)]
    assert run_through_client(cache, redis_client, schema, keys) == ["rejected"] * 19  # 15 is never reached
    sketch = policy.key(schema, "rank")
    before = np.frombuffer(redis_client.get(sketch)[4:], dtype=np.uint8).copy()
    nibbles = np.stack([before >> 4, before & 15], axis=1).ravel()  # BITFIELD u4 #i: high nibble first
    assert min(int(nibbles[position]) for position in policy.counters("hot")) == 12
    cache.get_or_compute("rank", "hot", Calls())  # the 20th lookup fills the sample: this miss ages
    after = redis_client.get(sketch)
    assert int.from_bytes(after[:4], "big") == 0
    for position in policy.counters("hot"):
        nibbles[position] = min(15, nibbles[position] + 1)  # the 20th lookup counted, then every counter halved
    expected = ((nibbles[0::2] >> 1) << 4) | (nibbles[1::2] >> 1)
    assert np.frombuffer(after[4:], dtype=np.uint8).tolist() == expected.tolist()


def test_frequency_sketch_ages_one_bounded_step_per_miss(redis_url, redis_client, schema):
    """An aging halves ``AGE_STEP_BYTES`` bytes of counters per miss, from a cursor after the counters, never the
    whole sketch in one script (a single pass held the server for milliseconds to seconds as the sketch grew)."""
    policy = FrequencySketch(width=8192, depth=4, threshold=15, sample_size=5)
    steps = policy.counter_bytes // AGE_STEP_BYTES
    assert steps == 4
    cache = make_cache(redis_url, schema, admission=policy)
    cache.get_or_compute("rank", "first", Calls())
    sketch = policy.key(schema, "rank")
    assert redis_client.strlen(sketch) == policy.bytes  # created at its full size: it never grows (nor doubles)
    allocated = redis_client.memory_usage(sketch)
    redis_client.setrange(sketch, 4, b"\x66" * policy.counter_bytes)  # every counter at 6
    redis_client.execute_command("BITFIELD", sketch, "SET", "u32", 0, 4)  # the next lookup fills the sample
    expected = np.full(2 * policy.counter_bytes, 6)
    for step in range(steps + 1):
        key = f"k{step}"
        expected[policy.counters(key)] += 1
        cache.get_or_compute("rank", key, Calls())
        start, stop = min(step, steps) * AGE_STEP_BYTES, min(step + 1, steps) * AGE_STEP_BYTES
        expected[2 * start : 2 * stop] >>= 1  # this miss's step (none once the aging is done), and no other byte
        raw = redis_client.get(sketch)
        body = np.frombuffer(raw[4:-4], dtype=np.uint8)
        assert np.stack([body >> 4, body & 15], axis=1).ravel().tolist() == expected.tolist()
        assert int.from_bytes(raw[:4], "big") == step  # zeroed by the miss that started the aging, then counting
        assert int.from_bytes(raw[-4:], "big") == (stop if stop < policy.counter_bytes else 0)  # the cursor
    assert redis_client.memory_usage(sketch) == allocated and cache.errors == 0


@pytest.mark.parametrize(
    "policy",
    [
        Always(),
        SecondMiss(window_s=3600),
        FrequencySketch(width=64, depth=3, threshold=2, sample_size=60),
        FrequencySketch(width=8192, depth=3, threshold=2, sample_size=60),  # agings of 3 steps, one row each
    ],
    ids=lambda policy: policy.name if policy.name != "frequency" else f"frequency-{policy.width}",
)
def test_client_and_replay_make_the_same_decisions(redis_server, policy):
    """The replay's model against the real client on a private server, request by request.

    Capacity semantics differ (live keys are bounded by their TTL, the replay's LRU by a capacity), so both
    run without a bound (a TTL longer than the test, no capacity) and the admission decisions are compared.
    """
    rng = np.random.default_rng(7)
    hot = [f"item:{k}" for k in rng.zipf(1.4, 500) % 40]
    once = [f"once:{i}" for i in range(500)]
    keys = [hot[i // 2] if i % 2 else once[i // 2] for i in range(1000)]
    server = redis_server()
    client = connect(server.url, socket_timeout=5)
    schema = KeySchema("adm")
    cache = make_cache(server.url, schema, live_ttl_s=3600, admission=policy)
    got = run_through_client(cache, client, schema, keys)
    assert got == admission_decisions(keys, policy, window=None)
    assert cache.errors == 0 and cache.hits == got.count("hit") and cache.rejected == got.count("rejected")
    if policy.name != "always":
        assert got.count("rejected") > 500  # the one-hit wonders, at least, were kept out
    assert sorted(k.decode().rpartition(":live:")[2] for k in client.scan_iter("adm:1:rank:live:*")) == sorted(
        {key for key, outcome in zip(keys, got, strict=True) if outcome == "admitted"}
    )


def probation_state(client, schema: KeySchema, kind: str) -> dict:
    """What ``Probation`` keeps in Redis for ``kind``, as Python collections (queues oldest first)."""
    small, hits, main, ghost, *_ = (schema.admission_fifo(kind, part) for part in FIFO_PARTS)
    return {
        "small": [key.decode() for key in client.lrange(small, 0, -1)],
        "hits": {key.decode(): int(count) for key, count in client.hgetall(hits).items()},
        "main": [key.decode() for key in client.zrange(main, 0, -1)],
        "ghost": [key.decode() for key in client.zrange(ghost, 0, -1)],
    }


def test_probation_keeps_one_hit_wonders_in_a_small_queue(redis_server):
    """By hand, capacity 3 (probation 1 key, ghost 2): a hit in probation promotes, a key without one leaves
    (its value deleted) for the ghost list, and a ghost that comes back goes straight to the main LRU."""
    server = redis_server()
    client = connect(server.url, socket_timeout=5)
    schema = KeySchema("fifo")
    cache = make_cache(server.url, schema, live_ttl_s=3600, admission=Probation(capacity=3))
    keys = ["a", "b", "a", "c", "d", "a", "b"]
    got = run_through_client(cache, client, schema, keys)
    assert got == ["admitted", "admitted", "hit", "admitted", "admitted", "hit", "admitted"]
    assert got == admission_decisions(keys, Probation(capacity=3))
    # d's miss found 3 keys: a (hit in probation) moved to main, b (none) left; b's miss then evicted c and
    # came back from the ghost list into main.
    assert probation_state(client, schema, "rank") == {"small": ["d"], "hits": {"d": 0}, "main": ["a", "b"],
                                                       "ghost": ["c"]}  # fmt: skip
    live = sorted(k.decode().rpartition(":live:")[2] for k in client.scan_iter("fifo:1:rank:live:*"))
    assert live == ["a", "b", "d"]  # evicted values are deleted, with their XFetch deltas
    assert sorted(k.decode().rpartition(":delta:")[2] for k in client.scan_iter("fifo:1:rank:delta:*")) == live
    assert cache.errors == 0 and cache.rejected == 0


def test_probation_client_and_replay_agree_and_stay_within_capacity(redis_server):
    rng = np.random.default_rng(8)
    hot = [f"item:{k}" for k in rng.zipf(1.3, 1500) % 60]
    once = [f"once:{i}" for i in range(500)]
    keys = [once[i // 4] if i % 4 == 0 else hot[i - i // 4 - 1] for i in range(2000)]
    server = redis_server()
    client = connect(server.url, socket_timeout=5)
    schema = KeySchema("fifo")
    policy = Probation(capacity=40)
    cache = make_cache(server.url, schema, live_ttl_s=3600, admission=policy)
    got = run_through_client(cache, client, schema, keys)
    assert got == admission_decisions(keys, policy)
    assert "rejected" not in got and cache.errors == 0
    state = probation_state(client, schema, "rank")
    tracked = set(state["small"]) | set(state["main"])
    assert len(state["small"]) + len(state["main"]) == len(tracked) == 40  # full, and never more
    assert set(state["hits"]) == set(state["small"]) and len(state["ghost"]) <= probation_sizes(40)[1]
    assert not tracked & set(state["ghost"])
    live = {k.decode().rpartition(":live:")[2] for k in client.scan_iter("fifo:1:rank:live:*")}
    assert live == tracked  # every value the policy evicted was deleted
    # The one-hit wonders passed through probation and left; the hot keys hold the main LRU.
    assert sum(key.startswith("once:") for key in state["main"]) <= 2


def test_a_smaller_capacity_shrinks_the_ghost_list_too_as_the_replay_does(redis_server):
    """Clients redeployed with a tenth of the capacity: the queues shrank to it, the ghost list kept its 2,700 names
    for good (h_admit2). Each miss now drops up to ``MAX_STEPS`` of the oldest names beyond the new ghost size."""
    server = redis_server()
    client = connect(server.url, socket_timeout=5)
    schema = KeySchema("shrink")
    first, second = [f"a{i}" for i in range(600)], [f"b{i}" for i in range(60)]
    got = run_through_client(make_cache(server.url, schema, admission=Probation(capacity=300)), client, schema, first)
    assert len(probation_state(client, schema, "rank")["ghost"]) == probation_sizes(300)[1]
    got += run_through_client(make_cache(server.url, schema, admission=Probation(capacity=30)), client, schema, second)
    state = probation_state(client, schema, "rank")
    assert len(state["ghost"]) <= probation_sizes(30)[1] and len(state["small"]) + len(state["main"]) <= 30
    expected: list[str] = []
    _probation_day_hits([np.array(day, dtype=object) for day in (first, second)], [300, 30], outcomes=expected)
    assert got == expected


def test_probation_refuses_what_is_no_capacity_and_takes_numpy_integers():
    """A capacity of 1e20 ("no limit") was written by Lua as ``1e+20``, which then failed every publish's settling
    after its flip; a numpy integer from a config frame was refused; the class itself passed for a policy and every
    lookup raised a TypeError (h_admit2)."""
    assert Probation(capacity=np.int64(5)).capacity == 5 and type(Probation(capacity=np.int64(5)).capacity) is int
    assert Probation(capacity=2**32).capacity == 2**32
    for bad in (0, -1, 2**32 + 1, 10**20, 5.0, True, "5"):
        with pytest.raises(ValueError, match="capacity must be a whole number of keys from 1 to 2\\*\\*32"):
            Probation(capacity=bad)
    for policy in (Probation, SecondMiss, FrequencySketch, Always):
        with pytest.raises(ValueError, match=f"not an admission policy.*pass an instance, {policy.__name__}"):
            admission_policy(policy)


def test_probation_shares_its_capacity_with_the_published_version(redis_server):
    """``capacity`` counts the published keys too: a version of N keys shrinks the live tier to capacity - N over
    the next misses (at most ``MAX_STEPS`` moves or evictions each, a miss without room not kept), as the replay
    models it; a version of capacity keys or more leaves no room at all."""
    rng = np.random.default_rng(9)
    keys = [f"item:{k}" for k in rng.zipf(1.2, 2000) % 400]
    first, second = keys[:1000], keys[1000:]
    published = sorted(set(second), key=second.count, reverse=True)[:130]
    server = redis_server()
    client = connect(server.url, socket_timeout=5)
    schema = KeySchema("fifo")
    cache = make_cache(server.url, schema, live_ttl_s=3600, admission=Probation(capacity=200))
    got = run_through_client(cache, client, schema, first)
    assert len(tracked_keys(client, schema)) == 200
    publish(client, schema, "v1", published)
    assert client.get(schema.admission_fifo("rank", "published")) == b"130"
    got += run_through_client(cache, client, schema, second)
    assert len(tracked_keys(client, schema)) == 70  # 200 less the 130 published
    everything = sorted(set(keys))
    publish(client, schema, "v2", everything)
    got += run_through_client(cache, client, schema, ["new:0", "new:1", "new:2"])
    assert got[-3:] == ["rejected"] * 3 and tracked_keys(client, schema) == set()  # 70 keys: two misses
    assert not list(client.scan_iter("fifo:1:rank:live:*"))  # every evicted or unkept value deleted
    expected: list[str] = []
    days = [np.array(day, dtype=object) for day in (first, second, ["new:0", "new:1", "new:2"])]
    _probation_day_hits(days, [200, 70, 200 - len(everything)], precomputed=[set(), set(published), set(everything)],
                        outcomes=expected)  # fmt: skip
    assert got == expected and "rejected" in got[1000:2000]  # the shrink took more than one miss
    assert cache.errors == 0


def through_publishes(redis_server, capacity: int, days: list[list[str]], versions: list[list[str]]):
    """Each day publish its version (best first), then look its keys up through a ``probation`` client; return the
    client's outcomes, the replay's, the keys each publish handed over, and the client and its Redis."""
    server = redis_server()
    client = connect(server.url, socket_timeout=5)
    schema = KeySchema("fifo")
    cache = make_cache(server.url, schema, live_ttl_s=3600, admission=Probation(capacity=capacity))
    got, handed = [], []
    for number, (day, version) in enumerate(zip(days, versions, strict=True)):
        handed.append(publish(client, schema, f"v{number}", version).handed_over)
        got += run_through_client(cache, client, schema, day)
    expected: list[str] = []
    _probation_day_hits([np.array(day, dtype=object) for day in days], capacity, precomputed=versions,
                        capacity=capacity, outcomes=expected)  # fmt: skip
    assert cache.errors == 0
    return got, expected, handed, client, schema


def test_a_publish_settles_the_live_tier_as_the_replay_models_it(redis_server):
    """After each flip the new version's keys leave the main LRU (their live values deleted), and the keys the version
    before served and the new one drops enter it below every key there, best first, as long as the tier has room,
    with their value from that version; client and replay agree request by request over four publishes."""
    rng = np.random.default_rng(11)
    days = [[f"item:{k}" for k in rng.zipf(1.2, 300) % 150] for _ in range(5)]
    ranked = [sorted(set(day), key=lambda key, day=day: (-day.count(key), key)) for day in days]
    versions = [[], ranked[0][:30], ranked[1][:55], ranked[2][:20], []]  # each day's publish, best first
    got, expected, handed, client, schema = through_publishes(redis_server, 60, days, versions)
    assert got == expected
    dropped = [0] + [len(set(before) - set(after)) for before, after in itertools.pairwise(versions)]
    # v1: no version before it; v2 (55 keys) leaves at most 5 slots; v3: the room runs out; v4: all fit
    assert handed[:2] == [0, 0] and handed[2] <= 60 - 55 and 0 < handed[3] < dropped[3] and handed[4] == dropped[4] > 0
    tracked = tracked_keys(client, schema)
    assert not tracked & set(versions[-1]) and len(tracked) <= 60
    live = {k.decode().rpartition(":live:")[2] for k in client.scan_iter("fifo:1:rank:live:*")}
    assert live == tracked  # every value the policy or a publish dropped was deleted


def test_a_key_handed_over_and_evicted_before_its_value_is_copied_keeps_no_value(redis_server, monkeypatch):
    """A publish hands the keys its version drops to the main LRU, below every key there, then copies their values:
    readers' misses in between may already evict them (they are the first to go), and the copy once wrote their
    values after that, where nothing tracked or deleted them (outside the capacity, for a whole live TTL)."""
    server = redis_server()
    client = connect(server.url, socket_timeout=5)
    schema = KeySchema("fifo")
    cache = make_cache(server.url, schema, live_ttl_s=3600, admission=Probation(capacity=4))
    run_through_client(cache, client, schema, ["m"])  # records the capacity: publishes settle the tier
    publish(client, schema, "v1", ["p1", "p2"])
    copy = publish_module._copy_to_live

    def readers_first(*args, **kwargs):
        assert {"p1", "p2"} <= tracked_keys(client, schema)  # handed over, no value yet
        run_through_client(cache, client, schema, [f"x{i}" for i in range(6) for _ in range(2)])
        assert not {"p1", "p2"} & tracked_keys(client, schema)  # evicted before their values came
        return copy(*args, **kwargs)

    monkeypatch.setattr(publish_module, "_copy_to_live", readers_first)
    assert publish(client, schema, "v2", []).handed_over == 2
    live = {k.decode().rpartition(":live:")[2] for k in client.scan_iter("fifo:1:rank:live:*")}
    assert live == tracked_keys(client, schema) and cache.errors == 0


def test_a_value_stored_between_the_settlings_delete_and_untrack_is_not_left_untracked(redis_server, monkeypatch):
    """The settling deletes the live values of the new version's keys, then untracks them: a reader still on the
    old pointer that missed one in between stored a value that its admission left as it was (already tracked), and
    the untrack then left that value tracked by nothing, outside the capacity, for its whole live TTL (h_concur)."""
    server = redis_server()
    client = connect(server.url, socket_timeout=5)
    schema = KeySchema("fifo")
    policy = Probation(capacity=10)
    cache = make_cache(server.url, schema, live_ttl_s=3600, admission=policy)
    run_through_client(cache, client, schema, ["k", "k", *(f"x{i}" for i in range(10))])  # k in the main LRU
    assert client.zscore(schema.admission_fifo("rank", "main"), "k") is not None
    # a reader that read the pointer before the flip (none then), and keeps it for its pointer_ttl_s
    stale = PredictionCache(connect(server.url, socket_timeout=2.0), schema=schema, pointer_ttl_s=3600,
                            live_ttl_s=3600, admission=policy)  # fmt: skip
    assert stale.get("rank", "nothing") is None
    unlink = publish_module._unlink_live
    raced = []

    def then_a_reader_stores(client_, schema_, kind, keys, ttl):
        unlink(client_, schema_, kind, keys, ttl)
        if "k" in keys and not raced:  # the value just deleted; a reader on the old pointer misses and stores it
            raced.append(run_through_client(stale, client, schema, ["k"]))

    monkeypatch.setattr(publish_module, "_unlink_live", then_a_reader_stores)
    publish(client, schema, "v1", ["k"])
    assert raced == [["admitted"]] and "k" not in tracked_keys(client, schema)
    assert not client.exists(schema.live("rank", "k"))  # nothing untracked left beside the published value
    assert cache.get("rank", "k") == {"key": "k"} and cache.errors == stale.errors == 0


@pytest.mark.parametrize(
    ("capacity", "days", "versions", "handed"),
    [
        # A version published before the first miss: no capacity recorded, nothing settled, no order kept for the next.
        (10, [["a", "b", "c", "x"], ["a", "b", "c", "x"]], [["a", "b", "c"], ["x"]], [0, 0]),
        # (A version listing a key twice is refused by the publish now: test_publish's key given twice.)
    ],
)
def test_settling_edge_cases_agree_with_the_replay(redis_server, capacity, days, versions, handed):
    got, expected, handed_over, _, _ = through_publishes(redis_server, capacity, days, versions)
    assert got == expected and handed_over == handed


def test_a_failed_settling_hands_over_nothing_later_and_a_retry_finishes_it(redis_server, monkeypatch):
    """``:order`` names the version it lists: after a settling that failed, the next publish hands over nothing
    (not the keys of the version before that, whose values are gone); a retried publish of the same version, whose
    first settling failed after its flip, settles again and hands over what the first did not."""
    server = redis_server()
    client = connect(server.url, socket_timeout=5)
    schema = KeySchema("fifo")
    cache = make_cache(server.url, schema, live_ttl_s=3600, admission=Probation(capacity=10))
    run_through_client(cache, client, schema, ["m"])  # records the capacity
    publish(client, schema, "v0", ["a", "b", "c"])
    real = publish_module.settle_published

    def lost(*args, **kwargs):
        raise redis.ConnectionError("connection lost after the flip")

    monkeypatch.setattr(publish_module, "settle_published", lost)
    assert "connection lost" in publish(client, schema, "v1", ["d", "e"]).settle_error
    monkeypatch.setattr(publish_module, "settle_published", real)
    assert publish(client, schema, "v2", []).handed_over == 0  # :order still lists v0, not v1
    assert tracked_keys(client, schema) == {"m"}
    monkeypatch.setattr(publish_module, "settle_published", lost)
    publish(client, schema, "v3", ["f", "g"])
    monkeypatch.setattr(publish_module, "settle_published", real)
    assert publish(client, schema, "v4", ["h"]).settle_error is None  # settled: :order lists v4 now
    monkeypatch.setattr(publish_module, "settle_published", lost)
    assert publish(client, schema, "v5", []).handed_over == 0  # flipped, not settled
    monkeypatch.setattr(publish_module, "settle_published", real)
    retried = publish(client, schema, "v5", [])
    assert retried.already_current and retried.handed_over == 1 and tracked_keys(client, schema) == {"m", "h"}
    assert make_cache(server.url, schema).get("rank", "h") == {"key": "h"}  # its value, from v4
    assert 3000 < client.ttl(schema.live("rank", "h")) <= 3600  # the client's live TTL, not the version's two days


def test_a_key_invalidated_after_a_flip_is_not_handed_over_from_the_version_before(redis_server, monkeypatch):
    """``invalidate`` removed a key from the current version and the live tier only: the version the flip replaced
    kept it, so the settling of that flip (here its retry; a slow one alike) handed the invalidated value over to the
    live tier for a whole live TTL, and a reader whose pointer was not refreshed yet read it from that version."""
    from precompute_assets.serving.invalidate import invalidate

    server = redis_server()
    client = connect(server.url, socket_timeout=5)
    schema = KeySchema("fifo")
    cache = make_cache(server.url, schema, live_ttl_s=3600, admission=Probation(capacity=10))
    run_through_client(cache, client, schema, ["m"])  # records the capacity
    publish(client, schema, "v0", ["a", "b", "c"])
    stale = PredictionCache(connect(server.url, socket_timeout=5), schema=schema, pointer_ttl_s=3600)
    assert stale.get("rank", "b") == {"key": "b"}  # on v0 until its pointer is read again
    real = publish_module.settle_published

    def lost(*args, **kwargs):
        raise redis.ConnectionError("connection lost after the flip")

    monkeypatch.setattr(publish_module, "settle_published", lost)
    assert "connection lost" in publish(client, schema, "v1", ["a"]).settle_error  # flipped, b dropped, not settled
    monkeypatch.setattr(publish_module, "settle_published", real)
    invalidate(client, "rank", key="b", schema=schema)  # b's data changed
    invalidate(client, "rank", prefix="c", schema=schema)  # and c's
    assert stale.get("rank", "b") is None and stale.get("rank", "c") is None
    publish(client, schema, "v1", ["a"])  # the retry settles: hands over what v1 dropped, from v0
    reader = make_cache(server.url, schema)
    assert reader.get("rank", "b") is None and reader.get("rank", "c") is None
    assert reader.get("rank", "a") == {"key": "a"}


def test_settling_reads_probations_queues_in_pages_not_whole(redis_server):
    """Settling once read the main LRU (twice) and ``:order`` whole, one ``ZRANGE``/``LRANGE 0 -1`` each: at a
    capacity of 200,000 keys that is one command holding Redis for every other client for tens of milliseconds. It
    reads them a page at a time now (its ``chunk``, 1000), replaces ``:order`` with ``UNLINK``, and settles the same."""
    server = redis_server(extra_config=LOG_EVERY_COMMAND)
    client = connect(server.url, socket_timeout=5)
    schema = KeySchema("fifo")
    cache = make_cache(server.url, schema, live_ttl_s=3600, admission=Probation(capacity=3000))
    run_through_client(cache, client, schema, ["m"])  # records the capacity
    first = [f"a{i}" for i in range(2500)]
    publish(client, schema, "v1", first)
    assert publish(client, schema, "v2", []).handed_over == 2500  # the main LRU holds v1's keys now
    commands_run(client)
    third = first[:1200] + [f"b{i}" for i in range(1400)]
    publish(client, schema, "v3", third)  # more keys than the LRU tracks: it reads the LRU for those it serves
    assert publish(client, schema, "v4", []).handed_over == 3000 - 1 - 1300  # v3's order, read back; the room left
    ran = commands_run(client)
    order = schema.admission_fifo("rank", "order")
    # (the slow log lists the commands scripts run too: HAND_OVER's read of the coldest key is ZRANGE 0 0)
    ranges = [args for args, _ in ran if args[0] in ("ZRANGE", "LRANGE") and args[2:4] != ["0", "0"]]
    assert {args[0] for args in ranges} == {"ZRANGE", "LRANGE"}
    for args in ranges:
        if args[0] == "ZRANGE":
            assert args[4:6] == ["BYSCORE", "LIMIT"] and int(args[7]) <= 1000, args
        else:
            assert 0 <= int(args[2]) <= int(args[3]) < int(args[2]) + 1000, args
    assert max(count for _, count in ran) <= 1000 + 10  # HAND_OVER: EVAL, its script, the key count, 7 keys, 1000 keys
    # Each script holds Redis until it ends: UNTRACK and HAND_OVER take SETTLE_SCRIPT_KEYS keys each, not 1000.
    scripts = [count - 3 - int(args[2]) for args, count in ran if args[0] == "EVAL"]  # EVAL script numkeys keys...
    assert len(scripts) >= 2 * 1300 // SETTLE_SCRIPT_KEYS and max(scripts) <= SETTLE_SCRIPT_KEYS
    assert ["DEL", order] not in [args[:2] for args, _ in ran] and ["UNLINK", order] in [args[:2] for args, _ in ran]
    # v3 untracked the 1200 keys it shares with v1; v4 handed v3's best 1699 keys over, with their values
    assert tracked_keys(client, schema) == {"m", *first[1200:], *third[:1699]}
    assert make_cache(server.url, schema).get("rank", third[1698]) == {"key": third[1698]} and cache.errors == 0


def test_the_main_lru_read_in_pages_keeps_members_of_tied_scores(redis_client, schema):
    """Pages go by score: members sharing one score across a page boundary (``HAND_OVER`` counts down from the
    coldest, ``_ADMIT`` up from ``:seq``) are each read, none skipped, none twice."""
    name = schema.admission_fifo("rank", "main")
    redis_client.zadd(name, {f"t{i}": 5 for i in range(25)} | {"low": 1, "high": 9} | {f"u{i}": 7 for i in range(3)})
    members = publish_module._sorted_set_members(redis_client, name.encode(), 10)
    assert sorted(members) == sorted(m.decode() for m in redis_client.zrange(name, 0, -1)) and len(members) == 30


def test_a_publish_whose_settling_fails_still_publishes(redis_server):
    """The flip is what readers need; settling probation's tier after it may fail (here the server has no EVAL, as
    for a publisher whose ACL predates it): the publish succeeds, says why the tier was not settled, and the
    retry of the same version does not raise either."""
    server = redis_server(extra_config=('rename-command EVAL ""',))
    client = connect(server.url, socket_timeout=5)
    schema = KeySchema("fifo")
    client.hset(schema.admission_fifo("rank", "tier"), "capacity", 10)  # as a probation client's miss records it
    assert publish(client, schema, "v1", ["a", "b"]).settle_error is None  # no script needed: nothing tracked yet
    result = publish(client, schema, "v2", ["c"])  # hands a and b over: a script
    assert result.previous_version == "v1" and result.handed_over == 0
    assert result.settle_error.startswith("ResponseError: unknown command 'EVAL'")
    reader = make_cache(server.url, schema)
    assert reader.get("rank", "c") == {"key": "c"} and reader.get("rank", "a") is None
    assert "unknown command" in publish(client, schema, "v2", ["c"]).settle_error  # the retry: already current


def test_a_tier_capacity_another_writer_left_unreadable_never_fails_a_publish(redis_url, redis_client, schema):
    """A client of an older version wrote a capacity of 1e20 as Lua prints it, ``1e+20``: the settling's ``int()``
    raised a ValueError after the flip, failing that publish and every retry (h_admit2). It is said, not raised."""
    redis_client.hset(schema.admission_fifo("rank", "tier"), "capacity", "1e+20")
    result = publish(redis_client, schema, "v1", ["a", "b"])
    assert result.settle_error.startswith("ValueError") and result.keys == 2
    assert make_cache(redis_url, schema).get("rank", "a") == {"key": "a"}


def test_probation_stores_and_admits_a_miss_in_one_round_trip(redis_server):
    server = redis_server()
    client = CountingClient(connect(server.url, socket_timeout=5))
    schema = KeySchema("fifo")
    cache = PredictionCache(client, schema=schema, pointer_ttl_s=3600, admission=Probation(capacity=1))
    assert cache.get_or_compute("rank", "a", Calls()) == {"key": "a"}
    # pointer and experiment; live GET + PTTL + delta + touch; the lock; value + delta + release + admit
    assert client.round_trips == 4
    assert cache.get_or_compute("rank", "b", Calls()) == {"key": "b"}
    assert client.round_trips == 4 + 3  # the same: b's admission deleted a's value, which it evicted, itself
    assert not connect(server.url).exists(schema.live("rank", "a"))
    assert cache.get_or_compute("rank", "b", Calls()) == {"key": "b"} and client.round_trips == 8  # a hit
    assert probation_state(connect(server.url), schema, "rank")["small"] == ["b"]
    assert cache.errors == 0


def test_probation_deletes_what_it_evicted_even_when_the_value_is_not_stored(redis_server):
    """The admit script rides in the store's round trip: when the SET fails there (here SET is no command at all),
    the script has still run, so the values it evicted are deleted before the error counts."""
    server = redis_server(extra_config=('rename-command SET ""',))
    client = connect(server.url, socket_timeout=5)
    schema = KeySchema("fifo")
    cache = make_cache(server.url, schema, admission=Probation(capacity=1), backoff_s=0, xfetch_beta=0,
                       recompute_lock_ms=0)  # fmt: skip
    assert cache.get_or_compute("rank", "a", Calls()) == {"key": "a"}
    assert cache.errors == 1 and tracked_keys(client, schema) == {"a"}
    client.execute_command("SETEX", schema.live("rank", "a"), 3600, b"stale")  # as if a's SET had worked
    assert cache.get_or_compute("rank", "b", Calls()) == {"key": "b"}
    assert cache.errors == 2 and tracked_keys(client, schema) == {"b"}
    assert not client.exists(schema.live("rank", "a"))  # evicted by b's admission: deleted, not left untracked


@pytest.mark.parametrize("stampede", [{}, {"xfetch_beta": 0, "recompute_lock_ms": 0}])
def test_probation_admits_no_key_whose_store_an_invalidation_refused(redis_url, redis_client, schema, stampede):
    """The admit script rides in the store's round trip, and ran when the store script refused the value (the kind was
    invalidated while it computed): the key took a slot with no value behind it, evicting one that had a value."""
    from precompute_assets.serving.invalidate import invalidate

    cache = make_cache(redis_url, schema, admission=Probation(capacity=1), **stampede)
    assert cache.get_or_compute("rank", "a", Calls()) == {"key": "a"}

    def computed_before(key: str) -> dict:
        invalidate(redis_client, "rank", key=key, schema=schema)  # the data changed while this computed
        return {"key": key}

    assert cache.get_or_compute("rank", "b", computed_before) == {"key": "b"}
    assert cache.invalidated == 1 and redis_client.get(schema.live("rank", "b")) is None
    assert tracked_keys(redis_client, schema) == {"a"}  # b took no slot, and a kept its own
    assert cache.get("rank", "a") == {"key": "a"} and cache.errors == 0
    # A store after the invalidation is admitted as before.
    assert cache.get_or_compute("rank", "b", Calls()) == {"key": "b"}
    assert tracked_keys(redis_client, schema) == {"b"} and cache.get("rank", "b") == {"key": "b"}


def test_probation_admits_a_stored_value_though_the_kind_was_invalidated_right_after_the_store(
    redis_url, redis_client, schema
):
    """The admit script runs after the store in the same pipeline, not atomically with it: an invalidation of another
    key of the kind in between moved the epoch, and the admission refused a key whose value was stored, which then
    lived its whole live TTL untracked, outside the capacity."""
    from precompute_assets.serving.invalidate import invalidate

    policy = Probation(capacity=10)
    epoch = make_cache(redis_url, schema, admission=policy)._epoch("rank")  # read before computing
    redis_client.set(schema.live("rank", "a"), b'{"key":"a"}', ex=3600)  # what the store wrote
    invalidate(redis_client, "rank", key="other", schema=schema)  # then, before the admission
    for key in ("a", "b"):  # b: a store the moved epoch refused, no value
        admit = policy.after_miss(schema, "rank", key, Decision(True), 3600, deletes=True, epoch=epoch)
        assert policy.evicted(redis_client.execute_command(*admit)) == []
    assert tracked_keys(redis_client, schema) == {"a"}


def test_settling_hands_over_no_value_an_invalidation_deleted_meanwhile(redis_url, redis_client, schema, monkeypatch):
    """The settling read a dropped key's value from the version before, an invalidation of the key then deleted it
    (from that version; no live value yet), and the hand-over wrote it: the invalidated value was served again for a
    whole live TTL."""
    from precompute_assets.serving.invalidate import invalidate

    cache = make_cache(redis_url, schema, admission=Probation(capacity=10))
    assert cache.get_or_compute("rank", "m", Calls()) == {"key": "m"}  # records the capacity: publishes settle
    publish(redis_client, schema, "v1", ["a", "b"])
    live, send, invalidations = schema.live("rank", "b").encode(), publish_module.send_commands, []

    def invalidated_before_the_copy(client, commands):
        if not invalidations and any(live in command for command in commands):  # the values are read by now
            invalidations.append(invalidate(redis_client, "rank", key="b", schema=schema))
        return send(client, commands)

    monkeypatch.setattr(publish_module, "send_commands", invalidated_before_the_copy)
    assert publish(redis_client, schema, "v2", ["a"]).handed_over == 1  # b: dropped, handed over
    assert invalidations and invalidations[0].live_keys == 0  # nothing to delete yet
    assert redis_client.get(live) is None and cache.get("rank", "b") is None and cache.errors == 0


def test_a_prefix_invalidation_leaves_no_value_for_a_settling_to_hand_over_between_its_deletes(
    redis_url, redis_client, schema
):
    """A prefix invalidation deleted the live values first and the fields of the versions after: a settling in between
    (its epoch read after the increment, so the fence let it through) copied a field not deleted yet to the live tier,
    where nothing deleted it again: the invalidated value was served for a whole live TTL."""
    from precompute_assets.serving.invalidate import invalidate

    cache = make_cache(redis_url, schema, admission=Probation(capacity=10))
    assert cache.get_or_compute("rank", "m", Calls()) == {"key": "m"}  # records the capacity: publishes settle
    publish(redis_client, schema, "v1", ["a", "b"])
    assert cache.get_or_compute("rank", "bz", Calls()) == {"key": "bz"}  # a live value under the prefix
    published = []

    class PublishesAfterItsLiveDeletes(redis.Redis):
        def unlink(self, *names):
            deleted = super().unlink(*names)
            if not published:  # v2 drops b: its settling hands b over from v1
                published.append(publish(redis_client, schema, "v2", ["a"]))
            return deleted

    hooked = PublishesAfterItsLiveDeletes(connection_pool=redis_client.connection_pool)
    assert invalidate(hooked, "rank", prefix="b", schema=schema).live_keys == 1
    assert published and redis_client.get(schema.live("rank", "b")) is None
    assert cache.get("rank", "b") is None and cache.get("rank", "bz") is None and cache.errors == 0


@pytest.mark.parametrize("stampede", [{}, {"xfetch_beta": 0, "recompute_lock_ms": 0}])
def test_a_none_result_is_returned_never_stored(redis_server, stampede):
    """A stored None (JSON ``null``) reads back as a miss, so it was never served: keys whose compute found nothing
    once each took a write and a probation slot, evicting the values that were being served."""
    server = redis_server()
    client = connect(server.url, socket_timeout=5)
    schema = KeySchema("fifo")
    cache = make_cache(server.url, schema, admission=Probation(capacity=2), **stampede)
    for key in ("a", "b", "a", "b"):  # both hit in probation: kept
        assert cache.get_or_compute("rank", key, Calls()) == {"key": key}
    nothing = Calls()
    for key in ("n1", "n2", "n3", "n1"):
        assert cache.get_or_compute("rank", key, lambda key: nothing(key) and None) is None
    assert nothing.keys == ["n1", "n2", "n3", "n1"] and tracked_keys(client, schema) == {"a", "b"}
    live = {k.decode().rpartition(":live:")[2] for k in client.scan_iter("fifo:1:rank:live:*")}
    assert live == {"a", "b"} and cache.errors == 0


def publish(client, schema: KeySchema, version: str, keys: list[str]) -> PublishResult:
    return publish_version(
        client, "rank", version, [(key, {"key": key}) for key in keys], n_keys=len(keys), schema=schema
    )


def tracked_keys(client, schema: KeySchema) -> set[str]:
    state = probation_state(client, schema, "rank")
    assert len(state["small"]) + len(state["main"]) == len(set(state["small"]) | set(state["main"]))
    return set(state["small"]) | set(state["main"])


def test_redis_that_refuses_the_policys_commands_never_raises(redis_server):
    server = redis_server(extra_config=('rename-command BITFIELD ""',))
    schema = KeySchema("adm")
    cache = make_cache(server.url, schema, admission=FrequencySketch(width=64), backoff_s=0)
    assert cache.get_or_compute("rank", "a", lambda key: 1.5) == 1.5
    assert cache.errors == 1 and cache.misses == 1
    assert not connect(server.url).exists(schema.live("rank", "a"))


@pytest.mark.parametrize("policy", ["second_miss", "frequency", "probation"])
def test_a_refused_policy_write_still_serves_the_value_read(redis_server, policy):
    """At ``maxmemory`` under ``noeviction`` Redis refuses the policy's writes that ride with the live ``GET``
    (``SET NX GET``, ``BITFIELD``, the probation script): the value read in that round trip is still a hit, and
    nothing is stored. The whole lookup was a miss, so every cached key was computed again."""
    server = redis_server()
    schema = KeySchema("adm")
    cache = make_cache(server.url, schema, admission=policy)
    calls = Calls()
    for _ in range(3):  # second_miss stores at the second miss
        assert cache.get_or_compute("rank", "hot", calls) == {"key": "hot"}
    stored = len(calls.keys)
    client = connect(server.url)
    assert client.exists(schema.live("rank", "hot"))
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", "1")
    assert [cache.get_or_compute("rank", "hot", calls) for _ in range(3)] == [{"key": "hot"}] * 3
    assert len(calls.keys) == stored and cache.errors == 3  # each refused write counts
    assert cache.get_or_compute("rank", "cold", calls) == {"key": "cold"} and calls.keys[-1] == "cold"
    client.config_set("maxmemory", "0")
    assert not client.exists(schema.live("rank", "cold"))


def test_dead_redis_with_admission_computes_without_raising(schema):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_url = f"redis://127.0.0.1:{s.getsockname()[1]}/0"
    for policy in ("second_miss", "frequency", "probation"):
        cache = PredictionCache.from_url(dead_url, socket_timeout=0.1, namespace=schema.namespace, admission=policy)
        assert cache.get_or_compute("ctr", "ad1", lambda key: 0.42) == pytest.approx(0.42)
        assert cache.errors == 1 and cache.rejected == 0
        cache.close()


@pytest.mark.parametrize("between_pages", ["touch", "evict"])
def test_the_main_lru_read_in_pages_keeps_the_member_after_a_moved_boundary(
    redis_client, schema, monkeypatch, between_pages
):
    """A page's last member a reader looked up meanwhile (``_TOUCH`` gives it the newest score), or evicted with the
    page before it (``_ADMIT`` pops the lowest), is no longer at the score the next page starts from: the next page
    skipped the member after it, a key that was in the main LRU all along (settling then left it tracked beside the
    version that serves it, or tracked without the value it hands over)."""
    name = schema.admission_fifo("rank", "main")
    redis_client.zadd(name, {f"m{i:02d}": i + 1 for i in range(30)})
    run_commands, pages = publish_module.run_commands, []

    def between(client, commands):
        replies = run_commands(client, commands)
        if commands[0][0] == b"ZRANGE" and not pages:
            pages.append(replies[0])
            if between_pages == "touch":  # what a reader's lookup of the page's last member does
                redis_client.zadd(name, {"m09": 100})
            else:  # what readers' misses do to the coldest members
                redis_client.zpopmin(name, 10)
        return replies

    monkeypatch.setattr(publish_module, "run_commands", between)
    members = publish_module._sorted_set_members(redis_client, name.encode(), 10)
    assert pages  # the boundary moved between two pages
    throughout = [f"m{i:02d}" for i in range(10 if between_pages == "evict" else 0, 30)]
    assert set(throughout) <= set(members)


def test_probation_leaves_the_longer_lived_values_something_else_wrote(redis_server):
    """A campaign's warming (``write_live_values``, to the campaign's end) on ads a reader had looked up: the tier's
    evictions, and the settling of a version that serves one of them, deleted those values, and the campaign sensor
    found the campaign lost, warmed it again, and lost it again. A value to live longer than the tier stores them is
    left to its own TTL; the tier stops tracking it all the same."""
    server = redis_server()
    client = connect(server.url, socket_timeout=5)
    schema = KeySchema("keep")
    cache = make_cache(server.url, schema, live_ttl_s=3600, admission=Probation(capacity=4))
    for key in ("ad20", "ad21"):
        cache.get_or_compute("rank", key, lambda k: {"read": k})  # a reader's lookups: tracked, an hour's TTL
    campaign_end = int(time.time()) + 10 * 86_400
    write_live_values(client, "rank", [("ad20", {"ctr": 0.5}), ("ad21", {"ctr": 0.6})], expire_at=campaign_end,
                      schema=schema)  # fmt: skip
    for i in range(6):
        cache.get_or_compute("rank", f"x{i}", lambda k: {"read": k})  # evicts ad20 and ad21 from the tier
    assert not {"ad20", "ad21"} & tracked_keys(client, schema)
    assert [cache.get("rank", key) for key in ("ad20", "ad21")] == [{"ctr": 0.5}, {"ctr": 0.6}]
    assert not client.exists(schema.live("rank", "x0"))  # the tier's own values go as before

    for key in ("ad30", "ad31"):  # looked up twice: from probation to the main LRU at the next misses
        cache.get_or_compute("rank", key, lambda k: {"read": k})
        cache.get_or_compute("rank", key, lambda k: {"read": k})
    write_live_values(client, "rank", [("ad30", {"ctr": 0.7})], expire_at=campaign_end, schema=schema)
    for i in range(3):
        cache.get_or_compute("rank", f"y{i}", lambda k: {"read": k})
    assert {"ad30", "ad31"} <= set(probation_state(client, schema, "rank")["main"])
    publish(client, schema, "v1", ["ad30", "ad31"])  # a version that serves them: both leave the main LRU
    assert client.ttl(schema.live("rank", "ad30")) > 3600  # the campaign's value stays
    assert not client.exists(schema.live("rank", "ad31"))  # the tier's own copy goes


def test_sketches_of_two_shapes_on_one_kind_keep_their_own_counters(redis_url, redis_client, schema):
    """Both shared ``{kind}:sketch``: a width-1024 client took four bytes of the default sketch's counters for its
    aging cursor, aged on every miss, wrote its cursor over them and zeroed the shared count, and a key the default
    client looked up twenty times was never stored."""
    default, narrow = FrequencySketch(), FrequencySketch(width=1024)
    key = "ad13561"  # its first counter in the default sketch lies in the bytes the narrow one keeps its cursor in
    assert 4 + 1024 * 4 // 2 <= 4 + default.counters(key)[0] // 2 < 4 + 1024 * 4 // 2 + 4
    wide_cache, narrow_cache = (make_cache(redis_url, schema, admission=policy) for policy in (default, narrow))
    for i in range(3):
        wide_cache.get_or_compute("rank", key, Calls())
        narrow_cache.get_or_compute("rank", f"other{i}", Calls())
    assert redis_client.exists(schema.live("rank", key))  # stored at its second lookup, as with no other client
    assert {default.key(schema, "rank"), narrow.key(schema, "rank")} == {
        schema.admission_sketch("rank"), schema.admission_sketch("rank", (1024, 4))
    }  # fmt: skip
    assert redis_client.strlen(narrow.key(schema, "rank")) == narrow.bytes


def test_get_and_get_many_show_the_policy_the_live_values_they_read(redis_server):
    """A key read through ``get`` (then ``get_or_compute`` on a miss) was never counted as a probation hit nor
    refreshed in the main LRU, and left the tier while hot: the client made other decisions than the replay's
    model of the same requests (h_admit). Their misses are not shown: the ``get_or_compute`` after shows them."""
    keys = list("abacadaeafagahaiajak")
    for policy in (Probation(capacity=3), FrequencySketch(width=64, depth=3, threshold=2, sample_size=60)):
        server = redis_server()
        client = connect(server.url, socket_timeout=5)
        schema = KeySchema("touch")
        cache = make_cache(server.url, schema, live_ttl_s=3600, admission=policy)
        outcomes = []
        for i, key in enumerate(keys):
            read = cache.get("rank", key) if i % 2 else cache.get_many("rank", [key])[0]
            if read is not None:
                outcomes.append("hit")
                continue
            compute = Calls()
            cache.get_or_compute("rank", key, compute)
            outcome = "admitted" if client.exists(schema.live("rank", key)) else "rejected"
            outcomes.append("hit" if not compute.keys else outcome)
        assert outcomes == admission_decisions(keys, policy), policy.name
        assert cache.errors == 0


def test_a_value_the_codec_refuses_raises_whatever_the_policy_decides(redis_url, redis_client, schema):
    """A value that is no JSON was returned when the policy rejected the miss and raised when it admitted it: a
    service tried on its first request broke on its second (h_admit)."""
    import datetime

    for stampede in ({}, {"xfetch_beta": 0, "recompute_lock_ms": 0}):
        cache = make_cache(redis_url, schema, admission=SecondMiss(window_s=60), **stampede)
        for _ in range(2):
            with pytest.raises(TypeError, match="not JSON serializable"):
                cache.get_or_compute("rank", f"date{len(stampede)}", lambda key: {"when": datetime.date(2026, 1, 1)})
    assert not list(redis_client.scan_iter(f"{schema.prefix}:rank:live:*"))


def test_probation_counts_a_miss_without_room_as_rejected(redis_server):
    """A miss that finds the published version filling the capacity is not kept; ``cache.rejected`` counted
    none of them (h_admit)."""
    server = redis_server()
    client = connect(server.url, socket_timeout=5)
    schema = KeySchema("full")
    publish(client, schema, "v1", [f"p{i}" for i in range(5)])
    for stampede in ({}, {"xfetch_beta": 0, "recompute_lock_ms": 0}):
        cache = make_cache(server.url, schema, live_ttl_s=3600, admission=Probation(capacity=5), **stampede)
        keys = ["x", "y", "x", "p1", "z"]
        got = run_through_client(cache, client, schema, keys)
        assert got == ["rejected", "rejected", "rejected", "hit", "rejected"]  # no room beside the 5 published
        assert cache.rejected == 4 and cache.errors == 0


@pytest.mark.parametrize("stampede", [{}, {"xfetch_beta": 0, "recompute_lock_ms": 0}])
def test_the_sketch_ages_per_miss_whatever_the_computed_value(redis_url, redis_client, schema, stampede):
    """An admitted miss whose compute returned None skipped that miss's aging step: the client's decisions then
    depended on the values computed, which the replay cannot know (h_admit)."""
    policy = FrequencySketch(width=16, depth=2, threshold=3, sample_size=10)
    keys = [f"k{i % 37}" for i in range(300)]
    outcomes = {}
    for value in (None, 1.0):
        redis_client.delete(policy.key(schema, "rank"))  # a fresh sketch for each run
        cache = make_cache(redis_url, schema, live_ttl_s=1, admission=policy, **stampede)
        for key in keys:
            cache.get_or_compute("rank", key, lambda key, value=value: value)
            redis_client.delete(schema.live("rank", key))  # every lookup a miss, as in the report
        outcomes[value] = cache.rejected
    assert outcomes[None] == outcomes[1.0] > 0


def test_get_many_touches_its_live_hits_in_one_script_per_batch(redis_server, monkeypatch):
    """``get_many``'s live hits each sent the touch script's whole text (93 ms for 5,000 keys, h_diff): one script per
    batch now, counting each key as its own lookup would."""
    from precompute_assets.serving import admission as admission_module

    server = redis_server(extra_config=LOG_EVERY_COMMAND)
    client = connect(server.url, socket_timeout=5)
    schema = KeySchema("batch")
    cache = make_cache(server.url, schema, live_ttl_s=3600, admission=Probation(capacity=10))
    run_through_client(cache, client, schema, ["a", "b", "c"])  # three keys in probation, no hit yet
    monkeypatch.setattr(admission_module, "TOUCH_BATCH", 2)
    commands_run(client)  # empties the log
    assert cache.get_many("rank", ["a", "b", "x", "c"]) == [{"key": k} for k in "ab"] + [None, {"key": "c"}]
    touches = [count for args, count in commands_run(client) if args[:1] == ["EVAL"] and "HEXISTS" in args[1]]
    hits = client.hgetall(schema.admission_fifo("rank", "hits"))
    assert {k.decode(): int(v) for k, v in hits.items()} == {"a": 1, "b": 1, "c": 1}
    assert touches == [6 + 2, 6 + 1]  # 3 hits in batches of 2: EVAL, its script, 3, three names, then the keys
