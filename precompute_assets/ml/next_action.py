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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ..serving.events import ACTION_INDEX, ACTIONS
from ..serving.querylog import MAX_CLOCK_AHEAD_MS

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
    """Per event (``ts_ms``, ``user``, ``action``; any order, any extra columns kept) its features,
    ``next_action`` (None for the last event of a session) and ``session``, the number of the user's session among
    these events (1 for the first); sorted by user and time."""
    frame = events.sort_values(["user", "ts_ms"], kind="stable", ignore_index=True)
    if frame.empty:
        return frame.assign(
            hour=pd.Series(dtype=float), day_of_week=pd.Series(dtype="int64"), day=pd.Series(dtype=object),
            actions_today=pd.Series(dtype="int64"), session_start_ms=pd.Series(dtype="int64"),
            session_minutes=pd.Series(dtype=float), next_action=pd.Series(dtype=object),
            session=pd.Series(dtype="int64"),
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
        day=day,
        actions_today=frame.groupby([user, day]).cumcount().to_numpy(dtype=np.int64) + 1,
        session_start_ms=session_start,
        session_minutes=(ts - session_start) / 60_000.0,
        next_action=pd.Series([v if isinstance(v, str) else None for v in next_action], dtype=object),
        session=session - session[np.flatnonzero(new_user)][np.cumsum(new_user) - 1] + 1,
    )


@dataclass(frozen=True)
class UserState:
    """A user's latest event and what their events so far make of it: the inputs of that event's features. A sensor
    that sees a few events at a time carries it from tick to tick, so that its states are those of the user's whole
    day, as ``latest_states`` over all of them gives."""

    stream_id: str  # the newest event counted (``MILLISECONDS-SEQUENCE``): it and the ones before are counted
    ts_ms: int  # the latest event's time (events arrive late: not always the newest one's)
    action: str
    tenant: str | None
    session_start_ms: int
    actions_today: int  # of the local day of ``ts_ms``

    FIELDS = (b"id", b"ts", b"action", b"tenant", b"start", b"today")  # as Redis keeps them, in this order

    def fields(self) -> dict[str, str]:
        """As the hash fields Redis keeps (``serving.events.write_user_states``; no tenant: an empty one)."""
        values = (self.stream_id, self.ts_ms, self.action, self.tenant or "", self.session_start_ms, self.actions_today)
        return {name.decode(): str(value) for name, value in zip(self.FIELDS, values, strict=True)}

    def whole_since(self, since_ms: int, timezone: str) -> bool:
        """Whether events from after ``since_ms`` on hold this state's whole day and session: its local day (in
        ``timezone``) began after then, and its session over ``SESSION_GAP_MS`` after then. A state carried on over
        every event since counted all of them; a session that began sooner may go on one of events before then,
        which a state started afresh (none stored, or one lost) did not see. An event that arrived by then may carry
        a time up to ``MAX_CLOCK_AHEAD_MS`` later (a client's clock ahead): both bounds allow for it."""
        seen_until = since_ms + MAX_CLOCK_AHEAD_MS
        return seen_until < day_start_ms(self.ts_ms, timezone) and seen_until + SESSION_GAP_MS < self.session_start_ms

    @classmethod
    def parse(cls, values: Sequence[bytes | None]) -> UserState | None:
        """The state from its ``FIELDS`` read back (``HMGET``); None for one that is incomplete or malformed (the
        user starts afresh)."""
        if len(values) != len(cls.FIELDS) or any(value is None for value in values):
            return None
        try:
            entry, ts, action, tenant, start, today = (value.decode() for value in values)
            state = cls(entry, int(ts), action, tenant or None, int(start), int(today))
        except (ValueError, UnicodeDecodeError):
            return None
        valid = _id_tuple(state.stream_id) is not None and state.session_start_ms <= state.ts_ms
        return state if valid and state.actions_today >= 1 and state.action in ACTION_INDEX else None


def _id_tuple(stream_id: str) -> tuple[int, int] | None:
    parts = stream_id.split("-")
    if len(parts) != 2 or not all(p.isascii() and p.isdigit() for p in parts):
        return None
    return int(parts[0]), int(parts[1])


def day_start_ms(ts_ms: int, timezone: str) -> int:
    """The first moment of the local day (in ``timezone``) of ``ts_ms``: its midnight, or, where a clock change skips
    midnight (daylight saving time starting at 00:00, in Santiago or Beirut), the first time that exists; where
    midnight happens twice, the first."""
    local = pd.Timestamp(ts_ms, unit="ms", tz="UTC").tz_convert(timezone)
    midnight = pd.Timestamp(local.date()).tz_localize(timezone, nonexistent="shift_forward", ambiguous=True)
    return int(midnight.timestamp() * 1000)


def local_days(ts_ms: Sequence[int] | np.ndarray, timezone: str) -> np.ndarray:
    """The local day (``YYYY-MM-DD``) of each time, as ``event_features`` counts a user's actions today."""
    times = pd.to_datetime(pd.Series(np.asarray(ts_ms, dtype=np.int64)), unit="ms", utc=True).dt.tz_convert(timezone)
    return times.dt.strftime("%Y-%m-%d").to_numpy(dtype=object)


def latest_states(
    events: pd.DataFrame, timezone: str = "UTC", prior: Mapping[str, UserState] | None = None
) -> pd.DataFrame:
    """Each user's features at their latest event (one row per user): what predicts their next action now.

    ``prior``: the states the users' earlier events left (``UserState``), when ``events`` are only the latest ones
    (with a ``stream_id`` column). A session goes on across them as within them (no pause over ``SESSION_GAP_MS``,
    no ``login``), and the actions of the same local day add up. An event at or before a user's ``prior`` ID was
    counted already (a tick read again after a crash) and is not counted twice; one older than the ``prior`` event
    (it arrived late) counts in its day, and is never the latest or a session's start. A user with no other event
    gets the row of the stored state. Each row's ``stream_id`` is the newest of the user's events counted:
    ``carried_states`` gives the states to keep for the next events."""
    if not prior or "stream_id" not in events.columns:
        features = event_features(events, timezone)
        latest = features.groupby("user", sort=False).tail(1).reset_index(drop=True)
        if "stream_id" not in events.columns or latest.empty:
            return latest
        # the latest event by time need not be the newest counted: one that arrived after it is counted too, and a
        # tick read again after a crash counted it twice
        newest: dict[str, tuple[int, int]] = {}
        for user, entry in zip(events["user"].tolist(), events["stream_id"].tolist(), strict=True):
            newest[user] = max(newest.get(user, (0, 0)), _id_tuple(entry) or (0, 0))
        return latest.assign(stream_id=[f"{ms}-{seq}" for ms, seq in map(newest.__getitem__, latest["user"])])
    users, times = events["user"].tolist(), events["ts_ms"].tolist()
    ids = [_id_tuple(entry) or (0, 0) for entry in events["stream_id"].tolist()]
    known = [prior.get(user) for user in users]
    counted = np.array([k is not None and i <= _id_tuple(k.stream_id) for k, i in zip(known, ids, strict=True)])
    late = ~counted & np.array([k is not None and t < k.ts_ms for k, t in zip(known, times, strict=True)], dtype=bool)
    fresh = ~counted & ~late
    newest: dict[str, tuple[int, int]] = {}
    for user, entry, is_counted in zip(users, ids, counted.tolist(), strict=True):
        if not is_counted and entry > newest.get(user, (0, 0)):
            newest[user] = entry
    features = event_features(events[fresh], timezone)
    latest = features.groupby("user", sort=False).tail(1).reset_index(drop=True)
    if not latest.empty:
        latest = _gone_on(latest, features, prior, timezone)
    seen = set(latest["user"].tolist())
    stored = {user: prior[user] for user in dict.fromkeys(np.asarray(users, dtype=object)[~fresh]) if user not in seen}
    if stored:
        latest = pd.concat([latest, state_rows(stored, timezone)], ignore_index=True)
    if late.any():  # late events count in their own day
        days = local_days(np.asarray(times, dtype=np.int64)[late], timezone)
        per_day = (
            pd.Series(1, index=pd.MultiIndex.from_arrays([np.asarray(users, dtype=object)[late], days]))
            .groupby(level=[0, 1])
            .sum()
        )
        extra = [per_day.get((user, day), 0) for user, day in zip(latest["user"], latest["day"], strict=True)]
        latest = latest.assign(actions_today=latest["actions_today"].to_numpy(dtype=np.int64) + np.array(extra))
    entries = [
        max(newest.get(user, (0, 0)), _id_tuple(entry) or (0, 0))
        for user, entry in zip(latest["user"], latest["stream_id"], strict=True)
    ]
    return latest.assign(stream_id=[f"{ms}-{seq}" for ms, seq in entries])


def _gone_on(
    latest: pd.DataFrame, features: pd.DataFrame, prior: Mapping[str, UserState], timezone: str
) -> pd.DataFrame:
    """``latest`` (each user's latest row of ``features``) with the sessions and days of ``prior`` carried on."""
    first = features.groupby("user", sort=False).head(1).set_index("user").loc[latest["user"]]
    known = [prior.get(user) for user in latest["user"].tolist()]
    has = np.array([state is not None for state in known], dtype=bool)
    last_ts = np.array([state.ts_ms if state else 0 for state in known], dtype=np.int64)
    first_ts = first["ts_ms"].to_numpy(dtype=np.int64)
    goes_on = (
        has
        # no new session within these events: a login in the same millisecond as the first event starts one too
        & (latest["session"].to_numpy(dtype=np.int64) == 1)
        & (first["action"].to_numpy(dtype=object) != "login")
        & (first_ts - last_ts <= SESSION_GAP_MS)
    )
    before = np.array([state.session_start_ms if state else 0 for state in known], dtype=np.int64)
    start = np.where(goes_on, before, latest["session_start_ms"].to_numpy(dtype=np.int64))
    same_day = has & (latest["day"].to_numpy(dtype=object) == local_days(last_ts, timezone))
    earlier = np.array([state.actions_today if state else 0 for state in known], dtype=np.int64)
    return latest.assign(
        session_start_ms=start,
        session_minutes=(latest["ts_ms"].to_numpy(dtype=np.int64) - start) / 60_000.0,
        actions_today=latest["actions_today"].to_numpy(dtype=np.int64) + np.where(same_day, earlier, 0),
    )


def state_rows(states: Mapping[str, UserState], timezone: str) -> pd.DataFrame:
    """The feature rows of stored states (user -> state): their events' hour and day, with the state's session and
    count."""
    users = list(states)
    events = pd.DataFrame(
        {
            "stream_id": [states[u].stream_id for u in users], "ts_ms": [states[u].ts_ms for u in users],
            "user": users, "action": [states[u].action for u in users], "tenant": [states[u].tenant for u in users],
        }
    )  # fmt: skip
    rows = event_features(events, timezone).set_index("user").loc[users].reset_index()
    start = np.array([states[u].session_start_ms for u in users], dtype=np.int64)
    return rows.assign(
        session_start_ms=start,
        session_minutes=(rows["ts_ms"].to_numpy(dtype=np.int64) - start) / 60_000.0,
        actions_today=np.array([states[u].actions_today for u in users], dtype=np.int64),
    )


def carried_states(states: pd.DataFrame) -> dict[str, UserState]:
    """``latest_states``'s rows (from events with a ``stream_id`` column) as the states the next events go on from."""
    tenants = states["tenant"].tolist() if "tenant" in states.columns else [None] * len(states)
    columns = ("user", "stream_id", "ts_ms", "action", "session_start_ms", "actions_today")
    return {
        user: UserState(
            entry, int(ts), action, tenant if isinstance(tenant, str) and tenant else None, int(start), int(n)
        )  # fmt: skip
        for (user, entry, ts, action, start, n), tenant in zip(
            zip(*(states[c].tolist() for c in columns), strict=True), tenants, strict=True
        )
    }


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
