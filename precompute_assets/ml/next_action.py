"""The next-action model: which action a user takes next, from the hour, the day, the last action, the actions
so far today and how long the session has lasted; a calibrated RandomForest beside two baselines.

Sessions: a user's events split where the pause exceeds ``SESSION_GAP_MS`` or a ``login`` starts anew. The label
of an event is the next action in its session (the last event of a session has none and is not a training row).
Features (``FEATURES``): local hour (and its sine and cosine), day of week, weekend, actions so far today (this
one included), session minutes so far, and the last action one-hot. Probabilities are over ``ACTIONS``.

Baselines on the same rows: ``most_frequent`` (the training label frequencies, for every row) and ``markov1``
(the training frequencies of the next action given the last one, add-one smoothed). ``evaluate`` gives top-1 and
top-3 accuracy and log-loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ..serving.events import ACTION_INDEX, ACTIONS

SESSION_GAP_MS = 30 * 60_000
FEATURES = [
    "hour",
    "hour_sin",
    "hour_cos",
    "day_of_week",
    "weekend",
    "actions_today",
    "session_minutes",
    *(f"last_{a}" for a in ACTIONS),
]
EPSILON = 1e-6  # probabilities are clipped to at least this before the log (and renormalised)


def event_features(events: pd.DataFrame, timezone: str = "UTC") -> pd.DataFrame:
    """Per event (``ts_ms``, ``user``, ``action``; any order, any extra columns kept) its features and
    ``next_action`` (None for the last event of a session); sorted by user and time."""
    frame = events.sort_values(["user", "ts_ms"], kind="stable", ignore_index=True)
    if frame.empty:
        return frame.assign(
            hour=pd.Series(dtype=float), day_of_week=pd.Series(dtype="int64"), actions_today=pd.Series(dtype="int64"),
            session_minutes=pd.Series(dtype=float), next_action=pd.Series(dtype=object),
        )  # fmt: skip
    ts = frame["ts_ms"].to_numpy(dtype=np.int64)
    local = pd.to_datetime(frame["ts_ms"], unit="ms", utc=True).dt.tz_convert(timezone)
    user = frame["user"].to_numpy(dtype=object)
    new_user = np.r_[True, user[1:] != user[:-1]]
    gap = np.r_[True, np.diff(ts) > SESSION_GAP_MS]
    new_session = new_user | gap | (frame["action"].to_numpy(dtype=object) == "login")
    session = np.cumsum(new_session)
    session_start = pd.Series(ts).groupby(session).transform("min").to_numpy()
    day = local.dt.strftime("%Y-%m-%d").to_numpy(dtype=object)
    next_action = frame.groupby(session)["action"].shift(-1)
    return frame.assign(
        hour=(local.dt.hour + local.dt.minute / 60.0).to_numpy(),
        day_of_week=local.dt.dayofweek.to_numpy(dtype=np.int64),
        actions_today=frame.groupby([user, day]).cumcount().to_numpy(dtype=np.int64) + 1,
        session_minutes=(ts - session_start) / 60_000.0,
        next_action=pd.Series([v if isinstance(v, str) else None for v in next_action], dtype=object),
    )


def latest_states(events: pd.DataFrame, timezone: str = "UTC") -> pd.DataFrame:
    """Each user's features at their latest event (one row per user): what predicts their next action now."""
    features = event_features(events, timezone)
    return features.groupby("user", sort=False).tail(1).reset_index(drop=True)


def feature_matrix(features: pd.DataFrame) -> np.ndarray:
    """``FEATURES`` as a float matrix (an unknown last action is all zeros in the one-hot)."""
    hour = features["hour"].to_numpy(dtype=float)
    dow = features["day_of_week"].to_numpy(dtype=float)
    onehot = np.zeros((len(features), len(ACTIONS)))
    codes = features["action"].map(ACTION_INDEX).to_numpy(dtype=float)
    known = ~np.isnan(codes)
    onehot[np.flatnonzero(known), codes[known].astype(int)] = 1.0
    return np.column_stack(
        [
            hour,
            np.sin(2 * np.pi * hour / 24),
            np.cos(2 * np.pi * hour / 24),
            dow,
            (dow >= 5).astype(float),
            features["actions_today"].to_numpy(dtype=float),
            features["session_minutes"].to_numpy(dtype=float),
            onehot,
        ]
    )


def labelled(features: pd.DataFrame) -> pd.DataFrame:
    """The rows with a next action in ``ACTIONS`` (training and evaluation rows)."""
    return features[features["next_action"].isin(ACTION_INDEX)].reset_index(drop=True)


def time_split(rows: pd.DataFrame, *, valid_fraction: float = 0.2) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The earliest rows for training, the latest ``valid_fraction`` (by event time) for validation."""
    if not 0 < valid_fraction < 1:
        raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
    ordered = rows.sort_values("ts_ms", kind="stable", ignore_index=True)
    cut = int(round(len(ordered) * (1 - valid_fraction)))
    train, valid = ordered.iloc[:cut], ordered.iloc[cut:]
    if len(train) < 50 or len(valid) < 10:
        raise ValueError(f"too few labelled rows for a time split: {len(train)} train, {len(valid)} validation")
    if train["next_action"].nunique() < 2:
        raise ValueError("the training rows hold fewer than two distinct next actions")
    return train.reset_index(drop=True), valid.reset_index(drop=True)


@dataclass
class NextActionModel:
    """A fitted classifier with the action names of its classes; ``predict_proba`` is over ``ACTIONS``."""

    estimator: Any
    classes: list[str]
    timezone: str = "UTC"
    params: dict = field(default_factory=dict)

    def predict_proba(self, features: pd.DataFrame) -> np.ndarray:
        out = np.zeros((len(features), len(ACTIONS)))
        if len(features):
            proba = self.estimator.predict_proba(feature_matrix(features))
            out[:, [ACTION_INDEX[c] for c in self.classes]] = proba
        return out


def train_next_action_model(
    train: pd.DataFrame,
    *,
    timezone: str = "UTC",
    n_estimators: int = 100,
    max_depth: int = 10,
    min_samples_leaf: int = 10,
    calibration: str = "isotonic",
    cv: int = 3,
    seed: int = 0,
) -> NextActionModel:
    """A RandomForest wrapped in ``CalibratedClassifierCV`` (``calibration``: ``isotonic`` or ``sigmoid``)."""
    # Here, not with the module: the Definitions import this module, and scikit-learn costs them about a second.
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.ensemble import RandomForestClassifier

    forest = RandomForestClassifier(
        n_estimators=n_estimators, max_depth=max_depth, min_samples_leaf=min_samples_leaf, random_state=seed, n_jobs=1
    )
    counts = train["next_action"].value_counts()
    # A next action seen once cannot be split into calibration folds (CalibratedClassifierCV refuses the whole fit):
    # it is left out, and the model gives it no probability (``evaluate`` clips it, as for an action never seen).
    rare = sorted(str(action) for action in counts.index[counts < 2])
    if rare:
        train, counts = train[~train["next_action"].isin(rare)], counts[counts >= 2]
    if len(counts) < 2:
        raise ValueError(f"fewer than 2 next actions have 2 or more training rows ({counts.to_dict()}, once: {rare})")
    folds = max(2, min(cv, int(counts.min())))
    estimator = CalibratedClassifierCV(forest, method=calibration, cv=folds)
    estimator.fit(feature_matrix(train), train["next_action"].to_numpy(dtype=object))
    params = {"n_estimators": n_estimators, "max_depth": max_depth, "min_samples_leaf": min_samples_leaf,
              "calibration": calibration, "cv": folds, "left_out_once_seen": rare}  # fmt: skip
    return NextActionModel(estimator, [str(c) for c in estimator.classes_], timezone, params)


def most_frequent_baseline(train: pd.DataFrame, rows: pd.DataFrame) -> np.ndarray:
    """The training label frequencies (add-one smoothed over the actions seen as labels), for every row."""
    freq = _smoothed(train["next_action"].map(ACTION_INDEX).to_numpy(dtype=int), _label_mask(train))
    return np.tile(freq, (len(rows), 1))


def markov_baseline(train: pd.DataFrame, rows: pd.DataFrame) -> np.ndarray:
    """P(next action | last action) from the training rows, add-one smoothed over the labels seen."""
    mask = _label_mask(train)
    last = train["action"].map(ACTION_INDEX).to_numpy(dtype=int)
    nxt = train["next_action"].map(ACTION_INDEX).to_numpy(dtype=int)
    table = np.vstack([_smoothed(nxt[last == a], mask) for a in range(len(ACTIONS))])
    codes = rows["action"].map(ACTION_INDEX).fillna(0).to_numpy(dtype=int)
    return table[codes]


def _label_mask(train: pd.DataFrame) -> np.ndarray:
    mask = np.zeros(len(ACTIONS), dtype=bool)
    mask[train["next_action"].map(ACTION_INDEX).dropna().astype(int).unique()] = True
    return mask


def _smoothed(labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    counts = np.bincount(labels, minlength=len(ACTIONS)).astype(float) + mask
    return counts / counts.sum()


def evaluate(proba: np.ndarray, rows: pd.DataFrame) -> dict[str, float]:
    """``top1``, ``top3`` accuracy and ``log_loss`` of ``proba`` (over ``ACTIONS``) on ``rows``' next actions."""
    y = rows["next_action"].map(ACTION_INDEX).to_numpy(dtype=int)
    clipped = np.clip(proba, EPSILON, 1.0)
    clipped /= clipped.sum(axis=1, keepdims=True)
    ranked = np.argsort(-proba, axis=1, kind="stable")
    return {
        "top1": float(np.mean(ranked[:, 0] == y)),
        "top3": float(np.mean((ranked[:, :3] == y[:, None]).any(axis=1))),
        "log_loss": float(-np.mean(np.log(clipped[np.arange(len(y)), y]))),
    }


def compare(
    model: NextActionModel, train: pd.DataFrame, valid: pd.DataFrame
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """The model's metrics and each baseline's (``most_frequent``, ``markov1``) on the same validation rows."""
    metrics = evaluate(model.predict_proba(valid), valid)
    baselines = {
        "most_frequent": evaluate(most_frequent_baseline(train, valid), valid),
        "markov1": evaluate(markov_baseline(train, valid), valid),
    }
    return metrics, baselines


def beats_baselines(metrics: dict[str, float], baselines: dict[str, dict[str, float]]) -> tuple[bool, str]:
    """Whether the model's log-loss is below the better baseline's (the one with the lower log-loss), and that
    baseline's name. Log-loss decides because the product is calibrated probabilities (top-1/3 are reported)."""
    best = min(baselines, key=lambda name: baselines[name]["log_loss"])
    return metrics["log_loss"] < baselines[best]["log_loss"], best


def probabilities(model: NextActionModel, states: pd.DataFrame) -> list[dict[str, float]]:
    """Per row of ``states`` (``latest_states``) the next-action probabilities as ``{action: p}``, rounded."""
    proba = model.predict_proba(states)
    return [{a: round(float(p), 4) for a, p in zip(ACTIONS, row, strict=True)} for row in proba]
