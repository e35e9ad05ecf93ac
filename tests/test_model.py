"""Qwen2 in Flax against transformers/PyTorch on tiny random models."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import dgpo_jax
from dgpo_jax.models import (
    Qwen2Config,
    forward_with_cache,
    get_preset,
    init_cache,
    param_shapes,
    qwen2,
)
from dgpo_jax.models.qwen2 import span_buckets, split_cache, split_layers
from dgpo_jax.parallel.sharding import ShardingPlan
from tests.conftest import make_hf_model


def _batch(vocab=256, b=3, t=12, seed=0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, vocab, (b, t))
    mask = np.ones((b, t), np.int64)
    mask[1, :4] = 0  # left padding of different lengths
    mask[2, :7] = 0
    return ids, mask


def _hf_logits(model, ids, mask=None):
    with torch.no_grad():
        if mask is None:
            return model(input_ids=torch.tensor(ids)).logits.float().numpy()
        pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
        return (
            model(
                input_ids=torch.tensor(ids),
                attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(pos),
            )
            .logits.float()
            .numpy()
        )


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("theta", [1e4, 1e6])
def test_logits_parity_float32_left_padded(hf_models, tied, theta):
    path, hf = hf_models[(tied, theta)]
    config, params = dgpo_jax.load_hf(path, dtype="float32")
    assert config.tie_word_embeddings == tied and config.rope_theta == theta
    ids, mask = _batch()
    ours = np.asarray(dgpo_jax.forward(config, params, ids, mask))
    assert ours.shape == (3, 12, 256) and ours.dtype == np.float32
    # 1) Same padded batch through transformers (positions counted over real tokens).
    ref = _hf_logits(hf, ids, mask)
    np.testing.assert_array_less(np.abs(ours - ref)[mask.astype(bool)], 1e-4)
    # 2) Each row alone, unpadded: padding must not change a row's logits.
    for b in range(3):
        real = mask[b].astype(bool)
        alone = _hf_logits(hf, ids[b : b + 1, real])[0]
        assert np.abs(ours[b, real] - alone).max() <= 1e-4


def test_bfloat16_within_reference_rounding(hf_models):
    """bf16 error vs the float32 reference is bounded by transformers' own bf16 error.

    Justification: our bf16 path keeps the reference's bf16 storage and float32 softmax/RMSNorm
    statistics, so its rounding error should be of the same order as transformers run in bf16.
    We allow 2x that error (measured on the same inputs) and a small per-token KL.
    """
    path, hf = hf_models[(False, 1e6)]
    config, params = dgpo_jax.load_hf(path, dtype="bfloat16")
    assert params["layers"]["mlp"]["up_kernel"].dtype == jnp.bfloat16
    ids, mask = _batch()
    ref32 = _hf_logits(hf, ids, mask)
    hf16 = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ref16 = _hf_logits(hf16, ids, mask)
    ours = np.asarray(dgpo_jax.forward(config, params, ids, mask))
    sel = mask.astype(bool)
    ours_err = np.abs(ours - ref32)[sel].max()
    hf_err = np.abs(ref16 - ref32)[sel].max()
    assert ours_err <= 2 * hf_err + 1e-3, (ours_err, hf_err)
    logp = jax.nn.log_softmax(ref32[sel], -1)
    logq = jax.nn.log_softmax(ours[sel], -1)
    kl = np.asarray(jnp.sum(jnp.exp(logp) * (logp - logq), -1))
    assert kl.mean() < 1e-3 and kl.max() < 1.5e-2  # the 0.015 bound used by other JAX ports


def test_bfloat16_matmuls_on_cpu_keep_no_float32_copy_of_the_weights(monkeypatch):
    """XLA:CPU's bfloat16 dot returns float32 natively; asked for a bfloat16 result, it first
    converts the weights to float32. So on CPU the model asks for float32 and casts (its
    compiled bf16 MLP holds no float32 weights), and only accelerators get the dot with the
    bfloat16 result, which compiled for CPU holds a float32 copy of the weights."""
    config = get_preset("tiny", vocab_size=64, hidden_size=256, intermediate_size=2048)
    mlp = qwen2.MLP(config, param_dtype=jnp.bfloat16)
    x = jnp.zeros((1, 8, 256), jnp.bfloat16)
    params = jax.eval_shape(mlp.init, jax.random.key(0), x)
    weights_f32 = 3 * 256 * 2048 * 4

    def temporaries():
        return jax.jit(mlp.apply).lower(params, x).compile().memory_analysis().temp_size_in_bytes

    assert temporaries() < weights_f32 / 10
    monkeypatch.setattr(qwen2, "compile_platform", lambda plan=None: "gpu")
    assert temporaries() >= weights_f32  # the accelerators' form, compiled by XLA:CPU


def test_greedy_kv_cache_decode_matches_generate(tmp_path):
    hf = make_hf_model(tmp_path, std=0.3, seed=3)  # sharp logits: a varied greedy path
    config, params = dgpo_jax.load_hf(str(tmp_path), dtype="float32")
    ids, mask = _batch(t=8, seed=1)
    ours = np.asarray(dgpo_jax.greedy_generate(config, params, ids, mask, max_new_tokens=32))
    with torch.no_grad():
        ref = hf.generate(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            max_new_tokens=32,
            do_sample=False,
            pad_token_id=0,
        )[:, 8:].numpy()
    assert ref.shape == (3, 32)
    assert len(np.unique(ref)) > 8  # the path is not a trivial repetition
    np.testing.assert_array_equal(ours, ref)


def test_cache_prefill_then_ragged_chunks_equal_full_forward(hf_models):
    """Rows append chunks of different lengths (right-padded chunks): the logits of every real
    token equal transformers on the row's whole real sequence."""
    path, hf = hf_models[(True, 1e6)]
    config, params = dgpo_jax.load_hf(path, dtype="float32")
    rng = np.random.RandomState(2)
    prompt, pmask = _batch(t=6, seed=2)
    chunk1 = rng.randint(0, 256, (3, 5))
    c1mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    chunk2 = rng.randint(0, 256, (3, 1))
    c2mask = np.ones((3, 1), np.int64)
    cache = init_cache(config, 3, 32)
    step = jax.jit(forward_with_cache, static_argnames=("config",))
    l0, cache = step(config, params, prompt, cache, pmask)
    l1, cache = step(config, params, chunk1, cache, c1mask)
    l2, cache = step(config, params, chunk2, cache, c2mask)
    np.testing.assert_array_equal(np.asarray(cache.next_pos), pmask.sum(1) + c1mask.sum(1) + 1)
    for b in range(3):
        seq = np.concatenate([prompt[b][pmask[b] == 1], chunk1[b][c1mask[b] == 1], chunk2[b]])
        ref = _hf_logits(hf, seq[None])[0]
        ours = np.concatenate(
            [np.asarray(l0)[b][pmask[b] == 1], np.asarray(l1)[b][c1mask[b] == 1], np.asarray(l2)[b]]
        )
        assert np.abs(ours - ref).max() <= 1e-4


def test_cache_row_subsets_and_key_windows_match_transformers(hf_models):
    """Steps on subsets of the rows (``rows=``, with a dummy row), whose key windows cross
    several `span_buckets` widths, give transformers' logits for every real token; rows outside
    a step keep their cache exactly; split-layer parameters, with the stacked cache or with one
    cache array per layer (`split_cache`), give the same as stacked ones."""
    path, hf = hf_models[(False, 1e6)]
    config, params = dgpo_jax.load_hf(path, dtype="float32")
    slots = 300
    assert span_buckets(slots) == (128, 192, 256, 300)  # four compiled windows below
    rng = np.random.RandomState(4)
    prompt = rng.randint(0, 256, (3, 120))
    pmask = np.ones((3, 120), np.int64)
    pmask[1, :30] = 0  # left padding
    # (input ids [M, T], token mask, rows or None); comment: cached slots -> key window.
    steps = [(prompt, pmask, None)]  # prefill
    steps.append((rng.randint(0, 256, (2, 40)), np.ones((2, 40), np.int64), [2, 0]))  # 120 -> 128
    # Row 3 is a dummy row (B = 3): it writes nothing.
    steps.append((rng.randint(0, 256, (2, 90)), np.ones((2, 90), np.int64), [0, 3]))  # 160 -> 192
    steps.append((rng.randint(0, 256, (1, 10)), np.ones((1, 10), np.int64), [0]))  # 250 -> 256
    steps.append((rng.randint(0, 256, (3, 1)), np.ones((3, 1), np.int64), None))  # 260 -> 300
    chunk = np.ones((2, 8), np.int64)
    chunk[1, 5:] = 0  # right padding
    steps.append((rng.randint(0, 256, (2, 8)), chunk, [1, 2]))  # 161 -> 192
    step = jax.jit(forward_with_cache, static_argnames=("config",))
    results = {}

    def stacked(kv):  # [L, B, K, S, Dh] from either layout
        return np.concatenate(kv) if isinstance(kv, tuple) else np.asarray(kv)

    split = split_layers(params)
    for name, p, per_layer in (
        ("stacked", params, False),
        ("split", split, False),
        ("split cache", split, True),
    ):
        cache, seqs = init_cache(config, 3, slots), [[] for _ in range(3)]
        if per_layer:
            cache = split_cache(cache)
            assert len(cache.k) == config.num_hidden_layers and cache.max_len == slots
        outs = [[] for _ in range(3)]
        for ids, mask, rows in steps:
            before = cache
            logits, cache = step(config, p, ids, cache, mask, rows=rows)
            assert isinstance(cache.k, tuple) == per_layer
            logits = np.asarray(logits)
            for i, row in enumerate(range(3) if rows is None else rows):
                if row < 3:
                    real = mask[i].astype(bool)
                    seqs[row].extend(ids[i][real].tolist())
                    outs[row].append(logits[i][real])
            for row in set(range(3)) - set(range(3) if rows is None else rows):
                np.testing.assert_array_equal(stacked(cache.k)[:, row], stacked(before.k)[:, row])
                assert int(cache.end[row]) == int(before.end[row])
        results[name] = (outs, cache)
        np.testing.assert_array_equal(np.asarray(cache.end), [261, 129, 166])
        np.testing.assert_array_equal(np.asarray(cache.next_pos), [261, 99, 166])
        for row in range(3):
            ref = _hf_logits(hf, np.asarray(seqs[row])[None])[0]
            assert np.abs(np.concatenate(outs[row]) - ref).max() <= 1e-4, (name, row)
    for name in ("split", "split cache"):
        for a, b in zip(results["stacked"][0], results[name][0]):
            np.testing.assert_allclose(np.concatenate(a), np.concatenate(b), atol=1e-5)
        for field in ("k", "v"):
            np.testing.assert_allclose(
                stacked(getattr(results["stacked"][1], field)),
                stacked(getattr(results[name][1], field)),
                atol=1e-6,
            )
    with pytest.raises(ValueError, match="per-layer cache .* needs split_layers"):
        step(config, params, steps[0][0], split_cache(init_cache(config, 3, slots)), steps[0][1])


def test_chunks_written_by_layer_equal_the_direct_scatter(hf_models, monkeypatch):
    """Multi-token steps of all rows written into the layer's slice of the stacked cache (TPUs'
    form) leave the same cache, bit for bit, and the same logits as the scatter into the stack,
    with left-padded prompts, a right-padded chunk and a write past the cache's end dropped;
    both match transformers."""
    path, hf = hf_models[(False, 1e6)]
    config, params = dgpo_jax.load_hf(path, dtype="float32")
    rng = np.random.RandomState(11)
    pmask = np.ones((2, 12), np.int64)
    pmask[1, :5] = 0
    chunk_mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    steps = [(rng.randint(0, 256, (2, 12)), pmask), (rng.randint(0, 256, (2, 6)), chunk_mask)]
    steps.append((rng.randint(0, 256, (2, 6)), np.ones((2, 6), np.int64)))  # row 0: 18 -> 24
    results = {}
    for by_layer in (False, True):
        monkeypatch.setattr(qwen2, "WRITE_CHUNKS_BY_LAYER", by_layer)
        jax.clear_caches()  # the form is read when the step is traced
        step = jax.jit(forward_with_cache, static_argnames=("config",))
        cache, logits = init_cache(config, 2, 22), []
        for ids, mask in steps:
            out, cache = step(config, params, ids, cache, mask)
            logits.append(np.asarray(out))
        results[by_layer] = (logits, cache)
    for a, b in zip(results[False][0], results[True][0]):
        np.testing.assert_array_equal(a, b)
    for field in ("k", "v", "valid", "end"):
        np.testing.assert_array_equal(
            np.asarray(getattr(results[False][1], field)),
            np.asarray(getattr(results[True][1], field)),
        )
    # row 0's last step wrote slots 18..23 of 22: the last two were dropped, not wrapped
    assert int(results[True][1].end[0]) == 24 and bool(results[True][1].valid[0, 21])
    seq = np.concatenate([steps[0][0][0], steps[1][0][0], steps[2][0][0][:4]])
    ref = _hf_logits(hf, seq[None])[0]
    got = np.concatenate(
        [results[True][0][0][0], results[True][0][1][0], results[True][0][2][0][:4]]
    )
    assert np.abs(got - ref).max() <= 1e-4


def test_chunks_by_the_pallas_cache_kernels_match_transformers(hf_models, monkeypatch):
    """Prefill and observation chunks written and attended by the Pallas chunk kernels over the
    cache, forced on CPU (Pallas' interpreter): TPUs' form (`write_chunk` and the Mosaic
    kernel) and GPUs' (XLA's scatter and the Triton kernel), with left-padded prompts, a
    right-padded chunk, a row with no token in a step, a TPU key block reaching past the
    cache's 208 slots and split layers with a per-layer cache, give transformers' logits for
    every real token and the XLA form's cache (the first layer's bit for bit: the writes
    against the scatter, before any attention)."""
    path, hf = hf_models[(True, 1e4)]
    config, params = dgpo_jax.load_hf(path, dtype="float32")
    rng = np.random.RandomState(5)
    pmask = np.ones((3, 100), np.int64)
    pmask[1, :37] = 0
    pmask[2, :99] = 0  # one real token
    c1 = np.ones((3, 40), np.int64)
    c1[0, 25:] = 0  # right padding
    c1[1] = 0  # no token: the row is left as it was
    steps = [(rng.randint(0, 256, (3, 100)), pmask), (rng.randint(0, 256, (3, 40)), c1)]
    steps.append((rng.randint(0, 256, (3, 17)), np.ones((3, 17), np.int64)))  # 0: 125 -> 142
    split = split_layers(params)
    results = {}
    for kernel, form, p, per_layer in (
        ("xla", None, params, False),
        ("pallas", "tpu", params, False),
        ("pallas", "tpu", split, True),
        ("pallas", "gpu", params, False),
        ("pallas", "gpu", split, True),
    ):
        monkeypatch.setattr(qwen2, "CHUNK_KERNEL_FORM", form)  # (read when step is traced)
        step = jax.jit(
            functools.partial(forward_with_cache, chunk_kernel=kernel),
            static_argnames=("config",),
        )
        cache = init_cache(config, 3, 208)  # one TPU key block of 256: past the cache, masked
        cache = split_cache(cache) if per_layer else cache
        ids, mask = steps[0]
        jaxpr = str(jax.make_jaxpr(step, static_argnums=0)(config, p, ids, cache, mask))
        assert ("pallas_call" in jaxpr) == (kernel == "pallas")
        assert ("cached_chunk_attention_gpu" in jaxpr) == (form == "gpu")
        seqs, outs = [[] for _ in range(3)], [[] for _ in range(3)]
        for ids, mask in steps:
            logits, cache = step(config, p, ids, cache, mask)
            for row in range(3):
                real = mask[row].astype(bool)
                seqs[row].extend(ids[row][real].tolist())
                outs[row].append(np.asarray(logits)[row][real])
        results[(form, per_layer)] = cache
        for row in range(3):
            ref = _hf_logits(hf, np.asarray(seqs[row])[None])[0]
            got = np.concatenate(outs[row])
            assert got.shape == ref.shape and np.abs(got - ref).max() <= 1e-4, (form, row)
    xla_cache = results.pop((None, False))
    np.testing.assert_array_equal(np.asarray(xla_cache.end), [142, 117, 157])
    for field in ("k", "v"):
        xla = np.asarray(getattr(xla_cache, field))
        valid = np.asarray(xla_cache.valid)[None, :, None, :, None]
        for (form, per_layer), cache in results.items():
            got = getattr(cache, field)
            got = np.concatenate(got) if per_layer else np.asarray(got)
            np.testing.assert_array_equal(got[0], xla[0], err_msg=form)  # (padding's slots too)
            # later layers up to rounding, in the valid slots (padding's are never read)
            np.testing.assert_allclose(np.where(valid, got, 0), np.where(valid, xla, 0), atol=1e-5)


def test_single_token_decode_by_dots_and_by_reduce_match_transformers(hf_models, monkeypatch):
    """One-token decode steps in both forms of the cached one-query attention, forced on CPU:
    batched dots (the form off CPU) and the float32 multiply-and-reduce (XLA:CPU's form), each
    with a static key window and with a per-layer window switch, give transformers' logits; so
    do the dots over key chunks (TPUs' form for wide windows) of 16 slots (40 = 16 + 16 + 8,
    and the switch's 40-slot window in chunks, its 32-slot one in two)."""
    path, hf = hf_models[(False, 1e6)]
    config, params = dgpo_jax.load_hf(path, dtype="float32")
    rng = np.random.RandomState(7)
    prompt = rng.randint(0, 256, (2, 20))
    pmask = np.ones((2, 20), np.int64)
    pmask[1, :6] = 0  # left padding
    new = rng.randint(0, 256, (2, 5))
    refs = []
    for row in range(2):
        seq = np.concatenate([prompt[row][pmask[row].astype(bool)], new[row]])
        # Step i's logits are transformers' at the position of new[:, i].
        refs.append(_hf_logits(hf, seq[None])[0][-new.shape[1] :])
    for form, chunk in (("dots", 0), ("reduce", 0), ("dots", 16)):
        monkeypatch.setattr(qwen2, "DECODE_ATTENTION_FORM", form)
        monkeypatch.setattr(qwen2, "KEY_CHUNK_SLOTS", chunk)
        # Traced afresh per form (the form is read when the step is traced; a new jit of the
        # same function would reuse JAX's cached trace of the previous form).
        jax.clear_caches()
        step = jax.jit(forward_with_cache, static_argnames=("config", "window"))
        for window in (40, None):
            cache = init_cache(config, 2, 40)
            _, cache = step(config, params, prompt, cache, pmask, window=window)
            logits = []
            for i in range(new.shape[1]):
                out, cache = step(config, params, new[:, i : i + 1], cache, window=window)
                logits.append(np.asarray(out[:, 0]))
            for row in range(2):
                got = np.stack([lg[row] for lg in logits])
                assert np.abs(got - refs[row]).max() <= 1e-4, (form, chunk, window, row)


def test_key_chunks_on_tpus_fit_the_budget_per_device(monkeypatch):
    """Key chunk widths by hand: the largest power of two (>= 128) whose keys of one layer on
    one device fit the generation's budget (32 MiB on a v5e, 16 MiB on the others), on TPUs
    only. The 0.5B model's cache (2 KV heads of 64, bf16): 256 rows hold 64 KiB a slot, so 512
    slots on a v5e and 256 on a v6e; 32 rows, 4096; 32 rows over 4 devices, 8 a device, 16384;
    6 rows, which 4 does not divide, over the 2 of `data` only: 3 a device, 768 bytes a slot,
    32768; never below 128."""
    cache = lambda rows: jax.ShapeDtypeStruct((24, rows, 2, 8704, 64), jnp.bfloat16)  # noqa: E731
    assert qwen2._key_chunk(cache(256), None) == 0  # the CPU: no chunks
    monkeypatch.setattr(qwen2, "compile_platform", lambda plan=None: "tpu")
    monkeypatch.setattr(qwen2, "_device_kind", lambda plan=None: "TPU v5 lite")
    assert qwen2._key_chunk(cache(256), None) == 512
    assert qwen2._key_chunk(cache(32), None) == 4096
    assert qwen2._key_chunk(cache(4096), None) == 128

    four_way = ShardingPlan(
        jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "fsdp"))
    )
    assert qwen2._key_chunk(cache(32), four_way) == 16384  # 8 rows a device
    assert qwen2._key_chunk(cache(6), four_way) == 32768  # 6 rows: over data only, 3 a device
    monkeypatch.setattr(qwen2, "_device_kind", lambda plan=None: "TPU v6 lite")
    assert qwen2._key_chunk(cache(256), None) == 256


def test_ragged_blocks_fewest_splits_for_enough_programs():
    """(k_splits, block_k) by hand: splits for ~1024 programs (heads x splits, powers of two up
    to 16), each split at least 16 slots, then the largest block dividing a split."""
    assert qwen2._ragged_blocks(768, 512) == (2, 128)  # 0.5B at batch 256: 1024 programs
    assert qwen2._ragged_blocks(768, 4) == (16, 16)  # 16 splits of 48 slots: blocks of 16
    assert qwen2._ragged_blocks(8704, 16) == (16, 32)  # 544 slots a split = 17 x 32
    assert qwen2._ragged_blocks(2048, 2048) == (1, 128)
    assert qwen2._ragged_blocks(48, 6) == (1, 16)  # 16 splits of 3 slots: too few; then 1


@pytest.mark.parametrize("kernel", ["pallas", "fused"])
def test_pallas_decode_kernels_match_transformers(hf_models, monkeypatch, kernel):
    """One-token steps through the ragged Pallas decode kernel, or the fused Triton kernel that
    also rotates and writes the new key and value (both interpreted on CPU), over a per-layer
    cache give transformers' logits for rows with left padding, and the XLA path's cache; a
    row whose visible slots have a hole gets NaN instead of a silent answer; the kernels'
    preconditions are one-line errors."""
    path, hf = hf_models[(False, 1e6)]
    config, params = dgpo_jax.load_hf(path, dtype="float32")
    split = split_layers(params)
    rng = np.random.RandomState(11)
    prompt = rng.randint(0, 256, (3, 20))
    pmask = np.ones((3, 20), np.int64)
    pmask[1, :6] = 0  # left padding
    pmask[2, :19] = 0  # one real prompt token
    new = rng.randint(0, 256, (3, 4))
    step = jax.jit(forward_with_cache, static_argnames=("config", "window", "decode_kernel"))
    caches = {}
    for form in ("xla", kernel):
        cache = split_cache(init_cache(config, 3, 48))
        _, cache = step(config, split, prompt, cache, pmask)
        got = []
        for i in range(new.shape[1]):
            out, cache = step(config, split, new[:, i : i + 1], cache, decode_kernel=form)
            got.append(np.asarray(out[:, 0]))
        caches[form] = cache
    jaxpr = str(jax.make_jaxpr(step, static_argnums=0)(config, split, new[:, :1], cache))
    assert "pallas_call" not in jaxpr  # (the default: XLA's attention)
    for row in range(3):
        seq = np.concatenate([prompt[row][pmask[row].astype(bool)], new[row]])
        ref = _hf_logits(hf, seq[None])[0][-new.shape[1] :]
        assert np.abs(np.stack([g[row] for g in got]) - ref).max() <= 1e-4, row
    for field in ("k", "v"):
        np.testing.assert_allclose(
            np.concatenate(getattr(caches[kernel], field)),
            np.concatenate(getattr(caches["xla"], field)),
            atol=1e-6,
        )
    if kernel == "pallas":  # the same steps with the slots in 3 key splits (combined)
        monkeypatch.setattr(qwen2, "RAGGED_BLOCKS", (3, 16))
        jax.clear_caches()  # else the new jit reuses JAX's cached trace with the default blocks
        split_step = jax.jit(
            forward_with_cache, static_argnames=("config", "window", "decode_kernel")
        )
        cache3 = split_cache(init_cache(config, 3, 48))
        _, cache3 = split_step(config, split, prompt, cache3, pmask)
        for i in range(new.shape[1]):
            out, cache3 = split_step(config, split, new[:, i : i + 1], cache3, decode_kernel=kernel)
            np.testing.assert_allclose(np.asarray(out[:, 0]), got[i], atol=1e-5)
        monkeypatch.setattr(qwen2, "RAGGED_BLOCKS", None)
    # A left-padded chunk after row 0's tokens leaves a hole in its visible slots.
    chunk = rng.randint(0, 256, (3, 2))
    _, cache = step(config, split, chunk, cache, np.array([[0, 1], [1, 1], [1, 1]]))
    out, _ = step(config, split, new[:, :1], cache, decode_kernel=kernel)
    out = np.asarray(out)
    assert np.isnan(out[0]).all() and np.isfinite(out[1:]).all()
    stacked = init_cache(config, 3, 48)
    with pytest.raises(ValueError, match="needs a per-layer cache"):
        step(config, split, new[:, :1], stacked, decode_kernel=kernel)
    with pytest.raises(ValueError, match="every cache row"):
        step(config, split, new[:2, :1], cache, rows=np.array([0, 1]), decode_kernel=kernel)
    with pytest.raises(ValueError, match="(multiple of 16 slots .* it has 40|40 slots .* 16)"):
        step(
            config,
            split,
            new[:, :1],
            split_cache(init_cache(config, 3, 40)),
            decode_kernel=kernel,
        )
    with pytest.raises(ValueError, match="decode_kernel 'triton'"):
        step(config, split, new[:, :1], cache, decode_kernel="triton")


def test_config_old_and_transformers5_formats(hf_models):
    base = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": 100,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "use_sliding_window": False,
        "sliding_window": 4096,
        "max_window_layers": 21,
    }
    old = dict(base, rope_theta=10000.0)
    new = dict(
        base,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
        layer_types=["full_attention"] * 2,
        sliding_window=None,
    )
    assert Qwen2Config.from_hf_dict(old) == Qwen2Config.from_hf_dict(new)
    assert Qwen2Config.from_hf_dict(old).rope_theta == 10000.0
    # What this transformers writes, read back.
    path, _ = hf_models[(False, 1e4)]
    with open(f"{path}/config.json") as f:
        written = json.load(f)
    assert Qwen2Config.from_hf_dict(written).rope_theta == 1e4


def test_presets_param_counts():
    # Qwen2.5-0.5B has 494,032,768 parameters (tied head), as published.
    cfg = get_preset("qwen2.5-0.5b")
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(param_shapes(cfg)))
    assert n == cfg.num_params() == 494_032_768
    # Every preset agrees with transformers' own module count (no weights allocated).
    for name in ("qwen2.5-1.5b", "qwen2.5-3b", "qwen2.5-7b", "tiny"):
        cfg = get_preset(name)
        with torch.device("meta"):
            hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**cfg.to_hf_dict()))
        assert cfg.num_params() == sum(p.numel() for p in hf.parameters()), name


def test_replace_rederives_a_derived_head_dim():
    """Widening a preset re-derives head_dim (64 -> 128 with the heads fixed); an explicit
    head_dim that differs from hidden_size // heads survives a replace; shapes follow."""
    tiny = get_preset("tiny")
    wide = tiny.replace(hidden_size=2 * tiny.hidden_size)
    assert wide.head_dim == 2 * tiny.head_dim == wide.hidden_size // wide.num_attention_heads
    q = param_shapes(wide)["layers"]["attn"]["q_kernel"].shape  # [L, D, heads, head_dim]
    assert q[1] == wide.hidden_size and q[2] * q[3] == wide.hidden_size
    more_heads = tiny.replace(num_attention_heads=2 * tiny.num_attention_heads)
    assert more_heads.head_dim == tiny.head_dim // 2
    explicit = tiny.replace(head_dim=3 * tiny.head_dim)
    assert explicit.replace(hidden_size=2 * tiny.hidden_size).head_dim == 3 * tiny.head_dim
    assert tiny.replace(num_hidden_layers=1).head_dim == tiny.head_dim
