"""On-policy distillation on the search task: per-token advantage -(l^S - l^T), gamma 0, PPO-clip.
The search setting (batch, lengths, turns) is DGPO's (``dgpo_jax.config.nq_config``); the
optimizer is RUCBM/G-OPD's OPD run (``verl/examples/g_opd/run_qwen3-4b-g-opd.sh`` (GS), lambda 1)
and ``verl/verl/trainer/config/optim/fsdp.yaml``; docs/algorithms.md has the table."""

from dgpo_jax.config import nq_config
from dgpo_jax.configs.dgpo_nq import memory_defaults


def get_config():
    cfg = nq_config("opd_nq", "opd")
    o = cfg.objective
    o.teacher_lambda = 1.0  # GS (OPD run)
    o.clip_low = o.clip_high = 0.2  # G-OPD actor.yaml
    o.entropy_coef = 0.0  # GS
    cfg.optim.actor_lr = 1e-5  # GS
    cfg.optim.schedule = "constant"  # fsdp.yaml lr_scheduler_type
    cfg.optim.actor_warmup_ratio = 0.0  # GS
    cfg.train.mini_batch_size = cfg.data.batch_size  # GS: mini-batch = batch (strictly on-policy)
    return memory_defaults(cfg)  # remat, micro-batches, packing: docs/scaleout.md
