"""Fault: the lake's disk fills up during a write.

The asset fails with an error that says which file and why (ENOSPC), the partition's previous file stays the one
readers see, no partial or temporary Parquet file is left in the lake (it would hold the space a retry needs), and
the same materialization succeeds once there is room again.

Two tests: a real kernel ENOSPC from a size-limited tmpfs mounted inside the test's own temp folder (as root, where
mounting is allowed; unmounted on every exit path), and everywhere else a lake filesystem with a byte budget that
fails midway through the Parquet write, after part of the file has been written.
"""

import contextlib
import errno
import io
import os
import shutil
import subprocess
import time
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from precompute_assets.defs.resources import LakeResource, ParquetIOManager
from precompute_assets.storage.lake import Lake
from precompute_assets_tests.faults.figures import record

SMALL_ROWS, BIG_ROWS = 1_000, 400_000  # ~20 kB and ~5 MB of Parquet: random CTRs do not compress


class ScoresConfig(dg.Config):
    rows: int = SMALL_ROWS
    seed: int = 0


@dg.asset
def scores(config: ScoresConfig) -> pd.DataFrame:
    rng = np.random.default_rng(config.seed)
    ids = np.char.add("ad-", np.arange(config.rows).astype(str))
    return pd.DataFrame({"ad_id": ids, "ctr": rng.random(config.rows), "bid": rng.random(config.rows)})


def materialize(lake_root: Path, rows: int, seed: int) -> dg.ExecuteInProcessResult:
    lake = LakeResource(base_uri=str(lake_root))
    return dg.materialize(
        [scores],
        resources={"io_manager": ParquetIOManager(lake=lake)},
        run_config={"ops": {"scores": {"config": {"rows": rows, "seed": seed}}}},
        raise_on_error=False,
    )


def failure_text(result: dg.ExecuteInProcessResult) -> str:
    """The step failure as the UI shows it: the error and its causes."""
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    error = failure.step_failure_data.error
    parts = []
    while error is not None:
        parts.append(error.message)
        error = error.cause
    return "\n".join(parts)


def error_line(text: str) -> str:
    return next(line for line in text.splitlines() if "could not write" in line)[:300]


def lake_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def check_fault(lake_root: Path, before: pd.DataFrame, result: dg.ExecuteInProcessResult) -> str:
    """What every disk-full write must leave: a failed step naming the file and ENOSPC, the old file intact."""
    assert not result.success
    text = failure_text(result)
    assert "No space left on device" in text, text
    assert "the lake could not write" in text and "scores/__unpartitioned__.parquet" in text, text
    # Only the previous, complete file: no partial Parquet, no temporary file.
    assert lake_files(lake_root) == ["scores/__unpartitioned__.parquet"]
    pd.testing.assert_frame_equal(Lake(str(lake_root)).read("scores"), before)
    return text


# --- a real full disk ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(mountpoint: Path, size: str):
    """A size-limited tmpfs at ``mountpoint`` (inside our temp folder), unmounted whatever happens."""
    mountpoint.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(mountpoint)],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        if subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


def used_bytes(path: Path) -> int:
    usage = shutil.disk_usage(path)
    return usage.total - usage.free


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="mounting a tmpfs needs root")
def test_a_full_disk_fails_the_asset_clearly_and_leaves_no_partial_parquet(tmp_path, record_property):
    with tmpfs(tmp_path / "disk", "1m") as disk:
        lake_root = disk / "lake"
        assert materialize(lake_root, SMALL_ROWS, seed=1).success
        before = Lake(str(lake_root)).read("scores")
        used_before = used_bytes(disk)

        started = time.perf_counter()
        result = materialize(lake_root, BIG_ROWS, seed=2)  # ~5 MB onto a 1 MB disk
        seconds_to_failure = time.perf_counter() - started
        text = check_fault(lake_root, before, result)
        leaked = used_bytes(disk) - used_before
        assert leaked == 0  # the partial temporary file was deleted: the space is free again

        # Recovery: once there is room (here: a bigger disk), the same materialization succeeds.
        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True, capture_output=True)
        assert materialize(lake_root, BIG_ROWS, seed=2).success
        assert len(Lake(str(lake_root)).read("scores")) == BIG_ROWS
        assert lake_files(lake_root) == ["scores/__unpartitioned__.parquet"]

    record(
        record_property,
        "lake disk full (real tmpfs ENOSPC)",
        disk_bytes=1 << 20,
        seconds_to_failure=round(seconds_to_failure, 3),
        leaked_bytes=leaked,
        visible_files_after=1,
        previous_version_intact=True,
        error=error_line(text),
    )


# --- a budgeted filesystem, failing midway ---------------------------------------------------------------------


class BudgetWriter(io.RawIOBase):
    """A file that takes bytes until the disk's budget is spent, then raises ENOSPC (after a partial write)."""

    def __init__(self, path: str, disk: "BudgetDisk") -> None:
        self._file = open(path, "wb")  # noqa: SIM115 - closed by close()
        self._disk = disk

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        data = bytes(data)
        room = self._disk.capacity - self._disk.used()
        if len(data) > room:
            self._file.write(data[: max(room, 0)])
            self._file.flush()
            self._disk.partial_writes += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._file.write(data)

    def close(self) -> None:
        self._file.close()
        super().close()


class BudgetDisk(pafs.FileSystemHandler):
    """The local filesystem under ``root``, as if it were a disk of ``capacity`` bytes."""

    def __init__(self, root: Path, capacity: int) -> None:
        self.root, self.capacity, self.partial_writes = root, capacity, 0
        self.local = pafs.LocalFileSystem()

    def used(self) -> int:
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())

    def open_output_stream(self, path, metadata):
        return pa.PythonFile(BudgetWriter(path, self), mode="w")

    # everything else is the local filesystem
    def get_type_name(self):
        return "budget-disk"

    def equals(self, other):
        return self is other

    def get_file_info(self, paths):
        return self.local.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.local.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.local.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.local.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.local.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise OSError("refusing to delete the root")

    def delete_file(self, path):
        self.local.delete_file(path)

    def move(self, src, dest):
        self.local.move(src, dest)

    def copy_file(self, src, dest):
        self.local.copy_file(src, dest)

    def open_input_stream(self, path):
        return self.local.open_input_stream(path)

    def open_input_file(self, path):
        return self.local.open_input_file(path)

    def open_append_stream(self, path, metadata):
        raise NotImplementedError

    def normalize_path(self, path):
        return path


def test_a_write_that_runs_out_of_space_midway_leaves_the_previous_file(tmp_path, monkeypatch, record_property):
    lake_root = tmp_path / "lake"
    assert materialize(lake_root, SMALL_ROWS, seed=1).success
    before = Lake(str(lake_root)).read("scores")
    used_before = sum(p.stat().st_size for p in lake_root.rglob("*") if p.is_file())

    disk = BudgetDisk(lake_root, capacity=used_before + 256 * 1024)  # 256 kB free: the 5 MB write fails midway
    monkeypatch.setattr(Lake, "_fs", property(lambda self: (pafs.PyFileSystem(disk), str(lake_root))))
    started = time.perf_counter()
    result = materialize(lake_root, BIG_ROWS, seed=2)
    seconds_to_failure = time.perf_counter() - started
    text = check_fault(lake_root, before, result)
    assert disk.partial_writes >= 1  # it did fail midway, with part of the file on disk
    leaked = disk.used() - used_before
    assert leaked == 0  # ... and that part is gone again

    disk.capacity = 1 << 30  # room again: the same materialization succeeds
    assert materialize(lake_root, BIG_ROWS, seed=2).success
    assert lake_files(lake_root) == ["scores/__unpartitioned__.parquet"]
    record(
        record_property,
        "lake disk full midway (budgeted filesystem)",
        free_bytes=256 * 1024,
        seconds_to_failure=round(seconds_to_failure, 3),
        leaked_bytes=leaked,
        partial_writes=disk.partial_writes,
        error=error_line(text),
    )
