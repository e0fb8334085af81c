"""Fault: ``precompute impressions load`` (replacing its days, and with ``--append``) is SIGKILLed at each kind of its
lake writes (the quarantine's, the first and the last day's), before the Parquet file is written and right after (its
temporary file whole, not yet moved into place), then run again.

Each day and the quarantine then hold the file's rows exactly once, also for a reader of the whole folder (a pyarrow
dataset, as a user would read a lake asset: files named ``.*`` are hidden from it), and the temporary files of killed
writes do not pile up: the next write of a partition sweeps away its own stale ones.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from precompute_assets.storage.lake import Lake
from precompute_assets_tests.faults.killing import run_killed

WRITE = "pyarrow.parquet:write_table"
DAY_MS = 86_400_000
T0 = 1_795_000_000_000  # 2026-11-18 UTC
CLI = """
import sys
from precompute_assets.tools.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture
def impressions(tmp_path: Path) -> Path:
    """Three days of 20 impressions, and 4 rows to quarantine."""
    lines = [f"{T0 + d * DAY_MS + i * 60_000},ad{i},{i % 2}" for d in range(3) for i in range(20)]
    lines += [f"{T0 // 1000},bad,0", f"{T0},bad,7", f"{T0},,1", "x,y,z"]
    path = tmp_path / "impressions.csv"
    path.write_text("ts_ms,ad_id,clicked\n" + "\n".join(lines) + "\n")
    return path


def folder_rows(folder: Path) -> int:
    """Rows of every Parquet file a dataset reader finds in ``folder``."""
    return ds.dataset(folder, format="parquet").count_rows() if folder.exists() else 0


@pytest.mark.parametrize("mode", [[], ["--append"]])
@pytest.mark.parametrize("after", [False, True])
def test_an_impressions_load_killed_at_any_write_then_run_again_holds_each_row_once(tmp_path, impressions, mode, after):
    env = {"PRECOMPUTE_HOME": str(tmp_path / "home"), "PRECOMPUTE_TIMEZONE": "UTC",
           "PRECOMPUTE_PARTITIONS_START": "2026-01-01"}  # fmt: skip
    command = ["impressions", "load", str(impressions), *mode]
    lake = Lake(str(tmp_path / "home" / "lake"))
    clean = run_killed(CLI, command, [WRITE], None, env=env)
    writes = clean.calls
    assert writes == 4  # the quarantine, then three days
    # The quarantine's write, and the first and the last day's: the middle day's only repeats a day's write between
    # two others (each point is two runs of the CLI).
    for at in (1, 2, writes):
        for asset in ("ad_impressions", "ad_impressions_quarantine"):
            for file in Path(lake.path(asset, "x")).parent.glob("*"):
                file.unlink()
        assert run_killed(CLI, command, [WRITE], at, after=after, env=env).killed
        run_killed(CLI, command, [WRITE], None, env=env)  # the same command again
        days = {day: len(lake.read("ad_impressions", day)) for day in ("2026-11-18", "2026-11-19", "2026-11-20")}
        assert days == {"2026-11-18": 20, "2026-11-19": 20, "2026-11-20": 20}, f"killed at write {at}"
        assert folder_rows(Path(lake.path("ad_impressions", "x")).parent) == 60, f"killed at write {at}"
        assert folder_rows(Path(lake.path("ad_impressions_quarantine", "x")).parent) == 4, f"killed at write {at}"


def test_the_temporary_files_of_killed_writes_are_swept_by_the_next_write(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    path = Path(lake.path("ads"))
    code = "import sys\nfrom precompute_assets.storage.lake import Lake\nLake(sys.argv[1]).write('ads', None, "
    code += "__import__('pandas').DataFrame({'ad_id': ['a']}))\n"
    for _ in range(3):
        assert run_killed(code, [str(tmp_path / "lake")], [WRITE], 1, after=True).killed
    stale = [file for file in path.parent.iterdir() if file != path]
    assert len(stale) == 3 and all(file.name.startswith(".") for file in stale)  # hidden from folder readers
    old = time.time() - 2 * 3600
    os.utime(stale[0], (old, old))  # its writer is long dead
    lake.write("ads", None, __import__("pandas").DataFrame({"ad_id": ["b"]}))
    assert sorted(path.parent.iterdir()) == sorted([path, *stale[1:]])  # the recent ones may be a live writer's


DOCS_LOAD = """
import json, sys
import precompute_assets.storage.documents as documents
documents.CHUNK_ROWS = 100  # several COPYs of one transaction
documents.QUARANTINE_BATCH_ROWS = 1  # its rejected line is written to the quarantine table before the first COPY
result = documents.DocumentStore(sys.argv[1]).load_file(sys.argv[2])
print(json.dumps({"inserted": result.inserted, "rejected": result.rejected, "duplicates": result.duplicates}))
"""


def quarantined(app_db: str) -> list[tuple[str, str]]:
    """(position, raw) of every row the documents' loads quarantined."""
    import psycopg2

    from precompute_assets.storage.postgres import libpq_url

    with psycopg2.connect(libpq_url(app_db)) as conn, conn.cursor() as cur:
        cur.execute("SELECT position, raw FROM documents_quarantine ORDER BY load_id, number")
        rows = cur.fetchall()
    conn.close()
    return rows


def test_a_docs_load_killed_at_any_copy_loads_nothing_and_the_same_file_again_loads_it_once(app_db, tmp_path):
    from precompute_assets.storage.documents import DocumentStore

    lines = [json.dumps({"doc_id": f"d{i}", "title": "t", "body": f"body {i}"}) for i in range(450)]
    lines[7] = "{not json"  # a malformed line: rejected, once per load
    lines.append(json.dumps({"doc_id": "d3", "title": "t", "body": "the last d3 wins"}))
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    store = DocumentStore(app_db)
    store.ensure_schema()
    copies = "precompute_assets.storage.documents:copy_in"
    # COPY 1 quarantines the malformed line, 2 to 6 stage the documents: kill before the first, a middle and the last
    # COPY of documents, each after the quarantine's, all in the load's one transaction
    for at in (2, 4, 6):
        assert run_killed(DOCS_LOAD, [app_db, str(path)], [copies], at).killed
        assert store.count() == 0, f"killed at COPY {at}: a killed load left rows"
        assert quarantined(app_db) == [], f"killed at COPY {at}: a killed load left quarantined rows"
    outcome = run_killed(DOCS_LOAD, [app_db, str(path)], [copies], None)
    again = json.loads(outcome.stdout)
    assert outcome.calls == 6
    assert again == {"inserted": 449, "rejected": 1, "duplicates": 1}
    assert store.count() == 449
    assert quarantined(app_db) == [("line 8", "{not json")]
    assert [row.body for row in store.changed_since(None, limit=500) if row.doc_id == "d3"] == ["the last d3 wins"]
