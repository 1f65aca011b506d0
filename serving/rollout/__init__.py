"""Progressive delivery: rollout state, per-request routing, the sequential judge, the controller."""
