"""KD baseline: full-vocabulary forward KL on the teacher's correct trajectories. Which code the
DGPO paper's KD baselines ran is not stated; the values are SakanaAI/TAID's ``fkl`` run
(``src/arguments.py``, ``src/model.py``, ``train.py``), the code DGPO's cold start used."""

from dgpo_jax.config import nq_config
from dgpo_jax.configs.dgpo_nq import memory_defaults


def get_config():
    cfg = nq_config("kd_nq", "kd")
    cfg.objective.divergence = "fkl"  # TAID --loss_type fkl
    cfg.optim.actor_lr = 1e-4  # TAID src/arguments.py
    cfg.optim.schedule = "cosine"  # TAID src/model.py
    cfg.optim.actor_warmup_ratio = 0.0  # TAID src/model.py
    cfg.optim.grad_clip = 1.0  # TAID train.py
    return memory_defaults(cfg)  # remat, micro-batches, packing: docs/scaleout.md
