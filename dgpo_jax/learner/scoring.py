"""Scoring passes: per-token log-probs of whole sequences under a model (behaviour, reference),
on unpacked or packed rows, a micro-batch of rows at a time."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dgpo_jax.learner.prepared import merge_micro, split_micro
from dgpo_jax.models import Qwen2Config, forward_hidden, lm_logits


def if_any_token(mask, fn, *args):
    """``fn(*args)`` when ``mask`` (a micro-batch's attention mask) holds a real token, else
    zeros of ``fn``'s output shapes. ``lax.cond`` runs one branch, so a micro-batch of empty
    rows costs no model pass: packed batches keep one shape per run and fill only their first
    micro-batches (``dgpo_jax.learner.packing``)."""
    shapes = jax.eval_shape(fn, *args)
    zeros = lambda *_: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    return jax.lax.cond(jnp.any(mask > 0), fn, zeros, *args)


def _token_logprobs(config, params, input_ids, attention_mask, segment_ids, chunk, plan):
    """``[B, T]`` log-probs of one micro-batch (see `sequence_logprobs`)."""
    b, t = input_ids.shape
    if segment_ids is None:
        hidden = forward_hidden(config, params, input_ids, attention_mask, plan)
    else:
        hidden = forward_hidden(
            config, params, input_ids, attention_mask, plan, segment_ids=segment_ids
        )
    hidden = hidden[:, :-1]
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
    out = jnp.concatenate([jnp.zeros((b, 1), out.dtype), out], axis=1)
    if segment_ids is not None:
        # A segment's first token has no context of its own: its log-prob is 0, like position
        # 0 of an unpacked row (and 0 on padding).
        seg = jnp.where(attention_mask > 0, segment_ids, 0)
        previous = jnp.concatenate([jnp.zeros((b, 1), seg.dtype), seg[:, :-1]], axis=1)
        out = jnp.where((seg > 0) & (seg == previous), out, 0.0)
    return out


@functools.partial(jax.jit, static_argnames=("config", "chunk", "micro_batch", "plan"))
def sequence_logprobs(
    config: Qwen2Config,
    params,
    input_ids,
    attention_mask,
    chunk: int = 256,
    segment_ids=None,
    micro_batch: int | None = None,
    plan=None,
):
    """``[B, T]`` log p(ids[t] | ids[<t]) aligned with ``input_ids`` (position 0 holds 0).

    ``segment_ids [B, T]`` (packed rows, ``dgpo_jax.learner.packing``): positions restart and
    attention stays within each segment, and the first token of every segment holds 0.
    ``micro_batch``: rows per forward pass (``lax.map`` over micro-batches; the rows are padded
    up to a multiple with empty rows, whose output is dropped; a micro-batch without a real
    token is skipped and gives 0); None = all rows at once. The
    vocabulary projection runs over chunks of ``chunk`` positions, so ``[B, T, V]`` float32
    logits never exist at once. ``plan``: the sharding plan the model constrains activations
    with (as in the update step).
    """
    b = input_ids.shape[0]
    if micro_batch is None or micro_batch >= b:
        return _token_logprobs(config, params, input_ids, attention_mask, segment_ids, chunk, plan)
    if micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1 or None, got {micro_batch}")
    m = -(-b // micro_batch)
    extra = m * micro_batch - b
    rows = (input_ids, attention_mask) + (() if segment_ids is None else (segment_ids,))
    rows = tuple(jnp.pad(x, ((0, extra), (0, 0))) for x in rows)  # empty rows: no real token
    rows = tuple(split_micro(x, m) for x in rows)

    def one(xs):
        ids, mask = xs[0], xs[1]
        seg = xs[2] if len(xs) > 2 else None
        score = lambda ids, mask, seg: _token_logprobs(config, params, ids, mask, seg, chunk, plan)
        return if_any_token(mask, score, ids, mask, seg)

    return merge_micro(jax.lax.map(one, rows))[:b]
