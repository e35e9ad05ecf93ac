"""SeqKD baseline: SFT on the teacher's correct trajectories.
Locations come from the environment (see dgpo_jax.run_config.nq_config)."""

from dgpo_jax.run_config import nq_config


def get_config():
    return nq_config("seqkd_nq", "seqkd")
