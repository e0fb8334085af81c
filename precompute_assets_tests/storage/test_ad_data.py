"""Loading a user's own ads and impressions into the lake: every bad input is quarantined with where and why, or
refused in one line when the file as a whole is wrong; the loaded data trains and scores the CTR model."""

from __future__ import annotations

import contextlib
import gzip
import json
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from precompute_assets.ml import ctr
from precompute_assets.ml.features import AdFeatureSpec, feature_problems
from precompute_assets.storage.ad_data import (
    AdDataError,
    LoadSummary,
    file_format,
    load_ads,
    load_impressions,
    unknown_ad_impressions,
)
from precompute_assets.storage.lake import Lake
from precompute_assets.tools.cli import main
from precompute_assets.workload.ads import generate_traffic, make_ads

SPEC = AdFeatureSpec()
ADS_HEADER = "ad_id,campaign_id,category,quality,bid,text_len\n"


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).astimezone(UTC).timestamp() * 1000)


def ads_into(lake: Lake, path: Path, spec: AdFeatureSpec = SPEC) -> LoadSummary:
    problems = partial(feature_problems, spec=spec)
    return load_ads(path, lake, required=spec.columns, row_problems=problems, text_columns=spec.categorical)


def quarantined(lake: Lake, summary: LoadSummary) -> pd.DataFrame:
    return pq.read_table(summary.quarantine_path).to_pandas()


@pytest.fixture
def lake(tmp_path) -> Lake:
    return Lake(str(tmp_path / "lake"))


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- ads ------------------------------------------------------------------------------------------------


def test_every_bad_ad_row_is_quarantined_with_its_line_and_reason(lake, tmp_path):
    path = write(
        tmp_path / "ads.csv",
        ADS_HEADER
        + "a1,c1,3,0.5,1.2,40\n"  # line 2
        + "a2,c1,3,high,1.2,40\n"  # line 3: not a number
        + "a3,c1,3,,1.2,40\n"  # line 4: missing (NaN) quality
        + "a4,c1,3,0.5,-1,40\n"  # line 5: negative log-scaled bid
        + "  ,c1,3,0.5,1,40\n"  # line 6: blank id
        + "a5,c1,3,0.5,1\n"  # line 7: ragged
        + "\n"  # line 8: blank, not a row
        + 'a6,"a campaign\nover two lines",7,0.9,2,100\n'  # lines 9-10: one record
        + "a7,c2,,0.5,1,40\n"  # line 11: category missing
        + "a1,c1,4,0.6,1.3,41\n"  # line 12: a1 again: the last valid row wins
        + "a8,c2,5,0.5,nan,40\n"  # line 13: NaN bid
        + "a9,c2,5,0.5,inf,40\n",  # line 14: infinite bid
    )
    summary = ads_into(lake, path)
    assert summary.rows == 11 and summary.loaded == 2 and summary.duplicates == 1 and summary.quarantined == 8
    assert summary.first_quarantined == [
        "line 3: quality is not a finite number",
        "line 4: quality is not a finite number",
        "line 5: bid is negative",
        "line 6: ad_id is missing",
        "line 7: 5 fields, expected 6",
        "line 11: category is missing",
        "line 13: bid is not a finite number",
        "line 14: bid is not a finite number",
    ]
    assert summary.quarantine_reasons == {
        "quality is not a finite number": 2,
        "bid is negative": 1,
        "ad_id is missing": 1,
        "5 fields, expected 6": 1,
        "category is missing": 1,
        "bid is not a finite number": 2,
    }
    ads = lake.read("ads")
    assert ads["ad_id"].tolist() == ["a6", "a1"]
    assert ads.loc[1].tolist() == ["a1", "c1", "4", 0.6, 1.3, 41]
    assert ads.loc[0, "campaign_id"] == "a campaign\nover two lines"
    assert str(ads["category"].dtype) in ("str", "object") and ads["text_len"].dtype == np.int64
    bad = quarantined(lake, summary)
    assert bad["where"].tolist()[:3] == ["line 3", "line 4", "line 5"] and len(bad) == 8
    assert json.loads(bad["raw"].iloc[0])["quality"] == "high"
    assert json.loads(bad.set_index("where").loc["line 7", "raw"]) == "a5,c1,3,0.5,1"  # the line as written
    assert set(bad["file"]) == {str(path)} and bad["load_id"].nunique() == 1


def test_the_reasons_of_a_bad_ads_file_are_counted(lake, tmp_path):
    path = write(tmp_path / "ads.csv", ADS_HEADER + "a2,c1,3,high,1.2,40\nb,c1,3,x,1,1\na4,c1,3,0.5,-1,40\n")
    summary = ads_into(lake, path)
    assert summary.quarantine_reasons == {"quality is not a finite number": 2, "bid is negative": 1}
    assert summary.loaded == 0 and summary.note == "no valid rows: the lake's ads table was left as it was"


def test_ids_unfit_for_cache_keys_and_undecodable_bytes_are_quarantined(lake, tmp_path):
    path = tmp_path / "ads.csv"
    path.write_bytes(
        ADS_HEADER.encode()
        + b"ok,c1,3,0.5,1,40\n"
        + ("x" * 257 + ",c1,3,0.5,1,40\n").encode()
        + b'"tab\tid",c1,3,0.5,1,40\n'
        + b"latin\xe9,c1,3,0.5,1,40\n"
        + "caf\u00e9,c1,3,0.5,1,40\n".encode()
    )
    summary = ads_into(lake, path)
    assert summary.first_quarantined == [
        "line 3: ad_id is longer than 256 characters",
        "line 4: ad_id has control characters",
        "line 5: not valid UTF-8",
    ]
    assert lake.read("ads")["ad_id"].tolist() == ["ok", "café"]
    assert "latin\\udce9" in quarantined(lake, summary)["raw"].iloc[2]


def test_a_braced_ad_id_is_quarantined_not_left_to_fail_the_publish(lake, tmp_path):
    # serving.keys refuses braces in a key (they pick its Redis Cluster slot): kept, it failed ctr_cache whole
    rows = "ok,c1,3,0.5,1,40\n{3F2504E0-4F89},c1,3,0.5,1,40\nx}y,c1,3,0.5,1,40\n"
    path = write(tmp_path / "ads.csv", ADS_HEADER + rows)
    summary = ads_into(lake, path)
    assert summary.quarantine_reasons == {"ad_id has a brace ('{' or '}')": 2}
    assert lake.read("ads")["ad_id"].tolist() == ["ok"]


def test_a_load_replaces_the_catalog_and_the_same_file_twice_changes_nothing(lake, tmp_path):
    lake.write("ads", None, make_ads(50, days=2))
    path = write(tmp_path / "ads.csv", ADS_HEADER + "a1,c1,3,0.5,1.2,40\na2,c1,4,0.7,2.2,90\n")
    first = ads_into(lake, path)
    table = lake.read("ads")
    assert table["ad_id"].tolist() == ["a1", "a2"] and first.quarantine_path is None
    assert ads_into(lake, path).as_dict() == first.as_dict()
    pd.testing.assert_frame_equal(lake.read("ads"), table)


def test_a_header_only_file_writes_nothing_and_keeps_the_catalog(lake, tmp_path):
    lake.write("ads", None, make_ads(5, days=1))
    summary = ads_into(lake, write(tmp_path / "ads.csv", ADS_HEADER))
    assert summary.rows == 0 and summary.loaded == 0 and "left as it was" in summary.note
    assert len(lake.read("ads")) == 5


def test_parquet_ads_keep_their_types_and_name_bad_rows_by_row_number(lake, tmp_path):
    ads = make_ads(6, days=1)
    ads["ad_id"] = np.arange(100, 106)  # numeric ids become text
    ads["quality"] = ads["quality"].astype(float)
    ads.loc[2, "quality"] = np.nan
    ads.loc[4, "bid"] = -0.5
    path = tmp_path / "ads.parquet"
    ads.to_parquet(path, index=False)
    summary = ads_into(lake, path)
    assert summary.format == "parquet"
    assert summary.first_quarantined == ["row 3: quality is not a finite number", "row 5: bid is negative"]
    loaded = lake.read("ads")
    assert loaded["ad_id"].tolist() == ["100", "101", "103", "105"]
    assert loaded["category"].dtype == np.int64  # a Parquet column keeps its type


def test_64_bit_parquet_ids_keep_every_digit(lake, tmp_path):
    # One row without an id made pandas read the column as float64: ids above 2**53 (snowflake ids) merged into one,
    # kept as a duplicate of a wrong id; uint64 ids above 2**63 made the load raise
    ads = make_ads(4, days=1)
    ads["ad_id"] = pd.array([1500000000000000001, 1500000000000000002, None, 1500000000000000003], dtype="Int64")
    ads.to_parquet(tmp_path / "ads.parquet", index=False)
    summary = ads_into(lake, tmp_path / "ads.parquet")
    assert (summary.loaded, summary.first_quarantined) == (3, ["row 3: ad_id is missing"])
    assert lake.read("ads")["ad_id"].tolist() == ["1500000000000000001", "1500000000000000002", "1500000000000000003"]
    ads = make_ads(2, days=1)
    ads["ad_id"] = np.array([2**64 - 1, 2**63 + 1], dtype=np.uint64)
    ads.to_parquet(tmp_path / "unsigned.parquet", index=False)
    assert ads_into(lake, tmp_path / "unsigned.parquet").loaded == 2
    assert lake.read("ads")["ad_id"].tolist() == [str(2**64 - 1), str(2**63 + 1)]
    ads["ad_id"] = [1e19, 2e19]  # floats beyond int64 wrapped to one id
    ads.to_parquet(tmp_path / "floats.parquet", index=False)
    assert ads_into(lake, tmp_path / "floats.parquet").loaded == 2


def test_a_quote_never_closed_refuses_the_file_and_keeps_the_catalog(lake, tmp_path):
    """An unclosed quote took in every line after it as one field: the load wrote one ad, its category the rest of
    the file, and the catalog lost every other ad without a count (h_data). Impressions lost the rows after it."""
    ads_into(lake, write(tmp_path / "good.csv", ADS_HEADER + "a1,c1,3,0.5,1.2,40\na2,c1,3,0.5,1.2,40\n"))
    rows = "".join(f"u{i},c1,3,0.5,1,40\n" for i in range(2, 7))
    with pytest.raises(AdDataError, match="line 2: a quote opened there is never closed"):
        ads_into(lake, write(tmp_path / "ads.csv", ADS_HEADER + 'u1,c1,"3,0.5,1,40\n' + rows))
    assert lake.read("ads")["ad_id"].tolist() == ["a1", "a2"] and not lake.exists("ads_quarantine")
    lines = "".join(f"{ms('2026-01-02T10:00:00+00:00') + i},a{i},0\n" for i in range(8))
    with pytest.raises(AdDataError, match="line 3: a quote opened"):
        load_impressions(
            write(tmp_path / "i.csv", 'ts_ms,ad_id,clicked\n1,a,0\n2,"b,0\n' + lines), lake, timezone="UTC"
        )
    assert not lake.exists("ad_impressions", "2026-01-02")


def test_text_after_a_closing_quote_and_long_fields(lake, tmp_path):
    """``"a3"x`` loaded as ad ``a3x``; a field over 128 KiB (a description) was quarantined without its values."""
    long = "d" * 200_000
    path = write(
        tmp_path / "ads.csv",
        "ad_id,category,quality,bid,text_len,description\n"
        + '"a3"x,3,0.5,1,40,short\n'
        + f"a4,3,0.5,1,40,{long}\n"
        + f"a5,3,0.5,1,40,{long}\n",
    )
    summary = ads_into(lake, path)
    assert summary.first_quarantined == ["line 2: malformed CSV: ',' expected after '\"'"]
    assert json.loads(quarantined(lake, summary)["raw"].iloc[0]) == '"a3"x,3,0.5,1,40,short'
    ads = lake.read("ads")
    assert ads["ad_id"].tolist() == ["a4", "a5"] and ads["description"].str.len().tolist() == [200_000] * 2


def test_other_columns_are_kept_as_written_and_huge_integers_load(lake, tmp_path):
    """Only the feature columns are numbers: ``campaign_id`` 007 became 7.0 (and a blank NaN), a Parquet timestamp
    column epoch milliseconds; a 20-digit integer feature failed the whole load with an OverflowError (h_data)."""
    path = write(
        tmp_path / "ads.csv",
        ADS_HEADER + "a1,007,3,0.5,1.2,99999999999999999999\na2,,3,0.5,1.2,40\na3,008,3,0.5,1.2,41\n",
    )
    summary = ads_into(lake, path)
    assert summary.loaded == 3 and summary.quarantined == 0
    ads = lake.read("ads")
    assert ads["campaign_id"].fillna("").tolist() == ["007", "", "008"]
    assert ads["text_len"].tolist() == [1e20, 40.0, 41.0]
    frame = make_ads(2, days=1)
    frame["created"] = pd.to_datetime(["2026-01-01", "2026-01-02"], utc=True)
    frame.to_parquet(tmp_path / "ads.parquet", index=False)
    ads_into(lake, tmp_path / "ads.parquet")
    assert pd.api.types.is_datetime64_any_dtype(lake.read("ads")["created"])


def test_parquet_binary_strings_are_text_and_nested_columns_are_refused(lake, tmp_path):
    """Hive, Impala and Spark write strings as BINARY: ids loaded as ``b'a1'``, which joined nothing, and bytes
    that are not UTF-8 were not quarantined; a list ``ad_id`` loaded as ``['x']`` (h_data)."""
    frame = make_ads(3, days=1).astype({"category": str})
    table = pa.Table.from_pandas(frame, preserve_index=False)
    binary = {name: pa.array([v.encode() for v in frame[name]], pa.binary()) for name in ("ad_id", "category")}
    binary["ad_id"] = pa.array([b"a1", b"a2", b"\xffz"], pa.binary())
    for name, array in binary.items():
        table = table.set_column(table.schema.get_field_index(name), name, array)
    pq.write_table(table, tmp_path / "ads.parquet")
    summary = ads_into(lake, tmp_path / "ads.parquet")
    assert summary.first_quarantined == ["row 3: not valid UTF-8"]
    ads = lake.read("ads")
    assert ads["ad_id"].tolist() == ["a1", "a2"] and ads["category"].tolist() == frame["category"].tolist()[:2]
    pq.write_table(pa.table({"ts_ms": [ms("2026-01-02T10:00:00+00:00")] * 2, "ad_id": pa.array([b"a1", b"\xff"]),
                             "clicked": [1, 0]}), tmp_path / "i.parquet")  # fmt: skip
    summary = load_impressions(tmp_path / "i.parquet", lake, timezone="UTC")
    assert (summary.loaded, summary.first_quarantined) == (1, ["row 2: not valid UTF-8"])
    assert lake.read("ad_impressions", "2026-01-02")["ad_id"].tolist() == ["a1"]
    table = table.set_column(table.schema.get_field_index("ad_id"), "ad_id", pa.array([["x"], ["y"], ["z"]]))
    pq.write_table(table, tmp_path / "nested.parquet")
    with pytest.raises(AdDataError, match=r"columns \['ad_id \(list<\w+: string>\)'\] hold lists or records"):
        ads_into(lake, tmp_path / "nested.parquet")


@pytest.mark.parametrize(
    "content, message",
    [
        ("ad_id,category,quality,bid\na,1,0.5,1\n", "missing columns ['text_len']"),
        ("ad_id,category,quality,bid,text_len,bid\n", "columns ['bid'] appear more than once"),
        ("", "empty file: no header row"),
        ("\n\n", "empty file: no header row"),
    ],
)
def test_a_wrong_schema_is_one_error_and_writes_nothing(lake, tmp_path, content, message):
    with pytest.raises(AdDataError, match=message.replace("[", r"\[").replace("]", r"\]")) as raised:
        ads_into(lake, write(tmp_path / "ads.csv", content))
    assert "\n" not in str(raised.value)
    assert not lake.exists("ads") and not (tmp_path / "lake").exists()


def test_a_spec_naming_a_column_the_data_lacks_is_a_schema_error(lake, tmp_path):
    own = AdFeatureSpec(numeric=("quality", "price"), categorical=("brand",), log_scaled=())
    path = write(tmp_path / "ads.csv", ADS_HEADER + "a1,c1,3,0.5,1.2,40\n")
    with pytest.raises(AdDataError, match=r"missing columns \['price', 'brand'\]"):
        ads_into(lake, path, own)


def test_files_that_are_not_csv_or_parquet_are_refused(tmp_path):
    (tmp_path / "folder.csv").mkdir()
    write(tmp_path / "empty.parquet", "")
    write(tmp_path / "text.parquet", "ad_id\n")
    assert file_format(write(tmp_path / "ok.CSV", "x")) == "csv"
    cases = {
        tmp_path / "ads.json": "unknown suffix '.json'",
        tmp_path / "missing.csv": "no such file",
        tmp_path / "folder.csv": "not a file",
    }
    # A binary file was refused for missing columns, its "header" a kilobyte of undecodable bytes (h_cli).
    (tmp_path / "latin1.csv").write_bytes("ad_id,cat\xe9gorie\na1,x\n".encode("latin-1"))
    (tmp_path / "nul.csv").write_bytes(b"ad_id\x00\x01,x\na1,x\n")
    (tmp_path / "row.csv").write_bytes(b"ad_id,x\na\xff,x\n")  # a bad row is quarantined, not the file refused
    cases[tmp_path / "latin1.csv"] = r"the first line is not UTF-8 text \(invalid continuation byte at byte 9\)"
    cases[tmp_path / "nul.csv"] = "the first line holds a NUL byte: a binary file"
    assert file_format(tmp_path / "row.csv") == "csv"
    for path, message in cases.items():
        with pytest.raises(AdDataError, match=message) as raised:
            file_format(path)
        assert len(str(raised.value)) < 200
    for name in ("empty.parquet", "text.parquet"):
        with pytest.raises(AdDataError, match="not a readable Parquet file"):
            ads_into(Lake(str(tmp_path / "lake")), tmp_path / name)


# --- impressions ----------------------------------------------------------------------------------------


IMPRESSIONS_HEADER = "ts_ms,ad_id,clicked,user\n"


def test_every_bad_impression_is_quarantined_with_its_line_and_reason(lake, tmp_path):
    t = ms("2026-11-18T12:00:00+00:00")
    path = write(
        tmp_path / "impressions.csv",
        IMPRESSIONS_HEADER
        + f"{t},a1,1,u1\n"  # line 2
        + f"{t + 1},a1,true,u1\n"  # line 3: true/false is fine too
        + f"{t + 2},a2,0,u2\n"  # line 4
        + "soon,a1,0,u\n"  # line 5: unparsable ts_ms
        + f"{t // 1000},a1,0,u\n"  # line 6: epoch seconds
        + f"{t}.5,a1,0,u\n"  # line 7: fractional ms
        + f"{t},a1,2,u\n"  # line 8: clicked 2
        + f"{t},a1,yes,u\n"  # line 9: clicked yes
        + f"{t},a1,,u\n"  # line 10: clicked blank
        + f"{t}, ,0,u\n"  # line 11: blank id
        + f"{t},a1\n"  # line 12: ragged
        + f"{ms('2025-12-31T12:00:00+00:00')},a1,0,u\n"  # line 13: before the first partition
        + f"{t + 3},a3,FALSE,u\n"  # line 14
        + ",a1,0,u\n",  # line 15: NaN ts_ms
    )
    summary = load_impressions(path, lake, timezone="UTC", first_day="2026-01-01")
    assert summary.rows == 14 and summary.loaded == 4 and summary.quarantined == 10
    assert summary.first_quarantined == [
        "line 5: ts_ms is not an epoch-milliseconds number",
        "line 6: ts_ms is out of range: it looks like epoch seconds (ts_ms is milliseconds: times 1000)",
        "line 7: ts_ms is not a whole number of milliseconds",
        "line 8: clicked is not 0/1 or true/false",
        "line 9: clicked is not 0/1 or true/false",
        "line 10: clicked is not 0/1 or true/false",
        "line 11: ad_id is missing",
        "line 12: 2 fields, expected 4",
        "line 13: ts_ms falls before the first daily partition 2026-01-01",
        "line 15: ts_ms is not an epoch-milliseconds number",
    ]
    assert summary.written == {"2026-11-18": 4}
    day = lake.read("ad_impressions", "2026-11-18")
    assert list(day.columns) == ["ts_ms", "ad_id", "clicked"]  # other columns are not kept
    assert day["ts_ms"].tolist() == [t, t + 1, t + 2, t + 3]
    assert day["clicked"].tolist() == [True, True, False, False] and day["clicked"].dtype == bool
    assert len(quarantined(lake, summary)) == 10


def test_impressions_in_the_future_are_quarantined_not_written_into_a_day_to_come(lake, tmp_path):
    """A client clock a day (or a year) ahead wrote its rows into the partition of a day that had not come, which the
    CTR model then trained on as that day's impressions, beside the real ones."""
    now = ms("2026-11-18T12:00:00+00:00")
    path = write(
        tmp_path / "impressions.csv",
        IMPRESSIONS_HEADER
        + f"{now - 1000},a1,1,u\n"  # line 2: a second ago
        + f"{now + 60_000},a1,0,u\n"  # line 3: a minute ahead, within the allowed skew
        + f"{now + 86_400_000},a2,1,u\n"  # line 4: tomorrow
        + f"{ms('2099-01-01T00:00:00+00:00')},a3,0,u\n",  # line 5: decades ahead
    )
    summary = load_impressions(path, lake, timezone="UTC", not_after_ms=now + 300_000)
    assert summary.loaded == 2 and summary.quarantined == 2 and summary.written == {"2026-11-18": 2}, summary
    assert summary.first_quarantined == [
        "line 4: ts_ms is in the future: after 2026-11-18T12:05:00+00:00",
        "line 5: ts_ms is in the future: after 2026-11-18T12:05:00+00:00",
    ]
    assert summary.quarantine_reasons == {"ts_ms is in the future: after 2026-11-18T12:05:00+00:00": 2}
    assert lake.partitions("ad_impressions") == ["2026-11-18"]


def test_impressions_are_split_into_days_in_the_deployment_timezone(lake, tmp_path):
    # 2026-11-01 is the day New York leaves daylight time: a 25-hour day.
    rows = [
        ("2026-11-01T00:30:00-04:00", "a"),  # Nov 1 in New York and in UTC (04:30)
        ("2026-10-31T23:59:59-04:00", "b"),  # Oct 31 in New York, Nov 1 03:59 in UTC
        ("2026-11-01T23:30:00-05:00", "c"),  # the last half hour of Nov 1 in New York, Nov 2 04:30 in UTC
        ("2026-11-02T00:00:00-05:00", "d"),  # Nov 2 in both
    ]
    frame = pd.DataFrame({"ts_ms": [ms(t) for t, _ in rows], "ad_id": [a for _, a in rows], "clicked": False})
    path = tmp_path / "impressions.parquet"
    frame.to_parquet(path, index=False)
    summary = load_impressions(path, lake, timezone="America/New_York")
    assert summary.written == {"2026-10-31": 1, "2026-11-01": 2, "2026-11-02": 1}
    assert lake.read("ad_impressions", "2026-11-01")["ad_id"].tolist() == ["a", "c"]
    utc = load_impressions(path, Lake(str(tmp_path / "utc")), timezone="UTC")
    assert utc.written == {"2026-11-01": 2, "2026-11-02": 2}


def test_days_in_a_file_replace_their_partitions_or_are_appended(lake, tmp_path):
    t = ms("2026-11-18T12:00:00+00:00")
    lake.write("ad_impressions", "2026-11-18", pd.DataFrame({"ts_ms": [t - 5], "ad_id": ["old"], "clicked": [True]}))
    lake.write("ad_impressions", "2026-11-17", pd.DataFrame({"ts_ms": [t - 86_400_000], "ad_id": ["x"],
                                                             "clicked": [True]}))  # fmt: skip
    path = write(tmp_path / "impressions.csv", "ts_ms,ad_id,clicked\n" + f"{t + 1},a,0\n{t},b,1\n")
    load_impressions(path, lake, timezone="UTC")
    assert lake.read("ad_impressions", "2026-11-18")["ad_id"].tolist() == ["b", "a"]  # sorted by time
    load_impressions(path, lake, timezone="UTC")  # the same file again: the same partition
    assert lake.read("ad_impressions", "2026-11-18")["ad_id"].tolist() == ["b", "a"]
    again = load_impressions(path, lake, timezone="UTC", append=True)  # the day holds this file's rows already
    assert (again.written, again.already_loaded, again.loaded) == ({}, ["2026-11-18"], 0)
    # what the day holds now, and the file's rows of ads not in `ads`, as on the first run (h_readme2: {} and 0)
    lake.write("ads", None, pd.DataFrame({"ad_id": ["a"]}))
    again = load_impressions(path, lake, timezone="UTC", append=True)
    assert (again.partition_rows, again.unknown_ad_impressions) == ({"2026-11-18": 2}, 1)
    other = write(tmp_path / "more.csv", "ts_ms,ad_id,clicked\n" + f"{t + 1},a,0\n{t},b,1\n{t + 2},c,0\n")
    appended = load_impressions(other, lake, timezone="UTC", append=True)
    assert (appended.written, appended.partition_rows) == ({"2026-11-18": 3}, {"2026-11-18": 5})
    assert lake.read("ad_impressions", "2026-11-18")["ad_id"].tolist() == ["b", "b", "a", "a", "c"]
    assert lake.read("ad_impressions", "2026-11-17")["ad_id"].tolist() == ["x"]  # a day not in the file


def test_an_append_that_failed_part_way_can_be_run_again(lake, tmp_path):
    t = ms("2026-11-16T12:00:00+00:00")
    lines = [f"{t + d * 86_400_000 + i * 60_000},ad{i},{i % 2}" for d in range(3) for i in range(10)]
    path = write(tmp_path / "impressions.csv", "ts_ms,ad_id,clicked\n" + "\n".join(lines) + "\n")
    lake.write("ad_impressions", "2026-11-17", pd.DataFrame({"ts_ms": [t], "ad_id": ["old"], "clicked": [True]}))
    blocked = Path(lake.path("ad_impressions", "2026-11-18"))
    blocked.mkdir()  # the third day's file cannot be written
    with pytest.raises(AdDataError, match="could not write day 2026-11-18.*written before it: 2026-11-16, 2026-11-17"):
        load_impressions(path, lake, timezone="UTC", append=True)
    blocked.rmdir()
    again = load_impressions(path, lake, timezone="UTC", append=True)
    assert (again.written, again.already_loaded) == ({"2026-11-18": 10}, ["2026-11-16", "2026-11-17"])
    rows = {day: len(lake.read("ad_impressions", day)) for day in ("2026-11-16", "2026-11-17", "2026-11-18")}
    assert rows == {"2026-11-16": 10, "2026-11-17": 11, "2026-11-18": 10}  # each day once, the old row kept


def test_a_file_loaded_again_replaces_its_quarantine_instead_of_adding_a_copy(lake, tmp_path):
    """The quarantine is one lake file per input file (by content): a re-run after a failed load, or the same file
    loaded twice, leaves its bad rows once; another file's quarantine stays beside it."""
    t = ms("2026-11-18T12:00:00+00:00")
    path = write(tmp_path / "impressions.csv", f"ts_ms,ad_id,clicked\n{t},a,1\n{t},b,2\n{t // 1000},c,0\n")
    blocked = Path(lake.path("ad_impressions", "2026-11-18"))
    blocked.mkdir(parents=True)  # the day cannot be written: the load fails after its quarantine was written
    with pytest.raises(AdDataError, match="could not write day 2026-11-18"):
        load_impressions(path, lake, timezone="UTC")
    blocked.rmdir()
    first = load_impressions(path, lake, timezone="UTC")
    again = load_impressions(path, lake, timezone="UTC", append=True)
    assert first.quarantine_path == again.quarantine_path
    other = load_impressions(write(tmp_path / "other.csv", f"ts_ms,ad_id,clicked\n{t},d,7\n"), lake, timezone="UTC")
    assert other.quarantine_path != first.quarantine_path
    files = sorted(Path(lake.path("ad_impressions_quarantine", "x")).parent.glob("*"))
    assert len(files) == 2
    assert sum(len(pq.read_table(f)) for f in files) == 3  # two bad rows of the first file, one of the other


def test_parquet_impressions_with_timestamps_bools_and_nulls(lake, tmp_path):
    t = ms("2026-11-18T12:00:00+00:00")
    table = pa.table(
        {
            "ts_ms": pa.array([t, t + 1, None, t + 3], pa.timestamp("ms", tz="UTC")).cast(pa.timestamp("us", "UTC")),
            "ad_id": pa.array(["a", None, "c", "d"]),
            "clicked": pa.array([True, False, True, None]),
        }
    )
    path = tmp_path / "impressions.parquet"
    pq.write_table(table, path)
    summary = load_impressions(path, lake, timezone="UTC")
    assert summary.first_quarantined == [
        "row 2: ad_id is missing",
        "row 3: ts_ms is not an epoch-milliseconds number",
        "row 4: clicked is not 0/1 or true/false",
    ]
    assert lake.read("ad_impressions", "2026-11-18")["ts_ms"].tolist() == [t]
    assert summary.naive_timestamps is None  # a time zone of its own: nothing to guess


def test_parquet_timestamps_without_a_time_zone_are_read_as_utc_and_said_to_be(lake, tmp_path):
    """Naive timestamps went into UTC days without a word: local wall-clock times land up to a day off (h_ctr)."""
    t = ms("2026-11-18T12:00:00+00:00")
    path = tmp_path / "naive.parquet"
    pq.write_table(pa.table({"ts_ms": pa.array([t], pa.timestamp("ms")), "ad_id": ["a"], "clicked": [True]}), path)
    summary = load_impressions(path, lake, timezone="UTC")
    assert summary.written == {"2026-11-18": 1} and lake.read("ad_impressions", "2026-11-18")["ts_ms"].tolist() == [t]
    assert summary.naive_timestamps.startswith("ts_ms is a timestamp without a time zone: read as UTC")
    assert "naive_timestamps" in summary.as_dict()


def test_gzipped_csv_and_an_empty_impressions_file(lake, tmp_path):
    t = ms("2026-11-18T12:00:00+00:00")
    path = tmp_path / "impressions.csv.gz"
    with gzip.open(path, "wt") as stream:
        stream.write(f"ts_ms,ad_id,clicked\n{t},a,1\n")
    assert load_impressions(path, lake, timezone="UTC").written == {"2026-11-18": 1}
    with pytest.raises(AdDataError, match="empty file"):
        load_impressions(write(tmp_path / "empty.csv", ""), lake, timezone="UTC")
    header_only = load_impressions(write(tmp_path / "header.csv", "ts_ms,ad_id,clicked\n"), lake, timezone="UTC")
    assert header_only.rows == 0 and header_only.written == {} and "no ad_impressions partition" in header_only.note
    with pytest.raises(AdDataError, match=r"missing columns \['clicked'\]"):
        load_impressions(write(tmp_path / "wrong.csv", "ts_ms,ad_id\n1,a\n"), lake, timezone="UTC")


def test_unknown_ad_impressions_are_counted(lake, tmp_path):
    t = ms("2026-11-18T12:00:00+00:00")
    path = write(tmp_path / "impressions.csv", f"ts_ms,ad_id,clicked\n{t},a1,1\n{t},ghost,0\n")
    assert load_impressions(path, lake, timezone="UTC").unknown_ad_impressions is None  # no catalog yet
    ads_into(lake, write(tmp_path / "ads.csv", ADS_HEADER + "a1,c1,3,0.5,1.2,40\n"))
    assert unknown_ad_impressions(lake, ["a1", "ghost", "ghost"]) == 2
    more = write(tmp_path / "more.csv", f"ts_ms,ad_id,clicked\n{t},a1,1\n{t},a1,0\n")
    appended = load_impressions(more, lake, timezone="UTC", append=True)
    assert appended.unknown_ad_impressions == 0  # of what this file added, not of the whole day


def test_an_impressions_file_is_held_as_compact_columns_until_its_days_are_written(lake, tmp_path, monkeypatch):
    # Valid rows wait for every day of the file; their ids as Python strings took 1.4 GB for 20M impressions (and
    # twice that while the chunks were concatenated): 3.8 GB peak for a 144 MB Parquet file.
    import tracemalloc

    from precompute_assets.storage import ad_data

    monkeypatch.setattr(ad_data, "CHUNK_ROWS", 10_000)  # chunks small beside the file: what is held is what counts
    n, t = 300_000, ms("2026-11-18T00:00:00+00:00")
    rng = np.random.default_rng(0)
    ids = rng.integers(100_000, 200_000, n)
    ts = np.sort(rng.integers(t, t + 3 * 86_400_000, n))
    table = pa.table({"ts_ms": ts, "ad_id": pa.array(ids).cast(pa.string()), "clicked": rng.random(n) < 0.1})
    pq.write_table(table, path := tmp_path / "impressions.parquet")
    ads_into(lake, write(tmp_path / "ads.csv", ADS_HEADER + "100000,c1,3,0.5,1.2,40\n"))
    tracemalloc.start()
    try:
        summary = load_impressions(path, lake, timezone="UTC")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 80 * n
    assert summary.loaded == n and list(summary.written) == ["2026-11-18", "2026-11-19", "2026-11-20"]
    assert summary.unknown_ad_impressions == int((ids != 100_000).sum())
    day = lake.read("ad_impressions", "2026-11-19")
    assert day["ad_id"].tolist() == [str(i) for i in ids[(ts >= t + 86_400_000) & (ts < t + 2 * 86_400_000)]]


def test_loads_report_the_rows_read_after_each_chunk(lake, tmp_path, monkeypatch):
    # A 20M-row CSV takes minutes to read and check before anything is written: the command shows the rows read.
    from precompute_assets.storage import ad_data

    monkeypatch.setattr(ad_data, "CHUNK_ROWS", 2)
    t = ms("2026-11-18T12:00:00+00:00")
    impressions = write(tmp_path / "i.csv", "ts_ms,ad_id,clicked\n" + "".join(f"{t},a{i},0\n" for i in range(5)))
    seen: list[int] = []
    assert load_impressions(impressions, lake, timezone="UTC", progress=seen.append).loaded == 5
    assert seen == [2, 4, 5]
    ads = write(tmp_path / "ads.csv", ADS_HEADER + "".join(f"a{i},c1,3,0.5,1.2,40\n" for i in range(3)))
    seen.clear()
    columns, problems = SPEC.columns, partial(feature_problems, spec=SPEC)
    load_ads(ads, lake, required=columns, row_problems=problems, text_columns=SPEC.categorical, progress=seen.append)
    assert seen == [2, 3]


# --- the loaded data is what the model trains and scores on ---------------------------------------------


def test_loaded_csv_ads_train_and_score_like_the_synthetic_workload(lake, tmp_path):
    catalog = make_ads(300, days=3, seed=2)
    catalog.to_csv(tmp_path / "ads.csv", index=False)
    start = ms("2026-11-16T00:00:00+00:00")
    traffic = pd.concat(generate_traffic(catalog, start_ms=start, days=3, queries_per_day=20_000, seed=2))
    traffic[["ts_ms", "ad_id", "clicked", "user"]].to_csv(tmp_path / "impressions.csv", index=False)
    assert ads_into(lake, tmp_path / "ads.csv").loaded == 300
    summary = load_impressions(tmp_path / "impressions.csv", lake, timezone="UTC")
    assert summary.quarantined == 0 and sorted(summary.written) == ["2026-11-16", "2026-11-17", "2026-11-18"]
    ads = lake.read("ads")
    assert ads["category"].tolist() == catalog["category"].astype(str).tolist()  # CSV categories are text
    impressions = pd.concat([lake.read("ad_impressions", day) for day in summary.written], ignore_index=True)
    frame, issues = ctr.training_frame(impressions, ads, SPEC)
    synthetic_frame, _ = ctr.training_frame(traffic, catalog, SPEC)
    pd.testing.assert_frame_equal(frame, synthetic_frame)  # text "7" and the number 7 are one category
    train, valid = ctr.time_split(frame)
    encoder = ctr.fit_encoder(train, SPEC)
    model = ctr.train_ctr_model(train, encoder, n_estimators=10, n_jobs=1)
    scores, skipped = ctr.score_ads(model, catalog, catalog["ad_id"].tolist())  # the numeric catalog scores too
    loaded_scores, _ = ctr.score_ads(model, ads, ads["ad_id"].tolist())
    assert skipped == [] and np.allclose(scores["ctr"], loaded_scores["ctr"])


# --- the commands ---------------------------------------------------------------------------------------


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    for variable in ("PRECOMPUTE_LAKE_URI", "PRECOMPUTE_TIMEZONE", "PRECOMPUTE_PARTITIONS_START",
                     "PRECOMPUTE_AD_NUMERIC", "PRECOMPUTE_AD_CATEGORICAL", "PRECOMPUTE_AD_LOG_SCALED"):  # fmt: skip
        monkeypatch.delenv(variable, raising=False)
    return tmp_path / "home"


def test_commands_print_one_json_summary(home, tmp_path, capsys):
    path = write(tmp_path / "ads.csv", ADS_HEADER + "a1,c1,3,0.5,1.2,40\na2,c1,3,x,1,1\n")
    assert main(["ads", "load", str(path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["loaded"] == 1 and out["quarantined"] == 1 and "written" not in out  # no partition key "" of ads
    assert out["first_quarantined"] == ["line 3: quality is not a finite number"]
    assert out["features"] == {"numeric": ["quality", "bid", "text_len"], "categorical": ["category"],
                               "log_scaled": ["bid", "text_len"]}  # fmt: skip
    assert Lake(str(home / "lake")).read("ads")["ad_id"].tolist() == ["a1"]
    t = ms("2026-11-18T12:00:00+00:00")
    impressions = write(tmp_path / "impressions.csv", f"ts_ms,ad_id,clicked\n{t},a1,1\n{t},zz,0\nx,a1,1\n")
    assert main(["impressions", "load", str(impressions)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["written"] == {"2026-11-18": 2} and out["quarantined"] == 1 and out["timezone"] == "UTC"
    assert out["mode"] == "replace" and out["unknown_ad_impressions"] == 1
    more = write(tmp_path / "more.csv", f"ts_ms,ad_id,clicked\n{t + 1},a1,1\n")
    assert main(["impressions", "load", str(more), "--append"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["written"], out["partition_rows"]) == ({"2026-11-18": 1}, {"2026-11-18": 3})
    assert out["mode"] == "append" and out["unknown_ad_impressions"] == 0


def test_the_command_quarantines_impressions_from_the_future(home, tmp_path, capsys):
    """`impressions load` wrote a row stamped 2099 into the partition 2099-06-01."""
    t, future = ms("2026-11-18T12:00:00+00:00"), ms("2099-06-01T00:00:00+00:00")  # decades after any clock's now
    impressions = write(tmp_path / "impressions.csv", f"ts_ms,ad_id,clicked\n{t},a1,1\n{future},a1,0\n")
    assert main(["impressions", "load", str(impressions)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["written"] == {"2026-11-18": 1} and out["quarantined"] == 1, out
    assert out["first_quarantined"][0].startswith("line 3: ts_ms is in the future: after "), out
    assert Lake(str(home / "lake")).partitions("ad_impressions") == ["2026-11-18"]


def test_appends_of_two_files_at_once_keep_both_files_rows(home, tmp_path, capsys, monkeypatch):
    """Two ``impressions load --append`` of different files into the same day at once (parallel loads of hourly
    exports): they take turns on the lake's lock file, so the day ends with both files' rows. Before, each read the
    day, added its rows and wrote it back: the later write dropped the other file's rows, while both commands printed
    them as written (3.0M of 4.5M rows left, through the command). Here both reads are held until both have begun."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    t = ms("2026-11-18T12:00:00+00:00")
    files = {}
    for name, n in (("base", 3), ("one", 5), ("two", 7)):
        lines = "".join(f"{t + i},{name}{i},{i % 2}\n" for i in range(n))
        files[name] = write(tmp_path / f"{name}.csv", "ts_ms,ad_id,clicked\n" + lines)
    base, first, second = files.values()
    assert main(["impressions", "load", str(base)]) == 0
    both_reading = threading.Barrier(2, timeout=5)  # passes only if the two loads read the day at the same time
    read = Lake.read

    def held_read(self, asset, partition=None, columns=None):
        if asset == "ad_impressions":
            with contextlib.suppress(threading.BrokenBarrierError):  # taking turns: the other load never comes
                both_reading.wait()
        return read(self, asset, partition, columns)

    monkeypatch.setattr(Lake, "read", held_read)
    with ThreadPoolExecutor(2) as pool:
        codes = list(pool.map(lambda path: main(["impressions", "load", str(path), "--append"]), [first, second]))
    assert codes == [0, 0]
    day = read(Lake(str(home / "lake")), "ad_impressions", "2026-11-18")
    counts = day["ad_id"].str.rstrip("0123456789").value_counts()
    assert sorted(counts.items()) == [("base", 3), ("one", 5), ("two", 7)]
    assert "waiting for another impressions load of this lake" in capsys.readouterr().err


def test_a_configured_feature_set_is_what_ads_load_validates(home, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PRECOMPUTE_AD_NUMERIC", "price")
    monkeypatch.setenv("PRECOMPUTE_AD_CATEGORICAL", "brand")
    path = write(tmp_path / "ads.csv", "ad_id,price,brand\na1,9.5,acme\na2,-1,acme\na3,2,\n")
    assert main(["ads", "load", str(path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["features"] == {"numeric": ["price"], "categorical": ["brand"], "log_scaled": []}
    assert out["first_quarantined"] == ["line 4: brand is missing"]  # price is not log-scaled: -1 is fine
    monkeypatch.setenv("PRECOMPUTE_AD_LOG_SCALED", "price")
    assert main(["ads", "load", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["first_quarantined"][0] == "line 3: price is negative"


@pytest.mark.parametrize(
    "command, content, message",
    [
        ("ads", "ad_id,bid\na,1\n", "missing columns ['quality', 'text_len', 'category']"),
        ("ads", "", "empty file: no header row"),
        ("impressions", "ts_ms,ad\n1,a\n", "missing columns ['ad_id', 'clicked']"),
        ("impressions", "", "empty file: no header row"),
    ],
)
def test_a_wrong_schema_is_one_line_and_exit_2(home, tmp_path, capsys, command, content, message):
    path = write(tmp_path / "file.csv", content)
    assert main([command, "load", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith(f"precompute {command}: "), err
    assert not (home / "lake").exists()


def test_bad_files_and_a_malformed_feature_set_are_one_line_and_exit_2(home, tmp_path, capsys, monkeypatch):
    for argv, message in [
        (["ads", "load", str(tmp_path / "missing.csv")], "no such file"),
        (["impressions", "load", str(write(tmp_path / "x.txt", "x"))], "unknown suffix '.txt'"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    monkeypatch.setenv("PRECOMPUTE_AD_NUMERIC", "bid,bid")
    assert main(["ads", "load", str(write(tmp_path / "ads.csv", ADS_HEADER))]) == 2
    assert "a feature column is listed twice" in capsys.readouterr().err
    assert not home.exists()  # nothing was created for a bad file or setting


def test_nanosecond_timestamps_and_large_integer_ids_from_pandas_parquet(lake, tmp_path):
    """pandas writes datetime64[ns] and int64: the milliseconds are kept and ids above 2**53 stay exact."""
    t = ms("2026-11-18T12:00:00+00:00")
    frame = pd.DataFrame(
        {
            "ts_ms": pd.to_datetime([t, t + 1], unit="ms", utc=True) + pd.Timedelta(nanoseconds=123),
            "ad_id": pd.Series([1234567890123456789, 1234567890123456788], dtype="int64"),
            "clicked": [1, 0],
        }
    )
    path = tmp_path / "impressions.parquet"
    frame.to_parquet(path)
    summary = load_impressions(path, lake, timezone="UTC")
    assert summary.quarantined == 0
    day = lake.read("ad_impressions", "2026-11-18")
    assert day["ts_ms"].tolist() == [t, t + 1]
    assert day["ad_id"].tolist() == ["1234567890123456789", "1234567890123456788"]
