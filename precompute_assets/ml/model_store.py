"""Where trained models live, addressed by an explicit ``(name, version)`` chosen by the caller.

``LocalModelStore`` keeps ``{root}/{name}/{version}/model.joblib`` and ``metadata.json``. A version's
folder is written in full under a temporary name and then renamed into place, so readers see either the
whole version or nothing, even if the writer crashes half way.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Protocol, runtime_checkable

import joblib

# Same alphabet and length as the Redis key schema's versions, so a model version can name a cache version.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MODEL_FILE = "model.joblib"
METADATA_FILE = "metadata.json"
STATE_DICT_FILE = "state_dict.pt"  # torch weights only: read with weights_only=True, never unpickled
_TEMP_PREFIX = ".tmp-"


@runtime_checkable
class ModelStore(Protocol):
    """Saves and loads models by explicit name and version; never "the newest"."""

    def save(self, name: str, version: str, model: object, metadata: dict) -> str: ...

    def load(self, name: str, version: str) -> object: ...

    def metadata(self, name: str, version: str) -> dict: ...


def validate_component(value: str, what: str) -> str:
    """``value`` if it is a safe single path component ([A-Za-z0-9_.-], 1-64 chars, not ``.``/``..``)."""
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value) or value in {".", ".."}:
        raise ValueError(f"invalid model {what} {value!r}: use 1-64 characters from [A-Za-z0-9_.-]")
    if value.startswith(_TEMP_PREFIX):
        raise ValueError(f"invalid model {what} {value!r}: the prefix {_TEMP_PREFIX!r} is reserved")
    return value


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalModelStore:
    """A ``ModelStore`` on a local (or mounted) folder."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        if not os.fspath(root).strip():
            raise ValueError("the model store needs a folder: an empty path would be the working directory")
        self.root = Path(root)

    def path(self, name: str, version: str) -> Path:
        """The folder of one version (whether or not it exists)."""
        return self.root / validate_component(name, "name") / validate_component(version, "version")

    def exists(self, name: str, version: str) -> bool:
        return (self.path(name, version) / MODEL_FILE).is_file()

    def save(self, name: str, version: str, model: object, metadata: dict, *, overwrite: bool = False) -> str:
        """Write ``model`` and ``metadata`` as ``name``/``version`` and return its ``file://`` URI.

        An existing version is only replaced with ``overwrite=True``: a version names one model for good.
        """
        return self._write(name, version, MODEL_FILE, lambda f: joblib.dump(model, f), metadata, overwrite)

    def _write(
        self, name: str, version: str, filename: str, dump: Callable[[IO[bytes]], object], metadata: dict,
        overwrite: bool,
    ) -> str:  # fmt: skip
        """Write one version all or nothing: into a staging folder, fsynced, then renamed into place."""
        final = self.path(name, version)
        if final.exists() and not overwrite:
            raise FileExistsError(f"model {name!r} version {version!r} already exists at {final}")
        # Serialise metadata first so a bad value fails before anything touches the disk.
        metadata_json = json.dumps(metadata, indent=2, sort_keys=True, allow_nan=False)
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = final.parent / f"{_TEMP_PREFIX}{version}-{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            with open(staging / filename, "wb") as f:
                dump(f)
                f.flush()
                os.fsync(f.fileno())
            with open(staging / METADATA_FILE, "w", encoding="utf-8") as f:
                f.write(metadata_json)
                f.flush()
                os.fsync(f.fileno())
            self._publish(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _fsync_dir(final.parent)
        return final.resolve().as_uri()

    @staticmethod
    def _publish(staging: Path, final: Path) -> None:
        # rename() of a folder onto an existing non-empty folder fails, so an overwrite moves the old
        # version aside first: a crash in between leaves the version missing, never half-written.
        retired = None
        if final.exists():
            retired = final.parent / f"{_TEMP_PREFIX}old-{final.name}-{uuid.uuid4().hex}"
            os.rename(final, retired)
        os.rename(staging, final)
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)

    def _existing(self, name: str, version: str, file: str) -> Path:
        path = self.path(name, version) / file
        if not path.is_file():
            raise KeyError(f"model {name!r} version {version!r} not found in store {self.root}")
        return path

    def load(self, name: str, version: str) -> Any:
        """The model saved as ``name``/``version``; ``KeyError`` if there is none."""
        return joblib.load(self._existing(name, version, MODEL_FILE))

    def metadata(self, name: str, version: str) -> dict:
        """The metadata saved with ``name``/``version``; ``KeyError`` if there is none."""
        return json.loads(self._existing(name, version, METADATA_FILE).read_text(encoding="utf-8"))

    def save_state_dict(
        self, name: str, version: str, state_dict: dict, metadata: dict, *, overwrite: bool = False
    ) -> str:
        """Write a PyTorch ``state_dict`` (names to tensors, via ``torch.save``) and ``metadata`` as
        ``name``/``version``, all or nothing like ``save``; returns its ``file://`` URI."""
        from .demand import save_weights  # torch only where weights are stored

        return self._write(name, version, STATE_DICT_FILE, lambda f: save_weights(state_dict, f), metadata, overwrite)

    def load_state_dict(self, name: str, version: str) -> dict:
        """The ``state_dict`` saved as ``name``/``version``, read with ``torch.load(weights_only=True)``: a file that
        is not a plain state_dict raises ``demand.UnsafeModelFile`` and nothing in it runs; ``KeyError`` if none."""
        from .demand import load_weights

        return load_weights(self._existing(name, version, STATE_DICT_FILE))
