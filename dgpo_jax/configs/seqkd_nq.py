"""SeqKD baseline: SFT (-l^S) on the teacher's correct trajectories. Values as for KD:
SakanaAI/TAID (``--loss_type sft``; ``src/arguments.py``, ``src/model.py``, ``train.py``)."""

from dgpo_jax.config import nq_config
from dgpo_jax.configs.dgpo_nq import memory_defaults


def get_config():
    cfg = nq_config("seqkd_nq", "seqkd")
    cfg.objective.divergence = "nll"  # TAID --loss_type sft
    cfg.optim.actor_lr = 1e-4  # TAID src/arguments.py
    cfg.optim.schedule = "cosine"  # TAID src/model.py
    cfg.optim.actor_warmup_ratio = 0.0
    cfg.optim.grad_clip = 1.0  # TAID train.py
    return memory_defaults(cfg)  # remat, micro-batches, packing: docs/scaleout.md
