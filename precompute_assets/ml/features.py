"""The ad feature set: which columns of the user's ad data the CTR model reads, and what makes a row valid.

The columns are configuration (the synthetic workload is one data set that uses the defaults); the
categorical vocabularies are learned from the training data by the model, not listed here. Pure pandas.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

ID_COLUMN = "ad_id"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


@dataclass(frozen=True)
class AdFeatureSpec:
    """Numeric and categorical ad columns. ``log_scaled`` numeric columns must be >= 0 (``log1p`` is applied)."""

    numeric: tuple[str, ...] = ("quality", "bid", "text_len")
    categorical: tuple[str, ...] = ("category",)
    log_scaled: tuple[str, ...] = ("bid", "text_len")

    def __post_init__(self) -> None:
        names = [*self.numeric, *self.categorical]
        bad = [name for name in names if not _NAME.fullmatch(name) or name == ID_COLUMN]
        if bad:
            raise ValueError(f"feature column names must be identifiers other than {ID_COLUMN!r}: {bad}")
        if len(set(names)) != len(names):
            raise ValueError(f"a feature column is listed twice: {names}")
        if not names:
            raise ValueError("the feature set is empty: name at least one numeric or categorical column")
        stray = sorted(set(self.log_scaled) - set(self.numeric))
        if stray:
            raise ValueError(f"log_scaled columns must be numeric columns: {stray}")

    @property
    def columns(self) -> list[str]:
        """The columns an ads table must have: the id, then every feature."""
        return [ID_COLUMN, *self.numeric, *self.categorical]


def missing_columns(frame: pd.DataFrame, spec: AdFeatureSpec) -> list[str]:
    """Columns of ``spec`` that ``frame`` lacks (a wrong schema: the whole table is refused)."""
    return [column for column in spec.columns if column not in frame.columns]


def feature_problems(ads: pd.DataFrame, spec: AdFeatureSpec) -> pd.Series:
    """One reason per row of ``ads`` (aligned with its index), or None where the row is valid.

    A row is invalid when its id is blank, a numeric feature is not a finite number (or is negative where it
    is log-scaled), or a categorical feature is missing or blank. The first problem of a row is reported.
    """
    missing = missing_columns(ads, spec)
    if missing:
        raise ValueError(f"ads table is missing columns {missing}; it has {list(ads.columns)}")
    problems = pd.Series([None] * len(ads), index=ads.index, dtype=object)

    def flag(mask: np.ndarray, reason: str) -> None:
        fresh = mask & problems.isna().to_numpy()
        problems[fresh] = reason

    ids = ads[ID_COLUMN]
    flag((ids.isna() | (ids.astype(str).str.strip() == "")).to_numpy(), f"{ID_COLUMN} is missing")
    for column in spec.numeric:
        values = pd.to_numeric(ads[column], errors="coerce").to_numpy(dtype=float)
        flag(~np.isfinite(values), f"{column} is not a finite number")
        if column in spec.log_scaled:
            with np.errstate(invalid="ignore"):
                flag(values < 0, f"{column} is negative")
    for column in spec.categorical:
        values = ads[column]
        flag((values.isna() | (values.astype(str).str.strip() == "")).to_numpy(), f"{column} is missing")
    return problems
