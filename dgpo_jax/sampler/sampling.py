"""Next-token choice from logits: greedy, temperature, top-k and top-p, one RNG key per row.

Pure functions, used inside the compiled rollout loop. Shapes: B rows, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dgpo_jax.sampler.config import SamplerConfig

_MASKED = -1e30


def sampling_logprobs(cfg: SamplerConfig, logits: jax.Array) -> jax.Array:
    """Log-probabilities ``[B, V]`` of the distribution the sampler draws from.

    ``logits [B, V]`` (float32) are divided by the temperature, then restricted to the top-k
    tokens and to the smallest set of most likely tokens whose probability reaches top-p (the
    token that crosses the threshold is kept), then renormalised. Greedy: the untempered
    log-softmax (the point-mass log-prob of greedy decoding would be 0 everywhere).
    """
    logits = logits.astype(jnp.float32)
    if cfg.greedy:
        return jax.nn.log_softmax(logits, axis=-1)
    logits = logits / cfg.temperature
    vocab = logits.shape[-1]
    if 0 < cfg.top_k < vocab:
        kth = jax.lax.top_k(logits, cfg.top_k)[0][:, -1:]
        logits = jnp.where(logits >= kth, logits, _MASKED)
    if cfg.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
        keep = mass_before < cfg.top_p  # the first token always stays
        # Smallest kept logit = the threshold (ties at the threshold are all kept).
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits >= threshold, logits, _MASKED)
    return jax.nn.log_softmax(logits, axis=-1)


def sample_tokens(
    cfg: SamplerConfig, logits: jax.Array, keys: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """One token per row. ``logits [B, V]``, ``keys [B]`` (typed PRNG keys) ->
    (``tokens [B]`` int32, ``logprobs [B]`` float32 under `sampling_logprobs`)."""
    logprobs = sampling_logprobs(cfg, logits)
    if cfg.greedy:
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
        tokens = jax.vmap(jax.random.categorical)(keys, logprobs).astype(jnp.int32)
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    return tokens, chosen
