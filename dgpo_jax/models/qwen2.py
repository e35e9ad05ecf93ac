"""Qwen2 / Qwen2.5 decoder in Flax Linen, used functionally.

The parameters are a plain nested dict (a pytree); every entry point is a pure function of
``(config, params, inputs)``. Layers are stacked along a leading ``layers`` axis and run with
``nn.scan``, so a 24-layer model compiles one layer body.

Shapes: B batch, T new tokens, S cache slots, D hidden, H query heads, K kv heads, G = H / K,
Dh head dim, F FFN width, V vocab, L layers.

The KV cache is one buffer per k/v for all layers, ``[L, B, K, S, Dh]``, carried through the
layer scan: each layer scatters only its new entries into it (in place) and attends over a
window of slots chosen per step (`span_buckets`), so a step never copies the cache and reads
only the context in use. With `split_layers` weights it may also be one array per layer
(`split_cache`; XLA:GPU copies a layer's slice of a stacked array before a dot reads it), and
one-token steps may then attend through a ragged Pallas kernel (``decode_kernel="pallas"``) or
write and attend through one fused Triton kernel a layer (``decode_kernel="fused"``, GPUs).
On TPUs steps of several tokens for all rows (prefill, observation chunks) write and attend
through two Pallas kernels over the cache in place (``chunk_kernel``, `cache_attention`).
Every row has its own write offset, so rows can be at different lengths (the multi-turn
sampler appends observations to some rows while others decode), and a step may run on a subset
of the rows (``rows=``).

Without a cache (training, scoring) a row may pack several sequences (``segment_ids``): RoPE
positions restart per sequence and attention stays within it, computed by the kernel that
``config.attention`` names (`dgpo_jax.models.attention`: xla, chunked, cudnn, splash).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from dgpo_jax.models.attention import attention as attend
from dgpo_jax.models.cache_attention import (
    cached_chunk_attention,
    cached_chunk_attention_gpu,
    fused_decode_attention_gpu,
    gpu_chunk_blocks,
    visible_run,
    write_chunk,
)
from dgpo_jax.models.config import Qwen2Config

Array = jax.Array
Params = Any  # nested dict of arrays
_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: fully-masked rows give no NaN


# ----------------------------------------------------------------------------------------------
# Sharding hook: the model names activation axes; a plan (dgpo_jax.parallel.sharding) maps them to the mesh.
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


def _matmul(eq: str, a: Array, b: Array, plan=None) -> Array:
    """einsum with float32 accumulation and one rounding to the activation dtype. Off CPU
    (`compile_platform`) the dot itself returns the activation dtype: GPUs and TPUs accumulate
    a bfloat16 dot in float32 either way (XLA:GPU keeps split-K partial sums in float32), but
    given a float32 result XLA:GPU writes it from the gemm and casts in the next kernel, and the
    `dots` remat policy saves that float32 output: 9.2 GiB more in `dgpo_nq`'s update step on
    an H100, 0.34 GB more a decode step on an H200 (docs/gpu.md). XLA:CPU is the other way
    round: its native bfloat16 dot returns float32, and asked for bfloat16 it converts the
    weights to float32 first (a float32 copy of the weights in temporaries)."""
    b = b.astype(a.dtype)
    if compile_platform(plan) != "cpu":
        return jnp.einsum(eq, a, b, preferred_element_type=a.dtype)
    return jnp.einsum(eq, a, b, preferred_element_type=jnp.float32).astype(a.dtype)


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
        return (self.k[0] if isinstance(self.k, tuple) else self.k).shape[3]


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------
# On TPUs a chunk of several tokens a row is written into its layer's slice of the stacked cache
# (sliced out, updated, put back in place): written into the stack directly, the TPU compiler
# relaid the whole stack out for the scatter and back, in every layer (docs/scaleout.md).
# None: by the platform (`_write_by_layer`); a bool forces it.
WRITE_CHUNKS_BY_LAYER: bool | None = None


def _write_by_layer(plan, tokens: int) -> bool:
    if WRITE_CHUNKS_BY_LAYER is not None:
        return WRITE_CHUNKS_BY_LAYER and tokens > 1
    return tokens > 1 and compile_platform(plan) == "tpu"


def _scatter_kv(
    buf: Array,
    new: Array,
    layer: Array,
    rows: Array | None,
    slots: Array,
    by_layer: bool = False,
) -> Array:
    """Write this step's keys (or values) into the stacked cache in place.

    buf ``[L, B, K, S, Dh]``; new ``[M, T, K, Dh]`` for cache rows ``rows [M]`` (None: all B
    rows, M = B) at per-token slots ``slots [M, T]``; out-of-range slots/rows are dropped. Only
    the M x T new entries are written (no copy of the layer's cache), or with ``by_layer``
    (all rows) into the layer's slice, which is then put back (`WRITE_CHUNKS_BY_LAYER`).
    """
    row_index = jnp.arange(new.shape[0]) if rows is None else rows
    if by_layer and rows is None:
        part = _read_kv(buf, layer, None, buf.shape[3])
        part = part.at[row_index[:, None], :, slots, :].set(new.astype(buf.dtype), mode="drop")
        return jax.lax.dynamic_update_slice(buf, part[None], (layer, 0, 0, 0, 0))
    return buf.at[layer, row_index[:, None], :, slots, :].set(new.astype(buf.dtype), mode="drop")


def _read_kv(buf: Array, layer: Array, rows: Array | None, width: int, start: int = 0) -> Array:
    """Slots ``[start, start + width)`` of one layer: ``[M, K, width, Dh]`` for ``rows [M]``
    (None: all; a dummy row index >= B reads row B - 1)."""
    if rows is None:
        _, b, k, _, dh = buf.shape
        return jax.lax.dynamic_slice(buf, (layer, 0, 0, start, 0), (1, b, k, width, dh))[0]
    return buf[layer, jnp.minimum(rows, buf.shape[1] - 1), :, start : start + width, :]


def span_buckets(max_len: int, smallest: int = 128) -> tuple[int, ...]:
    """Static key-window widths for cached attention: `smallest`, then two per doubling (x1.5,
    x2: 128, 192, 256, 384, 512, 768, ...), then ``max_len``. A step attends over the smallest
    window that holds every slot it can see (so it reads at most ~1.5x the slots in use)."""
    widths, width = [], smallest
    while width < max_len:
        widths.append(width)
        half_step = width + width // 2
        if half_step < max_len:
            widths.append(half_step)
        width *= 2
    return tuple(widths) + (max_len,)


def _attention_window(q, keys, values, mask, dtype, dots: bool = True):
    """Attention over a window of the cache: q ``[M, T, K, G, Dh]``; keys/values ``[M, K, W,
    Dh]``; mask ``[M, T, W]`` -> ``[M, T, K, G, Dh]`` (float32). Scores and softmax in float32,
    products in the activation dtype. ``dots=False``: one query per row (T = 1) as a
    multiply-and-reduce in float32 (the CPU decode path's form)."""
    m, t, kv, groups, hd = q.shape
    keys, values = keys.astype(dtype), values.astype(dtype)
    if t == 1 and not dots:
        # One query per row (decoding) on XLA:CPU: multiply-and-reduce in float32 fuses into a
        # few loops over the keys/values, where XLA:CPU runs the equivalent batched
        # [G, Dh] x [Dh, W] dots slower (measured in docs/sampler.md). Accelerators take the
        # dots, which their matrix units run: on an H200 the 0.5B decode step took 11.3 ms
        # in this form against 4.7 ms by dots (docs/gpu.md).
        prod = q[:, 0, :, :, None, :].astype(jnp.float32) * keys[:, :, None].astype(jnp.float32)
        scores = jnp.sum(prod, axis=-1) * (hd**-0.5)  # [M, K, G, W]
        scores = jnp.where(mask[:, :, None, :], scores, _NEG)  # mask [M, 1, W]
        probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
        weighted = probs[..., None].astype(jnp.float32) * values[:, :, None]
        return jnp.sum(weighted, axis=3)[:, None]  # [M, 1, K, G, Dh]
    # Queries flattened to one [G*T, Dh] matrix per (row, kv head): plain [Q, Dh] x [Dh, W]
    # and [Q, W] x [W, Dh] matmuls. (With the scores as [.., G, T, W], XLA:CPU transposed
    # them around both dots: an observation chunk of 150 tokens took 1.5x longer.)
    queries = jnp.transpose(q, (0, 2, 3, 1, 4)).reshape(m, kv, groups * t, hd)
    scores = jnp.einsum("bkqh,bksh->bkqs", queries, keys, preferred_element_type=jnp.float32)
    query_mask = jnp.broadcast_to(mask[:, None], (m, groups, t, mask.shape[-1]))
    query_mask = query_mask.reshape(m, 1, groups * t, -1)
    scores = jnp.where(query_mask, scores * (hd**-0.5), _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    out = jnp.einsum("bkqs,bksh->bkqh", probs, values, preferred_element_type=jnp.float32)
    return jnp.transpose(out.reshape(m, kv, groups, t, hd), (0, 3, 1, 2, 4))


DECODE_KERNELS = ("xla", "pallas", "fused")


# (k_splits, block_k) forced for the Pallas decode kernel (benchmarks/gpu.py times the choice
# of `_ragged_blocks` against others); None: `_ragged_blocks` decides.
RAGGED_BLOCKS: tuple[int, int] | None = None
RAGGED_PROGRAMS = 1024  # programs a step's kernel aims for: ~8 per SM of an H100/H200 (132)


def _ragged_blocks(slots: int, heads: int = 1) -> tuple[int, int]:
    """(k_splits, block_k) of the Pallas decode kernel for a cache of `slots` slots and
    ``heads`` (row, KV head) pairs. The kernel runs heads x k_splits programs, each over its
    split of the slots in blocks of block_k, and then combines the splits' partial results in
    XLA: the fewest splits (powers of two, up to 16) that give `RAGGED_PROGRAMS` programs, then
    the largest block (128..16) dividing a split. At batch 256 (512 heads) and 768 slots that
    is 2 splits of 384 slots in blocks of 128, where the most splits (16 of 48 slots in blocks
    of 16) wrote 8x the partial results and ran blocks a GPU's tensor cores barely fill
    (docs/gpu.md); a small batch over a long cache still gets 16 splits."""
    if RAGGED_BLOCKS is not None:
        return RAGGED_BLOCKS
    wanted = max(1, -(-RAGGED_PROGRAMS // max(heads, 1)))
    candidates = [n for n in (1, 2, 4, 8, 16) if n >= min(wanted, 16)] + [8, 4, 2, 1]
    for splits in candidates:
        width = slots // splits
        if slots % splits or width < 16:
            continue
        for block in (128, 64, 32, 16):
            if width % block == 0:
                return splits, block
    raise ValueError(
        f"decode_kernel='pallas' needs a cache of a multiple of 16 slots (>= 16); it has {slots}"
    )


def _kernel_axes(plan, q: Array):
    """The mesh axes a Pallas kernel under ``shard_map`` splits q ``[B, T, K, G, Dh]``'s rows
    and KV heads over (the plan's rules for ``batch`` and ``act_kv_heads``; None: whole)."""
    return plan.spec(("batch",), (q.shape[0],))[0], plan.spec(("act_kv_heads",), (q.shape[2],))[0]


def _ragged_decode_attention(q: Array, ck: Array, cv: Array, mask: Array, plan=None) -> Array:
    """One query per row against the row's own run of cached slots, by JAX's Pallas GPU decode
    kernel (`jax.experimental.pallas.ops.gpu.decode_attention`): each (row, KV head) reads the
    keys and values from the row's first visible slot to its last, and nothing past them.

    q ``[B, 1, K, G, Dh]``; ck/cv one layer's cache ``[1, B, K, S, Dh]`` (`split_cache`: the
    kernel reads it in place); mask ``[B, 1, S]``. The visible slots must be one contiguous
    run per row, which is what `forward_with_cache` writes (left padding only before a row's
    first token, right-padded chunks leave no hole); a row with a hole gets NaN, loudly, rather
    than attention over its masked slots. With a plan of several devices the kernel runs under
    ``shard_map`` on each device's rows and KV heads (the cache's slots and head dim gathered
    if a rule shards them). Off a GPU (the plan's devices, else JAX's default backend) the
    kernel runs in Pallas' interpreter (for tests). Returns ``[B, 1, K, G, Dh]`` in q's dtype."""
    from jax.experimental.pallas.ops.gpu import decode_attention  # noqa: PLC0415 (GPU only)

    interpret = compile_platform(plan) != "gpu"

    def local(q, ck, cv, mask):
        b, _, kv, groups, hd = q.shape
        slots = ck.shape[3]
        splits, block = _ragged_blocks(slots, b * kv)
        start, stop, count = visible_run(mask[:, 0])
        out = decode_attention.mqa(
            q.reshape(b * kv, groups, hd),
            ck[0].astype(q.dtype).reshape(b * kv, slots, hd),
            cv[0].astype(q.dtype).reshape(b * kv, slots, hd),
            jnp.repeat(start, kv),
            jnp.repeat(stop, kv),
            sm_scale=hd**-0.5,
            k_splits=splits,
            block_k=block,
            interpret=interpret,
        )
        holes = count != stop - jnp.minimum(start, stop)
        out = jnp.where(jnp.repeat(holes, kv)[:, None, None], jnp.nan, out)
        return out.reshape(b, 1, kv, groups, hd)

    return _by_rows_and_heads(local, plan, q, "qccm", "q")(q, ck, cv, mask)


# "dots" or "reduce" forces the one-query attention form at trace time (benchmarks/gpu.py times
# both on one machine; tests check both on CPU); None: by the platform (`_one_query_dots`).
DECODE_ATTENTION_FORM: str | None = None


def compile_platform(plan=None) -> str:
    """The platform a step is compiled for: the plan's devices' (which may be compile-only
    devices of another platform), else JAX's default backend. The sampler decides its decode
    path and layers by it too."""
    return plan.mesh.devices.flat[0].platform if plan is not None else jax.default_backend()


def _one_query_dots(plan) -> bool:
    """Whether one-query (decode) attention takes batched dots: on any platform but CPU
    (`compile_platform`), where the matrix units run them; XLA:CPU runs the float32
    multiply-and-reduce faster (docs/sampler.md). A property of the platform, not of the
    decode path: the accelerator path forced on CPU keeps the CPU form."""
    if DECODE_ATTENTION_FORM is not None:
        return DECODE_ATTENTION_FORM == "dots"
    return compile_platform(plan) != "cpu"


# One-query attention on TPUs reads a wide key window in chunks: the TPU compiler moves a
# layer's window into the core's VMEM in the dots' layout, and one too large for it (on a v5e
# about 34 MB of keys a layer and more, e.g. 256 rows x 768 slots of the 0.5B model, or 32
# rows x 6144) it copies out to HBM in that layout first, then reads back: three passes over
# the window instead of one (docs/scaleout.md). None: `_key_chunk` decides; an int forces it
# (0: none).
KEY_CHUNK_SLOTS: int | None = None
# One layer's keys of one chunk on one device, by TPU generation (device kind): the budgets
# that moved the fewest bytes in libtpu's compile of the sampler (v5e 32 MiB; v4, v5p, v6e 16
# MiB, where 32 MiB chunks still spilled or spilled more than none on v6e).
TPU_KEY_CHUNK_BYTES = {"TPU v5 lite": 32 * 2**20}
TPU_KEY_CHUNK_BYTES_DEFAULT = 16 * 2**20


def _device_kind(plan) -> str:
    """The device kind a step is compiled for (the plan's devices', else the default one's)."""
    return (
        plan.mesh.devices.flat[0].device_kind if plan is not None else jax.devices()[0].device_kind
    )


def _key_chunk(ck, plan) -> int:
    """Slots per key chunk of one-query attention over the cache ``ck [L, B, K, S, Dh]`` (0: no
    chunks): on a TPU the largest power of two, at least 128, whose keys of one layer on one
    device fit the generation's `TPU_KEY_CHUNK_BYTES`; elsewhere none (`KEY_CHUNK_SLOTS`
    overrides)."""
    if KEY_CHUNK_SLOTS is not None:
        return KEY_CHUNK_SLOTS
    if compile_platform(plan) != "tpu":
        return 0
    budget = TPU_KEY_CHUNK_BYTES.get(_device_kind(plan), TPU_KEY_CHUNK_BYTES_DEFAULT)
    _, b, k, _, dh = ck.shape
    rows = b if plan is None else b // plan.batch_shards(b)  # on one device
    per_slot = rows * k * dh * jnp.dtype(ck.dtype).itemsize
    chunk = 128
    while 2 * chunk * per_slot <= budget:
        chunk *= 2
    return chunk


def _chunked_one_query(q, ck, cv, layer, mask, width, chunk, dtype):
    """One-query attention of q ``[B, 1, K, G, Dh]`` over slots ``[0, width)`` of `layer`, read
    in key chunks of ``chunk`` slots (the last may be shorter), each sliced out of the cache on
    its own, combined by their maxima and sums (one softmax over the window, up to rounding)."""
    b, _, kv, groups, hd = q.shape
    queries = q[:, 0].reshape(b, kv, groups, hd).astype(dtype)
    top = total = acc = None
    for start in range(0, width, chunk):
        size = min(chunk, width - start)
        keys = _read_kv(ck, layer, None, size, start).astype(dtype)
        values = _read_kv(cv, layer, None, size, start).astype(dtype)
        scores = jnp.einsum("bkqh,bksh->bkqs", queries, keys, preferred_element_type=jnp.float32)
        visible = mask[:, 0, start : start + size][:, None, None, :]
        scores = jnp.where(visible, scores * (hd**-0.5), _NEG)
        high = jnp.max(scores, axis=-1, keepdims=True)
        probs = jnp.exp(scores - high)
        part = jnp.einsum(
            "bkqs,bksh->bkqh", probs.astype(dtype), values, preferred_element_type=jnp.float32
        )
        part_total = jnp.sum(probs, axis=-1, keepdims=True)
        if top is None:
            top, total, acc = high, part_total, part
            continue
        new_top = jnp.maximum(top, high)
        old, cur = jnp.exp(top - new_top), jnp.exp(high - new_top)
        top, total, acc = new_top, total * old + part_total * cur, acc * old + part * cur
    return (acc / total).reshape(b, 1, kv, groups, hd)


# Multi-token cached steps of all rows (a prompt's prefill, observation chunks) attend through a
# Pallas flash kernel over the cache, where XLA wrote the chunk's float32 scores against the
# window to HBM and read them several times (docs/scaleout.md): on TPUs two Mosaic kernels that
# write and attend in place (`cache_attention.cached_chunk_attention`, `write_chunk`), on GPUs
# XLA's in-place scatter and one Triton kernel (`cached_chunk_attention_gpu`).
# `forward_with_cache`'s ``chunk_kernel``: "auto" (by the platform), "xla", or "pallas" (off a
# GPU or TPU it runs in Pallas' interpreter: for tests).
CHUNK_KERNELS = ("auto", "xla", "pallas")
# The kernel form "pallas" runs: "tpu" or "gpu"; None: by the platform (`_chunk_form`). Tests
# force the GPU form on CPU with it.
CHUNK_KERNEL_FORM: str | None = None
# Platforms whose "auto" takes the kernel: TPUs (measured by libtpu's compile); GPUs once timed
# on one (docs/gpu.md: the deviceless compile's bytes say it should win; "pallas" runs it).
CHUNK_KERNEL_AUTO = ("tpu",)


def _chunk_form(plan) -> str:
    """The chunk kernels' form: the GPU's (Triton) on GPUs, else the TPU's (`CHUNK_KERNEL_FORM`
    overrides)."""
    if CHUNK_KERNEL_FORM is not None:
        return CHUNK_KERNEL_FORM
    return "gpu" if compile_platform(plan) == "gpu" else "tpu"


def _chunk_kernel(plan, tokens: int, rows, choice: str = "auto") -> bool:
    """Whether a cached step of ``tokens`` tokens a row attends by the Pallas chunk kernels:
    steps of several tokens for all rows (``rows`` None), on `CHUNK_KERNEL_AUTO` platforms
    (`compile_platform`) for "auto", anywhere for "pallas", never for "xla"."""
    if choice == "xla" or tokens == 1 or rows is not None:
        return False
    return choice == "pallas" or compile_platform(plan) in CHUNK_KERNEL_AUTO


def _by_rows_and_heads(fn, plan, q: Array, ins: str, outs: str):
    """``fn`` on each device's rows and KV heads under ``shard_map`` (itself with one device
    or no plan). ``ins``/``outs`` name each argument's/result's kind, one letter each: q
    ``[B, T, K, G, Dh]`` (q), new keys or values ``[B, T, K, Dh]`` (n), a cache ``[L, B, K, S,
    Dh]`` (c), a scalar (s), ``[B, S]`` (v), ``[B, 1, S]`` (m), ``[B]`` (r). A rule sharding a
    cache's slots or head dim is gathered."""
    if plan is None or plan.mesh.size == 1:
        return fn
    spec = jax.sharding.PartitionSpec
    batch, heads = _kernel_axes(plan, q)
    specs = {
        "q": spec(batch, None, heads, None, None),
        "n": spec(batch, None, heads, None),
        "c": spec(None, batch, heads, None, None),
        "s": spec(),
        "v": spec(batch, None),
        "m": spec(batch, None, None),
        "r": spec(batch),
    }
    return jax.shard_map(
        fn,
        mesh=plan.mesh,
        in_specs=tuple(specs[kind] for kind in ins),
        out_specs=tuple(specs[kind] for kind in outs) if len(outs) > 1 else specs[outs],
        check_vma=False,
    )


def _chunk_step(q, k, v, cache, layer, mask: Array, end: Array, width=None, plan=None):
    """A step of several tokens for all rows by the Pallas chunk kernels: this step's keys and
    values ``k``/``v [B, T, K, Dh]`` written into the cache's layer ``layer`` at slots ``end +
    t``, then attention of q ``[B, T, K, G, Dh]`` over it, the mask given as
    `forward_with_cache` builds it (``[B, T, S]``: query t at slot ``end + t`` sees the valid
    slots up to its own; its last query's row is the valid slots), over slots ``[0, width)``
    (a static key window; None: the whole cache). TPU form (`_chunk_form`): `write_chunk` (the
    128-slot blocks the chunk touches, in place) and `cached_chunk_attention`, both under one
    ``shard_map`` over rows and KV heads; GPU form: XLA's scatter (in place on a GPU) and
    `cached_chunk_attention_gpu` under ``shard_map``. Returns (the cache's k, v; the attention
    ``[B, T, K, G, Dh]``)."""
    form = _chunk_form(plan)
    interpret = compile_platform(plan) != form
    valid = mask[:, -1, :]
    layer = jnp.asarray(layer, jnp.int32)
    if form == "gpu":
        slots = end[:, None] + jnp.arange(q.shape[1], dtype=jnp.int32)[None]
        ck, cv = (_scatter_kv(c, new, layer, None, slots) for c, new in zip(cache, (k, v)))
        attend_gpu = functools.partial(cached_chunk_attention_gpu, interpret=interpret, width=width)
        attn = _by_rows_and_heads(attend_gpu, plan, q, "qccsvr", "q")(q, ck, cv, layer, valid, end)
        return ck, cv, attn

    def local(q, k, v, ck, cv, layer, valid, end):
        ck = write_chunk(ck, k, layer, end, interpret=interpret)
        cv = write_chunk(cv, v, layer, end, interpret=interpret)
        attn = cached_chunk_attention(
            q, ck, cv, layer, valid, end, interpret=interpret, width=width
        )
        return ck, cv, attn

    return _by_rows_and_heads(local, plan, q, "qnnccsvr", "ccq")(q, k, v, *cache, layer, valid, end)


def _fused_decode(q, k, v, cos, sin, cache, mask: Array, slots: Array, plan=None):
    """A one-token step of all rows by `fused_decode_attention_gpu` (rotary, the cache write and
    the attention in one Triton kernel): q ``[B, 1, K, G, Dh]`` and k/v ``[B, 1, K, Dh]`` before
    rotary (given to the kernel as one ``[B, 1, K, G + 2, Dh]`` array, which XLA writes in one
    kernel), cos/sin ``[B, 1, Dh]``, a layer's own cache (k, v) ``[1, B, K, S, Dh]``, the mask
    ``[B, 1, S]`` and the new token's slots ``[B, 1]``, under ``shard_map`` on each device's rows
    and KV heads. Off a GPU (`compile_platform`) in Pallas' interpreter. Returns (k, v,
    attention ``[B, 1, K, G, Dh]``)."""
    qkv = jnp.concatenate([q, k[:, :, :, None], v[:, :, :, None]], axis=3)
    fused = functools.partial(fused_decode_attention_gpu, interpret=compile_platform(plan) != "gpu")
    return _by_rows_and_heads(fused, plan, q, "qmmccmr", "ccq")(
        qkv, cos, sin, *cache, mask, slots[:, 0]
    )


def _cached_attention(q, ck, cv, layer, rows, mask, span, dtype, dots=False, chunk=0):
    """Attention of q ``[M, T, K, G, Dh]`` over the cached keys/values of `layer` (rows `rows`),
    restricted to the smallest static window of `span_buckets` that holds ``span`` (a traced
    scalar: no query of this step sees a slot >= span). The window is picked with
    ``lax.switch``, so a step costs the context actually in use, not the whole cache. A Python
    int ``span`` is a static window width: no switch (the caller picked it for the step).
    ``dots``: one query per row by batched dots, else the float32 multiply-and-reduce
    (`_one_query_dots`). ``chunk``: read a window of all rows wider than this in key chunks
    of it (`_key_chunk`; 0: never)."""
    widths = span_buckets(ck.shape[3])

    def window(width):
        def attend(q, ck, cv, mask):
            if chunk and dots and rows is None and q.shape[1] == 1 and width > chunk:
                return _chunked_one_query(q, ck, cv, layer, mask, width, chunk, dtype)
            keys = _read_kv(ck, layer, rows, width)
            values = _read_kv(cv, layer, rows, width)
            return _attention_window(q, keys, values, mask[:, :, :width], dtype, dots)

        return attend

    if isinstance(span, int):  # a static window, chosen once for the step by the caller
        return window(span)(q, ck, cv, mask)
    if len(widths) == 1:
        return window(widths[0])(q, ck, cv, mask)
    index = jnp.sum(span > jnp.asarray(widths[:-1], jnp.int32))
    return jax.lax.switch(index, [window(w) for w in widths], q, ck, cv, mask)


class Attention(nn.Module):
    config: Qwen2Config
    param_dtype: Any = jnp.float32
    plan: Any = None
    chunk_kernel: str = "auto"  # steps of several tokens: `CHUNK_KERNELS`, `_chunk_kernel`

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache=None, layer=None, cache_io=None):
        """Grouped-query attention with q/k/v biases.

        x ``[M, T, D]``; cos/sin ``[M, T, Dh]``. Without a cache, mask is ``segment_ids [M, T]``
        int (0 = padding; causal attention within a segment, by the kernel
        ``config.attention``); with one, mask is ``[M, T, S]`` bool. cache: None, or the
        stacked (k, v) ``[L, B, K, S, Dh]``; this step's k/v are written into layer `layer` at
        ``cache_io`` = (rows ``[M]`` or None for all B, slots ``[M, T]``, span ``[]``, decode
        kernel: None or "xla", "pallas" for `_ragged_decode_attention` on one-token steps or
        "fused" for `_fused_decode` (rotary, write and attention in one kernel),
        steps of several tokens by ``chunk_kernel``, `_chunk_kernel`) before attending (see
        `_cached_attention`). Returns (out ``[M, T, D]``, the updated (k, v) or None).
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

        q = _matmul("btd,dnh->btnh", x, wq, self.plan) + bq.astype(x.dtype)
        k = _matmul("btd,dnh->btnh", x, wk, self.plan) + bk.astype(x.dtype)
        v = _matmul("btd,dnh->btnh", x, wv, self.plan) + bv.astype(x.dtype)
        b, t = x.shape[:2]
        if cache is not None and cache_io[3] == "fused" and t == 1:  # rotary in the kernel
            qg = q.reshape(b, t, kv, c.num_groups, hd)
            *cache, attn = _fused_decode(qg, k, v, cos, sin, cache, mask, cache_io[1], self.plan)
            return self._out(attn, wo, x.dtype), tuple(cache)
        q = _constrain(
            self.plan, apply_rope(q, cos, sin), ("batch", "seq", "act_heads", "head_dim")
        )
        k = _constrain(
            self.plan, apply_rope(k, cos, sin), ("batch", "seq", "act_kv_heads", "head_dim")
        )
        v = _constrain(self.plan, v, ("batch", "seq", "act_kv_heads", "head_dim"))
        qg = q.reshape(b, t, kv, c.num_groups, hd)
        if cache is None:
            attn = attend(
                qg, k, v, mask, kernel=c.attention, block=c.attention_block, plan=self.plan
            )
        else:
            rows, slots, span, kernel = cache_io
            if _chunk_kernel(self.plan, t, rows, self.chunk_kernel):
                width = span if isinstance(span, int) else None  # a static window, else all
                *cache, attn = _chunk_step(
                    qg, k, v, cache, layer, mask, slots[:, 0], width, self.plan
                )
                return self._out(attn, wo, x.dtype), tuple(cache)
            by_layer = _write_by_layer(self.plan, t)
            ck = _scatter_kv(cache[0], k, layer, rows, slots, by_layer)
            cv = _scatter_kv(cache[1], v, layer, rows, slots, by_layer)
            cache = (ck, cv)
            if kernel == "pallas" and t == 1:  # per-layer cache, all rows (forward_with_cache)
                attn = _ragged_decode_attention(qg, ck, cv, mask, self.plan)
            else:
                dots = _one_query_dots(self.plan)
                chunk = _key_chunk(ck, self.plan)
                attn = _cached_attention(qg, ck, cv, layer, rows, mask, span, x.dtype, dots, chunk)
        return self._out(attn, wo, x.dtype), cache

    def _out(self, attn: Array, wo: Array, dtype) -> Array:
        """The output projection of the heads' attention ``[M, T, K, G, Dh]`` -> ``[M, T, D]``."""
        b, t, kv, groups, hd = attn.shape
        attn = attn.astype(dtype).reshape(b, t, kv * groups, hd)
        return _matmul("btnh,nhd->btd", attn, wo, self.plan)


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
        gate = _matmul("btd,df->btf", x, wg, self.plan)
        hidden = jax.nn.silu(gate) * _matmul("btd,df->btf", x, wu, self.plan)
        hidden = _constrain(self.plan, hidden, ("batch", "seq", "act_mlp"))
        return _matmul("btf,fd->btd", hidden, wd, self.plan)


class DecoderLayer(nn.Module):
    config: Qwen2Config
    param_dtype: Any = jnp.float32
    plan: Any = None
    chunk_kernel: str = "auto"

    @nn.compact
    def __call__(self, carry, cos, sin, mask, cache_io):
        """carry = (h ``[M, T, D]``, cache (k, v) ``[L, B, K, S, Dh]`` or None, layer index);
        cache_io: see `Attention` (None without a cache)."""
        h, cache, layer = carry
        c, pd = self.config, self.param_dtype
        ln1 = _param(self, "input_norm", nn.initializers.ones, (c.hidden_size,), ("norm",), pd)
        ln2 = _param(
            self, "post_attention_norm", nn.initializers.ones, (c.hidden_size,), ("norm",), pd
        )
        attention = Attention(c, pd, self.plan, self.chunk_kernel, name="attn")
        x = rms_norm(h, ln1, c.rms_norm_eps)
        # The layer's new k/v are scattered into the stacked cache (in place, inside the scan's
        # carry); the layer's slice is never copied out and written back whole.
        attn, cache = attention(x, cos, sin, mask, cache, layer, cache_io)
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
    chunk_kernel: str = "auto"  # (`forward_with_cache`'s; read by cached steps only)

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
        )(c, pd, self.plan, self.chunk_kernel, name="layers")

    def embed(self, input_ids):
        h = jnp.take(self.embedding, input_ids, axis=0)
        return _constrain(self.plan, h, ("batch", "seq", "act_embed"))

    def final(self, h):
        return rms_norm(h, self.final_norm, self.config.rms_norm_eps)

    def hidden(self, input_ids, positions, mask, cache_kv=None, cache_io=None):
        """Final-norm hidden states ``[B, T, D]`` (and the new cache k/v, or None). mask:
        ``segment_ids [B, T]`` without a cache, ``[B, T, S]`` bool with one (see `Attention`)."""
        c = self.config
        h = self.embed(input_ids)
        cos, sin = rope_tables(positions, c.dim_per_head, c.rope_theta)
        (h, cache_kv, _), _ = self.layers((h, cache_kv, jnp.int32(0)), cos, sin, mask, cache_io)
        return self.final(h), cache_kv

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
def _module(config: Qwen2Config, params_or_dtype=jnp.float32, plan=None, chunk_kernel="auto"):
    if isinstance(params_or_dtype, dict):
        params_or_dtype = params_or_dtype["embed_tokens"].dtype
    return Qwen2(config, jnp.dtype(params_or_dtype), plan, chunk_kernel)


def _init_module(config: Qwen2Config, dtype=jnp.float32) -> Qwen2:
    # Initialisation runs one token through the reference attention: the parameter tree does not
    # depend on the kernel, and a config for another backend (cudnn, splash) inits anywhere.
    return _module(config.replace(attention="xla"), dtype)


def _dummy_inputs():
    ids = jnp.zeros((1, 1), jnp.int32)
    return ids, ids, jnp.ones((1, 1), jnp.int32)


def init_params(config: Qwen2Config, rng: Array, dtype=jnp.float32) -> Params:
    """Random parameters (normal(0.02) weights, zero biases, unit norms) as a plain dict."""
    variables = _init_module(config, dtype).init(rng, *_dummy_inputs())
    return nn.meta.unbox(variables["params"])


def param_shapes(config: Qwen2Config, dtype=jnp.float32) -> Params:
    """The parameter tree as ``jax.ShapeDtypeStruct`` leaves (nothing is allocated)."""
    boxed = jax.eval_shape(
        lambda: _init_module(config, dtype).init(jax.random.key(0), *_dummy_inputs())
    )
    return nn.meta.unbox(boxed["params"])


def param_logical_axes(config: Qwen2Config) -> Params:
    """Logical axis names of every parameter, as ``PartitionSpec`` leaves (same tree)."""
    boxed = jax.eval_shape(lambda: _init_module(config).init(jax.random.key(0), *_dummy_inputs()))
    return nn.get_partition_spec(boxed["params"])


def split_layers(params: Params) -> Params:
    """The same parameters with ``params["layers"]`` (leaves stacked ``[L, ...]``) replaced by a
    tuple of L per-layer trees. `forward_with_cache` accepts either form; with split layers it
    runs the layers unrolled and no step slices a layer's weights out of the stack (XLA:CPU
    copies such a slice: every weight, every step). The split is a copy of the layer weights:
    do it once, outside the decoding loop."""
    layers = params["layers"]
    if isinstance(layers, (tuple, list)):
        return params
    count = jax.tree.leaves(layers)[0].shape[0]
    split = tuple(jax.tree.map(lambda x, i=i: x[i], layers) for i in range(count))
    return {**params, "layers": split}


def _hidden_split_layers(
    config, params, plan, input_ids, positions, mask, cache_kv, cache_io, chunk_kernel="auto"
):
    """`Qwen2.hidden` for `split_layers` parameters: the layers run unrolled (static index)."""
    m = _module(config, params, plan, chunk_kernel)
    outer = {"params": {k: v for k, v in params.items() if k != "layers"}}
    h = m.apply(outer, input_ids, method=Qwen2.embed)
    cos, sin = rope_tables(positions, config.dim_per_head, config.rope_theta)
    layer = DecoderLayer(config, m.param_dtype, plan, chunk_kernel)
    per_layer = cache_kv is not None and isinstance(cache_kv[0], tuple)
    new_k, new_v = [], []
    for index, layer_params in enumerate(params["layers"]):
        if per_layer:  # this layer's own [1, B, K, S, Dh] cache: written and read at index 0
            kv = (cache_kv[0][index], cache_kv[1][index])
            (h, kv, _), _ = layer.apply(
                {"params": layer_params}, (h, kv, 0), cos, sin, mask, cache_io
            )
            new_k.append(kv[0])
            new_v.append(kv[1])
        else:
            (h, cache_kv, _), _ = layer.apply(
                {"params": layer_params}, (h, cache_kv, index), cos, sin, mask, cache_io
            )
    if per_layer:
        cache_kv = (tuple(new_k), tuple(new_v))
    return m.apply(outer, h, method=Qwen2.final), cache_kv


def split_cache(cache: KVCache) -> KVCache:
    """The cache with one ``[1, B, K, S, Dh]`` array per layer instead of the stacked ``[L, B,
    K, S, Dh]`` (for `split_layers` parameters): a layer then attends over its own array, where
    a slice of the stacked one is copied before the dot on a GPU."""
    if isinstance(cache.k, tuple):
        return cache
    layers = cache.k.shape[0]
    return cache.replace(
        k=tuple(cache.k[i : i + 1] for i in range(layers)),
        v=tuple(cache.v[i : i + 1] for i in range(layers)),
    )


def positions_from_mask(attention_mask: Array) -> Array:
    """RoPE positions for a (left- or right-) padded batch: count of real tokens before each."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def positions_from_segments(segment_ids: Array) -> Array:
    """RoPE positions ``[B, T]`` int32 for packed rows: 0 at each segment's first token, counting
    up within the segment (each segment's tokens are contiguous); padding (segment 0) gets 0."""
    segment_ids = jnp.asarray(segment_ids)
    t = segment_ids.shape[-1]
    index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids.shape)
    previous = jnp.concatenate(
        [jnp.full_like(segment_ids[..., :1], -1), segment_ids[..., :-1]], axis=-1
    )
    starts = jnp.where(segment_ids != previous, index, 0)
    positions = index - jax.lax.cummax(starts, axis=segment_ids.ndim - 1)
    return jnp.where(segment_ids > 0, positions, 0).astype(jnp.int32)


def cast_params(params: Params, dtype) -> Params:
    """The parameters with every floating leaf in ``dtype`` (integer leaves untouched; leaves
    already in ``dtype`` are returned as they are). ``jax.ShapeDtypeStruct`` leaves give
    ``ShapeDtypeStruct`` leaves (same sharding), for abstract compiles."""
    dtype = jnp.dtype(dtype)

    def cast(x):
        if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == dtype:
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
        return x.astype(dtype)

    return jax.tree.map(cast, params)


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
    segment_ids: Array | None = None,
) -> Array:
    """Final hidden states ``[B, T, D]`` (use with ``lm_logits`` to chunk over the vocabulary).
    Arguments as `forward`."""
    if segment_ids is None:
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        positions = positions_from_mask(attention_mask)
        segment_ids = attention_mask.astype(jnp.int32)
    else:
        segment_ids = jnp.asarray(segment_ids, jnp.int32)
        if segment_ids.shape != input_ids.shape:
            raise ValueError(
                f"segment_ids: shape {segment_ids.shape}, expected {input_ids.shape} like input_ids"
            )
        if attention_mask is not None:
            segment_ids = jnp.where(attention_mask.astype(bool), segment_ids, 0)
        positions = positions_from_segments(segment_ids)
    m = _module(config, params, plan)
    h, _ = m.apply({"params": params}, input_ids, positions, segment_ids, method=Qwen2.hidden)
    return h


def lm_logits(config: Qwen2Config, params: Params, hidden: Array, dtype=jnp.float32) -> Array:
    """Hidden states ``[..., D]`` -> logits ``[..., V]`` (float32 by default)."""
    head = {k: v for k, v in params.items() if k != "layers"}  # (stacked or split layers)
    return _module(config, params).apply({"params": head}, hidden, dtype, method=Qwen2.logits)


@functools.partial(jax.jit, static_argnames=("config", "plan"))
def forward(
    config: Qwen2Config,
    params: Params,
    input_ids: Array,
    attention_mask: Array | None = None,
    plan=None,
    segment_ids: Array | None = None,
) -> Array:
    """Logits ``[B, T, V]`` (float32) for a batch of token ids ``[B, T]``.

    ``attention_mask [B, T]`` (1 = real token) handles left or right padding: positions are
    counted over real tokens only, and padded keys are never attended to.

    ``segment_ids [B, T]`` int (packed rows): 0 = padding, k > 0 = the k-th sequence packed into
    the row, each sequence's tokens contiguous. RoPE positions restart at 0 at each segment's
    first token (`positions_from_segments`) and a token attends only to earlier tokens of its
    own segment. Without it, the segments are ``attention_mask`` (one per row). Where both are
    given, tokens with ``attention_mask`` 0 are padding.

    Logits at padded positions are meaningless. The attention kernel is ``config.attention``
    (`dgpo_jax.models.attention`); the activation dtype is the parameters' (see `cast_params`).
    """
    h = forward_hidden(config, params, input_ids, attention_mask, plan, segment_ids)
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
    rows: Array | None = None,
    window: int | None = None,
    decode_kernel: str = "xla",
    chunk_kernel: str = "auto",
) -> tuple[Array, KVCache]:
    """Run ``input_ids [M, T]`` against the cache and append them to it; returns logits/hidden.

    ``token_mask [M, T]`` marks real tokens. Each row writes its T tokens at slots
    ``cache.end[b] ...``; real tokens get consecutive RoPE positions from ``cache.next_pos[b]``.
    The row's write offset then advances to just after its last real token, so a left-padded
    prompt keeps its pad slots (masked out) and a right-padded chunk leaves no hole. A row with
    no real token is left unchanged. Works for prefill (T = prompt length), single-token decode
    (T = 1) and chunked ingestion of observations.

    ``rows [M]`` (int32, optional): the input rows are cache rows ``rows`` (distinct; an index
    >= B is a dummy row: nothing is written, its outputs are meaningless); only those rows are
    read and written. None: all rows, M = B. Attention reads only the slots up to the furthest
    one a query of this step can see (rounded up to a `span_buckets` width), so a step's cost
    follows the context in use rather than the cache size.

    ``window`` (static int, optional): attend over cache slots ``[0, window)`` in every layer,
    with no per-layer choice; the caller guarantees that no query of the step sees a slot past
    it (the sampler's accelerator path runs one loop per window width).

    ``params`` may be `split_layers` parameters (faster per step on CPU, see there), and then
    the cache may be `split_cache`'s one array per layer.

    ``decode_kernel`` (static): "xla", or "pallas" to attend one-token steps (T = 1) through
    JAX's Pallas GPU decode kernel, which reads each row's run of cached slots and nothing
    past it (`_ragged_decode_attention`), or "fused" to run their rotary, cache write and
    attention as one Triton kernel a layer (`cache_attention.fused_decode_attention_gpu`; a
    cache of a multiple of 16 slots). Both need a `split_cache` cache and all rows
    (``rows=None``), run interpreted off a GPU, and leave longer steps to ``chunk_kernel``.

    ``chunk_kernel`` (static): how steps of several tokens for all rows (prefill, chunks)
    attend: "xla" (the masked key window), "pallas" (a flash kernel over the cache that never
    writes the scores and reads each row's slots only; all rows: on TPUs
    `cached_chunk_attention` and `write_chunk`, on GPUs `cached_chunk_attention_gpu`, a Triton
    kernel, which needs a cache of a multiple of 16 slots; elsewhere the TPU's, interpreted),
    or "auto": pallas on TPUs for all-row steps, else xla (`CHUNK_KERNEL_AUTO`).

    Not jitted itself: call it inside a jitted program (the sampler) or wrap it.
    """
    m_rows, t = input_ids.shape
    every_token_real = token_mask is None
    if every_token_real:
        token_mask = jnp.ones((m_rows, t), bool)
    token_mask = token_mask.astype(bool)
    s = cache.max_len
    if rows is None:
        if m_rows != cache.end.shape[0]:
            raise ValueError(
                f"input_ids has {m_rows} rows but the cache has {cache.end.shape[0]} (pass rows=)"
            )
        end, next_pos, valid = cache.end, cache.next_pos, cache.valid
    else:
        rows = jnp.asarray(rows, jnp.int32)
        if rows.shape != (m_rows,):
            raise ValueError(f"rows: shape {rows.shape}, expected ({m_rows},) like input_ids")
        token_mask = token_mask & (rows < cache.end.shape[0])[:, None]  # dummy rows: no tokens
        read = jnp.minimum(rows, cache.end.shape[0] - 1)
        end, next_pos, valid = cache.end[read], cache.next_pos[read], cache.valid[read]
    if every_token_real:  # (XLA folds a cumsum of constant ones at compile time: > 1 s at 512)
        counts = jnp.arange(1, t + 1, dtype=jnp.int32)[None]
    else:
        counts = jnp.cumsum(token_mask, axis=1, dtype=jnp.int32)
    positions = next_pos[:, None] + counts - 1
    positions = jnp.maximum(positions, 0)
    slots = end[:, None] + jnp.arange(t, dtype=jnp.int32)[None]  # [M, T]
    # This step's real tokens make their slots valid (writes past S are dropped: the caller
    # checks capacity).
    new_valid = jax.vmap(lambda v, i, m: v.at[i].max(m, mode="drop"))(valid, slots, token_mask)
    # Query t (at slot end+t) sees the valid slots up to its own.
    key_slots = jnp.arange(s, dtype=jnp.int32)
    mask = new_valid[:, None, :] & (key_slots[None, None, :] <= slots[:, :, None])
    # Slots a query of this step can see: those before the furthest written one (dummy rows
    # do not count).
    span = jnp.max(jnp.where(jnp.any(token_mask, axis=1), end + t, 0))
    if window is not None:
        if not 0 < window <= s:
            raise ValueError(f"window {window} outside (0, {s}] (the cache's slots)")
        span = int(window)
    if isinstance(cache.k, tuple) and not isinstance(params["layers"], (tuple, list)):
        raise ValueError("a per-layer cache (split_cache) needs split_layers parameters")
    if chunk_kernel not in CHUNK_KERNELS:
        raise ValueError(f"chunk_kernel {chunk_kernel!r}: expected one of {CHUNK_KERNELS}")
    if chunk_kernel == "pallas" and t > 1 and rows is not None:
        raise ValueError("chunk_kernel='pallas' steps every cache row (rows=None)")
    if _chunk_kernel(plan, t, rows, chunk_kernel) and _chunk_form(plan) == "gpu":
        gpu_chunk_blocks(s, t, config.num_groups)  # a cache the GPU kernel can tile: clear error
    if decode_kernel not in DECODE_KERNELS:
        raise ValueError(f"decode_kernel {decode_kernel!r}: expected one of {DECODE_KERNELS}")
    if decode_kernel != "xla":
        if not isinstance(cache.k, tuple):
            raise ValueError(
                f"decode_kernel={decode_kernel!r} needs a per-layer cache (split_cache)"
            )
        if rows is not None:
            raise ValueError(f"decode_kernel={decode_kernel!r} steps every cache row (rows=None)")
        if decode_kernel == "pallas":  # a cache size the kernel can split or tile: said here
            _ragged_blocks(s)
        else:
            gpu_chunk_blocks(s, 1, 1)
    if isinstance(params["layers"], (tuple, list)):
        h, (k, v) = _hidden_split_layers(
            config,
            params,
            plan,
            input_ids,
            positions,
            mask,
            (cache.k, cache.v),
            (rows, slots, span, decode_kernel),
            chunk_kernel,
        )
    else:
        h, (k, v) = _module(config, params, plan, chunk_kernel).apply(
            {"params": params},
            input_ids,
            positions,
            mask,
            (cache.k, cache.v),
            (rows, slots, span, None),  # (the stacked cache: XLA decode attention)
            method=Qwen2.hidden,
        )
    last_real = jnp.max(jnp.where(token_mask, jnp.arange(1, t + 1)[None], 0), axis=1)
    new_end = end + last_real
    new_next_pos = next_pos + jnp.sum(token_mask, axis=1, dtype=jnp.int32)
    if rows is None:
        cache = KVCache(k=k, v=v, valid=new_valid, end=new_end, next_pos=new_next_pos)
    else:
        cache = KVCache(
            k=k,
            v=v,
            valid=cache.valid.at[rows].set(new_valid, mode="drop"),
            end=cache.end.at[rows].set(new_end, mode="drop"),
            next_pos=cache.next_pos.at[rows].set(new_next_pos, mode="drop"),
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
