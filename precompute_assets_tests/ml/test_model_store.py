"""The local model store: round trips, explicit versions, and saves that never leave half a model."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import time
from pathlib import Path

import joblib
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from precompute_assets.ml import model_store
from precompute_assets.ml.model_store import ENV_MODEL_KEY, LocalModelStore, ModelIntegrityError, ModelStore


class Unpicklable:
    """Fails half way through serialisation, after joblib has already written bytes."""

    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


def small_model(flip: bool = False) -> LogisticRegression:
    x = np.array([[0.0], [1.0], [2.0], [3.0]])
    y = np.array([0, 0, 1, 1])
    return LogisticRegression().fit(x, 1 - y if flip else y)


VERSION_FILES = ["ctr", "ctr/v1", "ctr/v1/integrity.json", "ctr/v1/metadata.json", "ctr/v1/model.joblib"]


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
    assert sorted(p.name for p in folder.iterdir()) == ["integrity.json", "metadata.json", "model.joblib"]
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

    assert leftovers(tmp_path) == VERSION_FILES
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
    assert leftovers(tmp_path) == VERSION_FILES


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


# --- integrity: a checksum recorded at save, verified before anything is unpickled -------------------------

KEY = "k" * 8 + "0123456789abcdef"


class WritesAFile:
    """A pickle that would create ``path`` if it were ever unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(autouse=True)
def no_model_key(monkeypatch) -> None:
    """Tests start without a signing key, whatever the environment holds."""
    monkeypatch.delenv(ENV_MODEL_KEY, raising=False)


def flip_one_byte(path: Path, at: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_the_checksum_of_the_bytes_on_disk_is_recorded_at_save(tmp_path: Path) -> None:
    import hashlib

    store = LocalModelStore(tmp_path)
    store.save("ctr", "v1", small_model(), {"v": 1})
    record = json.loads((tmp_path / "ctr" / "v1" / "integrity.json").read_text())
    data = (tmp_path / "ctr" / "v1" / "model.joblib").read_bytes()
    assert record == {
        "format": 1,
        "file": "model.joblib",
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    assert store.verify("ctr", "v1") == record["sha256"]
    assert store.metadata("ctr", "v1") == {"v": 1}  # the record is not mixed into the caller's metadata


def test_one_flipped_byte_is_refused_before_unpickling(tmp_path: Path, monkeypatch) -> None:
    store = LocalModelStore(tmp_path)
    store.save("ctr", "v1", small_model(), {})
    flip_one_byte(tmp_path / "ctr" / "v1" / "model.joblib")
    unpickled = []
    monkeypatch.setattr(model_store.joblib, "load", lambda *a, **k: unpickled.append(a))
    with pytest.raises(ModelIntegrityError, match="model 'ctr' version 'v1'.*does not match the checksum") as error:
        store.load("ctr", "v1")
    assert isinstance(error.value, ValueError) and (error.value.name, error.value.version) == ("ctr", "v1")
    assert unpickled == []
    with pytest.raises(ModelIntegrityError):
        store.verify("ctr", "v1")


def test_a_swapped_malicious_pickle_never_runs(tmp_path: Path) -> None:
    store = LocalModelStore(tmp_path)
    store.save("ctr", "v1", small_model(), {})
    marker = tmp_path / "pwned"
    # The attacker replaces the artifact (the checksum record stays the old one).
    joblib.dump(WritesAFile(marker), tmp_path / "ctr" / "v1" / "model.joblib")
    with pytest.raises(ModelIntegrityError, match="does not match the checksum"):
        store.load("ctr", "v1")
    assert not marker.exists()
    # The same file would have run if it had been unpickled: the test's pickle is live.
    joblib.load(tmp_path / "ctr" / "v1" / "model.joblib")
    assert marker.exists()


def test_a_version_saved_before_checksums_is_refused_until_sealed(tmp_path: Path) -> None:
    store = LocalModelStore(tmp_path)
    store.save("ctr", "v1", small_model(), {})
    (tmp_path / "ctr" / "v1" / "integrity.json").unlink()  # as saved by an older release
    with pytest.raises(ModelIntegrityError, match=r"no recorded checksum.*retrain.*seal\('ctr', 'v1'\)"):
        store.load("ctr", "v1")
    record = store.seal("ctr", "v1")  # the explicit opt-in: the operator vouches for the file as it is
    assert "hmac_sha256" not in record
    assert store.load("ctr", "v1").predict(np.array([[3.0]])).tolist() == [1]
    assert leftovers(tmp_path) == VERSION_FILES


def test_sealing_never_blesses_a_changed_artifact(tmp_path: Path) -> None:
    store = LocalModelStore(tmp_path)
    store.save("ctr", "v1", small_model(), {})
    flip_one_byte(tmp_path / "ctr" / "v1" / "model.joblib")
    with pytest.raises(ModelIntegrityError, match="does not match"):
        store.seal("ctr", "v1")
    with pytest.raises(KeyError):
        store.seal("ctr", "v9")


@pytest.mark.parametrize(
    "record",
    ["not json", "[]", '{"format": 2}', '{"format": 1, "file": "../x", "size": 1, "sha256": "00"}'],
)
def test_a_malformed_record_is_refused(tmp_path: Path, record: str) -> None:
    store = LocalModelStore(tmp_path)
    store.save("ctr", "v1", small_model(), {})
    (tmp_path / "ctr" / "v1" / "integrity.json").write_text(record)
    with pytest.raises(ModelIntegrityError, match="model 'ctr' version 'v1'.*checksum record"):
        store.load("ctr", "v1")


def test_a_signed_artifact_loads_only_with_its_key(tmp_path: Path, monkeypatch) -> None:
    store = LocalModelStore(tmp_path)
    monkeypatch.setenv(ENV_MODEL_KEY, KEY)  # read at call time
    store.save("ctr", "v1", small_model(), {})
    assert "hmac_sha256" in json.loads((tmp_path / "ctr" / "v1" / "integrity.json").read_text())
    assert store.load("ctr", "v1").predict(np.array([[3.0]])).tolist() == [1]

    monkeypatch.setenv(ENV_MODEL_KEY, KEY[::-1])
    with pytest.raises(ModelIntegrityError, match="bad signature"):
        store.load("ctr", "v1")
    monkeypatch.delenv(ENV_MODEL_KEY)
    with pytest.raises(ModelIntegrityError, match="signed, but PRECOMPUTE_MODEL_KEY is not set"):
        store.load("ctr", "v1")


def test_with_a_key_an_attacker_who_rewrites_artifact_and_checksum_is_refused(tmp_path: Path, monkeypatch) -> None:
    import hashlib

    monkeypatch.setenv(ENV_MODEL_KEY, KEY)
    store = LocalModelStore(tmp_path)
    store.save("ctr", "v1", small_model(), {})
    folder = tmp_path / "ctr" / "v1"
    marker = tmp_path / "pwned"
    joblib.dump(WritesAFile(marker), folder / "model.joblib")
    data = (folder / "model.joblib").read_bytes()
    record = json.loads((folder / "integrity.json").read_text())
    forged = {**record, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "integrity.json").write_text(json.dumps(forged))
    with pytest.raises(ModelIntegrityError, match="bad signature"):
        store.load("ctr", "v1")
    (folder / "integrity.json").write_text(json.dumps({k: v for k, v in forged.items() if k != "hmac_sha256"}))
    with pytest.raises(ModelIntegrityError, match="PRECOMPUTE_MODEL_KEY is set but the version is not signed"):
        store.load("ctr", "v1")
    assert not marker.exists()


def test_a_signature_binds_the_name_and_version(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(ENV_MODEL_KEY, KEY)
    store = LocalModelStore(tmp_path)
    store.save("ctr", "v1", small_model(flip=True), {})
    store.save("ctr", "v2", small_model(), {})
    shutil.rmtree(tmp_path / "ctr" / "v2")
    shutil.copytree(tmp_path / "ctr" / "v1", tmp_path / "ctr" / "v2")  # replay v1's signed files as v2
    with pytest.raises(ModelIntegrityError, match="model 'ctr' version 'v2': bad signature"):
        store.load("ctr", "v2")


def test_introducing_a_key_needs_a_seal_of_checksummed_versions(tmp_path: Path, monkeypatch) -> None:
    store = LocalModelStore(tmp_path)
    store.save("ctr", "v1", small_model(), {})
    monkeypatch.setenv(ENV_MODEL_KEY, KEY)
    with pytest.raises(ModelIntegrityError, match="not signed"):
        store.load("ctr", "v1")
    assert "hmac_sha256" in store.seal("ctr", "v1")
    assert store.load("ctr", "v1").predict(np.array([[3.0]])).tolist() == [1]
    monkeypatch.delenv(ENV_MODEL_KEY)
    with pytest.raises(ModelIntegrityError, match="not set"):
        store.seal("ctr", "v1")  # no quiet downgrade of a signed record


def test_a_short_key_fails_before_writing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(ENV_MODEL_KEY, "short")
    with pytest.raises(ValueError, match="PRECOMPUTE_MODEL_KEY is too short"):
        LocalModelStore(tmp_path).save("ctr", "v1", small_model(), {})
    assert leftovers(tmp_path) == []


def test_state_dicts_are_checksummed_too(tmp_path: Path, monkeypatch) -> None:
    torch = pytest.importorskip("torch", reason="torch is not installed")
    from precompute_assets.ml.demand import UnsafeModelFile

    store = LocalModelStore(tmp_path)
    state = {"w": torch.arange(64, dtype=torch.float32), "b": torch.zeros(3)}
    store.save_state_dict("demand", "v1", state, {"top_n": 5})
    loaded = store.load_state_dict("demand", "v1")
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    path = tmp_path / "demand" / "v1" / "state_dict.pt"
    assert store.verify("demand", "v1") == json.loads((path.parent / "integrity.json").read_text())["sha256"]

    original = path.read_bytes()
    flip_one_byte(path, at=len(original) // 2)
    with pytest.raises(ModelIntegrityError, match="model 'demand' version 'v1'.*does not match") as error:
        store.load_state_dict("demand", "v1")
    assert isinstance(error.value, UnsafeModelFile)  # what load_state_dict always documented

    marker = tmp_path / "pwned"
    path.write_bytes(pickle.dumps(WritesAFile(marker)))
    loads = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a))
    with pytest.raises(UnsafeModelFile):
        store.load_state_dict("demand", "v1")
    assert not marker.exists() and loads == []
    with pytest.raises(ModelIntegrityError, match="checksum record is for state_dict.pt"):
        (path.parent / "model.joblib").write_bytes(original)
        store.load("demand", "v1")


def test_prune_deletes_the_versions_of_days_before_the_cutoff_but_those_kept(tmp_path: Path) -> None:
    store = LocalModelStore(tmp_path)
    for version in ("2026-10-30.aaaa1111", "2026-10-31.bbbb2222", "2026-11-01.cccc3333", "hand-made"):
        store.save("m", version, small_model(), {})
    (tmp_path / "m" / ".tmp-2026-10-01.dddd4444-x").mkdir()  # a write in progress is not a version
    assert store.versions("m") == ["2026-10-30.aaaa1111", "2026-10-31.bbbb2222", "2026-11-01.cccc3333", "hand-made"]
    assert store.prune("m", before_day="2026-11-01", keep={"2026-10-31.bbbb2222"}) == ["2026-10-30.aaaa1111"]
    assert store.versions("m") == ["2026-10-31.bbbb2222", "2026-11-01.cccc3333", "hand-made"]
    assert not store.exists("m", "2026-10-30.aaaa1111") and store.load("m", "2026-10-31.bbbb2222") is not None
    assert store.versions("other") == [] and store.prune("other", before_day="2026-11-01", keep=()) == []
    store.delete("m", "2026-10-30.aaaa1111")  # already gone: nothing to do


def test_prune_sweeps_the_staging_folders_of_killed_saves_once_stale(tmp_path: Path) -> None:
    """A save killed before its rename left a whole model in ``.tmp-...``: the next prune deletes it an hour on."""
    store = LocalModelStore(tmp_path)
    store.save("m", "2026-11-01.aaaa1111", small_model(), {})
    killed, running = tmp_path / "m" / ".tmp-2026-11-02.bbbb-1", tmp_path / "m" / ".tmp-2026-11-03.cccc-2"
    for folder in (killed, running):
        folder.mkdir()
        (folder / "model.joblib").write_bytes(b"x" * 1000)
    two_hours_ago = time.time() - 7200
    os.utime(killed, (two_hours_ago, two_hours_ago))
    assert store.prune("m", before_day="2026-01-01", keep=()) == []
    assert not killed.exists() and running.exists() and store.versions("m") == ["2026-11-01.aaaa1111"]
