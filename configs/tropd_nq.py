"""TrOPD: trust-region OPD (threshold, outlier handling and top-k are objective overrides).
Locations come from the environment (see dgpo_jax.run_config.nq_config)."""

from dgpo_jax.run_config import nq_config


def get_config():
    return nq_config("tropd_nq", "tropd")
