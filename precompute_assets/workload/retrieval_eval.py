"""A multilingual retrieval test set generated in code (nothing downloaded) and the evaluation of a backend.

One corpus, three kinds of queries, each with exactly one relevant document:

- ``title``: a document's title, words shuffled; the corpus is the synthetic multilingual documents of
  ``workload/documents.py`` (14 languages, 9 scripts), exactly what the pipeline embeds.
- ``noisy``: a 60-character window of a document's body with typos (about 1 character in 12 dropped,
  doubled or swapped with its neighbour).
- ``cross_lingual``: real words. Each concept document lists three concepts (dog, river, coffee, ...) in
  one of 8 languages (en de fr es ru zh ja ar); its query lists the same concepts in *another* language,
  shuffled. Only a model that knows what words mean can match most of them: shared scripts and cognates
  (café/coffee, 学校 in zh and ja) give character n-grams a little. Other concept documents share one
  or two of the concepts, so they are close distractors.

Be aware of the bias: ``title`` and ``noisy`` reward surface overlap on pseudo-words that mean nothing,
which favours character n-grams over a semantic model; ``cross_lingual`` is where a semantic model should
win. Report them apart (``evaluate_backend`` does), not only ``all``.

``python -m precompute_assets.workload.retrieval_eval --backend hashing-svd`` (or ``multilingual-e5-small``,
``use-multilingual-v3``) prints the numbers and the throughput of one backend as JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..ml.embedder import MAX_CHARS, HashingSvdEmbedder, document_text
from .documents import generate_documents

EncodeFn = Callable[[Sequence[str]], np.ndarray]

# concept -> its word in en de fr es ru zh ja ar (common nouns; cognates kept as they are)
CONCEPT_LANGUAGES = ("en", "de", "fr", "es", "ru", "zh", "ja", "ar")
CONCEPTS: tuple[tuple[str, ...], ...] = (
    ("dog", "Hund", "chien", "perro", "собака", "狗", "犬", "كلب"),
    ("cat", "Katze", "chat", "gato", "кошка", "猫", "猫", "قطة"),
    ("horse", "Pferd", "cheval", "caballo", "лошадь", "马", "馬", "حصان"),
    ("bird", "Vogel", "oiseau", "pájaro", "птица", "鸟", "鳥", "طائر"),
    ("fish", "Fisch", "poisson", "pez", "рыба", "鱼", "魚", "سمكة"),
    ("tree", "Baum", "arbre", "árbol", "дерево", "树", "木", "شجرة"),
    ("flower", "Blume", "fleur", "flor", "цветок", "花", "花", "زهرة"),
    ("river", "Fluss", "rivière", "río", "река", "河", "川", "نهر"),
    ("mountain", "Berg", "montagne", "montaña", "гора", "山", "山", "جبل"),
    ("sea", "Meer", "mer", "mar", "море", "海", "海", "بحر"),
    ("rain", "Regen", "pluie", "lluvia", "дождь", "雨", "雨", "مطر"),
    ("snow", "Schnee", "neige", "nieve", "снег", "雪", "雪", "ثلج"),
    ("sun", "Sonne", "soleil", "sol", "солнце", "太阳", "太陽", "شمس"),
    ("bread", "Brot", "pain", "pan", "хлеб", "面包", "パン", "خبز"),
    ("coffee", "Kaffee", "café", "café", "кофе", "咖啡", "コーヒー", "قهوة"),
    ("milk", "Milch", "lait", "leche", "молоко", "牛奶", "牛乳", "حليب"),
    ("house", "Haus", "maison", "casa", "дом", "房子", "家", "بيت"),
    ("school", "Schule", "école", "escuela", "школа", "学校", "学校", "مدرسة"),
    ("hospital", "Krankenhaus", "hôpital", "hospital", "больница", "医院", "病院", "مستشفى"),
    ("train", "Zug", "train", "tren", "поезд", "火车", "電車", "قطار"),
    ("car", "Auto", "voiture", "coche", "машина", "汽车", "車", "سيارة"),
    ("book", "Buch", "livre", "libro", "книга", "书", "本", "كتاب"),
    ("music", "Musik", "musique", "música", "музыка", "音乐", "音楽", "موسيقى"),
    ("doctor", "Arzt", "médecin", "médico", "врач", "医生", "医者", "طبيب"),
)
SUBSETS = ("title", "noisy", "cross_lingual")


@dataclass(frozen=True)
class RetrievalSet:
    corpus: list[str]  # document texts, as the pipeline embeds them
    queries: list[str]
    relevant: np.ndarray  # int64 (queries,) index in corpus of each query's one relevant document
    subset: np.ndarray  # object (queries,) one of SUBSETS
    language: np.ndarray  # object (queries,) the query's language

    def take(self, subset: str) -> np.ndarray:
        return np.flatnonzero(self.subset == subset)


def _concept_text(concepts: Sequence[int], language: str) -> str:
    column = CONCEPT_LANGUAGES.index(language)
    words = [CONCEPTS[c][column] for c in concepts]
    return ("、" if language in ("zh", "ja") else ", ").join(words)


def _typos(text: str, rng: np.random.Generator, rate: float) -> str:
    chars = list(text)
    out: list[str] = []
    i = 0
    while i < len(chars):
        if chars[i] != " " and rng.random() < rate:
            kind = rng.integers(3)
            if kind == 0:  # drop
                i += 1
                continue
            if kind == 1:  # double
                out += [chars[i], chars[i]]
                i += 1
                continue
            if i + 1 < len(chars):  # swap with the next character
                out += [chars[i + 1], chars[i]]
                i += 2
                continue
        out.append(chars[i])
        i += 1
    return "".join(out)


def build_test_set(
    n_docs: int = 300,
    n_title: int = 100,
    n_noisy: int = 100,
    n_cross: int = 120,
    *,
    seed: int = 0,
    max_chars: int = MAX_CHARS,
    typo_rate: float = 1 / 12,
) -> RetrievalSet:
    """The test set: ``n_docs`` synthetic documents plus ``n_cross`` concept documents in one corpus,
    and ``n_title`` + ``n_noisy`` + ``n_cross`` queries. Deterministic for a given seed."""
    if n_title > n_docs or n_noisy > n_docs:
        raise ValueError("n_title and n_noisy must be at most n_docs")
    rng = np.random.default_rng([seed, 11])
    docs = next(iter(generate_documents(n_docs, seed=seed, start_id=0, chunk_size=max(n_docs, 1))), None)
    corpus: list[str] = []
    queries: list[str] = []
    relevant: list[int] = []
    subset: list[str] = []
    language: list[str] = []
    if docs is not None:
        corpus += [document_text(t, b, max_chars) for t, b in zip(docs.title, docs.body, strict=True)]
        for i in rng.choice(n_docs, size=n_title, replace=False).tolist():
            words = str(docs.title[i]).split()
            # scripts without spaces between words (zh, ja, th) keep the title whole
            title = " ".join(words[j] for j in rng.permutation(len(words))) if len(words) > 1 else docs.title[i]
            queries.append(title)
            relevant.append(i)
            subset.append("title")
            language.append(str(docs.language[i]))
        for i in rng.choice(n_docs, size=n_noisy, replace=False).tolist():
            body = str(docs.body[i])[: max_chars - len(docs.title[i]) - 1]
            start = int(rng.integers(0, max(len(body) - 60, 0) + 1))
            queries.append(_typos(body[start : start + 60], rng, typo_rate))
            relevant.append(i)
            subset.append("noisy")
            language.append(str(docs.language[i]))
    triples = list(itertools.combinations(range(len(CONCEPTS)), 3))
    if n_cross > len(triples):
        raise ValueError(f"at most {len(triples)} concept documents")
    for t in rng.choice(len(triples), size=n_cross, replace=False).tolist():
        doc_language, query_language = rng.choice(CONCEPT_LANGUAGES, size=2, replace=False).tolist()
        concepts = list(triples[t])
        relevant.append(len(corpus))
        corpus.append(_concept_text([concepts[j] for j in rng.permutation(3)], doc_language))
        queries.append(_concept_text([concepts[j] for j in rng.permutation(3)], query_language))
        subset.append("cross_lingual")
        language.append(f"{query_language}->{doc_language}")
    return RetrievalSet(
        corpus=corpus,
        queries=queries,
        relevant=np.asarray(relevant, dtype=np.int64),
        subset=np.asarray(subset, dtype=object),
        language=np.asarray(language, dtype=object),
    )


def _metrics(ranks: np.ndarray, k: int) -> dict[str, float]:
    """ranks: 1-based rank of the relevant document of each query."""
    if len(ranks) == 0:
        return {f"recall@{k}": float("nan"), "mrr": float("nan"), "queries": 0}
    return {f"recall@{k}": float(np.mean(ranks <= k)), "mrr": float(np.mean(1.0 / ranks)), "queries": len(ranks)}


def evaluate_backend(
    encode_fn: EncodeFn,
    test_set: RetrievalSet | None = None,
    *,
    query_encode_fn: EncodeFn | None = None,
    k: int = 10,
) -> dict[str, object]:
    """Recall@k and MRR (cosine similarity, the whole corpus searched) per subset and over all queries.

    ``encode_fn`` embeds documents, ``query_encode_fn`` queries (default: ``encode_fn``); both return unit
    rows. Ties rank pessimistically (a zero vector ranks its relevant document last)."""
    test_set = test_set or build_test_set()
    started = time.perf_counter()
    docs = np.asarray(encode_fn(test_set.corpus), dtype=np.float32)
    doc_seconds = time.perf_counter() - started
    queries = np.asarray((query_encode_fn or encode_fn)(test_set.queries), dtype=np.float32)
    scores = queries @ docs.T
    own = scores[np.arange(len(queries)), test_set.relevant]
    ranks = (scores >= own[:, None]).sum(axis=1)  # the relevant document and all scoring at least as high
    result: dict[str, object] = {name: _metrics(ranks[test_set.take(name)], k) for name in SUBSETS}
    result["all"] = _metrics(ranks, k)
    languages = sorted({str(x) for x in test_set.language[test_set.subset != "cross_lingual"]})
    result[f"title_noisy_recall@{k}_by_language"] = {
        code: float(np.mean(ranks[(test_set.language == code) & (test_set.subset != "cross_lingual")] <= k))
        for code in languages
    }
    result["corpus_docs"] = len(test_set.corpus)
    result["corpus_encode_seconds"] = doc_seconds
    return result


def measure_throughput(
    encode_fn: EncodeFn, texts: Sequence[str], *, warmup: int = 8, clock: Callable[[], float] = time.perf_counter
) -> float:
    """Documents per second of ``encode_fn`` on ``texts`` (after a warm-up call on a few of them), timed by
    ``clock``."""
    texts = list(texts)
    if warmup:
        encode_fn(texts[:warmup])
    started = clock()
    encode_fn(texts)
    return len(texts) / (clock() - started)


def workload_texts(n: int, *, seed: int = 1, max_chars: int = MAX_CHARS) -> list[str]:
    """``n`` synthetic documents as the pipeline embeds them (another seed than the test set's)."""
    docs = next(iter(generate_documents(n, seed=seed, chunk_size=max(n, 1))))
    return [document_text(t, b, max_chars) for t, b in zip(docs.title, docs.body, strict=True)]


def fit_default(test_set: RetrievalSet, *, extra_docs: int = 5000, dim: int = 300) -> HashingSvdEmbedder:
    """The default embedder as the ``embedding_model`` asset fits it: on a corpus sample (here the test
    corpus plus ``extra_docs`` other synthetic documents)."""
    return HashingSvdEmbedder.fit(test_set.corpus + workload_texts(extra_docs, seed=2), dim=dim, seed=0)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="hashing-svd", help="hashing-svd or a pretrained model name")
    parser.add_argument("--docs", type=int, default=300, help="synthetic documents in the test corpus")
    parser.add_argument("--throughput-docs", type=int, default=2000)
    args = parser.parse_args(argv)
    test_set = build_test_set(n_docs=args.docs, n_title=min(100, args.docs), n_noisy=min(100, args.docs))
    if args.backend == "hashing-svd":
        embedder = fit_default(test_set)
        query_fn = None
    else:
        from ..ml.pretrained import PretrainedEmbedder

        embedder = PretrainedEmbedder(args.backend)
        query_fn = embedder.encode_queries if embedder.asymmetric else None
    corpus_vectors: list[np.ndarray] = []

    def encode_corpus_once(texts: Sequence[str]) -> np.ndarray:
        if not corpus_vectors:
            corpus_vectors.append(embedder.encode(texts))
        return corpus_vectors[0]

    result = evaluate_backend(encode_corpus_once, test_set, query_encode_fn=query_fn or embedder.encode)
    if query_fn is not None:
        symmetric = evaluate_backend(encode_corpus_once, test_set, query_encode_fn=embedder.encode)
        result["symmetric_queries"] = {name: symmetric[name] for name in (*SUBSETS, "all")}
    result["backend"] = embedder.version
    result["dim"] = embedder.dim
    texts = workload_texts(args.throughput_docs)
    result["throughput_docs"] = len(texts)
    result["mean_chars"] = float(np.mean([len(t) for t in texts]))
    result["docs_per_s"] = measure_throughput(embedder.encode, texts)
    print(json.dumps(result, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
