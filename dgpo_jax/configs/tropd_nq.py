"""TrOPD: the OPD term on trusted tokens (P_trust = min(p_T / p_S, 1) >= threshold), a top-k
forward KL on the outliers, forward KL on teacher-prefix tokens. TrOPD's code is not public
(arXiv 2606.01249): the threshold, top-k, prefix share and length are UNVERIFIED choices, and
the optimizer is the OPD family's (RUCBM/G-OPD ``run_qwen3-4b-g-opd.sh``)."""

from dgpo_jax.config import nq_config
from dgpo_jax.configs.dgpo_nq import memory_defaults


def get_config():
    cfg = nq_config("tropd_nq", "tropd")
    o = cfg.objective
    o.trust_threshold = 1.0  # UNVERIFIED: trusted = teacher prob >= student prob
    o.outlier_handling = "divergence"  # the paper's reported choice: top-k FKL on outliers
    o.divergence_top_k = 16  # UNVERIFIED
    cfg.curriculum.teacher_prefix_share = 0.0  # UNVERIFIED; > 0 turns teacher prefixes on
    cfg.optim.actor_lr = 1e-5  # OPD family (G-OPD GS); TrOPD's own: not public
    cfg.optim.schedule = "constant"
    cfg.optim.actor_warmup_ratio = 0.0
    cfg.train.mini_batch_size = cfg.data.batch_size
    return memory_defaults(cfg)  # remat, micro-batches, packing: docs/scaleout.md
