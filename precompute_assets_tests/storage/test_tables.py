"""The drains' table builders."""

from __future__ import annotations

from precompute_assets.storage.tables import QUARANTINE, QuarantinedRows


def test_quarantined_rows_are_packed_a_chunk_at_a_time_and_kept_in_order() -> None:
    """A drain kept every quarantined row as a dict for the whole hour (about 700 bytes a row with 300-character
    keys, 450 packed): they are packed into Arrow as the valid rows are, and come back whole and in order."""
    rows = QuarantinedRows(chunk=2)
    for i in range(5):
        rows.append({"stream_id": f"{i}-0", "reason": "bad", "raw": "{}"})
    table = rows.table()
    assert len(rows) == 5 and table.schema == QUARANTINE
    assert table.column("stream_id").to_pylist() == ["0-0", "1-0", "2-0", "3-0", "4-0"]
    assert QuarantinedRows().table().num_rows == 0  # an hour without a bad row
