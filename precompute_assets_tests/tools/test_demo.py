"""The demo's hit-rate comparison (equal capacity, equal warm-up) and its end-to-end serving counts.

A real demo run starts the whole stack and takes minutes; these test its parts on synthetic data.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Hashable, Iterable

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from precompute_assets.serving import KeySchema, PredictionCache, connect, publish_version
from precompute_assets.tools.cli import main
from precompute_assets.tools.demo import compare_policies, published_keys, serve_end_to_end
from precompute_assets.workload.serve import SimClock, serve_traffic

RATES = ("hit_rate_ours", "hit_rate_read_through", "hit_rate_static_top_n", "hit_rate_belady")


def keys(*names: str) -> np.ndarray:
    return np.array(names, dtype=object)


def counted_hits(result: dict, rate: str) -> int:
    return round(result[rate] * result["requests_compared"])


def reference_lru_hits(history: Iterable[Hashable], day: Iterable[Hashable], slots: int, precomputed=frozenset()):
    """Hits on ``day`` of an LRU of ``slots`` keys warmed on ``history``; ``precomputed`` keys hit on ``day``
    without touching the LRU. The obvious implementation, for one day of history (no selection in it)."""
    cache: OrderedDict[Hashable, None] = OrderedDict()
    hits = 0
    for counted, requests in ((False, history), (True, day)):
        for key in requests:
            if counted and key in precomputed:
                hits += 1
            elif key in cache:
                cache.move_to_end(key)
                hits += counted
            elif slots:
                cache[key] = None
                if len(cache) > slots:
                    cache.popitem(last=False)
    return hits


def test_the_comparison_names_every_rate_and_its_terms():
    result = compare_policies([keys("b", "a")], keys("a", "c"), {"c"}, top_n=1, capacity=2)
    assert result == {
        "capacity_keys": 2,
        "warmup_days": 1,
        "requests_compared": 2,
        "hit_rate_ours": 1.0,  # a in its one LRU slot, c published: the preload beats read-through's optimum
        "hit_rate_read_through": 0.5,
        "hit_rate_static_top_n": 0.5,
        "hit_rate_belady": 0.5,
        "hit_rate_oracle_preload": 1.0,
    }


def test_ours_gets_the_same_capacity_top_n_slots_are_reserved_even_when_unused():
    # Read-through keeps both history keys in its 2 slots; ours has 1 LRU slot beside its top-N slot, so with
    # nothing published it is an LRU of 1 key and the scan x, y misses twice.
    history, day = [keys("x", "y")], keys("x", "y")
    result = compare_policies(history, day, set(), top_n=1, capacity=2)
    assert result["hit_rate_read_through"] == 1.0
    assert result["hit_rate_ours"] == 0.0
    assert result["hit_rate_ours"] == compare_policies(history, day, set(), top_n=0, capacity=1)["hit_rate_ours"]
    # With every slot precomputed, ours is the published set and nothing else.
    only_published = compare_policies(history, day, {"y"}, top_n=2, capacity=2)
    assert only_published["hit_rate_ours"] == only_published["hit_rate_static_top_n"] == 0.5


def test_both_policies_are_warmed_on_the_same_history():
    # k1 and k2 are asked only in the history: with room for them, both policies hit them on the next day.
    history = [keys("k1", "k2"), keys("k2", "k1")]
    day = keys("k1", "k2", "p", "p")
    result = compare_policies(history, day, {"p"}, top_n=1, capacity=3)
    assert result["hit_rate_read_through"] == 0.75  # k1, k2 warm; p misses once, then hits
    assert result["hit_rate_ours"] == 1.0  # k1, k2 warm in its 2 LRU slots; p published
    assert result["warmup_days"] == 2 and result["requests_compared"] == 4


def test_ours_and_read_through_against_an_independent_lru():
    rng = np.random.default_rng(7)
    for _ in range(40):
        history, day = (np.array([f"ad{k}" for k in np.minimum(rng.zipf(1.3, 300), 80)], dtype=object) for _ in "hd")
        top_n = int(rng.integers(0, 12))
        capacity = top_n + int(rng.integers(1, 20))
        published = set(rng.choice([f"ad{k}" for k in range(1, 100)], size=top_n, replace=False).tolist())
        result = compare_policies([history], day, published, top_n=top_n, capacity=capacity)
        assert counted_hits(result, "hit_rate_read_through") == reference_lru_hits(history, day, capacity)
        assert counted_hits(result, "hit_rate_ours") == reference_lru_hits(
            history, day, capacity - top_n, frozenset(published)
        )
        assert counted_hits(result, "hit_rate_static_top_n") == int(np.isin(day, list(published)).sum())


@pytest.mark.parametrize("seed", range(5))
def test_the_bounds_hold_on_drifting_traffic(seed: int):
    rng = np.random.default_rng(seed)
    days = [np.array([f"ad{k + 15 * d}" for k in np.minimum(rng.zipf(1.2, 2000), 400)]) for d in range(4)]
    history, day = days[:-1], days[-1]
    top_n, capacity = 30, 60
    counts = pd.Series(np.concatenate(history)).value_counts()
    published = set(counts.index[:top_n])
    result = compare_policies(history, day, published, top_n=top_n, capacity=capacity)
    # Belady bounds read-through caches (up to capacity - 1 hits of slack after a warm-up; none here).
    assert result["hit_rate_read_through"] <= result["hit_rate_belady"]
    # No cache of ``capacity`` keys, precomputing or not, beats the oracle that reloads at the day boundary.
    assert all(result[rate] <= result["hit_rate_oracle_preload"] <= 1.0 for rate in RATES)
    assert result["hit_rate_ours"] >= result["hit_rate_static_top_n"]


def test_bad_comparisons():
    with pytest.raises(ValueError, match="capacity 1 is smaller than top_n 2"):
        compare_policies([keys("a")], keys("a"), set(), top_n=2, capacity=1)
    with pytest.raises(ValueError, match="exceeds top_n"):
        compare_policies([keys("a")], keys("a"), {"a", "b"}, top_n=1, capacity=3)
    with pytest.raises(ValueError, match="history"):
        compare_policies([], keys("a"), set(), top_n=0, capacity=1)


def test_demo_capacity_below_top_n_is_one_line_and_starts_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "never-started"))
    assert main(["demo", "--top-n", "10", "--capacity", "5"]) == 2
    err = capsys.readouterr().err
    assert err == "precompute demo: --capacity 5 is smaller than --top-n 10\n"
    assert not (tmp_path / "never-started").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--capacity", "0"])
    assert exit_info.value.code == 2 and "--capacity: must be at least 1, got 0" in capsys.readouterr().err


def test_end_to_end_counts_hits_of_the_published_version_and_of_live_keys(redis_server):
    url = redis_server().url
    client, schema = connect(url, socket_timeout=5), KeySchema()
    publish_version(client, "ctr", "2024-01-02.abcd1234.0", [("a", 0.1), ("b", 0.2)], n_keys=2, schema=schema)
    published = published_keys(url, "ctr", version="2024-01-02.abcd1234.0")
    assert published == {"a", "b"}
    with pytest.raises(RuntimeError, match="not the current one"):
        published_keys(url, "ctr", version="2024-01-01.older000.0")

    def traffic(ad_ids: list[str], start_ms: int) -> pd.DataFrame:
        return pd.DataFrame({"ts_ms": range(start_ms, start_ms + len(ad_ids)), "ad_id": ad_ids, "user": "u1"})

    clock = SimClock()
    history = PredictionCache.from_url(url, clock=clock, socket_timeout=1.0)
    serve_traffic(history, clock, [traffic(["c", "d"], 1_000)], lambda key: 0.5)
    history.close()
    served = serve_end_to_end(url, traffic(["a", "c", "e", "a", "e", "b"], 2_000), published, lambda key: 0.5)
    client.close()
    assert served["queries"] == 6
    assert served["hits_published_version"] == 3  # a, a, b
    assert served["hits_live_read_through"] == 2  # c from the history, e from its own first miss
    assert served["hit_rate"] == round(5 / 6, 4)
    assert "not bounded in capacity" in served["note"]


def test_a_demo_again_drains_the_hours_of_the_one_before(redis_url, redis_client, schema, lake_uri, pg_instance):
    # Each demo resets Redis, and its stream IDs of an hour are not the last demo's (entries are batched by timing):
    # the drain refused to replace the last demo's partition ("the stream no longer holds 1 of its 123 events").
    import dagster as dg

    from precompute_assets.defs.query_logs import query_logs, query_logs_job
    from precompute_assets.defs.resources import LakeResource, ParquetIOManager, RedisResource
    from precompute_assets.serving import QueryLogger
    from precompute_assets.storage.lake import Lake
    from precompute_assets.tools.demo import drain

    hour, start_ms = "2026-11-20-10:00", 1_795_168_800_000
    lake = LakeResource(base_uri=lake_uri)
    resources = {
        "redis": RedisResource(url=redis_url, namespace=schema.namespace),
        "io_manager": ParquetIOManager(lake=lake),
        "lake": lake,
    }
    job = dg.Definitions(assets=[query_logs], jobs=[query_logs_job], resources=resources).resolve_job_def(
        "query_logs_job"
    )
    for demo, n in enumerate((5, 3)):
        redis_client.delete(schema.query_log())  # the demo's reset
        logger = QueryLogger(connect(redis_url), schema, clock=lambda at=start_ms + 10 + demo: at)
        for i in range(n):
            logger.log("ctr", f"ad{i}", hit=False)
        logger.close()
        assert drain(job, pg_instance, Lake(lake_uri), [hour], "query_logs") == n
    assert len(Lake(lake_uri).read("query_logs", hour)) == 3


def test_the_demo_refuses_an_external_redis_with_one_line_and_exit_2(
    tmp_path, monkeypatch, capsys, redis_server, dagster_pg_url, app_db_url
):
    """The demo flushes its Redis: on a production server it is refused before anything is written (it exited 1)."""
    server = redis_server()
    client = connect(server.url, socket_timeout=5)
    client.set("someone-else:key", "kept")
    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PRECOMPUTE_REDIS_URL", server.url)
    monkeypatch.setenv("DAGSTER_PG_URL", dagster_pg_url)
    monkeypatch.setenv("PRECOMPUTE_APP_DB_URL", app_db_url)
    assert main(["demo", "--days", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "precompute demo: the demo resets Redis" in err and "PRECOMPUTE_REDIS_URL" in err
    assert client.get("someone-else:key") == b"kept" and client.dbsize() == 1
    client.close()


def refused_demo(tmp_path, monkeypatch, capsys, **variables: str) -> str:
    """``precompute demo`` in a home of its own under ``variables`` (blank ones: the stack's own), which must exit 2
    before it generates anything; its stderr. Whatever ``up`` exports into the process is restored after the test."""
    import precompute_assets.tools.demo as demo
    from precompute_assets.stack import Stack

    def writes(*args, **kwargs):
        raise AssertionError("the demo went on to generate and write its synthetic catalog")

    monkeypatch.setattr(demo, "make_ads", writes)
    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    for name in Stack(tmp_path / "home").env():
        monkeypatch.setenv(name, os.environ.get(name, ""))
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    try:
        assert main(["demo", "--days", "2"]) == 2
    finally:
        Stack(tmp_path / "home").redis.stop()
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_the_demo_refuses_a_lake_other_than_the_stacks_own_with_one_line_and_exit_2(
    tmp_path, monkeypatch, capsys, dagster_pg_url, app_db_url
):
    """The demo replaces the lake's ads and impressions: with PRECOMPUTE_LAKE_URI naming the lake that holds an
    operator's own catalog it overwrote it (an external Redis was refused, an external lake was not)."""
    lake = tmp_path / "their-lake"
    (lake / "ads").mkdir(parents=True)
    (lake / "ads" / "__unpartitioned__.parquet").write_bytes(b"their catalog")
    err = refused_demo(
        tmp_path, monkeypatch, capsys, PRECOMPUTE_REDIS_URL="", DAGSTER_PG_URL=dagster_pg_url,
        PRECOMPUTE_APP_DB_URL=app_db_url, PRECOMPUTE_LAKE_URI=str(lake),
    )  # fmt: skip
    assert "precompute demo: the demo replaces the lake's ads" in err and str(lake) in err
    assert [p.name for p in lake.rglob("*") if p.is_file()] == ["__unpartitioned__.parquet"]
    assert (lake / "ads" / "__unpartitioned__.parquet").read_bytes() == b"their catalog"


def test_the_demo_refuses_someone_elses_dagster_storage_and_model_store_with_one_line_and_exit_2(
    tmp_path, monkeypatch, capsys, dagster_pg_url, app_db_url
):
    """With the stack's own Redis and lake but DAGSTER_PG_URL, PRECOMPUTE_APP_DB_URL and PRECOMPUTE_MODEL_STORE naming
    a deployment's, the demo wrote its runs into that run history and its synthetic ctr_model, approved, into that
    model store: the newest approved model the deployment's next ctr_predictions would follow."""
    models = tmp_path / "their-models"
    models.mkdir()
    err = refused_demo(
        tmp_path, monkeypatch, capsys, PRECOMPUTE_REDIS_URL="", PRECOMPUTE_LAKE_URI="", DAGSTER_PG_URL=dagster_pg_url,
        PRECOMPUTE_APP_DB_URL=app_db_url, PRECOMPUTE_MODEL_STORE=str(models),
    )  # fmt: skip
    assert "precompute demo: the demo records its runs and approves a synthetic" in err
    assert "DAGSTER_PG_URL, PRECOMPUTE_APP_DB_URL, PRECOMPUTE_MODEL_STORE" in err
    assert list(models.iterdir()) == []


def test_a_demo_clears_the_history_an_earlier_demo_left_outside_its_days(tmp_path):
    """A second demo of fewer days in the same home trained ctr_model on the first one's older impressions too, of
    another catalog under the same ad ids: it failed beats_baseline and the demo exited 2 (h_backfill)."""
    from precompute_assets.storage.lake import Lake
    from precompute_assets.tools.demo import clear_other_days
    from precompute_assets_tests.factories import write_query_logs

    lake = Lake(str(tmp_path / "lake"))
    days = ["2026-11-26", "2026-11-27", "2026-11-28"]
    for day in days:
        lake.write("ad_impressions", day, pd.DataFrame({"ts_ms": [1], "ad_id": ["ad1"], "clicked": [False]}))
        write_query_logs(lake, day, ["ad1"])
    lake.write("ads", None, pd.DataFrame({"ad_id": ["ad1"]}))
    assert clear_other_days(lake, days[1:]) == 1 + 24
    assert lake.partitions("ad_impressions") == days[1:]
    assert {hour[:10] for hour in lake.partitions("query_logs")} == set(days[1:])
    assert lake.exists("ads")


def test_the_demo_refuses_a_day_ctr_cache_would_not_publish_before_resetting_anything():
    """The daily schedule had published a later day on the stack: the demo reset Redis and the lake, its ctr_cache
    declined to publish over the later day Dagster recorded, and the demo crashed on a KeyError (h_upgrade). Whether
    ctr_cache would publish is asked first."""
    from precompute_assets.tools.demo import publish_blocked

    with dg.DagsterInstance.ephemeral() as instance:
        assert publish_blocked(instance, "2026-12-05") is None
        published = {"version": "2026-12-06.abc", "model_version": "m1"}
        instance.report_runless_asset_event(
            dg.AssetMaterialization("ctr_cache", partition="2026-12-06", metadata=published)
        )
        assert publish_blocked(instance, "2026-12-05") == "Dagster records a publish of a later day, 2026-12-06.abc"
        assert publish_blocked(instance, "2026-12-07") is None
        rolled = {"version": "2026-12-04.def", "model_version": "m1", "rolled_back_over": "2026-12-06"}
        instance.report_runless_asset_event(
            dg.AssetMaterialization("ctr_cache", partition="2026-12-04", metadata=rolled)
        )
        assert publish_blocked(instance, "2026-12-05") == "an operator rolled 2026-12-06 back"
        assert publish_blocked(instance, "2026-12-07") is None


def test_a_demo_stage_says_it_is_working_in_a_log(monkeypatch, capsys):
    """The README says the demo prints a line every 30 s outside a terminal; its stages of minutes of Dagster runs
    printed none (h_readme3)."""
    import time

    from precompute_assets.tools import progress
    from precompute_assets.tools.demo import Stages

    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.02)
    stages = Stages()
    with stages.timed("materialize_query_logs"):
        time.sleep(0.15)
    lines = capsys.readouterr().err.splitlines()
    assert lines and lines[0].startswith("materialize_query_logs: in ") and lines[-1].endswith(", done"), lines
    assert stages["materialize_query_logs"] >= 0.15
    with stages.timed("serve_history", counted=True):  # its own counter says it is working: no second line
        time.sleep(0.1)
    assert capsys.readouterr().err == ""
