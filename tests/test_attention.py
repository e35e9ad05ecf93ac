"""Attention kernels of the training / scoring path (dgpo_jax.models.attention) and packed rows
in the model: `chunked` (and `splash` in the Pallas interpreter) against the materialised `xla`
reference, packed rows against each sequence run alone, compiled temporaries, bad input, and a
compile of the tiny model with `splash` for a TPU topology where libtpu is installed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dgpo_jax.models import attention as attn
from dgpo_jax.models import (
    cast_params,
    forward,
    get_preset,
    param_shapes,
    positions_from_mask,
    positions_from_segments,
    resolve_kernel,
)
from tests.conftest import random_params

B, T, K, G, DH = 3, 37, 2, 3, 16  # T is not a multiple of any block used below


def _segments():
    """Row 0 left-padded, row 1 three packed sequences then right padding, row 2 full."""
    seg = np.zeros((B, T), np.int32)
    seg[0, 5:] = 1
    seg[1, :10], seg[1, 10:25], seg[1, 25:33] = 1, 2, 3
    seg[2, :] = 1
    return jnp.asarray(seg)


def _qkvw(seed=0):
    r = np.random.default_rng(seed)
    q, w = (jnp.asarray(r.normal(size=(B, T, K, G, DH)), jnp.float32) for _ in range(2))
    k, v = (jnp.asarray(r.normal(size=(B, T, K, DH)), jnp.float32) for _ in range(2))
    return q, k, v, w


def _value_and_grads(fn, q, k, v, w, seg):
    real = (seg > 0)[:, :, None, None, None]

    def loss(q, k, v):
        out = fn(q, k, v, seg)
        return jnp.sum(jnp.where(real, out * w, 0.0)), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


@pytest.mark.parametrize("block", [8, 16, 512])
def test_chunked_equals_xla_on_padded_and_packed_rows(block):
    q, k, v, w = _qkvw()
    seg = _segments()
    out_ref, grads_ref = _value_and_grads(attn.xla_attention, q, k, v, w, seg)
    chunked = lambda q, k, v, s: attn.chunked_attention(q, k, v, s, block)  # noqa: E731
    out, grads = _value_and_grads(chunked, q, k, v, w, seg)
    np.testing.assert_allclose(out, out_ref, atol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        assert np.abs(g_ref).max() > 0.1  # the comparison is not between zeros
        np.testing.assert_allclose(g, g_ref, atol=1e-4)
    # Padding queries see nothing: output 0, and no gradient reaches the padding keys.
    pad = np.asarray(seg) == 0
    assert np.all(np.asarray(out)[pad] == 0.0)
    assert np.all(np.asarray(grads[1])[pad] == 0.0) and np.all(np.asarray(grads[2])[pad] == 0.0)


def test_block_ranges_skip_hidden_key_blocks():
    # Block 4 over 16 positions. Row 0: padding then one sequence from 6; row 1: sequences
    # [0, 8) and [8, 14), then padding.
    seg = np.zeros((2, 16), np.int32)
    seg[0, 6:] = 1
    seg[1, :8], seg[1, 8:14] = 1, 2
    first, last = attn._block_ranges(jnp.asarray(seg), 4)
    # Query block 0 is padding in row 0 and sees block 0 in row 1; block 2 (positions 8-11)
    # starts row 1's second sequence but still needs row 0's keys from block 1 (position 6).
    np.testing.assert_array_equal(first, [0, 0, 1, 1])
    # Key block 0 is seen up to query block 1 (row 1, sequence 1 ends at 7); block 1 up to 3.
    np.testing.assert_array_equal(last, [1, 3, 3, 3])


def test_chunked_temporaries_several_times_smaller_than_xla():
    n, k_heads, groups, dh = 4096, 2, 2, 16
    q = jax.ShapeDtypeStruct((1, n, k_heads, groups, dh), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, n, k_heads, dh), jnp.float32)
    seg = jax.ShapeDtypeStruct((1, n), jnp.int32)

    def temp_bytes(kernel):
        def loss(q, k, v, s):
            return jnp.sum(attn.attention(q, k, v, s, kernel=kernel, block=512))

        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
        return step.lower(q, kv, kv, seg).compile().memory_analysis().temp_size_in_bytes

    xla, chunked = temp_bytes("xla"), temp_bytes("chunked")
    # xla keeps [1, 2, 2, 4096, 4096] float32 scores (256 MiB) and more for the backward.
    assert xla >= 4 * 4096 * 4096 * 4
    assert xla >= 8 * chunked, (xla, chunked)


def test_splash_in_pallas_interpreter_equals_xla():
    q, k, v, w = _qkvw(1)
    seg = _segments()
    out_ref, grads_ref = _value_and_grads(attn.xla_attention, q, k, v, w, seg)
    splash = lambda q, k, v, s: attn.splash_attention(q, k, v, s, 128, interpret=True)  # noqa: E731
    out, grads = _value_and_grads(splash, q, k, v, w, seg)
    np.testing.assert_allclose(out, out_ref, atol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        np.testing.assert_allclose(g, g_ref, atol=1e-4)


def test_splash_under_shard_map_over_a_plan_equals_xla():
    """Rows over the batch axes (4 of the 8 test devices), kv heads over ``tensor`` (2)."""
    from dgpo_jax.parallel.sharding import plan_from_config  # noqa: PLC0415

    plan = plan_from_config({"data": 2, "fsdp": 2, "tensor": 2})
    assert attn._splash_specs(plan, (4, 130, 2, 3, 16)) == (("data", "fsdp"), "tensor", None)
    r = np.random.default_rng(2)
    q = jnp.asarray(r.normal(size=(4, 130, 2, 3, 16)), jnp.float32)
    k, v = (jnp.asarray(r.normal(size=(4, 130, 2, 16)), jnp.float32) for _ in range(2))
    seg = np.ones((4, 130), np.int32)
    seg[0, :30], seg[1, 60:], seg[3, 100:] = 0, 2, 0
    seg = jnp.asarray(seg)
    splash = jax.jit(lambda q, k, v, s: attn.splash_attention(q, k, v, s, 128, plan, True))
    np.testing.assert_allclose(splash(q, k, v, seg), attn.xla_attention(q, k, v, seg), atol=1e-5)


def test_cudnn_path_traces_forward_and_backward(monkeypatch):
    """No GPU here: with cuDNN's availability checks stubbed, the cudnn path traces (the
    arguments jax.nn.dot_product_attention gets are accepted, GQA heads, the mask, the
    gradient) and keeps the shapes and dtype."""
    from jax._src.cudnn import fused_attention_stablehlo as fused  # noqa: PLC0415 (private)

    monkeypatch.setattr(fused, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(fused, "check_compute_capability", lambda capability: True)
    q = jax.ShapeDtypeStruct((2, 64, 2, 7, 64), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 64, 2, 64), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((2, 64), jnp.int32)

    def loss(q, k, v, s):
        return jnp.sum(attn.cudnn_attention(q, k, v, s).astype(jnp.float32))

    grads = jax.eval_shape(jax.grad(loss, argnums=(0, 1, 2)), q, kv, kv, seg)
    assert [(g.shape, g.dtype) for g in grads] == [(x.shape, x.dtype) for x in (q, kv, kv)]
    jaxpr = str(jax.make_jaxpr(attn.cudnn_attention)(q, kv, kv, seg))
    assert "dot_product_attention_fwd" in jaxpr  # the cuDNN primitive, not XLA's fallback


def _packed_batch(lengths, width, vocab, seed=0):
    r = np.random.default_rng(seed)
    seqs = [r.integers(0, vocab, n) for n in lengths]
    ids = np.zeros((1, width), np.int32)
    seg = np.zeros((1, width), np.int32)
    start = 2  # two padding positions first
    for index, s in enumerate(seqs):
        ids[0, start : start + len(s)] = s
        seg[0, start : start + len(s)] = index + 1
        start += len(s)
    return seqs, jnp.asarray(ids), jnp.asarray(seg)


def test_model_packed_rows_equal_each_sequence_alone():
    config = get_preset("tiny")
    params = random_params(config, 0, std=0.1)
    lengths = (9, 13, 6)
    seqs, ids, seg = _packed_batch(lengths, 33, config.vocab_size)
    chunked = config.replace(attention="chunked", attention_block=8)
    packed = forward(chunked, params, ids, None, None, seg)
    alone = config.replace(attention="xla")
    start = 2
    for s in seqs:
        ref = forward(alone, params, jnp.asarray(s[None]))  # unpadded, one sequence
        np.testing.assert_allclose(packed[0, start : start + len(s)], ref[0], atol=1e-5)
        start += len(s)
    assert np.abs(np.asarray(packed)).max() > 0.5  # the comparison is not between near-zeros


def test_model_gradients_chunked_equal_xla_on_packed_and_left_padded_rows():
    config = get_preset("tiny")
    params = random_params(config, 1, std=0.1)
    _, ids, seg = _packed_batch((9, 13, 6), 33, config.vocab_size, seed=1)
    left = jnp.where(jnp.arange(33) >= 20, 1, 0)[None].astype(jnp.int32)  # 13 real tokens
    ids = jnp.concatenate([ids, ids])
    seg = jnp.concatenate([seg, left])

    def grads(kernel):
        c = config.replace(attention=kernel, attention_block=8)

        def loss(p):
            logp = jax.nn.log_softmax(forward(c, p, ids, None, None, seg))
            return -jnp.sum(jnp.where(seg[..., None] > 0, logp[..., :1], 0.0))

        return jax.jit(jax.grad(loss))(params)

    g, g_ref = grads("chunked"), grads("xla")
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, atol=1e-4)
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g_ref)) > 0.1


def test_positions_from_segments_restart_per_segment():
    seg = jnp.asarray([[0, 0, 1, 1, 1, 2, 2, 0], [1, 1, 1, 2, 3, 3, 0, 0]])
    np.testing.assert_array_equal(
        positions_from_segments(seg), [[0, 0, 0, 1, 2, 0, 1, 0], [0, 1, 2, 0, 0, 1, 0, 0]]
    )
    # One segment per row (a padding mask): the real tokens count as positions_from_mask does.
    mask = jnp.asarray([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    real = np.asarray(mask) > 0
    np.testing.assert_array_equal(
        np.asarray(positions_from_segments(mask))[real], np.asarray(positions_from_mask(mask))[real]
    )


def test_cast_params_casts_floating_leaves_only():
    tree = {"w": jnp.ones((2,), jnp.float32), "i": jnp.arange(3), "b": jnp.zeros(1, jnp.bfloat16)}
    cast = cast_params(tree, jnp.bfloat16)
    assert cast["w"].dtype == jnp.bfloat16 and cast["i"].dtype == tree["i"].dtype
    assert cast["b"] is tree["b"] and cast["i"] is tree["i"]
    abstract = cast_params({"w": jax.ShapeDtypeStruct((2,), jnp.float32)}, "bfloat16")
    assert abstract["w"].dtype == jnp.bfloat16 and abstract["w"].shape == (2,)


def test_kernel_choice_and_bad_kernels():
    assert resolve_kernel("auto", attn.CPU_CHUNKED_MIN_LEN) == "xla"
    assert resolve_kernel("auto", attn.CPU_CHUNKED_MIN_LEN + 1) == "chunked"
    config = get_preset("tiny")
    params = random_params(config, 0)
    ids = jnp.zeros((1, 8), jnp.int32)
    with pytest.raises(ValueError, match=r"attention='cudnn' needs a GPU backend .* runs on cpu"):
        forward(config.replace(attention="cudnn"), params, ids)
    with pytest.raises(ValueError, match=r"attention='splash' needs a TPU backend .* runs on cpu"):
        forward(config.replace(attention="splash"), params, ids)
    with pytest.raises(ValueError, match=r"unknown attention kernel 'flash'; valid: auto, xla"):
        resolve_kernel("flash", 8)
    with pytest.raises(ValueError, match=r"attention must be one of auto, xla, chunked"):
        config.replace(attention="flash")
    with pytest.raises(ValueError, match="attention_block must be a positive int"):
        config.replace(attention_block=0)


def test_attention_knobs_stay_out_of_hf_config():
    config = get_preset("tiny").replace(attention="chunked", attention_block=256)
    hf = config.to_hf_dict()
    assert not any(key.startswith("attention") and key != "attention_dropout" for key in hf)
    back = type(config).from_hf_dict(hf)
    assert back.attention == "auto" and back.attention_block == 512
    assert back.replace(attention="chunked", attention_block=256) == config


def test_splash_model_compiles_for_a_tpu_topology():
    pytest.importorskip("libtpu", reason="libtpu not installed")
    from jax.experimental import topologies  # noqa: PLC0415 (needs libtpu)

    from dgpo_jax.parallel.sharding import ShardingPlan, make_mesh  # noqa: PLC0415

    topology = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu")
    plan = ShardingPlan(make_mesh({"data": 2, "fsdp": 1, "tensor": 2}, devices=topology.devices))
    config = get_preset("tiny").replace(attention="auto", attention_block=128)
    assert resolve_kernel(config.attention, 256, plan) == "splash"
    shardings = plan.param_shardings(config)
    params = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        param_shapes(config),
        shardings,
    )
    ids = jax.ShapeDtypeStruct((4, 256), jnp.int32, sharding=plan.batch_sharding(2, (4, 256)))

    def loss(p, ids, seg):
        return jnp.mean(forward(config, p, ids, None, plan, seg))

    compiled = jax.jit(jax.value_and_grad(loss)).lower(params, ids, ids).compile()
    assert "splash" in compiled.as_text()
    assert compiled.memory_analysis().temp_size_in_bytes < 64 * 2**20
