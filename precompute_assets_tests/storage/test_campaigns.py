"""The campaign registry against the real PostgreSQL: revisions, change log, warmth, and every refusal."""

from __future__ import annotations

import math
import threading
from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd
import psycopg2
import pytest

from precompute_assets.ml.features import AdFeatureSpec
from precompute_assets.storage import campaigns as registry_module
from precompute_assets.storage.campaigns import (
    CAMPAIGN_ID,
    MAX_ADS,
    Campaign,
    CampaignError,
    CampaignRegistry,
    register_campaign_launch,
)
from precompute_assets.storage.postgres import libpq_url

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
NEW_YORK = ZoneInfo("America/New_York")
LAUNCH = NOW + timedelta(hours=6)


def ad(ad_id: str, **features) -> dict:
    return {"ad_id": ad_id, "quality": 0.5, "bid": 1.0, "text_len": 40, "category": "shoes", **features}


def ads(*ids: str) -> list[dict]:
    return [ad(ad_id) for ad_id in ids]


@pytest.fixture
def registry(app_db: str) -> CampaignRegistry:
    registry = CampaignRegistry(app_db)
    registry.ensure_schema()
    return registry


def count(url: str, table: str) -> int:
    with psycopg2.connect(libpq_url(url)) as conn, conn.cursor() as cur:
        cur.execute(f"SELECT count(*) FROM {table}")
        return cur.fetchone()[0]


def nothing_written(registry: CampaignRegistry) -> bool:
    return all(count(registry.url, t) == 0 for t in ("campaigns", "campaign_ads", "ad_tenants"))


# -- registering, revisions, the change log -------------------------------------------------------------


def test_register_stores_the_campaign_and_its_ads_in_order(registry):
    campaign = registry.register(
        "spring-sale_1.0", "acme", LAUNCH, [ad("a2", quality=0.9), ad("a1", category=7)], budget=250, now=NOW
    )
    assert isinstance(campaign, Campaign)
    assert (campaign.campaign_id, campaign.tenant_id, campaign.status) == ("spring-sale_1.0", "acme", "active")
    assert campaign.launch_at == LAUNCH and campaign.launch_at.tzinfo is not None and campaign.end_at is None
    assert (campaign.budget, campaign.revision, campaign.warm_revision, campaign.n_ads) == (250.0, 1, None, 2)
    assert campaign.change_seq >= 1 and not campaign.is_warm
    assert registry.get("spring-sale_1.0") == campaign
    assert registry.get("unknown") is None
    frame = registry.ads("spring-sale_1.0")
    assert list(frame.columns) == ["ad_id", "quality", "bid", "text_len", "category"]
    assert frame["ad_id"].tolist() == ["a2", "a1"]  # registration order
    assert frame["quality"].tolist() == [0.9, 0.5] and frame["quality"].dtype == float
    assert frame["category"].tolist() == ["shoes", "7"]  # categories are text labels
    assert registry.ads("unknown").empty and list(registry.ads("unknown").columns) == list(frame.columns)


def test_identical_registration_is_a_no_op(registry):
    first = registry.register("c1", "acme", LAUNCH, ads("a1", "a2"), end_at=LAUNCH + timedelta(days=7), now=NOW)
    same_values = [ad("a1", text_len=40.0, bid=1, category=" shoes"), ad("a2")]  # the same, written differently
    again = registry.register(
        "c1", "acme", LAUNCH.astimezone(timezone(timedelta(hours=2))), same_values,
        end_at=LAUNCH + timedelta(days=7), now=NOW + timedelta(hours=1),
    )  # fmt: skip
    assert again == first
    assert registry.max_change_seq() == first.change_seq


@pytest.mark.parametrize(
    "change",
    [
        {"ads": ads("a1", "a2", "a3")},  # an ad added
        {"ads": ads("a2", "a1")},  # the order changed
        {"ads": [ad("a1"), ad("a2", bid=2.5)]},  # a feature changed
        {"launch_at": LAUNCH + timedelta(hours=1)},
        {"end_at": LAUNCH + timedelta(days=3)},
        {"budget": 999.0},
    ],
)
def test_any_change_bumps_revision_and_change_seq_and_clears_warmth(registry, change):
    first = registry.register("c1", "acme", LAUNCH, ads("a1", "a2"), now=NOW)
    assert registry.mark_warm("c1", first.revision) and registry.get("c1").is_warm
    fields = {"launch_at": LAUNCH, "ads": ads("a1", "a2"), **change}
    changed = registry.register("c1", "acme", fields.pop("launch_at"), fields.pop("ads"), now=NOW, **fields)
    assert changed.revision == 2 and changed.change_seq > first.change_seq
    assert not changed.is_warm and changed.warm_revision is None
    assert changed.n_ads == len(registry.ads("c1"))


def test_cancel_bumps_the_revision_once_and_registering_again_reactivates(registry):
    first = registry.register("c1", "acme", LAUNCH, ads("a1"), now=NOW)
    registry.mark_warm("c1", 1)
    cancelled = registry.cancel("c1")
    assert (cancelled.status, cancelled.revision, cancelled.is_warm) == ("cancelled", 2, False)
    assert cancelled.change_seq > first.change_seq
    assert registry.cancel("c1") == cancelled  # cancelling twice changes nothing
    back = registry.register("c1", "acme", LAUNCH, ads("a1"), now=NOW)  # same content, active again
    assert (back.status, back.revision) == ("active", 3) and back.change_seq > cancelled.change_seq
    with pytest.raises(CampaignError, match="campaign 'nope' is not registered"):
        registry.cancel("nope")


def test_mark_warm_only_marks_the_current_revision_and_is_not_a_change(registry):
    registry.register("c1", "acme", LAUNCH, ads("a1"), now=NOW)
    registry.register("c1", "acme", LAUNCH, ads("a1", "a2"), now=NOW)
    seq = registry.max_change_seq()
    assert not registry.mark_warm("c1", 1)  # a run that warmed the old revision finished late
    assert not registry.get("c1").is_warm
    assert registry.mark_warm("c1", 2) and registry.mark_warm("c1", 2)
    assert registry.get("c1").warm_revision == 2 and registry.get("c1").is_warm
    assert registry.max_change_seq() == seq and registry.changed_since(seq) == []
    assert not registry.mark_warm("unknown", 1)


def test_changed_since_pages_through_changes_in_order(registry):
    assert registry.max_change_seq() == 0 and registry.changed_since(0) == []
    for i in range(5):
        registry.register(f"c{i}", "acme", LAUNCH, ads(f"a{i}"), now=NOW)
    registry.register("c1", "acme", LAUNCH, ads("a1"), budget=5, now=NOW)  # c1 moves to the end
    registry.cancel("c3")
    seen, cursor = [], 0
    while page := registry.changed_since(cursor, limit=2):
        assert len(page) <= 2
        seen += [c.campaign_id for c in page]
        cursor = page[-1].change_seq
    assert seen == ["c0", "c2", "c4", "c1", "c3"]
    assert cursor == registry.max_change_seq()
    with pytest.raises(ValueError):
        registry.changed_since(0, limit=0)


def test_due_lists_active_cold_campaigns_inside_the_horizon_that_have_not_ended(registry):
    def register(campaign_id, launch_in_hours, at=NOW, **options):
        launch = NOW + timedelta(hours=launch_in_hours)
        return registry.register(campaign_id, "acme", launch, ads(f"{campaign_id}-ad"), now=at, **options)

    register("soon", 2)
    register("tomorrow", 23)
    register("later", 25)  # outside the default 24 h
    register("live", -3)  # launched already, still running: warm it now
    running = NOW - timedelta(hours=2)  # registered while they ran: a new campaign that has ended is refused
    register("over", -3, at=running, end_at=NOW - timedelta(hours=1))
    register("ends-now", -3, at=running, end_at=NOW)
    register("warm", 1)
    registry.mark_warm("warm", 1)
    register("gone", 1)
    registry.cancel("gone")
    assert [c.campaign_id for c in registry.due(NOW)] == ["live", "soon", "tomorrow"]
    assert [c.campaign_id for c in registry.due(NOW, timedelta(hours=3))] == ["live", "soon"]
    assert "later" in [c.campaign_id for c in registry.due(NOW + timedelta(hours=2))]
    register("warm", 1, budget=1)  # a change makes it cold again
    assert "warm" in [c.campaign_id for c in registry.due(NOW)]
    narrow = CampaignRegistry(registry.url, warming_horizon=timedelta(hours=2))
    assert [c.campaign_id for c in narrow.due(NOW)] == ["live", "warm", "soon"]


def test_warm_values_that_expire_while_the_campaign_runs_make_it_due_again(registry):
    registry.register("open", "acme", LAUNCH, ads("o1"), now=NOW)  # no end
    end = LAUNCH + timedelta(days=60)
    registry.register("ends", "acme", LAUNCH, ads("e1"), end_at=end, now=NOW)
    registry.register("legacy", "acme", LAUNCH, ads("l1"), now=NOW)
    expires = NOW + timedelta(days=30)  # an open-ended campaign's values: 30 days after warming
    assert registry.mark_warm("open", 1, warm_until=expires)
    assert registry.mark_warm("ends", 1, warm_until=end + timedelta(hours=1))  # its end plus the grace
    assert registry.mark_warm("legacy", 1)  # the old call: values live until the campaign's end (here: none)
    assert registry.get("open").warm_until == expires and registry.get("legacy").warm_until is None
    assert registry.get("open").to_json()["warm_until"] == expires.isoformat()

    def due(at, **options):
        return [c.campaign_id for c in registry.due(at, **options)]

    assert due(NOW) == [] and due(NOW + timedelta(days=28)) == []
    assert due(NOW + timedelta(days=29, hours=1)) == ["open"]  # a day before its values expire
    assert due(NOW + timedelta(days=31)) == ["open"]  # day 31: expired, still running, still due
    assert due(NOW + timedelta(days=26), refresh_margin=timedelta(days=5)) == ["open"]
    narrow = CampaignRegistry(registry.url, refresh_margin=timedelta(hours=1))
    assert [c.campaign_id for c in narrow.due(NOW + timedelta(days=29, hours=1))] == []
    assert due(end - timedelta(hours=12)) == ["open"]  # "ends" outlives its values' refresh: never again
    assert due(end + timedelta(hours=1)) == ["open"]

    # warmed again: no longer due; is_warm says whether the values are still there
    assert registry.mark_warm("open", 1, warm_until=expires + timedelta(days=30))
    assert due(NOW + timedelta(days=31)) == []
    registry.mark_warm("open", 1, warm_until=datetime.now(UTC) - timedelta(hours=1))
    assert registry.get("open").warm_revision == 1 and not registry.get("open").is_warm
    registry.mark_warm("open", 1, warm_until=datetime.now(UTC) + timedelta(days=30))
    assert registry.get("open").is_warm and registry.get("legacy").is_warm
    with pytest.raises(ValueError, match="warm_until must be timezone-aware"):
        registry.mark_warm("open", 1, warm_until=datetime(2026, 4, 1))

    # a change or a cancellation forgets when the old revision's values expire
    changed = registry.register("open", "acme", LAUNCH, ads("o1", "o2"), now=NOW)
    assert changed.warm_until is None and due(NOW) == ["open"]
    assert registry.cancel("ends").warm_until is None


def test_due_reads_both_of_its_cases_through_their_partial_indexes(registry):
    registry.register("cold", "acme", LAUNCH, ads("c1"), now=NOW)
    registry.register("warm", "acme", LAUNCH, ads("w1"), now=NOW)
    registry.mark_warm("warm", 1, warm_until=NOW + timedelta(hours=3))
    assert [c.campaign_id for c in registry.due(NOW)] == ["cold", "warm"]
    with psycopg2.connect(libpq_url(registry.url)) as conn, conn.cursor() as cur:
        cur.execute("ANALYZE campaigns")
        cur.execute("SET enable_seqscan = off")  # a tiny table: ask whether an index serves each arm
        cur.execute("EXPLAIN " + registry_module._DUE, {"until": LAUNCH, "now": NOW, "refresh": NOW})
        plan = "\n".join(row[0] for row in cur.fetchall())
    assert "campaigns_cold_launch_at" in plan and "campaigns_warm_until" in plan, plan


def test_ensure_schema_upgrades_a_registry_created_before_warm_until(registry):
    registry.register("open", "acme", LAUNCH, ads("o1"), now=NOW)
    registry.register("ends", "acme", LAUNCH, ads("e1"), end_at=LAUNCH + timedelta(days=9), now=NOW)
    registry.register("cold", "acme", LAUNCH, ads("c1"), now=NOW)
    registry.mark_warm("open", 1)
    registry.mark_warm("ends", 1)
    with psycopg2.connect(libpq_url(registry.url)) as conn, conn.cursor() as cur:
        cur.execute("DROP INDEX campaigns_warm_until; ALTER TABLE campaigns DROP COLUMN warm_until")
    registry.ensure_schema()  # as every service and run does: the column and index come back
    # when the open-ended campaign's values expire was never recorded: it is warmed again, once
    assert registry.get("open").warm_until == registry.get("open").updated_at
    assert registry.get("ends").warm_until is None
    now = datetime.now(UTC)
    assert [c.campaign_id for c in registry.due(now)] == ["cold", "open"]
    registry.mark_warm("open", 1, warm_until=now + timedelta(days=30))
    registry.ensure_schema()
    assert [c.campaign_id for c in registry.due(now)] == ["cold"]


@pytest.mark.parametrize("features", [True, False])  # 944f5c4's table, and 63bb671's before it (no features)
def test_ensure_schema_moves_the_dropped_ads_an_earlier_release_recorded(registry, features):
    """Releases of 7 December recorded the ads a re-registration dropped in campaign_dropped_ads, which
    campaign_written_ads replaced without taking its rows: an upgraded registry forgot them, and their values stayed
    served after the next warming and a cancel (h_upgrade)."""
    registry.register("c", "acme", LAUNCH, ads("k1", "k2", "k3"), now=NOW)
    registry.mark_warm("c", 1)
    registry.register("c", "acme", LAUNCH, ads("k1"), now=NOW)  # drops k2 and k3
    with psycopg2.connect(libpq_url(registry.url)) as conn, conn.cursor() as cur:
        cur.execute(  # the registry of such a release: its table, and none of the one replacing it
            'CREATE TABLE campaign_dropped_ads (campaign_id TEXT COLLATE "C" NOT NULL REFERENCES campaigns ON'
            ' DELETE CASCADE, ad_id TEXT COLLATE "C" NOT NULL, PRIMARY KEY (campaign_id, ad_id));'
            " INSERT INTO campaign_dropped_ads VALUES ('c', 'k2'), ('c', 'k3'); DROP TABLE campaign_written_ads"
        )
        if features:
            cur.execute("ALTER TABLE campaign_dropped_ads ADD COLUMN features JSONB NOT NULL DEFAULT '{\"q\": 1}'")
    registry.ensure_schema()
    assert registry.dropped_ads("c") == ["k2", "k3"]
    with psycopg2.connect(libpq_url(registry.url)) as conn, conn.cursor() as cur:
        cur.execute("SELECT to_regclass('campaign_dropped_ads')")
        assert cur.fetchone()[0] is None  # moved, then gone: a release in between left it beside the new one too


def test_list_filters_by_tenant_and_status(registry):
    registry.register("b", "acme", LAUNCH + timedelta(hours=1), ads("a1"), now=NOW)
    registry.register("a", "acme", LAUNCH, ads("a2"), now=NOW)
    registry.register("c", "globex", LAUNCH, ads("g1"), now=NOW)
    registry.cancel("c")
    assert [c.campaign_id for c in registry.list()] == ["a", "c", "b"]  # by launch time, then id
    assert [c.campaign_id for c in registry.list(tenant_id="acme")] == ["a", "b"]
    assert [c.campaign_id for c in registry.list(status="cancelled")] == ["c"]
    assert registry.list(tenant_id="globex", status="active") == []
    with pytest.raises(CampaignError, match="unknown status 'paused'"):
        registry.list(status="paused")


def test_shared_ads_are_those_of_the_tenants_other_live_campaigns(registry):
    """What a campaign's cleanup keeps: read in one query (it looped over the tenant's campaigns, a query each: 20 s
    with 2,000 of them)."""
    registry.register("a", "acme", LAUNCH, ads("x1", "x2", "x3", "x4"), now=NOW)
    registry.register("b", "acme", LAUNCH, ads("x1", "y1"), now=NOW)
    registry.register("c", "acme", LAUNCH, ads("x2"), end_at=LAUNCH + timedelta(hours=1), now=NOW)
    registry.register("d", "acme", LAUNCH, ads("x3"), now=NOW)
    registry.cancel("d")
    registry.register("e", "acme", LAUNCH, [ad("x4", quality=0.9)], now=NOW)  # other features for x4
    registry.mark_warm("b", 1, warm_until=LAUNCH + timedelta(hours=30))
    a = registry.get("a")
    shared = registry.shared_ads(a, {"x1", "x2", "x3", "x4"}, NOW)
    assert set(shared) == {"x1", "x2", "x4"}  # not d (cancelled)
    assert shared["x1"].until == LAUNCH + timedelta(hours=30) and shared["x2"].until is None  # b warm, c cold
    assert [shared[x].same_features for x in ("x1", "x2", "x4")] == [True, True, False]
    assert set(registry.shared_ads(a, {"x1", "x2", "x3"}, LAUNCH + timedelta(hours=2))) == {"x1"}  # c has ended
    assert registry.shared_ads(a, set(), NOW) == {} and registry.shared_ads(registry.get("b"), {"y1"}, NOW) == {}


def test_register_campaign_launch_uses_the_deployments_feature_set(app_db, monkeypatch):
    monkeypatch.setenv("PRECOMPUTE_AD_NUMERIC", "price")
    monkeypatch.setenv("PRECOMPUTE_AD_CATEGORICAL", "brand,region")
    monkeypatch.setenv("PRECOMPUTE_AD_LOG_SCALED", "price")
    own = {"ad_id": "p1", "price": 9.5, "brand": "zeta", "region": "eu", "title": "Red shoes"}
    launch = datetime.now(UTC) + timedelta(hours=3)
    campaign = register_campaign_launch(app_db, "own-data", "acme", launch, [own])
    assert campaign.n_ads == 1
    registry = CampaignRegistry(app_db)
    assert registry.spec == AdFeatureSpec(numeric=("price",), categorical=("brand", "region"), log_scaled=("price",))
    assert registry.ads("own-data").to_dict("records") == [
        {"ad_id": "p1", "price": 9.5, "brand": "zeta", "region": "eu"}
    ]
    with pytest.raises(CampaignError, match="lack the feature columns \\['price', 'brand', 'region'\\]"):
        register_campaign_launch(app_db, "defaults", "acme", launch, ads("d1"))
    monkeypatch.setenv("PRECOMPUTE_AD_NUMERIC", "price,price")
    with pytest.raises(ValueError, match="listed twice"):
        register_campaign_launch(app_db, "own-data", "acme", launch, [own])


def test_every_field_of_an_ad_is_stored_for_a_later_feature_set(registry):
    tagged = [ad("a1", title="Red shoes", colour="red", n=3, tags=["x", "y"], stock=None),
              ad("a2", colour="blue", n=math.nan)]  # fmt: skip
    registry.register("c1", "acme", LAUNCH, tagged, now=NOW)
    assert list(registry.ads("c1").columns) == ["ad_id", "quality", "bid", "text_len", "category"]
    later = AdFeatureSpec(numeric=("quality", "n"), categorical=("category", "colour"), log_scaled=())
    frame = CampaignRegistry(registry.url, spec=later).ads("c1")
    assert frame["colour"].tolist() == ["red", "blue"] and frame["n"].tolist()[0] == 3.0 and math.isnan(frame["n"][1])
    with psycopg2.connect(libpq_url(registry.url)) as conn, conn.cursor() as cur:
        cur.execute("SELECT features FROM campaign_ads WHERE ad_id = 'a1'")
        stored = cur.fetchone()[0]
    assert stored == {"quality": 0.5, "bid": 1.0, "text_len": 40.0, "category": "shoes", "colour": "red", "n": 3,
                      "stock": None, "tags": ["x", "y"], "title": "Red shoes"}  # fmt: skip
    # the same content again is no change; a changed extra field is one
    assert registry.register("c1", "acme", LAUNCH, tagged, now=NOW).revision == 1
    assert registry.register("c1", "acme", LAUNCH, [tagged[0], {**tagged[1], "colour": "green"}], now=NOW).revision == 2
    with pytest.raises(CampaignError) as error:
        registry.register("c2", "acme", LAUNCH, [ad("b1", note="a\x00b"), ad("b2", when=object())], now=NOW)
    assert "ad 'b1': field 'note' contains a NUL character" in str(error.value)
    assert "ad 'b2': field 'when' is a object, not a JSON value" in str(error.value)
    assert registry.get("c2") is None


def test_register_campaign_launch_creates_the_tables_and_registers(app_db):
    campaign = register_campaign_launch(app_db, "launch-1", "acme", datetime.now(UTC) + timedelta(hours=3), ads("x"))
    assert campaign.revision == 1 and campaign.n_ads == 1
    again = register_campaign_launch(app_db, "launch-1", "acme", campaign.launch_at, ads("x"))
    assert again == campaign
    assert [c.campaign_id for c in CampaignRegistry(app_db).due(datetime.now(UTC))] == ["launch-1"]


def test_an_accepted_launch_time_stays_acceptable_when_the_campaign_changes_later(registry):
    registry.register("old", "acme", LAUNCH, ads("a1"), now=NOW)
    three_days_later = NOW + timedelta(days=3)
    changed = registry.register("old", "acme", LAUNCH, ads("a1", "a2"), budget=50, now=three_days_later)
    assert changed.revision == 2
    with pytest.raises(CampaignError, match="more than the warming horizon"):
        registry.register("old", "acme", LAUNCH + timedelta(hours=1), ads("a1"), now=three_days_later)


def test_times_may_be_iso_strings_in_a_batch(registry):
    [campaign] = registry.register_many(
        [{"campaign_id": "iso", "tenant_id": "acme", "launch_at": "2026-03-10T20:00:00+01:00",
          "end_at": "2026-03-12T00:00:00Z", "ads": ads("a1")}],
        now=NOW,
    )  # fmt: skip
    assert campaign.launch_at == datetime(2026, 3, 10, 19, tzinfo=UTC)
    assert campaign.end_at == datetime(2026, 3, 12, tzinfo=UTC)


def test_an_ad_may_move_between_campaigns_of_its_tenant(registry):
    registry.register("c1", "acme", LAUNCH, ads("a1", "a2"), now=NOW)
    registry.register("c2", "acme", LAUNCH, ads("a2", "a3"), now=NOW)
    registry.register("c1", "acme", LAUNCH, ads("a1"), now=NOW)  # a2 leaves c1: it stays acme's
    with pytest.raises(CampaignError, match="'a2' \\(tenant 'acme'\\)"):
        registry.register("g1", "globex", LAUNCH, ads("a2"), now=NOW)


# -- refusals: a clear message, and nothing written ----------------------------------------------------


def test_a_campaign_over_the_ad_cap_is_refused_in_one_line_and_one_at_the_cap_registers(registry):
    many = [ad(f"a{i:05d}") for i in range(MAX_ADS + 1)]
    with pytest.raises(CampaignError) as error:
        registry.register("big", "acme", LAUNCH, many, now=NOW)
    message = str(error.value)
    assert f"{MAX_ADS + 1} ads, more than the {MAX_ADS} a campaign may have" in message and "\n" not in message
    assert "nothing registered" in message and nothing_written(registry)
    assert registry.register("big", "acme", LAUNCH, many[:MAX_ADS], now=NOW).n_ads == MAX_ADS


def test_a_registry_refuses_campaigns_over_its_own_cap(registry):
    capped = CampaignRegistry(registry.url, max_ads=3)
    with pytest.raises(CampaignError) as error:
        capped.register("big3", "acme", LAUNCH, [ad(f"a{i}") for i in range(4)], now=NOW)
    assert "4 ads, more than the 3 a campaign may have" in str(error.value) and nothing_written(registry)
    assert capped.register("big3", "acme", LAUNCH, [ad(f"a{i}") for i in range(3)], now=NOW).n_ads == 3


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({"ads": []}, "no ads"),
        ({"launch_at": datetime(2026, 3, 10, 18)}, "launch_at 2026-03-10T18:00:00 has no timezone"),
        ({"end_at": datetime(2026, 3, 11)}, "end_at 2026-03-11T00:00:00 has no timezone"),
        ({"end_at": LAUNCH - timedelta(minutes=1)}, "is not after launch_at"),
        ({"end_at": LAUNCH}, "is not after launch_at"),
        ({"launch_at": NOW - timedelta(hours=25)}, "more than the warming horizon (1 day, 0:00:00) in the past"),
        ({"campaign_id": "a,b"}, "campaign_id must be 1-64 characters"),
        ({"campaign_id": "has space"}, "campaign_id must be 1-64 characters"),
        ({"campaign_id": "-leading"}, "campaign_id must be 1-64 characters"),
        ({"campaign_id": "c" * 65}, "campaign_id must be 1-64 characters"),
        ({"campaign_id": ""}, "campaign_id must be 1-64 characters"),
        ({"campaign_id": "caf\u00e9"}, "campaign_id must be 1-64 characters"),
        ({"tenant_id": "  "}, "tenant_id is blank"),
        ({"tenant_id": ""}, "tenant_id is blank"),
        ({"ads": ads("a1", "a2", "a1", "a2")}, "duplicate ad ids ['a1', 'a2']"),
        ({"ads": [{"ad_id": "a1", "quality": 0.5, "text_len": 3, "category": "x"}]}, "feature columns ['bid']"),
        ({"budget": 0}, "budget must be a positive finite number, got 0"),
        ({"budget": -5.0}, "budget must be a positive finite number"),
        ({"budget": math.nan}, "budget must be a positive finite number"),
        ({"budget": math.inf}, "budget must be a positive finite number"),
        ({"budget": 1e17}, "budget 1e+17 is over 2.2518e+13"),
        ({"budget": "lots"}, "budget 'lots' is not a number"),
        ({"end_at": "9999-12-31T23:00:00-05:00"}, "is out of range in UTC"),  # was an OverflowError traceback
        # accepted silently, and never warmed
        (
            {"launch_at": NOW - timedelta(hours=2), "end_at": NOW - timedelta(hours=1)},
            "end_at 2026-03-10T11:00:00+00:00 has passed",
        ),
        ({"budget": 0.001}, "budget 0.001 is not a whole number of cents"),  # split into nothing
        ({"budget": 10.005}, "budget 10.005 is not a whole number of cents"),  # split into 10.01
        # across New York's fall-back, 01:30 of the first pass (05:30 UTC) is before 01:10 of the second (06:10 UTC)
        (
            {
                "launch_at": datetime(2026, 11, 1, 1, 10, fold=1, tzinfo=NEW_YORK),
                "end_at": datetime(2026, 11, 1, 1, 30, fold=0, tzinfo=NEW_YORK),
            },
            "is not after launch_at",
        ),  # fmt: skip
        ({"ads": [ad("a\x00b")]}, "ad 'a\\x00b': ad_id"),  # NUL: PostgreSQL cannot store it
        # a braced GUID: no cache key may hold a brace, so its campaign could never be warmed
        ({"ads": [ad("{3F2504E0-4F89-11D3-9A0C-0305E82C3301}")]}, "ad_id has a brace"),
        ({"ads": [ad("a1", category="x\ud800")]}, "category is not valid UTF-8"),
        ({"ads": [ad("a\ud800")]}, "ad_id is not valid UTF-8"),  # JSON's "\ud800": pandas raised on it
    ],
)
def test_a_bad_campaign_is_refused_with_a_clear_message(registry, fields, expected):
    record = {"campaign_id": "c1", "tenant_id": "acme", "launch_at": LAUNCH, "ads": ads("a1", "a2"), **fields}
    with pytest.raises(CampaignError) as error:
        registry.register(**record, now=NOW)
    message = str(error.value)
    assert expected in message and "nothing registered" in message and "\n" not in message
    assert f"campaign {record['campaign_id']!r}" in message
    assert error.value.problems and nothing_written(registry)


def test_an_end_after_the_launch_across_a_fall_back_registers(registry):
    """Python compares two times of one zone by wall clock, ignoring ``fold``: this end seemed 20 minutes early."""
    launch = datetime(2026, 11, 1, 1, 30, fold=0, tzinfo=NEW_YORK)  # 05:30 UTC
    end = datetime(2026, 11, 1, 1, 10, fold=1, tzinfo=NEW_YORK)  # 06:10 UTC
    campaign = registry.register("c1", "acme", launch, ads("a1"), end_at=end, now=NOW)
    assert campaign.end_at - campaign.launch_at == timedelta(minutes=40)


def test_every_invalid_ad_is_named_and_the_whole_campaign_refused(registry):
    bad = [
        ad("ok-1"),
        ad("a-nan", quality=math.nan),
        ad("ok-2"),
        ad("a-neg", bid=-1),
        ad("a-text", text_len="long"),
        ad("a-cat", category=" "),
        ad("", quality=0.1),  # no id: named by its position
        # an id or a category that is no label is refused, not stored as its repr
        ad(["x"]),
        ad("a-dict", category={"a": 1}),
        ad("a-bytes", category=b"x"),
        ad("a-tuple", category=("x",)),
    ]
    with pytest.raises(CampaignError) as error:
        registry.register("c1", "acme", LAUNCH, bad, now=NOW)
    message = str(error.value)
    assert "9 of 11 ads are invalid" in message
    for expected in [
        "ad 'a-nan': quality is not a finite number",
        "ad 'a-neg': bid is negative",
        "ad 'a-text': text_len is not a finite number",
        "ad 'a-cat': category is missing",
        "ad #7: ad_id is missing",
        "ad #8: ad_id must be text or a number, got list",
        "ad 'a-dict': category must be text or a number, got dict",
        "ad 'a-bytes': category must be text or a number, got bytes",
        "ad 'a-tuple': category must be text or a number, got tuple",
    ]:
        assert expected in message
    assert "ok-1" not in message and nothing_written(registry)


def test_numbers_and_booleans_are_ids_and_categories_as_text(registry):
    registry.register("c1", "acme", LAUNCH, [ad("ok-1"), ad(7, category=3.0), ad("flag", category=True)], now=NOW)
    stored = registry.ads("c1")
    assert stored["ad_id"].tolist() == ["ok-1", "7", "flag"]
    assert stored["category"].tolist() == ["shoes", "3", "True"]


def test_whole_float_ids_are_the_integers_the_ads_load_makes_of_them(registry):
    # Ads from a pandas frame whose ad_id column had a gap came as 7.0: registered as "7.0", warmed under that key,
    # while the catalog (ads load) and the clients name the ad "7"
    float32 = pd.Series([9.0], dtype="float32").iloc[0]
    registry.register("c1", "acme", LAUNCH, [ad(7.0), ad(pd.Series([8.0]).iloc[0]), ad(2.5), ad(float32)], now=NOW)
    assert registry.ads("c1")["ad_id"].tolist() == ["7", "8", "2.5", "9"]


def test_big_whole_float_ids_are_the_integers_the_ads_load_makes_of_them(registry):
    # A 64-bit id (a snowflake's) in a float column: ads load writes 10000000000000000 to the catalog, the registry
    # wrote 1e+16, so the campaign warmed a key no client asks for; beyond int64 both keep the float's text
    big = [ad(1e16), ad(2.0**60), ad(np.float64(-(2.0**62))), ad(1e19)]
    registry.register("c1", "acme", LAUNCH, big, now=NOW)
    assert registry.ads("c1")["ad_id"].tolist() == [
        "10000000000000000", "1152921504606846976", "-4611686018427387904", "1e+19"
    ]  # fmt: skip


def test_a_tenant_cannot_take_over_another_tenants_campaign(registry):
    first = registry.register("c1", "acme", LAUNCH, ads("a1"), now=NOW)
    with pytest.raises(CampaignError, match="campaign 'c1': belongs to tenant 'acme', not 'globex'"):
        registry.register("c1", "globex", LAUNCH, ads("g1"), now=NOW)
    assert registry.get("c1") == first and registry.ads("c1")["ad_id"].tolist() == ["a1"]
    assert count(registry.url, "ad_tenants") == 1  # g1 was not claimed for globex


def test_an_ad_of_another_tenant_is_refused(registry):
    registry.register("c1", "acme", LAUNCH, ads("a1", "a2"), now=NOW)
    with pytest.raises(CampaignError) as error:
        registry.register("g1", "globex", LAUNCH, ads("g1", "a2", "a1"), now=NOW)
    assert "ads registered to another tenant: 'a1' (tenant 'acme'), 'a2' (tenant 'acme')" in str(error.value)
    assert registry.get("g1") is None and count(registry.url, "ad_tenants") == 2


def test_a_batch_is_refused_whole_and_every_bad_record_is_named(registry):
    good = {"campaign_id": "good", "tenant_id": "acme", "launch_at": LAUNCH, "ads": ads("a1")}
    records = [
        good,
        {"campaign_id": "empty", "tenant_id": "acme", "launch_at": LAUNCH, "ads": []},
        {"tenant_id": "acme", "launch_at": LAUNCH, "ads": ads("a2")},
        {"campaign_id": "typo", "tenant_id": "acme", "launch": LAUNCH, "ads": ads("a3")},
        {**good, "ads": ads("a4")},  # the same campaign twice
        "not a record",
    ]
    with pytest.raises(CampaignError) as error:
        registry.register_many(records, now=NOW)
    message = str(error.value)
    assert message.startswith("5 of 6 campaigns refused, nothing registered: ")
    for expected in [
        "campaign 'empty' (record 2): no ads",
        "record 3: missing campaign_id",
        "campaign 'typo' (record 4): unknown fields ['launch']",
        "missing launch_at",
        "campaign 'good' (record 5): registered twice in one batch (also record 1)",
        "record 6: not a mapping of campaign fields (str)",
    ]:
        assert expected in message, message
    assert nothing_written(registry)


def test_a_batch_refused_by_the_registry_writes_nothing(registry):
    registry.register("acme-1", "acme", LAUNCH, ads("a1"), now=NOW)
    records = [
        {"campaign_id": "new-1", "tenant_id": "globex", "launch_at": LAUNCH, "ads": ads("n1", "n2")},
        {"campaign_id": "acme-1", "tenant_id": "globex", "launch_at": LAUNCH, "ads": ads("a1")},
        {"campaign_id": "new-2", "tenant_id": "initech", "launch_at": LAUNCH, "ads": ads("n2")},  # n2 twice
    ]
    with pytest.raises(CampaignError) as error:
        registry.register_many(records, labels=["line 1", "line 2", "line 3"], now=NOW)
    message = str(error.value)
    assert "campaign 'acme-1' (line 2): belongs to tenant 'acme', not 'globex'" in message
    assert "ads registered to another tenant: 'a1' (tenant 'acme')" in message
    assert "campaign 'new-1' (line 1): ads ['n2'] are given to other tenants in the same batch" in message
    assert [c.campaign_id for c in registry.list()] == ["acme-1"]
    assert count(registry.url, "ad_tenants") == 1 and count(registry.url, "campaign_ads") == 1


def test_a_batch_registers_many_campaigns_in_one_go(registry):
    records = [
        {"campaign_id": f"c{i:04d}", "tenant_id": f"t{i % 7}", "launch_at": LAUNCH + timedelta(minutes=i),
         "ads": [ad(f"c{i:04d}-ad{j:02d}", quality=j / 20) for j in range(20)]}
        for i in range(500)
    ]  # fmt: skip
    campaigns = registry.register_many(records, now=NOW)
    assert [c.campaign_id for c in campaigns] == [r["campaign_id"] for r in records]
    assert [c.change_seq for c in campaigns] == sorted(c.change_seq for c in campaigns)
    assert count(registry.url, "campaign_ads") == 10_000 and count(registry.url, "ad_tenants") == 10_000
    assert registry.ads("c0042")["quality"].tolist() == [j / 20 for j in range(20)]
    records[3]["budget"] = 7
    again = registry.register_many(records, now=NOW)
    assert [c.revision for c in again[:5]] == [1, 1, 1, 2, 1]
    assert registry.changed_since(campaigns[-1].change_seq) == [again[3]]


def test_concurrent_writers_never_let_a_cursor_skip_a_change(registry):
    """Readers only ever see change_seq without gaps that fill later: every writer draws under one lock."""
    errors: list[BaseException] = []

    def write(tenant: str) -> None:
        try:
            for i in range(15):
                registry.register(f"{tenant}-{i}", tenant, LAUNCH, ads(f"{tenant}-ad{i}"), now=NOW)
        except BaseException as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=write, args=(t,)) for t in ("a", "b", "c")]
    for thread in threads:
        thread.start()
    cursor, seen = 0, []
    while any(t.is_alive() for t in threads) or cursor < registry.max_change_seq():
        page = registry.changed_since(cursor)
        if page:
            seqs = [c.change_seq for c in page]
            assert seqs == sorted(seqs)
            seen += [c.campaign_id for c in page]
            cursor = seqs[-1]
    for thread in threads:
        thread.join()
    assert not errors
    assert sorted(seen) == sorted(f"{t}-{i}" for t in "abc" for i in range(15))


def test_campaign_ids_fit_partition_keys():
    for good in ["a", "A9", "spring-sale_2026.v2", "9" * 64]:
        assert CAMPAIGN_ID.fullmatch(good)
    for bad in ["", "-a", ".a", "a,b", "a b", "a/b", "9" * 65, "a\n"]:
        assert not CAMPAIGN_ID.fullmatch(bad)


def test_a_custom_feature_set_is_what_ads_must_carry(app_db):
    spec = AdFeatureSpec(numeric=("price",), categorical=("brand", "region"), log_scaled=())
    registry = CampaignRegistry(app_db, spec=spec)
    registry.ensure_schema()
    registry.register("c1", "acme", LAUNCH, [{"ad_id": 1, "price": "9.5", "brand": "z", "region": "eu"}], now=NOW)
    frame = registry.ads("c1")
    assert frame.to_dict("records") == [{"ad_id": "1", "price": 9.5, "brand": "z", "region": "eu"}]
    with pytest.raises(CampaignError, match="lack the feature columns \\['region'\\]"):
        registry.register("c2", "acme", LAUNCH, [{"ad_id": "2", "price": 1, "brand": "z"}], now=NOW)


@pytest.mark.slow
def test_ten_thousand_campaigns_of_twenty_ads(registry):
    """The sensor's scale: one batch of 200,000 ads; due() and changed_since() read through their indexes."""
    records = [
        {"campaign_id": f"c{i:05d}", "tenant_id": f"t{i % 50}", "launch_at": NOW + timedelta(minutes=i),
         "ads": [ad(f"c{i:05d}-{j:02d}") for j in range(20)]}
        for i in range(10_000)
    ]  # fmt: skip
    campaigns = registry.register_many(records, now=NOW)
    assert len(campaigns) == 10_000 and count(registry.url, "campaign_ads") == 200_000
    for campaign in campaigns[::100]:
        assert registry.mark_warm(campaign.campaign_id, campaign.revision)
    assert len(registry.due(NOW, timedelta(days=30))) == 10_000 - 100
    assert [c.campaign_id for c in registry.due(NOW, timedelta(minutes=3))] == ["c00001", "c00002", "c00003"]
    assert len(registry.changed_since(campaigns[-5].change_seq)) == 4
    with psycopg2.connect(libpq_url(registry.url)) as conn, conn.cursor() as cur:
        cur.execute("ANALYZE campaigns")
        cur.execute("EXPLAIN SELECT * FROM campaigns WHERE change_seq > %s ORDER BY change_seq LIMIT 10000",
                    (campaigns[-5].change_seq,))  # fmt: skip
        assert "campaigns_change_seq" in "\n".join(row[0] for row in cur.fetchall())
    assert isinstance(registry.ads("c09999"), pd.DataFrame) and len(registry.ads("c09999")) == 20


def test_the_ads_of_campaigns_long_ended_or_cancelled_are_purged_and_a_new_registration_brings_them_back(registry):
    """Every campaign kept its ads (and their features) forever after it ended: purge_ads deletes them, keeping the
    campaign's row and revision, so that the same id registered again is a new revision with its ads."""
    now = datetime.now(UTC)
    then = now - timedelta(days=60)
    registry.register("old", "acme", then + timedelta(hours=1), ads("o1", "o2"), end_at=then + timedelta(days=10),
                      now=then)  # fmt: skip
    registry.register("live", "acme", now + timedelta(hours=1), ads("l1"), now=now)
    registry.register("gone", "acme", now + timedelta(hours=2), ads("g1"), now=now)
    registry.cancel("gone")
    assert registry.purge_ads(now - timedelta(days=30)) == ["old"]  # ended 50 days ago; "gone" was cancelled just now
    assert registry.ads("old").empty and list(registry.ads("gone")["ad_id"]) == ["g1"]
    assert registry.get("old").revision == 1 and count(registry.url, "campaign_ads") == 2
    assert registry.purge_ads(now + timedelta(minutes=1)) == ["gone"]  # now "gone" too
    assert list(registry.ads("live")["ad_id"]) == ["l1"] and count(registry.url, "campaign_ads") == 1
    again = registry.register("old", "acme", then + timedelta(hours=1), ads("o1", "o2"), end_at=now + timedelta(days=3),
                              now=now)  # fmt: skip
    assert again.revision == 2 and list(registry.ads("old")["ad_id"]) == ["o1", "o2"]
    with pytest.raises(ValueError, match="timezone-aware"):
        registry.purge_ads(datetime(2026, 1, 1))
