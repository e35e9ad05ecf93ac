"""The modes of the launcher: ``train`` (RL and the KD family), ``coldstart``, ``eval``,
``export``.

One RL step: a batch of questions -> rollouts (sampler + retriever) -> EM rewards ->
behaviour (and reference) log-probs -> the fused update step (teacher forward, advantages,
PPO + masked KL, optax) on each PPO mini-batch -> metrics; periodically evaluation and an
orbax checkpoint holding the update state, the data-iterator state and the configs, so
``--config.resume=True`` continues with the same data order.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dgpo_jax.checkpoint import Checkpointer, abstract_like
from dgpo_jax.convert import policy_params
from dgpo_jax.data.pipeline import PromptBatches
from dgpo_jax.data.search_r1 import read_question_files
from dgpo_jax.distributed import to_host
from dgpo_jax.metrics_log import MetricsLogger
from dgpo_jax.objectives.config import ObjectiveConfig
from dgpo_jax.objectives.presets import (distillm_student_share, get_objective, taid_update,
                                         teacher_turn_probability)
from dgpo_jax.optim import OptimConfig
from dgpo_jax.run_config import split_list, validate
from dgpo_jax.train_step import create_update_state, make_update_step
from dgpo_jax.training.common import (build_retriever, encode_prompt, load_model, make_plan,
                                      pad_batch_to, sampler_config, score_rollout,
                                      sequence_logprobs, trim_to_bucket)
from dgpo_jax.training.evaluate import evaluate, write_results
from dgpo_jax.training.replay import ReplayBuffer

log = logging.getLogger(__name__)
SEQ_MULTIPLE = 64  # pad update batches to this many positions (bounds recompilations)


def build_objective(cfg) -> ObjectiveConfig:
    return get_objective(cfg.objective.preset, **cfg.objective.overrides.to_dict())


def optim_config(cfg, total_updates: int, lr: float | None = None,
                 schedule: str | None = None, warmup_ratio: float | None = None) -> OptimConfig:
    """``warmup_ratio`` (of ``total_updates``) replaces ``optim.actor_warmup_ratio`` when given."""
    o = cfg.optim
    schedule = schedule or o.schedule
    ratio = o.actor_warmup_ratio if warmup_ratio is None else warmup_ratio
    actor_warmup = OptimConfig.warmup_from_ratio(ratio, total_updates)
    critic_warmup = OptimConfig.warmup_from_ratio(o.critic_warmup_ratio, total_updates)
    if schedule == "constant" and (actor_warmup or critic_warmup):
        schedule = "warmup_constant"
    return OptimConfig(lr=lr if lr is not None else o.actor_lr, critic_lr=o.critic_lr,
                       schedule=schedule, warmup_steps=actor_warmup,
                       critic_warmup_steps=critic_warmup, total_steps=max(total_updates, 1),
                       weight_decay=o.weight_decay, grad_clip=o.grad_clip)


def _micro_batches(rows: int, per_micro: int) -> int:
    m = max(1, rows // max(per_micro, 1))
    while rows % m:
        m -= 1
    return m


def _eval_records(cfg):
    records = read_question_files(split_list(cfg.data.test_files))
    if cfg.eval.max_examples:
        per_source: dict[str, int] = {}
        kept = []
        for r in records:
            if per_source.get(r.data_source, 0) < cfg.eval.max_examples:
                per_source[r.data_source] = per_source.get(r.data_source, 0) + 1
                kept.append(r)
        records = kept
    return records


def _eval_sampler_configs(cfg, tokenizer) -> dict:
    out = {}
    if cfg.eval.greedy:
        out["greedy"] = sampler_config(cfg, tokenizer, greedy=True)
    if cfg.eval.sampled:
        out[f"sampled_t{cfg.sampler.temperature:g}"] = sampler_config(cfg, tokenizer)
    return out


class _Run:
    """Everything a mode needs, built once (models, tokenizer, retriever, plan)."""

    def __init__(self, cfg, need_teacher: bool):
        from dgpo_jax.tokenizer import load_tokenizer
        validate(cfg)
        self.cfg = cfg
        self.plan = make_plan(cfg)
        self.tokenizer = load_tokenizer(cfg.model.tokenizer)
        vocab = len(self.tokenizer)
        self.student_config, self.student_params = load_model(
            cfg.model.student, cfg.model.dtype, vocab, self.plan, cfg.seed, "model.student")
        if cfg.model.remat != "none":
            self.student_config = self.student_config.replace(remat=cfg.model.remat)
        self.teacher_config = self.teacher_params = None
        if need_teacher:
            if not cfg.model.teacher:
                raise ValueError(f"objective {cfg.objective.preset!r} / mode {cfg.mode!r} needs "
                                 "a teacher: set config.model.teacher")
            self.teacher_config, self.teacher_params = load_model(
                cfg.model.teacher, cfg.model.dtype, vocab, self.plan, cfg.seed + 1,
                "model.teacher")
        self.retriever = build_retriever(cfg)
        os.makedirs(cfg.workdir, exist_ok=True)

    def place(self, *arrays):
        """Host arrays -> the global mesh, batch dimension over the data axes."""
        return self.plan.shard_batch(arrays)

    def sampler(self, model_config, greedy=False, teacher=False, max_prefix_length=None):
        from dgpo_jax.sampler import Sampler
        scfg = sampler_config(self.cfg, self.tokenizer, greedy, max_prefix_length)
        return Sampler(model_config, scfg, self.tokenizer, self.retriever, plan=self.plan,
                       teacher_config=self.teacher_config if teacher else None,
                       topk=self.cfg.retrieval.topk)

    def evaluate(self, params, name: str, model_config=None) -> dict:
        cfg = self.cfg
        results = evaluate(model_config or self.student_config, params, _eval_records(cfg),
                           self.tokenizer, self.retriever,
                           _eval_sampler_configs(cfg, self.tokenizer), cfg.eval.batch_size,
                           cfg.seed, self.plan, cfg.data.use_chat_template,
                           sampled_repeats=cfg.eval.sampled_repeats)
        write_results(cfg.workdir, name, results)
        return results


# ------------------------------------------------------------------------------------ train ---
def run_train(cfg) -> dict:
    """RL (ppo, grpo, dgpo, opd, exopd, tropd, guided_opd) or KD-family training."""
    objective = build_objective(cfg)
    run = _Run(cfg, objective.needs_teacher_model)
    tok, n = run.tokenizer, cfg.data.rollouts_per_prompt
    rows = cfg.data.batch_size * n
    mini_rows = min(cfg.train.mini_batch_size, cfg.data.batch_size) * n
    updates_per_step = (rows // mini_rows) * cfg.train.ppo_epochs
    total_updates = cfg.train.steps * updates_per_step
    in_program_teacher = run.teacher_config if objective.teacher_in_update else None
    update = make_update_step(objective, run.student_config, in_program_teacher,
                              optimizer=optim_config(cfg, total_updates),
                              micro_batches=_micro_batches(mini_rows, cfg.train.micro_batch_size),
                              plan=run.plan)
    ref_params = None
    if objective.needs_ref_logp:
        if objective.ref_model == "initial_student":
            ref_params = jax.tree.map(jnp.copy, run.student_params)
            ref_config = run.student_config
        else:
            ref_config, ref_params = load_model(cfg.model.reference or cfg.model.teacher,
                                                cfg.model.dtype, len(tok), run.plan,
                                                role="model.reference")
    state = create_update_state(objective, run.student_params, update.tx, cfg.seed)
    records = read_question_files(split_list(cfg.data.train_files))
    # Every process holds the same global batch (dgpo_jax.distributed); shard_batch places it.
    data = PromptBatches(records, cfg.data.batch_size, seed=cfg.seed, shuffle=cfg.data.shuffle)
    ckpt = Checkpointer(os.path.join(cfg.workdir, "checkpoints"), cfg.train.max_to_keep)
    start, extra = 0, {"taid_t": objective.taid_t_start, "taid_m": 0.0, "taid_loss": None,
                       "student_share": objective.student_data_fraction, "val_loss": None}
    replay = ReplayBuffer(objective.replay_buffer_size) if objective.replay_buffer_size else None
    replay_dir = os.path.join(cfg.workdir, "replay")
    if cfg.resume and ckpt.latest_step() is not None:
        state, meta = ckpt.restore(target=abstract_like(state))
        data.restore(meta["data_state"])
        start, extra = int(meta["step"]), dict(extra, **meta.get("extra", {}))
        if replay is not None:
            path = _replay_path(replay_dir, start)
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"resume: checkpoint {start} has no replay buffer {path!r}; the DistiLLM "
                    "run cannot continue with the data it had")
            replay = ReplayBuffer.load(path)
        log.info("resumed from step %d", start)
    elif cfg.resume:
        log.info("resume requested but %s has no checkpoint: starting fresh", ckpt.directory)

    student_sampler = run.sampler(run.student_config, teacher=objective.guided_p0 > 0,
                                  max_prefix_length=objective.teacher_prefix_tokens or None)
    teacher_sampler = (run.sampler(run.teacher_config) if not objective.uses_policy
                       or objective.teacher_prefix_share > 0 else None)
    logger = MetricsLogger(cfg.workdir, cfg.train.steps, start, cfg.logging.tensorboard,
                           cfg.logging.wandb_project or None, config=cfg.to_dict(),
                           progress=cfg.logging.progress)
    metadata = lambda step: {"step": step, "data_state": data.state(), "extra": extra,
                             "model_config": run.student_config.to_hf_dict(),
                             "objective": objective.name}
    val_batch, val_every = None, 0
    if objective.adaptive_student_share:
        val_every = cfg.train.val_every or max(1, cfg.train.steps // 10)
        val_batch = _validation_batch(cfg, run, teacher_sampler, _micro_batches(
            mini_rows, cfg.train.micro_batch_size))

    def validate_if_due(step: int, metrics: dict) -> None:
        """DistiLLM: the validation loss after this step, and the share it implies."""
        if val_batch is None or (step + 1) % val_every:
            return
        val = float(update.loss(state, val_batch, run.teacher_params if in_program_teacher
                                else None)["loss"])
        extra["student_share"] = distillm_student_share(
            extra["student_share"], extra["val_loss"], val,
            objective.distillm_share_step, objective.distillm_loss_rise)
        extra["val_loss"] = metrics["val_loss"] = val

    for step in range(start, cfg.train.steps):
        t0 = time.time()
        # One generator per step: a resumed run draws what an uninterrupted one would.
        rng = np.random.default_rng([cfg.seed, step])
        recs = next(data)
        expanded = [r for r in recs for _ in range(n)]
        groups = np.repeat(np.arange(len(recs)), n)
        prompts = [encode_prompt(r, tok, cfg.data.use_chat_template) for r in expanded]
        seed = cfg.seed * 1_000_003 + step
        policy = state.params["policy"]
        use_student_data = objective.uses_policy or rng.random() < extra["student_share"]
        kw = {}
        if objective.guided_p0 > 0:
            kw = dict(teacher_params=run.teacher_params,
                      teacher_turn_prob=teacher_turn_probability(
                          step, cfg.train.steps, objective.guided_p0,
                          objective.guided_schedule, objective.guided_decay_rate))
        if objective.teacher_prefix_share > 0:
            kw["prefixes"] = _teacher_prefixes(teacher_sampler, run.teacher_params, prompts,
                                               objective, seed, rng)
        if use_student_data:
            rollout = student_sampler.generate(policy, prompts, seed=seed, **kw)
        else:
            rollout = teacher_sampler.generate(run.teacher_params, prompts, seed=seed)
        scored = score_rollout(rollout, expanded, tok, groups)
        batch = scored.batch
        if not use_student_data:  # KD on the teacher's correct trajectories only
            keep = np.flatnonzero(scored.rewards > 0)
            keep = keep[: len(keep) - len(keep) % max(1, _micro_batches(len(keep),
                                                                         cfg.train.micro_batch_size))]
            batch = {k: (v[keep] if np.ndim(v) else v) for k, v in batch.items()}
        if use_student_data and replay is not None:  # DistiLLM: train on the replay buffer
            replay.add(batch)
            batch = replay.sample(len(batch["input_ids"]), rng)
        metrics = {"reward": float(scored.rewards.mean()),
                   "searches": float(scored.num_searches.mean()),
                   "response_tokens": scored.generated_tokens / max(len(expanded), 1)}
        if objective.adaptive_student_share or objective.student_data_fraction:
            metrics["student_data"] = float(use_student_data)
            metrics["student_share"] = float(extra["student_share"])
        if len(batch["input_ids"]) == 0:
            metrics["skipped_no_data"] = 1.0
            validate_if_due(step, metrics)
            logger.write(step + 1, metrics)
            continue
        batch = pad_batch_to(batch, SEQ_MULTIPLE)
        if objective.uses_policy:
            batch["old_logprobs"] = to_host(sequence_logprobs(
                run.student_config, policy, *run.place(batch["input_ids"],
                                                       batch["attention_mask"])))
        if ref_params is not None:
            batch["ref_logprobs"] = to_host(sequence_logprobs(
                ref_config, ref_params, *run.place(batch["input_ids"],
                                                   batch["attention_mask"])))
        if objective.divergence == "taid":
            batch["taid_t"] = np.float32(extra["taid_t"])
        update_metrics = []
        rows_now = len(batch["input_ids"])
        mb = min(mini_rows, rows_now)
        for _ in range(cfg.train.ppo_epochs):
            for lo in range(0, rows_now - mb + 1, mb):
                part = {k: (v[lo:lo + mb] if np.ndim(v) else v) for k, v in batch.items()}
                state, m = update(state, part, run.teacher_params if in_program_teacher
                                  else None)
                update_metrics.append(to_host(m))
        for k in update_metrics[0]:
            metrics[k] = float(np.mean([u[k] for u in update_metrics]))
        if objective.divergence == "taid":
            extra["taid_t"], extra["taid_m"] = taid_update(
                extra["taid_t"], extra["taid_m"], extra["taid_loss"], metrics["loss"],
                (step + 1) / cfg.train.steps, objective.taid_t_start, objective.taid_t_end,
                objective.taid_alpha, objective.taid_momentum)
            extra["taid_loss"] = metrics["loss"]
        validate_if_due(step, metrics)
        metrics["step_seconds"] = time.time() - t0
        tokens = int(batch["attention_mask"].sum())
        if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0:
            res = run.evaluate(state.params["policy"], f"step_{step + 1}")
            metrics.update({f"eval/{d}_em": r["all"]["em"] for d, r in res.items()})
        logger.write(step + 1, metrics, tokens=tokens)
        if (step + 1) % cfg.train.save_every == 0 or step + 1 == cfg.train.steps:
            if replay is not None:  # first, so that a committed checkpoint always has its buffer
                _save_replay(replay, replay_dir, step + 1, ckpt)
            ckpt.save(step + 1, state, metadata(step + 1), force=True)
    ckpt.wait_until_finished()
    final = run.evaluate(state.params["policy"], "final") if cfg.eval.at_end else None
    logger.close()
    ckpt.close()
    return {"final_eval": final, "state": state}


def _replay_path(replay_dir: str, step: int) -> str:
    return os.path.join(replay_dir, f"replay_{step}.npz")


def _save_replay(replay: ReplayBuffer, replay_dir: str, step: int, ckpt: Checkpointer) -> None:
    """The buffer as of checkpoint ``step``; files of checkpoints orbax no longer keeps go."""
    if jax.process_index() != 0:
        return
    os.makedirs(replay_dir, exist_ok=True)
    replay.save(_replay_path(replay_dir, step))
    keep = {f"replay_{s}.npz" for s in ckpt.all_steps()} | {f"replay_{step}.npz"}
    for name in os.listdir(replay_dir):
        if name.startswith("replay_") and name.endswith(".npz") and name not in keep:
            os.remove(os.path.join(replay_dir, name))


def _validation_batch(cfg, run, teacher_sampler, micro_batches: int) -> dict:
    """DistiLLM's validation data: the teacher's correct rollouts (all of them when too few are
    correct, said in the log) of the first test questions, one PPO mini-batch of them (so its
    micro-batches are no larger than the update's), fixed for the run."""
    count = min(cfg.data.batch_size, cfg.train.mini_batch_size)
    records = read_question_files(split_list(cfg.data.test_files))[:count]
    prompts = [encode_prompt(r, run.tokenizer, cfg.data.use_chat_template) for r in records]
    rollout = teacher_sampler.generate(run.teacher_params, prompts, seed=cfg.seed + 7)
    scored = score_rollout(rollout, records, run.tokenizer)
    keep = np.flatnonzero(scored.rewards > 0)
    if len(keep) < micro_batches:
        log.info("validation: the teacher answers %d of %d validation questions correctly; "
                 "the validation loss uses all %d of its rollouts", len(keep), len(records),
                 len(records))
        keep = np.arange(len(records))
    keep = keep[: len(keep) - len(keep) % micro_batches]
    batch = {k: (v[keep] if np.ndim(v) else v) for k, v in scored.batch.items()}
    return pad_batch_to(batch, SEQ_MULTIPLE)


def _teacher_prefixes(teacher_sampler, teacher_params, prompts, objective, seed, rng):
    """TrOPD: for a share of rows, the teacher's first-turn tokens (up to the prefix length)."""
    chosen = rng.random(len(prompts)) < objective.teacher_prefix_share
    prefixes: list[Any] = [None] * len(prompts)
    if not chosen.any():
        return prefixes
    idx = np.flatnonzero(chosen)
    out = teacher_sampler.generate(teacher_params, [prompts[i] for i in idx], seed=seed + 7)
    for j, i in enumerate(idx):
        arr = out.arrays
        first = (np.asarray(arr.turn_ids[j]) == 0) & np.asarray(arr.loss_mask[j])
        toks = np.asarray(arr.tokens[j])[first][: objective.teacher_prefix_tokens]
        prefixes[i] = toks.tolist() if len(toks) else None
    return prefixes


# -------------------------------------------------------------------------------- coldstart ---
def run_coldstart(cfg) -> dict:
    """Teacher rollouts on training questions -> keep the correct ones -> KD the student."""
    from dgpo_jax.convert import save_params_checkpoint
    run = _Run(cfg, need_teacher=True)
    records = read_question_files(split_list(cfg.data.train_files))
    if cfg.coldstart.max_questions:
        records = records[: cfg.coldstart.max_questions]
    records = [r for r in records for _ in range(cfg.coldstart.rollouts_per_question)]
    sampler = run.sampler(run.teacher_config, greedy=cfg.coldstart.greedy)
    seqs = _collect_correct(run, sampler, run.teacher_params, records, cfg.eval.batch_size)
    if not len(seqs["input_ids"]):
        raise RuntimeError(f"the teacher answered none of {len(records)} training questions "
                           "correctly: nothing to distill")
    log.info("cold start: %d correct teacher trajectories of %d", len(seqs["input_ids"]),
             len(records))
    state = kd_train(cfg, run, seqs, cfg.coldstart.epochs, cfg.coldstart.lr,
                     cfg.coldstart.batch_size, objective=get_objective("dgpo_coldstart"))
    out = os.path.join(cfg.workdir, "student_coldstart")
    import shutil
    shutil.rmtree(out, ignore_errors=True)
    save_params_checkpoint(run.student_config, state.params["policy"], out)
    final = run.evaluate(state.params["policy"], "coldstart")
    return {"final_eval": final, "checkpoint": out, "num_sequences": len(seqs["input_ids"])}


def _collect_correct(run, sampler, params, records, batch_size) -> dict[str, np.ndarray]:
    from dgpo_jax.training.evaluate import rollout_records
    parts = []
    for scored, _ in rollout_records(sampler, params, records, run.tokenizer, batch_size,
                                     run.cfg.seed, run.cfg.data.use_chat_template):
        keep = np.flatnonzero(scored.rewards > 0)
        parts.append({k: scored.batch[k][keep] for k in ("input_ids", "attention_mask",
                                                          "loss_mask")})
    width = max(p["input_ids"].shape[1] for p in parts)
    width += (-width) % SEQ_MULTIPLE
    return {k: np.concatenate([np.pad(p[k], ((0, 0), (0, width - p[k].shape[1])))
                               for p in parts]) for k in parts[0]}


def kd_train(cfg, run, seqs: dict[str, np.ndarray], epochs: int, lr: float, batch_size: int,
             objective: ObjectiveConfig, logger_prefix: str = "coldstart_"):
    """Epochs of an off-policy KD objective over fixed sequences (teacher forward in-program)."""
    n = len(seqs["input_ids"])
    batch_size = min(batch_size, n)
    steps_per_epoch = n // batch_size
    total = max(1, epochs * steps_per_epoch)
    update = make_update_step(objective, run.student_config, run.teacher_config,
                              optimizer=optim_config(cfg, total, lr=lr, schedule="cosine",
                                                     warmup_ratio=cfg.coldstart.warmup_ratio),
                              micro_batches=_micro_batches(batch_size, cfg.train.micro_batch_size),
                              plan=run.plan)
    state = create_update_state(objective, run.student_params, update.tx, cfg.seed)
    logger = MetricsLogger(cfg.workdir, total, 0, cfg.logging.tensorboard, None,
                           progress=cfg.logging.progress, prefix=logger_prefix)
    rng = np.random.default_rng(cfg.seed)
    step = 0
    for _ in range(epochs):
        order = rng.permutation(n)
        for lo in range(0, steps_per_epoch * batch_size, batch_size):
            idx = order[lo:lo + batch_size]
            batch = trim_to_bucket({k: v[idx] for k, v in seqs.items()})
            state, m = update(state, batch, run.teacher_params)
            step += 1
            logger.write(step, jax.device_get(m), tokens=int(seqs["attention_mask"][idx].sum()))
    logger.close()
    return state


# ----------------------------------------------------------------------------- eval/export ---
def run_eval(cfg) -> dict:
    run = _Run(cfg, need_teacher=False)
    params = run.student_params
    ckpt_dir = os.path.join(cfg.workdir, "checkpoints")
    step = None
    if os.path.isdir(ckpt_dir):
        ck = Checkpointer(ckpt_dir)
        if ck.latest_step() is not None:
            step = ck.latest_step() if cfg.eval.checkpoint_step < 0 else cfg.eval.checkpoint_step
            state, _ = ck.restore(step)
            params = jax.tree.map(jnp.asarray, policy_params(state, ck.directory))
        ck.close()
    results = run.evaluate(params, f"eval_step_{step}" if step is not None else "eval")
    return {"final_eval": results, "step": step}


def run_export(cfg) -> str:
    from dgpo_jax.models import Qwen2Config, save_hf
    from dgpo_jax.tokenizer import load_tokenizer
    ck = Checkpointer(os.path.join(cfg.workdir, "checkpoints"))
    step = ck.latest_step() if cfg.export.step < 0 else cfg.export.step
    meta = ck.restore_metadata(step)
    state, _ = ck.restore(step)
    ck.close()
    config = Qwen2Config.from_hf_dict(meta["model_config"], source=f"{ck.directory} metadata")
    params = policy_params(state, ck.directory)
    out = cfg.export.out or os.path.join(cfg.workdir, f"export_{step}")
    save_hf(config, params, out, tokenizer=load_tokenizer(cfg.model.tokenizer),
            dtype=cfg.export.dtype or None, overwrite=True)
    log.info("exported step %d to %s", step, out)
    return out
