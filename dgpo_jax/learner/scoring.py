"""Scoring passes: per-token log-probs of whole sequences under a model (behaviour, reference)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dgpo_jax.models import Qwen2Config, forward_hidden, lm_logits


@functools.partial(jax.jit, static_argnames=("config", "chunk"))
def sequence_logprobs(config: Qwen2Config, params, input_ids, attention_mask, chunk: int = 256):
    """``[B, T]`` log p(ids[t] | ids[<t]) aligned with ``input_ids`` (position 0 holds 0).

    The vocabulary projection runs over chunks of positions, so ``[B, T, V]`` float32 logits
    never exist at once.
    """
    b, t = input_ids.shape
    hidden = forward_hidden(config, params, input_ids, attention_mask)[:, :-1]
    targets = input_ids[:, 1:]
    n = t - 1
    pad = (-n) % chunk
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    hs = hidden.reshape(b, -1, chunk, hidden.shape[-1]).swapaxes(0, 1)
    ts = targets.reshape(b, -1, chunk).swapaxes(0, 1)

    def one(_, xs):
        h, tgt = xs
        logp = jax.nn.log_softmax(lm_logits(config, params, h), axis=-1)
        return None, jnp.take_along_axis(logp, tgt[..., None], -1)[..., 0]

    _, out = jax.lax.scan(one, None, (hs, ts))
    out = out.swapaxes(0, 1).reshape(b, -1)[:, :n]
    return jnp.concatenate([jnp.zeros((b, 1), out.dtype), out], axis=1)
