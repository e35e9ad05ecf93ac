"""DGPO stage 1, the cold start: roll out the teacher on the training questions, keep its
correct trajectories, and train the student on them with full-vocabulary forward KL. The DGPO
README says the cold start used the forward-KL implementation of SakanaAI/TAID; the values are
that repository's ``fkl`` run (``src/arguments.py``, ``src/model.py``, ``scripts/phi-3/fkl.sh``),
inferred to be DGPO's (its own script is not public)."""

from dgpo_jax.config import nq_config


def get_config():
    cfg = nq_config("coldstart_nq", "dgpo_coldstart")
    cfg.mode = "coldstart"
    cfg.coldstart.lr = 1e-4  # TAID src/arguments.py
    cfg.coldstart.warmup_ratio = 0.0  # TAID src/model.py: cosine, 0 warmup steps
    cfg.coldstart.epochs = 5  # TAID scripts/phi-3/fkl.sh
    cfg.coldstart.batch_size = 64  # TAID fkl.sh: 8 per device x 8 devices (inferred)
    cfg.optim.grad_clip = 1.0  # TAID train.py
    return cfg
