"""Models: the CTR RandomForest, gated by a blocking check against a logistic-regression baseline and each ad's own
click history, and measured on cold-start ads (first seen after the training cutoff) by a warning check."""

import time
from collections.abc import Iterator
from dataclasses import asdict
from datetime import date, timedelta
from typing import Any

import dagster as dg
import pandas as pd
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus
from pydantic import Field

from ..ml import ctr
from ..ml.features import spec_dict
from ..ml.model_store import LocalModelStore
from .config_checks import at_least, fraction, refuse
from .partitions import DEFAULT_PARTITIONS, Partitions
from .records import metadata_of, newest_metadata
from .resources import LakeResource, ModelStoreResource

CTR_MODEL = "ctr_model"
MODEL_RETENTION_DAYS = 30
TRAINING_DAYS = 14  # ctr_model's default training window; its declared ad_impressions dependency covers it


def retention_field() -> Any:
    """``retention_days`` of a daily model's config: how long its versions stay in the model store."""
    return Field(
        MODEL_RETENTION_DAYS,
        description="Versions of days more than this before the partition's are deleted from the model store, "
        "except the newest approved one (what later days and campaigns use); 0 keeps every version.",
    )


class CtrModelConfig(dg.Config):
    """Training window and forest; the ad columns it reads are the lake resource's ad feature set."""

    training_days: int = Field(
        TRAINING_DAYS,
        description="Days of impressions up to the partition's day; the declared ad_impressions dependency covers the "
        "default.",
    )
    valid_fraction: float = Field(
        0.2, description="The newest share of the training days held out for validation (at least one day)."
    )
    n_estimators: int = Field(100, description="Trees of the forest.")
    max_depth: int = Field(12, description="Depth of each tree.")
    min_samples_leaf: int = Field(
        5, description="(ad, day) rows per leaf, at least (the fit weighs each by its impressions)."
    )
    min_category_ads: int = Field(
        5,
        description="A category value seen on fewer training ads is folded into the unseen bucket (all-zero "
        "one-hot), like a value first seen after training.",
    )
    max_category_values: int = Field(
        100, description="At most this many values per column are learned (the most common)."
    )
    retention_days: int = retention_field()


def read_impressions(lake, days: list[str]) -> tuple[pd.DataFrame, list[str]]:
    """Impressions of ``days`` (missing days are reported, not fatal)."""
    frames, missing = [], []
    for day in days:
        if lake.exists("ad_impressions", day):
            frames.append(lake.read("ad_impressions", day, columns=ctr.IMPRESSION_COLUMNS))
        else:
            missing.append(day)
    empty = pd.DataFrame(
        {"ts_ms": pd.Series(dtype="int64"), "ad_id": pd.Series(dtype=str), "clicked": pd.Series(dtype=bool)}
    )
    return (pd.concat(frames, ignore_index=True) if frames else empty), missing


# The baselines ctr_model gates its forest against: as its metadata names them (``<name>_auc``), as people read them.
BASELINE_LABELS = {"baseline": "logistic regression", "ad_history": "ad history"}


CHANCE_AUC = 0.5  # the constant predictor's AUC (every ad the overall CTR): a model at or below it ranks no better


def beats_baseline_check(
    metrics: dict | None, baselines: dict[str, dict] | None, error: str | None
) -> dg.AssetCheckResult:
    """Passes only for a trained model whose AUC is above every baseline's (``baselines``: name -> metrics) on the
    same validation days, the logistic regression's and each ad's own click history's, and above chance (0.5, the
    constant predictor's): on a few clicks without signal, a forest ranking worse than chance beat baselines that
    ranked worse still, and was approved."""
    if error is not None:
        return dg.AssetCheckResult(
            check_name="beats_baseline", passed=False, severity=dg.AssetCheckSeverity.ERROR, description=error
        )
    baselines = {**baselines, "chance": {"auc": CHANCE_AUC}}
    best = max(baselines, key=lambda name: baselines[name]["auc"])
    best_auc = baselines[best]["auc"]
    against = ", ".join(f"{BASELINE_LABELS.get(name, name)} {scores['auc']:.4f}" for name, scores in baselines.items())
    return dg.AssetCheckResult(
        check_name="beats_baseline",
        passed=metrics["auc"] > best_auc,
        severity=dg.AssetCheckSeverity.ERROR,
        description=f"AUC {metrics['auc']:.4f} vs {against}",
        metadata={
            "auc": metrics["auc"],
            **{f"{name}_auc": scores["auc"] for name, scores in baselines.items()},
            "best_baseline": best,
            "auc_lift": metrics["auc"] - best_auc,
        },
    )


def new_ad_metadata(new_ads: ctr.NewAdEvaluation) -> dict[str, object]:
    """The cold-start numbers as metadata; an AUC that could not be measured is left out (the UI showed its NaN as an
    empty value) and a note says why."""
    measured = {
        name: value
        for name, value in (("new_ad_auc", new_ads.auc), ("baseline_new_ad_auc", new_ads.baseline_auc))
        if value is not None
    }
    counts = {"new_ads": new_ads.ads, "new_ad_impressions": new_ads.impressions}
    note = {} if new_ads.note is None else {"new_ad_auc_note": new_ads.note}
    return {**measured, **counts, **note}


def new_ads_check(new_ads: ctr.NewAdEvaluation | None, error: str | None) -> dg.AssetCheckResult:
    """Warns (never blocks) when the forest ranks ads first seen after the training cutoff worse than the baseline
    on the same rows; passes with a note when that cannot be measured."""
    name, severity = "new_ads_beat_baseline", dg.AssetCheckSeverity.WARN
    if error is not None:
        return dg.AssetCheckResult(check_name=name, passed=False, severity=severity, description=error)
    metadata = new_ad_metadata(new_ads)
    if new_ads.note is not None:
        description, passed = f"not measured: {new_ads.note}", True
    else:
        passed = new_ads.auc >= new_ads.baseline_auc
        metadata["new_ad_auc_lift"] = new_ads.auc - new_ads.baseline_auc
        description = (
            f"new-ad AUC {new_ads.auc:.4f} vs baseline {new_ads.baseline_auc:.4f} on the "
            f"{new_ads.ads} ads first seen after the training cutoff"
        )
    return dg.AssetCheckResult(
        check_name=name, passed=passed, severity=severity, description=description, metadata=metadata
    )


@dg.asset(
    partitions_def=DEFAULT_PARTITIONS.daily,
    # The window it reads, as the selection assets declare theirs: the UI's lineage of a day names every day read.
    deps=[
        "ads",
        dg.AssetDep(
            "ad_impressions", partition_mapping=dg.TimeWindowPartitionMapping(start_offset=-(TRAINING_DAYS - 1))
        ),
    ],
    kinds={"sklearn"},
    group_name="models",
    description="RandomForest CTR model of the day, trained on the last training_days of impressions (split by time) "
    "on the ad columns the lake resource names. Its version is this materialization (partition + run id), and only "
    "a version approved by beats_baseline scores predictions and campaigns.",
    check_specs=[
        dg.AssetCheckSpec(
            "beats_baseline",
            asset=CTR_MODEL,
            blocking=True,
            description="The forest's validation AUC is above a logistic regression's, each ad's own click history's "
            "and chance (0.5) on the same time split; blocks: only an approved model is used for predictions and "
            "campaigns.",
        ),
        dg.AssetCheckSpec(
            "new_ads_beat_baseline",
            asset=CTR_MODEL,
            description="Warns when the forest's AUC on ads first seen after the training cutoff is below the "
            "logistic baseline's on the same rows (cold start); never blocks.",
        ),
    ],
)
def ctr_model(
    context: dg.AssetExecutionContext, config: CtrModelConfig, lake: LakeResource, model_store: ModelStoreResource
) -> dg.MaterializeResult:
    """RandomForest CTR model on the last ``training_days`` of impressions, split by time, on the ad columns the
    lake resource names (category vocabularies learned from the training days).

    Its version is this materialization (partition + run id); predictions load exactly that version, and the
    stored model carries its feature spec and vocabularies.
    """
    refuse(
        CTR_MODEL,
        at_least(config, 2, "training_days"),
        fraction(config, "valid_fraction"),
        at_least(config, 1, "n_estimators", "max_depth", "min_samples_leaf", "max_category_values"),
        at_least(config, 0, "min_category_ads", "retention_days"),
    )
    store = lake.lake()
    days = Partitions.of(context).days_ending(context.partition_key, config.training_days)
    impressions, missing = read_impressions(store, days)
    ads = store.read("ads")
    started = time.perf_counter()
    try:
        spec = lake.ad_feature_spec()
        frame, issues = ctr.training_frame(impressions, ads, spec, timezone=Partitions.of(context).timezone)
        train, valid = ctr.time_split(frame, valid_fraction=config.valid_fraction)
        # The forest's fit is the long silent part (minutes at millions of (ad, day) rows): say what it is fitting.
        context.log.info(
            f"fitting {config.n_estimators} trees (depth {config.max_depth}) on {len(train):,} (ad, day) rows of "
            f"{len(impressions):,} impressions over {len(days) - len(missing)} days; {len(valid):,} rows held back"
        )
        encoder = ctr.fit_encoder(
            train, spec, min_category_ads=config.min_category_ads, max_category_values=config.max_category_values
        )
        model = ctr.train_ctr_model(
            train,
            encoder,
            n_estimators=config.n_estimators,
            max_depth=config.max_depth,
            min_samples_leaf=config.min_samples_leaf,
        )
        baseline_model = ctr.train_baseline(train, encoder)
        metrics, baseline = ctr.evaluate(model, valid), ctr.evaluate(baseline_model, valid)
        history = ctr.evaluate(ctr.train_ad_history(train), valid)
        new_ads = ctr.evaluate_new_ads(model, baseline_model, train, valid)
    except ValueError as error:
        context.log.error(f"no model trained: {error}")
        return dg.MaterializeResult(
            metadata={"error": str(error), "impressions": len(impressions), "missing_days": len(missing)},
            check_results=[
                beats_baseline_check(None, None, f"no model trained: {error}"),
                new_ads_check(None, f"no model trained: {error}"),
            ],
        )
    seconds = time.perf_counter() - started
    version = f"{context.partition_key}.{context.run_id[:8]}"
    # Before the save: a full model store otherwise failed every night's save before anything made room.
    check_key = dg.AssetCheckKey(dg.AssetKey(CTR_MODEL), "beats_baseline")
    pruned = prune_model_versions(context, model_store.store(), CTR_MODEL, check_key, config.retention_days, version)
    # overwrite: a step retry in the same run retrains and replaces the model of this unfinished version
    uri = model_store.store().save(
        CTR_MODEL,
        version,
        model,
        {
            "metrics": metrics,
            "baseline": baseline,
            "ad_history": history,
            "new_ads": asdict(new_ads),
            "features": encoder.describe(),
        },
        overwrite=True,
    )
    context.log.info(f"trained {version}: AUC {metrics['auc']:.4f} (baseline {baseline['auc']:.4f})")
    if new_ads.note is not None:
        context.log.info(f"new-ad AUC not measured: {new_ads.note}")
    check = beats_baseline_check(metrics, {"baseline": baseline, "ad_history": history}, None)
    return dg.MaterializeResult(
        metadata={
            "model_version": version,
            "approved": check.passed,  # predictions load only approved versions
            "model_uri": uri,
            "auc": metrics["auc"],
            "log_loss": metrics["log_loss"],
            "calibration_error": metrics["calibration_error"],
            "baseline_auc": baseline["auc"],
            "ad_history_auc": history["auc"],
            "ad_history_log_loss": history["log_loss"],
            **new_ad_metadata(new_ads),
            "feature_spec": dg.MetadataValue.json(spec_dict(spec)),
            "category_values": dg.MetadataValue.json({c: list(v) for c, v in encoder.vocabularies.items()}),
            "n_features": len(encoder.feature_names),
            "training_rows": len(train),
            "impressions": len(impressions),
            "unknown_ad_impressions": issues.unknown_ads,
            "ads_missing_features": issues.missing_features,
            "missing_days": len(missing),
            "train_seconds": seconds,
            "versions_pruned": pruned,
        },
        check_results=[check, new_ads_check(new_ads, None)],
    )


def model_version(instance: dg.DagsterInstance, partition: str) -> str:
    """The model version recorded by the ``ctr_model`` materialization of ``partition``."""
    metadata = newest_metadata(instance, CTR_MODEL, partition)
    if "model_version" not in metadata:
        raise dg.Failure(description=f"no trained ctr_model for partition {partition}")
    if not metadata["approved"].value:
        raise dg.Failure(description=f"ctr_model {metadata['model_version'].value} failed beats_baseline")
    return metadata["model_version"].value


def approved_materializations(
    instance: dg.DagsterInstance, check: dg.AssetCheckKey, *, page: int = 1000
) -> Iterator[tuple[str, int, str, dict]]:
    """``(partition, storage_id, run_id, metadata)`` of the current (newest) materialization of each partition of
    ``check``'s asset, when its run passed the blocking ``check``; all records are read, page by page, so no number
    of later backfills or retries hides one (model lineage: a version is approved by its materialization's check,
    never by a file). A re-run of a day that fails the check rejects the day: its earlier approved run is history."""
    passed: set[str] = set()
    check_cursor = None
    while True:
        records = instance.event_log_storage.get_asset_check_execution_history(
            check, page, cursor=check_cursor, status={AssetCheckExecutionRecordStatus.SUCCEEDED}
        )
        passed |= {record.run_id for record in records}
        if len(records) < page:
            break
        check_cursor = records[-1].id
    cursor, seen = None, set()
    while True:
        result = instance.fetch_materializations(check.asset_key, limit=page, cursor=cursor)  # newest first
        for record in result.records:
            if (record.partition_key or "") in seen:
                continue
            seen.add(record.partition_key or "")
            if record.run_id in passed:
                metadata = metadata_of(record)
                yield record.partition_key or "", record.storage_id, record.run_id, metadata
        if not result.has_more:
            break
        cursor = result.cursor


def newest_approved_version(instance: dg.DagsterInstance, check: dg.AssetCheckKey) -> str | None:
    """The model version of the newest day's approved materialization of ``check``'s asset (its newest run), or
    None: what later days warm-start from and campaigns score with."""
    approved = [
        ((partition, storage_id), metadata["model_version"].value)
        for partition, storage_id, _, metadata in approved_materializations(instance, check)
        if "model_version" in metadata and (metadata.get("approved") is None or metadata["approved"].value)
    ]
    return max(approved)[1] if approved else None


# A run in these states may still load the version it saved (a backfill run scores its old day after top_ads).
RUNNING = [dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]


def running_versions(instance: dg.DagsterInstance, versions: list[str]) -> set[str]:
    """Those of ``versions`` (named ``{day}.{run id[:8]}``) saved by a run still going, or by the run that one
    re-executes."""
    runs = instance.get_runs(dg.RunsFilter(statuses=RUNNING))
    ids = {run_id[:8] for run in runs for run_id in (run.run_id, run.parent_run_id, run.root_run_id) if run_id}
    return {version for version in versions if version.rpartition(".")[2] in ids}


def prune_model_versions(
    context: dg.AssetExecutionContext,
    store: LocalModelStore,
    name: str,
    check: dg.AssetCheckKey,
    retention_days: int,
    version: str,
) -> int:
    """Delete ``name``'s versions of days more than ``retention_days`` before the partition's, except this run's
    ``version``, the newest approved one and those of runs still going (``running_versions``); returns how many. 0
    keeps every version. A failure to delete is logged, never fatal: the day's model is still saved."""
    if retention_days <= 0:
        return 0
    before = (date.fromisoformat(context.partition_key) - timedelta(days=retention_days)).isoformat()
    keep = {version, newest_approved_version(context.instance, check)} - {None}
    keep |= running_versions(context.instance, store.versions(name))
    try:
        pruned = store.prune(name, before_day=before, keep=keep)
    except OSError as error:
        context.log.warning(f"old {name} versions not deleted: {error}")
        return 0
    if pruned:
        context.log.info(f"deleted {len(pruned)} {name} versions older than {before} ({pruned[0]} to {pruned[-1]})")
    return len(pruned)
