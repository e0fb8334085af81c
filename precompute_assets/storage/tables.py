"""Columnar schemas of the offline tables, and builders from plain rows."""

from __future__ import annotations

import datetime
import decimal
import numbers
from typing import Any

import numpy as np
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


def not_text(value: Any) -> str | None:
    """Why ``value`` cannot become a text value (a list, a mapping, bytes, any other object: its repr is no
    text), or None: text, numbers, booleans, times and missing values can."""
    if value is None or value is pd.NA or isinstance(value, (str, numbers.Real, np.bool_, np.datetime64)):
        return None  # NaN is a Real; numpy's numbers register as Real, its booleans do not
    if isinstance(value, (datetime.date, datetime.time, decimal.Decimal)):
        return None
    return f"must be text or a number, got {type(value).__name__}"


QUARANTINE = pa.schema([("stream_id", pa.string()), ("reason", pa.string()), ("raw", pa.string())])


# What the ``query_logs`` drain writes: the columns above, then the A/B arm and the version read (None: outside an
# experiment; no version served).
QUERY_LOG_DRAIN = QUERY_LOGS.append(pa.field("arm", pa.string())).append(pa.field("version", pa.string()))

# What the ``user_events`` drain writes.
USER_EVENT_SCHEMA = pa.schema(
    [
        ("stream_id", pa.string()),
        ("ts", pa.timestamp("ms", tz="UTC")),
        ("ts_ms", pa.int64()),
        ("user", pa.string()),
        ("action", pa.string()),
        ("entity", pa.string()),
        ("tenant", pa.string()),
    ]
)

# The lake's tables by asset, whoever writes them (a drain, an import): pandas infers a column that holds no value as
# of no type, and files of one folder that disagree on a column's type cannot be read as one dataset.
LAKE_SCHEMAS = {
    "query_logs": QUERY_LOG_DRAIN,
    "query_log_quarantine": QUARANTINE,
    "user_events": USER_EVENT_SCHEMA,
    "user_event_quarantine": QUARANTINE,
}


def query_log_table(rows: list[dict[str, Any]], schema: pa.Schema = QUERY_LOGS) -> pa.Table:
    """Validated query events (from ``serving.querylog.validate_entry``) as a table of ``schema``'s columns."""
    columns = {name: [row[name] for row in rows] for name in schema.names if name != "ts"}
    columns["ts"] = [row["ts_ms"] for row in rows]
    return pa.table({name: pa.array(columns[name], type=schema.field(name).type) for name in schema.names})


def query_log_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Validated query events (from ``serving.querylog.validate_entry``) as a typed DataFrame."""
    return query_log_table(rows).to_pandas()


class QuarantinedRows:
    """A drain's quarantined rows (``serving.querylog.quarantine_row``), packed into Arrow every ``chunk`` rows as its
    valid rows are: kept as dicts for the whole hour, a client bug that made every query malformed cost about 1.6 KB
    a query (300-character keys)."""

    def __init__(self, chunk: int = 50_000) -> None:
        self._chunk, self._tables, self._rows, self._count = chunk, [], [], 0

    def append(self, row: dict[str, Any]) -> None:
        self._rows.append(row)
        self._count += 1
        if len(self._rows) >= self._chunk:
            self._tables.append(pa.Table.from_pylist(self._rows, schema=QUARANTINE))
            self._rows = []

    def __len__(self) -> int:
        return self._count

    def table(self) -> pa.Table:
        """Every row appended, as one table of ``QUARANTINE``'s columns."""
        return pa.concat_tables([*self._tables, pa.Table.from_pylist(self._rows, schema=QUARANTINE)])
