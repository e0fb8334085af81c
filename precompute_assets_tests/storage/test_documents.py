"""DocumentStore against the real embedded PostgreSQL; each test gets a table of its own."""

from __future__ import annotations

import gzip
import json
import time
import uuid
from pathlib import Path

import pandas as pd
import psycopg2
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from precompute_assets.storage.documents import (
    DROP_SUPERSEDED,
    DocumentFields,
    DocumentFileError,
    DocumentStore,
    is_known_language,
    primary_language,
)
from precompute_assets.storage.postgres import libpq_url
from precompute_assets.workload.documents import generate_documents


@pytest.fixture
def store(app_db_url: str) -> DocumentStore:
    documents = DocumentStore(app_db_url, table=f"documents_{uuid.uuid4().hex[:10]}")
    documents.ensure_schema()
    return documents


def frame(*rows: tuple) -> pd.DataFrame:
    # object dtype: pandas' Arrow-backed strings cannot even hold the lone surrogates some tests need
    return pd.DataFrame(list(rows), columns=["doc_id", "title", "body", "language"], dtype=object)


def scan_all(store: DocumentStore, limit: int) -> list[str]:
    ids: list[str] = []
    watermark = None
    while page := store.changed_since(watermark, limit=limit):
        ids.extend(row.doc_id for row in page)
        watermark = page[-1].watermark
    return ids


def quarantine_rows(store: DocumentStore, load_id: str | None = None) -> list[tuple[str, str, str | None]]:
    """(position, reason, raw) of the quarantine table's rows, of one load or of all, in file order."""
    with psycopg2.connect(libpq_url(store.url)) as conn, conn.cursor() as cur:
        where = "WHERE load_id = %s" if load_id else ""
        cur.execute(
            f"SELECT position, reason, raw FROM {store.quarantine_table} {where} ORDER BY load_id, number",
            (load_id,) if load_id else None,
        )
        rows = cur.fetchall()
    conn.close()
    return rows


def raw_of(store: DocumentStore, load_id: str | None) -> dict[str, str | None]:
    """The raw text of each quarantined row of a load, by its position."""
    return {position: raw for position, _, raw in quarantine_rows(store, load_id)}


def test_schema_is_idempotent_and_indexed(store: DocumentStore, app_db_url: str) -> None:
    store.ensure_schema()
    with psycopg2.connect(libpq_url(app_db_url)) as conn, conn.cursor() as cur:
        cur.execute("SELECT indexdef FROM pg_indexes WHERE tablename = %s", (store.table,))
        indexes = [row[0] for row in cur.fetchall()]
    conn.close()
    assert any("(modified_at, doc_id)" in definition for definition in indexes)


def test_load_inserts_then_only_changed_rows_are_updated(store: DocumentStore) -> None:
    first = store.load_frame(frame(("a", "t", "b", "en"), ("b", "t", "b", "de"), ("c", None, "x", "fr")))
    assert (first.inserted, first.updated, first.unchanged, first.rejected) == (3, 0, 0, 0)
    before = {row.doc_id: row.modified_at for row in store.changed_since(None, limit=10)}

    again = store.load_frame(frame(("a", "t", "b", "en"), ("b", "t", "changed", "de"), ("c", None, "x", "fr")))
    assert (again.inserted, again.updated, again.unchanged) == (0, 1, 2)
    after = {row.doc_id: row for row in store.changed_since(None, limit=10)}
    assert after["a"].modified_at == before["a"] and after["c"].modified_at == before["c"]
    assert after["b"].modified_at > before["b"] and after["b"].body == "changed"
    assert after["c"].title is None  # NULL stays NULL; an unchanged NULL is not a change
    assert store.count() == 3


def test_duplicates_in_one_load_last_occurrence_wins(store: DocumentStore, tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    lines = [
        {"doc_id": "d1", "title": "first", "body": "x", "language": "en"},
        {"doc_id": "d2", "title": "only", "body": "y", "language": "en"},
        {"doc_id": "d1", "title": "second", "body": "x", "language": "en"},
        {"doc_id": "d1", "title": "third", "body": "x", "language": "en"},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    result = store.load_file(path)
    assert (result.rows, result.inserted, result.duplicates) == (4, 2, 2)
    rows = {row.doc_id: row for row in store.changed_since(None, limit=10)}
    assert rows["d1"].title == "third"


def test_a_rejected_last_row_leaves_its_document_as_it_was(store: DocumentStore, tmp_path: Path) -> None:
    """The last row of an id decides: when it is quarantined, the rows it superseded are not loaded in its place (a
    stale earlier row overwrote the stored document, counted as no duplicate; h_embed)."""
    store.load_file(write_jsonl(tmp_path / "first.jsonl", [{"doc_id": "d1", "body": "current good text"}]))
    lines = [
        {"doc_id": "d1", "body": "stale text"},
        {"doc_id": "new", "body": "version one"},
        {"doc_id": "d1", "body": "newest \u0000 text"},
        {"doc_id": "new", "body": "version two \u0000"},
        {"doc_id": "kept", "body": "old"},
        {"doc_id": "kept", "body": "bad \u0000"},
        {"doc_id": "kept", "body": "newest kept"},
    ]
    result = store.load_file(write_jsonl(tmp_path / "second.jsonl", lines))
    assert (result.rows, result.inserted, result.updated, result.duplicates, result.rejected) == (7, 1, 0, 3, 3)
    assert result.unchanged == 0
    rows = {row.doc_id: row.body for row in store.changed_since(None, limit=10)}
    assert rows == {"d1": "current good text", "kept": "newest kept"}


def test_a_row_rejected_for_its_shape_keeps_its_documents_last_word_in_every_format(
    store: DocumentStore, tmp_path: Path
) -> None:
    """A CSV or TSV row with another number of fields is rejected by the reader: an earlier, stale row of its id
    still overwrote the stored document (h_diff12). A rejected row whose id could not be stored (a NUL, a lone
    surrogate) aborted the whole load (h_diff12): it supersedes nothing, and the rest loads."""
    store.load_file(write_jsonl(tmp_path / "first.jsonl", [{"doc_id": i, "body": f"{i}0"} for i in "bc"]))
    csv_file = tmp_path / "docs.csv"
    csv_file.write_text("doc_id,title,body,language\nb,B,stale b,en\nb,B,new b,en,extra\nd,D,d,en\n")
    result = store.load_file(csv_file)
    assert (result.inserted, result.updated, result.duplicates, result.rejected) == (1, 0, 1, 1)
    tsv_file = tmp_path / "docs.tsv"
    tsv_file.write_text("doc_id\ttitle\tbody\tlanguage\nc\tC\tstale c\ten\nc\tC\tnew c\n")
    result = store.load_file(tsv_file)
    assert (result.updated, result.duplicates, result.rejected) == (0, 1, 1)
    unstorable = tmp_path / "unstorable.jsonl"
    unstorable.write_text(
        '{"doc_id": "ok1", "body": "b"}\n{"doc_id": "a\\u0000b", "title": ["x"], "body": "b"}\n'
        '{"doc_id": "a\\ud800b", "title": {"x": 1}, "body": "b"}\n'
    )
    result = store.load_file(unstorable)
    assert (result.inserted, result.rejected) == (1, 2)
    rows = {row.doc_id: row.body for row in store.changed_since(None, limit=10)}
    assert rows == {"b": "b0", "c": "c0", "d": "d", "ok1": "b"}


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(record) for record in records) + "\n")
    return path


def test_first_rejections_are_in_file_order(store: DocumentStore, tmp_path: Path) -> None:
    """A malformed line is rejected as it is read and a refused row once its chunk is read: the summary's first
    rejections listed lines 5, 6 before line 4 (h_embed)."""
    path = tmp_path / "docs.jsonl"
    path.write_text(
        '{"doc_id": "a", "body": "x"}\n{"doc_id": "b", "body": "x"}\n{"doc_id": "c", "body": "x"}\n'
        '{"body": "no id"}\n{"doc_id": \n[1]\n'
    )
    result = store.load_file(path)
    assert [r.where for r in result.first_rejections()] == ["line 4", "line 5", "line 6"]
    assert [r.where for r in result.first_rejections(2)] == ["line 4", "line 5"]


def plan_rows(node: dict) -> int:
    """The most rows any node of an EXPLAIN ANALYZE plan produced or filtered away."""
    removed = node.get("Rows Removed by Join Filter", 0) + node.get("Rows Removed by Filter", 0)
    own = node.get("Actual Rows", 0) + removed
    return max([own, *(plan_rows(child) for child in node.get("Plans", []))])


def test_dropping_a_loads_duplicates_does_work_in_proportion_to_its_rows(app_db_url: str) -> None:
    # A wrong --id-field (a language, a title) gives a load few ids of many rows each: a self-join of the staged rows
    # on doc_id matched every pair of them, hours for a million rows. Here 3,000 rows of one id: 4.5M pairs before.
    n = 3_000
    with psycopg2.connect(libpq_url(app_db_url)) as conn, conn.cursor() as cur:
        cur.execute('CREATE TEMP TABLE staging (seq BIGINT, doc_id TEXT COLLATE "C", title TEXT) ON COMMIT DROP')
        cur.execute('CREATE TEMP TABLE rejected_ids (seq BIGINT, doc_id TEXT COLLATE "C") ON COMMIT DROP')
        cur.execute("INSERT INTO staging SELECT i, CASE WHEN i %% 1000 = 0 THEN 'b' ELSE 'a' END, i::text"
                    " FROM generate_series(1, %s) i", (n,))  # fmt: skip
        cur.execute("ANALYZE staging")
        cur.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + DROP_SUPERSEDED)
        plan = cur.fetchone()[0][0]["Plan"]
        cur.execute("SELECT doc_id, title FROM staging ORDER BY doc_id")
        assert cur.fetchall() == [("a", str(n - 1)), ("b", str(n))]
    assert plan_rows(plan) <= 3 * n


def test_malformed_lines_and_missing_ids_are_rejected_not_fatal(store: DocumentStore, tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_bytes(
        b'{"doc_id": "ok1", "title": "a", "body": "b", "language": "en"}\n'
        b'{"doc_id": "broken", "title": \n'  # line 2: truncated JSON
        b"\n"  # blank lines are skipped, not rejected
        b'{"title": "no id", "body": "b", "language": "en"}\n'  # line 4
        b'{"doc_id": "bad-utf8", "title": "\xff\xfe"}\n'  # line 5
        b"[1, 2, 3]\n"  # line 6
        b'{"doc_id": "nul", "title": "a\\u0000b"}\n'  # line 7: PostgreSQL text cannot hold NUL
        b'{"doc_id": "surrogate", "body": "x\\ud800y"}\n'  # line 8: valid JSON, not storable text
        b'{"doc_id": "ok2", "title": "a", "body": "b", "language": "ja"}\n'
        b'{"doc_id": ["x"], "title": "a"}\n'  # line 10: a list is no id (its repr would be stored)
        b'{"doc_id": "obj", "title": {"a": 1}, "body": [1, 2]}\n'  # line 11: nor text
        b'{"doc_id": 12, "title": 3.5, "body": "numbers are text"}\n'  # line 12: stored as "12", "3.5"
    )
    result = store.load_file(path)
    assert result.inserted == 3 and result.rejected == 8 and result.rows == 11
    reasons = {r.where: r.reason for r in result.rejections}
    assert reasons["line 2"].startswith("malformed JSON")
    assert reasons["line 4"] == "missing doc_id"
    assert reasons["line 5"].startswith("malformed JSON")
    assert reasons["line 6"] == "not a JSON object"
    assert "NUL" in reasons["line 7"]
    assert reasons["line 8"] == "body: invalid UTF-8 (lone surrogate)"
    assert reasons["line 10"] == "doc_id: must be text or a number, got list"
    assert reasons["line 11"] == "title: must be text or a number, got dict"
    assert sorted(scan_all(store, 10)) == ["12", "ok1", "ok2"]
    # every rejected line is quarantined with its reason: the line as read, or the values of a record that parsed
    assert result.quarantined == 8 and result.quarantine_table == f"{store.table}_quarantine"
    quarantined = quarantine_rows(store, result.load_id)
    assert [(where, reason) for where, reason, _ in quarantined] == sorted(
        ((r.where, r.reason) for r in result.rejections), key=lambda rejection: int(rejection[0].split()[1])
    )
    assert {where: raw for where, _, raw in quarantined} == {
        "line 2": '{"doc_id": "broken", "title": ',
        "line 4": '{"doc_id": null, "title": "no id", "body": "b", "language": "en"}',
        "line 5": '{"doc_id": "bad-utf8", "title": "\\xff\\xfe"}',  # the bytes that are not UTF-8, visible
        "line 6": "[1, 2, 3]",
        "line 7": '{"doc_id": "nul", "title": "a\\u0000b", "body": null, "language": null}',
        "line 8": '{"doc_id": "surrogate", "title": null, "body": "x\\ud800y", "language": null}',
        "line 10": '{"doc_id": ["x"], "title": "a", "body": null, "language": null}',
        "line 11": '{"doc_id": "obj", "title": {"a": 1}, "body": [1, 2], "language": null}',
    }


def test_frame_rows_without_id_or_with_lone_surrogates_are_rejected(store: DocumentStore) -> None:
    result = store.load_frame(
        frame(
            ("a", "t", "b", "en"),
            (None, "t", "b", "en"),
            ("  ", "t", "b", "en"),
            ("s", "bad \ud800", "b", "en"),
        )
    )
    assert result.inserted == 1 and result.rejected == 3
    assert [r.where for r in result.rejections] == ["row 1", "row 2", "row 3"]
    assert "surrogate" in result.rejections[2].reason
    assert raw_of(store, result.load_id) == {
        "row 1": '{"doc_id": null, "title": "t", "body": "b", "language": "en"}',
        "row 2": '{"doc_id": "  ", "title": "t", "body": "b", "language": "en"}',
        "row 3": '{"doc_id": "s", "title": "bad \\ud800", "body": "b", "language": "en"}',
    }


@pytest.mark.parametrize("other", ["text", 7], ids=["arrow-path", "row-path"])
def test_ids_that_cannot_be_cache_keys_are_rejected(store: DocumentStore, other: object) -> None:
    # The embedding sync writes every doc_id into Redis, whose keys refuse these: one such id stopped every sync.
    url = "https://en.wikipedia.org/wiki/" + "A" * 300
    result = store.load_frame(
        frame(
            (other, "t", "b", "en"),
            (url, "t", "b", "en"),
            ("{3F2504E0-4F89}", "t", "b", "en"),
            ("a\tb", "t", "b", "en"),
        )
    )
    assert result.inserted == 1 and result.rejected == 3
    assert [(r.where, r.reason) for r in result.rejections] == [
        ("row 1", "doc_id: longer than 256 characters"),
        ("row 2", "doc_id: character '{' at 0 (control characters and braces cannot be served)"),
        ("row 3", "doc_id: character '\\t' at 1 (control characters and braces cannot be served)"),
    ]
    assert scan_all(store, 10) == [str(other)]


def test_bytes_are_read_as_utf8_text_on_either_path(store: DocumentStore) -> None:
    # Arrow reads a column of bytes alone as UTF-8 text; beside a number the row-by-row path must agree.
    alone = store.load_frame(frame((b"b1", b"t", "b", "en")))
    mixed = store.load_frame(frame((b"b2", b"t", "b", "en"), (3, "t", "b", "en"), (b"b\xff", "t", "b", "en")))
    assert alone.inserted == 1 and mixed.inserted == 2 and mixed.rejected == 1
    assert mixed.rejections[0].reason == "doc_id: invalid UTF-8 (lone surrogate)"
    assert sorted(scan_all(store, 10)) == ["3", "b1", "b2"]


def test_whole_numbers_read_as_floats_are_ids_as_csv_writes_them(store: DocumentStore, tmp_path: Path) -> None:
    # pandas stores an integer column with a missing value as float64: its ids were "101.0", not the CSV's "101".
    pd.DataFrame({"doc_id": [101.0, 102.0, float("nan")], "body": ["a", "b", "c"]}).to_parquet(tmp_path / "d.parquet")
    assert store.load_file(tmp_path / "d.parquet").rejected == 1
    (tmp_path / "d.jsonl").write_text('{"doc_id": 103.0, "body": "j"}\n{"doc_id": 1.5, "body": "k"}\n')
    assert store.load_file(tmp_path / "d.jsonl").inserted == 2
    assert sorted(scan_all(store, 10)) == ["1.5", "101", "102", "103"]


def test_int64_ids_beside_a_null_in_parquet_stay_exact(store: DocumentStore, tmp_path: Path) -> None:
    # Read as float64, tweet-like ids beside one missing id became "1.5e+18": two documents merged into one.
    ids = pa.array([1_500_000_000_000_000_001, 1_500_000_000_000_000_002, None, 2**53 + 1], pa.int64())
    pq.write_table(pa.table({"doc_id": ids, "body": ["one", "two", "no id", "big"]}), tmp_path / "d.parquet")
    result = store.load_file(tmp_path / "d.parquet")
    assert (result.inserted, result.duplicates, result.rejected) == (3, 0, 1)
    assert sorted(scan_all(store, 10)) == ["1500000000000000001", "1500000000000000002", "9007199254740993"]


def test_parquet_rows_are_named_from_1_as_the_other_loaders_name_them(store: DocumentStore, tmp_path: Path) -> None:
    # `docs load` named a Parquet file's first row "row 0" and its third "row 2", where `ads load`, `impressions
    # load` and `replay` say "row 1" and "row 3": a user looked at the wrong row.
    ids = pa.array([None, "b", "a{b", "c"], pa.string())
    pq.write_table(pa.table({"doc_id": ids, "body": ["x", "y", "z", "w"]}), tmp_path / "d.parquet")
    result = store.load_file(tmp_path / "d.parquet")
    assert [r.where for r in result.rejections] == ["row 1", "row 3"]
    assert quarantine_rows(store, result.load_id) == [
        ("row 1", "missing doc_id", '{"doc_id": null, "title": null, "body": "x", "language": null}'),
        ("row 3", "doc_id: character '{' at 1 (control characters and braces cannot be served)",
         '{"doc_id": "a{b", "title": null, "body": "z", "language": null}'),
    ]  # fmt: skip


def test_parquet_rows_refused_are_quarantined_with_their_values_as_read(store: DocumentStore, tmp_path: Path) -> None:
    # a list column: the rows are judged one by one, and their values kept as JSON (numbers, lists), not as text
    table = pa.table(
        {
            "doc_id": pa.array([1, 2, None, 4], pa.int64()),
            "title": pa.array([["a", "b"], None, None, None], pa.list_(pa.string())),
            "body": pa.array([b"x", b"y\x00", b"\xffz", b"w"], pa.binary()),
        }
    )
    pq.write_table(table, tmp_path / "d.parquet")
    result = store.load_file(tmp_path / "d.parquet")
    assert (result.inserted, result.rejected, result.quarantined) == (1, 3, 3)
    assert quarantine_rows(store, result.load_id) == [
        ("row 1", "title: must be text or a number, got ndarray",
         '{"doc_id": 1, "title": ["a", "b"], "body": "x", "language": null}'),
        ("row 2", "body: contains a NUL character",
         '{"doc_id": 2, "title": null, "body": "y\\u0000", "language": null}'),
        ("row 3", "missing doc_id", '{"doc_id": null, "title": null, "body": "\\udcffz", "language": null}'),
    ]  # fmt: skip
    assert scan_all(store, 10) == ["4"]


def test_unknown_languages_are_stored_and_counted(store: DocumentStore) -> None:
    result = store.load_frame(
        frame(("a", "t", "b", "en"), ("b", "t", "b", "xx"), ("c", "t", "b", "xx"), ("d", "t", "b", "klingon"))
    )
    assert result.inserted == 4
    assert result.unknown_languages == {"xx": 2, "klingon": 1}
    languages = {row.doc_id: row.language for row in store.changed_since(None, limit=10)}
    assert languages["d"] == "klingon"


@pytest.mark.parametrize(
    "tag", ["en", "EN", "pt-BR", "pt_BR", "zh-Hans", "sr-Cyrl", "zh-Hant-TW", "ZH-hant-tw", "de-DE-1996",
            "en-US-u-ca-gregory", "en-x-twain", "es-419"],
)  # fmt: skip
def test_bcp47_tags_of_known_languages_are_known(tag: str) -> None:
    assert is_known_language(tag)


@pytest.mark.parametrize(
    "tag", ["", "x", "123", "en-", "-en", "en--US", "en US", " en", "pt-BRR1", "en-toolongsubtag", "xx", "xx-YY",
            "fil", "klingon", "i-klingon", "x-private"],
)  # fmt: skip
def test_malformed_tags_and_unknown_primary_languages_are_unknown(tag: str) -> None:
    assert not is_known_language(tag)


def test_primary_subtag_decides() -> None:
    assert [primary_language(t) for t in ("pt-BR", "zh_Hant_TW", "SR-Cyrl", "xx-YY", "en-")] == [
        "pt", "zh", "sr", "xx", None,
    ]  # fmt: skip


def test_region_and_script_tags_are_not_counted_as_unknown(store: DocumentStore) -> None:
    result = store.load_frame(
        frame(("a", "t", "b", "pt-BR"), ("b", "t", "b", "zh-Hans"), ("c", "t", "b", "sr-Cyrl"),
              ("d", "t", "b", "zh-Hant-TW"), ("e", "t", "b", "pt_br"), ("f", "t", "b", "EN"),
              ("g", "t", "b", "x"), ("h", "t", "b", "123"), ("i", "t", "b", "xx-YY"), ("j", "t", "b", "123"))
    )  # fmt: skip
    assert result.inserted == 10
    assert result.unknown_languages == {"123": 2, "x": 1, "xx-YY": 1}
    languages = {row.doc_id: row.language for row in store.changed_since(None, limit=20)}
    assert languages["e"] == "pt_br" and languages["b"] == "zh-Hans"  # stored as given


def test_delete_then_recreate(store: DocumentStore) -> None:
    store.load_frame(frame(("a", "t", "b", "en"), ("b", "t", "b", "en")))
    assert store.delete(["a", "missing"]) == 1
    assert store.delete(["a"]) == 0  # already deleted: no second bump
    assert store.count() == 1 and store.count(include_deleted=True) == 2
    deleted = {row.doc_id: row for row in store.changed_since(None, limit=10)}["a"]
    assert deleted.deleted

    # the same content again re-creates the document: a change, with a later modified_at
    result = store.load_frame(frame(("a", "t", "b", "en")))
    assert (result.inserted, result.updated) == (0, 1)
    row = {row.doc_id: row for row in store.changed_since(None, limit=10)}["a"]
    assert not row.deleted and row.modified_at > deleted.modified_at
    assert store.count() == 2


def test_a_deleted_document_keeps_no_text(store: DocumentStore) -> None:
    """A churning corpus kept the title and body of every document it ever deleted: only the tombstone stays."""
    store.load_frame(frame(("a", "title a", "x" * 10_000, "en"), ("b", "title b", "body b", "en")))
    store.delete(["a"])
    rows = {row.doc_id: row for row in store.changed_since(None, limit=10)}
    assert rows["a"].deleted and (rows["a"].title, rows["a"].body) == (None, None)
    assert (rows["b"].title, rows["b"].body) == ("title b", "body b")
    store.load_frame(frame(("a", "title a", "back", "en")))  # re-created: its new text
    again = {row.doc_id: row for row in store.changed_since(None, limit=10)}["a"]
    assert not again.deleted and (again.title, again.body) == ("title a", "back")


def test_keyset_scan_never_skips_or_repeats_under_equal_timestamps(store: DocumentStore) -> None:
    # one load shares one transaction timestamp: 500 rows tie on modified_at
    ids = [f"doc{i:04d}" for i in range(500)]
    store.load_frame(frame(*[(i, "t", "b", "en") for i in ids]))
    assert len({row.modified_at for row in store.changed_since(None, limit=1000)}) == 1
    for limit in (1, 7, 100, 499, 500, 1000):
        scanned = scan_all(store, limit)
        assert scanned == sorted(ids)

    # a later change sorts after the watermark of a finished scan, and only it is returned
    watermark = store.changed_since(None, limit=1000)[-1].watermark
    store.load_frame(frame(("doc0003", "t", "new body", "en")))
    assert [row.doc_id for row in store.changed_since(watermark, limit=10)] == ["doc0003"]


def test_mark_indexed_does_not_bump_modified_at(store: DocumentStore) -> None:
    store.load_frame(frame(("a", "t", "b", "en")))
    before = store.changed_since(None, limit=1)[0]
    assert store.mark_indexed(["a"]) == 1
    after = store.changed_since(None, limit=1)[0]
    assert after.indexed_at is not None and after.modified_at == before.modified_at


def test_load_generated_parquet_in_chunks(store: DocumentStore, tmp_path: Path) -> None:
    import precompute_assets.storage.documents as docstore

    docs = pd.concat(generate_documents(3000, seed=4, chunk_size=1000), ignore_index=True)
    path = tmp_path / "docs.parquet"
    docs.to_parquet(path)
    old = docstore.CHUNK_ROWS
    docstore.CHUNK_ROWS = 700  # several chunks, several COPYs, one upsert
    try:
        result = store.load_file(path)
    finally:
        docstore.CHUNK_ROWS = old
    assert (result.rows, result.inserted, result.rejected, result.unknown_languages) == (3000, 3000, 0, {})
    assert store.count() == 3000
    row = next(r for r in store.changed_since(None, limit=3000) if r.doc_id == docs.doc_id[42])
    assert (row.title, row.body, row.language) == (docs.title[42], docs.body[42], docs.language[42])


def test_connections_give_up_on_a_server_that_never_answers(monkeypatch):
    """A port that accepts TCP but is no PostgreSQL must fail, not hang: connect_timeout, unless the URL sets one."""
    import socket

    from precompute_assets.storage import postgres

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    try:
        url = f"postgresql://u@127.0.0.1:{silent.getsockname()[1]}/x?connect_timeout=1"
        with pytest.raises(postgres.psycopg2.OperationalError, match="timeout"):
            postgres.connect(url)
    finally:
        silent.close()
    seen = []
    monkeypatch.setattr(postgres.psycopg2, "connect", lambda dsn, **kwargs: seen.append((dsn, kwargs)))
    postgres.connect("postgresql+psycopg2://u@h/db")
    postgres.connect("postgresql://u@h/db?connect_timeout=3")
    probes = {**postgres.KEEPALIVES, "tcp_user_timeout": postgres.TCP_USER_TIMEOUT_MS}
    assert seen == [
        ("postgresql://u@h/db", {"connect_timeout": postgres.CONNECT_TIMEOUT_S, **probes}),
        ("postgresql://u@h/db?connect_timeout=3", probes),
    ]


def test_jsonl_fields_are_mapped_and_a_missing_language_gets_the_default(store: DocumentStore, tmp_path: Path) -> None:
    path = tmp_path / "corpus.jsonl.gz"  # pyserini's layout: id, contents; one record with a language of its own
    records = [{"id": 7, "contents": "seven"}, {"id": "x", "contents": "ex", "lang": "fr"}, {"contents": "no id"}]
    with gzip.open(path, "wt") as out:
        out.write("\ufeff" + "".join(json.dumps(r) + "\n" for r in records))  # a byte order mark is not a bad line
    fields = DocumentFields({"doc_id": "id", "body": "contents", "language": "lang"}, language="en")
    result = store.load_file(path, fields)
    assert (result.rows, result.inserted, result.rejected) == (3, 2, 1)
    assert [(r.where, r.reason) for r in result.rejections] == [("line 3", "missing doc_id")]
    rows = {row.doc_id: (row.title, row.body, row.language) for row in store.changed_since(None, limit=10)}
    assert rows == {"7": (None, "seven", "en"), "x": (None, "ex", "fr")}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (DocumentFields(), "no doc_id field 'doc_id': the records have _id, text"),
        (
            DocumentFields({"doc_id": "_id", "title": "headline"}),
            "no title field 'headline': the records have _id, text",
        ),
    ],
)
def test_a_field_no_record_has_loads_nothing(
    store: DocumentStore, tmp_path: Path, monkeypatch, fields, message
) -> None:
    monkeypatch.setattr("precompute_assets.storage.documents.QUARANTINE_BATCH_ROWS", 1)  # sent before the error
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"_id": "a", "text": "x"}\n{not json\n{"_id": "b", "text": "y"}\n')
    with pytest.raises(DocumentFileError, match=message):
        store.load_file(path, fields)
    assert store.count() == 0 and quarantine_rows(store) == []  # nor quarantined


def test_headerless_tsv_keeps_quotes_and_rejects_rows_of_another_width(store: DocumentStore, tmp_path: Path) -> None:
    path = tmp_path / "collection.tsv"  # MS MARCO's layout: pid <TAB> passage, no header, quotes are text
    path.write_text('0\tThe "Manhattan" project\n1\t"quoted\n2\tbad\textra\n\n3\t\n4\tlast\n')
    result = store.load_file(path, DocumentFields({"doc_id": "1", "body": "2"}, header=False, language="en"))
    assert (result.rows, result.inserted, result.rejected) == (5, 4, 1)
    assert [(r.where, r.reason) for r in result.rejections] == [("line 3", "3 fields, expected 2 as on the first line")]
    assert raw_of(store, result.load_id) == {"line 3": "2\tbad\textra"}
    rows = {row.doc_id: row.body for row in store.changed_since(None, limit=10)}
    assert rows == {"0": 'The "Manhattan" project', "1": '"quoted', "3": None, "4": "last"}


def test_csv_with_a_header_quoted_newlines_and_long_bodies(store: DocumentStore, tmp_path: Path) -> None:
    path = tmp_path / "docs.csv"
    long_body = "word " * 60_000  # 300 kB in one field: over the csv module's default limit of 128 KiB
    path.write_bytes(
        "\ufeffurl,id,title,text\n"
        f'u1,a,"Title, with comma","line one\nline two"\n'
        f"u2,b,,{long_body}\n"
        "u3,c,only three\n"
        "u4,d,T,\xe9t\xe9\n".encode()
        + b"u5,e,T,\xff\n"  # invalid UTF-8
    )
    result = store.load_file(path, DocumentFields({"doc_id": "id", "body": "text"}))
    assert (result.rows, result.inserted, result.rejected) == (5, 3, 2)
    assert {r.where: r.reason for r in result.rejections} == {
        "line 5": "3 fields, expected 4 as on the first line",
        "line 7": "body: invalid UTF-8 (lone surrogate)",
    }
    assert raw_of(store, result.load_id) == {
        "line 5": "u3,c,only three",
        "line 7": '{"doc_id": "e", "title": "T", "body": "\\udcff", "language": null}',
    }
    rows = {row.doc_id: (row.title, row.body) for row in store.changed_since(None, limit=10)}
    assert rows == {"a": ("Title, with comma", "line one\nline two"), "b": (None, long_body), "d": ("T", "été")}


def test_a_csv_quote_never_closed_or_followed_by_text_is_a_rejection(store: DocumentStore, tmp_path: Path) -> None:
    # Read leniently, a quote left open took every record after it into one body: "c" and "d" vanished uncounted.
    path = tmp_path / "docs.csv"
    path.write_text('doc_id,title,body\na,A,"ok ""quoted""\nover lines"\nb,B,"text"after\nc,C,"never closed\nd,D,x\n')
    result = store.load_file(path)
    assert (result.inserted, result.rejected) == (1, 2)
    assert [(r.where, r.reason) for r in result.rejections] == [
        ("line 4", "malformed CSV quoting: ',' expected after '\"'"),
        ("line 5", "malformed CSV quoting: a quote opened here is never closed (nothing after it loads)"),
    ]
    assert raw_of(store, result.load_id) == {"line 4": 'b,B,"text"after', "line 5": 'c,C,"never closed\nd,D,x'}
    assert [row.body for row in store.changed_since(None, limit=10)] == ['ok "quoted"\nover lines']
    path.write_text('"doc_id,title,body\na,A,x\n')  # in the header: the file cannot be read at all
    with pytest.raises(DocumentFileError, match="the first record has malformed CSV quoting: unexpected end of data"):
        store.load_file(path)


def test_rejected_csv_records_are_quarantined_as_read(store: DocumentStore, tmp_path: Path) -> None:
    path = tmp_path / "docs.csv"
    path.write_bytes(
        b"doc_id,body\r\n"
        b"a,ok\r\n"
        b'b,"two\r\nlines",extra\r\n'  # lines 3-4: a record of three fields, named by its last line
        b"c\xff,x,y\r\n"  # bytes that are not UTF-8, kept visible
        b'd,"x"y\r\n'
        b"n\x00,z,w\r\n"  # PostgreSQL text cannot hold a NUL: shown as \x00
        b'f,"x\n\\.\n",y\n'  # lines 8-10: COPY's end-of-data marker on a line of its own is data here
        b"e,fine\r\n"
    )
    result = store.load_file(path)
    assert (result.rows, result.inserted, result.rejected, result.quarantined) == (7, 2, 5, 5)
    assert quarantine_rows(store, result.load_id) == [
        ("line 4", "3 fields, expected 2 as on the first line", 'b,"two\r\nlines",extra'),
        ("line 5", "3 fields, expected 2 as on the first line", "c\\xff,x,y"),
        ("line 6", "malformed CSV quoting: ',' expected after '\"'", 'd,"x"y'),
        ("line 7", "3 fields, expected 2 as on the first line", "n\\x00,z,w"),
        ("line 10", "3 fields, expected 2 as on the first line", 'f,"x\n\\.\n",y'),
    ]
    assert scan_all(store, 10) == ["a", "e"]


def test_a_rejected_rows_raw_text_is_cut_at_max_raw_chars(store: DocumentStore, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("precompute_assets.storage.files.MAX_RAW_CHARS", 100)
    path = tmp_path / "docs.csv"  # a quote never closed takes in the rest of the file: its first lines are kept
    path.write_text("doc_id,body\na,ok\n" + 'b,"open\n' + "".join(f"{i},{'x' * 30}\n" for i in range(50)))
    result = store.load_file(path)
    (where, _, raw), *others = quarantine_rows(store, result.load_id)
    assert (result.inserted, where, others) == (1, "line 3", [])
    assert raw.startswith('b,"open\n0,xxx') and raw.endswith("... [cut: the record's further lines are not kept]")
    assert len(raw) < 200
    path = tmp_path / "docs.jsonl"
    path.write_text('{"doc_id": "a", "body": "' + "y" * 500 + '\n{"doc_id": "b"}\n')  # one record: a load
    raw = raw_of(store, store.load_file(path).load_id)["line 1"]
    assert raw == '{"doc_id": "a", "body": "' + "y" * 75 + "... [cut: 425 more characters]"


def test_rejections_are_sent_in_batches_while_the_file_is_read(
    store: DocumentStore, tmp_path: Path, monkeypatch
) -> None:
    # A file of rejections is never held whole: they go to the quarantine table a batch at a time.
    from precompute_assets.storage import documents

    monkeypatch.setattr(documents, "QUARANTINE_BATCH_ROWS", 100)
    monkeypatch.setattr(documents, "QUARANTINE_BATCH_CHARS", 10_000)
    sent: list[int] = []
    flush = documents._QuarantineWriter.flush

    def spy(writer: documents._QuarantineWriter) -> None:
        sent.append(len(writer.pending))
        flush(writer)

    monkeypatch.setattr(documents._QuarantineWriter, "flush", spy)
    path = tmp_path / "docs.jsonl"
    lines = "".join(f"{{not json {i}\n" for i in range(2_500)) + ("{" + "z" * 3_000 + "\n") * 9
    path.write_text(lines + '{"doc_id": "a"}\n')  # one record: a load (of nothing but rejections, it is refused)
    result = store.load_file(path)
    assert (result.rejected, result.quarantined, len(quarantine_rows(store, result.load_id))) == (2_509, 2_509, 2_509)
    assert sent == [100] * 25 + [4, 4, 1]  # 3,000 characters each: four fill a batch of 10,000; the last one at the end
    # read back a page of 100 at a time, in file order
    assert [where for where, _, _ in store.quarantined(result.load_id)] == [f"line {n}" for n in range(1, 2_510)]


def test_csv_header_without_the_named_field_is_an_error(store: DocumentStore, tmp_path: Path) -> None:
    path = tmp_path / "docs.csv"
    path.write_text("id,text\na,x\n")
    with pytest.raises(DocumentFileError, match="no body field 'body_text': the header has id, text"):
        store.load_file(path, DocumentFields({"doc_id": "id", "body": "body_text"}))
    with pytest.raises(DocumentFileError, match="field 3 does not exist: the first line has 2 fields"):
        store.load_file(path, DocumentFields({"doc_id": "1", "body": "3"}, header=False))
    pd.DataFrame({"id": ["a"]}).to_parquet(tmp_path / "docs.parquet")
    with pytest.raises(DocumentFileError, match="only CSV and TSV files can be read without a header"):
        store.load_file(tmp_path / "docs.parquet", DocumentFields({"doc_id": "1"}, header=False))
    # A field named twice: the first body was loaded without a word (h_data); a column not read may repeat.
    path.write_text("doc_id,body,body,x,x\na,first,second,1,2\n")
    with pytest.raises(DocumentFileError, match="the body field 'body' appears 2 times: the header has doc_id, body"):
        store.load_file(path)
    assert store.count() == 0


@pytest.mark.parametrize("text", ["", "\n  \n", "\ufeff"])
def test_a_jsonl_file_without_a_record_is_an_error(store: DocumentStore, tmp_path: Path, text: str) -> None:
    # It was a load of nothing, exit code 0, even with --id-field naming a field no record could have.
    (tmp_path / "docs.jsonl.gz").write_bytes(gzip.compress(text.encode()))
    with pytest.raises(DocumentFileError, match=r"empty file: no records \(the doc_id field is 'nope'\)"):
        store.load_file(tmp_path / "docs.jsonl.gz", DocumentFields({"doc_id": "nope"}))


@pytest.mark.parametrize(
    ("text", "first"),
    [
        ('{"doc_id": "1",\n "body": "a"}\n{"doc_id": "2",\n "body": "b"}\n', "line 1: malformed JSON"),  # indented
        ('"a"\n"b"\n[1]\n', "line 1: not a JSON object"),
    ],
)
def test_a_jsonl_file_of_no_json_object_is_an_error_not_a_load_of_nothing(
    store: DocumentStore, tmp_path: Path, text: str, first: str
) -> None:
    """Pretty-printed JSON loaded nothing, every line quarantined, and exited 0; --id-field went unchecked
    (h_corpus2)."""
    path = tmp_path / "export.json"
    path.write_text(text)
    with pytest.raises(DocumentFileError, match=rf"^no line of the file is a JSON object \({first}.*jq -c \. rewrites"):
        store.load_file(path, DocumentFields({"doc_id": "bogus"}))
    assert store.count() == 0 and not quarantine_rows(store, None)
    path.write_text(text + '{"doc_id": "3", "body": "c"}\n')  # one record: a load of the rest, the others rejected
    assert store.load_file(path).inserted == 1


def test_a_jsonl_file_of_empty_objects_names_the_missing_field(store: DocumentStore, tmp_path: Path) -> None:
    """Objects without a key are records without the id field (an IndexError once they were taken for no record)."""
    path = tmp_path / "docs.jsonl"
    path.write_text("{}\n{}\n")
    with pytest.raises(DocumentFileError, match=r"^no doc_id field 'doc_id': the records have nothing$"):
        store.load_file(path)
    assert store.count() == 0


@pytest.mark.parametrize("name", ["docs.csv", "docs.tsv", "docs.csv.gz"])
def test_an_empty_csv_or_tsv_has_no_header_and_is_an_error(store: DocumentStore, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(gzip.compress(b"\n") if name.endswith(".gz") else b"\n")
    with pytest.raises(DocumentFileError, match=r"empty file: no header row \(the doc_id field is 'doc_id'\)"):
        store.load_file(path)  # was a load of 0 rows, exit code 0
    with pytest.raises(DocumentFileError, match="the doc_id field is '_id'"):
        store.load_file(path, DocumentFields({"doc_id": "_id"}))
    assert store.load_file(path, DocumentFields({"doc_id": "1"}, header=False)).rows == 0  # no header expected


def test_parquet_columns_are_mapped(store: DocumentStore, tmp_path: Path) -> None:
    path = tmp_path / "wiki.parquet"  # Hugging Face's wikipedia layout: id, url, title, text
    pd.DataFrame({"id": ["1", "2"], "url": ["u1", "u2"], "title": ["A", "B"], "text": ["a", "b"]}).to_parquet(path)
    result = store.load_file(path, DocumentFields({"doc_id": "id", "body": "text"}, language="en"))
    assert (result.inserted, result.rejected) == (2, 0)
    rows = {row.doc_id: (row.title, row.body, row.language) for row in store.changed_since(None, limit=10)}
    assert rows == {"1": ("A", "a", "en"), "2": ("B", "b", "en")}
    with pytest.raises(DocumentFileError, match="no body field 'body': the file has id, url, title, text"):
        store.load_file(path, DocumentFields({"doc_id": "id", "body": "body"}))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"names": {"doc": "id"}}, r"unknown document columns \['doc'\]"),
        ({"names": {"doc_id": "id"}, "header": False}, "without a header, fields are 1-based numbers"),
        ({"names": {"body": "2"}, "header": False}, "the doc_id field must be given by number"),
        ({"names": {"doc_id": "0"}, "header": False}, "without a header, fields are 1-based numbers"),
        ({"language": "not a tag"}, "is not a well-formed BCP 47 tag"),
    ],
)
def test_document_fields_refuse_what_cannot_be_read(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        DocumentFields(**kwargs)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_a_file_of_long_documents_is_loaded_in_chunks_of_bounded_size(
    store: DocumentStore, tmp_path: Path, monkeypatch, suffix: str
) -> None:
    # Chunks were 50,000 rows whatever their size: a 1.1 GB JSONL file of 2 MB documents took 4.7 GB resident.
    import tracemalloc

    monkeypatch.setattr("precompute_assets.storage.documents.CHUNK_BYTES", 2 << 20, raising=False)
    frame = pd.DataFrame({"doc_id": [f"d{i}" for i in range(40)], "body": [f"{i} " + "é" * 500_000 for i in range(40)]})
    path = tmp_path / f"docs{suffix}"
    if suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True, force_ascii=False)
    elif suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    tracemalloc.start()
    try:
        result = store.load_file(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.inserted == 40 and store.count() == 40
    assert peak < 25_000_000  # the file's text is 40 MB as UTF-8, 40 MB as Python strings

    if suffix == ".jsonl":  # a named field is looked for in the first 50,000 records, however many chunks they fill
        records = [{"doc_id": f"t{i}", "body": "x" * 2_000_000} | ({"title": "T"} if i == 3 else {}) for i in range(4)]
        (tmp_path / "late.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
        assert store.load_file(tmp_path / "late.jsonl", DocumentFields({"title": "title"})).inserted == 4


@pytest.mark.parametrize("name", ["docs.jsonl.gz", "docs.csv.gz"])
def test_a_gzip_file_cut_short_or_corrupt_loads_nothing(
    store: DocumentStore, tmp_path: Path, monkeypatch, name: str
) -> None:
    # gzip raised EOFError or zlib.error, which the CLI showed as a traceback (exit 1), not one line.
    monkeypatch.setattr("precompute_assets.storage.documents.QUARANTINE_BATCH_ROWS", 1)  # sent before the error
    text = "doc_id,body\nbad,row,here\n" + "".join(f"d{i},body {i}\n" for i in range(5000))
    if name.endswith(".jsonl.gz"):
        text = "{bad\n" + "".join(json.dumps({"doc_id": f"d{i}", "body": f"body {i}"}) + "\n" for i in range(5000))
    data = gzip.compress(text.encode())
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0xFF
    for broken in (data[: len(data) // 2], bytes(flipped)):
        (tmp_path / name).write_bytes(broken)
        with pytest.raises(DocumentFileError, match=r"unreadable gzip data \(cut short or corrupt\?\)"):
            store.load_file(tmp_path / name)
        assert store.count() == 0 and quarantine_rows(store) == []  # its rejected line is not quarantined either
    (tmp_path / name).write_bytes(data)
    assert store.load_file(tmp_path / name).quarantined == 1 and len(quarantine_rows(store)) == 1


def test_load_reports_the_share_of_the_file_read(store: DocumentStore, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("precompute_assets.storage.documents.CHUNK_ROWS", 2)
    parquet = tmp_path / "docs.parquet"
    pd.DataFrame({"doc_id": [str(i) for i in range(5)], "body": ["b"] * 5}).to_parquet(parquet)
    shares: list[float] = []
    assert store.load_file(parquet, progress=shares.append).inserted == 5
    assert shares == [0.4, 0.8, 1.0]
    jsonl = tmp_path / "docs.jsonl.gz"
    with gzip.open(jsonl, "wt") as out:
        out.write("".join(json.dumps({"doc_id": f"j{i}"}) + "\n" for i in range(5)))
    shares.clear()
    assert store.load_file(jsonl, progress=shares.append).inserted == 5
    assert len(shares) == 3 and shares == sorted(shares) and shares[-1] == 1.0


def _lock_waiters(url: str, table: str) -> int:
    """Backends waiting on a lock in a statement that names ``table``."""
    with psycopg2.connect(libpq_url(url)) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %s",
            (f"%{table}%",),
        )
        waiting = cur.fetchone()[0]
    conn.close()
    return waiting


def test_concurrent_loads_of_the_same_documents_in_other_orders_do_not_deadlock(
    store: DocumentStore, app_db_url: str
) -> None:
    """Two loads whose files hold the same ids in different orders (two exports of one corpus) both commit: rows are
    upserted in doc_id order, so their row locks are taken in one order. Before, each locked its file's order: A held
    a and waited for z, B held z and waited for a, and PostgreSQL aborted one with DeadlockDetected.

    Deterministic: an open transaction holds k, so A (a, k, z) takes a and waits on k; B (z, a) starts then."""
    from concurrent.futures import ThreadPoolExecutor

    holder = psycopg2.connect(libpq_url(app_db_url))
    try:
        with holder.cursor() as cur:
            cur.execute(f"INSERT INTO {store.table} (doc_id, modified_at) VALUES ('k', now())")
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(store.load_frame, frame(("a", "A", "x", "en"), ("k", "A", "x", "en"),
                                                        ("z", "A", "x", "en")))  # fmt: skip
            for waiting in (1, 2):
                deadline = time.monotonic() + 30
                while _lock_waiters(app_db_url, store.table) < waiting:
                    assert time.monotonic() < deadline and not first.done(), "the loads did not start waiting"
                    time.sleep(0.05)
                if waiting == 1:
                    second = pool.submit(store.load_frame, frame(("z", "B", "y", "en"), ("a", "B", "y", "en")))
            holder.rollback()  # k is free: A goes on
            results = [first.result(timeout=60), second.result(timeout=60)]
    finally:
        holder.close()
    assert [(r.inserted, r.updated, r.unchanged) for r in results] == [(3, 0, 0), (0, 2, 0)]
    rows = {row.doc_id: row.title for row in store.changed_since(None, limit=10)}
    assert rows == {"a": "B", "k": "A", "z": "B"}


def test_a_number_that_is_no_exact_id_is_quarantined(store: DocumentStore, tmp_path: Path) -> None:
    """JSON ``Infinity`` was stored as doc_id ``inf``, ``true`` as ``True``, ``1e20`` as ``1e+20``, and a Parquet
    float ``2**60`` as ``1.152921504606847e+18`` (h_emb)."""
    path = tmp_path / "docs.jsonl"
    path.write_text(
        '{"doc_id": Infinity, "body": "a"}\n{"doc_id": true, "body": "b"}\n{"doc_id": 1e20, "body": "c"}\n'
        '{"doc_id": 7.0, "body": "d"}\n'
    )
    result = store.load_file(path)
    assert (result.inserted, result.rejected) == (1, 3) and store.count() == 1
    reasons = [reason for _, reason, _ in quarantine_rows(store, result.load_id)]
    too_large = "doc_id: a float too large to hold every digit of an id: write ids as text or integers"
    assert reasons == ["doc_id: not a finite number", "doc_id: a boolean, not an id", too_large]
    pd.DataFrame({"doc_id": [float(2**60), 12.0], "body": ["x", "y"]}).to_parquet(tmp_path / "docs.parquet")
    result = store.load_file(tmp_path / "docs.parquet")
    assert (result.inserted, result.rejected) == (1, 1) and store.count() == 2
