"""The KD cold start at several batch sizes and epoch counts: the student's greedy EM on training
questions after each round (the cold-start stage's check), from one teacher per seed.

    python benchmarks/coldstart_rounds.py --quick                     # tiny world, < 1 minute
    python benchmarks/coldstart_rounds.py --entities 5000 --settings 64x3,64x10
    python benchmarks/coldstart_rounds.py --settings 64x3 --rounds 3 --dtype bfloat16

What the cold-start settings of ``configs/quickstart_gpu.py`` (``coldstart.batch_size``,
``coldstart.epochs``, ``quickstart.coldstart_min_train_em`` / ``coldstart_max_rounds``) are
chosen from, at the CPU quickstart's model sizes. Per seed: the synthetic world, the teacher
stage (the quickstart's, with its check), then per setting ``BxE`` (batch B, E epochs a round)
the cold-start stage itself (``dgpo_jax.launch.quickstart.coldstart_stage``: each round
collects the teacher's correct greedy trajectories on every training question, KD-trains,
continues from the last round's student) for ``--rounds`` rounds, or fewer if a round's
training EM reaches 1.0. Reported per round: the optimizer steps so far, the first and last
KD loss of the round, the training EM (the stage's stopping signal); and the held-out EM
after the last round (reported, never used to choose a setting).

The last stdout line is one JSON object: the machine, the world, the teacher's rounds and per
setting its rounds, held-out EM and seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from attention import machine  # noqa: E402 (benchmarks/attention.py, beside this file)
from teacher_seeds import heldout_em  # noqa: E402

from dgpo_jax.config import load_config  # noqa: E402
from dgpo_jax.launch.quickstart import (  # noqa: E402
    coldstart_stage,
    prepare_world,
    stage_config,
    teacher_stage,
)

QUICK = [
    "--config.quickstart.num_entities=100",
    "--config.quickstart.teacher_questions=8",  # a teacher that knows these 8 questions
    "--config.coldstart.max_questions=8",
    "--config.quickstart.teacher_steps=60",
    "--config.quickstart.teacher_lr=3e-3",
    "--config.quickstart.teacher_min_train_em=0",
    "--config.quickstart.teacher_check_questions=8",
    "--config.eval.max_examples=8",
    "--config.eval.batch_size=32",
]


def _losses(path: str) -> tuple[float, float]:
    """The first and last KD loss of a round (its ``coldstart_metrics.jsonl``)."""
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    losses = [r["loss"] for r in rows if "loss" in r]
    return round(losses[0], 4), round(losses[-1], 4)


def one_setting(base, teacher_dir: str, seed: int, batch: int, epochs: int, rounds: int) -> dict:
    name = f"coldstart_{batch}x{epochs}"
    c = stage_config(
        base,
        ".",
        **{
            "coldstart.batch_size": batch,
            "coldstart.epochs": epochs,
            # every round checked; stop early only at a perfect training EM
            "quickstart.coldstart_min_train_em": 1.0,
            "quickstart.coldstart_max_rounds": rounds,
        },
    )
    with c.unlocked():
        c.workdir = base.workdir
    t = time.time()
    result = coldstart_stage(c, name, teacher_dir, seed)
    n = result["num_sequences"]
    steps_per_round = epochs * (n // min(batch, n))
    out_rounds = []
    for r, record in enumerate(result["rounds"]):
        first, last = _losses(
            os.path.join(base.workdir, name if r == 0 else f"{name}_{r}", "coldstart_metrics.jsonl")
        )
        out_rounds.append(
            {
                "epochs": record["epochs"],
                "steps": steps_per_round * (r + 1),
                "first_loss": first,
                "last_loss": last,
                "train_em": record["train_em"],
            }
        )
        print(f"{batch}x{epochs} round {r + 1}: {out_rounds[-1]}", flush=True)
    return {
        "batch_size": batch,
        "epochs_per_round": epochs,
        "teacher_trajectories": n,
        "rounds": out_rounds,
        "heldout_em": round(float(result["final_eval"]["greedy"]["all"]["em"]), 4),
        "seconds": round(time.time() - t, 1),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="tiny world and teacher, under a minute on CPU"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--entities", type=int, default=None, help="world size (default 1000)")
    p.add_argument(
        "--settings", default=None, help="BxE,... batch x epochs a round (default 8x6,64x3)"
    )
    p.add_argument("--rounds", type=int, default=None, help="rounds per setting (default 2)")
    p.add_argument(
        "--teacher-rounds",
        type=int,
        default=None,
        help="the teacher stage's most cycles (quickstart.teacher_max_rounds; default 3)",
    )
    p.add_argument("--dtype", default="float32", help="compute dtype (model.dtype)")
    p.add_argument("--workdir", default=None, help="default: a temporary directory")
    args = p.parse_args(argv)
    settings = []
    for s in (args.settings or ("4x1,16x1" if args.quick else "8x6,64x3")).split(","):
        batch, _, epochs = s.partition("x")
        if not (batch.isdigit() and epochs.isdigit() and int(batch) and int(epochs)):
            p.error(f"--settings: {s!r} is not BxE (batch x epochs a round, e.g. 64x10)")
        settings.append((int(batch), int(epochs)))
    rounds = args.rounds or (1 if args.quick else 2)
    overrides = list(QUICK if args.quick else [])
    if args.entities:
        overrides.append(f"--config.quickstart.num_entities={args.entities}")
    if args.teacher_rounds:
        overrides.append(f"--config.quickstart.teacher_max_rounds={args.teacher_rounds}")
    root = args.workdir or tempfile.mkdtemp(prefix="coldstart-rounds-")
    cfg, _ = load_config(
        [
            "prog",
            "--config=quickstart",
            f"--config.workdir={root}",
            f"--config.seed={args.seed}",
            f"--config.model.dtype={args.dtype}",
            "--config.logging.progress=False",
            "--config.logging.tensorboard=False",
            *overrides,
        ]
    )
    start = time.time()
    try:
        prep = prepare_world(cfg)
        teacher_dir = os.path.join(root, "teacher")
        t = time.time()
        teacher = teacher_stage(prep, args.seed, teacher_dir, root)
        teacher["heldout_em"] = round(
            heldout_em(prep.base, teacher_dir, "teacher_heldout", args.seed), 4
        )
        teacher["seconds"] = round(time.time() - t, 1)
        print(f"teacher: {teacher}", flush=True)
        results = [
            one_setting(prep.base, teacher_dir, args.seed, b, e, rounds) for b, e in settings
        ]
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    summary = {
        "benchmark": "coldstart_rounds",
        "machine": machine(),
        "quick": args.quick,
        "seed": args.seed,
        "dtype": args.dtype,
        "world": {
            "entities": cfg.quickstart.num_entities,
            "train_questions": len(prep.world.train),
        },
        "teacher": teacher,
        "settings": results,
        "seconds": round(time.time() - start, 1),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
