"""Invalidation and stats against a real Redis: within one kind's namespace, bounded, never the current version."""

from __future__ import annotations

import contextlib
import json

import psycopg2
import pytest

from precompute_assets.serving import PredictionCache, QueryLogger, connect, publish_version
from precompute_assets.serving.invalidate import glob_escape, invalidate
from precompute_assets.serving.keys import Pointer
from precompute_assets.serving.publish import KEYS_PER_BUCKET, bucket_count, missing_buckets, patch_version
from precompute_assets.serving.stats import MEMORY_SAMPLE_FIELDS, cache_stats, version_stats
from precompute_assets.storage.postgres import scratch_database
from precompute_assets.tools.cli import duration_s, main
from precompute_assets_tests.factories import LOG_EVERY_COMMAND, commands_run, log_client


def publish(client, schema, kind: str, version: str, keys: list[str]) -> None:
    items = [(key, {"v": version, "k": key}) if kind == "json" else (key, 0.5) for key in keys]
    publish_version(client, kind, version, items, n_keys=len(items), schema=schema, ttl_s=600)


def test_a_key_goes_from_the_current_version_and_the_live_tier(redis_client, schema):
    publish(redis_client, schema, "ctr", "v1", ["a", "b"])
    redis_client.set(schema.live("ctr", "a"), b"\x00\x00\x00?")
    done = invalidate(redis_client, "ctr", key="a", schema=schema)
    assert (done.fields, done.live_keys, done.version, done.total) == (1, 1, "v1", 2)
    cache = PredictionCache(redis_client, schema=schema)
    assert cache.get("ctr", "a") is None and cache.get("ctr", "b") == pytest.approx(0.5)
    assert invalidate(redis_client, "ctr", key="a", schema=schema).total == 0  # idempotent


def test_a_malformed_pointer_does_not_keep_live_values_from_an_invalidation(redis_client, schema):
    """It raised, so nothing was invalidated; then it reached only the live values, and a repaired pointer served the
    invalidated key of the version it names again (h_diff)."""
    keys = [f"a{i}" for i in range(3 * KEYS_PER_BUCKET)]
    publish(redis_client, schema, "ctr", "v1", keys)
    good = redis_client.get(schema.pointer("ctr"))
    redis_client.set(schema.pointer("ctr"), b"v1:zero")  # readers take it for no version: they serve live values
    redis_client.hset(schema.bucket("ctr", "v1", 1 << 30), "x", "1")  # a stray key numbered past any version's
    redis_client.set(schema.live("ctr", "a1"), b"\x00\x00\x00?")
    redis_client.set(schema.live("ctr", "b"), b"\x00\x00\x00?")
    assert PredictionCache(redis_client, schema=schema).get("ctr", "a1") == pytest.approx(0.5)
    done = invalidate(redis_client, "ctr", key="a1", schema=schema)
    assert (done.fields, done.live_keys, done.version) == (1, 1, "v1")
    assert PredictionCache(redis_client, schema=schema).get("ctr", "a1") is None
    with pytest.raises(ValueError, match="named by the malformed current pointer"):
        invalidate(redis_client, "ctr", version="v1", schema=schema)
    assert invalidate(redis_client, "ctr", prefix="a2", schema=schema).fields > 0
    assert invalidate(redis_client, "ctr", prefix="b", schema=schema).live_keys == 1
    redis_client.set(schema.pointer("ctr"), good)  # repaired: the invalidated keys stay out
    cache = PredictionCache(redis_client, schema=schema)
    assert cache.get("ctr", "a1") is None and cache.get("ctr", "a20") is None and cache.get("ctr", "a3") == 0.5
    redis_client.set(schema.pointer("ctr"), b"no version here")  # names none: live values only, as before
    assert invalidate(redis_client, "ctr", key="a3", schema=schema).version is None


def test_keys_taken_out_of_the_current_version_give_probations_live_tier_their_slots_back(redis_client, schema):
    published = schema.admission_fifo("ctr", "published")
    publish(redis_client, schema, "ctr", "v1", ["ad1", "ad10", "ad2", "b"])
    assert redis_client.get(published) == b"4"
    invalidate(redis_client, "ctr", key="b", schema=schema)
    invalidate(redis_client, "ctr", key="b", schema=schema)  # gone already: nothing more to give back
    invalidate(redis_client, "ctr", prefix="ad1", schema=schema)
    assert redis_client.get(published) == b"1"
    redis_client.delete(published)  # none recorded (a publisher before probation): none made up
    invalidate(redis_client, "ctr", key="ad2", schema=schema)
    assert redis_client.get(published) is None


def test_an_invalidation_is_not_a_loss_and_a_restore_never_writes_it_back(redis_client, schema):
    """A prefix that emptied a version's buckets made Redis delete them, so cache_health saw the version as lost
    ("expired or evicted") and its restore wrote every invalidated value back; a restore after a real eviction
    also brought back the keys invalidated before it."""
    keys = [f"ad{i}" for i in range(150)] + ["bx"]
    pointer = Pointer("v1", bucket_count(len(keys)))
    publish(redis_client, schema, "ctr", "v1", keys)
    assert invalidate(redis_client, "ctr", prefix="ad", schema=schema).fields == 150
    assert missing_buckets(redis_client, schema, "ctr", pointer) == 0  # the one bucket left with bx: not lost
    assert redis_client.exists(schema.bucket_for_key("ctr", pointer, "bx"))
    invalidate(redis_client, "ctr", key="bx", schema=schema)  # empties the last one
    assert missing_buckets(redis_client, schema, "ctr", pointer) == 0
    publish(redis_client, schema, "ctr", "v1", keys)  # what a restore (or a retried publish) of the version runs
    cache = PredictionCache(redis_client, schema=schema, pointer_ttl_s=0)
    assert cache.get_many("ctr", ["ad0", "ad149", "bx"]) == [None, None, None]
    publish(redis_client, schema, "ctr", "v2", keys)  # a new version holds them again
    invalidate(redis_client, "ctr", key="ad7", schema=schema)
    bucket = schema.bucket_for_key("ctr", Pointer("v2", pointer.buckets), "ad7")
    redis_client.delete(bucket)  # evicted: lost, and restored without ad7
    assert missing_buckets(redis_client, schema, "ctr", Pointer("v2", pointer.buckets)) == 1
    publish(redis_client, schema, "ctr", "v2", keys)
    assert redis_client.hlen(bucket) and not redis_client.hexists(bucket, "ad7")
    assert cache.get("ctr", "ad7") is None and cache.get("ctr", "ad8") == pytest.approx(0.5)


def test_a_rollback_to_the_version_in_grace_keeps_its_invalidated_keys_out(redis_client, schema):
    """``ctr_cache rollback: true`` publishes the version in its grace again: the keys invalidated from it while it
    was there came back, although its record named them (h_inval)."""
    keys = ["u1", "u7", "x1", "x2"]
    publish(redis_client, schema, "ctr", "v1", keys)
    publish(redis_client, schema, "ctr", "v2", keys)  # v1 in its grace
    invalidate(redis_client, "ctr", key="u7", schema=schema)
    invalidate(redis_client, "ctr", prefix="x", schema=schema)
    items = [(key, 0.5) for key in keys]
    result = publish_version(redis_client, "ctr", "v1", items, n_keys=4, schema=schema, ttl_s=600, hand_over=False)
    assert result.keys == 1
    cache = PredictionCache(redis_client, schema=schema, pointer_ttl_s=0)
    assert cache.get_many("ctr", keys) == [pytest.approx(0.5), None, None, None]


def test_the_record_of_a_version_without_a_ttl_lives_as_long(redis_client, schema):
    """A version without a TTL (patched in place) had its record expire after 7 days, and a mend then wrote the
    invalidated keys back (h_inval)."""
    publish_version(redis_client, "ctr", "v1", [("u1", 0.5), ("u7", 0.5)], n_keys=2, schema=schema, ttl_s=None)
    invalidate(redis_client, "ctr", key="u7", schema=schema)
    assert redis_client.ttl(schema.invalidated("ctr", "v1")) == -1
    publish(redis_client, schema, "ctr", "v2", ["a"])
    invalidate(redis_client, "ctr", key="a", schema=schema)
    assert 0 < redis_client.ttl(schema.invalidated("ctr", "v2")) <= 7 * 86_400  # 600 s buckets: at least 7 days
    # once v1 is replaced (v2's flip gave it its grace), its record gets the usual 7 days, not forever (h_diff)
    assert 0 < redis_client.ttl(schema.invalidated("ctr", "v1")) <= 7 * 86_400


def test_invalidation_still_deletes_at_maxmemory(redis_server, schema):
    """A full server (``noeviction``) refuses the epoch's ``INCRBY`` (it may grow memory) but not the deletes, which
    free memory: invalidating, the way out of a full server, must not fail on the fence. A private server: an OOM
    limit on the shared one would fail other tests' writes."""
    from precompute_assets.serving.publish import delete_live_values

    server = redis_server()
    client = connect(server.url)
    for key in ("a", "b1", "b2", "c"):
        client.set(schema.live("ctr", key), b"\x00\x00\x00?")
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", "1")
    assert invalidate(client, "ctr", key="a", schema=schema).live_keys == 1
    assert invalidate(client, "ctr", prefix="b", schema=schema).live_keys == 2
    assert delete_live_values(client, [("ctr", "c")], schema=schema) == 1


def test_a_version_that_becomes_current_while_deleted_stops_the_delete(redis_client, schema, monkeypatch):
    """The "not current" check ran once, before the deletes: a publish of the version flipping to it meanwhile (the
    retry of a failed publish whose partial buckets an operator removes) left readers on a version with holes."""
    publish(redis_client, schema, "ctr", "v1", ["a"])
    with redis_client.pipeline(transaction=False) as pipe:
        for index in range(1500):  # two delete batches
            pipe.hset(schema.bucket("ctr", "v2", index), "k", b"\x00\x00\x00?")
        pipe.execute()
    unlink = redis_client.unlink

    def unlink_then_flip(*names):
        deleted = unlink(*names)
        redis_client.set(schema.pointer("ctr"), "v2:1500")  # the publish's flip, after the first batch
        return deleted

    monkeypatch.setattr(redis_client, "unlink", unlink_then_flip)
    with pytest.raises(ValueError, match="ctr version v2 became current while it was being deleted"):
        invalidate(redis_client, "ctr", version="v2", schema=schema)
    assert len(redis_client.keys(f"{schema.prefix}:ctr:v2:*")) == 500  # the second batch was not deleted


def test_a_prefix_is_a_literal_within_its_kind(redis_client, schema):
    keys = ["ad1", "ad10", "ad2", "x*1", "xa1", "a?d"]
    publish(redis_client, schema, "ctr", "v1", keys)
    publish(redis_client, schema, "campaign", "v1", keys)  # another kind with the same keys
    for key in keys:
        redis_client.set(schema.live("ctr", key), b"\x00\x00\x00?")
    done = invalidate(redis_client, "ctr", prefix="ad1", schema=schema)
    assert (done.fields, done.live_keys) == (2, 2)
    done = invalidate(redis_client, "ctr", prefix="x*", schema=schema)  # '*' is a character, not a glob
    assert (done.fields, done.live_keys) == (1, 1)
    cache = PredictionCache(redis_client, schema=schema)
    left = {key for key in keys if cache.get("ctr", key) is not None}
    assert left == {"ad2", "xa1", "a?d"}
    assert all(cache.get("campaign", key) is not None for key in keys)  # the other kind is untouched
    assert glob_escape("a*b?[c]\\") == "a\\*b\\?\\[c\\]\\\\"


def test_a_version_is_deleted_only_when_it_is_not_current(redis_client, schema):
    publish(redis_client, schema, "ctr", "v1", [f"k{i}" for i in range(300)])
    publish(redis_client, schema, "ctr", "v1.2", ["k1"])  # current now; v1 lives on for its grace period
    v1_buckets = list(redis_client.scan_iter(match=f"{schema.prefix}:ctr:v1:*"))
    assert len(v1_buckets) >= 2
    with pytest.raises(ValueError, match="v1.2 is current"):
        invalidate(redis_client, "ctr", version="v1.2", schema=schema)
    done = invalidate(redis_client, "ctr", version="v1", schema=schema)
    assert done.buckets == len(v1_buckets) and done.fields == 0 and done.live_keys == 0
    assert not list(redis_client.scan_iter(match=f"{schema.prefix}:ctr:v1:*"))
    assert PredictionCache(redis_client, schema=schema).get("ctr", "k1") == pytest.approx(0.5)  # v1.2 intact
    assert not redis_client.exists(schema.previous("ctr"))  # its grace ended with it (cache stats showed it, h_readme)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({}, "exactly one of key, prefix or version"),
        ({"key": "a", "prefix": "b"}, "exactly one of key, prefix or version"),
        ({"prefix": ""}, "empty prefix"),
        ({"version": "v:1"}, "invalid version"),
        ({"version": "invalidated"}, "reserved"),  # deleted every version's invalidation records (h_inval)
        ({"version": "previous"}, "reserved"),
        ({"kind": "ctr:live", "key": "a"}, "invalid kind"),
    ],
)
def test_bad_invalidations_are_refused(redis_client, schema, arguments, message):
    kind = arguments.pop("kind", "ctr")
    with pytest.raises(ValueError, match=message):
        invalidate(redis_client, kind, schema=schema, **arguments)


def test_stats_report_the_current_version_and_the_hit_rate_of_the_window(redis_url, redis_client, schema):
    publish(redis_client, schema, "ctr", "v1", [f"k{i}" for i in range(500)])
    logger = QueryLogger(log_client(redis_url), schema)
    for i in range(40):
        logger.log("ctr", f"k{i}", hit=True)
    for _ in range(3):
        logger.log("ctr", "never", hit=False)
    logger.log("ctr", "rare", hit=False)
    logger.close()
    stats = cache_stats(redis_client, schema, window_s=600)
    ctr = stats["kinds"]["ctr"]
    assert ctr["current"]["version"] == "v1" and ctr["current"]["keys"] == 500
    assert ctr["current"]["memory_bytes"] > 0 and 0 < ctr["current"]["ttl_s"] <= 600
    assert ctr["window"]["requests"] == 44 and ctr["window"]["hits"] == 40
    assert ctr["window"]["hit_rate"] == pytest.approx(40 / 44)
    assert ctr["window"]["most_missed"] == [["never", 3], ["rare", 1]]
    assert ctr["previous"] == {"version": None}  # nothing replaced yet
    publish(redis_client, schema, "ctr", "v2", [f"k{i}" for i in range(300)])  # v1 lives out its grace
    both = cache_stats(redis_client, schema, window_s=600)["kinds"]["ctr"]
    assert both["current"]["version"] == "v2" and both["current"]["keys"] == 300
    assert both["previous"]["version"] == "v1" and both["previous"]["keys"] == 500
    assert both["previous"]["memory_bytes"] > 0 and 0 < both["previous"]["ttl_s"] <= 600
    redis_client.delete(schema.previous("ctr"))  # its grace is over: no longer reported
    assert cache_stats(redis_client, schema, window_s=600)["kinds"]["ctr"]["previous"] == {"version": None}
    sampled = cache_stats(redis_client, schema, window_s=600, sample=10)["kinds"]["ctr"]["window"]
    assert sampled["sampled"] and sampled["requests"] == 10  # the newest 10 entries only
    ages = cache_stats(redis_client, schema, window_s=1e30)["kinds"]["ctr"]["window"]  # longer than the epoch
    assert ages["requests"] == 44  # the whole log, not a stream-ID error
    with pytest.raises(ValueError, match="window must be positive"):
        cache_stats(redis_client, schema, window_s=0)


def test_stats_split_the_hit_rate_by_the_version_each_lookup_read(redis_url, redis_client, schema):
    logger = QueryLogger(log_client(redis_url), schema)
    cache = PredictionCache(connect(redis_url, socket_timeout=5), schema=schema, pointer_ttl_s=0, logger=logger)
    cache.get("ctr", "k0")  # no version published yet: logged without one
    publish(redis_client, schema, "ctr", "v1", [f"k{i}" for i in range(10)])
    [cache.get("ctr", f"k{i}") for i in range(20)]  # 10 hits, 10 misses on v1
    publish(redis_client, schema, "ctr", "v2", [f"k{i}" for i in range(20)])
    [cache.get("ctr", f"k{i}") for i in range(5)]  # 5 hits on v2
    cache.get_many("ctr", ["k19", "k20"])  # a batch: 1 hit, 1 miss on v2
    logger.close()
    window = cache_stats(redis_client, schema, window_s=600)["kinds"]["ctr"]["window"]
    assert window["requests"] == 28 and window["hits"] == 16
    assert window["versions"] == [
        {"version": "v1", "requests": 20, "hits": 10, "hit_rate": 0.5},
        {"version": "v2", "requests": 7, "hits": 6, "hit_rate": pytest.approx(6 / 7)},
        {"version": None, "requests": 1, "hits": 0, "hit_rate": 0.0},
    ]
    cache.close()


@pytest.fixture
def dagster_home(dagster_pg_url, tmp_path, monkeypatch):
    """A deployment's DAGSTER_HOME on a scratch PostgreSQL database: ``cache stats`` reads task runs from it."""
    with scratch_database(dagster_pg_url, "dagster") as url:
        home = tmp_path / "dagster_home"
        home.mkdir()
        (home / "dagster.yaml").write_text(f"storage:\n  postgres:\n    postgres_url: {url}\n")
        monkeypatch.setenv("DAGSTER_HOME", str(home))
        yield home


def test_cache_cli_invalidates_and_reports_in_one_line_errors(
    redis_url, redis_client, schema, monkeypatch, capsys, dagster_home
):
    monkeypatch.setenv("PRECOMPUTE_REDIS_URL", redis_url)
    publish(redis_client, schema, "ctr", "v1", ["a", "b"])
    ns = ["--namespace", schema.namespace]
    assert main(["cache", "invalidate", "--kind", "ctr", "--key", "a", *ns]) == 0
    assert json.loads(capsys.readouterr().out)["fields"] == 1
    assert main(["cache", "invalidate", "--kind", "ctr", "--version", "v1", *ns]) == 2
    err = capsys.readouterr().err
    assert err.startswith("precompute cache: ") and "is current" in err and err.count("\n") == 1
    assert main(["cache", "stats", "--json", "--window", "30m", *ns]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["window_s"] == 1800 and out["kinds"]["ctr"]["current"]["keys"] == 1
    assert set(out["tasks"]) >= {"ctr", "dashboard", "next_actions"}, out["tasks"]
    assert out["tasks"]["ctr"] == {"queued": 0, "running": 0, "succeeded": 0, "failed": 0, "avg_run_s": None,
                                   "max_run_s": None, "ended_sampled": False}  # fmt: skip
    assert main(["cache", "stats", "--kind", "ctr", *ns]) == 0
    assert "ctr" in capsys.readouterr().out
    assert main(["cache", "stats", "--kind", "nope", *ns]) == 0
    out = capsys.readouterr().out
    assert "nope             no statistics: no published version" in out and "(kinds with statistics: ctr)" in out
    assert main(["cache", "stats", "--kind", "nope", "--json", *ns]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["without_statistics"], out["kinds_with_statistics"]) == (["nope"], ["ctr"])
    with pytest.raises(SystemExit) as exited:
        main(["cache", "stats", "--window", "soon", *ns])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "expected a duration" in err and err.count("\n") == 1
    assert duration_s("2d") == 172_800 and duration_s("90") == 90
    # One kind's malformed pointer made `cache stats` fail for every kind of the namespace.
    redis_client.set(schema.pointer("zz"), b"garbage")
    assert main(["cache", "stats", *ns]) == 0
    out = capsys.readouterr().out
    assert "zz               malformed pointer 'garbage'" in out and "\nctr " in out, out
    # A typo of the kind or version exited 0 with zero counts and nothing else said.
    assert main(["cache", "invalidate", "--kind", "ctrs", "--key", "a", *ns]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["total"] == 0 and "nothing of kind 'ctrs'" in err and err.count("\n") == 1


def test_cache_cli_uses_the_url_given_when_the_home_cannot_be_read(redis_url, schema, tmp_path, monkeypatch, capsys):
    """`cache` follows a home's Redis to a port `up` moved it to, but a home that cannot be read (a stack.json not
    written by us) refused the command, where the URL given worked (h_diff3)."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "stack.json").write_text("garbage")
    monkeypatch.setenv("PRECOMPUTE_HOME", str(home))
    monkeypatch.setenv("PRECOMPUTE_REDIS_URL", redis_url)
    argv = ["cache", "invalidate", "--kind", "ctr", "--key", "zz", "--namespace", schema.namespace]
    assert main(argv) == 0, capsys.readouterr().err


def test_cache_cli_without_a_redis_says_so_and_writes_no_state(tmp_path, monkeypatch, capsys):
    """With no URL and no embedded stack up, `cache stats` wrote a new home's state (its secret, its ports) and then
    failed with "Connection refused" on a port it had just picked."""
    monkeypatch.delenv("PRECOMPUTE_REDIS_URL", raising=False)
    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    assert main(["cache", "stats"]) == 2
    err = capsys.readouterr().err
    assert "the embedded one of" in err and "precompute up" in err and err.count("\n") == 1, err
    assert not (tmp_path / "home").exists() or not any((tmp_path / "home").iterdir())


def test_task_stats_say_why_when_dagster_storage_is_not_there(monkeypatch, tmp_path):
    from precompute_assets.stack import ENV_HOME
    from precompute_assets.tools.cli import task_stats

    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.setenv(ENV_HOME, str(tmp_path / "nothing-here"))
    assert task_stats(3600) == {"unavailable": "no DAGSTER_HOME and no local stack (`precompute up`)"}


def test_task_stats_name_the_dagster_storage_that_failed(monkeypatch, tmp_path):
    """A storage that did not answer printed psycopg2's line alone, naming no setting (h_prod2)."""
    from precompute_assets.stack import ENV_DAGSTER_PG, ENV_HOME
    from precompute_assets.tools import cli

    monkeypatch.setenv(ENV_HOME, str(tmp_path / "home"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    monkeypatch.setenv(ENV_DAGSTER_PG, "postgresql://u:s3cret@127.0.0.1:1/dagster")

    @contextlib.contextmanager
    def refused(stack):
        raise psycopg2.OperationalError('connection to server at "127.0.0.1", port 1 failed: Connection refused')
        yield

    monkeypatch.setattr(cli, "dagster_instance", refused)
    why = cli.task_stats(3600)["unavailable"]
    assert why.startswith("Dagster's storage, DAGSTER_PG_URL (postgresql://u:***@127.0.0.1:1/dagster): "), why
    assert "OperationalError: connection to server" in why and "s3cret" not in why


def test_stats_sample_the_fields_of_a_bucket_grown_big(redis_server, schema):
    """``cache stats`` read each sampled bucket's memory with ``MEMORY USAGE ... SAMPLES 0``, which walks every field:
    26 ms for one embedding bucket of 300,000 fields (a big load patched into a version built for a small corpus),
    blocking the server. It samples ``MEMORY_SAMPLE_FIELDS`` fields now: all of a bucket of the usual size."""
    server = redis_server(extra_config=LOG_EVERY_COMMAND)
    client = connect(server.url, socket_timeout=5)
    pointer = Pointer("v1", 1)
    patch_version(client, "ctr", pointer, [(f"k{i}", 0.5) for i in range(5000)], schema=schema)
    client.set(schema.pointer("ctr"), pointer.encode())
    commands_run(client)
    current = version_stats(client, schema, "ctr")
    usage = [args for args, _ in commands_run(client) if args[:2] == ["MEMORY", "USAGE"]]
    assert usage and all(args[3:] == ["SAMPLES", str(MEMORY_SAMPLE_FIELDS)] for args in usage), usage
    assert current["keys"] == 5000 and current["memory_bytes"] > 5000 * 4
    small = schema.bucket("ctr", "v2", 0)
    client.hset(small, mapping={f"k{i}": b"\0\0\0?" for i in range(KEYS_PER_BUCKET)})
    assert client.memory_usage(small, samples=MEMORY_SAMPLE_FIELDS) == client.memory_usage(small, samples=0)


def test_stats_say_the_memory_of_a_bucket_grown_big_is_estimated(redis_client, schema):
    """``MEMORY USAGE ... SAMPLES`` extrapolates a bucket of more fields than it samples: a version of one bucket of
    5,000 keys got an estimated ``memory_bytes`` reported as exact (``memory_estimated`` false, all buckets read)."""
    pointer = Pointer("v1", 1)
    patch_version(redis_client, "ctr", pointer, [(f"k{i}", 0.5) for i in range(5000)], schema=schema)
    redis_client.set(schema.pointer("ctr"), pointer.encode())
    assert version_stats(redis_client, schema, "ctr")["memory_estimated"] is True
    small = Pointer("v2", pointer.buckets)
    patch_version(redis_client, "ctr", small, [(f"k{i}", 0.5) for i in range(100)], schema=schema)
    redis_client.set(schema.pointer("ctr"), small.encode())
    assert version_stats(redis_client, schema, "ctr")["memory_estimated"] is False


def test_stats_read_the_ttl_of_a_bucket_that_exists(redis_url, redis_client, schema, monkeypatch, capsys, dagster_home):
    """``ttl_s`` was the TTL of bucket 0: Redis's -2 (no such key) for an empty version (``top_ads`` publishes one
    where precomputing would hurt) or one whose bucket 0 lost every key to invalidations, which ``cache stats``
    showed as a TTL of "-2s". It is the TTL of a bucket that exists, and None (shown "-") when none does."""
    keys = [f"k{i}" for i in range(3 * KEYS_PER_BUCKET)]
    publish(redis_client, schema, "ctr", "v1", keys)
    left = len(keys) - redis_client.hlen(schema.bucket("ctr", "v1", 0))
    redis_client.delete(schema.bucket("ctr", "v1", 0))  # as if every key of bucket 0 had been invalidated
    assert 0 < version_stats(redis_client, schema, "ctr")["ttl_s"] <= 600
    publish(redis_client, schema, "ctr", "v2", [])
    assert version_stats(redis_client, schema, "ctr")["ttl_s"] is None
    monkeypatch.setenv("PRECOMPUTE_REDIS_URL", redis_url)
    assert main(["cache", "stats", "--kind", "ctr", "--namespace", schema.namespace]) == 0
    (current, replaced) = [line.split() for line in capsys.readouterr().out.splitlines()[1:3]]
    assert current[:5] == ["ctr", "v2", "0", "0B", "-"] and replaced[1:3] == ["v1", str(left)]
    assert replaced[3].endswith("kB") and float(replaced[3][:-2]) > 1  # a small version's size, not "0.0MB"


def test_an_invalidation_says_in_one_line_when_dagster_keeps_no_copy(redis_url, redis_client, schema, monkeypatch,
                                                                     capsys, tmp_path):  # fmt: skip
    """A DAGSTER_HOME without a dagster.yaml: Dagster made a store there that no run reads, and said nothing of the
    copy (h_diff23). The invalidation is done, exit code 0, and one line says the record is Redis's only."""
    monkeypatch.setenv("PRECOMPUTE_REDIS_URL", redis_url)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "empty_home"))
    (tmp_path / "empty_home").mkdir()
    publish(redis_client, schema, "ctr", "v1", ["a", "b"])
    assert main(["cache", "invalidate", "--kind", "ctr", "--key", "a", "--namespace", schema.namespace]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the invalidation of v1 is recorded in Redis only" in err, err
    assert "no dagster.yaml in" in err and not any((tmp_path / "empty_home").iterdir())
