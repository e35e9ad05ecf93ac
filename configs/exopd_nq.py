"""ExOPD: G-OPD with reward extrapolation lambda 1.25 (set DGPO_REFERENCE for reward correction).
Locations come from the environment (see dgpo_jax.run_config.nq_config)."""

from dgpo_jax.run_config import nq_config


def get_config():
    return nq_config("exopd_nq", "exopd")
