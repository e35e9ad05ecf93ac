"""DistiLLM baseline: skew KL (alpha 0.1) with an adaptive student-data share.
Locations come from the environment (see dgpo_jax.run_config.nq_config)."""

from dgpo_jax.run_config import nq_config


def get_config():
    return nq_config("distillm_nq", "distillm")
