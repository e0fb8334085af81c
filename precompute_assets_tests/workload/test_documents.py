"""The synthetic multilingual document generator."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from precompute_assets.workload.documents import (
    BLOCK,
    LANGUAGES,
    N_TOPICS,
    generate_documents,
    topic_words,
)

SCRIPTS = {
    "ru": r"[\u0400-\u04FF]",
    "ar": r"[\u0600-\u06FF]",
    "hi": r"[\u0900-\u097F]",
    "zh": r"[\u4E00-\u9FFF]",
    "ja": r"[\u3040-\u30FF]",
    "ko": r"[\uAC00-\uD7AF]",
    "el": r"[\u0370-\u03FF]",
    "th": r"[\u0E00-\u0E7F]",
    "tr": r"[çğışöü]",
    "de": r"[a-zäöüß]",
}
UNSPACED = {"zh", "ja", "th"}


@pytest.fixture(scope="module")
def docs() -> pd.DataFrame:
    return pd.concat(generate_documents(12_000, seed=0, chunk_size=5000), ignore_index=True)


def test_chunks_columns_and_ids(docs: pd.DataFrame) -> None:
    chunks = list(generate_documents(12_000, seed=0, chunk_size=5000))
    assert [len(c) for c in chunks] == [5000, 5000, 2000]
    assert list(docs.columns) == ["doc_id", "title", "body", "language", "topic"]
    assert docs.doc_id.iloc[0] == "doc00000000" and docs.doc_id.iloc[-1] == "doc00011999"
    assert docs.doc_id.is_unique
    assert list(generate_documents(0)) == []


def test_deterministic_and_independent_of_chunking(docs: pd.DataFrame) -> None:
    again = pd.concat(generate_documents(12_000, seed=0, chunk_size=777), ignore_index=True)
    pd.testing.assert_frame_equal(docs, again)
    # a window across a block boundary, generated on its own, is the same rows
    start = BLOCK - 100
    window = pd.concat(generate_documents(300, seed=0, start_id=start), ignore_index=True)
    pd.testing.assert_frame_equal(window, docs.iloc[start : start + 300].reset_index(drop=True))
    other = next(generate_documents(100, seed=1))
    assert (other.body != docs.body.iloc[:100]).all()


def test_every_language_uses_its_script(docs: pd.DataFrame) -> None:
    assert set(docs.language) == set(LANGUAGES) and len(LANGUAGES) >= 12
    assert docs.language.value_counts().min() >= 300
    for language, pattern in SCRIPTS.items():
        bodies = docs.body[docs.language == language]
        assert bodies.str.contains(pattern).all(), language
    for language in UNSPACED - {"th"}:
        assert not docs.body[docs.language == language].str.contains(" ").any(), language
    # Thai puts spaces between sentences only: far fewer spaces than words
    thai = docs[docs.language == "th"]
    assert thai.body.str.count(" ").mean() < 30


def test_lengths_are_realistic(docs: pd.DataFrame) -> None:
    spaced = docs[~docs.language.isin(UNSPACED | {"ko"})]
    title_words = spaced.title.str.split().str.len()
    assert title_words.min() >= 3 and title_words.max() <= 12
    body_words = spaced.body.str.split().str.len()
    assert 120 <= body_words.median() <= 180
    assert body_words.quantile(0.999) > 600  # a long tail
    assert body_words.max() <= 4000
    assert (docs.body.str.len() > 0).all() and (docs.title.str.len() > 0).all()


def test_topics_bias_the_vocabulary(docs: pd.DataFrame) -> None:
    assert docs.topic.between(0, N_TOPICS - 1).all() and docs.topic.nunique() == N_TOPICS
    english = docs[docs.language == "en"]
    words = {t: set(topic_words("en", t)) for t in range(N_TOPICS)}
    share = np.array(
        [
            [len(set(body.split()) & words[t]) for t in range(N_TOPICS)]
            for body in english.body.str.replace(".", "", regex=False).head(300)
        ]
    )
    # a document uses many words of its own topic and few, if any, of the others
    own = share[np.arange(len(share)), english.topic.head(300).to_numpy()]
    assert (own == share.max(axis=1)).mean() > 0.97


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError):
        next(generate_documents(10, chunk_size=0))
    with pytest.raises(ValueError):
        next(generate_documents(-1))


def test_sentence_ends_use_the_script_terminator(docs: pd.DataFrame) -> None:
    assert docs.body[docs.language == "zh"].str.endswith("。").all()
    assert docs.body[docs.language == "hi"].str.endswith("।").all()
    assert docs.body[docs.language == "en"].str.match(r"^[^.]").all()
    assert docs.body[docs.language == "en"].map(lambda b: bool(re.search(r"\w\.$", b))).all()
