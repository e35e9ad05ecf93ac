"""Attention of the uncached (training / scoring) path: one dispatcher over several kernels.

Shapes: B batch, T positions, K kv heads, G query heads per kv head, H = K * G, Dh head dim.
Queries ``[B, T, K, G, Dh]`` (or ``[B, T, H, Dh]``; query head ``k * G + g`` uses kv head k),
keys/values ``[B, T, K, Dh]``, ``segment_ids [B, T]`` int: 0 = padding, k > 0 = the k-th
sequence packed into the row. A query attends to the keys at or before it in its own nonzero
segment. Scores and softmax in float32, the output in the queries' dtype; a padding query gets
0 (and passes no gradient).

Kernels (``Qwen2Config.attention``; design and measurements in docs/attention.md):

- ``xla``: the materialised reference, ``[B, K, G, T, T]`` float32 scores kept for the backward.
- ``chunked``: blockwise flash attention in pure JAX (``jax.custom_vjp``): an online softmax over
  key blocks; the forward saves only the output and the per-query log-sum-exp and the backward
  recomputes the scores block by block, so both keep O(T x block) memory. Key blocks that
  causality or the segments hide from a whole query block are skipped.
- ``cudnn``: cuDNN flash attention through ``jax.nn.dot_product_attention`` (GPU; bfloat16 or
  float16). Causality is cuDNN's own; segments and padding go in as a boolean mask.
- ``splash``: Pallas TPU splash attention with segment ids, under ``shard_map`` over the plan's
  mesh (batch over the batch axes, heads over ``tensor`` where they divide).
- ``auto``: cudnn on GPU (chunked where cuDNN cannot: float32, odd head dims), splash on TPU,
  and on CPU chunked above `CPU_CHUNKED_MIN_LEN` positions, xla below.

The backend is the platform of the plan's mesh devices when a plan is given (a TPU topology
compiled on a CPU host picks splash), else ``jax.default_backend()``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dgpo_jax.models.config import ATTENTION_KERNELS

Array = jax.Array
_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: fully-masked rows give no NaN

# `auto` on CPU: sequences longer than this use `chunked` (measured in docs/attention.md).
CPU_CHUNKED_MIN_LEN = 512
_BACKEND_KERNELS = {"cudnn": "gpu", "splash": "tpu"}
_BACKEND_LIBRARY = {"cudnn": "cuDNN", "splash": "Pallas TPU splash attention"}


# ----------------------------------------------------------------------------------------------
# Kernel choice
# ----------------------------------------------------------------------------------------------
def backend(plan=None) -> str:
    """``cpu`` | ``gpu`` | ``tpu``: the platform of the plan's mesh devices, else JAX's default
    backend."""
    if plan is not None:
        platform = plan.mesh.devices.flat[0].platform
    else:
        platform = jax.default_backend()
    return "gpu" if platform in ("cuda", "rocm") else platform


def _cudnn_supports(dtype, head_dim: int) -> bool:
    return jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and (
        head_dim % 8 == 0 and head_dim <= 128
    )


def resolve_kernel(
    kernel: str, seq_len: int, plan=None, dtype=jnp.bfloat16, head_dim: int = 64
) -> str:
    """The kernel that ``kernel`` runs as for this backend, length, dtype and head dim
    (``auto`` resolved). Raises ValueError for an unknown name or a kernel the backend lacks."""
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(
            f"unknown attention kernel {kernel!r}; valid: {', '.join(ATTENTION_KERNELS)}"
        )
    platform = backend(plan)
    if kernel == "auto":
        if platform == "tpu":
            return "splash"
        if platform == "gpu":
            return "cudnn" if _cudnn_supports(dtype, head_dim) else "chunked"
        return "chunked" if seq_len > CPU_CHUNKED_MIN_LEN else "xla"
    needs = _BACKEND_KERNELS.get(kernel)
    if needs is not None and platform != needs:
        raise ValueError(
            f"attention={kernel!r} needs a {needs.upper()} backend ({_BACKEND_LIBRARY[kernel]}); "
            f"this program runs on {platform}"
        )
    if kernel == "cudnn" and not _cudnn_supports(dtype, head_dim):
        raise ValueError(
            f"attention='cudnn' needs bfloat16 or float16 activations and a head dim that is a "
            f"multiple of 8 up to 128; got {jnp.dtype(dtype).name} and {head_dim} "
            "(use 'chunked' or 'auto')"
        )
    return kernel


def attention(
    q: Array,
    k: Array,
    v: Array,
    segment_ids: Array,
    *,
    kernel: str = "auto",
    block: int = 512,
    plan=None,
) -> Array:
    """Causal attention within segments (module docstring) by ``kernel``; ``block`` is the block
    size of ``chunked`` and ``splash``; ``plan`` a ``ShardingPlan`` (mesh for ``splash``, and the
    backend for ``auto``). Returns the queries' shape and dtype."""
    kv_heads, head_dim = k.shape[2], k.shape[3]
    if q.shape[-1] != head_dim or k.shape != v.shape or q.shape[:2] != k.shape[:2]:
        raise ValueError(f"attention: q {q.shape}, k {k.shape}, v {v.shape} do not match")
    if segment_ids.shape != q.shape[:2]:
        raise ValueError(f"attention: segment_ids {segment_ids.shape}, expected {q.shape[:2]}")
    name = resolve_kernel(kernel, q.shape[1], plan, q.dtype, head_dim)
    shape = q.shape
    q = _grouped(q, kv_heads)
    segment_ids = segment_ids.astype(jnp.int32)
    if name == "xla":
        out = xla_attention(q, k, v, segment_ids)
    elif name == "chunked":
        out = chunked_attention(q, k, v, segment_ids, block)
    elif name == "cudnn":
        out = cudnn_attention(q, k, v, segment_ids)
    else:
        out = splash_attention(q, k, v, segment_ids, block, plan)
    return out.reshape(shape)


def _grouped(q: Array, kv_heads: int) -> Array:
    if q.ndim == 5:
        return q
    b, t, h, dh = q.shape
    return q.reshape(b, t, kv_heads, h // kv_heads, dh)


def _zero_padding(out: Array, segment_ids: Array) -> Array:
    real = (segment_ids > 0).reshape(segment_ids.shape + (1,) * (out.ndim - 2))
    return jnp.where(real, out, jnp.zeros((), out.dtype))


# ----------------------------------------------------------------------------------------------
# xla: the materialised reference
# ----------------------------------------------------------------------------------------------
def segment_mask(segment_ids: Array) -> Array:
    """``[B, T]`` segment ids -> ``[B, T, T]`` bool: query t sees key s <= t of its segment."""
    t = segment_ids.shape[-1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return causal[None] & same & (segment_ids[:, None, :] > 0)


def xla_attention(q: Array, k: Array, v: Array, segment_ids: Array) -> Array:
    """q ``[B, T, K, G, Dh]``; ``[B, K, G, T, T]`` float32 scores, materialised."""
    dtype = q.dtype
    mask = segment_mask(segment_ids)[:, None, None]
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask, scores * (q.shape[-1] ** -0.5), _NEG)
    probs = jax.nn.softmax(scores, axis=-1)
    # A query without a visible key (padding) gets 0, like the blockwise kernels.
    probs = jnp.where(jnp.any(mask, axis=-1, keepdims=True), probs, 0.0).astype(dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v, preferred_element_type=jnp.float32)
    return out.astype(dtype)


# ----------------------------------------------------------------------------------------------
# chunked: flash attention in pure JAX
# ----------------------------------------------------------------------------------------------
def _pad_time(x: Array, length: int) -> Array:
    if x.shape[1] == length:
        return x
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, length - x.shape[1])
    return jnp.pad(x, pad)


def _block_ranges(segment_ids: Array, block: int) -> tuple[Array, Array]:
    """For ``n`` blocks of ``block`` positions: ``first [n]``, the first key block that any
    real query of query block i can see, and ``last [n]``, the last query block that can see
    any real key of key block j (over the whole batch; segments are contiguous runs)."""
    b, t = segment_ids.shape
    n = t // block
    index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    before = jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    after = jnp.pad(segment_ids[:, 1:], ((0, 0), (0, 1)), constant_values=-1)
    run_start = jax.lax.cummax(jnp.where(segment_ids != before, index, 0), axis=1)
    run_end = jax.lax.cummin(jnp.where(segment_ids != after, index, t - 1), axis=1, reverse=True)
    real = segment_ids > 0
    own = index // block
    first = jnp.where(real, run_start // block, own).reshape(b, n, block).min(axis=(0, 2))
    last = jnp.where(real, run_end // block, own).reshape(b, n, block).max(axis=(0, 2))
    return first, last


def _block_mask(seg_q: Array, seg_k: Array, i: Array, j: Array, block: int) -> Array:
    """``[B, 1, 1, c, c]``: query block i sees key block j (causal, same nonzero segment)."""
    q_pos = i * block + jnp.arange(block)
    k_pos = j * block + jnp.arange(block)
    causal = k_pos[None, :] <= q_pos[:, None]
    mask = causal[None] & (seg_q[:, :, None] == seg_k[:, None, :]) & (seg_k[:, None, :] > 0)
    return mask[:, None, None]


def _take(x: Array, i: Array, block: int) -> Array:
    return jax.lax.dynamic_slice_in_dim(x, i * block, block, axis=1)


def _flash_forward(q, k, v, seg, first, block):
    """Output ``[B, T, K, G, Dh]`` and log-sum-exp ``[B, K, G, T]`` (0 for padding queries)."""
    b, t, kh, g, dh = q.shape
    dtype, scale = q.dtype, dh**-0.5

    def query_block(i):
        qi, si = _take(q, i, block), _take(seg, i, block)

        def key_block(j, carry):
            o, m, l = carry
            kj, vj, sj = _take(k, j, block), _take(v, j, block), _take(seg, j, block)
            s = jnp.einsum("bqkgd,bskd->bkgqs", qi, kj, preferred_element_type=jnp.float32)
            s = jnp.where(_block_mask(si, sj, i, j, block), s * scale, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            # A row with nothing visible yet keeps m = -inf: subtract 0 there (p = 0, no NaN).
            m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
            p = jnp.exp(s - m_safe[..., None])
            alpha = jnp.exp(m - m_safe)
            l = alpha * l + jnp.sum(p, axis=-1)
            pv = jnp.einsum(
                "bkgqs,bskd->bkgqd", p.astype(dtype), vj, preferred_element_type=jnp.float32
            )
            return alpha[..., None] * o + pv, m_new, l

        init = (
            jnp.zeros((b, kh, g, block, dh), jnp.float32),
            jnp.full((b, kh, g, block), -jnp.inf, jnp.float32),
            jnp.zeros((b, kh, g, block), jnp.float32),
        )
        # Only key blocks first[i] .. i: the rest are in the future or in other segments.
        o, m, l = jax.lax.fori_loop(first[i], i + 1, key_block, init)
        seen = l > 0
        safe_l = jnp.where(seen, l, 1.0)
        out = (o / safe_l[..., None]).astype(dtype)
        lse = jnp.where(seen, m + jnp.log(safe_l), 0.0)
        return jnp.transpose(out, (0, 3, 1, 2, 4)), lse

    n = t // block
    outs, lses = jax.lax.map(query_block, jnp.arange(n, dtype=jnp.int32))
    out = jnp.moveaxis(outs, 0, 1).reshape(b, t, kh, g, dh)  # [n, B, c, ...] -> [B, T, ...]
    lse = jnp.moveaxis(lses, 0, 3).reshape(b, kh, g, t)  # [n, B, K, G, c] -> [B, K, G, T]
    return out, lse


def _flash_backward(q, k, v, seg, last, out, lse, dout, block):
    """Gradients by key block j (outer) and the query blocks j .. last[j] that see it (inner);
    dq accumulates in one float32 buffer ``[B, T, K, G, Dh]``."""
    b, t, kh, g, dh = q.shape
    dtype, scale = q.dtype, dh**-0.5
    # delta_t = sum_d dout * out: the softmax backward's row term, [B, K, G, T].
    delta = jnp.einsum(
        "btkgd,btkgd->bkgt",
        dout.astype(jnp.float32),
        out.astype(jnp.float32),
    )

    def key_block(dq, j):
        kj, vj, sj = _take(k, j, block), _take(v, j, block), _take(seg, j, block)

        def query_block(i, carry):
            dq, dk, dv = carry
            qi, doi, si = _take(q, i, block), _take(dout, i, block), _take(seg, i, block)
            lse_i = jax.lax.dynamic_slice_in_dim(lse, i * block, block, axis=3)
            delta_i = jax.lax.dynamic_slice_in_dim(delta, i * block, block, axis=3)
            s = jnp.einsum("bqkgd,bskd->bkgqs", qi, kj, preferred_element_type=jnp.float32)
            s = jnp.where(_block_mask(si, sj, i, j, block), s * scale - lse_i[..., None], -jnp.inf)
            p = jnp.exp(s)  # [B, K, G, cq, ck]
            dv = dv + jnp.einsum(
                "bkgqs,bqkgd->bskd", p.astype(dtype), doi, preferred_element_type=jnp.float32
            )
            dp = jnp.einsum("bqkgd,bskd->bkgqs", doi, vj, preferred_element_type=jnp.float32)
            ds = (p * (dp - delta_i[..., None]) * scale).astype(dtype)
            dk = dk + jnp.einsum("bkgqs,bqkgd->bskd", ds, qi, preferred_element_type=jnp.float32)
            dq_i = jnp.einsum("bkgqs,bskd->bqkgd", ds, kj, preferred_element_type=jnp.float32)
            dq = jax.lax.dynamic_update_slice_in_dim(
                dq, _take(dq, i, block) + dq_i, i * block, axis=1
            )
            return dq, dk, dv

        zeros = jnp.zeros((b, block, kh, dh), jnp.float32)
        dq, dk, dv = jax.lax.fori_loop(j, last[j] + 1, query_block, (dq, zeros, zeros))
        return dq, (dk, dv)

    n = t // block
    dq0 = jnp.zeros((b, t, kh, g, dh), jnp.float32)
    dq, (dks, dvs) = jax.lax.scan(key_block, dq0, jnp.arange(n, dtype=jnp.int32))
    dk = jnp.moveaxis(dks, 0, 1).reshape(b, t, kh, dh)
    dv = jnp.moveaxis(dvs, 0, 1).reshape(b, t, kh, dh)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash(q, k, v, seg, first, last, block):
    return _flash_forward(q, k, v, seg, first, block)[0]


def _flash_fwd(q, k, v, seg, first, last, block):
    out, lse = _flash_forward(q, k, v, seg, first, block)
    return out, (q, k, v, seg, last, out, lse)


def _flash_bwd(block, residuals, dout):
    q, k, v, seg, last, out, lse = residuals
    dq, dk, dv = _flash_backward(q, k, v, seg, last, out, lse, dout, block)
    return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def chunked_attention(q: Array, k: Array, v: Array, segment_ids: Array, block: int = 512):
    """q ``[B, T, K, G, Dh]``: flash attention over blocks of at most ``block`` positions. The
    T positions are split into ceil(T / block) equal blocks (rounded up to a multiple of 8,
    padding positions at the end), so T = 520 runs two blocks of 264, not two of 512."""
    t = q.shape[1]
    count = -(-t // min(block, t))
    block = -(-t // count)
    block = block if count == 1 else -(-block // 8) * 8
    padded = count * block
    seg = _pad_time(segment_ids, padded)
    first, last = _block_ranges(seg, block)
    q, k, v = (_pad_time(x, padded) for x in (q, k, v))
    return _flash(q, k, v, seg, first, last, block)[:, :t]


# ----------------------------------------------------------------------------------------------
# cudnn: cuDNN flash attention (GPU)
# ----------------------------------------------------------------------------------------------
def cudnn_attention(q: Array, k: Array, v: Array, segment_ids: Array) -> Array:
    """cuDNN through ``jax.nn.dot_product_attention``: causal by cuDNN (it skips the upper
    triangle); segments as a ``[B, 1, T, T]`` boolean mask, which cuDNN turns into an additive
    bias (the cost is in docs/attention.md). Padding positions form their own segment (every
    row keeps a visible key, so no softmax over nothing) and their outputs are zeroed."""
    b, t, kh, g, dh = q.shape
    mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    out = jax.nn.dot_product_attention(
        q.reshape(b, t, kh * g, dh), k, v, mask=mask, is_causal=True, implementation="cudnn"
    )
    return _zero_padding(out.reshape(q.shape), segment_ids)


# ----------------------------------------------------------------------------------------------
# splash: Pallas TPU splash attention under shard_map
# ----------------------------------------------------------------------------------------------
def _splash_specs(plan, shape):
    """PartitionSpec entries for the batch, kv-head and group dims of q ``[B, T, K, G, Dh]``."""
    if plan is None:
        return None, None, None
    b, _, kh, g, _ = shape
    batch = plan.spec(("batch",), (b,))[0]
    kv_heads = plan.spec(("act_kv_heads",), (kh,))[0]
    groups = None if kv_heads is not None else plan.spec(("act_heads",), (g,))[0]
    return batch, kv_heads, groups


def splash_attention(
    q: Array,
    k: Array,
    v: Array,
    segment_ids: Array,
    block: int = 512,
    plan=None,
    interpret: bool = False,
) -> Array:
    """q ``[B, T, K, G, Dh]``: splash attention (causal mask, segment ids) per row, under
    ``shard_map`` over the plan's mesh (a 1-device mesh without a plan). T is padded up to a
    multiple of the block (itself a multiple of 128, the kernel's lane width). ``interpret``
    runs the kernel in the Pallas interpreter (any backend; tests)."""
    # Pallas TPU modules load only when splash is used.
    from jax.experimental.pallas.ops.tpu import splash_attention as splash  # noqa: PLC0415
    from jax.sharding import Mesh, PartitionSpec  # noqa: PLC0415

    b, t, kh, g, dh = q.shape
    dtype = q.dtype
    block = min(block, -(-t // 128) * 128)
    block = -(-block // 128) * 128
    padded = -(-t // block) * block
    seg = _pad_time(segment_ids, padded)
    q, k, v = (_pad_time(x, padded) for x in (q, k, v))
    q = (q.astype(jnp.float32) * dh**-0.5).astype(dtype)  # splash does not scale the scores

    mesh = plan.mesh if plan is not None else Mesh(np.array(jax.devices()[:1]), ("data",))
    batch, kv_spec, group_spec = _splash_specs(plan, q.shape)
    q_spec = PartitionSpec(batch, None, kv_spec, group_spec, None)
    kv_spec_full = PartitionSpec(batch, None, kv_spec, None)
    seg_spec = PartitionSpec(batch, None)

    def local(q, k, v, seg):
        lb, lt, lk, lg, _ = q.shape
        heads = lk * lg
        sizes = splash.BlockSizes(
            block_q=block,
            block_kv=block,
            block_kv_compute=block,
            block_q_dkv=block,
            block_kv_dkv=block,
            block_kv_dkv_compute=block,
            block_q_dq=block,
            block_kv_dq=block,
        )
        mask = splash.MultiHeadMask([splash.CausalMask((lt, lt))] * heads)
        kernel = splash.make_splash_mha(
            mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
        )
        qh = jnp.transpose(q, (0, 2, 3, 1, 4)).reshape(lb, heads, lt, dh)  # head k*G+g
        kh_, vh = jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3))
        segments = jax.vmap(lambda s: splash.SegmentIds(q=s, kv=s))(seg)
        out = jax.vmap(kernel)(qh, kh_, vh, segments)  # [b, heads, T, Dh]
        return jnp.transpose(out.reshape(lb, lk, lg, lt, dh), (0, 3, 1, 2, 4)).astype(dtype)

    out = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(q_spec, kv_spec_full, kv_spec_full, seg_spec),
        out_specs=q_spec,
        check_vma=False,
    )(q, k, v, seg)
    return _zero_padding(out[:, :t], segment_ids)
