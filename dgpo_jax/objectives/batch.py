"""The rollout batch the update step reads: field names, shapes, and what each objective needs.

Alignment convention: every ``[B, T]`` log-prob / value array is aligned with ``input_ids``:
position t holds ``log p(ids[t] | ids[<t])`` (position 0 is unused and may hold anything).

Fields (B rows, T positions):
  input_ids        [B, T] int    prompt + response (+ observations), left or right padded
  attention_mask   [B, T] 0/1    real tokens
  loss_mask        [B, T] 0/1    1 on tokens the student generated; 0 on prompt, padding,
                                 observations, and teacher turns / teacher prefixes
  old_logprobs     [B, T] float  behaviour policy log-probs (every policy-gradient objective)
  rewards          [B]    float  outcome reward, placed on the row's last loss_mask token
  teacher_logprobs [B, T] float  teacher log-probs (or teacher params: in-program forward)
  ref_logprobs     [B, T] float  reference-model log-probs (PPO/GRPO KL, ExOPD lambda != 1)
  group_ids        [B]    int    rollouts of the same prompt share an id (GRPO)
  teacher_mask     [B, T] 0/1    teacher-generated turns / prefixes (Guided-OPD, TrOPD)
  values           [B, T] float  critic values at rollout time (GAE; computed in the step
                                 by the current critic when absent)
  sampler_logprobs [B, T] float  log-probs from the sampling engine (truncated IS weights)
  taid_t           []     float  TAID interpolation t (``dgpo_jax.curricula.schedules``)
  advantages       [B, T] float  whole-batch advantages (``UpdateStep.prepare_rollout``); with
                                 them the step uses ``policy_gate`` and, for GAE, ``returns``
                                 and ``values`` as given instead of computing them
  policy_gate      [B, T] float  the policy loss's token gate (loss_mask x TrOPD trust)
  returns          [B, T] float  GAE returns (the critic's targets)
  segment_ids      [B, T] int    packed rows: 0 = padding, k > 0 = the row's k-th trajectory
                                 (contiguous); the models attend within a segment and restart
                                 positions at its first token
  traj_index       [B, T] int    packed rows: the trajectory (0..N-1) of each token, -1 on
                                 padding. With it, the per-trajectory fields (``rewards``,
                                 ``group_ids``) are ``[N]``; without it each row is one
                                 trajectory (N = B)

A packed batch (``dgpo_jax.learner.packing``) has ``segment_ids`` and ``traj_index`` and
``attention_mask = segment_ids > 0``; every per-trajectory quantity of the objective is then
computed per trajectory (``dgpo_jax.objectives.trajectories``), so it gives the padded batch's
loss and gradients.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dgpo_jax.objectives.config import ObjectiveConfig

# name -> (shape kind, integer dtype?)
BATCH_FIELDS: dict[str, tuple[str, bool]] = {
    "input_ids": ("BT", True),
    "attention_mask": ("BT", False),
    "loss_mask": ("BT", False),
    "old_logprobs": ("BT", False),
    "rewards": ("B", False),
    "teacher_logprobs": ("BT", False),
    "ref_logprobs": ("BT", False),
    "group_ids": ("B", True),
    "teacher_mask": ("BT", False),
    "values": ("BT", False),
    "sampler_logprobs": ("BT", False),
    "taid_t": ("", False),
    "advantages": ("BT", False),
    "policy_gate": ("BT", False),
    "returns": ("BT", False),
    "segment_ids": ("BT", True),
    "traj_index": ("BT", True),
}
# Fields with one entry per trajectory ([N]; N = B unless the batch is packed).
TRAJECTORY_FIELDS = tuple(k for k, (kind, _) in BATCH_FIELDS.items() if kind == "B")
PACKING_FIELDS = ("segment_ids", "traj_index")


# What an on-policy step (``make_update_step(..., on_policy=True)``) computes from its own
# forward instead of reading it from the batch.
ON_POLICY_OWN_FIELDS = ("old_logprobs", "values", "advantages", "policy_gate", "returns")


def batch_requirements(
    cfg: ObjectiveConfig, teacher_in_program: bool, on_policy: bool = False
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(required fields, optional fields that the objective uses when present). With
    ``on_policy`` the step computes ``ON_POLICY_OWN_FIELDS`` itself: none is read."""
    req = ["input_ids", "attention_mask", "loss_mask"]
    opt = []
    if cfg.uses_policy and not on_policy:
        req.append("old_logprobs")
    if cfg.needs_rewards:
        req.append("rewards")
    if cfg.advantage == "grpo":
        req.append("group_ids")
    if cfg.needs_teacher_logp or cfg.trust_threshold is not None:
        (opt if teacher_in_program else req).append("teacher_logprobs")
    if cfg.needs_ref_logp:
        req.append("ref_logprobs")
    if cfg.teacher_token_loss != "none":
        req.append("teacher_mask")
    if cfg.tis_threshold is not None and cfg.uses_policy:
        req.append("sampler_logprobs")
    if cfg.divergence == "taid":
        req.append("taid_t")
    if cfg.critic != "none" and not on_policy:
        opt.append("values")
    if cfg.uses_policy and cfg.global_advantage and not on_policy:
        opt.extend(["advantages", "policy_gate"] + (["returns"] if cfg.advantage == "gae" else []))
    # Metrics use teacher / reference log-probs when given; any objective takes packed rows.
    for f in ("teacher_logprobs", "ref_logprobs") + PACKING_FIELDS:
        if f not in req and f not in opt:
            opt.append(f)
    return tuple(req), tuple(opt)


def validate_batch(
    batch: Mapping[str, Any],
    cfg: ObjectiveConfig,
    teacher_in_program: bool,
    micro_batches: int = 1,
    on_policy: bool = False,
) -> dict[str, Any]:
    """Checks names, shapes and dtypes; returns the fields the objective uses (others dropped).
    ``on_policy``: the step computes ``ON_POLICY_OWN_FIELDS`` itself, and a batch that carries
    one is refused (it would say the batch came from other parameters).

    Raises ``ValueError`` naming the objective, the missing/unknown field and the expected shape.
    """
    if not isinstance(batch, Mapping):
        raise ValueError(f"batch must be a mapping of field -> array, got {type(batch).__name__}")
    unknown = sorted(set(batch) - set(BATCH_FIELDS))
    if unknown:
        raise ValueError(
            f"batch has unknown field(s) {unknown}; known fields: {list(BATCH_FIELDS)}"
        )
    req, opt = batch_requirements(cfg, teacher_in_program, on_policy)
    own = [f for f in ON_POLICY_OWN_FIELDS if f in batch] if on_policy and cfg.uses_policy else []
    if own:
        raise ValueError(
            f"batch carries {own}, but this update step is on_policy: it takes the behaviour "
            "log-probs and the critic's old values from its own forward at the current "
            "parameters (build it with on_policy=False to pass them)"
        )
    missing = [f for f in req if f not in batch]
    if missing:
        hint = ""
        if "teacher_logprobs" in missing:
            hint = " (or build the step with teacher_config and pass teacher_params)"
        raise ValueError(
            f"objective {cfg.name!r} needs batch field(s) {missing}{hint}; it needs "
            f"{list(req)} and uses {list(opt)} when present"
        )
    if "advantages" in batch:
        need = ["policy_gate"] + (["returns", "values"] if cfg.advantage == "gae" else [])
        absent = [f for f in need if f not in batch]
        if absent:
            raise ValueError(
                f"batch has 'advantages' but not {absent}: pass the whole output of "
                "UpdateStep.prepare_rollout"
            )
    ids_shape = _shape(batch["input_ids"])
    if len(ids_shape) != 2 or ids_shape[1] < 2:
        raise ValueError(f"batch['input_ids'] must be [B, T] with T >= 2, got shape {ids_shape}")
    b, t = ids_shape
    if b % micro_batches:
        raise ValueError(f"batch size {b} is not divisible by micro_batches={micro_batches}")
    fields = list(req) + [f for f in opt if f in batch]
    n = _trajectories(batch, fields, b)
    out = {}
    for name in fields:
        x = batch[name]
        kind, integer = BATCH_FIELDS[name]
        want = {"BT": (b, t), "B": (n,), "": ()}[kind]
        if _shape(x) != want:
            what = f"B={b}, T={t}" if kind != "B" or n == b else f"N={n} trajectories"
            raise ValueError(
                f"batch[{name!r}] has shape {_shape(x)}, expected {want} "
                f"([{', '.join(kind) or 'scalar'}] with {what})"
            )
        dt = getattr(x, "dtype", None)
        dt = np.dtype(np.asarray(x).dtype if dt is None else dt)
        if integer and not np.issubdtype(dt, np.integer):
            raise ValueError(f"batch[{name!r}] must be an integer array, got dtype {dt}")
        if not integer and not (
            np.issubdtype(dt, np.floating)
            or np.issubdtype(dt, np.integer)
            or dt == np.bool_
            or dt.name == "bfloat16"
        ):
            raise ValueError(f"batch[{name!r}] must be numeric, got dtype {dt}")
        out[name] = x
    if "traj_index" in out:
        _check_packing(out, n)
    return out


def field_dtype(name: str):
    """The dtype the update step reads ``name`` in (``UpdateStep.prepare_batch`` converts to
    it, so a batch's compiled program does not depend on the dtypes it arrived in): int32 for
    integer fields, float32 for the rest (masks included)."""
    return jnp.dtype(jnp.int32 if BATCH_FIELDS[name][1] else jnp.float32)


def field_sharding(plan, name: str, shape: tuple[int, ...], packed: bool):
    """Where ``UpdateStep.prepare_batch`` puts field ``name`` on ``plan``'s mesh: per-token
    fields (and per-row ones of a padded batch) by rows over the batch axes; scalars, and a
    packed batch's per-trajectory fields (small, read by every row), replicated."""
    kind = BATCH_FIELDS[name][0]
    if kind == "BT" or (kind == "B" and not packed):
        return plan.batch_sharding(len(shape), shape)
    return plan.sharding(())


def _shape(x) -> tuple[int, ...]:
    return tuple(x.shape) if hasattr(x, "shape") else tuple(np.shape(x))


def _trajectories(batch: Mapping[str, Any], fields: list[str], rows: int) -> int | None:
    """N, the number of trajectories: B for a padded batch; a packed batch's per-trajectory
    fields must agree on it (None: a packed batch without such fields)."""
    # every per-trajectory field given, used or not: N is known even when the objective reads
    # none of them (KD objectives), for the traj_index check
    per_traj = [f for f in batch if f in TRAJECTORY_FIELDS]
    packed = "traj_index" in batch
    if "segment_ids" in batch and not packed and per_traj:
        raise ValueError(
            f"batch has 'segment_ids' and per-trajectory field(s) {per_traj} but no "
            "'traj_index': a packed batch needs traj_index to place them on their tokens"
        )
    if packed and "segment_ids" not in batch:
        raise ValueError("batch has 'traj_index' but no 'segment_ids': pass both (packed rows)")
    if not packed:
        return rows
    if not per_traj:
        return None  # nothing per trajectory to check against
    sizes = {f: _shape(batch[f]) for f in per_traj}
    first = sizes[per_traj[0]]
    if len(first) != 1 or any(s != first for s in sizes.values()):
        raise ValueError(f"packed batch: per-trajectory fields must all be [N]; got shapes {sizes}")
    return first[0]


def _check_packing(batch: dict, n: int | None) -> None:
    """Host-side checks of a packed batch given as host arrays (device arrays are trusted)."""
    arrays = [batch[k] for k in ("segment_ids", "traj_index", "attention_mask")]
    if any(isinstance(x, (jax.Array, jax.ShapeDtypeStruct)) for x in arrays):
        return
    seg, idx, am = (np.asarray(x) for x in arrays)
    if not np.array_equal(seg > 0, am > 0):
        raise ValueError("packed batch: attention_mask must equal segment_ids > 0")
    if np.any((idx >= 0) != (seg > 0)):
        raise ValueError("packed batch: traj_index must be -1 exactly on padding (segment 0)")
    if n is not None and idx.size and idx.max() >= n:
        raise ValueError(
            f"packed batch: traj_index holds {int(idx.max())} but the per-trajectory fields "
            f"have N={n} entries"
        )


def abstract_batch(
    cfg: ObjectiveConfig,
    rows: int,
    width: int,
    teacher_in_program: bool,
    plan=None,
    packed: bool = True,
    trajectories: int | None = None,
    fields: tuple[str, ...] = (),
    on_policy: bool = False,
) -> dict[str, jax.ShapeDtypeStruct]:
    """The update batch of ``cfg`` as ``jax.ShapeDtypeStruct`` leaves (nothing allocated), for
    compiling the update step ahead of time (``UpdateStep.compile``, the memory plan).

    ``rows`` x ``width`` token positions; ``packed`` adds ``segment_ids`` and ``traj_index`` and
    makes the per-trajectory fields ``[trajectories]`` (default: ``rows``), replicated; else
    they are ``[rows]``. The required fields of the objective plus ``fields`` (e.g. the outputs
    of ``prepare_rollout``: ``("advantages", "policy_gate", "returns", "values")``). With a
    ``plan``, per-token fields are sharded by rows over the batch axes, as
    ``UpdateStep.prepare_batch`` places them. ``on_policy``: the batch of an on-policy step
    (no ``old_logprobs``).
    """
    required, optional = batch_requirements(cfg, teacher_in_program, on_policy)
    unknown = [f for f in fields if f not in BATCH_FIELDS]
    if unknown:
        raise ValueError(f"abstract_batch: unknown field(s) {unknown}; known: {list(BATCH_FIELDS)}")
    names = list(required) + [f for f in fields if f not in required]
    if packed:
        names += [f for f in PACKING_FIELDS if f not in names]
    n = rows if trajectories is None or not packed else trajectories
    out = {}
    for name in names:
        kind, integer = BATCH_FIELDS[name]
        shape = {"BT": (rows, width), "B": (n,), "": ()}[kind]
        dtype = field_dtype(name)
        sharding = None if plan is None else field_sharding(plan, name, shape, packed)
        out[name] = jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    return out
