"""``precompute campaign register|list|show|cancel``: the campaign registry from the command line.

Each command prints one JSON object. A campaign file is read and checked before any server starts: JSONL
(one campaign per line, its ads as a list) or CSV (one row per ad, grouped by ``campaign_id``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from datetime import datetime
from pathlib import Path
from typing import Any

from ..storage.files import first_bytes, not_text_reason, unreadable_reason

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}
# CSV columns that describe the campaign (the same on each of its rows); every other column belongs to the ad
CAMPAIGN_COLUMNS = ("campaign_id", "tenant_id", "launch_at", "end_at", "budget")
REQUIRED_CSV_COLUMNS = ("campaign_id", "tenant_id", "launch_at", "ad_id")


def _error(message: str) -> Exception:
    from .cli import CliError  # here, not at import: cli imports this module

    return CliError(message)


def check_campaign_file(path: str | Path) -> str:
    """``"jsonl"`` or ``"csv"`` by the file's suffix; a CliError when the suffix is unknown or the file is missing
    or unreadable."""
    path = Path(path)
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise _error(f"{path}: unknown suffix {path.suffix or '(none)'!r}; expected .jsonl, .ndjson or .csv")
    reason = unreadable_reason(path)
    if reason is not None:
        raise _error(f"{path}: {reason}")
    return kind


def read_campaign_file(path: str | Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The campaign records of a JSONL or CSV file and a label for each (``line 3``), for ``register_many``.

    A malformed file (bad JSON, a line that is not an object, a CSV without the campaign columns, rows of one
    campaign that disagree on its fields) is a CliError naming the line, and so is a file of no campaign; the records
    themselves are checked by the registry.
    """
    path = Path(path)
    kind = check_campaign_file(path)
    if (reason := not_text_reason(path, first_bytes(path), reads=())) is not None:  # not "not UTF-8 at byte 0"
        raise _error(f"{path}: {reason}")
    try:
        records, labels = _read_jsonl(path) if kind == "jsonl" else _read_csv(path)
    except UnicodeDecodeError as error:
        raise _error(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except OSError as error:
        raise _error(f"{path}: cannot read ({error.strerror or error})") from None
    if not records:  # an export that matched nothing: a pipeline must not read it as campaigns registered
        raise _error(f"{path}: no campaign in the file" + (" (a header and no row)" if kind == "csv" else ""))
    return records, labels


class _RepeatedField(ValueError):
    pass


def _without_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's fields; a field given twice is refused (``json`` keeps the last one, silently)."""
    fields: dict[str, Any] = {}
    for name, value in pairs:
        if name in fields:
            raise _RepeatedField(name)
        fields[name] = value
    return fields


def _read_jsonl(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    records, labels = [], []
    with open(path, encoding="utf-8-sig") as stream:  # -sig: a byte order mark, as Windows tools write, is no JSON
        # iterate the file, not str.splitlines: a JSON string may hold U+2028, which splitlines splits at
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line, object_pairs_hook=_without_repeats)
            except json.JSONDecodeError as error:
                raise _error(f"{path}: line {number}: malformed JSON ({error.msg} at column {error.colno})") from None
            except _RepeatedField as error:
                raise _error(f"{path}: line {number}: the field {error.args[0]!r} is given twice") from None
            if not isinstance(record, dict):
                raise _error(f"{path}: line {number}: not a JSON object but {type(record).__name__}")
            records.append(record)
            labels.append(f"line {number}")
    return records, labels


_SHORT = object()  # the value csv.DictReader gives the columns a row is too short to have


def _read_csv(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    # utf-8-sig: Excel's "CSV UTF-8" starts with a byte order mark, which made the first column '\ufeffcampaign_id'
    with open(path, encoding="utf-8-sig", newline="") as stream:
        reader = csv.DictReader(stream, restval=_SHORT)
        header = reader.fieldnames or []
        if repeated := sorted({column for column in header if column and header.count(column) > 1}):
            raise _error(f"{path}: the header names {', '.join(map(repr, repeated))} more than once")
        missing = [column for column in REQUIRED_CSV_COLUMNS if column not in header]
        if missing:
            raise _error(
                f"{path}: missing columns {missing}; a campaign CSV has one row per ad with columns campaign_id,"
                " tenant_id, launch_at, end_at (optional), budget (optional), ad_id and the feature columns"
            )
        campaigns: dict[str, dict[str, Any]] = {}
        first_line: dict[str, int] = {}
        disagreements: list[str] = []
        try:
            for row in reader:
                line = reader.line_num
                if None in row or _SHORT in row.values():
                    fields_in_row = len(header) + len(row.get(None, [])) - list(row.values()).count(_SHORT)
                    raise _error(f"{path}: line {line}: {fields_in_row} fields, the header has {len(header)}")
                values = {key: (None if value is None or value == "" else value) for key, value in row.items()}
                campaign_id = values["campaign_id"] or ""
                fields = {column: values.get(column) for column in CAMPAIGN_COLUMNS if column in header}
                ad = {key: value for key, value in values.items() if key not in CAMPAIGN_COLUMNS}
                record = campaigns.get(campaign_id)
                if record is None:
                    campaigns[campaign_id] = {**fields, "ads": [ad]}
                    first_line[campaign_id] = line
                    continue
                for column, value in fields.items():
                    if not _same(column, record[column], value):
                        disagreements.append(
                            f"campaign {campaign_id!r}: line {line} has {column} {value!r}, line"
                            f" {first_line[campaign_id]} has {record[column]!r}"
                        )
                record["ads"].append(ad)
        except csv.Error as error:
            raise _error(f"{path}: line {reader.line_num}: {error}") from None
    if disagreements:
        raise _error(f"{path}: rows of one campaign must agree on its fields: {'; '.join(disagreements)}")
    records = [{key: value for key, value in record.items() if value is not None} for record in campaigns.values()]
    return records, [f"line {first_line[campaign_id]}" for campaign_id in campaigns]


def _same(column: str, first: str | None, other: str | None) -> bool:
    """Whether two rows' texts of one campaign field mean the same: one instant (``...Z`` and ``...+00:00``), one
    budget (``100`` and ``100.0``); texts that are not a time or a number are compared as written (the registry
    then names the problem)."""
    if first == other or first is None or other is None:
        return first == other
    try:
        if column in ("launch_at", "end_at"):
            a, b = datetime.fromisoformat(first.strip()), datetime.fromisoformat(other.strip())
            return (a.tzinfo is None) == (b.tzinfo is None) and a == b
        if column == "budget":
            return float(first) == float(other)
    except ValueError:
        pass
    return False


def cmd_campaign(args: argparse.Namespace) -> int:
    """Run ``precompute campaign ...`` and print its JSON; registry refusals are CliErrors (one line, exit 2)."""
    from ..ml.features import AdFeatureSpec, spec_from_env
    from ..stack import ENV_APP_DB, Stack
    from ..storage.campaigns import MAX_ADS, CampaignError, CampaignRegistry, max_ads_from_env
    from .cli import _up, app_database

    command = args.campaign_command
    records, labels = read_campaign_file(args.file) if command == "register" else ([], [])  # before any server
    spec = AdFeatureSpec()  # list and cancel read no ads: a malformed feature set does not stop them
    if command in ("register", "show"):  # the feature set the Definitions train on (PRECOMPUTE_AD_*)
        try:
            spec = spec_from_env()
        except ValueError as error:
            raise _error(f"the ad feature set: {error}") from None
    max_ads = MAX_ADS  # only register counts ads: a malformed cap does not stop the others
    if command == "register":
        try:
            max_ads = max_ads_from_env()  # the cap the Definitions warm under (PRECOMPUTE_CAMPAIGN_MAX_ADS)
        except ValueError as error:
            raise _error(str(error)) from None
    env = _up(Stack(), redis=False)  # the registry is the database's: the sensors warm and clean the cache
    registry = CampaignRegistry(env[ENV_APP_DB], spec=spec, max_ads=max_ads)
    with app_database(env[ENV_APP_DB]):
        registry.ensure_schema()
        try:
            if command == "register":
                result = register(registry, records, labels, args.file)
            elif command == "list":
                campaigns = registry.list(tenant_id=args.tenant, status=args.status)
                result = {"count": len(campaigns), "campaigns": [c.to_json() for c in campaigns]}
            elif command == "show":
                campaign = registry.get(args.campaign_id)
                if campaign is None:
                    raise _error(f"campaign {args.campaign_id!r} is not registered")
                result = {**campaign.to_json(), "ads": registry.ads(args.campaign_id).to_dict("records")}
            elif command == "cancel":
                result = registry.cancel(args.campaign_id).to_json()
            else:
                raise _error(f"unknown campaign command {command!r}")
        except CampaignError as error:
            raise _error(str(error)) from None
    print(json.dumps(_finite(result)))
    return 0


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities (a feature an ad was registered without) as null: JSON has neither."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


def register(registry: Any, records: list[dict[str, Any]], labels: list[str], file: str | Path) -> dict[str, Any]:
    """Register the file's campaigns as one batch; what changed, as a JSON-ready dict."""
    before = registry.max_change_seq()  # writers are serialised: what this batch wrote is numbered after it
    campaigns = registry.register_many(records, labels=labels)
    written = [c for c in campaigns if c.change_seq > before]
    return {
        "file": str(file),
        "campaigns": len(campaigns),
        "new": sum(c.revision == 1 for c in written),
        "changed": sum(c.revision > 1 for c in written),
        "unchanged": len(campaigns) - len(written),
        "ads": sum(c.n_ads for c in campaigns),
        "registered": [c.to_json() for c in campaigns],
    }
