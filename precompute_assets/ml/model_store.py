"""Where trained models live, addressed by an explicit ``(name, version)`` chosen by the caller.

``LocalModelStore`` keeps ``{root}/{name}/{version}/`` with the artifact (``model.joblib``, or ``state_dict.pt`` for
PyTorch weights), ``metadata.json`` and ``integrity.json``. A version's folder is written in full under a temporary
name and then renamed into place, so readers see either the whole version or nothing, even if the writer crashes
half way.

Integrity. ``integrity.json`` records the SHA-256 (and size) of the artifact's bytes, computed from the file as
written at save time. A load reads the artifact's bytes once, checks them against that record, and only then
unpickles (joblib) or weights-only-loads (torch) those same verified bytes: a changed, truncated or swapped
artifact raises ``ModelIntegrityError`` and nothing in it runs. A version saved before checksums existed has no
record and is refused too (retrain it, or vouch for the file as it is with ``seal``).

Threat model, honestly: a checksum stored next to the artifact protects against corruption and against someone
who can replace the artifact alone; someone who can rewrite both files can forge the record. Set
``PRECOMPUTE_MODEL_KEY`` (a secret of at least 16 characters, e.g. ``openssl rand -hex 32``; read at each save
and load, never at import) and every record is also signed with HMAC-SHA256 over the model name, version,
artifact file and digest: without the key nobody can forge a signature, and a signed artifact cannot be
replayed under another name or version. While the key is set, unsigned records and bad signatures are refused;
while it is unset, a signed record is refused as unverifiable (fail closed: a worker missing the key does not
quietly downgrade to the bare checksum). ``metadata.json`` is plain JSON, never executed, and not covered.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import io
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Collection
from pathlib import Path
from typing import IO, Any, Protocol, runtime_checkable

import joblib

# Same alphabet and length as the Redis key schema's versions, so a model version can name a cache version.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MODEL_FILE = "model.joblib"
METADATA_FILE = "metadata.json"
STATE_DICT_FILE = "state_dict.pt"  # torch weights only: read with weights_only=True, never unpickled
INTEGRITY_FILE = "integrity.json"  # the artifact's SHA-256 (and HMAC signature), written with it
ARTIFACT_FILES = (MODEL_FILE, STATE_DICT_FILE)
ENV_MODEL_KEY = "PRECOMPUTE_MODEL_KEY"
MIN_KEY_LENGTH = 16
INTEGRITY_FORMAT = 1
_TEMP_PREFIX = ".tmp-"
# The daily assets name a version by its partition's day and run ("2026-11-18.1a2b3c4d"): retention reads the day.
DAY_VERSION = re.compile(r"(\d{4}-\d{2}-\d{2})\.")
_CHUNK = 1 << 20
STALE_STAGING_S = 3600  # a staging folder this old is a killed save's: no save of one model takes an hour


class ModelIntegrityError(ValueError):
    """A stored model whose artifact cannot be shown to be the one that was saved (changed bytes, a missing or
    malformed checksum record, a bad or unverifiable signature): refused before anything in it is loaded."""

    def __init__(self, name: str, version: str, problem: str) -> None:
        super().__init__(f"model {name!r} version {version!r}: {problem}")
        self.name = name
        self.version = version
        self.problem = problem


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


def model_key() -> bytes | None:
    """The signing key from ``PRECOMPUTE_MODEL_KEY`` as it is now (None when unset or empty)."""
    raw = os.environ.get(ENV_MODEL_KEY, "")
    if not raw:
        return None
    if len(raw) < MIN_KEY_LENGTH:
        raise ValueError(f"{ENV_MODEL_KEY} is too short: use a random secret of at least {MIN_KEY_LENGTH} characters")
    return raw.encode()


def signature(key: bytes, name: str, version: str, file: str, sha256: str) -> str:
    """HMAC-SHA256 (hex) that binds an artifact's digest to its model name, version and file."""
    message = f"precompute-model-integrity/{INTEGRITY_FORMAT}\n{name}\n{version}\n{file}\n{sha256}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def integrity_record(name: str, version: str, file: str, data_sha256: str, size: int) -> dict:
    """What ``integrity.json`` holds for an artifact, signed when ``PRECOMPUTE_MODEL_KEY`` is set."""
    record: dict[str, Any] = {"format": INTEGRITY_FORMAT, "file": file, "size": size, "sha256": data_sha256}
    key = model_key()
    if key is not None:
        record["hmac_sha256"] = signature(key, name, version, file, data_sha256)
    return record


def _sha256_file(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def fsync_path(path: str | Path) -> None:
    """Flush a local file's (or folder's) data to the disk (``fsync``): the page cache alone loses it with the power."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _VerifiedBytes(io.BytesIO):
    """The verified bytes of an artifact, named like it in messages (``str()`` is the file's path)."""

    def __init__(self, data: bytes, label: str) -> None:
        super().__init__(data)
        self._label = label

    def __str__(self) -> str:
        return self._label

    __repr__ = __str__


@functools.cache
def _state_dict_integrity_error() -> type[ModelIntegrityError]:
    """``ModelIntegrityError`` that is also ``demand.UnsafeModelFile``, which ``load_state_dict`` documents."""
    from .demand import UnsafeModelFile  # torch only where weights are loaded

    class StateDictIntegrityError(ModelIntegrityError, UnsafeModelFile):
        """A state_dict whose bytes failed the integrity check (refused before ``torch.load``)."""

    return StateDictIntegrityError


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
        """Write ``model`` (joblib), its checksum record and ``metadata`` as ``name``/``version`` and return its
        ``file://`` URI.

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
        # Serialise metadata first so a bad value fails before anything touches the disk (a bad key too).
        metadata_json = json.dumps(metadata, indent=2, sort_keys=True, allow_nan=False)
        model_key()
        staging = final.parent / f"{_TEMP_PREFIX}{version}-{uuid.uuid4().hex}"
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            staging.mkdir()
            with open(staging / filename, "wb") as f:
                dump(f)
                f.flush()
                os.fsync(f.fileno())
            # The digest of the bytes on disk, as any later load will read them.
            record = integrity_record(name, version, filename, *_sha256_file(staging / filename))
            _write_synced(staging / INTEGRITY_FILE, json.dumps(record, indent=2, sort_keys=True))
            _write_synced(staging / METADATA_FILE, metadata_json)
            self._publish(staging, final)
        except BaseException as error:
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(error, OSError) and not isinstance(error, FileExistsError):  # say where (disk full...)
                message = f"the model store could not write {final}: {error.strerror or error}"
                raise (OSError(error.errno, message) if error.errno else OSError(message)) from error
            raise
        fsync_path(final.parent)
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

    def versions(self, name: str) -> list[str]:
        """The stored versions of ``name``, sorted (writes in progress and their leftovers excluded)."""
        folder = self.root / validate_component(name, "name")
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(_TEMP_PREFIX))

    def delete(self, name: str, version: str) -> None:
        """Remove one version, if it is there: renamed aside first, so a reader finds it whole or not at all."""
        final = self.path(name, version)
        retired = final.parent / f"{_TEMP_PREFIX}old-{version}-{uuid.uuid4().hex}"
        try:
            os.rename(final, retired)
        except FileNotFoundError:
            return
        shutil.rmtree(retired, ignore_errors=True)

    def prune(self, name: str, *, before_day: str, keep: Collection[str]) -> list[str]:
        """Delete the versions of ``name`` named for a day before ``before_day`` (YYYY-MM-DD), except ``keep``, and
        return them; a version whose name does not start with a day is never deleted."""
        old = [
            version
            for version in self.versions(name)
            if (day := DAY_VERSION.match(version)) and day.group(1) < before_day and version not in keep
        ]
        for version in old:
            self.delete(name, version)
        self._sweep_stale_staging(name)
        return old

    def _sweep_stale_staging(self, name: str) -> None:
        """Delete the staging folders of saves killed before they could (SIGKILL, a lost machine): each held a whole
        model. Older than ``STALE_STAGING_S``, so a save in progress keeps its own."""
        folder = self.root / validate_component(name, "name")
        cutoff = time.time() - STALE_STAGING_S
        for path in folder.glob(f"{_TEMP_PREFIX}*") if folder.is_dir() else ():
            with contextlib.suppress(OSError):
                if path.is_dir() and path.stat().st_mtime < cutoff:
                    shutil.rmtree(path, ignore_errors=True)

    def _existing(self, name: str, version: str, file: str) -> Path:
        path = self.path(name, version) / file
        if not path.is_file():
            raise KeyError(f"model {name!r} version {version!r} not found in store {self.root}")
        return path

    def _record(self, name: str, version: str) -> dict | None:
        """The version's integrity record, None when it has none; ``ModelIntegrityError`` when it is malformed."""
        path = self.path(name, version) / INTEGRITY_FILE
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            raise ModelIntegrityError(name, version, f"unreadable checksum record {path}: {error}") from None
        if (
            not isinstance(record, dict)
            or record.get("format") != INTEGRITY_FORMAT
            or record.get("file") not in ARTIFACT_FILES
            or not isinstance(record.get("sha256"), str)
            or not isinstance(record.get("size"), int)
            or not isinstance(record.get("hmac_sha256", ""), str)
        ):
            raise ModelIntegrityError(name, version, f"malformed checksum record {path}")
        return record

    def _verified_bytes(self, name: str, version: str, file: str) -> bytes:
        """The artifact's bytes, read once and checked against the version's record; nothing is deserialised."""
        path = self._existing(name, version, file)
        record = self._record(name, version)
        if record is None:
            raise ModelIntegrityError(
                name,
                version,
                f"{path} has no recorded checksum ({INTEGRITY_FILE}; saved before checksums existed?), so it is "
                f"not loaded: retrain the model, or, if you trust the file as it is now, record its checksum with "
                f"LocalModelStore({str(self.root)!r}).seal({name!r}, {version!r})",
            )
        if record["file"] != file:
            raise ModelIntegrityError(name, version, f"the checksum record is for {record['file']}, not {file}")
        data = path.read_bytes()
        self._check(name, version, record, data, path)
        return data

    @staticmethod
    def _check(name: str, version: str, record: dict, data: bytes, path: Path, *, signature_too: bool = True) -> None:
        """Raise ``ModelIntegrityError`` unless ``data`` matches ``record`` (and its signature, see the module)."""
        digest = hashlib.sha256(data).hexdigest()
        if len(data) != record["size"] or not hmac.compare_digest(digest, record["sha256"]):
            raise ModelIntegrityError(
                name,
                version,
                f"{path} does not match the checksum recorded when it was saved (sha256 {digest[:16]}... of "
                f"{len(data)} bytes, recorded {record['sha256'][:16]}... of {record['size']} bytes): it was changed "
                "or corrupted after saving and is not loaded; retrain the model or restore the file",
            )
        if not signature_too:
            return
        key = model_key()
        signed = record.get("hmac_sha256")
        if key is None and signed:
            raise ModelIntegrityError(
                name, version, f"it is signed, but {ENV_MODEL_KEY} is not set here: its signature cannot be verified"
            )
        if key is not None:
            if not signed:
                raise ModelIntegrityError(
                    name,
                    version,
                    f"{ENV_MODEL_KEY} is set but the version is not signed: retrain it, or re-seal it with the key "
                    "set if you trust the file as it is now",
                )
            if not hmac.compare_digest(signature(key, name, version, record["file"], digest), signed):
                raise ModelIntegrityError(
                    name, version, f"bad signature: not signed with this {ENV_MODEL_KEY}, or the record was forged"
                )

    def verify(self, name: str, version: str) -> str:
        """Check ``name``/``version``'s artifact against its record (and signature) without loading it; returns
        its SHA-256. ``KeyError`` if there is no such version, ``ModelIntegrityError`` if it fails."""
        for file in ARTIFACT_FILES:
            if (self.path(name, version) / file).is_file():
                return hashlib.sha256(self._verified_bytes(name, version, file)).hexdigest()
        raise KeyError(f"model {name!r} version {version!r} not found in store {self.root}")

    def seal(self, name: str, version: str) -> dict:
        """Record the checksum (signed if ``PRECOMPUTE_MODEL_KEY`` is set) of an existing version's artifact as it
        is now, so that it loads: the explicit opt-in for versions saved before checksums existed, or for signing a
        checksummed version once a key is introduced. Nothing is deserialised.

        Sealing vouches for the bytes as they are: do it only for files you trust. A version that already has a
        record is re-sealed only if its bytes still match it (and its signature, if signed), so sealing never
        blesses a changed artifact. Returns the record written.
        """
        folder = self.path(name, version)
        files = [file for file in ARTIFACT_FILES if (folder / file).is_file()]
        if not files:
            raise KeyError(f"model {name!r} version {version!r} not found in store {self.root}")
        path = folder / files[0]
        data = path.read_bytes()
        existing = self._record(name, version)
        if existing is not None:
            if existing["file"] != files[0]:
                raise ModelIntegrityError(name, version, f"the checksum record is for {existing['file']}")
            # Signing a checksummed version once a key is introduced: its checksum must still hold.
            signing = model_key() is not None and not existing.get("hmac_sha256")
            self._check(name, version, existing, data, path, signature_too=not signing)
        record = integrity_record(name, version, files[0], hashlib.sha256(data).hexdigest(), len(data))
        write_atomically(
            folder / INTEGRITY_FILE, lambda f: f.write(json.dumps(record, indent=2, sort_keys=True).encode())
        )
        fsync_path(folder)
        return record

    def load(self, name: str, version: str) -> Any:
        """The model saved as ``name``/``version``, unpickled only from bytes that match the checksum recorded at
        save time; ``KeyError`` if there is none, ``ModelIntegrityError`` if the file is not the one saved."""
        data = self._verified_bytes(name, version, MODEL_FILE)
        return joblib.load(_VerifiedBytes(data, str(self.path(name, version) / MODEL_FILE)))

    def metadata(self, name: str, version: str) -> dict:
        """The metadata saved with ``name``/``version``; ``KeyError`` if there is none."""
        return json.loads(self._existing(name, version, METADATA_FILE).read_text(encoding="utf-8"))

    def save_state_dict(
        self, name: str, version: str, state_dict: dict, metadata: dict, *, overwrite: bool = False
    ) -> str:
        """Write a PyTorch ``state_dict`` (names to tensors, via ``torch.save``), its checksum record and ``metadata``
        as ``name``/``version``, all or nothing like ``save``; returns its ``file://`` URI."""
        from .demand import save_weights  # torch only where weights are stored

        return self._write(name, version, STATE_DICT_FILE, lambda f: save_weights(state_dict, f), metadata, overwrite)

    def load_state_dict(self, name: str, version: str) -> dict:
        """The ``state_dict`` saved as ``name``/``version``: its bytes are checked against the checksum recorded at
        save time, then read with ``torch.load(weights_only=True)``. A file that fails the check, or is not a plain
        state_dict, raises ``demand.UnsafeModelFile`` (a ``ModelIntegrityError`` for the former) and nothing in it
        runs; ``KeyError`` if there is none."""
        from .demand import load_weights

        try:
            data = self._verified_bytes(name, version, STATE_DICT_FILE)
        except ModelIntegrityError as error:
            raise _state_dict_integrity_error()(name, version, error.problem) from None
        return load_weights(_VerifiedBytes(data, str(self.path(name, version) / STATE_DICT_FILE)))


def write_atomically(path: str | os.PathLike[str], write: Callable[[IO[bytes]], object]) -> None:
    """Write ``path`` through ``write`` into a hidden temporary file beside it, fsynced, then renamed over it: readers
    see the old file or the new one whole, and a write that fails (disk full) leaves the old one as it was and no
    temporary file. Its ``OSError`` names ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{_TEMP_PREFIX}{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if isinstance(error, OSError):
            message = f"could not write {path}: {error.strerror or error}"
            raise (OSError(error.errno, message) if error.errno else OSError(message)) from error
        raise


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
