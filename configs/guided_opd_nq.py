"""Guided-OPD: teacher turns mixed into student rollouts with probability p(k) decaying from
p0 = 0.5 to 0 (linear; cosine and exponential available), student turns get the OPD term.
Locations from the environment (see dgpo_jax.run_config.nq_config)."""

from dgpo_jax.run_config import nq_config


def get_config():
    cfg = nq_config("guided_opd_nq", "guided_opd")
    cfg.objective.overrides.guided_p0 = 0.5
    cfg.objective.overrides.guided_schedule = "linear"
    return cfg
