"""`precompute campaign register|list|show|cancel` against the session's servers: JSON out, one-line errors."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from precompute_assets.stack import ENV_APP_DB, ENV_DAGSTER_PG, ENV_REDIS, Stack
from precompute_assets.storage.campaigns import ENV_CAMPAIGN_MAX_ADS as ENV_MAX_ADS
from precompute_assets.storage.campaigns import CampaignRegistry
from precompute_assets.tools.campaigns import read_campaign_file
from precompute_assets.tools.cli import CliError, main

LAUNCH = (datetime.now(UTC) + timedelta(hours=6)).replace(microsecond=0)
FEATURES = {"quality": 0.5, "bid": 1.2, "text_len": 40, "category": "shoes"}


@pytest.fixture(autouse=True)
def private_environ(monkeypatch):
    """The CLI exports the stack's URLs into os.environ: keep them out of other tests."""
    monkeypatch.setattr(os, "environ", os.environ.copy())
    for name in ("PRECOMPUTE_AD_NUMERIC", "PRECOMPUTE_AD_CATEGORICAL", "PRECOMPUTE_AD_LOG_SCALED", ENV_MAX_ADS):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def servers(stack: Stack, app_db: str, tmp_path: Path, monkeypatch) -> str:
    """Point the CLI at the session's Redis and PostgreSQL (a fresh application database): it starts nothing."""
    env = stack.env()
    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv(ENV_REDIS, env[ENV_REDIS])
    monkeypatch.setenv(ENV_DAGSTER_PG, env[ENV_DAGSTER_PG])
    monkeypatch.setenv(ENV_APP_DB, app_db)
    return app_db


def run(capsys, *argv: str) -> dict:
    assert main(["campaign", *argv]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # one JSON object
    return json.loads(out, parse_constant=refuse)  # strict JSON: no NaN nor Infinity


def refuse(constant: str):
    raise AssertionError(f"{constant} is not JSON")


def fails(capsys, *argv: str) -> str:
    assert main(["campaign", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("precompute campaign: ") and "Traceback" not in err, err
    return err


def jsonl(path: Path, *campaigns: dict) -> Path:
    path.write_text("".join(json.dumps(c) + "\n" for c in campaigns))
    return path


def campaign(campaign_id: str, tenant_id: str = "acme", n_ads: int = 2, **fields) -> dict:
    ads = [{"ad_id": f"{campaign_id}-ad{i}", **FEATURES} for i in range(n_ads)]
    return {"campaign_id": campaign_id, "tenant_id": tenant_id, "launch_at": LAUNCH.isoformat(), "ads": ads, **fields}


def test_register_list_show_cancel(servers, tmp_path, capsys):
    path = jsonl(tmp_path / "campaigns.jsonl", campaign("spring", budget=500), campaign("summer", "globex", 3))
    result = run(capsys, "register", "--file", str(path))
    counts = {key: result[key] for key in ("campaigns", "new", "changed", "unchanged", "ads")}
    assert counts == {"campaigns": 2, "new": 2, "changed": 0, "unchanged": 0, "ads": 5}
    spring = result["registered"][0]
    assert spring["campaign_id"] == "spring" and spring["revision"] == 1 and spring["budget"] == 500.0
    assert spring["launch_at"] == LAUNCH.isoformat() and spring["status"] == "active" and not spring["is_warm"]

    listed = run(capsys, "list")
    assert listed["count"] == 2 and [c["campaign_id"] for c in listed["campaigns"]] == ["spring", "summer"]
    assert [c["campaign_id"] for c in run(capsys, "list", "--tenant", "globex")["campaigns"]] == ["summer"]

    shown = run(capsys, "show", "summer")
    assert shown["tenant_id"] == "globex" and shown["n_ads"] == 3
    assert shown["ads"][0] == {"ad_id": "summer-ad0", **FEATURES, "text_len": 40.0}

    cancelled = run(capsys, "cancel", "spring")
    assert (cancelled["status"], cancelled["revision"]) == ("cancelled", 2)
    assert [c["campaign_id"] for c in run(capsys, "list", "--status", "cancelled")["campaigns"]] == ["spring"]

    again = run(capsys, "register", "--file", str(path))  # summer is unchanged; spring becomes active again
    assert (again["new"], again["changed"], again["unchanged"]) == (0, 1, 1)
    assert again["registered"][0]["revision"] == 3 and again["registered"][0]["status"] == "active"
    assert not (tmp_path / "home" / "redis").exists()  # nothing was started: the session's servers answered


def test_the_registry_commands_need_no_cache(servers, tmp_path, capsys, monkeypatch):
    """They refused to run while the serving Redis was down, and started an embedded Valkey when none was named,
    though the registry is the database's alone: the sensors warm and clean the cache (h_prod2)."""
    path = jsonl(tmp_path / "campaigns.jsonl", campaign("spring"))
    monkeypatch.setenv(ENV_REDIS, "redis://127.0.0.1:1/0")  # the production cache, down
    assert run(capsys, "register", "--file", str(path))["new"] == 1
    monkeypatch.delenv(ENV_REDIS)  # a host given only the databases' URLs
    assert run(capsys, "list")["count"] == 1 and run(capsys, "cancel", "spring")["status"] == "cancelled"
    assert not (tmp_path / "home" / "redis").exists()


def test_register_a_csv_of_one_row_per_ad(servers, tmp_path, capsys):
    path = tmp_path / "campaigns.csv"
    end = (LAUNCH + timedelta(days=7)).isoformat()
    path.write_text(
        "campaign_id,tenant_id,launch_at,end_at,budget,ad_id,quality,bid,text_len,category,title\n"
        f"c1,acme,{LAUNCH.isoformat()},{end},250,a1,0.5,1.0,30,shoes,Red shoes\n"
        f"c2,acme,{LAUNCH.isoformat()},,,b1,0.7,2.0,12,hats,\n"
        f'c1,acme,{LAUNCH.isoformat()},{end},250,a2,0.6,1.5,25,"shoes, boots","Blue, tall"\n'
    )
    result = run(capsys, "register", "--file", str(path))
    assert [c["campaign_id"] for c in result["registered"]] == ["c1", "c2"]
    c1, c2 = result["registered"]
    assert (c1["n_ads"], c1["budget"], c1["end_at"]) == (2, 250.0, end)
    assert (c2["n_ads"], c2["budget"], c2["end_at"]) == (1, 1000.0, None)  # defaults
    assert [ad["category"] for ad in run(capsys, "show", "c1")["ads"]] == ["shoes", "shoes, boots"]


def test_the_feature_set_comes_from_the_environment(servers, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PRECOMPUTE_AD_NUMERIC", "price")
    monkeypatch.setenv("PRECOMPUTE_AD_CATEGORICAL", "brand")
    ad = {"ad_id": "p1", "price": 9.5, "brand": "zeta"}
    path = jsonl(tmp_path / "c.jsonl", {**campaign("own-data"), "ads": [ad]})
    assert run(capsys, "register", "--file", str(path))["ads"] == 1
    assert run(capsys, "show", "own-data")["ads"] == [ad]
    path = jsonl(tmp_path / "d.jsonl", campaign("default-features"))
    assert "lack the feature columns ['price', 'brand']" in fails(capsys, "register", "--file", str(path))


def test_every_column_of_a_campaign_file_is_kept_for_a_later_feature_set(servers, tmp_path, capsys, monkeypatch):
    path = tmp_path / "campaigns.csv"
    path.write_text(  # with the two unnamed empty columns a spreadsheet's trailing commas make
        "campaign_id,tenant_id,launch_at,ad_id,quality,bid,text_len,category,title,,\n"
        f"c1,acme,{LAUNCH.isoformat()},a1,0.5,1.0,30,shoes,Red shoes,,\n"
        f"c1,acme,{LAUNCH.isoformat()},a2,0.6,1.5,25,hats,,,\n"
    )
    assert run(capsys, "register", "--file", str(path))["ads"] == 2
    assert "title" not in run(capsys, "show", "c1")["ads"][0]
    monkeypatch.setenv("PRECOMPUTE_AD_CATEGORICAL", "category,title")  # the feature set grows a column
    titles = [ad["title"] for ad in run(capsys, "show", "c1")["ads"]]
    assert titles[0] == "Red shoes" and not isinstance(titles[1], str)  # a blank cell was stored as null
    monkeypatch.setenv("PRECOMPUTE_AD_NUMERIC", "quality,bid,text_len,ctr_hist")  # a column no ad was given
    assert [ad["ctr_hist"] for ad in run(capsys, "show", "c1")["ads"]] == [None, None]  # was NaN: no JSON


def test_rows_of_a_campaign_agree_by_meaning_not_by_text(tmp_path):
    """Two spellings of one instant (``Z``, ``+00:00``, seconds) or one budget are one campaign, as the registry reads
    them; a naive time beside an aware one, or another instant, still disagree."""
    path = tmp_path / "campaigns.csv"
    path.write_text(
        "campaign_id,tenant_id,launch_at,end_at,budget,ad_id\n"
        "c1,acme,2030-01-01T00:00Z,2030-02-01T00:00Z,100,a1\n"
        "c1,acme,2030-01-01T00:00:00+00:00,2030-02-01T01:00+01:00,100.00,a2\n"
    )
    records, labels = read_campaign_file(path)
    assert labels == ["line 2"] and [ad["ad_id"] for ad in records[0]["ads"]] == ["a1", "a2"]
    assert records[0]["launch_at"] == "2030-01-01T00:00Z"  # the first row's text: the registry parses it
    for launch, budget, column in (("2030-01-01T00:00", "100", "launch_at"), ("2030-01-01T00:00Z", "100.5", "budget")):
        path.write_text(
            "campaign_id,tenant_id,launch_at,budget,ad_id\n"
            f"c1,acme,2030-01-01T00:00Z,100,a1\nc1,acme,{launch},{budget},a2\n"
        )
        with pytest.raises(CliError, match=f"line 3 has {column}"):
            read_campaign_file(path)


def test_list_and_cancel_need_no_feature_set_but_register_names_a_bad_one(servers, tmp_path, capsys, monkeypatch):
    run(capsys, "register", "--file", str(jsonl(tmp_path / "a.jsonl", campaign("c1"))))
    monkeypatch.setenv("PRECOMPUTE_AD_NUMERIC", "bid,bid")
    assert run(capsys, "list")["count"] == 1 and run(capsys, "cancel", "c1")["status"] == "cancelled"
    assert "the ad feature set: a feature column is listed twice" in fails(
        capsys, "register", "--file", str(tmp_path / "a.jsonl")
    )


def test_register_counts_ads_against_the_deployments_cap(servers, tmp_path, capsys, monkeypatch):
    """The cap was a constant of 10,000: a deployment that warms bigger campaigns could not register them."""
    path = jsonl(tmp_path / "a.jsonl", campaign("c1", n_ads=3))
    monkeypatch.setenv(ENV_MAX_ADS, "2")
    message = fails(capsys, "register", "--file", str(path))
    assert "3 ads, more than the 2 a campaign may have" in message and "PRECOMPUTE_CAMPAIGN_MAX_ADS" in message
    monkeypatch.setenv(ENV_MAX_ADS, "none")
    assert f"{ENV_MAX_ADS} must be a whole number of ads of at least 1, got 'none'" in fails(
        capsys, "register", "--file", str(path)
    )
    assert run(capsys, "list")["count"] == 0  # only register counts ads
    monkeypatch.setenv(ENV_MAX_ADS, "3")
    assert run(capsys, "register", "--file", str(path))["ads"] == 3


def test_a_refused_campaign_is_one_line_and_registers_nothing(servers, tmp_path, capsys):
    bad_ads = campaign("bad-ads", n_ads=3)
    bad_ads["ads"][1]["quality"] = "high"
    bad_ads["ads"][2]["bid"] = -1
    naive = campaign("naive", launch_at=LAUNCH.replace(tzinfo=None).isoformat())
    path = jsonl(tmp_path / "c.jsonl", campaign("fine"), bad_ads, naive, campaign("a,b"))
    err = fails(capsys, "register", "--file", str(path))
    assert "3 of 4 campaigns refused, nothing registered" in err
    assert (
        "campaign 'bad-ads' (line 2): 2 of 3 ads are invalid: ad 'bad-ads-ad1': quality is not a finite number" in err
    )
    assert "ad 'bad-ads-ad2': bid is negative" in err
    assert "campaign 'naive' (line 3): launch_at" in err and "has no timezone" in err
    assert "campaign 'a,b' (line 4): campaign_id must be" in err
    assert CampaignRegistry(servers).list() == []


def test_a_campaign_of_another_tenant_and_unknown_ids(servers, tmp_path, capsys):
    run(capsys, "register", "--file", str(jsonl(tmp_path / "a.jsonl", campaign("c1"))))
    taken = jsonl(tmp_path / "b.jsonl", campaign("c1", "globex"))
    assert "campaign 'c1' (line 1): belongs to tenant 'acme', not 'globex'" in fails(
        capsys, "register", "--file", str(taken)
    )
    assert "campaign 'nope' is not registered" in fails(capsys, "show", "nope")
    assert "campaign 'nope' is not registered" in fails(capsys, "cancel", "nope")


def test_bad_files_are_one_line_and_start_nothing(tmp_path, monkeypatch, capsys):
    for name in (ENV_REDIS, ENV_DAGSTER_PG, ENV_APP_DB):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "never-started"))
    folder = tmp_path / "folder.jsonl"
    folder.mkdir()
    good = json.dumps(campaign("c1"))
    files = {
        "missing.jsonl": None,
        "campaigns.parquet": "x",
        "bad.jsonl": f"{good}\n\n{{'campaign_id': 'c2'}}\n",
        "list.jsonl": f"{good}\n[1, 2]\n",
        "latin1.jsonl": b'{"campaign_id": "caf\xe9"}\n',
        "no-columns.csv": "campaign_id,ad_id,quality\nc1,a1,0.5\n",
        "disagree.csv": "campaign_id,tenant_id,launch_at,ad_id\n"
        "c1,acme,2030-01-01T00:00Z,a1\nc1,acme,2030-01-02T00:00Z,a2\n",
        "ragged.csv": "campaign_id,tenant_id,launch_at,ad_id\nc1,acme,2030-01-01T00:00Z,a1,extra\n",
        "short.csv": "campaign_id,tenant_id,launch_at,ad_id,quality\nc1,acme,2030-01-01T00:00Z,a1,0.5\nc1,acme\n",
        # json and csv keep the last of a repeated field or column, silently
        "twice.jsonl": good[:-1] + ', "campaign_id": "c2"}\n',
        "ad-twice.jsonl": json.dumps(campaign("c1"))[:-3] + ', "quality": 0.1}]}\n',
        "twice.csv": "campaign_id,tenant_id,launch_at,ad_id,quality,quality\nc1,acme,2030-01-01T00:00Z,a1,0.9,0.1\n",
        # an export that matched nothing registered nothing with exit 0 (h_events2)
        "empty.jsonl": "",
        "blank.jsonl": "\n  \n",
        "header.csv": "campaign_id,tenant_id,launch_at,ad_id,quality\n",
    }
    expected = {
        "missing.jsonl": "no such file",
        "campaigns.parquet": "unknown suffix '.parquet'; expected .jsonl, .ndjson or .csv",
        "bad.jsonl": "line 3: malformed JSON (Expecting property name enclosed in double quotes at column 2)",
        "list.jsonl": "line 2: not a JSON object but list",
        "latin1.jsonl": "not UTF-8 text",
        "no-columns.csv": "missing columns ['tenant_id', 'launch_at']",
        "disagree.csv": "campaign 'c1': line 3 has launch_at '2030-01-02T00:00Z', line 2 has '2030-01-01T00:00Z'",
        "ragged.csv": "line 2: 5 fields, the header has 4",
        "short.csv": "line 3: 2 fields, the header has 5",  # not a value error of the fields it lacks
        "twice.jsonl": "line 1: the field 'campaign_id' is given twice",
        "ad-twice.jsonl": "line 1: the field 'quality' is given twice",
        "twice.csv": "the header names 'quality' more than once",
        "folder.jsonl": "not a file",
        "empty.jsonl": "empty.jsonl: no campaign in the file",
        "blank.jsonl": "blank.jsonl: no campaign in the file",
        "header.csv": "header.csv: no campaign in the file (a header and no row)",
    }
    for name, content in files.items():
        if isinstance(content, bytes):
            (tmp_path / name).write_bytes(content)
        elif content is not None:
            (tmp_path / name).write_text(content)
    for name, message in expected.items():
        err = fails(capsys, "register", "--file", str(tmp_path / name))
        assert message in err and str(tmp_path / name) in err, err
    assert not (tmp_path / "never-started" / "redis").exists()  # nothing was started for a bad file


def test_a_campaign_file_that_is_not_text_is_named_as_such(tmp_path, monkeypatch, capsys):
    """A gzip, Excel, Parquet or UTF-16 file named .csv or .jsonl was "not UTF-8 text (invalid start byte at byte
    1)"."""
    import gzip
    import zipfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "never-started"))
    rows = "campaign_id,tenant_id,launch_at,ad_id\nc1,acme,2030-01-01T00:00Z,a1\n"
    (tmp_path / "packed.csv").write_bytes(gzip.compress(rows.encode()))
    (tmp_path / "windows.csv").write_bytes(rows.encode("utf-16"))
    pq.write_table(pa.table({"campaign_id": ["c1"]}), tmp_path / "table.jsonl")
    with zipfile.ZipFile(tmp_path / "book.csv", "w") as book:
        book.writestr("xl/workbook.xml", "<workbook/>")
    for name, says in {
        "packed.csv": "the file is gzip-compressed: decompress it first (gzip -dc FILE)",  # .gz is not read here
        "windows.csv": "the file is UTF-16 text (it starts with UTF-16's byte order mark): convert it to UTF-8",
        "table.jsonl": "the file is Parquet, not text: write it as text",
        "book.csv": "the file is a zip archive (an Excel workbook?), not text: export or extract the CSV from it",
    }.items():
        assert (
            fails(capsys, "register", "--file", str(tmp_path / name))
            == f"precompute campaign: {tmp_path / name}: {says}\n"
        )
    assert not (tmp_path / "never-started" / "redis").exists()


def test_a_campaign_file_with_a_byte_order_mark_reads_as_without(tmp_path):
    """Excel's "CSV UTF-8" starts with a byte order mark: the CSV was refused for "missing columns ['campaign_id']"
    (its first column read as '\\ufeffcampaign_id'), a JSONL file as malformed JSON on line 1."""
    from precompute_assets.tools.campaigns import read_campaign_file

    rows = "campaign_id,tenant_id,launch_at,ad_id\r\nc1,acme,2030-01-01T00:00Z,a1\r\nc1,acme,2030-01-01T00:00Z,a2\r\n"
    files = {"excel.csv": rows, "bom.jsonl": json.dumps(campaign("c1")) + "\n"}
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8-sig", newline="")
        (tmp_path / f"plain-{name}").write_text(text, encoding="utf-8", newline="")
        assert read_campaign_file(tmp_path / name) == read_campaign_file(tmp_path / f"plain-{name}")
        assert read_campaign_file(tmp_path / name)[0][0]["campaign_id"] == "c1"


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["campaign"], "required: campaign_command"),
        (["campaign", "register"], "--file"),
        (["campaign", "list", "--status", "paused"], "invalid choice: 'paused'"),
        (["campaign", "show"], "campaign_id"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err
