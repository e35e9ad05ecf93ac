"""Evaluate a student (DGPO_STUDENT, or the latest checkpoint in the workdir) on the test files:
EM per data source, greedy and sampled (temperature 1.0, as the reference validated), and the
ARCap diagnostics. Locations from the environment (``dgpo_jax.config.nq_config``)."""

from dgpo_jax.config import nq_config


def get_config():
    cfg = nq_config("eval_nq", "dgpo")
    cfg.mode = "eval"
    return cfg
