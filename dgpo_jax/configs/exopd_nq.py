"""G-OPD / ExOPD: A_t = lambda (l^T - l^ref) - (l^S - l^ref) with reward extrapolation
lambda 1.25, PPO-clip with dual clip 3 and truncated IS weights (threshold 5). Values from
RUCBM/G-OPD ``verl/examples/g_opd/run_qwen3-4b-g-opd.sh`` (GS) and
``verl/verl/trainer/config/actor/actor.yaml`` (AY); the search setting is DGPO's.

pi_ref is the initial student; with ``DGPO_REFERENCE`` set (the teacher's pre-RL base model) it
is that model instead: G-OPD's reward correction (``model.ref_model="teacher_base"``). The run
logs which one it uses."""

from dgpo_jax.config import env, nq_config
from dgpo_jax.configs.dgpo_nq import memory_defaults


def get_config():
    cfg = nq_config("exopd_nq", "exopd")
    o = cfg.objective
    o.teacher_lambda = 1.25  # GS (ExOPD run)
    o.dual_clip = 3.0  # AY clip_ratio_c
    o.tis_threshold = 5.0  # GS rollout_correction, token-level, threshold 5
    o.clip_low = o.clip_high = 0.2  # AY
    o.entropy_coef = 0.0  # GS
    cfg.model.ref_model = "teacher_base" if env("DGPO_REFERENCE") else "initial_student"
    cfg.optim.actor_lr = 1e-5  # GS
    cfg.optim.schedule = "constant"  # G-OPD optim/fsdp.yaml
    cfg.optim.actor_warmup_ratio = 0.0  # GS
    cfg.train.mini_batch_size = cfg.data.batch_size  # GS: mini-batch = batch (on-policy)
    return memory_defaults(cfg)  # remat, micro-batches, packing: docs/scaleout.md
