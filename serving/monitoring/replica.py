"""An ingress replica's side of monitoring: request ids, what each version logs and counts, the log sink.

`InferenceService` asks it, per request, for the request's id and log context (`request_meta`)
and, per version, for the batcher's `observe` callback (`observer`). Everything per version is
built once from the version's config.pbtxt and metadata.json and cached.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid

import numpy as np

from serving.errors import ModelUnavailable, RepositoryError
from serving.monitoring.feedback import LabelSpec, LabelWriter, labels_spec, parse_feedback
from serving.monitoring.logrows import BatchRecord, LogSchema, sampled
from serving.monitoring.observe import DriftReference, VersionObserver, request_meta
from serving.registry import ModelRepository

__all__ = ["ReplicaMonitoring"]

_UNKNOWN = object()

_log = logging.getLogger("fleet.monitoring")


def _image_inputs(spec) -> tuple[str, ...]:
    if spec.parameters.get("preprocess") == "image" and spec.inputs:
        return (spec.inputs[0].name,)
    return ()


class ReplicaMonitoring:
    """Request ids, log schemas, drift references and batch observers of one ingress replica.

    `log` is the replica's `PredictionLog` (None: nothing is logged; drift counts are kept anyway).
    """

    def __init__(self, repository: str, recorder, log=None, data_dir: str | None = None, *,
                 max_feedback_labels: int = 100_000, max_string_bytes: int = 1 << 20):
        self._repository = ModelRepository(repository)
        self.recorder = recorder
        self.log = log
        self._prefix = uuid.uuid4().hex[:12] + "-"  # generated ids: <prefix>-<counter, hex>
        self.labels = LabelWriter(data_dir, self._prefix[:-1]) if data_dir else None
        self._label_specs: dict[str, LabelSpec] = {}
        self.max_feedback_labels = max_feedback_labels
        self.max_string_bytes = max_string_bytes
        self._ids = itertools.count(1)
        self._metadata: dict[tuple[str, int], dict] = {}
        self._schemas: dict[tuple[str, int], LogSchema | None] = {}
        self._observers: list[VersionObserver] = []

    def metadata(self, model: str, version: int) -> dict:
        """The version's metadata.json, read once ({} when it has none or it cannot be read)."""
        key = (model, version)
        if key not in self._metadata:
            try:
                self._metadata[key] = self._repository.metadata(model, version)
            except (RepositoryError, OSError) as exc:
                _log.warning("model %s version %s: metadata.json unreadable (%s): not monitored", model, version, exc)
                self._metadata[key] = {}
        return self._metadata[key]

    def schema(self, spec, version: int) -> LogSchema | None:
        """How the version's rows are logged; None when nothing is (no log, or `fleet.log.sample` 0)."""
        key = (spec.name, version)
        if key not in self._schemas:
            schema = None
            if self.log is not None:
                schema = LogSchema(spec, self.metadata(spec.name, version), _image_inputs(spec))
                if schema.sample <= 0.0:
                    schema = None
                else:
                    self.log.register(spec.name, version, schema)
            self._schemas[key] = schema
        return self._schemas[key]

    def request_meta(self, spec, version: int, request_id: str | None, key_id: str | None,
                     start_ns: int) -> tuple[str | None, tuple | None]:
        """(the id to answer with, the log context or None): a request without an id gets one when its model logs."""
        schema = self._schemas.get((spec.name, version), _UNKNOWN)
        if schema is _UNKNOWN:
            schema = self.schema(spec, version)
        if schema is None:
            return request_id, None
        if request_id is None:
            request_id = self.new_request_id()
        if schema.sample < 1.0 and not sampled(request_id, schema.sample):
            return request_id, None
        return request_id, request_meta(request_id, start_ns, key_id)

    def log_cached(self, spec, version: int, meta: tuple | None, inputs: dict, outputs: dict, start_ns: int) -> None:
        """Log one request the response cache answered (`meta` from `request_meta`; None: not logged), flagged
        `answered_by` "cache": one record of its own, as a batch of one would be."""
        if meta is None or self.log is None:
            return
        meta = (meta[0], meta[1], meta[2] if len(meta) > 2 else None, "cache", None, None)
        images = _image_inputs(spec)
        rows = len(next(iter(outputs.values()))) if outputs else 0
        now = time.monotonic_ns()
        self.log.append(BatchRecord(spec.name, version, rows, [meta], [start_ns], [rows] if rows != 1 else None, now,
                                    0, now, {name: [arr] for name, arr in inputs.items()}, outputs, images=images))

    def new_request_id(self) -> str:
        """A fresh request id (this replica's prefix and a counter), for a request that came without one."""
        return self._prefix + format(next(self._ids), "x")

    def observer(self, spec, version: int, preprocessor) -> VersionObserver:
        """The batcher's `observe` for the version: drift counts against its reference, log records."""
        metadata = self.metadata(spec.name, version)
        reference = getattr(preprocessor, "reference", None)
        feature_input = getattr(preprocessor, "input_name", None) if reference is not None else None
        drift = DriftReference(
            feature_input=feature_input,
            feature_names=tuple(reference.names) if reference is not None else (),
            feature_edges=np.ascontiguousarray(reference.edges) if reference is not None else None,
            monitoring=metadata.get("monitoring"),
            model_input=getattr(preprocessor, "input_name", None) if reference is not None else None,
        )
        self.schema(spec, version)  # registered with the log before its first record
        images = _image_inputs(spec)
        observer = VersionObserver(spec.name, version, drift, self.recorder, self.log, images,
                                   fixed_rows=not images and all(-1 not in t.dims for t in spec.inputs))
        self._observers.append(observer)
        return observer

    def flush_counts(self) -> None:
        """Every version's drift counts of the rows answered since the last call, into the recorder."""
        for observer in self._observers:
            observer.flush_counts()

    def forget(self, model: str, version: int) -> None:
        """A version left the served set: its cached metadata goes (a republished one is read afresh), its
        observer's last counts go to the recorder and it is dropped."""
        self._metadata.pop((model, version), None)
        for observer in [o for o in self._observers if (o.model, o.version) == (model, version)]:
            observer.flush_counts()
            self._observers.remove(observer)

    async def feedback(self, spec, body: bytes, header_length: int | None, limits=None) -> dict:
        """Check a feedback body against the model's labels, write it (before answering), count it."""
        if self.labels is None:
            raise ModelUnavailable("feedback is not kept on this server: it has no data_dir")
        label_spec = self._label_specs.get(spec.name)
        if label_spec is None:
            label_spec = self._label_specs[spec.name] = labels_spec(spec)
        labels = parse_feedback(body, label_spec, header_length=header_length, max_labels=self.max_feedback_labels,
                                max_string=self.max_string_bytes, limits=limits)
        await asyncio.to_thread(self.labels.write, spec.name, labels)
        self.recorder.feedback(spec.name, len(labels), labels.duplicates)
        return {"model_name": spec.name, "accepted": len(labels), "duplicates": labels.duplicates,
                "task": label_spec.task}
