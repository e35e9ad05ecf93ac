"""GKD baseline: generalized JSD (beta 0.1), student data with prob 0.5.
Locations come from the environment (see dgpo_jax.run_config.nq_config)."""

from dgpo_jax.run_config import nq_config


def get_config():
    return nq_config("gkd_nq", "gkd")
