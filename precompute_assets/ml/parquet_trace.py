"""Parquet traces for ``replay``: a file, or a folder of them such as the lake's ``query_logs`` partitions.

Columns are chosen by name (or 1-based number): by default ``ts`` and ``key``, the query log's own
(``storage.tables.QUERY_LOGS``), so ``precompute replay --trace .precompute/lake/query_logs --where kind=ctr``
replays what the serving client logged. Only the chosen columns are read. Keys are integer or string columns;
timestamps are timestamp, numeric or ISO 8601 string columns, read as seconds. A missing key or timestamp is an
error that names its file and row, as a bad line of a text trace is.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .replay import Columns, Trace, TraceError

PARQUET_COLUMNS: Columns = ("ts", "key")  # the query log's timestamp and key
_MAGIC = b"PAR1"


def is_parquet(path: str | Path) -> bool:
    """Whether ``path`` is a Parquet trace: a folder (of ``.parquet`` files), a ``.parquet`` or ``.pq`` file, or a
    file that starts with Parquet's magic bytes."""
    path = Path(path)
    if path.is_dir() or path.suffix.lower() in (".parquet", ".pq"):
        return True
    try:
        with path.open("rb") as file:
            return file.read(len(_MAGIC)) == _MAGIC
    except OSError:
        return False  # the text reader says what is wrong with it


def read_parquet_trace(
    path: str | Path, *, columns: Columns | None = None, where: tuple[int | str, Collection[str]] | None = None
) -> Trace:
    """The requests of a Parquet file, or of every ``.parquet`` file under a folder (in path order; the lake
    names partitions by their start, so that is time order), as a ``Trace``; raise TraceError naming the bad row.

    ``columns`` is ``(timestamp column or None, key column)`` as for text traces (default ``PARQUET_COLUMNS``);
    ``where=(column, values)`` keeps the rows whose column, as text without padding, is one of ``values``."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*.parquet") if p.is_file()) if path.is_dir() else [path]
    if not files:
        raise TraceError("the folder holds no .parquet file")
    names = _schema(files[0]).names
    time_col, key_col = columns or PARQUET_COLUMNS
    time_name = None if time_col is None else _column(time_col, names, "timestamp")
    key_name = _column(key_col, names, "key")
    if time_name == key_name:
        raise TraceError(f"the timestamp and the key are both column {key_name!r}")
    where_name = None if where is None else _column(where[0], names, "--where")
    wanted = list(dict.fromkeys(name for name in (time_name, key_name, where_name) if name is not None))
    tables, starts = [], []
    rows = 0
    for file in files:
        table = _read(file, wanted)
        tables.append(table)
        starts.append(rows)
        rows += table.num_rows
    if rows == 0:
        raise TraceError("the trace has no rows")
    table = pa.concat_tables(tables, promote_options="permissive")

    def row_name(index: int) -> str:
        k = int(np.searchsorted(starts, index, side="right")) - 1
        where_from = f"{files[k].name} " if len(files) > 1 else ""
        return f"{where_from}row {index - starts[k] + 1}"

    kept = None
    if where_name is not None:
        text = pc.utf8_trim_whitespace(pc.cast(table[where_name], pa.string()))
        kept = pc.fill_null(pc.is_in(text, value_set=pa.array(sorted(where[1]), pa.string())), False)
        kept = kept.to_numpy(zero_copy_only=False)
        if not kept.any():
            raise TraceError(f"no row has column {where_name!r} in {sorted(where[1])}")
    keys = _keys(table[key_name], key_name, row_name)
    timestamps = None if time_name is None else _seconds(table[time_name], time_name, row_name)
    layout: dict = {}
    if kept is not None:
        keys, timestamps = keys[kept], None if timestamps is None else timestamps[kept]
        layout["where"] = {
            "field": names.index(where_name) + 1,
            "values": sorted(where[1]),
            "dropped": int((~kept).sum()),
        }
    return Trace(
        keys=keys,
        timestamps=timestamps,
        fields=len(names),
        timestamp_field=None if time_name is None else names.index(time_name) + 1,
        key_field=names.index(key_name) + 1,
        header=tuple(names),
        format="parquet",
        **layout,
    )


def _schema(file: Path) -> pa.Schema:
    try:
        return pq.read_schema(file)
    except (pa.ArrowInvalid, OSError) as exc:
        if isinstance(exc, FileNotFoundError | PermissionError):
            raise
        raise TraceError(f"{file.name}: not a readable Parquet file ({exc})") from None


def _read(file: Path, wanted: list[str]) -> pa.Table:
    missing = [name for name in wanted if name not in _schema(file).names]
    if missing:
        raise TraceError(f"{file.name}: no column named {missing[0]!r}, which the first file has")
    try:
        return pq.read_table(file, columns=wanted)
    except (pa.ArrowInvalid, OSError) as exc:
        if isinstance(exc, FileNotFoundError | PermissionError):
            raise
        raise TraceError(f"{file.name}: not a readable Parquet file ({exc})") from None


def _column(field: int | str, names: list[str], what: str) -> str:
    """The name of the ``what`` column given by name or 1-based number."""
    if isinstance(field, int) or (isinstance(field, str) and field.strip().isdigit()):
        number = int(field)
        if not 1 <= number <= len(names):
            raise TraceError(f"{what} column {number} does not exist: the file has {len(names)} columns")
        return names[number - 1]
    if field.strip() not in names:
        raise TraceError(f"no {what} column named {field!r}: the file has {', '.join(names)}")
    return field.strip()


def _first_null(column: pa.ChunkedArray) -> int | None:
    if column.null_count == 0:
        return None
    return int(np.flatnonzero(pc.is_null(column).to_numpy(zero_copy_only=False))[0])


def _keys(column: pa.ChunkedArray, name: str, row_name) -> np.ndarray:
    """int64 keys for an integer column (uint64 beyond int64 as the int64 of the same bits, still distinct),
    ``str`` keys for a string column; anything else is not a key."""
    kind = column.type.value_type if pa.types.is_dictionary(column.type) else column.type
    if (missing := _first_null(column)) is not None:
        raise TraceError(f"{row_name(missing)}: the key is missing")
    if pa.types.is_integer(kind):
        values = column.to_numpy()
        return values.view(np.int64).copy() if values.dtype == np.uint64 else values.astype(np.int64)
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        values = pc.cast(column, pa.large_string()).to_numpy(zero_copy_only=False).astype(object)
        empty = np.flatnonzero(pd.Series(values).str.len().to_numpy() == 0)
        if len(empty):
            raise TraceError(f"{row_name(int(empty[0]))}: the key is empty")
        return values
    raise TraceError(f"key column {name!r} holds {kind}: keys are integers or strings")


def _seconds(column: pa.ChunkedArray, name: str, row_name) -> np.ndarray:
    """Timestamps as float seconds: a timestamp column since the epoch, numbers as they are, ISO 8601 strings."""
    if (missing := _first_null(column)) is not None:
        raise TraceError(f"{row_name(missing)}: the timestamp is missing")
    kind = column.type
    if pa.types.is_timestamp(kind):
        ticks = pc.cast(column, pa.int64()).to_numpy()
        return ticks / {"s": 1, "ms": 1e3, "us": 1e6, "ns": 1e9}[kind.unit]
    if pa.types.is_integer(kind) or pa.types.is_floating(kind):
        seconds = column.to_numpy().astype(np.float64)
        if len(bad := np.flatnonzero(~np.isfinite(seconds))):
            raise TraceError(f"{row_name(int(bad[0]))}: timestamp {float(seconds[bad[0]])!r} is not a finite number")
        return seconds
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        text = pd.Series(column.to_numpy(zero_copy_only=False), dtype=object).str.strip()
        parsed = pd.to_datetime(text, format="ISO8601", utc=True, errors="coerce")
        if len(bad := np.flatnonzero(parsed.isna().to_numpy())):
            raise TraceError(f"{row_name(int(bad[0]))}: timestamp {text[bad[0]]!r} is not an ISO 8601 date-time")
        return (parsed - pd.Timestamp(0, tz="UTC")).dt.total_seconds().to_numpy(dtype=np.float64)
    raise TraceError(f"timestamp column {name!r} holds {kind}: timestamps are times, numbers or ISO 8601 text")
