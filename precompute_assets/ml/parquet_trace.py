"""Parquet traces for ``replay``: a file, or a folder of them such as the lake's ``query_logs`` partitions.

Columns are chosen by name (or 1-based number): by default ``ts`` and ``key``, the query log's own
(``storage.tables.QUERY_LOGS``), so ``precompute replay --trace .precompute/lake/query_logs --where kind=ctr``
replays what the serving client logged. Only the chosen columns are read. Keys are integer or string columns;
timestamps are timestamp, numeric or ISO 8601 string columns, read as seconds. A missing key or timestamp is an
error that names its file and row, as a bad line of a text trace is.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections import deque
from collections.abc import Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .replay import PER_SECOND, Columns, Trace, TraceError, int64_keys, iso_seconds

PARQUET_COLUMNS: Columns = ("ts", "key")  # the query log's timestamp and key
LOGGED_HIT = "hit"  # the query log's boolean: did the serving client hit? (read when the file has it)
_MAGIC = b"PAR1"
READ_AHEAD = 8  # files of a folder read at once
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_NUL_KEY = "the key holds a NUL byte"


def is_parquet(path: str | Path) -> bool:
    """Whether ``path`` is a Parquet trace: a URI (see ``is_uri``), a folder (of ``.parquet`` files), a ``.parquet``
    or ``.pq`` file, or a regular file that starts with Parquet's magic bytes (a pipe is never read here: its
    bytes would be gone)."""
    if is_uri(path):
        return True
    path = Path(path)
    if path.is_dir() or path.suffix.lower() in (".parquet", ".pq"):
        return True
    return has_parquet_magic(path)


def has_parquet_magic(path: str | Path) -> bool:
    """Whether ``path`` is a regular file with Parquet's magic bytes at both ends: a text file may start with them (a
    first key ``PAR1001``), and was then refused as broken Parquet."""
    try:
        if not Path(path).is_file():
            return False
        with open(path, "rb") as file:
            head = file.read(len(_MAGIC))
            file.seek(-len(_MAGIC), os.SEEK_END)  # OSError for a file of fewer bytes
            return head == _MAGIC and file.read(len(_MAGIC)) == _MAGIC
    except OSError:
        return False  # the text reader says what is wrong with it


def read_parquet_trace(
    path: str | Path,
    *,
    columns: Columns | None = None,
    where: tuple[int | str, Collection[str]] | None = None,
    exact_keys: bool = False,
) -> Trace:
    """The requests of a Parquet file or folder (``_parquet_trace``); a malformed row (a key that is missing, empty or
    holds a NUL byte, a timestamp that is missing or no time) is a TraceError naming it, as a text trace's malformed
    line is one naming its line."""
    return _parquet_trace(path, columns, where, exact_keys, max_malformed=None)[0]


def read_parquet_trace_quarantining(
    path: str | Path,
    *,
    columns: Columns | None = None,
    where: tuple[int | str, Collection[str]] | None = None,
    exact_keys: bool = False,
    max_malformed: int,
) -> tuple[Trace, list[tuple[int, str]]]:
    """``read_parquet_trace`` with each malformed row (``_bad_keys``, and a timestamp ``_seconds`` found no time) cut
    out and counted, as ``replay.parse_trace_quarantining`` cuts a text trace's malformed lines: the trace and ``(row in
    its file, problem)`` of each row cut (the problem names the file and row). Rows ``where`` drops are not looked
    at. More than ``max_malformed`` such rows raise TraceError naming the first beyond."""
    return _parquet_trace(path, columns, where, exact_keys, max_malformed=max_malformed)


def _parquet_trace(
    path: str | Path,
    columns: Columns | None,
    where: tuple[int | str, Collection[str]] | None,
    exact_keys: bool,
    max_malformed: int | None,
) -> tuple[Trace, list[tuple[int, str]]]:
    """The requests of a Parquet file, or of every ``.parquet`` file under a folder (in path order; the lake
    names partitions by their start, so that is time order), as a ``Trace``; raise TraceError naming the bad row
    (and, in a folder, its file).

    ``columns`` is ``(timestamp column or None, key column)`` as for text traces (default ``PARQUET_COLUMNS``);
    ``where=(column, values)`` keeps the rows whose column, as text without padding, is one of ``values``. Each
    file is read and converted on its own, so files may store a column in different types: integer keys become
    strings when another file's keys are strings, as in a text trace. ``exact_keys``: uint64 keys of 2^63 and above
    stay the text of their number (``replay.parse_trace``), not the negative int64 of their bits. ``max_malformed``:
    None refuses a malformed row (a bad key or timestamp), a number cuts up to that many such rows (returned as
    ``(row in its file, problem)``)."""
    filesystem, files, label = _files(path)  # label: how errors name each file (in a folder)
    if not files:
        raise TraceError("the folder holds no .parquet file")
    with _reading(label[files[0]]):
        schema = pq.read_schema(files[0], filesystem=filesystem)
    names = schema.names
    time_col, key_col = columns or PARQUET_COLUMNS
    time_name = None if time_col is None else _column(time_col, names, "timestamp")
    key_name = _column(key_col, names, "key")
    if time_name == key_name:
        raise TraceError(f"the timestamp and the key are both column {key_name!r}")
    where_name = None if where is None else _column(where[0], names, "--where")
    # boolean, or all null in a file of imported requests (a request log knows no hits), which may come first
    logged = LOGGED_HIT in names and _hit_type(schema.field(LOGGED_HIT).type)
    hit_name = LOGGED_HIT if logged else None
    named = (time_name, key_name, where_name, hit_name)
    wanted = list(dict.fromkeys(name for name in named if name is not None))
    values = None if where is None else pa.array(sorted(where[1]), pa.string())
    keys, stamps, kept, hits, lacking, sound = [], [], [], [], [], []
    cut: list[tuple[int, str]] = []  # (row in its file, problem) of each row cut
    numbers = False  # whether a file's timestamps are numbers, in a unit of their own (else times or ISO 8601 text)
    for file, table in zip(files, _tables(files, wanted, label, filesystem), strict=True):
        key_column = _utf8(_decoded(table[key_name]), key_name, label[file])
        if values is not None:
            kept.append(_kept(_decoded(table[where_name]), where_name, values, label[file]))
        problems = dict(_bad_keys(key_column))  # row -> why it is malformed: its key's, else its timestamp's
        if time_name is not None:
            stamp_column = _utf8(_decoded(table[time_name]), time_name, label[file])
            numbers |= pa.types.is_integer(stamp_column.type) or pa.types.is_floating(stamp_column.type)
            seconds, bad_times = _seconds(stamp_column, time_name, label[file])
            stamps.append(seconds)
            for row, problem in bad_times:
                problems.setdefault(row, problem)
        sound.append(np.ones(len(key_column), dtype=bool))
        bad = np.zeros(len(key_column), dtype=bool)  # given a placeholder key; cut only if --where keeps the row
        for row, problem in sorted(problems.items()):
            bad[row] = True
            if values is None or kept[-1][row]:  # else --where drops it (another kind's row of the lake)
                cut.append(_quarantined(row, problem, label[file], len(cut), max_malformed))
                sound[-1][row] = False
        keys.append(_keys(_filled(key_column, bad), key_name, label[file], exact_keys))
        if hit_name is not None:
            column = table[hit_name]  # a row without a hit counts only if --where keeps it
            column = column.cast(pa.bool_()) if _hit_type(column.type) else pa.nulls(len(column), pa.bool_())
            hits.append(column.fill_null(False).to_numpy(zero_copy_only=False).astype(bool))
            lacking.append(column.is_null().to_numpy(zero_copy_only=False).astype(bool))
    if sum(len(part) for part in keys) == 0:
        raise TraceError("the trace has no rows")
    if cut:  # the rows cut leave every column, before the key type is chosen from the keys that are left
        keys, stamps, kept, hits, lacking = (_rows_kept(parts, sound) for parts in (keys, stamps, kept, hits, lacking))
        if sum(len(part) for part in keys) == 0:
            raise TraceError(f"no request is left: all {len(cut)} rows are malformed (the first, {cut[0][1]})")
    keys = [part for part in keys if len(part)]  # a file without rows has no say in the keys' type
    if any(part.dtype == object for part in keys):
        keys = [part if part.dtype == object else part.astype(str).astype(object) for part in keys]
    trace_keys = np.concatenate(keys)
    timestamps = np.concatenate(stamps) if time_name is not None else None
    logged_hits = np.concatenate(hits) if hits else None
    hit_gaps = np.concatenate(lacking) if hits else None
    layout: dict = {}
    if values is not None:
        mask = np.concatenate(kept)
        if not mask.any():
            raise TraceError(f"no row has column {where_name!r} in {sorted(where[1])}")
        trace_keys, timestamps = trace_keys[mask], None if timestamps is None else timestamps[mask]
        if logged_hits is not None:
            logged_hits, hit_gaps = logged_hits[mask], hit_gaps[mask]
        layout["where"] = {
            "field": names.index(where_name) + 1,
            "values": sorted(where[1]),
            "dropped": int((~mask).sum()),
        }
    if hit_gaps is not None and hit_gaps.any():
        logged_hits = None  # a counted request without a logged hit: never a guess
    trace = Trace(
        keys=trace_keys,
        timestamps=timestamps,
        fields=len(names),
        timestamp_field=None if time_name is None else names.index(time_name) + 1,
        key_field=names.index(key_name) + 1,
        header=tuple(names),
        format="parquet",
        logged_hits=logged_hits,
        dated=time_name is not None and not numbers,
        **layout,
    )
    return trace, cut


@contextlib.contextmanager
def _reading(label: str) -> Iterator[None]:
    """Arrow's errors of a file that is not readable Parquet as one TraceError (a missing or forbidden file stays
    the OSError it is)."""
    try:
        yield
    except (pa.ArrowException, OSError) as exc:
        if isinstance(exc, FileNotFoundError | PermissionError):
            raise
        raise TraceError(_at(label, f"not a readable Parquet file ({exc})")) from None


def _files(path: str | Path) -> tuple[pafs.FileSystem | None, list, dict]:
    """The filesystem of ``path`` (None: the local one, by ``pathlib``), its ``.parquet`` files (a file itself, or
    every one under a folder, in path order) and each one's name in errors (its path in the folder)."""
    if not is_uri(path):
        path = Path(path)
        folder = path.is_dir()
        files = sorted(p for p in path.rglob("*.parquet") if p.is_file()) if folder else [path]
        return None, files, {file: str(file.relative_to(path)) if folder else "" for file in files}
    try:
        filesystem, root = pafs.FileSystem.from_uri(str(path))
        info = filesystem.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
        if info.type != pafs.FileType.Directory:
            return filesystem, [root], {root: ""}
        found = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
    except pa.ArrowException as exc:  # an unknown scheme, a bucket we may not list, no credentials...
        raise TraceError(f"not readable through Arrow's filesystems ({exc})") from None
    files = sorted(f.path for f in found if f.type == pafs.FileType.File and f.path.endswith(".parquet"))
    return filesystem, files, {file: file[len(root.rstrip("/")) + 1 :] for file in files}


def is_uri(path: str | Path) -> bool:
    """Whether ``path`` is a URI (``s3://bucket/lake/query_logs``, ``file:///...``): read through Arrow's
    filesystems, as the lake's ``base_uri`` is."""
    return isinstance(path, str) and _URI.match(path) is not None


def _hit_type(kind: pa.DataType) -> bool:
    return pa.types.is_boolean(kind) or pa.types.is_null(kind)


def _tables(files: list, wanted: list[str], label: dict, filesystem: pafs.FileSystem | None) -> Iterator[pa.Table]:
    """The ``wanted`` columns of each file, in order, up to ``READ_AHEAD`` files read at once: a folder of hourly
    files on object storage costs a round trip per file, and threads overlap them (Arrow's reads release the GIL)."""
    with ThreadPoolExecutor(max_workers=READ_AHEAD) as pool:
        reading: deque = deque()
        for file in files:
            reading.append(pool.submit(_read, file, wanted, label[file], filesystem))
            if len(reading) >= READ_AHEAD:
                yield reading.popleft().result()
        while reading:
            yield reading.popleft().result()


def _read(file: Path | str, wanted: list[str], label: str, filesystem: pafs.FileSystem | None) -> pa.Table:
    """The ``wanted`` columns of ``file``, its footer read once."""
    with _reading(label), pq.ParquetFile(file, filesystem=filesystem) as parquet:
        missing = [name for name in wanted if name not in parquet.schema_arrow.names]
        if missing:
            raise TraceError(_at(label, f"no column named {missing[0]!r}, which the first file has"))
        return parquet.read(columns=wanted)


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


def _at(file: str, problem: str, row: int | None = None) -> str:
    """``problem`` prefixed with where it is: the file (in a folder) and the 1-based row, when known."""
    place = " ".join(part for part in (file, "" if row is None else f"row {row + 1}") if part)
    return f"{place}: {problem}" if place else problem


def _decoded(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """A dictionary-encoded column as its plain values."""
    return pc.cast(column, column.type.value_type) if pa.types.is_dictionary(column.type) else column


def _utf8(column: pa.ChunkedArray, name: str, label: str) -> pa.ChunkedArray:
    """A binary column as the text it holds: Hive, Impala and older Spark write strings without Parquet's UTF8
    annotation, and Arrow reads them as bytes. Bytes that are not UTF-8 are a TraceError naming the row."""
    if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        return column
    try:
        return pc.cast(column, pa.large_string() if pa.types.is_large_binary(column.type) else pa.string())
    except pa.ArrowInvalid:
        row = next(i for i, value in enumerate(column.to_pylist()) if value is not None and not _is_utf8(value))
        raise TraceError(_at(label, f"column {name!r} holds bytes that are not UTF-8 text", row)) from None


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _first(mask: pa.ChunkedArray | np.ndarray) -> int | None:
    found = np.flatnonzero(mask if isinstance(mask, np.ndarray) else mask.to_numpy(zero_copy_only=False))
    return int(found[0]) if len(found) else None


def _keys(column: pa.ChunkedArray, name: str, label: str, exact: bool = False) -> np.ndarray:
    """int64 keys for an integer column (``replay.int64_keys``; with ``exact``, a uint64 one as the text of its
    numbers), ``str`` keys without padding for a string column; anything else is not a key. Its rows are sound
    (``_bad_keys``: none missing, empty or holding a NUL byte)."""
    kind = column.type
    if exact and pa.types.is_uint64(kind):  # int64_keys keeps them distinct, as negative numbers: not the ids
        return pc.cast(column, pa.string()).to_numpy(zero_copy_only=False).astype(object)
    if pa.types.is_integer(kind):
        return int64_keys(column.to_numpy())
    if _is_text(kind):
        return pc.utf8_trim_whitespace(column).to_numpy(zero_copy_only=False).astype(object)
    raise TraceError(_at(label, f"key column {name!r} holds {kind}: keys are integers or strings"))


def _is_text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _bad_keys(column: pa.ChunkedArray) -> list[tuple[int, str]]:
    """``(row, problem)`` of each row whose key is missing, empty (blanks only) or holds a NUL byte, in row order:
    rows a request log's writer got wrong, which a text trace's line never holds either."""
    bad = {int(row): "the key is missing" for row in _rows(pc.is_null(column))}
    if _is_text(column.type):
        bad.update(
            (int(row), "the key is empty")
            for row in _rows(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(column)), 0))
        )
        bad.update((int(row), _NUL_KEY) for row in _rows(pc.match_substring(column, "\0")))
    return sorted(bad.items())


def _rows(mask: pa.ChunkedArray) -> np.ndarray:
    """The rows where ``mask`` is true (null: false)."""
    return np.flatnonzero(pc.fill_null(mask, False).to_numpy(zero_copy_only=False))


def _filled(column: pa.ChunkedArray, bad: np.ndarray) -> pa.ChunkedArray:
    """``column`` with each ``bad`` row set to a valid key of its type, for ``_keys`` to convert the column whole:
    those rows are cut, or dropped by ``--where``, after."""
    if not bad.any():
        return column
    if not (_is_text(column.type) or pa.types.is_integer(column.type)):
        return column  # a column of no key type: _keys names its type
    filler = pa.scalar("-" if _is_text(column.type) else 0, column.type)
    return pc.if_else(pa.array(bad), filler, column)


def _quarantined(row: int, problem: str, label: str, already: int, max_malformed: int | None) -> tuple[int, str]:
    """``(row in its file, problem)`` of a row whose key is bad (``_bad_keys``), to cut after ``already`` rows cut; a
    TraceError naming it when rows are not cut (``max_malformed`` None) or ``max_malformed`` are cut already."""
    problem = _at(label, problem, row)
    if max_malformed is not None and already < max_malformed:
        return row + 1, problem
    refused = TraceError(problem)
    if max_malformed is not None:
        refused.add_note(f"after {already} malformed rows were cut (at most {max_malformed})")
    raise refused


def _rows_kept(parts: list[np.ndarray], sound: list[np.ndarray]) -> list[np.ndarray]:
    """Each file's values (``parts``, none for a column not read) at its rows that are ``sound``."""
    return [part[ok] for part, ok in zip(parts, sound, strict=True)] if parts else parts


def _seconds(column: pa.ChunkedArray, name: str, label: str) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Timestamps as float seconds (a timestamp column since the epoch, numbers as they are, ISO 8601 strings), and
    ``(row, problem)`` of each row whose timestamp is missing or no time (NaN among the seconds). A column of
    another type is a TraceError."""
    kind = column.type
    if pa.types.is_timestamp(kind):
        seconds = pc.cast(column, pa.int64()).to_numpy(zero_copy_only=False).astype(np.float64) / PER_SECOND[kind.unit]
        written = None
    elif pa.types.is_integer(kind) or pa.types.is_floating(kind):
        seconds = column.to_numpy().astype(np.float64)  # a null is NaN
        written = None
    elif _is_text(kind):
        written = pd.Series(pc.utf8_trim_whitespace(column).to_numpy(zero_copy_only=False), dtype=object)
        seconds = iso_seconds(written.fillna(""))
    else:
        raise TraceError(
            _at(label, f"timestamp column {name!r} holds {kind}: timestamps are times, numbers or ISO 8601 text")
        )
    missing = pc.is_null(column).to_numpy(zero_copy_only=False).astype(bool)
    seconds[missing] = np.nan
    problems = []
    for row in np.flatnonzero(~np.isfinite(seconds)).tolist():
        if missing[row]:
            problem = "the timestamp is missing"
        elif written is None:
            problem = f"timestamp {float(seconds[row])!r} is not a finite number"
        else:
            problem = f"timestamp {written[row]!r} is not an ISO 8601 date-time"
        problems.append((row, problem))
    return seconds, problems


def _kept(column: pa.ChunkedArray, name: str, values: pa.Array, label: str) -> np.ndarray:
    """Whether each row's ``name`` column, as text without padding, is one of ``values`` (a null: no)."""
    try:
        text = pc.utf8_trim_whitespace(pc.cast(column, pa.string()))
    except pa.ArrowException as exc:
        raise TraceError(_at(label, f"--where column {name!r} holds {column.type}, not text ({exc})")) from None
    return pc.fill_null(pc.is_in(text, value_set=values), False).to_numpy(zero_copy_only=False)
