"""The campaign registry in PostgreSQL: campaigns, their ads with features, and which tenant owns each ad.

Services register a campaign before it launches (``register_campaign_launch``); a sensor reads what changed
since its cursor (``changed_since``) and what must be warmed (``due``: cold campaigns, and warm ones whose
values expire before they end), and a warming run records the revision it warmed and until when its values
live (``mark_warm``). A registration is validated whole before anything is written, and written in one
transaction: a refused campaign (or batch) leaves nothing behind. The feature set defaults to the deployment's
(``PRECOMPUTE_AD_*``, see ``spec_from_env``), and every field of an ad is stored, not only the feature columns.

``change_seq`` comes from one sequence, and every writer takes one advisory lock before drawing from it, so
sequence numbers become visible in the order they were drawn: a reader that has seen ``change_seq`` n has
seen every change up to n, and a sensor cursor never jumps over a change that commits late.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import math
import os
import re
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
import psycopg2
from psycopg2.extras import execute_values

from ..ml.budget import budget_problem
from ..ml.features import ID_COLUMN, AdFeatureSpec, feature_problems, spec_from_env
from .postgres import copy_in, transaction
from .tables import not_text

CAMPAIGN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # fit for a Dagster partition key: no commas
STATUSES = ("active", "cancelled")
FIELDS = ("campaign_id", "tenant_id", "launch_at", "end_at", "budget", "ads")
REQUIRED = ("campaign_id", "tenant_id", "launch_at", "ads")
DEFAULT_BUDGET = 1000.0
# A campaign's CTRs are written to Redis in one MULTI/EXEC (readers see all of them or none), which holds Redis for
# every other client until it ends: ~1.5 ms of server time at 1,000 ads, ~15-50 ms at 10,000, ~200-600 ms at 100,000.
# The default cap; PRECOMPUTE_CAMPAIGN_MAX_ADS (the campaign_registry resource's max_ads) moves it.
MAX_ADS = 10_000
ENV_CAMPAIGN_MAX_ADS = "PRECOMPUTE_CAMPAIGN_MAX_ADS"
_WRITE_LOCK = "precompute.campaign_registry"  # advisory lock of every writer that draws a change_seq

SCHEMA = """
CREATE SEQUENCE IF NOT EXISTS campaign_change_seq;
CREATE TABLE IF NOT EXISTS campaigns (
    campaign_id TEXT COLLATE "C" PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    launch_at TIMESTAMPTZ NOT NULL,
    end_at TIMESTAMPTZ,
    budget DOUBLE PRECISION NOT NULL CHECK (budget > 0 AND budget < 'Infinity'),
    status TEXT NOT NULL CHECK (status IN ('active', 'cancelled')),
    revision INTEGER NOT NULL CHECK (revision >= 1),
    warm_revision INTEGER,
    warm_until TIMESTAMPTZ,  -- when the warmed values expire (NULL: at the campaign's end)
    change_seq BIGINT NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    n_ads INTEGER NOT NULL,
    ads_digest TEXT NOT NULL,  -- sha256 of the normalised ads: an identical re-registration is a no-op
    CHECK (end_at IS NULL OR end_at > launch_at)
);
ALTER TABLE campaigns ADD COLUMN IF NOT EXISTS warm_until TIMESTAMPTZ;  -- registries created before it
-- the ctr_model version the warm values were scored with (NULL: not recorded, a registry created before it)
ALTER TABLE campaigns ADD COLUMN IF NOT EXISTS warm_model TEXT;
CREATE UNIQUE INDEX IF NOT EXISTS campaigns_change_seq ON campaigns (change_seq);
CREATE INDEX IF NOT EXISTS campaigns_status_launch_at ON campaigns (status, launch_at);
-- exactly the predicate of due()'s first arm: a sensor tick reads only the cold active campaigns, whatever
-- the table size
CREATE INDEX IF NOT EXISTS campaigns_cold_launch_at ON campaigns (launch_at)
    WHERE status = 'active' AND warm_revision IS DISTINCT FROM revision;
-- the other arm of due(): warm campaigns by when their values expire (an open-ended one is warmed again)
CREATE INDEX IF NOT EXISTS campaigns_warm_until ON campaigns (warm_until)
    WHERE status = 'active' AND warm_revision = revision;
CREATE INDEX IF NOT EXISTS campaigns_tenant ON campaigns (tenant_id);
CREATE TABLE IF NOT EXISTS campaign_ads (
    campaign_id TEXT COLLATE "C" NOT NULL REFERENCES campaigns ON DELETE CASCADE,
    position INTEGER NOT NULL,
    ad_id TEXT COLLATE "C" NOT NULL,
    features JSONB NOT NULL,
    PRIMARY KEY (campaign_id, position),
    UNIQUE (campaign_id, ad_id)
);
-- shared_ads(): the other campaigns that hold given ads
CREATE INDEX IF NOT EXISTS campaign_ads_ad_id ON campaign_ads (ad_id);
CREATE TABLE IF NOT EXISTS ad_tenants (
    ad_id TEXT COLLATE "C" PRIMARY KEY,
    tenant_id TEXT NOT NULL
);
-- the ads a warming wrote (recorded before it writes: record_written), with the features it scored: their values may
-- be in Redis. Those the campaign no longer has (dropped_ads) are deleted by its next warming or its cleanup, then
-- forgotten (forget_written)
CREATE TABLE IF NOT EXISTS campaign_written_ads (
    campaign_id TEXT COLLATE "C" NOT NULL REFERENCES campaigns ON DELETE CASCADE,
    ad_id TEXT COLLATE "C" NOT NULL,
    features JSONB NOT NULL,  -- those the campaign gave it last: another campaign's value is this one's if they match
    PRIMARY KEY (campaign_id, ad_id)
);
"""
_RECORD_WRITTEN = (
    "INSERT INTO campaign_written_ads (campaign_id, ad_id, features) SELECT a.campaign_id, a.ad_id, a.features"
    " FROM campaign_ads a JOIN campaigns c USING (campaign_id)"
)
_DROPPED_BEFORE = "campaign_dropped_ads"  # what campaign_written_ads replaced: its rows are moved there
_OBJECTS = (
    "campaign_change_seq", "campaigns", "campaign_ads", "ad_tenants", "campaigns_cold_launch_at",
    "campaigns_warm_until", "campaign_ads_ad_id", "campaign_written_ads",
)  # fmt: skip
_COLUMNS = (
    "campaign_id, tenant_id, launch_at, end_at, budget, status, revision, warm_revision, change_seq, updated_at, n_ads,"
    " warm_until, warm_model"
)
LATEST_TIME = datetime(2200, 1, 1, tzinfo=UTC)  # launch and end times are before it
DEFAULT_REFRESH_MARGIN = timedelta(days=1)  # warm values again this long before they expire
_LIVE = "launch_at <= %(until)s AND (end_at IS NULL OR end_at > %(now)s)"
# due(): each arm has its partial index (the cold campaigns; the warm ones by when their values expire)
_DUE = (
    f"SELECT {_COLUMNS} FROM campaigns WHERE status = 'active' AND warm_revision IS DISTINCT FROM revision AND {_LIVE}"
    f" UNION ALL SELECT {_COLUMNS} FROM campaigns WHERE status = 'active' AND warm_revision = revision AND {_LIVE}"
    " AND warm_until < %(refresh)s AND (end_at IS NULL OR warm_until < end_at)"
    " ORDER BY launch_at, campaign_id"
)
# warm(): the campaigns whose values the cache should hold now (NULL warm_until: until the campaign's end)
_WARM = (
    f"SELECT {_COLUMNS} FROM campaigns WHERE status = 'active' AND warm_revision = revision"
    " AND (end_at IS NULL OR end_at > %(now)s) AND (warm_until IS NULL OR warm_until > %(now)s)"
    " ORDER BY launch_at, campaign_id"
)


@dataclass(frozen=True)
class SharedAd:
    """An ad that other live campaigns of the tenant hold too (``CampaignRegistry.shared_ads``)."""

    until: datetime | None  # the latest expiry of their warm values (None: none of them is warm)
    unknown: bool  # one of them is warm without a recorded expiry (a registry from before ``warm_until``)
    same_features: bool  # every one of them gives the ad the features this campaign gives it


class CampaignError(ValueError):
    """A registration, batch or cancellation refused; the message names each campaign and every bad ad.

    ``problems`` holds the same as (campaign id or record label, reason) pairs.
    """

    def __init__(self, message: str, problems: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems)


@dataclass(frozen=True)
class Campaign:
    campaign_id: str
    tenant_id: str
    launch_at: datetime  # timezone-aware
    end_at: datetime | None
    budget: float
    status: str  # "active" | "cancelled"
    revision: int  # 1 when first registered; every change bumps it
    warm_revision: int | None  # the revision whose ads were warmed (None, or equal to revision)
    change_seq: int  # position in the registry's change log (a sensor's cursor)
    updated_at: datetime
    n_ads: int
    warm_until: datetime | None = None  # when the warmed values expire (None: at the campaign's end)
    warm_model: str | None = None  # the ctr_model version they were scored with (None: not recorded)

    @property
    def is_warm(self) -> bool:
        """The current revision was warmed and its values have not expired."""
        if self.warm_revision != self.revision:
            return False
        return self.warm_until is None or self.warm_until > datetime.now(UTC)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (ISO 8601 times in UTC), ``is_warm`` included."""
        return {
            "campaign_id": self.campaign_id,
            "tenant_id": self.tenant_id,
            "launch_at": self.launch_at.astimezone(UTC).isoformat(),
            "end_at": self.end_at.astimezone(UTC).isoformat() if self.end_at else None,
            "budget": self.budget,
            "status": self.status,
            "revision": self.revision,
            "warm_revision": self.warm_revision,
            "is_warm": self.is_warm,
            "warm_until": self.warm_until.astimezone(UTC).isoformat() if self.warm_until else None,
            "warm_model": self.warm_model,
            "change_seq": self.change_seq,
            "updated_at": self.updated_at.astimezone(UTC).isoformat(),
            "n_ads": self.n_ads,
        }


@dataclass
class _Checked:
    """One record after the checks that need no database: normalised, with its ads as COPY-ready rows."""

    where: str  # how messages name it: "campaign 'c1'", or "campaign 'c1' (line 3)" in a labelled batch
    campaign_id: str
    tenant_id: str
    launch_at: datetime
    end_at: datetime | None
    budget: float
    ads: list[tuple[str, str]]  # (ad_id, features as JSON text)
    digest: str


def _unstorable(text: str) -> str | None:
    """Why PostgreSQL would refuse this text, or None."""
    if "\x00" in text:
        return "contains a NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8 (lone surrogate)"
    return None


def _is_missing(value: Any) -> bool:
    """None, NaN, NaT or pd.NA: an absent value (a NaN budget is not absent, it is refused)."""
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _ad_name(ad_id: str | None, position: int) -> str:
    """How messages name an ad: by its id, or by its 1-based position when it has none."""
    return f"ad {ad_id!r}" if ad_id is not None and ad_id.strip() else f"ad #{position + 1}"


def _id_text(value: Any) -> str:
    """An ad id as text: a whole float (``7.0``: a pandas integer column beside a missing value) as the integer
    ``ads load`` makes of it, ``"7"``, else ``str``: "7.0" was an id no catalog row or client has. Up to 2**63, as
    ``ads load`` reads them (``ad_data._ids``): a snowflake id's float was registered as "1.2345678901234568e+18"."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer() and abs(value) < 2**63:
        return str(int(value))
    return value if isinstance(value, str) else str(value)


def _category_label(value: Any) -> str:
    """A categorical value as its text label: ``7``, ``7.0`` and ``" 7"`` are one category, ``"7"``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer():
        return str(int(value))
    return str(value).strip()


def _json_value(value: Any) -> tuple[str, str | None]:
    """A field of an ad outside the feature set as JSON text, and why it cannot be stored (or None): missing
    values become null, numpy scalars plain numbers, times ISO 8601 text; lists and objects stay as they are."""
    if getattr(value, "shape", None) == () and hasattr(value, "item"):
        value = value.item()  # a numpy scalar
    if _is_missing(value):
        return "null", None
    if isinstance(value, (datetime, date)):
        value = value.isoformat()
    if isinstance(value, str):
        return json.dumps(value), _unstorable(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "null", "is not a finite number"
    if isinstance(value, (bool, int, float, list, tuple, dict)):
        try:
            text = json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            return "null", "is not a JSON value (a number, text, true/false, a list or an object)"
        return text, _unstorable(json.dumps(value, ensure_ascii=False))
    return "null", f"is a {type(value).__name__}, not a JSON value (a number, text, true/false, a list or an object)"


def _timestamp(value: Any, name: str, problems: list[str]) -> datetime | None:
    """An aware datetime from a datetime or an ISO 8601 string; None (and a problem) otherwise."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip())
        except ValueError:
            problems.append(f"{name} {value!r} is not an ISO 8601 time")
            return None
    if not isinstance(value, datetime):
        problems.append(f"{name} must be a timezone-aware datetime, got {type(value).__name__}")
        return None
    if value.tzinfo is None or value.utcoffset() is None:
        problems.append(f"{name} {value.isoformat()} has no timezone (give an offset, e.g. +00:00)")
        return None
    # In UTC: Python compares two times of one zone by their wall clocks, ignoring ``fold``, so across a fall-back
    # an end 20 minutes before the launch passed for after it (and PostgreSQL's check then refused it).
    try:
        utc = (value.to_pydatetime() if isinstance(value, pd.Timestamp) else value).astimezone(UTC)
    except OverflowError:  # within its offset of year 1 or 9999
        problems.append(f"{name} {value.isoformat()} is out of range in UTC")
        return None
    if utc >= LATEST_TIME:  # its expiry (end plus grace) would pass year 9999: every warming run failed
        problems.append(
            f"{name} {value.isoformat()} is not before {LATEST_TIME:%Y} in UTC: leave end_at out for no end"
        )
        return None
    return utc


def _budget(value: Any, problems: list[str]) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        problems.append(f"budget must be a number, got {type(value).__name__}")
        return math.nan
    try:
        budget = float(value)
    except ValueError:
        problems.append(f"budget {value!r} is not a number")
        return math.nan
    if not math.isfinite(budget) or budget <= 0:
        problems.append(f"budget must be a positive finite number, got {value!r}")
    elif (problem := budget_problem(budget)) is not None:
        problems.append(problem)
    elif round(budget, 2) != budget:  # 0.001 was split into nothing, 10.005 into 10.01
        problems.append(f"budget {budget!r} is not a whole number of cents")
    return budget


def _aware_now(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(f"now must be timezone-aware, got {now.isoformat()}")
    return now


def _describe(problems: Sequence[tuple[str, str]], total: int) -> str:
    """One line naming each refused campaign with all its reasons (and the count, for a batch)."""
    grouped: dict[str, list[str]] = defaultdict(list)
    for where, reason in problems:
        grouped[where].append(reason)
    body = " | ".join(f"{where}: {'; '.join(reasons)}" for where, reasons in grouped.items())
    if total == 1:
        return f"refused, nothing registered: {body}"
    return f"{len(grouped)} of {total} campaigns refused, nothing registered: {body}"


def _copy_rows(rows: Iterable[Sequence[Any]]) -> io.StringIO:
    """PostgreSQL CSV for COPY; every field quoted, so an empty string is never read as NULL."""
    buffer = io.StringIO()
    csv.writer(buffer, quoting=csv.QUOTE_ALL, lineterminator="\n").writerows(rows)
    buffer.seek(0)
    return buffer


def _check_ad_owners(checked: list[_Checked], problems: list[tuple[str, str]]) -> None:
    """An ad belongs to one tenant only: within a batch too."""
    tenant_of: dict[str, str] = {}
    shared: set[str] = set()
    for c in checked:
        for ad_id, _ in c.ads:
            if tenant_of.setdefault(ad_id, c.tenant_id) != c.tenant_id:
                shared.add(ad_id)
    for c in checked if shared else ():
        clash = sorted({ad_id for ad_id, _ in c.ads if ad_id in shared})
        if clash:
            problems.append((c.where, f"ads {clash} are given to other tenants in the same batch"))


def checked_max_ads(value: object, name: str = "max_ads") -> int:
    """``value`` as the most ads a campaign may have; ``ValueError`` naming ``name`` unless a whole number >= 1."""
    try:
        number = int(str(value).strip())
    except ValueError:
        number = 0
    if number < 1:
        raise ValueError(f"{name} must be a whole number of ads of at least 1, got {value!r}")
    return number


def max_ads_from_env(environ: Mapping[str, str] | None = None) -> int:
    """The deployment's cap on a campaign's ads, ``PRECOMPUTE_CAMPAIGN_MAX_ADS`` (``MAX_ADS`` when unset or blank),
    as the Definitions read it; ``ValueError`` naming the variable when malformed. No Dagster: services use it too."""
    raw = (os.environ if environ is None else environ).get(ENV_CAMPAIGN_MAX_ADS) or ""
    return checked_max_ads(raw, ENV_CAMPAIGN_MAX_ADS) if raw.strip() else MAX_ADS


class CampaignRegistry:
    """The campaign registry in the application database behind ``url``.

    ``spec`` names the feature columns every ad must carry (the CTR model's; default: the deployment's, from
    ``PRECOMPUTE_AD_*``, see ``spec_from_env``); ``warming_horizon`` is how far ahead ``due`` looks by default,
    and how far in the past a new launch time may lie; ``refresh_margin`` is how long before warmed values
    expire ``due`` lists their campaign again (if it runs past them); ``max_ads`` is the most ads a campaign may
    have (default: the deployment's, from ``PRECOMPUTE_CAMPAIGN_MAX_ADS``, see ``max_ads_from_env``).
    """

    def __init__(
        self,
        url: str,
        *,
        spec: AdFeatureSpec | None = None,
        warming_horizon: timedelta = timedelta(hours=24),
        refresh_margin: timedelta = DEFAULT_REFRESH_MARGIN,
        max_ads: int | None = None,
    ) -> None:
        self.max_ads = max_ads_from_env() if max_ads is None else checked_max_ads(max_ads)
        if warming_horizon <= timedelta(0):
            raise ValueError(f"warming_horizon must be positive, got {warming_horizon}")
        if refresh_margin < timedelta(0):
            raise ValueError(f"refresh_margin must not be negative, got {refresh_margin}")
        self.url = url
        self.spec = spec or spec_from_env()
        self.warming_horizon = warming_horizon
        self.refresh_margin = refresh_margin

    def ensure_schema(self) -> None:
        """Create the sequence, tables and indexes if missing, and upgrade a registry created before
        ``warm_until`` (safe to call from many services at once)."""
        with transaction(self.url) as conn, conn.cursor() as cur:
            newest_column = (  # a registry created before it lacks it: the schema below adds it
                "EXISTS (SELECT FROM pg_attribute WHERE attrelid = to_regclass('campaigns') AND attname = 'warm_model'"
                " AND NOT attisdropped)"
            )
            cur.execute(
                "SELECT " + ", ".join([*(f"to_regclass('{name}')" for name in _OBJECTS), newest_column])
                + f", to_regclass('{_DROPPED_BEFORE}') IS NULL"
            )  # fmt: skip
            if all(cur.fetchone()):
                return
            # concurrent CREATE ... IF NOT EXISTS can still collide in the catalog: one creator at a time
            cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (_WRITE_LOCK,))
            cur.execute(
                "SELECT to_regclass('campaigns') IS NOT NULL AND NOT EXISTS (SELECT FROM pg_attribute"
                " WHERE attrelid = to_regclass('campaigns') AND attname = 'warm_until' AND NOT attisdropped)"
            )
            upgrading = cur.fetchone()[0]
            cur.execute("SELECT to_regclass('campaigns') IS NOT NULL AND to_regclass('campaign_written_ads') IS NULL")
            unrecorded = cur.fetchone()[0]
            cur.execute(SCHEMA)
            if unrecorded:  # warmed before warmings recorded what they wrote: the warm revisions' ads did
                cur.execute(_RECORD_WRITTEN + " WHERE c.warm_revision = c.revision ON CONFLICT DO NOTHING")
            cur.execute(
                f"SELECT to_regclass('{_DROPPED_BEFORE}') IS NOT NULL, EXISTS (SELECT FROM pg_attribute WHERE attrelid"
                f" = to_regclass('{_DROPPED_BEFORE}') AND attname = 'features' AND NOT attisdropped)"
            )
            dropped_before, with_features = cur.fetchone()
            if dropped_before:  # the ads dropped by a re-registration, as the releases of 7 December 2026 recorded them
                # the first of them kept no features: '{}' matches no campaign's, so the value is deleted as this
                # campaign's, and another campaign that holds the ad is warmed again with its own (as that release did)
                features = "features" if with_features else "'{}'::jsonb"
                cur.execute(
                    "INSERT INTO campaign_written_ads (campaign_id, ad_id, features)"
                    f" SELECT campaign_id, ad_id, {features} FROM {_DROPPED_BEFORE} ON CONFLICT DO NOTHING"
                )
                cur.execute(f"DROP TABLE {_DROPPED_BEFORE}")
            if upgrading:
                # when the values of warm open-ended campaigns expire was not recorded: no earlier than their
                # registration (warmed after it), so that lower bound has them warmed again, once
                cur.execute(
                    "UPDATE campaigns SET warm_until = updated_at"
                    " WHERE warm_revision = revision AND end_at IS NULL AND warm_until IS NULL"
                )

    # -- registration --------------------------------------------------------------------------------

    def register(
        self,
        campaign_id: str,
        tenant_id: str,
        launch_at: datetime,
        ads: Sequence[Mapping[str, Any]],
        *,
        end_at: datetime | None = None,
        budget: float = DEFAULT_BUDGET,
        now: datetime | None = None,
    ) -> Campaign:
        """Register a campaign or a new revision of it, in one transaction; an identical one is a no-op."""
        record = {
            "campaign_id": campaign_id,
            "tenant_id": tenant_id,
            "launch_at": launch_at,
            "end_at": end_at,
            "budget": budget,
            "ads": ads,
        }
        return self.register_many([record], now=now)[0]

    def register_many(
        self,
        records: Iterable[Mapping[str, Any]],
        *,
        now: datetime | None = None,
        labels: Sequence[str] | None = None,
    ) -> list[Campaign]:
        """Register many campaigns (mappings with the fields of ``register``) in one transaction, in order.

        Every record is checked first; if any is refused, the whole batch is, with a ``CampaignError`` that
        names every bad record and ad, and nothing is written. ``labels`` (``line 3``) name the records in that
        message beside their campaign id (default ``record 1``, ``record 2``...). Launch and end times may be
        aware datetimes or ISO 8601 strings with an offset.
        """
        records = list(records)
        now = _aware_now(now)
        show_labels = labels is not None or len(records) > 1
        labels = list(labels) if labels is not None else [f"record {i}" for i in range(1, len(records) + 1)]
        if len(labels) != len(records):
            raise ValueError(f"{len(labels)} labels for {len(records)} records")
        if not records:
            return []
        checked, problems, wheres = self._check(records, labels, show_labels)
        with transaction(self.url) as conn, conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (_WRITE_LOCK,))
            ids = [c.campaign_id for c in checked]
            cur.execute(
                "SELECT campaign_id, tenant_id, launch_at, end_at, budget, status, ads_digest FROM campaigns"
                " WHERE campaign_id = ANY(%s) FOR UPDATE",
                (ids,),
            )
            existing = {row[0]: row[1:] for row in cur.fetchall()}
            problems += self._check_registered(checked, existing, now)
            # an unchanged campaign's ads were accepted for its tenant already
            changed = [c for c in checked if self._differs(c, existing.get(c.campaign_id))]
            problems += self._check_ad_tenants(cur, changed)
            if problems:
                order = {where: i for i, where in enumerate(wheres)}  # the file's order, not the checks'
                problems.sort(key=lambda problem: order.get(problem[0], len(order)))
                raise CampaignError(_describe(problems, len(records)), problems)
            if changed:
                self._write(cur, changed)
            cur.execute(f"SELECT {_COLUMNS} FROM campaigns WHERE campaign_id = ANY(%s)", (ids,))
            rows = {row[0]: Campaign(*row) for row in cur.fetchall()}
        return [rows[c.campaign_id] for c in checked]

    def _check(
        self, records: list[Mapping[str, Any]], labels: list[str], show_labels: bool
    ) -> tuple[list[_Checked], list[tuple[str, str]], list[str]]:
        """The checks that need no database: fields, id, tenant, times, budget, ads and their features."""
        parts = [self._check_record(record, label, show_labels) for record, label in zip(records, labels, strict=True)]
        seen: dict[str, str] = {}
        for part in parts:
            campaign_id = part.get("campaign_id")
            if isinstance(campaign_id, str) and CAMPAIGN_ID.fullmatch(campaign_id):
                if campaign_id in seen:
                    part["reasons"].append(f"registered twice in one batch (also {seen[campaign_id]})")
                seen.setdefault(campaign_id, part["label"])
        ad_rows = self._check_ads(parts)
        problems: list[tuple[str, str]] = []
        checked: list[_Checked] = []
        for index, part in enumerate(parts):
            if part["reasons"]:
                problems.extend((part["where"], reason) for reason in part["reasons"])
                continue
            rows = ad_rows[index]
            digest = hashlib.sha256(json.dumps([self.spec.columns, rows]).encode()).hexdigest()
            checked.append(
                _Checked(part["where"], part["campaign_id"], part["tenant_id"], part["launch_at"], part["end_at"],
                         part["budget"], rows, digest)
            )  # fmt: skip
        _check_ad_owners(checked, problems)
        return checked, problems, [part["where"] for part in parts]

    def _check_record(self, record: Any, label: str, show_labels: bool) -> dict[str, Any]:
        """One record's fields, normalised, with the reasons it is refused (its ads are checked later)."""
        if not isinstance(record, Mapping):
            reason = f"not a mapping of campaign fields ({type(record).__name__})"
            return {"label": label, "where": label, "reasons": [reason], "ads": []}
        reasons: list[str] = []
        campaign_id = record.get("campaign_id")
        suffix = f" ({label})" if show_labels else ""
        if campaign_id is None:
            where = label
            reasons.append("missing campaign_id")
        else:
            where = f"campaign {campaign_id!r}{suffix}"
            if not (isinstance(campaign_id, str) and CAMPAIGN_ID.fullmatch(campaign_id)):
                reasons.append(
                    "campaign_id must be 1-64 characters of letters, digits, '_', '.', '-', starting with a letter"
                    " or digit (it becomes a Dagster partition key)"
                )
        unknown = sorted(map(str, set(record) - set(FIELDS)))
        if unknown:
            reasons.append(f"unknown fields {unknown}; expected {list(FIELDS)}")
        missing = [name for name in REQUIRED if name not in record and name != "campaign_id"]
        if missing:
            reasons.append(f"missing {', '.join(missing)}")
        tenant_id = record.get("tenant_id")
        if "tenant_id" in record:
            if tenant_id is not None and not isinstance(tenant_id, str):
                reasons.append(f"tenant_id must be a string, got {type(tenant_id).__name__}")
            elif tenant_id is None or not tenant_id.strip():
                reasons.append("tenant_id is blank")
            elif problem := _unstorable(tenant_id):
                reasons.append(f"tenant_id {problem}")
        launch_at = _timestamp(record["launch_at"], "launch_at", reasons) if "launch_at" in record else None
        end_at = record.get("end_at")
        end_at = None if _is_missing(end_at) else _timestamp(end_at, "end_at", reasons)
        if launch_at and end_at and end_at <= launch_at:
            reasons.append(f"end_at {end_at.isoformat()} is not after launch_at {launch_at.isoformat()}")
        budget = record.get("budget")
        budget = _budget(DEFAULT_BUDGET if budget is None else budget, reasons)
        ads: Any = record.get("ads", ())
        if isinstance(ads, (str, bytes, Mapping)) or not isinstance(ads, Iterable):
            reasons.append(f"ads must be a list of ads, got {type(ads).__name__}")
            ads = []
        else:
            ads = list(ads)
            if "ads" in record and not ads:
                reasons.append("no ads")
            elif len(ads) > self.max_ads:
                reasons.append(
                    f"{len(ads)} ads, more than the {self.max_ads} a campaign may have: split it into campaigns, "
                    f"or raise the cap ({ENV_CAMPAIGN_MAX_ADS})"
                )
                ads = []
        not_mappings = [i for i, ad in enumerate(ads, start=1) if not isinstance(ad, Mapping)]
        if not_mappings:
            reasons.append(f"ads {not_mappings} are not mappings of ad fields")
            ads = []
        elif ads:
            present = set().union(*(ad.keys() for ad in ads))
            absent = [column for column in self.spec.columns if column not in present]
            if absent:
                reasons.append(f"ads lack the feature columns {absent} (the feature set is {self.spec.columns})")
                ads = []
        return {
            "label": label, "where": where, "reasons": reasons, "campaign_id": campaign_id, "tenant_id": tenant_id,
            "launch_at": launch_at, "end_at": end_at, "budget": budget, "ads": ads,
        }  # fmt: skip

    def _check_ads(self, parts: list[dict[str, Any]]) -> dict[int, list[tuple[str, str]]]:
        """Validate every ad of the batch in one vectorised pass; bad ads become reasons of their campaign.

        Returns each campaign's ads as (ad_id, features as a JSON object: numbers as floats, categories as text,
        then the ad's other fields by name, as given), so a later feature set finds them.
        """
        spec = self.spec
        rows: dict[int, list[tuple[str, str]]] = {}
        every_ad = [ad for part in parts for ad in part["ads"]]
        if not every_ad:
            return rows
        # object columns as given: pandas would infer Arrow strings, which refuse lone surrogates
        frame = pd.DataFrame({c: pd.Series([ad.get(c) for ad in every_ad], dtype=object) for c in spec.columns})
        id_shapes = [not_text(v) for v in frame[ID_COLUMN]]
        shapes = [
            f"{ID_COLUMN} {id_shape}"
            if id_shape
            else next((f"{c} {p}" for c in spec.categorical if (p := not_text(ad.get(c)))), None)
            for id_shape, ad in zip(id_shapes, every_ad, strict=True)
        ]
        # an id that is no label (a list...) is no name either: such an ad is named by its position
        ids = [
            None if id_shape or _is_missing(v) else _id_text(v)
            for v, id_shape in zip(frame[ID_COLUMN], id_shapes, strict=True)
        ]
        frame[ID_COLUMN] = pd.Series(ids, index=frame.index, dtype=object)
        problems = [shape or problem for shape, problem in zip(shapes, feature_problems(frame, spec), strict=True)]
        numeric = {c: pd.to_numeric(frame[c], errors="coerce").astype(float).tolist() for c in spec.numeric}
        categorical = {c: [_category_label(v) for v in frame[c]] for c in spec.categorical}
        texts = [text for text in ids if text is not None] + [text for c in spec.categorical for text in categorical[c]]
        if _unstorable("".join(texts)):  # one check for the whole batch; ad by ad only when it fails
            for i, problem in enumerate(problems):
                named = [(ID_COLUMN, ids[i]), *((c, categorical[c][i]) for c in spec.categorical)]
                found = next((f"{c} {p}" for c, text in named if text is not None and (p := _unstorable(text))), None)
                problems[i] = problem or found
        # JSON by hand, column by column: 200,000 json.dumps calls of small dicts cost seconds; the repr of a
        # finite float is JSON, and categories repeat
        quoted = functools.lru_cache(maxsize=4096)(json.dumps)
        columns = [[f'"{c}": {v!r}' for v in numeric[c]] for c in spec.numeric]
        columns += [[f'"{c}": {quoted(v)}' for v in categorical[c]] for c in spec.categorical]
        # fields outside the feature set, stored too (a batch of feature columns only skips this)
        extra = sorted((set().union(*(ad.keys() for ad in every_ad)) - set(spec.columns)), key=str)
        if extra:
            names = {field: json.dumps(str(field)) for field in extra}
            other: list[list[str]] = []
            for i, ad in enumerate(every_ad):
                parts_of_ad = []
                for field in extra:
                    if field not in ad:
                        continue
                    text, problem = _json_value(ad[field])
                    problem = problem and f"field {str(field)!r} {problem}"
                    if name_problem := _unstorable(str(field)):
                        problem = f"a field name {name_problem}"
                    problems[i] = problems[i] or problem
                    parts_of_ad.append(f"{names[field]}: {text}")
                other.append(parts_of_ad)
            columns.append([", ".join(parts_of_ad) for parts_of_ad in other])
        features = ["{" + ", ".join(v for v in values if v) + "}" for values in zip(*columns, strict=True)]
        start = 0
        for index, part in enumerate(parts):
            n = len(part["ads"])
            span = range(start, start + n)
            start += n
            if not n:
                continue
            bad = [f"{_ad_name(ids[i], i - span.start)}: {problems[i]}" for i in span if problems[i] is not None]
            if bad:
                part["reasons"].append(f"{len(bad)} of {n} ads are invalid: " + ", ".join(bad))
            good = [(ids[i], features[i]) for i in span if problems[i] is None]
            counts = Counter(ids[i] for i in span if ids[i] is not None)  # valid or not: each id once
            if any(k > 1 for k in counts.values()):
                part["reasons"].append(f"duplicate ad ids {sorted(a for a, k in counts.items() if k > 1)}")
            rows[index] = good
        return rows

    def _check_registered(
        self, checked: list[_Checked], existing: dict[str, tuple], now: datetime
    ) -> list[tuple[str, str]]:
        """The checks against what is registered: the tenant of an existing campaign, and its launch time."""
        problems: list[tuple[str, str]] = []
        for c in checked:
            where = c.where
            before = existing.get(c.campaign_id)
            if before is not None and before[0] != c.tenant_id:
                problems.append((where, f"belongs to tenant {before[0]!r}, not {c.tenant_id!r}"))
            # a launch time already accepted stays acceptable: an old campaign can still change its end or ads
            if (before is None or before[1] != c.launch_at) and now - c.launch_at > self.warming_horizon:
                problems.append(
                    (where, f"launch_at {c.launch_at.isoformat()} is more than the warming horizon "
                            f"({self.warming_horizon}) in the past (now {now.isoformat()})")
                )  # fmt: skip
            if before is None and c.end_at is not None and c.end_at <= now:  # it would never be warmed
                problems.append((where, f"end_at {c.end_at.isoformat()} has passed (now {now.isoformat()})"))
        return problems

    @staticmethod
    def _check_ad_tenants(cur: psycopg2.extensions.cursor, checked: list[_Checked]) -> list[tuple[str, str]]:
        """Ads registered to another tenant; stages the batch's (ad, tenant) pairs in ``incoming_ads``."""
        problems: list[tuple[str, str]] = []
        pairs = {(ad_id, c.tenant_id) for c in checked for ad_id, _ in c.ads}
        cur.execute('CREATE TEMP TABLE incoming_ads (ad_id TEXT COLLATE "C", tenant_id TEXT) ON COMMIT DROP')
        copy_in(cur, "COPY incoming_ads (ad_id, tenant_id) FROM STDIN WITH (FORMAT csv)", _copy_rows(pairs))
        cur.execute(
            "SELECT i.ad_id, i.tenant_id, t.tenant_id FROM incoming_ads i JOIN ad_tenants t USING (ad_id)"
            " WHERE t.tenant_id <> i.tenant_id"
        )
        foreign = {(ad_id, tenant): other for ad_id, tenant, other in cur.fetchall()}
        if foreign:
            for c in checked:
                clash = sorted(f"{ad_id!r} (tenant {foreign[ad_id, c.tenant_id]!r})"
                               for ad_id, _ in c.ads if (ad_id, c.tenant_id) in foreign)  # fmt: skip
                if clash:
                    problems.append((c.where, f"ads registered to another tenant: {', '.join(clash)}"))
        return problems

    def _differs(self, c: _Checked, before: tuple | None) -> bool:
        if before is None:
            return True
        return tuple(before) != (c.tenant_id, c.launch_at, c.end_at, c.budget, "active", c.digest)

    @staticmethod
    def _write(cur: psycopg2.extensions.cursor, changed: list[_Checked]) -> None:
        """Insert or bump the changed campaigns, record their ads' tenant, and replace their ads."""
        cur.execute(
            "INSERT INTO ad_tenants (ad_id, tenant_id) SELECT DISTINCT ad_id, tenant_id FROM incoming_ads"
            " ON CONFLICT (ad_id) DO NOTHING"
        )
        execute_values(
            cur,
            """INSERT INTO campaigns AS c (campaign_id, tenant_id, launch_at, end_at, budget, n_ads, ads_digest,
                   status, revision, warm_revision, change_seq, updated_at)
               VALUES %s
               ON CONFLICT (campaign_id) DO UPDATE
               SET launch_at = EXCLUDED.launch_at, end_at = EXCLUDED.end_at, budget = EXCLUDED.budget,
                   n_ads = EXCLUDED.n_ads, ads_digest = EXCLUDED.ads_digest, status = 'active',
                   revision = c.revision + 1, warm_revision = NULL, warm_until = NULL, warm_model = NULL,
                   change_seq = EXCLUDED.change_seq, updated_at = now()""",
            [(c.campaign_id, c.tenant_id, c.launch_at, c.end_at, c.budget, len(c.ads), c.digest) for c in changed],
            template="(%s, %s, %s, %s, %s, %s, %s, 'active', 1, NULL, nextval('campaign_change_seq'), now())",
            page_size=1000,
        )
        cur.execute("DELETE FROM campaign_ads WHERE campaign_id = ANY(%s)", ([c.campaign_id for c in changed],))
        rows = (
            (c.campaign_id, position, ad_id, features)
            for c in changed
            for position, (ad_id, features) in enumerate(c.ads)
        )
        copy_in(
            cur,
            "COPY campaign_ads (campaign_id, position, ad_id, features) FROM STDIN WITH (FORMAT csv)",
            _copy_rows(rows),
        )

    def cancel(self, campaign_id: str) -> Campaign:
        """Cancel a campaign: bumps its revision and change_seq (its warmed values are to be removed).

        Cancelling a cancelled campaign changes nothing; an unknown id is a ``CampaignError``.
        """
        with transaction(self.url) as conn, conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (_WRITE_LOCK,))
            cur.execute(
                f"UPDATE campaigns SET status = 'cancelled', revision = revision + 1, warm_revision = NULL,"
                f" warm_until = NULL, warm_model = NULL, change_seq = nextval('campaign_change_seq'),"
                f" updated_at = now()"
                f" WHERE campaign_id = %s AND status <> 'cancelled' RETURNING {_COLUMNS}",
                (campaign_id,),
            )
            row = cur.fetchone()
            if row is None:
                cur.execute(f"SELECT {_COLUMNS} FROM campaigns WHERE campaign_id = %s", (campaign_id,))
                row = cur.fetchone()
            if row is None:
                raise CampaignError(f"campaign {campaign_id!r} is not registered", [(campaign_id, "not registered")])
            return Campaign(*row)

    def mark_warm(
        self, campaign_id: str, revision: int, warm_until: datetime | None = None, *, model: str | None = None
    ) -> bool:
        """Record that ``revision`` of the campaign is warm, only if it is still the current revision, with its
        values expiring at ``warm_until`` (timezone-aware; None: at the campaign's end), scored by ctr_model version
        ``model``. ``due`` lists the campaign again ``refresh_margin`` before they expire, unless it ends first.

        Not a change for ``changed_since`` (change_seq stays): a sensor does not re-read what it warmed.
        """
        if warm_until is not None and (warm_until.tzinfo is None or warm_until.utcoffset() is None):
            raise ValueError(f"warm_until must be timezone-aware, got {warm_until.isoformat()}")
        with transaction(self.url) as conn, conn.cursor() as cur:
            cur.execute(
                "UPDATE campaigns SET warm_revision = revision, warm_until = %s, warm_model = %s WHERE campaign_id = %s"
                " AND revision = %s",
                (warm_until, model, campaign_id, revision),
            )
            return cur.rowcount == 1

    def purge_ads(self, before: datetime) -> list[str]:
        """Delete the ads of campaigns that ended, or were cancelled, before ``before`` (timezone-aware); returns the
        ids of the campaigns whose ads went, sorted. Nothing warms such a campaign again, and a registration with a
        later end writes its ads again. The campaign rows stay, revision included: an id registered again is a new
        revision, with a warming run key of its own."""
        if before.tzinfo is None or before.utcoffset() is None:
            raise ValueError(f"before must be timezone-aware, got {before.isoformat()}")
        with transaction(self.url) as conn, conn.cursor() as cur:
            over = (
                " USING campaigns c WHERE a.campaign_id = c.campaign_id"
                " AND (c.end_at < %(before)s OR (c.status = 'cancelled' AND c.updated_at < %(before)s))"
            )
            cur.execute("DELETE FROM campaign_ads a" + over + " RETURNING a.campaign_id", {"before": before})
            purged = {campaign_id for (campaign_id,) in cur.fetchall()}
            cur.execute("DELETE FROM campaign_written_ads a" + over, {"before": before})
            return sorted(purged)

    # -- reading -------------------------------------------------------------------------------------

    def get(self, campaign_id: str) -> Campaign | None:
        """The campaign, or None when it is not registered."""
        with transaction(self.url) as conn, conn.cursor() as cur:
            cur.execute(f"SELECT {_COLUMNS} FROM campaigns WHERE campaign_id = %s", (campaign_id,))
            row = cur.fetchone()
        return Campaign(*row) if row else None

    def ads(self, campaign_id: str) -> pd.DataFrame:
        """The campaign's ads in registration order: ``ad_id`` and the spec's feature columns (empty if unknown)."""
        with transaction(self.url) as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT ad_id, features FROM campaign_ads WHERE campaign_id = %s ORDER BY position", (campaign_id,)
            )
            rows = cur.fetchall()
        frame = pd.DataFrame([{ID_COLUMN: ad_id, **features} for ad_id, features in rows], columns=self.spec.columns)
        for column in self.spec.numeric:
            frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(float)
        for column in (ID_COLUMN, *self.spec.categorical):
            frame[column] = frame[column].astype(object)
        return frame

    def record_written(self, campaign_id: str, revision: int) -> bool:
        """Record that a warming of ``revision`` writes the campaign's ads, with their features, before it writes them;
        False (nothing recorded) when the campaign is at another revision now: the caller must not write."""
        with transaction(self.url) as conn, conn.cursor() as cur:
            cur.execute(
                _RECORD_WRITTEN + " WHERE c.campaign_id = %s AND c.revision = %s"
                " ON CONFLICT (campaign_id, ad_id) DO UPDATE SET features = EXCLUDED.features",
                (campaign_id, revision),
            )
            cur.execute("SELECT revision FROM campaigns WHERE campaign_id = %s", (campaign_id,))
            row = cur.fetchone()
            return row is not None and row[0] == revision

    def dropped_ads(self, campaign_id: str) -> list[str]:
        """The ads a warming of the campaign wrote that its current revision does not have (their values may be in
        Redis) and no warming or cleanup has deleted yet, sorted."""
        with transaction(self.url) as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT w.ad_id FROM campaign_written_ads w WHERE w.campaign_id = %s AND NOT EXISTS"
                " (SELECT FROM campaign_ads a WHERE a.campaign_id = w.campaign_id AND a.ad_id = w.ad_id) ORDER BY 1",
                (campaign_id,),
            )
            return [ad_id for (ad_id,) in cur.fetchall()]

    def forget_written(self, campaign_id: str, ad_ids: Collection[str] | None = None) -> None:
        """Forget ``ad_ids`` (None: all) as ads the campaign wrote: their values were deleted, or are the current
        revision's (a re-registration after a warming records them anew)."""
        with transaction(self.url) as conn, conn.cursor() as cur:
            cur.execute(
                "DELETE FROM campaign_written_ads WHERE campaign_id = %(id)s"
                " AND (%(ads)s::text[] IS NULL OR ad_id = ANY(%(ads)s))",
                {"id": campaign_id, "ads": None if ad_ids is None else sorted(ad_ids)},
            )

    def shared_ads(self, campaign: Campaign, ad_ids: Collection[str], now: datetime) -> dict[str, SharedAd]:
        """Of ``ad_ids``, those another active campaign of ``campaign``'s tenant has that has not ended by ``now``, with
        what those campaigns wrote for it (``SharedAd``): one indexed query, whatever the number of the tenant's
        campaigns."""
        if not ad_ids:
            return {}
        with transaction(self.url) as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT a.ad_id,"
                " max(c.warm_until) FILTER (WHERE c.warm_revision = c.revision),"
                " bool_or(c.warm_revision = c.revision AND c.warm_until IS NULL),"
                " bool_and(a.features = COALESCE(gone.features, mine.features))"
                " FROM campaign_ads a JOIN campaigns c USING (campaign_id)"
                " LEFT JOIN campaign_ads mine ON mine.campaign_id = %(id)s AND mine.ad_id = a.ad_id"
                # the features this campaign's value was scored with: those its last warming wrote, else its current
                " LEFT JOIN campaign_written_ads gone ON gone.campaign_id = %(id)s AND gone.ad_id = a.ad_id"
                " WHERE a.ad_id = ANY(%(ads)s) AND c.campaign_id <> %(id)s AND c.tenant_id = %(tenant)s"
                " AND c.status = 'active' AND (c.end_at IS NULL OR c.end_at > %(now)s) GROUP BY a.ad_id",
                {"ads": sorted(ad_ids), "id": campaign.campaign_id, "tenant": campaign.tenant_id,
                 "now": _aware_now(now)},
            )  # fmt: skip
            return {ad: SharedAd(until, bool(unknown), bool(same)) for ad, until, unknown, same in cur.fetchall()}

    def held_ads(self, ad_ids: Collection[str], now: datetime) -> set[str]:
        """Of ``ad_ids``, those whose CTR keys hold an active campaign's warm values at ``now``: its current revision is
        warm (``mark_warm``), its warming wrote the ad (``record_written``), and the values have not expired
        (``warm_until``; none recorded: at the campaign's end). Nothing else may overwrite them: they are scored from
        the campaign's own features and expire with it. A campaign not warmed, or re-registered since its warming
        (whose old values' expiry the registration no longer knows), holds nothing until its next warming, which
        writes its keys over whatever is there. One query on the indexes of ``campaign_ads`` and the written ads' key,
        with no change of schema."""
        if not ad_ids:
            return set()
        with transaction(self.url) as conn, conn.cursor() as cur:
            cur.execute("SET LOCAL statement_timeout = '5s'")  # a sensor's tick waits on it: a lock fails it soon
            cur.execute(
                "SELECT DISTINCT a.ad_id FROM campaign_ads a JOIN campaigns c USING (campaign_id)"
                " WHERE a.ad_id = ANY(%(ads)s) AND c.status = 'active' AND c.warm_revision = c.revision"
                " AND (c.warm_until > %(now)s OR (c.warm_until IS NULL AND (c.end_at IS NULL OR c.end_at > %(now)s)))"
                " AND EXISTS (SELECT FROM campaign_written_ads w WHERE w.campaign_id = a.campaign_id"
                " AND w.ad_id = a.ad_id)",
                {"ads": sorted(ad_ids), "now": _aware_now(now)},
            )
            return {ad for (ad,) in cur.fetchall()}

    def list(self, *, tenant_id: str | None = None, status: str | None = None) -> list[Campaign]:
        """Campaigns by launch time (then id), optionally of one tenant and/or one status."""
        if status is not None and status not in STATUSES:
            raise CampaignError(f"unknown status {status!r}; expected one of {list(STATUSES)}")
        with transaction(self.url) as conn, conn.cursor() as cur:
            cur.execute(
                f"SELECT {_COLUMNS} FROM campaigns WHERE (%(tenant)s::text IS NULL OR tenant_id = %(tenant)s)"
                " AND (%(status)s::text IS NULL OR status = %(status)s) ORDER BY launch_at, campaign_id",
                {"tenant": tenant_id, "status": status},
            )
            return [Campaign(*row) for row in cur.fetchall()]

    def changed_since(self, change_seq: int, *, limit: int = 10_000) -> list[Campaign]:
        """Up to ``limit`` campaigns changed after ``change_seq`` (registered, changed, cancelled), ascending.

        Feed the last campaign's ``change_seq`` back to read the next page; a change that commits later
        always gets a higher number (see the module docstring), so the cursor never skips one.
        """
        if limit <= 0:
            raise ValueError("limit must be positive")
        with transaction(self.url) as conn, conn.cursor() as cur:
            cur.execute(
                f"SELECT {_COLUMNS} FROM campaigns WHERE change_seq > %s ORDER BY change_seq LIMIT %s",
                (change_seq, limit),
            )
            return [Campaign(*row) for row in cur.fetchall()]

    def due(
        self, now: datetime, horizon: timedelta | None = None, *, refresh_margin: timedelta | None = None
    ) -> list[Campaign]:
        """Active campaigns launching by ``now + horizon`` (default the warming horizon), not ended, and either
        not warm or warm with values that expire before ``now + refresh_margin`` (default the registry's, 1 day)
        and before the campaign ends (an open-ended campaign outlives its values: it is warmed again); by launch
        time. Campaigns that launched already but have not ended are due too. Two indexed reads, one per case."""
        now = _aware_now(now)
        until = now + (self.warming_horizon if horizon is None else horizon)
        refresh = now + (self.refresh_margin if refresh_margin is None else refresh_margin)
        with transaction(self.url) as conn, conn.cursor() as cur:
            cur.execute(_DUE, {"until": until, "now": now, "refresh": refresh})
            return [Campaign(*row) for row in cur.fetchall()]

    def warm(self, now: datetime) -> list[Campaign]:
        """Active campaigns whose current revision is warm with values that have not expired by ``now``, not ended;
        by launch time. One read of the partial index of warm campaigns."""
        with transaction(self.url) as conn, conn.cursor() as cur:
            cur.execute(_WARM, {"now": _aware_now(now)})
            return [Campaign(*row) for row in cur.fetchall()]

    def max_change_seq(self) -> int:
        """The newest change_seq (0 when the registry is empty): a sensor's starting cursor."""
        with transaction(self.url) as conn, conn.cursor() as cur:
            cur.execute("SELECT COALESCE(max(change_seq), 0) FROM campaigns")
            return int(cur.fetchone()[0])


def register_campaign_launch(
    url: str,
    campaign_id: str,
    tenant_id: str,
    launch_at: datetime,
    ads: Sequence[Mapping[str, Any]],
    *,
    end_at: datetime | None = None,
    budget: float = DEFAULT_BUDGET,
) -> Campaign:
    """Register a campaign before its launch (creating the registry's tables if needed); the entry point for
    services. The ads must carry the deployment's feature columns (``PRECOMPUTE_AD_*``, see ``spec_from_env``);
    their other fields are stored too. Raises ``CampaignError`` naming every problem; nothing is written then."""
    registry = CampaignRegistry(url)
    registry.ensure_schema()
    return registry.register(campaign_id, tenant_id, launch_at, ads, end_at=end_at, budget=budget)


__all__ = [
    "CAMPAIGN_ID",
    "Campaign",
    "CampaignError",
    "CampaignRegistry",
    "register_campaign_launch",
]
