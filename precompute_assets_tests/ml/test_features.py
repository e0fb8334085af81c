"""The ad feature set as configuration: the spec, what makes an ad row valid, labels and the learned encoding."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from precompute_assets.ml.features import (
    AdEncoder,
    AdFeatureSpec,
    category_labels,
    clean_ad_columns,
    feature_problems,
    parse_names,
    require_ad_columns,
    spec_dict,
    spec_from_names,
)
from precompute_assets.serving.keys import MAX_KEY_LENGTH, check_key
from precompute_assets.workload.ads import make_ads


def ads_frame(**columns) -> pd.DataFrame:
    base = {"ad_id": ["a", "b", "c"], "quality": [0.2, 0.5, 0.9], "bid": [1.0, 2.0, 0.5],
            "text_len": [10, 50, 120], "category": [3, 3, 7]}  # fmt: skip
    return pd.DataFrame({**base, **columns})


def test_the_default_spec_is_the_synthetic_workload_and_it_is_all_valid() -> None:
    spec = AdFeatureSpec()
    assert spec.columns == ["ad_id", "quality", "bid", "text_len", "category"]
    ads = make_ads(200, days=3)
    require_ad_columns(ads, spec)  # raises nothing
    assert feature_problems(ads, spec).isna().all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"numeric": ("ad_id",)}, "identifiers other than 'ad_id'"),
        ({"numeric": ("bad name",)}, "identifiers"),
        ({"numeric": ("x",), "categorical": ("x",), "log_scaled": ()}, "listed twice"),
        ({"numeric": (), "categorical": (), "log_scaled": ()}, "empty"),
        ({"numeric": ("x",), "log_scaled": ("y",)}, "log_scaled columns must be numeric"),
    ],
)
def test_a_malformed_spec_is_refused(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        AdFeatureSpec(**kwargs)


def test_spec_from_comma_separated_names() -> None:
    assert parse_names(" price, ,age ") == ("price", "age")
    assert parse_names(None) == () and parse_names(["a", " b"]) == ("a", "b")
    assert spec_from_names("quality,bid,text_len", "category") == AdFeatureSpec()
    own = spec_from_names("price,bid", "brand, device")
    # Unset log-scaling keeps the default log-scaled columns that are still numeric features.
    assert own == AdFeatureSpec(numeric=("price", "bid"), categorical=("brand", "device"), log_scaled=("bid",))
    assert spec_from_names("price", "brand", "").log_scaled == ()
    assert spec_from_names("price", "", "price").categorical == ()
    assert spec_dict(own) == {"numeric": ["price", "bid"], "categorical": ["brand", "device"], "log_scaled": ["bid"]}


def test_a_spec_naming_a_column_the_data_lacks_is_a_schema_error() -> None:
    spec = AdFeatureSpec(numeric=("quality", "price"), categorical=("brand",), log_scaled=())
    ads = ads_frame()
    with pytest.raises(ValueError, match=r"missing columns \['price', 'brand'\].*PRECOMPUTE_AD_NUMERIC"):
        require_ad_columns(ads, spec)
    with pytest.raises(ValueError, match=r"missing columns \['price', 'brand'\]"):
        feature_problems(ads, spec)
    with pytest.raises(ValueError, match=r"missing columns \['price', 'brand'\]"):
        clean_ad_columns(ads, spec)


def test_every_bad_value_is_named_per_row() -> None:
    ads = pd.DataFrame(
        {
            "ad_id": ["ok", None, "  ", "x" * 257, "tab\tid", "q", "q2", "b", "t", "c", "c2", "c3"],
            "quality": [0.5, 0.5, 0.5, 0.5, 0.5, "high", np.nan, 0.5, 0.5, 0.5, 0.5, 0.5],
            "bid": [1.0, 1, 1, 1, 1, 1, 1, -0.5, 1, 1, 1, 1],
            "text_len": [10, 10, 10, 10, 10, 10, 10, 10, np.inf, 10, 10, 10],
            "category": ["3", "3", "3", "3", "3", "3", "3", "3", "3", None, " ", np.nan],
        }
    )
    assert feature_problems(ads, AdFeatureSpec()).tolist() == [
        None,
        "ad_id is missing",
        "ad_id is missing",
        "ad_id is longer than 256 characters",
        "ad_id has control characters",
        "quality is not a finite number",
        "quality is not a finite number",
        "bid is negative",
        "text_len is not a finite number",
        "category is missing",
        "category is missing",
        "category is missing",
    ]


def test_negative_values_are_fine_where_not_log_scaled() -> None:
    ads = ads_frame(quality=[-1.0, 0.0, 2.0])
    assert feature_problems(ads, AdFeatureSpec()).isna().all()


def test_category_labels_make_one_category_of_a_number_and_its_text() -> None:
    assert category_labels(pd.Series([7, 3])).tolist() == ["7", "3"]
    assert category_labels(pd.Series([7.0, np.nan, 2.5, np.inf])).tolist() == ["7", None, "2.5", None]
    mixed = pd.Series([7, "7", " x ", None, np.nan, 1.0, True, ""], dtype=object)
    assert category_labels(mixed).tolist() == ["7", "7", "x", None, None, "1", "True", None]
    text = pd.Series(["a", " b ", "", None], dtype="str")
    assert category_labels(text).tolist() == ["a", "b", None, None]
    assert category_labels(pd.Series(pd.array([1, None], dtype="Int64"))).tolist() == ["1", None]


def test_encoder_learns_vocabularies_from_distinct_ads_and_encodes() -> None:
    rows = pd.DataFrame(
        {
            "ad_id": ["a", "a", "a", "b", "c", "d"],  # ad "a" on three days counts once
            "quality": [0.1, 0.1, 0.1, 0.2, 0.3, 0.4],
            "bid": [0.0, 0.0, 0.0, 1.0, 3.0, 1.0],
            "text_len": [0, 0, 0, 9, 99, 10],
            "category": ["x", "x", "x", "y", "y", "z"],
        }
    )
    spec = AdFeatureSpec()
    assert AdEncoder.fit(rows, spec).vocabularies == {"category": ("x", "y", "z")}
    encoder = AdEncoder.fit(rows, spec, min_ads=2)
    assert encoder.vocabularies == {"category": ("y",)}
    assert encoder.feature_names == ["quality", "log1p_bid", "log1p_text_len", "category=y"]
    x = encoder.encode(rows)
    np.testing.assert_allclose(x[:, 1], np.log1p(rows["bid"]))
    np.testing.assert_allclose(x[:, 2], np.log1p(rows["text_len"]))
    assert x[:, 3].tolist() == [0, 0, 0, 1, 1, 0]  # x and z were folded: all zeros
    assert encoder.unseen(rows) == {"category": 4}
    assert encoder.describe() == {**spec_dict(spec), "vocabulary_sizes": {"category": 1}}
    assert AdEncoder.fit(rows, spec, max_values=1).vocabularies == {"category": ("y",)}  # y has the most ads
    assert AdEncoder.fit(rows.iloc[:5], spec, max_values=1).vocabularies == {"category": ("y",)}
    assert AdEncoder.fit(rows.iloc[[0, 3]], spec, max_values=1).vocabularies == {"category": ("x",)}  # tie: by label
    with pytest.raises(ValueError, match="min_ads >= 1"):
        AdEncoder.fit(rows, spec, min_ads=0)


def test_numeric_and_text_categories_encode_the_same() -> None:
    numbers = ads_frame()
    text = ads_frame(category=["3", "3.0", " 7 "])
    encoder = AdEncoder.fit(numbers, AdFeatureSpec())
    assert encoder.vocabularies == {"category": ("3", "7")}
    # "3.0" is text, not the number 3: only numbers lose their ".0".
    np.testing.assert_array_equal(encoder.encode(text)[:, 3:], [[1, 0], [0, 0], [0, 1]])
    np.testing.assert_array_equal(encoder.encode(numbers.astype({"category": float}))[:, 3:], [[1, 0], [1, 0], [0, 1]])


def test_every_id_no_cache_key_may_be_is_a_problem_of_its_row() -> None:
    """feature_problems repeated check_key's rules but for lone surrogates: an ad id from JSON's "\\ud800" (a campaign
    file) raised UnicodeEncodeError from pandas' Arrow strings instead of naming its row."""
    bad = ["", "x" * (MAX_KEY_LENGTH + 1), "tab\tid", "del\x7f", "{guid}", "a\ud800b"]
    for key in bad:
        with pytest.raises(ValueError):
            check_key(key)
    n = len(bad) + 1
    ads = pd.DataFrame({"ad_id": pd.Series([*bad, "ok"], dtype=object), "quality": [0.5] * n, "bid": [1.0] * n,
                        "text_len": [10] * n, "category": [3] * n})  # fmt: skip
    problems = feature_problems(ads, AdFeatureSpec()).tolist()
    assert all(problems[: len(bad)]) and problems[-1] is None, problems
    assert problems[-2] == "ad_id is not valid UTF-8", problems
