"""The monitoring side of `serving.service.InferenceService`: statistics, feature histograms, feedback, reports.

A mixin (kept apart so the service stays about models, batchers and answers): it uses the
service's `models`, `monitoring`, `_model`, `_version`, `_preprocessor`, `_stats_source` and
`_monitor_source`.
"""

from __future__ import annotations

import numpy as np

from serving.errors import InvalidInput, ModelNotFound, ModelUnavailable
from serving.metrics import ModelStats
from serving.model_config import is_decimal
from serving.monitor import triton_model_stats
from serving.preprocess import Standardize

__all__ = ["MonitoringAnswers"]


class MonitoringAnswers:
    """`GET .../stats`, `.../features`, `.../drift`, `.../quality` and `POST .../feedback` (see the module docstring)."""

    async def model_stats(self, model: str | None, version: str | None) -> dict:
        """Triton's statistics document, cluster-wide (from the monitor)."""
        if model is not None:
            state = self._model(model)
            if version is not None:
                self._version(state, version)
        totals = await self._stats_source() if self._stats_source else {}
        entries = []
        for (m, v), raw in sorted(totals.items()):
            if (model is None or m == model) and (version is None or v == version):
                entries.append(triton_model_stats(m, v, ModelStats.from_dict(raw)))
        if model is not None and not entries:
            state = self.models[model]
            for v in state.versions if version is None else [int(version)]:
                entries.append(triton_model_stats(model, str(v), ModelStats()))
        return {"model_stats": entries}

    async def model_features(self, model: str, version: str | None) -> dict:
        """The live feature histograms of a model that counts them (cluster-wide), against its reference bins."""
        state = self._model(model)
        number = self._version(state, version)
        pre = self._preprocessor(state, number)
        reference = pre.reference if isinstance(pre, Standardize) else None
        if reference is None:
            raise InvalidInput(f"model {model!r} keeps no feature statistics: it declares no 'preprocess: standardize' "
                               "with reference histograms in its metadata.json")
        totals = await self._stats_source() if self._stats_source else {}
        raw = totals.get((model, str(number)))
        counts = None
        if raw and raw.get("feature_counts"):
            counts = np.asarray(raw["feature_counts"], np.int64)
            if counts.shape != (len(reference.names), reference.edges.shape[1] + 1):
                counts = None
        features = reference.describe(counts)
        return {"model_name": model, "model_version": str(number),
                "rows": int(sum(features[0]["counts"])) if features else 0,
                "bins": "counts[0] is below edges[0], counts[-1] above edges[-1]",
                "features": features}

    async def feedback(self, model: str, body: bytes, header_length: int | None) -> dict:
        """`POST /v2/models/{m}/feedback`: true labels of logged predictions (serving/monitoring/feedback.py)."""
        state = self._model(model)
        return await self.monitoring.feedback(state.spec, body, header_length, self._limits)

    async def monitor_report(self, kind: str, model: str, version: str | None) -> dict:
        """The monitor's `drift` or `quality` report of a model (all its versions, or `version`)."""
        state = self._model(model)
        if version is not None and not is_decimal(version):
            raise ModelNotFound(f"model version must be a positive integer, got {version!r}")
        if self._monitor_source is None:
            raise ModelUnavailable("the monitor is not reachable from this replica")
        doc = await self._monitor_source(kind, state.spec.name, version)
        if version is not None and not doc.get("versions"):
            raise ModelNotFound(f"model {model!r} has no {kind} report for version {version}: no traffic seen "
                                f"by the monitor; served versions: {state.versions}")
        return doc
