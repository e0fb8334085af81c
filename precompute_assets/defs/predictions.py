"""Predictions: batch-scored CTR for the selected ads, from exactly the model version of the partition."""

import dagster as dg
import numpy as np
import pandas as pd

from ..ml import ctr
from .experiment import EXPERIMENT_COLUMN
from .models import CTR_MODEL, model_version
from .partitions import DEFAULT_PARTITIONS
from .resources import LakeResource, ModelStoreResource


@dg.asset(
    partitions_def=DEFAULT_PARTITIONS.daily,
    deps=[CTR_MODEL, "ads"],
    kinds={"sklearn", "pandas"},
    group_name="predictions",
    description="Predicted CTR of every ad in the day's top_ads, from exactly that day's approved ctr_model version; "
    "ads that cannot be scored are counted (skipped_ads), not dropped silently.",
    check_specs=[
        dg.AssetCheckSpec(
            "valid_ctr",
            asset="ctr_predictions",
            blocking=True,
            description="Every prediction is a finite probability in [0, 1], and there is one unless nothing was "
            "selected; blocks the publish.",
        )
    ],
)
def ctr_predictions(
    context: dg.AssetExecutionContext, top_ads: pd.DataFrame, lake: LakeResource, model_store: ModelStoreResource
):
    """CTR of every ad in ``top_ads``; ads that cannot be scored are listed, not dropped silently. The model
    encodes the ads with its own feature spec; category values it never learned are counted."""
    version = model_version(context.instance, context.partition_key)
    model = model_store.load(CTR_MODEL, version)
    ads = lake.lake().read("ads")
    try:
        scores, skipped = ctr.score_ads(model, ads, top_ads["ad_id"].tolist())
    except (TypeError, ValueError) as error:
        raise dg.Failure(description=f"ctr_model {version} cannot score the ads table: {error}") from None
    scores["model_version"] = version
    if EXPERIMENT_COLUMN in top_ads.columns:  # carried on: ctr_cache publishes the experiment these were selected by
        named = dict(zip(top_ads["ad_id"].astype(str), top_ads[EXPERIMENT_COLUMN], strict=True))
        scores[EXPERIMENT_COLUMN] = scores["ad_id"].astype(str).map(named)
    if skipped:
        context.log.warning(f"{len(skipped)} selected ads could not be scored, e.g. {skipped[:5]}")
    unseen = model.encoder.unseen(ads[ads["ad_id"].astype(str).isin(scores["ad_id"])])
    yield dg.Output(
        scores,
        metadata={
            "dagster/row_count": len(scores),
            "model_version": version,
            "skipped_ads": len(skipped),
            # nothing selected (read-through only) has no mean: a 0.0 plotted as the model predicting no clicks
            **({"mean_ctr": float(scores["ctr"].mean())} if len(scores) else {}),
            "unseen_category_values": dg.MetadataValue.json(unseen),
        },
    )
    yield valid_ctr_check(scores, selected=len(top_ads))


def valid_ctr_check(scores: pd.DataFrame, *, selected: int) -> dg.AssetCheckResult:
    """Every prediction is a finite probability, and there is at least one unless nothing was selected (a
    precompute share of 0: read-through only, and the empty version published ends yesterday's)."""
    values = scores["ctr"].to_numpy(dtype=float)
    bad = int((~np.isfinite(values) | (values < 0) | (values > 1)).sum())
    passed = (len(values) > 0 or selected == 0) and bad == 0
    if not len(values):
        description = "nothing selected: read-through only" if selected == 0 else "no predictions"
    else:
        description = f"{bad} predictions outside [0, 1] or not finite"
    return dg.AssetCheckResult(
        check_name="valid_ctr",
        passed=passed,
        severity=dg.AssetCheckSeverity.ERROR,
        description=description,
        metadata={"invalid": bad, "predictions": len(values)},
    )
