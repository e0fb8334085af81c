"""The ad feature set: which columns of the user's ad data the CTR model reads, and what makes a row valid.

The columns are configuration (the synthetic workload is one data set that uses the defaults); the
categorical vocabularies are learned from the training data by the model (``AdEncoder``), not listed here.
Pure pandas.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..serving.keys import KEY_BRACES, KEY_CONTROL_CHARACTERS, KEY_LONE_SURROGATES, MAX_KEY_LENGTH

ID_COLUMN = "ad_id"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
# The deployment's ad feature set, as comma-separated column names (see ``spec_from_env``).
ENV_AD_NUMERIC = "PRECOMPUTE_AD_NUMERIC"
ENV_AD_CATEGORICAL = "PRECOMPUTE_AD_CATEGORICAL"
ENV_AD_LOG_SCALED = "PRECOMPUTE_AD_LOG_SCALED"


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


def require_ad_columns(ads: pd.DataFrame, spec: AdFeatureSpec, columns: Sequence[str] | None = None) -> None:
    """Raise ``ValueError`` naming the ``columns`` of ``spec`` (default: all) that the ads table lacks, and the
    settings that chose them: a feature set configured in one shell and not in the one that runs Dagster."""
    missing = [column for column in (spec.columns if columns is None else columns) if column not in ads.columns]
    if missing:
        raise ValueError(
            f"ads table is missing columns {missing}; it has {list(ads.columns)} (the feature columns are the lake "
            "resource's ad_numeric and ad_categorical: PRECOMPUTE_AD_NUMERIC, PRECOMPUTE_AD_CATEGORICAL)"
        )


def feature_problems(ads: pd.DataFrame, spec: AdFeatureSpec) -> pd.Series:
    """One reason per row of ``ads`` (aligned with its index), or None where the row is valid.

    A row is invalid when its id is blank, longer than a cache key may be or holds control characters, braces or lone
    surrogates (``serving.keys.check_key``), a numeric feature is not a finite number (or is negative where it is
    log-scaled), or a categorical feature is missing or blank. The first problem of a row is reported.
    """
    require_ad_columns(ads, spec)
    problems = pd.Series([None] * len(ads), index=ads.index, dtype=object)

    def flag(mask: np.ndarray, reason: str) -> None:
        fresh = mask & problems.isna().to_numpy()
        problems[fresh] = reason

    ids = ads[ID_COLUMN]
    try:
        text = ids.astype(str)
    except UnicodeEncodeError:  # a lone surrogate (JSON's "\ud800"): pandas' Arrow strings cannot hold it
        text = pd.Series([str(v) for v in ids], index=ids.index, dtype=object)
    flag((ids.isna() | (text.str.strip() == "")).to_numpy(), f"{ID_COLUMN} is missing")
    # check_key's rules (serving.keys), each with its own reason: an id no cache key may be is never published
    flag((text.str.len() > MAX_KEY_LENGTH).to_numpy(), f"{ID_COLUMN} is longer than {MAX_KEY_LENGTH} characters")
    flag(_has_any(text, KEY_CONTROL_CHARACTERS), f"{ID_COLUMN} has control characters")
    # a brace in a cache key would pick its Redis Cluster slot: serving.keys refuses it, so publishing such an id
    # (a braced GUID) failed the whole ctr_cache, and a campaign holding one could never be warmed
    flag(_has_any(text, KEY_BRACES), f"{ID_COLUMN} has a brace ('{{' or '}}')")
    flag(_has_any(text, KEY_LONE_SURROGATES), f"{ID_COLUMN} is not valid UTF-8")
    for column in spec.numeric:
        values = pd.to_numeric(ads[column], errors="coerce").to_numpy(dtype=float)
        flag(~np.isfinite(values), f"{column} is not a finite number")
        if column in spec.log_scaled:
            with np.errstate(invalid="ignore"):
                flag(values < 0, f"{column} is negative")
    for column in spec.categorical:
        flag(category_labels(ads[column]).isna().to_numpy(), f"{column} is missing")
    return problems


def _has_any(text: pd.Series, ranges: str) -> np.ndarray:
    """Where ``text`` holds a character of the character-class ``ranges`` (``serving.keys.KEY_BRACES``...)."""
    return text.str.contains(f"[{ranges}]", regex=True).to_numpy(dtype=bool)


def parse_names(names: str | Sequence[str] | None) -> tuple[str, ...]:
    """Column names from a comma-separated string (``"bid, text_len"``) or a sequence; blanks are dropped."""
    if names is None:
        return ()
    parts = names.split(",") if isinstance(names, str) else names
    return tuple(name.strip() for name in parts if name and name.strip())


def spec_from_names(
    numeric: str | Sequence[str], categorical: str | Sequence[str], log_scaled: str | Sequence[str] | None = None
) -> AdFeatureSpec:
    """An ``AdFeatureSpec`` from comma-separated names (as environment variables and resource fields hold them).

    ``log_scaled=None`` means the default log-scaled columns (bid, text_len) that are among ``numeric``.
    """
    numeric_names = parse_names(numeric)
    if log_scaled is None:
        log_names = tuple(name for name in AdFeatureSpec().log_scaled if name in numeric_names)
    else:
        log_names = parse_names(log_scaled)
    return AdFeatureSpec(numeric=numeric_names, categorical=parse_names(categorical), log_scaled=log_names)


def spec_from_env(environ: Mapping[str, str] | None = None) -> AdFeatureSpec:
    """The deployment's ad feature set from ``PRECOMPUTE_AD_NUMERIC``, ``PRECOMPUTE_AD_CATEGORICAL`` and
    ``PRECOMPUTE_AD_LOG_SCALED`` (``os.environ`` by default), as the Definitions read it; an unset variable means
    the default (unset log-scaling: the default log-scaled columns that are numeric, a blank one: none).
    ``ValueError`` naming the problem if the set is malformed. No Dagster: services and tools use it too."""
    env = os.environ if environ is None else environ
    default = AdFeatureSpec()
    return spec_from_names(
        env.get(ENV_AD_NUMERIC, ",".join(default.numeric)),
        env.get(ENV_AD_CATEGORICAL, ",".join(default.categorical)),
        env.get(ENV_AD_LOG_SCALED),
    )


def spec_dict(spec: AdFeatureSpec) -> dict[str, list[str]]:
    """The spec as plain lists, for metadata and JSON output."""
    return {"numeric": list(spec.numeric), "categorical": list(spec.categorical), "log_scaled": list(spec.log_scaled)}


def _number_label(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def category_labels(values: pd.Series) -> pd.Series:
    """Categorical values as text labels (object dtype): numbers without a trailing ``.0`` (``7``, ``7.0`` and
    ``"7"`` are one category), text stripped; missing, blank or non-finite values are None."""
    if isinstance(values.dtype, pd.CategoricalDtype):  # label the categories once, not every row
        labels = category_labels(pd.Series(values.cat.categories, dtype=values.cat.categories.dtype))
        codes = values.cat.codes.to_numpy()
        out = np.append(labels.to_numpy(dtype=object), None)[np.where(codes >= 0, codes, len(labels))]
        return pd.Series(out, index=values.index, dtype=object)
    if pd.api.types.is_bool_dtype(values.dtype):
        return pd.Series(values.astype(str).to_numpy(dtype=object), index=values.index, dtype=object)
    if pd.api.types.is_numeric_dtype(values.dtype):
        numbers = values.to_numpy(dtype=float, na_value=np.nan)
        labels = np.full(len(numbers), None, dtype=object)
        finite = np.isfinite(numbers)
        integral = finite & (numbers == np.round(numbers)) & (np.abs(numbers) < 2**53)
        labels[integral] = numbers[integral].astype(np.int64).astype(str).astype(object)
        rest = np.flatnonzero(finite & ~integral)
        labels[rest] = [repr(float(v)) for v in numbers[rest]]
        return pd.Series(labels, index=values.index, dtype=object)
    if isinstance(values.dtype, pd.StringDtype):  # text only: vectorised
        text = values.str.strip()
        text = text.where(text.notna() & (text != ""), None)
        return pd.Series(text.to_numpy(dtype=object, na_value=None), index=values.index, dtype=object)

    def label(value: object) -> str | None:
        if value is None or (isinstance(value, float) and not np.isfinite(value)) or value is pd.NA:
            return None
        if isinstance(value, bool | np.bool_):
            return str(bool(value))
        if isinstance(value, int | float | np.integer | np.floating):
            return _number_label(float(value))
        text = str(value).strip()
        return text or None

    return pd.Series([label(v) for v in values.tolist()], index=values.index, dtype=object)


def clean_ad_columns(ads: pd.DataFrame, spec: AdFeatureSpec) -> pd.DataFrame:
    """The spec's columns of ``ads``: numeric ones as floats (NaN where not a number), categorical ones as labels
    (see ``category_labels``) in a pandas ``category`` column. Same index as ``ads``; validity is
    ``feature_problems``' job."""
    require_ad_columns(ads, spec, spec.columns[1:])
    columns = {name: pd.to_numeric(ads[name], errors="coerce").astype(float) for name in spec.numeric}
    columns |= {name: category_labels(ads[name]).astype("category") for name in spec.categorical}
    return pd.DataFrame(columns, index=ads.index)


@dataclass(frozen=True)
class AdEncoder:
    """The model's input encoding, learned from training ads: numeric columns as they are (``log1p`` where
    log-scaled), each categorical column one-hot over its vocabulary.

    A value outside the vocabulary (unseen in training, or folded because it was rare) encodes as all zeros in
    its column's one-hot block: the model then treats the ad like an average one of its other features.
    """

    spec: AdFeatureSpec
    vocabularies: dict[str, tuple[str, ...]]

    @classmethod
    def fit(
        cls, rows: pd.DataFrame, spec: AdFeatureSpec, *, min_ads: int = 1, max_values: int | None = None
    ) -> AdEncoder:
        """Vocabularies from the distinct ads (``ad_id``) in ``rows``: a value is learned when at least ``min_ads``
        ads have it, at most ``max_values`` per column (the most common; ties by label)."""
        if min_ads < 1 or (max_values is not None and max_values < 0):
            raise ValueError(f"need min_ads >= 1 and max_values >= 0, got {min_ads} and {max_values}")
        vocabularies = {}
        for column in spec.categorical:
            per_ad = pd.DataFrame({"ad": rows[ID_COLUMN].astype(str), "label": category_labels(rows[column])})
            per_ad = per_ad.dropna().drop_duplicates()
            counts = per_ad.groupby("label")["ad"].size()
            counts = counts[counts >= min_ads]
            ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:max_values]
            vocabularies[column] = tuple(sorted(label for label, _ in ranked))
        return cls(spec, vocabularies)

    @property
    def feature_names(self) -> list[str]:
        """Names of the encoded columns, in order: numeric (``log1p_`` prefixed where scaled), then one-hots."""
        numeric = [f"log1p_{c}" if c in self.spec.log_scaled else c for c in self.spec.numeric]
        return numeric + [f"{c}={value}" for c in self.spec.categorical for value in self.vocabularies[c]]

    def encode(self, rows: pd.DataFrame) -> np.ndarray:
        """The encoded matrix of ``rows`` (valid rows: see ``feature_problems``), one row each."""
        clean = clean_ad_columns(rows, self.spec)
        blocks = []
        for column in self.spec.numeric:
            values = clean[column].to_numpy(dtype=float)
            if column in self.spec.log_scaled:
                with np.errstate(invalid="ignore"):
                    values = np.log1p(values)
            blocks.append(values[:, None])
        for column in self.spec.categorical:
            vocabulary = self.vocabularies[column]
            codes = pd.Categorical(clean[column], categories=list(vocabulary)).codes
            one_hot = np.zeros((len(rows), len(vocabulary)))
            known = np.flatnonzero(codes >= 0)
            one_hot[known, codes[known]] = 1.0
            blocks.append(one_hot)
        return np.hstack(blocks) if blocks else np.empty((len(rows), 0))

    def unseen(self, rows: pd.DataFrame) -> dict[str, int]:
        """Per categorical column, how many of ``rows`` have a value outside its vocabulary (encoded as zeros)."""
        clean = clean_ad_columns(rows, self.spec)
        return {c: int((~clean[c].isin(self.vocabularies[c]) & clean[c].notna()).sum()) for c in self.spec.categorical}

    def describe(self) -> dict[str, object]:
        """The spec and vocabulary sizes, JSON-ready (for metadata)."""
        return {**spec_dict(self.spec), "vocabulary_sizes": {c: len(v) for c, v in self.vocabularies.items()}}
