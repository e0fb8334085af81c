"""Models: the CTR RandomForest, gated by a blocking check against a logistic-regression baseline."""

import time

import dagster as dg
import pandas as pd

from ..ml import ctr
from .partitions import DEFAULT_PARTITIONS, Partitions
from .resources import LakeResource, ModelStoreResource

CTR_MODEL = "ctr_model"


class CtrModelConfig(dg.Config):
    training_days: int = 14
    valid_fraction: float = 0.2
    n_estimators: int = 100
    max_depth: int = 12
    min_samples_leaf: int = 5


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


def beats_baseline_check(metrics: dict | None, baseline: dict | None, error: str | None) -> dg.AssetCheckResult:
    """Passes only for a trained model whose AUC is at least the baseline's on the same validation days."""
    if error is not None:
        return dg.AssetCheckResult(
            check_name="beats_baseline", passed=False, severity=dg.AssetCheckSeverity.ERROR, description=error
        )
    passed = metrics["auc"] >= baseline["auc"]
    return dg.AssetCheckResult(
        check_name="beats_baseline",
        passed=passed,
        severity=dg.AssetCheckSeverity.ERROR,
        description=f"AUC {metrics['auc']:.4f} vs baseline {baseline['auc']:.4f}",
        metadata={"auc": metrics["auc"], "baseline_auc": baseline["auc"], "auc_lift": metrics["auc"] - baseline["auc"]},
    )


@dg.asset(
    partitions_def=DEFAULT_PARTITIONS.daily,
    deps=["ads", "ad_impressions"],
    kinds={"sklearn"},
    group_name="models",
    check_specs=[dg.AssetCheckSpec("beats_baseline", asset=CTR_MODEL, blocking=True)],
)
def ctr_model(
    context: dg.AssetExecutionContext, config: CtrModelConfig, lake: LakeResource, model_store: ModelStoreResource
) -> dg.MaterializeResult:
    """RandomForest CTR model on the last ``training_days`` of impressions, split by time.

    Its version is this materialization (partition + run id); predictions load exactly that version.
    """
    store = lake.lake()
    days = Partitions.of(context).days_ending(context.partition_key, config.training_days)
    impressions, missing = read_impressions(store, days)
    ads = store.read("ads")
    started = time.perf_counter()
    try:
        frame, issues = ctr.training_frame(impressions, ads)
        train, valid = ctr.time_split(frame, valid_fraction=config.valid_fraction)
        model = ctr.train_ctr_model(
            train,
            n_estimators=config.n_estimators,
            max_depth=config.max_depth,
            min_samples_leaf=config.min_samples_leaf,
        )
        metrics, baseline = ctr.evaluate(model, valid), ctr.evaluate(ctr.train_baseline(train), valid)
    except ValueError as error:
        context.log.error(f"no model trained: {error}")
        return dg.MaterializeResult(
            metadata={"error": str(error), "impressions": len(impressions), "missing_days": len(missing)},
            check_results=[beats_baseline_check(None, None, f"no model trained: {error}")],
        )
    seconds = time.perf_counter() - started
    version = f"{context.partition_key}.{context.run_id[:8]}"
    # overwrite: a step retry in the same run retrains and replaces the model of this unfinished version
    uri = model_store.store().save(
        CTR_MODEL, version, model, {"metrics": metrics, "baseline": baseline}, overwrite=True
    )
    context.log.info(f"trained {version}: AUC {metrics['auc']:.4f} (baseline {baseline['auc']:.4f})")
    check = beats_baseline_check(metrics, baseline, None)
    return dg.MaterializeResult(
        metadata={
            "model_version": version,
            "approved": check.passed,  # predictions load only approved versions
            "model_uri": uri,
            "auc": metrics["auc"],
            "log_loss": metrics["log_loss"],
            "calibration_error": metrics["calibration_error"],
            "baseline_auc": baseline["auc"],
            "training_rows": len(train),
            "impressions": len(impressions),
            "unknown_ad_impressions": issues.unknown_ads,
            "ads_missing_features": issues.missing_features,
            "missing_days": len(missing),
            "train_seconds": seconds,
        },
        check_results=[check],
    )


def model_version(instance: dg.DagsterInstance, partition: str) -> str:
    """The model version recorded by the ``ctr_model`` materialization of ``partition``."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(CTR_MODEL), asset_partitions=[partition]), limit=1
    ).records
    metadata = records[0].asset_materialization.metadata if records else {}
    if "model_version" not in metadata:
        raise dg.Failure(description=f"no trained ctr_model for partition {partition}")
    if not metadata["approved"].value:
        raise dg.Failure(description=f"ctr_model {metadata['model_version'].value} failed beats_baseline")
    return metadata["model_version"].value
