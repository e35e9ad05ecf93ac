"""``mode=coldstart`` (DGPO stage 1): teacher rollouts on the training questions, keep the
correct ones, train the student on them with the configured off-policy objective (the preset
``dgpo_coldstart``: full-vocabulary forward KL), save the student and evaluate it."""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
from etils import epath

from dgpo_jax.checkpoint.params import save_params_checkpoint
from dgpo_jax.config import build_objective, optim_config, split_list
from dgpo_jax.data.search_r1 import read_question_files
from dgpo_jax.errors import NothingToTrainError
from dgpo_jax.evaluation.evaluate import rollout_records
from dgpo_jax.launch.context import RunContext
from dgpo_jax.launch.metrics_log import MetricsLogger
from dgpo_jax.learner.batches import (
    SEQ_MULTIPLE,
    TOP_MULTIPLE,
    resolve_micro_batches,
    trim_to_bucket,
)
from dgpo_jax.learner.packing import pack_for_update, pack_width, trajectory_lengths
from dgpo_jax.learner.update_step import create_update_state, make_update_step
from dgpo_jax.objectives.config import ObjectiveConfig

log = logging.getLogger(__name__)


def run_coldstart(cfg, evaluate: bool = True) -> dict:
    """Teacher rollouts on training questions -> keep the correct ones -> KD the student.

    ``evaluate=False`` skips the held-out evaluation (``final_eval`` is then None): for a cold
    start trained again only to reproduce recorded weights (``mode=compare`` on another
    machine), whose evaluation is already on record."""
    objective = build_objective(cfg)
    records = read_question_files(split_list(cfg.data.train_files))  # bad rows: before the models
    run = RunContext(cfg, need_teacher=True)
    if cfg.coldstart.max_questions:
        records = records[: cfg.coldstart.max_questions]
    records = [r for r in records for _ in range(cfg.coldstart.rollouts_per_question)]
    sampler = run.sampler(run.teacher_config, greedy=cfg.coldstart.greedy)
    seqs = _collect_correct(run, sampler, run.teacher_params, records, cfg.eval.batch_size)
    if not len(seqs["input_ids"]):
        raise NothingToTrainError(
            f"cold start: the teacher ({cfg.model.teacher}) answered none of {len(records)} "
            "training questions correctly: nothing to distill",
            hint="check the teacher, its tokenizer and the retriever (an eval run of the "
            "teacher shows its answers), or raise coldstart.rollouts_per_question",
        )
    log.info(
        "cold start: %d correct teacher trajectories of %d", len(seqs["input_ids"]), len(records)
    )
    state = kd_train(
        cfg,
        run,
        seqs,
        cfg.coldstart.epochs,
        cfg.coldstart.lr,
        cfg.coldstart.batch_size,
        objective=objective,
    )
    out = os.path.join(cfg.workdir, "student_coldstart")
    epath.Path(out).rmtree(missing_ok=True)
    save_params_checkpoint(run.student_config, state.params["policy"], out)
    final = run.evaluate(state.params["policy"], "coldstart") if evaluate else None
    return {"final_eval": final, "checkpoint": out, "num_sequences": len(seqs["input_ids"])}


def _collect_correct(run, sampler, params, records, batch_size) -> dict[str, np.ndarray]:
    parts = []
    for scored, _ in rollout_records(
        sampler,
        params,
        records,
        run.tokenizer,
        batch_size,
        run.cfg.seed,
        run.cfg.data.use_chat_template,
        run.cfg.data.truncation,
    ):
        keep = np.flatnonzero(scored.rewards > 0)
        parts.append(
            {k: scored.batch[k][keep] for k in ("input_ids", "attention_mask", "loss_mask")}
        )
    width = max(p["input_ids"].shape[1] for p in parts)
    width += (-width) % SEQ_MULTIPLE
    return {
        k: np.concatenate([np.pad(p[k], ((0, 0), (0, width - p[k].shape[1]))) for p in parts])
        for k in parts[0]
    }


def kd_train(
    cfg,
    run,
    seqs: dict[str, np.ndarray],
    epochs: int,
    lr: float,
    batch_size: int,
    objective: ObjectiveConfig,
    logger_prefix: str = "coldstart_",
):
    """Epochs of an off-policy KD objective over fixed sequences (teacher forward in-program).

    With ``train.pack`` each step's sequences are packed into ``batch_size`` rows as wide as
    the longest of all the sequences (one shape for the whole run: one compiled program; the
    micro-batches of empty rows are skipped); otherwise each step's rows are trimmed to its
    longest sequence's bucket, counted down from the data's width (`trim_to_bucket`). The
    student's master weights stay in
    ``model.param_dtype``; the step computes in ``model.dtype``."""
    n = len(seqs["input_ids"])
    batch_size = min(batch_size, n)
    steps_per_epoch = n // batch_size
    total = max(1, epochs * steps_per_epoch)

    micro = resolve_micro_batches(batch_size, cfg.train.micro_batch_size, "cold-start batch")
    update = make_update_step(
        objective,
        run.student_config,
        run.teacher_config,
        optimizer=optim_config(
            cfg, total, lr=lr, schedule="cosine", warmup_ratio=cfg.coldstart.warmup_ratio
        ),
        micro_batches=micro,
        plan=run.plan,
        compute_dtype=run.compute_dtype,
    )
    # Packed: every step has the shape [batch_size, the longest sequence]: one program.
    lengths = trajectory_lengths(seqs["attention_mask"])
    width = pack_width(lengths)
    top = pack_width(lengths, TOP_MULTIPLE)  # unpacked: widths counted down from it
    state = create_update_state(objective, run.student_params, update.tx, cfg.seed)
    logger = MetricsLogger(
        cfg.workdir,
        total,
        0,
        cfg.logging.tensorboard,
        None,
        progress=cfg.logging.progress,
        prefix=logger_prefix,
    )
    rng = np.random.default_rng(cfg.seed)
    step = 0
    for _ in range(epochs):
        order = rng.permutation(n)
        for lo in range(0, steps_per_epoch * batch_size, batch_size):
            idx = order[lo : lo + batch_size]
            part = {k: v[idx] for k, v in seqs.items()}
            if cfg.train.pack:
                batch, layout = pack_for_update(part, width, batch_size, micro)
                state, m = update(state, batch, run.teacher_params)
                m = dict(jax.device_get(m))
                m["padded_positions_per_real_token"] = layout.stats[
                    "padded_positions_per_real_token"
                ]
            else:
                batch = trim_to_bucket(part, top=top)
                state, m = update(state, batch, run.teacher_params)
                m = dict(jax.device_get(m))
                real = max(int(batch["attention_mask"].sum()), 1)
                m["padded_positions_per_real_token"] = (batch["input_ids"].size - real) / real
            step += 1
            logger.write(step, m, tokens=int(seqs["attention_mask"][idx].sum()))
    logger.close()
    return state
