"""Guided-OPD: the teacher writes each turn of a rollout with probability p(k), decaying from p0
to 0 over training; student turns get the OPD term, teacher turns are masked. No public code
(arXiv 2606.15912): p0 and the schedule shape are UNVERIFIED choices; the optimizer is the OPD
family's (RUCBM/G-OPD ``run_qwen3-4b-g-opd.sh``)."""

from dgpo_jax.config import nq_config
from dgpo_jax.configs.dgpo_nq import memory_defaults


def get_config():
    cfg = nq_config("guided_opd_nq", "guided_opd")
    cfg.objective.teacher_token_loss = "none"  # UNVERIFIED: teacher turns get no loss
    cfg.curriculum.guided_p0 = 0.5  # UNVERIFIED
    cfg.curriculum.guided_schedule = "linear"  # UNVERIFIED (cosine, exponential available)
    cfg.optim.actor_lr = 1e-5  # OPD family (G-OPD); Guided-OPD's own: not public
    cfg.optim.schedule = "constant"
    cfg.optim.actor_warmup_ratio = 0.0
    cfg.train.mini_batch_size = cfg.data.batch_size
    return memory_defaults(cfg)  # remat, micro-batches, packing: docs/scaleout.md
