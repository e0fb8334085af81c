"""The benchmark commands run and report every promised key (small sizes; no assertion on speed)."""

import json
import shutil

import numpy as np
import psycopg2
import pytest

from precompute_assets.ml.demand import DemandHyperParams
from precompute_assets.serving import connect
from precompute_assets.storage.postgres import libpq_url
from precompute_assets.tools.bench import (
    bench_campaign,
    bench_demand,
    bench_graph,
    bench_publish,
    bench_serve,
    synthetic_hourly_counts,
)


def test_bench_serve_reports_latencies_and_ratio(redis_url):
    result = bench_serve(redis_url, n_keys=500, lookups=3000)
    for key in ("get_p50_us", "get_p99_us", "raw_get_p50_us", "raw_get_p99_us", "p50_ratio", "log_events_per_s"):
        assert result[key] > 0, key
    assert result["p50_ratio"] == round(result["get_p50_us"] / result["raw_get_p50_us"], 3)
    assert result["lookup_events_logged"] + result["lookup_events_dropped"] == 3000 + 2000  # + warm-up


def test_bench_publish_reports_rates_and_ratios(redis_url, redis_client):
    result = bench_publish(redis_url, n=5000, naive_n=500)
    assert result["keys"] == 5000 and result["keys_per_s"] > 0 and result["naive_keys_per_s"] > 0
    assert result["ratio_vs_naive"] == round(result["keys_per_s"] / result["naive_keys_per_s"], 2)
    for key in ("redis_bytes_per_key", "naive_redis_bytes_per_key"):
        assert 1 <= result[key] <= 1000, (key, result[key])
    assert result["ratio_bytes_vs_naive"] == round(
        result["redis_bytes_per_key"] / result["naive_redis_bytes_per_key"], 3
    )
    # the two sides' values are told apart: 4-byte float32 against JSON text of ~18 characters (repr of a random float)
    assert result["value_bytes"] == 4 and 15 <= result["naive_value_bytes"] <= 24
    if result["redis_benchmark_set_per_s"] is None:  # redis-tools not installed: reported as null
        assert result["ratio_vs_redis_benchmark"] is None
    else:
        assert result["ratio_vs_redis_benchmark"] > 0
    assert not list(redis_client.scan_iter("bench*", count=1000))  # cleaned up after itself


def test_redis_benchmark_never_has_the_urls_password_on_its_command_line(redis_url, redis_client, monkeypatch):
    """Every account of the machine reads a command line: `-a <password>` showed the home's password for the run."""
    import subprocess
    from urllib.parse import urlsplit

    from precompute_assets.tools.bench import redis_benchmark_set

    if shutil.which("redis-benchmark") is None:
        pytest.skip("redis-benchmark (Debian's redis-tools) is not installed: scripts/test installs it as root")
    seen, run = [], subprocess.run
    monkeypatch.setattr(subprocess, "run", lambda command, **kw: seen.append(command) or run(command, **kw))
    password = urlsplit(redis_url).password
    assert password and redis_benchmark_set(redis_url, requests=2000, value_size=4) > 0
    assert seen and not any(password in " ".join(command) for command in seen)
    assert not [user for user in redis_client.acl_users() if user.startswith("precompute-bench-")]  # gone after


def test_bench_graph_reports_asset_seconds_and_io_floor(redis_url, redis_client, capfd):
    # The days end yesterday and a day's traffic depends on its weekday: on 20,000 queries the forest lost its
    # beats_baseline check to logistic regression for 3 of 7 end days; on 60,000 it passed for all 7.
    result = bench_graph(queries=60_000, ads=500, days=7, top_ns=(100, 1000, 2000), redis_url=redis_url)
    assert result["queries"] > 0 and result["io_floor_seconds"] > 0
    assert result["io_floor_rows"] == 2 * result["queries"]  # every logged query and every impression, once
    run = result["top_100"]
    assert run["keys_published"] == 100 and run["total_asset_seconds"] > 0
    assert run["ratio_vs_io_floor"] == round(run["total_asset_seconds"] / result["io_floor_seconds"], 2)
    # With fewer ads than N, both larger selections predict the same ads: each is still a publish, not a no-op
    assert result["top_1000"]["keys_published"] == result["top_2000"]["keys_published"] > 100
    assert not list(redis_client.scan_iter("bench*", count=1000))
    assert "STEP_START" not in capfd.readouterr().err  # Dagster's event lines flooded stderr (h_bench)


def test_bench_graph_on_too_little_traffic_says_which_check_failed_and_cleans_up(redis_url, redis_client):
    with pytest.raises(
        ValueError, match="ctr_model's check beats_baseline: no model trained: training data has a single"
    ):
        bench_graph(queries=1000, ads=1, days=7, top_ns=(100,), redis_url=redis_url)
    assert not list(redis_client.scan_iter("bench*", count=1000))
    with pytest.raises(ValueError, match="--queries must be at least 7"):
        bench_graph(queries=6, ads=5, days=7, top_ns=(100,), redis_url=redis_url)


def test_bench_campaign_reports_the_tick_the_warming_and_the_naive_loop(
    redis_url, app_db_url, dagster_pg_url, redis_client, capfd
):
    def scratch_databases() -> set[str]:
        with psycopg2.connect(libpq_url(app_db_url)) as conn, conn.cursor() as cur:
            cur.execute("SELECT datname FROM pg_database WHERE datname LIKE 'bench%'")
            return {row[0] for row in cur.fetchall()}

    before = scratch_databases()
    result = bench_campaign(redis_url, app_db_url, dagster_pg_url, campaigns=200, ads_per_campaign=5, warm_ads=50)
    assert "STEP_START" not in capfd.readouterr().err  # Dagster's event lines flooded stderr (h_bench)
    assert result["campaigns"] == result["runs_requested"] == 200  # one run request per due campaign
    assert result["sensor_tick_s"] > 0 and result["sensor_next_tick_s"] > 0
    assert result["warm_ads"] == 50 and result["values_agree"] is True
    assert result["warm_seconds"] >= result["register_seconds"] + result["run_seconds"] - 0.002 > 0
    assert 0 < result["minutes_before_launch"] <= 120  # launched 2 h after registration
    assert result["naive_warm_seconds"] > 0
    # Both times are rounded to ms: a naive time of tens of ms moves their ratio by up to about 1 %.
    assert result["ratio_vs_naive"] == pytest.approx(result["naive_warm_seconds"] / result["warm_seconds"], rel=0.03)
    assert not list(redis_client.scan_iter("bench*", count=1000))  # both namespaces removed
    assert scratch_databases() == before  # the scratch app and Dagster databases dropped


def test_bench_demand_reports_every_promised_key_on_a_tiny_size():
    hp = DemandHyperParams(max_epochs=2, top_n=50)
    result = bench_demand(keys=300, days=9, seed=1, hp=hp)
    assert result["keys"] == 300 and result["days"] == 9 and result["lstm_epochs"] == 2
    assert (result["lstm_steps"], result["lstm_stopped_by"]) == (2 * 2, "epochs")  # 300 samples: 2 batches an epoch
    assert result["lstm_budget"]["max_steps"] == hp.max_steps
    assert result["lstm_budget"]["window_days"] == 7  # 8 days before the held-back one: hp's 7
    assert bench_demand(keys=30, days=4, seed=1, hp=hp)["lstm_budget"]["window_days"] == 2  # as trained: 3 days
    assert result["lstm_train_s"] > 0 and result["lstm_forecast_s"] > 0 and result["frequency_s"] > 0
    assert result["lstm_forecast_vs_frequency"] > 0  # from the unrounded seconds
    assert set(result["heldout_hit_rate"]) == {"lstm", "frequency", "seasonal", "ewma"}
    assert all(0 <= rate <= 1 for rate in result["heldout_hit_rate"].values())
    data = synthetic_hourly_counts(300, 9, seed=1)  # deterministic under the seed
    assert result["requests_held_back_day"] == int(data.daily()[:, -1].sum())
    assert data.counts.shape == (300, 9 * 24) and data.n_days == 9
    assert np.array_equal(data.counts, synthetic_hourly_counts(300, 9, seed=1).counts)
    with pytest.raises(ValueError, match="at least 3 days"):
        bench_demand(keys=10, days=2)


def test_bench_demand_refuses_a_size_beyond_a_quarter_of_the_memory_before_generating_it():
    from precompute_assets.tools.bench import check_demand_size

    check_demand_size(100_000, 14, memory_bytes=2**30)  # 0.13 GiB of counts: a quarter of 1 GiB holds it
    with pytest.raises(ValueError, match=r"100,000 keys × 1,000 days of hourly counts take 8\.9 GiB, more than a qu"):
        check_demand_size(100_000, 1000, memory_bytes=24 * 2**30)
    with pytest.raises(ValueError, match="use fewer --keys or --days"):  # this machine's memory, whatever it is
        bench_demand(keys=100_000, days=10**9)


def test_bench_load_reports_ours_beside_the_bare_load(redis_url, redis_client):
    from precompute_assets.tools.load import bench_load

    result = bench_load(redis_url, processes=2, seconds=1.0, keys=2000)
    for key in ("processes", "requests_per_s", "p50_us", "p99_us", "p999_us", "errors", "events_dropped",
                "raw_requests_per_s", "raw_p99_us"):  # fmt: skip
        assert key in result, key
    assert result["processes"] == 2 and result["errors"] == 0 and result["raw_errors"] == 0
    assert result["requests_per_s"] > 0 and result["raw_requests_per_s"] > 0
    assert 0 < result["p50_us"] <= result["p99_us"] <= result["p999_us"]
    # Latency at one sustained rate for both: half the bare load's capacity, paced in every process.
    assert result["rate_per_s"] == pytest.approx(result["raw_requests_per_s"] / 2, abs=2)
    assert result["raw_paced_requests_per_s"] <= result["rate_per_s"] * 1.02
    # how much of that rate each side held is said (a side that fell behind showed its latencies as if it had not)
    assert result["rate_held"] == pytest.approx(result["paced_requests_per_s"] / result["rate_per_s"], abs=0.002)
    assert 0 < result["raw_rate_held"] <= 1.02
    # each call's own time, and from when it was due (wrk2's count): never shorter
    for side in ("", "raw_"):
        assert 0 < result[f"{side}p50_us"] <= result[f"{side}response_p50_us"] <= result[f"{side}response_p999_us"]
    assert result["response_p999_ratio"] == round(result["response_p999_us"] / result["raw_response_p999_us"], 3)
    assert 0 < result["saturated"]["p50_us"] <= result["saturated"]["p999_us"]
    # Every lookup was logged: written and dropped add up to the calls made in the timed loop and the warm-up.
    assert result["events_written"] + result["events_dropped"] >= result["requests_per_s"] * 1.0
    assert result["throughput_ratio"] == round(result["requests_per_s"] / result["raw_requests_per_s"], 3)
    assert not list(redis_client.scan_iter("load*"))  # its namespace is dropped


def test_bench_load_workers_leave_ctrl_c_to_the_command():
    """A terminal's Ctrl-C reaches bench load's worker processes too: each printed a KeyboardInterrupt traceback
    under the command's one line. Started ignoring it, a worker that receives it goes on (exit code 0, not 1)."""
    import multiprocessing
    import signal

    from precompute_assets.tools.load import start_ignoring_interrupt

    context = multiprocessing.get_context("spawn")
    worker = context.Process(target=signal.raise_signal, args=(signal.SIGINT,))
    before = signal.getsignal(signal.SIGINT)
    start_ignoring_interrupt([worker])
    worker.join(timeout=120)
    assert worker.exitcode == 0
    assert signal.getsignal(signal.SIGINT) is before  # the command's own Ctrl-C is as it was


def test_bench_load_refuses_bad_arguments():
    from precompute_assets.tools.load import bench_load

    with pytest.raises(ValueError, match="processes >= 1"):
        bench_load("redis://127.0.0.1:1/0", processes=0)
    with pytest.raises(ValueError, match="0 < rate_share <= 1"):
        bench_load("redis://127.0.0.1:1/0", rate_share=0)


def test_bench_rerank_reports_ours_beside_a_bare_hmget(redis_url, redis_client):
    from precompute_assets.tools.bench import bench_rerank

    result = bench_rerank(redis_url, docs=2000, dim=16, candidates=20, queries=300)
    for key in ("rerank_p99_us", "raw_hmget_p99_us", "p99_ratio"):
        assert key in result
    assert 0 < result["rerank_p50_us"] <= result["rerank_p99_us"] and result["raw_hmget_p99_us"] > 0
    assert result["p99_ratio"] == round(result["rerank_p99_us"] / result["raw_hmget_p99_us"], 3)
    assert not list(redis_client.scan_iter("bench*"))


def test_bench_rerank_warms_every_side_it_compares_alike(redis_url, monkeypatch):
    from precompute_assets.tools import bench

    calls = []
    real_timed = bench.timed

    def recording(fn, keys):
        calls.append((fn.__name__, len(keys)))
        return real_timed(fn, keys)

    monkeypatch.setattr(bench, "timed", recording)
    bench.bench_rerank(redis_url, docs=500, dim=8, candidates=10, queries=300)
    warmed = [name for name, n in calls if n == 200]  # the warm-up's 200 sets; measured blocks are 100
    assert sorted(warmed) == ["bare", "ours", "redis_py"]
    assert calls[: len(warmed)] == [(name, 200) for name in warmed]  # all warmed before the first measured block


def test_bench_embed_reports_the_service_backend_beside_its_bare_encode(redis_url, app_db_url, redis_client):
    from precompute_assets.tools.bench import bench_embed

    result = bench_embed(redis_url, app_db_url, docs=3000, chunk_size=1000, service_docs=600)
    assert result["docs"] == 3000 and result["failed"] == 0
    assert result["service_docs"] == 600 and result["service_failed"] == 0
    assert result["service_docs_per_s"] > 0 and result["service_encode_only_docs_per_s"] > 0
    assert 0 < result["recall_at_10_int8"] <= 1
    # 300 int8 dimensions and a scale a document, with its id, in hash buckets: not a difference of used_memory,
    # which other traffic on the server moves
    assert 300 < result["redis_bytes_per_doc"] < 2 * 300
    # the lookup latency has its reference and ratios, as bench serve's (it had a bare p99 alone)
    assert result["p50_ratio"] == round(result["get_p50_us"] / result["raw_get_p50_us"], 3)
    assert result["p99_ratio"] == round(result["get_p99_us"] / result["raw_get_p99_us"], 3)
    assert not list(redis_client.scan_iter("bench*"))


@pytest.mark.skipif(shutil.which("redis-benchmark") is None, reason="no redis-benchmark (apt-get install redis-tools)")
def test_bench_publish_leaves_an_external_servers_other_keys_alone(
    tmp_path, monkeypatch, capsys, redis_server, dagster_pg_url, app_db_url
):
    """On a server the environment names, redis-benchmark wrote key:* into database 9 and then deleted every key:*
    there: another user's keys of that name went with them. It runs on the embedded server only; an external one gets
    null."""
    from precompute_assets.tools.cli import main

    server = redis_server()
    theirs = connect(server.url.rsplit("/", 1)[0] + "/9", socket_timeout=5)
    theirs.set("key:0000000001", "their value")
    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PRECOMPUTE_REDIS_URL", server.url)
    monkeypatch.setenv("DAGSTER_PG_URL", dagster_pg_url)
    monkeypatch.setenv("PRECOMPUTE_APP_DB_URL", app_db_url)
    assert main(["bench", "publish", "--n", "2000"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["keys"] == 2000 and result["redis_benchmark_set_per_s"] is None
    assert theirs.get("key:0000000001") == b"their value" and theirs.dbsize() == 1
    theirs.close()


@pytest.mark.parametrize(
    "what, module, function",
    [
        ("graph", "bench", "bench_graph"),
        ("serve", "bench", "bench_serve"),
        ("publish", "bench", "bench_publish"),
        ("rerank", "bench", "bench_rerank"),
        ("admission", "bench_admission", "bench_admission"),
        ("load", "load", "bench_load"),
    ],
)
def test_benchmarks_of_redis_alone_start_no_postgresql(session_dir, monkeypatch, capsys, what, module, function):
    """`bench graph` (and the other benchmarks that use Redis alone) started the embedded PostgreSQL, seconds of
    `up` and a server left running for nothing: they start Redis only."""
    import importlib

    from precompute_assets.stack import Stack
    from precompute_assets.tools.cli import main

    home = session_dir / f"redis-only-{what}"
    seen = {}

    def benchmark(redis_url=None, **options):
        stack = Stack(home)
        seen.update(redis=connect(redis_url or stack.env()["PRECOMPUTE_REDIS_URL"], socket_timeout=5).ping(),
                    postgres=stack.postgres.pid, pidfile=stack.postgres.lock_file.exists())  # fmt: skip
        return {"bench": what}

    monkeypatch.setattr(importlib.import_module(f"precompute_assets.tools.{module}"), function, benchmark)
    for name in ("PRECOMPUTE_REDIS_URL", "DAGSTER_PG_URL", "PRECOMPUTE_APP_DB_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PRECOMPUTE_HOME", str(home))
    try:
        assert main(["bench", what]) == 0
    finally:
        Stack(home).purge()
    assert json.loads(capsys.readouterr().out) == {"bench": what}
    assert seen == {"redis": True, "postgres": None, "pidfile": False}
