"""The model repository: Triton's layout on a local path or any `pyarrow.fs` filesystem.

```
<root>/<model>/config.pbtxt              ModelConfig (text protobuf)
<root>/<model>/<version>/model.pt        TorchScript
<root>/<model>/<version>/metadata.json   fleet's metadata
<root>/<model>/serving.json              fleet's: an administrator's unload or version pin
```

A published version is immutable. Publishing writes a staging folder next to the
versions and renames it into place, so a reader never sees half a version (on a
local or POSIX filesystem; on S3/GCS pyarrow's move is copy-then-delete, so a
reader can see a version folder before all its files are there).
"""

from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import re
import time
import uuid
from dataclasses import dataclass
from typing import Mapping, Sequence

import pyarrow.fs as pafs

from serving.errors import ModelNotFound, RepositoryError
from serving.model_config import ModelConfig, ModelSpec, format_config, is_decimal, parse_config, spec_from_config

__all__ = ["ModelRepository", "VersionInfo", "ServingState", "CONFIG_FILE", "METADATA_FILE", "SERVING_FILE",
           "GATE_KEY", "GATE_REJECTED", "check_model_name"]

_log = logging.getLogger("fleet.registry")

CONFIG_FILE = "config.pbtxt"
METADATA_FILE = "metadata.json"
SERVING_FILE = "serving.json"
# metadata.json's verdict of the training job's holdout gate: "accepted" or "rejected".
# A rejected version stays in the repository (for the record) and is never served;
# a version without a gate (a Triton repository, an older publish) counts as accepted.
GATE_KEY = "gate"
GATE_REJECTED = "rejected"
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")  # fullmatch: "$" would let "name\n" in
_STAGING_PREFIX = ".staging-"


@dataclass(frozen=True)
class VersionInfo:
    model: str
    version: int
    path: str  # on the repository's filesystem
    metadata: Mapping


@dataclass(frozen=True)
class ServingState:
    """An administrator's say over a model, kept in `<model>/serving.json` (absent: the defaults).

    `loaded=False`: unloaded, nothing served until loaded again. `versions`: the pinned
    served set, in place of the config's version_policy (None: follow the policy).
    """

    loaded: bool = True
    versions: tuple[int, ...] | None = None

    def select(self, spec: ModelSpec, accepted: Sequence[int], rollout=None) -> list[int]:
        """The versions to serve out of `accepted` (ascending).

        `rollout`: the model's `serving.rollout.state.RolloutState` when it rolls out
        progressively: its stable version (and candidate, during a rollout) are served
        instead of the policy's newest, and its rolled-back versions never are.
        """
        if not self.loaded:
            return []
        if self.versions is not None:
            return sorted(set(self.versions) & set(accepted))
        if rollout is not None:
            served = [v for v in rollout.served() if v in accepted]
            if served:
                return served
            accepted = [v for v in accepted if v not in rollout.rolled_back]  # its stable was deleted
        return spec.version_policy.select(list(accepted))

    def to_dict(self) -> dict:
        return {"loaded": self.loaded, "versions": None if self.versions is None else list(self.versions)}

    @classmethod
    def from_dict(cls, doc: Mapping, source: str) -> "ServingState":
        loaded, versions = doc.get("loaded", True), doc.get("versions")
        ok = isinstance(loaded, bool) and (versions is None or (
            isinstance(versions, list) and all(type(v) is int and v >= 1 for v in versions)))
        if not ok:
            raise RepositoryError(f"{source}: 'loaded' must be true/false and 'versions' null or a list of "
                                  f"positive integers, got {dict(doc)!r}")
        return cls(loaded, None if versions is None else tuple(sorted(set(versions))))


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
        if "://" in self.root_uri:
            self.fs, path = pafs.FileSystem.from_uri(self.root_uri)
        else:
            self.fs, path = pafs.LocalFileSystem(), os.path.abspath(self.root_uri)
        self.root = path.rstrip("/") or "/"
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)
        # (model, version) -> rejected by the gate? Versions are immutable, so each metadata.json is read once.
        self._rejected: dict[tuple[str, int], bool] = {}

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

    def _write_atomic(self, path: str, data: bytes) -> None:
        """Write-temp-then-rename, so a reader sees the old or the new file, never half."""
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
        model_dir = self._model_dir(model)
        versions = []
        for info in self.fs.get_file_info(pafs.FileSelector(model_dir, recursive=False)):
            if info.type != pafs.FileType.Directory or not is_decimal(info.base_name):
                continue
            if spec.backend == "triton" or self._exists(posixpath.join(info.path, spec.default_model_filename)):
                versions.append(int(info.base_name))
        if not versions and spec.backend == "triton":
            # Fronting a Triton model needs only its config.pbtxt: serve it as version 1.
            versions = [1]
        return sorted(versions)

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
        path = posixpath.join(self._model_dir(model), SERVING_FILE)
        if not self._exists(path):
            return ServingState()
        source = f"{model}/{SERVING_FILE}"
        try:
            doc = json.loads(self._read(path))
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
        path = posixpath.join(self._model_dir(model), name)
        try:
            return self._read(path)
        except FileNotFoundError:
            return None

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
        path = posixpath.join(self._version_dir(model, version), METADATA_FILE)
        if not self._exists(path):
            return {}
        try:
            return json.loads(self._read(path))
        except ValueError as exc:
            raise RepositoryError(f"{model}/{version}/{METADATA_FILE}: {exc}") from exc

    def version(self, model: str, version: int) -> VersionInfo:
        if int(version) not in self.list_versions(model):
            raise ModelNotFound(f"model {model!r} has no published version {version}")
        return VersionInfo(model, int(version), self._version_dir(model, version), self.metadata(model, version))

    def model_file(self, model: str, version: int, spec: ModelSpec | None = None) -> str | io.BytesIO:
        """The version's model file: a local path, or its bytes for a remote repository."""
        spec = spec or self.spec(model)
        path = posixpath.join(self._version_dir(model, version), spec.default_model_filename)
        if not self._exists(path):
            raise ModelNotFound(f"model {model!r} version {version} has no {spec.default_model_filename}")
        return path if self.is_local else io.BytesIO(self._read(path))

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
        The version folder appears at once, by rename of a staging folder; with
        `version=None` it takes the next free number, retrying if a concurrent
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
            if "/" in name or name in ("", ".", "..") or name == METADATA_FILE:
                raise RepositoryError(f"invalid file name {name!r} to publish")
        try:
            metadata_bytes = json.dumps(dict(metadata), indent=2, allow_nan=False, default=_plain).encode()
        except (TypeError, ValueError) as exc:
            raise RepositoryError(f"metadata for {model!r} is not strict JSON: {exc}") from exc
        staging = posixpath.join(model_dir, f"{_STAGING_PREFIX}{uuid.uuid4().hex}")
        self.fs.create_dir(staging, recursive=True)
        try:
            for name, data in files.items():
                with self.fs.open_output_stream(posixpath.join(staging, name)) as f:
                    f.write(data)
            with self.fs.open_output_stream(posixpath.join(staging, METADATA_FILE)) as f:
                f.write(metadata_bytes)
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

    def _next_version(self, model_dir: str) -> int:
        numbers = [
            int(info.base_name)
            for info in self.fs.get_file_info(pafs.FileSelector(model_dir, recursive=False))
            if info.type == pafs.FileType.Directory and is_decimal(info.base_name)
        ]
        return max(numbers, default=0) + 1
