"""Historical request logs into hourly query_logs frames: units, hours in any timezone, quarantine."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import numpy as np
import pytest

from precompute_assets.defs.partitions import Partitions
from precompute_assets.storage import query_log_import
from precompute_assets.storage.query_log_import import (
    BEFORE_FIRST,
    IMPORTED,
    NOT_OVER,
    OTHER_UNIT,
    epoch_seconds,
    hour_rows,
    is_imported,
    is_relative,
    looks_like_filetime,
    other_unit,
)


@pytest.mark.parametrize(
    ("value", "unit", "seconds"),
    [
        (1_764_000_000, "auto", 1_764_000_000),
        (1_764_000_000_123, "auto", 1_764_000_000.123),
        (1_764_000_000_123_456, "auto", 1_764_000_000.123456),
        (1_764_000_000_123_456_789, "auto", 1_764_000_000.123456789),
        (90_000, "ms", 90.0),  # relative milliseconds: auto would read seconds, so the unit is told
        (128_166_372_000_000_000, "filetime", 1_172_163_600),  # MSR Cambridge: 100 ns since 1601, 2007-02-22
    ],
)
def test_epoch_seconds_reads_the_unit_by_size_or_as_told(value, unit, seconds) -> None:
    assert epoch_seconds(np.array([value, value]), unit)[0] == pytest.approx(seconds, abs=1e-3)


def test_windows_file_times_are_recognised() -> None:
    assert looks_like_filetime(np.array([128_166_372_000_000_000, 128_173_000_000_000_000]))
    assert not looks_like_filetime(np.array([1_764_000_000_123_456_789])) and not looks_like_filetime(np.array([5.0]))


def test_relative_timestamps_are_recognised() -> None:
    assert is_relative(np.array([0.5, 3600.0])) and not is_relative(np.array([1_764_000_000.0]))


def rows_in(timezone: str, moments: list[datetime], keys: list[str], *, first="2026-01-01", hour_in_progress=None):
    partitions = Partitions(timezone, first)
    hourly = partitions.hourly
    first_s = datetime.fromisoformat(first).replace(tzinfo=ZoneInfo(timezone)).timestamp()
    last_s = (hour_in_progress or datetime(2027, 1, 1, tzinfo=ZoneInfo("UTC"))).timestamp()
    seconds = np.array([m.timestamp() for m in moments])
    return hour_rows(np.array(keys, dtype=object), seconds, kind="ctr", source="t.csv",
                     partition_key=hourly.get_partition_key_for_timestamp, first_s=first_s, last_s=last_s)  # fmt: skip


def test_requests_land_in_the_local_hour_of_a_half_hour_zone() -> None:
    kolkata = ZoneInfo("Asia/Kolkata")  # UTC+5:30: local hours start at :30 UTC
    moments = [datetime(2026, 3, 1, 10, 5, tzinfo=kolkata), datetime(2026, 3, 1, 10, 55, tzinfo=kolkata),
               datetime(2026, 3, 1, 11, 0, tzinfo=kolkata)]  # fmt: skip
    rows = rows_in("Asia/Kolkata", moments, ["a", "b", "c"])
    assert {hour: list(frame["key"]) for hour, frame in rows.frames.items()} == {
        "2026-03-01-10:00": ["a", "b"],
        "2026-03-01-11:00": ["c"],
    }
    frame = rows.frames["2026-03-01-10:00"]
    assert frame["hit"].isna().all() and frame["arm"].isna().all() and set(frame["kind"]) == {"ctr"}
    assert list(frame["ts"]) == [m.astimezone(ZoneInfo("UTC")) for m in moments[:2]]
    assert is_imported(frame) and frame["stream_id"].str.startswith(IMPORTED).all()
    # each row's id names the file and the request's row in it, as strings in every hour
    assert list(frame["stream_id"]) == [f"{IMPORTED}t.csv:0", f"{IMPORTED}t.csv:1"]
    assert list(rows.frames["2026-03-01-11:00"]["stream_id"]) == [f"{IMPORTED}t.csv:2"]


def test_the_repeated_hour_of_a_dst_fall_back_is_two_partitions() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    moments = [
        datetime(2026, 10, 25, 2, 30, fold=0, tzinfo=berlin),
        datetime(2026, 10, 25, 2, 30, fold=1, tzinfo=berlin),
    ]
    rows = rows_in("Europe/Berlin", moments, ["first", "second"])
    # Dagster's keys: the first 02:00 (CEST), then the repeated one with its offset (CET, +01:00)
    assert {hour: frame["key"].tolist() for hour, frame in rows.frames.items()} == {
        "2026-10-25-02:00": ["first"],
        "2026-10-25-02:00+0100": ["second"],
    }


def test_bad_keys_and_times_outside_the_partitions_are_quarantined_and_counted() -> None:
    utc = ZoneInfo("UTC")
    moments = [datetime(2025, 12, 31, 23, tzinfo=utc), datetime(2026, 5, 1, 9, tzinfo=utc),
               datetime(2026, 5, 1, 9, 1, tzinfo=utc), datetime(2026, 5, 1, 9, 2, tzinfo=utc),
               datetime(2026, 5, 1, 9, 3, tzinfo=utc), datetime(2026, 5, 1, 12, 30, tzinfo=utc)]  # fmt: skip
    keys = ["early", "", "x" * 300, "tab\there", "fine", "this hour"]
    rows = rows_in("UTC", moments, keys, hour_in_progress=datetime(2026, 5, 1, 12, tzinfo=utc))
    assert [list(frame["key"]) for frame in rows.frames.values()] == [["fine"]]
    assert rows.quarantined == {
        "before the first hourly partition": 1,
        "empty key": 1,
        "key longer than 256 characters": 1,
        "key contains control characters": 1,
        "in an hour that is not over": 1,
    }


def test_hour_frames_are_built_when_read_not_all_at_once() -> None:
    # An import of 10M requests held every hour's frame before writing the first (2.6 GB): now an hour is built from
    # its row numbers when it is read, so what hour_rows keeps is a few numbers per request, not a row of strings.
    import tracemalloc

    import pyarrow as pa

    n, hours = 200_000, 100
    rng = np.random.default_rng(0)
    keys = rng.integers(1, 10_000, n)
    seconds = np.sort(rng.uniform(0, hours * 3600.0, n)) + datetime(2026, 3, 1, tzinfo=ZoneInfo("UTC")).timestamp()
    key_of = Partitions("UTC", "2026-01-01").hourly.get_partition_key_for_timestamp
    arrow_before = pa.total_allocated_bytes()
    tracemalloc.start()
    try:
        rows = hour_rows(keys, seconds, kind="ctr", source="t.csv", partition_key=key_of, first_s=0.0,
                         last_s=seconds[-1] + 1)  # fmt: skip
        kept = tracemalloc.get_traced_memory()[0] + pa.total_allocated_bytes() - arrow_before
    finally:
        tracemalloc.stop()
    assert kept < 40 * n
    assert len(rows.frames) == hours and sum(rows.frames.requests(hour) for hour in rows.frames) == n
    first = rows.frames["2026-03-01-00:00"]
    assert len(first) == rows.frames.requests("2026-03-01-00:00")
    assert list(first["key"]) == [str(k) for k in keys[: len(first)]]


def test_one_corrupt_timestamp_is_quarantined_not_taken_for_the_whole_logs_unit() -> None:
    """A request log of epoch seconds with one corrupt row (1e300, or -5): that row is quarantined and counted, the
    others imported. By the largest timestamp every request was read as nanoseconds, by the smallest as relative:
    the import refused the whole log with "the timestamps count from the trace's start"."""
    good = [1_780_000_000 + 10 * i for i in range(100)]
    for corrupt, reason in ((1e300, NOT_OVER), (-5.0, BEFORE_FIRST)):
        seconds = epoch_seconds(np.array([*good[:50], corrupt, *good[50:]], dtype=np.float64))
        assert not is_relative(seconds)
        placed = hour_rows(np.array([f"ad{i}" for i in range(101)], dtype=object), seconds, kind="ctr",
                           source="t.csv", partition_key=Partitions("UTC").hourly.get_partition_key_for_timestamp,
                           first_s=1_767_225_600.0, last_s=1_800_000_000.0)  # fmt: skip
        assert sum(placed.frames.requests(hour) for hour in placed.frames) == 100
        assert dict(placed.quarantined) == {reason: 1}


@pytest.mark.parametrize("in_ms", [10, 50])  # of 100 requests: a logger moved from seconds to milliseconds
def test_timestamps_in_another_unit_than_the_logs_are_quarantined_as_such(in_ms: int) -> None:
    """A minority in milliseconds among seconds was quarantined as "in an hour that is not over" (the year 57,000);
    half and half was no log of either unit (their median's blend read as seconds counted from the trace's start),
    refused with "give --start"."""
    good = [1_780_000_000 + 10 * i for i in range(100)]
    timestamps = np.array([t * 1000 + 7 if i < in_ms else t for i, t in enumerate(good)], dtype=np.float64)
    seconds = epoch_seconds(timestamps)
    assert not is_relative(seconds)
    strays = other_unit(timestamps)
    assert strays.tolist() == [i < in_ms for i in range(100)]
    placed = hour_rows(np.array([f"ad{i}" for i in range(100)], dtype=object), seconds, kind="ctr", source="t.csv",
                       partition_key=Partitions("UTC").hourly.get_partition_key_for_timestamp,
                       first_s=1_767_225_600.0, last_s=1_800_000_000.0, strays=strays)  # fmt: skip
    assert sum(placed.frames.requests(hour) for hour in placed.frames) == 100 - in_ms
    assert dict(placed.quarantined) == {OTHER_UNIT: in_ms}
    corrupt = np.array([*good, 1e300, -5.0, 0.0])  # no time in any unit: left to the other reasons
    assert not other_unit(corrupt).any()


def test_other_unit_takes_the_logs_unit_that_the_import_found_once(monkeypatch) -> None:
    """The import finds the log's unit once (the median of every timestamp) for epoch_seconds, and other_unit takes
    it instead of finding it again; given, it decides as found, and another unit decides by it."""
    good = [1_780_000_000 + 10 * i for i in range(100)]
    timestamps = np.array([t * 1000 if i < 10 else t for i, t in enumerate(good)], dtype=np.float64)
    found = other_unit(timestamps)
    monkeypatch.setattr(query_log_import, "time_unit", lambda values: pytest.fail("the unit was found again"))
    assert other_unit(timestamps, "s").tolist() == found.tolist() == [i < 10 for i in range(100)]
    assert other_unit(timestamps, "ms").tolist() == [i >= 10 for i in range(100)]
