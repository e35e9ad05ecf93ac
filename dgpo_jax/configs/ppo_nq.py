"""Search-R1 PPO baseline: k1 KL to the initial student in the reward, on every trajectory.
Values from PeterGriffinJin/Search-R1 ``scripts/nq_hotpotqa/v0.2/train_ppo.sh`` (P) and
``verl/trainer/config/ppo_trainer.yaml`` (Y); docs/algorithms.md has the table."""

from dgpo_jax.config import nq_config
from dgpo_jax.configs.dgpo_nq import memory_defaults


def get_config():
    cfg = nq_config("ppo_nq", "ppo")
    o = cfg.objective
    o.token_reward_coef = 0.001  # P algorithm.kl_ctrl.kl_coef (k1 in the reward)
    o.clip_low = o.clip_high = 0.2  # Y
    o.entropy_coef = 0.001  # Y
    o.value_clip = 0.5  # Y
    cfg.model.ref_model = "initial_student"  # P: the reference policy is the initial actor
    cfg.optim.actor_lr, cfg.optim.critic_lr = 1e-6, 1e-5  # P
    cfg.optim.schedule = "constant"  # Y warmup_style
    cfg.optim.actor_warmup_ratio, cfg.optim.critic_warmup_ratio = 0.285, 0.015  # P
    cfg.data.batch_size, cfg.train.mini_batch_size = 512, 256  # P
    cfg.train.steps = 1005  # P trainer.total_training_steps
    return memory_defaults(cfg)  # remat, micro-batches, packing: docs/scaleout.md
