"""The CLI's progress outside a terminal: lines a log keeps while long work lasts, not a bar that printed nothing
there, and nothing from short work, whose one-line error stays the only line."""

import io
import json
import threading
import time

import numpy as np
import pytest

from precompute_assets.tools import progress as progress_module
from precompute_assets.tools.cli import main
from precompute_assets.tools.progress import LogProgress, progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def said(log: io.StringIO) -> list[str]:
    """The lines without their times (``... in N s``), and how each ended."""
    return [
        line.split(" in ")[0] + ("|" + line.split(", ")[-1] if ", " in line else "")
        for line in log.getvalue().splitlines()
    ]


def test_a_terminal_gets_a_bar_and_a_log_gets_lines():
    from tqdm import tqdm

    bar = progress(desc="rows", total=10, stream=Terminal())
    assert isinstance(bar, tqdm)
    bar.close()
    log = progress(desc="rows", total=10, stream=io.StringIO())
    assert isinstance(log, LogProgress)
    log.close()


def test_short_work_says_nothing(monkeypatch):
    log = io.StringIO()
    with progress(desc="impressions", unit="rows", stream=log) as bar:
        bar.update(2_000_000)
    assert log.getvalue() == ""


def test_long_work_says_where_it_is_while_it_lasts_and_how_it_ended(monkeypatch):
    monkeypatch.setattr(progress_module, "LOG_EVERY_S", 0.05)
    log = io.StringIO()
    with progress(desc="impressions", unit="rows", stream=log) as bar:
        bar.update(2_000_000)
        time.sleep(0.3)
    lines = said(log)
    assert len(lines) >= 3 and set(lines[:-1]) == {"impressions: 2,000,000 rows"}, lines
    assert lines[-1] == "impressions: 2,000,000 rows|done", lines

    log = io.StringIO()
    with pytest.raises(KeyboardInterrupt), progress(desc="hours", total=3, unit="hours", stream=log) as bar:
        bar.update()
        time.sleep(0.2)
        raise KeyboardInterrupt
    assert said(log)[-1] == "hours: 1 of 3 hours|stopped", said(log)
    assert not [thread for thread in threading.enumerate() if thread.name.startswith("progress of")]


def test_an_iteration_counts_its_items_and_a_share_is_shown_in_percent(monkeypatch):
    monkeypatch.setattr(progress_module, "LOG_EVERY_S", 0.02)
    log = io.StringIO()
    for _ in progress(range(3), desc="hours", total=3, unit="hours", stream=log):
        time.sleep(0.1)
    assert said(log)[-1] == "hours: 3 of 3 hours|done", said(log)
    log = io.StringIO()
    with progress(desc="documents", total=1.0, share=True, stream=log) as bar:
        bar.update(0.25)
        time.sleep(0.1)
    assert said(log)[-1] == "documents: 25%|done", said(log)


def test_a_long_replay_outside_a_terminal_logs_its_stage_and_ends_with_all_done(tmp_path, capsys, monkeypatch):
    """A cron job's replay of a long trace printed nothing on stderr for minutes (the bar turned itself off)."""
    monkeypatch.setattr(progress_module, "LOG_EVERY_S", 0.001)
    rng = np.random.default_rng(0)
    trace = tmp_path / "trace.txt"
    trace.write_text("\n".join(f"user:{k}" for k in np.minimum(rng.zipf(1.3, 4_000), 800)) + "\n")
    assert main(["replay", "--trace", str(trace), "--days", "4", "--capacity", "100", "--top-n", "auto"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["requests"] == 3_000
    lines = err.splitlines()
    assert len(lines) >= 2 and all(" stages in " in line for line in lines), err
    total = lines[0].split(" of ")[1].split()[0]
    assert lines[-1].split(" in ")[0].endswith(f": {total} of {total} stages") and lines[-1].endswith(", done"), err
