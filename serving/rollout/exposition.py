"""The rollout metrics in `/metrics` (a prometheus_client collector over `RolloutController`).

    fleet_rollout_weight{model,version}        share of routing keys each served version answers
    fleet_rollout_stage{model}                 the candidate's stage index (-1: no rollout)
    fleet_rollout_stage_alarm{model}           1 while a stage is held past max_stage_s for lack of evidence
    fleet_rollout_decisions_total{model,decision}   promote, rollback, abort, supersede (since the controller started)
"""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

__all__ = ["RolloutCollector"]


class RolloutCollector:
    def __init__(self, controller):
        self.controller = controller

    def collect(self):
        weight = GaugeMetricFamily("fleet_rollout_weight", "Share of routing keys the version answers (rollout)",
                                   labels=["model", "version"])
        stage = GaugeMetricFamily("fleet_rollout_stage", "The candidate's canary stage index (-1: no rollout)",
                                  labels=["model"])
        alarm = GaugeMetricFamily("fleet_rollout_stage_alarm", "1 while a canary stage is held past max_stage_s",
                                  labels=["model"])
        decisions = CounterMetricFamily("fleet_rollout_decisions", "Rollout outcomes decided",
                                        labels=["model", "decision"])
        with self.controller._lock:
            for model, m in sorted(self.controller.models.items()):
                s = m.state
                if s.stable is not None:
                    weight.add_metric([model, str(s.stable)], 1.0 - (s.weight if s.candidate else 0.0))
                if s.candidate is not None:
                    weight.add_metric([model, str(s.candidate)], s.weight)
                stage.add_metric([model], float(s.stage if s.status != "idle" else -1))
                alarm.add_metric([model], 1.0 if s.alarm else 0.0)
                for decision in ("promote", "rollback", "abort", "supersede"):
                    decisions.add_metric([model, decision], m.decisions.get(decision, 0))
        yield from (weight, stage, alarm, decisions)
