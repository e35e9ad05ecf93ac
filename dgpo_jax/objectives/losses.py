"""Per-token policy and value losses (elementwise on ``[B, T]``; masking and means are the
caller's, so masked means can be carried as (numerator, denominator) across micro-batches)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dgpo_jax.objectives.kl import DEFAULT_LOG_RATIO_CLAMP, clamp_log_ratio

POLICY_LOSSES = ("ppo_clip", "is", "reinforce", "none")


def ppo_clip_loss(
    logp,
    old_logp,
    advantages,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    clamp: float | None = DEFAULT_LOG_RATIO_CLAMP,
):
    """PPO clipped surrogate ``max(-rho*A, -clip(rho, 1-clip_low, 1+clip_high)*A)`` per token.

    Dual clip (``c > 1``, Ye et al. 2020): for ``A < 0`` the loss is also capped at ``-c * A``.
    ``rho = exp(l^S - l^old)`` with the log-ratio clamped to ``+-clamp``; ``advantages`` are
    treated as constants. Returns (loss ``[B, T]``, clipped ``[B, T]`` float indicator of the
    tokens where a clip is active, i.e. the gradient is zero).
    """
    adv = jax.lax.stop_gradient(advantages)
    ratio = jnp.exp(clamp_log_ratio(logp - jax.lax.stop_gradient(old_logp), clamp))
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = jnp.maximum(unclipped, clipped)
    is_clipped = clipped > unclipped
    if dual_clip is not None:
        cap = -adv * dual_clip
        dual = (adv < 0) & (loss > cap)
        loss = jnp.where(dual, cap, loss)
        is_clipped = is_clipped | dual
    return loss, is_clipped.astype(jnp.float32)


def importance_sampling_loss(
    logp, old_logp, advantages, clamp: float | None = DEFAULT_LOG_RATIO_CLAMP
):
    """``-rho * A`` (no clipping): the off-policy-corrected policy gradient."""
    ratio = jnp.exp(clamp_log_ratio(logp - jax.lax.stop_gradient(old_logp), clamp))
    return -jax.lax.stop_gradient(advantages) * ratio


def reinforce_loss(logp, advantages):
    """``-A * l^S``: on-policy REINFORCE (no importance ratio)."""
    return -jax.lax.stop_gradient(advantages) * logp


def truncated_is_weight(
    old_logp, sampler_logp, threshold: float, clamp: float | None = DEFAULT_LOG_RATIO_CLAMP
):
    """Truncated token importance weight ``min(exp(l^old - l^sampler), threshold)`` (constant).

    Corrects the mismatch between the engine that sampled (``sampler_logp``) and the trainer's
    recomputed behaviour log-probs (``old_logp``), as in the G-OPD reference (threshold 5).
    """
    w = jnp.exp(clamp_log_ratio(old_logp - sampler_logp, clamp))
    return jax.lax.stop_gradient(jnp.minimum(w, threshold))


def value_loss(values, old_values, returns, clip: float | None = 0.5):
    """Clipped value loss ``0.5 * max((V - R)^2, (V_clip - R)^2)``, ``V_clip = V_old +
    clip(V - V_old, -c, c)`` (PPO / veRL). Returns ``[B, T]``."""
    returns = jax.lax.stop_gradient(returns)
    err = jnp.square(values - returns)
    if clip is None:
        return 0.5 * err
    v_clipped = old_values + jnp.clip(values - old_values, -clip, clip)
    return 0.5 * jnp.maximum(err, jnp.square(v_clipped - returns))


def explained_variance(returns, values, mask):
    """``1 - Var(R - V) / Var(R)`` over the mask (population variances)."""
    mask = mask.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(mask), 1.0)

    def var(x):
        mean = jnp.sum(x * mask) / n
        return jnp.sum(jnp.square(x - mean) * mask) / n

    return 1.0 - var(returns - values) / jnp.maximum(var(returns), 1e-8)
