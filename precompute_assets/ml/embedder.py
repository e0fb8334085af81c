"""Document embeddings for any language or script: hashed character n-grams reduced by a truncated SVD.

The text (title + body, at most ``max_chars`` characters) is NFKC-normalised and lower-cased; whitespace,
punctuation and control characters separate words; every word padded with one space on each side
contributes its character 3..5-grams (the ``char_wb`` analyzer), hashed into ``2**bits`` columns. A
document's features are the raw n-gram counts times an idf weight, and its embedding is the L2-normalised
projection of those features onto the SVD components fitted on a sample of the corpus.

Because a document's n-grams are the sum of its words' n-grams, ``encode`` projects each *distinct* word
of a batch once and sums word vectors per document: the same numbers as projecting the documents' n-gram
counts, for a fraction of the work (words repeat, documents don't).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
import zipfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Protocol

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .model_store import write_atomically

MAX_CHARS = 2000
MAX_BODY_BYTES = 10 * 1024 * 1024
BATCH_DOCS = 4096  # per thread: bounds the temporary arrays to tens of MB
FORMAT = "hashing-svd/1"

EMPTY = "empty"
INVALID_UTF8 = "invalid utf-8"
TOO_LARGE = "too large"
ZERO_VECTOR = "no known n-gram (a vector of zeros)"  # a text the model maps to nothing: no direction

_SPACE = 32
# A character that shows: not white space, nor one of the invisible format characters scraped text carries (zero-width
# space, joiners and marks, word joiner, byte order mark, soft hyphen, combining grapheme joiner)
_VISIBLE = re.compile(r"[^\s\u200b-\u200f\u2060-\u2064\ufeff\u00ad\u034f]")
_NGRAM_MUL = np.uint64(0x100000001B3)  # FNV prime: polynomial hash of the code points of one n-gram
_WORD_MUL = np.uint64(0xC2B2AE3D27D4EB4F)
_MIX = np.uint64(0x9E3779B97F4A7C15)  # golden-ratio multiply-shift spreads hashes over the top bits


class Embedder(Protocol):
    """What the embedding assets need from a model. A backend that can fail per text (an inference
    service) also has ``encode_checked(texts) -> (vectors, {position: reason})``, which ``embed_documents``
    prefers: its failures are recorded per document instead of failing the batch."""

    @property
    def version(self) -> str: ...

    @property
    def dim(self) -> int: ...

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


def document_text(title: str, body: str, max_chars: int = MAX_CHARS) -> str:
    """The text embedded for one document; a huge title or body is cut before it is copied."""
    return (title[:max_chars] + "\n" + body[:max_chars])[:max_chars]


@cache
def _separators() -> np.ndarray:
    """Which BMP code points split words: whitespace, punctuation and control characters."""
    table = np.zeros(0x10000, dtype=bool)
    for cp in range(0x10000):
        category = unicodedata.category(chr(cp))
        table[cp] = category[0] in "PZ" or category == "Cc"
    table[0xFFFF] = False  # the clip target of astral code points, which are never separators
    return table


def _code_points(texts: Sequence[str], max_chars: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised texts as one uint32 array with a separator around each text, and each text's start."""
    normal = [" " + unicodedata.normalize("NFKC", t[:max_chars]).lower() + " " for t in texts]
    lengths = np.fromiter(map(len, normal), dtype=np.int64, count=len(normal))
    codes = np.frombuffer("".join(normal).encode("utf-32-le", "surrogatepass"), dtype=np.uint32).copy()
    codes[_separators()[np.minimum(codes, 0xFFFF)]] = _SPACE
    return codes, np.cumsum(lengths) - lengths


@dataclass(frozen=True)
class _Words:
    """The word tokens of a batch: the distinct words (as spans of ``codes``) and each text's words."""

    codes: np.ndarray  # uint32 code points, separators mapped to spaces
    starts: np.ndarray  # int64 (distinct words,) start of one occurrence of each distinct word
    lengths: np.ndarray  # int64 (distinct words,)
    tokens: np.ndarray  # int64 (word tokens,) distinct-word index of each token, in text order
    per_text: np.ndarray  # int64 (texts + 1,) CSR pointer of tokens per text


def _words(texts: Sequence[str], max_chars: int) -> _Words:
    codes, text_starts = _code_points(texts, max_chars)
    space = codes == _SPACE
    edge = np.flatnonzero(space[:-1] != space[1:]) + 1  # alternating word starts and ends
    starts, ends = edge[0::2], edge[1::2]
    lengths = ends - starts
    # a polynomial hash per word, summed per word with reduceat; 64 bits make collisions negligible
    word_starts_in_letters = np.cumsum(lengths) - lengths
    powers = np.cumprod(np.full(int(lengths.max(initial=1)), _WORD_MUL, dtype=np.uint64))
    offset = np.arange(int(lengths.sum())) - np.repeat(word_starts_in_letters, lengths)
    letters = codes[~space].astype(np.uint64) * powers[offset]
    hashes = np.add.reduceat(letters, word_starts_in_letters) if len(starts) else letters[:0]
    hashes ^= lengths.astype(np.uint64) * _MIX
    tokens, distinct = pd.factorize(hashes)
    first = np.empty(len(distinct), dtype=np.int64)
    first[tokens] = np.arange(len(tokens))  # any occurrence will do: equal hashes are equal words
    per_text = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(np.bincount(np.searchsorted(text_starts, starts, "right") - 1, minlength=len(texts)), out=per_text[1:])
    return _Words(codes, starts[first], lengths[first], tokens.astype(np.int64), per_text)


def _word_ngrams(words: _Words, bits: int, ngram_range: tuple[int, int]) -> sp.csr_matrix:
    """Counts of the hashed character n-grams of each distinct word padded by spaces: (words, 2**bits)."""
    lengths = words.lengths
    slot = lengths + 1  # the word and the space before it
    slot_starts = np.cumsum(slot) - slot
    chars = np.full(int(slot.sum()) + 1, _SPACE, dtype=np.uint64)
    offset = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    source = np.repeat(words.starts, lengths) + offset
    chars[np.repeat(slot_starts + 1, lengths) + offset] = words.codes[source]

    space = chars == _SPACE
    lo, hi = ngram_range
    n_pos = len(chars)
    cols = np.zeros((n_pos, hi - lo + 1), dtype=np.int64)
    keep = np.zeros((n_pos, hi - lo + 1), dtype=bool)
    shift = np.uint64(64 - bits)
    hashes = chars[:-1] * _NGRAM_MUL + chars[1:]  # bigrams, the start of the rolling hash
    inner_ok = np.ones(n_pos - 1, dtype=bool)  # no space strictly inside the n-gram
    for n in range(3, hi + 1):
        hashes = hashes[:-1] * _NGRAM_MUL + chars[n - 1 :]
        inner_ok = inner_ok[:-1] & ~space[n - 2 : n_pos - 1]
        if n >= lo and len(hashes):
            cols[: len(hashes), n - lo] = ((hashes ^ np.uint64(n)) * _MIX) >> shift
            keep[: len(hashes), n - lo] = inner_ok
    per_position = keep.sum(axis=1)[: len(chars) - 1]
    counts = np.add.reduceat(per_position, slot_starts) if len(slot) else per_position[:0]
    indptr = np.concatenate([[0], np.cumsum(counts)])
    indices = cols[keep]
    return sp.csr_matrix((np.ones(len(indices), dtype=np.float32), indices, indptr), shape=(len(lengths), 2**bits))


def _text_words(words: _Words) -> sp.csr_matrix:
    """How often each text uses each distinct word: (texts, distinct words)."""
    tokens = words.tokens
    return sp.csr_matrix(
        (np.ones(len(tokens), dtype=np.float32), tokens, words.per_text),
        shape=(len(words.per_text) - 1, len(words.lengths)),
    )


def ngram_counts(
    texts: Sequence[str], *, bits: int = 20, ngram_range: tuple[int, int] = (3, 5), max_chars: int = MAX_CHARS
) -> sp.csr_matrix:
    """The hashed character n-gram counts of each text: a (texts, 2**bits) sparse matrix."""
    words = _words(texts, max_chars)
    counts = _text_words(words) @ _word_ngrams(words, bits, ngram_range)
    counts.sum_duplicates()
    return counts


@cache
def _torch() -> ModuleType | None:
    """torch if installed: its embedding_bag is 2-4x faster than scipy's sparse x dense product."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def _sum_rows(indices: np.ndarray, indptr: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Row r of the result is the sum of ``matrix[indices[indptr[r]:indptr[r + 1]]]`` (a CSR product)."""
    torch = _torch()
    if torch is None:
        rows = sp.csr_matrix(
            (np.ones(len(indices), dtype=matrix.dtype), indices, indptr), shape=(len(indptr) - 1, len(matrix))
        )
        return np.asarray(rows @ matrix)
    return torch.nn.functional.embedding_bag(
        torch.from_numpy(np.ascontiguousarray(indices, dtype=np.int64)),
        torch.from_numpy(matrix),
        torch.from_numpy(np.ascontiguousarray(indptr[:-1], dtype=np.int64)),
        mode="sum",
    ).numpy()


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)  # nothing recognised: stays the zero vector
    return x


def _model_files(path: str | Path) -> tuple[Path, Path]:
    """``<path>.npz`` and ``<path>.json`` (appended, so a dotted name such as ``model.v2`` is kept)."""
    path = Path(path)
    return path.with_name(path.name + ".npz"), path.with_name(path.name + ".json")


@dataclass(eq=False)
class HashingSvdEmbedder:
    """Hashed character n-grams x idf, projected on fitted SVD components; see the module docstring."""

    columns: np.ndarray  # int64 (kept,) hashed n-gram columns the SVD saw
    idf: np.ndarray  # float32 (kept,)
    components: np.ndarray  # float32 (dim, kept)
    bits: int = 20
    ngram_range: tuple[int, int] = (3, 5)
    max_chars: int = MAX_CHARS
    workers: int = 2
    version: str = field(init=False)
    _column_of: np.ndarray = field(init=False, repr=False)  # hashed column -> row of _projection
    _projection: np.ndarray = field(init=False, repr=False)  # (kept + 1, dim); last row zero

    def __post_init__(self) -> None:
        self.columns = np.asarray(self.columns, dtype=np.int64)
        self.idf = np.asarray(self.idf, dtype=np.float32)
        self.components = np.ascontiguousarray(self.components, dtype=np.float32)
        self.ngram_range = (int(self.ngram_range[0]), int(self.ngram_range[1]))
        if self.components.shape[1] != len(self.columns) or len(self.idf) != len(self.columns):
            raise ValueError("columns, idf and components disagree on the number of columns")
        if not 3 <= self.ngram_range[0] <= self.ngram_range[1]:
            raise ValueError("ngram_range must start at 3 or more (shorter n-grams cross word boundaries)")
        self.version = self._content_version()
        unseen = len(self.columns)  # n-grams the SVD never saw map to the zero row
        self._column_of = np.full(2**self.bits, unseen, dtype=np.int64)
        self._column_of[self.columns] = np.arange(len(self.columns))
        # idf folded into the projection: features @ (idf * components).T in one sparse product
        projection = np.zeros((len(self.columns) + 1, self.dim), dtype=np.float32)
        projection[:-1] = (self.components * self.idf).T
        self._projection = projection

    @property
    def dim(self) -> int:
        return int(self.components.shape[0])

    def _params(self) -> dict[str, object]:
        return {
            "format": FORMAT,
            "bits": self.bits,
            "ngram_range": list(self.ngram_range),
            "max_chars": self.max_chars,
            "dim": self.dim,
        }

    def _content_version(self) -> str:
        digest = hashlib.sha256(json.dumps(self._params(), sort_keys=True).encode())
        for array in (self.columns, self.idf, self.components):
            digest.update(np.ascontiguousarray(array).tobytes())
        return f"hsvd{self.dim}-{digest.hexdigest()[:16]}"

    @classmethod
    def fit(
        cls,
        texts: Sequence[str],
        *,
        dim: int = 300,
        sample: int = 20_000,
        seed: int = 0,
        bits: int = 20,
        ngram_range: tuple[int, int] = (3, 5),
        max_chars: int = MAX_CHARS,
        min_df: int = 2,
        max_columns: int = 2**16,
        n_iter: int = 2,
    ) -> HashingSvdEmbedder:
        """Fit the SVD on a random sample of ``texts``; n-grams in fewer than ``min_df`` sampled texts
        and all but the ``max_columns`` most frequent are dropped (they would only add noise and memory)."""
        from sklearn.decomposition import TruncatedSVD

        rng = np.random.default_rng(seed)
        picked = np.sort(rng.choice(len(texts), size=min(sample, len(texts)), replace=False))
        counts = ngram_counts([texts[i] for i in picked], bits=bits, ngram_range=ngram_range, max_chars=max_chars)
        df = np.bincount(counts.indices, minlength=counts.shape[1])
        columns = np.flatnonzero(df >= min_df)
        if len(columns) > max_columns:
            # most frequent first; ties by column so the choice is deterministic
            columns = np.sort(columns[np.lexsort((columns, -df[columns]))[:max_columns]])
        if dim >= min(len(picked), len(columns)):
            raise ValueError(
                f"dim={dim} needs more than {dim} sampled texts and n-gram columns "
                f"(have {len(picked)} texts, {len(columns)} columns)"
            )
        idf = (np.log((1 + len(picked)) / (1 + df[columns])) + 1).astype(np.float32)
        features = counts[:, columns].multiply(idf).tocsr()
        norms = np.sqrt(np.asarray(features.multiply(features).sum(axis=1)).ravel())
        features = sp.diags(1 / np.maximum(norms, 1e-12)) @ features
        svd = TruncatedSVD(n_components=dim, algorithm="randomized", n_iter=n_iter, random_state=seed)
        svd.fit(features.astype(np.float32))
        return cls(
            columns=columns,
            idf=idf,
            components=svd.components_.astype(np.float32),
            bits=bits,
            ngram_range=ngram_range,
            max_chars=max_chars,
        )

    def _encode_batch(self, texts: Sequence[str]) -> np.ndarray:
        words = _words(texts, self.max_chars)
        grams = _word_ngrams(words, self.bits, self.ngram_range)
        word_vectors = _sum_rows(self._column_of[grams.indices], grams.indptr, self._projection)
        return _l2_normalise(_sum_rows(words.tokens, words.per_text, word_vectors))

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings of ``texts``: (n, dim) float32, L2-normalised (zero if no n-gram is known)."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        batches = [texts[i : i + BATCH_DOCS] for i in range(0, len(texts), BATCH_DOCS)]
        workers = min(self.workers, len(batches), os.cpu_count() or 1)
        if workers <= 1:
            return np.concatenate([self._encode_batch(b) for b in batches])
        # numpy and torch release the GIL in the heavy array operations, so two threads overlap
        with ThreadPoolExecutor(workers) as pool:
            return np.concatenate(list(pool.map(self._encode_batch, batches)))

    def save(self, path: str | Path) -> None:
        """Write ``<path>.npz`` (arrays) and ``<path>.json`` (parameters and version); no pickle. Each file is
        replaced whole (``write_atomically``): a save that fails, e.g. on a full disk, leaves an earlier save of the
        same version (the same path) readable, where it used to leave it truncated."""
        arrays, meta = _model_files(path)
        arrays.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(arrays, lambda f: np.savez(f, columns=self.columns, idf=self.idf, components=self.components))
        text = json.dumps({**self._params(), "version": self.version}, indent=2, sort_keys=True)
        write_atomically(meta, lambda f: f.write(text.encode()))

    @classmethod
    def load(cls, path: str | Path) -> HashingSvdEmbedder:
        """Read what ``save`` wrote; a mismatch between the arrays and the recorded version is an error."""
        arrays_path, meta_path = _model_files(path)
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: unsupported embedder format {meta.get('format')!r}")
        try:
            with np.load(arrays_path, allow_pickle=False) as arrays:
                embedder = cls(
                    columns=arrays["columns"],
                    idf=arrays["idf"],
                    components=arrays["components"],
                    bits=int(meta["bits"]),
                    ngram_range=tuple(meta["ngram_range"]),
                    max_chars=int(meta["max_chars"]),
                )
        except (zipfile.BadZipFile, EOFError, KeyError, ValueError) as error:  # numpy names neither file nor cause
            raise ValueError(f"{arrays_path}: unreadable embedder arrays (corrupt or truncated?): {error}") from None
        if embedder.version != meta["version"]:
            raise ValueError(f"{path}: arrays do not match the recorded version {meta['version']}")
        return embedder


class SentenceTransformerEmbedder:
    """Optional backend: a sentence-transformers model on CPU (``pip install sentence-transformers``)."""

    def __init__(self, model: str, *, max_chars: int = MAX_CHARS, batch_size: int = 64) -> None:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise ImportError("SentenceTransformerEmbedder needs the sentence-transformers package") from exc
        self._model = SentenceTransformer(model, device="cpu")
        self.max_chars = max_chars
        self.batch_size = batch_size
        self._dim = int(self._model.get_sentence_embedding_dimension())
        self.version = f"st:{model}:{self._dim}"

    @property
    def dim(self) -> int:
        return self._dim

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings of ``texts``: (n, dim) float32, L2-normalised."""
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self._model.encode(
            [t[: self.max_chars] for t in texts],
            batch_size=self.batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
        )
        return np.asarray(vectors, dtype=np.float32)


@dataclass(frozen=True)
class EmbeddedDocuments:
    """Embeddings of the valid documents of a batch and why the others were skipped."""

    vectors: np.ndarray  # (len(indices), dim) float32
    indices: list[int]  # positions in the input of the embedded documents, in input order
    failures: dict[int, str]  # position in the input -> reason (EMPTY, INVALID_UTF8, TOO_LARGE, "service: ...")


def _as_text(value: str | bytes | None) -> str:
    """Text of a title or body; raises UnicodeError for bytes that are not UTF-8."""
    if value is None:
        return ""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8")
    return value


def _utf8_size_over(value: str | bytes | None, limit: int) -> bool:
    if value is None:
        return False
    if isinstance(value, bytes | bytearray | memoryview) or len(value) > limit:
        return len(value) > limit  # a character is at least one byte
    # at most 4 bytes a character: only measure when the bound is not enough
    return len(value) * 4 > limit and len(value.encode("utf-8", "surrogatepass")) > limit


def check_document(
    title: str | bytes | None, body: str | bytes | None, *, max_chars: int = MAX_CHARS
) -> tuple[str, str | None]:
    """The text to embed for one document, or ``("", reason)`` when it cannot be embedded.

    Only what is embedded (the first ``max_chars`` characters) must be non-blank and free of lone
    surrogates, which can be neither stored nor served; that keeps the check cheap for long documents.
    """
    if _utf8_size_over(body, MAX_BODY_BYTES):
        return "", TOO_LARGE
    try:
        text = document_text(_as_text(title), _as_text(body), max_chars)
        text.encode("utf-8")
    except UnicodeError:
        return "", INVALID_UTF8
    if _VISIBLE.search(text) is None:  # nothing to embed: blank, or only invisible characters
        return "", EMPTY
    return text, None


def embed_documents(
    embedder: Embedder, docs: Sequence[tuple[str | bytes | None, str | bytes | None]]
) -> EmbeddedDocuments:
    """Embed ``(title, body)`` pairs; a bad document is reported in ``failures``, never fails the batch."""
    texts: list[str] = []
    indices: list[int] = []
    failures: dict[int, str] = {}
    max_chars = getattr(embedder, "max_chars", MAX_CHARS)
    for i, (title, body) in enumerate(docs):
        text, reason = check_document(title, body, max_chars=max_chars)
        if reason is None:
            texts.append(text)
            indices.append(i)
        else:
            failures[i] = reason
    if not texts:
        return EmbeddedDocuments(np.zeros((0, embedder.dim), dtype=np.float32), indices, failures)
    encode_checked = getattr(embedder, "encode_checked", None)
    # a backend that can fail per text (an inference service): its failures join the document failures
    vectors, failed = (embedder.encode(texts), {}) if encode_checked is None else encode_checked(texts)
    # A vector of zeros (a text of no n-gram the model knows, emoji only, say) points nowhere: a cosine with it is 0,
    # which ranked it above every real candidate of negative score. It is a failure, not an embedding.
    failed = {**failed, **{j: ZERO_VECTOR for j in np.flatnonzero(~np.any(vectors != 0, axis=1)).tolist()
                           if j not in failed}}  # fmt: skip
    if failed:
        failures.update((indices[j], reason) for j, reason in failed.items())
        keep = np.array([j not in failed for j in range(len(texts))])
        vectors, indices = vectors[keep], [i for j, i in enumerate(indices) if j not in failed]
        failures = dict(sorted(failures.items()))
    return EmbeddedDocuments(vectors=vectors, indices=indices, failures=failures)
