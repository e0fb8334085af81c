"""Parquet traces: the lake's own query logs and other columnar files replay like text traces."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from precompute_assets.ml.parquet_trace import is_parquet
from precompute_assets.ml.replay import TraceError, logged_hit_rate, parse_trace
from precompute_assets.storage.lake import Lake
from precompute_assets.storage.tables import query_log_frame
from precompute_assets.tools.cli import main

T0_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def logged(hour: int, keys: list[str], kinds: list[str]) -> list[dict]:
    """Query-log rows as the query_logs asset validates them: one request every second of the hour."""
    return [
        {
            "stream_id": f"{T0_MS + hour * 3_600_000 + i * 1000}-0",
            "ts_ms": T0_MS + hour * 3_600_000 + i * 1000,
            "kind": kind,
            "key": key,
            "hit": False,
            "latency_us": 50,
            "user": None,
            "tenant": None,
        }
        for i, (key, kind) in enumerate(zip(keys, kinds, strict=True))
    ]


def write_table(path: Path, columns: dict) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def test_the_lakes_query_logs_replay_as_a_trace(tmp_path: Path):
    lake = Lake(str(tmp_path / "lake"))
    for hour, keys in ((1, ["ad:2", "ad:3"]), (0, ["ad:1", "ad:2", "ad:1"])):  # written out of order
        lake.write("query_logs", f"2026-01-01-{hour:02d}:00", query_log_frame(logged(hour, keys, ["ctr"] * len(keys))))
    folder = tmp_path / "lake" / "query_logs"
    (folder / "2026-01-01-02:00.parquet.tmp-0a1b").write_bytes(b"an unfinished write is not a partition")
    trace = parse_trace(folder)
    assert is_parquet(folder) and trace.keys.tolist() == ["ad:1", "ad:2", "ad:1", "ad:2", "ad:3"]
    assert trace.timestamps.tolist() == [T0_MS / 1000 + s for s in (0, 1, 2, 3600, 3601)]
    layout = trace.layout()
    assert layout["format"] == "parquet" and (layout["timestamp_field"], layout["key_field"]) == (2, 4)
    assert layout["header"][:4] == ["stream_id", "ts", "kind", "key"] and layout["distinct_keys"] == 3
    # One kind's cache: --where on the kind column.
    mixed = tmp_path / "mixed.parquet"
    pq.write_table(pa.Table.from_pandas(query_log_frame(logged(0, ["a", "b", "a"], ["ctr", "emb", "ctr"]))), mixed)
    kept = parse_trace(mixed, where=("kind", ["ctr"]))
    assert kept.keys.tolist() == ["a", "a"] and kept.layout()["where"] == {"field": 3, "values": ["ctr"], "dropped": 1}


def test_the_query_logs_hits_give_the_hit_rate_the_client_saw_on_the_counted_days(tmp_path: Path):
    # Four days of four requests (one every 6 hours); day 0 only warms the caches, as in every replayed rate.
    hit = [True, True, True, True] + [False, True, False, False] + [True, False, True, True] + [True] * 4
    ts = pa.array([i * 6 * 3_600_000 for i in range(16)], pa.timestamp("ms", tz="UTC"))
    kind = ["ctr", "emb"] * 8
    file = write_table(
        tmp_path / "log.parquet", {"ts": ts, "kind": kind, "key": [f"k{i % 3}" for i in range(16)], "hit": hit}
    )
    trace = parse_trace(file)
    assert trace.logged_hits.tolist() == hit
    assert logged_hit_rate(trace, 4) == 8 / 12 and logged_hit_rate(trace, 4, count_from=0) == 12 / 16
    # --where keeps the hits of the rows it keeps.
    ctr = parse_trace(file, where=("kind", ["ctr"]))
    assert ctr.logged_hits.tolist() == hit[::2] and logged_hit_rate(ctr, 4) == 4 / 6
    # No logged hits without a boolean "hit" column, or with a row that has none: never a guess.
    assert (
        parse_trace(write_table(tmp_path / "n.parquet", {"ts": [1, 2], "key": ["a", "b"], "hit": [1, 0]})).logged_hits
        is None
    )
    assert (
        parse_trace(
            write_table(tmp_path / "g.parquet", {"ts": [1, 2], "key": ["a", "b"], "hit": [True, None]})
        ).logged_hits
        is None
    )
    assert logged_hit_rate(parse_trace(tmp_path / "n.parquet"), 2) is None
    # Rows --where drops (another kind's imported requests, which log no hit) do not take the kept rows' hits away.
    imported = write_table(
        tmp_path / "i.parquet",
        {"ts": [1, 2, 3], "kind": ["ctr", "emb", "ctr"], "key": ["a", "b", "a"], "hit": [False, None, True]},
    )
    assert parse_trace(imported, where=("kind", ["ctr"])).logged_hits.tolist() == [False, True]
    assert (
        parse_trace(imported).logged_hits is None and parse_trace(imported, where=("kind", ["emb"])).logged_hits is None
    )
    # A folder whose first hour was imported (its hit column all null, of Arrow type null) still logs the others'.
    folder = tmp_path / "query_logs"
    folder.mkdir()
    pq.write_table(pa.table({"ts": [1], "kind": ["emb"], "key": ["b"], "hit": pa.nulls(1)}), folder / "1.parquet")
    pq.write_table(
        pa.table({"ts": [2, 3], "kind": ["ctr", "ctr"], "key": ["a", "a"], "hit": [False, True]}), folder / "2.parquet"
    )
    assert parse_trace(folder, where=("kind", ["ctr"])).logged_hits.tolist() == [False, True]
    assert parse_trace(folder).logged_hits is None


def test_columns_by_name_or_number_and_their_types(tmp_path: Path):
    big = 2**64 - 1
    file = write_table(
        tmp_path / "t.pq",
        {
            "when": pa.array(["2026-01-01T00:00:00Z", " 2026-01-01 00:00:01+00:00", "2026-01-02"]),
            "seconds": pa.array([5, 6, 7], pa.int32()),
            "id": pa.array([1, big, 1], pa.uint64()),
            "name": pa.array(["x", "y", "x"]).dictionary_encode(),
        },
    )
    by_name = parse_trace(file, columns=("when", "id"))
    assert by_name.keys.dtype == np.int64 and by_name.keys.tolist() == [1, -1, 1]  # 2^64-1: the same bits
    start = T0_MS / 1000
    assert by_name.timestamps.tolist() == [start, start + 1, start + 86_400]
    by_number = parse_trace(file, columns=(2, 4))
    assert by_number.keys.tolist() == ["x", "y", "x"] and by_number.timestamps.tolist() == [5.0, 6.0, 7.0]
    assert parse_trace(file, columns=(None, "name")).timestamps is None
    stamps = write_table(tmp_path / "s.parquet", {"ts": pa.array([0, 1500], pa.timestamp("ms")), "key": ["a", "b"]})
    assert parse_trace(stamps).timestamps.tolist() == [0.0, 1.5]  # the defaults: ts and key
    # No .parquet suffix: Parquet's magic bytes say what it is; --format parquet says it outright.
    bare = tmp_path / "trace.bin"
    bare.write_bytes(stamps.read_bytes())
    assert is_parquet(bare) and parse_trace(bare).keys.tolist() == ["a", "b"]
    assert parse_trace(bare, trace_format="parquet").keys.tolist() == ["a", "b"]
    assert not is_parquet(tmp_path / "missing.txt")
    # A text trace whose first key merely starts with the magic bytes was read as (broken) Parquet.
    (tmp_path / "keys.txt").write_text("PAR1001\nPAR1002\nPAR1001\n")
    assert not is_parquet(tmp_path / "keys.txt")
    assert parse_trace(tmp_path / "keys.txt").keys.tolist() == ["PAR1001", "PAR1002", "PAR1001"]
    (tmp_path / "tiny.bin").write_bytes(b"PAR")
    assert not is_parquet(tmp_path / "tiny.bin")


def test_a_quarantining_read_looks_at_a_parquet_file_once_as_parse_trace_does(tmp_path: Path, monkeypatch):
    # parse_trace_quarantining sniffed the file for Parquet's magic bytes, then handed it to parse_trace, which
    # sniffed it again before reading it: one check of the format and of the file on both paths now
    from precompute_assets.ml import parquet_trace
    from precompute_assets.ml.replay import parse_trace_quarantining

    bare = tmp_path / "trace.bin"  # no suffix: only the magic bytes say Parquet
    bare.write_bytes(write_table(tmp_path / "s.parquet", {"ts": [1, 2], "key": ["a", "b"]}).read_bytes())
    sniffed: list[Path] = []
    sniff = parquet_trace.is_parquet
    monkeypatch.setattr(parquet_trace, "is_parquet", lambda path: sniffed.append(path) or sniff(path))
    for parse in (parse_trace, lambda path: parse_trace_quarantining(path)[0]):
        sniffed.clear()
        assert parse(bare).keys.tolist() == ["a", "b"] and sniffed == [bare]
    with pytest.raises(ValueError, match="trace_format must be one of"):
        parse_trace_quarantining(bare, trace_format="csv")
    with pytest.raises(TraceError, match="a URI is read as Parquet"):
        parse_trace_quarantining("s3://bucket/query_logs", trace_format="text")


def test_strings_stored_as_bytes_are_read_as_their_text(tmp_path: Path):
    # Hive, Impala and older Spark write strings without Parquet's UTF8 annotation: Arrow reads them as binary, and
    # such a table's keys were refused ("holds binary: keys are integers or strings")
    file = write_table(
        tmp_path / "hive.parquet",
        {
            "ts": pa.array([b"2026-01-01T00:00:00Z", b"2026-01-01T00:00:02Z"], pa.large_binary()),
            "key": pa.array([b"ad:\xc3\xa9", b" b "], pa.binary()),
        },
    )
    trace = parse_trace(file)
    assert trace.keys.tolist() == ["ad:\u00e9", "b"] and trace.timestamps.tolist() == [T0_MS / 1000, T0_MS / 1000 + 2]


def test_a_piped_text_trace_is_not_read_to_sniff_for_parquet(tmp_path: Path):
    # A pipe's bytes can be read once: taking some to look for Parquet's magic would lose the first requests.
    fifo = tmp_path / "trace.fifo"
    os.mkfifo(fifo)
    text = "".join(f"ad:{i:05d}\n" for i in range(20_000))
    writer = threading.Thread(target=fifo.write_text, args=(text,))
    writer.start()
    try:
        trace = parse_trace(fifo)
    finally:
        writer.join(timeout=30)
    assert trace.format == "text" and len(trace.keys) == 20_000 and trace.keys[0] == "ad:00000"


def test_a_folder_may_store_a_column_in_other_types_and_years_beyond_datetime64_ns(tmp_path: Path):
    utc_ms = pa.timestamp("ms", tz="UTC")
    write_table(tmp_path / "a.parquet", {"ts": pa.array([0, 1000], utc_ms), "key": pa.array([7, 8], pa.int64())})
    tokyo = pa.array([2_000_000, 3_000_000], pa.timestamp("us", tz="Asia/Tokyo"))  # instants: the zone is display
    write_table(tmp_path / "b.parquet", {"ts": tokyo, "key": pa.array([" x ", "y"]).dictionary_encode()})
    write_table(tmp_path / "c.parquet", {"ts": pa.array(["1500-01-01", "2500-01-01"]).dictionary_encode(),
                                         "key": pa.array([2**64 - 1, 9], pa.uint64())})  # fmt: skip
    trace = parse_trace(tmp_path)
    # String keys in one file make every key the string it is (as in a text trace); padding is stripped.
    assert trace.keys.tolist() == ["7", "8", "x", "y", "-1", "9"]
    # as the serving client gets the id (--ab, the frequency sketch hash its text; h_diff8)
    assert parse_trace(tmp_path, spelled_keys=True).keys.tolist() == ["7", "8", "x", "y", str(2**64 - 1), "9"]
    year_1500, year_2500 = -14_831_769_600.0, 16_725_225_600.0
    assert trace.timestamps.tolist() == [0.0, 1.0, 2.0, 3.0, year_1500, year_2500]


def test_a_file_without_rows_does_not_change_the_key_type_and_errors_name_a_subfolders_file(tmp_path: Path):
    write_table(tmp_path / "a.parquet", {"ts": [1, 2], "key": pa.array([7, 8], pa.int64())})
    (tmp_path / "sub").mkdir()
    write_table(tmp_path / "sub" / "b.parquet", {"ts": pa.array([], pa.int64()), "key": pa.array([], pa.string())})
    trace = parse_trace(tmp_path)
    assert trace.keys.dtype == np.int64 and trace.keys.tolist() == [7, 8]
    write_table(tmp_path / "sub" / "c.parquet", {"ts": [3], "key": pa.array([None], pa.int64())})
    with pytest.raises(TraceError, match="^sub/c.parquet row 1: the key is missing$"):
        parse_trace(tmp_path)


def test_a_uri_is_read_through_arrows_filesystems_like_the_same_local_path(tmp_path: Path):
    # The lake's base_uri may be s3://...; file:// takes the same path through pyarrow.fs here.
    write_table(tmp_path / "a.parquet", {"ts": [1, 2], "key": ["x", "y"]})
    (tmp_path / "sub").mkdir()
    write_table(tmp_path / "sub" / "b.parquet", {"ts": [3], "key": ["x"]})
    local, uri = parse_trace(tmp_path), parse_trace(tmp_path.as_uri())
    assert is_parquet(tmp_path.as_uri()) and uri.keys.tolist() == local.keys.tolist() == ["x", "y", "x"]
    assert uri.timestamps.tolist() == local.timestamps.tolist() and uri.layout() == local.layout()
    assert parse_trace((tmp_path / "sub" / "b.parquet").as_uri()).keys.tolist() == ["x"]
    write_table(tmp_path / "sub" / "c.parquet", {"ts": [4], "key": pa.array([None], pa.string())})
    with pytest.raises(TraceError, match="^sub/c.parquet row 1: the key is missing$"):
        parse_trace(tmp_path.as_uri())
    with pytest.raises(FileNotFoundError):
        parse_trace((tmp_path / "nothing").as_uri())
    with pytest.raises(TraceError, match="^not readable through Arrow's filesystems .*bogus"):
        parse_trace("bogus://bucket/lake")
    with pytest.raises(TraceError, match="^a URI is read as Parquet"):
        parse_trace(tmp_path.as_uri(), trace_format="text")


def test_a_folders_files_are_read_several_at_once_and_come_back_in_order(tmp_path: Path):
    # On object storage each file costs a round trip: reads overlap, at most READ_AHEAD at once.
    fsspec = pytest.importorskip("fsspec", reason="the slow filesystem of this test wraps fsspec's local one")
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    from precompute_assets.ml.parquet_trace import READ_AHEAD, _tables

    files = [str(write_table(tmp_path / f"{i:02d}.parquet", {"ts": [i], "key": [f"k{i}"]})) for i in range(12)]
    opened = {"now": 0, "most": 0}
    lock = threading.Lock()

    class Slow(FSSpecHandler):
        def open_input_file(self, path):
            with lock:
                opened["now"] += 1
                opened["most"] = max(opened["most"], opened["now"])
            time.sleep(0.2)  # a round trip
            with lock:
                opened["now"] -= 1
            return super().open_input_file(path)

    tables = list(_tables(files, ["key"], dict.fromkeys(files, ""), PyFileSystem(Slow(fsspec.filesystem("file")))))
    assert [table["key"][0].as_py() for table in tables] == [f"k{i}" for i in range(12)]
    assert 1 < opened["most"] <= READ_AHEAD


def bad_traces(tmp_path: Path) -> list[tuple[Path, dict, str]]:
    """(trace, parse_trace arguments, the error it must raise)."""
    good = {"ts": pa.array([1, 2], pa.int64()), "key": ["a", "b"]}
    cases = [
        ({"ts": [1, 2], "key": ["a", None]}, {}, "row 2: the key is missing"),
        ({"ts": [1, 2], "key": ["a", " \t"]}, {}, "row 2: the key is empty"),
        ({"ts": [1, 2], "key": [0.5, 1.5]}, {}, "key column 'key' holds double: keys are integers or strings"),
        ({"ts": [1, 2], "key": pa.array([b"a", b"\xff"])}, {}, "row 2: column 'key' holds bytes that are not UTF-8"),
        ({"ts": [1, 2], "key": ["a", "b\0c"]}, {}, "row 2: the key holds a NUL byte$"),
        ({"ts": [1, 2], "key": pa.array([b"\0", b"b"])}, {}, "row 1: the key holds a NUL byte$"),
        ({"ts": [1, None], "key": ["a", "b"]}, {}, "row 2: the timestamp is missing"),
        ({"ts": [1.0, float("inf")], "key": ["a", "b"]}, {}, "row 2: timestamp inf is not a finite number"),
        ({"ts": ["2026-01-01", "noon"], "key": ["a", "b"]}, {}, "row 2: timestamp 'noon' is not an ISO 8601"),
        ({"ts": [True, False], "key": ["a", "b"]}, {}, "timestamp column 'ts' holds bool"),
        ({"time": [1, 2], "key": ["a", "b"]}, {}, "no timestamp column named 'ts': the file has time, key"),
        (good, {"columns": ("ts", 3)}, "key column 3 does not exist: the file has 2 columns"),
        (good, {"columns": ("key", "key")}, "the timestamp and the key are both column 'key'"),
        (good, {"where": ("key", ["z"])}, r"no row has column 'key' in \['z'\]"),
        (good, {"where": ("op", ["get"])}, "no --where column named 'op'"),
        ({"ts": pa.array([], pa.int64()), "key": pa.array([], pa.string())}, {}, "the trace has no rows"),
    ]
    out = []
    for i, (columns, kwargs, message) in enumerate(cases):
        out.append((write_table(tmp_path / f"bad{i}.parquet", columns), kwargs, message))
    folder = tmp_path / "folder"
    folder.mkdir()
    write_table(folder / "a.parquet", good)
    write_table(folder / "b.parquet", {"ts": [3, 4], "key": ["c", None]})
    out.append((folder, {}, "b.parquet row 2: the key is missing"))  # a folder's row is named with its file
    (tmp_path / "other").mkdir()
    write_table(tmp_path / "other" / "a.parquet", good)
    write_table(tmp_path / "other" / "b.parquet", {"ts": [3], "id": ["c"]})
    out.append((tmp_path / "other", {}, "b.parquet: no column named 'key', which the first file has"))
    (tmp_path / "where").mkdir()
    write_table(tmp_path / "where" / "a.parquet", {**good, "op": pa.array([b"get", b"\xff"], pa.binary())})
    out.append(
        (tmp_path / "where", {"where": ("op", ["get"])}, "a.parquet: --where column 'op' holds binary, not text")
    )
    (tmp_path / "empty").mkdir()
    out.append((tmp_path / "empty", {}, "the folder holds no .parquet file"))
    (tmp_path / "torn.parquet").write_bytes(b"PAR1 then nothing a reader can use")
    out.append((tmp_path / "torn.parquet", {}, "not a readable Parquet file"))  # the CLI says which file
    return out


def test_bad_parquet_traces_are_one_clear_error(tmp_path: Path):
    for path, kwargs, message in bad_traces(tmp_path):
        with pytest.raises(TraceError, match=f"^{message}"):
            parse_trace(path, **kwargs)


def test_cli_replays_a_parquet_trace_as_the_same_csv(tmp_path: Path, capsys: pytest.CaptureFixture):
    rng = np.random.default_rng(1)
    keys = [f"ad:{k}" for k in np.minimum(rng.zipf(1.3, 3000), 300).tolist()]
    seconds = np.sort(rng.uniform(0, 4 * 86_400, 3000)).round(3)
    write_table(
        tmp_path / "t.parquet", {"ts": pa.array((seconds * 1000).astype(np.int64), pa.timestamp("ms")), "key": keys}
    )
    (tmp_path / "t.csv").write_text("".join(f"{s},{k}\n" for s, k in zip(seconds.tolist(), keys, strict=True)))
    results = []
    for name in ("t.parquet", "t.csv"):
        args = ["replay", "--trace", str(tmp_path / name), "--days", "4", "--top-n", "auto", "--capacity", "40"]
        assert main(args) == 0
        out, err = capsys.readouterr()
        assert err == ""
        result = json.loads(out)
        assert result.pop("trace_layout")["format"] == ("parquet" if name.endswith("parquet") else "text")
        result.pop("trace")
        results.append(result)
    assert results[0] == results[1] and results[0]["requests"] > 0 and "hit_rate_logged" not in results[0]
    # A query log's hits: the client's own hit rate on the counted days, beside the replayed ones.
    hit = (rng.random(3000) < 0.6).tolist()
    logged = write_table(
        tmp_path / "log.parquet",
        {"ts": pa.array((seconds * 1000).astype(np.int64), pa.timestamp("ms")), "key": keys, "hit": hit},
    )
    assert main(["replay", "--trace", str(logged), "--days", "4", "--top-n", "5", "--capacity", "40"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (
        result["hit_rate_logged"] == logged_hit_rate(parse_trace(logged), 4) and 0.5 < result["hit_rate_logged"] < 0.7
    )
    # Naming one column keeps the other's Parquet default; a bad trace is one line and exit code 2.
    assert main(["replay", "--trace", str(tmp_path / "t.parquet"), "--key-field", "key", "--days", "4",
                 "--top-n", "5", "--capacity", "40"]) == 0  # fmt: skip
    capsys.readouterr()
    path, _, message = bad_traces(tmp_path)[0]
    assert main(["replay", "--trace", str(path), "--days", "2", "--top-n", "1", "--capacity", "2"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"precompute replay: {path}: {message}\n"


def test_rows_whose_key_holds_a_nul_byte_are_quarantined_as_text_lines_are(tmp_path: Path):
    # A key holding a NUL byte was read as a key of its own, where a text trace's NUL line is refused by the replay
    # and cut and counted by the import: a Parquet row now is too, its other columns cut with it
    from precompute_assets.ml.replay import parse_trace_quarantining

    folder = tmp_path / "logs"
    folder.mkdir()
    write_table(folder / "a.parquet", {"ts": [1, 2, 3], "key": ["a", "b\0", "c"], "kind": ["ctr", "emb", "ctr"],
                                       "hit": [True, False, True]})  # fmt: skip
    write_table(folder / "b.parquet", {"ts": [4, 5], "key": pa.array([b"\0d", b"e"]), "kind": ["ctr", "ctr"],
                                       "hit": [False, True]})  # fmt: skip
    with pytest.raises(TraceError, match="^a.parquet row 2: the key holds a NUL byte$"):
        parse_trace(folder)
    trace, cut = parse_trace_quarantining(folder, where=("kind", ["ctr"]))
    assert trace.keys.tolist() == ["a", "c", "e"] and trace.timestamps.tolist() == [1.0, 3.0, 5.0]
    assert trace.logged_hits.tolist() == [True, True, True] and trace.where["dropped"] == 1  # the emb row, NUL and all
    assert cut == [(1, "b.parquet row 1: the key holds a NUL byte")]  # another kind's bad row counts for nothing
    with pytest.raises(TraceError, match="^b.parquet row 1: the key holds a NUL byte") as refused:
        parse_trace_quarantining(folder, max_malformed=1)
    assert refused.value.__notes__ == ["after 1 malformed rows were cut (at most 1)"]
    nothing = write_table(tmp_path / "nul.parquet", {"ts": [1], "key": ["\0"]})
    with pytest.raises(TraceError, match=r"^no request is left: all 1 rows are malformed \(the first, row 1: the key"):
        parse_trace_quarantining(nothing)


def test_rows_whose_key_is_missing_or_empty_are_quarantined_too(tmp_path: Path):
    # A missing or blank key stopped the whole import, where a text trace's line of no key is cut and counted
    from precompute_assets.ml.replay import parse_trace_quarantining

    folder = tmp_path / "logs"
    folder.mkdir()
    write_table(folder / "a.parquet", {"ts": [1, 2, 3, 4], "key": ["a", None, " \t", "d\0"]})
    write_table(folder / "b.parquet", {"ts": [5, 6], "key": pa.array([7, None], pa.int64())})
    with pytest.raises(TraceError, match="^a.parquet row 2: the key is missing$"):
        parse_trace(folder)
    trace, cut = parse_trace_quarantining(folder)
    assert trace.keys.tolist() == ["a", "7"] and trace.timestamps.tolist() == [1.0, 5.0]
    assert cut == [
        (2, "a.parquet row 2: the key is missing"),
        (3, "a.parquet row 3: the key is empty"),
        (4, "a.parquet row 4: the key holds a NUL byte"),
        (2, "b.parquet row 2: the key is missing"),
    ]
    numbers, cut = parse_trace_quarantining(folder / "b.parquet")
    assert numbers.keys.tolist() == [7] and numbers.keys.dtype == np.int64 and cut == [(2, "row 2: the key is missing")]


def test_rows_whose_timestamp_is_missing_or_no_time_are_quarantined_too(tmp_path: Path):
    # A row without a time stopped the whole import, where a text log's line of a bad timestamp is cut and counted
    from precompute_assets.ml.replay import parse_trace_quarantining

    numbers = write_table(tmp_path / "n.parquet", {"ts": [1.0, None, float("nan"), 4.0], "key": ["a", "b", "c", "d"]})
    with pytest.raises(TraceError, match="^row 2: the timestamp is missing$"):
        parse_trace(numbers)
    trace, cut = parse_trace_quarantining(numbers)
    assert trace.keys.tolist() == ["a", "d"] and trace.timestamps.tolist() == [1.0, 4.0]
    assert cut == [(2, "row 2: the timestamp is missing"), (3, "row 3: timestamp nan is not a finite number")]
    text = write_table(tmp_path / "t.parquet", {"ts": ["2026-01-01T00:00:00Z", "soon", None], "key": ["a", "b", None]})
    trace, cut = parse_trace_quarantining(text)
    assert trace.keys.tolist() == ["a"]
    assert cut == [(2, "row 2: timestamp 'soon' is not an ISO 8601 date-time"), (3, "row 3: the key is missing")]
    kinds = write_table(tmp_path / "k.parquet", {"ts": [1, None], "key": ["a", "b"], "kind": ["ctr", "emb"]})
    trace, cut = parse_trace_quarantining(kinds, where=("kind", ["ctr"]))
    assert trace.keys.tolist() == ["a"] and cut == [] and trace.where["dropped"] == 1  # another kind's row
