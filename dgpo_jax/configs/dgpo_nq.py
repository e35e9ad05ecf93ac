"""DGPO stage 2 on NQ + HotpotQA (Qwen2.5-0.5B student after the KD cold start, Qwen2.5-3B
teacher trained with Search-R1 PPO): PPO where correct answers earn the reward and wrong ones are
pulled toward the teacher by a k1 KL in the reward. Each value below is the reference run's,
with its source: omron-sinicx/dgpo ``scripts/train_dgpo.sh`` (TD) and the veRL config it
overrides, ``verl/trainer/config/ppo_trainer.yaml`` (Y). Locations come from the environment
(``dgpo_jax.config.nq_config``); docs/algorithms.md has the whole table.
"""

from dgpo_jax.config import nq_config


def get_config():
    cfg = nq_config("dgpo_nq", "dgpo")
    o = cfg.objective
    o.token_reward_coef = 0.001  # beta: TD algorithm.kl_ctrl.kl_coef, fixed controller (Y)
    o.trajectory_gate = "incorrect"  # KL on wrong answers only: ray_trainer.py
    o.gate_threshold = 0.1  # "wrong" = score < 0.1: create_reward_based_mask (ray_trainer.py)
    o.clip_low = o.clip_high = 0.2  # Y actor.clip_ratio
    o.entropy_coef = 0.001  # Y actor.entropy_coeff (TD does not override it)
    o.value_clip = 0.5  # Y critic.cliprange_value
    o.gamma = o.gae_lambda = 1.0  # Y algorithm.gamma / lam
    cfg.optim.actor_lr = 1e-6  # TD
    cfg.optim.critic_lr = 1e-5  # TD
    cfg.optim.schedule = "constant"  # Y warmup_style: constant (after the warmup)
    cfg.optim.actor_warmup_ratio = 0.285  # TD
    cfg.optim.critic_warmup_ratio = 0.015  # TD
    cfg.optim.weight_decay = 0.01  # veRL's AdamW default (fsdp_workers.py; TD sets none)
    cfg.optim.grad_clip = 1.0  # Y
    cfg.data.batch_size = 512  # TD data.train_batch_size
    cfg.data.rollouts_per_prompt = 1  # TD n_agent
    cfg.train.mini_batch_size = 256  # TD ppo_mini_batch_size
    cfg.train.ppo_epochs = 1  # Y
    cfg.train.steps = 1000  # TD trainer.total_training_steps
    cfg.sampler.temperature, cfg.sampler.top_p = 1.0, 1.0  # TD
    memory_defaults(cfg)
    return cfg


def memory_defaults(cfg):
    """How the run fits an 8 x 80 GB node at the 0.5B/3B shapes (the memory plan:
    ``--config.mode=plan``, figures in docs/scaleout.md). None of these change the algorithm."""
    cfg.model.param_dtype, cfg.model.dtype = "float32", "bfloat16"  # float32 masters
    cfg.model.attention = "auto"  # cudnn on GPU, splash on TPU: O(T x block), not O(T^2)
    cfg.model.remat = "dots"  # keep matmul outputs, recompute the rest in the backward
    cfg.train.pack = True  # trajectories packed into rows of the longest one (segment ids)
    cfg.train.micro_batch_size = 8  # packed rows per micro-batch: one 8704-position row/GPU
    # What the plan assumes (the run measures padded_positions_per_real_token itself): real
    # tokens per trajectory (prompt ~200 + turns + observations; the context allows 8704) and
    # the longest prompt (the Search-R1 template + an NQ/HotpotQA question is ~200 tokens).
    cfg.plan.tokens_per_trajectory = 2048
    cfg.plan.prompt_width = 256
    return cfg
