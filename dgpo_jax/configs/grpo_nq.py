"""Search-R1 GRPO baseline: 5 rollouts per prompt, group-normalised outcome advantages, a k3 KL
loss (0.001) to the initial policy, no critic. Values from PeterGriffinJin/Search-R1
``scripts/nq_hotpotqa/v0.2/train_grpo.sh`` (G) and ``verl/trainer/config/ppo_trainer.yaml`` (Y);
docs/algorithms.md has the table (and the one known difference: veRL's mini-batch of 256
*sequences* gives 10 updates per step, ours of 256 prompts x 5 rollouts gives 2)."""

from dgpo_jax.config import nq_config
from dgpo_jax.configs.dgpo_nq import memory_defaults


def get_config():
    cfg = nq_config("grpo_nq", "grpo")
    o = cfg.objective
    o.kl_loss_coef = 0.001  # G actor.kl_loss_coef
    o.kl_loss_estimator = "k3"  # G kl_loss_type=low_var_kl
    o.entropy_coef = 0.001  # Y actor.entropy_coeff (G does not override it)
    cfg.model.ref_model = "initial_student"
    cfg.data.rollouts_per_prompt = 5  # G n_agent
    cfg.optim.actor_lr = 1e-6  # G
    cfg.optim.schedule = "constant"  # Y
    cfg.optim.actor_warmup_ratio = 0.285  # G
    cfg.sampler.top_p = 0.95  # Y rollout.top_p (G sets none)
    cfg.train.steps = 1005  # G
    return memory_defaults(cfg)  # remat, micro-batches, packing: docs/scaleout.md
