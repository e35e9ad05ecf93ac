"""DGPO on NQ + HotpotQA with the paper's reference hyperparameters (algorithms.md): beta 0.001
on wrong trajectories only (k1 in the reward, reverse KL to the teacher), clip 0.2, entropy
0.001, actor lr 1e-6 (warmup 0.285 then constant), critic lr 1e-5 (warmup 0.015), value clip 0.5,
grad clip 1.0, AdamW wd 0.01, 512 prompts per step, PPO mini-batch 256, 1 epoch, 1 rollout per
prompt, temperature 1.0, ~1000 steps, 4 search turns, top-3 documents, 500 tokens per turn and
per observation. Locations come from the environment (see dgpo_jax.run_config.nq_config)."""

from dgpo_jax.run_config import nq_config


def get_config():
    return nq_config("dgpo_nq", "dgpo")
