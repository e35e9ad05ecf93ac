"""Per-trajectory reductions on token arrays, for padded and packed update batches alike.

A padded batch holds one trajectory per row; a packed batch holds several per row, each a
contiguous run of one ``segment_ids`` value (0 = padding) and ``traj_index`` naming the
trajectory (0..N-1, -1 on padding) so that per-trajectory fields (``rewards``, ``group_ids``,
``[N]``) reach their tokens. A padded batch is the special case ``segment_ids =
attention_mask``, ``traj_index`` = the row index on real tokens.

Reductions run per row over the row's segments (``jax.ops.segment_*`` under ``vmap``), so they
follow the rows' sharding and never need N. Every per-trajectory quantity of the objective
(the outcome reward's token, the critic region of the reference code, sequence-mean weights,
GAE's recursion) is computed from these, so a packed batch gives the numbers of the padded one.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

f32 = jnp.float32


@flax.struct.dataclass
class Trajectories:
    """Where each token's trajectory is. ``segments [R, T] int32`` (0 = padding; a padded row's
    real tokens are segment 1), ``index [R, T] int32`` (trajectory index, -1 on padding) and
    ``packed`` (static): whether rows hold several trajectories (then GAE and reward-to-go reset
    at segment boundaries)."""

    segments: jax.Array
    index: jax.Array
    packed: bool = flax.struct.field(pytree_node=False, default=False)

    @classmethod
    def of_batch(cls, attention_mask, segment_ids=None, traj_index=None) -> Trajectories:
        """From a batch's ``attention_mask`` and, for a packed batch, ``segment_ids`` and
        ``traj_index`` (without ``traj_index`` the rows are the trajectories)."""
        real = attention_mask > 0
        if segment_ids is None:
            segments = real.astype(jnp.int32)
        else:
            segments = jnp.where(real, segment_ids.astype(jnp.int32), 0)
        if traj_index is None:
            rows = jnp.arange(segments.shape[0], dtype=jnp.int32)[:, None]
            index = jnp.where(segments > 0, rows, -1)
        else:
            index = jnp.where(segments > 0, traj_index.astype(jnp.int32), -1)
        return cls(segments=segments, index=index, packed=segment_ids is not None)

    # --- reductions over each token's trajectory ----------------------------------------------
    def _reduce(self, op, x):
        """``op`` of ``x`` over each token's trajectory, back on the tokens ``[R, T]``
        (padding tokens get their row's padding reduction: mask it out)."""
        width = x.shape[1] + 1  # segment ids are at most T (one-token segments)
        per_seg = jax.vmap(lambda v, s: op(v, s, num_segments=width))(x, self.segments)
        return jnp.take_along_axis(per_seg, self.segments, axis=1)

    def total(self, x):
        """Sum of ``x`` over each token's trajectory, ``[R, T]``."""
        return self._reduce(jax.ops.segment_sum, x)

    def last(self, mask):
        """``[R, T]`` 1.0 at each trajectory's last ``mask`` token (none for an empty one)."""
        mask = mask.astype(f32)
        pos = jnp.broadcast_to(jnp.arange(mask.shape[1], dtype=jnp.int32), mask.shape)
        last = self._reduce(jax.ops.segment_max, jnp.where(mask > 0, pos, -1))
        return (pos == last).astype(f32) * mask

    def from_first(self, mask):
        """``[R, T]`` 1.0 on each trajectory's tokens from its first ``mask`` token on."""
        pos = jnp.broadcast_to(jnp.arange(mask.shape[1], dtype=jnp.int32), mask.shape)
        first = self._reduce(jax.ops.segment_min, jnp.where(mask > 0, pos, mask.shape[1]))
        return ((pos >= first) & (self.segments > 0)).astype(f32)

    def gather(self, values, fill=0.0):
        """Per-trajectory ``values [N]`` onto their tokens ``[R, T]`` (``fill`` on padding)."""
        picked = values[jnp.maximum(self.index, 0)]
        return jnp.where(self.index >= 0, picked, jnp.asarray(fill, values.dtype))

    def count(self, mask):
        """Number of trajectories with at least one ``mask`` token (float32 scalar)."""
        n = jax.vmap(lambda v, s: jax.ops.segment_sum(v, s, num_segments=v.shape[0] + 1))(
            mask.astype(f32), self.segments
        )
        return jnp.sum((n[:, 1:] > 0).astype(f32))

    def mean_of(self, per_token, mask):
        """Mean over the trajectories with ``mask`` tokens of a per-trajectory quantity held on
        every token (``per_token`` constant within a trajectory, e.g. the DGPO gate)."""
        mask = mask.astype(f32)
        width = mask.shape[1] + 1
        seg_sum = lambda v: jax.vmap(lambda x, s: jax.ops.segment_sum(x, s, num_segments=width))(
            v, self.segments
        )[:, 1:]
        n, g = seg_sum(mask), seg_sum(per_token.astype(f32) * mask)
        has = (n > 0).astype(f32)
        return jnp.sum(g / jnp.maximum(n, 1.0) * has) / jnp.maximum(jnp.sum(has), 1.0)

    def boundary_after(self):
        """``[R, T]`` bool: the next position holds another segment (or there is none). GAE and
        reward-to-go reset their recursion there in a packed row; in a padded row they bootstrap
        across masked positions, as the reference code does, so nothing resets."""
        if not self.packed:
            return None
        s = self.segments
        nxt = jnp.concatenate([s[:, 1:], jnp.full((s.shape[0], 1), -1, s.dtype)], axis=1)
        return s != nxt
