"""Named objective presets (each is an ``ObjectiveConfig``, nothing more) and the schedules some
of them need between steps (Guided-OPD teacher-turn probability, DistiLLM student-data share,
TAID interpolation t). Defaults follow algorithms.md; UNVERIFIED ones are noted."""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable

from dgpo_jax.objectives.config import ObjectiveConfig, knob_names, replace_checked

# Shared pieces -------------------------------------------------------------------------------
_PPO_COMMON = dict(
    advantage="gae",
    gamma=1.0,
    gae_lambda=1.0,
    whiten_advantages=True,
    policy_loss="ppo_clip",
    clip_low=0.2,
    clip_high=0.2,
    entropy_coef=0.001,
    critic="separate",
    value_clip=0.5,
    value_coef=1.0,
    outcome_reward_coef=1.0,
)
_OPD_COMMON = dict(
    outcome_reward_coef=0.0,
    token_reward_coef=1.0,
    teacher_lambda=1.0,
    advantage="immediate",
    whiten_advantages=False,
    critic="none",
    policy_loss="ppo_clip",
    clip_low=0.2,
    clip_high=0.2,
    entropy_coef=0.0,
)
_KD_COMMON = dict(
    policy_loss="none",
    advantage="none",
    critic="none",
    outcome_reward_coef=0.0,
    token_reward_coef=0.0,
    entropy_coef=0.0,
    ref_model="none",
)


def ppo(beta: float = 0.001) -> ObjectiveConfig:
    """Search-R1 PPO: k1 KL to the initial student in the reward on every trajectory."""
    return ObjectiveConfig(name="ppo", token_reward_coef=beta, teacher_lambda=0.0, **_PPO_COMMON)


def dgpo(
    beta: float = 0.001,
    kl_placement: str = "reward",
    kl_direction: str = "reverse",
    kl_loss_estimator: str = "k2",
    critic: str = "separate",
) -> ObjectiveConfig:
    """DGPO stage 2: PPO, teacher as the KL target, KL only on wrong trajectories ([R = 0]).

    ``kl_placement="reward"`` (reference code: k1 on student tokens in the reward, through GAE)
    or ``"loss"`` (the KL as a loss term with ``kl_loss_estimator``; k2 gives the exact
    reverse-KL gradient), or ``"divergence"``: the exact full-vocabulary KL of every student
    token of a wrong trajectory as a loss, ``beta * KL(pi_T || pi_S)`` with
    ``kl_direction="forward"`` (the project page's teacher-first form), ``KL(pi_S || pi_T)``
    otherwise. Not the reference code's choice; it needs the teacher forward in the update.
    """
    common = dict(_PPO_COMMON, critic=critic)
    if kl_placement == "reward":
        return ObjectiveConfig(
            name="dgpo",
            token_reward_coef=beta,
            teacher_lambda=1.0,
            reward_kl_direction=kl_direction,
            trajectory_gate="incorrect",
            ref_model="teacher",
            **common,
        )
    if kl_placement == "loss":
        return ObjectiveConfig(
            name="dgpo",
            token_reward_coef=0.0,
            kl_loss_coef=beta,
            kl_loss_target="teacher",
            kl_loss_estimator=kl_loss_estimator,
            kl_loss_direction=kl_direction,
            trajectory_gate="incorrect",
            ref_model="teacher",
            **common,
        )
    if kl_placement == "divergence":
        return ObjectiveConfig(
            name="dgpo",
            token_reward_coef=0.0,
            divergence="fkl" if kl_direction == "forward" else "rkl",
            divergence_coef=beta,
            divergence_gate="trajectory",
            trajectory_gate="incorrect",
            ref_model="none",
            **common,
        )
    raise ValueError(
        f"dgpo: kl_placement must be 'reward', 'loss' or 'divergence', got {kl_placement!r}"
    )


def dgpo_coldstart() -> ObjectiveConfig:
    """DGPO stage 1: full-vocabulary forward KL on the teacher's correct trajectories (TGOs).
    Reference optimiser: AdamW lr 1e-4, cosine, no warmup, clip 1.0, 5 epochs."""
    return ObjectiveConfig(name="dgpo_coldstart", divergence="fkl", **_KD_COMMON)


def grpo(kl_coef: float = 0.001) -> ObjectiveConfig:
    """Search-R1 GRPO: group-normalised outcome advantage, k3 KL loss to the initial policy.
    (Reference: 5 rollouts per prompt, set by the sampler.)"""
    return ObjectiveConfig(
        name="grpo",
        advantage="grpo",
        outcome_reward_coef=1.0,
        token_reward_coef=0.0,
        kl_loss_coef=kl_coef,
        kl_loss_estimator="k3",
        kl_loss_target="ref",
        critic="none",
        policy_loss="ppo_clip",
        entropy_coef=0.0,
    )


def opd(policy_loss: str = "ppo_clip") -> ObjectiveConfig:
    """On-policy distillation: A_t = -(l^S_t - l^T_t), gamma = 0."""
    return ObjectiveConfig(
        name="opd", ref_model="none", **dict(_OPD_COMMON, policy_loss=policy_loss)
    )


def exopd(
    lam: float = 1.25, ref_model: str = "initial_student", tis_threshold: float | None = 5.0
) -> ObjectiveConfig:
    """G-OPD / ExOPD: A_t = lam*(l^T - l^ref) - (l^S - l^ref); reference loss PPO-clip with dual
    clip 3 and truncated IS weights (threshold 5: needs ``sampler_logprobs``; pass
    ``tis_threshold=None`` when the trainer itself sampled). ``ref_model="teacher_base"`` is the
    reward-correction variant (``ref_logprobs`` from the teacher's pre-RL base)."""
    return ObjectiveConfig(
        name="exopd",
        ref_model=ref_model,
        dual_clip=3.0,
        tis_threshold=tis_threshold,
        **dict(_OPD_COMMON, teacher_lambda=lam),
    )


def tropd(
    trust_threshold: float = 1.0,
    outlier_handling: str = "divergence",
    top_k: int = 16,
    teacher_prefix_share: float = 0.0,
    teacher_prefix_tokens: int = 0,
) -> ObjectiveConfig:
    """TrOPD: OPD term on trusted tokens (P_trust = min(p_T/p_S, 1) >= threshold), top-k forward
    KL on outliers (or clip / mask), forward KL on teacher-prefix tokens (``teacher_mask``; on when
    ``teacher_prefix_share > 0``).
    Threshold, top-k and prefix length are UNVERIFIED knobs."""
    div = "topk_fkl" if outlier_handling == "divergence" else "none"
    return ObjectiveConfig(
        name="tropd",
        ref_model="none",
        trust_threshold=trust_threshold,
        outlier_handling=outlier_handling,
        divergence=div,
        divergence_top_k=top_k,
        teacher_token_loss="fkl" if teacher_prefix_share > 0 else "none",
        teacher_prefix_share=teacher_prefix_share,
        teacher_prefix_tokens=teacher_prefix_tokens,
        **_OPD_COMMON,
    )


def guided_opd(
    p0: float = 0.5, schedule: str = "linear", teacher_turn_loss: str = "none"
) -> ObjectiveConfig:
    """Guided-OPD: OPD on student turns; teacher turns (``teacher_mask``) get no loss by default
    (UNVERIFIED: ``teacher_turn_loss`` = "sft" / "fkl"); ``p(k)`` from ``teacher_turn_probability``
    (p0 and the shape are UNVERIFIED knobs)."""
    return ObjectiveConfig(
        name="guided_opd",
        ref_model="none",
        guided_p0=p0,
        guided_schedule=schedule,
        teacher_token_loss=teacher_turn_loss,
        **_OPD_COMMON,
    )


def kd() -> ObjectiveConfig:
    """Word-level KD: full-vocabulary forward KL on teacher-generated data (lr 1e-4)."""
    return ObjectiveConfig(name="kd", divergence="fkl", **_KD_COMMON)


def seqkd() -> ObjectiveConfig:
    """SeqKD: SFT (-l^S) on teacher-generated sequences."""
    return ObjectiveConfig(name="seqkd", divergence="nll", **_KD_COMMON)


def gkd(beta: float = 0.1, lam: float = 0.5) -> ObjectiveConfig:
    """GKD: generalized JSD_beta; student-generated data with probability lam."""
    return ObjectiveConfig(
        name="gkd", divergence="jsd", jsd_beta=beta, student_data_fraction=lam, **_KD_COMMON
    )


def distillm(alpha: float = 0.1) -> ObjectiveConfig:
    """DistiLLM: skew KL KL(T || a T + (1-a) S); adaptive student-data share (starts at 0,
    +0.1 when the validation loss rises by > 0.1; ``distillm_student_share``), replay 1000."""
    return ObjectiveConfig(
        name="distillm",
        divergence="skew_fkl",
        skew_alpha=alpha,
        student_data_fraction=0.0,
        adaptive_student_share=True,
        replay_buffer_size=1000,
        **_KD_COMMON,
    )


def taid(t_start: float = 0.4, t_end: float = 1.0, alpha: float = 5e-4) -> ObjectiveConfig:
    """TAID: KL(p_t || S), p_t = softmax((1-t) sg(z_S) + t z_T); t from ``taid_update`` (passed
    as the batch scalar ``taid_t``)."""
    return ObjectiveConfig(
        name="taid",
        divergence="taid",
        taid_t_start=t_start,
        taid_t_end=t_end,
        taid_alpha=alpha,
        **_KD_COMMON,
    )


OBJECTIVE_PRESETS: dict[str, Callable[..., ObjectiveConfig]] = {
    "ppo": ppo,
    "grpo": grpo,
    "dgpo": dgpo,
    "dgpo_coldstart": dgpo_coldstart,
    "opd": opd,
    "exopd": exopd,
    "tropd": tropd,
    "guided_opd": guided_opd,
    "kd": kd,
    "seqkd": seqkd,
    "gkd": gkd,
    "distillm": distillm,
    "taid": taid,
}


def get_objective(name: str, **kwargs: Any) -> ObjectiveConfig:
    """A preset by name; ``kwargs`` are the preset's own arguments or any ``ObjectiveConfig``
    knob (applied last). Unknown names raise ``ValueError`` listing what exists."""
    if name not in OBJECTIVE_PRESETS:
        raise ValueError(f"unknown objective preset {name!r}; known: {sorted(OBJECTIVE_PRESETS)}")
    fn = OBJECTIVE_PRESETS[name]
    preset_args = set(inspect.signature(fn).parameters)
    own = {k: v for k, v in kwargs.items() if k in preset_args}
    knobs = {k: v for k, v in kwargs.items() if k not in preset_args}
    unknown = sorted(set(knobs) - set(knob_names()))
    if unknown:
        raise ValueError(
            f"unknown argument(s) {unknown} for objective preset {name!r}; preset "
            f"arguments: {sorted(preset_args)}; or any ObjectiveConfig knob"
        )
    cfg = fn(**own)
    return replace_checked(cfg, knobs) if knobs else cfg


# ----------------------------------------------------------------------------------------------
# Schedules (host-side; pure Python floats)
# ----------------------------------------------------------------------------------------------
def teacher_turn_probability(
    step: int, total_steps: int, p0: float, shape: str = "linear", decay_rate: float = 5.0
) -> float:
    """Guided-OPD curriculum p(k): p0 at step 0, decaying to exactly 0 at ``total_steps``.

    linear: p0 (1 - x); cosine: p0 (1 + cos(pi x)) / 2; exponential: p0 (e^{-r x} - e^{-r}) /
    (1 - e^{-r}), with x = step / total_steps clipped to [0, 1].
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    x = min(max(step / total_steps, 0.0), 1.0)
    if shape == "linear":
        return p0 * (1.0 - x)
    if shape == "cosine":
        return p0 * 0.5 * (1.0 + math.cos(math.pi * x))
    if shape == "exponential":
        if decay_rate <= 0:
            raise ValueError("exponential schedule needs decay_rate > 0")
        return (
            p0 * (math.exp(-decay_rate * x) - math.exp(-decay_rate)) / (1 - math.exp(-decay_rate))
        )
    raise ValueError(f"unknown schedule {shape!r}; expected linear, cosine or exponential")


def distillm_student_share(
    share: float,
    previous_val_loss: float | None,
    val_loss: float,
    step: float = 0.1,
    rise: float = 0.1,
) -> float:
    """DistiLLM adaptive student-data share: +step (capped at 1) when the validation loss rose
    by more than ``rise`` since the previous evaluation; unchanged otherwise."""
    if previous_val_loss is not None and val_loss - previous_val_loss > rise:
        return min(1.0, share + step)
    return share


def taid_update(
    t: float,
    momentum: float,
    previous_loss: float | None,
    loss: float,
    progress: float,
    t_start: float = 0.4,
    t_end: float = 1.0,
    alpha: float = 5e-4,
    beta: float = 0.99,
    eps: float = 1e-8,
) -> tuple[float, float]:
    """TAID adaptive t: ``m <- beta m + (1 - beta) * (L_prev - L) / L_prev``;
    ``t <- min(1, max(t_target, t + alpha * sigmoid(m) * (1 - t)))`` with the linear target
    ``t_target = t_start + (t_end - t_start) * progress``. Returns (t, m)."""
    if previous_loss is not None:
        momentum = beta * momentum + (1 - beta) * (previous_loss - loss) / (
            abs(previous_loss) + eps
        )
    target = t_start + (t_end - t_start) * min(max(progress, 0.0), 1.0)
    sig = 1.0 / (1.0 + math.exp(-momentum))
    return min(1.0, max(target, t + alpha * sig * (1.0 - t))), momentum
