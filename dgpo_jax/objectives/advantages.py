"""Advantage estimators and masked statistics.

Every per-token array is ``[B, T]`` and aligned with ``input_ids`` (position t is the token
``ids[t]``). ``mask`` marks the tokens that count (the student's own tokens, ``loss_mask``);
every estimator treats masked-out positions as *absent*: they get advantage 0, contribute no
reward, and GAE bootstraps across them from one student token to the next, so observation
tokens never enter the recursion or the statistics. Pass a different mask (the response region,
observations included) to reproduce the reference code's quirk.

Rows may pack several trajectories (``dgpo_jax.objectives.trajectories``): the estimators take
an optional ``trajectories`` (a ``Trajectories``), and then place rewards, normalise lengths,
read per-trajectory rewards ``[N]`` and reset their recursions per trajectory, not per row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ADVANTAGE_ESTIMATORS = ("gae", "grpo", "immediate", "rtg", "none")


# ----------------------------------------------------------------------------------------------
# Masked statistics
# ----------------------------------------------------------------------------------------------
def masked_sum(x, mask, axis=None):
    return jnp.sum(x * mask, axis=axis)


def masked_mean(x, mask, axis=None):
    """Mean of ``x`` over ``mask`` (0 where the mask is empty)."""
    mask = mask.astype(jnp.float32)
    return jnp.sum(x * mask, axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def masked_var(x, mask, unbiased: bool = True):
    """Variance over the masked entries (Bessel-corrected by default, as in veRL/Search-R1)."""
    mask = mask.astype(jnp.float32)
    n = jnp.sum(mask)
    mean = jnp.sum(x * mask) / jnp.maximum(n, 1.0)
    var = jnp.sum(jnp.square(x - mean) * mask) / jnp.maximum(n, 1.0)
    if unbiased:
        var = var * n / jnp.maximum(n - 1.0, 1.0)
    return var


def masked_whiten(x, mask, shift_mean: bool = True, eps: float = 1e-8):
    """``(x - mean) / sqrt(var + eps)`` with mean/var over the mask; 0 outside the mask.

    ``shift_mean=False`` adds the mean back (scale-only whitening).
    """
    mask = mask.astype(jnp.float32)
    mean = masked_mean(x, mask)
    out = (x - mean) * jax.lax.rsqrt(masked_var(x, mask) + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def last_token_mask(mask, trajectories=None):
    """``[B, T]`` one-hot at each row's (trajectory's) last masked position (all zero for an
    empty one)."""
    if trajectories is not None:
        return trajectories.last(mask)
    mask = mask.astype(jnp.float32)
    t = mask.shape[-1]
    idx = jnp.arange(t)[None, :]
    last = jnp.max(jnp.where(mask > 0, idx, -1), axis=-1, keepdims=True)
    return (idx == last).astype(jnp.float32) * mask


def place_outcome_reward(rewards, mask, trajectories=None):
    """Outcome rewards ``[B]`` -> ``[B, T]``, placed on each row's last masked token; with
    ``trajectories``, rewards ``[N]`` on each trajectory's last masked token."""
    if trajectories is not None:
        return trajectories.gather(rewards.astype(jnp.float32)) * trajectories.last(mask)
    return rewards.astype(jnp.float32)[:, None] * last_token_mask(mask)


# ----------------------------------------------------------------------------------------------
# Estimators
# ----------------------------------------------------------------------------------------------
def _resets(trajectories, mask):
    """``()`` or ``(reset [T, B],)``: where a reverse recursion starts afresh (packed rows)."""
    if trajectories is None:
        return ()
    after = trajectories.boundary_after()
    return () if after is None else (after.T,)


def gae_advantages(
    token_rewards, values, mask, gamma: float = 1.0, lam: float = 1.0, trajectories=None
):
    """Generalised advantage estimation over the masked tokens of each row.

    Args:
      token_rewards: ``[B, T]`` per-token rewards (zero outside ``mask`` is assumed; ignored there).
      values: ``[B, T]`` critic values ``V(s_t)`` of the state before token t.
      mask: ``[B, T]`` tokens that are steps of the MDP.
      gamma, lam: discount and GAE lambda.
      trajectories: for packed rows, the recursion restarts (bootstrap 0) at each segment's end.
    Returns:
      (advantages, returns), both ``[B, T]``, zero outside the mask. Returns = advantages + values.
      The successor of a step is the next *masked* token (bootstrap value 0 after the last one).
    """
    mask = mask.astype(jnp.float32)
    r = token_rewards.astype(jnp.float32)
    v = values.astype(jnp.float32)

    reset = _resets(trajectories, mask)

    def step(carry, xs):
        next_value, next_adv = carry
        r_t, v_t, m_t, *reset_t = xs
        if reset_t:  # the successor belongs to another trajectory: nothing to bootstrap from
            next_value = jnp.where(reset_t[0], 0.0, next_value)
            next_adv = jnp.where(reset_t[0], 0.0, next_adv)
        delta = r_t + gamma * next_value - v_t
        adv = delta + gamma * lam * next_adv
        keep = m_t > 0
        carry = (jnp.where(keep, v_t, next_value), jnp.where(keep, adv, next_adv))
        return carry, jnp.where(keep, adv, 0.0)

    b = r.shape[0]
    init = (jnp.zeros((b,), jnp.float32), jnp.zeros((b,), jnp.float32))
    _, adv = jax.lax.scan(step, init, (r.T, v.T, mask.T, *reset), reverse=True)
    adv = adv.T
    return adv, (adv + v) * mask


def grpo_advantages(
    rewards,
    group_ids,
    mask,
    eps: float = 1e-6,
    std_ddof: int = 1,
    scale_by_std: bool = True,
    trajectories=None,
):
    """GRPO: ``(R - mean_group(R)) / (std_group(R) + eps)`` on every masked token of the row.

    ``group_ids [B]`` (ints) says which rollouts share a prompt. A group of one gets mean 0 and
    std 1 (veRL's convention). ``std_ddof=1`` is torch.std's unbiased estimate (reference code).
    With ``trajectories``, ``rewards`` and ``group_ids`` are per trajectory ``[N]``.
    Returns ``[B, T]``.
    """
    score = grpo_scores(rewards, group_ids, eps, std_ddof, scale_by_std)
    if trajectories is not None:
        return trajectories.gather(score) * mask.astype(jnp.float32)
    return score[:, None] * mask.astype(jnp.float32)


def grpo_scores(
    rewards, group_ids, eps: float = 1e-6, std_ddof: int = 1, scale_by_std: bool = True
):
    """The per-trajectory GRPO score ``[N]`` (see ``grpo_advantages``)."""
    r = rewards.astype(jnp.float32)
    same = (group_ids[:, None] == group_ids[None, :]).astype(jnp.float32)  # [B, B]
    n = jnp.sum(same, axis=1)
    mean = same @ r / n
    var = jnp.sum(same * jnp.square(r[None, :] - mean[:, None]), axis=1) / jnp.maximum(
        n - std_ddof, 1.0
    )
    single = n <= 1
    mean = jnp.where(single, 0.0, mean)
    std = jnp.where(single, 1.0, jnp.sqrt(var))
    score = r - mean
    if scale_by_std:
        score = score / (std + eps)
    return score


def immediate_advantages(token_rewards, mask):
    """gamma = 0: each token's advantage is its own reward."""
    return token_rewards.astype(jnp.float32) * mask.astype(jnp.float32)


def reward_to_go_advantages(
    token_rewards, mask, gamma: float = 1.0, length_normalize: bool = True, trajectories=None
):
    """Discounted reward-to-go over the masked tokens, divided by the row's masked-token count.

    ``G_t = sum_{t' >= t, masked} gamma^(k(t') - k(t)) r_t'`` with k counting masked tokens only;
    with ``length_normalize`` each row is divided by its number of masked tokens (UNVERIFIED
    reading of "length-normalised reward-to-go": the natural one, a knob). With
    ``trajectories`` the sums and counts are per trajectory.
    """
    mask = mask.astype(jnp.float32)
    r = token_rewards.astype(jnp.float32) * mask
    reset = _resets(trajectories, mask)

    def step(carry, xs):
        r_t, m_t, *reset_t = xs
        if reset_t:
            carry = jnp.where(reset_t[0], 0.0, carry)
        g = r_t + gamma * carry
        return jnp.where(m_t > 0, g, carry), jnp.where(m_t > 0, g, 0.0)

    init = jnp.zeros((r.shape[0],), jnp.float32)
    _, g = jax.lax.scan(step, init, (r.T, mask.T, *reset), reverse=True)
    g = g.T
    if length_normalize:
        if trajectories is None:
            n = jnp.sum(mask, axis=1, keepdims=True)
        else:
            n = trajectories.total(mask)
        g = g / jnp.maximum(n, 1.0)
    return g
