"""How much quality the stored int8 embeddings keep against float32 vectors re-encoded from the documents."""

from __future__ import annotations

import numpy as np

from ..ml.embedder import Embedder, check_document
from ..ml.quantize import recall_at_k
from ..serving.vectors import decode_vector
from ..storage.documents import DocumentStore
from ..storage.embeddings import EmbeddingStore


def int8_recall(store: EmbeddingStore, documents: DocumentStore, embedder: Embedder, *, n: int = 2000) -> float:
    """recall@10 of the stored int8 vectors against float32 vectors re-encoded from the same documents,
    over a random sample of ``n`` documents (neighbours searched within the sample)."""
    rows = documents.sample(n)
    stored = store.values([doc_id for doc_id, _, _ in rows])
    texts, approx = [], []
    for doc_id, title, body in rows:
        text, reason = check_document(title, body)
        if doc_id in stored and reason is None:
            texts.append(text)
            approx.append(decode_vector(stored[doc_id]).vector)
    if len(texts) < 20:
        return float("nan")
    return recall_at_k(embedder.encode(texts), np.stack(approx), k=10, sample=min(500, len(texts)))
