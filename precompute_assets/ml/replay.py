"""Honest hit-rate measurement: a key trace replayed against LRU, S3-FIFO, ARC, top-N, ours and two bounds."""

from __future__ import annotations

import codecs
import csv
import dataclasses
import errno
import functools
import heapq
import io
import itertools
import json
import lzma
import os
import re
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Hashable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd

from ..serving.admission import (
    AGE_STEP_BYTES,
    COUNTER_MAX,
    MAX_STEPS,
    AdmissionPolicy,
    FrequencySketch,
    Probation,
    SecondMiss,
    admission_policy,
    hand_over_order,
    probation_sizes,
    published_order,
)
from .selection import DEMAND_WINDOW_DAYS, ad_demand, daily_counts, select_top

_PAD = r"[^\S\n]*"  # whitespace around a field: any whitespace but the newline that ends the line
_NUM = r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"  # unambiguous: no backtracking
_INT = r"[+-]?[0-9]+"
# An ISO 8601 date, or date and time (a "T" or a space between them), with an optional UTC offset.
_DATE = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
# " UTC": BigQuery's CSV exports end timestamps so; a blank before +0000: Snowflake's TIMESTAMP_TZ unloads
_OFFSET = r"(?:Z| UTC| ?[+-][0-9]{2}(?::?[0-9]{2})?)"
_DATETIME = rf"{_DATE}(?:[T ][0-9]{{2}}:[0-9]{{2}}(?::[0-9]{{2}}(?:\.[0-9]+)?)?)?{_OFFSET}?"
_CSV_START = rf"{_PAD}(?:{_NUM}|{_DATETIME}){_PAD},"  # a line whose part before the first comma is a timestamp
_NUM_START = rf"{_PAD}{_NUM}{_PAD},"  # the same with a number (date-times are numbers by the time lines are checked)
# The first line that is not a valid line of the format; one regex pass is fast and gives its position.
_BAD_LINE = {
    "key": re.compile(rf"^(?!(?!{_CSV_START}){_PAD}\S+{_PAD}$)", re.MULTILINE),
    "csv": re.compile(rf"^(?!{_NUM_START}{_PAD}[^\s,]+{_PAD}$)", re.MULTILINE),
}
# The first line whose key is not an integer; none means the fast integer parser can take the whole trace.
_NOT_INT_LINE = {
    "key": re.compile(rf"^(?!{_PAD}{_INT}{_PAD}$)", re.MULTILINE),
    "csv": re.compile(rf"^(?!{_NUM_START}{_PAD}{_INT}{_PAD}$)", re.MULTILINE),
}
# A key line whose integer is not written the one usual way (a plus sign, a leading zero, minus zero): "007" and
# "7" are distinct keys that integers would merge.
# Searched in the cleaned text of an all-integer trace (no blanks; ``key`` or ``timestamp,key`` lines), where a key
# starting so is one: a cheap scan.
_ODD_INT_LINE = {
    "key": re.compile(r"^(?:\+|-?0[0-9]|-0$)", re.MULTILINE),
    "csv": re.compile(r",(?:\+|-?0[0-9]|-0(?:\n|$))"),
}
_CSV_START_RE = re.compile(_CSV_START)
_PSQL_FOOTER = re.compile(r"\n\([0-9]+ rows?\)$")
_SEPARATOR_MARKS = {"tab": "\t", "semicolon": ";", "pipe": "|"}  # separators replaced by commas before the parse
_DATETIME_START_RE = re.compile(rf"{_PAD}{_DATE}")  # a timestamp that is a date-time, not a number
_COMMA_MARK = "\ue000"  # a private-use character, in no trace: a comma inside a blank-separated field meanwhile
_DATETIME_FIELD_RE = re.compile(rf"{_DATE}T\S*")  # one without blanks: a field of a whitespace-separated line
_NUM_RE = re.compile(_NUM)
_NUMBER_START = re.compile(r"[+-]?\.?[0-9]")  # a name never starts so; a timestamp in any form does
_FLOAT_WORD = re.compile(r"[+-]?(?:nan|inf|infinity)", re.IGNORECASE)  # what float() reads that is no number
PER_SECOND = {"s": 1, "ms": 1e3, "us": 1e6, "ns": 1e9}  # ticks of a datetime64 or Arrow timestamp unit
_FIRST_FIELD = re.compile(r"^[^,\n]*", re.MULTILINE)
_FIRST_FIELD_COMMA = re.compile(r"^[^,\n]*,", re.MULTILINE)
_PADDED_FIELD = re.compile(r"^[^\S\n]|[^\S\n],", re.MULTILINE)  # blanks before a line's first field or a comma
_ODD_SPACE = re.compile(r"[^\S\n \t]")  # whitespace other than spaces and tabs, which str.replace removes faster
_EDGE_BLANK = re.compile(r"^ | $", re.MULTILINE)
_BLANKS = re.compile(r"[ \t]+")
# A field a CSV writer quoted, whole between commas: "ad1" (every field of a QUOTE_ALL export) or "c""d" (a key
# holding a quote). One holding a comma or a blank is no match: a line-based reader cannot split it, so its line is
# left to the line checks (refused, or cut by the import).
_QUOTED_FIELD = re.compile(r'(?<![^,\n])"((?:[^"\s,]|"")*)"(?=,|\n|$)')
# A first line of quoted fields only: a QUOTE_ALL export, CSV although its first field is no number.
_ALL_QUOTED_LINE = re.compile(r'"(?:[^"\n]|"")*"(?:,"(?:[^"\n]|"")*")+')
# A ``timestamp,key`` line that is a date-time to the second, a comma and three digits: Python logging's asctime
# (``2025-12-01 08:30:00,123``) writes the milliseconds after a comma, which splits them off as the key.
_COMMA_MILLIS = rf"{_DATE}[T ][0-9]{{2}}:[0-9]{{2}}:[0-9]{{2}},[0-9]{{3}}"
_NOT_COMMA_MILLIS_LINE = re.compile(rf"^(?!{_COMMA_MILLIS}$)", re.MULTILINE)
_COMMA_MILLIS_LINE = np.dtype([("seconds", "S19"), ("comma", "S1"), ("digits", "S3"), ("newline", "S1")])


# Redis (Valkey) MONITOR output, as `redis-cli monitor > log` writes it: the reply OK to MONITOR, then a line a command,
# `1733400000.123456 [0 127.0.0.1:53422] "GET" "ad:42"`: seconds, the database and the client (an address, [::1]:port,
# unix:/path or lua), and each argument quoted as Redis' sdscatrepr writes it (\" \\ \n \r \t \a \b and \xHH).
_MONITOR_START = re.compile(r"[0-9]+\.[0-9]+ \[[0-9]+ ")  # enough of a line to tell the format, even if cut off
# a quoted argument's content: runs of plain characters between escapes (unrolled: no alternation per character)
_MONITOR_TEXT = r'[^"\\\n]*(?:\\(?:x[0-9a-fA-F]{2}|[\\"nrtab])[^"\\\n]*)*'
_MONITOR_ARG_RE = re.compile(rf'"({_MONITOR_TEXT})"')  # one argument, its content in group 1
_MONITOR_CLIENT = r"[^\[\]\n]*(?:\[[^\]\n]*\][^\[\]\n]*)*"  # 127.0.0.1:53422, [::1]:53422, unix:/path, lua
# a command: its time, [database client], its name's and its first argument's contents, and the arguments after them
_MONITOR_COMMAND = (
    rf'([0-9]+\.[0-9]+) \[[0-9]+ {_MONITOR_CLIENT}\] "({_MONITOR_TEXT})"'
    rf'(?: "({_MONITOR_TEXT})")?((?: "{_MONITOR_TEXT}")*)'
)
# each line: the reply OK (its groups None), or a command
_MONITOR_LINE = re.compile(rf"^(?:OK|{_MONITOR_COMMAND})$", re.MULTILINE)
_NOT_MONITOR = 'not a Redis MONITOR line (TIME [DB CLIENT] "COMMAND" "ARG"...): cut off, or a line of another log?'
_MONITOR_ESCAPE = re.compile(rb'\\(x[0-9a-fA-F]{2}|[\\"nrtab])')
_MONITOR_ESCAPED = {b"\\": b"\\", b'"': b'"', b"n": b"\n", b"r": b"\r", b"t": b"\t", b"a": b"\a", b"b": b"\b"}
# The commands that read a value, their first argument its key: each one request. Every other command is skipped and
# counted by name, its arguments never echoed (AUTH's, HELLO's and MIGRATE's hold passwords): writes (a cache-aside
# client's SET after each miss would count as a hit on the key it just missed), deletes, expiries, and commands whose
# first argument is no key.
_MONITOR_READS = frozenset({
    "BITCOUNT", "BITFIELD_RO", "BITPOS", "EXISTS", "GEODIST", "GEOHASH", "GEOPOS", "GEORADIUSBYMEMBER_RO",
    "GEORADIUS_RO", "GEOSEARCH", "GET", "GETBIT", "GETDEL", "GETEX", "GETRANGE", "HEXISTS", "HGET", "HGETALL", "HKEYS",
    "HLEN", "HMGET", "HRANDFIELD", "HSCAN", "HSTRLEN", "HVALS", "JSON.GET", "LINDEX", "LLEN", "LPOS", "LRANGE", "MGET",
    "PFCOUNT", "SCARD", "SISMEMBER", "SMEMBERS", "SMISMEMBER", "SRANDMEMBER", "SSCAN", "STRLEN", "SUBSTR", "XLEN",
    "XRANGE", "XREVRANGE", "ZCARD", "ZCOUNT", "ZLEXCOUNT", "ZMSCORE", "ZRANDMEMBER", "ZRANGE", "ZRANGEBYLEX",
    "ZRANGEBYSCORE", "ZRANK", "ZREVRANGE", "ZREVRANGEBYLEX", "ZREVRANGEBYSCORE", "ZREVRANK", "ZSCAN", "ZSCORE",
})  # fmt: skip
_MONITOR_EVERY_KEY = frozenset({"EXISTS", "MGET", "PFCOUNT"})  # every argument a key, each one request
_MONITOR_NAMES_KEPT = 20  # skipped commands counted by name; the rarer ones together as "others"


class TraceError(ValueError):
    """A trace file that is not one key per line, nor ``timestamp,key`` lines."""


@dataclass(frozen=True)
class Trace:
    """Requested keys in request order, with their timestamps (seconds or ms) when the trace had them.

    ``keys`` is int64 when every key is an integer that fits, else an object array of ``str`` (always, for Redis
    MONITOR output: Redis keys are strings).
    """

    keys: np.ndarray
    timestamps: np.ndarray | None = None
    fields: int = 1  # fields per line in the file
    timestamp_field: int | None = None  # which of them (1-based) held the timestamp, and the key
    key_field: int = 1
    header: tuple[str, ...] | None = None  # the column names of a header line, when the file had one
    # or "oracle-general", "oracle-general-opns": libCacheSim's binary records; "parquet"; "redis-monitor" (text)
    format: str = "text"
    separator: str | None = None  # between fields of a text line: "comma" or "whitespace" (None: one field)
    where: dict | None = None  # the filter of lines: field, values, lines dropped
    logged_hits: np.ndarray | None = None  # per request, whether the serving client hit (its query log's ``hit``)
    # The timestamps were date-times (ISO 8601 text, a Parquet timestamp column), so seconds since the epoch already:
    # no unit to read them in
    dated: bool = False
    skipped: dict[str, int] | None = None  # lines read but no request: Redis MONITOR commands naming no key, by name

    def layout(self) -> dict:
        """How the file was read, for a reader to check: its format, the fields per line (record), the two that
        were used, the header's names and the distinct keys (a key read from the wrong field shows here)."""
        out: dict = {
            "format": self.format,
            "fields": self.fields,
            "timestamp_field": self.timestamp_field,
            "key_field": self.key_field,
        }
        if self.separator is not None:
            out["separator"] = self.separator
        if self.header is not None:
            out["header"] = list(self.header)
        if self.where is not None:
            out["where"] = self.where
        if self.skipped is not None:
            out["skipped_commands"] = self.skipped
        out["distinct_keys"] = int(pd.Series(self.keys).nunique())
        return out


Columns = tuple[int | str | None, int | str]  # (timestamp field or None, key field): 1-based or header names
# The fields of a CSV whose header's first name is empty, pandas' unnamed index (its row numbers): with two names
# after it, the timestamp and the key; with one, the key.
_PANDAS_INDEX: dict[bool, Columns] = {True: (2, 3), False: (None, 2)}
# The names a header gives the time and the key of each request (compared in lower case, without "_", "-", "."
# or blanks), the key's in order of preference: systor17's "Timestamp,Response,IOType,LUN,Offset,Size" is read by
# its Offset, where field 2 (the default without such names) is a response time. A bare "id" is no key name: it is
# as often a request's own id (IBM's registry traces) as an object's.
_TIME_NAMES = frozenset(
    ["timestamp", "ts", "time", "t", "clock", "datetime", "epoch", "tsms", "tsus", "timestampms", "requesttime",
     "eventtime", "optime", "unixtime", "relativeunix", "reqtime"]
)  # fmt: skip
_KEY_NAMES = (
    "key", "cachekey", "requestkey", "objid", "objectid", "object", "obj", "url", "uri", "path", "page", "itemid",
    "item", "offset", "lba", "blockid", "block", "address", "adid", "docid", "productid", "sku",
)  # fmt: skip
# Given for a field the caller left to the header's names (``read_trace`` with only --key-field or --time-field)
NAMED = "\0named"
TRACE_FORMATS = ("auto", "text", "oracle-general", "oracle-general-opns", "parquet")
# libCacheSim's oracleGeneral records, little-endian and packed: 24 bytes each.
ORACLE_GENERAL = np.dtype([("time", "<u4"), ("obj_id", "<u8"), ("obj_size", "<u4"), ("next_access_vtime", "<i8")])
# Its oracleGeneralOpNS records: the same time, id and size, then the operation, namespace and next access, 27
# bytes in all; only the time and the id are read.
ORACLE_GENERAL_OPNS = np.dtype([("time", "<u4"), ("obj_id", "<u8"), ("rest", "V15")])
_ORACLE = {  # format -> (record dtype, libCacheSim's name, fields per record)
    "oracle-general": (ORACLE_GENERAL, "oracleGeneral", 4),
    "oracle-general-opns": (ORACLE_GENERAL_OPNS, "oracleGeneralOpNS", 6),
}
# Compressed traces, by their file name's last suffix: pyarrow's codecs (a dependency already), and the stdlib's xz.
_COMPRESSION = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".zstd": "zstd", ".lz4": "lz4", ".br": "brotli"}


def parse_trace(
    path: str | Path,
    *,
    columns: Columns | None = None,
    trace_format: str = "auto",
    where: tuple[int | str, Collection[str]] | None = None,
    exact_keys: bool = False,
    spelled_keys: bool = False,
) -> Trace:
    """Read one key per line, or ``timestamp,key[,more...]`` lines; raise TraceError naming the bad line.

    The file may be compressed (``.gz``, ``.bz2``, ``.xz``, ``.zst``, ``.lz4``, ``.br``, by its suffix).
    ``trace_format="oracle-general"`` reads libCacheSim's binary records instead (``ORACLE_GENERAL``: the time in
    seconds and the object id are used; ids of 2^63 and above are read as the negative int64 of the same bits, so
    every id stays distinct), ``"oracle-general-opns"`` its 27-byte oracleGeneralOpNS records the same way;
    ``"auto"`` takes one for a file whose name says ``oracleGeneral`` (``oracleGeneralOpNS``) and whose first
    records hold a NUL byte (which text never does, and records all but always do). ``"parquet"`` (and ``"auto"``
    for a folder, a ``.parquet`` file or Parquet's magic bytes) reads columns of Parquet files: ``parquet_trace``.
    Redis MONITOR output (``redis-cli monitor > log``), told by its first line, is read as such: ``_monitor_trace``.

    A key is any token without whitespace (padding is stripped); the first line decides the format: it is
    CSV when the part before its first comma is a number or an ISO 8601 date-time (read as seconds since the
    epoch, UTC without an offset), and then keys hold no comma, every line has as many fields as the first and
    fields after the key are ignored (``timestamp,key,size`` of libCacheSim, Twitter's seven columns). A first
    line of names (none starting like a number, as many fields as the line after it) is a header, skipped; it
    makes the lines below it CSV, and its names choose their timestamp and key (``columns_by_name``). ``columns``
    picks the timestamp and key fields of any other CSV layout (``(1, 5)`` or ``("Timestamp", "Offset")`` for MSR
    Cambridge; a timestamp of None: keys only).
    Fields may be separated by spaces or tabs instead (``timestamp key size`` of the Wikipedia CDN traces): so
    are they when the first line (or the one below a header of names) has no comma and two or more fields, the
    first a number; every run of spaces and tabs then separates two fields, and keys hold no comma.

    ``where=(field, values)`` keeps only the requests whose field (a 1-based number or a header name) is one of
    ``values``, e.g. ``("operation", ["get", "gets"])`` for Twitter's cache traces or ``("Type", ["Read"])`` for
    MSR's: every line is still read and checked, so an error names its line as numbered in the file.

    Integer keys are read as integers, unless two written differently would merge (``007`` and ``7``): the replay
    needs keys distinct, not spelled. ``exact_keys`` reads every key as the id it stands for, as a request log's import
    needs (its keys are the ids the serving client is asked for): a text trace's as written (``007``, ``+7``) but
    for the quotes of a field a CSV writer quoted (``"c""d"`` is ``c"d``), a Parquet uint64 key or an oracleGeneral
    object id as its number's text. A file whose first line is quoted fields only (a QUOTE_ALL export, R's
    ``write.csv``) is CSV, its fields' quotes removed, with or without ``exact_keys``. ``spelled_keys`` keeps the
    integer spellings of a text trace (``007`` stays ``007``) and reads a Parquet uint64 or oracleGeneral id as its
    number's text, for a replay that hashes keys as the serving client does (``--ab``, the frequency sketch), but
    keeps a text trace's CSV quotes as every other replay does.
    """
    if _reads_parquet(path, trace_format):
        from .parquet_trace import read_parquet_trace  # it builds on this module's Trace

        # a uint64 id's number text: spelled as the id the serving client gets (2^63 and above not as int64)
        return read_parquet_trace(path, columns=columns, where=where, exact_keys=exact_keys or spelled_keys)
    path = Path(path)
    read = functools.partial(_read_bytes, path)
    return _local_trace(path.name, read, columns, trace_format, where, exact_keys, spelled_keys)


def _reads_parquet(path: str | Path, trace_format: str) -> bool:
    """Whether ``parse_trace`` reads ``path`` as Parquet, once ``trace_format`` is checked: a ValueError names an
    unknown one, a TraceError a URI given any format but Parquet's. ``"auto"`` looks at the file at most once."""
    if trace_format not in TRACE_FORMATS:
        raise ValueError(f"trace_format must be one of {', '.join(TRACE_FORMATS)}, got {trace_format!r}")
    from .parquet_trace import is_parquet, is_uri  # it builds on this module's Trace

    if is_uri(path) and trace_format not in ("auto", "parquet"):
        raise TraceError(f"a URI is read as Parquet (a lake's query_logs), not as {trace_format}: copy the file here")
    return trace_format == "parquet" or (trace_format == "auto" and is_parquet(path))


def _local_trace(
    name: str,
    read: Callable[[], bytes],
    columns: Columns | None,
    trace_format: str,
    where: tuple[int | str, Collection[str]] | None,
    exact_keys: bool,
    spelled_keys: bool = False,
) -> Trace:
    """``parse_trace`` of a file that is not Parquet: the bytes ``read`` returns, of a file called ``name``."""
    data = read()
    if trace_format == "auto" and "oraclegeneral" in name.lower() and b"\0" in data[: 27 * 4096]:
        trace_format = "oracle-general-opns" if "oraclegeneralopns" in name.lower() else "oracle-general"
    if trace_format in _ORACLE:  # text never holds a NUL byte, and these records all but always do
        if columns is not None or where is not None:
            raise TraceError(
                f"--key-field, --time-field and --where read fields of text traces, not {_ORACLE[trace_format][1]}'s"
            )
        return _oracle_general(data, trace_format, exact_keys or spelled_keys)
    if (archive := _archive_kind(data)) is not None:
        raise TraceError(
            f"the file is a {archive[0]} archive, not a trace: extract the trace from it ({archive[1]} writes it to "
            "standard output, which a trace named - reads)"
        )
    if (compressed := compression_kind(data)) is not None and Path(name).suffix.lower() not in _COMPRESSION_SUFFIXES:
        codec, suffix, command = compressed
        raise TraceError(
            f"the trace is {codec}-compressed: decompress it ({command} FILE | ... --trace -), or name the file "
            f"*{suffix}"
        )
    open_end = _ends_mid_line(data)
    try:
        text = _decode_text(data)
    except TraceError as error:
        _note_if_cut_off(error, data.count(b"\n") + 1 if open_end else 0)
        raise
    del data  # the text holds it now: a trace's bytes need not stay beside it through the parse
    try:
        return _text_trace(text, columns, where, exact_keys, spelled_keys)
    except TraceError as error:
        _note_if_cut_off(error, text.count("\n") + 1 if open_end else 0)
        raise


def _ends_mid_line(data: bytes) -> bool:
    """Whether the last line that is not blank ends without a newline: a file cut off mid-line, or one written without
    a final newline (spaces and tabs after a newline are a blank line, which the parse drops). No copy of ``data``."""
    end = len(data)
    while end and data[end - 1] in b" \t":
        end -= 1
    return end > 0 and data[end - 1] not in b"\n\r"


def _note_if_cut_off(error: TraceError, last_line: int) -> None:
    """Add a note to ``error`` when it names ``last_line``, the file's last line when it ends without a newline (else
    0): a download or copy that stopped cuts a line, and its problem ("a bare key", "not UTF-8") did not say so. Not
    for a file of one line: binary records hold no newline byte, and their first is no line cut off."""
    found = _LINE_ERROR.match(str(error))
    if last_line > 1 and found is not None and int(found[1]) == last_line:
        error.add_note(
            "the file's last line, which ends without a newline: the file may be cut off, as by a copy or download "
            "that stopped; copy it again, or drop that line with head -n -1"
        )


def _archive_kind(data: bytes) -> tuple[str, str] | None:
    """A zip or tar archive's name and the command that writes its files' bytes out, by their magic bytes; else None.
    Read as text, such an archive was refused as a binary trace, and --format reads none."""
    if data.startswith(b"PK\x03\x04"):
        return "zip", "unzip -p FILE"
    if data[257:262] == b"ustar":  # POSIX tar's magic, in the first member's header
        return "tar", "tar -xOf FILE"
    return None


# Compressed bytes by their magic: (magic, codec, the suffix that makes the trace decompressed, a command that does).
_COMPRESSION_MAGIC = (
    (b"\x1f\x8b", "gzip", ".gz", "gzip -dc"),
    (b"\xfd7zXZ\x00", "xz", ".xz", "xz -dc"),
    (b"\x28\xb5\x2f\xfd", "zstd", ".zst", "zstd -dc"),
    (b"\x04\x22\x4d\x18", "lz4", ".lz4", "lz4 -dc"),
)
_COMPRESSION_SUFFIXES = {*_COMPRESSION, ".xz"}


def compression_kind(data: bytes) -> tuple[str, str, str] | None:
    """The codec, suffix and decompressing command of compressed ``data``, by its magic bytes; else None. Read as
    text, a .gz saved without its suffix (or piped in undecompressed) was "not valid UTF-8 text (a binary trace?)"."""
    for magic, *kind in _COMPRESSION_MAGIC:
        if data.startswith(magic):
            return kind[0], kind[1], kind[2]
    # bzip2: "BZh", the block size 1-9, then a block's magic (pi's digits) or the end of stream's (sqrt(pi)'s)
    if data[:3] == b"BZh" and data[3:4].isdigit() and data[4:10] in (b"1AY&SY", b"\x17rE8P\x90"):
        return "bzip2", ".bz2", "bzip2 -dc"
    return None


def _text_trace(
    text: str,
    columns: Columns | None,
    where: tuple[int | str, Collection[str]] | None,
    exact_keys: bool = False,
    spelled_keys: bool = False,
) -> Trace:
    """The trace of a text file's ``text`` (``parse_trace``'s text formats)."""
    if (nul := text.find("\0")) >= 0:
        raise TraceError(f"line {text.count(chr(10), 0, nul) + 1}: {_NUL_LINE}")
    if _is_monitor_output(text):
        return _monitor_trace(text, columns, where)
    if re.fullmatch(r"OK(\nOK)*", text):
        raise TraceError(
            "the file holds only Redis MONITOR's reply OK: the capture ended before any command came; run "
            "redis-cli MONITOR while the traffic flows"
        )
    if _is_json_object(text.partition("\n")[0]):  # else read as a header of names '{"ts": 1', ' "key": "a"}'
        raise TraceError(
            "line 1 is a JSON object: JSON lines are no trace format; write the timestamp and the key as text lines, "
            "e.g. with jq -r '[.ts, .key] | @tsv'"
        )
    if _ALL_QUOTED_LINE.fullmatch(text.partition("\n")[0]):  # a QUOTE_ALL export, R's write.csv header
        text = _csv_unquoted(text)  # before the format is told by its first line: "1764000000","ad1" is CSV
    separator = _separator(text)
    if separator == "pipe":
        text = _PSQL_FOOTER.sub("", text)  # psql -A's "(5760 rows)" below the rows: no request
    # a comma inside a field of a whitespace trace (a Wikipedia URL) is held as _COMMA_MARK while the lines are parsed
    commas_marked = separator == "whitespace" and "," in text and _COMMA_MARK not in text
    if commas_marked:
        text = text.replace(",", _COMMA_MARK)
    if separator != "comma" and (comma := text.find(",")) >= 0:
        line_no = text.count("\n", 0, comma) + 1
        decimal = " (a decimal comma? Write the numbers with a point)" if separator == "semicolon" else ""
        raise TraceError(f"line {line_no}: a comma in a trace of {separator}-separated fields{decimal}")
    if separator in _SEPARATOR_MARKS:
        text = text.replace(_SEPARATOR_MARKS[separator], ",")
    if separator == "whitespace":
        text = text.replace("\t", " ")
        if "  " in text:
            text = re.sub(" +", " ", text)
        if text.startswith(" ") or text.endswith(" ") or "\n " in text or " \n" in text:
            text = _EDGE_BLANK.sub("", text)  # one space now: no run to backtrack over
        text = text.replace(" ", ",")
    first_line = 1
    first, _, rest = text.partition("\n")
    names, below = _header_names(first), rest.partition("\n")[0]
    if names and names[0] == "" and not below.partition(",")[0].strip().isdigit():
        names = None  # no row number below an unnamed first column: a request missing its timestamp, not an index
    if names and _FLOAT_WORD.fullmatch(names[0]) and _CSV_START_RE.match(below):
        # "nan,ad1" above "1764000000,ad2" is a request whose timestamp is no number, not a header to skip
        raise TraceError(f"line 1: timestamp {names[0]!r} is not a finite number")
    if names and not rest:
        raise TraceError("line 1 is a header of column names, and no request follows it")
    if names and below.count(",") + 1 == len(names):
        text, first_line = rest, 2  # it names the columns of the CSV lines below it
    header = tuple(names) if first_line == 2 else None
    one_column = None  # the header of a one-column export (object_id above integer ids): no request
    if first_line == 1 and _names_integer_column(first, rest):
        text, first_line, one_column = rest, 2, first.strip()
    chosen = columns is not None and NAMED not in columns  # the caller named the fields
    default = _default_columns(header, bool(header) or bool(_CSV_START_RE.match(text.partition("\n")[0])))
    if columns is None:
        columns = default
    elif NAMED in columns:  # one field named by the caller, the other by the header or the default
        fallback = default or (1, 2)
        columns = (
            fallback[0] if columns[0] == NAMED else columns[0],
            fallback[1] if columns[1] == NAMED else columns[1],
        )
    fields, time_field, key_field = 1, None, 1  # bare keys
    every_field = text
    if columns is not None:
        text, time_field, key_field, fields = _select_columns(text, first_line, header, columns)
    kind = "key" if time_field is None else "csv"  # now one key, or timestamp,key, per line
    if exact_keys and kind == "csv" and '"' in text:
        text = _csv_unquoted(text)  # a key read with its CSV quotes was another id: "c""d" is c"d
    if (
        not chosen
        and fields > 2
        and re.match(_COMMA_MILLIS, text)
        and not _NOT_COMMA_MILLIS_LINE.search(text)
        and not _digits_fall_within_seconds(text)
    ):
        raise TraceError(
            f"every line starts like {text.partition(chr(10))[0]!r}: a time with its milliseconds after a comma, as "
            "Python logging writes it, not a timestamp and a key? Name the key's field with --key-field (2 if the "
            "three digits are the keys)"
        )
    dated = None
    if kind == "csv" and _DATETIME_START_RE.match(text):
        text, dated = _date_times(text, first_line)
    integer = _NOT_INT_LINE[kind].search(text) is None  # an integer line is always a valid line
    if not integer and (bad := _BAD_LINE[kind].search(text)) is not None:
        line_no = text.count("\n", 0, bad.start()) + first_line
        line = text[bad.start() :].partition("\n")[0]
        problem = _line_problem(line, kind, header=header is not None)
        problem = problem.replace(_COMMA_MARK, ",").replace(repr(_COMMA_MARK)[1:-1], ",")  # as written, quoted too
        raise TraceError(f"line {line_no}: {problem}")
    number = None if where is None else _field_number(where[0], header, fields, "--where")
    kept = None if number is None else _kept_lines(every_field, number, fields, where[1])
    del every_field  # the file's whole text: not held through the parse of the keys
    # Every line is valid, so whitespace only pads fields and can go before the fast parsers run.
    clean = text.replace(" ", "").replace("\t", "")
    if _ODD_SPACE.search(clean):
        clean = _ODD_SPACE.sub("", clean)
    frame = _parse_integer_keys(clean, kind) if integer else None
    if frame is not None and _ODD_INT_LINE[kind].search(clean):  # zero-padded ids stay integers unless two merge
        as_written = _parse_string_keys(clean, kind)
        if exact_keys or spelled_keys or as_written["key"].nunique() != frame["key"].nunique():
            frame = as_written
    if frame is None:  # string keys, or integers beyond int64 (then they are kept as the strings they are)
        frame = _parse_string_keys(clean, kind)
    layout = {"fields": fields, "timestamp_field": time_field, "key_field": key_field, "header": header}
    layout["separator"] = separator if fields > 1 else None
    keys, timestamps = frame["key"].to_numpy(), None
    if one_column is not None:
        layout["header"] = (one_column,)
    if commas_marked and keys.dtype == object:
        keys = np.array([key.replace(_COMMA_MARK, ",") for key in keys], dtype=object)
    if kind == "csv":
        timestamps = frame["timestamp"].to_numpy(dtype=np.float64) if dated is None else dated
        infinite = np.flatnonzero(~np.isfinite(timestamps))
        if len(infinite):
            field = text.split("\n")[int(infinite[0])].split(",")[0].strip()
            raise TraceError(f"line {int(infinite[0]) + first_line}: timestamp {field!r} is not a finite number")
    if kept is not None:
        if not kept.any():
            raise TraceError(f"no line has field {number} in {sorted(where[1])}")
        keys, timestamps = keys[kept], None if timestamps is None else timestamps[kept]
        layout["where"] = {"field": number, "values": sorted(where[1]), "dropped": int((~kept).sum())}
    return Trace(keys=keys, timestamps=timestamps, dated=dated is not None, **layout)


def _is_monitor_output(text: str) -> bool:
    """Whether ``text`` is Redis MONITOR output: below the reply OK, if it starts with one, its first line or its second
    starts like a MONITOR line (the first may be cut off, where a rotated or tailed log starts; read as a text trace,
    its lines would be quoted in errors). A trace of bare keys may start with a key OK."""
    lines = text.split("\n", 3)
    if lines[0] == "OK":
        lines = lines[1:]
    return any(_MONITOR_START.match(line) for line in lines[:2])


def _monitor_trace(text: str, columns: Columns | None, where: tuple[int | str, Collection[str]] | None) -> Trace:
    """The trace of Redis MONITOR output (``_MONITOR_LINE``): a request per command that reads a key
    (``_MONITOR_READS``), at its time in seconds, keyed by its first argument (every argument of MGET, EXISTS and
    PFCOUNT); every other command (a write, a delete, one naming no key) is skipped and counted by name. A line that
    is not a MONITOR line, or whose key is empty, not UTF-8 or holds a NUL byte, is a TraceError that names it and
    never quotes it (an AUTH line may hold a password)."""
    if columns is not None or where is not None:
        raise TraceError("--key-field, --time-field and --where read fields of text traces, not Redis MONITOR output's")
    stamps: list[str] = []
    keys: list[str] = []
    skipped: dict[str, int] = {}
    for found in _monitor_lines(text):
        stamp, command, first, more = found.groups()
        name = command.upper() if stamp is not None else None
        if name is None or name not in _MONITOR_READS or first is None:
            if name is not None:
                skipped[name] = skipped.get(name, 0) + 1
            continue
        for written in [first, *_MONITOR_ARG_RE.findall(more)] if name in _MONITOR_EVERY_KEY else (first,):
            key, problem = _monitor_key(written)
            if problem:
                raise TraceError(f"line {text.count(chr(10), 0, found.start()) + 1}: {problem}")
            keys.append(key)
            stamps.append(stamp)
    if not keys:
        raise TraceError(f"no command of the Redis MONITOR output reads a key (skipped: {_named_counts(skipped)})")
    return Trace(
        keys=np.array(keys, dtype=object),
        timestamps=np.array(stamps, dtype=np.float64),
        fields=5,  # time, database, client, command, key
        timestamp_field=1,
        key_field=5,
        format="redis-monitor",
        dated=True,  # seconds since the epoch: no unit to guess
        skipped=_most_common(skipped),
    )


def _monitor_lines(text: str) -> Iterator[re.Match]:
    """``_MONITOR_LINE``'s match of each line of ``text`` in turn; a TraceError at the first line that is none, named
    by its number and never quoted. One pass: a line is bad where a match does not start right after the last."""
    expected = 0  # where the next line starts
    for found in itertools.chain(_MONITOR_LINE.finditer(text), [None]):
        start = len(text) + 1 if found is None else found.start()
        if start != expected:
            blank = not text[expected:].partition("\n")[0].strip()
            raise TraceError(f"line {text.count(chr(10), 0, expected) + 1}: {'blank line' if blank else _NOT_MONITOR}")
        if found is not None:
            yield found
            expected = found.end() + 1


def _monitor_key(written: str) -> tuple[str, str]:
    """The key that a MONITOR argument's quoted content ``written`` stands for and ""; or "" and why it is no key."""
    if "\\" in written:
        raw = _MONITOR_ESCAPE.sub(lambda m: _MONITOR_ESCAPED.get(m[1]) or bytes([int(m[1][1:], 16)]), written.encode())
        try:
            written = raw.decode("utf-8")
        except UnicodeDecodeError:
            return "", "the key's bytes are not UTF-8 text"
    if not written:
        return "", "empty key"
    if "\0" in written:
        return "", "the key holds a NUL byte"
    return written, ""


def _most_common(counts: dict[str, int]) -> dict[str, int]:
    """``counts`` from the largest, the ``_MONITOR_NAMES_KEPT`` largest by name and the rest as ``others``."""
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    kept = dict(ranked[:_MONITOR_NAMES_KEPT])
    if rest := sum(count for _, count in ranked[_MONITOR_NAMES_KEPT:]):
        kept["others"] = rest
    return kept


def _named_counts(counts: dict[str, int]) -> str:
    """``counts`` as text, ``PING 3, AUTH 1`` (``none``: no line)."""
    return ", ".join(f"{name} {count}" for name, count in _most_common(counts).items()) or "none"


def _separator(text: str) -> str:
    """How the fields of ``text``'s lines are separated: ``"whitespace"``, ``"tab"``, ``"semicolon"``, ``"pipe"`` or,
    when nothing else says so, ``"comma"``."""
    if _whitespace_separated(text):
        return "whitespace"
    first_row = text.partition("\n")[0]
    if "\t" in first_row and "," not in first_row:
        return "tab"  # a TSV whose fields hold blanks: ClickHouse's "2026-01-01 08:30:00"
    if _separated_by(text, ";"):
        return "semicolon"  # a spreadsheet's CSV in a locale whose decimal mark is the comma
    if _separated_by(text, "|"):
        return "pipe"  # psql's unaligned output (-A), Hive and BI tools' exports
    return "comma"


def _digits_fall_within_seconds(text: str) -> bool:
    """Whether the three digits after the seconds of ``text``'s ``_COMMA_MILLIS`` lines go down from one line to the
    next within the same second too often to be a log's milliseconds: a log is written in time order (processes that
    share a file put a few lines out of it), keys fall about every other time. Refused as milliseconds, a trace of
    three-digit keys needed --key-field 2."""
    # every line is 23 ASCII characters: records of fixed width, not a Python string per line of a long trace
    lines = np.frombuffer(text.encode("ascii") + b"\n", dtype=_COMMA_MILLIS_LINE)
    seconds, digits = lines["seconds"], lines["digits"].astype(np.int64)
    same_second = seconds[1:] == seconds[:-1]
    falls = int((same_second & (digits[1:] < digits[:-1])).sum())
    return falls >= 3 and 4 * falls > int(same_second.sum())


MAX_MALFORMED_LINES = 100  # beyond this many, a file is more likely read with the wrong format or options
_LINE_ERROR = re.compile(r"line (\d+): (.*)", re.DOTALL)
_NOT_UTF8 = "not valid UTF-8 text"
_UNDECODED = re.compile("[\udc80-\udcff]")  # a byte that is not UTF-8, as surrogateescape decodes it
# Control characters that text does not hold (tab, line and page breaks aside) and binary records all but always do
_BINARY = re.compile("[\x00-\x08\x0e-\x1f]")
# A NUL byte in a line: corrupt or binary bytes, which were read as part of a key
_NUL_LINE = "a NUL byte, which text never holds (a binary trace? see --format; UTF-16 text without a byte order mark?)"


def parse_trace_quarantining(
    path: str | Path,
    *,
    columns: Columns | None = None,
    trace_format: str = "auto",
    where: tuple[int | str, Collection[str]] | None = None,
    max_malformed: int = MAX_MALFORMED_LINES,
    exact_keys: bool = False,
) -> tuple[Trace, list[tuple[int, str]]]:
    """``parse_trace``, with the malformed lines of a text trace quarantined instead of refusing the file: each line a
    ``TraceError`` names is cut out and the rest read again. Returns the trace and ``(line number in the file,
    problem)`` of each line cut (of a Parquet trace, ``(row in its file, problem naming the file and row)`` of each row
    whose key or timestamp is bad). More than ``max_malformed`` such lines, or an error that names
    no line (a binary trace's, a Parquet trace's other errors, an empty file), raise ``TraceError`` as
    ``parse_trace`` does: so many bad lines are likelier a wrong format or option than bad rows. Each cut costs one
    more parse of the text: for a request log's few bad lines, not for a file in the wrong format."""
    if _reads_parquet(path, trace_format):  # rows of a bad key are cut, as malformed lines of text
        from .parquet_trace import read_parquet_trace_quarantining

        return read_parquet_trace_quarantining(
            path, columns=columns, where=where, exact_keys=exact_keys, max_malformed=max_malformed
        )
    path = Path(path)
    # A file is read again to cut its lines; a pipe's bytes (/dev/stdin) are gone once read, so they are kept.
    kept = None if path.is_file() else _read_bytes(path)

    def read() -> bytes:
        return _read_bytes(path) if kept is None else kept

    try:
        return _local_trace(path.name, read, columns, trace_format, where, exact_keys), []
    except TraceError as error:
        binary = "oraclegeneral" in path.name.lower()
        if _LINE_ERROR.match(str(error)) is None or trace_format not in ("auto", "text") or binary:
            raise  # an error that names no line to cut (binary and Parquet traces name records or columns)
    lines, cut = _utf8_lines(read())  # cut: (line number in the file, problem)
    if len(cut) > max_malformed:
        refused = TraceError(f"line {cut[max_malformed][0]}: {cut[max_malformed][1]}")
        refused.add_note(f"after {max_malformed} malformed lines were cut (at most {max_malformed})")
        raise refused
    while True:
        if not lines:  # read as an empty text, it was "line 1: blank line", whatever the lines were
            raise _nothing_left(cut)
        try:
            return _text_trace("\n".join(lines), columns, where, exact_keys), sorted(cut)
        except TraceError as error:
            found = _LINE_ERROR.match(str(error))
            if found is None or not 1 <= int(found[1]) <= len(lines):
                raise
            current = int(found[1])
            original = current
            for line_no, _ in sorted(cut):  # the lines cut before shift the numbers of those below them
                if line_no <= original:
                    original += 1
            if len(cut) >= max_malformed:
                refused = TraceError(f"line {original}: {found[2]}")
                refused.add_note(f"after {len(cut)} malformed lines were cut (at most {max_malformed})")
                raise refused from None
            cut.append((original, found[2]))
            del lines[current - 1]


def _nothing_left(cut: list[tuple[int, str]]) -> TraceError:
    """The error of a text whose every line was cut as malformed (``cut``: line number in the file, problem)."""
    line_no, problem = min(cut)
    return TraceError(f"no request is left: all {len(cut)} lines are malformed (the first, line {line_no}: {problem})")


def _is_json_object(line: str) -> bool:
    """Whether ``line`` is a JSON object, as each line of a JSON Lines log is (a key such as ``{user1}`` is not)."""
    line = line.strip()
    if not (line.startswith("{") and line.endswith("}")):
        return False
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _csv_unquoted(text: str) -> str:
    """``text`` with every field a CSV writer quoted (``_QUOTED_FIELD``) as its content, doubled quotes undoubled."""
    return _QUOTED_FIELD.sub(lambda field: field[1].replace('""', '"'), text)


def _utf8_lines(data: bytes) -> tuple[list[str], list[tuple[int, str]]]:
    """The lines of ``data`` as ``_decode_text`` reads them, with those that are not UTF-8 or hold a NUL byte cut out:
    ``(lines, [(line number in the file, problem)])``. One such line (a logged URL's Latin-1 byte) refused a whole
    request log; all are cut in one pass, not one parse each."""
    try:
        text, decoded = _decode_text(data), True  # strict UTF-8: no byte left undecoded
    except TraceError as error:
        if _NOT_UTF8 not in str(error):
            raise
        text = data.removeprefix(codecs.BOM_UTF8).decode("utf-8", "surrogateescape")
        text, decoded = _normalized_lines(text), False
    lines = text.split("\n")
    if "\0" not in text and decoded:
        return lines, []
    problems = {i: problem for i, line in enumerate(lines) if (problem := _undecodable(line))}
    return [line for i, line in enumerate(lines) if i not in problems], [(i + 1, p) for i, p in problems.items()]


def _undecodable(line: str) -> str:
    """Why ``line`` (decoded with surrogateescape) cannot be read as text, or "" when it can."""
    if not line.isascii() and _UNDECODED.search(line):
        return _not_utf8(line)
    return _NUL_LINE if "\0" in line else ""


def _not_utf8(line: str) -> str:
    """Why ``line`` (decoded with surrogateescape), which is not UTF-8, is refused: a binary record's bytes when it
    holds control characters, else text in an 8-bit encoding (a Latin-1 log was told it looked binary)."""
    if _BINARY.search(line):
        return f"{_NOT_UTF8} (a binary trace? see --format)"
    return f"{_NOT_UTF8} (Latin-1 or Windows-1252 text? convert it to UTF-8, e.g. with iconv -f latin1 -t utf-8)"


def _kept_lines(text: str, field: int, fields: int, values: Collection[str]) -> np.ndarray:
    """Whether each line's ``field`` (1-based, padding stripped) is one of ``values``; every line has ``fields``
    fields (one: the line is the key, commas and all)."""
    if fields == 1:
        return pd.Series(text.split("\n"), dtype=object).str.strip().isin(set(values)).to_numpy()
    # Arrow's strings, not a Python string per line: the lines of a big trace would outweigh its keys. Not categories
    # either: pandas reads those as numbers when every value is one, and a field is compared as written ("007").
    found = pd.read_csv(_utf8(text), header=None, usecols=[field - 1], dtype="string[pyarrow]", na_filter=False,
                        quoting=csv.QUOTE_NONE, skip_blank_lines=False).iloc[:, 0]  # fmt: skip
    return found.str.strip().isin(set(values)).to_numpy(dtype=bool)


def _select_columns(
    text: str, first_line: int, header: tuple[str, ...] | None, columns: Columns
) -> tuple[str, int | None, int, int]:
    """``text`` as ``timestamp,key`` lines (or bare keys) taken from the chosen fields of every line, which
    must all have as many fields as the first; with the fields' 1-based numbers and the count per line.
    Two fields already in that order are left as they are: the ``timestamp,key`` checks cover them."""
    fields = text.partition("\n")[0].count(",") + 1
    time_field = None if columns[0] is None else _field_number(columns[0], header, fields, "timestamp")
    key_field = _field_number(columns[1], header, fields, "key")
    if time_field == key_field:
        raise TraceError(f"the timestamp and the key are both field {key_field}")
    if (fields, time_field, key_field) == (2, 1, 2):
        return text, 1, 2, 2
    line = "^" + ",".join(["([^,\n]*)"] * fields) + "$"
    if (bad := re.compile(f"^(?!{line[1:]})", re.MULTILINE).search(text)) is not None:
        line_no = text.count("\n", 0, bad.start()) + first_line
        problem = _line_problem(text[bad.start() :].partition("\n")[0], "csv", fields)
        raise TraceError(f"line {line_no}: {problem}")
    picked = rf"\g<{key_field}>" if time_field is None else rf"\g<{time_field}>,\g<{key_field}>"
    return re.sub(line, picked, text, flags=re.MULTILINE), time_field, key_field, fields


def columns_by_name(header: Sequence[str]) -> Columns | None:
    """The (timestamp, key) fields of a header's names, as 1-based numbers: the most preferred name of a key
    (``_KEY_NAMES``) and the first name of a time (``_TIME_NAMES``), else field 1 unless it is the key's (then no
    timestamps: keys only); None when no name is a key's."""
    plain = [re.sub(r"[\s_.\-]", "", name).lower() for name in header]
    key = next((plain.index(name) + 1 for name in _KEY_NAMES if name in plain), None)
    if key is None:
        return None
    time = next((at + 1 for at, name in enumerate(plain) if name in _TIME_NAMES and at + 1 != key), None)
    return (time if time is not None else (None if key == 1 else 1)), key


def _default_columns(header: tuple[str, ...] | None, csv: bool) -> Columns | None:
    """The fields read when the caller names none: by the header's names (``columns_by_name``; after pandas' unnamed
    index column, its names shifted by one), else pandas' layout (``_PANDAS_INDEX``), timestamp,key (``csv``: the
    first line is such a request, or there is a header), or None: bare keys."""
    if header and header[0] == "":
        named = columns_by_name(header[1:])
        if named is None:
            return _PANDAS_INDEX[len(header) > 2]  # the row numbers of pandas' index are neither time nor key
        return (None if named[0] is None else named[0] + 1), named[1] + 1
    if header:
        return columns_by_name(header) or (1, 2)
    return (1, 2) if csv else None


def _field_number(field: int | str, header: tuple[str, ...] | None, fields: int, what: str) -> int:
    """The 1-based number of the ``what`` field: a number, or a name of the header line."""
    if isinstance(field, str) and not field.strip().isdigit():
        if header is None or field.strip() not in header:
            names = f"the header has {', '.join(header)}" if header else "the trace has no header line"
            raise TraceError(f"no {what} column named {field!r}: {names} (or give the field's 1-based number)")
        if (count := header.count(field.strip())) > 1:  # the first was taken, without a word
            raise TraceError(
                f"the header names {count} columns {field.strip()!r}: give the {what} field's 1-based number"
            )
        return header.index(field.strip()) + 1
    number = int(field)
    if not 1 <= number <= fields:
        raise TraceError(f"{what} field {number} does not exist: the first line has {fields} fields")
    return number


def _whitespace_separated(text: str) -> bool:
    """Whether ``text``'s fields are separated by spaces or tabs: its first line, or the one below a first line
    of two or more names (a header), has two or more fields, the first a number, and no comma unless the text before
    it holds blanks and is no timestamp (a comma inside a field: wikibench's URLs, ``Washington,_D.C.``)."""
    first, _, rest = text.partition("\n")
    for line in (first, rest.partition("\n")[0]):
        fields = _BLANKS.split(line.strip(" \t"))
        before = line.partition(",")[0].strip(" \t")
        if "," in line and (not _BLANKS.search(before) or _timestamp_field(before)):
            return False  # a comma-separated line
        if len(fields) < 2 or fields[0].startswith("#"):  # a comment is left to the line checks
            return False
        if _NUM_RE.fullmatch(fields[0]) or _DATETIME_FIELD_RE.fullmatch(fields[0]):
            return True
        if any(_NUM_RE.fullmatch(field) for field in fields):  # neither a request nor a header
            return False
    return False


def _separated_by(text: str, mark: str) -> bool:
    """Whether ``text``'s fields are separated by ``mark`` (a semicolon, a pipe): its first line has one and no tab,
    is no comma-separated line (the part before a comma is no timestamp), and its first field, or that of the line
    below a first line of names (a header), is a number or a date-time. A comma in such a line is then an error."""
    first, _, rest = text.partition("\n")
    if mark not in first or "\t" in first:
        return False
    if _CSV_START_RE.match(first) and not (mark == ";" and _timestamp_field(first.partition(mark)[0])):
        return False  # a comma-separated line; but ``1767225614,862;ad:1`` is a semicolon one with a decimal comma
    below = rest.partition("\n")[0] if _header_names(first.replace(mark, ",")) else first
    return _timestamp_field(below.partition(mark)[0], decimal_comma=mark == ";")


def _timestamp_field(field: str, *, decimal_comma: bool = True) -> bool:
    """Whether ``field`` is a number or a date-time, its fraction after a comma too (a spreadsheet's, in a locale
    whose decimal mark is the comma: ``1767225614,862``, ``2026-01-01 00:00:39,158``) when ``decimal_comma``."""
    start = field.strip()
    if decimal_comma:
        start = re.sub(r"(?<=[0-9]),(?=[0-9]+$)", ".", start)
    return bool(_NUM_RE.fullmatch(start) or re.fullmatch(_DATETIME, start))


def _names_integer_column(first: str, rest: str, sample: int = 1000) -> bool:
    """Whether ``first`` is the name of a one-column export whose ``rest`` holds integer ids (at least the first
    ``sample`` lines): a word, not a number, a comment or a field list, above lines of digits. Read as a bare key,
    it was one more request, and made every integer id a string key."""
    name = first.strip()
    if not name or "," in name or name.startswith("#") or _NUMBER_START.match(name) or not name.isprintable():
        return False
    head = rest[: 1 << 16]  # not a split of the whole file's text
    lines = head.split("\n")[: -1 if len(head) == 1 << 16 else None][:sample]  # a cut last line is no line
    lines = [line.strip() for line in lines if line.strip()]
    return bool(lines) and all(line.isascii() and line.isdigit() for line in lines)


def _header_names(line: str) -> list[str] | None:
    """The column names ``line`` holds if it can be a CSV header: two or more, none empty or starting like a
    number (so no timestamp in any form: ``2026-01-01T08,a`` is a request, even if not one of a trace), and not
    a comment; else None. The first may be empty: pandas' ``to_csv`` writes its unnamed index column so
    (``_PANDAS_INDEX``); so may the last after two names, of a writer that ends every line with a separator."""
    names = [name.strip() for name in line.split(",")]
    named = names[1:] if names[0] == "" else names
    if len(named) > 2 and named[-1] == "":
        named = named[:-1]
    if len(names) < 2 or names[0].startswith("#") or not all(name and not _NUMBER_START.match(name) for name in named):
        return None
    return names


def sample_trace(trace: Trace, rate: float) -> Trace:
    """SHARDS's spatial sample (Waldspurger et al., FAST'15): every request of the keys whose hash falls in the
    lowest ``rate`` of the hash space, in order, and no request of the others. A cache of ``sampled_size(C, rate)``
    keys replayed on it estimates the hit rate of C keys on the whole trace; the hash is fixed, so every run (and
    every policy) sees the same keys."""
    if not 0 < rate <= 1:  # NaN too
        raise ValueError(f"the sample rate must be above 0 and at most 1, got {rate}")
    if rate == 1:
        return trace
    keys = np.asarray(trace.keys)
    keep = shards_keep(keys, rate)

    def kept(values: np.ndarray | None) -> np.ndarray | None:
        return None if values is None else np.asarray(values)[keep]

    return dataclasses.replace(
        trace, keys=keys[keep], timestamps=kept(trace.timestamps), logged_hits=kept(trace.logged_hits)
    )


def shards_keep(keys: np.ndarray, rate: float) -> np.ndarray:
    """Per key, whether ``sample_trace`` at ``rate`` keeps it: its hash (pandas' fixed default hash key, so the
    same in every run) is in the lowest ``rate`` of the hash space."""
    threshold = np.uint64(min(int(rate * 2.0**64), 2**64 - 1))
    return pd.util.hash_array(np.asarray(keys), categorize=True) < threshold


SAMPLED_CACHE_MIN = 16  # keys a sampled cache keeps at least (and the self-tuned share's 6 candidates stay distinct)


def shards_rate(requests: int, max_requests: int | None, capacity: int) -> float:
    """The ``sample_trace`` rate at which ``requests`` shrink to about ``max_requests`` (1: no bound, or within it),
    never so low that a cache of ``capacity`` keys scales below ``SAMPLED_CACHE_MIN`` (``sampled_size``)."""
    if max_requests is None or requests <= max_requests:
        return 1.0
    return min(1.0, max(max_requests / requests, SAMPLED_CACHE_MIN / capacity))


def shards_adjusted(rates: dict, rate: float, kept: int, counted: int) -> dict:
    """The ``hit_rate_*`` entries of a replay of a ``sample_trace`` (``kept`` counted requests) adjusted as SHARDS-adj
    does: a sample holds ``rate * counted`` requests of the whole trace's ``counted`` only on average, and the
    difference comes mostly from the few hottest keys, kept or not; so it is counted as hits (or, for a surplus,
    taken from them, never below none). Without it a sample that happens to miss the hottest key reads far too low."""
    expected = rate * counted
    if not (expected > 0 and kept):
        return dict(rates)
    return {name: max(0.0, (value * kept + expected - kept) / expected) for name, value in rates.items()}


def sampled_size(keys: int, rate: float) -> int:
    """A cache (or precompute share) of ``keys`` keys scaled to a ``sample_trace`` of ``rate``: at least 1 for
    a cache of at least 1 key."""
    return max(min(keys, 1), round(keys * rate))


def split_days(trace: Trace, days: int) -> list[np.ndarray]:
    """``days`` consecutive slices: equal time spans when the trace has timestamps, else equal counts.

    Requests are taken in time order (stable for equal times); if all timestamps are equal, time says nothing
    and the split falls back to equal counts.
    """
    return _split(trace, days, np.asarray(trace.keys))


DAY_SECONDS = 86_400
DAY_TOLERANCE = 0.1  # a replayed day further than this share (2.4 h) from 24 h is named: it shifts daily cycles
EPOCH_2000_S = 946_684_800  # where absolute timestamps (since 1970) fall: after 2000-01-01 ...
EPOCH_2200_S = 7_258_118_400  # ... and before 2200-01-01; smaller ones count from a trace's own start
# Windows file times (MSR Cambridge's traces): 100 ns ticks since 1601-01-01, this many seconds before 1970
FILETIME_EPOCH_S = 11_644_473_600
_UNITS = {"seconds": 1.0, "milliseconds": 1e-3, "microseconds": 1e-6, "nanoseconds": 1e-9}


def _timestamp_unit(trace: Trace, slice_ticks: float) -> tuple[float, str | None]:
    """Seconds per tick of ``trace``'s timestamps, and the unit's name when it is a guess (None: known). Date-times
    and libCacheSim's times are seconds; numbers since 1970 (or 1601's file times) tell theirs by their size, from
    2000 to 2200; a trace's own clock cannot, so the unit that makes a slice of ``slice_ticks`` nearest a day is
    guessed."""
    if trace.dated or trace.format in _ORACLE:
        return 1.0, None
    # The median and the 1st percentile both since 1970 (or 1601): a trace's own clock in ms that reaches 2008 as
    # seconds by its middle (28 days of ms) starts near 0; one corrupt row's 0 stays below the percentile.
    typical, low = (float(v) for v in np.quantile(np.abs(trace.timestamps), [0.5, 0.01]))
    for factor in _UNITS.values():
        if _since_2000(typical * factor, low * factor):
            return factor, None
    if _since_2000(typical * 1e-7 - FILETIME_EPOCH_S, low * 1e-7 - FILETIME_EPOCH_S):
        return 1e-7, None
    name = min(_UNITS, key=lambda unit: abs(np.log(max(slice_ticks * _UNITS[unit], 1e-12) / DAY_SECONDS)))
    return _UNITS[name], name


def _since_2000(typical_s: float, low_s: float) -> bool:
    """Whether a trace whose median and 1st percentile are these seconds since 1970 holds dates from 2000 to 2200."""
    return EPOCH_2000_S <= typical_s < EPOCH_2200_S and low_s >= EPOCH_2000_S


def _duration(seconds: float) -> str:
    """``seconds`` in the unit a reader thinks in: seconds, minutes, hours or days."""
    for limit, size, unit in ((120, 1, "s"), (7_200, 60, "min"), (2 * DAY_SECONDS, 3_600, "h")):
        if seconds < limit:
            return f"{seconds / size:.3g} {unit}"
    return f"{seconds / DAY_SECONDS:.3g} days"


def day_length_note(trace: Trace, days: int) -> str | None:
    """A note when the ``days`` equal time spans of ``split_days`` are far from 24 h (``DAY_TOLERANCE``): "--days 8"
    of a 4-day trace replays half-days, whose warm-up, selection and counts are not a day's. None for a trace without
    timestamps (or all equal: days of equal request counts then)."""
    ts = trace.timestamps
    if ts is None or len(ts) == 0 or ts.min() == ts.max():
        return None
    factor, guessed = _timestamp_unit(trace, float(ts.max() - ts.min()) / days)
    span = float(ts.max() - ts.min()) * factor
    if guessed is None and not np.any(np.mod(ts * factor, DAY_SECONDS)):
        span += DAY_SECONDS  # dates without a time of day: the last one stands for a whole day too
    if abs(span / days / DAY_SECONDS - 1) <= DAY_TOLERANCE:
        return None
    reading = "" if guessed is None else f", if they are {guessed}"
    fits = round(span / DAY_SECONDS)
    if fits == days:  # the days asked for are right: the trace starts or ends within one
        advice = [f"a first or last day only partly in the trace? {days} equal spans cannot each be one of its days"]
    else:
        advice = [f"--days {fits} for days of about 24 h" if fits >= 2 else "too short for 2 days of 24 h"]
    if trace.format in ("text", "parquet"):  # fields to choose
        advice.append("--time-field none splits by request count")
    return (
        f"each of the {days} days is {_duration(span / days)} of the trace's timestamps, not 24 h: they span "
        f"{_duration(span)}{reading} ({'; '.join(advice)})"
    )


def trace_notes(trace: Trace, day_keys: Sequence[np.ndarray], *, key_chosen: bool = False) -> list[str]:
    """Warnings about a read that looks wrong though every line parsed: days of ``split_days`` far from 24 h
    (``day_length_note``, unless some are empty) or without requests (an outlier timestamp or a gap leaves equal time
    spans empty, and an empty day warms or counts nothing), and in a text trace one key in every request of several
    fields (the key read from a constant field; not when the caller chose the key field, ``key_chosen``, or filtered
    on it) and bare keys that all hold a comma (a CSV whose first field is no timestamp this reader knows)."""
    notes = []
    text = trace.format == "text"  # the fields of a text trace can be chosen; other readers know theirs
    empty = [d for d, day in enumerate(day_keys) if len(day) == 0]
    if not empty and (note := day_length_note(trace, len(day_keys))):  # an empty day's note tells more: an outlier?
        notes.append(note)
    if empty:
        ts = trace.timestamps
        span = f" from {ts.min():.10g} to {ts.max():.10g}" if ts is not None and len(ts) else ""
        listed = ", ".join(map(str, empty[:10])) + (", ..." if len(empty) > 10 else "")
        by_count = ", or --time-field none to split by count" if text else ""
        notes.append(
            f"{len(empty)} of the {len(day_keys)} days hold no requests (days {listed}): days are equal spans of the "
            f"timestamps{span}; an outlier timestamp or a gap? Use fewer --days{by_count}"
        )
    if note := time_order_note(trace):
        notes.append(note)
    keys = np.asarray(trace.keys)
    filtered_on_key = trace.where is not None and trace.where["field"] == trace.key_field
    chosen = key_chosen or filtered_on_key
    if text and not chosen and trace.fields > 1 and len(keys) > 1 and (keys[:1] == keys).all():
        notes.append(
            f"every request is of one key, '{keys[0]}', read from field {trace.key_field} of {trace.fields}: "
            "another field is the key? Name it with --key-field"
        )
    elif text and not chosen and trace.fields > 1 and len(keys) >= FEW_KEYS_REQUESTS:
        distinct = pd.unique(keys[: 10 * FEW_KEYS_REQUESTS])
        if len(distinct) <= FEW_KEYS:
            shown = ", ".join(f"'{key}'" for key in distinct[:5])
            notes.append(
                f"only {len(distinct)} distinct keys ({shown}) in the first {min(len(keys), 10 * FEW_KEYS_REQUESTS)} "
                f"requests, read from field {trace.key_field} of {trace.fields}: an operation or type column? Name "
                "the key's field with --key-field"
            )
    ts = trace.timestamps
    if text and ts is not None and len(ts) > 1 and ts.min() == ts.max() and trace.timestamp_field is not None:
        notes.append(
            f"field {trace.timestamp_field}, read as the time of each request, holds one value ({ts[0]:.10g}) in every "
            "line: no time? The days were split by request count; name the fields with --time-field and --key-field "
            "(--time-field none: no timestamps)"
        )
    sample = keys[:1000]
    if text and trace.fields == 1 and len(sample) and sample.dtype == object and all("," in str(k) for k in sample):
        notes.append(
            "the keys hold commas (whole lines were read as keys): a CSV whose timestamps are in a form this reader "
            "does not know? Name the fields with --key-field and --time-field (none: no timestamps)"
        )
    return notes


FEW_KEYS, FEW_KEYS_REQUESTS = 16, 1000  # a key field of at most this many values over this many requests is no key
UNORDERED_SHARE = 0.25  # of the steps between different timestamps that go back: more is no log's disorder


def time_order_note(trace: Trace) -> str | None:
    """A note when ``trace``'s timestamps go back in time at more than ``UNORDERED_SHARE`` of the steps between two
    lines whose timestamps differ: the field read as time is no time (an ARC trace's start block, a size, an id).
    Logs merged from several writers go back now and then, and are replayed in time order; a field that is no time
    goes back at about half of its steps, and its order says nothing of when keys were requested."""
    ts = trace.timestamps
    if ts is None or len(ts) < 3:
        return None
    steps = np.diff(ts)
    backwards, moves = int((steps < 0).sum()), int((steps != 0).sum())
    if backwards <= UNORDERED_SHARE * moves:
        return None
    field = f"field {trace.timestamp_field}" if trace.timestamp_field is not None else "the timestamps"
    fix = (
        "; name the fields with --time-field and --key-field (--time-field none: requests in file order)"
        if trace.format in ("text", "parquet")
        else ""
    )
    return (
        f"{field}, read as the time of each request, goes back at {backwards / moves:.0%} of the lines where it "
        f"changes: no time? The requests were replayed sorted by it{fix}"
    )


def logged_hit_rate(trace: Trace, days: int, *, count_from: int = 1) -> float | None:
    """The hit rate the serving client logged (``trace.logged_hits``) over the requests of days >= ``count_from``
    of ``split_days``: what production saw on the requests the replayed policies are scored on (None: not logged)."""
    if trace.logged_hits is None:
        return None
    counted = np.concatenate(_split(trace, days, np.asarray(trace.logged_hits, dtype=bool))[count_from:])
    return float(counted.mean()) if len(counted) else 0.0


def _split(trace: Trace, days: int, values: np.ndarray) -> list[np.ndarray]:
    """``values`` (one per request) cut into the days ``split_days`` describes."""
    if days < 1:
        raise ValueError("days must be >= 1")
    ts = trace.timestamps
    if ts is None or len(ts) == 0 or ts.min() == ts.max():
        return [np.asarray(part) for part in np.array_split(values, days)]
    order = np.argsort(ts, kind="stable")
    ts, values = ts[order], values[order]
    # Day of each request; the latest request belongs to the last day rather than one past it.
    day = np.minimum(((ts - ts[0]) / (ts[-1] - ts[0]) * days).astype(np.int64), days - 1)
    bounds = np.searchsorted(day, np.arange(days + 1), side="left")
    return [values[bounds[d] : bounds[d + 1]] for d in range(days)]


# What each policy of ``replay`` is called in its progress messages.
POLICY_NAMES = {
    "lru": "LRU",
    "s3fifo": "S3-FIFO",
    "arc": "ARC",
    "static_top_n": "static top-N",
    "ours": "ours (top-N + LRU)",
    "belady": "Belady's MIN",
    "oracle_preload": "the oracle preload",
}


def replay_stages(*, auto: bool, admission: bool, baselines: bool = True) -> int:
    """How many pieces of work ``replay`` announces to its ``progress`` with these options."""
    return auto + (len(POLICY_NAMES) if baselines else 2) + (admission * (1 + baselines))


def replay(
    day_keys: Sequence[np.ndarray],
    *,
    top_n: int | str,
    capacity: int,
    half_life_days: float = 2.0,
    warmup_days: int = 1,
    precomputed: Sequence[Collection[Hashable]] | None = None,
    admission: str | AdmissionPolicy | None = None,
    admission_window: int | None = None,
    ranked: Sequence[Sequence[Hashable]] | None = None,
    baselines: bool = True,
    read_through: dict[str, list[int]] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Hit rates over days W..D-1 (days 0..W-1, ``warmup_days``, only warm the caches) of five policies and
    two offline bounds.

    Read-through policies of ``capacity`` keys (a missed key is admitted by the policy's own rules):
    ``hit_rate_lru``; ``hit_rate_s3fifo`` and ``hit_rate_arc`` (see ``s3fifo_hits`` and ``arc_hits``).
    Precompute policies: ``hit_rate_static_top_n``, only the top-N keys selected each day from the demand of
    the week before it (the ``ad_demand`` asset's); ``hit_rate_ours``, that top-N set plus a read-through LRU
    of ``capacity - top_n`` keys.
    ``precomputed`` replaces the selection on the counted days by given sets of at most ``top_n`` keys each
    (what a real run published); warm-up days keep the selection.

    ``top_n="auto"`` tunes the precompute share itself (see ``_self_tuned_shares``): each counted day gets the
    N whose "top-N + LRU of C-N" got the most hits over plain read-through on the previous counted days, the recent
    ones weighing more, among the candidates up to one above the day before's, and only one that got more than
    read-through; N = 0 once the share in use got fewer hits than read-through (``_next_share``); the first counted
    day and the warm-up days use N = 0, plain read-through. Ours is then one LRU whose size
    follows C-N (shrinking evicts its least recent keys), and static top-N precomputes the chosen N. The
    result adds ``top_n_chosen`` (N per counted day) and ``top_n_mean``; ``top_n`` is ``"auto"``.

    ``ranked`` replaces the recency-weighted frequency ranking by a given one (a demand strategy's): per day,
    keys best first, chosen from the days before it only; each day's top-N is the first N of its list (with
    ``"auto"``, the first N of the chosen share). Keys never requested in the trace are skipped.

    Bounds: ``hit_rate_belady``, the classic offline optimum (Belady's MIN) of a read-through cache of
    ``capacity`` keys, the number published trace tables use (see ``belady_hits``). It bounds read-through
    policies such as LRU, but ours and static top-N load keys without a miss at day boundaries and can beat it.
    ``hit_rate_oracle_preload`` is a bound on a different question: a cache that may be refilled for free by an
    oracle at each day boundary; no precompute policy with ``capacity`` slots that loads keys only at day boundaries
    or on a miss can beat it (a prefetch, which loads keys within the day before their request, can).

    ``admission`` (a name or a ``serving.admission`` policy) adds ``hit_rate_lru_admission`` and
    ``hit_rate_ours_admission``: the same LRU and ours, but a missed key enters the LRU only when the policy
    admits it, decided exactly as ``PredictionCache.get_or_compute`` decides (see ``admission_decisions``;
    ``second_miss`` counts its window in requests, ``admission_window``, default ``capacity``). ``probation`` is
    the policy's own live tier of ``capacity`` less the keys the day publishes (its top-N set, which holds fewer
    than N keys when the history knows fewer), as the client sizes it. With ``top_n="auto"`` ours with admission
    gets its own share, tuned on that live tier: ``top_n_chosen_admission`` and ``top_n_mean_admission``.

    ``baselines=False`` leaves out what depends on the trace and capacity alone (LRU, S3-FIFO, ARC, the bounds
    and the LRU with admission), for a caller that compares rankings on the same trace and has them once.
    ``read_through`` (``read_through_day_hits`` of the same days, capacity and admission) gives the hits per day of
    the read-through tier alone, the self-tuned share's candidate N = 0 whatever the ranking: not replayed again.

    ``progress`` is told the name of each piece of work as it starts (``replay_stages`` counts them).
    """
    say = progress or (lambda name: None)
    live_tier = None if admission is None else _live_tier(admission, admission_window, capacity)
    auto = isinstance(top_n, str)
    if auto and top_n != "auto":
        raise ValueError(f"top_n must be an integer or 'auto', got {top_n!r}")
    if capacity < 1 or (not auto and top_n < 0):
        raise ValueError("need capacity >= 1 and top_n >= 0")
    if not auto and top_n > capacity:
        raise ValueError(f"top_n ({top_n}) cannot exceed capacity ({capacity})")
    if not day_keys:
        raise ValueError("need at least one day")
    # A one-day trace is all warm-up (every rate 0.0), as it always was; otherwise at least one day counts.
    if not 1 <= warmup_days <= max(1, len(day_keys) - 1):
        raise ValueError(f"warmup_days must be at least 1 and less than the {len(day_keys)} days, got {warmup_days}")
    counted_days = len(day_keys) - warmup_days
    if ranked is not None and (precomputed is not None or len(ranked) != len(day_keys)):
        raise ValueError(f"ranked needs one list per day ({len(day_keys)}) and no precomputed sets")
    if precomputed is not None:
        if auto:
            raise ValueError("precomputed sets need a fixed top_n, not 'auto'")
        if len(precomputed) != counted_days:
            raise ValueError(f"precomputed has {len(precomputed)} sets for {counted_days} counted days")
        precomputed = [set(given) for given in precomputed]
        if too_big := [len(given) for given in precomputed if len(given) > top_n]:
            raise ValueError(f"a precomputed set of {too_big[0]} keys exceeds top_n ({top_n})")
    days, keys = _as_codes(day_keys)
    limit = capacity if auto else top_n
    if ranked is not None:
        ranking = [_ranked_codes(given, keys)[:limit] for given in ranked]
    elif precomputed is None:
        ranking = _ranked_keys(days, limit=limit, half_life_days=half_life_days)
    else:
        ranking = _ranked_keys(days[:warmup_days], limit=limit, half_life_days=half_life_days)
    given = _checked_read_through(read_through, len(days), admission=live_tier is not None)
    # Plain read-through of C keys is also the self-tuned share's candidate N = 0 (nothing precomputed): replayed once.
    read_through = given.get("lru")
    if read_through is None and auto and baselines:
        read_through = _lru_day_hits(days, capacity)
    if auto:
        say("tuning the precompute share")
        known = None if read_through is None else {0: read_through}
        shares, chosen = _self_tuned_shares(days, capacity, ranking, warmup_days=warmup_days, known=known)
        slots: int | list[int] = [capacity - share for share in shares]
    else:
        chosen = [list(given) for given in ranking]
        if precomputed is not None:  # the given sets stand for the selection on the counted days
            chosen += [_codes_of(given, keys) for given in precomputed]
        slots = capacity - top_n
    counted = days[warmup_days:]
    requests = sum(len(day) for day in counted)
    policies: dict[str, Callable[[], int]] = {
        "static_top_n": lambda: sum(_static_hits(day, chosen[warmup_days + d]) for d, day in enumerate(counted)),
        "ours": lambda: _lru_hits(days, slots, precomputed=chosen, count_from=warmup_days),
    }
    if baselines:
        policies = {
            "lru": lambda: sum((_lru_day_hits(days, capacity) if read_through is None else read_through)[warmup_days:]),
            "s3fifo": lambda: _s3fifo_hits(days, capacity, count_from=warmup_days),
            "arc": lambda: _arc_hits(days, capacity, count_from=warmup_days),
            **policies,
            "belady": lambda: belady_hits(days, capacity, warmup_days=warmup_days),
            "oracle_preload": lambda: sum(oracle_preload_day_hits(day, capacity) for day in counted),
        }
    hits = {}
    for name, run in policies.items():
        say(f"replaying {POLICY_NAMES[name]}")
        hits[name] = run()
    if live_tier is not None:
        live = live_tier(keys)
        live_read_through = given.get("admission")  # the live tier alone: the candidate N = 0 of its share too
        if baselines:
            say(f"replaying {POLICY_NAMES['lru']} with admission")
            if live_read_through is None:
                live_read_through = live(days, capacity)
            hits["lru_admission"] = sum(live_read_through[warmup_days:])
        say(f"replaying {POLICY_NAMES['ours']} with admission")
        if auto:  # the share is tuned on the live tier it shares the capacity with
            known = None if live_read_through is None else {0: live_read_through}
            shares_admission, chosen_admission = _self_tuned_shares(
                days, capacity, ranking, warmup_days=warmup_days, live=live, known=known
            )
            slots_admission: int | list[int] = [capacity - share for share in shares_admission]
        else:
            slots_admission, chosen_admission = slots, chosen
        hits["ours_admission"] = sum(live(days, slots_admission, precomputed=chosen_admission)[warmup_days:])
    result: dict = {f"hit_rate_{name}": (n / requests if requests else 0.0) for name, n in hits.items()}
    result.update(requests=int(requests), days=len(days), top_n="auto" if auto else int(top_n), capacity=int(capacity))
    if live_tier is not None:
        result["admission"] = admission_policy(admission).name
        if result["admission"] == "second_miss":
            result["admission_window"] = int(admission_window or capacity)
    if auto:
        result.update(_share_summary(shares[warmup_days:]))
        if live_tier is not None:
            result.update(_share_summary(shares_admission[warmup_days:], suffix="_admission"))
    return result


def read_through_day_hits(
    day_keys: Sequence[np.ndarray],
    capacity: int,
    *,
    admission: str | AdmissionPolicy | None = None,
    admission_window: int | None = None,
) -> dict[str, list[int]]:
    """Hits per day of the read-through tier of ``capacity`` keys with nothing precomputed: ``"lru"``, and with
    ``admission`` its live tier, ``"admission"``. This is every ranking's self-tuned candidate N = 0, so a caller
    replaying several rankings on the same days replays it once and gives it to ``replay(read_through=...)``."""
    days, keys = _as_codes(day_keys)
    hits = {"lru": _lru_day_hits(days, capacity)}
    if admission is not None:
        hits["admission"] = _live_tier(admission, admission_window, capacity)(keys)(days, capacity)
    return hits


def _checked_read_through(given: dict[str, list[int]] | None, n_days: int, *, admission: bool) -> dict[str, list[int]]:
    """``replay``'s ``read_through``, checked to hold one count per day and the live tier's when admission is on."""
    if given is None:
        return {}
    if admission and "admission" not in given:
        raise ValueError("read_through lacks the live tier's hits ('admission'): make it with the same admission")
    if any(len(hits) != n_days for hits in given.values()):
        raise ValueError(f"read_through needs one count per day ({n_days})")
    return given


def _share_summary(shares: Sequence[int], *, suffix: str = "") -> dict:
    chosen = [int(share) for share in shares]
    return {f"top_n_chosen{suffix}": chosen, f"top_n_mean{suffix}": sum(chosen) / len(chosen) if chosen else 0.0}


def admission_decisions(
    keys: Sequence[Hashable] | np.ndarray,
    admission: str | AdmissionPolicy,
    *,
    window: int | None = None,
    capacity: int | None = None,
) -> list[str]:
    """What a read-through cache with ``admission`` does with each request: ``"hit"``, ``"admitted"`` (a miss
    whose value is stored) or ``"rejected"`` (a miss whose value is not).

    The model of ``PredictionCache.get_or_compute`` (nothing published): every lookup is a live-tier lookup
    the policy sees. ``second_miss`` keeps a marker per key that its first lookup sets and that lives
    ``window`` requests, default the whole trace (the client's lives ``window_s`` seconds: the replay counts
    requests, so that traces without timestamps work too); a miss is admitted when the marker is alive.
    ``frequency`` keeps the same count-min sketch with the same hashes, saturating 4-bit counters and aging
    (started by the first miss that sees ``sample`` lookups counted, then ``AGE_STEP_BYTES`` per miss) as the
    Redis sketch. Stored keys stay cached
    forever when ``capacity`` is None (the client's live keys are bounded by their TTL, not by a capacity),
    else in an LRU of ``capacity`` keys. ``probation`` keeps its own queues of ``capacity`` keys (None: the
    policy's ``capacity``), every miss admitted.
    """
    if capacity is not None and (
        isinstance(capacity, bool) or not isinstance(capacity, int | np.integer) or capacity < 1
    ):
        raise ValueError(f"capacity must be a whole number of keys >= 1 (None: unbounded), got {capacity!r}")
    codes, index = pd.factorize(np.asarray(keys))
    policy = admission_policy(admission)
    if capacity is None:
        capacity = policy.capacity if isinstance(policy, Probation) else len(index)
    live = _live_tier(policy, window, max(1, len(codes)))(pd.Index(index))
    outcomes: list[str] = []
    live([codes.astype(np.int64)], capacity, outcomes=outcomes)
    return outcomes


def s3fifo_hits(day_keys: Sequence[np.ndarray], capacity: int, *, warmup_days: int = 1) -> int:
    """Hits on days W..D-1 of S3-FIFO (Yang et al., SOSP'23) of ``capacity`` keys carried across days.

    A small FIFO S of ``max(1, capacity // 10)`` keys, a main FIFO M of the rest, and a ghost FIFO G of as
    many keys as M that remembers keys only. Each cached key has a 2-bit frequency (0..3, +1 per hit). A
    missed key goes to M if G remembers it (and G forgets it), else to S, with frequency 0; before that, while
    the cache is full, one eviction runs: from S if S holds at least its share (or M is empty), else from M.
    Evicting from S takes its oldest key: requested since it came in (frequency >= 1), it moves to M (which,
    if then over its size, evicts from M), and S goes on; else it leaves for G (G drops its oldest key beyond
    its size) and the eviction is done. Evicting from M takes its oldest key: with frequency >= 1 it is
    reinserted at M's head with frequency - 1 (a 2-bit clock), else it leaves the cache. O(1) amortized.
    """
    days = [np.asarray(day) for day in day_keys]
    if not days or capacity < 1:
        return 0
    _check_warmup(days, warmup_days)
    return _s3fifo_hits(days, capacity, count_from=warmup_days)


def arc_hits(day_keys: Sequence[np.ndarray], capacity: int, *, warmup_days: int = 1) -> int:
    """Hits on days W..D-1 of ARC (Megiddo and Modha, FAST'03) of ``capacity`` keys carried across days.

    The paper's algorithm: cached lists T1 (seen once recently) and T2 (seen at least twice), ghost lists B1
    and B2 of keys evicted from them, and a target size p of T1 (a real number, 0 at the start) that a hit in
    B1 raises by max(|B2|/|B1|, 1) and a hit in B2 lowers by max(|B1|/|B2|, 1). REPLACE evicts the LRU key of
    T1 into B1 when T1 is not empty and |T1| > p (or = p when the request is in B2), else T2's into B2.
    """
    days = [np.asarray(day) for day in day_keys]
    if not days or capacity < 1:
        return 0
    _check_warmup(days, warmup_days)
    return _arc_hits(days, capacity, count_from=warmup_days)


def belady_hits(day_keys: Sequence[np.ndarray], capacity: int, *, warmup_days: int = 1) -> int:
    """Hits on days W..D-1 of Belady's MIN, a read-through cache of ``capacity`` keys carried across days.

    Demand paging: a missed key is always admitted; when the cache is full, the cached key requested again
    farthest in the future (never again counts as infinitely far) is evicted. Days 0..W-1 (``warmup_days``)
    are replayed but not counted, like the other policies. MIN gets the most hits of any such cache over the
    whole trace, so it bounds LRU; counted after the warm-up only, a cache that gave up warm-up hits for a
    better state at the boundary can exceed it by at most ``capacity - 1`` hits (the keys in which the two
    states differ). Only the position where counting starts matters, not where the warm-up days split.
    """
    days = [np.asarray(day) for day in day_keys]
    if not days or capacity < 1:
        return 0
    if not 0 <= warmup_days <= len(days):
        raise ValueError(f"warmup_days must be between 0 and the {len(days)} days, got {warmup_days}")
    codes = pd.factorize(np.concatenate(days))[0]
    return _farthest_first_hits(codes, capacity, count_from=sum(len(day) for day in days[:warmup_days]))


def oracle_preload_day_hits(day: np.ndarray, capacity: int) -> int:
    """Most hits any cache of ``capacity`` keys that loads keys only on a miss can get on one day, given a free reload
    at the day's start (a prefetch, loading keys before their request, is not bounded by it).

    The bound for precompute policies, which classic MIN is not: a policy that swaps in precomputed keys at
    a day boundary (ours does) can beat MIN. So this bound gets the same power: at each boundary an oracle
    reloads, for free, the ``capacity`` distinct keys that the coming day requests soonest; then, on a miss,
    it evicts the key whose next request is farthest away (declining to admit the requested key if that one
    is farthest). Reloading the keys needed soonest is MIN's own eviction rule applied to "every key is
    cached" at the boundary, so it is optimal; and since the reload erases any earlier state, days are
    independent. No online policy holding at most ``capacity`` keys and changing its contents only at day
    boundaries or on a miss can get more hits.
    """
    codes = pd.factorize(np.asarray(day))[0]
    if len(codes) == 0 or capacity < 1:
        return 0
    # factorize numbers keys in order of first request: keys 0..capacity-1 are the ones requested soonest.
    first_requests = np.unique(codes, return_index=True)[1][:capacity]
    return _farthest_first_hits(codes, capacity, preload=first_requests, bypass=True)


def next_requests(codes: np.ndarray) -> np.ndarray:
    """Position of the next request for the same key as each request; ``len(codes)`` when there is none.

    A stable sort by key lists each key's requests in order, so neighbours of one key are successive uses:
    the vectorized equivalent of a backwards pass that remembers the last position of every key.
    """
    n = len(codes)
    order = np.argsort(codes, kind="stable")
    same = codes[order[1:]] == codes[order[:-1]]
    following = np.full(n, n, dtype=np.int64)
    following[order[:-1][same]] = order[1:][same]
    return following


def _farthest_first_hits(
    codes: np.ndarray, capacity: int, *, count_from: int = 0, preload: np.ndarray | None = None, bypass: bool = False
) -> int:
    """Hits at positions >= ``count_from`` of a cache that evicts the key requested again farthest away.

    ``codes`` are keys as ints in 0..K-1. ``preload`` lists positions of requests whose keys are cached at the
    start. With ``bypass`` a missed key is not admitted when it is itself the one needed farthest away.
    O(n log capacity): a max-heap of next-request positions with lazy deletion of the ones a hit outdated.
    """
    n = len(codes)
    keys = codes.tolist()
    following = next_requests(codes)
    cached_until = [-1] * (max(keys) + 1 if n else 0)  # next request of each cached key, -1 when not cached
    # -(next request) of cached keys; the key is keys[position], and the entry is valid while
    # cached_until[key] == position. Plain ints compare much faster than (position, key) tuples.
    heap = [-int(position) for position in (preload if preload is not None else ())]
    for entry in heap:
        cached_until[keys[-entry]] = -entry
    heapq.heapify(heap)
    done: list[int] = []  # cached keys never requested again: the best victims, and they never go stale
    size, hits, warm_hits = len(heap), 0, 0
    compact_at = 4 * capacity + 1024  # hits leave outdated entries; rebuilding past this keeps memory O(capacity)
    push, pop = heapq.heappush, heapq.heappop
    # Next requests as Python ints a chunk at a time: a list of all of them would double the memory.
    upcoming_ints = itertools.chain.from_iterable(following[i : i + 65536].tolist() for i in range(0, n, 65536))
    requests = zip(keys, upcoming_ints, strict=True)
    for part in (itertools.islice(requests, count_from), requests):
        warm_hits = hits  # 0 in the warm-up part, its hits in the counted part
        for key, upcoming in part:
            if cached_until[key] >= 0:
                hits += 1
            elif size < capacity:
                size += 1
            else:
                if not done:
                    while cached_until[keys[-heap[0]]] != -heap[0]:
                        pop(heap)
                if bypass and upcoming >= (n if done else -heap[0]):
                    continue  # the requested key is the one needed farthest away: do not admit it
                cached_until[done.pop() if done else keys[-pop(heap)]] = -1
            cached_until[key] = upcoming
            if upcoming == n:
                done.append(key)
                continue
            push(heap, -upcoming)
            if len(heap) > compact_at:
                heap = [entry for entry in heap if cached_until[keys[-entry]] == -entry]
                heapq.heapify(heap)
    return hits - warm_hits


def _as_codes(day_keys: Sequence[np.ndarray]) -> tuple[list[np.ndarray], pd.Index]:
    """Each day's keys as int codes numbered in key order, so the replay runs on ints whatever the keys are;
    and the keys, the code of each being its position.

    Sorted codes keep every tie-break "by key ascending" of the selection, so results equal those on the keys.
    """
    days = [np.asarray(day) for day in day_keys]
    codes, keys = pd.factorize(np.concatenate(days), sort=True)
    return np.split(codes.astype(np.int64), np.cumsum([len(day) for day in days])[:-1]), pd.Index(keys)


def _codes_of(chosen: set[Hashable], keys: pd.Index) -> set[int]:
    """The codes of the ``chosen`` keys; a key never requested gets a code of its own below 0, which no request
    matches, so the set still counts every published key (each fills a slot, as in the client's capacity)."""
    if not chosen:
        return set()
    positions = keys.get_indexer(pd.Index(list(chosen)))
    unseen = itertools.count(-1, -1)
    return {int(position) if position >= 0 else next(unseen) for position in positions}


def _check_warmup(days: list[np.ndarray], warmup_days: int) -> None:
    if not 0 <= warmup_days <= len(days):
        raise ValueError(f"warmup_days must be between 0 and the {len(days)} days, got {warmup_days}")


def _ranked_keys(days: list[np.ndarray], *, limit: int, half_life_days: float) -> list[list]:
    """The ``limit`` keys of highest demand before each day, best first (day 0 has no history: none). Demand is
    the ``ad_demand`` asset's: the ``DEMAND_WINDOW_DAYS`` days before the day, so a long trace replays in time
    linear in its days.

    ``select_top`` ranks once, so the top N of any N <= ``limit`` is a prefix of these lists.
    """
    counts = [daily_counts(day) for day in days]
    demands = [
        ad_demand(counts[max(0, d - DEMAND_WINDOW_DAYS) : d], half_life_days=half_life_days)
        for d in range(1, len(days))
    ]
    return [[]] + [select_top(demand, limit) for demand in demands]


def _precomputed_sets(days: list[np.ndarray], *, top_n: int, half_life_days: float) -> list[set]:
    """The top-N set each day would get from the demand of the week before it (day 0 has no history: empty)."""
    return [set(ranked) for ranked in _ranked_keys(days, limit=top_n, half_life_days=half_life_days)]


def _ranked_codes(ranked: Sequence[Hashable], keys: pd.Index) -> list[int]:
    """The codes of ``ranked`` in its order; keys never requested have none and are skipped."""
    if len(ranked) == 0:
        return []
    positions = keys.get_indexer(pd.Index(list(ranked)))
    return [int(position) for position in positions if position >= 0]


# How fast the self-tuned share forgets (``_best_share``): a day's evidence counts half as much as that of two days
# later, as ``ad_demand`` weighs a key's requests by default.
SHARE_HALF_LIFE_DAYS = 2.0


def share_candidates(capacity: int) -> list[int]:
    """Precompute shares a self-tuned replay tries: 0, C/16, C/8, C/4, C/2 and 3C/4 (rounded down). Never the whole
    capacity: a cache without read-through serves no key it did not publish, and on a day when the requested keys
    change it serves nothing at all, where read-through alone would have kept most of its hits."""
    return sorted({capacity * sixteenths // 16 for sixteenths in (0, 1, 2, 4, 8, 12)})


def _candidate_day_hits(
    days: list[np.ndarray],
    capacity: int,
    ranking: list[list[int]],
    live: LiveTier | None = None,
    known: dict[int, list[int]] | None = None,
) -> dict[int, list[int]]:
    """Hits per day of "top-N of each day's ranking + read-through of C-N" (``live``, default LRU) for every
    candidate N: one replay each, and a day's hits depend only on the days up to it. ``known`` holds candidates'
    hits the caller has replayed already (N = 0 is the read-through of C keys alone, whatever the ranking)."""
    live = live or _lru_day_hits
    known = known or {}
    return {
        n: known[n] if n in known else live(days, capacity - n, precomputed=[keys[:n] for keys in ranking])
        for n in share_candidates(capacity)
    }


def _gain(day_hits: dict[int, list[int]], n: int, first: int, last: int) -> float:
    """Candidate ``n``'s hits over read-through's (N = 0) on days ``first..last-1``, the recent ones weighing more
    (``SHARE_HALF_LIFE_DAYS``: popularity drifts, and a share that stopped paying is dropped sooner than after as many
    losing days as it had winning ones)."""
    weights = [0.5 ** ((last - 1 - day) / SHARE_HALF_LIFE_DAYS) for day in range(first, last)]
    pairs = zip(weights, day_hits[n][first:last], day_hits[0][first:last], strict=True)
    return sum(weight * (hits - read_through) for weight, hits, read_through in pairs)


def _gains(day_hits: dict[int, list[int]], first: int, last: int) -> dict[int, float]:
    """Every candidate's ``_gain`` on days ``first..last-1``."""
    return {n: _gain(day_hits, n, first, last) for n in day_hits}


def _best_share(gains: dict[int, float], within: Sequence[int] | None = None) -> int:
    """The candidate (of ``within``, default all) with the most hits over read-through (``gains``, ``_gains``), and
    only one that got more than read-through; ties: the smaller N; 0 without one."""
    above = [n for n in (gains if within is None else within) if n and gains[n] > 0]
    return max(above, key=lambda n: (gains[n], -n), default=0)


def _next_share(day_hits: dict[int, list[int]], first: int, last: int, before: int) -> int:
    """The share for the day after days ``first..last-1``, the share of the last of them being ``before``: 0 when
    ``before`` got fewer hits than read-through on them (``_gain``: a share that stopped paying falls at once); else
    the best candidate (``_best_share``), but at most one step above ``before`` (a share grows a step a day, as its
    evidence accumulates: a day whose keys all change then costs a small share, not three quarters of the cache chosen
    on an edge of a point). A step that itself got fewer hits than read-through is not taken on a larger candidate's
    evidence: the best of those up to ``before`` is (ramping through such steps lost 1.8 points to read-through on the
    CloudPhysics trace at C = 32,000)."""
    if last <= first:
        return 0
    gains = _gains(day_hits, first, last)
    if before and gains[before] < 0:
        return 0
    best = _best_share(gains)
    if best <= before:
        return best
    step = min(n for n in gains if n > before)
    if step == best or gains[step] >= 0:
        return step
    return _best_share(gains, [n for n in gains if n <= before])


def _on_candidates(share: int, capacity: int, candidates: Sequence[int]) -> int:
    """The largest of ``candidates`` (of a capacity scaled or not) at most the fraction ``share`` is of ``capacity``
    (its own candidate when it is one; a share set by hand, or of another capacity, is taken down to one)."""
    whole = share_candidates(capacity)
    return candidates[max(i for i, n in enumerate(whole) if n <= share)] if share > 0 else 0


def _self_tuned_shares(
    days: list[np.ndarray],
    capacity: int,
    ranking: list[list[int]],
    *,
    warmup_days: int,
    live: LiveTier | None = None,
    known: dict[int, list[int]] | None = None,
) -> tuple[list[int], list[list[int]]]:
    """The precompute share N of each day, and its top-N set, chosen without looking at that day.

    Every candidate N replays "top-N of the day's ranking (made from the days before it) + LRU of C-N" over the
    whole trace once, keeping its hits per day. Counted day d then takes ``_next_share`` of counted days W..d-1 and
    day d-1's share: of the candidates up to one above that share, the one with the most hits over read-through,
    the recent days weighing more, if any got more (0 once that share got fewer), so nothing of day
    d or later is used. The first counted day has no evidence and takes N = 0, as do the warm-up days. ``known``:
    candidates' hits per day replayed already.
    """
    shares = _day_shares(_candidate_day_hits(days, capacity, ranking, live, known), len(days), warmup_days)
    return shares, [keys[:share] for keys, share in zip(ranking, shares, strict=True)]


def _day_shares(day_hits: dict[int, list[int]], n_days: int, warmup_days: int) -> list[int]:
    """Each day's share N, from the candidates' hits on the counted days before it (0 without any), growing one
    candidate a day at most (``_next_share``)."""
    shares = [0] * n_days
    for d in range(warmup_days + 1, n_days):
        shares[d] = _next_share(day_hits, warmup_days, d, shares[d - 1])
    return shares


@dataclass(frozen=True)
class ShareChoice:
    """The precompute share chosen for the day after a replayed history, and the evidence."""

    share: int
    capacity: int
    hit_rates: dict[int, float]  # candidate N -> hit rate of "top-N + LRU of C-N" on the counted days
    requests: int  # requests on the counted days
    sample_rate: float = 1.0  # the share of keys replayed (``tune_share``'s ``max_requests``)
    # The counted days replayed as ``replay``'s ``top_n="auto"`` runs them: each day's N chosen from the days before
    # it only. ``hit_rates[share]`` is the chosen candidate's rate on the very days it was chosen on (unweighted: the
    # choice weighs the recent days more); this rate is the one to set beside read-through.
    tuned_hit_rate: float = 0.0
    # the candidate with the most hits over read-through on the history (0 when none got more): ``share`` unless the
    # one-step rise capped it, a step that lost itself held it lower, or the share before it lost and fell to 0
    best: int = 0
    ramped_from: int = 0  # the share before (``previous_share``, as given), which ``share`` rises a candidate above


def tune_share(
    day_keys: Sequence[np.ndarray],
    capacity: int,
    *,
    ranked: Sequence[Sequence[Hashable]] | None = None,
    warmup_days: int = 1,
    half_life_days: float = 2.0,
    admission: str | AdmissionPolicy | None = None,
    max_requests: int | None = None,
    sampled: tuple[float, Sequence[int]] | None = None,
    previous_share: int | None = None,
) -> ShareChoice:
    """The precompute share for the day after ``day_keys``: the candidate N (``share_candidates``) whose
    "top-N + read-through of C-N" got the most hits over read-through alone on days W..D-1 of the history, the recent
    ones weighing more, among those up to one candidate above the share before it (see below) and only one that got
    more than read-through, or 0 when the share before it got fewer hits than read-through on them
    (``_next_share``); each day's top-N ranked from the days before it (``ranked``, else recency-weighted frequency).
    Without a counted day with requests the share is 0: plain read-through until there is evidence.

    The read-through is the live tier the serving client's ``admission`` gives (as ``replay`` models it): an LRU
    by default (``always``), behind the policy's filter, or ``probation``'s own queues of C less the published keys.

    A history of more than ``max_requests`` requests is replayed on a SHARDS sample of its keys (``sample_trace``)
    that holds about that many, with C scaled alike (``sampled_size``; never below 16 keys, so the candidates stay
    distinct); ``sample_rate`` says which, and ``hit_rates`` are adjusted to the whole history (``shards_adjusted``),
    which leaves their order, and so the choice, as it was on the sample. ``sampled=(rate, requests per day)`` says
    ``day_keys`` (and ``ranked``) already are such a sample (``shards_keep``) of days that held those requests.

    The share rises at most one candidate above ``previous_share``, what the day before published (a run a day
    replays a new window, whose own sequence of shares restarts: without it the share could jump several steps
    overnight); without it, above the share the replay chose for the history's last day.

    The chosen candidate's rate is measured on the days that chose it; ``tuned_hit_rate`` is the out-of-sample one:
    the history replayed with each counted day's share chosen from the days before it (``replay``'s ours with
    ``top_n="auto"``, on the same live tier)."""
    if capacity < 1:
        raise ValueError(f"capacity must be at least 1, got {capacity}")
    if max_requests is not None and max_requests < 1:
        raise ValueError(f"max_requests must be at least 1, got {max_requests}")
    if warmup_days < 0:
        raise ValueError(f"warmup_days must be at least 0, got {warmup_days}")
    if ranked is not None and len(ranked) != len(day_keys):
        raise ValueError(f"ranked needs one list per day ({len(day_keys)}), got {len(ranked)}")
    if sampled is not None and (len(sampled[1]) != len(day_keys) or not 0 < sampled[0] <= 1):
        raise ValueError(f"sampled needs a rate in (0, 1] and {len(day_keys)} day counts, got {sampled}")
    if sampled is not None and sampled[0] < 1 and sampled_size(capacity, sampled[0]) < SAMPLED_CACHE_MIN:
        raise ValueError(
            f"a sample at rate {sampled[0]:g} scales capacity {capacity} below {SAMPLED_CACHE_MIN} keys, where the "
            "share's candidates are no longer distinct: sample at a rate of at least shards_rate's"
        )
    total = sum(len(day) for day in day_keys)
    if not day_keys or total == 0:  # a sample may hold nothing of days that held requests: it still says so
        requests, rate = (sum(sampled[1][warmup_days:]), sampled[0]) if sampled is not None else (0, 1.0)
        return ShareChoice(0, capacity, {n: 0.0 for n in share_candidates(capacity)}, requests, rate)
    days, keys = _as_codes(day_keys)
    if ranked is None:
        ranking = _ranked_keys(days, limit=capacity, half_life_days=half_life_days)
    else:
        ranking = [_ranked_codes(given, keys)[:capacity] for given in ranked]
    if sampled is not None:
        rate, whole_days = sampled
        requests = sum(whole_days[warmup_days:])
    else:
        requests = sum(len(day) for day in days[warmup_days:])
        rate = shards_rate(total, max_requests, capacity)
        if rate < 1:
            kept = shards_keep(keys.to_numpy(), rate)
            days = [day[kept[day]] for day in days]
            ranking = [[code for code in ranked_codes if kept[code]] for ranked_codes in ranking]
    tuned = sampled_size(capacity, rate)
    ranking = [ranked_codes[:tuned] for ranked_codes in ranking]
    live_tier = None if admission is None else _live_tier(admission, None, tuned)
    live = _lru_day_hits if live_tier is None else live_tier(keys)
    day_hits = _candidate_day_hits(days, tuned, ranking, live)
    counted = sum(len(day) for day in days[warmup_days:])
    rates = {n: (sum(hits[warmup_days:]) / counted if counted else 0.0) for n, hits in day_hits.items()}
    shares = _day_shares(day_hits, len(days), warmup_days)
    candidates = sorted(day_hits)
    before = shares[-1] if previous_share is None else _on_candidates(previous_share, capacity, candidates)
    best = _best_share(_gains(day_hits, warmup_days, len(days))) if counted else 0
    share = _next_share(day_hits, warmup_days, len(days), before) if counted else 0
    chosen = [ranked_codes[:n] for ranked_codes, n in zip(ranking, shares, strict=True)]
    out_of_sample = live(days, [tuned - n for n in shares], precomputed=chosen)
    tuned_rate = sum(out_of_sample[warmup_days:]) / counted if counted else 0.0
    if rate < 1:  # each sampled candidate stands for the whole history's candidate of the same fraction of C
        whole = dict(zip(share_candidates(tuned), share_candidates(capacity), strict=True))
        share, best, before = whole[share], whole[best], whole[before]
        rates = shards_adjusted({whole[n]: r for n, r in rates.items()}, rate, counted, requests)
        tuned_rate = shards_adjusted({"tuned": tuned_rate}, rate, counted, requests)["tuned"]
    ramped_from = before if previous_share is None else previous_share  # the published share, not its candidate
    return ShareChoice(share, capacity, rates, requests, rate, tuned_rate, best, ramped_from)


def _static_hits(day: np.ndarray, chosen: set[Hashable]) -> int:
    """The day's requests for the ``chosen`` (published) keys (``_published_mask``, as the live tiers count them)."""
    if len(chosen) == 0 or len(day) == 0:
        return 0
    return int(_published_mask(np.asarray(day), chosen).sum())


def _lru_hits(
    days: list[np.ndarray],
    slots: int | Sequence[int],
    *,
    precomputed: Sequence[Collection[Hashable]] | None = None,
    count_from: int = 1,
) -> int:
    """Hits on days >= ``count_from`` of a read-through LRU of ``slots`` keys carried across days.

    Requests for that day's precomputed keys are hits and leave the LRU untouched. ``slots`` may give the
    size per day; a day with fewer slots first evicts the least recent keys.
    """
    return sum(_lru_day_hits(days, slots, precomputed=precomputed)[count_from:])


def _lru_day_hits(
    days: list[np.ndarray], slots: int | Sequence[int], *, precomputed: Sequence[Collection[Hashable]] | None = None
) -> list[int]:
    """Hits per day of the read-through LRU that ``_lru_hits`` describes: every miss is admitted.

    ``_admitted_lru_day_hits`` with an admission that always admits, without its per-request call; like every
    live tier it counts each day's precomputed keys' requests, which never touch the LRU, and takes them out first
    (``_without_published``)."""
    cache: OrderedDict[Hashable, None] = OrderedDict()
    per_day: list[int] = []
    for d, day in enumerate(days):
        size = slots[d] if isinstance(slots, Sequence) else slots
        while len(cache) > size:
            cache.popitem(last=False)
        live_requests, published = _without_published(day, precomputed[d] if precomputed is not None else ())
        day_hits = _published_hits(published)
        if size > 0:
            move_to_end, evict = cache.move_to_end, cache.popitem
            for key in live_requests.tolist():
                if key in cache:
                    move_to_end(key)
                    day_hits += 1
                else:
                    cache[key] = None
                    if len(cache) > size:
                        evict(last=False)
        per_day.append(day_hits)
    return per_day


def _without_published(
    day: np.ndarray | Sequence[Hashable], published: Collection[Hashable]
) -> tuple[np.ndarray, np.ndarray | None]:
    """The requests of ``day`` that the live tier sees, in order, and per request of ``day`` whether it is for one
    of the ``published`` keys (served by the published version, unseen by the live tier; None: none can be).

    Every live tier cuts its day with this, so that they all count the published keys' requests alike."""
    day = np.asarray(day)
    if len(published) == 0 or len(day) == 0:
        return day, None
    served = _published_mask(day, published)
    return day[~served], served


def _published_hits(published: np.ndarray | None) -> int:
    """How many requests ``_without_published``'s mask says the published version served."""
    return 0 if published is None else int(published.sum())


def _published_mask(day: np.ndarray, published: Collection[Hashable]) -> np.ndarray:
    """Whether each request of ``day`` is for one of the ``published`` keys (hash lookups, any key type)."""
    wanted = published if isinstance(published, set | frozenset) else set(published)
    return pd.Series(day, copy=False).isin(wanted).to_numpy()


def _admission_model(
    admission: str | AdmissionPolicy, window: int | None, capacity: int
) -> Callable[[pd.Index], Callable[[int, int, bool], bool]]:
    """A factory of fresh admission states for a trace's keys: ``admit(code, position, hit)`` is called at
    every live-tier lookup (hits too: the client's policy sees them in the same round trip) and tells
    whether a miss would be stored. Arguments are checked here, before any replay runs."""
    policy = admission_policy(admission)
    if window is not None and (isinstance(window, bool) or not isinstance(window, int | np.integer) or window < 1):
        raise ValueError(f"admission_window must be a whole number of requests >= 1, got {window!r}")
    if isinstance(policy, SecondMiss):
        span = int(window or capacity)

        def second_miss(keys: pd.Index) -> Callable[[int, int, bool], bool]:
            alive_until: dict[int, int] = {}  # the marker's expiry position (exclusive), like its PX TTL

            def admit(code: int, position: int, hit: bool) -> bool:
                until = alive_until.get(code)
                if until is not None and position < until:
                    return True
                alive_until[code] = position + span  # SET NX: a new marker only when there is none
                return False

            return admit

        return second_miss
    if isinstance(policy, FrequencySketch):
        return lambda keys: _sketch_admission(policy, keys)
    return lambda keys: lambda code, position, hit: True


def _sketch_admission(policy: FrequencySketch, keys: pd.Index) -> Callable[[int, int, bool], bool]:
    """The Redis count-min sketch of ``serving.admission`` as a bytearray of counters, one per byte, aged a step of
    ``AGE_STEP_BYTES`` Redis bytes (twice as many counters) per miss as the client's script ages it."""
    table = bytearray(policy.depth * policy.width)
    view = np.frombuffer(table, dtype=np.uint8)  # aging halves every counter in place
    positions: dict[int, list[int]] = {}
    threshold, sample, count_max, seen_max = policy.threshold, policy.sample, COUNTER_MAX, (1 << 32) - 1
    size, step = policy.counter_bytes, AGE_STEP_BYTES  # in Redis bytes: two counters each
    seen = cursor = 0  # the aging cursor: the next Redis byte to halve, 0 while no aging runs

    def admit(code: int, position: int, hit: bool) -> bool:
        nonlocal seen, cursor
        counters = positions.get(code)
        if counters is None:
            counters = positions[code] = policy.counters(str(keys[code]))
        estimate = count_max
        for at in counters:  # BITFIELD OVERFLOW SAT INCRBY u4 ... 1: the new value of each counter
            value = table[at]
            if value < count_max:
                value += 1
                table[at] = value
            if value < estimate:
                estimate = value
        seen = min(seen + 1, seen_max)  # INCRBY u32 0 1, saturating too
        if hit:
            return True
        admitted = estimate >= threshold
        if cursor or seen >= sample:  # a miss runs an aging step, after deciding; the first starts it
            if not cursor:
                seen = 0
            stop = min(cursor + step, size)
            np.right_shift(view[2 * cursor : 2 * stop], 1, out=view[2 * cursor : 2 * stop])
            cursor = stop if stop < size else 0
        return admitted

    return admit


class LiveTier(Protocol):
    """Hits per day of a read-through tier of ``slots`` keys (per day, or fixed) beside precomputed sets."""

    def __call__(
        self,
        days: list[np.ndarray],
        slots: int | Sequence[int],
        *,
        precomputed: Sequence[Collection[Hashable]] | None = None,
        outcomes: list[str] | None = None,
    ) -> list[int]: ...


def _live_tier(admission: str | AdmissionPolicy, window: int | None, capacity: int) -> Callable[[pd.Index], LiveTier]:
    """A factory of the live tier that ``admission`` gives the client, for a trace's keys: an LRU behind an
    admission filter (fresh filter state at every replay), or (``probation``) the policy's own queues, sized as
    the client sizes them: ``capacity`` less the keys each day publishes (its precomputed set, which may hold
    fewer keys than the share, as on early days of short history), or ``slots`` when no sets are given.
    Arguments are checked here, before any replay runs."""
    if isinstance(admission_policy(admission), Probation):
        return lambda keys: functools.partial(_probation_day_hits, capacity=capacity)
    model = _admission_model(admission, window, capacity)
    return lambda keys: lambda days, slots, **kw: _admitted_lru_day_hits(days, slots, model(keys), **kw)


def _probation_day_hits(
    days: list[np.ndarray],
    slots: int | Sequence[int],
    *,
    precomputed: Sequence[Collection[Hashable]] | None = None,
    outcomes: list[str] | None = None,
    capacity: int | None = None,
) -> list[int]:
    """Hits per day of admission ``probation``'s live tier, step for step as its scripts (``_TOUCH`` at every
    live-tier lookup, ``_ADMIT`` at every miss) run them: a probation FIFO with hit counts, a main LRU and a
    ghost list, evicting only when ``slots`` keys are tracked (the client's capacity less the published keys;
    given ``capacity`` and ``precomputed``, each day's slots are ``capacity`` less that day's set, whatever
    ``slots`` says). A day with fewer slots shrinks the tier over its next misses (each moves or evicts at most
    ``MAX_STEPS`` keys), and a miss that finds no room is not kept, as the client does when a bigger version is
    published. Each day's set is that day's publish, settled as ``publish.settle_published`` settles it: its keys
    leave the main LRU, and the keys of the day before's set (in its order: a list as given, best first; any other
    collection sorted) that it drops and the tier does not track enter the main LRU below every key there while
    the tier has room; nothing is settled before the first miss, which records the capacity the client settles by."""
    if capacity is not None and precomputed is not None:
        slots = [capacity - len(chosen) for chosen in precomputed]
    small: deque[int] = deque()
    hits: dict[int, int] = {}  # the keys in probation and their hits there
    main: OrderedDict[int, None] = OrderedDict()  # least recent first
    ghost: OrderedDict[int, None] = OrderedDict()  # oldest first
    per_day: list[int] = []
    previous: list = []
    recorded = False  # has a miss reached ``_ADMIT``, which records the capacity the publish settles by?
    for d, day in enumerate(days):
        size = slots[d] if isinstance(slots, Sequence) else slots
        small_size, ghost_size = probation_sizes(size)
        chosen = set(precomputed[d]) if precomputed is not None else set()
        if precomputed is not None and recorded:  # the day's publish, and what ``publish.settle_published`` does
            for key in chosen & main.keys():
                del main[key]
            room = size - len(small) - len(main)
            for key in hand_over_order(previous, chosen, hits.keys() | main.keys(), room):
                ghost.pop(key, None)
                main[key] = None
                main.move_to_end(key, last=False)  # colder than every key there, the best one warmest
            previous = published_order(precomputed[d])[:capacity]  # the client keeps the first ``capacity``
        # Requests of the day's published keys are served by the published version: the policy never sees them.
        live_requests, published = _without_published(day, chosen)
        day_hits = _published_hits(published)
        live_outcomes: list[str] | None = None if outcomes is None else []
        move_to_end = main.move_to_end
        for key in live_requests.tolist():
            if key in hits:
                hits[key] += 1
                day_hits += 1
                outcome = "hit"
            elif key in main:
                move_to_end(key)
                day_hits += 1
                outcome = "hit"
            else:
                recorded = True
                steps, tracked = 0, len(small) + len(main)
                while 0 < tracked >= size and steps < MAX_STEPS:
                    steps += 1
                    if small and (len(small) >= small_size or not main):
                        oldest = small.popleft()
                        if hits.pop(oldest):
                            main[oldest] = None
                        else:
                            tracked -= 1
                            ghost[oldest] = None
                    else:
                        main.popitem(last=False)
                        tracked -= 1
                for _ in range(min(len(ghost) - ghost_size, MAX_STEPS)):  # a smaller tier's ghost list shrinks too
                    ghost.popitem(last=False)
                if tracked >= size:  # no room: the stored value is deleted again
                    outcome = "rejected"
                else:
                    outcome = "admitted"
                    if key in ghost:
                        del ghost[key]
                        main[key] = None
                    else:
                        small.append(key)
                        hits[key] = 0
            if live_outcomes is not None:
                live_outcomes.append(outcome)
        if outcomes is not None and live_outcomes is not None:
            outcomes.extend(_with_published_hits(live_outcomes, published))
        per_day.append(day_hits)
    return per_day


def _with_published_hits(live_outcomes: list[str], published: np.ndarray | None) -> list[str]:
    """A day's outcomes in request order: ``"hit"`` for each request of a published key (``published``, per
    request; None: none was), the live tier's ``live_outcomes`` in order for the others."""
    if published is None:
        return live_outcomes
    merged = np.full(len(published), "hit", dtype=object)
    merged[~published] = live_outcomes
    return merged.tolist()


def _admitted_lru_day_hits(
    days: list[np.ndarray],
    slots: int | Sequence[int],
    admit: Callable[[int, int, bool], bool],
    *,
    precomputed: Sequence[Collection[Hashable]] | None = None,
    outcomes: list[str] | None = None,
) -> list[int]:
    """Hits per day of ``_lru_day_hits``'s LRU where a missed key enters only if ``admit`` says so.

    Positions count every request of the trace, precomputed ones included. ``outcomes``, when given,
    receives ``"hit"``, ``"admitted"`` or ``"rejected"`` per request."""
    cache: OrderedDict[int, None] = OrderedDict()
    per_day: list[int] = []
    position = 0
    for d, day in enumerate(days):
        size = slots[d] if isinstance(slots, Sequence) else slots
        while len(cache) > size:
            cache.popitem(last=False)
        live_requests, published = _without_published(day, precomputed[d] if precomputed is not None else ())
        day_hits = _published_hits(published)
        live_outcomes: list[str] | None = None if outcomes is None else []
        positions = _live_positions(position, len(live_requests), published)
        for key, at in zip(live_requests.tolist(), positions, strict=True):
            if key in cache:
                admit(key, at, True)
                cache.move_to_end(key)
                day_hits += 1
                outcome = "hit"
            elif admit(key, at, False) and size > 0:
                cache[key] = None
                if len(cache) > size:
                    cache.popitem(last=False)
                outcome = "admitted"
            else:
                outcome = "rejected"
            if live_outcomes is not None:
                live_outcomes.append(outcome)
        if outcomes is not None and live_outcomes is not None:
            outcomes.extend(_with_published_hits(live_outcomes, published))
        position += len(day)
        per_day.append(day_hits)
    return per_day


def _live_positions(first: int, live: int, published: np.ndarray | None) -> list[int]:
    """The trace positions of a day's ``live`` live-tier requests, the day starting at position ``first``, given
    ``_without_published``'s mask of its published requests."""
    if published is None:
        return list(range(first, first + live))
    return (first + np.flatnonzero(~published)).tolist()


def _s3fifo_hits(days: list[np.ndarray], capacity: int, *, count_from: int) -> int:
    """Hits on days >= ``count_from`` of the S3-FIFO cache that ``s3fifo_hits`` describes."""
    small_size = max(1, capacity // 10)
    main_size = capacity - small_size
    small: deque[Hashable] = deque()  # oldest key on the left
    main: deque[Hashable] = deque()
    ghost: OrderedDict[Hashable, None] = OrderedDict()  # oldest first, as big as main
    freq: dict[Hashable, int] = {}  # every cached key (in small or main) and its frequency 0..3

    def evict_main() -> None:
        while main:
            oldest = main.popleft()
            seen = freq[oldest]
            if seen:
                freq[oldest] = seen - 1
                main.append(oldest)
            else:
                del freq[oldest]
                return

    def evict_small() -> None:
        while small:
            oldest = small.popleft()
            if freq[oldest]:
                main.append(oldest)
                if len(main) > main_size:
                    evict_main()
            else:
                del freq[oldest]
                ghost[oldest] = None
                if len(ghost) > main_size:
                    ghost.popitem(last=False)
                return

    hits = 0
    for d, day in enumerate(days):
        day_hits = 0
        for key in day.tolist():
            seen = freq.get(key)
            if seen is not None:
                day_hits += 1
                if seen < 3:
                    freq[key] = seen + 1
                continue
            while len(small) + len(main) >= capacity:
                if len(small) >= small_size or not main:
                    evict_small()
                else:
                    evict_main()
            if key in ghost:
                del ghost[key]
                main.append(key)
            else:
                small.append(key)
            freq[key] = 0
        if d >= count_from:
            hits += day_hits
    return hits


def _arc_hits(days: list[np.ndarray], capacity: int, *, count_from: int) -> int:
    """Hits on days >= ``count_from`` of the ARC cache that ``arc_hits`` describes."""
    c = capacity
    t1: OrderedDict[Hashable, None] = OrderedDict()  # least recent first
    t2: OrderedDict[Hashable, None] = OrderedDict()
    b1: OrderedDict[Hashable, None] = OrderedDict()
    b2: OrderedDict[Hashable, None] = OrderedDict()
    p = 0.0

    def replace(requested_in_b2: bool) -> None:  # the paper's REPLACE(x, p)
        if t1 and (len(t1) > p or (requested_in_b2 and len(t1) == p)):
            b1[t1.popitem(last=False)[0]] = None
        else:
            b2[t2.popitem(last=False)[0]] = None

    hits = 0
    for d, day in enumerate(days):
        day_hits = 0
        for key in day.tolist():
            if key in t2:  # case I: a hit
                t2.move_to_end(key)
                day_hits += 1
            elif key in t1:
                del t1[key]
                t2[key] = None
                day_hits += 1
            elif key in b1:  # case II: a miss that T1 should have been bigger for
                p = min(float(c), p + max(len(b2) / len(b1), 1))
                replace(False)
                del b1[key]
                t2[key] = None
            elif key in b2:  # case III: a miss that T2 should have been bigger for
                p = max(0.0, p - max(len(b1) / len(b2), 1))
                replace(True)
                del b2[key]
                t2[key] = None
            else:  # case IV: a key in no list
                if len(t1) + len(b1) == c:
                    if len(t1) < c:
                        b1.popitem(last=False)
                        replace(False)
                    else:
                        t1.popitem(last=False)
                elif (total := len(t1) + len(b1) + len(t2) + len(b2)) >= c:
                    if total == 2 * c:
                        b2.popitem(last=False)
                    replace(False)
                t1[key] = None
        if d >= count_from:
            hits += day_hits
    return hits


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, decompressed when its suffix names a compression; a corrupt file is a TraceError."""
    suffix = path.suffix.lower()
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    try:
        if suffix == ".xz":
            return lzma.decompress(path.read_bytes())
        if suffix in _COMPRESSION:
            import pyarrow as pa

            with pa.input_stream(str(path), compression=_COMPRESSION[suffix]) as stream:
                return stream.read()
    except (lzma.LZMAError, OSError, ValueError) as exc:
        if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError):
            raise
        if "too much memory" in str(exc):  # a frame written with a long window (zstd --long): a valid file
            raise TraceError(
                f"its {suffix[1:]} frames need a larger window than is read here ({exc}): decompress it first, e.g. "
                "zstd -dc --long=31 FILE | precompute replay --trace - (with --format for binary records)"
            ) from None
        raise TraceError(f"not a valid {suffix[1:]} file: {exc}") from None
    return path.read_bytes()


def int64_keys(ints: np.ndarray) -> np.ndarray:
    """Integer keys as a new int64 array; uint64 ids of 2^63 and above as the negative int64 of the same bits, so
    every id stays distinct (and differences between keys stay exact, modulo 2^64)."""
    return ints.view(np.int64).copy() if ints.dtype == np.uint64 else ints.astype(np.int64)


def _oracle_general(data: bytes, trace_format: str, exact_keys: bool = False) -> Trace:
    """libCacheSim's oracleGeneral (or oracleGeneralOpNS) records as a trace: keys the object ids (with
    ``exact_keys``, ids of 2^63 and above make them all the text of their numbers), timestamps the times."""
    dtype, name, fields = _ORACLE[trace_format]
    if not data:
        raise TraceError("trace is empty")
    if len(data) % dtype.itemsize:
        fitting = [f for f, (d, _, _) in _ORACLE.items() if f != trace_format and len(data) % d.itemsize == 0]
        other = "".join(f"; {_ORACLE[f][1]} records? use --format {f}" for f in fitting)
        raise TraceError(
            f"{len(data)} bytes are not a whole number of {dtype.itemsize}-byte {name} records (a text trace? use "
            f"--format text{other})"
        )
    records = np.frombuffer(data, dtype=dtype)
    ids = records["obj_id"]
    exact = exact_keys and bool(len(ids)) and int(ids.max()) >= 2**63  # int64_keys makes those negative numbers
    return Trace(
        keys=ids.astype(str).astype(object) if exact else int64_keys(ids),
        timestamps=records["time"].astype(np.float64),
        fields=fields,
        timestamp_field=1,
        key_field=2,
        format=trace_format,
    )


def _date_times(text: str, first_line: int) -> tuple[str, np.ndarray]:
    """``timestamp,key`` lines whose timestamps are ISO 8601 date-times: the lines with each timestamp replaced
    by 0, for the line checks and parsers of numbers, and the timestamps as seconds since the epoch (a date-time
    without an offset is read as UTC). A line without a comma is left for the line checks to name."""
    stamps = pd.Series(_FIRST_FIELD.findall(text), dtype=object)  # a line without a comma: all of it
    if _PADDED_FIELD.search(text):
        stamps = stamps.str.strip()
    seconds = iso_seconds(stamps)
    unread = np.flatnonzero(np.isnan(seconds))
    if len(unread) and "," in text.split("\n", unread[0] + 1)[unread[0]]:  # no comma: the line checks name it
        like = f"a date-time like line {first_line}'s" if unread[0] else "an ISO 8601 date-time"
        problem = f"timestamp {stamps[unread[0]]!r} is not {like}"
        raise TraceError(f"line {unread[0] + first_line}: {problem}")
    return _FIRST_FIELD_COMMA.sub("0,", text), seconds


def iso_seconds(text: pd.Series) -> np.ndarray:
    """ISO 8601 date-times as float seconds since the epoch (UTC without an offset; NaN where one is not a
    date-time), in the unit pandas parsed them in, so years before 1677 or after 2262 do not overflow."""
    utc = text.str.endswith(" UTC", na=False).to_numpy()  # BigQuery's "2026-01-01 08:30:00 UTC": Z, in ISO 8601
    if utc.any():
        text = text.where(~utc, text.str[:-4] + "Z")
    parsed = pd.to_datetime(text, format="ISO8601", utc=True, errors="coerce")
    naive = parsed.dt.tz_localize(None).to_numpy()  # UTC
    ticks = naive.view(np.int64) / PER_SECOND[np.datetime_data(naive.dtype)[0]]
    return np.where(parsed.isna().to_numpy(), np.nan, ticks)


def _decode_text(data: bytes) -> str:
    """The bytes as text: UTF-8 (byte-order marks dropped where a line starts: ``cat`` of two exports leaves the
    second's inside, and its first key became another key), CRLF and CR as LF, without the final newline and the
    blank lines after it (``_without_blank_end``)."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):  # Windows' "Unicode" text, PowerShell's export
        raise TraceError("the file is UTF-16 text (it starts with UTF-16's byte order mark): convert it to UTF-8")
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_no = data.count(b"\n", 0, exc.start) + 1
        start, end = data.rfind(b"\n", 0, exc.start) + 1, data.find(b"\n", exc.start)
        line = data[start : None if end < 0 else end].decode("utf-8", "surrogateescape")
        raise TraceError(f"line {line_no}: {_not_utf8(line)}") from None
    text = _normalized_lines(text)
    if not text:
        raise TraceError("trace is empty")
    return text


def _normalized_lines(text: str) -> str:
    """Decoded ``text`` with LF line ends (CRLF and a lone CR end a line too), without a byte order mark that starts a
    line (``cat`` of two exports), the final newline and the blank lines after it (``_without_blank_end``)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _without_blank_end(text.replace("\n\ufeff", "\n"))


def _without_blank_end(text: str) -> str:
    """``text`` without the newline that ends its last line nor the blank lines (empty, or spaces and tabs only) below
    it, which an editor or a ``>>`` append leaves: they end the file, they are no request. A blank line above a
    request stays, for the line checks to name."""
    end = len(text)
    while end and text[end - 1] in " \t\n":  # a character at a time: no copy of a long text to find its end
        end -= 1
    if not end:
        return ""
    cut = text.find("\n", end)  # the end of the last line that is not blank (its trailing blanks are padding)
    return text if cut < 0 else text[:cut]


def _parse_integer_keys(clean: str, kind: str) -> pd.DataFrame | None:
    """The trace with int64 keys, or None when a key is out of the int64 range."""
    dtypes = {"timestamp": np.float64, "key": np.int64} if kind == "csv" else {"key": np.int64}
    try:
        return pd.read_csv(_utf8(clean), header=None, names=list(dtypes), dtype=dtypes, na_filter=False)
    except (OverflowError, ValueError):
        return None


def _parse_string_keys(clean: str, kind: str) -> pd.DataFrame:
    """The trace with ``str`` keys taken verbatim (bare keys may hold commas and quotes, so no CSV parser)."""
    if kind == "key":
        return pd.DataFrame({"key": np.array(clean.split("\n"), dtype=object)})
    names, dtypes = ["timestamp", "key"], {"timestamp": np.float64, "key": str}
    return pd.read_csv(_utf8(clean), header=None, names=names, dtype=dtypes, na_filter=False, quoting=csv.QUOTE_NONE)


def _utf8(text: str) -> io.BytesIO:
    """The text as UTF-8 bytes for pandas' parser: a ``StringIO`` would hold it as 4 bytes a character."""
    return io.BytesIO(text.encode("utf-8"))


def _line_problem(line: str, kind: str, fields: int = 2, *, header: bool = False) -> str:
    """Why one line is not a valid trace line of format ``kind`` (``header``: the file names its fields)."""
    if not line.strip():
        return "blank line"
    if line.lstrip().startswith("#"):
        return "comment lines are not allowed"
    if kind == "key":
        if _CSV_START_RE.match(line):
            return "mixed formats: line 1 is a bare key but this line has 'timestamp,key' fields"
        return f"key {line.strip()!r} contains whitespace"
    if "," not in line:
        return "mixed formats: line 1 has 'timestamp,key' fields but this line is a bare key"
    parts = line.split(",")
    if len(parts) != fields:  # more: a key holding the separator, as some of Twitter's cache traces have
        hint = f" (a key with a comma? keep only the lines of {fields} fields first, e.g. awk -F, 'NF=={fields}')"
        return f"expected {fields} fields as on the first line, got {len(parts)}{hint if len(parts) > fields else ''}"
    timestamp, key = parts[0].strip(), parts[1].strip()
    if not _NUM_RE.fullmatch(timestamp):
        hint = " (the header names the fields: choose them with --time-field and --key-field)" if header else ""
        return f"timestamp {timestamp!r} is not numeric{hint}"
    if not key:
        return "empty key after the comma"
    return f"key {key!r} contains whitespace"
