"""DGPO stage 1, the cold start: roll out the teacher on the training questions, keep its
correct trajectories, and train the student on them with full-vocabulary forward KL (AdamW lr
1e-4, cosine decay, no warmup, grad clip 1.0, 5 epochs). Locations from the environment (see dgpo_jax.run_config.nq_config)."""

from dgpo_jax.run_config import nq_config


def get_config():
    cfg = nq_config("coldstart_nq", "dgpo_coldstart")
    cfg.mode = "coldstart"
    cfg.optim.schedule = "cosine"
    cfg.optim.actor_warmup_ratio = 0.0
    return cfg
