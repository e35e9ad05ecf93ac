"""``mode=train``: RL (ppo, grpo, dgpo, opd, exopd, tropd, guided_opd) and the KD family.

One RL step: a batch of questions -> rollouts (sampler + retriever) -> EM rewards ->
behaviour (and reference) log-probs -> the fused update step (teacher forward, advantages,
PPO + masked KL, optax) on each PPO mini-batch -> metrics; periodically evaluation and an
orbax checkpoint holding the update state, the data-iterator state and the configs, so
``--config.resume=True`` continues with the same data order. The curriculum (teacher turns and
prefixes, student-data share, replay, TAID's t) is applied between steps.

Mixed precision: the update state holds the policy's (and critic's) master weights in
``model.param_dtype``; the sampler and the scoring passes get the policy cast to the compute
dtype ``model.dtype`` once per step, and the update step casts inside its loss. With
``train.pack`` (the default) the scoring passes and the updates run on packed rows
(``dgpo_jax.learner.packing``; docs/training_at_scale.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from dgpo_jax.checkpoint.checkpointer import Checkpointer, abstract_like
from dgpo_jax.config import (
    ConfigError,
    build_curriculum,
    build_objective,
    optim_config,
    split_list,
)
from dgpo_jax.curricula.config import needs_teacher_model
from dgpo_jax.curricula.replay import ReplayBuffer, load_for_checkpoint, save_with_checkpoint
from dgpo_jax.curricula.schedules import (
    distillm_data_source,
    distillm_student_share,
    taid_update,
    teacher_turn_probability,
)
from dgpo_jax.curricula.teacher_data import teacher_prefixes, validation_batch
from dgpo_jax.data.pipeline import PromptBatches
from dgpo_jax.data.prompts import encode_prompt, fit_prompts
from dgpo_jax.data.search_r1 import read_question_files
from dgpo_jax.errors import NothingToTrainError, UserError
from dgpo_jax.launch.context import RunContext, load_model
from dgpo_jax.launch.metrics_log import MetricsLogger
from dgpo_jax.learner.batches import (
    SEQ_MULTIPLE,
    RowGrouper,
    ScoredRollouts,
    fit_width,
    micro_batches,
    on_policy_update,
    pad_batch_to,
    pad_rows_to,
    resolve_micro_batches,
    right_align,
    score_rollout,
    width_buckets,
)
from dgpo_jax.learner.packing import WIDTH_MULTIPLE, pack_for_update, take_trajectories
from dgpo_jax.learner.scoring import sequence_logprobs
from dgpo_jax.learner.update_step import create_update_state, make_update_step
from dgpo_jax.parallel.distributed import to_host

log = logging.getLogger(__name__)


def run_train(cfg) -> dict:
    """RL (ppo, grpo, dgpo, opd, exopd, tropd, guided_opd) or KD-family training."""
    objective, curriculum = build_objective(cfg), build_curriculum(cfg)
    records = read_question_files(split_list(cfg.data.train_files))  # bad rows: before the models
    run = RunContext(cfg, needs_teacher_model(objective, curriculum))
    tok, n = run.tokenizer, cfg.data.rollouts_per_prompt
    rows = cfg.data.batch_size * n
    mini_rows = min(cfg.train.mini_batch_size, cfg.data.batch_size) * n
    updates_per_step = (rows // mini_rows) * cfg.train.ppo_epochs
    total_updates = cfg.train.steps * updates_per_step
    in_program_teacher = run.teacher_config if objective.teacher_in_update else None
    teacher_arg = run.teacher_params if in_program_teacher else None

    micro = resolve_micro_batches(mini_rows, cfg.train.micro_batch_size)
    # One update per rollout batch: the behaviour log-probs come from the update's forward.
    on_policy = on_policy_update(cfg, objective.uses_policy, updates_per_step, micro)
    # The float32 masters are cast to the compute dtype inside the step's loss.
    update = make_update_step(
        objective,
        run.student_config,
        in_program_teacher,
        optimizer=optim_config(cfg, total_updates),
        micro_batches=micro,
        plan=run.plan,
        compute_dtype=run.compute_dtype,
        on_policy=on_policy,
    )
    ref_params = ref_config = None
    if objective.needs_ref_logp:
        if cfg.model.ref_model == "initial_student":
            # A frozen copy in the compute dtype (the masters are donated to the update).
            ref_params = run.compute(run.student_params)
            if run.compute_dtype == run.param_dtype:
                ref_params = jax.tree.map(jnp.copy, ref_params)
            ref_config = run.student_config
        else:  # teacher_base: validate() made sure model.reference is set
            ref_config, ref_params = load_model(
                cfg.model.reference, cfg.model.dtype, len(tok), run.plan, role="model.reference"
            )
            ref_config = run.with_attention(ref_config)
        log.info(
            "reference log-probs (pi_ref) from %s",
            "the initial student"
            if cfg.model.ref_model == "initial_student"
            else f"model.reference={cfg.model.reference!r}",
        )
        if cfg.model.reference and cfg.model.ref_model == "initial_student":
            log.warning(
                "model.reference=%r is not used: model.ref_model='initial_student' (set "
                "--config.model.ref_model=teacher_base to take pi_ref from it)",
                cfg.model.reference,
            )
    state = create_update_state(objective, run.student_params, update.tx, cfg.seed)
    widths = width_buckets(cfg.sampler.cache_len, cfg.train.width_buckets)
    groups = cfg.train.length_groups
    if groups > 1 and (micro != 1 or run.batch_shards != 1):
        raise ConfigError(
            f"config.train.length_groups: {groups} groups need each update in one micro-batch "
            f"on one batch shard; this run has {micro} micro-batches and {run.batch_shards} "
            "batch shards (set train.length_groups=1, or train.micro_batch_size >= the "
            "mini-batch's rows)"
        )
    grouper = RowGrouper(groups, widths)  # each update's row groups (length_groups)
    # Every process holds the same global batch (dgpo_jax.parallel.distributed); shard_batch places it.
    data = PromptBatches(records, cfg.data.batch_size, seed=cfg.seed, shuffle=cfg.data.shuffle)
    ckpt = Checkpointer(os.path.join(cfg.workdir, "checkpoints"), cfg.train.max_to_keep)
    start, extra = (
        0,
        {
            "taid_t": curriculum.taid_t_start,
            "taid_m": 0.0,
            "taid_loss": None,
            "student_share": curriculum.student_data_fraction,
            "val_loss": None,
        },
    )
    replay = ReplayBuffer(curriculum.replay_buffer_size) if curriculum.replay_buffer_size else None
    replay_dir = os.path.join(cfg.workdir, "replay")
    if cfg.resume and ckpt.latest_step() is not None:
        state, meta = ckpt.restore(target=abstract_like(state))
        data.restore(meta["data_state"])
        start, extra = int(meta["step"]), dict(extra, **meta.get("extra", {}))
        if replay is not None:
            replay = load_for_checkpoint(replay_dir, start)
        log.info("resumed from step %d", start)
    elif cfg.resume:
        log.info("resume requested but %s has no checkpoint: starting fresh", ckpt.directory)

    student_sampler = run.sampler(
        run.student_config,
        teacher=curriculum.guided_p0 > 0,
        max_prefix_length=curriculum.teacher_prefix_tokens,
    )
    teacher_sampler = (
        run.sampler(run.teacher_config)
        if not objective.uses_policy or curriculum.teacher_prefix_share > 0
        else None
    )
    logger = MetricsLogger(
        cfg.workdir,
        cfg.train.steps,
        start,
        cfg.logging.tensorboard,
        cfg.logging.wandb_project or None,
        config=cfg.to_dict(),
        progress=cfg.logging.progress,
    )
    metadata = lambda step: {
        "step": step,
        "data_state": data.state(),
        "extra": extra,
        "model_config": run.student_config.to_hf_dict(),
        "objective": objective.name,
    }
    val_batch, val_every = None, 0
    if curriculum.adaptive_student_share:
        val_every = cfg.train.val_every or max(1, cfg.train.steps // 10)
        # One PPO mini-batch of test questions, so its micro-batches are no larger than the
        # update's.
        val_records = read_question_files(split_list(cfg.data.test_files))[
            : min(cfg.data.batch_size, cfg.train.mini_batch_size)
        ]
        val_batch = validation_batch(
            val_records,
            tok,
            teacher_sampler,
            run.teacher_params,
            cfg.seed,
            micro_batches(mini_rows, cfg.train.micro_batch_size),
            cfg.data.use_chat_template,
        )

    def validate_if_due(step: int, metrics: dict) -> None:
        """DistiLLM: the validation loss after this step, and the share it implies."""
        if val_batch is None or (step + 1) % val_every:
            return
        val = float(update.loss(state, val_batch, teacher_arg)["loss"])
        extra["student_share"], extra["val_loss"] = distillm_student_share(
            extra["student_share"],
            extra["val_loss"],
            val,
            curriculum.distillm_share_step,
            curriculum.distillm_loss_rise,
        )
        metrics["val_loss"] = val

    if val_batch is not None and extra["val_loss"] is None:
        # DistiLLM's first comparison point: a validation before training.
        extra["val_loss"] = float(update.loss(state, val_batch, teacher_arg)["loss"])
    scorers = {}
    if objective.uses_policy and not on_policy:
        scorers["old_logprobs"] = run.student_config  # with this step's policy
    if ref_params is not None:
        scorers["ref_logprobs"] = ref_config

    with resumable(ckpt, logger):
        for step in range(start, cfg.train.steps):
            t0 = time.time()
            # One generator per step: a resumed run draws what an uninterrupted one would.
            rng = np.random.default_rng([cfg.seed, step])
            recs = next(data)
            expanded = [r for r in recs for _ in range(n)]
            groups = np.repeat(np.arange(len(recs)), n)
            prompts = [encode_prompt(r, tok, cfg.data.use_chat_template) for r in expanded]
            fitted, kept = fit_prompts(
                prompts, expanded, cfg.sampler.max_prompt_length, cfg.data.truncation
            )
            dropped = len(expanded) - len(kept)
            if not dropped:
                prompts = fitted
            elif not kept:  # data.truncation=drop
                raise NothingToTrainError(
                    f"step {step + 1}: all {len(expanded)} prompts are longer than "
                    f"sampler.max_prompt_length={cfg.sampler.max_prompt_length} "
                    "(data.truncation=drop): nothing to train on",
                    hint="raise sampler.max_prompt_length (and sampler.cache_len), or use "
                    "data.truncation=left",
                )
            # else: the dropped rows stay in the rollout batch (one compiled shape per run),
            # inactive (prompt_too_long, no token), and leave the batch after scoring.
            seed = cfg.seed * 1_000_003 + step
            # The policy in the compute dtype, cast once per step: rollouts and scoring passes.
            policy = run.compute(state.params["policy"])
            source = _data_source(
                objective, curriculum, extra["student_share"], rng, replay, step / cfg.train.steps
            )
            kw = {}
            if curriculum.guided_p0 > 0:
                kw = dict(
                    teacher_params=run.teacher_params,
                    teacher_turn_prob=teacher_turn_probability(
                        step,
                        cfg.train.steps,
                        curriculum.guided_p0,
                        curriculum.guided_schedule,
                        curriculum.guided_decay_rate,
                    ),
                )
            if curriculum.teacher_prefix_share > 0:
                kw["prefixes"] = teacher_prefixes(
                    teacher_sampler, run.teacher_params, prompts, curriculum, seed, rng
                )
            metrics = {"dropped_prompts": float(dropped)} if cfg.data.truncation == "drop" else {}
            if source == "replay":  # DistiLLM: a sample of the replay buffer, no rollout
                batch = replay.sample(len(expanded), rng)
            else:
                if source == "student":
                    rollout = student_sampler.generate(policy, prompts, seed=seed, **kw)
                else:
                    rollout = teacher_sampler.generate(run.teacher_params, prompts, seed=seed)
                scored = score_rollout(rollout, expanded, tok, groups)
                if dropped:
                    scored = _take_rows(scored, kept)
                batch = scored.batch
                if source == "student" and not batch["loss_mask"].any():
                    raise NothingToTrainError(
                        f"step {step + 1}: none of the {len(kept)} rollouts has a student "
                        f"token to train on (finish reasons: {_count(scored.finish_reasons)})",
                        hint="check sampler.max_new_tokens and the stop sequences; --debug shows "
                        "the traceback",
                    )
                metrics.update(
                    reward=float(scored.rewards.mean()),
                    searches=float(scored.num_searches.mean()),
                    response_tokens=scored.generated_tokens / max(len(kept), 1),
                )
                if source == "teacher":  # KD on the teacher's correct trajectories only
                    keep = np.flatnonzero(scored.rewards > 0)
                    batch = {k: (v[keep] if np.ndim(v) else v) for k, v in batch.items()}
                elif replay is not None:  # DistiLLM: fresh student samples go to the buffer too
                    replay.add(batch)
            if curriculum.mixes_student_data:
                metrics["student_data"] = float(source != "teacher")
                metrics["replay_data"] = float(source == "replay")
                metrics["student_share"] = float(extra["student_share"])
            if len(batch["input_ids"]) == 0:
                # The teacher answered none of this step's questions correctly: no KD data. Said
                # in the log and the metrics; the step's update is skipped, not run on nothing.
                log.warning("step %d: no correct teacher trajectory: update skipped", step + 1)
                metrics["skipped_no_data"] = 1.0
                validate_if_due(step, metrics)
                logger.write(step + 1, metrics)
                continue
            if cfg.train.pack:
                batch = pad_batch_to(batch, SEQ_MULTIPLE)
            else:  # one trajectory per row: no pass runs over the rollout buffer's padding
                batch = fit_width(right_align(batch), widths)
            if objective.divergence == "taid":
                batch["taid_t"] = np.float32(extra["taid_t"])
            scoring = {
                k: (c, policy if k == "old_logprobs" else ref_params) for k, c in scorers.items()
            }
            t_update = time.time()
            if cfg.train.pack:
                state, update_metrics, whole, pad_stats = _packed_updates(
                    cfg, run, update, state, batch, scoring, teacher_arg, mini_rows
                )
            else:
                state, update_metrics, whole, pad_stats = _padded_updates(
                    cfg,
                    run,
                    update,
                    state,
                    batch,
                    scoring,
                    teacher_arg,
                    mini_rows,
                    grouper,
                    (cfg.train.steps - step) * updates_per_step,
                )
            metrics.update(pad_stats)
            # scoring passes, the whole-batch pass and the updates (the rollout not included)
            metrics["update_seconds"] = time.time() - t_update
            for k in update_metrics[0]:
                metrics[k] = float(np.mean([u[k] for u in update_metrics]))
            metrics.update({k: float(v) for k, v in to_host(whole).items()})
            if objective.divergence == "taid":
                extra["taid_t"], extra["taid_m"] = taid_update(
                    extra["taid_t"],
                    extra["taid_m"],
                    extra["taid_loss"],
                    metrics["loss"],
                    step / cfg.train.steps,  # the 0-based step, as TAID's global_step
                    curriculum.taid_t_start,
                    curriculum.taid_t_end,
                    curriculum.taid_alpha,
                    curriculum.taid_momentum,
                )
                extra["taid_loss"] = metrics["loss"]
            validate_if_due(step, metrics)
            metrics["step_seconds"] = time.time() - t0
            tokens = int(batch["attention_mask"].sum())
            # real (not padding) tokens through the scoring and update passes per second
            metrics["real_tokens_per_s"] = tokens / max(metrics["update_seconds"], 1e-9)
            if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0:
                res = run.evaluate(state.params["policy"], f"step_{step + 1}")  # cast inside
                metrics.update({f"eval/{d}_em": r["all"]["em"] for d, r in res.items()})
            logger.write(step + 1, metrics, tokens=tokens)
            if (step + 1) % cfg.train.save_every == 0 or step + 1 == cfg.train.steps:
                if replay is not None and jax.process_index() == 0:
                    save_with_checkpoint(replay, replay_dir, step + 1, ckpt.all_steps())
                ckpt.save(step + 1, state, metadata(step + 1), force=True)
                logger.flush()  # the steps a checkpoint covers are in the metrics too
    ckpt.wait_until_finished()
    final = run.evaluate(state.params["policy"], "final") if cfg.eval.at_end else None
    logger.close()
    ckpt.close()
    return {"final_eval": final, "state": state}


@contextlib.contextmanager
def resumable(ckpt: Checkpointer, logger: MetricsLogger):
    """The training loop's frame: when the loop stops on an error the user can act on (a
    retriever that kept failing, a step with nothing to train on), the metrics logged so far
    are flushed and the error's hint names the last committed checkpoint and how to continue
    from it. Saves are synchronous, so that checkpoint is complete; a step that failed wrote
    nothing (no partial update, no checkpoint, no metrics record)."""
    try:
        yield
    except UserError as e:
        logger.close()
        last = ckpt.latest_step()
        where = (
            f"the last checkpoint is step {last} in {ckpt.directory}: once fixed, "
            "--config.resume=True continues from it"
            if last is not None
            else f"no checkpoint was saved yet in {ckpt.directory}"
        )
        e.hint = f"{e.hint}; {where}" if e.hint else where
        raise


def _padded_updates(
    cfg, run, update, state, batch, scoring, teacher, mini_rows, grouper, updates_left
):
    """``train.pack=False``: one trajectory per row, padded to the rollout's width. Scoring
    passes, the whole-batch pass (when the step makes more than one update) and the PPO
    mini-batches, each run over at most ``train.length_groups`` groups of rows sorted by
    length, each cut to its own width (``grouper``: a ``RowGrouper``; ``updates_left``: the
    run's updates from this step's first on). Returns (state, per-update metrics,
    whole-batch metrics, padding metrics; ``passes_padded_positions_per_real_token``: the
    padding the update's model passes ran over, after the grouping)."""
    per_micro = max(1, mini_rows // update.micro_batches)
    # Every row trains: pad to whole micro-batches with rows that carry no token (counted).
    batch, padded_rows = pad_rows_to(dict(batch), update.micro_batches)
    rows_now = len(batch["input_ids"])
    score_rows = cfg.train.score_micro_batch_size or per_micro
    ids, mask = run.place(batch["input_ids"], batch["attention_mask"])
    for key, (config, params) in scoring.items():
        batch[key] = to_host(
            sequence_logprobs(config, params, ids, mask, micro_batch=score_rows, plan=run.plan)
        )
    mb = min(mini_rows, rows_now)
    whole = {}
    if -(-rows_now // mb) * cfg.train.ppo_epochs > 1:
        # The reference's order: values, advantages and whitening over the whole rollout
        # batch at the pre-update parameters, then the mini-batch updates. (One update per
        # step computes exactly that inside the step, so it needs no separate pass.)
        batch, whole = update.prepare_rollout(
            state, batch, teacher, micro_batches(rows_now, per_micro)
        )
        batch = to_host(batch)
    update_metrics, computed = [], 0
    for _ in range(cfg.train.ppo_epochs):
        for lo in range(0, rows_now, mb):
            part = {k: (v[lo : lo + mb] if np.ndim(v) else v) for k, v in batch.items()}
            part, groups = grouper(part, updates_left - len(update_metrics))
            t = time.time()
            state, m = update(state, part, teacher, row_groups=groups)
            update_metrics.append(to_host(m))
            grouper.record(part["input_ids"].shape[1], groups, time.time() - t)
            computed += sum(n * w for n, w in groups) or part["input_ids"].size
    real = max(int(batch["attention_mask"].sum()), 1)
    positions = batch["input_ids"].size
    pad = {
        "padded_rows": padded_rows,
        "padded_positions_per_real_token": (positions - real) / real,
        "passes_padded_positions_per_real_token": computed / cfg.train.ppo_epochs / real - 1,
    }
    return state, update_metrics, whole, pad


def _packed_updates(cfg, run, update, state, batch, scoring, teacher, mini_rows):
    """``train.pack=True``: the same passes on packed rows (``dgpo_jax.learner.packing``).

    One shape per run: a batch of N trajectories becomes N rows of ``packed_width(cfg)``
    positions filled micro-batch by micro-batch, and the programs skip the micro-batches that
    hold only empty rows, so every step runs the same compiled programs and the model passes
    follow the real tokens. The trajectories are split into PPO mini-batches as they come (GRPO
    groups stay whole). The scoring passes and the whole-batch pass run on the whole batch
    packed (``data.batch_size x rollouts_per_prompt`` rows, whatever the step keeps); their
    per-token outputs are unpacked into the trajectory layout and packed again with each
    mini-batch. Returns (state, per-update metrics, whole-batch metrics, padding metrics)."""
    batch = dict(batch)
    width = packed_width(cfg)
    n_traj = len(batch["input_ids"])
    mb = min(mini_rows, n_traj)
    minis = [np.arange(lo, min(lo + mb, n_traj)) for lo in range(0, n_traj, mb)]
    micro = update.micro_batches
    score_rows = cfg.train.score_micro_batch_size or mini_rows // micro
    quantum = math.lcm(score_rows, run.batch_shards)
    capacity = max(cfg.data.batch_size * cfg.data.rollouts_per_prompt, n_traj)
    whole_rows = -(-capacity // quantum) * quantum
    whole, layout = pack_for_update(batch, width, whole_rows, whole_rows // score_rows)
    ids, mask, seg = run.place(whole["input_ids"], whole["attention_mask"], whole["segment_ids"])
    for key, (config, params) in scoring.items():
        whole[key] = to_host(
            sequence_logprobs(
                config, params, ids, mask, segment_ids=seg, micro_batch=score_rows, plan=run.plan
            )
        )
        batch[key] = layout.unpack(whole[key])
    whole_metrics = {}
    if len(minis) * cfg.train.ppo_epochs > 1:
        # The reference's order (see _padded_updates), on the whole batch packed.
        prepared, whole_metrics = update.prepare_rollout(
            state, whole, teacher, whole_rows // score_rows
        )
        added = {k: to_host(v) for k, v in prepared.items() if k not in whole}
        whole.update(added)
        batch.update({k: layout.unpack(v) for k, v in added.items()})
    if len(minis) == 1 and whole_rows == mini_rows and score_rows == mini_rows // micro:
        parts = [(whole, layout)]  # the whole batch is the mini-batch, in the update's shape
    else:
        parts = [
            pack_for_update(take_trajectories(batch, idx), width, mini_rows, micro) for idx in minis
        ]
    update_metrics = []
    for _ in range(cfg.train.ppo_epochs):
        for packed, _ in parts:
            state, m = update(state, packed, teacher)
            update_metrics.append(to_host(m))
    real = max(sum(p[1].stats["real_tokens"] for p in parts), 1)
    padded = sum(p[1].stats["padded_positions"] for p in parts)
    return state, update_metrics, whole_metrics, {"padded_positions_per_real_token": padded / real}


def _take_rows(scored: ScoredRollouts, rows: list[int]) -> ScoredRollouts:
    """The rollouts of ``rows`` only (``data.truncation=drop``: the kept prompts)."""
    take = lambda v: [v[i] for i in rows] if isinstance(v, list) else v[rows]
    batch = {k: (v[rows] if np.ndim(v) else v) for k, v in scored.batch.items()}
    fields = ("responses", "answers", "rewards", "num_searches", "finish_reasons")
    return dataclasses.replace(scored, batch=batch, **{f: take(getattr(scored, f)) for f in fields})


def _count(values) -> dict:
    """{value: how often}, most frequent first."""
    out: dict = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def packed_width(cfg) -> int:
    """The packed rows' width for the run: ``train.pack_width``, or the sampler's context
    (``sampler.cache_len``) rounded up to a multiple of 64 positions."""
    width = cfg.train.pack_width or cfg.sampler.cache_len
    return -(-width // WIDTH_MULTIPLE) * WIDTH_MULTIPLE


def _data_source(
    objective, curriculum, share: float, rng: np.random.Generator, replay, progress: float
) -> str:
    """This step's training data: "student" rollouts (every on-policy objective; the KD
    family with probability ``share``), DistiLLM's "replay" buffer, or the "teacher"'s
    correct rollouts."""
    if objective.uses_policy:
        return "student"
    r = rng.random()
    if replay is not None:
        return distillm_data_source(r, share, progress, len(replay), replay.capacity)
    return "student" if r < share else "teacher"
