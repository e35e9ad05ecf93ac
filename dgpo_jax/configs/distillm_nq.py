"""DistiLLM baseline: skew KL with an adaptive student-data share and a replay buffer. Values from
jongwooko/distillm (``arguments.py``, ``finetune.py``) and SakanaAI/TAID
``scripts/phi-3/distillm.sh``. Which skew direction the DGPO paper's baseline ran is not stated:
TAID's DistiLLM script uses the skew forward KL (``sfkl``, kept here), most of DistiLLM's own
scripts the skew reverse KL."""

from dgpo_jax.config import nq_config
from dgpo_jax.configs.dgpo_nq import memory_defaults


def get_config():
    cfg = nq_config("distillm_nq", "distillm")
    cfg.objective.divergence = "skew_fkl"  # TAID distillm.sh sfkl (see above)
    cfg.objective.skew_alpha = 0.1  # distillm arguments.py --skew-alpha
    c = cfg.curriculum
    c.student_data_fraction = 0.0  # distillm scripts --init-threshold 0.0
    c.adaptive_student_share = True  # distillm scripts adaptive-*
    c.distillm_share_step = 0.1  # distillm finetune.py
    c.distillm_loss_rise = 0.1  # distillm scripts --loss-eps
    c.replay_buffer_size = 1000  # distillm arguments.py capacity
    cfg.optim.actor_lr = 1e-4  # TAID src/arguments.py
    cfg.optim.schedule = "cosine"  # TAID src/model.py, distillm scripts
    cfg.optim.actor_warmup_ratio = 0.0
    cfg.optim.grad_clip = 1.0
    return memory_defaults(cfg)  # remat, micro-batches, packing: docs/scaleout.md
