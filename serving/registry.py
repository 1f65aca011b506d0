"""The model repository: Triton's layout on a local path or any `pyarrow.fs` filesystem (`serving.storage`).

```
<root>/<model>/config.pbtxt                 ModelConfig (text protobuf)
<root>/<model>/<version>/model.pt           TorchScript
<root>/<model>/<version>/metadata.json      fleet's metadata
<root>/<model>/<version>/_fleet_complete    fleet's: written last, the version is published
<root>/<model>/serving.json                 fleet's: an administrator's unload or version pin
```

A published version is immutable, and a reader never sees half of one:

- Local (or mounted) repository: the files, metadata.json and the marker are written into a
  staging folder that is renamed into place. A folder holding the model file is a version (a
  Triton repository written by hand has no marker and loads as it is).
- Object store (S3, GCS: a rename there is a copy and a delete): the files go straight into the
  version folder and the marker last; a reader counts a version once it finds the marker (one
  HEAD per new version, then remembered: an unchanged repository costs one listing per model
  and poll, however many versions it holds). A publish that dies half-way leaves a folder
  without a marker: never served, its number skipped by later publishes.

Concurrent publishers on an object store (no atomic rename; pyarrow has no conditional put):
each writes a claim object of its own (`_fleet_claim-<id>`) into the folder of the number it
chose, then lists that folder and goes on only if nothing else is there; otherwise it deletes
its claim and tries the next number after a random pause (an explicit `version=` is refused).
With the strong read-after-write consistency of PUT and LIST (S3, GCS, MinIO) two publishers
never both go on with one number; on a store without it they could, and fleet does not support
one as a repository. Numbers may be skipped when publishers meet. A Triton-backend model's
version folders are Triton's to read: fleet counts them without a marker.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
import random
import re
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Mapping, Sequence

import pyarrow.fs as pafs

from serving.errors import ModelNotFound, RepositoryError
from serving.model_config import ModelConfig, ModelSpec, format_config, is_decimal, parse_config, spec_from_config
from serving.serving_state import ServingState
from serving.storage import locate

__all__ = ["ModelRepository", "VersionInfo", "ServingState", "CONFIG_FILE", "METADATA_FILE", "SERVING_FILE",
           "COMPLETE_FILE", "GATE_KEY", "GATE_REJECTED", "check_model_name"]

_log = logging.getLogger("fleet.registry")

CONFIG_FILE = "config.pbtxt"
METADATA_FILE = "metadata.json"
SERVING_FILE = "serving.json"
COMPLETE_FILE = "_fleet_complete"  # written last into a version folder: the version is published
_CLAIM_PREFIX = "_fleet_claim-"  # an object-store publisher's claim of a version number
# metadata.json's verdict of the training job's holdout gate: "accepted" or "rejected".
# A rejected version stays in the repository (for the record) and is never served;
# a version without a gate (a Triton repository, an older publish) counts as accepted.
GATE_KEY = "gate"
GATE_REJECTED = "rejected"
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")  # fullmatch: "$" would let "name\n" in
_STAGING_PREFIX = ".staging-"
_RESERVED = (METADATA_FILE, COMPLETE_FILE)


@dataclass(frozen=True)
class VersionInfo:
    model: str
    version: int
    path: str  # on the repository's filesystem
    metadata: Mapping


def _plain(value):
    """JSON for NumPy scalars and arrays in metadata (anything else is an error)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def check_model_name(name: str) -> str:
    """A model name is one path component: letters, digits, `_ . -`; never `..`."""
    if not isinstance(name, str) or not _MODEL_NAME.fullmatch(name) or name in (".", ".."):
        raise ModelNotFound(f"invalid model name {name!r}: use letters, digits, '_', '.', '-' (at most 128)")
    return name


class ModelRepository:
    """Read and publish models under `root` (a local path or a URI such as s3://bucket/repo)."""

    def __init__(self, root: str):
        self.root_uri = str(root)
        location = locate(self.root_uri)
        self.fs, self.root, self.is_local = location.fs, location.path, location.local
        # (model, version) -> rejected by the gate? Versions are immutable, so each metadata.json is read once.
        self._rejected: dict[tuple[str, int], bool] = {}
        # (model, version) whose completion marker was found (an object store): each is looked for until found.
        self._complete: set[tuple[str, int]] = set()
        self._unmarked_warned: set[tuple[str, int]] = set()

    def __repr__(self) -> str:
        return f"ModelRepository({self.root_uri!r})"

    # -- paths ---------------------------------------------------------------
    def _model_dir(self, model: str) -> str:
        return posixpath.join(self.root, check_model_name(model))

    def _version_dir(self, model: str, version: int) -> str:
        return posixpath.join(self._model_dir(model), str(int(version)))

    def _info(self, path: str) -> pafs.FileInfo:
        return self.fs.get_file_info(path)

    def _exists(self, path: str) -> bool:
        return self._info(path).type != pafs.FileType.NotFound

    def _read(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as f:
            return f.read()

    def _read_if_any(self, path: str) -> bytes | None:
        """The file's bytes, None when there is none (one request on an object store, not a HEAD and a GET)."""
        try:
            return self._read(path)
        except FileNotFoundError:
            return None

    def _put(self, path: str, data: bytes) -> None:
        with self.fs.open_output_stream(path) as f:
            f.write(data)

    def _write_atomic(self, path: str, data: bytes) -> None:
        """Write-temp-then-rename, so a reader sees the old or the new file, never half.

        On an object store one object is replaced whole by its upload (a rename would be a copy and a delete).
        """
        if not self.is_local:
            self._put(path, data)
            return
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, path)

    def ensure(self) -> None:
        """Create the root folder if it does not exist."""
        self.fs.create_dir(self.root, recursive=True)

    # -- reading -------------------------------------------------------------
    def list_models(self) -> list[str]:
        """Model folders holding a config.pbtxt, sorted."""
        if not self._exists(self.root):
            return []
        selector = pafs.FileSelector(self.root, recursive=False)
        names = []
        for info in self.fs.get_file_info(selector):
            if info.type == pafs.FileType.Directory and _MODEL_NAME.fullmatch(info.base_name):
                if self._exists(posixpath.join(info.path, CONFIG_FILE)):
                    names.append(info.base_name)
        return sorted(names)

    def is_empty(self) -> bool:
        return not self.list_models()

    def config_proto(self, model: str) -> ModelConfig:
        path = posixpath.join(self._model_dir(model), CONFIG_FILE)
        if not self._exists(path):
            raise ModelNotFound(f"model {model!r} is not in the repository {self.root_uri}")
        return parse_config(self._read(path).decode("utf-8"), source=f"{model}/{CONFIG_FILE}")

    def spec(self, model: str) -> ModelSpec:
        """The model's validated config."""
        return self.load_config(model)[0]

    def load_config(self, model: str) -> tuple[ModelSpec, ModelConfig]:
        """The validated view and the protobuf of the model's config.pbtxt, read once."""
        config = self.config_proto(model)
        return spec_from_config(config, name=model, source=f"{model}/{CONFIG_FILE}"), config

    def write_config(self, model: str, config: ModelConfig) -> None:
        """Validate and (atomically) replace the model's config.pbtxt."""
        spec_from_config(config, name=model, source=f"{model}/{CONFIG_FILE}")
        self.fs.create_dir(self._model_dir(model), recursive=True)
        self._write_atomic(posixpath.join(self._model_dir(model), CONFIG_FILE), format_config(config).encode())

    def list_versions(self, model: str, spec: ModelSpec | None = None) -> list[int]:
        """Published versions: numeric folders that hold the model file, ascending.

        `spec`: the model's already-loaded config, to save reading it again.
        """
        spec = spec or self.spec(model)
        folders = self._version_folders(self._model_dir(model))
        self._forget_missing(model, folders)
        versions = []
        for number, path in folders.items():
            if spec.backend == "triton":
                versions.append(number)
            elif self.is_local:
                if self._exists(posixpath.join(path, spec.default_model_filename)):
                    versions.append(number)
            elif self._is_complete(model, number, path):
                versions.append(number)
        if not versions and spec.backend == "triton":
            # Fronting a Triton model needs only its config.pbtxt: serve it as version 1.
            versions = [1]
        return sorted(versions)

    def _version_folders(self, model_dir: str) -> dict[int, str]:
        """{number: path} of the numeric folders of a model (one listing call), complete or not."""
        return {int(info.base_name): info.path
                for info in self.fs.get_file_info(pafs.FileSelector(model_dir, recursive=False, allow_not_found=True))
                if info.type == pafs.FileType.Directory and is_decimal(info.base_name)}

    def _forget_missing(self, model: str, folders: Mapping[int, str]) -> None:
        """Drop what is remembered of versions whose folder is gone: a number published again is read anew.

        (Replicas poll their models from threads of their own: each cache is copied whole before it is looked over.)
        """
        for cache in (self._complete, self._unmarked_warned, self._rejected):
            for key in [k for k in tuple(cache) if k[0] == model and k[1] not in folders]:
                if isinstance(cache, dict):
                    cache.pop(key, None)
                else:
                    cache.discard(key)

    def _is_complete(self, model: str, version: int, path: str) -> bool:
        """Whether an object-store version folder holds its completion marker (found once, then remembered)."""
        key = (model, version)
        if key in self._complete:
            return True
        if self._exists(posixpath.join(path, COMPLETE_FILE)):
            self._complete.add(key)
            return True
        if key not in self._unmarked_warned:
            self._unmarked_warned.add(key)
            _log.info("model %s version %s has no %s (yet): not served until its publish completes (a version "
                      "copied in by hand needs an empty %s written after its files)", model, version, COMPLETE_FILE,
                      COMPLETE_FILE)
        return False

    def accepted_versions(self, model: str, spec: ModelSpec | None = None) -> list[int]:
        """Published versions whose metadata.json does not say `"gate": "rejected"`, ascending.

        A version whose metadata.json cannot be read is left out (and logged): it
        might be a rejected one. Each version's verdict is read once and kept.
        """
        spec = spec or self.spec(model)
        return [v for v in self.list_versions(model, spec) if not self._is_rejected(model, v)]

    def _is_rejected(self, model: str, version: int) -> bool:
        key = (model, version)
        verdict = self._rejected.get(key)
        if verdict is None:
            try:
                metadata = self.metadata(model, version)
            except (RepositoryError, OSError) as exc:
                _log.warning("model %s version %s is not served: its metadata cannot be read: %s", model, version, exc)
                return True  # not kept: the next poll reads it again
            verdict = isinstance(metadata, Mapping) and metadata.get(GATE_KEY) == GATE_REJECTED
            self._rejected[key] = verdict
        return verdict

    def served_versions(self, model: str, spec: ModelSpec | None = None) -> list[int]:
        """The versions to serve: none when unloaded, the pinned ones, else the version_policy's,
        among the accepted published ones (see `serving_state`)."""
        spec = spec or self.spec(model)
        return self.serving_state(model).select(spec, self.accepted_versions(model, spec))

    def serving_state(self, model: str) -> ServingState:
        """The model's `serving.json` (the defaults when it has none)."""
        raw = self._read_if_any(posixpath.join(self._model_dir(model), SERVING_FILE))
        if raw is None:
            return ServingState()
        source = f"{model}/{SERVING_FILE}"
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            raise RepositoryError(f"{source}: {exc}") from exc
        if not isinstance(doc, Mapping):
            raise RepositoryError(f"{source}: expected a JSON object, got {type(doc).__name__}")
        return ServingState.from_dict(doc, source)

    def write_serving_state(self, model: str, state: ServingState) -> None:
        """Replace the model's `serving.json` atomically: every replica follows it at its next poll."""
        model_dir = self._model_dir(model)
        if not self._exists(posixpath.join(model_dir, CONFIG_FILE)):
            raise ModelNotFound(f"model {model!r} is not in the repository {self.root_uri}")
        doc = {**state.to_dict(), "updated_at": time.time()}
        self._write_atomic(posixpath.join(model_dir, SERVING_FILE), json.dumps(doc, indent=2).encode())

    def read_state_file(self, model: str, name: str) -> bytes | None:
        """A JSON state file of the model's folder (rollout.json), None when there is none."""
        return self._read_if_any(posixpath.join(self._model_dir(model), name))

    def write_state_file(self, model: str, name: str, data: bytes) -> None:
        """Replace a state file of the model's folder atomically (write-temp-then-rename)."""
        model_dir = self._model_dir(model)
        if not self._exists(posixpath.join(model_dir, CONFIG_FILE)):
            raise ModelNotFound(f"model {model!r} is not in the repository {self.root_uri}")
        self._write_atomic(posixpath.join(model_dir, name), data)

    def update_metadata(self, model: str, version: int, changes: Mapping) -> None:
        """Add fleet's own record to a published version's metadata.json (its rollout outcome), atomically.

        The model file and the training record stay as published; only the keys in `changes` are set.
        """
        doc = {**self.metadata(model, version), **changes}
        path = posixpath.join(self._version_dir(model, version), METADATA_FILE)
        self._write_atomic(path, json.dumps(doc, indent=2, allow_nan=False, default=_plain).encode())

    def metadata(self, model: str, version: int) -> dict:
        """The version's metadata.json ({} when the version has none, as a Triton repository)."""
        raw = self._read_if_any(posixpath.join(self._version_dir(model, version), METADATA_FILE))
        if raw is None:
            return {}
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise RepositoryError(f"{model}/{version}/{METADATA_FILE}: {exc}") from exc

    def version(self, model: str, version: int) -> VersionInfo:
        if int(version) not in self.list_versions(model):
            raise ModelNotFound(f"model {model!r} has no published version {version}")
        return VersionInfo(model, int(version), self._version_dir(model, version), self.metadata(model, version))

    def model_file(self, model: str, version: int, spec: ModelSpec | None = None) -> str | io.BytesIO:
        """The version's model file: a local path, or its bytes for a remote repository."""
        spec = spec or self.spec(model)
        folder = self._version_dir(model, version)
        path = posixpath.join(folder, spec.default_model_filename)
        if self.is_local:
            if not self._exists(path):
                raise ModelNotFound(f"model {model!r} version {version} has no {spec.default_model_filename}")
            return path
        if not self._is_complete(model, int(version), folder):
            raise ModelNotFound(f"model {model!r} version {version} is not published (no {COMPLETE_FILE})")
        data = self._read_if_any(path)
        if data is None:
            raise ModelNotFound(f"model {model!r} version {version} has no {spec.default_model_filename}")
        return io.BytesIO(data)

    # -- publishing ----------------------------------------------------------
    def publish(
        self,
        model: str,
        files: Mapping[str, bytes],
        metadata: Mapping,
        *,
        config: ModelConfig | None = None,
        version: int | None = None,
    ) -> int:
        """Publish a new immutable version and return its number.

        `files` maps file names (e.g. "model.pt") to their bytes. `config`, when
        given, replaces the model's config.pbtxt first (required for a new model).
        The version appears at once and whole (locally by rename of a staging
        folder, on an object store by its marker written last: see the module doc);
        with `version=None` it takes the next free number, retrying if a concurrent
        publisher took it first.
        """
        model_dir = self._model_dir(model)
        # Check everything before writing anything, so a refused publish leaves no trace.
        if version is not None:
            if int(version) < 1:
                raise RepositoryError(f"model {model!r}: a version is a positive integer, got {version}")
            if self._exists(posixpath.join(model_dir, str(int(version)))):
                raise RepositoryError(f"model {model!r} version {version} exists and is immutable")
        if config is not None:
            spec_from_config(config, name=model, source=f"{model}/{CONFIG_FILE}")
        elif not self._exists(posixpath.join(model_dir, CONFIG_FILE)):
            raise RepositoryError(f"model {model!r} has no {CONFIG_FILE}; pass config= to publish it first")
        for name in files:
            if "/" in name or name in ("", ".", "..") or name in _RESERVED or name.startswith(_CLAIM_PREFIX):
                raise RepositoryError(f"invalid file name {name!r} to publish")
        try:
            metadata_bytes = json.dumps(dict(metadata), indent=2, allow_nan=False, default=_plain).encode()
        except (TypeError, ValueError) as exc:
            raise RepositoryError(f"metadata for {model!r} is not strict JSON: {exc}") from exc
        publish_id = uuid.uuid4().hex
        marker = json.dumps({"publish_id": publish_id, "published_at": time.time(), "host": socket.gethostname(),
                             "files": sorted([*files, METADATA_FILE])}).encode()
        if not self.is_local:
            return self._publish_remote(model, files, metadata_bytes, marker, publish_id, config, version)
        staging = posixpath.join(model_dir, f"{_STAGING_PREFIX}{publish_id}")
        self.fs.create_dir(staging, recursive=True)
        try:
            for name, data in files.items():
                self._put(posixpath.join(staging, name), data)
            self._put(posixpath.join(staging, METADATA_FILE), metadata_bytes)
            # Not needed here (the rename publishes), but a repository copied to an object store stays served.
            self._put(posixpath.join(staging, COMPLETE_FILE), marker)
            if config is not None:
                self.write_config(model, config)
            for _ in range(100):
                number = version if version is not None else self._next_version(model_dir)
                target = posixpath.join(model_dir, str(number))
                if self._exists(target):
                    if version is not None:
                        raise RepositoryError(f"model {model!r} version {version} exists and is immutable")
                    continue
                try:
                    self.fs.move(staging, target)
                except OSError:
                    if version is not None or not self._exists(target):
                        raise  # a real failure, not a concurrent publisher taking the number
                    continue
                return number
            raise RepositoryError(f"could not find a free version number for {model!r}")
        finally:
            if self._exists(staging):
                self.fs.delete_dir(staging)

    def _publish_remote(self, model: str, files: Mapping[str, bytes], metadata_bytes: bytes, marker: bytes,
                        publish_id: str, config: ModelConfig | None, version: int | None) -> int:
        """Claim a version folder, write the files into it, the marker last (see the module doc)."""
        model_dir = self._model_dir(model)
        claim_name = f"{_CLAIM_PREFIX}{publish_id}"
        for attempt in range(100):
            number = int(version) if version is not None else self._next_version(model_dir)
            folder = posixpath.join(model_dir, str(number))
            claim = posixpath.join(folder, claim_name)
            self._put(claim, marker)
            others = [info.base_name for info in self.fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
                      if info.base_name != claim_name]
            if others:  # another publisher's claim, a published version or a failed publish's leftovers
                self._delete_quietly([claim])
                if version is not None:
                    raise RepositoryError(f"model {model!r} version {version} exists or is being published "
                                          f"(its folder holds {sorted(others)[:3]})")
                time.sleep(random.uniform(0.0, min(1.0, 0.02 * (attempt + 1))))  # two that met must not meet again
                continue
            written = [claim]
            try:
                for name, data in files.items():
                    written.append(posixpath.join(folder, name))
                    self._put(written[-1], data)
                written.append(posixpath.join(folder, METADATA_FILE))
                self._put(written[-1], metadata_bytes)
                if config is not None:
                    self.write_config(model, config)
                self._put(posixpath.join(folder, COMPLETE_FILE), marker)  # last: from now on it is published
            except BaseException:
                self._delete_quietly(written)  # what stays (if this fails too) has no marker: never served
                raise
            self._delete_quietly([claim])
            return number
        raise RepositoryError(f"could not find a free version number for {model!r}")

    def _delete_quietly(self, paths: Sequence[str]) -> None:
        for path in paths:
            try:
                self.fs.delete_file(path)
            except FileNotFoundError:
                pass
            except Exception as exc:  # noqa: BLE001 - a leftover without a marker is never served
                _log.warning("could not delete %s: %s", path, exc)

    def _next_version(self, model_dir: str) -> int:
        """One past the highest numeric folder, published or not (a half-written one's number is skipped)."""
        return max(self._version_folders(model_dir), default=0) + 1
