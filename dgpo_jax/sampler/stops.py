"""Stop-sequence matching on the suffix of each row's generated tokens (pure, jittable).

A closing tag can span several tokens (``</search>`` is ``</``, ``search``, ``>`` for Qwen2.5),
so rows keep a window ``[B, W]`` of their last W generated tokens of the current turn (W = the
longest stop sequence) and a stop matches when the window ends with it and the turn has
generated at least that many tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def push_window(window: jax.Array, tokens: jax.Array, pushed: jax.Array) -> jax.Array:
    """``window [B, W]``, ``tokens [B]``; rows with ``pushed [B]`` shift left and append."""
    shifted = jnp.concatenate([window[:, 1:], tokens[:, None]], axis=1)
    return jnp.where(pushed[:, None], shifted, window)


def ends_with_any(window: jax.Array, count: jax.Array, sequences) -> jax.Array:
    """``[B]`` bool: the row's last ``count [B]`` tokens (held at the end of ``window [B, W]``)
    end with one of ``sequences`` (static tuple of token-id tuples)."""
    hit = jnp.zeros(window.shape[:1], bool)
    width = window.shape[1]
    for seq in sequences:
        n = len(seq)
        if n > width:
            raise ValueError(f"stop sequence {seq} is longer than the window ({width})")
        tail = window[:, width - n :]
        hit = hit | (jnp.all(tail == jnp.asarray(seq, window.dtype)[None], axis=1) & (count >= n))
    return hit
