"""What an ingress replica records of each answered batch: drift counts and the prediction log.

The batcher calls a version's `VersionObserver` once per batch, after the batch's answers are
set (`serving.batching.Observe`). For the requests answered (not refused, not withdrawn) it
- keeps the rows for the drift monitor's counts, which `flush_counts` makes before each push to
  the monitor (about once a second, or every 8,192 rows): every input feature (raw values,
  reference edges from metadata `reference_stats`), the output score and the PCA reconstruction
  error of the model's standardized input (edges from metadata `monitoring`), one
  `native.histogram` call per stream over all the rows since the last push;
- hands the logged requests' rows to the prediction log as one `LogRecord` per requested model.
Nothing here runs per request but gathering each request's id and times into lists.
"""

from __future__ import annotations

import time
from typing import Mapping

import numpy as np

import native
from serving.monitoring.logrows import BatchRecord, concat_rows, request_bytes
from serving.monitoring.reference import pca_arrays, row_scores

__all__ = ["request_meta", "answered_by_fallback", "VersionObserver", "DriftReference"]

_US = 1000
_TIME_EVERY_MASK = 15  # the request path's hand-over is timed on one batch in 16
_COUNT_EVERY_ROWS = 8192  # rows kept for the drift counts before they are counted (else at the next push)


def request_meta(request_id: str, start_ns: int, key_id: str | None = None) -> tuple:
    """A logged request's context as the batch carries it: a tuple, no object per request.

    `(request_id, start_ns)` in the common case (`start_ns`: time.monotonic_ns() when the service took
    it); `(request_id, start_ns, key_id, answered_by, model, version)` when a key sent it or a fallback
    answered it (`model`, `version`: what the client asked for; None: the batch's own).
    """
    return (request_id, start_ns) if key_id is None else (request_id, start_ns, key_id, "model", None, None)


def answered_by_fallback(meta: tuple, answered_by: str, model: str, version: int) -> tuple:
    """The context of a request a fallback model answers: logged under the model asked for."""
    return (meta[0], meta[1], meta[2] if len(meta) > 2 else None, answered_by, model, version)


class DriftReference:
    """The bins a version's live rows are counted in: features, output score, PCA reconstruction error.

    Each stream is optional: features need metadata `reference_stats` edges (a `preprocess:
    standardize` model), the score and PCA need metadata `monitoring` (written by training since
    fleet counted them). `streams` names them in the order the monitor receives their counts.
    """

    def __init__(self, feature_input: str | None, feature_names: tuple[str, ...], feature_edges: np.ndarray | None,
                 monitoring: Mapping | None, model_input: str | None):
        self.feature_input = feature_input
        self.feature_names = feature_names
        self.feature_edges = feature_edges  # float32 [d, b + 1]
        self.model_input = model_input  # the standardized input the PCA reads
        monitoring = monitoring or {}
        scores = monitoring.get("scores") or {}
        self.score_output = scores.get("output")
        self.score_edges = _edges(scores.get("edges"))
        pca = monitoring.get("pca") or {}
        self.pca_edges = _edges(pca.get("edges"))
        self.pca_mean = self.pca_components = None
        if self.pca_edges is not None and pca.get("components"):
            self.pca_mean, self.pca_components = pca_arrays(pca)
        if self.pca_components is not None and feature_edges is not None \
                and self.pca_components.shape[1] != feature_edges.shape[0]:
            self.pca_edges = self.pca_mean = self.pca_components = None  # not this input's PCA

    @property
    def empty(self) -> bool:
        return self.feature_edges is None and self.score_edges is None and self.pca_edges is None

    def streams(self) -> list[tuple[str, str]]:
        """[(name, kind)] in count order: features, then "score", then "pca" (those present)."""
        out = [(n, "feature") for n in (self.feature_names if self.feature_edges is not None else ())]
        if self.score_edges is not None:
            out.append(("score", "score"))
        if self.pca_edges is not None:
            out.append(("pca", "pca"))
        return out


def _edges(raw) -> np.ndarray | None:
    if not raw:
        return None
    edges = np.asarray(raw, np.float32).reshape(1, -1)
    if edges.shape[1] < 2 or not np.all(np.isfinite(edges)) or not np.all(np.diff(edges) > 0):
        return None
    return np.ascontiguousarray(edges)


def _rows_of(batch: list, keep: set[int]) -> np.ndarray:
    """The batch row indices of the requests whose id() is in `keep`, in batch order."""
    index, offset = [], 0
    for p in batch:
        if id(p) in keep:
            index.append(np.arange(offset, offset + p.rows))
        offset += p.rows
    return np.concatenate(index) if index else np.zeros(0, np.int64)


def _histogram(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    counts = np.zeros((edges.shape[0], edges.shape[1] + 1), np.int64)
    native.histogram(np.ascontiguousarray(values, np.float32), edges, counts)
    return counts


class VersionObserver:
    """Drift counts and prediction-log records of one model version's answered batches (`Batcher.observe`)."""

    def __init__(self, model: str, version: int, reference: DriftReference | None, recorder, log=None,
                 image_inputs: tuple[str, ...] = (), *, fixed_rows: bool = False):
        self.model = model
        self.version = version
        self.tag = str(version)
        self.reference = reference if reference is not None and not reference.empty else None
        self.recorder = recorder
        self.log = log
        self.image_inputs = image_inputs
        self._batches = 0  # logged batches (the log's own time is read on one in _TIME_EVERY_MASK + 1)
        self._input_names: tuple[str, ...] | None = None  # learnt from the first logged request
        self._fixed_rows = fixed_rows  # every input of a fixed shape: each row of them the same bytes
        self._row_bytes: int | None = None  # those bytes; None: each record counts its arrays
        self._pending: dict[str, list] = {"features": [], "score": [], "pca": []}  # rows not yet counted
        self._pending_rows = 0
        self._cached: list[tuple[dict, Mapping]] = []  # cache hits not yet counted: (inputs, outputs)
        self._cached_preprocess = None

    def __call__(self, batch: list, inputs: dict, outputs: Mapping, sent_ns: int, compute_ns: int) -> None:
        answered = [p for p in batch if not p.future.cancelled() and p.future.exception() is None]
        if not answered:
            return
        rows = None  # the answered rows' indices in the batch, None: all of them
        if len(answered) != len(batch):
            rows = _rows_of(batch, {id(p) for p in answered})
        if self.reference is not None:
            self._count(answered, inputs, outputs, rows)
        if self.log is not None:
            self._log(answered, batch, outputs, rows, sent_ns, compute_ns)

    def count_cached(self, inputs: dict, outputs: Mapping, preprocess=None) -> None:
        """Keep the rows of a request the response cache answered for the drift counts, as a batch of its own
        would have been: its features, its stored score and, for the PCA stream, its input as the model sees it
        (`preprocess` assembles it again, its contract's warnings counted as a batch's are). Only kept here: the
        hits since the last count are assembled and counted together by `flush_counts` (per hit, that work was
        a fifth of a hit's time)."""
        if self.reference is None:
            return
        self._cached.append((inputs, outputs))
        self._cached_preprocess = preprocess
        self._pending_rows += len(next(iter(inputs.values()))) if inputs else 0
        if self._pending_rows >= _COUNT_EVERY_ROWS:
            self.flush_counts()

    def _take_cached(self) -> None:
        """The kept cache hits into the pending rows, as one batch of all of them."""
        cached, self._cached = self._cached, []
        ref, pending, preprocess = self.reference, self._pending, self._cached_preprocess
        if ref.feature_edges is not None:
            pending["features"] += [inputs[ref.feature_input] for inputs, _ in cached]
        if ref.score_edges is not None:
            pending["score"] += [outputs[ref.score_output] for _, outputs in cached if ref.score_output in outputs]
        # The model's input assembled again, all hits at once (its live histograms and contract counts with it).
        name = preprocess.input_name if preprocess is not None else None
        parts = [inputs[name] for inputs, _ in cached if name in inputs] if name is not None else []
        z = preprocess.assemble(parts)[0] if parts else None
        if ref.pca_edges is not None:
            if name is not None and name == ref.model_input:
                if z is not None:
                    pending["pca"].append(z)
            else:
                pending["pca"] += [inputs[ref.model_input] for inputs, _ in cached if ref.model_input in inputs]

    def _count(self, answered: list, inputs: dict, outputs: Mapping, rows) -> None:
        """Keep the batch's rows for the drift counts: a few list appends, no histogram per batch."""
        ref = self.reference
        pending = self._pending
        if ref.feature_edges is not None:
            pending["features"].extend(p.inputs[ref.feature_input] for p in answered)
        if ref.score_edges is not None and ref.score_output in outputs:
            out = outputs[ref.score_output]
            pending["score"].append(out if rows is None else np.asarray(out)[rows])
        if ref.pca_edges is not None and ref.model_input in inputs:
            z = inputs[ref.model_input]
            pending["pca"].append(z if rows is None else np.asarray(z)[rows])
        self._pending_rows += sum(p.rows for p in answered)
        if self._pending_rows >= _COUNT_EVERY_ROWS:
            self.flush_counts()

    def flush_counts(self) -> None:
        """Count the rows kept since the last call into the reference bins (one kernel call per stream) and hand
        the counts to the recorder. Called before every push to the monitor, and every _COUNT_EVERY_ROWS rows."""
        if not self._pending_rows:
            return
        if self._cached:
            self._take_cached()
        ref, pending, n = self.reference, self._pending, self._pending_rows
        self._pending = {"features": [], "score": [], "pca": []}
        self._pending_rows = 0
        counts: dict[str, np.ndarray] = {}
        if pending["features"]:
            counts["features"] = _histogram(concat_rows(pending["features"], False), ref.feature_edges)
            self.recorder.features(self.model, self.tag, counts["features"])
        if pending["score"]:
            counts["score"] = _histogram(row_scores(concat_rows(pending["score"], False))[:, None], ref.score_edges)
        if pending["pca"]:
            c = np.asarray(concat_rows(pending["pca"], False), np.float32) - ref.pca_mean
            projected = c @ ref.pca_components.T
            error = np.einsum("ij,ij->i", c, c) - np.einsum("ij,ij->i", projected, projected)
            counts["pca"] = _histogram(np.maximum(error, 0.0)[:, None], ref.pca_edges)
        self.recorder.drift(self.model, self.tag, counts, n)

    def _log(self, answered: list, batch: list, outputs: Mapping, rows, sent_ns: int, compute_ns: int) -> None:
        """Hand the logged requests of an answered batch to the prediction log: one pass over them, no copy of
        their inputs (the writer thread concatenates them), the time it took counted as the log's own. At peak
        most batches hold a request or two: this runs about once per request, so every step counts."""
        self._batches += 1
        timed = not self._batches & _TIME_EVERY_MASK  # one batch in _TIME_EVERY: a CPU clock read is ~0.3 µs
        start = time.thread_time_ns() if timed else 0  # CPU time: a switch to another thread midway is not the log's
        logged, metas, enqueued = [], [], []
        plain, flagged, total = True, False, 0
        for p in answered:
            meta = p.meta
            if meta is None:
                continue
            logged.append(p)
            metas.append(meta)
            enqueued.append(p.enqueued_ns)
            total += p.rows
            if len(meta) != 2:
                plain = False
            if p.flags is not None:
                flagged = True
        if not logged:
            return
        if len(logged) != len(batch):  # refused or not sampled requests: their rows leave the record
            rows = _rows_of(batch, {id(p) for p in logged})
        done_ns = time.monotonic_ns()
        selected = outputs if rows is None else {name: np.asarray(arr)[rows] for name, arr in outputs.items()}
        if plain:  # the common case: no key, answered by the model itself
            self.log.append(self._record(self.model, self.version, logged, selected, sent_ns, compute_ns, done_ns,
                                         metas, enqueued, total, flagged))
        else:
            self._log_by_model(logged, selected, sent_ns, compute_ns, done_ns)
        if timed:  # scaled: an estimate of every batch's time, unbiased
            self.log.add_request_path_ns(self.model, (time.thread_time_ns() - start) * (_TIME_EVERY_MASK + 1))

    def _learn_inputs(self, p) -> tuple[str, ...]:
        """The version's input names (in the requests' order) and, for fixed shapes, the bytes of a row of them."""
        names = self._input_names = tuple(p.inputs)
        if self._fixed_rows and p.rows > 0:
            self._row_bytes = sum(np.asarray(p.inputs[name]).nbytes for name in names) // p.rows
        return names

    def _log_by_model(self, logged: list, selected: dict, sent_ns: int, compute_ns: int, done_ns: int) -> None:
        """Keys, or a fallback's batch mixing its own requests with another model's: one record per model asked."""
        by_model: dict[tuple[str, int], list] = {}
        spans: dict[tuple[str, int], list] = {}
        offset = 0
        for p in logged:
            m = p.meta
            key = (m[4], m[5]) if len(m) > 2 and m[4] is not None else (self.model, self.version)
            by_model.setdefault(key, []).append(p)
            spans.setdefault(key, []).append(np.arange(offset, offset + p.rows))
            offset += p.rows
        for key, requests in by_model.items():
            part = selected if len(by_model) == 1 else {
                name: np.asarray(arr)[np.concatenate(spans[key])] for name, arr in selected.items()}
            self.log.append(self._record(
                key[0], key[1], requests, part, sent_ns, compute_ns, done_ns, [p.meta for p in requests],
                [p.enqueued_ns for p in requests], sum(p.rows for p in requests),
                any(p.flags is not None for p in requests)))

    @staticmethod
    def _violations(requests: list) -> np.ndarray:
        return np.concatenate([p.flags.rows if p.flags is not None else np.full(p.rows, None, object)
                               for p in requests])

    def _record(self, model: str, version: int, requests: list, outputs: dict, sent_ns: int, compute_ns: int,
                done_ns: int, metas: list, enqueued: list, total: int, flagged: bool) -> BatchRecord:
        """The batch as the writer thread takes it: the requests' context tuples (`metas`) and enqueue times, their
        `total` rows, their input arrays as they are, the outputs. The writer derives every per-row column from
        these; the byte count comes from the row size when the inputs' shapes are fixed."""
        names = self._input_names or self._learn_inputs(requests[0])
        n = len(requests)
        if len(names) == 1:
            inputs = {names[0]: [p.inputs[names[0]] for p in requests]}
        else:
            inputs = {name: [p.inputs[name] for p in requests] for name in names}
        return BatchRecord(
            model, version, total, metas, enqueued, [p.rows for p in requests] if total != n else None, sent_ns,
            compute_ns, done_ns, inputs, outputs, self._violations(requests) if flagged else None, self.image_inputs,
            None if self._row_bytes is None else request_bytes(len(names), n, total, self._row_bytes))


