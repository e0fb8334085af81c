"""How much quality the stored int8 embeddings keep against float32 vectors re-encoded from the documents."""

from __future__ import annotations

import numpy as np

from ..ml.embedder import MAX_CHARS, Embedder, embed_documents
from ..ml.quantize import recall_at_k
from ..serving.vectors import decode_vector
from ..storage.documents import DocumentStore
from ..storage.embeddings import EmbeddingStore, sample_documents


def int8_recall(store: EmbeddingStore, documents: DocumentStore, embedder: Embedder, *, n: int = 2000) -> float:
    """recall@10 of the stored int8 vectors against float32 vectors re-encoded from the same documents,
    over a random sample of about ``n`` documents (neighbours searched within the sample).

    The sample reads a bounded share of the table's pages (``sample_documents``), so the check costs the
    same on a corpus of thousands or millions; documents the embedder fails on now are left out."""
    rows = sample_documents(documents, n, body_chars=getattr(embedder, "max_chars", MAX_CHARS))
    stored = store.values([doc_id for doc_id, _, _ in rows], embedder.version)  # another model's are no measure
    rows = [row for row in rows if row[0] in stored]
    result = embed_documents(embedder, [(title, body) for _, title, body in rows])
    if len(result.indices) < 20:
        return float("nan")
    approx = np.stack([decode_vector(stored[rows[i][0]]).vector for i in result.indices])
    return recall_at_k(result.vectors, approx, k=10, sample=min(500, len(result.indices)))
