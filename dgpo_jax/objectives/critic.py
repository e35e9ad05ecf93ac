"""Critics for GAE: a value head (Dense D -> 1) on the student trunk, or a separate critic
model (its own Qwen2 trunk + value head, initialised from the student by default).

Values are aligned with ``input_ids`` like log-probs: ``values[:, t] = V(s_t)`` is read from the
hidden state at t-1 (the state before token t is emitted); position 0 is 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dgpo_jax.models import forward_hidden


def init_value_head(hidden_size: int, rng: jax.Array, dtype=jnp.float32) -> dict:
    """``{"kernel": [D], "bias": []}`` with normal(0.02) weights and a zero bias."""
    return {
        "kernel": (0.02 * jax.random.normal(rng, (hidden_size,), jnp.float32)).astype(dtype),
        "bias": jnp.zeros((), dtype),
    }


def value_head_apply(head: dict, hidden: jax.Array) -> jax.Array:
    """Hidden ``[B, T, D]`` -> values ``[B, T]`` float32 aligned with ``input_ids``."""
    v = jnp.einsum(
        "btd,d->bt", hidden[:, :-1].astype(jnp.float32), head["kernel"].astype(jnp.float32)
    ) + head["bias"].astype(jnp.float32)
    return jnp.pad(v, [(0, 0), (1, 0)])


def init_critic(student_params: dict, rng: jax.Array) -> dict:
    """A separate critic initialised from the student trunk (as DGPO) plus a fresh value head."""
    d = student_params["embed_tokens"].shape[1]
    trunk = jax.tree.map(jnp.copy, student_params)  # a copy (same sharding): trained separately
    return {
        "trunk": trunk,
        "value_head": init_value_head(d, rng, student_params["embed_tokens"].dtype),
    }


def critic_values(
    critic_kind: str,
    params: dict,
    critic_config,
    ids,
    attention_mask,
    student_hidden=None,
    plan=None,
    segment_ids=None,
) -> jax.Array:
    """Values ``[B, T]`` from ``params`` (the full ``{"policy", ...}`` tree). ``segment_ids``:
    rows that pack several trajectories (the critic trunk attends within each)."""
    if critic_kind == "value_head":
        if student_hidden is None:
            raise ValueError("value_head critic needs the student hidden states")
        return value_head_apply(params["value_head"], student_hidden)
    if critic_kind == "separate":
        kwargs = {} if segment_ids is None else {"segment_ids": segment_ids}
        h = forward_hidden(
            critic_config, params["critic"]["trunk"], ids, attention_mask, plan, **kwargs
        )
        return value_head_apply(params["critic"]["value_head"], h)
    raise ValueError(f"no critic for critic={critic_kind!r}")
