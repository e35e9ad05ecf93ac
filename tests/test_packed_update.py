"""Packed update batches: several trajectories per row (segment_ids, traj_index, per-trajectory
rewards / group ids [N]) give the loss, metrics and gradients of the padded batch of the same
trajectories -- for DGPO (in-program teacher, separate critic: GAE, the reference-quirk critic
region, whitening, the u(tau) gate), GRPO (groups spread over packed rows, sequence-mean
aggregation) and GKD (full-vocabulary teacher logits) -- and ``prepare_rollout`` on a packed
batch equals the padded one after unpacking. Packed with micro-batches, padded without. The
packed step compiles ahead of time from the abstract packed batch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dgpo_jax.learner.update_step import (
    abstract_update_state,
    create_update_state,
    make_update_step,
)
from dgpo_jax.models import forward, get_preset, param_shapes
from dgpo_jax.objectives import get_objective
from dgpo_jax.objectives.batch import batch_requirements
from tests.conftest import random_params

V, T, WIDTH, PROMPT = 48, 12, 16, 3
LENGTHS = [12, 9, 7, 5, 10, 6]  # real tokens per trajectory: 4 packed rows of 16
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@pytest.fixture(scope="module")
def models():
    sc = get_preset("tiny", vocab_size=V, num_hidden_layers=1, tie_word_embeddings=False)
    tc = get_preset("tiny-teacher", vocab_size=V, num_hidden_layers=1, tie_word_embeddings=False)
    sp, tp = random_params(sc, 0), random_params(tc, 1)
    sp = dict(sp, lm_head=sp["lm_head"] * 10)  # sharper distributions: visible disagreements
    tp = dict(tp, lm_head=tp["lm_head"] * 10)
    return sc, sp, tc, tp


def token_logprobs(config, params, ids, am):
    lp = jax.nn.log_softmax(forward(config, params, jnp.asarray(ids), jnp.asarray(am)), -1)
    out = np.zeros(ids.shape, np.float32)
    out[:, 1:] = np.take_along_axis(np.asarray(lp)[:, :-1], ids[:, 1:, None], -1)[..., 0]
    return out


def padded_batch(models, seed=0):
    """Six left-padded trajectories of different lengths: prompt, response with an observation
    hole in the longer ones; wrong and right answers, two GRPO groups of three."""
    sc, sp, _, _ = models
    r = np.random.default_rng(seed)
    n = len(LENGTHS)
    ids = r.integers(0, V, (n, T)).astype(np.int32)
    am = np.zeros((n, T), np.int32)
    lm = np.zeros((n, T), np.float32)
    for i, length in enumerate(LENGTHS):
        start = T - length
        am[i, start:] = 1
        lm[i, start + PROMPT :] = 1
        if length >= 9:
            lm[i, start + 5 : start + 7] = 0  # an observation
    ids = ids * am
    old = token_logprobs(sc, sp, ids, am)
    return dict(
        input_ids=ids,
        attention_mask=am,
        loss_mask=lm,
        old_logprobs=old,
        ref_logprobs=(old + r.normal(0, 0.3, old.shape)).astype(np.float32),
        rewards=np.array([1.0, 0.0, 0.0, 1.0, 0.0, 1.0], np.float32),
        group_ids=np.array([0, 1, 0, 1, 0, 1], np.int32),
    )


def pack(batch, width):
    """A local packer (first-fit-decreasing): (packed batch, unpack [R, W] -> [N, T])."""
    am = batch["attention_mask"]
    n, t = am.shape
    lengths = am.sum(1)
    rows = []  # [trajectories, free positions]
    for i in np.argsort(-lengths, kind="stable"):
        for row in rows:
            if row[1] >= lengths[i]:
                row[0].append(i)
                row[1] -= lengths[i]
                break
        else:
            rows.append([[i], width - lengths[i]])
    per_token = [k for k, v in batch.items() if np.ndim(v) == 2]
    packed = {k: np.zeros((len(rows), width), batch[k].dtype) for k in per_token}
    seg = np.zeros((len(rows), width), np.int32)
    traj = np.full((len(rows), width), -1, np.int32)
    where = {}
    for r, (items, _) in enumerate(rows):
        pos = 0
        for s, i in enumerate(items, 1):
            real = np.flatnonzero(am[i])
            for k in per_token:
                packed[k][r, pos : pos + len(real)] = batch[k][i, real]
            seg[r, pos : pos + len(real)], traj[r, pos : pos + len(real)] = s, i
            where[i] = (r, pos, real)
            pos += len(real)
    packed.update(segment_ids=seg, traj_index=traj, attention_mask=(seg > 0).astype(np.int32))
    packed.update({k: v for k, v in batch.items() if np.ndim(v) < 2})

    def unpack(x):
        out = np.zeros((n, t), np.asarray(x).dtype)
        for i, (r, pos, real) in where.items():
            out[i, real] = np.asarray(x)[r, pos : pos + len(real)]
        return out

    return packed, unpack


def select(batch, cfg, in_program):
    req, opt = batch_requirements(cfg, in_program)
    return {k: v for k, v in batch.items() if k in req or k in opt}


def run_both(models, cfg, in_program, packed_micro=2):
    """One SGD(1) step on the padded batch (1 micro-batch) and on the packed one: the metrics
    and the gradients (minus the parameter change) of each."""
    sc, sp, tc, tp = models
    padded = select(padded_batch(models), cfg, in_program)
    packed, _ = pack(padded, WIDTH)
    assert packed["input_ids"].shape == (4, WIDTH)
    out = []
    for batch, micro in ((padded, 1), (packed, packed_micro)):
        step = make_update_step(
            cfg,
            sc,
            tc if in_program else None,
            optimizer=optax.sgd(1.0),
            micro_batches=micro,
            compiler_options=FAST,
        )
        state = create_update_state(cfg, jax.tree.map(jnp.copy, sp), step.tx, 0)
        before = jax.device_get(state.params)
        new, metrics = step(state, batch, tp if in_program else None)
        grads = jax.tree.map(lambda a, b: a - b, before, jax.device_get(new.params))
        out.append((jax.device_get(metrics), grads))
    return out


def assert_same(padded, packed, rtol=2e-4):
    (m1, g1), (m2, g2) = padded, packed
    assert set(m1) == set(m2)
    assert float(m1["skipped"]) == 0 and float(m2["skipped"]) == 0
    for k in m1:
        np.testing.assert_allclose(float(m2[k]), float(m1[k]), rtol=rtol, atol=1e-6, err_msg=k)
    scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(g1))
    assert scale > 1e-4  # the gradient is not trivially zero
    for path, a in jax.tree_util.tree_leaves_with_path(g1):
        b = g2
        for key in path:
            b = b[key.key]
        np.testing.assert_allclose(
            b, a, rtol=0, atol=2e-3 * scale, err_msg=jax.tree_util.keystr(path)
        )


def test_dgpo_with_critic_packed_equals_padded(models):
    """DGPO with the KL in the reward (teacher forward in the program for GAE's token
    rewards), a separate critic trunk, the reference-quirk critic region and whitening: the
    gate u(tau), GAE (never across a segment) and the critic's region are per trajectory."""
    cfg = get_objective("dgpo", beta=0.5).replace(reference_quirk=True)
    padded, packed = run_both(models, cfg, True)
    assert 0 < float(padded[0]["gate_share"]) < 1
    assert "value_loss" in padded[0] and "explained_variance" in padded[0]
    assert_same(padded, packed)


def test_grpo_groups_and_sequence_mean_packed_equals_padded(models):
    """GRPO's group statistics on the [N] rewards (groups spread over packed rows), the KL
    loss to the reference, and sequence-mean aggregation over trajectories, not rows."""
    cfg = get_objective("grpo", kl_coef=0.1).replace(loss_aggregation="seq_mean_token_mean")
    padded, packed = run_both(models, cfg, False)
    assert_same(padded, packed)


def test_gkd_packed_equals_padded(models):
    """A full-vocabulary distillation objective: student and teacher forwards per segment."""
    cfg = get_objective("gkd")
    padded, packed = run_both(models, cfg, True)
    assert_same(padded, packed)


def test_prepare_rollout_packed_equals_padded_after_unpacking(models):
    """The whole-batch pass (values, in-program teacher log-probs, GAE advantages whitened
    over the batch, returns) on the packed batch, unpacked, equals the padded one; and the
    packing matters: GAE run over whole packed rows (one trajectory per row) differs."""
    sc, sp, tc, tp = models
    cfg = get_objective("dgpo", beta=0.5).replace(reference_quirk=True)
    step = make_update_step(cfg, sc, tc, optimizer=optax.sgd(0.0), compiler_options=FAST)
    state = create_update_state(cfg, jax.tree.map(jnp.copy, sp), step.tx, 0)
    padded = select(padded_batch(models), cfg, True)
    packed, unpack = pack(padded, WIDTH)
    out1, m1 = jax.device_get(step.prepare_rollout(state, padded, tp, micro_batches=2))
    out2, m2 = jax.device_get(step.prepare_rollout(state, packed, tp, micro_batches=2))
    am = padded["attention_mask"]
    first = np.zeros_like(am, bool)
    first[np.arange(len(am)), np.argmax(am, axis=1)] = True
    inner = (am > 0) & ~first  # a trajectory's first token reads no state of its own
    for k in ("advantages", "returns", "policy_gate", "values", "teacher_logprobs"):
        want, got = np.asarray(out1[k]), unpack(out2[k])
        np.testing.assert_allclose(got[inner], want[inner], rtol=1e-4, atol=1e-5, err_msg=k)
    for k in m1:
        np.testing.assert_allclose(float(m2[k]), float(m1[k]), rtol=1e-4, atol=1e-6, err_msg=k)
    # The same packed batch read as one trajectory per row (no segments): other advantages.
    as_rows = {k: v for k, v in packed.items() if k not in ("segment_ids", "traj_index")}
    as_rows.update(rewards=np.zeros(4, np.float32))
    out3, _ = jax.device_get(step.prepare_rollout(state, as_rows, tp, micro_batches=2))
    assert np.max(np.abs(unpack(out3["advantages"]) - np.asarray(out1["advantages"]))) > 1e-2


def test_packing_module_layout_gives_the_same_step(models):
    """The packed batch of ``dgpo_jax.learner.packing.pack_trajectories`` (its row order and
    layout) gives the padded batch's GRPO step as well."""
    packing = pytest.importorskip("dgpo_jax.learner.packing")
    sc, sp, tc, tp = models
    cfg = get_objective("grpo", kl_coef=0.1)
    padded = select(padded_batch(models), cfg, False)
    packed, layout = packing.pack_trajectories(padded, WIDTH, rows_multiple=2)
    out = []
    for batch, micro in ((padded, 1), (packed, 2)):
        step = make_update_step(
            cfg, sc, optimizer=optax.sgd(0.0), micro_batches=micro, compiler_options=FAST
        )
        state = create_update_state(cfg, jax.tree.map(jnp.copy, sp), step.tx, 0)
        out.append(jax.device_get(step(state, batch)[1]))
    for k in ("loss", "policy_loss", "kl_loss", "entropy", "advantage_abs", "grad_norm"):
        np.testing.assert_allclose(float(out[1][k]), float(out[0][k]), rtol=2e-4, err_msg=k)


BACKEND_COMPILES = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, *_, **__: (
        BACKEND_COMPILES.append(event)
        if event == "/jax/core/compile/backend_compile_duration"
        else None
    )
)


def test_compile_from_the_abstract_packed_batch(models):
    """The packed step compiled ahead of time from ``abstract_batch(..., packed=True)`` and the
    abstract state is the program a packed batch of those shapes runs (no second compile)."""
    sc, sp, _, _ = models
    cfg = get_objective("grpo", kl_coef=0.1)
    step = make_update_step(
        cfg, sc, optimizer=optax.sgd(0.0), micro_batches=2, compiler_options=FAST
    )
    abstract = step.abstract_batch(4, WIDTH, packed=True, trajectories=len(LENGTHS))
    assert abstract["rewards"].shape == (6,) and abstract["traj_index"].shape == (4, WIDTH)
    step.compile(abstract_update_state(cfg, param_shapes(sc), step.tx), abstract)
    packed, _ = pack(select(padded_batch(models), cfg, False), WIDTH)
    state = create_update_state(cfg, jax.tree.map(jnp.copy, sp), step.tx, 0)
    n = len(BACKEND_COMPILES)
    for _ in range(2):  # and again on the state it returned
        state, metrics = step(state, {k: packed[k] for k in abstract})
        assert len(BACKEND_COMPILES) == n and float(metrics["skipped"]) == 0
