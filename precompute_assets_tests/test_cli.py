"""The `precompute` command: replay output and errors, and the stack commands."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from precompute_assets.cli import main


def test_replay_prints_one_json_object_with_the_four_rates(tmp_path, capsys):
    rng = np.random.default_rng(0)
    keys = np.minimum(rng.zipf(1.3, 20_000), 5000)
    trace = tmp_path / "trace.txt"
    trace.write_text("\n".join(map(str, keys)) + "\n")
    assert main(["replay", "--trace", str(trace), "--days", "4", "--top-n", "50", "--capacity", "200"]) == 0
    result = json.loads(capsys.readouterr().out)
    rates = [result[f"hit_rate_{name}"] for name in ("lru", "static_top_n", "ours", "belady")]
    assert all(0 < rate <= result["hit_rate_belady"] for rate in rates)
    assert result["requests"] == 15_000


def test_replay_names_the_bad_line(tmp_path, capsys):
    trace = tmp_path / "trace.txt"
    for content, expected in [
        ("1\n2\n\n3\n", "line 3: blank line"),
        ("1\n# comment\n2\n", "line 2"),
        ("1\n2\nad7\n", "line 3"),
    ]:
        trace.write_text(content)
        assert main(["replay", "--trace", str(trace), "--days", "2", "--top-n", "1", "--capacity", "2"]) == 2
        assert expected in capsys.readouterr().err


def test_replay_rejects_top_n_above_capacity(tmp_path, capsys):
    trace = tmp_path / "trace.txt"
    trace.write_text("1\n2\n3\n4\n")
    assert main(["replay", "--trace", str(trace), "--days", "2", "--top-n", "5", "--capacity", "2"]) == 2
    assert "cannot exceed capacity" in capsys.readouterr().err


@pytest.fixture(autouse=True)
def private_environ(monkeypatch):
    """`precompute up` exports the stack's URLs into os.environ: keep them out of other tests."""
    monkeypatch.setattr(os, "environ", os.environ.copy())


def test_up_status_down_manage_real_servers(tmp_path, monkeypatch, capsys):
    for name in ("PRECOMPUTE_REDIS_URL", "DAGSTER_PG_URL", "PRECOMPUTE_APP_DB_URL", "DAGSTER_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    try:
        assert main(["up"]) == 0
        out = capsys.readouterr().out
        assert "redis     embedded  running (pid" in out and "postgres  embedded  running (pid" in out
        assert main(["env"]) == 0
        env = capsys.readouterr().out
        assert f"export DAGSTER_HOME={tmp_path / 'home' / 'dagster'}" in env
        assert (tmp_path / "home" / "dagster" / "dagster.yaml").resolve().name == "dagster.yaml"
    finally:
        main(["down"])
    for name in ("PRECOMPUTE_REDIS_URL", "DAGSTER_PG_URL", "PRECOMPUTE_APP_DB_URL"):  # exported by `up`
        os.environ.pop(name, None)
    main(["status"])
    assert "running" not in capsys.readouterr().out


def test_external_urls_start_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PRECOMPUTE_REDIS_URL", "rediss://user:secret@127.0.0.1:1/0")
    monkeypatch.setenv("DAGSTER_PG_URL", "postgresql://u:secret@127.0.0.1:1/dagster")
    monkeypatch.setenv("PRECOMPUTE_APP_DB_URL", "postgresql://u:secret@127.0.0.1:1/app")
    assert main(["up"]) == 0
    out = capsys.readouterr().out
    assert "redis     external  unreachable" in out and "postgresql+psycopg2://u:***@127.0.0.1:1/dagster" in out
    assert "secret" not in out
    assert not (tmp_path / "home" / "redis").exists() and not (tmp_path / "home" / "postgres").exists()
