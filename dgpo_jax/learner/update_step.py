"""The fused update step: one jitted program per objective config.

``make_update_step(objective, student_config, ...)`` returns an ``UpdateStep``; calling it with
``(state, batch[, teacher_params])`` runs, inside one compiled program:

1. (only when needed) a no-gradient pre-pass over micro-batches: in-program teacher log-probs
   for whole-batch advantages (DGPO with GAE) and the critic's values when the batch has none;
2. rewards, gates and advantages on the whole batch (GAE / GRPO / reward-to-go / whitening);
3. a ``lax.scan`` over micro-batches: student forward -> chunked log-probs, entropy and
   divergences (teacher forward without gradient when the objective needs teacher logits),
   critic values, the loss, and its gradient, accumulated in float32. Every mean's denominator
   comes from the batch masks and is known before the scan, so the micro-batched loss and
   gradient equal the full-batch ones exactly;
4. a non-finite guard: a step whose loss or gradient is not finite changes nothing but the
   ``skipped_steps`` counter; otherwise the optax update.

The state is donated; with a ``plan`` the batch is placed by the plan and the new state keeps
the input state's shardings.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dgpo_jax.learner.optim import OptimConfig, make_optimizer
from dgpo_jax.learner.train_state import (
    TrainState,
    create_train_state,
    optimizer_state_shardings,
    replicated_sharding_like,
)
from dgpo_jax.models import Qwen2Config, forward_hidden, lm_logits
from dgpo_jax.objectives import advantages as adv_lib
from dgpo_jax.objectives.batch import validate_batch
from dgpo_jax.objectives.config import ObjectiveConfig
from dgpo_jax.objectives.critic import critic_values, init_critic, init_value_head
from dgpo_jax.objectives.divergences import chunked_token_stats
from dgpo_jax.objectives.kl import kl_estimate
from dgpo_jax.objectives.losses import (
    importance_sampling_loss,
    ppo_clip_loss,
    reinforce_loss,
    truncated_is_weight,
    value_loss,
)
from dgpo_jax.objectives.rewards import token_rewards, trajectory_gate
from dgpo_jax.parallel.distributed import device_put_global, tree_device_put_global

f32 = jnp.float32


@flax.struct.dataclass
class UpdateState:
    """``train``: the project's ``TrainState`` whose params are ``{"policy": student, and
    "value_head": {...} or "critic": {"trunk", "value_head"}}``; ``skipped_steps``: int32[]
    count of updates skipped for non-finite loss/gradients."""

    train: TrainState
    skipped_steps: jax.Array

    @property
    def params(self):
        return self.train.params

    @property
    def step(self):
        return self.train.step


def create_update_state(
    objective: ObjectiveConfig,
    policy_params,
    tx: optax.GradientTransformation,
    rng: jax.Array,
    critic_params=None,
) -> UpdateState:
    """Initial state. A missing critic is built: a fresh value head (``value_head``) or a copy of
    the student trunk plus a value head (``separate``, as DGPO initialises its critic)."""
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    elif not jax.dtypes.issubdtype(jnp.asarray(rng).dtype, jax.dtypes.prng_key):
        rng = jax.random.wrap_key_data(jnp.asarray(rng, jnp.uint32))
    params = {"policy": policy_params}
    head_rng = jax.random.fold_in(rng, 7)
    embed = policy_params["embed_tokens"]
    replicated = replicated_sharding_like(policy_params)
    if objective.critic == "value_head":
        head = (
            critic_params
            if critic_params is not None
            else init_value_head(embed.shape[1], head_rng, embed.dtype)
        )
        params["value_head"] = tree_device_put_global(
            head, replicated
        )  # tiny: replicated on the mesh
    elif objective.critic == "separate":
        params["critic"] = (
            critic_params if critic_params is not None else init_critic(policy_params, head_rng)
        )
        params["critic"]["value_head"] = tree_device_put_global(
            params["critic"]["value_head"], replicated
        )
    train = create_train_state(params, tx, rng)
    skipped = device_put_global(jnp.zeros((), jnp.int32), train.step.sharding)
    state = UpdateState(train=train, skipped_steps=skipped)
    # Commit every leaf to its current placement: the step's outputs are committed, and a
    # committed/uncommitted mismatch would compile the step a second time.
    return jax.tree.map(lambda x: device_put_global(x, x.sharding), state)


def abstract_update_state(
    objective: ObjectiveConfig, policy_params, tx: optax.GradientTransformation
) -> UpdateState:
    """The state ``create_update_state`` would build, as ``jax.ShapeDtypeStruct`` leaves with
    their shardings, from abstract (or concrete) policy params: nothing is allocated. Used to
    compile the update step ahead of time (``dgpo_jax.launch.plan``)."""

    def sds(x, sharding):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    policy = jax.tree.map(lambda x: sds(x, x.sharding), policy_params)
    replicated = replicated_sharding_like(policy_params)
    embed = policy_params["embed_tokens"]
    head = jax.tree.map(
        lambda x: sds(x, replicated),
        jax.eval_shape(lambda: init_value_head(embed.shape[1], jax.random.key(0), embed.dtype)),
    )
    params = {"policy": policy}
    if objective.critic == "value_head":
        params["value_head"] = head
    elif objective.critic == "separate":
        params["critic"] = {"trunk": policy, "value_head": head}
    abstract_opt = jax.eval_shape(tx.init, params)
    opt_state = jax.tree.map(sds, abstract_opt, optimizer_state_shardings(params, abstract_opt))
    scalar = sds(jax.ShapeDtypeStruct((), jnp.int32), replicated)
    rng = sds(jax.eval_shape(lambda: jax.random.key(0)), replicated)
    train = TrainState(step=scalar, params=params, opt_state=opt_state, rng=rng)
    return UpdateState(train=train, skipped_steps=scalar)


def _split_micro(x, m: int):
    """``[B, ...] -> [m, B/m, ...]``; micro-batch i holds rows i, i+m, ... (each micro-batch
    keeps rows from every data shard)."""
    b = x.shape[0]
    return jnp.swapaxes(x.reshape((b // m, m) + x.shape[1:]), 0, 1)


def _merge_micro(x):
    m, bm = x.shape[:2]
    return jnp.swapaxes(x, 0, 1).reshape((m * bm,) + x.shape[2:])


def _response_region(attention_mask, loss_mask):
    """Real tokens from the first student token on (observations included): the reference
    code's mask for GAE / whitening / the critic loss (``reference_quirk``)."""
    return attention_mask * (jnp.cumsum(loss_mask, axis=1) > 0).astype(f32)


class UpdateStep:
    """The compiled update for one objective. Call as ``step(state, batch, teacher_params=None)``
    -> ``(new_state, metrics)``; see ``dgpo_jax.objectives.batch`` for the batch fields."""

    def __init__(
        self,
        objective: ObjectiveConfig,
        student_config: Qwen2Config,
        teacher_config: Qwen2Config | None = None,
        critic_config: Qwen2Config | None = None,
        optimizer: OptimConfig | optax.GradientTransformation | None = None,
        micro_batches: int = 1,
        plan=None,
        donate: bool = True,
        compiler_options: dict | None = None,
    ):
        if not isinstance(objective, ObjectiveConfig):
            raise TypeError(f"objective must be an ObjectiveConfig, got {type(objective).__name__}")
        if micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
        if objective.needs_teacher_logits and teacher_config is None:
            raise ValueError(
                f"objective {objective.name!r} needs full-vocabulary teacher logits "
                f"(divergence={objective.divergence!r}, teacher_token_loss="
                f"{objective.teacher_token_loss!r}): pass teacher_config and call the "
                "step with teacher_params"
            )
        if teacher_config is not None and teacher_config.vocab_size != student_config.vocab_size:
            raise ValueError(
                f"teacher vocab_size {teacher_config.vocab_size} != student vocab_size "
                f"{student_config.vocab_size}"
            )
        self.objective = objective
        self.student_config = student_config
        self.teacher_config = teacher_config
        self.critic_config = critic_config or student_config
        self.micro_batches = micro_batches
        self.plan = plan
        optimizer = OptimConfig() if optimizer is None else optimizer
        self.tx = make_optimizer(optimizer) if isinstance(optimizer, OptimConfig) else optimizer
        self._donate = (0,) if donate else ()
        self._compiler_options = compiler_options
        self._jitted = None
        self._jitted_loss = None
        self._jitted_prepare = None

    # --- public -------------------------------------------------------------------------------
    def __call__(self, state: UpdateState, batch: Mapping[str, Any], teacher_params=None):
        batch = self.prepare_batch(batch, teacher_params)
        if self.teacher_config is None:
            teacher_params = None
        return self._compiled(state)(state, batch, teacher_params)

    def loss(self, state: UpdateState, batch: Mapping[str, Any], teacher_params=None) -> dict:
        """The objective's loss on ``batch`` at ``state``'s parameters, without an update: a
        validation loss (DistiLLM's adaptive student-data share reads it). The same program
        pieces as the step, so it equals the ``loss`` metric the step reports for the same
        batch and parameters. Returns {"loss", "num_tokens", and "divergence" /
        "policy_loss" / "kl_loss" where the objective has them} as device scalars."""
        batch = self.prepare_batch(batch, teacher_params)
        if self.teacher_config is None:
            teacher_params = None
        if self._jitted_loss is None:
            self._jitted_loss = jax.jit(self._loss_only)
        return self._jitted_loss(state, batch, teacher_params)

    def prepare_rollout(
        self, state: UpdateState, batch: Mapping[str, Any], teacher_params=None, micro_batches=1
    ) -> tuple[dict, dict]:
        """The reference's order for one RL step (veRL's ``ray_trainer.fit``): critic values,
        teacher log-probs, token rewards, GAE/GRPO advantages and whitening over the *whole*
        rollout batch at the pre-update parameters, before the PPO mini-batches. Returns
        (``batch`` plus ``advantages``, ``policy_gate``, and for GAE ``returns`` and ``values``
        (the value-clip anchor); the step then uses them as they are, mini-batch after
        mini-batch) and the whole-batch metrics. ``micro_batches`` splits the no-gradient pass
        over the whole batch (keep its rows per micro-batch those of the update). Objectives
        without whole-batch advantages get the batch back unchanged."""
        cfg = self.objective
        if not (cfg.uses_policy and cfg.global_advantage):
            return dict(batch), {}
        placed = self.prepare_batch(batch, teacher_params, micro_batches)
        if self.teacher_config is None:
            teacher_params = None
        if self._jitted_prepare is None:
            self._jitted_prepare = jax.jit(self._prepare, static_argnames=("micro",))
        out, metrics = self._jitted_prepare(state, placed, teacher_params, micro=micro_batches)
        return dict(batch, **out), metrics

    def prepare_batch(self, batch, teacher_params=None, micro_batches=None) -> dict:
        """Validation (before any compilation) and placement."""
        in_program = self.teacher_config is not None
        if in_program and teacher_params is None:
            raise ValueError("this update step was built with teacher_config: pass teacher_params")
        micro = self.micro_batches if micro_batches is None else micro_batches
        batch = validate_batch(batch, self.objective, in_program, micro)
        if self.plan is None:
            return {k: jnp.asarray(v) for k, v in batch.items()}
        # Host arrays go straight to the mesh (with several processes each sends its shards).
        host = {k: v if isinstance(v, jax.Array) else np.asarray(v) for k, v in batch.items()}
        replicated = self.plan.sharding(())
        scalars = {k: device_put_global(v, replicated) for k, v in host.items() if v.ndim == 0}
        return dict(self.plan.shard_batch({k: v for k, v in host.items() if v.ndim}), **scalars)

    def _compiled(self, state):
        if self._jitted is None:
            kwargs = {}
            if self.plan is not None:
                shardings = jax.tree.map(lambda x: x.sharding, state)
                kwargs["out_shardings"] = (shardings, None)
            if self._compiler_options:
                kwargs["compiler_options"] = dict(self._compiler_options)
            self._jitted = jax.jit(self._step, donate_argnums=self._donate, **kwargs)
        return self._jitted

    # --- helpers inside the program -----------------------------------------------------------
    def _hidden(self, config, params, ids, attention_mask):
        return forward_hidden(config, params, ids, attention_mask, self.plan)

    def _token_logprobs(self, config, params, ids, attention_mask):
        h = self._hidden(config, params, ids, attention_mask)
        return chunked_token_stats(
            lambda x: lm_logits(config, params, x), h, ids, chunk=self.objective.seq_chunk
        )["logp"]

    def _prepass(
        self, params, teacher_params, ids, am, want_teacher: bool, want_values: bool, micro=None
    ):
        """No-gradient pass over micro-batches: teacher log-probs and/or critic values [B, T]."""
        m = self.micro_batches if micro is None else micro
        cfg = self.objective

        def one(x):
            ids_mb, am_mb = x
            out = {}
            if want_teacher:
                out["teacher_logp"] = self._token_logprobs(
                    self.teacher_config, teacher_params, ids_mb, am_mb
                )
            if want_values:
                h = (
                    self._hidden(self.student_config, params["policy"], ids_mb, am_mb)
                    if cfg.critic == "value_head"
                    else None
                )
                out["values"] = critic_values(
                    cfg.critic, params, self.critic_config, ids_mb, am_mb, h, self.plan
                )
            return out

        out = jax.lax.map(one, (_split_micro(ids, m), _split_micro(am, m)))
        return jax.tree.map(lambda x: jax.lax.stop_gradient(_merge_micro(x)), out)

    def _advantages(self, cfg, tok_r, values, loss_mask, crit_mask, rewards, group_ids):
        """Whole-batch advantages (and returns for GAE)."""
        returns = None
        if cfg.advantage == "gae":
            adv, returns = adv_lib.gae_advantages(
                tok_r, values, crit_mask, cfg.gamma, cfg.gae_lambda
            )
            white_mask = crit_mask
        elif cfg.advantage == "grpo":
            adv = adv_lib.grpo_advantages(
                rewards,
                group_ids,
                loss_mask,
                cfg.grpo_eps,
                cfg.grpo_std_ddof,
                cfg.grpo_scale_by_std,
            )
            white_mask = loss_mask
        elif cfg.advantage == "rtg":
            adv = adv_lib.reward_to_go_advantages(
                tok_r, loss_mask, cfg.gamma, cfg.rtg_length_normalize
            )
            white_mask = loss_mask
        else:
            adv = adv_lib.immediate_advantages(tok_r, loss_mask)
            white_mask = loss_mask
        if cfg.whiten_advantages:
            adv = adv_lib.masked_whiten(adv, white_mask, cfg.whiten_shift_mean)
        return adv, returns

    # --- the program --------------------------------------------------------------------------
    def _rows(self, state: UpdateState, batch: dict, teacher_params, micro=None):
        """Steps 1-2 of the update: the pre-pass and the whole-batch quantities (gates,
        denominators, advantages) that every micro-batch's loss reads. Advantages (and returns,
        old values, the policy token gate) given in the batch by ``prepare_rollout`` are used
        as they are."""
        cfg = self.objective
        params = state.train.params
        ids = batch["input_ids"].astype(jnp.int32)
        am = batch["attention_mask"].astype(f32)
        lm = batch["loss_mask"].astype(f32) * am
        b, t = ids.shape
        crit_mask = _response_region(am, lm) if cfg.reference_quirk else lm
        rewards = batch["rewards"].astype(f32) if "rewards" in batch else None
        teacher_lp = batch.get("teacher_logprobs")
        ref_lp = batch.get("ref_logprobs")
        old_lp = batch.get("old_logprobs")
        values = batch.get("values")
        prepared = "advantages" in batch

        # 1. pre-pass (no gradient)
        want_teacher = (
            cfg.global_advantage
            and not prepared
            and teacher_lp is None
            and (
                cfg.token_reward_needs_teacher
                or (cfg.uses_token_reward and cfg.trust_threshold is not None)
            )
        )
        want_values = cfg.critic != "none" and values is None
        if want_teacher or want_values:
            pre = self._prepass(params, teacher_params, ids, am, want_teacher, want_values, micro)
            teacher_lp = pre.get("teacher_logp", teacher_lp)
            values = pre.get("values", values)

        # 2. whole-batch quantities
        gate = trajectory_gate(cfg, rewards, b)
        has_tokens = (jnp.sum(lm, axis=1) > 0).astype(f32)
        if cfg.loss_aggregation == "token_mean":
            tok_w, den_s = lm, jnp.maximum(jnp.sum(lm), 1.0)
        else:
            tok_w = lm / jnp.maximum(jnp.sum(lm, axis=1, keepdims=True), 1.0)
            den_s = jnp.maximum(jnp.sum(has_tokens), 1.0)
        n_tok = jnp.maximum(jnp.sum(lm), 1.0)
        tmask = batch["teacher_mask"].astype(f32) * am if "teacher_mask" in batch else None
        den_t = jnp.maximum(jnp.sum(tmask), 1.0) if tmask is not None else None
        den_v = jnp.maximum(jnp.sum(crit_mask), 1.0)

        per_row = {
            "ids": ids,
            "am": am,
            "lm": lm,
            "tok_w": tok_w,
            "crit_mask": crit_mask,
            "gate": gate,
        }
        for k in ("old_logprobs", "ref_logprobs", "sampler_logprobs"):
            if k in batch:
                per_row[k] = batch[k].astype(f32)
        if teacher_lp is not None:
            per_row["teacher_logprobs"] = teacher_lp.astype(f32)
        if rewards is not None:
            per_row["rewards"] = rewards
        if tmask is not None:
            per_row["tmask"] = tmask
        metrics_pre = {
            "gate_share": jnp.sum(gate * has_tokens) / jnp.maximum(jnp.sum(has_tokens), 1)
        }
        if cfg.uses_policy and cfg.global_advantage and prepared:
            per_row.update(adv=batch["advantages"].astype(f32), pgate=batch["policy_gate"])
            if "returns" in batch:
                per_row.update(returns=batch["returns"].astype(f32), old_values=values.astype(f32))
        elif cfg.uses_policy and cfg.global_advantage:
            tok_r, pgate = token_rewards(
                cfg,
                lm,
                rewards,
                gate,
                old_lp.astype(f32),
                None if teacher_lp is None else teacher_lp.astype(f32),
                None if ref_lp is None else ref_lp.astype(f32),
            )
            adv, returns = self._advantages(
                cfg,
                tok_r,
                None if values is None else values.astype(f32),
                lm,
                crit_mask,
                rewards,
                batch.get("group_ids"),
            )
            per_row.update(adv=adv, pgate=pgate)
            metrics_pre["token_reward_mean"] = jnp.sum(tok_r * lm) / n_tok
            metrics_pre["advantage_mean"] = jnp.sum(adv * lm) / n_tok
            if returns is not None:
                per_row.update(returns=returns, old_values=values.astype(f32))
        taid_t = batch["taid_t"].astype(f32) if "taid_t" in batch else None
        dens = {"s": den_s, "t": den_t, "v": den_v}
        return params, per_row, dens, n_tok, taid_t, metrics_pre

    def _step(self, state: UpdateState, batch: dict, teacher_params):
        m = self.micro_batches
        params, per_row, dens, n_tok, taid_t, metrics_pre = self._rows(state, batch, teacher_params)

        # 3. gradient pass over micro-batches
        def mb_loss(p, mb):
            return self._micro_loss(p, teacher_params, mb, dens, taid_t)

        grad_fn = jax.value_and_grad(mb_loss, has_aux=True)
        if m == 1:
            (_, sums), grads = grad_fn(params, per_row)
            grads = jax.tree.map(lambda g: g.astype(f32), grads)
        else:
            mbs = jax.tree.map(lambda x: _split_micro(x, m), per_row)
            zero_grads = jax.tree.map(lambda x: jnp.zeros(x.shape, f32), params)
            zero_sums = jax.tree.map(
                lambda s: jnp.zeros(s.shape, f32),
                jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], mbs))[0][1]),
            )

            def body(carry, mb):
                g_acc, s_acc = carry
                (_, sums), grads = grad_fn(params, mb)
                g_acc = jax.tree.map(lambda a, g: a + g.astype(f32), g_acc, grads)
                s_acc = jax.tree.map(jnp.add, s_acc, sums)
                return (g_acc, s_acc), None

            (grads, sums), _ = jax.lax.scan(body, (zero_grads, zero_sums), mbs)

        # 4. guard + update
        loss = sums["loss"]
        finite = jnp.isfinite(loss)
        for g in jax.tree.leaves(grads):
            finite = finite & jnp.all(jnp.isfinite(g))
        grads_p = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
        updates, new_opt = self.tx.update(grads_p, state.train.opt_state, params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, c: jnp.where(finite, a, c), new, old)
        train = state.train.replace(
            step=jnp.where(finite, state.train.step + 1, state.train.step),
            params=keep(new_params, params),
            opt_state=keep(new_opt, state.train.opt_state),
        )
        skipped = state.skipped_steps + (~finite).astype(jnp.int32)
        new_state = UpdateState(train=train, skipped_steps=skipped)

        metrics = self._metrics(sums, dens, n_tok, grads, finite, skipped, metrics_pre)
        return new_state, metrics

    def _prepare(self, state: UpdateState, batch: dict, teacher_params, micro: int):
        """The whole rollout batch's advantages (whitened over the batch), returns, pre-update
        critic values and teacher log-probs, computed once before any mini-batch update."""
        _, per_row, _, _, _, metrics = self._rows(state, batch, teacher_params, micro)
        out = {"advantages": per_row["adv"], "policy_gate": per_row["pgate"]}
        if "returns" in per_row:
            out.update(returns=per_row["returns"], values=per_row["old_values"])
        if "teacher_logprobs" in per_row and "teacher_logprobs" not in batch:
            out["teacher_logprobs"] = per_row["teacher_logprobs"]
        return out, metrics

    def _loss_only(self, state: UpdateState, batch: dict, teacher_params):
        params, per_row, dens, n_tok, taid_t, _ = self._rows(state, batch, teacher_params)
        m = self.micro_batches
        if m == 1:
            _, sums = self._micro_loss(params, teacher_params, per_row, dens, taid_t)
        else:

            def body(acc, mb):
                _, sums = self._micro_loss(params, teacher_params, mb, dens, taid_t)
                return jax.tree.map(jnp.add, acc, sums), None

            mbs = jax.tree.map(lambda x: _split_micro(x, m), per_row)
            first = jax.eval_shape(
                lambda: self._micro_loss(
                    params, teacher_params, jax.tree.map(lambda x: x[0], mbs), dens, taid_t
                )[1]
            )
            sums, _ = jax.lax.scan(
                body, jax.tree.map(lambda x: jnp.zeros(x.shape, f32), first), mbs
            )
        out = {"loss": sums["loss"], "num_tokens": n_tok}
        for k in ("policy_loss", "kl_loss", "divergence"):
            if k in sums:
                out[k] = sums[k] / dens["s"]
        return out

    def _micro_loss(self, params, teacher_params, mb, dens, taid_t):
        """Loss of one micro-batch (every mean divided by the whole batch's denominator) and the
        metric numerators."""
        cfg = self.objective
        sc = self.student_config
        ids, am, lm, tok_w, gate = mb["ids"], mb["am"], mb["lm"], mb["tok_w"], mb["gate"]
        sp = params["policy"]
        h = self._hidden(sc, sp, ids, am)

        lp_missing = self.teacher_config is not None and "teacher_logprobs" not in mb
        need_teacher_fwd = cfg.needs_teacher_logits or (
            lp_missing and (cfg.needs_teacher_logp or cfg.trust_threshold is not None)
        )
        need_teacher_lp = need_teacher_fwd and lp_missing  # also feeds the kl_k* metrics
        divs = {}
        if cfg.student_divergence_spec() is not None:
            divs["div"] = cfg.student_divergence_spec()
        if cfg.teacher_token_divergence_spec() is not None:
            divs["tdiv"] = cfg.teacher_token_divergence_spec()
        th = tp = None
        if need_teacher_fwd:
            tp = jax.lax.stop_gradient(teacher_params)
            th = jax.lax.stop_gradient(self._hidden(self.teacher_config, tp, ids, am))
        stats = chunked_token_stats(
            lambda x: lm_logits(sc, sp, x),
            h,
            ids,
            teacher_logits_fn=(
                (lambda x: lm_logits(self.teacher_config, tp, x)) if th is not None else None
            ),
            teacher_hidden=th,
            want_entropy=True,
            want_teacher_logp=need_teacher_lp,
            divergences=divs,
            t_interp=taid_t,
            chunk=cfg.seq_chunk,
        )
        logp = stats["logp"]
        entropy = stats["entropy"] if cfg.entropy_coef else jax.lax.stop_gradient(stats["entropy"])
        l_t = mb.get("teacher_logprobs", stats.get("teacher_logp"))
        l_ref = mb.get("ref_logprobs")
        old = mb.get("old_logprobs")
        zeros = jnp.zeros_like(lm)
        sums = {}

        # policy term
        pg = clipped = zeros
        pgate = lm
        if cfg.uses_policy:
            if cfg.global_advantage:
                adv, pgate = mb["adv"], mb["pgate"]
            else:
                l_s = old if cfg.reward_logprob_source == "old" else jax.lax.stop_gradient(logp)
                tok_r, pgate = token_rewards(cfg, lm, mb.get("rewards"), gate, l_s, l_t, l_ref)
                adv = adv_lib.immediate_advantages(tok_r, lm)
            if cfg.policy_loss == "ppo_clip":
                pg, clipped = ppo_clip_loss(
                    logp, old, adv, cfg.clip_low, cfg.clip_high, cfg.dual_clip, cfg.log_ratio_clamp
                )
            elif cfg.policy_loss == "is":
                pg = importance_sampling_loss(logp, old, adv, cfg.log_ratio_clamp)
            else:
                pg = reinforce_loss(logp, adv)
            if cfg.tis_threshold is not None:
                pg = pg * truncated_is_weight(
                    old, mb["sampler_logprobs"], cfg.tis_threshold, cfg.log_ratio_clamp
                )
            pg = pg * pgate
            sums["clip_frac"] = jnp.sum(clipped * lm)
            sums["approx_kl_old"] = jnp.sum(
                kl_estimate(logp, old, "k3", "reverse", cfg.log_ratio_clamp) * lm
            )
            sums["advantage_abs"] = jnp.sum(jnp.abs(adv) * lm)
        student_term = pg
        sums["policy_loss"] = jnp.sum(pg * tok_w)

        # KL in the loss (gated by u(tau))
        if cfg.kl_loss_coef:
            target = l_t if cfg.kl_loss_target == "teacher" else l_ref
            kl = (
                kl_estimate(
                    logp, target, cfg.kl_loss_estimator, cfg.kl_loss_direction, cfg.log_ratio_clamp
                )
                * gate[:, None]
            )
            student_term = student_term + cfg.kl_loss_coef * kl
            sums["kl_loss"] = jnp.sum(kl * tok_w)

        # entropy bonus
        if cfg.entropy_coef:
            student_term = student_term - cfg.entropy_coef * entropy
        sums["entropy"] = jnp.sum(jax.lax.stop_gradient(entropy) * lm)

        # divergence on student tokens
        if cfg.divergence != "none":
            div = -logp if cfg.divergence == "nll" else stats["div"]
            if cfg.trust_threshold is not None and cfg.outlier_handling == "divergence":
                div = div * (1.0 - pgate)
            if cfg.divergence_gate == "trajectory":
                div = div * gate[:, None]
            student_term = student_term + cfg.divergence_coef * div
            sums["divergence"] = jnp.sum(div * tok_w)
        loss = jnp.sum(student_term * tok_w) / dens["s"]

        if cfg.trust_threshold is not None:
            sums["trust_share"] = jnp.sum(pgate * lm)

        # teacher tokens (Guided-OPD teacher turns, TrOPD prefixes)
        if cfg.teacher_token_loss != "none":
            ttl = -logp if cfg.teacher_token_loss == "sft" else stats["tdiv"]
            sums["teacher_token_loss"] = jnp.sum(ttl * mb["tmask"])
            loss = loss + cfg.teacher_token_coef * sums["teacher_token_loss"] / dens["t"]

        # critic
        if cfg.critic != "none" and cfg.uses_policy:
            crit_mask = mb["crit_mask"]
            v_new = critic_values(cfg.critic, params, self.critic_config, ids, am, h, self.plan)
            vl = value_loss(v_new, mb["old_values"], mb["returns"], cfg.value_clip)
            sums["value_loss"] = jnp.sum(vl * crit_mask)
            loss = loss + cfg.value_coef * sums["value_loss"] / dens["v"]
            ret, err = mb["returns"], mb["returns"] - jax.lax.stop_gradient(v_new)
            sums.update(
                ev_n=jnp.sum(crit_mask),
                ev_r=jnp.sum(ret * crit_mask),
                ev_r2=jnp.sum(ret * ret * crit_mask),
                ev_e=jnp.sum(err * crit_mask),
                ev_e2=jnp.sum(err * err * crit_mask),
            )

        # KL of the current student to the teacher (else the reference), each estimator
        kl_target = l_t if l_t is not None else l_ref
        if kl_target is not None:
            for est in ("k1", "k2", "k3"):
                sums[f"kl_{est}"] = jnp.sum(
                    jax.lax.stop_gradient(
                        kl_estimate(logp, kl_target, est, "reverse", cfg.log_ratio_clamp)
                    )
                    * lm
                )
        sums["loss"] = loss
        return loss, jax.tree.map(lambda x: jax.lax.stop_gradient(x).astype(f32), sums)

    def _metrics(self, sums, dens, n_tok, grads, finite, skipped, metrics_pre):
        out = dict(metrics_pre)
        out["loss"] = sums["loss"]
        for k in ("policy_loss", "kl_loss", "divergence"):
            if k in sums:
                out[k] = sums[k] / dens["s"]
        for k in (
            "clip_frac",
            "approx_kl_old",
            "entropy",
            "trust_share",
            "kl_k1",
            "kl_k2",
            "kl_k3",
            "advantage_abs",
        ):
            if k in sums:
                out[k] = sums[k] / n_tok
        if "teacher_token_loss" in sums:
            out["teacher_token_loss"] = sums["teacher_token_loss"] / dens["t"]
        if "value_loss" in sums:
            out["value_loss"] = sums["value_loss"] / dens["v"]
            n = jnp.maximum(sums["ev_n"], 1.0)
            var_r = sums["ev_r2"] / n - jnp.square(sums["ev_r"] / n)
            var_e = sums["ev_e2"] / n - jnp.square(sums["ev_e"] / n)
            out["explained_variance"] = 1.0 - var_e / jnp.maximum(var_r, 1e-8)
        out["grad_norm_policy"] = optax.tree.norm(grads["policy"])
        critic_grads = {k: v for k, v in grads.items() if k != "policy"}
        if critic_grads:
            out["grad_norm_critic"] = optax.tree.norm(critic_grads)
        out["grad_norm"] = optax.tree.norm(grads)
        out["skipped"] = (~finite).astype(f32)
        out["skipped_steps"] = skipped
        out["num_tokens"] = n_tok
        return out


def make_update_step(
    objective: ObjectiveConfig,
    student_config: Qwen2Config,
    teacher_config: Qwen2Config | None = None,
    *,
    critic_config: Qwen2Config | None = None,
    optimizer: OptimConfig | optax.GradientTransformation | None = None,
    micro_batches: int = 1,
    plan=None,
    donate: bool = True,
    compiler_options: dict | None = None,
) -> UpdateStep:
    """Builds the fused update step for ``objective`` (see the module docstring).

    Args:
      objective: an ``ObjectiveConfig`` (e.g. ``get_objective("dgpo")``); its ``critic`` knob
        selects a value head on the student trunk or a separate critic model.
      student_config / teacher_config: model configs; with ``teacher_config`` the teacher forward
        runs in the program (no gradient) and the step takes ``teacher_params``.
      critic_config: the separate critic's trunk config (default: the student's).
      optimizer: ``OptimConfig`` (AdamW + clipping + schedules) or any optax transformation
        matching ``state.train.opt_state``.
      micro_batches: gradient accumulation inside the program (B must be divisible).
      plan: a ``ShardingPlan`` (batch placement; the state keeps its shardings).
      donate: donate the input state's buffers.
      compiler_options: XLA options for this program (the tests lower the CPU optimisation
        level to compile faster).
    """
    return UpdateStep(
        objective,
        student_config,
        teacher_config,
        critic_config,
        optimizer,
        micro_batches,
        plan,
        donate,
        compiler_options,
    )
