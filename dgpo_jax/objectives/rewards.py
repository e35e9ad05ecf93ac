"""Per-token rewards of the unified objective, the DGPO trajectory gate and the TrOPD trust gate.

  r_t = c_R * R * [t = last] + c_D * u(tau) * ( lam*(l^T_t - l^ref_t) - (l^S_t - l^ref_t) )

All arrays ``[B, T]`` aligned with ``input_ids``; ``rewards``/gates ``[B]`` per row, or, for
rows that pack several trajectories, ``[N]`` per trajectory and put on the tokens first
(``dgpo_jax.objectives.trajectories``): ``token_rewards`` takes per-token ``[B, T]`` rewards
(already placed) and gates as well.
"""

from __future__ import annotations

import jax.numpy as jnp

from dgpo_jax.objectives.advantages import place_outcome_reward
from dgpo_jax.objectives.config import ObjectiveConfig
from dgpo_jax.objectives.kl import clamp_log_ratio, kl_estimate


def trajectory_gate(cfg: ObjectiveConfig, rewards, batch_size: int):
    """u(tau) ``[B]`` (one per trajectory): 1 everywhere, or DGPO's ``[R < gate_threshold]``
    (wrong answers)."""
    if cfg.trajectory_gate == "none":
        return jnp.ones((batch_size,), jnp.float32)
    return (rewards.astype(jnp.float32) < cfg.gate_threshold).astype(jnp.float32)


def teacher_token_term(cfg: ObjectiveConfig, logp_student, logp_teacher, logp_ref):
    """The bracket ``lam*(l^T - l^ref) - (l^S - l^ref)`` (k1 reverse), or ``-k(l^S, l^M)``
    for another estimator/direction with M = teacher (lam = 1) or ref (lam = 0)."""
    lam, clamp = cfg.teacher_lambda, cfg.log_ratio_clamp
    if cfg.reward_kl_estimator == "k1" and cfg.reward_kl_direction == "reverse":
        if lam == 1.0:
            return clamp_log_ratio(logp_teacher - logp_student, clamp)
        if lam == 0.0:
            return -clamp_log_ratio(logp_student - logp_ref, clamp)
        return lam * clamp_log_ratio(logp_teacher - logp_ref, clamp) - clamp_log_ratio(
            logp_student - logp_ref, clamp
        )
    target = logp_teacher if lam == 1.0 else logp_ref
    return -kl_estimate(
        logp_student, target, cfg.reward_kl_estimator, cfg.reward_kl_direction, clamp
    )


def trust_mask(cfg: ObjectiveConfig, logp_student, logp_teacher):
    """TrOPD: 1 where ``P_trust = min(p_T / p_S, 1) >= trust_threshold`` (float ``[B, T]``)."""
    log_trust = jnp.minimum(logp_teacher - logp_student, 0.0)
    return (log_trust >= jnp.log(cfg.trust_threshold)).astype(jnp.float32)


def token_rewards(
    cfg: ObjectiveConfig,
    loss_mask,
    rewards=None,
    gate=None,
    logp_student=None,
    logp_teacher=None,
    logp_ref=None,
):
    """Returns (token rewards ``[B, T]``, policy token gate g ``[B, T]``).

    ``rewards``: outcome rewards ``[B]`` (placed on each row's last ``loss_mask`` token) or
    ``[B, T]`` already placed. ``gate``: u(tau) ``[B]`` per row or ``[B, T]`` per token.
    Outliers of the trust region get g = 0 ("mask", "divergence") or their term clipped below
    at ``-outlier_clip`` ("clip"; UNVERIFIED form).
    """
    mask = loss_mask.astype(jnp.float32)
    out = jnp.zeros(mask.shape, jnp.float32)
    policy_gate = mask
    if cfg.outcome_reward_coef and rewards is not None:
        placed = rewards.astype(jnp.float32) if rewards.ndim == 2 else None
        if placed is None:
            placed = place_outcome_reward(rewards, mask)
        out = out + cfg.outcome_reward_coef * placed
    if cfg.uses_token_reward:
        term = teacher_token_term(
            cfg,
            logp_student.astype(jnp.float32),
            None if logp_teacher is None else logp_teacher.astype(jnp.float32),
            None if logp_ref is None else logp_ref.astype(jnp.float32),
        )
        if cfg.trust_threshold is not None:
            trusted = trust_mask(cfg, logp_student, logp_teacher)
            if cfg.outlier_handling == "clip":
                term = jnp.where(trusted > 0, term, jnp.maximum(term, -cfg.outlier_clip))
            else:
                policy_gate = mask * trusted
        if gate is None:
            u = jnp.ones((mask.shape[0], 1), jnp.float32)
        else:
            u = gate if gate.ndim == 2 else gate[:, None]
        out = out + cfg.token_reward_coef * u * term * mask
    return out, policy_gate
