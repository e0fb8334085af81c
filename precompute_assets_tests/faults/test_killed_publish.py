"""Fault: the process publishing a version is SIGKILLed before each kind of its round trips to Redis in turn.

The kill points are the ``boundaries`` of the kinds of round trip an unkilled publish makes: the first and the last of
each run of one kind (both bucket-write pipelines, the first and last probation list read and HAND_OVER script, every
other command, transaction and script), so each distinct step and each change from one step to the next is killed
at; the calls in the middle of a run only repeat its step on other keys (killing at all 68 took 2.5 minutes when each
point started a fresh interpreter).

Each kill point starts from a private server holding a complete old version and a probation live tier that has
stored misses (built once, then restored from a snapshot before each point). A publisher process is killed before its
N-th command leaves for Redis; then readers must see exactly one whole version (old or new, never a mix), and the same
publish run again (a retry) must leave Redis as one that was never killed leaves it: the new version current with
every key, the old one living out its grace only, the same keys handed over to the live tier. The next version
published instead of a retry must retire every version before it.
"""

from __future__ import annotations

import uuid

import redis

from precompute_assets.serving import KeySchema, PredictionCache, connect, publish_version
from precompute_assets.serving.admission import Probation
from precompute_assets_tests.faults.killing import REDIS_SEND, boundaries, restore, run_killed, snapshot

KEYS = [f"ad{i:05d}" for i in range(40_000)]  # 625 buckets: the writes take two pipelines
OLD = {key: 0.25 for key in KEYS}
# Drops DROPPED keys, those the live tier gets back: several HAND_OVER scripts (SETTLE_SCRIPT_KEYS each), so a kill
# lands between two of them as well as before the first and the last.
DROPPED = 640
NEW = {key: 0.75 for key in KEYS[:-DROPPED]}
GRACE_S, TTL_S = 600, 86400
CAPACITY = len(KEYS) + 10

PUBLISH = """
import sys
from precompute_assets.serving import KeySchema, connect, publish_version
url, namespace = sys.argv[1:]
keys = [f"ad{i:05d}" for i in range(40_000)][:-DROPPED]
publish_version(connect(url, socket_timeout=10), "ctr", "new", [(k, 0.75) for k in keys], n_keys=len(keys),
                schema=KeySchema(namespace), ttl_s=86400, grace_s=600, replica_wait_s=0)
""".replace("DROPPED", str(DROPPED))


def prepared(redis_url: str) -> KeySchema:
    """An empty server but for the old version, current, and probation's tier tracking a few misses."""
    schema = KeySchema(f"k{uuid.uuid4().hex[:10]}")
    client = connect(redis_url, socket_timeout=10)
    client.flushall()  # a private server: the scans of ``state`` read this namespace only
    cache = PredictionCache(client, schema=schema, admission=Probation(capacity=CAPACITY), pointer_ttl_s=0)
    for key in ("m1", "m2", "m3"):
        cache.get_or_compute("ctr", key, lambda k: 0.5)  # records the capacity: settling does work
    publish_version(client, "ctr", "old", OLD.items(), n_keys=len(OLD), schema=schema, ttl_s=TTL_S, grace_s=GRACE_S,
                    replica_wait_s=0)  # fmt: skip
    return schema


def publish_new(client: redis.Redis, schema: KeySchema):
    return publish_version(client, "ctr", "new", NEW.items(), n_keys=len(NEW), schema=schema, ttl_s=TTL_S,
                           grace_s=GRACE_S, replica_wait_s=0)  # fmt: skip


def state(client: redis.Redis, schema: KeySchema) -> dict:
    """What a publish leaves in Redis that a reader or the next publish depends on, with TTLs in classes."""
    raws = list(client.scan_iter(f"{schema.prefix}:*", count=10_000))
    pipe = client.pipeline(transaction=False)
    for raw in raws:
        pipe.ttl(raw)
        pipe.type(raw)
    meta = pipe.execute()
    reads = client.pipeline(transaction=False)
    for raw, kind_of in zip(raws, meta[1::2], strict=True):
        {b"hash": reads.hgetall, b"list": lambda r: reads.lrange(r, 0, -1), b"zset": lambda r: reads.zrange(r, 0, -1),
         b"string": reads.get}[kind_of](raw)  # fmt: skip
    out: dict = {}
    for raw, ttl, kind_of, value in zip(raws, meta[::2], meta[1::2], reads.execute(), strict=True):
        name = raw.decode()[len(schema.prefix) + 1 :].replace(schema.prefix, "P")
        lifetime = "forever" if ttl == -1 else "grace" if ttl <= GRACE_S else "ttl" if ttl <= TTL_S else "long"
        if kind_of == b"hash" and name.split(":")[1] not in ("fifo", "stats"):  # a bucket: counted per version
            version = name.split(":")[1]
            out.setdefault(f"buckets {version}", set()).add(lifetime)
            out[f"keys {version}"] = out.get(f"keys {version}", 0) + len(value)
        elif ":delta:" in name or name.endswith(":seq"):  # compute seconds, a counter: no contract
            continue
        elif ":live:" in name:
            out.setdefault("live", set()).add((name.rpartition(":")[2], value, lifetime))
        else:
            out[name] = (set(value) if kind_of == b"zset" else value), lifetime
    return out


def shown(value) -> str:
    text = repr(value)
    return text if len(text) < 200 else f"{text[:150]}... ({len(text)} characters)"


def seen_by_reader(redis_url: str, schema: KeySchema) -> set[float | None]:
    cache = PredictionCache(connect(redis_url, socket_timeout=10), schema=schema, pointer_ttl_s=0)
    sample = KEYS[:-DROPPED:97]  # keys both versions hold
    return {None if value is None else round(value, 3) for value in cache.get_many("ctr", sample)}


def test_a_publish_killed_before_any_round_trip_leaves_one_whole_version_and_the_retry_finishes_it(redis_server):
    redis_url = redis_server().url
    client = connect(redis_url, socket_timeout=10)
    schema = prepared(redis_url)
    start = snapshot(client)  # what ``prepared`` left: put back before each point instead of being built again
    clean = run_killed(PUBLISH, [redis_url, schema.namespace], [REDIS_SEND], None)
    assert not clean.killed and clean.calls > 5
    expected = state(client, schema)
    assert expected["keys new"] == len(NEW) and expected["buckets old"] == {"grace"}
    assert len(expected["live"]) == DROPPED + 3
    failures = []
    assert len(clean.kinds) == clean.calls and len(set(clean.kinds)) > 10  # the steps told apart, not one kind
    for at in boundaries(clean.kinds):
        restore(client, start)
        outcome = run_killed(PUBLISH, [redis_url, schema.namespace], [REDIS_SEND], at)
        assert outcome.killed, f"kill point {at}: the publish ended without reaching it"
        seen = seen_by_reader(redis_url, schema)
        if seen not in ({0.25}, {0.75}):
            failures.append(f"kill point {at}: readers saw {seen}")
        retried = publish_new(client, schema)
        if seen_by_reader(redis_url, schema) != {0.75}:
            failures.append(f"kill point {at}: after the retry readers saw {seen_by_reader(redis_url, schema)}")
        got = state(client, schema)
        for name in sorted(set(got) | set(expected)):
            if got.get(name) != expected.get(name):
                failures.append(f"kill point {at}: {name}: {shown(got.get(name))} != {shown(expected.get(name))}"
                                f" (retry already_current={retried.already_current})")  # fmt: skip
    assert not failures, "\n".join(failures)


def test_the_next_version_after_a_killed_publish_retires_every_version_before_it(redis_server):
    """Not a retry but the next day's version: whatever the killed publish left, readers move to it whole, and every
    other version is gone or on its grace (a partial one of the killed attempt: on its TTL), so killed publishes never
    pile up whole versions without end."""
    redis_url = redis_server().url
    client = connect(redis_url, socket_timeout=10)
    schema = prepared(redis_url)
    start = snapshot(client)
    kinds = run_killed(PUBLISH, [redis_url, schema.namespace], [REDIS_SEND], None).kinds
    failures = []
    for at in boundaries(kinds):
        restore(client, start)
        assert run_killed(PUBLISH, [redis_url, schema.namespace], [REDIS_SEND], at).killed
        publish_version(client, "ctr", "newer", [(key, 0.5) for key in KEYS], n_keys=len(KEYS), schema=schema,
                        ttl_s=TTL_S, grace_s=GRACE_S, replica_wait_s=0)  # fmt: skip
        if (seen := seen_by_reader(redis_url, schema)) != {0.5}:
            failures.append(f"kill point {at}: readers saw {seen}")
        got = state(client, schema)
        if got["keys newer"] != len(KEYS) or got["buckets newer"] != {"ttl"}:
            failures.append(f"kill point {at}: version newer: {got['keys newer']} keys, {got['buckets newer']}")
        if got["buckets old"] != {"grace"} or got.get("buckets new", {"grace"}) - {"grace", "ttl"}:
            failures.append(f"kill point {at}: old {got['buckets old']}, new {got.get('buckets new')}")
        if got["ctr:previous"][1] != "grace":
            failures.append(f"kill point {at}: the replaced version is remembered {got['ctr:previous'][1]}")
    assert not failures, "\n".join(failures)
