"""Seconds per RL step of the quickstart's DGPO stage (rollout, scoring, fused update), with the
update-batch settings of this project against the earlier ones, side by side in one run.

    python benchmarks/rl_step.py --workdir runs/quickstart    # after the quickstart: its teacher
                                                              # and KD cold start, 20 steps each
    python benchmarks/rl_step.py --quick                      # random-weight models, two
                                                              # variants, 3 small steps each

Each variant is the launcher's ``mode=train`` (``rl_stage``: the quickstart's RL sizes, 32
rollouts a step, one update a step) from the same student, teacher, world and seed, in its own
directory, on the same questions; the seconds come from its ``metrics.jsonl`` (``step_seconds``:
the whole step; ``update_seconds``: the scoring passes and the update). The first step (the
compiles of the rollout and the first update) is reported apart; ``median_*`` are over the
later steps (a new batch width or grouping compiles the update once more: ``recompiling_steps``
counts the later steps that took over 3x the median).

Variants, each in a fresh process (its own compiles; with ``--quick`` all in one):
  ``before``: the settings before 2026-12-03: the update batch is the rollout buffer as it
      comes (a left-padded prompt block plus the whole response buffer, ``sampler.cache_len``
      columns: ``train.width_buckets=0``), the behaviour log-probs and the critic's old
      values from separate passes (``train.behaviour_from_update=False``), stored activations
      and materialised attention, the cpu decode path.
  ``width_buckets``: each row's prompt padding moved to its end and the batch cut to the
      smallest of ``train.width_buckets`` widths that holds its longest trajectory; separate
      passes still.
  ``on_policy``: width buckets, and the behaviour log-probs and old values from the update's
      own forward (one update per step: ``train.behaviour_from_update``, the default).
  ``remat_chunked``: on-policy, each layer rematerialised in the backward pass and
      blockwise attention in 64-position blocks (``model.remat=full``,
      ``model.attention=chunked``, ``model.attention_block=64``), the scanned decode path
      (``sampler.decode_path=accelerator``); one group of rows (``train.length_groups=1``).
  ``default``: the quickstart's settings: as ``remat_chunked``, and the update's model passes
      over two groups of rows sorted by length, each cut to its own width bucket
      (``train.length_groups=2``).

``--quick`` runs ``before`` and ``default`` only, both on the scanned decode path (it compiles
faster), in one process, and not ``interleaved`` (below).

With random-weight models (``--quick``) the rollouts run to their budgets, so the cut is small:
the figures that matter come from a trained quickstart run. The last stdout line is one JSON
object with the machine, per variant the seconds and padding, and ``speedup`` /
``update_speedup`` = before's median step (update) seconds / the default's.

The variants run one after the other, so a machine whose speed drifts (a shared host: CPU
time stolen by its neighbours) moves their ratio; each variant reports ``cpu_steal_share``, the
share of the machine's CPU time stolen while it ran (``/proc/stat``; ``null`` where there is
none). ``interleaved`` times the DGPO update alone at the quickstart's shape (32 rows x 192
positions, random weights, the step's rows of 45-190 real tokens) with the separate behaviour
pass (scoring program + update with its critic pre-pass), the on-policy update, and the
on-policy update on the rows sorted by length in two groups, the programs called in turn so
that a drift falls on all: ``fused_update_speedup`` and ``grouped_update_speedup`` are the
ratios of the separate passes' and the one-group update's medians to the next one's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from attention import machine  # noqa: E402 (benchmarks/attention.py, beside this file)

from dgpo_jax.config import load_config  # noqa: E402
from dgpo_jax.launch.quickstart import prepare_world, rl_stage, stage_config  # noqa: E402

PLAIN = {"model.remat": "none", "model.attention": "auto", "sampler.decode_path": "cpu"}
VARIANTS = {
    "before": {
        "train.width_buckets": 0,
        "train.behaviour_from_update": False,
        "train.length_groups": 1,
        **PLAIN,
    },
    "width_buckets": {"train.behaviour_from_update": False, "train.length_groups": 1, **PLAIN},
    "on_policy": {"train.length_groups": 1, **PLAIN},
    "remat_chunked": {"train.length_groups": 1},
    "default": {},
}
QUICK = [
    "--config.quickstart.num_entities=100",
    "--config.quickstart.rl_batch_size=8",
    "--config.sampler.decode_path=accelerator",  # compiles faster than the CPU path
]


def cpu_times() -> list[int] | None:
    """The machine's CPU time counters (``/proc/stat``: user ... steal), or None."""
    try:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None


def steal_share(before, after) -> float | None:
    if before is None or after is None:
        return None
    delta = [b - a for a, b in zip(before, after)]
    return round(delta[7] / max(sum(delta), 1), 3)


def interleaved_update(vocab: int, reps: int, rows: int = 32, width: int = 192) -> dict:
    """The quickstart's DGPO update alone (its model settings: remat, blockwise attention):
    separate behaviour pass, on-policy, on-policy in two length groups, in turn."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from dgpo_jax.learner.batches import length_groups, width_buckets  # noqa: PLC0415
    from dgpo_jax.learner.scoring import sequence_logprobs  # noqa: PLC0415
    from dgpo_jax.learner.update_step import create_update_state, make_update_step  # noqa: PLC0415
    from dgpo_jax.models import get_preset, init_params  # noqa: PLC0415
    from dgpo_jax.objectives import get_objective  # noqa: PLC0415

    kw = dict(vocab_size=vocab, remat="full", attention="chunked", attention_block=64)
    sc = get_preset("quickstart-student", **kw)
    tc = get_preset("quickstart-teacher", **kw)
    sp, tp = init_params(sc, jax.random.key(0)), init_params(tc, jax.random.key(1))
    cfg = get_objective("dgpo")
    r = np.random.default_rng(0)
    lengths = r.integers(45, min(190, width), rows)
    mask = (np.arange(width)[None] < lengths[:, None]).astype(np.int32)
    loss_mask = mask.astype(np.float32)
    loss_mask[:, :35] = 0  # the prompt
    batch = dict(
        input_ids=r.integers(0, vocab, (rows, width)).astype(np.int32),
        attention_mask=mask,
        loss_mask=loss_mask,
        rewards=(r.random(rows) < 0.5).astype(np.float32),
    )
    grouped, groups = length_groups(batch, 2, width_buckets(320, 4))
    calls = {}
    variants = (("separate_passes", False, 1), ("on_policy", True, 1), ("grouped", True, 2))
    for name, on_policy, n_groups in variants:
        step = make_update_step(cfg, sc, tc, on_policy=on_policy)
        holder = {"state": create_update_state(cfg, jax.tree.map(jnp.copy, sp), step.tx, 0)}

        def call(step=step, holder=holder, on_policy=on_policy, n_groups=n_groups):
            b = dict(grouped if n_groups > 1 else batch)
            if not on_policy:  # the trainer's scoring pass, then the update
                ids, am = jnp.asarray(b["input_ids"]), jnp.asarray(b["attention_mask"])
                b["old_logprobs"] = sequence_logprobs(
                    sc, holder["state"].params["policy"], ids, am, micro_batch=rows
                )
            g = groups if n_groups > 1 else None
            holder["state"], metrics = step(holder["state"], b, tp, row_groups=g)
            jax.block_until_ready(metrics["loss"])

        call()  # compiles
        calls[name] = call
    times = {name: [] for name in calls}
    for _ in range(reps):
        for name, call in calls.items():
            t = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t)
    out = {
        name: {"min_s": round(min(ts), 3), "median_s": round(float(np.median(ts)), 3)}
        for name, ts in times.items()
    }
    out.update(rows=rows, width=width, reps=reps, groups=[list(g) for g in groups])
    ratio = lambda a, b: round(out[a]["median_s"] / out[b]["median_s"], 2)
    out["fused_update_speedup"] = ratio("separate_passes", "on_policy")
    out["grouped_update_speedup"] = ratio("on_policy", "grouped")
    return out


def summarise(workdir: str) -> dict:
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    steps = [r for r in rows if "step_seconds" in r]
    later = steps[1:] or steps
    med = lambda key: round(float(np.median([r[key] for r in later])), 3)
    return {
        "steps": len(steps),
        "first_step_s": round(steps[0]["step_seconds"], 2),
        "median_step_s": med("step_seconds"),
        "median_update_s": med("update_seconds"),
        "median_rollout_s": round(
            float(np.median([r["step_seconds"] - r["update_seconds"] for r in later])), 3
        ),
        "mean_step_s_after_first": round(float(np.mean([r["step_seconds"] for r in later])), 3),
        "padded_positions_per_real_token": round(
            float(np.mean([r["padded_positions_per_real_token"] for r in steps])), 3
        ),
        # the padding the update's model passes ran over (after the length groups)
        "passes_padded_positions_per_real_token": round(
            float(
                np.mean([r.get("passes_padded_positions_per_real_token", np.nan) for r in steps])
            ),
            3,
        ),
        # later steps 3x slower than the median: a new width or grouping compiled
        "recompiling_steps": int(sum(r["step_seconds"] > 3 * med("step_seconds") for r in later)),
        "total_s": round(sum(r["step_seconds"] for r in steps), 1),
    }


def prepare(workdir: str, steps: int, quick: bool):
    """The stages' base config on the run's world, tokenizer and index (``prepare_world``
    reuses an index already there), without a final evaluation; and the tokenizer's size."""
    cfg, _ = load_config(
        [
            "prog",
            "--config=quickstart",
            f"--config.workdir={workdir}",
            "--config.logging.progress=False",
            "--config.logging.tensorboard=False",
            f"--config.quickstart.rl_steps={steps}",
            *(QUICK if quick else []),
        ]
    )
    prep = prepare_world(cfg)
    base = prep.base
    with base.unlocked():
        base.eval.at_end = False
    return base, len(prep.tokenizer)


def run_variant(base, name: str, student: str, teacher: str, quick: bool = False) -> dict:
    """One variant's DGPO stage in ``WORKDIR/bench_rl_NAME``, summarised (``quick``: on the
    base's decode path)."""
    changes = dict(VARIANTS[name])
    if quick:
        changes.pop("sampler.decode_path", None)
    c = stage_config(base, f"bench_rl_{name}", **changes)
    rl_stage(c, ".", "dgpo", student, teacher, base.seed)
    return dict(summarise(c.workdir), settings=changes)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="random-weight models, small world, 3 steps"
    )
    p.add_argument("--workdir", default=None, help="a finished quickstart run (its teacher/, ...)")
    p.add_argument("--steps", type=int, default=None, help="RL steps per variant (default 20)")
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # one variant, this process
    args = p.parse_args()
    steps = args.steps or (3 if args.quick else 20)
    if args.quick:
        workdir = args.workdir or tempfile.mkdtemp(prefix="rl-step-")
        student = teacher = None
    else:
        if not args.workdir:
            p.error("--workdir (a finished quickstart run) or --quick is required")
        workdir = os.path.abspath(args.workdir)
        student = os.path.join(workdir, "coldstart", "student_coldstart")
        teacher = os.path.join(workdir, "teacher")
        for path in (student, teacher):
            if not os.path.isdir(path):
                p.error(f"{path} is missing: run the quickstart into --workdir first")
    if args.variant:  # a child process of the run below: one variant
        base, _ = prepare(workdir, steps, quick=False)
        print(json.dumps(run_variant(base, args.variant, student, teacher)))
        return
    if args.quick:  # random weights; both variants in this process (one rollout compile)
        from dgpo_jax.checkpoint.params import save_params_checkpoint  # noqa: PLC0415
        from dgpo_jax.launch.context import load_model  # noqa: PLC0415

        base, vocab = prepare(workdir, steps, quick=True)
        student = f"preset:{base.quickstart.student_preset}"
        teacher = os.path.join(workdir, "random_teacher")
        preset = f"preset:{base.quickstart.teacher_preset}"
        save_params_checkpoint(*load_model(preset, "float32", vocab, seed=1), teacher)
    out = {"machine": machine(), "steps": steps, "variants": {}}
    for name in ("before", "default") if args.quick else VARIANTS:
        print(f"--- {name}: {steps} DGPO steps", flush=True)
        t0 = cpu_times()
        if args.quick:
            out["variants"][name] = run_variant(base, name, student, teacher, quick=True)
        else:
            cmd = [sys.executable, os.path.abspath(__file__), "--variant", name]
            cmd += ["--steps", str(steps), "--workdir", workdir]
            done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
            out["variants"][name] = json.loads(done.stdout.strip().splitlines()[-1])
        out["variants"][name]["cpu_steal_share"] = steal_share(t0, cpu_times())
        print(json.dumps({name: out["variants"][name]}), flush=True)
    v, last = out["variants"], "default"
    for key, field in (("speedup", "median_step_s"), ("update_speedup", "median_update_s")):
        out[key] = round(v["before"][field] / v[last][field], 2)
    if not args.quick:  # (--quick: the two stage variants only, to stay within a minute)
        print(
            "--- the update alone: separate passes, on-policy, length groups, in turn", flush=True
        )
        out["interleaved"] = interleaved_update(prepare(workdir, steps, quick=False)[1], reps=10)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
