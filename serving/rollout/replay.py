"""Replay a rollout's recorded judge ticks and check that each decision comes out the same.

The controller writes every judge tick (the evidence it judged, and the decision) to
`<data>/audit/rollout-ticks/<model>-<rollout id>.jsonl` and each stage change as a
`{"new_stage": true}` line, after a first line holding the judge's settings. `replay_file`
feeds the ticks to a fresh judge with those settings and compares every decision
(`fleet rollout replay MODEL`).
"""

from __future__ import annotations

import json
from pathlib import Path

from serving.monitoring.alerts import audit_folder
from serving.rollout.judge import Judge, JudgeSettings

__all__ = ["tick_files", "replay_file"]


def tick_files(data_dir: str, model: str, audit_dir: str | None = None) -> list[Path]:
    """The model's recorded rollouts, oldest first (`audit_dir`: where they are when not `<data_dir>/audit`)."""
    folder = audit_folder(data_dir, audit_dir)
    if folder is None:
        return []
    return sorted((Path(folder) / "rollout-ticks").glob(f"{model}-*.jsonl"), key=lambda p: p.stat().st_mtime)


def replay_file(path: Path) -> dict:
    """Re-judge one rollout's ticks: {"ticks", "decisions": [...], "mismatches": [...]}."""
    judge = None
    ticks = mismatches = 0
    decisions: list[dict] = []
    bad: list[dict] = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        record = json.loads(line)
        if "settings" in record:
            judge = Judge(JudgeSettings.from_dict(record["settings"]))
            continue
        if judge is None:
            raise ValueError(f"{path}: line {n} comes before the rollout's settings line")
        if record.get("new_stage"):
            judge.new_stage()
            continue
        ticks += 1
        verdict = judge.update(record.get("stable") or {}, record.get("candidate") or {}, record.get("paired"))
        if verdict.decision != "hold":
            decisions.append({"tick": ticks, "recorded": record.get("decision"), "replayed": verdict.decision,
                              "reason": verdict.reason})
        if verdict.decision != record.get("decision"):
            mismatches += 1
            bad.append({"line": n, "recorded": record.get("decision"), "replayed": verdict.decision})
    return {"file": str(path), "ticks": ticks, "decisions": decisions, "mismatches": bad}
