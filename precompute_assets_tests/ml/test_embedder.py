"""The hashed character n-gram + SVD embedder on generated multilingual documents."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from precompute_assets.ml import embedder as embedder_module
from precompute_assets.ml.embedder import (
    EMPTY,
    INVALID_UTF8,
    MAX_BODY_BYTES,
    TOO_LARGE,
    ZERO_VECTOR,
    HashingSvdEmbedder,
    document_text,
    embed_documents,
    ngram_counts,
)
from precompute_assets.workload.documents import LANGUAGES, generate_documents

FIT_DOCS = 3000
EVAL_DOCS = 3000


@pytest.fixture(scope="module")
def docs() -> pd.DataFrame:
    return pd.concat(generate_documents(FIT_DOCS + EVAL_DOCS, seed=0), ignore_index=True)


@pytest.fixture(scope="module")
def texts(docs: pd.DataFrame) -> list[str]:
    return [document_text(t, b) for t, b in zip(docs.title, docs.body, strict=True)]


@pytest.fixture(scope="module")
def model(texts: list[str]) -> HashingSvdEmbedder:
    return HashingSvdEmbedder.fit(texts[:FIT_DOCS], dim=300, seed=0)


@pytest.fixture(scope="module")
def eval_vectors(model: HashingSvdEmbedder, texts: list[str]) -> np.ndarray:
    return model.encode(texts[FIT_DOCS:])


def test_output_is_unit_float32(model: HashingSvdEmbedder, eval_vectors: np.ndarray) -> None:
    assert eval_vectors.shape == (EVAL_DOCS, 300) and eval_vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(eval_vectors, axis=1), 1.0, rtol=1e-5)
    assert model.encode([]).shape == (0, 300)


def test_neighbours_share_topic_and_language_in_every_script(docs: pd.DataFrame, eval_vectors: np.ndarray) -> None:
    held_out = docs.iloc[FIT_DOCS:].reset_index(drop=True)
    cluster = (held_out.language + ":" + held_out.topic.astype(str)).to_numpy(dtype=object)
    sims = eval_vectors @ eval_vectors.T
    np.fill_diagonal(sims, -np.inf)
    nearest = sims.argmax(axis=1)
    # only documents that have another document of their (language, topic) among the held-out ones
    has_partner = pd.Series(cluster).duplicated(keep=False).to_numpy()
    hit = cluster[nearest] == cluster
    assert hit[has_partner].mean() >= 0.95
    languages = held_out.language.to_numpy()
    assert set(languages) == set(LANGUAGES)
    for language in LANGUAGES:  # Latin, Cyrillic, Arabic, Devanagari, CJK, Hangul, Greek, Thai
        mine = has_partner & (languages == language)
        assert hit[mine].mean() >= 0.85, language
        assert (languages[nearest[languages == language]] == language).mean() >= 0.99, language


def test_encode_equals_projecting_document_ngram_counts(model: HashingSvdEmbedder, texts: list[str]) -> None:
    # encode sums per-word projections; the direct product over document n-grams must agree
    sample = texts[FIT_DOCS : FIT_DOCS + 200] + ["Ünïcödé ＦＵＬＬＷＩＤＴＨ ﬁ", "😀 emoji 🎉", "", "!!!"]
    counts = ngram_counts(sample, bits=model.bits, ngram_range=model.ngram_range)
    direct = (counts[:, model.columns].multiply(model.idf).tocsr() @ model.components.T).astype(np.float32)
    norms = np.linalg.norm(direct, axis=1, keepdims=True)
    direct = np.divide(direct, norms, out=np.zeros_like(direct), where=norms > 0)
    np.testing.assert_allclose(model.encode(sample), direct, atol=2e-5)


def test_ngrams_of_any_script_with_word_boundaries() -> None:
    counts = ngram_counts(["ab", "東京タワー", "😀🎉", "مرحبا بالعالم", "नमस्ते", "สวัสดีครับ", "Привет"])
    # " ab " gives " ab", "ab " and " ab ": n-grams stay inside a space-padded word
    assert counts[0].sum() == 3
    assert all(counts[i].nnz > 0 for i in range(7))
    # NFKC and lower-casing: full-width and upper-case letters are the same features
    same = ngram_counts(["ＨＥＬＬＯ，Ｗｏｒｌｄ", "hello world", "hello-world!"])
    assert (same[0] != same[1]).nnz == 0 and (same[1] != same[2]).nnz == 0


def test_only_the_first_max_chars_are_embedded(model: HashingSvdEmbedder, texts: list[str]) -> None:
    text = ((texts[FIT_DOCS] + " ") * 10)[: model.max_chars]
    assert len(text) == model.max_chars
    longer = text + " a different tail " * 100_000
    np.testing.assert_array_equal(model.encode([text]), model.encode([longer]))
    assert not np.array_equal(model.encode([text[:-200]]), model.encode([text]))
    huge_body = "x" * (5 * 1024 * 1024)
    assert len(document_text("title", huge_body)) == model.max_chars


def test_batches_threads_and_fallback_give_the_same_vectors(
    model: HashingSvdEmbedder, texts: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sample = texts[FIT_DOCS : FIT_DOCS + 500]
    reference = model.encode(sample)
    monkeypatch.setattr(embedder_module, "BATCH_DOCS", 64)
    model.workers = 2
    np.testing.assert_allclose(model.encode(sample), reference, atol=1e-6)
    model.workers = 1
    monkeypatch.setattr(embedder_module, "_torch", lambda: None)  # scipy's sparse product instead of torch
    np.testing.assert_allclose(model.encode(sample), reference, atol=1e-5)
    model.workers = 2


def test_version_is_a_content_hash(model: HashingSvdEmbedder, texts: list[str], tmp_path: Path) -> None:
    small = texts[:800]
    first = HashingSvdEmbedder.fit(small, dim=32, seed=0)
    again = HashingSvdEmbedder.fit(small, dim=32, seed=0)
    assert first.version == again.version
    np.testing.assert_array_equal(first.components, again.components)
    assert HashingSvdEmbedder.fit(small, dim=32, seed=1).version != first.version
    assert HashingSvdEmbedder.fit(small, dim=16, seed=0).version != first.version
    assert HashingSvdEmbedder.fit(texts[800:1600], dim=32, seed=0).version != first.version

    model.save(tmp_path / "model")
    loaded = HashingSvdEmbedder.load(tmp_path / "model")
    assert loaded.version == model.version
    sample = texts[FIT_DOCS : FIT_DOCS + 50]
    np.testing.assert_array_equal(loaded.encode(sample), model.encode(sample))


def test_load_refuses_arrays_that_do_not_match_the_version(model: HashingSvdEmbedder, tmp_path: Path) -> None:
    model.save(tmp_path / "model")
    with np.load(tmp_path / "model.npz") as arrays:
        tampered = {name: arrays[name] for name in arrays.files}
    tampered["components"] = tampered["components"] * 2
    np.savez(tmp_path / "model.npz", **tampered)
    with pytest.raises(ValueError, match="do not match"):
        HashingSvdEmbedder.load(tmp_path / "model")


@pytest.mark.parametrize("keep", [0.5, 0.0])
def test_load_of_arrays_cut_short_names_the_file(model: HashingSvdEmbedder, tmp_path: Path, keep: float) -> None:
    model.save(tmp_path / "model")
    arrays = tmp_path / "model.npz"
    arrays.write_bytes(arrays.read_bytes()[: int(arrays.stat().st_size * keep)])
    with pytest.raises(ValueError, match=f"{arrays}: unreadable embedder arrays \\(corrupt or truncated\\?\\)"):
        HashingSvdEmbedder.load(tmp_path / "model")


def test_fit_needs_more_texts_than_dimensions() -> None:
    with pytest.raises(ValueError, match="dim=300"):
        HashingSvdEmbedder.fit(["a few words", "not enough", "for three hundred dimensions"] * 10)


def test_bad_documents_are_reported_and_do_not_fail_the_batch(model: HashingSvdEmbedder, texts: list[str]) -> None:
    good_title, good_body = "Tokyo news", texts[FIT_DOCS + 1]
    docs = [
        (good_title, good_body),  # 0
        ("", "   \n\t"),  # 1 empty
        (b"\xff\xfe broken", "body"),  # 2 bytes that are not UTF-8
        ("title", "lone \ud800 surrogate"),  # 3
        ("title", "x" * (MAX_BODY_BYTES + 1)),  # 4
        (b"ok", "ünïcode body".encode()),  # 5 valid UTF-8 bytes are fine
        (None, "only a body"),  # 6
        ("title", "é" * (MAX_BODY_BYTES // 2 + 1)),  # 7: fewer characters than bytes, still too large
    ]
    result = embed_documents(model, docs)
    assert result.failures == {1: EMPTY, 2: INVALID_UTF8, 3: INVALID_UTF8, 4: TOO_LARGE, 7: TOO_LARGE}
    assert result.indices == [0, 5, 6]
    assert result.vectors.shape == (3, model.dim)
    expected = model.encode(
        [
            document_text(good_title, good_body),
            document_text("ok", "ünïcode body"),
            document_text("", "only a body"),
        ]
    )
    np.testing.assert_array_equal(result.vectors, expected)

    nothing = embed_documents(model, [("", "")])
    assert nothing.vectors.shape == (0, model.dim) and nothing.failures == {0: EMPTY}


def test_a_text_the_model_maps_to_a_vector_of_zeros_is_a_failure(model: HashingSvdEmbedder, texts: list[str]) -> None:
    """Emoji only: no n-gram the model knows. Stored, its zeros gave a cosine of 0 with any query, above every real
    candidate of negative score (h_emb)."""
    assert not model.encode(["🙂🙂🙂 🎉🎉"]).any()
    result = embed_documents(model, [("", "🙂🙂🙂 🎉🎉"), ("Tokyo news", texts[FIT_DOCS + 1])])
    assert result.failures == {0: ZERO_VECTOR} and result.indices == [1] and result.vectors.shape == (1, model.dim)


def test_sentence_transformer_backend(texts: list[str]) -> None:
    pytest.importorskip("sentence_transformers", reason="optional extra: pip install sentence-transformers")
    from precompute_assets.ml.embedder import SentenceTransformerEmbedder

    model = SentenceTransformerEmbedder("sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2")
    vectors = model.encode(texts[:4])
    assert vectors.shape == (4, model.dim) and vectors.dtype == np.float32
    assert model.version == f"st:sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2:{model.dim}"


def test_the_check_looks_at_the_embedded_text_only() -> None:
    from precompute_assets.ml.embedder import check_document

    n = 100
    # a lone surrogate past what is embedded cannot reach Redis: the document is embedded from its start
    text, reason = check_document("title", "x" * n + "\ud800", max_chars=n)
    assert reason is None and text == ("title\n" + "x" * n)[:n]
    # ... but within it, it can: the document fails
    assert check_document("title", "\ud800 body", max_chars=n) == ("", INVALID_UTF8)
    # nothing but blanks in what would be embedded is an empty document, whatever follows
    assert check_document(" " * n, "words after the cut", max_chars=n) == ("", EMPTY)
    # zero-width spaces and joiners, a byte order mark, soft hyphens: nothing shows, nothing is embedded (it was: a
    # vector of nothing, zero for the default embedder, served as a document)
    assert check_document("\ufeff", "\u200b\u200d \u2060\u00ad\n", max_chars=n) == ("", EMPTY)
    assert check_document(None, "\u200bx", max_chars=n) == ("\n\u200bx", None)
