"""Qwen2 / Qwen2.5 decoder in Flax Linen, used functionally.

The parameters are a plain nested dict (a pytree); every entry point is a pure function of
``(config, params, inputs)``. Layers are stacked along a leading ``layers`` axis and run with
``nn.scan``, so a 24-layer model compiles one layer body.

Shapes: B batch, T new tokens, S cache slots, D hidden, H query heads, K kv heads, G = H / K,
Dh head dim, F FFN width, V vocab, L layers.

The KV cache is one buffer per k/v for all layers, ``[L, B, K, S, Dh]``, carried through the
layer scan and updated in place (``dynamic_update_slice`` on the carry). Every row has its own
write offset, so rows can be at different lengths (the multi-turn sampler appends observations
to some rows while others decode).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from dgpo_jax.models.config import Qwen2Config

Array = jax.Array
Params = Any  # nested dict of arrays
_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: fully-masked rows give no NaN


# ----------------------------------------------------------------------------------------------
# Sharding hook: the model names activation axes; a plan (dgpo_jax.sharding) maps them to the mesh.
# ----------------------------------------------------------------------------------------------
def _constrain(plan, x: Array, names: tuple[str | None, ...]) -> Array:
    return x if plan is None else plan.constrain(x, names)


def _param(module: nn.Module, name: str, init: Callable, shape, names, dtype):
    return module.param(name, nn.with_logical_partitioning(init, names), shape, dtype)


_dense_init = nn.initializers.normal(stddev=0.02)


def rms_norm(x: Array, weight: Array, eps: float) -> Array:
    """Reference numerics: normalise in float32, cast back to the input dtype, then scale."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * x32.astype(x.dtype)


def rope_tables(positions: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
    """cos/sin ``[B, T, Dh]`` in float32 for the split-half (``rotate_half``) layout."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """x ``[B, T, N, Dh]``; cos/sin ``[B, T, Dh]``. Angles and the rotation in float32."""
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


def _matmul(eq: str, a: Array, b: Array) -> Array:
    """einsum with float32 accumulation, result in the activation dtype."""
    return jnp.einsum(eq, a, b.astype(a.dtype), preferred_element_type=jnp.float32).astype(a.dtype)


@flax.struct.dataclass
class KVCache:
    """Per-row KV cache for all layers.

    k, v:     ``[L, B, K, S, Dh]``
    valid:    ``[B, S]`` bool, slot holds a real token (left padding and holes are False)
    end:      ``[B]`` int32, next slot to write in each row
    next_pos: ``[B]`` int32, RoPE position of the next real token in each row
    """

    k: Array
    v: Array
    valid: Array
    end: Array
    next_pos: Array

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------
def _write_rows(buf: Array, new: Array, offsets: Array) -> Array:
    """buf ``[B, K, S, Dh]``; new ``[B, T, K, Dh]`` written at per-row slot ``offsets [B]``."""
    new = jnp.swapaxes(new, 1, 2).astype(buf.dtype)
    return jax.vmap(lambda b, n, o: jax.lax.dynamic_update_slice(b, n, (0, o, 0)))(
        buf, new, offsets
    )


class Attention(nn.Module):
    config: Qwen2Config
    param_dtype: Any = jnp.float32
    plan: Any = None

    @nn.compact
    def __call__(self, x, cos, sin, mask, layer_cache=None, write_at=None):
        """Grouped-query attention with q/k/v biases.

        x ``[B, T, D]``; cos/sin ``[B, T, Dh]``; mask ``[B, T, S]`` bool (S = T without a cache).
        layer_cache: None, or (k, v) ``[B, K, S, Dh]``; this step's k/v are written at per-row
        slots ``write_at [B]`` before attending. Returns (out ``[B, T, D]``, new layer cache).
        """
        c = self.config
        d, h, kv, hd = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.dim_per_head
        pd = self.param_dtype
        wq = _param(self, "q_kernel", _dense_init, (d, h, hd), ("embed", "q_heads", "head_dim"), pd)
        bq = _param(self, "q_bias", nn.initializers.zeros, (h, hd), ("q_heads", "head_dim"), pd)
        wk = _param(
            self, "k_kernel", _dense_init, (d, kv, hd), ("embed", "kv_heads", "head_dim"), pd
        )
        bk = _param(self, "k_bias", nn.initializers.zeros, (kv, hd), ("kv_heads", "head_dim"), pd)
        wv = _param(
            self, "v_kernel", _dense_init, (d, kv, hd), ("embed", "kv_heads", "head_dim"), pd
        )
        bv = _param(self, "v_bias", nn.initializers.zeros, (kv, hd), ("kv_heads", "head_dim"), pd)
        wo = _param(self, "o_kernel", _dense_init, (h, hd, d), ("q_heads", "head_dim", "embed"), pd)

        q = _matmul("btd,dnh->btnh", x, wq) + bq.astype(x.dtype)
        k = _matmul("btd,dnh->btnh", x, wk) + bk.astype(x.dtype)
        v = _matmul("btd,dnh->btnh", x, wv) + bv.astype(x.dtype)
        q = _constrain(
            self.plan, apply_rope(q, cos, sin), ("batch", "seq", "act_heads", "head_dim")
        )
        k = _constrain(
            self.plan, apply_rope(k, cos, sin), ("batch", "seq", "act_kv_heads", "head_dim")
        )
        v = _constrain(self.plan, v, ("batch", "seq", "act_kv_heads", "head_dim"))

        if layer_cache is None:
            keys, values, new_cache = k, v, None  # [B, S=T, K, Dh]
            score_eq, out_eq = "btkgh,bskh->bkgts", "bkgts,bskh->btkgh"
        else:
            keys = _write_rows(layer_cache[0], k, write_at)  # [B, K, S, Dh]
            values = _write_rows(layer_cache[1], v, write_at)
            new_cache = (keys, values)
            keys, values = keys.astype(x.dtype), values.astype(x.dtype)
            score_eq, out_eq = "btkgh,bksh->bkgts", "bkgts,bksh->btkgh"
        b, t = x.shape[:2]
        qg = q.reshape(b, t, kv, c.num_groups, hd)
        scores = jnp.einsum(score_eq, qg, keys, preferred_element_type=jnp.float32) * (hd**-0.5)
        scores = jnp.where(mask[:, None, None, :, :], scores, _NEG)
        probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
        attn = jnp.einsum(out_eq, probs, values, preferred_element_type=jnp.float32).astype(x.dtype)
        out = _matmul("btnh,nhd->btd", attn.reshape(b, t, h, hd), wo)
        return out, new_cache


class MLP(nn.Module):
    config: Qwen2Config
    param_dtype: Any = jnp.float32
    plan: Any = None

    @nn.compact
    def __call__(self, x):
        """SwiGLU without biases: ``down(silu(gate(x)) * up(x))``."""
        c, pd = self.config, self.param_dtype
        d, f = c.hidden_size, c.intermediate_size
        wg = _param(self, "gate_kernel", _dense_init, (d, f), ("embed", "mlp"), pd)
        wu = _param(self, "up_kernel", _dense_init, (d, f), ("embed", "mlp"), pd)
        wd = _param(self, "down_kernel", _dense_init, (f, d), ("mlp", "embed"), pd)
        hidden = jax.nn.silu(_matmul("btd,df->btf", x, wg)) * _matmul("btd,df->btf", x, wu)
        hidden = _constrain(self.plan, hidden, ("batch", "seq", "act_mlp"))
        return _matmul("btf,fd->btd", hidden, wd)


class DecoderLayer(nn.Module):
    config: Qwen2Config
    param_dtype: Any = jnp.float32
    plan: Any = None

    @nn.compact
    def __call__(self, carry, cos, sin, mask, write_at):
        """carry = (h ``[B, T, D]``, cache (k, v) ``[L, B, K, S, Dh]`` or None, layer index)."""
        h, cache, layer = carry
        c, pd = self.config, self.param_dtype
        ln1 = _param(self, "input_norm", nn.initializers.ones, (c.hidden_size,), ("norm",), pd)
        ln2 = _param(
            self, "post_attention_norm", nn.initializers.ones, (c.hidden_size,), ("norm",), pd
        )
        attention = Attention(c, pd, self.plan, name="attn")
        x = rms_norm(h, ln1, c.rms_norm_eps)
        if cache is None:
            attn, _ = attention(x, cos, sin, mask)
        else:
            ck, cv = cache
            layer_kv = (
                jax.lax.dynamic_index_in_dim(ck, layer, 0, keepdims=False),
                jax.lax.dynamic_index_in_dim(cv, layer, 0, keepdims=False),
            )
            attn, (lk, lv) = attention(x, cos, sin, mask, layer_kv, write_at)
            cache = (
                jax.lax.dynamic_update_index_in_dim(ck, lk, layer, 0),
                jax.lax.dynamic_update_index_in_dim(cv, lv, layer, 0),
            )
        h = _constrain(self.plan, h + attn, ("batch", "seq", "act_embed"))
        h = h + MLP(c, pd, self.plan, name="mlp")(rms_norm(h, ln2, c.rms_norm_eps))
        h = _constrain(self.plan, h, ("batch", "seq", "act_embed"))
        return (h, cache, layer + 1), None


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Qwen2(nn.Module):
    """Embedding, ``num_hidden_layers`` scanned decoder layers, final norm, (tied) LM head."""

    config: Qwen2Config
    param_dtype: Any = jnp.float32
    plan: Any = None

    def setup(self):
        c, pd = self.config, self.param_dtype
        self.embedding = _param(
            self, "embed_tokens", _dense_init, (c.vocab_size, c.hidden_size), ("vocab", "embed"), pd
        )
        self.final_norm = _param(
            self, "final_norm", nn.initializers.ones, (c.hidden_size,), ("norm",), pd
        )
        if not c.tie_word_embeddings:
            self.lm_head = _param(
                self, "lm_head", _dense_init, (c.hidden_size, c.vocab_size), ("embed", "vocab"), pd
            )
        layer_cls = DecoderLayer
        if c.remat != "none":
            layer_cls = nn.remat(DecoderLayer, policy=_REMAT_POLICIES[c.remat], prevent_cse=False)
        self.layers = nn.scan(
            layer_cls,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
            length=c.num_hidden_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(c, pd, self.plan, name="layers")

    def hidden(self, input_ids, positions, mask, cache_kv=None, write_at=None):
        """Final-norm hidden states ``[B, T, D]`` (and the new cache k/v, or None)."""
        c = self.config
        h = jnp.take(self.embedding, input_ids, axis=0)
        h = _constrain(self.plan, h, ("batch", "seq", "act_embed"))
        cos, sin = rope_tables(positions, c.dim_per_head, c.rope_theta)
        (h, cache_kv, _), _ = self.layers((h, cache_kv, jnp.int32(0)), cos, sin, mask, write_at)
        return rms_norm(h, self.final_norm, c.rms_norm_eps), cache_kv

    def logits(self, h, dtype=jnp.float32):
        """``[..., D] -> [..., V]`` through the tied embedding or the untied head."""
        if self.config.tie_word_embeddings:
            return jnp.einsum(
                "...d,vd->...v",
                h,
                self.embedding.astype(h.dtype),
                preferred_element_type=jnp.float32,
            ).astype(dtype)
        return jnp.einsum(
            "...d,dv->...v", h, self.lm_head.astype(h.dtype), preferred_element_type=jnp.float32
        ).astype(dtype)

    def __call__(self, input_ids, positions, mask):
        h, _ = self.hidden(input_ids, positions, mask)
        return self.logits(h)


# ----------------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------------
def _module(config: Qwen2Config, params_or_dtype=jnp.float32, plan=None) -> Qwen2:
    if isinstance(params_or_dtype, dict):
        params_or_dtype = params_or_dtype["embed_tokens"].dtype
    return Qwen2(config, jnp.dtype(params_or_dtype), plan)


def _dummy_inputs():
    ids = jnp.zeros((1, 1), jnp.int32)
    return ids, ids, jnp.ones((1, 1, 1), bool)


def init_params(config: Qwen2Config, rng: Array, dtype=jnp.float32) -> Params:
    """Random parameters (normal(0.02) weights, zero biases, unit norms) as a plain dict."""
    variables = _module(config, dtype).init(rng, *_dummy_inputs())
    return nn.meta.unbox(variables["params"])


def param_shapes(config: Qwen2Config, dtype=jnp.float32) -> Params:
    """The parameter tree as ``jax.ShapeDtypeStruct`` leaves (nothing is allocated)."""
    boxed = jax.eval_shape(lambda: _module(config, dtype).init(jax.random.key(0), *_dummy_inputs()))
    return nn.meta.unbox(boxed["params"])


def param_logical_axes(config: Qwen2Config) -> Params:
    """Logical axis names of every parameter, as ``PartitionSpec`` leaves (same tree)."""
    boxed = jax.eval_shape(lambda: _module(config).init(jax.random.key(0), *_dummy_inputs()))
    return nn.get_partition_spec(boxed["params"])


def positions_from_mask(attention_mask: Array) -> Array:
    """RoPE positions for a (left- or right-) padded batch: count of real tokens before each."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def causal_mask(attention_mask: Array) -> Array:
    """``[B, T]`` padding mask -> ``[B, T, T]`` bool (query t sees real keys s <= t)."""
    t = attention_mask.shape[-1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    return causal[None] & attention_mask.astype(bool)[:, None, :]


@functools.partial(jax.jit, static_argnames=("config", "plan"))
def forward_hidden(
    config: Qwen2Config,
    params: Params,
    input_ids: Array,
    attention_mask: Array | None = None,
    plan=None,
) -> Array:
    """Final hidden states ``[B, T, D]`` (use with ``lm_logits`` to chunk over the vocabulary)."""
    if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    m = _module(config, params, plan)
    h, _ = m.apply(
        {"params": params},
        input_ids,
        positions_from_mask(attention_mask),
        causal_mask(attention_mask),
        method=Qwen2.hidden,
    )
    return h


def lm_logits(config: Qwen2Config, params: Params, hidden: Array, dtype=jnp.float32) -> Array:
    """Hidden states ``[..., D]`` -> logits ``[..., V]`` (float32 by default)."""
    return _module(config, params).apply({"params": params}, hidden, dtype, method=Qwen2.logits)


@functools.partial(jax.jit, static_argnames=("config", "plan"))
def forward(
    config: Qwen2Config,
    params: Params,
    input_ids: Array,
    attention_mask: Array | None = None,
    plan=None,
) -> Array:
    """Logits ``[B, T, V]`` (float32) for a batch of token ids ``[B, T]``.

    ``attention_mask [B, T]`` (1 = real token) handles left or right padding: positions are
    counted over real tokens only, and padded keys are never attended to. Logits at padded
    positions are meaningless.
    """
    h = forward_hidden(config, params, input_ids, attention_mask, plan)
    return lm_logits(config, params, h)


# ----------------------------------------------------------------------------------------------
# KV-cache decoding
# ----------------------------------------------------------------------------------------------
def init_cache(config: Qwen2Config, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    shape = (
        config.num_hidden_layers,
        batch,
        config.num_key_value_heads,
        max_len,
        config.dim_per_head,
    )
    return KVCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        valid=jnp.zeros((batch, max_len), bool),
        end=jnp.zeros((batch,), jnp.int32),
        next_pos=jnp.zeros((batch,), jnp.int32),
    )


def forward_with_cache(
    config: Qwen2Config,
    params: Params,
    input_ids: Array,
    cache: KVCache,
    token_mask: Array | None = None,
    plan=None,
    return_hidden: bool = False,
) -> tuple[Array, KVCache]:
    """Run ``input_ids [B, T]`` against the cache and append them to it; returns logits/hidden.

    ``token_mask [B, T]`` marks real tokens. Each row writes its T tokens at slots
    ``cache.end[b] ...``; real tokens get consecutive RoPE positions from ``cache.next_pos[b]``.
    The row's write offset then advances to just after its last real token, so a left-padded
    prompt keeps its pad slots (masked out) and a right-padded chunk leaves no hole. A row with
    no real token is left unchanged. Works for prefill (T = prompt length), single-token decode
    (T = 1) and chunked ingestion of observations.

    Not jitted itself: call it inside a jitted program (the sampler) or wrap it.
    """
    b, t = input_ids.shape
    if token_mask is None:
        token_mask = jnp.ones((b, t), bool)
    token_mask = token_mask.astype(bool)
    s = cache.max_len
    positions = cache.next_pos[:, None] + jnp.cumsum(token_mask, axis=1, dtype=jnp.int32) - 1
    positions = jnp.maximum(positions, 0)
    slots = cache.end[:, None] + jnp.arange(t, dtype=jnp.int32)[None]  # [B, T]
    # This step's real tokens make their slots valid (writes past S are dropped: the caller
    # checks capacity, since dynamic_update_slice would clamp the offset).
    new_valid = jax.vmap(lambda v, i, m: v.at[i].max(m, mode="drop"))(
        cache.valid, slots, token_mask
    )
    # Query t (at slot end+t) sees the valid slots up to its own.
    key_slots = jnp.arange(s, dtype=jnp.int32)
    mask = new_valid[:, None, :] & (key_slots[None, None, :] <= slots[:, :, None])
    m = _module(config, params, plan)
    h, (k, v) = m.apply(
        {"params": params},
        input_ids,
        positions,
        mask,
        (cache.k, cache.v),
        cache.end,
        method=Qwen2.hidden,
    )
    last_real = jnp.max(jnp.where(token_mask, jnp.arange(1, t + 1)[None], 0), axis=1)
    cache = KVCache(
        k=k,
        v=v,
        valid=new_valid,
        end=cache.end + last_real,
        next_pos=cache.next_pos + jnp.sum(token_mask, axis=1, dtype=jnp.int32),
    )
    if return_hidden:
        return h, cache
    return lm_logits(config, params, h), cache


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "cache_len"))
def greedy_generate(
    config: Qwen2Config,
    params: Params,
    input_ids: Array,
    attention_mask: Array,
    max_new_tokens: int,
    cache_len: int | None = None,
) -> Array:
    """Greedy decoding with the KV cache: prefill the left-padded prompt, then one token a step.

    Returns the new tokens ``[B, max_new_tokens]`` (no early stop; the full sampler with stop
    sequences, sampling and tool calls lives in ``dgpo_jax.sampler``).
    """
    b, t = input_ids.shape
    cache_len = cache_len or t + max_new_tokens
    if cache_len < t + max_new_tokens:
        raise ValueError(f"cache_len {cache_len} < prompt {t} + max_new_tokens {max_new_tokens}")
    dtype = params["embed_tokens"].dtype
    cache = init_cache(config, b, cache_len, dtype)
    logits, cache = forward_with_cache(config, params, input_ids, cache, attention_mask)
    first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)

    def step(carry, _):
        token, cache = carry
        logits, cache = forward_with_cache(config, params, token[:, None], cache)
        nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        return (nxt, cache), token

    (_, _), tokens = jax.lax.scan(step, (first, cache), None, length=max_new_tokens)
    return tokens.T
