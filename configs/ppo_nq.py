"""Search-R1 PPO baseline: KL to the initial student on every trajectory.
Locations come from the environment (see dgpo_jax.run_config.nq_config)."""

from dgpo_jax.run_config import nq_config


def get_config():
    return nq_config("ppo_nq", "ppo")
