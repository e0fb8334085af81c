"""How much nearest-neighbour quality int8 embeddings keep (the quantiser itself is ``serving.vectors.quantize_int8``,
the one used for every stored value)."""

from __future__ import annotations

import numpy as np

QUERY_BLOCK = 256  # query rows scored at once; bounds the (block, n) similarity matrix


def dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The float32 vectors that ``quantize_int8`` codes stand for."""
    return np.asarray(q, dtype=np.float32) * np.asarray(scale, dtype=np.float32).reshape(-1, 1)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def _top_k(unit: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` rows most cosine-similar to each query row (the query itself excluded)."""
    sims = unit[queries] @ unit.T
    sims[np.arange(len(queries)), queries] = -np.inf
    return np.argpartition(-sims, k - 1, axis=1)[:, :k]


def recall_at_k(
    float_vectors: np.ndarray, approx_vectors: np.ndarray, *, k: int = 10, sample: int = 1000, seed: int = 0
) -> float:
    """Recall@k: over ``sample`` random query rows, the mean fraction of a query's true top-``k`` cosine
    neighbours among all rows (itself excluded) that ``approx_vectors`` also ranks in its top ``k``."""
    if float_vectors.shape != approx_vectors.shape:
        raise ValueError(f"shapes differ: {float_vectors.shape} vs {approx_vectors.shape}")
    n = len(float_vectors)
    if not 0 < k < n:
        raise ValueError(f"k must be in 1..{n - 1} for {n} vectors, got {k}")
    exact, approx = _unit_rows(float_vectors), _unit_rows(approx_vectors)
    queries = np.sort(np.random.default_rng(seed).choice(n, size=min(sample, n), replace=False))
    found = 0
    for at in range(0, len(queries), QUERY_BLOCK):
        block = queries[at : at + QUERY_BLOCK]
        truth, guess = _top_k(exact, block, k), _top_k(approx, block, k)
        found += sum(len(np.intersect1d(t, g, assume_unique=True)) for t, g in zip(truth, guess, strict=True))
    return found / (len(queries) * k)
