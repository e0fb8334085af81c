"""The `precompute` command: replay output and errors, and the stack commands."""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from precompute_assets.ml.replay import ORACLE_GENERAL
from precompute_assets.stack import Stack, reachable, redact
from precompute_assets.tools.cli import CliError, build_parser, dagster_instance, main
from precompute_assets_tests.factories import with_login


def test_replay_prints_one_json_object_with_the_five_rates(tmp_path, capsys):
    rng = np.random.default_rng(0)
    keys = np.minimum(rng.zipf(1.3, 20_000), 5000)
    trace = tmp_path / "trace.txt"
    trace.write_text("\n".join(f"user:{k}" for k in keys) + "\n")  # string keys, as real traffic has
    assert main(["replay", "--trace", str(trace), "--days", "4", "--top-n", "50", "--capacity", "200"]) == 0
    result = json.loads(capsys.readouterr().out)
    rates = [result[f"hit_rate_{name}"] for name in ("lru", "static_top_n", "ours", "belady")]
    assert all(0 < rate <= result["hit_rate_oracle_preload"] for rate in rates)
    assert result["hit_rate_lru"] <= result["hit_rate_belady"] < result["hit_rate_oracle_preload"]
    assert result["requests"] == 15_000


def test_a_window_that_is_no_duration_is_one_line_and_exit_code_2(capsys):
    """``cache stats --window 1e300`` overflowed the dates of its query-log read ("task runs: unavailable
    (OverflowError ...)", exit code 0); it is refused before anything connects, as are other bad windows."""
    for bad, says in [("1e300", "expected at most 3650d"), ("0", "expected a positive duration"),
                      ("nan", "expected a positive duration"), ("2x", "expected a duration such as")]:  # fmt: skip
        with pytest.raises(SystemExit) as usage:
            main(["cache", "stats", "--window", bad])
        err = capsys.readouterr().err
        assert usage.value.code == 2 and says in err and len(err.strip().splitlines()) == 1, err


def test_benchmark_sizes_and_processes_are_bounded_in_one_line(capsys):
    """``bench load --processes 1000`` forked a thousand clients, ``bench publish --n 1000000000`` ran out of memory
    before it said anything (h_bench): both are refused before anything starts."""
    for argv, says in [(["bench", "load", "--processes", "65"], "--processes: must be at most 64, got 65"),
                       (["bench", "publish", "--n", "100000001"], "--n: must be at most 100000000"),
                       (["bench", "embed", "--docs", "1e9"], "--docs: expected a whole number"),
                       (["docs", "generate", "--n", "100000001"], "--n: must be at most 100000000"),
                       # a list of two billion lookups filled memory; 1e20 seconds was an OverflowError traceback
                       (["bench", "serve", "--lookups", "2000000000"], "--lookups: must be at most 100000000"),
                       (["bench", "load", "--seconds", "100000"], "--seconds: must be at most 3600"),
                       (["bench", "events", "--daemon-logins", "101"], "--daemon-logins: must be at most 100"),
                       (["bench", "admission", "--capacity", "100000001"], "--capacity: must be")]:  # fmt: skip
        with pytest.raises(SystemExit) as usage:
            main(argv)
        err = capsys.readouterr().err
        assert usage.value.code == 2 and says in err and len(err.strip().splitlines()) == 1, err


def test_replay_reads_a_trace_piped_to_standard_input_as_dash(tmp_path, capsys, monkeypatch):
    """``zcat log.gz | precompute replay --trace -``: a dash named a file called "-", which did not exist."""
    lines = "".join(f"user:{k % 97}\n" for k in range(0, 6_000, 7)).encode()
    trace = tmp_path / "trace.txt"
    trace.write_bytes(lines)
    options = ["--days", "4", "--top-n", "10", "--capacity", "40"]
    assert main(["replay", "--trace", str(trace), *options]) == 0
    from_file = json.loads(capsys.readouterr().out)
    read_end, write_end = os.pipe()  # standard input as a pipe: its bytes can be read once
    os.write(write_end, lines)
    os.close(write_end)
    monkeypatch.setattr("precompute_assets.tools.cli.STDIN_PATH", f"/dev/fd/{read_end}")
    try:
        assert main(["replay", "--trace", "-", *options]) == 0
    finally:
        os.close(read_end)
    piped = json.loads(capsys.readouterr().out)
    assert piped.pop("trace") == "-" and from_file.pop("trace") == str(trace)
    assert piped == from_file


@pytest.mark.parametrize(
    "options", [["--top-n", "50"], ["--top-n", "auto"], ["--top-n", "auto", "--admission", "probation"]]
)
def test_replay_announces_each_policy_and_its_bar_ends_full(tmp_path, capsys, monkeypatch, options):
    """A policies-only replay of a long trace showed two stages with minutes between them: each policy is a stage
    now, and the bar's total is the number of stages announced."""
    import precompute_assets.tools.cli as cli

    seen: dict = {"names": []}

    class Recorder(cli._Stages):
        def __init__(self, total: int) -> None:
            super().__init__(total)
            seen["total"] = total

        def __call__(self, name: str) -> None:
            seen["names"].append(name)
            super().__call__(name)

    monkeypatch.setattr(cli, "_Stages", Recorder)
    rng = np.random.default_rng(0)
    trace = tmp_path / "trace.txt"
    trace.write_text("\n".join(f"user:{k}" for k in np.minimum(rng.zipf(1.3, 8_000), 2000)) + "\n")
    assert main(["replay", "--trace", str(trace), "--days", "4", "--capacity", "200", *options]) == 0
    assert json.loads(capsys.readouterr().out)["requests"] == 6_000
    assert len(seen["names"]) == seen["total"], seen
    assert {"LRU over 8,000 requests", "ARC over 8,000 requests", "Belady's MIN over 8,000 requests"} <= set(
        name.replace("replaying ", "") for name in seen["names"]
    ), seen


def test_replay_of_a_sample_scales_the_cache_and_adjusts_the_rates_it_reports(tmp_path, capsys):
    rng = np.random.default_rng(1)
    trace = tmp_path / "trace.txt"
    trace.write_text("\n".join(f"user:{k}" for k in np.minimum(rng.zipf(1.2, 40_000), 10**6)) + "\n")
    base = ["replay", "--trace", str(trace), "--days", "4", "--top-n", "100", "--capacity", "1000"]
    assert main([*base]) == 0
    whole = json.loads(capsys.readouterr().out)
    assert main([*base, "--sample", "0.2"]) == 0
    result = json.loads(capsys.readouterr().out)
    sample = result["sample"]
    assert (sample["rate"], sample["capacity"], sample["top_n"], result["capacity"]) == (0.2, 200, 20, 200)
    assert sample["requests_read"] == 40_000 and sample["requests_counted"] == whole["requests"] == 30_000
    assert 0 < sample["requests_kept"] < 40_000 and result["requests"] < 30_000
    for name, raw in sample["hit_rates_unadjusted"].items():
        expected = 0.2 * 30_000
        assert result[name] == pytest.approx((raw * result["requests"] + expected - result["requests"]) / expected)
    assert abs(result["hit_rate_lru"] - whole["hit_rate_lru"]) < 0.03
    assert result["requests"] < 0.2 * 30_000  # a shortfall, counted as hits, but not of a static top-N of no key
    assert main([*base[:6], "0", *base[7:], "--sample", "0.2"]) == 0
    nothing = json.loads(capsys.readouterr().out)
    assert nothing["hit_rate_static_top_n"] == 0 and nothing["hit_rate_lru"] == result["hit_rate_lru"]
    # `auto` choosing N = 0 every day (each day's keys are new): its static top-N held no key either, yet read 0.23
    vanishing = tmp_path / "vanishing.txt"
    keys = [f"d{day}k{k}" for day in range(8) for k in np.minimum(rng.zipf(1.3, 3_000), 400)]
    vanishing.write_text("\n".join(keys) + "\n")
    auto = ["replay", "--trace", str(vanishing), "--days", "8", "--top-n", "auto", "--capacity", "200"]
    assert main([*auto, "--sample", "0.5"]) == 0
    chose_none = json.loads(capsys.readouterr().out)
    assert not any(chose_none["top_n_chosen"]) and chose_none["hit_rate_static_top_n"] == 0
    assert chose_none["hit_rate_lru"] > chose_none["sample"]["hit_rates_unadjusted"]["hit_rate_lru"]  # adjusted
    for bad, says in (
        ("0", "--sample must be above 0 and at most 1, got 0.0"),
        ("nan", "--sample must be above 0 and at most 1, got nan"),
        ("1e-9", "--sample 1e-09 kept 0 of the 40,000 requests, fewer than --days 4: use a larger rate"),
        (
            "0.01",
            "--sample 0.01 scales --capacity 1000 to 10 keys, too few to model a cache: use a rate of at least "
            "0.016, or no --sample",
        ),
    ):
        assert main([*base, "--sample", bad]) == 2
        err = capsys.readouterr().err
        assert err == f"precompute replay: {says}\n"
    # a capacity that no rate can sample: the error must not ask for "a rate of at least 1.6"
    small = [*base[:5], "--top-n", "0", "--capacity", "10", "--sample", "0.5"]
    assert main(small) == 2
    assert capsys.readouterr().err == (
        "precompute replay: --sample needs --capacity of at least 16 keys, got 10: replay a cache this small without "
        "--sample\n"
    )
    for refused, named in (
        (["--next-key"], "--next-key"),
        (["--strategy", "frequency,prefetch"], "--strategy prefetch"),
    ):
        assert main([*base, "--sample", "0.5", *refused]) == 2
        assert capsys.readouterr().err == (
            "precompute replay: --sample keeps every request of a share of the keys, which cuts the sequences across "
            f"keys that the next-key model learns: not with {named}\n"
        )
    # all leaves prefetch out on a sample: its next-key model's --train-days would be ignored, not used
    assert main([*base, "--sample", "0.5", "--strategy", "all", "--train-days", "2"]) == 2
    assert capsys.readouterr().err == (
        "precompute replay: --train-days is the next-key LSTM's, which --sample does not train (not even in "
        "--strategy all)\n"
    )


def zipf_text_trace(path: Path, requests: int, keys: int, seed: int) -> str:
    """A key per line, ``user:K`` with K drawn from a Zipf(0.9) law over ``keys`` keys: skewed, with many keys."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, keys + 1) ** 0.9
    path.write_text("".join(f"user:{k}\n" for k in rng.choice(keys, size=requests, p=weights / weights.sum())))
    return str(path)


def test_replay_of_a_sample_replays_the_strategies_and_adjusts_their_rates(tmp_path, capsys):
    """``--sample`` refused ``--strategy``: a trace too long to replay whole could not compare strategies at all."""
    trace = zipf_text_trace(tmp_path / "trace.txt", 240_000, 60_000, seed=3)
    base = ["replay", "--trace", trace, "--days", "4", "--top-n", "400", "--capacity", "4000"]
    assert main([*base, "--strategy", "frequency,ewma"]) == 0
    whole = json.loads(capsys.readouterr().out)
    assert main([*base, "--strategy", "frequency,ewma", "--sample", "0.5"]) == 0
    result = json.loads(capsys.readouterr().out)
    sample, kept = result["sample"], result["requests"]
    assert (sample["capacity"], sample["top_n"], sample["requests_counted"]) == (2000, 200, 180_000)
    expected = 0.5 * 180_000
    for name in ("frequency", "ewma"):
        entry, raw = result["strategies"][name], sample["strategies_unadjusted"][name]
        assert (entry["top_n"], raw["top_n"]) == (400, 200)  # the whole trace's keys; the sample's beside
        assert entry["hit_rate"] == pytest.approx((raw["hit_rate"] * kept + expected - kept) / expected)
        # On 5 seeds of this trace the adjusted rates came within 0.0053 of the whole trace's, the raw ones
        # 0.051-0.053 below them: the sample kept 106,748 of the 120,000 requests a rate of 0.5 promises.
        assert abs(entry["hit_rate"] - whole["strategies"][name]["hit_rate"]) < 0.01, name
        assert raw["hit_rate"] < whole["strategies"][name]["hit_rate"] - 0.03
    assert result["strategies"]["frequency"]["hit_rate"] == result["hit_rate_ours"]  # the same ranking and days
    assert "top_n is in the whole trace's keys" in result["strategy_notes"][-1]


def test_replay_of_a_sample_tunes_each_strategys_share_of_the_scaled_capacity(tmp_path, capsys, monkeypatch):
    """With ``--top-n auto`` the candidate shares are of the sample's capacity, reported in the whole trace's keys;
    the LSTM's approval top-N (a count of keys, 1000 by default) is scaled by the rate as the capacity is."""
    import precompute_assets.ml.strategies as strategies

    seen = []
    compare = strategies.compare_strategies

    def recording(*args, **kwargs):
        seen.append(kwargs.get("hp", strategies.REPLAY_HYPER_PARAMS).top_n)
        return compare(*args, **kwargs)

    monkeypatch.setattr(strategies, "compare_strategies", recording)
    trace = zipf_text_trace(tmp_path / "trace.txt", 40_000, 10_000, seed=1)
    argv = ["replay", "--trace", trace, "--days", "4", "--top-n", "auto", "--capacity", "1600", "--sample", "0.25"]
    assert main([*argv, "--strategy", "ewma"]) == 0
    result = json.loads(capsys.readouterr().out)
    entry, raw = result["strategies"]["ewma"], result["sample"]["strategies_unadjusted"]["ewma"]
    assert set(raw["top_n_chosen"]) <= {0, 25, 50, 100, 200, 300}  # of 0, C/16, ..., 3C/4 with C = 400
    assert entry["top_n_chosen"] == [4 * share for share in raw["top_n_chosen"]]
    assert entry["top_n"] == pytest.approx(4 * raw["top_n"])
    assert seen == [250]


def test_replay_of_a_sample_runs_an_ab_experiment_on_the_sampled_keys(tmp_path, capsys):
    """The arms' hash (SHA-256 of salt:key) is not the sample's: the sampled keys split evenly between the arms."""
    from precompute_assets.ml.experiment import arms_of
    from precompute_assets.ml.replay import shards_keep

    trace = zipf_text_trace(tmp_path / "trace.txt", 60_000, 20_000, seed=2)
    base = ["replay", "--trace", trace, "--days", "4", "--top-n", "200", "--capacity", "1000", "--sample", "0.5"]
    tiny = [*base[:6], "2", *base[7:]]  # --top-n 2 scales to 1: one arm precomputing one key, the other none
    assert main([*tiny, "--ab", "frequency,ewma"]) == 2
    assert "--sample 0.5 scales --top-n 2 to 1: --ab needs at least 2" in capsys.readouterr().err
    assert main([*base, "--ab", "frequency,ewma"]) == 0
    result = json.loads(capsys.readouterr().out)
    ab = result["ab"]
    assert ab["requests"] == result["requests"] < 45_000 and ab["capacity"] == 500
    assert ab["top_n"] == {"frequency": 50, "ewma": 50} and not ab["srm"]["mismatch"]
    assert "the sample's, and top_n and capacity its scaled ones" in ab["notes"][-1]
    keys = pd.unique(pd.Series(Path(trace).read_text().split()))
    sampled = keys[shards_keep(keys, 0.5)]
    assert sum(ab["srm"]["keys"].values()) <= len(sampled) < len(keys)
    in_first = arms_of("ab1", sampled, ("frequency", "ewma")) == "frequency"
    assert abs(in_first.mean() - 0.5) < 3 * 0.5 / np.sqrt(len(sampled))  # within three standard errors


def test_replay_of_a_sample_counts_the_whole_traces_days(tmp_path, capsys):
    """Days are the whole trace's equal time spans, not the sample's: its first and last requests may be of keys
    the sample drops, which would stretch or shrink every day of the sample's own span."""
    from precompute_assets.ml.replay import shards_keep

    names = np.array([f"k{i}" for i in range(400)], dtype=object)
    kept, dropped = names[shards_keep(names, 0.5)], names[~shards_keep(names, 0.5)]
    rows = [(0, dropped[0])] + [(10 + t, kept[t % 50]) for t in range(80)] + [(200, dropped[1])]
    trace = tmp_path / "trace.csv"
    trace.write_text("".join(f"{t},{key}\n" for t, key in rows))
    argv = ["replay", "--trace", str(trace), "--days", "2", "--top-n", "0", "--capacity", "64", "--sample", "0.5"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["requests_per_day"] == [80, 0]  # all of the kept keys' requests fall in the first 100 s
    assert result["sample"]["requests_counted"] == 1
    # The strategies rank and replay on the same days: two kept keys asked for in turn, all on day 0, so none
    # counted. Split over the sample's own span, day 1 would hold 40 of their requests, every one a hit.
    rows = [(0, dropped[0])] + [(10 + t, kept[t % 2]) for t in range(80)] + [(200, dropped[1])]
    trace.write_text("".join(f"{t},{key}\n" for t, key in rows))
    assert main([*argv, "--strategy", "frequency,seasonal"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["requests_per_day"] == [80, 0] and result["sample"]["hit_rates_unadjusted"]["hit_rate_ours"] == 0
    raw = result["sample"]["strategies_unadjusted"]
    assert raw["frequency"]["hit_rate"] == raw["seasonal"]["hit_rate"] == 0


def test_replay_takes_a_csv_trace_with_a_header_and_more_columns_as_its_keys_alone(tmp_path, capsys):
    rng = np.random.default_rng(1)
    keys = np.minimum(rng.zipf(1.3, 4000), 500)
    bare, wide = tmp_path / "keys.txt", tmp_path / "wide.csv"
    bare.write_text("\n".join(map(str, keys)) + "\n")
    wide.write_text("timestamp,obj_id,obj_size\n" + "".join(f"{t},{k},{100 + k}\n" for t, k in enumerate(keys)))
    results = []
    for trace in (bare, wide):
        assert main(["replay", "--trace", str(trace), "--days", "4", "--top-n", "20", "--capacity", "60"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    # Timestamps one apart split the days exactly as equal counts do: the same requests, the same rates.
    assert results[0]["requests"] == results[1]["requests"] == 3000
    for name in ("lru", "s3fifo", "arc", "ours", "belady"):
        assert results[0][f"hit_rate_{name}"] == results[1][f"hit_rate_{name}"], name


def test_replay_reads_the_key_field_it_is_told_and_shows_the_layout(tmp_path, capsys):
    trace = tmp_path / "msr.csv"
    trace.write_text("Timestamp,Host,Offset\n" + "".join(f"{t},hm,{t % 7}\n" for t in range(100)))
    base = ["replay", "--trace", str(trace), "--days", "2", "--top-n", "0", "--capacity", "3"]
    assert main(base) == 0
    assert json.loads(capsys.readouterr().out)["trace_layout"]["key_field"] == 3  # named Offset, not 2: the host
    assert main([*base, "--key-field", "Host"]) == 0
    assert json.loads(capsys.readouterr().out)["trace_layout"]["distinct_keys"] == 1  # told: the host
    assert main([*base, "--key-field", "Offset"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["trace_layout"] == {
        "format": "text",
        "fields": 3,
        "timestamp_field": 1,
        "key_field": 3,
        "separator": "comma",
        "header": ["Timestamp", "Host", "Offset"],
        "distinct_keys": 7,
    }
    # The same requests with tab-separated fields replay alike.
    tabs = tmp_path / "msr.tsv"
    tabs.write_text(trace.read_text().replace(",", "\t"))
    assert main(["replay", "--trace", str(tabs), *base[3:], "--key-field", "Offset"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        **result,
        "trace": str(tabs),
        "trace_layout": {**result["trace_layout"], "separator": "whitespace"},
    }
    assert main([*base, "--key-field", "3", "--time-field", "none"]) == 0
    assert json.loads(capsys.readouterr().out)["trace_layout"]["timestamp_field"] is None
    assert main([*base, "--key-field", "Size"]) == 2
    err = capsys.readouterr().err
    assert "no key column named 'Size'" in err and err.count("\n") == 1


def test_replay_keeps_the_requests_where_tells_it_to(tmp_path, capsys):
    trace = tmp_path / "twitter.csv"
    trace.write_text("".join(f"{t},k{t % 6},12,300,7,{'get' if t % 4 else 'set'},0\n" for t in range(400)))
    base = ["replay", "--trace", str(trace), "--days", "2", "--top-n", "0", "--capacity", "3"]
    assert main([*base, "--where", "6=get"]) == 0
    layout = json.loads(capsys.readouterr().out)["trace_layout"]
    assert layout["where"] == {"field": 6, "values": ["get"], "dropped": 100}
    for bad in ("6", "=get", "6=", "6=,"):
        with pytest.raises(SystemExit) as usage:  # argparse's usage error
            main([*base, "--where", bad])
        err = capsys.readouterr().err
        assert usage.value.code == 2 and err.startswith("precompute replay: argument --where: ")
        assert "expected FIELD=VALUE[,VALUE...]" in err and err.count("\n") == 1, err


def test_replay_reports_requests_per_day_and_warns_of_empty_days(tmp_path, capsys):
    keys = [f"k{t % 50}" for t in range(800)]
    times = [1_600_000_000 + 432 * t for t in range(800)]  # 4 days, less one step: days of 24 h less 0.1%
    trace = tmp_path / "trace.csv"
    trace.write_text("".join(f"{t},{k}\n" for t, k in zip(times, keys, strict=True)))
    base = ["replay", "--trace", str(trace), "--days", "4", "--top-n", "0", "--capacity", "60"]
    assert main(base) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["requests_per_day"] == [200, 200, 200, 200] and "trace_notes" not in result and not captured.err
    outlier = tmp_path / "outlier.csv"  # one corrupt timestamp of 0 stretches the span: days 1 and 2 are empty
    outlier.write_text(trace.read_text().replace(str(times[0]), "0", 1))
    assert main(["replay", "--trace", str(outlier), *base[3:]]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["requests_per_day"] == [1, 0, 0, 799]
    assert result["trace_notes"] == [
        "2 of the 4 days hold no requests (days 1, 2): days are equal spans of the timestamps from 0 to "
        "1600345168; an outlier timestamp or a gap? Use fewer --days, or --time-field none to split by count"
    ]
    assert captured.err == f"precompute replay: warning: {result['trace_notes'][0]}\n"
    assert main(["replay", "--trace", str(outlier), *base[3:], "--time-field", "none", "--key-field", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["requests_per_day"] == [200, 200, 200, 200]


def test_replay_reads_other_public_layouts_or_says_what_looks_wrong(tmp_path, capsys):
    """Each of these was read wrong without a word (h_formats): a key from an operation column (every hit rate
    1.0), a constant first field taken for time, a trace's own clock in ms taken for epoch seconds (with advice the
    CLI refused), a one-column export's header counted as a request; and a comma inside a field of a
    whitespace-separated trace (a Wikipedia URL) refused the whole file."""
    base = ["--days", "4", "--top-n", "0", "--capacity", "50"]

    def replay(path, *more) -> dict:
        assert main(["replay", "--trace", str(path), *base, *more]) == 0
        return json.loads(capsys.readouterr().out)

    ali = tmp_path / "ali.csv"  # Alibaba's block layout: device,opcode,offset,length,timestamp (us)
    ali.write_text(
        "".join(f"7,{'RW'[i % 2]},{4096 * (i % 300)},4096,{1577836800000000 + i * 1000}\n" for i in range(2000))
    )
    notes = replay(ali)["trace_notes"]
    assert any("only 2 distinct keys ('R', 'W')" in note and "--key-field" in note for note in notes), notes
    assert any("field 1, read as the time of each request, holds one value (7)" in note for note in notes), notes
    relative = tmp_path / "rel28.csv"  # 28 days of its own clock in ms, from 0
    relative.write_text("".join(f"{i * 120960},k{i % 97}\n" for i in range(20000)))
    result = replay(relative, "--days", "28")
    assert "trace_notes" not in result and len(result["requests_per_day"]) == 28
    ids = tmp_path / "ids.csv"  # a one-column export with its header
    ids.write_text("object_id\n" + "".join(f"{i % 300}\n" for i in range(2000)))
    result = replay(ids)
    assert sum(result["requests_per_day"]) == 2000 and result["trace_layout"]["header"] == ["object_id"]
    wiki = tmp_path / "wiki.txt"  # wikibench: counter, timestamp, URL (commas in it), flag
    urls = ["http://en.wikipedia.org/wiki/Washington,_D.C.", "http://en.wikipedia.org/wiki/Paris"]
    wiki.write_text("".join(f"{i} {1190146243 + i * 50}.3 {urls[i % 2]}_{i % 7} -\n" for i in range(2000)))
    result = replay(wiki, "--key-field", "3", "--time-field", "2")
    assert result["trace_layout"]["distinct_keys"] == 14 and sum(result["requests_per_day"]) == 2000


def test_replay_warns_of_a_key_read_from_the_wrong_field(tmp_path, capsys):
    msr = tmp_path / "msr.csv"  # MSR Cambridge's layout, without a header: field 2 is the host; 2 days of file times
    step = 29_300_000_000  # 100 ns ticks: 59 steps are 2 days and 1.3 min
    msr.write_text("".join(f"{128166372000000000 + step * t},hm,0,Read,{4096 * (t % 9)},4096,100\n" for t in range(60)))
    base = ["--days", "2", "--top-n", "0", "--capacity", "3"]
    assert main(["replay", "--trace", str(msr), *base]) == 0
    captured = capsys.readouterr()
    note = (
        "every request is of one key, 'hm', read from field 2 of 7: another field is the key? Name it with --key-field"
    )
    assert json.loads(captured.out)["trace_notes"] == [note]
    assert captured.err == f"precompute replay: warning: {note}\n"
    assert main(["replay", "--trace", str(msr), *base, "--key-field", "5", "--where", "4=Read"]) == 0
    captured = capsys.readouterr()
    assert "trace_notes" not in json.loads(captured.out) and not captured.err
    # A key field chosen, or filtered on, holding one key is what was asked for: no warning.
    for chosen in (["--key-field", "2"], ["--where", "2=hm"]):
        assert main(["replay", "--trace", str(msr), *base, *chosen]) == 0
        captured = capsys.readouterr()
        assert "trace_notes" not in json.loads(captured.out) and not captured.err, chosen
    basic = tmp_path / "basic.csv"  # ISO 8601's basic form is no timestamp this reader knows: lines become keys
    basic.write_text("".join(f"20240301T0000{t:02d}Z,k{t % 5}\n" for t in range(60)))
    assert main(["replay", "--trace", str(basic), *base]) == 0
    notes = json.loads(capsys.readouterr().out)["trace_notes"]
    assert notes == [
        "the keys hold commas (whole lines were read as keys): a CSV whose timestamps are in a form this reader "
        "does not know? Name the fields with --key-field and --time-field (none: no timestamps)"
    ]


def test_replay_warnings_give_only_advice_the_format_takes(tmp_path, capsys):
    records = np.zeros(40, dtype=ORACLE_GENERAL)  # one object id; an outlier time leaves the middle days empty
    records["time"], records["obj_id"] = np.r_[0, np.arange(1_000_000, 1_000_039)], 5
    trace = tmp_path / "one.oracleGeneral.bin"
    trace.write_bytes(records.tobytes())
    assert main(["replay", "--trace", str(trace), "--days", "4", "--top-n", "0", "--capacity", "3"]) == 0
    notes = json.loads(capsys.readouterr().out)["trace_notes"]
    assert notes == [  # no --time-field (binary records have no fields to choose) and no one-key warning
        "2 of the 4 days hold no requests (days 1, 2): days are equal spans of the timestamps from 0 to 1000038; "
        "an outlier timestamp or a gap? Use fewer --days"
    ]


def test_replay_reads_libcachesims_binary_records(tmp_path, capsys):
    records = np.zeros(200, dtype=ORACLE_GENERAL)
    records["time"], records["obj_id"] = np.arange(200) * 900, np.arange(200) % 9
    trace = tmp_path / "block.oracleGeneral.bin.gz"
    trace.write_bytes(gzip.compress(records.tobytes()))
    base = ["replay", "--trace", str(trace), "--days", "2", "--top-n", "0", "--capacity", "3"]
    assert main(base) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["trace_layout"]["format"] == "oracle-general" and result["trace_layout"]["distinct_keys"] == 9
    assert result["requests"] == 100  # day 0 warms the caches
    assert main([*base, "--format", "text"]) == 2
    err = capsys.readouterr().err
    assert "not valid UTF-8 text (a binary trace? see --format)" in err and err.count("\n") == 1


def test_replay_names_the_bad_line(tmp_path, capsys):
    trace = tmp_path / "trace.txt"
    for content, expected in [
        ("1\n2\n\n3\n", "line 3: blank line"),
        ("1\n# comment\n2\n", "line 2"),
        ("1\n2\nad 7\n", "line 3"),
    ]:
        trace.write_text(content)
        assert main(["replay", "--trace", str(trace), "--days", "2", "--top-n", "1", "--capacity", "2"]) == 2
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1


def test_replay_rejects_top_n_above_capacity(tmp_path, capsys):
    trace = tmp_path / "trace.txt"
    trace.write_text("1\n2\n3\n4\n")
    assert main(["replay", "--trace", str(trace), "--days", "2", "--top-n", "5", "--capacity", "2"]) == 2
    assert "--capacity 2 is smaller than --top-n 5" in capsys.readouterr().err


def test_replay_refuses_options_that_would_be_ignored_or_fall_back(tmp_path, capsys):
    trace = tmp_path / "trace.csv"
    trace.write_text("1,a\n2,b\n3,a\n4,b\n")
    base = ["replay", "--trace", str(trace), "--days", "2", "--top-n", "0", "--capacity", "2"]
    for extra, expected in [
        (["--train-days", "1"], "--train-days is the next-key LSTM's: give it with --next-key"),
        (["--key-field", ""], "--key-field is empty"),
        (["--time-field", " "], "--time-field is empty"),
        # Read only with --ab, --strategy prefetch, --strategy lstm|auto: given alone, each was silently ignored.
        (["--ab-salt", "s2"], "this replay does not read --ab-salt"),
        (["--prefetch-thr=0.9", "--margin", "-5"], "does not read --prefetch-threshold, --margin"),
        # An experiment of no precomputed keys (or of one for one arm) reported a difference of read-through noise.
        (["--ab", "frequency,ewma"], "--ab needs --top-n of at least 2: each arm precomputes half of it, got 0"),
        # A salt the deployment refuses (PRECOMPUTE_EXPERIMENT_SALT): the replay's split was not the one it serves.
        (["--ab", "frequency,ewma", "--top-n", "2", "--ab-salt", "a\tb"], "--ab-salt 'a\\tb' is not a salt"),
    ]:
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1
    assert main([*base, "--key-field", "2"]) == 0


def test_a_missing_dagster_database_fails_at_once_with_postgres_reason(dagster_pg_url, monkeypatch, tmp_path):
    # One connection attempt names the reason; Dagster's own would retry for 15 s first, warning each time.
    import psycopg2

    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DAGSTER_HOME", raising=False)  # the stack's own dagster.yaml, which reads the URL below
    monkeypatch.setenv("DAGSTER_PG_URL", dagster_pg_url.rsplit("/", 1)[0] + "/nosuchdb")
    with (
        pytest.raises(psycopg2.OperationalError, match='database "nosuchdb" does not exist'),
        dagster_instance(Stack()),
    ):
        pass


@pytest.fixture(autouse=True)
def private_environ(monkeypatch):
    """`precompute up` exports the stack's URLs into os.environ: keep them out of other tests."""
    monkeypatch.setattr(os, "environ", os.environ.copy())


def test_up_status_down_manage_real_servers(tmp_path, monkeypatch, capsys):
    for name in ("PRECOMPUTE_REDIS_URL", "DAGSTER_PG_URL", "PRECOMPUTE_APP_DB_URL", "DAGSTER_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    try:
        assert main(["up"]) == 0
        out = capsys.readouterr().out
        assert "redis     embedded  running (pid" in out and "postgres  embedded  running (pid" in out
        assert "(valkey 8." in out or "(redis " in out  # the server's own version
        assert main(["status"]) == 0
        out = capsys.readouterr().out
        for kind, name in [
            ("schedule", "daily_precompute"),
            ("schedule", "query_logs_hourly"),
            ("sensor", "documents_changed"),
        ]:
            assert f"{kind:<9} RUNNING   {name}" in out, out
        assert "pool      redis_publish free" in out and "pool      embedding_sync free" in out, out
        # Every schedule and sensor said RUNNING with no daemon to tick them.
        assert "daemon    stopped   (never seen: no schedule or sensor ticks" in out, out
        from dagster._daemon.types import DaemonHeartbeat

        from precompute_assets.tools.cli import dagster_instance

        with dagster_instance(Stack()) as instance:
            instance.add_daemon_heartbeat(DaemonHeartbeat(time.time(), "SENSOR", "test", errors=[]))
        assert main(["status"]) == 0
        assert "daemon    running   (last heartbeat " in capsys.readouterr().out
        # A demo beside a running daemon: its cache_health restored the last demo's version into the reset Redis.
        assert main(["demo"]) == 2
        err = capsys.readouterr().err
        said = re.search(r"a Dagster daemon runs on this stack .*last heartbeat (\d+) s ago.* retry in (\d+) s", err)
        assert said is not None and 59 <= int(said[1]) + int(said[2]) <= 61, err  # when a stopped one is told apart
        assert main(["env"]) == 0
        env = capsys.readouterr().out
        assert f"export DAGSTER_HOME={tmp_path / 'home' / 'dagster'}" in env
        assert (tmp_path / "home" / "dagster" / "dagster.yaml").resolve().name == "dagster.yaml"
        # `down` under a run in progress stopped its servers without a word; the run retried its database for good
        import dagster as dg
        from dagster._core.test_utils import create_run_for_test

        with dagster_instance(Stack()) as instance:
            run = create_run_for_test(instance, job_name="__ASSET_JOB", status=dg.DagsterRunStatus.STARTED)
        assert main(["down"]) == 2
        err = capsys.readouterr().err
        assert (
            err.count("\n") == 1 and f"Dagster runs in progress would lose their servers and fail ({run.run_id})" in err
        )
        # whatever DAGSTER_HOME names (the project's dagster.yaml in a folder of the user's, h_diff12; another
        # project's SQLite instance, h_diff13), the runs stored in the embedded PostgreSQL are the ones `down` stops
        from precompute_assets.stack import project_dir

        (own := tmp_path / "own_dagster").mkdir()
        (own / "dagster.yaml").symlink_to(project_dir() / "dagster.yaml")
        (sqlite := tmp_path / "other_project").mkdir()
        (sqlite / "dagster.yaml").write_text("")
        for home in (own, sqlite):
            monkeypatch.setenv("DAGSTER_HOME", str(home))
            assert main(["down"]) == 2 and run.run_id in capsys.readouterr().err
        monkeypatch.delenv("DAGSTER_HOME")
        assert "redis     embedded  running" in (main(["status"]) or capsys.readouterr().out)
        assert main(["down", "--force"]) == 0 and "embedded services stopped" in capsys.readouterr().out
    finally:
        main(["down", "--force"])
    runtime = Stack(tmp_path / "home").postgres.runtime
    assert runtime.exists()  # `down` keeps the data
    assert main(["down", "--purge"]) == 0
    assert not runtime.exists() and not (tmp_path / "home" / "redis").exists()
    for name in ("PRECOMPUTE_REDIS_URL", "DAGSTER_PG_URL", "PRECOMPUTE_APP_DB_URL"):  # exported by `up`
        os.environ.pop(name, None)
    main(["status"])
    assert "running" not in capsys.readouterr().out


def test_purge_keeps_the_lake_and_models_that_external_databases_record(stack, tmp_path, monkeypatch, capsys):
    """On production databases, `down --purge` deleted the home's lake and models, which their runs and tables still
    pointed at, and said it had deleted embedded data (naming a service folder that never existed, h_prod2)."""
    from precompute_assets.stack import ENV_APP_DB, ENV_DAGSTER_PG, ENV_REDIS

    home = tmp_path / "home"
    monkeypatch.setenv("PRECOMPUTE_HOME", str(home))
    for name in (ENV_REDIS, ENV_DAGSTER_PG, ENV_APP_DB):
        monkeypatch.setenv(name, stack.env()[name])
    (home / "lake" / "ads").mkdir(parents=True)
    (home / "lake" / "ads" / "part.parquet").write_bytes(b"PAR1")
    (home / "models").mkdir()
    assert main(["down", "--purge"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"refusing to purge {home.resolve()}: its lake/ belong to the deployment" in err
    assert "DAGSTER_PG_URL and PRECOMPUTE_APP_DB_URL the environment names" in err, err
    assert (home / "lake" / "ads" / "part.parquet").exists()
    # as `eval "$(precompute env)"` exports them, and other spellings of the home's own folders: its own (h_diff22)
    for lake in (str(home / "lake"), f"file://{home}/lake", f"{home}/./lake/"):
        monkeypatch.setenv("PRECOMPUTE_LAKE_URI", lake)
        monkeypatch.setenv("PRECOMPUTE_MODEL_STORE", str(home / "models"))
        assert main(["down", "--purge"]) == 2 and "refusing to purge" in capsys.readouterr().err, lake
    monkeypatch.setenv("PRECOMPUTE_LAKE_URI", str(tmp_path / "elsewhere"))  # the lake is not the home's: purged
    assert main(["down", "--purge"]) == 0
    said = capsys.readouterr().out
    assert said == f"no embedded services here (the environment names every server); deleted {home.resolve()}\n"
    assert not home.exists()


def test_up_restarts_the_embedded_servers_after_eval_of_env(tmp_path, monkeypatch, capsys):
    """After `eval "$(precompute env)"` the exported URLs are this home's own: `up` restarts a stopped server, and
    `status` calls the servers embedded."""
    for name in ("PRECOMPUTE_REDIS_URL", "DAGSTER_PG_URL", "PRECOMPUTE_APP_DB_URL", "DAGSTER_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    try:
        assert main(["up"]) == 0
        capsys.readouterr()
        os.environ.update(Stack().env())  # what eval "$(precompute env)" does
        assert main(["down"]) == 0
        assert main(["status"]) == 0
        out = capsys.readouterr().out
        assert "redis     embedded  stopped" in out and "postgres  embedded  stopped" in out, out
        assert main(["up"]) == 0
        out = capsys.readouterr().out
        assert "redis     embedded  running (pid" in out and "postgres  embedded  running (pid" in out, out
    finally:
        main(["down", "--purge"])


def test_unreachable_external_servers_are_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PRECOMPUTE_REDIS_URL", "rediss://user:secret@127.0.0.1:1/0")
    monkeypatch.setenv("DAGSTER_PG_URL", "postgresql://u:secret@127.0.0.1:1/dagster")
    monkeypatch.setenv("PRECOMPUTE_APP_DB_URL", "postgresql://u:secret@127.0.0.1:1/app")
    assert main(["up"]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "does not answer" in captured.err and "Traceback" not in captured.err
    assert "secret" not in captured.err
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "redis     external  unreachable" in out and "postgresql+psycopg2://u:***@127.0.0.1:1/dagster" in out
    assert "(unknown: Dagster's database does not answer)" in out and "precompute up" not in out, out
    assert "secret" not in out
    assert not (tmp_path / "home" / "redis").exists() and not (tmp_path / "home" / "postgres").exists()


def test_external_servers_that_accept_connections_but_never_answer_do_not_answer(tmp_path, monkeypatch, capsys):
    """A port that accepts connections where nothing answers (a hung server, a proxy in front of a primary failing
    over) was reported as a server that 'refuses us', naming a login problem there is none of; it does not answer."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    port = silent.getsockname()[1]
    try:
        monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
        monkeypatch.setenv("PRECOMPUTE_REDIS_URL", f"redis://127.0.0.1:{port}/0")
        monkeypatch.setenv("DAGSTER_PG_URL", f"postgresql://u:secret@127.0.0.1:{port}/dagster?connect_timeout=1")
        monkeypatch.setenv("PRECOMPUTE_APP_DB_URL", f"postgresql://u:secret@127.0.0.1:{port}/app?connect_timeout=1")
        assert main(["up"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "which accepts connections but does not answer" in err, err
        assert "refuses us" not in err and "secret" not in err
        assert main(["status"]) == 0
        out = capsys.readouterr().out
        assert "redis     external  unreachable" in out and "postgres  external  unreachable" in out, out
        assert "app_db    external  unreachable" in out and "(unknown: Dagster's database does not answer)" in out
        assert "(accepts connections but does not answer (Timeout" in out  # why, and no TLS hint for redis://
        assert "rediss://" not in out
        assert "refuses us" not in out and "secret" not in out
    finally:
        silent.close()


def test_up_checks_that_external_servers_accept_their_credentials(
    tmp_path, monkeypatch, capsys, redis_server, dagster_pg_url, app_db_url
):
    server = redis_server(password="right-password-0123")
    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PRECOMPUTE_REDIS_URL", f"redis://:wrong-secret@127.0.0.1:{server.port}/0")
    monkeypatch.setenv("DAGSTER_PG_URL", dagster_pg_url)
    monkeypatch.setenv("PRECOMPUTE_APP_DB_URL", app_db_url)
    assert main(["up"]) == 2  # was exit 0, "redis external reachable": its port answers
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "PRECOMPUTE_REDIS_URL points at" in err and "refuses us" in err, err
    assert "wrong-secret" not in err
    assert main(["status"]) == 0  # said "reachable": its port answers
    out = capsys.readouterr().out
    assert "redis     external  refuses us" in out and "wrong-secret" not in out, out
    assert "postgres  external  reachable" in out, out
    monkeypatch.setenv("PRECOMPUTE_REDIS_URL", f"redis://:right-password-0123@127.0.0.1:{server.port}/0")
    monkeypatch.setenv("PRECOMPUTE_APP_DB_URL", app_db_url.rsplit("/", 1)[0] + "/no_such_database")
    assert main(["up"]) == 2
    err = capsys.readouterr().err
    assert "PRECOMPUTE_APP_DB_URL points at" in err and 'database "no_such_database" does not exist' in err, err
    monkeypatch.setenv("PRECOMPUTE_APP_DB_URL", app_db_url)
    assert main(["up"]) == 0
    assert "redis     external  reachable" in capsys.readouterr().out
    assert not (tmp_path / "home" / "redis").exists() and not (tmp_path / "home" / "postgres").exists()


def production_home(tmp_path: Path, monkeypatch, redis_url: str, app_db_url: str) -> Path:
    """A production environment: the stack's home unused, Redis and the app database external, and DAGSTER_HOME an
    empty folder of its own (returned)."""
    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PRECOMPUTE_REDIS_URL", redis_url)
    monkeypatch.setenv("PRECOMPUTE_APP_DB_URL", app_db_url)
    home = tmp_path / "dagster_home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home


def test_status_shows_the_automation_of_a_production_dagster_home_without_up(
    tmp_path, monkeypatch, capsys, redis_server, dagster_pg_url, app_db_url
):
    """Production: every server external and DAGSTER_HOME a folder of its own with the project's dagster.yaml; `up`
    never ran (it has nothing to start). Status said "unknown until `precompute up`: Dagster's database is stopped"
    while that database answered."""
    from precompute_assets.storage.postgres import scratch_database

    server = redis_server()
    home = production_home(tmp_path, monkeypatch, server.url, app_db_url)
    with scratch_database(dagster_pg_url, "dagster") as url:
        monkeypatch.setenv("DAGSTER_PG_URL", url)
        assert main(["status"]) == 0
        out = capsys.readouterr().out
        assert f"(unknown: DAGSTER_HOME {home.resolve()} has no dagster.yaml)" in out, out
        shutil.copy(Path(__file__).resolve().parents[2] / "dagster.yaml", home / "dagster.yaml")
        assert main(["status"]) == 0
        out = capsys.readouterr().out
        assert "postgres  external  reachable" in out and "precompute up" not in out, out
        assert f"{'schedule':<9} RUNNING   daily_precompute" in out and "pool      redis_publish free" in out, out
        assert main(["pools", "free"]) == 0 and json.loads(capsys.readouterr().out) == {"freed": [], "held": []}
        assert main(["pools", "free", "--run", "zz"]) == 2
        err = capsys.readouterr().err
        assert err == (
            "precompute pools: no run holding a pool slot start with 'zz' (runs holding one: none), nor is it the "
            "whole ID of a run in progress (runs in progress: none)\n"
        ), err
        monkeypatch.setenv(
            "DAGSTER_PG_URL", re.sub(r"^postgresql\+psycopg2://postgres(:[^@]*)?@", "postgresql://nobody@", url)
        )
        assert main(["status"]) == 0
        out = capsys.readouterr().out
        assert "postgres  external  refuses us" in out and "(unknown: Dagster's database refuses us)" in out, out
    assert not (tmp_path / "home" / "dagster").exists()  # nothing of the stack's own was made


def test_status_says_what_of_an_external_redis_memory_configuration_works_against_us(
    tmp_path, monkeypatch, capsys, redis_server, dagster_pg_url, app_db_url
):
    """A production Redis with maxmemory-policy noeviction (or allkeys-*) passed for fine, and
    PRECOMPUTE_REDIS_MAXMEMORY was silently ignored for it; status now says both, and changes nothing on the server."""
    from precompute_assets.serving import connect

    server = redis_server(extra_config=("maxmemory-policy noeviction",))
    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PRECOMPUTE_REDIS_URL", server.url)
    monkeypatch.setenv("DAGSTER_PG_URL", dagster_pg_url)
    monkeypatch.setenv("PRECOMPUTE_APP_DB_URL", app_db_url)
    monkeypatch.setenv("PRECOMPUTE_REDIS_MAXMEMORY", "4gb")
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "redis     warning   maxmemory-policy noeviction: at maxmemory it refuses publishes" in out, out
    assert "redis     warning   PRECOMPUTE_REDIS_MAXMEMORY sizes the embedded Redis only" in out, out
    admin = connect(server.url, socket_timeout=5)
    assert admin.config_get("maxmemory*")["maxmemory-policy"] == "noeviction"  # the operator's, untouched
    admin.config_set("maxmemory-policy", "allkeys-lru")
    monkeypatch.delenv("PRECOMPUTE_REDIS_MAXMEMORY")
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "maxmemory-policy allkeys-lru: at maxmemory it may evict the pointers" in out and "MAXMEMORY" not in out
    admin.config_set("maxmemory-policy", "volatile-lru")
    assert main(["status"]) == 0
    assert "warning" not in capsys.readouterr().out
    admin.close()


def test_a_url_with_a_typo_in_its_scheme_is_named_as_such(tmp_path, monkeypatch, capsys, redis_server, dagster_pg_url):
    """A typo'd or missing scheme was reported as a server that does not answer (no scheme), that refuses us ("invalid
    dsn"), or as redis-py's ValueError naming no variable, which stopped `status` altogether."""
    server = redis_server()
    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PRECOMPUTE_APP_DB_URL", dagster_pg_url)
    cases = [
        ("PRECOMPUTE_REDIS_URL", server.url.replace("redis://", "rdis://u:secret@"), "the scheme 'rdis://'"),
        ("PRECOMPUTE_REDIS_URL", f"127.0.0.1:{server.port}", "no scheme"),
        ("DAGSTER_PG_URL", dagster_pg_url.replace("postgresql+psycopg2://", "postgress://u:secret@"), "'postgress://'"),
        ("DAGSTER_PG_URL", dagster_pg_url.replace("+psycopg2", "+psycopg"), "ships the psycopg2 driver only"),
    ]
    for variable, url, reason in cases:
        monkeypatch.setenv("PRECOMPUTE_REDIS_URL", server.url)
        monkeypatch.setenv("DAGSTER_PG_URL", dagster_pg_url)
        monkeypatch.setenv(variable, url)
        assert main(["up"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"precompute up: {variable} has ") and reason in err, err
        assert "secret" not in err and "Traceback" not in err
        assert main(["status"]) == 0
        out = capsys.readouterr().out
        name = "redis    " if variable == "PRECOMPUTE_REDIS_URL" else "postgres "
        assert f"{name} external  invalid URL" in out and reason in out and "secret" not in out, out
    assert not (tmp_path / "home" / "redis").exists() and not (tmp_path / "home" / "postgres").exists()


@pytest.mark.parametrize(
    ("query", "reason"),
    [("ssl_cert_reqs=none", "ssl_cert_reqs that redis-py's redis:// connection does not take (TLS options need "
      "rediss://)"), ("timeout=5", "timeout that redis-py's redis:// connection does not take"),
     # redis-py raised its ValueError at the first command: `status` failed whole, naming no variable
     ("socket_timeout=abc", "Invalid value for 'socket_timeout' in connection URL")],
)  # fmt: skip
def test_a_redis_url_parameter_redis_py_cannot_take_is_named_in_one_line(
    query, reason, tmp_path, monkeypatch, capsys, redis_server, dagster_pg_url
):
    """redis-py hands a URL's query parameters to its connection as keyword arguments: a TLS option on redis://, or
    one it does not know, made `up`, `status` and `cache stats` end in a TypeError traceback ("unexpected keyword
    argument 'ssl_cert_reqs'") against a Redis that answers, and every step using Redis fail alike."""
    from precompute_assets.serving.connection import connect

    url = redis_server(password="s3cretPW").url
    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DAGSTER_PG_URL", dagster_pg_url)
    monkeypatch.setenv("PRECOMPUTE_REDIS_URL", f"{url}?{query}")
    for command in (["up"], ["cache", "stats"]):
        assert main(command) == 2, command
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and reason in err and "Traceback" not in err and "s3cret" not in err, err
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "redis     external  invalid URL" in out and reason in out and "s3cret" not in out, out
    with pytest.raises(ValueError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        connect(f"{url}?{query}")
    assert connect(f"{url}?client_name=bench&protocol=3").ping()  # parameters it takes still pass
    assert not (tmp_path / "home" / "redis").exists()


def test_a_redis_database_that_is_not_a_number_is_refused(tmp_path, monkeypatch, capsys, redis_server, dagster_pg_url):
    """redis-py reads /l (a typo of /1) as database 0: the cache shared database 0 with whatever lives there."""
    import dagster as dg

    from precompute_assets.defs.resources import RedisResource

    url = redis_server().url.replace("/0", "/l")
    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DAGSTER_PG_URL", dagster_pg_url)
    monkeypatch.setenv("PRECOMPUTE_REDIS_URL", url)
    assert main(["up"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the Redis URL's database 'l' is not a number" in err, err
    with pytest.raises(dg.Failure, match="is not a Redis URL: the Redis URL's database 'l' is not a number"):
        RedisResource(url=url).client()


def test_a_cluster_url_of_a_single_server_is_named_as_such(tmp_path, monkeypatch, capsys, redis_server):
    """redis-py's RedisClusterException is no RedisError: `status` failed whole (rc 2, no table), and a step's
    client raised it bare, retried as if the server were down."""
    import dagster as dg

    from precompute_assets.defs.resources import RedisResource

    url = f"{redis_server().url}?cluster=1"
    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PRECOMPUTE_REDIS_URL", url)
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "redis     external  refuses us" in out and "Cluster mode is not enabled" in out, out
    with pytest.raises(dg.Failure, match="is not a Redis Cluster") as failure:
        RedisResource(url=url).client()
    assert not failure.value.allow_retries


def test_up_and_the_cache_commands_name_a_bad_redis_scheme_alike(tmp_path, monkeypatch, capsys, dagster_pg_url):
    """`up` named the variable and the schemes it takes; `cache` printed redis-py's line, which names neither (and
    no Sentinel scheme): one line, exit code 2, the same words for both."""
    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DAGSTER_PG_URL", dagster_pg_url)
    monkeypatch.setenv("PRECOMPUTE_APP_DB_URL", dagster_pg_url)
    monkeypatch.setenv("PRECOMPUTE_REDIS_URL", "foo://u:secret@x")
    said = {}
    for command in (["up"], ["cache", "stats"], ["cache", "invalidate", "--kind", "ctr", "--key", "a"]):
        assert main(command) == 2, command
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err and "secret" not in err, err
        said[" ".join(command)] = err.removeprefix(f"precompute {command[0]}: ")
    assert set(said.values()) == {
        "PRECOMPUTE_REDIS_URL has the scheme 'foo://', not one of redis://, rediss://, unix://, redis+sentinel://, "
        "rediss+sentinel://: foo://u:***@x\n"
    }, said


@pytest.mark.parametrize(
    "url",
    [
        "redis://app:s3cr/et@cache.example:6379/0",
        "rediss://:s3cr?et@cache.example/0",
        "redis://app:s3cr]et@cache.example:6379/0",  # urllib: "Invalid IPv6 URL", naming no variable
        "redis://app:Se@s3/cret@127.0.0.1:6379/0",  # urllib: host 's3', which the connection's error named
    ],
)
def test_up_never_shows_a_password_that_cuts_the_url_short(url, tmp_path, monkeypatch, capsys, dagster_pg_url):
    """An unencoded '/' or '?' in the password ends the authority there: `up` said "names no host" (or nothing of the
    port) with the URL, which redact could not cut the password out of. Now the line `cache` prints, without it."""
    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DAGSTER_PG_URL", dagster_pg_url)
    monkeypatch.setenv("PRECOMPUTE_APP_DB_URL", dagster_pg_url)
    monkeypatch.setenv("PRECOMPUTE_REDIS_URL", url)
    said = []
    for command in (["up"], ["cache", "stats"]):
        assert main(command) == 2, command
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "s3" not in err and "percent-encode" in err, err
        said.append(err.removeprefix(f"precompute {command[0]}: "))
    assert said[0] == said[1] and said[0].startswith("PRECOMPUTE_REDIS_URL: the URL's host:port cannot be read")


@pytest.mark.parametrize("url", ["rediss://:s3cr?et@cache.example/0", "foo://u:s3#cr@x", "foo://u:s3/cr@x"])
def test_status_never_shows_a_password_with_an_unencoded_separator(url, tmp_path, monkeypatch, capsys):
    """redact cut the password at its first '?' or '#': `status` printed 'rediss://:s3cr?et@cache.example/0' beside
    "invalid URL" (and `up` the same for a mistyped scheme)."""
    from precompute_assets.stack import redact

    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PRECOMPUTE_REDIS_URL", url)
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "invalid URL" in out and "s3" not in out, out
    assert "s3" not in redact(url) and redact("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://app:s3cr/et@127.0.0.1/app",
        "postgresql://app:s3cr?et@127.0.0.1:5432/app",
        "postgresql://app:2024?s3cr=et@127.0.0.1:5432/app",  # libpq's password, urllib's host 'app' and a query
        "postgresql://app:s3cr[et@127.0.0.1:5432/app",  # urllib's "Invalid IPv6 URL" failed status whole
    ],
)
def test_status_names_an_external_url_whose_port_cannot_be_read(url, tmp_path, monkeypatch, capsys):
    """An unencoded '/' or '?' in a PostgreSQL password (a user name given): `status` failed whole with a bare
    'ValueError: the URL's host:port cannot be read', naming no variable and showing no service, where `up` names it."""
    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PRECOMPUTE_APP_DB_URL", url)
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "app_db    external  invalid URL" in out and "redis     embedded" in out, out
    assert "PRECOMPUTE_APP_DB_URL: the URL's host:port cannot be read" in out and "s3" not in out, out


def test_status_shows_the_embedded_application_database_beside_an_external_dagster_one(
    tmp_path, monkeypatch, capsys, dagster_pg_url
):
    """With only DAGSTER_PG_URL external, `up` starts an embedded PostgreSQL for the application database, which
    `status` never showed: stopped, it still said nothing wrong."""
    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DAGSTER_PG_URL", dagster_pg_url)
    monkeypatch.delenv("PRECOMPUTE_APP_DB_URL", raising=False)
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "postgres  external  reachable" in out and "app_db    embedded  stopped" in out, out


def test_status_says_an_embedded_redis_that_does_not_answer_or_cannot_write(
    tmp_path, monkeypatch, capsys, dagster_pg_url
):
    """A stopped (SIGSTOP) or hung embedded Redis, and one whose disk is full (MISCONF: it refuses every write), were
    shown as `running (pid N)` with nothing more."""
    import signal

    from precompute_assets import stack as stack_module

    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DAGSTER_PG_URL", dagster_pg_url)
    stack = Stack()
    stack.up(postgres=False)
    try:
        info = stack_module.server_info

        def full_disk(url: str, section: str) -> dict | None:
            found = info(url, section)
            return {**found, "aof_last_write_status": "err"} if section == "persistence" else found

        monkeypatch.setattr(stack_module, "server_info", full_disk)
        assert main(["status"]) == 0
        out = capsys.readouterr().out
        assert f"redis     embedded  running (pid {stack.redis.pid})" in out, out
        assert "redis     warning   its last AOF write failed (a full disk?): it refuses writes" in out, out
        os.kill(stack.redis.pid, signal.SIGSTOP)
        try:
            assert main(["status"]) == 0
        finally:
            os.kill(stack.redis.pid, signal.SIGCONT)
        out = capsys.readouterr().out
        assert f"redis     embedded  not answering (pid {stack.redis.pid})" in out, out
    finally:
        stack.down()


def test_status_and_env_need_no_writable_home_when_every_server_is_external(
    tmp_path, monkeypatch, capsys, redis_server, dagster_pg_url, app_db_url
):
    """A read-only root file system (a container), every server external: `status`, `env` and `up` failed with a
    bare OSError while making the home's stack.json. Only an `up` that has something to start needs the home."""
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv("PRECOMPUTE_HOME", str(blocked / "home"))  # cannot be made, even by root
    monkeypatch.setenv("PRECOMPUTE_REDIS_URL", redis_server().url)
    monkeypatch.setenv("DAGSTER_PG_URL", dagster_pg_url)
    monkeypatch.setenv("PRECOMPUTE_APP_DB_URL", app_db_url)
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "redis     external  reachable" in out and "postgres  external  reachable" in out, out
    assert main(["env"]) == 0 and "PRECOMPUTE_REDIS_URL=" in capsys.readouterr().out
    monkeypatch.delenv("PRECOMPUTE_APP_DB_URL")  # now up has a server to start
    assert main(["up"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{blocked / 'home'} cannot hold the embedded servers' state" in err, err


def test_redis_acl_apply_names_a_bad_admin_url_scheme_as_up_does(tmp_path, monkeypatch, capsys):
    """`redis acl --apply` printed redis-py's line for PRECOMPUTE_REDIS_ADMIN_URL, naming neither the variable nor the
    Sentinel schemes; now the words of `up` and `cache`, one line, exit code 2, nothing started."""
    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PRECOMPUTE_REDIS_PUBLISHER_PASSWORD", "publisher-secret")
    monkeypatch.setenv("PRECOMPUTE_REDIS_READER_PASSWORD", "reader-secret")
    monkeypatch.setenv("PRECOMPUTE_REDIS_ADMIN_URL", "foo://admin:secret@x")
    assert main(["redis", "acl", "--apply"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "precompute redis: PRECOMPUTE_REDIS_ADMIN_URL has the scheme 'foo://', not one of redis://, rediss://, "
        "unix://, redis+sentinel://, rediss+sentinel://: foo://admin:***@x\n"
    ), err
    assert not (tmp_path / "home" / "redis").exists()


def test_a_url_without_its_colon_slash_slash_never_shows_its_password(
    tmp_path, monkeypatch, capsys, redis_server, dagster_pg_url
):
    """``redact`` found a password only after '://': a URL whose scheme was typed ``postgresql+psycopg2//`` or
    ``redis:/`` was refused by `up`, `status` and `campaign` with the whole URL, password included."""
    server = redis_server()
    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    cases = [
        ("DAGSTER_PG_URL", "postgresql+psycopg2//app:s3cretPW@db.example:5432/dagster", [["up"], ["campaign", "list"]]),
        ("PRECOMPUTE_REDIS_URL", "redis:/app:s3cretPW@cache.example:6379/0", [["up"]]),
        ("PRECOMPUTE_REDIS_URL", "app:s3cretPW@cache.example:6379", [["up"]]),
    ]
    for variable, url, commands in cases:
        monkeypatch.setenv("DAGSTER_PG_URL", dagster_pg_url)
        monkeypatch.setenv("PRECOMPUTE_REDIS_URL", server.url)
        monkeypatch.setenv(variable, url)
        for command in commands:
            assert main(command) == 2
            err = capsys.readouterr().err
            assert f"{variable} has no scheme" in err and "s3cretPW" not in err, err
        assert main(["status"]) == 0
        out = capsys.readouterr().out
        assert "invalid URL" in out and "s3cretPW" not in out, out


@pytest.mark.parametrize(
    "url",
    [
        "redis//app:s3cr?etPW@cache.example:6379/0",
        "redis:/:s3cr#etPW@cache.example:6379/0",
        "app:s3cr?etPW@c:1",
        "redis//app:s3cr?e=tPW@cache.example:6379/0",  # what follows the '?' reads as a parameter
    ],
)
def test_a_url_without_its_colon_slash_slash_and_a_question_mark_in_its_password_never_shows_it(
    url, tmp_path, monkeypatch, capsys, dagster_pg_url
):
    """redact read a mistyped '://' (bb607e2) and a '?' or '#' in a password (198b65c), but not both at once: `up` and
    `status` printed such a URL whole beside 'has no scheme'."""
    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DAGSTER_PG_URL", dagster_pg_url)
    monkeypatch.setenv("PRECOMPUTE_REDIS_URL", url)
    assert main(["up"]) == 2
    err = capsys.readouterr().err
    assert "PRECOMPUTE_REDIS_URL has no scheme" in err and "s3cr" not in err and "etPW" not in err, err
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "invalid URL" in out and "s3cr" not in out and "etPW" not in out, out


@pytest.mark.parametrize(
    ("variable", "url"),
    [
        ("PRECOMPUTE_REDIS_URL", "redis://:correct horse battery@127.0.0.1:1/0"),
        ("PRECOMPUTE_REDIS_URL", "redis://app:correct horse?b@ttery@127.0.0.1:1/0"),
        ("PRECOMPUTE_APP_DB_URL", "postgresql://app:correct horse battery@127.0.0.1:1/app"),
    ],
)
def test_a_password_with_spaces_is_never_shown(variable, url, tmp_path, monkeypatch, capsys):
    """redact read each whitespace-separated word alone: a passphrase's words ('correct', 'horse', 'battery@...')
    held no user info each, and `up` and `status` printed the URL whole, where the regexes before them had hidden it."""
    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv(variable, url)
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "horse" not in out and "correct" not in out and ":***@" in out, out
    if variable == "PRECOMPUTE_REDIS_URL":  # checked first: nothing else need answer
        assert main(["up"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "horse" not in err and "correct" not in err, err
    assert redact(f"{url} failed") == f"{url.partition(':')[0]}://{url.partition('//')[2].partition(':')[0]}:***@" + (
        f"{url.rpartition('@')[2]} failed"
    )


def test_an_app_db_password_with_a_bare_percent_is_never_shown(
    tmp_path, monkeypatch, capsys, redis_server, dagster_pg_url
):
    """libpq refuses a password whose '%' is no escape with 'invalid percent-encoded token: "<the password>"', which
    `up` and `status` printed after the redacted URL."""
    server = redis_server()
    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PRECOMPUTE_REDIS_URL", server.url)
    monkeypatch.setenv("DAGSTER_PG_URL", dagster_pg_url)
    monkeypatch.setenv("PRECOMPUTE_APP_DB_URL", with_login(dagster_pg_url, "postgres:s3cret%PW"))
    assert main(["up"]) == 2
    err = capsys.readouterr().err
    assert "PRECOMPUTE_APP_DB_URL" in err and "percent-encoded" in err and "s3cret" not in err, err
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "percent-encoded" in out and "s3cret" not in out, out


@pytest.mark.parametrize("url", ["redis://:s3cr?et@127.0.0.1:6379/0", "rediss://app:s3cr#et@cache.example/0"])
def test_a_password_with_a_question_mark_or_hash_is_redacted_where_the_url_is_shown(url):
    """redact() ended the user info at the first '?' or '#': such a URL was shown whole, password included, in the
    Dagster failure of every step using Redis ("is not a Redis URL"), and by `up` and `status` (below)."""
    import dagster as dg

    from precompute_assets.defs.resources import RedisResource

    assert "s3cr" not in redact(url) and "et@" not in redact(url), redact(url)
    with pytest.raises(dg.Failure) as failure:
        RedisResource(url=url).client()
    assert "is not a Redis URL" in failure.value.description and "s3cr" not in failure.value.description


def test_up_and_status_never_show_a_password_with_a_question_mark(tmp_path, monkeypatch, capsys, dagster_pg_url):
    """`up` and `status` said "names no host" with the whole URL, password included."""
    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DAGSTER_PG_URL", dagster_pg_url)
    monkeypatch.setenv("PRECOMPUTE_REDIS_URL", "redis://:s3cr?et@127.0.0.1:6379/0")
    assert main(["up"]) == 2
    assert main(["status"]) == 0
    shown = capsys.readouterr()
    assert "host:port cannot be read" in shown.err and "names no host" in shown.out, shown  # up: stack.url_error
    assert "s3cr" not in shown.out + shown.err, shown


def test_a_read_only_replica_url_is_refused_by_up_and_named_by_status(
    tmp_path, monkeypatch, capsys, redis_server, dagster_pg_url, app_db_url
):
    """A read-only replica's URL passed `up` and showed "reachable": every publish, drain and run record then failed
    on it (READONLY, "cannot execute ... in a read-only transaction")."""
    from urllib.parse import quote

    primary = redis_server()
    replica = redis_server(extra_config=(f"replicaof 127.0.0.1 {primary.port}",))
    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PRECOMPUTE_REDIS_URL", replica.url)
    monkeypatch.setenv("DAGSTER_PG_URL", dagster_pg_url)
    monkeypatch.setenv("PRECOMPUTE_APP_DB_URL", app_db_url)
    assert main(["up"]) == 2
    err = capsys.readouterr().err
    assert f"refuses us: a read-only replica of 127.0.0.1:{primary.port}: point PRECOMPUTE_REDIS_URL at the" in err, err
    assert main(["status"]) == 0
    assert "redis     external  refuses us" in capsys.readouterr().out
    monkeypatch.setenv("PRECOMPUTE_REDIS_URL", primary.url)
    standby = f"{dagster_pg_url}?options={quote('-c default_transaction_read_only=on')}"  # as a standby answers
    monkeypatch.setenv("DAGSTER_PG_URL", standby)
    assert main(["up"]) == 2
    err = capsys.readouterr().err
    assert "DAGSTER_PG_URL points at" in err and "read-only" in err and "point DAGSTER_PG_URL at the primary" in err
    monkeypatch.setenv("DAGSTER_PG_URL", dagster_pg_url)
    assert main(["up"]) == 0
    capsys.readouterr()


def test_status_shows_an_external_application_database_that_refuses_us(
    tmp_path, monkeypatch, capsys, redis_server, dagster_pg_url, app_db_url
):
    """`up` refused a PRECOMPUTE_APP_DB_URL whose login or database does not work, but `status` showed only Dagster's
    database: every line looked fine while the campaign sensor and the documents steps failed on it."""
    server = redis_server()
    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PRECOMPUTE_REDIS_URL", server.url)
    monkeypatch.setenv("DAGSTER_PG_URL", dagster_pg_url)
    monkeypatch.setenv("PRECOMPUTE_APP_DB_URL", app_db_url.rsplit("/", 1)[0] + "/no_such_database")
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "postgres  external  reachable" in out, out
    assert "app_db    external  refuses us" in out and 'database "no_such_database" does not exist' in out, out
    monkeypatch.setenv("PRECOMPUTE_APP_DB_URL", app_db_url)
    assert main(["status"]) == 0
    assert "app_db    external  reachable" in capsys.readouterr().out
    monkeypatch.delenv("PRECOMPUTE_APP_DB_URL")
    assert main(["status"]) == 0
    assert "app_db    embedded  stopped" in capsys.readouterr().out  # beside Dagster's external one
    monkeypatch.delenv("DAGSTER_PG_URL")
    assert main(["status"]) == 0
    assert "app_db" not in capsys.readouterr().out  # the embedded PostgreSQL's line is both databases'


def test_a_redis_without_info_is_not_taken_for_one_that_refuses_us(tmp_path, monkeypatch, capsys, redis_server, schema):
    """The replica check reads INFO: a server (or proxy) without that command is still a working Redis for `up` and for
    Dagster's resource, whether it is a replica cannot be told."""
    from precompute_assets.defs.resources import RedisResource

    server = redis_server(extra_config=('rename-command INFO ""',))
    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PRECOMPUTE_REDIS_URL", server.url)
    monkeypatch.delenv("DAGSTER_PG_URL", raising=False)
    monkeypatch.delenv("PRECOMPUTE_APP_DB_URL", raising=False)
    from precompute_assets.stack import ENV_REDIS, login_problem

    assert login_problem(ENV_REDIS, server.url) is None
    client = RedisResource(url=server.url, namespace=schema.namespace).client()
    assert client.ping()
    client.close()


def test_a_tls_url_to_a_redis_without_tls_says_so(tmp_path, monkeypatch, capsys, redis_server):
    """A rediss:// URL to a plain Redis: the server waits for a command while the client waits for its handshake, and
    `up`, `status` and `cache` said only that it does not answer, a timeout, or `unreachable` (h_ops)."""
    from precompute_assets.stack import ENV_REDIS, login_problem

    plain = redis_server().url
    tls = "rediss://" + plain.partition("://")[2]
    said = login_problem(ENV_REDIS, tls)
    assert said is not None and said.startswith("accepts connections but does not answer")
    assert "a server without TLS takes redis://, not rediss://" in said
    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PRECOMPUTE_REDIS_URL", tls)
    monkeypatch.delenv("DAGSTER_PG_URL", raising=False)
    monkeypatch.delenv("PRECOMPUTE_APP_DB_URL", raising=False)
    assert main(["status"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("redis "))
    assert "external  unreachable" in line and "takes redis://, not rediss://" in line, line
    assert login_problem(ENV_REDIS, plain) is None  # the same server by its own scheme: no hint, no problem


def test_an_up_whose_external_server_refuses_its_login_starts_nothing(
    tmp_path, monkeypatch, capsys, dagster_pg_url, app_db_url
):
    # Redis embedded, PostgreSQL external with a database that does not exist: the embedded Redis kept running.
    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PRECOMPUTE_REDIS_URL", raising=False)
    monkeypatch.setenv("DAGSTER_PG_URL", dagster_pg_url)
    monkeypatch.setenv("PRECOMPUTE_APP_DB_URL", app_db_url.rsplit("/", 1)[0] + "/no_such_database")
    try:
        assert main(["up"]) == 2
        assert "PRECOMPUTE_APP_DB_URL points at" in capsys.readouterr().err
        assert Stack(tmp_path / "home").redis.pid is None and not (tmp_path / "home" / "redis").exists()
    finally:
        Stack(tmp_path / "home").down()


def test_servers_on_unix_sockets_are_reachable(tmp_path, monkeypatch, capsys, redis_server, dagster_pg_url, app_db_url):
    folder = Path(tempfile.mkdtemp(prefix="pc"))  # a socket path holds at most 107 bytes: not under tmp_path
    try:
        server = redis_server(extra_config=(f"unixsocket {folder / 'redis.sock'}", "unixsocketperm 700"))
        assert server.pid is not None
        listener = socket.socket(socket.AF_UNIX)  # what a PostgreSQL with unix_socket_directories=FOLDER opens
        listener.bind(str(folder / ".s.PGSQL.5433"))
        listener.listen()
        with listener:
            assert reachable(f"postgresql://app@/precompute?host={folder}&port=5433")  # was False: "does not answer"
            assert not reachable(f"postgresql://app@/precompute?host={folder}")  # port 5432: no such socket
            assert reachable(f"postgresql://app@:5433/precompute?host={folder}")  # libpq's port in the authority
        monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
        monkeypatch.setenv("PRECOMPUTE_REDIS_URL", f"unix://{folder / 'redis.sock'}?db=0")
        monkeypatch.setenv("DAGSTER_PG_URL", dagster_pg_url)
        monkeypatch.setenv("PRECOMPUTE_APP_DB_URL", app_db_url)
        assert main(["up"]) == 0, capsys.readouterr().err
        assert "redis     external  reachable" in capsys.readouterr().out
        assert not (tmp_path / "home" / "redis").exists()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_bad_environments_are_one_line_and_exit_2_not_a_traceback(tmp_path, monkeypatch, capsys):
    a_file = tmp_path / "a file"
    a_file.write_text("")
    cases = [  # (environment, command, what the line says); none starts a server
        ({"PRECOMPUTE_REDIS_URL": "redis://127.0.0.1:1/0?cluster=1"}, ["cache", "stats"], "RedisClusterException"),
    ]
    # A home that is a file: the stack's own error, one line naming it (it was a bare FileExistsError)
    # (status names a URL whose host:port cannot be read as an invalid URL: test_status_names_an_external_url_...)
    for command in (["env"], ["status"], ["down"]):
        with monkeypatch.context() as patched:
            patched.setenv("PRECOMPUTE_HOME", str(a_file))
            assert main(command) == 2, command
            err = capsys.readouterr().err
            assert err == f"precompute {command[0]}: {a_file} cannot hold the embedded servers' state: File exists\n"
    for environment, command, says in cases:
        with monkeypatch.context() as patched:
            patched.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
            for name, value in environment.items():
                patched.setenv(name, value)
            assert main(command) == 2, command
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and says in err and "Traceback" not in err, err
            assert err.startswith(f"precompute {command[0]}: ") and "PRECOMPUTE_TRACEBACK=1 shows where" in err
            patched.setenv("PRECOMPUTE_TRACEBACK", "1")  # the traceback, for whoever needs where
            with pytest.raises(Exception) as raised:
                main(command)
            assert says.startswith(type(raised.value).__name__)


def test_precompute_traceback_shows_where_a_server_failed_for_every_command(tmp_path, monkeypatch, capsys):
    import redis

    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PRECOMPUTE_REDIS_URL", "redis://127.0.0.1:1/0")
    for command in (["cache", "stats"], ["cache", "invalidate", "--kind", "ctr", "--key", "a"]):
        with monkeypatch.context() as patched:
            assert main(command) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "Connection refused" in err and "Traceback" not in err, err
            patched.setenv("PRECOMPUTE_TRACEBACK", "1")  # had no effect: the one line again
            with pytest.raises(Exception) as raised:
                main(command)
            assert isinstance(raised.value.__context__, redis.ConnectionError)
            assert not raised.value.__suppress_context__  # Python prints the ConnectionError's traceback first


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["docs", "generate", "--n", "5", "--start-id=-10"], "argument --start-id: must be at least 0, got -10"),
        (["docs", "generate", "--n", "5", "--seed=-1"], "argument --seed: must be at least 0, got -1"),
        (["dev", "--port=-1"], "argument --port: must be at least 1, got -1"),
        (["dev", "--port", "70000"], "argument --port: must be at most 65535, got 70000"),
        (["replay", "--trace", " ", "--days", "3", "--top-n", "1", "--capacity", "5"], "--trace is empty"),
        (["bench", "events", "--daemon-logins=-5"], "argument --daemon-logins: must be at least 0, got -5"),
        (["bench", "rerank", "--keys", "99"], "bench rerank needs --keys of at least 100"),
    ],
)
def test_out_of_range_arguments_are_refused_before_any_work(argv, says, capsys):
    try:
        code = main(argv)
    except SystemExit as usage:  # argparse's usage error
        code = usage.code
    err = capsys.readouterr().err
    assert code == 2 and says in err and err.count("\n") == 1, err


def test_env_is_shell_safe_and_stable_before_up(tmp_path, monkeypatch, capsys):
    """`eval "$(precompute env)"` must reproduce every value, and ports must not change between calls."""
    import subprocess

    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home with space"))
    monkeypatch.setenv("PRECOMPUTE_REDIS_URL", "rediss://:p$w`d@127.0.0.1:6380/0?a=1&b=2")
    monkeypatch.delenv("DAGSTER_PG_URL", raising=False)
    main(["env"])
    first = capsys.readouterr().out
    main(["env"])
    assert capsys.readouterr().out == first
    shown = subprocess.run(
        ["bash", "-c", first + 'printf "%s\\n" "$PRECOMPUTE_REDIS_URL" "$PRECOMPUTE_HOME" "$DAGSTER_PG_URL"'],
        capture_output=True, text=True, check=True, env={"PATH": os.environ["PATH"]},
    ).stdout.splitlines()  # fmt: skip
    assert shown[0] == "rediss://:p$w`d@127.0.0.1:6380/0?a=1&b=2"
    assert shown[1] == str(tmp_path / "home with space")
    secret = (tmp_path / "home with space" / "secret").read_text().strip()  # the home's password, in its URLs
    assert shown[2].startswith(f"postgresql+psycopg2://postgres:{secret}@127.0.0.1:")


@pytest.mark.parametrize("command", ["up", "dev", "env"])
@pytest.mark.parametrize(
    "variable, value, says",
    [
        ("PRECOMPUTE_TIMEZONE", "Europe/Berln", "PRECOMPUTE_TIMEZONE='Europe/Berln' is not a known timezone"),
        ("PRECOMPUTE_PARTITIONS_START", "2026-02-30", "PRECOMPUTE_PARTITIONS_START='2026-02-30' is not a date"),
        (
            "PRECOMPUTE_CAMPAIGN_MAX_ADS",
            "10k",
            "PRECOMPUTE_CAMPAIGN_MAX_ADS must be a whole number of ads of at least 1, got '10k'",
        ),
        # the Definitions read these too when they load: each failed the code location in the UI with exit code 0
        ("PRECOMPUTE_EXPERIMENT", "frequency,bogus", "PRECOMPUTE_EXPERIMENT='frequency,bogus': unknown strategy"),
        ("PRECOMPUTE_EXECUTOR", "bogus", "PRECOMPUTE_EXECUTOR='bogus' is not an executor"),
    ],
)
def test_up_dev_and_env_refuse_a_malformed_setting_they_would_export(
    tmp_path, monkeypatch, capsys, command, variable, value, says
):
    """They exported a typo'd timezone or start with exit code 0, and the code location then failed to load in the
    UI; now it is one line and exit code 2, before any server starts."""
    import precompute_assets.tools.cli as cli

    def no_stack() -> None:  # refused before any server starts (or `dev` execs Dagster in the test's process)
        raise AssertionError(f"precompute {command} reached the stack with {variable}={value!r}")

    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv(variable, value)
    monkeypatch.setattr(cli, "Stack", no_stack)
    assert main([command]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"precompute {command}: {says}")
    assert captured.err.count("\n") == 1 and captured.out == ""


@pytest.mark.parametrize(
    "what, variable, value",
    [
        ("campaign", "PRECOMPUTE_CAMPAIGN_MAX_ADS", "10k"),
        ("graph", "PRECOMPUTE_TIMEZONE", "Europe/Berln"),
        ("serve", "PRECOMPUTE_PARTITIONS_START", "2026-02-30"),
    ],
)
def test_bench_refuses_a_malformed_setting_before_any_server_starts(
    tmp_path, monkeypatch, capsys, what, variable, value
):
    """`bench campaign` with a typo'd PRECOMPUTE_CAMPAIGN_MAX_ADS started both servers, trained a model, then ended
    in Dagster's stack trace and a ValueError; `bench graph` alike with a bad timezone. Each bench starts its servers
    as `up` does, and `up` refuses these settings in one line before starting anything: so does bench now."""
    import precompute_assets.tools.cli as cli

    def started(*args, **kwargs):
        raise AssertionError(f"bench {what} started its servers with {variable}={value!r}")

    monkeypatch.setattr(cli, "Stack", started)
    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "never-started"))
    monkeypatch.setenv(variable, value)
    assert main(["bench", what]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"precompute bench: {variable}") and err.count("\n") == 1, err
    assert not (tmp_path / "never-started").exists()


@pytest.mark.parametrize(
    "argv, says",
    [
        (["graph", "--keys", "5"], "bench graph does not read --keys (bench serve/demand/load/rerank/admission)"),
        (
            ["demand", "--processes", "4", "--seconds", "3"],
            "bench demand does not read --processes (bench load), --seconds (bench load)",
        ),
        (["serve", "--docs", "10"], "bench serve does not read --docs (bench embed)"),
        # Given its default value, it was let through (compared with the defaults); an abbreviation is the option.
        (["demand", "--processes", "2"], "bench demand does not read --processes (bench load)"),
        (["events", "--second=10"], "bench events does not read --seconds (bench load)"),
    ],
)
def test_bench_refuses_an_option_the_benchmark_does_not_read(tmp_path, monkeypatch, capsys, argv, says):
    """Every benchmark shares one parser: `bench demand --processes 4` ran with the option silently ignored."""
    import precompute_assets.tools.bench as bench
    import precompute_assets.tools.cli as cli

    def ran(*args, **kwargs):
        raise AssertionError(f"bench {argv[0]} ran with an option it does not read")

    monkeypatch.setattr(cli, "Stack", ran)  # the benchmarks with services start them first
    monkeypatch.setattr(bench, "bench_demand", ran)  # the one in memory
    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "never-started"))
    assert main(["bench", *argv]) == 2
    assert capsys.readouterr().err == f"precompute bench: {says}\n"
    assert not (tmp_path / "never-started").exists()


def test_env_exports_the_partitions_start_and_a_set_ad_feature_set(tmp_path, monkeypatch, capsys):
    """The README: `env` exports every variable with a default, and the PRECOMPUTE_AD_* feature set when set (a blank
    PRECOMPUTE_AD_LOG_SCALED means no log-scaled column, so it is exported too)."""
    import subprocess

    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PRECOMPUTE_PARTITIONS_START", raising=False)
    monkeypatch.delenv("PRECOMPUTE_AD_CATEGORICAL", raising=False)
    monkeypatch.setenv("PRECOMPUTE_AD_NUMERIC", "price,rating")
    monkeypatch.setenv("PRECOMPUTE_AD_LOG_SCALED", "")
    assert main(["env"]) == 0
    script = capsys.readouterr().out
    show = 'printf "%s|" "$PRECOMPUTE_PARTITIONS_START" "$PRECOMPUTE_AD_NUMERIC" "${PRECOMPUTE_AD_LOG_SCALED-unset}" '
    show += '"${PRECOMPUTE_AD_CATEGORICAL-unset}"'
    shown = subprocess.run(
        ["bash", "-c", script + show], capture_output=True, text=True, check=True, env={"PATH": os.environ["PATH"]}
    ).stdout
    assert shown == "2026-01-01|price,rating||unset|"


def test_env_exports_a_set_campaign_cap(tmp_path, monkeypatch, capsys):
    """`campaign register` counts ads against PRECOMPUTE_CAMPAIGN_MAX_ADS and warming refuses a campaign over the cap
    the Definitions read: a shell or `precompute dev` started from `env`'s output warmed under the default cap."""
    import subprocess

    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    show = 'printf "%s|" "${PRECOMPUTE_CAMPAIGN_MAX_ADS-unset}"'
    for value, shown in ((None, "unset|"), ("50000", "50000|")):
        if value is None:
            monkeypatch.delenv("PRECOMPUTE_CAMPAIGN_MAX_ADS", raising=False)
        else:
            monkeypatch.setenv("PRECOMPUTE_CAMPAIGN_MAX_ADS", value)
        assert main(["env"]) == 0
        script = capsys.readouterr().out
        out = subprocess.run(["bash", "-c", script + show], capture_output=True, text=True, check=True,
                             env={"PATH": os.environ["PATH"]}).stdout  # fmt: skip
        assert out == shown, script


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["demo", "--days", "0"], "--days: must be at least 1, got 0"),
        (["demo", "--top-n", "x"], "--top-n: expected a whole number, got 'x'"),
        (["bench", "publish", "--n", "-5"], "--n: must be at least 1, got -5"),
        (["bench", "serve", "--lookups", "1"], "--lookups: must be at least 100, got 1"),  # its p99 was its one sample
        (["bench", "nonsense"], "invalid choice"),
        (["nonsense"], "invalid choice"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err and err.startswith("precompute")


def test_demo_refuses_fewer_documents_than_the_embedders_dimensions_before_starting(tmp_path, monkeypatch, capsys):
    """embedding_model needs more documents than dimensions: the demo failed on it minutes in, after the daily graph."""
    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    assert main(["demo", "--docs", "300"]) == 2
    err = capsys.readouterr().err
    assert "--docs must be more than 300, the embedder's dimensions, got 300" in err and err.count("\n") == 1
    assert not (tmp_path / "home").exists()  # nothing started


def test_demo_refuses_days_before_the_first_partition_before_starting(tmp_path, monkeypatch, capsys):
    """The demo's traffic starts --days + 1 days ago: before PRECOMPUTE_PARTITIONS_START it failed after resetting
    Redis and serving the history, on Dagster's "Could not find a partition with key ...", naming no option."""
    import datetime as dt

    import precompute_assets.tools.cli as cli

    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PRECOMPUTE_TIMEZONE", "UTC")
    start = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=5)
    monkeypatch.setenv("PRECOMPUTE_PARTITIONS_START", start.isoformat())

    def started(stack, **kwargs):  # where the demo would start its servers
        raise cli.CliError("past the checks")

    monkeypatch.setattr(cli, "_up", started)
    for days in ("5", "99999999999999999999999"):  # the huge one was an OverflowError, after the stack started
        assert main(["demo", "--days", days]) == 2
        assert capsys.readouterr().err == (
            f"precompute demo: --days {days} starts the demo's traffic before the first partition day {start} "
            "(PRECOMPUTE_PARTITIONS_START): at most 4 days of history fit after it; give fewer, or set an earlier "
            "start\n"
        )
    assert main(["demo", "--days", "4"]) == 2 and "past the checks" in capsys.readouterr().err


def test_docs_load_bad_files_are_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "never-started"))
    unreadable = tmp_path / "locked.jsonl"
    unreadable.write_text("{}\n")
    unreadable.chmod(0)
    folder = tmp_path / "folder.jsonl"
    folder.mkdir()
    cases = [
        (tmp_path / "missing.jsonl", "no such file"),
        (tmp_path / "docs.txt", "unknown suffix '.txt'"),
        (folder, "not a file"),
        (tmp_path / "arr.json", "arr.json: the file is one JSON array, not JSON Lines (one object per line)"),
        (tmp_path / "arr.json.gz", "arr.json.gz: the file is one JSON array, not JSON Lines"),
        (tmp_path / "pretty.json", "pretty.json: the first line is a lone '{': pretty-printed JSON, not JSON Lines"),
        (tmp_path / "corrupt.parquet", "corrupt.parquet: not a readable Parquet file: "),
        (tmp_path / "utf16.jsonl", "utf16.jsonl: the file is UTF-16 text (it starts with UTF-16's byte order mark)"),
        (tmp_path / "utf16.csv.gz", "utf16.csv.gz: the file is UTF-16 text"),
    ]
    # Windows' "Unicode" exports: the JSONL loaded every record but the first, each line decoded on its own
    records = '{"doc_id": "1", "body": "a"}\n{"doc_id": "2", "body": "b"}\n'
    (tmp_path / "utf16.jsonl").write_bytes(records.encode("utf-16"))
    (tmp_path / "utf16.csv.gz").write_bytes(gzip.compress(b"\xfe\xff" + "doc_id,body\n1,a\n".encode("utf-16-be")))
    (tmp_path / "arr.json").write_text('\ufeff  \n[\n{"doc_id": "1", "body": "a"},\n{"doc_id": "2", "body": "b"}\n]\n')
    (tmp_path / "arr.json.gz").write_bytes(gzip.compress(b'[{"doc_id": "1", "body": "a"}]'))
    (tmp_path / "pretty.json").write_text('\ufeff\n{\n  "doc_id": "1",\n  "body": "a"\n}\n')  # jq . or indent=2
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1 this is not parquet")
    if os.geteuid() != 0:  # root reads a file of mode 000
        cases.append((unreadable, "cannot read"))
    (tmp_path / "docs.txt").write_text("doc_id\n1\n")
    (tmp_path / "docs.jsonl").write_text('{"doc_id": "1"}\n')
    options = [[], ["--no-header", "--id-field", "1"], ["--id-field", " "], ["--language", "english!"]]
    for path, expected, extra in [
        *((path, expected, []) for path, expected in cases),
        (tmp_path / "docs.jsonl", "--no-header is for CSV and TSV files, not jsonl", options[1]),
        (tmp_path / "docs.jsonl", "the doc_id field is blank", options[2]),
        (tmp_path / "docs.jsonl", "language 'english!' is not a well-formed BCP 47 tag", options[3]),
        (tmp_path / "docs.tsv", "without a header, fields are 1-based numbers: the body field is 'text'",
         ["--no-header", "--id-field", "1", "--body-field", "text"]),
    ]:  # fmt: skip
        if path.suffix == ".tsv":
            path.write_text("1\tx\n")
        assert main(["docs", "load", str(path), *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err and "Traceback" not in err, err
    assert not (tmp_path / "never-started" / "redis").exists()  # nothing was started for a bad file


def test_loads_name_a_csv_that_is_not_text(tmp_path, monkeypatch, capsys):
    """A .gz, Excel workbook, Parquet or UTF-16 file named .csv was refused for "missing columns", its "header" a
    line of binary garbage ('\\udc8b\\x08...'): each is named, with what to do, before anything starts."""
    import bz2
    import zipfile

    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "never-started"))
    text = "ts_ms,ad_id,clicked,doc_id,body\n1764547200000,a1,1,d1,b\n"
    with zipfile.ZipFile(tmp_path / "book.csv", "w") as book:  # an .xlsx is a zip archive
        book.writestr("xl/workbook.xml", "<workbook/>")
    pq.write_table(pa.table({"ad_id": ["a1"]}), tmp_path / "table.csv")
    (tmp_path / "packed.csv").write_bytes(gzip.compress(text.encode()))
    (tmp_path / "packed.bz2.csv").write_bytes(bz2.compress(text.encode()))
    (tmp_path / "windows.csv").write_bytes(text.encode("utf-16"))
    (tmp_path / "twice.csv.gz").write_bytes(gzip.compress(gzip.compress(text.encode())))
    cases = {
        "book.csv": "the file is a zip archive (an Excel workbook?), not text: export or extract the CSV from it",
        "table.csv": "the file is Parquet, not text: name it table.parquet",
        "packed.csv": "the file is gzip-compressed: name it packed.csv.gz",
        "packed.bz2.csv": "the file is bzip2-compressed: decompress it first (bzip2 -dc FILE)",
        "windows.csv": "the file is UTF-16 text (it starts with UTF-16's byte order mark)",
        "twice.csv.gz": "the file is gzip-compressed: decompress it first (gzip -dc FILE)",
    }
    (tmp_path / "table.csv.gz").write_bytes(gzip.compress((tmp_path / "table.csv").read_bytes()))
    cases["table.csv.gz"] = "the file is gzip-compressed Parquet, not text: decompress it first (gzip -dc FILE)"
    for command in (["ads", "load"], ["impressions", "load"], ["docs", "load"]):
        for name, says in cases.items():
            assert main([*command, str(tmp_path / name)]) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"precompute {command[0]}: {tmp_path / name}: {says}") and err.count("\n") == 1, err
    assert not (tmp_path / "never-started" / "redis").exists()  # nothing was started for a bad file


def test_a_text_file_that_starts_with_parquets_magic_bytes_is_read_as_text(tmp_path):
    """A headerless TSV whose first doc_id is PAR1001 was refused as Parquet ("name it docs.parquet"), advice that
    then failed too: Parquet has the magic bytes at both ends."""
    from precompute_assets.storage.ad_data import file_format
    from precompute_assets.storage.documents import check_document_file

    tsv = tmp_path / "docs.tsv"
    tsv.write_text("PAR1001\ta title\ta body\ten\n")
    assert check_document_file(tsv) == "tsv"
    csv = tmp_path / "ads.csv"
    csv.write_text("PAR1_score,ad_id\n1,a\n")
    assert file_format(csv) == "csv"


def test_docs_that_loaded_but_cannot_be_counted_exit_0_and_say_so(stack, app_db, tmp_path, monkeypatch, capsys):
    # The chunks committed: a database lost before the closing count must not report the load as failed.
    import psycopg2

    from precompute_assets.stack import ENV_APP_DB, ENV_DAGSTER_PG, ENV_REDIS
    from precompute_assets.storage.documents import DocumentStore

    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    for name in (ENV_REDIS, ENV_DAGSTER_PG):
        monkeypatch.setenv(name, stack.env()[name])
    monkeypatch.setenv(ENV_APP_DB, app_db)

    def lost(self, **kwargs):
        raise psycopg2.OperationalError("server closed the connection unexpectedly")

    count = DocumentStore.count
    monkeypatch.setattr(DocumentStore, "count", lost)
    assert main(["docs", "generate", "--n", "20"]) == 0
    out, err = capsys.readouterr()
    summary = json.loads(out)
    assert summary["inserted"] == 20 and summary["documents"] is None
    assert err.count("\n") == 1 and "loaded, but the count failed: OperationalError: server closed" in err
    assert count(DocumentStore(app_db)) == 20


def test_a_database_that_fails_mid_command_is_named(stack, app_db, tmp_path, monkeypatch, capsys):
    """A server that restarted mid-load printed psycopg2's message alone, naming no setting (h_prod2)."""
    import psycopg2

    from precompute_assets.stack import ENV_APP_DB, ENV_DAGSTER_PG, ENV_REDIS
    from precompute_assets.storage.campaigns import CampaignRegistry
    from precompute_assets.storage.documents import DocumentStore

    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    for name in (ENV_REDIS, ENV_DAGSTER_PG):
        monkeypatch.setenv(name, stack.env()[name])
    monkeypatch.setenv(ENV_APP_DB, app_db)

    def lost(self, *args, **kwargs):
        raise psycopg2.OperationalError("server closed the connection unexpectedly\n\tThis probably means ...")

    monkeypatch.setattr(DocumentStore, "load_frame", lost)
    monkeypatch.setattr(CampaignRegistry, "list", lost)
    for argv, command in ((["docs", "generate", "--n", "5"], "docs"), (["campaign", "list"], "campaign")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"precompute {command}: PRECOMPUTE_APP_DB_URL (") and err.count("\n") == 1, err
        assert "failed: server closed the connection unexpectedly" in err, err


def test_docs_delete_soft_deletes_what_the_next_sync_removes(stack, app_db, tmp_path, monkeypatch, capsys):
    """Loads only upsert, and the README promised that deleted documents leave Redis: the only delete was a SQL
    DELETE, which no sync sees, so their vectors were served for good (h_emb)."""
    from precompute_assets.stack import ENV_APP_DB, ENV_DAGSTER_PG, ENV_REDIS
    from precompute_assets.storage.documents import DocumentStore

    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    for name in (ENV_REDIS, ENV_DAGSTER_PG):
        monkeypatch.setenv(name, stack.env()[name])
    monkeypatch.setenv(ENV_APP_DB, app_db)
    monkeypatch.setenv(ENV_REDIS, "redis://127.0.0.1:1/0")  # the cache, down: documents are the database's (h_prod2)
    assert main(["docs", "generate", "--n", "5", "--start-id", "900000"]) == 0
    capsys.readouterr()
    listed = tmp_path / "ids.txt"
    listed.write_text("doc00900001\n\ndoc00900002\n")
    before = DocumentStore(app_db).count()
    assert main(["docs", "delete", "doc00900000", "doc00900000", "nope", "--file", str(listed)]) == 0
    assert json.loads(capsys.readouterr().out) == {"deleted": 3, "not_live": 1, "first_not_live": ["nope"]}
    assert DocumentStore(app_db).count() == before - 3
    # an id list saved with a byte order mark and CRLF line ends; ids as written, their blanks too, as loads keep them
    listed.write_bytes("\ufeffdoc00900003\r\ndoc00900004 \r\n".encode())
    assert main(["docs", "delete", "--file", str(listed)]) == 0
    assert json.loads(capsys.readouterr().out) == {"deleted": 1, "not_live": 1, "first_not_live": ["doc00900004 "]}
    assert main(["docs", "delete"]) == 2
    assert capsys.readouterr().err == (
        "precompute docs: name the documents to delete: doc ids, or --file with one id a line\n"
    )


def test_docs_load_maps_a_corpus_fields_and_refuses_a_field_it_lacks(stack, app_db, tmp_path, monkeypatch, capsys):
    import uuid

    import psycopg2

    from precompute_assets.stack import ENV_APP_DB, ENV_DAGSTER_PG, ENV_REDIS
    from precompute_assets.storage.documents import DocumentStore
    from precompute_assets.storage.postgres import libpq_url

    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    for name in (ENV_REDIS, ENV_DAGSTER_PG):
        monkeypatch.setenv(name, stack.env()[name])
    monkeypatch.setenv(ENV_APP_DB, app_db)
    ids = [f"beir-{uuid.uuid4().hex[:8]}-{i}" for i in range(3)]
    corpus = tmp_path / "corpus.jsonl"  # the BEIR layout: _id, title, text, no language
    corpus.write_text("".join(json.dumps({"_id": i, "title": "", "text": f"passage {i}"}) + "\n" for i in ids))
    DocumentStore(app_db).ensure_schema()
    before = DocumentStore(app_db).count()
    assert main(["docs", "load", str(corpus)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no doc_id field 'doc_id': the records have _id, title, text" in err, err
    assert "nothing was loaded (--id-field, --title-field" in err
    assert main(["docs", "load", str(corpus), "--id-field", "_id", "--body-field", "txt"]) == 2
    assert "no body field 'txt'" in capsys.readouterr().err
    assert DocumentStore(app_db).count() == before
    with corpus.open("a") as out:  # rejected lines: quarantined, and the summary says where
        out.write('{"title": "no id", "text": "t"}\n{"_id": "cut\n')
    assert main(["docs", "load", str(corpus), "--id-field", "_id", "--body-field", "text", "--language", "en"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["inserted"], summary["rejected"], summary["documents"]) == (3, 2, before + 3)
    assert (summary["quarantined"], summary["quarantine_table"]) == (2, "documents_quarantine")
    assert "line 4: missing doc_id" in summary["first_rejections"]
    with psycopg2.connect(libpq_url(app_db)) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT doc_id, title, body, language FROM documents WHERE doc_id = ANY(%s) ORDER BY doc_id", (ids,)
        )
        assert cur.fetchall() == [(i, "", f"passage {i}", "en") for i in sorted(ids)]
        cur.execute(
            "SELECT file, position, raw FROM documents_quarantine WHERE load_id = %s ORDER BY number",
            (summary["load_id"],),
        )
        assert cur.fetchall() == [
            (str(corpus), "line 4", '{"doc_id": null, "title": "no id", "body": "t", "language": null}'),
            (str(corpus), "line 5", '{"_id": "cut'),
        ]
    assert main(["docs", "quarantine", summary["load_id"]]) == 0  # the same rows, one JSON object a line
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(row["position"], row["raw"]) for row in listed] == [
        ("line 4", '{"doc_id": null, "title": "no id", "body": "t", "language": null}'),
        ("line 5", '{"_id": "cut'),
    ]
    assert listed[0]["reason"] == "missing doc_id" and listed[1]["reason"].startswith("malformed JSON: ")
    assert main(["docs", "quarantine", f" {summary['load_id']}\n"]) == 0  # pasted with the summary line's end
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert main(["docs", "quarantine", "20200101T000000Z-abcdef"]) == 0  # a load id, of no load or a clean one
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "load '20200101T000000Z-abcdef' quarantined no rows" in err
    assert main(["docs", "quarantine", "no-such-load"]) == 2  # no load has such an id: a typo, not "no rows"
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "'no-such-load' is not a load id" in err


def on_the_test_stack(stack, tmp_path, monkeypatch) -> None:
    """Commands of this test use the session's Redis and PostgreSQL (Dagster's storage and the application database:
    without the latter, every command started an embedded PostgreSQL in the test's home and left it running), with a
    Dagster home of their own."""
    from precompute_assets.stack import ENV_APP_DB, ENV_DAGSTER_PG, ENV_REDIS

    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    for name in (ENV_REDIS, ENV_DAGSTER_PG, ENV_APP_DB):
        monkeypatch.setenv(name, stack.env()[name])
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    (tmp_path / "dagster").mkdir()
    (tmp_path / "dagster" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")


@pytest.mark.parametrize("command", [["query-logs", "import"], ["impressions", "load"]])
def test_running_out_of_memory_at_size_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, command):
    # 10M requests under a 1.5 GB limit failed in numpy with "Unable to allocate ..." and a traceback, exit 1.
    from precompute_assets.storage import ad_data, query_log_import

    def out_of_memory(*args, **kwargs):
        raise MemoryError("Unable to allocate 74.5 MiB for an array with shape (9761716,) and data type int64")

    monkeypatch.setattr(query_log_import, "hour_rows", out_of_memory)
    monkeypatch.setattr(ad_data, "load_impressions", out_of_memory)
    path = tmp_path / "big.csv"
    path.write_text("ts_ms,ad_id,clicked\n1764000000000,a,1\n" if command[0] == "impressions" else "1764000000,a\n")
    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    assert main([*command, str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"precompute {command[0]}: out of memory (Unable to allocate"), err


def test_imports_of_two_kinds_into_one_hour_at_once_keep_both(stack, tmp_path, monkeypatch, capsys):
    """Two ``query-logs import`` of different kinds into the same hour at once: they take turns on the lake's lock
    file, so the hour holds both kinds side by side. Before, both found the hour empty and wrote their own rows: the
    later write dropped the other kind's, while both printed them as imported and recorded the hour in Dagster. Here
    both are held where they look for the hour until both have begun."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from precompute_assets.stack import ENV_LAKE
    from precompute_assets.storage.lake import Lake

    on_the_test_stack(stack, tmp_path, monkeypatch)
    logs = {}
    for kind, keys in (("ctr", ["ad1", "ad2"]), ("emb", ["doc1", "doc2", "doc3"])):
        logs[kind] = tmp_path / f"{kind}.csv"
        logs[kind].write_text("".join(f"{10 + i},{key}\n" for i, key in enumerate(keys)))
    both_looking = threading.Barrier(2, timeout=5)  # passes only if the two imports look at the hour at once
    exists = Lake.exists

    def held_exists(self, asset, partition=None):
        if asset == "query_logs":
            with contextlib.suppress(threading.BrokenBarrierError):  # taking turns: the other import never comes
                both_looking.wait()
        return exists(self, asset, partition)

    Stack().up()  # its ports chosen, as by an earlier command (two processes choose them safely, two threads not)
    with dagster_instance(Stack()):  # its storage created, likewise
        pass
    monkeypatch.setattr(Lake, "exists", held_exists)
    options = ["--start", "2026-02-10", "--time-unit", "s"]
    with ThreadPoolExecutor(2) as pool:
        argv = [["query-logs", "import", str(logs[kind]), "--kind", kind, *options] for kind in logs]
        codes = list(pool.map(main, argv))
    assert codes == [0, 0]
    hour = Lake(Stack().env()[ENV_LAKE]).read("query_logs", "2026-02-10-00:00")
    assert sorted(hour["key"]) == ["ad1", "ad2", "doc1", "doc2", "doc3"]
    assert "waiting for another import into this lake" in capsys.readouterr().err


def test_query_logs_import_outside_a_terminal_names_each_stage_from_the_first(stack, tmp_path, monkeypatch, capsys):
    """Only its loop over the hours said anything: reading and grouping a large log, most of its time, were silent
    (h_diff19)."""
    import precompute_assets.tools.cli as cli
    from precompute_assets.tools import progress

    on_the_test_stack(stack, tmp_path, monkeypatch)
    monkeypatch.setenv("PRECOMPUTE_REDIS_URL", "redis://127.0.0.1:1/0")  # down: an import needs no cache (h_prod2)
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.02)
    log = tmp_path / "history.csv"
    log.write_text("0.5,ad1\n10,ad2\n7300,ad3\n")
    real_read = cli.read_trace

    def slow_read(*args, **kwargs):  # a read long enough for a line
        time.sleep(0.2)
        return real_read(*args, **kwargs)

    monkeypatch.setattr(cli, "read_trace", slow_read)
    assert main(["query-logs", "import", str(log), "--start", "2026-02-03", "--time-unit", "s"]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith(f"reading {log}: in "), lines  # counted nothing yet: no count
    assert lines[-1].split(" in ")[0] == "writing the hours: 2 of 2 hours" and lines[-1].endswith(", done"), lines


def test_query_logs_import_fills_hourly_partitions_that_dagster_knows(stack, tmp_path, monkeypatch, capsys):
    import dagster as dg

    from precompute_assets.stack import ENV_LAKE
    from precompute_assets.storage.lake import Lake

    on_the_test_stack(stack, tmp_path, monkeypatch)
    relative = tmp_path / "history.csv"  # seconds from the trace's start: 3 requests in hour 0, 1 in hour 2
    relative.write_text("0.5,ad1\n10,ad2\n3599,ad1\n7300,ad3\n")
    assert main(["query-logs", "import", str(relative)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "count from the trace's start" in err and "--start YYYY-MM-DD" in err, err
    assert main(["query-logs", "import", str(relative), "--start", "2026-02-03", "--time-unit", "s"]) == 0
    assert Stack().postgres.pid is None  # the session's servers: none of the test home's own
    summary = json.loads(capsys.readouterr().out)
    assert (summary["imported"], summary["hours"], summary["quarantined"]) == (4, 2, 0)
    assert (summary["first_hour"], summary["last_hour"]) == ("2026-02-03-00:00", "2026-02-03-02:00")
    lake = Lake(Stack().env()[ENV_LAKE])
    assert list(lake.read("query_logs", "2026-02-03-00:00")["key"]) == ["ad1", "ad2", "ad1"]
    with dg.DagsterInstance.from_config(str(tmp_path / "dagster")) as instance:
        assert instance.get_materialized_partitions(dg.AssetKey("query_logs")) >= {
            "2026-02-03-00:00",
            "2026-02-03-02:00",
        }
    assert (
        main(["query-logs", "import", str(relative), "--start", "2026-02-03", "--time-unit", "s"]) == 0
    )  # again: the hours are kept
    out, err = capsys.readouterr()
    assert json.loads(out)["kept_hours"] == 2 and "--replace overwrites the imported ones" in err
    # Another kind goes into the same hours beside the first, in time order; --replace replaces only its own rows.
    other = tmp_path / "emb.csv"
    other.write_text("5,doc9\n")
    argv = ["query-logs", "import", str(other), "--kind", "emb", "--start", "2026-02-03", "--time-unit", "s"]
    summary = json.loads(capsys.readouterr().out) if main(argv) == 0 else None
    assert summary is not None and (summary["hours"], summary["imported"]) == (1, 1)
    hour = lake.read("query_logs", "2026-02-03-00:00")
    # --start puts each log's first request at midnight: a tie, where the rows already there come first
    assert hour[["kind", "key"]].values.tolist() == [["ctr", "ad1"], ["emb", "doc9"], ["ctr", "ad2"], ["ctr", "ad1"]]
    assert main(argv) == 0 and json.loads(capsys.readouterr().out)["kept_hours"] == 1  # again: kept, not doubled
    other.write_text("5,doc8\n")
    assert main([*argv, "--replace"]) == 0
    capsys.readouterr()
    hour = lake.read("query_logs", "2026-02-03-00:00")
    assert hour[["kind", "key"]].values.tolist() == [["ctr", "ad1"], ["emb", "doc8"], ["ctr", "ad2"], ["ctr", "ad1"]]
    now = time.time()
    epoch = tmp_path / "epoch.csv"  # one request in an hour that is over, three in the future: refused unless told
    epoch.write_text("".join(f"{now - 7200 + t:.0f},ad{i}\n" for i, t in enumerate((0, 9000, 9100, 9200))))
    assert main(["query-logs", "import", str(epoch)]) == 2
    assert "more than half of the 4 requests" in capsys.readouterr().err
    assert main(["query-logs", "import", str(epoch), "--allow-outside"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["imported"], summary["quarantined"]) == (1, 3)
    old_lake = tmp_path / "old_lake" / "query_logs"  # the README's example: --where filters, --kind only labels
    old_lake.mkdir(parents=True)
    ts = pd.to_datetime(["2026-02-05T01:00:00Z", "2026-02-05T01:01:00Z", "2026-02-05T01:02:00Z"], utc=True)
    pd.DataFrame({"ts": ts, "kind": ["ctr", "docs", "ctr"], "key": ["a", "b", "c"]}).to_parquet(old_lake / "h.parquet")
    assert main(["query-logs", "import", str(old_lake), "--format", "parquet", "--where", "kind=ctr"]) == 0
    assert json.loads(capsys.readouterr().out)["imported"] == 2
    assert list(lake.read("query_logs", "2026-02-05-01:00")["key"]) == ["a", "c"]
    keys_only = tmp_path / "keys.txt"
    keys_only.write_text("ad1\nad2\n")
    for argv, expected in [
        ([str(keys_only)], "the requests have no timestamps"),
        ([str(relative), "--start", "2026-02-30"], "--start 2026-02-30: day is out of range for month"),
        ([str(relative), "--kind", "CTR!"], "invalid --kind 'CTR!'"),
        ([str(relative), "--key-field", " "], "--key-field is empty"),
    ]:
        assert main(["query-logs", "import", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err and "Traceback" not in err, err


def test_query_logs_import_keeps_hours_the_client_logged_and_fills_hours_drained_empty(
    stack, tmp_path, monkeypatch, capsys
):
    """`--replace` over an hour drained from the stream replaced every kind's rows there with the import's, and the
    hour, still recorded as drained, was never drained again; an hour drained with no traffic (a deployment that
    imports its history after the schedule started) kept its 0 rows and refused the import."""
    from precompute_assets.stack import ENV_LAKE
    from precompute_assets.storage.lake import Lake

    on_the_test_stack(stack, tmp_path, monkeypatch)
    lake = Lake(Stack().env()[ENV_LAKE])
    history = tmp_path / "history.csv"  # one request in hour 0, one in hour 1
    history.write_text("10,ad1\n3700,ad2\n")
    argv = ["query-logs", "import", str(history), "--start", "2026-03-03", "--time-unit", "s"]
    assert main(argv) == 0  # the layout of an hour, then the same hours as the drain writes them
    capsys.readouterr()
    logged = lake.read("query_logs", "2026-03-03-00:00")
    logged = pd.concat([logged, logged], ignore_index=True).assign(kind=["ctr", "emb"], stream_id=["1-0", "2-0"])
    lake.write("query_logs", "2026-03-03-00:00", logged)
    lake.write("query_logs", "2026-03-03-01:00", logged.iloc[:0])
    assert main([*argv, "--replace"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["imported"] == 1 and json.loads(out)["kept_hours"] == 1, out
    assert "kept 1 hours the serving client logged (first 2026-03-03-00:00)" in err, err
    assert lake.read("query_logs", "2026-03-03-00:00")["stream_id"].tolist() == ["1-0", "2-0"]
    assert lake.read("query_logs", "2026-03-03-01:00")["key"].tolist() == ["ad2"]  # drained empty: filled


def test_query_logs_import_records_on_a_rerun_the_hours_a_failing_dagster_storage_missed(
    stack, tmp_path, monkeypatch, capsys
):
    import dagster as dg
    from dagster_postgres.utils import DagsterPostgresException

    on_the_test_stack(stack, tmp_path, monkeypatch)
    monkeypatch.setenv("PRECOMPUTE_TIMEZONE", "UTC")
    trace = tmp_path / "three_hours.csv"
    trace.write_text("0,ad1\n3600,ad2\n7200,ad3\n")
    argv = ["query-logs", "import", str(trace), "--start", "2026-03-04", "--time-unit", "s"]
    report = dg.DagsterInstance.report_runless_asset_event
    calls = []

    def fails_second(self, event):  # the storage goes away after the lake has written the second hour
        calls.append(event.partition)
        if len(calls) == 2:
            raise DagsterPostgresException("too many retries for DB connection")
        return report(self, event)

    monkeypatch.setattr(dg.DagsterInstance, "report_runless_asset_event", fails_second)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "recording hour 2026-03-04-01:00" in err and "too many retries" in err, err
    monkeypatch.setattr(dg.DagsterInstance, "report_runless_asset_event", report)
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["kept_hours"], summary["kept_hours_recorded"], summary["hours"]) == (2, 1, 1)
    with dg.DagsterInstance.from_config(str(tmp_path / "dagster")) as instance:
        assert instance.get_materialized_partitions(dg.AssetKey("query_logs")) == {
            "2026-03-04-00:00",
            "2026-03-04-01:00",
            "2026-03-04-02:00",
        }


def test_dagster_storage_errors_are_one_line_and_exit_2(monkeypatch, capsys):
    import sqlalchemy.exc
    from dagster_postgres.utils import DagsterPostgresException

    from precompute_assets.tools import cli

    for error in (
        DagsterPostgresException("too many retries for DB connection"),
        sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("server closed the connection\nunexpectedly")),
    ):

        def fails(args, error=error):
            raise error

        monkeypatch.setattr(cli, "cmd_env", fails)
        assert main(["env"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and type(error).__name__ in err and "Traceback" not in err, err


def test_query_logs_import_refuses_misplaced_timestamps_before_writing(tmp_path, monkeypatch, capsys):
    import datetime as dt

    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PRECOMPUTE_LAKE_URI", str(tmp_path / "lake"))
    monkeypatch.setenv("PRECOMPUTE_TIMEZONE", "UTC")
    trace = tmp_path / "trace.csv"  # milliseconds from the trace's start: 100 requests over one hour
    trace.write_text("".join(f"{i * 36_000},ad{i % 7}\n" for i in range(100)))
    two_days_ago = (dt.datetime.now(dt.UTC).date() - dt.timedelta(days=2)).isoformat()
    for argv, expected in [
        (["--start", two_days_ago], "need --time-unit (s, ms, us or ns)"),
        # read as seconds, the hour becomes 41 days, most of them not over yet
        (["--start", two_days_ago, "--time-unit", "s"], "more than half of the 100 requests would be quarantined"),
        (["--start", "2999-01-01", "--time-unit", "ms"], "every request would be quarantined (100 in an hour"),
    ]:
        assert main(["query-logs", "import", str(trace), *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err and "nothing was written" in err, err
        assert not (tmp_path / "lake").exists() and not (tmp_path / "home").exists()


def test_query_logs_import_refusal_names_a_timestamp_beyond_any_date(tmp_path, monkeypatch, capsys):
    """A log from before the partitions with one corrupt 1e26 among its timestamps: the refusal failed building its
    span, "OverflowError: timestamp out of range for platform time_t", not saying why nothing was written."""
    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PRECOMPUTE_LAKE_URI", str(tmp_path / "lake"))
    monkeypatch.setenv("PRECOMPUTE_TIMEZONE", "UTC")
    monkeypatch.setenv("PRECOMPUTE_PARTITIONS_START", "2026-01-01")
    log = tmp_path / "requests.csv"
    log.write_text("1700000000,ad0\n1700000060,ad1\n99999999999999999999999999,ad2\n1700000120,ad0\n")
    assert main(["query-logs", "import", str(log)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "every request would be quarantined" in err, err
    assert "placed from 2023-11-14 22:13 to after the year 9999 UTC" in err and "nothing was written" in err, err
    assert not (tmp_path / "lake").exists()


def test_query_logs_import_finds_the_logs_time_unit_once(tmp_path, monkeypatch, capsys):
    """The median of every timestamp that tells the log's unit is taken once: epoch_seconds and other_unit both
    read the log in it (other_unit found it again)."""
    from precompute_assets.storage import query_log_import

    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PRECOMPUTE_LAKE_URI", str(tmp_path / "lake"))
    monkeypatch.setenv("PRECOMPUTE_TIMEZONE", "UTC")
    trace = tmp_path / "trace.csv"  # epoch milliseconds in 2190: every hour still to come, refused before writing
    trace.write_text("".join(f"{7_000_000_000_000 + i * 36_000},ad{i % 7}\n" for i in range(100)))
    found: list[str] = []
    find = query_log_import.time_unit
    monkeypatch.setattr(query_log_import, "time_unit", lambda values: found.append(find(values)) or found[-1])
    assert main(["query-logs", "import", str(trace)]) == 2
    assert "every request would be quarantined" in capsys.readouterr().err and found == ["ms"]


def test_query_logs_import_start_moves_the_first_valid_request_to_midnight(stack, tmp_path, monkeypatch, capsys):
    """--start aligned the earliest timestamp, a corrupt row's 0 among epoch seconds included: every real request
    moved 56 years on, into hours not yet over, and the import was refused. The first valid one is aligned now."""
    from precompute_assets.stack import ENV_LAKE
    from precompute_assets.storage.lake import Lake
    from precompute_assets.storage.query_log_import import first_valid_second

    on_the_test_stack(stack, tmp_path, monkeypatch)
    log = tmp_path / "requests.csv"
    first = 1_590_969_600  # 2020-06-01, epoch seconds
    log.write_text(f"{first + 5},ad1\n0,ad9\n{first + 600},ad2\n{first + 1200},ad1\n")
    # a day of its own: the test stack's lake is shared with the other import tests
    assert main(["query-logs", "import", str(log), "--start", "2026-03-19", "--time-unit", "s"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["imported"], summary["quarantined"]) == (3, 1)
    hour = Lake(Stack().env()[ENV_LAKE]).read("query_logs", "2026-03-19-00:00")
    assert list(hour["key"]) == ["ad1", "ad2", "ad1"]
    assert hour["ts"].iloc[0] == pd.Timestamp("2026-03-19", tz="UTC")
    relative = np.array([-5.0, np.nan, 3.0, np.inf, 10.0])  # counted from the trace's start: -5 is corrupt too
    assert first_valid_second(relative) == 3.0 and first_valid_second(np.array([np.nan, -np.inf])) is None


def test_query_logs_import_start_quarantines_a_negative_relative_timestamp(stack, tmp_path, monkeypatch, capsys):
    """A relative trace's -5 was not aligned on, but imported: placed 5 s before its first valid request, in the
    day before --start (a request of 23:59 there), and counted in span_hours. It is quarantined, as -5 is at
    epoch time."""
    from precompute_assets.stack import ENV_LAKE
    from precompute_assets.storage.lake import Lake

    on_the_test_stack(stack, tmp_path, monkeypatch)
    log = tmp_path / "requests.csv"
    log.write_text("-5,ad9\n0,ad1\n600,ad2\n")
    # a day of its own: the test stack's lake is shared with the other import tests
    assert main(["query-logs", "import", str(log), "--start", "2026-03-23", "--time-unit", "s"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["imported"], summary["quarantined"], summary["first_hour"]) == (2, 1, "2026-03-23-00:00")
    assert summary["quarantine_reasons"] == {"before the trace's start (a negative relative timestamp)": 1}
    assert summary["span_hours"] == 0.17
    lake = Lake(Stack().env()[ENV_LAKE])
    assert not lake.exists("query_logs", "2026-03-22-23:00")
    assert list(lake.read("query_logs", "2026-03-23-00:00")["key"]) == ["ad1", "ad2"]


def test_query_logs_import_quarantines_malformed_lines_and_counts_them(stack, tmp_path, monkeypatch, capsys):
    """One bad line (a cut-off last line, a blank line, a non-numeric timestamp, a missing field) refused the whole
    request log: it is now cut out, counted and named, and the rest imported."""
    from precompute_assets.stack import ENV_LAKE
    from precompute_assets.storage.lake import Lake

    on_the_test_stack(stack, tmp_path, monkeypatch)
    log = tmp_path / "requests.csv"
    log.write_text("ts,key,size\n0.5,ad1,10\n10,ad2,10\nxx,ad3,10\n\n20,ad4\n3599,ad1,10\n7300,ad3,10\n73")
    # a day of its own: the test stack's lake is shared with the other import tests
    argv = ["query-logs", "import", str(log), "--start", "2026-03-07", "--time-unit", "s"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    summary = json.loads(out)
    assert (summary["imported"], summary["quarantined"], summary["quarantine_reasons"]) == (4, 4, {"malformed line": 4})
    assert [entry["line"] for entry in summary["malformed_lines"]] == [4, 5, 6, 9]  # as numbered in the file
    assert "not numeric" in summary["malformed_lines"][0]["problem"]
    assert err.count("\n") == 1 and "quarantined 4 malformed lines (first: line 4: timestamp 'xx'" in err, err
    lake = Lake(Stack().env()[ENV_LAKE])
    assert list(lake.read("query_logs", "2026-03-07-00:00")["key"]) == ["ad1", "ad2", "ad1"]
    # A Parquet log's bad row is named by its file and row once: "line 2: row 2: ..." said it twice
    rows = tmp_path / "requests.parquet"
    pq.write_table(pa.table({"ts": [0.5, 10.0, 20.0], "key": ["ad1", None, "ad2"]}), rows)
    assert main(["query-logs", "import", str(rows), "--start", "2026-03-08", "--time-unit", "s"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["malformed_lines"] == [{"line": 2, "problem": "row 2: the key is missing"}]
    assert "(first: row 2: the key is missing)" in err, err


def test_query_logs_import_reads_redis_monitor_output_and_counts_the_commands_naming_no_key(
    stack, tmp_path, monkeypatch, capsys
):
    """``redis-cli monitor > log`` imports as the requests of its keys; PING and AUTH are counted, never echoed."""
    from precompute_assets.stack import ENV_LAKE
    from precompute_assets.storage.lake import Lake

    on_the_test_stack(stack, tmp_path, monkeypatch)
    log = tmp_path / "monitor.log"
    lines = ["OK", '1764000000.5 [0 127.0.0.1:1] "AUTH" "hunter2"', '1764000001.25 [0 127.0.0.1:1] "GET" "ad:007"']
    lines += ['1764000002.0 [0 127.0.0.1:1] "PING"', '1764000003.0 [0 127.0.0.1:1] "MGET" "ad:1" "ad:007"']
    log.write_text("\n".join(lines) + "\n")
    assert main(["query-logs", "import", str(log), "--start", "2026-04-14"]) == 0
    out, err = capsys.readouterr()
    summary = json.loads(out)
    assert summary["imported"] == 3 and summary["skipped_commands"] == {"AUTH": 1, "PING": 1}
    assert summary["quarantined"] == 0 and "hunter2" not in out + err
    lake = Lake(Stack().env()[ENV_LAKE])
    assert list(lake.read("query_logs", "2026-04-14-00:00")["key"]) == ["ad:007", "ad:1", "ad:007"]


def test_query_logs_import_keeps_zero_padded_ids_as_written(stack, tmp_path, monkeypatch, capsys):
    """Ids of one width (``007``, ``+12``) were read as the integers they spell, as the replay reads them, and written
    to the lake as ``7`` and ``12``: keys no client asks for, so the day's top_ads and predictions missed them."""
    from precompute_assets.stack import ENV_LAKE
    from precompute_assets.storage.lake import Lake

    on_the_test_stack(stack, tmp_path, monkeypatch)
    for name, keys in (("padded.csv", ["007", "008", "010", "007"]), ("signed.csv", ["+12", "+13"])):
        log = tmp_path / name
        log.write_text("".join(f"{10 + i},{key}\n" for i, key in enumerate(keys)))
        kind = name.partition(".")[0]  # a kind of its own: the test stack's lake is shared with the other imports
        argv = ["query-logs", "import", str(log), "--kind", kind, "--start", "2026-03-09", "--time-unit", "s"]
        assert main(argv) == 0
        capsys.readouterr()
        hour = Lake(Stack().env()[ENV_LAKE]).read("query_logs", "2026-03-09-00:00")
        assert hour.loc[hour["kind"] == kind, "key"].tolist() == keys


def test_query_logs_import_takes_the_quotes_of_a_csv_writer_off_its_keys(stack, tmp_path, monkeypatch, capsys):
    """A request log written by a CSV writer (pandas, csv.QUOTE_ALL) had its quotes imported as part of the keys:
    c"d became "c""d" in the lake; a QUOTE_ALL log was refused (no timestamps)."""
    from precompute_assets.stack import ENV_LAKE
    from precompute_assets.storage.lake import Lake

    on_the_test_stack(stack, tmp_path, monkeypatch)
    for kind, text in (("minimal", 'ts,key\n10,"c""d"\n11,plain\n'), ("every", '"10","c""d"\n"11","plain"\n')):
        log = tmp_path / f"{kind}.csv"
        log.write_text(text)
        argv = ["query-logs", "import", str(log), "--kind", kind, "--start", "2026-03-11", "--time-unit", "s"]
        assert main(argv) == 0
        capsys.readouterr()
        hour = Lake(Stack().env()[ENV_LAKE]).read("query_logs", "2026-03-11-00:00")
        assert hour.loc[hour["kind"] == kind, "key"].tolist() == ['c"d', "plain"]


def test_query_logs_import_keeps_uint64_parquet_ids(stack, tmp_path, monkeypatch, capsys):
    """A Parquet request log's uint64 ids of 2^63 and above were read as the negative int64 of their bits, as the
    replay reads them, and written to the lake so: 18446744073709551615 became -1."""
    from precompute_assets.stack import ENV_LAKE
    from precompute_assets.storage.lake import Lake

    on_the_test_stack(stack, tmp_path, monkeypatch)
    ids = [2**64 - 1, 2**63, 7]
    ts = pd.to_datetime(["2026-03-10T01:00:00Z", "2026-03-10T01:01:00Z", "2026-03-10T01:02:00Z"], utc=True)
    pd.DataFrame({"ts": ts, "key": np.array(ids, dtype=np.uint64)}).to_parquet(tmp_path / "requests.parquet")
    assert main(["query-logs", "import", str(tmp_path / "requests.parquet"), "--kind", "unsigned"]) == 0
    capsys.readouterr()
    assert list(Lake(Stack().env()[ENV_LAKE]).read("query_logs", "2026-03-10-01:00")["key"]) == [str(i) for i in ids]


def test_query_logs_import_span_leaves_out_the_corrupt_timestamps_it_quarantined(stack, tmp_path, monkeypatch, capsys):
    """`span_hours` shows how the timestamps were understood; a corrupt 1e300 among epoch milliseconds was quarantined
    and yet made it 2.8e293 hours, hiding the real hour."""
    import datetime as dt

    on_the_test_stack(stack, tmp_path, monkeypatch)
    start_ms = int(dt.datetime(2026, 3, 11, tzinfo=dt.UTC).timestamp() * 1000)  # a day of its own on the test stack
    lines = [f"{start_ms + i * 360_000},ad{i % 3}" for i in range(11)]  # one hour, every 6 minutes
    log = tmp_path / "requests.csv"
    log.write_text("\n".join([*lines[:5], "1e300,ad7", "-5,ad8", *lines[5:]]) + "\n")
    assert main(["query-logs", "import", str(log)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["imported"], summary["quarantined"]) == (11, 2)
    assert summary["span_hours"] == 1.0


def test_query_logs_import_quarantines_timestamps_in_another_unit_as_such(stack, tmp_path, monkeypatch, capsys):
    """A log whose logger moved from seconds to milliseconds: the requests in milliseconds were quarantined as "in an
    hour that is not over"; told the unit, the import reads every timestamp in it, as before."""
    import datetime as dt

    on_the_test_stack(stack, tmp_path, monkeypatch)
    start_s = int(dt.datetime(2026, 3, 26, tzinfo=dt.UTC).timestamp())  # a day of its own on the test stack
    log = tmp_path / "requests.csv"
    log.write_text("".join(f"{start_s + 60 * i},ad{i}\n" for i in range(8)) + f"{(start_s + 600) * 1000},ad8\n")
    assert main(["query-logs", "import", str(log), "--kind", "units"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["imported"], summary["quarantined"], summary["span_hours"]) == (8, 1, 0.12)
    assert summary["quarantine_reasons"] == {"timestamp in another unit than the log's (by its size)": 1}
    assert main(["query-logs", "import", str(log), "--kind", "units", "--time-unit", "s", "--replace"]) == 0
    assert json.loads(capsys.readouterr().out)["quarantine_reasons"] == {"in an hour that is not over": 1}


def test_query_logs_import_refuses_a_time_unit_for_date_times(tmp_path, monkeypatch, capsys):
    """--time-unit ms scaled ISO 8601 date-times, already seconds, by 1/1000: with --start, four days of requests were
    imported into the first six minutes of the day, without a word."""
    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PRECOMPUTE_LAKE_URI", str(tmp_path / "lake"))
    log = tmp_path / "requests.csv"
    log.write_text("".join(f"2026-03-0{1 + day}T08:00:00Z,ad{day}\n" for day in range(4)))
    parquet = tmp_path / "requests.parquet"
    stamps = pa.array([1_772_352_000_000 + day * 86_400_000 for day in range(4)], pa.timestamp("ms", tz="UTC"))
    pq.write_table(pa.table({"ts": stamps, "key": ["a", "b", "c", "d"]}), parquet)
    for path in (log, parquet):
        assert main(["query-logs", "import", str(path), "--start", "2026-03-27", "--time-unit", "ms"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--time-unit ms reads numeric timestamps, and these are date-times" in err, err
    assert not (tmp_path / "lake").exists()


def test_query_logs_import_of_a_file_of_mostly_bad_lines_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PRECOMPUTE_LAKE_URI", str(tmp_path / "lake"))
    log = tmp_path / "requests.csv"  # a bare key per line after one timestamped line: the wrong format, not bad rows
    log.write_text("1700000000,ad0\n" + "".join(f"ad{i}\n" for i in range(300)))
    assert main(["query-logs", "import", str(log)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "after 100 malformed lines were cut (at most 100)" in err, err
    assert not (tmp_path / "lake").exists()


def test_query_logs_import_names_windows_file_times_and_reads_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PRECOMPUTE_LAKE_URI", str(tmp_path / "lake"))
    monkeypatch.setenv("PRECOMPUTE_TIMEZONE", "UTC")
    trace = tmp_path / "msr.csv"  # MSR Cambridge's layout: 100 ns ticks since 1601, 2 days from 2007-02-22
    trace.write_text(
        "".join(f"{128166372000000000 + i * 17_280_000_000},hm,0,Read,{i % 7},4096,10\n" for i in range(100))
    )
    for argv in ([], ["--start", "2026-02-03"]):
        assert main(["query-logs", "import", str(trace), "--key-field", "5", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "give --time-unit filetime" in err, err
    seen = {}

    def placed(args, rows, *_) -> None:  # stop before the stack is needed
        seen["rows"] = rows
        raise CliError("placed")

    monkeypatch.setattr("precompute_assets.tools.cli.check_placement", placed)
    argv = ["query-logs", "import", str(trace), "--key-field", "5", "--start", "2026-02-03", "--time-unit", "filetime"]
    assert main(argv) == 2 and "placed" in capsys.readouterr().err
    hours = sorted(seen["rows"].frames)  # two days, not the 2 hours that ns (or 20 days that us) would make of them
    assert (hours[0], hours[-1], len(hours)) == ("2026-02-03-00:00", "2026-02-04-23:00", 48)


def test_a_failing_replay_stops_its_processes_instead_of_waiting_for_them():
    import signal
    import time
    from concurrent.futures import CancelledError
    from concurrent.futures.process import BrokenProcessPool
    from multiprocessing.connection import wait

    from precompute_assets.tools.cli import _replay_pool

    # As in a shell's background job once Dagster mapped SIGTERM to an ignored SIGINT: workers inherit the SIG_IGN.
    ignoring = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with pytest.raises(RuntimeError, match="a stage failed"), _replay_pool(True) as pool:
            running = [pool.submit(time.sleep, 600) for _ in range(pool._max_workers)]
            queued = [pool.submit(time.sleep, 600) for _ in range(3)]
            while not all(job.running() for job in running):
                time.sleep(0.05)
            processes = list(pool._processes.values())
            raise RuntimeError("a stage failed")
    finally:
        signal.signal(signal.SIGTERM, ignoring)
    # Dropped, or (already handed to a worker) ended with the pool: none sleeps on (a timeout fails the test).
    for job in queued:
        with pytest.raises((CancelledError, BrokenProcessPool)):
            job.result(timeout=30)
    for process in processes:  # its sentinel is ready once it ended, whichever thread reaps it
        assert wait([process.sentinel], timeout=30), "a worker was left to sleep out its job"
    with _replay_pool(False) as none:
        assert none is None


def test_ctrl_c_is_one_line_and_exit_130_not_a_traceback(tmp_path, monkeypatch, capsys):
    """Ctrl-C during a long replay or load printed KeyboardInterrupt's traceback from wherever it happened to be."""
    import precompute_assets.tools.cli as cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "read_trace", interrupted)
    trace = tmp_path / "trace.txt"
    trace.write_text("a\nb\n")
    argv = ["replay", "--trace", str(trace), "--days", "2", "--top-n", "1", "--capacity", "2"]
    assert main(argv) == 130
    assert capsys.readouterr().err == "precompute replay: interrupted\n"
    monkeypatch.setenv("PRECOMPUTE_TRACEBACK", "1")  # where it was, for whoever needs it
    with pytest.raises(KeyboardInterrupt):
        main(argv)


def test_ctrl_c_in_a_run_in_process_is_an_interruption_too(monkeypatch, capsys):
    """A Dagster run in process (the demo, the graph benchmark) turns SIGINT into its own error, which printed a
    60-line traceback and exit 1."""
    from dagster._core.errors import DagsterExecutionInterruptedError

    import precompute_assets.tools.cli as cli

    def interrupted(*args, **kwargs):
        raise DagsterExecutionInterruptedError("Execution was interrupted unexpectedly.")

    monkeypatch.setattr(cli, "cmd_demo", interrupted)
    assert main(["demo"]) == 130
    assert capsys.readouterr().err == "precompute demo: interrupted\n"


def test_down_on_a_home_that_does_not_exist_makes_nothing(tmp_path, monkeypatch, capsys):
    """`down` on a mistyped PRECOMPUTE_HOME made it (secret, ports, lock) and said the services were stopped, while
    the real ones ran on."""
    home = tmp_path / "typo"
    monkeypatch.setenv("PRECOMPUTE_HOME", str(home))
    for purge in ([], ["--purge"]):
        assert main(["down", *purge]) == 0
        assert f"nothing to stop: {home} holds no embedded services" in capsys.readouterr().out
    assert not home.exists()


def test_demo_and_dev_refuse_what_would_fail_later(monkeypatch, capsys):
    """`demo --days 1` reset Redis and the lake, then failed 80 s on in the CTR model's time split; a second `dev` on a
    taken port ran a hidden daemon beside the first one's."""
    import socket

    assert main(["demo", "--days", "1"]) == 2
    err = capsys.readouterr().err
    assert "--days 1: the demo needs at least 2 days" in err and err.count("\n") == 1
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["dev", "--port", str(taken.getsockname()[1])]) == 2
    err = capsys.readouterr().err
    assert "cannot serve the UI on 127.0.0.1:" in err and "another `precompute dev`?" in err and err.count("\n") == 1
    assert main(["dev", "--host", "192.0.2.1"]) == 2  # not this machine's address: no other `dev` is to blame (h_ops)
    err = capsys.readouterr().err
    assert "cannot serve the UI on 192.0.2.1:" in err and "(check --host)" in err and "another" not in err


def test_replay_workers_leave_ctrl_c_to_the_command():
    """A terminal's Ctrl-C reaches the replay's worker processes too: each printed a KeyboardInterrupt traceback under
    the command's one line. They ignore it; the command stops them (test_a_failing_replay_stops_its_processes...)."""
    import signal

    from precompute_assets.tools.cli import _replay_pool

    with _replay_pool(True) as pool:
        assert pool.submit(signal.getsignal, signal.SIGINT).result(timeout=120) == signal.SIG_IGN
    with _replay_pool(True) as pool:  # a Ctrl-C while a worker still starts: it went on to print its traceback
        job = pool.submit(sum, [1, 2])
        for process in list(pool._processes.values()):
            os.kill(process.pid, signal.SIGINT)
        assert job.result(timeout=120) == 3  # the worker went on: no traceback, and no broken pool
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the command's own Ctrl-C is as it was


def test_no_help_text_shows_docstring_markup():
    """`precompute --help` opened with the module docstring's reStructuredText: 'The ``precompute`` command'."""
    parser = build_parser()
    (commands,) = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    parsers = [parser, *commands.choices.values()]
    for sub in list(parsers):
        parsers += [p for a in sub._actions if isinstance(a, argparse._SubParsersAction) for p in a.choices.values()]
    helps = {p.prog: p.format_help() for p in parsers}
    assert len(helps) > 20 and helps["precompute"].count("precompute command") == 1
    assert [prog for prog, text in helps.items() if "``" in text] == []


HEAVY_MODULES = ("dagster", "torch", "sklearn", "pandas")


@pytest.mark.parametrize(
    "argv, code, light",
    [
        (["--help"], 0, (*HEAVY_MODULES, "numpy")),
        (["ads", "load", "{tmp}/ads.txt"], 2, ("dagster", "torch", "sklearn")),
        (["impressions", "load", "{tmp}/impressions.txt"], 2, ("dagster", "torch", "sklearn")),
        (["query-logs", "import", "{tmp}/missing.csv"], 2, ("dagster", "torch", "sklearn")),
        (["status"], 2, (*HEAVY_MODULES, "numpy")),  # PRECOMPUTE_HOME is a file: an OSError, through main's handler
    ],
)
def test_commands_import_only_what_they_need(tmp_path, argv, code, light):
    """Importing Dagster costs about a second: `ads load`, `impressions load` and `query-logs import` imported it
    before they looked at their file, and every command that failed on an OSError imported it to name its errors."""
    import subprocess
    import sys

    (tmp_path / "home").write_text("")
    script = (
        "import sys\nfrom precompute_assets.tools.cli import main\n"
        f"try:\n    code = main({[arg.format(tmp=tmp_path) for arg in argv]!r})\n"
        "except SystemExit as exit:\n    code = exit.code\n"
        f"print(code, [name for name in {light!r} if name in sys.modules])"
    )
    env = {**os.environ, "PRECOMPUTE_HOME": str(tmp_path / "home")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.stdout.splitlines()[-1] == f"{code} []", out.stdout[-2000:] + out.stderr[-2000:]


def _options(parser: argparse.ArgumentParser, command: tuple[str, ...] = ()):
    """(command, option, help) of every option of ``parser`` and of its subcommands'."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, (*command, name))
        elif action.option_strings and action.dest != "help":
            yield " ".join(command), action.option_strings[-1], action.help


def test_every_option_says_in_help_what_it_does():
    """`cache invalidate --help` showed a bare `--namespace NAMESPACE` (the README's "default pc" nowhere), `--kind`,
    `bench --lookups` and others said nothing, and `redis acl --apply` ended mid-sentence ("as a user allowed to")."""
    bare = [f"{command} {option}" for command, option, text in _options(build_parser()) if not text]
    assert bare == []
    helps = {(command, option): text for command, option, text in _options(build_parser())}
    for command in ("cache invalidate", "cache stats", "redis acl"):
        assert "default pc" in helps[command, "--namespace"]
    assert not helps["redis acl", "--apply"].rstrip(" )").endswith(" to")


def test_status_says_which_published_version_redis_lost(tmp_path, monkeypatch, capsys, redis_server, dagster_pg_url,
                                                        app_db_url):  # fmt: skip
    """After Redis restarted without its data, status showed the servers and automation as healthy: nothing said that
    the versions Dagster recorded as published were gone (only `cache stats` showed no version)."""
    import dagster as dg

    from precompute_assets.serving import KeySchema, Pointer, connect
    from precompute_assets.storage.postgres import scratch_database

    server = redis_server()
    home = production_home(tmp_path, monkeypatch, server.url, app_db_url)
    shutil.copy(Path(__file__).resolve().parents[2] / "dagster.yaml", home / "dagster.yaml")
    client, schema = connect(server.url, socket_timeout=5), KeySchema()
    with scratch_database(dagster_pg_url, "dagster") as url:
        monkeypatch.setenv("DAGSTER_PG_URL", url)
        assert main(["status"]) == 0
        assert "lost" not in capsys.readouterr().out  # nothing published yet: nothing to lose
        with dagster_instance(Stack()) as instance:
            published = {"published": True, "version": "2026-12-04.0123456789abcdef", "model_version": "m1"}
            instance.report_runless_asset_event(
                dg.AssetMaterialization("ctr_cache", partition="2026-12-04", metadata=published)
            )
            instance.report_runless_asset_event(
                dg.AssetMaterialization("document_embeddings", metadata={"redis_version": "emb1.abcd"})
            )
        client.set(schema.pointer("ctr"), Pointer("2026-12-04.0123456789abcdef", 1).encode())
        client.hset(schema.bucket("ctr", "2026-12-04.0123456789abcdef", 0), "ad1", b"\x00\x00\x00\x3f")
        client.set(schema.pointer("doc_embedding"), Pointer("emb1.abcd", 1).encode())
        client.set(schema.bucket("doc_embedding", "emb1.abcd", "meta"), "synced int8")
        assert main(["status"]) == 0
        assert "lost" not in capsys.readouterr().out
        client.delete(schema.bucket("ctr", "2026-12-04.0123456789abcdef", 0))  # expired under its pointer
        assert main(["status"]) == 0
        lost = [line for line in capsys.readouterr().out.splitlines() if line.startswith("redis     lost")]
        assert lost == [
            "redis     lost      ctr: Redis's ctr pointer names version 2026-12-04.0123456789abcdef, whose values are "
            "gone (1 of 1 buckets looked at are missing: expired or evicted), although ctr_cache recorded "
            "publishing version 2026-12-04.0123456789abcdef"
        ], lost
        client.flushall()  # a restart without persistence
        assert main(["status"]) == 0
        lost = [line for line in capsys.readouterr().out.splitlines() if line.startswith("redis     lost")]
        assert lost == [
            "redis     lost      ctr: Redis holds no ctr version, although ctr_cache recorded publishing version "
            "2026-12-04.0123456789abcdef",
            "redis     lost      doc_embedding: Redis holds no embedding version, although document_embeddings "
            "recorded publishing version emb1.abcd",
        ], lost
    client.close()
