"""Rewards and evaluation metrics: exact match and the ARCap diagnostics."""

from dgpo_jax.evaluation.metrics import (
    TrajectoryRecord,
    arcap_summary,
    exact_match,
    extract_answer,
    greedy_vs_sampled,
    has_gold_hit,
    normalize_answer,
    strip_think,
)
