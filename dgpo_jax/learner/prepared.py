"""The prepared batch: what every micro-batch's loss reads, typed.

The update step turns a rollout batch into a ``PreparedBatch`` before its micro-batch loop:
per-token arrays ``TokenRows`` (everything per trajectory already put on the trajectory's
tokens -- the DGPO gate, the placed outcome reward, sequence-mean weights -- so a micro-batch
is just a slice of rows, packed or padded), the loss denominators of the whole batch
(``Denominators``: the micro-batched loss is exactly the full-batch one) and the whole-batch
metrics.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TokenRows:
    """Per-token ``[R, T]`` arrays, float32 unless said otherwise. Optional fields are None when
    the objective does not read them."""

    ids: jax.Array  # int32 token ids
    attention_mask: jax.Array  # real tokens
    loss_mask: jax.Array  # the student's tokens (loss_mask x attention_mask)
    token_weight: jax.Array  # loss_mask, or loss_mask / the trajectory's count (seq mean)
    critic_mask: jax.Array  # the critic's tokens (GAE, whitening, value loss)
    gate: jax.Array  # u(tau) of the token's trajectory (0 on padding)
    segment_ids: jax.Array | None = None  # int32, packed rows only
    outcome: jax.Array | None = None  # outcome reward on the trajectory's last student token
    old_logprobs: jax.Array | None = None
    ref_logprobs: jax.Array | None = None
    sampler_logprobs: jax.Array | None = None
    teacher_logprobs: jax.Array | None = None  # given, or from the in-program pre-pass
    teacher_mask: jax.Array | None = None  # teacher tokens (x attention_mask)
    advantages: jax.Array | None = None  # whole-batch advantages (global estimators)
    policy_gate: jax.Array | None = None  # the policy loss's token gate with them
    returns: jax.Array | None = None  # GAE returns (the critic's targets)
    old_values: jax.Array | None = None  # the value-clip anchor


@flax.struct.dataclass
class Denominators:
    """The means' denominators over the whole batch (float32 scalars, at least 1)."""

    student: jax.Array  # student-token terms: tokens (token mean) or trajectories (seq mean)
    tokens: jax.Array  # student tokens (per-token metrics)
    critic: jax.Array  # critic tokens (value loss)
    teacher: jax.Array | None = None  # teacher tokens (teacher-token loss)


@flax.struct.dataclass
class PreparedBatch:
    rows: TokenRows
    dens: Denominators
    taid_t: jax.Array | None = None  # TAID's interpolation t (scalar)
    metrics: dict = flax.struct.field(default_factory=dict)  # whole-batch metrics
    # An on-policy step's whole-batch advantages, deferred to its forward:
    # (rows, old values) -> (rows with advantages, metrics). Not a pytree leaf.
    complete: Callable | None = flax.struct.field(pytree_node=False, default=None)


def split_micro(x, m: int):
    """``[B, ...] -> [m, B/m, ...]``; micro-batch i holds rows i, i+m, ... (each micro-batch
    keeps rows from every data shard)."""
    b = x.shape[0]
    return jnp.swapaxes(x.reshape((b // m, m) + x.shape[1:]), 0, 1)


def merge_micro(x):
    """The inverse of ``split_micro``."""
    m, bm = x.shape[:2]
    return jnp.swapaxes(x, 0, 1).reshape((m * bm,) + x.shape[2:])
