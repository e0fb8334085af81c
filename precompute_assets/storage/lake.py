"""The offline store: one Parquet file per asset partition, on a local folder or any pyarrow filesystem URI.

Where it is comes from the caller (``LakeResource``, from ``PRECOMPUTE_LAKE_URI``): nothing here reads the
environment or guesses a folder.
"""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

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
        return pafs.FileSystem.from_uri(uri)

    def path(self, asset: str, partition: str | None = None) -> str:
        root = self._fs[1].rstrip("/")
        return f"{root}/{asset}/{partition or '__unpartitioned__'}.parquet"

    def write(self, asset: str, partition: str | None, table: pd.DataFrame | pa.Table) -> str:
        fs, _ = self._fs
        path = self.path(asset, partition)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        if isinstance(table, pd.DataFrame):
            table = pa.Table.from_pandas(table, preserve_index=False)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            pq.write_table(table, tmp, filesystem=fs, compression="zstd")
            fs.move(tmp, path)
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

    def read(self, asset: str, partition: str | None = None, columns: list[str] | None = None) -> pd.DataFrame:
        fs, _ = self._fs
        path = self.path(asset, partition)
        try:
            return pq.read_table(path, filesystem=fs, columns=columns).to_pandas()
        except FileNotFoundError:
            what = f"{asset} partition {partition}" if partition else asset
            hint = f": {LOADED_BY[asset]}" if asset in LOADED_BY else ""
            raise FileNotFoundError(f"the lake has no {what} (no file {path}){hint}") from None
