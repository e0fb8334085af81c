"""The offline store: one Parquet file per asset partition, on a local folder or any pyarrow filesystem URI.

Where it is comes from the caller (``LakeResource``, from ``PRECOMPUTE_LAKE_URI``): nothing here reads the
environment or guesses a folder.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..ml.model_store import fsync_path
from ..serving.urls import redact
from .tables import LAKE_SCHEMAS

SHAPE_KEY = b"precompute.shape"  # the file's rows and columns as written, in its key-value metadata


def _shape_problem(rows: int, names: list[str], metadata: dict | None, columns: list[str] | None) -> str | None:
    """How ``rows`` rows of columns ``names`` (read with ``columns``) differ from the shape the writer recorded in
    ``metadata``, or None (also for a file without the record: written before it, or not by us)."""
    recorded = (metadata or {}).get(SHAPE_KEY)
    if recorded is None:
        return None
    shape = json.loads(recorded)
    expected = shape["columns"] if columns is None else columns
    got = [str(name) for name in names]
    if rows != shape["rows"] or got != expected or not set(expected) <= set(shape["columns"]):
        return f"read {rows} rows of {got}, written as {shape['rows']} rows of {shape['columns']}"
    return None


STALE_TEMPORARY_S = 3600  # a temporary file this old is a killed write's: no write of one partition takes an hour


def _sweep_stale_temporaries(fs: pafs.FileSystem, folder: str, name: str | None = None) -> None:
    """Delete the temporary files of earlier writes of ``folder/name`` (``.name.tmp-*``, and ``name.tmp-*`` of older
    versions; of every partition in ``folder`` without ``name``) whose writer was killed before it could (SIGKILL,
    a lost machine): older than ``STALE_TEMPORARY_S``, so a concurrent writer's own is left alone. Without this,
    each killed write left its copy of the partition."""
    prefixes = (f".{name}.tmp-", f"{name}.tmp-") if name else None
    cutoff = time.time() - STALE_TEMPORARY_S
    with contextlib.suppress(OSError):
        for info in fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True)):
            stale = info.mtime is not None and info.mtime.timestamp() < cutoff
            ours = info.base_name.startswith(prefixes) if prefixes else ".parquet.tmp-" in info.base_name
            if info.type == pafs.FileType.File and ours and stale:
                fs.delete_file(info.path)


# A daily or an hourly partition key; the second of a DST fall-back's repeated hours carries its UTC offset.
DAY_KEY = re.compile(r"\d{4}-\d{2}-\d{2}(-\d{2}:\d{2}([+-]\d{4})?)?$")


def partitions_before(partitions: Iterable[str], before_day: str) -> list[str]:
    """The partition keys of days before ``before_day`` (YYYY-MM-DD): daily ``YYYY-MM-DD`` and hourly
    ``YYYY-MM-DD-HH:MM[+-HHMM]`` keys start with their day; any other key is never one of them."""
    return [key for key in partitions if DAY_KEY.match(key) and key[:10] < before_day]


class LakeReadError(ValueError):
    """A lake file that exists but cannot be read as Parquet: the message names it."""


class MissingColumnsError(KeyError):
    """A lake file without a column asked for (written before the column existed)."""


# The lake's sources that no asset writes: what writes them, for the error of reading one that is not there.
LOADED_BY = {
    "ads": "load the ad catalog with `precompute ads load FILE`",
    "ad_impressions": "load impressions with `precompute impressions load FILE`",
}


@dataclass(frozen=True)
class Lake:
    """Reads and writes ``{base}/{asset}/{partition}.parquet``; a write replaces the file atomically."""

    base_uri: str

    def __post_init__(self) -> None:
        if not self.base_uri or not self.base_uri.strip():
            raise ValueError("the lake needs a folder or URI: an empty one would be the working directory")

    @cached_property
    def _fs(self) -> tuple[pafs.FileSystem, str]:
        uri = self.base_uri if "://" in self.base_uri else str(Path(self.base_uri).resolve())
        try:
            return pafs.FileSystem.from_uri(uri)
        except (pa.ArrowException, ValueError) as error:  # its message repeats the URI: an S3 secret in its user info
            raise ValueError(f"the lake {redact(uri)} cannot be opened: {redact(str(error))}") from None

    def path(self, asset: str, partition: str | None = None) -> str:
        root = self._fs[1].rstrip("/")
        return f"{root}/{asset}/{partition or '__unpartitioned__'}.parquet"

    def write(self, asset: str, partition: str | None, table: pd.DataFrame | pa.Table) -> str:
        fs, _ = self._fs
        path = self.path(asset, partition)
        folder, name = path.rsplit("/", 1)
        fs.create_dir(folder, recursive=True)
        _sweep_stale_temporaries(fs, folder, name)
        if isinstance(table, pd.DataFrame):
            schema = LAKE_SCHEMAS.get(asset)
            known = schema is not None and set(table.columns) == set(schema.names)
            table = pa.Table.from_pandas(table, schema=schema if known else None, preserve_index=False)
        shape = {SHAPE_KEY: json.dumps({"rows": table.num_rows, "columns": table.column_names}).encode()}
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **shape})
        # Hidden (a leading dot), so that a reader of the whole folder (a pyarrow dataset, Spark, Hive) never reads the
        # temporary file of a write killed before its move as a second copy of the partition.
        tmp = f"{folder}/.{name}.tmp-{uuid.uuid4().hex}"
        try:
            # Page checksums: a flipped bit in a data page is an error when read, not a different value; the shape
            # (rows, columns) does the same for the footer, which no checksum covers.
            pq.write_table(table, tmp, filesystem=fs, compression="zstd", write_page_checksum=True)
            local = isinstance(fs, pafs.LocalFileSystem)
            if local:  # on disk before it is the partition: a power loss after the move never leaves an empty file
                fsync_path(tmp)
            fs.move(tmp, path)
            if local:  # ... and the move itself, an entry of the folder
                fsync_path(folder)
        except BaseException as error:
            # A failed write (disk full, interrupted) leaves the previous file as it was and no partial temp file
            # behind, which would otherwise hold the space a retry needs.
            with contextlib.suppress(OSError):
                fs.delete_file(tmp)
            if isinstance(error, OSError):  # say which file; the errno (ENOSPC, EDQUOT) stays for callers
                message = f"the lake could not write {path}: {error}"
                raise (OSError(error.errno, message) if error.errno else OSError(message)) from error
            raise
        return path

    def exists(self, asset: str, partition: str | None = None) -> bool:
        fs, _ = self._fs
        return fs.get_file_info(self.path(asset, partition)).type == pafs.FileType.File

    def partitions(self, asset: str) -> list[str]:
        """The partition keys of ``asset``'s files, sorted (temporary files of writes excluded)."""
        fs, _ = self._fs
        folder = self.path(asset).rsplit("/", 1)[0]
        return sorted(
            info.base_name.removesuffix(".parquet")
            for info in fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
            if info.type == pafs.FileType.File and info.base_name.endswith(".parquet") and info.base_name[0] != "."
        )

    def sweep_temporaries(self, asset: str) -> None:
        """Delete the stale temporary files of killed writes of any of ``asset``'s partitions: a partition written
        once (an hour of query logs) is never written again to sweep its own."""
        fs, _ = self._fs
        _sweep_stale_temporaries(fs, self.path(asset).rsplit("/", 1)[0])

    def delete(self, asset: str, partition: str | None = None) -> None:
        """Remove the file of ``asset``'s ``partition``, if there is one."""
        fs, _ = self._fs
        with contextlib.suppress(FileNotFoundError):
            fs.delete_file(self.path(asset, partition))

    def metadata(self, asset: str, partition: str | None = None) -> dict[bytes, bytes]:
        """The key-value metadata of a lake file's schema, as its writer's table had it (without reading data)."""
        fs, _ = self._fs
        path = self.path(asset, partition)
        try:
            return dict(pq.read_schema(path, filesystem=fs).metadata or {})
        except (pa.ArrowException, OSError) as error:
            raise LakeReadError(f"the lake cannot read {path} (corrupt or truncated?): {error}") from error

    def rows(self, asset: str, partition: str | None = None) -> int | None:
        """The rows a lake file was written with, from its metadata (None: written without it, by an old version)."""
        recorded = self.metadata(asset, partition).get(SHAPE_KEY)
        return None if recorded is None else int(json.loads(recorded)["rows"])

    def read(self, asset: str, partition: str | None = None, columns: list[str] | None = None) -> pd.DataFrame:
        return self._read(asset, partition, columns, pandas=True)

    def read_table(self, asset: str, partition: str | None = None, columns: list[str] | None = None) -> pa.Table:
        """``read`` without the conversion to pandas: an hour of string keys converts in several times the time it
        takes to read, and a count or a filter needs no Python object per row."""
        return self._read(asset, partition, columns, pandas=False)

    def _read(self, asset: str, partition: str | None, columns: list[str] | None, *, pandas: bool):
        fs, _ = self._fs
        path = self.path(asset, partition)
        try:
            with pq.ParquetFile(path, filesystem=fs, page_checksum_verification=True) as parquet:
                if columns is not None and (absent := [c for c in columns if c not in parquet.schema_arrow.names]):
                    raise MissingColumnsError(f"{path} has no column {', '.join(absent)}")
                table = parquet.read(columns=columns)
            data = table.to_pandas() if pandas else table
            names = list(data.columns) if pandas else table.column_names
            if problem := _shape_problem(len(data), names, table.schema.metadata, columns):
                raise ValueError(problem)
            return data
        except MissingColumnsError:
            raise
        except FileNotFoundError:
            what = f"{asset} partition {partition}" if partition else asset
            hint = f": {LOADED_BY[asset]}" if asset in LOADED_BY else ""
            raise FileNotFoundError(f"the lake has no {what} (no file {path}){hint}") from None
        except (pa.ArrowException, OSError, KeyError, TypeError, ValueError) as error:
            # truncated, a page whose checksum fails or that does not decode, a footer whose metadata does not parse
            raise LakeReadError(f"the lake cannot read {path} (corrupt or truncated?): {error}") from error
