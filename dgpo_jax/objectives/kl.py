"""Per-token KL estimators k1 / k2 / k3 (Schulman's note) with log-ratio clamping.

All functions are elementwise on log-prob arrays of any shape (usually ``[B, T]``) aligned with
``input_ids`` (position t holds ``log p(ids[t] | ids[<t])``). Masking is the caller's job.

Direction ``"reverse"`` estimates ``KL(S || M)`` from tokens sampled by the student S (the
reference code's choice: ``d = l^S - l^M``):

  k1 = d                     unbiased, high variance, can be negative
  k2 = d^2 / 2               biased; as a loss its gradient is the exact reverse-KL gradient
  k3 = exp(-d) - 1 + d       unbiased, low variance, >= 0; as a loss: forward-KL gradient

Direction ``"forward"`` estimates ``KL(M || S)`` from the same student samples with the
importance ratio ``q = p_M / p_S = exp(-d)`` (our reading of "the teacher first"; UNVERIFIED
which form the DGPO project page means):

  k1 = q * log q             unbiased
  k2 = q * (log q)^2 / 2     biased analogue of k2
  k3 = q * log q - (q - 1)   unbiased, >= 0
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

KL_ESTIMATORS = ("k1", "k2", "k3")
KL_DIRECTIONS = ("reverse", "forward")
DEFAULT_LOG_RATIO_CLAMP = 20.0


def clamp_log_ratio(log_ratio: jax.Array, clamp: float | None = DEFAULT_LOG_RATIO_CLAMP):
    """Clip a log-ratio to ``[-clamp, clamp]`` (no-op for ``None``) so ``exp`` stays finite."""
    if clamp is None:
        return log_ratio
    return jnp.clip(log_ratio, -clamp, clamp)


def kl_estimate(
    logp_student: jax.Array,
    logp_other: jax.Array,
    estimator: str = "k1",
    direction: str = "reverse",
    clamp: float | None = DEFAULT_LOG_RATIO_CLAMP,
) -> jax.Array:
    """Per-token KL estimate between the student and another model M (teacher or reference).

    Args:
      logp_student: ``l^S`` of the sampled tokens, any shape.
      logp_other: ``l^M`` of the same tokens, same shape.
      estimator: "k1" | "k2" | "k3".
      direction: "reverse" (KL(S||M), default) or "forward" (KL(M||S), importance-weighted).
      clamp: the log-ratio ``d = l^S - l^M`` is clipped to ``[-clamp, clamp]`` first.
    Returns:
      float32 array of the input shape.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")
    if direction not in KL_DIRECTIONS:
        raise ValueError(f"unknown KL direction {direction!r}; expected one of {KL_DIRECTIONS}")
    d = clamp_log_ratio(logp_student.astype(jnp.float32) - logp_other.astype(jnp.float32), clamp)
    if direction == "reverse":
        if estimator == "k1":
            return d
        if estimator == "k2":
            return 0.5 * d * d
        return jnp.exp(-d) - 1.0 + d
    q, log_q = jnp.exp(-d), -d
    if estimator == "k1":
        return q * log_q
    if estimator == "k2":
        return 0.5 * q * log_q * log_q
    return q * log_q - (q - 1.0)
