"""``mode=eval``: EM per data source (greedy and sampled) and the ARCap diagnostics of the
student, or of a run's checkpoint (``eval.checkpoint_step``; the latest by default)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from etils import epath

from dgpo_jax.checkpoint.checkpointer import Checkpointer
from dgpo_jax.checkpoint.params import policy_params
from dgpo_jax.launch.context import RunContext


def run_eval(cfg) -> dict:
    # Nothing is trained: the student is loaded in the compute dtype, and a checkpoint's
    # master weights are cast to it by the evaluation.
    run = RunContext(cfg, need_teacher=False, train_student=False)
    params = run.student_params
    ckpt_dir = os.path.join(cfg.workdir, "checkpoints")
    step = None
    if epath.Path(ckpt_dir).is_dir():  # local or gs://
        ck = Checkpointer(ckpt_dir)
        if ck.latest_step() is not None:
            step = ck.latest_step() if cfg.eval.checkpoint_step < 0 else cfg.eval.checkpoint_step
            state, _ = ck.restore(step)
            params = jax.tree.map(jnp.asarray, policy_params(state, ck.directory))
        ck.close()
    results = run.evaluate(params, f"eval_step_{step}" if step is not None else "eval")
    return {"final_eval": results, "step": step}
