"""What an ingress replica counts per model version during a rollout, for the judge.

Per (model, version) since the last hand-off: requests routed to it, those that failed on the
model or its backend, a histogram of the successful requests' latency over the judge's
`LATENCY_EDGES_S`, and a histogram of the outputs (`score_bins`, binned 64 requests at a
time). In shadow mode, per model, the pairs of answers compared (`compare`, in bulk too):
decisions that differ, the largest absolute difference, the summed score delta, and which side
failed. Kept only for models in a rollout; the hot path adds to lists, and the replica's push
hands the deltas to the controller.
"""

from __future__ import annotations

import bisect

import numpy as np

from serving.rollout.judge import LATENCY_EDGES_S

__all__ = ["RolloutEvidence", "score_bins", "compare", "LATENCY_EDGES_S", "BINARY_SCORE_BINS"]

BINARY_SCORE_BINS = 20  # a one-column output (a probability) in 20 equal bins of [0, 1]


def score_bins(output: np.ndarray) -> np.ndarray:
    """Counts of one request's output rows: a probability (one column) in 20 bins of [0, 1],
    several columns by their argmax class."""
    arr = np.asarray(output)
    if arr.ndim >= 2 and arr.shape[-1] > 1:
        classes = arr.reshape(-1, arr.shape[-1]).argmax(axis=1)
        return np.bincount(classes, minlength=arr.shape[-1])
    p = np.clip(np.nan_to_num(arr.reshape(-1).astype(np.float64), nan=0.0), 0.0, 1.0)
    return np.bincount(np.minimum((p * BINARY_SCORE_BINS).astype(np.int64), BINARY_SCORE_BINS - 1),
                       minlength=BINARY_SCORE_BINS)


_FOLD_AT = 64  # outputs held before they are binned in one go (binning each request's alone cost 8 % of a replica;
# a thousand at a time held the event loop for milliseconds, in the tail of the requests waiting behind)


def _add(total: np.ndarray | None, counts: np.ndarray) -> np.ndarray:
    return counts if total is None or total.shape != counts.shape else total + counts


def fold_scores(total: np.ndarray | None, outputs: list) -> np.ndarray | None:
    """`total` plus the `score_bins` of every output in `outputs`, binned together (one call per column count)."""
    groups: dict[int, list] = {}
    for output in outputs:
        arr = np.asarray(output)
        cols = arr.shape[-1] if arr.ndim >= 2 and arr.shape[-1] > 1 else 1
        groups.setdefault(cols, []).append(arr.reshape(-1, cols) if cols > 1 else arr.reshape(-1))
    for parts in groups.values():
        total = _add(total, score_bins(np.concatenate(parts)))
    return total


class _Counts:
    __slots__ = ("requests", "errors", "latency", "scores", "pending")

    def __init__(self):
        self.requests = 0
        self.errors = 0
        self.latency = [0] * (len(LATENCY_EDGES_S) + 1)
        self.scores: np.ndarray | None = None
        self.pending: list = []  # outputs not binned yet

    def fold(self) -> None:
        if self.pending:
            self.scores = fold_scores(self.scores, self.pending)
            self.pending = []

    def to_dict(self) -> dict:
        self.fold()
        return {"requests": self.requests, "errors": self.errors, "latency": self.latency,
                "scores": [] if self.scores is None else self.scores.tolist()}


_SHADOW_KEYS = ("pairs", "rows", "disagree", "candidate_only_failed", "stable_only_failed", "both_failed", "shed")


def compare(stable: np.ndarray, candidate: np.ndarray) -> tuple[int, int, float, float]:
    """(rows, rows whose decision differs, largest absolute difference, summed candidate - stable score) of one
    request's two answers: the decision is the argmax of several columns, p >= 0.5 of one."""
    s = np.asarray(stable, np.float64).reshape(len(stable), -1)
    c = np.asarray(candidate, np.float64).reshape(len(candidate), -1)
    if s.shape != c.shape:
        return len(s), len(s), float("inf"), 0.0
    if s.shape[1] > 1:
        differ = int(np.count_nonzero(s.argmax(axis=1) != c.argmax(axis=1)))
        delta = float((c.max(axis=1) - s.max(axis=1)).sum())
    else:
        differ = int(np.count_nonzero((s[:, 0] >= 0.5) != (c[:, 0] >= 0.5)))
        delta = float((c[:, 0] - s[:, 0]).sum())
    return len(s), differ, float(np.abs(c - s).max(initial=0.0)), delta


def _fold_pairs(entry: dict) -> None:
    """Compare and bin a shadow entry's pending pairs (see `RolloutEvidence.shadow_pair`)."""
    pending, entry["pending"] = entry["pending"], []
    if not pending:
        return
    results = []  # `compare`'s figures, which add up over rows
    groups: dict[int, tuple[list, list]] = {}  # column count -> the pairs' stable and candidate rows
    for stable, candidate in pending:
        st = np.asarray(stable).reshape(len(stable), -1)
        ca = np.asarray(candidate).reshape(len(candidate), -1)
        if st.shape != ca.shape:  # answers that cannot be compared: `compare` says so, pair by pair
            results.append(compare(st, ca))
            continue
        group = groups.setdefault(st.shape[1], ([], []))
        group[0].append(st)
        group[1].append(ca)
    results += [compare(np.concatenate(st), np.concatenate(ca)) for st, ca in groups.values()]
    for rows, differ, largest, delta in results:
        entry["rows"] += rows
        entry["disagree"] += differ
        entry["max_abs_diff"] = max(entry["max_abs_diff"], largest)
        entry["score_delta_sum"] += delta
    for side, index in (("stable_scores", 0), ("candidate_scores", 1)):
        entry[side] = fold_scores(entry.get(side), [pair[index] for pair in pending])


class RolloutEvidence:
    """One replica's rollout counts, handed off as deltas (`take`)."""

    def __init__(self):
        self._counts: dict[tuple[str, int], _Counts] = {}
        self._shadow: dict[str, dict] = {}  # model -> pair counts of the shadow copies
        self._load_failed: dict[tuple[str, int], str] = {}

    def shadow_pair(self, model: str, stable: np.ndarray | None, candidate: np.ndarray | None) -> None:
        """One shadowed request: the stable and candidate answers (None: that side failed). Only counted and kept
        here; the comparison and the binning run on `_FOLD_AT` pairs at a time (or at the hand-off), off the
        path of the requests being answered."""
        entry = self._shadow_entry(model)
        entry["pairs"] += 1
        if stable is None or candidate is None:
            key = "both_failed" if stable is None and candidate is None else \
                "stable_only_failed" if stable is None else "candidate_only_failed"
            entry[key] += 1
            return
        pending = entry["pending"]
        pending.append((stable, candidate))
        if len(pending) >= _FOLD_AT:
            _fold_pairs(entry)

    def load_failed(self, model: str, version: int, error: str) -> None:
        """The version failed to load where this replica runs it."""
        self._load_failed[(model, version)] = error

    def shadow_shed(self, model: str) -> None:
        """A copy not sent: the candidate had too many copies in flight in this replica."""
        self._shadow_entry(model)["shed"] += 1

    def _shadow_entry(self, model: str) -> dict:
        entry = self._shadow.get(model)
        if entry is None:
            entry = self._shadow[model] = {**dict.fromkeys(_SHADOW_KEYS, 0), "max_abs_diff": 0.0,
                                           "score_delta_sum": 0.0, "pending": []}
        return entry

    def _entry(self, model: str, version: int) -> _Counts:
        entry = self._counts.get((model, version))
        if entry is None:
            entry = self._counts[(model, version)] = _Counts()
        return entry

    def success(self, model: str, version: int, latency_s: float, output: np.ndarray | None) -> None:
        entry = self._entry(model, version)
        entry.requests += 1
        entry.latency[bisect.bisect_right(LATENCY_EDGES_S, latency_s)] += 1
        if output is not None:
            entry.pending.append(output)
            if len(entry.pending) >= _FOLD_AT:
                entry.fold()

    def failure(self, model: str, version: int) -> None:
        entry = self._entry(model, version)
        entry.requests += 1
        entry.errors += 1

    def take(self) -> dict:
        """{model: {version (str): counts, "shadow": pair counts}} since the last call."""
        counts, self._counts = self._counts, {}
        shadow, self._shadow = self._shadow, {}
        out: dict = {}
        for (model, version), entry in counts.items():
            out.setdefault(model, {})[str(version)] = entry.to_dict()
        for model, entry in shadow.items():
            _fold_pairs(entry)
            del entry["pending"]
            for side in ("stable_scores", "candidate_scores"):
                if side in entry:
                    entry[side] = entry[side].tolist()
            out.setdefault(model, {})["shadow"] = entry
        failed, self._load_failed = self._load_failed, {}
        for (model, version), error in failed.items():
            out.setdefault(model, {}).setdefault("load_failed", {})[str(version)] = error
        return out

    def give_back(self, delta: dict) -> None:
        """A hand-off that did not reach the controller: count it again in the next one."""
        for model, versions in delta.items():
            for version, d in versions.items():
                if version == "load_failed":
                    for v, error in d.items():
                        self._load_failed[(model, int(v))] = error
                    continue
                if version == "shadow":
                    mine = self._shadow_entry(model)
                    for key in (*_SHADOW_KEYS, "score_delta_sum"):
                        mine[key] += d[key]
                    for side in ("stable_scores", "candidate_scores"):
                        if d.get(side):
                            counts = np.asarray(d[side], np.int64)
                            have = mine.get(side)
                            mine[side] = counts if have is None or have.shape != counts.shape else have + counts
                    mine["max_abs_diff"] = max(mine["max_abs_diff"], d["max_abs_diff"])
                    continue
                entry = self._entry(model, int(version))
                entry.requests += d["requests"]
                entry.errors += d["errors"]
                entry.latency = [a + b for a, b in zip(entry.latency, d["latency"])]
                if d["scores"]:
                    entry.fold()
                    entry.scores = _add(entry.scores, np.asarray(d["scores"], np.int64))
