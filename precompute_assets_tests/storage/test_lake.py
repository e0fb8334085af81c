"""The offline store takes a folder or a filesystem URI, and replaces files atomically."""

import pandas as pd
import pytest

from precompute_assets.defs.partitions import Partitions
from precompute_assets.storage.lake import Lake, partitions_before


@pytest.mark.parametrize("as_uri", [False, True])
def test_write_read_by_folder_or_uri(tmp_path, as_uri):
    base = f"file://{tmp_path}/lake" if as_uri else str(tmp_path / "lake")
    lake = Lake(base)
    frame = pd.DataFrame({"key": ["a", "b"], "n": [1, 2]})
    path = lake.write("query_logs", "2026-11-20-10:00", frame)
    assert path.endswith("/query_logs/2026-11-20-10:00.parquet")
    assert lake.exists("query_logs", "2026-11-20-10:00") and not lake.exists("query_logs", "2026-11-20-11:00")
    assert lake.read("query_logs", "2026-11-20-10:00").equals(frame)
    lake.write("query_logs", "2026-11-20-10:00", frame.head(1))  # replaced, no temp file left behind
    assert len(lake.read("query_logs", "2026-11-20-10:00")) == 1
    assert [p.name for p in (tmp_path / "lake" / "query_logs").iterdir()] == ["2026-11-20-10:00.parquet"]


def test_reading_what_the_lake_lacks_names_it_and_who_writes_a_source(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    with pytest.raises(FileNotFoundError, match=r"the lake has no ads \(no file .*/ads/__unpartitioned__.parquet\): "
                       r"load the ad catalog with `precompute ads load FILE`"):  # fmt: skip
        lake.read("ads")
    with pytest.raises(FileNotFoundError, match=r"the lake has no query_logs partition 2026-11-20-10:00 \(no file"):
        lake.read("query_logs", "2026-11-20-10:00")


# Arrow's own schema names the columns of read_table, not the pandas metadata beside it (which a flip may change)
READERS = {
    "pandas": Lake.read,
    "arrow": lambda lake, *args: Lake.read_table(lake, *args).to_pandas(ignore_metadata=True),
}


@pytest.mark.parametrize("reader", READERS)
def test_a_flipped_bit_or_a_cut_file_is_an_error_naming_the_file_never_other_values(tmp_path, reader):
    from pathlib import Path

    from precompute_assets.storage.lake import LakeReadError

    lake = Lake(str(tmp_path / "lake"))
    frame = pd.DataFrame({"ad_id": [f"ad{i % 700:06d}" for i in range(5000)], "ctr": [i / 5000 for i in range(5000)]})
    path = Path(lake.write("ctr_predictions", "2026-11-20", frame))
    data = path.read_bytes()
    differed = 0
    for at in range(4, len(data) - 8, max(1, len(data) // 97)):  # about 100 single-bit flips across the file
        flipped = bytearray(data)
        flipped[at] ^= 0x04
        path.write_bytes(bytes(flipped))
        try:
            differed += not READERS[reader](lake, "ctr_predictions", "2026-11-20").equals(frame)
        except LakeReadError as error:
            assert str(error).startswith(f"the lake cannot read {path} (corrupt or truncated?)")
    assert differed == 0  # every flip that changed a value was caught by its page checksum
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(LakeReadError, match="corrupt or truncated"):
        READERS[reader](lake, "ctr_predictions", "2026-11-20")


def test_a_files_rows_are_read_from_its_metadata_and_unknown_for_a_file_written_without_it(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    lake = Lake(str(tmp_path))
    lake.write("query_logs", "2026-11-18-05:00", pd.DataFrame({"key": ["a", "b", "c"]}))
    assert lake.rows("query_logs", "2026-11-18-05:00") == 3
    pq.write_table(pa.table({"key": ["a"]}), lake.path("query_logs", "2026-11-18-06:00"))  # an old writer's file
    assert lake.rows("query_logs", "2026-11-18-06:00") is None


def test_the_hours_of_a_dst_day_are_all_past_retention_with_their_day(tmp_path):
    """The fall-back day has 25 hours; the repeated one's key carries its offset (``2026-11-01-01:00-0500``)."""
    lake, frame = Lake(str(tmp_path)), pd.DataFrame({"x": [1]})
    for day in ("2026-03-08", "2026-11-01", "2026-11-02"):
        for hour in Partitions("America/New_York").hours_of(day):
            lake.write("query_logs", hour, frame)
    lake.write("query_logs", None, frame)
    keys = lake.partitions("query_logs")
    assert len(keys) == 23 + 25 + 24 + 1 and "2026-11-01-01:00-0500" in keys
    old = partitions_before(keys, "2026-11-02")
    assert len(old) == 23 + 25 and all(key[:10] < "2026-11-02" for key in old)
    assert partitions_before(["2026-11-01", "notes", "2026-11-01-x"], "2026-12-01") == ["2026-11-01"]


def test_a_local_write_reaches_the_disk_before_it_becomes_the_partition(tmp_path, monkeypatch):
    """The file was moved into place straight from the page cache: after a power loss (not a killed process) the
    partition could be an empty file while its materialization was recorded, and the stream trimmed (found by
    review). The temporary file is synced before the move, and its folder after."""
    import os

    folder = tmp_path / "lake" / "query_logs"
    final = folder / "2026-11-20-10:00.parquet"
    synced = []  # (what was synced, whether the partition's file existed then)
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append((os.readlink(f"/proc/self/fd/{fd}"), final.exists()))
                        or fsync(fd))  # fmt: skip
    Lake(str(tmp_path / "lake")).write("query_logs", "2026-11-20-10:00", pd.DataFrame({"key": ["a"]}))
    (file, moved_then), (dir_, moved_after) = synced
    assert os.path.basename(file).startswith(".2026-11-20-10:00.parquet.tmp-") and not moved_then
    assert dir_ == str(folder) and moved_after


def test_a_lake_uri_that_cannot_be_opened_is_named_without_its_secret():
    """pyarrow's parse error repeats the URI: an S3 secret with an unencoded '/' (common in AWS keys) was printed by
    the CLI and stored in Dagster's event log (h_secrets)."""
    with pytest.raises(ValueError, match=r"the lake s3://AKIAX:\*\*\*@bucket/lake cannot be opened") as raised:
        Lake("s3://AKIAX:Leak/Secret99@bucket/lake").read("ads", None)
    assert "Secret99" not in str(raised.value)
