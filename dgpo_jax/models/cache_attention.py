"""Flash attention of a chunk of queries over the KV cache: Pallas kernels for TPUs and GPUs.

A multi-token cached step (a prompt's prefill, a chunk of observation) attends each row's T new
queries over the row's cached slots. XLA materialises the scores of every row's chunk against
its window, ``[B, K, G x T, W]`` float32 in HBM, and passes over them several times (on a v5e at
256 rows, 128 tokens and 768 slots: 1.4 GB a layer, 84-219 GB an ingest step; docs/scaleout.md).
These kernels keep a block of scores on chip and never write it: an online softmax over key
blocks, read in place out of the stacked ``[L, B, K, S, Dh]`` cache (the layer index a scalar,
so no layer slice is copied), and key blocks before a row's first visible slot or past the last
one its queries can see are neither read nor computed (on TPUs the index map repeats the last
block read, which Pallas does not fetch again; on GPUs the loop's bounds stop there).

Shapes: B rows, T new tokens a row, K KV heads, G query heads a KV head, Dh head dim, S slots.
The mask is what `forward_with_cache` builds: query t of row b (at slot ``end[b] + t``) sees
the valid slots at or before its own. Scores and softmax in float32, the two products in the
cache's dtype (as the XLA form), the output in the queries' dtype; a query that sees no slot
gets 0 (XLA's softmax gives the mean of the window there: such rows are never read).

TPUs: `cached_chunk_attention` (Mosaic; key blocks by the grid, fetched by index maps) and
`write_chunk` (the chunk's keys and values into the blocks they touch, in place). GPUs:
`cached_chunk_attention_gpu` (Triton; one program loops over its row's key blocks), where XLA's
scatter already writes the chunk in place.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

Array = jax.Array
_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: no inf - inf in the running maximum
_LANES = 128


SCORE_BLOCK_BYTES = 2 * 2**20  # one grid step's float32 scores in VMEM, at most


def chunk_blocks(width: int, tokens: int, groups: int = 1) -> tuple[int, int]:
    """(block_k, block_t) for a window of ``width`` slots and chunks of ``tokens`` tokens with
    ``groups`` query heads a KV head. Query blocks of 128 tokens, or the chunk rounded up to a
    power of two (at least 16, bfloat16's sublane tile) when shorter; key blocks in multiples of
    128 (the TPU's lane width) as wide as their float32 scores (``groups x block_t`` rows) fit
    `SCORE_BLOCK_BYTES`, at most the window rounded up: few grid steps (each has a fixed cost);
    the last block of a window it does not divide reaches past it (masked)."""
    block_t = 16
    while block_t < min(tokens, 128):
        block_t *= 2
    fit = SCORE_BLOCK_BYTES // (4 * groups * block_t) // _LANES * _LANES
    return min(max(fit, _LANES), -(-width // _LANES) * _LANES), block_t


def _kernel(
    layer_ref,
    end_ref,
    first_ref,
    last_ref,
    q_ref,
    k_ref,
    v_ref,
    valid_ref,
    o_ref,
    top_ref,
    total_ref,
    acc_ref,
    *,
    groups: int,
    block_t: int,
    block_k: int,
    blocks_t: int,
    blocks_k: int,
    slots: int,
    scale: float,
):
    del layer_ref  # (read by the index maps)
    b, ti, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    rows = groups * block_t

    @pl.when(j == 0)
    def _start():
        top_ref[...] = jnp.full(top_ref.shape, _NEG, jnp.float32)
        total_ref[...] = jnp.zeros(total_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when((j >= first_ref[b]) & (j <= last_ref[b * blocks_t + ti]))
    def _block():
        q = q_ref[...].reshape(rows, q_ref.shape[-1])
        keys = k_ref[...]
        scores = jax.lax.dot_general(
            q.astype(keys.dtype),
            keys,
            (((1,), (0,)), ((), ())),
            preferred_element_type=jnp.float32,
        )  # [G x block_t, block_k], query row g * block_t + t
        shape = (rows, block_k)
        slot = j * block_k + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
        t = jax.lax.broadcasted_iota(jnp.int32, shape, 0) & (block_t - 1)
        visible = (valid_ref[...] != 0) & (slot <= end_ref[b] + ti * block_t + t)
        scores = jnp.where(visible, scores * scale, _NEG)
        top = top_ref[...]  # [rows, 128], the lanes equal
        new_top = jnp.maximum(top, jnp.max(scores, axis=1, keepdims=True))
        probs = jnp.where(visible, jnp.exp(scores - new_top[:, :1]), 0.0)
        rescale = jnp.exp(top - new_top)
        total_ref[...] = rescale * total_ref[...] + jnp.sum(probs, axis=1, keepdims=True)
        top_ref[...] = new_top
        values = v_ref[...]  # [Dh, block_k]
        if slots % block_k:  # the last block reaches past the cache: its tail is unspecified
            inside = j * block_k + jax.lax.broadcasted_iota(jnp.int32, values.shape, 1) < slots
            values = jnp.where(inside, values, jnp.zeros_like(values))
        part = jax.lax.dot_general(
            probs.astype(values.dtype),
            values,
            (((1,), (1,)), ((), ())),
            preferred_element_type=jnp.float32,
        )
        acc_ref[...] = acc_ref[...] * rescale[:, :1] + part

    @pl.when(j == blocks_k - 1)
    def _finish():
        total = total_ref[...][:, :1]
        out = acc_ref[...] / jnp.where(total > 0, total, 1.0)
        o_ref[...] = out.reshape(o_ref.shape).astype(o_ref.dtype)


def chunk_rows(valid: Array, end: Array, tokens: int) -> tuple[Array, Array]:
    """Per row of a chunk step over ``valid [B, S]`` (its slots holding a token, this step's
    included): its first valid slot (S when it has none) and whether any of its new slots
    ``[end, end + tokens)`` holds a token (a row without one reads nothing)."""
    valid = valid > 0
    slot = jnp.arange(valid.shape[1], dtype=jnp.int32)[None]
    first = jnp.where(jnp.any(valid, axis=1), jnp.argmax(valid, axis=1), valid.shape[1])
    new = valid & (slot >= end[:, None]) & (slot < end[:, None] + tokens)
    return first.astype(jnp.int32), jnp.any(new, axis=1)


def visible_run(visible: Array) -> tuple[Array, Array, Array]:
    """Per row of ``visible [B, S]``: (the first visible slot, one past the last, the count),
    int32; a row seeing nothing gets (0, 0, 0). A run of ``stop - start`` slots holding fewer
    than that many visible ones has a hole (the one-token kernels give such a row NaN)."""
    slots = visible.shape[1]
    count = jnp.sum(visible, axis=1, dtype=jnp.int32)
    start = jnp.argmax(visible, axis=1).astype(jnp.int32)
    stop = jnp.where(count > 0, slots - jnp.argmax(visible[:, ::-1], axis=1), 0)
    return start, stop.astype(jnp.int32), count


def cached_chunk_attention(
    q: Array,
    ck: Array,
    cv: Array,
    layer: Array | int,
    valid: Array,
    end: Array,
    interpret: bool = False,
    blocks: tuple[int, int] | None = None,
    width: int | None = None,
) -> Array:
    """Attention of a chunk of T queries a row over the row's cached slots, on one device.

    q ``[B, T, K, G, Dh]``; ck/cv the stacked cache ``[L, B, K, S, Dh]`` holding this step's keys
    and values already; ``layer`` the layer to read (int or traced scalar); valid ``[B, S]`` bool
    (the slots holding a token, this step's included); end ``[B]`` int32, the slot of each row's
    first new token (query t sits at ``end + t`` and sees the valid slots up to it). ``width``
    (static): the kernel covers slots ``[0, width)`` only (the caller guarantees no query sits
    past it: the sampler's key window); default the whole cache. ``blocks``: (block_k, block_t),
    else `chunk_blocks`. ``interpret``: run in Pallas' interpreter (off a TPU, for tests).
    Returns ``[B, T, K, G, Dh]`` in q's dtype.
    """
    b, t, kv, groups, hd = q.shape
    slots = ck.shape[3]
    width = slots if width is None else width
    block_k, block_t = chunk_blocks(width, t, groups) if blocks is None else blocks
    if block_k % _LANES or block_t < 16 or block_t & (block_t - 1) or not 0 < width <= slots:
        raise ValueError(
            f"cached_chunk_attention: blocks {blocks} for a window of {width} of {slots} slots: "
            "block_k must be a multiple of 128, block_t a power of two >= 16"
        )
    blocks_k = -(-width // block_k)  # the last block may reach past the window (and the cache)
    padded = -(-t // block_t) * block_t
    blocks_t = padded // block_t
    queries = jnp.transpose(q, (0, 2, 3, 1, 4))  # [B, K, G, T, Dh]
    if padded != t:
        queries = jnp.pad(queries, ((0, 0), (0, 0), (0, 0), (0, padded - t), (0, 0)))

    end = end.astype(jnp.int32)
    valid = valid.astype(jnp.int32)[:, :width]
    valid = jnp.pad(valid, ((0, 0), (0, blocks_k * block_k - width)))  # past the window: none
    # Key blocks a (row, query block) reads: from the row's first valid slot's block to the block
    # of the last slot its queries sit at.
    # A row without a new token this step (no valid slot among its new ones) reads nothing.
    first, new = chunk_rows(valid, end, t)
    first = first // block_k
    last_query = end[:, None] + jnp.minimum((jnp.arange(blocks_t) + 1) * block_t, t) - 1
    last = jnp.clip(last_query // block_k, 0, blocks_k - 1)
    last = jnp.where(new[:, None], last, -1).reshape(-1)
    layer = jnp.asarray(layer, jnp.int32).reshape(1)

    def kv_block(bi, h, ti, j, layer_ref, end_ref, first_ref, last_ref):
        del end_ref
        read = jnp.maximum(
            jnp.minimum(jnp.maximum(j, first_ref[bi]), last_ref[bi * blocks_t + ti]), 0
        )
        return layer_ref[0], bi, h, 0, read

    def valid_block(bi, h, ti, j, layer_ref, end_ref, first_ref, last_ref):
        *_, read = kv_block(bi, h, ti, j, layer_ref, end_ref, first_ref, last_ref)
        return bi, 0, read

    def q_block(bi, h, ti, j, *_):
        return bi, h, 0, ti, 0

    itemsize = jnp.dtype(ck.dtype).itemsize
    covered = blocks_k * block_k  # slots the grid covers
    cost = pl.CostEstimate(  # an upper bound: every key block of the window, each query block
        flops=4 * b * kv * groups * padded * covered * hd,
        transcendentals=b * kv * groups * padded * covered,
        bytes_accessed=2 * queries.size * queries.dtype.itemsize
        + blocks_t * (2 * b * kv * covered * hd * itemsize + b * covered * 4),
    )
    kernel = functools.partial(
        _kernel,
        groups=groups,
        block_t=block_t,
        block_k=block_k,
        blocks_t=blocks_t,
        blocks_k=blocks_k,
        slots=slots,
        scale=hd**-0.5,
    )
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(b, kv, blocks_t, blocks_k),
            in_specs=[
                pl.BlockSpec((None, None, groups, block_t, hd), q_block),
                pl.BlockSpec((None, None, None, hd, block_k), kv_block),
                pl.BlockSpec((None, None, None, hd, block_k), kv_block),
                pl.BlockSpec((None, 1, block_k), valid_block),
            ],
            out_specs=pl.BlockSpec((None, None, groups, block_t, hd), q_block),
            scratch_shapes=[
                pltpu.VMEM((groups * block_t, _LANES), jnp.float32),
                pltpu.VMEM((groups * block_t, _LANES), jnp.float32),
                pltpu.VMEM((groups * block_t, hd), jnp.float32),
            ],
        ),
        out_shape=jax.ShapeDtypeStruct(queries.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
        ),
        cost_estimate=cost,
        interpret=interpret,
        name="cached_chunk_attention",
    )(
        layer,
        end,
        first,
        last,
        queries,
        jnp.swapaxes(ck, 3, 4),
        jnp.swapaxes(cv, 3, 4),
        valid[:, None, :],
    )
    return jnp.transpose(out[:, :, :, :t], (0, 3, 1, 2, 4))


def _write_kernel(layer_ref, end_ref, new_ref, buf_ref, out_ref, *, tokens: int, blocks: int):
    del layer_ref  # (read by the index maps)
    b, j = pl.program_id(0), pl.program_id(2)
    start = end_ref[b]
    block = jnp.minimum(jax.lax.div(start, _LANES) + j, blocks - 1)  # (end >= 0)
    # The chunk's tokens moved to their lanes of this block by a one-hot matmul: token t goes to
    # slot end + t; exact (one product of 1.0 a result, float32 accumulation).
    shape = (tokens, _LANES)
    slot = block * _LANES + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    token = jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    hit = slot == start + token
    new = new_ref[...]  # [Dh, T]
    precision = jax.lax.Precision.HIGHEST if new.dtype == jnp.float32 else None
    placed = jax.lax.dot_general(
        new,
        hit.astype(new.dtype),
        (((1,), (0,)), ((), ())),
        preferred_element_type=jnp.float32,
        precision=precision,
    )  # [Dh, 128]
    written = jnp.max(hit.astype(jnp.int32), axis=0, keepdims=True) > 0  # [1, 128]
    # The old values come from the input block: out_ref aliases the cache in HBM, but its
    # block in VMEM is not loaded (Pallas fetches inputs only).
    out_ref[...] = jnp.where(written, placed.astype(out_ref.dtype), buf_ref[...])


def write_chunk(
    buf: Array, new: Array, layer: Array | int, end: Array, interpret: bool = False
) -> Array:
    """The cache ``buf [L, B, K, S, Dh]`` with ``new [B, T, K, Dh]`` written into layer
    ``layer`` at slots ``end[b] + t`` (slots past the cache dropped), in place: each (row, KV
    head) reads and writes only the 128-slot blocks its T slots touch, where a scatter of a
    chunk into the cache made the TPU compiler relay out and copy the layer's whole cache
    (docs/scaleout.md). ``interpret``: Pallas' interpreter (off a TPU, for tests)."""
    b, t, kv, hd = new.shape
    slots = buf.shape[3]
    blocks = -(-slots // _LANES)
    touched = min(-(-t // _LANES) + 1, blocks)  # 128-slot blocks T consecutive slots can span
    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    end = end.astype(jnp.int32)

    def cache_block(bi, h, j, layer_ref, end_ref):
        return layer_ref[0], bi, h, 0, jnp.minimum(jax.lax.div(end_ref[bi], _LANES) + j, blocks - 1)

    itemsize = jnp.dtype(buf.dtype).itemsize
    out = pl.pallas_call(
        functools.partial(_write_kernel, tokens=t, blocks=blocks),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, kv, touched),
            in_specs=[
                pl.BlockSpec((None, None, hd, t), lambda bi, h, j, *_: (bi, h, 0, 0)),
                pl.BlockSpec((None, None, None, hd, _LANES), cache_block),
            ],
            out_specs=pl.BlockSpec((None, None, None, hd, _LANES), cache_block),
        ),
        out_shape=jax.ShapeDtypeStruct(jnp.swapaxes(buf, 3, 4).shape, buf.dtype),
        input_output_aliases={3: 0},  # (after the two scalar operands and new)
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        cost_estimate=pl.CostEstimate(
            flops=2 * b * kv * touched * hd * t * _LANES,
            transcendentals=0,
            bytes_accessed=new.size * new.dtype.itemsize
            + 2 * b * kv * touched * hd * _LANES * itemsize,
        ),
        interpret=interpret,
        name="write_chunk",
    )(layer, end, jnp.transpose(new, (0, 2, 3, 1)).astype(buf.dtype), jnp.swapaxes(buf, 3, 4))
    return jnp.swapaxes(out, 3, 4)


# ----------------------------------------------------------------------------------------------
# The GPU form: one Triton (Pallas GPU) kernel for the attention; the write stays XLA's scatter,
# which XLA:GPU already runs in place on the chunk's slots only.
# ----------------------------------------------------------------------------------------------
GPU_BLOCK_Q = 128  # query rows a program: tokens x query heads (a KV head's, padded to 2^n)
GPU_BLOCK_K = 64  # slots a loop iteration: the largest of 64, 32, 16 dividing the cache


def gpu_chunk_blocks(slots: int, tokens: int, groups: int) -> tuple[int, int, int]:
    """(block_q, block_k, groups_padded) of `cached_chunk_attention_gpu`: a KV head's ``groups``
    query heads padded to a power of two (Triton's blocks are powers of two), query blocks of
    `GPU_BLOCK_Q` rows (fewer for a short chunk, at least 16: a tensor-core tile), key blocks
    of `GPU_BLOCK_K` slots or the largest power of two down to 16 dividing ``slots`` (so no
    block reads past the cache). Raises when ``slots`` is not a multiple of 16."""
    padded = 1
    while padded < groups:
        padded *= 2
    block_q = 16
    while block_q < min(tokens * padded, GPU_BLOCK_Q):
        block_q *= 2
    block_k = GPU_BLOCK_K
    while block_k > 16 and slots % block_k:
        block_k //= 2
    if slots % block_k or padded > block_q:
        raise ValueError(
            f"cached_chunk_attention_gpu: a cache of {slots} slots ({groups} query heads a KV "
            "head): the slots must be a multiple of 16 and the heads at most "
            f"{GPU_BLOCK_Q}"
        )
    return block_q, block_k, padded


def _softmax_start(rows: int, hd: int):
    """An online softmax's state before its first key block: (the weighted values ``[rows,
    Dh]``, the running maximum ``[rows]``, the running sum ``[rows]``), float32."""
    return (
        jnp.zeros((rows, hd), jnp.float32),
        jnp.full((rows,), _NEG, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )


def _softmax_block(carry, scores, visible, values):
    """One key block of an online softmax (the GPU kernels' loops): ``scores [rows, block]``
    float32 (scaled), ``visible`` their mask, ``values [block, Dh]``; the state rescaled to the
    new running maximum (masked scores weigh 0, so a row that has seen nothing keeps 0)."""
    acc, top, total = carry
    scores = jnp.where(visible, scores, _NEG)
    new_top = jnp.maximum(top, jnp.max(scores, axis=1))
    probs = jnp.where(visible, jnp.exp(scores - new_top[:, None]), 0.0)
    rescale = jnp.exp(top - new_top)
    part = jax.lax.dot_general(
        probs.astype(values.dtype),
        values,
        (((1,), (0,)), ((), ())),
        preferred_element_type=jnp.float32,
    )
    return acc * rescale[:, None] + part, new_top, total * rescale + jnp.sum(probs, axis=1)


def _gpu_kernel(
    layer_ref,
    end_ref,
    first_ref,
    stop_ref,
    q_ref,
    k_ref,
    v_ref,
    valid_ref,
    o_ref,
    *,
    tokens: int,
    groups: int,
    block_k: int,
    scale: float,
):
    """One program: a block of the chunk's tokens x the query heads of one (row, KV head), read
    and written in q's own layout (query row r: token ``r / padded``, head ``r % padded``; the
    padding heads and the tokens past the chunk masked), over the key blocks its queries can
    see."""
    from jax.experimental.pallas import triton as plgpu  # noqa: PLC0415 (GPU only)

    block_t, padded, hd = q_ref.shape
    rows = block_t * padded
    j = pl.program_id(2)
    block = (block_t, padded, hd)
    token = j * block_t + jax.lax.broadcasted_iota(jnp.int32, block, 0)
    inside = (token < tokens) & (jax.lax.broadcasted_iota(jnp.int32, block, 1) < groups)
    q = plgpu.load(q_ref, mask=inside, other=0.0).reshape(rows, hd)
    layer, end = layer_ref[0], end_ref[()]
    shape = (rows, block_k)
    query_slot = (
        end + j * block_t + jax.lax.div(jax.lax.broadcasted_iota(jnp.int32, shape, 0), padded)
    )
    # Key blocks: from the row's first valid slot's to the one holding the last query's slot
    # (the row's new slots end at stop: 0 for a row without a new token, which reads nothing).
    last = jnp.minimum(end + (j + 1) * block_t, stop_ref[()])
    last = jnp.minimum(last, k_ref.shape[1])  # (a chunk past the cache: its slots are dropped)
    lo = jax.lax.div(first_ref[()], block_k)
    hi = jnp.maximum(jax.lax.div(last + block_k - 1, block_k), lo)

    def body(s, carry):
        at = pl.ds(s * block_k, block_k)
        keys = k_ref[layer, at, :]
        scores = jax.lax.dot_general(
            q.astype(keys.dtype), keys, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        )
        slot = s * block_k + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
        visible = (valid_ref[at][None, :] != 0) & (slot <= query_slot)
        return _softmax_block(carry, scores * scale, visible, v_ref[layer, at, :])

    acc, _, total = jax.lax.fori_loop(lo, hi, body, _softmax_start(rows, hd))
    out = acc / jnp.where(total > 0, total, 1.0)[:, None]
    plgpu.store(o_ref, out.reshape(block).astype(o_ref.dtype), mask=inside)


def cached_chunk_attention_gpu(
    q: Array,
    ck: Array,
    cv: Array,
    layer: Array | int,
    valid: Array,
    end: Array,
    interpret: bool = False,
    width: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
) -> Array:
    """`cached_chunk_attention` on GPUs, by one Triton kernel (Pallas GPU): same arguments, same
    result (up to float32 rounding), q, the output and the cache (``[L, B, K, S, Dh]``; a
    layer's own ``[1, B, K, S, Dh]`` array with ``layer`` 0 for split layers) read and written
    in place in their own layouts.

    A program takes a block of the chunk's tokens times one (row, KV head)'s query heads
    (`GPU_BLOCK_Q` rows) and loops over key blocks of the cache from the row's first valid slot
    to the last slot its queries sit at (a row without a new token reads none) with an online
    softmax in registers: the ``[B, K, G x T, W]`` float32 scores XLA writes to HBM and reads
    again are never written. The loop's bounds are per row, so a program reads the context its
    row has, not the window. ``width`` only checks the caller's window (the bounds come from
    ``end``). ``interpret``: Pallas' interpreter (off a GPU, for tests).
    """
    from jax.experimental.pallas import triton as plgpu  # noqa: PLC0415 (GPU only)

    b, t, kv, groups, hd = q.shape
    slots = ck.shape[3]
    if width is not None and not 0 < width <= slots:
        raise ValueError(f"cached_chunk_attention_gpu: a window of {width} of {slots} slots")
    block_q, block_k, padded = gpu_chunk_blocks(slots, t, groups)
    block_t = block_q // padded  # tokens a program

    end = end.astype(jnp.int32)
    valid = valid.astype(jnp.int32)
    first, new = chunk_rows(valid, end, t)
    stop = jnp.where(new, end + t, 0).astype(jnp.int32)
    layers = ck.shape[0]

    def row(bi, h, j):
        return (bi,)

    def heads(bi, h, j):
        return bi, j, h, 0, 0

    def cache(bi, h, j):
        return 0, bi, h, 0, 0

    itemsize = jnp.dtype(ck.dtype).itemsize
    return pl.pallas_call(
        functools.partial(_gpu_kernel, tokens=t, groups=groups, block_k=block_k, scale=hd**-0.5),
        grid=(b, kv, -(-t // block_t)),
        in_specs=[
            pl.BlockSpec((1,), lambda bi, h, j: (0,)),
            pl.BlockSpec((None,), row),
            pl.BlockSpec((None,), row),
            pl.BlockSpec((None,), row),
            pl.BlockSpec((None, block_t, None, padded, hd), heads),
            pl.BlockSpec((layers, None, None, slots, hd), cache),
            pl.BlockSpec((layers, None, None, slots, hd), cache),
            pl.BlockSpec((None, slots), lambda bi, h, j: (bi, 0)),
        ],
        out_specs=pl.BlockSpec((None, block_t, None, padded, hd), heads),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        cost_estimate=pl.CostEstimate(  # an upper bound: each row's whole layer, once
            flops=4 * b * kv * t * padded * slots * hd,
            transcendentals=b * kv * t * padded * slots,
            bytes_accessed=2 * q.size * q.dtype.itemsize
            + 2 * b * kv * slots * hd * itemsize
            + b * slots * 4,
        ),
        interpret=interpret,
        name="cached_chunk_attention_gpu",
    )(
        jnp.asarray(layer, jnp.int32).reshape(1),
        end,
        first,
        stop,
        q,
        ck,
        cv,
        valid,
    )


# ----------------------------------------------------------------------------------------------
# GPUs, one-token (decode) steps: rotary, cache write and attention in one Triton kernel a layer.
# ----------------------------------------------------------------------------------------------
def _decode_kernel(
    start_ref,
    stop_ref,
    count_ref,
    end_ref,
    cos_ref,
    sin_ref,
    qkv_ref,
    ck_ref,
    cv_ref,
    ck_out,
    cv_out,
    o_ref,
    *,
    groups: int,
    block_k: int,
    scale: float,
):
    """One (row, KV head): the new token's query heads and key rotated, the key and value
    stored at the row's slot ``end``, then an online softmax over the cached slots ``[start,
    min(stop, end))`` in key blocks and the new token itself when it is visible (``stop >
    end``). Rotary in float32 on the two halves of the head dim (``rotate_half``), rounded to
    the activations' dtype as `qwen2.apply_rope` does; scores in float32. A row whose visible
    slots are not one run (``count`` short of ``stop - start``) gets NaN."""
    from jax.experimental.pallas import triton as plgpu  # noqa: PLC0415 (GPU only)

    padded, hd = qkv_ref.shape  # rows: the G query heads, the key, the value, padding
    half, slots = hd // 2, ck_ref.shape[0]
    lo_half, hi_half = pl.ds(0, half), pl.ds(half, half)
    start, stop, end = start_ref[()], stop_ref[()], end_ref[()]

    def rotate(lo, hi, cos, sin, dtype):  # rotate_half: [lo, hi] -> [lo c - hi s, hi c + lo s]
        lo, hi = lo.astype(jnp.float32), hi.astype(jnp.float32)
        return (lo * cos[0] - hi * sin[0]).astype(dtype), (hi * cos[1] + lo * sin[1]).astype(dtype)

    cos = cos_ref[lo_half], cos_ref[hi_half]
    sin = sin_ref[lo_half], sin_ref[hi_half]
    heads = jax.lax.broadcasted_iota(jnp.int32, (padded, half), 0) < groups
    q_lo = plgpu.load(qkv_ref.at[:, lo_half], mask=heads, other=0.0)
    q_hi = plgpu.load(qkv_ref.at[:, hi_half], mask=heads, other=0.0)
    q_lo, q_hi = rotate(
        q_lo, q_hi, (cos[0][None], cos[1][None]), (sin[0][None], sin[1][None]), qkv_ref.dtype
    )
    k_lo, k_hi = rotate(qkv_ref[groups, lo_half], qkv_ref[groups, hi_half], cos, sin, ck_ref.dtype)
    value = qkv_ref[groups + 1, :].astype(cv_ref.dtype)  # [Dh]
    # The new key and value into the cache, in place (a full cache drops them, as the scatter).
    at = pl.ds(jnp.minimum(end, slots - 1), 1)
    room = jnp.broadcast_to(end < slots, (1, half))
    plgpu.store(ck_out.at[at, lo_half], k_lo[None], mask=room)
    plgpu.store(ck_out.at[at, hi_half], k_hi[None], mask=room)
    plgpu.store(cv_out.at[at, :], value[None], mask=jnp.broadcast_to(end < slots, (1, hd)))

    last = jnp.minimum(jnp.minimum(stop, end), slots)  # cached slots: [start, last)
    shape = (padded, block_k)

    def body(s, carry):
        keys = pl.ds(s * block_k, block_k)
        dims = (((1,), (1,)), ((), ()))
        scores = jax.lax.dot_general(
            q_lo, ck_ref[keys, lo_half], dims, preferred_element_type=jnp.float32
        ) + jax.lax.dot_general(
            q_hi, ck_ref[keys, hi_half], dims, preferred_element_type=jnp.float32
        )
        slot = s * block_k + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
        visible = (slot >= start) & (slot < last)
        return _softmax_block(carry, scores * scale, visible, cv_ref[keys, :])

    lo_block = jax.lax.div(jnp.minimum(start, last), block_k)
    hi_block = jnp.maximum(jax.lax.div(last + block_k - 1, block_k), lo_block)
    acc, top, total = jax.lax.fori_loop(lo_block, hi_block, body, _softmax_start(padded, hd))
    # The new token: its score against the rotated key (rounded like the cached ones).
    own = (
        jnp.sum(q_lo.astype(jnp.float32) * k_lo.astype(jnp.float32)[None], axis=1)
        + jnp.sum(q_hi.astype(jnp.float32) * k_hi.astype(jnp.float32)[None], axis=1)
    ) * scale
    seen = stop > end
    new_top = jnp.where(seen, jnp.maximum(top, own), top)
    rescale = jnp.exp(top - new_top)
    weight = jnp.where(seen, jnp.exp(own - new_top), 0.0)
    acc = acc * rescale[:, None] + weight[:, None] * value.astype(jnp.float32)[None]
    total = total * rescale + weight
    out = acc / jnp.where(total > 0, total, 1.0)[:, None]
    out = jnp.where(count_ref[()] != stop - jnp.minimum(start, stop), jnp.nan, out)
    rows = jax.lax.broadcasted_iota(jnp.int32, (padded, hd), 0) < groups
    plgpu.store(o_ref, out.astype(o_ref.dtype), mask=rows)


def fused_decode_attention_gpu(
    qkv: Array,
    cos: Array,
    sin: Array,
    ck: Array,
    cv: Array,
    mask: Array,
    end: Array,
    interpret: bool = False,
    num_warps: int = 4,
    num_stages: int = 2,
) -> tuple[Array, Array, Array]:
    """A decode step's attention of one layer on GPUs, by one Triton kernel (Pallas GPU) per
    layer: rotary on the new token's query heads and key, the key and value written into the
    layer's cache in place, and attention over the row's visible slots, where XLA ran the
    rotary, two scatters and the attention (JAX's ragged kernel and the XLA kernels combining
    its key splits) as 7 kernels a layer (docs/gpu.md).

    qkv ``[B, 1, K, G + 2, Dh]``: each KV head's G query heads, then its key and value, before
    rotary (biases added: one array, so that XLA writes them in one kernel); cos/sin ``[B, 1,
    Dh]`` float32 (`qwen2.rope_tables`); ck/cv a layer's own cache ``[1, B, K, S, Dh]``
    (`split_cache`), updated in place (aliased); mask ``[B, 1, S]``, what `forward_with_cache`
    builds (the valid slots up to the new one, which is visible when the token is real); end
    ``[B]``, the new token's slot (past the cache: not written, as the scatter drops it). The
    visible slots must be one run per row (as `qwen2._ragged_decode_attention`: a row with a
    hole gets NaN). Returns (ck, cv, the attention ``[B, 1, K, G, Dh]`` in qkv's dtype).
    """
    from jax.experimental.pallas import triton as plgpu  # noqa: PLC0415 (GPU only)

    b, _, kv, rows, hd = qkv.shape
    groups = rows - 2
    slots = ck.shape[3]
    _, block_k, _ = gpu_chunk_blocks(slots, 1, 1)
    padded = max(16, 1 << (rows - 1).bit_length())  # a dot's rows: 16 at least
    start, stop, count = visible_run(mask[:, 0])

    def row(bi, h):
        return (bi,)

    def heads(bi, h):
        return bi, 0, h, 0, 0

    def table(bi, h):
        return bi, 0, 0

    def cache(bi, h):
        return 0, bi, h, 0, 0

    cache_spec = pl.BlockSpec((None, None, None, slots, hd), cache)
    head_spec = pl.BlockSpec((None, None, None, padded, hd), heads)
    itemsize = jnp.dtype(ck.dtype).itemsize
    ck, cv, out = pl.pallas_call(
        functools.partial(_decode_kernel, groups=groups, block_k=block_k, scale=hd**-0.5),
        grid=(b, kv),
        in_specs=[
            pl.BlockSpec((None,), row),
            pl.BlockSpec((None,), row),
            pl.BlockSpec((None,), row),
            pl.BlockSpec((None,), row),
            pl.BlockSpec((None, None, hd), table),
            pl.BlockSpec((None, None, hd), table),
            head_spec,
            cache_spec,
            cache_spec,
        ],
        out_specs=[cache_spec, cache_spec, head_spec],
        out_shape=[
            jax.ShapeDtypeStruct(ck.shape, ck.dtype),
            jax.ShapeDtypeStruct(cv.shape, cv.dtype),
            jax.ShapeDtypeStruct((b, 1, kv, groups, hd), qkv.dtype),
        ],
        input_output_aliases={7: 0, 8: 1},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        cost_estimate=pl.CostEstimate(  # an upper bound: each row's whole cache, once
            flops=4 * b * kv * padded * slots * hd,
            transcendentals=b * kv * padded * slots,
            bytes_accessed=2 * qkv.size * qkv.dtype.itemsize + 2 * b * kv * slots * hd * itemsize,
        ),
        interpret=interpret,
        name="fused_decode_attention_gpu",
    )(
        start,
        stop,
        count,
        end.astype(jnp.int32),
        cos.astype(jnp.float32),
        sin.astype(jnp.float32),
        qkv,
        ck,
        cv,
    )
    return ck, cv, out
