"""Named objective presets: each is an ``ObjectiveConfig``, nothing more. Their formulas, knobs
and reference hyperparameters are in docs/algorithms.md; UNVERIFIED defaults are noted. A
preset's curriculum (teacher turns, data mixing, TAID's t) is ``dgpo_jax.curricula``'s."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

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
        entropy_coef=0.001,  # Search-R1 train_grpo.sh inherits ppo_trainer.yaml's 0.001
    )


def opd(policy_loss: str = "ppo_clip") -> ObjectiveConfig:
    """On-policy distillation: A_t = -(l^S_t - l^T_t), gamma = 0."""
    return ObjectiveConfig(name="opd", **dict(_OPD_COMMON, policy_loss=policy_loss))


def exopd(lam: float = 1.25, tis_threshold: float | None = 5.0) -> ObjectiveConfig:
    """G-OPD / ExOPD: A_t = lam*(l^T - l^ref) - (l^S - l^ref); reference loss PPO-clip with dual
    clip 3 and truncated IS weights (threshold 5: needs ``sampler_logprobs``; pass
    ``tis_threshold=None`` when the trainer itself sampled). The reward-correction variant takes
    ``ref_logprobs`` from the teacher's pre-RL base (run config ``model.ref_model``)."""
    return ObjectiveConfig(
        name="exopd",
        dual_clip=3.0,
        tis_threshold=tis_threshold,
        **dict(_OPD_COMMON, teacher_lambda=lam),
    )


def tropd(
    trust_threshold: float = 1.0, outlier_handling: str = "divergence", top_k: int = 16
) -> ObjectiveConfig:
    """TrOPD: OPD term on trusted tokens (P_trust = min(p_T/p_S, 1) >= threshold), top-k forward
    KL on outliers (or clip / mask), forward KL on teacher-prefix tokens (``teacher_mask``; the
    prefixes themselves are the curriculum's ``teacher_prefix_share``).
    Threshold, top-k and prefix length are UNVERIFIED knobs."""
    div = "topk_fkl" if outlier_handling == "divergence" else "none"
    return ObjectiveConfig(
        name="tropd",
        trust_threshold=trust_threshold,
        outlier_handling=outlier_handling,
        divergence=div,
        divergence_top_k=top_k,
        teacher_token_loss="fkl",
        **_OPD_COMMON,
    )


def guided_opd(teacher_turn_loss: str = "none") -> ObjectiveConfig:
    """Guided-OPD: OPD on student turns; teacher turns (``teacher_mask``) get no loss by default
    (UNVERIFIED: ``teacher_turn_loss`` = "sft" / "fkl"). The teacher-turn probability p(k) is
    the curriculum's (``guided_p0``, ``guided_schedule``)."""
    return ObjectiveConfig(name="guided_opd", teacher_token_loss=teacher_turn_loss, **_OPD_COMMON)


def kd() -> ObjectiveConfig:
    """Word-level KD: full-vocabulary forward KL on teacher-generated data (lr 1e-4)."""
    return ObjectiveConfig(name="kd", divergence="fkl", **_KD_COMMON)


def seqkd() -> ObjectiveConfig:
    """SeqKD: SFT (-l^S) on teacher-generated sequences."""
    return ObjectiveConfig(name="seqkd", divergence="nll", **_KD_COMMON)


def gkd(beta: float = 0.1) -> ObjectiveConfig:
    """GKD: generalized JSD_beta (the student-data share lambda is the curriculum's)."""
    return ObjectiveConfig(name="gkd", divergence="jsd", jsd_beta=beta, **_KD_COMMON)


def distillm(alpha: float = 0.1) -> ObjectiveConfig:
    """DistiLLM: skew KL KL(T || a T + (1-a) S) (the adaptive student-data share and the replay
    buffer are the curriculum's)."""
    return ObjectiveConfig(name="distillm", divergence="skew_fkl", skew_alpha=alpha, **_KD_COMMON)


def taid() -> ObjectiveConfig:
    """TAID: KL(p_t || S), p_t = softmax((1-t) sg(z_S) + t z_T); t is the batch scalar
    ``taid_t``, from the curriculum's ``taid_update``."""
    return ObjectiveConfig(name="taid", divergence="taid", **_KD_COMMON)


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
