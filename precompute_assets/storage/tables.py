"""Columnar schemas of the offline tables, and builders from plain rows."""

from __future__ import annotations

from typing import Any

import pandas as pd
import pyarrow as pa

QUERY_LOGS = pa.schema(
    [
        ("stream_id", pa.string()),
        ("ts", pa.timestamp("ms", tz="UTC")),
        ("kind", pa.string()),
        ("key", pa.string()),
        ("hit", pa.bool_()),
        ("latency_us", pa.int64()),
        ("user", pa.string()),
        ("tenant", pa.string()),
    ]
)

QUARANTINE = pa.schema([("stream_id", pa.string()), ("reason", pa.string()), ("raw", pa.string())])


def query_log_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Validated query events (from ``serving.querylog.validate_entry``) as a typed DataFrame."""
    columns = {name: [row[name] for row in rows] for name in QUERY_LOGS.names if name != "ts"}
    columns["ts"] = [row["ts_ms"] for row in rows]
    table = pa.table({name: pa.array(columns[name], type=QUERY_LOGS.field(name).type) for name in QUERY_LOGS.names})
    return table.to_pandas()


def quarantine_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pa.Table.from_pylist(rows, schema=QUARANTINE).to_pandas()
