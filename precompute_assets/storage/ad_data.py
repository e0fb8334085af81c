"""A user's own ad data into the lake: the ``ads`` catalog and daily ``ad_impressions``, from Parquet or CSV.

A file whose schema is wrong (a required column missing, a duplicated header, not CSV or Parquet at all, no header)
is refused as a whole with one ``AdDataError``. Rows that cannot be used are quarantined, never dropped silently:
each with where it was (``line N`` of a CSV, counting the header as line 1; ``row N`` of a Parquet file, from 1), the
reason and the raw values, in the lake's ``ads_quarantine`` / ``ad_impressions_quarantine``: one file per input file,
named by its content, which a load of the same file again replaces.

What each load writes (so loading the same file twice changes nothing):
- ads: the valid rows replace the lake's ``ads`` table (an export is a snapshot of the catalog). Which columns are
  required and what makes a row valid is the caller's (the ad feature set, see ``ml.features``); an ``ad_id`` that
  appears more than once keeps its last valid row, the earlier ones are counted as ``duplicates``.
- impressions: rows are split into daily partitions by ``ts_ms`` in the deployment's timezone; each day in the file
  replaces that day's partition, or is added to it with ``append=True``. A partition records which files (by content
  digest) its rows came from, and an append skips a day that already holds the file's rows: a load that failed part
  way can be run again, and the days it wrote are neither duplicated nor lost.

Pure pandas / pyarrow: the caller (the ``precompute`` command) passes the lake, the timezone and the validation.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import gzip
import hashlib
import json
import re
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..ml.ctr import local_days
from ..serving.querylog import MAX_KEY_LENGTH
from .files import first_bytes, not_text_reason, record_text, tapped_lines, unreadable_reason
from .lake import Lake

ID_COLUMN = "ad_id"
IMPRESSION_COLUMNS = ("ts_ms", "ad_id", "clicked")
ADS, ADS_QUARANTINE = "ads", "ads_quarantine"
IMPRESSIONS, IMPRESSIONS_QUARANTINE = "ad_impressions", "ad_impressions_quarantine"
# ts_ms must be epoch milliseconds in [2000-01-01, 2100-01-01): catches epoch seconds (1.7e9 is January 1970).
MIN_TS_MS, MAX_TS_MS = 946_684_800_000, 4_102_444_800_000
CHUNK_ROWS = 100_000
LOADED_FILES = b"precompute.loaded_files"  # an ad_impressions file's metadata: digests of the files its rows came from
ARROW_STRING = pd.ArrowDtype(pa.string())  # ids held in bulk: an Arrow buffer, not a Python object per row
EXAMPLES = 20  # quarantined rows named in the summary; all are counted and kept in the lake
_CLICKED = {"1": True, "0": False, "true": True, "false": False, "1.0": True, "0.0": False}
_CONTROL = "[\x00-\x1f\x7f]"
_UNDECODABLE = "[\udc80-\udcff]"  # bytes that were not UTF-8, as surrogateescape decodes them


class AdDataError(ValueError):
    """The file cannot be loaded at all (wrong schema, unreadable, unknown format); the message is one line."""


@dataclass
class LoadSummary:
    """What a load read, wrote and quarantined (printed as JSON by the ``precompute`` command)."""

    file: str
    format: str
    rows: int = 0  # data rows read (blank CSV lines are not rows)
    loaded: int = 0  # rows written to the lake
    quarantined: int = 0
    quarantine_reasons: dict[str, int] = field(default_factory=dict)
    first_quarantined: list[str] = field(default_factory=list)
    quarantine_path: str | None = None
    written: dict[str, int] | None = None  # impressions: day -> rows this file added (ads: ``loaded`` says it)
    partition_rows: dict[str, int] | None = None  # impressions: day -> rows the partition holds now
    already_loaded: list[str] | None = None  # impressions, append: days that held this file's rows already (skipped)
    unknown_ad_impressions: int | None = None  # impressions: rows written whose ad is not in the lake's ads
    duplicates: int | None = None  # ads: valid rows superseded by a later row with the same ad_id
    columns: list[str] | None = None  # ads: the columns of the written table
    note: str | None = None  # why nothing was written
    # impressions from Parquet: how a ts_ms timestamp without a time zone was read (as UTC: pandas' to_datetime of
    # epoch milliseconds writes such; local wall-clock times written so land up to a day off)
    naive_timestamps: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The summary without the fields that do not apply (None)."""
        return {name: value for name, value in asdict(self).items() if value is not None}


class _Quarantine:
    """Collects bad rows with where they were and why; counts them in the summary."""

    def __init__(self, summary: LoadSummary, unit: str) -> None:
        self.summary, self.unit = summary, unit
        self.rows: list[tuple[int, str, str]] = []  # (number, reason, raw JSON)
        self.load_id = f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"

    def add(self, number: int, reason: str, raw: object) -> None:
        self.rows.append((number, reason, json.dumps(raw, default=str, ensure_ascii=False)))
        self.summary.quarantined += 1
        reasons = self.summary.quarantine_reasons
        reasons[reason] = reasons.get(reason, 0) + 1

    def add_rows(self, frame: pd.DataFrame, numbers: np.ndarray, problems: pd.Series | np.ndarray, reason=None):
        """Quarantines the rows of ``frame`` with a problem (a reason per row, or a mask and one ``reason``);
        returns the mask of the good ones."""
        problems = np.asarray(problems, dtype=object)
        bad = problems.astype(bool) if reason else ~pd.isna(problems)
        rows = np.flatnonzero(bad)
        # One conversion of all bad rows, not one Series per row: a file whose every row is bad (timestamps in
        # seconds) is as quick to quarantine as a good one is to load.
        for i, record in zip(rows, frame.iloc[rows].to_dict("records"), strict=True):
            self.add(int(numbers[i]), reason or problems[i], {c: _plain(v) for c, v in record.items()})
        return ~bad

    def write(self, lake: Lake, asset: str, digest: str) -> None:
        """The quarantined rows, in file order, as one lake file per input file (named by its content ``digest``: a
        load of the same file again replaces it rather than adding a copy); the first ones in the summary."""
        if not self.rows:
            return
        self.rows.sort(key=lambda row: row[0])
        where = [f"{self.unit} {number}" for number, _, _ in self.rows]
        reasons = [reason for _, reason, _ in self.rows]
        self.summary.first_quarantined = [f"{w}: {r}" for w, r in zip(where[:EXAMPLES], reasons, strict=False)]
        n = len(self.rows)
        table = pa.table(
            {
                "load_id": pa.array([self.load_id] * n, pa.string()),
                "file": pa.array([self.summary.file] * n, pa.string()),
                "where": pa.array(where, pa.string()),
                "reason": pa.array(reasons, pa.string()),
                # raw values as JSON; undecodable bytes stay visible as \udcXX escapes
                "raw": pa.array([raw.encode("utf-8", "backslashreplace").decode() for _, _, raw in self.rows]),
            }
        )
        self.summary.quarantine_path = lake.write(asset, f"file-{digest[:16]}", table)


def _plain(value: object) -> object:
    """A cell as a plain Python value for JSON; missing (None, NaN, NA, NaT) is None."""
    if value is None or value is pd.NA or value is pd.NaT or (isinstance(value, float) and np.isnan(value)):
        return None
    return value.item() if isinstance(value, np.generic) else value


def file_format(path: str | Path) -> str:
    """``"csv"`` (also ``.csv.gz``) or ``"parquet"`` (``.parquet``, ``.pq``) by suffix, for a readable file (a CSV
    one that is text: ``not_text_reason``)."""
    path = Path(path)
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    if suffixes[-1:] in ([".parquet"], [".pq"]):
        kind = "parquet"
    elif suffixes[-1:] == [".csv"] or suffixes == [".csv", ".gz"]:
        kind = "csv"
    else:
        raise AdDataError(f"{path}: unknown suffix {path.suffix or '(none)'!r}; expected .csv, .csv.gz or .parquet")
    reason = unreadable_reason(path)
    if reason is None and kind == "csv":
        start = first_bytes(path)
        reason = not_text_reason(path, start) or _header_problem(start)
    if reason is not None:
        raise AdDataError(f"{path}: {reason}")
    return kind


def _header_problem(start: bytes) -> str | None:
    """Why a CSV file starting with ``start`` has no header of text: its first line is not UTF-8, or holds a NUL (a
    binary file; its rows would be quarantined one by one, the header refused with a line of garbage as its names)."""
    line = start.split(b"\n", 1)[0].removeprefix(codecs.BOM_UTF8)
    if len(line) == len(start) == 1 << 16:
        line = line[:-3]  # a line cut inside a character by first_bytes' limit: judge what is whole
    try:
        line.decode("utf-8")
    except UnicodeDecodeError as error:
        return f"the first line is not UTF-8 text ({error.reason} at byte {error.start}): a binary file?"
    return "the first line holds a NUL byte: a binary file, not CSV text" if b"\x00" in line else None


def _check_header(path: Path, names: Sequence[str], required: Sequence[str]) -> None:
    seen = Counter(names)
    twice = sorted(name for name, n in seen.items() if n > 1)
    if twice:
        raise AdDataError(f"{path}: columns {twice} appear more than once in the header")
    missing = [c for c in required if c not in seen]
    if missing:
        raise AdDataError(f"{path}: missing columns {missing}; it has {list(names)} and needs {list(required)}")


def _csv_chunks(
    path: Path, required: Sequence[str], quarantine: _Quarantine
) -> Iterator[tuple[pd.DataFrame, np.ndarray]]:
    """Chunks of data rows (text, object dtype) with their line numbers; ragged and malformed lines are
    quarantined here with their raw text. A file without a header, or with a quote that is never closed, is an
    ``AdDataError``: such a quote takes in every line after it, and the load would write the file without them."""
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    csv.field_size_limit(2**31 - 1)  # a long text column is one field: the default limit of 128 KiB refused its row
    # surrogateescape: a line with bytes that are not UTF-8 is quarantined, not the whole file refused
    with opener(path, "rt", encoding="utf-8-sig", errors="surrogateescape", newline="") as stream:
        record: list[str | None] = []  # the lines of the record being read, its raw text if it is rejected
        # strict: a quote never closed is an error, not a field that runs on to the end of the file; so is text after
        # a closing quote ("a3"x was read as a3x)
        reader = csv.reader(tapped_lines(stream, record), strict=True)
        try:
            header = next(fields for fields in reader if fields)
        except StopIteration:
            raise AdDataError(f"{path}: empty file: no header row (it needs the columns {list(required)})") from None
        except (csv.Error, OSError, EOFError) as error:
            raise AdDataError(f"{path}: cannot read the header: {error}") from None
        header = [name.strip() for name in header]
        _check_header(path, header, required)
        rows: list[list[str]] = []
        numbers: list[int] = []
        start = reader.line_num + 1
        while True:
            record.clear()
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as error:
                if "unexpected end of data" in str(error):
                    raise AdDataError(
                        f"{path}: line {start}: a quote opened there is never closed, so no line after it can be "
                        "read; nothing was loaded (close or remove the quote)"
                    ) from None
                quarantine.summary.rows += 1
                quarantine.add(start, f"malformed CSV: {error}", record_text(record))
                start = reader.line_num + 1
                continue
            except (OSError, EOFError) as error:  # a truncated .gz
                raise AdDataError(f"{path}: cannot read line {start}: {error}") from None
            line, start = start, reader.line_num + 1
            if not row:
                continue  # a blank line
            quarantine.summary.rows += 1
            if len(row) != len(header):
                quarantine.add(line, f"{len(row)} fields, expected {len(header)}", record_text(record))
                continue
            rows.append(row)
            numbers.append(line)
            if len(rows) >= CHUNK_ROWS:
                yield pd.DataFrame(rows, columns=header, dtype=object), np.array(numbers)
                rows, numbers = [], []
        if rows:
            yield pd.DataFrame(rows, columns=header, dtype=object), np.array(numbers)


def _parquet_chunks(
    path: Path, required: Sequence[str], quarantine: _Quarantine, columns: Sequence[str] | None = None
) -> Iterator[tuple[pd.DataFrame, np.ndarray]]:
    """Chunks of rows with their row numbers (from 1); a file that is not Parquet is an ``AdDataError``."""
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        raise AdDataError(f"{path}: not a readable Parquet file: {str(error).splitlines()[0]}") from None
    _check_header(path, parquet.schema_arrow.names, required)
    nested = [f"{f.name} ({f.type})" for f in parquet.schema_arrow if f.name in required and pa.types.is_nested(f.type)]
    if nested:
        raise AdDataError(f"{path}: columns {nested} hold lists or records; each needs one value per row")
    stamps = parquet.schema_arrow.field("ts_ms").type if "ts_ms" in parquet.schema_arrow.names else None
    if "ts_ms" in required and stamps is not None and pa.types.is_timestamp(stamps) and stamps.tz is None:
        quarantine.summary.naive_timestamps = (
            "ts_ms is a timestamp without a time zone: read as UTC; if it holds local times, write it with its time "
            "zone (or as epoch milliseconds)"
        )
    first = 1
    batches = parquet.iter_batches(batch_size=CHUNK_ROWS, columns=list(columns) if columns else None)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            break
        except (pa.ArrowException, OSError) as error:
            raise AdDataError(f"{path}: unreadable Parquet data: {str(error).splitlines()[0]}") from None
        arrays = [_parquet_column(name, a) for name, a in zip(batch.schema.names, batch.columns, strict=True)]
        frame = pa.Table.from_arrays(arrays, names=batch.schema.names).to_pandas()
        for name, array in zip(batch.schema.names, arrays, strict=True):
            if _is_binary(array.type):  # Hive, Impala and Spark write strings as BINARY: their bytes are text
                text = [v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else v for v in frame[name]]
                frame[name] = pd.Series(text, index=frame.index, dtype=object)  # object: it may hold surrogates
        quarantine.summary.rows += len(frame)
        yield frame, np.arange(first, first + len(frame))
        first += len(frame)


def _parquet_column(name: str, array: pa.Array) -> pa.Array:
    """A Parquet column as the loaders read it: ``ts_ms`` stored as a timestamp in epoch milliseconds (truncating
    finer units: pandas writes nanoseconds), integer ids as their exact text (pandas makes an integer column with a
    null, or a chunk beside one that has, float64, which merged 64-bit ids above 2**53 into one, and refused uint64
    ids above 2**63); every other column as written."""
    if name == "ts_ms" and pa.types.is_timestamp(array.type):
        return array.cast(pa.timestamp("ms", tz="UTC"), safe=False).cast(pa.int64())
    if name == ID_COLUMN and pa.types.is_integer(array.type):
        return array.cast(pa.string())
    return array


def _is_binary(kind: pa.DataType) -> bool:
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_fixed_size_binary(kind)


def _chunks(path: Path, kind: str, required: Sequence[str], quarantine: _Quarantine, columns=None):
    if kind == "csv":
        return _csv_chunks(path, required, quarantine)
    return _parquet_chunks(path, required, quarantine, columns)


def _stripped(values: pd.Series) -> pd.Series:
    """Text stripped, blanks as None (object dtype, which also holds undecodable bytes); other values as they are."""
    out = [(v.strip() or None) if isinstance(v, str) else v for v in values.to_numpy(dtype=object)]
    return pd.Series(out, index=values.index, dtype=object)


def _undecodable(frame: pd.DataFrame) -> np.ndarray:
    """Rows with a text value that held bytes that were not UTF-8 (a CSV's, or a Parquet BINARY column's)."""
    pattern = re.compile(_UNDECODABLE)
    bad = np.zeros(len(frame), dtype=bool)
    for column in frame.columns:
        if frame[column].dtype != object:  # numbers, timestamps, Arrow strings (valid UTF-8): no text of that kind
            continue
        values = frame[column].to_numpy(dtype=object)
        bad |= np.array([isinstance(v, str) and not v.isascii() and bool(pattern.search(v)) for v in values], bool)
    return bad


def _id_problems(ids: pd.Series) -> np.ndarray:
    """Per id (stripped text or None): why it cannot be an ad id, or None."""
    reasons = np.full(len(ids), None, dtype=object)
    undecodable = _undecodable(ids.to_frame())
    reasons[undecodable] = "not valid UTF-8"
    text = pa.array(np.where(undecodable, None, ids.to_numpy(dtype=object)), type=pa.string(), from_pandas=True)
    control = pc.fill_null(pc.match_substring_regex(text, _CONTROL), False).to_numpy(zero_copy_only=False)
    long = pc.fill_null(pc.greater(pc.utf8_length(text), MAX_KEY_LENGTH), False).to_numpy(zero_copy_only=False)
    reasons[control & ~undecodable] = f"{ID_COLUMN} has control characters"
    reasons[long & ~undecodable] = f"{ID_COLUMN} is longer than {MAX_KEY_LENGTH} characters"
    reasons[ids.isna().to_numpy()] = f"{ID_COLUMN} is missing"
    return reasons


def _typed(values: pd.Series) -> pd.Series:
    """A CSV column as numbers when every non-blank value is one, otherwise as text; integers beyond 64 bits as
    floats (pandas keeps them as Python ints, which Arrow cannot write)."""
    try:
        numbers = pd.to_numeric(values)
    except (ValueError, TypeError):
        return values
    return numbers.astype(float) if numbers.dtype == object else numbers


def _ids(values: pd.Series) -> pd.Series:
    """Ids as stripped text (object dtype; blank is None): numbers without ``.0`` (a Parquet int or float column)."""
    if pd.api.types.is_integer_dtype(values.dtype):  # exact: ids above 2**53 must not pass through float64
        return _stripped(values.astype("Int64").astype("string").astype(object).where(values.notna(), None))
    if pd.api.types.is_numeric_dtype(values.dtype) and not pd.api.types.is_bool_dtype(values.dtype):
        numbers = values.to_numpy(dtype=float, na_value=np.nan)
        # whole numbers beyond int64 stay floats' text: cast, they all wrapped to one id, -9223372036854775808
        whole = np.isfinite(numbers) & (numbers == np.round(numbers)) & (np.abs(numbers) < 2.0**63)
        text = np.where(whole, np.where(whole, numbers, 0).astype(np.int64).astype(str), numbers.astype(str))
        return pd.Series(text, index=values.index, dtype=object).where(~np.isnan(numbers), None)
    text = [v if isinstance(v, str) else (None if _plain(v) is None else str(v)) for v in values.to_numpy(dtype=object)]
    return _stripped(pd.Series(text, index=values.index, dtype=object))


def load_ads(
    path: str | Path,
    lake: Lake,
    *,
    required: Sequence[str],
    row_problems: Callable[[pd.DataFrame], pd.Series],
    text_columns: Sequence[str] = (),
    progress: Callable[[int], None] | None = None,
) -> LoadSummary:
    """Validate ``path`` and make its valid rows the lake's ``ads`` table.

    ``required`` columns must all be in the file (``ad_id`` first); ``row_problems(frame)`` gives one reason or None
    per row (``ml.features.feature_problems``). CSV values are text: the numeric feature columns (``required`` but
    ``ad_id`` and ``text_columns``) become numbers where every value is one; every other column stays text. Parquet
    columns keep their types; ids are text either way. ``progress`` gets the rows read so far after each chunk.
    """
    path = Path(path)
    kind = file_format(path)
    summary = LoadSummary(file=str(path), format=kind)
    quarantine = _Quarantine(summary, "line" if kind == "csv" else "row")
    frames, numbers = [], []
    for frame, lines in _chunks(path, kind, required, quarantine):
        frames.append(frame)
        numbers.append(lines)
        if progress is not None:
            progress(summary.rows)
    if frames:
        frame, lines = pd.concat(frames, ignore_index=True), np.concatenate(numbers)
    else:
        frame, lines = pd.DataFrame(columns=list(required), dtype=object), np.empty(0, dtype=np.int64)
    frame[ID_COLUMN] = _ids(frame[ID_COLUMN])
    if kind == "csv":
        frame = frame.apply(_stripped)
    undecodable = _undecodable(frame)  # also a Parquet BINARY column's bytes that are not UTF-8
    frame, lines = frame[quarantine.add_rows(frame, lines, undecodable, "not valid UTF-8")], lines[~undecodable]
    frame = frame[quarantine.add_rows(frame, lines, row_problems(frame))]
    if kind == "csv":  # the feature columns as numbers; other columns stay as written (text)
        numeric = [c for c in required if c not in (ID_COLUMN, *text_columns)]
        frame = frame.apply(lambda column: _typed(column) if column.name in numeric else column)
    last = ~frame[ID_COLUMN].duplicated(keep="last").to_numpy()
    summary.duplicates = int((~last).sum())
    frame = frame[last].reset_index(drop=True)
    summary.columns = list(frame.columns)
    quarantine.write(lake, ADS_QUARANTINE, _digest(path))
    if len(frame):
        lake.write(ADS, None, frame)
        summary.loaded = len(frame)
    else:
        summary.note = "no valid rows: the lake's ads table was left as it was"
    return summary


def _clicked(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """``(clicked, valid)``: booleans, and which values were 0/1 or true/false (any case, or a bool column)."""
    if pd.api.types.is_bool_dtype(values.dtype):
        return values.to_numpy(dtype=bool), np.ones(len(values), dtype=bool)
    if pd.api.types.is_numeric_dtype(values.dtype):
        numbers = values.to_numpy(dtype=float, na_value=np.nan)
        return numbers == 1, (numbers == 0) | (numbers == 1)
    mapped = values.map(lambda v: _CLICKED.get(str(v).strip().lower()) if v is not None else None)
    valid = mapped.notna().to_numpy()
    return mapped.fillna(False).to_numpy(dtype=bool), valid


def _timestamps(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """``(ts_ms, reason)``: int64 milliseconds, and a reason where the value is not a plausible one."""
    numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float, na_value=np.nan)
    reason = np.full(len(numbers), None, dtype=object)
    with np.errstate(invalid="ignore"):
        out_of_range = (numbers < MIN_TS_MS) | (numbers >= MAX_TS_MS)
        fractional = numbers != np.floor(numbers)
        seconds = (numbers >= MIN_TS_MS / 1000) & (numbers < MAX_TS_MS / 1000)
    reason[out_of_range] = "ts_ms is out of range: epoch milliseconds from 2000-01-01 to 2100-01-01"
    reason[seconds] = "ts_ms is out of range: it looks like epoch seconds (ts_ms is milliseconds: times 1000)"
    reason[fractional & ~out_of_range] = "ts_ms is not a whole number of milliseconds"
    reason[~np.isfinite(numbers)] = "ts_ms is not an epoch-milliseconds number"
    ts = np.where(pd.isna(reason), numbers, 0).astype(np.int64)
    return ts, reason


def _impression_problems(frame: pd.DataFrame, ts_reason: np.ndarray, clicked_ok: np.ndarray) -> np.ndarray:
    """The first problem of each row: its ad id, then ts_ms, then clicked."""
    problems = _id_problems(frame[ID_COLUMN])
    fresh = pd.isna(problems)
    problems[fresh] = ts_reason[fresh]
    problems[pd.isna(problems) & ~clicked_ok] = "clicked is not 0/1 or true/false"
    return problems


def load_impressions(
    path: str | Path,
    lake: Lake,
    *,
    timezone: str,
    first_day: str | None = None,
    not_after_ms: int | None = None,
    append: bool = False,
    progress: Callable[[int], None] | None = None,
    exclusive: AbstractContextManager | None = None,
) -> LoadSummary:
    """Validate ``path`` (``ts_ms``, ``ad_id``, ``clicked``; other columns are ignored) and write its valid rows
    into the lake's daily ``ad_impressions`` partitions: the local date of ``ts_ms`` in ``timezone``.

    Rows before ``first_day`` (the first daily partition) are quarantined: no partition would ever read them; so are
    rows after ``not_after_ms`` (the ``precompute`` command passes now plus the query log's 5 minutes of clock skew):
    an impression that has not happened is a client clock or unit error.
    Each day in the file replaces its partition, or is added to it with ``append``. ``progress`` gets the rows read
    so far after each chunk. ``exclusive`` is held while the days are read and written (the ``precompute`` command
    passes a file lock: beside the partitions of a local lake, in the state folder for a lake at a URI): an append
    reads a day and writes it back, so two loads writing the same day at once would otherwise each write back the
    day without the other's rows.
    """
    path = Path(path)
    kind = file_format(path)
    summary = LoadSummary(file=str(path), format=kind)
    quarantine = _Quarantine(summary, "line" if kind == "csv" else "row")
    first = (date.fromisoformat(first_day) - date(1970, 1, 1)).days if first_day else None
    parts: list[pd.DataFrame] = []
    for frame, lines in _chunks(path, kind, IMPRESSION_COLUMNS, quarantine, IMPRESSION_COLUMNS):
        frame = frame[list(IMPRESSION_COLUMNS)].reset_index(drop=True)
        frame[ID_COLUMN] = _ids(frame[ID_COLUMN])
        ts_ms, ts_reason = _timestamps(frame["ts_ms"])
        clicked, clicked_ok = _clicked(frame["clicked"])
        problems = _impression_problems(frame, ts_reason, clicked_ok)
        days = local_days(ts_ms, timezone)
        if first is not None:
            problems[(days < first) & pd.isna(problems)] = f"ts_ms falls before the first daily partition {first_day}"
        if not_after_ms is not None:
            # Written, it would sit in the partition of a day to come and be trained on when that day is read.
            shown = datetime.fromtimestamp(not_after_ms / 1000, UTC).isoformat(timespec="seconds")
            problems[(ts_ms > not_after_ms) & pd.isna(problems)] = f"ts_ms is in the future: after {shown}"
        good = quarantine.add_rows(frame, lines, problems)
        # Arrow strings, not Python objects: a file's valid rows are held until its days are written, and 20M ids as
        # Python strings took 1.4 GB (twice that while the chunks were concatenated).
        ids = pd.Series(frame[ID_COLUMN].to_numpy(dtype=object)[good], dtype=ARROW_STRING)
        parts.append(pd.DataFrame({"ts_ms": ts_ms[good], ID_COLUMN: ids, "clicked": clicked[good], "day": days[good]}))
        if progress is not None:
            progress(summary.rows)
    valid = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame({"day": [], ID_COLUMN: []})
    del parts  # concatenated: not twice over while the days are written
    digest = _digest(path)
    quarantine.write(lake, IMPRESSIONS_QUARANTINE, digest)
    summary.written, summary.partition_rows, summary.already_loaded = {}, {}, [] if append else None
    with exclusive or contextlib.nullcontext():
        _write_days(path, lake, valid, digest, append, summary)
    summary.loaded = sum(summary.written.values())
    # all of this file's valid rows, those of the days it had loaded already too (a re-run reported 0)
    summary.unknown_ad_impressions = unknown_ad_impressions(lake, valid[ID_COLUMN])
    if not len(valid):
        summary.note = "no valid rows: no ad_impressions partition was written"
    elif not summary.written:
        summary.note = "every day in the file holds its rows already: nothing was appended"
    return summary


def _write_days(path: Path, lake: Lake, valid: pd.DataFrame, digest: str, append: bool, summary: LoadSummary) -> None:
    """Write each day of ``valid`` into its ``ad_impressions`` partition (replaced, or added to with ``append``),
    recording it in ``summary`` (a day that holds this file's rows already: what it holds)."""
    for day, rows in valid.groupby("day", sort=True):
        key = (date(1970, 1, 1) + timedelta(days=int(day))).isoformat()
        rows, loaded, new_rows = rows[list(IMPRESSION_COLUMNS)], [digest], len(rows)
        if append and lake.exists(IMPRESSIONS, key):
            loaded = _loaded_files(lake, key)
            if digest in loaded:  # an earlier load of this file wrote this day
                summary.already_loaded.append(key)
                summary.partition_rows[key] = len(lake.read(IMPRESSIONS, key, columns=["ts_ms"]))
                continue
            loaded.append(digest)
            rows = pd.concat([lake.read(IMPRESSIONS, key, columns=list(IMPRESSION_COLUMNS)), rows], ignore_index=True)
        try:
            lake.write(IMPRESSIONS, key, _impressions_table(rows.sort_values("ts_ms", kind="stable"), loaded))
        except OSError as error:
            done = ", ".join(summary.written) or "none"
            again = "the same command again skips them" if append else "the same command again rewrites them"
            raise AdDataError(
                f"{path}: could not write day {key}: {error}; days written before it: {done} ({again})"
            ) from error
        summary.written[key], summary.partition_rows[key] = new_rows, len(rows)


def _digest(path: Path) -> str:
    """The SHA-256 of a file's bytes: which file a partition's rows came from, whatever its name."""
    sha = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            sha.update(chunk)
    return sha.hexdigest()


def _loaded_files(lake: Lake, day: str) -> list[str]:
    """The digests of the files whose rows an ``ad_impressions`` day holds (none recorded by older loads)."""
    return json.loads(lake.metadata(IMPRESSIONS, day).get(LOADED_FILES, b"[]"))


def _impressions_table(rows: pd.DataFrame, loaded_files: list[str]) -> pa.Table:
    schema = pa.schema([("ts_ms", pa.int64()), (ID_COLUMN, pa.string()), ("clicked", pa.bool_())])
    table = pa.Table.from_pandas(rows.reset_index(drop=True), schema=schema, preserve_index=False)
    return table.replace_schema_metadata({**(table.schema.metadata or {}), LOADED_FILES: json.dumps(loaded_files)})


def unknown_ad_impressions(lake: Lake, ad_ids: Iterable[str]) -> int | None:
    """How many of the impressions' ``ad_ids`` are not in the lake's ``ads`` (None without an ads table)."""
    if not lake.exists(ADS):
        return None
    known = pa.array(lake.read(ADS, columns=[ID_COLUMN])[ID_COLUMN].astype(str), pa.string())
    ids = ad_ids if isinstance(ad_ids, pd.Series) else pd.Series(list(ad_ids), dtype=object)
    ids = pa.array(ids.astype(str), pa.string())
    return len(ids) - int(pc.sum(pc.is_in(ids, value_set=known)).as_py() or 0)
