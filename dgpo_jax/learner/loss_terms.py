"""The loss terms of the unified objective, one small function each.

A term reads ``TermInputs`` (one micro-batch's rows and the student's forward outputs) and
returns a ``TermOut``: its metric numerators (``sums``) and its contribution, either per token
(``per_token``: the student-token terms, summed in order and averaged with the batch's token
weights over ``Denominators.student``) or as a scalar already divided by its own denominator
(``loss``: teacher tokens, critic). ``active_terms(cfg)`` lists the terms an objective uses;
``combine`` adds them up in that order:

  loss = sum_t w_t (policy + kl - entropy + divergence)_t / den_student
         + teacher_token_coef * sum(teacher term) / den_teacher + value_coef * sum(vl) / den_critic

Every denominator belongs to the whole batch (``dgpo_jax.learner.prepared``), so the sum over
micro-batches is the full-batch loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from dgpo_jax.learner.prepared import Denominators, TokenRows
from dgpo_jax.objectives import advantages as adv_lib
from dgpo_jax.objectives.config import ObjectiveConfig
from dgpo_jax.objectives.kl import kl_estimate
from dgpo_jax.objectives.losses import (
    importance_sampling_loss,
    ppo_clip_loss,
    reinforce_loss,
    truncated_is_weight,
    value_loss,
)
from dgpo_jax.objectives.rewards import token_rewards

f32 = jnp.float32
sg = jax.lax.stop_gradient


@dataclasses.dataclass(frozen=True)
class TermInputs:
    """What the terms of one micro-batch read."""

    cfg: ObjectiveConfig
    rows: TokenRows
    logp: jax.Array  # the current student's log-probs of the batch tokens
    entropy: jax.Array  # the student's entropy (differentiable only with an entropy bonus)
    stats: dict  # the chunked vocabulary pass: "div", "tdiv" (divergences) where asked
    teacher_logp: jax.Array | None  # teacher log-probs (given, or from the teacher forward)
    advantages: jax.Array | None  # the policy term's advantages
    policy_gate: jax.Array  # the policy term's token gate (loss_mask x TrOPD trust)
    values: jax.Array | None = None  # the current critic's values (critic term)


@dataclasses.dataclass(frozen=True)
class TermOut:
    sums: dict
    per_token: jax.Array | None = None  # a student-token term [B, T]
    loss: jax.Array | None = None  # a scalar contribution, own denominator applied


def policy_inputs(cfg: ObjectiveConfig, rows: TokenRows, logp, teacher_logp):
    """(advantages, policy token gate): the whole batch's (global estimators: GAE, GRPO,
    reward-to-go, whitening), or this micro-batch's immediate token rewards."""
    if not cfg.uses_policy:
        return None, rows.loss_mask
    if cfg.global_advantage:
        return rows.advantages, rows.policy_gate
    lm = rows.loss_mask
    l_s = rows.old_logprobs if cfg.reward_logprob_source == "old" else sg(logp)
    tok_r, pgate = token_rewards(
        cfg, lm, rows.outcome, rows.gate, l_s, teacher_logp, rows.ref_logprobs
    )
    return adv_lib.immediate_advantages(tok_r, lm), pgate


# --- the terms --------------------------------------------------------------------------------
def policy_term(x: TermInputs, dens: Denominators) -> TermOut:
    """PPO-clip / IS / REINFORCE on the advantages, times the truncated IS weight and the
    policy token gate."""
    cfg, rows, logp = x.cfg, x.rows, x.logp
    old, adv, lm = rows.old_logprobs, x.advantages, rows.loss_mask
    clipped = jnp.zeros_like(lm)
    if cfg.policy_loss == "ppo_clip":
        pg, clipped = ppo_clip_loss(
            logp, old, adv, cfg.clip_low, cfg.clip_high, cfg.dual_clip, cfg.log_ratio_clamp
        )
    elif cfg.policy_loss == "is":
        pg = importance_sampling_loss(logp, old, adv, cfg.log_ratio_clamp)
    else:
        pg = reinforce_loss(logp, adv)
    if cfg.tis_threshold is not None:
        pg = pg * truncated_is_weight(
            old, rows.sampler_logprobs, cfg.tis_threshold, cfg.log_ratio_clamp
        )
    pg = pg * x.policy_gate
    sums = {
        "policy_loss": jnp.sum(pg * rows.token_weight),
        "clip_frac": jnp.sum(clipped * lm),
        "approx_kl_old": jnp.sum(kl_estimate(logp, old, "k3", "reverse", cfg.log_ratio_clamp) * lm),
        "advantage_abs": jnp.sum(jnp.abs(adv) * lm),
    }
    return TermOut(sums, per_token=pg)


def kl_term(x: TermInputs, dens: Denominators) -> TermOut:
    """The KL estimator to the reference (or the teacher) in the loss, gated by u(tau)."""
    cfg = x.cfg
    target = x.teacher_logp if cfg.kl_loss_target == "teacher" else x.rows.ref_logprobs
    kl = (
        kl_estimate(
            x.logp, target, cfg.kl_loss_estimator, cfg.kl_loss_direction, cfg.log_ratio_clamp
        )
        * x.rows.gate
    )
    return TermOut({"kl_loss": jnp.sum(kl * x.rows.token_weight)}, per_token=cfg.kl_loss_coef * kl)


def entropy_term(x: TermInputs, dens: Denominators) -> TermOut:
    """The entropy bonus (with ``entropy_coef``); the entropy metric always."""
    sums = {"entropy": jnp.sum(sg(x.entropy) * x.rows.loss_mask)}
    if not x.cfg.entropy_coef:
        return TermOut(sums)
    return TermOut(sums, per_token=-(x.cfg.entropy_coef * x.entropy))


def divergence_term(x: TermInputs, dens: Denominators) -> TermOut:
    """A full-vocabulary divergence to the teacher (or NLL) on the student's tokens; TrOPD
    puts it on the untrusted tokens only, DGPO's divergence placement gates it by u(tau)."""
    cfg = x.cfg
    div = -x.logp if cfg.divergence == "nll" else x.stats["div"]
    if cfg.trust_threshold is not None and cfg.outlier_handling == "divergence":
        div = div * (1.0 - x.policy_gate)
    if cfg.divergence_gate == "trajectory":
        div = div * x.rows.gate
    sums = {"divergence": jnp.sum(div * x.rows.token_weight)}
    return TermOut(sums, per_token=cfg.divergence_coef * div)


def teacher_token_term(x: TermInputs, dens: Denominators) -> TermOut:
    """SFT or a divergence on teacher-generated tokens (Guided-OPD turns, TrOPD prefixes),
    averaged over the batch's teacher tokens."""
    cfg = x.cfg
    ttl = -x.logp if cfg.teacher_token_loss == "sft" else x.stats["tdiv"]
    total = jnp.sum(ttl * x.rows.teacher_mask)
    return TermOut(
        {"teacher_token_loss": total}, loss=cfg.teacher_token_coef * total / dens.teacher
    )


def critic_term(x: TermInputs, dens: Denominators) -> TermOut:
    """The clipped value loss on the critic's tokens, and explained-variance numerators."""
    cfg, rows = x.cfg, x.rows
    crit_mask, ret = rows.critic_mask, rows.returns
    vl = value_loss(x.values, rows.old_values, ret, cfg.value_clip)
    total = jnp.sum(vl * crit_mask)
    err = ret - sg(x.values)
    sums = {
        "value_loss": total,
        "ev_n": jnp.sum(crit_mask),
        "ev_r": jnp.sum(ret * crit_mask),
        "ev_r2": jnp.sum(ret * ret * crit_mask),
        "ev_e": jnp.sum(err * crit_mask),
        "ev_e2": jnp.sum(err * err * crit_mask),
    }
    return TermOut(sums, loss=cfg.value_coef * total / dens.critic)


def diagnostics(x: TermInputs, dens: Denominators) -> TermOut:
    """No loss: the TrOPD trust share, and the KL of the current student to the teacher (else
    the reference) with each estimator."""
    cfg, lm = x.cfg, x.rows.loss_mask
    sums = {}
    if cfg.trust_threshold is not None:
        sums["trust_share"] = jnp.sum(x.policy_gate * lm)
    target = x.teacher_logp if x.teacher_logp is not None else x.rows.ref_logprobs
    if target is not None:
        for est in ("k1", "k2", "k3"):
            kl = kl_estimate(x.logp, target, est, "reverse", cfg.log_ratio_clamp)
            sums[f"kl_{est}"] = jnp.sum(sg(kl) * lm)
    return TermOut(sums)


Term = Callable[[TermInputs, Denominators], TermOut]


def active_terms(cfg: ObjectiveConfig) -> tuple[tuple[str, Term], ...]:
    """The terms of ``cfg``'s loss, in the order they are added."""
    terms = []
    if cfg.uses_policy:
        terms.append(("policy", policy_term))
    if cfg.kl_loss_coef:
        terms.append(("kl", kl_term))
    terms.append(("entropy", entropy_term))
    if cfg.divergence != "none":
        terms.append(("divergence", divergence_term))
    if cfg.teacher_token_loss != "none":
        terms.append(("teacher_token", teacher_token_term))
    if cfg.critic != "none" and cfg.uses_policy:
        terms.append(("critic", critic_term))
    terms.append(("diagnostics", diagnostics))
    return tuple(terms)


def combine(outs: list[TermOut], rows: TokenRows, dens: Denominators):
    """(loss, metric sums) of one micro-batch from its terms' outputs."""
    student = None
    for out in outs:
        if out.per_token is not None:
            student = out.per_token if student is None else student + out.per_token
    if student is None:
        student = jnp.zeros_like(rows.loss_mask)
    loss = jnp.sum(student * rows.token_weight) / dens.student
    sums = {}
    for out in outs:
        if out.loss is not None:
            loss = loss + out.loss
        sums.update(out.sums)
    sums["loss"] = loss
    return loss, jax.tree.map(lambda v: sg(v).astype(f32), sums)
