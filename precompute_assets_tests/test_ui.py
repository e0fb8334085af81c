"""The Dagster web UI in a real browser: `dagster dev` on the embedded stack, driven by headless Chromium.

Fills one past hour of the query-log stream, opens the catalog, launches a materialization of that one
``query_logs`` partition from the asset page, waits for the run page to say "Success", then cross-checks
the run and the materialization through the webserver's GraphQL endpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from precompute_assets.serving import KeySchema, QueryLogger, connect
from precompute_assets.serving.querylog import read_stream_window
from precompute_assets.stack import ENV_REDIS, Stack, free_port, project_dir

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
]
SERVER_START_TIMEOUT_S = 120
RUN_TIMEOUT_S = 180
UI_TIMEOUT_MS = 60_000
DEFAULT_EXPECT_TIMEOUT_MS = 5_000  # playwright's own default, restored after the test
CODE_LOCATION = "precompute_assets.definitions:defs"  # workspace.yaml: module:attribute

pytestmark = [
    pytest.mark.ui,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"Debian's Chromium is not installed at {CHROMIUM}"),
]

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")

# Events of the filled hour: (kind, key, hit, latency_us, user, tenant); all valid.
EVENTS = [
    ("ctr", "ad-1", True, 120, "u1", "acme"),
    ("ctr", "ad-2", False, 900, "u2", "acme"),
    ("ctr", "ad-1", True, 95, None, None),
    ("campaign", "camp-7", False, 1500, "u3", "globex"),
    ("campaign", "camp-7", True, 80, "u3", None),
]


@dataclass
class Dagster:
    """A running `dagster dev` (webserver + daemon) on the test's stack."""

    url: str
    proc: subprocess.Popen
    log: Path

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError as exc:
            return f"<no dagster dev log: {exc}>"

    def graphql(self, query: str, variables: dict) -> dict:
        request = urllib.request.Request(
            f"{self.url}/graphql",
            data=json.dumps({"query": query, "variables": variables}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            body = json.load(response)
        assert not body.get("errors"), body["errors"]
        return body["data"]


def fill_past_hour(redis_url: str, events: list[tuple]) -> str:
    """Log ``events`` with a clock inside one finished hour (UTC); returns that hour's partition key.

    The logger replays the past with explicit stream IDs, which Redis accepts only above the stream's
    newest entry, so the hour must start after anything already in the (shared) default-namespace stream.
    """
    schema = KeySchema()
    client = connect(redis_url, socket_timeout=5)
    try:
        hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
        start_ms = int(hour.timestamp() * 1000)
        newest = client.xrevrange(schema.query_log(), count=1)
        if newest:
            newest_ms = int(newest[0][0].split(b"-")[0])
            assert newest_ms < start_ms, (
                f"the query-log stream {schema.query_log()} already holds an entry at {newest_ms} ms, after the "
                f"start of hour {hour:%Y-%m-%d-%H:%M}; events cannot be replayed into that hour"
            )
        ticks = iter(range(start_ms + 10 * 60_000, start_ms + 50 * 60_000, 60_000))
        logger = QueryLogger(connect(redis_url, socket_timeout=5), schema, clock=lambda: next(ticks))
        for kind, key, hit, latency_us, user, tenant in events:
            logger.log(kind, key, hit=hit, latency_us=latency_us, user=user, tenant=tenant)
        logger.close()
        logger.client.close()
        assert logger.stats.written == len(events), f"query logger did not write every event: {logger.stats}"
        in_hour = sum(len(page) for page in read_stream_window(client, schema, start_ms, start_ms + 3_600_000))
        assert in_hour == len(events), f"expected {len(events)} entries in the hour, found {in_hour}"
    finally:
        client.close()
    return hour.strftime("%Y-%m-%d-%H:%M")


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _stop_group(proc: subprocess.Popen, grace_s: float = 20) -> None:
    """Interrupt the whole process group (webserver, daemon, code servers, runs) like Ctrl-C, then kill it."""
    try:
        os.killpg(proc.pid, signal.SIGINT)
    except ProcessLookupError:
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)
    # Children may outlive the leader (or ignore the interrupt): the group goes down regardless.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


@pytest.fixture
def dagster_dev(stack: Stack, tmp_path: Path) -> Iterator[Dagster]:
    """`dagster dev -w workspace.yaml` on a free port, with the stack's environment; always torn down."""
    port = free_port()
    log = tmp_path / "dagster-dev.log"
    env = {**os.environ, **stack.env()}
    dagster_cli = shutil.which("dagster", path=str(Path(sys.executable).parent)) or "dagster"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [dagster_cli, "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
            cwd=project_dir(),
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            # A shell's background jobs ignore SIGINT, and dagster dev maps SIGTERM onto SIGINT's handler:
            # restore the default so that the interrupt below shuts it down instead of being ignored.
            preexec_fn=_default_sigint,
        )
    server = Dagster(f"http://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"dagster dev exited with code {proc.returncode}:\n{server.log_tail()}")
            try:
                with urllib.request.urlopen(f"{server.url}/server_info", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"dagster webserver not up after {SERVER_START_TIMEOUT_S}s:\n{server.log_tail()}")
            time.sleep(0.5)
        yield server
    finally:
        _stop_group(proc)


RUN_AND_MATERIALIZATIONS = """
query UiRunCheck($runId: ID!, $partition: String!) {
  runOrError(runId: $runId) {
    __typename
    ... on Run { runId status tags { key value } }
  }
  logs: assetOrError(assetKey: {path: ["query_logs"]}) {
    ... on Asset {
      assetMaterializations(partitions: [$partition]) {
        runId partition
        metadataEntries { label ... on IntMetadataEntry { intValue } }
      }
    }
  }
  quarantine: assetOrError(assetKey: {path: ["query_log_quarantine"]}) {
    ... on Asset {
      assetMaterializations(partitions: [$partition]) {
        runId partition
        metadataEntries { label ... on IntMetadataEntry { intValue } }
      }
    }
  }
}
"""


def _int_metadata(materialization: dict) -> dict[str, int]:
    return {e["label"]: e["intValue"] for e in materialization["metadataEntries"] if "intValue" in e}


def test_materialize_query_logs_partition_from_ui(stack: Stack, dagster_dev: Dagster, tmp_path: Path) -> None:
    partition = fill_past_hour(stack.env()[ENV_REDIS], EVENTS)
    expect = sync_api.expect
    # Every wait below gets the long timeout: on a busy 2-core CI machine the UI renders slowly, and
    # expect()'s own default (5 s) is not governed by page.set_default_timeout.
    expect.set_options(timeout=UI_TIMEOUT_MS)
    base = dagster_dev.url

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1600, "height": 1000})
        # On localhost the UI pops a "Join the Dagster community" dialog over everything; mark it as seen,
        # and should it show anyway, skip it whenever it gets in the way.
        context.add_init_script("window.localStorage.setItem('communityNux', '\"1\"')")
        page = context.new_page()
        page.set_default_timeout(UI_TIMEOUT_MS)
        page.add_locator_handler(
            page.get_by_text("Join the Dagster community"),
            lambda: page.get_by_role("button", name="Skip").click(),
        )
        try:
            # 1. The catalog lists both outputs of the multi-asset, linking to their pages.
            page.goto(f"{base}/assets")
            for name in ("query_logs", "query_log_quarantine"):
                link = page.get_by_role("link", name=re.compile(rf"^{name}(\s|$)"))
                expect(link.first).to_be_visible()
                expect(link.first).to_have_attribute("href", f"/assets/{name}")

            # ... and the lineage graph of their group draws a node for each (with links into its views).
            page.goto(f"{base}/locations/{CODE_LOCATION}/asset-groups/query_logs")
            expect(page.get_by_role("tab", name="Lineage")).to_be_visible()
            for name in ("query_logs", "query_log_quarantine"):
                expect(page.locator(f'a[href^="/assets/{name}?view="]').first).to_be_visible()

            # 2. Launch one partition from the asset page.
            page.goto(f"{base}/assets/query_logs")
            materialize = page.get_by_role("button", name=re.compile(r"Materialize…$"))
            expect(materialize).to_be_enabled()
            materialize.click()

            partition_dialog = page.get_by_role("dialog").filter(has_text="Partition selection")
            # query_logs is one output of a multi-asset that cannot be subset: the UI first asks to confirm
            # that query_log_quarantine gets materialized as well.
            confirm = page.get_by_role("dialog").filter(has_text="Additional assets will be materialized")
            expect(partition_dialog.or_(confirm)).to_be_visible()
            if confirm.is_visible():
                expect(confirm.get_by_text("query_log_quarantine")).to_be_visible()
                confirm.get_by_role("button", name="Confirm").click()
            expect(partition_dialog).to_be_visible()

            partition_input = partition_dialog.get_by_role("textbox").first
            partition_input.fill(partition)
            partition_input.press("Enter")
            expect(partition_dialog.get_by_text("1 partition", exact=True)).to_be_visible()
            launch = partition_dialog.get_by_role("button", name="Launch 1 run", exact=True)
            expect(launch).to_be_enabled()
            launch.click()

            # The toast links to the new run.
            toast_link = page.get_by_role("region", name=re.compile("Notifications")).get_by_role("link", name="View")
            run_path = toast_link.first.get_attribute("href", timeout=30_000)
            assert run_path and run_path.startswith("/runs/"), run_path
            run_id = run_path.removeprefix("/runs/").split("?")[0]

            # 3. The run page shows the partition and, once the daemon has launched and finished it, success.
            page.goto(f"{base}{run_path}")
            expect(page.get_by_text(f"partition: {partition}", exact=True)).to_be_visible()
            final_status = page.get_by_text(re.compile(r"^(Success|Failure|Canceled)$"))
            expect(final_status.first).to_be_visible(timeout=RUN_TIMEOUT_S * 1000)
            assert final_status.first.inner_text().strip() == "Success", (
                f"run {run_id} ended {final_status.first.inner_text()!r}:\n{dagster_dev.log_tail()}"
            )
        except BaseException:
            shot = tmp_path / "failure.png"
            try:
                page.screenshot(path=str(shot), full_page=True)
                print(f"\nscreenshot: {shot}\ndagster dev log tail:\n{dagster_dev.log_tail()}")
            except Exception:  # noqa: BLE001 - best-effort diagnostics only
                pass
            raise
        finally:
            expect.set_options(timeout=DEFAULT_EXPECT_TIMEOUT_MS)
            context.close()
            browser.close()

    # 4. Cross-check with the webserver's GraphQL API: the UI-launched run succeeded for that partition,
    # and both assets have a materialization of it from that run, with our events counted.
    data = dagster_dev.graphql(RUN_AND_MATERIALIZATIONS, {"runId": run_id, "partition": partition})
    run = data["runOrError"]
    assert run["__typename"] == "Run", run
    assert run["status"] == "SUCCESS", run
    tags = {t["key"]: t["value"] for t in run["tags"]}
    assert tags.get("dagster/partition") == partition, tags
    assert tags.get("dagster/from_ui") == "true", tags

    logs = [m for m in data["logs"]["assetMaterializations"] if m["runId"] == run_id]
    assert len(logs) == 1 and logs[0]["partition"] == partition, data["logs"]
    metadata = _int_metadata(logs[0])
    assert metadata.get("dagster/row_count") == len(EVENTS), metadata

    quarantine = [m for m in data["quarantine"]["assetMaterializations"] if m["runId"] == run_id]
    assert len(quarantine) == 1 and quarantine[0]["partition"] == partition, data["quarantine"]
    assert _int_metadata(quarantine[0]).get("dagster/row_count") == 0, quarantine
