"""The Pallas chunk kernels over the KV cache against NumPy, on CPU in Pallas' TPU interpreter
(`pltpu.InterpretParams`: a TPU's block pipeline, memory not written yet reads as NaN; so an
output block read before it is written fails here as it would on a TPU) or, where that
interpreter cannot lower a case, the generic one (``interpret=True``)."""

import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from dgpo_jax.models import cache_attention
from dgpo_jax.models.cache_attention import (
    cached_chunk_attention,
    cached_chunk_attention_gpu,
    chunk_blocks,
    fused_decode_attention_gpu,
    gpu_chunk_blocks,
    write_chunk,
)

TPU = pltpu.InterpretParams()


def _reference(q, ck, cv, layer, valid, end):
    """NumPy attention: query t of row b (slot end[b] + t) over the valid slots <= its own;
    float64 softmax; a query seeing no slot gets 0 (the kernel's convention)."""
    b, t, kv, groups, hd = q.shape
    slots = ck.shape[3]
    out = np.zeros(q.shape)
    for row in range(b):
        for i in range(t):
            seen = valid[row] & (np.arange(slots) <= end[row] + i)
            if not seen.any():
                continue
            for h in range(kv):
                keys, values = ck[layer, row, h][seen], cv[layer, row, h][seen]
                scores = q[row, i, h].astype(np.float64) @ keys.T / np.sqrt(hd)  # [G, n]
                probs = np.exp(scores - scores.max(-1, keepdims=True))
                out[row, i, h] = (probs / probs.sum(-1, keepdims=True)) @ values
    return out


def test_chunk_blocks_by_hand():
    # key blocks whose float32 scores (G x block_t rows) fit 2 MiB, in multiples of 128:
    # 7 x 128 rows x 4 bytes -> 585 slots -> 512; 7 x 32 x 4 -> 2340 -> 2304
    assert chunk_blocks(768, 128, 7) == (512, 128)  # 2 blocks, the second half past the cache
    assert chunk_blocks(8704, 32, 7) == (2304, 32)  # 4 blocks (3.8)
    assert chunk_blocks(256, 20) == (256, 32)  # at most the window; 20 tokens -> 32
    assert chunk_blocks(640, 600) == (640, 128)  # query blocks of 128 at most
    assert chunk_blocks(300, 8) == (384, 16)  # 300 rounded up to the TPU's 128 lanes


def _ragged_case():
    """Rows at different ends (one past a key block's edge, one whose queries run past the
    cache), left padding, a hole, a row with no new token, 20 tokens, a stack of 3 layers."""
    rng = np.random.default_rng(0)
    layers, b, kv, groups, slots, hd, t = 3, 5, 2, 3, 384, 64, 20
    q = rng.standard_normal((b, t, kv, groups, hd)).astype(np.float32)
    ck = rng.standard_normal((layers, b, kv, slots, hd)).astype(np.float32)
    cv = rng.standard_normal((layers, b, kv, slots, hd)).astype(np.float32)
    end = np.array([0, 120, 300, 370, 50], np.int32)
    valid = np.zeros((b, slots), bool)
    valid[0, 3:t] = True  # left padding in the chunk itself (a prefill)
    valid[1, 40 : 120 + t] = True  # crosses the 128 edge
    valid[2, 130 : 300 + t] = True
    valid[2, 200:210] = False  # a hole
    valid[3, 10:slots] = True  # queries 14.. sit past the cache's last slot
    valid[4, :50] = True  # no new token this step
    return q, ck, cv, valid, end


def _check_ragged(out, q, ck, cv, valid, end):
    ref = _reference(q, ck, cv, 2, valid, end)
    assert out.shape == q.shape and out.dtype == np.float32
    np.testing.assert_allclose(out[:4], ref[:4], atol=2e-5)
    np.testing.assert_array_equal(out[4], 0.0)  # a row with no new token reads nothing
    assert np.abs(out[0, :3]).max() == 0.0  # padding queries before the first real slot
    return ref


@pytest.mark.parametrize("blocks", [(128, 16), (256, 32), (384, 32)])
def test_kernel_matches_numpy_on_ragged_rows(blocks):
    """`_ragged_case` (the row with no new token: its queries see the old slots only through
    XLA; the kernel gives 0), query blocks that split the chunk (20 tokens in blocks of 16), key
    blocks that tile the cache or whose last one reaches past it (256 of 384: unspecified memory
    there, masked) and layer 2 read out of the stack."""
    q, ck, cv, valid, end = _ragged_case()
    out = np.asarray(
        cached_chunk_attention(
            jnp.asarray(q), jnp.asarray(ck), jnp.asarray(cv), 2, jnp.asarray(valid),
            jnp.asarray(end), interpret=TPU, blocks=blocks,
        )
    )  # fmt: skip
    ref = _check_ragged(out, q, ck, cv, valid, end)
    # A window of 256 slots (rows 0 and 1 sit below it): the same for them.
    args = [jnp.asarray(a[:2]) for a in (q,)] + [jnp.asarray(a[:, :2]) for a in (ck, cv)]
    args += [2, jnp.asarray(valid[:2]), jnp.asarray(end[:2])]
    out = cached_chunk_attention(*args, interpret=TPU, blocks=(blocks[0], 16), width=256)
    np.testing.assert_allclose(np.asarray(out), ref[:2], atol=2e-5)


def test_gpu_chunk_blocks_by_hand():
    # 7 query heads padded to 8: 128 rows = 16 tokens a block; 3 -> 4: 2 tokens x 4 = 8 -> 16
    assert gpu_chunk_blocks(768, 128, 7) == (128, 64, 8)
    assert gpu_chunk_blocks(8704, 32, 7) == (128, 64, 8)  # 8704 = 136 x 64
    assert gpu_chunk_blocks(208, 40, 1) == (64, 16, 1)  # 208 = 13 x 16; 40 rows -> 64
    assert gpu_chunk_blocks(96, 2, 3) == (16, 32, 4)
    with pytest.raises(ValueError, match="a cache of 200 slots .* a multiple of 16"):
        gpu_chunk_blocks(200, 4, 2)


@pytest.mark.parametrize("block_q", [128, 32])
def test_gpu_kernel_matches_numpy_on_ragged_rows(block_q, monkeypatch):
    """The Triton form (Pallas GPU, in Pallas' interpreter) on `_ragged_case`: 3 query heads
    padded to 4; query blocks of 128 rows (the chunk's 20 tokens in one, padded to 32) or 32
    rows (8 tokens: 3 blocks, the last padded); key blocks of 64 from each row's first valid
    one; and in a window."""
    monkeypatch.setattr(cache_attention, "GPU_BLOCK_Q", block_q)
    assert gpu_chunk_blocks(384, 20, 3) == (block_q, 64, 4)
    q, ck, cv, valid, end = _ragged_case()
    args = [jnp.asarray(a) for a in (q, ck, cv)] + [2, jnp.asarray(valid), jnp.asarray(end)]
    out = np.asarray(cached_chunk_attention_gpu(*args, interpret=True))
    _check_ragged(out, q, ck, cv, valid, end)
    args = [jnp.asarray(a) for a in (q[:2], ck[:, :2], cv[:, :2])]
    args += [2, jnp.asarray(valid[:2]), jnp.asarray(end[:2])]
    out = cached_chunk_attention_gpu(*args, interpret=True, width=256)
    np.testing.assert_allclose(np.asarray(out), _reference(q, ck, cv, 2, valid, end)[:2], atol=2e-5)
    with pytest.raises(ValueError, match="a window of 512 of 384 slots"):
        cached_chunk_attention_gpu(*args, interpret=True, width=512)


def test_blocks_that_do_not_tile_the_cache_are_refused():
    args = [jnp.zeros((1, 4, 1, 1, 64)), jnp.zeros((1, 1, 1, 384, 64))] * 1
    args += [jnp.zeros((1, 1, 1, 384, 64)), 0, jnp.ones((1, 384), bool), jnp.zeros(1, jnp.int32)]
    with pytest.raises(ValueError, match=r"blocks \(200, 16\) for a window of 384 of 384 slots"):
        cached_chunk_attention(*args, interpret=True, blocks=(200, 16))
    with pytest.raises(ValueError, match=r"a window of 512 of 384 slots"):
        cached_chunk_attention(*args, interpret=True, blocks=(128, 16), width=512)


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
@pytest.mark.parametrize("tokens,slots", [(20, 768), (200, 768), (20, 700)])
def test_write_chunk_equals_numpy_in_place(dtype, tokens, slots):
    """A chunk written into layer 1 of 3 at each row's own slot, bit for bit: across a 128-slot
    block edge, more than a block long (200 tokens: three blocks touched), at the cache's start,
    and past its end (the tail dropped; 700 slots, not a multiple of 128, in the generic
    interpreter: the TPU one cannot lower an aliased array with a partial block); nothing else
    moves."""
    rng = np.random.default_rng(1)
    layers, b, kv, hd = 3, 4, 2, 64
    buf = rng.standard_normal((layers, b, kv, slots, hd)).astype(np.float32).astype(dtype)
    new = rng.standard_normal((b, tokens, kv, hd)).astype(np.float32).astype(dtype)
    end = np.array([120, 0, slots - 10, 333], np.int32)
    ref = np.array(buf)
    for row in range(b):
        count = min(tokens, slots - end[row])
        ref[1, row, :, end[row] : end[row] + count] = np.swapaxes(new[row, :count], 0, 1)
    interpret = TPU if slots % 128 == 0 else True
    got = write_chunk(jnp.asarray(buf), jnp.asarray(new), 1, jnp.asarray(end), interpret=interpret)
    assert got.dtype == buf.dtype
    np.testing.assert_array_equal(np.asarray(got), ref)


def test_fused_decode_kernel_matches_numpy():
    """The fused decode kernel (Triton, in Pallas' interpreter): rotary on the new token's 3
    query heads and its key (with its value: 5 rows, padded to 16), the key and value written
    at the row's slot, attention over its visible run: rows at a block's start, crossing a
    block edge, at the last slot, a row whose token is not real (its slot written, not
    attended), a row whose cache is full (nothing written) and a row with a hole (NaN)."""
    rng = np.random.default_rng(0)
    b, kv, groups, hd, slots = 6, 2, 3, 64, 128
    q = rng.standard_normal((b, 1, kv, groups, hd)).astype(np.float32)
    k, v = (rng.standard_normal((b, 1, kv, hd)).astype(np.float32) for _ in range(2))
    ck, cv = (rng.standard_normal((1, b, kv, slots, hd)).astype(np.float32) for _ in range(2))
    end = np.array([64, 70, 100, 127, 128, 50], np.int32)
    angles = rng.uniform(0, 6, (b, 1, hd // 2)).astype(np.float32)
    angles = np.concatenate([angles, angles], -1)
    cos, sin = np.cos(angles), np.sin(angles)
    valid = np.zeros((b, slots), bool)
    valid[0, 3:65] = True
    valid[1, 0:71] = True
    valid[2, 90:100] = True  # the token at 100 is not real
    valid[3, :] = True
    valid[4, 20:] = True  # full: the token has no slot
    valid[5, 30:51] = True
    valid[5, 40] = False  # a hole
    mask = valid[:, None, :] & (np.arange(slots) <= end[:, None])[:, None, :]
    qkv = np.concatenate([q, k[:, :, :, None], v[:, :, :, None]], axis=3)
    args = (qkv, cos, sin, ck, cv, mask, end)
    got_k, got_v, out = map(
        np.asarray, fused_decode_attention_gpu(*map(jnp.asarray, args), interpret=True)
    )

    def rope(x, row):
        rotated = np.concatenate([-x[..., hd // 2 :], x[..., : hd // 2]], -1)
        return x * cos[row, 0] + rotated * sin[row, 0]

    ref_k, ref_v, ref = ck.copy(), cv.copy(), np.zeros(q.shape)
    for row in range(b):
        for h in range(kv):
            if end[row] < slots:
                ref_k[0, row, h, end[row]] = rope(k[row, 0, h], row)
                ref_v[0, row, h, end[row]] = v[row, 0, h]
            seen = mask[row, 0]
            scores = rope(q[row, 0, h], row) @ ref_k[0, row, h][seen].T / np.sqrt(hd)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            ref[row, 0, h] = (probs / probs.sum(-1, keepdims=True)) @ ref_v[0, row, h][seen]
    np.testing.assert_allclose(got_k, ref_k, atol=1e-6)
    np.testing.assert_array_equal(got_v, ref_v)
    np.testing.assert_allclose(out[:5], ref[:5], atol=2e-5)
    assert np.isnan(out[5]).all()
