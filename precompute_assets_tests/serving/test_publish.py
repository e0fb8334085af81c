"""Publishing: a connection dying mid-publish never exposes a partial version to readers."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import redis

from precompute_assets.serving import PredictionCache, connect, publish_version
from precompute_assets.serving import publish as publish_module
from precompute_assets.serving.publish import bucket_count
from precompute_assets_tests.factories import LOG_EVERY_COMMAND, commands_run


def test_publish_writes_every_key_into_compact_buckets(redis_url, redis_client, schema):
    n = 5000
    result = publish_version(redis_client, "ctr", "v1", ((f"ad{i}", i / n) for i in range(n)), n_keys=n, schema=schema)
    assert result.keys == n and result.buckets == bucket_count(n)
    cache = PredictionCache(connect(redis_url, socket_timeout=5), schema=schema)
    assert cache.get_many("ctr", [f"ad{i}" for i in range(0, n, 499)]) == [
        pytest.approx(i / n) for i in range(0, n, 499)
    ]
    assert sum(redis_client.hlen(schema.bucket("ctr", "v1", b)) for b in range(result.buckets)) == n
    assert redis_client.object("encoding", schema.bucket("ctr", "v1", 0)) in (b"listpack", b"ziplist")
    assert 0 < redis_client.ttl(schema.bucket("ctr", "v1", 0)) <= 2 * 86400


def test_redis_dying_mid_publish_keeps_readers_on_the_old_version(redis_server, schema):
    """A private Redis is killed (SIGKILL) after the first pipeline of a publish: the publish fails, and
    once Redis is back readers still see the complete old version; the retry then flips to the new one."""
    server = redis_server()
    keys = [f"ad{i}" for i in range(60_000)]  # several pipelines
    publisher = connect(server.url, socket_timeout=2)
    publish_version(publisher, "ctr", "old", [(k, 0.25) for k in keys], n_keys=len(keys), schema=schema)
    time.sleep(1.5)  # appendfsync everysec: let the old version reach the AOF
    cache = PredictionCache(connect(server.url, socket_timeout=0.5), schema=schema, pointer_ttl_s=0, backoff_s=0)
    seen: set[float | None] = set()
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            seen.update(None if v is None else round(v, 3) for v in cache.get_many("ctr", keys[::997]))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        with pytest.raises(redis.ConnectionError):
            publish_version(
                publisher, "ctr", "new", [(k, 0.75) for k in keys], n_keys=len(keys), schema=schema,
                progress=lambda written: os.kill(server.pid, signal.SIGKILL) if server.pid else None,
            )  # fmt: skip
        server.start()
        time.sleep(0.5)
    finally:
        stop.set()
        reader.join()
    assert seen <= {0.25, None} and 0.25 in seen  # never 0.75, never a mix
    assert cache.get_many("ctr", keys[::101]) == [pytest.approx(0.25)] * len(keys[::101])
    publish_version(publisher, "ctr", "new", [(k, 0.75) for k in keys], n_keys=len(keys), schema=schema)
    assert cache.get_many("ctr", keys[::101]) == [pytest.approx(0.75)] * len(keys[::101])


def test_a_publish_whose_stream_is_cut_before_an_expire_leaves_no_bucket_without_its_ttl(
    redis_server, schema, monkeypatch
):
    """A publisher SIGKILLed with replies unread can have the kernel reset its connection and drop the rest of its
    stream: Redis ran a bucket's HSET without the EXPIRE after it, and that bucket of a version that never flipped
    lived forever (no later publish retires it). Here the stream is cut just before the first EXPIRE."""
    server = redis_server()
    checker = connect(server.url, socket_timeout=5)
    publisher = connect(server.url, socket_timeout=5)
    send = redis.connection.AbstractConnection.send_packed_command

    def cut_before_the_first_expire(self, command, check_health=True):
        data = b"".join(command) if isinstance(command, list) else command
        cut = data.find(b"\r\nEXPIRE\r\n")
        if cut < 0:
            return send(self, command, check_health)
        cut = data.rfind(b"*", 0, cut)  # the start of the EXPIRE command
        self._sock.sendall(data[:cut])
        self.disconnect()
        raise redis.ConnectionError("cut")

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", cut_before_the_first_expire)
    with pytest.raises(redis.ConnectionError):
        publish_version(publisher, "ctr", "cut", [(f"ad{i}", 0.5) for i in range(500)], n_keys=500, schema=schema)
    monkeypatch.undo()
    publisher.close()
    deadline = time.monotonic() + 10
    while len(checker.client_list()) > 1:  # the server has read the cut stream and closed that connection
        assert time.monotonic() < deadline
        time.sleep(0.01)
    buckets = list(checker.scan_iter(f"{schema.prefix}:ctr:cut:*"))
    assert [name for name in buckets if checker.ttl(name) < 0] == []


def test_a_retried_version_starts_clean(redis_url, redis_client, schema):
    # Leftovers of an earlier attempt at v1 that never became current (v0 is).
    publish_version(redis_client, "ctr", "v1", [("a", 0.1), ("b", 0.2)], n_keys=2, schema=schema)
    publish_version(redis_client, "ctr", "v0", [("z", 0.0)], n_keys=1, schema=schema, grace_s=600)
    publish_version(redis_client, "ctr", "v1", [("a", 0.3)], n_keys=1, schema=schema)
    cache = PredictionCache(connect(redis_url, socket_timeout=5), schema=schema)
    assert cache.get_many("ctr", ["a", "b"]) == [pytest.approx(0.3), None]


def test_republishing_the_current_version_rewrites_nothing(redis_url, redis_client, schema):
    publish_version(redis_client, "ctr", "v1", [("a", 0.1)], n_keys=1, schema=schema)
    again = publish_version(redis_client, "ctr", "v1", [("a", 0.9)], n_keys=1, schema=schema)
    assert again.already_current
    assert PredictionCache(connect(redis_url, socket_timeout=5), schema=schema).get("ctr", "a") == pytest.approx(0.1)


def test_publish_records_the_versions_key_count_and_a_retry_records_it_again(redis_client, schema):
    count = schema.admission_fifo("ctr", "published")
    publish_version(redis_client, "ctr", "v1", [("a", 0.1), ("b", 0.2)], n_keys=2, schema=schema)
    assert redis_client.get(count) == b"2"
    redis_client.delete(count)  # the count's write, after the flip, failed: the step is retried
    assert publish_version(redis_client, "ctr", "v1", [("a", 0.1), ("b", 0.2)], n_keys=2, schema=schema).already_current
    assert redis_client.get(count) == b"2"
    publish_version(redis_client, "ctr", "v2", [], n_keys=0, schema=schema)
    assert redis_client.get(count) == b"0"


def test_redis_failing_right_after_the_flip_does_not_fail_the_publish(redis_url, redis_client, schema, monkeypatch):
    # Readers are on the new version once the pointer flips: what fails after it is reported, not raised.
    def lost(*args, **kwargs):
        raise redis.ConnectionError("Connection reset by peer")

    monkeypatch.setattr(publish_module, "record_published", lost)
    result = publish_version(redis_client, "ctr", "v1", [("a", 0.1)], n_keys=1, schema=schema)
    assert result.settle_error == "ConnectionError: Connection reset by peer" and not result.already_current
    assert PredictionCache(connect(redis_url, socket_timeout=5), schema=schema).get("ctr", "a") == pytest.approx(0.1)
    monkeypatch.undo()
    assert publish_version(redis_client, "ctr", "v1", [("a", 0.1)], n_keys=1, schema=schema).already_current
    assert redis_client.get(schema.admission_fifo("ctr", "published")) == b"1"  # the retry records it


def test_a_live_value_shared_by_campaigns_lives_until_the_latest_end(redis_client, schema):
    """Two campaigns share an ad: warming the one that ends first must not cut the other's value short."""
    import time as clock

    from precompute_assets.serving.publish import write_live_values

    now = int(clock.time())
    late, early = now + 30 * 86400, now + 86400
    write_live_values(redis_client, "ctr", [("shared", 0.1), ("only_a", 0.2)], expire_at=late, schema=schema)
    write_live_values(redis_client, "ctr", [("shared", 0.3), ("only_b", 0.4)], expire_at=early, schema=schema)
    assert redis_client.expiretime(schema.live("ctr", "shared")) == late  # not shortened
    assert redis_client.expiretime(schema.live("ctr", "only_b")) == early  # a new key gets its campaign's end
    assert PredictionCache(redis_client, schema=schema).get("ctr", "shared") == pytest.approx(0.3)  # newest value


@pytest.mark.parametrize(
    ("kind", "version", "key", "message"),
    [
        ("ctr", "live", "ad1", "invalid version"),
        ("ctr", "seen", "ad1", "invalid version"),
        ("ctr", "v:1", "ad1", "invalid version"),
        ("ctr", "{v1}", "ad1", "invalid version"),
        ("ctr:live", "v1", "ad1", "invalid kind"),
        ("stats", "v1", "ad1", "invalid kind"),
        ("ctr", "v1", "", "invalid prediction key"),
        ("ctr", "v1", "a\nb", "invalid prediction key"),
        ("ctr", "v1", "{tag}x", "invalid prediction key"),
        ("ctr", "v1", "k" * 257, "invalid prediction key"),
    ],
)
def test_publish_refuses_crafted_names_before_writing(redis_client, schema, kind, version, key, message):
    from precompute_assets.serving.keys import Pointer
    from precompute_assets.serving.publish import delete_live_values, flip_pointer, patch_version, write_live_values

    with pytest.raises(ValueError, match=message):
        publish_version(redis_client, kind, version, [("ok", 0.1), (key, 0.2)], n_keys=2, schema=schema)
    if message == "invalid version":
        with pytest.raises(ValueError, match=message):
            flip_pointer(redis_client, schema, kind, Pointer(version, 1), grace_s=1)
        with pytest.raises(ValueError, match=message):
            patch_version(redis_client, kind, Pointer(version, 1), [("ok", 0.1)], schema=schema)
    else:
        with pytest.raises(ValueError, match=message):
            write_live_values(redis_client, kind, [("ok", 0.1), (key, 0.2)], expire_at=None, schema=schema)
        with pytest.raises(ValueError, match=message):
            delete_live_values(redis_client, [(kind, key)], schema=schema)
        with pytest.raises(ValueError, match=message):
            patch_version(redis_client, kind, Pointer("v1", 1), [("ok", 0.1)], [key], schema=schema)
    assert redis_client.keys(f"{schema.prefix}:*") == []  # nothing written


def test_a_version_evicted_while_written_is_never_flipped_to(redis_server, schema):
    """Redis at maxmemory with a volatile policy evicts the new version's own buckets (they carry a TTL) as they are
    written, without an error: a flip would serve a version with holes. The publish checks first and refuses."""
    server = redis_server(extra_config=("maxmemory-policy volatile-lru",))
    client = connect(server.url, socket_timeout=5)
    publish_version(client, "ctr", "v1", [(f"ad{i}", 0.5) for i in range(100)], n_keys=100, schema=schema)
    client.config_set("maxmemory", client.info("memory")["used_memory"] + 200_000)
    items = [(f"ad{i:06d}", 0.25) for i in range(50_000)]  # several MB: far past the limit
    # v1's two buckets, the oldest, go first: found by the watch on the serving version, or after the writes
    with pytest.raises(publish_module.IncompleteVersionError, match=r"publish of ctr version v2: (\d+ of \d+ buckets "
                       r"were evicted while being written|writing it evicted [12] of the 2 buckets of the version "
                       r"readers are on \(v1\)) \(Redis at \d+ of maxmemory"):  # fmt: skip
        publish_version(client, "ctr", "v2", items, n_keys=len(items), schema=schema)
    cache = PredictionCache(client, schema=schema, pointer_ttl_s=0)
    assert cache.current_version("ctr").version == "v1"  # readers stay on the previous version
    assert not client.keys(f"{schema.bucket('ctr', 'v2', 0)[:-1]}*")  # its buckets were given back
    client.close()


def test_a_version_deleted_while_written_is_not_blamed_on_memory(redis_server, schema):
    """A FLUSHDB while a version was written was reported as buckets "evicted ... give Redis more memory" on a server
    at 0.07 % of its maxmemory, where nothing was evicted (h_faults)."""
    server = redis_server()
    client = connect(server.url, socket_timeout=5)
    other = connect(server.url, socket_timeout=5)
    flushed = []

    def flush_once(written: int) -> None:
        if not flushed:
            flushed.append(other.flushdb())

    items = [(f"ad{i:06d}", 0.25) for i in range(30_000)]
    with pytest.raises(publish_module.IncompleteVersionError) as refused:
        publish_version(client, "ctr", "v1", items, n_keys=len(items), schema=schema, progress=flush_once)
    assert flushed and "deleted, and nothing was evicted (a FLUSHDB, FLUSHALL or DEL by another" in str(refused.value)
    assert "maxmemory" not in str(refused.value) and str(refused.value).endswith(": publish again")
    assert not refused.value.evicted  # a retry writes it again: ctr_cache's retry policy applies
    client.close()
    other.close()


def test_a_retry_that_writes_back_buckets_redis_evicts_again_fails(redis_server, schema):
    """A retry of the current version (a ctr restore) wrote its lost buckets back and returned success while Redis
    evicted them again as it wrote: the restore run succeeded with readers still missing the keys, and cache_health
    asked for it again at every tick. It fails now, as a new version's publish does."""
    server = redis_server(extra_config=("maxmemory-policy volatile-lru",))
    client = connect(server.url, socket_timeout=5)
    items = [(f"ad{i:06d}", 0.25) for i in range(50_000)]
    first = publish_version(client, "ctr", "v1", items, n_keys=len(items), schema=schema)
    client.delete(*(schema.bucket("ctr", "v1", index) for index in range(first.buckets)))
    client.config_set("maxmemory", client.info("memory")["used_memory"] + 200_000)  # room for a tenth of them
    with pytest.raises(publish_module.IncompleteVersionError, match=r"ctr version v1 is current and lost \d+ of its"):
        publish_version(client, "ctr", "v1", items, n_keys=len(items), schema=schema)
    client.close()


def test_a_version_evicted_while_written_stops_when_the_serving_version_loses_buckets(redis_server, schema):
    """Under a volatile policy the buckets of the version readers are on carry a TTL too, and an idle one goes first:
    the refusal said only "readers stay on the previous version", which then had holes, and a version too big for the
    memory evicted the serving one whole before its own loss was found (h_pub: 3105 of 3125 buckets). The publish
    now stops at the first batch that evicted some, in batches of a tenth where the version may not fit, and says
    how many went."""
    server = redis_server(extra_config=("maxmemory-policy volatile-lru",))
    client = connect(server.url, socket_timeout=5)
    old = [(f"ad{i}", 0.5) for i in range(20_000)]
    publish_version(client, "ctr", "v1", old, n_keys=len(old), schema=schema)
    client.config_set("maxmemory", client.info("memory")["used_memory"] + 200_000)
    items = [(f"ad{i:06d}", 0.25) for i in range(100_000)]
    with pytest.raises(publish_module.IncompleteVersionError) as refused:
        publish_version(client, "ctr", "v2", items, n_keys=len(items), schema=schema)
    buckets = bucket_count(len(old))
    lost = buckets - sum(client.exists(schema.bucket("ctr", "v1", index)) for index in range(buckets))
    said = f"writing it evicted {lost} of the {buckets} buckets of the version readers are on (v1)"
    assert 0 < lost < buckets // 4 and said in str(refused.value) and refused.value.evicted
    assert not client.keys(f"{schema.bucket('ctr', 'v2', 0)[:-1]}*")  # what it wrote was given back
    client.close()


def test_a_publish_is_not_blamed_for_serving_buckets_gone_before_it(redis_server, schema):
    """The eviction watch counted every missing bucket of the serving version, also those gone before the publish
    began (expired, evicted earlier, deleted): a publish that evicted only live values was refused, and so was every
    retry while the live tier evicted, the normal state of a full cache (h_diff7)."""
    server = redis_server(extra_config=("maxmemory-policy volatile-ttl",))
    client = connect(server.url, socket_timeout=5)
    old = [(f"ad{i}", 0.5) for i in range(20_000)]
    publish_version(client, "ctr", "v1", old, n_keys=len(old), schema=schema)
    client.delete(schema.bucket("ctr", "v1", 0))  # gone before the publish
    pipe = client.pipeline(transaction=False)
    for i in range(30_000):  # live values with a short TTL: what volatile-ttl evicts first
        pipe.set(schema.live("ctr", f"live{i}"), b"\x00\x00\x00\x3f", ex=600)
    pipe.execute()
    client.config_set("maxmemory", client.info("memory")["used_memory"] + 100_000)
    new = [(f"ad{i:06d}", 0.25) for i in range(60_000)]
    publish_version(client, "ctr", "v2", new, n_keys=len(new), schema=schema)
    assert client.info("stats")["evicted_keys"] > 0  # live values made the room
    assert PredictionCache(client, schema=schema, pointer_ttl_s=0).current_version("ctr").version == "v2"
    client.close()


def test_a_publish_refused_at_maxmemory_deletes_its_partial_buckets(redis_server, schema):
    """Under noeviction the write that crosses maxmemory fails: the buckets written before it held their memory for
    the whole TTL (48 h), and every later write (live values, the next publish) was refused too."""
    server = redis_server(extra_config=("maxmemory-policy noeviction",))
    client = connect(server.url, socket_timeout=5)
    publish_version(client, "ctr", "v1", [(f"ad{i}", 0.5) for i in range(100)], n_keys=100, schema=schema)
    client.config_set("maxmemory", client.info("memory")["used_memory"] + 1_000_000)
    items = [(f"ad{i:06d}", 0.25) for i in range(100_000)]
    with pytest.raises((redis.exceptions.OutOfMemoryError, redis.exceptions.ExecAbortError)) as refused:
        publish_version(client, "ctr", "v2", items, n_keys=len(items), schema=schema)
    assert "the partial buckets were deleted" in "".join(refused.value.__notes__)
    assert not client.keys(f"{schema.bucket('ctr', 'v2', 0)[:-1]}*")
    assert PredictionCache(client, schema=schema, pointer_ttl_s=0).get("ctr", "ad7") == pytest.approx(0.5)
    client.set(f"{schema.prefix}:room", b"x" * 100_000)  # the memory is free again
    client.close()


def test_a_publish_refuses_a_key_given_twice_before_writing(redis_client, schema):
    """A key given twice was stored once (the last value won) while the version recorded both in its key count."""
    items = [("a", 0.1), ("b", 0.5), ("a", 0.9)]
    with pytest.raises(ValueError, match=r"1 keys appear more than once \('a'\)"):
        publish_version(redis_client, "ctr", "v1", items, n_keys=3, schema=schema)
    assert redis_client.keys(f"{schema.prefix}:*") == []


def test_a_publish_counts_its_buckets_a_pipeline_at_a_time(redis_server, schema):
    """A publish checks its buckets before writing (a retry starts clean) and after (none evicted): that was one
    EXISTS naming every bucket, 15,625 at a million keys (5-9 ms of server time seen), more for a bigger version,
    blocking every other client meanwhile. At most ``COMMANDS_PER_PIPELINE`` names per EXISTS now, same counts."""
    server = redis_server(extra_config=LOG_EVERY_COMMAND)
    client = connect(server.url, socket_timeout=5)
    n = 70_000  # 1,094 buckets
    items = [(f"ad{i}", 0.5) for i in range(n)]
    publish_version(client, "ctr", "v1", items[:10], n_keys=10, schema=schema)
    client.hset(schema.bucket("ctr", "v2", 1093), "stale", b"\0\0\0?")  # a failed attempt's bucket: the retry
    commands_run(client)
    assert publish_version(client, "ctr", "v2", items, n_keys=n, schema=schema).buckets == 1094
    v2 = schema.bucket("ctr", "v2", 0)[:-1]  # the eviction watch counts v1's bucket once too
    sizes = [count - 1 for args, count in commands_run(client) if args[0] == "EXISTS" and args[1].startswith(v2)]
    assert sizes and max(sizes) <= publish_module.COMMANDS_PER_PIPELINE and sum(sizes) == 2 * 1094
    last = schema.bucket("ctr", "v2", 1093)
    assert client.hlen(last) and not client.hexists(last, "stale")  # the retry started clean
    assert PredictionCache(client, schema=schema).get("ctr", "ad69999") == pytest.approx(0.5)


def test_a_patch_cut_off_after_its_first_pipeline_leaves_no_bucket_without_its_ttl(redis_client, schema, monkeypatch):
    # Every HSET went out before every EXPIRE: a patch of more than COMMANDS_PER_PIPELINE buckets killed between its
    # pipelines left the buckets of the first one without a TTL, so an abandoned build's never expired.
    from precompute_assets.serving.keys import Pointer
    from precompute_assets.serving.publish import patch_version

    sent, send = [], publish_module.send_commands

    def killed_after_one_pipeline(client, commands):
        if sent:
            raise redis.ConnectionError("killed")
        sent.append(commands)
        send(client, commands)

    monkeypatch.setattr(publish_module, "send_commands", killed_after_one_pipeline)
    pointer = Pointer("v1", 4 * publish_module.COMMANDS_PER_PIPELINE)
    with pytest.raises(redis.ConnectionError):
        patch_version(redis_client, "ctr", pointer, [(f"ad{i}", 0.5) for i in range(20_000)], schema=schema, ttl_s=600)
    written = [schema.bucket("ctr", "v1", b) for b in range(pointer.buckets)]
    written = [name for name in written if redis_client.exists(name)]
    assert written and all(0 < redis_client.ttl(name) <= 600 for name in written)


def test_a_patch_into_few_buckets_writes_a_bounded_number_of_fields_per_command(redis_server, schema):
    """A version built for a small corpus has few buckets; the documents of a big load then patched into it went as
    one HSET per bucket with every field of the batch (100,000 fields: 41-177 ms of server time for one command).
    At most ``FIELDS_PER_COMMAND`` fields per HSET or HDEL now, each HSET still followed by its bucket's EXPIRE."""
    from precompute_assets.serving.keys import Pointer
    from precompute_assets.serving.publish import FIELDS_PER_COMMAND, patch_version

    server = redis_server(extra_config=LOG_EVERY_COMMAND)
    client = connect(server.url, socket_timeout=5)
    pointer = Pointer("v1", 2)
    patch_version(client, "ctr", pointer, [(f"ad{i}", 0.5) for i in range(5000)], schema=schema, ttl_s=600)
    patch_version(client, "ctr", pointer, deletes=[f"ad{i}" for i in range(3000)], schema=schema)
    ran = [(args, count) for args, count in commands_run(client) if args[0] in ("HSET", "HDEL", "EXPIRE")]
    fields = [(count - 2) // (2 if args[0] == "HSET" else 1) for args, count in ran if args[0] != "EXPIRE"]
    assert len(fields) >= (5000 + 3000) // FIELDS_PER_COMMAND and max(fields) <= FIELDS_PER_COMMAND
    names = [args[:2] for args, _ in ran if args[0] != "HDEL"]
    assert names[1::2] == [["EXPIRE", name] for _, name in names[0::2]]  # every HSET, then its bucket's TTL
    buckets = [schema.bucket("ctr", "v1", b) for b in range(2)]
    assert sum(client.hlen(name) for name in buckets) == 2000 and all(0 < client.ttl(name) <= 600 for name in buckets)
    client.set(schema.pointer("ctr"), pointer.encode())
    cache = PredictionCache(client, schema=schema)
    assert cache.get_many("ctr", ["ad2999", "ad3000", "ad4999"]) == [None, pytest.approx(0.5), pytest.approx(0.5)]


def lose_the_flips_reply(monkeypatch) -> dict[str, bool]:
    """Make the first MULTI/EXEC that writes a pointer lose its reply after Redis ran it, as a timeout would: the
    client's retries send it again."""
    execute = redis.client.Pipeline._execute_transaction
    lost = {"done": False}

    def lossy(self, connection, commands, raise_on_error):
        replies = execute(self, connection, commands, raise_on_error)
        if not lost["done"] and any(b":current" in str(command).encode() for command in commands):
            lost["done"] = True
            raise redis.TimeoutError("the reply was lost")
        return replies

    monkeypatch.setattr(redis.client.Pipeline, "_execute_transaction", lossy)
    return lost


def test_a_flip_sent_again_after_its_reply_was_lost_still_retires_the_version_it_replaced(
    redis_url, redis_client, schema, monkeypatch
):
    """The second SET ... GET of a flip sent twice returned the new pointer itself: the old version was never given
    its grace (it kept its whole TTL beside the new one, twice the memory), nothing was settled, the publish reported
    the new version as the one it replaced, and the record of the replaced one stayed without a TTL (found by
    review)."""
    keys = [f"k{i}" for i in range(300)]
    client = connect(redis_url, socket_timeout=5, retries=2)
    publish_version(client, "ctr", "old", [(k, 0.25) for k in keys], n_keys=300, schema=schema, ttl_s=86_400,
                    grace_s=600, replica_wait_s=0)  # fmt: skip
    lost = lose_the_flips_reply(monkeypatch)
    result = publish_version(client, "ctr", "new", [(k, 0.75) for k in keys[:250]], n_keys=250, schema=schema,
                             ttl_s=86_400, grace_s=600, replica_wait_s=0)  # fmt: skip
    assert lost["done"] and result.previous_version == "old"
    assert 0 < redis_client.ttl(schema.bucket("ctr", "old", 0)) <= 600
    assert 0 < redis_client.ttl(schema.previous("ctr")) <= 600


def test_a_rollback_after_a_flip_that_died_before_retiring_keeps_the_version_it_goes_back_to(
    redis_url, redis_client, schema, monkeypatch
):
    """A flip killed before it retired the version it replaced leaves that record without a TTL; the next flip retires
    it. When that next flip was a rollback to the very version, it cut the buckets it had just written to the grace:
    the current version expired 10 minutes later and every reader missed (found by review)."""
    keys = [f"k{i}" for i in range(300)]

    def publish(version: str, value: float) -> publish_module.PublishResult:
        return publish_version(redis_client, "ctr", version, [(k, value) for k in keys], n_keys=300, schema=schema,
                               ttl_s=86_400, grace_s=600, replica_wait_s=0, hand_over=False)  # fmt: skip

    publish("old", 0.25)

    def killed(*args, **kwargs):
        raise SystemExit("killed after the flip")

    monkeypatch.setattr(publish_module, "_retire", killed)
    with pytest.raises(SystemExit):
        publish("bad", 0.75)
    monkeypatch.undo()
    assert redis_client.ttl(schema.previous("ctr")) == -1  # the flip's record, never given its grace
    assert publish("old", 0.25).previous_version == "bad"
    assert PredictionCache(redis_client, schema=schema).current_version("ctr").version == "old"
    assert redis_client.ttl(schema.bucket("ctr", "old", 0)) > 86_000
    assert 0 < redis_client.ttl(schema.bucket("ctr", "bad", 0)) <= 600


def test_settling_killed_between_its_untrack_and_the_live_deletes_leaves_no_untracked_value(
    redis_url, redis_client, schema, monkeypatch
):
    """Probation's settling untracked the new version's keys from the main LRU and then deleted their live values: a
    kill between the two left values the tier no longer counts, beyond its capacity until their TTL, and the retry
    found nothing to untrack (found by review). The values go first now."""
    from precompute_assets.serving.admission import Probation

    keys = [f"k{i}" for i in range(200)]
    cache = PredictionCache(redis_client, schema=schema, admission=Probation(capacity=400), pointer_ttl_s=0)
    cache.get_or_compute("ctr", "m1", lambda key: 0.5)  # records the tier's capacity
    publish_version(redis_client, "ctr", "v1", [(k, 0.25) for k in keys], n_keys=200, schema=schema, replica_wait_s=0)
    publish_version(redis_client, "ctr", "v2", [(k, 0.5) for k in keys[:150]], n_keys=150, schema=schema,
                    replica_wait_s=0)  # fmt: skip  # hands v1's last 50 keys over to the tier, with live values
    handed = [k for k in keys[150:] if redis_client.exists(schema.live("ctr", k))]
    assert handed
    unlink = publish_module._unlink_live

    def dies(*args, **kwargs):
        monkeypatch.setattr(publish_module, "_unlink_live", unlink)
        raise redis.ConnectionError("killed")

    monkeypatch.setattr(publish_module, "_unlink_live", dies)
    first = publish_version(redis_client, "ctr", "v3", [(k, 0.75) for k in keys], n_keys=200, schema=schema,
                            replica_wait_s=0)  # fmt: skip
    assert first.settle_error is not None
    again = publish_version(redis_client, "ctr", "v3", [(k, 0.75) for k in keys], n_keys=200, schema=schema,
                            replica_wait_s=0)  # fmt: skip
    assert again.already_current and again.settle_error is None
    assert [k for k in handed if redis_client.exists(schema.live("ctr", k))] == []
