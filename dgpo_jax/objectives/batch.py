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
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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
}


def batch_requirements(
    cfg: ObjectiveConfig, teacher_in_program: bool
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(required fields, optional fields that the objective uses when present)."""
    req = ["input_ids", "attention_mask", "loss_mask"]
    opt = []
    if cfg.uses_policy:
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
    if cfg.critic != "none":
        opt.append("values")
    if cfg.uses_policy and cfg.global_advantage:
        opt.extend(["advantages", "policy_gate"] + (["returns"] if cfg.advantage == "gae" else []))
    # Metrics use teacher / reference log-probs when given.
    for f in ("teacher_logprobs", "ref_logprobs"):
        if f not in req and f not in opt:
            opt.append(f)
    return tuple(req), tuple(opt)


def validate_batch(
    batch: Mapping[str, Any], cfg: ObjectiveConfig, teacher_in_program: bool, micro_batches: int = 1
) -> dict[str, Any]:
    """Checks names, shapes and dtypes; returns the fields the objective uses (others dropped).

    Raises ``ValueError`` naming the objective, the missing/unknown field and the expected shape.
    """
    if not isinstance(batch, Mapping):
        raise ValueError(f"batch must be a mapping of field -> array, got {type(batch).__name__}")
    unknown = sorted(set(batch) - set(BATCH_FIELDS))
    if unknown:
        raise ValueError(
            f"batch has unknown field(s) {unknown}; known fields: {list(BATCH_FIELDS)}"
        )
    req, opt = batch_requirements(cfg, teacher_in_program)
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
    ids_shape = tuple(np.shape(batch["input_ids"]))
    if len(ids_shape) != 2 or ids_shape[1] < 2:
        raise ValueError(f"batch['input_ids'] must be [B, T] with T >= 2, got shape {ids_shape}")
    b, t = ids_shape
    if b % micro_batches:
        raise ValueError(f"batch size {b} is not divisible by micro_batches={micro_batches}")
    out = {}
    for name in list(req) + [f for f in opt if f in batch]:
        x = batch[name]
        kind, integer = BATCH_FIELDS[name]
        want = {"BT": (b, t), "B": (b,), "": ()}[kind]
        if tuple(np.shape(x)) != want:
            raise ValueError(
                f"batch[{name!r}] has shape {tuple(np.shape(x))}, expected {want} "
                f"([{', '.join(kind) or 'scalar'}] with B={b}, T={t})"
            )
        dt = np.dtype(getattr(x, "dtype", np.asarray(x).dtype))
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
    return out
