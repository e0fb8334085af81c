"""The generated multilingual retrieval test set and the evaluation of a backend on it."""

from __future__ import annotations

import numpy as np
import pytest

from precompute_assets.ml.embedder import HashingSvdEmbedder
from precompute_assets.workload.retrieval_eval import (
    CONCEPT_LANGUAGES,
    CONCEPTS,
    SUBSETS,
    build_test_set,
    evaluate_backend,
    measure_throughput,
    workload_texts,
)


@pytest.fixture(scope="module")
def tiny():
    return build_test_set(n_docs=60, n_title=20, n_noisy=20, n_cross=20, seed=3)


@pytest.fixture(scope="module")
def default_embedder(tiny) -> HashingSvdEmbedder:
    return HashingSvdEmbedder.fit(tiny.corpus + workload_texts(400, seed=2), dim=64, seed=0)


def test_test_set_is_deterministic_and_consistent(tiny) -> None:
    again = build_test_set(n_docs=60, n_title=20, n_noisy=20, n_cross=20, seed=3)
    assert again.corpus == tiny.corpus and again.queries == tiny.queries
    np.testing.assert_array_equal(again.relevant, tiny.relevant)
    assert len(tiny.corpus) == 80 and len(tiny.queries) == 60
    assert [int((tiny.subset == s).sum()) for s in SUBSETS] == [20, 20, 20]
    assert tiny.relevant.min() >= 0 and tiny.relevant.max() < len(tiny.corpus)
    assert build_test_set(n_docs=60, n_title=20, n_noisy=20, n_cross=20, seed=4).queries != tiny.queries


def test_cross_lingual_queries_are_in_another_language(tiny) -> None:
    for i in tiny.take("cross_lingual"):
        query_language, doc_language = str(tiny.language[i]).split("->")
        assert query_language != doc_language
        assert {query_language, doc_language} <= set(CONCEPT_LANGUAGES)
    assert all(len(row) == len(CONCEPT_LANGUAGES) for row in CONCEPTS)
    assert len({row[0] for row in CONCEPTS}) == len(CONCEPTS)


def test_title_and_noisy_queries_come_from_their_document(tiny) -> None:
    for i in tiny.take("title"):
        words = tiny.queries[i].split()
        assert all(w in tiny.corpus[tiny.relevant[i]] for w in words)
    assert all(0 < len(tiny.queries[i]) <= 120 for i in tiny.take("noisy"))


def test_default_embedder_numbers_are_sane(tiny, default_embedder) -> None:
    result = evaluate_backend(default_embedder.encode, tiny)
    for name in (*SUBSETS, "all"):
        metrics = result[name]
        assert 0.0 <= metrics["mrr"] <= metrics["recall@10"] <= 1.0
    assert result["title"]["recall@10"] >= 0.9
    assert result["noisy"]["recall@10"] >= 0.8
    assert result["corpus_docs"] == 80
    assert set(result["title_noisy_recall@10_by_language"]) <= {
        "en", "de", "fr", "es", "pt", "tr", "ru", "ar", "hi", "zh", "ja", "ko", "el", "th",
    }  # fmt: skip


def test_an_embedder_that_knows_nothing_scores_zero(tiny) -> None:
    def zeros(texts):
        return np.zeros((len(texts), 8), dtype=np.float32)

    result = evaluate_backend(zeros, tiny)  # every score ties: ranked last, never in the top 10
    assert result["all"]["recall@10"] == 0.0
    assert result["all"]["mrr"] == pytest.approx(1 / len(tiny.corpus))


def test_throughput_is_the_texts_encoded_over_the_time_of_their_call() -> None:
    """It asserted only a rate above 0, which a function that encoded nothing passed too (h_tests)."""
    calls, ticks = [], iter([10.0, 12.5])
    rate = measure_throughput(lambda texts: calls.append(list(texts)), workload_texts(50), clock=lambda: next(ticks))
    assert rate == 50 / 2.5 and [len(texts) for texts in calls] == [8, 50]  # the warm-up, then every text, timed


@pytest.mark.parametrize("model", ["multilingual-e5-small", "use-multilingual-v3"])
def test_pretrained_model_wins_cross_lingual(model: str, default_embedder) -> None:
    from precompute_assets.ml.pretrained import MODELS, PretrainedEmbedder

    pytest.importorskip(MODELS[model].module, reason=f"{MODELS[model].distribution} is not installed")
    concepts = build_test_set(n_docs=0, n_title=0, n_noisy=0, n_cross=30, seed=5)
    pretrained = PretrainedEmbedder(model)
    ours = evaluate_backend(pretrained.encode, concepts, query_encode_fn=pretrained.encode_queries)
    default = evaluate_backend(default_embedder.encode, concepts)
    assert ours["cross_lingual"]["mrr"] >= 0.5
    assert ours["cross_lingual"]["mrr"] > default["cross_lingual"]["mrr"]
