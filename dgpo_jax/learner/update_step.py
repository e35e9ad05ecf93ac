"""The fused update step: one compiled program per objective config.

``make_update_step(objective, student_config, ...)`` returns an ``UpdateStep``; calling it with
``(state, batch[, teacher_params])`` runs, inside one compiled program:

1. (only when needed) a no-gradient pre-pass over micro-batches: in-program teacher log-probs
   for whole-batch advantages (DGPO with GAE) and the critic's values when the batch has none;
2. the prepared batch (``dgpo_jax.learner.prepared``): per-trajectory quantities put on their
   trajectory's tokens (the DGPO gate u(tau), the outcome reward on the last student token,
   sequence-mean weights), denominators, and whole-batch advantages (GAE / GRPO /
   reward-to-go / whitening), all before the micro-batch split;
3. one micro-batch accumulator (``lax.scan``): student forward -> chunked log-probs, entropy
   and divergences (teacher forward without gradient when the objective needs teacher
   logits), critic values, then the loss terms (``dgpo_jax.learner.loss_terms``: policy, KL,
   entropy, divergence, teacher-token, critic) and, for the step, the gradient, accumulated in
   float32. The loss-only path (``UpdateStep.loss``) runs the same accumulator without
   gradients. Every mean's denominator belongs to the whole batch, so the micro-batched loss
   and gradient equal the full-batch ones exactly;
4. a non-finite guard: a step whose loss or gradient is not finite changes nothing but the
   ``skipped_steps`` counter; otherwise the optax update.

``on_policy=True`` (one update per rollout batch, one micro-batch: the quickstart's RL stages)
fuses the behaviour pass into the update: the batch carries no ``old_logprobs``; the step's own
forward at the current parameters gives them and the critic's old values (stop-gradient), and
the whole-batch advantages of step 2 are computed from those inside the differentiated
function, before the loss terms. The same numbers as separate passes at these parameters
(the PPO ratio is 1), with one student forward and one critic forward fewer per step.

``row_groups`` (a call argument, static: one program per grouping) runs the model passes of a
one-micro-batch step over groups of rows, each cut to its own width: rows sorted by length
(``dgpo_jax.learner.batches.length_groups``) leave the short rows' padding out of the passes.
The per-token outputs are padded back to the batch's width before the loss, so the step is
the ungrouped one (the same numbers up to rounding).

Batches may pack several trajectories per row (``segment_ids``, ``traj_index``: see
``dgpo_jax.objectives.batch``); every per-trajectory quantity is computed per trajectory, so a
packed batch gives the padded batch's loss and gradients.

Mixed precision: with ``compute_dtype`` (e.g. bfloat16) the trainable params in the state are
the float32 masters; the program casts the policy and critic trunks to ``compute_dtype`` once
per step (value heads stay float32: they are read in float32), differentiates the loss with
respect to that copy, accumulates the gradient in float32 and applies the optimizer to the
masters (moments float32). The cast's gradient is the cast of the copy's gradient, so this
equals differentiating through the cast.

The state is donated; with a ``plan`` the batch is placed by the plan and the new state keeps
the input state's shardings. ``UpdateStep.compile`` compiles the step ahead of time from
concrete or abstract arguments; calls with the same shapes, dtypes and shardings run that
compiled program.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dgpo_jax.learner import loss_terms
from dgpo_jax.learner.batches import RowGroups
from dgpo_jax.learner.optim import OptimConfig, make_optimizer
from dgpo_jax.learner.prepared import (
    Denominators,
    PreparedBatch,
    TokenRows,
    merge_micro,
    split_micro,
)
from dgpo_jax.learner.scoring import if_any_token
from dgpo_jax.learner.train_state import (
    TrainState,
    create_train_state,
    optimizer_state_shardings,
    replicated_sharding_like,
)
from dgpo_jax.models import Qwen2Config, cast_params, forward_hidden, lm_logits
from dgpo_jax.objectives import advantages as adv_lib
from dgpo_jax.objectives.batch import (
    abstract_batch,
    field_dtype,
    field_sharding,
    validate_batch,
)
from dgpo_jax.objectives.config import ObjectiveConfig
from dgpo_jax.objectives.critic import critic_values, init_critic, init_value_head
from dgpo_jax.objectives.divergences import chunked_token_stats
from dgpo_jax.objectives.rewards import token_rewards, trajectory_gate
from dgpo_jax.objectives.trajectories import Trajectories
from dgpo_jax.parallel.distributed import device_put_global, tree_device_put_global

f32 = jnp.float32
_split_micro, _merge_micro = split_micro, merge_micro  # the names older code imports


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
    *,
    param_dtype=None,
) -> UpdateState:
    """Initial state. A missing critic is built: a fresh value head (``value_head``) or a copy of
    the student trunk plus a value head (``separate``, as DGPO initialises its critic), in the
    policy params' dtype. ``param_dtype`` (e.g. float32): the master dtype the trained params
    (and so the optimizer moments) are held in; the given policy / critic params are cast to it
    (None: kept as given)."""
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    elif not jax.dtypes.issubdtype(jnp.asarray(rng).dtype, jax.dtypes.prng_key):
        rng = jax.random.wrap_key_data(jnp.asarray(rng, jnp.uint32))
    if param_dtype is not None:
        policy_params = cast_params(policy_params, param_dtype)
        if critic_params is not None:
            critic_params = cast_params(critic_params, param_dtype)
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
    objective: ObjectiveConfig, policy_params, tx: optax.GradientTransformation, param_dtype=None
) -> UpdateState:
    """The state ``create_update_state`` would build, as ``jax.ShapeDtypeStruct`` leaves with
    their shardings, from abstract (or concrete) policy params: nothing is allocated. Used to
    compile the update step ahead of time (``UpdateStep.compile``, ``dgpo_jax.launch.plan``).
    ``param_dtype``: the master dtype of the trained params (e.g. float32 when the policy params
    are given in the bfloat16 compute dtype); None keeps the policy params' dtype."""

    def sds(x, sharding):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    policy = jax.tree.map(lambda x: sds(x, getattr(x, "sharding", None)), policy_params)
    if param_dtype is not None:
        policy = cast_params(policy, param_dtype)
    replicated = replicated_sharding_like(policy_params)
    embed = policy["embed_tokens"]
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


def _response_region(attention_mask, loss_mask, trajectories=None):
    """Real tokens from the (trajectory's) first student token on (observations included): the
    reference code's mask for GAE / whitening / the critic loss (``reference_quirk``)."""
    if trajectories is not None:
        return attention_mask * trajectories.from_first(loss_mask)
    return attention_mask * (jnp.cumsum(loss_mask, axis=1) > 0).astype(f32)


# --- ahead-of-time programs -------------------------------------------------------------------
def _default_sharding():
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _signature(args):
    """(tree structure, per leaf (shape, dtype, weak type, sharding)) of a call's arguments."""
    leaves, treedef = jax.tree.flatten(args)
    return treedef, tuple(
        (
            tuple(x.shape),
            x.dtype,
            bool(getattr(x, "weak_type", False)),
            getattr(x, "sharding", None) or _default_sharding(),
        )
        for x in leaves
    )


def _same_signature(a, b) -> bool:
    (tree_a, leaves_a), (tree_b, leaves_b) = a, b
    if tree_a != tree_b or len(leaves_a) != len(leaves_b):
        return False
    for (shape, dtype, weak, sh_a), (shape_b, dtype_b, weak_b, sh_b) in zip(leaves_a, leaves_b):
        if shape != shape_b or dtype != dtype_b or weak != weak_b:
            return False
        if sh_a != sh_b and not sh_a.is_equivalent_to(sh_b, len(shape)):
            return False
    return True


def _is_abstract(tree) -> bool:
    return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree))


def _with_default_shardings(tree):
    """Abstract leaves without a sharding go on the default device (as uncommitted arrays)."""
    return jax.tree.map(
        lambda x: (
            jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=_default_sharding())
            if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is None
            else x
        ),
        tree,
    )


def check_row_groups(row_groups, rows: int, width: int) -> RowGroups:
    """``row_groups`` as a tuple of ``(rows, width)`` int pairs covering the batch's ``rows`` in
    order, each width at most the batch's ``width``; ``()`` for None or one group of the whole
    batch. A clear error otherwise."""
    if not row_groups:
        return ()
    try:
        groups = tuple((int(n), int(w)) for n, w in row_groups)
    except (TypeError, ValueError) as e:
        raise ValueError(f"row_groups must be (rows, width) pairs, got {row_groups!r}") from e
    if sum(n for n, _ in groups) != rows or any(n < 1 for n, _ in groups):
        raise ValueError(
            f"row_groups {groups}: row counts must be >= 1 and sum to the batch's {rows} rows"
        )
    if any(not 1 <= w <= width for _, w in groups):
        raise ValueError(f"row_groups {groups}: widths must be in [1, {width}] (the batch's)")
    return () if groups == ((rows, width),) else groups


def by_row_groups(fn, groups: RowGroups, *arrays):
    """``fn(*arrays)`` for ``[B, T, ...]`` arrays (None passes through), run group by group:
    rows ``[lo, lo + n)`` cut to the group's first ``w`` positions; every output leaf (``[n, w,
    ...]``, per token) zero-padded back to ``T`` positions and the groups stacked in row order.
    ``groups=()``: one call on the whole arrays."""
    if not groups:
        return fn(*arrays)
    t = next(a for a in arrays if a is not None).shape[1]
    outs, lo = [], 0
    for n, w in groups:
        part = [None if a is None else a[lo : lo + n, :w] for a in arrays]
        pad = lambda x, w=w: jnp.pad(x, [(0, 0), (0, t - w)] + [(0, 0)] * (x.ndim - 2))
        outs.append(jax.tree.map(pad, fn(*part)))
        lo += n
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *outs)


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
        compute_dtype=None,
        on_policy: bool = False,
    ):
        if not isinstance(objective, ObjectiveConfig):
            raise TypeError(f"objective must be an ObjectiveConfig, got {type(objective).__name__}")
        if micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
        if on_policy and micro_batches != 1:
            raise ValueError(
                f"on_policy=True needs micro_batches=1, got {micro_batches}: the whole-batch "
                "advantages would need every micro-batch's forward before the first loss"
            )
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
        if compute_dtype is not None:
            try:
                compute_dtype = jnp.dtype(compute_dtype)
            except TypeError as e:
                raise ValueError(f"compute_dtype={compute_dtype!r} is not a dtype") from e
            if not jnp.issubdtype(compute_dtype, jnp.floating):
                raise ValueError(f"compute_dtype must be a floating dtype, got {compute_dtype}")
        self.objective = objective
        self.student_config = student_config
        self.teacher_config = teacher_config
        self.critic_config = critic_config or student_config
        self.micro_batches = micro_batches
        # The batch's behaviour log-probs and the critic's old values are this step's own
        # forward (only where the objective has a policy term).
        self.on_policy = bool(on_policy and objective.uses_policy)
        self.plan = plan
        self.compute_dtype = compute_dtype
        self.terms = loss_terms.active_terms(objective)
        optimizer = OptimConfig() if optimizer is None else optimizer
        self.tx = make_optimizer(optimizer) if isinstance(optimizer, OptimConfig) else optimizer
        self._donate = (0,) if donate else ()
        self._compiler_options = compiler_options
        self._jitted = None
        self._jitted_loss = None
        self._jitted_prepare = None
        self._programs: list = []  # (signature, row groups, jax.stages.Compiled) from `compile`

    # --- public -------------------------------------------------------------------------------
    def __call__(
        self,
        state: UpdateState,
        batch: Mapping[str, Any],
        teacher_params=None,
        row_groups: RowGroups | None = None,
    ):
        """``row_groups``: ``((rows, width), ...)`` in row order (see the module docstring;
        ``dgpo_jax.learner.batches.length_groups`` makes them); one micro-batch only."""
        batch = self.prepare_batch(batch, teacher_params)
        groups = self._row_groups(row_groups, batch)
        if self.teacher_config is None:
            teacher_params = None
        args = (state, batch, teacher_params)
        compiled = self._find_program(args, groups)
        if compiled is not None:
            return compiled(*args)
        return self._compiled(state)(*args, row_groups=groups)

    def compile(
        self,
        state: UpdateState,
        batch: Mapping[str, Any],
        teacher_params=None,
        row_groups: RowGroups | None = None,
    ) -> jax.stages.Compiled:
        """Compiles the step ahead of time for these arguments -- concrete, or abstract
        (``jax.ShapeDtypeStruct`` with shardings: ``abstract_update_state``,
        ``self.abstract_batch`` or ``dgpo_jax.objectives.batch.abstract_batch``, abstract
        teacher params) -- and keeps the program: a later call whose arguments have the same
        shapes, dtypes and shardings runs it (no second compile). Returns the
        ``jax.stages.Compiled`` (``memory_analysis()``, ``cost_analysis()``)."""
        in_program = self.teacher_config is not None
        if in_program and teacher_params is None:
            raise ValueError("this update step was built with teacher_config: pass teacher_params")
        if not in_program:
            teacher_params = None
        if _is_abstract(batch):
            batch = self._abstract_batch_arg(batch)
        else:
            batch = self.prepare_batch(batch, teacher_params)
        if self.plan is None:
            state = _with_default_shardings(state)
            teacher_params = _with_default_shardings(teacher_params)
        groups = self._row_groups(row_groups, batch)
        args = (state, batch, teacher_params)
        found = self._find_program(args, groups)
        if found is not None:
            return found
        compiled = self._compiled(state).lower(*args, row_groups=groups).compile()
        self._programs.append((_signature(args), groups, compiled))
        return compiled

    def abstract_batch(
        self,
        rows: int,
        width: int,
        packed: bool = True,
        trajectories: int | None = None,
        fields: tuple[str, ...] = (),
    ) -> dict:
        """This step's batch as ``jax.ShapeDtypeStruct`` leaves placed as ``prepare_batch``
        places them (see ``dgpo_jax.objectives.batch.abstract_batch``), for ``compile``."""
        return abstract_batch(
            self.objective,
            rows,
            width,
            self.teacher_config is not None,
            self.plan,
            packed=packed,
            trajectories=trajectories,
            fields=fields,
            on_policy=self.on_policy,
        )

    def loss(self, state: UpdateState, batch: Mapping[str, Any], teacher_params=None) -> dict:
        """The objective's loss on ``batch`` at ``state``'s parameters, without an update: a
        validation loss (DistiLLM's adaptive student-data share reads it). The same program
        pieces as the step, so it equals the ``loss`` metric the step reports for the same
        batch and parameters. Returns {"loss", "num_tokens", "policy_loss", and "divergence" /
        "kl_loss" where the objective has them} as device scalars."""
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
        without whole-batch advantages get the batch back unchanged. A packed batch gives
        per-token outputs in its packed layout (unpack them with the packing layout)."""
        cfg = self.objective
        if self.on_policy:
            raise ValueError(
                "prepare_rollout is for several updates per rollout batch; this step is "
                "on_policy (one update, which computes the whole-batch quantities itself)"
            )
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
        """Validation (before any compilation), the dtypes the step reads (int32, float32:
        ``field_dtype``) and placement."""
        in_program = self.teacher_config is not None
        if in_program and teacher_params is None:
            raise ValueError("this update step was built with teacher_config: pass teacher_params")
        micro = self.micro_batches if micro_batches is None else micro_batches
        batch = validate_batch(batch, self.objective, in_program, micro, self.on_policy)
        packed = "traj_index" in batch
        out = {}
        for name, x in batch.items():
            dtype = field_dtype(name)
            if not isinstance(x, jax.Array):
                x = np.asarray(x)  # converted on the host: no conversion program to compile
            if x.dtype != dtype:
                x = x.astype(dtype)
            if self.plan is None:
                out[name] = jax.device_put(x)
            else:  # host arrays go straight to the mesh (each process sends its shards)
                out[name] = device_put_global(x, field_sharding(self.plan, name, x.shape, packed))
        return out

    def _abstract_batch_arg(self, batch) -> dict:
        """An abstract batch for ``compile``: validated, in the step's dtypes, placed as
        ``prepare_batch`` places a concrete one where a leaf has no sharding."""
        batch = validate_batch(
            batch,
            self.objective,
            self.teacher_config is not None,
            self.micro_batches,
            self.on_policy,
        )
        packed = "traj_index" in batch
        out = {}
        for name, x in batch.items():
            shape = tuple(x.shape) if hasattr(x, "shape") else np.shape(x)
            sharding = getattr(x, "sharding", None)
            if sharding is None:
                sharding = (
                    _default_sharding()
                    if self.plan is None
                    else field_sharding(self.plan, name, shape, packed)
                )
            out[name] = jax.ShapeDtypeStruct(shape, field_dtype(name), sharding=sharding)
        return out

    def _find_program(self, args, groups: RowGroups = ()):
        if not self._programs:
            return None
        sig = _signature(args)
        for known, known_groups, compiled in self._programs:
            if known_groups == groups and _same_signature(sig, known):
                return compiled
        return None

    def _row_groups(self, row_groups, batch) -> RowGroups:
        rows, width = batch["input_ids"].shape
        groups = check_row_groups(row_groups, rows, width)
        if groups and (self.micro_batches != 1 or "segment_ids" in batch):
            raise ValueError(
                "row_groups need one trajectory per row in one micro-batch (got "
                f"micro_batches={self.micro_batches}"
                + (", a packed batch)" if "segment_ids" in batch else ")")
            )
        return groups

    def _compiled(self, state):
        if self._jitted is None:
            kwargs = {}
            if self.plan is not None:
                shardings = jax.tree.map(lambda x: x.sharding, state)
                kwargs["out_shardings"] = (shardings, None)
            if self._compiler_options:
                kwargs["compiler_options"] = dict(self._compiler_options)
            self._jitted = jax.jit(
                self._step, donate_argnums=self._donate, static_argnames=("row_groups",), **kwargs
            )
        return self._jitted

    # --- pieces of the program -------------------------------------------------------------------
    def _compute_params(self, params):
        """The trained params as the forward passes read them: the policy and critic trunks in
        ``compute_dtype`` (value heads stay as they are: they are applied in float32)."""
        if self.compute_dtype is None:
            return params
        out = dict(params)
        out["policy"] = cast_params(params["policy"], self.compute_dtype)
        if "critic" in params:
            trunk = cast_params(params["critic"]["trunk"], self.compute_dtype)
            out["critic"] = dict(params["critic"], trunk=trunk)
        return out

    def _hidden(self, config, params, ids, attention_mask, segment_ids=None):
        if segment_ids is None:
            return forward_hidden(config, params, ids, attention_mask, self.plan)
        return forward_hidden(
            config, params, ids, attention_mask, self.plan, segment_ids=segment_ids
        )

    def _token_logprobs(self, config, params, ids, attention_mask, segment_ids=None):
        h = self._hidden(config, params, ids, attention_mask, segment_ids)
        return chunked_token_stats(
            lambda x: lm_logits(config, params, x), h, ids, chunk=self.objective.seq_chunk
        )["logp"]

    def _prepass(
        self,
        params,
        teacher_params,
        ids,
        am,
        seg,
        want_teacher: bool,
        want_values: bool,
        micro,
        groups: RowGroups = (),
    ):
        """No-gradient pass over micro-batches (or, with ``groups``, over the row groups of the
        one micro-batch): teacher log-probs and/or critic values [B, T]."""
        m = self.micro_batches if micro is None else micro
        cfg = self.objective

        def one(x):
            ids_mb, am_mb, *seg_mb = x
            seg_mb = seg_mb[0] if seg_mb else None
            out = {}
            if want_teacher:
                out["teacher_logp"] = self._token_logprobs(
                    self.teacher_config, teacher_params, ids_mb, am_mb, seg_mb
                )
            if want_values:
                h = (
                    self._hidden(self.student_config, params["policy"], ids_mb, am_mb, seg_mb)
                    if cfg.critic == "value_head"
                    else None
                )
                out["values"] = critic_values(
                    cfg.critic, params, self.critic_config, ids_mb, am_mb, h, self.plan, seg_mb
                )
            return out

        if groups:
            out = by_row_groups(lambda i, a: one((i, a)), groups, ids, am)
            return jax.tree.map(jax.lax.stop_gradient, out)
        xs = (ids, am) + (() if seg is None else (seg,))
        out = jax.lax.map(
            lambda x: if_any_token(x[1], one, x), tuple(split_micro(x, m) for x in xs)
        )
        return jax.tree.map(lambda x: jax.lax.stop_gradient(merge_micro(x)), out)

    def _advantages(self, cfg, tok_r, values, loss_mask, crit_mask, rewards, group_ids, traj):
        """Whole-batch advantages (and returns for GAE), per trajectory."""
        returns = None
        if cfg.advantage == "gae":
            adv, returns = adv_lib.gae_advantages(
                tok_r, values, crit_mask, cfg.gamma, cfg.gae_lambda, trajectories=traj
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
                trajectories=traj,
            )
            white_mask = loss_mask
        elif cfg.advantage == "rtg":
            adv = adv_lib.reward_to_go_advantages(
                tok_r, loss_mask, cfg.gamma, cfg.rtg_length_normalize, trajectories=traj
            )
            white_mask = loss_mask
        else:
            adv = adv_lib.immediate_advantages(tok_r, loss_mask)
            white_mask = loss_mask
        if cfg.whiten_advantages:  # over tokens: the same for any row layout
            adv = adv_lib.masked_whiten(adv, white_mask, cfg.whiten_shift_mean)
        return adv, returns

    # --- the program --------------------------------------------------------------------------
    def _prepared(
        self, params, batch: dict, teacher_params, micro=None, groups: RowGroups = ()
    ) -> PreparedBatch:
        """Steps 1-2 of the update: the pre-pass and the whole-batch quantities (gates,
        denominators, advantages) that every micro-batch's loss reads, per token. Advantages
        (and returns, old values, the policy token gate) given in the batch by
        ``prepare_rollout`` are used as they are."""
        cfg = self.objective
        ids = batch["input_ids"].astype(jnp.int32)
        am = batch["attention_mask"].astype(f32)
        lm = batch["loss_mask"].astype(f32) * am
        seg = batch.get("segment_ids")
        traj = Trajectories.of_batch(am, seg, batch.get("traj_index"))
        seg = None if seg is None else traj.segments
        crit_mask = _response_region(am, lm, traj) if cfg.reference_quirk else lm
        rewards = batch["rewards"].astype(f32) if "rewards" in batch else None
        teacher_lp = batch.get("teacher_logprobs")
        values = batch.get("values")
        given = "advantages" in batch

        # 1. pre-pass (no gradient)
        want_teacher = (
            cfg.global_advantage
            and not given
            and teacher_lp is None
            and (
                cfg.token_reward_needs_teacher
                or (cfg.uses_token_reward and cfg.trust_threshold is not None)
            )
        )
        # An on-policy step's critic values come from its own forward (the loss's).
        want_values = cfg.critic != "none" and values is None and not self.on_policy
        if want_teacher or want_values:
            pre = self._prepass(
                params, teacher_params, ids, am, seg, want_teacher, want_values, micro, groups
            )
            teacher_lp = pre.get("teacher_logp", teacher_lp)
            values = pre.get("values", values)

        # 2. whole-batch quantities, per trajectory, on the tokens
        if cfg.trajectory_gate == "none":
            gate = am
        else:
            gate = traj.gather(trajectory_gate(cfg, rewards, rewards.shape[0]))
        n_tok = jnp.maximum(jnp.sum(lm), 1.0)
        if cfg.loss_aggregation == "token_mean":
            tok_w, den_s = lm, n_tok
        else:  # each trajectory's mean, averaged over the trajectories with student tokens
            tok_w = lm / jnp.maximum(traj.total(lm), 1.0)
            den_s = jnp.maximum(traj.count(lm), 1.0)
        tmask = batch["teacher_mask"].astype(f32) * am if "teacher_mask" in batch else None
        dens = Denominators(
            student=den_s,
            tokens=n_tok,
            critic=jnp.maximum(jnp.sum(crit_mask), 1.0),
            teacher=None if tmask is None else jnp.maximum(jnp.sum(tmask), 1.0),
        )
        opt = lambda k: batch[k].astype(f32) if k in batch else None
        rows = TokenRows(
            ids=ids,
            attention_mask=am,
            loss_mask=lm,
            token_weight=tok_w,
            critic_mask=crit_mask,
            gate=gate,
            segment_ids=seg,
            old_logprobs=opt("old_logprobs"),
            ref_logprobs=opt("ref_logprobs"),
            sampler_logprobs=opt("sampler_logprobs"),
            teacher_logprobs=None if teacher_lp is None else teacher_lp.astype(f32),
            teacher_mask=tmask,
        )
        metrics = {"gate_share": traj.mean_of(gate, lm)}
        placed = None if rewards is None else adv_lib.place_outcome_reward(rewards, lm, traj)
        complete = None
        if cfg.uses_policy and cfg.global_advantage and given:
            rows = rows.replace(
                advantages=batch["advantages"].astype(f32),
                policy_gate=batch["policy_gate"].astype(f32),
            )
            if "returns" in batch:
                rows = rows.replace(
                    returns=batch["returns"].astype(f32), old_values=values.astype(f32)
                )
        elif cfg.uses_policy and cfg.global_advantage:

            def complete(rows, values):
                return self._global_advantages(
                    rows, placed, rewards, batch.get("group_ids"), traj, values, n_tok
                )

            if not self.on_policy:
                rows, more = complete(rows, None if values is None else values.astype(f32))
                metrics.update(more)
                complete = None
        elif cfg.uses_policy:  # immediate token rewards, per micro-batch
            rows = rows.replace(outcome=placed)
        taid_t = batch["taid_t"].astype(f32) if "taid_t" in batch else None
        return PreparedBatch(
            rows=rows, dens=dens, taid_t=taid_t, metrics=metrics, complete=complete
        )

    def _global_advantages(self, rows: TokenRows, placed, rewards, group_ids, traj, values, n_tok):
        """(rows with the whole batch's advantages, policy gate, and for GAE returns and old
        values; their metrics) from the rows' behaviour / teacher / reference log-probs and
        the critic's ``values`` at the pre-update parameters."""
        cfg, lm = self.objective, rows.loss_mask
        tok_r, pgate = token_rewards(
            cfg,
            lm,
            placed,
            rows.gate,
            rows.old_logprobs,
            rows.teacher_logprobs,
            rows.ref_logprobs,
        )
        adv, returns = self._advantages(
            cfg, tok_r, values, lm, rows.critic_mask, rewards, group_ids, traj
        )
        rows = rows.replace(advantages=adv, policy_gate=pgate)
        if returns is not None:
            rows = rows.replace(returns=returns, old_values=values)
        metrics = {
            "token_reward_mean": jnp.sum(tok_r * lm) / n_tok,
            "advantage_mean": jnp.sum(adv * lm) / n_tok,
        }
        return rows, metrics

    def _accumulate(
        self, params, teacher_params, prep: PreparedBatch, with_grad: bool, groups: RowGroups = ()
    ):
        """Step 3: (metric sums, float32 gradients or None) over the micro-batches."""
        m = self.micro_batches

        def loss_fn(p, rows):
            return self._micro_loss(
                p, teacher_params, rows, prep.dens, prep.taid_t, prep.complete, groups
            )

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        def one(rows):
            if not with_grad:
                return loss_fn(params, rows)[1], None
            (_, sums), grads = grad_fn(params, rows)
            return sums, jax.tree.map(lambda g: g.astype(f32), grads)

        if m == 1:
            return one(prep.rows)
        mbs = jax.tree.map(lambda x: split_micro(x, m), prep.rows)
        first = jax.eval_shape(lambda: one(jax.tree.map(lambda x: x[0], mbs)))
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, f32), first)

        def body(acc, mb):
            # A micro-batch of empty rows (the tail of a packed batch) runs no model pass.
            return jax.tree.map(jnp.add, acc, if_any_token(mb.attention_mask, one, mb)), None

        out, _ = jax.lax.scan(body, zeros, mbs)
        return out

    def _step(self, state: UpdateState, batch: dict, teacher_params, row_groups: RowGroups = ()):
        params = state.train.params  # the masters
        cparams = self._compute_params(params)
        prep = self._prepared(cparams, batch, teacher_params, groups=row_groups)
        sums, grads = self._accumulate(cparams, teacher_params, prep, True, row_groups)

        # 4. guard + update (on the masters)
        finite = jnp.isfinite(sums["loss"])
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
        return new_state, self._metrics(sums, prep, grads, finite, skipped)

    def _prepare(self, state: UpdateState, batch: dict, teacher_params, micro: int):
        """The whole rollout batch's advantages (whitened over the batch), returns, pre-update
        critic values and teacher log-probs, computed once before any mini-batch update."""
        params = self._compute_params(state.train.params)
        prep = self._prepared(params, batch, teacher_params, micro)
        rows = prep.rows
        out = {"advantages": rows.advantages, "policy_gate": rows.policy_gate}
        if rows.returns is not None:
            out.update(returns=rows.returns, values=rows.old_values)
        if rows.teacher_logprobs is not None and "teacher_logprobs" not in batch:
            out["teacher_logprobs"] = rows.teacher_logprobs
        return out, prep.metrics

    def _loss_only(self, state: UpdateState, batch: dict, teacher_params):
        params = self._compute_params(state.train.params)
        prep = self._prepared(params, batch, teacher_params)
        sums, _ = self._accumulate(params, teacher_params, prep, with_grad=False)
        out = {"loss": sums["loss"], "num_tokens": prep.dens.tokens}
        out["policy_loss"] = sums.get("policy_loss", jnp.zeros((), f32)) / prep.dens.student
        for k in ("kl_loss", "divergence"):
            if k in sums:
                out[k] = sums[k] / prep.dens.student
        return out

    def _micro_loss(
        self,
        params,
        teacher_params,
        rows: TokenRows,
        dens,
        taid_t,
        complete=None,
        groups: RowGroups = (),
    ):
        """Loss of one micro-batch (every mean divided by the whole batch's denominator) and the
        metric numerators: the student (and teacher) forward, then the loss terms. An on-policy
        step reads its behaviour log-probs and old values off this forward (stop-gradient) and
        ``complete``s the rows with the whole batch's advantages from them (one micro-batch:
        this is the whole batch). The model passes run per row group (``groups``)."""
        cfg = self.objective
        sc = self.student_config
        ids, am, seg = rows.ids, rows.attention_mask, rows.segment_ids
        sp = params["policy"]

        lp_missing = self.teacher_config is not None and rows.teacher_logprobs is None
        need_teacher_fwd = cfg.needs_teacher_logits or (
            lp_missing and (cfg.needs_teacher_logp or cfg.trust_threshold is not None)
        )
        need_teacher_lp = need_teacher_fwd and lp_missing  # also feeds the kl_k* metrics
        divs = {}
        if cfg.student_divergence_spec() is not None:
            divs["div"] = cfg.student_divergence_spec()
        if cfg.teacher_token_divergence_spec() is not None:
            divs["tdiv"] = cfg.teacher_token_divergence_spec()
        tp = jax.lax.stop_gradient(teacher_params) if need_teacher_fwd else None
        with_critic = cfg.critic != "none" and cfg.uses_policy

        def forward(ids, am, seg):
            """The model passes: per-token statistics and the critic's values."""
            h = self._hidden(sc, sp, ids, am, seg)
            th = None
            if need_teacher_fwd:
                th = jax.lax.stop_gradient(self._hidden(self.teacher_config, tp, ids, am, seg))
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
            values = None
            if with_critic:
                values = critic_values(
                    cfg.critic, params, self.critic_config, ids, am, h, self.plan, seg
                )
            return stats, values

        stats, values = by_row_groups(forward, groups, ids, am, seg)
        logp = stats["logp"]
        entropy = stats["entropy"] if cfg.entropy_coef else jax.lax.stop_gradient(stats["entropy"])
        l_t = (
            rows.teacher_logprobs
            if rows.teacher_logprobs is not None
            else stats.get("teacher_logp")
        )
        more = {}
        if self.on_policy:
            sg = jax.lax.stop_gradient
            rows = rows.replace(old_logprobs=sg(logp))
            if complete is not None:
                rows, more = complete(rows, None if values is None else sg(values))
        adv, pgate = loss_terms.policy_inputs(cfg, rows, logp, l_t)
        x = loss_terms.TermInputs(cfg, rows, logp, entropy, stats, l_t, adv, pgate, values)
        loss, sums = loss_terms.combine([term(x, dens) for _, term in self.terms], rows, dens)
        return loss, dict(sums, **{k: jax.lax.stop_gradient(v) for k, v in more.items()})

    def _metrics(self, sums, prep: PreparedBatch, grads, finite, skipped):
        dens = prep.dens
        out = dict(prep.metrics)
        for k in ("token_reward_mean", "advantage_mean"):  # an on-policy step's, from its loss
            if k in sums:
                out[k] = sums[k]
        out["loss"] = sums["loss"]
        out["policy_loss"] = sums.get("policy_loss", jnp.zeros((), f32)) / dens.student
        for k in ("kl_loss", "divergence"):
            if k in sums:
                out[k] = sums[k] / dens.student
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
                out[k] = sums[k] / dens.tokens
        if "teacher_token_loss" in sums:
            out["teacher_token_loss"] = sums["teacher_token_loss"] / dens.teacher
        if "value_loss" in sums:
            out["value_loss"] = sums["value_loss"] / dens.critic
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
        out["num_tokens"] = dens.tokens
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
    compute_dtype=None,
    on_policy: bool = False,
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
      compute_dtype: the dtype the forward and backward passes run in (e.g. ``"bfloat16"``),
        with the state's trained params as the (float32) masters; None: the params' own dtype.
      on_policy: every call is the one update on a batch sampled at the state's current
        parameters (one mini-batch, one epoch; needs ``micro_batches=1``): the behaviour
        log-probs and the critic's old values are the step's own forward (stop-gradient), so
        the batch has no ``old_logprobs`` and no separate scoring pass or critic pre-pass runs.
        Equal to passing them from such passes; objectives without a policy term ignore it.
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
        compute_dtype,
        on_policy,
    )
