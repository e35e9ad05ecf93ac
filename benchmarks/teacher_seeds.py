"""The quickstart's teacher over seeds: its EM on training and on held-out questions after each
cosine cycle of ``quickstart.teacher_steps`` steps.

    python benchmarks/teacher_seeds.py --quick            # 2 seeds, tiny world, 1-2 minutes
    python benchmarks/teacher_seeds.py                    # seeds 0-4, 3 cycles, the quickstart's sizes
    python benchmarks/teacher_seeds.py --seeds 0,7 --rounds 2

What the teacher stage's settings (``quickstart.teacher_min_train_em``, ``teacher_max_rounds``)
are chosen from. Per seed, as a new user would vary it (``--config.seed``: the world *and* the
teacher's initialisation and data order): the synthetic world, then ``--rounds`` cosine cycles
(the teacher stage's cycles: cycle r > 0 restarts the schedule from the previous parameters with
another data order), and after each cycle the greedy EM on the first
``quickstart.teacher_check_questions`` training questions per data source (the stage's stopping
signal) and on the held-out questions (reported, never used to choose a setting).

The last stdout line is one JSON object: per seed and cycle ``steps``, ``train_em``,
``heldout_em`` and the seconds of the cycle, and the machine.
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

from dgpo_jax.checkpoint.params import save_params_checkpoint  # noqa: E402
from dgpo_jax.config import load_config  # noqa: E402
from dgpo_jax.launch.evaluate import run_eval  # noqa: E402
from dgpo_jax.launch.quickstart import (  # noqa: E402
    expert_sequences,
    prepare_world,
    stage_config,
    train_em,
    train_teacher,
)

QUICK = [
    "--config.quickstart.num_entities=100",
    "--config.quickstart.teacher_questions=8",
    "--config.quickstart.teacher_steps=30",
    "--config.quickstart.teacher_lr=3e-3",
    "--config.quickstart.teacher_check_questions=4",
    "--config.eval.max_examples=4",
    "--config.eval.batch_size=16",
    "--config.sampler.decode_path=accelerator",
]


def heldout_em(base, teacher_dir: str, name: str, seed: int) -> float:
    c = stage_config(base, name, **{"model.student": teacher_dir, "seed": seed})
    return float(run_eval(c)["final_eval"]["greedy"]["all"]["em"])


def one_seed(seed: int, rounds: int, workdir: str, overrides: list[str]) -> list[dict]:
    cfg, _ = load_config(
        [
            "prog",
            "--config=quickstart",
            f"--config.workdir={workdir}",
            f"--config.seed={seed}",
            "--config.logging.progress=False",
            "--config.logging.tensorboard=False",
            *overrides,
        ]
    )
    prep = prepare_world(cfg)
    base, q = prep.base, prep.base.quickstart
    rows = prep.world.train[: q.teacher_questions] if q.teacher_questions else prep.world.train
    expert = expert_sequences(
        prep.world,
        rows,
        prep.tokenizer,
        prep.retriever,
        base.sampler.max_obs_length,
        base.data.use_chat_template,
    )
    teacher_dir = os.path.join(workdir, "teacher")
    params, out = None, []
    for r in range(rounds):
        t = time.time()
        # the teacher stage's cycles (dgpo_jax.launch.quickstart.teacher_stage)
        params = train_teacher(
            q,
            prep.teacher_config,
            expert,
            seed + 1000 * r,
            os.path.join(workdir, f"sft{r}"),
            params,
        )
        train_seconds = time.time() - t
        shutil.rmtree(teacher_dir, ignore_errors=True)
        save_params_checkpoint(prep.teacher_config, params, teacher_dir)
        train = train_em(base, teacher_dir, f"check{r}", seed)
        held = heldout_em(base, teacher_dir, f"heldout{r}", seed)
        out.append(
            {
                "steps": q.teacher_steps * (r + 1),
                "train_em": round(train, 4),
                "heldout_em": round(held, 4),
                "train_seconds": round(train_seconds, 1),
            }
        )
        print(f"seed {seed} cycle {r + 1}: {out[-1]}", flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 seeds, tiny world, 1-2 minutes on CPU")
    p.add_argument("--seeds", default=None, help="comma-separated (default 0,1,2,3,4)")
    p.add_argument("--rounds", type=int, default=None, help="cosine cycles (default 3)")
    p.add_argument("--workdir", default=None, help="default: a temporary directory")
    p.add_argument("--answers", default="closed", help="the world's answers: closed or open")
    args = p.parse_args(argv)
    seeds = [int(s) for s in (args.seeds or ("0,1" if args.quick else "0,1,2,3,4")).split(",")]
    rounds = args.rounds or (2 if args.quick else 3)
    overrides = (QUICK if args.quick else []) + [f"--config.quickstart.answers={args.answers}"]
    root = args.workdir or tempfile.mkdtemp(prefix="teacher-seeds-")
    start = time.time()
    results = {}
    try:
        for s in seeds:
            results[str(s)] = one_seed(s, rounds, os.path.join(root, f"seed{s}"), overrides)
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    summary = {
        "benchmark": "teacher_seeds",
        "machine": machine(),
        "quick": args.quick,
        "answers": args.answers,
        "seeds": results,
        "seconds": round(time.time() - start, 1),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
