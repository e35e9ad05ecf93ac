"""TAID baseline: KL(p_t || S) with p_t = softmax((1-t) sg(z_S) + t z_T), t rising adaptively
from t_start to t_end. Values from SakanaAI/TAID ``scripts/phi-3/taid.sh``, ``src/arguments.py``,
``src/model.py`` and ``src/distil_losses/taid.py``."""

from dgpo_jax.config import nq_config
from dgpo_jax.configs.dgpo_nq import memory_defaults


def get_config():
    cfg = nq_config("taid_nq", "taid")
    c = cfg.curriculum
    c.taid_t_start, c.taid_t_end = 0.4, 1.0  # taid.sh
    c.taid_alpha = 5e-4  # taid.sh
    c.taid_momentum = 0.99  # taid.sh
    cfg.optim.actor_lr = 1e-4  # src/arguments.py
    cfg.optim.schedule = "cosine"  # src/model.py
    cfg.optim.actor_warmup_ratio = 0.0  # src/model.py
    cfg.optim.grad_clip = 1.0  # train.py
    return memory_defaults(cfg)  # remat, micro-batches, packing: docs/scaleout.md
