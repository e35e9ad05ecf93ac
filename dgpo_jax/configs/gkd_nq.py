"""GKD baseline: generalized JSD_beta with student-generated data with probability lambda.
Values from SakanaAI/TAID ``scripts/phi-3/gkd.sh`` (js_beta 0.1, mixed sampling 0.5) and its
optimizer defaults (``src/arguments.py``, ``src/model.py``); TRL's GKDConfig defaults differ
(beta 0.5)."""

from dgpo_jax.config import nq_config
from dgpo_jax.configs.dgpo_nq import memory_defaults


def get_config():
    cfg = nq_config("gkd_nq", "gkd")
    cfg.objective.jsd_beta = 0.1  # TAID gkd.sh js_beta
    cfg.curriculum.student_data_fraction = 0.5  # TAID gkd.sh mixed_alpha (lambda)
    cfg.optim.actor_lr = 1e-4  # TAID src/arguments.py
    cfg.optim.schedule = "cosine"  # TAID src/model.py
    cfg.optim.actor_warmup_ratio = 0.0
    cfg.optim.grad_clip = 1.0
    return memory_defaults(cfg)  # remat, micro-batches, packing: docs/scaleout.md
