"""Campaign warming on real Redis + PostgreSQL: the sensor, the warming run, the budget split, cancellations, the
backstop, run priorities in the queue, and what readers see when Redis fails."""

import os
import signal
import threading
import uuid
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
import redis
import yaml
from dagster._core.remote_origin import RegisteredCodeLocationOrigin, RemoteJobOrigin, RemoteRepositoryOrigin
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG
from dagster._core.test_utils import MockedRunLauncher, create_run_for_test
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster._core.workspace.load_target import EmptyWorkspaceTarget
from dagster._daemon.run_coordinator.queued_run_coordinator_daemon import QueuedRunCoordinatorDaemon

from precompute_assets.definitions import build_definitions
from precompute_assets.defs import campaigns as warming
from precompute_assets.defs.campaigns import (
    CAMPAIGN_TAG,
    CAMPAIGNS,
    CampaignWarmingConfig,
    LaunchCursor,
    approved_model_version,
    build_campaign_cleanup_schedule,
    build_campaign_schedules,
    campaign_budget,
    campaign_cleanup_job,
    campaign_ctr,
    campaign_launch_sensor,
    campaign_warming_job,
    remove_campaign_values,
    values_lost,
    warming_config_problem,
)
from precompute_assets.defs.models import ctr_model
from precompute_assets.defs.resources import (
    AD_FEATURE_FIELDS,
    CampaignRegistryResource,
    DocumentStoreResource,
    LakeResource,
    ModelStoreResource,
    ParquetIOManager,
    RedisResource,
    ad_feature_spec_from_env,
)
from precompute_assets.defs.settings import Settings
from precompute_assets.defs.sources import ad_impressions, ads
from precompute_assets.ml import features
from precompute_assets.ml.budget import thompson_split
from precompute_assets.serving import KeySchema, PredictionCache, connect, publish, publish_version
from precompute_assets.serving.keys import codec_for
from precompute_assets.serving.publish import write_live_values
from precompute_assets.storage.campaigns import MAX_ADS, Campaign, CampaignError, CampaignRegistry
from precompute_assets.storage.lake import Lake
from precompute_assets.storage.postgres import scratch_database
from precompute_assets.workload.ads import make_ads
from precompute_assets_tests.factories import with_login, write_ad_platform

DAYS = ["2026-11-16", "2026-11-17", "2026-11-18"]
ROOT = Path(__file__).resolve().parents[2]
HOUR = timedelta(hours=1)
REPOSITORY = build_definitions(Settings()).get_repository_def()  # schedules resolve partitioned requests in it


# --- fixtures ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_home(tmp_path_factory, dagster_pg_url) -> dict:
    """One Dagster instance on real PostgreSQL with an approved ctr_model, trained once for the module on three
    days of synthetic traffic the way the daily graph trains it (its beats_baseline check passed)."""
    root = tmp_path_factory.mktemp("campaign-model")
    lake_uri, models = str(root / "lake"), str(root / "models")
    write_ad_platform(Lake(lake_uri), DAYS)
    with (
        scratch_database(dagster_pg_url, "dagster") as url,
        dg.instance_for_test(overrides={"storage": {"postgres": {"postgres_url": url}}}) as instance,
    ):
        lake = LakeResource(base_uri=lake_uri)
        result = dg.materialize(
            [ads, ad_impressions, ctr_model],
            selection=[ctr_model],
            partition_key=DAYS[-1],
            instance=instance,
            resources={"lake": lake, "model_store": ModelStoreResource(root=models)},
            run_config={"ops": {"ctr_model": {"config": {"n_estimators": 40}}}},
        )
        version = result.asset_materializations_for_node("ctr_model")[0].metadata["model_version"].value
        yield {"instance": instance, "lake_uri": lake_uri, "models": models, "version": version}


@pytest.fixture
def instance(model_home) -> dg.DagsterInstance:
    return model_home["instance"]


@pytest.fixture
def registry(app_db) -> CampaignRegistry:
    registry = CampaignRegistry(app_db)
    registry.ensure_schema()
    return registry


@pytest.fixture
def resources(model_home, app_db, redis_url, schema, tmp_path) -> dict:
    lake = LakeResource(base_uri=str(tmp_path / "lake"))
    return {
        "redis": RedisResource(url=redis_url, namespace=schema.namespace),
        "lake": lake,
        "io_manager": ParquetIOManager(lake=lake),
        "model_store": ModelStoreResource(root=model_home["models"]),
        "campaign_registry": CampaignRegistryResource(url=app_db),
    }


@pytest.fixture
def cache(redis_url, schema):
    reader = PredictionCache(connect(redis_url, socket_timeout=5), schema=schema, pointer_ttl_s=0)
    yield reader
    reader.close()


def unique(name: str) -> str:
    """Campaign ids unique across the module's shared Dagster instance (dynamic partitions, run keys)."""
    return f"{name}-{uuid.uuid4().hex[:6]}"


def campaign_ads(prefix: str, n: int, *, seed: int = 0) -> list[dict]:
    """``n`` new ads (never seen in any traffic) with the features of the synthetic workload."""
    table = make_ads(n, days=1, seed=seed)
    return [
        {"ad_id": f"{prefix}-ad{i:04d}", "category": int(row.category), "quality": float(row.quality),
         "bid": float(row.bid), "text_len": int(row.text_len)}
        for i, row in enumerate(table.itertuples())
    ]  # fmt: skip


# The sensor looks into Redis only when a campaign is warm: the ticks of tests without one pass this, never reached.
NO_REDIS = RedisResource(url="redis://127.0.0.1:9/0")


def tick(
    instance, resource: CampaignRegistryResource, cursor: str | None = None, *, redis: RedisResource = NO_REDIS
) -> dg.SensorResult:
    resources = {"campaign_registry": resource, "redis": redis}
    return campaign_launch_sensor(dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources))


def add_partitions(instance, result: dg.SensorResult) -> None:
    """What the daemon does with the sensor's partition requests."""
    for request in result.dynamic_partitions_requests:
        instance.add_dynamic_partitions(request.partitions_def_name, request.partition_keys)


def warm(instance, resources, campaign_id: str, **kwargs) -> dg.ExecuteInProcessResult:
    """Run the warming job's assets for one campaign partition, as the requested run does."""
    return dg.materialize(
        [campaign_ctr, campaign_budget], partition_key=campaign_id, instance=instance, resources=resources, **kwargs
    )


def live_keys(client, schema: KeySchema, kind: str) -> list[bytes]:
    return sorted(client.scan_iter(match=f"{schema.prefix}:{kind}:live:*", count=1000))


# --- the sensor --------------------------------------------------------------------------------------------


def test_the_sensor_adds_partitions_and_requests_one_prioritised_run_per_due_campaign(registry, app_db):
    now = datetime.now(UTC)
    soon, later, far = unique("soon"), unique("later"), unique("far")
    registry.register(later, "acme", now + 5 * HOUR, campaign_ads(later, 3))
    registry.register(soon, "acme", now + HOUR, campaign_ads(soon, 3))
    registry.register(far, "acme", now + 30 * HOUR, campaign_ads(far, 3))  # beyond the 24 h horizon
    resource = CampaignRegistryResource(url=app_db)
    with dg.instance_for_test() as instance:
        first = tick(instance, resource)
        assert [(r.partition_key, r.run_key, r.job_name) for r in first.run_requests] == [
            (soon, f"{soon}-r1", "campaign_warming_job"),  # soonest launch first
            (later, f"{later}-r1", "campaign_warming_job"),
        ]
        for request in first.run_requests:
            assert request.tags["dagster/priority"] == "10" and int(request.tags["dagster/priority"]) > 0
            assert request.tags["precompute/warming"] == "campaign"
            assert request.tags["precompute/campaign"] == request.partition_key
        (partitions,) = first.dynamic_partitions_requests
        assert partitions.partitions_def_name == CAMPAIGNS.name == "campaigns"
        assert sorted(partitions.partition_keys) == sorted([soon, later])
        add_partitions(instance, first)

        # nothing changed: nothing requested again, and the cursor moves on
        second = tick(instance, resource, first.cursor)
        assert not second.run_requests and "nothing new" in second.skip_reason.skip_message
        assert LaunchCursor.decode(second.cursor).seq == registry.max_change_seq()

        # a changed campaign (new revision) is warmed again; its partition exists already
        registry.register(soon, "acme", now + HOUR, campaign_ads(soon, 4))
        third = tick(instance, resource, second.cursor)
        assert [r.run_key for r in third.run_requests] == [f"{soon}-r2"]
        assert not third.dynamic_partitions_requests

        # a campaign whose launch enters the horizon is requested once it does (here: a wider horizon)
        wider = CampaignRegistryResource(url=app_db, warming_horizon_hours=48)
        fourth = tick(instance, wider, third.cursor)
        assert [r.run_key for r in fourth.run_requests] == [f"{far}-r1"]
        assert fourth.dynamic_partitions_requests[0].partition_keys == [far]

        # a cancelled campaign gets a cleanup run, with the same priority and per-campaign tag
        registry.cancel(later)
        fifth = tick(instance, wider, fourth.cursor)
        (cleanup,) = fifth.run_requests
        assert (cleanup.job_name, cleanup.run_key) == ("campaign_cleanup_job", f"{later}-r2-cancel")
        assert cleanup.run_config == {"ops": {"remove_campaign": {"config": {"campaign_id": later}}}}
        assert cleanup.tags["dagster/priority"] == "10" and cleanup.tags["precompute/campaign"] == later


def test_the_sensor_does_not_launch_again_what_the_backstop_launched(registry, app_db):
    """Dagster dedupes run keys per sensor or schedule, not across them: the backstop fires on the hour, when a
    campaign launching on the hour enters the horizon, and the sensor's next tick launched its run key again."""
    now = datetime.now(UTC)
    by_backstop, new = unique("backstopped"), unique("new")
    for campaign_id in (by_backstop, new):
        registry.register(campaign_id, "acme", now + HOUR, campaign_ads(campaign_id, 2))
    resource = CampaignRegistryResource(url=app_db)
    (backstop,) = build_campaign_schedules("UTC")
    with dg.instance_for_test() as instance:
        create_run_for_test(
            instance, job_name="campaign_warming_job", status=dg.DagsterRunStatus.STARTED,
            tags={"dagster/run_key": f"{by_backstop}-r1", "dagster/schedule_name": backstop.name},
        )  # fmt: skip
        result = tick(instance, resource)
        assert [r.run_key for r in result.run_requests] == [f"{new}-r1"]


def test_a_tick_over_10000_campaigns_is_a_constant_number_of_queries(registry, app_db, monkeypatch):
    now = datetime.now(UTC)
    records = [
        {"campaign_id": f"bulk{i:05d}", "tenant_id": "acme", "launch_at": now + timedelta(minutes=10 + i % 600),
         "ads": [{"ad_id": f"bulk{i:05d}-a", "category": 1, "quality": 0.5, "bid": 1.0, "text_len": 80}]}
        for i in range(10_000)
    ]  # fmt: skip
    registry.register_many(records)
    calls: dict[str, int] = {}
    for name in ("changed_since", "due", "warm", "get", "ads", "list"):
        original = getattr(CampaignRegistry, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(CampaignRegistry, name, counted)
    resource = CampaignRegistryResource(url=app_db)
    with dg.instance_for_test() as instance:
        result = tick(instance, resource)
        # a page of changes (and an empty one: the first was full), one indexed due() query, one of the warm
        # campaigns (whose values the sensor looks for in Redis): nothing per campaign
        assert calls == {"changed_since": 2, "due": 1, "warm": 1}
        assert len(result.run_requests) == 10_000 and len({r.run_key for r in result.run_requests}) == 10_000
        assert len(result.dynamic_partitions_requests[0].partition_keys) == 10_000
        add_partitions(instance, result)
        calls.clear()
        again = tick(instance, resource, result.cursor)
        assert not again.run_requests and calls == {"changed_since": 1, "due": 1, "warm": 1}


# --- warming end to end ------------------------------------------------------------------------------------


def test_register_tick_run_and_every_ad_is_readable_before_launch(
    registry, resources, instance, model_home, cache, redis_client, schema, app_db
):
    now = datetime.now(UTC)
    campaign_id, launch, end = unique("spring"), now + 2 * HOUR, now + 26 * HOUR
    ad_list = campaign_ads(campaign_id, 60, seed=3)
    registry.register(campaign_id, "acme", launch, ad_list, end_at=end, budget=2500.0)
    ids = [ad["ad_id"] for ad in ad_list]
    assert cache.get_many("ctr", ids) == [None] * len(ids)  # cold: every first user would miss

    result = tick(instance, resources["campaign_registry"], redis=resources["redis"])
    (request,) = result.run_requests
    add_partitions(instance, result)
    run = warm(instance, resources, request.partition_key, tags=request.tags)
    assert run.success and datetime.now(UTC) < launch

    values = cache.get_many("ctr", ids)
    assert all(isinstance(v, float) and 0 < v < 1 for v in values)
    frame = Lake(resources["lake"].base_uri).read("campaign_ctr", campaign_id).set_index("ad_id")
    assert values == pytest.approx(frame.loc[ids, "ctr"].tolist(), rel=1e-6)
    meta = run.asset_materializations_for_node("campaign_ctr")[0].metadata
    assert meta["ads_warmed"].value == 60 and meta["ads_skipped"].value == 0
    assert meta["model_version"].value == model_home["version"] and "reason" not in meta  # no blank reason in the UI
    assert 100 < meta["minutes_before_launch"].value <= 120 and meta["seconds"].value > 0
    # The UI shows a timestamp value as a date in the viewer's timezone; an int as Unix seconds, a text as it is.
    assert isinstance(meta["expire_at"], dg.TimestampMetadataValue)
    assert meta["expire_at"].value == int((end + HOUR).timestamp())
    budget = run.asset_materializations_for_node("campaign_budget")[0].metadata
    assert isinstance(budget["warm_until"], dg.TimestampMetadataValue)
    assert budget["warm_until"].value == meta["expire_at"].value
    # the values live until the campaign ends (plus the one-hour grace), not a day more
    ttl = redis_client.ttl(schema.live("ctr", ids[0]))
    assert (end + HOUR - datetime.now(UTC)).total_seconds() - 60 < ttl <= (end + HOUR - now).total_seconds() + 1

    # the budget: a split across the ads adding up to the budget, exactly the seeded Thompson split
    split = cache.get("budget", campaign_id)
    assert set(split) == set(ids) and sum(split.values()) == pytest.approx(2500.0)
    expected = thompson_split(frame.loc[ids, "ctr"].to_numpy(), 2500.0, seed=[0, zlib.crc32(campaign_id.encode()), 1])
    assert [split[i] for i in ids] == pytest.approx(expected.tolist())
    assert registry.get(campaign_id).is_warm
    assert not tick(instance, resources["campaign_registry"], result.cursor, redis=resources["redis"]).run_requests

    # two nightly publishes (new versions, pointer flips) later, every campaign ad is still readable; where the
    # nightly version has an ad, it answers (both come from approved models)
    nightly = [(f"ad{i:06d}", 0.05) for i in range(200)] + [(ids[0], 0.5)]
    for version in ("2026-11-18.nightly1.0", "2026-11-19.nightly2.0"):
        publish_version(redis_client, "ctr", version, nightly, n_keys=len(nightly), schema=schema)
    after = cache.get_many("ctr", ids)
    assert after[0] == pytest.approx(0.5) and after[1:] == pytest.approx(values[1:], rel=1e-6)


def test_the_docs_say_where_the_nightly_version_answers_for_a_campaigns_ads():
    """What the test above shows: a campaign's own writes land all at once, but readers look in the published
    nightly version first, so a get_many over a campaign's ads can mix nightly and live values."""
    for text in (warming.__doc__, campaign_ctr.descriptions_by_key[campaign_ctr.key]):
        flat = " ".join(text.split())
        assert "all of a campaign or none" not in flat and "all of them or none" not in flat
        assert "nightly version" in flat and "its value answers" in flat


def test_a_cancelled_campaign_is_removed_but_ads_of_other_live_campaigns_stay(
    registry, resources, instance, cache, redis_client, schema
):
    now = datetime.now(UTC)
    first, second = unique("first"), unique("second")
    shared = campaign_ads(first, 5)
    registry.register(first, "acme", now + HOUR, shared)
    registry.register(second, "acme", now + HOUR, [shared[0], *campaign_ads(second, 3)])
    result = tick(instance, resources["campaign_registry"], redis=resources["redis"])
    add_partitions(instance, result)
    for request in result.run_requests:
        assert warm(instance, resources, request.partition_key).success
    assert all(v is not None for v in cache.get_many("ctr", [ad["ad_id"] for ad in shared]))

    registry.cancel(first)
    (cleanup,) = tick(instance, resources["campaign_registry"], result.cursor, redis=resources["redis"]).run_requests
    run = campaign_cleanup_job.execute_in_process(run_config=cleanup.run_config, instance=instance, resources=resources)
    assert run.success
    assert cache.get_many("ctr", [ad["ad_id"] for ad in shared[1:]]) == [None] * 4
    assert cache.get("budget", first) is None
    assert cache.get("ctr", shared[0]["ad_id"]) is not None  # still in the live campaign
    assert cache.get("budget", second) is not None
    observation = instance.fetch_observations(campaign_ctr.key, limit=1).records[0]
    assert observation.partition_key == first and observation.asset_observation.metadata["cancelled"].value
    assert observation.asset_observation.metadata["keys_removed"].value == 5  # 4 ads + the budget


def test_ads_a_re_registration_dropped_are_deleted_by_the_warming_and_a_cancel_leaves_no_value(
    registry, resources, instance, cache, redis_client, schema
):
    """A re-registration that dropped ads left their CTRs readable beside the new revision's, and a cancel removed
    only the current revision's ads: the dropped ones stayed until their TTL, 30 days for an open-ended campaign. A
    shared ad the cancelled campaign held longer kept its expiry too (h_camp)."""
    now = datetime.now(UTC)
    first, other = unique("first"), unique("other")
    ads = campaign_ads(first, 4)
    registry.register(first, "acme", now + HOUR, ads[:3])  # open-ended: 30 days
    registry.register(other, "acme", now + HOUR, [ads[0]], end_at=now + 2 * HOUR)
    instance.add_dynamic_partitions(CAMPAIGNS.name, [first, other])
    assert warm(instance, resources, first).success and warm(instance, resources, other).success
    ids = [ad["ad_id"] for ad in ads]
    assert all(value is not None for value in cache.get_many("ctr", ids[:3]))

    registry.register(first, "acme", now + HOUR, [ads[0], ads[3]])  # drops ads 1 and 2
    assert registry.dropped_ads(first) == sorted(ids[1:3])
    assert warm(instance, resources, first).success
    assert cache.get_many("ctr", ids[1:3]) == [None, None] and cache.get("ctr", ids[3]) is not None
    assert registry.dropped_ads(first) == []  # deleted, forgotten

    registry.register(first, "acme", now + HOUR, [ads[0]])  # drops ad 3; cancelled before a warming deletes it
    registry.cancel(first)
    assert remove_campaign_values(registry, redis_client, schema, registry.get(first), now) >= 2
    assert cache.get("ctr", ids[3]) is None and cache.get("budget", first) is None
    assert registry.dropped_ads(first) == []
    # the other campaign still holds ad 0: its value stays, expiring at that campaign's end (and grace), not in 30 days
    assert cache.get("ctr", ids[0]) is not None
    assert round(redis_client.ttl(schema.live("ctr", ids[0])) / 3600) == 3


def test_a_dropped_ad_another_warm_campaign_holds_with_the_same_features_keeps_its_value(
    registry, resources, instance, cache, redis_client, schema
):
    """The features of a dropped ad were compared with the campaign's current ads, which no longer have it: the
    warming and the cleanup deleted a value another warm campaign held, and its readers missed it (h_diff8)."""
    now = datetime.now(UTC)
    first, other = unique("first"), unique("other")
    ads = campaign_ads(first, 3)
    ids = [ad["ad_id"] for ad in ads]
    registry.register(first, "acme", now + HOUR, ads)
    registry.register(other, "acme", now + HOUR, [ads[1]])
    instance.add_dynamic_partitions(CAMPAIGNS.name, [first, other])
    assert warm(instance, resources, first).success and warm(instance, resources, other).success
    registry.register(first, "acme", now + HOUR, [ads[0], ads[2]])  # drops ad 1, which the other holds warm
    assert warm(instance, resources, first).success and cache.get("ctr", ids[1]) is not None
    registry.register(first, "acme", now + HOUR, [ads[0]])  # drops ad 2; the other takes it, warm, same features
    registry.register(other, "acme", now + HOUR, [ads[1], ads[2]])
    assert warm(instance, resources, other).success
    registry.cancel(first)
    remove_campaign_values(registry, redis_client, schema, registry.get(first), now)
    assert cache.get("ctr", ids[0]) is None and None not in cache.get_many("ctr", ids[1:])


def test_a_warming_gives_a_dropped_ad_another_campaign_holds_its_expiry_and_a_cold_revision_records_nothing(
    registry, resources, instance, cache, redis_client, schema
):
    """The warming that deleted the ads its re-registration dropped left one another warm campaign holds with this
    campaign's 30-day expiry; and the ads of revisions never warmed were recorded as dropped, so a first warming
    deleted another warm campaign's value it never wrote (h_diff9)."""
    now = datetime.now(UTC)
    first, other, cold = unique("first"), unique("other"), unique("cold")
    ads = campaign_ads(first, 3)
    ids = [ad["ad_id"] for ad in ads]
    registry.register(first, "acme", now + HOUR, ads)  # open-ended: 30 days
    registry.register(other, "acme", now + HOUR, [ads[1]], end_at=now + 2 * HOUR)
    instance.add_dynamic_partitions(CAMPAIGNS.name, [first, other, cold])
    assert warm(instance, resources, other).success and warm(instance, resources, first).success
    assert redis_client.ttl(schema.live("ctr", ids[1])) > 24 * 3600
    registry.register(first, "acme", now + HOUR, [ads[0], ads[2]])  # drops ad 1
    assert warm(instance, resources, first).success
    assert cache.get("ctr", ids[1]) is not None and round(redis_client.ttl(schema.live("ctr", ids[1])) / 3600) == 3
    assert registry.dropped_ads(first) == []

    # a campaign registered, changed before any warming, then warmed: it wrote nothing for the ad it dropped
    mine = {**ads[0], "quality": ads[0]["quality"] / 2}  # other features than first's, which holds ad 0 warm
    registry.register(cold, "acme", now + 48 * HOUR, [mine, *campaign_ads(cold, 1)])
    registry.register(cold, "acme", now + HOUR, campaign_ads(cold, 1))
    assert registry.dropped_ads(cold) == []
    assert warm(instance, resources, cold).success and cache.get("ctr", ids[0]) is not None


def test_what_a_warming_wrote_is_recorded_as_it_writes_and_removed_whatever_came_after(
    registry, resources, instance, cache, redis_client, schema
):
    """The registry inferred what a campaign had written from its warm revision at re-registration: a cancel before
    it, a warming whose budget step never ran, and a re-registration while a warming scored each left values
    readable for 30 days; and the cleanup compared another campaign's features with ones never written (h_diff10)."""
    now = datetime.now(UTC)

    def ctr_only(campaign_id: str) -> None:  # the warming's first step, its budget step never run
        assert dg.materialize([campaign_ctr], partition_key=campaign_id, instance=instance, resources=resources).success

    def gone(campaign_id: str, ids: list[str]) -> bool:
        registry.cancel(campaign_id)
        remove_campaign_values(registry, redis_client, schema, registry.get(campaign_id), now)
        return cache.get_many("ctr", ids) == [None] * len(ids)

    # cancelled, then registered again with other ads before any cleanup ran
    cancelled = unique("cancelled")
    ads = campaign_ads(cancelled, 4)
    ids = [ad["ad_id"] for ad in ads]
    registry.register(cancelled, "acme", now + HOUR, ads[:3])
    instance.add_dynamic_partitions(CAMPAIGNS.name, [cancelled])
    assert warm(instance, resources, cancelled).success
    registry.cancel(cancelled)
    registry.register(cancelled, "acme", now + HOUR, ads[3:])
    assert registry.dropped_ads(cancelled) == sorted(ids[:3])
    assert warm(instance, resources, cancelled).success and cache.get_many("ctr", ids[:3]) == [None] * 3
    assert gone(cancelled, ids)

    # CTRs written, the revision never marked warm, then registered again without two of its ads
    unmarked = unique("unmarked")
    ads = campaign_ads(unmarked, 3)
    registry.register(unmarked, "acme", now + HOUR, ads)
    instance.add_dynamic_partitions(CAMPAIGNS.name, [unmarked])
    ctr_only(unmarked)
    registry.register(unmarked, "acme", now + HOUR, ads[:1])
    assert registry.dropped_ads(unmarked) == sorted(ad["ad_id"] for ad in ads[1:])
    assert gone(unmarked, [ad["ad_id"] for ad in ads])

    # another warm campaign holds an ad this one wrote with other features, then re-registered with the same ones
    holder, other = unique("holder"), unique("other")
    shared = campaign_ads(holder, 1)[0]
    registry.register(holder, "acme", now + HOUR, [shared], end_at=now + 5 * HOUR)
    registry.register(other, "acme", now + HOUR, [{**shared, "quality": shared["quality"] / 2}])
    instance.add_dynamic_partitions(CAMPAIGNS.name, [holder, other])
    assert warm(instance, resources, holder).success
    held = cache.get("ctr", shared["ad_id"])
    assert warm(instance, resources, other).success and cache.get("ctr", shared["ad_id"]) != held  # other's value
    registry.register(other, "acme", now + HOUR, [shared])  # the holder's features now, never warmed
    assert gone(other, [shared["ad_id"]])  # other's value goes: the holder is warmed again with its own


def test_a_warming_whose_campaign_is_registered_again_while_it_scores_writes_nothing(
    registry, resources, instance, cache, monkeypatch
):
    """A re-registration while a warming scored did not move the epoch its write is fenced with: the old revision's
    ads were written after the registry had replaced them, untracked (h_diff10)."""
    from precompute_assets.defs import campaigns as campaigns_module

    now = datetime.now(UTC)
    campaign_id = unique("racing")
    ads = campaign_ads(campaign_id, 3)
    registry.register(campaign_id, "acme", now + HOUR, ads)
    instance.add_dynamic_partitions(CAMPAIGNS.name, [campaign_id])
    real_score = campaigns_module.ctr.score_ads

    def score_then_register_again(*args, **kwargs):
        scored = real_score(*args, **kwargs)
        registry.register(campaign_id, "acme", now + HOUR, ads[:1])
        return scored

    monkeypatch.setattr(campaigns_module.ctr, "score_ads", score_then_register_again)
    run = dg.materialize([campaign_ctr], partition_key=campaign_id, instance=instance, resources=resources)
    (skipped,) = run.asset_materializations_for_node("campaign_ctr")
    assert "changed while it was warmed" in skipped.metadata["reason"].value
    assert cache.get_many("ctr", [ad["ad_id"] for ad in ads]) == [None] * 3 and registry.dropped_ads(campaign_id) == []


def test_an_end_moved_earlier_shortens_the_campaigns_own_values_not_those_another_campaign_holds(
    registry, resources, instance, redis_client, schema
):
    """Re-registered with an end 3 days earlier, a campaign's budget went at the new end, but its CTRs lived on to the
    old one: their expiry was only ever extended (h_camp2)."""
    now = datetime.now(UTC)
    moved, other = unique("moved"), unique("other")
    ads = campaign_ads(moved, 3)
    registry.register(moved, "acme", now + HOUR, ads, end_at=now + 72 * HOUR)
    registry.register(other, "acme", now + HOUR, [ads[0]], end_at=now + 96 * HOUR)
    instance.add_dynamic_partitions(CAMPAIGNS.name, [moved, other])
    assert warm(instance, resources, moved).success and warm(instance, resources, other).success
    registry.register(moved, "acme", now + HOUR, ads, end_at=now + 5 * HOUR)  # revision 2: ends in 5 hours
    assert warm(instance, resources, moved).success

    def hours_left(ad: dict) -> float:
        return redis_client.ttl(schema.live("ctr", ad["ad_id"])) / 3600

    assert [round(hours_left(ad)) for ad in ads[1:]] == [6, 6]  # the new end and the 1 h grace
    assert round(hours_left(ads[0])) == 97  # the other campaign's end holds the shared ad
    assert round(redis_client.ttl(schema.live("budget", moved)) / 3600) == 6
    # The other way round (h_camp): the other campaign ends sooner than the moved one's old end, so the shared ad
    # expires at the later of the two ends now, not at the old end it had been extended to.
    registry.register(moved, "acme", now + HOUR, ads, end_at=now + 120 * HOUR)  # revision 3: the shared ad to 121 h
    assert warm(instance, resources, moved).success and round(hours_left(ads[0])) == 121
    registry.register(moved, "acme", now + HOUR, ads, end_at=now + 5 * HOUR)  # revision 4: back to 5 hours
    assert warm(instance, resources, moved).success
    assert round(hours_left(ads[0])) == 97 and [round(hours_left(ad)) for ad in ads[1:]] == [6, 6]


def test_a_shared_ads_exact_expiry_is_the_later_of_the_campaigns_and_none_when_one_is_unknown():
    """A warm holder without a recorded expiry (a registry from before warm_until) had the shared ad's expiry set
    exactly, shortening that campaign's value by days (h_diff2): such an ad's expiry is only ever extended."""
    from precompute_assets.defs.campaigns import exact_expiries
    from precompute_assets.storage.campaigns import SharedAd

    now = datetime.now(UTC)
    later = now + 96 * HOUR
    shared = {"warm": SharedAd(later, False, True), "cold": SharedAd(None, False, True),
              "unknown": SharedAd(None, True, True), "both": SharedAd(later, True, True)}  # fmt: skip

    class Registry:
        def shared_ads(self, campaign, ads, now):
            return {ad: shared[ad] for ad in ads if ad in shared}

    mine = int((now + 6 * HOUR).timestamp())
    campaign = Campaign("c", "acme", now, now + 5 * HOUR, 100.0, "active", 1, None, 7, now, 5)
    out = exact_expiries(Registry(), campaign, {"own", "warm", "cold", "unknown", "both"}, now, mine)
    assert out == {"own": mine, "warm": int(later.timestamp()), "cold": mine}


def test_a_cancelled_campaign_that_gave_a_shared_ad_other_features_leaves_no_value_of_its_own(
    registry, resources, instance, cache, redis_client, schema
):
    """Two live campaigns gave one ad different features; the one warmed last wrote its CTR, and once it was cancelled
    its value stayed, for its own long expiry (h_camp). Its cleanup now deletes such an ad, and the other campaign,
    whose value is then gone, is warmed again at once."""
    now = datetime.now(UTC)
    kept, cancelled = unique("kept"), unique("dropped")
    ad = campaign_ads(kept, 1)[0]
    registry.register(kept, "acme", now + HOUR, [{**ad, "quality": 0.95}], end_at=now + 5 * HOUR)
    registry.register(cancelled, "acme", now + HOUR, [{**ad, "quality": 0.05}], end_at=now + 72 * HOUR)
    first = tick(instance, resources["campaign_registry"], redis=resources["redis"])
    add_partitions(instance, first)
    assert warm(instance, resources, kept).success
    kept_value = cache.get("ctr", ad["ad_id"])
    assert warm(instance, resources, cancelled).success and cache.get("ctr", ad["ad_id"]) != kept_value
    registry.cancel(cancelled)
    later = tick(instance, resources["campaign_registry"], first.cursor, redis=resources["redis"])
    (cleanup,) = [r for r in later.run_requests if r.tags.get("precompute/campaign") == cancelled]
    assert campaign_cleanup_job.execute_in_process(
        run_config=cleanup.run_config, instance=instance, resources=resources
    ).success
    assert cache.get("ctr", ad["ad_id"]) is None  # not the cancelled campaign's value
    again = tick(instance, resources["campaign_registry"], later.cursor, redis=resources["redis"])
    (rewarm,) = [r for r in again.run_requests if r.partition_key == kept]
    assert warm(instance, resources, rewarm.partition_key).success
    assert cache.get("ctr", ad["ad_id"]) == pytest.approx(kept_value)
    assert round(redis_client.ttl(schema.live("ctr", ad["ad_id"])) / 3600) == 6  # its own end and grace


def test_a_campaign_registered_again_with_an_end_that_has_passed_is_removed(
    registry, resources, instance, cache, redis_client, schema
):
    """Re-registered with its end a minute ago (accepted as a new revision), a warm campaign kept its budget and CTRs
    in the cache until its old end, 3 days on: no cleanup was requested for a campaign that was not cancelled."""
    now = datetime.now(UTC)
    campaign_id = unique("ended")
    ads = campaign_ads(campaign_id, 3)
    registry.register(campaign_id, "acme", now + HOUR, ads, end_at=now + 72 * HOUR)
    result = tick(instance, resources["campaign_registry"], redis=resources["redis"])
    add_partitions(instance, result)
    (warming,) = [r for r in result.run_requests if r.partition_key == campaign_id]
    assert warm(instance, resources, warming.partition_key).success and cache.get("budget", campaign_id) is not None
    registry.register(campaign_id, "acme", now - 2 * HOUR, ads, end_at=now - timedelta(minutes=1))
    later = tick(instance, resources["campaign_registry"], result.cursor, redis=resources["redis"])
    (cleanup,) = [r for r in later.run_requests if r.tags.get("precompute/campaign") == campaign_id]
    assert cleanup.job_name == "campaign_cleanup_job"
    run = campaign_cleanup_job.execute_in_process(run_config=cleanup.run_config, instance=instance, resources=resources)
    assert run.success
    assert cache.get("budget", campaign_id) is None
    assert cache.get_many("ctr", [ad["ad_id"] for ad in ads]) == [None] * 3
    observation = instance.fetch_observations(campaign_ctr.key, limit=1).records[0]
    assert not observation.asset_observation.metadata["cancelled"].value  # ended, not cancelled


def test_a_warm_campaign_postponed_beyond_the_horizon_is_cold_in_the_cache_too(registry, resources, instance, cache):
    """Postponed by 10 days with a smaller budget and another ad, a warm campaign kept serving its old revision's
    split (over the ad it dropped) for 3 days: no run was requested until 24 h before its new launch (h_camp)."""
    now = datetime.now(UTC)
    campaign_id = unique("later")
    ads = campaign_ads(campaign_id, 3)
    registry.register(campaign_id, "acme", now + HOUR, ads, end_at=now + 72 * HOUR, budget=1000.0)
    result = tick(instance, resources["campaign_registry"], redis=resources["redis"])
    add_partitions(instance, result)
    assert warm(instance, resources, campaign_id).success and cache.get("budget", campaign_id) is not None
    moved = [*ads[:2], *campaign_ads(f"{campaign_id}-new", 1, seed=1)]
    registry.register(campaign_id, "acme", now + 240 * HOUR, moved, end_at=now + 300 * HOUR, budget=50.0)
    later = tick(instance, resources["campaign_registry"], result.cursor, redis=resources["redis"])
    (cleanup,) = [r for r in later.run_requests if r.tags.get("precompute/campaign") == campaign_id]
    assert cleanup.job_name == "campaign_cleanup_job"
    run = campaign_cleanup_job.execute_in_process(run_config=cleanup.run_config, instance=instance, resources=resources)
    assert run.success and cache.get("budget", campaign_id) is None
    assert cache.get_many("ctr", [ad["ad_id"] for ad in ads]) == [None] * 3  # the ad it dropped too
    # A warming run queued before the postponement warmed the new revision 10 days early (h_camp): it warms nothing
    queued = warm(instance, resources, campaign_id)
    assert queued.success and cache.get("budget", campaign_id) is None
    assert cache.get_many("ctr", [ad["ad_id"] for ad in moved]) == [None] * 3
    (skipped,) = queued.asset_materializations_for_node("campaign_ctr")
    assert "beyond the warming horizon" in skipped.metadata["reason"].value
    # Moved back within the horizon and warmed before a cleanup of the postponement ran: its values stay.
    registry.register(campaign_id, "acme", now + HOUR, ads, end_at=now + 72 * HOUR, budget=1000.0)
    assert warm(instance, resources, campaign_id).success and cache.get("budget", campaign_id) is not None
    again = campaign_cleanup_job.execute_in_process(
        run_config=cleanup.run_config, instance=instance, resources=resources
    )
    assert again.success and cache.get("budget", campaign_id) is not None


def test_a_launch_or_end_past_2200_is_refused_not_a_warming_that_overflows(registry):
    """An end in year 9999 was accepted, and every warming run then failed with an OverflowError (h_camp)."""
    now = datetime.now(UTC)
    with pytest.raises(CampaignError, match="end_at 9999-12-31T23:30:00\\+00:00 is not before 2200 in UTC"):
        far = datetime(9999, 12, 31, 23, 30, tzinfo=UTC)
        registry.register(unique("far"), "acme", now + HOUR, campaign_ads("far", 1), end_at=far)
    # One registered before the limit (a row of year 9999) is warmed, its values expiring at the limit (h_diff).
    from precompute_assets.defs.campaigns import CampaignWarmingConfig, expiry
    from precompute_assets.storage.campaigns import LATEST_TIME

    old = Campaign("c", "acme", now, far, 100.0, "active", 1, None, 7, now, 3)
    assert expiry(old, now, CampaignWarmingConfig()) == int(LATEST_TIME.timestamp()) + 3600


def test_a_first_tick_cleans_up_only_the_cancelled_campaigns_whose_values_are_still_there(
    registry, resources, instance, cache
):
    """A tick without a cursor (a new instance, a reset sensor) reads every change ever made, and requested a cleanup
    run for every campaign ever cancelled: runs for nothing, in the warming slots (h_camp)."""
    now = datetime.now(UTC)
    warmed, never = unique("gone-warm"), unique("gone-cold")
    for campaign_id in (warmed, never):
        registry.register(campaign_id, "acme", now + HOUR, campaign_ads(campaign_id, 2))
    instance.add_dynamic_partitions(CAMPAIGNS.name, [warmed])
    assert warm(instance, resources, warmed).success
    registry.cancel(warmed)
    registry.cancel(never)
    first = tick(instance, resources["campaign_registry"], redis=resources["redis"])
    cleanups = {r.tags.get("precompute/campaign") for r in first.run_requests if r.job_name == "campaign_cleanup_job"}
    assert warmed in cleanups and never not in cleanups


def test_only_a_revision_registered_after_its_end_asks_for_a_cleanup():
    """A campaign that ended on its own keeps no value past its end and grace: a cleanup of each one ever ended, on a
    new instance's first tick (which reads every change), would be runs for nothing."""
    from precompute_assets.defs.campaigns import ended_when_registered
    from precompute_assets.storage.campaigns import Campaign

    now = datetime.now(UTC)

    def campaign(end_at, updated_at, status="active") -> Campaign:
        return Campaign("c", "acme", now - 48 * HOUR, end_at, 100.0, status, 2, None, 7, updated_at, 3)

    assert ended_when_registered(campaign(now - HOUR, now))  # registered again with its end an hour ago
    assert not ended_when_registered(campaign(now - HOUR, now - 2 * HOUR))  # ended after it was registered
    assert not ended_when_registered(campaign(None, now)) and not ended_when_registered(campaign(now + HOUR, now))
    assert not ended_when_registered(campaign(now - HOUR, now, status="cancelled"))  # a cancellation's own cleanup


def test_a_changed_campaigns_new_ctrs_are_never_read_with_its_last_revisions_budget(
    registry, resources, instance, cache
):
    """A re-registration's warming that failed after campaign_ctr left the last revision's split in the cache, over
    ads the campaign no longer had, beside the new CTRs."""
    campaign_id, now = unique("changed"), datetime.now(UTC)
    first = campaign_ads(campaign_id, 4)
    registry.register(campaign_id, "acme", now + HOUR, first, budget=1000.0)
    instance.add_dynamic_partitions(CAMPAIGNS.name, [campaign_id])
    assert warm(instance, resources, campaign_id).success
    assert set(cache.get("budget", campaign_id)) == {ad["ad_id"] for ad in first}
    second = [*first[:2], *campaign_ads(f"{campaign_id}-new", 2, seed=1)]
    registry.register(campaign_id, "acme", now + HOUR, second, budget=5000.0)
    ctr_only = dg.materialize(  # the run failed before campaign_budget
        [campaign_ctr, campaign_budget], selection=[campaign_ctr], partition_key=campaign_id, instance=instance,
        resources=resources,
    )  # fmt: skip
    assert ctr_only.success and all(v is not None for v in cache.get_many("ctr", [ad["ad_id"] for ad in second]))
    assert cache.get("budget", campaign_id) is None  # readers compute it live until the new split is written
    assert warm(instance, resources, campaign_id).success
    split = cache.get("budget", campaign_id)
    assert set(split) == {ad["ad_id"] for ad in second} and sum(split.values()) == pytest.approx(5000.0)
    refreshed = dg.materialize(  # the same revision warmed again (a refresh) keeps its split meanwhile
        [campaign_ctr, campaign_budget], selection=[campaign_ctr], partition_key=campaign_id, instance=instance,
        resources=resources,
    )  # fmt: skip
    assert refreshed.success and cache.get("budget", campaign_id) == split


def test_a_cancelled_campaign_is_not_warmed(registry, resources, instance, redis_client, schema):
    campaign_id = unique("gone")
    registry.register(campaign_id, "acme", datetime.now(UTC) + HOUR, campaign_ads(campaign_id, 4))
    registry.cancel(campaign_id)
    instance.add_dynamic_partitions(CAMPAIGNS.name, [campaign_id])
    run = warm(instance, resources, campaign_id)
    assert run.success
    meta = run.asset_materializations_for_node("campaign_ctr")[0].metadata
    assert meta["published"].value is False and "cancelled" in meta["reason"].value
    assert "model_version" not in meta  # none scored it: no blank value in the UI
    assert run.asset_materializations_for_node("campaign_budget")[0].metadata["published"].value is False
    assert live_keys(redis_client, schema, "ctr") == [] and live_keys(redis_client, schema, "budget") == []


def test_warming_without_an_approved_model_fails_clearly_and_writes_nothing(registry, resources, redis_client, schema):
    campaign_id = unique("nomodel")
    registry.register(campaign_id, "acme", datetime.now(UTC) + HOUR, campaign_ads(campaign_id, 4))
    with dg.instance_for_test() as empty:
        empty.add_dynamic_partitions(CAMPAIGNS.name, [campaign_id])
        run = warm(empty, resources, campaign_id, raise_on_error=False)
        assert not run.success
        (failure,) = [e for e in run.all_events if e.event_type_value == "STEP_FAILURE"]
        assert "no approved ctr_model" in failure.step_failure_data.error.message
        assert not [e for e in run.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]  # not worth a retry
    assert live_keys(redis_client, schema, "ctr") == [] and not registry.get(campaign_id).is_warm


@pytest.mark.parametrize(
    ("end_in", "config", "message"),
    [
        (
            None,
            {"open_ended_ttl_days": 0.0},
            "open_ended_ttl_days must be above 1 (the registry warms values again 1 day before they expire), got 0.0",
        ),
        (HOUR, {"grace_hours": -2.0}, "grace_hours must be from 0 to 8760 (a year), got -2.0"),
        # not an expiry, but retried three times before (h_ui): refused at once too
        (HOUR, {"draws": 0}, "campaign_budget config: draws must be at least 1, got 0"),
        (HOUR, {"prior_strength": -1.0}, "campaign_budget config: prior_strength must be a number above 0, got -1.0"),
    ],
)
def test_a_config_whose_values_would_expire_at_once_fails_in_one_line_and_warms_nothing(
    registry, resources, instance, redis_client, schema, end_in, config, message
):
    """Values expiring at or before the write are deleted by Redis as they land: the run succeeded, campaign_budget
    said warm, and none of the campaign's values were in the cache."""
    now = datetime.now(UTC)
    campaign_id = unique("badttl")
    end_at = None if end_in is None else now + HOUR + end_in
    registry.register(campaign_id, "acme", now + HOUR, campaign_ads(campaign_id, 4), end_at=end_at)
    instance.add_dynamic_partitions(CAMPAIGNS.name, [campaign_id])
    budget_only = {k: v for k, v in config.items() if k in ("draws", "prior_strength")}
    run_config = {"ops": {"campaign_ctr": {"config": {k: v for k, v in config.items() if k not in budget_only}},
                          "campaign_budget": {"config": config}}}  # fmt: skip
    run = warm(instance, resources, campaign_id, run_config=run_config, raise_on_error=False)
    assert not run.success
    (failure,) = [e for e in run.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failure.step_failure_data.user_failure_data.description == message
    assert not [e for e in run.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    assert not registry.get(campaign_id).is_warm


def test_an_open_ended_ttl_within_the_refresh_margin_is_refused():
    """The registry lists a warm campaign as due again a day before its values expire: with values of a day or less
    it was due as soon as it was warmed, so the launch sensor, which requests campaigns as they become due, never
    warmed it again, and only the backstop's passes did (values under 2 h expired between them)."""
    problem = warming_config_problem(CampaignWarmingConfig(open_ended_ttl_days=1.0))
    assert problem == (
        "open_ended_ttl_days must be above 1 (the registry warms values again 1 day before they expire), got 1.0"
    )
    assert warming_config_problem(CampaignWarmingConfig(open_ended_ttl_days=1.5)) is None


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"grace_hours": 1e12}, "grace_hours must be from 0 to 8760 (a year), got 1000000000000.0"),
        ({"open_ended_ttl_days": 1e9}, "open_ended_ttl_days must be at most 3650 (ten years), got 1000000000.0"),
    ],
)
def test_a_finite_but_huge_expiry_setting_is_refused_not_an_overflow(config, message):
    """A datetime past year 9999 raised OverflowError from the step, a traceback instead of a config error."""
    assert warming_config_problem(CampaignWarmingConfig(**config)) == message


# --- which model -------------------------------------------------------------------------------------------


class FakeModelConfig(dg.Config):
    version: str
    passes: bool


@dg.asset(
    name="ctr_model",
    partitions_def=dg.DailyPartitionsDefinition(start_date="2026-01-01"),
    check_specs=[dg.AssetCheckSpec("beats_baseline", asset="ctr_model", blocking=True)],
)
def fake_ctr_model(config: FakeModelConfig):
    yield dg.MaterializeResult(
        metadata={"model_version": config.version, "approved": config.passes},
        check_results=[dg.AssetCheckResult(check_name="beats_baseline", passed=config.passes)],
    )


def test_the_approved_model_is_the_newest_day_whose_beats_baseline_passed():
    def train(instance, day: str, version: str, passes: bool) -> None:
        config = {"ops": {"ctr_model": {"config": {"version": version, "passes": passes}}}}
        dg.materialize([fake_ctr_model], partition_key=day, instance=instance, run_config=config, raise_on_error=False)

    with dg.instance_for_test() as instance:
        with pytest.raises(dg.Failure, match="no approved ctr_model"):
            approved_model_version(instance)
        train(instance, "2026-11-17", "v17", True)
        assert approved_model_version(instance) == "v17"
        train(instance, "2026-11-18", "v18-bad", False)  # newer, but failed its gate
        assert approved_model_version(instance) == "v17"
        train(instance, "2026-11-18", "v18", True)
        assert approved_model_version(instance) == "v18"
        train(instance, "2026-11-16", "v16-backfill", True)  # materialized last, but of an older day
        assert approved_model_version(instance) == "v18"
        train(instance, "2026-11-18", "v18-rejected", False)  # the day run again, failing its gate: v18 is history
        assert approved_model_version(instance) == "v17"


def test_while_a_rollback_holds_a_day_back_its_models_and_later_ones_are_not_used():
    """An operator rolled ctr_cache back over a bad day: campaign warming, rescoring and the ctr tasks kept scoring with
    that day's model, and with any approved since (h_ops3). Until a later day publishes, they use the newest model of a
    day before the one held back."""
    from precompute_assets.defs.publishing import ROLLED_BACK_OVER

    def train(instance, day: str, version: str) -> None:
        config = {"ops": {"ctr_model": {"config": {"version": version, "passes": True}}}}
        dg.materialize([fake_ctr_model], partition_key=day, instance=instance, run_config=config)

    def published(instance, metadata: dict) -> None:
        instance.report_runless_asset_event(dg.AssetMaterialization("ctr_cache", partition="2026-11-17",
                                                                    metadata=metadata))  # fmt: skip

    with dg.instance_for_test() as instance:
        for day, version in (("2026-11-17", "v17"), ("2026-11-18", "v18-bad"), ("2026-11-19", "v19")):
            train(instance, day, version)
        assert approved_model_version(instance) == "v19"
        published(instance, {ROLLED_BACK_OVER: "2026-11-18", "version": "2026-11-17.x"})  # the rollback
        assert approved_model_version(instance) == "v17"
        published(instance, {"version": "2026-11-20.y"})  # a later day published: the hold is over
        assert approved_model_version(instance) == "v19"


def test_a_rollback_over_several_days_holds_back_the_models_of_the_days_between():
    """A rollback from 11-19 to 11-16 backed out of 11-17 and 11-18 too, but campaigns went on scoring with their
    models (h_diff23): only the held day and later were left out. A hold recorded before ``rolled_back_to`` was kept
    still leaves out the held day and later."""
    from precompute_assets.defs.publishing import ROLLED_BACK_OVER, ROLLED_BACK_TO

    def published(instance, metadata: dict) -> None:
        instance.report_runless_asset_event(dg.AssetMaterialization("ctr_cache", partition="2026-11-16",
                                                                    metadata=metadata))  # fmt: skip

    with dg.instance_for_test() as instance:
        for day in ("2026-11-16", "2026-11-17", "2026-11-18", "2026-11-19"):
            config = {"ops": {"ctr_model": {"config": {"version": f"v{day[-2:]}", "passes": True}}}}
            dg.materialize([fake_ctr_model], partition_key=day, instance=instance, run_config=config)
        published(instance, {ROLLED_BACK_OVER: "2026-11-19", ROLLED_BACK_TO: "2026-11-16", "version": "2026-11-16.x"})
        assert approved_model_version(instance) == "v16"
        published(instance, {"published": False, ROLLED_BACK_OVER: "2026-11-19", ROLLED_BACK_TO: "2026-11-16"})
        assert approved_model_version(instance) == "v16"  # a refused publish carries the whole hold
        published(instance, {ROLLED_BACK_OVER: "2026-11-19", "version": "2026-11-16.x"})  # recorded without the day
        assert approved_model_version(instance) == "v18"


def test_the_approved_model_is_found_behind_more_than_100_newer_materializations(monkeypatch):
    def train(instance, version: str, passes: bool, day: str, last_day: str | None = None) -> None:
        """One run of ``day``, or one run of the days ``day``..``last_day`` (a single-run backfill)."""
        config = {"ops": {"ctr_model": {"config": {"version": version, "passes": passes}}}}
        options = (
            {"tags": {ASSET_PARTITION_RANGE_START_TAG: day, ASSET_PARTITION_RANGE_END_TAG: last_day}}
            if last_day
            else {"partition_key": day}
        )
        dg.materialize([fake_ctr_model], instance=instance, run_config=config, raise_on_error=False, **options)

    with dg.instance_for_test() as instance:
        train(instance, "v18", True, "2026-11-18")
        train(instance, "backfill-bad", False, "2026-07-01", "2026-11-17")  # 140 older days, failing their gate
        assert len(instance.fetch_materializations(dg.AssetKey("ctr_model"), limit=1000).records) == 141
        assert approved_model_version(instance) == "v18"
        train(instance, "backfill-good", True, "2026-07-01", "2026-11-17")  # and again, passing it
        assert approved_model_version(instance) == "v18"  # not the newest backfilled day, 2026-11-17
        monkeypatch.setattr(warming, "APPROVAL_PAGE", 7)  # many pages of both reads
        assert approved_model_version(instance) == "v18"


# --- the backstop ------------------------------------------------------------------------------------------


def test_the_backstop_requests_what_is_due_and_not_being_warmed(registry, app_db):
    now = datetime.now(UTC)
    idle, busy, warm_one = unique("idle"), unique("busy"), unique("warm")
    for campaign_id in (idle, busy, warm_one):
        registry.register(campaign_id, "acme", now + 3 * HOUR, campaign_ads(campaign_id, 2))
    registry.mark_warm(warm_one, 1)
    (backstop,) = build_campaign_schedules("UTC")
    assert backstop.cron_schedule == "0 */2 * * *" and backstop.default_status == dg.DefaultScheduleStatus.RUNNING
    resource = CampaignRegistryResource(url=app_db)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(CAMPAIGNS.name, [busy])
        create_run_for_test(
            instance, job_name="campaign_warming_job", status=dg.DagsterRunStatus.STARTED,
            tags={"dagster/run_key": f"{busy}-r1", "precompute/campaign": busy},
        )  # fmt: skip
        context = dg.build_schedule_context(
            instance=instance, scheduled_execution_time=now, resources={"campaign_registry": resource},
            repository_def=REPOSITORY,
        )  # fmt: skip
        requests = backstop.evaluate_tick(context).run_requests
        assert [(r.run_key, r.partition_key) for r in requests] == [(f"{idle}-r1", idle)]
        assert requests[0].tags["dagster/priority"] == "10"
        # the sensor never added the partition (it was off): the backstop did
        assert idle in instance.get_dynamic_partitions(CAMPAIGNS.name)


def test_an_open_ended_campaign_is_warmed_again_before_its_values_expire(
    registry, resources, instance, cache, redis_client, schema, monkeypatch
):
    now = datetime.now(UTC)
    campaign_id = unique("evergreen")
    ad_list = campaign_ads(campaign_id, 5)
    ids = [ad["ad_id"] for ad in ad_list]
    registry.register(campaign_id, "acme", now + HOUR, ad_list)  # no end: its values live 30 days
    result = tick(instance, resources["campaign_registry"], redis=resources["redis"])
    (request,) = result.run_requests
    add_partitions(instance, result)
    assert warm(instance, resources, campaign_id, tags=request.tags).success
    warmed = registry.get(campaign_id)
    assert warmed.is_warm and 29.9 < (warmed.warm_until - now) / timedelta(days=1) < 30.1
    for kind, key in (("ctr", ids[0]), ("budget", campaign_id)):  # the registry knows when the values expire
        assert abs(redis_client.expiretime(schema.live(kind, key)) - warmed.warm_until.timestamp()) <= 1
    assert registry.due(now) == []

    # day 29.5: within a day of the expiry, the backstop and the sensor request one more run, under a new key
    day29 = now + timedelta(days=29, hours=12)
    refresh_key = f"{campaign_id}-r1-until{warmed.warm_until:%Y%m%d}"
    (backstop,) = build_campaign_schedules("UTC")
    context = dg.build_schedule_context(
        instance=instance, scheduled_execution_time=day29, repository_def=REPOSITORY,
        resources={"campaign_registry": resources["campaign_registry"]},
    )  # fmt: skip
    (again,) = backstop.evaluate_tick(context).run_requests
    assert (again.run_key, again.partition_key) == (refresh_key, campaign_id) and refresh_key != request.run_key

    class Day29(datetime):
        @classmethod
        def now(cls, tz=None):
            return day29

    with monkeypatch.context() as frozen:
        frozen.setattr(warming, "datetime", Day29)
        later = tick(instance, resources["campaign_registry"], result.cursor, redis=resources["redis"])
        assert [r.run_key for r in later.run_requests] == [refresh_key]
        assert not tick(
            instance, resources["campaign_registry"], later.cursor, redis=resources["redis"]
        ).run_requests  # requested once

    # day 31 without that run: the values are gone and the registry says so
    for key in [schema.live("ctr", ad_id) for ad_id in ids] + [schema.live("budget", campaign_id)]:
        redis_client.expireat(key, int(now.timestamp()) - 1)
    assert cache.get_many("ctr", ids) == [None] * len(ids) and cache.get("budget", campaign_id) is None
    registry.mark_warm(campaign_id, 1, warm_until=now - HOUR)
    assert not registry.get(campaign_id).is_warm
    # the run warms it again, for another 30 days
    assert warm(instance, resources, campaign_id, tags=again.tags).success
    assert registry.get(campaign_id).is_warm and registry.get(campaign_id).warm_until >= warmed.warm_until
    assert None not in cache.get_many("ctr", ids) and cache.get("budget", campaign_id) is not None


def test_a_warm_campaign_whose_values_redis_lost_is_warmed_again_at_once(
    registry, resources, instance, cache, redis_client, schema
):
    """The sensor took a campaign as warm from the registry alone: values Redis lost (a restart without persistence,
    a flush, an eviction, a failover to a replica that lagged) were written again only a day before they were due
    to expire, and a campaign with an end, never. Each tick now looks for every warm campaign's budget key."""
    now = datetime.now(UTC)
    campaign_id, untouched = unique("flushed"), unique("untouched")
    ids = {}
    for name in (campaign_id, untouched):
        ad_list = campaign_ads(name, 4)
        ids[name] = [ad["ad_id"] for ad in ad_list]
        registry.register(name, "acme", now + HOUR, ad_list, end_at=now + 26 * HOUR)
    sensor = {"redis": resources["redis"]}
    first = tick(instance, resources["campaign_registry"], **sensor)
    add_partitions(instance, first)
    for request in first.run_requests:
        assert warm(instance, resources, request.partition_key, tags=request.tags).success
    quiet = tick(instance, resources["campaign_registry"], first.cursor, **sensor)
    assert not quiet.run_requests  # both warm, their values in Redis

    # Redis loses one campaign's keys (the namespace's share of a FLUSHALL, or of a restart without persistence)
    redis_client.delete(schema.live("budget", campaign_id), *(schema.live("ctr", ad_id) for ad_id in ids[campaign_id]))
    assert cache.get_many("ctr", ids[campaign_id]) == [None] * 4 and registry.get(campaign_id).is_warm
    lost = tick(instance, resources["campaign_registry"], quiet.cursor, **sensor)
    (request,) = lost.run_requests
    hour = int(datetime.now(UTC).timestamp()) // 3600
    assert request.partition_key == campaign_id and request.job_name == "campaign_warming_job"
    until = f"{registry.get(campaign_id).warm_until.astimezone(UTC):%Y%m%d}"
    assert request.run_key in {f"{campaign_id}-r1-until{until}-lost{h}" for h in (hour - 1, hour)}  # a key of its own
    assert request.tags["dagster/priority"] == "10" and request.tags[CAMPAIGN_TAG] == campaign_id

    # while that run is under way, later ticks do not ask again
    create_run_for_test(
        instance, job_name="campaign_warming_job", status=dg.DagsterRunStatus.STARTED,
        tags={**request.tags, "dagster/run_key": request.run_key},
    )  # fmt: skip
    assert not tick(instance, resources["campaign_registry"], lost.cursor, **sensor).run_requests
    assert warm(instance, resources, campaign_id, tags=request.tags).success
    assert None not in cache.get_many("ctr", ids[campaign_id]) and cache.get("budget", campaign_id) is not None
    instance.delete_run(instance.get_runs(dg.RunsFilter(tags={"dagster/run_key": request.run_key}))[0].run_id)
    assert not tick(instance, resources["campaign_registry"], lost.cursor, **sensor).run_requests  # back in Redis


def test_a_newly_approved_ctr_model_scores_the_warm_campaigns_again(
    registry, resources, instance, model_home, monkeypatch, app_db
):
    """Campaign CTRs (and the budget split drawn from them) stayed those of the model approved when the campaign was
    warmed, for as long as it ran (30 days for an open-ended one), while the nightly graph served every other ad by
    the new model. The registry now records each warm campaign's model, and the sensor scores it again (once per
    model, at most once an hour while a run fails) when another model is approved."""
    from precompute_assets.defs import campaigns as campaigns_module

    now = datetime.now(UTC)
    campaign_id = unique("rescored")
    registry.register(campaign_id, "acme", now + HOUR, campaign_ads(campaign_id, 3), end_at=now + 26 * HOUR)
    sensor = {"redis": resources["redis"]}
    first = tick(instance, resources["campaign_registry"], **sensor)
    add_partitions(instance, first)
    for request in first.run_requests:
        assert warm(instance, resources, request.partition_key, tags=request.tags).success
    assert registry.get(campaign_id).warm_model == model_home["version"]  # recorded by the warming run
    quiet = tick(instance, resources["campaign_registry"], first.cursor, **sensor)
    assert campaign_id not in {r.partition_key for r in quiet.run_requests}  # the same model: nothing to score

    monkeypatch.setattr(campaigns_module, "approved_model_version", lambda instance: "2099-01-01.newer")
    again = tick(instance, resources["campaign_registry"], quiet.cursor, **sensor)
    (request,) = [r for r in again.run_requests if r.partition_key == campaign_id]
    hour = int(datetime.now(UTC).timestamp()) // 3600
    prefix = f"{campaigns_module.warming_run_key(registry.get(campaign_id))}-model2099-01-01.newer-h"
    assert request.run_key in {f"{prefix}{h}" for h in (hour - 1, hour)} and request.job_name == "campaign_warming_job"
    # behind every launch's warming (10): a new model each night asks one run per warm campaign
    assert request.tags[CAMPAIGN_TAG] == campaign_id and request.tags["dagster/priority"] == "5"
    create_run_for_test(  # that run failed: asked again next hour, and meanwhile it takes no room from the others
        instance, job_name="campaign_warming_job", status=dg.DagsterRunStatus.FAILURE,
        tags={**request.tags, "dagster/run_key": request.run_key},
    )  # fmt: skip
    failed = tick(instance, resources["campaign_registry"], again.cursor, **sensor)
    retried = [r.run_key for r in failed.run_requests if r.partition_key == campaign_id]
    asked_hour = int(request.run_key.rsplit("-h", 1)[1])
    assert retried in ([], [f"{prefix}{asked_hour + 1}"]), retried  # not again this hour (unless the hour turned)
    with dg.instance_for_test() as newer:  # a Dagster instance newer than the registry: the partition is added too
        moved = tick(newer, resources["campaign_registry"], quiet.cursor, **sensor)
        assert campaign_id in {r.partition_key for r in moved.run_requests}
        assert campaign_id in [key for r in moved.dynamic_partitions_requests for key in r.partition_keys]
    off = CampaignRegistryResource(url=app_db, rescore_on_new_model=False)  # kept on the model it was warmed with
    assert campaign_id not in {r.partition_key for r in tick(instance, off, quiet.cursor, **sensor).run_requests}
    registry.mark_warm(campaign_id, registry.get(campaign_id).revision, registry.get(campaign_id).warm_until,
                       model="2099-01-01.newer")  # fmt: skip  # what the requested run records
    done = tick(instance, resources["campaign_registry"], again.cursor, **sensor)
    assert campaign_id not in {r.partition_key for r in done.run_requests}


def test_a_warm_campaign_that_lost_one_ctr_to_an_eviction_is_warmed_again(
    registry, resources, instance, cache, redis_client, schema
):
    """The sensor looked for the budget split alone: an eviction (every live key has a TTL; the embedded Redis evicts
    volatile-lru) that took one ad's CTR left the campaign part-served and warm for good. An ad warming could not
    score (no CTR written, so none in the split) is not taken for a lost one."""
    now = datetime.now(UTC)
    campaign_id = unique("evicted")
    ad_list = campaign_ads(campaign_id, 4)
    ids = [ad["ad_id"] for ad in ad_list]
    registry.register(campaign_id, "acme", now + HOUR, ad_list, end_at=now + 26 * HOUR)
    sensor = {"redis": resources["redis"]}
    first = tick(instance, resources["campaign_registry"], **sensor)
    add_partitions(instance, first)
    (request,) = [r for r in first.run_requests if r.partition_key == campaign_id]
    assert warm(instance, resources, campaign_id, tags=request.tags).success
    split = cache.get("budget", campaign_id)
    assert set(split) == set(ids)

    # as if the fourth ad could not be scored: no CTR, and the split is over the other three
    client, key = resources["redis"].client(), schema.live("budget", campaign_id)
    ttl = redis_client.ttl(key)
    redis_client.set(key, codec_for("budget").encode({ad: split[ad] for ad in ids[:3]}), ex=ttl)
    redis_client.delete(schema.live("ctr", ids[3]))
    (campaign,) = [c for c in registry.warm(datetime.now(UTC)) if c.campaign_id == campaign_id]
    assert values_lost(client, schema, [campaign]) == []
    quiet = tick(instance, resources["campaign_registry"], first.cursor, **sensor)
    assert campaign_id not in {r.partition_key for r in quiet.run_requests}

    redis_client.delete(schema.live("ctr", ids[1]))  # what an eviction of one key does
    assert values_lost(client, schema, [campaign]) == [campaign]
    lost = tick(instance, resources["campaign_registry"], quiet.cursor, **sensor)
    assert [r.partition_key for r in lost.run_requests if "-lost" in (r.run_key or "")] == [campaign_id]


def test_a_flush_of_many_warm_campaigns_is_warmed_again_a_tick_at_a_time(registry, app_db, redis_url, schema):
    """Every lost campaign was requested in one tick: a flush of a Redis holding thousands asked for thousands of runs
    at once. A tick now asks for ``max_rewarms_per_tick``, those launched earliest first; the next tick the rest."""
    now = datetime.now(UTC)
    ids = [unique(f"flushed{i}") for i in range(3)]
    for hours, campaign_id in zip((3, 1, 2), ids, strict=True):  # launched 3, 1 and 2 hours ago
        registry.register(campaign_id, "acme", now - hours * HOUR, campaign_ads(campaign_id, 2), end_at=now + 9 * HOUR)
        registry.mark_warm(campaign_id, 1, warm_until=now + 9 * HOUR)  # warm, but no budget key in Redis: lost
    capped = CampaignRegistryResource(url=app_db, max_rewarms_per_tick=2)
    redis = RedisResource(url=redis_url, namespace=schema.namespace)
    with dg.instance_for_test() as instance:
        first = tick(instance, capped, redis=redis)
        assert [r.partition_key for r in first.run_requests] == [ids[0], ids[2]]  # serving longest first
        for request in first.run_requests:  # under way: the next tick does not ask for them again
            create_run_for_test(instance, job_name="campaign_warming_job", status=dg.DagsterRunStatus.STARTED,
                                tags={**request.tags, "dagster/run_key": request.run_key})  # fmt: skip
        second = tick(instance, capped, first.cursor, redis=redis)
    assert [r.partition_key for r in second.run_requests] == [ids[1]]


def test_warm_campaigns_are_checked_a_bounded_number_a_tick_in_turns(registry, app_db, redis_url, schema):
    """Every tick checked every warm campaign's values in Redis: 0.4 s at 10,000 campaigns of 20 ads, and more with
    more, within a sensor tick. A tick now checks ``max_lost_checks_per_tick`` of them, the next tick the next ones."""
    now = datetime.now(UTC)
    ids = sorted(unique(f"turn{i}") for i in range(5))
    for campaign_id in ids:
        registry.register(campaign_id, "acme", now - HOUR, campaign_ads(campaign_id, 2), end_at=now + 9 * HOUR)
        registry.mark_warm(campaign_id, 1, warm_until=now + 9 * HOUR)  # warm, but no budget key in Redis: lost
    mine = set(ids)
    others = [c.campaign_id for c in registry.warm(now) if c.campaign_id not in mine]
    registry_resource = CampaignRegistryResource(url=app_db, max_lost_checks_per_tick=2 + len(others))
    redis = RedisResource(url=redis_url, namespace=schema.namespace)
    seen, cursor = [], None
    with dg.instance_for_test() as instance:
        for _ in range(3):
            result = tick(instance, registry_resource, cursor, redis=redis)
            seen.append(sorted(r.partition_key for r in result.run_requests if r.partition_key in mine))
            cursor = result.cursor
            for request in result.run_requests:  # under way: not asked for again
                create_run_for_test(instance, job_name="campaign_warming_job", status=dg.DagsterRunStatus.STARTED,
                                    tags={**request.tags, "dagster/run_key": request.run_key})  # fmt: skip
    assert all(len(found) <= 2 for found in seen)  # at most two of mine a tick (the others' share aside)
    assert sorted(sum(seen, [])) == ids  # every one in three ticks, none twice
    assert LaunchCursor.decode(cursor).checked is not None


def test_a_turn_with_more_lost_campaigns_than_a_tick_warms_is_checked_again_before_the_next(
    registry, app_db, redis_url, schema
):
    """The turn moved on past lost campaigns a tick had no room to warm: the next tick warmed the next turn's, and
    the one launched earlier waited a whole round."""
    now = datetime.now(UTC)
    ids = sorted(unique(f"round{i}") for i in range(4))
    for i, campaign_id in enumerate(ids):  # launched in id order: the earliest first
        registry.register(
            campaign_id, "acme", now - (5 - i) * HOUR, campaign_ads(campaign_id, 2), end_at=now + 9 * HOUR
        )
        registry.mark_warm(campaign_id, 1, warm_until=now + 9 * HOUR)  # warm, no values in Redis: lost
    capped = CampaignRegistryResource(url=app_db, max_lost_checks_per_tick=2, max_rewarms_per_tick=1)
    redis = RedisResource(url=redis_url, namespace=schema.namespace)
    warmed, cursor = [], None
    with dg.instance_for_test() as instance:
        for _ in range(4):
            result = tick(instance, capped, cursor, redis=redis)
            warmed += [r.partition_key for r in result.run_requests]
            cursor = result.cursor
            for request in result.run_requests:  # under way: not asked for again
                create_run_for_test(instance, job_name="campaign_warming_job", status=dg.DagsterRunStatus.STARTED,
                                    tags={**request.tags, "dagster/run_key": request.run_key})  # fmt: skip
    assert warmed == ids  # one a tick, in launch order


def test_the_sensor_still_warms_cold_campaigns_when_redis_does_not_answer(registry, app_db):
    now = datetime.now(UTC)
    warm_one, cold = unique("warm"), unique("cold")
    for campaign_id in (warm_one, cold):
        registry.register(campaign_id, "acme", now + HOUR, campaign_ads(campaign_id, 2))
    registry.mark_warm(warm_one, 1, warm_until=now + 26 * HOUR)  # its values are not checked: nothing answers
    with dg.instance_for_test() as instance:
        result = tick(instance, CampaignRegistryResource(url=app_db), redis=NO_REDIS)
    assert [r.run_key for r in result.run_requests] == [f"{cold}-r1"]


# --- faults ------------------------------------------------------------------------------------------------


def test_redis_down_fails_the_run_after_retries_then_the_backstop_warms_it(
    registry, resources, instance, redis_server, schema
):
    server = redis_server()
    private = {**resources, "redis": RedisResource(url=server.url, namespace=schema.namespace)}
    reader = PredictionCache(connect(server.url, socket_timeout=0.5), schema=schema, pointer_ttl_s=0, backoff_s=0)
    now = datetime.now(UTC)
    campaign_id = unique("outage")
    ad_list = campaign_ads(campaign_id, 30)
    ids = [ad["ad_id"] for ad in ad_list]
    registry.register(campaign_id, "acme", now + 3 * HOUR, ad_list)
    result = tick(instance, resources["campaign_registry"], redis=resources["redis"])
    add_partitions(instance, result)

    server.stop()
    run = warm(instance, private, campaign_id, raise_on_error=False)
    assert not run.success
    retries = [e for e in run.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    assert len(retries) == warming.WARMING_RETRY.max_retries == 3
    assert not registry.get(campaign_id).is_warm
    assert reader.get_many("ctr", ids) == [None] * len(ids)  # misses, never an error

    server.start()
    assert reader.get_many("ctr", ids) == [None] * len(ids)  # nothing of the failed run is visible
    (backstop,) = build_campaign_schedules("UTC")
    with dg.build_schedule_context(
        instance=instance, scheduled_execution_time=datetime.now(UTC), resources=private, repository_def=REPOSITORY
    ) as context:
        (request,) = [r for r in backstop.evaluate_tick(context).run_requests if r.partition_key == campaign_id]
    assert request.run_key == f"{campaign_id}-r1"  # the sensor's run key
    assert warm(instance, private, campaign_id, tags=request.tags).success
    assert registry.get(campaign_id).is_warm
    assert all(value is not None for value in reader.get_many("ctr", ids))
    reader.close()


def test_ctrs_scored_before_an_invalidation_of_ctr_are_not_written_after_it(
    registry, resources, instance, cache, redis_client, schema, monkeypatch
):
    """Campaign warming wrote CTRs it had scored before a `cache invalidate` of ctr, after it, for the campaign's
    whole life (h_camp): its write is fenced by the kind's epoch, as get_or_compute's and task runs' are."""
    from precompute_assets.defs import campaigns as campaigns_module
    from precompute_assets.serving.invalidate import bump_epoch

    monkeypatch.setattr(campaign_ctr.op, "_retry_policy", None)  # one attempt: the retry would score again
    real_score, scorings = campaigns_module.ctr.score_ads, []

    def invalidated_while_scoring(*args, **kwargs):
        scorings.append(1)
        if len(scorings) <= invalidations:
            bump_epoch(redis_client, "ctr", schema)  # what `cache invalidate --kind ctr ...` does first
        return real_score(*args, **kwargs)

    monkeypatch.setattr(campaigns_module.ctr, "score_ads", invalidated_while_scoring)
    campaign_id = unique("fenced")
    ads = campaign_ads(campaign_id, 3)
    registry.register(campaign_id, "acme", datetime.now(UTC) + HOUR, ads)
    instance.add_dynamic_partitions(CAMPAIGNS.name, [campaign_id])
    invalidations = 100  # during every scoring: nothing written, and the run fails for the retry policy
    run = warm(instance, resources, campaign_id, raise_on_error=False)
    assert not run.success and cache.get_many("ctr", [ad["ad_id"] for ad in ads]) == [None] * 3
    (failure,) = [e for e in run.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    assert "ctr was invalidated while its ads were scored, 3 times" in (
        failure.step_failure_data.user_failure_data.description
    )
    # During the first scoring only (an invalidation, or another campaign's cleanup, h_diff2): every input read
    # again, the approved model too (its scoring of the old ones was the unfenced write under another name, h_diff3)
    scorings.clear()
    invalidations = 1
    approvals, real_approved = [], campaigns_module.approved_model_version
    monkeypatch.setattr(campaigns_module, "approved_model_version", lambda i: approvals.append(1) or real_approved(i))
    assert warm(instance, resources, campaign_id).success and len(scorings) == 2 and len(approvals) == 2
    assert None not in cache.get_many("ctr", [ad["ad_id"] for ad in ads])
    # Cancelled (and cleaned up) during the first scoring: the second read finds it cancelled and writes nothing; it
    # wrote its CTRs back after the cleanup before (h_diff3)
    registry.register(campaign_id, "acme", datetime.now(UTC) + HOUR, ads, budget=2000.0)  # a new revision
    writes, real_write = [], campaigns_module.write_live_values
    monkeypatch.setattr(campaigns_module, "write_live_values", lambda *a, **k: writes.append(1) or real_write(*a, **k))

    def cancelled_while_scoring(*args, **kwargs):
        if not scorings:
            cancelled = registry.cancel(campaign_id)
            campaigns_module.remove_campaign_values(registry, redis_client, schema, cancelled, datetime.now(UTC))
        scorings.append(1)
        return real_score(*args, **kwargs)

    scorings.clear()
    monkeypatch.setattr(campaigns_module.ctr, "score_ads", cancelled_while_scoring)
    run = warm(instance, resources, campaign_id)
    # the cancel bumped the revision: nothing recorded as written, nothing written (the fenced write was refused)
    assert run.success and len(scorings) == 1 and len(writes) == 0
    assert cache.get_many("ctr", [ad["ad_id"] for ad in ads]) == [None] * 3


def test_a_full_redis_fails_warming_in_one_line_naming_maxmemory(
    registry, resources, instance, redis_server, schema, monkeypatch
):
    """At ``maxmemory`` with ``noeviction`` the warming's transaction failed with redis-py's bare ``OutOfMemoryError``
    and its traceback; only the CTR publish said what to change. A private server: an OOM limit on the shared one
    would fail other tests' writes."""
    monkeypatch.setattr(campaign_ctr.op, "_retry_policy", None)  # one attempt: the same server is full again
    server = redis_server(extra_config=("maxmemory-policy noeviction",))
    connect(server.url).config_set("maxmemory", 1)  # our own test server: full at once
    private = {**resources, "redis": RedisResource(url=server.url, namespace=schema.namespace)}
    campaign_id = unique("full")
    registry.register(campaign_id, "acme", datetime.now(UTC) + 3 * HOUR, campaign_ads(campaign_id, 5))
    add_partitions(instance, tick(instance, resources["campaign_registry"], redis=resources["redis"]))
    run = warm(instance, private, campaign_id, raise_on_error=False)
    assert not run.success
    (failure,) = [e for e in run.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    description = failure.step_failure_data.user_failure_data.description
    assert description.startswith(f"campaign {campaign_id} not warmed: the Redis of PRECOMPUTE_REDIS_URL is out of")
    assert "maxmemory" in description and "volatile-lru" in description and "\n" not in description
    assert not registry.get(campaign_id).is_warm


def test_a_cleanup_that_failed_with_redis_down_is_run_again_by_its_backstop(
    registry, resources, instance, redis_server, schema
):
    """A cleanup run fails when Redis is down for longer than its retries; the sensor never requests its run key
    again and the daemon re-executes only runs whose worker died, so the cancelled campaign's CTRs and budget
    split stayed readable until they expired (a month for an open-ended campaign)."""
    server = redis_server()
    private = {**resources, "redis": RedisResource(url=server.url, namespace=schema.namespace)}
    reader = PredictionCache(connect(server.url, socket_timeout=0.5), schema=schema, pointer_ttl_s=0, backoff_s=0)
    campaign_id, kept = unique("cancelled"), unique("kept")
    for name in (campaign_id, kept):
        registry.register(name, "acme", datetime.now(UTC) + HOUR, campaign_ads(name, 3))
    result = tick(instance, resources["campaign_registry"], redis=resources["redis"])
    add_partitions(instance, result)
    for request in result.run_requests:
        assert warm(instance, private, request.partition_key).success
    registry.cancel(campaign_id)
    (cleanup,) = tick(instance, resources["campaign_registry"], result.cursor, redis=private["redis"]).run_requests

    def run_cleanup(request: dg.RunRequest) -> bool:
        tags = {**request.tags, "dagster/run_key": request.run_key}
        return campaign_cleanup_job.execute_in_process(
            run_config=request.run_config, instance=instance, resources=private, tags=tags, raise_on_error=False
        ).success

    server.stop()
    assert not run_cleanup(cleanup)
    server.start()
    assert reader.get("budget", campaign_id) is not None  # still served

    backstop = build_campaign_cleanup_schedule("UTC")
    assert backstop.cron_schedule == "30 */2 * * *" and backstop.default_status == dg.DefaultScheduleStatus.RUNNING

    def backstop_tick():
        with dg.build_schedule_context(
            instance=instance, scheduled_execution_time=datetime.now(UTC), resources=private, repository_def=REPOSITORY
        ) as context:
            return [
                r for r in backstop.evaluate_tick(context).run_requests or [] if r.tags[CAMPAIGN_TAG] == campaign_id
            ]

    (again,) = backstop_tick()
    assert (again.job_name, again.run_key, again.run_config) == (
        "campaign_cleanup_job",
        cleanup.run_key,
        cleanup.run_config,
    )
    assert run_cleanup(again)
    assert reader.get("budget", campaign_id) is None and reader.get("budget", kept) is not None
    assert backstop_tick() == []  # its newest cleanup succeeded
    reader.close()


def test_a_campaign_is_warm_only_once_redis_replicas_hold_its_values(
    registry, resources, instance, redis_server, schema
):
    """A failover promotes a replica without the writes it had not received: a campaign the registry calls warm would
    launch cold. So the run marks it warm only once the replicas hold its values (a lagging replica: retried)."""
    from precompute_assets_tests.serving.test_replication import replica_of

    primary = redis_server()
    replica = replica_of(redis_server, primary)
    private = {**resources, "redis": RedisResource(url=primary.url, namespace=schema.namespace, replica_wait_s=0.5)}
    campaign_id = unique("replicated")
    ad_list = campaign_ads(campaign_id, 20)
    registry.register(campaign_id, "acme", datetime.now(UTC) + 3 * HOUR, ad_list)
    add_partitions(instance, tick(instance, resources["campaign_registry"], redis=resources["redis"]))
    os.kill(replica.pid, signal.SIGSTOP)
    try:
        run = warm(instance, private, campaign_id, raise_on_error=False)
        assert not run.success and not registry.get(campaign_id).is_warm
        failures = [e for e in run.all_events if e.event_type_value == "STEP_FAILURE"]
        assert "ReplicationTimeoutError" in str(failures[0].event_specific_data.error)
    finally:
        os.kill(replica.pid, signal.SIGCONT)
    # The replica catches up once it runs again: under load that took longer than 0.5 s, four times over.
    patient = {**resources, "redis": RedisResource(url=primary.url, namespace=schema.namespace, replica_wait_s=30)}
    assert warm(instance, patient, campaign_id).success and registry.get(campaign_id).is_warm
    with redis.Redis(port=replica.port) as theirs:  # what the registry calls warm, a promoted replica serves
        assert len(theirs.keys(f"{schema.prefix}:ctr:live:*")) == len(ad_list)


def test_a_campaign_at_the_ad_cap_is_one_bounded_transaction_and_readers_see_all_of_it_or_none(
    registry, resources, instance, redis_url, schema, monkeypatch
):
    campaign_id = unique("cap")
    ad_list = campaign_ads(campaign_id, MAX_ADS)
    registry.register(campaign_id, "acme", datetime.now(UTC) + HOUR, ad_list)
    instance.add_dynamic_partitions(CAMPAIGNS.name, [campaign_id])
    transactions, transact, fenced = [], publish.transact_per_slot, publish._fenced_transaction
    monkeypatch.setattr(publish, "transact_per_slot", lambda c, commands: transactions.append(commands) or
                        transact(c, commands))  # fmt: skip
    monkeypatch.setattr(
        publish,
        "_fenced_transaction",
        lambda c, name, epoch, commands: transactions.append(commands) or fenced(c, name, epoch, commands),
    )  # fmt: skip  (the write WATCHes ctr's epoch)
    names = [schema.live("ctr", ad["ad_id"]) for ad in ad_list]
    seen, done = set(), threading.Event()

    def read() -> None:  # one MGET is atomic: it sees the campaign's transaction wholly before or after
        with redis.Redis.from_url(redis_url) as reader:
            while not done.is_set():
                seen.add(sum(value is not None for value in reader.mget(names)))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        assert warm(instance, resources, campaign_id).success
    finally:
        done.set()
        reader.join()
    ctr_live = f"{schema.prefix}:ctr:live:".encode()
    ctr_writes = [commands for commands in transactions if commands[0][1].startswith(ctr_live)]
    # one transaction, bounded by the cap (and the DEL of a last revision's budget split)
    assert len(ctr_writes) == 1 and len(ctr_writes[0]) <= 3 * MAX_ADS + 1
    assert seen <= {0, MAX_ADS} and 0 in seen, seen
    with redis.Redis.from_url(redis_url) as client:
        assert sum(value is not None for value in client.mget(names)) == MAX_ADS


def test_a_campaign_registered_before_the_ad_cap_is_refused_by_warming_and_nothing_is_written(
    registry, resources, instance, redis_client, schema, monkeypatch, app_db
):
    campaign_id = unique("overcap")
    registry.register(campaign_id, "acme", datetime.now(UTC) + HOUR, campaign_ads(campaign_id, 4))
    instance.add_dynamic_partitions(CAMPAIGNS.name, [campaign_id])
    capped = {**resources, "campaign_registry": CampaignRegistryResource(url=app_db, max_ads=3)}  # the cap now
    transactions = []
    monkeypatch.setattr(publish, "transact_per_slot", lambda client, commands: transactions.append(commands))
    run = warm(instance, capped, campaign_id, raise_on_error=False)
    assert not run.success
    (failure,) = [e for e in run.all_events if e.event_type_value == "STEP_FAILURE"]
    message = failure.step_failure_data.error.message
    assert f"campaign {campaign_id} has 4 ads, more than the 3 a campaign may have" in message
    assert "raise the cap (PRECOMPUTE_CAMPAIGN_MAX_ADS, the campaign_registry resource's max_ads)" in message
    assert not [e for e in run.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]  # not worth a retry
    assert transactions == [] and live_keys(redis_client, schema, "ctr") == [] and not registry.get(campaign_id).is_warm


def test_the_cleanup_of_a_campaign_over_the_ad_cap_deletes_in_transactions_of_the_cap(
    registry, resources, instance, cache, app_db, schema, monkeypatch
):
    """A campaign registered with more ads than the cap (before it, or under a higher one) was removed in one
    transaction of all its keys, which holds Redis as long as the warming the cap refuses: now in batches of the cap."""
    campaign_id = unique("overcap")
    ad_list = campaign_ads(campaign_id, 5)
    registry.register(campaign_id, "acme", datetime.now(UTC) + HOUR, ad_list)
    instance.add_dynamic_partitions(CAMPAIGNS.name, [campaign_id])
    assert warm(instance, resources, campaign_id).success  # under the default cap of 10,000
    registry.cancel(campaign_id)
    transactions, transact, fenced = [], publish.transact_per_slot, publish._fenced_transaction
    monkeypatch.setattr(publish, "transact_per_slot", lambda c, commands: transactions.append(commands) or
                        transact(c, commands))  # fmt: skip
    monkeypatch.setattr(
        publish,
        "_fenced_transaction",
        lambda c, name, epoch, commands: transactions.append(commands) or fenced(c, name, epoch, commands),
    )  # fmt: skip  (the write WATCHes ctr's epoch)
    capped = {**resources, "campaign_registry": CampaignRegistryResource(url=app_db, max_ads=2)}
    run_config = {"ops": {"remove_campaign": {"config": {"campaign_id": campaign_id}}}}
    assert campaign_cleanup_job.execute_in_process(run_config=run_config, instance=instance, resources=capped).success
    assert [len(commands) for commands in transactions] == [2, 2, 2]  # 5 CTRs and the budget, 2 keys at a time
    assert (
        cache.get_many("ctr", [ad["ad_id"] for ad in ad_list]) == [None] * 5
        and cache.get("budget", campaign_id) is None
    )
    observation = instance.fetch_observations(campaign_ctr.key, limit=1).records[0]
    assert observation.asset_observation.metadata["keys_removed"].value == 6


def test_the_ad_cap_is_a_setting_of_at_least_1(app_db, monkeypatch):
    from precompute_assets.defs.resources import campaign_registry_fields
    from precompute_assets.defs.settings import SettingError
    from precompute_assets.storage.campaigns import ENV_CAMPAIGN_MAX_ADS, max_ads_from_env

    assert CampaignRegistryResource(url=app_db).max_ads == MAX_ADS == max_ads_from_env({}) == 10_000
    assert campaign_registry_fields({}) == {} and max_ads_from_env({ENV_CAMPAIGN_MAX_ADS: " "}) == MAX_ADS
    monkeypatch.setenv(ENV_CAMPAIGN_MAX_ADS, "50000")
    assert CampaignRegistry(app_db).max_ads == 50_000  # services that register read the Definitions' cap
    assert campaign_registry_fields()["max_ads"].get_value() == 50_000  # an EnvVar: the UI shows where it is from
    for bad in ("0", "-3", "many", "1.5"):
        with pytest.raises(SettingError, match=f"^{ENV_CAMPAIGN_MAX_ADS} must be a whole number of ads of at least 1"):
            campaign_registry_fields({ENV_CAMPAIGN_MAX_ADS: bad})
    with pytest.raises(dg.Failure) as refused:
        CampaignRegistryResource(url=app_db, max_ads=0).registry()
    assert refused.value.description == "campaign_registry: max_ads must be a whole number of ads of at least 1, got 0"


def test_a_write_refused_half_way_leaves_nothing_visible(redis_server, schema):
    """Redis refuses writes once it is full: a plain pipeline leaves part of a campaign behind, our transaction
    leaves none of it, so readers see the whole campaign or misses."""
    server = redis_server(extra_config=("maxmemory-policy noeviction",))
    client = connect(server.url, socket_timeout=5)
    items = [(f"ad{i:05d}", 0.01) for i in range(5000)]

    def fill_to_the_brim() -> None:
        client.flushall()
        client.config_set("maxmemory", client.info("memory")["used_memory"] + 100_000)

    fill_to_the_brim()
    plain = client.pipeline(transaction=False)
    for key, value in items:
        plain.set(schema.live("ctr", key), np.float32(value).tobytes())
    with pytest.raises(Exception, match="maxmemory"):
        plain.execute()
    assert 0 < client.dbsize() < len(items)  # a partial campaign

    fill_to_the_brim()
    with pytest.raises(Exception, match="maxmemory"):
        write_live_values(client, "ctr", items, expire_at=None, schema=schema)
    assert client.dbsize() == 0
    client.close()


# --- the feature set ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"PRECOMPUTE_AD_NUMERIC": "price, stock", "PRECOMPUTE_AD_CATEGORICAL": "brand"},
        {"PRECOMPUTE_AD_NUMERIC": "bid,quality", "PRECOMPUTE_AD_LOG_SCALED": ""},
        {"PRECOMPUTE_AD_NUMERIC": "", "PRECOMPUTE_AD_CATEGORICAL": "brand,region", "PRECOMPUTE_AD_LOG_SCALED": " "},
    ],
)
def test_services_and_the_definitions_read_one_feature_set_from_the_environment(env):
    assert ad_feature_spec_from_env is features.spec_from_env  # the old name, for code that imports it
    names = (features.ENV_AD_NUMERIC, features.ENV_AD_CATEGORICAL, features.ENV_AD_LOG_SCALED)
    assert set(AD_FEATURE_FIELDS.values()) == set(names)
    lake = LakeResource(**{field: env[variable] for field, variable in AD_FEATURE_FIELDS.items() if variable in env})
    assert features.spec_from_env(env) == lake.ad_feature_spec()


# --- priorities and concurrency (dagster.yaml) -------------------------------------------------------------


def test_the_queue_launches_warming_first_then_nightly_then_backfills_within_the_limits(dagster_pg_url):
    config = yaml.safe_load((ROOT / "dagster.yaml").read_text())
    launcher = {"module": MockedRunLauncher.__module__, "class": MockedRunLauncher.__name__}
    now = datetime.now(UTC)

    def campaign(campaign_id: str, revision: int = 1) -> Campaign:
        return Campaign(campaign_id, "acme", now, None, 1000.0, "active", revision, None, revision, now, 1)

    with (
        scratch_database(dagster_pg_url, "dagster") as url,
        dg.instance_for_test(
            overrides={
                "storage": {"postgres": {"postgres_url": url}},
                "run_coordinator": config["run_coordinator"],
                "concurrency": config["concurrency"],
                "run_launcher": launcher,
            }
        ) as instance,
    ):
        names = {}

        def enqueue(name: str, job: str, tags: dict) -> None:
            origin = RemoteJobOrigin(RemoteRepositoryOrigin(RegisteredCodeLocationOrigin("precompute"), "repo"), job)
            run = create_run_for_test(
                instance, job_name=job, status=dg.DagsterRunStatus.QUEUED, tags=tags, remote_job_origin=origin
            )
            names[run.run_id] = name

        backfill = {"dagster/backfill": "bf1", "dagster/priority": "-1"}  # as the README says to launch them
        for day in ("b16", "b17", "b18"):
            enqueue(day, "daily_precompute_job", backfill)
        enqueue("nightly", "daily_precompute_job", {})
        for name, request in (
            ("a-r1", warming.warming_request(campaign("a"))),
            ("a-r2", warming.warming_request(campaign("a", 2))),
            ("b-r1", warming.warming_request(campaign("b"))),
            ("c-r1", warming.warming_request(campaign("c"))),
        ):
            enqueue(name, campaign_warming_job.name, {**campaign_warming_job.tags, **request.tags})

        daemon = QueuedRunCoordinatorDaemon(interval_seconds=1)
        with WorkspaceProcessContext(instance, EmptyWorkspaceTarget()) as workspace:

            def iteration() -> list[str]:
                before = len(instance.run_launcher.queue())
                list(daemon.run_iteration(workspace))
                return [names[run.run_id] for run in instance.run_launcher.queue()[before:]]

            # 4 run slots: warming first (at most 2 at once, one per campaign), then nightly, then a backfill
            assert iteration() == ["a-r1", "b-r1", "nightly", "b16"]
            by_name = {name: run_id for run_id, name in names.items()}
            for name in ("a-r1", "b16"):
                instance.report_run_failed(instance.get_run_by_id(by_name[name]))  # two slots free up
            # a's next revision goes before the backfills; c waits for a warming slot (b-r1 and a-r2 run)
            assert iteration() == ["a-r2", "b17"]
            for name in ("b-r1", "nightly", "a-r2", "b17"):
                instance.report_run_failed(instance.get_run_by_id(by_name[name]))
            assert iteration() == ["c-r1", "b18"]


def test_an_app_db_setting_that_does_not_work_names_the_variable(app_db):
    """A wrong password, a missing database, a typo'd scheme or a read-only server failed the campaign sensor's every
    tick (and every documents step) with psycopg2's bare error, which named no setting."""
    from urllib.parse import quote

    base, database = app_db.rsplit("/", 1)
    read_only = f"{app_db}?options={quote('-c default_transaction_read_only=on')}"  # as a hot standby answers
    for url, reason in [
        (with_login(app_db, "nobody:pw-secret"), 'password authentication failed for user "nobody"'),
        (f"{base}/no_such_database", 'database "no_such_database" does not exist'),
        (app_db.replace("postgresql+psycopg2://", "postgress://"), "invalid dsn"),
        (read_only, "read-only transaction"),
    ]:
        for resource in (CampaignRegistryResource(url=url), DocumentStoreResource(url=url)):
            with pytest.raises(dg.Failure) as failure:
                resource.registry() if isinstance(resource, CampaignRegistryResource) else resource.store()
            description = failure.value.description
            assert description.startswith("PRECOMPUTE_APP_DB_URL (") and "refuses us" in description, description
            assert reason in description and "pw-secret" not in description
            assert not failure.value.allow_retries
    with pytest.raises(dg.Failure, match=r"PRECOMPUTE_APP_DB_URL \(.*\) does not answer") as failure:
        CampaignRegistryResource(url="postgresql://u:pw-secret@127.0.0.1:1/app").registry()
    assert failure.value.allow_retries and "pw-secret" not in failure.value.description


def test_removing_a_campaign_passes_over_an_ad_id_no_cache_key_can_hold(registry, app_db, redis_client, schema):
    """A campaign registered before ad ids with braces were refused (a braced GUID) was warmed without that ad
    (score_ads skips it), but its cleanup named the ad's live key, which serving.keys refuses: every cleanup run of the
    cancelled campaign raised, and its other values stayed until they expired."""
    from precompute_assets.storage.postgres import transaction

    now, campaign_id = datetime.now(UTC), unique("braced")
    registry.register(campaign_id, "acme", now + HOUR, campaign_ads(campaign_id, 2))
    with transaction(app_db) as conn, conn.cursor() as cur:  # what the registry accepted before
        cur.execute("UPDATE campaign_ads SET ad_id = '{' || ad_id || '}' WHERE campaign_id = %s AND position = 1",
                    (campaign_id,))  # fmt: skip
    kept = f"{campaign_id}-ad0000"
    assert sorted(registry.ads(campaign_id)["ad_id"]) == [kept, f"{{{campaign_id}-ad0001}}"]
    write_live_values(redis_client, "ctr", [(kept, 0.5)], expire_at=(now + HOUR).timestamp(), schema=schema)
    campaign = registry.cancel(campaign_id)
    assert warming.remove_campaign_values(registry, redis_client, schema, campaign, now) == 1
    assert not redis_client.exists(schema.live("ctr", kept))


def test_an_app_db_password_with_an_unencoded_at_or_slash_fails_the_step_without_showing_it(app_db):
    """libpq ends the user info at its first '@' or '/': the password's rest became the host or the port, and the
    step's failure showed it ('could not translate host name "tail@127.0.0.1"', 'invalid integer value "pw"')."""
    base, database = app_db.rsplit("/", 1)
    for password in ("pw@tail-secret", "pw/tail-secret"):
        url = with_login(app_db, f"postgres:{password}")
        with pytest.raises(dg.Failure) as failure:
            DocumentStoreResource(url=url).store()
        description = failure.value.description
        assert "percent-encoded (%40, %2F)" in description and "tail-secret" not in description, description
        assert "pw" not in description.replace("postgres:***", ""), description
