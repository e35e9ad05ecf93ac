"""TAID baseline: KL to an interpolated teacher, t from 0.4 to 1.0.
Locations come from the environment (see dgpo_jax.run_config.nq_config)."""

from dgpo_jax.run_config import nq_config


def get_config():
    return nq_config("taid_nq", "taid")
