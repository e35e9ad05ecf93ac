"""Mixed precision in the update step: bfloat16 compute on float32 master weights trains like
float32, bfloat16 storage does not (an AdamW step at lr 1e-6 is below half a bfloat16 ulp of
almost every weight); the state keeps the masters' dtype everywhere (value head, moments,
abstract state)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dgpo_jax.learner.optim import OptimConfig
from dgpo_jax.learner.update_step import (
    abstract_update_state,
    create_update_state,
    make_update_step,
)
from dgpo_jax.models import get_preset, param_shapes
from dgpo_jax.objectives import get_objective
from tests.conftest import random_params

V, B, T, PROMPT = 48, 8, 12, 3
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
ADAMW = OptimConfig(lr=1e-6, schedule="constant", weight_decay=0.01, grad_clip=1.0)


@pytest.fixture(scope="module")
def setup():
    config = get_preset("tiny", vocab_size=V, num_hidden_layers=1, tie_word_embeddings=False)
    params = random_params(config, 0)
    r = np.random.default_rng(0)
    am = np.ones((B, T), np.int32)
    lm = np.zeros((B, T), np.float32)
    lm[:, PROMPT:] = 1
    batch = dict(
        input_ids=r.integers(0, V, (B, T)).astype(np.int32), attention_mask=am, loss_mask=lm
    )
    return config, params, batch


def flat(tree):
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def weight_update(config, params, batch, storage, compute=None, steps=3):
    """(policy weights after ``steps`` AdamW steps - before, in float64; the final state)."""
    cfg = get_objective("seqkd")
    step = make_update_step(
        cfg, config, optimizer=ADAMW, compute_dtype=compute, compiler_options=FAST
    )
    stored = jax.tree.map(lambda x: jnp.array(x, storage, copy=True), params)  # donated
    state = create_update_state(cfg, stored, step.tx, 0)
    before = flat(state.params["policy"])
    for _ in range(steps):
        state, metrics = step(state, batch)
        assert float(metrics["skipped"]) == 0
    return flat(state.params["policy"]) - before, state


def test_bfloat16_compute_on_float32_masters_moves_weights_as_float32(setup):
    config, params, batch = setup
    ref, _ = weight_update(config, params, batch, jnp.float32)
    mixed, state = weight_update(config, params, batch, jnp.float32, compute=jnp.bfloat16)
    low, low_state = weight_update(config, params, batch, jnp.bfloat16)
    norm = np.linalg.norm(ref)
    # AdamW at lr 1e-6 moves (nearly) every weight by ~3e-6 in three steps
    assert 1e-6 < norm / np.sqrt(ref.size) < 1e-5
    # the masters and the moments stay float32 under bfloat16 compute
    for leaf in jax.tree.leaves((state.params, state.train.opt_state)):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert leaf.dtype == jnp.float32
    rel_mixed = np.linalg.norm(mixed - ref) / norm
    rel_low = np.linalg.norm(low - ref) / norm
    cos_mixed = mixed @ ref / (np.linalg.norm(mixed) * norm)
    moved_low = np.mean(low != 0)
    print(
        f"relative update difference: bf16 compute {rel_mixed:.4f} (cosine {cos_mixed:.4f}, "
        f"norm ratio {np.linalg.norm(mixed) / norm:.4f}), bf16 storage {rel_low:.4f} "
        f"(weights moved {moved_low:.4f})"
    )
    # Mixed: the same update up to bfloat16 rounding of the activations. What differs is
    # mostly the ~0.3% of weights whose gradient is within that rounding of zero: Adam moves
    # them by +-lr either way, and the sign flips.
    assert rel_mixed < 0.1
    assert cos_mixed > 0.99
    assert abs(np.linalg.norm(mixed) / norm - 1) < 0.02
    # bfloat16 storage: weights and moments in bfloat16, the update mostly rounds away
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(low_state.params["policy"]))
    assert rel_low > 0.5
    assert moved_low < 0.2


def test_state_follows_the_master_dtype():
    """A value head or a separate critic is built in the policy's (master) dtype;
    ``param_dtype`` casts bfloat16-loaded weights up to float32 masters, and the abstract state
    for the memory plan has the same dtypes."""
    config = get_preset("tiny", vocab_size=V, num_hidden_layers=1)
    bf16 = random_params(config, 0, std=0.02)
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), bf16)
    tx = optax.adamw(1e-6)
    for critic in ("value_head", "separate"):
        cfg = get_objective("ppo", critic=critic)
        f32_state = create_update_state(
            cfg, jax.tree.map(lambda x: x.astype(jnp.float32), bf16), tx, 0
        )
        state = create_update_state(cfg, bf16, tx, 0, param_dtype="float32")
        abstract = abstract_update_state(cfg, param_shapes(config, jnp.bfloat16), tx, "float32")
        for s in (f32_state, state, abstract):
            dtypes = {x.dtype for x in jax.tree.leaves((s.train.params, s.train.opt_state))}
            assert dtypes <= {jnp.dtype(jnp.float32), jnp.dtype(jnp.int32)}, (critic, dtypes)
        same = jax.tree.map(lambda a, b: a.shape == b.shape and a.dtype == b.dtype, state, abstract)
        assert all(jax.tree.leaves(same))
        kept = create_update_state(cfg, bf16, tx, 0)  # no param_dtype: as given
        head = kept.params["value_head"] if critic == "value_head" else kept.params["critic"]
        assert {x.dtype for x in jax.tree.leaves(head)} == {jnp.dtype(jnp.bfloat16)}


def test_bad_compute_dtype_is_named(setup):
    config, _, _ = setup
    with pytest.raises(ValueError, match="compute_dtype must be a floating dtype, got int32"):
        make_update_step(get_objective("seqkd"), config, compute_dtype="int32")
