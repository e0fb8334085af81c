"""The local model store: round trips, explicit versions, and saves that never leave half a model."""

from __future__ import annotations

from pathlib import Path

import joblib
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from precompute_assets.ml import model_store
from precompute_assets.ml.model_store import LocalModelStore, ModelStore


class Unpicklable:
    """Fails half way through serialisation, after joblib has already written bytes."""

    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


def small_model(flip: bool = False) -> LogisticRegression:
    x = np.array([[0.0], [1.0], [2.0], [3.0]])
    y = np.array([0, 0, 1, 1])
    return LogisticRegression().fit(x, 1 - y if flip else y)


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_local_store_is_a_model_store(tmp_path: Path) -> None:
    assert isinstance(LocalModelStore(tmp_path), ModelStore)


def test_round_trip_model_and_metadata(tmp_path: Path) -> None:
    store = LocalModelStore(tmp_path / "models")
    model = small_model()
    metadata = {"auc": 0.71, "features": ["quality", "log_bid"], "train_days": [19700, 19706]}
    uri = store.save("ctr_rf", "2024-06-01.r1", model, metadata)

    folder = tmp_path / "models" / "ctr_rf" / "2024-06-01.r1"
    assert uri == folder.resolve().as_uri()
    assert sorted(p.name for p in folder.iterdir()) == ["metadata.json", "model.joblib"]
    loaded = store.load("ctr_rf", "2024-06-01.r1")
    x = np.array([[0.5], [2.5]])
    np.testing.assert_array_equal(loaded.predict_proba(x), model.predict_proba(x))
    assert store.metadata("ctr_rf", "2024-06-01.r1") == metadata
    assert store.exists("ctr_rf", "2024-06-01.r1")


def test_versions_are_explicit_not_newest(tmp_path: Path) -> None:
    store = LocalModelStore(tmp_path)
    store.save("ctr", "v1", small_model(), {"v": 1})
    store.save("ctr", "v2", small_model(flip=True), {"v": 2})
    x = np.array([[3.0]])
    assert store.load("ctr", "v1").predict(x).tolist() == [1]
    assert store.load("ctr", "v2").predict(x).tolist() == [0]
    assert store.metadata("ctr", "v1") == {"v": 1}


def test_missing_version_raises_key_error(tmp_path: Path) -> None:
    store = LocalModelStore(tmp_path)
    with pytest.raises(KeyError, match="model 'ctr' version 'v9' not found"):
        store.load("ctr", "v9")
    store.save("ctr", "v1", small_model(), {})
    with pytest.raises(KeyError, match="version 'v2' not found"):
        store.metadata("ctr", "v2")
    with pytest.raises(KeyError, match="model 'other' version 'v1' not found"):
        store.load("other", "v1")
    assert not store.exists("ctr", "v2")


@pytest.mark.parametrize("version", ["", ".", "..", "a/b", "../v1", "v 1", "v1\n", "é", "x" * 65, ".tmp-v1"])
def test_invalid_versions_are_rejected(tmp_path: Path, version: str) -> None:
    store = LocalModelStore(tmp_path)
    with pytest.raises(ValueError, match="invalid model version"):
        store.save("ctr", version, small_model(), {})
    with pytest.raises(ValueError, match="invalid model version"):
        store.load("ctr", version)
    assert leftovers(tmp_path) == []


def test_invalid_names_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="invalid model name"):
        LocalModelStore(tmp_path).save("../escape", "v1", small_model(), {})
    assert leftovers(tmp_path) == []


def test_crash_while_serialising_leaves_nothing_behind(tmp_path: Path) -> None:
    store = LocalModelStore(tmp_path)
    with pytest.raises(RuntimeError, match="cannot pickle this"):
        store.save("ctr", "v1", {"weights": np.arange(100_000), "broken": Unpicklable()}, {"ok": True})
    assert not (tmp_path / "ctr" / "v1").exists()
    assert leftovers(tmp_path) == ["ctr"]
    with pytest.raises(KeyError):
        store.load("ctr", "v1")
    # The failed attempt did not claim the version.
    store.save("ctr", "v1", small_model(), {})
    assert store.load("ctr", "v1").predict(np.array([[3.0]])).tolist() == [1]


def test_crash_after_partial_write_keeps_previous_version_intact(tmp_path: Path, monkeypatch) -> None:
    store = LocalModelStore(tmp_path)
    store.save("ctr", "v1", small_model(), {"v": 1})

    def dump_half_then_die(value, f, *args, **kwargs):
        f.write(b"\x80\x04half a pickle")
        raise OSError("disk full")

    monkeypatch.setattr(model_store.joblib, "dump", dump_half_then_die)
    with pytest.raises(OSError, match="disk full"):
        store.save("ctr", "v2", small_model(flip=True), {"v": 2})
    with pytest.raises(OSError, match="disk full"):
        store.save("ctr", "v1", small_model(flip=True), {"v": 2}, overwrite=True)

    assert leftovers(tmp_path) == ["ctr", "ctr/v1", "ctr/v1/metadata.json", "ctr/v1/model.joblib"]
    assert store.metadata("ctr", "v1") == {"v": 1}
    assert store.load("ctr", "v1").predict(np.array([[3.0]])).tolist() == [1]


def test_a_version_is_not_replaced_unless_asked(tmp_path: Path) -> None:
    store = LocalModelStore(tmp_path)
    store.save("ctr", "v1", small_model(), {"v": 1})
    with pytest.raises(FileExistsError, match="version 'v1' already exists"):
        store.save("ctr", "v1", small_model(flip=True), {"v": 2})
    assert store.metadata("ctr", "v1") == {"v": 1}

    store.save("ctr", "v1", small_model(flip=True), {"v": 2}, overwrite=True)
    assert store.metadata("ctr", "v1") == {"v": 2}
    assert store.load("ctr", "v1").predict(np.array([[3.0]])).tolist() == [0]
    assert leftovers(tmp_path) == ["ctr", "ctr/v1", "ctr/v1/metadata.json", "ctr/v1/model.joblib"]


def test_unserialisable_metadata_fails_before_writing(tmp_path: Path) -> None:
    store = LocalModelStore(tmp_path)
    with pytest.raises(TypeError):
        store.save("ctr", "v1", small_model(), {"when": object()})
    with pytest.raises(ValueError):
        store.save("ctr", "v1", small_model(), {"auc": float("nan")})
    assert leftovers(tmp_path) == []


def test_saved_model_is_a_plain_joblib_file(tmp_path: Path) -> None:
    # Other tools (a notebook, a serving process) can read a version without this module.
    store = LocalModelStore(tmp_path)
    store.save("ctr", "v1", {"coef": [1.0, 2.0]}, {})
    assert joblib.load(tmp_path / "ctr" / "v1" / "model.joblib") == {"coef": [1.0, 2.0]}
