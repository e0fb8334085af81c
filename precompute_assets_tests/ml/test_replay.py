"""Trace parsing, day splitting, the replayed hit rates, both offline bounds checked by brute force, and the CLI."""

from __future__ import annotations

import codecs
import itertools
import json
import lzma
import os
import shutil
import subprocess
import sys
from collections import OrderedDict
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from precompute_assets.ml.replay import (
    NAMED,
    ORACLE_GENERAL,
    ShareChoice,
    Trace,
    TraceError,
    _admitted_lru_day_hits,
    _as_codes,
    _candidate_day_hits,
    _live_tier,
    _lru_day_hits,
    _ranked_keys,
    admission_decisions,
    arc_hits,
    belady_hits,
    iso_seconds,
    next_requests,
    oracle_preload_day_hits,
    parse_trace,
    replay,
    s3fifo_hits,
    sample_trace,
    sampled_size,
    shards_adjusted,
    share_candidates,
    split_days,
    trace_notes,
    tune_share,
)
from precompute_assets.ml.selection import DEMAND_WINDOW_DAYS, ad_demand, coverage, daily_counts, select_top
from precompute_assets.tools.cli import main

READ_THROUGH = ("hit_rate_lru", "hit_rate_s3fifo", "hit_rate_arc")
POLICIES = (*READ_THROUGH, "hit_rate_static_top_n", "hit_rate_ours")
RATES = (*POLICIES, "hit_rate_belady", "hit_rate_oracle_preload")


def write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "trace.txt"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def days_of(*days: list[int]) -> list[np.ndarray]:
    return [np.array(day, dtype=np.int64) for day in days]


def hits(result: dict, rate: str) -> int:
    return round(result[rate] * result["requests"])


# --- parsing ---------------------------------------------------------------------------------------------


def test_parse_bare_keys(tmp_path: Path):
    trace = parse_trace(write(tmp_path, "5\n3\n-2\n+7\n5\n"))
    assert trace.keys.dtype == np.int64
    assert trace.keys.tolist() == [5, 3, -2, 7, 5]
    assert trace.timestamps is None
    assert parse_trace(write(tmp_path, "1\n2")).keys.tolist() == [1, 2]  # no final newline


def test_parse_csv_seconds_and_milliseconds(tmp_path: Path):
    trace = parse_trace(write(tmp_path, "1700000000.5,10\n1700000001,11\n1.7e9,12\n"))
    assert trace.keys.tolist() == [10, 11, 12]
    assert trace.timestamps.tolist() == [1700000000.5, 1700000001.0, 1.7e9]
    ms = parse_trace(write(tmp_path, "1700000000123,4\r\n1700000000999, 5 \r\n"))
    assert ms.timestamps.tolist() == [1700000000123.0, 1700000000999.0]
    assert ms.keys.tolist() == [4, 5]


def test_parse_string_keys_verbatim(tmp_path: Path):
    text = 'ad:42\n  user-7/home.json\t\nx_y.z\n#tag\n"quoted"\nnan\n2.5\n7\nabc,def\n\u00e9t\u00e9\n'
    trace = parse_trace(write(tmp_path, text))
    assert trace.keys.dtype == object
    # Once one key is not an integer, every key is the string it is ("7" too): keys are compared as written.
    assert trace.keys.tolist() == [
        "ad:42", "user-7/home.json", "x_y.z", "#tag", '"quoted"', "nan", "2.5", "7", "abc,def", "\u00e9t\u00e9"
    ]  # fmt: skip
    assert trace.timestamps is None


def test_parse_csv_with_string_keys(tmp_path: Path):
    trace = parse_trace(write(tmp_path, '1700000000,ad:1\n1700000000.25, user/7 \r\n1.7e9,"q"\n5,12\n'))
    assert trace.keys.tolist() == ["ad:1", "user/7", '"q"', "12"]
    assert trace.timestamps.tolist() == [1700000000.0, 1700000000.25, 1.7e9, 5.0]


def test_timestamps_may_be_iso_8601_date_times(tmp_path: Path):
    # A "T" or a space before the time, fractions of a second, an offset (none: UTC), or a date alone; padded too.
    text = "ts,key,size\n2026-01-01T00:00:00Z,a,1\n2026-01-01 01:00:00.5+01:00,b,1\n 2026-01-02 ,a,1\n"
    trace = parse_trace(write(tmp_path, text))
    one_day = 86_400.0
    start = (pd.Timestamp("2026-01-01", tz="UTC") - pd.Timestamp(0, tz="UTC")).total_seconds()
    assert trace.keys.tolist() == ["a", "b", "a"]
    assert trace.timestamps.tolist() == [start, start + 0.5, start + one_day] and trace.header == ("ts", "key", "size")
    # No header, integer keys, and fields separated by blanks: the same times.
    assert parse_trace(write(tmp_path, "2026-01-01,7\n2026-01-02T00:00,8\n")).timestamps.tolist() == [
        start,
        start + one_day,
    ]
    # Years beyond datetime64[ns] (1677..2262) are still seconds.
    far = parse_trace(write(tmp_path, "0001-01-01T00:00:00Z,a\n2500-01-01,b\n")).timestamps.tolist()
    assert far == [-62_135_596_800.0, 16_725_225_600.0]
    blanks = parse_trace(write(tmp_path, "2026-01-01T00:00:00Z 7 10\n2026-01-02T00:00:00Z 8 10\n"))
    assert blanks.keys.tolist() == [7, 8] and blanks.timestamps.tolist() == [start, start + one_day]
    # The same requests with date-times or with seconds split into the same days.
    seconds = "\n".join(f"{start + h * 3600:.0f},k{h % 5}" for h in range(96))
    dated = "\n".join(f"{pd.Timestamp(start + h * 3600, unit='s'):%Y-%m-%dT%H:%M:%S},k{h % 5}" for h in range(96))
    a, b = (split_days(parse_trace(write(tmp_path, text)), 4) for text in (seconds, dated))
    assert [day.tolist() for day in a] == [day.tolist() for day in b]


def test_a_header_line_names_the_fields_whatever_the_first_field_holds(tmp_path: Path):
    # Before, a header over lines that do not start with a number was read as one more bare key.
    with pytest.raises(TraceError, match="^line 2: timestamp 'k1' is not numeric"):
        parse_trace(write(tmp_path, "name,hour\nk1,5\nk2,6\n"))  # names of neither: timestamp,key
    for columns in (("time", "key"), None):  # named, or known by the header's names
        swapped = parse_trace(write(tmp_path, "key,time\nk1,5\nk2,6\n"), columns=columns)
        assert swapped.keys.tolist() == ["k1", "k2"] and swapped.timestamps.tolist() == [5.0, 6.0]
    # A first line of a date-time and a key is a request, not a header.
    assert parse_trace(write(tmp_path, "2026-01-01,a\n2026-01-02,b\n")).keys.tolist() == ["a", "b"]


def test_the_first_line_decides_the_format(tmp_path: Path):
    # "abc" is not a number, so line 1 is a bare key that happens to hold a comma.
    assert parse_trace(write(tmp_path, "abc,1\nx\n")).keys.tolist() == ["abc,1", "x"]
    with pytest.raises(TraceError, match="^line 2: mixed formats"):
        parse_trace(write(tmp_path, "abc,1\n2,x\n"))
    csv = parse_trace(write(tmp_path, "123,abc\n124,abd\n"))
    assert csv.keys.tolist() == ["abc", "abd"] and csv.timestamps.tolist() == [123.0, 124.0]


def test_csv_fields_after_the_key_and_a_header_line_are_taken_as_real_traces_have_them(tmp_path: Path):
    # libCacheSim's timestamp,obj_id,obj_size with its header line; the key stays an integer.
    trace = parse_trace(write(tmp_path, "timestamp,obj_id,obj_size\n1,5,100\n2,7,200\n3,5,100\n"))
    assert trace.keys.dtype == np.int64 and trace.keys.tolist() == [5, 7, 5]
    assert trace.timestamps.tolist() == [1.0, 2.0, 3.0]
    # Twitter's cache traces: timestamp, key, key size, value size, client, operation, TTL (no header).
    twitter = "0,nz:u:eeW511W3dcH3de3d15ec,76,1,22,get,0\n0,nz:u:ewW511W3dcH3de3d15ec,76,1,22,get ,0\n"
    assert parse_trace(write(tmp_path, twitter)).keys.tolist() == [
        "nz:u:eeW511W3dcH3de3d15ec",
        "nz:u:ewW511W3dcH3de3d15ec",
    ]
    assert parse_trace(write(tmp_path, " time , key \n1,a\n2,b\n")).keys.tolist() == ["a", "b"]
    # Old Mac line ends (a lone CR) end lines too: never one long line whose rest looks like extra fields.
    assert parse_trace(write(tmp_path, b"1,5,100\r2,6,100\r3,7,100\r")).keys.tolist() == [5, 6, 7]


def test_fields_separated_by_spaces_or_tabs_are_read_as_the_wikipedia_cdn_traces_have_them(tmp_path: Path):
    # timestamp, object id, size: one space between fields; runs of blanks and tabs separate fields too.
    wiki = parse_trace(write(tmp_path, "0 20 3046\n0 21 1000\n1  20\t3046 \n"))
    assert wiki.keys.tolist() == [20, 21, 20] and wiki.timestamps.tolist() == [0.0, 0.0, 1.0]
    assert wiki.layout() == {
        "format": "text",
        "fields": 3,
        "timestamp_field": 1,
        "key_field": 2,
        "separator": "whitespace",
        "distinct_keys": 2,
    }
    named = parse_trace(write(tmp_path, "time\tid\tsize\n5\tad:1\t9\n6\tad:2\t9\n"), columns=("time", "id"))
    assert named.keys.tolist() == ["ad:1", "ad:2"] and named.header == ("time", "id", "size")
    kept = parse_trace(write(tmp_path, "1 a get\n2 b set\n3 a get\n"), where=(3, ["get"]))
    assert kept.keys.tolist() == ["a", "a"] and kept.layout()["where"]["dropped"] == 1
    # A long run of blanks is one separator (and no slow regex backtracking over it).
    assert parse_trace(write(tmp_path, "0 a" + " " * 100_000 + "b\n")).keys.tolist() == ["a"]
    # One field per line stays a key per line, and a key with a blank inside is still refused.
    assert parse_trace(write(tmp_path, "7\n8\n")).layout().get("separator") is None
    with pytest.raises(TraceError, match="^line 1: key 'ad 7' contains whitespace$"):
        parse_trace(write(tmp_path, "ad 7\n"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("timestamp,key\n1,a\n2,b c\n", "line 3: key 'b c' contains whitespace"),  # numbered as in the file
        ("ts,key\n1,a\n1e999,b\n", "line 3: timestamp '1e999' is not a finite number"),
        # a first timestamp that float() reads but is no number: was a header of names "nan" and "a", skipped
        ("nan,a\n1,b\n", "line 1: timestamp 'nan' is not a finite number"),
        ("-Infinity\tad1\n1\tad2\n", "line 1: timestamp '-Infinity' is not a finite number"),
        ("ts,key\n1,a\n2\n", "line 3: mixed formats"),
        ("1,5,100\n2,7\n", "line 2: expected 3 fields as on the first line, got 2"),
        ("t,k,size\n1,5,100\n2,7,1,1\n", "line 3: expected 3 fields"),
        ("1,a,x\n2,,y\n", "line 2: empty key after the comma"),
        ("name,7\n1,a\n", "line 2: mixed formats"),  # a field that is a number: a key, not a header
        ("ts,key,size\n1,a\n", "line 2: mixed formats"),  # more names than the fields below them
        ("timestamp,obj_id,obj_size\n", "line 1 is a header of column names, and no request follows it"),
        ("# ts,key\n1,a\n", "line 1: comment lines are not allowed"),  # a comment is never a header
        ("1,a\n" + "7" * 20_000 + "x,b\n", "line 2: timestamp '7777"),  # a long number is read in linear time
    ],
)
def test_a_header_or_extra_fields_keep_every_line_checked(tmp_path: Path, text: str, message: str):
    with pytest.raises(TraceError, match=f"^{message}"):
        parse_trace(write(tmp_path, text))


MSR = (
    "Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime\n"
    "128166372003061629,hm,1,Read,3154152960,4096,0\n"
    "128166372016382155,hm,1,Write,3154152961,4096,0\n"
    "128166372026382245,hm,1,Read,3154152960,4096,0\n"
)


def test_columns_pick_the_timestamp_and_key_of_any_csv_layout(tmp_path: Path):
    # A header's names choose the fields: MSR's Offset, not field 2, its host name (one key for every request).
    default = parse_trace(write(tmp_path, MSR))
    assert default.layout() == {
        "format": "text",
        "fields": 7,
        "timestamp_field": 1,
        "key_field": 5,
        "separator": "comma",
        "header": ["Timestamp", "Hostname", "DiskNumber", "Type", "Offset", "Size", "ResponseTime"],
        "distinct_keys": 2,
    }
    systor = "Timestamp,Response,IOType,LUN,Offset,Size\n1.5,0.0004,R,1,4096,512\n1.6,0.0007,W,1,8192,512\n"
    assert parse_trace(write(tmp_path, systor)).keys.tolist() == [4096, 8192]  # not field 2, its response times
    keys_named = parse_trace(write(tmp_path, "obj_id,size\na,1\nb,1\n"))  # a key and no time: keys only
    assert keys_named.keys.tolist() == ["a", "b"] and keys_named.timestamps is None
    # Without names it knows, field 1 is the time and 2 the key; a bare "id" is no key name (a request's own id in
    # IBM's registry traces): a URL is the key beside it (h_diff).
    assert parse_trace(write(tmp_path, "when,what\n1,a\n2,b\n")).layout()["key_field"] == 2
    by_url = parse_trace(write(tmp_path, "timestamp,url,id\n1704067200,/a,0\n1704067201,/a,1\n"))
    assert by_url.keys.tolist() == ["/a", "/a"]
    # A key name without a time name this reader knows: field 1 is still the time (Meta's op_time, a short "t").
    for name in ("op_time", "t", "when"):
        meta = parse_trace(write(tmp_path, f"{name},key,size\n1704067200,k1,9\n1704067260,k2,9\n"))
        assert meta.timestamps.tolist() == [1704067200.0, 1704067260.0] and meta.keys.tolist() == ["k1", "k2"]
    # pandas' index column before the names: they choose the fields after it
    indexed = parse_trace(write(tmp_path, ",obj_id,timestamp\n0,a,1704067200\n1,b,1704067201\n"))
    assert indexed.keys.tolist() == ["a", "b"] and indexed.timestamps.tolist() == [1704067200.0, 1704067201.0]
    # One field named by the caller: the other still by the header's names, not field 1 or 2
    for columns in (("Timestamp", NAMED), (1, NAMED)):
        assert parse_trace(write(tmp_path, systor), columns=columns).keys.tolist() == [4096, 8192]
    for columns in [(1, 5), ("Timestamp", "Offset"), ("1", "5")]:
        trace = parse_trace(write(tmp_path, MSR), columns=columns)
        assert trace.keys.tolist() == [3154152960, 3154152961, 3154152960]
        assert trace.timestamps.tolist() == [128166372003061629.0, 128166372016382155.0, 128166372026382245.0]
        assert trace.layout()["key_field"] == 5 and trace.layout()["distinct_keys"] == 2
    keys_only = parse_trace(write(tmp_path, MSR), columns=(None, "Offset"))
    assert keys_only.timestamps is None and keys_only.keys.tolist() == [3154152960, 3154152961, 3154152960]
    # The key before the timestamp, without a header.
    swapped = parse_trace(write(tmp_path, "a,10\nb,11\na,12\n"), columns=(2, 1))
    assert swapped.keys.tolist() == ["a", "b", "a"] and swapped.timestamps.tolist() == [10.0, 11.0, 12.0]
    assert parse_trace(write(tmp_path, "7\n8\n")).layout() == {
        "format": "text",
        "fields": 1,
        "timestamp_field": None,
        "key_field": 1,
        "distinct_keys": 2,
    }


@pytest.mark.parametrize(
    ("text", "columns", "message"),
    [
        (MSR, (1, 9), "key field 9 does not exist: the first line has 7 fields"),
        (MSR, (1, "Nope"), "no key column named 'Nope': the header has Timestamp, Hostname"),
        ("1,a,b\n", (1, "key"), "no key column named 'key': the trace has no header line"),
        ("ts,key,key\n1,a,b\n", (1, "key"), "the header names 2 columns 'key': give the key field's 1-based number"),
        (MSR, ("Offset", 5), "the timestamp and the key are both field 5"),
        ("1,a,x\n2,b\n", (1, 3), "line 2: expected 3 fields as on the first line, got 2"),
        ("t,k,x\n1,a,x\n2,b,y,z\n", (1, 2), "line 3: expected 3 fields"),
        ("1,a,x\nnoon,b,y\n", (1, 2), "line 2: timestamp 'noon' is not numeric"),
        ("1,a,x\n2,,y\n", (1, 2), "line 2: empty key after the comma"),
    ],
)
def test_bad_columns_and_lines_under_them_are_one_clear_error(tmp_path: Path, text: str, columns, message: str):
    with pytest.raises(TraceError, match=f"^{message}"):
        parse_trace(write(tmp_path, text), columns=columns)


def test_integers_beyond_int64_stay_strings(tmp_path: Path):
    # A 64-bit unsigned hash is a valid key; it does not fit int64, so the trace keeps its keys as strings.
    trace = parse_trace(write(tmp_path, "1\n18446744073709551615\n1\n"))
    assert trace.keys.tolist() == ["1", "18446744073709551615", "1"]


@pytest.mark.parametrize(
    ("text", "keys"),
    [
        ("007\n7\n+7\n7\n", ["007", "7", "+7", "7"]),  # three keys, as written: integers would merge them
        ("1\n-0\n0\n", ["1", "-0", "0"]),
        ("5,007\n6,7\n7,7\n", ["007", "7", "7"]),
        ("0001\n0002\n0001\n", [1, 2, 1]),  # zero-padded ids of one width stay integers: none merge
        ("5,+3\n6,4\n", [3, 4]),
    ],
)
def test_integer_keys_written_two_ways_stay_distinct(tmp_path: Path, text: str, keys: list):
    trace = parse_trace(write(tmp_path, text))
    assert trace.keys.tolist() == keys
    assert trace.layout()["distinct_keys"] == len(set(keys))


def test_bigquery_and_snowflake_timestamps_are_date_times(tmp_path: Path):
    # BigQuery's CSV export writes a TIMESTAMP as "2026-01-01 08:30:00 UTC": refused as "not a date-time like line 2's"
    start = (pd.Timestamp("2026-01-01", tz="UTC") - pd.Timestamp(0, tz="UTC")).total_seconds()
    exported = "2026-01-01 00:00:00 UTC,a\n2026-01-01 00:00:01.250000 UTC,b\n"
    for text in ("ts,key\n" + exported, exported):  # with its header (the default) or without
        trace = parse_trace(write(tmp_path, text))
        assert trace.keys.tolist() == ["a", "b"] and trace.timestamps.tolist() == [start, start + 1.25]
    unloaded = parse_trace(write(tmp_path, "2026-01-01 00:00:00.000 +0000,a\n2026-01-01 01:00:01.500 +0100,b\n"))
    assert unloaded.timestamps.tolist() == [start, start + 1.5]  # Snowflake's TIMESTAMP_TZ, unloaded without a header
    column = pd.Series(["2026-01-01 00:00:00 UTC", "2026-01-01T00:00:02Z", None], dtype=object)  # Parquet's strings
    assert iso_seconds(column)[:2].tolist() == [start, start + 2] and np.isnan(iso_seconds(column)[2])


def test_a_header_ending_in_a_separator_names_the_fields_of_lines_that_do_too(tmp_path: Path):
    # "ts,key," over "1764547200,ad1," lines (a writer that ends each line with a separator) was read as a bare key
    # over CSV lines: "line 2: mixed formats: line 1 is a bare key"
    trace = parse_trace(write(tmp_path, "ts,key,\n1764547200,ad1,\n1764547260,ad2,\n"))
    assert trace.keys.tolist() == ["ad1", "ad2"] and trace.timestamps.tolist() == [1764547200, 1764547260]
    assert trace.header == ("ts", "key", "") and trace.fields == 3
    trace = parse_trace(write(tmp_path, "ts|key|\n1764547200|ad1|\n"))
    assert trace.keys.tolist() == ["ad1"] and trace.layout()["separator"] == "pipe"
    with pytest.raises(TraceError, match="^line 2: mixed formats"):  # one name and an empty one: no header
        parse_trace(write(tmp_path, "key,\n1764547200,ad1\n"))


def test_pandas_unnamed_index_column_is_neither_timestamp_nor_key(tmp_path: Path):
    # DataFrame.to_csv writes its index first, under an empty name: the header was taken for a bare key, and the
    # file refused as "line 2: mixed formats" (by name: "the trace has no header line")
    frame = pd.DataFrame({"ts": [1_767_225_600, 1_767_225_660, 1_767_225_720], "key": ["ad1", "ad2", "ad1"]})
    frame.to_csv(written := tmp_path / "requests.csv")
    for columns in (None, ("ts", "key")):
        trace = parse_trace(written, columns=columns)
        assert trace.keys.tolist() == ["ad1", "ad2", "ad1"] and trace.timestamps.tolist() == frame["ts"].tolist()
        assert (trace.header, trace.timestamp_field, trace.key_field) == (("", "ts", "key"), 2, 3)
    missing = write(tmp_path, ",ad1\n2026-01-01T00:00:00Z,ad2\n")  # a first request without its timestamp
    with pytest.raises(TraceError, match="line 2: mixed formats"):
        parse_trace(missing)
    frame[["key"]].to_csv(written)  # keys only
    trace = parse_trace(written)
    assert trace.keys.tolist() == ["ad1", "ad2", "ad1"] and trace.timestamps is None


def test_a_tsv_whose_date_times_hold_a_blank_is_split_at_tabs(tmp_path: Path):
    # ClickHouse's TSV writes a DateTime as "2026-01-01 08:30:00": read as blank-separated fields it was no trace
    # ("line 1: key 'ts\tkey' contains whitespace")
    start = (pd.Timestamp("2026-01-01", tz="UTC") - pd.Timestamp(0, tz="UTC")).total_seconds()
    rows = "2026-01-01 00:00:00\tad 1\tget\n2026-01-01 00:00:02\tad2\tset\n"
    for text in ("ts\tkey\top\n" + rows, rows):
        with pytest.raises(TraceError, match="line 1: key 'ad 1' contains whitespace|line 2: key 'ad 1' contains"):
            parse_trace(write(tmp_path, text))
        trace = parse_trace(write(tmp_path, text.replace("ad 1", "ad1")), where=(3, {"get", "set"}))
        assert trace.keys.tolist() == ["ad1", "ad2"] and trace.timestamps.tolist() == [start, start + 2]
        assert trace.layout()["separator"] == "tab"
    with pytest.raises(TraceError, match="line 2: a comma in a trace of tab-separated fields"):
        parse_trace(write(tmp_path, "2026-01-01 00:00:00\tad1\n2026-01-01 00:00:02\tad,2\n"))


def test_a_csv_separated_by_semicolons_is_read_by_its_fields(tmp_path: Path):
    # A spreadsheet's CSV in a locale whose decimal mark is the comma ("1764547200;ad1"): every whole line was a key,
    # every request a miss, and no warning said so
    for text in ("1764547200;ad1;1,5\n1764547260; ad2 ;2\n1764547320;ad1;3\n", "ts;key;size\n1764547200;ad1;1\n"):
        if "1,5" in text:
            with pytest.raises(TraceError, match="line 1: a comma in a trace of semicolon-separated fields"):
                parse_trace(write(tmp_path, text))
            text = text.replace("1,5", "1.5")
        trace = parse_trace(write(tmp_path, text), where=(3, {"1", "1.5", "2"}))
        assert trace.keys.tolist() == ["ad1", "ad2"][: len(trace.keys)] and trace.timestamps[0] == 1_764_547_200
        assert trace.layout()["separator"] == "semicolon"
    assert parse_trace(write(tmp_path, "a;b\nc;d\n")).keys.tolist() == ["a;b", "c;d"]  # no timestamp: bare keys
    for text in ("1764547200,862;ad1\n1764547260,5;ad2\n", "ts;key\n2026-01-01 00:00:39,158;ad1\n"):
        with pytest.raises(TraceError, match=r"line \d: a comma in a trace of semicolon-separated fields \(a decimal"):
            parse_trace(write(tmp_path, text))


def test_a_trace_separated_by_pipes_is_read_by_its_fields(tmp_path: Path):
    # psql's unaligned output ("ts|key|user"): every whole line was a key of its own, every rate 0.0, without a warning
    rng = np.random.default_rng(3)
    keys = [f"ad{k}" for k in np.minimum(rng.zipf(1.4, 600), 50)]
    times = [1_764_547_200 + 432 * i for i in range(600)]
    rows = "".join(f"{t}|{k}|u{i % 5}\n" for i, (t, k) in enumerate(zip(times, keys, strict=True)))
    trace = parse_trace(write(tmp_path, "ts|key|user\n" + rows))
    assert trace.keys.tolist() == keys and trace.timestamps.tolist() == times
    assert trace.layout()["separator"] == "pipe" and trace.header == ("ts", "key", "user")
    days = split_days(trace, 3)
    assert replay(days, top_n=0, capacity=8)["hit_rate_lru"] == pytest.approx(reference_lru_hit_rate(days, 8))
    with pytest.raises(TraceError, match="^line 2: a comma in a trace of pipe-separated fields$"):
        parse_trace(write(tmp_path, "1764547200|ad1\n1764547260|ad,2\n"))
    assert parse_trace(write(tmp_path, "a|b\nc|d\n")).keys.tolist() == ["a|b", "c|d"]  # no timestamp: bare keys
    # psql -A ends with its row count: "line 602: mixed formats ... a bare key" refused the whole file
    footed = parse_trace(write(tmp_path, "ts|key|user\n" + rows + "(600 rows)\n"))
    assert footed.keys.tolist() == keys and footed.timestamps.tolist() == times
    assert parse_trace(write(tmp_path, "1764547200|ad1\n(1 row)\n")).keys.tolist() == ["ad1"]


@pytest.mark.parametrize(
    ("text", "separator"),
    [
        ("1764547200 ad1\n1764547260  ad2\n", "whitespace"),
        ("2026-01-01 08:30:00\tad1\n", "tab"),  # blanks inside a field: tabs separate
        ("ts;key\n1764547200;ad1\n", "semicolon"),
        ("1764547200|ad1\n", "pipe"),
        ("1764547200,ad|1\n", "comma"),
        # a decimal comma in the timestamp of a semicolon-separated line: read as comma CSV with key "862;ad1" before
        ("1764547200,862;ad1\n", "semicolon"),
        ("ts;key\n2026-01-01 00:00:39,158;ad1\n", "semicolon"),
        ("1764547200,ad;1\n", "comma"),  # a key holding a semicolon
        ("a|b\nc|d\n", "comma"),  # no number first: one key per line, as a comma-separated file of one field
        ("ad1\n", "comma"),
    ],
)
def test_the_separator_is_one_decision_on_the_first_lines(text: str, separator: str):
    from precompute_assets.ml.replay import _separator

    assert _separator(text) == separator


def test_python_loggings_comma_before_milliseconds_is_not_read_as_the_key(tmp_path: Path):
    # "2025-12-01 08:30:00,123,ad:5" (logging's asctime, then the key) replayed the milliseconds as keys: 1,000 keys,
    # a hit rate of 0.0, and an import wrote them to the lake as the requested ids
    from precompute_assets.ml.replay import parse_trace_quarantining

    log = write(tmp_path, "2025-12-01 08:30:00,123,ad:5\n2025-12-01 08:30:01,007,ad:6\n2025-12-01 08:30:01,512,ad:5\n")
    for parse in (parse_trace, parse_trace_quarantining):
        with pytest.raises(TraceError, match="^every line starts like '2025-12-01 08:30:00,123': a time with its"):
            parse(log)
    named = parse_trace(log, columns=(1, 3))
    assert named.keys.tolist() == ["ad:5", "ad:6", "ad:5"] and named.timestamps[2] - named.timestamps[0] == 1.0
    assert parse_trace(log, columns=(1, 2)).keys.tolist() == [123, 7, 512]  # the digits were the keys after all
    other = write(tmp_path, "2025-12-01 08:30:00,123,ad:5\n2025-12-01 08:30:01,4096,ad:6\n")  # not every line
    assert parse_trace(other).keys.tolist() == [123, 4096]


def reference_lru_hit_rate(days: list[np.ndarray], capacity: int) -> float:
    """An LRU of ``capacity`` keys over every day in order, its hits counted from day 1 (day 0 warms it)."""
    cache: OrderedDict = OrderedDict()
    hits = counted = 0
    for day, keys in enumerate(days):
        for key in keys.tolist():
            hit = key in cache
            if hit:
                cache.move_to_end(key)
            else:
                cache[key] = None
                if len(cache) > capacity:
                    cache.popitem(last=False)
            hits, counted = hits + (hit and day > 0), counted + (day > 0)
    return hits / counted


def test_three_digit_keys_after_date_times_to_the_second_are_read_as_keys(tmp_path: Path):
    # Refused as Python logging's milliseconds: "2025-12-01 08:30:00,123,4096" (a time, a key, a size) needed
    # --key-field 2. Milliseconds of a log grow within each second; keys go down about every other request.
    from precompute_assets.ml.replay import parse_trace_quarantining

    rng = np.random.default_rng(7)
    keys = 100 + np.minimum(rng.zipf(1.3, 2000), 899)
    start = pd.Timestamp("2025-12-01")
    lines = [f"{(start + pd.Timedelta(seconds=130 * (i // 4))):%Y-%m-%d %H:%M:%S},{k},4096" for i, k in enumerate(keys)]
    trace_path = write(tmp_path, "\n".join(lines) + "\n")
    for parse in (parse_trace, lambda path: parse_trace_quarantining(path)[0]):
        trace = parse(trace_path)
        assert trace.keys.tolist() == keys.tolist() and trace.timestamps[4] - trace.timestamps[0] == 130.0
    days = split_days(trace, 3)
    assert replay(days, top_n=0, capacity=20)["hit_rate_lru"] == pytest.approx(reference_lru_hit_rate(days, 20))
    # A log's milliseconds stay refused, a few lines out of order (processes sharing the file) or not
    millis = sorted(rng.integers(0, 1000, 12).tolist())
    millis[5], millis[6] = millis[6], millis[5]
    log = write(tmp_path, "".join(f"2025-12-01 08:30:0{i // 4},{ms:03d},ad:{i % 3}\n" for i, ms in enumerate(millis)))
    with pytest.raises(TraceError, match="^every line starts like '2025-12-01 08:30:00,.*': a time with its"):
        parse_trace(log)


def test_trace_notes_warn_of_text_read_from_the_wrong_place_only():
    commas = np.array(["a,1", "b,2", "a,1"], dtype=object)
    days = [commas[:2], commas[2:]]
    assert len(trace_notes(Trace(keys=commas), days)) == 1  # bare text lines holding commas: a CSV misread?
    assert trace_notes(Trace(keys=commas, format="parquet"), days) == []  # a Parquet key column may hold commas
    one = np.array(["hm"] * 4, dtype=object)
    read = Trace(keys=one, fields=7, timestamp_field=1, key_field=2)
    assert len(trace_notes(read, [one[:2], one[2:]])) == 1
    assert trace_notes(read, [one[:2], one[2:]], key_chosen=True) == []
    assert trace_notes(Trace(keys=one[:0]), [one[:0]]) == [  # an empty trace: only its empty day
        "1 of the 1 days hold no requests (days 0): days are equal spans of the timestamps; an outlier timestamp or "
        "a gap? Use fewer --days, or --time-field none to split by count"
    ]


def day_notes(timestamps: list[float] | None, days: int, **trace) -> list[str]:
    """``trace_notes`` of a trace of these timestamps split into ``days``, each request a key of its own."""
    keys = np.arange(len(timestamps) if timestamps is not None else 12)
    read = Trace(keys=keys, timestamps=None if timestamps is None else np.asarray(timestamps, float), **trace)
    return trace_notes(read, split_days(read, days))


def test_days_far_from_24_hours_are_named_with_the_days_that_fit(tmp_path: Path, capsys: pytest.CaptureFixture):
    # --days 8 on a trace of 4 days replayed half-days without a word
    epoch = 1_764_547_200  # 2025-12-01
    four_days = [epoch + 3600 * h for h in range(97)]
    assert day_notes(four_days, 8) == [
        "each of the 8 days is 12 h of the trace's timestamps, not 24 h: they span 4 days (--days 4 for days of about "
        "24 h; --time-field none splits by request count)"
    ]
    assert day_notes(four_days, 4) == [] and day_notes([*four_days, epoch + 100 * 3600], 4) == []  # 25 h: near 24
    assert "each of the 3 days is 32 h" in day_notes(four_days, 3)[0]
    # 4 days, the last ending at 13:20: "--days 4" was the advice given to a replay of --days 4
    partial = [epoch + 1200 * i for i in range(256)]  # 3.54 days
    assert day_notes(partial, 4) == [
        "each of the 4 days is 21.2 h of the trace's timestamps, not 24 h: they span 3.54 days (a first or last day "
        "only partly in the trace? 4 equal spans cannot each be one of its days; --time-field none splits by request "
        "count)"
    ]
    assert day_notes([t * 1000 for t in four_days], 8)[0].startswith("each of the 8 days is 12 h")  # epoch ms
    assert day_notes([t * 10_000_000 + 116_444_736_000_000_000 for t in four_days], 4) == []  # Windows file times
    assert "if they" not in day_notes(four_days, 8, dated=True)[0]  # date-times: seconds, whatever their size
    # A trace's own clock tells no unit: the one that makes a day nearest 24 h is named as a guess
    relative = [3600.0 * h for h in range(97)]
    assert "they span 4 days, if they are seconds (--days 4" in day_notes(relative, 8)[0]
    assert "span 4 days, if they are milliseconds" in day_notes([t * 1000 for t in relative], 8)[0]
    assert "span 3 s, if they are seconds (too short for 2 days of 24 h;" in day_notes([1, 2, 3, 4], 2)[0]
    assert "--time-field" not in day_notes(relative, 8, format="oracle-general")[0]  # binary records: no fields
    assert day_notes(None, 4) == [] and day_notes([5.0] * 12, 4) == []  # days of equal request counts
    dates = [epoch + 86_400 * (i // 4) for i in range(12)]  # "2025-12-01,k": 3 dates, each a whole day
    assert day_notes(dates, 3, dated=True) == [] and "they span 3 days (--days 3" in day_notes(dates, 2, dated=True)[0]
    outlier = day_notes([0, *four_days[1:]], 4)  # an empty day's note, not 4,600-day days
    assert len(outlier) == 1 and outlier[0].startswith("2 of the 4 days hold no requests")
    trace = write(tmp_path, "".join(f"{t},k{t % 7}\n" for t in four_days))
    assert main(["replay", "--trace", str(trace), "--days", "8", "--top-n", "0", "--capacity", "3"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["trace_notes"] == day_notes(four_days, 8)
    assert captured.err == f"precompute replay: warning: {day_notes(four_days, 8)[0]}\n"


def test_a_time_field_that_goes_back_at_many_lines_is_named(tmp_path: Path, capsys: pytest.CaptureFixture):
    # An ARC trace (start block, blocks, unused, request number) read as timestamp,key: its blocks were the times
    blocks = [(i * 7919) % 1000 * 8 for i in range(400)]
    notes = day_notes(blocks, 2, timestamp_field=1)
    assert notes[-1].startswith("field 1, read as the time of each request, goes back at 92% of the lines where it")
    assert notes[-1].endswith("--time-field none: requests in file order)")
    assert "--time-field" not in day_notes(blocks, 2, format="oracle-general")[-1]  # binary records: no fields
    # A log merged from writers goes back now and then, and repeats times: no note
    merged = [t + (3 if t % 20 == 0 else 0) for t in range(400) for _ in range(2)]
    assert not any("goes back" in note for note in day_notes(merged, 2))
    assert not any("goes back" in note for note in day_notes([5.0] * 12, 4))
    trace = write(tmp_path, "".join(f"{b} 1 0 {i}\n" for i, b in enumerate(blocks)))
    assert main(["replay", "--trace", str(trace), "--days", "2", "--top-n", "0", "--capacity", "3"]) == 0
    assert "field 1, read as the time of each request, goes back" in capsys.readouterr().err
    assert (
        main(
            [
                "replay",
                "--trace",
                str(trace),
                "--days",
                "2",
                "--top-n",
                "0",
                "--capacity",
                "3",
                "--time-field",
                "none",
                "--key-field",
                "1",
            ]
        )
        == 0
    )
    assert "goes back" not in capsys.readouterr().err


def test_where_keeps_the_requests_whose_field_has_one_of_the_values(tmp_path: Path):
    msr = parse_trace(write(tmp_path, MSR), columns=("Timestamp", "Offset"), where=("Type", {"Read"}))
    assert msr.keys.tolist() == [3154152960, 3154152960] and len(msr.timestamps) == 2
    assert msr.layout()["where"] == {"field": 4, "values": ["Read"], "dropped": 1}
    twitter = "".join(f"{t},k{t % 4},12,300,7,{('get', 'set', 'gets')[t % 3]} ,0\n" for t in range(12))
    kept = parse_trace(write(tmp_path, twitter), where=(6, ["get", "gets"]))  # the operation, padding stripped
    assert kept.keys.tolist() == [f"k{t % 4}" for t in range(12) if t % 3 != 1]
    assert kept.timestamps.tolist() == [t for t in range(12) if t % 3 != 1]
    assert parse_trace(write(tmp_path, "7\n8\n7\n"), where=(1, ["7"])).keys.tolist() == [7, 7]
    # A numeric field, as written: MSR's DiskNumber, Twitter's client id (a traceback: pandas read them as numbers)
    numbers = write(tmp_path, "1,a,0,7\n2,b,1,007\n3,c,0,1.50\n")
    assert parse_trace(numbers, where=(3, ["0"])).keys.tolist() == ["a", "c"]
    assert parse_trace(numbers, where=(4, ["007", "1.50"])).keys.tolist() == ["b", "c"]
    bare = parse_trace(write(tmp_path, "a,b\nc\na\n"), where=(1, ["a"]))  # a bare key is the whole line
    assert bare.keys.tolist() == ["a"] and bare.layout()["where"]["dropped"] == 2
    # Every line is still read: a bad line among the dropped ones is named as numbered in the file.
    with pytest.raises(TraceError, match="^line 3: "):
        parse_trace(write(tmp_path, "1,a,get\n2,b,set\n3,c\n"), where=(3, ["get"]))
    for where, message in [
        ((3, ["delete"]), r"^no line has field 3 in \['delete'\]$"),
        ((8, ["get"]), "^--where field 8 does not exist"),
        (
            ("Type", ["get"]),
            "^no --where column named 'Type': the trace has no header line \(or give the field's 1-based number\)$",
        ),
    ]:
        with pytest.raises(TraceError, match=message):
            parse_trace(write(tmp_path, "1,a,get\n2,b,set\n"), where=where)


def test_parse_drops_a_byte_order_mark(tmp_path: Path):
    trace = parse_trace(write(tmp_path, "\ufeff1\n2\n".encode()))
    assert trace.keys.dtype == np.int64 and trace.keys.tolist() == [1, 2]
    # `cat a.txt b.txt` of two exports: the second's mark starts a line inside, and "\ufeffk1" was another key
    twice = parse_trace(write(tmp_path, "\ufeffk1\nk2\nk1\n\ufeffk1\nk2\nk1\r\n\ufeffk2\n".encode()))
    assert twice.keys.tolist() == ["k1", "k2", "k1", "k1", "k2", "k1", "k2"]
    # ... also where a line that is no UTF-8 is cut out (a request log's import): the other lines read as above
    from precompute_assets.ml.replay import parse_trace_quarantining

    mixed = "\ufeff1767225600,ad1\n1767225601,ad2\n\ufeff1767225602,ad1\n".encode() + b"1767225604,caf\xe9\n"
    trace, cut = parse_trace_quarantining(write(tmp_path, mixed), exact_keys=True)
    assert trace.keys.tolist() == ["ad1", "ad2", "ad1"] and [line for line, _ in cut] == [4]


@pytest.mark.parametrize("timestamps", [True, False])
def test_a_trace_is_parsed_in_a_few_times_its_size_of_memory(tmp_path: Path, timestamps: bool):
    # Traces of millions of requests are read whole: a parser that held the text as 4 bytes a character (StringIO)
    # beside its bytes peaked at 8 times the file, 1.9 GB for 10M requests.
    import tracemalloc

    keys = np.random.default_rng(0).integers(1, 10**6, 300_000)
    lines = [f"{1_700_000_000 + i * 0.01:.2f},{k}" for i, k in enumerate(keys)] if timestamps else map(str, keys)
    path = write(tmp_path, "\n".join(lines) + "\n")
    tracemalloc.start()
    try:
        trace = parse_trace(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert trace.keys.tolist() == keys.tolist()
    assert peak < 5 * path.stat().st_size


def test_three_digit_keys_after_seconds_are_told_from_milliseconds_in_a_few_times_the_files_size(tmp_path: Path):
    # The check held a Python string per line, and two more per line for its parts: 10 times the text
    import tracemalloc

    from precompute_assets.ml.replay import _digits_fall_within_seconds

    keys = np.random.default_rng(0).integers(100, 1000, 300_000)
    text = "\n".join(
        f"2025-12-01 {i // 14400:02d}:{i // 240 % 60:02d}:{i // 4 % 60:02d},{k}" for i, k in enumerate(keys)
    )
    tracemalloc.start()
    try:
        told = _digits_fall_within_seconds(text)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert told and peak < 3 * len(text)


def test_where_costs_no_memory_beyond_the_parse_of_the_keys(tmp_path: Path):
    # --where's field of every line (a Python string each) was read beside the parsed keys and the file's whole
    # text, which stayed in memory through the parse: a 30M-line Twitter trace peaked at 9 GB.
    import tracemalloc

    ops = ("get", "set", "gets")
    lines = (f"{i // 10},nz:u:{i * 7919 % 50_000:x},20,300,{i % 97},{ops[i % 3]},0" for i in range(200_000))
    path = write(tmp_path, "\n".join(lines) + "\n")
    peaks = []
    for where in (None, (6, ["get", "gets"])):
        tracemalloc.start()
        try:
            trace = parse_trace(path, where=where)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    assert len(trace.keys) == 133_333
    assert peaks[1] < 1.1 * peaks[0], peaks


@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".xz", ".zst", ".lz4", ".br"])
def test_compressed_traces_are_read_as_their_suffix_says(tmp_path: Path, suffix: str):
    text = b"timestamp,key,size\n" + b"".join(b"%d,%d,4096\n" % (t, t % 5) for t in range(50))
    path = tmp_path / f"trace.csv{suffix}"
    if suffix == ".xz":
        path.write_bytes(lzma.compress(text))
    else:
        codec = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".lz4": "lz4", ".br": "brotli"}[suffix]
        with pa.output_stream(str(path), compression=codec) as stream:
            stream.write(text)
    trace = parse_trace(path)
    assert trace.keys.tolist() == [t % 5 for t in range(50)] and trace.header == ("timestamp", "key", "size")
    path.write_bytes(b"not compressed at all")
    with pytest.raises(TraceError, match=f"^not a valid {suffix[1:]} file"):
        parse_trace(path)


def oracle_general(records: list[tuple[int, int, int, int]]) -> bytes:
    return np.array(records, dtype=ORACLE_GENERAL).tobytes()


def test_oracle_general_ids_of_2_63_and_above_are_their_numbers_with_exact_keys(tmp_path: Path):
    # The import (exact_keys) wrote 2^64 - 1 to the lake as -1, the negative int64 the replay keeps it distinct as
    path = tmp_path / "w1.oracleGeneral.bin"
    path.write_bytes(oracle_general([(10, 7, 1, -1), (11, 2**64 - 1, 1, -1), (12, 2**63, 1, -1)]))
    assert list(parse_trace(path, exact_keys=True).keys) == ["7", str(2**64 - 1), str(2**63)]
    assert list(parse_trace(path).keys) == [7, -1, -(2**63)]
    # --ab and the frequency sketch hash the id's text as the serving client gets it, not the int64's (h_diff8)
    assert list(parse_trace(path, spelled_keys=True).keys) == ["7", str(2**64 - 1), str(2**63)]
    path.write_bytes(oracle_general([(10, 7, 1, -1)]))
    assert parse_trace(path, exact_keys=True).keys.dtype == np.int64  # small ids stay integers: their text is exact


def test_oracle_general_records_are_read_by_name_or_format(tmp_path: Path):
    """libCacheSim's binary records: time and object id are used, an id of 2^63 or more stays distinct."""
    records = [(10, 7, 4096, 2), (10, 2**64 - 1, 512, -1), (11, 7, 4096, -1), (86410, 2**63, 1, -1)]
    path = tmp_path / "w106.oracleGeneral.bin.zst"
    with pa.output_stream(str(path), compression="zstd") as stream:
        stream.write(oracle_general(records))
    trace = parse_trace(path)
    assert trace.keys.tolist() == [7, -1, 7, -(2**63)] and trace.timestamps.tolist() == [10, 10, 11, 86410]
    assert trace.layout() == {"format": "oracle-general", "fields": 4, "timestamp_field": 1, "key_field": 2,
                              "distinct_keys": 3}  # fmt: skip
    plain = tmp_path / "trace.bin"
    plain.write_bytes(oracle_general(records))
    assert parse_trace(plain, trace_format="oracle-general").keys.tolist() == trace.keys.tolist()
    with pytest.raises(TraceError, match="not valid UTF-8 text .a binary trace"):
        parse_trace(plain)  # read as text, the default for such a name
    plain.write_bytes(oracle_general(records)[:-1])
    with pytest.raises(TraceError, match="^95 bytes are not a whole number of 24-byte oracleGeneral records"):
        parse_trace(plain, trace_format="oracle-general")
    plain.write_bytes(b"")
    with pytest.raises(TraceError, match="^trace is empty$"):
        parse_trace(plain, trace_format="oracle-general")
    for fields in ({"columns": (1, 2)}, {"where": (3, ["1"])}):
        with pytest.raises(TraceError, match="read fields of text traces, not oracleGeneral's"):
            parse_trace(path, **fields)
    with pytest.raises(ValueError, match="trace_format must be one of"):
        parse_trace(path, trace_format="csv")
    # A text trace whose name says oracleGeneral, of a whole number of records in bytes, is still text.
    text = tmp_path / "w106.oracleGeneral.csv"
    text.write_text("".join(f"{t},k{t % 4}\n" for t in range(100000, 100012)))
    assert len(text.read_bytes()) % 24 == 0 and parse_trace(text).format == "text"
    folder = tmp_path / "folder.csv.gz"
    folder.mkdir()
    with pytest.raises(IsADirectoryError):
        parse_trace(folder, trace_format="text")
    with pytest.raises(TraceError, match="^the folder holds no .parquet file$"):  # a folder: a Parquet dataset
        parse_trace(folder)


def oracle_general_opns(records: list[tuple[int, int, int, int]]) -> bytes:
    """oracleGeneralOpNS records of the same time, id, size and next access: size, then op (u8) and namespace (u16),
    then the next access (the reader uses only time and id, at the same offsets as oracleGeneral's)."""
    packed = np.dtype(
        [("time", "<u4"), ("obj_id", "<u8"), ("obj_size", "<u4"), ("op", "u1"), ("ns", "<u2"), ("next", "<i8")]
    )
    assert packed.itemsize == 27
    return np.array([(t, key, size, 1, 3, after) for t, key, size, after in records], dtype=packed).tobytes()


def test_oracle_general_opns_records_are_read_by_name_or_format(tmp_path: Path):
    # 8 records are 216 bytes, a whole number of 24-byte records too: the name decides, not the length.
    records = [(10 + t, [7, 2**64 - 1, 7, 5][t % 4], 4096, -1) for t in range(8)]
    path = tmp_path / "cluster52.oracleGeneralOpNS.zst"
    with pa.output_stream(str(path), compression="zstd") as stream:
        stream.write(oracle_general_opns(records))
    trace = parse_trace(path)
    assert trace.keys.tolist() == [7, -1, 7, 5] * 2 and trace.timestamps.tolist() == list(range(10, 18))
    assert trace.layout() == {"format": "oracle-general-opns", "fields": 6, "timestamp_field": 1, "key_field": 2,
                              "distinct_keys": 3}  # fmt: skip
    plain = tmp_path / "trace.bin"
    plain.write_bytes(oracle_general_opns(records))
    assert parse_trace(plain, trace_format="oracle-general-opns").keys.tolist() == trace.keys.tolist()
    plain.write_bytes(oracle_general_opns(records)[:-1])
    with pytest.raises(TraceError, match="^215 bytes are not a whole number of 27-byte oracleGeneralOpNS records"):
        parse_trace(plain, trace_format="oracle-general-opns")
    plain.write_bytes(oracle_general_opns(records[:7]))  # 189 bytes: read as oracleGeneral, says what else to try
    with pytest.raises(TraceError, match=r"use --format text; oracleGeneralOpNS records\? use --format oracle-gen"):
        parse_trace(plain, trace_format="oracle-general")
    plain.write_bytes(b"\0" * 25)  # fits neither record size: no other format is suggested
    with pytest.raises(TraceError, match=r"^25 bytes are not a whole number of 24-byte oracleGeneral records \(a text "
                       r"trace\? use --format text\)$"):  # fmt: skip
        parse_trace(plain, trace_format="oracle-general")
    with pytest.raises(TraceError, match="read fields of text traces, not oracleGeneralOpNS's"):
        parse_trace(path, columns=(1, 2))


def test_parse_a_large_trace(tmp_path: Path):
    keys = np.random.default_rng(0).integers(0, 10**12, 200_000)
    path = write(tmp_path, "\n".join(map(str, keys.tolist())) + "\n")
    np.testing.assert_array_equal(parse_trace(path).keys, keys)


def test_parse_a_large_string_trace(tmp_path: Path):
    keys = [f"ad:{k:x}/v{k % 3}" for k in np.random.default_rng(1).integers(0, 10**9, 200_000).tolist()]
    stamps = np.arange(len(keys)) * 0.5
    assert parse_trace(write(tmp_path, "\n".join(keys))).keys.tolist() == keys
    csv = parse_trace(write(tmp_path, "\n".join(f"{t},{k}" for t, k in zip(stamps.tolist(), keys, strict=True))))
    assert csv.keys.tolist() == keys
    np.testing.assert_array_equal(csv.timestamps, stamps)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1\n2\n\n3\n", "line 3: blank line"),
        ("   \n1\n", "line 1: blank line"),
        ("a\n \t \nb\n", "line 2: blank line"),
        ("1,a\n\n2,b\n\n", "line 2: blank line"),  # a blank line above a request, not the blank end below it
        ("1\n# warm-up\n2\n", "line 2: comment lines are not allowed"),
        ("# keys\n1\n", "line 1: comment lines are not allowed"),
        ("a\nb c\n", "line 2: key 'b c' contains whitespace"),
        ("1\n2\nad 7\n", "line 3: key 'ad 7' contains whitespace"),
        ("1,a\n2,b c\n", "line 2: key 'b c' contains whitespace"),
        ("1,a\n2,\n", "line 2: empty key after the comma"),
        ("1,a\n2,  \n", "line 2: empty key after the comma"),
        ("1\n2\n3,4\n", "line 3: mixed formats"),
        ("a\n3,x\n", "line 2: mixed formats"),
        ("1.0,1\n2.0,2\n3\n", "line 3: mixed formats"),
        ("1,2\n3,4,5\n", "line 2: expected 2 fields"),
        ("1,2\nnoon,4\n", "line 2: timestamp 'noon' is not numeric"),
        ("1,1\n1e999,2\n", "line 2: timestamp '1e999' is not a finite number"),
        ("1,a\n1e999,b\n", "line 2: timestamp '1e999' is not a finite number"),
        # fields separated by blanks
        ("0 a 10\n1 b\n", "line 2: expected 3 fields as on the first line, got 2"),
        ("0 a\n1,5 b\n", "line 2: timestamp '1,5' is not numeric"),  # a comma inside a key is a key's (below)
        ("0 a\n\n1 b\n", "line 2: blank line"),
        ("0 a\nx b\n", "line 2: timestamp 'x' is not numeric"),
        ("0 a\n1\n", "line 2: mixed formats"),
        ("# t id size\n0 a 10\n", "line 1: comment lines are not allowed"),
        # ISO 8601 date-times
        ("2026-01-01,a\n2026-01-02,b\n17,c\n", "line 3: timestamp '17' is not a date-time like line 1's"),
        ("t,k\n2026-01-01T00:00Z,a\n2026-13-01,b\n", "line 3: timestamp '2026-13-01' is not a date-time like line 2's"),
        ("t,k\n2026-13-01,a\n", "line 2: timestamp '2026-13-01' is not an ISO 8601 date-time"),
        ("2026-01-01,a\n2026-01-02\n", "line 2: mixed formats"),
        ("2026-01-01,a\n2026-01-02,b c\n", "line 2: key 'b c' contains whitespace"),
        ("2026-01-01 00:00:00 a\n", "line 1: key '2026-01-01 00:00:00 a' contains whitespace"),  # blanks: ambiguous
        # a first field that starts like a number is never a header's name: a request of no format we read
        ("2026-01-01T08,a\n2026-01-01T09:00:00Z,b\n", "line 2: mixed formats"),
        ("20260101T083000Z,a\n2026-01-01T09:00:00Z,b\n", "line 2: mixed formats"),
        # a header names the fields: the first is the timestamp unless --time-field says otherwise
        ("name,hour\nk1,5\n", "line 2: timestamp 'k1' is not numeric \\(the header names the fields: choose them"),
    ],
)
def test_parse_errors_name_the_line(tmp_path: Path, text: str, message: str):
    with pytest.raises(TraceError, match=f"^{message}"):
        parse_trace(write(tmp_path, text))


def test_a_comma_inside_a_field_of_a_blank_separated_trace_is_the_fields(tmp_path: Path):
    """wikibench's URLs hold commas (``Washington,_D.C.``): such a trace was refused whole (h_formats)."""
    assert parse_trace(write(tmp_path, "0 a\n1 b,c\n")).keys.tolist() == ["a", "b,c"]
    lines = "1 1190146243.3 http://w/Washington,_D.C. -\n2 1190146244.1 http://w/Paris -\n"
    trace = parse_trace(write(tmp_path, lines), columns=(2, 3))
    assert trace.keys.tolist() == ["http://w/Washington,_D.C.", "http://w/Paris"] and trace.separator == "whitespace"


@pytest.mark.parametrize(
    ("text", "keys"),
    [
        (b"1\n2\n3\n\n", [1, 2, 3]),
        (b"1,a\n2,b\n\n\n\n", ["a", "b"]),
        (b"1,a\r\n2,b\r\n\r\n\r\n", ["a", "b"]),
        (b"a\nb\n \t\n\n  ", ["a", "b"]),  # lines of blanks too, with or without a newline after the last
        (b"0 a\n1 b\n\n", ["a", "b"]),
        (b"ts,key\n1,a\n\n", ["a"]),
    ],
)
def test_blank_lines_that_end_a_file_are_ignored(tmp_path: Path, text: bytes, keys: list):
    # An editor's or a >> append's blank end was refused as "line 4: blank line": no request is missing there
    from precompute_assets.ml.replay import parse_trace_quarantining

    path = write(tmp_path, text)
    assert parse_trace(path).keys.tolist() == keys
    trace, cut = parse_trace_quarantining(path)
    assert trace.keys.tolist() == keys and cut == []


def test_a_blank_end_below_a_line_that_is_not_utf8_is_not_quarantined(tmp_path: Path):
    from precompute_assets.ml.replay import parse_trace_quarantining

    trace, cut = parse_trace_quarantining(write(tmp_path, b"1,a\n2,\xe9\n3,b\n\n\n"))
    assert trace.keys.tolist() == ["a", "b"] and [line for line, _ in cut] == [2]


def test_a_first_request_whose_timestamp_is_nan_is_quarantined_not_skipped_as_a_header(tmp_path: Path):
    """A request log's first line ``nan,ad1`` was read as a header of two names: the request was gone, uncounted."""
    from precompute_assets.ml.replay import parse_trace_quarantining

    trace, cut = parse_trace_quarantining(write(tmp_path, "nan,ad1\n1,ad2\n2,ad3\n"))
    assert trace.keys.tolist() == ["ad2", "ad3"] and cut == [(1, "timestamp 'nan' is not a finite number")]


def test_a_file_of_blank_lines_only_is_empty(tmp_path: Path):
    for text in ("\n", "\n \n\t\n", "  ", "\r\n\r\n"):
        with pytest.raises(TraceError, match="^trace is empty$"):
            parse_trace(write(tmp_path, text))


def test_parse_error_deep_in_a_large_trace(tmp_path: Path):
    lines = [str(i) for i in range(100_000)]
    lines[76_543] = "oops 1"
    with pytest.raises(TraceError, match="^line 76544: key 'oops 1' contains whitespace$"):
        parse_trace(write(tmp_path, "\n".join(lines)))


def test_parse_rejects_empty_and_binary_files(tmp_path: Path):
    with pytest.raises(TraceError, match="empty"):
        parse_trace(write(tmp_path, ""))
    with pytest.raises(TraceError, match="^line 3: not valid UTF-8"):
        parse_trace(write(tmp_path, b"1\n2\n\xff\xfe\n"))
    with pytest.raises(TraceError, match="^line 2: not valid UTF-8"):
        parse_trace(write(tmp_path, b"ad:1\nad:\xe9\n"))
    assert issubclass(TraceError, ValueError)


# --- splitting -------------------------------------------------------------------------------------------


def test_split_days_by_count_without_timestamps():
    parts = split_days(Trace(keys=np.arange(10)), 3)
    assert [p.tolist() for p in parts] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]


def test_split_days_by_equal_time_spans():
    # Span 0..90 in three days of 30: [0, 30), [30, 60), [60, 90] (the last request closes the last day).
    trace = Trace(keys=np.array([1, 2, 3, 4, 5, 6]), timestamps=np.array([0.0, 10, 29, 30, 31, 90]))
    assert [p.tolist() for p in split_days(trace, 3)] == [[1, 2, 3], [4, 5], [6]]


def test_split_days_orders_by_time_and_keeps_empty_days():
    trace = Trace(keys=np.array([30, 10, 20, 11]), timestamps=np.array([3000.0, 1000, 2000, 1000]))
    parts = split_days(trace, 4)  # days of 500 starting at 1000: 2000 opens day 2, day 1 is empty
    assert [p.tolist() for p in parts] == [[10, 11], [], [20], [30]]


def test_split_days_with_constant_time_falls_back_to_counts():
    trace = Trace(keys=np.arange(4), timestamps=np.full(4, 5.0))
    assert [p.tolist() for p in split_days(trace, 2)] == [[0, 1], [2, 3]]
    with pytest.raises(ValueError):
        split_days(trace, 0)


# --- replay: known examples ------------------------------------------------------------------------------


def test_replay_small_example_by_hand():
    result = replay(days_of([1, 1, 2], [1, 2, 3, 1]), top_n=1, capacity=2)
    assert result == {
        # LRU holds [1, 2]: 1 hit, 2 hit, 3 evicts 1, then 1 misses.
        "hit_rate_lru": 0.5,
        # S3-FIFO (small FIFO 1 key, main 1): 1 and 2 hit; 3 finds both in the small FIFO, hit since they came
        # in, so both move to main, whose clock keeps 1 (hit twice) and evicts 2; 3 enters small; 1 hits.
        "hit_rate_s3fifo": 0.75,
        # ARC: 1 and 2 hit and sit in T2; T1 is empty, so 3 evicts T2's least recent, 1, which then misses.
        "hit_rate_arc": 0.5,
        # Day 0 demand {1: 2, 2: 1} selects key 1, requested twice.
        "hit_rate_static_top_n": 0.5,
        # Key 1 precomputed, one LRU slot holding 2: 1, 2, 1 hit; 3 misses.
        "hit_rate_ours": 0.75,
        # Day 0 leaves {1, 2}: 1, 2 hit; 3 evicts 2 (never again) rather than 1 (needed next); 1 hits.
        "hit_rate_belady": 0.75,
        # Reload {1, 2}; 3 is needed no sooner than 2, so it is not admitted; 1 hits.
        "hit_rate_oracle_preload": 0.75,
        "requests": 4,
        "days": 2,
        "top_n": 1,
        "capacity": 2,
    }


def test_classic_belady_by_hand():
    # Capacity 2. Day 0: 1, 2 fill the cache; 3 evicts 2 (next at 4) rather than 1 (next at 3) -> {1, 3}.
    # Day 1: 1 hit; 2 evicts 3 (next at 8) -> {1, 2}; 4 evicts 2 (next at 7) -> {1, 4}; 1 hit;
    # 2 evicts 1 or 4 (both never again); 3 misses. Two hits of six.
    days = days_of([1, 2, 3], [1, 2, 4, 1, 2, 3])
    assert belady_hits(days, 2) == 2
    result = replay(days, top_n=0, capacity=2)
    assert result["hit_rate_belady"] == pytest.approx(2 / 6)
    # LRU keeps the two most recent keys and misses all six; the oracle reloads {1, 2} and only 4 and 3 miss.
    assert result["hit_rate_lru"] == 0.0
    assert result["hit_rate_oracle_preload"] == pytest.approx(4 / 6)


def test_next_requests():
    codes = np.array([0, 1, 0, 2, 1, 0])
    assert next_requests(codes).tolist() == [2, 4, 5, 6, 6, 6]
    assert next_requests(np.array([], dtype=np.int64)).tolist() == []


def test_precomputed_hits_leave_the_lru_alone():
    # LRU of 2 slots ends day 0 as [2, 1]; key 1 is precomputed on day 1 and its hit does not refresh or
    # free its LRU slot, so 3 evicts 2 and 2 then misses.
    result = replay(days_of([2, 1, 1], [1, 3, 2]), top_n=1, capacity=3)
    assert hits(result, "hit_rate_ours") == 1


def test_day_zero_only_warms():
    assert replay(days_of([1, 1, 1]), top_n=0, capacity=1) == {
        **dict.fromkeys(RATES, 0.0),
        "requests": 0,
        "days": 1,
        "top_n": 0,
        "capacity": 1,
    }
    result = replay(days_of([1, 2], [], [1, 2]), top_n=0, capacity=2)
    assert result["requests"] == 2 and result["hit_rate_lru"] == 1.0 and result["hit_rate_belady"] == 1.0


def test_lru_fails_on_a_scan_longer_than_the_cache_while_the_bounds_do_not():
    scan = list(range(5)) * 4
    result = replay(days_of(scan, scan), top_n=0, capacity=4)
    assert result["hit_rate_lru"] == 0.0
    # MIN on a cyclic scan of 5 keys through 4 slots misses once every 4 requests from day 0 on.
    assert result["hit_rate_belady"] == 0.75
    # Reload 0..3; key 4 is always the one needed last, so it is never admitted and only its 4 requests miss.
    assert result["hit_rate_oracle_preload"] == 0.8


def test_with_room_for_every_key_only_first_requests_miss():
    # The oracle's free reload makes it 1.0 whenever a day fits in the cache; classic Belady still pays
    # the first request of every key, like LRU (here 3 and 4 on day 1, 5 on day 2).
    days = days_of([1, 2, 1], [1, 3, 4, 3, 2], [5, 5, 1])
    result = replay(days, top_n=0, capacity=10)
    assert result["hit_rate_oracle_preload"] == 1.0
    assert result["hit_rate_belady"] == result["hit_rate_lru"] == 5 / 8
    day = np.random.default_rng(1).integers(0, 50, 500)
    assert oracle_preload_day_hits(day, 50) == 500
    assert oracle_preload_day_hits(day, 0) == 0
    assert oracle_preload_day_hits(np.array([], dtype=np.int64), 3) == 0
    assert belady_hits([day[:100], day[100:]], 50) == 400 - len(set(day[100:].tolist()) - set(day[:100].tolist()))
    assert belady_hits([], 3) == 0


def test_static_top_n_is_the_selection_modules_choice_over_its_window():
    # Each day ranks by ad_demand over the week before it, as the asset does: day 0's burst of key 5000 still
    # counts on day 7 and is forgotten from day 8 (over all history it would stay in the top 20).
    rng = np.random.default_rng(3)
    days = [np.minimum(rng.zipf(1.2, 2000), 300) for _ in range(10)]
    days[0] = np.concatenate([days[0], np.full(100_000, 5000)])
    result = replay(days, top_n=20, capacity=40, half_life_days=1.5)

    def static_hits(history: int) -> float:
        hits = 0.0
        for d in range(1, len(days)):
            demand = ad_demand([daily_counts(day) for day in days[max(0, d - history) : d]], half_life_days=1.5)
            hits += coverage(select_top(demand, 20), daily_counts(days[d])) * len(days[d])
        return hits / result["requests"]

    assert result["hit_rate_static_top_n"] == pytest.approx(static_hits(DEMAND_WINDOW_DAYS))
    assert result["hit_rate_static_top_n"] > static_hits(len(days))


def test_string_keys_replay_like_the_integers_they_stand_for():
    # Zero-padded names sort like their numbers, so even the selection's "ties by key" agree.
    rng = np.random.default_rng(8)
    days = [np.minimum(rng.zipf(1.3, 1500), 500) for _ in range(4)]
    named = [np.array([f"ad:{k:06d}" for k in day.tolist()], dtype=object) for day in days]
    for top_n, capacity in [(0, 5), (10, 30), (50, 50)]:
        assert replay(named, top_n=top_n, capacity=capacity) == replay(days, top_n=top_n, capacity=capacity)


def test_ours_reduces_to_lru_and_to_static_at_the_extremes():
    rng = np.random.default_rng(4)
    days = [np.minimum(rng.zipf(1.1, 1500), 400) for _ in range(3)]
    no_precompute = replay(days, top_n=0, capacity=30)
    assert no_precompute["hit_rate_ours"] == no_precompute["hit_rate_lru"]
    all_precompute = replay(days, top_n=30, capacity=30)
    assert all_precompute["hit_rate_ours"] == all_precompute["hit_rate_static_top_n"]


def test_invalid_arguments():
    with pytest.raises(ValueError, match="top_n"):
        replay(days_of([1], [1]), top_n=3, capacity=2)
    with pytest.raises(ValueError):
        replay(days_of([1], [1]), top_n=0, capacity=0)
    with pytest.raises(ValueError):
        replay([], top_n=0, capacity=1)


# --- classic Belady against independent implementations --------------------------------------------------


def naive_belady_hits(days: list[list], capacity: int) -> int:
    """Classic MIN the slow, obvious way: a list of cached keys and a forward scan for each next request."""
    requests = [key for day in days for key in day]
    counted_from = len(days[0])
    cached: list = []
    hits = 0
    for i, key in enumerate(requests):
        if key in cached:
            hits += i >= counted_from
            continue
        if len(cached) == capacity:
            later = requests[i + 1 :]
            cached.remove(max(cached, key=lambda k: later.index(k) if k in later else len(later)))
        cached.append(key)
    return hits


def random_days(rng: np.random.Generator, *, strings: bool) -> list[list]:
    """2-5 days over a small pool of keys that repeat, mixed with one-off keys that are never seen again."""
    pool, fresh = int(rng.integers(2, 9)), itertools.count(1000)
    days = []
    for _ in range(int(rng.integers(2, 6))):
        size = int(rng.integers(0, 25))
        day = [int(rng.integers(0, pool)) if rng.random() < 0.75 else next(fresh) for _ in range(size)]
        days.append([f"k{key}" for key in day] if strings else day)
    return days


@pytest.mark.parametrize("seed", range(8))
def test_belady_equals_a_naive_implementation(seed: int):
    rng = np.random.default_rng(seed)
    for trial in range(60):
        days = random_days(rng, strings=trial % 2 == 1)
        capacity = int(rng.integers(1, 6))
        expected = naive_belady_hits(days, capacity)
        arrays = [np.array(day, dtype=object if trial % 2 else np.int64) for day in days]
        assert belady_hits(arrays, capacity) == expected, (days, capacity)
        if sum(len(day) for day in days[1:]):
            assert hits(replay(arrays, top_n=0, capacity=capacity), "hit_rate_belady") == expected


def best_demand_paging_hits(requests: list, capacity: int, *, counted_from: int = 0) -> int:
    """Exhaustive search over every demand-paging cache: a missed key is admitted, evicting any cached key.

    Hits count at request positions >= ``counted_from``.
    """

    @cache
    def best(i: int, held: frozenset) -> int:
        if i == len(requests):
            return 0
        key = requests[i]
        if key in held:
            return int(i >= counted_from) + best(i + 1, held)
        if len(held) < capacity:
            return best(i + 1, held | {key})
        return max(best(i + 1, held - {victim} | {key}) for victim in held)

    return best(0, frozenset())


def tiny_traces(seed: int, count: int) -> list[tuple[list[list[int]], int]]:
    rng = np.random.default_rng(seed)
    traces = []
    for _ in range(count):
        keys = int(rng.integers(2, 6))
        days = [rng.integers(0, keys, int(rng.integers(0, 5))).tolist() for _ in range(int(rng.integers(2, 4)))]
        traces.append((days, int(rng.integers(1, 4))))
    return traces


def test_no_demand_paging_cache_beats_belady_over_a_whole_trace():
    for days, capacity in tiny_traces(12, 300):
        requests = [key for day in days for key in day]
        # An empty day 0 makes every request count.
        assert belady_hits([[], *map(np.array, days)], capacity) == best_demand_paging_hits(requests, capacity)


def test_after_warm_up_belady_is_within_capacity_minus_one_of_any_demand_paging_cache():
    """MIN also spends day 0 well, so from day 1 on a cache that gave up day-0 hits can do slightly better.

    It can start day 1 in a better state, but only by the keys in which the states differ; the request that
    ends day 0 is cached in both, so at most ``capacity - 1`` hits.
    """
    for days, capacity in tiny_traces(13, 300):
        requests = [key for day in days for key in day]
        best = best_demand_paging_hits(requests, capacity, counted_from=len(days[0]))
        ours = belady_hits([np.array(day) for day in days], capacity)
        assert ours <= best <= ours + capacity - 1, (days, capacity)


def test_warm_up_can_cost_belady_a_hit_on_day_1():
    # Capacity 2, day 0 "a b c a", day 1 "b". MIN keeps a at c (needed at 3, b only at 4), so b misses on
    # day 1. Evicting a instead costs the day-0 hit on a, then a evicts c and b hits on day 1.
    a, b, c = 1, 2, 3
    days = [[a, b, c, a], [b]]
    assert belady_hits([np.array(day) for day in days], 2) == 0
    assert best_demand_paging_hits([a, b, c, a, b], 2, counted_from=4) == 1


# --- the oracle-preload bound ----------------------------------------------------------------------------


def best_possible_hits(days: list[list[int]], capacity: int, *, reload: bool = True) -> int:
    """Exhaustive search over every read-through policy: on each request keep any subset of cache + key.

    With ``reload``, at each day boundary the cache may also become any set of ``capacity`` keys.
    Hits count on days >= 1 only.
    """
    requests = [(d, key) for d, day in enumerate(days) for key in day]
    universe = sorted({key for _, key in requests})

    def subsets(keys: frozenset | list) -> list[frozenset]:
        keys = sorted(keys)
        sizes = range(min(capacity, len(keys)) + 1)
        return [frozenset(c) for r in sizes for c in itertools.combinations(keys, r)]

    everything = subsets(universe)

    @cache
    def best(i: int, held: frozenset) -> int:
        if i == len(requests):
            return 0
        day, key = requests[i]
        starts = everything if reload and (i == 0 or requests[i - 1][0] != day) else [held]
        return max(
            int(key in start and day > 0) + max(best(i + 1, after) for after in subsets(start | {key}))
            for start in starts
        )

    return best(0, frozenset())


def test_oracle_preload_is_optimal_by_exhaustive_search():
    rng = np.random.default_rng(11)
    for _ in range(150):
        capacity = int(rng.integers(1, 3))
        days = [rng.integers(0, int(rng.integers(2, 5)), int(rng.integers(1, 5))).tolist() for _ in range(3)]
        result = replay([np.array(day) for day in days], top_n=0, capacity=capacity)
        assert hits(result, "hit_rate_oracle_preload") == best_possible_hits(days, capacity), (days, capacity)


def test_day_boundary_preload_beats_classic_belady():
    """Why the precompute bound needs the free reload: ours beats the best cache that only loads on misses."""
    a, b, c = 1, 2, 3
    days = [[a, a, a], [b] * 6 + [a] + [c] * 4 + [a], [b, c]]
    result = replay([np.array(day) for day in days], top_n=1, capacity=2)
    demand_paging_optimum = best_possible_hits(days, 2, reload=False)
    assert demand_paging_optimum == 11
    assert hits(result, "hit_rate_belady") == 11
    assert hits(result, "hit_rate_ours") == 12
    assert hits(result, "hit_rate_oracle_preload") == best_possible_hits(days, 2) == 13


def random_traces() -> list[tuple[str, list[np.ndarray]]]:
    rng = np.random.default_rng(5)
    zipf = [np.minimum(rng.zipf(1.05, 3000), 2000) for _ in range(4)]
    drifting = [np.minimum(rng.zipf(1.2, 3000), 500) + 37 * d for d in range(5)]
    uniform = [rng.integers(0, 300, 2000) for _ in range(3)]
    scans = [np.tile(np.arange(d * 10, d * 10 + 60), 20) for d in range(3)]
    bursts = [np.repeat(rng.integers(0, 100, 200), rng.integers(1, 6, 200)) for _ in range(4)]
    tiny = [rng.integers(0, 4, 12) for _ in range(3)]
    return [
        ("zipf", zipf), ("drifting", drifting), ("uniform", uniform),
        ("scans", scans), ("bursts", bursts), ("tiny", tiny),
    ]  # fmt: skip


@pytest.mark.parametrize(("name", "days"), random_traces(), ids=lambda v: v if isinstance(v, str) else "")
@pytest.mark.parametrize(("top_n", "capacity"), [(0, 1), (1, 1), (1, 2), (5, 20), (20, 50), (100, 100)])
def test_rates_against_the_two_bounds(name: str, days: list[np.ndarray], top_n: int, capacity: int):
    result = replay(days, top_n=top_n, capacity=capacity)
    assert result["requests"] == sum(len(day) for day in days[1:])
    # No policy with ``capacity`` slots, precomputing or not, beats the oracle that reloads at each boundary;
    # classic Belady is itself such a policy.
    for rate in (*POLICIES, "hit_rate_belady"):
        assert 0.0 <= result[rate] <= result["hit_rate_oracle_preload"] <= 1.0, (rate, result)
    # LRU is a read-through policy, which classic Belady bounds (up to capacity - 1 hits after warm-up, see
    # above; none on these traces).
    assert result["hit_rate_lru"] <= result["hit_rate_belady"], result
    # Ours serves every precomputed hit static top-N gets, and more from its LRU.
    assert result["hit_rate_ours"] >= result["hit_rate_static_top_n"]


# --- warm-up days and given precomputed sets -------------------------------------------------------------


def merged_warm_up(days: list[np.ndarray], warmup_days: int) -> list[np.ndarray]:
    """The same trace with its first ``warmup_days`` days as one warm-up day."""
    return [np.concatenate(days[:warmup_days]), *days[warmup_days:]]


def test_one_warm_up_day_is_the_default():
    for _, days in random_traces():
        for top_n, capacity in [(0, 5), (5, 20)]:
            default = replay(days, top_n=top_n, capacity=capacity)
            assert replay(days, top_n=top_n, capacity=capacity, warmup_days=1) == default
            assert belady_hits(days, capacity, warmup_days=1) == belady_hits(days, capacity)


@pytest.mark.parametrize(("name", "days"), random_traces(), ids=lambda v: v if isinstance(v, str) else "")
def test_lru_and_the_bounds_do_not_care_how_the_warm_up_is_split_into_days(name: str, days: list[np.ndarray]):
    """LRU and Belady carry one cache through every request; the oracle's reload erases the warm-up anyway."""
    for warmup_days in range(1, len(days)):
        for top_n, capacity in [(0, 1), (0, 7), (5, 20)]:
            split = replay(days, top_n=top_n, capacity=capacity, warmup_days=warmup_days)
            merged = replay(merged_warm_up(days, warmup_days), top_n=top_n, capacity=capacity)
            for key in (*READ_THROUGH, "hit_rate_belady", "hit_rate_oracle_preload", "requests"):
                assert split[key] == merged[key], (warmup_days, top_n, capacity, key)
            if top_n == 0:  # nothing precomputed: ours is the LRU
                assert split["hit_rate_ours"] == split["hit_rate_lru"]
            # Up to capacity - 1 hits of slack after the warm-up (see above); none on these traces.
            assert split["hit_rate_lru"] <= split["hit_rate_belady"] <= split["hit_rate_oracle_preload"]


def test_belady_warm_up_against_the_naive_implementation():
    rng = np.random.default_rng(21)
    for _ in range(200):
        days = random_days(rng, strings=False)
        capacity = int(rng.integers(1, 6))
        for warmup_days in range(len(days) + 1):
            expected = naive_belady_hits([sum(days[:warmup_days], []), *days[warmup_days:]], capacity)
            assert belady_hits([np.array(day) for day in days], capacity, warmup_days=warmup_days) == expected


def test_a_split_warm_up_changes_the_selection_of_static_top_n_and_ours():
    # Recency weighting: split, day 1 (b, b) outweighs day 0 (a, a) and b is selected for day 2; as one warm-up
    # day, a and b tie and a wins by key.
    a, b = 1, 2
    days = days_of([a, a], [b, b], [b])
    split = replay(days, top_n=1, capacity=1, warmup_days=2)
    merged = replay(merged_warm_up(days, 2), top_n=1, capacity=1)
    assert (split["hit_rate_static_top_n"], merged["hit_rate_static_top_n"]) == (1.0, 0.0)
    assert (split["hit_rate_ours"], merged["hit_rate_ours"]) == (1.0, 0.0)  # top_n == capacity: ours is static
    assert split["hit_rate_lru"] == merged["hit_rate_lru"] == 1.0


def test_ours_warm_up_depends_on_its_days_even_with_the_same_given_set():
    # Ours' LRU (1 slot) only sees what the day's precomputed set misses. Split, day 1 precomputes a (day 0's
    # top key), so the LRU keeps b and b hits on day 2; merged, nothing is precomputed and a evicts b.
    a, b, c = 1, 2, 3
    days = days_of([a], [b, a], [b])
    split = replay(days, top_n=1, capacity=2, warmup_days=2, precomputed=[{c}])
    merged = replay(merged_warm_up(days, 2), top_n=1, capacity=2, precomputed=[{c}])
    assert (split["hit_rate_ours"], merged["hit_rate_ours"]) == (1.0, 0.0)
    assert split["hit_rate_static_top_n"] == merged["hit_rate_static_top_n"] == 0.0  # same set on day 2


def test_given_precomputed_sets_replace_the_selection_on_counted_days():
    rng = np.random.default_rng(6)
    days = [np.array([f"ad{k:04d}" for k in np.minimum(rng.zipf(1.2, 2000), 300)], dtype=object) for _ in range(4)]
    selected = [
        set(select_top(ad_demand([daily_counts(day) for day in days[max(0, d - DEMAND_WINDOW_DAYS) : d]]), 20))
        for d in range(2, len(days))
    ]
    # The sets the selection would choose give the same result as choosing them inside.
    assert replay(days, top_n=20, capacity=50, warmup_days=2, precomputed=selected) == replay(
        days, top_n=20, capacity=50, warmup_days=2
    )
    # Any other set: static top-N serves exactly the requests for it; unknown keys take a slot and serve nothing.
    given = [{"ad0001", "ad0002", "never-asked"}, set()]
    result = replay(days, top_n=20, capacity=50, warmup_days=2, precomputed=given)
    expected = sum(np.isin(day, list(chosen)).sum() for day, chosen in zip(days[2:], given, strict=True))
    assert hits(result, "hit_rate_static_top_n") == expected
    assert result["hit_rate_ours"] >= result["hit_rate_static_top_n"]
    # Ours still has only capacity - top_n LRU slots, however small the given set.
    assert replay(days, top_n=20, capacity=20, warmup_days=2, precomputed=[set(), set()])["hit_rate_ours"] == 0.0


def test_invalid_warm_up_and_precomputed_sets():
    days = days_of([1], [2], [1, 2])
    for warmup_days in (0, -1, 3, 4):
        with pytest.raises(ValueError, match="warmup_days"):
            replay(days, top_n=1, capacity=2, warmup_days=warmup_days)
    with pytest.raises(ValueError, match="warmup_days"):
        replay(days_of([1]), top_n=0, capacity=1, warmup_days=2)
    with pytest.raises(ValueError, match="warmup_days"):
        belady_hits(days, 2, warmup_days=4)
    with pytest.raises(ValueError, match="2 sets for 1 counted days"):
        replay(days, top_n=1, capacity=2, warmup_days=2, precomputed=[{1}, {2}])
    with pytest.raises(ValueError, match="exceeds top_n"):
        replay(days, top_n=1, capacity=2, warmup_days=2, precomputed=[{1, 2}])
    assert replay(days, top_n=1, capacity=2, warmup_days=2, precomputed=[{2}])["hit_rate_static_top_n"] == 0.5


# --- S3-FIFO and ARC against naive implementations --------------------------------------------------------


def naive_s3fifo_hits(days: list[list], capacity: int, *, warmup_days: int = 1) -> int:
    """S3-FIFO from the SOSP'23 paper's pseudocode, with lists of ``[key, freq]`` entries, oldest first."""
    requests = [key for day in days for key in day]
    counted_from = sum(len(day) for day in days[:warmup_days])
    small_max = max(1, capacity // 10)  # 10% of the cache, at least one key
    main_max = capacity - small_max
    small: list[list] = []
    main: list[list] = []
    ghost: list = []  # as many keys as main holds

    def evict_main() -> None:
        while main:
            entry = main.pop(0)
            if entry[1] > 0:
                entry[1] -= 1
                main.append(entry)
            else:
                return

    def evict_small() -> None:
        while small:
            entry = small.pop(0)
            if entry[1] >= 1:  # requested while in the small FIFO
                main.append(entry)
                if len(main) > main_max:
                    evict_main()
            else:
                ghost.append(entry[0])
                del ghost[: max(0, len(ghost) - main_max)]
                return

    hits = 0
    for i, key in enumerate(requests):
        found = [entry for entry in small + main if entry[0] == key]
        if found:
            hits += i >= counted_from
            found[0][1] = min(found[0][1] + 1, 3)
            continue
        while len(small) + len(main) >= capacity:
            if len(small) >= small_max or not main:
                evict_small()
            else:
                evict_main()
        if key in ghost:
            ghost.remove(key)
            main.append([key, 0])
        else:
            small.append([key, 0])
        assert len(small) + len(main) <= capacity and len(ghost) <= main_max
        assert len({entry[0] for entry in small + main} | set(ghost)) == len(small) + len(main) + len(ghost)
    return hits


def naive_arc_hits(days: list[list], c: int, *, warmup_days: int = 1) -> int:
    """ARC as Figure 4 of Megiddo and Modha (FAST'03) states it, with lists, least recent first."""
    requests = [key for day in days for key in day]
    counted_from = sum(len(day) for day in days[:warmup_days])
    t1: list = []
    t2: list = []
    b1: list = []
    b2: list = []
    p = 0

    def replace(x) -> None:
        if len(t1) >= 1 and ((x in b2 and len(t1) == p) or len(t1) > p):
            b1.append(t1.pop(0))
        else:
            b2.append(t2.pop(0))

    hits = 0
    for i, x in enumerate(requests):
        if x in t1 or x in t2:  # case I
            hits += i >= counted_from
            (t1 if x in t1 else t2).remove(x)
            t2.append(x)
        elif x in b1:  # case II
            p = min(c, p + max(len(b2) / len(b1), 1))
            replace(x)
            b1.remove(x)
            t2.append(x)
        elif x in b2:  # case III
            p = max(0, p - max(len(b1) / len(b2), 1))
            replace(x)
            b2.remove(x)
            t2.append(x)
        else:  # case IV
            if len(t1) + len(b1) == c:  # case A
                if len(t1) < c:
                    b1.pop(0)
                    replace(x)
                else:
                    t1.pop(0)
            elif len(t1) + len(b1) < c and len(t1) + len(t2) + len(b1) + len(b2) >= c:  # case B
                if len(t1) + len(t2) + len(b1) + len(b2) == 2 * c:
                    b2.pop(0)
                replace(x)
            t1.append(x)
        # The paper's invariants.
        assert len(t1) + len(t2) <= c and len(t1) + len(b1) <= c and len(t1) + len(t2) + len(b1) + len(b2) <= 2 * c
        assert 0 <= p <= c
    return hits


def policy_days(rng: np.random.Generator, *, strings: bool) -> list[list]:
    """2-4 days of a hot pool, a warm pool, loops and one-off keys, in mixes that shift from day to day."""
    hot, warm, fresh = int(rng.integers(2, 12)), int(rng.integers(10, 80)), itertools.count(10_000)
    days = []
    for _ in range(int(rng.integers(2, 5))):
        size, mix = int(rng.integers(0, 300)), rng.dirichlet([1.0, 1.0, 1.0, 0.5])
        day: list[int] = []
        while len(day) < size:
            kind = int(rng.choice(4, p=mix))
            if kind == 0:
                day.append(int(rng.integers(0, hot)))
            elif kind == 1:
                day.append(100 + int(rng.integers(0, warm)))
            elif kind == 2:
                day.extend(range(500, 500 + int(rng.integers(1, 40))))  # a scan
            else:
                day.append(next(fresh))
        days.append([f"k{key}" for key in day] if strings else day)
    return days


@pytest.mark.parametrize("seed", range(6))
def test_s3fifo_and_arc_equal_naive_implementations(seed: int):
    rng = np.random.default_rng(100 + seed)
    for trial in range(25):
        days = policy_days(rng, strings=trial % 2 == 1)
        arrays = [np.array(day, dtype=object if trial % 2 else np.int64) for day in days]
        for capacity in (1, 2, 3, 7, 10, 19, 20, 45, 100):
            warmup_days = int(rng.integers(0, len(days) + 1))
            expected = naive_s3fifo_hits(days, capacity, warmup_days=warmup_days)
            assert s3fifo_hits(arrays, capacity, warmup_days=warmup_days) == expected, (days, capacity)
            expected = naive_arc_hits(days, capacity, warmup_days=warmup_days)
            assert arc_hits(arrays, capacity, warmup_days=warmup_days) == expected, (days, capacity)
            if 1 <= warmup_days < len(days):
                result = replay(arrays, top_n=0, capacity=capacity, warmup_days=warmup_days)
                assert hits(result, "hit_rate_s3fifo") == naive_s3fifo_hits(days, capacity, warmup_days=warmup_days)
                assert hits(result, "hit_rate_arc") == naive_arc_hits(days, capacity, warmup_days=warmup_days)


@pytest.mark.parametrize("seed", range(4))
def test_the_lru_replay_equals_the_admission_replay_that_admits_every_miss(seed: int):
    """``_lru_day_hits`` takes the published keys' requests out with numpy and runs its own loop: per day it gets
    what the general loop with an admission that always says yes gets, sizes per day and published sets alike."""
    rng = np.random.default_rng(300 + seed)
    for trial in range(25):
        strings = trial % 2 == 1
        days = policy_days(rng, strings=strings)
        arrays = [np.array(day, dtype=object if strings else np.int64) for day in days]
        seen = sorted({key for day in days for key in day}, key=str)
        unseen = ["never"] if strings else [-1, -2]  # published keys no request asks for still fill their slots
        published = [
            [seen[int(i)] for i in rng.choice(len(seen), size=int(rng.integers(0, 8)))] + unseen[: int(rng.integers(2))]
            for _ in days
        ]
        for precomputed in (None, published, [set(keys) for keys in published]):
            for slots in (0, 1, 3, 20, [int(rng.integers(0, 30)) for _ in days]):
                expected = _admitted_lru_day_hits(
                    arrays, slots, lambda code, position, hit: True, precomputed=precomputed
                )
                assert _lru_day_hits(arrays, slots, precomputed=precomputed) == expected, (days, slots, precomputed)


def per_request_admitted_lru(days, slots, admit, precomputed) -> tuple[list[int], list[str]]:
    """The admitted LRU tested request by request against each day's published set, in Python: the path that
    ``_admitted_lru_day_hits`` took before it cut the published requests out with numpy as the other tiers do."""
    cache: OrderedDict = OrderedDict()
    per_day, outcomes, position = [], [], 0
    for d, day in enumerate(days):
        size = slots[d] if isinstance(slots, list) else slots
        while len(cache) > size:
            cache.popitem(last=False)
        chosen = set(precomputed[d]) if precomputed is not None else set()
        day_hits = 0
        for key in day.tolist():
            if key in chosen:
                outcome = "hit"
            elif key in cache:
                admit(key, position, True)
                cache.move_to_end(key)
                outcome = "hit"
            elif admit(key, position, False) and size > 0:
                cache[key] = None
                if len(cache) > size:
                    cache.popitem(last=False)
                outcome = "admitted"
            else:
                outcome = "rejected"
            day_hits += outcome == "hit"
            outcomes.append(outcome)
            position += 1
        per_day.append(day_hits)
    return per_day, outcomes


@pytest.mark.parametrize("seed", range(3))
def test_the_admission_replay_equals_its_per_request_path(seed: int):
    """Cutting the published keys' requests out first changes no hit, outcome or admission position: with every
    policy (second_miss's markers and the sketch's counters see the trace positions), sizes per day and sets."""
    from precompute_assets.ml.replay import _admission_model
    from precompute_assets.serving.admission import FrequencySketch

    rng = np.random.default_rng(700 + seed)
    policies = [("always", None), ("second_miss", 7), ("second_miss", None), (FrequencySketch(8, 2, 2, 12), None)]
    for _ in range(10):
        days, keys = _as_codes([np.array(day, dtype=np.int64) for day in policy_days(rng, strings=False)])
        published = [rng.choice(len(keys), size=int(rng.integers(0, 8))).tolist() + [len(keys) + 1] for _ in days]
        for precomputed in (None, published):
            for slots in (0, 2, 20, [int(rng.integers(0, 30)) for _ in days]):
                for admission, window in policies:
                    model = _admission_model(admission, window, 20)
                    expected = per_request_admitted_lru(days, slots, model(keys), precomputed)
                    outcomes: list[str] = []
                    got = _admitted_lru_day_hits(days, slots, model(keys), precomputed=precomputed, outcomes=outcomes)
                    assert (got, outcomes) == expected, (admission, window, slots, precomputed)


def test_s3fifo_by_hand():
    # Capacity 4: small FIFO 1 key (its share), main 3, ghost 3. 1 is hit twice while in the small FIFO;
    # 2, 3, 4 are not. 5 finds the cache full: 1 moves to main, 2 leaves for the ghost; 6 sends 3 to the
    # ghost. 1 hits in main after the scan. 2 is remembered by the ghost and enters main (4 leaves for the
    # ghost first); 7 sends 5 to the ghost; 2 hits in main. LRU loses 1 and 2 to the scan.
    trace = [[1, 1, 1, 2, 3, 4, 5, 6, 1, 2, 7, 2]]
    assert s3fifo_hits(trace, 4, warmup_days=0) == 4
    assert naive_s3fifo_hits(trace, 4, warmup_days=0) == 4
    assert hits(replay([[], np.array(trace[0])], top_n=0, capacity=4), "hit_rate_lru") == 3
    # Capacity 10 (small 1, main 9): 1 is pushed out by ten new keys into the ghost; its second request misses
    # but enters main, where a scan of twenty new keys through the small FIFO cannot touch it. LRU gets none.
    trace = [[1, *range(100, 110), 1, *range(200, 220), 1]]
    assert s3fifo_hits(trace, 10, warmup_days=0) == 1
    assert hits(replay([[], np.array(trace[0])], top_n=0, capacity=10), "hit_rate_lru") == 0
    # Capacity 1 (small FIFO 1, main 0): still a hit when the key repeats right away.
    assert s3fifo_hits([[5, 5, 6, 5, 5]], 1, warmup_days=0) == 2


def test_arc_by_hand():
    # Capacity 2. 1 1: 1 goes to T2. 2, 3 go through T1 (2 to B1) while 1 stays in T2; 4 drops 2 from B1
    # and sends 3 to B1; 1 hits. LRU loses 1 to the three new keys.
    assert arc_hits([[1, 1, 2, 3, 4, 1]], 2, warmup_days=0) == 2
    assert hits(replay([[], np.array([1, 1, 2, 3, 4, 1])], top_n=0, capacity=2), "hit_rate_lru") == 1
    # Adaptation: 1 2 1 puts 1 in T2, 2 in T1; 3 sends 2 to B1 (|T1| = 1 > p = 0); 1 hits. 2 is in B1: p
    # rises to 1, |T1| = 1 is not above it, so T2's 1 goes to B2. 1 is then in B2: p falls to 0, |T1| = 1 > 0,
    # so 3 leaves T1 and 1 misses. Two hits where LRU gets three.
    trace = [[1, 2, 1, 3, 1, 2, 1]]
    assert arc_hits(trace, 2, warmup_days=0) == naive_arc_hits(trace, 2, warmup_days=0) == 2
    assert hits(replay([[], np.array(trace[0])], top_n=0, capacity=2), "hit_rate_lru") == 3


def test_no_read_through_policy_beats_belady_over_a_whole_trace():
    rng = np.random.default_rng(31)
    for trial in range(60):
        days = [np.array(day, dtype=np.int64) for day in policy_days(rng, strings=False)]
        for capacity in (1, 3, 10, 20, 64):
            best = belady_hits(days, capacity, warmup_days=0)
            assert s3fifo_hits(days, capacity, warmup_days=0) <= best, (trial, capacity)
            assert arc_hits(days, capacity, warmup_days=0) <= best, (trial, capacity)
    for days, capacity in tiny_traces(14, 200):
        arrays = [np.array(day, dtype=np.int64) for day in days]
        best = best_demand_paging_hits([key for day in days for key in day], capacity)
        assert s3fifo_hits(arrays, capacity, warmup_days=0) <= best
        assert arc_hits(arrays, capacity, warmup_days=0) <= best


def test_s3fifo_and_arc_with_room_for_every_key_miss_only_first_requests():
    days = [np.random.default_rng(2).integers(0, 40, 300) for _ in range(3)]
    first_requests = len(np.unique(np.concatenate(days)))
    for capacity in (40, 100):
        assert s3fifo_hits(days, capacity, warmup_days=0) == 900 - first_requests
        assert arc_hits(days, capacity, warmup_days=0) == 900 - first_requests
    assert s3fifo_hits([], 3) == arc_hits([], 3) == 0
    with pytest.raises(ValueError, match="warmup_days"):
        s3fifo_hits(days, 3, warmup_days=4)
    with pytest.raises(ValueError, match="warmup_days"):
        arc_hits(days, 3, warmup_days=-1)


def test_a_large_trace_replays_every_policy_within_the_bounds():
    """Speed is a benchmark's business (never a wall-time assertion); this checks the rates at scale."""
    keys = np.minimum(np.random.default_rng(9).zipf(1.1, 200_000), 60_000)
    result = replay(np.array_split(keys, 8), top_n="auto", capacity=5_000)
    for rate in READ_THROUGH:
        assert 0 < result[rate] <= result["hit_rate_oracle_preload"]


# --- the self-tuned precompute share ----------------------------------------------------------------------


def reference_auto(days: list[np.ndarray], capacity: int, *, warmup_days: int = 1) -> tuple[list[int], int]:
    """Shares chosen the slow way, each from ``replay`` of only the days before it: each day's hits (a replay of the
    days up to it less one of the days before it) over read-through's (N = 0), weighing half as much as those two
    days later; the candidate with the most of them, if above read-through, but never more than one candidate above
    the day before's share, and not that step if it alone got fewer hits than read-through (then the best up to the
    day before's share); 0 once the day before's share got fewer of them than read-through. And the hits they get."""
    candidates = sorted({capacity * k // 16 for k in (0, 1, 2, 4, 8, 12)})  # never all of the capacity

    def counted(n: int, upto: int) -> int:  # candidate n's hits on the counted days before day ``upto``
        if upto <= warmup_days:
            return 0
        return hits(replay(days[:upto], top_n=n, capacity=capacity, warmup_days=warmup_days), "hit_rate_ours")

    def day_hits(n: int, e: int) -> int:  # candidate n's hits on day e
        return counted(n, e + 1) - counted(n, e)

    def best_of(ns: list[int], gain: dict[int, float]) -> int:  # the most gain above read-through, the smaller first
        above = [n for n in ns if n and gain[n] > 0]
        return min((n for n in above if gain[n] == max(gain[m] for m in above)), default=0)

    shares = [0] * len(days)
    for d in range(warmup_days + 1, len(days)):
        before = shares[d - 1]
        gain = {
            n: sum(0.5 ** ((d - 1 - e) / 2) * (day_hits(n, e) - day_hits(0, e)) for e in range(warmup_days, d))
            for n in candidates
        }
        if before and gain[before] < 0:
            continue  # the share in use got fewer hits than read-through on the weighted days: 0
        best = best_of(candidates, gain)
        step = min((n for n in candidates if n > before), default=before)
        if best <= before:
            shares[d] = best
        elif step == best or gain[step] >= 0:
            shares[d] = step
        else:
            shares[d] = best_of([n for n in candidates if n <= before], gain)
    # One LRU (a list, least recent first) whose size follows capacity - share, beside the day's top-N.
    counts = [daily_counts(day) for day in days]
    cache: list = []
    total = 0
    for d, day in enumerate(days):
        top = set(select_top(ad_demand(counts[max(0, d - DEMAND_WINDOW_DAYS) : d]), shares[d])) if d else set()
        slots = capacity - shares[d]
        cache = cache[max(0, len(cache) - slots) :] if slots else []
        for key in day.tolist():
            if key in top:
                total += d >= warmup_days
            elif key in cache:
                cache.remove(key)
                cache.append(key)
                total += d >= warmup_days
            elif slots:
                cache = [*cache, key][-slots:]
    return shares[warmup_days:], total


def drifting_days(rng: np.random.Generator, days: int = 6) -> list[np.ndarray]:
    """Skewed days whose keys are all new: yesterday's popular keys vanish today."""
    return [np.minimum(rng.zipf(1.1, 3000), 5000) + 100_000 * d for d in range(days)]


def stable_days(rng: np.random.Generator, days: int = 6) -> list[np.ndarray]:
    """Skewed days over the same keys, with many keys asked for once that push popular ones out of an LRU."""
    return [np.minimum(rng.zipf(1.1, 3000), 20_000) for _ in range(days)]


def test_auto_falls_back_to_lru_when_yesterdays_keys_vanish():
    days = drifting_days(np.random.default_rng(40))
    auto = replay(days, top_n="auto", capacity=100)
    assert auto["top_n_chosen"] == [0] * 5 and auto["top_n_mean"] == 0.0 and auto["top_n"] == "auto"
    assert auto["hit_rate_ours"] == auto["hit_rate_lru"]
    assert auto["hit_rate_static_top_n"] == 0.0
    # Here any fixed share hurts: its slots hold keys nobody asks for again.
    for top_n in (6, 25, 50):
        assert replay(days, top_n=top_n, capacity=100)["hit_rate_ours"] < auto["hit_rate_lru"]


def test_auto_precomputes_and_beats_lru_on_a_stable_skewed_trace():
    days = stable_days(np.random.default_rng(41))
    auto = replay(days, top_n="auto", capacity=100)
    assert auto["top_n_chosen"][0] == 0  # day 1 has no earlier counted day to learn from
    assert all(share > 0 for share in auto["top_n_chosen"][1:])
    assert auto["top_n_mean"] == pytest.approx(sum(auto["top_n_chosen"]) / 5)
    # The share grows a step a day (C/16, C/8, C/4...): on five days it gains 1.5 points, not the 3 it gained when
    # one day of evidence could take it to the best share at once.
    assert auto["top_n_chosen"] == sorted(auto["top_n_chosen"])
    assert auto["hit_rate_ours"] > auto["hit_rate_lru"] + 0.01
    assert auto["hit_rate_ours"] >= auto["hit_rate_static_top_n"]


@pytest.mark.parametrize("warmup_days", [1, 2])
def test_auto_equals_a_slow_reference(warmup_days: int):
    rng = np.random.default_rng(42)
    traces = [drifting_days(rng, 5), stable_days(rng, 5), *(days for _, days in random_traces())]
    # and hot sets that swap now and then, with bursts of keys asked for once: shares that lose a day but not on the
    # weighted days (h_diff27: a reference that fell to 0 after any losing day agreed on the traces above)
    swapping = []
    for _ in range(3):
        mapping, days = rng.permutation(200), []
        for _ in range(9):
            if rng.random() < 0.3:
                mapping = rng.permutation(200)
            day = mapping[(rng.zipf(1.1, 500) - 1) % 200]
            days.append(np.concatenate([day, 10_000 + rng.integers(0, 10**6, int(rng.integers(0, 100)))]))
        swapping.append(days)
    for days, capacities in [*((days, (1, 7, 50)) for days in traces), *((days, (32, 100)) for days in swapping)]:
        for capacity in capacities:
            result = replay(days, top_n="auto", capacity=capacity, warmup_days=warmup_days)
            shares, expected = reference_auto(days, capacity, warmup_days=warmup_days)
            assert result["top_n_chosen"] == shares
            assert hits(result, "hit_rate_ours") == expected


def test_auto_does_not_peek_at_the_day_it_chooses_for():
    rng = np.random.default_rng(43)
    days = stable_days(rng)
    auto = replay(days, top_n="auto", capacity=100)
    # Whatever the last day holds, the shares (the last one included) stay the same.
    for last in (drifting_days(rng, 1)[0], np.array([1] * 3000), days[0]):
        assert replay([*days[:-1], last], top_n="auto", capacity=100)["top_n_chosen"] == auto["top_n_chosen"]


@pytest.mark.parametrize(("name", "days"), random_traces(), ids=lambda v: v if isinstance(v, str) else "")
def test_auto_is_never_far_below_lru(name: str, days: list[np.ndarray]):
    for capacity in (1, 5, 20, 100):
        result = replay(days, top_n="auto", capacity=capacity)
        # A share is chosen only when it got strictly more hits than N = 0 so far; a bad day costs at most
        # the share it wrongly kept. Within noise: two points of hit rate or one request in fifty.
        assert result["hit_rate_ours"] >= result["hit_rate_lru"] - 0.02, (capacity, result)
        assert result["hit_rate_ours"] <= result["hit_rate_oracle_preload"]
        assert len(result["top_n_chosen"]) == len(days) - 1


def test_auto_arguments():
    days = days_of([1, 2], [1, 2])
    with pytest.raises(ValueError, match="integer or 'auto'"):
        replay(days, top_n="all", capacity=2)
    with pytest.raises(ValueError, match="fixed top_n"):
        replay(days, top_n="auto", capacity=2, precomputed=[{1}])
    assert replay(days_of([1]), top_n="auto", capacity=1)["top_n_chosen"] == []


# --- the `precompute replay` command ---------------------------------------------------------------------


def run_replay(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of ``precompute replay ARGS``."""
    try:
        code = main(["replay", *args])
    except SystemExit as exit_:  # argparse's own usage errors
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_prints_one_json_object_with_every_rate(tmp_path: Path, capsys: pytest.CaptureFixture):
    keys = np.minimum(np.random.default_rng(0).zipf(1.3, 4000), 500)
    trace = write(tmp_path, "\n".join(f"user:{k}/feed" for k in keys.tolist()) + "\n")
    code, out, err = run_replay(capsys, "--trace", str(trace), "--days", "4", "--top-n", "20", "--capacity", "60")
    assert (code, err) == (0, "")
    result = json.loads(out)
    assert set(RATES) <= set(result)
    assert result["requests"] == 3000 and result["days"] == 4 and result["trace"] == str(trace)
    assert 0 < result["hit_rate_lru"] <= result["hit_rate_belady"] <= result["hit_rate_oracle_preload"] <= 1


def bad_inputs(tmp_path: Path) -> list[tuple[list[str], str]]:
    good = write(tmp_path, "1\n2\n3\n1\n")
    (tmp_path / "bad.txt").write_text("a\nb c\n")
    (tmp_path / "folder").mkdir()

    def with_(days: str = "2", top_n: str = "1", capacity: str = "2", trace: Path = good) -> list[str]:
        return ["--trace", str(trace), "--days", days, "--top-n", top_n, "--capacity", capacity]

    return [
        (with_(trace=tmp_path / "missing.txt"), "missing.txt: No such file or directory"),
        (with_(trace=tmp_path / "folder"), "folder: the folder holds no .parquet file"),
        (with_(trace=tmp_path / "bad.txt"), "bad.txt: line 2: key 'b c' contains whitespace"),
        (with_(days="1"), "--days must be at least 2"),
        (with_(days="0"), "--days must be at least 2"),
        (with_(days="60000"), "--days 60000 is more than ten years of days: at most 3650"),
        (with_(days="5"), "--days 5 is larger than the number of requests (4)"),
        (with_(top_n="0", capacity="0"), "--capacity must be at least 1"),
        (with_(top_n="-1"), "--top-n must be at least 0"),
        (with_(top_n="5", capacity="2"), "capacity 2 is smaller than --top-n 5"),
        (with_() + ["--admission", "lfu"], "unknown --admission 'lfu': use one of always, second_miss, frequency"),
        (with_(days="two"), "--days"),  # argparse's own error
        (["--trace", str(good), "--days", "2"], "required"),
    ]


def test_cli_bad_inputs_are_one_line_and_exit_code_2(tmp_path: Path, capsys: pytest.CaptureFixture):
    for args, expected in bad_inputs(tmp_path):
        code, out, err = run_replay(capsys, *args)
        assert code == 2, (args, err)
        assert out == "" and err.count("\n") == 1 and err.startswith("precompute replay: "), (args, err)
        assert expected in err and "Traceback" not in err, (args, err)


@pytest.mark.parametrize("where", ["precompute_assets.ml.replay.parse_trace", "precompute_assets.ml.replay.replay"])
def test_cli_out_of_memory_is_one_line_and_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, where: str
):
    def exhausted(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(where, exhausted)  # a trace bigger than the machine's memory, read or replayed
    trace = write(tmp_path, "1\n2\n3\n1\n")
    code, out, err = run_replay(capsys, "--trace", str(trace), "--days", "2", "--top-n", "1", "--capacity", "2")
    assert (code, out) == (2, "") and err.count("\n") == 1 and "memory" in err and "Traceback" not in err


def test_cli_top_n_auto(tmp_path: Path, capsys: pytest.CaptureFixture):
    days = stable_days(np.random.default_rng(44), 4)
    trace = write(tmp_path, "\n".join(map(str, np.concatenate(days).tolist())) + "\n")
    code, out, err = run_replay(capsys, "--trace", str(trace), "--days", "4", "--top-n", "auto", "--capacity", "100")
    assert (code, err) == (0, "")
    result = json.loads(out)
    layout = {
        "format": "text",
        "fields": 1,
        "timestamp_field": None,
        "key_field": 1,
        "distinct_keys": len(np.unique(np.concatenate(days))),
    }
    per_day = [len(day) for day in days]
    expected = replay(days, top_n="auto", capacity=100)
    assert result == {"trace": str(trace), "trace_layout": layout, "requests_per_day": per_day, **expected}
    assert result["top_n"] == "auto" and len(result["top_n_chosen"]) == 3 and result["top_n_chosen"][0] == 0
    # Capacity is not compared with a share that is not a number; a top-N that is neither is a usage error.
    assert run_replay(capsys, "--trace", str(trace), "--days", "4", "--top-n", "AUTO", "--capacity", "1")[0] == 0
    for top_n in ("all", "1.5", ""):
        code, out, err = run_replay(capsys, "--trace", str(trace), "--days", "4", "--top-n", top_n, "--capacity", "9")
        assert code == 2 and out == "" and err.count("\n") == 1 and "--top-n" in err, (top_n, err)
        assert "expected a whole number or 'auto'" in err and err.startswith("precompute replay: "), err
    # --admission adds the live tier's rates, the share tuned on it beside the LRU's.
    args = ("--trace", str(trace), "--days", "4", "--top-n", "auto", "--capacity", "100", "--admission", "probation")
    code, out, err = run_replay(capsys, *args)
    assert (code, err) == (0, "")
    expected = replay(days, top_n="auto", capacity=100, admission="probation")
    assert json.loads(out) == {"trace": str(trace), "trace_layout": layout, "requests_per_day": per_day, **expected}
    assert {"hit_rate_ours_admission", "top_n_chosen_admission"} <= set(json.loads(out))


# --- admission of live values (the read-through half, as serving.admission decides it) ---------------------


def one_hit_wonders_days(rng: np.random.Generator, days: int = 4, per_day: int = 5000, hot: int = 120) -> list:
    """A hot working set slightly larger than the cache, interleaved with as many keys asked for only once."""
    fresh = itertools.count(1_000_000)
    return [
        np.array([next(fresh) if i % 2 else int(rng.integers(hot)) for i in range(per_day)], dtype=np.int64)
        for _ in range(days)
    ]


def test_second_miss_admission_beats_lru_on_one_hit_wonders():
    days = one_hit_wonders_days(np.random.default_rng(50))
    result = replay(days, top_n=0, capacity=100, admission="second_miss")
    assert result["admission"] == "second_miss" and result["admission_window"] == 100
    # Plain LRU keeps losing hot keys to keys never asked for again; admission keeps those out.
    assert result["hit_rate_lru_admission"] > result["hit_rate_lru"] + 0.15
    assert result["hit_rate_ours_admission"] == result["hit_rate_lru_admission"]  # top_n=0: ours is the LRU
    assert result["hit_rate_lru_admission"] <= result["hit_rate_belady"]
    with_top = replay(days, top_n=20, capacity=100, admission="second_miss", admission_window=400)
    assert with_top["hit_rate_ours_admission"] > with_top["hit_rate_ours"] + 0.15
    frequency = replay(days, top_n=0, capacity=100, admission="frequency")
    assert frequency["hit_rate_lru_admission"] > frequency["hit_rate_lru"] + 0.15


def test_admission_always_is_plain_read_through_and_leaves_every_other_key_alone():
    days = stable_days(np.random.default_rng(51), 4)
    plain = replay(days, top_n=10, capacity=60)
    assert not {key for key in plain if "admission" in key}
    always = replay(days, top_n=10, capacity=60, admission="always")
    assert always == {
        **plain,
        "hit_rate_lru_admission": plain["hit_rate_lru"],
        "hit_rate_ours_admission": plain["hit_rate_ours"],
        "admission": "always",
    }
    for policy in ("second_miss", "frequency"):
        result = replay(days, top_n="auto", capacity=60, admission=policy)
        assert {key: value for key, value in result.items() if "admission" not in key} == replay(
            days, top_n="auto", capacity=60
        )


def test_admission_decisions_by_hand():
    from precompute_assets.serving.admission import FrequencySketch

    keys = ["a", "b", "a", "a", "c", "b"]
    assert admission_decisions(keys, "always") == ["admitted", "admitted", "hit", "hit", "admitted", "hit"]
    second = ["rejected", "rejected", "admitted", "hit", "rejected", "admitted"]
    assert admission_decisions(keys, "second_miss") == second
    # A marker lives `window` requests from the lookup that set it: b's (set at 1) is gone at 5 and set anew.
    assert admission_decisions(keys, "second_miss", window=4)[5] == "rejected"
    assert admission_decisions(keys, "second_miss", window=5)[5] == "admitted"
    # One shared counter: it counts every lookup (hits too), saturates at 15, and the miss that finds the
    # sample (3 lookups) full halves it after deciding.
    shared = FrequencySketch(width=1, depth=1, threshold=3, sample_size=3)
    assert admission_decisions(["a", "b", "c", "d", "e", "f"], shared) == [
        "rejected",  # counter 1
        "rejected",  # 2
        "admitted",  # 3, then halved to 1
        "rejected",  # 2
        "admitted",  # 3
        "admitted",  # 4, then halved to 2
    ]
    # With a capacity, the LRU evicts and a key comes back as a miss that the policy judges again.
    assert admission_decisions(["a", "a", "b", "b", "a"], "second_miss", capacity=1) == [
        "rejected",
        "admitted",
        "rejected",
        "admitted",
        "admitted",
    ]


def test_probation_by_hand_and_against_lru_on_one_hit_wonders():
    from precompute_assets.serving.admission import Probation

    # Capacity 3: probation holds 1 key once the tier is full, the ghost list 2 names (the Redis test runs the
    # same trace through the real scripts).
    keys = ["a", "b", "a", "c", "d", "a", "b"]
    expected = ["admitted", "admitted", "hit", "admitted", "admitted", "hit", "admitted"]
    assert admission_decisions(keys, Probation(capacity=3)) == expected
    # Without a capacity the policy's own is used; a capacity given here wins.
    assert admission_decisions(keys, "probation") == [
        "admitted",
        "admitted",
        "hit",
        "admitted",
        "admitted",
        "hit",
        "hit",
    ]
    assert admission_decisions(keys, "probation", capacity=3) == expected

    days = one_hit_wonders_days(np.random.default_rng(52))
    result = replay(days, top_n=0, capacity=100, admission="probation")
    assert result["admission"] == "probation" and "admission_window" not in result
    # Keys asked for once pass through a tenth of the cache: far above LRU, level with S3-FIFO.
    assert result["hit_rate_lru_admission"] > result["hit_rate_lru"] + 0.15
    assert result["hit_rate_lru_admission"] >= result["hit_rate_s3fifo"] - 0.01
    assert result["hit_rate_ours_admission"] == result["hit_rate_lru_admission"]  # top_n=0
    assert result["hit_rate_lru_admission"] <= result["hit_rate_belady"]


def test_probation_tier_holds_the_capacity_less_the_keys_really_published():
    """The client sizes probation's tier by the published version's key count, not by the share: a share of 10
    with only 3 keys of history publishes 3, and the other 7 slots serve live values."""
    days = [np.array(list("abcabc"), dtype=object), np.array(list("axxxyy"), dtype=object)]
    result = replay(days, top_n=10, capacity=10, admission="probation")
    # a (published); x missed, then hit twice in probation; y missed, then hit once.
    assert result["hit_rate_ours_admission"] == pytest.approx(4 / 6)
    assert result["hit_rate_ours"] == pytest.approx(1 / 6)  # the LRU model keeps capacity - top_n slots
    # The self-tuned share weighs its candidates on the same tier.
    assert tune_share(days, 10, admission="probation").hit_rates[7] == pytest.approx(4 / 6)  # 3C/4: 3 published too
    # Given sets (what a run published) count every published key, requested in the trace or not.
    tight = replay(days, top_n=10, capacity=10, precomputed=[{"a", *"0123456789"[:9]}], admission="probation")
    assert tight["hit_rate_ours_admission"] == pytest.approx(1 / 6)  # 10 published: no live slot, only a hits


def test_auto_share_is_tuned_on_the_live_tier_it_shares_capacity_with():
    days = one_hit_wonders_days(np.random.default_rng(53), days=6)
    result = replay(days, top_n="auto", capacity=100, admission="probation")
    chosen = result["top_n_chosen_admission"]
    assert len(chosen) == 5 and chosen[0] == 0 and result["top_n_mean_admission"] == sum(chosen) / 5
    assert all(share in share_candidates(100) for share in chosen)
    # A stable hot set precomputed, one-hit wonders kept in probation: above S3-FIFO and either half alone. Below
    # ARC (0.388 against 0.404): a share never takes the whole capacity and grows a step a day, and this stable hot
    # set, larger than the cache, over five counted days is the case where all of it at once would pay (0.4178 with
    # N = C fixed). The price of a rule that does not bet the cache on a few days of evidence.
    assert result["hit_rate_ours_admission"] > result["hit_rate_s3fifo"] + 0.005
    assert result["hit_rate_ours_admission"] > max(result["hit_rate_lru_admission"], result["hit_rate_ours"])
    # The share tuned on the LRU is reported as before, beside the one tuned on the probation tier.
    assert result["top_n_chosen"] == replay(days, top_n="auto", capacity=100)["top_n_chosen"]


@pytest.mark.parametrize("admission", [None, "probation", "second_miss"])
def test_tune_share_reports_the_self_tuned_rate_out_of_sample_beside_read_through(admission):
    """The chosen share is the best candidate on the days that chose it, the recent ones weighing more (within a
    step of the last day's); the
    comparison with read-through is made with each day's share chosen from the days before it only, which is
    replay's ours with top_n="auto" on the same live tier."""
    days = one_hit_wonders_days(np.random.default_rng(54), days=6)
    choice = tune_share(days, 100, admission=admission)
    result = replay(days, top_n="auto", capacity=100, admission=admission)
    assert choice.tuned_hit_rate == result["hit_rate_ours" if admission is None else "hit_rate_ours_admission"]
    if admission is None:  # here the in-sample rate overstates what self-tuning got by points
        assert choice.hit_rates[choice.share] > choice.tuned_hit_rate + 0.03


@pytest.mark.parametrize("admission", [None, "probation", "second_miss", "frequency"])
def test_the_share_candidate_of_no_precompute_is_the_read_through_replay_reuses(admission):
    """replay replays read-through of C keys once, for its own rate and as the self-tuned share's candidate N = 0:
    with nothing precomputed the ranking cannot matter, so on every live tier the two are one replay."""
    codes, keys = _as_codes(one_hit_wonders_days(np.random.default_rng(55), days=5, per_day=1500))
    ranking = _ranked_keys(codes, limit=100, half_life_days=2.0)
    live = _lru_day_hits if admission is None else _live_tier(admission, None, 100)(keys)
    assert _candidate_day_hits(codes, 100, ranking, live)[0] == live(codes, 100)
    assert ranking[2][:10]  # the other candidates do precompute


@pytest.mark.parametrize("admission", ["probation", "second_miss"])
def test_tune_share_chooses_what_the_replay_chooses_on_the_same_live_tier(admission):
    days = one_hit_wonders_days(np.random.default_rng(54), days=6)
    result = replay(days, top_n="auto", capacity=100, admission=admission)
    # The share for the day after a history is the one the replay gives that day, from the same days before it.
    for d in range(2, len(days)):
        choice = tune_share(days[:d], 100, admission=admission)
        assert choice.share == result["top_n_chosen_admission"][d - 1]
    # The live tier is what the share is tuned on: the read-through rates differ from the LRU's.
    plain, admitted = tune_share(days, 100), tune_share(days, 100, admission=admission)
    assert admitted.hit_rates[0] > plain.hit_rates[0] + 0.1
    assert tune_share(days[:-1], 100).share == result["top_n_chosen"][-1]
    with pytest.raises(ValueError, match="unknown admission"):
        tune_share(days, 100, admission="lfu")


def test_admission_arguments():
    days = days_of([1, 2], [1, 2])
    for bad in (
        {"admission": "lfu"},
        {"admission": "second_miss", "admission_window": 0},
    ):
        with pytest.raises(ValueError):
            replay(days, top_n=0, capacity=2, **bad)
    with pytest.raises(ValueError, match="admission_window"):
        admission_decisions([1, 2], "second_miss", window=1.5)
    with pytest.raises(ValueError, match="capacity"):
        admission_decisions([1, 2], "probation", capacity=0)


def test_a_shards_sample_keeps_every_request_of_the_keys_it_keeps_and_the_same_keys_each_time():
    rng = np.random.default_rng(3)
    keys = np.array([f"user:{k}" for k in rng.integers(0, 2000, 20_000)], dtype=object)
    trace = Trace(keys=keys, timestamps=np.arange(len(keys), dtype=float), fields=2, timestamp_field=1, key_field=2)
    sample = sample_trace(trace, 0.25)
    kept = set(sample.keys)
    assert 0.15 < len(kept) / 2000 < 0.35
    in_sample = np.isin(keys, list(kept))
    assert list(sample.keys) == list(keys[in_sample])  # every request of a kept key, in order
    assert list(sample.timestamps) == list(trace.timestamps[in_sample])
    assert list(sample_trace(trace, 0.25).keys) == list(sample.keys)
    assert set(sample_trace(trace, 0.5).keys) >= kept  # a larger rate keeps a superset
    assert sample_trace(trace, 1.0) is trace
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="sample rate"):
            sample_trace(trace, bad)
    assert [sampled_size(n, 0.1) for n in (0, 1, 4, 1000)] == [0, 1, 1, 100]


def test_a_shards_sample_estimates_the_whole_traces_hit_rates_once_adjusted():
    """On skewed traffic whether the hottest key is sampled swings the raw estimate by points: the adjustment
    counts the sample's shortfall of requests as hits and brings every policy's estimate back."""
    rng = np.random.default_rng(0)
    trace = Trace(keys=np.minimum(rng.zipf(1.1, 200_000), 10**9).astype(np.int64))
    whole = replay(split_days(trace, 2), top_n=0, capacity=2000)
    sample = sample_trace(trace, 0.1)
    sampled = replay(split_days(sample, 2), top_n=0, capacity=sampled_size(2000, 0.1))
    names = ("hit_rate_lru", "hit_rate_s3fifo", "hit_rate_arc")
    raw = {name: sampled[name] for name in names}
    adjusted = shards_adjusted(raw, 0.1, sampled["requests"], whole["requests"])
    assert any(abs(raw[name] - whole[name]) > 0.05 for name in names)  # the hottest key fell out of the sample
    assert all(abs(adjusted[name] - whole[name]) < 0.02 for name in names), (adjusted, whole)
    assert shards_adjusted(raw, 0.1, 0, whole["requests"]) == raw


def test_a_shards_sample_with_more_requests_than_its_rate_never_reports_a_negative_hit_rate():
    """A surplus of requests is taken from the hits; where it exceeds them (keys asked for once, a surplus of them
    sampled) the rate is 0, never below: the adjustment once printed -0.02 for LRU on a trace of unique keys."""
    assert shards_adjusted({"hit_rate_lru": 0.0, "hit_rate_ours": 0.5}, 0.5, 110, 200) == {
        "hit_rate_lru": 0.0,
        "hit_rate_ours": pytest.approx(0.45),
    }
    days = [np.arange(d * 100_000, d * 100_000 + 20_000) for d in range(4)]  # every request a new key
    choice = tune_share(days, 1000, max_requests=5000)
    assert choice.sample_rate < 1 and choice.share == 0
    assert min(choice.hit_rates.values()) >= 0.0, choice.hit_rates


@pytest.mark.parametrize("admission", [None, "probation"])
def test_tune_share_on_a_sample_of_a_long_history_chooses_what_the_whole_history_chooses(admission):
    rng = np.random.default_rng(8)
    days = []
    for d in range(5):  # a stable Zipf hot set and 40 % keys asked for once
        hot = np.minimum(rng.zipf(1.05, 60_000), 20_000)
        days.append(np.where(rng.random(len(hot)) < 0.4, 10**7 + d * 10**6 + np.arange(len(hot)), hot))
    whole = tune_share(days, 4000, admission=admission)
    sampled = tune_share(days, 4000, admission=admission, max_requests=60_000)
    assert whole.sample_rate == 1.0 and sampled.sample_rate == pytest.approx(0.2)
    assert sampled.share == whole.share and sampled.best == whole.best > 0 and sampled.requests == whole.requests
    # through the LRU both rise to C/2 on their way to 3C/4; beside probation, C/16 and C/8 alone lose to
    # read-through, so neither rises at all (the best, 3C/4, is not taken on its own evidence through them)
    assert whole.share == (2000 if admission is None else 0)
    assert sorted(sampled.hit_rates) == share_candidates(4000)
    assert all(abs(sampled.hit_rates[n] - rate) < 0.01 for n, rate in whole.hit_rates.items())
    # A history within the bound, or a capacity too small to keep 16 keys in a sample, is replayed whole.
    assert tune_share(days, 4000, admission=admission, max_requests=300_000) == whole
    assert tune_share(days, 15, max_requests=1000).sample_rate == 1.0
    assert tune_share(days, 160, max_requests=1000).sample_rate == pytest.approx(0.1)  # 16 of 160 keys
    with pytest.raises(ValueError, match="max_requests"):
        tune_share(days, 4000, max_requests=0)


def test_tune_share_on_a_sample_that_kept_no_request_still_reports_the_whole_days_and_the_rate():
    """A SHARDS sample of a short history (a small share_max_requests) may keep no key at all: the share is 0, but
    the requests are still the whole counted days' and the rate the sample's; they read 0 requests replayed whole."""
    empty = [np.array([], dtype=object)] * 3
    choice = tune_share(empty, 400, sampled=(0.05, [100, 200, 300]))
    assert (choice.share, choice.requests, choice.sample_rate) == (0, 500, 0.05)
    assert tune_share(empty, 400) == ShareChoice(0, 400, {n: 0.0 for n in share_candidates(400)}, 0, 1.0)
    with pytest.raises(ValueError, match="sampled needs"):
        tune_share(empty, 400, sampled=(0.05, [100, 200]))
    one = [np.array(["a", "b", "a"], dtype=object)] * 3  # 5 of 100 keys: the candidates would collapse
    with pytest.raises(ValueError, match="scales capacity 100 below 16 keys"):
        tune_share(one, 100, sampled=(0.05, [100, 200, 300]))


def test_parse_trace_quarantining_cuts_each_malformed_line_and_names_it_as_numbered_in_the_file(tmp_path):
    from precompute_assets.ml.replay import parse_trace_quarantining

    good = tmp_path / "good.csv"
    good.write_text("1,a\n2,b\n")
    trace, cut = parse_trace_quarantining(good)
    assert list(trace.keys) == ["a", "b"] and cut == []
    bad = tmp_path / "bad.csv"
    bad.write_text("1,a\n\n2,b c\nxx,d\n3,e\n4,f,g\n5")
    trace, cut = parse_trace_quarantining(bad)
    assert list(trace.keys) == ["a", "e"] and list(trace.timestamps) == [1.0, 3.0]
    assert [line for line, _ in cut] == [2, 3, 4, 6, 7] and cut[0][1] == "blank line"
    with pytest.raises(TraceError, match="line 3: key 'b c' contains whitespace") as refused:  # at most 1 line cut
        parse_trace_quarantining(bad, max_malformed=1)
    assert refused.value.__notes__ == ["after 1 malformed lines were cut (at most 1)"]
    with pytest.raises(TraceError, match="line 2: blank line"):  # parse_trace itself still refuses the file
        parse_trace(bad)


def test_csv_quoted_fields_are_read_as_their_content_with_exact_keys(tmp_path):
    # A CSV writer's quotes were read as part of the key, another id than the one logged ("c""d" for c"d), and a
    # QUOTE_ALL export ("1764000000","ad1") as bare keys holding commas: a request log's import had no timestamps.
    # The replay, which needs keys distinct only, reads them verbatim (test_parse_csv_with_string_keys).
    written = tmp_path / "pandas.csv"
    pd.DataFrame({"ts": [1, 2, 3], "key": ['c"d', "plain", '"x"']}).to_csv(written, index=False)
    trace = parse_trace(written, exact_keys=True)
    assert list(trace.keys) == ['c"d', "plain", '"x"'] and trace.header == ("ts", "key")
    every = tmp_path / "every.csv"
    every.write_text('"1764000000","007"\n"1764000001","a""b"\n')
    trace = parse_trace(every, exact_keys=True)
    assert list(trace.keys) == ["007", 'a"b'] and list(trace.timestamps) == [1764000000.0, 1764000001.0]
    every.write_text('"ts","key","size"\n"1764000000","ad1","10"\n')
    assert list(parse_trace(every, columns=("ts", "key"), exact_keys=True).keys) == ["ad1"]
    bare = tmp_path / "bare.txt"  # keys only: no CSV, so quotes are part of a key
    bare.write_text('"a"\n"b",c\n')
    assert list(parse_trace(bare, exact_keys=True).keys) == ['"a"', '"b",c']
    split = tmp_path / "split.csv"  # a quoted comma cannot be split by lines: refused, never read as another key
    split.write_text('1,a\n2,"b,c"\n')
    with pytest.raises(TraceError, match="line 2: expected 2 fields"):
        parse_trace(split, exact_keys=True)


def test_replay_reads_a_quote_all_export_and_rs_write_csv(tmp_path):
    # Only the import removed a QUOTE_ALL export's quotes: replay refused it ("timestamp '"1764000000"' is not
    # numeric"), and read R's write.csv ("","ts","key" over 1,1764000000,"ad1") with the row names as timestamps and
    # the timestamps as keys: every rate 0.0, without a warning
    every = tmp_path / "every.csv"
    every.write_text('"ts","key"\r\n"1764000000","ad1"\r\n"1764000060","ad2"\r\n')
    trace = parse_trace(every)
    assert trace.keys.tolist() == ["ad1", "ad2"] and trace.timestamps.tolist() == [1764000000.0, 1764000060.0]
    r_export = tmp_path / "r.csv"
    r_export.write_text('"","ts","key"\n"1",1764000000,"ad1"\n"2",1764000060,"ad2"\n"3",1764000120,"ad1"\n')
    trace = parse_trace(r_export)
    assert trace.keys.tolist() == ["ad1", "ad2", "ad1"] and trace.timestamps.tolist()[-1] == 1764000120.0


def test_parse_trace_quarantining_cuts_lines_that_are_not_utf8(tmp_path):
    # One Latin-1 byte (a logged URL's) refused the whole request log: the import quarantines malformed lines
    from precompute_assets.ml.replay import parse_trace_quarantining

    log = tmp_path / "requests.csv"
    log.write_bytes(b"1,caf\xc3\xa9\r\n2,caf\xe9\r\n3,b\r\n4,\xff\xfe\r\n5,c\r\n")
    trace, cut = parse_trace_quarantining(log)
    assert list(trace.keys) == ["caf\u00e9", "b", "c"] and list(trace.timestamps) == [1.0, 3.0, 5.0]
    assert [line for line, _ in cut] == [2, 4] and cut[0][1].startswith("not valid UTF-8 text (Latin-1")
    log.write_bytes(b"1,a\n2,\xe9\n\n4,b\n")  # a blank line below a cut one is named as numbered in the file
    assert [line for line, _ in parse_trace_quarantining(log)[1]] == [2, 3]
    with pytest.raises(TraceError, match="line 2: not valid UTF-8") as refused:  # a binary file: too many lines
        parse_trace_quarantining(log, max_malformed=0)
    assert refused.value.__notes__ == ["after 0 malformed lines were cut (at most 0)"]
    with pytest.raises(TraceError, match="line 2: not valid UTF-8"):  # parse_trace itself still refuses the file
        parse_trace(log)


def test_parse_trace_quarantining_cuts_the_malformed_lines_of_a_piped_log():
    # The lines were cut from a second read of the file: a pipe (query-logs import /dev/stdin) had nothing left, and
    # a log of one malformed line was refused as "trace is empty"
    from precompute_assets.ml.replay import parse_trace_quarantining

    read_end, write_end = os.pipe()
    os.write(write_end, b"1,a\n2,b c\n3,\xe9\n4,d\n")
    os.close(write_end)
    try:
        trace, cut = parse_trace_quarantining(f"/dev/fd/{read_end}")
    finally:
        os.close(read_end)
    assert list(trace.keys) == ["a", "d"] and [line for line, _ in cut] == [2, 3]


def test_utf16_text_is_refused_as_such(tmp_path):
    # A PowerShell or Excel "Unicode" export was read as UTF-8: the replay named line 1 as binary, and the import cut
    # it and read NUL-interleaved lines below it as a header of column names
    from precompute_assets.ml.replay import parse_trace_quarantining

    exported = tmp_path / "requests.csv"
    exported.write_bytes("ts,key\r\n1764000000,ad1\r\n1764000001,ad2\r\n".encode("utf-16"))
    for parse in (parse_trace, parse_trace_quarantining):
        with pytest.raises(TraceError, match="^the file is UTF-16 text .*: convert it to UTF-8"):
            parse(exported)
    exported.write_bytes(codecs.BOM_UTF8 + b"1764000000,ad1\n")  # UTF-8's byte order mark is still skipped
    assert list(parse_trace(exported).keys) == ["ad1"]


def test_parse_trace_quarantining_names_the_first_problem_when_every_line_is_cut(tmp_path):
    # Binary bytes given as a request log had every line cut, and the empty rest was refused as "line 1: blank line"
    from precompute_assets.ml.replay import parse_trace_quarantining

    binary = tmp_path / "requests.csv"
    binary.write_bytes(b"\x89\xff\x01\n\x00\xfe\n\xc3(\n")
    with pytest.raises(TraceError, match=r"^no request is left: all 3 lines are malformed \(the first, line 1: not"):
        parse_trace_quarantining(binary)
    blank = tmp_path / "blank.csv"  # lines cut by the parse itself, one at a time (the blank end is no line)
    blank.write_text("\n \nb c\n\n")
    with pytest.raises(TraceError, match=r"^no request is left: all 3 lines are malformed \(the first, line 1: blank"):
        parse_trace_quarantining(blank)


def test_a_line_holding_a_nul_byte_is_malformed_not_a_key(tmp_path):
    # "b\0c" was read as a key of its own: a corrupt line's bytes replayed as one more key
    from precompute_assets.ml.replay import parse_trace_quarantining

    log = tmp_path / "requests.csv"
    log.write_bytes(b"1,a\n2,b\x00c\n3,a\n")
    with pytest.raises(TraceError, match="^line 2: a NUL byte, which text never holds .a binary trace"):
        parse_trace(log)
    log.write_bytes(b"1,a\n2,b\x00c\n3,a\n4,\x00\n5,caf\xe9\n6,b\n")  # cut with the lines that are not UTF-8
    trace, cut = parse_trace_quarantining(log)
    assert list(trace.keys) == ["a", "a", "b"] and list(trace.timestamps) == [1.0, 3.0, 6.0]
    assert [line for line, _ in cut] == [2, 4, 5] and cut[0][1] == cut[1][1] and "UTF-8" in cut[2][1]
    bare = tmp_path / "keys.txt"
    bare.write_bytes(b"a\nb\x00\n")
    with pytest.raises(TraceError, match="^line 2: a NUL byte"):
        parse_trace(bare)


def test_text_in_latin_1_is_told_to_be_converted_not_taken_for_a_binary_trace(tmp_path):
    # A Latin-1 log was refused, after 100 lines cut, as "not valid UTF-8 text (a binary trace? see --format)"
    from precompute_assets.ml.replay import parse_trace_quarantining

    log = tmp_path / "requests.csv"
    log.write_bytes("".join(f"{t},caf\u00e9{t % 7}\r\n" for t in range(300)).encode("latin-1"))
    convert = r"^line 1: not valid UTF-8 text \(Latin-1 or Windows-1252 text\? convert it to UTF-8, e\.g\. with iconv"
    with pytest.raises(TraceError, match=convert):
        parse_trace(log)
    with pytest.raises(TraceError, match=r"^line 101: not valid UTF-8 text \(Latin-1") as refused:
        parse_trace_quarantining(log)
    assert refused.value.__notes__ == ["after 100 malformed lines were cut (at most 100)"]
    binary = tmp_path / "records.bin"  # control characters beside the bytes that are not UTF-8: binary records
    binary.write_bytes(oracle_general([(12, 2**40 + 7, 4096, 2), (13, 2**63 + 5, 512, -1)]))
    with pytest.raises(TraceError, match=r"^line 1: not valid UTF-8 text \(a binary trace\? see --format\)$"):
        parse_trace(binary)


def test_json_lines_are_refused_as_such_not_read_as_a_header(tmp_path):
    # The first JSON object was taken for a header of names ('{"ts": 1764547200', ' "key": "a"}'): the error named
    # line 2's timestamp '{"ts": 1764547201' as not numeric and told to choose fields by the header's names
    from precompute_assets.ml.replay import parse_trace_quarantining

    log = write(tmp_path, '{"ts": 1764547200, "key": "a"}\n{"ts": 1764547201, "key": "b"}\n')
    for parse in (parse_trace, parse_trace_quarantining):
        with pytest.raises(TraceError, match=r"^line 1 is a JSON object: JSON lines are no trace format; .* jq -r"):
            parse(log)
    assert parse_trace(write(tmp_path, "{user1}\n{user2}\n{user1}\n")).keys.tolist() == [
        "{user1}",
        "{user2}",
        "{user1}",
    ]


def test_zip_and_tar_archives_are_refused_as_archives_not_as_binary_traces(tmp_path):
    # Read as text, a zipped CSV was "not valid UTF-8 text (a binary trace? see --format)": no --format reads it
    import tarfile
    import zipfile

    from precompute_assets.ml.replay import parse_trace_quarantining

    csv_file = write(tmp_path, "1764547200,ad1\n1764547260,ad2\n")
    with zipfile.ZipFile(tmp_path / "trace.csv.zip", "w") as archive:
        archive.write(csv_file, "trace.csv")
    with tarfile.open(tmp_path / "trace.tar.gz", "w:gz") as archive:
        archive.add(csv_file, "trace.csv")
    for name, kind, command in (("trace.csv.zip", "zip", "unzip -p FILE"), ("trace.tar.gz", "tar", "tar -xOf FILE")):
        for parse in (parse_trace, parse_trace_quarantining):
            with pytest.raises(TraceError) as refused:
                parse(tmp_path / name)
            assert str(refused.value) == (
                f"the file is a {kind} archive, not a trace: extract the trace from it ({command} writes it to "
                "standard output, which a trace named - reads)"
            )


def test_a_compressed_trace_without_its_suffix_is_named_as_compressed(tmp_path):
    # A .gz saved as trace.csv (or piped in undecompressed) was "not valid UTF-8 text (a binary trace? see --format)",
    # and a request-log import first cut 100 of its "lines" as malformed
    import bz2
    import gzip

    from precompute_assets.ml.replay import parse_trace_quarantining

    text = b"1764547200,ad1\n1764547260,ad2\n"
    for codec, compress, suffix, command in (
        ("gzip", gzip.compress, ".gz", "gzip -dc"),
        ("bzip2", bz2.compress, ".bz2", "bzip2 -dc"),
        ("xz", lzma.compress, ".xz", "xz -dc"),
    ):
        (tmp_path / "trace.csv").write_bytes(compress(text))
        for parse in (parse_trace, parse_trace_quarantining):
            with pytest.raises(TraceError) as refused:
                parse(tmp_path / "trace.csv")
            assert str(refused.value) == (
                f"the trace is {codec}-compressed: decompress it ({command} FILE | ... --trace -), or name the file "
                f"*{suffix}"
            )
        (tmp_path / f"trace.csv{suffix}").write_bytes(compress(text))  # named so, it reads
        assert parse_trace(tmp_path / f"trace.csv{suffix}").keys.tolist() == ["ad1", "ad2"]


_NOT_MONITOR_LINE = 'not a Redis MONITOR line (TIME [DB CLIENT] "COMMAND" "ARG"...): cut off, or a line of another log?'


# What `redis-cli monitor > log` wrote from a Redis 7.0 whose clients set, got, hgot and mgot keys, over TCP, a Unix
# socket and a Lua script (a password given: Redis redacts AUTH's, older servers and other ones need not)
MONITOR_LOG = r"""OK
1796490954.632985 [0 127.0.0.1:41834] "AUTH" "hunter2"
1796490954.633053 [0 127.0.0.1:41834] "set" "ad:42" "v"
1796490954.637555 [0 127.0.0.1:41848] "GET" "ad:42"
1796490954.641737 [0 127.0.0.1:41852] "HGET" "ctr:v1" "42"
1796490954.645879 [0 [::1]:41862] "MGET" "a" "b" "c d"
1796490954.651324 [0 127.0.0.1:41868] "COMMAND" "DOCS"
1796490954.653688 [0 127.0.0.1:41868] "GET" "q\"x\\y"
1796490954.658377 [0 127.0.0.1:41870] "get" "caf\xc3\xa9\tn"
1796490954.662409 [3 unix:/tmp/redis.sock] "SELECT" "3"
1796490954.662466 [3 unix:/tmp/redis.sock] "ping"
1796490954.666504 [0 unix:/tmp/redis.sock] "eval" "return redis.call('get','ad:42')" "0"
1796490954.666536 [0 lua] "get" "ad:42"
OK
1796490955.000001 [0 127.0.0.1:41890] "INFO"
1796490955.500000 [0 127.0.0.1:41890] "GET" "ad:7"
1796490955.600000 [0 127.0.0.1:41890] "EXISTS" "ad:7" "ad:9"
1796490955.700000 [0 127.0.0.1:41890] "DEL" "ad:7"
"""


def test_redis_monitor_output_is_read_as_time_and_key(tmp_path: Path):
    # It was read as whitespace-separated fields whose key was "[0" (a note: every request of one key), or, below its
    # first line OK, refused quoting the AUTH line
    trace = parse_trace(write(tmp_path, MONITOR_LOG))
    # Reads only: the SET that fills ad:42 would count as a request, and the GET after it as a hit
    asked = ["ad:42", "ctr:v1", "a", "b", "c d", 'q"x\\y', "caf\u00e9\tn", "ad:42", "ad:7", "ad:7", "ad:9"]
    assert trace.keys.tolist() == asked
    stamps = trace.timestamps.tolist()
    assert stamps[:3] == [1796490954.637555, 1796490954.641737, 1796490954.645879]
    assert stamps[2:5] == [1796490954.645879] * 3 and stamps[-3] == 1796490955.5  # each key MGET asked for
    layout = trace.layout()
    assert layout["format"] == "redis-monitor" and (layout["timestamp_field"], layout["key_field"]) == (1, 5)
    assert layout["skipped_commands"] == {
        "AUTH": 1,
        "COMMAND": 1,
        "EVAL": 1,
        "INFO": 1,
        "PING": 1,
        "SELECT": 1,
        "SET": 1,
        "DEL": 1,
    }
    assert trace.dated and not any("one key" in note for note in trace_notes(trace, split_days(trace, 2)))
    assert "hunter2" not in json.dumps(layout)
    without_ok = parse_trace(write(tmp_path, MONITOR_LOG.removeprefix("OK\n")))
    assert without_ok.keys.tolist() == trace.keys.tolist()
    bare = parse_trace(write(tmp_path, "OK\nFAIL\nOK\n"))  # a trace of bare keys whose first is OK stays one
    assert bare.keys.tolist() == ["OK", "FAIL", "OK"] and bare.format == "text"


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('1796490956.1 [0 127.0.0.1:41834] "AUTH" "hunter2', "not a Redis MONITOR line"),  # cut off
        ('1796490956.1 [0 127.0.0.1:41834] "AUTH" hunter2', "not a Redis MONITOR line"),
        ('1796490956.1 [0 127.0.0.1:41834] "GET" "a\\qhunter2"', "not a Redis MONITOR line"),  # no such escape
        ("1796490956.1 ad:1", "not a Redis MONITOR line"),
        ("", "blank line"),
        ('1796490956.1 [0 127.0.0.1:41834] "GET" ""', "empty key"),
        ('1796490956.1 [0 127.0.0.1:41834] "GET" "hunter2\\xff"', "the key's bytes are not UTF-8 text"),
        ('1796490956.1 [0 127.0.0.1:41834] "MGET" "a" "hunter2\\x00"', "the key holds a NUL byte"),
    ],
)
def test_a_malformed_monitor_line_is_named_never_quoted_and_quarantined(tmp_path: Path, line: str, problem: str):
    from precompute_assets.ml.replay import parse_trace_quarantining

    path = write(tmp_path, MONITOR_LOG.replace('"ping"\n', f'"ping"\n{line}\n'))  # line 12
    with pytest.raises(TraceError, match=f"^line 12: {problem}") as refused:
        parse_trace(path)
    assert "hunter2" not in str(refused.value)
    trace, cut = parse_trace_quarantining(path)
    assert cut == [(12, str(refused.value).removeprefix("line 12: "))] and "hunter2" not in str(cut)
    assert trace.keys.tolist() == parse_trace(write(tmp_path, MONITOR_LOG)).keys.tolist()


@pytest.mark.parametrize("head", ["", "OK\n"])
def test_monitor_output_whose_first_line_is_cut_off_is_still_read_as_such(tmp_path: Path, head: str):
    # A rotated or tailed log starts mid-line: told by its first line only, it was read as a text trace whose
    # malformed-line errors quoted whole MONITOR lines, arguments and all
    from precompute_assets.ml.replay import parse_trace_quarantining

    path = write(tmp_path, head + '0.0.1:41834] "SET" "ad:1" "hunter2"\n' + MONITOR_LOG.removeprefix("OK\n"))
    trace, cut = parse_trace_quarantining(path)
    assert (
        trace.format == "redis-monitor"
        and trace.keys.tolist() == parse_trace(write(tmp_path, MONITOR_LOG)).keys.tolist()
    )
    assert cut == [(len(head) // 3 + 1, _NOT_MONITOR_LINE)] and "hunter2" not in str(cut)


def test_monitor_output_of_no_key_or_with_field_options_is_refused(tmp_path: Path):
    keyless = write(tmp_path, 'OK\n1.5 [0 127.0.0.1:1] "PING"\n2.5 [0 127.0.0.1:1] "AUTH" "hunter2"\n')
    with pytest.raises(
        TraceError, match=r"^no command of the Redis MONITOR output reads a key \(skipped: AUTH 1, PING 1"
    ):
        parse_trace(keyless)
    path = write(tmp_path, MONITOR_LOG)
    for options in ({"columns": (1, 2)}, {"where": (1, ["GET"])}):
        with pytest.raises(TraceError, match="read fields of text traces, not Redis MONITOR output's"):
            parse_trace(path, **options)


@pytest.mark.parametrize("text", ["OK", "OK\n", "OK\r\nOK\r\n"])
def test_a_monitor_capture_of_only_its_ok_reply_is_refused_not_read_as_the_key_ok(tmp_path: Path, text: str):
    with pytest.raises(TraceError, match=r"^the file holds only Redis MONITOR's reply OK: the capture ended before"):
        parse_trace(write(tmp_path, text))
    assert parse_trace(write(tmp_path, "OK\nad:1\n")).keys.tolist() == ["OK", "ad:1"]  # a bare key OK is still one


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("1700000000,user:1\n1700000001,user:2\n17000", "line 3: mixed formats"),
        ("user:1\nuser:2\nus\xc3", "line 3: not valid UTF-8 text"),
        ('OK\n1.5 [0 127.0.0.1:1] "GET" "a"\n2.5 [0 127.0.0.1:1] "GE', "line 3: "),
    ],
)
def test_a_bad_last_line_without_a_newline_says_the_file_may_be_cut_off(tmp_path: Path, text: str, problem: str):
    """A copy that stopped mid-line was refused for "mixed formats", which did not say the file looked truncated."""
    path = tmp_path / "trace.txt"
    path.write_bytes(text.encode("utf-8", "surrogateescape") if "\xc3" not in text else text.encode("latin-1"))
    with pytest.raises(TraceError, match=f"^{problem}") as refused:
        parse_trace(path)
    assert any("the file may be cut off" in note for note in refused.value.__notes__)
    for end in (b"\n", b"\n  \t"):  # the same line with its newline (and a blank line of spaces after): no such guess
        path.write_bytes(text.encode("utf-8") if "\xc3" not in text else text.encode("latin-1"))
        path.write_bytes(path.read_bytes() + end)
        with pytest.raises(TraceError, match=f"^{problem}") as refused:
            parse_trace(path)
        assert not getattr(refused.value, "__notes__", None), end


def test_replay_reads_redis_monitor_output(tmp_path: Path, capsys):
    path = write(tmp_path, MONITOR_LOG)
    assert main(["replay", "--trace", str(path), "--days", "2", "--top-n", "0", "--capacity", "2"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert result["trace_layout"]["skipped_commands"]["AUTH"] == 1 and result["trace_layout"]["distinct_keys"] == 9
    assert "one key" not in err and "hunter2" not in out + err


def test_auto_keeps_read_through_for_a_day_when_every_key_changes():
    """h_i9's trace: three days of one Zipf key set, then a new set every day. The share took the whole capacity on
    an edge of a point, and the day the keys changed it served nothing (0.758 against LRU's 0.882 over the trace).
    A share now leaves at least a quarter of the cache to read-through and grows one step a day, so the day the keys
    change costs the small share two days of evidence allowed (h_diff3: also with a flatter Zipf), and it falls to 0
    the day after. With the steeper Zipf, C/16 alone lost to read-through on the first counted day: nothing is
    precomputed on the larger shares' evidence."""
    for zipf_a in (1.3, 1.05):
        rng = np.random.default_rng(7)
        days = [
            np.array([f"{'H' if d < 3 else f'D{d}_'}{k}" for k in rng.zipf(zipf_a, 20_000) % 3000], dtype=object)
            for d in range(8)
        ]
        result = replay(days, top_n="auto", capacity=1000)
        shares = result["top_n_chosen"]
        assert shares == ([0] * 7 if zipf_a == 1.3 else [0, 62, 125, 0, 0, 0, 0]), shares  # two steps: C/16, C/8
        assert result["hit_rate_ours"] >= result["hit_rate_lru"] - 0.01, result


def test_auto_on_a_weekly_cycle_stays_level_with_lru():
    """h_diff3's trace: weekdays and weekends ask for different keys. With a one-day half-life and no ramp, the share
    came back every Friday and lost every Saturday (2.4 points under LRU over six weeks)."""
    rng = np.random.default_rng(3)
    days = [
        np.array([f"{'WE_' if d % 7 in (5, 6) else 'WD_'}{k}" for k in rng.zipf(1.05, 20_000) % 3000], dtype=object)
        for d in range(42)
    ]
    result = replay(days, top_n="auto", capacity=1000)
    assert result["hit_rate_ours"] >= result["hit_rate_lru"] - 0.01, result


def test_tune_share_rises_a_step_above_what_the_day_before_published():
    """Each day's top_ads replays a new window, whose own sequence of shares restarts: ramping from that sequence, the
    share jumped from 0 to 3C/4 overnight when an old day left the window (h_diff4). It ramps from the published one."""
    days = one_hit_wonders_days(np.random.default_rng(54), days=8)
    alone = tune_share(days, 100)
    assert alone.share == 75  # the window's own climb to 3C/4, whatever was published
    capped = tune_share(days, 100, previous_share=0)
    assert capped.share == 6  # C/16: one step above nothing published
    assert (capped.best, capped.ramped_from) == (75, 0)  # what the history chose, and what capped it (h_demand)
    assert tune_share(days, 100, previous_share=6).share == 12
    off_candidate = tune_share(days, 100, previous_share=30)
    assert off_candidate.share == 50  # 30 is no candidate: from 25, one step
    assert off_candidate.ramped_from == 30  # what the day before published, not the candidate below it (h_diff12)
    assert tune_share(days, 100, previous_share=1000).share == 75  # above the best: it falls to it at once


def test_cli_with_standard_output_closed_fails_in_one_line_rather_than_losing_the_result(tmp_path: Path):
    trace = write(tmp_path, "1\n2\n3\n1\n")
    script = "import sys; from precompute_assets.tools.cli import main; sys.exit(main())"
    args = f"replay --trace {trace} --days 2 --top-n 1 --capacity 2"
    run = subprocess.run(["bash", "-c", f'"{sys.executable}" -c "{script}" {args} >&-'], capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr == "precompute replay: standard output is closed: nowhere to write the result\n"


def test_a_key_holding_the_separator_is_named_with_what_to_do(tmp_path):
    """Some of Twitter's cache traces have keys with a comma: the whole replay stopped on "expected 7 fields ... got
    8", with nothing on what to do (h_traces)."""
    trace = tmp_path / "cluster.csv"
    trace.write_text("1,a,20,300,1,get,0\n2,b,c,20,300,1,get,0\n3,a,20,300,1,get,0\n")
    said = r"line 2: expected 7 fields as on the first line, got 8 \(a key with a comma\? keep only the lines of 7"
    with pytest.raises(TraceError, match=said + r" fields first, e.g. awk -F, 'NF==7'\)"):
        parse_trace(trace)


@pytest.mark.skipif(shutil.which("zstd") is None, reason="needs the zstd command to write a long-window frame")
def test_a_zst_file_of_a_long_window_is_not_called_invalid(tmp_path):
    """`zstd --long=31` writes valid frames whose window is larger than the reader's limit: "not a valid zst file" was
    wrong, and said nothing of what to do (h_traces)."""
    trace = tmp_path / "long.csv.zst"
    with trace.open("wb") as out:
        subprocess.run(["zstd", "-q", "--long=31", "-c"], input=b"1,a\n2,b\n3,a\n", stdout=out, check=True)
    with pytest.raises(TraceError, match=r"its zst frames need a larger window .*zstd -dc --long=31 FILE \|"):
        parse_trace(trace)


def test_the_share_does_not_ramp_through_steps_that_lose_to_read_through():
    """h_issue9b: hits over read-through per day (CloudPhysics, C = 32,000, LRU): 3C/4 won on days 3-6, so the share
    ramped a step a day through C/16 ... C/2, each of which lost, and ended 1.8 points under LRU; at C = 5,000 beside
    probation, a share chosen on day 1's evidence kept rising through losing days to 3C/4, 3.2 points under. A step
    is now taken on a larger share's evidence only if it did not lose itself, and a share whose hits over
    read-through turn negative falls to 0."""
    from precompute_assets.ml.replay import _day_shares

    def hits(gains: dict[int, list[int]]) -> dict[int, list[int]]:
        return {0: [14_000] * 8, **{n: [14_000 + g for g in day] for n, day in gains.items()}}

    lru_32000 = hits({2000: [0, 0, 0, -16, -528, -293, -249, -20], 4000: [0, 0, 0, -52, -532, -940, -285, -76],
                      8000: [0, 0, -2, -29, -533, -1392, -285, -555], 16000: [0, 0, -10, -17, 176, -246, -284, -26],
                      24000: [0, -13, 0, 48, 1093, 317, 1299, 44]})  # fmt: skip
    assert _day_shares(lru_32000, 8, 1) == [0] * 8
    probation_5000 = hits({312: [0, -53, -33, -3, 2, -274, -580, -161], 625: [0, -67, -36, -5, 1, -409, -774, -228],
                           1250: [0, -87, -53, -46, 4, -300, -1744, -294],
                           2500: [0, 242, -1, -53, 16, -150, -2378, -357],
                           3750: [0, 785, 133, -113, -35, -62, -3044, -456]})  # fmt: skip
    assert _day_shares(probation_5000, 8, 1) == [0] * 8
    # where the steps win too, the share still rises a step a day; a day that costs it more than it had gained takes
    # it back to 0, and a small loss does not (C/16 alone lost nothing that day)
    for loss, shares in ((20, [0, 0, 50, 100, 200, 0, 50, 50]), (1, [0, 0, 50, 100, 200, 400, 800, 800])):
        gains = {n: [0, 5 * k, 6 * k, 7 * k, -loss * k * (n > 50), k, k, k] for n in (50, 100, 200, 400, 800)
                 if (k := n // 50)}  # fmt: skip
        assert _day_shares(hits(gains), 8, 1) == shares, loss
