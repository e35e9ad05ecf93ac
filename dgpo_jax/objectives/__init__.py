"""Teacher-guided objectives: one per-token objective with knobs (``ObjectiveConfig``), named
presets (DGPO, PPO, GRPO, OPD, ExOPD, TrOPD, Guided-OPD, KD, SeqKD, GKD, DistiLLM, TAID),
KL estimators, advantage estimators, chunked vocabulary divergences and losses."""

from dgpo_jax.objectives.advantages import (
    gae_advantages,
    grpo_advantages,
    immediate_advantages,
    masked_mean,
    masked_whiten,
    place_outcome_reward,
    reward_to_go_advantages,
)
from dgpo_jax.objectives.batch import BATCH_FIELDS, batch_requirements, validate_batch
from dgpo_jax.objectives.config import ObjectiveConfig, knob_names
from dgpo_jax.objectives.critic import init_critic, init_value_head, value_head_apply
from dgpo_jax.objectives.divergences import DivergenceSpec, chunked_token_stats, divergence
from dgpo_jax.objectives.kl import clamp_log_ratio, kl_estimate
from dgpo_jax.objectives.losses import (
    importance_sampling_loss,
    ppo_clip_loss,
    truncated_is_weight,
    value_loss,
)
from dgpo_jax.objectives.presets import OBJECTIVE_PRESETS, get_objective
from dgpo_jax.objectives.rewards import token_rewards, trajectory_gate, trust_mask
