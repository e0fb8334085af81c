"""`precompute dev` started as a shell's background job stops on SIGTERM, as a supervisor expects."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from precompute_assets.stack import Stack, free_port

START_TIMEOUT_S = 120
STOP_TIMEOUT_S = 60


def _as_background_job() -> None:
    """What a non-interactive shell does to a job it starts with ``&``: SIGINT (and SIGQUIT) ignored."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGQUIT, signal.SIG_IGN)


def _wait_until_serving(proc: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"precompute dev exited with code {proc.returncode}:\n{log.read_text()[-3000:]}")
        with (
            contextlib.suppress(urllib.error.URLError, OSError),
            urllib.request.urlopen(f"{url}/server_info", timeout=2) as response,
        ):
            if response.status == 200:
                return
        time.sleep(0.5)
    pytest.fail(f"the Dagster UI did not answer within {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def test_sigterm_stops_precompute_dev_started_as_a_background_job(stack: Stack, tmp_path: Path) -> None:
    """It ignored SIGTERM: the shell's ignored SIGINT survived the exec into `dagster dev`, which answers SIGTERM
    with SIGINT's handler, so only SIGKILL stopped it and its UI, daemon and runs kept going."""
    port = free_port()
    log = tmp_path / "dev.log"
    precompute = shutil.which("precompute", path=str(Path(sys.executable).parent)) or "precompute"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [precompute, "dev", "--port", str(port)],
            env={**os.environ, **stack.env(), "PRECOMPUTE_LAKE_URI": "lake-here"},  # relative: the caller's
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_as_background_job,
        )
    try:
        _wait_until_serving(proc, f"http://127.0.0.1:{port}", log)
        # run from DAGSTER_HOME, whose dagster.yaml is used: from the project folder Dagster said it "will not be used"
        assert "will not be used" not in log.read_text(), log.read_text()[-3000:]
        # dev runs in DAGSTER_HOME: a relative lake is made the caller's first, as every other command reads it
        environ = dict(item.split("=", 1) for item in Path(f"/proc/{proc.pid}/environ").read_text().split("\0") if item)
        assert environ["PRECOMPUTE_LAKE_URI"] == str(tmp_path / "lake-here")
        proc.send_signal(signal.SIGTERM)  # the leader only, as a supervisor or `kill PID` does
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"precompute dev still runs {STOP_TIMEOUT_S} s after SIGTERM:\n{log.read_text()[-3000:]}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # what outlived the leader, and the leader if the test failed
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
