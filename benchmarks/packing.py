"""Packed update batches: padded positions per real token, and what a skipped micro-batch costs.

    python benchmarks/packing.py --quick     # < 1 minute on CPU
    python benchmarks/packing.py             # more draws, the 0.5B shapes' batch sizes

Part 1 (host only): trajectories with Search-R1-like lengths (lognormal around 700 tokens,
200..8704) packed as the launcher packs them (``pack_for_update``: N trajectories into N rows
of the 8704-position context, filled micro-batch by micro-batch), against one trajectory per
row padded to the batch's longest (``train.pack=False``): ``padded_positions_per_real_token``
for both, over the positions the programs run the model on.

Part 2 (the compiled update step, a tiny GRPO model): one step on a batch whose real tokens fill
1 of 4 micro-batches against the same step with all 4 filled, same shapes and program. With the
empty micro-batches skipped (``lax.cond``), the first costs about a quarter of the second.

The last stdout line is one JSON object naming the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from attention import machine  # noqa: E402 (benchmarks/attention.py, beside this file)

from dgpo_jax.learner.optim import OptimConfig  # noqa: E402
from dgpo_jax.learner.packing import pack_for_update  # noqa: E402
from dgpo_jax.learner.update_step import create_update_state, make_update_step  # noqa: E402
from dgpo_jax.models import get_preset, init_params  # noqa: E402
from dgpo_jax.objectives import get_objective  # noqa: E402

CONTEXT = 8704


def padding(n: int, per_micro: int, draws: int) -> dict:
    """Packed vs padded-to-the-longest positions per real token over ``draws`` length draws."""
    packed, longest = [], []
    for d in range(draws):
        rng = np.random.default_rng([n, d])
        lengths = np.clip(rng.lognormal(np.log(700), 0.55, n), 200, CONTEXT).astype(np.int64)
        mask = (np.arange(CONTEXT)[None] < lengths[:, None]).astype(np.int32)
        _, layout = pack_for_update({"attention_mask": mask}, CONTEXT, n, n // per_micro)
        packed.append(layout.stats["padded_positions_per_real_token"])
        longest.append(layout.stats["padded_to_longest_per_real_token"])
    return {
        "trajectories": n,
        "rows_per_micro_batch": per_micro,
        "padded_positions_per_real_token": round(float(np.mean(packed)), 4),
        "padded_positions_per_real_token_max": round(float(np.max(packed)), 4),
        "padded_to_longest_per_real_token": round(float(np.mean(longest)), 4),
    }


def skipped_micro_batches(repeats: int) -> dict:
    """ms per update step with 1 of 4 micro-batches holding real tokens vs all 4."""
    config = get_preset("tiny").replace(vocab_size=512)
    objective = get_objective("grpo")
    rows, width, micro = 16, 512, 4
    step = make_update_step(
        objective,
        config,
        optimizer=OptimConfig(lr=1e-5, schedule="constant"),
        micro_batches=micro,
    )
    state = create_update_state(objective, init_params(config, jax.random.key(0)), step.tx, 0)

    def batch(busy: int) -> dict:
        rng = np.random.default_rng(0)
        mask = np.zeros((rows, width), np.int32)
        mask[[i for i in range(rows) if i % micro < busy]] = 1  # micro-batch i: rows i, i + 4..
        zeros = np.zeros((rows, width), np.float32)
        return {
            "input_ids": (rng.integers(0, 512, (rows, width)) * mask).astype(np.int32),
            "attention_mask": mask,
            "loss_mask": mask.astype(np.float32),
            "old_logprobs": zeros,
            "ref_logprobs": zeros,
            "rewards": (np.arange(rows) % 2).astype(np.float32),
            "group_ids": (np.arange(rows) // 2).astype(np.int32),
        }

    ms = {}
    for busy in (1, micro):
        b = batch(busy)
        state, metrics = step(state, b)  # compile (the same program for both)
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        for _ in range(repeats):
            state, metrics = step(state, b)
        jax.block_until_ready(metrics)
        ms[busy] = 1000 * (time.perf_counter() - start) / repeats
    return {
        "ms_1_of_4_busy": round(ms[1], 1),
        "ms_4_of_4_busy": round(ms[micro], 1),
        "ratio_1_vs_4": round(ms[1] / ms[micro], 3),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer draws and repeats (< 1 min CPU)")
    args = p.parse_args(argv)
    draws, repeats = (3, 2) if args.quick else (20, 5)
    rows = [padding(n, per_micro, draws) for n, per_micro in ((512, 8), (256, 8), (256, 2))]
    for r in rows:
        print(
            f"{r['trajectories']} trajectories, {r['rows_per_micro_batch']} rows per micro-batch:"
            f" packed {r['padded_positions_per_real_token']:.3f} padded positions per real token"
            f" (max {r['padded_positions_per_real_token_max']:.3f}), padded to the longest "
            f"{r['padded_to_longest_per_real_token']:.2f}",
            flush=True,
        )
    skip = skipped_micro_batches(repeats)
    print(
        f"update step, 1 of 4 micro-batches busy: {skip['ms_1_of_4_busy']} ms, 4 of 4: "
        f"{skip['ms_4_of_4_busy']} ms (ratio {skip['ratio_1_vs_4']})",
        flush=True,
    )
    mini = next(r for r in rows if r["trajectories"] == 256 and r["rows_per_micro_batch"] == 8)
    print(
        json.dumps(
            {
                "benchmark": "packing",
                "machine": machine(),
                "padded_positions_per_real_token": mini["padded_positions_per_real_token"],
                "padding": rows,
                "skipped_micro_batches": skip,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
