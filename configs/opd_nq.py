"""On-policy distillation: per-token advantage -(l^S - l^T), gamma 0.
Locations come from the environment (see dgpo_jax.run_config.nq_config)."""

from dgpo_jax.run_config import nq_config


def get_config():
    return nq_config("opd_nq", "opd")
