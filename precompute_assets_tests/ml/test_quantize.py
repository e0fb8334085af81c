"""int8 quantisation and recall@k, on random vectors and on the embedder's output."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from precompute_assets.ml.embedder import HashingSvdEmbedder, document_text
from precompute_assets.ml.quantize import dequantize, recall_at_k
from precompute_assets.serving.vectors import quantize_int8
from precompute_assets.workload.documents import generate_documents


def test_quantize_shapes_and_error_bound() -> None:
    x = np.random.default_rng(0).normal(size=(50, 300)).astype(np.float32)
    q, scale = quantize_int8(x)
    assert q.dtype == np.int8 and q.shape == (50, 300)
    assert scale.dtype == np.float32 and scale.shape == (50,)
    assert np.abs(q).max() == 127  # each row's largest component uses the full range
    error = np.abs(dequantize(q, scale) - x)
    assert (error <= scale[:, None] / 2 + 1e-7).all()


def test_quantize_is_symmetric_and_handles_zero_rows() -> None:
    x = np.random.default_rng(1).normal(size=(10, 8)).astype(np.float32)
    x[3] = 0
    q, scale = quantize_int8(x)
    q_neg, scale_neg = quantize_int8(-x)
    np.testing.assert_array_equal(q_neg, -q)
    np.testing.assert_array_equal(scale_neg, scale)
    assert scale[3] == 0 and not q[3].any()
    assert not dequantize(q, scale)[3].any()
    with pytest.raises(ValueError, match="2-d"):
        quantize_int8(x[0])


def test_recall_of_identical_and_unrelated_vectors() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(500, 32)).astype(np.float32)
    assert recall_at_k(x, x, k=10, sample=100) == 1.0
    assert recall_at_k(x, 3 * x, k=10, sample=100) == 1.0  # cosine: the scale of a row does not matter
    unrelated = rng.normal(size=(500, 32)).astype(np.float32)
    assert recall_at_k(x, unrelated, k=10, sample=100) < 0.2


def test_recall_excludes_the_query_itself() -> None:
    # two tight pairs far apart: each point's only true neighbour (k=1) is its twin, never itself
    x = np.array([[1, 0], [1, 0.01], [0, 1], [0.01, 1]], dtype=np.float32)
    assert recall_at_k(x, x, k=1, sample=4) == 1.0
    assert recall_at_k(x, x[[1, 0, 3, 2]], k=1, sample=4) == 1.0  # twins swapped are still twins
    # pairs crossed: were the query counted as its own neighbour, this would still score 1.0
    assert recall_at_k(x, x[[0, 2, 1, 3]], k=1, sample=4) == 0.0
    with pytest.raises(ValueError, match="k must be"):
        recall_at_k(x, x, k=4)


def test_int8_keeps_recall_at_10_of_embeddings() -> None:
    docs = pd.concat(generate_documents(4000, seed=3), ignore_index=True)
    texts = [document_text(t, b) for t, b in zip(docs.title, docs.body, strict=True)]
    model = HashingSvdEmbedder.fit(texts[:2000], dim=300, seed=0)
    vectors = model.encode(texts)
    q, scale = quantize_int8(vectors)
    assert recall_at_k(vectors, dequantize(q, scale), k=10, sample=1000, seed=0) >= 0.95
