"""Campaign warming: before a registered campaign launches, every one of its ads gets its CTR, and the campaign
its budget split, in Redis. A sensor on the campaign registry requests the runs, ahead of nightly work in the
run queue; an every-2-hours schedule is the backstop for whatever the sensor missed.

Campaign values are live keys (``pc:1:ctr:live:{ad_id}``, ``pc:1:budget:live:{campaign_id}``) written in one
MULTI/EXEC with a TTL until the campaign ends: the campaign's own writes land all at once or not at all (a reader
never sees some of them without the others); that transaction holds Redis for as long as it runs, so a campaign has
at most ``max_ads`` ads (``CampaignRegistryResource``; the registry refuses more; warming refuses older campaigns
over it, and their cleanup deletes in batches of that many keys). Readers look in the
published nightly version first and fall back to live keys for the ads it lacks, so where the nightly version has
one of the campaign's ads, its value answers: a ``get_many`` over a campaign's ads can mix nightly values with the
campaign's live ones. A nightly publish (a new version and a pointer flip) leaves live keys in place. An open-ended
campaign's values expire ``open_ended_ttl_days`` after warming; the registry records when (``warm_until``) and lists
the campaign as due again a day before, for the backstop (and the sensor) to warm it again. Values Redis loses
before then (a restart without persistence, a flush, an eviction, a failover) are noticed by the sensor, which looks
for each warm campaign's budget split, and the CTR of every ad it splits over, on every tick, and warmed again. A
cancelled campaign's keys are removed by a run of ``campaign_cleanup_job``.
"""

import bisect
import json
import math
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import dagster as dg
import pandas as pd
import redis as redis_py
from pydantic import Field

from ..ml import ctr
from ..ml.budget import DEFAULT_DRAWS, DEFAULT_PRIOR_STRENGTH, thompson_split
from ..serving import KeySchema
from ..serving.connection import is_cluster
from ..serving.keys import check_key, codec_for
from ..serving.publish import (
    FENCED_ATTEMPTS,
    InvalidatedMeanwhile,
    delete_live_values,
    read_epoch,
    run_commands,
    send_commands,
    write_live_values,
)
from ..serving.replication import confirm_replicas
from ..storage.campaigns import DEFAULT_REFRESH_MARGIN, LATEST_TIME, Campaign, CampaignRegistry, SharedAd
from .config_checks import at_least, positive, refuse
from .models import CTR_MODEL, approved_materializations
from .publishing import rollback_hold
from .resources import (
    CampaignRegistryResource,
    LakeResource,
    ModelStoreResource,
    RedisResource,
    failing_clearly_when_full,
)
from .retention import retention_start
from .runs import ACTIVE_RUN_STATUSES, RERUN_IF_WORKER_DIES, RUN_KEY_TAG

CTR_KIND = "ctr"  # the kind a warming writes its ads' CTRs to, as live values (the ctr task type's kind too)

CAMPAIGNS = dg.DynamicPartitionsDefinition(name="campaigns")
LIVE_MEANWHILE = "Its transaction wrote none of it: readers compute its values live meanwhile."

# Run tags. dagster.yaml limits runs carrying WARMING_TAG, and runs of one campaign to one at a time (so its
# revisions and its cancellation apply in order); the queue launches higher dagster/priority first.
PRIORITY_TAG = "dagster/priority"
WARMING_TAG = "precompute/warming"
CAMPAIGN_TAG = "precompute/campaign"
WARMING_PRIORITY = 10  # nightly runs have the default 0, backfills -1
RESCORING_PRIORITY = 5  # a warm campaign scored again by a new model: behind every launch's warming, before the night
# dagster/max_retries: a warming or cleanup run whose worker died (or that never started) is re-executed by the
# daemon (dagster.yaml's run_retries; step failures are left to WARMING_RETRY): its run key is never requested again.
# dagster/max_runtime: with the default launcher, run monitoring ends a run whose worker and code server died (a worker
# alone is seen to end by its server, which fails the run at once) only at its max runtime;
# until then it holds its campaign's run slot and the backstop counts it as busy, so 30 min, not dagster.yaml's 6 h.
WARMING_TAGS = {
    PRIORITY_TAG: str(WARMING_PRIORITY),
    WARMING_TAG: "campaign",
    **RERUN_IF_WORKER_DIES,
    "dagster/max_runtime": "1800",
}

WARMING_RETRY = dg.RetryPolicy(max_retries=3, delay=1, backoff=dg.Backoff.EXPONENTIAL)  # 1 s, 2 s, 4 s
APPROVAL_PAGE = 1000  # records per read when searching every ctr_model materialization for the approved one
BEATS_BASELINE = dg.AssetCheckKey(dg.AssetKey(CTR_MODEL), "beats_baseline")
RUNNING = dg.DefaultSensorStatus.RUNNING


class CampaignWarmingConfig(dg.Config):
    grace_hours: float = Field(
        1.0, description="Hours the values outlive the campaign's end (late requests, clock skew; at least 0)."
    )
    open_ended_ttl_days: float = Field(
        30.0,
        description="Days a campaign without an end keeps its values after warming (above 1: the registry warms "
        "them again a day before they expire).",
    )


class CampaignBudgetConfig(CampaignWarmingConfig):
    prior_strength: float = Field(
        DEFAULT_PRIOR_STRENGTH,
        description="Pseudo-impressions behind each predicted CTR: weak spreads the budget to explore, strong "
        "concentrates it on the best predictions.",
    )
    draws: int = Field(DEFAULT_DRAWS, description="Thompson-sampling draws that split the budget.")
    seed: int = Field(
        0, description="Mixed with the campaign id and revision: the same revision always gets the same split."
    )


# --- what to warm ------------------------------------------------------------------------------------


def warming_run_key(campaign: Campaign) -> str:
    """One warming run per campaign revision: a changed campaign (new revision) is warmed again. Warming a warm
    revision again, before its values expire (an open-ended campaign), is one more run per expiry day."""
    key = f"{campaign.campaign_id}-r{campaign.revision}"
    if campaign.warm_revision == campaign.revision and campaign.warm_until is not None:
        key += f"-until{campaign.warm_until.astimezone(UTC):%Y%m%d}"
    return key


def warming_request(campaign: Campaign, *, run_key: str | None = None) -> dg.RunRequest:
    """The run that warms ``campaign``'s current revision (the sensor's and the backstop's alike), under
    ``warming_run_key`` unless ``run_key`` is given."""
    return dg.RunRequest(
        run_key=run_key or warming_run_key(campaign),
        job_name="campaign_warming_job",
        partition_key=campaign.campaign_id,
        tags={**WARMING_TAGS, CAMPAIGN_TAG: campaign.campaign_id},
    )


def rescoring_key(campaign: Campaign, model: str, now: datetime) -> str:
    """``rescoring_request``'s run key: one per model and hour of ``now``, so a run that failed gets another within
    the hour after, not one every tick."""
    return f"{warming_run_key(campaign)}-model{model}-h{int(now.timestamp()) // 3600}"


def rescoring_request(campaign: Campaign, model: str, now: datetime) -> dg.RunRequest:
    """The run that scores a warm campaign again with the newly approved ctr_model ``model``, at
    ``RESCORING_PRIORITY``: a new model each night asks one per warm campaign, and none may hold back the warming of
    a campaign about to launch (the queue launches higher priorities first; two warming runs go at once)."""
    request = warming_request(campaign, run_key=rescoring_key(campaign, model, now))
    return request.with_replaced_attrs(tags={**request.tags, PRIORITY_TAG: str(RESCORING_PRIORITY)})


def rewarming_request(campaign: Campaign, now: datetime) -> dg.RunRequest:
    """The run that warms ``campaign`` again after Redis lost its values: a run key of its own for each hour of ``now``
    (a sensor never launches a run key twice), so a loss that comes back, or a run that failed, gets another run
    within the hour after, not one every tick."""
    hour = int(now.timestamp()) // 3600
    return warming_request(campaign, run_key=f"{warming_run_key(campaign)}-lost{hour}")


def ended_when_registered(campaign: Campaign) -> bool:
    """Whether ``campaign``'s revision was registered with an end that had passed: its last warming's values would
    live until its old end (a new revision forgets that it was warmed). One that ended since keeps none past its end
    and grace, and the first tick of a new instance, which reads every change, requests nothing for it."""
    return campaign.status == "active" and campaign.end_at is not None and campaign.end_at <= campaign.updated_at


def postponed(campaign: Campaign, now: datetime, horizon: timedelta) -> bool:
    """Whether ``campaign`` is cold and launches beyond the warming ``horizon``: when a change (a later launch) made it
    so, its last revision's values, a budget split over ads it may no longer have among them, would be served until
    they expire, though the change made it cold."""
    return campaign.status == "active" and not campaign.is_warm and campaign.launch_at > now + horizon


def still_cached(
    context: dg.SensorEvaluationContext, redis: RedisResource, campaigns: list[Campaign]
) -> list[Campaign]:
    """Those of ``campaigns`` whose budget split (written last by a warming) is in Redis, one pipelined ``EXISTS``
    each; all of them when Redis does not answer (a cleanup of nothing is harmless)."""
    if not campaigns:
        return []

    def held(client: redis_py.Redis, schema: KeySchema) -> list[Campaign]:
        pipe = client.pipeline(transaction=False)
        for campaign in campaigns:
            pipe.exists(budget_key(schema, campaign))
        return [c for c, found in zip(campaigns, pipe.execute(), strict=True) if found]

    found = redis.sensor_check(held, context.log, f"whether {len(campaigns)} postponed campaigns hold values")
    return campaigns if found is None else found


def cleanup_request(campaign: Campaign) -> dg.RunRequest:
    """The run that removes a cancelled campaign's values from the cache, or those of one re-registered with an end
    that has passed (its last warming's values would live until its old end), or postponed beyond the horizon."""
    return dg.RunRequest(
        run_key=f"{warming_run_key(campaign)}-cancel",
        job_name="campaign_cleanup_job",
        run_config={"ops": {"remove_campaign": {"config": {"campaign_id": campaign.campaign_id}}}},
        tags={**WARMING_TAGS, CAMPAIGN_TAG: campaign.campaign_id},
    )


def expiry(campaign: Campaign, now: datetime, config: CampaignWarmingConfig) -> int:
    """Unix time at which the campaign's values expire: its end plus the grace, or the open-ended TTL (the
    registry lists such a campaign as due again before then)."""
    if campaign.end_at is not None:  # at most LATEST_TIME: a registry written before it was a limit may hold year 9999
        return int(min(campaign.end_at, LATEST_TIME).timestamp() + config.grace_hours * 3600)
    return int((now + timedelta(days=config.open_ended_ttl_days)).timestamp())


MAX_GRACE_HOURS = 8760  # a year: more made the expiry a datetime past year 9999 (an OverflowError traceback)
MAX_OPEN_ENDED_TTL_DAYS = 3650


def warming_config_problem(config: CampaignWarmingConfig) -> str | None:
    """Why ``config`` cannot warm, or None. Redis deletes a value whose expiry has passed as it lands: values that
    expire before the campaign's end, or at once, were written, gone, and the campaign reported warm."""
    if not (math.isfinite(config.grace_hours) and 0 <= config.grace_hours <= MAX_GRACE_HOURS):
        return f"grace_hours must be from 0 to {MAX_GRACE_HOURS} (a year), got {config.grace_hours}"
    # The registry lists a warm campaign as due again DEFAULT_REFRESH_MARGIN before its values expire: values that
    # live no longer than that are due as soon as they are written, so the sensor, which requests a campaign when it
    # becomes due, never warms it again, and only the backstop's passes every 2 hours keep it (or not) in the cache.
    margin_days = DEFAULT_REFRESH_MARGIN / timedelta(days=1)
    if not (math.isfinite(config.open_ended_ttl_days) and config.open_ended_ttl_days > margin_days):
        return (
            f"open_ended_ttl_days must be above {margin_days:g} (the registry warms values again {margin_days:g} day "
            f"before they expire), got {config.open_ended_ttl_days}"
        )
    if config.open_ended_ttl_days > MAX_OPEN_ENDED_TTL_DAYS:  # beyond, a datetime overflowed with a traceback
        days = config.open_ended_ttl_days
        return f"open_ended_ttl_days must be at most {MAX_OPEN_ENDED_TTL_DAYS} (ten years), got {days}"
    return None


def not_warmable(campaign: Campaign, now: datetime, horizon: timedelta | None = None) -> str | None:
    """Why ``campaign`` must not be warmed now (cancelled, ended, or, with ``horizon``, launching beyond it: a run
    queued before a postponement warmed the new revision a day early), or None."""
    if campaign.status != "active":
        return f"campaign {campaign.campaign_id} is {campaign.status}"
    if campaign.end_at is not None and campaign.end_at <= now:
        return f"campaign {campaign.campaign_id} ended at {campaign.end_at.isoformat()}"
    if horizon is not None and campaign.launch_at > now + horizon:
        return (f"campaign {campaign.campaign_id} launches at {campaign.launch_at.isoformat()}, beyond the warming "
                "horizon: it is warmed when its launch enters it")  # fmt: skip
    return None


def changed_meanwhile(campaign: Campaign) -> str:
    """Why a warming of ``campaign`` writes nothing: it was registered again (or cancelled) while it was warmed."""
    return f"campaign {campaign.campaign_id} changed while it was warmed (r{campaign.revision})"


def current_campaign(registry: CampaignRegistry, campaign_id: str) -> tuple[Campaign, pd.DataFrame]:
    """The campaign and the ads of one revision (read again if a re-registration lands in between)."""
    for _ in range(3):
        campaign = registry.get(campaign_id)
        if campaign is None:
            raise dg.Failure(description=f"campaign {campaign_id!r} is not registered", allow_retries=False)
        ads = registry.ads(campaign_id)
        again = registry.get(campaign_id)
        if again is not None and again.revision == campaign.revision:
            return campaign, ads
    raise dg.Failure(description=f"campaign {campaign_id!r} kept changing while its ads were read")


def approved_model_version(instance: dg.DagsterInstance) -> str:
    """The current approved ``ctr_model`` version: among materializations whose blocking check ``beats_baseline``
    passed, the one of the newest day (the newest run of that day); a backfill of an older day never wins. While an
    operator's rollback holds a day back (``rolled_back_over``), models of days after the one it published
    (``rolled_back_to``; for a hold recorded without it, of the held day and later) are not: the operator backed out of
    them all, the days between of a rollback over several days included.

    Reads every materialization and every passed check, page by page: however many backfilled days or retries
    came after the newest approved model, it is found."""
    records = approved_materializations(instance, BEATS_BASELINE, page=APPROVAL_PAGE)
    held, held_to = rollback_hold(instance)
    approved = [
        ((partition, storage_id), metadata["model_version"].value)
        for partition, storage_id, _, metadata in records
        if "model_version" in metadata and (metadata.get("approved") is None or metadata["approved"].value)
        and (held is None or (partition <= held_to if held_to else partition < held))
    ]  # fmt: skip
    if not approved:
        raise dg.Failure(
            description="no approved ctr_model: campaigns are scored only by a model that passed beats_baseline; "
            "materialize ctr_model (daily_precompute_job) first"
            + (
                f" (models of {f'days after {held_to}' if held_to else f'{held} and later'} are not used while a "
                f"rollback holds {held} back)"
                if held
                else ""
            ),
            allow_retries=False,
        )
    return max(approved)[1]


def remove_campaign_values(
    registry: CampaignRegistry, client: redis_py.Redis, schema: KeySchema, campaign: Campaign, now: datetime
) -> int:
    """Delete a campaign's budget and the CTRs of its ads (those of its revisions before too, which a
    re-registration dropped: ``dropped_ads``) that no other live campaign of its tenant still holds warm, in one
    transaction, or in transactions of ``registry.max_ads`` keys for a campaign with more ads than that (registered
    before the cap, or under a higher one); an ad another campaign still holds gets that campaign's expiry back (this
    one's may have been later). Returns how many keys existed."""
    ads = set(registry.ads(campaign.campaign_id)["ad_id"]) | set(registry.dropped_ads(campaign.campaign_id))
    deleted = remove_ads(registry, client, schema, campaign, ads, now, [("budget", campaign.campaign_id)])
    registry.forget_written(campaign.campaign_id)
    return deleted


def remove_ads(
    registry: CampaignRegistry,
    client: redis_py.Redis,
    schema: KeySchema,
    campaign: Campaign,
    ads: set[str],
    now: datetime,
    also: Sequence[tuple[str, str]] = (),
) -> int:
    """Delete the CTRs of ``ads`` of ``campaign`` that are its values (``campaigns_value``), and the live values
    ``also``, in transactions of ``registry.max_ads`` keys at most; an ad another warm campaign holds gets that
    campaign's expiry back. Returns how many keys existed."""
    shared = registry.shared_ads(campaign, ads, now)
    gone = {ad for ad in ads if campaigns_value(shared.get(ad))}
    # an ad registered before ids with braces were refused was never warmed (score_ads skips it): it has no key
    keys = [(CTR_KIND, ad_id) for ad_id in sorted(gone) if _is_cache_key(ad_id)] + list(also)
    # One transaction of all of them would hold Redis as long as the warming the cap refuses; a cleanup cut off
    # between batches is run again by its retries or the backstop, and deleting a deleted key is harmless.
    batch = max(1, len(keys) if len(ads) <= registry.max_ads else registry.max_ads)
    deleted = sum(delete_live_values(client, keys[i : i + batch], schema=schema) for i in range(0, len(keys), batch))
    # A shared ad kept its latest expiry, maybe this campaign's (30 days for an open-ended one): the others' now
    send_commands(client, [
        (b"EXPIREAT", schema.live(CTR_KIND, ad).encode(), str(int(shared[ad].until.timestamp())).encode())
        for ad in sorted(ads - gone) if shared[ad].until is not None and not shared[ad].unknown and _is_cache_key(ad)
    ])  # fmt: skip
    return deleted


def campaigns_value(other: SharedAd | None) -> bool:
    """Whether the live value of an ad of a campaign is that campaign's, given what the tenant's other live campaigns
    hold of it (``shared_ads``): none holds it, one gives it other features (its deletion has that campaign warmed
    again, ``lost_campaigns``, with its own), or none of those holding it is warm (nothing of theirs was written)."""
    return other is None or not other.same_features or (other.until is None and not other.unknown)


def exact_expiries(
    registry: CampaignRegistry, campaign: Campaign, ads: set[str], now: datetime, expire_at: int
) -> dict[str, int]:
    """When each of ``ads`` (the campaign's) expires, written whatever its expiry was (``write_live_values``' exact):
    ``expire_at`` for an ad no other live campaign of its tenant has, else the later of it and the other campaigns'
    warm values' expiry. An ad another campaign holds warm without a recorded expiry is left out (its expiry is only
    ever extended). Before, a shared ad's expiry was only ever extended: an end moved earlier kept the old one."""
    shared = registry.shared_ads(campaign, ads, now)
    out = {}
    for ad in ads:
        other = shared.get(ad)
        if other is None or (other.until is None and not other.unknown):
            out[ad] = expire_at
        elif not other.unknown:
            out[ad] = max(expire_at, int(other.until.timestamp()))
    return out


def _is_cache_key(key: str) -> bool:
    """Whether ``key`` can name a value in the serving cache (``serving.keys.check_key``)."""
    try:
        check_key(key)
    except ValueError:
        return False
    return True


# --- assets --------------------------------------------------------------------------------------------


@dg.asset(
    partitions_def=CAMPAIGNS,
    kinds={"redis", "sklearn"},
    group_name="campaigns",
    retry_policy=WARMING_RETRY,
    description="CTR of every ad of one campaign from the current approved ctr_model, written to Redis as live keys "
    "in one transaction (all of them land or none) that expire when the campaign ends (plus a grace). Readers "
    "look in the published nightly version first: where it has one of these ads, its value answers.",
)
def campaign_ctr(
    context: dg.AssetExecutionContext,
    config: CampaignWarmingConfig,
    campaign_registry: CampaignRegistryResource,
    model_store: ModelStoreResource,
    lake: LakeResource,
    redis: RedisResource,
) -> dg.Output[pd.DataFrame]:
    if problem := warming_config_problem(config):
        raise dg.Failure(description=problem, allow_retries=False)
    started = time.perf_counter()
    registry = campaign_registry.registry(spec=lake.ad_feature_spec())  # the ads' columns the model reads
    campaign, ads = current_campaign(registry, context.partition_key)
    now = datetime.now(UTC)
    frame = pd.DataFrame({"ad_id": pd.Series(dtype=object), "ctr": pd.Series(dtype=float)})
    horizon = campaign_registry.warming_horizon
    reason = not_warmable(campaign, now, horizon)
    version, skipped, expire_at = "", [], expiry(campaign, now, config)
    if reason is None and len(ads) > registry.max_ads:  # registered before the cap: its transaction would stall Redis
        raise dg.Failure(
            description=f"campaign {campaign.campaign_id} has {len(ads)} ads, more than the {registry.max_ads} a "
            "campaign may have: re-register it split into campaigns, or raise the cap (PRECOMPUTE_CAMPAIGN_MAX_ADS, "
            "the campaign_registry resource's max_ads)",
            allow_retries=False,
        )
    if reason is None:
        client, schema = redis.client(), redis.schema()
        revision = campaign.revision
        # The CTRs of ads a re-registration dropped, which readers got beside the new revision's: deleted first, in
        # transactions of the cap's keys (before the epoch the writes are fenced with is read: they bump it)
        if dropped := registry.dropped_ads(campaign.campaign_id):
            remove_ads(registry, client, schema, campaign, set(dropped), now)
            registry.forget_written(campaign.campaign_id, dropped)
        # Fenced as get_or_compute's stores are: CTRs scored before an invalidation of ctr are not written after it.
        # The epoch also moves when another campaign's cleanup deletes its values: then every input is read again
        # (the campaign, its ads, the approved model), as a retry of the run would, and scored again, a few times.
        for attempt in range(1, FENCED_ATTEMPTS + 1):
            epoch = read_epoch(client, schema, CTR_KIND)
            if attempt > 1:
                campaign, ads = current_campaign(registry, context.partition_key)
                if (reason := not_warmable(campaign, now, horizon)) is None and campaign.revision != revision:
                    reason = changed_meanwhile(campaign)
                if reason is not None:
                    frame = frame.iloc[:0]
                    break
                expire_at = expiry(campaign, now, config)
            version = approved_model_version(context.instance)
            model = model_store.load(CTR_MODEL, version)
            # A changed campaign's budget split is its last revision's, over ads it may no longer have: it goes with
            # the new CTRs, so readers never get one with the other (campaign_budget writes the new split next). On
            # Redis Cluster, per slot (see transact_per_slot): readers may get both for the length of the write.
            stale = [] if campaign.warm_revision == campaign.revision else [(b"DEL", budget_key(schema, campaign))]
            frame, skipped = ctr.score_ads(model, ads, ads["ad_id"].tolist())
            if frame.empty:
                raise dg.Failure(
                    description=f"none of the {len(ads)} ads of {campaign.campaign_id} could be scored",
                    allow_retries=False,
                )
            # What it writes is recorded first, with the features scored (a re-registration since would otherwise
            # lose track of values this run writes); a campaign at another revision now is not written to at all
            if not registry.record_written(campaign.campaign_id, campaign.revision):
                reason = changed_meanwhile(campaign)
                frame = frame.iloc[:0]
                break
            items = zip(frame["ad_id"].tolist(), frame["ctr"].tolist(), strict=True)
            # A revision whose end moved earlier: its ads' values expire at the new end, or at another live campaign's
            exact = exact_expiries(registry, campaign, set(frame["ad_id"]), now, expire_at)
            with failing_clearly_when_full(client, f"campaign {campaign.campaign_id} not warmed", LIVE_MEANWHILE):
                try:
                    write_live_values(
                        client, CTR_KIND, items, expire_at=expire_at, schema=schema, also=stale, exact=exact,
                        epoch=epoch,
                    )  # fmt: skip
                    break
                except InvalidatedMeanwhile:
                    context.log.warning(f"ctr was invalidated while the ads of {campaign.campaign_id} were scored "
                                        f"(attempt {attempt} of {FENCED_ATTEMPTS}): nothing written")  # fmt: skip
        else:
            raise dg.Failure(  # retried by the policy
                description=f"campaign {campaign.campaign_id} not warmed: ctr was invalidated while its ads were "
                f"scored, {FENCED_ATTEMPTS} times; a retry scores them again"
            )
        if skipped:
            context.log.warning(f"{len(skipped)} ads could not be scored (readers compute them live): {skipped[:5]}")
        latest = registry.get(campaign.campaign_id) if reason is None else None  # something was written
        if reason is None and (latest is None or latest.status != "active"):
            # cancelled while we scored: its cleanup run may have come first, so take our writes back here
            remove_campaign_values(registry, client, schema, campaign, now)
            reason, frame = f"campaign {campaign.campaign_id} was cancelled while it was warmed", frame.iloc[:0]
    if reason is not None:
        context.log.warning(f"nothing warmed: {reason}")
    minutes = (campaign.launch_at - now).total_seconds() / 60
    context.log.info(f"warmed {len(frame)} ads of {campaign.campaign_id} r{campaign.revision}, {minutes:.0f} min early")
    return dg.Output(
        frame.assign(model_version=version, revision=campaign.revision, expire_at=expire_at),
        metadata={
            "dagster/row_count": len(frame),
            "ads_warmed": len(frame),
            "ads_skipped": len(skipped),
            "seconds": time.perf_counter() - started,
            "minutes_before_launch": minutes,
            # a campaign not warmed has no model version, a warmed one no reason: left out, not shown as blank values
            **({"model_version": version} if version else {}),
            "revision": campaign.revision,
            "expire_at": dg.MetadataValue.timestamp(float(expire_at)),  # the UI shows a date, not Unix seconds
            "published": reason is None,
            **({"reason": reason} if reason else {}),
        },
    )


@dg.asset(
    partitions_def=CAMPAIGNS,
    kinds={"redis", "numpy"},
    group_name="campaigns",
    retry_policy=WARMING_RETRY,
    description="The campaign's budget split across its ads by Thompson sampling over Beta posteriors seeded from "
    "their predicted CTRs, readable as cache.get('budget', campaign_id); then the campaign revision is marked warm.",
)
def campaign_budget(
    context: dg.AssetExecutionContext,
    config: CampaignBudgetConfig,
    campaign_ctr: pd.DataFrame,
    campaign_registry: CampaignRegistryResource,
    redis: RedisResource,
) -> dg.MaterializeResult:
    if problem := warming_config_problem(config):
        raise dg.Failure(description=problem, allow_retries=False)
    refuse("campaign_budget", positive(config, "prior_strength"), at_least(config, 1, "draws"))
    registry = campaign_registry.registry()
    campaign_id = context.partition_key
    campaign, now = registry.get(campaign_id), datetime.now(UTC)
    revision = int(campaign_ctr["revision"].iloc[0]) if len(campaign_ctr) else None
    if campaign is None or campaign_ctr.empty or campaign.revision != revision or not_warmable(campaign, now):
        # the newer revision's run (or the cleanup of a cancelled campaign) has this campaign now
        context.log.warning(f"no budget published for {campaign_id}: nothing warmed for its current revision")
        return dg.MaterializeResult(metadata={"published": False, "warm": False, "ads": 0})
    seed = [config.seed, zlib.crc32(campaign_id.encode()), campaign.revision]
    amounts = thompson_split(
        campaign_ctr["ctr"].to_numpy(), campaign.budget, prior_strength=config.prior_strength, draws=config.draws,
        seed=seed,
    )  # fmt: skip
    split = dict(zip(campaign_ctr["ad_id"].tolist(), amounts.tolist(), strict=True))
    client, schema = redis.client(), redis.schema()
    # the budget expires with the CTRs (older campaign_ctr outputs lack the column: then from now)
    expire_at = int(campaign_ctr["expire_at"].iloc[0]) if "expire_at" in campaign_ctr else expiry(campaign, now, config)
    with failing_clearly_when_full(client, f"no budget split of campaign {campaign_id} written", LIVE_MEANWHILE):
        write_live_values(client, "budget", [(campaign_id, split)], expire_at=expire_at, schema=schema)
    # Warm means everything a launch needs is in the cache, so the revision is marked at the end of the run, with
    # when its values expire: the registry lists it as due again before then, if it is still running. In the cache
    # means on Redis's replicas too: a failover must not lose what the registry calls warm (a timeout is retried).
    confirm_replicas(client, redis.replica_wait_s)
    warm_until = datetime.fromtimestamp(expire_at, UTC)
    # the model the CTRs were scored with: a newer approved model has the sensor score them again
    model = str(campaign_ctr["model_version"].iloc[0]) if "model_version" in campaign_ctr else None
    warm = registry.mark_warm(campaign_id, campaign.revision, warm_until=warm_until, model=model or None)
    latest = registry.get(campaign_id)
    if latest is None or latest.status != "active":
        remove_campaign_values(registry, client, schema, campaign, now)  # cancelled meanwhile, see campaign_ctr
        warm = False
    context.log.info(
        f"budget {campaign.budget:,.2f} of {campaign_id} split across {len(split)} ads; warm: {warm}"
        f" until {warm_until.isoformat()}"
    )
    return dg.MaterializeResult(
        metadata={
            "published": True,
            "warm": warm,
            "ads": len(split),
            "budget": campaign.budget,
            "max_share": float(amounts.max() / campaign.budget),
            "ads_funded": int((amounts > 0).sum()),
            "prior_strength": config.prior_strength,
            "revision": campaign.revision,
            "warm_until": dg.MetadataValue.timestamp(warm_until),
        }
    )


campaign_warming_job = dg.define_asset_job(
    "campaign_warming_job",
    selection=dg.AssetSelection.assets(campaign_ctr, campaign_budget),
    tags=WARMING_TAGS,
    description="Warm one campaign (partition): CTR of its ads, then its budget split; ahead of nightly runs.",
)


# --- cancellation --------------------------------------------------------------------------------------


class CampaignCleanupConfig(dg.Config):
    campaign_id: str = Field(description="The cancelled (or ended) campaign whose CTRs and budget are removed.")


@dg.op(
    retry_policy=WARMING_RETRY,
    description="Remove the CTRs and budget of a campaign that was cancelled, ended, or postponed beyond the warming "
    "horizon from the cache.",
)
def remove_campaign(
    context: dg.OpExecutionContext,
    config: CampaignCleanupConfig,
    campaign_registry: CampaignRegistryResource,
    redis: RedisResource,
) -> None:
    # Returns nothing on purpose: an output would go to the Definitions' IO manager (the Parquet lake, which
    # stores asset partitions only); what was removed is an observation of the campaign_ctr partition instead.
    registry = campaign_registry.registry()
    campaign = registry.get(config.campaign_id)
    if campaign is None:
        raise dg.Failure(description=f"campaign {config.campaign_id!r} is not registered", allow_retries=False)
    now = datetime.now(UTC)
    reason = not_warmable(campaign, now)
    if reason is None and postponed(campaign, now, campaign_registry.warming_horizon):
        reason = f"campaign {campaign.campaign_id} r{campaign.revision} launches at {campaign.launch_at.isoformat()}"
        reason += ", beyond the warming horizon: warmed again before then"
    if reason is None:
        context.log.info(f"{campaign.campaign_id} was registered again since, and runs: its values stay")
        return
    removed = remove_campaign_values(registry, redis.client(), redis.schema(), campaign, now)
    context.log.info(f"removed {removed} keys: {reason}")
    context.log_event(
        dg.AssetObservation(
            asset_key=campaign_ctr.key,
            partition=campaign.campaign_id,
            metadata={
                "cancelled": campaign.status == "cancelled",
                "keys_removed": removed,
                "revision": campaign.revision,
            },
        )
    )


@dg.job(tags=WARMING_TAGS, description="Remove a cancelled or ended campaign's values from the cache.")
def campaign_cleanup_job():
    remove_campaign()


class CampaignRetentionConfig(dg.Config):
    retention_days: int = Field(
        30, description="The ads of campaigns ended or cancelled more than these days ago are deleted; 0 keeps them."
    )


@dg.op(
    description="Delete the registered ads and the campaigns partitions of campaigns that ended or were cancelled "
    "past their retention."
)
def purge_campaign_ads(
    context: dg.OpExecutionContext, config: CampaignRetentionConfig, campaign_registry: CampaignRegistryResource
) -> None:
    before = retention_start(context.log.info, config.retention_days, "campaign", "every campaign's ads are kept")
    if before is None:
        return
    purged = campaign_registry.registry().purge_ads(before)
    # Every sensor tick that warms reads the whole partition list: it must not grow with every campaign ever run.
    # The sensor adds a partition again for a campaign registered anew.
    known = set(context.instance.get_dynamic_partitions(CAMPAIGNS.name)) if purged else set()
    for campaign_id in (c for c in purged if c in known):
        context.instance.delete_dynamic_partition(CAMPAIGNS.name, campaign_id)
    context.log.info(
        f"deleted the ads and partitions of {len(purged)} campaigns ended or cancelled before {before:%Y-%m-%d}"
    )


def budget_key(schema: KeySchema, campaign: Campaign) -> bytes:
    return schema.live("budget", campaign.campaign_id).encode()


CHECK_CHUNK = 10_000  # commands per pipelined write of values_lost: a tick over many ads is several round trips


def _run_chunked(client: redis_py.Redis, commands: list[tuple[bytes, ...]]) -> list:
    return [
        reply
        for i in range(0, len(commands), CHECK_CHUNK)
        for reply in run_commands(client, commands[i : i + CHECK_CHUNK])
    ]


def values_lost(client: redis_py.Redis, schema: KeySchema, campaigns: list[Campaign]) -> list[Campaign]:
    """The ``campaigns`` (warm ones) whose values Redis no longer holds whole: their budget split, which warming writes
    after the CTRs, expiring with them, and the registry calls a campaign warm only after it; or the CTR of an ad the
    split is over (an eviction takes keys one at a time: every live key has a TTL, and the embedded Redis evicts
    ``volatile-lru``). Either is missing when Redis lost them: a restart without persistence, a flush, an eviction,
    a failover to a replica that lagged. A pipelined ``GET`` per campaign, then an ``EXISTS`` of its ads' keys (on
    Redis Cluster, one per distinct ad, per master), in writes of ``CHECK_CHUNK`` commands: 0.37-0.47 s for
    10,000 campaigns of 20 ads on one server (1.6 s with an EXISTS per ad), within the sensor's 2 s Redis check."""
    if not campaigns:
        return []
    codec, lost, splits = codec_for("budget"), set(), {}
    for campaign, raw in zip(campaigns, _run_chunked(client, [(b"GET", budget_key(schema, c)) for c in campaigns]),
                             strict=True):  # fmt: skip
        try:
            splits[campaign.campaign_id] = [schema.live(CTR_KIND, str(ad_id)).encode() for ad_id in codec.decode(raw)]
        except Exception:  # none (None raises), or not a split (written by something else): warmed again
            lost.add(campaign.campaign_id)
    if is_cluster(client):  # an EXISTS per ad: a campaign's keys are in many slots
        keys = list({key: None for ctr_keys in splits.values() for key in ctr_keys})  # an ad of several: once
        missing = {key for key, here in zip(keys, _run_chunked(client, [(b"EXISTS", k) for k in keys]), strict=True)
                   if not here}  # fmt: skip
        lost.update(campaign_id for campaign_id, ctr_keys in splits.items() if missing.intersection(ctr_keys))
    else:  # one EXISTS of all a campaign's keys, which counts those there: 6x faster than one per key
        ids = [campaign_id for campaign_id, ctr_keys in splits.items() if ctr_keys]
        counts = _run_chunked(client, [(b"EXISTS", *splits[campaign_id]) for campaign_id in ids])
        lost.update(campaign_id for campaign_id, n in zip(ids, counts, strict=True) if n < len(splits[campaign_id]))
    return [campaign for campaign in campaigns if campaign.campaign_id in lost]


def lost_campaigns(
    context: dg.SensorEvaluationContext,
    warm: list[Campaign],
    redis: RedisResource,
    *,
    limit: int,
    after: str | None = None,
) -> tuple[list[Campaign], str | None]:
    """The warm campaigns whose values Redis lost (``values_lost``) and that no warming run queued or running will
    write again, by launch time; none, with a warning, when Redis does not answer (the next tick looks again).

    At most ``limit`` warm campaigns are checked a tick, in turns: those after campaign ``after`` (by id), from the
    first again past the last. Also returns the last one checked, where the next tick goes on (None: all were)."""
    if not warm:
        return [], None
    checked, last = _in_turn(warm, limit, after)
    what = f"whether Redis still holds the values of {len(checked)} of {len(warm)} warm campaigns"
    lost = redis.sensor_check(lambda client, schema: values_lost(client, schema, checked), context.log, what)
    if lost is None:
        return [], after  # not checked: the same turn again
    if not lost:
        return [], last
    ids = [c.campaign_id for c in lost]
    active = context.instance.get_runs(
        dg.RunsFilter(job_name=campaign_warming_job.name, statuses=ACTIVE_RUN_STATUSES, tags={CAMPAIGN_TAG: ids})
    )
    busy = {run.tags.get(CAMPAIGN_TAG) for run in active}
    return [c for c in lost if c.campaign_id not in busy], last


def scored_by_older_model(
    context: dg.SensorEvaluationContext, warm: list[Campaign], now: datetime, *, skip: set[str], limit: int
) -> tuple[list[Campaign], str | None]:
    """The warm campaigns whose CTRs another ctr_model than the approved one scored (or one not recorded: warmed
    before the registry recorded it), at most ``limit``, launched earliest first, without those in ``skip`` or with
    a warming run queued or running (that run scores them with the approved model); and the approved version (None
    when no model is approved: nothing to score again with)."""
    warm = [c for c in warm if c.campaign_id not in skip]
    if not warm:  # nothing to score again: the approved model (every materialization read) is not looked up
        return [], None
    try:
        model = approved_model_version(context.instance)
    except dg.Failure:
        return [], None
    older = [c for c in warm if c.warm_model != model][: limit * 10]
    if not older:
        return [], model
    active = context.instance.get_runs(
        dg.RunsFilter(job_name=campaign_warming_job.name, statuses=ACTIVE_RUN_STATUSES,
                      tags={CAMPAIGN_TAG: [c.campaign_id for c in older]})
    )  # fmt: skip
    busy = {run.tags.get(CAMPAIGN_TAG) for run in active}
    # a run of this hour's key that failed: asked again next hour; meanwhile it takes no room from the others
    keys = [rescoring_key(c, model, now) for c in older]
    asked = {run.tags.get(RUN_KEY_TAG) for run in context.instance.get_runs(dg.RunsFilter(tags={RUN_KEY_TAG: keys}))}
    due = [c for c, key in zip(older, keys, strict=True) if c.campaign_id not in busy and key not in asked]
    return due[:limit], model


def _in_turn(warm: list[Campaign], limit: int, after: str | None) -> tuple[list[Campaign], str | None]:
    """The ``limit`` campaigns of ``warm`` after id ``after`` (wrapping round), in ``warm``'s order, and the last
    of them by id; all of them, and None, when there are no more than ``limit``."""
    if len(warm) <= limit:
        return warm, None
    by_id = sorted(warm, key=lambda c: c.campaign_id)
    start = bisect.bisect_right([c.campaign_id for c in by_id], after) if after is not None else 0
    turn = (by_id[start:] + by_id[:start])[:limit]
    chosen = {c.campaign_id for c in turn}
    return [c for c in warm if c.campaign_id in chosen], turn[-1].campaign_id


# --- automation ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchCursor:
    """What the sensor has seen: every registry change up to ``seq``, due campaigns launching by ``until``, and
    warm campaigns whose values were due to be refreshed by ``at`` (the time of its last tick)."""

    seq: int = 0
    until: datetime | None = None
    at: datetime | None = None
    checked: str | None = None  # the last warm campaign whose values were checked, when not all are each tick

    @classmethod
    def decode(cls, raw: str | None) -> "LaunchCursor":
        if not raw:
            return cls()
        data = json.loads(raw)
        times = [datetime.fromisoformat(data[k]) if data.get(k) else None for k in ("until", "at")]
        checked = data.get("checked")
        return cls(int(data["seq"]), *times, checked if isinstance(checked, str) else None)

    def encode(self) -> str:
        times = {k: v.isoformat() if v else None for k, v in (("until", self.until), ("at", self.at))}
        return json.dumps({"seq": self.seq, **times} | ({"checked": self.checked} if self.checked is not None else {}))


def changes_since(registry: CampaignRegistry, seq: int, *, page: int = 10_000, pages: int = 10) -> list[Campaign]:
    """Campaigns changed after ``seq``, ascending, at most ``pages`` pages (the next tick reads on)."""
    changed: list[Campaign] = []
    for _ in range(pages):
        batch = registry.changed_since(changed[-1].change_seq if changed else seq, limit=page)
        changed += batch
        if len(batch) < page:
            break
    return changed


@dg.sensor(
    jobs=[campaign_warming_job, campaign_cleanup_job],
    minimum_interval_seconds=30,
    default_status=RUNNING,
    description="Warm campaigns launching within the warming horizon whose current revision is not warm (one run "
    "per campaign revision, high priority), warm open-ended campaigns again before their values expire, warm again "
    "at once warm campaigns whose values Redis lost (at most once an hour each), score warm campaigns again when a "
    "new ctr_model is approved, and remove cancelled campaigns from the cache.",
)
def campaign_launch_sensor(
    context: dg.SensorEvaluationContext, campaign_registry: CampaignRegistryResource, redis: RedisResource
):
    """Reads the registry's changes since the cursor (cancellations, re-registrations) and the due campaigns (one
    indexed query); requests only campaigns that became due since the last tick. A run that failed is the
    backstop's: a sensor never launches the same run key twice. Warm campaigns whose values Redis lost (one more
    indexed query, a pipelined GET of each one's budget split and an EXISTS per ad) are warmed again at once, not a
    day before their values expire."""
    registry, cursor = campaign_registry.registry(), LaunchCursor.decode(context.cursor)
    now = datetime.now(UTC)
    horizon = campaign_registry.warming_horizon
    changed = changes_since(registry, cursor.seq)
    due = registry.due(now, horizon)

    def became_due(c: Campaign) -> bool:
        if c.warm_revision == c.revision and c.warm_until is not None:  # warm, its values expire soon
            return cursor.at is None or c.warm_until - registry.refresh_margin > cursor.at
        # cold: changed (a new revision), or its launch entered the horizon since the last tick
        return c.change_seq > cursor.seq or cursor.until is None or c.launch_at > cursor.until

    fresh = [c for c in due if became_due(c)]
    if fresh:
        # Dagster dedupes run keys per sensor or schedule: a run the backstop launched with the same key (it fires
        # on the hour, when a campaign launching on the hour enters the horizon) would be launched a second time.
        keys = [warming_run_key(c) for c in fresh]
        runs = context.instance.get_runs(
            dg.RunsFilter(job_name=campaign_warming_job.name, tags={RUN_KEY_TAG: keys}), limit=len(keys)
        )
        launched = {run.tags.get(RUN_KEY_TAG) for run in runs}
        fresh = [c for c in fresh if warming_run_key(c) not in launched]
    cancelled = [c for c in changed if c.status == "cancelled" or ended_when_registered(c)]
    if context.cursor is None:  # a first tick reads every change ever made: only those whose values are still there
        cancelled = still_cached(context, redis, cancelled)
    # a changed campaign that now launches beyond the horizon: cold, so its last revision's values go
    cancelled += still_cached(context, redis, [c for c in changed if c.revision > 1 and postponed(c, now, horizon)])
    requested = {c.campaign_id for c in fresh}
    warm = registry.warm(now)  # one read for the lost values' check and the re-scoring
    lost, checked = lost_campaigns(
        context, warm, redis, limit=campaign_registry.max_lost_checks_per_tick, after=cursor.checked
    )
    lost = [c for c in lost if c.campaign_id not in requested]
    if lost:
        # Those serving longest first (the registry lists warm campaigns by launch time); the rest are still lost,
        # and not busy, at the next tick, which takes them.
        total, lost = len(lost), lost[: campaign_registry.max_rewarms_per_tick]
        if total > len(lost):  # the same turn again: its other lost campaigns are warmed next, not after a round
            checked = cursor.checked
        context.log.warning(
            f"Redis lost the values of {total} warm campaigns (their budget split or an ad's CTR is gone): "
            f"warming {len(lost)} again"
            + (f" now, {total - len(lost)} more at the next ticks" if total > len(lost) else "")
            + ": "
            + ", ".join(f"{c.campaign_id} r{c.revision}" for c in lost[:10])
            + (" ..." if len(lost) > 10 else "")
        )
    rescored, model = [], None
    if campaign_registry.rescore_on_new_model and len(lost) < campaign_registry.max_rewarms_per_tick:
        skip = requested | {c.campaign_id for c in [*lost, *cancelled]}
        rescored, model = scored_by_older_model(
            context, warm, now, skip=skip, limit=campaign_registry.max_rewarms_per_tick - len(lost)
        )
        if rescored:
            context.log.info(
                f"scoring {len(rescored)} warm campaigns again with the approved ctr_model {model}: "
                + ", ".join(f"{c.campaign_id} ({c.warm_model or 'model not recorded'})" for c in rescored[:10])
                + (" ..." if len(rescored) > 10 else "")
            )
    # a warm campaign's partition too: a Dagster instance newer than the registry's warmth has none
    known = set(context.instance.get_dynamic_partitions(CAMPAIGNS.name)) if fresh or lost or rescored else set()
    new_partitions = sorted({c.campaign_id for c in [*fresh, *lost, *rescored]} - known)
    next_cursor = LaunchCursor(changed[-1].change_seq if changed else cursor.seq, now + horizon, now, checked).encode()
    context.log.info(
        f"{len(changed)} changed, {len(due)} due (cold, or values expiring), {len(fresh)} requested,"
        f" {len(lost)} lost in Redis, {len(rescored)} scored again with a new model, {len(cancelled)} cancelled"
    )
    if not fresh and not lost and not cancelled and not rescored:
        return dg.SensorResult(
            skip_reason=f"nothing new to warm ({len(due)} due, requested before)", cursor=next_cursor
        )
    rewarming = [rewarming_request(c, now) for c in lost] + [rescoring_request(c, model, now) for c in rescored]
    return dg.SensorResult(
        run_requests=[*map(warming_request, fresh), *rewarming, *map(cleanup_request, cancelled)],
        dynamic_partitions_requests=[CAMPAIGNS.build_add_request(new_partitions)] if new_partitions else [],
        cursor=next_cursor,
    )


def failed_cleanups(instance: dg.DagsterInstance, registry: CampaignRegistry, *, limit: int = 1000) -> list[Campaign]:
    """Cancelled (or ended) campaigns whose newest cleanup run (among the newest ``limit`` of them) failed or was
    canceled: their values are still in the cache. A revision cancelled since (re-activated, cancelled again) has its
    own cleanup."""
    newest: dict[str, dg.DagsterRun] = {}
    for run in instance.get_runs(dg.RunsFilter(job_name=campaign_cleanup_job.name), limit=limit):  # newest first
        newest.setdefault(run.tags.get(RUN_KEY_TAG, ""), run)
    ended = (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)
    out = []
    for run_key, run in sorted(newest.items()):
        campaign = registry.get(run.tags.get(CAMPAIGN_TAG, "")) if run.status in ended else None
        gone = campaign is not None and not_warmable(campaign, datetime.now(UTC)) is not None  # cancelled or ended
        if gone and cleanup_request(campaign).run_key == run_key:
            out.append(campaign)
    return out


def build_campaign_cleanup_schedule(timezone: str) -> dg.ScheduleDefinition:
    """The every-2-hours backstop of cancellations, in the deployment's timezone."""

    @dg.schedule(
        name="campaign_cleanup_backstop",
        cron_schedule="30 */2 * * *",
        execution_timezone=timezone,
        target=campaign_cleanup_job,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="Every 2 hours: run the cleanup again for every cancelled campaign whose cleanup run failed "
        "(Redis was down for longer than its retries), with the sensor's run key: its values are still served.",
    )
    def campaign_cleanup_backstop(context: dg.ScheduleEvaluationContext, campaign_registry: CampaignRegistryResource):
        if context.instance_ref is None:
            return dg.SkipReason("no Dagster instance to read the cleanup runs from")
        # A sensor never requests a run key twice, and dagster.yaml re-executes only runs whose worker died.
        retry = failed_cleanups(context.instance, campaign_registry.registry())
        if not retry:
            return dg.SkipReason("no cleanup of a cancelled campaign is left failed")
        context.log.info(f"cleanup backstop: removing the values of {len(retry)} cancelled campaigns again")
        return [cleanup_request(c) for c in retry]

    return campaign_cleanup_backstop


def build_campaign_schedules(timezone: str) -> list[dg.ScheduleDefinition]:
    """The every-2-hours backstop, in the deployment's timezone."""

    @dg.schedule(
        name="campaign_warming_backstop",
        cron_schedule="0 */2 * * *",
        execution_timezone=timezone,
        target=campaign_warming_job,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="Every 2 hours: warm every due campaign that is still not warm (the sensor was off, a run failed), "
        "or whose values expire within a day while it runs on (open-ended), with the sensor's run keys; skips "
        "campaigns whose warming run is still queued or running.",
    )
    def campaign_warming_backstop(context: dg.ScheduleEvaluationContext, campaign_registry: CampaignRegistryResource):
        registry = campaign_registry.registry()
        now = context.scheduled_execution_time or datetime.now(UTC)
        due = registry.due(now, campaign_registry.warming_horizon)
        instance = context.instance if context.instance_ref is not None else None
        if instance is not None and due:
            active = instance.get_runs(dg.RunsFilter(job_name=campaign_warming_job.name, statuses=ACTIVE_RUN_STATUSES))
            busy = {run.tags.get(RUN_KEY_TAG) for run in active}
            due = [c for c in due if warming_run_key(c) not in busy]
            # a schedule cannot return partition requests: the partitions the sensor never added are added here
            missing = sorted({c.campaign_id for c in due} - set(instance.get_dynamic_partitions(CAMPAIGNS.name)))
            if missing:
                instance.add_dynamic_partitions(CAMPAIGNS.name, missing)
        if not due:
            return dg.SkipReason("every due campaign is warm or being warmed")
        context.log.info(f"backstop: warming {len(due)} campaigns")
        return [warming_request(c) for c in due]

    return [campaign_warming_backstop]
