"""Methods side by side over seeds, with confidence intervals: the quickstart's world and stages.

    python -m dgpo_jax.launch --config=compare [--config.compare.seeds=0,1,2,3,4]
        [--config.compare.methods=dgpo,ppo,opd] [--config.resume=True]

Per seed a teacher, its KD cold start and each method from that cold start, all evaluated on the
same held-out questions (dgpo_jax/launch/compare.py); compare.json, compare.md and compare.png
in the workdir. Every stage has the quickstart's size (a seed with two methods takes about as
long as one quickstart run); a smoke run in about two minutes (one teacher cycle, no check):

    --config.quickstart.num_entities=60 --config.quickstart.teacher_steps=20
    --config.quickstart.teacher_min_train_em=0
    --config.coldstart.epochs=1 --config.quickstart.rl_steps=2 --config.quickstart.rl_batch_size=8
    --config.compare.seeds=0,1 --config.eval.max_examples=20
"""

from dgpo_jax.configs.quickstart import get_config as quickstart_config


def get_config():
    cfg = quickstart_config()
    cfg.mode = "compare"
    cfg.workdir = "runs/compare"
    cfg.compare.seeds = "0,1,2"
    cfg.compare.methods = "dgpo,ppo"
    # The teacher stage's check (train until EM 0.9 on training questions, at most 3 cycles)
    # is the quickstart's (configs/quickstart.py).
    return cfg
