"""Click-through-rate model: per-(ad, day) training rows from the ad columns an ``AdFeatureSpec`` names, a time
split, two models (random forest and a logistic-regression baseline) on one learned encoding, each ad's own smoothed
click history as the simplest baseline (``AdHistoryCtr``), impression-weighted
evaluation (overall and on ads first seen after the training cutoff) and batch scoring.

Pure pandas / scikit-learn: no Dagster, no Redis. The cached value is one CTR per ad, so every feature
is a property of the ad alone (nothing about the viewer or the moment of the impression).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .features import ID_COLUMN, AdEncoder, AdFeatureSpec, clean_ad_columns, feature_problems, require_ad_columns

IMPRESSION_COLUMNS = ["ts_ms", "ad_id", "clicked"]
MS_PER_DAY = 86_400_000
CTR_CLIP = 1e-6
CALIBRATION_BINS = 10

# scikit-learn is imported where a model is trained or scored, not with this module: loading the Definitions
# (the code server, every run's process, each daemon reload) imports this module and would pay about a second.
if TYPE_CHECKING:
    from sklearn.ensemble import RandomForestRegressor
    from sklearn.pipeline import Pipeline


@dataclass(frozen=True)
class TrainingIssues:
    """What ``training_frame`` left out instead of failing on."""

    unknown_ads: int  # impressions whose ad_id is not in the ads table
    missing_features: int  # distinct ads that had impressions but NaN / invalid features
    excluded_impressions: int  # all impressions left out, for either reason


@dataclass(frozen=True)
class CtrModel:
    """What the model store holds: an estimator with the encoding it was trained on (spec and vocabularies),
    so scoring needs nothing but this object and the ads."""

    encoder: AdEncoder
    estimator: RandomForestRegressor | Pipeline  # the forest, or the baseline: scaler and logistic regression

    @property
    def spec(self) -> AdFeatureSpec:
        return self.encoder.spec


@dataclass(frozen=True)
class NewAdEvaluation:
    """AUC of the forest and the baseline on the validation rows of ads with no training rows (cold start).

    ``auc`` and ``baseline_auc`` are None when it cannot be measured; ``note`` then says why.
    """

    auc: float | None
    baseline_auc: float | None
    ads: int
    impressions: int
    note: str | None = None


def _require_columns(frame: pd.DataFrame, columns: list[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} is missing columns {missing}; it has {list(frame.columns)}")


def _ad_table(ads: pd.DataFrame, spec: AdFeatureSpec) -> tuple[pd.DataFrame, np.ndarray]:
    """The spec's columns of ``ads`` cleaned and indexed by ``ad_id`` (as text), and which rows are valid."""
    require_ad_columns(ads, spec)
    duplicated = ads[ID_COLUMN][ads[ID_COLUMN].duplicated()]
    if len(duplicated):
        raise ValueError(f"ads table has duplicate ad_id values, e.g. {duplicated.iloc[:5].tolist()}")
    valid = feature_problems(ads, spec).isna().to_numpy()
    table = clean_ad_columns(ads, spec)
    table.index = pd.Index(ads[ID_COLUMN].astype(str).to_numpy(dtype=object), name=ID_COLUMN)
    return table, valid


def _whole_numbers_as_integers(ids: pd.Series) -> pd.Series:
    """Float ids that are all whole numbers as nullable integers: pandas reads a Parquet int64 column with a missing
    value as floats, whose text ('1042.0') matched no ad's, so one null id made every impression unknown."""
    if not pd.api.types.is_float_dtype(ids):
        return ids
    present = ids.dropna().to_numpy(dtype=float)
    if not (np.isfinite(present).all() and (present == np.round(present)).all() and (np.abs(present) < 2**53).all()):
        return ids
    return ids.astype("Int64")


def training_frame(
    impressions: pd.DataFrame, ads: pd.DataFrame, spec: AdFeatureSpec | None = None, *, timezone: str = "UTC"
) -> tuple[pd.DataFrame, TrainingIssues]:
    """One row per (ad, day) with ``ad_id``, ``day``, ``impressions``, ``clicks`` and the ad's ``spec``
    columns (numeric as floats, categorical as labels), plus what was excluded (impressions of unknown ads, ads
    whose features are invalid). A spec column the ads table lacks is a ``ValueError``. Days are the local dates in
    ``timezone`` (days since 1970-01-01), the daily partitions' days: in UTC days, a deployment west of Greenwich held
    back a part of a day (Los Angeles: 00:00-08:00 of the partition's day) as if it were the last whole one."""
    spec = spec or AdFeatureSpec()
    _require_columns(impressions, IMPRESSION_COLUMNS, "impressions table")
    table, complete = _ad_table(ads, spec)

    ids = _whole_numbers_as_integers(impressions["ad_id"])
    if not (pd.api.types.is_object_dtype(ids) or pd.api.types.is_string_dtype(ids)):
        ids = ids.astype(str)  # as the table's index: integer ids an ad server wrote match the ads by their text
    # Integer codes instead of grouping on strings: ~10x faster at 10M impressions.
    codes = pd.Categorical(ids, categories=table.index).codes.astype(np.int64)
    known = codes >= 0
    usable = known.copy()
    usable[known] = complete[codes[known]]
    incomplete_codes = np.unique(codes[known & ~usable])
    issues = TrainingIssues(
        unknown_ads=int((~known).sum()),
        missing_features=len(incomplete_codes),
        excluded_impressions=int((~usable).sum()),
    )

    day = local_days(impressions["ts_ms"].to_numpy(dtype=np.int64)[usable], timezone)
    clicked = impressions["clicked"].to_numpy(dtype=bool)[usable]
    grouped = (
        pd.DataFrame({"code": codes[usable], "day": day, "clicked": clicked})
        .groupby(["day", "code"], sort=True)["clicked"]
        .agg(impressions="size", clicks="sum")
        .reset_index()
    )
    row_columns = table.iloc[grouped["code"].to_numpy()].reset_index()
    counts = pd.DataFrame(
        {
            "day": grouped["day"].to_numpy(dtype=np.int64),
            "impressions": grouped["impressions"].to_numpy(dtype=np.int64),
            "clicks": grouped["clicks"].to_numpy(dtype=np.int64),
        }
    )
    frame = pd.concat([row_columns[[ID_COLUMN]], counts, row_columns[spec.columns[1:]]], axis=1)
    return frame, issues


def local_days(ts_ms: np.ndarray, timezone: str) -> np.ndarray:
    """Days since 1970-01-01 of the local date in ``timezone`` of each epoch-milliseconds timestamp."""
    if timezone == "UTC":
        return ts_ms // MS_PER_DAY
    local = pd.DatetimeIndex(pd.to_datetime(ts_ms, unit="ms", utc=True)).tz_convert(timezone).tz_localize(None)
    return local.to_numpy().astype("datetime64[D]").astype(np.int64)


def time_split(frame: pd.DataFrame, *, valid_fraction: float = 0.2) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(train, valid)`` where ``valid`` is the last ``valid_fraction`` of the distinct days (at least one),
    so the model is always judged on days after the ones it learned from."""
    if not 0.0 < valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be strictly between 0 and 1, got {valid_fraction}")
    days = np.unique(frame["day"].to_numpy())
    if len(days) < 2:
        raise ValueError(f"a time split needs impressions on at least 2 distinct days, the frame has {len(days)}")
    n_valid = min(len(days) - 1, max(1, round(len(days) * valid_fraction)))
    first_valid_day = days[-n_valid]
    in_valid = frame["day"].to_numpy() >= first_valid_day
    return frame[~in_valid].reset_index(drop=True), frame[in_valid].reset_index(drop=True)


def _check_labelled(frame: pd.DataFrame, what: str) -> None:
    """Both models and AUC need clicks and non-clicks, and more than one ad to tell apart."""
    if len(frame) == 0 or int(frame["impressions"].sum()) == 0:
        raise ValueError(f"{what} is empty: no (ad, day) rows with impressions")
    clicks = int(frame["clicks"].sum())
    if clicks == 0:
        raise ValueError(f"{what} has no clicks among {int(frame['impressions'].sum())} impressions")
    if clicks == int(frame["impressions"].sum()):
        raise ValueError(f"{what} has no non-clicks: every one of its {clicks} impressions was clicked")
    n_ads = frame["ad_id"].nunique()
    if n_ads < 2:
        raise ValueError(f"{what} has a single ad; ad-level features cannot be learned or ranked from one ad")


def fit_encoder(
    train: pd.DataFrame, spec: AdFeatureSpec | None = None, *, min_category_ads: int = 5, max_category_values: int = 100
) -> AdEncoder:
    """The encoding both models share, learned from the training rows only: a categorical value is learned when
    at least ``min_category_ads`` training ads have it (at most ``max_category_values`` per column, the most
    common); rarer and unseen values encode as all zeros. A ``ValueError`` when that leaves no feature at all (only
    categorical columns, every value rarer than that), which no model can learn from."""
    encoder = AdEncoder.fit(train, spec or AdFeatureSpec(), min_ads=min_category_ads, max_values=max_category_values)
    if not encoder.feature_names:
        raise ValueError(
            f"no feature to learn from: the feature columns are categorical only, and no value of theirs is on "
            f"{min_category_ads} or more training ads (min_category_ads), so every one encodes as unseen"
        )
    return encoder


def train_ctr_model(
    train: pd.DataFrame,
    encoder: AdEncoder,
    *,
    n_estimators: int = 100,
    max_depth: int = 12,
    min_samples_leaf: int = 20,
    seed: int = 0,
    n_jobs: int = -1,
) -> CtrModel:
    """A random forest regressing clicks/impressions per (ad, day) row, weighted by impressions."""
    from sklearn.ensemble import RandomForestRegressor

    _check_labelled(train, "training data")
    # Regression on the rate with impression weights minimises the same squared error as a classifier's
    # Brier score on the expanded click/no-click rows, so each leaf predicts its impression-weighted CTR:
    # calibrated probabilities from half the rows, and min_samples_leaf counts (ad, day) rows.
    model = RandomForestRegressor(
        n_estimators=n_estimators,
        max_depth=max_depth,
        min_samples_leaf=min_samples_leaf,
        random_state=seed,
        n_jobs=n_jobs,
    )
    clicks, impressions = train["clicks"].to_numpy(dtype=float), train["impressions"].to_numpy(dtype=float)
    x = encoder.encode(train)
    model.fit(x, clicks / impressions, sample_weight=impressions)
    _shrink_leaves(model, x, clicks, impressions)
    return CtrModel(encoder, model)


def _shrink_leaves(model: object, x: np.ndarray, clicks: np.ndarray, impressions: np.ndarray) -> None:
    """Set each tree's leaves to the clicks over the impressions of the training rows that reach them, shrunk toward
    the overall CTR by a prior worth one expected click, as ``AdHistoryCtr`` shrinks an ad's: at a CTR of 0.1 %, a
    leaf of (ad, day) rows without a click predicted 0, served as the 1e-6 clip to ads whose CTR was 100 to 700 times
    that. Every training row counts, not only the tree's bootstrap sample; the splits stay as they were."""
    prior = 1.0 / (clicks.sum() / impressions.sum())  # impressions worth one click at the overall CTR
    for tree in model.estimators_:
        leaves = tree.apply(x.astype(np.float32))
        nodes = tree.tree_.node_count
        leaf_clicks = np.bincount(leaves, weights=clicks, minlength=nodes)
        leaf_impressions = np.bincount(leaves, weights=impressions, minlength=nodes)
        reached = leaf_impressions > 0
        tree.tree_.value[reached, 0, 0] = (leaf_clicks[reached] + 1.0) / (leaf_impressions[reached] + prior)


def _expanded(x: np.ndarray, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two rows per (ad, day): clicked with weight=clicks, not clicked with weight=impressions-clicks."""
    clicks = frame["clicks"].to_numpy(dtype=float)
    no_clicks = frame["impressions"].to_numpy(dtype=float) - clicks
    y = np.concatenate([np.ones(len(frame), dtype=int), np.zeros(len(frame), dtype=int)])
    weight = np.concatenate([clicks, no_clicks])
    # Zero-weight rows add nothing but cost; drop them.
    keep = weight > 0
    return np.vstack([x, x])[keep], y[keep], weight[keep]


def train_baseline(train: pd.DataFrame, encoder: AdEncoder) -> CtrModel:
    """A logistic regression on the same rows and encoding, as click/no-click pairs weighted by their counts, each
    column standardised by the training rows' weighted mean and deviation."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    _check_labelled(train, "training data")
    x, y, weight = _expanded(encoder.encode(train), train)
    # Unscaled, a numeric column in the millions (a budget in micros) made lbfgs stop within a few iterations,
    # without a warning, with that column's coefficient of the wrong sign (validation AUC 0.19 where the true CTR
    # is logistic in it): the gate then compared the forest with a broken baseline. The forest is scale-free.
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    fitted = model.fit(x, y, standardscaler__sample_weight=weight, logisticregression__sample_weight=weight)
    return CtrModel(encoder, fitted)


@dataclass(frozen=True)
class AdHistoryCtr:
    """The simplest CTR model, reported beside the two learned ones: each ad's own clicks over its impressions in
    the training rows, shrunk toward the overall CTR by a prior worth one expected click (``1 / overall``
    impressions), so an ad seen 3 times without a click is not rated 0; an ad with no training rows gets the
    overall CTR. It ignores every feature: where it wins, the features add nothing the history did not know."""

    rates: pd.Series  # ad_id -> smoothed CTR
    overall: float

    def predict(self, rows: pd.DataFrame) -> np.ndarray:
        return rows[ID_COLUMN].map(self.rates).fillna(self.overall).to_numpy(dtype=float)


def train_ad_history(train: pd.DataFrame) -> AdHistoryCtr:
    """``AdHistoryCtr`` of the training rows (``ad_id``, ``clicks``, ``impressions``)."""
    _check_labelled(train, "training data")
    per_ad = train.groupby(ID_COLUMN)[["clicks", "impressions"]].sum()
    overall = float(per_ad["clicks"].sum() / per_ad["impressions"].sum())
    return AdHistoryCtr((per_ad["clicks"] + 1.0) / (per_ad["impressions"] + 1.0 / overall), overall)


def predict_ctr(model: object, rows: pd.DataFrame) -> np.ndarray:
    """CTR for each row of ``rows`` (valid ads' spec columns; extra columns ignored), clipped to
    [1e-6, 1 - 1e-6]. ``model`` is a ``CtrModel``, or any object whose ``predict(rows)`` gives rates."""
    if not isinstance(model, CtrModel):
        ctr = model.predict(rows)
    elif len(rows) == 0:
        ctr = np.empty(0)
    elif hasattr(model.estimator, "predict_proba"):
        classes = list(model.estimator.classes_)
        ctr = model.estimator.predict_proba(model.encoder.encode(rows))[:, classes.index(1)]
    else:
        ctr = model.estimator.predict(model.encoder.encode(rows))
    return np.clip(np.asarray(ctr, dtype=float), CTR_CLIP, 1.0 - CTR_CLIP)


def calibration_error(
    ctr: np.ndarray, impressions: np.ndarray, clicks: np.ndarray, *, bins: int = CALIBRATION_BINS
) -> float:
    """Expected calibration error: impression-weighted mean of |observed - predicted CTR| over ``bins``
    impression-weighted quantile bins of the prediction."""
    ctr = np.asarray(ctr, dtype=float)
    weight = np.asarray(impressions, dtype=float)
    clicks = np.asarray(clicks, dtype=float)
    total = weight.sum()
    if total <= 0:
        raise ValueError("calibration error needs at least one impression")
    order = np.argsort(ctr, kind="stable")
    cumulative = np.cumsum(weight[order])
    quantiles = np.arange(1, bins) / bins * total
    edges = ctr[order][np.minimum(np.searchsorted(cumulative, quantiles), len(ctr) - 1)]
    # Bin by value, not by rank, so equal predictions always share a bin.
    bin_of = np.searchsorted(edges, ctr, side="left")
    observed = np.bincount(bin_of, weights=clicks, minlength=bins)
    predicted = np.bincount(bin_of, weights=weight * ctr, minlength=bins)
    # sum_b (W_b / W) * |clicks_b / W_b - sum(w p)_b / W_b| simplifies to this.
    return float(np.abs(observed - predicted).sum() / total)


def _weighted(ctr: np.ndarray, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, scores and weights of the click/no-click pairs of ``frame``'s rows (never expanded)."""
    clicks = frame["clicks"].to_numpy(dtype=float)
    impressions = frame["impressions"].to_numpy(dtype=float)
    y = np.concatenate([np.ones(len(frame)), np.zeros(len(frame))])
    return y, np.concatenate([ctr, ctr]), np.concatenate([clicks, impressions - clicks])


def evaluate(model: object, valid: pd.DataFrame) -> dict[str, float]:
    """``auc``, ``log_loss``, ``calibration_error`` and ``valid_impressions`` on ``valid``, every metric
    weighted per impression (click/no-click counts as sample weights, never expanded)."""
    from sklearn.metrics import log_loss, roc_auc_score

    _check_labelled(valid, "validation set")
    ctr = predict_ctr(model, valid)
    y, score, weight = _weighted(ctr, valid)
    impressions = valid["impressions"].to_numpy(dtype=float)
    return {
        "auc": float(roc_auc_score(y, score, sample_weight=weight)),
        "log_loss": float(log_loss(y, score, sample_weight=weight, labels=[0, 1])),
        "calibration_error": calibration_error(ctr, impressions, valid["clicks"].to_numpy(dtype=float)),
        "valid_impressions": float(impressions.sum()),
    }


def new_ad_rows(train: pd.DataFrame, valid: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``valid`` whose ad has no row in ``train``: ads first seen after the training cutoff."""
    return valid[~valid[ID_COLUMN].isin(train[ID_COLUMN])].reset_index(drop=True)


def evaluate_new_ads(model: object, baseline: object, train: pd.DataFrame, valid: pd.DataFrame) -> NewAdEvaluation:
    """Impression-weighted AUC of ``model`` and ``baseline`` on the same rows: ``new_ad_rows(train, valid)``.

    Not measurable (AUCs None, ``note`` says why) without such rows, with a single new ad, or when their
    impressions are all clicks or all non-clicks.
    """
    rows = new_ad_rows(train, valid)
    n_ads, impressions = int(rows[ID_COLUMN].nunique()), int(rows["impressions"].sum())
    clicks = int(rows["clicks"].sum())
    note = None
    if n_ads == 0:
        note = "no ads first seen after the training cutoff in the validation days"
    elif n_ads == 1:
        note = "a single ad first seen after the training cutoff: one ad cannot be ranked"
    elif clicks == 0:
        note = f"no clicks among the {impressions} impressions of ads first seen after the training cutoff"
    elif clicks == impressions:
        note = f"every one of the {impressions} impressions of ads first seen after the training cutoff was clicked"
    if note is not None:
        return NewAdEvaluation(None, None, n_ads, impressions, note)

    def auc(candidate: object) -> float:
        from sklearn.metrics import roc_auc_score

        y, score, weight = _weighted(predict_ctr(candidate, rows), rows)
        return float(roc_auc_score(y, score, sample_weight=weight))

    return NewAdEvaluation(auc(model), auc(baseline), n_ads, impressions)


def score_ads(model: object, ads: pd.DataFrame, ad_ids: Sequence[str]) -> tuple[pd.DataFrame, list[str]]:
    """``(scores, skipped)``: a frame of ``ad_id``, ``ctr`` in the order of ``ad_ids``, and the ids that
    could not be scored (not in ``ads`` or with invalid features), also in the order given.

    ``model`` is a ``CtrModel`` from the model store: its own spec and vocabularies encode ``ads`` (category
    values it never learned encode as all zeros). An ads table without a column of the model's spec, or with
    duplicate ids, is a ``ValueError``.
    """
    if not isinstance(model, CtrModel):
        raise TypeError(
            f"score_ads needs a CtrModel (an estimator with its feature encoding), got {type(model).__name__}: "
            "a model saved before feature specs existed must be trained again"
        )
    table, valid = _ad_table(ads, model.spec)
    requested = pd.Index([str(a) for a in ad_ids], name=ID_COLUMN)
    scorable = requested.isin(table.index[valid])
    rows = table[valid].reindex(requested[scorable])
    ctr = predict_ctr(model, rows)
    return pd.DataFrame({"ad_id": rows.index.to_numpy(dtype=object), "ctr": ctr}), requested[~scorable].tolist()
