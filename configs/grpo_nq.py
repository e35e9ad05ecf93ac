"""Search-R1 GRPO baseline: 5 rollouts per prompt, group-normalised advantages, k3 KL loss
(0.001) to the initial policy, no critic. Locations from the environment (see dgpo_jax.run_config.nq_config)."""

from dgpo_jax.run_config import nq_config


def get_config():
    cfg = nq_config("grpo_nq", "grpo")
    cfg.data.rollouts_per_prompt = 5
    return cfg
