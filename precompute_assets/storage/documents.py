"""The ``documents`` table in PostgreSQL: bulk upserts through COPY, soft deletes, keyset change scans.

Every load stages its rows with COPY into a temporary table and upserts them with one statement, so a
million documents cost a few round trips, not a million. ``modified_at`` moves only when a document's
content (title, body, language, deleted) really changes, which makes ``(modified_at, doc_id)`` a
watermark for incremental consumers such as the embedding assets.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import gzip
import io
import itertools
import json
import math
import re
import uuid
import zlib
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np
import pandas as pd
import psycopg2
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from psycopg2 import sql

from ..ml.embedder import MAX_BODY_BYTES
from ..serving.keys import BAD_KEY_CHARACTERS, MAX_KEY_LENGTH
from .files import (
    cut_raw,
    first_bytes,
    not_text_reason,
    record_text,
    tapped_lines,
    unreadable_reason,
    visible_line,
)
from .postgres import copy_in, schema_missing, transaction
from .tables import not_text

_ISO_639_1 = """
aa ab ae af ak am an ar as av ay az ba be bg bh bi bm bn bo br bs ca ce ch co cr cs cu cv cy da de
dv dz ee el en eo es et eu fa ff fi fj fo fr fy ga gd gl gn gu gv ha he hi ho hr ht hu hy hz ia id
ie ig ii ik io is it iu ja jv ka kg ki kj kk kl km kn ko kr ks ku kv kw ky la lb lg li ln lo lt lu
lv mg mh mi mk ml mn mr ms mt my na nb nd ne ng nl nn no nr nv ny oc oj om or os pa pi pl ps pt qu
rm rn ro ru rw sa sc sd se sg si sk sl sm sn so sq sr ss st su sv sw ta te tg th ti tk tl tn to tr
ts tt tw ty ug uk ur uz ve vi vo wa wo xh yi yo za zh zu
"""
# ISO 639-1 two-letter codes. A language tag is known when it is a well-formed BCP 47 tag whose primary
# subtag is one of them (see primary_language); others are stored as given and counted as unknown.
KNOWN_LANGUAGES = frozenset(_ISO_639_1.split())
# BCP 47 (RFC 5646) syntax, lower-cased, for the tags whose primary language subtag has 2 or 3 letters:
# extlang, script, region, variants, extensions, private use. Grandfathered tags (i-klingon) do not match.
_LANGUAGE_TAG = re.compile(
    r"(?P<primary>[a-z]{2,3})(?:-[a-z]{3}){0,3}(?:-[a-z]{4})?(?:-(?:[a-z]{2}|[0-9]{3}))?"
    r"(?:-(?:[a-z0-9]{5,8}|[0-9][a-z0-9]{3}))*(?:-[a-wyz0-9](?:-[a-z0-9]{2,8})+)*(?:-x(?:-[a-z0-9]{1,8})+)?"
)
COLUMNS = ("doc_id", "title", "body", "language")
CHUNK_ROWS = 50_000  # rows read and COPYed at a time by load_file
CHUNK_BYTES = 64 << 20  # ... or fewer, when their text is this long: a chunk is held several times over while loaded
MAX_REJECTIONS_KEPT = 1000  # all rejections are counted and quarantined; the first ones (at most twice this many) are
# also kept in memory
QUARANTINE_BATCH_ROWS = 1000  # rejected rows sent to the quarantine table at a time ...
QUARANTINE_BATCH_CHARS = 8 << 20  # ... or fewer, when their raw text is this long
_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,50}$")
# serving.keys.BAD_KEY_CHARACTERS in RE2 syntax, for Arrow's screening of doc_ids: control characters and braces
# (Arrow strings are valid UTF-8, so they hold no lone surrogate).
_UNSERVABLE_ID = r"[\x00-\x1f\x7f{}]"


def primary_language(tag: str) -> str | None:
    """The primary language subtag of a well-formed BCP 47 tag, lower-cased (``pt-BR``, ``zh-Hant-TW`` ->
    ``pt``, ``zh``), or None when the tag is malformed. Case-insensitive; ``_`` is accepted as a separator too
    (POSIX locale style, ``pt_BR``)."""
    match = _LANGUAGE_TAG.fullmatch(tag.lower().replace("_", "-")) if isinstance(tag, str) else None
    return match["primary"] if match else None


def is_known_language(tag: str) -> bool:
    """Whether ``tag`` is a well-formed BCP 47 tag whose primary subtag is an ISO 639-1 code."""
    return primary_language(tag) in KNOWN_LANGUAGES


class DocumentFileError(ValueError):
    """A document file that cannot be read as asked: a named field it does not have, a bad header."""


@dataclass(frozen=True)
class DocumentFields:
    """Where a document file holds each column (``doc_id``, ``title``, ``body``, ``language``).

    ``names`` maps a column to the file's field: a JSONL key, a Parquet column, a CSV/TSV header name, or, with
    ``header=False``, a CSV/TSV field's 1-based number. A column not in ``names`` is read from the field of its
    own name when the file has one (``doc_id`` must exist); a field named in ``names`` must exist. ``language``
    is the tag given to documents that have none.
    """

    names: Mapping[str, str] = field(default_factory=dict)
    header: bool = True
    language: str | None = None

    def __post_init__(self) -> None:
        if unknown := sorted(set(self.names) - set(COLUMNS)):
            raise ValueError(f"unknown document columns {unknown}; the columns are {', '.join(COLUMNS)}")
        for column, name in self.names.items():
            if not str(name).strip():
                raise ValueError(f"the {column} field is blank")
            if not self.header and not (str(name).strip().isdigit() and int(name) >= 1):
                raise ValueError(f"without a header, fields are 1-based numbers: the {column} field is {name!r}")
        if not self.header and "doc_id" not in self.names:
            raise ValueError("without a header, the doc_id field must be given by number")
        if self.language is not None and primary_language(self.language) is None:
            raise ValueError(f"language {self.language!r} is not a well-formed BCP 47 tag (en, pt-BR, zh-Hans)")

    def source(self, column: str) -> str:
        """The file's field that holds ``column``."""
        return str(self.names.get(column, column)).strip()

    def required(self) -> list[str]:
        """The columns whose field must exist: doc_id, and every column named in ``names``."""
        return [c for c in COLUMNS if c == "doc_id" or c in self.names]

    def check(self, fields: Collection[str], what: str) -> None:
        """``DocumentFileError`` unless ``fields`` (a header, a schema, the keys of the first records) hold every
        required column's field, each once (a header ``doc_id,body,body`` loaded the first body without a word);
        ``what`` names them in the message."""
        names = list(fields)
        for column in COLUMNS:
            if (times := names.count(self.source(column))) > 1:
                raise DocumentFileError(f"the {column} field {self.source(column)!r} appears {times} times: {what} "
                                        f"{', '.join(map(str, names[:20]))}")  # fmt: skip
        for column in self.required():
            if self.source(column) not in fields:
                shown = ", ".join(map(str, list(fields)[:20])) or "nothing"
                raise DocumentFileError(f"no {column} field {self.source(column)!r}: {what} {shown}")


@dataclass(frozen=True)
class Rejection:
    where: str  # "row 12" (0-based, across a whole load) or "line 7" (1-based, JSONL, CSV, TSV)
    reason: str

    @property
    def number(self) -> int:
        """The row's or line's number, for file order."""
        return int(self.where.rpartition(" ")[2])


def _visible_text(text: str) -> str:
    """``text`` as PostgreSQL can store it, nothing hidden: a NUL and undecodable bytes (lone surrogates, as
    ``surrogateescape`` decodes them) as backslash escapes (``\\x00``, ``\\udcff``)."""
    if text.isascii() and "\x00" not in text:
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def _raw_values(values: Mapping[str, Any]) -> str:
    """A row's values as a JSON object (what a rejected row that was read but refused is quarantined with): missing
    values as null, undecodable bytes visible as ``\\udcXX`` escapes (``_visible_text``)."""
    plain = {c: _plain(v) for c, v in values.items()}
    return cut_raw(_visible_text(json.dumps(plain, ensure_ascii=False, default=_json)))


def _plain(value: Any) -> Any:
    """A value as JSON holds it: missing (None, NaN, NA, NaT) is None, bytes are text (``_decoded``)."""
    if value is None or value is pd.NA or value is pd.NaT or (isinstance(value, float) and np.isnan(value)):
        return None
    return _decoded(value)


def _json(value: Any) -> Any:
    """What ``json.dumps`` writes for a value it cannot: numpy's as Python's, anything else as its text."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _decoded(value)
    return str(value)


LOAD_ID = re.compile(r"[0-9]{8}T[0-9]{6}Z-[0-9a-f]{6}")  # what _new_load_id makes: 20261207T061500Z-1a2b3c


def _new_load_id() -> str:
    """A load's id in the quarantine table: when it started (UTC), and a random suffix."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"


class _QuarantineWriter:
    """A load's rejected rows on their way into its quarantine table, sent through the load's own cursor (so in its
    transaction) in batches: a file of rejections is never held whole."""

    def __init__(self, cur: psycopg2.extensions.cursor, table: str, load_id: str, file: str | None) -> None:
        self.cur, self.load_id, self.file = cur, load_id, None if file is None else _visible_text(file)
        # every text quoted (a \. in it is data, not COPY's end), and a quoted empty file or raw is NULL (None)
        self.copy = (
            sql.SQL(
                "COPY {q} (load_id, file, position, number, reason, raw) FROM STDIN"
                " WITH (FORMAT csv, FORCE_NULL (file, raw))"
            )
            .format(q=sql.Identifier(table))
            .as_string(cur)
        )
        self.pending: list[tuple[str, str | None, str, int, str, str | None]] = []
        self.chars = 0  # raw text pending
        self.written = 0

    def add(self, where: str, reason: str, raw: str | None) -> None:
        number = Rejection(where, reason).number  # for file order
        self.pending.append((self.load_id, self.file, where, number, _visible_text(reason), raw))
        self.chars += len(raw or "")
        if len(self.pending) >= QUARANTINE_BATCH_ROWS or self.chars >= QUARANTINE_BATCH_CHARS:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            text = io.StringIO()
            csv.writer(text, quoting=csv.QUOTE_NONNUMERIC).writerows(self.pending)
            text.seek(0)
            copy_in(self.cur, self.copy, text)
            self.written += len(self.pending)
            self.pending, self.chars = [], 0


@dataclass
class LoadResult:
    rows: int = 0  # input rows (or non-blank JSONL lines) seen
    inserted: int = 0
    updated: int = 0  # existing documents whose content changed, including re-created deleted ones
    unchanged: int = 0
    duplicates: int = 0  # rows superseded by a later row with the same doc_id in the same load (a rejected one too)
    rejected: int = 0
    quarantined: int = 0  # rejected rows written to the quarantine table (all of them, once the load has committed)
    quarantine_table: str | None = None  # where: the rows of load_id
    load_id: str | None = None
    rejections: list[Rejection] = field(default_factory=list)
    # rejected rows whose doc_id could be read (line or row, doc_id), until the load stages them (``rejected_ids``)
    rejected_ids: list[tuple[int, str]] = field(default_factory=list, repr=False)
    unknown_languages: dict[str, int] = field(default_factory=dict)  # code -> documents, after dedup
    quarantine: _QuarantineWriter | None = field(default=None, repr=False, compare=False)  # set during a load

    def reject(self, where: str, reason: str, raw: str | None = None) -> None:
        """Count a rejected row, keep the first ones in file order, and quarantine it with its ``raw`` text (during a
        load). A reader rejects a malformed line as it reads it, the rows of a chunk once the chunk is read: the kept
        ones are the first in the file, however they came."""
        self.rejected += 1
        self.rejections.append(Rejection(where, reason))
        if len(self.rejections) >= 2 * MAX_REJECTIONS_KEPT:
            self.rejections = self.first_rejections(MAX_REJECTIONS_KEPT)
        if self.quarantine is not None:
            self.quarantine.add(where, reason, raw)

    def first_rejections(self, n: int = MAX_REJECTIONS_KEPT) -> list[Rejection]:
        """The first ``n`` rejections kept, in file order."""
        return sorted(self.rejections, key=lambda rejection: rejection.number)[:n]

    def summary(self) -> dict[str, Any]:
        """What the load did, as the ``precompute docs`` command prints it (without the rejections themselves)."""
        return {k: v for k, v in vars(self).items() if k not in ("rejections", "quarantine", "rejected_ids")}


class DocumentRow(NamedTuple):
    """One row of the documents table (a tuple: a page of 20,000 is built in C, not in Python)."""

    doc_id: str
    title: str | None
    body: str | None
    language: str | None
    indexed_at: datetime | None
    modified_at: datetime
    deleted: bool

    @property
    def watermark(self) -> tuple[datetime, str]:
        """Pass the last row's watermark to ``changed_since`` to continue after it."""
        return self.modified_at, self.doc_id


def _missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    with contextlib.suppress(TypeError, ValueError):
        return bool(pd.isna(value))
    return False


def _decoded(value: Any) -> Any:
    """Bytes as UTF-8 text, as Arrow reads a binary column (invalid bytes become lone surrogates, refused later)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", "surrogateescape")
    return value


def _text_or_none(value: Any) -> str | None:
    if value is None or (not isinstance(value, str) and _missing(value)):
        return None
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        # A whole number read as a float (a Parquet or pandas integer column with a missing value, JSON's 7.0) is the
        # number as CSV writes it: doc_id 7, never "7.0", so the same corpus gets the same ids from every format.
        return str(int(value))
    return str(value)


def _number_id(value: Any) -> str | None:
    """Why a doc_id read as a number is no exact id, or None: a boolean (JSON ``true`` was stored as ``True``), a
    float that is not finite (``Infinity`` as ``inf``) or too large to hold every digit (``1e20`` as ``1e+20``,
    ``2**60`` in a Parquet float column as ``1.152921504606847e+18``)."""
    if isinstance(value, bool | np.bool_):
        return "a boolean, not an id"
    if isinstance(value, float | np.floating) and not math.isnan(value):
        if not math.isfinite(value):
            return "not a finite number"
        if abs(value) >= 2**53:
            return "a float too large to hold every digit of an id: write ids as text or integers"
    return None


def _storable(value: str | None) -> str | None:
    """Why PostgreSQL would refuse this text, or None if it can be stored."""
    if value is None:
        return None
    if "\x00" in value:
        return "contains a NUL character"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "invalid UTF-8 (lone surrogate)"
    return None


def _id_problem(doc_id: str) -> str | None:
    """Why ``doc_id`` cannot be a key of the serving cache (the embedding sync writes it there), or None."""
    if len(doc_id) > MAX_KEY_LENGTH:
        return f"doc_id: longer than {MAX_KEY_LENGTH} characters"
    if bad := BAD_KEY_CHARACTERS.search(doc_id):  # the serving keys' own rule (lone surrogates are refused earlier)
        return f"doc_id: character {bad.group()!r} at {bad.start()} (control characters and braces cannot be served)"
    return None


def _row_problem(row: dict[str, str | None]) -> str | None:
    """Why one row (values already through ``_text_or_none``) cannot be loaded, or None."""
    if row["doc_id"] is None or not row["doc_id"].strip():
        return "missing doc_id"
    return next((f"{c}: {p}" for c in COLUMNS if (p := _storable(row[c]))), None) or _id_problem(row["doc_id"])


def _arrow_columns(df: pd.DataFrame) -> dict[str, pa.Array] | None:
    """The four columns as Arrow strings, or None if some value is not a plain storable-encoding string."""
    n = len(df)
    try:
        return {
            c: pa.array(df[c], type=pa.string(), from_pandas=True) if c in df.columns else pa.nulls(n, pa.string())
            for c in COLUMNS
        }
    except (pa.ArrowException, UnicodeError):  # numbers, lists, lone surrogates: the row-by-row path
        return None


def _clean_frame(
    df: pd.DataFrame, first_row: int, labels: Sequence[str] | None, result: LoadResult, row_origin: int = 0
) -> pa.Table:
    """The loadable rows of ``df`` as an Arrow table (seq, doc_id, title, body, language); rejects the rest, and adds
    those whose doc_id is a valid id to ``result.rejected_ids``: such a row is its id's last word if no later row of
    the id follows, and the earlier rows of the id it supersedes are not loaded (``DROP_SUPERSEDED``).

    ``labels`` name each row in rejections (JSONL line numbers); by default rows are numbered from
    ``first_row``, which also orders rows across chunks so the last occurrence of a doc_id wins, plus
    ``row_origin`` in rejections (1 for a file's rows, as the other loaders name them).
    """
    if "doc_id" not in df.columns:
        raise ValueError(f"documents need a doc_id column; got {list(df.columns)}")
    n = len(df)
    result.rows += n
    columns = _arrow_columns(df)
    shapes: dict[int, str] = {}  # a list or an object is refused, not stored as its repr
    if columns is not None:
        # vectorised screening; only suspect rows are looked at one by one
        blank = pc.equal(pc.utf8_trim_whitespace(columns["doc_id"]), "")
        suspect = pc.fill_null(blank, True).to_numpy(zero_copy_only=False)
        for c in COLUMNS:
            has_nul = pc.fill_null(pc.match_substring(columns[c], "\x00"), False)
            suspect |= has_nul.to_numpy(zero_copy_only=False)
        ids = columns["doc_id"]
        for bad_id in (pc.greater(pc.utf8_length(ids), MAX_KEY_LENGTH), pc.match_substring_regex(ids, _UNSERVABLE_ID)):
            suspect |= pc.fill_null(bad_id, False).to_numpy(zero_copy_only=False)
        rows = {int(i): {c: columns[c][i].as_py() for c in COLUMNS} for i in np.flatnonzero(suspect)}
    else:
        values = {c: [_decoded(v) for v in df[c].tolist()] if c in df.columns else [None] * n for c in COLUMNS}
        rows = {i: {c: _text_or_none(values[c][i]) for c in COLUMNS} for i in range(n)}
        for c in reversed(COLUMNS):  # each row's first such column is the one named
            shapes.update({i: f"{c}: {p}" for i, value in enumerate(values[c]) if (p := not_text(value))})
        shapes.update({i: f"doc_id: {p}" for i, value in enumerate(values["doc_id"]) if (p := _number_id(value))})
    # A row's place in the file orders it among the rows of its doc_id: its line where the reader names lines (the
    # reader's own rejections, between this chunk's rows, are staged by their lines too), else its row.
    seq = np.array([Rejection(label, "").number for label in labels], dtype=np.int64) if labels is not None else (
        np.arange(first_row, first_row + n, dtype=np.int64))  # fmt: skip
    keep = np.ones(n, dtype=bool)
    for i, row in rows.items():
        if problem := shapes.get(i) or _row_problem(row):
            keep[i] = False
            # the values as read (a number stays a number, a list a list), not as they would have been stored
            raw = _raw_values({c: values[c][i] for c in COLUMNS} if columns is None else row)
            result.reject(labels[i] if labels is not None else f"row {first_row + i + row_origin}", problem, raw)
            if (doc_id := _valid_id(row["doc_id"])) is not None:
                result.rejected_ids.append((int(seq[i]), doc_id))
    if columns is None:
        kept = [row for i, row in rows.items() if keep[i]]
        columns = {c: pa.array([row[c] for row in kept], pa.string()) for c in COLUMNS}
        return pa.table({"seq": pa.array(seq[keep]), **columns})
    table = pa.table({"seq": pa.array(seq), **columns})
    return table if keep.all() else table.filter(pa.array(keep))


def _valid_id(doc_id: Any) -> str | None:
    """``doc_id`` when it is one a loaded row could have (text PostgreSQL stores and the cache serves), else None."""
    if not isinstance(doc_id, str) or not doc_id.strip() or _storable(doc_id) or _id_problem(doc_id):
        return None
    return doc_id


def _object_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    # object columns: JSON \ud800 escapes decode to lone surrogates, which Arrow-backed strings refuse
    return pd.DataFrame(records, columns=list(COLUMNS), dtype=object)


def _frames_of_jsonl(
    stream: IO[bytes], fields: DocumentFields, result: LoadResult
) -> Iterator[tuple[pd.DataFrame, list[str]]]:
    """Chunks of parsed JSONL objects with their line labels; bad lines become rejections. The keys of the first
    ``CHUNK_ROWS`` records, however many chunks they fill, must hold the required fields (``DocumentFields.check``;
    the load is one transaction, so chunks sent before a failed check are not loaded)."""
    records: list[dict[str, Any]] = []
    labels: list[str] = []
    keys: dict[str, None] | None = {}  # the first records' keys, in order of appearance; None once checked
    gathered = 0  # records whose keys are in keys
    lines = 0  # lines that are not blank
    parsed = 0  # lines that are JSON objects
    sources = {c: fields.source(c) for c in COLUMNS}
    size = 0  # bytes of the records held
    for number, line in enumerate(stream, start=1):
        if number == 1:
            line = line.removeprefix(codecs.BOM_UTF8)
        if not line.strip():
            continue
        lines += 1
        try:
            record = json.loads(line)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            result.rows += 1
            result.reject(f"line {number}", f"malformed JSON: {exc}", visible_line(line))
            continue
        if not isinstance(record, dict):
            result.rows += 1
            result.reject(f"line {number}", "not a JSON object", visible_line(line))
            continue
        parsed += 1
        if keys is not None:
            keys.update(dict.fromkeys(record))
            gathered += 1
            if gathered >= CHUNK_ROWS:
                fields.check(keys, "the first records have")
                keys = None
        records.append({c: record.get(source) for c, source in sources.items()})
        labels.append(f"line {number}")
        size += len(line)
        if len(records) >= CHUNK_ROWS or size >= CHUNK_BYTES:
            yield _object_frame(records), labels
            records, labels, size = [], [], 0
    if not lines:  # an empty export is an error, as for CSV and TSV: never a load of nothing
        raise DocumentFileError(f"empty file: no records (the doc_id field is {fields.source('doc_id')!r})")
    if not parsed:  # every line was rejected: a file of another shape than JSON Lines, not a few bad records
        first = result.first_rejections(1)[0]
        raise DocumentFileError(
            f"no line of the file is a JSON object ({first.where}: {first.reason}): JSON Lines holds one object per "
            "line (jq -c . rewrites pretty-printed JSON so)"
        )
    if keys is not None:  # fewer records than a check's worth: checked now, empty objects too
        fields.check(keys, "the records have")
    if records:
        yield _object_frame(records), labels


def _frames_of_delimited(
    stream: IO[str], delimiter: str, fields: DocumentFields, result: LoadResult
) -> Iterator[tuple[pd.DataFrame, list[str]]]:
    """Chunks of a CSV (RFC 4180 quoting) or TSV (no quoting: a quote is text) file with their line labels. Every
    record must have as many fields as the first; an empty field is missing; other records are rejections."""
    csv.field_size_limit(2**31 - 1)  # a body is one field: the default limit of 128 KiB would end the read
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    # strict: a quote never closed is an error, not a field that runs on to the end of the file, taking every record
    # after it along; so is text after a closing quote
    record: list[str | None] = []  # the lines of the record being read, its raw text if it is rejected
    strict = quoting != csv.QUOTE_NONE
    reader = csv.reader(tapped_lines(stream, record), delimiter=delimiter, quoting=quoting, strict=strict)
    try:
        first = next((row for row in reader if row), None)
    except csv.Error as error:
        raise DocumentFileError(f"the first record has malformed CSV quoting: {error}") from None
    if first is None:
        if fields.header:  # an empty export is an error, as a header without doc_id is: never a load of nothing
            raise DocumentFileError(f"empty file: no header row (the doc_id field is {fields.source('doc_id')!r})")
        return
    width = len(first)
    if fields.header:
        names = [name.strip() for name in first]
        fields.check(names, "the header has")
        at = {c: names.index(fields.source(c)) for c in COLUMNS if fields.source(c) in names}
        rows: Iterable[list[str]] = reader
    else:
        if (widest := max(int(n) for n in fields.names.values())) > width:
            raise DocumentFileError(f"field {widest} does not exist: the first line has {width} fields")
        at = {c: int(n) - 1 for c, n in fields.names.items()}
        rows = itertools.chain([first], reader)  # reader.line_num is still the first record's line
    records: list[dict[str, Any]] = []
    labels: list[str] = []
    size = 0  # characters of the records held
    rows = iter(rows)
    while True:
        start = reader.line_num + 1  # the line the next record begins on
        record.clear()
        try:
            row = next(rows, None)
        except csv.Error as error:  # the reader goes on at the next line
            result.rows += 1
            unclosed = "unexpected end of data" in str(error)
            reason = "a quote opened here is never closed (nothing after it loads)" if unclosed else str(error)
            result.reject(f"line {start}", f"malformed CSV quoting: {reason}", record_text(record))
            continue
        if row is None:
            break
        if not row:
            continue
        number = reader.line_num
        if len(row) != width:
            result.rows += 1
            reason = f"{len(row)} fields, expected {width} as on the first line"
            result.reject(f"line {number}", reason, record_text(record))
            at_id = at.get("doc_id")
            if at_id is not None and at_id < len(row) and (doc_id := _valid_id(row[at_id])) is not None:
                result.rejected_ids.append((number, doc_id))  # its last word on the id, if no later row has one
            continue
        records.append({c: row[i] or None for c, i in at.items()})
        labels.append(f"line {number}")
        size += sum(map(len, row))
        if len(records) >= CHUNK_ROWS or size >= CHUNK_BYTES:
            yield _object_frame(records), labels
            records, labels, size = [], [], 0
    if records:
        yield _object_frame(records), labels


DOCUMENT_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv"}


def check_document_file(path: str | Path) -> str:
    """``"parquet"``, ``"jsonl"``, ``"csv"`` or ``"tsv"`` by the file's suffix; ``ValueError``/``OSError`` naming
    the problem when the suffix is unknown or the file is missing or unreadable."""
    path = Path(path)
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes[-1:] == [".gz"]:
        suffixes = suffixes[:-1]
    if suffixes[-1:] in ([".parquet"], [".pq"]) and path.suffix.lower() != ".gz":
        kind = "parquet"
    elif suffixes and suffixes[-1] in DOCUMENT_FORMATS:
        kind = DOCUMENT_FORMATS[suffixes[-1]]
    else:
        raise ValueError(f"{path}: unknown suffix {path.suffix or '(none)'!r}; expected .jsonl, .ndjson, .json, .csv,"
                         " .tsv (optionally .gz) or .parquet")  # fmt: skip
    reason = unreadable_reason(path)
    if reason is not None:
        raise OSError(f"{path}: {reason}")
    start = first_bytes(path) if kind != "parquet" else b""
    if start.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):  # Windows' "Unicode" text, PowerShell's export
        raise DocumentFileError(f"{path}: the file is UTF-16 text (it starts with UTF-16's byte order mark); "
                                "nothing was loaded: convert it to UTF-8")  # fmt: skip
    if kind != "parquet" and (reason := not_text_reason(path, start)) is not None:
        raise DocumentFileError(f"{path}: {reason}; nothing was loaded")
    head = start.removeprefix(codecs.BOM_UTF8).lstrip()  # the first bytes from the first that is not blank
    if kind == "jsonl" and head.split(b"\n", 1)[0].strip() == b"{":
        raise DocumentFileError(f"{path}: the first line is a lone '{{': pretty-printed JSON, not JSON Lines "
                                "(one object per line); nothing was loaded (jq -c . writes it so)")  # fmt: skip
    if kind == "jsonl" and head.startswith(b"["):
        raise DocumentFileError(f"{path}: the file is one JSON array, not JSON Lines (one object per line); "
                                "nothing was loaded (jq -c '.[]' writes its objects one per line)")  # fmt: skip
    if kind == "parquet":
        _parquet_file(path).close()
    return kind


def _parquet_file(path: Path) -> pq.ParquetFile:
    """The Parquet file at ``path``; one that is not Parquet is a ``DocumentFileError`` naming it."""
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        raise DocumentFileError(f"{path}: not a readable Parquet file: {str(error).splitlines()[0]}") from None


def _frames_of_parquet(
    parquet: pq.ParquetFile, path: Path, fields: DocumentFields
) -> Iterator[tuple[pd.DataFrame, None]]:
    names = parquet.schema_arrow.names
    fields.check(names, "the file has")
    sources = {c: fields.source(c) for c in COLUMNS if fields.source(c) in names}
    meta = parquet.metadata  # rows of about CHUNK_BYTES, by the mean uncompressed size of a row
    size = sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups))
    rows = max(1, min(CHUNK_ROWS, CHUNK_BYTES * meta.num_rows // max(size, 1)))
    batches = parquet.iter_batches(batch_size=rows, columns=sorted(set(sources.values())))
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as error:  # a corrupt page: the load rolls back
            raise DocumentFileError(f"{path}: unreadable Parquet data: {str(error).splitlines()[0]}") from None
        df = batch.to_pandas(integer_object_nulls=True)  # int64 ids beside a null stay exact ints, not floats
        yield pd.DataFrame({c: df[source] for c, source in sources.items()}), None


# A load's duplicates: every staged row but the last of its doc_id goes, and so does a last row that a later rejected
# row of its doc_id (``rejected_ids``) supersedes: the document is left as it was, not set to a row the file replaced.
# Joined to one row per doc_id, so the work grows with the rows; a self-join on doc_id matched every pair of a doc_id's
# rows (100,000 rows of 7 ids, a wrong --id-field: 2 min 20 s; a million would take hours).
DROP_SUPERSEDED = (
    "DELETE FROM staging s USING (SELECT doc_id, max(seq) AS last FROM"
    " (SELECT doc_id, seq FROM staging UNION ALL SELECT doc_id, seq FROM rejected_ids) occurrences GROUP BY doc_id)"
    " kept WHERE s.doc_id = kept.doc_id AND s.seq < kept.last"
)


def body_column(body_chars: int | None, table: str = "") -> sql.Composable:
    """The body as a reader of its first ``body_chars`` characters needs it (all of it for None), cut in the server
    so that a page of long documents is not read whole; one over ``MAX_BODY_BYTES``, which is not embedded, keeps
    that many characters and so stays too large. ``table`` qualifies the column (an alias in a join)."""
    body = sql.Identifier(table, "body") if table else sql.Identifier("body")
    if body_chars is None:
        return body
    return sql.SQL("CASE WHEN octet_length({b}) > {big} THEN left({b}, {big} + 1) ELSE left({b}, {n}) END").format(
        b=body, big=sql.Literal(MAX_BODY_BYTES), n=sql.Literal(body_chars)
    )


class DocumentStore:
    """The documents table behind ``url`` (``table`` lets tests use a table of their own), and beside it
    ``{table}_quarantine``, the rows its loads rejected."""

    def __init__(self, url: str, *, table: str = "documents") -> None:
        if not _IDENTIFIER.match(table):
            raise ValueError(f"table must be a lower-case SQL identifier, got {table!r}")
        self.url = url
        self.table = table
        self.quarantine_table = f"{table}_quarantine"
        self._t = sql.Identifier(table)

    def _connect(self) -> contextlib.AbstractContextManager[psycopg2.extensions.connection]:
        """A connection whose work commits on success and rolls back on error, then closes."""
        return transaction(self.url)

    def ensure_schema(self) -> None:
        """Create the table and its (modified_at, doc_id) index, and the quarantine table and its index, if missing."""
        index = f"{self.table}_modified_at_doc_id"
        quarantine, quarantine_index = self.quarantine_table, f"{self.quarantine_table}_load"
        with self._connect() as conn, conn.cursor() as cur:
            if not schema_missing(cur, [self.table, index, quarantine, quarantine_index]):
                return
            cur.execute(
                sql.SQL(
                    # byte-order collation: doc_id order (and so keyset pages) does not depend on the locale
                    """CREATE TABLE IF NOT EXISTS {t} (
                        doc_id TEXT COLLATE "C" PRIMARY KEY,
                        title TEXT,
                        body TEXT,
                        language TEXT,
                        indexed_at TIMESTAMPTZ,
                        modified_at TIMESTAMPTZ NOT NULL,
                        deleted BOOLEAN NOT NULL DEFAULT false
                    )"""
                ).format(t=self._t)
            )
            cur.execute(
                sql.SQL("CREATE INDEX IF NOT EXISTS {i} ON {t} (modified_at, doc_id)").format(
                    i=sql.Identifier(index), t=self._t
                )
            )
            cur.execute(
                sql.SQL(
                    """CREATE TABLE IF NOT EXISTS {q} (
                        load_id TEXT NOT NULL,
                        file TEXT,
                        position TEXT NOT NULL,
                        number BIGINT NOT NULL,
                        reason TEXT NOT NULL,
                        raw TEXT,
                        quarantined_at TIMESTAMPTZ NOT NULL DEFAULT now()
                    )"""
                ).format(q=sql.Identifier(quarantine))
            )
            cur.execute(
                sql.SQL("CREATE INDEX IF NOT EXISTS {i} ON {q} (load_id, number)").format(
                    i=sql.Identifier(quarantine_index), q=sql.Identifier(quarantine)
                )
            )

    def load_frame(self, df: pd.DataFrame) -> LoadResult:
        """Upsert the documents of one DataFrame (columns doc_id, title, body, language)."""
        return self._load((df.iloc[at : at + CHUNK_ROWS], None) for at in range(0, len(df), CHUNK_ROWS))

    def quarantined(self, load_id: str) -> Iterator[tuple[str, str, str | None]]:
        """The rows load ``load_id`` quarantined, in file order: (position, reason, raw), read from the server a page
        at a time (a server-side cursor: a load of a million rejections is never held whole)."""
        with self._connect() as conn, conn.cursor(name=f"quarantined_{uuid.uuid4().hex[:8]}") as cur:
            cur.itersize = QUARANTINE_BATCH_ROWS
            cur.execute(
                sql.SQL("SELECT position, reason, raw FROM {q} WHERE load_id = %s ORDER BY number").format(
                    q=sql.Identifier(self.quarantine_table)
                ),
                (load_id,),
            )
            yield from cur

    def expire_quarantine(self, before: datetime) -> int:
        """Delete the quarantined rows of the loads that started before ``before``; how many. A load's rows go
        together: each is stamped with its load's transaction start."""
        with self._connect() as conn, conn.cursor() as cur:
            cur.execute(
                sql.SQL("DELETE FROM {q} WHERE quarantined_at < %s").format(q=sql.Identifier(self.quarantine_table)),
                (before,),
            )
            return cur.rowcount

    def load_file(
        self, path: str | Path, fields: DocumentFields | None = None, progress: Callable[[float], None] | None = None
    ) -> LoadResult:
        """Upsert the documents of a JSONL (``.jsonl``/``.ndjson``/``.json``), CSV or TSV file (optionally ``.gz``)
        or a Parquet file, read in chunks, its fields mapped by ``fields``; a malformed line or row is a
        rejection, not an error; a required field the file lacks is a ``DocumentFileError`` (nothing loaded).
        ``progress`` gets the share of the file read after each chunk."""
        path, fields = Path(path), fields or DocumentFields()
        kind = check_document_file(path)
        if not fields.header and kind not in ("csv", "tsv"):
            raise DocumentFileError(f"{path}: only CSV and TSV files can be read without a header")
        report = progress or (lambda share: None)
        if kind == "parquet":
            parquet = _parquet_file(path)
            rows, frames = parquet.metadata.num_rows, _frames_of_parquet(parquet, path, fields)
            # its rows are named from 1 in rejections, as `ads load`, `impressions load` and `replay` name them
            return self._load(
                frames,
                language=fields.language,
                after_chunk=lambda done: report(done / max(rows, 1)),
                row_origin=1,
                file=str(path),
            )
        result = LoadResult()
        size = max(path.stat().st_size, 1)
        try:
            return self._load_stream(path, kind, fields, result, report, size)
        except (EOFError, zlib.error, gzip.BadGzipFile) as error:  # the load rolls back
            raise DocumentFileError(f"unreadable gzip data (cut short or corrupt?): {error}") from None

    def _load_stream(
        self,
        path: Path,
        kind: str,
        fields: DocumentFields,
        result: LoadResult,
        report: Callable[[float], None],
        size: int,
    ) -> LoadResult:
        """``load_file`` of a JSONL, CSV or TSV file, optionally gzip-compressed."""
        with open(path, "rb") as raw:
            binary = gzip.GzipFile(fileobj=raw) if path.suffix.lower() == ".gz" else raw

            def after_chunk(done: int) -> None:
                report(raw.tell() / size)  # the compressed bytes read, a buffer ahead of the rows loaded

            if kind == "jsonl":
                frames = _frames_of_jsonl(binary, fields, result)
                return self._load(frames, result, language=fields.language, after_chunk=after_chunk, file=str(path))
            # utf-8-sig drops a byte order mark; invalid bytes become lone surrogates, which rows are rejected for
            text = io.TextIOWrapper(binary, encoding="utf-8-sig", errors="surrogateescape", newline="")
            frames = _frames_of_delimited(text, "," if kind == "csv" else "\t", fields, result)
            return self._load(frames, result, language=fields.language, after_chunk=after_chunk, file=str(path))

    def _load(
        self,
        frames: Iterable[tuple[pd.DataFrame, list[str] | None]],
        result: LoadResult | None = None,
        *,
        language: str | None = None,
        after_chunk: Callable[[int], None] | None = None,
        row_origin: int = 0,
        file: str | None = None,
    ) -> LoadResult:
        """Stage, clean and upsert ``frames`` in one transaction, which also writes their rejected rows (and those
        the frames' reader rejects into ``result`` meanwhile) to the quarantine table as load ``result.load_id``."""
        result = result or LoadResult()
        result.load_id, result.quarantine_table = _new_load_id(), self.quarantine_table
        t = self._t
        with self._connect() as conn, conn.cursor() as cur, self._quarantining(cur, result, file):
            cur.execute(
                'CREATE TEMP TABLE staging (seq BIGINT, doc_id TEXT COLLATE "C", title TEXT, body TEXT,'
                ' language TEXT) ON COMMIT DROP; CREATE TEMP TABLE rejected_ids (seq BIGINT, doc_id TEXT COLLATE "C")'
                " ON COMMIT DROP"
            )
            staged = 0
            for df, labels in frames:
                table = _clean_frame(df, result.rows, labels, result, row_origin)
                self._stage_rejected_ids(cur, result)
                if language is not None:  # the tag of documents that have none
                    at = table.schema.get_field_index("language")
                    table = table.set_column(at, "language", pc.fill_null(table["language"], language))
                staged += table.num_rows
                if table.num_rows:
                    copy_in(
                        cur,
                        "COPY staging (seq, doc_id, title, body, language) FROM STDIN WITH (FORMAT csv)",
                        _csv(table),
                    )
                if after_chunk is not None:
                    after_chunk(result.rows)
            self._stage_rejected_ids(cur, result)  # those of rows rejected after the last chunk
            result.quarantine.flush()
            # the last occurrence wins: drop every row that a later row of the same doc_id supersedes, rejected or not
            cur.execute(DROP_SUPERSEDED)
            result.duplicates = cur.rowcount
            distinct = staged - result.duplicates
            cur.execute(
                "SELECT language, count(*) FROM staging WHERE language IS NOT NULL"
                " AND NOT (language = ANY(%s)) GROUP BY language",
                (sorted(KNOWN_LANGUAGES),),
            )
            # Plain codes are ruled out in SQL; the rest (pt-BR, zh-Hans, typos) are judged by their tag.
            unknown = {tag: n for tag, n in cur.fetchall() if not is_known_language(tag)}
            result.unknown_languages = dict(Counter(unknown).most_common())
            cur.execute(
                sql.SQL(
                    """WITH upserted AS (
                        INSERT INTO {t} AS d (doc_id, title, body, language, modified_at, deleted)
                        -- doc_id order: concurrent loads lock shared rows in one order, so they never deadlock
                        SELECT doc_id, title, body, language, now(), false FROM staging ORDER BY doc_id
                        ON CONFLICT (doc_id) DO UPDATE
                        SET title = EXCLUDED.title, body = EXCLUDED.body, language = EXCLUDED.language,
                            deleted = false, modified_at = now()
                        WHERE (d.title, d.body, d.language, d.deleted)
                              IS DISTINCT FROM (EXCLUDED.title, EXCLUDED.body, EXCLUDED.language, false)
                        -- xmax is 0 for a freshly inserted row version, the locking txn for an update
                        RETURNING (d.xmax = 0) AS inserted
                    )
                    SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted)
                    FROM upserted"""
                ).format(t=t)
            )
            result.inserted, result.updated = cur.fetchone()
            result.unchanged = distinct - result.inserted - result.updated
        return result

    @staticmethod
    def _stage_rejected_ids(cur: psycopg2.extensions.cursor, result: LoadResult) -> None:
        """Stage the doc_ids of the rows rejected so far (``result.rejected_ids``), and forget them."""
        if result.rejected_ids:
            seqs, ids = zip(*result.rejected_ids, strict=True)
            table = pa.table({"seq": pa.array(seqs, pa.int64()), "doc_id": pa.array(ids, pa.string())})
            copy_in(cur, "COPY rejected_ids (seq, doc_id) FROM STDIN WITH (FORMAT csv)", _csv(table))
            result.rejected_ids = []

    @contextlib.contextmanager
    def _quarantining(self, cur: psycopg2.extensions.cursor, result: LoadResult, file: str | None) -> Iterator[None]:
        """``result``'s rejections go to the quarantine table through ``cur`` while the load runs."""
        result.quarantine = _QuarantineWriter(cur, self.quarantine_table, result.load_id, file)
        try:
            yield
            result.quarantined = result.quarantine.written
        finally:
            result.quarantine = None

    def delete(self, doc_ids: Iterable[str]) -> int:
        """Soft-delete documents (bumping modified_at so consumers see it); returns how many were live. The row stays
        as a tombstone for the syncs that must remove the document; its title and body go (nothing reads a deleted
        document's text, and a corpus that churns would otherwise keep every text it ever deleted)."""
        return len(self.delete_returning(doc_ids))

    def delete_returning(self, doc_ids: Iterable[str]) -> set[str]:
        """``delete``, returning the ids of the documents that were live (the others were unknown or deleted)."""
        with self._connect() as conn, conn.cursor() as cur:
            cur.execute(
                sql.SQL(
                    "UPDATE {t} SET deleted = true, title = NULL, body = NULL, modified_at = now()"
                    " WHERE doc_id = ANY(%s) AND NOT deleted RETURNING doc_id"
                ).format(t=self._t),
                (list(doc_ids),),
            )
            return {doc_id for (doc_id,) in cur.fetchall()}

    def mark_indexed(self, doc_ids: Iterable[str], at: datetime | None = None) -> int:
        """Record when documents were last embedded (``indexed_at``); does not touch modified_at."""
        with self._connect() as conn, conn.cursor() as cur:
            cur.execute(
                sql.SQL("UPDATE {t} SET indexed_at = COALESCE(%s, now()) WHERE doc_id = ANY(%s)").format(t=self._t),
                (at, list(doc_ids)),
            )
            return cur.rowcount

    def changed_since(
        self, watermark: tuple[datetime, str] | None, *, limit: int = 10_000, body_chars: int | None = None
    ) -> list[DocumentRow]:
        """Up to ``limit`` rows (deleted ones included) after ``watermark`` in (modified_at, doc_id) order, their
        bodies cut to ``body_chars`` characters (``body_column``).

        Keyset pagination: feed the last row's ``watermark`` back to get the next page; rows with equal
        modified_at are split by doc_id, so a scan never skips or repeats a row. A writer whose transaction
        began before the watermark but commits after it can still be missed: re-scan with some overlap
        if loads run concurrently with consumers.
        """
        if limit <= 0:
            raise ValueError("limit must be positive")
        query = sql.SQL(
            "SELECT doc_id, title, {body}, language, indexed_at, modified_at, deleted FROM {t} {where}"
            " ORDER BY modified_at, doc_id LIMIT %s"
        )
        where = sql.SQL("WHERE (modified_at, doc_id) > (%s, %s)") if watermark else sql.SQL("")
        params: tuple[Any, ...] = (*watermark, limit) if watermark else (limit,)
        with self._connect() as conn, conn.cursor() as cur:
            cur.execute(query.format(t=self._t, where=where, body=body_column(body_chars)), params)
            return list(map(DocumentRow._make, cur.fetchall()))

    def latest_change(self) -> datetime | None:
        """When the newest change (insert, update, delete) happened."""
        with self._connect() as conn, conn.cursor() as cur:
            cur.execute(sql.SQL("SELECT max(modified_at) FROM {t}").format(t=self._t))
            return cur.fetchone()[0]

    def stable_horizon(self) -> datetime:
        """A time before which no more changes can appear: the start of the oldest open transaction.

        ``modified_at`` is a transaction's start time, so a long load commits rows dated in the past;
        a consumer that stops its scan here never jumps its watermark over them.
        """
        with self._connect() as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT LEAST(now(), min(xact_start)) FROM pg_stat_activity"
                " WHERE xact_start IS NOT NULL AND pid <> pg_backend_pid() AND datname = current_database()"
            )
            return cur.fetchone()[0]

    def changed_from(self, horizon: datetime) -> int:
        """How many documents changed at or after ``horizon``: the changes a consumer stopping at ``stable_horizon``
        leaves for a later run (a range of the (modified_at, doc_id) index)."""
        with self._connect() as conn, conn.cursor() as cur:
            cur.execute(sql.SQL("SELECT count(*) FROM {t} WHERE modified_at >= %s").format(t=self._t), (horizon,))
            return cur.fetchone()[0]

    def oldest_transaction(self) -> tuple[datetime, str] | None:
        """When the oldest open transaction on the database began (what holds ``stable_horizon`` back) and its session
        in one line: pid, state, application, since when; None when there is none (or none this role may see)."""
        with self._connect() as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT pid, state, application_name, xact_start FROM pg_stat_activity WHERE xact_start IS NOT NULL"
                " AND pid <> pg_backend_pid() AND datname = current_database() ORDER BY xact_start LIMIT 1"
            )
            row = cur.fetchone()
        if row is None:
            return None
        pid, state, application, started = row
        since = started.isoformat(timespec="seconds")
        return started, f"pid {pid} ({state or 'state hidden'}, application {application or 'unnamed'}) since {since}"

    def sample(self, n: int, *, seed: float = 0.42) -> list[tuple[str, str | None, str | None]]:
        """A repeatable random sample of live documents: (doc_id, title, body)."""
        with self._connect() as conn, conn.cursor() as cur:
            cur.execute("SELECT setseed(%s)", (seed,))
            cur.execute(
                sql.SQL("SELECT doc_id, title, body FROM {t} WHERE NOT deleted ORDER BY random() LIMIT %s").format(
                    t=self._t
                ),
                (n,),
            )
            return cur.fetchall()

    def iter_ids(self, *, page: int = 10_000) -> Iterator[list[str]]:
        """Every doc_id the table holds, deleted ones too, in pages by doc_id (keyset over the primary key)."""
        after = ""
        while True:
            with self._connect() as conn, conn.cursor() as cur:
                cur.execute(
                    sql.SQL("SELECT doc_id FROM {t} WHERE doc_id > %s ORDER BY doc_id LIMIT %s").format(t=self._t),
                    (after, page),
                )
                ids = [doc_id for (doc_id,) in cur.fetchall()]
            if ids:
                yield ids
            if len(ids) < page:
                return
            after = ids[-1]

    def count(self, *, include_deleted: bool = False) -> int:
        """How many documents the table holds (live ones only by default)."""
        where = sql.SQL("") if include_deleted else sql.SQL(" WHERE NOT deleted")
        with self._connect() as conn, conn.cursor() as cur:
            cur.execute(sql.SQL("SELECT count(*) FROM {t}").format(t=self._t) + where)
            return cur.fetchone()[0]


def _csv(table: pa.Table) -> io.BytesIO:
    """PostgreSQL CSV for COPY: strings always quoted, NULLs as an unquoted empty field."""
    buffer = io.BytesIO()
    pa_csv.write_csv(table, buffer, pa_csv.WriteOptions(include_header=False, quoting_style="needed"))
    buffer.seek(0)
    return buffer
