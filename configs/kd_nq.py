"""KD baseline: full-vocabulary forward KL on teacher-generated trajectories.
Locations come from the environment (see dgpo_jax.run_config.nq_config)."""

from dgpo_jax.run_config import nq_config


def get_config():
    return nq_config("kd_nq", "kd")
