"""``ObjectiveConfig``: every knob of the unified per-token objective, validated.

The objective (docs/algorithms.md, "The one objective, as implemented"):

  L = mean_{m_t} [ g_t * w_t * PPOclip(A_t) + kl_loss_coef * u * k(l^S, l^M)
                   - entropy_coef * H_t + divergence_coef * [u] * D_t ]
      + teacher_token_coef * mean_{teacher_mask} [ D^teacher_t ]  + value_coef * L_value
  A_t = Adv( outcome_reward_coef * R * [t = last]
             + token_reward_coef * u(tau) * ( lam*(l^T_t - l^ref_t) - (l^S_t - l^ref_t) ) )

``[u]``: the divergence is gated by u(tau) only with ``divergence_gate="trajectory"``.
Student-token terms share one denominator, the number of ``loss_mask`` tokens (gates zero a
token's term but keep it in the count; TrOPD outliers, for example, then get their divergence
in the same mean); teacher-token terms are averaged over ``teacher_mask`` tokens; the value loss
over the critic's tokens. Denominators depend only on the batch masks, so the mean over
micro-batches is exact.

A preset (``presets.py``) is one of these configs; nothing else selects a code path. What a
run changes between steps (teacher turns and prefixes, data mixing, TAID's t) is the
curriculum (``dgpo_jax.curricula.CurriculumConfig``); which model ``ref_logprobs`` come from is
the run config's ``model.ref_model``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dgpo_jax.objectives.advantages import ADVANTAGE_ESTIMATORS
from dgpo_jax.objectives.divergences import DIVERGENCES, DivergenceSpec
from dgpo_jax.objectives.kl import KL_DIRECTIONS, KL_ESTIMATORS
from dgpo_jax.objectives.losses import POLICY_LOSSES

_CHOICES = {
    "advantage": ADVANTAGE_ESTIMATORS,
    "policy_loss": POLICY_LOSSES,
    "reward_kl_estimator": KL_ESTIMATORS,
    "reward_kl_direction": KL_DIRECTIONS,
    "reward_logprob_source": ("old", "current"),
    "trajectory_gate": ("none", "incorrect"),
    "kl_loss_estimator": KL_ESTIMATORS,
    "kl_loss_direction": KL_DIRECTIONS,
    "kl_loss_target": ("ref", "teacher"),
    "loss_aggregation": ("token_mean", "seq_mean_token_mean"),
    "outlier_handling": ("mask", "clip", "divergence"),
    "divergence": ("none", "nll") + DIVERGENCES,
    "divergence_gate": ("none", "trajectory"),
    "teacher_token_loss": ("none", "sft", "fkl", "topk_fkl"),
    "critic": ("none", "value_head", "separate"),
}


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """All knobs. Frozen and hashable (a static part of the compiled update step)."""

    name: str = "custom"
    # --- rewards -> advantages -----------------------------------------------------------------
    outcome_reward_coef: float = 1.0  # c_R: outcome reward R on the last student token
    token_reward_coef: float = 0.0  # c_D: per-token teacher/KL reward (DGPO beta, OPD 1)
    teacher_lambda: float = 1.0  # lam of G-OPD: 0 = KL to ref only (PPO), 1 = OPD/DGPO,
    # > 1 = ExOPD. lam not in {0, 1} needs ref_logprobs.
    reward_kl_estimator: str = "k1"  # k2/k3 only for lam in {0, 1} (target ref / teacher)
    reward_kl_direction: str = "reverse"  # reverse = KL(S||M) (reference code); forward = KL(M||S)
    reward_logprob_source: str = "old"  # l^S in the reward: behaviour ("old") or current (sg)
    trajectory_gate: str = "none"  # u(tau): "incorrect" = [R < gate_threshold] (DGPO)
    gate_threshold: float = 0.1  # DGPO: create_reward_based_mask, score < 0.1 (ray_trainer.py)
    advantage: str = "gae"  # gae | grpo | immediate (gamma=0) | rtg | none
    gamma: float = 1.0
    gae_lambda: float = 1.0
    rtg_length_normalize: bool = True
    whiten_advantages: bool = False  # masked whitening over the batch
    whiten_shift_mean: bool = True
    grpo_eps: float = 1e-6
    grpo_std_ddof: int = 1  # torch.std (unbiased), as the reference code
    grpo_scale_by_std: bool = True
    log_ratio_clamp: float = 20.0  # every log-ratio is clipped before exp
    # --- policy loss ----------------------------------------------------------------------------
    policy_loss: str = "ppo_clip"  # ppo_clip | is | reinforce | none
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None  # c > 1 (G-OPD reference: 3)
    tis_threshold: float | None = None  # truncated IS weights; needs sampler_logprobs
    entropy_coef: float = 0.0
    loss_aggregation: str = "token_mean"
    # --- KL in the loss -------------------------------------------------------------------------
    kl_loss_coef: float = 0.0
    kl_loss_estimator: str = "k3"
    kl_loss_direction: str = "reverse"
    kl_loss_target: str = "ref"  # "teacher" for DGPO with the KL placed in the loss
    # --- TrOPD trust region ---------------------------------------------------------------------
    trust_threshold: float | None = None  # None: no token gate; tokens with
    # P_trust = min(p_T/p_S, 1) >= threshold are trusted
    outlier_handling: str = "mask"  # mask | clip (A >= -outlier_clip) | divergence
    outlier_clip: float = 1.0  # UNVERIFIED; only for outlier_handling="clip"
    # --- full-vocabulary divergence on student tokens -------------------------------------------
    divergence: str = "none"  # none | nll (SFT) | fkl | rkl | jsd | skew_fkl | ...
    divergence_coef: float = 1.0  # alpha
    divergence_gate: str = "none"  # "trajectory": D_t times u(tau) (DGPO, KL as a full-vocab loss)
    divergence_top_k: int = 0  # for topk_fkl
    topk_renormalize: bool = True  # UNVERIFIED (TrOPD); renormalise over the top-k
    jsd_beta: float = 0.1  # GKD beta
    skew_alpha: float = 0.1  # DistiLLM a
    # --- teacher tokens (Guided-OPD teacher turns, TrOPD teacher prefixes) -----------------------
    teacher_token_loss: str = "none"  # none | sft | fkl | topk_fkl  (on teacher_mask tokens)
    teacher_token_coef: float = 1.0
    # --- critic ---------------------------------------------------------------------------------
    critic: str = "none"  # none | value_head (on the student trunk) | separate
    value_coef: float = 1.0
    value_clip: float | None = 0.5
    reference_quirk: bool = False  # GAE/whitening/critic over observation tokens too
    # --- numerics -------------------------------------------------------------------------------
    seq_chunk: int = 128  # positions per vocabulary-projection chunk

    def __post_init__(self):
        errors = []
        for field, choices in _CHOICES.items():
            if getattr(self, field) not in choices:
                errors.append(f"{field}={getattr(self, field)!r} is not one of {choices}")
        if errors:
            raise ValueError(f"ObjectiveConfig {self.name!r}: " + "; ".join(errors))
        self._check_combinations()

    # ------------------------------------------------------------------------------------------
    def _check_combinations(self):
        e = []
        uses_policy = self.policy_loss != "none"
        if self.advantage == "gae" and uses_policy and self.critic == "none":
            e.append("advantage='gae' needs a critic (critic='value_head' or 'separate')")
        if self.critic != "none" and self.advantage != "gae":
            e.append(
                f"critic={self.critic!r} is only used by advantage='gae' (got {self.advantage!r})"
            )
        if uses_policy and self.advantage == "none":
            e.append(f"policy_loss={self.policy_loss!r} needs an advantage estimator")
        if not uses_policy and self.advantage != "none":
            e.append("policy_loss='none' with an advantage estimator: set advantage='none'")
        if self.advantage == "grpo" and self.token_reward_coef:
            e.append(
                "advantage='grpo' normalises outcome rewards only: put the KL in the loss "
                "(kl_loss_coef) and set token_reward_coef=0"
            )
        if self.advantage == "grpo" and self.outcome_reward_coef <= 0:
            e.append("advantage='grpo' needs outcome_reward_coef > 0")
        if (
            self.token_reward_coef
            and self.reward_kl_estimator != "k1"
            and self.teacher_lambda not in (0.0, 1.0)
        ):
            e.append(
                "reward_kl_estimator k2/k3 needs teacher_lambda 0 (KL to ref) or 1 "
                "(KL to teacher); the G-OPD form with other lambda is k1 only"
            )
        if (
            self.token_reward_coef
            and self.reward_kl_direction == "forward"
            and self.reward_kl_estimator == "k1"
            and self.teacher_lambda not in (0.0, 1.0)
        ):
            e.append("reward_kl_direction='forward' needs teacher_lambda 0 or 1")
        if self.reward_logprob_source == "current" and (
            self.advantage != "immediate" or self.whiten_advantages
        ):
            e.append(
                "reward_logprob_source='current' needs advantage='immediate' without whitening "
                "(other estimators use the whole batch before the update)"
            )
        if self.gamma < 0 or self.gamma > 1 or self.gae_lambda < 0 or self.gae_lambda > 1:
            e.append("gamma and gae_lambda must be in [0, 1]")
        if self.clip_low < 0 or self.clip_high < 0:
            e.append("clip_low/clip_high must be >= 0")
        if self.dual_clip is not None and (self.dual_clip <= 1 or self.policy_loss != "ppo_clip"):
            e.append("dual_clip must be > 1 and needs policy_loss='ppo_clip'")
        if self.tis_threshold is not None and self.tis_threshold <= 0:
            e.append("tis_threshold must be > 0")
        if self.trust_threshold is not None:
            if not 0 < self.trust_threshold <= 1:
                e.append("trust_threshold must be in (0, 1]")
            if not self.token_reward_coef:
                e.append(
                    "trust_threshold gates the teacher token term: needs token_reward_coef != 0"
                )
            if self.outlier_handling == "divergence" and self.divergence in ("none", "nll"):
                e.append("outlier_handling='divergence' needs a teacher divergence (e.g. topk_fkl)")
        elif self.outlier_handling == "divergence":
            e.append("outlier_handling='divergence' needs trust_threshold")
        if self.divergence_gate == "trajectory" and (
            self.trajectory_gate == "none" or self.divergence == "none"
        ):
            e.append("divergence_gate='trajectory' needs a trajectory_gate and a divergence")
        if "topk_fkl" in (self.divergence, self.teacher_token_loss) and self.divergence_top_k < 1:
            e.append("topk_fkl needs divergence_top_k >= 1")
        if not 0 < self.jsd_beta < 1:
            e.append("jsd_beta must be in (0, 1) (use fkl / rkl for the end points)")
        if not 0 < self.skew_alpha < 1:
            e.append("skew_alpha must be in (0, 1)")
        if self.critic == "none" and self.reference_quirk:
            e.append("reference_quirk only changes GAE/whitening/critic: it needs a critic")
        if self.value_clip is not None and self.value_clip <= 0:
            e.append("value_clip must be > 0 or None")
        if self.seq_chunk < 1:
            e.append("seq_chunk must be >= 1")
        if (
            not uses_policy
            and self.divergence == "none"
            and self.teacher_token_loss == "none"
            and not self.kl_loss_coef
        ):
            e.append("the objective has no term: set a policy loss, a divergence or a KL loss")
        if e:
            raise ValueError(f"ObjectiveConfig {self.name!r}: inconsistent knobs: " + "; ".join(e))

    # --- what the objective needs ---------------------------------------------------------------
    @property
    def uses_policy(self) -> bool:
        return self.policy_loss != "none"

    @property
    def uses_token_reward(self) -> bool:
        return self.uses_policy and self.token_reward_coef != 0

    @property
    def token_reward_needs_teacher(self) -> bool:
        return self.uses_token_reward and self.teacher_lambda != 0.0

    @property
    def token_reward_needs_ref(self) -> bool:
        return self.uses_token_reward and self.teacher_lambda != 1.0

    @property
    def needs_teacher_logp(self) -> bool:
        """Teacher log-probs of the sampled tokens (array or in-program teacher forward)."""
        return self.token_reward_needs_teacher or (
            self.kl_loss_coef != 0 and self.kl_loss_target == "teacher"
        )

    @property
    def teacher_in_update(self) -> bool:
        """The update step runs the teacher forward (its log-probs or full logits)."""
        return self.needs_teacher_logp or self.needs_teacher_logits

    @property
    def needs_ref_logp(self) -> bool:
        return self.token_reward_needs_ref or (
            self.kl_loss_coef != 0 and self.kl_loss_target == "ref"
        )

    @property
    def needs_rewards(self) -> bool:
        return (
            (self.uses_policy and self.outcome_reward_coef != 0)
            or self.trajectory_gate != "none"
            or self.advantage == "grpo"
        )

    @property
    def global_advantage(self) -> bool:
        """Advantages need the whole batch (computed once, before the micro-batch loop)."""
        return self.advantage in ("gae", "grpo", "rtg") or self.whiten_advantages

    def student_divergence_spec(self) -> DivergenceSpec | None:
        if self.divergence in ("none", "nll"):
            return None
        return DivergenceSpec(
            self.divergence,
            self.divergence_top_k,
            self.topk_renormalize,
            self.jsd_beta,
            self.skew_alpha,
        )

    def teacher_token_divergence_spec(self) -> DivergenceSpec | None:
        if self.teacher_token_loss in ("none", "sft"):
            return None
        return DivergenceSpec(self.teacher_token_loss, self.divergence_top_k, self.topk_renormalize)

    @property
    def needs_teacher_logits(self) -> bool:
        """Full-vocabulary teacher logits: only an in-program teacher forward can give them."""
        return (
            self.student_divergence_spec() is not None
            or self.teacher_token_divergence_spec() is not None
        )

    def replace(self, **overrides) -> ObjectiveConfig:
        return replace_checked(self, overrides)


def knob_names() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(ObjectiveConfig))


def replace_checked(cfg: ObjectiveConfig, overrides: dict[str, Any]) -> ObjectiveConfig:
    """``dataclasses.replace`` with a clear error for unknown knobs."""
    unknown = sorted(set(overrides) - set(knob_names()))
    if unknown:
        raise ValueError(f"unknown objective knob(s) {unknown}; known knobs: {list(knob_names())}")
    return dataclasses.replace(cfg, **overrides)
